"""``aftrec tune``: the declared search spaces, seeded and resumable studies (on a stand-in
trainer, so that many trials cost nothing), and real trials on the tiny dataset with its test
split removed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from aftrec.cli import main
from aftrec.config import RunConfig, parse_overrides, resolve
from aftrec.data.dataset import Dataset
from aftrec.errors import ConfigError, OutputError, TrainingError
from aftrec.experiments import tune as tn
from aftrec.experiments.tune import TrialOutcome, TuneSpec, read_best, tune
from aftrec.outputs import held
from aftrec.registry import DROPOUT, TRAINED, available_models, registration
from aftrec.training.rundir import load_run_config
from tests.conftest import FAST

pytest.importorskip("optuna")


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize("model", available_models())
def test_every_search_space_is_declared_and_resolves(model: str) -> None:
    reg = registration(model)
    space = reg.search_space
    fields = {f.name for f in dataclasses.fields(reg.config)}
    if reg.model.trainable:
        assert TRAINED.items() <= space.items()
    else:
        assert not set(TRAINED) & set(space)
    if "dropout" in fields:
        assert DROPOUT.items() <= space.items()
    for end in ("low", "high"):
        pairs = [f"{k}={tn.format_value(getattr(r, end))}" for k, r in space.items()]
        cfg = resolve(model, overrides=[*reg.tune_fixed, *pairs]).to_dict()
        for key, r in space.items():
            section, name = key.split(".")
            assert cfg[section][name] == pytest.approx(getattr(r, end))


def test_the_model_knobs_of_the_brief() -> None:
    assert {"model.g_temperature", "model.lambda_m"} <= set(registration("aft").search_space)
    assert {"model.hnm_skip", "model.hnm_band"} <= set(registration("aft-hnm").search_space)
    assert list(registration("ease").search_space) == ["model.l2"]  # closed form: no lr
    assert registration("ease").tune_fixed == ("model.l2_grid=[]",)
    assert registration("pop").search_space == {}


@pytest.mark.parametrize("value", [1e-5, 0.001, 3.2e-08, 1.5e20, 0.25, 7.0, 12])
def test_drawn_values_round_trip_through_set(value: float) -> None:
    parsed = parse_overrides([f"train.lr={tn.format_value(value)}"])["train"]["lr"]
    assert parsed == value and isinstance(parsed, type(value))


# --------------------------------------------------------------------------- the study


def _score(cfg: RunConfig) -> float:
    """A smooth stand-in for a validation value, best near lr 3e-3 and dropout 0.2."""
    dropout = dataclasses.asdict(cfg.model).get("dropout", 0.2)
    return 1.0 - (math.log10(cfg.train.lr) + 2.5) ** 2 - (dropout - 0.2) ** 2


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Trials scored by :func:`_score` instead of training; returns the trial dirs asked."""
    asked: list[str] = []

    def fake(data: Path, cfg: RunConfig, run: Path) -> TrialOutcome:
        asked.append(run.name)
        return TrialOutcome(_score(cfg), 1, 1, False, 0.0)

    monkeypatch.setattr(tn, "_train_trial", fake)
    return asked


def _spec(data: Path, out: Path, trials: int, seed: int = 0, model: str = "two-tower") -> TuneSpec:
    return TuneSpec(data, model, out, trials, seed=seed, startup_trials=2)


def _params(out: Path) -> list[dict[str, float]]:
    frame = pd.read_csv(out / "trials.csv")
    return frame[[*TRAINED, "model.dropout"]].to_dict("records")


def test_same_seed_same_draws(tiny_dir: Path, tmp_path: Path, standin: list[str]) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        tune(_spec(tiny_dir, tmp_path / name, 5, seed))
    a, b, c = (_params(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 5  # 2 random, then 3 drawn by TPE from the same history
    assert a != c
    best = json.loads((tmp_path / "a" / "best.json").read_text())
    assert best["trials"] == 5 and best["seed"] == 0 and best["complete"] == 5
    assert set(best["space"]) == set(registration("two-tower").search_space)
    assert best["best_value"] == max(_score(resolve("two-tower", overrides=[
        f"{k}={tn.format_value(v)}" for k, v in p.items()])) for p in a)  # fmt: skip


def test_the_largest_seed_is_taken(tiny_dir: Path, tmp_path: Path, standin: list[str]) -> None:
    assert tune(_spec(tiny_dir, tmp_path / "s", 1, seed=2**32 - 1)).ran == 1


def test_a_second_call_continues_to_the_new_budget(
    tiny_dir: Path, tmp_path: Path, standin: list[str]
) -> None:
    assert tune(_spec(tiny_dir, tmp_path / "once", 6)).ran == 6
    assert tune(_spec(tiny_dir, tmp_path / "twice", 3)).ran == 3
    second = tune(_spec(tiny_dir, tmp_path / "twice", 6))
    assert second.ran == 3 and second.trials == 6
    assert _params(tmp_path / "twice") == _params(tmp_path / "once")
    assert tune(_spec(tiny_dir, tmp_path / "twice", 4)).ran == 0  # the budget is spent
    with pytest.raises(tn.ConfigError, match="another seed"):
        tune(_spec(tiny_dir, tmp_path / "twice", 8, seed=3))
    # a runtime key (threads) changes how trials run, not what they compute: allowed
    spec = _spec(tiny_dir, tmp_path / "twice", 7)
    more = tune(dataclasses.replace(spec, overrides=(*spec.overrides, "train.threads=1")))
    assert more.ran == 1
    with pytest.raises(tn.ConfigError, match="another set"):
        tune(dataclasses.replace(spec, overrides=(*spec.overrides, "train.patience=7")))
    # the same pairs in another order, or one given twice, are the same settings
    pairs = ("train.patience=2", "data.n_negatives=4")
    sets = dataclasses.replace(spec, out=tmp_path / "sets", trials=2, overrides=pairs)
    assert tune(sets).ran == 2
    same = (*pairs[::-1], pairs[0])
    assert tune(dataclasses.replace(sets, trials=3, overrides=same)).ran == 1


def test_a_killed_call_leaves_a_study_the_next_call_finishes(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin: list[str]
) -> None:
    tune(_spec(tiny_dir, tmp_path / "whole", 5))
    fake = tn._train_trial

    shown: list[list[str]] = []

    def killed_at_002(data: Path, cfg: RunConfig, run: Path) -> TrialOutcome:
        shown.append(list(pd.read_csv(run.parents[1] / "trials.csv")["state"]))
        if run.name == "002":
            raise KeyboardInterrupt
        return fake(data, cfg, run)

    monkeypatch.setattr(tn, "_train_trial", killed_at_002)
    with pytest.raises(KeyboardInterrupt):
        tune(_spec(tiny_dir, tmp_path / "killed", 5))
    # trials.csv lists the trial under way as running, and the one a kill left so
    assert shown == [["running"], ["complete", "running"], ["complete", "complete", "running"]]
    killed = pd.read_csv(tmp_path / "killed" / "trials.csv")
    assert list(killed["state"]) == ["complete", "complete", "running"]
    assert not math.isnan(killed["train.lr"][2])  # with the settings it trains with
    monkeypatch.setattr(tn, "_train_trial", fake)
    standin.clear()
    res = tune(_spec(tiny_dir, tmp_path / "killed", 5))
    assert standin == ["002", "003", "004"]  # the trial left running comes first
    assert res.ran == 3 and res.trials == 5
    assert _params(tmp_path / "killed") == _params(tmp_path / "whole")
    states = pd.read_csv(tmp_path / "killed" / "trials.csv")["state"]
    assert list(states) == ["complete"] * 5


def test_a_study_killed_while_its_attributes_were_written_goes_on(
    tiny_dir: Path, tmp_path: Path, standin: list[str]
) -> None:
    """A call killed between two of the study's attributes left a study that every later
    call refused, the same command included."""
    import optuna

    spec = _spec(tiny_dir, tmp_path / "cut", 3)
    attrs = tn._study_attrs(spec, registration(spec.model).search_space)
    spec.out.mkdir()
    storage = f"sqlite:///{spec.out / tn.STUDY_DB}"
    study = optuna.create_study(study_name=tn.STUDY_NAME, storage=storage, direction="maximize")
    for key in ["model", "data", "data_fingerprint", "seed"]:  # killed before "set"
        study.set_user_attr(key, attrs[key])
    with pytest.raises(ConfigError, match="another seed"):  # what it holds still counts
        tune(dataclasses.replace(spec, seed=1))
    assert tune(spec).ran == 3
    assert optuna.load_study(study_name=tn.STUDY_NAME, storage=storage).user_attrs == attrs
    tune(_spec(tiny_dir, tmp_path / "whole", 3))
    assert _params(spec.out) == _params(tmp_path / "whole")
    with pytest.raises(ConfigError, match="another set"):  # complete now, and checked
        tune(dataclasses.replace(spec, trials=4, overrides=("train.patience=7",)))


def test_a_second_call_on_a_busy_directory_is_refused(
    tiny_dir: Path, tmp_path: Path, standin: list[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with held(out, tn.LOCK, "held"), pytest.raises(OutputError, match="another `aftrec tune`"):
        tune(_spec(tiny_dir, out, 1))
    assert tune(_spec(tiny_dir, out, 1)).ran == 1  # the lock file alone is no obstacle


@pytest.mark.parametrize("name", ["st?a", "tu%41b", "h#x y", "é{x}"])
def test_the_study_lives_in_out_whatever_its_name_holds(
    tiny_dir: Path, tmp_path: Path, standin: list[str], name: str
) -> None:
    out = tmp_path / name
    assert tune(_spec(tiny_dir, out, 2)).ran == 2
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing beside it
    assert (out / tn.STUDY_DB).is_file()
    assert tune(_spec(tiny_dir, out, 3)).ran == 1  # and the next call finds it there


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "a folder", "another schema"])
def test_a_damaged_study_is_one_error_line(
    tiny_dir: Path, tmp_path: Path, standin: list[str], capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:  # fmt: skip
    out = tmp_path / "study"
    db = out / tn.STUDY_DB
    tune(_spec(tiny_dir, out, 1))
    if damage == "random bytes":
        db.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        os.truncate(db, 8192)
    elif damage == "another schema":  # written by an Optuna whose tables differ from ours
        with closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    else:
        db.unlink()
        db.mkdir()
    argv = ["tune", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(out),
            "--trials", "2"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {db} is not a readable study" in err[0], err
    assert standin == ["000"]  # no trial ran


@pytest.mark.parametrize("failure", ["read-only", "full when created", "read-only in a trial"])
def test_a_study_that_cannot_be_written_is_one_error_line(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], failure: str,
) -> None:  # fmt: skip
    """A read-only study.db, a full disk: a traceback from Optuna (or a damaged study told to
    be removed) before."""
    out = tmp_path / "study"
    db = out / tn.STUDY_DB
    connect = sqlite3.connect
    opened: list[sqlite3.Connection] = []

    def failing(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        con = connect(*args, **kwargs)
        if failure == "read-only":  # as SQLite opens a file it may not write
            con.execute("PRAGMA query_only = 1")
        elif failure == "full when created":  # no room beyond its first page
            con.execute("PRAGMA max_page_count = 1")
        opened.append(con)
        return con

    def read_only_at_001(data: Path, cfg: RunConfig, run: Path) -> TrialOutcome:
        if run.name == "001":  # the trial's result cannot be saved
            for con in opened:
                con.execute("PRAGMA query_only = 1")
        return TrialOutcome(_score(cfg), 1, 1, False, 0.0)

    monkeypatch.setattr(tn, "_train_trial", read_only_at_001)
    if failure == "read-only":
        tune(_spec(tiny_dir, out, 1))
    monkeypatch.setattr(sqlite3, "connect", failing)
    argv = ["tune", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(out),
            "--trials", "3"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    reason = "database or disk is full" if "full" in failure else "attempt to write a readonly"
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {db}: {reason}"), err


def test_a_study_locked_by_another_program_is_to_be_closed_not_removed(
    tiny_dir: Path, tmp_path: Path, standin: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A database browser holding study.db: the study is good, and the message said to remove
    it."""
    out = tmp_path / "study"
    tune(_spec(tiny_dir, out, 1))
    other = sqlite3.connect(out / tn.STUDY_DB, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        argv = ["tune", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(out),
                "--trials", "2"]  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 2
    finally:
        other.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is locked by another program" in err[0], err
    assert "remove it" not in err[0]


@pytest.mark.parametrize(
    "held", ["another program's tables", "other Optuna studies", "nothing", "no study"]
)
def test_a_foreign_database_is_refused_and_an_empty_one_taken(
    tiny_dir: Path, tmp_path: Path, standin: list[str], capsys: pytest.CaptureFixture[str],
    held: str,
) -> None:  # fmt: skip
    """Another program's SQLite file, or an Optuna database of other studies, was adopted:
    Optuna's tables or an aftrec study were added to it."""
    import optuna

    out = tmp_path / "study"
    out.mkdir()
    db = out / tn.STUDY_DB
    if held == "another program's tables":
        with closing(sqlite3.connect(db)) as con, con:
            con.execute("CREATE TABLE notes (text TEXT)")
            con.execute("INSERT INTO notes VALUES ('mine')")
    elif held == "other Optuna studies":
        optuna.create_study(study_name="mine", storage=f"sqlite:///{db}")
    elif held == "no study":  # Optuna's tables, no study yet (a call killed right then)
        optuna.storages.RDBStorage(f"sqlite:///{db}")
    else:
        with closing(sqlite3.connect(db)):  # an empty database: an empty file
            pass
    before = db.read_bytes()
    argv = ["tune", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(out),
            "--trials", "1"]  # fmt: skip
    capsys.readouterr()
    if held in ("nothing", "no study"):
        assert main(argv) == 0 and standin == ["000"]
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {db} is not a study of `aftrec tune`: it holds " in err[0]
    assert held in err[0] and ("notes" in err[0] or "mine" in err[0]), err
    assert db.read_bytes() == before and not standin


@pytest.mark.parametrize("blocker", ["trials/000", "trials"])
def test_a_file_where_a_trial_folder_goes_is_one_error_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], blocker: str
) -> None:
    """A traceback before; the trial is left running, as a killed call leaves it, and the
    next call, once the file is gone, finishes it."""
    out = tmp_path / "study"
    out.mkdir()
    (out / tn.STUDY_DB).write_bytes(b"")
    (out / blocker).parent.mkdir(exist_ok=True)
    (out / blocker).write_text("x\n")
    argv = ["tune", "--data", str(tiny_dir), "--model", "pop", "--out", str(out),
            "--trials", "1"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = "it is" if blocker == "trials/000" else f"{out / 'trials'} is"
    assert err == [f"error: cannot write {out / 'trials' / '000'}: {said} a file, not a folder"]
    (out / blocker).unlink()
    assert main(argv) == 0
    assert list(pd.read_csv(out / tn.TRIALS_CSV)["state"]) == ["complete"]


def test_a_trial_folder_of_another_study_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """A study.db emptied (or replaced) under old trials: trial 000 draws new settings, and
    resuming the old run would record its value under them."""
    spec = TuneSpec(tiny_dir, "two-tower", tmp_path / "a", 1, overrides=(*FAST, "train.epochs=1"))
    tune(spec)
    for name in ("same", "other"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
        (tmp_path / name / tn.STUDY_DB).write_bytes(b"")  # an empty SQLite database
    # the same seed draws the same settings: the finished run is taken as it is
    last = tmp_path / "same" / "trials" / "000" / "last.pt"
    before = last.stat().st_mtime_ns
    assert tune(dataclasses.replace(spec, out=tmp_path / "same")).ran == 1
    assert last.stat().st_mtime_ns == before
    other = dataclasses.replace(spec, out=tmp_path / "other", seed=7)
    config = tmp_path / "other" / "trials" / "000" / "config.yaml"
    saved = config.read_text()
    with pytest.raises(tn.ConfigError, match=r"trials/000 holds a run trained with other setti"):
        tune(other)
    assert config.read_text() == saved  # nothing removed or rewritten
    shutil.rmtree(config.parent)  # the trial left running is trained once its folder is gone
    assert tune(other).ran == 1
    assert load_run_config(config.parent).train.seed == 7


def test_a_trial_folder_differing_in_what_it_does_not_compute_is_taken(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """An inert key (AFM's chunk size, whose default changed) or a folder without a
    checkpoint (the trial starts it afresh) is no reason to refuse."""
    from aftrec.config import dump

    spec = TuneSpec(tiny_dir, "afm-multi", tmp_path / "a", 1, overrides=(*FAST, "train.epochs=1"))
    tune(spec)
    run = tmp_path / "a" / "trials" / "000"
    cfg = load_run_config(run)
    inert = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, chunk_floats=1 << 24))
    (run / "config.yaml").write_text(dump(inert))
    tn._check_trial_dir(run, cfg, 0)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 2))
    with pytest.raises(tn.ConfigError, match=r"train\.lr differ"):
        tn._check_trial_dir(run, other, 0)
    (run / "last.pt").unlink()
    tn._check_trial_dir(run, other, 0)  # never checkpointed: started afresh, nothing lost


def _diverges_at_001(data: Path, cfg: RunConfig, run: Path) -> TrialOutcome:
    if run.name == "001":
        raise TrainingError("non-finite loss at epoch 1: {'loss': nan}")
    return TrialOutcome(_score(cfg), 1, 1, False, 0.0)


def test_a_diverging_trial_fails_and_the_study_goes_on(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tn, "_train_trial", _diverges_at_001)
    res = tune(_spec(tiny_dir, tmp_path / "t", 3))
    trials = pd.read_csv(tmp_path / "t" / "trials.csv")
    assert list(trials["state"]) == ["complete", "fail", "complete"]
    assert "non-finite" in trials["error"][1]
    assert res.best is not None and res.best["failed"] == 1 and res.best["trials"] == 3
    values = list(trials["value"])
    assert tn.trial_points(tmp_path / "t") == [(0, values[0]), (1, None), (2, values[2])]
    assert tn.study_startup(tmp_path / "t") == 2  # _spec's, from best.json
    assert (tmp_path / "t" / tn.TRIALS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_start_trial_lengthens_the_random_start_as_tpe_does(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    by_tpe: set[int] = set()
    model_based = optuna.samplers.TPESampler._sample

    def spy(self: Any, study: Any, trial: Any, space: Any) -> Any:
        by_tpe.add(trial.number)
        return model_based(self, study, trial, space)

    monkeypatch.setattr(optuna.samplers.TPESampler, "_sample", spy)
    monkeypatch.setattr(tn, "_train_trial", _diverges_at_001)
    tune(_spec(tiny_dir, tmp_path / "t", 5))  # 2 random-start trials, as TPE counts them
    assert by_tpe == {3, 4}  # trial 1 failed, so trial 2 was still drawn at random
    points = tn.trial_points(tmp_path / "t")
    assert tn.drawn_at_random(points, 2) == {0, 1, 2}
    best = tn.read_best(tmp_path / "t")
    assert best.at_random == {0, 1, 2} and best.random_start == 3
    assert best.best_from_start == (best.best_trial in {0, 1, 2})
    # without a failure it is the first ``startup`` trials; with none finished, all of them
    assert tn.drawn_at_random([(0, 0.1), (1, 0.2), (2, 0.3)], 2) == {0, 1}
    assert tn.drawn_at_random([(0, None), (1, None)], 1) == {0, 1}


def test_best_so_far_steps_up_only_on_a_better_finished_trial() -> None:
    points = [(3, 0.7), (0, 0.5), (1, None), (2, 0.4), (4, 0.7), (5, 0.71)]
    assert tn.best_so_far(points) == [(0, 0.5), (3, 0.7), (5, 0.71)]
    assert tn.best_so_far([(0, None)]) == []


def test_a_best_json_without_its_random_start_has_the_default(tmp_path: Path) -> None:
    (tmp_path / "best.json").write_text("{}")  # written before best.json recorded it
    assert tn.study_startup(tmp_path) == tn.STARTUP_TRIALS
    assert tn.study_startup(tmp_path / "missing") == tn.STARTUP_TRIALS


def test_study_plot_writes_nothing_without_a_finished_trial(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    assert not tn.study_plot({"a": [(0, None)], "b": []}, 10, "valid recall@50", path)
    assert not path.exists()
    studies = {"a": [(0, 0.2), (1, 0.8), (2, None)], "b": [(0, 0.5)], "c": [(0, None)]}
    assert tn.study_plot(studies, 1, "valid recall@50", path)  # "c" gets no panel
    assert tn.study_plot(studies, {"a": 2, "b": 10, "c": 10}, "valid recall@50", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_plot_legend_covers_no_trial_and_names_every_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The legend sat in the first panel's lower right corner, over the last trial of a
    short study (a probe's third trial was hidden), and named only that panel's marks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures: list[Any] = []
    monkeypatch.setattr(tn, "write_png", lambda fig, path: figures.append(fig))
    studies = {
        "two-tower": [(0, 0.9393), (1, 0.9667), (2, 0.9427)],  # the probe's study
        "b": [(0, 0.5), (1, None), (2, 0.1), (3, 0.6)],  # failed, below the floor, TPE
    }
    assert tn.study_plot(studies, 2, "valid recall@50", tmp_path / "s.png")
    fig = figures[0]
    fig.tight_layout()
    renderer = FigureCanvasAgg(fig).get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert labels == ["random start", "TPE", "below", "failed", "best so far"]


# --------------------------------------------------------------------------- real trials


def test_trials_train_to_early_stopping_and_never_read_the_test_split(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "no-test"
    shutil.copytree(tiny_dir, data)
    (data / "test.parquet").unlink()  # any read of the test split fails the trial
    read: list[str] = []
    part = Dataset._read_part

    def spy(self: Dataset, name: str) -> object:
        read.append(name)
        return part(self, name)

    monkeypatch.setattr(Dataset, "_read_part", spy)
    out = tmp_path / "tune"
    sets = [*FAST, "train.epochs=30", "train.patience=1"]
    code = main(["tune", "--data", str(data), "--model", "two-tower", "--out", str(out),
                 "--trials", "2", "--set", *sets])  # fmt: skip
    assert code == 0
    assert "test" not in read and {"train", "valid"} <= set(read)
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["state"]) == ["complete", "complete"]
    # each stopped at its first epoch without a better validation value, well inside the cap
    assert list(trials["stopped_early"]) == [True, True]
    for n, row in zip(("000", "001"), trials.itertuples(), strict=True):
        log = [json.loads(line) for line in (out / "trials" / n / "log.jsonl").open()]
        assert len(log) == row.best_epoch + 1 < 30 and "valid_recall@50" in log[0]
        values = [e["valid_recall@50"] for e in log]
        assert values[-1] <= max(values) == values[row.best_epoch - 1]
    best = read_best(out)
    assert best.model == "two-tower" and best.trials == 2 and best.seed == 0
    assert len(best.overrides) == 3
    assert best.best_value == pytest.approx(trials["value"].max())
    saved = json.loads((out / "best.json").read_text())
    assert saved["set"] == sets and saved["metric"] == "valid recall@50"


def test_pop_needs_one_trial(tiny_dir: Path, tmp_path: Path) -> None:
    res = tune(TuneSpec(tiny_dir, "pop", tmp_path / "pop", 5))
    assert res.ran == 1 and res.trials == 1
    assert res.best is not None and res.best["overrides"] == [] and res.best["space"] == {}


def test_ease_trials_fit_the_drawn_l2(tiny_dir: Path, tmp_path: Path) -> None:
    res = tune(TuneSpec(tiny_dir, "ease", tmp_path / "ease", 2))
    assert res.best is not None
    assert res.best["overrides"][0] == "model.l2_grid=[]"
    l2 = res.best["params"]["model.l2"]
    fitted = load_run_config(tmp_path / "ease" / "trials" / f"{res.best['best_trial']:03d}")
    assert fitted.model.l2 == pytest.approx(l2) and fitted.model.l2_grid == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope", "--trials", "2"], "unknown model 'nope'"),
        (["--model", "pop", "--trials", "0"], "--trials must be at least 1"),
        (["--model", "two-tower", "--trials", "1", "--seed", "-5"], "--seed must be in [0, 2^32"),
        # SeedSequence([seed, n]) reads 2^32 + s as (s, 1): it would draw trial 1 of seed s
        (["--model", "pop", "--trials", "1", "--seed", str(2**32)], "--seed must be in [0, 2^32"),
        (["--model", "two-tower", "--trials", "2", "--set", "train.lr=0.1"], "train.lr is tuned"),
        (
            ["--model", "ease", "--trials", "2", "--set", "model.l2_grid=[100,1000]"],
            "--set model.l2_grid=[100,1000]: aftrec tune fixes it (model.l2_grid=[])",
        ),
        (["--model", "pop", "--trials", "2", "--data", "missing"], "not a prepared dataset"),
    ],
)
def test_bad_input_is_one_error_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
    message: str,
) -> None:  # fmt: skip
    if "--data" not in argv:
        argv = [*argv, "--data", str(tiny_dir)]
    else:
        argv[argv.index("--data") + 1] = str(tmp_path / "missing")
    assert main(["tune", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- reproduce --tuned


def test_reproduce_applies_best_json_and_reports_the_study(
    tiny_dir: Path, tmp_path: Path, standin: list[str]
) -> None:
    tw = tune(_spec(tiny_dir, tmp_path / "tune-tw", 3)).best
    tune(TuneSpec(tiny_dir, "pop", tmp_path / "tune-pop", 3))
    assert tw is not None
    out = tmp_path / "report"
    argv = ["reproduce", "--data", str(tiny_dir), "--out", str(out), "--quick", "--quiet",
            "--models", "two-tower", "pop", "--skip", "ablations", "sweeps",
            "--tuned", str(tmp_path / "tune-tw"), str(tmp_path / "tune-pop" / "best.json"),
            "--set", "train.threads=1", "two-tower:train.weight_decay=0.0"]  # fmt: skip
    assert main(argv) == 0
    cfg = load_run_config(out / "runs" / "two-tower" / "seed0")
    assert cfg.train.lr == tw["params"]["train.lr"]  # tuned
    assert cfg.model.dropout == tw["params"]["model.dropout"]
    assert cfg.train.weight_decay == 0.0  # --set comes after the tuned settings
    assert cfg.train.epochs == 1  # --quick still applies
    text = (out / "report.md").read_text()
    setup = text.split("## Setup")[1].split("## Recall@N")[0]
    assert "Tuned on validation" in setup
    won = tw["best_trial"]
    how = "random start" if won < 2 else "TPE"
    assert (f"`two-tower`: 3 trial(s) (3 finished; 2 random start, 1 TPE), seed 0, won by "
            f"trial {won} ({how}), best valid recall@50") in setup  # fmt: skip
    assert "`pop`: 1 trial(s), valid recall@50" in setup and "nothing to tune" in setup
    assert "--tuned" in setup
    assert "![each tuned model's trials and the best so far](tuning.png)" in setup
    assert (out / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # quick: one epoch of a one-epoch cap, so the run is at the cap; pop has no epochs
    convergence = text.split("## Convergence")[1].split("## Wall time")[0]
    assert "| `two-tower` | 1 | 1 | 1 | 1 of 1 (100%) |" in convergence
    assert "`pop`" not in convergence
    # the cost in CPU hours: each run's wall time times its torch threads (1 here)
    results = json.loads((out / "results.json").read_text())
    tw_run = json.loads((out / "runs" / "two-tower" / "seed0" / "reproduce.json").read_text())
    assert results["cpu_seconds"]["two-tower"] == pytest.approx(
        tw_run["train_seconds"] + tw_run["eval_seconds"]  # one thread
    )
    cpu = sum(results["cpu_seconds"].values()) / 3600
    wall = text.split("## Wall time")[1]
    assert f"{cpu:.1f} CPU hours (each run's wall time times its torch threads)" in wall
    assert results["tuned"]["two-tower"]["trials"] == 3
    assert results["convergence"][0]["hit_cap"] == 1


def test_reproduce_refuses_tuned_studies_of_models_not_run(
    tiny_dir: Path, tmp_path: Path, standin: list[str]
) -> None:
    tune(_spec(tiny_dir, tmp_path / "tw", 1))
    shutil.copytree(tmp_path / "tw", tmp_path / "tw2")
    base = ["reproduce", "--data", str(tiny_dir), "--out", str(tmp_path / "r"), "--quick"]
    assert main([*base, "--models", "pop", "--tuned", str(tmp_path / "tw")]) == 2
    assert main([*base, "--models", "two-tower", "--tuned", str(tmp_path / "tw"),
                 str(tmp_path / "tw2")]) == 2  # fmt: skip
    assert main([*base, "--models", "pop", "--tuned", str(tmp_path / "none")]) == 2


def test_studies_of_another_dataset_are_one_note_that_names_no_home_folder(
    tiny_dir: Path, tmp_path: Path, standin: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report said "`m` was tuned on `/abs/path`, not on this dataset." once per model:
    19 lines for a dataset's transferred settings, each with the machine's absolute path."""
    from aftrec.experiments.plan import read_tuned

    tune(_spec(tiny_dir, tmp_path / "tw", 1))
    tune(TuneSpec(tiny_dir, "pop", tmp_path / "pop", 1))
    studies = [tmp_path / "tw", tmp_path / "pop"]
    monkeypatch.chdir(tiny_dir.parent)
    notes: list[str] = []
    tuned = read_tuned(studies, ["pop", "two-tower"], tmp_path / "other", notes)
    assert sorted(tuned) == ["pop", "two-tower"]
    assert notes == [
        "Tuned on `tiny`, not on this dataset, and run here with the settings chosen there: "
        "`pop`, `two-tower`."
    ]
    monkeypatch.chdir(tmp_path)  # a dataset outside the working folder keeps its whole path
    notes.clear()
    read_tuned(studies, ["pop", "two-tower"], tmp_path / "other", notes)
    assert f"`{tiny_dir.resolve()}`" in notes[0]
    notes.clear()
    read_tuned(studies, ["pop", "two-tower"], tiny_dir, notes)  # tuned on this dataset
    assert notes == []


@pytest.mark.parametrize(
    ("file", "key", "value", "message"),
    [
        ("trials.csv", "trial", None, "trials.csv: not a trials.csv of `aftrec tune` (no 'trial'"),
        ("trials.csv", "trial", "x", "trials.csv: not a trials.csv of `aftrec tune`"),
        ("trials.csv", "trial", 0.5, "trials.csv: not a trials.csv of `aftrec tune`"),
        ("best.json", "trials", "1e400", "is not a best.json of `aftrec tune` (bad trials)"),
        ("best.json", "overrides", '"abc"', "(bad overrides)"),  # not split into characters
        ("best.json", "seed", "true", "(bad seed)"),
        ("best.json", "trials", "-3", "(bad trials)"),  # a type alone let these through
        ("best.json", "complete", "-1", "(bad complete)"),
    ],
)
def test_reproduce_refuses_a_damaged_study_up_front(
    tiny_dir: Path, tmp_path: Path, standin: list[str], file: str, key: str, value: Any,
    message: str,
) -> None:  # fmt: skip
    from aftrec.experiments.plan import ReproduceSpec, make_plan

    study = tmp_path / "tw"
    tune(_spec(tiny_dir, study, 2))
    if file == "trials.csv":
        frame = pd.read_csv(study / file)
        if value is None:
            frame = frame.drop(columns=[key])
        else:
            frame[key] = frame[key].astype(object)
            frame.loc[0, key] = value
        frame.to_csv(study / file, index=False)
    else:  # value: JSON text
        best = json.loads((study / file).read_text())
        (study / file).write_text(json.dumps({**best, key: "@"}).replace('"@"', value))
    spec = ReproduceSpec(tiny_dir, tmp_path / "r", quick=True, models=("two-tower",),
                         tuned=(study,))  # fmt: skip
    with pytest.raises(tn.ConfigError, match=re.escape(message)):
        make_plan(spec)
    assert not (tmp_path / "r").exists()


def _tuned(model: str, overrides: tuple[str, ...], best_trial: int) -> tn.Tuned:
    return tn.Tuned(model, Path(f"{model}/best.json"), "data", overrides, trials=12,
                    complete=12, seed=0, metric="valid recall@50", best_value=0.8,
                    best_trial=best_trial, startup_trials=10)  # fmt: skip


def test_the_report_names_models_that_one_start_draw_won() -> None:
    from aftrec.experiments.report import shared_start_lines

    same = ("train.lr=0.002", "model.dropout=0.1")
    tuned = {
        "a": _tuned("a", same, 8),
        "b": _tuned("b", (*same, "model.lambda_m=0.3"), 8),  # a wider space, the same draw
        "c": _tuned("c", ("train.lr=0.003",), 8),  # trial 8 of another space
        "e": _tuned("e", ("model.l2=900",), 8),  # no key in common with the others
        "d": _tuned("d", same, 11),  # TPE's draw: equal settings would be a coincidence
        "f": _tuned("f", same[:1], 2),
        "g": _tuned("g", same[:1], 2),
        "pop": _tuned("pop", (), 0),  # nothing tuned
    }
    lines = shared_start_lines(["a", "b", "c", "e", "d", "f", "g", "pop"], tuned)
    assert len(lines) == 1
    assert "won for `a`, `b` (trial 8); `f`, `g` (trial 2):" in lines[0]
    assert shared_start_lines(["a", "c", "e", "d", "f"], tuned) == []
    assert tuned["a"].best_from_start and not tuned["d"].best_from_start


def test_an_older_best_json_without_the_winner_still_reads(tmp_path: Path) -> None:
    obj = {"model": "two-tower", "data": "d", "overrides": ["train.lr=0.01"], "trials": 3,
           "complete": 3, "seed": 0, "metric": "valid recall@50", "best_value": 0.5}  # fmt: skip
    (tmp_path / "best.json").write_text(json.dumps(obj))
    best = read_best(tmp_path)
    assert (best.best_trial, best.startup_trials, best.best_from_start) == (-1, 0, False)


def test_a_study_refuses_its_dataset_prepared_again(tiny_dir: Path, tmp_path: Path) -> None:
    """The same folder prepared again from another log went on with the old trials."""
    data = Path(shutil.copytree(tiny_dir, tmp_path / "data"))
    out = tmp_path / "study"
    tune(TuneSpec(data, "pop", out, 1))
    meta = json.loads((data / "meta.json").read_text())
    meta["users_dropped"] = 1 + meta.get("users_dropped", 0)
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="data_fingerprint"):
        tune(TuneSpec(data, "pop", out, 2))
