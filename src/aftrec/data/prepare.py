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
a temporary name and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aftrec.data.schema import RawLog, positives, validate
from aftrec.data.split import (
    PART_NAMES,
    TRAIN,
    VALID,
    SplitConfig,
    assign_parts,
    carve_validation,
    chronological_order,
    keep_active_users,
)
from aftrec.errors import DataError

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


def _timestamps(ts: np.ndarray) -> np.ndarray:
    if len(ts) and np.all(np.mod(ts, 1) == 0):
        return ts.astype(np.int64)
    return ts.astype(np.float64)


def _check_domains(
    domains: list[str], item_domain: np.ndarray, rows: np.ndarray, raw: RawLog, note: str
) -> None:
    """Every domain needs catalogue items and training positives; messages name the files."""
    n_items = np.bincount(item_domain, minlength=len(domains))
    n_rows = np.bincount(rows, minlength=len(domains))
    for d, name in enumerate(domains):
        if n_items[d] == 0:
            raise DataError(
                f"{raw.items_origin.name}: domain {name!r} is empty: "
                "no item of the catalogue belongs to it"
            )
        if n_rows[d] == 0:
            raise DataError(
                f"{raw.interactions_origin.name}: domain {name!r} is empty: it has no positive "
                f"interactions in the training part{note}"
            )


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
        rows = _first_click_only(_index_rows(frame, item_index, user_index, item_domain))
        active = keep_active_users(rows["user_idx"], split.min_positives)
        n_dropped = len(np.unique(rows["user_idx"][~active]))
        rows = {k: v[active] for k, v in rows.items()}
        # re-number the users that remain, keeping their original-id order
        kept_users, new_idx = np.unique(rows["user_idx"], return_inverse=True)
        rows["user_idx"] = new_idx.astype(np.int32)
        user_index = pd.Index(user_index.to_numpy()[kept_users])
        # still in chronological order: filtering and the order-preserving re-numbering above
        # keep _first_click_only's sort
        part = assign_parts(rows["user_idx"], split)
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
    dropped = (
        f" ({n_dropped} user(s) with fewer than {split.min_positives} positives were dropped)"
        if n_dropped
        else ""
    )
    _check_domains(domains, item_domain, rows["domain_idx"][part == TRAIN], raw, dropped)
    if not (part == PART_NAMES.index("test")).any():
        if presplit is not None:
            raise DataError(
                f"{presplit['test'].interactions_origin.name}: the test part is empty: "
                "no positive interactions"
            )
        raise DataError(
            f"{raw.interactions_origin.name}: the test part is empty: no user has at least "
            f"{split.min_positives} positives{dropped}"
        )
    if presplit is None:  # logged once the data is known to be good: an error is one line
        log.info("dropped %d users with fewer than %d positives", n_dropped, split.min_positives)

    offsets = np.r_[0, np.cumsum(np.bincount(item_domain, minlength=len(domains)))]
    counts = {
        name: {
            dom: int(((part == p) & (rows["domain_idx"] == d)).sum())
            for d, dom in enumerate(domains)
        }
        for p, name in enumerate(PART_NAMES)
    }
    meta = {
        "format": FORMAT_VERSION,
        "domains": domains,
        "domain_offsets": [int(x) for x in offsets],
        "n_users": len(user_index),
        "n_items": len(items),
        "counts": counts,
        "users_dropped": int(n_dropped),
        "split": {**asdict(split), "presplit": presplit is not None},
        "source": source or {},
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_atomically(out, force, items, user_index, rows, part, meta)
    return out


def _write_atomically(
    out: Path,
    force: bool,
    items: pd.DataFrame,
    user_index: pd.Index,
    rows: dict[str, np.ndarray],
    part: np.ndarray,
    meta: dict[str, Any],
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        items.loc[:, ["item_idx", "item", "domain"]].to_parquet(tmp / "items.parquet", index=False)
        users = pd.DataFrame(
            {"user_idx": np.arange(len(user_index), dtype=np.int32), "user": user_index.to_numpy()}
        )
        users.to_parquet(tmp / "users.parquet", index=False)
        frame = pd.DataFrame(rows)
        for p, name in enumerate(PART_NAMES):
            frame.loc[part == p].to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["VALID", "SplitConfig", "prepare"]
