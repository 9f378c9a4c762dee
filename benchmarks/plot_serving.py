"""p99 latency against throughput, per server setting, from ``bench_serving.py``'s results.

    python benchmarks/plot_serving.py                      # results/serving.json
    python benchmarks/plot_serving.py --results results/serving.json --out results/serving.png

One panel per bundle, one line per server setting (batched, unbatched, wait 0 / 3 ms, the
server before batching), one point per concurrency (labelled with it): a setting further right
answers more requests per second, lower answers the slowest 1% sooner.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
STYLE = {
    "batched": ("tab:blue", "o", "batched (32, 1 ms)"),
    "wait0": ("tab:cyan", "v", "batched, 0 ms wait"),
    "wait3": ("tab:purple", "^", "batched, 3 ms wait"),
    "unbatched": ("tab:orange", "s", "unbatched (--max-batch 1)"),
    "h11": ("tab:green", "D", "batched, h11 + asyncio"),
    "workers2": ("tab:red", "P", "batched, --workers 2"),
    "before": ("tab:gray", "x", "before batching"),
}


def plot(results: Path, out: Path) -> Path:
    report = json.loads(results.read_text())
    bundles = report["bundles"]
    fig, axes = plt.subplots(1, len(bundles), figsize=(6.2 * len(bundles), 4.6), squeeze=False)
    for ax, (name, bundle) in zip(axes[0], bundles.items(), strict=True):
        for config, (color, marker, label) in STYLE.items():
            levels = bundle.get("configs", {}).get(config, {}).get("levels", [])
            if not levels:
                continue
            x = [lv["throughput_rps"] for lv in levels]
            y = [lv["latency_ms"]["p99"] for lv in levels]
            ax.plot(x, y, color=color, marker=marker, label=label)
            for lv, xi, yi in zip(levels, x, y, strict=True):
                ax.annotate(
                    f"c={lv['concurrency']}",
                    (xi, yi),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=color,
                )
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{name}: {bundle.get('n_items', '?'):,} items, top-200")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    load = report.get("load_average_before")
    fig.suptitle(f"aftrec serve under wrk, 2 cores (load average before: {load})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def table(results: Path) -> str:
    """The levels as a markdown table (what BENCHMARKS.md quotes)."""
    report = json.loads(results.read_text())
    rows = [
        "| bundle | server | c | req/s | p50 ms | p99 ms | p99.9 ms | mean batch | server cores "
        "| wrk cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, bundle in report["bundles"].items():
        for config, result in bundle.get("configs", {}).items():
            for lv in result["levels"]:
                lat = lv["latency_ms"]
                rows.append(
                    f"| {name} | {config} | {lv['concurrency']} | {lv['throughput_rps']:,.0f} "
                    f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p999']:.2f} "
                    f"| {lv['mean_batch'] if lv['mean_batch'] is not None else '-'} "
                    f"| {lv['cpu_cores']['server']} | {lv['cpu_cores']['wrk']} |"
                )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS / "serving.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_p99_throughput.png")
    parser.add_argument("--table", action="store_true", help="print the levels as markdown")
    args = parser.parse_args()
    if args.table:
        print(table(args.results))
    print("wrote", plot(args.results, args.out))


if __name__ == "__main__":
    main()
