"""``aftrec serve --workers N``: several server processes on one port, each answering as the
single-process server does; SIGHUP restarts them, SIGTERM stops them all."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from aftrec.cli import main  # noqa: E402
from aftrec.serving.recommender import Recommender  # noqa: E402


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--workers", "0"], {}, "--workers must be an integer in [1, 64], got 0"),
        # the OS would take 70000 modulo 65536 and listen on 4464 under the announced 70000
        (["--port", "70000"], {}, "--port must be in [0, 65535], got 70000"),
        (["--port", "-1"], {}, "--port must be in [0, 65535], got -1"),
        (
            ["--host", "999.1.1.1"],
            {},
            "--host '999.1.1.1' is not an address this machine can listen on",
        ),
        # resolves, but no interface has it (TEST-NET-1): found by binding it
        (
            ["--host", "192.0.2.1"],
            {},
            "--host '192.0.2.1' is not an address this machine can listen on",
        ),
        # with workers, uvicorn's supervisor binds one socket itself: checked the same way
        (
            ["--workers", "2", "--host", "192.0.2.1"],
            {},
            "--host '192.0.2.1' is not an address this machine can listen on",
        ),
        (
            ["--workers", "2", "--host", "no-such-host.invalid"],
            {},
            "--host 'no-such-host.invalid' is not an address this machine can listen on",
        ),
        (["--torch-threads", "0"], {}, "--torch-threads must be an integer in [1, 1024], got 0"),
        (
            ["--workers", "2"],
            {"AFTREC_ADMIN_TOKEN": "secret"},
            "--workers > 1 reloads with SIGHUP only: /admin/reload would reach one worker; "
            "unset $AFTREC_ADMIN_TOKEN and --admin-token-file",
        ),
    ],
)
def test_bad_workers_are_one_error_line(
    flags: list[str],
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--bundle", "no-such-bundle", *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """uvicorn.run recording its calls instead of serving: a refusal must come before it."""
    import uvicorn

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("AFTREC_ADMIN_TOKEN", raising=False)
    return calls


def test_workers_have_time_to_load_the_bundle(
    bundle: Path, no_uvicorn: list[dict[str, object]]
) -> None:
    """uvicorn's supervisor gave a new worker 5 s to be ready: a SIGHUP restart on a busy
    machine was abandoned (the old workers kept), and the test of it failed under load."""
    from aftrec.serving.cli import WORKER_READY_SECONDS

    assert main(["serve", "--bundle", str(bundle), "--port", "0", "--workers", "2"]) == 0
    assert main(["serve", "--bundle", str(bundle), "--port", "0"]) == 0
    assert no_uvicorn[0]["timeout_worker_healthcheck"] == WORKER_READY_SECONDS >= 60
    assert "timeout_worker_healthcheck" not in no_uvicorn[1]  # one process: no supervisor


def test_workers_refuse_a_missing_bundle_before_starting(
    no_uvicorn: list[dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The supervisor announced the server and started workers that each died with a
    traceback and were restarted for ever, holding the port."""
    argv = ["serve", "--bundle", "no-such-bundle", "--workers", "2", "--port", "0"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err == "error: no-such-bundle: no bundle here (not a folder)\n" and out == ""
    assert no_uvicorn == []


def test_workers_refuse_a_damaged_bundle_before_starting(
    bundle: Path,
    tmp_path: Path,
    no_uvicorn: list[dict[str, object]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The manifest is sound, a file is not: found by the supervisor's whole load."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    vectors = damaged / "items" / "vectors_1.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 1
    vectors.write_bytes(bytes(data))
    argv = ["serve", "--bundle", str(damaged), "--workers", "2", "--port", "0"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "items/vectors_1.npy fails its checksum" in err and out == ""
    assert no_uvicorn == []


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_worker_that_cannot_load_logs_one_line_and_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bundle that went bad after the supervisor checked it: one line and status 1 (the
    supervisor keeps its old workers on SIGHUP, or retries a crashed one's place while the
    others serve), not a traceback."""
    import torch

    from aftrec.serving.batching import BatchSettings
    from aftrec.serving.cli import WORKER_ENV, worker_app

    settings = {
        "bundle": "no-such-bundle",
        "batching": dataclasses.asdict(BatchSettings()),
        "torch_threads": 1,
        "bundle_root": None,
        "log_level": "warning",
    }
    monkeypatch.setenv(WORKER_ENV, json.dumps(settings))
    log = logging.getLogger("uvicorn.error")  # the worker's log, as uvicorn formats it
    seen = _Records()
    log.addHandler(seen)
    served = logging.getLogger("aftrec.serving")
    level = served.level
    try:
        with pytest.raises(SystemExit) as stop:
            worker_app()
    finally:  # what a worker process sets for its life, not this one's later tests
        log.removeHandler(seen)
        served.setLevel(level)
        torch.set_flush_denormal(False)
    # not uvicorn's startup failure (3): one crashed worker's failing restart stopped them all
    assert stop.value.code == 1
    assert [(r.levelname, r.getMessage().split(": ", 1)[1]) for r in seen.records] == [
        ("ERROR", "no-such-bundle: no bundle here (not a folder)")
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_one_error_line_before_the_bundle_loads(
    bundle: Path,
    workers: str,
    no_uvicorn: list[dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server announced itself, loaded the whole bundle, then uvicorn's "address
    already in use" and exit 3."""
    loads: list[object] = []
    monkeypatch.setattr(Recommender, "load", lambda *a, **k: loads.append(a))
    with socket.socket() as other:  # another server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        argv = ["serve", "--bundle", str(bundle), "--port", str(port), "--workers", workers]
        assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"error: --port {port}: 127.0.0.1:{port} is already in use (another server listens "
        "there); choose another --port or stop that server\n"
    )
    assert out == "" and loads == [] and no_uvicorn == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _workers(parent: int) -> set[int]:
    """The worker processes uvicorn's supervisor started (children running spawn_main)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            found.add(int(entry.name))
    return found


def _wait(url: str, parent: subprocess.Popen[bytes], n_workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert parent.poll() is None, parent.stdout.read() if parent.stdout else b""
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200 and (
                len(_workers(parent.pid)) == n_workers
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server on {url} did not come up with {n_workers} workers")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts worker processes in /proc")
def test_workers_answer_as_one_process_and_stop_together(bundle: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "AFTREC_ADMIN_TOKEN"}
    server = subprocess.Popen(
        [sys.executable, "-m", "aftrec.cli", "serve", "--bundle", str(bundle), "--port",
         str(port), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        _wait(url, server, 2, timeout=90)
        first = _workers(server.pid)
        rec = Recommender.load(bundle)
        users = [str(u) for u in range(0, 40, 5)]
        with httpx.Client(base_url=url, timeout=10) as client:
            for user in users:
                body = client.post("/recommend", json={"user": user, "n": 5}).json()
                alone = rec.recommend(user=user, n=5).to_dict()
                assert [r["items"] for r in body["results"]] == [
                    r["items"] for r in alone["results"]
                ]
            reload = client.post("/admin/reload", headers={"Authorization": "Bearer x"})
            assert reload.status_code == 403, reload.text  # no token with N > 1: disabled
        # SIGHUP: the supervisor replaces every worker, which load the bundle again
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 240  # each worker imports torch and loads the bundle
        while not (len(now := _workers(server.pid)) == 2 and not now & first):
            assert time.monotonic() < deadline, "the workers were not restarted"
            time.sleep(0.2)
        _wait(url, server, 2, timeout=240)
        assert httpx.post(url + "/recommend", json={"user": users[0], "n": 5}).status_code == 200
        # SIGTERM stops the supervisor and its workers
        workers = _workers(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:  # a failed test: the workers too (killing the supervisor alone orphaned them)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
