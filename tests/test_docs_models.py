"""docs/models.md's worked example is a real model: the block builds, trains a few steps,
evaluates and exports like any built-in one."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from aftrec import registry
from aftrec.config import resolve
from aftrec.evaluation.evaluate import Evaluator
from aftrec.serving.bundle import export_run
from aftrec.serving.recommender import Recommender
from aftrec.training.rundir import load_run
from aftrec.training.trainer import train
from tests.conftest import FAST

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/models.md has one worked example"
    return blocks[0]


def test_the_worked_example_trains_evaluates_and_exports(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # register into a copy of the registry: other tests see the built-in models only
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    path = tmp_path / "mean_pool.py"
    path.write_text(example_source())
    spec = importlib.util.spec_from_file_location("mean_pool_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mean_pool_example", module)
    spec.loader.exec_module(module)
    assert "mean-pool" in registry.available_models()
    assert registry.registration("mean-pool").quick == {"dim": "16"}

    run = tmp_path / "run"
    result = train(tiny_dir, resolve("mean-pool", None, FAST), run, progress=False)
    assert result.best_epoch >= 1
    cfg, data, model = load_run(run)
    metrics = Evaluator(data, cfg.data.history_len).evaluate(model, "test", [10], progress=False)
    assert 0.0 < metrics.average["recall@10"] <= 1.0

    export_run(run, tmp_path / "bundle")
    rec = Recommender.load(tmp_path / "bundle")
    res = rec.recommend(user="0", n=5)
    assert [len(r.items) for r in res.results] == [5] * data.info.n_domains
