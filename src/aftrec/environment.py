"""The one capture of the machine and the library versions, for every output that records
what produced it: a run's ``run.json``, a bundle's manifest, the ``aftrec reproduce`` report
and the benchmarks' results."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

from aftrec import __version__


def _module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return "not installed"
    return str(getattr(module, "__version__", "unknown"))


def versions(*names: str) -> dict[str, str]:
    """``{name: version}`` in the order asked: ``aftrec``, ``python``, or an importable module
    (``torch``, ``numpy``, ``faiss``, ...; "not installed" when it is not)."""
    special = {"aftrec": lambda: __version__, "python": platform.python_version}
    return {n: special[n]() if n in special else _module_version(n) for n in names}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The CPU and its cores in a few words, as a report names where a run trained."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """Hardware and versions."""
    import torch

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = float("nan")
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": round(memory, 1),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "os": platform.platform(),
        "load_average_1min": load_average(),
        "versions": versions("aftrec", "python", "torch", "numpy", "pandas", "scipy", "matplotlib"),
    }
