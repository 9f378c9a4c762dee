"""Time :func:`aftrec.data.sources.synthetic.generate` at 10M interactions; report peak RSS.

Run: ``python benchmarks/bench_synthetic.py [--users N --domains D --items M --interactions N]``.
Prints the configuration, the machine, wall-clock seconds (catalogue, sampling and the
DataFrame included) and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np
import pandas as pd

from aftrec.data.sources.synthetic import SyntheticConfig, generate


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--items", type=int, default=20_000, help="items per domain")
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SyntheticConfig(
        n_users=args.users,
        n_domains=args.domains,
        items_per_domain=args.items,
        n_interactions=args.interactions,
        seed=args.seed,
    )
    print(f"config: {cfg}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}"
    )
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    log = generate(cfg)
    seconds = time.perf_counter() - start
    n = len(log.interactions)
    frame_mib = log.interactions.memory_usage(deep=True).sum() / 2**20
    print(f"interactions: {n} ({n / cfg.n_interactions:.2%} of requested)")
    print(f"seconds: {seconds:.2f} ({n / seconds / 1e6:.2f}M interactions/s)")
    print(f"interactions frame: {frame_mib:.0f} MiB")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB (after imports: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
