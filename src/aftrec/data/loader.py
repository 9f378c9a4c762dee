"""Batches for training and evaluation.

Training examples are the training positives: (user, target item, target domain, time). Each
example's input is the user's behaviours strictly before its time (last ``history_len`` per
domain, see :mod:`aftrec.data.histories`), and it comes with ``n_negatives`` items sampled
uniformly from the target domain among those the user did not click in training.

:class:`ShardedLoader` builds each global batch from several user shards, which is how
data-parallel training splits the work (see :mod:`aftrec.training.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from aftrec.arrays import unique
from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.histories import HistoryIndex
from aftrec.errors import ConfigError, DataError


@dataclass(frozen=True)
class Batch:
    users: torch.Tensor  # (B,) long
    history: torch.Tensor  # (B, D, L) long, global item indices, pad = info.n_items
    counts: torch.Tensor  # (B, D) long, behaviours per domain (not clipped to L)
    domain: torch.Tensor  # (B,) long, target domain
    pos: torch.Tensor | None = None  # (B,) long, clicked target item (training)
    neg: torch.Tensor | None = None  # (B, K) long, sampled unclicked items of the target domain
    history_time: torch.Tensor | None = None  # (B, D, L) float64 behaviour times, 0 at padding

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @staticmethod
    def cat(parts: list[Batch]) -> Batch:
        """The batches one after the other (rows of ``parts[0]`` first)."""
        if len(parts) == 1:
            return parts[0]

        def join(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if any(t is None for t in ts) else torch.cat(ts)

        return Batch(
            users=torch.cat([p.users for p in parts]),
            history=torch.cat([p.history for p in parts]),
            counts=torch.cat([p.counts for p in parts]),
            domain=torch.cat([p.domain for p in parts]),
            pos=join("pos"),
            neg=join("neg"),
            history_time=join("history_time"),
        )

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            users=self.users.to(device),
            history=self.history.to(device),
            counts=self.counts.to(device),
            domain=self.domain.to(device),
            pos=move(self.pos),
            neg=move(self.neg),
            history_time=move(self.history_time),
        )


class NegativeSampler:
    """Exact uniform negatives: items of the target domain the user did not click in ``known``.

    No rejection loop: for a user who clicked positions ``c_0 < c_1 < ...`` of a domain of
    ``n`` items, draw ``r`` uniformly in ``[0, n - m)`` and map it to the ``r``-th unclicked
    position, ``r + #{j : c_j - j <= r}``; the count is one ``searchsorted`` on the sorted
    ``c_j - j`` of the user's segment. A user who clicked every item of the domain gets any item.
    """

    def __init__(self, known: Interactions, info: DataInfo) -> None:
        self.info = info
        offsets = np.asarray(info.offsets, dtype=np.int64)
        n_dom = info.n_domains
        seg = known.user.astype(np.int64) * n_dom + known.domain.astype(np.int64)
        pos = known.item.astype(np.int64) - offsets[known.domain.astype(np.int64)]
        pairs = unique(seg * np.int64(info.n_items + 1) + pos)  # sorted, no repeats
        seg, pos = pairs // (info.n_items + 1), pairs % (info.n_items + 1)
        self.seg_start = np.searchsorted(seg, np.arange(info.n_users * n_dom + 1))
        rank_in_seg = np.arange(len(pos)) - self.seg_start[seg]
        self._stride = np.int64(info.n_items + 1)
        self._key = seg * self._stride + (pos - rank_in_seg)  # c_j - j, nondecreasing per seg
        self._known = seg * self._stride + pos

    def is_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) pair is a known positive."""
        domains = np.asarray(self.info.offsets[1:]).searchsorted(items, side="right")
        seg = users.astype(np.int64) * self.info.n_domains + domains
        keys = seg * self._stride + items - np.asarray(self.info.offsets)[domains]
        at = np.minimum(np.searchsorted(self._known, keys), max(len(self._known) - 1, 0))
        return self._known[at] == keys if len(self._known) else np.zeros(keys.shape, bool)

    def sample(
        self, users: np.ndarray, domains: np.ndarray, k: int, rng: np.random.Generator
    ) -> np.ndarray:
        """(B, k) global item indices, drawn with replacement among the unclicked items."""
        offsets = np.asarray(self.info.offsets, dtype=np.int64)
        seg = users.astype(np.int64) * self.info.n_domains + domains.astype(np.int64)
        lo, hi = self.seg_start[seg], self.seg_start[seg + 1]
        size = np.diff(offsets)[domains]
        free = size - (hi - lo)
        free = np.where(free > 0, free, size)  # clicked everything: fall back to any item
        r = (rng.random((len(users), k)) * free[:, None]).astype(np.int64)  # (B, k)
        q = seg[:, None] * self._stride + r
        below = np.searchsorted(self._key, q, side="right") - lo[:, None]
        below = np.where((free == size)[:, None], 0, below)
        return offsets[domains][:, None] + r + below


def make_batch(
    info: DataInfo,
    history: HistoryIndex,
    users: np.ndarray,
    domains: np.ndarray,
    history_len: int,
    times: np.ndarray | None = None,
    pos: np.ndarray | None = None,
    neg: np.ndarray | None = None,
) -> Batch:
    h = history.before(users, times, history_len)
    return Batch(
        users=torch.from_numpy(users.astype(np.int64)),
        history=torch.from_numpy(h.items),
        counts=torch.from_numpy(h.counts.astype(np.int64)),
        domain=torch.from_numpy(domains.astype(np.int64)),
        pos=None if pos is None else torch.from_numpy(pos.astype(np.int64)),
        neg=None if neg is None else torch.from_numpy(neg),
        history_time=torch.from_numpy(h.times),
    )


class TrainLoader:
    """Shuffled training batches; the epoch order and negatives come from ``rng``."""

    def __init__(
        self,
        train: Interactions,
        info: DataInfo,
        history_len: int,
        batch_size: int,
        n_negatives: int,
    ) -> None:
        self.train = train
        self.info = info
        self.history = HistoryIndex(train, info)
        self.sampler = NegativeSampler(train, info)
        self.history_len = history_len
        self.batch_size = batch_size
        self.n_negatives = n_negatives

    def __len__(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def epoch(self, rng: np.random.Generator, max_batches: int | None = None) -> Iterator[Batch]:
        order = rng.permutation(len(self.train))
        n_batches = len(self) if max_batches is None else min(len(self), max_batches)
        return self._batches(order, n_batches, self.batch_size, rng)

    def cycle(self, rng: np.random.Generator, batch_size: int, n_batches: int) -> Iterator[Batch]:
        """``n_batches`` full batches of ``batch_size``, walking fresh permutations of the
        examples one after the other: a shard smaller than its share repeats examples, a
        larger one leaves the tail of its last permutation out of the epoch (nothing is carried
        over: each epoch draws from its own seed)."""
        need = batch_size * n_batches
        laps = -(-need // len(self.train))
        order = np.concatenate([rng.permutation(len(self.train)) for _ in range(laps)])[:need]
        return self._batches(order, n_batches, batch_size, rng)

    def _batches(
        self, order: np.ndarray, n_batches: int, batch_size: int, rng: np.random.Generator
    ) -> Iterator[Batch]:
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            users = self.train.user[idx].astype(np.int64)
            domains = self.train.domain[idx].astype(np.int64)
            neg = (
                self.sampler.sample(users, domains, self.n_negatives, rng)
                if self.n_negatives > 0
                else None
            )
            yield make_batch(
                self.info,
                self.history,
                users,
                domains,
                self.history_len,
                times=self.train.timestamp[idx],
                pos=self.train.item[idx],
                neg=neg,
            )


class ShardedLoader:
    """Global batches drawn from ``n_shards`` user shards, of which this process holds some.

    Every global batch of ``batch_size`` takes ``batch_size / n_shards`` examples from each
    shard, so which examples form a batch depends on the shards, never on how many processes
    share them: one process holding shards {0, 1} yields exactly the concatenation of what two
    processes holding {0} and {1} yield. An epoch is ``ceil(n_examples / batch_size)`` batches
    (``n_examples`` counted over all shards, so every rank takes the same number of steps). Each
    shard's order and negatives come from its own generator, seeded by (seed, epoch, shard):
    an epoch is reproducible on its own, which is what lets a run resume on another number of
    ranks. With a single shard this is :meth:`TrainLoader.epoch` (last batch partial).
    """

    def __init__(
        self,
        shards: dict[int, Interactions],
        info: DataInfo,
        history_len: int,
        batch_size: int,
        n_negatives: int,
        n_shards: int,
        n_examples: int,
        seed: int,
    ) -> None:
        if batch_size % n_shards:
            raise ConfigError(
                f"train.batch_size={batch_size} must be a multiple of the number of data "
                f"shards ({n_shards})"
            )
        empty = [s for s, part in shards.items() if len(part) == 0]
        if empty:
            raise DataError(
                f"data shard(s) {empty} of {n_shards} hold no training examples: use fewer "
                "shards (train.data_shards) or ranks"
            )
        self.loaders = {
            s: TrainLoader(part, info, history_len, batch_size // n_shards, n_negatives)
            for s, part in sorted(shards.items())
        }
        self.batch_size, self.n_shards, self.seed = batch_size, n_shards, seed
        self.n_examples = n_examples

    def __len__(self) -> int:
        return -(-self.n_examples // self.batch_size)

    def local_batch_size(self) -> int:
        return self.batch_size // self.n_shards * len(self.loaders)

    def epoch(self, epoch: int, max_batches: int | None = None) -> Iterator[Batch]:
        n_batches = len(self) if max_batches is None else min(len(self), max_batches)
        rngs = {s: np.random.default_rng([self.seed, epoch, s]) for s in self.loaders}
        if self.n_shards == 1:
            (loader,) = self.loaders.values()
            return loader.epoch(rngs[0], n_batches)
        per = self.batch_size // self.n_shards
        its = [ld.cycle(rngs[s], per, n_batches) for s, ld in self.loaders.items()]
        return (Batch.cat(list(parts)) for parts in zip(*its, strict=True))
