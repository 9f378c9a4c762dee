"""What a run prints: one readable line per epoch, no progress bar without a terminal; the
full record stays in ``log.jsonl``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from aftrec.training.trainer import epoch_line
from tests.conftest import FAST

ENTRY = {
    "epoch": 3,
    "loss": 0.85712,
    "ranks": 1,
    "peak_rss_mib": [614.5],
    "valid_recall@50": 0.67309,
    "examples_per_second": 3168.4,
    "train_seconds": 140.2,
    "valid_seconds": 12.6,
}


def test_epoch_line_reads_like_the_issue() -> None:
    line = epoch_line(ENTRY, ["loss"], 20, "recall@50", best=True)
    assert line == "epoch 3/20  loss 0.857  valid r@50 0.673 (best)  3,168 ex/s  153 s"
    short = {**ENTRY, "train_seconds": 1.21, "valid_seconds": 0.3, "valid_ndcg@20": 0.5}
    assert epoch_line(short, [], 20, "ndcg@20", best=False) == (
        "epoch 3/20  valid ndcg@20 0.500  3,168 ex/s  1.5 s"
    )
    assert "valid" not in epoch_line(ENTRY, ["loss"], 20, None, best=True)  # no valid part


def test_epoch_line_keeps_two_of_gs_health_figures() -> None:
    entry = {
        **ENTRY,
        "loss_d": 0.61,
        "loss_g": -0.000123,
        "health": {"distinct_share_min": 0.8612, "advantage_abs": 0.0678, "fn_rate": 0.1},
    }
    line = epoch_line(entry, ["loss_d", "loss_g"], 20, "recall@50", best=False)
    assert line == (
        "epoch 3/20  loss_d 0.610  loss_g -0.000123  valid r@50 0.673  3,168 ex/s  153 s"
        "  G distinct fakes 0.86 (least domain)  |Q-b| 0.068"
    )


def test_without_a_terminal_one_line_per_epoch_and_no_bar(tiny_dir: Path, tmp_path: Path) -> None:
    """The real entry point, stderr a pipe (as under CI or ``> log``), bars not turned off."""
    run = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, "-m", "aftrec.cli", "train", "--data", str(tiny_dir), "--model",
         "two-tower", "--out", str(run), "--set", *FAST, "train.threads=1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "\r" not in proc.stderr  # no tqdm updates
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr  # epochs=2 in FAST: nothing else on stderr
    for k, line in enumerate(lines, start=1):
        pattern = rf"epoch {k}/2  loss \d\.\d{{3}}  valid r@50 \d\.\d{{3}}( \(best\))?"
        pattern += r"  [\d,]+ ex/s  \d+\.\d s"
        assert re.fullmatch(pattern, line), line
    entries = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2]
    assert {"loss", "valid_recall@50", "examples_per_second", "peak_rss_mib"} <= set(entries[0])
    assert proc.stdout.startswith(f"trained {run}: best epoch")
