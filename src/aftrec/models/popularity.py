"""Per-domain popularity: every user gets the target domain's most clicked training items.

A non-personalised reference that any learned model must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch
from aftrec.models.base import RetrievalModel
from aftrec.registry import register_model


@dataclass(frozen=True)
class PopularityConfig:
    pass


@register_model("pop", PopularityConfig)
class Popularity(RetrievalModel):
    trainable = False
    counts: torch.Tensor
    dot_product = True  # user vector [1], item vector [log(1 + count)]

    def __init__(self, cfg: PopularityConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.register_buffer("counts", torch.zeros(info.n_items, dtype=torch.float32))

    def fit(self, train: Interactions) -> None:
        counts = np.bincount(train.item, minlength=self.info.n_items).astype(np.float32)
        self.counts.copy_(torch.from_numpy(counts))

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        # shaped from the input, not len(batch): a traced encoder takes any batch size
        return torch.ones_like(batch.counts[:, :1], dtype=torch.float32)  # (B, 1)

    def item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return torch.log1p(self.counts[lo:hi]).unsqueeze(1)
