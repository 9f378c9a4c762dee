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
  one over only when the next begins), so one endless header is refused as well; only the
  bytes of the head itself count, not those of a request before it in the same chunk;
* a request the parser refuses gets its ``400`` as JSON, like every other error; requests
  received in full before the bytes it refused are answered first (in the same chunk, the
  parser sees those bytes before the first of them is answered).

:class:`GuardedH11Protocol` gives uvicorn's h11 protocol, the one ``--http h11`` takes, the
same request deadline and the same head limit: h11 limits only the bytes it holds while a head
is incomplete, so a head that arrived whole in one chunk passed at any size; the head h11 has
parsed is measured too. There as well a head above the limit gets ``431`` and a request the
parser refuses ``400``, both as JSON (uvicorn answered them in plain text).

:func:`http_protocol` picks the class for ``--http``; uvicorn takes a protocol class where
it takes ``"httptools"`` or ``"h11"``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
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


def _head_too_large() -> bytes:
    detail = f"request line and headers above {MAX_HEAD} bytes"
    return _response(431, "Request Header Fields Too Large", detail)


def _bad_request() -> bytes:
    return _response(400, "Bad Request", "invalid HTTP request")


class _Deadline(asyncio.Protocol):
    """The request clock of both guarded protocols: ``_arm`` starts it, ``_disarm`` stops it;
    when it runs out, the client gets ``408`` (if no answer has started) and the connection
    is closed, unless the server is still answering (:meth:`_answering`)."""

    request_timeout = REQUEST_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # uvicorn's protocol, next in the class order
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        me: Any = self  # uvicorn's protocol, which this class is mixed into
        self._deadline = me.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _answering(self) -> bool:
        """Whether the server is answering a request it has in full (the clock runs against
        clients, not against the server)."""
        return False

    def _close_with(self, answer: bytes | None) -> None:
        """Write ``answer`` (if any) and close: the end of every refused request."""
        self._disarm()
        me: Any = self
        if answer is not None:
            me.transport.write(answer)
        me.transport.close()

    def _timed_out(self) -> None:
        self._deadline = None
        me: Any = self
        if me.transport.is_closing():
            return
        if self._answering():
            self._arm()
            return
        cycle = me.cycle
        answer = None
        if cycle is None or cycle.response_complete or not cycle.response_started:
            detail = f"request not received within {self.request_timeout:g} s"
            answer = _response(408, "Request Timeout", detail)
        self._close_with(answer)


class GuardedHttpToolsProtocol(_Deadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with :data:`MAX_HEAD` and :data:`REQUEST_TIMEOUT`
    (module level, so that ``--workers`` can send it to its worker processes)."""

    _head = 0  # bytes received while the current request's head is not complete
    _parts = 0  # bytes of the head's parts the parser has completed
    _heading = False  # between a request's first byte and the end of its headers
    _refused: bytes | None = None
    _owed: bytes | None = None  # the refusal, held until the requests before it are answered
    _last: Any = None  # the cycle of the last request received in full (answered in order)
    # within the chunk being parsed: whether the current request began in it, the body bytes
    # since the last request began, and the body bytes of the request before the current one
    _began = False
    _body_here = 0
    _body_before = 0

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        self._began, self._body_here, self._body_before = False, 0, 0
        super().data_received(data)
        # the parser hands a header over only once it ends: count the bytes received while
        # a head is open instead, so that one endless header is stopped too
        if self._heading and self._refused is None:
            self._head += self._open_head_bytes(data) if self._began else len(data)
            if self._head > MAX_HEAD:
                self._refuse(_head_too_large())

    def _open_head_bytes(self, data: bytes) -> int:
        """The bytes of ``data`` that belong to the head open at its end, a head that began
        in ``data``: those after the request before it, which ends with its head's blank
        line, then its body (the parser gives no offsets). A body holding a blank line, or
        a chunked one, makes this an undercount, never more: the next chunk counts in full,
        and the parser's own parts (:meth:`_count`) still hold the limit."""
        blank = data.rfind(b"\r\n\r\n")
        start = (blank + 4 if blank >= 0 else 0) + self._body_before
        return max(len(data) - start, 0)

    def send_400_response(self, msg: str) -> None:
        self._refuse(self._refused or _bad_request())

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close, once the requests received in full before the refused
        bytes are answered; the request those bytes broke, if they began inside one, gets no
        other answer. What follows on the connection is ignored from now on."""
        self._refused = answer
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            if not self.pipeline or self.pipeline[0][0] is not cycle:
                self._close_with(answer)  # the broken request is the one being answered
                return
            self.pipeline.popleft()  # waiting behind others: it is never started
        if self._in_flight():
            self._disarm()
            self._owed = answer
        else:
            self._close_with(answer)

    def _in_flight(self) -> bool:
        """Whether a request received in full is being answered or waits to be: uvicorn
        answers them in order, so whether the last of them is answered."""
        return self._last is not None and not self._last.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the request pipelined behind, if any
        if self._owed is not None and not self.transport.is_closing() and not self._in_flight():
            answer, self._owed = self._owed, None
            self._close_with(answer)

    def _close_with(self, answer: bytes | None) -> None:
        self._refused = self._refused or answer  # what follows on the connection is ignored
        super()._close_with(answer)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head, self._parts, self._heading = 0, 0, True
        self._began, self._body_before, self._body_here = True, self._body_here, 0
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

    def on_body(self, body: bytes) -> None:
        self._body_here += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            self._last = self.cycle

    def _count(self, n: int) -> None:
        """The head's parts as the parser completes them (a head that arrives whole in one
        chunk is never open between chunks)."""
        self._parts += n
        if self._parts > MAX_HEAD:
            self._disarm()
            self._refused = _head_too_large()
            raise ValueError("request head too large")  # the parser stops: a 400 path

    def _answering(self) -> bool:
        # a request pipelined behind the one being answered waits for that without a clock
        cycle = self.cycle
        return cycle is not None and not cycle.more_body and not cycle.response_complete


def _head_size(request: h11.Request) -> int:
    """The bytes of ``request``'s head as sent, less optional blanks h11 dropped: the request
    line, each header line and the blank line ending them."""
    line = len(request.method) + len(request.target) + len(request.http_version) + 9
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class _H11Connection(h11.Connection):
    """h11's connection, which refuses a head it parsed above :data:`MAX_HEAD` as it does one
    it holds incomplete, and keeps the error it raised (``refusal``) for the answer."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise
        if isinstance(event, h11.Request) and _head_size(event) > MAX_HEAD:
            self.refusal = h11.RemoteProtocolError("head too large", error_status_hint=431)
            raise self.refusal
        return event


class GuardedH11Protocol(_Deadline, H11Protocol):
    """uvicorn's h11 protocol with :data:`REQUEST_TIMEOUT` and :data:`MAX_HEAD`. Its
    keep-alive timer closes a connection that sends nothing after an answer, but one byte of
    a next request stops that timer, and the request could then take forever. Here a
    request's clock runs from the connection (the first request) or from the first byte of
    the request (the next ones) until h11 has it in full; the time the server takes to answer
    does not count."""

    _answered = False  # a request of this connection was answered
    _refused = False  # a request was refused: what follows on the connection is ignored

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = self._conn = _H11Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._follow()

    def send_400_response(self, msg: str) -> None:
        refusal = self._conn.refusal
        too_large = refusal is not None and refusal.error_status_hint == 431
        self._refused = True
        self._close_with(_head_too_large() if too_large else _bad_request())

    def on_response_complete(self) -> None:
        self._answered = True
        super().on_response_complete()  # may take a request pipelined behind this one
        self._follow()

    def _follow(self) -> None:
        """Arm the deadline while a request is being received, disarm it otherwise."""
        state = self.conn.their_state
        receiving = state is h11.SEND_BODY or (
            state is h11.IDLE and (bool(self.conn.trailing_data[0]) or not self._answered)
        )
        if self.transport.is_closing() or not receiving:
            self._disarm()  # answering, closing, or idle between requests (keep-alive's)
        elif self._deadline is None:
            self._arm()


def http_protocol(http: str) -> Any:
    """What to give uvicorn for ``--http``: the guarded protocol class for ``httptools`` (and
    for ``auto`` where httptools is installed), else the guarded h11 class."""
    if http == "httptools" or (http == "auto" and importlib.util.find_spec("httptools")):
        return GuardedHttpToolsProtocol
    return GuardedH11Protocol
