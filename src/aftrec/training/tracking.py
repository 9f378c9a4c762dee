"""Run tracking: ``train.tracker`` sends a run's config and, every epoch, its losses, validation
metric, throughput, wall seconds, memory and (AFT) G's health figures to TensorBoard or
MLflow. ``none``, the default, sends nothing. Rank 0 alone tracks. Both write inside the run
directory (:data:`aftrec.training.rundir.TENSORBOARD`, :data:`~aftrec.training.rundir.MLFLOW`):

* ``tensorboard``: event files written by torch's own ``torch.utils.tensorboard.SummaryWriter``
  (``tensorboard --logdir RUN/tensorboard``); the config is the text ``config``;
* ``mlflow``: a local MLflow file store, experiment ``aftrec``, one MLflow run per aftrec run
  (``--resume`` continues it); the config as flattened params and the artifact
  ``config.yaml`` (``mlflow ui --backend-store-uri RUN/mlruns``). MLflow 3 keeps the file store
  behind ``MLFLOW_ALLOW_FILE_STORE``: unset, it is set to ``true`` for this process; set to
  anything else than ``true`` or ``1`` (the user turned the file store off), the run is
  refused before it writes anything, with one ``error:`` line.

Each epoch's scalars are named ``train/<loss>``, ``valid/<metric>`` (``valid/recall@50``),
``health/<figure>`` (``health/distinct_share/<domain>`` for per-domain figures),
``speed/examples_per_second``, ``time/train_seconds``, ``time/valid_seconds`` and
``memory/peak_rss_mib`` (the largest rank's), with the epoch as the step. MLflow's names are
the same, part by part (the parts between those ``/``), where MLflow takes them: ``@`` is
written ``_at_``; any other character but a letter, digit, ``_``, ``-``, ``.`` or space (a ``/``
inside a domain's name too) is written ``_``; a part of dots alone (``..``), or none, becomes
underscores, since MLflow keeps a name as a file path; a part over 100 characters is cut. Where
two parts beside each other would then be the same, or differ in case only (one file on a
case-insensitive disk), as ``a&b`` and ``a_b``, each gets ``_`` and the first 8 hex digits of
its own sha1: every domain has its name, the same in every epoch.

The backends are the ``tracking`` extra (``pip install 'aftrec[tracking]'``); a tracker whose
package is missing stops the run before it starts, with one ``error:`` line.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aftrec.config import RunConfig, TrackerKind, dump
from aftrec.errors import ConfigError

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

    def close(self, ok: bool = True) -> None:
        """Flush and end; ``ok`` False: the run stopped on an error."""


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        # indented four spaces: a code block in TensorBoard's markdown
        self.writer.add_text("config", "".join(f"    {x}\n" for x in dump(cfg).splitlines()))
        self.writer.flush()

    def log_epoch(
        self, epoch: int, entry: dict[str, Any], losses: Iterable[str], metric: str | None
    ) -> None:
        for name, value in scalars(entry, losses, metric).items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()  # an epoch is long; a killed run keeps what it logged

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    EXPERIMENT = "aftrec"

    def __init__(self, folder: Path, cfg: RunConfig, resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        os.environ.setdefault(ALLOW_FILE_STORE, "true")  # check() refused any other value
        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        exp = self.client.get_experiment_by_name(self.EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.EXPERIMENT)
        earlier = self.client.search_runs([exp_id], max_results=1) if resume else []
        if earlier:  # a resumed run continues its MLflow run (params stay as first logged)
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=folder.parent.name).info.run_id
            params = [Param(k, str(v)) for k, v in _flat(cfg.to_dict())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, dump(cfg), "config.yaml")

    def log_epoch(
        self, epoch: int, entry: dict[str, Any], losses: Iterable[str], metric: str | None
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = _items(entry, losses, metric)
        names = _mlflow_names(values)
        metrics = [Metric(names[k], v, now, epoch) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


#: what a part of an MLflow name may not hold: MLflow takes word characters (Unicode ones too),
#: ``-``, ``.``, space and ``/`` between parts, and ``:`` off Windows only (so not here)
_REFUSED = re.compile(r"[^\w.\- ]")
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
    if len(safe) > _LONGEST_PART:
        safe = f"{safe[: _LONGEST_PART - 9]}_{_sha1(part)[:8]}"
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
    """The tracker of a run (its files under ``run``), with the config sent."""
    from aftrec.training import rundir

    check(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run) / rundir.TENSORBOARD, cfg)
    if kind == "mlflow":
        return MLflowTracker(Path(run) / rundir.MLFLOW, cfg, resume)
    return Tracker()


__all__ = ["Tracker", "check", "scalars", "start"]
