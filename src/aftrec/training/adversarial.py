"""The adversarial step of AFT: two Adam optimisers, warm-up and the D:G update ratio.

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao et al., KDD 2021),
sections 3.4 and 4.2. One call trains on one batch:

1. for the first ``warmup_steps`` batches, D is fitted on the random unclicked negatives only
   and G as a plain recommender (no fakes, no REINFORCE, no MMD);
2. afterwards G proposes its top-k fakes, and the batch's Eq. 16
   ``L = lambda_D L_D + lambda_G L_G + lambda_M L_MMD`` is differentiated once. ``L_D``
   depends on D's parameters only (the fakes are discrete ids) and ``L_G``, ``L_MMD`` on G's
   only (the reward ``p_d`` is detached), so one backward pass gives each network exactly the
   gradient of its own objective; D's optimiser then steps on every ``d_every``-th batch and
   G's on every ``g_every``-th (the other network runs without autograd on the batches it
   skips). With the defaults (1, 1) both are updated on every batch, G's reward coming from
   the D that judged its fakes.

The models without a generator (``aft-d``, ``aft-hnm``) use the same step with D's optimiser
only. :meth:`state_dict` holds both optimisers and the batch counter, so a resumed run picks
up the schedule where it stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from aftrec.config import TrainConfig
from aftrec.data.loader import Batch
from aftrec.training.distributed import SINGLE, Context, loss_forward
from aftrec.training.optim import MixedAdam, adam, backward
from aftrec.training.precision import precision_context

if TYPE_CHECKING:
    from aftrec.models.aft.model import AFT


class AdversarialStep:
    def __init__(self, model: AFT, cfg: TrainConfig, ctx: Context = SINGLE) -> None:
        mc = model.cfg
        self.model = model
        self.forward = loss_forward(model, "losses", ctx)  # DDP across ranks
        # a step that trains one network alone reduces that network's gradients only: DDP's
        # reducer refuses a sparse table left without a gradient (the other network's)
        self.forward_d, self.forward_g = self.forward, self.forward
        if ctx.distributed and model.generator is not None:
            self.forward_d = loss_forward(model, "losses", ctx, owner=model.discriminator)
            self.forward_g = loss_forward(model, "losses", ctx, owner=model.generator)
        self.d_every, self.g_every, self.warmup = mc.d_every, mc.g_every, mc.warmup_steps
        d_lr = cfg.lr if mc.d_lr is None else mc.d_lr
        self.d_opt = adam(model.discriminator, d_lr, cfg.weight_decay)
        self.g_opt: torch.optim.Adam | MixedAdam | None = None
        if model.generator is not None:
            g_lr = cfg.lr if mc.g_lr is None else mc.g_lr
            self.g_opt = adam(model.generator, g_lr, cfg.weight_decay)
        self.precision = cfg.precision
        self.batches = 0  # batches seen, for the warm-up and the update ratio

    def __call__(self, batch: Batch) -> dict[str, float]:
        warmup = self.batches < self.warmup
        train_d = warmup or self.batches % self.d_every == 0
        train_g = self.g_opt is not None and (warmup or self.batches % self.g_every == 0)
        self.model.train()
        with precision_context(self.precision, self.model):
            forward = (
                self.forward
                if train_d == train_g
                else (self.forward_d if train_d else self.forward_g)
            )
            # a batch that trains neither network asks for no backward: DDP would wait for one
            with torch.set_grad_enabled(train_d or train_g):
                losses = forward(batch, train_d=train_d, train_g=train_g, warmup=warmup)
        self.d_opt.zero_grad(set_to_none=True)
        if self.g_opt is not None:
            self.g_opt.zero_grad(set_to_none=True)
        if train_d or train_g:
            backward(losses["loss"])
        if train_d:
            self.d_opt.step()
        if train_g and self.g_opt is not None:
            self.g_opt.step()
        self.batches += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "d_optimizer": self.d_opt.state_dict(),
            "g_optimizer": None if self.g_opt is None else self.g_opt.state_dict(),
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.d_opt.load_state_dict(state["d_optimizer"])
        if (self.g_opt is None) != (state["g_optimizer"] is None):
            raise ValueError("checkpoint and model disagree on having a generator")
        if self.g_opt is not None:
            self.g_opt.load_state_dict(state["g_optimizer"])
        self.batches = int(state["batches"])
