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
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import UserTowerModel
from aftrec.models.sasrec import (
    Merged,
    attention_mask,
    by_length,
    check_transformer,
    merge_histories,
    transformer_encoder,
)
from aftrec.models.transformer import dropout
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
        x = self.tokens(history, merged)  # (B, S, d)
        return by_length(self._blocks, x, merged.valid), merged.valid

    def tokens(self, history: torch.Tensor, merged: Merged) -> torch.Tensor:
        """(B, S, d) behaviours in the latent semantic space, ``f_i([e; t]) = e W_i^item +
        t W_i^time + b_i`` for a behaviour of domain i, zero at padding (which neither attends
        nor is attended). Computed at the behaviours only, then placed into the grid."""
        rows, cols, flat = merged.behaviours()  # (N,) each
        items = history.flatten(1)[rows, flat]  # (N,)
        domains, recency = merged.domain_of(flat), merged.recency_of(flat)  # (N,) each
        # An item lives in one domain, so its projection is computed once per item, not once
        # per behaviour
        d = self.cfg.dim
        w_item, w_time = self.proj_weight[:, :d], self.proj_weight[:, d:]  # (D, d, d) each
        item_part = torch.cat(
            [self.item_emb.weight[lo:hi] @ w_item[k] for k, (lo, hi) in enumerate(self.ranges)]
            + [self.item_emb.weight.new_zeros(1, d)]  # the padding row, never attended
        )  # (n_items + 1, d)
        time_part = torch.einsum("ld,kdo->klo", self.recency_emb.weight, w_time)  # (D, L, d)
        tok = item_part[items] + time_part[domains, recency] + self.proj_bias[domains]  # (N, d)
        return merged.place(tok, rows, cols)

    def _blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(valid, causal=False)  # (B, S, S)
        return self.norm(self.encoder(x, mask))  # (B, S, d)

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        h, valid = self.encode(batch)  # (B, S, d), (B, S)
        q = self.query_emb(domain)  # (B, d)
        att = vanilla_attention(self.vanilla, q, h, valid)  # (B, d)
        return self.mlp(torch.cat([att, q], dim=1))  # (B, d)


def vanilla_attention(
    mha: nn.MultiheadAttention, q: torch.Tensor, h: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``mha(q[:, None], h, h, key_padding_mask=~valid)[0][:, 0]`` for one query per row, with
    ``mha``'s parameters (``batch_first``, ``add_zero_attn``: an extra zero key and value that
    every query may read), computed without torch's sequence-first layout changes.

    ``q`` (B, d), ``h`` (B, S, d), ``valid`` (B, S) -> (B, d). The keys and values are one
    product of ``h`` with the packed key and value weights, (B, S, 2d); each head's scores
    and weighted sum read that product in place through a (d, heads) head indicator ``I``:
    ``scores = K (q_b * I)`` and ``o = sum_h (w_h V) * I_h``, two small batched products,
    so no (B, S, heads, d / heads) copy and no zero-filled gradient of it. The zero key scores
    0 and adds nothing to the sum; it only joins the softmax."""
    b, s, d = h.shape
    heads = mha.num_heads
    assert mha.in_proj_weight is not None and mha.in_proj_bias is not None
    w, bias = mha.in_proj_weight, mha.in_proj_bias  # (3d, d), (3d,)
    qp = F.linear(q, w[:d], bias[:d]) * (1.0 / math.sqrt(d // heads))  # (B, d)
    kv = F.linear(h, w[d:], bias[d:])  # (B, S, 2d)
    k, v = kv.view(b, s, 2, d).unbind(2)  # (B, S, d) views; one stack in the backward
    head_of = torch.arange(d, device=h.device) // (d // heads)  # (d,)
    indicator = F.one_hot(head_of, heads).to(h.dtype)  # (d, heads): I
    scores = torch.bmm(k, qp.unsqueeze(-1) * indicator)  # (B, S, heads)
    scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    zero = scores.new_zeros(b, 1, heads)  # the zero key's score
    weights = torch.cat([scores, zero], dim=1).softmax(dim=1)[:, :s]  # (B, S, heads)
    weights = dropout(weights, mha.dropout, mha.training)
    per_head = torch.bmm(weights.transpose(1, 2), v)  # (B, heads, d): every head's sum
    o = (per_head * indicator.T).sum(1)  # (B, d): head h keeps its own d / heads columns
    return mha.out_proj(o)
