"""End to end through ``aftrec.cli.main``: prepare -> train -> evaluate -> recommend on a tiny
generic log with string ids ("u17", "movie-3"), so every output can be checked against the
original ids. Also pre-split input, Parquet input and the label / rating positive rules.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from aftrec import api
from aftrec.cli import build_parser, main
from aftrec.config import resolve
from tests.inputs import write

DOMAINS = ("movie", "book", "music")
N_USERS, ITEMS_PER_DOMAIN, PER_DOMAIN = 30, 12, 4
RATING_CYCLE = (5.0, 4.0, 3.0, 2.0)  # per (user, domain): 3 rows >= 3, 2 rows >= 4
TINY = ["train.epochs=1", "train.max_batches_per_epoch=3", "data.history_len=5"]
TINY_MODEL = {"two-tower": ["model.dim=8", "model.hidden=16"], "pop": []}
PREPARED_FILES = {
    "meta.json",
    "items.parquet",
    "users.parquet",
    "train.parquet",
    "valid.parquet",
    "test.parquet",
}
RUN_FILES = {"config.yaml", "run.json", "best.pt", "last.pt", "log.jsonl"}
REC_COLUMNS = ["user", "domain", "item", "rank", "score"]


def make_log(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items): every (user, domain) has 4 rows, distinct interleaved times, a
    rating cycling through 5, 4, 3, 2 and a label that is 1 where the rating is >= 4."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        [(f"{d}-{i}", d) for d in DOMAINS for i in range(ITEMS_PER_DOMAIN)],
        columns=["item", "domain"],
    )
    rows = [
        (f"u{u}", f"{d}-{i}", d, RATING_CYCLE[k])
        for u in range(N_USERS)
        for d in DOMAINS
        for k, i in enumerate(rng.choice(ITEMS_PER_DOMAIN, PER_DOMAIN, replace=False))
    ]
    inter = pd.DataFrame(rows, columns=["user", "item", "domain", "rating"])
    inter["timestamp"] = 1_600_000_000 + 60 * rng.permutation(len(inter))
    inter["label"] = (inter["rating"] >= 4).astype(int)
    return inter, items


def run_ok(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def parts(data: Path) -> dict[str, pd.DataFrame]:
    """The prepared train / valid / test parts with the original user and item ids."""
    users = pd.read_parquet(data / "users.parquet")
    items = pd.read_parquet(data / "items.parquet")
    out = {}
    for name in ("train", "valid", "test"):
        frame = pd.read_parquet(data / f"{name}.parquet")
        frame = frame.merge(users, on="user_idx").merge(items, on="item_idx")
        out[name] = frame
    return out


def pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user"], frame["item"], strict=True))


def digest(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()
    }


@dataclass(frozen=True)
class Pipeline:
    inter: pd.DataFrame
    items: pd.DataFrame
    inter_csv: Path
    items_csv: Path
    data: Path
    two_tower: Path
    pop: Path
    prepare_stdout: str


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One prepared dataset (every row a positive) and two tiny finished runs on it."""
    root = tmp_path_factory.mktemp("cli")
    inter, items = make_log()
    inter = inter.drop(columns=["rating", "label"])
    ic, mc = write(inter, root / "inter.csv"), write(items, root / "items.csv")
    data = root / "data"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_ok(["prepare", "--interactions", str(ic), "--items", str(mc), "--out", str(data)])
    runs = {}
    for model in ("two-tower", "pop"):
        runs[model] = root / f"run-{model}"
        run_ok(
            [
                "train",
                "--data",
                str(data),
                "--model",
                model,
                "--out",
                str(runs[model]),
                "--set",
                *TINY,
                *TINY_MODEL[model],
                "--quiet",
            ]
        )
    return Pipeline(inter, items, ic, mc, data, runs["two-tower"], runs["pop"], buf.getvalue())


@pytest.fixture
def run_copy(pipeline: Pipeline, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pipeline.two_tower, tmp_path / "run"))


# --------------------------------------------------------------------------- prepare


def test_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert {"pop", "two-tower"} <= set(capsys.readouterr().out.split())


@pytest.mark.parametrize("module", ["aftrec", "aftrec.cli"])
def test_python_dash_m_exits_with_the_commands_status(module: str, tmp_path: Path) -> None:
    """``python -m aftrec`` is what the plan drivers run (``benchmarks/converged_plan.py``,
    ``tune_preset.py``): a failed command must exit non-zero there too, not 0."""
    bad = [sys.executable, "-m", module, "train", "--data", str(tmp_path / "none")]
    proc = subprocess.run(
        [*bad, "--model", "pop", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: ") and "not a prepared dataset" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", module, "models"], capture_output=True, check=False)
    assert ok.returncode == 0


@pytest.mark.parametrize(
    "argv",
    [[], ["prepare"], ["train"], ["evaluate"], ["recommend"], ["export"], ["serve"],
     ["reproduce"], ["tune"], ["demo"], ["models"]],
)  # fmt: skip
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """No reStructuredText markup of the docstrings leaks into ``--help``."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: aftrec" in text
    assert not any(mark in text for mark in ("``", ":class:", ":func:", ":mod:")), text


def test_prepare_help_says_items_go_with_interactions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The help wrote `--interactions [--items]`, an optional --items, while the command
    refuses --interactions without it."""
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--interactions [--items]" not in text
    assert "--interactions with --items, or --train and --test with --items" in text
    log = write(make_log()[0], tmp_path / "inter.csv")
    assert main(["prepare", "--interactions", str(log), "--out", str(tmp_path / "o")]) == 2
    assert "--interactions needs --items" in capsys.readouterr().err


def test_every_option_says_what_it_is() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"{name} {action.option_strings[-1] if action.option_strings else action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert silent == []


@pytest.mark.parametrize(
    ("argv", "dest", "want"),
    [
        (["train", "--out", "r", "--set", "train.epochs=1", "--set", "train.lr=0.1"], "set",
         ["train.epochs=1", "train.lr=0.1"]),
        (["tune", "--data", "d", "--model", "pop", "--out", "o", "--trials", "1",
          "--set", "a=1", "--set", "b=2"], "set", ["a=1", "b=2"]),
        (["demo", "--set", "a=1", "--set", "b=2"], "set", ["a=1", "b=2"]),
        (["reproduce", "--data", "d", "--out", "o", "--set", "a=1", "--set", "b=2",
          "--models", "pop", "--models", "ease"], "set", ["a=1", "b=2"]),
        (["reproduce", "--data", "d", "--out", "o", "--models", "pop", "--models", "ease"],
         "models", ["pop", "ease"]),
        (["evaluate", "--run", "r", "--n", "5", "--n", "10"], "n", [5, 10]),
        (["evaluate", "--run", "r"], "n", None),  # the command's default: 20 50 200
        (["recommend", "--run", "r", "--out", "x.csv", "--users", "a", "--users", "b"], "users",
         ["a", "b"]),
    ],
)  # fmt: skip
def test_a_repeated_list_option_adds_to_the_first(argv: list[str], dest: str, want: object) -> None:
    """`--set a=1 --set b=2` kept only b=2: a training ran 20 epochs on 2 threads when the
    first --set said 1 and 1."""
    assert getattr(build_parser().parse_args(argv), dest) == want


@pytest.mark.parametrize(
    "argv",
    [["train", "--data", "d"], ["nosuch"], ["train", "--data", "d", "--out", "r", "--bogus"],
     ["serve", "--port", "eighty"], []],
)  # fmt: skip
def test_a_bad_command_line_is_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse printed its usage block and then the error; the error is now one line that
    says where the usage is, as every other error of the command line is one line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1, captured.err
    assert "error: " in captured.err and "--help)" in captured.err
    assert "usage:" not in captured.err


@pytest.mark.parametrize(
    ("argv", "want"),
    [(["models"], False), (["-v", "models"], True), (["models", "-v"], True),
     (["train", "--data", "d", "--out", "r", "--verbose"], True)],
)  # fmt: skip
def test_verbose_goes_before_or_after_the_command(argv: list[str], want: bool) -> None:
    assert build_parser().parse_args(argv).verbose is want


def test_a_librarys_info_lines_stay_quiet() -> None:
    """A library's INFO record at exit is not printed (torch's FakeTensor cache statistics
    came after `interrupted` when Ctrl-C landed while torch imported); aftrec's own INFO
    lines (the epoch lines) are."""
    script = """
import atexit, logging, sys
from aftrec.cli import main

def at_exit():
    # a library's logger with no level or handler of its own (torch's, when Ctrl-C stopped
    # its import before its logging was set up)
    logging.getLogger("a_library.cache").info("cache stats:")
    logging.getLogger("aftrec.training.trainer").info("epoch 1/2")

atexit.register(at_exit)
sys.exit(main(["models"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "epoch 1/2\n", proc.stderr


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import aftrec

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"aftrec {aftrec.__version__}"


def test_prepared_directory(pipeline: Pipeline) -> None:
    data = pipeline.data
    assert {p.name for p in data.iterdir()} == PREPARED_FILES
    assert not list(data.parent.glob(".*tmp*"))
    meta = json.loads((data / "meta.json").read_text())
    assert meta["domains"] == sorted(DOMAINS)
    assert meta["n_users"] == N_USERS
    assert meta["n_items"] == len(DOMAINS) * ITEMS_PER_DOMAIN
    assert meta["source"]["kind"] == "generic"
    assert "prepared" in pipeline.prepare_stdout

    users = pd.read_parquet(data / "users.parquet")
    assert users["user"].tolist() == sorted(f"u{u}" for u in range(N_USERS))
    assert users["user_idx"].tolist() == list(range(N_USERS))
    items = pd.read_parquet(data / "items.parquet")
    assert items["item_idx"].tolist() == list(range(len(items)))
    offsets = meta["domain_offsets"]
    for d, name in enumerate(meta["domains"]):  # each domain one contiguous range
        block = items.iloc[offsets[d] : offsets[d + 1]]
        assert set(block["domain"]) == {name}
        assert all(i.startswith(f"{name}-") for i in block["item"])

    got = parts(data)
    for name, frame in got.items():
        assert sum(meta["counts"][name].values()) == len(frame)
        assert (frame["domain_idx"] == frame["domain"].map(meta["domains"].index)).all()
    every = pd.concat(got.values(), ignore_index=True)
    assert len(every) == len(pipeline.inter)
    assert pairs(every) == pairs(pipeline.inter)
    # chronological: each user's test positives come after all of their training ones
    last_train = got["train"].groupby("user")["timestamp"].max()
    first_test = got["test"].groupby("user")["timestamp"].min()
    assert (last_train.reindex(first_test.index) <= first_test).all()


def test_parquet_input_prepares_like_csv(pipeline: Pipeline, tmp_path: Path) -> None:
    ip = write(pipeline.inter, tmp_path / "inter.parquet")
    mp = write(pipeline.items, tmp_path / "items.parquet")
    out = tmp_path / "data"
    run_ok(["prepare", "--interactions", str(ip), "--items", str(mp), "--out", str(out)])
    for name in PREPARED_FILES - {"meta.json"}:
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / name), pd.read_parquet(pipeline.data / name)
        )
    meta, ref = (json.loads((d / "meta.json").read_text()) for d in (out, pipeline.data))
    for key in ("domains", "domain_offsets", "n_users", "n_items", "counts", "split"):
        assert meta[key] == ref[key]


@pytest.mark.parametrize(
    ("column", "flags", "rule"),
    [
        ("label", [], lambda f: f["label"] == 1),
        ("rating", [], lambda f: f["rating"] >= 3),
        ("rating", ["--rating-threshold", "4"], lambda f: f["rating"] >= 4),
        ("rating", ["--rating-threshold", "3.5"], lambda f: f["rating"] >= 3.5),
    ],
    ids=["label", "rating-default-3", "rating-4", "rating-3.5"],
)
def test_positive_rules(tmp_path: Path, column: str, flags: list[str], rule) -> None:
    inter, items = make_log(seed=1)
    inter = inter.drop(columns=[c for c in ("rating", "label") if c != column])
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    out = tmp_path / "data"
    run_ok(["prepare", "--interactions", str(ip), "--items", str(mp), "--out", str(out), *flags])
    every = pd.concat(parts(out).values(), ignore_index=True)
    expected = inter.loc[rule(inter)]
    assert 0 < len(expected) < len(inter)
    assert len(every) == len(expected)
    assert pairs(every) == pairs(expected)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize(
    ("column", "flags", "recorded", "note"),
    [
        ("label", ["--rating-threshold", "4"], None, "has a label column, and positives are "
         "rows with label > 0"),
        ("none", ["--rating-threshold", "4"], None, "has no rating column, so every row is a "
         "positive"),
        ("none", [], None, None),  # the default threshold, not asked for: no note
        ("rating", ["--rating-threshold", "4"], 4.0, None),
        ("rating", [], 3.0, None),
    ],
    ids=["label", "no-rating", "no-rating-default", "rating", "rating-default"],
)  # fmt: skip
def test_an_unused_rating_threshold_is_noted_and_not_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, streaming: bool, column: str,
    flags: list[str], recorded: float | None, note: str | None,
) -> None:  # fmt: skip
    """--rating-threshold was ignored without a word where no rating decides the positives,
    and meta.json recorded it as the split's threshold all the same."""
    inter, items = make_log(seed=1)
    inter = inter.drop(columns=[c for c in ("rating", "label") if c != column])
    ip, mp = write(inter, tmp_path / "inter.csv"), write(items, tmp_path / "items.csv")
    out = tmp_path / "data"
    caplog.set_level("INFO", logger="aftrec.data")
    run_ok(["prepare", "--interactions", str(ip), "--items", str(mp), "--out", str(out), *flags,
            *(["--streaming"] if streaming else [])])  # fmt: skip
    assert json.loads((out / "meta.json").read_text())["split"]["rating_threshold"] == recorded
    notes = [r.getMessage() for r in caplog.records if "--rating-threshold" in r.getMessage()]
    if note is None:
        assert notes == []
    else:
        assert notes == [f"note: --rating-threshold 4 had no effect: {ip} {note}"]


def split_by_hand(inter: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each user's last 2 rows in time -> test, the 2 before -> valid, the rest -> train."""
    inter = inter.sort_values(["user", "timestamp"], kind="stable")
    from_end = inter.groupby("user").cumcount(ascending=False)
    return {
        "train": inter.loc[from_end >= 4],
        "valid": inter.loc[(from_end >= 2) & (from_end < 4)],
        "test": inter.loc[from_end < 2],
    }


@pytest.mark.parametrize("with_valid", [False, True], ids=["no-valid", "valid"])
def test_presplit_is_used_as_given(tmp_path: Path, with_valid: bool) -> None:
    inter, items = make_log(seed=2)
    inter = inter.drop(columns="label")  # positives: rating >= 3
    given = split_by_hand(inter)
    paths = {name: write(frame, tmp_path / f"{name}.csv") for name, frame in given.items()}
    mp = write(items, tmp_path / "items.csv")
    argv = ["prepare", "--train", str(paths["train"]), "--test", str(paths["test"])]
    argv += ["--items", str(mp), "--out", str(tmp_path / "data")]
    if with_valid:
        argv += ["--valid", str(paths["valid"])]
    run_ok(argv)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["split"]["presplit"] is True
    got = parts(tmp_path / "data")
    positive = {name: frame.loc[frame["rating"] >= 3] for name, frame in given.items()}
    assert len(got["test"]) == len(positive["test"])
    assert pairs(got["test"]) == pairs(positive["test"])
    if with_valid:
        assert pairs(got["valid"]) == pairs(positive["valid"])
        assert pairs(got["train"]) == pairs(positive["train"])
    else:  # validation carved from the end of the given train part
        assert len(got["valid"]) > 0
        assert pairs(got["train"]) | pairs(got["valid"]) == pairs(positive["train"])
        assert not pairs(got["train"]) & pairs(got["valid"])


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("model", ["two-tower", "pop"])
def test_train_writes_a_complete_run(pipeline: Pipeline, model: str) -> None:
    run = pipeline.two_tower if model == "two-tower" else pipeline.pop
    names = {p.name for p in run.iterdir()}
    assert names >= RUN_FILES
    assert not [n for n in names if n.startswith(".")]  # no temp file left over

    cfg = resolve(None, run / "config.yaml")  # reloadable as a config file
    assert cfg.model_name == model
    assert cfg.train.epochs == 1
    assert cfg.train.max_batches_per_epoch == 3
    assert cfg.data.history_len == 5
    if model == "two-tower":
        assert (cfg.model.dim, cfg.model.hidden) == (8, 16)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(saved) == {"model", "data", "train"}
    assert {"lr", "batch_size", "seed", "patience"} <= set(saved["train"])  # resolved defaults

    meta = json.loads((run / "run.json").read_text())
    assert meta["model"] == model
    assert Path(meta["data"]) == pipeline.data.resolve()
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["epoch"] == (1 if model == "two-tower" else 0)


def test_resume_of_a_finished_run_does_not_train_again(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(run_copy)
    run_ok(["train", "--resume", "--out", str(run_copy), "--quiet"])
    assert digest(run_copy) == before
    assert "trained" in capsys.readouterr().out


def test_resume_of_a_finished_pop_run_does_not_train_again(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(pipeline.pop, tmp_path / "run"))
    before = digest(run)
    run_ok(["train", "--resume", "--out", str(run), "--quiet"])
    assert digest(run) == before


# --------------------------------------------------------------------------- evaluate


def test_evaluate_prints_a_table_and_writes_metrics(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_ok(["evaluate", "--run", str(run_copy), "--n", "10", "20", "--quiet"])
    out = capsys.readouterr().out
    assert "[test] full ranking" in out
    assert "recall@10" in out and "ndcg@20" in out and "auc" in out
    table_rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(DOMAINS) | {"average"} <= table_rows

    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert list(metrics) == ["split", "protocol", "domains", "average", "users"]
    assert metrics["split"] == "test"
    assert metrics["protocol"].startswith("full ranking")
    keys = {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "auc"}
    assert set(metrics["domains"]) == set(DOMAINS)
    for values in [*metrics["domains"].values(), metrics["average"]]:
        assert set(values) == keys
        assert all(0.0 <= v <= 1.0 for v in values.values())
    mean = np.mean([metrics["domains"][d]["recall@20"] for d in DOMAINS])
    assert metrics["average"]["recall@20"] == pytest.approx(mean)
    assert set(metrics["users"]) == set(DOMAINS)
    assert all(isinstance(n, int) and n > 0 for n in metrics["users"].values())

    per_user = pd.read_parquet(run_copy / "per_user.parquet")
    assert set(per_user["user"]) <= {f"u{u}" for u in range(N_USERS)}  # original ids
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]


def test_sampled_evaluation_is_labelled_and_kept_apart(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_ok(["evaluate", "--run", str(run_copy), "--n", "10", "20", "--quiet"])
    full = (run_copy / "metrics.json").read_bytes()
    capsys.readouterr()
    argv = ["evaluate", "--run", str(run_copy), "--n", "10", "20", "--quiet"]
    run_ok([*argv, "--sampled-negatives", "10"])
    assert "SAMPLED" in capsys.readouterr().out
    assert (run_copy / "metrics.json").read_bytes() == full
    sampled = json.loads((run_copy / "metrics_sampled10.json").read_text())
    assert "SAMPLED" in sampled["protocol"]
    assert set(sampled["domains"]["movie"]) == {
        "sampled_recall@10",
        "sampled_ndcg@10",
        "sampled_recall@20",
        "sampled_ndcg@20",
        "auc",
    }
    assert (run_copy / "per_user_sampled10.parquet").is_file()


# --------------------------------------------------------------------------- recommend


def read_recs(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"user": str, "item": str, "domain": str})
    return pd.read_parquet(path)


def check_lists(recs: pd.DataFrame, pipeline: Pipeline, n: int) -> None:
    """Original ids, ranks 1..n with falling scores, items of the row's domain, nothing seen."""
    assert list(recs.columns) == REC_COLUMNS
    catalogue = dict(zip(pipeline.items["item"], pipeline.items["domain"], strict=True))
    assert set(recs["user"]) <= {f"u{u}" for u in range(N_USERS)}
    assert (recs["item"].map(catalogue) == recs["domain"]).all()
    for _, group in recs.groupby(["user", "domain"]):
        assert group["rank"].tolist() == list(range(1, n + 1))
        assert group["score"].is_monotonic_decreasing
        assert group["item"].is_unique
    got = parts(pipeline.data)
    seen = pairs(got["train"]) | pairs(got["valid"])
    assert not pairs(recs) & seen


@pytest.mark.parametrize("model", ["two-tower", "pop"])
def test_recommend_writes_csv_and_parquet(
    pipeline: Pipeline, tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = pipeline.two_tower if model == "two-tower" else pipeline.pop
    frames = {}
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"recs{suffix}"
        run_ok(["recommend", "--run", str(run), "--n", "5", "--out", str(out)])
        frames[suffix] = read_recs(out)
        assert f"to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv", "recs.parquet"]
    csv, parquet = frames[".csv"], frames[".parquet"]
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False, atol=1e-5)
    check_lists(parquet, pipeline, 5)
    # default: every test user, in each domain where they have held-out positives
    test = parts(pipeline.data)["test"]
    wanted = set(zip(test["user"], test["domain"], strict=True))
    assert set(zip(parquet["user"], parquet["domain"], strict=True)) == wanted


def test_recommend_does_not_replace_a_file_of_a_dataset_or_a_run(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out data/train.parquet`` replaced the dataset's training part with the
    recommendations, ``--out RUN/best.pt`` the checkpoint; both are refused before any
    ranking, and the files are left as they were."""
    for out in (pipeline.data / "train.parquet", pipeline.two_tower / "best.pt"):
        before = hashlib.sha256(out.read_bytes()).hexdigest()
        argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "5", "--out", str(out)]
        assert main(argv) == 2
        assert "writing there would replace it" in capsys.readouterr().err
        assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_no_file_output_replaces_one_inside_a_bundle_study_or_run(
    pipeline: Pipeline,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nearest folder aftrec marks owns what lies below it: a bundle's ``ids/``, a
    study's ``trials.csv``, a run's other metrics files; a new file beside a run is fine."""
    bundle, study = tmp_path / "bundle", tmp_path / "study"
    (bundle / "ids").mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (bundle / "ids" / "items.parquet").write_bytes(b"ids")
    study.mkdir()
    (study / "study.db").write_bytes(b"")
    (study / "trials.csv").write_text("trial\n")
    (pipeline.two_tower / "per_user_valid.parquet").write_bytes(b"mine")
    owned = [bundle / "ids" / "items.parquet", study / "trials.csv",
             pipeline.two_tower / "per_user_valid.parquet"]  # fmt: skip
    for out in owned:
        before = out.read_bytes()
        argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "5", "--out", str(out)]
        assert main(argv) == 2
        assert "writing there would replace it" in capsys.readouterr().err
        assert out.read_bytes() == before
    (pipeline.two_tower / "per_user_valid.parquet").unlink()
    # a run's own subfolder, named from inside it: refused as well
    board = pipeline.two_tower / "tensorboard"
    made = not board.exists()
    board.mkdir(exist_ok=True)
    events = board / "events.csv"
    events.write_text("mine")
    monkeypatch.chdir(events.parent)
    argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "5", "--out", "events.csv"]
    assert main(argv) == 2 and events.read_text() == "mine"
    events.unlink()
    if made:
        board.rmdir()
    for mine in (pipeline.two_tower / "recs.csv", pipeline.two_tower / "recs" / "top.csv"):
        argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "2", "--out", str(mine)]
        assert main(argv) == 0 and main(argv) == 0  # written, then replaced: the user's own
        mine.unlink()


def test_no_new_file_goes_where_a_dataset_or_a_run_would_take_it_for_its_own(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new ``DATA/train/part-00000.parquet`` became a part of the dataset (and changed its
    fingerprint, so every run on it was refused); a new ``RUN/per_user_valid.parquet`` or
    ``RUN/tensorboard/x.csv`` is a name the run writes itself."""
    for out in (pipeline.data / "train" / "part-00000.parquet",
                pipeline.two_tower / "per_user_valid.parquet",
                pipeline.two_tower / "tensorboard" / "x.csv"):  # fmt: skip
        assert not out.exists()
        argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "5", "--out", str(out)]
        assert main(argv) == 2
        assert "or would be taken for one" in capsys.readouterr().err
        assert not out.exists()
    assert not (pipeline.data / "train").exists()


def test_export_force_keeps_files_put_into_a_bundles_folders(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--force`` replaces a bundle; a file someone put into its ``ids/`` or ``index/``
    (not only its top level) is not the bundle's, and was deleted with it."""
    bundle = tmp_path / "bundle"
    argv = ["export", "--run", str(pipeline.two_tower), "--out", str(bundle)]
    assert main(argv) == 0
    notes = bundle / "index" / "NOTES.txt"
    notes.write_text("mine")
    assert main([*argv, "--force"]) == 2
    assert "index/NOTES.txt" in capsys.readouterr().err and notes.read_text() == "mine"
    notes.unlink()
    assert main([*argv, "--force"]) == 0
    # a bundle whose manifest cannot be read: its own files' names tell them apart
    (bundle / "manifest.json").write_text("{damaged")
    notes.write_text("mine")
    assert main([*argv, "--force"]) == 2
    assert "index/NOTES.txt" in capsys.readouterr().err and notes.read_text() == "mine"
    notes.unlink()
    assert main([*argv, "--force"]) == 0


def test_a_link_to_a_datasets_folder_is_the_dataset(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    parts = tmp_path / "parts"
    parts.symlink_to(pipeline.data / "train", target_is_directory=True)
    out = parts / "part-00001.parquet"
    argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "5", "--out", str(out)]
    assert main(argv) == 2
    assert "or would be taken for one" in capsys.readouterr().err
    assert not (pipeline.data / "train").exists()


def test_sigterm_ends_a_command_through_its_cleanup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """SIGTERM during an output being built: exit 143, one line, no temporary folder left,
    and the process's own handler back afterwards."""
    from aftrec.outputs import atomic_directory

    def killed(out: Path, **kwargs: object) -> Path:
        with atomic_directory(Path(out)) as tmp:
            (tmp / "part").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise AssertionError("not stopped")

    monkeypatch.setattr(api, "prepare", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "d")]) == 143
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_recommend_selected_users_and_domains(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "recs.parquet"
    argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "3", "--out", str(out)]
    run_ok([*argv, "--users", "u17", "u3", "--domains", "music", "movie"])
    recs = read_recs(out)
    check_lists(recs, pipeline, 3)
    got = set(zip(recs["user"], recs["domain"], strict=True))
    assert got == {(u, d) for u in ("u17", "u3") for d in ("music", "movie")}

    run_ok([*argv, "--users", "u5"])  # chosen users, every domain
    assert set(read_recs(out)["domain"]) == set(DOMAINS)
    run_ok([*argv, "--domains", "book"])  # chosen domain, every test user
    recs = read_recs(out)
    assert set(recs["domain"]) == {"book"}
    assert set(recs["user"]) == set(parts(pipeline.data)["test"]["user"])


def test_recommend_lists_a_repeated_user_or_domain_once(pipeline: Pipeline, tmp_path: Path) -> None:
    """Users were taken once each, domains as often as given: every row came twice."""
    out = tmp_path / "recs.parquet"
    argv = ["recommend", "--run", str(pipeline.two_tower), "--n", "2", "--out", str(out)]
    run_ok([*argv, "--users", "u3", "u3", "--domains", "music", "movie", "music"])
    recs = read_recs(out)
    check_lists(recs, pipeline, 2)  # ranks 1, 2 once per (user, domain)
    assert recs["domain"].drop_duplicates().tolist() == ["music", "movie"]  # in the order given


def test_a_torchrun_rank_keeps_the_default_sigterm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under torchrun a Python handler would wait for the C++ call under way (a rank waiting
    for its peers would never stop); the rank keeps SIGTERM's default action."""
    seen: list[Any] = []

    def look(out: Path, **kwargs: object) -> Path:
        seen.append(signal.getsignal(signal.SIGTERM))
        return Path(out)

    monkeypatch.setattr(api, "prepare", look)
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "d")])
    monkeypatch.setenv("WORLD_SIZE", "1")
    main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "d")])
    assert seen[0] == signal.SIG_DFL and seen[1] not in (signal.SIG_DFL, None)


def test_ctrl_c_inside_a_first_import_is_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C inside a C extension's init (matplotlib's, as a report draws its first plot)
    surfaces as an ImportError whose context is the KeyboardInterrupt: a traceback before."""
    import aftrec.cli as cli

    def interrupted_import(args: argparse.Namespace) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    _models_command(monkeypatch).set_defaults(func=interrupted_import)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def _models_command(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """``aftrec models``' parser within the parser ``cli.main`` builds, for a test to give
    it another ``func``."""
    import aftrec.cli as cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    models: argparse.ArgumentParser = commands.choices["models"]
    return models


def _chained(interrupt: bool) -> RuntimeError:
    """torch's error for a Ctrl-C during its import: a RuntimeError caused by the error
    ``__set_name__`` raised while the interrupt was handled (or, without ``interrupt``, by
    another error)."""
    try:
        try:
            raise KeyboardInterrupt if interrupt else ValueError("a bug")
        except BaseException:
            raise TypeError("descriptor") from None
    except TypeError as exc:
        error = RuntimeError("Error calling __set_name__ on '_Descriptor' instance")
        error.__cause__ = exc
        return error


@pytest.mark.parametrize("where", ["command", "parser"])
def test_an_error_with_ctrl_c_down_its_chain_is_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """A Ctrl-C during torch's import surfaced as ``RuntimeError: Error calling __set_name__``
    with a traceback; an error without an interrupt behind it keeps its traceback."""
    import aftrec.cli as cli

    def failing(*args: Any) -> Any:
        raise _chained(interrupt)

    if where == "parser":
        monkeypatch.setattr(cli, "build_parser", failing)
    else:
        _models_command(monkeypatch).set_defaults(func=failing)
    interrupt = True
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    interrupt = False
    with pytest.raises(RuntimeError, match="__set_name__"):
        cli.main(["models"])


def test_a_stop_down_an_errors_chain_is_a_stop_and_an_aftrec_error_says_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM inside a module's first import wraps the stop as Ctrl-C's is wrapped: the
    command ends as stopped (143), not with a traceback. An aftrec error raised while a
    Ctrl-C was handled keeps its one line."""
    import signal

    import aftrec.cli as cli
    from aftrec.errors import OutputError, Stopped

    def stopped_import(*args: Any) -> Any:
        try:
            raise Stopped(signal.SIGTERM)
        except Stopped as exc:
            raise RuntimeError("Error calling __set_name__ on '_Descriptor' instance") from exc

    def failing_on_ctrl_c(*args: Any) -> Any:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OutputError("cannot write OUT: No space left on device") from None

    models = _models_command(monkeypatch)
    models.set_defaults(func=stopped_import)
    assert cli.main(["models"]) == 143
    assert capsys.readouterr().err == "stopped by SIGTERM\n"
    models.set_defaults(func=failing_on_ctrl_c)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "error: cannot write OUT: No space left on device\n"


def test_a_standard_output_that_cannot_be_written_is_one_line() -> None:
    """``aftrec models > /dev/full`` was an OSError traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "aftrec.cli", "models"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "error: cannot write to standard output: No space left on device\n"


def test_the_last_checkpoint_is_evaluated_beside_the_best_one(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--which last`` replaced ``metrics.json``, which reproduce reads as the best
    checkpoint's."""
    run = pipeline.two_tower
    best = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    assert main(["evaluate", "--run", str(run), "--n", "5", "--which", "last"]) == 0
    assert f"wrote {run / 'metrics_last.json'}" in capsys.readouterr().out
    assert (run / "per_user_last.parquet").is_file()
    if best is not None:
        assert (run / "metrics.json").read_bytes() == best
    (run / "metrics_last.json").unlink()
    (run / "per_user_last.parquet").unlink()
