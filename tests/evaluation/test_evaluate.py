import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from aftrec.data.dataset import Dataset
from aftrec.data.loader import Batch
from aftrec.evaluation.evaluate import EvalResult, Evaluator
from aftrec.models.base import RetrievalModel


@dataclass(frozen=True)
class _Cfg:
    pass


class TableScorer(RetrievalModel):
    """A scorer model reading a fixed (users x items) table: the evaluator's oracle input."""

    dot_product = False

    def __init__(self, table: np.ndarray, data: Dataset) -> None:
        super().__init__(_Cfg(), data.info, 5)
        self.table = torch.from_numpy(table)

    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return self.table[batch.users, lo:hi]


def brute_force(data: Dataset, table: np.ndarray, split: str, ns: tuple[int, ...]):
    fit, targets = data.fit_and_targets(split)
    out = {}
    for d, name in enumerate(data.info.domains):
        lo, hi = data.info.domain_range(d)
        vals: dict[str, list[float]] = {}
        for u in np.unique(targets.user[targets.domain == d]):
            seen = set(fit.item[(fit.user == u) & (fit.domain == d)].tolist())
            pos = set(targets.item[(targets.user == u) & (targets.domain == d)].tolist()) - seen
            cand = [i for i in range(lo, hi) if i not in seen]
            ranked = sorted(cand, key=lambda i: -table[u, i])
            for n in ns:
                top = ranked[:n]
                hits = [1.0 if i in pos else 0.0 for i in top]
                vals.setdefault(f"recall@{n}", []).append(sum(hits) / len(pos))
                dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
                idcg = sum(1 / math.log2(r + 2) for r in range(min(len(pos), n)))
                vals.setdefault(f"ndcg@{n}", []).append(dcg / idcg)
            labels = [1 if i in pos else 0 for i in cand]
            vals.setdefault("auc", []).append(roc_auc_score(labels, table[u, cand]))
        out[name] = {k: float(np.mean(v)) for k, v in vals.items()}
    return out


@pytest.mark.parametrize("split", ["valid", "test"])
def test_full_ranking_matches_brute_force(tiny: Dataset, split: str) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(tiny.info.n_users, tiny.info.n_items)).astype(np.float32)
    ns = (5, 20)
    res = Evaluator(tiny, 5, batch_size=37).evaluate(
        TableScorer(table, tiny), split, ns, progress=False
    )
    want = brute_force(tiny, table, split, ns)
    for name, metrics in want.items():
        for key, value in metrics.items():
            assert res.domains[name][key] == pytest.approx(value, abs=1e-6), (name, key)
    for key in res.average:
        assert res.average[key] == pytest.approx(
            np.mean([res.domains[n][key] for n in res.domains])
        )
    assert set(res.per_user.columns) >= {"user_idx", "domain", "recall@5", "auc"}


def test_training_positives_never_ranked(tiny: Dataset) -> None:
    """Pushing the training positives to the top changes nothing: they are excluded."""
    fit, _ = tiny.fit_and_targets("test")
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(tiny.info.n_users, tiny.info.n_items)).astype(np.float32)
    boosted = noise.copy()
    boosted[fit.user, fit.item] = 100.0
    ev = Evaluator(tiny, 5)
    a = ev.evaluate(TableScorer(noise, tiny), "test", (5, 20), progress=False)
    b = ev.evaluate(TableScorer(boosted, tiny), "test", (5, 20), progress=False)
    for key in ("recall@5", "recall@20", "ndcg@20", "auc"):
        assert a.average[key] == pytest.approx(b.average[key], abs=1e-12)


def test_perfect_scorer_gets_recall_one_and_auc_one(tiny: Dataset) -> None:
    _, targets = tiny.fit_and_targets("test")
    table = np.zeros((tiny.info.n_users, tiny.info.n_items), dtype=np.float32)
    table[targets.user, targets.item] = 1.0
    res = Evaluator(tiny, 5).evaluate(TableScorer(table, tiny), "test", (200,), progress=False)
    assert res.average["auc"] == pytest.approx(1.0)
    assert res.average["ndcg@200"] == pytest.approx(1.0)
    assert res.average["recall@200"] == pytest.approx(1.0)


def test_the_protocol_names_what_each_split_excludes(tiny: Dataset) -> None:
    table = np.random.default_rng(0).normal(size=(tiny.info.n_users, tiny.info.n_items))
    scorer, ev = TableScorer(table.astype(np.float32), tiny), Evaluator(tiny, 5)
    test = ev.evaluate(scorer, "test", (10,), progress=False)
    valid = ev.evaluate(scorer, "valid", (10,), progress=False)
    assert test.protocol.endswith("the user's training and validation positives excluded")
    assert valid.protocol.endswith("the user's training positives excluded")
    assert test.to_json()["protocol"] == test.protocol and test.protocol in test.table()


def test_sampled_metrics_are_labelled(tiny: Dataset) -> None:
    table = np.random.default_rng(0).normal(size=(tiny.info.n_users, tiny.info.n_items))
    res = Evaluator(tiny, 5).evaluate(
        TableScorer(table.astype(np.float32), tiny),
        "test",
        (10,),
        sampled_negatives=20,
        progress=False,
    )
    assert "SAMPLED" in res.protocol and "SAMPLED" in res.table()
    assert "sampled_recall@10" in res.average and "recall@10" not in res.average
    # ranking among 20 negatives is much easier than among the whole domain
    full = Evaluator(tiny, 5).evaluate(
        TableScorer(table.astype(np.float32), tiny), "test", (10,), progress=False
    )
    assert res.average["sampled_recall@10"] > full.average["recall@10"]


def test_table_headers_never_run_together() -> None:
    keys = ["sampled_recall@20", "sampled_ndcg@20", "recall@99999999999", "auc"]
    domains = {"d0": dict.fromkeys(keys, 0.5), "a-long-domain-name": dict.fromkeys(keys, 1.0)}
    res = EvalResult(
        "test", (20,), domains, dict.fromkeys(keys, 0.75), {"d0": 3, "a-long-domain-name": 4}
    )
    lines = res.table().splitlines()
    assert lines[1].split() == ["domain", *keys, "users"]
    rows = lines[3:]
    assert [r.split()[0] for r in rows] == ["d0", "a-long-domain-name", "average"]
    assert {len(r) for r in rows} == {len(lines[1])}  # every cell under its header
    for key in keys:  # each value ends where its header ends
        end = lines[1].index(key) + len(key)
        assert all(r[end - 1] != " " and (end == len(r) or r[end] == " ") for r in rows)


@pytest.fixture(scope="module")
def early_domain(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """Domains A, B, C: every user clicks B's items first, so the per-user time split leaves
    B without a validation or test click."""
    import pandas as pd

    from aftrec.cli import main

    rng, rows = np.random.default_rng(0), []
    for u in range(60):
        t = 0
        for i in rng.choice(10, 4, replace=False):
            rows.append((f"u{u}", f"B{i}", t))
            t += 1
        for x, y in zip(
            rng.choice(10, 6, replace=False), rng.choice(10, 6, replace=False), strict=True
        ):
            rows += [(f"u{u}", f"A{x}", 100 + t), (f"u{u}", f"C{y}", 101 + t)]
            t += 2
    root = tmp_path_factory.mktemp("early")
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(root / "log.csv", index=False)
    items = pd.DataFrame({"item": [f"{d}{i}" for d in "ABC" for i in range(10)]})
    items.assign(domain=items["item"].str[0]).to_csv(root / "items.csv", index=False)
    argv = ["prepare", "--interactions", str(root / "log.csv"), "--items",
            str(root / "items.csv"), "--out", str(root / "data")]  # fmt: skip
    assert main(argv) == 0
    return Dataset(root / "data")


def test_a_domain_without_held_out_users_is_nan_and_left_out_of_the_average(
    early_domain: Dataset,
) -> None:
    """It was a KeyError (or, as the first domain, an empty average) in evaluate and in every
    epoch's validation."""
    data = early_domain
    table = np.random.default_rng(0).normal(size=(data.info.n_users, data.info.n_items))
    res = Evaluator(data, 5).evaluate(
        TableScorer(table.astype(np.float32), data), "test", (5,), progress=False
    )
    assert res.users["B"] == 0 and res.users["A"] > 0 and res.users["C"] > 0
    assert all(math.isnan(v) for v in res.domains["B"].values())
    assert list(res.domains["B"]) == list(res.average) == ["recall@5", "ndcg@5", "auc"]
    for key in res.average:
        assert res.average[key] == pytest.approx(
            (res.domains["A"][key] + res.domains["C"][key]) / 2
        )
    assert res.table().splitlines()[-1].split()[0] == "average"


def test_a_split_without_held_out_positives_is_an_error(tiny: Dataset, monkeypatch) -> None:
    from aftrec.errors import DataError

    fit, targets = tiny.fit_and_targets("valid")
    empty = targets.__class__(**{k: v[:0] for k, v in vars(targets).items()})
    monkeypatch.setattr(tiny, "fit_and_targets", lambda split: (fit, empty))
    table = np.zeros((tiny.info.n_users, tiny.info.n_items), dtype=np.float32)
    with pytest.raises(DataError, match="the valid part holds no held-out positive"):
        Evaluator(tiny, 5).evaluate(TableScorer(table, tiny), "valid", (5,), progress=False)


def test_nan_scores_are_refused(tiny: Dataset) -> None:
    """torch.topk ranks NaN first: a diverged model scored like a constant one, its AUC NaN
    and left out of the mean while its users were counted."""
    from aftrec.errors import TrainingError

    table = np.random.default_rng(0).normal(size=(tiny.info.n_users, tiny.info.n_items))
    table[:, 5] = np.nan  # one item, for every user
    with pytest.raises(TrainingError, match=r"scores NaN for \d+ of \d+ users in domain"):
        Evaluator(tiny, 5).evaluate(
            TableScorer(table.astype(np.float32), tiny), "test", (5,), progress=False
        )


def test_an_unseen_item_scored_minus_inf_still_ranks_above_the_seen_ones(tiny: Dataset) -> None:
    """Seen items are masked to -inf: a held-out item the model scores -inf tied with them
    and could lose its place in a short domain to an item the user had seen."""
    from aftrec.data.histories import HistoryIndex
    from aftrec.evaluation.ranking import rank_domain

    fit, _ = tiny.fit_and_targets("test")
    history = HistoryIndex(fit, tiny.info)
    d = 0
    lo, hi = tiny.info.domain_range(d)
    users = np.unique(fit.user[fit.domain == d])[:20]
    table = np.full((tiny.info.n_users, tiny.info.n_items), -np.inf, dtype=np.float32)
    table[:, lo] = np.inf  # a genuine +inf is ranked first, not dropped
    k = hi - lo
    for rb in rank_domain(TableScorer(table, tiny), tiny.info, history, users, d, k, 7, 5):
        unseen = ~rb.seen
        n_unseen = unseen.sum(1)
        top = rb.top_unseen()
        # every unseen item comes before every seen one, whatever its score
        assert (top.sum(1) == n_unseen).all()
        assert all(bool(row[:n].all()) for row, n in zip(top, n_unseen.tolist(), strict=True))
        first = rb.top_items[:, 0]
        assert ((first == 0) | rb.seen[:, 0]).all()
        assert torch.equal(rb.top_scores, rb.scores.gather(1, rb.top_items))


def test_a_domain_named_average_keeps_its_row(tiny: Dataset) -> None:
    keys = ["recall@5"]
    res = EvalResult(
        "test", (5,), {"average": {"recall@5": 0.2}, "b": {"recall@5": 0.6}},
        {"recall@5": 0.4}, {"average": 3, "b": 4},
    )  # fmt: skip
    rows = [r.split() for r in res.table().splitlines()[3:]]
    assert rows == [["average", "0.2000", "3"], ["b", "0.6000", "4"], ["(average)", "0.4000", "7"]]
    assert keys == list(res.average)


def test_sampled_metrics_rank_an_item_scored_minus_inf_among_the_candidates(
    tiny: Dataset,
) -> None:
    """The sampled ranking masked the non-candidates to -inf too, and counted only finite
    scores as hits: a held-out item scored -inf was a miss, one scored -1e30 a hit."""
    _, targets = tiny.fit_and_targets("test")
    table = np.random.default_rng(0).normal(size=(tiny.info.n_users, tiny.info.n_items))
    ev = Evaluator(tiny, 5)
    got = {}
    for low in (-1e30, -np.inf):
        t = table.astype(np.float32)
        t[targets.user, targets.item] = low
        res = ev.evaluate(TableScorer(t, tiny), "test", (50,), sampled_negatives=5, progress=False)
        got[low] = res.average["sampled_recall@50"]
    assert got[-np.inf] == got[-1e30] == pytest.approx(1.0)  # 5 negatives + positives < 50


def test_ties_rank_by_position_at_the_cut_too() -> None:
    """``torch.topk`` leaves tied scores in an order of its own, which changed with k and n;
    the ranking takes the lower position first, as the serving indexes do."""
    from aftrec.evaluation.ranking import top_k

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 2000))
        scores = rng.integers(0, 6, (3, n)).astype(np.float32)
        scores[0, rng.integers(0, n)] = -np.inf
        want = np.lexsort((np.arange(n)[None].repeat(3, 0), -scores), axis=1)
        for k in sorted({1, min(10, n), min(200, n), n}):
            got = top_k(torch.from_numpy(scores), k).numpy()
            np.testing.assert_array_equal(got, want[:, :k])


def test_sampled_metrics_say_which_domains_were_fully_ranked() -> None:
    """With K at or above a domain's size, that domain's "sampled" numbers were its full
    ranking's, under a header that said K sampled items."""
    from aftrec.evaluation.evaluate import sampled_protocol
    from aftrec.outputs import shown_name

    said = sampled_protocol({"Action": 500, "Crime": 300, "War": 100}, 300)
    assert said.endswith("; Crime, War have at most 300 items, so every unclicked item is "
                         "ranked there, as in full ranking")  # fmt: skip
    assert "at most" not in sampled_protocol({"Action": 500}, 300)
    shown = sampled_protocol({"Games ": 40, "Tiny": 3}, 100, shown_name)
    assert "; 'Games ', Tiny have at most 100 items" in shown  # the table's line
    assert "; Games , Tiny have at most 100 items" in sampled_protocol(
        {"Games ": 40, "Tiny": 3}, 100
    )  # metrics_sampledK.json's, as it was


def _result(sizes: dict[str, int], auc: dict[str, float]) -> EvalResult:
    """An evaluation of domains of ``sizes`` items at N = 5 and 50, every recall 1."""
    keys = ["recall@5", "ndcg@5", "recall@50", "ndcg@50", "auc"]
    domains = {d: {**dict.fromkeys(keys[:-1], 1.0), "auc": auc[d]} for d in sizes}
    average = {k: float(np.nanmean([domains[d][k] for d in sizes])) for k in keys}
    users = dict.fromkeys(sizes, 3)
    return EvalResult("test", (5, 50), domains, average, users, sizes=dict(sizes))


def test_the_table_names_the_domains_where_recall_is_one_by_construction() -> None:
    """A domain of at most N items has Recall@N = 1 for any model, and the average counts
    it: the table said so only when N reached every domain, and then outside the table."""
    res = _result(
        {"Books": 120, "Games": 40, "Tiny": 3}, dict.fromkeys(("Books", "Games", "Tiny"), 0.5)
    )
    notes = [line for line in res.table().splitlines() if line.startswith("note:")]
    assert notes == [
        "note: Recall@N is 1 for any model in a domain of at most N items (every unseen item "
        "is in the top N), and the average counts it: recall@5 in Tiny (3 items); recall@50 in "
        "Games (40 items), Tiny (3 items)"
    ]
    assert res.notes() == notes
    every = _result({"a": 12, "b": 4}, {"a": 0.5, "b": 0.5})
    assert every.notes()[0].endswith("recall@5 in b (4 items); recall@50 in every domain (the "
                                     "largest has 12 items)")  # fmt: skip
    assert not _result({"a": 80}, {"a": 0.5}).notes()  # none that small
    assert json.loads(res.json_text()) == res.to_json()  # metrics.json is as it was
    assert "sizes" not in res.to_json()


def test_recall_is_one_in_a_domain_of_at_most_n_items_full_or_sampled(tiny: Dataset) -> None:
    """The note's claim, on the evaluator: any scores give Recall@N = 1 where N reaches the
    domain's size, in full ranking and among sampled negatives; the values are unchanged."""
    table = np.random.default_rng(0).normal(size=(tiny.info.n_users, tiny.info.n_items))
    scorer, ev = TableScorer(table.astype(np.float32), tiny), Evaluator(tiny, 5)
    size = tiny.info.domain_size(0)
    for sampled in (None, 20):
        res = ev.evaluate(scorer, "test", (5, size), sampled_negatives=sampled, progress=False)
        key = f"{'' if sampled is None else 'sampled_'}recall@{size}"
        assert all(res.domains[d][key] == 1.0 for d in tiny.info.domains)
        assert res.sizes == dict.fromkeys(tiny.info.domains, size)
        said = "the largest has" if sampled is None else "no user has more than"
        assert f"{key} in every domain ({said} " in res.table()


def _most_candidates(data: Dataset, split: str, k: int) -> dict[str, int]:
    """Per domain, the most items one user is ranked among with ``k`` sampled negatives: its
    held-out positives and ``k`` of its unclicked items, all of them where fewer."""
    fit, targets = data.fit_and_targets(split)
    most: dict[str, int] = {}
    for d, name in enumerate(data.info.domains):
        for u in np.unique(targets.user[targets.domain == d]):
            seen = set(fit.item[(fit.user == u) & (fit.domain == d)].tolist())
            pos = set(targets.item[(targets.user == u) & (targets.domain == d)].tolist()) - seen
            if pos:
                never = data.info.domain_size(d) - len(seen) - len(pos)
                most[name] = max(most.get(name, 0), len(pos) + min(k, never))
    return most


def test_sampled_recall_is_one_where_n_reaches_every_users_candidates(tiny: Dataset) -> None:
    """With K sampled negatives a user is ranked among its held-out positives and K unclicked
    items, so sampled Recall@N is 1 for any model once N reaches that many for every user,
    in a domain of any size: at K = 100 on ML-100K sampled_recall@200 was 1 everywhere, and
    the note named only the domains of at most N items, as if the other 1s were earned."""
    table = np.random.default_rng(1).normal(size=(tiny.info.n_users, tiny.info.n_items))
    scorer, ev = TableScorer(table.astype(np.float32), tiny), Evaluator(tiny, 5)
    most = _most_candidates(tiny, "test", 5)
    n = max(most.values())
    res = ev.evaluate(scorer, "test", (3, n), sampled_negatives=5, progress=False)
    assert res.candidates == most
    assert all(size > n for size in res.sizes.values())  # no domain as small as N
    assert all(res.domains[d][f"sampled_recall@{n}"] == 1.0 for d in tiny.info.domains)
    assert all(res.domains[d]["sampled_recall@3"] < 1.0 for d in tiny.info.domains)
    assert res.notes() == [
        "note: sampled Recall@N is 1 for any model where N reaches every user's candidates "
        "(its held-out positives and the sampled unclicked items: all of them are in the top "
        f"N), and the average counts it: sampled_recall@{n} in every domain (no user has more "
        f"than {n} candidates)"
    ]
    assert set(res.to_json()) == {"split", "protocol", "domains", "average", "users"}
    full = ev.evaluate(scorer, "test", (n,), progress=False)
    assert not full.candidates and not full.notes()  # full ranking: no domain of n items


def test_the_notes_count_one_item_or_candidate_in_the_singular() -> None:
    """``Tiny (1 items)``; and a note per N names the domains it reaches."""
    from aftrec.evaluation.evaluate import sampled_saturated_note, saturated_note

    assert saturated_note({"Big": 80, "Tiny": 1}, {5: "recall@5"}).endswith(
        "recall@5 in Tiny (1 item)"
    )
    said = sampled_saturated_note(
        {"Action": 138, "Tiny": 3, "One": 1}, {3: "sampled_recall@3", 200: "sampled_recall@200"}
    )
    assert said.endswith(
        "sampled_recall@3 in Tiny (at most 3 candidates a user), One (at most 1 candidate a "
        "user); sampled_recall@200 in every domain (no user has more than 138 candidates)"
    )


def test_an_average_over_fewer_domains_is_said() -> None:
    """AUC is NaN in a domain where no user has an unclicked item left: its average leaves
    that domain out while recall's counts it, which the table did not say."""
    sizes = {"Books": 120, "Games": 80, "Tiny": 100}
    res = _result(sizes, {"Books": 0.6, "Games": 0.8, "Tiny": math.nan})
    assert res.average["auc"] == pytest.approx(0.7)
    assert res.table().splitlines()[-1] == (
        "note: the average auc leaves out Tiny, where no user has an item left unclicked to "
        "rank against; every other average is over all 3 domains with users"
    )
    assert not _result(sizes, dict.fromkeys(sizes, 0.5)).notes()


def test_a_domain_name_with_surrounding_whitespace_is_quoted_in_the_table() -> None:
    """``'Games '`` was padded into ``Games``, and ``--domains Games`` then refused."""
    res = _result({"Games ": 80, " x": 90, "Books": 100}, {"Games ": 0.5, " x": 0.5, "Books": 0.5})
    rows = res.table().splitlines()[3:6]
    assert [r[: r.index("  ")] for r in rows] == ["'Games '", "' x'", "Books"]
