"""G's health over epochs, one line per run, from each run's ``log.jsonl`` (for BENCHMARKS.md).

Every AFT run with fakes logs, per epoch, what :mod:`aftrec.models.aft.health` measures. This
script draws five panels, epoch on the x axis: the smallest share of a domain's items that
were fakes in the epoch, the mean |Q - b| REINFORCE used (log scale), the fakes' popularity
percentile, the share of fakes that are validation clicks (with the random-negative rate
dashed), and validation Recall@50. It also prints a markdown table of each run's epochs.

Run::

    python benchmarks/plot_health.py --out benchmarks/results/health_ml100k.png \\
        LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aftrec.training.rundir import epoch_log

PANELS = (
    ("distinct_share_min", "distinct fakes / domain items\n(min over domains)", False),
    ("advantage_abs", "mean |Q - b|", True),
    ("pop_pct", "fakes' popularity percentile", False),
    ("fn_rate", "fakes that are validation clicks", False),
)


def load(spec: str) -> tuple[str, list[dict]]:
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"error: expected LABEL=RUN_DIR, got {spec!r}")
    entries = epoch_log(Path(path))
    if not entries:
        raise SystemExit(f"error: {path}: no log.jsonl")
    return label, entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="G's health over epochs")
    args = ap.parse_args()
    runs = [load(s) for s in args.runs]

    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 3.4), layout="constrained")
    axes = fig.subplots(1, len(PANELS) + 1)
    for ax, (key, title, log_y) in zip(axes, PANELS, strict=False):
        for label, entries in runs:
            pts = [(e["epoch"], e["health"][key]) for e in entries if "health" in e]
            if not pts:
                continue
            line = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)[0]
            if key == "fn_rate":
                rnd = [
                    (e["epoch"], e["health"]["fn_rate_random"]) for e in entries if "health" in e
                ]
                ax.plot(*zip(*rnd, strict=True), ls="--", color=line.get_color(), lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if log_y:
            ax.set_yscale("log")
    ax = axes[-1]
    for label, entries in runs:
        pts = [(e["epoch"], e["valid_recall@50"]) for e in entries if "valid_recall@50" in e]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax.set_title("validation Recall@50", fontsize=9)
    ax.set_xlabel("epoch")
    axes[0].axhline(0.25, color="grey", lw=0.8, ls=":")
    axes[-1].legend(fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)

    print("| run | epoch | valid r@50 | distinct share min | mean abs(Q-b) | pop. pct | "
          "FN fakes / random | top-10 in D's top 50 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, entries in runs:
        for e in entries:
            h = e.get("health")
            if h is None:
                print(f"| {label} | {e['epoch']} | {e['valid_recall@50']:.4f} | | | | | |")
                continue
            print(
                f"| {label} | {e['epoch']} | {e['valid_recall@50']:.4f} | "
                f"{h['distinct_share_min']:.3f} | {h['advantage_abs']:.2e} | {h['pop_pct']:.1f} | "
                f"{h['fn_rate']:.4f} / {h['fn_rate_random']:.4f} | "
                f"{h.get('top10_in_d_top50', float('nan')):.3f} |"
            )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
