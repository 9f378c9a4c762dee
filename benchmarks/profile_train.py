"""Where a training step goes, and how far it is from what the core can do.

Run: ``python benchmarks/profile_train.py --data data/ml-1m --models aft aft-d sasrec --tag after``
(writes benchmarks/results/profile_TAG.json and .md). For each model, on one thread and one
fixed ML-1M batch of 256 (history 50 per domain, 8 negatives):

* **work**: the floating-point operations of one training step (forward and backward), counted
  by torch's profiler (``with_flops``) over the matrix products and convolutions, which is
  where the arithmetic is; per example = per step / 256. Elementwise work (activations, norms,
  dropout, the few-token attention's broadcast products) is not counted;
* **core speed**: every distinct matrix product of the step (same op, same shapes) timed on its
  own on random inputs, many times: its total FLOPs over its total time is this core's GFLOP/s
  on exactly the shapes the model uses;
* **ceiling**: core speed / work per example, the examples/s a step would reach if it did
  nothing but its matrix products at that speed; **measured** is the step's own examples/s
  (median of chunks, after warm-up) and the **ratio** ceiling / measured;
* **profile**: the top operators by self CPU time over ``--steps`` profiled steps.

Point ``PYTHONPATH`` at another checkout's ``src`` to profile that code with the same script
(how the "before" table was made).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from _common import RESULTS, write
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.registry import create_model
from aftrec.training.steps import make_step

REPLAYABLE = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def replay_seconds(name: str, shapes: list[list[int]], repeat: int) -> float:
    """Seconds per call of the matrix product ``name`` on random inputs of ``shapes``."""
    op = getattr(torch.ops.aten, name.split("::")[1])
    args = [torch.randn(*s) for s in shapes if s]
    for _ in range(3):
        op(*args)
    t = time.perf_counter()
    for _ in range(repeat):
        op(*args)
    return (time.perf_counter() - t) / repeat


def profile_model(name: str, data: Dataset, batches: list[Any], steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base, *over = name.split(":")
    cfg = resolve(base, overrides=over)
    model = create_model(base, cfg.model, data.info, cfg.data.history_len)
    model.prepare_training(data.train, data.valid)
    step = make_step(model, cfg.train)
    for b in batches[:3]:
        step(b)
    times = []
    for start in range(3, len(batches) - 4, 4):
        t = time.perf_counter()
        for b in batches[start : start + 4]:
            step(b)
        times.append((time.perf_counter() - t) / 4)
    bs = len(batches[0])
    measured = bs / float(np.median(times))

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for b in batches[:steps]:
            step(b)
    events = prof.key_averages(group_by_input_shape=True)
    flops: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0.0, 0, None])
    for e in events:
        if e.flops:
            key = (e.key, str(e.input_shapes))
            flops[key][0] += e.flops / steps
            flops[key][1] += e.count / steps
            flops[key][2] = e.input_shapes
    step_flops = sum(v[0] for v in flops.values())
    timed_flops = timed_seconds = 0.0
    for (op, _), (f, calls, shapes) in flops.items():
        if op in REPLAYABLE:
            per_call = f / calls
            repeat = max(3, min(200, int(2e9 / max(per_call, 1.0))))
            timed_seconds += replay_seconds(op, shapes, repeat) * calls
            timed_flops += f
    gflops = timed_flops / timed_seconds / 1e9 if timed_seconds else float("nan")
    per_example = step_flops / bs
    ceiling = gflops * 1e9 / per_example
    total = sum(e.self_cpu_time_total for e in events)
    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        by_op[e.key] += e.self_cpu_time_total
        calls[e.key] += e.count
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {
        "examples_per_second": round(measured),
        "mflop_per_example": round(per_example / 1e6, 2),
        "core_gflops_same_shapes": round(gflops, 1),
        "ceiling_examples_per_second": round(ceiling),
        "ceiling_over_measured": round(ceiling / measured, 2),
        "top_ops": [
            {
                "op": op,
                "ms_per_step": round(us / 1000 / steps, 2),
                "share": round(us / total, 3),
                "calls_per_step": round(calls[op] / steps, 1),
            }
            for op, us in top
        ],
    }


def markdown(tag: str, command: str, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Training-step profile ({tag})", "", f"`{command}`", ""]
    lines += [
        "| model | examples/s | MFLOP / example | core GFLOP/s (same shapes) | ceiling ex/s | "
        "ceiling / measured |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['examples_per_second']:,} | {r['mflop_per_example']} | "
            f"{r['core_gflops_same_shapes']} | {r['ceiling_examples_per_second']:,} | "
            f"{r['ceiling_over_measured']} |"
        )
    for name, r in results.items():
        lines += ["", f"## {name}: top operators by self CPU time", ""]
        lines += ["| operator | ms / step | share | calls / step |", "|---|---|---|---|"]
        for t in r["top_ops"]:
            lines.append(
                f"| `{t['op']}` | {t['ms_per_step']} | {100 * t['share']:.1f}% | "
                f"{t['calls_per_step']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--models", nargs="+", default=["aft", "aft-d", "sasrec"])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per model")
    parser.add_argument("--timed", type=int, default=24, help="timed steps per model")
    parser.add_argument("--tag", default="after")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as aftrec.train steps (aftrec.numerics)
    data = Dataset(args.data)
    cfg = resolve("two-tower")
    loader = TrainLoader(data.train, data.info, cfg.data.history_len, cfg.train.batch_size,
                         cfg.data.n_negatives)  # fmt: skip
    it = loader.epoch(np.random.default_rng(0))
    batches = [next(it) for _ in range(max(args.steps, args.timed + 3))]
    results = {}
    for name in args.models:
        results[name] = r = profile_model(name, data, batches, args.steps)
        print(
            f"{name:12s} {r['examples_per_second']:7,} ex/s  {r['mflop_per_example']:7.2f} "
            f"MFLOP/ex  core {r['core_gflops_same_shapes']:6.1f} GFLOP/s  ceiling "
            f"{r['ceiling_examples_per_second']:7,} ex/s  ratio {r['ceiling_over_measured']}"
        )
    command = "python benchmarks/profile_train.py " + " ".join(sys.argv[1:])
    write(f"profile_{args.tag}", {"command": command, "threads": 1, "models": results})
    path = RESULTS / f"profile_{args.tag}.md"
    path.write_text(markdown(args.tag, command, results))
    print("wrote", path)


if __name__ == "__main__":
    main()
