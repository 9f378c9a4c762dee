"""Bad arguments to the Python API (``aftrec.evaluate``, ``recommend``, ``export`` and
``Recommender``): one error of the project naming the argument, and nothing written."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aftrec import api
from aftrec.errors import CheckpointError, ConfigError, OutputError
from aftrec.training import checkpoint
from tests.inputs import snapshot


def _ids(value: object) -> str | None:
    return repr(value) if isinstance(value, dict) else None


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, free to be written and damaged."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# --------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n": 20}, "--n takes a sequence"),
        ({"n": "20"}, "--n takes a sequence"),
        ({"n": []}, "--n needs at least one"),
        ({"n": [20.5]}, "--n must be an integer, got 20.5"),
        ({"n": [math.nan]}, "--n must be an integer, got nan"),
        ({"n": [True]}, "--n must be an integer, got True"),
        ({"n": [0]}, "--n must be at least 1, got 0"),
        ({"sampled_negatives": "5"}, "--sampled-negatives must be an integer, got '5'"),
        ({"sampled_negatives": 5.5}, "--sampled-negatives must be an integer, got 5.5"),
        ({"split": None}, "--split must be test or valid, got None"),
        ({"which": None}, "--which must be best or last, got None"),
    ],
    ids=_ids,
)
def test_evaluate_refuses_bad_arguments(trained: Path, kwargs: dict[str, Any], needle: str) -> None:
    before = snapshot(trained)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        api.evaluate(trained, progress=False, **kwargs)
    assert snapshot(trained) == before


def test_evaluate_takes_numpy_integers(run_copy: Path) -> None:
    res = api.evaluate(run_copy, n=np.array([3, 5]), sampled_negatives=np.int64(4), progress=False)
    assert res.ns == (3, 5)
    assert api.metrics_path(run_copy, "test", 4).is_file()


def test_evaluate_leaves_the_old_pair_when_a_write_fails(run_copy: Path) -> None:
    api.evaluate(run_copy, n=[5], progress=False)
    metrics = run_copy / "metrics.json"
    old = metrics.read_bytes()
    (run_copy / "per_user.parquet").unlink()
    (run_copy / "per_user.parquet").mkdir()  # the per-user file cannot be replaced
    with pytest.raises(OutputError, match=r"per_user\.parquet"):
        api.evaluate(run_copy, n=[3], progress=False)
    assert metrics.read_bytes() == old
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused(run_copy: Path, value: float) -> None:
    best = run_copy / "best.pt"
    state = checkpoint.load(best)
    name = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], value)
    checkpoint.save(state, best)
    before = snapshot(run_copy)
    for call in (
        lambda: api.evaluate(run_copy, progress=False),
        lambda: api.recommend(run_copy, n=3),
        lambda: api.export(run_copy, run_copy.parent / "bundle"),
    ):
        with pytest.raises(CheckpointError, match=r"best\.pt: its weights hold NaN or infinite"):
            call()
    assert snapshot(run_copy) == before and not (run_copy.parent / "bundle").exists()


# --------------------------------------------------------------------------- recommend
@pytest.mark.parametrize(
    ("call", "kwargs", "needle"),
    [
        ("recommend", {"users": "u12"}, "--users takes a sequence of ids, e.g. ['u12']"),
        ("recommend", {"domains": "movie"}, "--domains takes a sequence of ids, e.g. ['movie']"),
        ("recommend", {"users": 12}, "--users takes a sequence of ids"),
        ("recommend", {"n": None}, "--n must be an integer, got None"),
        ("recommend", {"n": "5"}, "--n must be an integer, got '5'"),
        ("recommend", {"n": 5.5}, "--n must be an integer, got 5.5"),
        ("recommend", {"n": False}, "--n must be an integer, got False"),
        ("recommend", {"n": 0}, "--n must be at least 1, got 0"),
        ("export", {"threads": "1"}, "--threads must be an integer, got '1'"),
        ("export", {"threads": 1.0}, "--threads must be an integer, got 1.0"),
        ("export", {"threads": 99_999_999_999}, "--threads must be in [0, 1024], got 99999999999"),
        ("export", {"threads": -1}, "--threads must be in [0, 1024], got -1"),
        (
            "export",
            {"spec": {"kind": "flat"}},
            "spec must be an aftrec.serving.index.IndexSpec or None",
        ),
        ("export", {"which": None}, "--which must be best or last, got None"),
        ("export", {"which": "worst"}, "--which must be best or last, got 'worst'"),
    ],
    ids=_ids,
)
def test_recommend_and_export_refuse_bad_arguments(
    trained: Path, tmp_path: Path, call: str, kwargs: dict[str, Any], needle: str
) -> None:
    out = tmp_path / ("recs.csv" if call == "recommend" else "bundle")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        if call == "recommend":
            api.recommend(trained, out=out, **kwargs)
        else:
            api.export(trained, out, **kwargs)
    assert not out.exists()


def test_recommend_takes_numpy_integers_and_id_lists(trained: Path) -> None:
    frame = api.recommend(trained, n=np.int64(2), users=np.array(["u1", "u2"]), domains=("movie",))
    assert sorted(set(frame["user"])) == ["u1", "u2"]
    assert set(frame["domain"]) == {"movie"} and set(frame["rank"]) == {1, 2}


# --------------------------------------------------------------------------- Recommender
@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Any:
    pytest.importorskip("faiss")
    from aftrec.serving.recommender import Recommender
    from tests.serving import exported

    return Recommender.load(exported(tmp_path_factory.getbasetemp() / "serving", tiny_dir))


def test_recommend_many_refuses_what_is_not_a_list_of_queries(rec: Any) -> None:
    from aftrec.serving.recommender import Query, Recommendation, RequestError

    with pytest.raises(RequestError, match="queries must be a list of Query, got int"):
        rec.recommend_many(5)
    bad, good = rec.recommend_many([{"user": "0", "n": 3}, Query(user="0", n=3)])
    assert isinstance(bad, RequestError) and "a request must be a Query, got dict" in str(bad)
    assert isinstance(good, Recommendation)


def test_recommender_takes_a_numpy_n(rec: Any) -> None:
    res = rec.recommend(user="0", domain="d0", n=np.int64(3))
    assert len(res.results[0].items) == 3
    assert res.to_dict() == rec.recommend(user="0", domain="d0", n=3).to_dict()


def test_a_path_that_is_not_one_is_a_config_error(trained: Path, tmp_path: Path) -> None:
    for call in (
        lambda: api.evaluate(None, progress=False),  # type: ignore[arg-type]
        lambda: api.recommend(None, n=3),  # type: ignore[arg-type]
        lambda: api.recommend(trained, n=3, out=5),  # type: ignore[arg-type]
        lambda: api.export(None, tmp_path / "b"),  # type: ignore[arg-type]
        lambda: api.export(trained, ""),
    ):
        with pytest.raises(ConfigError, match=r"(run|out) must be a path, got"):
            call()
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- train
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"overrides": "train.epochs=1"}, "overrides takes a list of 'section.key=value'"),
        ({"overrides": {"train.epochs": 1}}, "overrides takes a list of 'section.key=value'"),
        ({"overrides": None}, "overrides takes a list"),
        ({"overrides": [1, 2]}, "overrides takes a list"),
        ({"out": None}, "out must be a path, got None"),
        ({"out": ""}, "out must be a path, got ''"),
        ({"data": 5}, "data must be a path, got 5"),
        ({"config": 5}, "config must be a path, got 5"),
        ({"resume": "no"}, "resume must be True or False, got 'no'"),
        ({"progress": None}, "progress must be True or False, got None"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_train_refuses_bad_arguments(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any], needle: str,
) -> None:  # fmt: skip
    """A string was read as its characters, a dict as its keys, ``out=""`` trained into the
    working directory, and others were a TypeError or an AttributeError from deep inside."""
    monkeypatch.chdir(tmp_path)
    args: dict[str, Any] = {"data": prepared, "model": "pop", "out": tmp_path / "run", **kwargs}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        api.train(
            args.pop("data"), args.pop("model"), args.pop("out"), **{"progress": False, **args}
        )
    assert list(tmp_path.iterdir()) == []


def test_train_and_export_leave_the_callers_threads(trained: Path, tmp_path: Path) -> None:
    """``train.threads`` and ``export(threads=...)`` are the run's and the build's: a notebook
    went on single-threaded after them."""
    from aftrec.serving.index import faiss_module

    faiss = faiss_module()
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        torch.set_num_threads(2)
        faiss.omp_set_num_threads(2)
        run = api.train(
            _data_of(trained), "pop",
            tmp_path / "run", overrides=["train.threads=1"], progress=False,
        ).run  # fmt: skip
        assert torch.get_num_threads() == 2
        api.export(run, tmp_path / "bundle", threads=1)
        assert faiss.omp_get_max_threads() == 2
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def _data_of(run: Path) -> Path:
    from aftrec.training.rundir import run_data_dir

    return run_data_dir(run)


def test_evaluate_returns_the_table_it_writes(trained: Path, tmp_path: Path) -> None:
    import pandas as pd

    run = Path(shutil.copytree(trained, tmp_path / "run"))
    res = api.evaluate(run, progress=False)
    written = pd.read_parquet(run / "per_user.parquet")
    assert "user" in res.per_user.columns and list(res.per_user.columns) == list(written.columns)
    assert "per_user" not in repr(res)  # a notebook shows the result, not the whole table


def test_the_package_names_are_listed_and_typed() -> None:
    import aftrec

    listed = set(dir(aftrec))
    assert {"train", "evaluate", "Recommender", "TrainResult", "__version__"} <= listed
    assert not {"import_module", "TYPE_CHECKING", "Any", "annotations", "_WHERE"} & listed


def test_prepare_and_its_settings_refuse_what_is_not_theirs(tmp_path: Path) -> None:
    """A dict for ``synthetic`` or ``split`` was an AttributeError deep inside, a number for a
    path a TypeError, a string count a comparison error, a float count NumPy's."""
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.data.split import SplitConfig
    from aftrec.serving.recommender import Recommender

    out = tmp_path / "data"
    cases: list[tuple[Any, str]] = [
        (lambda: api.prepare(out, dataset="synthetic", synthetic={"n_users": 10}),  # type: ignore[arg-type]
         "synthetic must be a SyntheticConfig, got {'n_users': 10}"),
        (lambda: api.prepare(out, dataset="synthetic", split={"valid_ratio": 0.1}),  # type: ignore[arg-type]
         "split must be a SplitConfig, got {'valid_ratio': 0.1}"),
        (lambda: api.prepare(out, dataset="ml-100k", path=5),  # type: ignore[arg-type]
         "path must be a path, got 5"),
        (lambda: api.prepare(out, interactions=5, items="i.csv"),  # type: ignore[arg-type]
         "interactions must be a path, got 5"),
        (lambda: SyntheticConfig(n_users="10"),  # type: ignore[arg-type]
         "SyntheticConfig: n_users must be an integer, got '10'"),
        (lambda: SyntheticConfig(n_users=50.5),  # type: ignore[arg-type]
         "SyntheticConfig: n_users must be an integer, got 50.5"),
        (lambda: SplitConfig(test_ratio="0.2"),  # type: ignore[arg-type]
         "split.test_ratio must be a number, got '0.2'"),
        (lambda: SplitConfig(min_positives=2.5),  # type: ignore[arg-type]
         "split.min_positives must be an integer, got 2.5"),
        (lambda: Recommender.load(None),  # type: ignore[arg-type]
         "path must be a bundle's folder, got None"),
        (lambda: api.prepare(out, dataset="synthetic", force="no"),  # type: ignore[arg-type]
         "force must be True or False, got 'no'"),
        (lambda: api.evaluate(out, progress="no"),  # type: ignore[arg-type]
         "progress must be True or False, got 'no'"),
        (lambda: Recommender.load(out, verify="no"),  # type: ignore[arg-type]
         "verify must be True or False, got 'no'"),
    ]  # fmt: skip
    for call, needle in cases:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            call()
    assert not out.exists()
    api._flags(force=np.bool_(True), progress=False)  # NumPy's bools are bools too
    # NumPy numbers are taken as the Python numbers they hold (meta.json records them)
    split = SplitConfig(test_ratio=np.float32(0.7), min_positives=np.int64(3))
    assert type(split.min_positives) is int and type(split.test_ratio) is float
    assert split.test_ratio == float(np.float32(0.7))


def test_overrides_given_as_a_generator_are_read_once(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check read a generator to its end, and the run trained with the defaults."""
    from aftrec.training import trainer

    class Seen(Exception):
        pass

    def seeing(data: Path, cfg: Any, out: Path, **kw: Any) -> Any:
        raise Seen(cfg.train.epochs)

    monkeypatch.setattr(trainer, "train", seeing)
    with pytest.raises(Seen) as seen:
        api.train(prepared, "pop", tmp_path / "run", progress=False,
                  overrides=(o for o in ["train.epochs=3"]))  # fmt: skip
    assert seen.value.args == (3,)


def test_force_is_suggested_only_where_it_would_replace(trained: Path, tmp_path: Path) -> None:
    """An --out that --force would refuse to replace (a run, a file) said "pass --force to
    replace it", and with --force was refused."""
    from aftrec.serving.bundle import BundleError

    user_file = tmp_path / "notes.py"
    user_file.write_text("x = 1\n")
    for call in (
        lambda: api.export(trained, trained),
        lambda: api.export(trained, user_file),
        lambda: api.prepare(user_file, dataset="synthetic"),
    ):
        refusal = r"exists and is not a|a file, not a folder"
        with pytest.raises(OutputError, match=refusal) as refused:
            call()
        assert "--force to replace" not in str(refused.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises((BundleError, OutputError), match="pass --force to replace it"):
        api.export(trained, tmp_path / "empty")
    assert user_file.read_text() == "x = 1\n"
