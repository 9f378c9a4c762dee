"""uvicorn's httptools protocol with the two limits it lacks: the size of a request's head
and the time a client may take to send a whole request.

uvicorn's h11 protocol refuses a request head (request line and headers) above 16 KiB; its
httptools protocol, the faster one ``aftrec serve`` takes by default, accepts any size and
keeps an unfinished request open for as long as the client likes. A client could then hold
memory with endless headers, or connections with requests it never finishes. Here:

* a head above :data:`MAX_HEAD` bytes (counted as the parser hands them over) gets ``431``
  and the connection is closed;
* a request not received in full within ``request_timeout`` seconds of its first byte (or
  of the connection, for the first request) gets ``408`` and the connection is closed; the
  time the server takes to answer does not count (a request pipelined behind one being
  answered waits without a deadline);
* the head is counted as bytes arrive, not only as the parser completes headers (it hands
  one over only when the next begins), so one endless header is refused as well;
* a request the parser refuses gets its ``400`` as JSON, like every other error.

:func:`http_protocol` picks the class for ``--http``; uvicorn takes a protocol class where
it takes ``"httptools"``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD = 16 * 1024  # bytes of request line and headers, as h11's default limit
REQUEST_TIMEOUT = 30.0  # seconds from a request's first byte to its last


def _response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :data:`MAX_HEAD` and :data:`REQUEST_TIMEOUT`
    (module level, so that ``--workers`` can send it to its worker processes)."""

    request_timeout = REQUEST_TIMEOUT
    _head = 0  # bytes received while the current request's head is not complete
    _parts = 0  # bytes of the head's parts the parser has completed
    _heading = False  # between a request's first byte and the end of its headers
    _refused: bytes | None = None
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        super().data_received(data)
        # the parser hands a header over only once it ends: count the bytes received while
        # a head is open instead, so that one endless header is stopped too
        if self._heading and self._refused is None:
            self._head += len(data)
            if self._head > MAX_HEAD:
                self._refuse_head()
                self._close_with(self._refused)

    def send_400_response(self, msg: str) -> None:
        self._refused = self._refused or _response(400, "Bad Request", "invalid HTTP request")
        self._close_with(self._refused)

    def _close_with(self, answer: bytes | None) -> None:
        """Write ``answer`` (if any) and close: the end of every refused request."""
        self._disarm()
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head, self._parts, self._heading = 0, 0, True
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._heading = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _count(self, n: int) -> None:
        """The head's parts as the parser completes them (a head that arrives whole in one
        chunk is never open between chunks)."""
        self._parts += n
        if self._parts > MAX_HEAD:
            self._refuse_head()
            raise ValueError("request head too large")  # the parser stops: a 400 path

    def _refuse_head(self) -> None:
        self._disarm()
        self._refused = _response(
            431, "Request Header Fields Too Large",
            f"request line and headers above {MAX_HEAD} bytes",
        )  # fmt: skip

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # the server is still answering a request it has in full (a request pipelined
            # behind it waits for that): the clock runs against clients, not against us
            self._arm()
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self._refused = _response(
                408, "Request Timeout", f"request not received within {self.request_timeout:g} s"
            )
        self._close_with(self._refused)


def http_protocol(http: str) -> Any:
    """What to give uvicorn for ``--http``: the guarded protocol class for ``httptools`` (and
    for ``auto`` where httptools is installed), else the name as given (``h11``: uvicorn's own,
    which limits the head itself)."""
    if http == "httptools" or (http == "auto" and importlib.util.find_spec("httptools")):
        return GuardedHttpToolsProtocol
    return http
