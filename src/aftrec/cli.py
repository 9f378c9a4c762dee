"""The ``aftrec`` command line: prepare, train, evaluate, recommend, export, serve, reproduce,
tune, demo, models.

This is the only module that reads ``sys.argv``. Every error the library raises on purpose
(:class:`aftrec.errors.AftrecError`) ends the command with one ``error: ...`` line on stderr
and exit code 2 (1 for a reproduction whose runs partly failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from aftrec import __version__, api
from aftrec.errors import AftrecError, Stopped, TrainingError
from aftrec.outputs import path_argument

log = logging.getLogger("aftrec")
T = TypeVar("T")


def _prepare(args: argparse.Namespace) -> None:
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.data.split import SplitConfig

    t0 = time.perf_counter()
    out = api.prepare(
        args.out,
        dataset=args.dataset,
        path=args.path,
        domains=args.domains,
        interactions=args.interactions,
        items=args.items,
        train=args.train,
        valid=args.valid,
        test=args.test,
        split=_from_args(SplitConfig, args),
        synthetic=_from_args(
            SyntheticConfig, args, n_users="users", n_interactions="interactions_count"
        )
        if args.dataset == "synthetic"
        else None,
        streaming=args.streaming,
        partition_rows=args.partition_rows,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    _print_prepared(out, time.perf_counter() - t0)


def _from_args(cls: type[T], args: argparse.Namespace, **renamed: str) -> T:
    """A config dataclass from the command's options of the same names (``renamed``: field
    name = option name where they differ); fields without an option keep their defaults."""
    names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: getattr(args, a) for k, a in names.items() if hasattr(args, a)})


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
    res = api.train(
        args.data, args.model, args.out, config=args.config, overrides=args.set,
        resume=args.resume, progress=not args.quiet,
    )  # fmt: skip
    if res.rank == 0:
        # the ranks' peak memory: none recorded for a closed-form fit or a finished run
        memory = (
            f", peak memory per rank {res.peak_rss_mib} MiB"
            if res.world > 1 and res.peak_rss_mib
            else ""
        )
        valid = (
            f"valid {res.best_metric:.4f}"
            if math.isfinite(res.best_metric)
            # a closed-form fit without one fitted its one setting: no epoch kept, none picked
            else "no validation part" + ("" if res.closed_form else ": the last epoch kept")
        )
        if res.closed_form:  # no epochs nor examples to count: what it did instead
            done = (
                "already fitted in closed form (nothing to fit now)"  # its seconds are no fit's
                if res.fitted_before
                else f"fitted in closed form in {res.seconds:.1f}s"
            )
            print(f"trained {res.run}: {done}, {valid}")
        else:
            print(
                f"trained {res.run}: best epoch {res.best_epoch}, {valid}, "
                f"{res.epochs_run} epoch(s), {res.seconds:.1f}s, "
                f"{res.examples_per_second:.0f} examples/s"
                + (" (stopped early)" if res.stopped_early else "")
                + memory
            )
        if res.note:
            print(res.note)
    if res.world > 1:
        # Every file is written (atomically). Leave the process group, then the process now:
        # torch's C++ teardown at interpreter exit sometimes aborted a rank of a finished
        # run ("terminate called without an active exception"), failing the whole torchrun.
        from aftrec.training import distributed

        distributed.leave()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _evaluate(args: argparse.Namespace) -> None:
    res = api.evaluate(
        args.run, n=args.n or [20, 50, 200], split=args.split, which=args.which,
        sampled_negatives=args.sampled_negatives, progress=not args.quiet,
    )  # fmt: skip
    print(res.table())  # its notes name the domains where Recall@N is 1 for any model
    print(f"wrote {api.metrics_path(args.run, args.split, args.sampled_negatives, args.which)}")


def _recommend(args: argparse.Namespace) -> None:
    frame = api.recommend(args.run, n=args.n, users=args.users, domains=args.domains, out=args.out)
    print(f"wrote {len(frame)} rows to {args.out}")


def _tune(args: argparse.Namespace) -> None:
    from aftrec.experiments.tune import TuneSpec, tune

    res = tune(
        TuneSpec(
            args.data, args.model, args.out, args.trials, seed=args.seed,
            overrides=tuple(args.set), startup_trials=args.startup_trials,
        )
    )  # fmt: skip
    if res.best is None:
        raise TrainingError(f"{res.out}: no trial finished; see {res.out / 'trials.csv'}")
    print(
        f"wrote {res.out / 'best.json'}: {res.ran} trial(s) run now, {res.trials} in the study, "
        f"best {res.best['metric']} {res.best['best_value']:.4f} "
        f"(trial {res.best['best_trial']:03d}): "
        + (" ".join(res.best["overrides"]) or "nothing to tune")
        + f", {res.seconds:.1f}s"
    )


def _demo(args: argparse.Namespace) -> None:
    from aftrec.demo import DemoSpec, run_demo

    t0 = time.perf_counter()
    spec = DemoSpec(
        dataset=args.dataset, out=args.out, jobs=args.jobs, overrides=tuple(args.set),
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    res = run_demo(spec, echo=lambda line: print(line, flush=True))
    print(
        f"demo finished in {time.perf_counter() - t0:.0f}s: the report {res.report}, "
        f"the chart {res.chart}, the bundle {res.bundle}"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a bad command line said in one line, as every other error is: what is
    wrong and where the usage is, instead of the usage block and then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


_VERBOSE_HELP = "debug logging"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="aftrec", description=" ".join(__doc__.split("\n\n")[0].split()).replace("``", "")
    )
    p.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    p.add_argument("--version", action="version", version=f"aftrec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="turn raw data into a prepared dataset directory")
    pp.add_argument(
        "--dataset", choices=list(api.DATASETS),
        help="a known dataset (MovieLens: downloaded unless --path; netflix: --path and "
        "--domains); without it, --interactions with --items, or --train and --test with "
        "--items",
    )  # fmt: skip
    pp.add_argument("--path", type=path_argument, help="local folder with the raw files")
    pp.add_argument(
        "--domains", type=path_argument, help="Netflix item-to-domain map (CSV: item,domain)"
    )
    pp.add_argument("--interactions", type=path_argument, help="generic log (CSV or Parquet)")
    pp.add_argument(
        "--items", type=path_argument,
        help="item catalogue (CSV or Parquet: item, domain); needed by --interactions and by "
        "--train/--test",
    )  # fmt: skip
    pp.add_argument("--train", type=path_argument, help="pre-split training log")
    pp.add_argument("--valid", type=path_argument, help="pre-split validation log (optional)")
    pp.add_argument("--test", type=path_argument, help="pre-split test log")
    pp.add_argument(
        "--out", type=path_argument, required=True, help="the prepared dataset folder to write"
    )
    pp.add_argument(
        "--force", action="store_true",
        help="replace --out if it is a prepared dataset (or an empty folder)",
    )  # fmt: skip
    pp.add_argument(
        "--rating-threshold",
        type=float,
        default=3.0,
        help="positives are ratings >= this (default 3); unused with a label column, or "
        "without a rating column",
    )
    pp.add_argument(
        "--test-ratio", type=float, default=0.2,
        help="the last share of each user's positives, by time, that is test (default 0.2)",
    )  # fmt: skip
    pp.add_argument(
        "--valid-ratio", type=float, default=0.2,
        help="the last share of what is left that is validation (default 0.2; 0: none)",
    )  # fmt: skip
    pp.add_argument(
        "--min-positives", type=int, default=5,
        help="users with fewer positives are dropped (default 5)",
    )  # fmt: skip
    pp.add_argument(
        "--ties", choices=("random", "item"),
        help="how a user's positives at the same timestamp are ordered, which decides those "
        "that go to test where the split falls in a tie: random (a seeded draw per (user, "
        "item), fair to every domain) or item (domain, then item id); default item for "
        "ml-100k and ml-1m, whose committed results were split so, random otherwise",
    )  # fmt: skip
    pp.add_argument(
        "--tie-seed", type=int,
        help="seeds --ties random's draws (default 0; the item rule draws nothing)",
    )  # fmt: skip
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
    g.add_argument("--users", type=int, default=2000, help="users (default 2000)")
    g.add_argument("--n-domains", type=int, default=3, help="domains (default 3)")
    g.add_argument(
        "--items-per-domain", type=int, default=500, help="items in each domain (default 500)"
    )
    g.add_argument(
        "--interactions-count", type=int, default=60_000,
        help="interactions drawn (default 60000)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seeds the draws (default 0)")
    pp.set_defaults(func=_prepare)

    pt = sub.add_parser("train", help="train a model on a prepared dataset")
    pt.add_argument(
        "--data", type=path_argument,
        help="a prepared dataset directory (with --resume: the run's own, unless it moved)",
    )  # fmt: skip
    pt.add_argument("--model", help="model name (see `aftrec models`)")
    pt.add_argument("--out", type=path_argument, required=True, help="run directory")
    pt.add_argument(
        "--config", type=path_argument, help="YAML with model, data, train and runtime sections"
    )
    pt.add_argument(
        "--set",
        nargs="*",
        action="extend",  # a second --set adds to the first
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. train.lr=0.01 model.dim=32",
    )
    pt.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    pt.add_argument("--quiet", action="store_true", help="no progress bars")
    pt.set_defaults(func=_train)

    pe = sub.add_parser("evaluate", help="full-ranking Recall@N / NDCG@N / AUC per domain")
    pe.add_argument("--run", type=path_argument, required=True, help="run directory")
    pe.add_argument(
        "--n", type=int, nargs="+", action="extend", default=None,
        help="cut-offs of Recall@N and NDCG@N (default 20 50 200)",
    )  # fmt: skip
    pe.add_argument(
        "--split", choices=["test", "valid"], default="test", help="the part ranked (default test)"
    )
    pe.add_argument(
        "--which", choices=["best", "last"], default="best",
        help="checkpoint: the best validation epoch's or the last (default best)",
    )  # fmt: skip
    pe.add_argument(
        "--sampled-negatives",
        type=int,
        default=None,
        metavar="K",
        help=(
            "NOT full ranking: rank each positive among K sampled unclicked items instead, "
            "written to metrics_sampledK.json (AUC is exact either way)"
        ),
    )
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    pe.set_defaults(func=_evaluate)

    pr = sub.add_parser("recommend", help="top-N per (user, domain) to CSV or Parquet")
    pr.add_argument("--run", type=path_argument, required=True, help="run directory")
    pr.add_argument("--n", type=int, default=50, help="items per (user, domain) (default 50)")
    pr.add_argument("--out", type=path_argument, required=True, help="FILE.csv or FILE.parquet")
    pr.add_argument(
        "--users", nargs="+", action="extend", help="original user ids (default: every test user)"
    )
    pr.add_argument(
        "--domains", nargs="+", action="extend",
        help="domain names (default: each user's test domains)",
    )  # fmt: skip
    pr.set_defaults(func=_recommend)

    from aftrec.serving.cli import add_parsers as add_serving_parsers

    add_serving_parsers(sub)

    from aftrec.experiments.reproduce import add_parser as add_reproduce_parser

    add_reproduce_parser(sub)

    pu = sub.add_parser(
        "tune",
        help="choose a model's settings on validation: a seeded Optuna TPE study (docs/tuning.md)",
        description="Train one run per trial to early stopping and score it on the validation "
        "split (the test split is never read). DIR/study.db holds the study: run the command "
        "again with a larger --trials to continue it. Writes DIR/best.json, DIR/trials.csv and "
        "DIR/trials.png.",
    )
    pu.add_argument(
        "--data", type=path_argument, required=True, help="a prepared dataset directory"
    )
    pu.add_argument("--model", required=True, help="model name (see `aftrec models`)")
    pu.add_argument(
        "--out", type=path_argument, required=True, metavar="DIR",
        help="the study's folder: new, empty, or one this command wrote (it continues)",
    )  # fmt: skip
    pu.add_argument("--trials", type=int, required=True, help="the trial budget of the study")
    pu.add_argument(
        "--seed", type=int, default=0,
        help="seeds the search and every trial's run: 0 to 2^32 - 1 (default 0)",
    )  # fmt: skip
    pu.add_argument(
        "--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
        help="config overrides every trial trains with (not tuned), e.g. train.threads=1",
    )  # fmt: skip
    pu.add_argument(
        "--startup-trials", type=int, default=10, metavar="K",
        help="trials drawn at random before TPE models the results (default 10)",
    )  # fmt: skip
    pu.set_defaults(func=_tune)
    pd = sub.add_parser(
        "demo",
        help="the product end to end: prepare, train five models, compare, serve, ask",
        description="Prepare MovieLens; train pop, EASE, two-tower, aft-d and aft to early "
        "stopping (an `aftrec reproduce` with one seed: a demo cut short resumes); print one "
        "per-domain Recall@50 table and write a bar chart; export the best dot-product model, "
        "serve it on a free loopback port and ask it for a known user and a new one.",
    )
    pd.add_argument(
        "--dataset", choices=["ml-100k", "ml-1m"], default="ml-100k",
        help="the MovieLens set it runs on (default ml-100k)",
    )  # fmt: skip
    pd.add_argument(
        "--out", type=path_argument, help="the demo's folder (default runs/demo/DATASET)"
    )
    pd.add_argument(
        "--jobs", type=int, default=2, metavar="J", help="runs trained at once (default 2)"
    )
    pd.add_argument(
        "--set", nargs="*", action="extend", default=[], metavar="[MODEL:]KEY=VALUE",
        help="config overrides, as for `aftrec reproduce`",
    )  # fmt: skip
    pd.set_defaults(func=_demo)

    pm = sub.add_parser("models", help="list the registered models")
    pm.set_defaults(
        func=lambda a: print(
            "\n".join(__import__("aftrec.registry", fromlist=["x"]).available_models())
        )
    )
    for command in sub.choices.values():  # `aftrec train -v ...` as well as `aftrec -v train`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP
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


def _own_info(record: logging.LogRecord) -> bool:
    """Below WARNING, aftrec's own records only: a library's INFO is not the user's news
    (FAISS says which of its builds it loaded; torch logs FakeTensor cache statistics at exit,
    printed after ``interrupted`` when Ctrl-C lands while torch imports)."""
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] == "aftrec"


def _log_handler(verbose: bool) -> logging.Handler:
    """The handler of every command's log lines (on stderr); with ``verbose`` (``-v``) every
    logger's records down to DEBUG, without it :func:`_own_info`."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    if not verbose:
        handler.addFilter(_own_info)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except Exception as exc:
            _reraise_a_stop(exc)
            raise
    except KeyboardInterrupt:  # Ctrl-C while the commands' modules load
        print("interrupted", file=sys.stderr)
        return 130
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, handlers=[_log_handler(args.verbose)])
    # SIGTERM ends a command as Ctrl-C does, through its cleanup (an unfinished bundle or
    # dataset folder is deleted); train and reproduce put their own handler on top, serve
    # leaves shutdown to uvicorn, and a torchrun rank keeps the default: a Python handler
    # waits for the C++ call under way, and a rank waiting for its peers would not stop
    terminate = (
        args.command != "serve"
        and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if terminate and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    else:
        terminate = False
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        try:
            args.func(args)
            sys.stdout.flush()  # a full disk or a closed pipe shows here, not at exit
        except Exception as exc:
            _reraise_a_stop(exc)
            raise
    except AftrecError as exc:
        # one line, even when the message quotes a multi-line error from torch or pandas
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    except Stopped as exc:  # SIGTERM / SIGINT, caught by a command that had to clean up
        print(f"stopped {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _StdoutError as exc:
        _stdout_to_devnull()
        if isinstance(exc.__cause__, BrokenPipeError):  # `aftrec models | head`: read enough
            return 141  # 128 + SIGPIPE, as a shell tool ends
        print(f"error: cannot write to standard output: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # numpy's too-large arrays included
        print(f"error: {_out_of_memory(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch's allocator says so in a RuntimeError
        if _peer_failed(exc):
            rank = os.environ.get("RANK", "?")
            print(
                f"error: rank {rank}: another rank of this torchrun job failed or was stopped "
                "(its own message says why), so this one stops too",
                file=sys.stderr,
            )
            return 1
        if "can't allocate memory" not in str(exc):
            raise
        print(f"error: {_out_of_memory(exc)}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout
        if terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


def _reraise_a_stop(exc: Exception) -> None:
    """Raise the Ctrl-C or the stop (:class:`~aftrec.errors.Stopped`, SIGTERM) behind ``exc``,
    if one is in its chain of causes and contexts: inside a module's first import they surface
    as another error (an ``ImportError`` of a C extension, matplotlib's for a report's plots;
    torch's ``RuntimeError: Error calling __set_name__ ...``). An aftrec error says what it
    says, whatever it was raised while handling."""
    if isinstance(exc, AftrecError):
        return
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        at = todo.pop()
        if id(at) in seen:
            continue
        seen.add(id(at))
        if isinstance(at, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        if isinstance(at, Stopped):
            raise Stopped(at.signum, str(at)) from exc
        todo += [e for e in (at.__cause__, at.__context__) if e is not None]


class _StdoutError(Exception):
    """Standard output could not be written (a full disk, ``/dev/full``, a closed pipe)."""


class _GuardedStdout:
    """``sys.stdout`` whose write and flush failures are :class:`_StdoutError`, told apart
    from the other ``OSError`` a command may meet."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except OSError as exc:
            raise _StdoutError(exc.strerror or type(exc).__name__) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise _StdoutError(exc.strerror or type(exc).__name__) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so that the interpreter's own flush at exit does
    not fail again with a traceback of its own."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind sys.stdout (a test's capture)
        pass
    finally:
        os.close(devnull)


def _peer_failed(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective of a torchrun rank that failed because a peer left
    (gloo's "Connection closed by peer", torch's ``DistError``): the peer prints the cause."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None)
    if isinstance(dist_error, type) and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def _out_of_memory(exc: BaseException) -> str:
    """One line for an allocation this machine could not make: usually a size in the
    config (``model.dim``, ``data.history_len``, ``data.n_negatives``) or the data."""
    said = " ".join(str(exc).split())
    said = said[said.find("DefaultCPUAllocator") :] if "DefaultCPUAllocator" in said else said
    return (
        f"out of memory ({said[:200]}); lower the sizes in the config or the data, or use a "
        "machine with more memory"
    )


if __name__ == "__main__":
    sys.exit(main())
