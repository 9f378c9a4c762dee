"""Mean-pooling two-tower retrieval model.

After "Deep Neural Networks for YouTube Recommendations" (Covington, Adams and Sargin,
RecSys 2016) and "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (Yi et al., RecSys 2019): the user tower averages the embeddings of the
user's recent behaviours in each domain, concatenates the per-domain averages with the target
domain's embedding and maps them through an MLP to one user vector; the item tower is an
embedding table. Trained with sampled negatives from the target domain (softmax over the
positive and its negatives, or binary cross-entropy). Scores are inner products, so the
model serves from a nearest-neighbour index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import UserTowerModel
from aftrec.models.layers import bag_mean
from aftrec.registry import DROPOUT, register_model

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "hidden": "32"}


@dataclass(frozen=True)
class TwoTowerConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    hidden: Count = 256
    dropout: Rate = 0.1
    loss: Loss = "softmax"  # "softmax" over [positive, negatives] or "bce"


def masked_mean(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``emb`` (..., L, d) over positions where ``mask`` (..., L) is true; 0 if none."""
    m = mask.unsqueeze(-1).to(emb.dtype)
    return (emb * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1.0)


@register_model("two-tower", TwoTowerConfig, quick=QUICK, tune=DROPOUT)
class TwoTower(UserTowerModel):
    def __init__(self, cfg: TwoTowerConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        d = cfg.dim
        self.history_emb = nn.Embedding(info.n_items + 1, d, padding_idx=info.pad)
        self.domain_emb = nn.Embedding(info.n_domains, d)
        self.item_emb = nn.Embedding(info.n_items, d)
        self.mlp = nn.Sequential(
            nn.Linear((info.n_domains + 1) * d, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, d),
        )
        nn.init.normal_(self.history_emb.weight, std=0.05)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        with torch.no_grad():
            self.history_emb.weight[info.pad].zero_()

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        pooled = bag_mean(self.history_emb, batch.history, self.info.pad)  # (B, D, d)
        x = torch.cat([pooled.flatten(1), self.domain_emb(domain)], dim=1)  # (B, (D+1) d)
        return self.mlp(x)  # (B, d)
