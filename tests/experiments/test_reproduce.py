"""``aftrec reproduce``: statistics on constructed data, table rendering, planning, resume and
a ``--quick`` run end to end on the tiny synthetic dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from aftrec.errors import ConfigError, OutputError
from aftrec.experiments import execute as ex
from aftrec.experiments import plan as pl
from aftrec.experiments.plan import Entry, ReproduceSpec, make_plan, model_overrides
from aftrec.experiments.report import Row, format_cell, metric_table, rank_marks
from aftrec.experiments.reproduce import LOCK, add_parser, reproduce
from aftrec.experiments.results import Cell, Column, EntryResult, RunOutcome, finished
from aftrec.experiments.stats import (
    PairedTest,
    seed_averaged_per_user,
    seed_test,
    significance,
    user_test,
)
from aftrec.outputs import held
from aftrec.registry import available_models
from aftrec.training import checkpoint, rundir

THREADS = ["train.threads=1"]
SECTIONS = (
    "## Setup",
    "## Recall@N (Tables 2 and 3 layout)",
    "## AUC (Table 4 layout)",
    "## Significance",
    "## Ablations of AFT (Table 6 layout)",
    "## Model analyses (Fig. 3)",
    "## Convergence",
    "## Wall time",
)


# --------------------------------------------------------------------------- statistics


def _per_user(values: np.ndarray, metric: str, domains: tuple[str, ...]) -> pd.DataFrame:
    """One row per (user, domain): users 0..n-1 in every domain, ``values`` (n_domains, n)."""
    n = values.shape[1]
    return pd.DataFrame(
        {
            "user_idx": np.tile(np.arange(n), len(domains)),
            "domain": np.repeat(domains, n),
            metric: values.ravel(),
        }
    )


def test_user_test_finds_a_known_shift_and_nothing_in_noise() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=(2, 200))
    col = Column("a", "recall@50")
    better = user_test(
        _per_user(base + 0.05 + rng.normal(0, 0.02, base.shape), "recall@50", ("a", "b")),
        _per_user(base, "recall@50", ("a", "b")),
        col,
    )
    assert better.n == 200 and better.p < 1e-10 and better.significant(0.01)
    noise = user_test(
        _per_user(base + rng.normal(0, 0.02, base.shape), "recall@50", ("a", "b")),
        _per_user(base, "recall@50", ("a", "b")),
        col,
    )
    assert noise.p > 0.01 and not noise.significant(0.01)
    worse = user_test(
        _per_user(base - 0.05, "recall@50", ("a", "b")),
        _per_user(base, "recall@50", ("a", "b")),
        col,
    )
    assert worse.p < 1e-10 and worse.mean_diff < 0 and not worse.significant(0.01)
    # the average column pairs every (user, domain) case
    avg = user_test(
        _per_user(base + 0.05, "recall@50", ("a", "b")),
        _per_user(base, "recall@50", ("a", "b")),
        Column("average", "recall@50"),
    )
    assert avg.n == 400
    same = user_test(
        _per_user(base, "recall@50", ("a", "b")), _per_user(base, "recall@50", ("a", "b")), col
    )
    assert same.p == 1.0 and not same.significant(0.01)


def test_user_test_takes_its_direction_from_the_ranks() -> None:
    """Many small losses and a few large wins: the mean favours aft, the signed ranks (what
    the Wilcoxon test rejects on) do not, so no mark and the ablation verdict says "hurts"."""
    b = np.full((1, 88), 0.5)
    a = b + np.r_[np.full(80, -0.02), np.full(8, 0.45)][None]
    col = Column("a", "recall@50")
    res = user_test(_per_user(a, "recall@50", ("a",)), _per_user(b, "recall@50", ("a",)), col)
    assert res.p < 1e-6 and res.mean_diff > 0
    assert res.sign < 0 and not res.significant(0.01)
    flipped = user_test(_per_user(b, "recall@50", ("a",)), _per_user(a, "recall@50", ("a",)), col)
    assert flipped.sign > 0 and flipped.significant(0.01)


def test_seed_averages_do_not_depend_on_the_seed_order() -> None:
    """Two rows with the same per-user values on other seeds average to the same bits, so the
    signed-rank test sees zero differences rather than 1e-17 ones."""
    rng = np.random.default_rng(1)
    values = rng.integers(0, 30, (5, 2000)) / rng.integers(1, 30, (1, 2000))  # recalls: k / n
    frames = [_per_user(v[None], "recall@50", ("a",)) for v in values]
    one = seed_averaged_per_user(frames)
    other = seed_averaged_per_user([frames[i] for i in (3, 0, 4, 1, 2)])
    assert (one["recall@50"].to_numpy() == other["recall@50"].to_numpy()).all()
    assert one["recall@50"].to_numpy() == pytest.approx(values.mean(0))
    col = Column("a", "recall@50")
    assert user_test(one, other, col).p == 1.0


def test_seed_test_is_a_paired_t_test() -> None:
    from scipy.stats import ttest_rel

    b = {0: 0.30, 1: 0.35, 2: 0.28, 3: 0.33, 4: 0.31}
    a = {s: v + d for (s, v), d in zip(b.items(), [0.10, 0.11, 0.09, 0.10, 0.12], strict=True)}
    res = seed_test(a, b)
    assert res.n == 5 and res.significant(0.01)
    assert res.p == pytest.approx(ttest_rel(list(a.values()), list(b.values())).pvalue)
    # across seeds the competitor moves with aft: an unpaired test would see nothing
    assert not seed_test({0: 0.5}, {0: 0.1}).significant(0.01)  # one seed: no test
    assert math.isnan(seed_test({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}).p)  # no variance
    # a constant difference up to rounding (np.std 1e-17) is no variance either
    assert math.isnan(seed_test({0: 0.41, 1: 0.21, 2: 1.08}, {0: 0.28, 1: 0.08, 2: 0.95}).p)
    x = {0: 0.41, 1: 0.21, 2: 1.08}  # however small the constant difference
    assert math.isnan(seed_test(x, {k: v - 1e-5 for k, v in x.items()}).p)
    assert seed_test({0: 0.5, 2: 0.6}, {0: 0.4, 1: 0.5}).n == 1  # paired by seed only


def _entry(key: str, per_seed: list[dict[str, float]], deterministic: bool = False) -> EntryResult:
    outcomes = {
        s: RunOutcome(
            Path(f"runs/{key}/seed{s}"),
            True,
            metrics={"domains": {"a": vals}, "average": vals},
        )
        for s, vals in enumerate(per_seed)
    }
    return EntryResult(Entry(key, key, key), deterministic, outcomes)


def test_a_deterministic_row_counts_its_one_run_once() -> None:
    """Its one run stands under every seed (for the tests paired by seed), but its cell is
    the run's value alone, not a mean of copies with a std of 0."""
    run = RunOutcome(Path("runs/pop/seed0"), True, metrics={"domains": {}, "average": {"m": 0.4}})
    entry = EntryResult(Entry("pop", "pop", "pop"), True, dict.fromkeys(range(3), run))
    col = Column("average", "m")
    assert entry.values(col) == {0: 0.4, 1: 0.4, 2: 0.4}
    cell = entry.cell(col)
    assert cell is not None and cell.mean == 0.4 and cell.n == 1 and math.isnan(cell.std)


def test_significance_against_the_best_competitor_per_column() -> None:
    rng = np.random.default_rng(1)
    cols = [Column("a", "recall@20"), Column("a", "recall@50")]
    # aft leads recall@20 by far on every seed; on recall@50 "b" is best and ahead of aft
    results = {
        "aft": _entry("aft", [{"recall@20": 0.5 + 0.01 * s, "recall@50": 0.6} for s in range(3)]),
        "b": _entry("b", [{"recall@20": 0.3 + 0.012 * s, "recall@50": 0.7} for s in range(3)]),
        "c": _entry("c", [{"recall@20": 0.2, "recall@50": 0.5}], deterministic=True),
    }
    base = rng.uniform(0.1, 0.4, size=(1, 300))
    frames = {
        "aft": _per_user(base + 0.2, "recall@20", ("a",)).assign(**{"recall@50": 0.6}),
        "b": _per_user(base, "recall@20", ("a",)).assign(**{"recall@50": 0.7}),
    }
    sig = significance(results, ["aft", "b", "c"], cols, frames.get)
    s20, s50 = sig[cols[0]], sig[cols[1]]
    assert s20.competitor == "b" and s50.competitor == "b"
    assert s20.users.significant(0.01) and s20.seeds.significant(0.01)
    assert not s50.users.significant(0.01) and not s50.seeds.significant(0.01)
    assert s20.primary.mean == pytest.approx(0.51) and s20.other.n == 3

    from aftrec.experiments.report import significance_marks

    marks = significance_marks(sig, "`aft`", 0.01)
    assert marks == {("`aft`", cols[0]): "†‡"}


def test_ablation_tests_pair_aft_with_each_variant_on_their_shared_seeds() -> None:
    from aftrec.experiments.stats import ablation_tests

    col = Column("average", "recall@50")
    gap = [0.020, 0.024, 0.018]  # the part helps on every seed
    wobble = [0.0005, -0.0005, 0.0005]  # this one does nothing
    # aft has five seeds; the variants three: the tests use seeds 0-2 only
    results = {
        "aft": _entry("aft", [{"recall@50": 0.60 + 0.01 * s} for s in range(5)]),
        "aft/no-x": _entry(
            "aft/no-x", [{"recall@50": 0.60 + 0.01 * s - g} for s, g in enumerate(gap)]
        ),
        "aft/no-y": _entry(
            "aft/no-y", [{"recall@50": 0.60 + 0.01 * s + w} for s, w in enumerate(wobble)]
        ),
    }
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.7, size=(1, 300))
    seen: list[tuple[str, tuple[int, ...]]] = []

    def per_user(key: str, seeds: list[int]) -> pd.DataFrame:
        seen.append((key, tuple(seeds)))
        shift = 0.03 if key == "aft/no-x" else 0.0
        return _per_user(base - shift + rng.normal(0, 0.01, base.shape), "recall@50", ("a",))

    tests = ablation_tests(results, ["aft", "aft/no-x", "aft/no-y"], [col], per_user)
    assert [t.variant for t in tests] == ["aft/no-x", "aft/no-y"]
    assert all(seeds == (0, 1, 2) for _, seeds in seen)
    x, y = tests
    assert x.seeds_used == (0, 1, 2) and x.full.n == 3
    assert x.full.mean == pytest.approx(0.61)  # aft on seeds 0-2, not its five-seed mean
    assert x.seeds.significant(0.01) and x.users.significant(0.01)
    assert x.verdict(0.01) == "helps (over users and seeds)"
    assert y.verdict(0.01) == "–"
    hurt = dataclasses.replace(y, users=PairedTest(1e-5, 300, -0.01))
    assert hurt.verdict(0.01) == "hurts (over users)"
    split = dataclasses.replace(x, users=PairedTest(1e-5, 300, -0.01))
    assert split.verdict(0.01) == "hurts over users; helps over seeds"
    # no shared seed: no row
    lone = {"aft": results["aft"], "aft/no-z": _entry("aft/no-z", [])}
    assert ablation_tests(lone, ["aft/no-z"], [col], per_user) == []


def test_a_deterministic_competitor_pairs_with_every_seed_of_the_primary() -> None:
    """aft on five seeds (``--model-seeds aft=5``), EASE's one run listed under the report's
    three: the test over seeds pairs that run with all five of aft's, not three."""
    col = Column("a", "recall@50")
    aft = _entry("aft", [{"recall@50": 0.60 + 0.01 * s} for s in range(5)])
    run = RunOutcome(
        Path("runs/ease/seed0"), True, metrics={"domains": {"a": {"recall@50": 0.7}},
                                                "average": {"recall@50": 0.7}},
    )  # fmt: skip
    ease = EntryResult(Entry("ease", "ease", "ease"), True, dict.fromkeys(range(3), run))
    sig = significance({"aft": aft, "ease": ease}, ["aft", "ease"], [col], lambda k: None)
    assert sig[col].competitor == "ease" and sig[col].seeds.n == 5
    assert sig[col].seeds.mean_diff == pytest.approx(0.62 - 0.7)


def test_significance_without_primary_or_competitors_is_empty() -> None:
    one = {"aft": _entry("aft", [{"recall@20": 0.5}])}
    assert significance(one, ["aft"], [Column("a", "recall@20")], lambda k: None) == {}
    assert significance({}, [], [Column("a", "recall@20")], lambda k: None) == {}


# --------------------------------------------------------------------------- rendering


def test_rank_marks_bold_best_underline_second_ties_share() -> None:
    assert rank_marks({"x": 0.3, "y": 0.5, "z": 0.4}) == {"y": "best", "z": "second"}
    # equal as printed (4 decimals): both best, the next distinct value second
    marks = rank_marks({"x": 0.50001, "y": 0.50002, "z": 0.4, "w": None, "v": float("nan")})
    assert marks == {"x": "best", "y": "best", "z": "second"}
    assert rank_marks({"x": 0.1}) == {"x": "best"}
    assert rank_marks({}) == {}


def test_format_cell() -> None:
    assert format_cell(Cell(0.12345, 0.01, 3)) == "0.1235 ± 0.0100"
    assert format_cell(Cell(0.12345, float("nan"), 1)) == "0.1235"
    assert format_cell(Cell(0.5, 0.1, 2), "best", "†") == "**0.5000 ± 0.1000**†"
    assert format_cell(Cell(0.5, 0.1, 2), "second") == "<u>0.5000 ± 0.1000</u>"
    assert format_cell(None) == "–"


def test_metric_table_layout_and_marks() -> None:
    cols = [Column("movie", "recall@20"), Column("average", "auc")]
    rows = [
        Row("`aft`", {cols[0]: Cell(0.4, 0.01, 2), cols[1]: Cell(0.7, 0.02, 2)}, "2"),
        Row("`pop`", {cols[0]: Cell(0.3, 0.0, 2), cols[1]: Cell(0.8, 0.0, 2)}, "1 run"),
        Row("`two-tower`", {cols[0]: Cell(0.2, 0.03, 2), cols[1]: None}, "failed"),
    ]
    text = metric_table(rows, cols, {("`aft`", cols[0]): "†"})
    lines = text.splitlines()
    assert lines[0] == "| model | seeds | movie r@20 | average AUC |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| `aft` | 2 | **0.4000 ± 0.0100**† | <u>0.7000 ± 0.0200</u> |"
    assert lines[3] == "| `pop` | 1 run | <u>0.3000 ± 0.0000</u> | **0.8000 ± 0.0000** |"
    assert lines[4] == "| `two-tower` | failed | 0.2000 ± 0.0300 | – |"
    plain = metric_table(rows, cols, highlight=False, info=None, first="variant")
    assert "**" not in plain and "<u>" not in plain and plain.startswith("| variant | movie")


# --------------------------------------------------------------------------- planning


def test_quick_config_resolves_for_every_registered_model(tmp_path: Path) -> None:
    spec = ReproduceSpec(Path("unused"), tmp_path / "r", quick=True, overrides=tuple(THREADS))
    plan = make_plan(spec)
    assert plan.models[0] == "aft" and sorted(plan.models) == available_models()
    assert {j.cfg.train.seed for j in plan.jobs.values()} == {0}
    for job in plan.jobs.values():
        assert job.cfg.train.epochs == 1 and job.cfg.runtime.threads == 1
        assert getattr(job.cfg.model, "dim", 16) == 16
    # sweep points equal to aft's defaults (0.15, 5) and mask 0 share the runs they equal
    assert plan.runs[("aft/mask-0.15", 0)] == plan.runs[("aft", 0)]
    assert plan.runs[("aft/fakes-5", 0)] == plan.runs[("aft", 0)]
    assert plan.runs[("aft/mask-0", 0)] == plan.runs[("aft/no-mask", 0)]
    assert len(plan.jobs) == len(plan.models) + 4 + 3


def test_full_plan_seeds_deterministic_models_and_sweep_points(tmp_path: Path) -> None:
    spec = ReproduceSpec(Path("unused"), tmp_path / "r", models=("aft", "pop"), sweep_seeds=2)
    plan = make_plan(spec)
    assert plan.seeds["aft"] == [0, 1, 2, 3, 4] and plan.seeds["aft/mask-0.3"] == [0, 1]
    assert [x for x, _ in plan.mask_points] == [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
    assert [x for x, _ in plan.fake_points] == [1, 3, 5, 10, 15, 20]
    # pop is deterministic: one run stands for every seed
    assert {plan.runs[("pop", s)] for s in range(5)} == {tmp_path / "r/runs/pop/seed0"}
    assert plan.deterministic == {"pop"}
    cfg = next(j.cfg for j in plan.jobs.values() if j.run.name == "seed3" and j.model == "aft")
    assert cfg.train.seed == 3 and cfg.model.mask_ratio == 0.15
    no_translation = plan.jobs[tmp_path / "r/runs/aft/no-translation/seed0"].cfg
    assert no_translation.model.translation == "attention"
    # 5 aft + 5 pop-seeds-in-1 + 4 ablations x 5 + (6 + 5 new sweep points - shared) x 2
    assert len(plan.jobs) == 5 + 1 + 20 + (5 + 5) * 2


def test_keys_a_model_never_reads_do_not_make_another_run() -> None:
    """aft-d has no generator: a run saved before G's defaults changed is still the same run;
    a key D reads (or any key of aft itself) is not."""
    from aftrec.config import resolve

    fresh = resolve("aft-d").to_dict()
    saved = json.loads(json.dumps(fresh))
    saved["model"].update(lambda_m=1.0, reinforce="log", fake_sampling="topk")
    assert pl.run_identity(saved) == pl.run_identity(fresh)
    saved["model"]["d_heads"] = 8
    assert pl.run_identity(saved) != pl.run_identity(fresh)
    aft = resolve("aft").to_dict()
    changed = json.loads(json.dumps(aft))
    changed["model"]["fake_sampling"] = "topk"
    assert pl.run_identity(changed) != pl.run_identity(aft)
    # a closed-form fit reads no train key but the validation metric (EASE's grid choice):
    # --quick's epochs or a learning rate refused pop's and EASE's finished runs
    for name in ("pop", "ease"):
        plain = resolve(name).to_dict()
        other = json.loads(json.dumps(plain))
        other["train"].update(lr=0.5, epochs=1, max_batches_per_epoch=4, seed=3)
        assert pl.run_identity(other) == pl.run_identity(plain)
        other["train"]["valid_metric"] = "recall@5"
        assert pl.run_identity(other) != pl.run_identity(plain)


def test_a_run_saved_before_g_had_its_switches_is_g_as_printed() -> None:
    """A saved aft config without the generator's later keys computed G as printed: it equals
    a fresh config with those switches set so (aft-paper's values), not the new default."""
    from aftrec.config import resolve

    paper = ("fake_sampling=topk", "reinforce=log", "mmd_form=full", "lambda_m=1",
             "g_supervised=0", "g_temperature=1")  # fmt: skip
    old = resolve("aft", overrides=[f"model.{k}" for k in paper]).to_dict()
    saved = json.loads(json.dumps(old))
    for key in ("mmd_form", "fake_sampling", "g_temperature", "g_supervised", "fake_weight",
                "fake_drop_above_pos"):  # fmt: skip
        del saved["model"][key]
    assert pl.run_identity(saved) == pl.run_identity(old)
    assert pl.run_identity(saved) != pl.run_identity(resolve("aft").to_dict())


def test_a_run_saved_before_train_precision_is_an_fp32_run() -> None:
    from aftrec.config import resolve

    fresh = resolve("two-tower").to_dict()
    saved = json.loads(json.dumps(fresh))
    del saved["train"]["precision"]
    assert pl.run_identity(saved) == pl.run_identity(fresh)
    assert pl.run_identity(saved) != pl.run_identity(
        resolve("two-tower", overrides=["train.precision=bf16"]).to_dict()
    )


def test_ablations_on_fewer_seeds(tmp_path: Path) -> None:
    spec = ReproduceSpec(
        Path("unused"), tmp_path / "r", models=("aft",), seeds=3, ablation_seeds=1,
        sweeps=False,
    )  # fmt: skip
    plan = make_plan(spec)
    assert plan.seeds["aft"] == [0, 1, 2] and plan.seeds["aft/no-mask"] == [0]
    assert len(plan.jobs) == 3 + 4
    assert "--ablation-seeds 1" in spec.command()
    with pytest.raises(ConfigError, match="--ablation-seeds"):
        make_plan(dataclasses.replace(spec, ablation_seeds=0))
    # more than --seeds was cut to it without a word (the rows share the main rows' runs)
    with pytest.raises(ConfigError, match="--ablation-seeds 4 is more than the 3 seed"):
        make_plan(dataclasses.replace(spec, ablation_seeds=4))
    with pytest.raises(ConfigError, match="--sweep-seeds 5 is more than the 3 seed"):
        make_plan(dataclasses.replace(spec, sweep_seeds=5))


def test_some_rows_on_more_seeds(tmp_path: Path) -> None:
    """``--model-seeds``: the named main rows on their own seed count, the others on --seeds,
    the ablations on theirs; malformed or unknown pairs fail before anything is written."""
    spec = ReproduceSpec(
        Path("unused"), tmp_path / "r", models=("aft", "two-tower"), seeds=2, ablation_seeds=1,
        sweeps=False, model_seeds=("aft=4",),
    )  # fmt: skip
    plan = make_plan(spec)
    assert plan.seeds["aft"] == [0, 1, 2, 3] and plan.seeds["two-tower"] == [0, 1]
    assert plan.seeds["aft/no-mask"] == [0]
    assert len(plan.jobs) == 4 + 2 + 4
    assert "--model-seeds aft=4" in spec.command()
    for bad, match in [
        (("aft",), "expected MODEL=S"),
        (("aft=x",), "expected MODEL=S"),
        (("aft=²",), "expected MODEL=S"),  # str.isdigit takes it, int does not
        (("aft=٣",), "expected MODEL=S"),  # ASCII digits only
        (("aft=0",), r"must be in \[1, 1000\]"),
        (("aft=99999999999",), r"must be in \[1, 1000\]"),
        (("pop=3",), "'pop' is not among the models run"),
        (("aft=3", "aft=4"), "given twice"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_plan(dataclasses.replace(spec, model_seeds=bad))
    with pytest.raises(ConfigError, match=r"--seeds must be in \[1, 1000\], got 1001"):
        make_plan(dataclasses.replace(spec, seeds=1001))
    assert not (tmp_path / "r").exists()


def test_overrides_apply_where_the_model_has_the_key() -> None:
    user = pl._parse_overrides(["model.dim=8", "aft:model.n_fakes=3", "train.lr=0.01"])
    assert model_overrides("pop", False, user) == ["train.lr=0.01"]
    assert model_overrides("two-tower", False, user) == ["model.dim=8", "train.lr=0.01"]
    assert model_overrides("aft", False, user) == [
        "model.dim=8",
        "model.n_fakes=3",
        "train.lr=0.01",
    ]


@pytest.mark.parametrize(
    ("models", "sets", "match"),
    [
        (("aft", "nope"), (), "unknown model.*nope"),
        (("pop", "pop"), (), "more than once"),
        (("pop",), ("model.dim=8",), "no model run has a config key model.dim"),
        (("pop",), ("aft:model.dim=8",), "'aft' is not among the models"),
        (("pop",), ("train.seed=3",), "use --seeds"),
        (("two-tower",), ("two-tower:model.nope=1",), "two-tower: unknown config key"),
    ],
)
def test_bad_requests_fail_up_front(
    models: tuple[str, ...], sets: tuple[str, ...], match: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_plan(ReproduceSpec(Path("unused"), tmp_path / "r", models=models, overrides=sets))
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- end to end


def _main(argv: list[str]) -> None:
    """``aftrec reproduce ...`` through the subcommand's own parser."""
    parser = argparse.ArgumentParser(prog="aftrec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def _checkpoints(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*.pt"))}


def _quick(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "reproduce",
        "--data",
        str(tiny_dir),
        "--out",
        str(out),
        "--quick",
        "--quiet",
        *extra,
    ]


def test_quick_end_to_end_then_resume_trains_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    _main(_quick(tiny_dir, out, "--models", "aft", "pop", "two-tower", "--set", *THREADS))
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in text, section
    for png in ("fig3a_mask_ratio.png", "fig3b_n_fakes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text  # embedded by a relative path
    assert "## Failures" not in text
    for row in ("`aft`", "`pop`", "`two-tower`", "- generator", "- dissimilarity loss"):
        assert f"| {row} |" in text
    assert "1 run (deterministic)" in text
    assert "aftrec reproduce --data" in text and "--quick" in text
    assert "**a fixed budget** of at most 1 x 4 = 4 batches of 64 per run" in text
    assert re.search(r"Longest models: `\S+` \(", text)
    # one epoch, so the best is the first, and its time is logged
    assert re.search(r"\| `two-tower` \| 1/1 \| 0 \| [0-9.,]+ \| [0-9.,]+ \| [0-9.,]+ \| "
                     r"[0-9.,]+ \| 1\.0 \| [0-9.,]+ \|", text)  # fmt: skip
    # every (row, domain) has a value: no "–" in the recall table
    recall = text.split("## Recall@N")[1].split("## AUC")[0]
    assert "–" not in recall and "**" in recall and "<u>" in recall
    # rows by average Recall@50, best first, as results.json has them
    results = json.loads((out / "results.json").read_text())
    order = [line.split("|")[1].strip().strip("`") for line in recall.splitlines()
             if line.startswith("| `")]  # fmt: skip
    assert sorted(order) == ["aft", "pop", "two-tower"]
    averages = [
        np.mean([s["metrics"]["average"]["recall@50"] for s in finished(results["entries"][k])])
        for k in order
    ]
    assert averages == sorted(averages, reverse=True)
    # the per-domain bar chart and the AFT rows' validation curves, embedded
    for png in ("recall50.png", "validation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    assert "## Validation curves" in text
    for key in ("aft", "pop", "two-tower"):
        metrics = json.loads((out / "runs" / key / "seed0" / "metrics.json").read_text())
        assert set(metrics["average"]) >= {"recall@20", "recall@50", "recall@200", "auc"}
        frame = pd.read_parquet(out / "runs" / key / "seed0" / "per_user.parquet")
        assert frame.shape[0] > 0
        assert list(frame.columns) == ["user_idx", "domain", "recall@20", "recall@50",
                                       "recall@200", "auc"]  # fmt: skip
        assert frame["recall@50"].dtype == np.float32 and frame["user_idx"].dtype == np.int32
        # the per-domain means are the reported values, to float32 precision
        means = frame.groupby("domain")["recall@50"].mean()
        for domain, part in metrics["domains"].items():
            assert means[domain] == pytest.approx(part["recall@50"], abs=1e-6)
    results = json.loads((out / "results.json").read_text())
    assert results["entries"]["aft/no-mask"]["seeds"]["0"]["ok"]
    # aft against each ablated row: one seed, so the seed test has nothing to say
    assert "Does each part help?" in text and "| - generator | average r@50 | 0 |" in text
    tests = results["ablation_tests"]
    variants = {"aft/no-generator", "aft/no-mask", "aft/no-translation", "aft/no-dissimilarity"}
    assert {t["variant"] for t in tests} == variants
    assert len(tests) == 4 * 3 and all(t["seeds"] == [0] for t in tests)
    assert all(t["seeds_test"]["p"] is None for t in tests)  # nan, written as null
    # G's health: the rows with a generator, not the one without (- generator) nor pop
    health = text.split("## Generator health")[1].split("## Wall time")[0]
    assert "`aft/no-generator`" not in health
    lines = [line for line in health.splitlines() if line.startswith("| `")]
    aft = next(line for line in lines if line.startswith("| `aft` "))
    assert aft.split(" | ")[1] == "1"  # one run: seed 0, shared with the sweeps' defaults
    # rows computed from the same runs share a line ("`aft` = `aft/mask-0.15` = ..."), and
    # no run set has two
    assert " = `aft/" in aft
    runs_of = {k: {s["run"] for s in e["seeds"].values()} for k, e in results["entries"].items()}
    for row in results["health"]:
        assert all(runs_of[k] == runs_of[row["entry"]] for k in row["same_as"])
    sets = [frozenset(runs_of[row["entry"]]) for row in results["health"]]
    assert len(sets) == len(set(sets))
    assert "`pop`" not in health and "`two-tower`" not in health
    rows = {r["entry"]: r for r in results["health"]}
    assert 0 < rows["aft"]["share_min"] <= 1 and rows["aft"]["advantage_abs"] >= 0
    assert not list(out.rglob(".*.tmp"))

    # a second invocation reads every run and trains none (threads may differ: not a result)
    before = _checkpoints(out)
    summary = reproduce(
        ReproduceSpec(
            tiny_dir,
            out,
            quick=True,
            models=("aft", "pop", "two-tower"),
            overrides=("train.threads=2",),
            progress=False,
        )
    )
    assert summary.trained == 0 and summary.failed == 0 and summary.reused == 10
    assert _checkpoints(out) == before
    # ... but a config that changes results is refused up front
    with pytest.raises(ConfigError, match=r"asks for: train\.lr \S+ there, 0\.5 here \("):
        reproduce(
            ReproduceSpec(tiny_dir, out, quick=True, models=("pop", "two-tower"),
                          overrides=("train.lr=0.5",), progress=False)
        )  # fmt: skip


def test_failures_are_reported_and_half_trained_runs_resume(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aftrec.training import trainer

    out = tmp_path / "report"
    real_train = trainer.train
    calls: list[tuple[str, bool]] = []

    def flaky(data: Path, cfg: Any, run: Path, resume: bool = False, **kw: Any) -> Any:
        calls.append((run.parent.name, resume))
        if run.parent.name == "sasrec":
            raise RuntimeError("boom\nsecond line")
        return real_train(data, cfg, run, resume=resume, **kw)

    monkeypatch.setattr(trainer, "train", flaky)
    spec = ReproduceSpec(
        tiny_dir,
        out,
        seeds=2,
        quick=True,
        models=("two-tower", "sasrec", "pop"),
        overrides=(*THREADS, "train.epochs=2", "train.patience=5"),
        ablations=False,
        sweeps=False,
        progress=False,
    )
    first = reproduce(spec)
    assert first.failed == 2 and first.trained == 3  # pop: one run for both seeds
    text = (out / "report.md").read_text()
    assert "## Failures" in text and "RuntimeError: boom second line" in text
    assert "| `sasrec` | failed | – |" in text
    assert "## Significance" in text and "Not computed" in text  # no aft among the models
    # --report-only still says they failed, and why: not "not run yet"
    shown = reproduce(dataclasses.replace(spec, report_only=True))
    assert (shown.failed, shown.pending) == (2, 0)
    text = (out / "report.md").read_text()
    assert "RuntimeError: boom second line" in text and "| `sasrec` | failed | – |" in text
    failure = json.loads((out / "runs" / "sasrec" / "seed0" / "reproduce.json").read_text())
    assert failure["error"] == "RuntimeError: boom second line"
    # asked with another config, those runs are not run yet: the error was the other one's
    other = (*spec.overrides, "sasrec:train.lr=0.5")
    shown = reproduce(dataclasses.replace(spec, overrides=other, report_only=True))
    assert (shown.failed, shown.pending) == (0, 2)

    # two-tower seed 1 was "killed" in its second epoch; pop in its first
    run = out / "runs" / "two-tower" / "seed1"
    (run / "metrics.json").unlink()
    state = checkpoint.load(run / "last.pt")
    checkpoint.save({**state, "done": False, "epoch": 1}, run / "last.pt")
    log_lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text(log_lines[0] + "\n")
    for name in ("metrics.json", "last.pt", "best.pt"):
        (out / "runs" / "pop" / "seed0" / name).unlink()
    untouched = (out / "runs" / "two-tower" / "seed0" / "last.pt").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(trainer, "train", real_train)
    second = reproduce(spec)
    assert second.failed == 0 and second.trained == 4 and second.reused == 1
    assert (out / "runs" / "two-tower" / "seed0" / "last.pt").stat().st_mtime_ns == untouched
    epochs = [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((run / "reproduce.json").read_text())["resumed"] is True
    text = (out / "report.md").read_text()
    assert "## Failures" not in text
    assert re.search(r"\| `two-tower` \| 2/2 \| 1 \|", text)  # one resumed run
    # the runs that trained again dropped their earlier failure
    assert "error" not in json.loads(
        (out / "runs" / "sasrec" / "seed0" / "reproduce.json").read_text()
    )


def test_failed_runs_exit_1_and_a_run_that_never_trained_takes_another_config(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from aftrec.cli import main
    from aftrec.training import trainer

    out = tmp_path / "report"
    real_train = trainer.train

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("diverged before the first checkpoint")

    monkeypatch.setattr(trainer, "train", broken)
    argv = [*_quick(tiny_dir, out, "--models", "two-tower", "--skip", "ablations", "sweeps"),
            "--set", *THREADS]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1  # the report is written, and the exit code says it is not whole
    err = capsys.readouterr().err.splitlines()
    # the failure as it happened, then the one error line
    assert err[0] == "two-tower/seed0 failed: RuntimeError: diverged before the first checkpoint"
    assert len(err) == 2 and err[1].startswith("error: 1 run(s) failed; "), err
    assert "## Failures" in (out / "report.md").read_text()
    assert err[1].endswith("and the same command retries them"), err
    # --report-only shows the failure too, and retrying is a call without it
    assert main([*argv[:1], "--report-only", *argv[1:]]) == 1
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.endswith("the same command without --report-only retries them"), said
    # the run never checkpointed, so another config may take its folder over
    monkeypatch.setattr(trainer, "train", real_train)
    assert main([*argv, "two-tower:train.lr=0.002"]) == 0
    saved = json.loads((out / "runs" / "two-tower" / "seed0" / "reproduce.json").read_text())
    assert saved["config"]["train"]["lr"] == 0.002


def test_cpu_hours_and_machines_are_those_a_run_trained_with_not_the_renderers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Runs without ``train.threads`` trained with torch's default of their process; a report
    rendered where the default is another counts them as they trained, and names the machine
    they trained on apart from the one rendering."""
    out = tmp_path / "report"
    spec = ReproduceSpec(tiny_dir, out, models=("pop",), seeds=1, quick=True, ablations=False,
                         sweeps=False, progress=False)  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reproduce(spec)
        trained = json.loads((out / "results.json").read_text())["cpu_seconds"]["pop"]
        assert (
            json.loads((out / "runs" / "pop" / "seed0" / "reproduce.json").read_text())["threads"]
            == 1
        )
        torch.set_num_threads(2)
        reproduce(dataclasses.replace(spec, report_only=True))
    finally:
        torch.set_num_threads(before)
    assert json.loads((out / "results.json").read_text())["cpu_seconds"]["pop"] == trained
    text = (out / "report.md").read_text()
    # where the runs trained, as they recorded it, apart from the machine rendering
    from aftrec.environment import machine

    assert f"- Trained on: {machine()} (1 run); torch threads per run: 1\n" in text
    assert "- This invocation's hardware: " in text


def test_report_only_trains_nothing_and_lists_the_runs_not_run(
    tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    spec = dict(seeds=2, quick=True, models=("two-tower", "pop"), ablations=False, sweeps=False,
                overrides=tuple(THREADS), progress=False)  # fmt: skip
    empty = reproduce(ReproduceSpec(tiny_dir, out, report_only=True, **spec))  # type: ignore[arg-type]
    assert (empty.trained, empty.reused, empty.failed, empty.pending) == (0, 0, 0, 3)
    assert not _checkpoints(out)
    text = (out / "report.md").read_text()
    assert "**Partial report**: 3 of 3 runs have not run yet" in text
    assert "| `two-tower` | not run yet |" in text and "## Failures" not in text

    # seed 0 of every model finished, seed 1 not: the report shows what is there, as such
    first = reproduce(ReproduceSpec(tiny_dir, out, **{**spec, "seeds": 1}))  # type: ignore[arg-type]
    assert first.trained == 2
    partial = reproduce(ReproduceSpec(tiny_dir, out, report_only=True, **spec))  # type: ignore[arg-type]
    assert (partial.trained, partial.reused, partial.pending) == (0, 2, 1)
    text = (out / "report.md").read_text()
    assert "**Partial report**: 1 of 3 runs" in text
    assert re.search(r"\| `two-tower` \| 1/2 \| (<u>|\*\*)?0\.\d{4}", text)
    assert "| `pop` | 1 run (deterministic) |" in text


def test_a_folder_of_the_users_is_not_taken_for_a_report(tiny_dir: Path, tmp_path: Path) -> None:
    from aftrec.experiments.reproduce import check_report_dir

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("mine\n")
    spec = ReproduceSpec(tiny_dir, notes, quick=True, models=("pop",), ablations=False,
                         sweeps=False, overrides=tuple(THREADS), progress=False,
                         report_only=True)  # fmt: skip
    with pytest.raises(ConfigError, match="notes is not empty and is not a report directory"):
        reproduce(spec)
    assert [p.name for p in notes.iterdir()] == ["report.md"]
    assert (notes / "report.md").read_text() == "mine\n"
    # a report of a version before reproduce.lock: report.md, results.json and runs/
    (notes / "results.json").write_text("{}")
    (notes / "runs").mkdir()
    check_report_dir(notes)
    for name in ("results.json", "runs"):
        (notes / name).rename(tmp_path / name)
    (notes / LOCK).touch()  # this version's, killed before it wrote anything else
    check_report_dir(notes)
    # a runs/ folder is no report by its name (TensorBoard's is called that); a report's
    # runs/MODEL/seedN/reproduce.json is
    (notes / LOCK).unlink()
    (notes / "runs" / "exp1").mkdir(parents=True)
    (notes / "runs" / "exp1" / "events.out").write_text("tb")
    with pytest.raises(ConfigError, match="notes is not empty and is not a report directory"):
        check_report_dir(notes)
    (notes / "runs" / "pop" / "seed0").mkdir(parents=True)
    (notes / "runs" / "pop" / "seed0" / "reproduce.json").write_text("{}")
    check_report_dir(notes)
    # a demo killed (kill -9) while preparing its data leaves only that temporary
    demo = tmp_path / "demo"
    (demo / ".data.tmp-host-999999-abcdef12").mkdir(parents=True)
    check_report_dir(demo)


@pytest.fixture(scope="module")
def finished_report(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``--quick`` report of aft and pop (pop's per-user values are read: the
    significance tests compare aft with it)."""
    out = tmp_path_factory.mktemp("finished") / "report"
    summary = reproduce(ReproduceSpec(tiny_dir, out, quick=True, models=("aft", "pop"),
                                      ablations=False, sweeps=False, overrides=tuple(THREADS),
                                      progress=False))  # fmt: skip
    assert summary.trained == 2 and summary.failed == 0
    return out


def _json_edit(path: Path, edit: Any) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


#: damage to a finished run (runs/pop/seed0) and the error it gives; None: the run counts as
#: not finished (its metrics.json as if missing), and the next call evaluates it again
DAMAGE: list[tuple[str, Any, str | None]] = [
    ("metrics.json", lambda m: m.update(average=5), None),
    ("metrics.json", lambda m: m["average"].update({"auc": "abc"}), None),
    ("metrics.json", lambda m: next(iter(m["domains"].values())).update(auc="abc"), None),
    ("metrics.json", lambda m: m.pop("domains"), None),
    ("reproduce.json", lambda m: m.update(train_seconds="abc"), "is not a reproduce.json"),
    ("reproduce.json", lambda m: m.update(eval_seconds=[1]), "is not a reproduce.json"),
    ("reproduce.json", lambda m: m.update(config=[1]), "is not a reproduce.json"),
    ("reproduce.json", lambda m: m.update(config={"model": 5}), "is not a reproduce.json"),
    ("seed0", None, "seed0 is a file where a run folder of `aftrec reproduce` goes"),
    ("per_user.parquet", None, "per_user.parquet: cannot read the run's test values per user"),
    # readable but cut or without a metric: the tests paired fewer users, or none, silently
    ("per_user.parquet", lambda f: f.head(3), "3 rows where metrics.json counts"),
    ("per_user.parquet", lambda f: f.drop(columns="auc"), "no auc column(s)"),
]


@pytest.mark.parametrize(("name", "edit", "message"), DAMAGE)
def test_a_damaged_run_of_a_report_is_one_error_or_not_finished(
    tiny_dir: Path, finished_report: Path, tmp_path: Path, name: str, edit: Any,
    message: str | None,
) -> None:  # fmt: skip
    from aftrec.errors import CheckpointError

    out = tmp_path / "report"
    shutil.copytree(finished_report, out)
    run = out / "runs" / "pop" / "seed0"
    if name == "seed0":
        shutil.rmtree(run)
        run.write_text("")
    elif name == "per_user.parquet" and edit is None:
        (run / name).write_bytes(b"not parquet")
    elif name == "per_user.parquet":
        edit(pd.read_parquet(run / name)).to_parquet(run / name)
    else:
        _json_edit(run / name, edit)
    spec = ReproduceSpec(tiny_dir, out, quick=True, models=("aft", "pop"), ablations=False,
                         sweeps=False, overrides=tuple(THREADS), progress=False,
                         report_only=True)  # fmt: skip
    if message is not None:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            reproduce(spec)
        return
    summary = reproduce(spec)
    assert (summary.reused, summary.pending) == (1, 1)
    again = reproduce(dataclasses.replace(spec, report_only=False))
    assert (again.trained, again.reused, again.failed) == (1, 1, 0)
    assert ex.is_finished(run)


def test_one_call_at_a_time_works_on_a_report(tiny_dir: Path, tmp_path: Path) -> None:
    """Two calls on one report would train the same runs at once; the second is refused
    with one error, and the first's runs are untouched."""
    out = tmp_path / "report"
    out.mkdir()
    spec = ReproduceSpec(tiny_dir, out, quick=True, models=("pop",), ablations=False,
                         sweeps=False, overrides=tuple(THREADS), progress=False)  # fmt: skip
    with held(out, LOCK, "held"), pytest.raises(OutputError, match="another aftrec process"):
        reproduce(spec)
    assert not (out / "report.md").exists()
    assert reproduce(spec).trained == 1  # the lock file alone is no obstacle


def test_best_epoch_time_sums_epochs_up_to_the_best(tmp_path: Path) -> None:
    log = [
        {"epoch": 1, "valid_recall@50": 0.2, "train_seconds": 10.0, "valid_seconds": 1.0},
        {"epoch": 2, "valid_recall@50": 0.4, "train_seconds": 12.0, "valid_seconds": 2.0},
        {"epoch": 3, "valid_recall@50": 0.4, "train_seconds": 11.0, "valid_seconds": 1.5},
        {"epoch": 4, "valid_recall@50": 0.3, "train_seconds": 9.0, "valid_seconds": 1.0},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    assert rundir.best_epoch_time(tmp_path) == (2, 25.0)  # a tie keeps the first, as the trainer
    old = [{k: v for k, v in e.items() if not k.endswith("_seconds")} for e in log]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    assert rundir.best_epoch_time(tmp_path) == (2, None)
    assert rundir.best_epoch_time(tmp_path / "missing") == (0, None)


def test_runs_go_seed_by_seed() -> None:
    jobs = [
        pl.Job(Path(f"{k}/seed{s}"), None, k, [(k, s)])  # type: ignore[arg-type]
        for k in ("aft", "pop", "two-tower")
        for s in (0, 1)
    ]
    jobs[2].entries.append(("pop", 1))  # one run standing for two seeds sorts by its first
    order = [j.run.as_posix() for j in ex._seed_order(jobs)]
    assert order == ["aft/seed0", "pop/seed0", "two-tower/seed0", "aft/seed1", "pop/seed1",
                     "two-tower/seed1"]  # fmt: skip


def test_parallel_jobs_give_the_serial_results(tiny_dir: Path, tmp_path: Path) -> None:
    """--jobs 2: every run in its own spawned process, same numbers as one after another."""
    spec = dict(seeds=2, quick=True, models=("two-tower", "sasrec"), ablations=False,
                sweeps=False, overrides=tuple(THREADS), progress=False)  # fmt: skip
    serial = reproduce(ReproduceSpec(tiny_dir, tmp_path / "serial", **spec))  # type: ignore[arg-type]
    parallel = reproduce(ReproduceSpec(tiny_dir, tmp_path / "parallel", jobs=2, **spec))  # type: ignore[arg-type]
    assert serial.failed == parallel.failed == 0 and parallel.trained == 4
    for run in ("two-tower/seed0", "two-tower/seed1", "sasrec/seed0", "sasrec/seed1"):
        a = json.loads((tmp_path / "serial" / "runs" / run / "metrics.json").read_text())
        b = json.loads((tmp_path / "parallel" / "runs" / run / "metrics.json").read_text())
        assert a == b, run
    s0 = json.loads((tmp_path / "parallel/runs/two-tower/seed0/metrics.json").read_text())
    s1 = json.loads((tmp_path / "parallel/runs/two-tower/seed1/metrics.json").read_text())
    assert s0 != s1  # the seeds differ, so the comparison above could fail
    text = (tmp_path / "parallel" / "report.md").read_text()
    assert "--jobs 2" in text


@pytest.mark.parametrize("jobs", [1, 2])
def test_hours_starts_only_runs_expected_to_end_in_time(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, jobs: int
) -> None:
    """--hours: a run starts only if its model's longest finished run fits the time left; a
    model with no finished run waits. What did not start is "not run yet", not a failure."""
    out = tmp_path / "report"
    spec = dict(quick=True, ablations=False, sweeps=False, overrides=tuple(THREADS),
                progress=False, jobs=jobs)  # fmt: skip
    first = reproduce(
        ReproduceSpec(tiny_dir, out, seeds=1, models=("two-tower", "fm-single"), **spec)
    )  # type: ignore[arg-type]
    assert first.trained == 2
    log = out / "runs" / "fm-single" / "seed0" / rundir.LOG
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = 4000.0 / len(epochs)  # so fm-single's next run is expected to take over 1 h
    log.write_text("".join(json.dumps({**e, "train_seconds": seconds}) + "\n" for e in epochs))

    caplog.set_level("INFO", logger="aftrec.experiments.execute")
    models = ("two-tower", "fm-single", "mmoe")  # mmoe: no finished run to go by
    limited = reproduce(ReproduceSpec(tiny_dir, out, seeds=2, models=models, hours=1.0, **spec))  # type: ignore[arg-type]
    assert (limited.trained, limited.failed, limited.pending) == (1, 0, 3)
    assert (out / "runs" / "two-tower" / "seed1" / "metrics.json").is_file()
    for run in ("fm-single/seed1", "mmoe/seed0", "mmoe/seed1"):
        assert not (out / "runs" / run).exists(), run
    assert "3 run(s) not started: 1 expected to outlast the time left (run the same command " in (
        caplog.text
    )
    assert "and 2 of models with no run finished or under way to go by" in caplog.text
    text = (out / "report.md").read_text()
    assert "**Partial report**: 3 of 6 runs have not run yet" in text
    assert "--hours" not in text  # the command a reader would rerun: every run, in any time

    rest = reproduce(ReproduceSpec(tiny_dir, out, seeds=2, models=models, **spec))  # type: ignore[arg-type]
    assert (rest.trained, rest.reused, rest.pending) == (3, 3, 0)


def test_a_half_trained_run_of_a_model_none_finished_is_timed_by_its_epochs(
    tmp_path: Path,
) -> None:
    plan = make_plan(ReproduceSpec(Path("unused"), tmp_path / "r", models=("two-tower",),
                                   seeds=1, overrides=("train.epochs=10",)))  # fmt: skip
    job = next(iter(plan.jobs.values()))
    eta = ex._Eta()
    assert eta.needs(job) is None  # nothing to go by: it waits
    job.run.mkdir(parents=True)
    epochs = [{"epoch": e, "train_seconds": 50.0, "valid_seconds": 10.0} for e in (1, 2, 3, 4)]
    (job.run / rundir.LOG).write_text("".join(json.dumps(e) + "\n" for e in epochs))
    assert eta.needs(job) is None  # no checkpoint (a new checkout): it would start again
    (job.run / rundir.LAST).write_bytes(b"")
    assert eta.needs(job) == pytest.approx(60.0 * 6)  # 6 epochs to the cap of 10, 60 s each
    longest = job.run.parent / "seed9"
    longest.mkdir()
    (longest / rundir.LOG).write_text(json.dumps({"epoch": 1, "train_seconds": 1000.0}) + "\n")
    eta.add("two-tower", RunOutcome(longest, True, train_seconds=1e6, eval_seconds=5.0))
    assert eta.needs(job) == pytest.approx(1005.0 - 240.0)  # its logged epochs, not 1e6


def test_hours_one_job_at_a_time_starts_a_run_once_its_model_has_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 0 is new (no time to go by), seed 1 half-trained (timed by its epochs): seed 1
    runs first, and its time then lets seed 0 start, serially as in parallel."""
    plan = make_plan(ReproduceSpec(Path("unused"), tmp_path / "r", models=("two-tower",),
                                   seeds=2, hours=1.0, progress=False,
                                   overrides=("train.epochs=10",)))  # fmt: skip
    _, seed1 = sorted(plan.jobs.values(), key=lambda j: j.run.name)
    seed1.run.mkdir(parents=True)
    epochs = [{"epoch": e, "train_seconds": 10.0, "valid_seconds": 1.0} for e in (1, 2, 3)]
    (seed1.run / rundir.LOG).write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (seed1.run / rundir.LAST).write_bytes(b"")  # half-trained: it resumes from here
    started: list[str] = []

    def fake_run(job: pl.Job, data_dir: Path) -> RunOutcome:
        started.append(job.run.name)
        return RunOutcome(job.run, True, metrics={}, train_seconds=33.0, eval_seconds=1.0,
                          trained_now=True)  # fmt: skip

    monkeypatch.setattr(ex, "run_job", fake_run)
    outcomes = ex.execute(plan)
    assert started == ["seed1", "seed0"]
    assert not any(o.pending for o in outcomes.values())


@pytest.mark.parametrize("hours", [0.0, -1.0, math.nan, math.inf])
def test_hours_must_be_a_positive_number(tmp_path: Path, hours: float) -> None:
    with pytest.raises(ConfigError, match="--hours must be a positive number of hours"):
        make_plan(ReproduceSpec(Path("unused"), tmp_path / "r", models=("pop",), hours=hours))


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        make_plan(ReproduceSpec(Path("unused"), tmp_path / "r", models=("pop",), jobs=0))


def test_quick_every_registered_model(tiny_dir: Path, tmp_path: Path) -> None:
    """The CI configuration: ``--quick`` over every registered model (about 11 s here)."""
    out = tmp_path / "all"
    summary = reproduce(
        ReproduceSpec(tiny_dir, out, quick=True, overrides=tuple(THREADS), progress=False)
    )
    assert summary.failed == 0, (out / "report.md").read_text().split("## Failures")[-1]
    text = (out / "report.md").read_text()
    for name in available_models():
        assert f"| `{name}` |" in text


def test_cli_rejects_a_directory_that_is_not_a_prepared_dataset(tmp_path: Path) -> None:
    from aftrec.errors import DataError

    with pytest.raises(DataError, match="not a prepared dataset"):
        _main(["reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--quick"])


def test_report_written_atomically_leaves_no_temp_files(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    reproduce(
        ReproduceSpec(tiny_dir, out, quick=True, models=("pop",), overrides=tuple(THREADS),
                      progress=False)
    )  # fmt: skip
    # pop: no validation curve; the lock file stays (a flock, held only while a call runs)
    names = ["recall50.png", "report.md", "reproduce.lock", "results.json", "runs"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert os.path.getsize(out / "report.md") > 0
    assert "`aft` is not among the models" in (out / "report.md").read_text()
    assert PairedTest(float("nan"), 0, float("nan")).significant(0.01) is False


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc; zombies count as gone)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return {c for c in found if _alive(c)}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _endless_reproduce(data: Path, out: Path, models: list[str], jobs: int) -> list[str]:
    """An `aftrec reproduce` command line whose runs train until stopped."""
    import sys

    return [
        sys.executable, "-m", "aftrec.cli", "reproduce", "--data", str(data), "--out", str(out),
        "--quick", "--models", *models, "--jobs", str(jobs), "--skip", "ablations", "sweeps",
        "--quiet", "--set", *THREADS, "train.epochs=100000", "train.patience=100000",
        "train.max_batches_per_epoch=2",
    ]  # fmt: skip


def _signal_once_training(
    cmd: list[str], runs: list[Path], signum: int
) -> tuple[int, str, set[int]]:
    """Start ``cmd``, wait until every run in ``runs`` has a checkpoint, send ``signum``;
    the exit code, stderr and the child processes it had when signalled."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((r / rundir.LAST).is_file() for r in runs):  # all are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        children = _children(proc.pid)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, children


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_sigterm_stops_the_workers_and_the_runs_resume(tiny_dir: Path, tmp_path: Path) -> None:
    """`pkill -f "aftrec reproduce"` reaches the parent alone: it must terminate its spawned
    workers (before, they went on training as orphans), say so in one line, exit 143."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "report"
    cmd = _endless_reproduce(tiny_dir, out, ["two-tower", "aft-d"], jobs=2)
    runs = [out / "runs" / m / "seed0" for m in ("two-tower", "aft-d")]
    code, err, workers = _signal_once_training(cmd, runs, signal.SIGTERM)
    assert len(workers) >= 2
    assert code == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM while training "), err
    assert "two-tower/seed0" in lines[0] and "aft-d/seed0" in lines[0]
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived the parent"

    # each run resumes from its last finished epoch (a write cut short left at most a .tmp)
    for run in runs:
        epoch = checkpoint.load(run / rundir.LAST)["epoch"]
        resumed = subprocess.run(
            [sys.executable, "-m", "aftrec.cli", "train", "--out", str(run), "--resume",
             "--quiet", "--set", f"train.epochs={epoch + 1}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert checkpoint.load(run / rundir.LAST)["epoch"] == epoch + 1
        assert not [p for p in run.iterdir() if p.suffix == ".tmp"]


def test_sigint_stops_a_serial_reproduce_in_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    """--jobs 1 trains in the command's own process: Ctrl-C (SIGINT) ends it with the same
    last line, exit 130, and the run is not recorded as failed (no report is written)."""
    import signal

    out = tmp_path / "report"
    cmd = _endless_reproduce(tiny_dir, out, ["two-tower"], jobs=1)
    run = out / "runs" / "two-tower" / "seed0"
    code, err, _ = _signal_once_training(cmd, [run], signal.SIGINT)
    assert code == 128 + signal.SIGINT, err
    lines = err.strip().splitlines()  # the epoch lines (logged in this process), then:
    assert lines[-1] == (
        "stopped by SIGINT while training two-tower/seed0; each run keeps its last checkpoint: "
        "run the same command again to resume"
    )
    assert all(line.startswith("epoch ") for line in lines[:-1]), err
    assert not (run / "metrics.json").exists() and not (out / "report.md").exists()
    # the stopped invocation's time is recorded, so the report's cost counts it
    assert json.loads((run / "reproduce.json").read_text())["train_seconds"] > 0


def test_a_runs_train_time_counts_epochs_logged_before_a_stop(tmp_path: Path) -> None:
    from aftrec.experiments.execute import train_seconds

    epochs = [{"epoch": 1, "train_seconds": 40.0, "valid_seconds": 2.0},
              {"epoch": 2, "train_seconds": 50.0, "valid_seconds": 3.0}]  # fmt: skip
    assert train_seconds(tmp_path, None) is None and train_seconds(tmp_path, 7.5) == 7.5
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    assert train_seconds(tmp_path, 60.0) == 95.0  # an invocation stopped before recording
    assert train_seconds(tmp_path, 99.0) == 99.0  # recorded: setup time included
    assert train_seconds(tmp_path, None) == 95.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_parent_killed_outright(tiny_dir: Path, tmp_path: Path) -> None:
    """SIGKILL leaves the parent no chance to clean up: the workers die with it all the same."""
    import signal
    import time

    out = tmp_path / "report"
    cmd = _endless_reproduce(tiny_dir, out, ["two-tower", "aft-d"], jobs=2)
    runs = [out / "runs" / m / "seed0" for m in ("two-tower", "aft-d")]
    code, _, workers = _signal_once_training(cmd, runs, signal.SIGKILL)
    assert code == -signal.SIGKILL and len(workers) >= 2
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived the killed parent"


@pytest.mark.parametrize("name", ["afm-single", "afm-multi", "autoint-single", "autoint-multi"])
def test_a_scoring_block_size_is_the_same_run(name: str) -> None:
    """``chunk_floats`` bounds a full-ranking block's memory and leaves the scores as they are
    (``test_chunking_does_not_change_scores``): a run saved with another block size is the same
    run, so a report resumes it; a key that changes the scores still makes another run."""
    from aftrec.config import resolve

    base = resolve(name).to_dict()
    saved = resolve(name, overrides=["model.chunk_floats=16777216"]).to_dict()
    other = resolve(name, overrides=["model.dim=32"]).to_dict()
    assert saved["model"]["chunk_floats"] != base["model"]["chunk_floats"]
    assert pl.run_identity(saved) == pl.run_identity(base)
    assert pl.run_identity(other) != pl.run_identity(base)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no results.json of `aftrec reproduce` there"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a results.json of `aftrec reproduce`"),
    ],
)
def test_reading_a_report_that_is_not_one_names_it(
    tmp_path: Path, content: str | None, message: str
) -> None:
    from aftrec.errors import ConfigError
    from aftrec.experiments.results import load_results

    if content is not None:
        (tmp_path / "results.json").write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_results(tmp_path)


def test_a_report_refuses_runs_of_another_dataset_and_runs_it_did_not_evaluate(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Runs trained on another dataset were reused (the report's numbers were the other
    data's); a run `aftrec evaluate` had written metrics.json into was taken as finished."""
    from aftrec.cli import main

    out = tmp_path / "report"
    argv = ["reproduce", "--out", str(out), "--quick", "--quiet", "--models", "pop",
            "two-tower", "--skip", "ablations", "sweeps", "--set", "train.threads=1"]  # fmt: skip
    assert main([*argv[:1], "--data", str(tiny_dir), *argv[1:]]) == 0
    text = (out / "report.md").read_text()
    assert "Best validation epoch (Recall@50) of each run." in text
    # an evaluation that is not the report's own does not finish a run
    run = out / "runs" / "two-tower" / "seed0"
    record = json.loads((run / "reproduce.json").read_text())
    del record["eval_seconds"]
    (run / "reproduce.json").write_text(json.dumps(record))
    assert not ex.is_finished(run)
    assert main([*argv[:1], "--data", str(tiny_dir), *argv[1:]]) == 0
    assert ex.is_finished(run)
    # another dataset of the same shape: refused before anything runs
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["users_dropped"] = 1 + meta.get("users_dropped", 0)
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="trained on another dataset than --data"):
        reproduce(ReproduceSpec(other, out, quick=True, models=("pop", "two-tower"),
                                ablations=False, sweeps=False, progress=False,
                                overrides=("train.threads=1",)))  # fmt: skip


def test_a_refused_config_names_the_keys_it_differs_in() -> None:
    """What differs, the saved value first, at most a few keys: the user sees which --set (or
    which default changed since) made the run another one."""
    from aftrec.experiments.plan import config_differences

    was = {"model": {"g_temperature": 1.0, "dim": 64}, "train": {"lr": 0.001}}
    now = {"model": {"g_temperature": 4.0, "dim": 64, "g_supervised": 1.0}, "train": {"lr": 0.001}}
    assert config_differences(was, now) == (
        "model.g_supervised '(unset)' there, 1.0 here; model.g_temperature 1.0 there, 4.0 here"
    )
    many = {"model": {f"k{i}": i for i in range(9)}}
    assert config_differences({"model": {}}, many).endswith("and 3 more")
