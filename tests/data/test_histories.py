import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftrec.data.dataset import DataInfo, Dataset, Interactions
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import NegativeSampler, TrainLoader


def brute_force(inter: Interactions, user: int, t: float | None, domain: int, length: int):
    """Reference: the user's behaviours in ``domain`` strictly before ``t``, last ``length``."""
    sel = (inter.user == user) & (inter.domain == domain)
    if t is not None:
        sel &= inter.timestamp < t
    ts, items = inter.timestamp[sel], inter.item[sel]
    order = np.lexsort((items, ts))
    return list(items[order][-length:]) if length else []


def unpad(row: np.ndarray, pad: int) -> list[int]:
    return [int(x) for x in row if x != pad]


def test_training_input_sees_only_the_strict_past(tiny: Dataset) -> None:
    info, train = tiny.info, tiny.train
    index = HistoryIndex(train, info)
    L = 6
    h = index.before(train.user.astype(np.int64), train.timestamp, L)
    ts_of = {
        (int(u), int(i)): t
        for u, i, t in zip(train.user, train.item, train.timestamp, strict=False)
    }
    # every behaviour in every example's input happened strictly before the example's target
    for row in range(len(train)):
        u, t = int(train.user[row]), train.timestamp[row]
        for d in range(info.n_domains):
            for item, when in zip(h.items[row, d], h.times[row, d], strict=True):
                if item != info.pad:
                    assert ts_of[(u, int(item))] == when < t
    # and it is exactly the last L such behaviours of each domain (checked on a sample)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(train), 300, replace=False):
        u, t = int(train.user[row]), train.timestamp[row]
        for d in range(info.n_domains):
            want = brute_force(train, u, t, d, L)
            assert unpad(h.items[row, d], info.pad) == want
            assert h.counts[row, d] == len(brute_force(train, u, t, d, 10**9))


def test_target_never_in_its_own_input(tiny: Dataset) -> None:
    loader = TrainLoader(tiny.train, tiny.info, history_len=50, batch_size=128, n_negatives=4)
    for batch in loader.epoch(np.random.default_rng(0)):
        assert batch.pos is not None
        assert not (batch.history == batch.pos[:, None, None]).any()


def test_test_input_is_the_whole_training_history(tiny: Dataset) -> None:
    info = tiny.info
    fit, targets = tiny.fit_and_targets("test")
    assert len(fit) == len(tiny.train) + len(tiny.valid)
    index = HistoryIndex(fit, info)
    users = np.unique(targets.user)
    L = 7
    h = index.before(users, None, L)
    for k, u in enumerate(users[:100]):
        for d in range(info.n_domains):
            assert unpad(h.items[k, d], info.pad) == brute_force(fit, int(u), None, d, L)
    # no test item is ever part of the test input
    test_pairs = set(zip(targets.user.tolist(), targets.item.tolist(), strict=False))
    for k, u in enumerate(users):
        for item in h.items[k].ravel():
            assert (int(u), int(item)) not in test_pairs


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 5)), min_size=1, max_size=40
    ),
    st.integers(1, 4),
)
def test_ties_in_time_are_not_seen(rows: list[tuple[int, int, int]], length: int) -> None:
    """Behaviours at the same timestamp as the target are excluded (strictly before)."""
    users = np.array([r[0] for r in rows], dtype=np.int32)
    domains = np.array([r[1] for r in rows], dtype=np.int16)
    items = np.arange(len(rows), dtype=np.int32) * 3 + domains  # unique, domain = item % 3
    ts = np.array([r[2] for r in rows], dtype=np.int64)
    info = DataInfo(
        4, 3 * len(rows) + 3, ("a", "b", "c"), (0, len(rows), 2 * len(rows), 3 * len(rows))
    )
    inter = Interactions(users, items, domains, ts)
    h = HistoryIndex(inter, info).before(users.astype(np.int64), ts, length)
    for row in range(len(rows)):
        for d in range(3):
            got = unpad(h.items[row, d], info.pad)
            assert got == brute_force(inter, int(users[row]), ts[row], d, length)


def test_negatives_come_from_the_target_domain_and_are_unclicked(tiny: Dataset) -> None:
    info = tiny.info
    sampler = NegativeSampler(tiny.train, info)
    rng = np.random.default_rng(1)
    users = tiny.train.user[:500].astype(np.int64)
    domains = tiny.train.domain[:500].astype(np.int64)
    neg = sampler.sample(users, domains, 20, rng)
    lo = np.asarray(info.offsets)[domains][:, None]
    hi = np.asarray(info.offsets)[domains + 1][:, None]
    assert ((neg >= lo) & (neg < hi)).all()
    assert not sampler.is_known(np.repeat(users[:, None], 20, 1), neg).any()


def test_negatives_are_uniform_over_the_unclicked_items() -> None:
    info = DataInfo(2, 10, ("a", "b"), (0, 6, 10))
    clicked = np.array([0, 2, 3, 7], dtype=np.int32)  # user 0: a{0,2,3}, b{7}
    inter = Interactions(
        np.zeros(4, np.int32), clicked, np.array([0, 0, 0, 1], np.int16), np.arange(4)
    )
    sampler = NegativeSampler(inter, info)
    rng = np.random.default_rng(0)
    draws = sampler.sample(np.zeros(3000, np.int64), np.zeros(3000, np.int64), 4, rng).ravel()
    counts = np.bincount(draws, minlength=10)
    assert set(np.flatnonzero(counts)) == {1, 4, 5}
    assert counts[[1, 4, 5]] / len(draws) == pytest.approx([1 / 3] * 3, abs=0.02)
    in_b = sampler.sample(np.zeros(3000, np.int64), np.ones(3000, np.int64), 1, rng).ravel()
    assert set(np.unique(in_b)) == {6, 8, 9}
    # a user with no clicks draws from the whole domain
    fresh = sampler.sample(np.ones(3000, np.int64), np.ones(3000, np.int64), 1, rng).ravel()
    assert set(np.unique(fresh)) == {6, 7, 8, 9}


def test_rows_in_any_order_give_the_same_index(tiny: Dataset) -> None:
    """Sorted input takes the one-key fast path, shuffled input the lexsort: same index."""
    train = tiny.train
    perm = np.random.default_rng(0).permutation(len(train))
    shuffled = Interactions(
        train.user[perm], train.item[perm], train.domain[perm], train.timestamp[perm]
    )
    a, b = HistoryIndex(train, tiny.info), HistoryIndex(shuffled, tiny.info)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.seg_start, b.seg_start)
    users = np.arange(tiny.info.n_users)
    ha, hb = a.before(users, None, 8), b.before(users, None, 8)
    np.testing.assert_array_equal(ha.items, hb.items)


def test_the_packed_segment_sort_is_the_lexsort() -> None:
    """Rows not in (user, time, item) order (ties drawn at random) are sorted on the three
    keys packed into one, in the order the lexsort gives."""
    from aftrec.data.histories import _segment_order

    rng = np.random.default_rng(1)
    n = 4_000
    seg, rank, item = rng.integers(0, 40, n), rng.integers(0, 15, n), rng.integers(0, 30, n)
    assert np.array_equal(_segment_order(seg, rank, item), np.lexsort((item, rank, seg)))
