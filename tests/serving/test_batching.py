"""Dynamic batching: traced encoders take any batch size, a batch answers every
request as it would be answered alone, a bad request fails alone, and the batcher gathers,
drops and retries requests as it promises; over HTTP, concurrent clients are batched."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from aftrec.cli import main
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.models.sasrec import ROWS_PER_CHUNK
from aftrec.registry import available_models, create_model, model_config_class
from aftrec.serving.api import create_app
from aftrec.serving.batching import Batcher, BatchSettings
from aftrec.serving.bundle import _full_batch, _trace
from aftrec.serving.recommender import (
    NoGeneratorError,
    Query,
    Recommendation,
    Recommender,
    RequestError,
    UnknownUserError,
)
from tests.serving import exported, running, trial_bundle


@pytest.fixture(scope="module")
def rec(bundle: Path) -> Recommender:
    return Recommender.load(bundle)


@pytest.fixture(scope="module")
def ivf_rec(root: Path, tiny_dir: Path) -> Recommender:
    rec = Recommender.load(exported(root, tiny_dir, exact_max=10))
    assert {ix.kind for ix in rec.bundle.indexes} == {"ivf"}
    return rec


@pytest.fixture(scope="module")
def trial_rec(root: Path, tiny: Dataset) -> Recommender:
    return Recommender.load(trial_bundle(root, tiny))


def item(data: Dataset, i: int) -> str:
    return str(data.items["item"][i])


def mixed_queries(data: Dataset) -> list[Query]:
    """Known and new users, one domain and all, several n, with and without exclusions."""
    return [
        Query(user="3", domain="d0", n=10),
        Query(user="17", n=25),
        Query(user="42", domain="d2", n=200, exclude_seen=False),
        Query(behaviours={"d1": [item(data, 90), item(data, 91)]}, domain="d1", n=7),
        Query(behaviours={}, n=5),  # nothing anywhere: popular
        Query(user=8, behaviours={"d2": [item(data, 170)]}, domain="d2", n=60),
        Query(user="3", domain="d0", n=10),  # the same request twice in one batch
        Query(user="299", domain="d1", n=1),
    ]


def assert_same(batched: Recommendation, alone: Recommendation) -> None:
    assert batched.user == alone.user and batched.model_version == alone.model_version
    assert len(batched.results) == len(alone.results)
    for b, a in zip(batched.results, alone.results, strict=True):
        assert (b.domain, b.path, b.channel, b.items) == (a.domain, a.path, a.channel, a.items)
        torch.testing.assert_close(
            torch.tensor(b.scores), torch.tensor(a.scores), rtol=1e-5, atol=1e-6
        )


def alone(rec: Recommender, q: Query) -> Recommendation | RequestError:
    try:
        return rec.recommend(**dataclasses.asdict(q))
    except RequestError as exc:
        return exc


# --- traced encoders take any batch size ---------------------------------------------------
@pytest.mark.parametrize("name", available_models())
def test_every_dot_product_encoder_takes_any_batch_size(tiny: Dataset, name: str) -> None:
    """Models used to build their target column with torch.full((len(batch),), ...), which
    tracing froze at the example's batch size of 1; and the sequence models' chunks of rows
    were unrolled at the example's one chunk, so a batch over 32 users failed."""
    fields = {f.name for f in dataclasses.fields(model_config_class(name))}
    cfg = resolve(
        name, None, [f"model.{k}=16" for k in ("dim", "hidden", "g_hidden") if k in fields]
    )
    torch.manual_seed(0)
    model = create_model(name, cfg.model, tiny.info, 4)
    if not model.dot_product:
        pytest.skip("not served from an index")
    if not model.trainable:
        model.fit(tiny.train)
    model.eval()
    info = tiny.info
    n = 2 * ROWS_PER_CHUNK + 6  # the sequence models attend in chunks of rows
    hist = torch.randint(
        0, info.n_items, (n, info.n_domains, 4), generator=torch.Generator().manual_seed(1)
    )
    hist[0] = info.pad  # one user without behaviours
    hist[1, 0] = info.pad  # one without any in domain 0
    hist[n // 2 :, :, :2] = info.pad  # shorter histories
    counts = (hist != info.pad).sum(-1)
    for channel in model.serving_channels():
        encoder = _trace(model, 1, channel == "trial", _full_batch(info, 4))
        with torch.inference_mode():
            together = encoder(hist, counts)
            one_by_one = torch.cat([encoder(hist[i : i + 1], counts[i : i + 1]) for i in range(n)])
        torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)


# --- recommend_many ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["rec", "ivf_rec"])
def test_batched_answers_equal_alone_answers(
    which: str, request: pytest.FixtureRequest, tiny: Dataset
) -> None:
    r: Recommender = request.getfixturevalue(which)
    assert all(r._batches.values())  # every encoder of a new bundle takes a batch at once
    queries = mixed_queries(tiny)
    batched = r.recommend_many(queries)
    assert all(isinstance(b, Recommendation) and b.batch_size == len(queries) for b in batched)
    for q, b in zip(queries, batched, strict=True):
        a = alone(r, q)
        assert isinstance(a, Recommendation) and isinstance(b, Recommendation)
        assert_same(b, a)


def test_trial_channel_batches(trial_rec: Recommender, tiny: Dataset) -> None:
    queries = [
        *mixed_queries(tiny),
        Query(user="4", domain="d1", n=20, trial=True),
        Query(user="5", n=15, trial=True),
        Query(behaviours={}, domain="d0", n=5, trial=True),
    ]
    for q, b in zip(queries, trial_rec.recommend_many(queries), strict=True):
        a = alone(trial_rec, q)
        assert isinstance(a, Recommendation) and isinstance(b, Recommendation)
        assert_same(b, a)
        assert {r.channel for r in b.results} == {"trial" if q.trial else "main"}


def test_bad_requests_fail_alone_in_a_mixed_batch(rec: Recommender, tiny: Dataset) -> None:
    bad = [
        Query(user="no-such-user", n=5),
        Query(user="3", domain="nowhere"),
        Query(user="3", n=0),
        Query(),  # neither user nor behaviours
        Query(user="3", trial=True),  # no generator
        Query(behaviours={"d0": [item(tiny, 90)]}),  # an item of d1 in d0's list
    ]
    good = mixed_queries(tiny)
    queries = [x for pair in zip(good, bad, strict=False) for x in pair] + good[len(bad) :]
    results = rec.recommend_many(queries)
    for q, b in zip(queries, results, strict=True):
        a = alone(rec, q)
        if isinstance(a, RequestError):
            assert type(b) is type(a) and str(b) == str(a)
        else:
            assert isinstance(b, Recommendation)
            assert_same(b, a)
    kinds = [type(r) for r in results if isinstance(r, RequestError)]
    assert UnknownUserError in kinds and NoGeneratorError in kinds and len(kinds) == len(bad)


class OneAtATime:
    """A traced encoder of an old bundle: the batch size frozen at 1, so a batch silently
    gets the first row's vector for every row."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.sizes: list[int] = []

    def __call__(self, hist: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(hist))
        out: torch.Tensor = self.encoder(hist[:1], counts[:1])
        return out.expand(len(hist), -1)


def test_an_encoder_that_cannot_batch_is_called_per_request(bundle: Path, tiny: Dataset) -> None:
    honest = Recommender.load(bundle)
    old = Recommender.load(bundle)
    fakes = [OneAtATime(e) for e in old.bundle.encoders]
    old.bundle.encoders = list(fakes)
    old.warm_up()
    assert not any(old._batches[("main", d)] for d in range(len(fakes)))
    for f in fakes:
        f.sizes.clear()
    queries = mixed_queries(tiny)
    for q, b in zip(queries, old.recommend_many(queries), strict=True):
        a = honest.recommend(**dataclasses.asdict(q))
        assert isinstance(b, Recommendation)
        assert_same(b, a)
    assert {s for f in fakes for s in f.sizes} == {1}


# --- the batcher ---------------------------------------------------------------------------
class Stub:
    """Stands in for a recommender: records each batch, answers ``n`` back, and can be held
    (the first batch blocks until released) or poisoned (a batch holding n == 13 raises)."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.release.set()

    def recommend_many(self, queries: list[Query]) -> list[Any]:
        self.batches.append([q.n for q in queries])
        self.entered.set()
        self.release.wait(10)
        if len(queries) > 1 and any(q.n == 13 for q in queries):
            raise IndexError("poisoned batch")
        if queries[0].n == 13:
            raise IndexError("the culprit")
        return [
            RequestError("n 0") if q.n == 0 else Recommendation("stub", str(q.n), [])
            for q in queries
        ]


async def wait_until(cond: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def behind_a_held_batch(
    held: Stub,
    later: list[tuple[Stub, int]],
    cancel: int | None = None,
    on_batch: Any = None,
) -> list[Any]:
    """One loop computes ``Query(n=1)`` on ``held``, which blocks; meanwhile ``later``
    (recommender, n) requests queue (the one at index ``cancel`` is then cancelled: its
    client left); the block is released. Every answer (or exception), the first one first."""
    batcher = Batcher(BatchSettings(max_batch=32, wait_ms=1, threads=1), on_batch)

    async def go() -> list[Any]:
        first = asyncio.create_task(batcher.submit(held, Query(n=1)))  # type: ignore[arg-type]
        await asyncio.to_thread(held.entered.wait, 5)
        rest = [
            asyncio.create_task(batcher.submit(r, Query(n=n)))  # type: ignore[arg-type]
            for r, n in later
        ]
        await asyncio.sleep(0.02)
        if cancel is not None:
            rest[cancel].cancel()
        held.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        return asyncio.run(go())
    finally:
        batcher.close()


def test_the_batcher_takes_a_whole_queue_in_one_batch() -> None:
    stub, sizes = Stub(hold=True), []
    answers = behind_a_held_batch(
        stub, [(stub, n) for n in range(2, 12)], None, lambda n, _: sizes.append(n)
    )
    assert [a.user for a, _ in answers] == [str(i) for i in range(1, 12)]
    assert stub.batches == [[1], list(range(2, 12))]
    assert sizes == [1, 10]


def test_an_idle_batcher_does_not_wait() -> None:
    """Requests one after the other are each computed alone at once, none waiting ``wait_ms``
    for company: the loop that answered one counts as idle before its caller sends the next
    (it once settled the answer first, and about one request in ten then waited 1 s)."""
    batcher = Batcher(BatchSettings(max_batch=32, wait_ms=1000, threads=2))

    async def go() -> list[float]:
        queued = []
        for n in range(1, 61):
            if n != 13:  # the stub's poisoned request
                _, seconds = await batcher.submit(Stub(), Query(n=n))  # type: ignore[arg-type]
                queued.append(seconds)
        return queued

    queued = asyncio.run(go())
    batcher.close()
    assert len(queued) == 59 and max(queued) < 0.5


def test_a_request_cancelled_while_waiting_is_dropped() -> None:
    stub = Stub(hold=True)
    answers = behind_a_held_batch(stub, [(stub, 2), (stub, 3), (stub, 4)], cancel=1)
    assert isinstance(answers[2], asyncio.CancelledError)
    assert [a[0].user for i, a in enumerate(answers) if i != 2] == ["1", "2", "4"]
    assert stub.batches == [[1], [2, 4]]  # never computed


def test_a_poisoned_batch_is_retried_one_by_one() -> None:
    stub = Stub(hold=True)
    answers = behind_a_held_batch(stub, [(stub, n) for n in (2, 13, 0, 4)])
    assert [a[0].user for a in (answers[0], answers[1], answers[4])] == ["1", "2", "4"]
    assert isinstance(answers[2], IndexError) and str(answers[2]) == "the culprit"
    assert isinstance(answers[3], RequestError)  # a request error is its own, batch or not
    assert stub.batches == [[1], [2, 13, 0, 4], [2], [13], [0], [4]]


def test_a_batch_never_mixes_bundles() -> None:
    """A reload while requests wait: each batch is computed on one bundle, in order."""
    old, new = Stub(hold=True), Stub()
    answers = behind_a_held_batch(old, [(old, 2), (old, 3), (new, 4), (new, 5), (old, 6)])
    assert [a.user for a, _ in answers] == ["1", "2", "3", "4", "5", "6"]
    assert old.batches == [[1], [2, 3], [6]] and new.batches == [[4, 5]]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "--max-batch must be an integer in [1, 1024], got 0"),
        (["--threads", "0"], "--threads must be an integer in [1, 64], got 0"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be in [0, 1000], got -1.0"),
    ],
)
def test_bad_batching_flags_are_one_error_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--bundle", "no-such-bundle", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


def test_http_parser_and_event_loop_reach_uvicorn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--http``/``--loop`` choose uvicorn's parser and loop; by default uvicorn picks
    httptools and uvloop when installed (the ``serve`` extra installs both)."""
    import uvicorn

    from aftrec.serving import cli

    served = SimpleNamespace(
        state=SimpleNamespace(
            serving=SimpleNamespace(recommender=SimpleNamespace(model_version="v"))
        )
    )
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(cli, "_load_app", lambda *args: served)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    port = ["--port", "0"]  # the port is bound (and let go) before serving: 8000 may be taken
    assert main(["serve", "--bundle", "b", *port, "--http", "h11", "--loop", "asyncio"]) == 0
    assert main(["serve", "--bundle", "b", *port]) == 0
    from aftrec.serving.protocol import GuardedH11Protocol, GuardedHttpToolsProtocol

    # each parser comes as its guarded protocol class (auto: httptools, installed here)
    want = [(GuardedH11Protocol, "asyncio"), (GuardedHttpToolsProtocol, "auto")]
    assert [(r["http"], r["loop"]) for r in runs] == want
    capsys.readouterr()
    # a parser or loop asked for by name but not installed: one line, before loading anything
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "uvloop" else real(n))
    assert main(["serve", "--bundle", "b", "--loop", "uvloop"]) == 2
    assert capsys.readouterr().err == (
        "error: --loop uvloop: uvloop is not installed (pip install 'aftrec[serve]')\n"
    )
    assert len(runs) == 2


# --- over HTTP -----------------------------------------------------------------------------
def slowed(bundle: Path, seconds: float) -> tuple[Recommender, list[list[Query]]]:
    """A recommender whose batches take ``seconds`` more, so that concurrent requests queue
    behind the one computing and are gathered; the batches it computed."""
    rec = Recommender.load(bundle)
    batches: list[list[Query]] = []
    fast = rec.recommend_many

    def recommend_many(queries: list[Query]) -> list[Any]:
        batches.append(list(queries))
        time.sleep(seconds)
        return fast(queries)

    rec.recommend_many = recommend_many  # type: ignore[method-assign]
    return rec, batches


def test_concurrent_clients_are_batched_and_answered_as_alone(
    bundle: Path, rec: Recommender, tiny: Dataset
) -> None:
    served, batches = slowed(bundle, 0.05)
    bodies = [
        {"user": str(u), "domain": f"d{u % 3}", "n": 5 + u % 40, "exclude_seen": u % 2 == 0}
        for u in range(30)
    ] + [{"behaviours": {"d1": [item(tiny, 90 + i)]}, "n": 9} for i in range(5)]
    bodies.insert(7, {"user": "no-such-user"})
    bodies.insert(20, {"user": "3", "domain": "nowhere"})
    app = create_app(served, batching=BatchSettings(max_batch=32, wait_ms=2, threads=1))

    async def clients(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            return await asyncio.gather(*(c.post("/recommend", json=b) for b in bodies))

    with running(app) as base:
        responses = asyncio.run(clients(base))
        metrics = httpx.get(f"{base}/metrics").text
    sizes = [len(b) for b in batches]
    assert max(sizes) > 1
    descs = [
        int(re.search(r"batch;desc=(\d+)", r.headers["server-timing"])[1])
        for r in responses
        if r.status_code == 200
    ]  # type: ignore[index]
    assert max(descs) > 1
    count = re.search(r"^aftrec_batch_size_count (\S+)$", metrics, re.M)
    assert count is not None and float(count[1]) == len(sizes)
    for body, r in zip(bodies, responses, strict=True):
        q = Query(**{k: v for k, v in body.items()})
        want = alone(rec, q)
        if isinstance(want, RequestError):
            assert r.status_code == want.status and r.json()["detail"] == str(want)
            continue
        assert r.status_code == 200, r.text
        got = r.json()
        assert [x["items"] for x in got["results"]] == [x.items for x in want.results]
        for x, w in zip(got["results"], want.results, strict=True):
            np.testing.assert_allclose(x["scores"], w.scores, rtol=1e-5, atol=1e-6)


def post(url: str, body: bytes) -> socket.socket:
    """A connection that has sent one whole /recommend request (not read)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return s


def test_a_client_that_leaves_while_its_request_waits_is_not_computed(bundle: Path) -> None:
    served, batches = slowed(bundle, 0.4)
    app = create_app(served, batching=BatchSettings(max_batch=32, wait_ms=1, threads=1))
    with running(app) as base:
        first = post(base, b'{"user": "12", "n": 5}')  # computing for 0.4 s
        time.sleep(0.1)
        leaving = post(base, b'{"user": "77", "n": 5}')  # waits behind it...
        staying = post(base, b'{"user": "78", "n": 5}')
        time.sleep(0.1)
        leaving.close()  # ... and its client leaves
        answers = [s.recv(65536) for s in (first, staying)]
        for s in (first, staying):
            s.close()
        deadline = time.monotonic() + 10
        while 'status="499"' not in (text := httpx.get(f"{base}/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    computed = [q.user for batch in batches for q in batch]
    assert computed == ["12", "78"]
    assert 'aftrec_http_requests_total{method="POST",route="/recommend",status="499"} 1.0' in text


def test_a_client_leaving_mid_request_does_not_disturb_the_server(
    bundle: Path, rec: Recommender
) -> None:
    served, _ = slowed(bundle, 0.1)
    app = create_app(served, batching=BatchSettings(max_batch=32, wait_ms=1, threads=1))
    body = b'{"user": "12", "domain": "d1", "n": 50}'
    request = (
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with running(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for _ in range(5):  # send a whole request, then leave before the answer
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(request)
            time.sleep(0.01)
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/recommend", json={"user": "12", "domain": "d1", "n": 50})
            health = c.get("/health")
    assert r.status_code == 200 and health.status_code == 200
    assert (
        r.json()["results"][0]["items"]
        == rec.recommend(user="12", domain="d1", n=50).results[0].items
    )
