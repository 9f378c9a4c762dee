"""Ranking metrics as pure functions over batches of users.

Every function takes the ranked hit matrix or the raw scores of a batch of users and returns
one value per user; averaging over users (and over domains) is the caller's business.
Notation: for user ``u``, ``T_u`` is the set of held-out positives in the target domain,
``hit_u(r)`` is 1 if the item ranked ``r`` (1-based) is in ``T_u``.
"""

from __future__ import annotations

import torch


def recall_at_n(hits: torch.Tensor, n_pos: torch.Tensor, n: int) -> torch.Tensor:
    """Recall@N = sum_{r=1..N} hit_u(r) / |T_u|.

    The denominator is the number of the user's held-out positives in the domain, not
    min(|T_u|, N): a user with more positives than N cannot reach 1.

    hits: (B, K) bool, K >= N, ranked best first; n_pos: (B,) |T_u| >= 1. Returns (B,) float.
    """
    return hits[:, :n].sum(dim=1).to(torch.float64) / n_pos.to(torch.float64)


def ndcg_at_n(hits: torch.Tensor, n_pos: torch.Tensor, n: int) -> torch.Tensor:
    """NDCG@N = DCG@N / IDCG@N with binary relevance,

    DCG@N = sum_{r=1..N} hit_u(r) / log2(r + 1),
    IDCG@N = sum_{r=1..min(|T_u|, N)} 1 / log2(r + 1).

    hits: (B, K) bool, K >= N, ranked best first; n_pos: (B,) |T_u| >= 1. Returns (B,) float.
    """
    k = min(n, hits.shape[1])
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))  # (k,)
    dcg = (hits[:, :k].to(torch.float64) * discount).sum(dim=1)
    ideal = torch.cumsum(discount, dim=0)  # ideal[j] = IDCG with j + 1 relevant items
    idcg = ideal[(n_pos.clamp(min=1, max=k) - 1).long()]
    return dcg / idcg


def auc(
    pos_scores: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_scores: torch.Tensor,
    neg_mask: torch.Tensor,
) -> torch.Tensor:
    """Exact per-user AUC from ranks, ties counted one half:

    AUC_u = 1 / (|P_u| |N_u|) * sum_{p in P_u} sum_{m in N_u} ([s_p > s_m] + 0.5 [s_p = s_m]),

    with P_u the user's held-out positives and N_u every item of the domain the user never
    clicked (no sampling). Computed by sorting each user's negative scores and counting, for
    each positive, the negatives below it with two searchsorted calls: O((P + M) log M).

    pos_scores: (B, P) float, pos_mask: (B, P) bool; neg_scores: (B, M) float,
    neg_mask: (B, M) bool. Scores may be infinite. Returns (B,) float64, NaN where |P_u| or
    |N_u| is 0 or one of the user's scores is NaN (NaN has no order, so no AUC).
    """
    inf = torch.tensor(float("inf"), dtype=neg_scores.dtype, device=neg_scores.device)
    neg_sorted, _ = torch.sort(torch.where(neg_mask, neg_scores, inf), dim=1)
    pos = pos_scores.contiguous()
    n_m = neg_mask.sum(dim=1, keepdim=True)
    # masked-out negatives sort last as +inf: only a +inf positive reaches them, so cap at |N_u|
    below = torch.searchsorted(neg_sorted, pos, right=False).minimum(n_m)  # s_m < s_p
    below_or_tied = torch.searchsorted(neg_sorted, pos, right=True).minimum(n_m)  # s_m <= s_p
    wins = below.to(torch.float64) + 0.5 * (below_or_tied - below).to(torch.float64)
    wins = torch.where(pos_mask, wins, torch.zeros_like(wins))
    n_p = pos_mask.sum(dim=1).to(torch.float64)
    out = wins.sum(dim=1) / (n_p * n_m.squeeze(1).to(torch.float64))
    nan = (pos_scores.isnan() & pos_mask).any(dim=1) | (neg_scores.isnan() & neg_mask).any(dim=1)
    return out.masked_fill(nan, float("nan"))
