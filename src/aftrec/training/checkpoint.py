"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename
(:mod:`aftrec.outputs`).

A run killed at any moment leaves either the previous checkpoint or the new one, never a
half-written file; files get the user's umask, and an output that cannot be written raises
:class:`~aftrec.errors.OutputError`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from aftrec import outputs
from aftrec.errors import CheckpointError


class _Writes:
    """The file handed to ``torch.save``, remembering the ``OSError`` of a write: torch's
    writer turns it into a ``RuntimeError`` ("unexpected pos ...") that names no reason. The
    bytes go straight to the file (no copy of the checkpoint in memory)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def save(obj: dict[str, Any], path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically; a write that fails (a full disk) raises
    :class:`~aftrec.errors.OutputError` naming ``path``."""
    with outputs.atomic_file(path) as fh:
        writes = _Writes(fh)
        try:
            torch.save(obj, cast(BinaryIO, writes))  # torch calls its write and flush only
        except RuntimeError as exc:
            if writes.error is None:
                raise
            raise writes.error from exc  # atomic_file says it in one line


#: the type a weights-only load refused, as torch's message names it
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.<>]+)")


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint; a missing, truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises an unsafe load: not given
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: not a checkpoint aftrec wrote: it holds a {refused[1]}, and aftrec "
                "saves tensors and plain values only; not loaded (its code would run)"
            ) from exc
        raise CheckpointError(
            f"{path}: checkpoint is corrupt or unreadable (not one aftrec wrote: damaged, or "
            "another program's file)"
        ) from exc
    except Exception as exc:  # torch raises many types for a damaged file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: checkpoint is corrupt or unreadable ({type(exc).__name__}: {reason})"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: not an aftrec checkpoint")
    return obj
