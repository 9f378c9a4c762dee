"""Training throughput (examples/s) of models on a prepared dataset, interleaved.

Run: ``python benchmarks/bench_train.py --data data/ml-1m --models two-tower aft aft-d aft-hnm``
(writes benchmarks/results/train.json). Steps of the models alternate in chunks, so that any
other load on the machine hits all of them alike; the median chunk gives ms per step. Batches
are built once beforehand (batch building is measured separately). A model name may carry
overrides: ``aft:model.dropout=0.0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import write
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.registry import create_model
from aftrec.training.steps import make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--models", nargs="+", default=["two-tower", "aft"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="train", help="results/NAME.json (default: train)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as aftrec.train steps (aftrec.numerics)
    data = Dataset(args.data)
    base_cfg = resolve("two-tower")
    loader = TrainLoader(data.train, data.info, base_cfg.data.history_len,
                         base_cfg.train.batch_size, base_cfg.data.n_negatives)  # fmt: skip
    it = loader.epoch(np.random.default_rng(0))
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(args.steps + 5)]
    build_ms = 1000 * (time.perf_counter() - t0) / len(batches)
    steps = {}
    for name in args.models:
        torch.manual_seed(0)
        base, *over = name.split(":")
        cfg = resolve(base, overrides=over)
        model = create_model(base, cfg.model, data.info, cfg.data.history_len)
        model.prepare_training(data.train)
        steps[name] = make_step(model, cfg.train)
        for b in batches[:5]:
            steps[name](b)
    times: dict[str, list[float]] = {n: [] for n in args.models}
    for start in range(5, args.steps + 5, args.chunk):
        for name in args.models:
            chunk = batches[start : start + args.chunk]
            t = time.perf_counter()
            for b in chunk:
                steps[name](b)
            times[name].append((time.perf_counter() - t) / len(chunk))
    bs = base_cfg.train.batch_size
    results = {}
    for name in args.models:
        ms = 1000 * float(np.median(times[name]))
        results[name] = {"ms_per_step": round(ms, 1), "examples_per_second": round(bs / ms * 1000)}
        print(f"{name:30s} {ms:8.1f} ms/step {bs / ms * 1000:9.0f} examples/s")
    ref = args.models[0]
    for name in args.models[1:]:
        ratio = results[ref]["examples_per_second"] / results[name]["examples_per_second"]
        results[name][f"slower_than_{ref}"] = round(ratio, 2)
    print(f"batch building: {build_ms:.1f} ms/batch")
    payload = {
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "batch_size": bs,
        "batch_build_ms": round(build_ms, 2),
        "models": results,
    }
    print("wrote", write(args.name, payload))


if __name__ == "__main__":
    main()
