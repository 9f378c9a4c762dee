"""Outputs through the real CLI: an --out that cannot be written, duplicated
header columns, --out into a folder that is not a run, what a killed prepare or export leaves
behind, the modes of what is written (the user's umask), and how --force replaces a folder."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aftrec import outputs
from aftrec.cli import main
from aftrec.data.dataset import Dataset
from aftrec.data.prepared import read_meta
from aftrec.errors import AftrecError, OutputError
from aftrec.outputs import _HOST, INCOMPLETE, held, remove_stale
from tests.inputs import fails_cleanly, make_log, prepare_argv, write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(prepared: Path) -> tuple[Path, Path]:
    """The log ``prepared`` was prepared from."""
    return prepared.parent / "inter.csv", prepared.parent / "items.csv"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


# --- 6. an --out that cannot be written ----------------------------------------------------
@pytest.mark.parametrize(
    ("command", "where"),
    [
        (command, where)
        for command in ("prepare", "train", "export", "recommend")
        for where in ("parent-is-a-file", "out-is-a-file")
        if where == "parent-is-a-file" or command == "train"  # else "already exists"
    ],
)
def test_an_out_that_cannot_be_written_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    inputs: tuple[Path, Path],
    prepared: Path,
    trained: Path,
    command: str,
    where: str,
) -> None:
    """It used to end in a traceback and exit code 1."""
    if command == "export":
        pytest.importorskip("faiss")
    blocker = a_file(tmp_path)
    out = blocker / "out.csv" if where == "parent-is-a-file" else blocker
    argv = {
        "prepare": prepare_argv(*inputs, out),
        "train": ["train", "--data", str(prepared), "--model", "pop", "--out", str(out)],
        "export": ["export", "--run", str(trained), "--out", str(out)],
        "recommend": ["recommend", "--run", str(trained), "--out", str(out)],
    }[command]
    fails_cleanly(capsys, argv, f"cannot write {out}", roots=(tmp_path,))


# --- 7. duplicated header columns ----------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("table", ["interactions", "items"])
def test_duplicated_header_columns_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, table: str, streaming: bool
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    if table == "interactions":  # user,item,domain,timestamp,rating,timestamp
        text = ip.read_text().splitlines()
        rows = [f"{line},{line.split(',')[3]}" for line in text[1:]]
        ip.write_text("\n".join([text[0] + ",timestamp", *rows]) + "\n")
        name, path = "timestamp", ip
    else:  # item,domain,domain: the second domain column used to be ignored
        text = mp.read_text().splitlines()
        rows = [f"{line},other" for line in text[1:]]
        mp.write_text("\n".join([text[0] + ",domain", *rows]) + "\n")
        name, path = "domain", mp
    out = tmp_path / "out"
    argv = prepare_argv(ip, mp, out) + (["--streaming"] if streaming else [])
    fails_cleanly(capsys, argv, str(path), f"column {name!r} appears twice", roots=(tmp_path,))


def test_duplicated_parquet_columns_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    cols = [pa.array(inter[c]) for c in inter.columns]
    table = pa.Table.from_arrays([*cols, cols[1]], names=[*inter.columns, "item"])
    pq.write_table(table, tmp_path / "inter.parquet")
    mp = write(items, tmp_path / "items.parquet")
    argv = prepare_argv(tmp_path / "inter.parquet", mp, tmp_path / "out")
    fails_cleanly(capsys, argv, "column 'item' appears twice", roots=(tmp_path,))


# --- 8. train --out into a folder that is not a run ----------------------------------------
def test_train_refuses_a_folder_that_is_not_a_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "log.jsonl").write_text('{"mine": 1}\n')  # it used to be appended to
    (out / "todo.txt").write_text("keep me\n")
    argv = ["train", "--data", str(prepared), "--model", "pop", "--out", str(out)]
    fails_cleanly(capsys, argv, f"{out} is not empty and not a run", roots=(tmp_path,))


def test_train_into_an_empty_folder_is_fine(tmp_path: Path, prepared: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["train", "--data", str(prepared), "--model", "pop", "--out", str(out)]) == 0
    assert (out / "best.pt").is_file()


# --- 9. what a killed prepare or export leaves ---------------------------------------------
KILLED = """
import os, signal, sys
import aftrec.outputs as outputs
def killed(root):  # every file written, the folder not yet marked complete nor renamed
    os.kill(os.getpid(), signal.SIGKILL)
outputs._fsync_tree = killed
from aftrec.cli import main
main(sys.argv[1:])
"""


def run_killed(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", KILLED, *argv], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def temporaries(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_killed_prepare_leaves_nothing_readable_and_is_cleaned_up(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    out = tmp_path / "data"
    run_killed(prepare_argv(*inputs, out))
    [left] = temporaries(out)
    assert (left / "meta.json").is_file() and (left / INCOMPLETE).exists()  # looks complete
    with pytest.raises(AftrecError, match="unfinished dataset"):
        read_meta(left)
    with pytest.raises(AftrecError, match="unfinished dataset"):
        Dataset(left)
    mine = tmp_path / f".data.tmp-{_HOST}-{os.getpid()}-0123abcd"
    mine.mkdir()  # a live writer's: kept
    legacy = tmp_path / ".data.tmp-k3j4h5"  # no owner in the name: not ours to judge
    legacy.mkdir()
    assert main(prepare_argv(*inputs, out)) == 0
    assert temporaries(out) == sorted([mine, legacy])
    assert read_meta(out)["n_users"] > 0 and not (out / INCOMPLETE).exists()


def test_a_killed_export_leaves_nothing_readable_and_is_cleaned_up(
    tmp_path: Path, trained: Path
) -> None:
    pytest.importorskip("faiss")
    from aftrec.serving.bundle import BundleError, read_manifest

    out = tmp_path / "bundle"
    run_killed(["export", "--run", str(trained), "--out", str(out)])
    [left] = temporaries(out)
    assert (left / "manifest.json").is_file()
    with pytest.raises(BundleError, match="unfinished bundle"):
        read_manifest(left)
    assert main(["export", "--run", str(trained), "--out", str(out)]) == 0
    assert temporaries(out) == []
    read_manifest(out)


def test_remove_stale_spares_other_hosts(tmp_path: Path) -> None:
    out = tmp_path / "x"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    ours = tmp_path / f".x.tmp-{_HOST}-{pid}-0123abcd"
    theirs = tmp_path / f".x.tmp-otherhost-{pid}-0123abcd"
    file_tmp = tmp_path / f".x.{_HOST}-{pid}-0123abcd.tmp"
    for p in (ours, theirs):
        p.mkdir()
    file_tmp.write_text("half")
    assert sorted(remove_stale(out)) == sorted([ours, file_tmp])
    assert theirs.exists() and not ours.exists()


# --- 10. modes follow the umask ------------------------------------------------------------
@contextmanager
def umask(mask: int) -> Iterator[None]:
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path: Path, inputs: tuple[Path, Path], mask: int) -> None:
    folder, file = 0o777 & ~mask, 0o666 & ~mask
    with umask(mask):
        data, run, recs = tmp_path / "data", tmp_path / "run", tmp_path / "recs.csv"
        assert main(prepare_argv(*inputs, data)) == 0
        assert main(["train", "--data", str(data), "--model", "pop", "--out", str(run)]) == 0
        assert main(["recommend", "--run", str(run), "--out", str(recs), "--n", "5"]) == 0
    assert (mode(data), mode(data / "meta.json"), mode(data / "train.parquet")) == (
        folder,
        file,
        file,
    )
    assert (mode(run / "best.pt"), mode(run / "config.yaml"), mode(recs)) == (file, file, file)
    assert pd.read_csv(recs).shape[0] > 0


def test_a_bundle_honours_the_umask(tmp_path: Path, trained: Path) -> None:
    pytest.importorskip("faiss")
    out = tmp_path / "bundle"
    with umask(0o022):
        assert main(["export", "--run", str(trained), "--out", str(out)]) == 0
    assert mode(out) == 0o755 and mode(out / "encoder") == 0o755
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {0o644}


@pytest.mark.parametrize("streaming", [False, True])
def test_force_replaces_a_prepared_dataset_not_any_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, streaming: bool
) -> None:
    """``--force`` deletes the old --out: a prepared dataset or an empty folder only. A folder
    of datasets, or the folder the log itself sits in, is refused and left as it was."""
    inter, items = make_log()
    ip = write(inter, tmp_path / "in" / "inter.csv")
    mp = write(items, tmp_path / "in" / "items.csv")
    flag = ["--streaming"] if streaming else []
    for out in (tmp_path / "in", tmp_path):
        assert main([*prepare_argv(ip, mp, out), "--force", *flag]) == 2
        err = capsys.readouterr().err
        assert f"error: {out} exists and is not a prepared dataset" in err, err
    assert ip.is_file() and mp.is_file()
    out = tmp_path / "data"
    assert main([*prepare_argv(ip, mp, out), *flag]) == 0
    assert main([*prepare_argv(ip, mp, out), "--force", *flag]) == 0
    assert read_meta(out)["counts"]


def test_force_does_not_delete_what_others_wrote_into_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prepare --force`` replaces a prepared dataset, files and partitions it wrote; a study
    or recommendations someone wrote into its folder make it refuse instead of deleting them."""
    out = tmp_path / "syn"
    argv = ["prepare", "--dataset", "synthetic", "--out", str(out), "--force", "--users", "300"]
    assert main(argv) == 0
    assert main(argv) == 0  # its own files only: replaced
    (out / "study").mkdir()
    (out / "recs.csv").write_text("user,item\n")
    fails_cleanly(capsys, argv, "holds recs.csv, study, which a prepared dataset does not",
                  roots=(tmp_path,))  # fmt: skip
    assert (out / "recs.csv").is_file() and (out / "study").is_dir()


def test_an_output_another_process_wrote_meanwhile_is_not_replaced_without_force(
    tmp_path: Path,
) -> None:
    from aftrec.errors import OutputError
    from aftrec.outputs import atomic_directory

    out = tmp_path / "bundle"
    refused = pytest.raises(OutputError, match="written by another process meanwhile")
    with refused, atomic_directory(out, replace=False) as tmp:
        (tmp / "mine").write_text("mine")
        out.mkdir()  # the other export, finished first
        (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary left
    with atomic_directory(out) as tmp:  # --force: replaced
        (tmp / "mine").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine"]


def test_a_lock_file_removed_as_it_was_taken_is_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder removes its lock file as it ends (a refused run leaves none). A process that
    opened the file just before held a lock on a removed file, and a third process, opening
    the new file at the path, trained the same run beside it. The lock is now on the file at
    the path."""
    real = outputs.fcntl.flock
    removed = []

    def racing(fd: Any, operation: int) -> None:
        if operation & outputs.fcntl.LOCK_EX and not removed:
            (tmp_path / "run.lock").unlink()  # the holder ended between our open and flock
            removed.append(True)
        real(fd, operation)

    monkeypatch.setattr(outputs.fcntl, "flock", racing)
    with held(tmp_path, "run.lock", "busy"):
        assert removed
        with pytest.raises(OutputError, match="busy"), held(tmp_path, "run.lock", "busy"):
            pass


# --- 11. --force replaces a folder: --out holds the old one or the new one at every instant -
def old_folder(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    out.mkdir()
    (out / "v").write_text("old")
    return out


def test_force_exchanges_the_old_folder_for_the_new_one_in_one_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--force`` moved the old folder aside, then renamed the new one into place: a
    ``kill -9`` between the two renames left nothing at --out (``serve``: no bundle here; the
    runs of a dataset failed). The two folders are now exchanged in one call; the old one is
    deleted after."""
    out = old_folder(tmp_path)
    held: list[str | None] = []  # what --out holds after each rename

    def look() -> None:
        held.append((out / "v").read_text() if (out / "v").is_file() else None)

    real_replace = os.replace
    real_renameat2 = outputs._renameat2
    calls: list[tuple[int, bool]] = []

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        look()

    def renameat2(src: Path, dst: Path, flags: int) -> bool:
        done = real_renameat2(src, dst, flags)
        calls.append((flags, done))
        look()
        return done

    monkeypatch.setattr(outputs.os, "replace", replace)
    monkeypatch.setattr(outputs, "_renameat2", renameat2)
    with outputs.atomic_directory(out) as tmp:
        (tmp / "v").write_text("new")
    monkeypatch.undo()
    if calls and not any(done for _, done in calls):
        pytest.skip("no RENAME_EXCHANGE on this system: two renames (the next test)")
    assert held and None not in held, held
    assert calls == [(outputs._RENAME_EXCHANGE, True)]
    assert (out / "v").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # the old one deleted


def test_force_without_an_exchange_renames_twice_and_puts_the_old_folder_back_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the system cannot exchange two folders (another OS, a network file system): two
    renames. An error at the second one left the old folder moved aside and nothing at --out;
    it is put back."""
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    out = old_folder(tmp_path)
    with outputs.atomic_directory(out) as tmp:
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    real = os.replace

    def failing(src: Any, dst: Any) -> None:
        if Path(dst) == out and Path(src).name.startswith(".data.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OutputError, match="I/O error"), outputs.atomic_directory(out) as tmp:
        (tmp / "v").write_text("newer")
    monkeypatch.undo()
    assert (out / "v").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_an_interrupt_just_after_the_first_rename_puts_the_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rename ran outside the restoring ``try``: a Ctrl-C handled as it returned
    left the old folder moved aside and nothing at --out, for as long as the process lived."""
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    out = old_folder(tmp_path)
    real = os.replace

    def interrupted(src: Any, dst: Any) -> None:
        real(src, dst)
        if Path(src) == out:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), outputs.atomic_directory(out) as tmp:
        (tmp / "v").write_text("new")
    monkeypatch.undo()
    assert (out / "v").read_text() == "old"


def test_an_empty_folder_made_at_out_since_does_not_cost_the_old_one(tmp_path: Path) -> None:
    """After a killed --force, a ``mkdir -p`` of --out made the cleanup take the old folder
    for a leftover beside a present output, and delete it."""
    out = old_folder(tmp_path)
    old, new = killed_between_renames(out)
    out.mkdir()
    remove_stale(out)
    assert (out / "v").read_text() == "old" and not old.exists() and not new.exists()


def test_a_sandbox_that_refuses_the_exchange_gets_the_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seccomp filter answers renameat2 with EPERM: --force failed with "Operation not
    permitted" where two renames work."""
    if outputs._libc_renameat2() is None:
        pytest.skip("no renameat2 here")

    class Refusing:
        def __call__(self, *args: Any) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(outputs, "_libc_renameat2", lambda: Refusing())
    out = old_folder(tmp_path)
    with outputs.atomic_directory(out) as tmp:
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "new"


def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    return int(done.stdout)


def killed_between_renames(out: Path) -> tuple[Path, Path]:
    """What two renames left when killed between them: the old ``out`` moved aside, the new
    one complete beside it, nothing at ``out``."""
    pid = dead_pid()
    old = out.parent / f".{out.name}.old-{_HOST}-{pid}-0123abcd"
    new = out.parent / f".{out.name}.tmp-{_HOST}-{pid}-4567cdef"
    shutil.copytree(out, new)
    out.rename(old)
    return old, new


def test_the_cleanup_puts_back_an_old_folder_when_nothing_is_at_out(tmp_path: Path) -> None:
    """A process killed between the two renames of --force left the old folder moved aside
    and nothing at --out; the next write of --out deleted the old folder as a dead process's
    temporary. It is now put back, and the new one deleted. What a live process or another
    host moved aside is left alone."""
    out = old_folder(tmp_path)
    old, new = killed_between_renames(out)
    (new / "v").write_text("new")
    live = tmp_path / f".data.old-{_HOST}-{os.getpid()}-89abcdef"  # between its renames now
    theirs = tmp_path / f".data.old-otherhost-{dead_pid()}-0123abcd"
    for p in (live, theirs):
        p.mkdir()
    assert remove_stale(out) == [new]
    assert (out / "v").read_text() == "old" and not old.exists()
    assert temporaries(out) == sorted([live, theirs])


def test_a_prepare_after_one_killed_between_the_renames_finds_the_old_dataset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    """``prepare --force`` killed between its two renames, then ``prepare`` without
    ``--force``: it found nothing at --out, deleted the old dataset with the temporaries and
    wrote a new one. The old dataset is put back before --force is weighed, and kept."""
    out = tmp_path / "data"
    assert main(prepare_argv(*inputs, out)) == 0
    meta = (out / "meta.json").read_bytes()
    killed_between_renames(out)
    assert main(prepare_argv(*inputs, out)) == 2
    assert f"error: {out} already exists; pass --force" in capsys.readouterr().err
    assert (out / "meta.json").read_bytes() == meta and temporaries(out) == []


def test_a_check_of_out_puts_back_an_old_folder_before_it_looks_inside(tmp_path: Path) -> None:
    """``write_bundle`` lists the bundle at --out before ``check_replaceable`` looks at it: a
    listing taken while the old one was moved aside is empty, and must not make its files
    look like someone else's once it is back."""
    out = old_folder(tmp_path)
    (out / "marker").touch()
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("the kind's own")
    killed_between_renames(out)
    outputs.check_replaceable(out, "marker", "thing", {"marker", "v", "sub"}, listed=set())
    assert (out / "v").read_text() == "old" and (out / "sub" / "f").is_file()
