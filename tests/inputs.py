"""Small valid generic logs, the prepared data and tiny runs made from them through the real
CLI, and the check that a command failed cleanly: shared by the bad-input, output and
streaming tests (and by the ``prepared`` / ``trained`` fixtures of ``tests/conftest.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aftrec.cli import main

DOMAINS = ("movie", "book", "music")
N_USERS, ITEMS_PER_DOMAIN, PER_DOMAIN = 30, 12, 4
TINY_TRAIN = [
    "--set",
    "train.epochs=1",
    "train.max_batches_per_epoch=3",
    "model.dim=8",
    "model.hidden=16",
    "data.history_len=5",
    "--quiet",
]
ROW = 41  # the data row the cases break: CSV line 43, Parquet row 41


def make_log(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items): string ids, every (user, domain) has 4 positives, distinct times."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        [(f"{d}-{i}", d) for d in DOMAINS for i in range(ITEMS_PER_DOMAIN)],
        columns=["item", "domain"],
    )
    rows = [
        (f"u{u}", f"{d}-{i}", d)
        for u in range(N_USERS)
        for d in DOMAINS
        for i in rng.choice(ITEMS_PER_DOMAIN, PER_DOMAIN, replace=False)
    ]
    inter = pd.DataFrame(rows, columns=["user", "item", "domain"])
    # interleave the domains in time so each one has training positives
    inter["timestamp"] = 1_600_000_000 + 60 * rng.permutation(len(inter))
    inter["rating"] = 4.0
    return inter, items


def write(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def snapshot(*roots: Path) -> dict[str, tuple[str, str]]:
    """Every path under ``roots`` with a content hash: equal snapshots = nothing written."""
    out: dict[str, tuple[str, str]] = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))]:
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p)] = ("file" if p.is_file() else "dir", digest)
    return out


def fails_cleanly(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    *needles: str,
    roots: tuple[Path, ...],
) -> str:
    """Run the CLI, expect exit 2 with one ``error:`` line holding every needle and no change
    under ``roots`` (no output, no ``.NAME.tmp-*`` folder, existing files untouched)."""
    capsys.readouterr()
    before = snapshot(*roots)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(*roots) == before
    leftovers = [p for root in roots for p in root.rglob(".*") if ".tmp" in p.name]
    assert not leftovers
    return lines[0]


def prepare_argv(inter: Path, items: Path, out: Path) -> list[str]:
    return ["prepare", "--interactions", str(inter), "--items", str(items), "--out", str(out)]


def prepare_case(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    inter: pd.DataFrame,
    items: pd.DataFrame,
    *needles: str,
    suffix: str = ".csv",
) -> str:
    """Write the two tables, run prepare into tmp_path/out, expect a clean failure."""
    ip = write(inter, tmp_path / f"inter{suffix}")
    mp = write(items, tmp_path / f"items{suffix}")
    out = tmp_path / "out"
    msg = fails_cleanly(
        capsys,
        prepare_argv(ip, mp, out),
        *(n.format(inter=ip, items=mp) for n in needles),
        roots=(tmp_path,),
    )
    assert not out.exists()
    return msg


def line(i: int) -> str:
    """How a CSV data row (0-based) is named in messages."""
    return f"line {i + 2}"


def prepare_valid_log(root: Path) -> Path:
    """``root/data`` prepared from the valid log (``root/inter.csv``, ``root/items.csv``)."""
    inter, items = make_log()
    out = root / "data"
    ip, mp = write(inter, root / "inter.csv"), write(items, root / "items.csv")
    assert main(prepare_argv(ip, mp, out)) == 0
    return out


def train_tiny(data: Path) -> Path:
    """A tiny two-tower run on ``data``, beside it."""
    run = data.parent / "run"
    argv = ["train", "--data", str(data), "--model", "two-tower", "--out", str(run)]
    assert main([*argv, *TINY_TRAIN]) == 0
    return run
