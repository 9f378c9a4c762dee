"""``aftrec export`` and ``aftrec serve``; :func:`add_parsers` registers both.

Heavy imports (FAISS, FastAPI, uvicorn) happen when a command runs, not when the parser is
built, so ``aftrec --help`` and the other commands work without the serving extras.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec.errors import AftrecError, ConfigError
from aftrec.numerics import subnormals_flushed
from aftrec.outputs import path_argument
from aftrec.serving.batching import MAX_BATCH, THREADS, WAIT_MS, BatchSettings
from aftrec.serving.index import KINDS

if TYPE_CHECKING:
    from fastapi import FastAPI

TOKEN_ENV = "AFTREC_ADMIN_TOKEN"
MAX_TOKEN_FILE = 4096  # bytes of --admin-token-file read at most
#: ``--workers N > 1``: the settings each worker process builds its app from (JSON)
WORKER_ENV = "AFTREC_SERVE_WORKER"
#: ``--workers N > 1``: seconds a new worker has to import torch, load the bundle and answer
#: uvicorn's supervisor as ready (after SIGHUP, or in a dead worker's place), and a running
#: one to answer its health check. uvicorn's default, 5 s, is less than a worker needs on a
#: busy machine or for a large bundle: every SIGHUP restart was abandoned, the old workers kept
WORKER_READY_SECONDS = 120
HTTP_PARSERS = ("auto", "httptools", "h11")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

log = logging.getLogger("aftrec")


def _export(args: argparse.Namespace) -> None:
    from aftrec.serving.bundle import export_run
    from aftrec.serving.index import IndexSpec

    spec = IndexSpec(
        kind=args.index,
        exact_max=args.exact_max,
        nlist=args.nlist,
        search_param=args.search_param,
        target_recall=args.target_recall,
    )
    manifest = export_run(
        Path(args.run),
        Path(args.out),
        spec,
        which=args.which,
        force=args.force,
        threads=args.threads,
    )
    print(f"wrote {args.out}: {manifest['model_version']}, {manifest['n_items']} items")
    for channel, key in (("user", "indexes"), ("trial", "trial_indexes")):
        for ix in manifest[key]:
            if ix["kind"] == "flat":
                how = "exact"
            elif ix.get("recall") is None:
                how = f"search param {ix['search_param']}, recall not measured"
            else:
                how = f"search param {ix['search_param']}, recall@200 {ix['recall']:.3f} vs exact"
            print(f"  {channel} {ix['domain']}: {ix['kind']} over {ix['n']} items, {how}")


def check_address(host: str, port: int) -> None:
    """A :class:`ConfigError` for a port outside [0, 65535] (the OS would take it modulo
    65536) or a host that does not resolve, before anything is loaded or announced."""
    import socket

    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on") from exc


def check_listenable(host: str, port: int, workers: int = 1) -> None:
    """A :class:`ConfigError` when ``host:port`` cannot be listened on (another server holds
    the port; a port below 1024 without the right to it), before the bundle is loaded. The
    port is bound as uvicorn will bind it (``SO_REUSEADDR``), then released: with one
    process, each address ``host`` resolves to (IPv6 ones IPv6 only, as asyncio binds them);
    with ``workers`` > 1, one socket, IPv6 if ``host`` holds a ``:`` and IPv4 otherwise, as
    uvicorn's supervisor binds it. A server that takes the port in the seconds the bundle
    loads still stops uvicorn, with its own message."""
    import socket

    unknown = f"--host {host!r} is not an address this machine can listen on"
    if workers > 1:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except (OSError, UnicodeError) as exc:
                raise _unlistenable(host, port, exc, unknown) from None
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(unknown) from exc
    bound = 0
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (asyncio skips it too)
            continue
        with sock:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds it: IPv6 only, beside IPv4
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # another address of host may serve
                    continue
                raise _unlistenable(host, port, exc, unknown) from None
        bound += 1
    if not bound:
        raise ConfigError(unknown)


def _unlistenable(host: str, port: int, exc: BaseException, unknown: str) -> ConfigError:
    """The error for a bind of ``host:port`` that raised ``exc``."""
    import socket

    number = getattr(exc, "errno", None)
    if isinstance(exc, (socket.gaierror, UnicodeError)) or number == errno.EADDRNOTAVAIL:
        return ConfigError(unknown)  # a name that does not resolve, no address of this machine
    if number == errno.EADDRINUSE:
        return ConfigError(
            f"--port {port}: {host}:{port} is already in use (another server listens there); "
            "choose another --port or stop that server"
        )
    return ConfigError(
        f"--port {port}: cannot listen on {host}:{port} ({getattr(exc, 'strerror', exc)})"
    )


def check_bundle(bundle: Path) -> str:
    """The model version of ``bundle`` if it loads, as a worker process would load it; else
    the :class:`BundleError` that worker would meet. For ``--workers N``: the supervisor
    refuses the bundle once, instead of starting workers that each fail. The manifest is
    checked here; the whole load (checksums, encoders, indexes, warm-up) runs in a child
    process, so that the supervisor does not keep the memory of a bundle it never serves."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from aftrec.serving.bundle import BundleError, read_manifest

    read_manifest(bundle)  # a missing or damaged manifest costs no process
    context = multiprocessing.get_context("spawn")  # as uvicorn starts its workers
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(_loaded_version, str(bundle)).result()
    except BrokenProcessPool as exc:
        raise BundleError(
            f"{bundle}: the process loading the bundle died (out of memory?)"
        ) from exc


def _loaded_version(bundle: str) -> str:
    from aftrec.serving.recommender import Recommender

    return Recommender.load(bundle).model_version


@subnormals_flushed()  # for the server's life; its threads inherit the mode (aftrec.numerics)
def serve_bundle(
    bundle: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    batching: BatchSettings | None = None,
    torch_threads: int = 1,
    admin_token: str | None = None,
    log_level: str = "warning",
    access_log: bool = False,
    bundle_root: Path | None = None,
    proxy_headers: bool = False,
    forwarded_allow_ips: str = "127.0.0.1",
    workers: int = 1,
    http: str = "auto",
    loop: str = "auto",
) -> None:
    """Load ``bundle`` and serve it with uvicorn until interrupted (SIGHUP reloads it);
    ``batching``: how concurrent requests are computed together (default: 32 requests, 1 ms
    wait under load, 2 loops).

    ``workers > 1``: uvicorn's process supervisor runs that many worker processes on one
    socket, each loading the bundle (memory grows with each worker); SIGHUP restarts every
    worker on ``bundle``, and reload over HTTP is refused, since it would reach one worker.

    ``proxy_headers``: take the client address from ``X-Forwarded-For`` when the connection
    comes from ``forwarded_allow_ips`` (off: every address is the socket's).

    ``http``, ``loop``: uvicorn's HTTP parser (``httptools``, C, or ``h11``, pure Python) and
    event loop (``uvloop`` or ``asyncio``); ``auto`` takes the C ones when installed (the
    ``serve`` extra installs them)."""
    import uvicorn

    from aftrec.serving.protocol import http_protocol

    check_address(host, port)
    if isinstance(torch_threads, bool) or not 1 <= torch_threads <= 1024:
        raise ConfigError(f"--torch-threads must be an integer in [1, 1024], got {torch_threads}")
    if isinstance(workers, bool) or not 1 <= workers <= 64:
        raise ConfigError(f"--workers must be an integer in [1, 64], got {workers}")
    if workers > 1 and admin_token is not None:
        raise ConfigError(
            "--workers > 1 reloads with SIGHUP only: /admin/reload would reach one worker; "
            f"unset ${TOKEN_ENV} and --admin-token-file"
        )
    for flag, choice in (("--http", http), ("--loop", loop)):
        if choice in ("httptools", "uvloop") and importlib.util.find_spec(choice) is None:
            raise ConfigError(
                f"{flag} {choice}: {choice} is not installed (pip install 'aftrec[serve]')"
            )
    batching = batching or BatchSettings()
    check_listenable(host, port, workers)  # before the bundle loads, which can take a while
    logging.getLogger("aftrec.serving").setLevel(log_level.upper())
    served: Any
    if workers == 1:
        served = _load_app(bundle, batching, torch_threads, admin_token, bundle_root, True)
        version = served.state.serving.recommender.model_version
        print(f"serving {version} from {bundle} on http://{host}:{port}", flush=True)
        if admin_token is None:
            print(f"no admin token: /admin/reload is disabled (set ${TOKEN_ENV})", flush=True)
    else:
        version = check_bundle(bundle)
        os.environ[WORKER_ENV] = json.dumps(
            {
                "bundle": str(bundle),
                "batching": dataclasses.asdict(batching),
                "torch_threads": torch_threads,
                "bundle_root": None if bundle_root is None else str(bundle_root),
                "log_level": log_level,
            }
        )
        served = "aftrec.serving.cli:worker_app"
        print(
            f"serving {version} from {bundle} on http://{host}:{port} with {workers} worker "
            "processes (SIGHUP restarts them on the bundle; /admin/reload is disabled)",
            flush=True,
        )
    uvicorn.run(
        served,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips if proxy_headers else None,
        http=http_protocol(http),  # with a head limit and a request deadline
        loop=loop,
        **_supervisor_settings(workers),
    )


def _supervisor_settings(workers: int) -> dict[str, Any]:
    """``uvicorn.run``'s settings for its supervisor of ``workers`` processes: the time a
    worker has to be ready (:data:`WORKER_READY_SECONDS`), where this uvicorn takes one
    (uvicorn before its health checks did not wait for a new worker at all)."""
    import inspect

    from uvicorn.config import Config

    takes = "timeout_worker_healthcheck" in inspect.signature(Config).parameters
    return {"timeout_worker_healthcheck": WORKER_READY_SECONDS} if workers > 1 and takes else {}


def _load_app(
    bundle: Path,
    batching: BatchSettings,
    torch_threads: int,
    admin_token: str | None,
    bundle_root: Path | None,
    reload_on_sighup: bool,
) -> FastAPI:
    """The bundle loaded and its app built, for one serving process."""
    import torch

    from aftrec.serving.api import create_app, freeze_heap
    from aftrec.serving.index import faiss_module
    from aftrec.serving.recommender import Recommender

    # one batch at a time per loop: intra-op parallelism only adds contention on 2 cores
    torch.set_num_threads(torch_threads)
    faiss_module().omp_set_num_threads(1)
    rec = Recommender.load(bundle)
    freeze_heap()  # the bundle's objects are never garbage: keep full collections short
    return create_app(
        rec,
        admin_token=admin_token,
        batching=batching,
        reload_on_sighup=reload_on_sighup,
        bundle_root=bundle_root,
    )


def worker_app() -> FastAPI:
    """One worker process's app under ``aftrec serve --workers N`` (uvicorn's factory), from
    the settings :func:`serve_bundle` put in ``$AFTREC_SERVE_WORKER``. A bundle it cannot
    load (changed since the supervisor checked it) is one log line and exit status 1, not a
    traceback. Not uvicorn's startup-failure status: after a worker that crashed, that
    stopped the whole server, the healthy workers too; this way a SIGHUP restart keeps the
    running workers, and a crashed worker's place is retried while the others serve."""
    import torch

    settings = json.loads(os.environ[WORKER_ENV])
    torch.set_flush_denormal(True)  # a worker process only serves (aftrec.numerics)
    logging.getLogger("aftrec.serving").setLevel(str(settings["log_level"]).upper())
    root = settings["bundle_root"]
    try:
        return _load_app(
            Path(settings["bundle"]),
            BatchSettings(**settings["batching"]),
            int(settings["torch_threads"]),
            None,
            None if root is None else Path(root),
            False,  # the supervisor restarts the workers on SIGHUP
        )
    except AftrecError as exc:
        logging.getLogger("uvicorn.error").error(
            "worker [%d] cannot serve: %s", os.getpid(), " ".join(str(exc).split())
        )
        sys.exit(1)


def admin_token_from(token_file: Path | None) -> str | None:
    """The admin token: the first line of ``token_file``, else ``$AFTREC_ADMIN_TOKEN``, else
    None (reload over HTTP disabled). Never a command-line value: ``ps`` shows those."""
    if token_file is not None:
        from aftrec.serving.bundle import BundleError, read_regular

        try:  # a regular file only: a FIFO would block serve for ever, /dev/zero never end
            raw = read_regular(Path(token_file), MAX_TOKEN_FILE + 1)
            token = raw.decode().strip()
        except (OSError, UnicodeDecodeError, BundleError) as exc:
            raise ConfigError(f"--admin-token-file {token_file}: cannot be read ({exc})") from exc
        if len(raw) > MAX_TOKEN_FILE:
            raise ConfigError(
                f"--admin-token-file {token_file}: over {MAX_TOKEN_FILE} bytes; want one token "
                "on one line"
            )
        if not token or any(c.isspace() for c in token):
            raise ConfigError(
                f"--admin-token-file {token_file}: want one token on one line, without spaces"
            )
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def batch_settings(args: argparse.Namespace) -> BatchSettings:
    """``--max-batch``, ``--batch-wait-ms`` and ``--threads``, checked (a ConfigError names
    the flag and its range)."""
    return BatchSettings(max_batch=args.max_batch, wait_ms=args.batch_wait_ms, threads=args.threads)


def _serve(args: argparse.Namespace) -> None:
    serve_bundle(
        Path(args.bundle),
        host=args.host,
        port=args.port,
        batching=batch_settings(args),
        torch_threads=args.torch_threads,
        admin_token=admin_token_from(args.admin_token_file),
        log_level=args.log_level,
        access_log=args.access_log,
        bundle_root=args.bundle_root,
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        workers=args.workers,
        http=args.http,
        loop=args.loop,
    )


def add_parsers(sub: Any) -> None:
    """Register ``export`` and ``serve`` on the ``add_subparsers()`` object of aftrec's CLI."""
    px = sub.add_parser(
        "export", help="write a retrieval bundle (encoder, indexes, ids) from a run"
    )
    px.add_argument("--run", type=path_argument, required=True, help="run directory")
    px.add_argument("--out", type=path_argument, required=True, help="bundle folder to write")
    px.add_argument(
        "--which", choices=["best", "last"], default="best",
        help="checkpoint: the best validation epoch's or the last (default best)",
    )  # fmt: skip
    px.add_argument(
        "--index",
        choices=KINDS,
        default="auto",
        help="index per domain: auto = flat (exact) up to --exact-max items, ivf above",
    )
    px.add_argument(
        "--exact-max", type=int, default=50_000, metavar="N",
        help="with --index auto, domains of at most N items get an exact index (default 50000)",
    )  # fmt: skip
    px.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4 sqrt(n))")
    px.add_argument(
        "--search-param",
        type=int,
        default=None,
        metavar="K",
        help="fix IVF nprobe / HNSW efSearch instead of tuning it to --target-recall",
    )
    px.add_argument(
        "--target-recall",
        type=float,
        default=0.97,
        help="recall@200 against exact search the index must reach (default 0.97)",
    )
    px.add_argument("--threads", type=int, default=0, help="FAISS build threads (0: all)")
    px.add_argument(
        "--force", action="store_true", help="replace --out if it is a bundle (or an empty folder)"
    )
    px.set_defaults(func=_export)

    # no abbreviations: "--admin-token SECRET" must not pass as --admin-token-file
    ps = sub.add_parser(
        "serve", help="answer recommendations from a bundle over HTTP", allow_abbrev=False
    )
    ps.add_argument(
        "--bundle", type=path_argument, required=True, help="a folder `aftrec export` wrote"
    )
    ps.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine)"
    )
    ps.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ps.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"batches computed at once, each in its own thread (default {THREADS})",
    )
    ps.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        metavar="N",
        help=f"requests computed together at most (default {MAX_BATCH}; 1: no batching)",
    )
    ps.add_argument(
        "--batch-wait-ms",
        type=float,
        default=WAIT_MS,
        metavar="MS",
        help="under load, how long a batch waits to fill (default 1; an idle server never waits)",
    )
    ps.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads per batch (default 1)"
    )
    ps.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes on one port, each loading the bundle (default 1); with N > 1 "
        "SIGHUP restarts them and /admin/reload is disabled",
    )
    ps.add_argument(
        "--admin-token-file",
        type=path_argument,
        default=None,
        metavar="FILE",
        help=f"file holding the bearer token for /admin/reload (default ${TOKEN_ENV}; with "
        "neither, reload over HTTP is disabled and only SIGHUP reloads)",
    )
    ps.add_argument(
        "--bundle-root",
        type=path_argument,
        default=None,
        metavar="DIR",
        help="/admin/reload loads bundles inside DIR only (default: the folder of --bundle)",
    )
    ps.add_argument(
        "--proxy-headers",
        action="store_true",
        help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (behind a reverse proxy)",
    )
    ps.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        metavar="IPS",
        help="comma-separated proxy addresses trusted with --proxy-headers (default 127.0.0.1)",
    )
    ps.add_argument(
        "--http",
        choices=HTTP_PARSERS,
        default="auto",
        help="HTTP parser: httptools (C) or h11 (pure Python); auto: httptools if installed",
    )
    ps.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="event loop: uvloop or asyncio; auto: uvloop if installed",
    )
    ps.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="server log level (default warning)",
    )  # fmt: skip
    ps.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (uvicorn's access log; off by default)",
    )
    ps.set_defaults(func=_serve)
