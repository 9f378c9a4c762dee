"""Running a plan: train (or resume) and evaluate every unfinished run, seed by seed.

A run whose ``metrics.json`` exists is read, not trained; a run with ``last.pt`` goes through
the trainer's resume path. Unfinished runs go seed by seed (every model's seed 0 first), so a
report cut short still covers every model. ``--jobs J`` trains J runs at once, each in its
own (spawned) process with ``cores // J`` torch threads unless ``train.threads`` is set; a
run whose process dies (the kernel's out-of-memory killer, a crash in native code) fails with
what ended it, and the others go on. Each process imports the module that registered its
run's model, so a model registered outside aftrec by a module the caller imported trains as
it does in this process; one defined where a new process cannot find it (``python -c``, a
notebook) is refused up front.
SIGTERM or SIGINT stops the command cleanly: the worker processes are terminated (and die
with the parent even if it is killed outright), a run in its training loop writes a
checkpoint after the batch under way, and the same command resumes them;
:class:`~aftrec.errors.Stopped` names the interrupted runs. Failures are recorded in the
outcome, never raised, so one failing model does not stop the others, and in the run's
``reproduce.json`` until it trains again. ``--report-only`` trains nothing: unfinished runs
come back failed (with that error) or ``pending``.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
import os
import pickle
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.config import plain_json, run_identity, runtime_overrides
from aftrec.environment import machine, usable_cores
from aftrec.errors import CheckpointError, ConfigError, Stopped
from aftrec.experiments.plan import (
    NS,
    Job,
    Plan,
    is_number,
    read_json,
    read_record,
)
from aftrec.experiments.results import RunOutcome
from aftrec.outputs import atomic_write_bytes, atomic_write_text
from aftrec.registry import registration

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    import pandas as pd

# torch, pandas and the trainer are imported where they are used (``aftrec --help``).

log = logging.getLogger(__name__)

REQUIRED = (*(f"recall@{n}" for n in NS), "auc")


def is_finished(run: Path) -> bool:
    """Whether the run's test values are there: ``per_user.parquet`` and a ``metrics.json``
    with every :data:`REQUIRED` average and every value a finite number (or null: NaN; the
    evaluator writes no other, so an infinity or a NaN token is damage), written by
    this command's evaluation (``reproduce.json`` holds its ``eval_seconds``: an ``aftrec
    evaluate`` of a run under way or stopped does not finish it). A damaged ``metrics.json``
    counts as missing, so the run is evaluated again (from its checkpoint)."""
    metrics = read_json(run / "metrics.json")
    if metrics is None or not (run / "per_user.parquet").is_file():
        return False
    record = read_record(run)
    if record is not None and not is_number(record.get("eval_seconds")):
        return False  # not this command's evaluation: `aftrec evaluate` of a run under way
    average, domains = metrics.get("average"), metrics.get("domains")
    if not isinstance(average, dict) or not isinstance(domains, dict):
        return False
    return all(k in average for k in REQUIRED) and all(
        isinstance(part, dict)
        and all(v is None or (is_number(v) and abs(v) < float("inf")) for v in part.values())
        for part in (average, *domains.values())
    )  # a null is a NaN (a domain without test users); abs(v) < inf: neither inf nor NaN


def _load_outcome(run: Path) -> RunOutcome:
    meta = read_record(run) or {}
    return RunOutcome(
        run,
        True,
        metrics=read_json(run / "metrics.json"),
        train_seconds=train_seconds(run, meta.get("train_seconds")),
        eval_seconds=meta.get("eval_seconds"),
        resumed=bool(meta.get("resumed", False)),
    )


def train_seconds(run: Path, recorded: float | None) -> float | None:
    """A run's training wall seconds over all its invocations: the larger of the sum its
    invocations recorded (``reproduce.json``; setup included, but an invocation killed
    before it could record adds nothing) and the sum of its logged epochs' training and
    validation seconds (``log.jsonl``; an epoch stopped part-way and resumed logs both
    parts). None when neither holds a time."""
    logged = logged_seconds(run)
    if recorded is None:
        return logged or None
    return max(float(recorded), logged)


def logged_seconds(run: Path) -> float:
    """The training and validation seconds of the epochs in a run's ``log.jsonl`` (0 without
    one)."""
    from aftrec.training.rundir import epoch_log

    return sum(e.get("train_seconds", 0.0) + e.get("valid_seconds", 0.0) for e in epoch_log(run))


def run_job(job: Job, data_dir: Path) -> RunOutcome:
    """Train (or resume) and evaluate one run; the caller catches its exceptions."""
    import torch

    from aftrec.evaluation.evaluate import Evaluator
    from aftrec.training import checkpoint, rundir
    from aftrec.training.trainer import train

    run = job.run
    run.mkdir(parents=True, exist_ok=True)
    resume = (run / rundir.LAST).exists()
    fresh = {"config": plain_json(job.cfg.to_dict()), "train_seconds": 0.0, "resumed": False}
    saved = read_record(run)
    # a saved record counts unless it was another config's, which never checkpointed
    same = saved is not None and run_identity(saved["config"]) == run_identity(fresh["config"])
    meta = {**fresh, **saved} if saved and (resume or same) else fresh
    meta.pop("error", None)  # an earlier invocation's failure: this one tries again
    if resume:
        meta["resumed"] = meta["resumed"] or not checkpoint.load(run / rundir.LAST).get("done")
    else:  # nothing to resume: clear what a run killed in its first epoch may have left
        rundir.clear(run)
    atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")

    t0 = time.perf_counter()
    try:
        train(
            data_dir, None if resume else job.cfg, run, resume=resume, progress=False,
            resume_set=runtime_overrides(job.cfg) if resume else None,  # this call's machine
        )  # fmt: skip
    finally:  # a stopped or failed invocation's time counts too
        meta["train_seconds"] = float(meta["train_seconds"] or 0.0) + time.perf_counter() - t0
        meta["threads"] = torch.get_num_threads()  # what it trained with, for its CPU time
        before = meta.get("machines")
        machines = [str(m) for m in before] if isinstance(before, list) else []
        meta["machines"] = sorted({*machines, machine()})  # each it trained on
        atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")

    t1 = time.perf_counter()
    cfg, data, model = rundir.load_run(run, "best")
    res = Evaluator(data, cfg.data.history_len, cfg.runtime.eval_batch_size).evaluate(
        model, "test", NS, seed=cfg.train.seed, progress=False
    )
    atomic_write_bytes(run / "per_user.parquet", per_user_parquet(res.per_user))
    meta["eval_seconds"] = time.perf_counter() - t1
    atomic_write_text(run / "reproduce.json", json.dumps(meta, indent=2) + "\n")
    res.write(run / "metrics.json")  # last: marks the run as finished
    return RunOutcome(
        run,
        True,
        metrics=res.to_json(),
        train_seconds=train_seconds(run, meta["train_seconds"]),
        eval_seconds=meta["eval_seconds"],
        trained_now=True,
        resumed=bool(meta["resumed"]),
    )


def _failed(job: Job, exc: Exception) -> RunOutcome:
    """The outcome of a run whose :func:`run_job` raised, its error recorded beside it by the
    process that ran it (a worker, or this one with ``--jobs 1``), which alone writes there."""
    error = _one_line(exc)
    _record_failure(job, error)
    return RunOutcome(job.run, False, error=error, trained_now=True)


def _record_failure(job: Job, error: str) -> None:
    """Keep a failed run's one-line error in its ``reproduce.json`` (``error``), so that a
    ``--report-only`` shows it failed, and why, rather than "not run yet". The next invocation
    that trains the run drops it. Best effort: a run that failed because its folder cannot be
    written has its error in this invocation's report only."""
    try:
        record = read_record(job.run) or {"config": plain_json(job.cfg.to_dict())}
    except CheckpointError:  # damaged: the failure is likely about it, and said in the report
        return
    with suppress(OSError):
        atomic_write_text(
            job.run / "reproduce.json", json.dumps({**record, "error": error}, indent=2) + "\n"
        )


def _unfinished(job: Job) -> RunOutcome:
    """``--report-only``'s outcome of a run not finished: failed, with its recorded error
    (:func:`_record_failure`), or pending."""
    try:
        record = read_record(job.run) or {}
    except CheckpointError:
        record = {}
    error = record.get("error")
    # an error of another config's run: the plan's is not run yet
    same = "config" in record and run_identity(record["config"]) == run_identity(
        plain_json(job.cfg.to_dict())
    )
    if isinstance(error, str) and same:
        return RunOutcome(job.run, False, error=error)
    return RunOutcome(job.run, False, pending=True)


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
    """Time left: the mean wall time of finished runs of the same model, else of any run;
    and, for ``--hours``, the longest a finished run of a model worked (:meth:`needs`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.longest: dict[str, float] = {}

    def add(self, model: str, outcome: RunOutcome) -> None:
        if outcome.ok and outcome.train_seconds is not None:
            total = outcome.train_seconds + (outcome.eval_seconds or 0.0)
            self.seconds.setdefault(model, []).append(total)
        if outcome.ok:
            # the epochs it logged, not its invocations' sum: time lost to a stop that could
            # not resume (a checkpoint gone) is no part of what another run will need
            worked = logged_seconds(outcome.run) + (outcome.eval_seconds or 0.0)
            if worked > 0:
                self.longest[model] = max(self.longest.get(model, 0.0), worked)

    def needs(self, job: Job) -> float | None:
        """Seconds ``job`` is expected to take at most: the longest finished run of its
        model, less what the job's own log already holds; for a half-trained run of a model
        with none finished, its mean epoch so far times the epochs left to the cap. None: no
        run of the model has finished and this one has logged no epoch."""
        from aftrec.training import rundir

        # without its checkpoint (a new checkout), a run starts again: its log counts for nothing
        done = logged_seconds(job.run) if (job.run / rundir.LAST).exists() else 0.0
        if job.model in self.longest:
            return max(0.0, self.longest[job.model] - done)
        epochs = max((int(e.get("epoch", 0)) for e in rundir.epoch_log(job.run)), default=0)
        if epochs == 0 or done == 0.0:
            return None
        return done / epochs * max(0, job.cfg.train.epochs - epochs)

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


def _with_threads(job: Job, jobs: int) -> Job:
    """Share the cores between concurrent runs unless the config pins the threads."""
    if jobs == 1 or job.cfg.runtime.threads is not None:
        return job
    runtime = dataclasses.replace(job.cfg.runtime, threads=max(1, usable_cores() // jobs))
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, runtime=runtime))


def _run_job_caught(job: Job, data_dir: Path) -> RunOutcome:
    """:func:`run_job` with its failure turned into an outcome (in a worker process). A
    SIGTERM from the parent (or, through ``PR_SET_PDEATHSIG``, from its death) stops the run
    after its batch, with a checkpoint there, and the worker ends at once."""
    try:
        return run_job(job, data_dir)
    except Stopped as exc:
        os._exit(exc.exit_code)
    except Exception as exc:
        return _failed(job, exc)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`~aftrec.errors.Stopped` in the main thread, so that
    the runner can stop its workers; further signals are ignored while it cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    signums = (signal.SIGTERM, signal.SIGINT)

    def stop(signum: int, frame: Any) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    old = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


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
        outcomes.update({job.run: _unfinished(job) for job in pending})
        return outcomes
    pending = [_with_threads(job, plan.spec.jobs) for job in _seed_order(pending)]
    if plan.spec.jobs > 1:
        _check_workers_can_load({job.model for job in pending})
    data_dir = Path(plan.spec.data)
    hours = plan.spec.hours
    deadline = None if hours is None else time.monotonic() + hours * 3600

    def fits(job: Job) -> bool:
        """Whether ``job`` is expected to end before ``--hours`` is up (always without it)."""
        if deadline is None:
            return True
        need = eta.needs(job)
        return need is not None and time.monotonic() + need <= deadline

    root = Path(plan.spec.out) / "runs"
    bar = tqdm(
        total=len(pending),
        unit="run",
        disable=None if plan.spec.progress else True,  # None: on a terminal only
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

    try:
        with logging_redirect_tqdm(), _stop_on_signals():
            if plan.spec.jobs == 1:
                held = list(pending)
                # in order, the first that fits; again after each run, whose time may let a
                # run held for want of an estimate start
                while (now := next((j for j in held if fits(j)), None)) is not None:
                    held.remove(now)
                    running[now.run] = now
                    show([now, *held])
                    try:
                        outcome = run_job(now, data_dir)
                    except Exception as exc:  # a failing model is reported, the others run
                        log.debug("traceback", exc_info=True)
                        outcome = _failed(now, exc)
                    finish(now, outcome)
            else:
                held = _execute_parallel(
                    pending, data_dir, plan.spec.jobs, running, show, finish, fits
                )
            outcomes.update({job.run: RunOutcome(job.run, False, pending=True) for job in held})
            if held:
                unknown = sum(eta.needs(job) is None for job in held)
                log.info(
                    "--hours %g: %d run(s) not started: %d expected to outlast the time left "
                    "(run the same command again later) and %d of models with no run finished "
                    "or under way to go by (run those once without --hours)",
                    hours, len(held), len(held) - unknown, unknown,
                )  # fmt: skip
            bar.set_description("time limit" if held else "done")
            bar.set_postfix_str(f"{failed} failed" if failed else "")
    except Stopped as exc:
        names = ", ".join(j.run.relative_to(root).as_posix() for j in running.values())
        raise Stopped(
            exc.signum,
            f"by {signal.Signals(exc.signum).name}"
            + (f" while training {names}" if names else "")
            + "; each run keeps its last checkpoint: run the same command again to resume",
        ) from None
    finally:
        bar.close()
    return outcomes


@dataclasses.dataclass
class _Worker:
    """A run's process, and the end of the pipe its outcome comes back through."""

    job: Job
    process: BaseProcess
    outcome: Connection


def _execute_parallel(
    pending: list[Job],
    data_dir: Path,
    jobs: int,
    running: dict[Path, Job],
    show: Any,
    finish: Any,
    fits: Any,
) -> list[Job]:
    """Keep ``jobs`` runs training, each in a (spawned) process of its own, starting in order
    as runs end: the first waiting job that ``fits``. Returns the jobs never started (none
    fitted any more).

    A process per run rather than a pool of workers that take run after run: a process that
    dies (the kernel's out-of-memory killer, a crash in native code) takes down its own run
    and no other, which run it was is known, and the plan goes on. A pool breaks at the first
    death, failing every run in it, with nothing to say which one killed it. A new process
    costs a start of Python and torch (about 2 s) per run."""
    import multiprocessing
    from multiprocessing.connection import wait

    # spawn: a forked torch (with its thread pools) is not safe to use in the child
    context = multiprocessing.get_context("spawn")
    queue = list(pending)
    workers: dict[Path, _Worker] = {}
    try:
        while queue or workers:
            while len(workers) < jobs:
                job = next((j for j in queue if fits(j)), None)
                if job is None:
                    break
                queue.remove(job)
                running[job.run] = job
                try:
                    payload = pickle.dumps(job)
                except Exception as exc:  # a config that cannot be sent to a process
                    finish(job, _failed(job, exc))
                    continue
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_work, name=f"aftrec {job.run}",
                    args=(os.getpid(), _model_module(job.model), payload, data_dir, send),
                )  # fmt: skip
                workers[job.run] = _Worker(job, process, receive)  # before start: a stop ends it
                try:
                    process.start()
                except OSError as exc:  # no process to be had (memory, the process limit)
                    del workers[job.run]
                    receive.close()
                    finish(job, _failed(job, exc))
                    continue
                finally:
                    send.close()  # the worker's end, now in the worker: the pipe ends with it
            if not workers:
                break  # nothing runs and nothing left fits the time
            show([*running.values(), *queue])
            # a pipe: an outcome came back; a sentinel: a process ended (without one, it died)
            ready = wait([x for w in workers.values() for x in (w.outcome, w.process.sentinel)])
            for run, worker in list(workers.items()):
                if worker.outcome in ready or worker.process.sentinel in ready:
                    outcome = _collect(worker)  # still in workers: a stop in here ends it too
                    del workers[run]
                    finish(worker.job, outcome)
    except BaseException:
        _stop_workers([w.process for w in workers.values() if w.process.pid is not None])
        raise
    finally:
        for worker in workers.values():
            worker.outcome.close()
    return queue


def _work(
    parent: int, module: str | None, payload: bytes, data_dir: Path, results: Connection
) -> None:
    """A worker process: import ``module``, which registered the run's model, then train the
    run and send its outcome back; or send why it could not load the run (one line)."""
    _worker_init(parent)
    try:
        # a spawned process knows aftrec's models and those of $AFTREC_MODELS or entry
        # points, and imports the modules that unpickling the run's config names: a model
        # registered elsewhere with a config class of another module would be unknown
        if module is not None:
            importlib.import_module(module)
        job: Job = pickle.loads(payload)
        registration(job.model)  # a model registered by code this process did not run
    except Exception as exc:
        results.send(_one_line(exc))
        return
    results.send(_run_job_caught(job, data_dir))


def _model_module(model: str) -> str | None:
    """The module that registered ``model`` (its class's), for a worker to import; None for
    ``__main__``, which a spawned process runs again itself where it can
    (:func:`_check_workers_can_load`)."""
    module = registration(model).model.__module__
    return None if module == "__main__" else module


def _check_workers_can_load(models: Iterable[str]) -> None:
    """Refuse, before any run starts, what no worker process could run: a program whose
    ``__main__`` names a file that is not there (read from standard input: every process of
    --jobs would fail to run it again), and models defined in a ``__main__`` that a spawned
    process does not run again."""
    lost_file = _main_file()
    if lost_file is not None and not lost_file.is_file():
        raise ConfigError(
            f"this program's main module ({lost_file.name}) is not a file that the processes of "
            "--jobs can run again, as each of them must: save the program to a file, or run "
            "with --jobs 1"
        )
    if _main_runs_again():
        return
    lost = sorted(
        m for m in models
        if "__main__" in (registration(m).model.__module__, registration(m).config.__module__)
    )  # fmt: skip
    if lost:
        one = len(lost) == 1
        it = "it" if one else "them"
        raise ConfigError(
            f"{'model' if one else 'models'} {', '.join(map(repr, lost))} "
            f"{'is' if one else 'are'} defined in __main__, which the processes of --jobs do "
            "not run again (a `python -c` command, a notebook, an interactive session, a "
            f"package's __main__.py): run {it} with --jobs 1, or define {it} in a module and "
            "import that"
        )


def _main_file() -> Path | None:
    """The file a spawned process runs again as this program's ``__main__`` (as
    :mod:`multiprocessing` finds it), or None when it runs none."""
    from multiprocessing import process

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return None  # `python -m`: imported by name, not run from a path
    path = getattr(main, "__file__", None)
    if path is None or Path(path).stem == "ipython":  # multiprocessing's exception
        return None
    return Path(getattr(process, "ORIGINAL_DIR", None) or "", path)


def _main_runs_again() -> bool:
    """Whether a spawned process runs this program's ``__main__`` again, and so defines what
    it defines, as :mod:`multiprocessing` does: a script (``python file.py``, as
    ``__mp_main__``) or a module (``python -m name``), not a package's ``__main__.py`` nor a
    ``__main__`` without a file (``python -c``, a notebook, an interactive session)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return not (name == "__main__" or name.endswith(".__main__"))
    path = getattr(main, "__file__", None)
    return path is not None and Path(path).stem != "ipython"  # multiprocessing's exception


def _collect(worker: _Worker) -> RunOutcome:
    """The outcome of a run whose process ended, or sent its outcome and is ending: failed,
    saying how the process ended, if it died before sending one."""
    try:
        outcome = worker.outcome.recv()
    except (EOFError, OSError):  # the process died: its end of the pipe closed with it
        outcome = None
    finally:
        worker.outcome.close()
    worker.process.join(10.0)
    if worker.process.is_alive():  # stuck on its way out, after its outcome: not a failure
        _stop_workers([worker.process])
    if isinstance(outcome, RunOutcome):
        return outcome
    job = worker.job
    if isinstance(outcome, str):  # it could not load the run
        error = (
            f"a worker process cannot load model {job.model!r} "
            f"(module {registration(job.model).model.__module__}): {outcome}; define the model "
            "in a module a new Python process can import, or run with --jobs 1"
        )
    else:
        error = f"the worker process training this run died: {_ended(worker.process.exitcode)}"
    _record_failure(job, error)  # the worker did not: it died, or had no run to record it in
    return RunOutcome(job.run, False, error=error, trained_now=True)


def _ended(code: int | None) -> str:
    """How a process ended, from its exit code (minus a signal's number when one killed it)."""
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name} (as the kernel's out-of-memory killer does)"
    return f"killed by {name}"


def _worker_init(parent: int) -> None:
    """In each worker process: leave SIGINT to the parent (Ctrl-C reaches the whole process
    group; the parent stops its workers itself), and on Linux die with the parent even when
    it is killed outright (``PR_SET_PDEATHSIG``: SIGTERM when the parent exits). tqdm gets a
    thread lock: its default, a named semaphore, is reported leaked when a worker is killed."""
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())
    if sys.platform.startswith("linux"):
        import ctypes

        # without prctl, the parent's handler still stops its workers
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _stop_workers(workers: list[Any], grace: float = 10.0) -> None:
    """Terminate (SIGTERM) the worker processes and wait for them; kill what outlives
    ``grace`` seconds. A run in its training loop saves a checkpoint after the batch under way
    and ends (:func:`aftrec.training.trainer.train`); one killed meanwhile (validating, say)
    loses what it did since its last checkpoint, which is written atomically."""
    for proc in workers:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
