"""Per-domain behaviour histories without leakage.

A :class:`HistoryIndex` holds a set of positive behaviours grouped by (user, domain) and
ordered in time. :meth:`HistoryIndex.before` answers, for a batch of (user, time) queries, the
last ``L`` behaviours of each domain strictly before that time: the input of a training example
whose target was clicked at ``t`` never contains anything from ``t`` on. At evaluation time the
query time is +inf, i.e. the whole history the index was built from.

Everything is vectorised: one ``searchsorted`` per (query, domain) on a flat sorted key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aftrec.data.dataset import DataInfo, Interactions


@dataclass(frozen=True)
class Histories:
    items: np.ndarray  # (B, D, L) int64 global item indices, right-aligned, pad = n_items
    counts: np.ndarray  # (B, D) int64 number of behaviours before the query (not clipped to L)
    times: np.ndarray  # (B, D, L) float64 time of each behaviour in ``items`` (0 at padding)


def _dense_rank(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each value's index among them), by one argsort (a
    ``searchsorted`` of millions of values into millions is cache-bound and ~10x slower)."""
    order = np.argsort(values, kind="stable")
    s = values[order]
    new = np.ones(len(s), dtype=bool)
    np.not_equal(s[1:], s[:-1], out=new[1:])
    rank = np.empty(len(s), dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    return s[new], rank


def _segment_order(seg: np.ndarray, rank: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (seg, rank, item). Interactions split with ``--ties item``
    come sorted by (user, time, item), so a stable sort on ``seg`` alone gives it (checked in
    one pass); others (ties drawn at random) are sorted again, on the three keys packed into
    one where they fit."""
    order = np.argsort(seg, kind="stable")
    s, r, i = seg[order], rank[order], item[order]
    same = s[1:] == s[:-1]
    ok = ~same | (r[1:] > r[:-1]) | ((r[1:] == r[:-1]) & (i[1:] >= i[:-1]))
    if ok.all():
        return order
    n_r, n_i = int(rank.max()) + 1, int(item.max()) + 1
    if min(int(seg.min()), int(item.min())) >= 0 and (int(seg.max()) + 1) * n_r * n_i < 2**62:
        # the three keys packed into one: a sort several times faster than the lexsort
        return np.argsort((seg.astype(np.int64) * n_r + rank) * n_i + item, kind="stable")
    return np.lexsort((item, rank, seg))


class HistoryIndex:
    """Behaviours sorted by (user, domain, time) with one segment per (user, domain)."""

    def __init__(self, inter: Interactions, info: DataInfo) -> None:
        self.info = info
        n_dom = info.n_domains
        seg = inter.user.astype(np.int64) * n_dom + inter.domain.astype(np.int64)
        self._times, rank = _dense_rank(inter.timestamp.astype(np.float64))
        order = _segment_order(seg, rank, inter.item)
        self._stride = len(self._times) + 1
        self._key = seg[order] * self._stride + rank[order]
        self.items = inter.item[order].astype(np.int64)
        self.times = inter.timestamp.astype(np.float64)[order]
        n_seg = info.n_users * n_dom
        self.seg_start = np.searchsorted(seg[order], np.arange(n_seg + 1))  # (U*D + 1,)

    def segments(self, users: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) offsets into :attr:`items` of each user's behaviours in ``domain``."""
        seg = users.astype(np.int64) * self.info.n_domains + domain
        return self.seg_start[seg], self.seg_start[seg + 1]

    def before(self, users: np.ndarray, times: np.ndarray | None, length: int) -> Histories:
        """Last ``length`` behaviours per domain strictly before ``times`` (None = all)."""
        users = np.asarray(users, dtype=np.int64)
        n_dom = self.info.n_domains
        seg = users[:, None] * n_dom + np.arange(n_dom)[None, :]  # (B, D)
        lo = self.seg_start[seg]
        if times is None:
            hi = self.seg_start[seg + 1]
        else:
            q = np.searchsorted(self._times, np.asarray(times, dtype=np.float64), side="left")
            hi = np.searchsorted(self._key, seg * self._stride + q[:, None], side="left")
        idx = hi[..., None] - length + np.arange(length)  # (B, D, L)
        valid = idx >= lo[..., None]
        if len(self.items) == 0:
            items = np.full(idx.shape, self.info.pad, dtype=np.int64)
            return Histories(items=items, counts=hi - lo, times=np.zeros(idx.shape))
        safe = np.clip(idx, 0, len(self.items) - 1)
        items = np.where(valid, self.items[safe], self.info.pad)
        times = np.where(valid, self.times[safe], 0.0)
        return Histories(items=items, counts=hi - lo, times=times)

    def seen_mask(self, users: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray]:
        """Sparse (row, column) pairs of the behaviours of ``users`` in ``domain``, the column
        being the item's position inside the domain; used to mask seen items in rankings."""
        lo, hi = self.segments(users, domain)
        lengths = hi - lo
        rows = np.repeat(np.arange(len(users)), lengths)
        flat = np.repeat(lo - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return rows, self.items[flat] - self.info.offsets[domain]
