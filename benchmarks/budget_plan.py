"""The CPU budget of the converged, tuned comparison, estimated before spending it.

For every registered model: its training speed (median examples/s over the epochs of a
measured run, one torch thread per run, two runs at a time), the examples of one epoch of
each preset (rows of ``train.parquet``), and the epochs a converged run takes (the mean of
the early-stopped runs found, else ``--default-epochs``). Then, per preset:

    run hours    = epochs x examples per epoch / (examples/s x 3600)
    final hours  = run hours x seeds (x ablation and sweep points for AFT)
    tuning hours = run hours x trials             (only for the presets of --tune-on)

and the total in CPU hours, and in wall hours at ``--jobs`` runs at a time. Validation and
test ranking are left out (seconds per epoch on these presets). Deterministic models (pop,
EASE) count one run of their fit time.

Run::

    python benchmarks/budget_plan.py --data data/ml-100k data/ml-1m \\
        --speed results/ml-1m --converged results/ml-100k-tau4 results/ml-1m-tau4 \\
        --trials 12 --out benchmarks/results/budget_plan.md

Speeds come from the runs in ``--speed`` (a reproduce folder, one run per model, or a tuning
folder, every trial of each model); a model with several measured folders takes the fastest
folder's median, so an estimate errs long
rather than short only where every measurement shared the cores with other work.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from aftrec.experiments.plan import ABLATIONS as PLAN_ABLATIONS
from aftrec.experiments.plan import MASK_RATIOS, N_FAKES, default_models

# what the comparison asks per preset: seeds of every model, of the AFT rows, of ablations and
# sweeps
PLAN = {
    "ml-100k": {"seeds": 5, "aft_seeds": 5, "variant_seeds": 3},
    "ml-1m": {"seeds": 3, "aft_seeds": 5, "variant_seeds": 0},
}
AFT_ROWS = ("aft", "aft-d", "aft-hnm", "aft-paper")
ABLATIONS = len(PLAN_ABLATIONS)
# Fig. 3's points that are runs of their own: the default's mask ratio and number of fakes
# are `aft` itself, and mask ratio 0 is the "- domain-specific mask" ablation
SWEEP_POINTS = len(MASK_RATIOS) + len(N_FAKES) - 3
DETERMINISTIC = ("pop", "ease")


@dataclass
class Model:
    name: str
    examples_per_second: float | None
    epochs: dict[str, float]  # preset -> epochs of a converged run
    measured_epochs: dict[str, int]  # preset -> runs the epochs came from


def _logs(run: Path) -> list[dict[str, float]]:
    log = run / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def speed(folders: list[Path]) -> dict[str, float]:
    """Model -> median examples/s, the fastest over ``folders``: of its seed-0 run in a
    reproduce folder, or over every epoch of its trials in a tuning folder
    (``benchmarks/tune_preset.py``'s ``OUT/MODEL/trials/NNN``)."""
    found: dict[str, float] = {}
    for folder in folders:
        runs = [(r.parent.name, r) for r in sorted((folder / "runs").glob("*/seed0"))]
        runs += [(r.parent.parent.name, r) for r in sorted(folder.glob("*/trials/*"))]
        rates: dict[str, list[float]] = {}
        for name, run in runs:
            seen = [e["examples_per_second"] for e in _logs(run) if e.get("examples_per_second")]
            rates.setdefault(name, []).extend(seen)
        for name, seen in rates.items():
            if seen:
                found[name] = max(found.get(name, 0.0), statistics.median(seen))
    return found


def epochs(folders: list[Path]) -> dict[str, dict[str, list[int]]]:
    """Preset -> model -> epochs run by each finished, early-stopped run."""
    out: dict[str, dict[str, list[int]]] = {}
    for folder in folders:
        preset = "ml-1m" if "ml-1m" in folder.name else "ml-100k"
        for run in sorted((folder / "runs").glob("*/seed*")):
            logs = _logs(run)
            if logs and (run / "metrics.json").exists():
                out.setdefault(preset, {}).setdefault(run.parent.name, []).append(len(logs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--speed", type=Path, nargs="+", required=True)
    parser.add_argument("--converged", type=Path, nargs="*", default=[])
    parser.add_argument("--default-epochs", type=float, default=15.0)
    parser.add_argument("--trials", type=int, default=12, help="tuning trials per model")
    parser.add_argument(
        "--tune-on", nargs="*", default=None, help="presets tuned (default: every --data)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = {d.name: pq.ParquetFile(d / "train.parquet").metadata.num_rows for d in args.data}
    rates = speed(args.speed)
    runs = epochs(args.converged)
    lines = [
        "| model | ex/s | "
        + " | ".join(f"{p}: epochs, h per run, final h, tuning h" for p in rows)
        + " |",
        "|---|---|" + "---|" * len(rows),
    ]
    totals = {p: [0.0, 0.0] for p in rows}
    missing: list[str] = []
    for name in default_models():
        rate = rates.get(name)
        label = f"{rate:,.0f}" if rate else ""
        if name in DETERMINISTIC:
            lines.append(
                f"| {name} | closed form | " + " | ".join("1 fit, < 0.01 h" for _ in rows) + " |"
            )
            continue
        if rate is None and name == "aft-paper" and "aft" in rates:
            rate, label = rates["aft"], "as `aft`"
        if rate is None:
            missing.append(name)
            continue
        cells = []
        for preset, n in rows.items():
            plan = PLAN[preset]
            seen = runs.get(preset, {}).get(name, [])
            ep = statistics.mean(seen) if seen else args.default_epochs
            hours = ep * n / rate / 3600
            seeds = plan["aft_seeds"] if name in AFT_ROWS else plan["seeds"]
            final = hours * seeds
            if name == "aft" and plan["variant_seeds"]:
                final += hours * (ABLATIONS + SWEEP_POINTS) * plan["variant_seeds"]
            elif name == "aft":
                final += hours * ABLATIONS  # one seed of Table 6 on ML-1M
            tuned = args.tune_on is None or preset in args.tune_on
            tuning = hours * args.trials if tuned else 0.0
            totals[preset][0] += final
            totals[preset][1] += tuning
            how = f"{ep:.0f}" + ("" if seen else " (assumed)")
            cells.append(f"{how}, {hours:.2f}, {final:.1f}, {tuning:.1f}")
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for preset, (final, tuning) in totals.items():
        lines.append(
            f"- {preset}: final runs {final:.0f} CPU h, tuning ({args.trials} trials per model) "
            f"{tuning:.0f} CPU h; {final + tuning:.0f} CPU h in all, "
            f"{(final + tuning) / args.jobs:.0f} wall h at {args.jobs} runs at a time."
        )
    if missing:
        lines.append(f"- no measured speed (left out): {', '.join(missing)}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
