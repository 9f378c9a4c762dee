"""Full-ranking evaluation per target domain.

For each domain, every user with at least one held-out positive there is ranked against all
of the domain's items, the user's visible positives (train, plus validation when testing)
excluded. Reported per domain, averaged over those users: Recall@N, NDCG@N (see
:mod:`aftrec.evaluation.metrics`) and the exact AUC of the held-out positives against every
item of the domain the user never clicked (in the parts up to ``split``: validation does not
read the test part, so a later test click counts as a negative there).

How the means are formed, since the two kinds of metric cover different users and domains:

* Recall@N and NDCG@N of a domain are means over every user with a held-out positive there,
  and their ``average`` is the unweighted mean over the domains with such users.
* AUC needs an item the user never clicked: a user who clicked every item of the domain has
  none (NaN), so a domain's AUC is the mean over its users who have one, NaN when no user has,
  and the ``average`` AUC is the mean over the domains with an AUC. It can therefore cover
  fewer domains than the other averages; :meth:`EvalResult.notes` names them.

A domain without held-out users has NaN metrics and 0 users; a split without any held-out
positive is an error. In a domain of at most N items every item the user has not seen is in
the top N, so Recall@N is 1 there for any model; the average still counts it (the committed
results are defined so), and :meth:`EvalResult.notes` names those domains. With sampled
negatives a user is ranked among far fewer items (its held-out positives and the K sampled),
so sampled Recall@N is 1 wherever N reaches them, in a domain of any size: the notes then
name the domains where N reaches every user's candidates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from aftrec.arrays import unique
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.errors import DataError
from aftrec.evaluation.metrics import auc, ndcg_at_n, recall_at_n
from aftrec.evaluation.ranking import dense_mask, rank_domain, top_k
from aftrec.models.base import RetrievalModel
from aftrec.outputs import atomic_write_text, shown_name


def full_protocol(split: str) -> str:
    """What a full-ranking result says it measured: the items excluded are the behaviours
    the model may see for ``split`` (:meth:`Dataset.fit_and_targets`)."""
    seen = "training and validation" if split == "test" else "training"
    return f"full ranking over every item of the domain, the user's {seen} positives excluded"


@dataclass
class EvalResult:
    """Full-ranking metrics of one split: per domain (``domains[name]["recall@50"]``), their
    unweighted mean over the domains that have a value (``average``: every domain with users,
    for AUC those with an AUC, see the module's docstring), the users evaluated per domain,
    the protocol in words, the per-(user, domain) values (``per_user``) and the items per
    domain (``sizes``), which say where Recall@N is 1 by construction (:meth:`notes`); with
    sampled negatives, the most candidates a user of each domain was ranked among
    (``candidates``), which say it instead. ``sizes``, ``candidates`` and ``shown_protocol``
    are for the table only: ``metrics.json`` holds none of them."""

    split: str
    ns: tuple[int, ...]
    domains: dict[str, dict[str, float]]
    average: dict[str, float]
    users: dict[str, int]
    protocol: str = ""  # empty: full ranking on ``split`` (:func:`full_protocol`)
    per_user: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)  # a table
    sizes: dict[str, int] = field(default_factory=dict)  # items per domain; empty: unknown
    #: with sampled negatives, per domain with users the most items one user was ranked among
    #: (held-out positives and sampled unclicked items); empty: full ranking, or unknown
    candidates: dict[str, int] = field(default_factory=dict)
    #: the protocol as the table prints it, domain names quoted (:func:`shown_name`), while
    #: ``protocol`` keeps them raw for ``metrics.json``; empty: ``protocol``
    shown_protocol: str = ""

    def __post_init__(self) -> None:
        self.protocol = self.protocol or full_protocol(self.split)

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``: every field but the cut-offs (in the metric names) and the
        per-user frame (written apart)."""
        return {k: getattr(self, k) for k in ("split", "protocol", "domains", "average", "users")}

    def json_text(self) -> str:
        """Standard JSON: a NaN (a domain without users, an AUC without negatives) is
        ``null``, which every JSON reader takes (``NaN`` is Python's extension)."""
        return json.dumps(_nan_to_none(self.to_json()), indent=2, allow_nan=False) + "\n"

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.json_text())

    def notes(self) -> list[str]:
        """What the table's numbers do not say, one ``note:`` line each: the domains where
        Recall@N is 1 for any model (:func:`saturated_note`; with sampled negatives
        :func:`sampled_saturated_note`, as a domain larger than N saturates too when N
        reaches every user's candidates), and the domains an average leaves out while the
        others count them (AUC, where no user has an unclicked item)."""
        with_users = [name for name in self.domains if self.users.get(name)]
        recall = {
            n: key for n in self.ns for key in (f"recall@{n}", f"sampled_recall@{n}")
            if key in self.average
        }  # fmt: skip
        if self.candidates:
            most = {d: self.candidates[d] for d in with_users if d in self.candidates}
            lines = [sampled_saturated_note(most, recall)]
        else:
            sizes = {name: self.sizes[name] for name in with_users if name in self.sizes}
            lines = [saturated_note(sizes, recall)]
        missing = {
            key: [name for name in with_users if math.isnan(self.domains[name][key])]
            for key in self.average
        }
        if any(missing.values()):
            lines.append(
                "; ".join(
                    f"the average {key} leaves out {', '.join(map(shown_name, left))}, "
                    + (
                        "where no user has an item left unclicked to rank against"
                        if key == "auc"
                        else "which have no value"
                    )
                    for key, left in missing.items()
                    if left
                )
                + f"; every other average is over all {len(with_users)} domains with users"
            )
        return [f"note: {line}" for line in lines if line]

    def table(self) -> str:
        """The metrics as a fixed-width table, a row per domain and the average's, followed
        by :meth:`notes`."""
        keys = list(self.average)
        # the average's row is told apart from a domain that happens to be named "average"
        avg = "(average)" if "average" in self.domains else "average"
        rows = [
            *((shown_name(name), row, self.users[name]) for name, row in self.domains.items()),
            (avg, self.average, sum(self.users.values())),
        ]
        width = max(len(n) for n in ["domain", *(r[0] for r in rows)]) + 2
        cols = {k: max(12, len(k) + 1) for k in keys}  # a header never runs into the next
        head = "domain".ljust(width) + "".join(k.rjust(cols[k]) for k in keys) + "users".rjust(9)
        lines = [f"[{self.split}] {self.shown_protocol or self.protocol}", head, "-" * len(head)]
        for name, row, n in rows:
            cells = "".join(f"{row[k]:{cols[k]}.4f}" for k in keys)
            lines.append(name.ljust(width) + cells + str(n).rjust(9))
        return "\n".join([*lines, *self.notes()])


class Evaluator:
    """Holds the history indices of one dataset so repeated evaluations (every epoch) are cheap."""

    def __init__(self, data: Dataset, history_len: int, batch_size: int = 1024) -> None:
        self.data = data
        self.history_len = history_len
        self.batch_size = batch_size
        self._cache: dict[str, tuple[HistoryIndex, HistoryIndex]] = {}

    def indices(self, split: str) -> tuple[HistoryIndex, HistoryIndex]:
        if split not in self._cache:
            fit, targets = self.data.fit_and_targets(split)
            self._cache[split] = (
                HistoryIndex(fit, self.data.info),
                HistoryIndex(targets, self.data.info),
            )
        return self._cache[split]

    def evaluate(
        self,
        model: RetrievalModel,
        split: str = "test",
        ns: Sequence[int] = (20, 50, 200),
        sampled_negatives: int | None = None,
        seed: int = 0,
        progress: bool = True,
        max_users: int | None = None,
        among: np.ndarray | None = None,
    ) -> EvalResult:
        """Full-ranking metrics on ``split``; ``max_users`` evaluates a fixed random sample
        (seeded by ``seed``) of at most that many users per domain, for quick validation on
        large data, drawn among the users ``among`` (sorted) where given."""
        info = self.data.info
        fit, targets = self.indices(split)
        ns = tuple(sorted(set(int(n) for n in ns)))
        rng = torch.Generator().manual_seed(seed)
        target_parts = self.data.fit_and_targets(split)[1]
        domains: dict[str, dict[str, float]] = {}
        users_per_domain: dict[str, int] = {}
        per_user: list[pd.DataFrame] = []
        candidates: dict[str, int] = {}  # sampled: the most items one user is ranked among
        prefix = "" if sampled_negatives is None else "sampled_"
        keys = [f"{prefix}{m}@{n}" for n in ns for m in ("recall", "ndcg")] + ["auc"]
        chosen = []
        for d in range(info.n_domains):
            users = unique(target_parts.user[target_parts.domain == d])
            if among is not None:
                users = users[np.isin(users, among)]
            chosen.append(_sample(users, max_users, seed + d))
        total = sum(len(u) for u in chosen)
        bar = tqdm(
            total=total,
            desc=f"evaluate {split}",
            unit="user",
            disable=None if progress else True,
            leave=False,
        )
        for d, name in enumerate(info.domains):
            users = chosen[d]
            n_d = info.domain_size(d)
            sums: dict[str, list[torch.Tensor]] = {}
            k = max(ns) if sampled_negatives is None else n_d
            for rb in rank_domain(model, info, fit, users, d, k, self.batch_size, self.history_len):
                target = dense_mask(
                    *targets.seen_mask(rb.users, d), (rb.scores.shape[0], rb.scores.shape[1])
                )
                target &= ~rb.seen
                n_pos = target.sum(dim=1)
                never = ~(rb.seen | target)
                if sampled_negatives is None:
                    hits = target.gather(1, rb.top_items)
                else:
                    hits, ranked = _sampled_hits(
                        rb.scores, target, never, sampled_negatives, max(ns), rng
                    )
                    if bool((n_pos > 0).any()):
                        most = int(ranked[n_pos > 0].max())
                        candidates[name] = max(candidates.get(name, 0), most)
                values = {}
                for n in ns:
                    values[f"{prefix}recall@{n}"] = recall_at_n(hits, n_pos.clamp(min=1), n)
                    values[f"{prefix}ndcg@{n}"] = ndcg_at_n(hits, n_pos.clamp(min=1), n)
                values["auc"] = auc(*_positive_scores(rb.scores, target), rb.scores, never)
                valid = n_pos > 0
                for key, v in values.items():
                    sums.setdefault(key, []).append(v[valid])
                per_user.append(
                    pd.DataFrame(
                        {
                            "user_idx": rb.users[valid.numpy()],
                            "domain": name,
                            **{key: v[valid].numpy() for key, v in values.items()},
                        }
                    )
                )
                bar.update(len(rb.users))
            cat = {key: torch.cat(sums[key]) if key in sums else torch.empty(0) for key in keys}
            domains[name] = {key: _nanmean(v) for key, v in cat.items()}  # nan: no users
            users_per_domain[name] = int(cat[keys[0]].numel())
        bar.close()
        if not any(users_per_domain.values()):
            raise DataError(
                f"the {split} part holds no held-out positive in any domain: nothing to rank"
                + (" (prepared with --valid-ratio 0?)" if split == "valid" else "")
            )
        average = {  # over the domains with users
            key: _nanmean(torch.tensor([domains[n][key] for n in domains], dtype=torch.float64))
            for key in keys
        }
        sizes = {name: info.domain_size(d) for d, name in enumerate(info.domains)}
        protocol, shown = (
            (full_protocol(split), "")
            if sampled_negatives is None
            else (
                sampled_protocol(sizes, sampled_negatives),
                sampled_protocol(sizes, sampled_negatives, shown_name),
            )
        )
        frame = pd.concat(per_user, ignore_index=True) if per_user else pd.DataFrame()
        return EvalResult(
            split, ns, domains, average, users_per_domain, protocol, frame, sizes,
            candidates=candidates, shown_protocol=shown,
        )  # fmt: skip


def saturated_note(sizes: Mapping[str, int], columns: Mapping[int, str]) -> str:
    """Where Recall@N is 1 for any model, as one line; empty when nowhere. A domain of at
    most N items holds at most N items the user has not seen, so all of them, every held-out
    positive among them, are in the top N: Recall@N = |T_u| / |T_u| = 1
    (:func:`~aftrec.evaluation.metrics.recall_at_n`), and the unweighted average over
    domains counts that 1 like any other value. (Sampled negatives saturate far sooner:
    :func:`sampled_saturated_note`.)

    ``sizes``: items per domain (the domains to consider, in order); ``columns``: the name of
    Recall@N for each N (``{50: "recall@50"}``)."""
    parts = _saturated_parts(
        sizes,
        columns,
        lambda n: f"the largest has {_count(n, 'item')}",
        lambda n: _count(n, "item"),
    )
    if not parts:
        return ""
    return (
        "Recall@N is 1 for any model in a domain of at most N items (every unseen item is in "
        "the top N), and the average counts it: " + "; ".join(parts)
    )


def sampled_saturated_note(candidates: Mapping[str, int], columns: Mapping[int, str]) -> str:
    """Where sampled Recall@N is 1 for any model, as one line; empty when nowhere. A user is
    ranked among its held-out positives T_u and at most K sampled unclicked items; where N
    is at least that many (at least K + |T_u|, or the domain's unseen items where fewer),
    every positive is in the top N whatever the scores, so sampled Recall@N is 1 in a domain
    where N reaches every user's candidates, however many items the domain holds: at
    K = 100, sampled_recall@200 was 1 in every domain of ML-100K, while a note that named
    only the domains of at most N items implied the others' 1s were earned.

    ``candidates``: per domain (the domains to consider, in order), the most items one of
    its users was ranked among; ``columns``: the name of Recall@N for each N."""
    parts = _saturated_parts(
        candidates,
        columns,
        lambda n: f"no user has more than {_count(n, 'candidate')}",
        lambda n: f"at most {_count(n, 'candidate')} a user",
    )
    if not parts:
        return ""
    return (
        "sampled Recall@N is 1 for any model where N reaches every user's candidates (its "
        "held-out positives and the sampled unclicked items: all of them are in the top N), "
        "and the average counts it: " + "; ".join(parts)
    )


def _saturated_parts(
    counts: Mapping[str, int],
    columns: Mapping[int, str],
    every: Callable[[int], str],
    each: Callable[[int], str],
) -> list[str]:
    """For each N (``columns``) that reaches some domain's count, the domains it reaches:
    ``recall@50 in Tiny (3 items)`` (``each`` says a domain's count), or, where it reaches
    them all, ``recall@50 in every domain (the largest has 12 items)`` (``every`` says the
    largest count)."""
    largest = max(counts.values(), default=0)
    parts = []
    for n, column in sorted(columns.items()):
        small = [name for name, count in counts.items() if count <= n]
        if not small:
            continue
        parts.append(
            f"{column} in "
            + (
                f"every domain ({every(largest)})"
                if len(small) == len(counts)
                else ", ".join(f"{shown_name(name)} ({each(counts[name])})" for name in small)
            )
        )
    return parts


def _count(n: int, noun: str) -> str:
    """``1 item``, ``3 items``, ``1,200 items``."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def sampled_protocol(sizes: dict[str, int], k: int, name: Callable[[str], str] = str) -> str:
    """The protocol line of sampled metrics over domains of ``sizes`` items; a domain of at
    most ``k`` items has no more than ``k`` unclicked ones, so it is fully ranked, and says so.
    ``name`` shows a domain's name: as is for ``metrics.json`` (whose line stays as it was),
    :func:`~aftrec.outputs.shown_name` for the printed table, where a padded name hides its
    spaces."""
    line = (
        f"SAMPLED metrics: each held-out positive ranked among {k} sampled unclicked items per "
        "user, NOT full ranking (AUC is still exact)"
    )
    small = [d for d, n in sizes.items() if n <= k]
    if small:
        line += (
            f"; {', '.join(map(name, small))} ha{'s' if len(small) == 1 else 've'} at most {k} "
            "items, so every unclicked item is ranked there, as in full ranking"
        )
    return line


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def metric_value(value: Any) -> float:
    """A value of ``metrics.json`` as a float: ``null`` is NaN (:meth:`EvalResult.json_text`)."""
    return math.nan if value is None else float(value)


def _sample(users: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    if max_users is None or len(users) <= max_users:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))


def _positive_scores(
    scores: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) scores of each user's held-out positives, P = the most any user has, and mask."""
    p = max(int(target.sum(dim=1).max()), 1) if target.numel() else 1
    top = torch.topk(target.to(torch.int8), p, dim=1)  # positives first
    return scores.gather(1, top.indices), top.values.bool()


def _nanmean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def _sampled_hits(
    scores: torch.Tensor,
    target: torch.Tensor,
    never: torch.Tensor,
    n_neg: int,
    k: int,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits in the top-k of (held-out positives + n_neg uniformly sampled unclicked items),
    and how many candidates each user was ranked among (|T_u| + min(n_neg, unclicked)),
    which says where Recall@N is 1 for any scores (:func:`sampled_saturated_note`)."""
    keys = torch.rand(scores.shape, generator=rng).masked_fill(~never, -1.0)
    picked = torch.topk(keys, min(n_neg, scores.shape[1]), dim=1).indices
    cand = target.clone()
    cand.scatter_(1, picked, True)
    cand &= target | never
    # -inf marks the items outside the candidates only (as in rank_domain)
    lifted = scores.clamp(min=torch.finfo(scores.dtype).min).masked_fill(~cand, float("-inf"))
    top = top_k(lifted, min(k, scores.shape[1]))
    return target.gather(1, top) & cand.gather(1, top), cand.sum(dim=1)
