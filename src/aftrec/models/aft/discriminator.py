"""The multi-domain discriminator D of AFT (section 3.3, Eqs. 6-12).

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao, Liu, Xie, Ge, Tang,
Zhang and Lin, KDD 2021), Fig. 2 (b):

* Eq. 6, per-domain average pooling ``f_i`` of the (unmasked) behaviours, and the weighted
  domain sequence ``d'_i = beta_i d_i`` with ``beta_i`` the user's share of clicks in domain i;
* Eq. 7, one Transformer over the item-level features and one over the domain-level features;
* Eq. 8, ``f-bar`` and ``d-bar``: the interacted features of all domains concatenated;
* Eqs. 9-11, the two-step feature translation with ConvE (Dettmers et al., AAAI 2018)::

      u_g = ConvE(f-bar, d-bar)                       (Eq. 10)  user general preference
      u_t = ConvE(u_g, Concat(d_t, f_t) W_d)          (Eq. 11)  user domain-specific preference

* Eq. 12, ``p_d(e | u) = sigmoid(u_t . e)``: ``u_t`` is the retrieval (serving) user vector.

The Table 6 ablation "- feature translation" replaces Eqs. 10-11 by a domain-specific attention
aggregation (see :meth:`Discriminator.attention_user`). Shapes and other choices: docs/aft.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from aftrec.models.aft.conve import ConvE
from aftrec.models.aft.generator import domain_transformer, target_rows
from aftrec.models.layers import bag_mean

if TYPE_CHECKING:
    from aftrec.data.dataset import DataInfo
    from aftrec.models.aft.model import AFTConfig


def click_share(counts: torch.Tensor) -> torch.Tensor:
    """beta_i of section 3.3: (B, D) behaviour counts -> (B, D) shares in [0, 1] (0 if none)."""
    c = counts.to(torch.float32)
    return c / c.sum(dim=1, keepdim=True).clamp(min=1.0)


class Discriminator(nn.Module):
    """D over ``info``'s items and domains, sized by ``cfg`` (``dim``, ``d_heads``,
    ``d_layers``, ``ff_mult``, ``dropout``, ``translation`` and the ``conve_*`` keys)."""

    def __init__(self, cfg: AFTConfig, info: DataInfo) -> None:
        super().__init__()
        n_items, n_domains, dim, dropout = info.n_items, info.n_domains, cfg.dim, cfg.dropout
        heads, layers, ff_dim = cfg.d_heads, cfg.d_layers, cfg.ff_mult * dim
        channels, kernel, rows = cfg.conve_channels, cfg.conve_kernel, cfg.conve_rows
        self.pad = n_items
        self.translation = cfg.translation
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # e of Eq. 12
        self.domain_emb = nn.Embedding(n_domains, dim)  # d_i
        self.domain_pos = nn.Parameter(torch.zeros(n_domains, dim))  # which token is which domain
        self.item_tf = domain_transformer(dim, heads, layers, ff_dim, dropout)  # Eq. 7, f^_i
        self.domain_tf = domain_transformer(dim, heads, layers, ff_dim, dropout)  # Eq. 7, d^_i
        self.w_d = nn.Linear(2 * dim, dim, bias=False)  # W_d of Eq. 11
        if cfg.translation == "conve":
            # Eq. 10: f-bar and d-bar (n * dim each) as n x dim matrices, one domain per row
            self.conve_general = ConvE(n_domains, dim, dim, channels, kernel, dropout)
            # Eq. 11: u_g and the relation (dim each) as conve_rows x (dim / conve_rows)
            self.conve_specific = ConvE(rows, dim // rows, dim, channels, kernel, dropout)
        else:  # Table 6 "- feature translation": attention aggregation + two-layer MLP
            self.attention_mlp = nn.Sequential(
                nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
            )
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.domain_emb.weight, std=0.05)
        nn.init.normal_(self.domain_pos, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    def encode(
        self, history: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. 6-7: (B, D, L) behaviours and (B, D) counts -> f_i, f^_i, d^_i, each
        (B, D, dim)."""
        f = bag_mean(self.item_emb, history, self.pad)  # (B, D, dim)  Eq. 6
        d_prime = click_share(counts).unsqueeze(-1) * self.domain_emb.weight  # (B, D, dim)
        f_hat = self.item_tf(f + self.domain_pos)  # (B, D, dim)  Eq. 7
        d_hat = self.domain_tf(d_prime)  # (B, D, dim)  Eq. 7
        return f, f_hat, d_hat

    def relation(self, f: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Concat(d_t, f_t) W_d of Eq. 11: (B, D, dim), (B,) -> (B, dim)."""
        return self.w_d(torch.cat([self.domain_emb(domain), target_rows(f, domain)], dim=1))

    def conve_user(
        self, f_hat: torch.Tensor, d_hat: torch.Tensor, rel: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 8, 10, 11 -> (u_g, u_t), each (B, dim)."""
        f_bar, d_bar = f_hat.flatten(1), d_hat.flatten(1)  # (B, D * dim) each  Eq. 8
        u_g = self.conve_general(f_bar, d_bar)  # (B, dim)  Eq. 10
        u_t = self.conve_specific(u_g, rel)  # (B, dim)  Eq. 11
        return u_g, u_t

    def attention_user(
        self, f_hat: torch.Tensor, d_hat: torch.Tensor, rel: torch.Tensor
    ) -> torch.Tensor:
        """Ablation: u_t = MLP(sum_i a_i z_i), z_i = f^_i + d^_i, a = softmax(z_i . rel)."""
        z = f_hat + d_hat  # (B, D, dim)
        a = (torch.einsum("bnd,bd->bn", z, rel) / math.sqrt(z.shape[-1])).softmax(dim=1)
        out: torch.Tensor = self.attention_mlp(torch.einsum("bn,bnd->bd", a, z))  # (B, dim)
        return out

    def forward(
        self, history: torch.Tensor, counts: torch.Tensor, domain: torch.Tensor
    ) -> torch.Tensor:
        """(B, D, L) behaviours, (B, D) counts, (B,) target domain -> u_t (B, dim)."""
        f, f_hat, d_hat = self.encode(history, counts)
        rel = self.relation(f, domain)  # (B, dim)
        if self.translation == "conve":
            return self.conve_user(f_hat, d_hat, rel)[1]
        return self.attention_user(f_hat, d_hat, rel)

    def logits(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u_t . e for (B, dim) users and (B, m) global item ids -> (B, m); p_d = sigmoid."""
        return torch.einsum("bd,bmd->bm", u, self.item_emb(items))
