"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename
(:mod:`aftrec.outputs`).

A run killed at any moment leaves either the previous checkpoint or the new one, never a
half-written file; files get the user's umask, and an output that cannot be written raises
:class:`~aftrec.errors.OutputError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aftrec import outputs
from aftrec.errors import CheckpointError


def save(obj: dict[str, Any], path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    with outputs.atomic_file(path) as fh:
        torch.save(obj, fh)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint; a missing, truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: checkpoint is corrupt or unreadable ({type(exc).__name__}: {reason})"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: not an aftrec checkpoint")
    return obj
