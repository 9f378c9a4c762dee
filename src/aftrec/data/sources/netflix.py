"""The Netflix Prize ratings as a multi-domain log, with domains from a user-supplied map.

Files in the Netflix Prize folder
---------------------------------
``combined_data_1.txt`` ... ``combined_data_4.txt`` (every ``combined_data_*.txt`` present is
read, in sorted order): a line ``MovieID:`` opens a block of rating lines
``CustomerID,Rating,Date`` for that movie, the date as ``YYYY-MM-DD``::

    1:
    1488844,3,2005-09-06
    822109,5,2005-05-13

``movie_titles.csv``: latin-1 lines ``MovieID,YearOfRelease,Title`` with no header; the year
may be ``NULL`` and the title may contain commas.

The domain map
--------------
The public data has no genres, so the user supplies a CSV with header columns ``item,domain``
(``item`` is the MovieID; other columns are ignored). Every movie of the map must be listed in
``movie_titles.csv``; ratings on movies absent from the map are dropped and their number is
logged at INFO. Domains are ordered as they first appear in the map.

Result: interactions ``user, item, timestamp, rating`` (int64 CustomerID and MovieID,
``timestamp`` the Unix seconds of the date at UTC midnight, ``rating`` float64); items
``item, domain`` in the order of the map, whose lines its origin names. Malformed rating
lines are reported with their file and line while parsing; the interactions' origin counts
rows of the concatenated, filtered table (no single file line exists for them).

The real files hold about 100M rating lines, so parsing is columnar and no Python code runs
per line: the C CSV parser splits each file into three columns (a ``MovieID:`` line fills only
the first), header lines are those whose first field ends in ``:``, each rating line takes
the MovieID of the last header line above it (a cumulative count of header lines indexes
them), CustomerIDs go through Arrow's integer cast and the few thousand distinct dates are
parsed once each.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow import ArrowInvalid

from aftrec.arrays import unique
from aftrec.data.schema import Origin, RawLog, require_columns
from aftrec.errors import DataError

logger = logging.getLogger(__name__)

_RATING_LINE = "'CustomerID,Rating,Date' (date YYYY-MM-DD) or 'MovieID:'"


def load_netflix(path: Path, domain_map: Path) -> RawLog:
    """Load the Netflix Prize folder ``path`` with movie domains from the CSV ``domain_map``.

    Raises :class:`DataError` naming the file and line of the first problem: missing files,
    malformed lines, a map without an ``item`` or ``domain`` column, or a mapped movie that
    ``movie_titles.csv`` does not list.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"Netflix folder {folder} does not exist or is not a folder")
    parts = sorted(folder.glob("combined_data_*.txt"))
    if not parts:
        raise DataError(
            f"Netflix folder {folder} has no combined_data_*.txt files "
            "(combined_data_1.txt ... combined_data_4.txt of the Netflix Prize data)"
        )
    titles_file = folder / "movie_titles.csv"
    if not titles_file.is_file():
        raise DataError(f"Netflix folder {folder} has no movie_titles.csv")
    items, items_origin = _read_domain_map(Path(domain_map), _read_titles(titles_file))

    mapped = items["item"].to_numpy()
    tables = []
    n_read = 0
    dropped_movies: set[int] = set()
    headed: dict[int, Path] = {}  # MovieID -> the file whose block it heads
    for part in parts:
        ratings = _read_combined(part)
        n_read += len(ratings)
        for movie in unique(ratings["item"].to_numpy()).tolist():
            if headed.setdefault(movie, part) != part:
                raise DataError(
                    f"MovieID {movie} heads a block in both {headed[movie]} and {part}; "
                    "each movie's ratings are in one block"
                )
        keep = np.isin(ratings["item"].to_numpy(), mapped)
        if not keep.all():
            dropped_movies.update(unique(ratings["item"].to_numpy()[~keep]).tolist())
            ratings = ratings.loc[keep]
        tables.append(ratings)
    inter = pd.concat(tables, ignore_index=True)
    _refuse_repeated_pairs(inter, folder)
    if len(inter) < n_read:
        logger.info(
            "%s: dropped %d of %d ratings, on %d movie(s) absent from the domain map %s",
            folder,
            n_read - len(inter),
            n_read,
            len(dropped_movies),
            domain_map,
        )
    inter_origin = Origin(f"{folder}/combined_data_*.txt, rating rows of mapped movies")
    domains = list(pd.unique(items["domain"]))
    return RawLog(inter, items, inter_origin, items_origin, domains)


def _refuse_repeated_pairs(inter: pd.DataFrame, folder: Path) -> None:
    """The Netflix Prize data rates a movie once per customer: a (CustomerID, MovieID) pair
    twice means a "MovieID:" line went missing (the next block's ratings joined the one
    before) or a line was repeated."""
    user, item = inter["user"].to_numpy(), inter["item"].to_numpy()
    span = int(item.max(initial=0)) + 1
    key = user.astype(np.int64) * span + item if user.max(initial=0) < 2**62 // span else None
    twice = (
        pd.Series(key).duplicated().to_numpy()
        if key is not None
        else inter.duplicated(["user", "item"]).to_numpy()
    )
    if twice.any():
        i = int(np.flatnonzero(twice)[0])
        raise DataError(
            f"{folder}: customer {int(user[i])} rates movie {int(item[i])} twice "
            f"({int(twice.sum())} such rating(s)); the Netflix Prize data rates a movie once per "
            "customer: is a 'MovieID:' line missing, or a line repeated?"
        )


def _read_titles(file: Path) -> pd.Series:
    """MovieIDs of ``movie_titles.csv`` (lines ``MovieID,YearOfRelease,Title``)."""
    origin = Origin(str(file), line_base=1)
    lines = pd.Series(file.read_text(encoding="latin-1").splitlines(), dtype=str)
    parts = lines.str.extract(r"^\s*(\d+),\s*(\d+|NULL)?\s*,(.*)$")
    bad = parts[0].isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{origin.row(i)}: cannot parse {lines.iloc[i]!r}; expected MovieID,YearOfRelease,Title"
        )
    return parts[0].astype(np.int64)


def _read_domain_map(file: Path, titled: pd.Series) -> tuple[pd.DataFrame, Origin]:
    origin = Origin(str(file), line_base=2)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise DataError(f"domain map {file} {what}; it is a CSV file with columns item,domain")
    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read the domain map ({str(err).strip()})") from err
    require_columns(df, ("item", "domain"), origin)
    ids = pd.to_numeric(df["item"].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(ids) | (ids != np.round(ids))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{origin.row(i)}: item {df['item'].iloc[i]!r} is not a MovieID")
    domain = df["domain"].str.strip()
    empty = (domain == "").to_numpy()
    if empty.any():
        raise DataError(f"{origin.row(int(np.flatnonzero(empty)[0]))}: missing 'domain'")
    items = pd.DataFrame({"item": ids.astype(np.int64), "domain": domain})
    unknown = ~items["item"].isin(titled).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{origin.row(i)}: movie {int(items['item'].iloc[i])} is not in movie_titles.csv "
            f"({int(unknown.sum())} such movie(s) in the map)"
        )
    return items, origin


def _read_combined(file: Path) -> pd.DataFrame:
    """One ``combined_data_*.txt`` as user, item, timestamp, rating (line-level checks)."""
    origin = Origin(str(file), line_base=1)
    try:
        df = pd.read_csv(
            file,
            sep=",",
            header=None,
            names=["a", "b", "c"],
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=False,
            encoding="latin-1",
        )
    except pd.errors.ParserError as err:
        m = re.search(r"in line (\d+), saw (\d+)", str(err))
        where = (
            f"{file}, line {m.group(1)}: {m.group(2)} comma-separated fields"
            if m
            else f"{file}: {err}"
        )
        raise DataError(f"{where}; expected {_RATING_LINE}") from err
    except pd.errors.EmptyDataError:
        return _empty()
    first = df["a"]  # inferred as text (faster than asking for it) unless no line has ':'
    if not pd.api.types.is_string_dtype(first):
        first = first.astype(str)
    header = first.str.endswith(":").to_numpy(dtype=bool, na_value=False)
    extra = header & (df["b"].notna() | df["c"].notna()).to_numpy()
    if extra.any():
        _fail(origin, df, int(np.flatnonzero(extra)[0]), "a 'MovieID:' line with more fields")

    # The MovieID of each header line, forward-filled by position to the rating lines.
    at = np.flatnonzero(header)
    movie_at = pd.to_numeric(first.iloc[at].str[:-1].str.strip(), errors="coerce").to_numpy(
        dtype=np.float64
    )
    bad_movie = ~np.isfinite(movie_at) | (movie_at != np.round(movie_at))
    if bad_movie.any():
        _fail(origin, df, int(at[np.flatnonzero(bad_movie)[0]]), "a MovieID before ':'")
    _, first_at, seen = np.unique(movie_at, return_index=True, return_counts=True)
    if (seen > 1).any():  # a block repeated: its ratings would count twice
        twice = int(movie_at[first_at[np.flatnonzero(seen > 1)[0]]])
        lines = [origin.row(int(i)) for i in at[movie_at == twice][:2]]
        raise DataError(f"MovieID {twice} heads two blocks ({lines[0]}; {lines[1]})")
    block = np.cumsum(header) - 1  # index into `at` of the block each line belongs to
    body = ~header
    orphan = body & (block < 0)
    if orphan.any():
        i = int(np.flatnonzero(orphan)[0])
        raise DataError(f"{origin.row(i)}: rating line before any 'MovieID:' line")

    user = _integers(first, body)
    rating = _floats(df["b"])
    codes, dates = pd.factorize(df["c"])  # a few thousand distinct dates: parse each once
    stamp = np.append(_unix_seconds(pd.Series(dates, dtype=str)), np.nan)[codes]
    # ids above 2**53 are not exact as float64; ratings are the integers 1 to 5
    user = np.where(np.abs(user) >= 2**53, np.nan, user)
    rating = np.where((rating != np.round(rating)) | (rating < 1) | (rating > 5), np.nan, rating)
    for values, what in ((user, "CustomerID"), (rating, "Rating (1 to 5)"), (stamp, "Date")):
        bad = body & ~np.isfinite(values)
        if bad.any():
            _fail(origin, df, int(np.flatnonzero(bad)[0]), f"a valid {what}")

    return pd.DataFrame(
        {
            "user": user[body].astype(np.int64),
            "item": movie_at[block[body]].astype(np.int64),
            "timestamp": stamp[body].astype(np.int64),
            "rating": rating[body],
        }
    )


def _integers(text: pd.Series, use: np.ndarray) -> np.ndarray:
    """The integer in each row of ``text`` where ``use`` (0 elsewhere) as float64, NaN where
    it is missing or not an integer. Arrow's cast is the fast path; it fails on any bad row."""
    masked = text.where(use, "0")
    try:
        return masked.astype("int64[pyarrow]").to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError, ArrowInvalid):
        values = pd.to_numeric(masked, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        values[values != np.round(values)] = np.nan
        return values


def _floats(column: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)


def _unix_seconds(dates: pd.Series) -> np.ndarray:
    parsed = pd.to_datetime(dates.str.strip(), format="%Y-%m-%d", errors="coerce", utc=True)
    seconds = parsed.to_numpy(dtype="datetime64[s]", na_value=np.datetime64("NaT"))
    out = seconds.astype(np.int64).astype(np.float64)
    out[np.isnat(seconds)] = np.nan
    return out


def _fail(origin: Origin, df: pd.DataFrame, i: int, what: str) -> None:
    """Raise for line ``i``, showing the line as parsed (a float rating shown as read)."""
    fields = [
        str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        for v in df.iloc[i]
        if not pd.isna(v)
    ]
    shown = f"{','.join(fields)!r} lacks {what}" if fields else "empty line"
    raise DataError(f"{origin.row(i)}: {shown}; expected {_RATING_LINE}")


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": np.zeros(0, np.int64),
            "item": np.zeros(0, np.int64),
            "timestamp": np.zeros(0, np.int64),
            "rating": np.zeros(0, np.float64),
        }
    )
