"""What guards an output file: the checks before a run, the lock during it, the fingerprint of a run.

* :func:`check_writable` and :func:`check_replaceable` refuse, before any model loads, a path that
  cannot be written, an existing file that would be replaced without ``--writer.overwrite``, and
  unfinished rows that would be lost.
* :class:`OutputLock` is an exclusive OS lock (``flock``) on ``.<output>.lock``: one run per output
  file; the OS releases it when the process dies.
* :func:`run_fingerprint` names what makes two runs' rows interchangeable (the prompts, the decoding
  settings, the model); :func:`fingerprint_difference` says in words what differs, so that resume
  never mixes rows of different runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dllm_lit.settings import DEFAULTS


class OutputError(ValueError):
    """The output file cannot be written or resumed; the message says why."""


def parts_dir(output_file: Path) -> Path:
    """Where ranks write their part files while a run is unfinished."""
    return output_file.with_name(f".{output_file.name}.parts")


def check_writable(path: Path) -> None:
    """Fail before any compute if ``path``'s directory cannot be created or written."""
    if path.is_dir():
        raise OutputError(f"Output file {path} is a directory: give a file name ending in .jsonl or .json.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.resolve().parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise OutputError(f"Cannot write the output file {path}: {error.strerror} ({error.filename}).") from None


def check_replaceable(path: Path, *, resume: bool, overwrite: bool, flags: str = "--writer.") -> None:
    """Fail if this run would replace a finished file or drop unfinished rows the user did not give up
    (``flags``: the prefix of the ``resume`` and ``overwrite`` flags the messages name)."""
    unfinished = parts_dir(path).is_dir()
    if resume and not unfinished and path.is_file():
        raise OutputError(
            f"Nothing to resume: {path} is complete (no unfinished run in {parts_dir(path).name}); "
            f"pass {flags}overwrite true to decode it again."
        )
    if not resume and not overwrite and (path.is_file() or unfinished):
        what = "exists" if path.is_file() else f"has unfinished rows from an interrupted run in {parts_dir(path).name}"
        raise OutputError(
            f"Output file {path} {what}: pass {flags}resume true to finish that run, or "
            f"{flags}overwrite true to replace it when this run finishes."
        )


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.<output>.lock`` holding the owner's PID."""

    def __init__(self, output_file: Path, flag: str = "--writer.output_file"):
        self.path = output_file.with_name(f".{output_file.name}.lock")
        self.handle, self.flag = None, flag

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputError` naming the process that holds it."""
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(
                f"Output file {self.path.name[1:-5]} is being written by another dllm_lit run (PID {owner}): "
                f"wait for it to finish, or choose another {self.flag}."
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle

    def probe(self) -> None:
        """Raise as :meth:`acquire` would if another run holds the lock; hold nothing afterwards."""
        self.acquire()
        self.release()

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing the file drops the lock
            self.handle = None


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")).hexdigest()


def model_identity(model_name_or_path: str, resolved: Path) -> dict[str, Any]:
    """The model's name, its local directory and a digest of its config and weight files (size, mtime)."""
    files = sorted(p for p in resolved.iterdir() if p.is_file()) if resolved.is_dir() else []
    stamps = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return {"name": model_name_or_path, "path": str(resolved.resolve()), "files": _sha256(stamps)[:16]}


def run_fingerprint(
    rows: list[dict[str, Any]], *, data: dict[str, Any], decoding: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    """What makes rows of two runs interchangeable: per-row prompt hashes, the settings, the model."""
    fingerprint = {
        "prompt_hashes": [_sha256(row)[:16] for row in rows],
        "data": data,
        "decoding": decoding,
        "model": model,
    }
    return _jsonable(fingerprint)


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from disk (tuples -> lists, int keys -> strings)."""
    return json.loads(json.dumps(value, default=str))


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``None`` when the fingerprints match, else what differs, in a few words."""
    before, now = old.get("prompt_hashes", []), new["prompt_hashes"]
    if len(before) != len(now):
        return f"different prompts ({len(before)} then, {len(now)} now)"
    changed = [i for i, (a, b) in enumerate(zip(before, now)) if a != b]
    if changed:
        return f"different prompts (row {changed[0]}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''})"
    for group in ("data", "decoding", "model"):
        earlier = old.get(group, {})
        if group == "decoding":  # settings added since the earlier run, at their defaults, change nothing
            earlier = {**_jsonable(asdict(DEFAULTS)), **earlier}
        now = new[group]
        keys = sorted(set(earlier) | set(now))
        diffs = [f"{k} {earlier.get(k)!r} -> {now.get(k)!r}" for k in keys if earlier.get(k) != now.get(k)]
        if diffs:
            return (
                f"different {group} settings ({', '.join(diffs)})"
                if group != "model"
                else f"a different model ({', '.join(diffs)})"
            )
    return None
