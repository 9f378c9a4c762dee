"""Helpers shared by the benchmark scripts: machine description and peak memory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aftrec.environment import cpu_name, load_average, versions
from aftrec.training.distributed import peak_rss_mib  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What a result was measured on (:mod:`aftrec.environment`, the library's one capture)."""
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **versions("python", "numpy", "torch"),
        # other processes compete for the 2 cores: the 1-minute load when the result was written
        "load_average_1min": load_average(),
    }


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
