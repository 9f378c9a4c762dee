"""Optimisation steps, kept apart from the models.

A step owns its optimiser(s) and turns one batch into a parameter update and a dict of
floats to log. The supervised step minimises ``model.loss(batch)["loss"]`` with Adam;
adversarial models bring a step with two optimisers of their own.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from aftrec.config import TrainConfig
from aftrec.data.loader import Batch
from aftrec.models.base import RetrievalModel


class Step(Protocol):
    def __call__(self, batch: Batch) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SupervisedStep:
    def __init__(self, model: RetrievalModel, cfg: TrainConfig) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )

    def __call__(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        losses = self.model.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def make_step(model: RetrievalModel, cfg: TrainConfig) -> Step:
    """The model's own step if it defines ``make_step``, else the supervised one."""
    custom = getattr(model, "make_step", None)
    if custom is not None:
        step: Step = custom(cfg)
        return step
    return SupervisedStep(model, cfg)
