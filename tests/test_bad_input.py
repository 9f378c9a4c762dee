"""Bad input through the real CLI: one ``error:`` line naming the file, line or key, exit code 2,
and nothing written or changed on disk.

Every case starts from a small valid generic log (30 users, 3 domains, 12 positives each) that
prepares fine, breaks one thing, and runs ``aftrec.cli.main``. CSV line numbers count the header
as line 1, so data row ``i`` (0-based) is on line ``i + 2``; Parquet rows are reported by their
0-based index.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from aftrec.cli import main
from tests.inputs import (
    DOMAINS,
    ROW,
    TINY_TRAIN,
    fails_cleanly,
    line,
    make_log,
    prepare_argv,
    prepare_case,
    write,
)


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, free to be damaged."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# --------------------------------------------------------------------------- valid input


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_valid_log_prepares(tmp_path: Path, suffix: str) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / f"i{suffix}"), write(items, tmp_path / f"m{suffix}")
    assert main(prepare_argv(ip, mp, tmp_path / "out")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["i" + suffix, "m" + suffix, "out"])


# --------------------------------------------------------------------------- columns


@pytest.mark.parametrize("column", ["user", "item", "timestamp"])
def test_missing_interaction_column_csv(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, column: str
) -> None:
    inter, items = make_log()
    prepare_case(
        capsys,
        tmp_path,
        inter.drop(columns=column),
        items,
        "{inter}",
        f"missing column(s) '{column}'",
    )


@pytest.mark.parametrize("column", ["item", "domain"])
def test_missing_catalogue_column_parquet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, column: str
) -> None:
    inter, items = make_log()
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items.drop(columns=column),
        "{items}",
        f"missing column(s) '{column}'",
        suffix=".parquet",
    )


def test_missing_interaction_column_parquet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    prepare_case(
        capsys,
        tmp_path,
        inter.drop(columns="timestamp"),
        items,
        "{inter}",
        "missing column(s) 'timestamp'",
        suffix=".parquet",
    )


def test_misnamed_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    prepare_case(
        capsys,
        tmp_path,
        inter.rename(columns={"user": "user_id"}),
        items,
        "{inter}",
        "missing column(s) 'user'",
        "'user_id'",  # the columns found are listed, so the typo is visible
    )


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, items = make_log()
    mp = write(items, tmp_path / "items.csv")
    gone = tmp_path / "nope.csv"
    fails_cleanly(
        capsys,
        prepare_argv(gone, mp, tmp_path / "out"),
        f"{gone}: no such file",
        roots=(tmp_path,),
    )


def test_malformed_csv_names_the_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    ip = write(inter, tmp_path / "inter.csv")
    text = ip.read_text().splitlines()
    text[ROW + 1] += ",extra"  # one field too many on line ROW + 2
    ip.write_text("\n".join(text) + "\n")
    mp = write(items, tmp_path / "items.csv")
    fails_cleanly(
        capsys,
        prepare_argv(ip, mp, tmp_path / "out"),
        str(ip),
        "cannot be read as CSV",
        line(ROW),
        roots=(tmp_path,),
    )


def test_line_numbers_count_blank_lines_and_quoted_newlines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """pandas skips blank lines and reads a quoted newline inside a field; messages still name
    the line a person sees in an editor."""
    inter, items = make_log()
    inter.loc[ROW, "item"] = "movie-999"
    text = inter.to_csv(index=False).splitlines()
    text[3] = text[3].replace(inter.loc[2, "user"], f'"{inter.loc[2, "user"]}\nx"', 1)
    text[1:1] = ["", ""]  # two blank lines after the header
    ip = tmp_path / "inter.csv"
    ip.write_text("\n".join(text) + "\n")
    lines = ip.read_text().splitlines()
    shown = next(n for n, t in enumerate(lines, start=1) if "movie-999" in t)
    assert shown == ROW + 2 + 3  # two blank lines, one quoted newline
    mp = write(items, tmp_path / "items.csv")
    fails_cleanly(
        capsys,
        prepare_argv(ip, mp, tmp_path / "out"),
        f"{ip}, line {shown}: item 'movie-999'",
        roots=(tmp_path,),
    )


# --------------------------------------------------------------------------- the catalogue


def test_item_in_two_domains(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    twice = pd.DataFrame({"item": ["movie-3"], "domain": ["book"]})
    items = pd.concat([items, twice], ignore_index=True)
    first = int(np.flatnonzero(items["item"] == "movie-3")[0])
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        "{items}",
        "item 'movie-3' is listed in two domains",
        f"'movie' at {{items}}, {line(first)}",
        f"'book' at {{items}}, {line(len(items) - 1)}",
    )


def test_item_absent_from_catalogue(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter.loc[ROW, "item"] = "movie-999"
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, {line(ROW)}: item 'movie-999' is not in the item catalogue {{items}}",
    )


def test_domain_disagrees_with_catalogue(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    item = inter.loc[ROW, "item"]
    right = inter.loc[ROW, "domain"]
    wrong = next(d for d in DOMAINS if d != right)
    inter.loc[ROW, "domain"] = wrong
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, {line(ROW)}: item '{item}' has domain '{wrong}'",
        f"'{right}' in the item catalogue {{items}}",
    )


def test_empty_domain(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A catalogue domain without a single positive interaction."""
    inter, items = make_log()
    films = pd.DataFrame({"item": ["film-1", "film-2"], "domain": ["film", "film"]})
    prepare_case(
        capsys,
        tmp_path,
        inter,
        pd.concat([items, films], ignore_index=True),
        "{inter}",
        "domain 'film' is empty",
    )


def test_domain_emptied_by_the_rating_threshold(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Rows exist, but none is a positive: the domain is empty all the same."""
    inter, items = make_log()
    inter.loc[inter["domain"] == "music", "rating"] = 1.0
    prepare_case(capsys, tmp_path, inter, items, "{inter}", "domain 'music' is empty")


def test_empty_domain_message_is_one_line_from_the_real_entry_point(tmp_path: Path) -> None:
    """main() under pytest does not configure logging; the installed entry point does, so an
    INFO line printed before the error would show up only here."""
    inter, items = make_log()
    films = pd.DataFrame({"item": ["film-1"], "domain": ["film"]})
    ip = write(inter, tmp_path / "inter.csv")
    mp = write(pd.concat([items, films], ignore_index=True), tmp_path / "items.csv")
    proc = subprocess.run(
        [sys.executable, "-m", "aftrec.cli", *prepare_argv(ip, mp, tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: {ip}: domain 'film' is empty")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- values


def test_non_numeric_timestamp(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter["timestamp"] = inter["timestamp"].astype(object)
    inter.loc[ROW, "timestamp"] = "yesterday"
    inter.loc[ROW + 5, "timestamp"] = "today"
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, {line(ROW)}: non-numeric value 'yesterday' in column 'timestamp'",
        "2 bad row(s)",
    )


@pytest.mark.parametrize(
    ("suffix", "where"), [(".csv", line(ROW)), (".parquet", f"row {ROW}")], ids=["csv", "parquet"]
)
def test_missing_timestamp(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str, where: str
) -> None:
    inter, items = make_log()
    inter["timestamp"] = inter["timestamp"].astype(np.float64)
    inter.loc[ROW, "timestamp"] = np.nan
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, {where}: missing value in column 'timestamp'",
        suffix=suffix,
    )


def test_missing_datetime_timestamp_parquet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], unit="s")
    inter.loc[ROW, "timestamp"] = pd.NaT
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, row {ROW}: missing value in column 'timestamp'",
        suffix=".parquet",
    )


def test_nan_rating(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter.loc[ROW, "rating"] = np.nan
    prepare_case(
        capsys, tmp_path, inter, items, f"{{inter}}, {line(ROW)}: missing value in column 'rating'"
    )


def test_nan_label_parquet(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter = inter.drop(columns="rating").assign(label=1.0)
    inter.loc[ROW, "label"] = np.nan
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, row {ROW}: missing value in column 'label'",
        suffix=".parquet",
    )


def test_missing_user_id(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    inter.loc[ROW, "user"] = None
    prepare_case(capsys, tmp_path, inter, items, f"{{inter}}, {line(ROW)}: missing 'user'")


def test_duplicate_rows(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    copy_at = ROW + 10
    inter = pd.concat(
        [inter.iloc[:copy_at], inter.iloc[[ROW]], inter.iloc[copy_at:]], ignore_index=True
    )
    prepare_case(
        capsys,
        tmp_path,
        inter,
        items,
        f"{{inter}}, {line(ROW)}: duplicate row",
        f"as {{inter}}, {line(copy_at)})",
    )


def test_bad_presplit_test_file_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    test = inter.iloc[::5].reset_index(drop=True)
    test.loc[3, "item"] = "book-999"
    tp = write(inter.drop(index=inter.index[::5]), tmp_path / "train.csv")
    sp = write(test, tmp_path / "test.csv")
    mp = write(items, tmp_path / "items.csv")
    argv = ["prepare", "--train", str(tp), "--test", str(sp), "--items", str(mp)]
    fails_cleanly(
        capsys,
        [*argv, "--out", str(tmp_path / "out")],
        f"{sp}, {line(3)}: item 'book-999' is not in the item catalogue {mp}",
        roots=(tmp_path,),
    )


# --------------------------------------------------------------------------- --out / --force


def test_prepare_into_existing_out_without_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails_cleanly(capsys, prepare_argv(ip, mp, out), str(out), "--force", roots=(tmp_path,))
    assert (out / "precious.txt").read_text() == "keep me"


def test_prepare_force_replaces_a_good_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    out = tmp_path / "out"
    assert main(prepare_argv(ip, mp, out)) == 0
    (out / "stale.txt").write_text("from before")
    fewer = write(inter[inter["user"] != "u0"], tmp_path / "fewer.csv")
    # a file prepare did not write would be deleted with the rest: refused, then replaced
    fails_cleanly(capsys, [*prepare_argv(fewer, mp, out), "--force"], "holds stale.txt",
                  roots=(tmp_path,))  # fmt: skip
    (out / "stale.txt").unlink()
    assert main([*prepare_argv(fewer, mp, out), "--force"]) == 0
    assert "u0" not in set(pd.read_parquet(out / "users.parquet")["user"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewer.csv", "i.csv", "m.csv", "out"]


def test_failing_prepare_force_keeps_the_old_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    out = tmp_path / "out"
    assert main(prepare_argv(ip, mp, out)) == 0
    inter.loc[ROW, "rating"] = np.nan
    bad = write(inter, tmp_path / "bad.csv")
    fails_cleanly(
        capsys,
        [*prepare_argv(bad, mp, out), "--force"],
        f"{bad}, {line(ROW)}",
        roots=(tmp_path,),
    )


# --------------------------------------------------------------------------- model and config


def train_argv(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(prepared), "--out", str(out), *extra]


def test_unknown_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path) -> None:
    fails_cleanly(
        capsys,
        train_argv(prepared, tmp_path / "run", "--model", "nope", "--quiet"),
        "unknown model 'nope'",
        "two-tower",  # the available ones are listed
        roots=(tmp_path, prepared),
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.nope=1"], "train.nope"),
        (["nope.x=1"], "'nope'"),
        (["train.epochs=ten"], "train.epochs"),
        (["train.lr"], "train.lr"),
        (["train.seed=-1"], "train.seed"),  # numpy refuses it: one line, no half-made run
        (["train.lr=["], "not valid YAML"),
        (["train.lr=.nan"], "train.lr"),  # NaN passes every comparison: refused as such
        (["train.lr=.inf"], "train.lr"),
        (["model.dropout=.nan"], "model.dropout"),
        (["train.valid_metric=recall@0"], "train.valid_metric"),
        (["runtime.device=bogus"], "runtime.device"),
        (["runtime.device=cpu:1"], "runtime.device"),
        (["runtime.device=cuda:"], "runtime.device"),
        (["runtime.device=cuda:²"], "runtime.device"),
        (["train.valid_metric=recall@²"], "train.valid_metric"),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "wrong-type",
        "no-value",
        "negative-seed",
        "yaml",
        "nan",
        "inf",
        "nan-rate",
        "recall-at-0",
        "device",
        "cpu-index",
        "cuda-colon",
        "cuda-superscript",
        "recall-superscript",
    ],
)
def test_bad_set_override(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    prepared: Path,
    overrides: list[str],
    needle: str,
) -> None:
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--set", *overrides)
    fails_cleanly(capsys, argv, needle, roots=(tmp_path, prepared))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model:\n  name: two-tower\ntrain:\n  nope: 1\n", "train.nope"),
        ("model:\n  name: two-tower\n  dimension: 8\n", "model.dimension"),
        ("model:\n  name: two-tower\ntrain:\n  epochs: ten\n", "train.epochs"),
        ("model:\n  name: two-tower\ntrain:\n  lr: [0.1]\n", "train.lr"),
        ("model:\n  name: two-tower\ntrain: [epochs\n", "{yaml}"),  # not YAML: file named
        ("model:\n  name: nope\n", "unknown model 'nope'"),
        ("model:\n  name: pop\n  dim: 3\n", "model.dim; 'model' has no settings here"),
    ],
    ids=[
        "unknown-key",
        "unknown-model-key",
        "wrong-type",
        "list-for-number",
        "bad-yaml",
        "model",
        "a-model-without-settings",
    ],
)
def test_bad_yaml_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, text: str, needle: str
) -> None:
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(text)
    argv = train_argv(prepared, tmp_path / "run", "--config", str(yaml))
    fails_cleanly(capsys, argv, needle.format(yaml=yaml), roots=(tmp_path, prepared))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_torch_cannot_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--quiet")
    fails_cleanly(capsys, [*argv, "--set", "runtime.device=cuda"], "runtime.device=cuda",
                  "no usable CUDA device", roots=(tmp_path, prepared))  # fmt: skip


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    from aftrec.training import rundir

    run = tmp_path / "run"
    run.mkdir()
    for name in (rundir.CONFIG, rundir.META, rundir.LOCK):  # what such a failure leaves
        (run / name).write_text("")
    argv = train_argv(prepared, run, "--model", "two-tower", "--quiet")
    assert main([*argv, "--set", "train.epochs=1", "train.max_batches_per_epoch=2"]) == 0
    assert (run / rundir.BEST).is_file()


def test_zero_batch_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--quiet")
    fails_cleanly(
        capsys, [*argv, "--set", "train.batch_size=0"], "train.batch_size", roots=(tmp_path,)
    )


# --------------------------------------------------------------------------- checkpoints and runs


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a checkpoint\n" * 40)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)


DAMAGE = {"truncated": _truncate, "garbled": _garble, "empty": _empty, "foreign": _foreign}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_best_checkpoint_on_evaluate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, damage: str
) -> None:
    DAMAGE[damage](run_copy / "best.pt")
    fails_cleanly(
        capsys,
        ["evaluate", "--run", str(run_copy), "--quiet"],
        f"{run_copy / 'best.pt'}: ",
        roots=(tmp_path,),
    )


def test_corrupt_best_checkpoint_on_recommend(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path
) -> None:
    _truncate(run_copy / "best.pt")
    fails_cleanly(
        capsys,
        ["recommend", "--run", str(run_copy), "--out", str(tmp_path / "recs.csv")],
        f"{run_copy / 'best.pt'}: checkpoint is corrupt",
        roots=(tmp_path,),
    )


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_resume_with_corrupt_last_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, damage: str
) -> None:
    DAMAGE[damage](run_copy / "last.pt")
    fails_cleanly(
        capsys,
        ["train", "--resume", "--out", str(run_copy), "--quiet"],
        f"{run_copy / 'last.pt'}: checkpoint is corrupt",
        roots=(tmp_path,),
    )


def test_evaluate_with_last_checkpoint_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path
) -> None:
    (run_copy / "last.pt").unlink()
    fails_cleanly(
        capsys,
        ["evaluate", "--run", str(run_copy), "--which", "last", "--quiet"],
        f"{run_copy / 'last.pt'}: no checkpoint",
        roots=(tmp_path,),
    )


@pytest.mark.parametrize("what", ["prepared-data", "empty-dir", "absent"])
def test_evaluate_on_a_directory_that_is_not_a_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, what: str
) -> None:
    run = {"prepared-data": prepared, "empty-dir": tmp_path / "empty", "absent": tmp_path / "no"}[
        what
    ]
    if what == "empty-dir":
        run.mkdir()
    fails_cleanly(
        capsys,
        ["evaluate", "--run", str(run), "--quiet"],
        f"{run} is not a run directory",
        roots=(tmp_path, prepared),
    )


def test_evaluate_on_a_run_without_run_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path
) -> None:
    (run_copy / "run.json").unlink()
    fails_cleanly(
        capsys,
        ["evaluate", "--run", str(run_copy), "--quiet"],
        str(run_copy),
        "run.json",
        roots=(tmp_path,),
    )


@pytest.mark.parametrize("what", ["empty-dir", "no-run-json", "bad-run-json"])
def test_resume_something_that_is_not_a_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, what: str
) -> None:
    if what == "empty-dir":
        run = tmp_path / "empty"
        run.mkdir()
    else:
        run = run_copy
        if what == "no-run-json":
            (run / "run.json").unlink()
        else:
            (run / "run.json").write_text("{not json")
    fails_cleanly(
        capsys, ["train", "--resume", "--out", str(run), "--quiet"], str(run), roots=(tmp_path,)
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--n", "0"],
        ["--n", "20", "-5"],
        ["--sampled-negatives", "-3"],
        ["--sampled-negatives", "100000000"],
    ],
    ids=["n-zero", "n-negative", "sampled-negative", "sampled-above-the-catalogue"],
)
def test_evaluate_bad_numbers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, flags: list[str]
) -> None:
    fails_cleanly(
        capsys,
        ["evaluate", "--run", str(run_copy), "--quiet", *flags],
        flags[0],
        roots=(tmp_path,),
    )


# --------------------------------------------------------------------------- recommend


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--domains", "movie", "film"], ("unknown domain(s) ['film']", "'movie'")),
        (
            ["--users", "u3", "nobody"],
            ("unknown user id(s) ['nobody'] (this dataset's look like 'u",),
        ),
        (["--n", "0"], ("--n must be at least 1",)),
    ],
    ids=["domain", "user", "n"],
)
def test_recommend_bad_selection(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    trained: Path,
    flags: list[str],
    needles: tuple[str, ...],
) -> None:
    out = tmp_path / "recs.csv"
    fails_cleanly(
        capsys,
        ["recommend", "--run", str(trained), "--out", str(out), *flags],
        *needles,
        roots=(tmp_path, trained),
    )


def test_recommend_bad_suffix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path
) -> None:
    """Said before the checkpoint is read (a damaged one too) and anything is ranked."""
    out = tmp_path / "recs.txt"
    (run_copy / "best.pt").write_bytes(b"damaged")
    fails_cleanly(
        capsys,
        ["recommend", "--run", str(run_copy), "--out", str(out), "--n", "3"],
        f"{out}: output must end in .csv or .parquet",
        roots=(tmp_path,),
    )


def test_a_diverging_loss_is_one_error_line(
    prepared: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NaN loss ends ``aftrec train`` with one ``error:`` line naming the epoch."""
    from aftrec.training.steps import SupervisedStep

    monkeypatch.setattr(SupervisedStep, "__call__", lambda self, batch: {"loss": float("nan")})
    capsys.readouterr()
    argv = ["train", "--data", str(prepared), "--model", "two-tower", "--out", str(tmp_path / "r")]
    code = main([*argv, *TINY_TRAIN])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: non-finite loss at epoch 1"), lines


# --------------------------------------------------------------------------- found by probing


def _edit_meta(dataset: Path, edit: object) -> None:
    import json

    meta = json.loads((dataset / "meta.json").read_text())
    edit(meta)  # type: ignore[operator]
    (dataset / "meta.json").write_text(json.dumps(meta))


META_EDITS = {
    "n-items": (lambda m: m.update(n_items=10), "domain_offsets"),
    "one-domain": (lambda m: m.update(domains=["A"]), "domain_offsets"),
    "no-counts": (lambda m: m.pop("counts"), "counts: Field required"),
    "offsets-down": (
        lambda m: m["domain_offsets"].__setitem__(1, m["n_items"] + 5),
        "domain_offsets must increase",
    ),
    "format-99": (lambda m: m.update(format=99), "format"),
}


@pytest.mark.parametrize("edit", list(META_EDITS))
def test_a_meta_json_the_readers_cannot_rely_on_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, edit: str
) -> None:
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    change, needle = META_EDITS[edit]
    _edit_meta(data, change)
    argv = train_argv(data, tmp_path / "run", "--model", "two-tower", "--quiet")
    fails_cleanly(capsys, argv, f"{data / 'meta.json'} is not a valid prepared dataset", needle,
                  roots=(tmp_path,))  # fmt: skip


def test_an_items_table_shorter_than_meta_json_says(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    items = pd.read_parquet(data / "items.parquet")
    items.iloc[:-1].to_parquet(data / "items.parquet")
    argv = train_argv(data, tmp_path / "run", "--model", "two-tower", "--quiet")
    fails_cleanly(capsys, argv, "items.parquet holds", roots=(tmp_path,))


def test_more_domains_than_the_format_holds() -> None:
    from aftrec.data.prepared import MAX_DOMAINS, encode_items
    from aftrec.errors import DataError

    domains = [f"d{i}" for i in range(MAX_DOMAINS + 1)]
    items = pd.DataFrame({"item": range(len(domains)), "domain": domains})
    with pytest.raises(DataError, match="32,768 domains; aftrec handles at most 32,767"):
        encode_items(items, domains)


def test_a_truncated_parquet_log_when_streaming(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.parquet"), write(items, tmp_path / "m.csv")
    _truncate(ip)
    argv = [*prepare_argv(ip, mp, tmp_path / "out"), "--streaming"]
    fails_cleanly(capsys, argv, f"{ip}: cannot be read as Parquet", roots=(tmp_path,))


def test_a_nan_rating_threshold(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    argv = [*prepare_argv(ip, mp, tmp_path / "out"), "--rating-threshold", "nan"]
    fails_cleanly(capsys, argv, "--rating-threshold must be a number", roots=(tmp_path,))


def test_resume_refuses_other_data_than_the_run_trained_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path
) -> None:
    other = Path(shutil.copytree(prepared, tmp_path / "other"))
    argv = ["train", "--out", str(run_copy), "--resume", "--data", str(other), "--quiet",
            "--set", "train.epochs=9"]  # fmt: skip
    fails_cleanly(capsys, argv, "--resume goes on with the same data", roots=(tmp_path,))


def test_a_run_whose_dataset_moved_says_how_to_find_it_and_resume_records_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path
) -> None:
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    meta = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**meta, "data": str(data)}))
    moved = data.rename(tmp_path / "moved")
    evaluate = ["evaluate", "--run", str(run_copy), "--quiet"]
    fails_cleanly(capsys, evaluate, "which is not a prepared dataset now; if it moved",
                  roots=(tmp_path,))  # fmt: skip
    # the finished run trains nothing more; run.json names the new place from now on
    resume = ["train", "--out", str(run_copy), "--resume", "--data", str(moved), "--quiet"]
    assert main(resume) == 0
    assert json.loads((run_copy / "run.json").read_text()) == {**meta, "data": str(moved)}
    assert main(evaluate) == 0


@pytest.mark.parametrize("at_old_place", ["empty folder", "another dataset"])
def test_a_moved_dataset_is_found_though_a_folder_stands_at_its_old_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path,
    at_old_place: str,
) -> None:  # fmt: skip
    """An empty folder, or a dataset prepared again, at the old place made `--resume --data
    NEW` "drop --data", and resume without it "run `aftrec prepare`": no command could record
    where the run's dataset went."""
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    meta = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**meta, "data": str(data)}))
    moved = data.rename(tmp_path / "moved")
    if at_old_place == "empty folder":
        data.mkdir()
        alone = ["train", "--out", str(run_copy), "--resume", "--quiet"]
        fails_cleanly(capsys, alone, "which is not a prepared dataset now; if it moved",
                      roots=(tmp_path,))  # fmt: skip
    else:
        argv = ["prepare", "--dataset", "synthetic", "--out", str(data)]
        assert main(argv) == 0
    resume = ["train", "--out", str(run_copy), "--resume", "--data", str(moved), "--quiet"]
    assert main(resume) == 0
    assert json.loads((run_copy / "run.json").read_text()) == {**meta, "data": str(moved)}


def test_resume_does_not_record_a_dataset_the_run_does_not_fit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path
) -> None:
    other = tmp_path / "other"
    assert main(["prepare", "--dataset", "synthetic", "--out", str(other)]) == 0
    meta = json.loads((run_copy / "run.json").read_text())
    del meta["data_fingerprint"]  # a run of an older version: only the checkpoint can tell
    (run_copy / "run.json").write_text(json.dumps({**meta, "data": str(tmp_path / "gone")}))
    before = (run_copy / "run.json").read_text()
    capsys.readouterr()
    argv = ["train", "--out", str(run_copy), "--resume", "--data", str(other), "--quiet"]
    fails_cleanly(capsys, argv, "does not fit this run", roots=(tmp_path,))
    assert (run_copy / "run.json").read_text() == before


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda run: (run / "run.json").write_text('{"data": null}'), "unreadable run"),
        (lambda run: (run / "run.json").write_text('{"data": 5}'), "unreadable run"),
        (lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8"),
        (lambda run: (run / "config.yaml").write_text("1: 2\nfoo: 3\n"), "keys are names"),
        (lambda run: (run / "config.yaml").write_text("model:\n  name: [a]\n"), "model.name"),
        (lambda run: (run / "config.yaml").write_text("model: 5\n"), "must be a mapping"),
        (lambda run: torch.save({"model": 5}, run / "best.pt"), "not an aftrec checkpoint"),
    ],
    ids=[
        "data-null",
        "data-int",
        "config-binary",
        "config-int-key",
        "name-list",
        "section-int",
        "model-int",
    ],
)
def test_a_damaged_run_is_one_error_line_for_evaluate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, damage: Any, said: str
) -> None:
    damage(run_copy)
    fails_cleanly(capsys, ["evaluate", "--run", str(run_copy), "--quiet"], said,
                  roots=(tmp_path,))  # fmt: skip


def test_a_torn_log_line_is_left_out_and_the_next_entry_gets_a_line_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aftrec.training import rundir

    rundir.append_log(tmp_path, {"epoch": 1, "loss": 0.5})
    with open(tmp_path / rundir.LOG, "a") as fh:
        fh.write('{"epoch": 2, "lo')  # a process killed mid-write
    rundir.append_log(tmp_path, {"epoch": 2, "loss": 0.4})
    rundir.append_log(tmp_path, {"epoch": 3, "loss": 0.3, "train_seconds": "abc"})
    assert [e["epoch"] for e in rundir.epoch_log(tmp_path)] == [1, 2]
    assert "left out 2 line(s)" in caplog.text
    assert rundir.best_epoch_time(tmp_path, "loss") == (1, None)


def test_a_closed_form_model_without_a_validation_part(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """EASE's grid needs a validation part; one setting fits without. The line said "no
    validation part: the last epoch kept", of a fit that has no epoch."""
    data = tmp_path / "data"
    argv = ["prepare", "--dataset", "synthetic", "--out", str(data), "--users", "300",
            "--valid-ratio", "0"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(train_argv(data, tmp_path / "pop", "--model", "pop", "--quiet")) == 0
    (line,) = [s for s in capsys.readouterr().out.splitlines() if s.startswith("trained ")]
    assert re.fullmatch(
        rf"trained {re.escape(str(tmp_path / 'pop'))}: fitted in closed form in [0-9.]+s, "
        "no validation part",
        line,
    ), line
    fails_cleanly(capsys, train_argv(data, tmp_path / "ease", "--model", "ease", "--quiet"),
                  "ease picks among", "validation part", roots=(tmp_path,))  # fmt: skip
    one = train_argv(data, tmp_path / "ease", "--model", "ease", "--quiet", "--set",
                     "model.l2_grid=[]", "model.l2=100")  # fmt: skip
    assert main(one) == 0


@pytest.mark.parametrize("where", ["run", "dataset"])
def test_reproduce_writes_no_report_into_a_run_or_a_dataset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path,
    where: str,
) -> None:  # fmt: skip
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    out = run_copy if where == "run" else data
    argv = ["reproduce", "--data", str(data), "--out", str(out), "--models", "pop",
            "--skip", "ablations", "sweeps", "--quiet"]  # fmt: skip
    fails_cleanly(capsys, argv, "not a report directory", roots=(tmp_path,))


def test_reproduce_refuses_a_domain_named_average(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The report's columns name the mean over domains "average"; such a domain's column
    would read the mean's values."""
    inter, items = make_log()
    renamed = {DOMAINS[0]: "average"}
    inter["domain"], items["domain"] = (
        inter["domain"].replace(renamed),
        items["domain"].replace(renamed),
    )
    data = tmp_path / "data"
    argv = prepare_argv(write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv"), data)
    assert main(argv) == 0
    argv = ["reproduce", "--data", str(data), "--out", str(tmp_path / "r"), "--models", "pop",
            "--skip", "ablations", "sweeps", "--quiet"]  # fmt: skip
    fails_cleanly(capsys, argv, "a domain is named 'average'", roots=(tmp_path,))


def test_the_demo_checks_its_arguments_before_preparing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["demo", "--out", str(tmp_path / "demo"), "--jobs", "0"]
    fails_cleanly(capsys, argv, "--jobs must be at least 1", roots=(tmp_path,))


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 191. GiB for an array with shape (100000000, 256)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:119] . DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 25600000000 bytes."
        ),
    ],
    ids=["numpy", "torch"],
)
def test_out_of_memory_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    prepared: Path, error: BaseException,
) -> None:  # fmt: skip
    from aftrec import api

    def too_big(*args: object, **kw: object) -> None:
        raise error

    monkeypatch.setattr(api, "train", too_big)
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--quiet")
    line = fails_cleanly(capsys, argv, "error: out of memory (", "lower the sizes",
                         roots=(tmp_path,))  # fmt: skip
    assert "Traceback" not in line


def test_two_sources_at_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    argv = [*prepare_argv(ip, mp, tmp_path / "out"), "--dataset", "ml-1m"]
    fails_cleanly(capsys, argv, "--dataset and --interactions name two sources", roots=(tmp_path,))


# --------------------------------------------------------------------------- found by a probe


@pytest.mark.parametrize(
    ("model", "setting", "said"),
    [
        ("two-tower", "data.n_negatives=0", "data.n_negatives must be at least 1"),
        ("aft-d", "data.n_negatives=0", "data.n_negatives must be at least 1"),
        ("ease", "model.l2=0", "model.l2 must be > 0"),
        ("ease", "model.l2_grid=[0.0, 50.0]", "must hold values > 0"),
        ("aft", "model.conve_kernel=129", "at most 127"),
    ],
)
def test_settings_a_model_cannot_train_with_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, model: str,
    setting: str, said: str,
) -> None:  # fmt: skip
    """Each was an AssertionError or LinAlgError traceback, or (a ConvE filter wider than
    its images) minutes an epoch on a few hundred examples, instead of one line."""
    argv = train_argv(prepared, tmp_path / "run", "--model", model, "--quiet",
                      "--set", "train.epochs=1", setting)  # fmt: skip
    fails_cleanly(capsys, argv, said, roots=(tmp_path,))


def test_a_float_in_e_notation_is_a_number() -> None:
    from aftrec.config import parse_overrides

    got = parse_overrides(["train.lr=1e-3", "train.x=2E+4", "train.y=.5e-1", "train.n=10"])
    assert got == {"train": {"lr": 0.001, "x": 20000.0, "y": 0.05, "n": 10}}
    assert isinstance(got["train"]["n"], int)
    assert parse_overrides(["train.s=._e1"]) == {"train": {"s": "._e1"}}  # no digit: text


def test_without_a_validation_part_every_epoch_trains_and_the_last_is_kept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The stand-in value was -epoch: epoch 1 stayed best and training stopped after
    1 + patience epochs, with 'valid -1.0000' printed."""
    inter, items = make_log()
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    data = tmp_path / "data"
    assert main([*prepare_argv(ip, mp, data), "--valid-ratio", "0"]) == 0
    run = tmp_path / "run"
    argv = train_argv(data, run, "--model", "two-tower", "--quiet", *TINY_TRAIN,
                      "--set", "train.epochs=4", "train.patience=1")  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best epoch 4, no validation part: the last epoch kept, 4 epoch(s)" in out
    assert "stopped early" not in out and "-1.0" not in out
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == 4
    from aftrec.training.rundir import best_epoch_time

    assert best_epoch_time(run)[0] == 4  # as the report's convergence table reads it
    # its metrics.json is standard JSON: a NaN would be written NaN, which JSON has not
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    text = (run / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


def test_resume_may_change_the_runtime_keys(
    capsys: pytest.CaptureFixture[str], run_copy: Path
) -> None:
    """They change nothing a run computes (RuntimeConfig); --resume refused them all."""
    from aftrec.training.rundir import load_run_config

    argv = ["train", "--resume", "--out", str(run_copy), "--quiet",
            "--set", "train.threads=1", "runtime.eval_batch_size=64"]  # fmt: skip
    assert main(argv) == 0
    runtime = load_run_config(run_copy).runtime
    assert runtime.threads == 1 and runtime.eval_batch_size == 64
    refused = ["train", "--resume", "--out", str(run_copy), "--quiet", "--set", "model.dim=4"]
    fails_cleanly(capsys, refused, "drop --model/--config/--set", roots=(run_copy,))


def test_resume_refuses_another_dataset_of_the_same_shape_after_a_move(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path
) -> None:
    """The checkpoint fitting was the only check once the recorded folder was gone: a run
    went on with other data of the same shape (and run.json named it from then on)."""
    meta = json.loads((run_copy / "run.json").read_text())
    assert meta["data_fingerprint"]
    (run_copy / "run.json").write_text(json.dumps({**meta, "data": str(tmp_path / "gone")}))
    inter, items = make_log(seed=1)  # the same users, items and domains; other clicks
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    other = tmp_path / "other"
    assert main(prepare_argv(ip, mp, other)) == 0
    argv = ["train", "--out", str(run_copy), "--resume", "--data", str(other), "--quiet"]
    fails_cleanly(capsys, argv, "is not the dataset", roots=(tmp_path,))
    # the same preparation elsewhere is the same dataset
    same = Path(shutil.copytree(prepared, tmp_path / "moved"))
    assert main(["train", "--out", str(run_copy), "--resume", "--data", str(same), "--quiet"]) == 0


def test_the_fingerprint_is_the_prepared_files_and_is_checked_on_every_resume_and_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_copy: Path, prepared: Path
) -> None:
    """Files beside a dataset's own (recommendations, notes) do not change it; the dataset
    prepared again in place from another log does, and a plain --resume or evaluate saw
    nothing then."""
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    meta = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**meta, "data": str(data)}))
    (data / "NOTES.txt").write_text("mine")
    (data / "recs").mkdir()
    (data / "recs" / "top.csv").write_text("user,item\n")
    assert main(["evaluate", "--run", str(run_copy), "--quiet"]) == 0
    shutil.rmtree(data / "recs")  # prepare --force replaces only what it wrote
    (data / "NOTES.txt").unlink()
    inter, items = make_log(seed=1)
    ip, mp = write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv")
    assert main([*prepare_argv(ip, mp, data), "--force"]) == 0
    for argv in (["train", "--out", str(run_copy), "--resume", "--quiet"],
                 ["evaluate", "--run", str(run_copy), "--quiet"]):  # fmt: skip
        fails_cleanly(capsys, argv, "is not the dataset", roots=(run_copy,))


def test_a_validation_metric_that_cannot_tell_epochs_apart_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path
) -> None:
    """Recall@50 over domains of 12 items is 1 at every epoch: the first epoch was kept and
    training stopped after the patience, without a word."""
    base = train_argv(prepared, tmp_path / "a", "--model", "two-tower", "--quiet", *TINY_TRAIN)
    capsys.readouterr()
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "note: train.valid_metric=recall@50 ranks every item of every domain" in out
    assert "train.valid_metric=recall@3" in out
    told = train_argv(prepared, tmp_path / "b", "--model", "two-tower", "--quiet", *TINY_TRAIN,
                      "--set", "train.valid_metric=recall@3")  # fmt: skip
    assert main(told) == 0
    assert "note:" not in capsys.readouterr().out


def test_evaluate_names_a_cut_off_that_reaches_every_item(
    capsys: pytest.CaptureFixture[str], run_copy: Path
) -> None:
    """Recall@N for N at least every domain's size is 1 for any model: said, not hidden."""
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run_copy), "--n", "5", "99999", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "recall@99999 in every domain (the largest has 12 items)" in out
    assert main(["evaluate", "--run", str(run_copy), "--n", "5", "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Domains of 30, 10 and 2 items, the second named ``'Games '`` (a trailing space, as a
    user's own catalogue had it); every user clicks both items of ``Tiny``, so no user has
    an item left unclicked there and its AUC is NaN."""
    root = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    sizes = {"Big": 30, "Games ": 10, "Tiny": 2}
    items = pd.DataFrame(
        [(f"{d.strip()}-{i}", d) for d, n in sizes.items() for i in range(n)],
        columns=["item", "domain"],
    )
    rows = []
    for u in range(40):
        picks = [f"Big-{i}" for i in rng.choice(30, 6, replace=False)]
        picks += [f"Games-{i}" for i in rng.choice(10, 4, replace=False)] + ["Tiny-0", "Tiny-1"]
        rows += [
            (f"u{u}", it, 1_600_000_000 + 60 * t) for t, it in enumerate(rng.permutation(picks))
        ]
    log = write(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), root / "log.csv")
    argv = ["prepare", "--interactions", str(log), "--items", str(write(items, root / "items.csv")),
            "--out", str(root / "data")]  # fmt: skip
    assert main(argv) == 0
    return root / "data"


@pytest.fixture(scope="module")
def uneven_pop(uneven: Path) -> Path:
    run = uneven.parent / "pop"
    assert main(train_argv(uneven, run, "--model", "pop", "--quiet")) == 0
    return run


def test_evaluate_names_the_domains_where_recall_is_one_and_an_average_over_fewer(
    capsys: pytest.CaptureFixture[str], uneven_pop: Path
) -> None:
    """In a domain of at most N items Recall@N is 1 for any model, and the average counts it;
    the average AUC leaves out a domain without an AUC, the others count it. Evaluate said
    only the first, and only once N reached the largest domain."""
    capsys.readouterr()
    assert main(["evaluate", "--run", str(uneven_pop), "--n", "5", "10", "20", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("note:")] == [
        "note: Recall@N is 1 for any model in a domain of at most N items (every unseen item "
        "is in the top N), and the average counts it: recall@5 in Tiny (2 items); recall@10 in "
        "'Games ' (10 items), Tiny (2 items); recall@20 in 'Games ' (10 items), Tiny (2 items)",
        "note: the average auc leaves out Tiny, where no user has an item left unclicked to "
        "rank against; every other average is over all 3 domains with users",
    ]
    metrics = json.loads((uneven_pop / "metrics.json").read_text())
    assert metrics["domains"]["Tiny"]["auc"] is None and metrics["average"]["auc"] is not None
    assert metrics["domains"]["Games "]["recall@10"] == 1.0
    assert set(metrics) == {"split", "protocol", "domains", "average", "users"}


def test_sampled_evaluate_names_where_n_reaches_every_users_candidates(
    capsys: pytest.CaptureFixture[str], uneven_pop: Path
) -> None:
    """With 10 sampled negatives a user of Big (30 items) is ranked among at most 12 items,
    so sampled_recall@15 is 1 there for any model: the note named only the domains of at
    most 15 items. The protocol line printed ``Games , Tiny`` where the table quotes
    ``'Games '``; metrics_sampled10.json keeps its line as it was."""
    capsys.readouterr()
    argv = ["evaluate", "--run", str(uneven_pop), "--sampled-negatives", "10", "--n", "5", "15",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "; 'Games ', Tiny have at most 10 items, so every unclicked" in out[0]
    assert out[-3] == (
        "note: sampled Recall@N is 1 for any model where N reaches every user's candidates "
        "(its held-out positives and the sampled unclicked items: all of them are in the top "
        "N), and the average counts it: sampled_recall@5 in Tiny (at most 2 candidates a "
        "user); sampled_recall@15 in every domain (no user has more than 12 candidates)"
    )
    metrics = json.loads((uneven_pop / "metrics_sampled10.json").read_text())
    assert "; Games , Tiny have at most 10 items" in metrics["protocol"]
    assert metrics["domains"]["Big"]["sampled_recall@15"] == 1.0


def test_a_domain_named_with_a_trailing_space_is_shown_quoted_and_named_when_missed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uneven_pop: Path
) -> None:
    """``'Games '`` printed as ``Games`` in the table, and ``--domains Games`` was refused
    without a word on why. The name is kept as prepared: ``--domains 'Games '`` works."""
    capsys.readouterr()
    assert main(["evaluate", "--run", str(uneven_pop), "--n", "5", "--quiet"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:6]
    assert [r.split("  ")[0] for r in rows] == ["Big", "'Games '", "Tiny"]
    out = tmp_path / "recs.csv"
    argv = ["recommend", "--run", str(uneven_pop), "--out", str(out), "--domains"]
    fails_cleanly(capsys, [*argv, "Games"], "unknown domain(s) ['Games']",
                  "'Games ' differs only in whitespace", roots=(tmp_path, uneven_pop))  # fmt: skip
    assert main([*argv, "Games "]) == 0
    assert set(pd.read_csv(out)["domain"]) == {"Games "}


def test_a_closed_form_fit_says_what_it_did(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uneven: Path
) -> None:
    """pop and EASE train no epoch: the line read ``0 epoch(s), 0 examples/s``. Resumed when
    finished, the run said it was "fitted in closed form in 0.0s": nothing was fitted."""
    capsys.readouterr()
    for model in ("pop", "ease"):
        argv = train_argv(uneven, tmp_path / model, "--model", model, "--quiet", "--set",
                          "train.valid_metric=recall@5")  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"trained {tmp_path / model}: fitted in closed form in " in out
        assert "epoch(s)" not in out and "examples/s" not in out
        valid = re.search(r", valid [0-9.]+$", out.splitlines()[0])
        assert valid is not None
        assert main(["train", "--resume", "--out", str(tmp_path / model), "--quiet"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == (
            f"trained {tmp_path / model}: already fitted in closed form (nothing to fit now)"
            + valid.group()
        )


def test_a_validation_metric_that_is_one_in_some_domains_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uneven: Path, prepared: Path
) -> None:
    """The average the run stops on counts the domains of at most N items, where Recall@N is
    1 at every epoch; NDCG@N still ranks there, so N at every domain's size is no note.
    EASE's grid picks on validation Recall@50, 1 in every domain here: its note was lost, as
    it read the saved config, which keeps only the point picked."""
    capsys.readouterr()
    assert main(train_argv(uneven, tmp_path / "ease", "--model", "ease", "--quiet")) == 0
    assert (
        "note: train.valid_metric=recall@50 ranks every item of every domain (the largest has 30)"
        in capsys.readouterr().out
    )
    argv = train_argv(uneven, tmp_path / "a", "--model", "two-tower", *TINY_TRAIN, "--set",
                      "train.valid_metric=recall@10")  # fmt: skip
    assert main(argv) == 0
    assert (
        "note: train.valid_metric=recall@10 is 1 for any model in 'Games ' (10 items), Tiny "
        "(2 items), of at most 10 items; the average that picks the best epoch counts them, so "
        "only the other domains tell the epochs apart"
    ) in capsys.readouterr().out
    argv = train_argv(prepared, tmp_path / "b", "--model", "two-tower", *TINY_TRAIN, "--set",
                      "train.valid_metric=ndcg@50")  # fmt: skip
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().out


def test_the_validation_note_names_what_a_closed_form_fit_picks_among(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uneven: Path
) -> None:
    """EASE picks a point of its grid, not an epoch: its note said "only the other domains
    tell the epochs apart". A domain of one item read "(1 items)"."""
    from aftrec import api
    from aftrec.config import resolve

    capsys.readouterr()
    argv = train_argv(uneven, tmp_path / "ease", "--model", "ease", "--quiet", "--set",
                      "train.valid_metric=recall@10")  # fmt: skip
    assert main(argv) == 0
    assert (
        "note: train.valid_metric=recall@10 is 1 for any model in 'Games ' (10 items), Tiny "
        "(2 items), of at most 10 items; the average that picks the best grid point counts "
        "them, so only the other domains tell the grid points apart"
    ) in capsys.readouterr().out
    one = tmp_path / "one"  # the same data, its last domain of one item
    one.mkdir()
    meta = json.loads((uneven / "meta.json").read_text())
    meta["domain_offsets"][-2] = meta["domain_offsets"][-1] - 1
    (one / "meta.json").write_text(json.dumps(meta))
    cfg = resolve("two-tower", overrides=["train.valid_metric=recall@1"])
    assert api._saturated(cfg, one) == (
        "note: train.valid_metric=recall@1 is 1 for any model in Tiny (1 item), of at most 1 "
        "item; the average that picks the best epoch counts it, so only the other domains "
        "tell the epochs apart"
    )


@pytest.fixture(scope="module")
def bundle(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert main(["export", "--run", str(trained), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", ["train", "reproduce", "tune", "export", "prepare"])
@pytest.mark.parametrize("enclosing", ["dataset", "run", "bundle"])
def test_no_folder_output_goes_inside_a_dataset_a_run_or_a_bundle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, run_copy: Path,
    bundle: Path, command: str, enclosing: str,
) -> None:  # fmt: skip
    """A dataset, a run and a bundle own everything in them: a report written into a dataset,
    or a study into a trial's run, would be deleted or mixed up with what they hold."""
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    where = {"dataset": data, "run": run_copy,
             "bundle": Path(shutil.copytree(bundle, tmp_path / "bundle"))}[enclosing]  # fmt: skip
    out = where / "sub" / "out"
    inter, items = make_log()
    argv = {
        "train": train_argv(data, out, "--model", "pop", "--quiet"),
        "reproduce": ["reproduce", "--data", str(data), "--out", str(out), "--models", "pop",
                      "--skip", "ablations", "sweeps", "--quiet"],
        "tune": ["tune", "--data", str(data), "--model", "pop", "--out", str(out), "--trials", "1"],
        "export": ["export", "--run", str(run_copy), "--out", str(out)],
        "prepare": prepare_argv(write(inter, tmp_path / "i.csv"), write(items, tmp_path / "m.csv"),
                                out),
    }[command]  # fmt: skip
    kind = "prepared dataset" if enclosing == "dataset" else enclosing
    fails_cleanly(capsys, argv, f"is inside the {kind} in {where}", roots=(tmp_path,))


# a 400-byte value that expands to 9**9 strings: each level an anchor of 9 aliases of the last
BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8))
    + "]"
)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"model: {{dim: {BOMB}}}\n", "expected an integer, got [["),
        ("model: {dim: " + "[" * 5000 + "]" * 5000 + "}\n", "nested too deeply"),
        ("model: {dim: 8}\n" + "#" * (1 << 20) + "\n", "above 1048576 bytes"),
        ("model:\n  dim: 8\n  dim: 16\n", "the key 'dim' is given twice"),
        ("model: {dim: 8}\nmodel: {dim: 16}\n", "the key 'model' is given twice"),
    ],
    ids=["alias-bomb", "deep", "huge", "duplicate-key", "duplicate-section"],
)
def test_a_config_file_that_would_exhaust_or_mislead_is_one_short_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, text: str, needle: str
) -> None:
    """Aliases expanding a 400-byte file to millions of values were echoed whole (a 39 MB
    error line, or a MemoryError); nesting thousands deep was a RecursionError; a key given
    twice kept the last silently."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--quiet",
                      "--config", str(config))  # fmt: skip
    line = fails_cleanly(capsys, argv, needle, roots=(tmp_path,))
    assert len(line) < 1000


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        ("model.dim=1:30", "expected an integer, got '1:30'"),  # YAML 1.1: ninety
        ("train.sparse_embeddings=yes", "expected true or false, got 'yes'"),
        ("train.lr=1" + "0" * 400, "expected a finite number"),
        ("model.dim=99999999999999999999999", "must be < 2147483648"),
        ("runtime.checkpoint_minutes=1e-310", "below the smallest normal number"),
        ("train.data_shards=3", "must be a multiple of the number of data shards (3)"),
    ],
)
def test_config_values_torch_or_yaml_would_misread_are_refused_and_leave_no_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prepared: Path, pair: str, needle: str
) -> None:
    """Each was a traceback, a value read as another (1:30 as 90, 1e-310 as 0 once training
    flushed it), or a run folder with a config and no checkpoint."""
    argv = train_argv(prepared, tmp_path / "run", "--model", "two-tower", "--quiet",
                      "--set", pair)  # fmt: skip
    fails_cleanly(capsys, argv, needle, roots=(tmp_path,))


def test_yaml_numbers_read_as_yaml_1_2_and_a_metric_with_leading_zeros(
    tmp_path: Path, prepared: Path
) -> None:
    """``010`` is ten, not octal eight; ``recall@0050`` is recall@50 (its key was looked up
    as written, a KeyError after the run folder was made)."""
    from aftrec.config import parse_overrides

    assert parse_overrides(["model.dim=010"]) == {"model": {"dim": 10}}
    out = tmp_path / "run"
    argv = train_argv(prepared, out, "--model", "two-tower", "--quiet", "--set",
                      "train.epochs=1", "train.valid_metric=recall@0005")  # fmt: skip
    assert main(argv) == 0
    assert "valid_recall@5" in (out / "log.jsonl").read_text()


def test_evaluate_leaves_the_pair_of_files_as_it_was_when_one_cannot_be_written(
    capsys: pytest.CaptureFixture[str], run_copy: Path, tmp_path: Path
) -> None:
    """``metrics.json`` a folder: per_user.parquet was replaced before the error."""
    (run_copy / "metrics.json").mkdir()
    fails_cleanly(capsys, ["evaluate", "--run", str(run_copy), "--n", "3"],
                  "metrics.json: it is a folder", roots=(tmp_path,))  # fmt: skip
