"""Would an Optuna pruner have saved tuning time, and at what cost? A replay of finished studies.

Run: ``python benchmarks/prune_check.py --studies results/ml-100k-tuned`` (writes
benchmarks/results/prune_check.json and .md). ``aftrec tune`` trains every trial to early
stopping. A pruner stops a trial whose validation curve falls behind the earlier trials'.
This script replays each finished study's trials, in their order, through Optuna's own
:class:`optuna.pruners.MedianPruner` (and, with ``--percentile``, a ``PercentilePruner``):

* each trial reports its validation value after every epoch (``log.jsonl``), as a pruned
  ``aftrec tune`` would through ``trial.report``;
* the pruner's ``should_prune`` decides after each epoch; a pruned trial's later epochs are
  the CPU time a pruner would have saved (each epoch's training and validation seconds);
* the trial the study chose (its best validation value) is marked when it would have been
  pruned: a study that prunes its winner picks other settings.

The replay keeps the trials the study drew. With pruning, TPE's draws after the random start
(10 trials) would have seen pruned trials and could differ, so the figures are for the
trials as drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import optuna

from _common import RESULTS, write

METRIC = "valid_recall@50"


def curves(study: Path) -> list[list[dict[str, float]]]:
    """Each finished trial's epochs (validation value and seconds), in trial order."""
    out = []
    for log in sorted((study / "trials").glob("*/log.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        epochs = [
            {"value": r[METRIC], "seconds": r.get("train_seconds", 0) + r.get("valid_seconds", 0)}
            for r in rows
            if METRIC in r
        ]
        if epochs:
            out.append(epochs)
    return out


def replay(trials: list[list[dict[str, float]]], pruner: optuna.pruners.BasePruner) -> dict:
    """The trials through ``pruner``: which are pruned, at which epoch, the seconds saved."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    pruned: dict[int, int] = {}
    saved = 0.0
    for number, epochs in enumerate(trials):
        trial = study.ask()
        best = float("-inf")
        for epoch, e in enumerate(epochs):
            trial.report(e["value"], epoch)
            best = max(best, e["value"])
            if trial.should_prune():
                pruned[number] = epoch + 1
                saved += sum(x["seconds"] for x in epochs[epoch + 1 :])
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, best)
    total = sum(e["seconds"] for t in trials for e in t)
    winner = max(range(len(trials)), key=lambda n: max(e["value"] for e in trials[n]))
    kept = [n for n in range(len(trials)) if n not in pruned]
    new_best = max(kept, key=lambda n: max(e["value"] for e in trials[n])) if kept else None
    return {
        "trials": len(trials),
        "pruned": {str(k): v for k, v in pruned.items()},
        "cpu_minutes": round(total / 60, 1),
        "saved_minutes": round(saved / 60, 1),
        "winner": winner,
        "winner_pruned": winner in pruned,
        "best_value": max(e["value"] for e in trials[winner]),
        "best_value_with_pruner": (
            None if new_best is None else max(e["value"] for e in trials[new_best])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=Path, default=Path("results/ml-100k-tuned"))
    parser.add_argument("--startup", type=int, default=4, help="trials before any pruning")
    parser.add_argument("--warmup", type=int, default=3, help="epochs before a trial is pruned")
    parser.add_argument("--budget", type=int, default=12, help="trials of a finished study")
    parser.add_argument("--name", default="prune_check")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=args.startup, n_warmup_steps=args.warmup)
    studies = {}
    for study in sorted(p.parent for p in args.studies.glob("*/best.json")):
        best = json.loads((study / "best.json").read_text())
        if best["complete"] + best["failed"] < args.budget:
            continue  # a study still running
        trials = curves(study)
        if len(trials) < 2 or not sum(e["seconds"] for t in trials for e in t):
            continue  # nothing tuned (pop), or a closed-form fit (EASE): nothing to prune
        studies[study.name] = r = replay(trials, pruner)
        mark = "  WINNER PRUNED" if r["winner_pruned"] else ""
        print(
            f"{study.name:16s} {r['trials']:2d} trials  {r['cpu_minutes']:7.1f} CPU min, "
            f"{r['saved_minutes']:6.1f} saved  pruned {sorted(map(int, r['pruned']))}{mark}"
        )
    total = sum(r["cpu_minutes"] for r in studies.values())
    saved = sum(r["saved_minutes"] for r in studies.values())
    lost = [n for n, r in studies.items() if r["winner_pruned"]]
    print(
        f"in all: {total:.0f} CPU min, {saved:.0f} saved ({saved / total:.0%}); "
        f"winner pruned: {lost}"
    )
    command = " ".join(["python benchmarks/prune_check.py", *sys.argv[1:]])
    payload: dict[str, Any] = {
        "command": command,
        "pruner": f"MedianPruner(n_startup_trials={args.startup}, n_warmup_steps={args.warmup})",
        "optuna": optuna.__version__,
        "cpu_minutes": round(total, 1),
        "saved_minutes": round(saved, 1),
        "studies": studies,
    }
    write(args.name, payload)
    lines = [
        f"# Pruning replayed on finished studies ({payload['pruner']})", "", f"`{command}`", "",
        "| study | trials | CPU min | saved by pruning | pruned trials (at epoch) | "
        "best valid r@50 | with the pruner |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in studies.items():
        at = ", ".join(f"{k} ({v})" for k, v in r["pruned"].items()) or "none"
        with_p = r["best_value_with_pruner"]
        lines.append(
            f"| {name} | {r['trials']} | {r['cpu_minutes']} | {r['saved_minutes']} | {at} | "
            f"{r['best_value']:.4f} (trial {r['winner']}) | "
            + ("–" if with_p is None else f"{with_p:.4f}")
            + (" (winner pruned)" if r["winner_pruned"] else "")
            + " |"
        )
    lines += ["", f"In all: {total:.0f} CPU min, {saved:.0f} saved ({saved / total:.0%})."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("wrote", RESULTS / f"{args.name}.md")


if __name__ == "__main__":
    main()
