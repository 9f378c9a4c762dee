"""The prepared-dataset format: the one module that lays it out, writes its files and reads
its description. :mod:`aftrec.data.prepare` (in memory) and :mod:`aftrec.data.stream`
(partitioned, for logs larger than memory) both write through it; :class:`aftrec.data.dataset.
Dataset` reads the tables.

Format 1 (all Parquet through pyarrow, plus one JSON file)::

    DIR/meta.json        domains, per-domain item ranges, counts, split settings, source
    DIR/items.parquet    item_idx, item (original id), domain
    DIR/users.parquet    user_idx, user (original id)
    DIR/train.parquet    user_idx, item_idx, domain_idx, timestamp   (positives only)
    DIR/valid.parquet    same columns
    DIR/test.parquet     same columns

Format 2, "partitioned" (``meta["layout"] == PARTITIONED``): ``meta.json`` and
``items.parquet`` as above, and the users and parts split into partition files
``DIR/users/part-00000.parquet``, ``DIR/train/part-00000.parquet``, ... (:func:`partition_file`).

Items are numbered so that each domain is one contiguous range ``[offset[d], offset[d+1])``;
full ranking inside a domain is then a slice of the item table. ``meta.json`` is written last:
a folder without it (or with the unfinished-output marker of :mod:`aftrec.outputs`) is not a
dataset.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from aftrec.data.schema import rating_threshold_used
from aftrec.data.split import PART_NAMES, SplitConfig
from aftrec.errors import DataError
from aftrec.outputs import atomic_write_bytes, unfinished

FORMAT_VERSION = 1
FORMAT_PARTITIONED = FORMAT_VERSION + 1


def read_meta(path: Path) -> dict[str, Any]:
    """A prepared dataset's meta.json (domains, counts, partitions, ...), without its tables."""
    meta_path = Path(path) / "meta.json"
    if unfinished(path):
        raise DataError(
            f"{path} is an unfinished dataset (`aftrec prepare` was interrupted); prepare it again"
        )
    if not meta_path.is_file():
        raise DataError(f"{path} is not a prepared dataset (no meta.json); run `aftrec prepare`")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: prepared dataset is unreadable: {exc}") from exc
    check_meta(meta, meta_path)
    return meta


#: the most domains a dataset may have: domain indexes are stored as int16
MAX_DOMAINS = 2**15 - 1


class _Meta(BaseModel):
    """What the readers rely on in ``meta.json``; other keys pass through."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal[1, 2]
    domains: list[StrictStr] = Field(min_length=1, max_length=MAX_DOMAINS)
    domain_offsets: list[StrictInt]
    n_users: StrictInt = Field(ge=0)
    n_items: StrictInt = Field(ge=1)
    counts: dict[Literal["train", "valid", "test"], dict[StrictStr, StrictInt]]

    @model_validator(mode="after")
    def _consistent(self) -> _Meta:
        off, n = self.domain_offsets, len(self.domains)
        if len(off) != n + 1 or off[0] != 0 or off[-1] != self.n_items:
            raise ValueError(
                f"domain_offsets must have {n + 1} entries from 0 to n_items ({self.n_items})"
            )
        if any(b <= a for a, b in itertools.pairwise(off)):
            raise ValueError("domain_offsets must increase: every domain has items")
        if len(set(self.domains)) != n:
            raise ValueError("domains must be distinct")
        for part, per_domain in self.counts.items():
            if set(per_domain) != set(self.domains):
                raise ValueError(f"counts.{part} must have one count per domain")
        return self


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """A :class:`DataError` naming ``where`` and the first thing in ``meta`` the readers cannot
    rely on (a field missing or of the wrong type, offsets that do not cut ``n_items`` into
    the domains, counts of other domains, a format this version does not read)."""
    try:
        _Meta.model_validate(meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "meta.json"
        raise DataError(
            f"{where} is not a valid prepared dataset description: {field}: {first['msg']}"
        ) from exc


PARTITIONED = "partitioned"  # meta["layout"] of format 2 (aftrec.data.stream)
#: every name a prepared dataset holds, in either format
WRITES = frozenset(
    {"meta.json", "items.parquet", "users.parquet", "users"}
    | {f"{part}.parquet" for part in PART_NAMES}
    | set(PART_NAMES)
)


def partition_file(path: Path, kind: str, p: int) -> Path:
    """Partition ``p``'s file of ``kind`` ("users", "train", "valid" or "test") in format 2."""
    return Path(path) / kind / f"part-{p:05d}.parquet"


def encode_items(items: pd.DataFrame, domains: list[str]) -> pd.DataFrame:
    """Number items domain by domain (domain order, then original id) -> contiguous ranges."""
    if len(domains) > MAX_DOMAINS:
        raise DataError(
            f"the catalogue has {len(domains):,} domains; aftrec handles at most {MAX_DOMAINS:,}"
        )
    frame = items.assign(
        domain_idx=pd.Categorical(items["domain"], categories=domains).codes.astype(np.int16)
    )
    frame = frame.sort_values(["domain_idx", "item"], kind="stable").reset_index(drop=True)
    frame.insert(0, "item_idx", np.arange(len(frame), dtype=np.int32))
    return frame


def is_integral(ts: np.ndarray) -> bool:
    """Whether every value is a whole number that int64 holds (1e300 is whole, but not one)."""
    if ts.dtype.kind in "iu":
        return True
    return bool(np.all(np.mod(ts, 1) == 0) and np.all(np.abs(ts) < 2.0**63))


def timestamps(ts: np.ndarray) -> np.ndarray:
    if len(ts) and is_integral(ts):
        return ts.astype(np.int64)
    return ts.astype(np.float64)


def check_domains(
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


def dropped_note(n_dropped: int, min_positives: int) -> str:
    if not n_dropped:
        return ""
    return f" ({n_dropped} user(s) with fewer than {min_positives} positives were dropped)"


def no_users_error(log_: str, n_dropped: int, min_positives: int, rule: str) -> DataError:
    """Every user of ``log_`` was dropped by ``--min-positives``: said so, with the positives
    ``rule`` (:func:`~aftrec.data.schema.positives_rule`) that counted them, rather than as
    the first domain found empty. Every kept user has a test positive, so this is also the
    only way the test part of a split log is empty. ``n_dropped`` counts the users with a
    positive only (the others are no user of the positives), so it is not said to be all."""
    return DataError(
        f"{log_}: no user is left: none has {min_positives} or more positives, and the "
        f"{n_dropped} user(s) with at least one were dropped (--min-positives; {rule})"
    )


def unused_threshold_note(columns: Collection[str], split: SplitConfig, log_: str) -> str | None:
    """The note for a ``--rating-threshold`` other than the default that had no effect on
    ``log_`` (of these ``columns``: a label column, or no rating column), else ``None``; the
    default is not noted, as it was not asked for."""
    if rating_threshold_used(columns) or split.rating_threshold == SplitConfig.rating_threshold:
        return None
    why = (
        "has a label column, and positives are rows with label > 0"
        if "label" in columns
        else "has no rating column, so every row is a positive"
    )
    return f"note: --rating-threshold {split.rating_threshold:g} had no effect: {log_} {why}"


def count_parts(part: np.ndarray, domain_idx: np.ndarray, n_domains: int) -> np.ndarray:
    """(3, n_domains) positives per part (train, valid, test) and domain."""
    cells = part.astype(np.int64) * n_domains + domain_idx
    return np.bincount(cells, minlength=len(PART_NAMES) * n_domains).reshape(-1, n_domains)


#: meta.json's keys of the tie rule (:class:`~aftrec.data.split.SplitConfig`)
TIES = ("ties", "tie_seed")


def describe(
    domains: list[str],
    item_domain: np.ndarray,
    n_users: int,
    counts: np.ndarray,
    n_dropped: int,
    split: SplitConfig,
    presplit: bool,
    source: dict[str, Any] | None,
    started: float,
    threshold_used: bool = True,
) -> dict[str, Any]:
    """meta.json's keys common to every layout; ``counts`` is :func:`count_parts`'s table.
    ``threshold_used``: whether the rating threshold decided the positives
    (:func:`~aftrec.data.schema.rating_threshold_used`); when not, the split records none
    (null), so that two preparations that differ only in an unused threshold are the same
    dataset."""
    offsets = np.r_[0, np.cumsum(np.bincount(item_domain, minlength=len(domains)))]
    # a pre-split uses only the threshold and, with no validation file, the valid ratio
    used: dict[str, Any] = {**asdict(split), "presplit": presplit}
    if not threshold_used:
        used["rating_threshold"] = None
    if presplit:
        used = {k: used[k] for k in ("rating_threshold", "valid_ratio", "presplit", *TIES)}
    if split.ties != "random":  # "item", the rule before there was a choice, is unwritten:
        # a dataset prepared again by this version has the meta.json (and fingerprint) it had
        used = {k: v for k, v in used.items() if k not in TIES}
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
        "split": used,
        "source": source or {},
        "seconds": round(time.perf_counter() - started, 3),
    }


def write_items(path: Path, items: pd.DataFrame) -> None:
    frame = items.loc[:, ["item_idx", "item", "domain"]]
    if isinstance(frame["item"].dtype, pd.StringDtype):  # text ids held as pyarrow strings
        # typed as ``astype(str)`` types them, as --streaming writes them: the same file on
        # any pandas (2.3 writes object text, where a StringDtype column would be large_string)
        frame["item"] = frame["item"].astype(str)
    frame.to_parquet(path, index=False)


def write_users(path: Path, user_ids: np.ndarray, start: int = 0) -> None:
    """Users ``start, start + 1, ...`` with their original ids."""
    idx = np.arange(start, start + len(user_ids), dtype=np.int32)
    user = pd.Series(user_ids)
    if user.dtype == object:  # text ids; so typed even with none (an empty partition)
        user = user.astype("str")
    pd.DataFrame({"user_idx": idx, "user": user}).to_parquet(path, index=False)


def write_parts(paths: dict[str, Path], rows: dict[str, np.ndarray], part: np.ndarray) -> None:
    """One file per part (train, valid, test), columns user_idx, item_idx, domain_idx,
    timestamp, rows in the given order."""
    frame = pd.DataFrame(rows)
    for p, name in enumerate(PART_NAMES):
        frame.loc[part == p].to_parquet(paths[name], index=False)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """meta.json, last: a folder without it (or with the unfinished-output marker of
    :mod:`aftrec.outputs`) is not a dataset."""
    atomic_write_bytes(
        folder / "meta.json", (json.dumps(meta, indent=2, default=str) + "\n").encode()
    )
