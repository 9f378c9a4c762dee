"""In-process retrieval: the three serving paths, explicit behaviours, the trial channel and
every request the recommender refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from aftrec.data.dataset import Dataset
from aftrec.serving.index import ExactIndex
from aftrec.serving.recommender import (
    MAX_BEHAVIOURS,
    MAX_N,
    NoGeneratorError,
    Recommender,
    RequestError,
    UnknownUserError,
)
from tests.serving import exported, trial_bundle


@pytest.fixture(scope="module")
def rec(root: Path, tiny_dir: Path) -> Recommender:
    return Recommender.load(exported(root, tiny_dir))


@pytest.fixture(scope="module")
def trial_rec(root: Path, tiny: Dataset) -> Recommender:
    return Recommender.load(trial_bundle(root, tiny))


def stored(data: Dataset, user: int) -> dict[str, list[str]]:
    """The user's train + valid behaviours per domain, oldest first, as original ids."""
    tv = data.train_valid
    rows = np.flatnonzero(tv.user == user)  # sorted by (user, time)
    ids = data.items["item"].astype(str).to_numpy()
    out: dict[str, list[str]] = {name: [] for name in data.info.domains}
    for r in rows:
        out[data.info.domains[tv.domain[r]]].append(str(ids[tv.item[r]]))
    return out


def users_with(data: Dataset, target: int, has_target: bool) -> list[int]:
    tv = data.train_valid
    counts = np.zeros((data.info.n_users, data.info.n_domains), dtype=int)
    np.add.at(counts, (tv.user, tv.domain), 1)
    ok = (counts[:, target] > 0) == has_target
    return [int(u) for u in np.flatnonzero(ok & (counts.sum(1) > 0))]


def test_paths(rec: Recommender, tiny: Dataset) -> None:
    u_hist = users_with(tiny, 0, True)[0]
    u_cross = users_with(tiny, 0, False)[0]
    assert rec.recommend(user=str(u_hist), domain="d0").results[0].path == "history"
    cross = rec.recommend(user=str(u_cross), domain="d0", n=10).results[0]
    assert cross.path == "cross-domain" and len(cross.items) == 10
    # only behaviours in another domain: served from there
    r = rec.recommend(behaviours={"d1": [str(tiny.items["item"][90])]}, n=10)
    assert [x.path for x in r.results] == ["cross-domain", "history", "cross-domain"]
    # nothing anywhere: the domain's most clicked items
    pop = rec.recommend(behaviours={}, n=5)
    counts = np.bincount(tiny.train_valid.item, minlength=tiny.info.n_items)
    for d, res in enumerate(pop.results):
        lo, hi = tiny.info.domain_range(d)
        assert res.path == "popular"
        want = np.argsort(-counts[lo:hi], kind="stable")[:5] + lo
        assert res.items == [str(tiny.items["item"][i]) for i in want]
        assert res.scores == sorted(res.scores, reverse=True)


def test_explicit_behaviours_equal_the_stored_history(rec: Recommender, tiny: Dataset) -> None:
    for u in (3, 17, 42):
        a = rec.recommend(user=str(u), n=25)
        b = rec.recommend(behaviours=stored(tiny, u), n=25)
        assert [x.items for x in a.results] == [x.items for x in b.results]
        assert [x.path for x in a.results] == [x.path for x in b.results]
        assert a.user == str(u) and b.user is None


def test_user_plus_behaviours_appends(rec: Recommender, tiny: Dataset) -> None:
    u = 5
    extra = {"d2": [str(i) for i in range(160, 165)]}
    both = stored(tiny, u)
    both["d2"] = both["d2"] + extra["d2"]
    a = rec.recommend(user=str(u), behaviours=extra, domain="d2", n=20).results[0]
    b = rec.recommend(behaviours=both, domain="d2", n=20).results[0]
    assert a.items == b.items
    assert not set(extra["d2"]) & set(a.items)  # the new behaviours count as seen


def test_seen_items_excluded_or_not(rec: Recommender, tiny: Dataset) -> None:
    u = users_with(tiny, 1, True)[0]
    seen = set(stored(tiny, u)["d1"])
    n = 80  # the whole domain
    kept = rec.recommend(user=str(u), domain="d1", n=n, exclude_seen=False).results[0]
    dropped = rec.recommend(user=str(u), domain="d1", n=n).results[0]
    assert set(kept.items) == {str(i) for i in range(80, 160)}
    assert set(dropped.items) == set(kept.items) - seen
    assert dropped.items == [i for i in kept.items if i not in seen]


def test_integer_ids_are_accepted(rec: Recommender) -> None:
    a = rec.recommend(user=7, behaviours={"d0": [1, "2"]}, domain="d0", n=5)
    b = rec.recommend(user="7", behaviours={"d0": ["1", "2"]}, domain="d0", n=5)
    assert a.results[0].items == b.results[0].items


def test_trial_channel(trial_rec: Recommender, tiny: Dataset) -> None:
    for u in (0, 9, 33):
        beh = stored(tiny, u)
        for d, name in enumerate(tiny.info.domains):
            main = trial_rec.recommend(user=str(u), domain=name, n=15).results[0]
            trial = trial_rec.recommend(user=str(u), domain=name, n=15, trial=True).results[0]
            assert trial.channel == "trial" and main.channel == "main"
            assert len(trial.items) == 15
            assert not set(trial.items) & set(main.items)
            assert not set(trial.items) & set(beh[name])  # never what the user has seen
            # exactly the generator's best remaining items (flat index: exact oracle)
            hist, counts = trial_rec.encoder_input(trial_rec._behaviours(str(u), None))
            q = trial_rec.bundle.trial_encoders[d](hist, counts).detach().numpy()
            _, pos = ExactIndex(trial_rec.bundle.item_vectors(d, trial=True)).search(q, 80)
            lo = tiny.info.offsets[d]
            banned = set(main.items) | set(beh[name])
            ranked = [str(p + lo) for p in pos[0] if str(p + lo) not in banned]
            assert trial.items == ranked[:15]
    cold = trial_rec.recommend(behaviours={}, domain="d0", n=10, trial=True).results[0]
    popular = trial_rec.recommend(behaviours={}, domain="d0", n=10).results[0]
    assert cold.path == "popular" and not set(cold.items) & set(popular.items)


def test_trial_needs_a_generator(rec: Recommender) -> None:
    with pytest.raises(NoGeneratorError, match="has no generator"):
        rec.recommend(user="1", trial=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user": "1", "n": 0}, "n must be an integer in"),
        ({"user": "1", "n": MAX_N + 1}, "n must be an integer in"),
        ({"user": "1", "n": True}, "n must be an integer in"),
        ({"user": "1", "domain": "books"}, "unknown domain 'books'"),
        ({}, "give a known `user`"),
        ({"behaviours": {"books": ["1"]}}, "unknown domain 'books'"),
        ({"behaviours": {"d0": ["1", "nope", "x2"]}}, r"unknown item id\(s\).*'nope', 'x2'"),
        ({"behaviours": {"d0": ["100"]}}, "belongs to domain 'd1'"),
        ({"behaviours": {"d0": [1.5]}}, "ids must be strings or integers"),
        ({"behaviours": {"d0": "1"}}, "must be a list"),
        ({"behaviours": ["1"]}, "must be an object"),
        ({"behaviours": {"d0": ["1"] * (MAX_BEHAVIOURS + 1)}}, "too many behaviours"),
        ({"user": [1]}, "ids must be strings or integers"),
        # any non-empty string is true: "no" excluded the seen items, or asked for a trial
        ({"user": "1", "exclude_seen": "no"}, "exclude_seen must be True or False, got 'no'"),
        ({"user": "1", "exclude_seen": 0}, "exclude_seen must be True or False, got 0"),
        ({"user": "1", "trial": "no"}, "trial must be True or False, got 'no'"),
    ],
)
def test_bad_requests(rec: Recommender, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        rec.recommend(**kwargs)  # type: ignore[arg-type]


def test_numpy_bools_are_flags(rec: Recommender) -> None:
    got = rec.recommend(user="1", domain="d0", n=5, exclude_seen=np.bool_(False))
    want = rec.recommend(user="1", domain="d0", n=5, exclude_seen=False)
    assert got.to_dict() == want.to_dict()


def test_unknown_user(rec: Recommender) -> None:
    with pytest.raises(UnknownUserError, match=r"unknown user 'ghost'.*behaviours") as err:
        rec.recommend(user="ghost")
    assert err.value.status == 404
