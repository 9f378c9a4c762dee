"""``aftrec tune``: a seeded Optuna TPE search over one model's settings, on validation only.

Each model's settings are chosen on the validation split, never on test.
The searched settings and their ranges are declared in the model's registration
(:attr:`aftrec.registry.Registration.search_space`: the learning rate and weight decay of every
trainable model, the dropout where the config has one, the model's own key knobs). Each trial
trains one run to early stopping with the same trainer as ``aftrec train`` and is scored by its
best validation value (``train.valid_metric``, Recall@50 by default). The test split is never
read: the prepared dataset reads each part on first use, and nothing here asks for ``test``.

Layout of ``DIR`` (this module writes and reads it; :func:`read_best` is how others read it)::

    study.db        the Optuna study (SQLite): every trial's settings, state and value
    study.lock      held while a command works on DIR (a second one is refused)
    trials/NNN/     trial NNN's training run (:mod:`aftrec.training.rundir`)
    trials.csv      one row per trial: number, state, value, best epoch, epochs, seconds, settings
    trials.png      each trial's value and the best so far (:func:`study_plot`)
    best.json       the best trial: its settings as ``--set`` pairs, the trial budget, the seed,
                    the search space and the best value

Reproducible and resumable: trial ``n`` draws its settings with a fresh TPE sampler seeded from
``(seed, n)``, so its draws depend on the seed and the trials before it only, whether the
study ran in one call or several. A second call with a larger ``--trials`` adds trials up to
the new budget. A trial left running by a killed call is finished first, by resuming its run
from ``last.pt`` (or restarting it when it died before its first epoch); ``best.json``,
``trials.csv`` and ``trials.png`` are written atomically after every trial (``trials.csv``
also as a trial starts, which it lists as running).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.errors import (
    AftrecError,
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    TrainingError,
)
from aftrec.outputs import (
    atomic_write_text,
    check_writable,
    held,
    make_dirs,
    output_error,
    write_png,
)
from aftrec.registry import Range, registration

if TYPE_CHECKING:
    import optuna

    from aftrec.config import RunConfig

# optuna, pandas, torch and the trainer are imported where they are used (``aftrec --help``).

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
LOCK = "study.lock"
TRIALS = "trials"
TRIALS_CSV = "trials.csv"
TRIALS_PNG = "trials.png"
BEST = "best.json"
STUDY_NAME = "aftrec-tune"
#: TPE's random start: the first trials are drawn uniformly (on the log scale where declared)
STARTUP_TRIALS = 10


@dataclass(frozen=True)
class TuneSpec:
    """What ``aftrec tune`` was asked for."""

    data: Path
    model: str
    out: Path
    trials: int  # the budget: trials in the study when the call ends
    seed: int = 0  # the sampler's seed and every trial's train.seed: 0 to 2^32 - 1
    overrides: tuple[str, ...] = ()  # --set pairs every trial trains with (not tuned)
    startup_trials: int = STARTUP_TRIALS


@dataclass(frozen=True)
class TrialOutcome:
    """One trial's training run: its best validation value and how it got there."""

    value: float
    best_epoch: int
    epochs: int
    stopped_early: bool
    seconds: float


@dataclass(frozen=True)
class TuneResult:
    out: Path
    ran: int  # trials trained by this call (a resumed one included)
    trials: int  # trials in the study
    best: dict[str, Any] | None  # best.json, None when no trial finished
    seconds: float


def format_value(value: float | int) -> str:
    """A drawn value as a ``--set`` value that parses back to the same number (YAML reads
    ``1e-05`` as a string, ``1.0e-05`` as a float)."""
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def space_json(space: Mapping[str, Range]) -> dict[str, dict[str, Any]]:
    return {k: dataclasses.asdict(r) for k, r in space.items()}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # an install without the [tune] extra
        raise ConfigError(
            "aftrec tune needs optuna: pip install 'aftrec[tune]' (or the [dev] extra)"
        ) from exc
    return optuna


@dataclass(frozen=True)
class _Study:
    """A checked spec: the search space, the pairs every trial carries, the scored metric."""

    spec: TuneSpec
    space: dict[str, Range]
    fixed: tuple[str, ...]  # the registration's tune_fixed, then the user's --set
    metric: str  # train.valid_metric: "recall@50"
    budget: int  # trials the study ends with (1 when nothing is tuned)


def _check_spec(spec: TuneSpec) -> _Study:
    """The checked spec, or one clear error about the input."""
    from aftrec.config import resolve
    from aftrec.data.prepared import read_meta

    reg = registration(spec.model)  # unknown model: ConfigError listing the models
    if spec.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {spec.trials}")
    if spec.startup_trials < 1:
        raise ConfigError(f"--startup-trials must be at least 1, got {spec.startup_trials}")
    # checked before the study is created; trial n draws from SeedSequence([seed, n]), which
    # reads a seed of 2^32 or more as two words: seed s + k * 2^32 at trial 0 would draw what
    # seed s draws at trial k
    if not 0 <= spec.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2^32 - 1], got {spec.seed}")
    if not spec.data:
        raise DataError("--data DIR is required (a directory written by `aftrec prepare`)")
    meta = read_meta(Path(spec.data))  # missing or unfinished data: DataError
    if int(sum(meta["counts"]["valid"].values())) == 0:
        raise DataError(f"{spec.data} has no validation part: tuning scores trials on it")
    space = reg.search_space
    # the pairs every trial carries (EASE's model.l2_grid=[], so that the drawn l2 is fitted)
    pinned = {pair.partition("=")[0].strip(): pair for pair in reg.tune_fixed}
    for pair in spec.overrides:
        key = pair.partition("=")[0].strip()
        if key in space:
            raise ConfigError(f"--set {pair}: {key} is tuned; leave it to the search")
        if key in pinned:
            raise ConfigError(f"--set {pair}: aftrec tune fixes it ({pinned[key]})")
        if key == "train.seed":
            raise ConfigError("--set train.seed: use --seed, which seeds the search too")
    fixed = (*reg.tune_fixed, *spec.overrides)
    for end in ("low", "high"):  # both ends of every range make a valid config
        pairs = [f"{k}={format_value(getattr(r, end))}" for k, r in space.items()]
        cfg = resolve(spec.model, overrides=[*fixed, *pairs])
    # no tuned setting (pop): every trial would be the same run
    budget = spec.trials if space else 1
    return _Study(spec, space, fixed, cfg.train.valid_metric, budget)


def _study_attrs(spec: TuneSpec, space: Mapping[str, Range]) -> dict[str, Any]:
    """What a study was started with; a later call must ask for the same (only the budget
    may change)."""
    from aftrec.training.rundir import data_fingerprint

    return {
        "model": spec.model,
        "data": str(Path(spec.data).resolve()),
        # the same folder prepared again from another log is another dataset
        "data_fingerprint": data_fingerprint(Path(spec.data)),
        "seed": spec.seed,
        "set": list(spec.overrides),
        "space": space_json(space),
        "startup_trials": spec.startup_trials,
    }


def _open_study(spec: TuneSpec, space: Mapping[str, Range]) -> optuna.Study:
    optuna = _optuna()
    from sqlalchemy.exc import SQLAlchemyError

    out = Path(spec.out)
    attrs = _study_attrs(spec, space)
    db = (out / STUDY_DB).resolve()
    foreign = _foreign(db)
    if foreign:  # Optuna would add its tables, or a study, to it
        raise CheckpointError(
            f"{out / STUDY_DB} is not a study of `aftrec tune`: it holds {foreign}; "
            "choose another --out"
        )
    try:
        # sqlite opens the path itself: in a URL, a "?", "%" or "#" of the path would be syntax
        storage = optuna.storages.RDBStorage(
            "sqlite://", engine_kwargs={"creator": lambda: sqlite3.connect(db)}
        )
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True
        )
        saved = study.user_attrs
    except (SQLAlchemyError, RuntimeError, optuna.exceptions.StorageInternalError) as exc:
        # random bytes, truncated, a folder; a RuntimeError: tables of another Optuna
        # version, which Optuna names; a read-only file or a full disk: cannot write
        raise _study_error(out / STUDY_DB, exc) from exc
    # the attributes are written one at a time, before the first trial: a study without
    # trials is a new one or one killed while they were written, whose missing ones are
    # filled in where those it has are the asked ones (a study of an older version has no
    # data_fingerprint, and keeps none)
    fresh = not study.get_trials(deepcopy=False)
    differ = [
        k
        for k in attrs
        if (k in saved or not (fresh or k == "data_fingerprint"))
        and json.dumps(_same(k, saved.get(k))) != json.dumps(_same(k, attrs[k]))
    ]
    if differ:
        said = ", ".join(f"{k} {saved.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{out} holds a study with another {', '.join(differ)} ({said}); only --trials and "
            "runtime keys may change between calls; choose another --out"
        )
    if fresh:
        for key, value in attrs.items():
            if key not in saved:
                study.set_user_attr(key, value)
    return study


def _foreign(db: Path) -> str | None:
    """What ``db`` holds when it is another program's SQLite database or an Optuna database
    of other studies only; None for an empty one (a file or a database without tables or
    studies), one holding this command's study, or one SQLite cannot read (Optuna's open
    names what is wrong with it)."""
    try:
        if db.stat().st_size == 0:
            return None
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            tables = [row[0] for row in con.execute(query)]
            if tables and "studies" not in tables:
                return f"another program's tables ({_some(tables)})"
            names = (
                [row[0] for row in con.execute("SELECT study_name FROM studies")] if tables else []
            )
    except (OSError, sqlite3.Error):
        return None
    if names and STUDY_NAME not in names:
        return f"other Optuna studies ({_some(names)}), none named {STUDY_NAME}"
    return None


def _some(names: Sequence[str]) -> str:
    return ", ".join(map(str, names[:3])) + (" ..." if len(names) > 3 else "")


def _sqlite_error(exc: BaseException) -> sqlite3.Error | None:
    """The SQLite error under an Optuna or SQLAlchemy one (its cause, or SQLAlchemy's
    ``orig``), if any."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        orig = getattr(at, "orig", None)
        for err in (at, orig):
            if isinstance(err, sqlite3.Error):
                return err
        at = at.__cause__ or at.__context__
    return None


def _study_error(db: Path, exc: Exception) -> AftrecError:
    """The one-line error for a study that could not be read or written: one locked by
    another program (a database browser, a dashboard) is to be closed, not removed; a write
    that failed (a read-only file or file system, a full disk, an I/O error while writing)
    says so; anything else is a file that is not a readable study."""
    err = _sqlite_error(exc)
    name = str(getattr(err, "sqlite_errorname", "") or "")
    reason = " ".join(str(err or getattr(exc, "orig", None) or exc).split())
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return OutputError(
            f"{db} is locked by another program ({reason}); close it and run the same command "
            "again (a trial under way is finished then)"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_FULL")) or (
        name.startswith("SQLITE_IOERR") and "READ" not in name
    ):
        return OutputError(f"cannot write {db}: {reason}")
    return CheckpointError(
        f"{db} is not a readable study of `aftrec tune` ({reason}); "
        "choose another --out or remove it"
    )


def _same(key: str, value: Any) -> Any:
    """A study attribute as compared between calls: ``set`` as the keys it sets and their
    values (in any order, a repeated key's last value), without its runtime keys (threads,
    device, ...), which change how a trial runs, not what it computes."""
    if key != "set" or not isinstance(value, list):
        return value
    from aftrec.config import RUNTIME_KEYS

    def runtime(name: str) -> bool:
        return name.partition(".")[2] in RUNTIME_KEYS and name.split(".")[0] in ("train", "runtime")

    pairs = {}
    for pair in map(str, value):
        name, _, raw = pair.partition("=")
        name = name.strip().split(":")[-1]
        if not runtime(name):
            pairs[name] = raw.strip()
    return dict(sorted(pairs.items()))


def _sampler(seed: int, number: int, startup: int) -> optuna.samplers.BaseSampler:
    """Trial ``number``'s sampler: TPE seeded from (seed, number), so a trial's draws do not
    depend on how many calls the study took."""
    import numpy as np

    optuna = _optuna()
    trial_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=startup)


def _draw(trial: optuna.Trial, space: Mapping[str, Range]) -> dict[str, Any]:
    """The trial's settings (a resumed trial gets back the ones it drew)."""
    out: dict[str, Any] = {}
    for key, r in space.items():
        if r.integer:
            out[key] = trial.suggest_int(key, int(r.low), int(r.high), log=r.log)
        else:
            out[key] = trial.suggest_float(key, r.low, r.high, log=r.log)
    return out


def trial_dir(out: Path, number: int) -> Path:
    return Path(out) / TRIALS / _name(number)


def _check_trial_dir(run: Path, cfg: RunConfig, number: int) -> None:
    """Refuse a trial directory trained with other settings than trial ``number`` drew (the
    trials of an older study under a new ``study.db``): resuming it would record its value
    under this trial's settings."""
    from aftrec.config import run_identity
    from aftrec.training import rundir

    if not (run / rundir.LAST).exists():  # never checkpointed: the trial starts it afresh
        return
    # what the run computes: no runtime section, no inert keys, earlier versions' defaults
    saved, asked = (run_identity(c.to_dict()) for c in (rundir.load_run_config(run), cfg))
    differ = sorted(
        f"{section}.{key}"
        for section in saved.keys() | asked.keys()
        for key in saved.get(section, {}).keys() | asked.get(section, {}).keys()
        if saved.get(section, {}).get(key) != asked.get(section, {}).get(key)
    )
    if differ:
        raise ConfigError(
            f"{run} holds a run trained with other settings than trial {_name(number)} drew "
            f"({', '.join(differ)} differ; its config is {run / rundir.CONFIG}): it is not this "
            "study's trial; choose another --out or remove it"
        )


def _train_trial(data: Path, cfg: RunConfig, run: Path) -> TrialOutcome:
    """Train one trial's run to early stopping (resuming a killed one); its best validation
    value is the trial's score."""
    from aftrec.config import runtime_overrides
    from aftrec.training import rundir
    from aftrec.training.trainer import train

    resume = (run / rundir.LAST).exists()
    if not resume:  # nothing to resume: clear what a run killed in its first epoch left
        if run.exists() and not run.is_dir():
            raise OutputError(f"cannot write {run}: it is a file, not a folder")
        make_dirs(run)  # a file where a folder above it should be: one error line
        try:
            rundir.clear(run)
        except OSError as exc:
            raise output_error(run, exc) from exc
    res = train(
        data, None if resume else cfg, run, resume=resume, progress=False,
        resume_set=runtime_overrides(cfg) if resume else None,  # this call's machine
    )  # fmt: skip
    if not math.isfinite(res.best_metric):
        raise TrainingError(f"trial run {run} has no finite validation value")
    # the epochs' wall times over every call that trained the run (a killed one included)
    timed = [e for e in rundir.epoch_log(run) if "train_seconds" in e]
    seconds = sum(e["train_seconds"] + e["valid_seconds"] for e in timed) or res.seconds
    return TrialOutcome(res.best_metric, res.best_epoch, res.epochs_run, res.stopped_early, seconds)


def _settings(params: Mapping[str, Any]) -> str:
    """The drawn settings in a few digits, for the progress line (best.json has them all)."""
    return " ".join(f"{k}={v:.3g}" for k, v in params.items())


def _name(number: int) -> str:
    """A trial's name: its number, as its directory under ``trials/`` spells it."""
    return f"{number:03d}"


def _run_trial(study: optuna.Study, trial: optuna.Trial, st: _Study, budget: int) -> None:
    """Train ``trial`` (new or left running by a killed call) and tell the study."""
    from aftrec.config import resolve

    optuna = _optuna()
    spec = st.spec
    params = _draw(trial, st.space)
    _write_trials(study, st)  # the trial shows as running while it trains, and after a kill
    pairs = [*st.fixed, *(f"{k}={format_value(v)}" for k, v in params.items())]
    cfg = resolve(spec.model, overrides=[*pairs, f"train.seed={spec.seed}"])
    run = trial_dir(Path(spec.out), trial.number)
    _check_trial_dir(run, cfg, trial.number)
    t0 = time.perf_counter()
    try:
        outcome = _train_trial(Path(spec.data), cfg, run)
    except TrainingError as exc:  # a diverging setting (non-finite loss): a failed trial
        error = " ".join(str(exc).split())
        trial.set_user_attr("error", error)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.info(f"trial {_name(trial.number)} [{trial.number + 1}/{budget}] failed: {error}")
        return
    for key, value in dataclasses.asdict(outcome).items():
        if key != "value":
            trial.set_user_attr(key, value)
    study.tell(trial, outcome.value)
    best = study.best_trial
    metric = st.metric.replace("recall@", "r@")
    log.info(
        f"trial {_name(trial.number)} [{trial.number + 1}/{budget}]  valid {metric} "
        f"{outcome.value:.4f}  best {best.value:.4f} (trial {_name(best.number)})  "
        + (f"{outcome.epochs} epoch(s), best {outcome.best_epoch}" if outcome.epochs else "fitted")
        + f"  {outcome.seconds:.1f} s  "
        + _settings(params)
    )


def tune(spec: TuneSpec) -> TuneResult:
    """Run (or continue) the study in ``spec.out`` up to ``spec.trials`` trials; write
    ``trials.csv`` and ``best.json`` after every trial."""
    optuna = _optuna()
    t0 = time.perf_counter()
    st = _check_spec(spec)
    out = Path(spec.out)
    check_writable(out, folder=True)
    # a call killed before it created the study leaves the lock file alone
    if (
        out.is_dir()
        and not (out / STUDY_DB).exists()
        and any(p.name != LOCK for p in out.iterdir())
    ):
        raise ConfigError(f"{out} is not empty and holds no study; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    if st.budget < spec.trials:
        log.info(f"{spec.model} has no tuned settings: one trial is the whole study")
    from sqlalchemy.exc import SQLAlchemyError

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with held(out, LOCK, f"{out}: another `aftrec tune` is working on it"):
            try:
                study = _open_study(spec, st.space)
                ran, best = _continue(study, st)
                trials = len(study.get_trials(deepcopy=False))
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
                # a write of the study failed: a read-only file, a full disk
                raise _study_error(out / STUDY_DB, exc) from exc
    finally:
        optuna.logging.set_verbosity(verbosity)
    return TuneResult(out, ran, trials, best, time.perf_counter() - t0)


def _continue(study: optuna.Study, st: _Study) -> tuple[int, dict[str, Any] | None]:
    """Finish the trials left running, then run new ones up to the budget; the trials run
    and ``best.json``."""
    optuna = _optuna()
    spec, budget, out = st.spec, st.budget, Path(st.spec.out)
    ran = 0
    running = optuna.trial.TrialState.RUNNING
    for frozen in study.get_trials(deepcopy=False, states=(running,)):
        log.info(f"trial {_name(frozen.number)}: left running by a killed call; finishing it")
        study.sampler = _sampler(spec.seed, frozen.number, spec.startup_trials)
        trial = optuna.trial.Trial(study, frozen._trial_id)
        _run_trial(study, trial, st, max(budget, len(study.trials)))
        ran += 1
        write_outputs(study, st)
    have = len(study.get_trials(deepcopy=False))
    if have >= budget and not ran:
        log.info(f"{out}: the study holds {have} trial(s), the budget is {budget}")
    while len(study.get_trials(deepcopy=False)) < budget:
        number = len(study.get_trials(deepcopy=False))
        study.sampler = _sampler(spec.seed, number, spec.startup_trials)
        trial = study.ask()
        if trial.number != number:  # trial numbers are the study's order
            raise ConfigError(f"{out}: trial {trial.number} was not expected")
        _run_trial(study, trial, st, budget)
        ran += 1
        write_outputs(study, st)
    return ran, write_outputs(study, st)


def _write_trials(study: optuna.Study, st: _Study) -> list[optuna.trial.FrozenTrial]:
    """``trials.csv``, written atomically (a trial under way, or left by a killed call, is
    ``running``); returns the study's trials."""
    import pandas as pd

    space = st.space
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "best_epoch": t.user_attrs.get("best_epoch"),
            "epochs": t.user_attrs.get("epochs"),
            "stopped_early": t.user_attrs.get("stopped_early"),
            "seconds": t.user_attrs.get("seconds"),
            **{k: t.params.get(k) for k in space},
            "error": t.user_attrs.get("error", ""),
        }
        for t in trials
    ]
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    atomic_write_text(Path(st.spec.out) / TRIALS_CSV, buf.getvalue())
    return trials


def write_outputs(study: optuna.Study, st: _Study) -> dict[str, Any] | None:
    """``trials.csv`` and, once a trial has finished, ``trials.png`` and ``best.json``
    (returned)."""
    optuna = _optuna()
    spec, space = st.spec, st.space
    trials = _write_trials(study, st)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    points = [
        (t.number, t.value if t.state == optuna.trial.TrialState.COMPLETE else None)
        for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    ]
    study_plot({spec.model: points}, spec.startup_trials, f"valid {st.metric}",
               Path(spec.out) / TRIALS_PNG)  # fmt: skip
    best = study.best_trial
    params = {k: best.params[k] for k in space}
    payload = {
        "model": spec.model,
        "data": str(Path(spec.data).resolve()),
        "metric": f"valid {st.metric}",
        "best_value": best.value,
        "best_trial": best.number,
        "best_epoch": best.user_attrs.get("best_epoch"),
        "overrides": [*registration(spec.model).tune_fixed]
        + [f"{k}={format_value(v)}" for k, v in params.items()],
        "params": params,
        "trials": len(trials),
        "complete": len(done),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        "seed": spec.seed,
        "set": list(spec.overrides),
        "space": space_json(space),
        "startup_trials": spec.startup_trials,
        "drawn_at_random": sorted(drawn_at_random(points, spec.startup_trials)),
        "sampler": f"TPE (optuna {optuna.__version__}), {spec.startup_trials} random startup "
        "trials, trial n seeded from (seed, n)",
    }
    atomic_write_text(Path(spec.out) / BEST, json.dumps(payload, indent=2) + "\n")
    return payload


#: a trial's number and value (None: the trial failed)
TrialPoint = tuple[int, float | None]


def trial_points(study_dir: Path) -> list[TrialPoint]:
    """The finished and failed trials of the study in ``study_dir``, read from its
    ``trials.csv``, by number (a running trial has no value yet and is left out)."""
    import pandas as pd

    path = Path(study_dir) / TRIALS_CSV
    try:
        rows = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the study's trials ({e})") from e
    points: list[TrialPoint] = []
    try:
        for number, state, value in zip(rows["trial"], rows["state"], rows["value"], strict=True):
            if float(number) != int(number):
                raise ValueError(f"trial number {number}")
            if state == "complete":
                points.append((int(number), float(value)))
            elif state == "fail":
                points.append((int(number), None))
    except KeyError as e:
        raise ConfigError(f"{path}: not a trials.csv of `aftrec tune` (no {e} column)") from e
    except (ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{path}: not a trials.csv of `aftrec tune` ({e})") from e
    return sorted(points)


def best_so_far(points: Sequence[TrialPoint]) -> list[tuple[int, float]]:
    """The trials, in number order, whose value beat every earlier trial's: where the best so
    far steps up (failed trials never do)."""
    steps: list[tuple[int, float]] = []
    for n, v in sorted(points):
        if v is not None and (not steps or v > steps[-1][1]):
            steps.append((n, v))
    return steps


def drawn_at_random(points: Sequence[TrialPoint], startup: int) -> frozenset[int]:
    """The trials TPE drew at random: trial n is one when fewer than ``startup`` trials before
    it finished (TPE counts finished trials, so a failed start trial makes the random start
    one trial longer).

    With f(n) = |{m < n : trial m finished}|, the set is {n : f(n) < startup}."""
    out: set[int] = set()
    finished = 0
    for n, v in sorted(points):
        if finished < startup:
            out.add(n)
        finished += v is not None
    return frozenset(out)


def study_startup(study_dir: Path) -> int:
    """The random-start trials of the study in ``study_dir`` (its ``best.json``; studies
    written before it recorded them ran with the default)."""
    try:
        obj = json.loads((Path(study_dir) / BEST).read_text())
    except (OSError, ValueError):
        return STARTUP_TRIALS
    return int(obj.get("startup_trials", STARTUP_TRIALS))


def study_plot(
    studies: Mapping[str, Sequence[TrialPoint]],
    startup: int | Mapping[str, int],
    metric: str,
    path: Path,
) -> bool:
    """One panel per study: each trial's value by trial number (hollow: the first
    trials until ``startup`` of them finished, drawn at random (:func:`drawn_at_random`), one
    count for all or one per study; filled: drawn by TPE), the best so far as a step line,
    and a failed trial as a cross on the panel's floor. A panel's floor is 0.08 below its
    best value or its lowest value, whichever is higher, so that the top trials stay
    readable; a trial below the floor is a triangle on it. One legend names every kind of
    mark of every panel, right of the panels, where it covers no trial. Written atomically
    as PNG. False (nothing written) when no study has a finished trial."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = {name: pts for name, pts in studies.items() if any(v is not None for _, v in pts)}
    if not shown:
        return False
    cols = min(len(shown), 4)
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.2 * cols + 1.1, 2.5 * rows), dpi=110)  # + the legend's margin
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, pts) in zip(axes, shown.items(), strict=False):
        at_random = drawn_at_random(pts, startup if isinstance(startup, int) else startup[name])
        values = [v for _, v in pts if v is not None]
        best = max(values)
        floor = max(min(values), best - 0.08)
        pad = 0.05 * ((best - floor) or 0.01)
        for random_start in (True, False):
            shown_pts = [(n, v) for n, v in pts if v is not None and v >= floor]
            mine = [(n, v) for n, v in shown_pts if (n in at_random) == random_start]
            if mine:
                ax.scatter(
                    *zip(*mine, strict=True), s=22, edgecolors="C0",
                    facecolors="none" if random_start else "C0",
                    label="random start" if random_start else "TPE",
                )  # fmt: skip
        low = [(n, floor) for n, v in pts if v is not None and v < floor]
        if low:
            ax.scatter(*zip(*low, strict=True), marker="v", s=26, color="C1", label="below")
        failed = [n for n, v in pts if v is None]
        if failed:
            ax.scatter(failed, [floor] * len(failed), marker="x", color="C3", label="failed")
        steps = best_so_far(pts)
        last = max(n for n, _ in pts)
        xs_best = [n for n, _ in steps] + [last]
        ys_best = [max(v, floor) for _, v in steps] + [steps[-1][1]]
        ax.step(xs_best, ys_best, where="post", color="C2", linewidth=1.5, label="best so far")
        ax.set_title(f"{name}: {best:.4f} (trial {steps[-1][0]})", fontsize="medium")
        ax.set_ylim(floor - pad, best + pad)
        ax.set_xlim(-0.5, max(last, 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial", fontsize="small")
        ax.set_ylabel(metric, fontsize="small")
        ax.tick_params(labelsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    # one legend for every panel, right of the first row: inside a panel it hid trials
    kinds: dict[str, Any] = {}
    for ax in axes[: len(shown)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            kinds.setdefault(label, handle)
    order = ["random start", "TPE", "below", "failed", "best so far"]
    labels = sorted(kinds, key=order.index)
    axes[min(cols, len(shown)) - 1].legend(
        [kinds[k] for k in labels], labels, fontsize="x-small", loc="upper left",
        bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0,
    )  # fmt: skip
    write_png(fig, path)
    return True


@dataclass(frozen=True)
class Tuned:
    """A model's tuned settings, as ``best.json`` holds them, for ``aftrec reproduce``."""

    model: str
    path: Path  # the best.json
    data: str  # the dataset the study ran on (resolved path)
    overrides: tuple[str, ...]  # the --set pairs its runs take
    trials: int  # the trial budget the study ran
    complete: int
    seed: int
    metric: str
    best_value: float
    best_trial: int = -1  # the winning trial's number; -1 where best.json does not say
    startup_trials: int = 0  # trials drawn at random before TPE; 0 where not recorded
    #: the trials drawn at random (:func:`drawn_at_random`); None where best.json does not say
    at_random: frozenset[int] | None = None

    @property
    def random_start(self) -> int:
        """How many trials were drawn at random (before best.json listed them: the first
        ``startup_trials``, which holds while no start trial failed)."""
        if self.at_random is not None:
            return len(self.at_random)
        return min(self.startup_trials, self.trials)

    @property
    def best_from_start(self) -> bool:
        """Whether the winning trial was one of the random start's draws."""
        if self.best_trial < 0:
            return False
        if self.at_random is not None:
            return self.best_trial in self.at_random
        return self.best_trial < self.startup_trials


def read_best(path: Path) -> Tuned:
    """A tuning directory's ``best.json`` (``path`` is the directory or the file)."""
    path = Path(path)
    file = path / BEST if path.is_dir() else path
    try:
        obj = json.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"--tuned {path}: no {BEST} there ({exc.strerror})") from exc
    except ValueError as exc:
        raise ConfigError(f"--tuned {path}: {file} is not a best.json of `aftrec tune`") from exc
    bad = _bad_best(obj) if isinstance(obj, dict) else ["not a JSON object"]
    if bad:
        raise ConfigError(
            f"--tuned {path}: {file} is not a best.json of `aftrec tune` ({', '.join(bad)})"
        )
    return Tuned(
        model=obj["model"],
        path=file,
        data=obj["data"],
        overrides=tuple(obj["overrides"]),
        trials=obj["trials"],
        complete=obj["complete"],
        seed=obj["seed"],
        metric=obj["metric"],
        best_value=float(obj["best_value"]),
        best_trial=obj.get("best_trial", -1),
        startup_trials=obj.get("startup_trials", 0),
        at_random=frozenset(obj["drawn_at_random"]) if "drawn_at_random" in obj else None,
    )


def _bad_best(obj: dict[str, Any]) -> list[str]:
    """What is wrong with a ``best.json``: the keys missing, or holding another type or a
    value :func:`write_outputs` never writes (a budget below 1, a negative count)."""

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def strings(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(p, str) for p in v)

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    need = {"model": lambda v: isinstance(v, str), "data": lambda v: isinstance(v, str),
            "metric": lambda v: isinstance(v, str), "overrides": strings, "trials": integer,
            "complete": integer, "seed": integer, "best_value": number}  # fmt: skip
    may = {"best_trial": integer, "startup_trials": integer,
           "drawn_at_random": lambda v: isinstance(v, list) and all(map(integer, v))}  # fmt: skip
    wrong = [f"no {k}" for k in need if k not in obj] + [
        f"bad {k}" for k, ok in {**need, **may}.items() if k in obj and not ok(obj[k])
    ]
    if wrong:
        return wrong
    least = {"trials": 1, "complete": 0, "seed": 0, "startup_trials": 1, "best_trial": 0}
    low = [f"bad {k}" for k, least_value in least.items() if k in obj and obj[k] < least_value]
    if any(v < 0 for v in obj.get("drawn_at_random", [])):
        low.append("bad drawn_at_random")
    return low


__all__ = ["TuneResult", "TuneSpec", "Tuned", "read_best", "tune"]
