"""Nearest-neighbour search over one domain's item vectors, exact or approximate, one protocol.

The paper serves AFT from "a fast nearest neighbor retrieval tool like FAISS" (section 4.1):
the user vector u_t of the target domain against that domain's item vectors, top N = 200. Every
index here answers :meth:`ItemIndex.search` for a (B, dim) float32 query block with (B, k)
inner-product scores and positions inside the domain (``-1`` where fewer than ``k`` came back):

* :class:`ExactIndex`: numpy brute force, no FAISS; the oracle that approximate search is
  measured against (torchrec's retrieval example keeps a brute-force path for the same reason);
* :class:`FaissIndex` around one of three FAISS indexes, all with inner-product metric:
  ``flat`` (``IndexFlatIP``, exact), ``ivf`` (``IndexIVFFlat``: k-means cells, ``nprobe`` of
  them scanned per query) and ``hnsw`` (``IndexHNSWFlat``, graph search, ``efSearch``).

Which one a domain gets is :class:`IndexSpec`'s business: ``auto`` picks ``flat`` up to
``exact_max`` items and ``ivf`` above. ``ivf`` is the default approximate index rather than
HNSW because inner-product search is not a metric search: on clustered embeddings whose
norms vary (the shape trained item embeddings have), HNSW with ``METRIC_INNER_PRODUCT`` stayed
below 0.85 recall@200 at efSearch 500 while IVF reached 0.97 in a third of the time
(docs/serving.md). The search-time knob (``nprobe`` / ``efSearch``) is tuned at export on real
user vectors: the smallest value whose recall@200 against :class:`ExactIndex` reaches
``target_recall``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from aftrec.errors import ConfigError

KINDS = ("auto", "flat", "ivf", "hnsw")


def faiss_module() -> Any:
    """The ``faiss`` module, or a clear error when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "serving needs FAISS: pip install 'aftrec[serve]' (or pip install faiss-cpu)"
        ) from exc
    return faiss


class ItemIndex(Protocol):
    """Top-k inner-product search over the ``size`` item vectors of one domain."""

    kind: str

    @property
    def size(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, dim) float32 queries -> (B, k) scores (float32) and positions (int64, best
        first; position -1 and score -inf where the index returned fewer than ``k``)."""
        ...


class ExactIndex:
    """Brute-force inner products with numpy: exact, and independent of FAISS."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (B, dim)
        top, pos = exact_top_k(q @ self.vectors.T, min(k, self.size))
        return _pad(top, pos, k)


def exact_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) scores -> their top ``k`` (B, k) scores and positions, best first, ties by the
    lower position, at the cut too: of the items tied with the k-th score, the lowest
    positions are in (the order of ``torch.topk`` in the evaluator, and of a sort)."""
    b, n = scores.shape
    if k <= 0 or n == 0:
        return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a NaN score ranks last
    kth = np.partition(scores, n - k, axis=1)[:, n - k : n - k + 1]  # (B, 1) the k-th best
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(axis=1, keepdims=True)  # tied items that fit, lowest positions first
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    part = np.nonzero(chosen)[1].reshape(b, k)  # (B, k) positions, ascending
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)  # by score, ties by position
    pos = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return np.take_along_axis(part_scores, order, axis=1).astype(np.float32), pos


#: extra results a flat search asks for, to see past the items tied with the k-th score
TIE_MARGIN = 8


class FaissIndex:
    """A FAISS inner-product index whose ids are the positions inside the domain.

    What it returns is what :class:`ExactIndex` returns for a flat index, ties included
    (FAISS orders tied scores as its heap leaves them; the items tied at the cut are then
    settled by position, from a search ``TIE_MARGIN`` deeper or, past that, exactly). An
    approximate index that returns fewer than ``k`` items (IVF cells or an HNSW walk holding
    fewer, as for a ``k`` near the domain's size) is answered exactly for those rows, so a
    list is never shorter than the domain allows."""

    def __init__(self, index: Any, kind: str) -> None:
        self.index = index
        self.kind = kind
        self._vectors: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, exact_fallback: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`ItemIndex.search`; ``exact_fallback=False``: the index's own answer, short
        rows and all (what the tuning of the search knob measures)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, kk = self.size, min(k, self.size)
        if kk == 0:
            return _pad(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), k)
        deeper = min(kk + TIE_MARGIN, n) if self.kind == "flat" else kk
        scores, pos = self.index.search(q, deeper)  # (B, deeper); FAISS pads with -1 itself
        scores = np.where(pos < 0, -np.inf, scores).astype(np.float32)
        pos = pos.astype(np.int64)
        if self.kind == "flat":
            # ties beyond the deeper search's last item: those rows exactly
            redo = (scores[:, -1] == scores[:, kk - 1]) if deeper < n else np.zeros(len(q), bool)
        else:
            redo = pos[:, kk - 1] < 0  # fewer than kk came back
        # by score, ties by position (what came back; -1 padding scores -inf, so it stays last)
        order = np.lexsort((np.where(pos < 0, n, pos), -scores), axis=1)[:, :kk]
        scores = np.take_along_axis(scores, order, axis=1)
        pos = np.take_along_axis(pos, order, axis=1)
        if exact_fallback and redo.any():
            exact_scores, exact_pos = exact_top_k(q[redo] @ self.vectors().T, kk)
            scores, pos = scores.copy(), pos.copy()
            scores[redo], pos[redo] = exact_scores, exact_pos
        return _pad(scores, pos, k)

    def vectors(self) -> np.ndarray:
        """(n, dim) the indexed vectors, read back from the index once, when first needed."""
        with self._lock:
            if self._vectors is None:
                if self.kind == "ivf":  # an IVF index reads vectors back through its id map
                    faiss_module().extract_index_ivf(self.index).make_direct_map()
                self._vectors = np.asarray(self.index.reconstruct_n(0, self.size), np.float32)
            return self._vectors

    def set_search_param(self, value: int) -> None:
        """``nprobe`` of an IVF index, ``efSearch`` of an HNSW one; no-op for flat."""
        if self.kind == "ivf":
            self.index.nprobe = int(value)
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)


def _pad(scores: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (B, k') results to (B, k) with score -inf / position -1."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, pos
    b = scores.shape[0]
    return (
        np.concatenate([scores, np.full((b, missing), -np.inf, np.float32)], axis=1),
        np.concatenate([pos, np.full((b, missing), -1, np.int64)], axis=1),
    )


@dataclass(frozen=True)
class IndexSpec:
    """How each domain's index is chosen and tuned (``aftrec export --index ...``).

    ``kind="auto"``: ``flat`` (exact) for domains with at most ``exact_max`` items, ``ivf``
    above. ``nlist`` (IVF cells, default ``4 sqrt(n)`` rounded to a power of two, at most
    ``n / 39``) and ``hnsw_m`` shape the index; the search knob is tuned on sample user
    vectors to the smallest value reaching ``target_recall`` at ``recall_k`` against exact
    search, unless ``search_param`` fixes it.
    """

    kind: str = "auto"
    exact_max: int = 50_000
    nlist: int | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    search_param: int | None = None
    target_recall: float = 0.97
    recall_k: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.exact_max < 0:
            raise ConfigError(f"exact_max must be >= 0, got {self.exact_max}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        for key in ("nlist", "search_param"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.hnsw_m < 2 or self.recall_k < 1:
            raise ConfigError("hnsw_m must be >= 2 and recall_k >= 1")

    def kind_for(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if n <= self.exact_max else "ivf"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ~4 sqrt(n), a power of two, >= 39 training points each."""
    want = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(want, n // 39)))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (positions; -1 entries ignored)."""
    hits, total = 0, 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / max(total, 1)


@dataclass
class BuiltIndex:
    index: FaissIndex
    params: dict[str, Any]  # kind, nlist / hnsw_m, search_param, recall, recall_queries


def build_index(
    vectors: np.ndarray, spec: IndexSpec, queries: np.ndarray | None = None, threads: int = 0
) -> BuiltIndex:
    """Build the index ``spec`` gives for ``vectors`` (n, dim) and tune its search knob on
    ``queries`` (m, dim) against :class:`ExactIndex`; the recall reached is in ``params``.
    ``threads``: FAISS's OpenMP threads while it builds (0: as they are); the caller's
    setting is put back after."""
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        return _build(faiss, vectors, spec, queries)
    finally:
        faiss.omp_set_num_threads(before)


def _build(
    faiss: Any, vectors: np.ndarray, spec: IndexSpec, queries: np.ndarray | None
) -> BuiltIndex:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    kind = spec.kind_for(n)
    params: dict[str, Any] = {"kind": kind, "n": int(n), "dim": int(dim)}
    if kind == "flat" or n == 0:
        raw = faiss.IndexFlatIP(dim)
        raw.add(x)
        params.update(kind="flat", search_param=None, recall=1.0, recall_queries=0)
        return BuiltIndex(FaissIndex(raw, "flat"), params)
    if kind == "ivf":
        nlist = min(spec.nlist or default_nlist(n), n)
        quantizer = faiss.IndexFlatIP(dim)
        raw = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        raw.cp.seed = spec.seed
        raw.cp.max_points_per_centroid = 64  # k-means on a sample: seconds, not minutes
        raw.train(x)
        raw.add(x)
        params["nlist"] = int(nlist)
        candidates = _powers_of_two(nlist)
        cap = int(nlist)  # nprobe above nlist probes the same cells
    else:  # hnsw
        raw = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        raw.hnsw.efConstruction = spec.hnsw_ef_construction
        raw.add(x)
        params.update(hnsw_m=spec.hnsw_m, ef_construction=spec.hnsw_ef_construction)
        k = min(spec.recall_k, n)
        candidates = [max(k, e) for e in (k, 2 * k, 4 * k, 8 * k, 16 * k)]
        cap = max(int(n), k)  # an efSearch above n visits no more of the graph
    index = FaissIndex(raw, kind)
    chosen, recall, m = _tune(index, x, spec, queries, candidates, cap)
    index.set_search_param(chosen)
    params.update(search_param=int(chosen), recall=recall, recall_queries=m)
    return BuiltIndex(index, params)


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p < limit:
        out.append(p)
        p *= 2
    return [*out, limit]


def _tune(
    index: FaissIndex,
    vectors: np.ndarray,
    spec: IndexSpec,
    queries: np.ndarray | None,
    candidates: list[int],
    cap: int,
) -> tuple[int, float | None, int]:
    """(search param, recall@k it reaches, number of queries); the smallest candidate whose
    recall reaches ``spec.target_recall`` (the largest if none does). A fixed
    ``spec.search_param`` is lowered to ``cap``, above which the index searches the same."""
    given = None if spec.search_param is None else min(spec.search_param, cap)
    if queries is None or len(queries) == 0:
        fixed = given or candidates[min(len(candidates) - 1, len(candidates) // 2)]
        return fixed, None, 0
    k = min(spec.recall_k, index.size)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = ExactIndex(vectors).search(q, k)
    tried = [given] if given is not None else candidates
    recall = 0.0
    for value in tried:
        index.set_search_param(value)
        recall = recall_at_k(index.search(q, k, exact_fallback=False)[1], truth)
        if recall >= spec.target_recall:
            return value, recall, len(q)
    return tried[-1], recall, len(q)
