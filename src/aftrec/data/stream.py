"""Streaming, partitioned preparation for interaction logs larger than memory.

``aftrec prepare --streaming`` gives the same rows, parts and counts as the in-memory
:func:`aftrec.data.prepare.prepare`, written partition by partition (format 2 of
:mod:`aftrec.data.prepared`)::

    DIR/meta.json                  format 1's keys, plus "layout": "partitioned", "partitions"
    DIR/items.parquet              as format 1 (each domain one contiguous item range)
    DIR/users/part-00000.parquet   user_idx, user  (the users [start_0, end_0) of partition 0)
    DIR/train/part-00000.parquet   user_idx, item_idx, domain_idx, timestamp (their positives)
    DIR/valid/part-00000.parquet   same columns
    DIR/test/part-00000.parquet    same columns
    ...                            part-00001, ... for the next partitions

Users are numbered partition by partition and, inside a partition, by original id; rows are
sorted by (user_idx, timestamp), a user's rows at one timestamp in the order of the tie rule
(:mod:`aftrec.data.split`), so the partitions concatenated in order are sorted by user then
time, as format 1 is.

Algorithm, with memory bounded by one partition plus the item catalogue:

Pass 1
    Read the log (one CSV or Parquet file, or a folder of parts) in record batches with
    ``pyarrow.dataset``; check each batch as :func:`aftrec.data.schema.validate` checks a whole
    log (messages name the part file and its row or line); map items to their ``item_idx``;
    scatter every row (positive or not, so that duplicate rows are found as in memory) to one of
    ``P = ceil(rows / partition_rows)`` temporary bucket files by a stable hash of the original
    user id, so that all of a user's rows land in the same bucket.
Pass 2
    Load one bucket at a time and apply the in-memory rules to it: duplicate rows (same user,
    item and timestamp) are an error, first click only per (user, item), users with fewer than
    ``min_positives`` positives dropped, chronological split per user. Bucket ``p`` becomes
    partition ``p``.
End
    The checks that need the whole log (in this order: the first duplicate row in file order,
    some user is left, every domain has training positives) run on counts accumulated over the
    buckets, before the temporary folder beside ``--out`` is renamed into place.

Unlike the in-memory path, a log with several problems reports the first in reading order
(batch by batch), and the "bad row(s)" counts of value errors cover the batch that was read
(the whole file, and then the messages are the in-memory ones, when it holds up to
:data:`BATCH_ROWS` rows).
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
from tqdm import tqdm

from aftrec.data.ids import arrow_text, as_text, factorize
from aftrec.data.prepare import check_out
from aftrec.data.prepared import (
    FORMAT_PARTITIONED,
    PARTITIONED,
    check_domains,
    count_parts,
    describe,
    dropped_note,
    encode_items,
    is_integral,
    no_users_error,
    partition_file,
    unused_threshold_note,
    write_items,
    write_meta,
    write_parts,
    write_users,
)
from aftrec.data.schema import (
    IN_ALL,
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    Origin,
    check_catalogue,
    check_values,
    duplicate_row_error,
    harmonise_ids,
    locate_items,
    positive_mask,
    positives_rule,
    rating_threshold_used,
    require_columns,
    require_unique_columns,
    text_dates,
)
from aftrec.data.sources.generic import (
    CSV_COMPRESSION,
    ID_COLUMNS,
    STREAM_COMPRESSION,
    CsvOrigin,
    check_float_ids,
    file_kind,
    folder_parts,
    header,
    read_table,
    same_columns,
)
from aftrec.data.split import (
    PART_NAMES,
    TRAIN,
    SplitConfig,
    catalogue_hashes,
    chronological_order,
    split_positives,
    with_tie_keys,
    with_ties,
)
from aftrec.errors import DataError
from aftrec.outputs import atomic_directory

log = logging.getLogger(__name__)

#: integers above this are not all exact as float64
FLOAT_EXACT = 2**53

DEFAULT_PARTITION_ROWS = 4_000_000  # rows of the log per partition: bounds pass 2's memory
MAX_PARTITIONS = 1000  # one open bucket file each in pass 1
BATCH_ROWS = 1 << 20  # rows checked and scattered at a time in pass 1
CSV_BLOCK_BYTES = 1 << 24
_ROW_BITS = 40  # a row's sequence number: file number << 40 | row in that file
OPTIONAL_COLUMNS = ("domain", "rating", "label")
#: a CSV log's columns of numbers, read as text and typed batch by batch (:func:`_as_numbers`)
NUMBER_COLUMNS = ("timestamp", "rating", "label")


# ---------------------------------------------------------------------------------------------
# Reading the log


class _ShiftedOrigin(Origin):
    """Names rows of a batch that starts at row ``offset`` of its file."""

    def __init__(self, base: Origin, offset: int) -> None:
        super().__init__(base.name, base.line_base)
        self.base, self.offset = base, offset

    def row(self, index: int) -> str:
        return self.base.row(index + self.offset)


@dataclass
class _Log:
    """The interaction log's files, read as one ``pyarrow`` dataset."""

    path: Path
    kind: str  # "Parquet" or "CSV"
    files: list[Path]
    dataset: pads.Dataset
    columns: list[str]  # the columns read: required ones plus the optional ones present
    origins: list[Origin] = field(default_factory=list)
    #: per column of numbers, its first batch of true/false and of numbers (:meth:`_one_kind`)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)
    #: whether the timestamps are ISO-8601 text, and their first value (:func:`text_dates`),
    #: once a batch has held a timestamp
    times: tuple[bool, object] | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    def locate(self, seq: int) -> str:
        """A row named by its sequence number (see :data:`_ROW_BITS`)."""
        return self.origins[seq >> _ROW_BITS].row(seq & ((1 << _ROW_BITS) - 1))

    def empty_frame(self) -> pd.DataFrame:
        """No rows, the columns' pandas types: what the batches will look like."""
        return self._as_read_in_memory(self.dataset.schema.empty_table()).to_pandas()

    def estimate_rows(self) -> int:
        """Rows in the log: exact for Parquet (file footers); for CSV, from the file sizes and
        the first file's bytes per line, and a compressed file's lines counted as it is
        decompressed (its size says little of its rows)."""
        if self.kind == "Parquet":
            return int(self.dataset.count_rows())
        packed = [f for f in self.files if f.suffix.lower() in CSV_COMPRESSION]
        plain = [f for f in self.files if f not in packed]
        rows = 0
        for file in packed:
            try:
                with CSV_COMPRESSION[file.suffix.lower()](file, "rb") as fh:
                    blocks = iter(lambda: fh.read(1 << 24), b"")
                    rows += sum(block.count(b"\n") for block in blocks)
            except (OSError, EOFError) as exc:  # truncated, or a bad checksum
                raise DataError(f"{file}: cannot be read as CSV: {exc}") from exc
        if plain:
            with open(plain[0], "rb") as fh:
                head = fh.read(1 << 20)
            per_row = len(head) / max(head.count(b"\n"), 1)
            rows += math.ceil(sum(f.stat().st_size for f in plain) / per_row)
        return rows

    def tables(self) -> Iterator[tuple[int, int, pa.Table, str]]:
        """(file number, first row in the file, rows, which rows the "bad row(s)" counts of
        messages cover) in file order, about BATCH_ROWS rows at a time (one table of lookahead
        tells whether a table is a whole file)."""
        whole = IN_ALL if len(self.files) == 1 else "in this file"
        for number, fragment in enumerate(self.dataset.get_fragments()):
            offset = 0
            previous: pa.Table | None = None
            for table in map(self._as_read_in_memory, self._fragment_tables(number, fragment)):
                self._one_kind(number, offset + (previous.num_rows if previous else 0), table)
                if previous is not None:
                    yield number, offset, previous, f"in this batch of {previous.num_rows} rows"
                    offset += previous.num_rows
                previous = table
            if previous is not None:
                last = f"in this batch of {previous.num_rows} rows" if offset else whole
                yield number, offset, previous, last

    def _one_kind(self, number: int, offset: int, table: pa.Table) -> None:
        """A CSV column of numbers typed true/false in one batch and numbers in another is
        text in memory, where pandas reads the file whole, and its first true/false value is
        refused as non-numeric there: so it is here, once both kinds have been read."""
        if self.kind != "CSV":
            return
        for name in NUMBER_COLUMNS:
            index = table.schema.get_field_index(name)
            if index < 0:
                continue
            column = table.column(index)
            if column.null_count == len(column):
                continue
            if pa.types.is_boolean(column.type):
                kind = "bool"
            elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
                kind = "number"
            else:
                continue
            seen = self.kinds.setdefault(name, {})
            if kind == "bool" and kind not in seen:
                i = int(pc.index(pc.is_valid(column), True).as_py())
                where = self.origins[number].row(offset + i)
                seen[kind] = f"{where}: non-numeric value {str(column[i].as_py())!r}"
            seen.setdefault(kind, "")
            if len(seen) == 2:
                raise DataError(
                    f"{seen['bool']} in column {name!r} (true/false values beside numbers)"
                )

    def _fragment_tables(self, number: int, fragment: pads.Fragment) -> Iterator[pa.Table]:
        pending: list[pa.RecordBatch] = []
        n = 0
        try:
            for batch in fragment.to_batches(
                schema=self.dataset.schema,
                columns=self.columns,
                batch_size=BATCH_ROWS,
                batch_readahead=1,
            ):
                pending.append(batch)
                n += batch.num_rows
                if n >= BATCH_ROWS:
                    yield pa.Table.from_batches(pending)
                    pending, n = [], 0
        except (pa.ArrowException, OSError, EOFError) as exc:
            raise DataError(f"{self.files[number]}: cannot be read as {self.kind}: {exc}") from exc
        if pending:
            yield pa.Table.from_batches(pending)

    def _as_read_in_memory(self, table: pa.Table) -> pa.Table:
        """Ids as text, as :func:`~aftrec.data.sources.generic.read_table` reads them (a
        whole float as an integer: pyarrow writes 1.0 as "1"); a CSV log's numbers typed as
        pandas types them (:func:`_as_numbers`)."""
        for name in ID_COLUMNS:  # as read_table reads them (ids_as_read)
            index = table.schema.get_field_index(name)
            if index < 0 or pa.types.is_string(table.schema.field(index).type):
                continue
            column = table.column(index)
            if name != "domain" and pa.types.is_signed_integer(column.type):
                table = table.set_column(index, name, column.cast(pa.int64()))
                continue
            if name != "domain" and pa.types.is_floating(column.type):
                # the integers they stand for (a missing one is reported as such)
                check_float_ids(column.to_numpy(zero_copy_only=False), name, str(self.path))
                if not pc.any(pc.is_nan(column)).as_py():
                    table = table.set_column(index, name, column.cast(pa.int64()))
                    continue
                column = pc.if_else(pc.is_nan(column), None, column).cast(pa.int64())
            table = table.set_column(index, name, column.cast(pa.string()))
        if self.kind == "CSV":
            for name in NUMBER_COLUMNS:
                index = table.schema.get_field_index(name)
                if index >= 0:
                    table = table.set_column(index, name, _as_numbers(table.column(index)))
        return table


def _as_numbers(column: pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A CSV column read as text, typed as pandas' ``read_csv`` types a whole column: int64 if
    every value is an integer, else float64 or bool, else text, which the checks then refuse as
    in memory. pyarrow would infer one type from the first block or part and refuse a 4.5 in a
    later one; here each batch is typed on its own (timestamps meet as float64 in the buckets).

    Integers take pyarrow's cast (it reads hexadecimal, which pandas does not, so text with an
    x is left to pandas); anything else is parsed by pandas' own reader, each value quoted so
    that a comma or line break in it stays inside its field. Only the values present go to
    pandas (a column of nulls alone takes the cast), and the nulls are put back in their
    places: written as empty lines, a last one was dropped by pandas, and the column came
    back a row short of its batch."""
    if not len(column):
        return column
    if not pc.any(pc.match_substring(column, "x", ignore_case=True)).as_py():
        try:
            return column.cast(pa.int64())
        except pa.ArrowInvalid:
            pass
    present = pc.drop_null(column)
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(present, '"', '""'), '"', "")
    flat = quoted.combine_chunks()
    whole = pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)
    values = pd.read_csv(
        io.StringIO(pc.binary_join(whole, "\n")[0].as_py()),
        header=None, names=["v"], keep_default_na=False, na_values=[""], low_memory=False,
    )["v"]  # fmt: skip
    if values.dtype == "str":
        values = values.astype(object)
    try:
        typed = pa.array(values, from_pandas=True)
    except (pa.ArrowException, OverflowError):  # integers beyond int64, as Python ints: the
        # checks refuse them as in memory, where they are those ints (a rare path, one loop)
        typed = pa.array([None if pd.isna(v) else str(v) for v in values], pa.string())
    if len(typed) == len(column):
        return typed
    valid = pc.is_valid(column).to_numpy()
    return typed.take(pa.array(np.cumsum(valid) - 1, mask=~valid))  # a null where one was


def _list_files(path: Path) -> tuple[list[Path], str]:
    """The files of a log (one file, or a folder's Parquet or CSV parts) and their kind."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_file():
        files, kind = [path], file_kind(path)
    else:
        files, kind = folder_parts(path)
    for file in files:
        suffix = file.suffix.lower()
        if suffix in CSV_COMPRESSION and suffix not in STREAM_COMPRESSION:
            raise DataError(
                f"{file}: --streaming reads CSV files plain or compressed as "
                f"{' or '.join(STREAM_COMPRESSION)}, not {suffix} (pyarrow's reader cannot); "
                "decompress it, compress it as .gz, or prepare without --streaming"
            )
        if suffix in STREAM_COMPRESSION and file.suffix != suffix:
            raise DataError(
                f"{file}: write its suffix in lower case ({suffix}) for "
                "--streaming, whose reader decompresses by a lower-case suffix only"
            )
    return files, kind


def _open_log(path: Path, files: list[Path], kind: str) -> _Log:
    """Open the log's files as one dataset and check that each has the required columns."""
    if kind == "Parquet":
        fmt: pads.FileFormat = pads.ParquetFileFormat()
        origins = [Origin(str(f), None) for f in files]
    else:
        fmt = pads.CsvFileFormat(
            parse_options=pacsv.ParseOptions(newlines_in_values=True),  # quoted line breaks
            # ids as written ("007"), and only an empty field missing, as read_table reads them
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys((*ID_COLUMNS, *NUMBER_COLUMNS), pa.string()),
                strings_can_be_null=True,
                null_values=[""],
            ),
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        )
        origins = [CsvOrigin(str(f), 2, f) for f in files]
    for file in files:
        require_unique_columns(header(file), str(file))
    try:
        dataset = pads.dataset([str(f) for f in files], format=fmt)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{files[0]}: cannot be read as {kind}: {exc}") from exc
    for file, origin, fragment in zip(files, origins, dataset.get_fragments(), strict=True):
        try:
            schema = fragment.physical_schema
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{file}: cannot be read as {kind}: {exc}") from exc
        require_columns(schema.empty_table().to_pandas(), INTERACTION_COLUMNS, origin)
    if kind == "Parquet":
        same_columns(files)
    else:
        for file in files[1:]:
            if header(file) != header(files[0]):
                raise DataError(
                    f"{file}: its columns {header(file)} differ from those of {files[0]} "
                    f"{header(files[0])}; give every part the same columns"
                )
    names = dataset.schema.names
    columns = [*INTERACTION_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
    return _Log(Path(path), kind, files, dataset, columns, origins)


# ---------------------------------------------------------------------------------------------
# The catalogue and the user ids


class _Catalogue:
    """The item catalogue, numbered as format 1 numbers it, with lookups for batches."""

    def __init__(self, items: pd.DataFrame, log_items: pd.Series, origin: Origin) -> None:
        # item ids get the type they would have in memory, where the whole log is one column.
        # Text ids in the log against an integer catalogue: in memory, ids all written as
        # integers are compared as integers, and any other text id matches no catalogue item
        # (a catalogue integer as text is written plainly), so the integers are kept here and
        # such an id is reported as unknown by `locate`
        if pd.api.types.is_string_dtype(log_items) and pd.api.types.is_integer_dtype(items["item"]):
            cat_item = items["item"].astype(np.int64)
        else:
            _, cat_item = harmonise_ids(log_items, items["item"])
        self.domains = [str(d) for d in sorted(items["domain"].unique())]
        self.items = encode_items(items.assign(item=cat_item), self.domains)
        self.index = pd.Index(self.items["item"])
        self.domain_names = self.items["domain"].to_numpy()
        self.item_domain = self.items["domain_idx"].to_numpy()
        self.origin = origin

    def locate(self, frame: pd.DataFrame, origin: Origin, scope: str) -> np.ndarray:
        """Each row's ``item_idx`` (:func:`~aftrec.data.schema.locate_items`), the batch's ids
        taken in the catalogue's type."""
        like = pd.Series([], dtype=self.index.dtype)
        batch_item, cat_item = harmonise_ids(frame["item"], like)
        index = self.index
        if cat_item.dtype != like.dtype:
            if like.dtype != np.int64 or not pd.api.types.is_string_dtype(batch_item):
                raise DataError(
                    f"{origin.name}: column 'item' holds {frame['item'].dtype} ids here, "
                    f"not the {like.dtype} ids of the rest of the log"
                )
            index = self.index.astype(str)  # a text id that is no plain integer is unknown
        return locate_items(
            frame.assign(item=batch_item), index, self.domain_names, origin, self.origin, scope
        )


def _user_kind(users: pd.Series) -> str:
    """How user ids are kept: "int" (int64), "float" (float64) or "str"."""
    if pd.api.types.is_integer_dtype(users):
        return "int"
    if pd.api.types.is_float_dtype(users):
        return "float"
    return "str"


def _user_array(users: pd.Series, kind: str, origin: Origin) -> np.ndarray | pa.Array:
    """A batch's user ids as ``kind`` ("int", "float" or "str": pyarrow large strings)."""
    if kind == "str":
        text = arrow_text(users)
        if text is None:
            return pa.array(users.astype(str).to_numpy(dtype=object), pa.large_string())
        return text.combine_chunks().cast(pa.large_string())
    if _user_kind(users) != kind:
        raise DataError(
            f"{origin.name}: column 'user' holds {users.dtype} ids here, "
            f"not the {kind} ids of the rest of the log"
        )
    return users.to_numpy(np.int64 if kind == "int" else np.float64)


def _bucket_of(users: np.ndarray | pa.Array, n_buckets: int) -> np.ndarray:
    """A stable bucket per user id: the same id gives the same bucket in every run (text ids:
    each distinct id hashed once, as a str, as ``pd.util.hash_array`` hashes an object array
    of them)."""
    if isinstance(users, pa.Array):
        encoded = pc.dictionary_encode(users)
        distinct = encoded.dictionary.to_numpy(zero_copy_only=False)
        per_id = (pd.util.hash_array(distinct) % np.uint64(n_buckets)).astype(np.int64)
        return per_id[encoded.indices.to_numpy()]
    return (pd.util.hash_array(users) % np.uint64(n_buckets)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Pass 1: check, map items, scatter rows to buckets


def _bucket_schema(kind: str) -> pa.Schema:
    user = {"int": pa.int64(), "float": pa.float64(), "str": pa.large_string()}[kind]
    return pa.schema(
        [
            ("user", user),
            ("item_idx", pa.int32()),
            ("timestamp", pa.float64()),
            ("positive", pa.bool_()),
            ("seq", pa.int64()),
        ]
    )


def _scatter(
    log_: _Log,
    catalogue: _Catalogue,
    buckets: list[Path],
    split: SplitConfig,
    estimate: int,
    progress: bool,
) -> tuple[bool, int, int]:
    """Pass 1 into the ``buckets`` files; whether every positive's timestamp is whole, and
    the rows and positives read."""
    kind = _user_kind(log_.empty_frame()["user"])
    schema = _bucket_schema(kind)
    n_buckets = len(buckets)
    integral, n_rows, n_positive = True, 0, 0
    with ExitStack() as stack:
        writers = [stack.enter_context(pa.ipc.new_stream(str(b), schema)) for b in buckets]
        bar = stack.enter_context(
            tqdm(total=estimate, unit="row", unit_scale=True, desc="read", disable=not progress)
        )
        for number, offset, table, scope in log_.tables():
            n = table.num_rows
            origin = _ShiftedOrigin(log_.origins[number], offset)
            frame = table.to_pandas()
            if log_.times is None and frame["timestamp"].notna().any():
                # the first value present decides, as in memory: a batch without one (an
                # empty part, or a part of a header only) decides nothing for the later ones
                log_.times = text_dates(frame["timestamp"])
            frame = check_values(frame, origin, scope, log_.times)
            item_idx = catalogue.locate(frame, origin, scope).astype(np.int32)
            positive = positive_mask(frame, split.rating_threshold)
            if positive is None:
                positive = np.ones(n, dtype=bool)
            exact = frame["timestamp"].to_numpy()
            far = (exact > FLOAT_EXACT) | (exact < -FLOAT_EXACT)  # not np.abs: -2**63 stays < 0
            if exact.dtype.kind in "iu" and far.any():
                i = int(np.argmax(far))
                raise DataError(
                    f"{origin.row(i)}: timestamp {int(exact[i])} is beyond +-2**53, where the "
                    "float64 timestamps of --streaming lose their order; give them in a coarser "
                    "unit (seconds), or prepare without --streaming"
                )
            timestamp = exact.astype(np.float64)
            integral = integral and is_integral(timestamp[positive])
            n_rows, n_positive = n_rows + n, n_positive + int(positive.sum())
            users = _user_array(frame["user"], kind, origin)
            bucket = _bucket_of(users, n_buckets)
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            seq = (number << _ROW_BITS) + offset + np.arange(n, dtype=np.int64)
            scattered = pa.table(
                [
                    users.take(order) if isinstance(users, pa.Array) else users[order],
                    item_idx[order],
                    timestamp[order],
                    positive[order],
                    seq[order],
                ],
                schema=schema,
            )
            for b in np.flatnonzero(np.diff(bounds)):
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                writers[b].write_table(scattered.slice(lo, hi - lo))
            bar.update(n)
    return integral, n_rows, n_positive


# ---------------------------------------------------------------------------------------------
# Pass 2: one bucket at a time, as in memory


@dataclass
class _Duplicates:
    """The first duplicated row in file order (by sequence number), its twin, and the count
    of extra rows (:func:`~aftrec.data.schema.duplicate_row_error`)."""

    first: int
    second: int
    count: int

    def earliest(self, other: _Duplicates | None) -> _Duplicates:
        if other is None:
            return self
        first = self if self.first < other.first else other
        return _Duplicates(first.first, first.second, self.count + other.count)


def _find_duplicates(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, seq: np.ndarray
) -> _Duplicates | None:
    """Rows with the same user (codes), item and timestamp, as the in-memory check finds them;
    the rows must be in file order (ascending ``seq``), as buckets are."""
    order = chronological_order(user, timestamp, item)  # stable: file order among equals
    u, i, t = user[order], item[order], timestamp[order]
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])  # row k+1 repeats row k
    if not same.any():
        return None
    dup = np.r_[same, False] | np.r_[False, same]
    s = seq[order]
    # the earliest duplicated row comes first in its group; its twin is the next row
    k = int(np.argmin(np.where(dup, s, np.iinfo(np.int64).max)))
    return _Duplicates(int(s[k]), int(s[k + 1]), int(same.sum()))  # rows repeating another


@dataclass
class _Totals:
    """What the checks at the end need, summed over the partitions."""

    counts: np.ndarray  # (3, D) positives per part and domain
    n_users: int = 0
    n_dropped: int = 0
    integral: bool = True  # every kept timestamp is a whole number
    duplicates: _Duplicates | None = None
    partitions: list[dict[str, Any]] = field(default_factory=list)


def _read_bucket(path: Path) -> dict[str, Any]:
    """A bucket's columns as arrays; text user ids as a pandas column of pyarrow strings."""
    with pa.ipc.open_stream(str(path)) as reader:
        table = reader.read_all()
    path.unlink()  # free the disk as we go
    bucket: dict[str, Any] = {}
    for name in table.column_names:
        column = table[name]
        text = name == "user" and pa.types.is_large_string(column.type)
        bucket[name] = as_text(column.to_pandas()) if text else column.to_numpy()
    return bucket


def _split_bucket(
    p: int,
    bucket: dict[str, Any],
    catalogue: _Catalogue,
    split: SplitConfig,
    out: Path,
    integral: bool,
    totals: _Totals,
    item_hash: np.ndarray | None,
) -> None:
    """Turn bucket ``p`` into partition ``p`` (users from ``totals.n_users`` on;
    ``item_hash``: the catalogue's :func:`~aftrec.data.split.catalogue_hashes`)."""
    codes, user_ids = factorize(bucket["user"], sort=True)  # users in original-id order
    item, timestamp = bucket["item_idx"], bucket["timestamp"]
    found = _find_duplicates(codes, item, timestamp, bucket["seq"])
    if found is not None:
        totals.duplicates = found.earliest(totals.duplicates)
    if totals.duplicates is not None:  # the data is bad: only look for more duplicates
        return
    pos = bucket["positive"]
    rows = {
        "user_idx": codes[pos].astype(np.int32),
        "item_idx": item[pos],
        "domain_idx": catalogue.item_domain[item[pos]],
        "timestamp": timestamp[pos],
    }
    rows = with_tie_keys(rows, user_ids, item_hash, split)
    rows, part, kept_users, n_dropped = split_positives(rows, split)
    start = totals.n_users
    rows["user_idx"] += np.int32(start)
    totals.integral = totals.integral and is_integral(rows["timestamp"])
    if integral:
        rows["timestamp"] = rows["timestamp"].astype(np.int64)
    write_users(partition_file(out, "users", p), np.asarray(user_ids)[kept_users], start)
    write_parts({name: partition_file(out, name, p) for name in PART_NAMES}, rows, part)
    counts = count_parts(part, rows["domain_idx"], len(catalogue.domains))
    totals.counts += counts
    totals.n_users += len(kept_users)
    totals.n_dropped += n_dropped
    totals.partitions.append(
        {
            "users": [start, totals.n_users],
            "rows": {name: int(counts[k].sum()) for k, name in enumerate(PART_NAMES)},
        }
    )


def _timestamps_to_int(out: Path, n_partitions: int) -> None:
    """Rewrite the parts with int64 timestamps (the in-memory rule looks at the kept rows only,
    which pass 1 cannot know: rare, e.g. only dropped users had fractional times)."""
    for p in range(n_partitions):
        for name in PART_NAMES:
            path = partition_file(out, name, p)
            frame = pd.read_parquet(path)
            frame["timestamp"] = frame["timestamp"].astype(np.int64)
            frame.to_parquet(path, index=False)


# ---------------------------------------------------------------------------------------------
# Public API


def prepare_streaming(
    interactions: Path,
    items: Path,
    out: Path,
    split: SplitConfig | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    partition_rows: int = DEFAULT_PARTITION_ROWS,
    progress: bool = False,
) -> Path:
    """Prepare a log that may not fit in memory into a partitioned dataset at ``out``.

    ``interactions`` is a CSV or Parquet file or a folder of parts (columns ``user``, ``item``,
    ``timestamp``, optional ``domain``, ``rating``, ``label``); ``items`` is the catalogue
    (``item``, ``domain``), read into memory. About ``partition_rows`` rows of the log go to each
    partition, which bounds memory. Same rows, parts and counts as the in-memory path.
    """
    out = Path(out)
    split = with_ties(split or SplitConfig(), None)
    if partition_rows < 1:
        raise DataError(f"--partition-rows must be at least 1, got {partition_rows}")
    check_out(out, force)
    started = time.perf_counter()
    files, kind = _list_files(Path(interactions))  # read in the in-memory path's order
    cat, mo = read_table(items)
    require_columns(cat, ITEM_COLUMNS, mo)
    log_ = _open_log(Path(interactions), files, kind)
    catalogue = _Catalogue(check_catalogue(cat, mo), log_.empty_frame()["item"], mo)
    domains = catalogue.domains
    estimate = log_.estimate_rows()
    n_partitions = max(1, math.ceil(estimate / partition_rows))
    if n_partitions > MAX_PARTITIONS:
        raise DataError(
            f"{log_.name}: about {estimate} rows in partitions of {partition_rows} rows make "
            f"{n_partitions} partitions, more than {MAX_PARTITIONS}; raise --partition-rows"
        )

    with atomic_directory(out, replace=force) as tmp:
        scratch = tmp / "_buckets"
        for folder in ("users", *PART_NAMES, "_buckets"):
            (tmp / folder).mkdir()
        buckets = [scratch / f"bucket-{p:05d}.arrow" for p in range(n_partitions)]
        integral, n_rows, n_positive = _scatter(log_, catalogue, buckets, split, estimate, progress)
        if n_positive == 0:  # as in memory
            raise DataError(
                f"{log_.name}: no positive interactions in its {n_rows} row(s); "
                + positives_rule(log_.empty_frame(), split.rating_threshold)
            )
        totals = _Totals(np.zeros((len(PART_NAMES), len(domains)), dtype=np.int64))
        item_hash = catalogue_hashes(catalogue.index, split)  # once, for every bucket
        for p in tqdm(range(n_partitions), desc="split", unit="part", disable=not progress):
            bucket = _read_bucket(buckets[p])
            _split_bucket(p, bucket, catalogue, split, tmp, integral, totals, item_hash)
        shutil.rmtree(scratch)

        if totals.duplicates is not None:
            d = totals.duplicates
            raise duplicate_row_error(log_.locate(d.first), log_.locate(d.second), d.count)
        dropped = dropped_note(totals.n_dropped, split.min_positives)
        n_items = np.bincount(catalogue.item_domain, minlength=len(domains))
        if not totals.n_users:  # as in memory
            rule = positives_rule(log_.empty_frame(), split.rating_threshold)
            raise no_users_error(log_.name, totals.n_dropped, split.min_positives, rule)
        check_domains(domains, n_items, totals.counts[TRAIN], mo.name, log_.name, dropped)
        if totals.integral and not integral:
            _timestamps_to_int(tmp, n_partitions)

        meta = describe(
            domains,
            catalogue.item_domain,
            totals.n_users,
            totals.counts,
            totals.n_dropped,
            split,
            False,
            source,
            started,
            rating_threshold_used(log_.columns),
        )
        meta.update(
            format=FORMAT_PARTITIONED,
            layout=PARTITIONED,
            partition_rows=partition_rows,
            partitions=totals.partitions,
        )
        write_items(tmp / "items.parquet", catalogue.items)
        write_meta(tmp, meta)
    log.info(
        "dropped %d users with fewer than %d positives; %d partition(s)",
        totals.n_dropped,
        split.min_positives,
        n_partitions,
    )
    note = unused_threshold_note(log_.columns, split, log_.name)
    if note:
        log.info(note)
    return out


__all__ = ["DEFAULT_PARTITION_ROWS", "FORMAT_PARTITIONED", "prepare_streaming"]
