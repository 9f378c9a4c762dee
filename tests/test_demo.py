"""``aftrec demo`` end to end on a tiny synthetic dataset: the seven timed steps, the table
sorted by average Recall@50, the chart, the bundle, both served answers; run again, it
reuses every run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from aftrec.cli import build_parser
from aftrec.data.sources.synthetic import SyntheticConfig
from aftrec.demo import MODELS, DemoSpec, run_demo

TINY = (
    "train.epochs=2", "train.max_batches_per_epoch=3", "train.batch_size=64",
    "data.history_len=8", "train.threads=1", "model.dim=16",
)  # fmt: skip
SYNTHETIC = SyntheticConfig(
    n_users=200, n_domains=3, items_per_domain=150, n_interactions=5000, seed=3
)
STEP = re.compile(r"^\[(\d)/7\] (\w+) +[\d.ms]+  ")
#: two-tower unable to improve (lr 0) with patience 1 stops early, after 2 of its 3 epochs
STOPS = ("two-tower:train.epochs=3", "two-tower:train.patience=1", "two-tower:train.lr=0")


def test_demo_end_to_end_then_resumed(tmp_path: Path) -> None:
    spec = DemoSpec(
        "synthetic", tmp_path / "demo", jobs=2, overrides=(*TINY, *STOPS), synthetic=SYNTHETIC
    )
    lines: list[str] = []
    res = run_demo(spec, echo=lines.append)

    steps = [m.groups() for m in map(STEP.match, lines) if m]
    assert steps == [
        (str(i), name)
        for i, name in enumerate(
            ["prepare", "train", "compare", "export", "serve", "ask", "stop"], start=1
        )
    ], lines
    text = "\n".join(lines)
    assert "5 trained" in text and "reused" not in text
    # how each run ended, as it recorded: aft and aft-d ran their 2 epochs
    ended = "1 to early stopping, 2 at the epoch cap, 2 fitted in closed form"
    assert f"5 models, 2 at a time: {ended} (5 trained) -> " in text, text
    assert "two-tower 2 epochs" in text

    # one table of every model, best average first, as printed
    assert sorted(m for m, _ in res.rows) == sorted(MODELS)
    averages = [per["average"] for _, per in res.rows]
    assert averages == sorted(averages, reverse=True)
    assert all(set(per) == {"d0", "d1", "d2", "average"} for _, per in res.rows)
    table = lines[lines.index(next(x for x in lines if "model" in x and "average" in x)) + 1 :]
    assert [row.split()[0] for row in table[: len(MODELS)]] == [m for m, _ in res.rows]
    assert res.chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the demo's chart is a file of its own: the report's, which report.md embeds, stays
    embedded = res.report.parent / "recall50.png"
    assert "](recall50.png)" in res.report.read_text() and embedded.is_file()
    assert res.chart.parent == spec.folder and res.chart.read_bytes() != embedded.read_bytes()
    assert f"chart {res.chart}" in text
    assert (res.report).is_file() and (res.bundle / "manifest.json").is_file()
    assert res.served == res.rows[0][0]  # every model of the demo is a dot-product model

    known, new = res.answers["known"]["results"], res.answers["new"]["results"]
    assert len(known) == 1 and known[0]["path"] == "history" and len(known[0]["items"]) == 5
    assert len(new) == 1 and new[0]["path"] == "cross-domain" and new[0]["domain"] == "d2"
    assert any(x.strip().startswith("known user ") for x in lines)
    assert any(x.strip().startswith("new user who liked ") for x in lines)

    again: list[str] = []
    run_demo(spec, echo=again.append)
    assert "reused synthetic" in again[0]
    assert f"{ended} (0 trained, 5 reused)" in "\n".join(again)


def test_demo_does_not_count_a_failed_run_as_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aftrec.training import trainer

    real_train = trainer.train

    def failing(data: Path, cfg: Any, run: Path, **kw: Any) -> Any:
        if run.parent.name == "two-tower":
            raise RuntimeError("boom")
        return real_train(data, cfg, run, **kw)

    monkeypatch.setattr(trainer, "train", failing)  # --jobs 1 trains in this process
    spec = DemoSpec("synthetic", tmp_path / "demo", jobs=1, models=("pop", "two-tower"),
                    overrides=TINY, synthetic=SYNTHETIC)  # fmt: skip
    lines: list[str] = []
    run_demo(spec, echo=lines.append)
    (train,) = [x for x in lines if STEP.match(x) and " train " in x]
    assert ": 1 fitted in closed form (1 trained, 1 FAILED (see the report)) -> " in train


@pytest.mark.parametrize("existed", [False, True])
def test_a_demo_stopped_while_preparing_leaves_no_folder_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool
) -> None:
    """Ctrl-C while step 1 writes the data: its unfinished copy is deleted, and so is the
    --out folder (and its parents) that the demo created for it; one that was there stays."""
    from aftrec import api
    from aftrec.outputs import atomic_directory

    def interrupted(out: Path, **kw: Any) -> Path:
        with atomic_directory(out):  # creates the folders above the data, as prepare does
            raise KeyboardInterrupt

    monkeypatch.setattr(api, "prepare", interrupted)
    out = tmp_path / "runs" / "demo" / "synthetic"
    if existed:
        out.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoSpec("synthetic", out, synthetic=SYNTHETIC), echo=lambda _: None)
    assert sorted(tmp_path.rglob("*")) == ([tmp_path / "runs", out.parent, out] if existed else [])


def test_a_demo_on_a_busy_folder_is_refused_before_preparing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another demo (or a reproduce) holds the folder's report lock: the demo is refused
    before step 1, which would prepare the same data beside the other one, and the error says
    another aftrec process, not necessarily `aftrec reproduce`."""
    from aftrec import api
    from aftrec.errors import OutputError
    from aftrec.experiments.reproduce import LOCK
    from aftrec.outputs import held

    def preparing(out: Path, **kw: Any) -> Path:
        raise AssertionError("step 1 ran on a busy folder")

    monkeypatch.setattr(api, "prepare", preparing)
    out = tmp_path / "demo"
    out.mkdir()
    lines: list[str] = []
    spec = DemoSpec("synthetic", out, overrides=TINY, synthetic=SYNTHETIC)
    with held(out, LOCK, "held"), pytest.raises(OutputError) as refused:
        run_demo(spec, echo=lines.append)
    said = str(refused.value)
    assert "another aftrec process" in said and "another `aftrec reproduce`" not in said, said
    assert lines == [] and sorted(p.name for p in out.iterdir()) == [LOCK]


def test_a_demo_holds_its_folder_from_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While step 1 prepares, a reproduce on the demo's folder is refused."""
    from aftrec import api
    from aftrec.errors import OutputError
    from aftrec.experiments.plan import ReproduceSpec
    from aftrec.experiments.reproduce import reproduce

    out = tmp_path / "demo"
    real_prepare = api.prepare
    seen: list[str] = []

    def preparing(data: Path, **kw: Any) -> Path:
        real_prepare(data, **kw)
        try:
            reproduce(ReproduceSpec(data=data, out=out, models=("pop",), seeds=1))
        except OutputError as exc:
            seen.append(str(exc))
        raise KeyboardInterrupt  # enough: the rest is the end-to-end test's

    monkeypatch.setattr(api, "prepare", preparing)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoSpec("synthetic", out, synthetic=SYNTHETIC), echo=lambda _: None)
    assert len(seen) == 1 and "another aftrec process" in seen[0], seen


@pytest.mark.parametrize("theirs", [False, True])
def test_a_folder_removed_by_a_stopping_demo_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs: bool
) -> None:
    """Another demo on the folder, stopped before anything was in it, removed the folder
    between this one's making it and locking it: made again, not "cannot write"; and, this
    one stopped too, removed again, though it was the other's when this one started."""
    from aftrec import api
    from aftrec.experiments import reproduce as rp

    real_lock, calls = rp.report_lock, []

    def racing(out: Path) -> Any:
        calls.append(out)
        if len(calls) == 1:
            out.rmdir()  # the other demo's cleanup
        return real_lock(out)

    def preparing(out: Path, **kw: Any) -> Path:
        raise KeyboardInterrupt  # enough: the folder was locked

    monkeypatch.setattr(rp, "report_lock", racing)
    monkeypatch.setattr(api, "prepare", preparing)
    out = tmp_path / "demo"
    if theirs:
        out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoSpec("synthetic", out, synthetic=SYNTHETIC), echo=lambda _: None)
    assert len(calls) == 2 and not out.exists()


def test_demo_command_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.dataset, args.out, args.jobs) == ("ml-100k", None, 2)
    assert DemoSpec(args.dataset).folder == Path("runs/demo/ml-100k")
    assert build_parser().parse_args(["demo", "--dataset", "ml-1m"]).dataset == "ml-1m"


def test_demo_refuses_a_folder_of_another_dataset(tmp_path: Path) -> None:
    from aftrec.api import prepare
    from aftrec.errors import ConfigError

    prepare(tmp_path / "demo" / "data", dataset="synthetic", synthetic=SYNTHETIC)
    with pytest.raises(ConfigError, match="holds synthetic, not ml-100k"):
        run_demo(DemoSpec("ml-100k", tmp_path / "demo"), echo=lambda _: None)
