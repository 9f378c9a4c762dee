"""Generic logs as people write them: ids with leading zeros or of another type in another
file, dates with fractions and zones, nanosecond clocks, folders of parts that disagree,
pre-split parts that overlap. Each is read as written, in memory and with ``--streaming``,
or refused in one line; none is silently changed."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aftrec.cli import main
from tests.inputs import fails_cleanly, write
from tests.test_prepare_stream import files, rows

ITEMS = pd.DataFrame({"item": [f"i{k}" for k in range(6)], "domain": ["A"] * 3 + ["B"] * 3})


def _clicks(users: list[str], start: int = 100) -> pd.DataFrame:
    """Every user clicks i0..i5 in order, one second apart."""
    return pd.DataFrame(
        [(u, f"i{k}", start + 10 * n + k) for n, u in enumerate(users) for k in range(6)],
        columns=["user", "item", "timestamp"],
    )


def _prepare(tmp_path: Path, log: Path, items: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name
    argv = ["prepare", "--interactions", str(log), "--items", str(items), "--out", str(out),
            "--min-positives", "1", "--valid-ratio", "0", *flags]  # fmt: skip
    assert main(argv) == 0
    return out


def _refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, log: Path, items: Path, *needles: str,
    flags: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """prepare LOG with ITEMS fails in one line holding ``needles``, writing nothing."""
    argv = ["prepare", "--interactions", str(log), "--items", str(items),
            "--out", str(tmp_path / "refused"), *flags]  # fmt: skip
    fails_cleanly(capsys, argv, *needles, roots=(tmp_path,))


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_ids_are_text_as_written(tmp_path: Path, streaming: bool) -> None:
    """'007' and '7' are two users, 'NA' is a user's name, and the ids are stored as such."""
    log = write(_clicks(["007", "7", "NA"]), tmp_path / "log.csv")
    items = write(ITEMS, tmp_path / "items.csv")
    out = _prepare(tmp_path, log, items, "out", *(["--streaming"] if streaming else []))
    got = rows(out)
    assert sorted(got["user"].unique()) == ["007", "7", "NA"]
    assert len(got) == 18  # nothing merged, nothing dropped


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_minus_zero_is_not_the_integer_item_0(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """A CSV log's item ids meet a Parquet catalogue's integers as integers only when each is
    written as that integer would be: "-0" would otherwise become item 0."""
    items = write(pd.DataFrame({"item": range(6), "domain": ["A"] * 3 + ["B"] * 3}),
                  tmp_path / "items.parquet")  # fmt: skip
    log = _clicks(["u1", "u2"])
    log["item"] = log["item"].str.removeprefix("i").replace({"0": "-0"})
    _refused(capsys, tmp_path, write(log, tmp_path / "log.csv"), items, "'-0'",
             flags=("--streaming",) if streaming else ())  # fmt: skip


def test_presplit_parts_of_other_id_types_meet_as_text(tmp_path: Path) -> None:
    """A CSV train file's integer ids and a Parquet test file's string ids are the same
    users and items: no unknown index written, no traceback."""
    items = write(pd.DataFrame({"item": range(1, 7), "domain": ["A"] * 3 + ["B"] * 3}),
                  tmp_path / "items.csv")  # fmt: skip
    train = pd.DataFrame({"user": [1] * 5 + [2] * 5, "item": list(range(1, 6)) * 2,
                          "timestamp": range(10)})  # fmt: skip
    test = pd.DataFrame({"user": ["1", "x7"], "item": ["6", "6"], "timestamp": [20, 21]})
    out = tmp_path / "out"
    argv = ["prepare", "--train", str(write(train, tmp_path / "train.csv")),
            "--test", str(write(test, tmp_path / "test.parquet")), "--items", str(items),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = rows(out)
    assert got[got["part"] == "test"][["user", "item"]].to_numpy().tolist() == [
        ["1", "6"], ["x7", "6"],
    ]  # fmt: skip
    assert (pd.read_parquet(out / "test.parquet")["item_idx"] >= 0).all()


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_dates_keep_their_fraction_and_zone(tmp_path: Path, streaming: bool) -> None:
    """Clicks milliseconds apart keep their order; a time with a zone is read in UTC."""
    base = pd.Timestamp("2020-09-13 12:26:40", tz="Europe/Paris")
    offsets = [5, 1, 4, 0, 3, 2]  # i0 is clicked 5 ms after the start, i1 1 ms, ...
    log = pd.DataFrame({
        "user": ["u"] * 6, "item": [f"i{k}" for k in range(6)],
        "timestamp": [base + pd.Timedelta(milliseconds=ms) for ms in offsets],
    })  # fmt: skip
    out = _prepare(tmp_path, write(log, tmp_path / "log.parquet"),
                   write(ITEMS, tmp_path / "items.csv"), "out",
                   *(["--streaming"] if streaming else []))  # fmt: skip
    got = rows(out)
    test = got[got["part"] == "test"]
    assert test["item"].tolist() == ["i0"]  # the last click, 5 ms in
    assert test["timestamp"].iloc[0] == pytest.approx(base.timestamp() + 0.005, abs=1e-6)


def test_nanosecond_clocks_keep_their_order_in_memory_and_are_refused_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    log = _clicks(["u"])
    log["timestamp"] = 1_600_000_000_000_000_000 + np.array([0, 1, 2, 3, 5, 4]) * 100
    path, items = write(log, tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    out = _prepare(tmp_path, path, items, "out")
    test = pd.read_parquet(out / "test.parquet")
    assert test["timestamp"].tolist() == [1_600_000_000_000_000_500]  # i4, exactly
    fails_cleanly(capsys, ["prepare", "--interactions", str(path), "--items", str(items),
                           "--out", str(tmp_path / "s"), "--streaming"],
                  "is beyond +-2**53", roots=(tmp_path,))  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("change", ["types", "columns"])
def test_parts_that_disagree_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool, change: str
) -> None:
    """A reader takes the first part's schema: a datetime part read as microseconds, or a
    later part's rating column dropped, would change the data without a word."""
    first, second = _clicks(["u1"]), _clicks(["u2"], start=200)
    if change == "types":
        second["timestamp"] = pd.to_datetime(second["timestamp"], unit="s")
        needle = "column 'timestamp' is timestamp"
    else:
        second["rating"] = 1
        needle = "differ from those of"
    folder = tmp_path / "log"
    write(first, folder / "part-0.parquet")
    write(second, folder / "part-1.parquet")
    items = write(ITEMS, tmp_path / "items.csv")
    argv = ["prepare", "--interactions", str(folder), "--items", str(items),
            "--out", str(tmp_path / "out"), *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "part-1.parquet", needle, roots=(tmp_path,))


def test_a_row_longer_than_the_header_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\nu1,i0,100,7\nu1,i1,101\n")
    items = write(ITEMS, tmp_path / "items.csv")
    _refused(capsys, tmp_path, path, items, "a row has more fields than the 3 of the header")


def test_presplit_pairs_already_in_train_count_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A test click of a (user, item) already in train is dropped with a note, as a repeat is
    within one log; options a pre-split does not use are not recorded as applied."""
    train = _clicks(["u1", "u2"])
    test = pd.DataFrame({"user": ["u1", "u2", "u2"], "item": ["i0", "i1", "i2"],
                         "timestamp": [300, 301, 5]})  # fmt: skip
    caplog.set_level("INFO", logger="aftrec.data.prepare")
    out = tmp_path / "out"
    argv = ["prepare", "--train", str(write(train.drop(index=8), tmp_path / "train.csv")),
            "--test", str(write(test, tmp_path / "test.csv")),
            "--items", str(write(ITEMS, tmp_path / "items.csv")), "--out", str(out),
            "--test-ratio", "0.5"]  # fmt: skip
    assert main(argv) == 0
    got = rows(out)
    assert got[got["part"] == "test"][["user", "item"]].to_numpy().tolist() == [["u2", "i2"]]
    assert "dropped 2 test positive(s) whose (user, item) is already in an earlier part" in (
        caplog.text
    )
    assert "1 user(s) have a test click before their last training click" in caplog.text
    split = json.loads((out / "meta.json").read_text())["split"]
    # no rating column: the threshold decided nothing
    assert split == {"rating_threshold": None, "valid_ratio": 0.2, "presplit": True,
                     "ties": "random", "tie_seed": 0}  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_log_without_positives_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    log = _clicks(["u1"]).assign(rating=1.0)
    path, items = write(log, tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    argv = ["prepare", "--interactions", str(path), "--items", str(items),
            "--out", str(tmp_path / "out"), *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "no positive interactions in its 6 row(s)",
                  "positives are ratings >= 3 (--rating-threshold)", roots=(tmp_path,))  # fmt: skip


def test_a_folder_of_csv_parts_asks_for_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(_clicks(["u1"]), tmp_path / "log" / "a.csv")
    items = write(ITEMS, tmp_path / "items.csv")
    argv = ["prepare", "--interactions", str(tmp_path / "log"), "--items", str(items),
            "--out", str(tmp_path / "out")]  # fmt: skip
    fails_cleanly(capsys, argv, "a folder of CSV parts is read only as the interactions of "
                  "`prepare --streaming`", roots=(tmp_path,))  # fmt: skip


def test_an_empty_out_is_refused_not_taken_for_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = write(ITEMS, tmp_path / "items.csv")
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--interactions", str(items), "--items", str(items), "--out", ""])
    assert exit_.value.code == 2
    assert "argument --out: an empty path" in capsys.readouterr().err


def test_dates_without_times_are_dates_and_true_false_is_no_time(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    log = _clicks(["u"])
    log["timestamp"] = [datetime.date(2020, 1, 1 + k) for k in (0, 1, 2, 3, 5, 4)]
    items = write(ITEMS, tmp_path / "items.csv")
    out = _prepare(tmp_path, write(log, tmp_path / "log.parquet"), items, "out")  # date32
    assert pd.read_parquet(out / "test.parquet")["item_idx"].tolist() == [4]  # Jan 6th
    log["timestamp"] = [True, False] * 3
    path = write(log, tmp_path / "bools.parquet")
    _refused(capsys, tmp_path, path, items, "column 'timestamp' holds true/false values")


def test_out_inside_the_input_folder_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = tmp_path / "log"
    write(_clicks(["u1"]), folder / "part-0.parquet")
    items = write(ITEMS, tmp_path / "items.csv")
    fails_cleanly(capsys, ["prepare", "--interactions", str(folder), "--items", str(items),
                           "--out", str(folder / "data")],
                  "is inside the --interactions folder", roots=(tmp_path,))  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--dataset", "ml-1m", "--domains", "map.csv"], "--domains: not read with --dataset"),
        (["--dataset", "synthetic", "--path", "raw"], "--path: not read with --dataset synthetic"),
        (["--dataset", "ml-100k", "--items", "items.csv"], "--items: not read with --dataset"),
        (["--interactions", "log.csv", "--items", "items.csv", "--path", "raw"],
         "--path: for a --dataset (MovieLens or netflix) only"),
    ],
)  # fmt: skip
def test_an_option_the_source_does_not_read_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], needle: str
) -> None:
    argv = ["prepare", *flags, "--out", str(tmp_path / "out")]
    fails_cleanly(capsys, argv, needle, roots=(tmp_path,))


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_pq_parts_are_parts_and_are_checked_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    second = _clicks(["u2"], start=200)
    second["timestamp"] = pd.to_datetime(second["timestamp"], unit="s")
    (tmp_path / "log").mkdir()
    _clicks(["u1"]).to_parquet(tmp_path / "log" / "part-0.pq", index=False)
    second.to_parquet(tmp_path / "log" / "part-1.PQ", index=False)
    argv = ["prepare", "--interactions", str(tmp_path / "log"),
            "--items", str(write(ITEMS, tmp_path / "items.csv")), "--out", str(tmp_path / "o"),
            *(["--streaming"] if streaming else [])]  # fmt: skip
    fails_cleanly(capsys, argv, "part-1.PQ: column 'timestamp' is timestamp", roots=(tmp_path,))


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize(
    ("users", "outcome"),
    [([1.0, 2.0, 3.0], [1, 2, 3]), ([1.0, 1.5, 3.0], "holds the number 1.5"),
     ([1.0, 1e20, 3.0], "holds the number 1e+20")],
)  # fmt: skip
def test_float_ids_are_integers_or_refused_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool,
    users: list[float], outcome: list[int] | str,
) -> None:  # fmt: skip
    """Integer ids stored as floats read as those integers; a float that is no integer, or
    one above 2**53, is refused, in memory as with --streaming."""
    log = pd.concat([_clicks(["a"]), _clicks(["b"]), _clicks(["c"])], ignore_index=True)
    log["user"] = np.repeat(users, 6)
    path = write(log, tmp_path / "log.parquet")
    items = write(ITEMS, tmp_path / "items.csv")
    flags = ["--streaming"] if streaming else []
    if isinstance(outcome, str):
        argv = ["prepare", "--interactions", str(path), "--items", str(items),
                "--out", str(tmp_path / "o"), *flags]  # fmt: skip
        fails_cleanly(capsys, argv, outcome, roots=(tmp_path,))
        return
    got = rows(_prepare(tmp_path, path, items, "o", *flags))
    assert sorted(got["user"].unique()) == outcome


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize(
    "start",
    [2**63 + 1000, 10**20, -(10**19), 1e300],
    ids=["uint64", "above-uint64", "negative", "float"],
)
def test_timestamps_beyond_int64_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool, start: float
) -> None:
    """A timestamp beyond int64 is refused whether the reader typed it uint64 (pandas) or
    float64 (pandas above 2**64, pyarrow's CSV reader of --streaming), instead of becoming a
    float that ties the clicks: no clock needs it, in any unit."""
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\n" + "".join(
        f"u,i{k},{start + 500 * k}\n" for k in range(6)))  # fmt: skip
    items = write(ITEMS, tmp_path / "items.csv")
    flags = ("--streaming",) if streaming else ()
    _refused(capsys, tmp_path, path, items, "line 2: timestamp", "is beyond int64", flags=flags)


def test_parts_with_ids_of_other_types_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    first = _clicks(["u1"]).assign(user=1)
    write(first, tmp_path / "log" / "part-0.parquet")
    write(_clicks(["x"], start=200), tmp_path / "log" / "part-1.parquet")
    argv = ["prepare", "--interactions", str(tmp_path / "log"),
            "--items", str(write(ITEMS, tmp_path / "items.csv")),
            "--out", str(tmp_path / "o")]  # fmt: skip
    fails_cleanly(capsys, argv, "part-1.parquet: column 'user' is", "string here and int64",
                  roots=(tmp_path,))  # fmt: skip


def test_a_presplit_test_part_emptied_by_repeats_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    train = _clicks(["u1"])
    test = pd.DataFrame({"user": ["u1"], "item": ["i0"], "timestamp": [300]})
    argv = ["prepare", "--train", str(write(train, tmp_path / "train.csv")),
            "--test", str(write(test, tmp_path / "test.csv")),
            "--items", str(write(ITEMS, tmp_path / "items.csv")),
            "--out", str(tmp_path / "o")]  # fmt: skip
    fails_cleanly(capsys, argv, "the test part is empty",
                  "once 1 test positive(s) already in an earlier part are dropped",
                  roots=(tmp_path,))  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_parquet_integer_ids_stay_integers(tmp_path: Path, streaming: bool) -> None:
    """No digit of an integer is lost, so a Parquet file's integer ids are kept as such (text
    ids cost time and memory on large logs); the catalogue's text ids meet them as text."""
    log = _clicks(["u"]).assign(user=7)
    out = _prepare(tmp_path, write(log, tmp_path / "log.parquet"),
                   write(ITEMS, tmp_path / "items.csv"), "out",
                   *(["--streaming"] if streaming else []))  # fmt: skip
    users = pd.concat([pd.read_parquet(f) for f in files(out, "users")])
    assert users["user"].tolist() == [7] and users["user"].dtype == np.int64


READ = (
    "aftrec reads Parquet files (.parquet, .pq) and CSV files (plain, or compressed as .gz, "
    ".bz2, .xz, .zip)"
)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("which", ["log", "packed-log", "items"])
def test_a_file_of_another_format_is_refused_by_its_suffix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool, which: str
) -> None:
    """A JSON file is not read as CSV (its first record taken for column names), compressed
    or not: the one line says which formats are read."""
    log, items = write(_clicks(["u1"]), tmp_path / "log.csv"), write(ITEMS, tmp_path / "items.csv")
    if which != "items":
        log = tmp_path / ("log.jsonl" if which == "log" else "log.ndjson.gz")
        _clicks(["u1"]).to_json(log, orient="records", lines=True)
    else:
        items = tmp_path / "items.json"
        ITEMS.to_json(items, orient="records")
    flags = ("--streaming",) if streaming else ()
    bad = items if which == "items" else log
    suffix = {"log": ".jsonl", "packed-log": ".ndjson", "items": ".json"}[which]
    _refused(capsys, tmp_path, log, items, f"{bad}: {READ}, not {suffix} files; convert it",
             flags=flags)  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("name", ["log.txt", "log", "log.gz"])
def test_a_csv_file_of_any_other_name_is_read_as_before(
    tmp_path: Path, streaming: bool, name: str
) -> None:
    """Files named ``.txt``, or nothing, were read as CSV (``.gz`` decompressed), in memory
    and streaming, until names were checked: they are again, as their ``.csv`` twin is."""
    flags = ("--streaming",) if streaming else ()
    log, items = _clicks(["u1", "u2"]), write(ITEMS, tmp_path / "items.csv")
    want = rows(_prepare(tmp_path, write(log, tmp_path / "log.csv"), items, "want", *flags))
    log.to_csv(tmp_path / name, index=False)  # (compressed by the suffix)
    got = rows(_prepare(tmp_path, tmp_path / name, items, "got", *flags))
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("suffix", [".xz", ".zip"])
def test_xz_and_zip_csv_files_are_read_in_memory_and_named_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str
) -> None:
    """pandas reads a ``.csv.xz`` or ``.csv.zip`` log, and its bad row is named by its line,
    read through the same decompression; pyarrow's reader of --streaming opens neither, which
    the one line says (it read the compressed bytes as text)."""
    log, items = _clicks(["u1", "u2"]), write(ITEMS, tmp_path / "items.csv")
    want = rows(_prepare(tmp_path, write(log, tmp_path / "log.csv"), items, "want"))
    path = tmp_path / f"log.csv{suffix}"
    log.to_csv(path, index=False)
    pd.testing.assert_frame_equal(rows(_prepare(tmp_path, path, items, "got")), want)
    log.loc[8, "item"] = "zzz"
    log.to_csv(path, index=False)
    _refused(capsys, tmp_path, path, items, f"{path}, line 10: item 'zzz' is not in the item")
    _refused(capsys, tmp_path, path, items, f"{path}: --streaming reads CSV files plain or "
             f"compressed as .gz or .bz2, not {suffix}", flags=("--streaming",))  # fmt: skip
    path.write_bytes(b"user,item,timestamp\n")  # not so compressed: lzma's error is no OSError
    _refused(capsys, tmp_path, path, items, f"{path}: cannot be read as CSV: ")


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_compression_neither_reader_opens_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """pandas needs a package aftrec does not for ``.zst`` (an ImportError traceback), and
    pyarrow's reader took the bytes for text."""
    path = tmp_path / "log.csv.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")  # a zstd frame's magic number
    flags = ("--streaming",) if streaming else ()
    _refused(capsys, tmp_path, path, write(ITEMS, tmp_path / "items.csv"),
             f"{path}: {READ}, not .zst compression; decompress it", flags=flags)  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_every_user_dropped_by_min_positives_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """Two users have 3 positive labels and eight have none: the two are dropped by
    --min-positives 5, which the message says (it said the first domain was empty) with the
    rule that counted them, without calling the two all the users."""
    log = _clicks([f"u{k}" for k in range(10)]).assign(label=[True, False] * 6 + [False] * 48)
    path, items = write(log, tmp_path / "log.parquet"), write(ITEMS, tmp_path / "items.csv")
    flags = ("--streaming",) if streaming else ()
    _refused(capsys, tmp_path, path, items, f"{path}: no user is left: none has 5 or more "
             "positives, and the 2 user(s) with at least one were dropped (--min-positives; "
             "positives are rows with label > 0)", flags=flags)  # fmt: skip
