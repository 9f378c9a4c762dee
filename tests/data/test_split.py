import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftrec.data.prepare import prepare
from aftrec.data.prepared import describe
from aftrec.data.schema import RawLog
from aftrec.data.split import (
    TEST,
    TRAIN,
    VALID,
    SplitConfig,
    assign_parts,
    chronological_order,
    id_hashes,
    tie_keys,
    with_ties,
)


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


def _tied_log(domains: tuple[str, str], n_users: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every user clicks three items of one domain and two of another, all at one timestamp:
    each user's split (one test positive of five) falls inside the tie."""
    rng = np.random.default_rng(7)
    items = pd.DataFrame({"item": [f"i{k}" for k in range(40)],
                          "domain": [domains[0]] * 20 + [domains[1]] * 20})  # fmt: skip
    rows = []
    for u in range(n_users):
        picks = np.r_[rng.choice(20, 3, replace=False), 20 + rng.choice(20, 2, replace=False)]
        rows += [(f"u{u}", f"i{k}", 1_000 + u) for k in picks]
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]), items


def _test_share(out: Path, domain: str) -> float:
    meta = json.loads((out / "meta.json").read_text())
    test = meta["counts"]["test"]
    return test[domain] / sum(test.values())


@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")])
def test_ties_at_the_split_go_to_test_by_chance_not_by_domain_name(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    """Three clicks in one domain and two in the other, all at one timestamp: by default the
    test click is drawn, so the first domain holds about 3/5 of the test part, whichever name
    sorts first; ordered by item, every test click was the later-named domain's."""
    inter, items = _tied_log(names)
    out = prepare(RawLog(inter, items), tmp_path / "d", SplitConfig(valid_ratio=0.0))
    share = _test_share(out, names[0])
    # 400 users: the share's standard deviation is sqrt(0.24 / 400) = 0.024
    assert 0.6 - 0.1 < share < 0.6 + 0.1
    by_item = prepare(RawLog(inter, items), tmp_path / "i", SplitConfig(valid_ratio=0, ties="item"))
    assert _test_share(by_item, "b") == 1.0  # the rule kept for the MovieLens presets


def test_the_random_rule_depends_on_ids_not_on_file_order_or_seedless(tmp_path: Path) -> None:
    """The same log in another row order and another catalogue order splits the same; another
    --tie-seed draws another split of the same tie."""
    inter, items = _tied_log(("a", "b"), n_users=60)
    cfg = SplitConfig(valid_ratio=0.0)
    a = prepare(RawLog(inter, items), tmp_path / "a", cfg)
    shuffled = inter.sample(frac=1.0, random_state=3), items.sample(frac=1.0, random_state=4)
    b = prepare(RawLog(*shuffled), tmp_path / "b", cfg)
    c = prepare(RawLog(inter, items), tmp_path / "c", SplitConfig(valid_ratio=0.0, tie_seed=1))

    def test_pairs(out: Path) -> set[tuple[str, str]]:
        test = pd.read_parquet(out / "test.parquet")
        users = pd.read_parquet(out / "users.parquet").set_index("user_idx")["user"]
        names = pd.read_parquet(out / "items.parquet").set_index("item_idx")["item"]
        return set(zip(users[test["user_idx"]], names[test["item_idx"]], strict=True))

    assert test_pairs(a) == test_pairs(b)
    assert test_pairs(a) != test_pairs(c)
    meta = json.loads((a / "meta.json").read_text())["split"]
    assert (meta["ties"], meta["tie_seed"]) == ("random", 0)


def test_tie_keys_order_each_users_items_totally() -> None:
    """For every user, distinct items get distinct keys in [0, p): a total order, packed as
    the item index was."""
    n_items = 1_000
    users = id_hashes(np.array([f"u{k}" for k in range(50)]))
    item = np.tile(np.arange(n_items), 50)
    keys = tie_keys(np.repeat(users, n_items), item, n_items).reshape(50, n_items)
    assert all(len(np.unique(row)) == n_items for row in keys)
    assert keys.min() >= 0 and keys.max() < 1_009  # 1,009: the first prime >= 1,000


def test_id_hashes_are_pinned() -> None:
    """The draws of every prepared dataset with --ties random hang on these values: a pandas
    whose hash of text changed would split the same log otherwise."""
    got = id_hashes(np.array(["u1", "7", 7], dtype=object))
    assert got[1] == got[2]  # the integer 7 and the text "7": one id
    assert got.tolist()[:2] == [10883949598687333822, 5601596950964403433]


def test_presets_keep_the_item_rule_and_their_meta() -> None:
    """ml-100k and ml-1m keep the rule their committed results were split with, and a dataset
    split so records no tie keys: its meta.json, and fingerprint, are what they were."""
    assert with_ties(SplitConfig(), "ml-1m").ties == "item"
    assert with_ties(SplitConfig(), "ml-100k").ties == "item"
    assert with_ties(SplitConfig(), "netflix").ties == "random"
    assert with_ties(SplitConfig(), None).ties == "random"
    assert with_ties(SplitConfig(ties="random"), "ml-1m").ties == "random"
    meta = describe(["a"], np.zeros(2, np.int64), 1, np.zeros((3, 1), np.int64), 0,
                    SplitConfig(ties="item"), False, None, 0.0)  # fmt: skip
    assert set(meta["split"]) == {"test_ratio", "valid_ratio", "min_positives",
                                  "rating_threshold", "presplit"}  # fmt: skip
