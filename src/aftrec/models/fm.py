"""Factorization Machines: "Factorization Machines" (Steffen Rendle, ICDM 2010).

Eq. 1 of the paper, over the fields of one (user, candidate) example::

    y(x) = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j,

computed in O(F d) with Lemma 3.1: ``sum_{i<j} <v_i, v_j> = 1/2 sum_f ((sum_i v_if)^2 -
sum_i v_if^2)``.

Fields (shared with :mod:`aftrec.models.afm` and :mod:`aftrec.models.autoint`, see
:class:`FieldEmbedding`), in this order:

1. the target domain (one-hot);
2. one pooled-history field per visible domain: the user's last ``history_len`` behaviours in
   it as a multi-hot vector normalised to sum to 1, so the field's embedding is the mean of the
   behaviours' embeddings and its first-order term the mean of their weights (AutoInt's Eq. 3
   for multi-valued fields; SVD++'s normalised implicit feedback). ``fm-single`` sees the
   target domain's behaviours only (one field), ``fm-multi`` one field per domain (section
   5.2 of the AFT paper: "single" and "multi" versions);
3. optionally (``user_field``) the user id; a single-domain model keys it by (user, target
   domain) so that nothing learnt from other domains' clicks reaches it;
4. the candidate item.

History items and candidate items are different features, with separate embedding tables,
as in a one-hot FM input. One model is trained over every domain's examples; the single and
multi variants differ only in which behaviours they are given.

FM's pairwise term splits into the candidate-free part and ``<sum of user-side embeddings,
v_item>``, so the model is exactly a dot-product model: the user vector is
``[sum_f v_f, w_0 + user-side linear + user-side pairs, 1]`` and the item vector
``[v_item, 1, w_item]``; full ranking is one matrix product and it serves from an index.
Trained as a CTR model on the positive and the loader's sampled negatives (``loss="bce"``,
``"softmax"`` allowed) through :class:`~aftrec.models.base.CandidateScorer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from aftrec.config import Checked, Count, Loss
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import CandidateScorer, target_column
from aftrec.models.layers import bag_mean
from aftrec.registry import Range, register_model

F = TypeVar("F", bound=CandidateScorer)

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16"}


@dataclass(frozen=True)
class FMConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    user_field: bool = False  # add the user id as a field (keyed by (user, domain) if single)
    loss: Loss = "bce"  # "bce" (a CTR model) or "softmax" over [positive, negatives]


class FieldEmbedding(nn.Module):
    """Embeddings of the fields of FM, AFM and AutoInt (the module docstring lists them).

    ``user_fields`` gives the F_u candidate-free fields, the candidate comes from ``item_emb``;
    with ``linear`` the first-order weights w_0 and w_i of FM / AFM are kept too.
    """

    def __init__(
        self, info: DataInfo, dim: int, multi_domain: bool, user_field: bool, linear: bool
    ) -> None:
        super().__init__()
        self.info = info
        self.multi_domain = multi_domain
        n_users = info.n_users * (1 if multi_domain else info.n_domains)
        #: candidate-free fields: domain, one history per visible domain, optional user
        self.n_user_fields = 1 + (info.n_domains if multi_domain else 1) + int(user_field)
        self.domain_emb = nn.Embedding(info.n_domains, dim)
        self.history_emb = nn.Embedding(info.n_items + 1, dim, padding_idx=info.pad)
        self.item_emb = nn.Embedding(info.n_items, dim)
        self.user_emb = nn.Embedding(n_users, dim) if user_field else None
        for emb in (self.domain_emb, self.history_emb, self.item_emb, self.user_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.history_emb.weight[info.pad].zero_()
        self.linear = linear
        if linear:  # first-order weights, zero at start
            self.bias = nn.Parameter(torch.zeros(()))
            self.domain_w = nn.Embedding(info.n_domains, 1)
            self.history_w = nn.Embedding(info.n_items + 1, 1, padding_idx=info.pad)
            self.item_w = nn.Embedding(info.n_items, 1)
            self.user_w = nn.Embedding(n_users, 1) if user_field else None
            for w in (self.domain_w, self.history_w, self.item_w, self.user_w):
                if w is not None:
                    nn.init.zeros_(w.weight)

    def _visible(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        """(B, V, L) behaviours the model may see: every domain (V = D) or the target's (V = 1)."""
        if self.multi_domain:
            return batch.history
        index = domain.view(-1, 1, 1).expand(-1, 1, batch.history.shape[2])  # (B, 1, L)
        return batch.history.gather(1, index)  # a gather, not arange(len(batch)): any B traces

    def _user_index(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        if self.multi_domain:
            return batch.users
        return batch.users * self.info.n_domains + domain

    def user_fields(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        """(B, F_u, d) embeddings of the candidate-free fields for target domains ``domain``."""
        hist = self._visible(batch, domain)  # (B, V, L)
        pooled = bag_mean(self.history_emb, hist, self.info.pad)  # (B, V, d)
        parts = [self.domain_emb(domain).unsqueeze(1), pooled]
        if self.user_emb is not None:
            parts.append(self.user_emb(self._user_index(batch, domain)).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def user_linear(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        """(B,) w_0 plus the first-order terms of the candidate-free fields."""
        hist = self._visible(batch, domain)  # (B, V, L)
        w_hist = bag_mean(self.history_w, hist, self.info.pad)  # (B, V, 1)
        out = self.bias + self.domain_w(domain).squeeze(-1) + w_hist.sum(dim=(1, 2))
        if self.user_w is not None:
            out = out + self.user_w(self._user_index(batch, domain)).squeeze(-1)
        return out

    def item_linear(self, items: torch.Tensor) -> torch.Tensor:
        """First-order weights w_item of global item ids ``items`` (any shape)."""
        return self.item_w(items).squeeze(-1)

    def with_candidates(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, C, F, d): the user-side fields (B, F_u, d) followed by each candidate (B, C)."""
        cand = self.item_emb(items)  # (B, C, d)
        user = user.unsqueeze(1).expand(-1, items.shape[1], -1, -1)  # (B, C, F_u, d)
        return torch.cat([user, cand.unsqueeze(2)], dim=2)


def single_and_multi(
    base: type[F],
    config: type[Any],
    name: str,
    paper: str,
    rows: tuple[int, int],
    quick: Any,
    tune: Mapping[str, Range] | None = None,
    inert_keys: tuple[str, ...] = (),
) -> tuple[type[F], type[F]]:
    """Register the two variants of a field model (section 5.2 of the AFT paper): ``NAME-single``
    sees the target domain's behaviours only, ``NAME-multi`` every domain's (``multi_domain``);
    ``rows`` are their rows in the paper's Tables 2 and 3; ``tune``: the model's own tuned
    settings (:attr:`aftrec.registry.Registration.tune`); ``inert_keys``: config keys that do
    not change what it computes (:attr:`aftrec.registry.Registration.inert_keys`)."""
    out = []
    for variant, multi, row in (("single", False, rows[0]), ("multi", True, rows[1])):
        cls_name = f"{base.__name__}{variant.title()}"
        attrs = {"multi_domain": multi, "__module__": base.__module__, "__qualname__": cls_name}
        cls = type(cls_name, (base,), attrs)
        register = register_model(
            f"{name}-{variant}",
            config,
            paper_name=f"{paper} ({variant})",
            paper_row=row,
            quick=quick,
            tune=tune,
            inert_keys=inert_keys,
        )
        out.append(register(cls))
    return out[0], out[1]


class FM(CandidateScorer):
    """Shared by ``fm-single`` and ``fm-multi``; the subclass says which behaviours it sees."""

    dot_product = True  # see the module docstring: [sum v_f, bias, 1] . [v_item, 1, w_item]
    multi_domain: ClassVar[bool] = False

    def __init__(self, cfg: FMConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.fields = FieldEmbedding(info, cfg.dim, self.multi_domain, cfg.user_field, True)

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of candidates ``items`` (B, C): Eq. 1 on the fields (the training path)."""
        e = self.fields.with_candidates(self.fields.user_fields(batch, batch.domain), items)
        pairs = 0.5 * (e.sum(dim=2).pow(2) - e.pow(2).sum(dim=2)).sum(-1)  # (B, C), Lemma 3.1
        first = self.fields.user_linear(batch, batch.domain).unsqueeze(1)  # (B, 1)
        return first + self.fields.item_linear(items) + pairs

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        target = target_column(batch, domain)
        u = self.fields.user_fields(batch, target)  # (B, F_u, d)
        s = u.sum(dim=1)  # (B, d)
        user_pairs = 0.5 * (s.pow(2) - u.pow(2).sum(dim=1)).sum(-1)  # (B,)
        const = self.fields.user_linear(batch, target) + user_pairs  # (B,)
        return torch.cat([s, const.unsqueeze(1), torch.ones_like(const).unsqueeze(1)], dim=1)

    def item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        v = self.fields.item_emb.weight[lo:hi]  # (n, d)
        w = self.fields.item_w.weight[lo:hi]  # (n, 1)
        return torch.cat([v, torch.ones_like(w), w], dim=1)  # (n, d + 2)


FMSingle, FMMulti = single_and_multi(FM, FMConfig, "fm", "FM", (1, 5), QUICK)
