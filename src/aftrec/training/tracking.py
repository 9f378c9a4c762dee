"""Run tracking: ``train.tracker`` sends a run's config and, every epoch, its losses, validation
metric, throughput, wall seconds, memory and (AFT) G's health figures to TensorBoard or
MLflow. ``none``, the default, sends nothing. Rank 0 alone tracks. Both write inside the run
directory (:data:`aftrec.training.rundir.TENSORBOARD`, :data:`~aftrec.training.rundir.MLFLOW`):

* ``tensorboard``: event files (``tensorboard --logdir RUN/tensorboard``), one per ``train``
  or ``--resume``, written by the training process itself (torch's ``SummaryWriter`` writes
  from a thread, whose failure the run cannot catch); the config is the text ``config``, sent
  once, into a new folder;
* ``mlflow``: a local MLflow file store, experiment ``aftrec``, one MLflow run per aftrec run
  (``--resume`` continues it), named after the run's folder and the one above it
  (``aft/seed0`` for a run of ``aftrec reproduce``, ``runs/tt`` for ``--out runs/tt``); the
  config as flattened params and the artifact ``config.yaml`` (``mlflow ui
  --backend-store-uri RUN/mlruns``). MLflow 3 keeps the file store behind
  ``MLFLOW_ALLOW_FILE_STORE``: unset, it is set to ``true`` for this process; set to anything
  else than ``true`` or ``1`` (the user turned the file store off), the run is refused before
  it writes anything, with one ``error:`` line.

Each epoch's scalars are named ``train/<loss>``, ``valid/<metric>`` (``valid/recall@50``),
``health/<figure>`` (``health/distinct_share/<domain>`` for per-domain figures),
``speed/examples_per_second``, ``time/train_seconds``, ``time/valid_seconds`` and
``memory/peak_rss_mib`` (the largest rank's), with the epoch as the step. MLflow's names are
the same, part by part (the parts between those ``/``), where MLflow takes them: ``@`` is
written ``_at_``; any other character but a letter, digit, ``_``, ``-``, ``.`` or space (a ``/``
inside a domain's name too) is written ``_``; a part of dots alone (``..``), or none, becomes
underscores, since MLflow keeps a name as a file path; a part over 100 bytes is cut. Where
two parts beside each other would then be the same, or differ in case only (one file on a
case-insensitive disk), as ``a&b`` and ``a_b``, each gets ``_`` and the first 8 hex digits of
its own sha1: every domain has its name, the same in every epoch.

A tracker's folder that cannot be read or written when a run starts or resumes (a file in its
place, no permission, a damaged MLflow store) stops the command before it trains, with one
``error:`` line naming it. A write that fails later (a full disk) is one warning: tracking
stops for the rest of that process, and training goes on, ``log.jsonl`` keeping every epoch.
``--resume``, of a finished run too, sends the tracker what it has not received of
``log.jsonl``, each scalar of each epoch once: a tracker repaired, removed (a new one gets
every epoch) or switched on at the resume catches up.

The backends are the ``tracking`` extra (``pip install 'aftrec[tracking]'``); a tracker whose
package is missing stops the run before it starts, with one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from aftrec.config import RunConfig, TrackerKind, dump
from aftrec.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

EXTRA = "pip install 'aftrec[tracking]'"
#: MLflow 3's switch of its file store (off unless set)
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


#: a scalar's name part by part: ``("health", "distinct_share", "Drama")``; a domain's name
#: is one part, whatever it holds (a ``/`` too)
Key = tuple[str, ...]


def scalars(entry: dict[str, Any], losses: Iterable[str], metric: str | None) -> dict[str, float]:
    """The scalars of one ``log.jsonl`` entry: its ``losses``, the validation ``metric`` (None:
    no validation part), speed, seconds, memory and the numbers of its health record, named
    as TensorBoard gets them (the parts of :func:`_items` joined by ``/``)."""
    return {"/".join(key): value for key, value in _items(entry, losses, metric).items()}


def _items(entry: dict[str, Any], losses: Iterable[str], metric: str | None) -> dict[Key, float]:
    out: dict[Key, float] = {("train", k): float(entry[k]) for k in losses}
    if metric is not None:
        out["valid", metric] = float(entry[f"valid_{metric}"])
    for key, name in (
        ("examples_per_second", ("speed", "examples_per_second")),
        ("train_seconds", ("time", "train_seconds")),
        ("valid_seconds", ("time", "valid_seconds")),
    ):
        if key in entry:
            out[name] = float(entry[key])
    if entry.get("peak_rss_mib"):
        out["memory", "peak_rss_mib"] = float(max(entry["peak_rss_mib"]))
    out.update(dict(_numbers(("health",), entry.get("health") or {})))
    return out


def _numbers(prefix: Key, record: dict[str, Any]) -> Iterator[tuple[Key, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numbers((*prefix, str(key)), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield (*prefix, str(key)), float(value)


class Tracker:
    """The ``none`` tracker, and the interface of the others."""

    def log_epoch(
        self, epoch: int, entry: dict[str, Any], losses: Iterable[str], metric: str | None
    ) -> None:
        """Send one epoch's :func:`scalars`, at step ``epoch``."""

    def catch_up(self, entries: Iterable[dict[str, Any]], metric: str | None) -> None:
        """Send what this tracker has not received of ``entries`` (``log.jsonl``'s, their
        losses read from them: :func:`~aftrec.training.rundir.entry_losses`), each scalar of
        each step once: the epochs of a failed write, or of a run tracked from a resume on."""

    def close(self, ok: bool = True) -> None:
        """Flush and end; ``ok`` False: the run stopped on an error."""


class _Backend(Tracker, ABC):
    """A tracker that writes somewhere: it names the scalars, sends them and says which it
    holds already."""

    def log_epoch(
        self, epoch: int, entry: dict[str, Any], losses: Iterable[str], metric: str | None
    ) -> None:
        values = _items(entry, losses, metric)
        names = self._names(values)
        self._send(epoch, {names[k]: v for k, v in values.items()})

    def catch_up(self, entries: Iterable[dict[str, Any]], metric: str | None) -> None:
        from aftrec.training.rundir import entry_losses

        epochs = []
        for entry in entries:
            values = _items(entry, entry_losses(entry), metric)
            names = self._names(values)  # of every scalar of the epoch, as log_epoch names them
            epochs.append((int(entry["epoch"]), {names[k]: v for k, v in values.items()}))
        held = self._received({name for _, named in epochs for name in named})
        for epoch, named in epochs:
            missing = {name: v for name, v in named.items() if (name, epoch) not in held}
            if missing:
                self._send(epoch, missing)
                held.update((name, epoch) for name in missing)

    def _names(self, keys: Iterable[Key]) -> dict[Key, str]:
        return {key: "/".join(key) for key in keys}

    @abstractmethod
    def _received(self, names: set[str]) -> set[tuple[str, int]]:
        """The (name, step) pairs of ``names`` the tracker holds."""

    @abstractmethod
    def _send(self, step: int, values: dict[str, float]) -> None:
        """Write ``values`` (by name) at ``step``."""

    @abstractmethod
    def abandon(self) -> None:
        """Let go after a failed write, as far as the backend still can; raises nothing."""


class TensorBoardTracker(_Backend):
    """Event files in TensorBoard's format, written by the training process itself, one file
    per ``train`` or ``--resume``: torch's ``SummaryWriter`` writes from a thread of its own,
    whose failed write was a traceback the run could not catch."""

    def __init__(self, folder: Path, cfg: RunConfig) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import text

        self.held = _events(folder)  # what the files of earlier processes hold
        folder.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^\w.-]", "_", socket.gethostname())
        name = f"events.out.tfevents.{_stamp(folder):010d}.{host}.{os.getpid()}"
        self.file = open(folder / name, "xb")  # noqa: SIM115  (open until close)
        try:
            self.records = RecordWriter(self.file)
            self._write(file_version="brain.Event:2")
            if not self.held:  # a new folder: the config once (at step 0, where it belongs)
                # indented four spaces: a code block in TensorBoard's markdown
                config = "".join(f"    {x}\n" for x in dump(cfg).splitlines())
                self._write(step=0, summary=text("config", config))
        except BaseException:
            self.file.close()
            raise

    def _write(self, **fields: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.records.write(Event(wall_time=time.time(), **fields).SerializeToString())
        self.records.flush()  # an epoch is long; a killed run keeps what it logged

    def _received(self, names: set[str]) -> set[tuple[str, int]]:
        return {(tag, step) for tag, step in self.held if tag in names}

    def _send(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        scalars = [Summary.Value(tag=name, simple_value=v) for name, v in values.items()]
        self._write(step=step, summary=Summary(value=scalars))

    def close(self, ok: bool = True) -> None:
        self.file.close()

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def _events(folder: Path) -> set[tuple[str, int]]:
    """The (tag, step) of every value in the event files of ``folder``: none in a new one. A
    record a killed process left half-written ends its file's reading."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    if not folder.is_dir():
        return set()
    held: set[tuple[str, int]] = set()
    for path in sorted(folder.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            held.update((value.tag, event.step) for value in event.summary.value)
    return held


def _stamp(folder: Path) -> int:
    """The seconds in a new event file's name: now, or after the latest file there, since
    TensorBoard reads a folder's files in the order of their names."""
    stamps = [p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*")]
    return max([int(time.time()), *(int(t) + 1 for t in stamps if t.isdigit())])


class MLflowTracker(_Backend):
    EXPERIMENT = "aftrec"

    def __init__(self, folder: Path, cfg: RunConfig, resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        os.environ.setdefault(ALLOW_FILE_STORE, "true")  # check() refused any other value
        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        exp = self.client.get_experiment_by_name(self.EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.EXPERIMENT)
        earlier = self.client.search_runs([exp_id], max_results=1) if resume else []
        self.new = not earlier
        if earlier:  # a resumed run continues its MLflow run (params stay as first logged)
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            # named after the run's folder and the one above it: aft/seed0 in a report
            run = folder.resolve().parent
            name = "/".join(p.name for p in (run.parent, run) if p.name)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, str(v)) for k, v in _flat(cfg.to_dict())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, dump(cfg), "config.yaml")

    def _names(self, keys: Iterable[Key]) -> dict[Key, str]:
        return _mlflow_names(keys)

    def _received(self, names: set[str]) -> set[tuple[str, int]]:
        if self.new:
            return set()
        history = self.client.get_metric_history
        return {(name, m.step) for name in names for m in history(self.run_id, name)}

    def _send(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, v, now, step) for name, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def abandon(self) -> None:
        with contextlib.suppress(Exception):  # the store may be what failed
            self.client.set_terminated(self.run_id, "FAILED")


class _Guarded(Tracker):
    """A backend whose failure stops tracking with one warning, and not the run: the epoch
    is in ``last.pt`` and ``log.jsonl`` already, and ``--resume`` sends what it missed."""

    def __init__(self, backend: _Backend, folder: Path, run: Path) -> None:
        self.backend: _Backend | None = backend
        self.folder = folder
        self.run = run

    def log_epoch(
        self, epoch: int, entry: dict[str, Any], losses: Iterable[str], metric: str | None
    ) -> None:
        self._do(lambda backend: backend.log_epoch(epoch, entry, losses, metric))

    def catch_up(self, entries: Iterable[dict[str, Any]], metric: str | None) -> None:
        self._do(lambda backend: backend.catch_up(entries, metric))

    def close(self, ok: bool = True) -> None:
        self._do(lambda backend: backend.close(ok))
        self.backend = None

    def _do(self, call: Callable[[_Backend], None]) -> None:
        backend = self.backend
        if backend is None:
            return
        try:
            call(backend)
        except Exception as exc:
            from aftrec.training.rundir import LOG

            log.debug("traceback", exc_info=True)
            log.warning(
                "%s: tracking stopped, a write failed (%s); the run goes on, %s keeps every "
                "epoch, and `aftrec train --resume --out %s` sends the tracker what it missed "
                "once the folder can be written",
                self.folder, _reason(exc), self.run / LOG, self.run,
            )  # fmt: skip
            backend.abandon()
            self.backend = None


def _unusable(folder: Path, why: str) -> OutputError:
    from aftrec.training.rundir import LOG

    return OutputError(
        f"cannot track the run in {folder}: {why}; repair the folder or remove it (a resumed "
        f"run sends a new one every epoch of {LOG})"
    )


def _reason(exc: Exception) -> str:
    """What went wrong, in one short line (a YAML parser's or MLflow's message spans lines)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


#: what a part of an MLflow name may not hold: MLflow takes word characters (Unicode ones too),
#: ``-``, ``.``, space and ``/`` between parts, and ``:`` off Windows only (so not here)
_REFUSED = re.compile(r"[^\w.\- ]")
#: a part's longest name, in bytes of UTF-8: MLflow keeps it as a file name (255 bytes at most
#: on common file systems), and a suffix of up to 41 may follow it
_LONGEST_PART = 100


def _mlflow_names(keys: Iterable[Key]) -> dict[Key, str]:
    """The MLflow name of each of ``keys`` (the scalars of one epoch): names MLflow takes, one
    per key, distinct (the module's docstring says how), and the same for the same keys."""
    out: dict[Key, str] = {}
    _name_parts(list(keys), 0, "", out)
    return out


def _name_parts(keys: list[Key], depth: int, prefix: str, out: dict[Key, str]) -> None:
    """Name part ``depth`` of ``keys`` (which share the parts before it, named ``prefix``).
    Parts beside each other must differ, in case too: a part is a file or folder of MLflow's
    file store, and a name and a folder of the same name cannot be one (``True``: the part
    ends its name)."""
    groups: dict[tuple[str, bool], list[Key]] = {}
    for key in keys:
        groups.setdefault((key[depth], len(key) == depth + 1), []).append(key)
    wanted = {group: _mlflow_part(group[0]) for group in groups}
    same = Counter(name.casefold() for name in wanted.values())
    for digits in (8, 40):  # 40: a suffixed part met another part itself (not seen yet)
        names = {
            group: f"{name}_{_sha1(group[0] + ('' if group[1] else '/'))[:digits]}"
            if same[name.casefold()] > 1
            else name
            for group, name in wanted.items()
        }
        if len({name.casefold() for name in names.values()}) == len(names):
            break
    for (part, last), members in groups.items():
        name = prefix + names[part, last]
        if last:
            out[members[0]] = name
        else:
            _name_parts(members, depth + 1, name + "/", out)


def _mlflow_part(part: str) -> str:
    safe = _REFUSED.sub("_", part.replace("@", "_at_"))
    if not safe.strip("."):  # "", ".", "..": MLflow would resolve it as a path
        safe = "_" * max(len(safe), 1)
    if len(safe.encode()) > _LONGEST_PART:  # 90 CJK characters are 270 bytes
        cut = safe.encode()[: _LONGEST_PART - 9].decode(errors="ignore")  # whole characters
        safe = f"{cut}_{_sha1(part)[:8]}"
    return safe


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def check(kind: TrackerKind) -> None:
    """Raise :class:`ConfigError` (one line) when ``kind``'s package is not installed, or, for
    ``mlflow``, when the environment turns MLflow's file store off; called before a run writes
    anything."""
    if kind == "none":
        return
    allow = os.environ.get(ALLOW_FILE_STORE)
    if kind == "mlflow" and allow is not None and allow.lower() not in ("true", "1"):
        # the user's own setting is kept: aftrec's MLflow tracker has only the file store
        raise ConfigError(
            f"train.tracker=mlflow writes a local MLflow file store, which "
            f"{ALLOW_FILE_STORE}={allow!r} in the environment turns off: unset it or set it "
            "to true (or choose another train.tracker)"
        )
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        else:
            import mlflow  # noqa: F401
    except ImportError as exc:
        package = "tensorboard" if kind == "tensorboard" else "mlflow (or mlflow-skinny)"
        raise ConfigError(
            f"train.tracker={kind} needs the {package} package, which is not installed "
            f"({exc}): {EXTRA}"
        ) from exc


def start(kind: TrackerKind, run: Path, cfg: RunConfig, resume: bool) -> Tracker:
    """The tracker of a run (its files under ``run``), with the config sent. A folder it
    cannot read or write (a file in its place, no permission, a damaged MLflow store) raises
    :class:`OutputError` naming it; a write that fails later is one warning (tracking stops,
    the run goes on)."""
    from aftrec.training import rundir

    check(kind)
    if kind == "none":
        return Tracker()
    run = Path(run)
    folder = run / (rundir.TENSORBOARD if kind == "tensorboard" else rundir.MLFLOW)
    if folder.exists() and not folder.is_dir():
        raise _unusable(folder, "it is a file, not a folder")
    try:
        backend: _Backend = (
            TensorBoardTracker(folder, cfg)
            if kind == "tensorboard"
            else MLflowTracker(folder, cfg, resume)
        )
    except Exception as exc:  # OSError, and each backend's own: MLflow's, its YAML parser's
        log.debug("traceback", exc_info=True)
        raise _unusable(folder, _reason(exc)) from exc
    return _Guarded(backend, folder, run)


__all__ = ["Tracker", "check", "scalars", "start"]
