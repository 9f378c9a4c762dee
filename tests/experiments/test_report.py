"""The ``aftrec reproduce`` report as a reader sees it: domain names that are markdown, cells
of fewer seeds than their row, the validation metric the runs stop on, damaged or older
``log.jsonl`` files, plots with nothing to draw. One ``--quick`` report on the tiny synthetic
dataset (its domains renamed to markdown's special characters) is trained once and
re-rendered with ``--report-only`` after each change."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aftrec.data.prepare import prepare
from aftrec.data.sources.synthetic import generate
from aftrec.experiments import execute as ex
from aftrec.experiments import report
from aftrec.experiments.plan import Entry, ReproduceSpec
from aftrec.experiments.report import format_cell, split_rule
from aftrec.experiments.reproduce import reproduce
from aftrec.experiments.results import Cell, Column, EntryResult, RunOutcome, recall_columns
from tests.conftest import TINY

#: markdown in every name: a table's cell separator, emphasis, code
DOMAINS = {"d0": "Rom|ance", "d1": "*Thrill*", "d2": "_Act`ion_"}
#: the runs validate on Recall@20, not the default Recall@50
SETTINGS = ("train.threads=1", "train.valid_metric=recall@20")


def _spec(data: Path, out: Path, **kw: Any) -> ReproduceSpec:
    """aft on two seeds (``--model-seeds``), pop, the ablations and sweeps on one seed."""
    return ReproduceSpec(data, out, quick=True, models=("aft", "pop"), model_seeds=("aft=2",),
                         overrides=SETTINGS, progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def special(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset with its domains renamed to :data:`DOMAINS`."""
    raw = generate(TINY)
    raw.interactions["domain"] = raw.interactions["domain"].map(DOMAINS)
    raw.items["domain"] = raw.items["domain"].map(DOMAINS)
    raw = dataclasses.replace(raw, domains=[DOMAINS[d] for d in raw.domains or DOMAINS])
    out = tmp_path_factory.mktemp("special") / "data"
    prepare(raw, out, source={"kind": "synthetic"})
    return out


@pytest.fixture(scope="module")
def finished(special: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    summary = reproduce(_spec(special, out))
    assert summary.failed == 0 and summary.pending == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "report"
    shutil.copytree(finished, out)
    return out


def _render(special: Path, out: Path) -> str:
    reproduce(_spec(special, out, report_only=True))
    return (out / "report.md").read_text()


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _row(text: str, title: str, first: str) -> list[str]:
    """The cells of the row of section ``title`` whose first cell is ``first``."""
    for line in _section(text, title).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first} in {title}")


def _write_log(run: Path, entries: list[dict[str, Any]]) -> None:
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


HEALTH = {"distinct_share_min": 0.9, "pop_pct": 40.0, "reward_mean": 0.5, "reward_std": 0.02,
          "advantage_abs": 0.01, "fn_rate": 0.05, "fn_rate_random": 0.04,
          "top10_in_d_top50": 0.1}  # fmt: skip


def _epoch(epoch: int, valid: dict[str, float], **health: float) -> dict[str, Any]:
    return {"epoch": epoch, "loss": 1.0, "health": {**HEALTH, **health}, **valid,
            "train_seconds": 2.0, "valid_seconds": 1.0}  # fmt: skip


# --------------------------------------------------------------------------- markdown


def test_domain_names_that_are_markdown_keep_the_tables_whole(finished: Path) -> None:
    """``Rom|ance`` split its column in two; ``*Thrill*`` was emphasis. Escaped in the
    markdown, raw in ``results.json``."""
    from aftrec.experiments.report import md_escape

    assert md_escape("Rom|ance") == r"Rom\|ance"
    assert md_escape("_Act`ion_ *x*") == r"\_Act\`ion\_ \*x\*"
    text = (finished / "report.md").read_text()
    assert r"domains Rom\|ance (80 items), \*Thrill\* (80 items), \_Act\`ion\_ (80 items)" in text
    tables = re.findall(r"(?:^\|.*\n)+", text, flags=re.MULTILINE)
    assert len(tables) > 5
    for table in tables:
        lines = table.splitlines()
        width = lines[1].count("---|")
        for line in lines:  # cells split on the unescaped bars only
            assert len(re.split(r"(?<!\\)\|", line)) - 2 == width, line
    assert r"| Rom\|ance r@20 |" in text and r"| \_Act\`ion\_ AUC |" in text
    results = json.loads((finished / "results.json").read_text())
    assert "Rom|ance r@20" in results["significance"]
    assert {t["column"] for t in results["ablation_tests"]} >= {"average r@50"}
    run = results["entries"]["pop"]["seeds"]["0"]["metrics"]
    assert set(run["domains"]) == set(DOMAINS.values())


# --------------------------------------------------------------------------- non-finite values


def test_an_infinite_metric_is_a_damaged_run(finished: Path, tmp_path: Path) -> None:
    """The evaluator writes a NaN as null and nothing else that is not finite: an infinity
    (or a NaN token) in ``metrics.json`` is damage, and the run is evaluated again."""
    run = _copy(finished, tmp_path) / "runs" / "pop" / "seed0"
    assert ex.is_finished(run)
    metrics = json.loads((run / "metrics.json").read_text())
    for bad in (math.inf, -math.inf, math.nan):
        metrics["domains"]["Rom|ance"]["auc"] = bad
        (run / "metrics.json").write_text(json.dumps(metrics))
        assert not ex.is_finished(run)
    metrics["domains"]["Rom|ance"]["auc"] = None  # a null is a NaN: a domain without users
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert ex.is_finished(run)


def test_a_cell_of_fewer_seeds_than_its_row_says_so(finished: Path, special: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """A seed without a value (null: NaN) drops out of the cell's mean; the row's seed count
    still counts it, so the cell says how many seeds it has."""
    outcomes = {
        s: RunOutcome(Path(f"runs/aft/seed{s}"), True, metrics={"domains": {}, "average": m})
        for s, m in enumerate([{"auc": 0.215, "r": 0.2}, {"auc": None, "r": 0.4}])
    }
    entry = EntryResult(Entry("aft", "aft", "aft"), False, outcomes)
    cell = entry.cell(Column("average", "auc"))
    assert cell is not None and (cell.n, cell.offered) == (1, 2)
    assert format_cell(cell) == "0.2150 (n=1)"
    assert format_cell(cell, "best") == "**0.2150 (n=1)**"
    assert format_cell(entry.cell(Column("average", "r"))) == "0.3000 ± 0.1414"
    assert format_cell(Cell(0.5, 0.1, 2)) == "0.5000 ± 0.1000"  # made by hand: n seeds

    out = _copy(finished, tmp_path)
    path = out / "runs" / "aft" / "seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["domains"]["*Thrill*"]["auc"] = None
    path.write_text(json.dumps(metrics))
    text = _render(special, out)
    cells = _row(text, "AUC (Table 4 layout)", "`aft`")
    assert cells[1] == "2" and " (n=1)" in cells[3]  # seeds, *Thrill* AUC
    assert "(n=" not in cells[2] + cells[4] + cells[5]


# --------------------------------------------------------------------------- logs


def test_best_epoch_and_health_follow_the_runs_validation_metric(
    finished: Path, special: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs validate on Recall@20: their best epoch is the first (the second is worse);
    the Wall time table and the health at the best epoch read Recall@50, which they lack."""
    out = _copy(finished, tmp_path)
    for seed in (0, 1):
        _write_log(out / "runs" / "aft" / f"seed{seed}", [
            _epoch(1, {"valid_recall@20": 0.5}, distinct_share_min=0.9),
            _epoch(2, {"valid_recall@20": 0.4}, distinct_share_min=0.7),
        ])  # fmt: skip
    figures: dict[str, Any] = {}
    monkeypatch.setattr(report, "write_png", lambda fig, path: figures.update({path.name: fig}))
    text = _render(special, out)
    assert _row(text, "Wall time", "`aft`")[7:9] == ["1.0", "3.0"]  # best epoch, s to it
    health = _row(text, "Generator health", "`aft`")
    assert health[2:4] == ["0.700", "0.900"]  # min over epochs, at the best epoch
    curves = _section(text, "Validation curves")
    assert "Validation Recall@20" in curves and "![validation Recall@20" in curves
    assert "Recall@50" not in curves
    assert figures["validation.png"].axes[0].get_ylabel() == "validation Recall@20"


def test_a_health_entry_without_a_diagnostic_shows_a_dash(finished: Path, special: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """A log of another version, without ``advantage_abs`` or ``distinct_share_min``, stopped
    the report with a KeyError."""
    out = _copy(finished, tmp_path)
    for seed in (0, 1):
        entry = _epoch(1, {"valid_recall@20": 0.5, "valid_recall@50": 0.6})
        del entry["health"]["advantage_abs"], entry["health"]["distinct_share_min"]
        _write_log(out / "runs" / "aft" / f"seed{seed}", [entry])
    cells = _row(_render(special, out), "Generator health", "`aft`")
    assert cells[2:4] == ["–", "–"] and cells[6:8] == ["–", "–"]
    assert cells[4] == "40.0" and cells[5] == "0.500 ± 0.020"


def test_wall_time_leaves_out_a_run_without_a_readable_log(
    finished: Path, special: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose ``log.jsonl`` is cut to a half-written line has no best epoch: it is not
    epoch 0 in the row's mean. The warning about the line comes once."""
    out = _copy(finished, tmp_path)
    good = [_epoch(1, {"valid_recall@20": 0.5, "valid_recall@50": 0.6}),
            _epoch(2, {"valid_recall@20": 0.4, "valid_recall@50": 0.5})]  # fmt: skip
    _write_log(out / "runs" / "aft" / "seed0", good)
    cut = out / "runs" / "aft" / "seed1" / "log.jsonl"
    cut.write_text('{"epoch": 1, "valid_rec')
    with caplog.at_level(logging.WARNING, logger="aftrec.training.rundir"):
        text = _render(special, out)
    assert _row(text, "Wall time", "`aft`")[7:9] == ["1.0", "3.0"]
    assert [r.getMessage() for r in caplog.records].count(
        f"{cut}: left out 1 line(s) that are not an epoch's entry"
    ) == 1


# --------------------------------------------------------------------------- plots


def test_sweep_plots_only_with_something_to_draw(
    special: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """Nothing run yet: no Fig. 3 plot is written nor linked, and matplotlib has no empty
    legend to warn about."""
    out = tmp_path / "report"
    text = _render(special, out)
    assert "## Model analyses (Fig. 3)" in text
    assert "fig3" not in text and not list(out.glob("fig3*.png"))
    assert not [w for w in recwarn if "legend" in str(w.message)]
    path = tmp_path / "sweep.png"
    none = {"a": [None, None], "average": [None, None]}
    assert not report.sweep_plot([0.1, 0.5], none, "x", "y", "t", path)
    assert not path.exists()


def test_sweep_plot_legend_names_every_drawn_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series without a value is not in the legend; one named ``_a`` (matplotlib leaves
    such labels out of a legend it collects itself) is."""
    figures: dict[str, Any] = {}
    monkeypatch.setattr(report, "write_png", lambda fig, path: figures.update({path.name: fig}))
    series = {
        "_a": [Cell(0.2, 0.01, 2), None],
        "b": [None, None],
        "average": [None, Cell(0.3, math.nan, 1)],
    }
    assert report.sweep_plot([0.1, 0.5], series, "x", "y", "t", tmp_path / "sweep.png")
    legend = figures["sweep.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["_a", "average"]


def _info(sizes: dict[str, int]) -> SimpleNamespace:
    """A stand-in for a dataset's info: its domains and their sizes."""
    return SimpleNamespace(domains=tuple(sizes), domain_size=lambda i: list(sizes.values())[i])


def _stub_results(
    values: dict[str, dict[str, list[float]]],
    sizes: dict[str, int],
    untested: tuple[str, ...] = (),
) -> Any:
    """Results of rows ``{key: {domain or "average": [Recall@50 per seed]}}``, on data whose
    domains but ``untested`` have test positives."""

    def entry(key: str, per: dict[str, list[float]]) -> EntryResult:
        outcomes = {}
        for seed in range(len(per["average"])):
            metrics = {
                "domains": {d: {"recall@50": v[seed]} for d, v in per.items() if d != "average"},
                "average": {"recall@50": per["average"][seed]},
            }
            outcomes[seed] = RunOutcome(Path(f"runs/{key}/seed{seed}"), True, metrics=metrics)
        return EntryResult(Entry(key, key, key), False, outcomes)

    entries = {k: entry(k, per) for k, per in values.items()}
    tested = {d: 0 if d in untested else 1 for d in sizes}
    meta = {"counts": {"test": tested}}
    return SimpleNamespace(data=SimpleNamespace(info=_info(sizes), meta=meta), entries=entries)


def test_recall_bars_of_one_value_start_at_zero_and_no_tick_passes_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A domain of at most 50 items has Recall@50 = 1 for every row: its panel spanned
    0.999 to 1.0004, tick labels ran together and named values above 1."""
    figures: dict[str, Any] = {}
    monkeypatch.setattr(report, "write_png", lambda fig, path: figures.update({path.name: fig}))
    sizes = {"Books": 120, "Games ": 40}
    results = _stub_results(
        {
            "pop": {"Books": [0.95, 0.95], "Games ": [1.0, 1.0], "average": [0.975, 0.975]},
            "aft": {"Books": [0.37, 0.40], "Games ": [1.0, 1.0], "average": [0.685, 0.70]},
        },
        sizes,
    )
    assert report.recall_bars(results, ["pop", "aft"], Path("recall50.png"))
    books, games, average = figures["recall50.png"].axes[:3]
    assert games.get_xlim()[0] == 0.0 and "axis from 0)" in games.get_xlabel()
    assert games.get_title() == "'Games ' (40 items: 1 for any model)"
    assert books.get_title() == "Books" and books.get_xlim()[0] > 0.3  # still zoomed
    for ax in (books, games, average):
        ticks = list(ax.get_xticks())
        assert 2 <= len(ticks) <= 6 and max(ticks) <= 1.0, ticks


def test_validation_curves_of_one_or_two_epochs_tick_whole_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of one epoch got ticks at 0.945, 0.960, ... (labels run together); the values,
    all 1, an axis up to 1.04."""
    from aftrec.training import rundir

    figures: dict[str, Any] = {}
    monkeypatch.setattr(report, "write_png", lambda fig, path: figures.update({path.name: fig}))
    logs = {"aft-d/seed0": [(1, 1.0)], "aft-d/seed1": [(1, 1.0)], "aft/seed0": [(1, 0.7), (2, 0.8)]}
    monkeypatch.setattr(
        rundir, "epoch_log", lambda run: [{"epoch": e, "valid_recall@50": v}
                                          for e, v in logs[f"{run.parent.name}/{run.name}"]]
    )  # fmt: skip
    monkeypatch.setattr(report, "_valid_key", lambda plan, run: "valid_recall@50")
    monkeypatch.setattr(report, "validated_on", lambda plan, keys: "Recall@50")
    results = _stub_results(
        {"aft-d": {"average": [1.0, 1.0]}, "aft": {"average": [0.8]}}, {"a": 10}
    )
    results.plan = None
    assert report.validation_curves(results, ["aft-d", "aft"], tmp_path / "validation.png")
    one, two = figures["validation.png"].axes
    for ax, epochs in ((one, [1.0]), (two, [1.0, 2.0])):
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == epochs
    assert report.validation_curves(results, ["aft-d"], tmp_path / "validation.png")
    (ones,) = figures["validation.png"].axes  # every value 1
    assert max(ones.get_yticks()) <= 1.0 and 1.0 < ones.get_ylim()[1] < 1.01


def test_recall_tables_name_the_domains_where_recall_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recall@20 and @50 are 1 for any model in a domain of at most 20 or 50 items, and the
    average counts it: the report's tables gave the 1s without a word; a name with a space
    at its end is quoted in the headers as in the note."""
    sizes = {"Books": 120, "Games ": 40, "Tiny": 3}
    results = _stub_results({}, sizes)
    cols = recall_columns(list(sizes))
    assert report.saturated_line(results, cols) == [
        "Note: Recall@N is 1 for any model in a domain of at most N items (every unseen item is "
        "in the top N), and the average counts it: r@20 in Tiny (3 items); r@50 in 'Games ' "
        "(40 items), Tiny (3 items).",
        "",
    ]
    assert report.saturated_line(_stub_results({}, {"Books": 120}), cols) == []
    assert report.column_text(Column("Games ", "recall@20")) == "'Games ' r@20"
    assert report.column_text(Column("Rom|ance", "auc")) == r"Rom\|ance AUC"


def test_recall_notes_leave_out_a_domain_without_test_users() -> None:
    """A domain without test users has no value, and the average leaves it out: the note
    named Tiny (3 items) and said the average counted its 1, as evaluate's note does not."""
    sizes = {"Books": 120, "Games ": 40, "Tiny": 3}
    cols = recall_columns(list(sizes))
    assert report.saturated_line(_stub_results({}, sizes, untested=("Tiny",)), cols) == [
        "Note: Recall@N is 1 for any model in a domain of at most N items (every unseen item is "
        "in the top N), and the average counts it: r@50 in 'Games ' (40 items).",
        "",
    ]
    none = _stub_results({}, sizes, untested=("Tiny", "Games "))
    assert report.saturated_line(none, cols) == []


def test_recall_bars_axis_label_is_not_above_the_lowest_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The panel's axis starts just below its lowest value; rounded to two decimals, its
    label (0.20) named a start above that value (0.1985)."""
    figures: dict[str, Any] = {}
    monkeypatch.setattr(report, "write_png", lambda fig, path: figures.update({path.name: fig}))

    def entry(key: str, value: float) -> EntryResult:
        metrics = {"domains": {"a": {"recall@50": value}}, "average": {"recall@50": value}}
        outcome = RunOutcome(Path(f"runs/{key}/seed0"), True, metrics=metrics)
        return EntryResult(Entry(key, key, key), True, {0: outcome})

    results = SimpleNamespace(
        data=SimpleNamespace(info=_info({"a": 100})),
        entries={"pop": entry("pop", 0.2085), "ease": entry("ease", 0.1985)},
    )
    assert report.recall_bars(results, ["pop", "ease"], Path("recall50.png"))  # type: ignore[arg-type]
    for ax in figures["recall50.png"].axes[:2]:
        start = float(re.findall(r"axis from ([0-9.e-]+)", ax.get_xlabel())[0])
        assert start <= 0.1985 and abs(start - ax.get_xlim()[0]) <= 5e-4 + 1e-12


# --------------------------------------------------------------------------- the smaller lines


def test_convergence_counts_a_run_shared_by_rows_once(finished: Path) -> None:
    """Mask 0 is the no-mask ablation's run; mask 0.15 and 5 fakes are aft's own seed 0."""
    results = json.loads((finished / "results.json").read_text())
    variants = {
        s["run"]
        for key, e in results["entries"].items()
        if "/" in key
        for s in e["seeds"].values()
        if s["ok"]
    }
    text = (finished / "report.md").read_text()
    found = re.findall(r"Ablation and sweep rows of `aft`: (\d+) of (\d+) runs", text)
    assert found == [(str(len(variants)), str(len(variants)))]  # one epoch: every run at the cap
    assert len(variants) < sum(len(e["seeds"]) for k, e in results["entries"].items() if "/" in k)


def test_ablation_rows_without_a_seed_in_common_with_aft_are_named(
    finished: Path, special: Path, tmp_path: Path
) -> None:
    """The ablations ran on seed 0; aft's seed 0 is not finished (its metrics.json removed):
    no test pairs them, and the report says so rather than leaving the rows out silently."""
    out = _copy(finished, tmp_path)
    (out / "runs" / "aft" / "seed0" / "metrics.json").unlink()
    section = _section(_render(special, out), "Ablations of AFT (Table 6 layout)")
    note = next(line for line in section.splitlines() if line.startswith("Not tested"))
    for key in ("no-generator", "no-mask", "no-translation", "no-dissimilarity"):
        assert f"`aft/{key}`" in note
    assert "no seed finished by both (`aft`: seed 1; the row: seed 0)" in note


def test_header_names_the_rows_on_other_seed_counts(finished: Path) -> None:
    """``--model-seeds aft=2`` with one seed for the others."""
    header = (finished / "report.md").read_text().splitlines()[2]
    assert header.startswith("Models: 2; seeds: 1 (aft: 2) (**quick**")


METHODS = (property, classmethod, staticmethod)


def _resolve(ref: str, scopes: list[Any]) -> bool:
    """Whether a docstring's reference names something: dotted from ``aftrec``, else in one
    of ``scopes`` (the class the docstring is in, then its module)."""
    if ref.startswith("aftrec."):
        parts = ref.split(".")
        for cut in range(len(parts), 1, -1):  # the longest importable module
            try:
                scopes, parts = [importlib.import_module(".".join(parts[:cut]))], parts[cut:]
                break
            except ImportError:
                continue
    else:
        parts = ref.lstrip(".").split(".")
    for scope in scopes:
        obj = scope
        for part in parts:
            obj = getattr(obj, part, None)
        if obj is not None:
            return True
    return False


def test_docstring_references_name_what_exists() -> None:
    """Every :func:, :class:, :meth: and :data: of the experiments modules' docstrings (the
    module's, its classes' and functions') names something that exists."""
    for name in ("execute", "plan", "report", "reproduce", "results", "stats", "tune"):
        module = importlib.import_module(f"aftrec.experiments.{name}")
        docs: list[tuple[str, list[Any]]] = [(module.__doc__ or "", [module])]
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            scopes = [obj, module] if inspect.isclass(obj) else [module]
            members = vars(obj).values() if inspect.isclass(obj) else []
            methods = [m for m in members if isinstance(m, METHODS) or inspect.isfunction(m)]
            docs += [(inspect.getdoc(doc) or "", scopes) for doc in [obj, *methods]]
        for doc, scopes in docs:
            for ref in re.findall(r":(?:func|class|meth|data):`~?([\w.]+)`", doc):
                assert _resolve(ref, scopes), f"aftrec.experiments.{name}: {ref}"


def test_the_machines_count_each_run_once(special: Path, finished: Path, tmp_path: Path) -> None:
    """aft's seed 0 stands in several rows (its own, the sweeps' default points): the Setup
    counts it once among the runs of each machine."""
    from aftrec.environment import machine

    out = _copy(finished, tmp_path)
    text = _render(special, out)
    runs = {p.parent for p in out.glob("runs/**/metrics.json")}
    plural = "s" if len(runs) > 1 else ""
    assert f"- Trained on: {machine()} ({len(runs)} run{plural}); " in text


def test_a_domain_named_like_math_is_drawn_as_written(tmp_path: Path) -> None:
    """matplotlib reads a ``$`` pair as math: a domain named ``$\\foo$`` failed the report's
    figure (an unknown symbol), and ``$5-$10`` was drawn as math."""
    series = {r"$\foo$": [Cell(0.2, 0.01, 2)], "$5-$10": [Cell(0.3, 0.01, 2)]}
    assert report.sweep_plot([0.1], series, "x", "y", "t", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_the_setup_says_how_the_data_was_split_and_its_ties_ordered() -> None:
    """The tie rule decides which clicks are test where a split falls in a tie: the report
    names it, and a dataset whose meta.json records none was split by item."""
    base = {"test_ratio": 0.2, "valid_ratio": 0.1, "min_positives": 5, "presplit": False}
    assert split_rule(base) == (
        "per user by time, the last 20% of positives test and the last 10% of the rest "
        "validation, users with fewer than 5 positives dropped; positives at one timestamp "
        "ordered by domain, then item id (--ties item)"
    )
    drawn = split_rule({**base, "ties": "random", "tie_seed": 3})
    assert drawn.endswith("ordered by a draw per (user, item) (--ties random, seed 3)")
    assert split_rule({"presplit": True, "valid_ratio": 0.2}) == "pre-split files, used as given"
