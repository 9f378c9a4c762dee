"""``by_length``: chunks of rows of similar length, each cut to its own longest row, give what
one pass over the whole grid gives, in whichever row layout the caller asks for."""

from __future__ import annotations

import torch

from aftrec.models.sasrec import ROWS_PER_CHUNK, by_length, length_order


def grid(b: int = 2 * ROWS_PER_CHUNK + 7, s: int = 12, d: int = 3) -> tuple[torch.Tensor, ...]:
    """(B, S, d) right-aligned values, zero at padding, and (B, S) valid; rows of every length
    from 0 to S, in no order."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, s + 1, (b,), generator=gen)
    lengths[:2] = torch.tensor([0, s])
    valid = torch.arange(s)[None, :] >= (s - lengths)[:, None]
    x = torch.randn(b, s, d, generator=gen, dtype=torch.float64) * valid.unsqueeze(-1)
    return x, valid


def suffix_sums(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A function of right-aligned rows that padding does not enter: at each behaviour, the sum
    of it and the behaviours after it; zero at padding."""
    v = valid.unsqueeze(-1).to(x.dtype)
    return (x * v).flip(1).cumsum(1).flip(1) * v


def test_chunks_give_the_whole_grid() -> None:
    x, valid = grid()
    torch.testing.assert_close(by_length(suffix_sums, x, valid), suffix_sums(x, valid))


def test_a_grid_laid_out_in_length_order() -> None:
    """``order``: x's rows are already in :func:`length_order`; the output comes back in the
    batch's order, or in ``order`` with ``reorder=False``."""
    x, valid = grid()
    want = suffix_sums(x, valid)
    order = length_order(valid)
    torch.testing.assert_close(by_length(suffix_sums, x[order], valid, order=order), want)
    got = by_length(suffix_sums, x[order], valid, order=order, reorder=False)
    torch.testing.assert_close(got, want[order])


def test_extra_rows_travel_with_their_chunk() -> None:
    """``extra`` per-row tensors reach ``fn`` with the chunk's own rows, and a last-position
    ``fn`` with ``width=1`` gives (B, 1, d)."""
    x, valid = grid()
    tag = torch.arange(len(x), dtype=x.dtype).unsqueeze(-1).expand(-1, x.shape[-1])  # (B, d)

    def last_plus(xc: torch.Tensor, vc: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return (suffix_sums(xc, vc)[:, -1] + row).unsqueeze(1)  # (n, 1, d)

    want = (suffix_sums(x, valid)[:, -1] + tag).unsqueeze(1)
    torch.testing.assert_close(by_length(last_plus, x, valid, width=1, extra=[tag]), want)
    order = length_order(valid)
    got = by_length(last_plus, x[order], valid, width=1, order=order, extra=[tag[order]])
    torch.testing.assert_close(got, want)


def test_gradients_reach_every_row_once() -> None:
    x, valid = grid()
    x.requires_grad_(True)
    weights = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    (g_chunks,) = torch.autograd.grad((by_length(suffix_sums, x, valid) * weights).sum(), [x])
    (g_whole,) = torch.autograd.grad((suffix_sums(x, valid) * weights).sum(), [x])
    torch.testing.assert_close(g_chunks, g_whole)
