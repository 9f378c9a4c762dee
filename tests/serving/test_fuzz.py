"""Property-based fuzzing of a real ``aftrec serve`` on loopback: generated
methods, paths, headers and bodies, sent byte for byte on raw sockets. Every answer is 2xx or
4xx (never a 5xx), the server stays up, and its peak memory stays bounded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from tests.serving import exported, free_port

TOKEN = "fuzz-token"
REPO = Path(__file__).resolve().parents[2]
#: what the server's peak resident memory may grow by over the whole run
MEMORY_SLACK_MIB = 150


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[tuple[str, int]]:
    bundle = exported(tmp_path_factory.getbasetemp() / "serving", tiny_dir)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AFTREC_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "aftrec.cli", "serve", "--bundle", str(bundle)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/health", timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the server did not start")
            time.sleep(0.1)
    try:
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def memory_mib(pid: int, key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


# --- what is sent --------------------------------------------------------------------------
ids = st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70))
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
requests_ish = st.fixed_dictionaries(
    {},
    optional={
        "user": ids,
        "behaviours": st.dictionaries(
            st.sampled_from(["d0", "d1", "d2", "nope"]) | st.text(max_size=5),
            st.lists(ids, max_size=20),
            max_size=4,
        ),
        "domain": st.sampled_from(["d0", "d1", "d2", "x"]) | json_values,
        "n": st.integers(-5, 2000) | json_values,
        "exclude_seen": st.booleans() | json_values,
        "trial": st.booleans(),
        "debug": st.booleans(),
        "path": st.sampled_from(["", ".", "..", "/etc", "bundle-two-tower-0", "\x00"])
        | st.text(max_size=30),
    },
)
bodies = st.one_of(
    requests_ish.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=2048),
    st.just(b""),
)
header_names = st.sampled_from(
    [
        "Content-Type",
        "Content-Length",
        "Transfer-Encoding",
        "Authorization",
        "X-Request-ID",
        "X-Forwarded-For",
        "Accept",
        "Content-Encoding",
        "Host",
    ]
) | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
header_values = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "chunked",
            "gzip",
            "chunked, gzip",
            f"Bearer {TOKEN}",
            "Bearer wrong",
            "0",
            "-1",
            "99999999999999999999",
            "1e3",
            "127.0.0.1",
        ]
    ),
    st.integers(0, 1 << 30).map(str),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A raw HTTP/1.1 request and whether its framing promises more than it sends (then the
    server may rightly wait for the rest, or drop the connection, instead of answering)."""
    method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    path = draw(
        st.sampled_from(["/recommend", "/admin/reload", "/health", "/metrics", "/docs"])
        | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20).map(
            lambda p: "/" + p
        )
    )
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "both", "none", "wrong-length"]))
    headers = [("Host", "127.0.0.1"), ("Connection", "close")]
    if framing in ("length", "both"):
        headers.append(("Content-Length", str(len(body))))
    if framing == "wrong-length":
        headers.append(("Content-Length", str(draw(st.integers(0, 1 << 40)))))
    if framing in ("chunked", "both"):
        headers.append(("Transfer-Encoding", "chunked"))
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    extra = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    headers += [(k, v) for k, v in extra if k.lower() != "connection"]
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    short = framing == "wrong-length" or any(k.lower() == "content-length" for k, _ in extra)
    return head.encode() + b"\r\n" + body, short


def exchange(base: str, request: bytes, short: bool) -> tuple[list[int], bool]:
    """Send ``request``; the statuses of the answer (interim 1xx included), read until the
    server closes the connection, and whether the connection was reset (a server that
    refuses a request before reading its body may close with bytes unread)."""
    host, port = base.removeprefix("http://").split(":")
    data, reset = b"", False
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(request)
            if short:
                s.shutdown(socket.SHUT_WR)  # nothing more will come
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionError:
            reset = True
    lines = data.split(b"\r\n")
    return [int(line.split(b" ")[1]) for line in lines if line.startswith(b"HTTP/1.")], reset


def test_fuzzed_requests_get_2xx_or_4xx_and_the_server_survives(
    server: tuple[str, int],
) -> None:
    base, pid = server
    baseline = memory_mib(pid, "VmRSS")
    seen: list[int] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(http_requests())
    @example((b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False))
    @example(
        (
            b"POST /recommend HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 23\r\n\r\n"
            b'{"user": "3", "n": 5}  ',
            False,
        )
    )
    def one(case: tuple[bytes, bool]) -> None:
        request, short = case
        statuses, reset = exchange(base, request, short)
        final = [s for s in statuses if s >= 200]
        assert all(200 <= s < 500 for s in final), (statuses, request[:500])
        assert final or short or reset, request[:500]
        seen.extend(final)
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200

    one()
    peak = memory_mib(pid, "VmHWM")
    assert peak - baseline < MEMORY_SLACK_MIB, (baseline, peak)
    assert {s // 100 for s in seen} >= {2, 4}, sorted(set(seen))


def test_a_big_body_does_not_grow_the_server(server: tuple[str, int]) -> None:
    """Bodies over the limit are refused, however framed, and never held in memory (a 200 MiB
    chunked body with a small Content-Length used to be read whole)."""
    base, pid = server
    before = max(memory_mib(pid, "VmRSS"), memory_mib(pid, "VmHWM"))
    body = b" " * (128 << 20)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    for request, refusal in (
        (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked, 400),
        (b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Connection: close\r\n\r\n" + chunked, 411),
        (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
         b"Connection: close\r\n\r\n" % len(body) + body, 413),
    ):  # fmt: skip
        # sent whole, the server may reset the connection before the client reads its answer
        statuses, _ = exchange(base, request, short=False)
        assert all(400 <= s < 500 for s in statuses), statuses
        # the head alone: the server answers it before any body byte, with this refusal
        head = request[: request.index(b"\r\n\r\n") + 4]
        assert exchange(base, head, short=False)[0] == [refusal], refusal
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    assert memory_mib(pid, "VmHWM") - before < 64
