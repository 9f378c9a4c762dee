"""The ranking of an ``aftrec reproduce`` report against the paper's published rankings.

The paper's numbers are those printed in "Adversarial Feature Translation for Multi-domain
Recommendation" (Hao et al., KDD 2021): Table 3 (Netflix, Romance and History, Recall@20 and
Recall@50) and Table 2 (MDR-5B, average Recall@50 and Recall@200). The paper's Table 3 has no
average column; here a model's Netflix average is the mean of its two domains' Recall@50, as
our report's average is the unweighted mean over domains.

For the 14 rows the paper and the report share, the script ranks them by average Recall@50 on
each side and gives Spearman's rho and Kendall's tau between the rankings, and checks the
paper's qualitative claims one by one (true or false on the report's dataset, with the two
values). The dataset is named after the report's data directory (``data/ml-1m``: ML-1M).

With ``--before OTHER_REPORT`` (e.g. the budgeted report a converged one replaces) it also
ranks every main row the two reports share, on each side, and gives how far each row moved
and Spearman's rho and Kendall's tau between the two rankings.

Run: ``python benchmarks/compare_paper.py results/ml-1m``; writes
benchmarks/results/reproduce_vs_paper.md unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from pathlib import Path

from scipy.stats import ConstantInputWarning, kendalltau, spearmanr

from _common import RESULTS
from aftrec.errors import AftrecError
from aftrec.experiments.results import finished, is_variant, load_results

# Table 3 (Netflix): (Romance r@50, History r@50); Table 2 (MDR-5B): average r@50.
NETFLIX_R50 = {
    "fm-single": (0.432, 0.656),
    "afm-single": (0.611, 0.846),
    "autoint-single": (0.610, 0.833),
    "bert4rec-single": (0.770, 0.939),
    "fm-multi": (0.484, 0.689),
    "afm-multi": (0.624, 0.852),
    "autoint-multi": (0.683, 0.920),
    "atrank": (0.702, 0.935),
    "shared-bottom": (0.837, 0.929),
    "mmoe": (0.860, 0.921),
    "snr": (0.798, 0.955),
    "aft-d": (0.843, 0.971),
    "aft-hnm": (0.864, 0.973),
    "aft": (0.872, 0.977),
}
MDR5B_AVG_R50 = {
    "fm-single": 0.134,
    "afm-single": 0.181,
    "autoint-single": 0.190,
    "bert4rec-single": 0.258,
    "fm-multi": 0.188,
    "afm-multi": 0.213,
    "autoint-multi": 0.247,
    "atrank": 0.295,
    "shared-bottom": 0.160,
    "mmoe": 0.199,
    "snr": 0.235,
    "aft-d": 0.293,
    "aft-hnm": 0.427,
    "aft": 0.496,
}
# The paper's claims that a ranking can confirm or refute: (better, worse, where it is said).
CLAIMS = [
    ("aft", "aft-hnm", "G's fakes beat mined hard negatives, 5.4.2 (3)"),
    ("aft", "aft-d", "the generator helps, 5.4.2 (2), (3)"),
    ("aft", "atrank", "AFT (D+G) best of all, 5.4.2 (1)"),
    ("aft", "bert4rec-single", "AFT (D+G) best of all, 5.4.2 (1)"),
    ("aft", "mmoe", "AFT (D+G) best of all, 5.4.2 (1)"),
    ("aft-hnm", "aft-d", "hard negatives help D, Tables 2 and 3"),
    ("aft-d", "atrank", "every AFT above the baselines, 5.4.2 (3)"),
    ("aft-d", "mmoe", "every AFT above the baselines, 5.4.2 (3)"),
    ("aft-d", "bert4rec-single", "every AFT above the baselines, 5.4.2 (3)"),
    ("fm-multi", "fm-single", "multi-domain input helps FM, 5.4.2 (3)"),
    ("afm-multi", "afm-single", "multi-domain input helps AFM, 5.4.2 (3)"),
    ("autoint-multi", "autoint-single", "multi-domain input helps AutoInt, 5.4.2 (3)"),
    ("atrank", "autoint-multi", "ATRank best multi-domain baseline, Tables 2 and 3"),
    ("mmoe", "shared-bottom", "MMoE above shared-bottom, Table 3"),
]


def ours_r50(results: dict) -> dict[str, list[float]]:
    """Average test Recall@50 of each finished seed, per main row of the report; a seed whose
    value is not a number (``null``: NaN in ``results.json``) is left out."""
    out = {}
    for key, entry in results["entries"].items():
        raw = [s["metrics"]["average"].get("recall@50") for s in finished(entry)]
        values = [float(v) for v in raw if _number(v)]
        if values and not is_variant(key):
            out[key] = values
    return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def ranks(values: dict[str, float]) -> dict[str, int]:
    """Rank 1 = the highest value; equal values share the better rank (1, 2, 2, 4)."""
    return {k: 1 + sum(v > values[k] for v in values.values()) for k in values}


def correlation(test: object) -> str:
    """A Spearman or Kendall result as "rho (p)"; undefined where a ranking is constant."""
    stat, p = test.statistic, test.pvalue  # type: ignore[attr-defined]
    if not math.isfinite(stat):
        return "undefined (a ranking with every value equal)"
    return f"{stat:.2f} ({p:.3f})"


def _tests(x: list[float], y: list[float]) -> tuple[object, object]:
    """Spearman's rho and Kendall's tau of two rankings (scipy; ties get average ranks).
    A constant side leaves them undefined (NaN), said as such, without scipy's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return spearmanr(x, y), kendalltau(x, y)


def dataset_label(results: dict) -> str:
    """The report's dataset as the tables name it: its data directory, upper case (ML-1M)."""
    return Path(results["data"]).name.upper()


def compare(results: dict) -> list[str]:
    ours = dataset_label(results)
    per_seed = ours_r50(results)
    shared = [k for k in NETFLIX_R50 if k in per_seed]
    if len(shared) < 3:
        raise SystemExit(f"the report shares only {len(shared)} rows with the paper's tables")
    netflix = {k: statistics.fmean(NETFLIX_R50[k]) for k in shared}
    mdr = {k: MDR5B_AVG_R50[k] for k in shared}
    mine = {k: statistics.fmean(per_seed[k]) for k in shared}
    rn, rm, ro = ranks(netflix), ranks(mdr), ranks(mine)
    lines = [
        f"Average Recall@50 of the {len(shared)} rows shared with the paper, rank in brackets "
        "(1 = best among these rows).",
        "",
        f"| row | paper, Netflix | paper, MDR-5B | ours, {ours} |",
        "|---|---|---|---|",
    ]
    for k in sorted(shared, key=lambda k: ro[k]):
        lines.append(
            f"| `{k}` | {netflix[k]:.4f} ({rn[k]}) | {mdr[k]:.3f} ({rm[k]}) | "
            f"{mine[k]:.4f} ({ro[k]}) |"
        )
    lines += ["", "| rankings compared | Spearman rho (p) | Kendall tau (p) |", "|---|---|---|"]
    pairs = [(f"{ours} vs Netflix", mine, netflix), (f"{ours} vs MDR-5B", mine, mdr)]
    pairs.append(("Netflix vs MDR-5B (the paper's two)", netflix, mdr))
    for name, a, b in pairs:
        x, y = [a[k] for k in shared], [b[k] for k in shared]
        rho, tau = _tests(x, y)
        lines.append(f"| {name} | {correlation(rho)} | {correlation(tau)} |")
    lines += [
        "",
        "A claim holds when the first row's mean is higher; 'within the spread' marks a",
        "difference smaller than the larger of the two seed standard deviations.",
        "",
        f"| the paper's claim | where | holds on {ours} | {ours} values |",
        "|---|---|---|---|",
    ]
    for better, worse, where in CLAIMS:
        if better in mine and worse in mine:
            holds = "yes" if mine[better] > mine[worse] else "**no**"
            noise = max(spread(per_seed[better]), spread(per_seed[worse]))
            if abs(mine[better] - mine[worse]) < noise:
                holds += " (within the spread)"
            lines.append(
                f"| `{better}` > `{worse}` | {where} | {holds} | "
                f"{mine[better]:.4f} vs {mine[worse]:.4f} |"
            )
    return lines


def moved(before: dict, after: dict, before_name: str, after_name: str) -> list[str]:
    """Every main row both reports finished, ranked by mean average Recall@50 on each side:
    the rank change per row and the agreement of the two rankings."""
    old = {k: statistics.fmean(v) for k, v in ours_r50(before).items()}
    new = {k: statistics.fmean(v) for k, v in ours_r50(after).items()}
    shared = [k for k in new if k in old]
    if len(shared) < 3:
        raise SystemExit(f"the two reports share only {len(shared)} finished rows")
    ro, rn = ranks({k: old[k] for k in shared}), ranks({k: new[k] for k in shared})
    x, y = [old[k] for k in shared], [new[k] for k in shared]
    rho, tau = _tests(x, y)
    lines = [
        f"How the ranking moved from `{before_name}` to `{after_name}`: the {len(shared)} "
        "rows both finished, ranked by mean average Recall@50 (1 = best among them).",
        "",
        f"| row | `{before_name}` | `{after_name}` | rank change |",
        "|---|---|---|---|",
    ]
    for k in sorted(shared, key=lambda k: rn[k]):
        change = ro[k] - rn[k]
        lines.append(
            f"| `{k}` | {old[k]:.4f} ({ro[k]}) | {new[k]:.4f} ({rn[k]}) | "
            f"{'+' if change > 0 else ''}{change} |"
        )
    lines += [
        "",
        f"Spearman rho (p) {correlation(rho)}, Kendall tau (p) {correlation(tau)}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_vs_paper.md")
    parser.add_argument(
        "--before", type=Path, help="another report (e.g. the budgeted one) to compare ranks with"
    )
    args = parser.parse_args()
    try:
        results = load_results(args.report_dir)
        before = None if args.before is None else load_results(args.before)
    except AftrecError as exc:
        parser.error(str(exc))
    command = f"python benchmarks/compare_paper.py {args.report_dir}"
    sections = compare(results)
    if before is not None:
        command += f" --before {args.before}"
        sections += ["", *moved(before, results, str(args.before), str(args.report_dir))]
    text = "\n".join([f"`{command}`", "", *sections])
    print(text)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out.resolve()}")


if __name__ == "__main__":
    main()
