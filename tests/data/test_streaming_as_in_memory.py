"""``prepare --streaming`` reads what the in-memory path reads, the same way, where the log
is read in pieces: a column's numbers typed per batch rather than by the first block, text ids
meeting an integer catalogue, compressed parts, a byte-order mark in one part only, dates
past 2262, empty partitions; and what neither path may do: skip a file of a folder unseen,
or end a full disk in a traceback."""

from __future__ import annotations

import errno
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aftrec.cli import main
from aftrec.data import stream
from aftrec.data.stream import _list_files, _open_log
from aftrec.errors import DataError, OutputError
from aftrec.outputs import atomic_directory
from tests.inputs import fails_cleanly, write
from tests.test_prepare_stream import files, rows

ITEMS = pd.DataFrame({"item": [f"i{k}" for k in range(6)], "domain": ["A"] * 3 + ["B"] * 3})


def _log(n_users: int = 20, seed: int = 0) -> pd.DataFrame:
    """Every user clicks the six items in a random order, with ratings 1..5."""
    rng = np.random.default_rng(seed)
    frames = [
        pd.DataFrame(
            {
                "user": f"u{u}",
                "item": [f"i{k}" for k in rng.permutation(6)],
                "timestamp": 1_000 + 10 * u + np.arange(6),
                "rating": rng.integers(1, 6, 6),
            }
        )
        for u in range(n_users)
    ]
    return pd.concat(frames, ignore_index=True)


def _prepare(log: Path, items: Path, out: Path, *flags: str) -> pd.DataFrame:
    argv = ["prepare", "--interactions", str(log), "--items", str(items), "--out", str(out),
            "--min-positives", "1", *flags]  # fmt: skip
    assert main(argv) == 0
    return rows(out)


def _both(log: Path, whole: Path, items: Path, tmp_path: Path) -> None:
    """``whole`` (one file) in memory and ``log`` streamed give the same rows and items."""
    memory = _prepare(whole, items, tmp_path / "memory")
    streamed = _prepare(log, items, tmp_path / "streamed", "--streaming", "--partition-rows", "7")
    pd.testing.assert_frame_equal(streamed, memory)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "streamed" / "items.parquet"),
        pd.read_parquet(tmp_path / "memory" / "items.parquet"),
    )


@pytest.mark.parametrize(
    ("column", "later"),
    [("timestamp", lambda t: t + 0.5), ("rating", lambda r: r - 0.5),
     ("label", lambda x: x.astype(float))],
)  # fmt: skip
def test_a_later_part_may_hold_other_numbers(
    tmp_path: Path, column: str, later: Callable[[np.ndarray], np.ndarray]
) -> None:
    """pyarrow typed a column from the first part and refused the second's 4.5 (or its
    fractional times, or labels written 1.0), where pandas reads the file whole."""
    log = _log()
    if column == "label":
        log = log.drop(columns="rating").assign(label=(log["rating"] >= 3).astype(int))
    first, second = log.iloc[:60].copy(), log.iloc[60:].copy()
    second[column] = later(second[column].to_numpy())
    folder = tmp_path / "parts"
    write(first, folder / "part-0.csv")
    write(second, folder / "part-1.csv")
    whole = write(pd.concat([first, second], ignore_index=True), tmp_path / "whole.csv")
    _both(folder, whole, write(ITEMS, tmp_path / "items.csv"), tmp_path)


def test_a_later_block_of_one_file_may_hold_other_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same within one CSV file, past pyarrow's first block."""
    monkeypatch.setattr(stream, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)
    log = _log(40).astype({"timestamp": float})
    log.loc[200:, "timestamp"] += 0.25
    whole = write(log, tmp_path / "log.csv")
    _both(whole, whole, write(ITEMS, tmp_path / "items.csv"), tmp_path)


def test_text_item_ids_meet_an_integer_catalogue_as_in_memory(tmp_path: Path) -> None:
    """A CSV log's ids 2, 9, 10 against a Parquet catalogue's integers are those integers, so
    the items are numbered 2 < 9 < 10 (not as text, "10" < "2"), and ties in time are broken
    by that numbering alike."""
    ids = [2, 9, 10, 11, 12, 13]
    items = write(pd.DataFrame({"item": ids, "domain": ["A"] * 6}), tmp_path / "items.parquet")
    log = pd.DataFrame({"user": "u1", "item": [str(i) for i in ids], "timestamp": 100})
    path = write(log, tmp_path / "log.csv")
    _both(path, path, items, tmp_path)
    assert pd.read_parquet(tmp_path / "streamed" / "items.parquet")["item"].tolist() == ids


def test_a_text_id_that_is_no_plain_integer_is_unknown_to_an_integer_catalogue(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = write(pd.DataFrame({"item": range(6), "domain": ["A"] * 6}), tmp_path / "items.parquet")
    log = pd.DataFrame({"user": "u1", "item": ["1", "2", "007"], "timestamp": [1, 2, 3]})
    argv = ["prepare", "--interactions", str(write(log, tmp_path / "log.csv")),
            "--items", str(items), "--out", str(tmp_path / "o"), "--streaming"]  # fmt: skip
    fails_cleanly(capsys, argv, "item '007' is not in the item catalogue", roots=(tmp_path,))


def test_compressed_parts_are_read_and_counted(tmp_path: Path) -> None:
    """A folder's ``.csv.gz`` part is read, not skipped, and its rows are counted from what
    it holds (its size would say 1/3 of them, and one partition would take them all)."""
    log = _log(60)
    folder = tmp_path / "parts"
    write(log.iloc[:120], folder / "part-0.csv")
    with gzip.open(folder / "part-1.csv.gz", "wt", newline="") as fh:
        log.iloc[120:].to_csv(fh, index=False)
    whole = write(log, tmp_path / "whole.csv")
    _both(folder, whole, write(ITEMS, tmp_path / "items.csv"), tmp_path)
    files_, kind = _list_files(folder)
    estimate = _open_log(folder, files_, kind).estimate_rows()
    assert len(log) <= estimate <= len(log) * 1.1


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_folder_s_stray_file_is_refused_not_skipped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """A part named ``.txt`` was left out of the data with exit 0."""
    folder = tmp_path / "parts"
    log = _log()
    suffix = ".csv" if streaming else ".parquet"
    write(log.iloc[:60], folder / f"part-0{suffix}")
    log.iloc[60:].to_csv(folder / "part-1.txt", index=False)
    (folder / "_SUCCESS").write_text("")  # a marker, skipped as before
    argv = ["prepare", "--interactions", str(folder), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "part-1.txt: neither a Parquet", roots=(tmp_path,))


def test_a_byte_order_mark_in_one_part_only(tmp_path: Path) -> None:
    log = _log()
    folder = tmp_path / "parts"
    write(log.iloc[:60], folder / "part-0.csv")
    text = log.iloc[60:].to_csv(index=False)
    (folder / "part-1.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    whole = write(log, tmp_path / "whole.csv")
    _both(folder, whole, write(ITEMS, tmp_path / "items.csv"), tmp_path)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_float_id_that_is_nan_is_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """A NaN (not a null) in a Parquet file's float user ids was a pyarrow traceback."""
    log = _log().assign(user=lambda f: f["user"].str[1:].astype(float))
    log.loc[4, "user"] = np.nan
    table = pa.Table.from_pandas(log, preserve_index=False)
    nan = pa.array(log["user"].to_numpy(), pa.float64())  # a NaN, where from_pandas writes null
    table = table.set_column(table.schema.get_field_index("user"), "user", nan)
    assert pa.compute.sum(pa.compute.is_nan(table["user"])).as_py() == 1
    pq.write_table(table, tmp_path / "log.parquet")
    argv = ["prepare", "--interactions", str(tmp_path / "log.parquet"), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "row 4: missing 'user'", roots=(tmp_path,))


def test_dates_past_2262_are_read(tmp_path: Path) -> None:
    """A Parquet file's microsecond times past the nanosecond clock's end (2262) were a
    pandas OutOfBoundsDatetime traceback, in memory and streaming."""
    log = _log()
    start = np.datetime64("2500-01-01T00:00:00", "us")
    log["timestamp"] = start + log["timestamp"].to_numpy() * np.timedelta64(1, "s")
    micro = pa.array(log["timestamp"].to_numpy(), pa.timestamp("us"))
    table = pa.table({**{c: log[c] for c in ("user", "item", "rating")}, "timestamp": micro})
    pq.write_table(table, tmp_path / "log.parquet")
    path = tmp_path / "log.parquet"
    _both(path, path, write(ITEMS, tmp_path / "items.csv"), tmp_path)
    seconds = (start - np.datetime64(0, "s")) // np.timedelta64(1, "s")  # 16,725,225,600
    times = rows(tmp_path / "memory")["timestamp"] - seconds
    assert times.between(1_000, 1_000 + 10 * 20).all()


def test_empty_partitions_keep_the_user_ids_type(tmp_path: Path) -> None:
    """Most of 60 partitions of 120 rows are empty; their users file had a column of type
    null, and the users read back as objects, not text."""
    path = write(_log(), tmp_path / "log.csv")
    out = tmp_path / "o"
    items = write(ITEMS, tmp_path / "i.csv")
    argv = ["prepare", "--interactions", str(path), "--items", str(items), "--out", str(out),
            "--min-positives", "1", "--streaming", "--partition-rows", "2"]  # fmt: skip
    assert main(argv) == 0
    types = {pq.read_schema(f).field("user").type for f in files(out, "users")}
    assert types == {pa.string()} or types == {pa.large_string()}
    assert len(files(out, "users")) > 40  # more partitions than users: some are empty


def test_the_most_negative_timestamp_is_refused_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """np.abs(-2**63) is -2**63, which passed the check against 2**53."""
    log = _log().astype({"timestamp": np.int64})
    log.loc[3, "timestamp"] = np.iinfo(np.int64).min
    argv = ["prepare", "--interactions", str(write(log, tmp_path / "log.parquet")), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            "--streaming"]  # fmt: skip
    fails_cleanly(capsys, argv, "beyond +-2**53", roots=(tmp_path,))


def test_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """A write that fails for want of space inside the output's block was a traceback (seven
    chained ones from --streaming's bucket writers); it is the output's error now, and the
    temporary folder is gone. Another error keeps its own type: it may be the input's."""
    out = tmp_path / "out"
    with (
        pytest.raises(OutputError, match=r"cannot write .*out: .*No space left"),
        atomic_directory(out) as tmp,
    ):
        (tmp / "a").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError), atomic_directory(out):
        raise FileNotFoundError(errno.ENOENT, "no such input")
    assert list(tmp_path.iterdir()) == []


def test_true_false_beside_numbers_is_refused_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Labels 1/0 in one part and True/False in another are text to pandas reading the file
    whole, and refused; each batch typed alone had accepted them."""
    log = _log().drop(columns="rating").assign(label=1)
    first, second = log.iloc[:60], log.iloc[60:].assign(label="True")
    folder = tmp_path / "parts"
    write(first, folder / "part-0.csv")
    write(second, folder / "part-1.csv")
    items = write(ITEMS, tmp_path / "items.csv")
    whole = write(pd.concat([first, second]), tmp_path / "whole.csv")
    for log_path, flags, line in ((whole, (), 62), (folder, ("--streaming",), 2)):
        argv = ["prepare", "--interactions", str(log_path), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        fails_cleanly(capsys, argv, f"line {line}: non-numeric value 'True' in column 'label'",
                      roots=(tmp_path,))  # fmt: skip


def test_nineteen_digit_ids_meet_an_integer_catalogue_as_integers(tmp_path: Path) -> None:
    """18 digits were the longest integer read as one: 1000000000000000005 made the whole
    catalogue text in memory (numbered "1000..." < "20" < "7") and not streaming."""
    ids = [7, 20, 1_000_000_000_000_000_005, 2**63 - 1, -(2**63), 3, 4]
    items = write(pd.DataFrame({"item": ids, "domain": ["A"] * 7}), tmp_path / "items.parquet")
    log = pd.DataFrame({"user": "u1", "item": [str(i) for i in ids], "timestamp": range(7)})
    path = write(log, tmp_path / "log.csv")
    _both(path, path, items, tmp_path)
    assert pd.read_parquet(tmp_path / "memory" / "items.parquet")["item"].tolist() == sorted(ids)


def test_an_upper_case_compressed_suffix_is_named_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """pyarrow decompresses by a lower-case suffix only: LOG.CSV.GZ was read as text."""
    path = tmp_path / "log.CSV.GZ"
    with gzip.open(path, "wt", newline="") as fh:
        _log().to_csv(fh, index=False)
    argv = ["prepare", "--interactions", str(path), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            "--streaming"]  # fmt: skip
    fails_cleanly(capsys, argv, "write its suffix in lower case (.gz)", roots=(tmp_path,))


def test_a_truncated_compressed_log_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """In memory pandas' EOFError, streaming the row count's, were tracebacks."""
    path = tmp_path / "log.csv.gz"
    with gzip.open(path, "wt", newline="") as fh:
        _log(400).to_csv(fh, index=False)
    whole = path.read_bytes()
    files_, kind = _list_files(path)
    opened = _open_log(path, files_, kind)
    path.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(DataError, match="cannot be read as CSV"):
        opened.estimate_rows()
    argv = ["prepare", "--interactions", str(path), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o")]  # fmt: skip
    fails_cleanly(capsys, argv, "cannot be read as CSV", roots=(tmp_path,))


@pytest.mark.parametrize("link", ["broken", "folder"])
def test_a_part_that_is_no_file_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, link: str
) -> None:
    """A broken link, or a link to a folder of parts (not followed), was skipped unseen."""
    folder = tmp_path / "parts"
    write(_log(), folder / "part-0.parquet")
    elsewhere = tmp_path / "elsewhere"
    write(_log(seed=1), elsewhere / "part-1.parquet")
    target = elsewhere if link == "folder" else tmp_path / "gone.parquet"
    (folder / "more").symlink_to(target)
    for flags in ((), ("--streaming",)):
        items = write(ITEMS, tmp_path / "items.csv")
        argv = ["prepare", "--interactions", str(folder), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        fails_cleanly(capsys, argv, "more: ", roots=(tmp_path,))


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("damage", ["dropped", "float"])
def test_a_part_file_without_its_columns_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool, damage: str
) -> None:
    """A part without ``domain_idx`` was a KeyError traceback; among partitions, pd.concat
    filled it with NaN, read as garbage indices, and training failed deep in evaluation."""
    out = tmp_path / "data"
    flags = ("--streaming", "--partition-rows", "40") if streaming else ()
    _prepare(write(_log(), tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv"), out,
             *flags)  # fmt: skip
    part = files(out, "valid")[-1]
    frame = pd.read_parquet(part)
    frame = frame.drop(columns="domain_idx") if damage == "dropped" else frame.astype(float)
    frame.to_parquet(part, index=False)
    argv = ["train", "--data", str(out), "--model", "pop", "--out", str(tmp_path / "run")]
    fails_cleanly(capsys, argv, f"{part.name}: prepared dataset is unreadable",
                  roots=(tmp_path,))  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_bad_row_of_a_folder_is_named_by_its_part(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """In memory the message named the folder and the row in all parts together (row 67)."""
    log = _log()
    log.loc[60 + 7, "item"] = "zzz"
    folder = tmp_path / "parts"
    write(log.iloc[:60], folder / "p1.parquet")
    write(log.iloc[60:], folder / "p2.parquet")
    argv = ["prepare", "--interactions", str(folder), "--items",
            str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "p2.parquet, row 7: item 'zzz' is not in the item catalogue",
                  roots=(tmp_path,))  # fmt: skip


def _iso_log() -> tuple[pd.DataFrame, pd.Series]:
    """The log with its times as ISO-8601 text of several forms (a date alone, a space or a
    T, Z, another zone, a fraction), and the instants they stand for."""
    log = _log(40)
    seconds = log["timestamp"].to_numpy() - 1_000 + np.where(np.arange(len(log)) % 7 == 3, 0.25, 0)
    instants = pd.Series(pd.Timestamp("2021-01-01", tz="UTC") + pd.to_timedelta(seconds, "s"))
    forms = [
        lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f"),  # no zone: UTC
        lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        lambda t: t.tz_convert("Etc/GMT-2").strftime("%Y-%m-%dT%H:%M:%S.%f+02:00"),
        lambda t: t.tz_convert("Etc/GMT+5").strftime("%Y-%m-%d %H:%M:%S.%f-0500"),
    ]
    text = [forms[k % len(forms)](t) for k, t in enumerate(instants)]
    text[0] = "2021-01-01"  # midnight, the first click
    return log.assign(timestamp=text), instants


@pytest.mark.parametrize("kind", ["csv", "parquet", "dictionary"])
def test_iso_text_times_are_the_seconds_of_a_datetime_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Text dates and times were refused as non-numeric; they are now the seconds a Parquet
    datetime column of the same instants gives, in memory and streamed in small batches;
    also from a Parquet dictionary column (pandas' categorical), refused as mixed before."""
    monkeypatch.setattr(stream, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)
    log, instants = _iso_log()
    items = write(ITEMS, tmp_path / "items.csv")
    reference = write(log.assign(timestamp=instants), tmp_path / "datetimes.parquet")
    want = _prepare(reference, items, tmp_path / "reference")
    if kind == "dictionary":
        log, kind = log.astype({"timestamp": "category"}), "parquet"
    path = write(log, tmp_path / f"log.{kind}")
    _both(path, path, items, tmp_path)
    pd.testing.assert_frame_equal(rows(tmp_path / "memory"), want)
    seconds = {t.timestamp() for t in instants}  # the instants, to the quarter second
    assert set(want["timestamp"]) <= seconds and (want["timestamp"] % 1 == 0.25).any()


MIXED = "a timestamp column holds numbers or ISO-8601 dates and times, not both"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("1609459205", "line 7: timestamp '1609459205' is not an ISO-8601 date and time"),
        ("2021-02-30 10:00:00", "line 7: timestamp '2021-02-30 10:00:00' is not an ISO-8601"),
        ("02/01/2021 10:00", "line 7: timestamp '02/01/2021 10:00' is not an ISO-8601 date"),
        ("2016-12-31T23:59:60Z", "'2016-12-31T23:59:60Z' is not an ISO-8601 date and time as "
         "aftrec reads them (a day that exists, then optionally a time from 00:00 to 23:59:59"),
        (None, "line 7: non-numeric value '2021-01-01T00:00:05.000000Z' in column 'timestamp' "
         "(235 bad row(s) in all); " + MIXED),
    ],
    ids=["number-among-dates", "no-such-day", "another-form", "leap-second",
         "dates-after-numbers"],
)  # fmt: skip
def test_bad_or_mixed_text_times_are_one_line_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str | None, needle: str
) -> None:
    """The column's first value says what it holds, numbers or ISO-8601 text; a value that is
    not of that kind is refused by its line, alike in memory and streaming."""
    log, _ = _iso_log()
    if value is None:  # numbers, then dates
        log.loc[:4, "timestamp"] = [str(1609459200 + k) for k in range(5)]
    else:
        log.loc[5, "timestamp"] = value
    path, items = write(log, tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    messages = []
    for flags in ((), ("--streaming",)):
        argv = ["prepare", "--interactions", str(path), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        messages.append(fails_cleanly(capsys, argv, needle, roots=(tmp_path,)))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("first", ["numbers", "dates"])
def test_a_later_batch_of_the_other_kind_of_times_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    first: str,
) -> None:  # fmt: skip
    """Numbers in the first batches, dates in the later ones (or the reverse): in memory the
    column mixes them and is refused at the first of the other kind; so it is streaming,
    where each batch would be good alone: the first batch decides for the whole log."""
    monkeypatch.setattr(stream, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)
    log, instants = _iso_log()
    numbers = (instants.astype("int64") // 10**6 / 10**3).astype(str)
    log["timestamp"] = np.where(
        (np.arange(len(log)) < 120) == (first == "numbers"), numbers, log["timestamp"]
    )
    path, items = write(log, tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    for flags in ((), ("--streaming",)):
        argv = ["prepare", "--interactions", str(path), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        fails_cleanly(capsys, argv, "line 122: ", MIXED, roots=(tmp_path,))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_an_empty_first_part_sets_no_kind_of_times(tmp_path: Path, kind: str) -> None:
    """A first part without rows (a header only, or a Parquet file of none) set the log's
    times to numbers, and the next part's ISO-8601 dates were refused streaming: the log's
    first timestamp decides, wherever it comes, as in memory."""
    log, _ = _iso_log()
    folder = tmp_path / "parts"
    write(log.iloc[:0], folder / f"part-0.{kind}")
    write(log, folder / f"part-1.{kind}")
    whole = write(log, tmp_path / f"whole.{kind}")
    _both(folder, whole, write(ITEMS, tmp_path / "items.csv"), tmp_path)


@pytest.mark.parametrize(
    ("column", "first"),
    [("timestamp", "2021-01-01"), ("timestamp", "100.5"), ("rating", "4.5")],
    ids=["date", "fraction", "rating"],
)
def test_a_missing_last_number_is_one_line_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, column: str, first: str
) -> None:
    """A CSV batch's last value missing, after one that pandas types (a date, a fraction),
    was written as an empty last line that pandas dropped: the column came back a row short
    of its batch, a pyarrow traceback streaming."""
    log = pd.DataFrame({"user": "u1", "item": ["i1", "i2"], "timestamp": ["100", "101"],
                        "rating": ["4", "4"]})  # fmt: skip
    log[column] = [first, ""]
    path, items = write(log, tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    messages = []
    for flags in ((), ("--streaming",)):
        argv = ["prepare", "--interactions", str(path), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        needle = f"log.csv, line 3: missing value in column {column!r} (1 bad row(s) in all)"
        messages.append(fails_cleanly(capsys, argv, needle, roots=(tmp_path,)))
    assert messages[0] == messages[1]


def test_a_nanosecond_fraction_leaves_other_dates_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One fraction of nine digits made pandas parse the whole column at nanoseconds, where
    2300-01-01 does not fit: refused in memory, read streaming, whose batches held it apart.
    The fraction is the one a nanosecond datetime column gives, seconds plus ns / 1e9."""
    monkeypatch.setattr(stream, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)
    log, _ = _iso_log()
    log["rating"] = 5
    log.loc[3, "timestamp"] = "2021-01-01T00:00:03.123456789Z"
    log.loc[len(log) - 1, "timestamp"] = "2300-01-01"
    path = write(log, tmp_path / "log.csv")
    _both(path, path, write(ITEMS, tmp_path / "items.csv"), tmp_path)
    times = rows(tmp_path / "memory")["timestamp"]
    assert (times == 1_609_459_203 + 123_456_789 / 10**9).sum() == 1
    assert (times == 10_413_792_000.0).sum() == 1
