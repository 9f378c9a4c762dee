"""A retrieval bundle: everything the matching stage of section 4.1 needs, in one folder.

``aftrec export --run RUN --out BUNDLE`` writes::

    manifest.json            format, versions, model, domains, index choices and recall,
                             and the sha256 and size of every other file
    manifest.sha256          the sha256 of manifest.json (``sha256sum -c`` format)
    encoder/user_<d>.pt      TorchScript user encoder of target domain d:
                             (history (B, D, L) int64, counts (B, D) int64) -> (B, dim)
    encoder/trial_<d>.pt     the same for the model's generator, if it has one (section 5.5.3)
    encoder/item_input.npy   (n_items,) the encoder's input index of each catalogue item
    items/vectors_<d>.npy    (n_d, dim) float32 item vectors of domain d
    items/trial_vectors_<d>.npy
    index/user_<d>.faiss     FAISS index over items/vectors_<d>.npy (ids = position in d)
    index/trial_<d>.faiss
    ids/items.parquet        item (original id), domain; row = global item index
    ids/users.parquet        user (original id); row = user index
    history/items.npy        every known user's behaviours (train + valid, the input the
    history/seg_start.npy    evaluator uses at test time) as one segment per (user, domain),
                             time-ordered: items[seg_start[u*D+d] : seg_start[u*D+d+1]]
    popularity/counts.npy    (n_items,) train + valid clicks per item, for users with no history

The encoder is TorchScript (``torch.jit.trace``), not ONNX: it runs in the same PyTorch the
project already depends on, with no extra runtime, and a traced module answers a B = 1 query
faster than the eager model or a loaded ``torch.export`` program (measured in BENCHMARKS.md,
"Serving"). An encoder is traced on one user but takes any batch size B: the models build
per-row constants from the batch's tensors (:func:`aftrec.models.base.target_column`), never from
``len(batch)``, which tracing would record as the constant 1; export checks the traced encoder
on whole batches as well as row by row, so a server can encode concurrent requests in one call
(:meth:`aftrec.serving.recommender.Recommender.recommend_many`). Tracing records one path
through the model: the example is a full history (L behaviours in every domain), so a model
that trims padding to the longest history records its no-trim branch, right for any input; and
:func:`contents_from_model` checks the traced encoder against the eager ``user_vectors`` on
real users and on empty and one-domain histories and refuses to export when they differ, and
refuses a model whose vectors depend on the user index (a new user has none).

The bundle is written to a temporary folder next to ``--out`` and renamed into place
(:func:`aftrec.outputs.atomic_directory`), so a reader sees the old bundle or the new one,
never half of one. Loading checks the manifest against ``manifest.sha256`` and against its
schema (:class:`Manifest`: every key the loader reads, with its JSON type and the offsets,
indexes and domains agreeing), then reads every file once, checks it against the manifest's
sha256 and builds the objects from the bytes it checked, so what is served is what was
exported; a missing, truncated or modified file, manifest included, is refused with
:class:`BundleError` naming it. The checksums detect damage and accidental edits; they are not
a signature (whoever can write the folder can rewrite the digests too).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from aftrec.data.dataset import DataInfo, Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import Batch, make_batch
from aftrec.environment import versions
from aftrec.errors import CheckpointError, ConfigError
from aftrec.models.base import RetrievalModel
from aftrec.outputs import atomic_directory, check_replaceable, check_writable, unfinished
from aftrec.serving.index import BuiltIndex, FaissIndex, IndexSpec, build_index, faiss_module

FORMAT = "aftrec-bundle"
FORMAT_VERSION = 2  # 2: manifest.sha256 covers the manifest
MANIFEST = "manifest.json"
MAX_MANIFEST = 64 << 20  # bytes read of a manifest at most: a bundle's is kilobytes
DIGEST = "manifest.sha256"  # `sha256sum -c manifest.sha256` checks the manifest by hand
#: ``--threads``: 0 (all cores) up to this; OpenMP's int overflows far above it
MAX_THREADS = 1024
#: every name a bundle holds
WRITES = frozenset({MANIFEST, DIGEST, "encoder", "items", "index", "ids", "history", "popularity"})
#: users whose vectors tune each approximate index and check the traced encoder
SAMPLE_USERS = 512
CHECK_USERS = 32


class BundleError(CheckpointError):
    """A bundle cannot be written, or is missing, damaged or not a bundle."""


# --- the manifest's schema -----------------------------------------------------------------
class _Schema(BaseModel):
    """JSON types as written: no coercion ("50" is not an int), extra keys kept."""

    model_config = ConfigDict(strict=True, extra="allow")


NonNegative = Annotated[int, Field(ge=0)]


class FileEntry(_Schema):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: NonNegative


#: the largest search knob a manifest may name: FAISS keeps HNSW's efSearch in a C int
MAX_SEARCH_PARAM = 2**31 - 1


class IndexEntry(_Schema):
    domain: str
    kind: Literal["flat", "ivf", "hnsw"]
    search_param: int | None = Field(None, ge=1, le=MAX_SEARCH_PARAM)


class EncoderEntry(_Schema):
    format: Literal["torchscript"]
    history_len: int = Field(ge=1)
    pad: NonNegative
    dim: NonNegative
    trial: bool


class ModelEntry(_Schema):
    name: str


class Manifest(_Schema):
    """``manifest.json``: what :func:`read_manifest` accepts (keys the loader reads)."""

    format: Literal["aftrec-bundle"]
    format_version: int
    version: str
    model_version: str
    model: ModelEntry
    encoder: EncoderEntry
    domains: list[str] = Field(min_length=1)
    offsets: list[NonNegative]
    n_items: NonNegative
    n_users: NonNegative
    indexes: list[IndexEntry]
    trial_indexes: list[IndexEntry]
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        d = len(self.domains)
        if len(set(self.domains)) != d:
            raise ValueError("domains: a domain is listed twice")
        if (
            len(self.offsets) != d + 1
            or self.offsets[0] != 0
            or self.offsets != sorted(self.offsets)
        ):
            raise ValueError(f"offsets: {self.offsets} do not split the catalogue into {d} domains")
        if self.offsets[-1] != self.n_items:
            raise ValueError(f"offsets: end at {self.offsets[-1]}, n_items is {self.n_items}")
        for key, entries, want in (
            ("indexes", self.indexes, d),
            ("trial_indexes", self.trial_indexes, d if self.encoder.trial else 0),
        ):
            if [e.domain for e in entries] != list(self.domains)[:want]:
                raise ValueError(f"{key}: {len(entries)} entries do not match the domains")
        for rel in self.files:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"files: entry {rel!r} points outside the bundle")
        return self


def _schema_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# --- what goes into a bundle ---------------------------------------------------------------
@dataclass
class BundleContents:
    """The parts of a bundle before indexes are built; :func:`write_bundle` writes them.

    A test or benchmark may replace the catalogue (``items``, ``item_vectors``,
    ``item_input``, ``popularity``, ``offsets``) of contents made from a trained model, as
    ``benchmarks/bench_serving.py`` does for its 1.5M-item bundle.
    """

    model_name: str
    model_info: dict[str, Any]  # run, which, epoch, metric, weights sha256 ...
    domains: tuple[str, ...]
    offsets: tuple[int, ...]  # catalogue: domain d owns items [offsets[d], offsets[d + 1])
    history_len: int
    encoder_pad: int  # the encoder's padding index (its n_items)
    encoders: list[torch.jit.ScriptModule]  # one per domain
    trial_encoders: list[torch.jit.ScriptModule] | None
    item_vectors: list[np.ndarray]  # per domain (n_d, dim) float32
    trial_item_vectors: list[np.ndarray] | None
    item_input: np.ndarray  # (n_items,) int64 encoder input index per item (pad = unknown)
    items: pd.DataFrame  # columns item, domain; row = global item index
    users: pd.Series  # original user ids; position = user index
    history_items: np.ndarray  # (N,) int64 global item indices
    history_seg_start: np.ndarray  # (n_users * D + 1,) int64
    popularity: np.ndarray  # (n_items,) float32
    queries: list[np.ndarray] = field(default_factory=list)  # per domain (m, dim) tuning queries
    trial_queries: list[np.ndarray] = field(default_factory=list)


class _DomainEncoder(nn.Module):
    """(history (B, D, L), counts (B, D)) -> (B, dim): the model's user (or trial) vectors for
    one target domain, as a module that ``torch.jit.trace`` can record."""

    def __init__(self, model: RetrievalModel, domain: int, trial: bool) -> None:
        super().__init__()
        self.model = model
        self.domain = domain
        self.trial = trial

    def forward(self, history: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        users = torch.zeros_like(counts[:, 0])  # encoders read behaviours only
        batch = Batch(users=users, history=history, counts=counts, domain=users + self.domain)
        out: torch.Tensor = vectors_fn(self.model, self.trial)(batch, self.domain)
        return out.float()


def vectors_fn(model: RetrievalModel, trial: bool) -> Callable[[Batch, int], torch.Tensor]:
    """The query vectors of ``model``'s ``"user"`` or ``"trial"`` channel."""
    return model.serving_channels()["trial" if trial else "user"].query


def has_trial(model: RetrievalModel) -> bool:
    """Whether ``model`` offers a second, exploratory channel (AFT's generator, section
    5.5.3), declared by :meth:`~aftrec.models.base.RetrievalModel.serving_channels`."""
    return "trial" in model.serving_channels()


def _trial_items(model: RetrievalModel, domain: int) -> torch.Tensor:
    return model.serving_channels()["trial"].items(domain)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch.jit.trace / load warn about their own deprecation and about Python ints in the
    trace (sizes of the example, e.g. the history length, recorded as constants)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _one_thread() -> Iterator[None]:
    """B = 1 forwards gain nothing from intra-op threads and, on a busy machine, lose a lot
    to them (BENCHMARKS.md, "Serving")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trace(model: RetrievalModel, domain: int, trial: bool, example: Batch) -> Any:
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(
            _DomainEncoder(model, domain, trial),
            (example.history[:1], example.counts[:1]),
            check_trace=False,
        )
    buf = io.BytesIO()  # a saved-and-reloaded module, exactly what a bundle serves
    with _quiet_jit():
        torch.jit.save(traced, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location="cpu")


def _full_batch(info: DataInfo, history_len: int) -> Batch:
    """One user with ``history_len`` behaviours in every domain: the trace example. Tracing
    records the branch this input takes; a model that trims padding to the batch's longest
    history (SASRec-style ``int(lengths.max())``) thereby records its no-trim branch, which is
    right for every shorter input too."""
    d = info.n_domains
    hist = np.full((1, d, history_len), info.pad, dtype=np.int64)
    for e in range(d):
        lo, hi = info.domain_range(e)
        if hi > lo:
            hist[0, e] = lo + np.arange(history_len) % (hi - lo)
    counts = np.full((1, d), history_len, dtype=np.int64)
    users = torch.zeros(1, dtype=torch.long)
    return Batch(users, torch.from_numpy(hist), torch.from_numpy(counts), users.clone())


def _edge_batch(info: DataInfo, history_len: int, items: np.ndarray) -> Batch:
    """Hand-made histories the traced encoders are checked on: nothing at all, then one
    behaviour in a single domain for each domain (cold-start shapes)."""
    d = info.n_domains
    hist = np.full((d + 1, d, history_len), info.pad, dtype=np.int64)
    counts = np.zeros((d + 1, d), dtype=np.int64)
    for e in range(d):
        lo, hi = info.domain_range(e)
        if hi > lo:
            hist[e + 1, e, -1] = items[lo]
            counts[e + 1, e] = 1
    users = torch.zeros(d + 1, dtype=torch.long)
    return Batch(users, torch.from_numpy(hist), torch.from_numpy(counts), users.clone())


def _check_encoder(
    model: RetrievalModel, encoder: Any, domain: int, trial: bool, batches: list[Batch]
) -> None:
    fn = vectors_fn(model, trial)
    # a few dozen calls: skip TorchScript's profiling and optimisation of the graph (seconds
    # per module) and run the graph as recorded, which is what is being checked
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for batch in batches:
            eager = fn(batch, domain).float()
            what = "trial" if trial else "user"
            traced = torch.cat(
                [
                    encoder(batch.history[i : i + 1], batch.counts[i : i + 1])
                    for i in range(len(batch))
                ]
            )
            try:
                torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)
            except AssertionError as exc:
                raise BundleError(
                    f"the traced {what} encoder of domain {domain} does not reproduce "
                    f"{type(model).__name__}.{what}_vectors (data-dependent control flow?): "
                    + str(exc).splitlines()[0]
                ) from exc
            try:  # the whole batch in one call, as a batching server encodes
                batched = encoder(batch.history, batch.counts)
                torch.testing.assert_close(batched, eager, rtol=1e-4, atol=1e-5)
            except (AssertionError, RuntimeError) as exc:
                raise BundleError(
                    f"the traced {what} encoder of domain {domain} answers one user at a time "
                    "only (a batch size frozen into the trace: build per-row constants with "
                    "aftrec.models.base.target_column, not len(batch)): " + str(exc).splitlines()[0]
                ) from exc


def contents_from_model(
    model: RetrievalModel,
    data: Dataset,
    history_len: int,
    model_info: dict[str, Any] | None = None,
    seed: int = 0,
    sample_users: int = SAMPLE_USERS,
) -> BundleContents:
    """Trace ``model``'s encoders and gather the catalogue, histories and popularity of
    ``data`` (train + valid: the behaviours the evaluator gives the model at test time).
    ``sample_users`` users' vectors tune the approximate indexes (the first ``CHECK_USERS``
    of them also check the traced encoders)."""
    if not model.dot_product:
        raise BundleError(
            f"model {model.name or type(model).__name__!r} is not a dot-product model "
            "(its score is not user_vector . item_vector); only those can be served from a "
            "nearest-neighbour index"
        )
    info = data.info
    model.eval()
    history = HistoryIndex(data.train_valid, info)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.permutation(info.n_users)[: min(sample_users, info.n_users)])
    check_users = users[:CHECK_USERS]
    trial = has_trial(model)

    def batch_for(u: np.ndarray, d: int, real_users: bool = True) -> Batch:
        b = make_batch(info, history, u, np.full(len(u), d, dtype=np.int64), history_len)
        return b if real_users else Batch(torch.zeros_like(b.users), b.history, b.counts, b.domain)

    encoders, trial_encoders, queries, trial_queries = [], [], [], []
    with torch.inference_mode():
        for d in range(info.n_domains):
            real = batch_for(check_users, d)
            if len(check_users):  # encoders must not read the user index: new users have none
                a, b = (
                    model.user_vectors(real, d),
                    model.user_vectors(batch_for(check_users, d, False), d),
                )
                if not torch.equal(a, b):
                    raise BundleError(
                        f"model {model.name!r} reads the user index (batch.users) in "
                        "user_vectors; a bundle serves new users from their behaviours only"
                    )
            queries.append(model.user_vectors(batch_for(users, d), d).float().numpy())
            if trial:
                tv = vectors_fn(model, True)(batch_for(users, d), d)
                trial_queries.append(tv.float().numpy())
    example = _full_batch(info, history_len)
    edge = _edge_batch(info, history_len, np.arange(info.n_items))
    with _one_thread():
        for d in range(info.n_domains):
            checks = [edge] + ([batch_for(check_users, d)] if len(check_users) else [])
            enc = _trace(model, d, False, example)
            _check_encoder(model, enc, d, False, checks)
            encoders.append(enc)
            if trial:
                tenc = _trace(model, d, True, example)
                _check_encoder(model, tenc, d, True, checks)
                trial_encoders.append(tenc)
    with torch.inference_mode():
        item_vectors = [model.item_vectors(d).float().numpy().copy() for d in range(info.n_domains)]
        trial_vectors = (
            [_trial_items(model, d).float().numpy().copy() for d in range(info.n_domains)]
            if trial
            else None
        )
    seen = data.train_valid
    return BundleContents(
        model_name=model.name or type(model).__name__,
        model_info=model_info or {},
        domains=info.domains,
        offsets=info.offsets,
        history_len=history_len,
        encoder_pad=info.pad,
        encoders=encoders,
        trial_encoders=trial_encoders if trial else None,
        item_vectors=item_vectors,
        trial_item_vectors=trial_vectors,
        item_input=np.arange(info.n_items, dtype=np.int64),
        items=pd.DataFrame(
            {
                "item": data.items["item"].astype(str).to_numpy(),
                "domain": data.items["domain"].astype(str).to_numpy(),
            }
        ),
        users=pd.Series(data.users["user"].astype(str).to_numpy(), name="user"),
        history_items=history.items.astype(np.int64),
        history_seg_start=history.seg_start.astype(np.int64),
        popularity=np.bincount(seen.item, minlength=info.n_items).astype(np.float32),
        queries=queries,
        trial_queries=trial_queries,
    )


# --- writing -------------------------------------------------------------------------------
def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _script_bytes(module: Any) -> bytes:
    buf = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(module, buf)
    return buf.getvalue()


def _index_bytes(index: FaissIndex) -> bytes:
    return bytes(faiss_module().serialize_index(index.index))


def _validate_contents(c: BundleContents) -> None:
    d = len(c.domains)
    n_items = c.offsets[-1]
    problems = []
    if len(c.offsets) != d + 1 or list(c.offsets) != sorted(c.offsets) or c.offsets[0] != 0:
        problems.append(f"offsets {c.offsets} do not split the catalogue into {d} domains")
    if len(c.encoders) != d:
        problems.append(f"{len(c.encoders)} encoders for {d} domains")
    for e, vec in enumerate(c.item_vectors):
        if vec.shape[0] != c.offsets[e + 1] - c.offsets[e]:
            problems.append(f"domain {e}: {vec.shape[0]} item vectors, offsets say otherwise")
    for name, length in (
        ("items", len(c.items)),
        ("item_input", len(c.item_input)),
        ("popularity", len(c.popularity)),
    ):
        if length != n_items:
            problems.append(f"{name} has {length} rows for {n_items} items")
    if len(c.history_seg_start) != len(c.users) * d + 1:
        problems.append("history_seg_start does not match users x domains")
    if problems:
        raise BundleError("inconsistent bundle contents: " + "; ".join(problems))


def write_bundle(
    contents: BundleContents,
    out: Path,
    spec: IndexSpec | None = None,
    force: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """Build the indexes and write the bundle atomically to ``out``; returns the manifest."""
    spec = spec or IndexSpec()
    out = Path(out)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise ConfigError(
            f"--threads must be an integer in [0, {MAX_THREADS}] (0: all cores), got {threads!r}"
        )
    _validate_contents(contents)
    check_replaceable(out, MANIFEST, "bundle", WRITES, _listed(out))  # before naming --force
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    with atomic_directory(out, replace=force) as tmp:
        return _write_files(contents, tmp, spec, threads)


def _write_files(
    contents: BundleContents, tmp: Path, spec: IndexSpec, threads: int
) -> dict[str, Any]:
    """Build the indexes and write every file of the bundle into ``tmp``, the manifest and
    its digest last; returns the manifest."""
    checksums: dict[str, dict[str, Any]] = {}

    def put(rel: str, data: bytes) -> None:
        """Write one file into the temporary folder (fsynced) and note its checksum."""
        _write_synced(tmp / rel, data)
        checksums[rel] = {"sha256": _sha256_bytes(data), "bytes": len(data)}

    indexes: list[dict[str, Any]] = []
    trial_indexes: list[dict[str, Any]] = []
    trial = contents.trial_encoders is not None and contents.trial_item_vectors is not None
    for d, name in enumerate(contents.domains):
        q = contents.queries[d] if d < len(contents.queries) else None
        built: BuiltIndex = build_index(contents.item_vectors[d], spec, q, threads)
        put(f"encoder/user_{d}.pt", _script_bytes(contents.encoders[d]))
        put(f"items/vectors_{d}.npy", _npy_bytes(contents.item_vectors[d].astype(np.float32)))
        put(f"index/user_{d}.faiss", _index_bytes(built.index))
        indexes.append({"domain": name, **built.params})
        del built
        if trial:
            assert contents.trial_encoders is not None
            assert contents.trial_item_vectors is not None
            tq = contents.trial_queries[d] if d < len(contents.trial_queries) else None
            tvec = contents.trial_item_vectors[d].astype(np.float32)
            tbuilt = build_index(tvec, spec, tq, threads)
            put(f"encoder/trial_{d}.pt", _script_bytes(contents.trial_encoders[d]))
            put(f"items/trial_vectors_{d}.npy", _npy_bytes(tvec))
            put(f"index/trial_{d}.faiss", _index_bytes(tbuilt.index))
            trial_indexes.append({"domain": name, **tbuilt.params})
            del tbuilt
    put("encoder/item_input.npy", _npy_bytes(contents.item_input.astype(np.int64)))
    put("ids/items.parquet", _parquet_bytes(contents.items[["item", "domain"]]))
    put("ids/users.parquet", _parquet_bytes(contents.users.rename("user").to_frame()))
    put("history/items.npy", _npy_bytes(contents.history_items.astype(np.int64)))
    put("history/seg_start.npy", _npy_bytes(contents.history_seg_start.astype(np.int64)))
    put("popularity/counts.npy", _npy_bytes(contents.popularity.astype(np.float32)))
    files = dict(sorted(checksums.items()))
    version = _sha256_bytes("\n".join(f"{p} {m['sha256']}" for p, m in files.items()).encode())
    dim = int(contents.item_vectors[0].shape[1]) if contents.item_vectors else 0
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version[:16],
        "model_version": f"{contents.model_name}-{version[:12]}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions("aftrec", "torch", "faiss", "numpy", "python"),
        "model": {"name": contents.model_name, **contents.model_info},
        "encoder": {
            "format": "torchscript",
            "batch_size": "any",
            "inputs": {
                "history": "(B, D, L) int64, right-aligned, pad = encoder.pad",
                "counts": "(B, D) int64 behaviours per domain",
            },
            "history_len": contents.history_len,
            "pad": int(contents.encoder_pad),
            "dim": dim,
            "trial": trial,
        },
        "domains": list(contents.domains),
        "offsets": [int(x) for x in contents.offsets],
        "n_items": int(contents.offsets[-1]),
        "n_users": len(contents.users),
        "index_spec": spec.to_dict(),
        "indexes": indexes,
        "trial_indexes": trial_indexes,
        "files": files,
    }
    raw = _json_bytes(manifest)
    _write_synced(tmp / MANIFEST, raw)
    _write_synced(tmp / DIGEST, f"{_sha256_bytes(raw)}  {MANIFEST}\n".encode())
    return manifest


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # mode 0666 less the umask
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


#: the names of a bundle's files (:func:`_listed`, when its manifest cannot say)
_BUNDLE_FILE = re.compile(
    r"encoder/(?:(?:user|trial)_\d+\.pt|item_input\.npy)|items/(?:trial_)?vectors_\d+\.npy"
    r"|index/(?:user|trial)_\d+\.faiss|ids/(?:items|users)\.parquet"
    r"|history/(?:items|seg_start)\.npy|popularity/counts\.npy"
)


def _listed(out: Path) -> set[str]:
    """The files of the bundle at ``out``: those its manifest lists or, when the manifest
    cannot be read (a damaged bundle, which ``--force`` may replace), those whose names are
    a bundle's; anything else in it is someone's own, which ``--force`` would delete."""
    try:
        with open(Path(out) / MANIFEST, "rb") as fh:
            files = json.loads(fh.read(MAX_MANIFEST))["files"]
        return {MANIFEST, DIGEST, *map(str, files)}
    except (OSError, ValueError, KeyError, TypeError):
        found = (str(p.relative_to(out)) for p in Path(out).rglob("*") if not p.is_dir())
        return {MANIFEST, DIGEST, *(rel for rel in found if _BUNDLE_FILE.fullmatch(rel))}


def export_run(
    run: Path,
    out: Path,
    spec: IndexSpec | None = None,
    which: str = "best",
    force: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """``aftrec export``: the model, data and histories of a training run as a bundle."""
    from aftrec.training.rundir import load_run, weights_identity

    check_writable(Path(out), folder=True)
    check_replaceable(Path(out), MANIFEST, "bundle", WRITES, _listed(Path(out)))
    if Path(out).exists() and not force:  # a bundle: replaceable, with --force
        raise BundleError(f"{out} already exists; pass --force to replace it")
    identity = weights_identity(Path(run), which)  # before they are read
    cfg, data, model = load_run(Path(run), which)
    weights = Path(run) / f"{which}.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if weights_identity(Path(run), which) != identity:  # the hash would be of other weights
        raise BundleError(
            f"{weights} was replaced while it was exported (the run is training): nothing "
            "written; export it again, or when the training has stopped"
        )
    info = {
        "run": str(Path(run).resolve()),
        "which": which,
        "weights_sha256": digest,
        "data": str(data.path.resolve()),
    }
    contents = contents_from_model(model, data, cfg.data.history_len, info, seed=cfg.train.seed)
    return write_bundle(contents, Path(out), spec, force=force, threads=threads)


# --- reading -------------------------------------------------------------------------------
@dataclass
class LoadedBundle:
    path: Path
    manifest: dict[str, Any]
    encoders: list[Any]  # TorchScript modules, one per domain
    trial_encoders: list[Any] | None
    indexes: list[FaissIndex]
    trial_indexes: list[FaissIndex] | None
    item_input: np.ndarray
    items: pd.DataFrame
    users: pd.Series
    history_items: np.ndarray
    history_seg_start: np.ndarray
    popularity: np.ndarray

    def item_vectors(self, domain: int, trial: bool = False) -> np.ndarray:
        """(n_d, dim) item vectors of ``domain`` (read and checked on demand; serving uses
        the indexes, the vectors are kept for exact search and re-indexing)."""
        rel = f"items/{'trial_' if trial else ''}vectors_{domain}.npy"
        return _npy(read_checked(self.path, self.manifest, rel))


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, checked against ``manifest.sha256`` and
    :class:`Manifest`; anything else raises :class:`BundleError` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no bundle here (not a folder)")
    if unfinished(path):
        raise BundleError(f"{path}: an unfinished bundle (`aftrec export` was interrupted)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); write one with `aftrec export`")
    try:
        raw = read_regular(mpath, MAX_MANIFEST)
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an aftrec bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format {manifest.get('format_version')!r}; this aftrec reads "
            f"format {FORMAT_VERSION}; export the run again"
        )
    try:
        want = read_regular(path / DIGEST, 4096).decode().split()[0]
    except (OSError, ValueError, IndexError, BundleError):
        raise BundleError(f"{path}: {DIGEST} is missing or unreadable; export it again") from None
    if _sha256_bytes(raw) != want:
        raise BundleError(
            f"{mpath}: fails its checksum in {DIGEST}; the bundle is damaged or was modified "
            "after export; export it again"
        )
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise BundleError(f"{mpath}: invalid manifest: {_schema_message(exc)}") from None
    return manifest


def read_checked(path: Path, manifest: dict[str, Any], rel: str, verify: bool = True) -> bytes:
    """The bytes of bundle file ``rel``, refused unless the manifest lists it with this
    size and sha256."""
    meta = manifest["files"].get(rel)
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: the manifest does not list {rel}; the bundle is incomplete")
    size = meta.get("bytes")
    limit = size + 1 if isinstance(size, int) and size >= 0 else None
    try:
        data = read_regular(Path(path) / rel, limit)
    except FileNotFoundError:
        raise BundleError(f"{path}: {rel} is missing; the bundle is incomplete") from None
    except OSError as exc:
        raise BundleError(f"{path}: {rel} is unreadable ({exc})") from exc
    if verify:
        if len(data) != meta.get("bytes"):
            raise BundleError(
                f"{path}: {rel} has {len(data)} bytes, the manifest says {meta.get('bytes')}; "
                "the bundle is damaged or was modified after export; export it again"
            )
        digest = _sha256_bytes(data)
        if digest != meta.get("sha256"):
            raise BundleError(
                f"{path}: {rel} fails its checksum (sha256 {digest[:12]}..., manifest "
                f"{str(meta.get('sha256'))[:12]}...); the bundle is damaged or was modified "
                "after export; export it again"
            )
    return data


def read_regular(file: Path, limit: int | None = None) -> bytes:
    """The bytes of ``file`` (at most ``limit``), refused with :class:`BundleError` unless it
    is a regular file: a FIFO or a device (``/dev/zero`` behind a symlink) would block a
    reload, or never end. Opened without blocking, so a FIFO is seen before it is read."""
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to fear
    fd = os.open(file, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{file} is not a regular file")
        if nonblock:
            os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as fh:
            return fh.read(-1 if limit is None else limit)
    finally:
        os.close(fd)


def _npy(data: bytes) -> np.ndarray:
    out: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return out


def _npy_header(path: Path, rel: str, data: bytes) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype a ``.npy`` file's header declares, without copying its data."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"npy format version {version}")
    except ValueError as exc:
        raise BundleError(f"{path}: {rel} is not a readable .npy array ({exc})") from exc
    return tuple(shape), dtype


def load_bundle(path: Path, verify: bool = True) -> LoadedBundle:
    """Read and check a bundle; every object is built from the bytes that were checked."""
    path = Path(path)
    m = read_manifest(path)
    n_dom = len(m["domains"])
    faiss = faiss_module()

    def get(rel: str) -> bytes:
        return read_checked(path, m, rel, verify)

    def script(rel: str) -> Any:
        try:
            with _quiet_jit():
                module = torch.jit.load(io.BytesIO(get(rel)), map_location="cpu").eval()
            for p in module.parameters():  # serving never needs autograd
                p.requires_grad_(False)
            return module
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{path}: {rel} is not a loadable TorchScript module") from exc

    kinds = {"flat": faiss.IndexFlat, "ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW}

    def index(rel: str, params: dict[str, Any]) -> FaissIndex:
        raw = faiss.deserialize_index(np.frombuffer(get(rel), dtype=np.uint8))
        if not isinstance(raw, kinds[params["kind"]]):
            raise BundleError(f"{path}: {rel} is not the {params['kind']} index the manifest names")
        out = FaissIndex(raw, params["kind"])
        if params.get("search_param") is not None:
            # above the index's cells (IVF) or items (HNSW) a search finds the same items,
            # and a huge efSearch would make every HNSW search allocate for it
            cap = raw.nlist if params["kind"] == "ivf" else max(int(raw.ntotal), 1)
            out.set_search_param(min(params["search_param"], cap))
        return out

    def table(rel: str, column: str) -> pd.DataFrame:
        frame = pd.read_parquet(io.BytesIO(get(rel)))
        if column not in frame.columns:
            raise BundleError(f"{path}: {rel} has no {column!r} column")
        return frame

    vectors: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    for rel in m["files"]:  # the vectors are not loaded to serve; check them all the same
        if rel.startswith("items/") and verify:
            vectors[rel] = _npy_header(path, rel, get(rel))
    trial = bool(m["encoder"]["trial"])
    try:
        bundle = LoadedBundle(
            path=path,
            manifest=m,
            encoders=[script(f"encoder/user_{d}.pt") for d in range(n_dom)],
            trial_encoders=[script(f"encoder/trial_{d}.pt") for d in range(n_dom)]
            if trial
            else None,
            indexes=[index(f"index/user_{d}.faiss", m["indexes"][d]) for d in range(n_dom)],
            trial_indexes=[
                index(f"index/trial_{d}.faiss", m["trial_indexes"][d]) for d in range(n_dom)
            ]
            if trial
            else None,
            item_input=_npy(get("encoder/item_input.npy")),
            items=table("ids/items.parquet", "item"),
            users=table("ids/users.parquet", "user")["user"],
            history_items=_npy(get("history/items.npy")),
            history_seg_start=_npy(get("history/seg_start.npy")),
            popularity=_npy(get("popularity/counts.npy")),
        )
    except BundleError:
        raise
    except (
        KeyError,
        IndexError,
        ValueError,
        RuntimeError,
        AttributeError,
        OverflowError,
        TypeError,
    ) as exc:
        raise BundleError(f"{path}: bundle is inconsistent or unreadable ({exc})") from exc
    problem = _inconsistency(bundle, m, vectors)
    if problem is not None:
        raise BundleError(f"{path}: {problem}")
    return bundle


_VECTORS = re.compile(r"items/(?:trial_)?vectors_(\d+)\.npy")


def _inconsistency(
    b: LoadedBundle,
    m: dict[str, Any],
    vectors: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] | None = None,
) -> str | None:
    """What in ``b`` disagrees with its manifest or with itself (None: nothing): files that
    each pass their checksum but do not belong together (an index of another domain, size or
    dimension, or kind; arrays of another type, shape or length, or out of range; an encoder
    whose vectors have another dimension) would serve wrong items or fail on requests.
    ``vectors``: the shape and dtype of each ``items/*.npy`` file, from its header. Cheap:
    types, sizes and ranges, and one call of each encoder; no search."""
    n_items, n_users, offsets = m["n_items"], m["n_users"], m["offsets"]
    n_dom, dim, pad = len(m["domains"]), m["encoder"]["dim"], m["encoder"]["pad"]
    groups = [("indexes", b.indexes)]
    if b.trial_indexes is not None:
        groups.append(("trial_indexes", b.trial_indexes))
    for key, indexes in groups:
        for d, index in enumerate(indexes):
            n_d = offsets[d + 1] - offsets[d]
            where = f"{key}[{d}] ({m['domains'][d]})"
            if index.size != n_d:
                return f"{where} holds {index.size} items, the domain has {n_d}"
            if int(index.index.d) != dim:
                return f"{where} has dimension {index.index.d}, the encoder {dim}"
    for rel, (shape, dtype) in (vectors or {}).items():
        match = _VECTORS.fullmatch(rel)
        d = int(match.group(1)) if match else n_dom
        rows = offsets[d + 1] - offsets[d] if d < n_dom else None
        if (
            dtype != np.float32
            or len(shape) != 2
            or shape[1] != dim
            or rows not in (None, shape[0])
        ):
            want = f"({'n' if rows is None else rows}, {dim}) float32"
            return f"{rel} holds a {shape} {dtype} array, want {want}"
    integer = [
        ("encoder/item_input.npy", b.item_input),
        ("history/items.npy", b.history_items),
        ("history/seg_start.npy", b.history_seg_start),
    ]
    for rel, array in integer:
        if array.ndim != 1 or array.dtype.kind not in "iu":
            return f"{rel} holds a {array.shape} {array.dtype} array, want 1-D integers"
    pop = b.popularity
    if pop.ndim != 1 or pop.dtype.kind not in "iuf" or not np.isfinite(pop).all():
        return (
            f"popularity/counts.npy holds a {pop.shape} {pop.dtype} array, want 1-D finite counts"
        )
    seg = b.history_seg_start
    arrays = [
        ("ids/items.parquet", len(b.items), n_items),
        ("ids/users.parquet", len(b.users), n_users),
        ("encoder/item_input.npy", len(b.item_input), n_items),
        ("popularity/counts.npy", len(b.popularity), n_items),
        ("history/seg_start.npy", len(seg), n_users * n_dom + 1),
    ]
    for rel, got, want in arrays:
        if got != want:
            return f"{rel} has {got} entries, the manifest says {want}"
    if len(b.item_input) and not (b.item_input.min() >= 0 and b.item_input.max() <= pad):
        return f"encoder/item_input.npy holds indices outside 0..{pad}"
    if seg[0] != 0 or seg[-1] != len(b.history_items) or (np.diff(seg) < 0).any():
        return "history/seg_start.npy does not split history/items.npy into segments"
    hist = b.history_items
    if len(hist) and not (hist.min() >= 0 and hist.max() < n_items):
        return f"history/items.npy holds items outside 0..{n_items - 1}"
    if len(b.popularity) and b.popularity.min() < 0:
        return "popularity/counts.npy holds negative counts"
    return _encoder_inconsistency(b, m)


def _encoder_inconsistency(b: LoadedBundle, m: dict[str, Any]) -> str | None:
    """Whether each encoder takes this bundle's input, a user with no behaviours, and answers
    one vector of the manifest's (and the indexes') dimension; None if they all do."""
    n_dom, dim = len(m["domains"]), m["encoder"]["dim"]
    encoders = [(f"encoder/user_{d}.pt", e) for d, e in enumerate(b.encoders)]
    encoders += [(f"encoder/trial_{d}.pt", e) for d, e in enumerate(b.trial_encoders or [])]
    for rel, encoder in encoders:
        try:
            length = m["encoder"]["history_len"]
            history = torch.full((1, n_dom, length), m["encoder"]["pad"], dtype=torch.long)
            with torch.inference_mode():
                out = encoder(history, torch.zeros((1, n_dom), dtype=torch.long))
        except Exception as exc:  # anything a TorchScript module raises on wrong input
            last = (str(exc).strip().splitlines() or [""])[-1][:200]  # TorchScript's own cause
            return f"{rel} fails on this bundle's input ({type(exc).__name__}: {last})"
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != (1, dim):
            return (
                f"{rel} answers vectors of shape {shape} for one user, the indexes want (1, {dim})"
            )
    return None
