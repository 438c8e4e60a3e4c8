"""Reading Lightning checkpoints without running code from them.

Every checkpoint is a local file loaded with ``torch.load(weights_only=True)``: tensors and plain
values only. Remote addresses are refused (Lightning would unpickle them with ``weights_only=False``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says why."""


def local_checkpoint(path: str | Path) -> Path:
    """``path`` as a local checkpoint file, or a :class:`CheckpointError` saying what is wrong."""
    text = str(path)
    if "://" in text:
        raise CheckpointError(
            f"Checkpoint {text} is remote: dllm_lit reads only local checkpoint files (remote ones could run "
            "code when unpickled). Download it first and pass the local path."
        )
    local = Path(text).expanduser()
    if local.is_dir():
        raise CheckpointError(f"Checkpoint {text} is a directory: give a .ckpt file.")
    if not local.is_file():
        raise CheckpointError(f"Checkpoint {text} does not exist.")
    return local


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True`` on the CPU."""
    local = local_checkpoint(path)
    try:
        checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"Checkpoint {path} is not a PyTorch file of weights and plain values (refused: it is corrupt, or "
            "loading it would run code)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"Checkpoint {path} is not a readable PyTorch checkpoint ({error}).") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"Checkpoint {path} is not a Lightning checkpoint (no state_dict).")
    return checkpoint
