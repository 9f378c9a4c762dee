"""The arithmetic of a training step's forward pass (``train.precision``).

``fp32`` runs the loss as written. ``bf16`` runs it under torch's bfloat16 autocast, the mixed
precision torch offers on CPUs and GPUs: the model keeps float32 weights and the optimiser
float32 state, and only the forward pass's products compute in bfloat16. BENCHMARKS.md
("bfloat16 autocast") has what it gains per model on this project's CPU and what it does to a
converged run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from aftrec.config import Precision


def precision_context(
    precision: Precision, module: torch.nn.Module
) -> contextlib.AbstractContextManager[Any]:
    """Where a step's forward pass runs: as written (``fp32``), or under torch's bfloat16
    autocast on the device of ``module``'s parameters (``bf16``). Under autocast, matrix
    products, convolutions and attention take bfloat16 copies of their float32 operands and
    return bfloat16 (8-bit mantissa, relative rounding 2^-8); the ops that follow compute in
    their inputs' type, except those on torch's float32 list for the device (on CPU, the
    losses: cross-entropy, binary cross-entropy, NLL). The weights, their gradients and Adam's
    state stay float32, as does evaluation, so a bf16 run is ranked at full precision. It pays on
    CPUs with bfloat16 instructions (AVX512-BF16, AMX) and on GPUs; elsewhere torch emulates
    them and a step gets slower."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device = next(module.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
