"""Batches for training and evaluation.

Training examples are the training positives: (user, target item, target domain, time). Each
example's input is the user's behaviours strictly before its time (last ``history_len`` per
domain, see :mod:`aftrec.data.histories`), and it comes with ``n_negatives`` items sampled
uniformly from the target domain among those the user did not click in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.histories import HistoryIndex


@dataclass(frozen=True)
class Batch:
    users: torch.Tensor  # (B,) long
    history: torch.Tensor  # (B, D, L) long, global item indices, pad = info.n_items
    counts: torch.Tensor  # (B, D) long, behaviours per domain (not clipped to L)
    domain: torch.Tensor  # (B,) long, target domain
    pos: torch.Tensor | None = None  # (B,) long, clicked target item (training)
    neg: torch.Tensor | None = None  # (B, K) long, sampled unclicked items of the target domain

    def __len__(self) -> int:
        return int(self.users.shape[0])

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
        )


class NegativeSampler:
    """Uniform negatives from a target domain, rejecting the user's known positives."""

    def __init__(self, known: Interactions, info: DataInfo, max_tries: int = 5) -> None:
        self.info = info
        self.max_tries = max_tries
        self._stride = np.int64(info.n_items + 1)
        self._known = np.unique(known.user.astype(np.int64) * self._stride + known.item)

    def is_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self._stride + items
        pos = np.searchsorted(self._known, keys)
        return self._known[np.minimum(pos, len(self._known) - 1)] == keys

    def sample(
        self, users: np.ndarray, domains: np.ndarray, k: int, rng: np.random.Generator
    ) -> np.ndarray:
        """(B, k) item indices; after ``max_tries`` rounds a rare leftover collision is kept."""
        offsets = np.asarray(self.info.offsets, dtype=np.int64)
        lo, size = offsets[domains], np.diff(offsets)[domains]
        u = np.repeat(users[:, None], k, axis=1)
        neg = lo[:, None] + (rng.random((len(users), k)) * size[:, None]).astype(np.int64)
        for _ in range(self.max_tries):
            bad = self.is_known(u, neg)
            if not bad.any():
                break
            rows = np.nonzero(bad)[0]
            neg[bad] = lo[rows] + (rng.random(len(rows)) * size[rows]).astype(np.int64)
        return neg


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
        for b in range(n_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
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
