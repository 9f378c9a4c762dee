"""Sparse item tables with lazy Adam: only the touched rows move, every model either trains
with them or is refused with one clear message."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.errors import ConfigError
from aftrec.registry import available_models, create_model, model_class
from aftrec.training.optim import MixedAdam, adam, dense_adam, use_sparse_embeddings
from aftrec.training.steps import make_step


def test_lazy_adam_moves_only_the_rows_a_batch_touched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 4), nn.Linear(4, 1))
    use_sparse_embeddings(model, min_rows=50)
    assert model[0].sparse
    opt = adam(model, lr=0.1, weight_decay=0.0)
    assert isinstance(opt, MixedAdam)
    before = model[0].weight.detach().clone()
    rows = torch.tensor([3, 7, 7, 42])
    loss = model[1](model[0](rows)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.is_sparse
    opt.step()
    moved = (model[0].weight.detach() != before).any(1)
    assert moved.nonzero().flatten().tolist() == [3, 7, 42]
    # a checkpoint's optimiser state carries over: the next step is the same either way
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # as a checkpoint holds it: not tensors shared with opt
    fresh = adam(model, lr=0.1, weight_decay=0.0)
    fresh.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    start = [p.detach().clone() for p in model.parameters()]
    after = []
    for o in (opt, fresh):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.copy_(p0)
        o.zero_grad()
        model[1](model[0](rows)).pow(2).sum().backward()
        o.step()
        after.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*after, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="weight_decay"):
        adam(model, lr=0.1, weight_decay=0.01)


def test_small_tables_stay_dense() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Embedding(500, 4))
    use_sparse_embeddings(model, min_rows=100)
    assert not model[0].sparse and model[1].sparse


#: models whose loss reads a whole item table (docs/scale.md): they refuse sparse gradients
DENSE_TABLES = {"atrank", "mmoe", "shared-bottom", "snr"}


@pytest.mark.parametrize("name", [m for m in available_models() if model_class(m).trainable])
def test_every_model_trains_sparse_or_says_why(name: str, tiny: Dataset) -> None:
    torch.manual_seed(0)
    cfg = resolve(name, overrides=["data.history_len=6", "train.sparse_embeddings=true"])
    model = create_model(name, cfg.model, tiny.info, cfg.data.history_len)
    use_sparse_embeddings(model, min_rows=tiny.info.n_items)
    model.prepare_training(tiny.train)
    loader = TrainLoader(tiny.train, tiny.info, 6, batch_size=64, n_negatives=4)
    batch = next(loader.epoch(np.random.default_rng(0)))
    step = make_step(model, cfg.train)
    if name in DENSE_TABLES:
        with pytest.raises(ConfigError, match="densely"):
            step(batch)
        return
    first = step(batch)["loss"]  # every other model keeps its item tables sparse
    for _ in range(10):
        last = step(batch)["loss"]
    assert np.isfinite(last) and last < first


def test_dense_adam_is_fused_and_equals_the_foreach_update() -> None:
    """The fused kernel computes Adam's update (with weight decay) as the ``foreach`` one does,
    to float rounding, over a few steps."""
    torch.manual_seed(0)
    a = [torch.randn(50, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    start = [p.detach().clone() for p in a]
    fused = dense_adam(a, lr=1e-2, weight_decay=1e-3)
    assert fused.param_groups[0]["fused"]
    reference = torch.optim.Adam(b, lr=1e-2, weight_decay=1e-3, foreach=True)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for p, q, p0 in zip(a, b, start, strict=True):
        torch.testing.assert_close(p, q)
        assert (p - p0).abs().mean() > 1e-2  # the parameters moved: the update was applied
