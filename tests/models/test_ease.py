from pathlib import Path

import numpy as np
import torch
import yaml

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.models.ease import Ease, EaseConfig
from aftrec.training.rundir import load_run
from aftrec.training.trainer import train


def test_closed_form_matches_the_paper(tiny: Dataset) -> None:
    model = Ease(EaseConfig(l2=30.0, l2_grid=()), tiny.info, 8)
    model.fit(tiny.train)
    x = np.zeros((tiny.info.n_users, tiny.info.n_items))
    x[tiny.train.user, tiny.train.item] = 1
    b = model.weights.double().numpy()
    assert np.allclose(np.diag(b), 0)
    # stationarity of min ||X - XB||^2 + l2 ||B||^2 s.t. diag(B) = 0: off-diagonal gradient 0
    grad = (x.T @ x + 30.0 * np.eye(len(b))) @ b - x.T @ x
    off = grad - np.diag(np.diag(grad))
    assert np.abs(off).max() < 1e-3 * np.abs(x.T @ x).max()


def test_l2_is_tuned_on_validation(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = resolve("ease", overrides=["model.l2_grid=[1.0, 100.0, 10000.0]", "data.history_len=8"])
    res = train(tiny_dir, cfg, tmp_path / "r", progress=False)
    lines = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["model"]
    assert saved["l2"] in (1.0, 100.0, 10000.0) and saved["l2_grid"] == []
    best = max(lines, key=lambda s: yaml.safe_load(s)["valid_recall@50"])
    assert yaml.safe_load(best)["l2"] == saved["l2"]
    assert res.best_metric == yaml.safe_load(best)["valid_recall@50"]
    _, _, model = load_run(tmp_path / "r")
    assert torch.count_nonzero(model.weights) > 0
