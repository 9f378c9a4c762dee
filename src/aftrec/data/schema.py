"""The canonical raw multi-domain log and its validation.

Every source (MovieLens, Netflix, generic CSV/Parquet, synthetic) produces a :class:`RawLog`;
:func:`validate` is the single gate all of them pass through, so every source gets the same
checks and the same messages.

Columns
-------
interactions: ``user``, ``item``, ``timestamp`` (numbers, e.g. Unix seconds, or dates and
times: datetime columns or ISO-8601 text, read as seconds since the epoch), optional
``domain`` (must agree with the catalogue), optional ``rating`` or ``label``.
items: ``item``, ``domain``; each item belongs to exactly one domain.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from aftrec.data.ids import duplicated, positions
from aftrec.errors import DataError

INTERACTION_COLUMNS = ("user", "item", "timestamp")
ITEM_COLUMNS = ("item", "domain")
IN_ALL = "in all"  # what the "bad row(s)" counts of messages cover, by default


@dataclass
class Origin:
    """Where a table came from, so messages can name the file and the line.

    ``line_base`` is added to a 0-based row index to get the line a person sees in the file
    (2 for a CSV with a header line); ``None`` means rows are reported by index (Parquet,
    generated data).
    """

    name: str
    line_base: int | None = None

    def row(self, index: int) -> str:
        if self.line_base is None:
            return f"{self.name}, row {index}"
        return f"{self.name}, line {index + self.line_base}"


@dataclass
class RawLog:
    """A multi-domain interaction log plus its item catalogue, before encoding."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    interactions_origin: Origin = field(default_factory=lambda: Origin("interactions"))
    items_origin: Origin = field(default_factory=lambda: Origin("items"))
    domains: Sequence[str] | None = None  # preferred domain order; default: sorted names


def require_columns(df: pd.DataFrame, required: Sequence[str], origin: Origin) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{origin.name}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found columns {list(map(str, df.columns))}"
        )


def require_unique_columns(names: Sequence[str], origin_name: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the second to
    ``name.1`` and aftrec would silently read only the first)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{origin_name}: column {name!r} appears twice in the header; keep one")
        seen.add(name)


def _show(value: object) -> str:
    """repr of an id as the user wrote it (numpy scalars printed as plain Python values)."""
    item = getattr(value, "item", None)
    return repr(item() if callable(item) else value)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def harmonise_ids(a: pd.Series, b: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Make item ids comparable across the two tables: ints stay ints when both are ints, or
    when the text side writes every id as an integer would be written ("12", not "012" or
    "+12": then no two texts become one integer); otherwise both are compared as text."""
    if a.dtype == b.dtype and a.dtype != object:
        return a, b
    if pd.api.types.is_integer_dtype(a) and pd.api.types.is_integer_dtype(b):
        return a.astype(np.int64), b.astype(np.int64)
    if pd.api.types.is_integer_dtype(a) and _written_integers(b):
        return a.astype(np.int64), b.astype(np.int64)
    if pd.api.types.is_integer_dtype(b) and _written_integers(a):
        return a.astype(np.int64), b.astype(np.int64)
    return a.astype(str), b.astype(str)


def _written_integers(text: pd.Series) -> bool:
    """Whether every value is a str that is an int64 written plainly (no leading zero, sign
    only for a negative: "-0" is not 0, or it would become the same item as "0")."""
    if not pd.api.types.is_string_dtype(text) or text.isna().any() or len(text) == 0:
        return False  # (text: read_table's pyarrow strings, or object columns of str)
    text = text.astype("string")
    if not text.str.fullmatch(r"0|-?[1-9][0-9]{0,18}").all():
        return False
    # 19 digits: within int64 (strings of one length compare as their numbers do)
    digits = text.str.removeprefix("-")
    limit = np.where(text.str.startswith("-").to_numpy(dtype=bool), str(2**63), str(2**63 - 1))
    long = (digits.str.len() == 19).to_numpy(dtype=bool)
    return bool((digits.to_numpy(dtype=object)[long] <= limit[long]).all())


_TICKS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
#: the ISO-8601 text a timestamp may be: a date, or a date and a time (after "T" or a space)
#: with optional seconds, fraction and zone ("Z", "+02:00", "+0200", "+02")
ISO_DATE_TIME = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # 2021-01-01
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"  # T10:00, 10:00:00, 10:00:00.25
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"  # Z, +02:00, +0200, +02
)
MIXED_TIMES = "a timestamp column holds numbers or ISO-8601 dates and times, not both"


def _decoded(series: pd.Series) -> pd.Series:
    """A categorical column of text (pandas' reading of a Parquet dictionary column) as its
    values: it holds what a column of plain text would, and is read as one (its dates were
    refused as mixed with numbers)."""
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) and pd.api.types.is_string_dtype(dtype.categories):
        return pd.Series(np.asarray(series, dtype=object), index=series.index, name=series.name)
    return series


def text_dates(series: pd.Series) -> tuple[bool, object]:
    """Whether a timestamp column is ISO-8601 text (:data:`ISO_DATE_TIME`), told by its first
    value, and that value (``None`` for a column without one). A column of numbers keeps the
    numeric path; one that mixes the two is refused at the first value of the other kind."""
    series = _decoded(series)
    if not (isinstance(series.dtype, pd.StringDtype) or series.dtype == object):
        return False, None
    present = series.notna().to_numpy()
    if not present.any():
        return False, None
    first = series.iloc[int(np.argmax(present))]
    return isinstance(first, str) and re.fullmatch(ISO_DATE_TIME, first) is not None, first


def _not_a_date_error(where: str, value: object, first: object, count: str) -> DataError:
    """A value of a column of ISO-8601 text (:func:`text_dates`) that is none, as written (a
    batch of numbers of ``--streaming`` is typed); ``count`` says how many such rows there
    are, in parentheses."""
    return DataError(
        f"{where}: timestamp {str(value)!r} is not an ISO-8601 date and time as aftrec reads "
        "them (a day that exists, then optionally a time from 00:00 to 23:59:59 with a "
        "fraction and a zone, such as 2021-01-01, 2021-01-01 10:00:00 or "
        "2021-01-01T10:00:00.25+02:00: no leap second, no 24:00), as the column's first value "
        f"{_show(first)} is {count}; {MIXED_TIMES}"
    )


#: a fraction of a second: its first nine digits (nanoseconds), and the rest, dropped
_FRACTION = r"\.([0-9]{1,9})[0-9]*"


def _text_seconds(series: pd.Series, first: object, origin: Origin, scope: str) -> np.ndarray:
    """A column of ISO-8601 text as seconds since the epoch: a time without a zone is UTC, one
    with a zone is converted to UTC, as a Parquet datetime column of the same instants is.

    A fraction is read to the nanosecond (later digits dropped) and added to the whole seconds
    as a datetime column's is (:func:`_numeric`). pandas parses a whole column at nanoseconds
    for one fraction of more than six digits, where dates outside 1677-2262 do not fit (a
    value was refused or not by the column, or ``--streaming`` batch, it came in): the
    fractions of such a column are read apart, which gives each value the seconds it has in a
    column of microseconds."""
    text = series.astype("string")
    iso = text.str.fullmatch(ISO_DATE_TIME).fillna(False).to_numpy(dtype=bool)
    nanos = None
    if text.str.contains(r"\.[0-9]{7}", regex=True).any():
        digits = text.str.extract(_FRACTION, expand=False).fillna("0")
        nanos = digits.str.ljust(9, "0").astype(np.int64).to_numpy()
        text = text.str.replace(_FRACTION, "", n=1, regex=True)
    times = pd.to_datetime(text.where(iso), format="ISO8601", utc=True, errors="coerce")
    bad = times.isna().to_numpy()  # missing, not ISO-8601, or no such day (2021-02-30)
    if bad.any():
        i = _first_bad(bad)
        count = f"({int(bad.sum())} bad row(s) {scope})"
        if pd.isna(series.iloc[i]):
            raise DataError(f"{origin.row(i)}: missing value in column 'timestamp' {count}")
        raise _not_a_date_error(origin.row(i), series.iloc[i], first, count)
    seconds = _numeric(times, "timestamp", origin, scope)
    return seconds if nanos is None else seconds + nanos / _TICKS_PER_SECOND["ns"]


def _numeric(
    series: pd.Series,
    column: str,
    origin: Origin,
    scope: str = IN_ALL,
    times: tuple[bool, object] | None = None,
) -> np.ndarray:
    """``series`` as numbers: float64, or int64 for an integer column (an int64 above 2**53
    is not exact as a float: nanosecond clocks keep their order). Dates and times become
    seconds since the epoch, UTC for a time with a zone, their fraction kept, whether the
    column holds them as such or as ISO-8601 text (:func:`text_dates`; ``times``: what it
    says of the whole column, when ``series`` is a batch of it)."""
    series = _decoded(series)
    if column == "timestamp":
        dates, first = times if times is not None else text_dates(series)
        if dates:
            return _text_seconds(series, first, origin, scope)
    if pd.api.types.is_datetime64_any_dtype(series):
        nat = series.isna().to_numpy()
        if nat.any():
            i = _first_bad(nat)
            raise DataError(
                f"{origin.row(i)}: missing value in column {column!r} "
                f"({int(nat.sum())} bad row(s) {scope})"
            )
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        # in the series' own unit: nanoseconds end in 2262, a Parquet file's microseconds do not
        values = series.to_numpy()
        unit = np.datetime_data(values.dtype)[0]
        unit = unit if unit in _TICKS_PER_SECOND else "s"
        ticks = values.astype(f"datetime64[{unit}]").astype(np.int64)
        whole, part = np.divmod(ticks, _TICKS_PER_SECOND[unit])
        return whole.astype(np.float64) + part / _TICKS_PER_SECOND[unit]  # whole seconds stay
    if column == "timestamp" and pd.api.types.is_bool_dtype(series):  # (a label may be)
        raise DataError(
            f"{origin.name}: column 'timestamp' holds true/false values; it needs numbers or "
            "dates and times"
        )
    if series.dtype == object and len(series) and isinstance(series.iloc[0], datetime.date):
        return _numeric(pd.to_datetime(series), column, origin, scope)  # Parquet's date32
    if pd.api.types.is_unsigned_integer_dtype(series) and len(series):
        values = series.to_numpy()
        if values.max() >= 2**63:
            i = int(np.argmax(values >= 2**63))
            raise DataError(
                f"{origin.row(i)}: {column} {int(values[i])} is beyond int64 "
                f"({int((values >= 2**63).sum())} such row(s) {scope})"
            )
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.to_numpy(dtype=np.int64)
    converted = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(converted)
    if bad.any():
        i = _first_bad(bad)
        value = series.iloc[i]
        if pd.isna(value):
            what = "missing value in"
        elif np.isnan(converted[i]):
            what = f"non-numeric value {value!r} in"
        else:
            what = f"non-finite value {_show(value)} in"
        date = isinstance(value, str) and re.fullmatch(ISO_DATE_TIME, value) is not None
        raise DataError(
            f"{origin.row(i)}: {what} column {column!r} ({int(bad.sum())} bad row(s) {scope})"
            + (f"; {MIXED_TIMES}" if column == "timestamp" and date else "")
        )
    if column == "timestamp":  # as the unsigned case above, however the reader typed it
        beyond = np.abs(converted) >= 2.0**63
        if beyond.any():
            i = _first_bad(beyond)
            raise DataError(
                f"{origin.row(i)}: {column} {series.iloc[i]} is beyond int64 "
                f"({int(beyond.sum())} such row(s) {scope}); give it in a coarser unit"
            )
    return converted


def check_catalogue(items: pd.DataFrame, mo: Origin) -> pd.DataFrame:
    """The catalogue's columns, cleaned: no missing value, domains as strings, each item once.

    Call :func:`require_columns` first.
    """
    items = items.loc[:, list(ITEM_COLUMNS)].reset_index(drop=True)
    for col in ITEM_COLUMNS:
        null = items[col].isna().to_numpy()
        if null.any():
            raise DataError(f"{mo.row(_first_bad(null))}: missing {col!r}")
    items["domain"] = items["domain"].astype(str)
    if len(items) == 0:
        raise DataError(f"{mo.name}: the item catalogue is empty")

    dup_item = items.duplicated("item", keep=False).to_numpy()
    if dup_item.any():
        rows = np.flatnonzero(dup_item)
        item = items["item"].iloc[rows[0]]
        same = rows[(items["item"].iloc[rows] == item).to_numpy()]
        doms = items["domain"].iloc[same].tolist()
        where = "; ".join(f"{d!r} at {mo.row(int(r))}" for d, r in zip(doms, same, strict=True))
        if len(set(doms)) > 1:
            raise DataError(f"{mo.name}: item {_show(item)} is listed in two domains ({where})")
        raise DataError(f"{mo.name}: item {_show(item)} is listed twice ({where})")
    return items


def check_values(
    inter: pd.DataFrame,
    io: Origin,
    scope: str = IN_ALL,
    times: tuple[bool, object] | None = None,
) -> pd.DataFrame:
    """The interaction columns aftrec reads, with ids present and timestamps, ratings and
    labels as finite floats. ``scope`` says which rows the "bad row(s)" counts cover;
    ``times``, whether the timestamps are ISO-8601 text (:func:`text_dates`), when ``inter``
    is a batch of a longer log: the log's first value decides, not the batch's.

    Call :func:`require_columns` first.
    """
    keep = [c for c in (*INTERACTION_COLUMNS, "domain", "rating", "label") if c in inter.columns]
    inter = inter.loc[:, keep].reset_index(drop=True)
    for col in ("user", "item"):
        null = inter[col].isna().to_numpy()
        if null.any():
            raise DataError(f"{io.row(_first_bad(null))}: missing {col!r}")
    inter["timestamp"] = _numeric(inter["timestamp"], "timestamp", io, scope, times)
    for col in ("rating", "label"):
        if col in inter.columns:
            inter[col] = _numeric(inter[col], col, io, scope)
    return inter


def locate_items(
    inter: pd.DataFrame,
    catalogue: pd.Index,
    catalogue_domain: np.ndarray,
    io: Origin,
    mo: Origin,
    scope: str = IN_ALL,
) -> np.ndarray:
    """Position in ``catalogue`` of each interaction's item; every item must be there, and an
    interaction ``domain`` column, if any, must agree with ``catalogue_domain``.

    ``inter["item"]`` and ``catalogue`` must hold ids of the same type (see
    :func:`harmonise_ids`); ``catalogue`` must be unique.
    """
    position = positions(catalogue, inter["item"])
    unknown = position < 0
    if unknown.any():
        i = _first_bad(unknown)
        raise DataError(
            f"{io.row(i)}: item {_show(inter['item'].iloc[i])} is not in the item catalogue "
            f"{mo.name} ({int(unknown.sum())} such row(s) {scope})"
        )
    if "domain" in inter.columns:
        expected = catalogue_domain[position]
        given = inter["domain"].astype(str).to_numpy()
        wrong = given != expected
        if wrong.any():
            i = _first_bad(wrong)
            raise DataError(
                f"{io.row(i)}: item {_show(inter['item'].iloc[i])} has domain {given[i]!r} here "
                f"but {expected[i]!r} in the item catalogue {mo.name}"
            )
    return position


def duplicate_row_error(first: str, second: str, extra: int) -> DataError:
    """The message for rows with the same user, item and timestamp; ``first`` and ``second``
    name two such rows (as :meth:`Origin.row` does), ``extra`` counts the rows to drop: each
    set of equal rows less its first (a row and its two copies count 2, not 3)."""
    return DataError(
        f"{first}: duplicate row (same user, item and timestamp as {second}); "
        f"{extra} extra row(s) in all (the copies beyond the first of each set of equal rows)"
    )


def validate(log: RawLog) -> RawLog:
    """Check a raw log and return a cleaned copy; raise :class:`DataError` on the first problem.

    Checks, in order: required columns; missing ids; an item listed twice (in two domains, or
    twice in one); missing or non-numeric timestamps; NaN ratings or labels; interactions on
    items absent from the catalogue; an interaction ``domain`` that disagrees with the
    catalogue; duplicate interaction rows (same user, item and timestamp).
    """
    io, mo = log.interactions_origin, log.items_origin
    require_columns(log.items, ITEM_COLUMNS, mo)
    require_columns(log.interactions, INTERACTION_COLUMNS, io)
    items = check_catalogue(log.items, mo)
    inter = check_values(log.interactions, io)

    inter["item"], items["item"] = harmonise_ids(inter["item"], items["item"])
    locate_items(inter, pd.Index(items["item"]), items["domain"].to_numpy(), io, mo)
    if "domain" in inter.columns:
        inter = inter.drop(columns="domain")

    dup = duplicated(inter, ["user", "item", "timestamp"])
    if dup.any():
        rows = np.flatnonzero(dup)
        first = inter.iloc[rows[0]]
        twin = rows[1:][
            (inter["user"].iloc[rows[1:]] == first["user"]).to_numpy()
            & (inter["item"].iloc[rows[1:]] == first["item"]).to_numpy()
            & (inter["timestamp"].iloc[rows[1:]] == first["timestamp"]).to_numpy()
        ]
        second = io.row(int(twin[0])) if len(twin) else "another row"
        extra = int(inter.iloc[rows].duplicated(["user", "item", "timestamp"]).sum())
        raise duplicate_row_error(io.row(int(rows[0])), second, extra)

    domains = list(log.domains) if log.domains is not None else sorted(items["domain"].unique())
    unknown = sorted(set(items["domain"].unique()) - set(domains))
    if unknown:
        raise DataError(f"{mo.name}: domain(s) {unknown} are not among the domains {domains}")
    return RawLog(inter, items, io, mo, domains)


def positive_mask(inter: pd.DataFrame, rating_threshold: float = 3.0) -> np.ndarray | None:
    """Which rows are positives (see :func:`positives`); ``None`` when every row is."""
    if "label" in inter.columns:
        return inter["label"].to_numpy() > 0
    if "rating" in inter.columns:
        return inter["rating"].to_numpy() >= rating_threshold
    return None


def rating_threshold_used(columns: Collection[str]) -> bool:
    """Whether the rating threshold decides the positives of a log with these columns: only
    with a rating column, and no label column (which wins, see :func:`positives`)."""
    return "rating" in columns and "label" not in columns


def positives_rule(inter: pd.DataFrame, rating_threshold: float = 3.0) -> str:
    """The rule :func:`positives` applies to ``inter``, in words."""
    if "label" in inter.columns:
        return "positives are rows with label > 0"
    if "rating" in inter.columns:
        return f"positives are ratings >= {rating_threshold:g} (--rating-threshold)"
    return "every row is a positive"


def positives(inter: pd.DataFrame, rating_threshold: float = 3.0) -> pd.DataFrame:
    """Keep the positive interactions: ``label > 0`` if a label column exists, otherwise
    ``rating >= rating_threshold`` if a rating column exists, otherwise every row."""
    mask = positive_mask(inter, rating_threshold)
    return inter if mask is None else inter.loc[mask]
