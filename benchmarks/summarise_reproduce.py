"""A compact summary of an ``aftrec reproduce`` report for BENCHMARKS.md.

Reads REPORT_DIR/results.json (written by ``aftrec reproduce``, also with ``--report-only``)
and prints one row per table row of the report: the seeds finished, average Recall@20,
Recall@50 and AUC (mean ± std over the finished seeds), and the wall time per run (train with
its validations, then the test evaluation).

Run: ``python benchmarks/summarise_reproduce.py results/ml-1m``; writes
benchmarks/results/reproduce_ml1m.md unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS

KEYS = ("recall@20", "recall@50", "auc")


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def finished(entry: dict) -> list[dict]:
    """The finished seeds of a report row; one run stands for every seed of a deterministic one."""
    done = [s for s in entry["seeds"].values() if s["ok"] and s["metrics"]]
    return done[:1] if entry["deterministic"] else done


def is_main_row(key: str) -> bool:
    return "/" not in key  # "aft/no-mask", "aft/fakes-3": an ablation or sweep point of aft


def summarise(results: dict, main_only: bool = False) -> list[str]:
    lines = [
        "| row | seeds | avg r@20 | avg r@50 | avg AUC | train s / run | test eval s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key, entry in results["entries"].items():
        if main_only and not is_main_row(key):
            continue
        done = finished(entry)
        values = {k: [s["metrics"]["average"][k] for s in done] for k in KEYS}
        train = [s["train_seconds"] for s in done if s["train_seconds"] is not None]
        evals = [s["eval_seconds"] for s in done if s["eval_seconds"] is not None]
        seeds = (
            "1 (deterministic)" if entry["deterministic"] else f"{len(done)}/{len(entry['seeds'])}"
        )
        mean50 = statistics.fmean(values["recall@50"]) if done else float("-inf")
        per_run = [f"{statistics.fmean(t):,.0f}" if t else "–" for t in (train, evals)]
        row = " | ".join([f"`{key}`", seeds, *(cell(values[k]) for k in KEYS), *per_run])
        rows.append((mean50, f"| {row} |"))
    lines += [row for _, row in sorted(rows, key=lambda r: -r[0])]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "reproduce_ml1m.md")
    ap.add_argument(
        "--main-only", action="store_true", help="the models only, no ablations or sweep points"
    )
    args = ap.parse_args()
    results = json.loads((args.report_dir / "results.json").read_text())
    text = "\n".join(
        [
            f"`{results['command']}` (rows by average Recall@50)",
            "",
            *summarise(results, args.main_only),
        ]
    )
    args.out.write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
