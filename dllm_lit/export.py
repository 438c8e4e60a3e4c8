"""Export trained weights as a Hugging Face directory that `dllm_lit predict` (or transformers) loads.

python -m dllm_lit.export path/to/last.ckpt path/to/hf_dir
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import lightning as L
from peft import PeftModel

from dllm_lit.adapters import draft_gate, mark_drafter
from dllm_lit.checkpoints import CheckpointError, load_checkpoint
from dllm_lit.module import BlockRefineLM
from dllm_lit.settings import LEGACY_COMPILE


def save_hf(module: BlockRefineLM, output_dir: str | Path) -> Path:
    """Write ``module``'s model and tokenizer to ``output_dir`` (safetensors + tokenizer files), each
    file readable as the umask allows (transformers writes weights through a private temporary file).

    The files are written to ``.<name>.saving`` beside it, which then replaces ``output_dir``: a run
    killed while saving leaves the previous export whole (or, between the two renames, at ``.<name>.old``).
    A symlinked ``output_dir`` keeps its link: the directory it points to is the one replaced."""
    output_dir = Path(output_dir)
    target = output_dir.resolve() if output_dir.is_symlink() else output_dir
    staging, old = (target.with_name(f".{target.name}.{suffix}") for suffix in ("saving", "old"))
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(module.model, PeftModel):  # LoRA never touches the vocabulary: peft need not look for the base
        module.model.save_pretrained(staging, save_embedding_layers=False)
        if draft_gate(module.model) is not None:
            mark_drafter(staging)
    else:
        module.model.save_pretrained(staging)
    module.tokenizer.save_pretrained(staging)
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return output_dir


def export_checkpoint(ckpt_path: str | Path, output_dir: str | Path) -> Path:
    """Load a local Lightning checkpoint of :class:`BlockRefineLM` (weights and plain values only) and
    save it as an HF directory. ``output_dir`` must be a new or empty directory."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"Export target {output_dir} is a file: give a new or empty directory.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise CheckpointError(f"Export target {output_dir} is not empty: give a new or empty directory.")
    checkpoint = load_checkpoint(ckpt_path)  # refuses remote, missing, corrupt and code-carrying files
    # LightningCLI stores how it built the module (`_instantiator`, `_class_path`): not module arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if "compile" in hparams:  # written before `backend` replaced it
        hparams["backend"] = LEGACY_COMPILE.get(hparams.pop("compile"), "eager")
    module = BlockRefineLM(**hparams)
    module.configure_model()
    try:
        module.on_load_checkpoint(checkpoint)  # an adapter-only checkpoint: checked, then loaded non-strictly
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
    except RuntimeError:
        raise CheckpointError(
            f"Checkpoint {ckpt_path} does not match its model {module.hparams.model_name_or_path!r}."
        ) from None
    try:
        return save_hf(module, output_dir)
    except OSError as error:
        raise CheckpointError(f"Cannot write the export to {output_dir}: {error.strerror}.") from None


class HFExport(L.Callback):
    """Save the trained model as a Hugging Face directory when ``fit`` ends (rank 0), and after each
    validation during ``fit``, so a run stopped early still leaves its latest model.

    Args:
        output_dir: Where to write the model and tokenizer. A new run refuses a directory that holds
            files (an earlier run's model); a run resumed with ``--ckpt_path`` refreshes its own.
        overwrite: Let a new run replace what ``output_dir`` holds.
    """

    def __init__(self, output_dir: str, overwrite: bool = False):
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.resumed = False

    def state_dict(self) -> dict[str, str]:
        return {"output_dir": str(self.output_dir)}

    def load_state_dict(self, state_dict: dict[str, str]) -> None:
        """Lightning restores this from ``--ckpt_path`` before ``on_fit_start``: the export is this run's."""
        self.resumed = True

    def check_target(self) -> None:
        """Refuse, before training, to replace another run's export (every rank checks: they all stop)."""
        target = Path(self.output_dir)
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"Export target {target} is a file: give HFExport a directory.")
        if target.is_dir() and any(target.iterdir()) and not (self.resumed or self.overwrite):
            raise CheckpointError(
                f"Export target {target} already holds files (an earlier run's model?): move it, give HFExport "
                "another output_dir, or set its overwrite: true."
            )

    def save(self, trainer: L.Trainer, pl_module: BlockRefineLM) -> None:
        if trainer.is_global_zero:
            save_hf(pl_module, self.output_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: BlockRefineLM) -> None:
        """Check the target, then say what trains and where the model will be (stderr, rank 0)."""
        self.check_target()
        if trainer.is_global_zero:
            weights = list(pl_module.model.parameters())
            trainable, total = sum(p.numel() for p in weights if p.requires_grad), sum(p.numel() for p in weights)
            kind = f"LoRA rank {pl_module.hparams.lora_rank}" if pl_module.hparams.get("lora_rank") else "all weights"
            print(
                f"Training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f} %, {kind}); "
                f"the model is exported to {self.output_dir} after each validation and at the end.",
                file=sys.stderr,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: BlockRefineLM) -> None:
        self.save(trainer, pl_module)
        if trainer.is_global_zero:
            print(f"Exported: dllm_lit predict --model.model_name_or_path {self.output_dir} ...", file=sys.stderr)

    def on_validation_end(self, trainer: L.Trainer, pl_module: BlockRefineLM) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer, pl_module)


def main(argv: list[str] | None = None) -> None:
    """Export, printing the target; a bad checkpoint or target is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m dllm_lit.export", description=__doc__, allow_abbrev=False)
    parser.add_argument("ckpt_path", help="a local .ckpt file written by `dllm_lit fit`")
    parser.add_argument("output_dir", help="a new or empty directory for the HF model")
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.ckpt_path, args.output_dir))
    except ValueError as error:  # CheckpointError, ModelLoadError: one sentence each
        print(f"dllm_lit.export: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
