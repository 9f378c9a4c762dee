"""What a reproduction produced: the result types every reader of it shares.

A table row is an *entry*: a model (``"aft"``) or a variant of the primary model, whose key is
``"aft/VARIANT"`` (an ablation such as ``aft/no-mask`` or a Fig. 3 point such as
``aft/fakes-3``; :func:`variant_key`, :func:`is_variant`). Each entry has one
:class:`RunOutcome` per seed (:class:`EntryResult`); a :class:`Cell` is the mean and spread of
a :class:`Column` (domain, metric) over the seeds.

``REPORT_DIR/results.json`` (written by :mod:`aftrec.experiments.report`) holds the same
entries; :func:`load_results` and :func:`finished` read it for the scripts in
``benchmarks/``, and :meth:`Cell.of` summarises the values they take from it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aftrec.data.dataset import Dataset
    from aftrec.experiments.plan import Entry, Plan
    from aftrec.experiments.stats import AblationTest, Significance

METRIC_NAMES = {"auc": "AUC"}


def variant_key(model: str, variant: str) -> str:
    """The entry key of a variant of ``model``: ``"aft/no-mask"``."""
    return f"{model}/{variant}"


def is_variant(key: str) -> bool:
    """Whether an entry key names a variant (ablation, sweep point) rather than a model."""
    return "/" in key


@dataclass(frozen=True)
class Column:
    domain: str  # a domain name or "average"
    metric: str  # a key of EvalResult: "recall@50", "auc", ...

    @property
    def metric_label(self) -> str:
        """The metric as the report's headers name it: ``r@50``, ``AUC``."""
        return METRIC_NAMES.get(self.metric, self.metric.replace("recall@", "r@"))

    @property
    def label(self) -> str:
        return f"{self.domain} {self.metric_label}"


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # nan for one seed
    n: int  # seeds
    #: the seeds' values it was made from, NaN or infinite ones too (None: ``n``); more than
    #: ``n`` where some seed had no finite value, which the report shows in the cell
    offered: int | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Cell | None:
        """Mean and sample std (ddof 1) of the finite values; None without any. ``offered``
        counts every value, so a cell of fewer seeds than its row's says so."""
        given = list(values)
        vals = [float(v) for v in given if v is not None and math.isfinite(v)]
        if not vals:
            return None
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return cls(statistics.fmean(vals), std, len(vals), len(given))

    @property
    def partial(self) -> bool:
        """Whether some of the seeds it was made from had no finite value."""
        return self.offered is not None and self.offered > self.n


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
        """Mean and std over the seeds; a deterministic row's one run counts once (its
        :meth:`values` repeat it under every seed, for the tests paired by seed)."""
        values = list(self.values(col).values())
        return Cell.of(values[:1] if self.deterministic else values)

    def runs(self) -> list[Path]:
        return sorted({o.run for s, o in self.outcomes.items() if o.ok})


def value(metrics: dict[str, Any], col: Column) -> float:
    part = metrics["average"] if col.domain == "average" else metrics["domains"].get(col.domain)
    if part is None or col.metric not in part or part[col.metric] is None:  # null: NaN
        return float("nan")
    return float(part[col.metric])


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
    trained: int  # runs trained or evaluated by this invocation, failed ones not counted
    reused: int  # finished runs read from REPORT_DIR
    failed: int
    pending: int = 0  # not run yet (--report-only)
    ablation_tests: list[AblationTest] = field(default_factory=list)  # aft against each


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


def load_results(report_dir: Path) -> dict[str, Any]:
    """``REPORT_DIR/results.json`` as written by ``aftrec reproduce``; a
    :class:`~aftrec.errors.ConfigError` naming the directory when there is none or it is not
    one."""
    from aftrec.errors import ConfigError

    path = Path(report_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(
            f"{report_dir}: no results.json of `aftrec reproduce` there ({exc.strerror})"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or "entries" not in data:
        raise ConfigError(f"{path} is not a results.json of `aftrec reproduce`")
    return data


def finished(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished seeds of an entry of ``results.json``; one run stands for every seed of a
    deterministic model."""
    done = [s for s in entry["seeds"].values() if s["ok"] and s["metrics"]]
    return done[:1] if entry["deterministic"] else done
