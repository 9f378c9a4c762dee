"""The chunked per-domain top-k equals a dense masked top-k, whatever the chunk size."""

from __future__ import annotations

import pytest
import torch

from aftrec.models.aft.topk import Exclusions, domain_top_k


def dense_oracle(
    q: torch.Tensor, table: torch.Tensor, domain: torch.Tensor, offsets: torch.Tensor,
    ex: Exclusions, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n = int(offsets[-1])
    ids = torch.arange(n)
    lo, hi = offsets[domain][:, None], offsets[domain + 1][:, None]
    mask = ex.dense(len(q), n) | (ids < lo) | (ids >= hi)
    scores = (q @ table[:n].T).masked_fill(mask, float("-inf"))
    top = scores.topk(k, dim=1).values
    return top, (~mask).sum(1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_chunked_top_k_matches_dense(chunk: int, k: int) -> None:
    g = torch.Generator().manual_seed(chunk * 100 + k)
    offsets = torch.tensor([0, 13, 50, 61, 100])
    table = torch.randn(101, 8, generator=g)  # one extra (padding) row, never read
    b = 33
    q = torch.randn(b, 8, generator=g)
    domain = torch.randint(0, 4, (b,), generator=g)
    rows = torch.randint(0, b, (400,), generator=g)
    items = torch.randint(0, 101, (400,), generator=g)  # duplicates and padding ids included
    ex = Exclusions.of(rows, items)
    got_i, got_s, allowed = domain_top_k(q, table, domain, offsets, ex, k, chunk)
    want_s, want_allowed = dense_oracle(q, table, domain, offsets, ex, k)
    torch.testing.assert_close(got_s, want_s)
    torch.testing.assert_close(allowed, want_allowed)
    finite = torch.isfinite(got_s)
    # the ids are the items those scores belong to, inside the row's domain, not excluded
    rescored = (q[:, None, :] * table[got_i]).sum(-1)
    torch.testing.assert_close(rescored[finite], got_s[finite])
    lo, hi = offsets[domain][:, None], offsets[domain + 1][:, None]
    assert ((got_i >= lo) & (got_i < hi))[finite].all()
    assert not ex.dense(b, 100).gather(1, got_i.clamp(max=99))[finite].any()
    assert (finite.sum(1) == torch.minimum(allowed, torch.tensor(k))).all()


def test_empty_exclusions_give_the_plain_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 4, generator=g)
    q = torch.randn(5, 4, generator=g)
    offsets = torch.tensor([0, 20])
    items, scores, allowed = domain_top_k(
        q, table, torch.zeros(5, dtype=torch.long), offsets, Exclusions.empty(), 4, 6
    )
    want_s, want_i = (q @ table.T).topk(4, dim=1)
    torch.testing.assert_close(scores, want_s)
    torch.testing.assert_close(items, want_i)
    assert (allowed == 20).all()
