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
  neither attends nor is attended); the layer norm comes before each sublayer, with a final
  one (pre-norm, SASRec's blocks: :func:`aftrec.models.sasrec.transformer_encoder`), where
  the paper adds the residual and then normalises;
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
    length_order,
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

    def encode(self, batch: Batch) -> tuple[Merged, torch.Tensor, torch.Tensor]:
        """The (B, S) merged behaviours, their (B, S, d) tokens with the grid's rows in
        :func:`length_order` (the order in which :func:`by_length` chunks them), and that
        order (B,)."""
        history = batch.history[:, :, -self.history_len :]  # (B, D, L)
        merged = merge_histories(history, batch.counts, self.info.pad, order="blocks")
        order = length_order(merged.valid)
        return merged, self.tokens(history, merged, order), order

    def tokens(
        self, history: torch.Tensor, merged: Merged, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S, d) behaviours in the latent semantic space, ``f_i([e; t]) = e W_i^item +
        t W_i^time + b_i`` for a behaviour of domain i, zero at padding (which neither attends
        nor is attended). Computed at the behaviours only, then placed into the grid (its rows
        the batch's rows in ``order`` when given)."""
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
        return merged.place(tok, rows, cols, order)

    def _blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(valid, causal=False)  # (B, S, S)
        return self.norm(self.encoder(x, mask))  # (B, S, d)

    def _read(self, x: torch.Tensor, valid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(n, 1, d): the self-attention blocks over a chunk of rows, read by their queries."""
        return vanilla_attention(self.vanilla, q, self._blocks(x, valid), valid).unsqueeze(1)

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        merged, x, order = self.encode(batch)  # x: (B, S, d), rows in `order`
        q = self.query_emb(domain)  # (B, d)
        # the blocks and the vanilla attention run chunk by chunk, each chunk cut to its own
        # longest row: no (B, S, d) output grid, no attention over the batch's longest padding
        att = by_length(self._read, x, merged.valid, width=1, order=order, extra=[q[order]])
        return self.mlp(torch.cat([att[:, 0], q], dim=1))  # (B, d)


def vanilla_attention(
    mha: nn.MultiheadAttention, q: torch.Tensor, h: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``mha(q[:, None], h, h, key_padding_mask=~valid)[0][:, 0]`` for one query per row, with
    ``mha``'s parameters (``batch_first``, ``add_zero_attn``: an extra zero key and value that
    every query may read), computed without projecting the keys and values.

    ``q`` (B, d), ``h`` (B, S, d), ``valid`` (B, S) -> (B, d). With one query per row, the
    key and value projections move to the query's side and after the weighted sum:

    * head h's score of position s is ``k_s . q_h = (W_k h_s + b_k) . q_h
      = h_s . (W_k^T q_h) + b_k . q_h``, with ``q_h`` the scaled query zero outside head h's
      columns (a (d, heads) indicator ``I``): one (B, S, d) x (B, d, heads) product;
    * its output is ``sum_s w_sh v_s = W_v (sum_s w_sh h_s) + (sum_s w_sh) b_v``, the zero
      key's value adding nothing: one (B, heads, S) x (B, S, d) product, then ``W_v`` on
      ``heads`` rows per example, of which head h keeps its own d / heads columns.

    So the (B, S, 2d) keys and values, their product over every position and its backward
    are never computed; the zero key scores 0 and only joins the softmax."""
    b, s, d = h.shape
    heads = mha.num_heads
    assert mha.in_proj_weight is not None and mha.in_proj_bias is not None
    w, bias = mha.in_proj_weight, mha.in_proj_bias  # (3d, d), (3d,)
    w_k, w_v, b_k, b_v = w[d : 2 * d], w[2 * d :], bias[d : 2 * d], bias[2 * d :]
    qp = F.linear(q, w[:d], bias[:d]) * (1.0 / math.sqrt(d // heads))  # (B, d)
    head_of = torch.arange(d, device=h.device) // (d // heads)  # (d,)
    indicator = F.one_hot(head_of, heads).to(h.dtype)  # (d, heads): I
    q_heads = qp.unsqueeze(-1) * indicator  # (B, d, heads): q_h
    scores = torch.baddbmm(
        (b_k @ q_heads).unsqueeze(1), h, w_k.T @ q_heads
    )  # (B, S, heads): k_s . q_h
    scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    zero = scores.new_zeros(b, 1, heads)  # the zero key's score
    weights = torch.cat([scores, zero], dim=1).softmax(dim=1)[:, :s]  # (B, S, heads)
    weights = dropout(weights, mha.dropout, mha.training)
    pooled = torch.bmm(weights.transpose(1, 2), h)  # (B, heads, d): sum_s w_sh h_s
    per_head = F.linear(pooled, w_v) + weights.sum(1).unsqueeze(-1) * b_v  # (B, heads, d)
    o = (per_head * indicator.T).sum(1)  # (B, d): head h keeps its own d / heads columns
    return mha.out_proj(o)
