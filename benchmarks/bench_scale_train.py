"""Training throughput and memory per rank on a large prepared log, with 1 and 2 processes.

Run (after ``python benchmarks/bench_scale_prepare.py`` has written runs/scale/data):
``python benchmarks/bench_scale_train.py --data runs/scale/data --models two-tower --batches 300``
(and ``--models aft --batches 40``; results for other (model, ranks) pairs are kept).

Each (model, ranks) pair is one real ``aftrec train`` run (``torchrun --standalone`` for more
than one rank) of ``--batches`` global batches of 256, one intra-op thread per rank, so 1 vs 2
processes compares one core with two; sparse item tables with lazy Adam; validation on a
small fixed user sample (``train.valid_users``). Throughput is the trainer's own examples/s
over the epoch (global examples, all ranks); memory is each rank's peak RSS as the trainer
logs it; the wall time includes start-up (reading the shards, building history indices).
Writes benchmarks/results/scale_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import write


def run_one(data: Path, model: str, ranks: int, batches: int, root: Path) -> dict:
    out = root / f"{model}-r{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [
        "train.epochs=1",
        f"train.max_batches_per_epoch={batches}",
        "train.threads=1",
        "train.valid_users=100",
        "train.eval_batch_size=64",
        "train.sparse_embeddings=true",  # lazy Adam: dense Adam over 1.5M rows costs ~7 s/step
    ]
    args = ["train", "--data", str(data), "--model", model, "--out", str(out), "--quiet",
            "--set", *sets]  # fmt: skip
    launcher = [sys.executable, "-m", "aftrec.cli"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={ranks}", "-m", "aftrec.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{model} on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    entry = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    result = {
        "model": model,
        "ranks": ranks,
        "global_batches": batches,
        "examples_per_second": round(entry["examples_per_second"], 1),
        "peak_rss_mib_per_rank": entry["peak_rss_mib"],
        "wall_seconds_with_startup": round(wall, 1),
        "command": " ".join([*launcher, *args]),
    }
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("runs/scale/data"))
    parser.add_argument("--models", nargs="+", default=["two-tower", "aft"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--root", type=Path, default=Path("runs/scale/train"))
    args = parser.parse_args()
    meta = json.loads((args.data / "meta.json").read_text())
    from _common import RESULTS

    previous = RESULTS / "scale_train.json"
    kept = json.loads(previous.read_text())["results"] if previous.exists() else []
    results = [
        run_one(args.data, m, r, args.batches, args.root) for m in args.models for r in args.ranks
    ]
    done = {(x["model"], x["ranks"]) for x in results}
    results = [x for x in kept if (x["model"], x["ranks"]) not in done] + results
    write(
        "scale_train",
        {
            "command": "python " + " ".join(sys.argv),  # the last invocation; see each result
            "data": {
                "path": str(args.data),
                "n_users": meta["n_users"],
                "n_items": meta["n_items"],
                "train_examples": sum(meta["counts"]["train"].values()),
                "partitions": len(meta.get("partitions") or [None]),
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
