"""HTTP: a real uvicorn server on a free loopback port and a real client (httpx)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from aftrec.data.dataset import Dataset
from aftrec.serving.api import create_app
from aftrec.serving.recommender import MAX_BEHAVIOURS, Recommender
from tests.serving import exported, free_port, running, trial_bundle


@pytest.fixture(scope="module")
def url(bundle: Path) -> Iterator[str]:
    with running(create_app(Recommender.load(bundle))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as c:
        yield c


def test_health_and_schema(client: httpx.Client, bundle: Path) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["domains"] == ["d0", "d1", "d2"]
    assert h["model"] == "two-tower" and h["trial"] is False
    schema = client.get("/openapi.json").json()
    assert "/recommend" in schema["paths"] and "/admin/reload" in schema["paths"]
    props = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert {"user", "behaviours", "domain", "n", "exclude_seen", "trial"} <= set(props)


def test_serving_flushes_subnormals_and_puts_the_mode_back(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aftrec serve`` reads subnormal floats as zero while it serves (aftrec.numerics): an
    older bundle's decayed weights would make every product slow. The server's threads
    inherit the mode; the caller's comes back when serving ends."""
    import torch
    import uvicorn

    from aftrec.numerics import flushing
    from aftrec.serving.cli import serve_bundle

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    seen: list[bool] = []

    def run(app: Any, **kwargs: Any) -> None:  # uvicorn.run: serve, here note the mode
        seen.append(flushing())
        box: list[bool] = []
        thread = threading.Thread(target=lambda: box.append(flushing()))
        thread.start()
        thread.join()
        seen.extend(box)

    monkeypatch.setattr(uvicorn, "run", run)
    serve_bundle(bundle, port=0)
    assert seen == [True, True]
    assert not flushing()


def test_recommend_equals_in_process(client: httpx.Client, bundle: Path) -> None:
    rec = Recommender.load(bundle)
    r = client.post("/recommend", json={"user": "12", "domain": "d1", "n": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    want = rec.recommend(user="12", domain="d1", n=50)
    assert body["model_version"] == want.model_version == r.headers["x-model-version"]
    assert body["user"] == "12" and len(body["results"]) == 1
    res = body["results"][0]
    assert res["items"] == want.results[0].items and res["path"] == want.results[0].path
    assert res["scores"] == pytest.approx(want.results[0].scores)
    timing = r.headers["server-timing"]
    assert all(f"{stage};dur=" in timing for stage in ("encode", "search", "serialize"))
    assert "timing_ms" not in body


def test_all_domains_default_n_and_debug(client: httpx.Client, bundle: Path) -> None:
    body = client.post("/recommend", json={"user": 3, "debug": True}).json()
    assert [r["domain"] for r in body["results"]] == ["d0", "d1", "d2"]
    # n defaults to 200, over the 80 items of a domain: what the in-process call gives
    want = Recommender.load(bundle).recommend(user="3", n=200)
    assert [r["items"] for r in body["results"]] == [w.items for w in want.results]
    # where the user has no behaviours (cross-domain), nothing is excluded: all 80
    assert [len(r["items"]) for r in body["results"] if r["path"] == "cross-domain"] == [80, 80]
    assert {"encode", "search", "total"} <= set(body["timing_ms"])


def test_cold_start_paths(client: httpx.Client) -> None:
    body = client.post("/recommend", json={"behaviours": {"d2": ["170", "171"]}}).json()
    assert [r["path"] for r in body["results"]] == ["cross-domain", "cross-domain", "history"]
    assert not {"170", "171"} & set(body["results"][2]["items"])
    body = client.post("/recommend", json={"behaviours": {}, "domain": "d0", "n": 3}).json()
    assert body["results"][0]["path"] == "popular" and len(body["results"][0]["items"]) == 3


BAD: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b'{"user": "1",', 400, "malformed JSON"),
    ("not an object", b'["1"]', 422, "Input should be a valid dictionary"),
    ("unknown domain", {"user": "1", "domain": "books"}, 422, "unknown domain 'books'"),
    ("n too small", {"user": "1", "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ("n too large", {"user": "1", "n": 5000}, 422, "n: Input should be less than or equal to 1000"),
    ("n not a number", {"user": "1", "n": "ten"}, 422, "n: Input should be a valid integer"),
    ("unknown user", {"user": "ghost"}, 404, "unknown user 'ghost'"),
    ("nobody", {"domain": "d0"}, 422, "give a known `user`"),
    ("unknown items", {"behaviours": {"d0": ["1", "zz"]}}, 422, r"unknown item id\(s\).*'zz'"),
    ("wrong domain", {"behaviours": {"d0": ["200"]}}, 422, "belongs to domain 'd2'"),
    ("bad id type", {"behaviours": {"d0": [1.5]}}, 422, "behaviours.d0.0"),
    ("unknown field", {"user": "1", "top": 5}, 422, "top: Extra inputs are not permitted"),
    ("too many", {"behaviours": {"d0": ["1"] * (MAX_BEHAVIOURS + 1)}}, 422, "too many behaviours"),
    ("no generator", {"user": "1", "trial": True}, 422, "has no generator"),
    ("huge body", {"behaviours": {"d0": ["1" * 100] * 20_000}}, 413, "request body over"),
]


@pytest.mark.parametrize(("case", "payload", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_clear_4xx(
    client: httpx.Client, case: str, payload: Any, status: int, message: str
) -> None:
    if isinstance(payload, bytes):
        r = client.post("/recommend", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/recommend", json=payload)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert re.search(message, detail), detail


def test_body_without_length_is_refused(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 411")


def test_server_survives_and_counts(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/recommend", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert client.get("/health").status_code == 200
    text = client.get("/metrics").text
    assert 'aftrec_http_requests_total{method="POST",route="/recommend",status="200"}' in text
    assert 'aftrec_http_errors_total{route="/recommend",status="422"}' in text
    assert 'aftrec_http_request_duration_seconds_bucket{le="0.005",route="/recommend"}' in text
    assert 'aftrec_stage_seconds_count{stage="search"}' in text
    assert 'aftrec_recommend_results_total{channel="main",path="history"}' in text
    assert "aftrec_bundle_info{" in text


def test_trial_over_http(root: Path, tiny: Dataset) -> None:
    rec = Recommender.load(trial_bundle(root, tiny))
    with running(create_app(rec)) as base, httpx.Client(base_url=base) as c:
        main = c.post("/recommend", json={"user": "4", "domain": "d1", "n": 20}).json()
        trial = c.post("/recommend", json={"user": "4", "domain": "d1", "n": 20, "trial": True})
        assert trial.status_code == 200
        got = trial.json()["results"][0]
        seen = {str(i) for i in tiny.train_valid.item[tiny.train_valid.user == 4]}
        assert got["channel"] == "trial" and len(got["items"]) == 20
        assert not set(got["items"]) & (seen | set(main["results"][0]["items"]))


def test_hot_swap_drops_no_request(root: Path, tiny_dir: Path, bundle: Path) -> None:
    other = exported(root, tiny_dir, exact_max=10)  # same model, IVF indexes: another version
    old_version = Recommender.load(bundle).model_version
    new_version = Recommender.load(other).model_version
    assert old_version != new_version
    app = create_app(Recommender.load(bundle), admin_token="s3cret")
    admin = {"authorization": "Bearer s3cret"}
    with running(app) as base:
        stop = threading.Event()
        seen: list[tuple[int, str]] = []

        def hammer() -> None:
            with httpx.Client(base_url=base, timeout=10) as c:
                while not stop.is_set():
                    r = c.post("/recommend", json={"user": "8", "n": 20})
                    seen.append((r.status_code, r.json().get("model_version", r.text)))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=base, timeout=30) as c:
            time.sleep(0.3)
            r = c.post("/admin/reload", json={"path": str(other)}, headers=admin)
            assert r.status_code == 200, r.text
            assert r.json() == {"model_version": new_version, "previous": old_version}
            time.sleep(0.3)
            bad = c.post("/admin/reload", json={"path": str(root / "missing")}, headers=admin)
            assert bad.status_code == 422 and f"still serving {new_version}" in bad.json()["detail"]
            stop.set()
            for t in threads:
                t.join()
            assert c.get("/health").json()["model_version"] == new_version
            assert 'aftrec_bundle_reloads_total{result="failed"} 1.0' in c.get("/metrics").text
    statuses = {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert statuses == {200}, seen[:5]
    assert versions[0] == old_version and versions[-1] == new_version
    assert set(versions) == {old_version, new_version}


def test_admin_token(bundle: Path) -> None:
    app = create_app(Recommender.load(bundle), admin_token="s3cret")
    with running(app) as base, httpx.Client(base_url=base) as c:
        assert c.post("/admin/reload", json={}).status_code == 403
        assert (
            c.post("/admin/reload", json={}, headers={"authorization": "s3cret"}).status_code == 403
        )
        ok = c.post("/admin/reload", json={}, headers={"authorization": "Bearer s3cret"})
        assert (
            ok.status_code == 200
            and ok.json()["model_version"] == app.state.serving.recommender.model_version
        )
        # without the token, nothing is said about the body
        for body in (b"{", b'{"x": 1}'):
            r = c.post("/admin/reload", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 403, r.text
        bad = c.post("/admin/reload", content=b"{", headers={"authorization": "Bearer s3cret"})
        assert bad.status_code == 400 and bad.json()["detail"].startswith("malformed JSON")
        empty = c.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
        assert empty.status_code == 200  # no body: the current bundle
        null = c.post("/admin/reload", content=b"null", headers={"authorization": "Bearer s3cret"})
        assert null.status_code == 200  # null, as before: the current bundle
        # neither Content-Length nor Transfer-Encoding (`curl -X POST`): an empty body, RFC 9112
        bare = b"POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
        answer = _raw(base, bare + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def _raw(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; what the server answers before it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_head_above_16_kib_gets_431_and_a_slow_request_408(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aftrec.serving.protocol import MAX_HEAD, GuardedHttpToolsProtocol

    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    answer = _raw(url, big)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"detail": "request line and headers above 16384 bytes"' in answer
    # a request whose head never ends: refused after request_timeout, not held forever
    monkeypatch.setattr(GuardedHttpToolsProtocol, "request_timeout", 0.3)
    answer = _raw(url, b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]  # before _raw's own 5 s timeout
    # a body that never comes in full: the same
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = _raw(url, head + b"Content-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # one header that never ends, sent in pieces: counted as it arrives
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        got = b""
        try:
            for _ in range(64):  # up to 512 KiB, never a line end
                sock.sendall(b"a" * 8192)
                time.sleep(0.01)
        except OSError:
            pass  # the server closed the connection: what it said is below
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    # after a complete request and answer, a second request that stalls gets its 408 too
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo")
        got = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got, got[-300:]
    # a bad Content-Length: JSON like every other error
    answer = _raw(url, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b'{"detail": "invalid HTTP request"}' in answer
    with httpx.Client(base_url=url, timeout=5) as c:  # and the server goes on serving
        assert c.get("/health").status_code == 200


def test_h11_has_the_request_deadline_too(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's h11 protocol stops its keep-alive timer at a request's first byte, and held
    an unfinished request until the client closed."""
    from aftrec.serving.protocol import GuardedH11Protocol

    monkeypatch.setattr(GuardedH11Protocol, "request_timeout", 0.3)
    with running(create_app(Recommender.load(bundle)), http="h11") as base:
        for stalled in (
            b"",  # a connection that never sends a request
            b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # a head that never ends
            b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{",  # a body that never comes in full
        ):
            answer = _raw(base, stalled)  # before _raw's own 5 s timeout
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        # after a complete request and answer, a second request that stalls gets its 408 too
        got = _raw(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo")
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got, got[-300:]
        with httpx.Client(base_url=base, timeout=5) as c:  # and the server goes on serving
            assert c.get("/health").status_code == 200


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_the_time_the_server_takes_to_answer_is_not_the_clients(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, http: str
) -> None:
    """An answer that takes longer than ``request_timeout``, and a request pipelined behind
    it, complete in full: the deadline runs only while a request is being received."""
    from aftrec.serving.protocol import GuardedH11Protocol, GuardedHttpToolsProtocol

    monkeypatch.setattr(GuardedHttpToolsProtocol, "request_timeout", 0.3)
    monkeypatch.setattr(GuardedH11Protocol, "request_timeout", 0.3)
    rec = Recommender.load(bundle)
    computed = rec.recommend_many

    def slow(queries: Any) -> Any:
        time.sleep(1.0)  # three deadlines long
        return computed(queries)

    monkeypatch.setattr(rec, "recommend_many", slow)
    body = b'{"user": "2", "n": 5}'
    slow_post = (
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with running(create_app(rec), http=http) as base:
        got = _raw(base, slow_post + slow_post + last, wait=15)
    answers = re.findall(rb"HTTP/1\.1 (\d{3})", got)
    assert answers == [b"200", b"200", b"200"], got[-400:]
    assert got.count(b'"results"') == 2


def test_what_probing_found_in_the_http_surface(client: httpx.Client) -> None:
    # a body not declared as JSON: 415 with what to send, not a confusing 422
    r = client.post("/recommend", content=b'{"user": "1"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    assert client.head("/health").status_code == 200
    # no redirect built from the client's Host header
    r = client.get("/health/", headers={"host": "evil.example.com"})
    assert r.status_code == 404 and "location" not in r.headers
    # an id or a domain name above 256 characters: 422, the value not echoed in full
    for body in ({"user": "u" * 900_000}, {"behaviours": {"D" * 300: ["1"]}}):
        r = client.post("/recommend", json=body)
        assert r.status_code == 422 and len(r.content) < 2_000, r.text[:300]


def test_an_integer_id_is_a_signed_64_bit_one(client: httpx.Client) -> None:
    """An integer id was unbounded: 400 digits passed the 256-character limit of ids given as
    text and came back, every digit, in a 404."""
    for body in (
        {"user": int("1" * 400)},
        {"user": 2**63},
        {"user": -(2**63) - 1},
        {"behaviours": {"d0": [int("9" * 300)]}},
    ):
        r = client.post("/recommend", json=body)
        assert r.status_code == 422 and len(r.content) < 1_000, r.text[:300]
        assert "9223372036854775807" in r.text or "-9223372036854775808" in r.text, r.text
    for edge in (2**63 - 1, -(2**63)):  # the range itself: an unknown user, nothing more
        r = client.post("/recommend", json={"user": edge})
        assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"user": "\xff\xfe"}', "not UTF-8 (invalid start byte at byte 10)"),
        (b'{"user": "2", "n": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_json_cannot_read_says_why(client: httpx.Client, body: bytes, why: str) -> None:
    """Bytes that are not UTF-8, an integer above Python's 4,300 digits and nesting deeper
    than its recursion limit got FastAPI's own 400, "There was an error parsing the body"."""
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["detail"].startswith(f"malformed JSON: {why}"), r.text[:300]
    # the app's other HTTP errors are answered as before
    assert client.get("/nowhere").json() == {"detail": "Not Found"}
    r = client.put("/health")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
    assert "allow" in r.headers


def test_methods_the_app_does_not_serve_are_one_series_in_metrics(bundle: Path) -> None:
    # h11 hands any method to the app (httptools refuses unknown ones itself)
    app = create_app(Recommender.load(bundle))
    with running(app, http="h11") as base, httpx.Client(base_url=base, timeout=5) as c:
        for i in range(3):
            assert c.request(f"BREW{i}", "/health").status_code == 405
        text = c.get("/metrics").text
    assert "BREW" not in text
    assert 'aftrec_http_requests_total{method="other",route="/health",status="405"} 3.0' in text


DRIVER = """
import argparse, sys
from aftrec.serving.cli import add_parsers
p = argparse.ArgumentParser(prog="aftrec")
add_parsers(p.add_subparsers(dest="command", required=True))
args = p.parse_args(sys.argv[1:])
args.func(args)
"""


def test_serve_command_reloads_on_sighup(root: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """``aftrec serve`` in its own process: point --bundle at a symlink, flip it, SIGHUP; after
    an HTTP reload of another bundle, SIGHUP goes back to the --bundle path."""
    a, b = exported(root, tiny_dir), exported(root, tiny_dir, exact_max=10)
    a_here = Path(shutil.copytree(a, tmp_path / "a"))  # inside the bundle root, for HTTP
    link = tmp_path / "current"
    link.symlink_to(a)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    env["AFTREC_ADMIN_TOKEN"] = "s3cret"
    cmd = [sys.executable, "-c", DRIVER, "serve", "--bundle", str(link), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"

        def version() -> str | None:
            try:
                return str(httpx.get(f"{base}/health", timeout=2).json()["model_version"])
            except httpx.HTTPError:
                return None

        def wait_for(want: str | None) -> str | None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                v = version()
                if v is not None and (want is None or v == want):
                    return v
                time.sleep(0.1)
            return version()

        first = wait_for(None)
        assert first == Recommender.load(a, verify=False).model_version, proc.stdout
        tmp = tmp_path / "next"
        tmp.symlink_to(b)
        tmp.replace(link)  # atomic flip
        proc.send_signal(signal.SIGHUP)
        second = Recommender.load(b, verify=False).model_version
        assert wait_for(second) == second != first
        r = httpx.post(f"{base}/recommend", json={"user": "2", "n": 5})
        assert r.status_code == 200 and json.loads(r.text)["results"]
        admin = {"authorization": "Bearer s3cret"}
        r = httpx.post(f"{base}/admin/reload", json={"path": a_here.name}, headers=admin)
        assert r.status_code == 200 and r.json()["model_version"] == first, r.text
        proc.send_signal(signal.SIGHUP)  # the --bundle path (b), not the bundle HTTP named
        assert wait_for(second) == second
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises SIGTERM
    assert f"on http://127.0.0.1:{port}" in out
