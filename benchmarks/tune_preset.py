"""The converged, tuned comparison, step 1: the tuning study of every model on one preset, two
studies at a time.

Run: ``python benchmarks/tune_preset.py --data data/ml-100k --out results/ml-100k-tuned
--trials 12 --jobs 2 --set train.epochs=30`` (each study is ``aftrec tune --data DATA --model
M --out OUT/M --trials N --seed 0 --set train.threads=1 ...``, its output in ``OUT/M.log``).

Resumable: ``aftrec tune`` keeps each study in ``OUT/M/study.db`` and finishes an interrupted
trial first, so the same command, run again after a stop, goes on where it stopped; a study
that already has its trials trains nothing. The models run in the order given, by default
fastest first (the per-run hours of ``benchmarks/results/budget_plan.md``), so that a sitting
cut short leaves whole studies rather than many half ones. Prints one line per study started
and finished, and a Markdown table of the studies at the end (``--summary`` prints the table
alone, training nothing); both also draw every study's trials in one figure, ``OUT/studies.png``
(:func:`aftrec.experiments.tune.study_plot`).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

#: fastest first on ML-100K by benchmarks/results/budget_plan.md (hours per converged run)
ORDER = [
    "pop", "ease", "fm-single", "afm-single", "two-tower", "fm-multi", "shared-bottom",
    "mmoe", "afm-multi", "snr", "aft-d", "aft-hnm", "autoint-single", "aft", "autoint-multi",
    "aft-paper", "bert4rec-single", "sasrec", "atrank",
]  # fmt: skip


def summary(out: Path, budget: int) -> list[str]:
    """A Markdown table of the studies in ``out``: trials done of ``budget`` (one for a model
    with nothing to search), failed ones,
    trials that hit the epoch cap, the best validation value and settings, and the trials'
    summed training time (one thread each)."""
    head = "| model | trials | failed | at the epoch cap | best valid r@50 (trial) | CPU min |"
    lines = [head + " best settings |", "|---|---|---|---|---|---|---|"]
    for best in sorted(out.glob("*/best.json")):
        b = json.loads(best.read_text())
        rows = list(csv.DictReader((best.parent / "trials.csv").open()))
        done = [r for r in rows if r["state"] == "complete"]
        sets = dict(pair.split("=", 1) for pair in b.get("set", []))
        cap = int(sets.get("train.epochs", 20))  # the trainer's default cap
        capped = sum(int(r["epochs"] or 0) >= cap and r["stopped_early"] == "False" for r in done)
        minutes = sum(float(r["seconds"] or 0) for r in rows) / 60
        settings = " ".join(f"`{o}`" for o in b.get("overrides", [])) or "–"
        lines.append(
            f"| {best.parent.name} | {len(done)} / {budget if b.get('space') else 1} | "
            f"{b['failed']} | {capped} | "
            f"{b['best_value']:.4f} ({b['best_trial']}) | {minutes:.0f} | {settings} |"
        )
    return lines


def plot(out: Path) -> Path | None:
    """Every study's trials in ``out``, one panel each, as ``out/studies.png`` (None: no study
    has a finished trial yet)."""
    from aftrec.experiments.tune import study_plot, study_startup, trial_points

    dirs = [b.parent for b in sorted(out.glob("*/best.json"))]
    studies = {d.name: trial_points(d) for d in dirs}
    startup = {d.name: study_startup(d) for d in dirs}
    path = out / "studies.png"
    return path if study_plot(studies, startup, "valid recall@50", path) else None


def report(out: Path, budget: int) -> None:
    print("\n".join(summary(out, budget)))
    path = plot(out)
    if path is not None:
        print(f"\n![every study's trials]({path})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="the prepared dataset (not with --summary)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=ORDER)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summary", action="store_true", help="print the table of OUT only")
    args = parser.parse_args()
    if args.summary:
        report(args.out, args.trials)
        return
    if args.data is None:
        parser.error("--data is required to run the studies (--summary alone reads OUT)")
    if not (args.data / "meta.json").is_file():
        sys.exit(f"error: {args.data} is not a prepared dataset (no meta.json)")
    args.out.mkdir(parents=True, exist_ok=True)
    queue = list(args.models)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    failed = []
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                model = queue.pop(0)
                cmd = [
                    sys.executable, "-m", "aftrec", "tune", "--data", str(args.data),
                    "--model", model, "--out", str(args.out / model),
                    "--trials", str(args.trials), "--seed", str(args.seed),
                    "--set", "train.threads=1", *args.set,
                ]  # fmt: skip
                log = (args.out / f"{model}.log").open("ab")
                running[model] = (subprocess.Popen(cmd, stdout=log, stderr=log), time.time())
                print(f"{time.strftime('%H:%M:%S')} start {model}", flush=True)
            time.sleep(2)
            for model, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[model]
                state = "done" if proc.returncode == 0 else f"exit {proc.returncode}"
                if proc.returncode:
                    failed.append(model)
                minutes = (time.time() - t0) / 60
                now = time.strftime("%H:%M:%S")
                print(f"{now} {state} {model} ({minutes:.1f} min)", flush=True)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
        sys.exit("interrupted: run the same command again to go on")
    report(args.out, args.trials)
    if failed:
        sys.exit(f"error: studies that failed (see OUT/MODEL.log): {', '.join(failed)}")


if __name__ == "__main__":
    main()
