"""HTTP serving of a bundle: a thin FastAPI layer over :class:`~aftrec.serving.Recommender`.

Endpoints (the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /recommend``: :class:`RecommendRequest` -> :class:`RecommendResponse`;
* ``GET /health``: liveness and what is being served;
* ``GET /metrics``: Prometheus text: requests by route and status, latency histograms,
  errors, serving paths, time per stage (encode, search, serialise), reloads;
* ``POST /admin/reload``: load a bundle (``{"path": ...}``, default the current one) and swap
  it in. The new bundle is loaded and checked completely first, then one reference is
  replaced; a request holds the recommender it started with, so requests in flight finish on
  the old bundle and none is dropped. ``SIGHUP`` does the same for the current path (point
  ``--bundle`` at a symlink, flip it, send SIGHUP). Reload needs ``Authorization: Bearer
  TOKEN``; a server without an admin token refuses every reload over HTTP (SIGHUP still
  works). A path must lie, symlinks resolved, inside the bundle root (by default the folder
  holding the served bundle); relative paths are taken from the root. Every failed reload
  gets the same answer, whatever the reason, so a caller learns nothing about the file
  system; the reason is in the server log under the request id.

Concurrent ``/recommend`` requests are computed in batches (:mod:`aftrec.serving.batching`:
one encoder call and one index search per domain for the batch, each request answered as it
would be alone; a request that fails fails alone). A client that closes its connection while
its request waits is noticed: the request leaves the queue uncomputed and ``/metrics`` counts
it with status 499. Responses are serialised with orjson.

Every failure the client caused is a 4xx with ``{"detail": "<what is wrong>"}``: malformed
JSON (a name given twice in one object included), a ``Content-Length`` that is not one
number, or both ``Content-Length`` and ``Transfer-Encoding`` (RFC 9112, section 6.3) 400, a
chunked body (no ``Content-Length``) 411 or over ``max_body`` 413 (bytes received are
counted, whatever the headers say), unknown user 404, everything else (unknown domain or
item ids, ``n`` out of range, too many behaviours, wrong types, ``trial`` without a
generator) 422. Every response
carries ``X-Request-ID``; an unexpected error is a 500 with
``{"detail": ..., "request_id": ...}``, one log line with that id (the traceback at debug
level), and the connection stays open. Each ``/recommend`` response carries ``Server-Timing``
with the milliseconds spent encoding, searching and serialising, and ``batch;desc=N``: the
number of requests computed together with it. Nothing in a response names a file or folder
of the server.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from aftrec import __version__
from aftrec.errors import AftrecError
from aftrec.serving.batching import Batcher, BatchSettings, ClientGone
from aftrec.serving.recommender import MAX_BEHAVIOURS, MAX_N, Query, Recommender, RequestError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB: ~10,000 behaviours with ids of 60 characters
ROUTES = ("/recommend", "/health", "/metrics", "/admin/reload", "/openapi.json", "/docs")
REQUEST_ID = "aftrec.request_id"  # the scope key holding a request's id
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
RELOAD_REFUSED = "no loadable bundle at that path inside the bundle root"
CLIENT_GONE = 499  # the status /metrics counts for a client that left before its answer
#: methods /metrics names; any other a client sends is counted as "other" (one series each
#: would let clients grow the registry without bound)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_ID = 256  # characters of an id or a domain name in a request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- schema --------------------------------------------------------------------------------
Name = Annotated[StrictStr, StringConstraints(max_length=MAX_ID)]
# an integer id: a signed 64-bit one, as ids stored as integers are (an unbounded one let a
# client send thousands of digits past the length limit of ids given as text)
IntId = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Id = Name | IntId


class RecommendRequest(BaseModel):
    """One user: a known ``user``, explicit ``behaviours``, or both (stored then given)."""

    model_config = ConfigDict(extra="forbid")

    user: Id | None = Field(None, description="original user id known to the bundle")
    behaviours: dict[Name, list[Id]] | None = Field(
        None,
        description=f"{{domain: [item ids, oldest first]}}; at most {MAX_BEHAVIOURS} in all",
    )
    domain: Name | None = Field(None, description="target domain; every domain if absent")
    n: StrictInt = Field(200, ge=1, le=MAX_N, description="items per domain")
    exclude_seen: StrictBool = Field(True, description="leave out the user's behaviours")
    trial: StrictBool = Field(
        False, description="the generator's recommendation-trial channel (AFT, section 5.5.3)"
    )
    debug: StrictBool = Field(False, description="add server timings to the response body")


class DomainResultModel(BaseModel):
    domain: str
    path: str = Field(description="history, cross-domain or popular")
    channel: str = Field(description="main or trial")
    items: list[str] = Field(description="original item ids, best first")
    scores: list[float]


class RecommendResponse(BaseModel):
    model_version: str
    user: str | None
    results: list[DomainResultModel]
    timing_ms: dict[str, float] | None = Field(None, description="with debug: true")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: StrictStr | None = Field(None, description="bundle folder; the current one if absent")


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = Field(None, description="with a 500: the id in the server log")


# --- metrics -------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aftrec_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.errors = Counter(
            "aftrec_http_errors",
            "HTTP responses with status >= 400",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "aftrec_http_request_duration_seconds",
            "time from request start to the end of the response",
            ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.stages = Histogram(
            "aftrec_stage_seconds",
            "time per /recommend stage (encode, search, serialize)",
            ["stage"],
            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=r,
        )
        self.paths = Counter(
            "aftrec_recommend_results",
            "per-domain results by path and channel",
            ["path", "channel"],
            registry=r,
        )
        self.reloads = Counter("aftrec_bundle_reloads", "bundle reloads", ["result"], registry=r)
        self.aborted = Counter(
            "aftrec_http_aborted_requests",
            "requests the client abandoned before any response (e.g. a body cut short)",
            ["route"],
            registry=r,
        )
        self.bundle = Gauge(
            "aftrec_bundle_info", "the bundle being served", ["model_version"], registry=r
        )
        self.batch_size = Histogram(
            "aftrec_batch_size",
            "/recommend requests computed together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def serving(self, rec: Recommender) -> None:
        self.bundle.clear()
        self.bundle.labels(rec.model_version).set(1)


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            m = self.metrics
            if status is None:  # no response was sent: the client left first
                m.aborted.labels(route).inc()
            else:
                method = scope["method"] if scope["method"] in METHODS else "other"
                m.requests.labels(method, route, str(status)).inc()
                m.latency.labels(route).observe(time.perf_counter() - start)
                if status >= 400:
                    m.errors.labels(route, str(status)).inc()


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` if it is 1-64 characters of
    ``[A-Za-z0-9._-]``, else a new one), returns it in ``X-Request-ID``, and answers an
    exception nothing else handled with a 500 carrying the id: one log line, the traceback at
    debug level only, and the keep-alive connection left open (the body was read whole)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # new ids: 8 random hex digits per app (so per worker process), then a counter; a
        # uuid4 per request cost a getrandom system call, 16% of the event loop under load
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        if _CLIENT_REQUEST_ID.fullmatch(given):
            rid = given.decode()
        else:
            rid = f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"
        scope[REQUEST_ID] = rid
        started = gone = False

        async def send_with_id(message: Message) -> None:
            nonlocal started, gone
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            try:
                await send(message)
            except OSError:
                gone = True
                raise
            except RuntimeError as exc:  # uvloop: "unable to perform operation on <TCPTransport
                gone = "closed=True" in str(exc)  # closed=True ...>"; else an app bug
                raise

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if gone:  # the client left while its answer was written: not a server error
                log.info("request %s: the client left during the response", rid)
                return
            log.error(
                "request %s: %s %r failed: %s: %s",
                rid,
                scope["method"],
                scope["path"][:200],
                type(exc).__name__,
                _one_line(exc),
            )
            log.debug("request %s: traceback", rid, exc_info=exc)
            if not started:  # else the response is cut short: nothing better can be done
                body = {"detail": "internal error; see the server log", "request_id": rid}
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    """The id :class:`RequestContextMiddleware` gave ``request``."""
    return str(request.scope.get(REQUEST_ID, "-"))


def _is_json(headers: Any) -> bool:
    """Whether a request declares a JSON body (``application/json``, or ``+json``)."""
    for key, value in headers:
        if key.lower() == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return False


def repeated_name(body: bytes) -> str | None:
    """The first name that one object of a JSON ``body`` holds twice, or None (also for a body
    that is not JSON, which the app's own parser then answers).

    RFC 8259 (section 4) says names SHOULD be unique and that parsers differ on which value
    of a repeated name they keep; this one would keep the last, another before it (a proxy, a
    log) may have read the first. Such a body is refused rather than guessed at."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> None:  # the values are not needed
        seen: set[str] = set()
        for name, _ in items:
            if name in seen:
                repeated.append(name)
                return
            seen.add(name)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return repeated[0] if repeated else None


def repeated_message(name: str) -> str:
    """The 400's detail for a body holding ``name`` twice in one object."""
    return f"malformed JSON: the name {name!r} appears twice in one object"


class BodyLimitMiddleware:
    """Reads a request body completely, counting the bytes received, before the app sees it.

    Refused before reading: ``Content-Length`` together with ``Transfer-Encoding`` (400,
    RFC 9112 section 6.3: the two framings disagree, a request-smuggling sign), a chunked
    body (``Transfer-Encoding`` without ``Content-Length``: 411), a ``Content-Length`` that is
    not a single number (400) or over ``limit`` (413); with neither header the body is empty
    (RFC 9112 section 6.3: ``curl -X POST`` sends no ``Content-Length``),
    a ``/recommend`` body not declared as JSON (415; ``/admin/reload`` answers nothing
    before its token holds).
    While reading, more than ``limit`` bytes received is a 413 whatever the headers said. A
    client that leaves before its body is complete gets nothing and the app is not called.
    A ``/recommend`` body with a name repeated in one object is a 400 (:func:`repeated_name`;
    ``/admin/reload`` checks its body the same way, once its token holds).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        names = [k.lower() for k, _ in scope["headers"]]
        lengths = {v.strip() for k, v in scope["headers"] if k.lower() == b"content-length"}
        problem = None
        chunked = b"transfer-encoding" in names
        if lengths and chunked:
            problem = (400, "send either Content-Length or Transfer-Encoding, not both")
        elif chunked:
            problem = (411, "send the request body with a Content-Length header")
        elif len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            problem = (400, "Content-Length must be one decimal number")
        elif lengths and int(next(iter(lengths))) > self.limit:
            problem = (413, f"request body over {self.limit} bytes")
        elif scope["path"] == "/recommend" and not _is_json(scope["headers"]):
            problem = (415, "send the body as JSON, with Content-Type: application/json")
        body = bytearray()
        while problem is None:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # an aborted upload: no one to answer
            body += message.get("body", b"")
            if len(body) > self.limit:
                problem = (413, f"request body over {self.limit} bytes")
            elif not message.get("more_body", False):
                break
        repeated = None if problem or scope["path"] != "/recommend" else repeated_name(bytes(body))
        if repeated is not None:
            problem = (400, repeated_message(repeated))
        if problem is not None:
            response = JSONResponse({"detail": problem[1]}, status_code=problem[0])
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


# --- the app -------------------------------------------------------------------------------
def freeze_heap() -> None:
    """Move every object alive now (the bundle's id maps and arrays, the modules) out of the
    garbage collector's reach: a full collection with a 1.5M-item bundle loaded took
    90-150 ms and, triggered by the allocations of batched requests, stalls those in flight.
    Called after a bundle is loaded; a reload unfreezes first, so the replaced bundle's
    objects can be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServingState:
    """The recommender being served, how to replace it, and the batcher computing requests."""

    def __init__(self, recommender: Recommender, metrics: Metrics, batching: BatchSettings) -> None:
        self.recommender = recommender
        self.metrics = metrics
        self.batcher = Batcher(batching, on_batch=lambda size, _: metrics.batch_size.observe(size))
        self._reload_lock = asyncio.Lock()
        self.home = recommender.path  # the bundle as first given (a symlink stays one)
        metrics.serving(recommender)

    async def reload(self, path: Path | None) -> tuple[Recommender, Recommender]:
        """Load ``path`` (default: the current bundle's path) completely, then swap."""
        async with self._reload_lock:
            old = self.recommender
            target = path if path is not None else old.path
            try:
                new = await anyio.to_thread.run_sync(Recommender.load, target)
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            self.recommender = new  # one reference: requests in flight keep theirs
            await anyio.to_thread.run_sync(freeze_heap)
            self.metrics.reloads.labels("ok").inc()
            self.metrics.serving(new)
            log.info("now serving %s from %s", new.model_version, target)
            return old, new


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    parts, status = [], 422
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            status = 400
            ctx = err.get("ctx") or {}
            parts.append(f"malformed JSON: {ctx.get('error', err.get('msg'))}")
            continue
        where = ".".join(loc) or "body"
        got = err.get("input")
        shown = (
            "" if err.get("type") == "missing" else f" (got {json.dumps(got, default=str)[:80]})"
        )
        parts.append(f"{where}: {err.get('msg')}{shown}")
    return status, "; ".join(parts[:5]) or "invalid request"


def _parse_failure(cause: BaseException | None) -> str | None:
    """What is wrong with a body ``json.loads`` raised ``cause`` for (None: not such an error)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError):  # e.g. "Exceeds the limit (4300 digits) for integer ..."
        return _one_line(str(cause).split(";")[0])
    return None


def _reload_refused(rid: str, exc: Exception, state: ServingState) -> JSONResponse:
    """One answer for every failed reload (the reason goes to the log only)."""
    log.warning("request %s: reload refused: %s: %s", rid, type(exc).__name__, _one_line(exc))
    detail = f"{RELOAD_REFUSED}; still serving {state.recommender.model_version}"
    return JSONResponse({"detail": detail, "request_id": rid}, status_code=422)


def create_app(
    recommender: Recommender,
    admin_token: str | None = None,
    batching: BatchSettings | None = None,
    max_body: int = MAX_BODY,
    reload_on_sighup: bool = False,
    bundle_root: Path | None = None,
) -> FastAPI:
    """The FastAPI app serving ``recommender``; ``batching`` says how requests are gathered
    and computed (:class:`~aftrec.serving.batching.BatchSettings`: the defaults of
    ``aftrec serve``).

    ``admin_token``: the bearer token ``/admin/reload`` needs (None: reload over HTTP is
    refused). ``bundle_root``: the folder reload paths must lie in (default: the folder
    holding the served bundle)."""
    metrics = Metrics()
    state = ServingState(recommender, metrics, batching or BatchSettings())
    root = Path(
        os.path.realpath(
            bundle_root
            if bundle_root is not None
            else Path(os.path.abspath(recommender.path)).parent
        )
    )

    def reload_target(path: str | None) -> Path | None:
        """The real path of a reload request's bundle; None: the current one. Raises
        ``ValueError`` for a path outside the bundle root (or one the OS cannot take)."""
        if path is None:
            return None
        target = Path(os.path.realpath(root / path))  # an absolute ``path`` replaces root
        if not target.is_relative_to(root):
            raise ValueError(f"{path!r} is outside the bundle root {root}")
        return target

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loop = asyncio.get_running_loop()
        hooked = False
        tasks: set[asyncio.Task[None]] = set()
        if (
            reload_on_sighup
            and hasattr(signal, "SIGHUP")
            and threading.current_thread() is threading.main_thread()
        ):

            def on_hup() -> None:
                async def run() -> None:
                    try:  # the --bundle path, whatever an HTTP reload named since
                        await state.reload(state.home)
                    except Exception as exc:  # any reason: one line, and the old bundle stays
                        why = _one_line(exc, limit=2000)
                        if not isinstance(exc, AftrecError):
                            why = f"{type(exc).__name__}: {why}"
                        log.error("SIGHUP reload failed, still serving the old bundle: %s", why)
                        log.debug("SIGHUP reload: traceback", exc_info=exc)

                tasks.add(task := loop.create_task(run()))
                task.add_done_callback(tasks.discard)

            loop.add_signal_handler(signal.SIGHUP, on_hup)
            hooked = True
        yield
        if hooked:
            loop.remove_signal_handler(signal.SIGHUP)
        await anyio.to_thread.run_sync(state.batcher.close)

    app = FastAPI(
        title="aftrec retrieval",
        version=__version__,
        description=(
            "Top-N retrieval per domain from an aftrec bundle (AFT, KDD 2021, section 4.1)."
        ),
        lifespan=lifespan,
        redirect_slashes=False,  # "/health/" -> 404, not a redirect built from the Host header
    )
    app.state.serving = state

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a body its JSON parser fails on other than with a syntax error
        # (bytes that are not UTF-8, an integer above 4,300 digits, nesting too deep) with
        # a 400 that does not say why; its cause does
        why = _parse_failure(exc.__cause__) if exc.status_code == 400 else None
        if why is None:
            return await http_exception_handler(request, exc)
        return JSONResponse({"detail": f"malformed JSON: {why}"}, status_code=400)

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 404, 411, 413, 422, 500)
    }

    @app.post("/recommend", response_model=RecommendResponse, responses=errors)
    async def recommend(req: RecommendRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        rec = state.recommender  # this request's bundle, whatever a reload does meanwhile
        query = Query(req.user, req.behaviours, req.domain, req.n, req.exclude_seen, req.trial)
        try:
            result, waited = await state.batcher.submit(rec, query, request.receive)
        except ClientGone:  # nobody to answer; 499 as nginx logs it ("client closed request")
            return Response(status_code=CLIENT_GONE)
        t1 = time.perf_counter()
        body = result.to_dict()
        timing = {k: round(v * 1e3, 4) for k, v in result.timings.items()}
        if req.debug:
            body["timing_ms"] = {**timing, "batch": result.batch_size}
        content = orjson.dumps(body)
        t2 = time.perf_counter()
        metrics.stages.labels("encode").observe(result.timings["encode"])
        metrics.stages.labels("search").observe(result.timings["search"])
        metrics.stages.labels("serialize").observe(t2 - t1)
        for r in result.results:
            metrics.paths.labels(r.path, r.channel).inc()
        server_timing = (
            f"wait;dur={waited * 1e3:.3f}, batch;desc={result.batch_size}, "
            f"encode;dur={timing['encode']:.3f}, search;dur={timing['search']:.3f}, "
            f"recommend;dur={timing['total']:.3f}, serialize;dur={(t2 - t1) * 1e3:.3f}, "
            f"handler;dur={(t2 - t0) * 1e3:.3f}"
        )
        return Response(
            content,
            media_type="application/json",
            headers={"Server-Timing": server_timing, "X-Model-Version": result.model_version},
        )

    @app.head("/health", include_in_schema=False)  # load balancers' probes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        rec = state.recommender
        return {
            "status": "ok",
            "model_version": rec.model_version,
            "model": rec.manifest["model"]["name"],
            "domains": list(rec.domains),
            "n_items": int(rec.manifest["n_items"]),
            "n_users": int(rec.manifest["n_users"]),
            "trial": rec.has_trial,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    reload_body = {"content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}

    @app.post(
        "/admin/reload",
        responses={**errors, 403: {"model": ErrorResponse}},
        openapi_extra={"requestBody": {**reload_body, "required": False}},
    )
    async def reload(request: Request) -> JSONResponse:
        if admin_token is None:
            return JSONResponse(
                {"detail": "reload over HTTP is disabled: the server has no admin token"},
                status_code=403,
            )
        auth = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(auth, f"Bearer {admin_token}".encode()):
            return JSONResponse({"detail": "admin token required"}, status_code=403)
        # the body is read only once the token holds: no answer about it to anyone else
        raw = await request.body()
        repeated = repeated_name(raw)
        if repeated is not None:  # as for /recommend: neither value is taken
            return JSONResponse({"detail": repeated_message(repeated)}, status_code=400)
        try:
            req = (
                ReloadRequest.model_validate_json(raw)
                if raw.strip() not in (b"", b"null")
                else None
            )
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        rid = request_id(request)
        try:
            target = reload_target(req.path if req is not None else None)
        except (ValueError, OSError) as exc:  # outside the root, or a path the OS cannot take
            metrics.reloads.labels("failed").inc()
            return _reload_refused(rid, exc, state)
        try:
            old, new = await state.reload(target)
        except Exception as exc:  # whatever the reason, the caller gets the same answer
            return _reload_refused(rid, exc, state)
        return JSONResponse({"model_version": new.model_version, "previous": old.model_version})

    app.add_middleware(BodyLimitMiddleware, limit=max_body)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@contextmanager
def serving_in_thread(
    app: Any, host: str = "127.0.0.1", start_timeout: float = 20.0, http: str = "auto"
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of ``host`` in a daemon thread; yields the
    base URL (``http://127.0.0.1:PORT``) and stops the server on exit. For ``aftrec demo``
    and the tests; ``aftrec serve`` runs uvicorn in the main thread. ``http``: uvicorn's
    parser (``auto``, ``httptools`` or ``h11``)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    from aftrec.serving.protocol import http_protocol

    config = uvicorn.Config(
        app, host=host, port=port, log_level="error", access_log=False, http=http_protocol(http)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="aftrec-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
