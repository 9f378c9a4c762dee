"""Moved: ``aftrec reproduce`` is :mod:`aftrec.experiments` and a run's ``log.jsonl`` is read
by :func:`aftrec.training.rundir.epoch_log`.

Only that name is still answered here, for ``benchmarks/plot_health.py``; remove this module
once the script imports it from :mod:`aftrec.training.rundir`. The lookup is by name, at
first use, so that ``evaluation`` keeps out of the layers above it.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "epoch_log":
        return importlib.import_module("aftrec.training.rundir").epoch_log
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
