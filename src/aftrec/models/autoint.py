"""AutoInt: "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks"
(Song, Shi, Xiao, Duan, Xu, Zhang and Tang, CIKM 2019).

The field embeddings e_1..e_F (the fields of :mod:`aftrec.models.fm`: target domain, one
pooled history per visible domain, which is the paper's Eq. 3 for multi-valued fields, optional
user id, candidate item) go through ``layers`` interacting layers, each multi-head
self-attention over the fields with a residual connection::

    alpha^h_mk = softmax_k(<W^h_Q e_m, W^h_K e_k> / sqrt(d'))                 (Eq. 5)
    e~^h_m = sum_k alpha^h_mk W^h_V e_k                                       (Eq. 6)
    e~_m = e~^1_m ++ ... ++ e~^H_m                                            (Eq. 7)
    e^Res_m = ReLU(e~_m + W_Res e_m)                                          (Eq. 8)
    y = w^T (e^Res_1 ++ ... ++ e^Res_F) + b                                   (Eq. 9)

with H heads of size d' (``heads``, ``head_dim``; the paper's settings are 3 layers, 2 heads,
d' = 32). The 1/sqrt(d') scaling is not in Eq. 5 but is in the authors' code; their code's
extra ReLU on the projections and layer normalisation are left out, as in the paper.
``autoint-single`` sees the target domain's behaviours only, ``autoint-multi`` every domain's
(section 5.2 of the AFT paper).

Every field attends to the candidate from the first layer on, so full ranking runs layers
2.. for every (user, candidate) pair, about ``(layers - 1) * F * 4 * (H d')^2`` multiply-adds
per pair (0.23 M for ``autoint-multi`` on 5 domains at the defaults). :meth:`AutoInt.score`
makes the first layer cheap: it projects the candidate-free fields once per user and the
domain's items once, and splits each user field's softmax into its part over the user fields
(once per user) and the candidate's share (:meth:`InteractingLayer.attend_candidates`). The
(users x items) grid is scored in blocks bounded by ``chunk_floats``.
:meth:`AutoInt.score_items`, the training forward, makes the same split with each user's own
candidates (B, C): the user fields' projections and their F_u x F_u attention once per user
instead of once per (user, candidate) pair, 1.2-1.35x the step of the plain per-pair layer on
ML-1M. Both agree with Eq. 5-8 over the full (user, candidate) grid
(:meth:`AutoInt.reference_items`; tested, with gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import CandidateScorer, score_in_chunks, target_column
from aftrec.models.fm import FieldEmbedding, single_and_multi

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "heads": "2", "layers": "1", "head_dim": "8"}


@dataclass(frozen=True)
class AutoIntConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    layers: Count = 3  # interacting layers (AutoInt paper's setting)
    heads: Count = 2
    head_dim: Count = 32  # d', the attention size of one head
    user_field: bool = False  # add the user id as a field (keyed by (user, domain) if single)
    loss: Loss = "bce"  # "bce" (a CTR model) or "softmax" over [positive, negatives]
    #: bound on the largest tensor of one scoring block (4 MB); the scores do not depend on
    #: it, the speed does: 4 MB blocks score about 2x faster than 64 MB ones on a 2-core EPYC
    chunk_floats: Count = 1 << 20


class InteractingLayer(nn.Module):
    """Eq. 5-8. :meth:`project` is linear per field, so it can run on fields apart."""

    def __init__(self, d_in: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        # W_Query, W_Key, W_Value (all heads) and W_Res stacked: (d_in) -> (4 H d')
        self.proj = nn.Linear(d_in, 4 * heads * head_dim, bias=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (..., F, d_in) -> (..., F, 4 H d')

    def attend(self, qkvr: torch.Tensor) -> torch.Tensor:
        """(..., F, 4 H d') projections -> (..., F, H d') outputs e^Res."""
        x = qkvr.reshape(-1, *qkvr.shape[-2:])  # (N, F, 4 H d'): 3-D runs fastest on CPU
        q, k, v, res = x.chunk(4, dim=-1)  # each (N, F, H d')
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, F, d'), Eq. 5-6
        out = out.transpose(1, 2).flatten(-2) + res  # (N, F, H d'), Eq. 7 and 8
        return F.relu(out, inplace=True).reshape(*qkvr.shape[:-1], -1)

    def attend_candidates(self, user: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Eq. 5-8 for every (user, candidate) pair from projections made apart.

        ``user`` (b, F_u, 4 H d') projects the candidate-free fields, ``cand`` the candidates:
        (c, 4 H d') shared by every user (full ranking) or (b, c, 4 H d') per user (training);
        returns (b, c, F_u + 1, H d'), the candidate last. A user field m's softmax over [user
        fields, candidate] splits into its softmax over the user fields alone, with output A_m
        and log-normaliser Z_m, and the candidate's share ``s = sigmoid(l_mc - Z_m)``: the
        output is ``A_m + s (V_c - A_m)``. So the F_u x F_u attention runs once per user and
        only the terms with the candidate once per pair.
        """
        h, e = self.heads, self.head_dim
        if cand.dim() == 2:
            cand = cand.unsqueeze(0)  # (1, c, 4 H d'): one set for every user
        uq, uk, uv, ur = user.unflatten(-1, (4, h, e)).unbind(-3)  # each (b, F_u, H, d')
        cq, ck, cv, cr = cand.unflatten(-1, (4, h, e)).unbind(-3)  # each (b' | 1, c, H, d')
        uq, uk, uv = (t.transpose(1, 2) for t in (uq, uk, uv))  # (b, H, F_u, d')
        cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))  # (b' | 1, H, c, d')
        scale = e**-0.5
        l_uu = uq @ uk.transpose(-1, -2) * scale  # (b, H, F_u, F_u)
        a_u = (torch.softmax(l_uu, dim=-1) @ uv).unsqueeze(3)  # (b, H, F_u, 1, d')
        z_u = torch.logsumexp(l_uu, dim=-1, keepdim=True)  # (b, H, F_u, 1)
        share = torch.sigmoid(uq @ ck.transpose(-1, -2) * scale - z_u)  # (b, H, F_u, c)
        out_u = torch.addcmul(a_u, share.unsqueeze(-1), cv.unsqueeze(2) - a_u)  # (b,H,F_u,c,d')
        out_u = out_u.permute(0, 3, 2, 1, 4) + ur.unsqueeze(1)  # (b, c, F_u, H, d')
        # the candidate field attends to the user fields and itself
        l_cu = cq @ uk.transpose(-1, -2) * scale  # (b, H, c, F_u)
        l_cc = (cq * ck).sum(-1, keepdim=True) * scale  # (b' | 1, H, c, 1)
        alpha = torch.softmax(torch.cat([l_cu, l_cc.expand(l_cu.shape[0], -1, -1, -1)], -1), -1)
        out_c = alpha[..., :-1] @ uv + alpha[..., -1:] * cv  # (b, H, c, d')
        out_c = out_c.transpose(1, 2) + cr  # (b, c, H, d')
        out = torch.cat([out_u, out_c.unsqueeze(2)], dim=2)  # (b, c, F, H, d')
        return F.relu(out.flatten(-2), inplace=True)  # Eq. 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.project(x))


class AutoInt(CandidateScorer):
    """Shared by ``autoint-single`` and ``autoint-multi``; the subclass picks the behaviours."""

    multi_domain: ClassVar[bool] = False

    def __init__(self, cfg: AutoIntConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.fields = FieldEmbedding(info, cfg.dim, self.multi_domain, cfg.user_field, False)
        width = cfg.heads * cfg.head_dim
        self.first = InteractingLayer(cfg.dim, cfg.heads, cfg.head_dim)
        self.rest = nn.ModuleList(
            InteractingLayer(width, cfg.heads, cfg.head_dim) for _ in range(cfg.layers - 1)
        )
        self.n_fields = self.fields.n_user_fields + 1
        self.out = nn.Linear(self.n_fields * width, 1)  # Eq. 9

    def _top(self, x: torch.Tensor) -> torch.Tensor:
        """Layers 2.. and the output, (..., F, H d') after layer 1 -> (...) logits."""
        for layer in self.rest:
            x = layer(x)
        return self.out(x.flatten(-2)).squeeze(-1)

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of candidates ``items`` (B, C): Eq. 5-9 per (user, candidate), the
        first layer from each user's fields projected once (:meth:`InteractingLayer.
        attend_candidates`), the same function as :meth:`reference_items` (tested)."""
        first = self.first
        pu = first.project(self.fields.user_fields(batch, batch.domain))  # (B, F_u, 4 H d')
        pc = first.project(self.fields.item_emb(items))  # (B, C, 4 H d')
        return self._top(first.attend_candidates(pu, pc))

    def reference_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """:meth:`score_items` as Eq. 5-9 are written: every layer over the (B, C, F, d) fields
        of each (user, candidate) (the tests' reference)."""
        e = self.fields.with_candidates(self.fields.user_fields(batch, batch.domain), items)
        return self._top(self.first(e))

    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        target = target_column(batch, domain)
        first = self.first
        pu = first.project(self.fields.user_fields(batch, target))  # (B, F_u, 4 H d')
        lo, hi = self.info.domain_range(domain)
        pi = first.project(self.fields.item_emb.weight[lo:hi])  # (n, 4 H d')

        def block(us: slice, its: slice) -> torch.Tensor:
            return self._top(first.attend_candidates(pu[us], pi[its]))  # (b, c)

        per_pair = self.n_fields * pu.shape[-1]  # the (b, c, F, 4 H d') projections
        return score_in_chunks(block, len(batch), hi - lo, per_pair, self.cfg.chunk_floats)


AutoIntSingle, AutoIntMulti = single_and_multi(
    AutoInt, AutoIntConfig, "autoint", "AutoInt", (3, 7), QUICK, inert_keys=("chunk_floats",)
)
