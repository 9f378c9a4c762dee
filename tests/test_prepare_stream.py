"""``aftrec prepare --streaming``: the partitioned layout holds exactly the rows, parts and counts
of the in-memory path; :class:`Dataset` reads it whole or by partition; bad input and interrupts
leave nothing behind.

Logs: a synthetic log written as several Parquet part files, and a CSV variant with string ids,
ratings (so some rows are not positives), repeated clicks and users too sparse to keep. A small
``--partition-rows`` makes several partitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aftrec.cli import main
from aftrec.data import stream
from aftrec.data.dataset import Dataset
from aftrec.data.prepared import read_meta
from aftrec.data.sources.synthetic import SyntheticConfig, catalogue, iter_chunks
from aftrec.errors import DataError
from tests.inputs import ROW, fails_cleanly, make_log, snapshot, write

CFG = SyntheticConfig(
    n_users=1500, n_domains=3, items_per_domain=120, n_interactions=36_000, n_topics=6, seed=5
)
PARTITION_ROWS = "8000"  # about 5 partitions of the 36,000-row log
SAME_META = ("domains", "domain_offsets", "n_users", "n_items", "counts", "users_dropped", "split")


def argv(inter: Path, items: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--interactions", str(inter), "--items", str(items), "--out", str(out),
            *extra]  # fmt: skip


def streaming(inter: Path, items: Path, out: Path, *extra: str) -> list[str]:
    return argv(inter, items, out, "--streaming", "--partition-rows", PARTITION_ROWS, *extra)


def csv_log(seed: int = 0) -> pd.DataFrame:
    """The synthetic log with string user ids ("u10" sorts before "u9"), ratings 1..5, and
    repeated clicks on an item later in time (only the first click counts)."""
    rng = np.random.default_rng(seed)
    inter = pd.concat(list(iter_chunks(CFG, chunk_users=400)), ignore_index=True)
    inter = inter.assign(user="u" + inter["user"].astype(str), domain=inter["domain"].astype(str))
    inter["rating"] = rng.integers(1, 6, len(inter)).astype(float)
    again = inter.sample(frac=0.05, random_state=seed).assign(
        timestamp=lambda f: f["timestamp"] + 1000
    )
    return pd.concat([inter, again], ignore_index=True).sample(frac=1.0, random_state=seed)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (interactions, items): Parquet parts in a folder, one CSV file, CSV parts."""
    root = tmp_path_factory.mktemp("stream-logs")
    items = catalogue(CFG).loc[:, ["item", "domain"]]
    parquet_items = write(items, root / "items.parquet")
    folder = root / "parts"
    for k, chunk in enumerate(iter_chunks(CFG, chunk_users=400)):
        write(chunk, folder / f"part-{k:05d}.parquet")
    (folder / "_SUCCESS").write_text("")  # ignored, as Spark's marker files are
    inter = csv_log()
    csv_items = write(items, root / "items.csv")
    csv_folder = root / "csv-parts"
    third = -(-len(inter) // 3)
    for k in range(3):
        write(inter.iloc[k * third : (k + 1) * third], csv_folder / f"part-{k}.csv")
    return {
        "parquet-parts": (folder, parquet_items),
        "csv": (write(inter, root / "inter.csv"), csv_items),
        "csv-parts": (csv_folder, csv_items),
    }


@pytest.fixture(scope="module")
def prepared(
    logs: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """name -> (in-memory output, streaming output)."""
    root = tmp_path_factory.mktemp("stream-out")
    out = {}
    for name, (inter, items) in logs.items():
        memory, streamed = root / f"{name}-memory", root / f"{name}-stream"
        # the in-memory path reads one CSV file, not a folder of CSV parts: the same rows
        assert main(argv(logs["csv"][0] if name == "csv-parts" else inter, items, memory)) == 0
        assert main(streaming(inter, items, streamed)) == 0
        out[name] = (memory, streamed)
    return out


def files(out: Path, kind: str) -> list[Path]:
    """A prepared folder's files of ``kind`` (users, train, valid, test), in order."""
    if read_meta(out).get("layout") == "partitioned":
        return sorted((out / kind).glob("part-*.parquet"))
    return [out / f"{kind}.parquet"]


def rows(out: Path) -> pd.DataFrame:
    """Every prepared row as (original user, original item, timestamp, part), sorted."""
    users = pd.concat([pd.read_parquet(f) for f in files(out, "users")], ignore_index=True)
    items = pd.read_parquet(out / "items.parquet")
    frames = [
        pd.read_parquet(f).assign(part=name)
        for name in ("train", "valid", "test")
        for f in files(out, name)
    ]
    every = pd.concat(frames, ignore_index=True).merge(users, on="user_idx")
    every = every.merge(items, on="item_idx")
    every = every.loc[:, ["user", "item", "timestamp", "part"]]
    return every.sort_values(["user", "item", "timestamp"], ignore_index=True)


# --------------------------------------------------------------------------- same as in memory


@pytest.mark.parametrize("name", ["parquet-parts", "csv", "csv-parts"])
def test_streaming_gives_the_in_memory_rows(
    prepared: dict[str, tuple[Path, Path]], name: str
) -> None:
    memory, streamed = prepared[name]
    got, want = rows(streamed), rows(memory)
    assert len(want) > 15_000
    pd.testing.assert_frame_equal(got, want)
    meta, ref = read_meta(streamed), read_meta(memory)
    for key in SAME_META:
        assert meta[key] == ref[key], key
    pd.testing.assert_frame_equal(
        pd.read_parquet(streamed / "items.parquet"), pd.read_parquet(memory / "items.parquet")
    )
    if name != "parquet-parts":  # ratings, repeats and sparse users were at work
        assert ref["users_dropped"] > 0
        assert len(want) < len(csv_log())


@pytest.mark.parametrize("name", ["parquet-parts", "csv"])
def test_partitioned_layout(prepared: dict[str, tuple[Path, Path]], name: str) -> None:
    memory, streamed = prepared[name]
    meta = read_meta(streamed)
    assert meta["format"] == 2 and meta["layout"] == "partitioned"
    partitions = meta["partitions"]
    assert len(partitions) >= 4
    assert {p.name for p in streamed.iterdir()} == {
        "meta.json", "items.parquet", "users", "train", "valid", "test"
    }  # fmt: skip
    assert not [p for p in streamed.parent.iterdir() if p.name.startswith(".")]
    dtypes = {k: pd.read_parquet(f).dtypes for k in ("users", "train") for f in files(memory, k)}
    start = 0
    for p, part in enumerate(partitions):
        lo, hi = part["users"]
        assert lo == start and hi > lo
        start = hi
        users = pd.read_parquet(streamed / "users" / f"part-{p:05d}.parquet")
        assert users["user_idx"].tolist() == list(range(lo, hi))
        assert users["user"].is_monotonic_increasing  # by original id inside a partition
        pd.testing.assert_series_equal(users.dtypes, dtypes["users"])
        for kind in ("train", "valid", "test"):
            frame = pd.read_parquet(streamed / kind / f"part-{p:05d}.parquet")
            assert len(frame) == part["rows"][kind]
            pd.testing.assert_series_equal(frame.dtypes, dtypes["train"])
            assert frame["user_idx"].between(lo, hi - 1).all()
            order = np.lexsort((frame["item_idx"], frame["timestamp"], frame["user_idx"]))
            assert (order == np.arange(len(frame))).all()
    assert start == meta["n_users"]
    total = {k: sum(p["rows"][k] for p in partitions) for k in ("train", "valid", "test")}
    assert total == {k: sum(v.values()) for k, v in meta["counts"].items()}


@pytest.mark.parametrize(
    ("fraction_for", "dtype"), [("dropped", np.int64), ("kept", np.float64)], ids=str
)
def test_timestamps_typed_as_in_memory(tmp_path: Path, fraction_for: str, dtype: type) -> None:
    """Timestamps are int64 when every kept one is whole, even if a dropped user's are not."""
    inter, items = make_log()
    sparse = pd.DataFrame(
        {"user": "sparse", "item": ["movie-1", "book-1"], "domain": ["movie", "book"]}
    ).assign(timestamp=[1.5, 2.5], rating=4.0)
    inter = pd.concat([inter, sparse], ignore_index=True)
    if fraction_for == "kept":
        inter.loc[ROW, "timestamp"] += 0.25
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    memory, streamed = tmp_path / "memory", tmp_path / "stream"
    assert main(argv(ip, mp, memory)) == 0
    assert main(argv(ip, mp, streamed, "--streaming", "--partition-rows", "100")) == 0
    for out in (memory, streamed):
        types = {pd.read_parquet(f)["timestamp"].dtype for f in files(out, "train")}
        assert types == {np.dtype(dtype)}
    pd.testing.assert_frame_equal(rows(streamed), rows(memory))


# --------------------------------------------------------------------------- Dataset


def test_dataset_reads_the_partitioned_layout(prepared: dict[str, tuple[Path, Path]]) -> None:
    memory, streamed = prepared["csv"]
    ref, got = Dataset(memory), Dataset(streamed)
    assert got.info == ref.info
    assert ref.n_partitions == 1 and got.n_partitions == len(got.meta["partitions"]) > 1
    pd.testing.assert_frame_equal(got.items, ref.items)
    assert sorted(got.users["user"]) == sorted(ref.users["user"])
    # user_idx of the streamed data -> user_idx of the in-memory data, through original ids
    to_ref = ref.user_index(got.users["user"].tolist())
    for name in ("train", "valid", "test"):
        a, b = got.parts[name], ref.parts[name]
        assert np.all(np.diff(a.user) >= 0)  # partitions in order: sorted by user, then time
        same_user = a.user[1:] == a.user[:-1]
        assert np.all(np.diff(a.timestamp)[same_user] >= 0)
        user = to_ref[a.user]
        order = np.lexsort((a.item, a.timestamp, user))
        np.testing.assert_array_equal(user[order], b.user)
        np.testing.assert_array_equal(a.item[order], b.item)
        np.testing.assert_array_equal(a.domain[order], b.domain)
        np.testing.assert_array_equal(a.timestamp[order], b.timestamp)
        assert a.timestamp.dtype == b.timestamp.dtype


def test_dataset_loads_chosen_partitions(prepared: dict[str, tuple[Path, Path]]) -> None:
    _, streamed = prepared["parquet-parts"]
    whole = Dataset(streamed)
    chosen = [3, 1]
    some = Dataset(streamed, partitions=chosen)
    assert some.info == whole.info and some.n_partitions == whole.n_partitions
    assert some.partitions == (1, 3)
    pd.testing.assert_frame_equal(some.users, whole.users)  # ids stay global
    ranges = [some.meta["partitions"][p]["users"] for p in sorted(chosen)]
    for name in ("train", "valid", "test"):
        mine = np.zeros(len(whole.parts[name]), dtype=bool)
        for lo, hi in ranges:
            mine |= (whole.parts[name].user >= lo) & (whole.parts[name].user < hi)
        assert 0 < mine.sum() < len(mine)
        for field in ("user", "item", "domain", "timestamp"):
            np.testing.assert_array_equal(
                getattr(some.parts[name], field), getattr(whole.parts[name], field)[mine]
            )


@pytest.mark.parametrize("partitions", [[5_000], [-1], [], [1, 1]], ids=str)
def test_dataset_rejects_bad_partitions(
    prepared: dict[str, tuple[Path, Path]], partitions: list[int]
) -> None:
    _, streamed = prepared["parquet-parts"]
    with pytest.raises(DataError, match="partition"):
        Dataset(streamed, partitions=partitions)


def test_format_1_is_one_partition(prepared: dict[str, tuple[Path, Path]]) -> None:
    memory, _ = prepared["csv"]
    whole = Dataset(memory)
    assert whole.n_partitions == 1 and whole.partitions == (0,)
    np.testing.assert_array_equal(Dataset(memory, partitions=[0]).train.item, whole.train.item)
    with pytest.raises(DataError, match=r"no partition\(s\) \[1\]"):
        Dataset(memory, partitions=[1])


def test_cli_prints_the_in_memory_summary(
    logs: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inter, items = logs["csv"]
    outputs = []
    for out, extra in ((tmp_path / "a", ()), (tmp_path / "b", ("--streaming",))):
        assert main(argv(inter, items, out, *extra)) == 0
        text = capsys.readouterr().out.replace(str(out), "OUT")
        outputs.append([ln.split(" in ")[0] + ln.split("s:")[-1] for ln in text.splitlines()])
    assert outputs[0] == outputs[1]


# --------------------------------------------------------------------------- bad input


def bad_parts(tmp_path: Path, inter: pd.DataFrame, items: pd.DataFrame) -> tuple[Path, Path]:
    """The log as three Parquet parts of 120 rows, plus the catalogue."""
    for k in range(3):
        write(inter.iloc[120 * k : 120 * (k + 1)], tmp_path / "log" / f"part-{k}.parquet")
    return tmp_path / "log", write(items, tmp_path / "items.parquet")


def same_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, inter: Path, items: Path, *extra: str
) -> None:
    """The streaming path fails as cleanly as, and with the message of, the in-memory path."""
    out = tmp_path / "out"
    want = fails_cleanly(capsys, argv(inter, items, out, *extra), roots=(tmp_path,))
    got = fails_cleanly(capsys, streaming(inter, items, out, *extra), str(inter), roots=(tmp_path,))
    assert got == want
    assert not out.exists()


BREAK: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "unknown-item": lambda f: f.assign(item=f["item"].where(f.index != ROW, "movie-999")),
    "null-user": lambda f: f.assign(user=f["user"].where(f.index != ROW, None)),
    "duplicate-row": lambda f: pd.concat(
        [f.iloc[: ROW + 10], f.iloc[[ROW]], f.iloc[ROW + 10 :]], ignore_index=True
    ),
    "wrong-domain": lambda f: f.assign(domain=f["domain"].where(f.index != ROW, "music")),
    "non-numeric-time": lambda f: f.astype({"timestamp": object}).assign(
        timestamp=lambda g: g["timestamp"].where(g.index != ROW, "yesterday")
    ),
}


@pytest.mark.parametrize("case", list(BREAK))
def test_bad_csv_fails_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    inter, items = make_log()
    if case == "wrong-domain":
        inter = inter.sort_values("domain", kind="stable", ignore_index=True)  # ROW: a book
    ip = write(BREAK[case](inter), tmp_path / "inter.csv")
    same_as_in_memory(capsys, tmp_path, ip, write(items, tmp_path / "items.csv"))


def test_empty_test_part_fails_as_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    same_as_in_memory(capsys, tmp_path, ip, mp, "--min-positives", "100")


def test_bad_part_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter.loc[250, "item"] = "book-999"  # part 2, row 10
    folder, mp = bad_parts(tmp_path, inter, items)
    fails_cleanly(
        capsys,
        streaming(folder, mp, tmp_path / "out"),
        f"{folder / 'part-2.parquet'}, row 10: item 'book-999' is not in the item catalogue {mp}",
        "(1 such row(s) in this file)",
        roots=(tmp_path,),
    )


def test_missing_column_in_one_part(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    folder, mp = bad_parts(tmp_path, inter, items)
    write(inter.iloc[120:240].drop(columns="timestamp"), folder / "part-1.parquet")
    fails_cleanly(
        capsys,
        streaming(folder, mp, tmp_path / "out"),
        f"{folder / 'part-1.parquet'}: missing column(s) 'timestamp'",
        roots=(tmp_path,),
    )


def test_duplicate_rows_across_parts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Duplicates are found in pass 2 wherever they lie; the first in file order is named."""
    inter, items = make_log()
    inter = pd.concat([inter, inter.iloc[[300, 5]]], ignore_index=True)  # rows 360, 361
    inter = inter.iloc[np.r_[0:120, 120:240, 240:358, 360, 361]].reset_index(drop=True)
    folder, mp = bad_parts(tmp_path, inter, items)
    fails_cleanly(
        capsys,
        streaming(folder, mp, tmp_path / "out"),
        f"{folder / 'part-0.parquet'}, row 5: duplicate row (same user, item and timestamp as "
        f"{folder / 'part-2.parquet'}, row 119); 2 extra row(s) in all",
        roots=(tmp_path,),
    )


def test_duplicate_rows_count_the_extra_copies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A row and its two copies are 2 rows to drop, not 3 duplicated rows; with another pair,
    3 in all, in memory and with --streaming."""
    inter, items = make_log()
    inter = pd.concat([inter, inter.iloc[[ROW, ROW, 7]]], ignore_index=True)
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    same_as_in_memory(capsys, tmp_path, ip, mp)
    fails_cleanly(
        capsys,
        argv(ip, mp, tmp_path / "out"),
        "line 9: duplicate row",
        "; 3 extra row(s) in all (the copies beyond the first of each set of equal rows)",
        roots=(tmp_path,),
    )


def test_streaming_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    out = tmp_path / "out"
    roots = (tmp_path,)
    fails_cleanly(capsys, [*argv(ip, mp, out), "--partition-rows", "9"], "--streaming", roots=roots)
    fails_cleanly(
        capsys, [*streaming(ip, mp, out), "--dataset", "ml-1m"], "--streaming", roots=roots
    )
    fails_cleanly(
        capsys, streaming(ip, mp, out, "--partition-rows", "0"), "at least 1", roots=roots
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(capsys, streaming(empty, mp, out), f"{empty}: no Parquet", roots=roots)


def test_force_replaces_and_a_failure_keeps(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    out = tmp_path / "out"
    assert main(argv(ip, mp, out)) == 0  # format 1 first
    fails_cleanly(capsys, streaming(ip, mp, out), str(out), "--force", roots=(tmp_path,))
    assert main(streaming(ip, mp, out, "--force")) == 0
    assert read_meta(out)["layout"] == "partitioned"
    bad = write(BREAK["null-user"](inter), tmp_path / "bad.csv")
    fails_cleanly(capsys, streaming(bad, mp, out, "--force"), str(bad), roots=(tmp_path,))


# --------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("where", ["_bucket_of", "split_positives", "write_items"])
def test_interrupt_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    where: str,
) -> None:
    """Ctrl-C in pass 1, in pass 2, or while writing the last file: no output, no temporary
    folder, and an existing --out stays as it was."""
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    out = tmp_path / "out"
    assert main(argv(ip, mp, out)) == 0
    capsys.readouterr()

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, where, interrupt)
    for force in ((), ("--force",)):
        target = out if force else tmp_path / "new"
        before = snapshot(tmp_path)
        assert main(streaming(ip, mp, target, *force)) == 130
        assert capsys.readouterr().err.strip() == "interrupted"
        assert snapshot(tmp_path) == before
    assert json.loads((out / "meta.json").read_text())["format"] == 1
