"""Attentional Factorization Machines: "Attentional Factorization Machines: Learning the Weight
of Feature Interactions via Attention Networks" (Xiao, Ye, He, Zhang, Wu and Chua, IJCAI 2017).

Over the F fields of one (user, candidate) example (the same fields as FM, listed in
:mod:`aftrec.models.fm`: target domain, one pooled history per visible domain, optional user
id, candidate item)::

    pair-wise interaction layer (Eq. 2):  e_ij = v_i * v_j                  for i < j
    attention network (Eq. 4):            a'_ij = h^T ReLU(W e_ij + b),  a = softmax_ij(a')
    AFM (Eq. 5):                          y = w_0 + sum_i w_i x_i + p^T sum_{i<j} a_ij e_ij

with W (t x d), b and h (t), p (d); t is the attention factor (``attention``). Dropout is
applied to the attention-pooled vector ``sum a_ij e_ij`` during training (the paper's dropout
on the pair-wise interaction layer). ``afm-single`` sees the target domain's behaviours only,
``afm-multi`` every domain's (section 5.2 of the AFT paper).

Full ranking needs the attention for every (user, candidate), since the softmax runs over all
pairs. :meth:`AFM.score` avoids materialising the (users x items x pairs x d) products:

* pairs of two candidate-free fields are computed once per user;
* for a user field u and every candidate v, ``W (u * v) = (W diag(u)) v`` is one matrix
  product with the domain's item table, and ``p^T (u * v) = (p * u)^T v`` another;

the (users x items) grid is scored in blocks bounded by ``chunk_floats``.
:meth:`AFM.score_items`, the training path, computes the pairs of two user fields and their
attention logits once per user as well, and the pairs with the candidate per (user,
candidate). Both agree with Eq. 2-5 as written (:meth:`AFM.reference_items`; tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import CandidateScorer, score_in_chunks, target_column
from aftrec.models.fm import FieldEmbedding, single_and_multi
from aftrec.registry import DROPOUT

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "attention": "8"}


@dataclass(frozen=True)
class AFMConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    attention: Count = 16  # attention factor t, the size of the attention network's hidden layer
    dropout: Rate = 0.1  # on the attention-pooled interaction vector
    user_field: bool = False  # add the user id as a field (keyed by (user, domain) if single)
    loss: Loss = "bce"  # "bce" (a CTR model) or "softmax" over [positive, negatives]
    #: bound on the largest tensors of one scoring block (4 MB); the scores do not depend on
    #: it, the speed does: 4 MB blocks score about 2x faster than 64 MB ones on a 2-core EPYC
    chunk_floats: Count = 1 << 20


class AFM(CandidateScorer):
    """Shared by ``afm-single`` and ``afm-multi``; the subclass says which behaviours it sees."""

    multi_domain: ClassVar[bool] = False
    pair_rows: torch.Tensor
    pair_cols: torch.Tensor
    user_pair_rows: torch.Tensor
    user_pair_cols: torch.Tensor

    def __init__(self, cfg: AFMConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.fields = FieldEmbedding(info, cfg.dim, self.multi_domain, cfg.user_field, True)
        self.attention = nn.Linear(cfg.dim, cfg.attention)  # W, b of Eq. 4
        self.h = nn.Parameter(torch.randn(cfg.attention) / cfg.attention**0.5)  # Eq. 4
        self.p = nn.Parameter(torch.ones(cfg.dim))  # Eq. 5; ones: FM's sum at the start
        self.dropout = nn.Dropout(cfg.dropout)
        n_fields = self.fields.n_user_fields + 1
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        # the pairs of two candidate-free fields (the candidate is the last field)
        users = cols < n_fields - 1
        self.register_buffer("user_pair_rows", rows[users], persistent=False)
        self.register_buffer("user_pair_cols", cols[users], persistent=False)

    def _logits(self, products: torch.Tensor) -> torch.Tensor:
        """a'_ij of Eq. 4 for pair products (..., d) -> (...)."""
        return F.relu(self.attention(products)) @ self.h

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of candidates ``items`` (B, C): Eq. 2-5, the training path.

        The P_u pairs of two candidate-free fields and their attention logits are computed
        once per user, the F_u pairs with the candidate per (user, candidate); the softmax
        runs over both, and the pooled vector is ``sum_uu a e + v * (sum_f a_fv u_f)``. The
        same function as :meth:`reference_items` (Eq. 2-5 over all P pairs of every
        candidate's fields; tested, with gradients and dropout's draws)."""
        u = self.fields.user_fields(batch, batch.domain)  # (B, F_u, d)
        v = self.fields.item_emb(items)  # (B, C, d)
        n_user = u.shape[1]
        uu = u[:, self.user_pair_rows] * u[:, self.user_pair_cols]  # (B, P_u, d), Eq. 2
        uv = u.unsqueeze(1) * v.unsqueeze(2)  # (B, C, F_u, d): each user field with v, Eq. 2
        logits = torch.cat(
            [self._logits(uu).unsqueeze(1).expand(-1, v.shape[1], -1), self._logits(uv)], dim=2
        )  # (B, C, P_u + F_u), Eq. 4
        a_uu, a_uv = torch.softmax(logits, dim=2).split([uu.shape[1], n_user], dim=2)
        pooled = self.dropout(a_uu @ uu + v * (a_uv @ u))  # (B, C, d): sum_ij a_ij e_ij
        first = self.fields.user_linear(batch, batch.domain).unsqueeze(1)  # (B, 1)
        return first + self.fields.item_linear(items) + pooled @ self.p  # Eq. 5

    def reference_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """:meth:`score_items` as Eq. 2-5 are written: all P pairs of each (user, candidate)'s
        fields, (B, C, P, d) products (the tests' reference)."""
        e = self.fields.with_candidates(self.fields.user_fields(batch, batch.domain), items)
        products = e[:, :, self.pair_rows] * e[:, :, self.pair_cols]  # (B, C, P, d), Eq. 2
        a = torch.softmax(self._logits(products), dim=2)  # (B, C, P), Eq. 4
        pooled = self.dropout((a.unsqueeze(-1) * products).sum(dim=2))  # (B, C, d)
        first = self.fields.user_linear(batch, batch.domain).unsqueeze(1)  # (B, 1)
        return first + self.fields.item_linear(items) + pooled @ self.p  # Eq. 5

    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        target = target_column(batch, domain)
        u = self.fields.user_fields(batch, target)  # (B, F_u, d)
        first = self.fields.user_linear(batch, target)  # (B,)
        lo, hi = self.info.domain_range(domain)
        items = self.fields.item_emb.weight[lo:hi]  # (n, d)
        item_first = self.fields.item_w.weight[lo:hi, 0]  # (n,)
        n_user = u.shape[1]
        # pairs of two candidate-free fields: once per user
        uu = u[:, self.user_pair_rows] * u[:, self.user_pair_cols]  # (B, P_u, d)
        uu_logit, uu_value = self._logits(uu), uu @ self.p  # (B, P_u), (B, P_u)
        # W (u_f * v) = (W diag(u_f)) v: the per-field matrices, (B, F_u, d, t)
        w_u = u.unsqueeze(-1) * self.attention.weight.T
        pu = u * self.p  # (B, F_u, d)

        def block(us: slice, its: slice) -> torch.Tensor:
            v = items[its]  # (c, d)
            c = v.shape[0]
            hidden = F.relu(torch.matmul(v, w_u[us]) + self.attention.bias)  # (b, F_u, c, t)
            logits = torch.cat([uu_logit[us].unsqueeze(-1).expand(-1, -1, c), hidden @ self.h], 1)
            values = torch.cat([uu_value[us].unsqueeze(-1).expand(-1, -1, c), pu[us] @ v.T], 1)
            pairs = (torch.softmax(logits, dim=1) * values).sum(dim=1)  # (b, c), P = P_u + F_u
            return first[us].unsqueeze(1) + item_first[its] + pairs

        n_pairs = uu.shape[1] + n_user
        per_pair = 2 * n_user * self.cfg.attention + 3 * n_pairs  # floats per (user, item)
        return score_in_chunks(block, len(batch), hi - lo, per_pair, self.cfg.chunk_floats)


AFMSingle, AFMMulti = single_and_multi(
    AFM, AFMConfig, "afm", "AFM", (2, 6), QUICK, tune=DROPOUT, inert_keys=("chunk_floats",)
)
