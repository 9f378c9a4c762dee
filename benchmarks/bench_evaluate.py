"""Full-ranking evaluation time on ML-1M: every test user, every domain, N up to 200.

Run: ``python benchmarks/bench_evaluate.py --run runs/demo/ml-1m/runs/two-tower/seed0``
(writes benchmarks/results/evaluate.json). The run must exist (``make demo DEMO_DATASET=ml-1m``
makes one); evaluation is timed three times after one warm-up, with torch's default thread
count unless ``--threads`` says otherwise. ``--set model.KEY=VALUE ...`` evaluates the run's
weights under a changed model config (a scoring block's size, ``model.chunk_floats``), and
``--name`` picks the output file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import peak_rss_mib, write
from aftrec.evaluation.evaluate import Evaluator
from aftrec.registry import create_model
from aftrec.training.rundir import load_run, load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo/ml-1m/runs/two-tower/seed0"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="evaluate", help="results/NAME.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, data, model = load_run(args.run)
    if args.set:  # the same weights in a model built from the changed config
        cfg = load_run_config(args.run, args.set)
        changed = create_model(cfg.model_name, cfg.model, data.info, cfg.data.history_len)
        changed.load_state_dict(model.state_dict())
        model = changed.eval()
    evaluator = Evaluator(data, cfg.data.history_len, cfg.runtime.eval_batch_size)
    t0 = time.perf_counter()
    evaluator.indices("test")
    index_seconds = time.perf_counter() - t0
    evaluator.evaluate(model, "test", (20, 50, 200), progress=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = evaluator.evaluate(model, "test", (20, 50, 200), progress=False)
        times.append(time.perf_counter() - t0)
    payload = {
        "command": "python benchmarks/bench_evaluate.py " + " ".join(sys.argv[1:]),
        "model": cfg.model_name,
        "users_ranked": sum(res.users.values()),
        "items": data.info.n_items,
        "index_build_seconds": round(index_seconds, 3),
        "evaluate_seconds_median": round(statistics.median(times), 3),
        "evaluate_seconds_all": [round(t, 3) for t in times],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "average": res.average,
    }
    print(res.table())
    print(payload)
    print("wrote", write(args.name, payload))


if __name__ == "__main__":
    main()
