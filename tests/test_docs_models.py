"""docs/models.md's worked example is a real model: the block builds, trains a few steps,
evaluates and exports like any built-in one."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
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


def _aftrec(args: list[str], path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m aftrec ARGS`` in a fresh process with ``path`` on ``sys.path``."""
    full = {k: v for k, v in os.environ.items() if k != "AFTREC_MODELS"}
    full.update(PYTHONPATH=os.pathsep.join([str(path), *sys.path]), **env)
    return subprocess.run(
        [sys.executable, "-m", "aftrec", *args], capture_output=True, text=True, env=full,
        timeout=300,
    )  # fmt: skip


def test_a_model_outside_the_package_is_found_by_every_command(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The only way for the command line to find a model was a file inside the installed
    package; ``$AFTREC_MODELS`` and the ``aftrec.models`` entry points name modules outside
    it. A module that fails to import, or registers a taken name, is one ``error:`` line and
    exit 2 (a registration refused was a traceback on every command, built-in models' too)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "my_mean_pool.py").write_text(example_source())
    listed = _aftrec(["models"], lib, {"AFTREC_MODELS": "my_mean_pool"})
    assert listed.returncode == 0 and "mean-pool" in listed.stdout, listed.stderr
    run = tmp_path / "run"
    trained = _aftrec(
        ["train", "--data", str(tiny_dir), "--model", "mean-pool", "--out", str(run), "--quiet",
         "--set", "train.epochs=1", "train.threads=1"],
        lib, {"AFTREC_MODELS": "my_mean_pool"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    # a new process that does not know the module: the error says how to make it known
    unknown = _aftrec(["evaluate", "--run", str(run)], lib, {})
    assert unknown.returncode == 2 and "unknown model 'mean-pool'" in unknown.stderr
    assert "AFTREC_MODELS" in unknown.stderr
    assert _aftrec(["evaluate", "--run", str(run)], lib, {"AFTREC_MODELS": "my_mean_pool"})\
        .returncode == 0  # fmt: skip

    # an installed distribution's entry point, as `[project.entry-points."aftrec.models"]`
    info = lib / "my_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[aftrec.models]\nmean-pool = my_mean_pool\n")
    listed = _aftrec(["models"], lib, {})
    assert listed.returncode == 0 and "mean-pool" in listed.stdout, listed.stderr
    (info / "entry_points.txt").unlink()

    (lib / "broken_models.py").write_text("1 / 0\n")
    (lib / "taken_name.py").write_text(
        "from aftrec.models.popularity import PopularityConfig\n"
        "from aftrec.registry import register_model\n"
        "@register_model('pop', PopularityConfig)\nclass Other:\n    pass\n"
    )
    for module, message in (
        ("broken_models", "error: cannot import model module 'broken_models' ($AFTREC_MODELS): "
                          "ZeroDivisionError: division by zero"),
        ("nowhere_models", "error: cannot import model module 'nowhere_models' "
                           "($AFTREC_MODELS): ModuleNotFoundError: No module named "
                           "'nowhere_models'"),
        ("taken_name", "error: model 'pop' is registered twice: by "
                       "aftrec.models.popularity.Popularity and taken_name.Other"),
    ):  # fmt: skip
        got = _aftrec(["train", "--data", str(tiny_dir), "--model", "two-tower", "--out",
                       str(tmp_path / module)], lib, {"AFTREC_MODELS": module})  # fmt: skip
        assert got.returncode == 2, (module, got.stderr[-2000:])
        assert got.stderr.strip().splitlines()[-1].startswith(message), got.stderr
        assert "Traceback" not in got.stderr


def test_models_named_after_the_first_use_are_loaded_and_refusals_stay_value_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$AFTREC_MODELS`` set after the registry's first use (a notebook) was ignored, and the
    error then said to set it. A refused registration is still a ValueError, as before."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    registry.available_models()
    (tmp_path / "late_models.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AFTREC_MODELS", "late_models")
    monkeypatch.setattr(registry, "_loaded", registry._loaded)  # restored after
    assert "mean-pool" in registry.available_models()
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model("mean-pool", registry.model_config_class("pop"))(type("X", (), {}))
