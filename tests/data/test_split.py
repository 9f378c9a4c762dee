import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftrec.data.prepare import prepare
from aftrec.data.schema import RawLog
from aftrec.data.split import (
    TEST,
    TRAIN,
    VALID,
    SplitConfig,
    assign_parts,
    chronological_order,
    id_hashes,
    tie_draws,
    with_ties,
)
from aftrec.errors import ConfigError


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


def _pairs(out: Path, part: str = "test") -> set[tuple[str, str]]:
    """The (user id, item id) pairs of a prepared dataset's part."""
    rows = pd.read_parquet(out / f"{part}.parquet")
    users = pd.read_parquet(out / "users.parquet").set_index("user_idx")["user"]
    names = pd.read_parquet(out / "items.parquet").set_index("item_idx")["item"]
    return set(zip(users[rows["user_idx"]], names[rows["item_idx"]], strict=True))


def test_the_random_rule_depends_on_the_two_ids_and_the_seed_only(tmp_path: Path) -> None:
    """The same log in another row order, with items no one clicked added to the catalogue
    (which renumbers the items after them), splits the same; another --tie-seed draws
    another split of the same tie."""
    inter, items = _tied_log(("a", "b"), n_users=60)
    cfg = SplitConfig(valid_ratio=0.0)
    a = prepare(RawLog(inter, items), tmp_path / "a", cfg)
    more = pd.concat([items, pd.DataFrame({"item": ["i0x", "i1x", "h"], "domain": "a"})])
    b = prepare(RawLog(inter.sample(frac=1.0, random_state=3), more), tmp_path / "b", cfg)
    c = prepare(RawLog(inter, items), tmp_path / "c", SplitConfig(valid_ratio=0.0, tie_seed=1))
    assert _pairs(a) == _pairs(b)
    assert _pairs(a) != _pairs(c)
    meta = json.loads((a / "meta.json").read_text())["split"]
    assert (meta["ties"], meta["tie_seed"]) == ("random", 0)


def test_a_carved_validation_of_presplit_train_draws_its_ties(tmp_path: Path) -> None:
    """Validation carved from a pre-split train orders its ties as a split log does: the
    train and valid parts equal those of the same log split in one."""
    inter, items = _tied_log(("a", "b"), n_users=80)
    cfg = SplitConfig(test_ratio=0.2, valid_ratio=0.25)
    whole = prepare(RawLog(inter, items), tmp_path / "w", cfg)
    test = {tuple(pair) for pair in _pairs(whole)}
    is_test = np.array([(u, i) in test for u, i in zip(inter["user"], inter["item"], strict=True)])
    logs = {"train": RawLog(inter[~is_test], items), "test": RawLog(inter[is_test], items)}
    pre = prepare(logs["train"], tmp_path / "p", cfg, presplit=logs)
    for part in ("train", "valid", "test"):
        assert _pairs(whole, part) == _pairs(pre, part)


def test_the_packed_order_with_draws_is_the_lexsorts() -> None:
    """Draws that share their top bits (here all but the last) are ordered by the whole draw,
    then the item, as the four-key lexsort orders them."""
    rng = np.random.default_rng(0)
    n = 5_000
    user, ts, item = rng.integers(0, 30, n), rng.integers(0, 20, n), rng.integers(0, 50, n)
    high = rng.integers(0, 4, n).astype(np.uint64) << np.uint64(60)
    tie = high | rng.integers(0, 2, n).astype(np.uint64)
    got = chronological_order(user, ts, item, tie)
    want = np.lexsort((item, tie, ts, user))
    assert np.array_equal(got, want)  # both stable: equal rows keep the input's order


def test_tie_draws_order_tied_items_uniformly() -> None:
    """Three items tied for 30,000 users: each comes last (goes to test) for a third of them,
    whatever their ids."""
    users = id_hashes(np.array([f"u{k}" for k in range(30_000)]))
    items = id_hashes(np.array(["i1", "i2", "i999"]))
    draws = tie_draws(np.repeat(users, 3), np.tile(items, 30_000)).reshape(-1, 3)
    last = np.bincount(draws.argmax(axis=1), minlength=3) / 30_000
    assert np.abs(last - 1 / 3).max() < 0.012  # the sd of a share is sqrt(2/9 / 30,000) = 0.0027


def test_id_hashes_are_pinned() -> None:
    """The draws of every prepared dataset with --ties random hang on these values: a pandas
    whose hash of text changed would split the same log otherwise."""
    got = id_hashes(np.array(["u1", "7", 7], dtype=object))
    assert got[1] == got[2]  # the integer 7 and the text "7": one id
    assert got.tolist()[:2] == [10883949598687333822, 5601596950964403433]


def test_presets_keep_the_item_rule_and_their_meta(tmp_path: Path) -> None:
    """ml-100k and ml-1m keep the rule their committed results were split with, whichever
    entry point prepares them, and a dataset split so records no tie keys: its meta.json, and
    fingerprint, are what they were. A seed for the item rule, which draws nothing, is
    refused."""
    assert with_ties(SplitConfig(), "ml-1m").ties == "item"
    assert with_ties(SplitConfig(), "ml-100k").ties == "item"
    assert with_ties(SplitConfig(), "netflix") == SplitConfig(ties="random", tie_seed=0)
    assert with_ties(SplitConfig(), None).ties == "random"
    assert with_ties(SplitConfig(ties="random"), "ml-1m").ties == "random"
    with pytest.raises(ConfigError, match="goes with --ties random"):
        with_ties(SplitConfig(tie_seed=3), "ml-1m")
    with pytest.raises(ConfigError, match="goes with --ties random"):
        with_ties(SplitConfig(ties="item", tie_seed=0), None)
    inter, items = _tied_log(("a", "b"), n_users=20)
    source = {"kind": "ml-100k", "path": "x"}
    out = prepare(RawLog(inter, items), tmp_path / "m", SplitConfig(valid_ratio=0.0), source)
    split = json.loads((out / "meta.json").read_text())["split"]
    assert set(split) == {"test_ratio", "valid_ratio", "min_positives", "rating_threshold",
                          "presplit"}  # fmt: skip
    assert _test_share(out, "b") == 1.0


def test_a_presplit_with_its_own_validation_orders_no_tie(tmp_path: Path) -> None:
    """Nothing is split, so no tie rule applies: meta.json records none, as before the rule."""
    inter, items = _tied_log(("a", "b"), n_users=20)
    at = inter.groupby("user").cumcount().to_numpy()  # each user's 3 clicks in a, then 2 in b
    logs = {"train": RawLog(inter[np.isin(at, [0, 1, 3])], items),
            "valid": RawLog(inter[at == 2], items),
            "test": RawLog(inter[at == 4], items)}  # fmt: skip
    out = prepare(logs["train"], tmp_path / "p", SplitConfig(), presplit=logs)
    assert not {"ties", "tie_seed"} & set(json.loads((out / "meta.json").read_text())["split"])


def test_a_numpy_integer_seed_is_the_integer_it_holds() -> None:
    assert SplitConfig(tie_seed=np.int64(3)).tie_seed == 3
    assert type(SplitConfig(tie_seed=np.uint64(3)).tie_seed) is int
    with pytest.raises(ConfigError, match=r"must be an integer, got 3\.0"):
        SplitConfig(tie_seed=3.0)  # type: ignore[arg-type]
