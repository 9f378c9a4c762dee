"""``aftrec reproduce``: every model on every seed, then the paper's tables in one report.

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao et al., KDD 2021),
section 5: Tables 2 and 3 (Recall@N per domain), Table 4 (AUC per domain), Table 6 (ablations
of AFT) and Fig. 3 (AFT against the mask ratio and the number of fake items), recomputed on
one prepared dataset with the same trainer and the same full-ranking evaluator for every model.

Layout of ``REPORT_DIR``::

    report.md, results.json, fig3a_mask_ratio.png, fig3b_n_fakes.png
    runs/MODEL/seedS/               one training run (trainer layout) plus
        reproduce.json              the requested config and the wall times
        per_user.parquet            test metrics per (user, domain)
        metrics.json                test metrics per domain; written last: "this run is done"
    runs/aft/VARIANT/seedS/         ablations (no-generator, ...) and sweep points (mask-0.05, ...)

Resuming: a run whose ``metrics.json`` exists is read, not trained; a run with ``last.pt``
goes through the trainer's resume path; a run directory made with another config stops the
command up front (choose another ``--out``). Runs that resolve to the same config (the
default mask ratio of the sweep and ``aft`` itself, mask ratio 0 and the "no mask" ablation)
share one directory. Deterministic models (``trainable = False``: pop, EASE) run once and that
run stands for every seed.

Order and parallelism: unfinished runs go seed by seed (every model's seed 0 first), so a
report cut short still covers every model. ``--jobs J`` trains J runs at once, each in its own
process with ``cores // J`` torch threads unless ``train.threads`` is set. ``--report-only``
trains nothing and writes the report from the finished runs; the others are listed as not run
yet. Together with resuming this lets a long reproduction be spread over several sittings
(the report directory holds everything needed except the checkpoints of unfinished runs).

``--quick`` (the CI configuration): one seed, one epoch of 4 batches of 64, history 8,
patience 1, and tiny models (each registration's ``quick`` overrides: dim 16, one layer, two
heads, ...; EASE fits one L2 value), every registered model
unless ``--models`` says otherwise, Fig. 3 on 3 points each (mask 0, 0.15, 0.5; fakes 1, 5,
20; two of them shared with other runs). About 10 s for every model on the tests' tiny data
on 2 cores; the numbers are a smoke test, not results.

Statistics (``aft`` against the best other model per column, by mean over seeds):

* over users: Wilcoxon signed-rank test, two-sided, on the per-user values averaged over the
  seeds (pairs: the (user, domain) test cases of the column's domain; for the ``average``
  column every (user, domain) case). Recall per user is bounded and has many ties, so a
  rank test rather than a t-test; zero differences are dropped (``zero_method="wilcox"``).
* over seeds: paired t-test (``scipy.stats.ttest_rel``) on the per-seed column values,
  paired by seed; needs two seeds or more.

A test is significant when ``p < alpha`` (0.01, as in the paper) and the mean paired
difference favours ``aft``; no correction for the number of columns (the paper makes none).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec import __version__
from aftrec.errors import ConfigError
from aftrec.evaluation.report import Cell, Column
from aftrec.registry import available_models, model_config_class, registration

if TYPE_CHECKING:
    import pandas as pd

    from aftrec.config import RunConfig
    from aftrec.data.dataset import Dataset

# Only the standard library at import time: ``aftrec --help`` builds this command's parser.
# numpy, pandas, torch and scipy are imported where they are used.

log = logging.getLogger(__name__)

NS = (20, 50, 200)  # every run is evaluated at these N (full ranking)
ALPHA = 0.01
PRIMARY = "aft"
DEFAULT_SEEDS = 5

MASK_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # Fig. 3 (a)
N_FAKES = (1, 3, 5, 10, 15, 20)  # Fig. 3 (b)
QUICK_MASK_RATIOS = (0.0, 0.15, 0.5)
QUICK_N_FAKES = (1, 5, 20)

#: Table 6: (variant directory, row label, overrides on top of ``aft``'s config)
ABLATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("no-generator", "- generator", ("model.negatives=random",)),
    ("no-mask", "- domain-specific mask", ("model.mask_ratio=0.0",)),
    ("no-translation", "- feature translation", ("model.translation=attention",)),
    ("no-dissimilarity", "- dissimilarity loss", ("model.lambda_m=0.0",)),
)

#: ``--quick``: one short epoch on small batches ...
QUICK_TRAIN = (
    "train.epochs=1",
    "train.max_batches_per_epoch=4",
    "train.batch_size=64",
    "train.patience=1",
    "data.history_len=8",
)
# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ReproduceSpec:
    """What ``aftrec reproduce`` was asked for."""

    data: Path
    out: Path
    seeds: int | None = None  # None: 5, or 1 with quick
    models: tuple[str, ...] = ()  # empty: every registered model, aft first
    quick: bool = False
    overrides: tuple[str, ...] = ()  # "[MODEL:]section.key=value"
    ablations: bool = True
    sweeps: bool = True
    sweep_seeds: int | None = None  # None: the same as seeds
    ablation_seeds: int | None = None  # None: the same as seeds
    alpha: float = ALPHA
    progress: bool = True
    jobs: int = 1  # runs trained at once, one process each
    report_only: bool = False  # train nothing; report the finished runs

    @property
    def n_seeds(self) -> int:
        return self.seeds if self.seeds is not None else (1 if self.quick else DEFAULT_SEEDS)

    @property
    def n_sweep_seeds(self) -> int:
        return min(self.sweep_seeds or self.n_seeds, self.n_seeds)

    @property
    def n_ablation_seeds(self) -> int:
        return min(self.ablation_seeds or self.n_seeds, self.n_seeds)

    def command(self) -> str:
        """An ``aftrec reproduce`` command line equivalent to this spec."""
        argv = ["aftrec", "reproduce", "--data", str(self.data), "--out", str(self.out)]
        if self.seeds is not None:
            argv += ["--seeds", str(self.seeds)]
        if self.models:
            argv += ["--models", *self.models]
        if self.quick:
            argv.append("--quick")
        skip = [n for n, on in (("ablations", self.ablations), ("sweeps", self.sweeps)) if not on]
        if skip:
            argv += ["--skip", *skip]
        if self.sweep_seeds is not None:
            argv += ["--sweep-seeds", str(self.sweep_seeds)]
        if self.ablation_seeds is not None:
            argv += ["--ablation-seeds", str(self.ablation_seeds)]
        if self.alpha != ALPHA:
            argv += ["--alpha", str(self.alpha)]
        if self.jobs != 1:
            argv += ["--jobs", str(self.jobs)]
        if self.overrides:
            argv += ["--set", *self.overrides]
        return shlex.join(argv)


@dataclass(frozen=True)
class Entry:
    """One row of a table: a model, or a variant of ``aft`` (``aft/no-mask``)."""

    key: str
    model: str
    label: str
    overrides: tuple[str, ...] = ()


@dataclass
class Job:
    """One training run: a unique (config, seed), possibly shared by several entries."""

    run: Path
    cfg: RunConfig
    model: str
    entries: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Plan:
    spec: ReproduceSpec
    models: list[str]
    entries: dict[str, Entry]
    jobs: dict[Path, Job]
    runs: dict[tuple[str, int], Path]  # (entry key, seed) -> run directory
    seeds: dict[str, list[int]]  # entry key -> seeds it is reported over
    deterministic: set[str]
    ablations: list[str]  # entry keys, Table 6 order (aft first)
    mask_points: list[tuple[float, str]]
    fake_points: list[tuple[int, str]]
    overrides: dict[str, list[str]]  # model -> the --set pairs of its runs (before variants)
    notes: list[str]


def _parse_overrides(pairs: Iterable[str]) -> list[tuple[str | None, str]]:
    """``"aft:model.dim=32"`` -> ``("aft", "model.dim=32")``; no prefix: every model."""
    out: list[tuple[str | None, str]] = []
    for pair in pairs:
        target, colon, rest = pair.partition(":")
        if colon and "=" not in target:
            out.append((target, rest))
        else:
            out.append((None, pair))
    return out


def _model_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(model_config_class(name))}


def _is_deterministic(name: str) -> bool:
    return registration(name).deterministic


def default_models() -> list[str]:
    names = available_models()
    return [PRIMARY, *(n for n in names if n != PRIMARY)] if PRIMARY in names else names


def check_models(models: Sequence[str]) -> list[str]:
    """The requested model names in order, or :class:`ConfigError` naming the unknown ones."""
    known = available_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ConfigError(
            f"unknown model(s) {', '.join(unknown)} in --models; available: {', '.join(known)}"
        )
    dupes = sorted({m for m in models if list(models).count(m) > 1})
    if dupes:
        raise ConfigError(f"--models names {', '.join(dupes)} more than once")
    return list(models)


def model_overrides(model: str, quick: bool, user: Sequence[tuple[str | None, str]]) -> list[str]:
    """The ``--set`` pairs for one model: quick settings, then the user's (``model.*`` keys
    only where the model's config has them, unless the pair names the model)."""
    fields = _model_fields(model)
    out: list[str] = []
    if quick:
        out += QUICK_TRAIN
        out += [f"model.{k}={v}" for k, v in registration(model).quick.items()]
    for target, pair in user:
        if target is not None and target != model:
            continue
        section, _, name = pair.partition("=")[0].strip().partition(".")
        if section == "model" and target is None and name not in fields:
            continue
        out.append(pair)
    return out


def _check_user_overrides(user: Sequence[tuple[str | None, str]], models: Sequence[str]) -> None:
    for target, pair in user:
        key = pair.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if target is not None and target not in models:
            raise ConfigError(f"--set {target}:{pair}: {target!r} is not among the models run")
        if key == "train.seed":
            raise ConfigError("--set train.seed: reproduce sets the seed of each run; use --seeds")
        if (
            section == "model"
            and target is None
            and not any(name in _model_fields(m) for m in models)
        ):
            raise ConfigError(f"--set {pair}: no model run has a config key model.{name}")


def _fmt_point(x: float) -> str:
    return f"{x:g}"


def make_plan(spec: ReproduceSpec) -> Plan:
    """Resolve every run's config and check existing run directories, before training."""
    from aftrec.config import resolve

    if spec.n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {spec.n_seeds}")
    for flag, value in (
        ("--sweep-seeds", spec.sweep_seeds),
        ("--ablation-seeds", spec.ablation_seeds),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not 0 < spec.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {spec.alpha}")
    if spec.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {spec.jobs}")
    models = check_models(spec.models) if spec.models else default_models()
    user = _parse_overrides(spec.overrides)
    _check_user_overrides(user, models)
    notes: list[str] = []

    entries: dict[str, Entry] = {m: Entry(m, m, m) for m in models}
    seeds = {m: list(range(spec.n_seeds)) for m in models}
    ablations: list[str] = []
    mask_points: list[tuple[float, str]] = []
    fake_points: list[tuple[int, str]] = []
    has_primary = PRIMARY in models
    if not has_primary and (spec.ablations or spec.sweeps):
        notes.append(f"`{PRIMARY}` is not among the models: no ablations, no Fig. 3.")
    if has_primary and spec.ablations:
        ablations.append(PRIMARY)
        for variant, label, over in ABLATIONS:
            key = f"{PRIMARY}/{variant}"
            entries[key] = Entry(key, PRIMARY, label, over)
            seeds[key] = list(range(spec.n_ablation_seeds))
            ablations.append(key)
    if has_primary and spec.sweeps:
        sweep_seeds = list(range(spec.n_sweep_seeds))
        ratios = QUICK_MASK_RATIOS if spec.quick else MASK_RATIOS
        fakes = QUICK_N_FAKES if spec.quick else N_FAKES
        for r in ratios:
            key = f"{PRIMARY}/mask-{_fmt_point(r)}"
            entries[key] = Entry(key, PRIMARY, f"mask ratio {r:g}", (f"model.mask_ratio={r}",))
            seeds[key] = sweep_seeds
            mask_points.append((r, key))
        for k in fakes:
            key = f"{PRIMARY}/fakes-{k}"
            entries[key] = Entry(key, PRIMARY, f"{k} fake items", (f"model.n_fakes={k}",))
            seeds[key] = sweep_seeds
            fake_points.append((k, key))

    deterministic = {m for m in models if _is_deterministic(m)}
    base = {m: model_overrides(m, spec.quick, user) for m in models}
    jobs: dict[Path, Job] = {}
    by_config: dict[str, Path] = {}
    runs: dict[tuple[str, int], Path] = {}
    root = Path(spec.out) / "runs"
    for key, entry in entries.items():
        for seed in seeds[key]:
            run_seed = 0 if entry.model in deterministic else seed
            pairs = [*base[entry.model], *entry.overrides, f"train.seed={run_seed}"]
            try:
                cfg = resolve(entry.model, overrides=pairs)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from exc
            ident = json.dumps(_identity(cfg.to_dict()), sort_keys=True)
            if ident not in by_config:
                run = root / key / f"seed{run_seed}"
                by_config[ident] = run
                jobs[run] = Job(run, cfg, entry.model)
            run = by_config[ident]
            jobs[run].entries.append((key, seed))
            runs[(key, seed)] = run
    for job in jobs.values():
        _check_existing(job)
    return Plan(
        spec,
        models,
        entries,
        jobs,
        runs,
        seeds,
        deterministic,
        ablations,
        mask_points,
        fake_points,
        base,
        notes,
    )


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so saved and fresh configs compare equal."""
    return json.loads(json.dumps(obj))


#: train keys that do not change what a run computes: free to differ between invocations
NOT_RESULT_KEYS = ("threads", "eval_batch_size", "device")


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config without :data:`NOT_RESULT_KEYS` and without the model keys its config
    registration declares inert (``inert_keys``, e.g. G's keys for ``aft-d``), for "same run?"
    comparisons."""
    plain = _plain(cfg)
    train = {k: v for k, v in plain.get("train", {}).items() if k not in NOT_RESULT_KEYS}
    model = plain.get("model", {})
    name = model.get("name")
    if name in available_models():
        inert = registration(name).inert_keys
        model = {k: v for k, v in model.items() if k not in inert}
    return {**plain, "train": train, "model": model}


def _check_existing(job: Job) -> None:
    run = job.run
    if not run.exists() or not any(run.iterdir()):
        return
    saved = _read_json(run / "reproduce.json")
    if saved is None:
        raise ConfigError(
            f"{run} holds files but no reproduce.json (not made by `aftrec reproduce`); "
            "choose another --out or remove it"
        )
    if _identity(saved.get("config") or {}) != _identity(job.cfg.to_dict()):
        raise ConfigError(
            f"{run} was trained with another config than this command asks for "
            "(different --quick or --set?); choose another --out or remove it; "
            f"the saved one is in {run / 'reproduce.json'}"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    run: Path
    ok: bool
    metrics: dict[str, Any] | None = None  # EvalResult.to_json()
    error: str | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    trained_now: bool = False  # trained or evaluated by this invocation
    resumed: bool = False  # some invocation continued a half-trained run
    pending: bool = False  # not run yet (--report-only): neither a result nor a failure


REQUIRED = (*(f"recall@{n}" for n in NS), "auc")


def is_finished(run: Path) -> bool:
    metrics = _read_json(run / "metrics.json")
    if metrics is None or not (run / "per_user.parquet").is_file():
        return False
    average = metrics.get("average", {})
    return all(k in average for k in REQUIRED)


def epoch_log(run: Path) -> list[dict[str, Any]]:
    """The entries of a run's ``log.jsonl``, one per epoch; empty without a log."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.strip()]


def best_epoch_time(run: Path, metric: str = "valid_recall@50") -> tuple[int, float | None]:
    """The best validation epoch of a run (the first with the highest ``metric``, as the
    trainer keeps it) and the wall seconds of training and validation up to and including
    it, from ``log.jsonl``; ``(0, None)`` without a log, seconds ``None`` for logs written
    before the trainer recorded them."""
    entries = epoch_log(run)
    scored = [e for e in entries if metric in e]
    if not scored:
        return 0, None
    best = max(scored, key=lambda e: e[metric])  # max keeps the first of equal values
    upto = [e for e in entries if e["epoch"] <= best["epoch"]]
    if not all("train_seconds" in e and "valid_seconds" in e for e in upto):
        return int(best["epoch"]), None
    return int(best["epoch"]), sum(e["train_seconds"] + e["valid_seconds"] for e in upto)


def _load_outcome(run: Path) -> RunOutcome:
    meta = _read_json(run / "reproduce.json") or {}
    return RunOutcome(
        run,
        True,
        metrics=_read_json(run / "metrics.json"),
        train_seconds=meta.get("train_seconds"),
        eval_seconds=meta.get("eval_seconds"),
        resumed=bool(meta.get("resumed", False)),
    )


def run_job(job: Job, data_dir: Path) -> RunOutcome:
    """Train (or resume) and evaluate one run; the caller catches its exceptions."""
    from aftrec.evaluation.evaluate import Evaluator
    from aftrec.training import checkpoint
    from aftrec.training.trainer import load_run, train

    run = job.run
    run.mkdir(parents=True, exist_ok=True)
    meta = _read_json(run / "reproduce.json") or {
        "config": _plain(job.cfg.to_dict()),
        "train_seconds": 0.0,
        "resumed": False,
    }
    resume = (run / "last.pt").exists()
    if resume:
        meta["resumed"] = meta["resumed"] or not checkpoint.load(run / "last.pt").get("done")
    else:  # nothing to resume: clear what a run killed in its first epoch may have left
        for name in ("best.pt", "log.jsonl", "config.yaml", "run.json"):
            (run / name).unlink(missing_ok=True)
    checkpoint.atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")

    t0 = time.perf_counter()
    train(data_dir, None if resume else job.cfg, run, resume=resume, progress=False)
    meta["train_seconds"] = float(meta["train_seconds"]) + time.perf_counter() - t0
    checkpoint.atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")

    t1 = time.perf_counter()
    cfg, data, model = load_run(run, "best")
    res = Evaluator(data, cfg.data.history_len, cfg.train.eval_batch_size).evaluate(
        model, "test", NS, seed=cfg.train.seed, progress=False
    )
    checkpoint.atomic_write_bytes(run / "per_user.parquet", per_user_parquet(res.per_user))
    meta["eval_seconds"] = time.perf_counter() - t1
    checkpoint.atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")
    res.write(run / "metrics.json")  # last: marks the run as finished
    return RunOutcome(
        run,
        True,
        metrics=res.to_json(),
        train_seconds=meta["train_seconds"],
        eval_seconds=meta["eval_seconds"],
        trained_now=True,
        resumed=bool(meta["resumed"]),
    )


def per_user_parquet(frame: pd.DataFrame) -> bytes:
    """The per-(user, domain) test values the significance tests need, compactly.

    ``user_idx`` (int32; the dataset's ``users`` table maps it to the raw id), ``domain``,
    ``recall@N`` for N in :data:`NS` and ``auc``, as float32, zstd-compressed: about 200 KB
    per ML-1M run, so that a report directory with a hundred runs can be committed.
    """
    import numpy as np

    keep = ["user_idx", "domain", *(f"recall@{n}" for n in NS), "auc"]
    slim = frame[[c for c in keep if c in frame.columns]]
    slim = slim.astype(
        {c: np.int32 if c == "user_idx" else np.float32 for c in slim.columns if c != "domain"}
    )
    buf = io.BytesIO()
    slim.to_parquet(buf, index=False, compression="zstd", compression_level=19)
    return buf.getvalue()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


class _Eta:
    """Time left: the mean wall time of finished runs of the same model, else of any run."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def add(self, model: str, outcome: RunOutcome) -> None:
        if outcome.ok and outcome.train_seconds is not None:
            total = outcome.train_seconds + (outcome.eval_seconds or 0.0)
            self.seconds.setdefault(model, []).append(total)

    def left(self, models: Iterable[str]) -> float | None:
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        fallback = statistics.fmean(every)
        return sum(
            statistics.fmean(self.seconds[m]) if m in self.seconds else fallback for m in models
        )


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _seed_order(pending: list[Job]) -> list[Job]:
    """Seed by seed, plan order within a seed: a report cut short still has every model."""
    return sorted(pending, key=lambda job: min(seed for _, seed in job.entries))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _with_threads(job: Job, jobs: int) -> Job:
    """Share the cores between concurrent runs unless the config pins the threads."""
    if jobs == 1 or job.cfg.train.threads is not None:
        return job
    train = dataclasses.replace(job.cfg.train, threads=max(1, usable_cores() // jobs))
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, train=train))


def _run_job_caught(job: Job, data_dir: Path) -> RunOutcome:
    """:func:`run_job` with its failure turned into an outcome (in a worker process)."""
    try:
        return run_job(job, data_dir)
    except Exception as exc:
        return RunOutcome(job.run, False, error=_one_line(exc), trained_now=True)


def execute(plan: Plan) -> dict[Path, RunOutcome]:
    """Run every unfinished job, seed by seed; failures are recorded, not raised.

    ``plan.spec.jobs > 1``: that many runs at once, each in a fresh (spawned) process.
    ``plan.spec.report_only``: run nothing; unfinished runs come back ``pending``.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    outcomes: dict[Path, RunOutcome] = {}
    eta = _Eta()
    pending: list[Job] = []
    for job in plan.jobs.values():
        if is_finished(job.run):
            outcomes[job.run] = _load_outcome(job.run)
            eta.add(job.model, outcomes[job.run])
        else:
            pending.append(job)
    if plan.spec.report_only:
        outcomes.update({job.run: RunOutcome(job.run, False, pending=True) for job in pending})
        return outcomes
    pending = [_with_threads(job, plan.spec.jobs) for job in _seed_order(pending)]
    data_dir = Path(plan.spec.data)
    root = Path(plan.spec.out) / "runs"
    bar = tqdm(
        total=len(pending),
        unit="run",
        disable=not plan.spec.progress,
        bar_format="{desc}{n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}",
    )
    failed = 0
    running: dict[Path, Job] = {}

    def show(left_jobs: Iterable[Job]) -> None:
        names = [
            j.run.relative_to(root).as_posix().replace("/seed", " seed ") for j in running.values()
        ]
        bar.set_description(", ".join(names) + " " if names else "")
        left = eta.left(j.model for j in left_jobs)
        post = [] if left is None else [f"about {_fmt_duration(left / plan.spec.jobs)} left"]
        bar.set_postfix_str(", ".join([*post, *([f"{failed} failed"] if failed else [])]))

    def finish(job: Job, outcome: RunOutcome) -> None:
        nonlocal failed
        if not outcome.ok:
            log.warning("%s failed: %s", job.run.relative_to(root).as_posix(), outcome.error)
            failed += 1
        outcomes[job.run] = outcome
        eta.add(job.model, outcome)
        running.pop(job.run, None)
        bar.update(1)

    with logging_redirect_tqdm():
        if plan.spec.jobs == 1:
            for i, job in enumerate(pending):
                running[job.run] = job
                show(pending[i:])
                try:
                    outcome = run_job(job, data_dir)
                except Exception as exc:  # a failing model is reported, the others still run
                    log.debug("traceback", exc_info=True)
                    outcome = RunOutcome(job.run, False, error=_one_line(exc), trained_now=True)
                finish(job, outcome)
        else:
            _execute_parallel(pending, data_dir, plan.spec.jobs, running, show, finish)
        bar.set_description("done")
        bar.set_postfix_str(f"{failed} failed" if failed else "")
    bar.close()
    return outcomes


def _execute_parallel(
    pending: list[Job],
    data_dir: Path,
    jobs: int,
    running: dict[Path, Job],
    show: Any,
    finish: Any,
) -> None:
    """Keep ``jobs`` worker processes busy, submitting in order as runs finish."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    queue = list(pending)
    futures: dict[Future[RunOutcome], Job] = {}
    # spawn: a forked torch (with its thread pools) is not safe to use in the child
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while queue or futures:
                while queue and len(futures) < jobs:
                    job = queue.pop(0)
                    futures[pool.submit(_run_job_caught, job, data_dir)] = job
                    running[job.run] = job
                show([*running.values(), *queue])
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures.pop(fut)
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # the worker died (killed, out of memory)
                        outcome = RunOutcome(job.run, False, error=_one_line(exc), trained_now=True)
                    finish(job, outcome)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# --------------------------------------------------------------------------- statistics


@dataclass
class EntryResult:
    """Every seed of one table row."""

    entry: Entry
    deterministic: bool
    outcomes: dict[int, RunOutcome]  # seed -> outcome (deterministic: one run for all)

    def ok(self) -> dict[int, dict[str, Any]]:
        return {s: o.metrics for s, o in self.outcomes.items() if o.ok and o.metrics}

    def errors(self) -> dict[int, str]:
        return {s: o.error or "" for s, o in self.outcomes.items() if not o.ok and not o.pending}

    def pending(self) -> list[int]:
        return [s for s, o in self.outcomes.items() if o.pending]

    def values(self, col: Column) -> dict[int, float]:
        return {s: value(m, col) for s, m in self.ok().items()}

    def cell(self, col: Column) -> Cell | None:
        vals = [v for v in self.values(col).values() if math.isfinite(v)]
        if not vals:
            return None
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return Cell(statistics.fmean(vals), std, len(vals))

    def runs(self) -> list[Path]:
        return sorted({o.run for s, o in self.outcomes.items() if o.ok})


def value(metrics: dict[str, Any], col: Column) -> float:
    part = metrics["average"] if col.domain == "average" else metrics["domains"].get(col.domain)
    if part is None or col.metric not in part:
        return float("nan")
    return float(part[col.metric])


@dataclass(frozen=True)
class PairedTest:
    p: float  # nan: not computable (too few pairs, no variance)
    n: int  # pairs used
    mean_diff: float  # mean of (aft - competitor) over the pairs

    def significant(self, alpha: float) -> bool:
        return math.isfinite(self.p) and self.p < alpha and self.mean_diff > 0


def user_test(a: pd.DataFrame, b: pd.DataFrame, col: Column) -> PairedTest:
    """Wilcoxon signed-rank test over the (user, domain) pairs both frames have.

    ``a``, ``b``: per-user frames (``user_idx``, ``domain``, metric columns), one row per
    (user, domain), e.g. averaged over seeds. ``col.domain == "average"`` uses every domain.
    """
    import numpy as np
    from scipy.stats import wilcoxon

    keys = ["user_idx", "domain"]
    if col.metric not in a or col.metric not in b:
        return PairedTest(float("nan"), 0, float("nan"))
    pairs = a[[*keys, col.metric]].merge(b[[*keys, col.metric]], on=keys, suffixes=("_a", "_b"))
    if col.domain != "average":
        pairs = pairs[pairs["domain"] == col.domain]
    diff = (pairs[f"{col.metric}_a"] - pairs[f"{col.metric}_b"]).to_numpy(np.float64)
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return PairedTest(float("nan"), 0, float("nan"))
    mean_diff = float(diff.mean())
    if not np.any(diff != 0):
        return PairedTest(1.0, len(diff), mean_diff)
    res = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return PairedTest(float(res.pvalue), len(diff), mean_diff)


def seed_test(a: dict[int, float], b: dict[int, float]) -> PairedTest:
    """Paired t-test over the seeds both have (``scipy.stats.ttest_rel``)."""
    import numpy as np
    from scipy.stats import ttest_rel

    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    x = np.array([a[s] for s in seeds])
    y = np.array([b[s] for s in seeds])
    if len(seeds) == 0:
        return PairedTest(float("nan"), 0, float("nan"))
    diff = x - y
    if len(seeds) < 2 or np.std(diff) == 0:  # no variance: t undefined
        return PairedTest(float("nan"), len(seeds), float(diff.mean()))
    return PairedTest(float(ttest_rel(x, y).pvalue), len(seeds), float(diff.mean()))


@dataclass(frozen=True)
class Significance:
    column: Column
    competitor: str
    primary: Cell
    other: Cell
    users: PairedTest
    seeds: PairedTest


def seed_averaged_per_user(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean over seeds of each (user, domain)'s metrics."""
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    numeric = [c for c in frame.columns if c not in ("user_idx", "domain")]
    return frame.groupby(["user_idx", "domain"], as_index=False)[numeric].mean()


def best_competitor(
    results: dict[str, EntryResult], rows: Sequence[str], col: Column, primary: str = PRIMARY
) -> str | None:
    """The row other than ``primary`` with the highest mean in ``col``."""
    best: tuple[float, str] | None = None
    for key in rows:
        cell = results[key].cell(col)
        if key == primary or cell is None or not math.isfinite(cell.mean):
            continue
        if best is None or cell.mean > best[0]:
            best = (cell.mean, key)
    return None if best is None else best[1]


def significance(
    results: dict[str, EntryResult],
    rows: Sequence[str],
    columns: Sequence[Column],
    per_user: Any,
    primary: str = PRIMARY,
) -> dict[Column, Significance]:
    """``primary`` against the best other row of each column, over users and over seeds.

    ``per_user(key)`` returns the seed-averaged per-user frame of a row (or ``None``)."""
    out: dict[Column, Significance] = {}
    if primary not in results:
        return out
    for col in columns:
        mine = results[primary].cell(col)
        other = best_competitor(results, rows, col, primary)
        if mine is None or other is None:
            continue
        theirs = results[other].cell(col)
        assert theirs is not None
        a, b = per_user(primary), per_user(other)
        users = (
            user_test(a, b, col)
            if a is not None and b is not None
            else PairedTest(float("nan"), 0, float("nan"))
        )
        seeds = seed_test(results[primary].values(col), results[other].values(col))
        out[col] = Significance(col, other, mine, theirs, users, seeds)
    return out


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Hardware and versions, for the report."""
    import numpy as np
    import pandas as pd
    import scipy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = float("nan")
    usable = usable_cores()
    versions = {
        "aftrec": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import matplotlib

        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        versions["matplotlib"] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(memory, 1),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "os": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }


# --------------------------------------------------------------------------- entry point


@dataclass
class Results:
    """Everything the report shows."""

    plan: Plan
    data: Dataset
    entries: dict[str, EntryResult]
    significance: dict[Column, Significance]
    environment: dict[str, Any]
    started: str
    wall_seconds: float
    trained: int  # runs trained or evaluated by this invocation
    reused: int  # finished runs read from REPORT_DIR
    failed: int
    pending: int = 0  # not run yet (--report-only)


@dataclass(frozen=True)
class Summary:
    report: Path
    trained: int
    reused: int
    failed: int
    seconds: float
    pending: int = 0


def recall_columns(domains: Sequence[str], ns: Sequence[int] = (20, 50)) -> list[Column]:
    return [Column(d, f"recall@{n}") for d in [*domains, "average"] for n in ns]


def auc_columns(domains: Sequence[str]) -> list[Column]:
    return [Column(d, "auc") for d in [*domains, "average"]]


def collect(plan: Plan, outcomes: dict[Path, RunOutcome]) -> dict[str, EntryResult]:
    return {
        key: EntryResult(
            entry,
            entry.model in plan.deterministic,
            {s: outcomes[plan.runs[(key, s)]] for s in plan.seeds[key]},
        )
        for key, entry in plan.entries.items()
    }


def reproduce(spec: ReproduceSpec) -> Summary:
    """Train and evaluate every planned run, then write ``REPORT_DIR/report.md``."""
    import pandas as pd

    from aftrec.data.dataset import Dataset

    started_wall = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t0 = time.perf_counter()
    data = Dataset(Path(spec.data))  # fails up front on a bad --data
    plan = make_plan(spec)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    env = environment()  # before training: the load average of the machine we were given
    outcomes = execute(plan)
    entries = collect(plan, outcomes)
    main_rows = list(plan.models)
    cache: dict[str, pd.DataFrame | None] = {}

    def per_user(key: str) -> pd.DataFrame | None:
        if key not in cache:
            frames = [pd.read_parquet(run / "per_user.parquet") for run in entries[key].runs()]
            cache[key] = seed_averaged_per_user(frames) if frames else None
        return cache[key]

    columns = [*recall_columns(data.info.domains), *auc_columns(data.info.domains)]
    sig = significance(entries, main_rows, columns, per_user)
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
        trained=len(fresh),
        reused=len(outcomes) - len(fresh) - waiting,
        failed=sum(not o.ok and not o.pending for o in outcomes.values()),
        pending=waiting,
    )
    from aftrec.evaluation.report import write_report

    report = write_report(results)
    return Summary(
        report,
        results.trained,
        results.reused,
        results.failed,
        results.wall_seconds,
        results.pending,
    )


def _run(args: argparse.Namespace) -> None:
    spec = ReproduceSpec(
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
    )
    res = reproduce(spec)
    print(
        f"wrote {res.report}: {res.trained} run(s) trained, {res.reused} reused, "
        f"{res.failed} failed"
        + (f", {res.pending} not run yet" if res.pending else "")
        + f", {_fmt_duration(res.seconds)}"
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
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    p.add_argument(
        "--seeds", type=int, default=None, help=f"seeds 0..S-1 (default {DEFAULT_SEEDS}; quick: 1)"
    )
    p.add_argument(
        "--models", nargs="+", metavar="MODEL", help="default: every registered model, aft first"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, one epoch of 4 batches, 1 seed, 3 points per sweep (minutes; CI)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="[MODEL:]KEY=VALUE",
        help="config overrides for every model (model.* keys: models that have the key), "
        "or for one model with a MODEL: prefix, e.g. train.threads=1 aft:model.n_fakes=3",
    )
    p.add_argument(
        "--skip",
        nargs="+",
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


__all__ = [
    "ReproduceSpec",
    "Summary",
    "add_parser",
    "make_plan",
    "reproduce",
    "seed_test",
    "significance",
    "user_test",
]
