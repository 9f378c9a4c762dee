"""Text ids kept as pyarrow strings (aftrec.data.ids): numbered, found and compared as pandas
does with object columns of str, and the prepared files the same in memory and with
``--streaming``: leading zeros kept apart, non-ASCII ids sorted by code point, a Parquet
log's empty string a user of its own, an empty CSV field a missing id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftrec.cli import main
from aftrec.data.ids import TEXT, as_text, duplicated, factorize, positions
from aftrec.data.sources.generic import read_table
from tests.inputs import fails_cleanly, write
from tests.test_prepare_stream import files

#: ids that Python objects and pyarrow strings could tell apart or order differently
AWKWARD = ["007", "7", "07", "0", "", " 7", "7 ", "NA", "nan", "é", "e\u0301", "Ω", "日本", "Z"]
#: any text pyarrow stores (UTF-8: no lone surrogates), often one of AWKWARD
IDS = st.one_of(
    st.sampled_from(AWKWARD), st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)
)


def _objects(values: list[str | None]) -> pd.Series:
    """The ids as the code before kept them: an object column of str, missing values NaN."""
    return pd.Series([np.nan if v is None else v for v in values], dtype=object)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(IDS, st.none()), max_size=40), st.booleans())
def test_factorize_numbers_text_as_pandas_numbers_objects(
    values: list[str | None], sort: bool
) -> None:
    codes, uniques = factorize(as_text(_objects(values)), sort=sort)
    want_codes, want_uniques = pd.factorize(_objects(values), sort=sort)
    np.testing.assert_array_equal(codes, want_codes)
    assert list(uniques) == list(want_uniques)
    if sort:
        assert list(uniques) == sorted(uniques)  # by code point, as Python sorts str


@settings(max_examples=60, deadline=None)
@given(st.lists(IDS, unique=True, max_size=20), st.lists(st.one_of(IDS, st.none()), max_size=40))
def test_positions_are_get_indexer(catalogue: list[str], values: list[str | None]) -> None:
    index = pd.Index(as_text(pd.Series(catalogue, dtype=object)))
    want = pd.Index(pd.Series(catalogue, dtype=object)).get_indexer(pd.Index(_objects(values)))
    np.testing.assert_array_equal(positions(index, as_text(_objects(values))), want)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(AWKWARD), st.sampled_from(AWKWARD[:4]), st.integers(0, 2)),
        max_size=40,
    )
)
def test_duplicated_is_pandas_duplicated(rows: list[tuple[str, str, int]]) -> None:
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"timestamp": float})
    want = frame.astype({"user": object, "item": object}).duplicated(keep=False).to_numpy()
    text = frame.assign(user=as_text(frame["user"]), item=as_text(frame["item"]))
    np.testing.assert_array_equal(duplicated(text, ["user", "item", "timestamp"]), want)


def test_duplicated_with_integer_and_missing_ids() -> None:
    """Other id types take pandas' factorize; a missing id is a value like any other."""
    frame = pd.DataFrame(
        {"user": [1, 1, 2, 2, 3], "item": [5, 5, 5, 5, 5], "timestamp": [0, 0, 0, 1, 0]}
    )
    assert duplicated(frame, ["user", "item", "timestamp"]).tolist() == [1, 1, 0, 0, 0]
    text = pd.DataFrame({"user": as_text(_objects(["a", None, None, "a"])), "item": ["i"] * 4,
                         "timestamp": [0, 0, 0, 1]})  # fmt: skip
    assert duplicated(text, ["user", "item", "timestamp"]).tolist() == [0, 1, 1, 0]


def test_a_csv_files_ids_are_pyarrow_text(tmp_path: Path) -> None:
    """Not Python objects: "007" and "7" two ids, "NA" a name, an empty field missing."""
    log = tmp_path / "log.csv"
    log.write_text('user,item,timestamp\n007,i,1\n7,é,2\nNA,日本,3\n,i,4\n"",i,5\n')
    frame, _ = read_table(log)
    assert frame["user"].dtype == TEXT and frame["item"].dtype == TEXT
    assert frame["user"].iloc[:3].tolist() == ["007", "7", "NA"]
    assert frame["item"].tolist() == ["i", "é", "日本", "i", "i"]
    assert frame["user"].isna().tolist() == [False, False, False, True, True]


def _users(out: Path) -> list[str]:
    return pd.concat([pd.read_parquet(f) for f in files(out, "users")])["user"].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_text_ids_prepared_alike_in_memory_and_streaming(tmp_path: Path, suffix: str) -> None:
    """Users numbered in code-point order of their ids, leading zeros and non-ASCII ids kept as
    written, the same users and rows with ``--streaming`` (several partitions); in a Parquet
    log an empty string is a user like any other."""
    users = ["007", "7", "07", "é", "e", "Ω", "日本", "Z", "z", "NA"]
    if suffix == ".parquet":
        users.append("")  # a CSV file's empty field is a missing id instead
    items = pd.DataFrame({"item": ["0", "00", "ü", "i"], "domain": ["A", "A", "B", "B"]})
    log = pd.DataFrame(
        [(u, i, 10 * n + k) for n, u in enumerate(users) for k, i in enumerate(items["item"])],
        columns=["user", "item", "timestamp"],
    )
    lp, ip = write(log, tmp_path / f"log{suffix}"), write(items, tmp_path / "items.csv")
    outs = []
    for name, extra in (("memory", []), ("streaming", ["--streaming", "--partition-rows", "9"])):
        out = tmp_path / name
        argv = ["prepare", "--interactions", str(lp), "--items", str(ip), "--out", str(out),
                "--min-positives", "1", "--valid-ratio", "0", *extra]  # fmt: skip
        assert main(argv) == 0
        outs.append(out)
    memory, streamed = outs
    assert _users(memory) == sorted(users)
    assert sorted(_users(streamed)) == sorted(users)
    assert len(files(streamed, "users")) > 1
    items_out = pd.read_parquet(memory / "items.parquet")["item"].tolist()
    assert items_out == ["0", "00", "i", "ü"]
    assert (streamed / "items.parquet").read_bytes() == (memory / "items.parquet").read_bytes()


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_an_empty_csv_field_is_a_missing_user(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    log = tmp_path / "log.csv"
    log.write_text('user,item,timestamp\nu1,i,1\n"",i,2\n')
    items = write(pd.DataFrame({"item": ["i"], "domain": ["A"]}), tmp_path / "items.csv")
    argv = ["prepare", "--interactions", str(log), "--items", str(items),
            "--out", str(tmp_path / "out"), *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "line 3: missing 'user'", roots=(tmp_path,))
