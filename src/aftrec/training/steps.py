"""Optimisation steps, kept apart from the models.

A step owns its optimiser(s) and turns one batch into a parameter update and a dict of
floats to log. A model declares the step it trains with by name (``training_step`` on its
class, see :mod:`aftrec.models.base`) and :data:`STEPS` resolves the name: the supervised step
minimises ``model.loss(batch)["loss"]`` with Adam; the adversarial one (AFT) has two
optimisers. With ``train.precision="bf16"`` a step runs the loss's forward pass under
:func:`aftrec.training.precision.precision_context`; the backward pass and the optimiser stay
as they are. Steps call the loss through :func:`aftrec.training.distributed.loss_forward`,
which is DistributedDataParallel when training runs on several ranks, so gradients are
averaged across them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aftrec.config import TrainConfig
from aftrec.data.loader import Batch
from aftrec.errors import ConfigError
from aftrec.models.base import RetrievalModel
from aftrec.training.adversarial import AdversarialStep
from aftrec.training.distributed import SINGLE, Context, loss_forward
from aftrec.training.optim import adam, backward
from aftrec.training.precision import precision_context


class Step(Protocol):
    def __call__(self, batch: Batch) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SupervisedStep:
    def __init__(self, model: RetrievalModel, cfg: TrainConfig, ctx: Context = SINGLE) -> None:
        self.model = model
        self.forward = loss_forward(model, "loss", ctx)
        self.optimizer = adam(model, cfg.lr, cfg.weight_decay)
        self.precision = cfg.precision

    def __call__(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        with precision_context(self.precision, self.model):
            losses = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        backward(losses["loss"])
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


#: step name (a model's ``training_step``) -> constructor ``(model, train config, context)``
STEPS: dict[str, Callable[[Any, TrainConfig, Context], Step]] = {
    "supervised": SupervisedStep,
    "adversarial": AdversarialStep,
}


def make_step(model: RetrievalModel, cfg: TrainConfig, ctx: Context = SINGLE) -> Step:
    """The step ``model`` declares (``type(model).training_step``), built for ``model``."""
    name = type(model).training_step
    if name not in STEPS:
        raise ConfigError(
            f"model {model.name!r} declares training_step {name!r}; known: {', '.join(STEPS)}"
        )
    return STEPS[name](model, cfg, ctx)
