"""The chunked per-domain top-k equals a dense masked top-k, whatever the chunk size."""

from __future__ import annotations

import pytest
import torch

from aftrec.models.aft.topk import Exclusions, domain_logsumexp, domain_top_k


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


def case(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, 13, 50, 61, 100])
    table = torch.randn(101, 8, generator=g)
    q = torch.randn(33, 8, generator=g)
    domain = torch.randint(0, 4, (33,), generator=g)
    rows = torch.randint(0, 33, (400,), generator=g)
    items = torch.randint(0, 101, (400,), generator=g)
    return offsets, table, q, domain, rows, items


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_logsumexp_matches_dense_with_gradients(chunk: int) -> None:
    offsets, table, q, domain, rows, items = case(chunk)
    ex = Exclusions.of(rows, items)
    q1, t1 = q.clone().requires_grad_(), table.clone().requires_grad_()
    got = domain_logsumexp(q1, t1, domain, offsets, ex, chunk)
    n = int(offsets[-1])
    ids = torch.arange(n)
    lo, hi = offsets[domain][:, None], offsets[domain + 1][:, None]
    mask = ex.dense(len(q), n) | (ids < lo) | (ids >= hi)
    q2, t2 = q.clone().requires_grad_(), table.clone().requires_grad_()
    want = (q2 @ t2[:n].T).masked_fill(mask, float("-inf")).logsumexp(1)
    torch.testing.assert_close(got, want)
    (got * torch.arange(33.0)).sum().backward()
    (want * torch.arange(33.0)).sum().backward()
    assert q1.grad is not None and q2.grad is not None
    assert t1.grad is not None and t2.grad is not None
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


def test_a_row_with_nothing_allowed_stays_finite() -> None:
    table = torch.randn(4, 3, requires_grad=True)
    ex = Exclusions.of(torch.zeros(4, dtype=torch.long), torch.arange(4))
    out = domain_logsumexp(
        torch.randn(1, 3), table, torch.zeros(1, dtype=torch.long), torch.tensor([0, 4]), ex, 2
    )
    out.sum().backward()
    assert torch.isfinite(out).all() and out.item() < -1e8
    assert table.grad is not None and torch.isfinite(table.grad).all()


def test_gumbel_top_k_draws_from_the_softmax_without_replacement() -> None:
    """Over many draws, the first fake's frequencies are softmax(q . e / tau) over the allowed
    items; the k fakes of a row are distinct, allowed and inside its domain."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, 4, generator=g)
    q = torch.randn(1, 4, generator=g).expand(20_000, 4)
    offsets = torch.tensor([0, 6, 10])
    domain = torch.zeros(20_000, dtype=torch.long)
    ex = Exclusions.of(torch.arange(20_000), torch.full((20_000,), 2))  # item 2 excluded
    torch.manual_seed(1)
    items, scores, allowed = domain_top_k(q, table, domain, offsets, ex, 3, 4, gumbel_tau=0.7)
    assert (allowed == 5).all() and torch.isfinite(scores).all()
    assert ((items >= 0) & (items < 6) & (items != 2)).all()
    assert (items.sort(1).values.diff(dim=1) > 0).all()  # no repeats within a row
    logits = (q[0] @ table[:6].T) / 0.7
    logits[2] = float("-inf")
    want = logits.softmax(0)
    freq = torch.bincount(items[:, 0], minlength=6).double() / 20_000
    torch.testing.assert_close(freq, want.double(), atol=0.015, rtol=0)


@pytest.mark.parametrize("chunk", [3, 64, 10_000])
@pytest.mark.parametrize("tau", [None, 0.5])
def test_dense_exclusion_mask_equals_the_sorted_pairs(chunk: int, tau: float | None) -> None:
    """A batch x catalogue small enough for a dense mask leaves out the same items as the
    sorted pairs: same top-k (ids, scores, Gumbel draws under one seed) and normaliser."""
    g = torch.Generator().manual_seed(chunk)
    offsets = torch.tensor([0, 13, 50, 61, 100])
    table = torch.randn(101, 8, generator=g)
    b = 33
    q = torch.randn(b, 8, generator=g)
    domain = torch.randint(0, 4, (b,), generator=g)
    rows = torch.randint(0, b, (400,), generator=g)
    items = torch.randint(0, 101, (400,), generator=g)
    pairs, mask = Exclusions.of(rows, items), Exclusions.of(rows, items, (b, 101))
    assert pairs.mask is None and mask.mask is not None
    torch.testing.assert_close(mask.dense(b, 100), pairs.dense(b, 100))
    torch.manual_seed(7)
    want = domain_top_k(q, table, domain, offsets, pairs, 5, chunk, tau)
    torch.manual_seed(7)
    got = domain_top_k(q, table, domain, offsets, mask, 5, chunk, tau)
    for w, x in zip(want, got, strict=True):
        torch.testing.assert_close(x, w)
    torch.testing.assert_close(
        domain_logsumexp(q, table, domain, offsets, mask, chunk),
        domain_logsumexp(q, table, domain, offsets, pairs, chunk),
    )
