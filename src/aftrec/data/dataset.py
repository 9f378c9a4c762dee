"""A prepared dataset directory, loaded into memory as numpy arrays.

Two layouts (:mod:`aftrec.data.prepared`): format 1 (one file per table) and format 2,
"partitioned" (users and parts split into partition files).
:class:`Dataset` reads both; on the partitioned layout it can load only some partitions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aftrec.data.prepared import PARTITIONED, partition_file, read_meta
from aftrec.data.split import PART_NAMES
from aftrec.errors import DataError

#: the columns of a part file (train, valid, test), the first three indices
_PART_COLUMNS = ("user_idx", "item_idx", "domain_idx", "timestamp")


@dataclass(frozen=True)
class Interactions:
    """Positive interactions in chronological order per user (rows sorted by user, time)."""

    user: np.ndarray  # (N,) int32
    item: np.ndarray  # (N,) int32, global item index
    domain: np.ndarray  # (N,) int16
    timestamp: np.ndarray  # (N,) int64 or float64

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> Interactions:
        """The rows where ``mask`` is true (or at the given indices), order kept."""
        return Interactions(
            self.user[mask], self.item[mask], self.domain[mask], self.timestamp[mask]
        )

    @staticmethod
    def concat(parts: list[Interactions]) -> Interactions:
        user = np.concatenate([p.user for p in parts])
        item = np.concatenate([p.item for p in parts])
        ts = np.concatenate([p.timestamp.astype(np.float64) for p in parts])
        order = np.lexsort((item, ts, user))
        return Interactions(
            user[order],
            item[order],
            np.concatenate([p.domain for p in parts])[order],
            ts[order],
        )


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data to be built."""

    n_users: int
    n_items: int
    domains: tuple[str, ...]
    offsets: tuple[int, ...]  # domain d owns items [offsets[d], offsets[d+1])

    @property
    def n_domains(self) -> int:
        return len(self.domains)

    @property
    def pad(self) -> int:
        """Index used for padding in history tensors (one past the last item)."""
        return self.n_items

    def domain_range(self, d: int) -> tuple[int, int]:
        return self.offsets[d], self.offsets[d + 1]

    def domain_size(self, d: int) -> int:
        return self.offsets[d + 1] - self.offsets[d]


class Dataset:
    """A prepared dataset: id maps, item domains and the train / valid / test parts.

    ``partitions`` (partitioned layout) loads the rows of those partitions only, in partition
    order; ids, ``info`` and ``meta`` stay those of the whole dataset. A format 1 dataset is
    one partition, 0.

    The parts are read on first use (:attr:`parts`): training and validation never open the
    test part's files, so a tuning study provably leaves the test split unread.
    """

    def __init__(self, path: Path, partitions: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = read_meta(self.path)
        layout = self.meta.get("layout")
        if layout not in (None, PARTITIONED):
            raise DataError(f"{self.path}: unknown dataset layout {layout!r}")
        self.partitions = self._choose(partitions)
        try:
            self.items = pd.read_parquet(self.path / "items.parquet")
            self.users = self._read_users()
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{self.path}: prepared dataset is unreadable: {exc}") from exc
        if len(self.items) != self.meta["n_items"]:
            raise DataError(
                f"{self.path}: items.parquet holds {len(self.items):,} items, meta.json says "
                f"{self.meta['n_items']:,}; prepare the dataset again"
            )
        self.parts: Mapping[str, Interactions] = _LazyParts(self)
        self.info = DataInfo(
            n_users=int(self.meta["n_users"]),
            n_items=int(self.meta["n_items"]),
            domains=tuple(self.meta["domains"]),
            offsets=tuple(int(x) for x in self.meta["domain_offsets"]),
        )
        self.item_domain = np.repeat(
            np.arange(self.info.n_domains, dtype=np.int16), np.diff(self.info.offsets)
        )

    @property
    def partitioned(self) -> bool:
        return self.meta.get("layout") == PARTITIONED

    @property
    def n_partitions(self) -> int:
        """Partitions of the dataset (1 for format 1), loaded or not."""
        return len(self.meta["partitions"]) if self.partitioned else 1

    def _choose(self, partitions: Sequence[int] | None) -> tuple[int, ...]:
        n = self.n_partitions
        if partitions is None:
            return tuple(range(n))
        chosen = sorted(int(p) for p in partitions)
        if not chosen:
            raise DataError(f"{self.path}: choose at least one partition (of {n})")
        bad = [p for p in chosen if not 0 <= p < n]
        if bad:
            raise DataError(
                f"{self.path}: no partition(s) {bad}; this dataset has {n} (numbered 0 to {n - 1})"
            )
        if len(set(chosen)) != len(chosen):
            raise DataError(f"{self.path}: partitions {list(partitions)} name one twice")
        return tuple(chosen)

    def _files(self, name: str) -> list[Path]:
        if not self.partitioned:
            return [self.path / f"{name}.parquet"]
        return [partition_file(self.path, name, p) for p in self.partitions]

    def _read_users(self) -> pd.DataFrame:
        if not self.partitioned:
            return pd.read_parquet(self.path / "users.parquet")
        # every partition's users: ids map to original ids whatever rows are loaded
        files = [partition_file(self.path, "users", p) for p in range(self.n_partitions)]
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def _read_part(self, name: str) -> Interactions:
        frames = []
        for file in self._files(name):
            try:
                part = pd.read_parquet(file)
            except (OSError, ValueError) as exc:
                raise DataError(f"{self.path}: prepared dataset is unreadable: {exc}") from exc
            # a damaged part: pd.concat would fill a missing column with NaN, read as garbage
            wrong = [c for c in _PART_COLUMNS if c not in part.columns] or [
                c for c in _PART_COLUMNS[:3] if not pd.api.types.is_integer_dtype(part[c])
            ]
            if wrong:
                raise DataError(
                    f"{file}: prepared dataset is unreadable: column(s) {wrong} missing or not "
                    "integers; prepare the dataset again"
                )
            frames.append(part)
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        return Interactions(
            frame["user_idx"].to_numpy(np.int32),
            frame["item_idx"].to_numpy(np.int32),
            frame["domain_idx"].to_numpy(np.int16),
            frame["timestamp"].to_numpy(),
        )

    @property
    def train(self) -> Interactions:
        return self.parts["train"]

    @property
    def valid(self) -> Interactions:
        return self.parts["valid"]

    @property
    def test(self) -> Interactions:
        return self.parts["test"]

    @cached_property
    def train_valid(self) -> Interactions:
        """The whole training history seen at test time: train plus validation."""
        return Interactions.concat([self.train, self.valid])

    def fit_and_targets(self, split: str) -> tuple[Interactions, Interactions]:
        """(behaviours the model may see, held-out targets) for evaluating on ``split``."""
        if split == "valid":
            return self.train, self.valid
        if split == "test":
            return self.train_valid, self.test
        raise ValueError(f"unknown split {split!r}; expected 'valid' or 'test'")

    def user_index(self, ids: list[str]) -> np.ndarray:
        """Map original user ids (compared as strings) to indices; unknown ids raise."""
        return _lookup(self.users["user"], ids, "user")

    def domain_index(self, names: list[str]) -> list[int]:
        """The indices of domains given by name, exactly as prepared: a name that differs from
        a domain's only in surrounding whitespace (``Games`` for ``'Games '``, which a table
        pads out of sight) is refused with that domain named, not matched, since both could
        be domains."""
        unknown = [n for n in names if n not in self.info.domains]
        if unknown:
            near = [d for n in unknown for d in self.info.domains if d.strip() == n.strip()]
            hint = (
                f" ({', '.join(map(repr, near))} differ{'s' * (len(near) == 1)} only in "
                "whitespace: give the name with its spaces, quoted)"
                if near
                else ""
            )
            raise DataError(
                f"unknown domain(s) {unknown}; this dataset has {list(self.info.domains)}{hint}"
            )
        return [self.info.domains.index(n) for n in names]


class _LazyParts(Mapping[str, Interactions]):
    """The train / valid / test parts of a :class:`Dataset`, each read on first access."""

    def __init__(self, data: Dataset) -> None:
        self._data = data
        self._read: dict[str, Interactions] = {}

    def __getitem__(self, name: str) -> Interactions:
        if name not in PART_NAMES:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = self._data._read_part(name)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(PART_NAMES)

    def __len__(self) -> int:
        return len(PART_NAMES)


def _lookup(column: pd.Series, ids: list[str], what: str) -> np.ndarray:
    index = pd.Index(column.astype(str))
    idx = index.get_indexer(pd.Index([str(i) for i in ids]))
    if (idx < 0).any():
        bad = [ids[i] for i in np.flatnonzero(idx < 0)[:5]]
        known = ", ".join(repr(v) for v in index[:3])
        raise DataError(f"unknown {what} id(s) {bad} (this dataset's look like {known}, ...)")
    return idx.astype(np.int64)
