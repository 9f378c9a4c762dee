"""The multi-domain generator G of AFT (section 3.2, Eqs. 1-5).

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao, Liu, Xie, Ge, Tang,
Zhang and Lin, KDD 2021), Fig. 2 (a):

* Eq. 1, domain-specific masked encoder: during training a random ``mask_ratio`` of the
  behaviour positions of the *target* domain only are replaced by [MASK]; other domains and
  inference are untouched;
* Eq. 2, per-domain average pooling ``f_i`` of the item embeddings;
* Eq. 3, a Transformer over the n domain features ``f~_i``;
* Eq. 4, domain-specific attention ``alpha_i = softmax(f~_i . (f_t + d_t) / sqrt(dim))`` (the
  scale is this project's, docs/aft.md) and a two-layer MLP giving the user's aggregated
  preference ``h_t``;
* Eq. 5, ``p_g(e | u) = sigmoid(h_t . e)``; the fake clicked items are items of the target
  domain, the user's own clicks excluded (section 3.4): k draws from ``softmax(h_t . e / tau)``
  by default, G's top-k as printed (:class:`~aftrec.models.aft.model.AFTConfig`'s
  ``fake_sampling``).

Choices where the paper is silent are listed in docs/aft.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.models.aft.topk import Exclusions, domain_top_k
from aftrec.models.layers import bag_mean
from aftrec.models.transformer import TransformerEncoder

if TYPE_CHECKING:
    from aftrec.data.dataset import DataInfo
    from aftrec.models.aft.model import AFTConfig


def domain_transformer(
    dim: int, heads: int, layers: int, ff_dim: int, dropout: float
) -> TransformerEncoder:
    """A Transformer encoder (Vaswani et al. 2017, post-norm) over the n domain tokens:
    ``nn.TransformerEncoder``'s function and parameters, laid out for a few tokens
    (:mod:`aftrec.models.transformer`)."""
    return TransformerEncoder(dim, heads, layers, ff_dim, dropout)


def target_rows(x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """(B, n_domains, ...) -> (B, ...): the row of each example's target domain."""
    return x[torch.arange(x.shape[0], device=x.device), domain]


class Generator(nn.Module):
    """G over ``info``'s items and domains, sized by ``cfg`` (``dim``, ``g_heads``,
    ``g_layers``, ``ff_mult``, ``g_hidden``, ``dropout``, ``mask_ratio``)."""

    def __init__(self, cfg: AFTConfig, info: DataInfo) -> None:
        super().__init__()
        n_items, n_domains, dim, dropout = info.n_items, info.n_domains, cfg.dim, cfg.dropout
        heads, layers, ff_dim, hidden = cfg.g_heads, cfg.g_layers, cfg.ff_mult * dim, cfg.g_hidden
        self.pad = n_items
        self.mask_ratio = cfg.mask_ratio
        # e of Eq. 5 and the behaviours X of Eq. 1; row `pad` is the zero [MASK] / padding
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.domain_emb = nn.Embedding(n_domains, dim)  # d_t of Eq. 4
        self.domain_pos = nn.Parameter(torch.zeros(n_domains, dim))  # which token is which domain
        self.transformer = domain_transformer(dim, heads, layers, ff_dim, dropout)  # Eq. 3
        self.mlp = nn.Sequential(  # the two-layer MLP of Eq. 4
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.domain_emb.weight, std=0.05)
        nn.init.normal_(self.domain_pos, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    # --- Eq. 1 ------------------------------------------------------------------------------
    def mask_positions(self, history: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """(B, D, L) bool: the behaviours replaced by [MASK], drawn independently with
        probability ``mask_ratio`` among the real (non-pad) behaviours of the target domain;
        all False at inference."""
        if not self.training or self.mask_ratio == 0.0:
            return torch.zeros_like(history, dtype=torch.bool)
        b, n, length = history.shape
        target = F.one_hot(domain, n).bool().unsqueeze(-1)  # (B, D, 1)
        draw = torch.rand(b, 1, length, device=history.device) < self.mask_ratio  # (B, 1, L)
        return target & draw & (history != self.pad)  # (B, D, L)

    # --- Eqs. 1-2 ---------------------------------------------------------------------------
    def pool(self, history: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """(B, D, L) behaviours -> (B, D, dim) per-domain averages f_i of X'_i (Eq. 2).

        A [MASK] behaviour is the zero embedding and, like padding, is left out of the
        average, so the pooled feature keeps its scale between training and inference."""
        masked = history.masked_fill(self.mask_positions(history, domain), self.pad)  # X'
        return bag_mean(self.item_emb, masked, self.pad)  # (B, D, dim)

    # --- Eqs. 3-4 ---------------------------------------------------------------------------
    def aggregate(self, f: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, dim) domain features -> h_t (B, dim) and the attention alpha (B, D)."""
        f_tilde = self.transformer(f + self.domain_pos)  # (B, D, dim)  Eq. 3
        query = target_rows(f, domain) + self.domain_emb(domain)  # (B, dim)  f_t + d_t
        att = torch.einsum("bnd,bd->bn", f_tilde, query) / math.sqrt(f.shape[-1])
        alpha = att.softmax(dim=1)  # (B, D)  Eq. 4
        h = self.mlp(torch.einsum("bn,bnd->bd", alpha, f_tilde))  # (B, dim)  Eq. 4
        return h, alpha

    def forward(self, history: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """(B, D, L) behaviours, (B,) target domain -> h_t (B, dim)."""
        h, _ = self.aggregate(self.pool(history, domain), domain)
        return h

    # --- Eq. 5 ------------------------------------------------------------------------------
    def logits(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h_t . e for (B, dim) users and (B, m) global item ids -> (B, m); p_g = sigmoid."""
        return torch.einsum("bd,bmd->bm", h, self.item_emb(items))

    @torch.no_grad()
    def top_k(
        self,
        h: torch.Tensor,
        domain: torch.Tensor,
        exclude: Exclusions,
        k: int,
        offsets: torch.Tensor,
        chunk: int,
        tau: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """G's fake clicked items: the top ``k`` items of each row's target ``domain`` by p_g,
        the ``exclude`` pairs (the user's clicks) left out; with ``tau``, ``k`` draws without
        replacement from ``softmax(h_t . e / tau)`` over the same items instead (Gumbel-top-k).
        Scored in chunks of ``chunk`` items with a running top-k (:func:`domain_top_k`), so
        memory stays bounded over any catalogue. Returns (B, k) global ids and (B, k) validity
        (False where fewer than ``k`` items were left)."""
        table = self.item_emb.weight
        items, top, _ = domain_top_k(h, table, domain, offsets, exclude, k, chunk, tau)
        return items, torch.isfinite(top)
