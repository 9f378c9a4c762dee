"""``aftrec reproduce``: every model on every seed, then the paper's tables in one report.

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao et al., KDD 2021),
section 5: Tables 2 and 3 (Recall@N per domain), Table 4 (AUC per domain), Table 6 (ablations
of AFT) and Fig. 3 (AFT against the mask ratio and the number of fake items), recomputed on
one prepared dataset with the same trainer and the same full-ranking evaluator for every model.

The steps, one module each: :mod:`.plan` (which runs, their configs and the report's rows),
:mod:`.execute` (train and evaluate the unfinished runs, with ``--jobs`` each in a process),
:mod:`.stats` (significance tests, pure functions), :mod:`.report` (``report.md``,
``results.json``, the Fig. 3 PNGs); :mod:`.results` holds the types they share. This module
ties them together and registers the command.

Resuming: finished runs are reused and half-trained ones resumed, so a long reproduction can
be spread over several sittings; ``--report-only`` trains nothing and writes the report from
the finished runs, listing the others as not run yet (the report directory holds everything
needed except the checkpoints of unfinished runs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.errors import AftrecError, CheckpointError, ConfigError, DataError
from aftrec.experiments.execute import _fmt_duration, execute
from aftrec.experiments.plan import ALPHA, DEFAULT_SEEDS, Plan, ReproduceSpec, make_plan
from aftrec.experiments.results import (
    EntryResult,
    Results,
    RunOutcome,
    Summary,
    auc_columns,
    recall_columns,
)
from aftrec.experiments.stats import ablation_tests, seed_averaged_per_user, significance
from aftrec.outputs import held, path_argument

if TYPE_CHECKING:
    import pandas as pd

    from aftrec.data.dataset import Dataset

# Only the standard library at import time: ``aftrec --help`` builds this command's parser.
# numpy, pandas, torch and scipy are imported where they are used.


def collect(plan: Plan, outcomes: dict[Path, RunOutcome]) -> dict[str, EntryResult]:
    return {
        key: EntryResult(
            entry,
            entry.model in plan.deterministic,
            {s: outcomes[plan.runs[(key, s)]] for s in plan.seeds[key]},
        )
        for key, entry in plan.entries.items()
    }


LOCK = "reproduce.lock"  # held while a call works on REPORT_DIR


def report_lock(out: Path) -> AbstractContextManager[None]:
    """Hold ``out/reproduce.lock`` (``out`` exists) for the block, or raise
    :class:`~aftrec.errors.OutputError`: one ``aftrec reproduce`` or ``aftrec demo`` at a
    time works on a report, since both would train the same runs."""
    # `aftrec demo` works on its folder through this lock too: the lock cannot say which
    busy = (
        f"{out}: another aftrec process (`aftrec reproduce` or `aftrec demo`) is working "
        "on this report"
    )
    return held(out, LOCK, busy)


def reproduce(spec: ReproduceSpec, *, locked: bool = False) -> Summary:
    """Train and evaluate every planned run, then write ``REPORT_DIR/report.md``. One call at
    a time works on a report (``REPORT_DIR/reproduce.lock``); a second is refused. ``locked``:
    the caller holds :func:`report_lock` already (``aftrec demo``, from its first step)."""
    from aftrec.data.dataset import Dataset
    from aftrec.environment import environment

    started_wall = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t0 = time.perf_counter()
    data = Dataset(Path(spec.data))  # fails up front on a bad --data
    if "average" in data.info.domains:  # the report's columns name it for the mean
        raise DataError(
            f"{spec.data}: a domain is named 'average', the name of the report's mean over "
            "domains; prepare the data again with that domain renamed"
        )
    plan = make_plan(spec)
    check_report_dir(Path(spec.out))
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    env = environment()  # before training: the load average of the machine we were given
    with nullcontext() if locked else report_lock(Path(spec.out)):
        return _report(spec, data, plan, env, started_wall, t0)


#: what ``aftrec reproduce`` writes into a report directory: the lock before anything else
#: (reports of versions before the lock hold the other two); and ``aftrec demo``'s folder,
#: which holds its prepared dataset in ``data/`` before its report
REPORT_MARKERS = (LOCK, "results.json", "data/meta.json")

#: files that mark a folder as another command's output: a prepared dataset, a run, a
#: bundle, a tuning study; a report directory holds them only below ``runs/``
FOREIGN = {"meta.json": "a prepared dataset", "run.json": "a run", "manifest.json": "a bundle",
           "study.db": "a tuning study"}  # fmt: skip


def _holds_report_runs(out: Path) -> bool:
    """Whether ``out/runs`` holds a run of a report (``runs/MODEL[/VARIANT]/seedN`` with its
    ``reproduce.json``, written before it trains): a report of a version before the lock,
    killed before its results. Not any ``runs/`` (TensorBoard's folder has that name)."""
    runs = out / "runs"
    return runs.is_dir() and any(
        next(runs.glob(pattern), None) is not None
        for pattern in ("*/seed*/reproduce.json", "*/*/seed*/reproduce.json")
    )


def check_report_dir(out: Path) -> None:
    """``--out`` is new, empty or a report directory; a dataset, run, bundle or study, or any
    other folder with files in it, is refused before anything is written into it."""
    from aftrec.outputs import check_writable, is_temporary

    check_writable(out, folder=True)
    for marker, kind in FOREIGN.items():
        if (out / marker).is_file():
            raise ConfigError(f"{out} is {kind}, not a report directory; choose another --out")
    if (
        out.is_dir()
        and any(not is_temporary(p) for p in out.iterdir())  # a killed writer's are deleted
        and not any((out / name).exists() for name in REPORT_MARKERS)
        and not _holds_report_runs(out)
    ):
        raise ConfigError(
            f"{out} is not empty and is not a report directory (no {LOCK}, results.json or "
            "report runs in runs/ there, nor a demo's data/); choose a new or empty --out"
        )


def _report(
    spec: ReproduceSpec,
    data: Dataset,
    plan: Plan,
    env: dict[str, Any],
    started_wall: str,
    t0: float,
) -> Summary:
    """Train what the plan still needs, then write the report (under the report's lock)."""
    from aftrec.experiments.report import write_report

    outcomes = execute(plan)
    entries = collect(plan, outcomes)
    main_rows = list(plan.models)
    cache: dict[str, pd.DataFrame | None] = {}

    def per_user(key: str) -> pd.DataFrame | None:
        if key not in cache:
            frames = [read_per_user(run) for run in entries[key].runs()]
            cache[key] = seed_averaged_per_user(frames) if frames else None
        return cache[key]

    def per_user_on(key: str, seeds: Sequence[int]) -> pd.DataFrame | None:
        runs = sorted({entries[key].outcomes[s].run for s in seeds})
        frames = [read_per_user(run) for run in runs]
        return seed_averaged_per_user(frames) if frames else None

    columns = [*recall_columns(data.info.domains), *auc_columns(data.info.domains)]
    sig = significance(entries, main_rows, columns, per_user)
    averages = [c for c in columns if c.domain == "average"]
    ablated = ablation_tests(entries, plan.ablations, averages, per_user_on)
    fresh = [o for o in outcomes.values() if o.trained_now]
    waiting = sum(o.pending for o in outcomes.values())
    results = Results(
        plan=plan,
        data=data,
        entries=entries,
        significance=sig,
        environment=env,
        started=started_wall,
        wall_seconds=time.perf_counter() - t0,
        trained=sum(o.ok for o in fresh),  # a run that failed now is counted as failed only
        reused=len(outcomes) - len(fresh) - waiting,
        failed=sum(not o.ok and not o.pending for o in outcomes.values()),
        pending=waiting,
        ablation_tests=ablated,
    )
    report = write_report(results)
    return Summary(
        report,
        results.trained,
        results.reused,
        results.failed,
        results.wall_seconds,
        results.pending,
    )


def read_per_user(run: Path) -> pd.DataFrame:
    """A finished run's ``per_user.parquet``; a damaged one is one error naming it (one that
    reads but lacks rows or the metrics of ``metrics.json`` too: its tests would pair fewer
    users than the tables count, or none)."""
    import pandas as pd

    from aftrec.experiments.plan import read_json

    path = run / "per_user.parquet"
    metrics = read_json(run / "metrics.json") or {}
    users: dict[str, Any] = metrics.get("users") or {}
    average: dict[str, Any] = metrics.get("average") or {}
    if not isinstance(users, dict) or not isinstance(average, dict):
        users, average = {}, {}
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors are both
        reason = " ".join(str(exc).split())
    else:
        kept = [k for k in average if k == "auc" or k.startswith("recall@")]  # as written
        missing = sorted({"user_idx", "domain", *kept} - set(frame.columns))
        rows = sum(int(v) for v in users.values() if isinstance(v, int))
        if missing:
            reason = f"no {', '.join(missing)} column(s)"
        elif users and len(frame) != rows:
            reason = f"{len(frame)} rows where metrics.json counts {rows} (user, domain) cases"
        else:
            return frame
    raise CheckpointError(
        f"{path}: cannot read the run's test values per user ({reason}); remove it and run "
        "the same command: it evaluates the run again"
    )


def spec_from_args(args: argparse.Namespace) -> ReproduceSpec:
    """The :class:`ReproduceSpec` of a parsed ``aftrec reproduce`` command line."""
    return ReproduceSpec(
        data=Path(args.data),
        out=Path(args.out),
        seeds=args.seeds,
        models=tuple(args.models or ()),
        quick=args.quick,
        overrides=tuple(args.set),
        ablations="ablations" not in args.skip,
        sweeps="sweeps" not in args.skip,
        sweep_seeds=args.sweep_seeds,
        ablation_seeds=args.ablation_seeds,
        alpha=args.alpha,
        progress=not args.quiet,
        jobs=args.jobs,
        report_only=args.report_only,
        tuned=tuple(args.tuned),
        model_seeds=tuple(args.model_seeds),
        hours=args.hours,
    )


class RunsFailed(AftrecError):
    """Some runs of a reproduction failed (the report was written all the same)."""

    exit_code = 1


def _run(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    res = reproduce(spec)
    print(
        f"wrote {res.report}: {res.trained} run(s) trained, {res.reused} reused, "
        f"{res.failed} failed"
        + (f", {res.pending} not run yet" if res.pending else "")
        + f", {_fmt_duration(res.seconds)}"
    )
    if res.failed:  # the report is written; the exit code says it is not whole
        again = "the same command without --report-only" if spec.report_only else "the same command"
        raise RunsFailed(
            f"{res.failed} run(s) failed; {res.report} lists them under Failures, and {again} "
            "retries them"
        )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``aftrec reproduce`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "reproduce",
        help="train every model on every seed; the paper's Tables 2/3, 4, 6 and Fig. 3",
        description=(
            "Train and evaluate every model on every seed, the ablations and the Fig. 3 sweeps "
            "of AFT, and write REPORT_DIR/report.md. Finished runs in REPORT_DIR are reused, "
            "half-trained ones resumed."
        ),
    )
    p.add_argument("--data", type=path_argument, required=True, help="a prepared dataset directory")
    p.add_argument(
        "--out", type=path_argument, required=True, metavar="REPORT_DIR",
        help="the report's folder: new, empty, or one this command wrote (it goes on)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, default=None, help=f"seeds 0..S-1 (default {DEFAULT_SEEDS}; quick: 1)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        action="extend",
        metavar="MODEL",
        help="default: every registered model, aft first",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, one epoch of 4 batches, 1 seed, 3 points per sweep (minutes; CI)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="[MODEL:]KEY=VALUE",
        help="config overrides for every model (model.* keys: models that have the key), "
        "or for one model with a MODEL: prefix, e.g. train.threads=1 aft:model.n_fakes=3",
    )
    p.add_argument(
        "--tuned",
        nargs="+",
        action="extend",
        type=path_argument,
        default=[],
        metavar="DIR",
        help="`aftrec tune` directories (or their best.json), one per model: each model's "
        "runs take its tuned settings (before --set); the report lists them and the trial "
        "budgets",
    )
    p.add_argument(
        "--model-seeds",
        nargs="+",
        action="extend",
        default=[],
        metavar="MODEL=S",
        help="a main row on seeds 0..S-1 instead of --seeds, e.g. aft=5 aft-d=5 "
        "(the ablations and sweeps keep theirs)",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        default=[],
        choices=["ablations", "sweeps"],
        help="leave out Table 6 and/or Fig. 3",
    )
    p.add_argument(
        "--sweep-seeds",
        type=int,
        default=None,
        metavar="S",
        help="seeds per Fig. 3 point (default: --seeds)",
    )
    p.add_argument(
        "--ablation-seeds",
        type=int,
        default=None,
        metavar="S",
        help="seeds per Table 6 ablation (default: --seeds)",
    )
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level (0.01)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="runs trained at once, one process each, cores // J torch threads unless "
        "train.threads is set (default 1)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the finished runs, list the others",
    )
    p.add_argument(
        "--hours", type=float, default=None, metavar="H",
        help="start only runs expected to end within H hours (each model's longest finished "
        "run in REPORT_DIR, less what the run has logged; with none finished, a half-trained "
        "run's mean epoch times the epochs left to the cap, and a new run waits): for a "
        "sitting of known length, so that nothing is cut part-way",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


__all__ = ["ReproduceSpec", "Summary", "add_parser", "make_plan", "reproduce"]
