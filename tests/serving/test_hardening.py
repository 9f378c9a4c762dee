"""The service against an attacker and a careless operator: body framing and size,
who may reload what, what responses reveal, how an internal error is answered and logged, and
what /metrics counts. Real uvicorn servers on loopback, raw sockets where headers matter."""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
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

from aftrec.errors import ConfigError
from aftrec.serving.api import (
    MAX_BODY,
    RELOAD_REFUSED,
    BodyLimitMiddleware,
    create_app,
    repeated_name,
)
from aftrec.serving.cli import add_parsers, admin_token_from
from aftrec.serving.recommender import Recommender
from tests.serving import exported, free_port, running, trained_run

TOKEN = "s3cret-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url(bundle: Path) -> Iterator[str]:
    with running(create_app(Recommender.load(bundle), admin_token=TOKEN)) as base:
        yield base


def raw_request(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is on a new connection; everything the server answers until it
    closes (or goes quiet)."""
    host, port = url.removeprefix("http://").split(":")
    out = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(request)
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionError):
            pass
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --- 1. the body limit ---------------------------------------------------------------------
@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_content_length_with_transfer_encoding_is_refused(bundle: Path, parser: str) -> None:
    """RFC 9112 section 6.3: both framings at once is a 400, and the body is never read (the
    middleware used to trust the small Content-Length and read a chunked 3 MiB body). h11
    passes such a request on and the middleware refuses it; httptools (llhttp) refuses it
    while parsing, before the app is called. Only the headers are sent: the answer must come
    without the server waiting for any body (and a body left unread in the server's socket
    would make its close a reset that can swallow the answer)."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    head = (
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    with running(create_app(Recommender.load(bundle)), http=parser) as url:
        answer = raw_request(url, head, timeout=5)
    assert answer, "no answer within 5 s: the server waited for the body"
    assert status_of(answer) == 400, answer[:300]
    assert b"not both" in answer if parser == "h11" else b'"invalid HTTP request"' in answer


def test_bytes_received_are_counted_whatever_the_headers_say() -> None:
    """A server whose framing let more bytes through than Content-Length declared: the
    middleware counts what it receives and stops at the limit, before the app sees any."""
    called = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(True)

    chunks = [b"x" * (600 << 10), b"x" * (600 << 10), b"x" * (600 << 10)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/recommend",
        "headers": [(b"content-length", b"13"), (b"content-type", b"application/json")],
    }
    asyncio.run(BodyLimitMiddleware(app, MAX_BODY)(scope, receive, send))
    assert not called
    assert sent[0]["status"] == 413
    assert len(chunks) == 1  # stopped reading once over the limit


# --- 3. reload: token, root, nothing revealed ----------------------------------------------
def test_reload_needs_a_token_by_default(bundle: Path) -> None:
    with running(create_app(Recommender.load(bundle))) as base, httpx.Client(base_url=base) as c:
        r = c.post("/admin/reload", json={})  # from loopback, which used to be enough
        assert r.status_code == 403 and "no admin token" in r.json()["detail"]


def test_reload_stays_inside_the_bundle_root_and_reveals_nothing(
    url: str, root: Path, bundle: Path, tiny_dir: Path
) -> None:
    other = exported(root, tiny_dir, exact_max=10)  # a second bundle in the same folder
    not_a_bundle = trained_run(root, tiny_dir)  # a folder inside the root
    with httpx.Client(base_url=url, timeout=30) as c:
        version = c.get("/health").json()["model_version"]
        answers = []
        for path in ("/etc", str(root / "missing"), str(not_a_bundle), "../..", "a\x00b"):
            r = c.post("/admin/reload", json={"path": path}, headers=ADMIN)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["request_id"] == r.headers["x-request-id"]
            answers.append(r.json()["detail"])
        # one answer whatever exists: no path, no "manifest", no "folder"
        assert set(answers) == {f"{RELOAD_REFUSED}; still serving {version}"}
        # inside the root, by relative name or absolute path
        ok = c.post("/admin/reload", json={"path": other.name}, headers=ADMIN)
        assert ok.status_code == 200, ok.text
        back = c.post("/admin/reload", json={"path": str(bundle)}, headers=ADMIN)
        assert back.status_code == 200 and back.json()["model_version"] == version
        for text in (c.get("/health").text, c.get("/metrics").text, ok.text, back.text):
            assert str(root) not in text and "/tmp" not in text


def test_reload_of_a_bundle_without_an_encoder_key_is_a_422(
    url: str, root: Path, bundle: Path
) -> None:
    """It used to be a 500 (KeyError) on reload."""
    broken = root / "bundle-no-encoder"
    if not broken.exists():
        shutil.copytree(bundle, broken)
        m = json.loads((broken / "manifest.json").read_text())
        del m["encoder"]
        raw = json.dumps(m).encode()
        (broken / "manifest.json").write_bytes(raw)
        (broken / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  x\n")
    r = httpx.post(f"{url}/admin/reload", json={"path": broken.name}, headers=ADMIN, timeout=30)
    assert r.status_code == 422 and r.json()["detail"].startswith(RELOAD_REFUSED), r.text


def test_a_symlink_out_of_the_root_is_refused(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "served").symlink_to(bundle)
    (tmp_path / "escape").symlink_to(bundle)  # a bundle, but outside the root once resolved
    app = create_app(Recommender.load(tmp_path / "served"), admin_token=TOKEN)
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/admin/reload", json={"path": "escape"}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["detail"].startswith(RELOAD_REFUSED)
        assert c.post("/admin/reload", json={}, headers=ADMIN).status_code == 200  # its own


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aftrec")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_admin_token_never_comes_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):  # visible to every user in ps
        serve_parser().parse_args(["serve", "--bundle", "b", "--admin-token", "x"])
    capsys.readouterr()
    monkeypatch.delenv("AFTREC_ADMIN_TOKEN", raising=False)
    assert admin_token_from(None) is None
    monkeypatch.setenv("AFTREC_ADMIN_TOKEN", "from-env")
    assert admin_token_from(None) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    args = serve_parser().parse_args(
        ["serve", "--bundle", "b", "--admin-token-file", str(token_file)]
    )
    assert admin_token_from(args.admin_token_file) == "from-file"
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="one token"):
        admin_token_from(token_file)
    with pytest.raises(ConfigError, match="cannot be read"):
        admin_token_from(tmp_path / "missing")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_an_admin_token_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO with no writer made serve wait for ever, silently; /dev/zero never ends."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            admin_token_from(fifo)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked opening the FIFO: let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail("reading a FIFO --admin-token-file blocked")
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert (
        str(errors[0])
        == f"--admin-token-file {fifo}: cannot be read ({fifo} is not a regular file)"
    )
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="is not a regular file"):
        admin_token_from(zero)


def test_a_large_admin_token_file_is_refused_after_a_bounded_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x" * 10_000_000)
    with pytest.raises(ConfigError, match=r"--admin-token-file .*token: over 4096 bytes"):
        admin_token_from(token_file)


def test_forwarded_headers_are_trusted_only_when_asked(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    base = ["serve", "--bundle", str(bundle), "--port", "0"]
    for argv in (base, [*base, "--proxy-headers", "--forwarded-allow-ips", "10.0.0.1"]):
        args = serve_parser().parse_args(argv)
        args.func(args)
    assert calls[0]["proxy_headers"] is False
    assert calls[1]["proxy_headers"] is True and calls[1]["forwarded_allow_ips"] == "10.0.0.1"


# --- 4. an internal error ------------------------------------------------------------------
DRIVER = """
import sys
from aftrec.cli import main
from aftrec.serving.recommender import Recommender
def broken(self, queries):
    raise IndexError("index 7 is out of bounds")
Recommender.recommend_many = broken  # the path the server computes with
sys.exit(main(sys.argv[1:]))
"""


def serve_broken(bundle: Path, *flags: str) -> tuple[str, str]:
    """``aftrec serve`` whose recommender raises: two requests on one keep-alive connection
    (the first a 500, the second /health); the 500's request id and the server's log."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-c", DRIVER, "serve", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen([*cmd, *flags], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            first = c.post("/recommend", json={"user": "3", "n": 5})
            second = c.get("/health")  # on the same connection if it was kept open
            pool = c._transport._pool  # type: ignore[attr-defined]
            connections = len(pool.connections)
            rid = first.headers["x-request-id"]
            assert first.status_code == 500 and first.json()["request_id"] == rid
            assert "see the server log" in first.json()["detail"]
            assert second.status_code == 200
            assert connections == 1
    finally:
        proc.terminate()
        err = proc.communicate(timeout=20)[1]
    return rid, err.decode()


def test_a_500_is_one_log_line_with_a_request_id_and_keeps_the_connection(
    bundle: Path,
) -> None:
    """It used to close the connection and log two tracebacks (137 lines)."""
    rid, log = serve_broken(bundle)
    lines = [line for line in log.splitlines() if line.strip()]
    assert "Traceback" not in log, log
    assert len([line for line in lines if rid in line]) == 1, log
    assert any("IndexError: index 7 is out of bounds" in line for line in lines if rid in line)


def test_the_traceback_is_logged_once_at_debug_level(bundle: Path) -> None:
    rid, log = serve_broken(bundle, "--log-level", "debug")
    assert log.count("Traceback") == 1, log
    assert re.search(rf"request {rid}: traceback", log), log


# --- 5. /metrics ---------------------------------------------------------------------------
def test_aborted_uploads_are_not_counted_as_responses(bundle: Path) -> None:
    with running(create_app(Recommender.load(bundle))) as base:
        host, port = base.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(
                    b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 1000\r\n\r\n{"user": '
                )
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"{base}/metrics").text
            if 'aftrec_http_aborted_requests_total{route="/recommend"} 3.0' in text:
                break
            time.sleep(0.1)
    assert 'aftrec_http_aborted_requests_total{route="/recommend"} 3.0' in text, text
    assert not re.search(r'aftrec_http_(requests|errors)_total\{[^}]*route="/recommend"', text)


def test_every_response_has_a_request_id(url: str) -> None:
    with httpx.Client(base_url=url) as c:
        ok = c.get("/health")
        bad = c.post("/recommend", content=b"{", headers={"content-type": "application/json"})
        mine = c.get("/health", headers={"x-request-id": "abc-123"})
        evil = c.get("/health", headers={"x-request-id": "a b\tc" * 30})
    assert re.fullmatch(r"[0-9a-f]{16}", ok.headers["x-request-id"])
    assert bad.status_code == 400 and bad.headers["x-request-id"] != ok.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{16}", evil.headers["x-request-id"])
    assert json.loads(bad.text)["detail"].startswith("malformed JSON")


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"user": "u1", "n": 5, "user": "u2"}', "user"),
        (b'{"behaviours": {"D0": ["i1"], "D0": ["i2"]}, "domain": "D1"}', "D0"),
    ],
)
def test_a_name_given_twice_is_refused_not_guessed(url: str, body: bytes, name: str) -> None:
    """Parsers differ on which value of a repeated name wins (RFC 8259, section 4): the first
    for some proxies and logs, the last for Python's json, so neither is served."""
    with httpx.Client(base_url=url) as c:
        r = c.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == f"malformed JSON: the name '{name}' appears twice in one object"


def test_a_reload_path_given_twice_is_refused_not_guessed(url: str, bundle: Path) -> None:
    """/admin/reload took the last of two paths; like /recommend, it takes neither, and says
    so only to a caller with the token."""
    body = b'{"path": "elsewhere", "path": "%s"}' % bundle.name.encode()
    json_type = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/admin/reload", content=body, headers={**ADMIN, **json_type})
        assert r.status_code == 400, r.text
        want = "malformed JSON: the name 'path' appears twice in one object"
        assert r.json()["detail"] == want
        assert c.post("/admin/reload", content=body, headers=json_type).status_code == 403
        once = c.post("/admin/reload", content=b'{"path": "%s"}' % bundle.name.encode(),
                      headers={**ADMIN, **json_type})  # fmt: skip
        assert once.status_code == 200, once.text


def test_a_repeated_name_is_found_at_any_depth_and_only_then() -> None:
    assert repeated_name(b'{"a": [{"b": 1, "c": {"d": 2, "d": 3}}]}') == "d"
    assert repeated_name(b'{"a": {"x": 1}, "b": {"x": 1}}') is None  # one per object is fine
    assert repeated_name(b"{") is None  # not JSON: the app's parser answers it
    assert repeated_name(b"[" * 100_000) is None  # nesting too deep to parse: the same


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_a_sighup_reload_that_fails_for_any_reason_is_one_log_line(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGHUP reload failing with an error that is not aftrec's own left its task's
    exception unretrieved: asyncio logged it with a traceback. Now: one line, and the old
    bundle is still served."""
    served = Recommender.load(bundle)
    app = create_app(served, reload_on_sighup=True)

    def broken(*args: Any, **kwargs: Any) -> Recommender:
        raise RuntimeError("the disk\nis gone")

    monkeypatch.setattr(Recommender, "load", broken)
    unhandled: list[dict[str, Any]] = []

    def failed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "SIGHUP reload failed" in r.getMessage()]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unhandled.append(context))
        async with app.router.lifespan_context(app):
            # the app's handler, not the default one that ends the process
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):
                await asyncio.sleep(0.05)
                if failed() or unhandled:
                    break
            await asyncio.sleep(0.1)
            gc.collect()  # a task whose exception nobody retrieved says so when collected

    before = signal.signal(signal.SIGHUP, lambda *_: None)  # a stray SIGHUP ends nothing
    try:
        with caplog.at_level("INFO", logger="aftrec.serving.api"):
            asyncio.run(main())
    finally:
        signal.signal(signal.SIGHUP, before)
    assert not unhandled, unhandled
    [line] = failed()
    assert line.levelname == "ERROR" and not line.exc_info
    assert line.getMessage().endswith(
        "still serving the old bundle: RuntimeError: the disk is gone"
    )
    assert app.state.serving.recommender is served


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_bundle_file_that_is_a_fifo_or_a_device_is_refused_not_waited_for(
    bundle: Path, tmp_path: Path
) -> None:
    from aftrec.serving.bundle import BundleError, load_bundle

    copy = Path(shutil.copytree(bundle, tmp_path / "fifo"))
    victim = next((copy / "items").glob("vectors_*.npy"))
    victim.unlink()
    os.mkfifo(victim)  # no writer: reading it would block for ever
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_bundle(copy)
        except BaseException as exc:
            outcome.append(exc)

    loading = threading.Thread(target=load, daemon=True)  # daemon: a blocked read dies with us
    loading.start()
    loading.join(timeout=60)
    assert not loading.is_alive(), "load_bundle waited for a writer to the FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], BundleError), outcome
    assert "is not a regular file" in str(outcome[0])
    victim.unlink()
    victim.symlink_to("/dev/zero")  # would never end
    with pytest.raises(BundleError, match="is not a regular file"):
        load_bundle(copy)


def test_a_client_gone_while_its_answer_is_written_is_not_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aftrec.serving.api import RequestContextMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:  # uvloop's transport, closed by the client
        if message["type"] == "http.response.body":
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "headers": [], "method": "POST", "path": "/recommend"}
    with caplog.at_level("INFO", logger="aftrec.serving.api"):
        asyncio.run(RequestContextMiddleware(app)(scope, receive, send))
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("the client left during the response" in r.getMessage() for r in caplog.records)


# --- request heads, under either parser ----------------------------------------------------
def exchange(url: str, writes: list[bytes], pause: float = 0.3, timeout: float = 10) -> bytes:
    """Send ``writes`` on one new connection, ``pause`` seconds apart; everything the server
    answers until it closes (a write the closed connection refuses ends the sending)."""
    host, port = url.removeprefix("http://").split(":")
    out = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            for i, data in enumerate(writes):
                if i:
                    time.sleep(pause)
                s.sendall(data)
        except OSError:
            pass  # the server closed the connection: what it said is read below
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionError):
            pass
    return out


def statuses(answer: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def padded_post(size: int) -> bytes:
    """A valid /recommend request whose JSON body is ``size`` bytes (blanks inside)."""
    body = b'{"user": "2",' + b" " * (size - 21) + b'"n": 5}'
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def pieces(data: bytes, start: int = 0, size: int = 10_000) -> list[bytes]:
    return [data[i : i + size] for i in range(start, len(data), size)]


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
BIG_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40_000 + b"\r\n\r\n"


def test_a_request_pipelined_behind_a_body_is_not_charged_for_that_body(bundle: Path) -> None:
    """httptools: a head open at the end of a chunk was charged the whole chunk, the body of
    the request before it included: a valid 27 KB POST with the first bytes of the next
    request in the same write got a 431, and neither answer. The limit still holds for a head
    that is too large, whether it arrives in one write or in many, pipelined or not."""
    pytest.importorskip("httptools")
    post = padded_post(27_000)
    with running(create_app(Recommender.load(bundle)), http="httptools") as url:
        got = exchange(url, [post + HEALTH[:5], HEALTH[5:]])
        assert statuses(got) == [200, 200], got[-300:]
        assert got.count(b'"results"') == 1 and b'"status":"ok"' in got
        # a head really above 16 KiB is refused, behind a body or alone, whole or in pieces
        for writes in (
            [post + BIG_HEAD],
            [post + BIG_HEAD[:20_000], BIG_HEAD[20_000:]],
            [post + BIG_HEAD[:5], *pieces(BIG_HEAD, 5)],
            pieces(BIG_HEAD),
        ):
            got = exchange(url, writes, pause=0.1)
            assert 431 in statuses(got), (len(writes), got[-300:])
            assert b'{"detail": "request line and headers above 16384 bytes"}' in got


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_head_above_16_kib_is_a_431_and_a_bad_request_a_400_in_json(
    bundle: Path, parser: str
) -> None:
    """Under either parser: h11 limited only a head it held incomplete, so a head that
    arrived in one write passed at any size (200), one split over writes got uvicorn's
    plain-text 400, and so did every request h11 refused."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    small = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: "
    too_large = b'{"detail": "request line and headers above 16384 bytes"}'
    with running(create_app(Recommender.load(bundle)), http=parser) as url:
        near = exchange(url, [small + b"a" * 16_000 + b"\r\n\r\n"])  # under the limit
        assert statuses(near) == [200], near[:300]
        for size in (17_000, 40_000, 60_000):
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * size + b"\r\n\r\n"
            for writes in ([head], pieces(head)):
                got = exchange(url, writes, pause=0.1)
                assert statuses(got) == [431], (size, len(writes), got[:300])
                assert got.endswith(too_large) and b"application/json" in got
        post = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for bad in (
            post + b"Content-Length: +5\r\n\r\n{}   ",
            post + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{} ",
            b"\x00\x01\x02 garbage\r\n\r\n",
        ):
            got = exchange(url, [bad])
            assert statuses(got) == [400], (bad, got[:300])
            assert got.endswith(b'{"detail": "invalid HTTP request"}')
            assert b"application/json" in got
        with httpx.Client(base_url=url, timeout=5) as c:  # and the server goes on serving
            assert c.get("/health").status_code == 200


KEEP = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED = b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_requests_received_in_full_are_answered_before_what_follows_is_refused(
    bundle: Path, parser: str
) -> None:
    """httptools: bytes the parser refused, in the same write as a valid request before them,
    closed the connection with only the 400 (or 431): the valid request, received in full,
    was never answered. Every request received in full is answered, in order, then the
    refusal; a request the bad bytes broke gets none (h11 did this already)."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    post = padded_post(200)
    with running(create_app(Recommender.load(bundle)), http=parser) as url:
        for writes, expected in (
            ([KEEP + b"\x00\x01 garbage\r\n\r\n"], [200, 400]),
            ([KEEP + KEEP + b"\x00\x01 garbage\r\n\r\n"], [200, 200, 400]),
            ([post + b"\x00\x01 garbage\r\n\r\n"], [200, 400]),
            ([KEEP + BIG_HEAD], [200, 431]),
            ([KEEP + CHUNKED + b"zz\r\n{}\r\n"], [200, 400]),  # the POST's chunk size is bad
            ([KEEP, b"\x00\x01 garbage\r\n\r\n"], [200, 400]),  # apart: as before
        ):
            got = exchange(url, writes, pause=0.2)
            assert statuses(got) == expected, (writes[0][:60], got[-400:])
            assert got.endswith(b"}") and b"application/json" in got.split(b"HTTP/1.1")[-1]


class _Transport:
    """Enough of an asyncio transport for a protocol fed by hand."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if key in ("peername", "sockname") else default

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_pipelined_requests_cost_what_they_cost_uvicorn() -> None:
    """httptools: keeping every request received in full but not yet answered, rescanned at
    each new one, made n pipelined requests cost n^2 on the event loop (60,000 requests in
    one write stalled the server for minutes). CPU time of parsing 8,000 pipelined requests,
    the garbage collector off (its passes grow with every live object, under uvicorn's own
    protocol too): within a small factor of uvicorn's protocol, not the 50 times of the
    quadratic work."""
    pytest.importorskip("httptools")
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from aftrec.serving.protocol import GuardedHttpToolsProtocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    async def parse(kind: type[HttpToolsProtocol], n: int) -> float:
        config = uvicorn.Config(app, log_config=None, log_level=None)  # logging untouched
        config.load()
        protocol = kind(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        protocol.connection_made(_Transport())  # type: ignore[arg-type]
        start = time.process_time()
        protocol.data_received(b"GET / HTTP/1.1\r\n\r\n" * n)
        spent = time.process_time() - start
        assert len(protocol.pipeline) == n - 1
        for task in protocol.tasks:
            task.cancel()
        protocol.connection_lost(None)
        return spent

    gc.disable()
    try:
        plain, guarded = (
            min(asyncio.run(parse(kind, 8_000)) for _ in range(3))
            for kind in (HttpToolsProtocol, GuardedHttpToolsProtocol)
        )
    finally:
        gc.enable()
    assert guarded < 6 * plain, (plain, guarded)
