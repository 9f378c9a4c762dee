"""How every output is written: atomically, with the user's umask, and with one clear error
when it cannot be written.

A folder output (a prepared dataset, a bundle) is built in a temporary sibling
``.<name>.tmp-<host>-<pid>-<random>`` and renamed into place; a file output (a checkpoint, a
run's config, a recommendation table) is written to ``.<name>.<host>-<pid>-<random>.tmp`` and
renamed. Readers see the old output or the new one, never half of one. A folder that replaces
another (``--force``) is exchanged with it in one step (Linux's ``renameat2`` with
``RENAME_EXCHANGE``), so that the path holds one of the two at every instant, also for a
process killed at any moment.

* A temporary folder holds the marker file :data:`INCOMPLETE` from its creation until every
  file in it is written and fsynced, just before the rename; readers refuse a folder that
  carries it (:func:`unfinished`), so a process killed at any moment leaves nothing
  that can be read as data, even when that folder is named on the command line.
* The host and pid in a temporary's name say who owns it; the next write of the same output
  deletes the temporaries whose owner (on this host) is gone (:func:`remove_stale`), such as
  those of a ``kill -9``. A temporary of a live process, or of another host sharing the
  storage, is left alone.
* Where a folder cannot be exchanged in one step, a process killed between its two renames
  leaves the old folder moved aside (``.<name>.old-<host>-<pid>-<random>``) and nothing at the
  output's path: the next command writing the output puts the old folder back as it checks
  the output (:func:`recover`), before ``--force`` is weighed: the output as the failed
  command found it.
* Folders are created with mode 0777 and files with 0666, less the umask, as ``mkdir`` and
  ``open`` create them (``tempfile`` would make them owner-only).
* A parent that is a file, missing permissions or another ``OSError`` while setting the output
  up raise :class:`~aftrec.errors.OutputError` (one ``error:`` line from the CLI).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import functools
import io
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from aftrec.errors import OutputError

INCOMPLETE = ".incomplete"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_OWNED = re.compile(
    r"(?:(?P<kind>tmp|old)-(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}"
    r"|(?P<fhost>\w+)-(?P<fpid>\d+)-[0-9a-f]{8}\.tmp)"
)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def output_error(out: Path, exc: OSError) -> OutputError:
    """The one-line error for ``out`` that could not be written."""
    blocker = next((p for p in Path(out).parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return OutputError(f"cannot write {out}: {blocker} is a file, not a folder")
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return OutputError(f"cannot write {out}: {_reason(exc)}{where}")


def check_replaceable(
    out: Path,
    marker: str,
    kind: str,
    writes: Collection[str] | None = None,
    listed: Collection[str] | None = None,
) -> None:
    """With ``--force``, an existing ``out`` is replaced, that is deleted: allow it only for
    a ``kind`` (a folder holding ``marker``, e.g. a bundle's ``manifest.json``) or an empty
    folder. Anything else, a run, a folder of datasets or runs, a home directory, a file, is
    refused with :class:`OutputError`: ``aftrec export --run runs/tt --out runs --force``
    would otherwise delete every run, the exported one included. ``writes``: the names a
    ``kind`` holds; a ``kind`` holding anything else (a study or recommendations someone
    wrote into it) is refused too, as deleting it would lose that; ``listed``: every file of
    such a ``kind`` (relative paths, from its manifest), so that one put into its subfolders
    is refused as well. An old ``out`` that a killed replacement left moved aside is put
    back first (:func:`recover`; :func:`check_writable` does it before a command lists
    ``out``)."""
    out = Path(out)
    if recover(out) is not None:
        listed = None  # listed while nothing was there; checked before it was moved aside
    if not (out.exists() or out.is_symlink()):
        return
    folder = out.is_dir() and not out.is_symlink()
    if folder and (out / marker).is_file():
        foreign = sorted(
            p.name for p in out.iterdir() if writes is not None and p.name not in writes
        )
        if listed is not None and not foreign:
            known = {*listed, *(writes or ())}
            foreign = sorted(
                str(p.relative_to(out))
                for p in out.rglob("*")
                if not p.is_dir() and str(p.relative_to(out)) not in known
            )
        if foreign:
            raise OutputError(
                f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                f"which a {kind} does not: --force would delete it; move it out or choose "
                "another --out"
            )
        return
    if folder and not any(out.iterdir()):
        return
    raise OutputError(
        f"{out} exists and is not a {kind}: --force replaces a {kind} (or an empty folder) "
        "only; choose another --out"
    )


#: folders aftrec writes and reads back, by the file that marks them: their kind, the names
#: of the files it writes at its top level (patterns), its own subfolders (every file in them,
#: present or to come, is the kind's), and whether every file already in it, at any depth, is
#: the kind's (a dataset's and a bundle's are; a run and a study hold their users' files too)
OWNED: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bool]] = {
    "meta.json": ("prepared dataset",
                  ("meta.json", "items.parquet", "users.parquet", "train.parquet",
                   "valid.parquet", "test.parquet"),
                  ("users", "train", "valid", "test"), True),
    "manifest.json": ("bundle", ("manifest.json", "manifest.sha256"),
                      ("encoder", "items", "index", "ids", "history", "popularity"), True),
    "run.json": ("run", ("config.yaml", "run.json", "last.pt", "best.pt", "log.jsonl",
                         "metrics*.json", "per_user*.parquet", "reproduce.json"),
                 ("tensorboard", "mlruns"), False),
    "study.db": ("tuning study", ("study.db", "best.json", "trials.csv", "trials.png"),
                 ("trials",), False),
}  # fmt: skip


def check_not_owned(out: Path) -> None:
    """Refuse a file output that would replace a file of a prepared dataset, a bundle or a run
    (:data:`OWNED`), or be taken for one: ``aftrec recommend --out data/ml-100k/train.parquet``
    replaced the dataset's training part with the recommendations, and a new
    ``data/ml-100k/train/part-00000.parquet`` became a part of the dataset. Other new files
    beside them are allowed."""
    out = Path(out)
    # the nearest folder above that aftrec marks decides: its own files, or anything in its
    # own subfolders (a bundle's ids/, a partitioned dataset's train/, a run's tensorboard/)
    where = out.absolute().parent.resolve() / out.name  # where it lands, through links
    for folder in where.parents:
        marks = [owned for m, owned in OWNED.items() if (folder / m).is_file()]
        if not marks:
            continue
        inside = where.relative_to(folder).parts
        for kind, files, subfolders, every_file in marks:
            if (
                (every_file and out.exists())
                or (len(inside) == 1 and any(fnmatch.fnmatchcase(out.name, f) for f in files))
                or (len(inside) > 1 and inside[0] in subfolders)
            ):
                raise OutputError(
                    f"{out} is a file of the {kind} in {folder}, or would be taken for one: "
                    "writing there would replace it or add to it; choose another --out"
                )
        return


@contextmanager
def held(folder: Path, name: str, busy: str) -> Iterator[None]:
    """Hold the lock file ``folder/name`` for the block, or raise :class:`OutputError` with
    ``busy`` when another process holds it (``flock``: released when the holder ends, however
    it ends, so a killed process leaves no stale lock). ``folder`` must exist. One process at
    a time works on a run, a study or a report: two would interleave their logs and replace
    each other's checkpoints."""
    path = Path(folder) / name
    while True:
        try:
            fh = open(path, "a")  # noqa: SIM115  (held for the block)
        except OSError as exc:
            raise output_error(Path(folder), exc) from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise OutputError(busy) from None
        # a holder may remove the file as it ends (a refused run leaves no lock file): a lock
        # taken on the file it removed after this process opened it is no lock, since the
        # next process opens a new file at the path; lock the file that is there now
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    with fh:
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: folders that own everything below them, by the two files that mark them: a folder output
#: (a run, a report, a study, a bundle, a dataset) is not created inside one of them
ENCLOSING: dict[tuple[str, str], str] = {
    ("meta.json", "items.parquet"): "prepared dataset",
    ("manifest.json", "ids"): "bundle",
    ("run.json", "config.yaml"): "run",
}


def check_not_inside(out: Path) -> None:
    """Refuse a folder output inside a prepared dataset, a bundle or a run
    (:data:`ENCLOSING`): ``aftrec reproduce --out data/ml-100k/report`` filled a dataset
    with runs, and ``aftrec tune --out study/trials/003/again`` put a study inside a trial's
    run, which its study replaces when the trial is run again. Runs inside a report's
    ``runs/`` or a study's ``trials/`` are where those commands put them, and are allowed."""
    for folder in Path(out).resolve().parents:
        for (first, second), kind in ENCLOSING.items():
            if (folder / first).is_file() and (folder / second).exists():
                raise OutputError(
                    f"cannot write {out}: it is inside the {kind} in {folder}, which owns "
                    "everything in it; choose an --out outside it"
                )


def check_writable(out: Path, folder: bool = False) -> None:
    """Refuse early (before a long computation) an ``out`` that cannot be created: its
    nearest existing ancestor must be a folder this process can write into (and, with
    ``folder``, an existing ``out`` must be a folder, not inside a dataset, bundle or run:
    :func:`check_not_inside`). With ``folder``, the leftovers of killed writers of ``out``
    are dealt with first (:func:`remove_stale`): an old ``out`` that a killed replacement
    left moved aside is put back, and the command finds ``out`` as it was."""
    out = Path(out)
    if folder:
        remove_stale(out)
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: it is a file, not a folder")
    if folder:
        check_not_inside(out)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not writable")


def make_dirs(path: Path, out: Path | None = None) -> None:
    """``mkdir -p path`` (the folder of ``out``); an ``OSError`` becomes
    :class:`OutputError` naming ``out``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(Path(out or path), exc) from exc


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone; or no process could have the number
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(out: Path) -> list[tuple[Path, str]]:
    """The temporaries of ``out`` left by processes of this host that are gone, with their
    kind: ``tmp`` (a folder being written; after an exchange, the old folder being deleted),
    ``old`` (the old folder moved aside) or ``file``."""
    out = Path(out)
    prefix = f".{out.name}."
    try:
        entries = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    stale = []
    for p in entries:
        claim = _claim(p.name[len(prefix) :])
        if claim is not None and _gone(claim[0], claim[1]):
            stale.append((p, claim[2]))
    return stale


def _claim(suffix: str) -> tuple[str, int, str] | None:
    """(host, pid, kind) of the process that made a temporary, from what follows
    ``.<name>.`` in its name: kind ``tmp``, ``old`` or ``file``; None if it is none."""
    m = _OWNED.fullmatch(suffix)
    if m is None:
        return None
    if m["kind"]:
        return m["host"], int(m["pid"]), m["kind"]
    return m["fhost"], int(m["fpid"]), "file"


def _gone(host: str, pid: int) -> bool:
    """Whether the process ``pid`` of ``host`` is known to have ended (this host's only)."""
    return host == _HOST and not _alive(pid)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _empty_folder(path: Path) -> bool:
    """A real folder with nothing in it (a dangling symlink is not: it is left alone)."""
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _changed(path: Path) -> float:
    try:
        return path.lstat().st_ctime  # a rename sets it: when it was moved aside
    except OSError:
        return 0.0


def recover(out: Path) -> Path | None:
    """Put back the old ``out`` that a process killed between the two renames of
    :func:`_swap` left moved aside (``.<name>.old-...``), when nothing is at ``out``: the
    output as the failed command found it, whole. Returns the name it had, or None. One
    that a live process moved aside is left alone (it is between its renames now), as is one
    of another host."""
    out = Path(out)
    if _present(out) and not _empty_folder(out):
        return None
    olds = [p for p, kind in _stale(out) if kind == "old"]
    if olds and _empty_folder(out):  # made since (a `mkdir -p`): the old output's place
        with suppress(OSError):
            out.rmdir()
    for p in sorted(olds, key=_changed, reverse=True):  # the latest moved aside first
        try:
            if _renameat2(p, out, _RENAME_NOREPLACE):
                return p
            if _present(out):  # put back by another process meanwhile
                return None
            os.rename(p, out)
            return p
        except OSError:  # put back by another process meanwhile; one that cannot be moved
            if _present(out):
                return None
    return None


def remove_stale(out: Path) -> list[Path]:
    """Delete the temporaries of ``out`` left by processes of this host that are gone;
    returns what was deleted. An old ``out`` that such a process moved aside is put back
    first when nothing is at ``out`` (:func:`recover`), and never deleted while nothing is."""
    out = Path(out)
    recover(out)
    removed = []
    for p, kind in _stale(out):
        if kind == "old" and not _present(out):
            continue  # the only copy of the output there is
        _remove(p)
        removed.append(p)
    return removed


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary of an output beside it (``.<name>.<...>``, as
    :func:`atomic_directory` and :func:`atomic_file` name them)."""
    return _owner(Path(path).name) is not None


def left_by_the_dead(path: Path) -> bool:
    """Whether ``path`` is a temporary whose writer, a process of this host, is gone (one of
    another host, or of a live process, may still be written)."""
    owner = _owner(Path(path).name)
    return owner is not None and _gone(*owner)


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that made the temporary named ``name``; None if it is none."""
    if not name.startswith("."):
        return None
    for i in (i for i, c in enumerate(name) if c == "." and i > 0):
        claim = _claim(name[i + 1 :])
        if claim is not None:
            return claim[0], claim[1]
    return None


def _owned_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _new_dir(out: Path, kind: str) -> Path:
    while True:
        path = _owned_name(out, kind)
        try:
            path.mkdir(mode=0o777)  # less the umask
            return path
        except FileExistsError:
            continue


def unfinished(path: Path) -> bool:
    """Whether ``path`` is a temporary folder whose writer has not finished (or was killed):
    readers refuse it."""
    return (Path(path) / INCOMPLETE).exists()


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        for name in dirs:
            _fsync(Path(folder) / name, directory=True)
    _fsync(root, directory=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


#: ``renameat2`` flags (linux/fs.h)
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _libc_renameat2() -> Any:
    """The C library's ``renameat2``, or None (another OS; glibc before 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system has no such call or the file
    system does not take the flag (another OS, an old C library or kernel, some network file
    systems), and the caller falls back to ``rename``. Other failures raise ``OSError``."""
    call = _libc_renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    # not there (an old kernel), not on this filesystem, or refused by a sandbox's filter
    # (EPERM: where it is a real permission error, the renames of the fallback say so)
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _swap(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out`` in place of what is there, then delete that. One
    ``RENAME_EXCHANGE`` does it where the system has it: ``out`` holds the old folder or the
    new one at every instant, and the old one, left under ``new``'s name, is deleted after.
    Elsewhere, two renames: the old one is moved aside to ``.<name>.old-...`` and the new one
    renamed to ``out``; an error or interrupt between them puts the old one back, and so
    does the next write of ``out`` after a process killed between them (:func:`recover`)."""
    if _renameat2(new, out, _RENAME_EXCHANGE):
        _remove(new)  # the old folder now
        return
    old = _owned_name(out, "old")
    try:
        os.replace(out, old)  # an interrupt just after it is caught below as well
        os.replace(new, out)
    except BaseException:
        if not _present(out) and _present(old):
            os.replace(old, out)
        raise
    # given a temporary's name before it is deleted: a half-deleted old folder is never put back
    gone = _owned_name(out, "tmp")
    try:
        os.replace(old, gone)
    except OSError:
        gone = old
    _remove(gone)


#: errors of a write that no retry in the same place mends: the disk or quota is full, a file
#: too large, the file system read-only. Other errors inside an output's block may be the
#: input's, and keep their own message.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


@contextmanager
def atomic_directory(out: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` (holding only the :data:`INCOMPLETE`
    marker); when the block ends, its files are fsynced, the marker removed and the folder
    renamed to ``out`` (an existing ``out`` is swapped for it, :func:`_swap`, and deleted
    after). On any error
    or interrupt the temporary folder is deleted. The caller decides whether an existing
    ``out`` may be replaced; with ``replace=False`` (no ``--force``), an ``out`` that another
    process created in the meantime is left as it is and :class:`OutputError` raised."""
    out = Path(out)
    make_dirs(out.parent, out)
    remove_stale(out)
    try:
        tmp = _new_dir(out, "tmp")
        (tmp / INCOMPLETE).touch()
    except OSError as exc:
        raise output_error(out, exc) from exc
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _FULL:  # a write into tmp failed
            raise output_error(out, exc) from exc
        raise
    try:
        _fsync_tree(tmp)
        (tmp / INCOMPLETE).unlink()
        _fsync(tmp, directory=True)
        if not replace and (out.exists() or out.is_symlink()):
            raise OutputError(
                f"{out} was written by another process meanwhile; it is left as it is (pass "
                "--force to replace it)"
            )
        if out.exists() or out.is_symlink():
            _swap(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise output_error(out, exc) from exc
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle on a temporary sibling of ``path``; when the block ends the file
    is fsynced and renamed to ``path``, on any error it is deleted."""
    path = Path(path)
    make_dirs(path.parent, path)
    remove_stale(path)
    while True:
        tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise output_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_png(fig: Any, path: Path) -> None:
    """A matplotlib ``Figure`` laid out and written atomically as PNG."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_text(text: str) -> str:
    """A name from the data (a domain) as matplotlib shows it literally: a ``$`` pair would
    start its math mode, where ``$\\foo$`` fails the whole figure; and unmistakably
    (:func:`shown_name`)."""
    return shown_name(text).replace("$", r"\$")


def shown_name(name: str) -> str:
    """A name from the data (a domain) as a table or a message shows it unmistakably: quoted
    as Python writes it (``'Games '``) when it is empty, begins or ends with whitespace or
    holds a character that does not print, which a padded column or a line's end would hide
    (``Games `` looked like ``Games``, and ``--domains Games`` was then refused); as is
    otherwise, so every usual name reads as before."""
    return repr(name) if not name or name != name.strip() or not name.isprintable() else name


def path_argument(text: str) -> Path:
    """An ``argparse`` type for paths: an empty string is refused (``Path("")`` would be the
    working directory, so ``--out ""`` would aim at ``.``)."""
    if not text:
        import argparse

        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return Path(text)


__all__ = [
    "INCOMPLETE",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_not_inside",
    "check_writable",
    "make_dirs",
    "output_error",
    "recover",
    "remove_stale",
    "shown_name",
    "unfinished",
    "write_png",
]
