"""Significance of the primary model against the best competitor: pure functions.

For each column (domain, metric), ``aft`` against the best other row by mean over seeds:

* over users: Wilcoxon signed-rank test, two-sided, on the per-user values averaged over the
  seeds (pairs: the (user, domain) test cases of the column's domain; for the ``average``
  column every (user, domain) case). Recall per user is bounded and has many ties, so a
  rank test rather than a t-test; zero differences are dropped (``zero_method="wilcox"``).
* over seeds: paired t-test (``scipy.stats.ttest_rel``) on the per-seed column values,
  paired by seed; needs two seeds or more.

A test is significant when ``p < alpha`` (0.01, as in the paper) and the test's own
direction favours ``aft``: the mean paired difference for the t-test, the signed-rank sum
``W+ - W-`` for the Wilcoxon test (many small losses and a few large wins can give a positive
mean while the ranks say aft is worse); no correction for the number of columns (the paper
makes none).

Ablations (Table 6): ``aft`` against each row with one part switched off, with the same two
tests restricted to the seeds both rows have, so that each difference is paired by seed and
the per-user values are averaged over the same seeds on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aftrec.experiments.plan import PRIMARY
from aftrec.experiments.results import Cell, Column, EntryResult

if TYPE_CHECKING:
    import pandas as pd

# numpy, pandas and scipy are imported where they are used (``aftrec --help`` stays light).


@dataclass(frozen=True)
class PairedTest:
    p: float  # nan: not computable (too few pairs, no variance)
    n: int  # pairs used
    mean_diff: float  # mean of (aft - competitor) over the pairs
    #: the direction the test itself found (its sign is what counts): ``W+ - W-`` for the
    #: signed-rank test; None: the mean difference (the t-test's)
    direction: float | None = None

    @property
    def sign(self) -> float:
        """> 0 when the test finds ``aft`` ahead, < 0 behind."""
        return self.mean_diff if self.direction is None else self.direction

    def significant(self, alpha: float) -> bool:
        return math.isfinite(self.p) and self.p < alpha and self.sign > 0


def user_test(a: pd.DataFrame, b: pd.DataFrame, col: Column) -> PairedTest:
    """Wilcoxon signed-rank test over the (user, domain) pairs both frames have, with its
    direction ``W+ - W-``: the sum of the ranks of ``|d_i|`` (ties averaged) over the nonzero
    differences ``d_i = a_i - b_i``, each signed as ``d_i``.

    ``a``, ``b``: per-user frames (``user_idx``, ``domain``, metric columns), one row per
    (user, domain), e.g. averaged over seeds. ``col.domain == "average"`` uses every domain.
    """
    import numpy as np
    from scipy.stats import rankdata, wilcoxon

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
    nonzero = diff[diff != 0]
    direction = float((np.sign(nonzero) * rankdata(np.abs(nonzero))).sum())
    return PairedTest(float(res.pvalue), len(diff), mean_diff, direction)


def _user_test_of(a: pd.DataFrame | None, b: pd.DataFrame | None, col: Column) -> PairedTest:
    """:func:`user_test`, or no test (p nan, no pairs) when a side has no per-user values."""
    if a is None or b is None:
        return PairedTest(float("nan"), 0, float("nan"))
    return user_test(a, b, col)


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
    # no variance: t undefined; so is a constant difference up to the rounding of the values
    # (a few ulps of them, whatever the size of the difference)
    rounding = 16 * np.finfo(np.float64).eps * max(np.abs(x).max(), np.abs(y).max())
    if len(seeds) < 2 or np.ptp(diff) <= rounding:
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
    """Mean over seeds of each (user, domain)'s metrics, summed in ascending order of the
    values: the same values in another seed order give the same mean to the last bit, so
    that two rows that agree make zero differences (which the signed-rank test drops)."""
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    keys = ["user_idx", "domain"]
    numeric = [c for c in frame.columns if c not in keys]
    out = frame.groupby(keys, as_index=False).size()[keys]  # the cases, in key order
    for c in numeric:
        ordered = frame.sort_values([*keys, c], kind="stable")
        out[c] = ordered.groupby(keys)[c].mean().to_numpy()
    return out


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

    ``per_user(key)`` returns the seed-averaged per-user frame of a row (or ``None``). The
    test over seeds pairs the rows by seed; a deterministic row's one run is paired with every
    seed of the other (which may have more seeds than the deterministic row lists)."""
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
        users = _user_test_of(per_user(primary), per_user(other), col)
        a, b = results[primary].values(col), results[other].values(col)
        # a deterministic row's one run stands beside each seed of the other side
        if results[other].deterministic and b:
            b = dict.fromkeys(a, next(iter(b.values())))
        elif results[primary].deterministic and a:
            a = dict.fromkeys(b, next(iter(a.values())))
        seeds = seed_test(a, b)
        out[col] = Significance(col, other, mine, theirs, users, seeds)
    return out


@dataclass(frozen=True)
class AblationTest:
    """``primary`` against one ablated row in one column, on the seeds both have."""

    variant: str
    column: Column
    seeds_used: tuple[int, ...]
    full: Cell  # ``primary`` on those seeds
    ablated: Cell
    users: PairedTest  # mean_diff: full - ablated
    seeds: PairedTest

    def verdict(self, alpha: float) -> str:
        """ "helps" (the part raises the column), "hurts", or "–": by the tests with
        ``p < alpha``, each named by its mark (``users``, ``seeds``)."""
        said = []
        for name, test in (("users", self.users), ("seeds", self.seeds)):
            if math.isfinite(test.p) and test.p < alpha and test.sign != 0:
                said.append((name, "helps" if test.sign > 0 else "hurts"))
        if not said:
            return "–"
        kinds = {v for _, v in said}
        if len(kinds) > 1:  # the two tests disagree in sign: say both
            return "; ".join(f"{v} over {n}" for n, v in said)
        return f"{kinds.pop()} (over {' and '.join(n for n, _ in said)})"


def ablation_tests(
    results: dict[str, EntryResult],
    variants: Sequence[str],
    columns: Sequence[Column],
    per_user: Any,
    primary: str = PRIMARY,
) -> list[AblationTest]:
    """``primary`` against every row of ``variants`` in every column, on the seeds both rows
    finished: a paired t-test over those seeds and a Wilcoxon signed-rank test over users on
    the per-user values averaged over them. ``per_user(key, seeds)`` returns that frame (or
    ``None``). Rows without a shared seed are left out."""
    out: list[AblationTest] = []
    if primary not in results:
        return out
    for key in variants:
        if key == primary or key not in results:
            continue
        shared = sorted(set(results[primary].ok()) & set(results[key].ok()))
        if not shared:
            continue
        a, b = per_user(primary, shared), per_user(key, shared)
        for col in columns:
            mine = {s: v for s, v in results[primary].values(col).items() if s in shared}
            theirs = {s: v for s, v in results[key].values(col).items() if s in shared}
            full, ablated = Cell.of(mine.values()), Cell.of(theirs.values())
            if full is None or ablated is None:
                continue
            users = _user_test_of(a, b, col)
            seeds = seed_test(mine, theirs)
            out.append(AblationTest(key, col, tuple(shared), full, ablated, users, seeds))
    return out
