"""Export trained weights as a Hugging Face directory that `dllm_lit predict` (or transformers) loads.

python -m dllm_lit.export path/to/last.ckpt path/to/hf_dir
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

from dllm_lit.module import BlockRefineLM


def save_hf(module: BlockRefineLM, output_dir: str | Path) -> Path:
    """Write ``module``'s model and tokenizer to ``output_dir`` (safetensors + tokenizer files)."""
    output_dir = Path(output_dir)
    module.model.save_pretrained(output_dir)
    module.tokenizer.save_pretrained(output_dir)
    return output_dir


def export_checkpoint(ckpt_path: str | Path, output_dir: str | Path) -> Path:
    """Load a Lightning checkpoint of :class:`BlockRefineLM` and save it as an HF directory."""
    module = BlockRefineLM.load_from_checkpoint(ckpt_path, map_location="cpu")
    return save_hf(module, output_dir)


class HFExport(L.Callback):
    """Save the trained model as a Hugging Face directory when ``fit`` ends (rank 0).

    Args:
        output_dir: Where to write the model and tokenizer.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: BlockRefineLM) -> None:
        if trainer.is_global_zero:
            save_hf(pl_module, self.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dllm_lit.export", description=__doc__)
    parser.add_argument("ckpt_path")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.ckpt_path, args.output_dir))


if __name__ == "__main__":
    main()
