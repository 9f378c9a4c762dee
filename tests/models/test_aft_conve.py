"""ConvE computed channel-major (batch norm folded into the filter) equals the
module-by-module ConvE: Conv2d, BatchNorm2d, ReLU, Dropout2d, Flatten, Linear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from aftrec.models.aft.conve import ConvE, interleave_rows


def reference(c: ConvE, head: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Eq. 9 as the modules compute it one after the other."""
    x = c.conv(c.bn_in(interleave_rows(head, rel, c.rows)))
    x = c.feature_drop(F.relu(c.bn_conv(x)))
    return c.proj(x.flatten(1))


@pytest.mark.parametrize(("rows", "cols"), [(5, 64), (8, 8), (3, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_forward_gradients_and_statistics_equal_the_modules(
    rows: int, cols: int, training: bool
) -> None:
    torch.manual_seed(0)
    new = ConvE(rows, cols, 16, channels=6, kernel=3, dropout=0.3).double()
    ref = copy.deepcopy(new)
    for _ in range(2):  # a second step sees the running statistics the first one left
        new.train(training)
        ref.train(training)
        head = torch.randn(9, rows * cols, dtype=torch.float64, requires_grad=True)
        rel = torch.randn(9, rows * cols, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        out_new = new(head, rel)
        torch.manual_seed(1)  # the same Dropout2d draw
        out_ref = reference(ref, head, rel)
        torch.testing.assert_close(out_new, out_ref)
        g_new = torch.autograd.grad(out_new.square().sum(), [head, rel, *new.parameters()])
        g_ref = torch.autograd.grad(out_ref.square().sum(), [head, rel, *ref.parameters()])
        for a, b in zip(g_new, g_ref, strict=True):
            torch.testing.assert_close(a, b)
        for key, value in ref.state_dict().items():  # running mean, var, batches tracked
            torch.testing.assert_close(new.state_dict()[key], value)


def test_float32_agrees_within_rounding() -> None:
    torch.manual_seed(0)
    new = ConvE(5, 64, 64)
    ref = copy.deepcopy(new)
    head, rel = torch.randn(64, 320), torch.randn(64, 320)
    torch.manual_seed(1)
    out_new = new(head, rel)
    torch.manual_seed(1)
    torch.testing.assert_close(out_new, reference(ref, head, rel), rtol=1e-4, atol=1e-4)
