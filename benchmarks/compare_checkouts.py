"""Do two checkouts train the same function? The same steps, compared parameter by parameter.

Run: ``python benchmarks/compare_checkouts.py --base /tmp/base/src --models aft-d aft --steps 30``
(``--base`` is another checkout's ``src``, e.g. a ``git worktree`` of the commit before a
speed change; the current one is this checkout's). Each checkout trains ``--steps`` steps of
each model from seed 0 on the same ML-1M batches, in float64 (``--dtype float32`` for the
production precision), in a subprocess of its own; the largest difference of each parameter,
relative to the parameter's largest entry, is printed per model, worst first.

In float32 two implementations of the same function drift apart within a few steps: Adam's
first updates are about ``lr * sign(g)``, so a gradient that is zero in one and 1e-9 in the
other moves a weight by ``lr`` in one only, and training amplifies that like a new seed. In
float64 the same function stays equal to about 1e-12; a real difference does not. A change
that draws dropout's random numbers for other elements (or in another order) trains a
different but equally distributed run: compare it with dropout off, ``sasrec:model.dropout=0
:model.attn_dropout=0`` (a model name may carry ``:KEY=VALUE`` overrides). A model renamed
between the checkouts is given as ``HERE/BASE``: ``aft-paper/aft:model.dropout=0`` trains
``aft-paper`` here and ``aft`` in the base checkout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import sys
import numpy as np, torch
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.registry import create_model
from aftrec.training.steps import make_step
data_dir, name, steps, dtype, out = sys.argv[1:6]
torch.set_num_threads(1)
torch.set_default_dtype(getattr(torch, dtype))
data = Dataset(data_dir)
base, *over = name.split(":")
cfg = resolve(base, overrides=over)
loader = TrainLoader(data.train, data.info, cfg.data.history_len, cfg.train.batch_size,
                     cfg.data.n_negatives)
batches = loader.epoch(np.random.default_rng(0))
torch.manual_seed(0)
model = create_model(base, cfg.model, data.info, cfg.data.history_len)
model.prepare_training(data.train)
step = make_step(model, cfg.train)
for _ in range(int(steps)):
    step(next(batches))
torch.save(model.state_dict(), out)
"""


def train(src: Path, data: Path, name: str, steps: int, dtype: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", CHILD, str(data), name, str(steps), dtype, str(out)]
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout's src")
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--models", nargs="+", default=["aft-d"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            a, b = Path(tmp) / "base.pt", Path(tmp) / "here.pt"
            model, _, over = name.partition(":")
            mine, _, theirs = model.partition("/")  # HERE/BASE: the model's name in each
            base_name = ":".join(filter(None, [theirs or mine, over]))
            train(args.base, args.data, base_name, args.steps, args.dtype, a)
            train(here, args.data, ":".join(filter(None, [mine, over])), args.steps, args.dtype, b)
            sa, sb = torch.load(a), torch.load(b)
            rel = {
                k: float((sa[k] - sb[k]).abs().max() / sa[k].abs().max().clamp(min=1e-30))
                for k in sa
                if sa[k].is_floating_point()
            }
            worst = sorted(rel.items(), key=lambda kv: -kv[1])[:3]
            print(f"{name} ({args.steps} steps, {args.dtype}): largest relative differences")
            for key, value in worst:
                print(f"  {value:.2e}  {key}")


if __name__ == "__main__":
    main()
