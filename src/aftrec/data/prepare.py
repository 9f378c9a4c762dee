"""Turn a validated :class:`RawLog` into a prepared dataset directory.

Layout (all Parquet through pyarrow, plus one JSON file)::

    DIR/meta.json        domains, per-domain item ranges, counts, split settings, source
    DIR/items.parquet    item_idx, item (original id), domain
    DIR/users.parquet    user_idx, user (original id)
    DIR/train.parquet    user_idx, item_idx, domain_idx, timestamp   (positives only)
    DIR/valid.parquet    same columns
    DIR/test.parquet     same columns

Items are numbered so that each domain is one contiguous range ``[offset[d], offset[d+1])``;
full ranking inside a domain is then a slice of the item table. The directory is written under
a temporary name and renamed into place (:func:`aftrec.outputs.atomic_directory`), so an
interrupted run leaves nothing that reads as data, and the next run deletes what a killed one
left.

Logs larger than memory go through :mod:`aftrec.data.stream` instead, which shares this
module's helpers and writes the same rows partition by partition (format 2).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aftrec.arrays import unique
from aftrec.data.schema import RawLog, positives, validate
from aftrec.data.split import (
    PART_NAMES,
    TEST,
    TRAIN,
    VALID,
    SplitConfig,
    assign_parts,
    carve_validation,
    chronological_order,
    keep_active_users,
)
from aftrec.errors import DataError
from aftrec.outputs import atomic_directory, atomic_write_bytes, check_writable

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _encode_items(items: pd.DataFrame, domains: list[str]) -> pd.DataFrame:
    """Number items domain by domain (domain order, then original id) -> contiguous ranges."""
    frame = items.assign(
        domain_idx=pd.Categorical(items["domain"], categories=domains).codes.astype(np.int16)
    )
    frame = frame.sort_values(["domain_idx", "item"], kind="stable").reset_index(drop=True)
    frame.insert(0, "item_idx", np.arange(len(frame), dtype=np.int32))
    return frame


def _positive_frame(log_: RawLog, rating_threshold: float) -> pd.DataFrame:
    pos = positives(log_.interactions, rating_threshold)
    return pos.loc[:, ["user", "item", "timestamp"]]


def _index_rows(
    frame: pd.DataFrame, item_index: pd.Index, user_index: pd.Index, item_domain: np.ndarray
) -> dict[str, np.ndarray]:
    item_idx = item_index.get_indexer(pd.Index(frame["item"])).astype(np.int32)
    user_idx = user_index.get_indexer(pd.Index(frame["user"])).astype(np.int32)
    return {
        "user_idx": user_idx,
        "item_idx": item_idx,
        "domain_idx": item_domain[item_idx],
        "timestamp": frame["timestamp"].to_numpy(),
    }


def _first_click_only(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep each (user, item) pair's earliest positive: a repeat adds nothing to retrieval
    (training positives are excluded from the ranking) and would blur the split."""
    order = chronological_order(rows["user_idx"], rows["timestamp"], rows["item_idx"])
    rows = {k: v[order] for k, v in rows.items()}
    key = (
        rows["user_idx"].astype(np.int64) * (int(rows["item_idx"].max(initial=0)) + 1)
        + rows["item_idx"]
    )
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), dtype=bool)
    keep[first] = True
    return {k: v[keep] for k, v in rows.items()}


def _split_positives(
    rows: dict[str, np.ndarray], split: SplitConfig
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """First clicks only, users with fewer than ``min_positives`` dropped, chronological split.

    ``rows["user_idx"]`` numbers users in original-id order. Returns the kept rows (users
    re-numbered 0.. in the same order, rows in chronological order), their parts, the old
    index of each kept user and the number of users dropped.
    """
    rows = _first_click_only(rows)
    active = keep_active_users(rows["user_idx"], split.min_positives)
    n_dropped = len(unique(rows["user_idx"][~active]))
    rows = {k: v[active] for k, v in rows.items()}
    # re-number the users that remain, keeping their original-id order
    kept_users, new_idx = np.unique(rows["user_idx"], return_inverse=True)
    rows["user_idx"] = new_idx.astype(np.int32)
    # still in chronological order: filtering and the order-preserving re-numbering above
    # keep _first_click_only's sort
    return rows, assign_parts(rows["user_idx"], split), kept_users, n_dropped


def _is_integral(ts: np.ndarray) -> bool:
    return bool(np.all(np.mod(ts, 1) == 0))


def _timestamps(ts: np.ndarray) -> np.ndarray:
    if len(ts) and _is_integral(ts):
        return ts.astype(np.int64)
    return ts.astype(np.float64)


def _check_domains(
    domains: list[str], n_items: np.ndarray, n_train: np.ndarray, items: str, log_: str, note: str
) -> None:
    """Every domain needs catalogue items and training positives; messages name the files.

    ``n_items`` and ``n_train`` count the catalogue items and training positives per domain;
    ``items`` and ``log_`` name the catalogue and the interaction log.
    """
    for d, name in enumerate(domains):
        if n_items[d] == 0:
            raise DataError(
                f"{items}: domain {name!r} is empty: no item of the catalogue belongs to it"
            )
        if n_train[d] == 0:
            raise DataError(
                f"{log_}: domain {name!r} is empty: it has no positive "
                f"interactions in the training part{note}"
            )


def _dropped_note(n_dropped: int, min_positives: int) -> str:
    if not n_dropped:
        return ""
    return f" ({n_dropped} user(s) with fewer than {min_positives} positives were dropped)"


def _no_test_error(log_: str, min_positives: int, note: str) -> DataError:
    return DataError(
        f"{log_}: the test part is empty: no user has at least {min_positives} positives{note}"
    )


def _count_parts(part: np.ndarray, domain_idx: np.ndarray, n_domains: int) -> np.ndarray:
    """(3, n_domains) positives per part (train, valid, test) and domain."""
    cells = part.astype(np.int64) * n_domains + domain_idx
    return np.bincount(cells, minlength=len(PART_NAMES) * n_domains).reshape(-1, n_domains)


def _meta(
    domains: list[str],
    item_domain: np.ndarray,
    n_users: int,
    counts: np.ndarray,
    n_dropped: int,
    split: SplitConfig,
    presplit: bool,
    source: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    """meta.json's keys common to every layout; ``counts`` is :func:`_count_parts`'s table."""
    offsets = np.r_[0, np.cumsum(np.bincount(item_domain, minlength=len(domains)))]
    return {
        "format": FORMAT_VERSION,
        "domains": domains,
        "domain_offsets": [int(x) for x in offsets],
        "n_users": int(n_users),
        "n_items": len(item_domain),
        "counts": {
            name: {dom: int(counts[p, d]) for d, dom in enumerate(domains)}
            for p, name in enumerate(PART_NAMES)
        },
        "users_dropped": int(n_dropped),
        "split": {**asdict(split), "presplit": presplit},
        "source": source or {},
        "seconds": round(time.perf_counter() - started, 3),
    }


def prepare(
    raw: RawLog,
    out: Path,
    split: SplitConfig | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    presplit: dict[str, RawLog] | None = None,
) -> Path:
    """Validate, filter positives, split and write a prepared dataset to ``out``.

    ``presplit`` maps "train" / "test" (and optionally "valid") to logs sharing ``raw``'s
    catalogue; they are used as given, a validation part being carved from the end of train
    when none is supplied. Otherwise ``raw.interactions`` is split per user chronologically.
    """
    out = Path(out)
    split = split or SplitConfig()
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to replace it")
    check_writable(out, folder=True)
    started = time.perf_counter()
    raw = validate(raw)
    domains = [str(d) for d in (raw.domains or [])]
    items = _encode_items(raw.items, domains)
    item_index = pd.Index(items["item"])
    item_domain = items["domain_idx"].to_numpy()

    if presplit is None:
        frame = _positive_frame(raw, split.rating_threshold)
        _, user_ids = pd.factorize(frame["user"], sort=True)
        user_index = pd.Index(user_ids)
        rows = _index_rows(frame, item_index, user_index, item_domain)
        rows, part, kept_users, n_dropped = _split_positives(rows, split)
        user_index = pd.Index(user_index.to_numpy()[kept_users])
    else:
        parts_raw = {name: validate(lg) for name, lg in presplit.items()}
        frames = {n: _positive_frame(lg, split.rating_threshold) for n, lg in parts_raw.items()}
        all_users = pd.concat([f["user"] for f in frames.values()], ignore_index=True)
        user_index = pd.Index(pd.unique(all_users)).sort_values()
        chunks, part_chunks = [], []
        for name, frame in frames.items():
            r = _first_click_only(_index_rows(frame, item_index, user_index, item_domain))
            chunks.append(r)
            if name == "train" and "valid" not in frames:
                part_chunks.append(carve_validation(r["user_idx"], split.valid_ratio))
            else:
                part_chunks.append(np.full(len(r["user_idx"]), PART_NAMES.index(name), np.int8))
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        part = np.concatenate(part_chunks)
        n_dropped = 0

    rows["timestamp"] = _timestamps(rows["timestamp"])
    dropped = _dropped_note(n_dropped, split.min_positives)
    counts = _count_parts(part, rows["domain_idx"], len(domains))
    n_items = np.bincount(item_domain, minlength=len(domains))
    inter_name = raw.interactions_origin.name
    _check_domains(domains, n_items, counts[TRAIN], raw.items_origin.name, inter_name, dropped)
    if not counts[TEST].any():
        if presplit is not None:
            raise DataError(
                f"{presplit['test'].interactions_origin.name}: the test part is empty: "
                "no positive interactions"
            )
        raise _no_test_error(inter_name, split.min_positives, dropped)
    if presplit is None:  # logged once the data is known to be good: an error is one line
        log.info("dropped %d users with fewer than %d positives", n_dropped, split.min_positives)

    meta = _meta(
        domains,
        item_domain,
        len(user_index),
        counts,
        n_dropped,
        split,
        presplit is not None,
        source,
        started,
    )
    _write_atomically(out, items, user_index, rows, part, meta)
    return out


def _write_items(path: Path, items: pd.DataFrame) -> None:
    items.loc[:, ["item_idx", "item", "domain"]].to_parquet(path, index=False)


def _write_users(path: Path, user_ids: np.ndarray, start: int = 0) -> None:
    """Users ``start, start + 1, ...`` with their original ids."""
    idx = np.arange(start, start + len(user_ids), dtype=np.int32)
    pd.DataFrame({"user_idx": idx, "user": user_ids}).to_parquet(path, index=False)


def _write_parts(paths: dict[str, Path], rows: dict[str, np.ndarray], part: np.ndarray) -> None:
    """One file per part (train, valid, test), columns user_idx, item_idx, domain_idx,
    timestamp, rows in the given order."""
    frame = pd.DataFrame(rows)
    for p, name in enumerate(PART_NAMES):
        frame.loc[part == p].to_parquet(paths[name], index=False)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """meta.json, last: a folder without it (or with the unfinished-output marker of
    :mod:`aftrec.outputs`) is not a dataset."""
    atomic_write_bytes(
        folder / "meta.json", (json.dumps(meta, indent=2, default=str) + "\n").encode()
    )


def _write_atomically(
    out: Path,
    items: pd.DataFrame,
    user_index: pd.Index,
    rows: dict[str, np.ndarray],
    part: np.ndarray,
    meta: dict[str, Any],
) -> None:
    with atomic_directory(out) as tmp:
        _write_items(tmp / "items.parquet", items)
        _write_users(tmp / "users.parquet", user_index.to_numpy())
        _write_parts({name: tmp / f"{name}.parquet" for name in PART_NAMES}, rows, part)
        _write_meta(tmp, meta)


__all__ = ["VALID", "SplitConfig", "prepare"]
