"""Time and peak memory of ``aftrec prepare`` on a generic log with integer ids, in memory and
with ``--streaming``, for this checkout and (``--before SRC``) another one's ``src`` folder:
what reading ids as text costs.

Run: ``python benchmarks/bench_prepare_ids.py --rows 3000000 --before /tmp/old/src`` (writes
benchmarks/results/prepare_ids.json). The log is drawn once (seeded): ``rows`` clicks of
``rows / 50`` users on 20,000 items in two domains, integer timestamps and ratings 1-5, as one
Parquet file and one CSV file. Each case runs in its own process (peak RSS its own), and the
code versions alternate case by case, so that other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from _common import write

#: the child: prepare, then print seconds and peak RSS (MiB)
CHILD = """
import resource, sys, time
from aftrec.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - t0
print(code, round(seconds, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
"""


def draw(folder: Path, rows: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item": np.arange(20_000), "domain": np.repeat(["A", "B"], 10_000)})
    log = pd.DataFrame({
        "user": rng.integers(0, rows // 50, rows), "item": rng.integers(0, 20_000, rows),
        "timestamp": rng.integers(1_000_000_000, 1_600_000_000, rows),
        "rating": rng.integers(1, 6, rows),
    })  # fmt: skip
    items.to_csv(folder / "items.csv", index=False)
    log.to_parquet(folder / "log.parquet", index=False)
    log.to_csv(folder / "log.csv", index=False)
    return folder / "log.parquet", folder / "log.csv", folder / "items.csv"


def run(src: Path, log: Path, items: Path, out: Path, streaming: bool) -> dict[str, float]:
    argv = ["prepare", "--interactions", str(log), "--items", str(items), "--out", str(out),
            "--force", *(["--streaming"] if streaming else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    code, seconds, mib = proc.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise SystemExit(f"prepare failed ({src}): {proc.stderr.strip()[-500:]}")
    return {"seconds": float(seconds), "peak_rss_mib": float(mib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--before", type=Path, help="another checkout's src folder")
    args = parser.parse_args()
    versions = {"now": Path(__file__).resolve().parents[1] / "src"}
    if args.before is not None:
        versions["before"] = args.before.resolve()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        parquet, csv, items = draw(Path(tmp), args.rows)
        for log in (parquet, csv):
            for streaming in (False, True):
                case = f"{log.suffix[1:]}{' --streaming' if streaming else ''}"
                for version, src in versions.items():
                    got = run(src, log, items, Path(tmp) / "out", streaming)
                    results.setdefault(case, {})[version] = got
                    print(case, version, got, flush=True)
    command = f"python benchmarks/bench_prepare_ids.py --rows {args.rows}" + (
        f" --before {args.before}" if args.before else ""
    )
    print("wrote", write("prepare_ids", {"command": command, "rows": args.rows, "cases": results}))


if __name__ == "__main__":
    main()
