import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch.testing import assert_close

from aftrec.evaluation.metrics import auc, ndcg_at_n, recall_at_n


def test_recall_hand_computed() -> None:
    # user 0: 3 test positives, hits at ranks 1 and 4; user 1: 1 positive, hit at rank 2
    hits = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    n_pos = torch.tensor([3, 1])
    assert_close(recall_at_n(hits, n_pos, 1), torch.tensor([1 / 3, 0.0], dtype=torch.float64))
    assert_close(recall_at_n(hits, n_pos, 3), torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    assert_close(recall_at_n(hits, n_pos, 5), torch.tensor([2 / 3, 1.0], dtype=torch.float64))


def test_recall_denominator_is_all_test_positives_not_min_with_n() -> None:
    hits = torch.ones(1, 2, dtype=torch.bool)  # both of the top 2 are hits, 10 positives in all
    assert recall_at_n(hits, torch.tensor([10]), 2).item() == pytest.approx(0.2)


def test_ndcg_hand_computed() -> None:
    hits = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    n_pos = torch.tensor([3, 1])
    dcg0 = 1 / math.log2(2) + 1 / math.log2(5)
    idcg0 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    dcg1, idcg1 = 1 / math.log2(3), 1.0
    got = ndcg_at_n(hits, n_pos, 5)
    assert_close(got, torch.tensor([dcg0 / idcg0, dcg1 / idcg1], dtype=torch.float64))
    # IDCG is capped at N positions: 3 positives, N = 2, hits at 1 and 2 -> NDCG 1
    perfect = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert ndcg_at_n(perfect, torch.tensor([3]), 2).item() == pytest.approx(1.0)


def test_auc_hand_computed_with_ties() -> None:
    pos = torch.tensor([[0.9, 0.5]])
    neg = torch.tensor([[0.1, 0.5, 0.95]])
    mask_p = torch.ones_like(pos, dtype=torch.bool)
    mask_n = torch.ones_like(neg, dtype=torch.bool)
    # 0.9 beats 0.1, 0.5 -> 2; 0.5 beats 0.1, ties 0.5 -> 1.5; total 3.5 / 6
    assert auc(pos, mask_p, neg, mask_n).item() == pytest.approx(3.5 / 6)


def test_auc_empty_sets_give_nan() -> None:
    pos = torch.zeros(1, 2)
    out = auc(pos, torch.zeros(1, 2, dtype=torch.bool), pos, torch.ones(1, 2, dtype=torch.bool))
    assert torch.isnan(out).all()


@settings(max_examples=60, deadline=None)
@given(
    n_pos=st.integers(1, 6),
    n_neg=st.integers(1, 30),
    levels=st.integers(2, 8),  # few distinct values -> many ties
    seed=st.integers(0, 10_000),
)
def test_auc_matches_sklearn(n_pos: int, n_neg: int, levels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n_pos + n_neg).astype(np.float32)
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    want = roc_auc_score(labels, scores)
    # shuffle positives and negatives into one score row with masks, as the evaluator does
    perm = rng.permutation(n_pos + n_neg)
    row = torch.from_numpy(scores[perm])[None]
    is_pos = torch.from_numpy(labels[perm] == 1)[None]
    got = auc(row, is_pos, row, ~is_pos).item()
    assert got == pytest.approx(want, abs=1e-9)


def test_auc_batched_matches_per_user_sklearn() -> None:
    rng = np.random.default_rng(3)
    B, M = 16, 40
    scores = torch.from_numpy(rng.normal(size=(B, M)).astype(np.float32))
    pos = torch.from_numpy(rng.random((B, M)) < 0.15)
    pos[:, 0] = True
    neg = ~pos & torch.from_numpy(rng.random((B, M)) < 0.8)  # some items neither (seen)
    neg[:, 1] = True
    pos[:, 1] = False
    got = auc(scores, pos, scores, neg)
    for b in range(B):
        sel = (pos[b] | neg[b]).numpy()
        want = roc_auc_score(pos[b].numpy()[sel], scores[b].numpy()[sel])
        assert got[b].item() == pytest.approx(want, abs=1e-9)


def test_auc_of_nan_scores_is_nan_never_above_one() -> None:
    # a NaN positive sorted past the masked-out negatives: it counted them and gave 1.25
    nan = float("nan")
    pos = torch.tensor([[nan], [0.5]])
    neg = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, nan, 0.3, 0.9]])
    neg_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = auc(pos, torch.ones(2, 1, dtype=torch.bool), neg, neg_mask)
    assert torch.isnan(out).all()
    # a NaN outside the masks is no score of the user's
    neg_mask[1, 1] = False
    assert auc(pos[1:], torch.ones(1, 1, dtype=torch.bool), neg[1:], neg_mask[1:]).item() == (
        pytest.approx(2 / 3)
    )


def test_auc_with_infinite_scores_matches_sklearn() -> None:
    inf = float("inf")
    pos = torch.tensor([[inf, 0.5, -inf]])
    neg = torch.tensor([[inf, 0.2, -inf, 0.7, 5.0]])
    neg_mask = torch.tensor([[True, True, True, True, False]])  # one masked out
    got = auc(pos, torch.ones(1, 3, dtype=torch.bool), neg, neg_mask).item()
    big = 1e30  # the same order with finite stand-ins for +-inf
    p = [big, 0.5, -big]
    m = [big, 0.2, -big, 0.7]
    assert got == pytest.approx(roc_auc_score([1] * 3 + [0] * 4, p + m))
