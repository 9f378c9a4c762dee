"""Train and evaluate models on the ML-1M preset over several seeds; mean and std per domain.

Run: ``python benchmarks/quality_ml1m.py --models pop ease two-tower --seeds 0 1 2``
(prepares data/ml-1m if missing; runs go to runs/quality/MODEL/seedS and are resumed /
skipped when finished; the summary goes to benchmarks/results/quality_ml1m.json and .md).
Deterministic models (pop, ease) are run once. Extra ``--set`` overrides apply to every model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine

DETERMINISTIC = {"pop", "ease"}
KEYS = ("recall@20", "recall@50", "auc")


def aftrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "aftrec.cli", *args], check=True)


def run_one(data: Path, model: str, seed: int, root: Path, overrides: list[str]) -> dict:
    run = root / model / f"seed{seed}"
    metrics = run / "metrics.json"
    if not metrics.exists():
        started = time.perf_counter()
        if (run / "last.pt").exists():
            aftrec("train", "--out", str(run), "--resume", "--quiet")
        else:
            aftrec("train", "--data", str(data), "--model", model, "--out", str(run), "--quiet",
                   "--set", f"train.seed={seed}", *overrides)  # fmt: skip
        aftrec("evaluate", "--run", str(run), "--n", "20", "50", "200", "--quiet")
        (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    out = json.loads(metrics.read_text())
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    best_epoch = max(log, key=lambda e: next(v for k, v in e.items() if k.startswith("valid_")))
    out["best_epoch"] = best_epoch.get("epoch", 0)
    wall = run / "wall_seconds.txt"
    out["wall_seconds"] = float(wall.read_text()) if wall.exists() else None
    return out


def summarise(per_seed: dict[str, list[dict]]) -> tuple[dict, str]:
    summary: dict = {}
    domains = list(next(iter(per_seed.values()))[0]["domains"])
    header = "| model | seeds | " + " | ".join(
        f"{d} {k}" for d in [*domains, "average"] for k in KEYS) + " |"  # fmt: skip
    lines = [header, "|" + "---|" * (2 + len(KEYS) * (len(domains) + 1))]
    for model, runs in per_seed.items():
        row, cells = {}, []
        for d in [*domains, "average"]:
            for k in KEYS:
                vals = [r["average"][k] if d == "average" else r["domains"][d][k] for r in runs]
                mean = statistics.fmean(vals)
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[f"{d}/{k}"] = {"mean": mean, "std": std, "values": vals}
                cells.append(f"{mean:.4f} ± {std:.4f}")
        summary[model] = row
        lines.append(f"| {model} | {len(runs)} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--models", nargs="+", default=["pop", "ease", "two-tower"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument(
        "--name",
        default="quality_ml1m",
        help="stem of the summary files written to benchmarks/results/",
    )
    args = parser.parse_args()
    if not (args.data / "meta.json").exists():
        aftrec("prepare", "--dataset", "ml-1m", "--out", str(args.data))
    per_seed = {}
    for model in args.models:
        seeds = args.seeds[:1] if model in DETERMINISTIC else args.seeds
        per_seed[model] = [run_one(args.data, model, s, args.root, args.overrides) for s in seeds]
    summary, table = summarise(per_seed)
    extras = {
        m: {
            "best_epochs": [r["best_epoch"] for r in rs],
            "wall_seconds": [r["wall_seconds"] for r in rs],
        }
        for m, rs in per_seed.items()
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"machine": machine(), "command": " ".join(sys.argv), "summary": summary,
         "runs": extras}, indent=2) + "\n")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
