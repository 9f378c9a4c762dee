"""The contract every model fulfils: everything a model is, declared here.

Two kinds of model plug in:

* dot-product models (:class:`RetrievalModel`, :class:`UserTowerModel`) give a user vector per
  target domain (:meth:`RetrievalModel.user_vectors`) and the item vectors of each domain
  (:meth:`RetrievalModel.item_vectors`); the score is their inner product, which is what a
  nearest-neighbour index serves;
* candidate scorers (:class:`CandidateScorer`) need the candidate item in their input: they
  score a batch of candidates (:meth:`CandidateScorer.score_items`, the training path) and
  override :meth:`RetrievalModel.score` for full ranking, usually through
  :func:`score_in_chunks`.

The evaluator and ``aftrec recommend`` only call :meth:`RetrievalModel.score`, so both kinds
are served. Training goes through :meth:`RetrievalModel.loss` (one batch of positives with
sampled negatives) or, for closed-form models (``trainable = False``), :meth:`RetrievalModel.fit`
on the training interactions.

What a model declares rather than leaves to be discovered:

* ``training_step``: the name of the optimisation step it trains with (``"supervised"``: one
  Adam on ``loss()["loss"]``; ``"adversarial"``: AFT's two optimisers). The training package
  resolves the name (:data:`aftrec.training.steps.STEPS`); models never import ``training``.
* :meth:`RetrievalModel.serving_channels`: the (query vectors, item vectors) pairs a bundle
  exports, ``"user"`` always and ``"trial"`` for a model with a second, exploratory encoder
  (AFT's generator, section 5.5.3 of the paper).
* its registration (:func:`aftrec.registry.register_model`): the config class, the paper's
  row name and the ``--quick`` overrides of ``aftrec reproduce``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch
from aftrec.models.losses import sampled_loss


def target_column(batch: Batch, domain: int) -> torch.Tensor:
    """(B,) int64, ``domain`` in every row of ``batch``.

    Built from a tensor of the batch rather than from ``len(batch)``: ``torch.jit.trace``
    records a Python int as a constant, so an encoder traced on one user would answer one user
    only, while this column keeps the batch size symbolic (a bundle's encoder takes any B)."""
    return torch.full_like(batch.counts[:, 0], domain, dtype=torch.long)


class Channel(NamedTuple):
    """One serving channel: ``query(batch, domain)`` (B, dim) vectors scored against
    ``items(domain)`` (n_items_in_domain, dim)."""

    query: Callable[[Batch, int], torch.Tensor]
    items: Callable[[int], torch.Tensor]


class RetrievalModel(nn.Module):
    name: ClassVar[str] = ""
    #: False for models fitted in closed form (popularity, EASE): no epochs, no optimiser, and
    #: the fit does not depend on the seed (one run stands for every seed in a reproduction).
    trainable: ClassVar[bool] = True
    #: True when :meth:`score` is an inner product of user and item vectors.
    dot_product: ClassVar[bool] = True
    #: the optimisation step this model trains with, by name (see the module docstring)
    training_step: ClassVar[str] = "supervised"
    #: True when its loss needs the loader's sampled negatives (``data.n_negatives`` > 0); a
    #: model whose config decides it sets it per instance (AFT)
    needs_negatives: bool = False

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

    def domain_rows(self, table: torch.Tensor, domain: int) -> torch.Tensor:
        """The rows of an item-indexed ``table`` that belong to ``domain`` (its item range)."""
        lo, hi = self.info.domain_range(domain)
        return table[lo:hi]

    # --- what the evaluator calls ---------------------------------------------------------
    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        """(B, n_items_in_domain) scores of every item of ``domain`` for each user."""
        return self.user_vectors(batch, domain) @ self.item_vectors(domain).T

    # --- what a bundle serves -------------------------------------------------------------
    def serving_channels(self) -> dict[str, Channel]:
        """The channels a bundle exports for a dot-product model: ``"user"`` (the main one,
        :meth:`user_vectors` against :meth:`item_vectors`) and, for models that have one, a
        ``"trial"`` channel (a second encoder that explores; AFT's generator)."""
        return {"user": Channel(self.user_vectors, self.item_vectors)}

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

    def epoch_state(self) -> dict[str, Any] | None:
        """What the model has gathered so far in the current epoch for :meth:`epoch_health`,
        as tensors and numbers (saved in a mid-epoch ``last.pt``); None: nothing."""
        return None

    def load_epoch_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`epoch_state` when a run resumes inside an epoch."""

    def search_space(self) -> list[dict[str, Any]]:
        """Model-config overrides a closed-form model is fitted with, the best on validation
        being kept (e.g. EASE's L2 weight); the default is the config as given."""
        return [{}]


class UserTowerModel(RetrievalModel):
    """A dot-product model whose user vector for each example's own target domain comes from
    :meth:`user_tower` and whose items are rows of ``self.item_emb``; trained with the shared
    sampled loss (``cfg.loss``) on the loader's positive and negatives."""

    needs_negatives = True
    item_emb: nn.Embedding

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        """(B, dim) user vectors, ``domain`` (B,) being each row's target domain."""
        raise NotImplementedError

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        target = target_column(batch, domain)
        return self.user_tower(batch, target)

    def item_vectors(self, domain: int) -> torch.Tensor:
        return self.domain_rows(self.item_emb.weight, domain)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.pos is not None and batch.neg is not None, "training batches carry items"
        u = self.user_tower(batch, batch.domain)  # (B, d)
        pos = (u * self.item_emb(batch.pos)).sum(-1)  # (B,)
        neg = torch.einsum("bd,bkd->bk", u, self.item_emb(batch.neg))  # (B, K)
        return {"loss": sampled_loss(pos, neg, self.cfg.loss)}


class CandidateScorer(RetrievalModel):
    """A model that scores (user, candidate) pairs: :meth:`score_items` is its forward, trained
    with the shared sampled loss (``cfg.loss``) on the positive and the loader's negatives,
    scored in one call. Full ranking (:meth:`score`) must be overridden unless the model is
    also a dot-product one (FM is: its pairwise term splits into user and item vectors)."""

    dot_product = False
    needs_negatives = True

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the candidates ``items`` (B, C, global item ids)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.pos is not None and batch.neg is not None, "training batches carry items"
        logits = self.score_items(batch, torch.cat([batch.pos.unsqueeze(1), batch.neg], dim=1))
        return {"loss": sampled_loss(logits[:, 0], logits[:, 1:], self.cfg.loss)}  # (B, 1 + K)


def score_in_chunks(
    fn: Callable[[slice, slice], torch.Tensor],
    n_users: int,
    n_items: int,
    floats_per_pair: int,
    budget: int,
) -> torch.Tensor:
    """(n_users, n_items) scores from ``fn(users, items) -> (b, c)`` over blocks of the grid.

    Blocks hold at most ``budget // floats_per_pair`` (user, item) pairs: all items of a domain
    for as many users as fit, or slices of the items for one user when a single user's row does
    not fit. The result does not depend on ``budget``.
    """
    item_step = max(1, min(n_items, budget // max(floats_per_pair, 1)))
    user_step = max(1, budget // (item_step * max(floats_per_pair, 1)))
    rows = []
    for u in range(0, n_users, user_step):
        users = slice(u, min(u + user_step, n_users))
        cols = [
            fn(users, slice(i, min(i + item_step, n_items))) for i in range(0, n_items, item_step)
        ]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
