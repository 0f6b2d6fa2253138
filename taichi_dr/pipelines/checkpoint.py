"""Checkpoints of the training engine: versioned, written atomically, loaded with ``weights_only=True``.

A checkpoint is one ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts, None)::

    {"format": "taichi-dr-checkpoint", "format_version": 1, "method": str, "method_version": int,
     "iteration": int, "method_state": dict, "optimizer": dict | None,
     "rng": {"torch": ByteTensor, "generator": ByteTensor, "cuda": list[ByteTensor] | None},
     "config": dict (as config.json), "nonfinite": {"consecutive": int, "total": int},
     "elapsed_s": float, "history": list[dict]}

Why plain types only: ``torch.load(weights_only=True)`` refuses arbitrary Python objects, so opening a
checkpoint someone sent you cannot run code, and a checkpoint does not break when a class is renamed.

Why atomic: the file is written to a temporary name in the same folder, fsynced, then ``os.replace``d over
the old one. A kill (or a full disk, or a second Ctrl-C) during the write leaves the previous checkpoint
whole; the rename within one folder is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "taichi-dr-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

__all__ = ["CHECKPOINT_NAME", "FORMAT", "FORMAT_VERSION", "CheckpointError", "load_checkpoint",
           "save_checkpoint", "write_atomic"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and what is wrong."""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort, since some file systems refuse a dir fd."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, write) -> Path:
    """Write ``path`` through ``write(file)`` (a binary file object) atomically and durably.

    The temporary file lives in the same folder (a rename across file systems is not atomic) and carries the
    process id, so two processes writing the same folder do not clobber each other's temporary file. On any
    failure, KeyboardInterrupt included, the temporary file is removed and the old ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path, payload: dict) -> Path:
    """Write ``payload`` (a checkpoint dict as in the module docstring) to ``path`` atomically; returns it."""
    return write_atomic(path, lambda f: torch.save(payload, f))


def _weights_only_reason(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_checkpoint(path, method=None, map_location: Any = "cpu") -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    method: a :class:`~taichi_dr.pipelines.engine.Method` (instance or class) the checkpoint must belong to
        (same ``name`` and ``version``); None checks only that it is a taichi-dr checkpoint.
    map_location: passed to ``torch.load``; "cpu" by default, since the method's ``load_state_dict`` and the
        optimiser copy tensors to their parameters' device anyway and RNG states must be CPU tensors.

    Raises CheckpointError (one line naming the file) when the file is missing, unreadable, not a taichi-dr
    checkpoint (including one holding arbitrary Python objects, refused by ``weights_only=True``), of a newer
    format, or of another method or method version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (file not found)")
    # torch.save writes a zip archive; anything else (random bytes, a text file, torch's pre-1.6 format,
    # which we never write) would otherwise reach the legacy unpickler and fail with a misleading message.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: unreadable checkpoint (not a torch zip archive)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global it does not know; torch's message is many lines: keep the class.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"{path}: not a taichi-dr checkpoint (holds a Python object, {found.group(1)}, "
                                  f"that weights_only loading refuses)") from None
        raise CheckpointError(f"{path}: unreadable checkpoint (weights_only unpickling failed: "
                              f"{_weights_only_reason(error)[:160]})") from None
    except Exception as error:  # a truncated zip, a directory entry...: torch raises various types
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: "
                              f"{_first_line(error)[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a taichi-dr checkpoint (no 'format': '{FORMAT}' entry)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this taichi-dr reads versions "
                              f"up to {FORMAT_VERSION}")
    if method is not None:
        if payload.get("method") != method.name:
            raise CheckpointError(f"{path}: a checkpoint of method {payload.get('method')!r}, not "
                                  f"{method.name!r}")
        if payload.get("method_version") != method.version:
            raise CheckpointError(f"{path}: method {method.name!r} state version {payload.get('method_version')!r}"
                                  f", this code reads version {method.version}")
    return payload
