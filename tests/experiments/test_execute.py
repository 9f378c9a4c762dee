"""``aftrec reproduce --jobs J``: every run in a spawned process of its own. A process that
dies fails its own run, not the others, and the report is written; each process imports the
module that registered its run's model, so a model registered outside aftrec trains as it
does with ``--jobs 1``."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aftrec import registry
from aftrec.cli import main
from aftrec.experiments.plan import ReproduceSpec
from aftrec.experiments.reproduce import reproduce

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


#: a model registered with a built-in config class: no run's config names its module
ELSEWHERE = """
from aftrec.models.two_tower import QUICK, TwoTower, TwoTowerConfig
from aftrec.registry import register_model


@register_model("elsewhere", TwoTowerConfig, quick=QUICK)
class Elsewhere(TwoTower):
    pass
"""

#: a model with a config class of its own, in a module loaded from a file under a name that
#: no folder on the path holds: a new process cannot import it
UNFINDABLE = """
from dataclasses import dataclass

from aftrec.models.two_tower import QUICK, TwoTower, TwoTowerConfig
from aftrec.registry import register_model


@dataclass(frozen=True)
class UnfindableConfig(TwoTowerConfig):
    pass


@register_model("unfindable", UnfindableConfig, quick=QUICK)
class Unfindable(TwoTower):
    pass
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``load(name, source)``: import ``source`` as the user's module ``name``, from a folder
    on ``sys.path`` (which spawned processes inherit), or from one that is not
    (``on_path=False``); its models register into a copy of the registry, so that other
    tests see the built-in models only."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    (tmp_path / "on_path").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "on_path"))

    def load(name: str, source: str, on_path: bool = True) -> None:
        path = tmp_path / ("on_path" if on_path else "elsewhere") / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)

    return load


def _spec(data: Path, out: Path, *models: str) -> ReproduceSpec:
    return ReproduceSpec(data, out, quick=True, models=models, ablations=False, sweeps=False,
                         jobs=2, overrides=(THREADS,), progress=False)  # fmt: skip


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


def test_workers_import_the_module_that_registered_the_model(
    tiny_dir: Path, tmp_path: Path, user_module: Callable[..., None]
) -> None:
    """A model registered by a module of the user's trains in a worker (its runs' configs,
    of a built-in class, never made a worker import that module); one whose module a new
    process cannot import fails alone, saying so."""
    user_module("elsewhere_model", ELSEWHERE)
    user_module("unfindable_model", UNFINDABLE, on_path=False)
    out = tmp_path / "report"
    summary = reproduce(_spec(tiny_dir, out, "elsewhere", "unfindable"))
    assert (summary.trained, summary.failed) == (1, 1)
    assert (out / "runs" / "elsewhere" / "seed0" / "metrics.json").is_file()
    error = json.loads((out / "runs" / "unfindable" / "seed0" / "reproduce.json").read_text())
    assert error["error"].startswith(
        "a worker process cannot load model 'unfindable' (module unfindable_model): "
        "ModuleNotFoundError: No module named 'unfindable_model'; "
    ), error
    assert error["error"].endswith(
        "define the model in a module a new Python process can import, or run with --jobs 1"
    ), error


#: a researcher's script: a model of its own, then a reproduction with --jobs 2
SCRIPT = """
import sys
from dataclasses import dataclass
from pathlib import Path

from aftrec.experiments.plan import ReproduceSpec
from aftrec.experiments.reproduce import reproduce
from aftrec.models.two_tower import QUICK, TwoTower, TwoTowerConfig
from aftrec.registry import register_model


@dataclass(frozen=True)
class InlineConfig(TwoTowerConfig):
    pass


@register_model("inline", InlineConfig, quick=QUICK)
class Inline(TwoTower):
    pass


if __name__ == "__main__":
    summary = reproduce(ReproduceSpec(
        Path(sys.argv[1]), Path(sys.argv[2]), quick=True, models=("inline",), ablations=False,
        sweeps=False, jobs=2, overrides=("train.threads=1",), progress=False,
    ))
    print(f"trained {summary.trained} failed {summary.failed}")
"""


def test_a_model_of_a_scripts_main_trains_in_workers(tiny_dir: Path, tmp_path: Path) -> None:
    """A spawned process runs the script's module again (not its ``__main__`` block), which
    registers the model there."""
    script = tmp_path / "experiment.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(script), str(tiny_dir), str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trained 1 failed 0", done.stdout


def test_a_model_of_python_c_is_refused_with_jobs_in_one_message(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """``python -c`` (or a notebook) has no module a spawned process could import: the
    model's runs would each fail in a worker, so the call is refused before any trains."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(tiny_dir),
                           str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and not done.stdout, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "aftrec.errors.ConfigError: model 'inline' is defined in __main__, which the processes "
        "of --jobs do not run again (a `python -c` command, a notebook, an interactive "
        "session, a package's __main__.py): run it with --jobs 1, or define it in a module "
        "and import that"
    ), done.stderr
    assert not (out / "runs").exists()


def test_a_program_read_from_standard_input_is_refused_with_jobs(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """``python - < script``: each spawned process looked for a file named ``<stdin>`` to
    run again, and every run, of built-in models too, failed as "exit code 1"."""
    program = textwrap.dedent(SCRIPT).replace('models=("inline",)', 'models=("two-tower",)')
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-", str(tiny_dir), str(out)], input=program,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and not done.stdout, done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "aftrec.errors.ConfigError: this program's main module (<stdin>) is not a file that "
        "the processes of --jobs can run again, as each of them must: save the program to a "
        "file, or run with --jobs 1"
    ), done.stderr
    assert not (out / "runs").exists()


def _outcome_then_wait(parent: int, module: str | None, payload: bytes, data: Path,
                       results: Any) -> None:  # fmt: skip
    """A worker that sends its run's outcome, then takes its time to end."""
    import pickle
    import time

    from aftrec.experiments import execute
    from aftrec.experiments.results import RunOutcome

    execute._worker_init(parent)
    results.send(RunOutcome(pickle.loads(payload).run, True))
    time.sleep(600)


def test_a_stop_while_an_outcome_is_collected_ends_that_worker_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker was dropped from the ones to stop before its outcome was collected: a stop in
    that time (collecting waits for the process to end) left it running, and the command's
    exit waited for it for ever."""
    from aftrec.config import resolve
    from aftrec.errors import Stopped
    from aftrec.experiments import execute
    from aftrec.experiments.plan import Job

    started: list[Any] = []

    def collect(worker: Any) -> Any:
        started.append(worker.process)
        raise Stopped(signal.SIGTERM)  # the signal, while the process is joined

    monkeypatch.setattr(execute, "_work", _outcome_then_wait)
    monkeypatch.setattr(execute, "_collect", collect)
    job = Job(tmp_path / "run", resolve("two-tower"), "two-tower")
    with pytest.raises(Stopped):
        execute._execute_parallel(
            [job], tmp_path, 2, {}, lambda jobs: None, lambda job, outcome: None, lambda j: True
        )
    assert len(started) == 1
    started[0].join(30)
    assert not started[0].is_alive()
