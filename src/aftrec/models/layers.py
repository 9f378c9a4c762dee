"""Small building blocks shared by several models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def bag_mean(emb: nn.Embedding, items: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, D, L) item ids -> (B, D, dim) average embedding per domain, ``pad`` left out (zero
    for a domain without behaviours); one ``embedding_bag``, no (B, D, L, dim) tensor."""
    b, n, length = items.shape
    out = F.embedding_bag(
        items.reshape(b * n, length), emb.weight, mode="mean", padding_idx=pad, sparse=emb.sparse
    )
    return out.view(b, n, -1)


# --- batch statistics over the ranks of a data-parallel step ------------------------------------
_SYNC_BATCH_STATISTICS: ContextVar[bool] = ContextVar("aftrec_sync_batch_statistics", default=False)


@contextmanager
def synced_batch_statistics() -> Iterator[None]:
    """Within the block, :func:`batch_sum` sums over the ranks of the process group: the
    training step of a data-parallel run enters it around its loss (every rank does, for the
    same calls, so the collectives match); nothing else does, so evaluation on one rank never
    waits for the others."""
    token = _SYNC_BATCH_STATISTICS.set(True)
    try:
        yield
    finally:
        _SYNC_BATCH_STATISTICS.reset(token)


def batch_statistics_synced() -> bool:
    """Whether :func:`batch_sum` sums over ranks here (inside :func:`synced_batch_statistics`)."""
    return _SYNC_BATCH_STATISTICS.get()


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum_r t_r`` over the ranks r inside :func:`synced_batch_statistics`, else ``t``.

    Batch norm's sums (of the values, of their squares, the count) taken this way are those
    of the global batch, as one process computes them over it; the gradient flows back
    through the sum to every rank's own terms (the backward of a sum over ranks is the sum
    of the ranks' gradients), so DDP's average of the ranks' gradients is the gradient of
    the global batch's loss."""
    if not _SYNC_BATCH_STATISTICS.get():
        return t
    summed: torch.Tensor = _SumOverRanks.apply(t)
    return summed


class _SumOverRanks(torch.autograd.Function):
    """``sum_r t_r``; its gradient on each rank is ``sum_r g_r``, the sum of every rank's
    gradient with respect to the sum (torch's ``torch.distributed.nn.functional.all_reduce``
    does the same and is deprecated in favour of a private module)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out
