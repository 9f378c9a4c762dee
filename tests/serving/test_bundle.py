"""Bundles: export a trained run, load it back, and get the training model's vectors and the
evaluator's rankings; refuse damaged bundles and models that cannot be served."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("faiss")

from aftrec.cli import main
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import Batch, make_batch
from aftrec.errors import ConfigError
from aftrec.evaluation.ranking import rank_domain, top_k
from aftrec.models.two_tower import TwoTower, TwoTowerConfig
from aftrec.registry import available_models, create_model, model_config_class
from aftrec.serving import bundle as bundle_mod
from aftrec.serving.bundle import (
    BundleError,
    contents_from_model,
    load_bundle,
    read_manifest,
    write_bundle,
)
from aftrec.serving.cli import add_parsers
from aftrec.serving.recommender import Recommender
from aftrec.training.rundir import load_run
from tests.serving import exported, trained_run


def test_encoder_vectors_equal_the_training_model(root: Path, tiny_dir: Path, bundle: Path) -> None:
    cfg, data, model = load_run(trained_run(root, tiny_dir))
    rec = Recommender.load(bundle)
    history = HistoryIndex(data.train_valid, data.info)
    users = np.arange(0, data.info.n_users, 15)
    for d in range(data.info.n_domains):
        batch = make_batch(data.info, history, users, np.full(len(users), d), cfg.data.history_len)
        with torch.inference_mode():
            want = model.user_vectors(batch, d)
        got = []
        for i, u in enumerate(users):
            hist, counts = rec.encoder_input(rec._behaviours(str(data.users["user"][u]), None))
            torch.testing.assert_close(hist[0], batch.history[i])  # same input as the evaluator
            torch.testing.assert_close(counts[0], batch.counts[i])
            with torch.inference_mode():
                got.append(rec.bundle.encoders[d](hist, counts))
        torch.testing.assert_close(torch.cat(got), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            load_bundle(bundle).item_vectors(d), model.item_vectors(d).detach().numpy()
        )


@pytest.mark.parametrize("model_name", ["two-tower", "pop"])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_top_n_equals_the_evaluators_ranking(
    root: Path, tiny_dir: Path, exclude_seen: bool, model_name: str
) -> None:
    """Popularity's equal counts tie at the cut: a tie decides alike (FAISS's heap order
    made a bundle's top n another set than the evaluator's)."""
    cfg, data, model = load_run(trained_run(root, tiny_dir, model_name))
    rec = Recommender.load(exported(root, tiny_dir, model_name))
    history = HistoryIndex(data.train_valid, data.info)
    users = np.arange(0, data.info.n_users, 12)
    item_ids = data.items["item"].astype(str).to_numpy()
    for d in range(data.info.n_domains):
        lo, _ = data.info.domain_range(d)
        for rb in rank_domain(model, data.info, history, users, d, 30, 64, cfg.data.history_len):
            top, top_scores = rb.top_items, rb.top_scores
            if not exclude_seen:
                top = top_k(rb.scores, 30)
                top_scores = rb.scores.gather(1, top)
            for i, u in enumerate(rb.users):
                got = rec.recommend(
                    user=str(data.users["user"][u]),
                    domain=data.info.domains[d],
                    n=30,
                    exclude_seen=exclude_seen,
                ).results[0]
                want = item_ids[top[i].numpy() + lo].tolist()
                assert got.items == want, (u, d)
                torch.testing.assert_close(
                    torch.tensor(got.scores, dtype=torch.float32), top_scores[i]
                )
                if exclude_seen:
                    seen = set(item_ids[rb.seen[i].nonzero().ravel().numpy() + lo])
                    assert not seen & set(got.items)


def test_manifest_lists_every_file_with_its_checksum(bundle: Path) -> None:
    m = read_manifest(bundle)
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == {*m["files"], "manifest.json", "manifest.sha256"}
    for rel, meta in m["files"].items():
        data = (bundle / rel).read_bytes()
        assert meta["bytes"] == len(data)
        assert meta["sha256"] == bundle_mod._sha256_bytes(data)
    assert m["encoder"]["format"] == "torchscript" and not m["encoder"]["trial"]
    assert {"aftrec", "torch", "faiss", "numpy", "python"} <= set(m["versions"])
    assert m["model"]["name"] == "two-tower" and len(m["model"]["weights_sha256"]) == 64
    assert [ix["kind"] for ix in m["indexes"]] == ["flat"] * 3
    assert m["model_version"].startswith("two-tower-")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def _rewrite_manifest(b: Path, m: dict[str, Any]) -> None:
    """Edit the manifest as someone who also updates its digest would."""
    raw = json.dumps(m).encode()
    (b / "manifest.json").write_bytes(raw)
    (b / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "fails its checksum"),
        ("truncate", "bytes, the manifest says"),
        ("delete", "is missing"),
        ("manifest-garbage", "unreadable manifest"),
        ("manifest-escape", "files: entry '../../etc/passwd' points outside the bundle"),
        ("manifest-version", "bundle format"),
        ("no-manifest", "not a bundle"),
        ("no-digest", "manifest.sha256 is missing"),
    ],
)
def test_damaged_bundles_are_refused(
    bundle: Path, tmp_path: Path, damage: str, message: str
) -> None:
    b = _copy(bundle, tmp_path)
    target = b / "items" / "vectors_1.npy"
    manifest = b / "manifest.json"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-4])
    elif damage == "delete":
        (b / "encoder" / "user_2.pt").unlink()
    elif damage == "manifest-garbage":
        manifest.write_text("{not json")
    elif damage == "manifest-escape":
        m = json.loads(manifest.read_text())
        m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 0}
        _rewrite_manifest(b, m)
    elif damage == "manifest-version":
        m = json.loads(manifest.read_text())
        m["format_version"] = 99
        manifest.write_text(json.dumps(m))
    elif damage == "no-digest":
        (b / "manifest.sha256").unlink()
    else:
        manifest.unlink()
    with pytest.raises(BundleError, match=message):
        Recommender.load(b)


def _replace_file(b: Path, rel: str, data: bytes) -> None:
    """Put ``data`` at ``rel`` and update the manifest's entry and its digest to match."""
    (b / rel).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _rewrite_manifest(b, m)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _nan(a: np.ndarray) -> np.ndarray:
    return np.full_like(a, np.nan)


_ARRAY_EDITS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "history-float": ("history/items.npy", lambda a: a.astype(np.float64)),
    "history-2d": ("history/items.npy", lambda a: a.reshape(-1, 1)),
    "seg-start-float": ("history/seg_start.npy", lambda a: a.astype(np.float64)),
    "item-input-float": ("encoder/item_input.npy", lambda a: a.astype(np.float64)),
    "popularity-2d": ("popularity/counts.npy", lambda a: a.reshape(-1, 1)),
    "popularity-nan": ("popularity/counts.npy", _nan),
    "vectors-float64": ("items/vectors_1.npy", lambda a: a.astype(np.float64)),
    "vectors-rows": ("items/vectors_1.npy", lambda a: a[:3].copy()),
}


class _ThreeDims(torch.nn.Module):
    """An encoder answering 3-dimensional vectors, whatever the indexes hold."""

    def forward(self, history: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return torch.zeros(history.shape[0], 3)


class _OneDomain(torch.nn.Module):
    """An encoder of a one-domain bundle: it wants (B, 1, L) histories."""

    def forward(self, history: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return history.view(history.shape[0], history.shape[2]).float()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("swap-indexes", r"indexes\[0\] \(d0\) holds \d+ items, the domain has \d+"),
        ("kind", r"index/user_0.faiss is not the hnsw index the manifest names"),
        ("popularity", r"popularity/counts.npy has 3 entries, the manifest says \d+"),
        ("item-input", r"encoder/item_input.npy holds indices outside"),
        ("seg-start", r"history/seg_start.npy does not split history/items.npy"),
        # each passed the length checks: a float history answered every known user with a
        # 500, a (n, 1) popularity nested lists in responses, NaN counts null scores
        ("history-float", r"history/items.npy holds a \(\d+,\) float64 array, want 1-D int"),
        ("history-2d", r"history/items.npy holds a \(\d+, 1\) int64 array, want 1-D int"),
        ("seg-start-float", r"history/seg_start.npy holds a \(\d+,\) float64 array"),
        ("item-input-float", r"encoder/item_input.npy holds a \(\d+,\) float64 array"),
        ("popularity-2d", r"popularity/counts.npy holds a \(\d+, 1\) float32 array"),
        ("popularity-nan", r"popularity/counts.npy holds .* want 1-D finite counts"),
        ("vectors-float64", r"items/vectors_1.npy holds a \(\d+, \d+\) float64 array, want"),
        ("vectors-rows", r"items/vectors_1.npy holds a \(3, \d+\) float32 array, want \(\d+,"),
        # a KeyError from the recommender; an AssertionError from FAISS at warm-up
        ("no-item-column", r"ids/items.parquet has no 'item' column"),
        ("encoder-dim", r"encoder/user_0.pt answers vectors of shape \(1, 3\) for one user"),
        ("encoder-input", r"encoder/user_1.pt fails on this bundle's input \(RuntimeError"),
    ],
)
def test_files_that_do_not_belong_together_are_refused(
    bundle: Path, tmp_path: Path, edit: str, message: str
) -> None:
    """Files whose checksums were updated to match (a hand-made bundle, a bad copy script)
    but that do not fit one another: loaded before, they served another domain's items, or
    failed on every request with a 500 or the server with a traceback."""
    b = _copy(bundle, tmp_path)
    if edit == "swap-indexes":  # another domain's index: another size
        faiss = pytest.importorskip("faiss")
        other = faiss.IndexFlatIP(json.loads((b / "manifest.json").read_text())["encoder"]["dim"])
        other.add(np.ones((3, other.d), np.float32))
        _replace_file(b, "index/user_0.faiss", faiss.serialize_index(other).tobytes())
    elif edit == "kind":
        m = json.loads((b / "manifest.json").read_text())
        m["indexes"][0]["kind"], m["indexes"][0]["search_param"] = "hnsw", 16
        _rewrite_manifest(b, m)
    elif edit == "popularity":
        _replace_file(b, "popularity/counts.npy", _npy(np.zeros(3, np.int64)))
    elif edit == "item-input":
        items = np.load(b / "encoder" / "item_input.npy")
        _replace_file(b, "encoder/item_input.npy", _npy(items + 10**6))
    elif edit == "seg-start":
        seg = np.load(b / "history" / "seg_start.npy")
        _replace_file(b, "history/seg_start.npy", _npy(seg[::-1].copy()))
    elif edit in _ARRAY_EDITS:
        rel, change = _ARRAY_EDITS[edit]
        _replace_file(b, rel, _npy(change(np.load(b / rel))))
    elif edit == "no-item-column":
        items = pd.read_parquet(b / "ids" / "items.parquet").rename(columns={"item": "id"})
        buf = io.BytesIO()
        items.to_parquet(buf, index=False)
        _replace_file(b, "ids/items.parquet", buf.getvalue())
    else:  # an encoder of another bundle: another dimension, or another input
        module = torch.jit.script(_ThreeDims() if edit == "encoder-dim" else _OneDomain())
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        _replace_file(b, f"encoder/user_{0 if edit == 'encoder-dim' else 1}.pt", buf.getvalue())
    with pytest.raises(BundleError, match=message):
        Recommender.load(b)


@pytest.mark.parametrize(
    ("key", "value"),
    [("offsets", [0, 400, 1000, 1500]), ("history_len", 20), ("n_users", 1)],
)
def test_an_edited_manifest_is_refused(bundle: Path, tmp_path: Path, key: str, value: Any) -> None:
    """The manifest is covered like every other file: editing offsets made the first domain
    answer 500 and the second serve another domain's items; history_len changed rankings."""
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    if key == "history_len":
        m["encoder"][key] = value
    else:
        m[key] = value
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(BundleError, match=r"manifest.json: fails its checksum in manifest.sha256"):
        Recommender.load(b)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("encoder"), r"invalid manifest: encoder: Field required"),
        (
            lambda m: m["encoder"].update(history_len="50"),
            r"invalid manifest: encoder.history_len: Input should be a valid integer",
        ),
        (
            lambda m: m.update(domains="d0"),
            r"invalid manifest: domains: Input should be a valid list",
        ),
        (
            lambda m: m.update(offsets=[0, 400, 1000, 1500]),
            r"invalid manifest: offsets: end at 1500, n_items is 240",
        ),
        (lambda m: m["indexes"].pop(), r"invalid manifest: indexes: 2 entries do not match"),
        (  # FAISS keeps efSearch in a C int, nprobe in a size_t: an OverflowError at load
            lambda m: m["indexes"][0].update(search_param=2**70),
            r"invalid manifest: indexes.0.search_param: Input should be less than or equal to "
            r"2147483647",
        ),
        (
            lambda m: m["files"]["ids/items.parquet"].pop("sha256"),
            r"invalid manifest: files.ids/items.parquet.sha256: Field required",
        ),
    ],
)
def test_the_manifest_schema_names_what_is_wrong(
    bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    """A missing key or a wrong type is one BundleError naming the key (not a KeyError: a
    missing ``encoder`` key used to give a 500 on reload and a traceback from serve)."""
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    _rewrite_manifest(b, m)
    with pytest.raises(BundleError, match=message):
        Recommender.load(b)


def test_a_search_param_above_the_index_is_lowered_to_it(
    root: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    """IVF probes at most its cells, HNSW visits at most its items: a larger knob finds the
    same items, and a huge efSearch made every search allocate for it (minutes each)."""
    b = _copy(exported(root, tiny_dir, exact_max=10), tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    assert m["indexes"][0]["kind"] == "ivf"
    m["indexes"][0]["search_param"] = 2**31 - 1
    _rewrite_manifest(b, m)
    index = load_bundle(b).indexes[0].index
    assert index.nprobe == index.nlist


def test_a_bundle_that_fails_its_warm_up_is_refused(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files that pass every check at load but fail together when first used are a
    BundleError naming the bundle, not the bare exception (FAISS's AssertionError)."""

    def broken(self: Recommender, runs: int = 3) -> None:
        raise AssertionError

    monkeypatch.setattr(Recommender, "warm_up", broken)
    with pytest.raises(BundleError, match=r"the bundle fails its warm-up \(AssertionError"):
        Recommender.load(bundle)


def test_serve_refuses_a_bad_manifest_in_one_line(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    del m["encoder"]
    _rewrite_manifest(b, m)
    assert main(["serve", "--bundle", str(b), "--port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "encoder: Field required" in err[0]


def test_force_replaces_a_bundle_not_a_run_or_a_folder_of_runs(
    root: Path, tiny_dir: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--force`` replaces (deletes) the old --out: a bundle or an empty folder only. Given the
    run itself, or the folder of runs it sits in, export used to delete them and write the
    bundle in their place."""
    runs = tmp_path / "runs"
    run = runs / "tt"
    shutil.copytree(trained_run(root, tiny_dir), run)
    before = sorted(p.name for p in run.iterdir())
    for out in (run, runs):
        assert main(["export", "--run", str(run), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"error: {out} exists and is not a bundle" in err, err
    assert sorted(p.name for p in run.iterdir()) == before
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    assert main(["export", "--run", str(run), "--out", str(again), "--force"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "empty"), "--force"]) == 0


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle here"):
        Recommender.load(tmp_path / "nothing")


class NotDotProduct(TwoTower):
    dot_product = False


class ReadsUserIds(TwoTower):
    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        return super().user_vectors(batch, domain) + batch.users[:, None].float()


@pytest.mark.parametrize(
    ("cls", "message"),
    [(NotDotProduct, "not a dot-product model"), (ReadsUserIds, "reads the user index")],
)
def test_models_that_cannot_be_served_are_refused(
    tiny: Dataset, cls: type[TwoTower], message: str
) -> None:
    model = cls(TwoTowerConfig(dim=8), tiny.info, 4)
    with pytest.raises(BundleError, match=message):
        contents_from_model(model, tiny, 4)


def test_writes_are_atomic(tiny: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = contents_from_model(TwoTower(TwoTowerConfig(dim=8), tiny.info, 4), tiny, 4)
    out = tmp_path / "b"
    write_bundle(contents, out)
    first = read_manifest(out)["version"]
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(contents, out)

    def boom(*args: object) -> bytes:
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_mod, "_index_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(contents, out, force=True)
    assert read_manifest(out)["version"] == first  # the old bundle is untouched
    monkeypatch.undo()
    contents.popularity = contents.popularity + 1  # a different bundle
    write_bundle(contents, out, force=True)
    assert read_manifest(out)["version"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left
    Recommender.load(out)


def test_export_command(
    root: Path, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="aftrec")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    run = trained_run(root, tiny_dir)
    args = parser.parse_args(
        ["export", "--run", str(run), "--out", str(tmp_path / "b"), "--exact-max", "10"]
    )
    args.func(args)
    out = capsys.readouterr().out
    assert "wrote" in out and "ivf" in out and "recall@200" in out
    m = read_manifest(tmp_path / "b")
    assert {ix["kind"] for ix in m["indexes"]} == {"ivf"}
    assert all(ix["recall"] >= 0.97 for ix in m["indexes"])
    serve = parser.parse_args(["serve", "--bundle", "b", "--port", "8123"])
    assert serve.port == 8123 and serve.host == "127.0.0.1"
    huge = parser.parse_args(
        ["export", "--run", str(run), "--out", str(tmp_path / "c"), "--threads", "99999999999"]
    )
    with pytest.raises(ConfigError, match=r"--threads must be an integer in \[0, 1024\]"):
        huge.func(huge)  # OpenMP's int would overflow
    assert not (tmp_path / "c").exists()


def _two_tower_whose_user_vectors(tiny: Dataset, change: Callable[..., torch.Tensor]) -> TwoTower:
    """A two-tower model whose ``user_vectors`` is passed through ``change(batch, u)``."""
    torch.manual_seed(0)
    model = create_model("two-tower", resolve("two-tower", None, ["model.dim=16"]).model,
                         tiny.info, 4)  # fmt: skip
    plain = model.user_vectors
    model.user_vectors = lambda batch, domain: change(batch, plain(batch, domain))  # type: ignore[method-assign]
    assert isinstance(model, TwoTower)
    return model


def test_an_encoder_that_traced_one_branch_of_its_data_is_refused(tiny: Dataset) -> None:
    """The trace example is a full history, so a branch on "is the history full?" is frozen
    on its first arm; real and cold-start users take the other, and export says so."""
    pad = tiny.info.pad

    def branchy(batch: Batch, u: torch.Tensor) -> torch.Tensor:
        return 2 * u if bool((batch.history != pad).all()) else u

    model = _two_tower_whose_user_vectors(tiny, branchy)
    with pytest.raises(BundleError, match=r"does not reproduce TwoTower\.user_vectors"):
        contents_from_model(model, tiny, 4, sample_users=16)


def test_an_encoder_with_its_batch_size_frozen_is_refused(tiny: Dataset) -> None:
    """A size taken from the one-user trace example (``len(batch)``) becomes a constant: the
    encoder then answers one user at a time only, which a batching server cannot use."""

    def one_at_a_time(batch: Batch, u: torch.Tensor) -> torch.Tensor:
        return u.reshape(len(batch), -1)

    model = _two_tower_whose_user_vectors(tiny, one_at_a_time)
    with pytest.raises(BundleError, match="answers one user at a time only"):
        contents_from_model(model, tiny, 4, sample_users=16)


#: exported in the default run: the paper's model, the reference, and a model that trims
#: padding to the longest history (traced on a full one); the rest of the registry is slow
QUICK = ("aft", "two-tower", "sasrec")


@pytest.mark.parametrize(
    "name",
    [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in available_models()],
)
def test_every_registered_model_exports(tiny: Dataset, tmp_path: Path, name: str) -> None:
    """Tracing records one path through a model; export checks the traced encoders against
    the eager ones on real and cold-start histories, for every model in the registry."""
    fields = {f.name for f in dataclasses.fields(model_config_class(name))}
    overrides = [f"model.{k}=16" for k in ("dim", "hidden", "g_hidden") if k in fields]
    cfg = resolve(name, None, overrides)
    torch.manual_seed(0)
    model = create_model(name, cfg.model, tiny.info, 4)
    if not model.trainable:
        model.fit(tiny.train)
    if not model.dot_product:
        with pytest.raises(BundleError, match="not a dot-product model"):
            contents_from_model(model, tiny, 4, sample_users=16)
        return
    contents = contents_from_model(model, tiny, 4, sample_users=16)
    assert (contents.trial_encoders is not None) == ("trial" in model.serving_channels())
    write_bundle(contents, tmp_path / "b")
    rec = Recommender.load(tmp_path / "b")
    res = rec.recommend(user="0", n=10)
    assert [len(r.items) for r in res.results] == [10, 10, 10]


def test_weights_replaced_while_exported_are_refused_not_misrecorded(
    root: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aftrec export`` of a run that trains on: a best.pt written after the weights were
    loaded was the one hashed, so the manifest's ``weights_sha256`` named other weights than
    the bundle's."""
    from aftrec.training import checkpoint, rundir

    run = tmp_path / "run"
    shutil.copytree(trained_run(root, tiny_dir), run)
    loaded = rundir.load_run

    def while_training(*args: Any, **kwargs: Any) -> Any:
        out = loaded(*args, **kwargs)
        checkpoint.save(checkpoint.load(run / "best.pt"), run / "best.pt")  # a new best lands
        return out

    monkeypatch.setattr(rundir, "load_run", while_training)
    with pytest.raises(BundleError, match=r"best\.pt was replaced while it was exported"):
        bundle_mod.export_run(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    monkeypatch.setattr(rundir, "load_run", loaded)
    bundle_mod.export_run(run, tmp_path / "bundle")
    weights = read_manifest(tmp_path / "bundle")["model"]["weights_sha256"]
    assert weights == hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
