"""Per-user chronological splits.

Each user's positives are ordered by (timestamp, item); the last ``test_ratio`` of them
(at least one) go to test, and a validation part is carved the same way from the end of what
is left. Users with fewer than ``min_positives`` positives are dropped first.

For a user with ``n`` positives: ``n_test = max(1, floor(test_ratio * n))``; with
``m = n - n_test``, ``n_valid = max(1, floor(valid_ratio * m))`` (0 when ``valid_ratio`` is 0).
Every positive lands in exactly one of train, valid and test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aftrec.arrays import unique
from aftrec.errors import ConfigError, require_numbers

TRAIN, VALID, TEST = 0, 1, 2
PART_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitConfig:
    test_ratio: float = 0.2
    valid_ratio: float = 0.2
    min_positives: int = 5
    rating_threshold: float = 3.0

    def __post_init__(self) -> None:
        require_numbers(self, "split.")
        if not 0.0 < self.test_ratio < 1.0:
            raise ConfigError(
                f"split.test_ratio (--test-ratio) must be in (0, 1), got {self.test_ratio}"
            )
        if not 0.0 <= self.valid_ratio < 1.0:
            raise ConfigError(
                f"split.valid_ratio (--valid-ratio) must be in [0, 1), got {self.valid_ratio}"
            )
        if self.min_positives < 1:
            raise ConfigError(
                f"split.min_positives (--min-positives) must be >= 1, got {self.min_positives}"
            )
        if not math.isfinite(self.rating_threshold):
            raise ConfigError(f"--rating-threshold must be a number, got {self.rating_threshold}")


def chronological_order(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (user, timestamp, item): the order every split uses.

    The three keys are packed into one int64 (timestamps replaced by their dense rank) when
    they fit, which sorts several times faster than a three-key ``lexsort``.
    """
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64)
    times, rank = np.unique(timestamp, return_inverse=True)
    n_u, n_t, n_i = int(user.max()) + 1, len(times), int(item.max()) + 1
    if min(int(user.min()), int(item.min())) >= 0 and n_u * n_t * n_i < 2**62:
        key = (user.astype(np.int64) * n_t + rank) * n_i + item
        return np.argsort(key, kind="stable")
    return np.lexsort((item, timestamp, user))


def _position_in_user(user_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows grouped by user: (0-based position of each row in its user, that user's count)."""
    n = len(user_sorted)
    starts = (
        np.flatnonzero(np.r_[True, user_sorted[1:] != user_sorted[:-1]])
        if n
        else np.array([], np.int64)
    )
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)
    return pos, np.repeat(counts, counts)


def keep_active_users(user: np.ndarray, min_positives: int) -> np.ndarray:
    """Boolean mask of rows whose user has at least ``min_positives`` rows."""
    _, inverse, counts = np.unique(user, return_inverse=True, return_counts=True)
    return counts[inverse] >= min_positives


def assign_parts(user_sorted: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Part (TRAIN / VALID / TEST) of each row, for rows already in chronological order."""
    pos, n = _position_in_user(user_sorted)
    n_test = np.maximum(1, np.floor(cfg.test_ratio * n)).astype(np.int64)
    m = n - n_test
    if cfg.valid_ratio > 0:
        n_valid = np.where(m > 1, np.maximum(1, np.floor(cfg.valid_ratio * m)), 0).astype(np.int64)
    else:
        n_valid = np.zeros_like(m)
    part = np.full(len(user_sorted), TRAIN, dtype=np.int8)
    part[pos >= m] = TEST
    part[(pos >= m - n_valid) & (pos < m)] = VALID
    return part


def carve_validation(user_sorted: np.ndarray, valid_ratio: float) -> np.ndarray:
    """For given train rows in chronological order: part TRAIN or VALID (pre-split data)."""
    if valid_ratio <= 0:
        return np.full(len(user_sorted), TRAIN, dtype=np.int8)
    pos, n = _position_in_user(user_sorted)
    n_valid = np.where(n > 1, np.maximum(1, np.floor(valid_ratio * n)), 0).astype(np.int64)
    return np.where(pos >= n - n_valid, VALID, TRAIN).astype(np.int8)


def first_click_only(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep each (user, item) pair's earliest positive: a repeat adds nothing to retrieval
    (training positives are excluded from the ranking) and would blur the split."""
    order = chronological_order(rows["user_idx"], rows["timestamp"], rows["item_idx"])
    rows = {k: v[order] for k, v in rows.items()}
    key = (
        rows["user_idx"].astype(np.int64) * (int(rows["item_idx"].max(initial=0)) + 1)
        + rows["item_idx"]
    )
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), dtype=bool)
    keep[first] = True
    return {k: v[keep] for k, v in rows.items()}


def split_positives(
    rows: dict[str, np.ndarray], split: SplitConfig
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """First clicks only, users with fewer than ``min_positives`` dropped, chronological split.

    ``rows["user_idx"]`` numbers users in original-id order. Returns the kept rows (users
    re-numbered 0.. in the same order, rows in chronological order), their parts, the old
    index of each kept user and the number of users dropped.
    """
    rows = first_click_only(rows)
    active = keep_active_users(rows["user_idx"], split.min_positives)
    n_dropped = len(unique(rows["user_idx"][~active]))
    rows = {k: v[active] for k, v in rows.items()}
    # re-number the users that remain, keeping their original-id order
    kept_users, new_idx = np.unique(rows["user_idx"], return_inverse=True)
    rows["user_idx"] = new_idx.astype(np.int32)
    # still in chronological order: filtering and the order-preserving re-numbering above
    # keep first_click_only's sort
    return rows, assign_parts(rows["user_idx"], split), kept_users, n_dropped
