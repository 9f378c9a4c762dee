import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from aftrec.data.prepare import prepare
from aftrec.data.schema import RawLog
from aftrec.data.split import TEST, TRAIN, VALID, SplitConfig, assign_parts, chronological_order


@st.composite
def logs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_users = draw(st.integers(1, 8))
    sizes = draw(st.lists(st.integers(1, 25), min_size=n_users, max_size=n_users))
    user = np.repeat(np.arange(n_users), sizes)
    ts = np.array(draw(st.lists(st.integers(0, 20), min_size=len(user), max_size=len(user))))
    item = np.arange(len(user))
    return user, ts, item


@settings(max_examples=100, deadline=None)
@given(
    data=logs(),
    test_ratio=st.floats(0.05, 0.6),
    valid_ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
)
def test_every_positive_in_exactly_one_part_and_parts_are_chronological(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], test_ratio: float, valid_ratio: float
) -> None:
    user, ts, item = data
    order = chronological_order(user, ts, item)
    user, ts = user[order], ts[order]
    cfg = SplitConfig(test_ratio=test_ratio, valid_ratio=valid_ratio, min_positives=1)
    part = assign_parts(user, cfg)
    assert len(part) == len(user)  # one part per positive, by construction of the array
    assert set(np.unique(part)) <= {TRAIN, VALID, TEST}
    for u in np.unique(user):
        p, t = part[user == u], ts[user == u]
        n = len(p)
        n_test = max(1, int(np.floor(test_ratio * n)))
        assert (p == TEST).sum() == n_test  # at least one test positive per user
        # parts are contiguous in time order: train, then valid, then test
        assert np.all(np.diff(p) >= 0)
        if (p == TEST).any() and (p != TEST).any():
            assert t[p != TEST].max() <= t[p == TEST].min()
        if valid_ratio > 0 and n - n_test > 1:
            assert (p == VALID).sum() >= 1
        if valid_ratio == 0:
            assert not (p == VALID).any()


def test_prepare_drops_users_with_few_positives_and_splits_all(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for u, n in enumerate([3, 4, 5, 9, 20]):
        for k in range(n):
            rows.append((f"u{u}", int(rng.integers(0, 30)) + 100 * u, k * 10, float(k % 5 + 1)))
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    inter = inter.drop_duplicates(["user", "item"])
    items = pd.DataFrame({"item": np.arange(600), "domain": ["a", "b"] * 300})
    out = prepare(
        RawLog(inter, items),
        tmp_path / "d",
        SplitConfig(min_positives=3, rating_threshold=1.0),
    )
    meta = pd.read_json(out / "meta.json", typ="series")
    kept = inter.groupby("user").size()
    kept = kept[kept >= 3]
    parts = [pd.read_parquet(out / f"{p}.parquet") for p in ("train", "valid", "test")]
    assert sum(len(p) for p in parts) == kept.sum()
    users = pd.read_parquet(out / "users.parquet")
    assert sorted(users["user"]) == sorted(kept.index)
    assert meta["n_users"] == len(kept)
    # no (user, item) pair in two parts
    pairs = pd.concat(parts)[["user_idx", "item_idx"]]
    assert not pairs.duplicated().any()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-3, 3), st.integers(0, 4)), max_size=60))
def test_packed_sort_equals_lexsort(rows: list[tuple[int, int, int]]) -> None:
    user = np.array([r[0] for r in rows], dtype=np.int32)
    ts = np.array([r[1] for r in rows], dtype=np.float64) * 1e9  # large, negative, repeated
    item = np.array([r[2] for r in rows], dtype=np.int32)
    got = chronological_order(user, ts, item)
    want = np.lexsort((item, ts, user))
    assert np.array_equal(np.c_[user, ts, item][got], np.c_[user, ts, item][want])
