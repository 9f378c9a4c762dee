"""Does G collapse? One change at a time to the printed objective, on small synthetic data.

Starts from ``aft-paper`` (G's top-k fakes, REINFORCE on log sigmoid, -MMD^2 with the gradient
through the fakes' weights, lambda_M = 1) and applies one switch per row, then all of the
default's at once. Each row trains 120 adversarial steps (batch 64, lr 0.01, 3 fakes, dim 16)
on the tests' synthetic data (3 domains x 80 items, 300 users), cycling over the same 20
batches, and reports G's health (:mod:`aftrec.models.aft.health`) over the last 20 steps:
the smallest share of a domain's items that were fakes, the mean |Q - b|, the fakes'
popularity percentile, the mean reward p_d and the share of D's top 50 held by the 10 most
frequent fakes. One thread, seed 0; about a minute per row on an idle core.

Run: ``python benchmarks/g_health_synthetic.py`` (prints a markdown table).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.data.prepare import prepare
from aftrec.data.sources.synthetic import SyntheticConfig, generate
from aftrec.models.aft import AFT
from aftrec.registry import create_model
from aftrec.training.steps import make_step

DATA = SyntheticConfig(
    n_users=300, n_domains=3, items_per_domain=80, n_interactions=9_000, n_topics=6, seed=7
)
L = 8
SMALL = [
    "model.dim=16",
    "model.g_layers=2",
    "model.g_heads=2",
    "model.d_heads=4",
    "model.conve_rows=4",
    "model.conve_channels=4",
    "model.g_hidden=32",
    "model.n_fakes=3",
    f"data.history_len={L}",
    "train.lr=0.01",
]
DEFAULT = (
    "model.fake_sampling=sample",
    "model.reinforce=softmax",
    "model.mmd_form=cross",
    "model.lambda_m=0.1",
    "model.g_supervised=1",
)
ROWS = {
    "as printed (`aft-paper`)": (),
    "MMD cross term only, fixed weights": ("model.mmd_form=cross",),
    "no MMD (lambda_M = 0)": ("model.lambda_m=0",),
    "lambda_M = 0.1": ("model.lambda_m=0.1",),
    "sampled fakes + log-softmax REINFORCE": (
        "model.fake_sampling=sample",
        "model.reinforce=softmax",
    ),
    "supervised anchor (g_supervised = 1)": ("model.g_supervised=1",),
    "warm-up 60 steps (G supervised, D on random negatives)": ("model.warmup_steps=60",),
    "D:G 5:1 (g_every = 5), G lr 1e-3 vs D 1e-2": ("model.g_every=5", "model.g_lr=0.001"),
    "all of the default (`aft`)": DEFAULT,
}


def health(data: Dataset, extra: tuple[str, ...], steps: int = 120, window: int = 20) -> dict:
    cfg = resolve("aft-paper", overrides=[*SMALL, *extra])
    torch.manual_seed(0)
    model = create_model("aft-paper", cfg.model, data.info, L)
    assert isinstance(model, AFT)
    model.prepare_training(data.train, data.valid)
    step = make_step(model, cfg.train)
    torch.manual_seed(0)
    loader = TrainLoader(data.train, data.info, L, batch_size=64, n_negatives=4)
    it = loader.epoch(np.random.default_rng(0))
    batches = [next(it) for _ in range(20)]
    for i in range(steps):
        if i == steps - window:
            model.epoch_health()  # reset: the last window only
        step(batches[i % len(batches)])
    out = model.epoch_health()
    assert out is not None
    return out


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "syn"
        prepare(generate(DATA), path, source={"kind": "synthetic"})
        data = Dataset(path)
        print(
            "| change to the printed objective | distinct share (min) | mean abs(Q-b) | "
            "pop. pct | reward p_d | top-10 fakes in D's top 50 |"
        )
        print("|---|---|---|---|---|---|")
        for label, extra in ROWS.items():
            h = health(data, extra)
            print(
                f"| {label} | {h['distinct_share_min']:.3f} | {h['advantage_abs']:.2e} | "
                f"{h['pop_pct']:.1f} | {h['reward_mean']:.3f} | {h['top10_in_d_top50']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
