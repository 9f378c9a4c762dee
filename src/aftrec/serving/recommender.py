"""In-process retrieval from a bundle: ``Recommender.load(BUNDLE).recommend(...)`` (online,
one request at a time; the offline top-N table of a training run, ``aftrec recommend``, is
:mod:`aftrec.evaluation.topn_table`).

One request is one user (section 4.1: the encoder turns the user's behaviours in every domain
into u_t, the target domain's index returns the top N). The user is given as

* a known ``user`` (original id): the behaviours stored in the bundle (train + valid, the
  evaluator's test-time input);
* explicit ``behaviours`` ``{domain: [item ids, oldest first]}``: a new user;
* both: the stored behaviours followed by the given ones (a user whose history moved on since
  the export).

Per target domain the response says which path served it:

* ``history``: the user has behaviours in the target domain;
* ``cross-domain``: none there, but some in other domains; the encoder sees every domain, so
  the target domain is served from the others (the point of AFT, section 5.5.2);
* ``popular``: no behaviours anywhere: the domain's most clicked items (train + valid).

With ``exclude_seen`` the user's behaviours in the target domain (all of them, not only the
last L the encoder reads) are left out, as in evaluation. The index is asked for ``n`` plus
that many items and the seen ones are filtered out, so exact indexes return exactly the
evaluator's top ``n``, ties by position included (:func:`aftrec.serving.index.exact_top_k`).

``trial=True`` answers the recommendation-trial channel of section 5.5.3: the generator's top
items that the main (discriminator's) top-``n`` list does not contain and that the user has not
seen (always excluded: the channel is for new interests). Only bundles of models with a
generator (``trial_vectors``) have it.
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aftrec.arrays import unique
from aftrec.errors import AftrecError, ConfigError
from aftrec.serving.bundle import BundleError, LoadedBundle, load_bundle

log = logging.getLogger(__name__)

MAX_N = 1000
MAX_BEHAVIOURS = 10_000
PATHS = ("history", "cross-domain", "popular")


class RequestError(AftrecError):
    """A request the bundle cannot answer as asked; ``status`` is its HTTP status."""

    status = 422


class UnknownUserError(RequestError):
    status = 404


class NoGeneratorError(RequestError):
    status = 422


@dataclass
class DomainResult:
    domain: str
    path: str  # "history", "cross-domain" or "popular"
    channel: str  # "main" or "trial"
    items: list[str]  # original item ids, best first
    scores: list[float]  # inner products (click counts on the popular path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "path": self.path,
            "channel": self.channel,
            "items": self.items,
            "scores": self.scores,
        }


@dataclass
class Recommendation:
    """One request's answer: the bundle's model version, the user asked for (None for a
    new user given by behaviours), and per domain the items and scores with the path that
    produced them (``history``, ``cross-domain``, ``popular``)."""

    model_version: str
    user: str | None
    results: list[DomainResult]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, search, total
    batch_size: int = 1  # requests computed together with this one (itself included)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "user": self.user,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class Query:
    """One request, as :meth:`Recommender.recommend` takes it (see there)."""

    user: Any = None
    behaviours: Mapping[str, Sequence[Any]] | None = None
    domain: str | None = None
    n: int = 200
    exclude_seen: bool = True
    trial: bool = False


@dataclass
class _Plan:
    """One checked request of a batch, per target domain: its path, the positions it has
    seen, and (once searched) its positions and scores."""

    query: Query
    per_domain: list[np.ndarray]  # global item indices per domain, oldest first
    targets: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    seen: list[np.ndarray] = field(default_factory=list)
    pos: list[Any] = field(default_factory=list)  # (<= n,) positions inside the domain
    scores: list[Any] = field(default_factory=list)
    channel: str = "main"

    def result(self, t: int, rec: Recommender) -> DomainResult:
        d = self.targets[t]
        return DomainResult(
            domain=rec.domains[d],
            path=self.paths[t],
            channel=self.channel,
            items=rec._item_ids[d][self.pos[t]].tolist(),
            scores=np.asarray(self.scores[t], dtype=np.float64).tolist(),
        )


_PENDING: Any = object()  # a batch slot not answered yet


def _next_power_of_two(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _id(value: Any) -> str:
    """Ids are compared as strings, as :class:`aftrec.data.dataset.Dataset` does."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise RequestError(f"ids must be strings or integers, got {value!r}")
    return str(value)


class Recommender:
    """Top-N retrieval from a loaded bundle; safe to call from several threads at once."""

    def __init__(self, bundle: LoadedBundle) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.manifest = m
        self.path = bundle.path
        self.domains: tuple[str, ...] = tuple(m["domains"])
        self.offsets = np.asarray(m["offsets"], dtype=np.int64)
        self.history_len = int(m["encoder"]["history_len"])
        self.encoder_pad = int(m["encoder"]["pad"])
        self.model_version = str(m["model_version"])
        self.has_trial = bundle.trial_encoders is not None
        self._domain_index = {name: d for d, name in enumerate(self.domains)}
        item_ids = bundle.items["item"].astype(str).to_numpy(dtype=object)
        self._item_ids = [
            item_ids[lo:hi] for lo, hi in zip(self.offsets, self.offsets[1:], strict=False)
        ]
        self._item_index = {item: i for i, item in enumerate(item_ids)}
        self._item_domain = np.repeat(np.arange(len(self.domains)), np.diff(self.offsets))
        self._user_index = {u: i for i, u in enumerate(bundle.users.astype(str))}
        pop = bundle.popularity
        self._popular = [
            np.argsort(-pop[lo:hi], kind="stable")[:MAX_N]
            for lo, hi in zip(self.offsets, self.offsets[1:], strict=False)
        ]
        # (channel, domain) -> whether its encoder takes a batch in one call (see warm_up)
        self._batches: dict[tuple[str, int], bool] = {}

        self.warm_up()

    @classmethod
    def load(cls, path: Path | str, verify: bool = True) -> Recommender:
        """The bundle at ``path`` (written by ``aftrec export``), its files checked against
        their hashes unless ``verify`` is False."""
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ConfigError(f"path must be a bundle's folder, got {path!r}")
        if not isinstance(verify, bool):
            raise ConfigError(f"verify must be True or False, got {verify!r}")
        bundle = load_bundle(Path(path), verify=verify)
        try:
            return cls(bundle)
        except AftrecError:
            raise
        except Exception as exc:  # files that load but fail together: refused, not a traceback
            raise BundleError(
                f"{bundle.path}: the bundle fails its warm-up ({type(exc).__name__}: "
                f"{_first_line(exc)})"
            ) from exc

    def warm_up(self, runs: int = 3) -> None:
        """Run every encoder and index a few times: TorchScript optimises a graph on its first
        calls, which would otherwise land on the first requests after a (re)load. Check that
        each encoder answers three different users at once as it answers them one by one; one
        that does not (a bundle exported before encoders took any batch size: the batch size
        was frozen at 1 in the trace) is called once per request."""
        nothing = np.zeros(0, np.int64)
        timings = {"encode": 0.0, "search": 0.0}
        hist, counts = self._probe_input()
        channels = [("main", self.bundle.encoders, self.bundle.indexes)]
        if self.bundle.trial_encoders is not None and self.bundle.trial_indexes is not None:
            channels.append(("trial", self.bundle.trial_encoders, self.bundle.trial_indexes))
        for channel, encoders, indexes in channels:
            for d, (encoder, index) in enumerate(zip(encoders, indexes, strict=True)):
                for _ in range(runs):
                    alone = [
                        self._encode(encoder, hist[i : i + 1], counts[i : i + 1], timings)
                        for i in range(len(hist))
                    ]
                self._batches[(channel, d)] = self._encodes_batches(encoder, hist, counts, alone)
                if not self._batches[(channel, d)]:
                    log.warning(
                        "%s: the %s encoder of domain %r answers one user at a time only; "
                        "serving it one request per call (export the run again to batch)",
                        self.model_version,
                        channel,
                        self.domains[d],
                    )
                q = np.concatenate(alone)
                self._search_many(index, q, [10] * len(q), [nothing] * len(q), timings)

    def _probe_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Three different users as encoder input: no behaviours; the first few items of
        every domain; the last few of every domain."""
        n_dom = len(self.domains)
        firsts, lasts = [], []
        for d in range(n_dom):
            lo, hi = int(self.offsets[d]), int(self.offsets[d + 1])
            firsts.append(np.arange(lo, min(lo + 3, hi), dtype=np.int64))
            lasts.append(np.arange(max(hi - 2, lo), hi, dtype=np.int64))
        rows = [self.encoder_input(p) for p in ([np.zeros(0, np.int64)] * n_dom, firsts, lasts)]
        return torch.cat([h for h, _ in rows]), torch.cat([c for _, c in rows])

    @staticmethod
    def _encodes_batches(
        encoder: Any, hist: torch.Tensor, counts: torch.Tensor, alone: list[np.ndarray]
    ) -> bool:
        try:
            with torch.inference_mode():
                together = encoder(hist, counts).float().numpy()
        except RuntimeError:  # e.g. a shape baked into the trace
            return False
        want = np.concatenate(alone)
        return together.shape == want.shape and bool(
            np.allclose(together, want, rtol=1e-4, atol=1e-5)
        )

    # --- input -----------------------------------------------------------------------------
    def domain_index(self, name: Any) -> int:
        d = self._domain_index.get(name) if isinstance(name, str) else None
        if d is None:
            raise RequestError(f"unknown domain {name!r}; this bundle has {list(self.domains)}")
        return d

    def is_known_user(self, user: Any) -> bool:
        try:
            return _id(user) in self._user_index
        except RequestError:
            return False

    def _behaviours(
        self, user: Any, behaviours: Mapping[str, Sequence[Any]] | None
    ) -> list[np.ndarray]:
        """Global item indices per domain, oldest first: stored, then given."""
        n_dom = len(self.domains)
        per: list[list[np.ndarray]] = [[] for _ in range(n_dom)]
        if user is not None:
            u = self._user_index.get(_id(user))
            if u is None:
                raise UnknownUserError(
                    f"unknown user {user!r}; send `behaviours` to be served as a new user"
                )
            seg = self.bundle.history_seg_start
            for d in range(n_dom):
                per[d].append(
                    self.bundle.history_items[seg[u * n_dom + d] : seg[u * n_dom + d + 1]]
                )
        if behaviours is not None:
            if not isinstance(behaviours, Mapping):
                raise RequestError("behaviours must be an object {domain: [item ids]}")
            total = sum(len(v) if isinstance(v, (list, tuple)) else 0 for v in behaviours.values())
            if total > MAX_BEHAVIOURS:
                raise RequestError(
                    f"too many behaviours: {total} > {MAX_BEHAVIOURS}; send the most recent ones"
                )
            for name, ids in behaviours.items():
                d = self.domain_index(name)
                if not isinstance(ids, (list, tuple)):
                    raise RequestError(f"behaviours[{name!r}] must be a list of item ids")
                keys = [_id(i) for i in ids]
                idx = [self._item_index.get(k, -1) for k in keys]
                unknown = [k for k, i in zip(keys, idx, strict=True) if i < 0]
                if unknown:
                    raise RequestError(
                        f"unknown item id(s) in behaviours[{name!r}]: {unknown[:5]}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                    )
                arr = np.asarray(idx, dtype=np.int64)
                wrong = arr[self._item_domain[arr] != d]
                if len(wrong):
                    k = int(wrong[0])
                    raise RequestError(
                        f"item {self._item_ids_of(k)!r} in behaviours[{name!r}] belongs to "
                        f"domain {self.domains[self._item_domain[k]]!r}"
                    )
                per[d].append(arr)
        return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in per]

    def _item_ids_of(self, k: int) -> str:
        d = int(self._item_domain[k])
        return str(self._item_ids[d][k - self.offsets[d]])

    def encoder_input(self, per_domain: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D, L) history (last L per domain, right-aligned) and (1, D) counts, exactly as
        :func:`aftrec.data.loader.make_batch` builds them for a known user."""
        n_dom, length = len(self.domains), self.history_len
        hist = np.full((1, n_dom, length), self.encoder_pad, dtype=np.int64)
        counts = np.zeros((1, n_dom), dtype=np.int64)
        for d, items in enumerate(per_domain):
            seq = self.bundle.item_input[items]
            seq = seq[seq != self.encoder_pad]  # items the encoder never saw carry no input
            counts[0, d] = len(seq)
            if len(seq) and length:
                tail = seq[-length:]
                hist[0, d, length - len(tail) :] = tail
        return torch.from_numpy(hist), torch.from_numpy(counts)

    # --- retrieval -------------------------------------------------------------------------
    def recommend(
        self,
        user: Any = None,
        behaviours: Mapping[str, Sequence[Any]] | None = None,
        domain: str | None = None,
        n: int = 200,
        exclude_seen: bool = True,
        trial: bool = False,
    ) -> Recommendation:
        """Top ``n`` items of ``domain`` (every domain if None) for one user: a batch of one
        (:meth:`recommend_many`); a request the bundle cannot answer raises
        :class:`RequestError`."""
        query = Query(user, behaviours, domain, n, exclude_seen, trial)
        result = self.recommend_many([query])[0]
        if isinstance(result, RequestError):
            raise result
        return result

    def recommend_many(self, queries: Sequence[Query]) -> list[Recommendation | RequestError]:
        """Answer several requests together, each as :meth:`recommend` would alone.

        Per target domain (and channel) one encoder call takes every request that needs a user
        vector, and one index search per group of similar depth k (``n`` plus the request's
        excluded items) takes every request of the group; each request then keeps its own top
        ``n`` outside its own exclusions. A request the bundle cannot answer gets its
        :class:`RequestError` in its slot and the others are answered; anything else (a bug)
        raises for the whole batch."""
        if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
            raise RequestError(f"queries must be a list of Query, got {type(queries).__name__}")
        t0 = time.perf_counter()
        timings = {"encode": 0.0, "search": 0.0}
        out: list[Recommendation | RequestError] = []
        plans: list[_Plan] = []
        for query in queries:
            try:
                plans.append(self._plan(query))
                out.append(_PENDING)
            except RequestError as exc:
                out.append(exc)
        if plans:
            self._encode_and_search(plans, timings)
        timings["total"] = time.perf_counter() - t0
        it = iter(plans)
        for i, slot in enumerate(out):
            if slot is _PENDING:
                plan = next(it)
                q = plan.query
                out[i] = Recommendation(
                    model_version=self.model_version,
                    user=None if q.user is None else str(q.user),
                    results=[plan.result(t, self) for t in range(len(plan.targets))],
                    timings=dict(timings),
                    batch_size=len(queries),
                )
        return out

    def _plan(self, q: Query) -> _Plan:
        """Check one request and work out, per target domain, its path and exclusions."""
        if not isinstance(q, Query):
            raise RequestError(f"a request must be a Query, got {type(q).__name__}")
        n = q.n
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_N:
            raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        if type(n) is not int:  # NumPy's too: the search does int arithmetic
            q = replace(q, n=int(n))
        for flag in ("exclude_seen", "trial"):  # "no" would be taken as True
            value = getattr(q, flag)
            if not isinstance(value, (bool, np.bool_)):
                raise RequestError(f"{flag} must be True or False, got {value!r}")
        if q.user is None and q.behaviours is None:
            raise RequestError("give a known `user`, explicit `behaviours`, or both")
        if q.trial and not self.has_trial:
            raise NoGeneratorError(
                f"this model ({self.manifest['model']['name']}) has no generator, so no "
                "recommendation-trial channel; trial is served by AFT bundles"
            )
        targets = range(len(self.domains)) if q.domain is None else [self.domain_index(q.domain)]
        per_domain = self._behaviours(q.user, q.behaviours)
        any_history = any(len(p) for p in per_domain)
        plan = _Plan(q, per_domain)
        for d in targets:
            seen = unique(per_domain[d]) - self.offsets[d]  # positions inside d
            path = "history" if len(seen) else ("cross-domain" if any_history else "popular")
            plan.targets.append(d)
            plan.paths.append(path)
            plan.seen.append(seen)
            if path == "popular":
                pos = self._popular[d][:n]
                plan.pos.append(pos)
                plan.scores.append(self.bundle.popularity[self.offsets[d] + pos])
            else:
                plan.pos.append(None)
                plan.scores.append(None)
        return plan

    def _encode_and_search(self, plans: list[_Plan], timings: dict[str, float]) -> None:
        """Fill every plan's positions and scores: the main channel, then (after it, since
        the trial channel leaves out the main list) the trial channel."""
        inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # plan -> (1, D, L), (1, D)

        def rows(jobs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            for p, _ in jobs:
                if p not in inputs:
                    inputs[p] = self.encoder_input(plans[p].per_domain)
            hist = torch.cat([inputs[p][0] for p, _ in jobs])  # (B, D, L)
            counts = torch.cat([inputs[p][1] for p, _ in jobs])  # (B, D)
            return hist, counts

        for channel in ("main", "trial"):
            jobs: dict[int, list[tuple[int, int]]] = {}  # domain -> [(plan, target)]
            for p, plan in enumerate(plans):
                for t, d in enumerate(plan.targets):
                    wanted = plan.query.trial if channel == "trial" else plan.paths[t] != "popular"
                    if wanted:
                        jobs.setdefault(d, []).append((p, t))
            for d, todo in sorted(jobs.items()):
                trial = channel == "trial"
                encoders = self.bundle.trial_encoders if trial else self.bundle.encoders
                indexes = self.bundle.trial_indexes if trial else self.bundle.indexes
                assert encoders is not None and indexes is not None
                hist, counts = rows(todo)
                batches = self._batches[(channel, d)]
                q = self._encode(encoders[d], hist, counts, timings, batches)  # (B, dim)
                excludes = []
                for p, t in todo:
                    plan = plans[p]
                    seen = plan.seen[t]
                    if trial:  # new interests only: never the seen items nor the main list
                        main = plan.pos[t]
                        excludes.append(np.union1d(seen, main))
                    else:
                        excludes.append(seen if plan.query.exclude_seen else seen[:0])
                found = self._search_many(
                    indexes[d], q, [plans[p].query.n for p, _ in todo], excludes, timings
                )
                for (p, t), (scores, pos) in zip(todo, found, strict=True):
                    plans[p].pos[t], plans[p].scores[t] = pos, scores
                    if trial:
                        plans[p].channel = "trial"

    @staticmethod
    def _encode(
        encoder: Any,
        hist: torch.Tensor,
        counts: torch.Tensor,
        timings: dict[str, float],
        batches: bool = True,
    ) -> np.ndarray:
        """(B, dim) query vectors: one call, or one call per row for an encoder that answers
        one user at a time only (a bundle exported before encoders took any batch size)."""
        t = time.perf_counter()
        with torch.inference_mode():
            if batches or len(hist) == 1:
                q = encoder(hist, counts)
            else:
                q = torch.cat(
                    [encoder(hist[i : i + 1], counts[i : i + 1]) for i in range(len(hist))]
                )
            out: np.ndarray = q.float().numpy()
        timings["encode"] += time.perf_counter() - t
        return out

    @staticmethod
    def _search_many(
        index: Any,
        q: np.ndarray,
        ns: list[int],
        excludes: list[np.ndarray],
        timings: dict[str, float],
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query row, its top ``ns[i]`` positions not in ``excludes[i]`` and their scores.

        Rows are searched together in groups of similar depth: k = n + |exclusions| rounded
        up to a power of two (a deeper search returns the same top k first: flat and IVF scan
        the same items whatever k), and one ``search`` per group at the group's k. HNSW's
        search widens with k (efSearch is at least k), so its groups are of equal k: a row
        gets exactly the answer it would get alone."""
        t = time.perf_counter()
        size = index.size
        want = [min(n + len(ex), size) for n, ex in zip(ns, excludes, strict=True)]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(want):
            key = k if index.kind == "hnsw" else min(_next_power_of_two(k), size)
            groups.setdefault(key, []).append(i)
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(want)
        for k, members in groups.items():
            scores, pos = index.search(q[members], k)  # (b, k)
            for row, i in enumerate(members):
                s, p = scores[row], pos[row]
                keep = p >= 0
                if len(excludes[i]):
                    keep &= ~np.isin(p, excludes[i], assume_unique=False)
                out[i] = (s[keep][: ns[i]], p[keep][: ns[i]])
        timings["search"] += time.perf_counter() - t
        return out
