"""Optimisation steps, kept apart from the models.

A step owns its optimiser(s) and turns one batch into a parameter update and a dict of
floats to log. The supervised step minimises ``model.loss(batch)["loss"]`` with Adam;
adversarial models bring a step with two optimisers of their own. Steps call the loss through
:func:`aftrec.training.distributed.loss_forward`, which is DistributedDataParallel when
training runs on several ranks, so gradients are averaged across them.
"""

from __future__ import annotations

from typing import Any, Protocol

from aftrec.config import TrainConfig
from aftrec.data.loader import Batch
from aftrec.models.base import RetrievalModel
from aftrec.training.distributed import SINGLE, Context, loss_forward
from aftrec.training.optim import adam


class Step(Protocol):
    def __call__(self, batch: Batch) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SupervisedStep:
    def __init__(self, model: RetrievalModel, cfg: TrainConfig, ctx: Context = SINGLE) -> None:
        self.model = model
        self.forward = loss_forward(model, "loss", ctx)
        self.optimizer = adam(model, cfg.lr, cfg.weight_decay)

    def __call__(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        losses = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def make_step(model: RetrievalModel, cfg: TrainConfig, ctx: Context = SINGLE) -> Step:
    """The model's own step if it defines ``make_step``, else the supervised one."""
    custom = getattr(model, "make_step", None)
    if custom is not None:
        step: Step = custom(cfg, ctx)
        return step
    return SupervisedStep(model, cfg, ctx)
