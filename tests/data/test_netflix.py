"""Netflix Prize reader: combined_data files, movie_titles.csv and the domain map."""

from __future__ import annotations

import calendar
import logging
from pathlib import Path

import numpy as np
import pytest

from aftrec.data.schema import validate
from aftrec.data.sources.netflix import load_netflix
from aftrec.errors import DataError

PART_1 = """1:
10,3,2005-09-06
11,5,2005-05-13
2:
10,4,2004-01-01
"""
PART_2 = """3:
12,1,2003-03-03
4:
13,2,2000-01-01
11,4,1999-12-31
"""
TITLES = """1,2003,Dinosaur Planet
2,2004,Isle of Man TT 2004 Review
3,NULL,Character
4,1999,"Lord of the Rings, The: Extended, Édition"
"""
MAP = "item,domain\n1,Drama\n2,Sport\n4,Drama\n"  # movie 3 is not mapped


def day(text: str) -> int:
    y, m, d = map(int, text.split("-"))
    return calendar.timegm((y, m, d, 0, 0, 0))


def write(folder: Path, part_1: str = PART_1, mapping: str = MAP) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "combined_data_1.txt").write_text(part_1)
    (folder / "combined_data_2.txt").write_text(PART_2)
    (folder / "movie_titles.csv").write_bytes(TITLES.encode("latin-1"))
    (folder / "domains.csv").write_text(mapping)
    return folder, folder / "domains.csv"


def test_parses_both_parts_and_drops_unmapped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, mapping = write(tmp_path)
    with caplog.at_level(logging.INFO, logger="aftrec.data.sources.netflix"):
        log = load_netflix(folder, mapping)
    inter = log.interactions
    assert list(inter.columns) == ["user", "item", "timestamp", "rating"]
    assert [inter[c].dtype for c in inter.columns] == [np.int64, np.int64, np.int64, np.float64]
    rows = list(inter.itertuples(index=False, name=None))
    assert rows == [
        (10, 1, day("2005-09-06"), 3.0),
        (11, 1, day("2005-05-13"), 5.0),
        (10, 2, day("2004-01-01"), 4.0),
        (13, 4, day("2000-01-01"), 2.0),
        (11, 4, day("1999-12-31"), 4.0),
    ]
    assert day("2005-09-06") == 1125964800  # UTC midnight
    assert list(log.items["item"]) == [1, 2, 4]
    assert list(log.items["domain"].astype(str)) == ["Drama", "Sport", "Drama"]
    assert list(log.domains or []) == ["Drama", "Sport"]
    assert "dropped 1 of 6 ratings, on 1 movie(s)" in caplog.text
    assert log.items_origin.row(0).endswith("domains.csv, line 2")
    assert len(validate(log).interactions) == 5


def test_reads_whichever_parts_exist(tmp_path: Path) -> None:
    folder, mapping = write(tmp_path)
    (folder / "combined_data_1.txt").unlink()
    log = load_netflix(folder, mapping)
    assert sorted(log.interactions["item"].unique()) == [4]
    for part in folder.glob("combined_data_*.txt"):
        part.unlink()
    with pytest.raises(DataError, match=r"no combined_data_\*\.txt"):
        load_netflix(folder, mapping)


@pytest.mark.parametrize(
    "part_1, message",
    [
        ("10,3,2005-09-06\n1:\n", r"combined_data_1\.txt, line 1: rating line before any"),
        ("1:\n10,3\n", r"combined_data_1\.txt, line 2: '10,3' lacks a valid Date"),
        (
            "1:\n10,3,2005-09-06\n11,3,2005-09-06,x\n",
            r"combined_data_1\.txt, line 3: 4 comma-separated fields",
        ),
        ("1:\n10,3,2005-09-06\n11,3,2005-13-01\n", r"combined_data_1\.txt, line 3: .* Date"),
        ("1:\n10,3,2005-09-06\n\n11,3,2005-09-06\n", r"combined_data_1\.txt, line 3: empty line"),
        ("1:\n10,x,2005-09-06\n", r"combined_data_1\.txt, line 2: .* lacks a valid Rating"),
        ("1:\n1x0,3,2005-09-06\n", r"combined_data_1\.txt, line 2: .* lacks a valid CustomerID"),
        ("1:\nx:\n", r"combined_data_1\.txt, line 2: .* lacks a MovieID"),
        ("1:,4\n", r"combined_data_1\.txt, line 1: .* with more fields"),
        ("1:\n10,9,2005-09-06\n", r"line 2: '10,9,2005-09-06' lacks a valid Rating \(1 to 5\)"),
        ("1:\n10,3.5,2005-09-06\n", r"line 2: .* lacks a valid Rating \(1 to 5\)"),
        ("1:\n99999999999999999999,3,2005-09-06\n", r"line 2: .* lacks a valid CustomerID"),
        (
            "1:\n10,3,2005-09-06\n2:\n11,3,2005-09-06\n1:\n12,3,2005-09-06\n",
            r"MovieID 1 heads two blocks \(.*line 1; .*line 5\)",
        ),
        # "2:" missing: movie 2's ratings would join movie 1's, and customer 10 twice
        (
            "1:\n10,3,2005-09-06\n11,5,2005-05-13\n10,4,2004-01-01\n",
            r"customer 10 rates movie 1 twice \(1 such rating\(s\)\).*'MovieID:' line missing",
        ),
        ("3:\n14,3,2005-09-06\n", r"MovieID 3 heads a block in both .*_1\.txt and .*_2\.txt"),
    ],
)
def test_bad_line_is_named(tmp_path: Path, part_1: str, message: str) -> None:
    folder, mapping = write(tmp_path, part_1=part_1)
    with pytest.raises(DataError, match=message):
        load_netflix(folder, mapping)


def test_malformed_map(tmp_path: Path) -> None:
    folder, mapping = write(tmp_path, mapping="item,genre\n1,Drama\n")
    with pytest.raises(DataError, match=r"domains\.csv: missing column\(s\) 'domain'"):
        load_netflix(folder, mapping)


def test_map_movie_absent_from_titles(tmp_path: Path) -> None:
    folder, mapping = write(tmp_path, mapping="item,domain\n1,Drama\n99,Drama\n")
    with pytest.raises(DataError, match=r"domains\.csv, line 3: movie 99 is not in movie_titles"):
        load_netflix(folder, mapping)


def test_map_listing_a_movie_in_two_domains(tmp_path: Path) -> None:
    folder, mapping = write(tmp_path, mapping="item,domain\n1,Drama\n2,Sport\n1,Sport\n")
    with pytest.raises(DataError, match=r"domains\.csv, line 4"):
        validate(load_netflix(folder, mapping))


def test_missing_titles_file(tmp_path: Path) -> None:
    folder, mapping = write(tmp_path)
    (folder / "movie_titles.csv").unlink()
    with pytest.raises(DataError, match=r"has no movie_titles\.csv"):
        load_netflix(folder, mapping)


def test_a_domain_map_that_is_a_folder_is_named_so(tmp_path: Path) -> None:
    folder, _ = write(tmp_path / "nf")
    (tmp_path / "map").mkdir()
    with pytest.raises(DataError, match=r"domain map .*map is a folder; it is a CSV file"):
        load_netflix(folder, tmp_path / "map")
