"""``train.precision``: the bf16 step runs its products in bfloat16 and still trains; fp32 runs
none in bfloat16; weights, gradients and the optimiser stay float32 either way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import TrainLoader
from aftrec.registry import available_models, create_model, model_class
from aftrec.training.steps import make_step

TRAINABLE = [m for m in available_models() if model_class(m).trainable]
#: forward passes of sums and elementwise products only: autocast has nothing to round
NO_PRODUCTS = {"fm-single", "fm-multi"}


class FloatOutputs(TorchFunctionMode):
    """The dtypes of every floating-point tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


def _step(name: str, tiny: Dataset, precision: str) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    cfg = resolve(name, overrides=["data.history_len=6", f"train.precision={precision}"])
    model = create_model(name, cfg.model, tiny.info, cfg.data.history_len)
    model.prepare_training(tiny.train)
    loader = TrainLoader(tiny.train, tiny.info, 6, batch_size=64, n_negatives=4)
    batch = next(loader.epoch(np.random.default_rng(0)))
    return model, make_step(model, cfg.train), batch


@pytest.mark.parametrize("name", TRAINABLE)
def test_bf16_computes_in_bfloat16_and_trains(name: str, tiny: Dataset) -> None:
    model, step, batch = _step(name, tiny, "fp32")
    with FloatOutputs() as fp32:
        reference = step(batch)["loss"]
    assert torch.bfloat16 not in fp32.dtypes

    model, step, batch = _step(name, tiny, "bf16")
    with FloatOutputs() as bf16:
        first = step(batch)["loss"]
    if name in NO_PRODUCTS:
        assert torch.bfloat16 not in bf16.dtypes and first == reference
    else:
        assert torch.bfloat16 in bf16.dtypes
        assert first == pytest.approx(reference, rel=0.05, abs=0.01)
        assert first != reference  # the products really were rounded
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert p.grad is None or p.grad.dtype == torch.float32
    for _ in range(10):
        last = step(batch)["loss"]
    assert np.isfinite(last) and last < first
