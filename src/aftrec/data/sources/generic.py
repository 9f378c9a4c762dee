"""Generic logs in CSV or Parquet.

Interactions: columns ``user``, ``item``, ``timestamp``, optional ``domain`` (checked against
the catalogue) and optional ``rating`` or ``label``. Items: columns ``item``, ``domain``.
A file ending in ``.parquet`` / ``.pq`` (or a folder of Parquet parts) is read with pyarrow;
any other file as CSV with a header line (decompressed by a ``.gz``, ``.bz2``, ``.xz`` or
``.zip`` suffix), whatever its name (``.csv``, ``.txt``, none), except a name known to be of
another format (:func:`file_kind`): a JSON log read as CSV would fail on a "missing column"
that is no clue.
"""

from __future__ import annotations

import bisect
import bz2
import csv
import gzip
import io
import lzma
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aftrec.data.ids import as_text
from aftrec.data.schema import Origin, RawLog, require_unique_columns
from aftrec.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")


def _open_zip(path: Path, mode: str = "rt", **text: Any) -> IO[Any]:
    """The one file of a ZIP archive, as pandas reads it (an archive of several is refused);
    ``text``: :class:`io.TextIOWrapper`'s arguments, for a ``mode`` without "b"."""
    try:
        with zipfile.ZipFile(path) as archive:  # (the member keeps the file open)
            names = archive.namelist()
            if len(names) != 1:
                raise OSError(f"a ZIP archive of {len(names)} files, where one CSV file is read")
            member = archive.open(names[0])
    except zipfile.BadZipFile as exc:
        raise OSError(f"not a ZIP archive: {exc}") from exc
    return member if "b" in mode else io.TextIOWrapper(member, **text)


#: what reading a damaged compressed file raises (a truncated one: EOFError)
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error)
#: compressed CSV files, by suffix, opened by the standard library as pandas opens them
CSV_COMPRESSION: dict[str, Callable[..., IO[Any]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zip": _open_zip,
}
#: the compressions that pyarrow's reader of ``--streaming`` opens too (by a lower-case suffix)
STREAM_COMPRESSION = (".gz", ".bz2")
#: the names of a folder's CSV parts (read by ``--streaming`` only)
CSV_SUFFIXES = (".csv", *(".csv" + s for s in STREAM_COMPRESSION))
#: files known to hold no CSV, by suffix (also before a compression's): refused rather than
#: read as CSV, the first line of a JSON log taken for its column names
OTHER_FORMATS = (".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".avro", ".orc", ".feather",
                 ".arrow", ".ipc", ".pkl", ".pickle")  # fmt: skip
#: compressions that neither reader opens (pandas, only with a package aftrec does not need)
OTHER_COMPRESSION = (".zst", ".lz4", ".br", ".7z", ".rar")
#: what a refused file is told is read
FORMATS_READ = (
    f"aftrec reads Parquet files ({', '.join(PARQUET_SUFFIXES)}) and CSV files (plain, or "
    f"compressed as {', '.join(CSV_COMPRESSION)})"
)
#: columns read as text whatever the file's type for them (ids and domain names)
ID_COLUMNS = ("user", "item", "domain")


@dataclass
class CsvOrigin(Origin):
    """A CSV file's lines as a person sees them, header = line 1.

    pandas skips blank lines and a quoted field may span lines, so a row's index plus 2 is not
    always its line; the file is re-read up to that row only when a message names it.
    """

    path: Path | None = None

    def row(self, index: int) -> str:
        line = _csv_line(self.path, index) if self.path is not None else None
        return f"{self.name}, line {index + 2 if line is None else line}"


def open_csv_text(path: Path) -> IO[str]:
    """A CSV file as text, decompressed by its suffix (:data:`CSV_COMPRESSION`), without a
    UTF-8 byte-order mark (pandas and pyarrow drop it from the first column's name too)."""
    opener = CSV_COMPRESSION.get(Path(path).suffix.lower(), open)
    return opener(path, "rt", newline="", encoding="utf-8-sig", errors="replace")


@dataclass
class PartsOrigin(Origin):
    """A folder's Parquet parts read as one table: a row is named by its part and its row
    there, as ``--streaming`` names it, not by its row in the whole table."""

    parts: tuple[Path, ...] = ()
    starts: tuple[int, ...] = ()  # each part's first row in the table

    def row(self, index: int) -> str:
        k = bisect.bisect_right(self.starts, index) - 1
        return f"{self.parts[k]}, row {index - self.starts[k]}"


def file_kind(path: Path) -> str:
    """A file's format by its name, any case: "Parquet" (:data:`PARQUET_SUFFIXES`), else
    "CSV", as files of any name (``.txt``, none) were read before names were checked. Only a
    name known to be of another format (:data:`OTHER_FORMATS`, also compressed) or of a
    compression neither reader opens (:data:`OTHER_COMPRESSION`) is refused, in one line that
    says which formats are read."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "Parquet"
    if suffix in OTHER_COMPRESSION:
        raise DataError(
            f"{path}: {FORMATS_READ}, not {suffix} compression; decompress it, or compress it "
            "as .gz"
        )
    inner = Path(path.stem).suffix.lower() if suffix in CSV_COMPRESSION else suffix
    if inner in OTHER_FORMATS:
        raise DataError(f"{path}: {FORMATS_READ}, not {inner} files; convert it to one of them")
    return "CSV"


def _csv_line(path: Path, index: int) -> int | None:
    """First line of data row ``index`` (0-based, blank lines skipped as pandas does)."""
    try:
        with open_csv_text(path) as fh:
            reader = csv.reader(fh)
            row = -2  # the header is row -1
            start = 1
            for record in reader:
                if record:
                    row += 1
                    if row == index:
                        return start
                start = reader.line_num + 1
    except (*READ_ERRORS, csv.Error):
        return None
    return None


def read_table(path: Path) -> tuple[pd.DataFrame, Origin]:
    """Read one CSV or Parquet table; the :class:`Origin` lets messages name its lines.

    Ids are read as written (:func:`ids_as_read`): a CSV file's as text, so "007" and "7"
    stay two users; a Parquet file's integers as integers. In a CSV file only an
    empty field is missing ("NA" is a name like any other), and a row with more fields than
    the header is an error, not a shift of its columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_dir():
        file_kind(path)
    try:
        names = header(path)
        require_unique_columns(names, str(path))
        if path.is_dir() or path.suffix.lower() in PARQUET_SUFFIXES:
            parts, kind = folder_parts(path) if path.is_dir() else ([path], "Parquet")
            if kind == "CSV":
                raise DataError(
                    f"{path}: a folder of CSV parts is read only as the interactions of "
                    "`prepare --streaming`; give one CSV file, or Parquet parts"
                )
            same_columns(parts)
            table = pq.read_table([str(p) for p in parts]) if len(parts) > 1 else None
            frame = table.to_pandas() if table is not None else pd.read_parquet(parts[0])
            if len(parts) == 1:
                return ids_as_read(frame, str(path)), Origin(str(parts[0]), None)
            rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
            starts = tuple(int(x) for x in np.cumsum([0, *rows[:-1]]))
            return ids_as_read(frame, str(path)), PartsOrigin(str(path), None, tuple(parts), starts)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path, low_memory=False, index_col=False, keep_default_na=False, na_values=[""],
                dtype={c: str for c in ID_COLUMNS},
            )  # fmt: skip
        return ids_as_read(frame, str(path)), CsvOrigin(str(path), 2, path)
    except pd.errors.ParserWarning as exc:
        raise DataError(
            f"{path}: cannot be read as CSV: a row has more fields than the {len(names)} of the "
            "header"
        ) from exc
    except (*READ_ERRORS, ValueError, pd.errors.ParserError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read as {_kind(path)}: {exc}") from exc


def ids_as_read(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The :data:`ID_COLUMNS` of ``frame`` (read from ``name``) as they were written: integer
    columns stay int64 (a Parquet file's; no digit of theirs is lost), float ids become the
    integers they stand for (:func:`check_float_ids`), and anything else is text
    (:func:`~aftrec.data.ids.as_text`: pyarrow strings, missing values NaN): a CSV file's ids,
    so that "007" and "7" stay two.
    Domain names are always text. Tables whose ids differ in type are compared as text
    (:func:`~aftrec.data.schema.harmonise_ids`, :func:`same_id_types`)."""
    for col in ID_COLUMNS:
        if col not in frame.columns:
            continue
        values = frame[col]
        if col != "domain" and pd.api.types.is_signed_integer_dtype(values):
            frame[col] = values.astype(np.int64)
            continue
        if col != "domain" and pd.api.types.is_float_dtype(values):
            check_float_ids(values.to_numpy(dtype=np.float64, na_value=np.nan), col, name)
            if not values.isna().any():  # a missing id is reported as such later
                frame[col] = values.astype(np.int64)
                continue
            values = values.astype("Int64")
        frame[col] = as_text(values)
    return frame


def same_id_types(frames: Sequence[pd.DataFrame]) -> None:
    """Tables that are read together (pre-split parts and their catalogue): an id column
    that is integer in every table stays so; otherwise it is text in all of them, so that a
    CSV file's "6" meets a Parquet file's 6."""
    for col in ("user", "item"):
        having = [f for f in frames if col in f.columns]
        if not all(pd.api.types.is_integer_dtype(f[col]) for f in having):
            for f in having:
                if pd.api.types.is_integer_dtype(f[col]):
                    f[col] = as_text(f[col])


def check_float_ids(values: np.ndarray, column: str, name: str) -> None:
    """Float ids are integers a missing value made floats: each must be whole and exact
    (below 2**53), so that it reads as one integer, the same in memory and with
    ``--streaming``."""
    finite = values[~np.isnan(values)]
    bad = (finite != np.round(finite)) | (np.abs(finite) >= 2**53)
    if bad.any():
        number = float(finite[np.argmax(bad)])
        raise DataError(
            f"{name}: column {column!r} holds the number {number!r}; ids are text or integers "
            "(below 2**53 when stored as floats)"
        )


def folder_parts(folder: Path) -> tuple[list[Path], str]:
    """A folder's parts in name order and their kind, "Parquet" (``.parquet``, ``.pq``) or
    "CSV" (:data:`CSV_SUFFIXES`), any case. Names starting with ``.`` or ``_`` (Spark's
    ``_SUCCESS``, a writer's temporary) are skipped; any other file is refused, not skipped,
    so that no part is left out of the data unseen: so is a link to a folder (not followed)
    and anything that is no regular file (a broken link, a pipe)."""
    found = []
    for p in sorted(folder.rglob("*")):
        if any(s.startswith((".", "_")) for s in p.relative_to(folder).parts):
            continue
        if p.is_dir() and not p.is_symlink():
            continue
        if not p.is_file():
            what = "a link to a folder, which is not followed" if p.is_dir() else "no file"
            raise DataError(
                f"{p}: {what}; give the folder's parts as files in it, or a name starting "
                "with '.' or '_' to skip it"
            )
        found.append(p)
    parquet = [p for p in found if p.suffix.lower() in PARQUET_SUFFIXES]
    text = [p for p in found if p.name.lower().endswith(CSV_SUFFIXES)]
    other = [p for p in found if p not in parquet and p not in text]
    if other:
        raise DataError(
            f"{other[0]}: neither a Parquet (.parquet, .pq) nor a CSV ({', '.join(CSV_SUFFIXES)}) "
            f"part ({len(other)} such file(s) in {folder}); move it out, or give it a name "
            "starting with '.' or '_' to skip it"
        )
    if parquet and text:
        raise DataError(f"{folder}: the folder mixes Parquet and CSV parts; keep one kind")
    if not found:
        raise DataError(
            f"{folder}: no Parquet (.parquet, .pq) or CSV ({', '.join(CSV_SUFFIXES)}) parts in "
            "this folder"
        )
    return (parquet, "Parquet") if parquet else (text, "CSV")


def _text(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or (pa.types.is_dictionary(kind) and _text(kind.value_type))
    )


def same_columns(files: Sequence[Path]) -> None:
    """Refuse a folder of Parquet parts whose columns differ, by name or by type: a reader
    takes the first part's schema, so another part's column would be dropped or its values
    reinterpreted (a datetime read as microseconds). Text columns may differ in how they
    store text (plain, large or dictionary strings)."""
    if len(files) < 2:
        return
    try:
        first = pq.read_schema(files[0])
        for file in files[1:]:
            schema = pq.read_schema(file)
            if schema.names != first.names:
                raise DataError(
                    f"{file}: its columns {schema.names} differ from those of {files[0]} "
                    f"{first.names}; give every part the same columns"
                )
            for name in first.names:
                a, b = first.field(name).type, schema.field(name).type
                if a != b and not (_text(a) and _text(b)):
                    raise DataError(
                        f"{file}: column {name!r} is {b} here and {a} in {files[0]}; "
                        "give every part the same column types"
                    )
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{files[0]}: cannot be read as Parquet: {exc}") from exc


def header(path: Path) -> list[str]:
    """The column names of a table as written, duplicates kept (pandas renames them): a CSV
    file's first non-blank line, or a Parquet file's schema; a folder's, those of its first
    part (:func:`folder_parts`)."""
    path = Path(path)
    if path.is_dir():
        path = folder_parts(path)[0][0]
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot be read as Parquet: {exc}") from exc
    try:
        with open_csv_text(path) as fh:
            for record in csv.reader(fh):
                if record:
                    return record
    except (*READ_ERRORS, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as CSV: {exc}") from exc
    return []


def _kind(path: Path) -> str:
    return "Parquet" if path.is_dir() or path.suffix.lower() in PARQUET_SUFFIXES else "CSV"


def load_generic(interactions: Path, items: Path) -> RawLog:
    """A single interaction log plus its item catalogue (split later by aftrec)."""
    inter, io = read_table(interactions)
    cat, mo = read_table(items)
    return RawLog(inter, cat, io, mo)


def load_presplit(
    train: Path, test: Path, items: Path, valid: Path | None = None
) -> dict[str, RawLog]:
    """Pre-split data used as given: one log per part ("train", "test", optional "valid"),
    all sharing the one item catalogue."""
    cat, mo = read_table(items)
    parts: dict[str, RawLog] = {}
    for name, path in (("train", train), ("valid", valid), ("test", test)):
        if path is not None:
            inter, io = read_table(path)
            parts[name] = RawLog(inter, cat, io, mo)
    same_id_types([cat, *(part.interactions for part in parts.values())])
    return parts
