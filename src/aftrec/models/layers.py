"""Small building blocks shared by several models."""

from __future__ import annotations

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
