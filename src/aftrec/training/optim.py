"""Adam, with lazy (sparse) Adam for embedding tables that produce sparse gradients.

With ``train.sparse_embeddings`` the model's large ``nn.Embedding`` tables (item and user tables:
at least as many rows as the catalogue has items) return sparse gradients (only the rows a
batch touched) and are updated by ``torch.optim.SparseAdam``,
which updates the moments of the touched rows only (the "lazy Adam" of large-scale
recommenders); every other parameter keeps dense Adam. Over a catalogue of 1.5M items a dense
Adam step reads and writes four 1.5M x 64 tables per embedding on every batch, which is what
bounds a step's time at that size (see docs/scale.md); the sparse step's cost follows the
batch instead of the catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aftrec.errors import ConfigError

DENSE_USE = (
    "train.sparse_embeddings: this model uses an embedding table densely (e.g. a full softmax "
    "over the items); train it without sparse embeddings"
)


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()``; under DDP, whose reducer finds a table used densely before the
    optimiser does (:class:`MixedAdam`), that is the same one-line :data:`DENSE_USE`."""
    try:
        loss.backward()
    except RuntimeError as exc:
        if "to have sparse gradient" not in str(exc):
            raise
        raise ConfigError(DENSE_USE) from exc


def use_sparse_embeddings(model: nn.Module, min_rows: int) -> None:
    """Switch the embedding tables of ``model`` with at least ``min_rows`` rows to sparse
    gradients (small tables, such as domain embeddings used whole, stay dense)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings >= min_rows:
            m.sparse = True


def _sparse_params(module: nn.Module) -> set[int]:
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse}


class MixedAdam:
    """Dense Adam for most parameters and SparseAdam for sparse-gradient tables, as one
    optimiser (``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], lr: float) -> None:
        self.dense = dense_adam(dense, lr, 0.0) if dense else None
        self.sparse = torch.optim.SparseAdam(sparse, lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in (self.dense, self.sparse):
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.dense is not None:
            self.dense.step()
        try:
            self.sparse.step()
        except RuntimeError as exc:
            if "dense" not in str(exc):
                raise
            raise ConfigError(DENSE_USE) from exc

    def state_dict(self) -> dict[str, Any]:
        return {
            "dense": None if self.dense is None else self.dense.state_dict(),
            "sparse": self.sparse.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sparse" not in state:
            raise ValueError("checkpoint has a dense optimiser, run has sparse embeddings")
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def dense_adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused where torch has the fused kernel for the parameters' device:
    one pass over all tensors per step instead of a chain of ``foreach`` operations (on one
    CPU thread, 1.0 ms against 2.9 ms for AFT's discriminator, BENCHMARKS.md "Training
    speed"). The update is the same; the two agree to float rounding."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if fused:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def adam(
    module: nn.Module, lr: float, weight_decay: float, params: Iterable[nn.Parameter] | None = None
) -> torch.optim.Adam | MixedAdam:
    """Adam over ``params`` (default: all of ``module``'s); lazy Adam for the tables of
    ``module`` switched to sparse gradients by :func:`use_sparse_embeddings`."""
    params = list(module.parameters() if params is None else params)
    sparse_ids = _sparse_params(module)
    sparse = [p for p in params if id(p) in sparse_ids]
    if not sparse:
        return dense_adam(params, lr, weight_decay)
    if weight_decay:
        raise ConfigError("train.weight_decay is not supported with train.sparse_embeddings")
    return MixedAdam([p for p in params if id(p) not in sparse_ids], sparse, lr)
