"""User shards of the training data, for data-parallel training.

Shard ``s`` of ``S`` is a set of users, so a user's whole history (and the negatives that
depend on it) lives in one shard. On a partitioned dataset (``aftrec prepare --streaming``)
with at least ``S`` partitions, shard ``s`` is the partitions ``p`` with ``p % S == s`` and a
process reads only the partitions of its shards; otherwise it reads the dataset and shard
``s`` is the users ``u`` with ``u % S == s``. The rule depends on the data and ``S`` only, never
on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aftrec.data.dataset import DataInfo, Dataset, Interactions


@dataclass(frozen=True)
class LocalShards:
    """What one process holds: its shards' training examples and the global counts."""

    info: DataInfo
    shards: dict[int, Interactions]
    train: Interactions  # every shard of this process together, sorted by user then time
    n_examples: int  # training examples over all shards
    dataset: Dataset  # the data this process read (all of it, or its partitions)
    complete: bool  # whether ``dataset`` is the whole dataset
    n_shards: int
    starts: np.ndarray | None  # each partition's first user, where shards are partitions

    def shard_of(self, users: np.ndarray) -> np.ndarray:
        """The shard of each user, by the rule of the module docstring."""
        users = np.asarray(users, dtype=np.int64)
        if self.starts is None:
            return users % self.n_shards
        return (np.searchsorted(self.starts, users, side="right") - 1) % self.n_shards


def _meta(path: Path) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}  # Dataset(path) below says what is wrong
    return meta


def load_shards(path: Path, n_shards: int, mine: list[int]) -> LocalShards:
    """Read the shards ``mine`` of ``n_shards`` (only their partitions where the layout allows)."""
    meta = _meta(path)
    parts: list[dict[str, Any]] = (
        meta.get("partitions") or [] if meta.get("layout") == "partitioned" else []
    )
    by_partition = len(parts) >= n_shards and len(parts) > 1
    starts: np.ndarray | None = None
    if by_partition:
        wanted = [p for p in range(len(parts)) if p % n_shards in mine]
        data = Dataset(path, partitions=wanted)
        complete = len(wanted) == len(parts)
        starts = np.array([int(p["users"][0]) for p in parts], dtype=np.int64)
    else:
        data = Dataset(path)
        complete = True
    n_examples = int(sum(data.meta["counts"]["train"].values()))
    base = LocalShards(
        data.info, {}, data.train, n_examples, data, complete, n_shards, starts
    )  # fmt: skip
    shard = base.shard_of(data.train.user)
    shards = {s: data.train.take(shard == s) for s in mine}
    local = data.train if len(mine) == n_shards else data.train.take(np.isin(shard, mine))
    return dataclasses.replace(base, shards=shards, train=local)
