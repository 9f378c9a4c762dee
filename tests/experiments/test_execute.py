"""``aftrec reproduce --jobs J``: every run in a spawned process of its own. A process that
dies fails its own run, not the others, and the report is written."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from aftrec import registry
from aftrec.cli import main

THREADS = "train.threads=1"

#: models whose process dies in their first batch: ``crashes`` exits as a shell reports a
#: killed command, ``killed`` is killed by SIGKILL, as the kernel's out-of-memory killer does.
#: Their config class is the module's own, so that unpickling a run's config imports it.
DYING = """
import os
import signal
from dataclasses import dataclass

from aftrec.models.two_tower import QUICK, TwoTower, TwoTowerConfig
from aftrec.registry import register_model


@dataclass(frozen=True)
class DyingConfig(TwoTowerConfig):
    pass


@register_model("crashes", DyingConfig, quick=QUICK)
class Crashes(TwoTower):
    def user_tower(self, batch, domain):
        os._exit(137)


@register_model("killed", DyingConfig, quick=QUICK)
class Killed(TwoTower):
    def user_tower(self, batch, domain):
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``load(name, source)``: import ``source`` as the user's module ``name``, from a folder
    on ``sys.path`` (which spawned processes inherit); its models register into a copy of the
    registry, so that other tests see the built-in models only."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    (tmp_path / "on_path").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "on_path"))

    def load(name: str, source: str) -> None:
        path = tmp_path / "on_path" / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)

    return load


def test_a_worker_that_dies_fails_its_own_run_and_the_report_is_written(
    tiny_dir: Path, tmp_path: Path, user_module: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """two-tower starts beside a run whose process exits, and goes on while the next run's is
    killed by SIGKILL: it finishes, the two others fail with what ended their process, and
    the command writes its report and exits 1, as it does for any failed run (a dead worker
    broke the pool of every run, and the command, without a report)."""
    user_module("dying_models", DYING)
    out = tmp_path / "report"
    argv = ["reproduce", "--data", str(tiny_dir), "--out", str(out), "--quick", "--quiet",
            "--models", "crashes", "two-tower", "killed", "--skip", "ablations", "sweeps",
            "--jobs", "2", "--set", THREADS]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    exited = "the worker process training this run died: exit code 137"
    killed = "the worker process training this run died: killed by SIGKILL (as the kernel's "
    assert err[0] == f"crashes/seed0 failed: {exited}", err
    assert err[1].startswith(f"killed/seed0 failed: {killed}"), err
    assert len(err) == 3 and err[2].startswith("error: 2 run(s) failed; "), err
    text = (out / "report.md").read_text()
    assert "## Failures" in text and exited in text and killed in text
    results = json.loads((out / "results.json").read_text())
    assert results["entries"]["two-tower"]["seeds"]["0"]["ok"]
    assert (out / "runs" / "two-tower" / "seed0" / "metrics.json").is_file()
    # recorded beside the run, so that --report-only says why it failed
    record = json.loads((out / "runs" / "crashes" / "seed0" / "reproduce.json").read_text())
    assert record["error"] == exited
