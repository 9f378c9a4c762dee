"""EASE: "Embarrassingly Shallow Autoencoders for Sparse Data" (Steck, WWW 2019).

A closed-form item-item model over all domains' items, so a click in one domain can raise an
item of another:

    P = (X^T X + lambda I)^{-1},    B = I - P diagMat(1 / diag(P)),    diag(B) = 0,

where X is the binary user x item matrix of training positives. A user's scores are x_u B,
restricted to the target domain's columns. The user row x_u is the model input every aftrec
model sees (the last ``history_len`` behaviours per domain), so EASE is compared on the same
footing. ``lambda`` is chosen on the validation split from ``model.l2_grid`` (the trainer fits
each value and keeps the best); the resolved config records the chosen ``l2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aftrec.config import Checked, Positive
from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch
from aftrec.errors import ConfigError
from aftrec.models.base import RetrievalModel
from aftrec.registry import Range, register_model

MAX_ITEMS = 40_000  # B is n_items x n_items float32: 6.4 GB at this size


@dataclass(frozen=True)
class EaseConfig(Checked):
    l2: Positive = 500.0  # 0 leaves the Gram matrix singular when an item has no click
    #: values of l2 tried on validation; empty = use ``l2`` as given
    l2_grid: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)

    def validate(self) -> None:
        if any(not v > 0 for v in self.l2_grid):  # as l2: a 0 can leave G singular
            raise ConfigError(f"config key model.l2_grid must hold values > 0, got {self.l2_grid}")


# aftrec tune draws the L2 weight itself: no grid, the drawn value is fitted
@register_model(
    "ease", EaseConfig, quick={"l2_grid": "[500.0]"},
    tune={"model.l2": Range(10.0, 10_000.0, log=True)}, tune_fixed=("model.l2_grid=[]",),
)  # fmt: skip
class Ease(RetrievalModel):
    trainable = False
    dot_product = True  # user vector x_u (n_items), item vectors: columns of B
    weights: torch.Tensor

    def __init__(self, cfg: EaseConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        if info.n_items > MAX_ITEMS:
            raise ConfigError(
                f"ease needs an n_items x n_items matrix; {info.n_items} items exceed {MAX_ITEMS}"
            )
        self.register_buffer("weights", torch.zeros(info.n_items, info.n_items))

    def search_space(self) -> list[dict[str, Any]]:
        return [{"l2": v, "l2_grid": ()} for v in self.cfg.l2_grid] or [{}]

    def fit(self, train: Interactions) -> None:
        n = self.info.n_items
        x = torch.zeros(self.info.n_users, n, dtype=torch.float64)
        x[
            torch.from_numpy(train.user.astype(np.int64)),
            torch.from_numpy(train.item.astype(np.int64)),
        ] = 1.0
        gram = x.T @ x  # (n, n)
        gram.diagonal().add_(self.cfg.l2)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal()[None, :]  # B_ij = -P_ij / P_jj
        b.diagonal().zero_()
        self.weights.copy_(b.float())

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        hist = batch.history.flatten(1)  # (B, D * L)
        # zeros shaped from the input (not len(batch), which tracing freezes): (B, n_items + 1)
        x = torch.zeros_like(hist[:, :1], dtype=torch.float32).repeat(1, self.info.n_items + 1)
        x.scatter_(1, hist, 1.0)
        return x[:, : self.info.n_items]  # (B, n_items), the pad column dropped

    def item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return self.weights[:, lo:hi].T  # (n_d, n_items)
