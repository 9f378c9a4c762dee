"""The contract every model fulfils.

Two kinds of model plug in:

* dot-product models give a user vector per target domain (:meth:`RetrievalModel.user_vectors`)
  and the item vectors of each domain (:meth:`RetrievalModel.item_vectors`); the score is their
  inner product, which is what a nearest-neighbour index serves;
* scorer models need the candidate item in their input and override :meth:`score` directly.

The evaluator and ``aftrec recommend`` only call :meth:`score`, so both kinds are served.
Training goes through :meth:`loss` (one batch of positives with sampled negatives) or, for
closed-form models, :meth:`fit` on the training interactions.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch


class RetrievalModel(nn.Module):
    name: ClassVar[str] = ""
    #: False for models fitted in closed form (popularity, EASE): no epochs, no optimiser.
    trainable: ClassVar[bool] = True
    #: True when :meth:`score` is an inner product of user and item vectors.
    dot_product: ClassVar[bool] = True

    def __init__(self, cfg: Any, info: DataInfo, history_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.history_len = history_len

    # --- dot-product contract -------------------------------------------------------------
    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        """(B, dim) user vectors for target domain ``domain``."""
        raise NotImplementedError(f"{type(self).__name__} is not a dot-product model")

    def item_vectors(self, domain: int) -> torch.Tensor:
        """(n_items_in_domain, dim) item vectors of ``domain``, in item-index order."""
        raise NotImplementedError(f"{type(self).__name__} is not a dot-product model")

    # --- what the evaluator calls ---------------------------------------------------------
    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        """(B, n_items_in_domain) scores of every item of ``domain`` for each user."""
        return self.user_vectors(batch, domain) @ self.item_vectors(domain).T

    # --- training -------------------------------------------------------------------------
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses on a training batch; the optimiser minimises ``out["loss"]``."""
        raise NotImplementedError

    def fit(self, train: Interactions) -> None:
        """Closed-form fitting for models with ``trainable = False``."""
        raise NotImplementedError

    def prepare_training(self, train: Interactions, valid: Interactions | None = None) -> None:
        """Called by the trainer once before the first epoch (and on resume) with the training
        interactions (and the validation ones, for diagnostics only: never for fitting);
        models that need them during training (e.g. to keep a user's clicks out of generated
        negatives) index them here. No-op by default."""

    def epoch_health(self) -> dict[str, Any] | None:
        """Diagnostics of a training mechanism, gathered over the epoch and reset here; the
        trainer logs them under ``"health"`` in ``log.jsonl``. None (the default): nothing."""
        return None

    def search_space(self) -> list[dict[str, Any]]:
        """Model-config overrides a closed-form model is fitted with, the best on validation
        being kept (e.g. EASE's L2 weight); the default is the config as given."""
        return [{}]


class UserTowerModel(RetrievalModel):
    """A dot-product model whose user vector for each example's own target domain comes from
    :meth:`user_tower` and whose items are rows of ``self.item_emb``; trained with the shared
    sampled loss (``cfg.loss``) on the loader's positive and negatives."""

    item_emb: nn.Embedding

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        """(B, dim) user vectors, ``domain`` (B,) being each row's target domain."""
        raise NotImplementedError

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        target = torch.full((len(batch),), domain, dtype=torch.long, device=batch.history.device)
        return self.user_tower(batch, target)

    def item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return self.item_emb.weight[lo:hi]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        from aftrec.models.losses import sampled_loss

        assert batch.pos is not None and batch.neg is not None, "training batches carry items"
        u = self.user_tower(batch, batch.domain)  # (B, d)
        pos = (u * self.item_emb(batch.pos)).sum(-1)  # (B,)
        neg = torch.einsum("bd,bkd->bk", u, self.item_emb(batch.neg))  # (B, K)
        return {"loss": sampled_loss(pos, neg, self.cfg.loss)}
