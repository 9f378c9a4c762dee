"""The ``aftrec reproduce`` report: markdown tables, Fig. 3 plots, ``report.md``.

Tables follow the paper's layouts ("Adversarial Feature Translation for Multi-domain
Recommendation", Hao et al., KDD 2021, section 5): rows are models, columns are
(domain, metric) pairs plus the average over domains. A cell is ``mean ± std`` over seeds
(sample standard deviation, ddof = 1; the mean alone for one seed). In every column the best
mean, compared as printed, is bold (``**x**``) and the second best underlined
(``<u>x</u>``); equal printed means share the mark. Plots use matplotlib's ``Figure``
directly (the Agg canvas), never ``pyplot``, so no global backend state is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.experiments.plan import NS, PRIMARY, Plan, is_number, read_record
from aftrec.experiments.results import (
    Cell,
    Column,
    EntryResult,
    Results,
    auc_columns,
    recall_columns,
)
from aftrec.experiments.stats import Significance
from aftrec.outputs import atomic_write_text, plot_text, shown_name, write_png
from aftrec.registry import Registration, available_models, registration

if TYPE_CHECKING:
    from aftrec.experiments.tune import Tuned

DECIMALS = 4
USERS_MARK = "†"  # aft significantly better than the column's best competitor, over users
SEEDS_MARK = "‡"  # ... over seeds


#: what markdown would read as markup in a domain name (a table's cell separator, emphasis,
#: code, HTML, links); each is escaped with a backslash, which CommonMark takes before any
#: ASCII punctuation
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_|<>\[\]~])")


def md_escape(text: str) -> str:
    """``text`` as markdown shows it literally: ``Rom|ance`` is one table cell, ``*Drama*``
    is not emphasis. For the report's text only; ``results.json`` keeps the raw names."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def column_text(col: Column) -> str:
    """A column's header as the report shows it: the domain's name unmistakable
    (:func:`~aftrec.outputs.shown_name`: ``'Games ' r@20``), then markdown-escaped;
    ``results.json`` keeps the raw label."""
    return md_escape(dataclasses.replace(col, domain=shown_name(col.domain)).label)


def saturated_line(results: Results, columns: Sequence[Column]) -> list[str]:
    """The note under a table of Recall@N per domain and on average (``columns``): the
    domains of at most N items, where Recall@N is 1 for any model and the average counts it
    (:func:`~aftrec.evaluation.evaluate.saturated_note`); no line where there is none. Only
    domains with test positives (test users) count, as in
    :meth:`~aftrec.evaluation.evaluate.EvalResult.notes`: one without any has no value, and
    the average leaves it out, so naming it said the average counted a 1 it never saw."""
    from aftrec.evaluation.evaluate import saturated_note

    info = results.data.info
    tested = results.data.meta["counts"]["test"]
    sizes = {d: info.domain_size(i) for i, d in enumerate(info.domains) if tested.get(d)}
    recall = {c.metric: c for c in columns if c.metric.startswith("recall@")}
    note = saturated_note(sizes, {int(m[7:]): c.metric_label for m, c in recall.items()})
    return [f"Note: {md_escape(note)}.", ""] if note else []


def paper_rows(models: Sequence[str]) -> list[Registration]:
    """The registrations of ``models`` that have a row in the paper, in the paper's order."""
    known = set(available_models())
    regs = [registration(m) for m in models if m in known]
    return sorted((r for r in regs if r.paper_row is not None), key=lambda r: r.paper_row or 0)


@dataclass
class Row:
    label: str
    cells: Mapping[Column, Cell | None]
    info: str = ""  # second column (seeds, status)


def rank_marks(means: Mapping[str, float | None], decimals: int = DECIMALS) -> dict[str, str]:
    """``{row: "best" | "second"}``: the highest printed mean, and the next distinct one."""
    printed = {
        k: round(v, decimals) for k, v in means.items() if v is not None and math.isfinite(v)
    }
    levels = sorted(set(printed.values()), reverse=True)
    out: dict[str, str] = {}
    for key, v in printed.items():
        if v == levels[0]:
            out[key] = "best"
        elif len(levels) > 1 and v == levels[1]:
            out[key] = "second"
    return out


def format_cell(
    cell: Cell | None, style: str | None = None, suffix: str = "", decimals: int = DECIMALS
) -> str:
    """``0.1234 ± 0.0056`` bold for ``style="best"``, underlined for ``"second"``; marks
    (``suffix``) after the formatting. A cell made from fewer seeds than its row's (some seed's
    value NaN) says how many: ``0.2150 (n=1)``."""
    if cell is None or not math.isfinite(cell.mean):
        return "–"
    text = f"{cell.mean:.{decimals}f}"
    if cell.n > 1 and math.isfinite(cell.std):
        text += f" ± {cell.std:.{decimals}f}"
    if cell.partial:
        text += f" (n={cell.n})"
    if style == "best":
        text = f"**{text}**"
    elif style == "second":
        text = f"<u>{text}</u>"
    return text + suffix


def metric_table(
    rows: Sequence[Row],
    columns: Sequence[Column],
    marks: Mapping[tuple[str, Column], str] | None = None,
    first: str = "model",
    info: str | None = "seeds",
    highlight: bool = True,
    decimals: int = DECIMALS,
) -> str:
    """A markdown table; ``marks[(row label, column)]`` is appended to that cell."""
    marks = marks or {}
    styles: dict[tuple[str, Column], str] = {}
    if highlight:
        for col in columns:
            means = {r.label: (c.mean if (c := r.cells.get(col)) else None) for r in rows}
            for label, style in rank_marks(means, decimals).items():
                styles[(label, col)] = style
    head = [first, *([info] if info else []), *(column_text(c) for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            format_cell(
                r.cells.get(col),
                styles.get((r.label, col)),
                marks.get((r.label, col), ""),
                decimals,
            )
            for col in columns
        ]
        lines.append("| " + " | ".join([r.label, *([r.info] if info else []), *cells]) + " |")
    return "\n".join(lines)


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def significance_marks(
    sig: Mapping[Column, Significance], row: str, alpha: float
) -> dict[tuple[str, Column], str]:
    out: dict[tuple[str, Column], str] = {}
    for col, s in sig.items():
        mark = (USERS_MARK if s.users.significant(alpha) else "") + (
            SEEDS_MARK if s.seeds.significant(alpha) else ""
        )
        if mark:
            out[(row, col)] = mark
    return out


def significance_table(sig: Mapping[Column, Significance], primary: str, alpha: float) -> str:
    head = [
        "column",
        "best competitor",
        primary,
        "competitor",
        "Δ mean",
        "users: pairs",
        "users: Wilcoxon p",
        "seeds: pairs",
        "seeds: t-test p",
        "mark",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for col, s in sig.items():
        mark = (USERS_MARK if s.users.significant(alpha) else "") + (
            SEEDS_MARK if s.seeds.significant(alpha) else ""
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    column_text(col),
                    s.competitor,
                    format_cell(s.primary),
                    format_cell(s.other),
                    f"{s.primary.mean - s.other.mean:+.{DECIMALS}f}",
                    str(s.users.n),
                    _p(s.users.p),
                    str(s.seeds.n),
                    _p(s.seeds.p),
                    mark or "–",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def sweep_plot(
    xs: Sequence[float],
    series: Mapping[str, Sequence[Cell | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
) -> bool:
    """One line per series (error bars: std over seeds), written atomically as PNG. False
    (nothing written) when no point of any series has a value."""
    from matplotlib.figure import Figure

    drawn = {
        name: pts
        for name, cells in series.items()
        if (pts := [(x, c) for x, c in zip(xs, cells, strict=True) if c is not None])
    }
    if not drawn:
        return False
    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = fig.subplots()
    span = (max(xs) - min(xs)) or 1.0
    handles, labels = [], []
    for i, name in enumerate(series):
        if name not in drawn:
            continue
        pts = drawn[name]
        shift = (i - (len(series) - 1) / 2) * 0.006 * span  # keep error bars apart
        handles.append(
            ax.errorbar(
                [x + shift for x, _ in pts],
                [c.mean for _, c in pts],
                yerr=[c.std if math.isfinite(c.std) else 0.0 for _, c in pts],
                marker="o",
                capsize=3,
                elinewidth=1.0,
                linewidth=2.5 if name == "average" else 1.2,
            )
        )
        labels.append(plot_text(name))  # given, not taken from the artists: they skip "_a"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize="small")
    write_png(fig, path)
    return True


def by_average(results: Results, keys: Sequence[str], metric: str = "recall@50") -> list[str]:
    """``keys`` sorted by their average ``metric`` over seeds, best first; rows without a
    value (failed, not run yet) last, in their given order."""
    col = Column("average", metric)

    def mean(key: str) -> float:
        cell = results.entries[key].cell(col)
        return -cell.mean if cell is not None else math.inf

    return sorted(keys, key=mean)  # sorted is stable: ties keep the plan's order


def recall_bars(results: Results, keys: Sequence[str], path: Path) -> bool:
    """Test Recall@50 of every row of ``keys``, one panel per domain and one for the average:
    horizontal bars in the order of ``keys`` (the report's, best first, at the top), error bars
    the std over seeds, the AFT rows in colour. Each panel's axis spans its own values, so a
    difference of 0.01 stays visible, and the axis label says where it starts; a panel whose
    rows all have one value (a domain of at most 50 items, where Recall@50 is 1 for any model,
    which its title says) starts at 0, as a zoom onto one value would show only rounding in
    its ticks. No tick goes above 1, which recall never exceeds. Written atomically as PNG.
    False (nothing written) when no row has a value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    info = results.data.info
    sizes = {d: info.domain_size(i) for i, d in enumerate(info.domains)}
    groups = [*info.domains, "average"]
    rows = [k for k in keys if results.entries[k].cell(Column("average", "recall@50"))]
    if not rows:
        return False
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.2 * ncols, nrows * (0.9 + 0.2 * len(rows))), dpi=120)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    ys = range(len(rows))
    colours = [
        "C3" if k == PRIMARY else "C1" if k.startswith(PRIMARY) else "0.6" for k in rows
    ]  # fmt: skip
    for ax, group in zip(axes, groups, strict=False):
        cells = [results.entries[k].cell(Column(group, "recall@50")) for k in rows]
        means = [c.mean if c else math.nan for c in cells]
        stds = [c.std if c and math.isfinite(c.std) else 0.0 for c in cells]
        lows = [m - e for m, e in zip(means, stds, strict=True) if math.isfinite(m)]
        highs = [m + e for m, e in zip(means, stds, strict=True) if math.isfinite(m)]
        if not lows:
            continue
        if max(highs) > min(lows):
            span = max(max(highs) - min(lows), 0.01)
            left = max(0.0, min(lows) - 0.1 * span)
        else:  # one value in every row: nothing to zoom onto
            left, span = 0.0, max(max(highs), 0.01)
        right = max(highs) + 0.05 * span
        ax.barh(list(ys), [m - left for m in means], left=left, xerr=stds, color=colours,
                capsize=2, error_kw={"elinewidth": 0.8})  # fmt: skip
        ax.set_xlim(left, right)
        ticks = MaxNLocator(nbins=5).tick_values(left, right)  # few enough not to run together
        ax.set_xticks([t for t in ticks if left - 1e-9 <= t <= min(right, 1.0) + 1e-9])
        title = plot_text(group)
        if group in sizes and sizes[group] <= 50:
            title += f" ({sizes[group]} items: 1 for any model)"
        ax.set_title(title)
        ax.set_xlabel(f"test Recall@50 (axis from {left:.3g})", fontsize="small")
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    axes[0].set_yticks(list(ys))
    axes[0].set_yticklabels(rows)
    axes[0].invert_yaxis()  # shared: the best row at the top of every panel
    for ax in axes[::ncols]:
        ax.tick_params(axis="y", labelleft=True, labelsize="small")
    write_png(fig, path)
    return True


def validation_curves(results: Results, keys: Sequence[str], path: Path) -> bool:
    """The validation metric each run stops on (``train.valid_metric``, Recall@50 by default)
    per epoch of every finished run of ``keys``, from each run's ``log.jsonl``: one panel per
    row (one line per seed, a star at the best epoch, the checkpoint its test numbers come
    from), the panels side by side on one y axis, epochs in whole numbers (a run of one or
    two epochs would otherwise get ticks at fractions of one); written atomically as PNG.
    False (nothing written) when no run has a log."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from aftrec.training.rundir import epoch_log

    curves: dict[str, list[tuple[int, list[tuple[int, float]]]]] = {}  # row -> (seed, points)
    for key in keys:
        for seed, outcome in sorted(results.entries[key].outcomes.items()):
            log = epoch_log(outcome.run) if outcome.ok else []
            metric = _valid_key(results.plan, outcome.run)
            pts = [(int(e["epoch"]), float(e[metric])) for e in log if metric in e]
            if pts:
                curves.setdefault(key, []).append((seed, pts))
    if not curves:
        return False
    fig = Figure(figsize=(0.6 + 3.4 * len(curves), 3.8), dpi=120)
    axes = fig.subplots(1, len(curves), sharey=True, squeeze=False)[0]
    for i, (ax, (key, runs)) in enumerate(zip(axes, curves.items(), strict=True)):
        epochs_drawn = [e for _, pts in runs for e, _ in pts]
        # half an epoch either side: one or two epochs otherwise span less than one unit,
        # and the tick locator falls back to fractions of an epoch
        ax.set_xlim(min(epochs_drawn) - 0.5, max(epochs_drawn) + 0.5)
        colour = f"C{i % 10}"
        for _, pts in runs:
            epochs, values = zip(*pts, strict=True)
            ax.plot(epochs, values, color=colour, marker=".", linewidth=1.0, alpha=0.8)
            best = max(range(len(values)), key=values.__getitem__)
            ax.plot(epochs[best], values[best], "*", color="black", markersize=8, zorder=3)
        ax.set_title(f"{key} ({len(runs)} run{'s' * (len(runs) > 1)})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {validated_on(results.plan, keys)}")
    low, high = axes[0].get_ylim()  # shared; recall and NDCG never exceed 1: nor does the axis
    if high > 1.0:
        high = 1.0 + 0.05 * (1.0 - low)  # room for a star at 1
        axes[0].set_ylim(low, high)
        axes[0].set_yticks([t for t in axes[0].get_yticks() if low <= t <= 1.0 + 1e-9])
    write_png(fig, path)
    return True


def _run_threads(run: Path, plan: Plan) -> int | None:
    """The torch threads a run trained with: as its ``reproduce.json`` recorded them, else its
    saved config's, else what the plan asks (None: torch's default, unrecorded)."""
    from aftrec.errors import AftrecError
    from aftrec.training.rundir import load_run_config

    try:
        recorded = (read_record(run) or {}).get("threads")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return recorded
        return load_run_config(run).runtime.threads
    except (AftrecError, OSError):
        return plan.jobs[run].cfg.runtime.threads


def _machines(runs: Sequence[Path]) -> str:
    """Where the finished ``runs`` trained, as their ``reproduce.json`` recorded it (a run
    resumed elsewhere counts on each machine), with the number of runs on each."""
    from collections import Counter

    from aftrec.errors import AftrecError

    seen: Counter[str] = Counter()
    for run in set(runs):  # a run shared by several rows counts once
        try:
            machines = (read_record(run) or {}).get("machines")
        except AftrecError:
            machines = None
        names = [str(m) for m in machines] if isinstance(machines, list) and machines else []
        seen.update(names or ["not recorded (runs of an earlier version)"])
    if not seen:
        return "no run finished"
    return ", ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in sorted(seen.items()))


def _valid_key(plan: Plan, run: Path) -> str:
    """The key of ``log.jsonl`` holding the validation value a run stops on:
    ``valid_recall@50``, or ``valid_<train.valid_metric>`` as the trainer writes it."""
    metric, _ = plan.jobs[run].cfg.train.valid_metric_n()
    return f"valid_{metric}"


def _metric_names(plan: Plan, keys: Sequence[str] | None = None) -> set[str]:
    """The validation metrics the runs (of the rows ``keys``; None: every run) stop on, as
    the report writes them (Recall@50)."""
    runs = plan.jobs if keys is None else {r for (k, _), r in plan.runs.items() if k in keys}
    names = set()
    for run in runs:
        metric, n = plan.jobs[run].cfg.train.valid_metric_n()
        names.add(f"{'Recall' if metric.startswith('recall') else 'NDCG'}@{n}")
    return names


def validated_on(plan: Plan, keys: Sequence[str]) -> str:
    """The validation metric(s) the runs of the rows ``keys`` stop on: ``Recall@50``."""
    return " / ".join(sorted(_metric_names(plan, keys)))


def split_rule(split: Mapping[str, Any]) -> str:
    """How a prepared dataset was split, from its ``meta.json``'s ``split``: the parts' shares
    and the rule that ordered positives at one timestamp (none recorded: by item, the rule
    before there was a choice)."""
    if split.get("presplit"):
        return "pre-split files, used as given"
    ties = (
        f"a draw per (user, item) (--ties random, seed {split.get('tie_seed', 0)})"
        if split.get("ties") == "random"
        else "domain, then item id (--ties item)"
    )
    return (
        f"per user by time, the last {split.get('test_ratio', 0.2):.0%} of positives test and "
        f"the last {split.get('valid_ratio', 0.2):.0%} of the rest validation, users with "
        f"fewer than {split.get('min_positives', 5)} positives dropped; positives at one "
        f"timestamp ordered by {ties}"
    )


def _budget(plan: Plan) -> str:
    """How long the trainable runs were allowed to train, in words."""
    trains = {
        (t.epochs, t.max_batches_per_epoch, t.batch_size, t.patience, t.valid_users)
        for j in plan.jobs.values()
        if j.model not in plan.deterministic
        for t in [j.cfg.train]
    }
    if len(trains) != 1:
        return "the budgets differ between models, see the config overrides below."
    epochs, cap, batch, patience, valid_users = trains.pop()
    if cap is None:
        text = (
            f"full epochs of batch {batch}, at most {epochs}, early stopping after {patience} "
            "epochs without improvement on validation"
        )
    else:
        text = (
            f"**a fixed budget** of at most {epochs} x {cap} = {epochs * cap:,} batches of "
            f"{batch} per run, validated every {cap} batches (early stopping after {patience} "
            "without improvement); models are compared at equal training, not at convergence"
        )
    if valid_users is not None:
        text += f"; validation on a fixed sample of {valid_users:,} users per domain"
    return text + "."


def _seed_counts(plan: Plan) -> str:
    """The main rows' seed count, and those of the rows on other counts (``--model-seeds``):
    ``3 (aft, aft-d: 5)``."""
    n = plan.spec.n_seeds
    other: dict[int, list[str]] = {}
    for m in plan.models:
        if len(plan.seeds[m]) != n:
            other.setdefault(len(plan.seeds[m]), []).append(m)
    if not other:
        return str(n)
    return f"{n} (" + "; ".join(f"{', '.join(ms)}: {k}" for k, ms in other.items()) + ")"


def _seeds_info(res: EntryResult) -> str:
    ok, asked = len(res.ok()), len(res.outcomes)
    if ok == 0 and len(res.pending()) == asked:
        return "not run yet"
    if res.deterministic:
        return "1 run (deterministic)" if ok else "failed"
    if ok == 0 and not res.errors():
        return f"0/{asked}"
    if ok == 0:
        return "failed"
    return str(ok) if ok == asked else f"{ok}/{asked}"


def _rows(results: Results, keys: Sequence[str], columns: Sequence[Column]) -> list[Row]:
    return [
        Row(
            _label(results.entries[k].entry.label, k),
            {c: results.entries[k].cell(c) for c in columns},
            _seeds_info(results.entries[k]),
        )
        for k in keys
    ]


def _label(label: str, key: str) -> str:
    return f"`{key}`" if label == key else label


def _timings(results: Results) -> list[dict[str, Any]]:
    """Wall time per entry over the runs it owns (a shared run counts for its first entry)."""
    owned: dict[str, list[Any]] = {}
    for job in results.plan.jobs.values():
        owner = job.entries[0][0]
        entry = results.entries[owner]
        outcome = next(o for o in entry.outcomes.values() if o.run == job.run)
        owned.setdefault(owner, []).append(outcome)
    rows = []
    for key, outs in owned.items():
        ok = [o for o in outs if o.ok and o.train_seconds is not None]
        train = sum(o.train_seconds or 0.0 for o in ok)
        ev = sum(o.eval_seconds or 0.0 for o in ok)
        # CPU time: a run's wall time times its torch threads (unset: torch's default), as
        # the run's own config says (the command rendering the report may ask for others)
        cpu = sum(
            ((o.train_seconds or 0.0) + (o.eval_seconds or 0.0))
            * (_run_threads(o.run, results.plan) or results.environment["torch_threads"])
            for o in ok
        )
        # a run whose log is missing or unreadable has no best epoch: left out, not epoch 0
        best = [b for o in ok if (b := _best_epoch(results.plan, o.run)) is not None]
        to_best = [t for _, t in best if t is not None]
        rows.append(
            {
                "entry": key,
                "runs": len(outs),
                "ok": len(ok),
                "resumed": sum(o.resumed for o in ok),
                "train_seconds": train,
                "eval_seconds": ev,
                "total_seconds": train + ev,
                "cpu_seconds": cpu,
                "mean_seconds": (train + ev) / len(ok) if ok else float("nan"),
                "best_epoch": statistics.fmean(e for e, _ in best) if best else float("nan"),
                # only when every run with a best epoch logged its epochs' times
                "to_best_seconds": statistics.fmean(to_best)
                if to_best and len(to_best) == len(best)
                else float("nan"),
            }
        )
    return sorted(rows, key=lambda r: -r["total_seconds"])


def _best_epoch(plan: Plan, run: Path) -> tuple[int, float | None] | None:
    """:func:`~aftrec.training.rundir.best_epoch_time` of a run on its own validation metric;
    None when its ``log.jsonl`` holds no epoch with that metric (missing, unreadable, cut)."""
    from aftrec.training.rundir import best_epoch_time, epoch_log

    metric = _valid_key(plan, run)
    if not any(metric in e for e in epoch_log(run)):
        return None
    return best_epoch_time(run, metric)


def health_rows(results: Results) -> list[dict[str, Any]]:
    """Per row whose runs log G's health (``"health"`` in ``log.jsonl``, AFT with a generator
    or hard negatives): over its finished seeds, the smallest share of a domain's items that
    were fakes in any epoch, and at each run's best epoch the mean of the other diagnostics.
    A diagnostic no entry holds (a log of an older version, a damaged one) is NaN ("–")."""
    from aftrec.training.rundir import best_epoch_time, epoch_log

    rows: list[dict[str, Any]] = []
    seen: dict[frozenset[Path], dict[str, Any]] = {}  # the runs a row was computed from
    for key, entry in results.entries.items():
        runs = [o.run for o in entry.outcomes.values() if o.ok]
        logs = [(run, [e for e in epoch_log(run) if isinstance(e.get("health"), dict)])
                for run in runs]  # fmt: skip
        logs = [(run, entries) for run, entries in logs if entries]
        if not logs:
            continue
        run_set = frozenset(run for run, _ in logs)
        same = seen.get(run_set)
        if same is not None:  # a sweep point that is an ablation's runs, or another point's
            same["same_as"].append(key)
            continue
        at_best = []
        for run, entries in logs:
            best, _ = best_epoch_time(run, _valid_key(results.plan, run))
            at_best.append(next((e for e in entries if e["epoch"] == best), entries[-1])["health"])
        every = [e["health"] for _, entries in logs for e in entries]

        def values(name: str, pool: list[dict[str, Any]]) -> list[float]:
            return [float(h[name]) for h in pool if is_number(h.get(name))]

        def mean(name: str, pool: list[dict[str, Any]] = at_best) -> float:
            vals = values(name, pool)
            return statistics.fmean(vals) if vals else float("nan")

        def lowest(name: str, pool: list[dict[str, Any]] = every) -> float:
            return min(values(name, pool), default=float("nan"))

        rows.append(
            {
                "entry": key,
                "same_as": [],
                "runs": len(logs),
                "share_min": lowest("distinct_share_min"),
                "share_best": mean("distinct_share_min"),
                "pop_pct": mean("pop_pct"),
                "reward_mean": mean("reward_mean"),
                "reward_std": mean("reward_std"),
                "advantage_abs": mean("advantage_abs"),
                "advantage_abs_min": lowest("advantage_abs"),
                "fn_rate": mean("fn_rate"),
                "fn_rate_random": mean("fn_rate_random"),
                "top10": mean("top10_in_d_top50"),
            }
        )
        seen[run_set] = rows[-1]
    return rows


def health_section(results: Results) -> list[str]:
    """The "Generator health" section of the report (empty when no row logs health)."""
    rows = health_rows(results)
    if not rows:
        return []
    head = [
        "row",
        "runs",
        "distinct share, min over epochs",
        "at best epoch",
        "pop. pct",
        "reward p_d",
        "mean abs(Q - b)",
        "min over epochs",
        "FN rate fakes / random",
        "top-10 fakes in D's top 50",
    ]
    out = [
        "## Generator health",
        "",
        "Per row with fakes (G's, or D's mined hard negatives), from each run's `log.jsonl`: the "
        "smallest share of a domain's items that appeared as fakes within an epoch (over every "
        "epoch and domain), then, at each run's best epoch and averaged over runs: that share, "
        "the fakes' popularity percentile in their domain, the reward p_d (mean ± std), the "
        "mean |Q - b| that REINFORCE multiplies the log-probability with (its minimum over "
        "epochs beside it; 0 = no signal), the share of fakes that are the user's validation "
        "clicks against the same share for random unclicked items, and the share of D's top-50 "
        "slots held by the epoch's 10 most frequent fakes. Rows computed from the same runs "
        "(an ablation that is also a sweep point) share a line.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        label = " = ".join(f"`{k}`" for k in [r["entry"], *r["same_as"]])
        reward = _num(r["reward_mean"], ".3f")
        if math.isfinite(r["reward_mean"]) and math.isfinite(r["reward_std"]):
            reward += f" ± {r['reward_std']:.3f}"
        cells = [
            label,
            str(r["runs"]),
            _num(r["share_min"], ".3f"),
            _num(r["share_best"], ".3f"),
            _num(r["pop_pct"], ".1f"),
            reward,
            _num(r["advantage_abs"], ".2e"),
            _num(r["advantage_abs_min"], ".2e"),
            f"{_num(r['fn_rate'], '.4f')} / {_num(r['fn_rate_random'], '.4f')}",
            _num(r["top10"], ".3f"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def _run_convergence(plan: Plan, run: Path) -> tuple[int, int, int, bool] | None:
    """A finished run's best validation epoch, the epochs it ran, its epoch cap, and whether
    it reached the cap without stopping early; None without a ``log.jsonl``."""
    from aftrec.training.rundir import best_epoch_time, epoch_log

    log = epoch_log(run)
    if not log:
        return None
    train = plan.jobs[run].cfg.train
    best, _ = best_epoch_time(run, _valid_key(plan, run))
    ran = max(int(e["epoch"]) for e in log)
    return best, ran, train.epochs, ran >= train.epochs and ran - best < train.patience


def convergence_rows(results: Results, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per trained row of ``keys``, from each finished run's ``log.jsonl``: the epoch cap
    (``train.epochs``), the best validation epoch and the epochs run of each seed, and the runs
    that reached the cap without stopping early (fewer than ``train.patience`` epochs since
    their best): those may not have converged."""
    rows = []
    for key in keys:
        entry = results.entries[key]
        if entry.deterministic:
            continue
        best: dict[int, int] = {}
        ran: dict[int, int] = {}
        caps, hit = set(), 0
        for seed, outcome in sorted(entry.outcomes.items()):
            run = _run_convergence(results.plan, outcome.run) if outcome.ok else None
            if run is None:
                continue
            best[seed], ran[seed], cap, at_cap = run
            caps.add(cap)
            hit += at_cap
        if best:
            rows.append(
                {
                    "entry": key,
                    "cap": sorted(caps),
                    "best_epoch": best,
                    "epochs": ran,
                    "hit_cap": hit,
                }
            )
    return rows


def convergence_section(results: Results) -> list[str]:
    """The "Convergence" section: the models' rows, then one line for the variants of aft."""
    rows = convergence_rows(results, results.plan.models)
    if not rows:
        return []
    out = [
        "## Convergence",
        "",
        "Per trained model, from each run's `log.jsonl`: the best validation epoch of each seed "
        "(the checkpoint its test numbers come from), the epochs each run trained, and the runs "
        "that reached the epoch cap without stopping early (early stopping: "
        "`train.patience` epochs without improvement); a run at the cap may not have converged.",
        "",
        "| model | epoch cap | best epoch per seed | epochs run per seed | runs at the cap |",
        "|---|---|---|---|---|",
    ]

    def seeds(values: Mapping[int, int]) -> str:
        return ", ".join(str(v) for _, v in sorted(values.items()))

    for r in rows:
        n = len(r["epochs"])
        out.append(
            f"| `{r['entry']}` | {', '.join(map(str, r['cap']))} | {seeds(r['best_epoch'])} | "
            f"{seeds(r['epochs'])} | {r['hit_cap']} of {n} ({100 * r['hit_cap'] / n:.0f}%) |"
        )
    models = set(results.plan.models)
    shared = {  # each run once: rows share runs (a sweep point equal to an ablation, or aft)
        o.run
        for key, entry in results.entries.items()
        if key not in models and not entry.deterministic
        for o in entry.outcomes.values()
        if o.ok
    }
    variants = [c for run in sorted(shared) if (c := _run_convergence(results.plan, run))]
    if variants:
        hit = sum(at_cap for *_, at_cap in variants)
        out += ["", f"Ablation and sweep rows of `{PRIMARY}`: {hit} of {len(variants)} runs at "
                "the cap (a run shared by several rows counted once)."]  # fmt: skip
    return [*out, ""]


def tuned_lines(plan: Plan) -> list[str]:
    """The Setup lines on tuning: each model's study (``--tuned``) or none."""
    if not plan.tuned:
        return ["- Tuning: none; every model runs with its defaults and the overrides above."]
    out = [
        "- Tuned on validation (`aftrec tune`: a seeded Optuna TPE study per model, one run per "
        "trial to early stopping, scored on the validation split; the test split is read by "
        "the runs of this report only). The settings are in the overrides above, after "
        "`--quick`'s and before `--set`'s; per model, the trial budget and the best value:"
    ]
    for m in plan.models:
        t = plan.tuned.get(m)
        if t is None:
            out.append(f"  - `{m}`: not tuned (defaults)")
            continue
        if not t.overrides:
            out.append(f"  - `{m}`: {t.trials} trial(s), {t.metric} {t.best_value:.4f}: "
                       "nothing to tune")  # fmt: skip
            continue
        pairs = " ".join(f"`{p}`" for p in t.overrides)
        start = t.random_start
        budget = f"{t.trials} trial(s) ({t.complete} finished"
        budget += f"; {start} random start, {t.trials - start} TPE)" if start else ")"
        won = ""
        if t.best_trial >= 0:
            won = f", won by trial {t.best_trial}"
            won += " (random start)" if t.best_from_start else " (TPE)" if start else ""
        out.append(
            f"  - `{m}`: {budget}, seed {t.seed}{won}, best {t.metric} {t.best_value:.4f}: {pairs}"
        )
    return out + shared_start_lines(plan.models, plan.tuned)


def shared_start_lines(models: Sequence[str], tuned: Mapping[str, Tuned]) -> list[str]:
    """A note on models won by the same random-start draw. Studies with the same seed draw
    the same random start wherever their search spaces agree (a common set of candidates
    for every model), so one start trial can win for several models, whose settings then
    agree on every key they share."""

    def pairs(t: Tuned) -> dict[str, str]:
        return dict(p.split("=", 1) for p in t.overrides)

    groups: list[tuple[int, list[str]]] = []
    for m in models:
        t = tuned.get(m)
        if t is None or not t.overrides or not t.best_from_start:
            continue
        mine = pairs(t)
        for trial, members in groups:
            theirs = pairs(tuned[members[0]])
            common = mine.keys() & theirs.keys()
            if trial == t.best_trial and common and all(mine[k] == theirs[k] for k in common):
                members.append(m)
                break
        else:
            groups.append((t.best_trial, [m]))
    shared = [(trial, ms) for trial, ms in groups if len(ms) > 1]
    if not shared:
        return []
    said = "; ".join(f"{', '.join(f'`{m}`' for m in ms)} (trial {trial})" for trial, ms in shared)
    return [
        "- Studies with the same seed draw the same random start wherever their search spaces "
        "agree, so every model is offered the same candidate settings first, and one start "
        f"trial can win for several models. Here the same start trial won for {said}: their "
        "settings agree on every key their search spaces share. That is the same draw winning "
        "each study, not settings copied from one model to another."
    ]


def tuning_plot(plan: Plan, path: Path) -> bool:
    """The trials of every ``--tuned`` study whose ``trials.csv`` sits beside its
    ``best.json``, one panel per model (:func:`aftrec.experiments.tune.study_plot`); False
    (nothing written) when there is none."""
    from aftrec.experiments.tune import TRIALS_CSV, study_plot, study_startup, trial_points

    dirs = {
        m: t.path.parent for m, t in plan.tuned.items() if (t.path.parent / TRIALS_CSV).is_file()
    }
    studies = {m: trial_points(d) for m, d in dirs.items()}
    startup = {m: study_startup(d) for m, d in dirs.items()}
    return bool(studies) and study_plot(studies, startup, "validation", path)


def _num(x: float, spec: str) -> str:
    """``x`` formatted by ``spec``; "–" for a NaN (nothing to show)."""
    return format(x, spec) if math.isfinite(x) else "–"


def _s(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:,.1f}"


def _sweep_section(
    results: Results,
    points: Sequence[tuple[float, str]],
    name: str,
    xlabel: str,
    caption: str,
) -> list[str]:
    domains = list(results.data.info.domains)
    metric = "recall@50"
    xs = [x for x, _ in points]
    series = {
        d: [results.entries[k].cell(Column(d, metric)) for _, k in points]
        for d in [*domains, "average"]
    }
    path = Path(results.plan.spec.out) / f"{name}.png"
    plotted = sweep_plot(xs, series, xlabel, "Recall@50", f"Fig. 3: {PRIMARY}, {caption}", path)
    rows = [
        Row(f"{x:g}", {Column(d, metric): results.entries[k].cell(Column(d, metric)) for d in
                       [*domains, "average"]}, _seeds_info(results.entries[k]))
        for x, k in points
    ]  # fmt: skip
    cols = [Column(d, metric) for d in [*domains, "average"]]
    figure = [f"![{caption}]({name}.png)", ""] if plotted else []
    return [*figure, metric_table(rows, cols, first=xlabel), "", *saturated_line(results, cols)]


def render(results: Results) -> str:
    """The markdown of ``report.md`` (writes the Fig. 3 PNGs beside it)."""
    plan, spec, env = results.plan, results.plan.spec, results.environment
    info = results.data.info
    domains = list(info.domains)
    alpha = spec.alpha
    main = list(plan.models)
    sig = results.significance
    marks = significance_marks(sig, _label(PRIMARY, PRIMARY), alpha) if PRIMARY in main else {}
    out: list[str] = []
    w = out.append

    w(f"# aftrec reproduce: {Path(spec.data).name}")
    w("")
    w(
        f"Models: {len(main)}; seeds: {_seed_counts(plan)}"
        + (
            " (**quick**: tiny models and few batches; the numbers are a smoke test)"
            if spec.quick
            else ""
        )
        + f". Runs: {results.trained} trained or evaluated now, {results.reused} reused"
        + f" from `{spec.out}`, {results.failed} failed"
        + (f", {results.pending} not run yet" if results.pending else "")
        + ". "
        + f"Wall time of this invocation: {_s(results.wall_seconds)} s (started {results.started})."
    )
    w("")
    notes = list(plan.notes)
    if results.pending:
        notes.insert(
            0,
            f"**Partial report**: {results.pending} of {len(plan.jobs)} runs have not run yet "
            "(seeds are run in order, so the first seeds of every model come first). Rerun the "
            "command, without `--report-only` and with time enough for them, to finish them; "
            "finished runs are reused.",
        )
    for note in notes:
        w(f"> {note}")
        w("")

    ran = [o.run for e in results.entries.values() for o in e.outcomes.values() if o.ok]
    asked = sorted({_run_threads(r, plan) or 0 for r in ran or plan.jobs})
    threads = ", ".join(str(t) if t else f"torch's default ({env['torch_threads']})" for t in asked)
    w("## Setup")
    w("")
    w(f"- Command: `{spec.command()}`")
    w(
        f"- Data: `{spec.data}`: {info.n_users:,} users, {info.n_items:,} items, domains "
        + ", ".join(
            f"{md_escape(shown_name(d))} ({info.domain_size(i):,} items)"
            for i, d in enumerate(domains)
        )
    )
    w(f"- Split: {split_rule(results.data.meta.get('split', {}))}")
    w(
        "- Protocol: test split, full ranking over every item of the target domain (training "
        f"and validation positives excluded), N = {', '.join(map(str, NS))}; a domain's value "
        "is the mean over its test users, a model's average the unweighted mean over the "
        "domains with test users (AUC's over the domains where some user has an item left "
        "unclicked, and within a domain over those users). "
        + (
            f"Best validation epoch ({', '.join(sorted(_metric_names(plan)))}) of each run."
            if sum(results.data.meta["counts"]["valid"].values())
            else "No validation part: the last epoch of each run."
        )
    )
    w(f"- Training: {_budget(plan)}")
    w(f"- Trained on: {_machines(ran)}; torch threads per run: {threads}")
    w(
        f"- This invocation's hardware: {env['cpu']}, {env['cores']} cores "
        f"({env['usable_cores']} usable), {env['memory_gib']} GiB memory, "
        f"CUDA {'available (unused: runtime.device)' if env['cuda'] else 'none'}; "
        f"1-min load average at start {env['load_average_1min']}; {env['os']}"
    )
    w("- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    w("- Config overrides per model (`--quick`, `--tuned` and `--set`; defaults otherwise):")
    for m in main:
        pairs = plan.overrides.get(m, [])
        w(f"  - `{m}`: " + (" ".join(f"`{p}`" for p in pairs) if pairs else "defaults"))
    out += tuned_lines(plan)
    paper = [f"`{r.name}` = {r.paper_name}" for r in paper_rows(main)]
    if paper:
        w("- The paper's names: " + ", ".join(paper))
    w("")
    if tuning_plot(plan, Path(spec.out) / "tuning.png"):
        out += [
            "Each tuned model's study: the validation value of every trial (hollow: the random "
            "start; filled: TPE) and the best so far. A line that is still rising at the last "
            "trial says the budget was short for that model.",
            "",
            "![each tuned model's trials and the best so far](tuning.png)",
            "",
        ]

    rcols = recall_columns(domains)
    ranked = by_average(results, main)
    for title, cols in (
        ("Recall@N (Tables 2 and 3 layout)", rcols),
        ("AUC (Table 4 layout)", auc_columns(domains)),
    ):
        out += [f"## {title}", "", "Rows by average Recall@50 over seeds, best first.", ""]
        out += [metric_table(_rows(results, ranked, cols), cols, marks), ""]
        out += [_legend(alpha), ""]
        if cols is rcols:
            out += saturated_line(results, cols)
        if cols is rcols and recall_bars(results, ranked, Path(spec.out) / "recall50.png"):
            out += [
                f"Test Recall@50 per domain, mean and std over seeds, rows as in the table; "
                f"`{PRIMARY}` in red, the other AFT rows in orange. Each panel's axis starts "
                "just below its lowest value, or at 0 where every row has the same value; a "
                "domain of at most 50 items, where Recall@50 is 1 for any model, says so in "
                "its title.",
                "",
                "![test Recall@50 per domain, mean and std over seeds](recall50.png)",
                "",
            ]
    aft_rows = [m for m in ranked if m.startswith(PRIMARY)]
    if aft_rows and validation_curves(results, aft_rows, Path(spec.out) / "validation.png"):
        on = validated_on(plan, aft_rows)
        out += ["## Validation curves", ""]
        out += [
            f"Validation {on} (the metric the runs stop on) after every epoch of each AFT "
            "row's runs, from each run's `log.jsonl`: one panel per row, one line per seed, "
            "and a star at each run's best epoch, whose checkpoint gives the test numbers "
            "above.",
            "",
            f"![validation {on} per epoch of the AFT rows](validation.png)",
            "",
        ]

    w("## Significance")
    w("")
    if sig:
        w(
            f"`{PRIMARY}` against the best other model of each column (by mean over seeds), "
            f"alpha = {alpha:g}, two-sided, no correction for the number of columns. "
            f"{USERS_MARK}: over users, Wilcoxon signed-rank test on the per-user values averaged "
            "over seeds (pairs: the (user, domain) test cases of the column's domain, every one "
            f"for the average column; zero differences dropped). {SEEDS_MARK}: over seeds, "
            "paired t-test on the per-seed values (paired by seed; a deterministic model's one "
            f"run stands beside every seed of `{PRIMARY}`). A mark needs p < alpha and the "
            f"test's own direction in `{PRIMARY}`'s favour: the mean difference for the "
            "t-test, the signed-rank sum W+ - W- for the Wilcoxon test."
        )
        w("")
        w(significance_table(sig, PRIMARY, alpha))
    else:
        w(f"Not computed: `{PRIMARY}` or every competitor is missing or failed.")
    w("")

    if plan.ablations:
        w("## Ablations of AFT (Table 6 layout)")
        w("")
        w(
            "Each row is `aft` with one switch changed: - generator: `model.negatives=random`; "
            "- domain-specific mask: `model.mask_ratio=0`; - feature translation: "
            "`model.translation=attention`; - dissimilarity loss: `model.lambda_m=0`."
        )
        w("")
        w(metric_table(_rows(results, plan.ablations, rcols), rcols, first="variant"))
        w("")
        out += saturated_line(results, rcols)
        out += ablation_section(results, alpha)

    if plan.mask_points or plan.fake_points:
        w("## Model analyses (Fig. 3)")
        w("")
        w(
            "Recall@50 of `aft` per domain and on average; error bars: std over "
            f"{spec.n_sweep_seeds} seed(s). Every other setting as in the `aft` row above."
        )
        w("")
        if plan.mask_points:
            w("### (a) Mask ratio of the domain-specific masked encoder")
            w("")
            out += _sweep_section(
                results, plan.mask_points, "fig3a_mask_ratio", "mask ratio", "mask ratio"
            )
        if plan.fake_points:
            w("### (b) Number of fake clicked items per positive")
            w("")
            out += _sweep_section(
                results, plan.fake_points, "fig3b_n_fakes", "fake items", "number of fake items"
            )

    out += convergence_section(results)
    out += health_section(results)
    w("## Wall time")
    w("")
    timings = _timings(results)
    w(
        "Per row, summed over its runs (train, including validation each epoch, + test "
        "evaluation); a run shared by two rows counts for the first. Runs reused from an "
        "earlier invocation keep the times recorded then. A run stopped and resumed counts "
        "every invocation: its train time is the larger of what its invocations recorded and "
        "the sum of its logged epochs' training and validation (`log.jsonl`, which keeps an "
        "epoch's time across a stop), so a stop that could not record its time still counts "
        "up to the last checkpoint. Best epoch: the mean over runs of the validation "
        "epoch kept; to best epoch: the mean wall time of training and validation up to it "
        "(from each run's `log.jsonl`, a run without a readable one left out; – where a log "
        "predates these timings)."
    )
    w("")
    head = [
        "row",
        "runs",
        "resumed",
        "train s",
        "evaluate s",
        "total s",
        "per run s",
        "best epoch",
        "to best epoch s",
    ]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for t in timings:
        w(
            f"| `{t['entry']}` | {t['ok']}/{t['runs']} | {t['resumed']} | "
            f"{_s(t['train_seconds'])} | {_s(t['eval_seconds'])} | {_s(t['total_seconds'])} | "
            f"{_s(t['mean_seconds'])} | {_s(t['best_epoch'])} | {_s(t['to_best_seconds'])} |"
        )
    total = sum(t["total_seconds"] for t in timings)
    models = [t for t in timings if t["ok"] and t["entry"] in main]
    variants = sum(t["total_seconds"] for t in timings if t["entry"] not in main)
    if models and total > 0:
        w("")
        w(
            f"Sum over runs: {_s(total)} s, {sum(t['cpu_seconds'] for t in timings) / 3600:.1f} "
            "CPU hours (each run's wall time times its torch threads)"
            + (
                f", of which {_s(variants)} s for the ablations and sweeps of `{PRIMARY}`"
                if variants
                else ""
            )
            + ". Longest models: "
            + ", ".join(
                f"`{t['entry']}` ({_s(t['total_seconds'])} s, {_s(t['mean_seconds'])} s per run)"
                for t in models[:3]
            )
            + "."
        )
    w("")

    failures = [
        (key, seed, res.outcomes[seed].run, msg)
        for key, res in results.entries.items()
        for seed, msg in res.errors().items()
    ]
    if failures:
        w("## Failures")
        w("")
        seen: set[Path] = set()
        for key, seed, run, msg in failures:
            if run in seen:
                continue
            seen.add(run)
            w(f"- `{key}` seed {seed} (`{run}`): failed: {msg}")
        w("")
    return "\n".join(out).rstrip() + "\n"


def ablation_section(results: Results, alpha: float) -> list[str]:
    """Does each part help? ``aft`` against each ablated row, paired on the seeds both have;
    a note names the rows left out for want of such a seed."""
    tests = results.ablation_tests
    untested = _untested_ablations(results)
    if not tests:
        return [*untested, ""] if untested else []
    head = ["variant", "column", "seeds", f"`{PRIMARY}`", "variant's", f"Δ (`{PRIMARY}` - variant)",
            "users: Wilcoxon p", "seeds: t-test p", "the part"]  # fmt: skip
    lines = [
        f"Does each part help? `{PRIMARY}` against each row above, on the seeds both have "
        f"(so `{PRIMARY}`'s value here can differ from its row's): over users, Wilcoxon "
        "signed-rank test on the per-user values averaged over those seeds; over seeds, paired "
        f"t-test. The part helps (or hurts) where p < {alpha:g} and the test finds `{PRIMARY}` "
        "above (or below) the row without it: by the mean over seeds, by the signed ranks "
        "(W+ - W-) over users. The two ask different questions: over users, whether these "
        "trained models differ across the test users; over seeds, whether the difference "
        "survives training again, which is the stronger claim and, with few seeds, the test "
        "with little power.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for t in tests:
        cells = [
            results.entries[t.variant].entry.label,
            column_text(t.column),
            ", ".join(map(str, t.seeds_used)),
            format_cell(t.full),
            format_cell(t.ablated),
            f"{t.full.mean - t.ablated.mean:+.{DECIMALS}f}",
            _p(t.users.p),
            _p(t.seeds.p),
            t.verdict(alpha),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, *(["", *untested] if untested else []), ""]


def _untested_ablations(results: Results) -> list[str]:
    """A note on the ablation rows without a test against ``aft``: no seed that both
    finished (or no value on the seeds they share)."""
    tested = {t.variant for t in results.ablation_tests}
    if PRIMARY not in results.entries:
        return []
    mine = sorted(results.entries[PRIMARY].ok())

    def seeds(done: Sequence[int]) -> str:
        return f"seed{'s' * (len(done) != 1)} {', '.join(map(str, done))}" if done else "none"

    said = []
    for key in results.plan.ablations:
        if key == PRIMARY or key in tested or key not in results.entries:
            continue
        theirs = sorted(results.entries[key].ok())
        why = (
            "no value on the seeds both finished"
            if set(mine) & set(theirs)
            else f"no seed finished by both (`{PRIMARY}`: {seeds(mine)}; the row: {seeds(theirs)})"
        )
        said.append(f"`{key}` ({results.entries[key].entry.label}): {why}")
    if not said:
        return []
    return [
        f"Not tested against `{PRIMARY}` (the tests pair the two rows seed by seed): "
        + "; ".join(said)
        + "."
    ]


def _legend(alpha: float) -> str:
    return (
        "Mean ± std over seeds; per column **best**, <u>second</u>. "
        f"{USERS_MARK} / {SEEDS_MARK}: `aft` significantly better than the column's best "
        f"competitor over users / over seeds (alpha = {alpha:g}; see Significance)."
    )


def results_json(results: Results) -> dict[str, Any]:
    """Every number of the report, machine-readable."""
    entries = {}
    for key, res in results.entries.items():
        entries[key] = {
            "model": res.entry.model,
            "label": res.entry.label,
            "overrides": list(res.entry.overrides),
            "deterministic": res.deterministic,
            "seeds": {
                str(s): {
                    "run": str(o.run),
                    "ok": o.ok,
                    "error": o.error,
                    "train_seconds": o.train_seconds,
                    "eval_seconds": o.eval_seconds,
                    "metrics": o.metrics,
                }
                for s, o in res.outcomes.items()
            },
        }
    sig = {
        col.label: {
            "competitor": s.competitor,
            "users": {
                "test": "wilcoxon",
                "p": s.users.p,
                "n": s.users.n,
                "diff": s.users.mean_diff,
                "signed_ranks": s.users.direction,
            },
            "seeds": {
                "test": "ttest_rel",
                "p": s.seeds.p,
                "n": s.seeds.n,
                "diff": s.seeds.mean_diff,
            },
        }
        for col, s in results.significance.items()
    }
    spec = results.plan.spec
    return {
        "command": spec.command(),
        "data": str(spec.data),
        "seeds": spec.n_seeds,
        "alpha": spec.alpha,
        "quick": spec.quick,
        "environment": results.environment,
        "started": results.started,
        "wall_seconds": results.wall_seconds,
        "entries": entries,
        "significance": sig,
        "ablation_tests": [
            {
                "variant": t.variant,
                "column": t.column.label,
                "seeds": list(t.seeds_used),
                "full": t.full.mean,
                "ablated": t.ablated.mean,
                "users": {
                    "test": "wilcoxon",
                    "p": t.users.p,
                    "n": t.users.n,
                    "diff": t.users.mean_diff,
                    "signed_ranks": t.users.direction,
                },
                "seeds_test": {
                    "test": "ttest_rel",
                    "p": t.seeds.p,
                    "n": t.seeds.n,
                    "diff": t.seeds.mean_diff,
                },
                "verdict": t.verdict(spec.alpha),
            }
            for t in results.ablation_tests
        ],
        "tuned": {
            m: {**dataclasses.asdict(t), "path": str(t.path)} for m, t in results.plan.tuned.items()
        },
        "convergence": convergence_rows(results, list(results.entries)),
        "health": health_rows(results),
        # wall seconds of each row's runs (train + evaluate) times their torch threads
        "cpu_seconds": {t["entry"]: t["cpu_seconds"] for t in _timings(results)},
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def write_report(results: Results) -> Path:
    """Write ``report.md`` (and the PNGs, and ``results.json``) atomically; return its path."""
    out = Path(results.plan.spec.out)
    text = render(results)
    payload = json.dumps(_nan_to_none(results_json(results)), indent=2, default=_json_default)
    atomic_write_text(out / "results.json", payload + "\n")
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


__all__ = [
    "Row",
    "format_cell",
    "metric_table",
    "rank_marks",
    "render",
    "sweep_plot",
    "write_report",
]
