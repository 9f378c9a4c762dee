"""Nearest-neighbour indexes: exact search is the oracle, FAISS flat equals it, and the
approximate indexes are measured against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from aftrec.errors import ConfigError
from aftrec.serving.index import (
    ExactIndex,
    IndexSpec,
    build_index,
    default_nlist,
    exact_top_k,
    recall_at_k,
)


def clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors around topic centres with varying norms (the shape trained embeddings
    have) and user queries mixing a few topics."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim))
    items = centres[rng.integers(0, 64, n)] + 0.7 * rng.normal(size=(n, dim))
    items *= rng.lognormal(0.0, 0.2, (n, 1))
    queries = centres[rng.integers(0, 64, (100, 3))].mean(1) + 0.5 * rng.normal(size=(100, dim))
    return items.astype(np.float32), queries.astype(np.float32)


def test_exact_index_is_brute_force_top_k() -> None:
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(500, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
    scores, pos = ExactIndex(x).search(q, 50)
    want_scores, want_pos = torch.topk(torch.from_numpy(q @ x.T), 50, dim=1)
    np.testing.assert_array_equal(pos, want_pos.numpy())
    torch.testing.assert_close(torch.from_numpy(scores), want_scores)


def test_short_results_are_padded() -> None:
    x = np.eye(3, dtype=np.float32)
    for index in (ExactIndex(x), build_index(x, IndexSpec(kind="flat")).index):
        scores, pos = index.search(x[:1], 5)
        assert pos.shape == (1, 5) and pos[0, 0] == 0
        assert list(pos[0, 3:]) == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_faiss_flat_equals_exact() -> None:
    x, q = clustered(3000, 16, seed=1)
    built = build_index(x, IndexSpec())  # 3,000 <= exact_max: flat
    assert built.index.kind == "flat" and built.params["recall"] == 1.0
    scores, pos = built.index.search(q, 200)
    want_scores, want_pos = ExactIndex(x).search(q, 200)
    assert recall_at_k(pos, want_pos) == 1.0
    torch.testing.assert_close(torch.from_numpy(scores), torch.from_numpy(want_scores))


def test_ties_are_settled_by_position_as_in_the_evaluator() -> None:
    """Tied scores (popularity, EASE's never-clicked items, equal vectors) are ordered by
    position, at the cut too, by the exact and the flat index alike: FAISS's heap left them
    in another order, so a bundle's top n differed from `aftrec recommend`'s as a set."""
    rng = np.random.default_rng(4)
    levels = rng.integers(0, 6, 400).astype(np.float32)  # 6 distinct scores over 400 items
    x = np.stack([levels, np.zeros_like(levels)], axis=1)
    q = np.array([[1.0, 0.0], [2.0, 5.0]], np.float32)
    want = torch.topk(torch.from_numpy(q @ x.T), 400, dim=1, sorted=True)
    # the order torch.topk gives, made explicit: by score, then by position
    order = np.lexsort((np.arange(400)[None].repeat(2, 0), -(q @ x.T)), axis=1)
    np.testing.assert_array_equal(np.sort(want.values.numpy(), 1)[:, ::-1], (q @ x.T)[
        np.arange(2)[:, None], order])  # fmt: skip
    flat = build_index(x, IndexSpec(kind="flat")).index
    for k in (1, 10, 67, 200, 399, 400):
        for index in (ExactIndex(x), flat):
            scores, pos = index.search(q, k)
            np.testing.assert_array_equal(pos, order[:, :k], err_msg=f"{index.kind} k={k}")
            np.testing.assert_array_equal(scores, (q @ x.T)[np.arange(2)[:, None], order[:, :k]])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_index_never_returns_a_short_list(kind: str) -> None:
    """IVF cells (or an HNSW walk) holding fewer than k items left the list short, though
    the domain had k items: those rows are answered exactly."""
    x, q = clustered(2000, 16, seed=5)
    built = build_index(x, IndexSpec(kind=kind, search_param=1, nlist=64))
    for k in (500, 1999, 2000):
        scores, pos = built.index.search(q[:20], k)
        assert (pos >= 0).all() and np.isfinite(scores).all(), k
        assert all(len(set(row)) == k for row in pos.tolist())


def test_the_search_knob_is_tuned_on_the_index_s_own_answers() -> None:
    """The exact answer for short rows must not count as the index's: tuned through it, IVF
    chose nprobe 1 at a measured recall of 1.0 (0.13 on its own answers) and served 0.66."""
    x, q = clustered(20_000, 32, seed=2)
    built = build_index(x, IndexSpec(kind="ivf", target_recall=0.97), q[:50])
    index = built.index
    _, truth = ExactIndex(x).search(q[50:], 200)
    own = recall_at_k(index.search(q[50:], 200, exact_fallback=False)[1], truth)
    assert built.params["search_param"] > 1 and own >= 0.95, (built.params, own)


def test_ties_and_nan_in_approximate_and_exact_search() -> None:
    """Tied scores come back by position from an approximate index too (which of them it
    finds is its own business); a NaN score ranks last instead of failing the exact search."""
    x = np.ones((50, 4), np.float32)
    for spec in (IndexSpec(kind="ivf", nlist=2, search_param=1), IndexSpec(kind="hnsw")):
        scores, pos = build_index(x, spec).index.search(x[:1], 5)
        assert (np.diff(pos[0]) > 0).all(), (spec.kind, pos)
    scores = np.array([[1.0, np.nan, 0.5, 0.2]], np.float32)
    top, pos = exact_top_k(scores, 4)
    assert pos.tolist() == [[0, 2, 3, 1]] and np.isneginf(top[0, 3])


def test_ivf_recall_against_exact_reaches_the_target() -> None:
    x, q = clustered(20_000, 32, seed=2)
    tune, held_out = q[:50], q[50:]
    built = build_index(x, IndexSpec(exact_max=1000, target_recall=0.97), tune)
    assert built.index.kind == "ivf"
    assert built.params["nlist"] == default_nlist(20_000)
    assert built.params["recall"] >= 0.97 and built.params["recall_queries"] == 50
    _, truth = ExactIndex(x).search(held_out, 200)
    recall = recall_at_k(built.index.search(held_out, 200)[1], truth)
    print(f"IVF nprobe={built.params['search_param']}: held-out recall@200 {recall:.3f}")
    assert recall >= 0.95
    assert built.params["search_param"] < built.params["nlist"]  # not an exhaustive scan


def test_hnsw_is_available_and_measured() -> None:
    x, q = clustered(4000, 16, seed=3)
    built = build_index(x, IndexSpec(kind="hnsw", hnsw_m=16, target_recall=0.9), q)
    assert built.index.kind == "hnsw" and built.params["search_param"] >= 200
    _, truth = ExactIndex(x).search(q, 200)
    recall = recall_at_k(built.index.search(q, 200)[1], truth)
    print(f"HNSW efSearch={built.params['search_param']}: recall@200 {recall:.3f}")
    assert recall == pytest.approx(built.params["recall"])


def test_fixed_search_param_is_kept() -> None:
    x, q = clustered(5000, 16, seed=4)
    built = build_index(x, IndexSpec(kind="ivf", nlist=64, search_param=3), q)
    assert built.params["search_param"] == 3 and built.index.index.nprobe == 3


def test_a_fixed_search_param_above_what_the_index_can_use_is_lowered_to_it() -> None:
    x, q = clustered(600, 16, seed=4)
    ivf = build_index(x, IndexSpec(kind="ivf", nlist=16, search_param=10**8), q)
    assert ivf.params["search_param"] == 16 and ivf.index.index.nprobe == 16  # every cell
    hnsw = build_index(x, IndexSpec(kind="hnsw", search_param=10**8), q)
    assert hnsw.params["search_param"] == 600 and hnsw.params["recall"] == 1.0


def test_kind_chosen_by_size_and_overridable() -> None:
    spec = IndexSpec(exact_max=100)
    assert spec.kind_for(100) == "flat" and spec.kind_for(101) == "ivf"
    assert IndexSpec(kind="hnsw").kind_for(10) == "hnsw"
    assert IndexSpec(kind="flat").kind_for(10**7) == "flat"


@pytest.mark.parametrize(
    "bad",
    [{"kind": "annoy"}, {"exact_max": -1}, {"target_recall": 1.5}, {"nlist": 0}, {"hnsw_m": 1}],
)
def test_bad_index_spec_is_refused(bad: dict[str, object]) -> None:
    (field,) = bad
    with pytest.raises(ConfigError, match=field):
        IndexSpec(**bad)  # type: ignore[arg-type]


def test_default_nlist() -> None:
    assert default_nlist(300_000) == 2048
    assert default_nlist(100) == 2  # at least 39 training points per cell
    assert default_nlist(10) == 1
