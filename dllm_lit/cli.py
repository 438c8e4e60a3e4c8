"""``dllm_lit``: the LightningCLI over :class:`BlockRefineLM` and :class:`DataModule`."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict
from importlib import import_module
from pathlib import Path

# Lightning's own calls into jsonargparse trip its deprecation notices; they are not the user's.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from dllm_lit.checkpoints import load_checkpoint
from dllm_lit.data import DataModule
from dllm_lit.export import HFExport
from dllm_lit.models import DEFAULT_MODEL, read_chat_template, resolve
from dllm_lit.module import BlockRefineLM
from dllm_lit.outputs import model_identity, run_fingerprint
from dllm_lit.progress import progress_bar
from dllm_lit.sampling import SAMPLING_SCHEME
from dllm_lit.summary import PredictionSummary
from dllm_lit.writer import PredictionWriter

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)

# Errors of the user's making that deserve one line, not a traceback.
APPS = {
    "serve": "dllm_lit.server",
    "chat": "dllm_lit.chat",
    "evaluate": "dllm_lit.evaluate",
    "distill": "dllm_lit.distill",
    "batch": "dllm_lit.batch",
}
"""Subcommands outside LightningCLI (no Trainer): the module whose ``main(args)`` runs them."""
CHECKPOINT_STRUCTURE = {"model_name_or_path": DEFAULT_MODEL, "lora_rank": 0, "lora_alpha": None}
"""What a checkpoint's weights need (with the defaults a checkpoint may fill in), unlike decoding settings."""
LIMIT_BATCHES = [f"trainer.limit_{stage}_batches" for stage in ("train", "val", "test", "predict")]
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, MisconfigurationException)


class SaveFitConfig(SaveConfigCallback):
    """Save the resolved ``fit`` config in the run's log folder (a new ``version_N``), or without a
    logger in its checkpoint folder; never in the working directory, never over an existing file."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.already_saved:
            return
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)
            return
        checkpoints = trainer.checkpoint_callback
        if checkpoints is None:
            return
        folder = Path(checkpoints.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        if trainer.is_global_zero and not (folder / self.config_filename).exists():
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, multifile=False)
        self.already_saved = True


class DllmCLI(LightningCLI):
    """LightningCLI over BlockRefineLM + DataModule, with the prediction writer and summary."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        self.command_line = list(sys.argv[1:] if args is None else args)
        super().__init__(
            BlockRefineLM,
            DataModule,
            seed_everything_default=1234,
            save_config_callback=SaveFitConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"enable_model_summary": False},
            # Parse errors raise instead of printing the whole usage: main() turns them into one line.
            parser_kwargs={
                "description": "Block-parallel EOS-block + refine decoding on Lightning. Also: "
                "'dllm_lit serve' (an OpenAI-compatible server), 'dllm_lit chat' (a terminal chat), "
                "'dllm_lit evaluate' (lm-eval tasks), 'dllm_lit distill' (training rows from a "
                "model's own answers) and 'dllm_lit batch' (OpenAI batch files); each takes --help.",
                "exit_on_error": False,
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "writer")
        parser.add_lightning_class_args(PredictionSummary, "summary")
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.max_length", "data.max_length")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        prefer_int_batch_limits(parser)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path`` supplies weights, and the model they fit (base model, LoRA rank and alpha)
        where those flags are left at their defaults. Decoding settings always come from the config
        and the command line (Lightning's own version lets the checkpoint's hyperparameters override
        flags the user gave). Only local files are read, with ``weights_only=True``
        (:mod:`dllm_lit.checkpoints`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        hparams = load_checkpoint(ckpt_path).get("hyper_parameters", {})
        if "weights_only" in self.config[subcommand]:
            self.config[subcommand]["weights_only"] = True
        model = self.config[subcommand]["model"]
        for name, default in CHECKPOINT_STRUCTURE.items():
            if name in hparams and model[name] == default:
                model[name] = hparams[name]
        self.config[subcommand]["data"]["model_name_or_path"] = model["model_name_or_path"]

    def before_instantiate_classes(self) -> None:
        """Prediction logs nothing by default (fit/validate/test keep Lightning's default logger). A
        prompt source named on the command line replaces a config file's other one (``--config
        configs/demo.yaml --data.prompts_file my.txt``), as a flag overrides the config's value."""
        if self.subcommand == "predict" and self.config.predict.trainer.logger in (None, True):
            self.config.predict.trainer.logger = False
        sources = ("prompt", "prompts", "prompts_file")
        named = {s for s in sources for arg in self.command_line if re.match(rf"--data\.{s}\+?(=|$)", str(arg))}
        if named:
            for source in set(sources) - named:
                self.config[self.subcommand]["data"][source] = None

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes the newest checkpoint of earlier runs. A new run (no
        ``--ckpt_path``) checks its export target before any model loads or log folder is made
        (``HFExport`` checks again at fit start, for runs outside the CLI)."""
        if self.config.fit.get("ckpt_path") == "last":
            self._resume_newest_checkpoint()
        if not self.config.fit.get("ckpt_path"):
            for export in self.trainer.callbacks:
                if isinstance(export, HFExport):
                    export.check_target()

    def _resume_newest_checkpoint(self) -> None:
        """Lightning's ``last`` looks in this run's own new version folder, empty under the default
        checkpointing: take the newest ``.ckpt`` of the logger's earlier runs (every version) or of a
        ``ModelCheckpoint`` with its own ``dirpath``, as LitGPT's ``--resume auto`` does."""
        trainer = self.trainer
        root = getattr(trainer.logger, "root_dir", None) or Path(trainer.default_root_dir) / "checkpoints"
        folders = [Path(root), *(Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath)]
        found = [path for folder in folders if folder.is_dir() for path in folder.rglob("*.ckpt")]
        if not found:
            return  # Lightning warns that there is no checkpoint and starts afresh
        newest = max(found, key=lambda path: path.stat().st_mtime)
        if trainer.is_global_zero:
            print(f"Resuming from {newest}, the newest checkpoint under {folders[0]}.", file=sys.stderr, flush=True)
        self.config_init.fit.ckpt_path = self.config.fit.ckpt_path = str(newest)
        if "weights_only" in self.config_init.fit:  # tensors and plain values only, as any --ckpt_path
            self.config_init.fit.weights_only = True

    def before_predict(self) -> None:
        """Check the prompt source and the output before any model loads; set up ``resume``; let
        SIGTERM stop the run as Ctrl-C does (finished rows kept, resume hint, non-zero exit)."""
        self.datamodule.check_prompt_source()
        for writer in self.trainer.callbacks:
            if isinstance(writer, PredictionWriter):
                writer.check()
                self.datamodule.skip_indices = writer.completed_indices(self._fingerprint())
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)

    def _fingerprint(self) -> dict:
        """What resume compares: the prompts, the settings that change outputs, the model's identity."""
        data, model, subcommand = self.datamodule, self.model, self.config[self.subcommand]
        name = model.hparams.model_name_or_path
        return run_fingerprint(
            data.prompt_rows(),
            data={
                "use_chat_template": data.use_chat_template,
                "max_length": data.max_length,
                "skip_long_prompts": data.skip_long_prompts,
                "chat_template": template_digest(data.chat_template),
                "chat_template_kwargs": data.chat_template_kwargs,
            },
            decoding={
                **asdict(model.decoding),
                "precision": str(self.trainer.precision),
                "seed_everything": subcommand.get("seed_everything"),
                **({"sampling": SAMPLING_SCHEME} if model.decoding.temperature > 0 else {}),
            },
            model={**model_identity(name, resolve(name)), "ckpt_path": subcommand.get("ckpt_path")},
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's trainer, with its default progress bar on stderr (stdout is for results): rich on a
        terminal, plain lines in a log file."""
        trainer = super().instantiate_trainer(**kwargs)
        for position, callback in enumerate(trainer.callbacks):
            if type(callback) is RichProgressBar and not callback._console_kwargs:
                trainer.callbacks[position] = progress_bar()
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["predict"] = commands["predict"] | {"return_predictions"}
        return commands

    def predict(self, **kwargs) -> None:
        """Predictions go to the writer, batch by batch; none are kept in memory."""
        self.trainer.predict(**{**kwargs, "weights_only": True}, return_predictions=False)


def prefer_int_batch_limits(parser) -> None:
    """``--trainer.limit_val_batches 1`` means one batch. Lightning types the limits
    ``Union[float, int, None]``, so the parser tried float first and read ``1`` as 1.0: every batch.
    Integers are tried first now; ``1.0`` and ``0.25`` still mean fractions."""
    for action in parser._actions:
        if action.dest in LIMIT_BATCHES:
            action._typehint = int | float | None


def _interrupt_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


def template_digest(given: str | None) -> str | None:
    """A short digest of a ``--data.chat_template``'s text (a file's content, not its name)."""
    return None if given is None else hashlib.sha256(read_chat_template(given).encode()).hexdigest()[:16]


def quiet_libraries() -> None:
    """Keep stderr for our diagnostics: hide transformers' load bars and Lightning's tips."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


def main(args: list[str] | None = None) -> None:
    """Run ``dllm_lit {fit,validate,test,predict,serve,chat}``.

    A user error prints one line and exits 2; set ``DLLM_LIT_DEBUG=1`` for the traceback. Ctrl-C
    exits 130 without one.
    """
    quiet_libraries()
    command = sys.argv[1:] if args is None else list(args)
    try:
        if command and command[0] in APPS:
            import_module(APPS[command[0]]).main(command[1:])
        else:
            DllmCLI(args=args)
    except KeyboardInterrupt:  # chat, serve, evaluate, distill; predict and fit: Lightning's own handling
        print("\ndllm_lit: interrupted", file=sys.stderr)
        sys.exit(130)
    except ArgumentError as error:
        message = " ".join(str(error).split())
        print(f"dllm_lit: error: {message} (see dllm_lit --help, or dllm_lit SUBCOMMAND --help)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as error:
        fail(error)
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        fail(f"No space left on the device while writing {error.filename or 'the output'}: free some space.")
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group of a multi-process run before the interpreter exits: Lightning does
    it at exit for NCCL only, and a Gloo (CPU) group left alive now and then aborts the finished
    process ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fail(error: BaseException | str) -> None:
    """Print ``dllm_lit: error: <one line>`` and exit 2 (re-raise instead under ``DLLM_LIT_DEBUG``)."""
    if os.environ.get("DLLM_LIT_DEBUG") and isinstance(error, BaseException):
        raise error
    print(f"dllm_lit: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
