"""Synthetic multi-domain interaction logs with planted, checkable structure.

The embedded default dataset for tests and the generator for scale benchmarks (10^8
interactions, 10^6 users). Users are generated in fixed internal blocks of
:data:`BLOCK_USERS`, each with its own random stream, so memory stays bounded by one block plus
the output, and the output does not depend on ``chunk_users``.

Planted structure
-----------------
Let ``K = n_topics``, ``D = n_domains``, ``M = items_per_domain``, ``a = taste_concentration``
and ``w = domain_specific``.

Items
    Domain ``d`` owns the global item ids ``d*M .. d*M + M - 1`` (ids are unique across
    domains). A random permutation of a domain's items is cut into ``K`` near-equal topics; the
    position inside its topic is the item's popularity rank ``r = 1, 2, ...``, and within a topic
    item ``r`` is drawn with probability proportional to ``r ** -popularity_skew`` (Zipf).
    :func:`catalogue` returns the topic and rank of every item (the ground truth).

Taste
    User ``u`` has a shared taste ``theta_u ~ Dirichlet(a * 1_K)``, the same in every domain, and
    per domain a private part ``phi_ud ~ Dirichlet(a * 1_K)``. In domain ``d`` the user draws
    topics from ``(1 - w) * theta_u + w * phi_ud``. With ``w < 1`` a user's topics in one domain
    predict their topics in another (what multi-domain models exploit); ``w = 1`` makes domains
    independent. Smaller ``a`` means more peaked tastes.

Domain propensity
    Each user is active in each domain with probability ``domain_presence`` (at least one domain
    is kept), and splits activity over their active domains with ``Dirichlet(1)`` weights, so
    many users are absent from, or sparse in, some domains.

Activity
    User ``u`` asks for ``n_u = 5 + e_u`` interactions, where ``e_u`` shares the
    ``n_interactions - 5 * n_users`` extra interactions in proportion to a lognormal weight
    (``sigma = activity_sigma``), rounded so that the requested total is exactly
    ``n_interactions``.

Sampling
    Each interaction draws a domain from the user's propensity, a topic from their taste in that
    domain, then an item of that (domain, topic) by its Zipf weight, independently of the other
    draws. A user's items are the first ``n_u`` *distinct* items of this stream (sequential
    weighted sampling without replacement): ``n_u`` plus 25% is drawn, then up to three more
    rounds for users still short. A user whose reachable items run out (a peaked taste in a
    small domain) keeps fewer, so the total is at most, and usually a little below (about 2-3%
    in the default config), ``n_interactions``; every user still gets at least 5 (a last resort
    adds 5 consecutive items of the user's main domain). No ``(user, item)`` pair repeats.

Time
    User ``u`` is active in a window covering a uniform ``10%..100%`` of
    ``[start_time, start_time + span_seconds)`` at a random place; their timestamps are integer
    seconds inside it, distinct per user (when the window has room), in random order with
    respect to items (no sequential signal is planted).

Output
    :func:`generate` returns a :class:`RawLog` whose interactions have ``user``, ``item``,
    ``timestamp`` (all int64) and ``domain`` (categorical over ``"d0", "d1", ...``), sorted by
    user then timestamp; the catalogue has ``item`` (int64) and ``domain`` (str) for all
    ``D * M`` items, some of which may have no interactions.

Randomness
    All streams derive from ``SeedSequence(seed)``: one for activity, one for the catalogue and
    one per block of :data:`BLOCK_USERS` users (``spawn_key=(2, block)``), each driving a
    ``Generator(PCG64)``. The same config gives the same log, whatever ``chunk_users`` is, and
    sorts never depend on how ties are broken.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from aftrec.arrays import unique
from aftrec.data.schema import Origin, RawLog
from aftrec.errors import ConfigError, require_numbers

BLOCK_USERS = 8192  # users per internal random stream; fixed so output ignores chunk_users
MIN_INTERACTIONS = 5  # every user gets at least this many interactions

# Spawn keys of the independent random streams, all children of SeedSequence(seed).
_STREAM_ACTIVITY = 0
_STREAM_CATALOGUE = 1
_STREAM_BLOCK = 2

_OVERSAMPLE = 0.25  # extra draws, as a fraction of the request, before de-duplication
_REPAIR_ROUNDS = 3  # further draws for users still short of their request


INT32_MAX = 2**31 - 1
#: more interactions than any machine holds; above it numpy's sizes overflow before memory runs out
INT64_ROWS = 2**40


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic log; see the module docstring for the model."""

    n_users: int = 2000
    n_domains: int = 3
    items_per_domain: int = 500  # same count in every domain
    n_interactions: int = 60_000  # requested total; de-duplication may leave a little less
    n_topics: int = 16  # latent clusters shared across domains
    taste_concentration: float = 0.1  # Dirichlet parameter of tastes: smaller is more peaked
    domain_specific: float = 0.3  # weight of the per-domain part of the taste, in [0, 1]
    popularity_skew: float = 1.0  # Zipf exponent of item popularity within a topic
    domain_presence: float = 0.7  # chance a user is active in a given domain
    activity_sigma: float = 1.0  # sigma of the lognormal activity weight (heavy tail)
    start_time: int = 1_600_000_000
    span_seconds: int = 365 * 86400
    seed: int = 0

    def __post_init__(self) -> None:
        require_numbers(self, "SyntheticConfig: ")
        checks: list[tuple[bool, str]] = [
            (self.n_users >= 1, "n_users must be >= 1"),
            (self.n_domains >= 1, "n_domains must be >= 1"),
            (self.n_topics >= 1, "n_topics must be >= 1"),
            (
                self.items_per_domain >= max(self.n_topics, MIN_INTERACTIONS),
                f"items_per_domain must be >= max(n_topics, {MIN_INTERACTIONS})",
            ),
            (
                self.n_interactions >= MIN_INTERACTIONS * self.n_users,
                f"n_interactions must be >= {MIN_INTERACTIONS} * n_users "
                f"(= {MIN_INTERACTIONS * self.n_users}): every user gets at least "
                f"{MIN_INTERACTIONS}",
            ),
            (self.taste_concentration > 0, "taste_concentration must be > 0"),
            (0.0 <= self.domain_specific <= 1.0, "domain_specific must be in [0, 1]"),
            (self.popularity_skew >= 0, "popularity_skew must be >= 0"),
            (0.0 < self.domain_presence <= 1.0, "domain_presence must be in (0, 1]"),
            (self.activity_sigma >= 0, "activity_sigma must be >= 0"),
            (self.span_seconds >= 1, "span_seconds must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
            # prepared datasets number users and items in int32
            (self.n_users <= INT32_MAX, f"n_users must be <= {INT32_MAX}"),
            (
                self.n_domains * self.items_per_domain <= INT32_MAX,
                f"n_domains * items_per_domain (the items) must be <= {INT32_MAX}",
            ),
            (self.n_interactions <= INT64_ROWS, f"n_interactions must be <= {INT64_ROWS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SyntheticConfig: {message}")

    @property
    def domains(self) -> list[str]:
        return [f"d{d}" for d in range(self.n_domains)]

    @property
    def n_items(self) -> int:
        return self.n_domains * self.items_per_domain


def _rng(cfg: SyntheticConfig, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=key)))


# ---------------------------------------------------------------------------------------------
# Catalogue and activity (global, O(n_items) and O(n_users) memory)


@dataclass(frozen=True)
class _Catalogue:
    topic: np.ndarray  # (n_items,) topic of each item
    rank: np.ndarray  # (n_items,) 1-based popularity rank inside its topic
    group_items: np.ndarray  # (n_items,) item ids ordered by group g = d*K + t, then by rank
    group_start: np.ndarray  # (D*K + 1,) offset of each group in group_items
    group_size: np.ndarray  # (D*K,) items per group
    zipf_cdf: dict[int, np.ndarray]  # group size -> Zipf CDF over ranks (at most two sizes)


def _build_catalogue(cfg: SyntheticConfig) -> _Catalogue:
    rng = _rng(cfg, _STREAM_CATALOGUE)
    m, k = cfg.items_per_domain, cfg.n_topics
    sizes = np.full(k, m // k, dtype=np.int64)
    sizes[: m % k] += 1  # (K,) items per topic, identical in every domain
    topic_of_pos = np.repeat(np.arange(k), sizes)  # (M,)
    rank_of_pos = np.arange(m) - np.repeat(np.cumsum(sizes) - sizes, sizes) + 1  # (M,)
    zipf_cdf = {}
    for size in unique(sizes).tolist():
        w = np.arange(1, size + 1, dtype=np.float64) ** -cfg.popularity_skew
        zipf_cdf[size] = np.cumsum(w) / w.sum()
    topic = np.empty(cfg.n_items, dtype=np.int64)
    rank = np.empty(cfg.n_items, dtype=np.int64)
    group_items = np.empty(cfg.n_items, dtype=np.int64)
    for d in range(cfg.n_domains):
        perm = rng.permutation(m) + d * m  # position p of the permutation -> item id
        topic[perm] = topic_of_pos
        rank[perm] = rank_of_pos
        group_items[d * m : (d + 1) * m] = perm  # positions are ordered by (topic, rank)
    group_size = np.tile(sizes, cfg.n_domains)
    group_start = np.concatenate([[0], np.cumsum(group_size)])
    return _Catalogue(topic, rank, group_items, group_start, group_size, zipf_cdf)


def _requests(cfg: SyntheticConfig) -> np.ndarray:
    """Requested interactions per user, (n_users,) int64, summing to ``n_interactions``."""
    rng = _rng(cfg, _STREAM_ACTIVITY)
    weight = rng.lognormal(0.0, cfg.activity_sigma, cfg.n_users)
    extra = cfg.n_interactions - MIN_INTERACTIONS * cfg.n_users
    # Cumulative rounding: exact total, each share within one of its proportional value.
    cum = np.floor(np.cumsum(weight) * (extra / weight.sum()) + 0.5).astype(np.int64)
    cum[-1] = extra
    share = np.diff(cum, prepend=0)
    return MIN_INTERACTIONS + share


def catalogue(cfg: SyntheticConfig) -> pd.DataFrame:
    """The planted item structure: ``item``, ``domain``, ``topic``, ``popularity_rank`` (1 is the
    most popular item of its topic), one row per item, ordered by item id."""
    cat = _build_catalogue(cfg)
    return pd.DataFrame(
        {
            "item": np.arange(cfg.n_items, dtype=np.int64),
            "domain": _domain_names(cfg),
            "topic": cat.topic,
            "popularity_rank": cat.rank,
        }
    )


def _domain_names(cfg: SyntheticConfig) -> pd.Series:
    codes = np.repeat(np.arange(cfg.n_domains), cfg.items_per_domain)
    names = np.asarray(cfg.domains, dtype=object)[codes]
    return pd.Series(names, dtype=str)


# ---------------------------------------------------------------------------------------------
# One block of users (vectorised; no loop over users or interactions)


def _inverse_cdf(offset_cdf: np.ndarray, row: np.ndarray, u: np.ndarray, width: int) -> np.ndarray:
    """Sample a column per query from row-wise CDFs stored flat as ``row + cdf`` (all rows of
    ``width`` columns): one ``searchsorted`` serves every row at once."""
    idx = np.searchsorted(offset_cdf, row + u, side="right") - row * width
    return np.minimum(idx, width - 1)  # row + u may round up to row + 1


class _Block:
    """Random user parameters of one block of users and the sampler of their items."""

    def __init__(self, cfg: SyntheticConfig, cat: _Catalogue, block: int, request: np.ndarray):
        self.cfg, self.cat, self.request = cfg, cat, request
        self.rng = rng = _rng(cfg, _STREAM_BLOCK, block)
        b, d, k = len(request), cfg.n_domains, cfg.n_topics

        # Domain propensity: presence mask, then Dirichlet(1) weights over present domains.
        present = rng.random((b, d)) < cfg.domain_presence  # (B, D)
        none = ~present.any(axis=1)
        present[np.flatnonzero(none), rng.integers(0, d, int(none.sum()))] = True
        dom_w = rng.standard_exponential((b, d)) * present  # (B, D)
        dom_w /= dom_w.sum(axis=1, keepdims=True)
        self.main_domain = dom_w.argmax(axis=1)  # (B,)

        # Taste: shared Dirichlet part plus a per-domain Dirichlet part.
        a = cfg.taste_concentration
        shared = _dirichlet(rng, a, (b, 1, k))  # (B, 1, K)
        private = _dirichlet(rng, a, (b, d, k))  # (B, D, K)
        taste = (1.0 - cfg.domain_specific) * shared + cfg.domain_specific * private

        # Joint law of (domain, topic) per user, cells ordered g = d*K + t.
        cell_cdf = np.cumsum((dom_w[:, :, None] * taste).reshape(b, d * k), axis=1)  # (B, D*K)
        cell_cdf /= cell_cdf[:, -1:]
        self.cell_cdf = (cell_cdf + np.arange(b)[:, None]).ravel()  # (B*D*K,)

    def draw(self, owner: np.ndarray) -> np.ndarray:
        """One item per entry of ``owner`` (block-local user): (domain, topic), then rank."""
        cat, rng = self.cat, self.rng
        u = rng.random((2, len(owner)))
        group = _inverse_cdf(self.cell_cdf, owner, u[0], self.cfg.n_domains * self.cfg.n_topics)
        size = cat.group_size[group]
        rank = np.empty(len(owner), dtype=np.int64)  # 0-based
        for s, cdf in cat.zipf_cdf.items():  # at most two sizes; small CDFs stay in cache
            hit = slice(None) if len(cat.zipf_cdf) == 1 else size == s
            rank[hit] = np.searchsorted(cdf, u[1][hit], side="right")
        rank = np.minimum(rank, size - 1)  # the CDF's last value may round below 1
        return cat.group_items[cat.group_start[group] + rank]

    def interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct ``(owner, item)`` pairs, at most ``request`` per user, each user's rows in
        the order they were drawn."""
        cfg, rng, request = self.cfg, self.rng, self.request
        b = len(request)
        n_draw = request + np.ceil(_OVERSAMPLE * request).astype(np.int64)
        owner = np.repeat(np.arange(b), n_draw)
        owner, item = _first_distinct(owner, self.draw(owner), request, cfg.n_items, True)

        for _ in range(_REPAIR_ROUNDS):  # more draws, only for the users still short
            short = request - np.bincount(owner, minlength=b)  # (B,)
            if not short.any():
                break
            extra = np.repeat(np.arange(b), 2 * short + 4 * (short > 0))
            owner, item = _redo(owner, item, short > 0, extra, self.draw(extra), request, cfg)

        # Last resort for the floor: 5 consecutive items of the user's main domain.
        few = np.bincount(owner, minlength=b) < MIN_INTERACTIONS  # (B,)
        if few.any():
            m = cfg.items_per_domain
            who = np.flatnonzero(few)
            start = rng.integers(0, m, len(who))
            local = (start[:, None] + np.arange(MIN_INTERACTIONS)) % m  # (F, 5)
            extra_item = (self.main_domain[who, None] * m + local).ravel()
            extra = np.repeat(who, MIN_INTERACTIONS)
            owner, item = _redo(owner, item, few, extra, extra_item, request, cfg)
        return owner, item

    def timestamps(self, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A permutation sorting the rows by (owner, time) and the sorted times (seconds from
        ``start_time``), distinct per user when the user's window has room."""
        cfg, rng = self.cfg, self.rng
        b, span = len(self.request), cfg.span_seconds
        n = np.bincount(owner, minlength=b)  # (B,)
        length = np.round(span * rng.uniform(0.1, 1.0, b)).astype(np.int64)
        window = np.clip(length, np.minimum(n, span), span)  # room for n distinct seconds
        begin = np.floor(rng.random(b) * (span - window + 1)).astype(np.int64)
        room = np.maximum(window - n + 1, 1)  # (B,)
        raw = np.floor(rng.random(len(owner)) * room[owner]).astype(np.int64)
        order = np.argsort(owner * (span + 1) + raw, kind="stable")
        owner_sorted = owner[order]
        rank = np.arange(len(owner)) - (np.cumsum(n) - n)[owner_sorted]
        # Non-decreasing draws from [0, room) plus the rank: strictly increasing in [0, window).
        t = np.minimum(raw[order] + rank, window[owner_sorted] - 1)
        return order, t + begin[owner_sorted]


def _dirichlet(rng: np.random.Generator, a: float, shape: tuple[int, ...]) -> np.ndarray:
    g = rng.standard_gamma(a, shape)
    total = g.sum(axis=-1, keepdims=True)
    dead = np.flatnonzero(total <= 0)  # tiny concentrations can underflow to all zeros
    if len(dead):
        flat = g.reshape(-1, shape[-1])
        flat[dead] = 0.0
        flat[dead, rng.integers(0, shape[-1], len(dead))] = 1.0  # one random topic
        total = g.sum(axis=-1, keepdims=True)
    return g / total


def _first_distinct(
    owner: np.ndarray, item: np.ndarray, quota: np.ndarray, n_items: int, grouped: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per owner and in stream order, the first ``quota[owner]`` distinct items.

    The result is grouped by owner with stream order kept inside; ``grouped`` says the input
    already is. Only unstable sorts on unique keys, so the result does not depend on how the
    platform's sort breaks ties.
    """
    n = len(owner)
    if not grouped:
        order = np.argsort(owner * n + np.arange(n))  # unique keys: a stable sort by owner
        owner, item = owner[order], item[order]
    key = owner * n_items + item
    by_key = np.argsort(key)
    sorted_key = key[by_key]
    starts = np.flatnonzero(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]]))
    first = np.zeros(n, dtype=bool)
    first[np.minimum.reduceat(by_key, starts)] = True  # earliest row of each distinct pair
    seen = np.cumsum(first)  # distinct pairs so far, running over all owners
    counts = np.bincount(owner, minlength=len(quota))
    before = np.concatenate([[0], seen])[np.cumsum(counts) - counts]  # (B,) seen before owner
    keep = first & (seen - before[owner] <= quota[owner])
    return owner[keep], item[keep]


def _redo(
    owner: np.ndarray,
    item: np.ndarray,
    users: np.ndarray,
    extra_owner: np.ndarray,
    extra_item: np.ndarray,
    quota: np.ndarray,
    cfg: SyntheticConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Append ``extra`` draws after the rows of the flagged ``users`` and redo their selection;
    other users' rows are left as they are (rows stay grouped per user, not across users)."""
    mine = users[owner]
    o, i = _first_distinct(
        np.concatenate([owner[mine], extra_owner]),
        np.concatenate([item[mine], extra_item]),
        quota,
        cfg.n_items,
        False,
    )
    return np.concatenate([owner[~mine], o]), np.concatenate([item[~mine], i])


# ---------------------------------------------------------------------------------------------
# Public API


def _iter_blocks(cfg: SyntheticConfig) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield ``(user, item, timestamp, domain_code)`` arrays block by block, in user order."""
    cat = _build_catalogue(cfg)
    request = _requests(cfg)
    code_dtype = np.int8 if cfg.n_domains <= np.iinfo(np.int8).max else np.int32
    for block, lo in enumerate(range(0, cfg.n_users, BLOCK_USERS)):
        gen = _Block(cfg, cat, block, request[lo : lo + BLOCK_USERS])
        owner, item = gen.interactions()
        order, t = gen.timestamps(owner)
        item = item[order]
        yield (
            owner[order] + lo,
            item,
            t + cfg.start_time,
            (item // cfg.items_per_domain).astype(code_dtype),
        )


def _frame(cfg: SyntheticConfig, arrays: tuple[np.ndarray, ...]) -> pd.DataFrame:
    user, item, timestamp, domain = arrays
    return pd.DataFrame(
        {
            "user": user,
            "item": item,
            "timestamp": timestamp,
            "domain": pd.Categorical.from_codes(domain, categories=pd.Index(cfg.domains)),
        },
        copy=False,  # the arrays are fresh; copying would double peak memory
    )


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def iter_chunks(cfg: SyntheticConfig, chunk_users: int = 50_000) -> Iterator[pd.DataFrame]:
    """Stream the interactions of :func:`generate`, ``chunk_users`` users per frame.

    Frame ``c`` holds users ``c * chunk_users`` to ``(c + 1) * chunk_users - 1`` (columns and
    order as in :func:`generate`); the frames concatenated equal ``generate(cfg).interactions``
    whatever ``chunk_users`` is. Memory: one frame plus one block of :data:`BLOCK_USERS` users.
    """
    if chunk_users < 1:
        raise ConfigError(f"chunk_users must be >= 1, got {chunk_users}")
    pending: list[tuple[np.ndarray, ...]] = []
    limit = chunk_users  # first user of the next frame
    for arrays in _iter_blocks(cfg):
        pending.append(arrays)
        while pending and pending[-1][0][-1] >= limit:  # the buffer holds all of this frame
            head, rest = [], []
            for part in pending:
                cut = int(np.searchsorted(part[0], limit))
                head.append(tuple(a[:cut] for a in part))
                if cut < len(part[0]):
                    rest.append(tuple(a[cut:] for a in part))
            yield _frame(cfg, _concat(head))
            pending, limit = rest, limit + chunk_users
    if pending:
        yield _frame(cfg, _concat(pending))


def generate(cfg: SyntheticConfig, chunk_users: int = 50_000) -> RawLog:
    """Generate the whole log in memory (see the module docstring for what is planted).

    The output never depends on ``chunk_users``; it is accepted for symmetry with
    :func:`iter_chunks`. Blocks are written straight into preallocated columns of
    ``n_interactions`` rows, so peak memory is about the output plus one block.
    """
    if chunk_users < 1:
        raise ConfigError(f"chunk_users must be >= 1, got {chunk_users}")
    cols: tuple[np.ndarray, ...] | None = None
    n = 0
    for arrays in _iter_blocks(cfg):
        if cols is None:  # every user gets at most its request: n_interactions rows suffice
            cols = tuple(np.empty(cfg.n_interactions, dtype=a.dtype) for a in arrays)
        for col, a in zip(cols, arrays, strict=True):
            col[n : n + len(a)] = a
        n += len(arrays[0])
    assert cols is not None  # n_users >= 1
    interactions = _frame(cfg, tuple(col[:n] for col in cols))
    items = pd.DataFrame(
        {"item": np.arange(cfg.n_items, dtype=np.int64), "domain": _domain_names(cfg)}
    )
    return RawLog(
        interactions=interactions,
        items=items,
        interactions_origin=Origin("synthetic"),
        items_origin=Origin("synthetic"),
        domains=cfg.domains,
    )
