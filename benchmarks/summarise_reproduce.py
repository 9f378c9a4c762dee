"""A compact summary of an ``aftrec reproduce`` report for BENCHMARKS.md.

Reads REPORT_DIR/results.json (written by ``aftrec reproduce``, also with ``--report-only``)
and prints one row per table row of the report: the seeds finished, average Recall@20,
Recall@50 and AUC (mean ± std over the finished seeds), and the wall time per run (train with
its validations, then the test evaluation).

With ``--convergence`` (for runs trained to early stopping) it adds each row's best
validation epoch per seed, the epochs run, the wall seconds of training and validation up to
the best epoch (mean over seeds, from each run's log.jsonl) and that time as a multiple of the
``two-tower`` row's, and the seconds of all epochs run. A run resumed by a later invocation
counts only that invocation in "train s / run" (its reproduce.json); the log columns count
every epoch.

Run: ``python benchmarks/summarise_reproduce.py results/ml-1m``; writes
benchmarks/results/reproduce_ml1m.md unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import RESULTS
from aftrec.errors import AftrecError
from aftrec.experiments.report import format_cell
from aftrec.experiments.results import Cell, finished, is_variant, load_results
from aftrec.training.rundir import best_epoch_time, epoch_log

KEYS = ("recall@20", "recall@50", "auc")


def cell(values: list[float]) -> str:
    return format_cell(Cell.of(values))


def seconds_text(values: list[float]) -> str:
    return f"{statistics.fmean(values):,.0f}" if values else "–"


def convergence(results: dict) -> dict[str, list[str]]:
    """Per row: best epoch / epochs run of each seed, mean seconds to the best epoch, its
    ratio to the two-tower's, and mean seconds over all epochs run (training and validation,
    summed over the log, so also across resumed invocations); "–" for rows without epoch logs
    (EASE, popularity)."""
    best: dict[str, tuple[str, list[float], list[float]]] = {}
    for key, entry in results["entries"].items():
        runs = [Path(s["run"]) for s in finished(entry)]
        epochs, to_best, total = [], [], []
        for run in runs:
            epoch, seconds = best_epoch_time(run)
            log = epoch_log(run)
            if epoch:
                epochs.append(f"{epoch}/{len(log)}")
            if seconds is not None:
                to_best.append(seconds)
                total.append(sum(e["train_seconds"] + e["valid_seconds"] for e in log))
        best[key] = (", ".join(epochs) or "–", to_best, total)
    base = best.get("two-tower", ("", [], []))[1]
    out = {}
    for key, (epochs, to_best, total) in best.items():
        ratio = (
            f"{statistics.fmean(to_best) / statistics.fmean(base):.1f}x"
            if to_best and base
            else "–"
        )
        out[key] = [epochs, seconds_text(to_best), ratio, seconds_text(total)]
    return out


def summarise(results: dict, main_only: bool = False, converged: bool = False) -> list[str]:
    head = "| row | seeds | avg r@20 | avg r@50 | avg AUC | train s / run | test eval s / run |"
    extra = convergence(results) if converged else {}
    if converged:
        head += " best epoch / epochs run | s to best epoch | vs two-tower | s all epochs |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    rows = []
    for key, entry in results["entries"].items():
        if main_only and is_variant(key):
            continue
        done = finished(entry)
        values = {k: [s["metrics"]["average"][k] for s in done] for k in KEYS}
        train = [s["train_seconds"] for s in done if s["train_seconds"] is not None]
        evals = [s["eval_seconds"] for s in done if s["eval_seconds"] is not None]
        seeds = (
            "1 (deterministic)" if entry["deterministic"] else f"{len(done)}/{len(entry['seeds'])}"
        )
        mean50 = statistics.fmean(values["recall@50"]) if done else float("-inf")
        per_run = [seconds_text(t) for t in (train, evals)]
        cells = [f"`{key}`", seeds, *(cell(values[k]) for k in KEYS), *per_run]
        row = " | ".join(cells + extra.get(key, []))
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
    ap.add_argument(
        "--convergence",
        action="store_true",
        help="add best epochs, wall time to the best epoch and its ratio to the two-tower's",
    )
    args = ap.parse_args()
    try:
        results = load_results(args.report_dir)
    except AftrecError as exc:
        ap.error(str(exc))
    text = "\n".join(
        [
            f"`{results['command']}` (rows by average Recall@50)",
            "",
            *summarise(results, args.main_only, args.convergence),
        ]
    )
    args.out.write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
