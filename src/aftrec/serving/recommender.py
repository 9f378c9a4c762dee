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
evaluator's top ``n``.

``trial=True`` answers the recommendation-trial channel of section 5.5.3: the generator's top
items that the main (discriminator's) top-``n`` list does not contain and that the user has not
seen (always excluded: the channel is for new interests). Only bundles of models with a
generator (``trial_vectors``) have it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aftrec.arrays import unique
from aftrec.errors import AftrecError
from aftrec.serving.bundle import LoadedBundle, load_bundle

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
    model_version: str
    user: str | None
    results: list[DomainResult]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, search, total

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "user": self.user,
            "results": [r.to_dict() for r in self.results],
        }


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

        self.warm_up()

    @classmethod
    def load(cls, path: Path | str, verify: bool = True) -> Recommender:
        return cls(load_bundle(Path(path), verify=verify))

    def warm_up(self, runs: int = 3) -> None:
        """Run every encoder and index a few times: TorchScript optimises a graph on its first
        calls, which would otherwise land on the first requests after a (re)load."""
        empty = [np.zeros(0, np.int64)] * len(self.domains)
        hist, counts = self.encoder_input(empty)
        timings = {"encode": 0.0, "search": 0.0}
        pairs = list(zip(self.bundle.encoders, self.bundle.indexes, strict=True))
        if self.bundle.trial_encoders is not None and self.bundle.trial_indexes is not None:
            pairs += list(zip(self.bundle.trial_encoders, self.bundle.trial_indexes, strict=True))
        for encoder, index in pairs:
            for _ in range(runs):
                q = self._encode(encoder, hist, counts, timings)
            self._search(index, q, 10, empty[0], timings)

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
        """Top ``n`` items of ``domain`` (every domain if None) for one user."""
        t0 = time.perf_counter()
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        if user is None and behaviours is None:
            raise RequestError("give a known `user`, explicit `behaviours`, or both")
        if trial and not self.has_trial:
            raise NoGeneratorError(
                f"this model ({self.manifest['model']['name']}) has no generator, so no "
                "recommendation-trial channel; trial is served by AFT bundles"
            )
        targets = range(len(self.domains)) if domain is None else [self.domain_index(domain)]
        per_domain = self._behaviours(user, behaviours)
        timings = {"encode": 0.0, "search": 0.0}
        hist = counts = None
        any_history = any(len(p) for p in per_domain)
        results = []
        for d in targets:
            seen = unique(per_domain[d]) - self.offsets[d]  # positions inside d
            path = "history" if len(seen) else ("cross-domain" if any_history else "popular")
            if path == "popular":
                pos = self._popular[d][:n]
                scores = self.bundle.popularity[self.offsets[d] + pos]
            else:
                if hist is None:
                    hist, counts = self.encoder_input(per_domain)
                q = self._encode(self.bundle.encoders[d], hist, counts, timings)
                excl = seen if exclude_seen else seen[:0]
                scores, pos = self._search(self.bundle.indexes[d], q, n, excl, timings)
            if trial:
                assert self.bundle.trial_encoders is not None
                assert self.bundle.trial_indexes is not None
                if hist is None:
                    hist, counts = self.encoder_input(per_domain)
                q = self._encode(self.bundle.trial_encoders[d], hist, counts, timings)
                excl = np.union1d(seen, pos)
                scores, pos = self._search(self.bundle.trial_indexes[d], q, n, excl, timings)
            results.append(
                DomainResult(
                    domain=self.domains[d],
                    path=path,
                    channel="trial" if trial else "main",
                    items=self._item_ids[d][pos].tolist(),
                    scores=np.asarray(scores, dtype=np.float64).tolist(),
                )
            )
        timings["total"] = time.perf_counter() - t0
        return Recommendation(
            model_version=self.model_version,
            user=None if user is None else str(user),
            results=results,
            timings=timings,
        )

    @staticmethod
    def _encode(encoder: Any, hist: Any, counts: Any, timings: dict[str, float]) -> np.ndarray:
        t = time.perf_counter()
        with torch.inference_mode():
            q: np.ndarray = encoder(hist, counts).float().numpy()  # (1, dim)
        timings["encode"] += time.perf_counter() - t
        return q

    @staticmethod
    def _search(
        index: Any, q: np.ndarray, n: int, exclude: np.ndarray, timings: dict[str, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` positions not in ``exclude`` (sorted), and their scores."""
        t = time.perf_counter()
        k = min(n + len(exclude), index.size)
        scores, pos = index.search(q, k)
        scores, pos = scores[0], pos[0]
        keep = pos >= 0
        if len(exclude):
            keep &= ~np.isin(pos, exclude, assume_unique=False)
        pos, scores = pos[keep][:n], scores[keep][:n]
        timings["search"] += time.perf_counter() - t
        return scores, pos
