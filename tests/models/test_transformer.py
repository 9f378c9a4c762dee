"""The few-token Transformer encoder equals torch's, and its dropout is dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aftrec.models.transformer import TransformerEncoder, dropout


def pair(
    dim: int, heads: int, layers: int, norm_first: bool, activation: str
) -> tuple[nn.TransformerEncoder, TransformerEncoder]:
    torch.manual_seed(3)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, 0.1, activation=activation, batch_first=True,
            norm_first=norm_first,
        ),
        layers,
        enable_nested_tensor=False,
    )  # fmt: skip
    torch.manual_seed(3)
    new = TransformerEncoder(dim, heads, layers, 4 * dim, 0.1, None, norm_first, activation)
    return ref, new


@pytest.mark.parametrize(
    ("heads", "tokens", "norm_first", "activation"),
    [(8, 5, False, "relu"), (16, 5, False, "relu"), (2, 3, True, "gelu"), (4, 40, False, "relu")],
)
def test_forward_and_gradients_equal_torch(
    heads: int, tokens: int, norm_first: bool, activation: str
) -> None:
    """Same parameter names, same initialisation under one seed, and, without dropout, the
    same outputs and gradients (float64) on the broadcast path (few tokens) and the SDPA one."""
    ref, new = pair(64, heads, 2, norm_first, activation)
    want, got = ref.state_dict(), new.state_dict()
    assert list(want) == list(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    ref.double().eval()
    new.double().eval()
    x = torch.randn(7, tokens, 64, dtype=torch.float64, requires_grad=True)
    out_ref, out_new = ref(x), new(x)
    torch.testing.assert_close(out_new, out_ref)
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ref.parameters()])
    g_new = torch.autograd.grad(out_new.square().sum(), [x, *new.parameters()])
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_building_draws_what_torchs_encoder_draws() -> None:
    """Building the encoder takes as many random numbers as ``nn.TransformerEncoder``, so what
    a model builds after it (an embedding table, a ConvE filter) is initialised as before: the
    same seed gives the same model as with torch's encoder (same seed, same run)."""
    pair(64, 8, 4, False, "relu")  # seeds 3, builds torch's, seeds 3, builds this one
    after_new = torch.rand(8)
    torch.manual_seed(3)
    nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 8, 256, 0.1, batch_first=True), 4, enable_nested_tensor=False
    )
    torch.testing.assert_close(after_new, torch.rand(8), rtol=0, atol=0)


def test_a_torch_checkpoint_loads_and_computes_the_same() -> None:
    ref, _ = pair(32, 4, 3, False, "relu")
    new = TransformerEncoder(32, 4, 3, 128, 0.1)
    new.load_state_dict(ref.state_dict())
    ref.eval()
    new.eval()
    x = torch.randn(5, 5, 32)
    torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dropout_keeps_one_minus_p_and_rescales() -> None:
    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    kept = y > 0
    assert abs(kept.double().mean().item() - 0.9) < 0.003  # 4.7 standard errors
    scale = 65536 / (65536 - round(0.1 * 65536))
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert (y[~kept] == 0).all()
    (grad,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(grad, y.detach())  # d y / d x is the scaled mask
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(x, 0.1), y)  # one seed, one mask
    assert not torch.equal(dropout(x, 0.1), y)  # and the next draw is another
    torch.testing.assert_close(dropout(x, 0.1, training=False), x)
    torch.testing.assert_close(dropout(x, 0.0), x)
    assert (dropout(x, 1.0) == 0).all()


def test_dropout_decisions_are_independent_of_position() -> None:
    """Every 16-bit lane of the 64-bit draws drops at the same rate (no lane is biased)."""
    torch.manual_seed(1)
    y = dropout(torch.ones(4 * 100_000), 0.5).view(-1, 4)
    rates = (y == 0).double().mean(0)
    assert ((rates - 0.5).abs() < 0.006).all(), rates


def padded(b: int, s: int) -> torch.Tensor:
    """(B, S) right-aligned valid positions of random lengths (at least 1)."""
    lengths = torch.randint(1, s + 1, (b,))
    return torch.arange(s)[None, :] >= (s - lengths)[:, None]


@pytest.mark.parametrize("causal", [True, False])
def test_masked_attention_equals_torch(causal: bool) -> None:
    """SASRec's and ATRank's blocks: pre-norm, a (B, S, S) mask (True = barred), torch's
    ``mask=`` repeated per head; and the last position computed alone equals the full run's."""
    ref, new = pair(32, 2, 2, True, "relu")
    ref.double().eval()
    new.double().eval()
    valid = padded(6, 30)
    s = valid.shape[1]
    allowed = valid.unsqueeze(1) | torch.eye(s, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    barred = ~allowed  # (B, S, S)
    x = torch.randn(6, s, 32, dtype=torch.float64, requires_grad=True)
    out_ref = ref(x, mask=barred.repeat_interleave(2, dim=0))
    out_new = new(x, barred)
    torch.testing.assert_close(out_new, out_ref)
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ref.parameters()])
    g_new = torch.autograd.grad(out_new.square().sum(), [x, *new.parameters()])
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    if causal:
        torch.testing.assert_close(new(x, barred, last_only=True), out_ref[:, -1:])


def test_key_padding_equals_torch() -> None:
    """BERT4Rec's blocks: GELU, padded keys unread by every query (a (B, 1, S) mask)."""
    ref, new = pair(32, 2, 2, True, "gelu")
    ref.double().eval()
    new.double().eval()
    valid = padded(5, 20)
    x = torch.randn(5, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(new(x, (~valid).unsqueeze(1)), ref(x, src_key_padding_mask=~valid))


def test_attention_dropout_is_dropout_of_the_weights() -> None:
    """Training mode on the masked path: the scale of the kept weights is moved onto the
    product (``(keep * w) @ v / (1 - p)``); forward and gradients are those of
    ``dropout(softmax(q k^T / sqrt(hd))) @ v`` with the same draws."""
    from aftrec.models.transformer import SelfAttention

    torch.manual_seed(0)
    sa = SelfAttention(16, 2, 0.3).double().train()
    nn.init.normal_(sa.in_proj_weight, std=0.3)
    x = torch.randn(3, 12, 16, dtype=torch.float64, requires_grad=True)
    barred = ~torch.ones(12, 12, dtype=torch.bool).tril().expand(3, -1, -1)

    def reference() -> torch.Tensor:
        q, k, v = torch.nn.functional.linear(x, sa.in_proj_weight, sa.in_proj_bias).chunk(3, -1)
        q, k, v = (t.view(3, 12, 2, 8).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        w = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(barred.unsqueeze(1), float("-inf"))
        o = dropout(w.softmax(-1), 0.3) @ v
        return sa.out_proj(o.transpose(1, 2).reshape(3, 12, 16))

    torch.manual_seed(5)
    out = sa(x, barred)
    torch.manual_seed(5)
    ref = reference()
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, sa.eval()(x, barred))  # some weights were dropped
    g = torch.autograd.grad(out.square().sum(), [x, *sa.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *sa.parameters()])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)
