"""The plan of a reproduction: which runs, with which configs, reported in which rows.

Layout of ``REPORT_DIR``::

    report.md, results.json, fig3a_mask_ratio.png, fig3b_n_fakes.png
    runs/MODEL/seedS/               one training run (:mod:`aftrec.training.rundir`) plus
        reproduce.json              the requested config and the wall times
        per_user.parquet            test metrics per (user, domain)
        metrics.json                test metrics per domain; written last: "this run is done"
    runs/aft/VARIANT/seedS/         ablations (no-generator, ...) and sweep points (mask-0.05, ...)

Runs that resolve to the same config (the default mask ratio of the sweep and ``aft`` itself,
mask ratio 0 and the "no mask" ablation) share one directory; what does not change what a run
computes (the ``runtime`` section, a registration's ``inert_keys``) is left out of that
comparison. A run directory made with another config stops the command up front. Deterministic
models (``trainable = False``: pop, EASE) run once and that run stands for every seed.

``--quick`` (the CI configuration): one seed, one epoch of 4 batches of 64, history 8,
patience 1, and tiny models (each registration's ``quick`` overrides: dim 16, one layer, two
heads, ...; EASE fits one L2 value), every registered model unless ``--models`` says
otherwise, Fig. 3 on 3 points each (mask 0, 0.15, 0.5; fakes 1, 5, 20; two of them shared
with other runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.config import run_identity
from aftrec.errors import CheckpointError, ConfigError
from aftrec.experiments.results import variant_key
from aftrec.registry import available_models, model_config_class, registration

if TYPE_CHECKING:
    from aftrec.config import RunConfig
    from aftrec.experiments.tune import Tuned

# Only the standard library at import time: ``aftrec --help`` builds the command's parser.

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
    tuned: tuple[Path, ...] = ()  # `aftrec tune` directories (or their best.json), one per model
    model_seeds: tuple[str, ...] = ()  # "MODEL=S": that main row on seeds 0..S-1, not --seeds
    hours: float | None = None  # start only runs expected to end within this many hours

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
        """An ``aftrec reproduce`` command line equivalent to this spec (without ``--quiet``
        and ``--hours``, which change when runs happen, not what they compute)."""
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
        if self.tuned:
            argv += ["--tuned", *map(str, self.tuned)]
        if self.model_seeds:
            argv += ["--model-seeds", *self.model_seeds]
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
    tuned: dict[str, Tuned] = field(default_factory=dict)  # model -> its best.json


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
            f"unknown model(s) {', '.join(unknown)} in --models; available: {', '.join(known)} "
            "(a model outside aftrec is found through $AFTREC_MODELS or an 'aftrec.models' "
            "entry point: docs/models.md)"
        )
    dupes = sorted({m for m in models if list(models).count(m) > 1})
    if dupes:
        raise ConfigError(f"--models names {', '.join(dupes)} more than once")
    return list(models)


def model_overrides(
    model: str,
    quick: bool,
    user: Sequence[tuple[str | None, str]],
    tuned: Sequence[str] = (),
) -> list[str]:
    """The ``--set`` pairs for one model: quick settings, its ``tuned`` settings (its
    best.json), then the user's (``model.*`` keys only where the model's config has them,
    unless the pair names the model)."""
    fields = _model_fields(model)
    out: list[str] = []
    if quick:
        out += QUICK_TRAIN
        out += [f"model.{k}={v}" for k, v in registration(model).quick.items()]
    out += tuned
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


#: seeds per row; a report of more runs than this would not finish on any machine
MAX_SEEDS = 1000


def parse_model_seeds(pairs: Sequence[str], models: Sequence[str]) -> dict[str, int]:
    """``--model-seeds MODEL=S ...`` -> {model: S}: main rows trained on seeds 0..S-1 instead
    of ``--seeds`` (e.g. the AFT rows on more seeds than the others)."""
    out: dict[str, int] = {}
    for pair in pairs:
        model, sep, count = pair.partition("=")
        model, count = model.strip(), count.strip()
        if not sep or not (count.isascii() and count.isdigit()):  # isdigit alone takes "²"
            raise ConfigError(f"--model-seeds {pair}: expected MODEL=S, e.g. aft=5")
        if model not in models:
            raise ConfigError(f"--model-seeds {pair}: {model!r} is not among the models run")
        if model in out:
            raise ConfigError(f"--model-seeds: {model!r} is given twice")
        n = int(count)
        if not 1 <= n <= MAX_SEEDS:
            raise ConfigError(f"--model-seeds {pair}: the seed count must be in [1, {MAX_SEEDS}]")
        out[model] = n
    return out


def _fmt_point(x: float) -> str:
    return f"{x:g}"


def make_plan(spec: ReproduceSpec) -> Plan:
    """Resolve every run's config and check existing run directories and, unless
    ``--report-only``, the packages of the runs' trackers, before training."""
    from aftrec.config import resolve

    for flag, value in (
        ("--seeds", spec.n_seeds),
        ("--sweep-seeds", spec.sweep_seeds),
        ("--ablation-seeds", spec.ablation_seeds),
    ):
        if value is not None and not 1 <= value <= MAX_SEEDS:
            raise ConfigError(f"{flag} must be in [1, {MAX_SEEDS}], got {value}")
    for flag, value in (
        ("--sweep-seeds", spec.sweep_seeds),
        ("--ablation-seeds", spec.ablation_seeds),
    ):
        if value is not None and value > spec.n_seeds:  # it was cut to --seeds without a word
            raise ConfigError(
                f"{flag} {value} is more than the {spec.n_seeds} seed(s) of the main rows, "
                "whose runs its rows share; raise --seeds or lower it"
            )
    if not 0 < spec.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {spec.alpha}")
    if spec.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {spec.jobs}")
    if spec.hours is not None and not 0 < spec.hours < math.inf:
        raise ConfigError(f"--hours must be a positive number of hours, got {spec.hours}")
    models = check_models(spec.models) if spec.models else default_models()
    user = _parse_overrides(spec.overrides)
    _check_user_overrides(user, models)
    notes: list[str] = []

    entries: dict[str, Entry] = {m: Entry(m, m, m) for m in models}
    seeds = {m: list(range(spec.n_seeds)) for m in models}
    for m, n in parse_model_seeds(spec.model_seeds, models).items():
        seeds[m] = list(range(n))
    ablations: list[str] = []
    mask_points: list[tuple[float, str]] = []
    fake_points: list[tuple[int, str]] = []
    has_primary = PRIMARY in models
    if not has_primary and (spec.ablations or spec.sweeps):
        notes.append(f"`{PRIMARY}` is not among the models: no ablations, no Fig. 3.")
    if has_primary and spec.ablations:
        ablations.append(PRIMARY)
        for variant, label, over in ABLATIONS:
            key = variant_key(PRIMARY, variant)
            entries[key] = Entry(key, PRIMARY, label, over)
            seeds[key] = list(range(spec.n_ablation_seeds))
            ablations.append(key)
    if has_primary and spec.sweeps:
        sweep_seeds = list(range(spec.n_sweep_seeds))
        ratios = QUICK_MASK_RATIOS if spec.quick else MASK_RATIOS
        fakes = QUICK_N_FAKES if spec.quick else N_FAKES
        for r in ratios:
            key = variant_key(PRIMARY, f"mask-{_fmt_point(r)}")
            entries[key] = Entry(key, PRIMARY, f"mask ratio {r:g}", (f"model.mask_ratio={r}",))
            seeds[key] = sweep_seeds
            mask_points.append((r, key))
        for k in fakes:
            key = variant_key(PRIMARY, f"fakes-{k}")
            entries[key] = Entry(key, PRIMARY, f"{k} fake items", (f"model.n_fakes={k}",))
            seeds[key] = sweep_seeds
            fake_points.append((k, key))

    tuned = read_tuned(spec.tuned, models, Path(spec.data), notes)
    deterministic = {m for m in models if _is_deterministic(m)}
    base = {
        m: model_overrides(m, spec.quick, user, tuned[m].overrides if m in tuned else ())
        for m in models
    }
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
            ident = json.dumps(run_identity(cfg.to_dict()), sort_keys=True)
            if ident not in by_config:
                run = root / key / f"seed{run_seed}"
                by_config[ident] = run
                jobs[run] = Job(run, cfg, entry.model)
            run = by_config[ident]
            jobs[run].entries.append((key, seed))
            runs[(key, seed)] = run
    from aftrec.training.rundir import data_fingerprint

    # (a plan made without the data, to list what it would run, compares none)
    meta = Path(spec.data) / "meta.json"
    fingerprint = data_fingerprint(Path(spec.data)) if meta.is_file() else None
    for job in jobs.values():
        _check_existing(job, root, fingerprint)
    if not spec.report_only:
        from aftrec.training.tracking import check

        # each run would check its tracker when it starts, in a worker: every run failed,
        # the report written, and no whole error line before the command began its work
        for kind in sorted({job.cfg.runtime.tracker for job in jobs.values()}):
            check(kind)
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
        tuned,
    )


def read_tuned(
    paths: Sequence[Path], models: Sequence[str], data: Path, notes: list[str]
) -> dict[str, Tuned]:
    """``--tuned``: each model's best.json (``aftrec tune``), at most one per model, for models
    this command runs; a study on another dataset is noted in the report."""
    from aftrec.experiments.tune import TRIALS_CSV, read_best, trial_points

    out: dict[str, Tuned] = {}
    elsewhere: dict[str, list[str]] = {}  # dataset tuned on -> models, for other datasets
    for path in paths:
        best = read_best(path)
        if (best.path.parent / TRIALS_CSV).is_file():  # the report plots it: read it now
            trial_points(best.path.parent)
        if best.model not in models:
            raise ConfigError(f"--tuned {path}: {best.model!r} is not among the models run")
        if best.model in out:
            raise ConfigError(f"--tuned names two studies of {best.model!r}")
        if best.data != str(Path(data).resolve()):
            elsewhere.setdefault(best.data, []).append(best.model)
        out[best.model] = best
    for where, names in elsewhere.items():
        shown = ", ".join(f"`{name}`" for name in sorted(names))
        notes.append(
            f"Tuned on `{_near(Path(where))}`, not on this dataset, and run here with the "
            f"settings chosen there: {shown}."
        )
    return out


def _near(path: Path) -> Path:
    """``path`` from the working folder where it lies below it (a report shows no machine's
    home), else as it is."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


#: a run directory holding none of these never trained (it failed or was killed before its
#: first checkpoint), so another config may take it over
TRAINED_MARKERS = ("last.pt", "best.pt", "metrics.json")


def _check_existing(job: Job, root: Path, fingerprint: str | None) -> None:
    """Refuse a run folder (below ``root``, REPORT_DIR/runs) this command cannot take: one
    that is a file, one made by something else, with another config or on another dataset
    (its ``run.json`` fingerprint, where it has one, against ``fingerprint``)."""
    run = job.run
    for path in (run, *run.parents):
        if path.exists() and not path.is_dir():
            raise CheckpointError(
                f"{path} is a file where a run folder of `aftrec reproduce` goes; choose "
                "another --out or remove it"
            )
        if path == root:
            break
    if not run.exists() or not any(run.iterdir()):
        return
    saved = read_record(run)
    if not any((run / name).exists() for name in TRAINED_MARKERS):
        return  # failed or killed before its first checkpoint: run_job starts it afresh
    if saved is None:
        raise ConfigError(
            f"{run} holds files but no reproduce.json (not made by `aftrec reproduce`); "
            "choose another --out or remove it"
        )
    was, now = run_identity(saved.get("config") or {}), run_identity(job.cfg.to_dict())
    if was != now:
        raise ConfigError(
            f"{run} was trained with another config than this command asks for: "
            f"{config_differences(was, now)} (a different --quick or --set, or a default "
            "changed since); choose another --out, remove it, or ask for its values with "
            f"--set; the saved config is in {run / 'reproduce.json'}"
        )
    from aftrec.training.rundir import recorded_fingerprint

    try:
        recorded = recorded_fingerprint(run) if (run / "run.json").is_file() else None
    except CheckpointError:  # a damaged run.json: the run fails and the report lists it
        recorded = None
    if fingerprint is not None and recorded not in (None, fingerprint):
        raise ConfigError(
            f"{run} was trained on another dataset than --data (its run.json records another "
            "fingerprint: other counts, settings or files); choose another --out, or give the "
            "dataset the report was made on"
        )


def config_differences(was: dict[str, Any], now: dict[str, Any], most: int = 6) -> str:
    """The keys two run configs (sections of key -> value) differ in, the saved value first:
    ``model.g_temperature 1.0 there, 4.0 here``; at most ``most``, then how many more."""
    diff = [
        f"{section}.{key} {was.get(section, {}).get(key, '(unset)')!r} there, "
        f"{now.get(section, {}).get(key, '(unset)')!r} here"
        for section in sorted({*was, *now})
        if isinstance(was.get(section, {}), dict) and isinstance(now.get(section, {}), dict)
        for key in sorted({*was.get(section, {}), *now.get(section, {})})
        if was.get(section, {}).get(key, "(unset)") != now.get(section, {}).get(key, "(unset)")
    ]
    more = f" and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(diff[:most]) + more if diff else "their sections differ"


def is_number(value: Any) -> bool:
    """A JSON number (``true`` is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_record(run: Path) -> dict[str, Any] | None:
    """``RUN/reproduce.json`` (None where there is none), checked as every reader uses it: a
    ``config`` of sections, wall seconds that are finite numbers, ``resumed`` a bool; a
    damaged one is a :class:`CheckpointError` naming it."""
    path = run / "reproduce.json"
    if not path.exists():
        return None
    obj = read_json(path) or {}
    config = obj.get("config")
    seconds = [obj.get(k) for k in ("train_seconds", "eval_seconds")]
    if (
        not isinstance(config, dict)
        or not all(isinstance(section, dict) for section in config.values())
        or not all(s is None or (is_number(s) and math.isfinite(s)) for s in seconds)
        or not isinstance(obj.get("resumed", False), bool)
    ):
        raise CheckpointError(
            f"{path} is not a reproduce.json of `aftrec reproduce` (damaged?); choose another "
            f"--out or remove {run}"
        )
    return obj


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
