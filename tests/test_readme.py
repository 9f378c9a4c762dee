"""The README's Python quickstart runs as written, in a fresh folder, so the docs cannot go
stale; and the API is the command line's code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import aftrec
from aftrec.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    section = README.read_text().split("## Quickstart in Python", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return code


def test_readme_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(quickstart(), "README.md quickstart", "exec"), scope)
    run = tmp_path / "runs" / "syn"
    assert json.loads((run / "metrics.json").read_text())["average"]["recall@50"] > 0
    recs = pd.read_parquet(tmp_path / "recs.parquet")
    assert list(recs.columns) == ["user", "domain", "item", "rank", "score"]
    answer = scope["answer"]
    assert isinstance(answer, aftrec.Recommendation) and len(answer.results[0].items) == 5


def test_api_and_cli_write_the_same_files(tmp_path: Path) -> None:
    """Same inputs, same outputs: the command is the function plus printing."""
    syn = ["--users", "200", "--items-per-domain", "40", "--interactions-count", "5000"]
    assert main(["prepare", "--dataset", "synthetic", *syn, "--out", str(tmp_path / "c")]) == 0
    cfg = aftrec.SyntheticConfig(n_users=200, items_per_domain=40, n_interactions=5000)
    data = aftrec.prepare(tmp_path / "a", dataset="synthetic", synthetic=cfg)
    for name in ("train.parquet", "test.parquet", "items.parquet"):
        assert (data / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    over = ["train.epochs=1", "train.max_batches_per_epoch=3", "model.dim=8", "model.hidden=16",
            "data.history_len=5"]  # fmt: skip
    res = aftrec.train(data, "two-tower", tmp_path / "ra", overrides=over, progress=False)
    assert res.rank == 0 and res.world == 1 and res.epochs_run == 1
    argv = ["train", "--data", str(data), "--model", "two-tower", "--quiet", "--set", *over]
    assert main([*argv, "--out", str(tmp_path / "rc")]) == 0
    ours = aftrec.evaluate(res.run, n=[10], progress=False)
    assert main(["evaluate", "--run", str(tmp_path / "rc"), "--n", "10", "--quiet"]) == 0
    theirs = json.loads((tmp_path / "rc" / "metrics.json").read_text())
    assert ours.average == pytest.approx(theirs["average"])
    # the errors are the command's: one message, raised as an AftrecError
    with pytest.raises(aftrec.ConfigError, match="drop --model/--config/--set"):
        aftrec.train(None, "pop", res.run, resume=True)
    with pytest.raises(aftrec.DataError, match="choose a source"):
        aftrec.prepare(tmp_path / "x")


def test_set_up_is_two_commands_and_the_demo_output_on_one_screen() -> None:
    """README's "Set up": `make demo` and `make test`, then the demo's output as printed (its
    seven steps in order) and nothing more than a screen."""
    from aftrec.demo import CHART
    from tests.test_demo import STEP

    section = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 50
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    commands = [line.split("#")[0].strip() for lang, b in blocks if lang == "bash" for line in
                b.splitlines()]  # fmt: skip
    assert commands == ["make demo", "make test"]
    (output,) = [b for lang, b in blocks if lang == "text"]
    steps = [m.group(2) for m in map(STEP.match, output.splitlines()) if m]
    assert steps == ["prepare", "train", "compare", "export", "serve", "ask", "stop"]
    assert "demo finished in" in output
    # the chart the demo writes, not the report's recall50.png beside it
    charts = re.findall(r"chart (\S+\.png)", output)
    assert charts and all(Path(c).name == CHART for c in charts), charts
