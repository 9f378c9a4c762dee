"""Multi-task learning competitors, one task per domain: Shared-Bottom, MMoE and SNR.

* Shared-Bottom, hard parameter sharing: "Multitask Learning" (Rich Caruana, Machine Learning
  28, 1997): one shared hidden layer, one tower per task.
* MMoE: "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"
  (Ma, Zhao, Yi, Chen, Hong and Chi, KDD 2018), Eqs. 5-6: ``f^k(x) = sum_i g^k(x)_i f_i(x)``
  with ``g^k(x) = softmax(W_gk x)``, one gate per task over shared experts.
* SNR: "SNR: Sub-Network Routing for Flexible Parameter Sharing in Multi-Task Learning" (Ma,
  Zhao, Chen, Li, Hong and Chi, AAAI 2019). We implement **SNR-Trans**: the shared bottom is
  split into two layers of sub-networks, the lower ones reading the input and one upper
  sub-network per task, connected by ``u_j = sum_i z_ij W_ij v_i`` where ``v_i`` is the output
  of lower sub-network i, ``W_ij`` a learned transformation and ``z_ij`` a learned binary-ish
  code drawn from the hard concrete distribution ("Learning Sparse Neural Networks through L0
  Regularization", Louizos, Welling and Kingma, ICLR 2018) with ``beta = 2/3``,
  ``gamma = -0.1``, ``zeta = 1.1``: during training ``s = sigmoid((log u - log(1 - u) +
  log alpha) / beta)`` with one ``u ~ U(0, 1)`` per code and batch, ``z = min(1, max(0, s
  (zeta - gamma) + gamma))``; at evaluation ``s = sigmoid(log alpha)``. The expected L0 norm
  ``sum sigmoid(log alpha - beta log(-gamma / zeta))`` is added to the loss with weight
  ``l0_weight``. The upper sub-network of task j is ``ReLU(u_j + b_j)``.

Input, shared by the three: the mean item embedding of the user's recent behaviours in each
domain, concatenated over domains (and, with ``user_embedding``, a user-id embedding). The
tower of domain t (two layers) outputs the user vector for target domain t, scored by inner
product against the item embeddings (the same table as the input's, so the model serves from
a nearest-neighbour index). Each example trains the tower of its target domain with the shared
sampled loss; the tasks are weighted by their share of training examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate, Weight
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import RetrievalModel
from aftrec.models.losses import sampled_loss
from aftrec.registry import DROPOUT, register_model

# hard concrete distribution (Louizos et al. 2018, section 4)
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "hidden": "32", "tower_hidden": "16"}


@dataclass(frozen=True)
class SharedBottomConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    hidden: Count = 256  # width of the shared layer (of each expert / sub-network)
    tower_hidden: Count = 128
    dropout: Rate = 0.1
    user_embedding: bool = False  # add a user-id embedding to the input
    loss: Loss = "softmax"  # "softmax" over [positive, negatives] or "bce"


@dataclass(frozen=True)
class MMoEConfig(SharedBottomConfig):
    n_experts: Count = 4


@dataclass(frozen=True)
class SNRConfig(SharedBottomConfig):
    n_lower: Count = 3  # lower-level sub-networks; the upper level has one per domain
    l0_weight: Weight = 1e-3  # weight of the expected L0 norm of the codes
    log_alpha_init: float = 1.0  # initial log alpha of every code (connections start open)


class Stacked(nn.Module):
    """``n`` independent linear layers applied at once: (B, in) or (B, n, in) -> (B, n, out)."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one input shared by the n layers
            return torch.einsum("bi,nio->bno", x, self.weight) + self.bias
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


class MultiTask(RetrievalModel):
    """Pooled multi-domain input, a task-specific representation per domain, one tower each.

    Subclasses implement :meth:`task_inputs` (the (B, D, hidden) input of every tower) and may
    add regularisers in :meth:`penalties`.
    """

    needs_negatives = True  # the sampled loss on the loader's negatives

    def __init__(self, cfg: SharedBottomConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        d, n_dom = cfg.dim, info.n_domains
        self.item_emb = nn.Embedding(info.n_items + 1, d, padding_idx=info.pad)
        self.user_emb = nn.Embedding(info.n_users, d) if cfg.user_embedding else None
        self.in_dim = (n_dom + int(cfg.user_embedding)) * d
        self.drop = nn.Dropout(cfg.dropout)
        self.tower1 = Stacked(n_dom, cfg.hidden, cfg.tower_hidden)
        self.tower2 = Stacked(n_dom, cfg.tower_hidden, d)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        if self.user_emb is not None:
            nn.init.normal_(self.user_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[info.pad].zero_()

    def features(self, batch: Batch) -> torch.Tensor:
        """(B, in_dim): per-domain mean behaviour embeddings (and the user embedding)."""
        history = batch.history[:, :, -self.history_len :]
        b, n_dom, length = history.shape
        pooled = F.embedding_bag(  # masked mean, no (B, D, L, d) tensor; 0 without behaviours
            history.reshape(b * n_dom, length),
            self.item_emb.weight,
            mode="mean",
            padding_idx=self.info.pad,
        ).view(b, n_dom, -1)  # (B, D, d)
        parts = [pooled.flatten(1)]
        if self.user_emb is not None:
            parts.append(self.user_emb(batch.users))
        return torch.cat(parts, dim=1)

    def task_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) features -> (B, D, hidden) input of each domain's tower."""
        raise NotImplementedError

    def penalties(self) -> dict[str, torch.Tensor]:
        """Extra terms added to the loss (logged under their names)."""
        return {}

    def all_user_vectors(self, batch: Batch) -> torch.Tensor:
        """(B, D, d): the output of every domain's tower."""
        h = self.task_inputs(self.features(batch))  # (B, D, hidden)
        return self.tower2(self.drop(F.relu(self.tower1(h))))  # (B, D, d)

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        return self.all_user_vectors(batch)[:, domain]

    def item_vectors(self, domain: int) -> torch.Tensor:
        return self.domain_rows(self.item_emb.weight, domain)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.pos is not None and batch.neg is not None, "training batches carry items"
        rows = torch.arange(len(batch), device=batch.history.device)
        u = self.all_user_vectors(batch)[rows, batch.domain]  # (B, d), target domain's tower
        pos = (u * self.item_emb(batch.pos)).sum(-1)  # (B,)
        neg = torch.einsum("bd,bkd->bk", u, self.item_emb(batch.neg))  # (B, K)
        out = {"rec": sampled_loss(pos, neg, self.cfg.loss)}
        out.update(self.penalties())
        out["loss"] = sum(out.values(), torch.zeros((), device=pos.device))
        return out


@register_model(
    "shared-bottom",
    SharedBottomConfig,
    paper_name="Shared bottom",
    paper_row=9,
    quick=QUICK,
    tune=DROPOUT,
)
class SharedBottom(MultiTask):
    def __init__(self, cfg: SharedBottomConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.bottom = nn.Sequential(nn.Linear(self.in_dim, cfg.hidden), nn.ReLU())

    def task_inputs(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.bottom(x))  # (B, hidden), shared by every task
        return h.unsqueeze(1).expand(-1, self.info.n_domains, -1)  # (B, D, hidden)


@register_model(
    "mmoe",
    MMoEConfig,
    paper_name="MMoE",
    paper_row=10,
    quick={**QUICK, "n_experts": "2"},
    tune=DROPOUT,
)
class MMoE(MultiTask):
    def __init__(self, cfg: MMoEConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.experts = Stacked(cfg.n_experts, self.in_dim, cfg.hidden)  # f_i
        self.gates = nn.Linear(self.in_dim, info.n_domains * cfg.n_experts)  # W_gk, all k

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, D, n_experts) softmax gate of each domain (Eq. 6)."""
        logits = self.gates(x).view(x.shape[0], self.info.n_domains, -1)
        return logits.softmax(dim=-1)

    def task_inputs(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.drop(F.relu(self.experts(x)))  # (B, E, hidden)
        return torch.einsum("bde,beh->bdh", self.gate_weights(x), experts)  # Eq. 5


@register_model("snr", SNRConfig, paper_name="SNR", paper_row=11, quick=QUICK, tune=DROPOUT)
class SNR(MultiTask):
    def __init__(self, cfg: SNRConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        n_dom, h = info.n_domains, cfg.hidden
        self.lower = Stacked(cfg.n_lower, self.in_dim, h)  # v_i
        bound = 1 / math.sqrt(h)
        self.trans = nn.Parameter(torch.empty(n_dom, cfg.n_lower, h, h).uniform_(-bound, bound))
        self.upper_bias = nn.Parameter(torch.zeros(n_dom, h))  # b_j
        self.log_alpha = nn.Parameter(torch.full((n_dom, cfg.n_lower), cfg.log_alpha_init))

    def codes(self) -> torch.Tensor:
        """(D, n_lower) codes z_ij in [0, 1]: sampled in training, deterministic in eval."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def task_inputs(self, x: torch.Tensor) -> torch.Tensor:
        v = self.drop(F.relu(self.lower(x)))  # (B, n_lower, hidden)
        u = torch.einsum("bih,jiho,ji->bjo", v, self.trans, self.codes())  # sum_i z_ij W_ij v_i
        return F.relu(u + self.upper_bias)  # (B, D, hidden), upper sub-network of each task

    def penalties(self) -> dict[str, torch.Tensor]:
        l0 = torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()
        return {"l0": self.cfg.l0_weight * l0}
