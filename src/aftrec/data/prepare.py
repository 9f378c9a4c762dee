"""Turn a validated :class:`RawLog` into a prepared dataset directory (format 1 of
:mod:`aftrec.data.prepared`, which lays out and writes the files).

The directory is written under a temporary name and renamed into place
(:func:`aftrec.outputs.atomic_directory`), so an interrupted run leaves nothing that reads as
data, and the next run deletes what a killed one left.

Logs larger than memory go through :mod:`aftrec.data.stream` instead, which writes the same
rows partition by partition (format 2) through the same module.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aftrec.data.ids import factorize, positions
from aftrec.data.prepared import (
    WRITES,
    check_domains,
    count_parts,
    describe,
    dropped_note,
    encode_items,
    no_users_error,
    timestamps,
    unused_threshold_note,
    write_items,
    write_meta,
    write_parts,
    write_users,
)
from aftrec.data.schema import (
    RawLog,
    positives,
    positives_rule,
    rating_threshold_used,
    validate,
)
from aftrec.data.split import (
    PART_NAMES,
    TEST,
    TRAIN,
    VALID,
    SplitConfig,
    carve_validation,
    catalogue_hashes,
    first_click_only,
    split_positives,
    with_tie_keys,
    with_ties,
)
from aftrec.errors import DataError
from aftrec.outputs import atomic_directory, check_replaceable, check_writable

log = logging.getLogger(__name__)


def _positive_frame(log_: RawLog, rating_threshold: float) -> pd.DataFrame:
    pos = positives(log_.interactions, rating_threshold)
    if len(pos) == 0:
        rows = len(log_.interactions)
        raise DataError(
            f"{log_.interactions_origin.name}: no positive interactions in its {rows} row(s); "
            + positives_rule(log_.interactions, rating_threshold)
        )
    return pos.loc[:, ["user", "item", "timestamp"]]


def _index_rows(
    frame: pd.DataFrame, item_index: pd.Index, user_idx: np.ndarray, item_domain: np.ndarray
) -> dict[str, np.ndarray]:
    """The rows of ``frame`` by index: ``user_idx`` given (each row's position among the
    users), items found in ``item_index``."""
    item_idx = positions(item_index, frame["item"]).astype(np.int32)
    return {
        "user_idx": user_idx.astype(np.int32),
        "item_idx": item_idx,
        "domain_idx": item_domain[item_idx],
        "timestamp": frame["timestamp"].to_numpy(),
    }


def check_out(out: Path, force: bool) -> None:
    """``out`` may receive a prepared dataset: new, or (with ``force``) one to replace; called
    before a source is read, so that a refusal comes before minutes of reading."""
    check_writable(out, folder=True)
    check_replaceable(out, "meta.json", "prepared dataset", WRITES)  # before naming --force
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to replace it")


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
    split = with_ties(split or SplitConfig(), (source or {}).get("kind"))
    check_out(out, force)
    started = time.perf_counter()
    raw = validate(raw)
    domains = [str(d) for d in (raw.domains or [])]
    items = encode_items(raw.items, domains)
    item_index = pd.Index(items["item"])
    item_domain = items["domain_idx"].to_numpy()
    if presplit is not None and "valid" in presplit:  # nothing is split: no tie is ordered
        split = dataclasses.replace(split, ties="item", tie_seed=None)
    item_hash = catalogue_hashes(item_index, split)

    repeats: list[str] = []  # pre-split: later parts' pairs already in an earlier part
    if presplit is None:
        frame = _positive_frame(raw, split.rating_threshold)
        user_idx, user_index = factorize(frame["user"], sort=True)
        rows = _index_rows(frame, item_index, user_idx, item_domain)
        rows = with_tie_keys(rows, user_index, item_hash, split)
        del frame, user_idx  # the split needs the rows only: free the ids' text before it
        rows, part, kept_users, n_dropped = split_positives(rows, split)
        user_index = pd.Index(user_index.to_numpy()[kept_users])
    else:
        parts_raw = {name: validate(lg) for name, lg in presplit.items()}
        frames = {n: _positive_frame(lg, split.rating_threshold) for n, lg in parts_raw.items()}
        all_users = pd.concat([f["user"] for f in frames.values()], ignore_index=True)
        user_index = pd.Index(pd.unique(all_users)).sort_values()
        chunks, part_chunks = [], []
        earlier = np.empty(0, dtype=np.int64)  # (user, item) keys of the parts before
        for name, frame in frames.items():
            user_idx = positions(user_index, frame["user"])
            r = _index_rows(frame, item_index, user_idx, item_domain)
            r = first_click_only(with_tie_keys(r, user_index, item_hash, split))
            r.pop("tie", None)  # the order carve_validation reads is made
            key = r["user_idx"].astype(np.int64) * len(item_index) + r["item_idx"]
            again = np.isin(key, earlier)
            if again.any():  # as within one log: the first click of a pair, not a repeat
                repeats.append(f"{int(again.sum())} {name} positive(s)")
                r, key = {k: v[~again] for k, v in r.items()}, key[~again]
            earlier = np.concatenate([earlier, key])
            chunks.append(r)
            if name == "train" and "valid" not in frames:
                part_chunks.append(carve_validation(r["user_idx"], split.valid_ratio))
            else:
                part_chunks.append(np.full(len(r["user_idx"]), PART_NAMES.index(name), np.int8))
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        part = np.concatenate(part_chunks)
        n_dropped = 0

    rows["timestamp"] = timestamps(rows["timestamp"])
    dropped = dropped_note(n_dropped, split.min_positives)
    counts = count_parts(part, rows["domain_idx"], len(domains))
    n_items = np.bincount(item_domain, minlength=len(domains))
    inter_name = raw.interactions_origin.name
    if not len(user_index):  # every user dropped (a pre-split drops none)
        rule = positives_rule(raw.interactions, split.rating_threshold)
        raise no_users_error(inter_name, n_dropped, split.min_positives, rule)
    check_domains(domains, n_items, counts[TRAIN], raw.items_origin.name, inter_name, dropped)
    if presplit is not None and not counts[TEST].any():  # (a split gives each user a test)
        gone = " and ".join(repeats)  # e.g. "2 test positive(s)"
        raise DataError(
            f"{presplit['test'].interactions_origin.name}: the test part is empty: "
            "no positive interactions"
            + (f" once {gone} already in an earlier part are dropped" if gone else "")
        )
    if presplit is None:  # logged once the data is known to be good: an error is one line
        log.info("dropped %d users with fewer than %d positives", n_dropped, split.min_positives)
    if repeats:
        log.info(
            "dropped %s whose (user, item) is already in an earlier part (train, then "
            "valid): a pair counts once, at its first click",
            " and ".join(repeats),
        )
    if presplit is not None:
        _note_time_order(rows, part)
    logs = [raw] if presplit is None else list(presplit.values())
    threshold_used = any(rating_threshold_used(lg.interactions.columns) for lg in logs)
    columns = {str(c) for lg in logs for c in lg.interactions.columns}
    note = unused_threshold_note(columns, split, inter_name)
    if note:
        log.info(note)

    meta = describe(
        domains,
        item_domain,
        len(user_index),
        counts,
        n_dropped,
        split,
        presplit is not None,
        source,
        started,
        threshold_used,
    )
    _write_atomically(out, items, user_index, rows, part, meta, force)
    return out


def _note_time_order(rows: dict[str, np.ndarray], part: np.ndarray) -> None:
    """A pre-split is used as given; say so when users' test clicks come before their last
    training click (the split is then not chronological)."""
    user, ts = rows["user_idx"], rows["timestamp"]
    n_users = int(user.max(initial=-1)) + 1
    last_train = np.full(n_users, -np.inf)
    np.maximum.at(last_train, user[part == TRAIN], ts[part == TRAIN].astype(np.float64))
    first_test = np.full(n_users, np.inf)
    np.minimum.at(first_test, user[part == TEST], ts[part == TEST].astype(np.float64))
    early = int((first_test < last_train).sum())
    if early:
        log.warning(
            "%d user(s) have a test click before their last training click: the pre-split "
            "is used as given, so their test is not their most recent behaviour",
            early,
        )


def _write_atomically(
    out: Path,
    items: pd.DataFrame,
    user_index: pd.Index,
    rows: dict[str, np.ndarray],
    part: np.ndarray,
    meta: dict[str, Any],
    force: bool,
) -> None:
    with atomic_directory(out, replace=force) as tmp:
        write_items(tmp / "items.parquet", items)
        write_users(tmp / "users.parquet", user_index.to_numpy())
        write_parts({name: tmp / f"{name}.parquet" for name in PART_NAMES}, rows, part)
        write_meta(tmp, meta)


__all__ = ["VALID", "SplitConfig", "prepare"]
