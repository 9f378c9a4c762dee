"""The synthetic generator: contract, determinism, and that the planted structure is real."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import pytest

from aftrec.data.schema import RawLog, validate
from aftrec.data.sources import synthetic
from aftrec.data.sources.synthetic import (
    BLOCK_USERS,
    MIN_INTERACTIONS,
    SyntheticConfig,
    catalogue,
    generate,
    iter_chunks,
)
from aftrec.errors import ConfigError

DEFAULT = SyntheticConfig()
# More users than one internal block, so block and chunk boundaries are exercised.
MANY_USERS = SyntheticConfig(n_users=BLOCK_USERS + 1500, n_interactions=80_000, seed=3)


def assert_same_interactions(a: pd.DataFrame, b: pd.DataFrame) -> None:
    # assert_frame_equal on the categorical column takes seconds in pandas 3: compare codes.
    pd.testing.assert_frame_equal(a.drop(columns="domain"), b.drop(columns="domain"))
    assert a["domain"].dtype == b["domain"].dtype
    np.testing.assert_array_equal(a["domain"].cat.codes, b["domain"].cat.codes)


@pytest.fixture(scope="module")
def log() -> RawLog:
    return generate(DEFAULT)


@pytest.fixture(scope="module")
def many_users() -> pd.DataFrame:
    return generate(MANY_USERS).interactions


@pytest.fixture(scope="module")
def with_topics(log: RawLog) -> pd.DataFrame:
    topic = catalogue(DEFAULT)["topic"].to_numpy()
    return log.interactions.assign(topic=topic[log.interactions["item"].to_numpy()])


def test_shapes_and_dtypes(log: RawLog) -> None:
    inter, items = log.interactions, log.items
    assert list(inter.columns) == ["user", "item", "timestamp", "domain"]
    for col in ("user", "item", "timestamp"):
        assert inter[col].dtype == np.int64, col
    assert isinstance(inter["domain"].dtype, pd.CategoricalDtype)
    assert list(inter["domain"].cat.categories) == ["d0", "d1", "d2"]
    assert list(items.columns) == ["item", "domain"]
    assert items["item"].dtype == np.int64
    assert pd.api.types.is_string_dtype(items["domain"])
    assert len(items) == DEFAULT.n_domains * DEFAULT.items_per_domain
    np.testing.assert_array_equal(items["item"], np.arange(len(items)))
    assert items["domain"].value_counts().to_dict() == {
        d: DEFAULT.items_per_domain for d in ("d0", "d1", "d2")
    }
    assert list(log.domains or []) == ["d0", "d1", "d2"]
    assert log.interactions_origin.name == log.items_origin.name == "synthetic"
    assert set(inter["user"].unique()) == set(range(DEFAULT.n_users))
    # De-duplication only removes: at most the requested total, and not much less.
    assert 0.95 * DEFAULT.n_interactions <= len(inter) <= DEFAULT.n_interactions


def test_validate_passes_and_domains_agree(log: RawLog) -> None:
    clean = validate(log)  # also checks interaction domain against the catalogue
    assert len(clean.interactions) == len(log.interactions)
    assert list(clean.domains or []) == ["d0", "d1", "d2"]


def test_rows_are_sorted_by_user_then_time(log: RawLog) -> None:
    inter = log.interactions
    key = inter["user"].to_numpy() * (DEFAULT.span_seconds + 1) + (
        inter["timestamp"].to_numpy() - DEFAULT.start_time
    )
    assert (np.diff(key) > 0).all()


def test_user_item_and_time_invariants(log: RawLog) -> None:
    inter = log.interactions
    assert inter.groupby("user").size().min() >= MIN_INTERACTIONS
    assert not inter.duplicated(["user", "item"]).any()
    assert not inter.duplicated(["user", "timestamp"]).any()
    ts = inter["timestamp"].to_numpy()
    assert ts.min() >= DEFAULT.start_time
    assert ts.max() < DEFAULT.start_time + DEFAULT.span_seconds


def test_deterministic(log: RawLog) -> None:
    again = generate(DEFAULT)
    assert_same_interactions(again.interactions, log.interactions)
    pd.testing.assert_frame_equal(again.items, log.items)
    other = generate(dataclasses.replace(DEFAULT, seed=1)).interactions
    assert len(other) != len(log.interactions) or not other.equals(log.interactions)
    n = min(len(other), len(log.interactions))
    assert (other["item"].to_numpy()[:n] != log.interactions["item"].to_numpy()[:n]).mean() > 0.5


@pytest.mark.parametrize("chunk_users", [1000, BLOCK_USERS, BLOCK_USERS + 1, 100_000])
def test_chunks_concatenate_to_generate(chunk_users: int, many_users: pd.DataFrame) -> None:
    whole = many_users
    frames = list(iter_chunks(MANY_USERS, chunk_users))
    assert len(frames) == -(-MANY_USERS.n_users // chunk_users)
    for c, frame in enumerate(frames):
        users = frame["user"].to_numpy()
        assert users.min() == c * chunk_users
        assert users.max() == min((c + 1) * chunk_users, MANY_USERS.n_users) - 1
    assert_same_interactions(pd.concat(frames, ignore_index=True), whole)


def test_generate_ignores_chunk_users(many_users: pd.DataFrame) -> None:
    assert_same_interactions(generate(MANY_USERS, chunk_users=1000).interactions, many_users)


def test_extreme_config_keeps_the_floor() -> None:
    # One-item topics, near one-hot tastes and mostly one domain: draws repeat, so the
    # repair rounds and the last-resort items are needed to reach 5 distinct items.
    cfg = SyntheticConfig(
        n_users=300,
        n_domains=2,
        items_per_domain=16,
        n_topics=16,
        taste_concentration=1e-3,
        popularity_skew=5.0,
        domain_presence=0.01,
        n_interactions=6000,
    )
    inter = validate(generate(cfg)).interactions
    sizes = inter.groupby("user").size()
    assert len(sizes) == cfg.n_users
    assert sizes.min() >= MIN_INTERACTIONS
    assert len(inter) < 0.5 * cfg.n_interactions  # saturated: far below the request
    assert not inter.duplicated(["user", "item"]).any()


def test_short_span_still_valid() -> None:
    cfg = SyntheticConfig(n_users=50, n_interactions=1000, span_seconds=3)
    inter = validate(generate(cfg)).interactions
    assert inter["timestamp"].between(cfg.start_time, cfg.start_time + 2).all()


def _topic_cosines(
    df: pd.DataFrame, cfg: SyntheticConfig, min_each: int = 5
) -> tuple[float, float]:
    """Mean cosine between a user's topic histograms in d0 and d1: the same user, and a user
    paired with a random other user (only users with ``min_each`` items in both domains)."""

    def hist(domain: str) -> np.ndarray:
        sub = df[df["domain"] == domain]
        h = np.zeros((cfg.n_users, cfg.n_topics))
        np.add.at(h, (sub["user"].to_numpy(), sub["topic"].to_numpy()), 1.0)
        return h

    h0, h1 = hist("d0"), hist("d1")
    both = (h0.sum(axis=1) >= min_each) & (h1.sum(axis=1) >= min_each)
    assert both.sum() >= 100
    a = h0[both] / np.linalg.norm(h0[both], axis=1, keepdims=True)
    b = h1[both] / np.linalg.norm(h1[both], axis=1, keepdims=True)
    shuffled = b[np.random.default_rng(0).permutation(len(b))]
    return float((a * b).sum(axis=1).mean()), float((a * shuffled).sum(axis=1).mean())


def test_taste_is_shared_across_domains(with_topics: pd.DataFrame) -> None:
    same, other = _topic_cosines(with_topics, DEFAULT)
    assert same > other + 0.3, (same, other)  # observed about 0.70 vs 0.23


def test_independent_tastes_remove_the_cross_domain_signal() -> None:
    # Control: with domain_specific=1 the same statistic must show nothing, so the test above
    # measures the planted shared taste and not an artefact (popularity, activity).
    cfg = dataclasses.replace(DEFAULT, domain_specific=1.0)
    topic = catalogue(cfg)["topic"].to_numpy()
    df = generate(cfg).interactions
    same, other = _topic_cosines(df.assign(topic=topic[df["item"].to_numpy()]), cfg)
    assert abs(same - other) < 0.05, (same, other)


def _top_decile_share(df: pd.DataFrame, n_items: int) -> float:
    counts = np.sort(np.bincount(df["item"].to_numpy(), minlength=n_items))[::-1]
    return float(counts[: n_items // 10].sum() / counts.sum())


def test_popularity_is_skewed(log: RawLog) -> None:
    skewed = _top_decile_share(log.interactions, DEFAULT.n_items)
    flat_cfg = dataclasses.replace(DEFAULT, popularity_skew=0.0)
    flat = _top_decile_share(generate(flat_cfg).interactions, DEFAULT.n_items)
    assert skewed > 0.25, skewed  # observed about 0.35
    assert flat < 0.2, flat  # observed about 0.13: topics alone concentrate a little
    # Within a topic, the Zipf rank orders popularity: rank 1 beats the median rank.
    cat = catalogue(DEFAULT)
    counts = np.bincount(log.interactions["item"].to_numpy(), minlength=DEFAULT.n_items)
    by_rank = pd.Series(counts).groupby(cat["popularity_rank"].to_numpy()).mean()
    assert by_rank.loc[1] > 5 * by_rank.loc[by_rank.index.max() // 2]


def test_users_are_absent_or_sparse_in_some_domains(log: RawLog) -> None:
    per = log.interactions.groupby(["user", "domain"], observed=False).size().unstack()
    active = (per > 0).mean()
    assert ((active > 0.55) & (active < 0.85)).all(), active  # domain_presence = 0.7
    n_domains = (per > 0).sum(axis=1)
    assert (n_domains == 1).mean() > 0.1
    assert (n_domains == DEFAULT.n_domains).mean() > 0.1


def test_activity_is_heavy_tailed(log: RawLog) -> None:
    sizes = log.interactions.groupby("user").size()
    assert sizes.max() > 10 * sizes.median()


def test_catalogue_ground_truth() -> None:
    cat = catalogue(DEFAULT)
    assert list(cat.columns) == ["item", "domain", "topic", "popularity_rank"]
    per_topic = cat.groupby(["domain", "topic"]).size()
    assert len(per_topic) == DEFAULT.n_domains * DEFAULT.n_topics
    assert per_topic.max() - per_topic.min() <= 1
    ranks = cat.groupby(["domain", "topic"])["popularity_rank"]
    assert (ranks.min() == 1).all()
    assert (ranks.max() == per_topic).all()


@pytest.mark.parametrize(
    "change",
    [
        {"n_users": 0},
        {"n_interactions": 4 * 2000},
        {"items_per_domain": 10},  # fewer items than topics
        {"domain_specific": 1.5},
        {"taste_concentration": 0.0},
        {"popularity_skew": -1.0},
        {"domain_presence": 0.0},
        {"span_seconds": 0},
        {"seed": -1},
        {"n_domains": 10**20},  # beyond the int32 item numbers of a prepared dataset
        {"items_per_domain": 2**31},
        {"n_interactions": 10**20},  # numpy's sizes would overflow before memory ran out
    ],
)
def test_bad_config_raises(change: dict[str, Any]) -> None:
    (field,) = change  # the message names the field that is wrong, not another one
    with pytest.raises(ConfigError, match=rf"SyntheticConfig.*\b{field}\b"):
        dataclasses.replace(DEFAULT, **change)


def test_bad_chunk_users_raises() -> None:
    with pytest.raises(ConfigError, match="chunk_users"):
        next(iter_chunks(DEFAULT, 0))


def test_first_distinct_matches_a_loop() -> None:
    rng = np.random.default_rng(7)
    n_owners, n_items = 40, 12
    owner = rng.integers(0, n_owners, 2000)
    item = rng.integers(0, n_items, 2000)
    quota = rng.integers(1, 10, n_owners)
    got_owner, got_item = synthetic._first_distinct(owner, item, quota, n_items, grouped=False)
    expected: list[tuple[int, int]] = []
    for o in range(n_owners):
        seen: list[int] = []
        for i in item[owner == o]:
            if i not in seen and len(seen) < quota[o]:
                seen.append(int(i))
        expected += [(o, i) for i in seen]
    assert list(zip(got_owner.tolist(), got_item.tolist(), strict=True)) == expected
