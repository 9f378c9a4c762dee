"""Top-k over one domain's items with the user's clicks left out, in bounded memory.

AFT needs, on every training step, G's top-k items of each example's target domain (the fake
clicks, section 3.4) and, for AFT (D+HNM), a band of D's ranking. Over MDR-5B's 1.5M items a
dense ``(B, n_items)`` score matrix and exclusion mask would cost ``B * n_items * 5`` bytes
(1.9 GB for a batch of 256), so neither is ever built: the batch is grouped by target domain
(a loop over the few domains, not over users), each group is scored against its domain in
chunks of at most ``chunk`` items, and a running top-k is merged chunk by chunk. Peak memory
is ``O(B * (chunk + k))`` whatever the catalogue size; when a domain fits in one chunk this is
one matrix product and one ``topk``, as before.

The items to leave out are given as (row, item) pairs (:class:`Exclusions`), which is what a
batch has: its history, its positive and the users' training clicks. When the batch's rows
times the catalogue fit in :data:`DENSE_LIMIT` booleans (16 MiB; ML-1M's 3,231 items at batch
256 take 0.8 MiB), the pairs are scattered once into a dense mask instead of being sorted, and
every chunk reads its slice of it: the same items are left out either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: a dense (rows, items) exclusion mask is used up to this many entries
DENSE_LIMIT = 1 << 24


@dataclass(frozen=True)
class Exclusions:
    """(row in batch, global item id) pairs that may not be returned, sorted by item; or,
    for a small enough batch x catalogue, the same pairs as a dense (rows, items) mask."""

    rows: torch.Tensor  # (E,) long
    items: torch.Tensor  # (E,) long
    mask: torch.Tensor | None = None  # (n_rows, n_items) bool, True = excluded

    @staticmethod
    def of(
        rows: torch.Tensor, items: torch.Tensor, shape: tuple[int, int] | None = None
    ) -> Exclusions:
        """The pairs; with ``shape`` = (rows in the batch, ids up to and including the largest
        one, e.g. the padding id + 1) and ``shape[0] * shape[1] <= DENSE_LIMIT``, as a mask."""
        if shape is not None and shape[0] * shape[1] <= DENSE_LIMIT:
            mask = torch.zeros(shape, dtype=torch.bool, device=items.device)
            mask[rows.long(), items.long()] = True
            return Exclusions(rows, items, mask)
        order = torch.argsort(items, stable=True)
        return Exclusions(rows[order].long(), items[order].long())

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Exclusions:
        none = torch.zeros(0, dtype=torch.long, device=device)
        return Exclusions(none, none)

    def dense(self, n_rows: int, n_items: int) -> torch.Tensor:
        """(n_rows, n_items) bool mask; for tests and small catalogues only."""
        if self.mask is not None:
            return self.mask[:n_rows, :n_items]
        out = torch.zeros(n_rows, n_items + 1, dtype=torch.bool, device=self.items.device)
        out[self.rows, self.items.clamp(max=n_items)] = True
        return out[:, :n_items]

    def in_range(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs whose item lies in ``[lo, hi)`` (two binary searches on the sorted ids)."""
        bounds = torch.tensor([lo, hi], device=self.items.device)
        a, b = torch.searchsorted(self.items, bounds).tolist()
        return self.rows[a:b], self.items[a:b]


def domain_top_k(
    query: torch.Tensor,
    table: torch.Tensor,
    domain: torch.Tensor,
    offsets: torch.Tensor,
    exclude: Exclusions,
    k: int,
    chunk: int,
    gumbel_tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top ``k`` items of its own domain by ``query . table[item]``, excluded pairs
    left out.

    With ``gumbel_tau`` the scores are ``query . table[item] / tau + g``, ``g`` standard Gumbel
    noise from torch's global generator: the top ``k`` are then ``k`` draws *without
    replacement* from ``softmax(query . table / tau)`` over the allowed items (the Gumbel-top-k
    trick, Kool et al., ICML 2019), in the same bounded memory.

    ``query`` (B, dim), ``table`` (n_items, dim) (extra rows past the last domain are never
    read), ``domain`` (B,), ``offsets`` (n_domains + 1,). Returns global item ids (B, k), their
    scores (B, k) in descending order, and the number of items each row could choose from
    (B,): its domain's size minus its distinct excluded items there. Where fewer than ``k``
    items are left the tail has score ``-inf`` (and an arbitrary id).
    """
    b = query.shape[0]
    dev = query.device
    best_s = torch.full((b, k), float("-inf"), dtype=query.dtype, device=dev)
    best_i = torch.zeros(b, k, dtype=torch.long, device=dev)
    allowed = torch.zeros(b, dtype=torch.long, device=dev)
    slot = torch.full((b,), -1, dtype=torch.long, device=dev)  # row -> position in its group
    for d in torch.unique(domain).tolist():
        rows = (domain == d).nonzero().squeeze(1)  # (b_d,)
        slot[rows] = torch.arange(len(rows), device=dev)
        lo, hi = int(offsets[d]), int(offsets[d + 1])
        q = query[rows]  # (b_d, dim)
        top_s, top_i = best_s[rows], best_i[rows]  # (b_d, k)
        n_excluded = torch.zeros(len(rows), dtype=torch.long, device=dev)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            scores = q @ table[c0:c1].T  # (b_d, c)
            if gumbel_tau is not None:
                u = torch.rand_like(scores).clamp_(min=1e-20)
                scores = scores / gumbel_tau - torch.log(-torch.log(u))  # + Gumbel(0, 1)
            hit = _excluded(exclude, slot, rows, c0, c1, scores.shape)
            n_excluded += hit.sum(1)
            scores = scores.masked_fill(hit, float("-inf"))
            merged = torch.cat([top_s, scores], dim=1)  # (b_d, k + c)
            top_s, j = merged.topk(k, dim=1)
            top_i = torch.where(j < k, top_i.gather(1, j.clamp(max=k - 1)), c0 + j - k)
        best_s[rows], best_i[rows] = top_s, top_i
        allowed[rows] = (hi - lo) - n_excluded
        slot[rows] = -1
    return best_i, best_s, allowed


def _excluded(
    exclude: Exclusions,
    slot: torch.Tensor,
    rows: torch.Tensor,
    c0: int,
    c1: int,
    shape: torch.Size,
) -> torch.Tensor:
    """(b_d, c1 - c0) bool: the excluded pairs of the group ``rows`` (whose ``slot >= 0``)."""
    if exclude.mask is not None:
        return exclude.mask[rows, c0:c1]
    ex_rows, ex_items = exclude.in_range(c0, c1)
    mine = slot[ex_rows] >= 0  # pairs of this group's rows
    hit = torch.zeros(shape, dtype=torch.bool, device=slot.device)
    hit[slot[ex_rows[mine]], ex_items[mine] - c0] = True  # duplicates collapse here
    return hit


def domain_logsumexp(
    query: torch.Tensor,
    table: torch.Tensor | nn.Embedding,
    domain: torch.Tensor,
    offsets: torch.Tensor,
    exclude: Exclusions,
    chunk: int,
) -> torch.Tensor:
    """``log sum_e exp(query . table[e])`` over each row's allowed items of its own domain,
    the excluded pairs left out: the normaliser of a softmax policy over the domain, (B,).

    Differentiable in ``query`` and ``table``. Given an ``nn.Embedding``, its rows are looked up
    through the module, so a sparse embedding gets the sparse gradient its optimiser expects
    (``train.sparse_embeddings``). Scored ``chunk`` items at a time and merged with
    ``logaddexp``, so memory is ``O(B x chunk)``. Excluded items are filled with -1e9 rather than
    ``-inf`` so that a row with no allowed item stays finite (about -1e9) and NaN-free in the
    backward pass; such a row has no valid sample to weigh anyway."""
    b, dev = query.shape[0], query.device
    out = query.new_full((b,), float("-inf"))
    slot = torch.full((b,), -1, dtype=torch.long, device=dev)
    for d in torch.unique(domain).tolist():
        rows = (domain == d).nonzero().squeeze(1)  # (b_d,)
        slot[rows] = torch.arange(len(rows), device=dev)
        lo, hi = int(offsets[d]), int(offsets[d + 1])
        lse = query.new_full((len(rows),), float("-inf"))
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            if isinstance(table, nn.Embedding):
                block = table(torch.arange(c0, c1, device=dev))  # (c, dim)
            else:
                block = table[c0:c1]
            scores = query[rows] @ block.T  # (b_d, c)
            hit = _excluded(exclude, slot, rows, c0, c1, scores.shape)
            scores = scores.masked_fill(hit, -1e9)
            lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
        out = out.index_put((rows,), lse)
        slot[rows] = -1
    return out
