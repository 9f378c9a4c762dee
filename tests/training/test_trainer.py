import dataclasses
import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from aftrec.config import resolve
from aftrec.errors import CheckpointError, ConfigError, DataError, OutputError, Stopped
from aftrec.numerics import flushing
from aftrec.outputs import held
from aftrec.training import checkpoint, rundir, trainer
from aftrec.training.rundir import load_run
from aftrec.training.trainer import train
from tests.conftest import FAST


def _weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return checkpoint.load(run / f"{which}.pt")["model"]


def test_same_seed_same_result(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = resolve("two-tower", overrides=FAST)
    train(tiny_dir, cfg, tmp_path / "a", progress=False)
    train(tiny_dir, cfg, tmp_path / "b", progress=False)
    for k, v in _weights(tmp_path / "a").items():
        torch.testing.assert_close(v, _weights(tmp_path / "b")[k], rtol=0, atol=0)
    other = resolve("two-tower", overrides=[*FAST, "train.seed=1"])
    train(tiny_dir, other, tmp_path / "c", progress=False)
    w_a, w_c = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert any(not torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_training_flushes_subnormals_and_puts_the_mode_back(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose weights decay into the subnormal range must not slow down tenfold
    (aftrec.numerics): its steps run with subnormals flushed, and the caller's mode is the
    same after train() as before it."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    seen: list[bool] = []
    make_step = trainer.make_step

    class Spy:
        """The trainer's step, noting the mode at each call."""

        def __init__(self, step: Any) -> None:
            self.step = step

        def __call__(self, batch: Any) -> Any:
            seen.append(flushing())
            return self.step(batch)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.step, name)

    monkeypatch.setattr(trainer, "make_step", lambda *a, **k: Spy(make_step(*a, **k)))
    train(tiny_dir, resolve("two-tower", overrides=FAST), tmp_path / "a", progress=False)
    assert seen and all(seen)
    assert not flushing()


def test_a_loaded_run_has_no_subnormal_weights(tiny_dir: Path, tmp_path: Path) -> None:
    """Evaluation, recommendations and export load a run through load_run: its decayed
    weights come back with their subnormal entries set to zero, the rest unchanged."""
    run = tmp_path / "a"
    train(tiny_dir, resolve("two-tower", overrides=FAST), run, progress=False)
    state = checkpoint.load(run / "best.pt")
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 2)
    state["model"][key].view(-1)[:2] = torch.tensor([1e-39, 0.5])
    checkpoint.save(state, run / "best.pt")
    _, _, model = load_run(run)
    loaded = model.state_dict()[key].view(-1)
    assert loaded[0].item() == 0.0 and loaded[1].item() == 0.5


def test_one_process_at_a_time_trains_a_run(tiny_dir: Path, tmp_path: Path) -> None:
    """Two processes on one run interleaved log.jsonl (28 lines for 15 epochs) and replaced
    each other's checkpoints: while one holds the run, a second train, fresh or resumed, is
    refused; once the first is done, the run resumes."""
    cfg = resolve("two-tower", overrides=FAST)
    run = tmp_path / "a"
    run.mkdir()
    with held(run, rundir.LOCK, "held"), pytest.raises(OutputError, match="another process"):
        train(tiny_dir, cfg, run, progress=False)
    assert not (run / rundir.LAST).exists()
    done = train(tiny_dir, cfg, run, progress=False)
    with held(run, rundir.LOCK, "held"), pytest.raises(OutputError, match="another process"):
        train(tiny_dir, None, run, resume=True, progress=False)
    assert train(tiny_dir, None, run, resume=True, progress=False).best_epoch == done.best_epoch
    assert len(rundir.epoch_log(run)) == done.epochs_run


def test_a_train_refused_by_the_lock_leaves_the_folder_of_the_one_holding_it(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fresh trains of a new run, both finding it missing: the other one takes the lock
    first and loads its data, its folder holding run.lock alone. The refused one deleted that
    folder, lock file included, as a folder it had created and left empty; the other failed on
    the missing folder, or trained on under a lock on a deleted file while a third train took
    a new one. Refused, a train now touches nothing."""
    cfg = resolve("two-tower", overrides=FAST)
    run = tmp_path / "run"
    real = trainer.held
    other = ExitStack()  # the other train, holding the lock

    @contextmanager
    def raced(folder: Path, name: str, busy: str) -> Iterator[None]:
        other.enter_context(real(folder, name, "held"))  # the other takes the lock first
        with real(folder, name, busy):
            yield

    with other:
        monkeypatch.setattr(trainer, "held", raced)
        with pytest.raises(OutputError, match="another process is training this run"):
            train(tiny_dir, cfg, run, progress=False)
        monkeypatch.undo()
        assert [p.name for p in run.iterdir()] == [rundir.LOCK]  # the other's, as it was
        with pytest.raises(OutputError, match="another process is training this run"):
            train(tiny_dir, cfg, run, progress=False)  # its lock is the one at the path
    assert train(tiny_dir, cfg, run, progress=False).epochs_run > 0


def test_a_train_that_fails_removes_the_folder_only_if_it_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fresh trains of a new run, both finding it missing: the other one creates the
    folder, this one takes the lock first and fails. It removed the folder as its own, and
    the other, opening its lock file, failed on a missing folder. The folder is removed
    only by the train whose mkdir made it."""
    cfg = resolve("two-tower", overrides=FAST)
    run = tmp_path / "run"
    real = Path.mkdir

    def raced(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == run and not self.exists():
            real(self)  # the other train's mkdir, just before this one's
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", raced)
    with pytest.raises(DataError):
        train(tmp_path / "no-data", cfg, run, progress=False)
    assert run.is_dir() and not any(run.iterdir())


def test_a_fresh_run_does_not_overwrite_files_that_are_not_a_runs(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """``aftrec train --config config.yaml --out .`` wrote the resolved config over the user's
    own config.yaml; a folder holding a run's file names but no run.json is refused. What a
    run killed before its first checkpoint left (run.json beside them) is replaced."""
    cfg = resolve("two-tower", overrides=FAST)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("model:\n  name: two-tower\n")
    with pytest.raises(ConfigError, match=r"holds config\.yaml but no run"):
        train(tiny_dir, cfg, mine, progress=False)
    assert (mine / "config.yaml").read_text() == "model:\n  name: two-tower\n"
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.yaml", "run.json", "log.jsonl"):
        (killed / name).write_text("{}\n")
    assert train(tiny_dir, cfg, killed, progress=False).epochs_run > 0


def test_a_run_that_never_starts_leaves_no_folder(tmp_path: Path) -> None:
    cfg = resolve("two-tower", overrides=FAST)
    with pytest.raises(DataError):
        train(tmp_path / "no-data", cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_continues_exactly(tiny_dir: Path, tmp_path: Path) -> None:
    over = [*FAST, "train.epochs=3", "train.patience=10"]
    train(tiny_dir, resolve("two-tower", overrides=over), tmp_path / "full", progress=False)
    # a run "killed" after its first epoch: same config, but stopped at epoch 1
    short = resolve("two-tower", overrides=[*FAST, "train.epochs=1", "train.patience=10"])
    train(tiny_dir, short, tmp_path / "cut", progress=False)
    state = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 1
    # the saved config says 3 epochs, as the interrupted run had been asked for
    (tmp_path / "cut" / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    checkpoint.save({**state, "done": False}, tmp_path / "cut" / "last.pt")
    train(tiny_dir, None, tmp_path / "cut", resume=True, progress=False)
    assert checkpoint.load(tmp_path / "cut" / "last.pt")["epoch"] == 3
    for k, v in _weights(tmp_path / "full").items():
        torch.testing.assert_close(v, _weights(tmp_path / "cut")[k], rtol=0, atol=0)
    lines = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    for entry in map(json.loads, lines):  # each epoch's wall time, training and validation
        assert entry["train_seconds"] > 0 and entry["valid_seconds"] > 0


def test_evaluations_of_weights_the_trainer_replaces_are_removed(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """``aftrec evaluate`` then ``train --resume``: metrics.json and per_user.parquet kept the
    old best's values beside the new best.pt, and nothing said so. The files of the weights
    replaced go (best's when best.pt changes, last's at every last.pt), the others stay."""
    from aftrec.api import evaluate

    run = tmp_path / "run"
    train(tiny_dir, resolve("two-tower", overrides=[*FAST, "train.epochs=1"]), run,
          progress=False)  # fmt: skip
    for which in ("best", "last"):
        evaluate(run, n=[10], which=which, progress=False)
        evaluate(run, n=[10], which=which, split="valid", progress=False)
    best = {"metrics.json", "per_user.parquet", "metrics_valid.json", "per_user_valid.parquet"}
    last = {"metrics_last.json", "per_user_last.parquet", "metrics_valid_last.json",
            "per_user_valid_last.parquet"}  # fmt: skip
    assert best | last <= {p.name for p in run.iterdir()}
    before = checkpoint.load(run / "best.pt")["epoch"]
    train(tiny_dir, None, run, resume=True, progress=False, resume_set=["train.epochs=3"])
    moved = checkpoint.load(run / "best.pt")["epoch"] != before
    left = {p.name for p in run.iterdir()}
    assert not left & last
    assert (left & best) == (set() if moved else best)
    # a new best only: the last weights' files are all that go
    evaluate(run, n=[10], progress=False)
    rundir.forget_evaluations(run, "last")
    assert (run / "metrics.json").is_file()
    rundir.forget_evaluations(run, "best")
    assert not (run / "metrics.json").exists() and not (run / "per_user.parquet").exists()


def test_an_evaluation_of_weights_replaced_while_it_ran_writes_nothing(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aftrec evaluate`` of a run that trains on: a new best.pt written while the
    evaluation ran left its values, of the weights before, as the run's metrics.json."""
    from aftrec import api
    from aftrec.evaluation.evaluate import Evaluator

    run = tmp_path / "run"
    train(tiny_dir, resolve("two-tower", overrides=[*FAST, "train.epochs=1"]), run,
          progress=False)  # fmt: skip
    ranked = Evaluator.evaluate

    def while_training(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = ranked(self, *args, **kwargs)
        checkpoint.save(checkpoint.load(run / "best.pt"), run / "best.pt")  # a new best lands
        return out

    monkeypatch.setattr(Evaluator, "evaluate", while_training)
    with pytest.raises(OutputError, match=r"best\.pt was replaced while it was evaluated"):
        api.evaluate(run, n=[10], progress=False)
    assert not list(run.glob("metrics*")) and not list(run.glob("per_user*"))
    monkeypatch.setattr(Evaluator, "evaluate", ranked)
    api.evaluate(run, n=[10], progress=False)  # weights that stay: written
    assert (run / "metrics.json").is_file()


def test_a_log_line_lost_to_a_kill_after_the_checkpoint_is_written_on_resume(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A kill between last.pt and its epoch's log.jsonl line lost the line for good: the
    resume went on after that epoch (or, for a finished run, trained nothing), and the
    reports' best-epoch times read the log."""
    run = tmp_path / "run"
    over = [*FAST, "train.epochs=2", "train.patience=10"]
    train(tiny_dir, resolve("two-tower", overrides=over), run, progress=False)
    whole = (run / "log.jsonl").read_text().splitlines()
    assert len(whole) == 2
    (run / "log.jsonl").write_text(whole[0] + "\n")  # killed before epoch 2's line
    train(tiny_dir, None, run, resume=True, progress=False)  # finished: trains nothing
    assert (run / "log.jsonl").read_text().splitlines() == whole
    assert [e["epoch"] for e in rundir.epoch_log(run)] == [1, 2]
    # inside a run: its first epoch's line lost, the resume writes it, then trains on
    (run / "log.jsonl").write_text("")
    state = checkpoint.load(run / "last.pt")
    checkpoint.save({**state, "epoch": 1, "entry": whole[0], "done": False},
                    run / "last.pt")  # fmt: skip
    train(tiny_dir, None, run, resume=True, progress=False)
    assert [e["epoch"] for e in rundir.epoch_log(run)] == [1, 2]


def test_a_resume_removes_the_temporaries_of_the_dead_only(tiny_dir: Path, tmp_path: Path) -> None:
    """A resume removed every ``.*.tmp`` of the run, those of a live ``aftrec evaluate``
    writing its metrics too, which then failed (``No such file or directory``)."""
    import subprocess
    import sys

    from aftrec import outputs

    run = tmp_path / "run"
    over = [*FAST, "train.epochs=1"]
    train(tiny_dir, resolve("two-tower", overrides=over), run, progress=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = outputs._HOST
    live = run / f".metrics.json.{host}-{os.getpid()}-0123abcd.tmp"
    dead = run / f".per_user.parquet.{host}-{int(gone.stdout)}-0123abcd.tmp"
    for path in (live, dead):
        path.write_bytes(b"half")
    train(tiny_dir, None, run, resume=True, progress=False, resume_set=["train.epochs=2"])
    assert live.is_file() and not dead.exists()


def test_a_resume_is_checked_in_terms_it_can_change(tiny_dir: Path, tmp_path: Path) -> None:
    """Before reading the data: a resume needs an epoch left to train (``--set
    train.epochs`` below the epoch under way trained nothing and said "trained"), and a number
    of ranks the kept shards or batch size split over, named as such (the message named
    ``train.batch_size``, which --resume does not let change); a mid-epoch checkpoint goes on
    only on as many ranks as wrote it."""
    from aftrec.training.distributed import Context
    from aftrec.training.trainer import _check_resumable

    over = [*FAST, "train.epochs=3", "train.patience=10"]
    train(tiny_dir, resolve("two-tower", overrides=over), tmp_path / "r", progress=False)
    state = {**checkpoint.load(tmp_path / "r" / "last.pt"), "epoch": 2, "done": False}
    checkpoint.save(state, tmp_path / "r" / "last.pt")
    with pytest.raises(ConfigError, match=r"trained 2 epoch\(s\): train.epochs=2 leaves nothing"):
        train(tiny_dir, None, tmp_path / "r", resume=True, resume_set=["train.epochs=2"],
              progress=False)  # fmt: skip
    assert "epochs: 3" in (tmp_path / "r" / "config.yaml").read_text()  # left as it was

    tc = resolve("two-tower", overrides=[*FAST, "train.epochs=5", "train.batch_size=64"]).train
    inside = {"epoch": 2, "done": False, "partial": {"ranks": [{}, {}]}}
    with pytest.raises(ConfigError, match=r"stopped inside epoch 3 by 2 ranks.*resume it with 2"):
        _check_resumable(tmp_path, tc, inside, Context(0, 3))
    with pytest.raises(ConfigError, match=r"inside epoch 3: train.epochs=2 leaves nothing"):
        _check_resumable(tmp_path, dataclasses.replace(tc, epochs=2), inside, Context(0, 2))
    ended = {"epoch": 2, "done": False}
    said = r"train.batch_size=64, which --resume keeps and 3 ranks do not divide: .*\(1, 2, 4,"
    with pytest.raises(ConfigError, match=said):
        _check_resumable(tmp_path, tc, ended, Context(0, 3))
    pinned = dataclasses.replace(tc, data_shards=4)
    with pytest.raises(ConfigError, match=r"train.data_shards=4, .* \(1, 2, 4\)"):
        _check_resumable(tmp_path, pinned, ended, Context(0, 3))
    _check_resumable(tmp_path, pinned, ended, Context(1, 2))  # 2 ranks split 4 shards
    # a finished run resumed without more epochs trains nothing: nothing to refuse; nor
    # one fitted in closed form (no optimiser step in its checkpoint), whatever the epochs
    _check_resumable(tmp_path, tc, {"epoch": 5, "done": True, "step": {}}, Context(0, 3))
    _check_resumable(tmp_path, tc, {"epoch": 0, "done": True}, Context(0, 3))


def test_a_closed_form_fit_killed_before_its_checkpoint_can_be_trained_again(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """EASE logs its grid before its checkpoint: killed in between, its folder holds a log
    too. --resume says to train it again, and so it can be, with a log of its own grid only."""
    from aftrec import api

    run = tmp_path / "ease"
    sets = ["train.threads=1", "model.l2_grid=[10.0,100.0]"]
    api.train(tiny_dir, "ease", run, overrides=sets, progress=False)
    for name in ("last.pt", "best.pt"):
        (run / name).unlink()
    with pytest.raises(CheckpointError, match="without --resume"):
        train(tiny_dir, None, run, resume=True, progress=False)
    api.train(tiny_dir, "ease", run, overrides=sets, progress=False)
    assert [e["l2"] for e in rundir.epoch_log(run)] == [10.0, 100.0]


def test_a_checkpoint_without_its_epoch_is_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    over = [*FAST, "train.epochs=2", "train.patience=10"]
    train(tiny_dir, resolve("two-tower", overrides=over), tmp_path / "r", progress=False)
    state = checkpoint.load(tmp_path / "r" / "last.pt")
    del state["epoch"]
    checkpoint.save({**state, "done": False}, tmp_path / "r" / "last.pt")
    with pytest.raises(CheckpointError, match="does not fit this run"):
        train(tiny_dir, None, tmp_path / "r", resume=True, resume_set=["train.epochs=3"],
              progress=False)  # fmt: skip


def test_resuming_a_run_stopped_before_its_first_checkpoint_says_to_start_it_again(
    tiny_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "r"
    train(tiny_dir, resolve("two-tower", overrides=FAST), run, progress=False)
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"before its first checkpoint.*without --resume"):
        train(tiny_dir, None, run, resume=True, progress=False)
    train(tiny_dir, resolve("two-tower", overrides=FAST), run, progress=False)  # as it says


TIMING = ("train_seconds", "valid_seconds", "examples_per_second", "peak_rss_mib")


@pytest.mark.parametrize("model", ["two-tower", "aft"])
def test_a_run_killed_inside_an_epoch_resumes_exactly(
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    model: str,
) -> None:
    """With a mid-epoch last.pt after every batch, a run stopped at the third batch of its
    second epoch resumes from the second: the same weights, optimiser state and log (AFT's
    health of G's fakes included) as a run never stopped."""
    over = [*FAST, "train.patience=10", "runtime.checkpoint_minutes=1.0e-9"]
    cfg = resolve(model, overrides=over)
    train(tiny_dir, cfg, tmp_path / "full", progress=False)
    make_step, calls = trainer.make_step, []

    class Killed(Exception):
        pass

    def stopping(*args: Any, **kwargs: Any) -> Any:
        step = make_step(*args, **kwargs)

        def call(batch: Any) -> Any:
            calls.append(1)
            if len(calls) == 9:  # 6 batches per epoch: the 3rd of epoch 2
                raise Killed
            return step(batch)

        call.state_dict, call.load_state_dict = step.state_dict, step.load_state_dict  # type: ignore[attr-defined]
        return call

    monkeypatch.setattr(trainer, "make_step", stopping)
    with pytest.raises(Killed):
        train(tiny_dir, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(trainer, "make_step", make_step)
    state = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["batches"] == 2 and not state["done"]
    with caplog.at_level(logging.INFO, logger="aftrec.training.trainer"):
        train(tiny_dir, None, tmp_path / "cut", resume=True, progress=False)
    assert "inside epoch 2, after batch 2" in caplog.text
    full, cut = (
        checkpoint.load(tmp_path / "full" / "last.pt"),
        checkpoint.load(tmp_path / "cut" / "last.pt"),
    )
    assert "partial" not in cut and cut["epoch"] == 2
    for k, v in full["model"].items():
        torch.testing.assert_close(v, cut["model"][k], rtol=0, atol=0)
    assert str(full["step"]) == str(cut["step"])  # optimiser moments and counters
    logs = [rundir.epoch_log(tmp_path / r) for r in ("full", "cut")]
    for a, b in zip(*logs, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    assert ("health" in logs[0][0]) == (model == "aft")


def _signalling(at: int, times: int = 1) -> Any:
    """``trainer.make_step`` whose step sends this process SIGTERM ``times`` times during its
    ``at``-th call (counting from 1), then trains on the batch."""
    make_step, calls = trainer.make_step, []

    def patched(*args: Any, **kwargs: Any) -> Any:
        step = make_step(*args, **kwargs)

        def call(batch: Any) -> Any:
            calls.append(1)
            if len(calls) == at:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
            return step(batch)

        call.state_dict, call.load_state_dict = step.state_dict, step.load_state_dict  # type: ignore[attr-defined]
        return call

    return patched


@pytest.mark.parametrize(("at", "epoch", "batch"), [(9, 2, 3), (6, 1, 6)])
def test_a_signal_stops_after_the_batch_with_a_checkpoint_there(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int, epoch: int,
    batch: int,
) -> None:  # fmt: skip
    """SIGTERM during a batch (the 3rd of epoch 2, or the last of epoch 1): the batch finishes,
    last.pt is written there although no mid-epoch checkpoint is due, the run stops with
    exit code 143, and --resume ends where a run never stopped does."""
    over = [*FAST, "train.patience=10", "runtime.checkpoint_minutes=null"]
    cfg = resolve("two-tower", overrides=over)
    train(tiny_dir, cfg, tmp_path / "full", progress=False)
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "make_step", _signalling(at))
    with pytest.raises(
        Stopped, match=f"by SIGTERM inside epoch {epoch}, after batch {batch};"
    ) as stop:
        train(tiny_dir, cfg, tmp_path / "cut", progress=False)
    assert stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    monkeypatch.undo()
    state = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == epoch - 1 and state["partial"]["batches"] == batch
    train(tiny_dir, None, tmp_path / "cut", resume=True, progress=False)
    full, cut = (checkpoint.load(tmp_path / r / "last.pt") for r in ("full", "cut"))
    assert "partial" not in cut and cut["epoch"] == full["epoch"] == 2
    for k, v in full["model"].items():
        torch.testing.assert_close(v, cut["model"][k], rtol=0, atol=0)
    assert str(full["step"]) == str(cut["step"])


def test_a_second_signal_stops_at_once(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = [*FAST, "train.patience=10", "runtime.checkpoint_minutes=null"]
    monkeypatch.setattr(trainer, "make_step", _signalling(9, times=2))
    with pytest.raises(Stopped) as stop:
        train(tiny_dir, resolve("two-tower", overrides=over), tmp_path / "r", progress=False)
    assert str(stop.value) == "by SIGTERM"
    state = checkpoint.load(tmp_path / "r" / "last.pt")  # the end of epoch 1, untouched
    assert state["epoch"] == 1 and "partial" not in state


def test_without_mid_epoch_checkpoints_last_pt_is_written_at_epoch_ends(
    tiny_dir: Path, tmp_path: Path
) -> None:
    cfg = resolve("two-tower", overrides=[*FAST, "runtime.checkpoint_minutes=null"])
    train(tiny_dir, cfg, tmp_path / "r", progress=False)
    assert "partial" not in checkpoint.load(tmp_path / "r" / "last.pt")
    assert resolve("two-tower").runtime.checkpoint_minutes == 10.0


def test_early_stopping_and_best_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    # a learning rate of 0 never improves after the first epoch: stop after `patience` more
    cfg = resolve(
        "two-tower", overrides=[*FAST, "train.epochs=10", "train.patience=2", "train.lr=0.0"]
    )
    res = train(tiny_dir, cfg, tmp_path / "r", progress=False)
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 1
    assert checkpoint.load(tmp_path / "r" / "best.pt")["epoch"] == 1


def test_run_refuses_to_overwrite_and_resume_needs_no_config(
    tiny_dir: Path, tmp_path: Path
) -> None:
    cfg = resolve("pop")
    train(tiny_dir, cfg, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_dir, cfg, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="saved config"):
        train(tiny_dir, cfg, tmp_path / "r", resume=True, progress=False)


def test_atomic_checkpoint_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        checkpoint.save({"model": {"w": torch.zeros(2)}, "x": Boom()}, path)
    torch.testing.assert_close(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tiny_dir: Path, tmp_path: Path) -> None:
    train(tiny_dir, resolve("two-tower", overrides=FAST), tmp_path / "r", progress=False)
    best = tmp_path / "r" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"best\.pt"):
        load_run(tmp_path / "r")


def test_killed_run_leaves_a_good_checkpoint_and_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    """SIGKILL a real training process mid-run: last.pt stays loadable and --resume finishes."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "aftrec.cli", "train", "--data", str(tiny_dir),
           "--model", "two-tower", "--out", str(run), "--quiet", "--set", *FAST,
           "train.epochs=400", "train.patience=400"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run / "last.pt").exists() and checkpoint.load(run / "last.pt")["epoch"] >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load(run / "last.pt")  # complete, whatever moment the kill hit
    assert 2 <= state["epoch"] < 400 and not state["done"]
    # finish quickly: shorten the saved run to two more epochs and resume it
    cfg = (run / "config.yaml").read_text().replace("epochs: 400", f"epochs: {state['epoch'] + 2}")
    (run / "config.yaml").write_text(cfg)
    res = train(tiny_dir, None, run, resume=True, progress=False)
    assert res.epochs_run == state["epoch"] + 2
    # a temporary file the kill may have left mid-write is swept on resume
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_yaml_config_and_overrides_resolve_in_order(tiny_dir: Path, tmp_path: Path) -> None:
    """Defaults <- YAML <- --set; the run's config.yaml holds the resolved result."""
    import yaml

    from aftrec.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "model: {name: two-tower, dim: 12, hidden: 20}\n"
        "train: {epochs: 1, max_batches_per_epoch: 2, batch_size: 32, lr: 0.01}\n"
        "data: {history_len: 4}\n"
    )
    run = tmp_path / "r"
    code = main(["train", "--data", str(tiny_dir), "--out", str(run), "--config", str(cfg_file),
                 "--set", "train.lr=0.005", "model.hidden=24", "--quiet"])  # fmt: skip
    assert code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "two-tower" and saved["model"]["dim"] == 12
    assert saved["model"]["hidden"] == 24 and saved["train"]["lr"] == 0.005
    assert saved["data"]["history_len"] == 4 and saved["train"]["patience"] == 3  # a default
    w = checkpoint.load(run / "best.pt")["model"]
    assert w["item_emb.weight"].shape[1] == 12


def test_a_signal_the_process_ignores_stays_ignored_while_it_trains() -> None:
    """A worker of ``reproduce --jobs`` ignores SIGINT (a terminal's Ctrl-C reaches the whole
    group; the parent stops its workers with SIGTERM). The trainer took SIGINT over, so it
    counted as the first signal, and the parent's SIGTERM, the second, stopped the run at
    once, without its checkpoint after the batch."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with trainer._stop_after_batch() as request:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no request
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal: stop after the batch
            assert request.pending()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_trainer_forgets_evaluations_only_and_never_stops_on_one(tmp_path: Path) -> None:
    """The glob ``metrics*.json`` took a user's ``metrics_notes.json`` for an evaluation, and a
    folder so named stopped the run at its next checkpoint (IsADirectoryError)."""
    run = tmp_path / "run"
    run.mkdir()
    best = ["metrics.json", "per_user.parquet", "metrics_valid_sampled100.json"]
    last = ["metrics_last.json", "per_user_valid_sampled100_last.parquet"]
    mine = ["metrics_notes.json", "per_user_cohorts_last.parquet", "metrics.json.bak"]
    for name in (*best, *last, *mine):
        (run / name).write_text("x")
    (run / "metrics_valid.json" / "inside").mkdir(parents=True)  # a folder: left alone
    rundir.forget_evaluations(run, "last")
    assert {p.name for p in run.iterdir()} == {*best, *mine, "metrics_valid.json"}
    rundir.forget_evaluations(run, "best")
    assert {p.name for p in run.iterdir()} == {*mine, "metrics_valid.json"}


def test_a_checkpoint_keeps_a_log_line_with_numpy_numbers_loadable(tmp_path: Path) -> None:
    """last.pt held the epoch's log entry as a dict: a model whose epoch health gives numpy
    numbers made a last.pt that the weights-only load refused (resume, evaluate --which last)."""
    import numpy as np

    from aftrec.models.two_tower import TwoTower

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve("two-tower", overrides=FAST)
    model = object.__new__(TwoTower)
    torch.nn.Module.__init__(model)
    entry = {"epoch": 3, "loss": 0.5, "health": {"share": np.float64(0.25)}}
    step = type("S", (), {"state_dict": lambda self: {}})()
    trainer._save_last(run, model, step, 3, trainer.EarlyStopping(cfg.train.patience), False,
                       entry=entry)  # type: ignore[arg-type]  # fmt: skip
    state = checkpoint.load(run / "last.pt")
    rundir.repair_log(run, state)
    assert rundir.epoch_log(run) == [{"epoch": 3, "loss": 0.5, "health": {"share": 0.25}}]


def test_a_resume_removes_the_trainers_own_temporaries_whoever_left_them(tmp_path: Path) -> None:
    """Under the run's lock, a ``last.pt`` temporary of another host (a requeued job) or
    of an old name is a killed trainer's: kept, each was a checkpoint's size for good."""
    from aftrec import outputs

    run = tmp_path / "run"
    run.mkdir()
    theirs = [".last.pt.nodeB-4242-0123abcd.tmp", ".best.pt.nodeB-4243-0123abcd.tmp",
              ".last.pt.tmp", f".x.json.{outputs._HOST}-{10**20}-0123abcd.tmp"]  # fmt: skip
    live = f".metrics.json.{outputs._HOST}-{os.getpid()}-0123abcd.tmp"
    other = ".metrics.json.nodeB-4242-0123abcd.tmp"  # another host's evaluate: may be writing
    for name in (*theirs, live, other):
        (run / name).write_text("x")
    rundir.remove_temporaries(run)
    assert {p.name for p in run.iterdir()} == {live, other}
