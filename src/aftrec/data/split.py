"""Per-user chronological splits.

Each user's positives are ordered by timestamp; the last ``test_ratio`` of them (at least
one) go to test, and a validation part is carved the same way from the end of what is left.
Users with fewer than ``min_positives`` positives are dropped first.

Positives at the same timestamp have no order of their own, and where a user's split falls
inside such a tie, the rule that orders them decides which go to test. ``ties="random"`` orders
them by a uniform draw per (user, item) from a hash of the two ids and ``tie_seed``
(:func:`tie_draws`): each user's tied items in a uniformly drawn order, whatever their domains,
their ids, the catalogue or the file's order, so no domain is favoured. ``ties="item"`` orders
them by the item's index (domain, then item id), the rule of the MovieLens presets, whose
committed results were made with it: among tied clicks, those of the later domains go to test.

For a user with ``n`` positives: ``n_test = max(1, floor(test_ratio * n))``; with
``m = n - n_test``, ``n_valid = max(1, floor(valid_ratio * m))`` (0 when ``valid_ratio`` is 0).
Every positive lands in exactly one of train, valid and test.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

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
    #: how positives at the same timestamp are ordered: "random" (a seeded draw per (user,
    #: item), fair to every domain) or "item" (domain, then item id); None: the source's own rule,
    #: "item" for the MovieLens presets (:data:`ITEM_ORDER_DATASETS`), "random" for the rest
    ties: Literal["random", "item"] | None = None
    #: seeds the "random" rule's draws; None: 0 there (a seed given to the "item" rule, which
    #: draws nothing, is refused by :func:`with_ties`)
    tie_seed: int | None = None

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
        if self.ties not in (None, "random", "item"):
            raise ConfigError(f"split.ties (--ties) must be random or item, got {self.ties!r}")
        seed = self.tie_seed
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise ConfigError(f"split.tie_seed (--tie-seed) must be an integer, got {seed!r}")
            object.__setattr__(self, "tie_seed", int(seed))  # a NumPy integer as the one it holds
            if not 0 <= int(seed) < 2**64:
                raise ConfigError(f"split.tie_seed (--tie-seed) must be in [0, 2^64), got {seed}")


#: the presets whose committed results were split with ``ties="item"``: their split stays
#: the one those numbers were measured on
ITEM_ORDER_DATASETS = ("ml-100k", "ml-1m")


def with_ties(split: SplitConfig, dataset: str | None) -> SplitConfig:
    """``split`` with its tie rule settled: the one given, else the source's own
    (``dataset``: a preset's name, None for a log given as files), and its seed."""
    ties = split.ties or ("item" if dataset in ITEM_ORDER_DATASETS else "random")
    if ties == "item" and split.tie_seed is not None:
        rule = f"{dataset}'s rule is item" if split.ties is None else "the rule is item"
        raise ConfigError(
            f"--tie-seed (split.tie_seed) goes with --ties random; {rule}, which draws nothing"
        )
    seed = split.tie_seed if ties == "item" or split.tie_seed is not None else 0
    return dataclasses.replace(split, ties=ties, tie_seed=seed)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits each depend on every
    input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_hashes(ids: pd.Index | np.ndarray) -> np.ndarray:
    """A uint64 per id, from its text alone (pandas' SipHash of the id as text, with a fixed
    key): the same id gives the same value in any file, order, partition or source (the
    integer 7 and the text "7" alike)."""
    text = pd.Series(np.asarray(ids, dtype=object)).astype(str)
    return pd.util.hash_pandas_object(text, index=False, hash_key="aftrec-ties-0001").to_numpy()


def tie_draws(user_hash: np.ndarray, item_hash: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uniform 64-bit draw per (user, item) row, from the two ids' :func:`id_hashes` and the
    seed: ``mix(mix(user + seed * golden) ^ item)``. Ordering a user's tied items by it puts
    them in a uniformly drawn order (any two either way with probability 1/2, whatever their
    domains), and a draw depends on its own user and item only: not on the catalogue, the
    file's order or the partition."""
    with np.errstate(over="ignore"):
        user = _mix(user_hash.astype(np.uint64) + np.uint64(seed) * _GOLDEN)
    return _mix(user ^ item_hash.astype(np.uint64))


def with_tie_keys(
    rows: dict[str, np.ndarray],
    users: pd.Index | np.ndarray,
    item_hash: np.ndarray | None,
    split: SplitConfig,
) -> dict[str, np.ndarray]:
    """``rows`` with their ``tie`` column (:func:`tie_draws`) under ``split.ties="random"``;
    as they are under "item", whose ties go by ``item_idx``. ``users``: the ids of
    ``rows["user_idx"]``; ``item_hash``: :func:`id_hashes` of the catalogue, by ``item_idx``
    (computed once per catalogue; None under "item")."""
    if split.ties != "random":
        return rows
    assert item_hash is not None, "the random rule needs the catalogue's id hashes"
    user = id_hashes(users)[rows["user_idx"]]
    return {**rows, "tie": tie_draws(user, item_hash[rows["item_idx"]], split.tie_seed or 0)}


def catalogue_hashes(items: pd.Index | np.ndarray, split: SplitConfig) -> np.ndarray | None:
    """:func:`id_hashes` of the catalogue's items when ``split`` draws its ties, else None."""
    return id_hashes(items) if split.ties == "random" else None


def chronological_order(
    user: np.ndarray, timestamp: np.ndarray, item: np.ndarray, tie: np.ndarray | None = None
) -> np.ndarray:
    """Permutation sorting rows by (user, timestamp, item), or with ``tie`` (a uint64 draw per
    row, :func:`tie_draws`) by (user, timestamp, tie, item): the order every split uses.

    The keys are packed into one int64 (timestamps replaced by their dense rank) when they
    fit, which sorts several times faster than a three-key ``lexsort``. With ``tie``, the
    packed key holds the draw's top bits in the room (user, time) leave; rows whose packed
    keys are equal (a user's items at one time whose draws share those bits, or repeats of
    one row) are then ordered by the whole draw and the item, so the order is the same as
    the ``lexsort``'s.
    """
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64)
    times, rank = np.unique(timestamp, return_inverse=True)
    n_u, n_t, n_i = int(user.max()) + 1, len(times), int(item.max()) + 1
    fits = min(int(user.min()), int(item.min())) >= 0
    if tie is None:
        if fits and n_u * n_t * n_i < 2**62:
            key = (user.astype(np.int64) * n_t + rank) * n_i + item
            return np.argsort(key, kind="stable")
        return np.lexsort((item, timestamp, user))
    room = 62 - (n_u * n_t).bit_length()
    if not fits or room < 8:
        return np.lexsort((item, tie, timestamp, user))
    top = (tie.astype(np.uint64) >> np.uint64(64 - room)).astype(np.int64)
    key = ((user.astype(np.int64) * n_t + rank) << room) | top
    order = np.argsort(key, kind="stable")
    k = key[order]
    run = np.r_[k[1:] == k[:-1], False] | np.r_[False, k[1:] == k[:-1]]
    if run.any():  # runs of equal keys sit in key order: sorting them all in place keeps them
        at = order[run]
        order[run] = at[np.lexsort((item[at], tie[at], key[at]))]
    return order


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
    (training positives are excluded from the ranking) and would blur the split. The rows are
    left in chronological order, ties ordered by ``rows["tie"]`` where it is given (and kept),
    else by item."""
    order = chronological_order(
        rows["user_idx"], rows["timestamp"], rows["item_idx"], rows.get("tie")
    )
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

    ``rows["user_idx"]`` numbers users in original-id order; ``rows["tie"]``, when given,
    orders a user's positives at one timestamp (:func:`tie_draws`; else the item index) and is
    not returned. Returns the kept rows (users re-numbered 0.. in the same order, rows in
    chronological order), their parts, the old index of each kept user and the number of
    users dropped.
    """
    rows = first_click_only(rows)
    rows.pop("tie", None)
    active = keep_active_users(rows["user_idx"], split.min_positives)
    n_dropped = len(unique(rows["user_idx"][~active]))
    rows = {k: v[active] for k, v in rows.items()}
    # re-number the users that remain, keeping their original-id order
    kept_users, new_idx = np.unique(rows["user_idx"], return_inverse=True)
    rows["user_idx"] = new_idx.astype(np.int32)
    # still in chronological order: filtering and the order-preserving re-numbering above
    # keep first_click_only's sort
    return rows, assign_parts(rows["user_idx"], split), kept_users, n_dropped
