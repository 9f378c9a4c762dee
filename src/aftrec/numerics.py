"""Subnormal floats, which make a trained model's arithmetic slow, kept out of the way.

A subnormal float (nonzero, below ``torch.finfo(torch.float32).tiny``, 1.2e-38) takes an x86
core's slow path: an operation that reads or writes one costs up to a hundred times a normal
one. Training drives the weights that stop receiving gradient toward zero geometrically
(weight decay, Adam's decaying moments), through the subnormal range, so a run slows down as it
goes. Measured on this project's CPU: an AutoInt tuning trial (weight decay 3.7e-4) fell from
4,846 to 235 examples/s by epoch 18; an SNR trial's ``last.pt`` (5,321 weights and 324,661
Adam moments subnormal) steps in 144 ms as saved and in 35 ms flushed (BENCHMARKS.md,
"Subnormal numbers").

Two remedies, each moving a value by less than 1.2e-38 (float32):

* :func:`subnormals_flushed`: while training, the CPU's flush-to-zero and
  denormals-are-zero modes (:func:`torch.set_flush_denormal`), which read and write any
  subnormal as zero. The mode belongs to a thread (threads started while it is on inherit
  it): it is set around :func:`aftrec.train` and around ``aftrec serve``'s server, and the
  caller's mode is restored after either; a ``--workers`` process sets it for its life;
* :func:`zero_subnormals`: the subnormal entries of a loaded model's weights set to zero, so
  that evaluation, recommendations and an exported bundle compute on normal numbers without
  touching the caller's floating-point mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported where it is used: the command line's parsers import this module


def flushing() -> bool:
    """Whether this thread reads subnormal floats as zero (a probe: torch has no getter)."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    return bool((torch.tensor([tiny / 4], dtype=torch.float32) * 1.0).item() == 0.0)


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[bool]:
    """This thread flushes subnormal floats to zero inside the block and is put back as it
    was after it; yields False where the CPU has no such mode (nothing changes then)."""
    import torch

    before = flushing()
    on = bool(torch.set_flush_denormal(True))
    try:
        yield on
    finally:
        if on and not before:
            torch.set_flush_denormal(False)


def subnormal(t: torch.Tensor) -> torch.Tensor:
    """The bool mask of ``t``'s subnormal entries: nonzero and below ``finfo(t.dtype).tiny``
    in magnitude (all False for a tensor that is not floating point). Read it with the mode
    off: flushed, a subnormal reads as zero."""
    import torch

    if not t.is_floating_point():
        return torch.zeros_like(t, dtype=torch.bool)
    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


def zero_subnormals(module: nn.Module) -> int:
    """Set the subnormal entries of ``module``'s floating-point parameters and buffers to zero,
    in place; returns how many there were."""
    import torch

    n = 0
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            sub = subnormal(t)
            count = int(sub.sum())
            if count:
                t.masked_fill_(sub, 0.0)
                n += count
    return n


__all__ = ["flushing", "subnormal", "subnormals_flushed", "zero_subnormals"]
