"""What subnormal floats cost a trained model's steps: each run's ``last.pt`` stepped as saved,
with and without flushing them to zero (:mod:`aftrec.numerics`).

Run: ``python benchmarks/bench_subnormals.py RUN [RUN ...] --steps 8`` (writes
benchmarks/results/subnormals.json). For each run directory (a trained or half-trained run):
the share of its parameters and optimiser moments that are subnormal (nonzero, below
``torch.finfo(float32).tiny``), then the median of ``--repeat`` alternating timings of
``--steps`` training steps from the saved weights and optimiser state, subnormals kept and
flushed. One torch thread.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import write
from aftrec.data.loader import TrainLoader
from aftrec.numerics import subnormal
from aftrec.training import checkpoint
from aftrec.training.rundir import load_run
from aftrec.training.steps import make_step


def subnormal_share(obj: Any) -> tuple[int, int]:
    """(subnormal, all) floating-point entries of the tensors in a nested state."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return 0, 0
        return int(subnormal(obj).sum()), obj.numel()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    pairs = [subnormal_share(v) for v in items]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def measure(run: Path, steps: int, repeat: int) -> dict[str, Any]:
    torch.set_flush_denormal(False)
    cfg, data, model = load_run(run, "last")
    state = checkpoint.load(run / "last.pt")  # as saved: load_run zeroes subnormal weights
    sub, total = subnormal_share(state["model"])
    sub_opt, total_opt = subnormal_share(state["step"])
    loader = TrainLoader(data.train, data.info, cfg.data.history_len, cfg.train.batch_size,
                         cfg.data.n_negatives)  # fmt: skip
    it = loader.epoch(np.random.default_rng(0))
    batches = [next(it) for _ in range(steps + 1)]
    model.train()
    step = make_step(model, cfg.train)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            model.load_state_dict(state["model"])
            # a copy: the optimiser would update the loaded moments in place (and, flushed,
            # zero their subnormals), so that the next timing started from another state
            step.load_state_dict(copy.deepcopy(state["step"]))
            step(batches[0])  # warm-up
            t = time.perf_counter()
            for b in batches[1:]:
                step(b)
            times[flush].append((time.perf_counter() - t) / steps)
    kept, flushed = (1000 * float(np.median(times[f])) for f in (False, True))
    return {
        "model": cfg.model_name,
        "epoch": state.get("epoch"),
        "weight_decay": cfg.train.weight_decay,
        "subnormal_parameters": sub,
        "parameters": total,
        "subnormal_optimizer_entries": sub_opt,
        "optimizer_entries": total_opt,
        "ms_per_step_kept": round(kept, 1),
        "ms_per_step_flushed": round(flushed, 1),
        "slowdown": round(kept / flushed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--name", default="subnormals")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for run in args.runs:
        results[str(run)] = r = measure(run, args.steps, args.repeat)
        print(
            f"{run!s:55s} {r['model']:15s} epoch {r['epoch']}: "
            f"{r['subnormal_parameters']:,} of {r['parameters']:,} weights subnormal; "
            f"{r['ms_per_step_kept']} ms/step kept, {r['ms_per_step_flushed']} flushed "
            f"({r['slowdown']}x)"
        )
    torch.set_flush_denormal(False)
    command = " ".join(["python benchmarks/bench_subnormals.py", *sys.argv[1:]])
    print("wrote", write(args.name, {"command": command, "threads": 1, "runs": results}))


if __name__ == "__main__":
    main()
