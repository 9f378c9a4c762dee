"""The run directory: the one module that writes and reads it.

A run directory holds::

    config.yaml   the resolved config (defaults + YAML + overrides)
    run.json      dataset path, model name, the environment (:mod:`aftrec.environment`)
    last.pt       the latest state (model, optimisers, RNG, epoch, early-stopping counters)
    best.pt       the model weights of the best validation epoch
    log.jsonl     one line per epoch: losses, validation metric, throughput, wall seconds
    metrics*.json, per_user*.parquet
                  ``aftrec evaluate``'s values of best.pt (``*_last``: of last.pt); removed
                  when the trainer replaces those weights (:func:`forget_evaluations`)
    tensorboard/  with ``train.tracker=tensorboard``: the event files (:mod:`.tracking`)
    mlruns/       with ``train.tracker=mlflow``: a local MLflow file store (:mod:`.tracking`)

The trainer writes it (:mod:`aftrec.training.trainer`); ``aftrec evaluate``, ``recommend``,
``export`` and ``reproduce`` read it through :func:`load_run`, :func:`epoch_log` and
:func:`best_epoch_time`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from aftrec.config import RunConfig, dump, read_yaml, resolve, with_legacy_values
from aftrec.data.dataset import Dataset
from aftrec.environment import versions
from aftrec.errors import CheckpointError, DataError
from aftrec.models.base import RetrievalModel
from aftrec.numerics import zero_subnormals
from aftrec.outputs import atomic_write_text, left_by_the_dead, output_error
from aftrec.registry import create_model
from aftrec.training import checkpoint

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
META = "run.json"
LAST = "last.pt"
BEST = "best.pt"
LOG = "log.jsonl"
LOCK = "run.lock"  # held by the process training the run (aftrec.outputs.held)
TENSORBOARD = "tensorboard"
MLFLOW = "mlruns"
#: what a fresh run writes into its folder besides run.json and the checkpoints
WRITES = (CONFIG, LOG, TENSORBOARD, MLFLOW)


def write_config(run: Path, cfg: RunConfig) -> None:
    atomic_write_text(Path(run) / CONFIG, dump(cfg))


def load_run_config(run: Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    # keys an earlier version did not save take the values that run computed with
    return resolve(None, None, overrides or [], base=with_legacy_values(read_yaml(path)))


def data_fingerprint(data_dir: Path) -> str:
    """What tells one prepared dataset from another without reading its rows: the sha256 of
    its ``meta.json`` (less the preparation's duration and the raw files' path) and of the
    path and size of every file the prepared format owns (:data:`~aftrec.data.prepared.WRITES`;
    not what else lies in the folder: recommendations, runs, notes). The same preparation
    gives the same fingerprint wherever the folder lies; another log of the same shape does
    not (its counts or its files' sizes)."""
    import hashlib

    from aftrec.data.prepared import WRITES

    folder = Path(data_dir)
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("seconds", None)
    if isinstance(meta.get("source"), dict):
        meta["source"] = {k: v for k, v in meta["source"].items() if k != "path"}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(WRITES - {"meta.json"}):
        path = folder / name
        owned = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
        for p in (p for p in owned if p.is_file()):
            digest.update(f"{p.relative_to(folder).as_posix()}\0{p.stat().st_size}\0".encode())
    return digest.hexdigest()


def check_data(run: Path, data_dir: Path, warn: bool = True) -> None:
    """Refuse ``data_dir`` when ``run.json`` recorded another dataset's fingerprint. A run
    started by an older version records none: nothing to compare, which is said (``warn``),
    since a dataset prepared again since (another split) would pass unseen."""
    recorded = recorded_fingerprint(run)
    if recorded is None and warn and (Path(data_dir) / "meta.json").is_file():
        log.warning(
            "%s was started by an earlier version, which recorded no fingerprint of its "
            "dataset: that %s is the dataset it trained on cannot be checked",
            run, data_dir,
        )  # fmt: skip
    if recorded is None or not (Path(data_dir) / "meta.json").is_file():
        return
    try:
        same = data_fingerprint(data_dir) == recorded
    except (OSError, ValueError) as exc:
        raise DataError(f"{data_dir}: cannot read its meta.json ({exc})") from exc
    if not same:
        raise DataError(
            f"{data_dir} is not the dataset {run} was trained on: its counts, settings or "
            "files' sizes differ from those recorded when the run started (prepared again, "
            "or another dataset of the same shape)"
        )


def holds_run_data(run: Path, data_dir: Path) -> bool:
    """Whether ``data_dir`` holds the dataset ``run`` trained on: a prepared dataset with the
    recorded fingerprint (any prepared dataset, for an older run that recorded none)."""
    if not (Path(data_dir) / "meta.json").is_file():
        return False
    try:
        check_data(run, data_dir, warn=False)
    except DataError:
        return False
    return True


def recorded_fingerprint(run: Path) -> str | None:
    """The fingerprint ``run.json`` recorded when the run started (None: an older run)."""
    value = _read_meta(run).get("data_fingerprint")
    return value if isinstance(value, str) else None


def write_meta(run: Path, data_dir: Path, model: str) -> None:
    """``run.json``: the dataset the run trains on (where, and its :func:`data_fingerprint`),
    the model, versions and start time."""
    meta = {
        "data": str(Path(data_dir).resolve()),
        "data_fingerprint": data_fingerprint(data_dir),
        "model": model,
        **versions("aftrec", "torch", "python"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(Path(run) / META, json.dumps(meta, indent=2) + "\n")


def run_data_dir(run: Path) -> Path:
    """The prepared dataset a run was trained on, from ``RUN/run.json``."""
    return Path(_read_meta(run)["data"])


def _read_meta(run: Path) -> dict[str, Any]:
    path = Path(run) / META
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta["data"], str):
            raise TypeError(f'"data" is {meta["data"]!r}, not a path')
    except FileNotFoundError as exc:
        raise CheckpointError(f"{run} is not a run directory (no run.json)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable run description ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable run description (not an object)")
    return meta


def record_data(run: Path, data_dir: Path) -> bool:
    """``--resume --data DIR`` after the dataset moved: ``run.json`` names ``DIR`` from now
    on, so that ``evaluate``, ``export`` and a later resume find it. True when it changed."""
    meta = _read_meta(run)
    where = str(Path(data_dir).resolve())
    if meta["data"] == where:
        return False
    log.info("%s: run.json now names %s as its dataset (it named %s)", run, where, meta["data"])
    atomic_write_text(Path(run) / META, json.dumps({**meta, "data": where}, indent=2) + "\n")
    return True


def missing_data(run: Path, data_dir: Path) -> CheckpointError:
    """The error for a run whose recorded dataset is no longer a prepared dataset."""
    return CheckpointError(
        f"{run} was trained on {data_dir}, which is not a prepared dataset now; if it moved, "
        f"`aftrec train --resume --out {run} --data NEW_PLACE` records where it is (a finished "
        "run trains nothing more)"
    )


def load_run(run: Path, which: str = "best") -> tuple[RunConfig, Dataset, RetrievalModel]:
    """The config, dataset and model weights of a finished (or interrupted) run, subnormal
    weights set to zero (:mod:`aftrec.numerics`): a trained model's decayed weights would
    otherwise make its evaluation, recommendations and exported bundle slow."""
    run = Path(run)
    cfg = load_run_config(run)
    data_dir = run_data_dir(run)
    if not (data_dir / "meta.json").is_file():
        raise missing_data(run, data_dir)
    check_data(run, data_dir)
    data = Dataset(data_dir)
    model = create_model(cfg.model_name, cfg.model, data.info, cfg.data.history_len)
    state = checkpoint.load(run / f"{which}.pt")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:  # not a state dict
        raise CheckpointError(
            f"{run / f'{which}.pt'}: does not fit model {cfg.model_name!r}: {exc}"
        ) from exc
    tensors = itertools.chain(model.parameters(), model.buffers())
    if not all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point()):
        raise CheckpointError(  # a diverged model scores NaN, which ranks nothing
            f"{run / f'{which}.pt'}: its weights hold NaN or infinite values (training "
            "diverged); it cannot rank items"
        )
    zero_subnormals(model)
    model.eval()
    return cfg, data, model


#: the files of ``aftrec evaluate`` (``api.metrics_path`` and the per-user values beside it)
EVALUATION = re.compile(
    r"(?:metrics(?P<m>(?:_valid)?(?:_sampled\d+)?(?P<ml>_last)?)\.json"
    r"|per_user(?:_valid)?(?:_sampled\d+)?(?P<pl>_last)?\.parquet)"
)


def forget_evaluations(run: Path, which: str) -> None:
    """Remove the evaluations (``metrics*.json``, ``per_user*.parquet``, as ``aftrec evaluate``
    names them) of the ``which`` weights, ``"best"`` (best.pt) or ``"last"`` (last.pt, the
    ``*_last`` files), as the trainer replaces them (before and after it writes the new file,
    so that an evaluation that ends between the two is removed too): they would describe
    weights no longer in the run (a run resumed after ``aftrec evaluate`` kept the old values
    beside its new best). Other files stay; one that cannot be removed is a warning."""
    for path in Path(run).iterdir():
        m = EVALUATION.fullmatch(path.name)
        if m is None or bool(m["ml"] or m["pl"]) != (which == "last"):
            continue
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s, of weights now replaced: %s", path, exc)


def clear(run: Path) -> None:
    """Remove what a run killed before its first checkpoint may have left."""
    for name in (BEST, LOG, CONFIG, META):
        (Path(run) / name).unlink(missing_ok=True)
    for name in (TENSORBOARD, MLFLOW):
        shutil.rmtree(Path(run) / name, ignore_errors=True)


def clear_trackers(run: Path) -> None:
    """Remove the tracker folders a run killed before its first checkpoint left, for the new
    run that replaces it (the trainer refuses a folder holding a checkpoint): it would add a
    second MLflow run beside the stale one, a second config to TensorBoard's."""
    for name in (TENSORBOARD, MLFLOW):
        path = Path(run) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise output_error(path, exc) from exc


def remove_temporaries(run: Path) -> None:
    """Remove the ``.*.tmp`` files of a killed writer (before resuming): those of the
    trainer's own files whoever left them (the resume holds the run's lock, so no other
    trainer writes them), the others (an ``aftrec evaluate`` writing its metrics) only when
    their writer, a process of this host, is gone."""
    own = (LAST, BEST, CONFIG, META, LOG)
    for stale in Path(run).glob(".*.tmp"):
        if any(stale.name.startswith(f".{name}.") for name in own) or left_by_the_dead(stale):
            stale.unlink(missing_ok=True)


def weights_identity(run: Path, which: str) -> tuple[int, int, int] | None:
    """What tells the ``which`` checkpoint (``best`` or ``last``) from the one that replaces
    it (the trainer writes a new file and renames it into place): inode, size and mtime;
    None when there is none."""
    try:
        stat = (Path(run) / f"{which}.pt").stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def repair_log(run: Path, state: dict[str, Any]) -> None:
    """Append the entry ``last.pt`` holds of its epoch when ``log.jsonl`` has none: a process
    killed between writing the checkpoint and the line lost the line for good (a resume goes
    on after that epoch, and a finished run trains nothing), and the reports read the log."""
    try:  # the line as JSON text: a model's health values may be numpy numbers, which a
        entry = json.loads(state.get("entry") or "null")  # weights-only load refuses
    except (TypeError, ValueError):
        return
    if not isinstance(entry, dict) or not _is_entry(entry) or entry["epoch"] != state.get("epoch"):
        return  # another epoch's (a checkpoint edited by hand): not what the log lacks
    if not any(e["epoch"] == entry["epoch"] for e in epoch_log(run)):
        append_log(run, entry)


def append_log(run: Path, entry: dict[str, Any]) -> None:
    """One epoch's line of ``log.jsonl``, on a line of its own even after a line that a
    killed process left half-written."""
    with open(Path(run) / LOG, "a+b") as fh:
        torn = fh.tell() > 0 and (fh.seek(-1, 2), fh.read(1))[1] != b"\n"
        fh.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")


#: the damaged logs this process has warned about, as (path, size, mtime): a report reads
#: each run's log for several tables, and one warning per file is enough
_WARNED: set[tuple[str, int, int]] = set()


def epoch_log(run: Path) -> list[dict[str, Any]]:
    """The entries of a run's ``log.jsonl``, one per epoch; empty without a log. A line that
    is not an epoch's entry (half-written by a killed process) is left out, with a warning
    (once per file and content in a process)."""
    path = Path(run) / LOG
    try:
        lines = path.read_text(errors="replace").splitlines()
        stat = path.stat()
    except OSError:
        return []
    entries, bad = [], 0
    for line in filter(str.strip, lines):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and _is_entry(entry):
            entries.append(entry)
        else:
            bad += 1
    seen = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if bad and seen not in _WARNED:
        _WARNED.add(seen)
        log.warning("%s: left out %d line(s) that are not an epoch's entry", path, bad)
    return entries


def _is_entry(entry: dict[str, Any]) -> bool:
    """An epoch's entry: an integer epoch, and numbers wherever the readers add or compare
    (the wall seconds and the validation values)."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    summed = [v for k, v in entry.items() if k.endswith("_seconds") or k.startswith("valid_")]
    epoch = entry.get("epoch")
    return isinstance(epoch, int) and not isinstance(epoch, bool) and all(map(number, summed))


#: the fields the trainer writes into an epoch's entry besides the step's losses (and
#: ``valid_<metric>``)
_ENTRY_FIELDS = frozenset(
    {"epoch", "health", "ranks", "peak_rss_mib", "examples_per_second", "train_seconds",
     "valid_seconds"}
)  # fmt: skip


def entry_losses(entry: dict[str, Any]) -> list[str]:
    """The loss names of an epoch's entry: the numbers beside the trainer's own fields (a
    model's losses are its own, ``loss`` or ``loss_d`` and ``loss_g``), for whoever reads the
    log without the model: a tracker catching up."""
    return [
        k
        for k, v in entry.items()
        if k not in _ENTRY_FIELDS
        and not k.startswith("valid_")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    ]


def stopped_early(run: Path) -> bool | None:
    """How a trained run ended, as its ``last.pt`` records it: True when early stopping ended
    it (``train.patience`` epochs without improvement), False when it ran to ``train.epochs``.
    None when that file cannot say: a run not finished, a closed-form fit (no epochs), no
    readable ``last.pt`` (a report directory copied without its checkpoints)."""
    try:
        state = checkpoint.load(Path(run) / LAST)
    except CheckpointError:
        return None
    if not state.get("done") or "stopped_early" not in state:
        return None
    return bool(state["stopped_early"])


def best_epoch_time(run: Path, metric: str = "valid_recall@50") -> tuple[int, float | None]:
    """The best validation epoch of a run (the first with the highest ``metric``, as the
    trainer keeps it; the last epoch when every value is NaN, a run without a validation
    part) and the wall seconds of training and validation up to and including it, from
    ``log.jsonl``; ``(0, None)`` without a log, seconds ``None`` for logs written before the
    trainer recorded them."""
    entries = epoch_log(run)
    scored = [e for e in entries if metric in e]
    if not scored:
        return 0, None
    if all(math.isnan(e[metric]) for e in scored):
        best = scored[-1]
    else:  # max keeps the first of equal values; a NaN is never above a number
        best = max(scored, key=lambda e: -math.inf if math.isnan(e[metric]) else e[metric])
    upto = [e for e in entries if e["epoch"] <= best["epoch"]]
    if not all("train_seconds" in e and "valid_seconds" in e for e in upto):
        return int(best["epoch"]), None
    return int(best["epoch"]), sum(e["train_seconds"] + e["valid_seconds"] for e in upto)
