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
  ``--bundle`` at a symlink, flip it, send SIGHUP). Admin calls need ``Authorization: Bearer
  TOKEN`` when the server has an admin token, else they are accepted from loopback only.

Every failure the client caused is a 4xx with ``{"detail": "<what is wrong>"}``: malformed
JSON 400, a body without length 411 or over ``max_body`` 413, unknown user 404, everything
else (unknown domain or item ids, ``n`` out of range, too many behaviours, wrong types,
``trial`` without a generator) 422. Each response carries ``Server-Timing`` with the
milliseconds spent encoding, searching and serialising.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
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
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from aftrec import __version__
from aftrec.errors import AftrecError
from aftrec.serving.recommender import (
    MAX_BEHAVIOURS,
    MAX_N,
    Recommendation,
    Recommender,
    RequestError,
)

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB: ~10,000 behaviours with ids of 60 characters
ROUTES = ("/recommend", "/health", "/metrics", "/admin/reload", "/openapi.json", "/docs")
LOOPBACK = ("127.0.0.1", "::1", "localhost")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- schema --------------------------------------------------------------------------------
Id = StrictStr | StrictInt


class RecommendRequest(BaseModel):
    """One user: a known ``user``, explicit ``behaviours``, or both (stored then given)."""

    model_config = ConfigDict(extra="forbid")

    user: Id | None = Field(None, description="original user id known to the bundle")
    behaviours: dict[str, list[Id]] | None = Field(
        None,
        description=f"{{domain: [item ids, oldest first]}}; at most {MAX_BEHAVIOURS} in all",
    )
    domain: StrictStr | None = Field(None, description="target domain; every domain if absent")
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
        self.bundle = Gauge(
            "aftrec_bundle_info", "the bundle being served", ["model_version", "path"], registry=r
        )

    def serving(self, rec: Recommender) -> None:
        self.bundle.clear()
        self.bundle.labels(rec.model_version, str(rec.path)).set(1)


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
        status = 500

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
            m.requests.labels(scope["method"], route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                m.errors.labels(route, str(status)).inc()


class BodyLimitMiddleware:
    """Refuses request bodies without a length (411) or over ``limit`` bytes (413) before
    anything reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            problem = None
            if length is None:
                problem = (411, "send the request body with a Content-Length header")
            elif not length.isdigit() or int(length) > self.limit:
                problem = (413, f"request body over {self.limit} bytes")
            if problem is not None:
                response = JSONResponse({"detail": problem[1]}, status_code=problem[0])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app -------------------------------------------------------------------------------
class ServingState:
    """The recommender being served and how to replace it."""

    def __init__(self, recommender: Recommender, metrics: Metrics, threads: int) -> None:
        self.recommender = recommender
        self.metrics = metrics
        self.limiter = anyio.CapacityLimiter(max(threads, 1))
        self._reload_lock = asyncio.Lock()
        metrics.serving(recommender)

    async def reload(self, path: str | Path | None) -> tuple[Recommender, Recommender]:
        """Load ``path`` (default: the current bundle's path) completely, then swap."""
        async with self._reload_lock:
            old = self.recommender
            target = Path(path) if path is not None else old.path
            try:
                new = await anyio.to_thread.run_sync(Recommender.load, target)
            except AftrecError:
                self.metrics.reloads.labels("failed").inc()
                raise
            self.recommender = new  # one reference: requests in flight keep theirs
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


def create_app(
    recommender: Recommender,
    admin_token: str | None = None,
    threads: int = 4,
    max_body: int = MAX_BODY,
    reload_on_sighup: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``recommender``; ``threads`` requests are computed at once."""
    metrics = Metrics()
    state = ServingState(recommender, metrics, threads)

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
                    try:
                        await state.reload(None)
                    except AftrecError as exc:
                        log.error("SIGHUP reload failed, still serving the old bundle: %s", exc)

                tasks.add(task := loop.create_task(run()))
                task.add_done_callback(tasks.discard)

            loop.add_signal_handler(signal.SIGHUP, on_hup)
            hooked = True
        yield
        if hooked:
            loop.remove_signal_handler(signal.SIGHUP)

    app = FastAPI(
        title="aftrec retrieval",
        version=__version__,
        description=(
            "Top-N retrieval per domain from an aftrec bundle (AFT, KDD 2021, section 4.1)."
        ),
        lifespan=lifespan,
    )
    app.state.serving = state

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"},
            status_code=500,
        )

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 404, 411, 413, 422)
    }

    @app.post("/recommend", response_model=RecommendResponse, responses=errors)
    async def recommend(req: RecommendRequest) -> Response:
        t0 = time.perf_counter()
        rec = state.recommender  # this request's bundle, whatever a reload does meanwhile

        started = t0

        def run() -> Recommendation:
            nonlocal started
            started = time.perf_counter()
            return rec.recommend(
                user=req.user,
                behaviours=req.behaviours,
                domain=req.domain,
                n=req.n,
                exclude_seen=req.exclude_seen,
                trial=req.trial,
            )

        if threads > 0:
            result = await anyio.to_thread.run_sync(run, limiter=state.limiter)
        else:  # on the event loop: no thread hand-off, one request computed at a time
            result = run()
        t1 = time.perf_counter()
        body = result.to_dict()
        timing = {k: round(v * 1e3, 4) for k, v in result.timings.items()}
        if req.debug:
            body["timing_ms"] = timing
        content = json.dumps(body, separators=(",", ":")).encode()
        t2 = time.perf_counter()
        metrics.stages.labels("encode").observe(result.timings["encode"])
        metrics.stages.labels("search").observe(result.timings["search"])
        metrics.stages.labels("serialize").observe(t2 - t1)
        for r in result.results:
            metrics.paths.labels(r.path, r.channel).inc()
        server_timing = (
            f"wait;dur={(started - t0) * 1e3:.3f}, encode;dur={timing['encode']:.3f}, "
            f"search;dur={timing['search']:.3f}, recommend;dur={timing['total']:.3f}, "
            f"serialize;dur={(t2 - t1) * 1e3:.3f}, handler;dur={(t2 - t0) * 1e3:.3f}"
        )
        return Response(
            content,
            media_type="application/json",
            headers={"Server-Timing": server_timing, "X-Model-Version": result.model_version},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        rec = state.recommender
        return {
            "status": "ok",
            "model_version": rec.model_version,
            "model": rec.manifest["model"]["name"],
            "bundle": str(rec.path),
            "domains": list(rec.domains),
            "n_items": int(rec.manifest["n_items"]),
            "n_users": int(rec.manifest["n_users"]),
            "trial": rec.has_trial,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", responses=errors)
    async def reload(request: Request, req: ReloadRequest | None = None) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        if admin_token is not None:
            if auth != f"Bearer {admin_token}":
                return JSONResponse({"detail": "admin token required"}, status_code=403)
        elif request.client is None or request.client.host not in LOOPBACK:
            return JSONResponse(
                {"detail": "admin calls are accepted from loopback only (no admin token set)"},
                status_code=403,
            )
        try:
            old, new = await state.reload(req.path if req is not None else None)
        except AftrecError as exc:
            return JSONResponse(
                {"detail": f"{exc}; still serving {state.recommender.model_version}"},
                status_code=422,
            )
        return JSONResponse(
            {
                "model_version": new.model_version,
                "previous": old.model_version,
                "bundle": str(new.path),
            }
        )

    app.add_middleware(BodyLimitMiddleware, limit=max_body)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
