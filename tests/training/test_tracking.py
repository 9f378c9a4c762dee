"""``train.tracker``: TensorBoard and MLflow get the config and every epoch's losses,
validation metric and G's health figures; a missing package is one error line; the tracker is
a runtime key, so it never makes a saved run another run."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aftrec.config import dump, resolve, run_identity
from aftrec.errors import ConfigError
from aftrec.training.rundir import MLFLOW, TENSORBOARD
from aftrec.training.tracking import scalars
from aftrec.training.trainer import train
from tests.conftest import FAST
from tests.inputs import fails_cleanly
from tests.models.test_aft import SMALL


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished two-epoch run per tracker (copy one before changing it)."""
    runs = {}
    for kind in ("tensorboard", "mlflow"):
        run = tmp_path_factory.mktemp("finished") / kind
        cfg = resolve("two-tower", overrides=[*FAST, f"train.tracker={kind}"])
        train(tiny_dir, cfg, run, progress=False)
        runs[kind] = run
    return runs


def _tensorboard_points(folder: Path) -> Counter[tuple[str, int]]:
    """How often each (tag, step) is in the event files of ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: Counter[tuple[str, int]] = Counter()
    for path in sorted(folder.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            points.update((value.tag, event.step) for value in event.summary.value)
    return points


def _mlflow_points(folder: Path) -> Counter[tuple[str, int]]:
    """How often each (metric, step) is in the one MLflow run of ``folder``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=folder.resolve().as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("aftrec").experiment_id])
    return Counter(
        (name, m.step)
        for name in mrun.data.metrics
        for m in client.get_metric_history(mrun.info.run_id, name)
    )


def test_tensorboard_event_file_holds_the_epochs(tiny_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    train(tiny_dir, resolve("two-tower", overrides=[*FAST, "train.tracker=tensorboard"]), run,
          progress=False)  # fmt: skip
    events = EventAccumulator(str(run / TENSORBOARD), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "valid/recall@50", "speed/examples_per_second"} <= tags
    entries = _log(run)
    for tag, key in (("train/loss", "loss"), ("valid/recall@50", "valid_recall@50")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2]
        assert [v for _, v in got] == pytest.approx([e[key] for e in entries], rel=1e-6)
    (text,) = events.Tensors("config/text_summary")
    assert "two-tower" in text.tensor_proto.string_val[0].decode()
    assert "tracker: tensorboard" in (run / "config.yaml").read_text()  # a runtime key, saved


def test_scalars_carry_gs_health_figures() -> None:
    entry = {
        "epoch": 2, "loss_d": 0.6, "loss_g": 0.1, "ranks": 2, "peak_rss_mib": [500.0, 612.3],
        "valid_recall@50": 0.4, "examples_per_second": 900.0, "train_seconds": 3.0,
        "valid_seconds": 1.0,
        "health": {"fakes": 64, "distinct_share": {"Romance": 0.9, "Drama": 0.8},
                   "distinct_share_min": 0.8, "advantage_abs": 0.07, "flag": True},
    }  # fmt: skip
    assert scalars(entry, ["loss_d", "loss_g"], "recall@50") == {
        "train/loss_d": 0.6,
        "train/loss_g": 0.1,
        "valid/recall@50": 0.4,
        "speed/examples_per_second": 900.0,
        "time/train_seconds": 3.0,
        "time/valid_seconds": 1.0,
        "memory/peak_rss_mib": 612.3,
        "health/fakes": 64.0,
        "health/distinct_share/Romance": 0.9,
        "health/distinct_share/Drama": 0.8,
        "health/distinct_share_min": 0.8,
        "health/advantage_abs": 0.07,
    }


def test_mlflow_file_store_holds_config_epochs_and_health(tiny_dir: Path, tmp_path: Path) -> None:
    """An AFT run (it has a health record), resumed for one more epoch: one MLflow run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "aft"
    over = [*SMALL, "train.max_batches_per_epoch=3", "train.batch_size=64", "train.patience=9"]
    cfg = resolve("aft", overrides=[*over, "train.epochs=1", "runtime.tracker=mlflow"])
    train(tiny_dir, cfg, run, progress=False)
    train(tiny_dir, None, run, resume=True, progress=False, resume_set=["train.epochs=2"])
    client = MlflowClient(tracking_uri=(run / MLFLOW).resolve().as_uri())
    (exp,) = client.search_experiments(filter_string="name = 'aftrec'")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["model.name"] == "aft" and mrun.data.params["model.dim"] == "16"
    entries = _log(run)
    history = client.get_metric_history(mrun.info.run_id, "valid/recall_at_50")
    assert [(m.step, m.value) for m in history] == [
        (e["epoch"], pytest.approx(e["valid_recall@50"])) for e in entries
    ]
    share = client.get_metric_history(mrun.info.run_id, "health/distinct_share_min")
    assert [m.value for m in share] == pytest.approx(
        [e["health"]["distinct_share_min"] for e in entries]
    )
    assert {"train/loss_d", "health/advantage_abs"} <= set(mrun.data.metrics)
    config = Path(client.download_artifacts(mrun.info.run_id, "config.yaml", str(tmp_path)))
    assert "epochs: 2" in config.read_text()


@pytest.mark.parametrize("kind, package", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_one_error_line(
    kind: str,
    package: str,
    tiny_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_package(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == package:
            raise ModuleNotFoundError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    argv = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out",
            str(tmp_path / "r"), "--quiet", "--set", *FAST, f"train.tracker={kind}"]  # fmt: skip
    line = fails_cleanly(capsys, argv, f"train.tracker={kind} needs the", "aftrec[tracking]",
                         roots=(tmp_path,))  # fmt: skip
    assert not (tmp_path / "r").exists(), line


@pytest.mark.parametrize("command", ["reproduce", "demo"])
def test_a_missing_tracker_package_stops_reproduce_and_the_demo_before_they_start(
    command: str,
    tiny_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked when the plan is made, not by each run in its worker: no data prepared, no
    run folders, no report of failed runs; one error line."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    out = str(tmp_path / "out")
    where = ["--out", out, "--jobs", "1", "--set", "train.tracker=mlflow"]
    argv = ["demo", *where]
    if command == "reproduce":
        argv = ["reproduce", "--data", str(tiny_dir), *where, "--models", "pop", "two-tower",
                "--skip", "ablations", "sweeps", "--quiet"]  # fmt: skip
    fails_cleanly(capsys, argv, "train.tracker=mlflow needs the", "aftrec[tracking]",
                  roots=(tmp_path,))  # fmt: skip


def test_tracker_is_checked_and_is_not_part_of_the_run() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.tracker must be one of none, tensorboard"):
        resolve("pop", overrides=["train.tracker=wandb"])
    plain, tracked = resolve("pop"), resolve("pop", overrides=["train.tracker=mlflow"])
    assert tracked.runtime.tracker == "mlflow" and "tracker: mlflow" in dump(tracked)
    assert run_identity(plain.to_dict()) == run_identity(tracked.to_dict())  # reproduce: same run


def test_a_refused_train_leaves_the_folder_as_it_found_it(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file named as a tracker's folder, and no run: refused, and no run.lock left behind
    (the trainer takes the lock before it looks)."""
    run = tmp_path / "d1"
    run.mkdir()
    (run / TENSORBOARD).touch()
    argv = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(run),
            "--quiet", "--set", *FAST, "train.tracker=tensorboard"]  # fmt: skip
    fails_cleanly(capsys, argv, "holds tensorboard but no run", roots=(tmp_path,))
    assert sorted(p.name for p in run.iterdir()) == [TENSORBOARD]


def test_mlflow_file_store_turned_off_in_the_environment_is_one_error_line(
    tiny_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE allows it: a user's own
    ``false`` is kept and refused before the run writes anything, not a 50-line traceback."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    argv = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out",
            str(tmp_path / "r"), "--quiet", "--set", *FAST, "train.tracker=mlflow"]  # fmt: skip
    fails_cleanly(capsys, argv, "MLFLOW_ALLOW_FILE_STORE='false'", roots=(tmp_path,))
    assert not (tmp_path / "r").exists()


def test_mlflow_names_every_domain_apart(tmp_path: Path) -> None:
    """Domain names MLflow refuses (``..``, a ``/`` at the end) crashed the run after epoch 1;
    ``a&b`` and ``a_b`` were one metric, mixing two domains; ``Dráma ü`` lost its letters.
    Each domain has its own MLflow name, the same in every epoch."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from aftrec.training.tracking import MLflowTracker

    # 90 CJK characters are 270 bytes: a file name of MLflow's store holds at most 255
    domains = ["a&b", "a_b", "a/b", "a", "..", "Sci-Fi/", "Dráma ü", "Drama", "drama", "剧" * 90]
    tracker = MLflowTracker(tmp_path / MLFLOW, resolve("pop"), resume=False)
    for epoch in (1, 2):
        share = {d: epoch + i / 10 for i, d in enumerate(domains)}
        tracker.log_epoch(epoch, {"health": {"distinct_share": share}}, (), None)
    tracker.close()
    client = MlflowClient(tracking_uri=(tmp_path / MLFLOW).resolve().as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("aftrec").experiment_id])
    names = sorted(mrun.data.metrics)
    assert len(names) == len(domains)
    values = {}
    for name in names:
        history = client.get_metric_history(mrun.info.run_id, name)
        assert [m.step for m in history] == [1, 2]
        values[round(history[0].value, 6)] = name
    by_domain = {d: values[round(1 + i / 10, 6)] for i, d in enumerate(domains)}
    prefix = "health/distinct_share/"
    assert by_domain["a"] == prefix + "a"
    assert by_domain[".."] == prefix + "__"
    assert by_domain["Sci-Fi/"] == prefix + "Sci-Fi_"
    assert by_domain["Dráma ü"] == prefix + "Dráma ü"
    for d in ("a&b", "a_b", "a/b"):  # the same once written as MLflow takes it: each apart
        assert re.fullmatch(prefix + r"a_b_[0-9a-f]{8}", by_domain[d]), by_domain[d]
    assert by_domain["Drama"].lower() != by_domain["drama"].lower()


@pytest.mark.parametrize(
    "kind, damage, needle",
    [
        ("tensorboard", "file", "it is a file, not a folder"),
        ("mlflow", "file", "it is a file, not a folder"),
        ("mlflow", "meta.yaml", "ParserError"),
    ],
)
def test_a_damaged_tracker_folder_is_one_error_line(
    kind: str,
    damage: str,
    needle: str,
    finished: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tracker folder replaced by a file, or an MLflow store with a garbled meta.yaml: the
    resume is refused in one line naming the folder (it was a traceback), nothing written."""
    run = tmp_path / "r"
    shutil.copytree(finished[kind], run)
    folder = run / (TENSORBOARD if kind == "tensorboard" else MLFLOW)
    if damage == "file":
        shutil.rmtree(folder)
        folder.write_text("not a folder\n")
    else:
        (folder / "0" / "meta.yaml").write_text("{{{: :\n")
    argv = ["train", "--out", str(run), "--resume", "--quiet", "--set", "train.epochs=3"]
    fails_cleanly(capsys, argv, f"cannot track the run in {folder}", needle, roots=(run,))


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_failed_tracker_write_is_a_warning_and_resume_sends_what_it_missed(
    kind: str,
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tracker's write fails half-way through epoch 1's scalars, after the epoch was saved:
    the run trains on (it ended in a traceback, and its tracker never got the epoch, as
    --resume found the run trained), with one warning. --resume sends the tracker every
    (scalar, step) it lacks, once: a finished run's, then those of a longer one."""
    from aftrec.training import rundir

    run = tmp_path / "r"
    folder = run / (TENSORBOARD if kind == "tensorboard" else MLFLOW)
    append_log = rundir.append_log

    def damage_after_epoch_1(out: Path, entry: dict[str, Any]) -> None:
        append_log(out, entry)
        if entry["epoch"] == 1:  # the tracker's write of the epoch comes next
            broken.append(True)
            if kind == "mlflow":  # valid/... can no longer be written, train/loss still can
                (metrics,) = folder.glob("*/*/metrics")
                (metrics / "valid").write_text("")

    broken: list[bool] = []
    monkeypatch.setattr(rundir, "append_log", damage_after_epoch_1)
    if kind == "tensorboard":  # the epoch's record half-written, then a full disk
        from tensorboard.summary.writer.record_writer import RecordWriter

        write = RecordWriter.write

        def half_then_full(self: RecordWriter, data: bytes) -> None:
            if broken and broken.pop():
                record = io.BytesIO()
                write(RecordWriter(record), data)
                self._writer.write(record.getvalue()[: len(data) // 2])
                self.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            write(self, data)

        monkeypatch.setattr(RecordWriter, "write", half_then_full)
    cfg = resolve("two-tower", overrides=[*FAST, f"train.tracker={kind}"])
    with caplog.at_level(logging.WARNING):
        assert train(tiny_dir, cfg, run, progress=False).epochs_run == 2
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "tracking stopped" in warning.getMessage() and "--resume" in warning.getMessage()
    assert "\n" not in warning.getMessage() and warning.exc_info is None
    monkeypatch.undo()
    if kind == "mlflow":
        (folder.glob("*/*/metrics/valid").__next__()).unlink()  # the folder repaired
        count = _mlflow_points
    else:
        count = _tensorboard_points
    assert max(count(folder).values()) == 1  # what was written before the failure: once
    for epochs in (2, 3):  # the finished run, then one more epoch
        train(tiny_dir, None, run, resume=True, progress=False,
              resume_set=[f"train.epochs={epochs}"])  # fmt: skip
        points = count(folder)
        points.pop(("config/text_summary", 0), None)  # the scalars here
        loss = "train/loss"
        valid = "valid/recall@50" if kind == "tensorboard" else "valid/recall_at_50"
        assert {step for name, step in points if name in (loss, valid)} == set(range(1, epochs + 1))
        assert set(points.values()) == {1}, points  # no step twice
        assert len({name for name, _ in points}) == len(points) / epochs  # every scalar


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_new_run_replaces_a_killed_runs_tracker_folder(
    kind: str, finished: dict[str, Path], tiny_dir: Path, tmp_path: Path
) -> None:
    """A run killed before its first checkpoint (config.yaml, run.json and its tracker's
    folder left): a new train there added a second MLflow run beside the stale RUNNING one,
    a second config to TensorBoard's. Now the new run's tracker holds the new run alone."""
    run = tmp_path / "r"
    shutil.copytree(finished[kind], run)
    for name in ("last.pt", "best.pt", "log.jsonl"):
        (run / name).unlink()
    cfg = resolve("two-tower", overrides=[*FAST, "model.dim=8", f"train.tracker={kind}"])
    train(tiny_dir, cfg, run, progress=False)
    if kind == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(run / MLFLOW).resolve().as_uri())
        (mrun,) = client.search_runs([client.get_experiment_by_name("aftrec").experiment_id])
        assert mrun.info.status == "FINISHED" and mrun.data.params["model.dim"] == "8"
    else:
        points = _tensorboard_points(run / TENSORBOARD)
        assert points[("config/text_summary", 0)] == 1
        assert points[("train/loss", 1)] == 1


def test_trackers_name_the_run_and_send_the_config_once(tiny_dir: Path, tmp_path: Path) -> None:
    """Every MLflow run of a report was named seed0 (the run folder's own name: name it with
    the one above, aft/seed0); a resumed TensorBoard run sent the config again at step 0."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for kind in ("tensorboard", "mlflow"):
        run = tmp_path / kind / "aft" / "seed0"
        cfg = resolve("two-tower", overrides=[*FAST, "train.epochs=1", f"train.tracker={kind}"])
        train(tiny_dir, cfg, run, progress=False)
        train(tiny_dir, None, run, resume=True, progress=False, resume_set=["train.epochs=2"])
    points = _tensorboard_points(tmp_path / "tensorboard" / "aft" / "seed0" / TENSORBOARD)
    assert points[("config/text_summary", 0)] == 1
    assert points[("train/loss", 2)] == 1
    store = tmp_path / "mlflow" / "aft" / "seed0" / MLFLOW
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("aftrec").experiment_id])
    assert mrun.info.run_name == "aft/seed0"
