"""A Transformer encoder for short token sets, and dropout with cheap random numbers.

"Attention Is All You Need" (Vaswani et al., NeurIPS 2017), the encoder block: multi-head
self-attention and a point-wise feed-forward network, each with dropout, a residual and layer
norm (post-norm as in the paper, or pre-norm). AFT runs such blocks over the *n domain tokens*
of a user (Eqs. 3 and 7 of Hao et al., KDD 2021): sequences of 5 tokens, 8 or 16 heads of
4-8 dimensions. :class:`torch.nn.TransformerEncoderLayer` computes the same function, but on
such shapes its time goes to overheads, not arithmetic (``benchmarks/profile_train.py``,
BENCHMARKS.md, "Training speed"):

* the attention products are ``B * heads`` tiny matrix products (5 x 8 by 8 x 5), one
  BLAS call each. Here the tokens are laid out as ``(S, S, head_dim, B * heads)``, so the
  products are a few broadcast multiplies and sums that run vectorised along ``B * heads``,
  and the softmax runs over a non-innermost dimension of size S, which is vectorised too;
* dropout draws one 32-bit random float per element through ``bernoulli_`` (about 18 ns per
  element on this project's CPU). :func:`dropout` draws 16 random bits per element from one
  64-bit draw per four elements (about 3 ns).

The parameters carry the names of :class:`torch.nn.TransformerEncoder`'s
(``layers.0.self_attn.in_proj_weight``, ``layers.0.linear1.weight``, ...) and are initialised
by building one :class:`torch.nn.TransformerEncoderLayer` and cloning it per layer, as
``nn.TransformerEncoder`` does: checkpoints load both ways, the random draws of the
initialisation are the same, and ``tests/models/test_transformer.py`` checks forward and
gradients against torch's implementation on the same weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

#: unmasked sequences up to this length take the broadcast attention; others batched products
SHORT = 16
_BITS = 16  # random bits per dropout decision


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: each element is kept with probability ``1 - p'`` and scaled by
    ``1 / (1 - p')``, zeroed otherwise, where ``p' = round(p * 2^16) / 2^16`` is ``p`` rounded
    to 16 bits (0.1 -> 0.100006). The decisions are 16-bit integers cut from 64-bit draws of
    torch's generator for ``x``'s device, so a seeded run is reproducible. Identity when not
    ``training`` or ``p == 0``."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """:func:`dropout`'s decisions for a tensor of ``shape``, ``0 < p < 1``: a bool mask
    (True = kept) and the scale ``1 / (1 - p')`` of the kept elements."""
    levels = 1 << _BITS
    drop = round(p * levels)  # decisions below this are dropped
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    bits = draws.view(torch.int16)[:n].view(shape)  # uniform over [-2^15, 2^15)
    return bits >= drop - levels // 2, levels / (levels - drop)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s draws (no parameters: state dicts unchanged)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (packed
    ``in_proj_weight`` (3 dim, dim), ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, barred: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """(B, S, dim) -> (B, S, dim): softmax(q k^T / sqrt(head_dim)) v per head, dropout on
        the weights. ``barred`` (B, S, S) or (B, 1, S) bool: True where query i may not read
        key j (``nn.MultiheadAttention``'s boolean ``attn_mask``; every query must be allowed
        some key). ``last_only``: the last query only, (B, 1, dim)."""
        b, s, dim = x.shape
        h = self.heads
        hd = dim // h
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3 dim)
        if s > SHORT or barred is not None or last_only:
            q, k, v = qkv.view(b, s, 3, h, hd).permute(2, 0, 3, 1, 4)  # (B, H, S, hd) each
            if last_only:
                q = q[:, :, -1:]
                barred = None if barred is None else barred[:, -1:]
            if not (self.training and self.dropout > 0.0):
                # no dropout on the weights: torch's fused kernel, no (S_q, S) weights kept
                allowed = None if barred is None else ~barred.unsqueeze(1)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, S_q, hd)
            else:
                w = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-1, -2)  # (B, H, S_q, S)
                if barred is not None:
                    # in place, outside autograd: the product's backward does not read w, and
                    # softmax's gradient is already 0 where its output is (the barred keys)
                    with torch.no_grad():
                        w.masked_fill_(barred.unsqueeze(1), float("-inf"))
                w = w.softmax(dim=-1)
                if self.dropout < 1.0:
                    # dropout(w) @ v with dropout's draws, the scale moved onto the (smaller)
                    # product: one pass over the S_q x S weights for the mask instead of three
                    keep, scale = keep_mask(w.shape, self.dropout, w.device)
                    o = (torch.where(keep, w, 0.0) @ v) * scale  # (B, H, S_q, hd)
                else:
                    o = dropout(w, self.dropout) @ v
            return self.out_proj(o.transpose(1, 2).reshape(b, q.shape[2], dim))
        n = b * h
        t = qkv.view(b, s, 3, h, hd).permute(2, 1, 4, 0, 3).reshape(3, s, hd, n)
        q, k, v = t.unbind(0)  # (S, hd, N) each, N = B * H; one stack in the backward
        q = q * (1.0 / math.sqrt(hd))
        w = (q.unsqueeze(1) * k.unsqueeze(0)).sum(2)  # (S_q, S_k, N): q_i . k_j
        w = dropout(w.softmax(dim=1), self.dropout, self.training)
        o = (w.unsqueeze(2) * v.unsqueeze(0)).sum(1)  # (S_q, hd, N): sum_j w_ij v_j
        o = o.view(s, hd, b, h).permute(2, 0, 3, 1).reshape(b, s, dim)  # heads concatenated
        return self.out_proj(o)


class EncoderLayer(nn.Module):
    """One encoder block, ``nn.TransformerEncoderLayer``'s function and parameter names:
    ``x + Dropout(SA(x))`` then ``+ Dropout(W2 Dropout(act(W1 .)))``, layer norm after each
    (post-norm) or before each sub-block (``norm_first``)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ff_dim: int,
        dropout: float,
        attn_dropout: float | None = None,
        norm_first: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.p, self.norm_first = dropout, norm_first
        self.act = F.relu if activation == "relu" else F.gelu
        self.self_attn = SelfAttention(
            dim, heads, dropout if attn_dropout is None else attn_dropout
        )
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        hidden = dropout(self.act(self.linear1(x)), self.p, self.training)
        return dropout(self.linear2(hidden), self.p, self.training)

    def forward(
        self, x: torch.Tensor, barred: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """(B, S, dim) -> (B, S, dim), or (B, 1, dim) for the last position alone with
        ``last_only`` (what the full block gives there when the last query is all that is
        needed); ``barred`` as in :meth:`SelfAttention.forward`."""
        keep = x[:, -1:] if last_only else x

        def sa(y: torch.Tensor) -> torch.Tensor:
            return dropout(self.self_attn(y, barred, last_only), self.p, self.training)

        if self.norm_first:
            keep = keep + sa(self.norm1(x))
            return keep + self._ff(self.norm2(keep))
        keep = self.norm1(keep + sa(x))
        return self.norm2(keep + self._ff(keep))


class TransformerEncoder(nn.Module):
    """``layers`` encoder blocks; the same function, parameter names and initialisation as
    ``nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout,
    batch_first=True, ...), layers)`` (no final norm)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        layers: int,
        ff_dim: int,
        dropout: float,
        attn_dropout: float | None = None,
        norm_first: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        reference = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=ff_dim, dropout=dropout,
            activation=activation, batch_first=True, norm_first=norm_first,
        )  # fmt: skip
        # the block's own initialisation is overwritten by the reference's: drawn on a fork of
        # the generator, so that it does not shift the draws of whatever the model builds next
        with torch.random.fork_rng(devices=[]):
            layer = EncoderLayer(dim, heads, ff_dim, dropout, attn_dropout, norm_first, activation)
        layer.load_state_dict(reference.state_dict())  # torch's initialisation, same draws
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(layers)])

    def forward(
        self, x: torch.Tensor, barred: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """(B, S, dim) -> (B, S, dim); with ``last_only`` the last block computes the last
        position alone, (B, 1, dim) (for causal attention, where no other position needs
        it); ``barred`` as in :meth:`SelfAttention.forward`."""
        *first, last = self.layers
        for layer in first:
            x = layer(x, barred)
        out: torch.Tensor = last(x, barred, last_only)
        return out
