"""ATRank: behaviours of all domains in one attention model, the target domain as the query.

"ATRank: An Attention-Based User Behavior Modeling Framework for Recommendation" (Zhou, Bai,
Wang, Yu, Guo, Li, Zhu, Kong, Zhu and Hu, AAAI 2018), section "Proposed Framework":

* raw feature spaces -> behaviour embedding spaces: each behaviour is its item embedding
  concatenated with a time encoding. The batch has no timestamps, so the time encoding is a
  learned embedding of the behaviour's recency rank inside its own domain (0 = the domain's
  latest behaviour), standing for ATRank's bucketed time gaps;
* behaviour embedding spaces -> latent semantic space: one projection per behaviour type (here
  per domain), ``u_ij = f_i(b_ij)``, maps the behaviours of every domain into a shared space;
* self-attention layer: multi-head ("multi-space") self-attention with a point-wise
  feed-forward, residuals and layer norm over the merged sequence of all domains (padding
  neither attends nor is attended);
* downstream application network: vanilla attention with the task's query vector. The task is
  "retrieve for target domain t", so the query is a learned embedding of domain t (the AFT
  paper's "target domain as the query"); a zero key lets a user without behaviours attend to
  nothing. The attended vector, concatenated with the query, goes through a two-layer MLP to
  the user vector, scored by inner product against the item embeddings (served by a
  nearest-neighbour index; ATRank scores a candidate item, which would need the item in the
  query and rule out the index).

Trained with the shared sampled loss over the loader's negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import UserTowerModel
from aftrec.models.sasrec import (
    attention_mask,
    by_length,
    check_transformer,
    merge_histories,
    transformer_encoder,
)
from aftrec.registry import DROPOUT, register_model

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "hidden": "32", "ff_dim": "32", "heads": "2", "layers": "1"}


@dataclass(frozen=True)
class ATRankConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    heads: Count = 4  # latent semantic spaces of the multi-space attention
    layers: Count = 1  # self-attention blocks
    ff_dim: Count = 256
    hidden: Count = 256  # MLP after the vanilla attention
    dropout: Rate = 0.1
    attn_dropout: Rate = 0.0  # on the attention weights; off as it cost ~1/4 of a CPU step
    loss: Loss = "softmax"  # "softmax" over [positive, negatives] or "bce"

    def validate(self) -> None:
        check_transformer(self)


@register_model(
    "atrank", ATRankConfig, paper_name="ATRank (multi)", paper_row=8, quick=QUICK, tune=DROPOUT
)
class ATRank(UserTowerModel):
    def __init__(self, cfg: ATRankConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        d, n_dom = cfg.dim, info.n_domains
        self.item_emb = nn.Embedding(info.n_items + 1, d, padding_idx=info.pad)
        self.recency_emb = nn.Embedding(history_len, d)  # time encoding (recency rank)
        # f_i: one projection per domain from the behaviour space [item; time] to the shared one
        self.proj_weight = nn.Parameter(torch.empty(n_dom, 2 * d, d))
        self.proj_bias = nn.Parameter(torch.zeros(n_dom, d))
        self.encoder = transformer_encoder(cfg)
        self.norm = nn.LayerNorm(d)
        self.query_emb = nn.Embedding(n_dom, d)  # the task (target domain) query
        self.vanilla = nn.MultiheadAttention(
            d, cfg.heads, dropout=cfg.attn_dropout, batch_first=True, add_zero_attn=True
        )
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, d),
        )
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.recency_emb.weight, std=0.05)
        nn.init.normal_(self.query_emb.weight, std=0.05)
        nn.init.uniform_(self.proj_weight, -1 / math.sqrt(2 * d), 1 / math.sqrt(2 * d))
        with torch.no_grad():
            self.item_emb.weight[info.pad].zero_()
        self.ranges = [info.domain_range(k) for k in range(n_dom)]

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) self-attention outputs over all domains' behaviours (unspecified at
        padding positions), and (B, S) valid."""
        history = batch.history[:, :, -self.history_len :]  # (B, D, L)
        merged = merge_histories(history, batch.counts, self.info.pad, order="blocks")
        items, domains = merged.take(history), merged.domains  # (B, S)
        recency = merged.recency  # (B, S), 0 = the latest of its domain
        # f_i([e; t]) = e W_i^item + t W_i^time + b_i. An item lives in one domain, so its
        # projection is computed once per item, not once per behaviour
        d = self.cfg.dim
        w_item, w_time = self.proj_weight[:, :d], self.proj_weight[:, d:]  # (D, d, d) each
        item_part = torch.cat(
            [self.item_emb.weight[lo:hi] @ w_item[k] for k, (lo, hi) in enumerate(self.ranges)]
            + [self.item_emb.weight.new_zeros(1, d)]  # the padding row, never attended
        )  # (n_items + 1, d)
        time_part = torch.einsum("ld,kdo->klo", self.recency_emb.weight, w_time)  # (D, L, d)
        x = item_part[items] + time_part[domains, recency] + self.proj_bias[domains]  # (B, S, d)
        return by_length(self._blocks, x, merged.valid), merged.valid

    def _blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(valid, causal=False)  # (B, S, S)
        return self.norm(self.encoder(x, mask))  # (B, S, d)

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        h, valid = self.encode(batch)  # (B, S, d), (B, S)
        q = self.query_emb(domain)  # (B, d)
        att, _ = self.vanilla(q.unsqueeze(1), h, h, key_padding_mask=~valid, need_weights=False)
        return self.mlp(torch.cat([att.squeeze(1), q], dim=1))  # (B, d)
