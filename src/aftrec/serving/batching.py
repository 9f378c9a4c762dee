"""Dynamic batching: concurrent requests computed together, one encoder call and one index
search per domain for the lot (:meth:`~aftrec.serving.recommender.Recommender.recommend_many`).

``threads`` loops, each in its own thread, take up to ``max_batch`` queued requests at a time
and compute them. How long a loop waits for a batch to fill:

* **idle** (no other batch computing, and the loop's last batch was a single request): not
  at all, so one request alone is answered as fast as without batching;
* **under load** (another batch is computing, or the last batch held more than one request):
  up to ``wait_ms`` for the queue to reach ``max_batch``; requests that arrive meanwhile ride
  along instead of queueing behind the batch.

A batch holds requests for one bundle only: each request carries the recommender it started
with, and a loop stops taking at the first request for another (a reload swapped the bundle
while requests waited), which goes into the next batch. A request whose caller gave up while
it waited (its future cancelled: :meth:`Batcher.submit` watches the connection) is dropped
before computing. A batch that raises anything but
a per-request ``RequestError`` (:mod:`aftrec.serving.recommender`) is computed again one request
at a time, so that only the request causing it fails. ``max_batch=1`` is the server without
batching: each loop computes one request at a time.

Loops are threads rather than event-loop tasks: the event loop stays free for HTTP, a batch's
encoder and FAISS calls release the GIL, and a request from any event loop (a test client may
run one per request) is answered on its own loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aftrec.errors import ConfigError

if TYPE_CHECKING:  # the CLI builds its parser from this module's defaults without torch
    from aftrec.serving.recommender import Query, Recommendation, Recommender

log = logging.getLogger(__name__)

MAX_BATCH = 32
WAIT_MS = 1.0
THREADS = 2


@dataclass(frozen=True)
class BatchSettings:
    """``aftrec serve --max-batch --batch-wait-ms --threads``."""

    max_batch: int = MAX_BATCH
    wait_ms: float = WAIT_MS
    threads: int = THREADS

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch must be an integer in [1, 1024], got {self.max_batch}")
        if not 0 <= self.wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms must be in [0, 1000], got {self.wait_ms}")
        if isinstance(self.threads, bool) or not 1 <= self.threads <= 64:
            raise ConfigError(f"--threads must be an integer in [1, 64], got {self.threads}")


@dataclass
class _Waiting:
    recommender: Recommender
    query: Query
    future: asyncio.Future[Recommendation]
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch began computing


class Batcher:
    """Gathers :meth:`submit` calls into batches computed by ``settings.threads`` loops.

    ``on_batch(size, seconds)`` is called after each batch (metrics)."""

    def __init__(
        self,
        settings: BatchSettings | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.settings = settings or BatchSettings()
        self.on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._busy = 0  # batches computing now
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def submit(
        self,
        recommender: Recommender,
        query: Query,
        receive: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> tuple[Recommendation, float]:
        """Compute ``query`` on ``recommender`` in the next batch; (its answer, seconds it
        waited in the queue). Raises its :class:`RequestError`, or the error that computing
        it alone raised.

        ``receive``: the request's ASGI ``receive``, its body already read; its next message
        is ``http.disconnect`` when the client leaves. The request is then taken out of the
        queue if it still waits there (or its answer dropped) and :class:`ClientGone` raised."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(recommender, query, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if not self._threads:
                self._start()
            self._queue.append(waiting)
            self._cond.notify()
        if receive is None:
            return await waiting.future, waiting.started - waiting.queued
        watcher = loop.create_task(_disconnect(receive))
        watcher.add_done_callback(lambda w: _cancel_if_gone(w, waiting.future))
        try:
            result = await waiting.future
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                raise ClientGone("the client left before its answer") from None
            raise
        finally:
            watcher.cancel()
        return result, waiting.started - waiting.queued

    def close(self) -> None:
        """Stop the loops once the queue is empty (requests queued are still answered)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # --- the loops -------------------------------------------------------------------------
    def _start(self) -> None:
        for i in range(self.settings.threads):
            thread = threading.Thread(target=self._run, name=f"aftrec-batch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        last = 1  # size of this loop's last batch
        while True:
            batch = self._take(under_load_hint=last > 1)
            if batch is None:
                return
            last = len(batch)
            t0 = time.perf_counter()
            try:
                results = self._compute(batch, t0)
            finally:
                # idle again before answering: a caller's next request, sent the moment its
                # answer arrives, must not find this batch still counted and wait ``wait_ms``
                with self._cond:
                    self._busy -= 1
            for w, result in zip(batch, results, strict=True):
                with contextlib.suppress(RuntimeError):  # its event loop closed: no one to answer
                    w.loop.call_soon_threadsafe(_settle, w.future, result)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)

    def _take(self, under_load_hint: bool) -> list[_Waiting] | None:
        """The next batch (None: closed and drained); blocks until there is one."""
        s = self.settings
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                loaded = under_load_hint or self._busy > 0
                if loaded and s.max_batch > 1 and s.wait_ms > 0 and not self._closed:
                    self._cond.wait_for(
                        lambda: len(self._queue) >= s.max_batch or self._closed,
                        timeout=s.wait_ms / 1e3,
                    )
                batch: list[_Waiting] = []
                while self._queue and len(batch) < s.max_batch:
                    head = self._queue[0]
                    if batch and head.recommender is not batch[0].recommender:
                        break  # another bundle: the next batch
                    self._queue.popleft()
                    if not head.future.cancelled():  # its caller left while it waited
                        batch.append(head)
                if batch:
                    self._busy += 1
                    if self._queue:
                        self._cond.notify()  # more for another loop
                    return batch

    def _compute(self, batch: list[_Waiting], started: float) -> list[Any]:
        """Each request's answer or exception, in ``batch``'s order."""
        rec = batch[0].recommender
        for w in batch:
            w.started = started
        try:
            results: list[Any] = rec.recommend_many([w.query for w in batch])
        except Exception as exc:
            if len(batch) == 1:
                results = [exc]
            else:  # find the culprit: each request alone
                log.info("a batch of %d failed (%s); computing each alone", len(batch), exc)
                results = [self._alone(rec, w.query) for w in batch]
        return results

    @staticmethod
    def _alone(rec: Recommender, query: Query) -> Any:
        try:
            return rec.recommend_many([query])[0]
        except Exception as exc:
            return exc


class ClientGone(Exception):
    """The client of a request closed its connection before the answer."""


async def _disconnect(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> bool:
    """Whether the next ASGI message says the client left (awaited until one comes)."""
    message = await receive()
    return message.get("type") == "http.disconnect"


def _cancel_if_gone(watcher: asyncio.Task[bool], future: asyncio.Future[Any]) -> None:
    if not watcher.cancelled() and watcher.exception() is None and watcher.result():
        future.cancel()  # still queued: never computed; computing: its answer is dropped


def _settle(future: asyncio.Future[Recommendation], result: Any) -> None:
    """On the request's event loop: hand it its answer (unless its caller left)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


__all__ = ["MAX_BATCH", "THREADS", "WAIT_MS", "BatchSettings", "Batcher", "ClientGone"]
