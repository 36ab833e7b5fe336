"""The socketmap_table(5) server protocol: netstring requests in, lookup replies out.

Postfix sends ``<len>:<map name> <key>,`` and waits for one framed reply (``OK <data>``,
``NOTFOUND ``, ``TEMP <reason>``...). This module knows nothing about MTA-STS: it frames, orders
and guards; a *lookup* function supplies each complete framed reply.

Robustness rules (``reference/mta-sts.md`` §7): a malformed frame closes the connection without a
reply to it; replies leave in request order, at most ``max_pending`` outstanding per connection
(reading pauses at the bound); idle connections and slow frames are closed; the number of
connections is capped; no input produces a traceback.

The common case (one small request per read, answered synchronously from a cache) costs a few
slices, one ``int()``, the lookup call and one ``transport.write``: no Deferred, no timer reset.
Each connection has one timer that, when it fires, compares the clock with the time of the last
request (idle timeout) and of the start of an incomplete frame (frame deadline), then re-arms
itself for the nearer deadline.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol as _TypingProtocol
from typing import TypeAlias, cast

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from postfix_mtasts.mtasts.policy import netstring

__all__ = [
    "TEMP_INTERNAL",
    "TEMP_SHUTDOWN",
    "Lookup",
    "SocketmapFactory",
    "SocketmapProtocol",
]

Lookup: TypeAlias = Callable[[bytes, bytes], "bytes | Deferred[bytes]"]
"""``(map name, key) -> complete framed reply`` (e.g. ``b"9:NOTFOUND ,"``), now or later.

A returned Deferred belongs to the caller: the protocol adds callbacks that consume its result.
A lookup layer that coalesces requests hands each caller its own Deferred.
"""

_log = Logger()

#: Seconds between two log messages of the same kind (the rest are counted, then reported).
LOG_INTERVAL = 60.0
#: Seconds a draining server waits, after its timeout, for closing connections before aborting.
ABORT_GRACE = 1.0
#: Bytes a paused connection may hold beyond ``max_request`` before it is refused.
_PAUSED_SLACK = 65536
#: How much of an offending frame a log message shows.
_SNIPPET = 40


TEMP_INTERNAL = netstring(b"TEMP internal error")
TEMP_SHUTDOWN = netstring(b"TEMP shutting down")


class _Transport(_TypingProtocol):
    """The parts of a stream transport (TCP, UNIX, TLS, StringTransport) this module uses."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def getPeer(self) -> IAddress: ...


class _DelayedCall(_TypingProtocol):
    """``IDelayedCall`` as a typing protocol."""

    def getTime(self) -> float: ...
    def active(self) -> bool: ...
    def cancel(self) -> None: ...
    def reset(self, secondsFromNow: float, /) -> None: ...


class _Clock(_TypingProtocol):
    """``IReactorTime`` as a typing protocol (zope interfaces are opaque to mypy)."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, f: Callable[[], object], /) -> _DelayedCall: ...


# A pending reply: a one-item list, None until the lookup's Deferred fires.
_Entry: TypeAlias = list[bytes | None]


class SocketmapProtocol(Protocol):
    """One socketmap client connection; built by :class:`SocketmapFactory`."""

    def __init__(self, factory: SocketmapFactory) -> None:
        self.factory = factory
        self._lookup = factory.lookup
        self._clock = factory._clock
        self._max_request = factory.max_request
        self._digits = len(str(factory.max_request))
        self._max_pending = factory.max_pending
        self._idle_timeout = factory.idle_timeout
        self._frame_timeout = factory.frame_timeout
        # Bytes of an incomplete frame (or of unread frames while paused); None when empty.
        self._buf: bytearray | None = None
        # Size of the whole buffered frame once its header is known, else 0.
        self._need = 0
        # When the buffered incomplete frame began to arrive.
        self._frame_start: float | None = None
        self._pending: deque[_Entry] = deque()
        self._paused = False
        self._closing = False
        self._close_by = 0.0
        self._last = 0.0
        self._timer: _DelayedCall | None = None
        self._t: _Transport

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (or unread frames while paused)."""
        return 0 if self._buf is None else len(self._buf)

    @property
    def outstanding(self) -> int:
        """Requests read but not yet answered on this connection."""
        return len(self._pending)

    # -- connection life --------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Register with the factory and start the idle timer."""
        self._t = cast(_Transport, self.transport)
        self._sock = _direct_socket(self.transport)
        self.factory.connections.add(self)
        self._last = self._clock.seconds()
        self._timer = self._clock.callLater(self._idle_timeout, self._tick)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget buffered bytes and pending replies; late lookup results are then ignored."""
        self._closing = True
        self._buf = None
        self._frame_start = None
        self._pending.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory._lost(self)

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Parse complete frames, answer them, keep an incomplete tail."""
        buf = self._buf
        if buf is None:
            if not self._closing:
                self._parse(data, None)
            return
        buf += data
        if self._paused:
            if len(buf) > self._max_request + _PAUSED_SLACK:
                self._refuse("overflow", bytes(buf[:_SNIPPET]))
            return
        if len(buf) < self._need:
            return
        started = self._frame_start
        self._buf = None
        self._frame_start = None
        self._parse(bytes(buf), started)

    def _parse(self, data: bytes, started: float | None) -> None:
        """Handle the frames in ``data``; ``started``: when its first frame began, if earlier."""
        n = len(data)
        pos = 0
        out: list[bytes] = []
        done = 0
        pending = self._pending
        lookup = self._lookup
        limit = self._max_request
        width = self._digits + 1
        while pos < n:
            colon = data.find(b":", pos, pos + width)
            if colon < 0:
                head = data[pos : pos + width]
                if (
                    len(head) == width
                    or not head.isdigit()
                    or (head[0] == 48 and len(head) > 1)
                    or int(head) > limit
                ):
                    self._framing_error(out, done, data, pos)
                    return
                self._stash(data, pos, 0, started)
                break
            digits = data[pos:colon]
            if not digits.isdigit() or (digits[0] == 48 and colon - pos > 1):
                self._framing_error(out, done, data, pos)
                return
            size = int(digits)
            if size > limit:
                self._framing_error(out, done, data, pos)
                return
            end = colon + 1 + size
            if end >= n:
                self._stash(data, pos, end + 1 - pos, started)
                break
            if data[end] != 44:  # b","
                self._framing_error(out, done, data, pos)
                return
            payload = data[colon + 1 : end]
            pos = end + 1
            space = payload.find(b" ")
            if space < 0:
                name, key = payload, b""
            else:
                name, key = payload[:space], payload[space + 1 :]
            reply: object
            try:
                reply = lookup(name, key)
            except Exception:  # noqa: BLE001 -- any lookup bug becomes a TEMP reply
                failure = Failure()  # type: ignore[no-untyped-call]
                self.factory._warn("lookup failed", self._t.getPeer(), (name, key), failure)
                reply = TEMP_INTERNAL
            if type(reply) is bytes:
                if not pending:
                    out.append(reply)
                    continue
                pending.append([reply])
            elif isinstance(reply, Deferred):
                if out:
                    done += len(out)
                    self._t.write(out[0] if len(out) == 1 else b"".join(out))
                    out = []
                entry: _Entry = [None]
                pending.append(entry)
                reply.addCallbacks(
                    self._answered,
                    self._failed,
                    callbackArgs=(entry, name, key),
                    errbackArgs=(entry, name, key),
                )
            else:
                self.factory._warn("bad reply", self._t.getPeer(), (name, key, reply))
                reply = TEMP_INTERNAL
                if not pending:
                    out.append(reply)
                    continue
                pending.append([reply])
            if len(pending) >= self._max_pending and not self._closing:
                # Stop reading; keep what was read (maybe b"") for when replies catch up.
                self._paused = True
                self._buf = bytearray(data[pos:])
                self._need = 0
                self._frame_start = None
                self._t.pauseProducing()
                break
        if out:
            done += len(out)
            self._write(out[0] if len(out) == 1 else b"".join(out))
        if pos:  # at least one complete request
            self._last = self._clock.seconds()
            self.factory.requests += done

    def _write(self, data: bytes) -> None:
        """Send ``data`` now if the transport holds nothing unsent, else queue it.

        Twisted's ``write`` always buffers and sends on the next reactor turn, registering
        and unregistering the socket for writability around it: for one small reply per
        request that bookkeeping costs more than the request.  A reply to a request that was
        just read nearly always fits in the socket buffer, so try ``send`` first and hand
        only what did not fit to the transport, which keeps the order.
        """
        sock = self._sock
        t = self._t
        if sock is not None and not t.dataBuffer and not t._tempDataBuffer:  # type: ignore[attr-defined]
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error the transport will notice and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def _stash(self, data: bytes, pos: int, need: int, started: float | None) -> None:
        """Keep the incomplete frame at ``data[pos:]`` and watch its deadline."""
        self._buf = bytearray(data[pos:])
        self._need = need
        if pos == 0 and started is not None:
            self._frame_start = started
            return
        now = self._clock.seconds()
        self._frame_start = now
        due = now + self._frame_timeout
        timer = self._timer
        if timer is not None and timer.getTime() > due:
            timer.reset(self._frame_timeout)

    def _framing_error(self, out: list[bytes], done: int, data: bytes, pos: int) -> None:
        """Send the replies already made, then close without answering the bad frame."""
        if out:
            done += len(out)
            self._t.write(out[0] if len(out) == 1 else b"".join(out))
        self.factory.requests += done
        self._refuse("framing error", data[pos : pos + _SNIPPET])

    def _refuse(self, kind: str, detail: object) -> None:
        """Log (rate-limited) and close once the replies already owed have been written."""
        self.factory._warn(kind, self._t.getPeer(), detail)
        self._close()

    # -- replies ----------------------------------------------------------------------------

    def _answered(self, reply: bytes, entry: _Entry, name: bytes, key: bytes) -> None:
        if type(reply) is not bytes:
            self.factory._warn("bad reply", self._t.getPeer(), (name, key, reply))
            reply = TEMP_INTERNAL
        entry[0] = reply
        if self._pending and self._pending[0] is entry:
            self._flush()

    def _failed(self, failure: Failure, entry: _Entry, name: bytes, key: bytes) -> None:
        self.factory._warn("lookup failed", self._t.getPeer(), (name, key), failure)
        entry[0] = TEMP_INTERNAL
        if self._pending and self._pending[0] is entry:
            self._flush()

    def _flush(self) -> None:
        """Write the answered replies at the head of the queue; resume or close as due."""
        pending = self._pending
        parts = []
        while pending:
            reply = pending[0][0]
            if reply is None:
                break
            parts.append(reply)
            pending.popleft()
        if parts:
            self._t.write(parts[0] if len(parts) == 1 else b"".join(parts))
            self.factory.requests += len(parts)
            self._last = self._clock.seconds()
        if self._closing:
            if not pending:
                self._t.loseConnection()
        elif self._paused and len(pending) < self._max_pending:
            self._paused = False
            self._t.resumeProducing()
            buf = self._buf
            self._buf = None
            if buf:
                self._parse(bytes(buf), None)

    # -- closing ----------------------------------------------------------------------------

    def _close(self) -> None:
        """Stop reading; close now if nothing is owed, else after the last owed reply."""
        if self._closing:
            return
        self._closing = True
        self._buf = None
        self._frame_start = None
        self._close_by = self._clock.seconds() + self._idle_timeout
        if self._pending:
            if not self._paused:
                self._paused = True
                self._t.pauseProducing()
        else:
            self._t.loseConnection()
        if self._timer is None:
            self._timer = self._clock.callLater(self._idle_timeout, self._tick)
        elif self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _expire(self) -> None:
        """Answer every reply still owed with ``TEMP shutting down``, then close."""
        for entry in self._pending:
            if entry[0] is None:
                entry[0] = TEMP_SHUTDOWN
        self._close()
        self._flush()

    def _tick(self) -> None:
        """Close idle connections and overdue frames; otherwise re-arm for the next deadline."""
        self._timer = None
        now = self._clock.seconds()
        if self._closing:
            if now >= self._close_by:
                self._t.abortConnection()
                return
            due = self._close_by
        else:
            due = now + self._idle_timeout
            start = self._frame_start
            if start is not None and not self._paused:
                deadline = start + self._frame_timeout
                if now >= deadline:
                    self._refuse("frame deadline", bytes(self._buf or b"")[:_SNIPPET])
                    return
                due = min(due, deadline)
            if not self._pending:
                deadline = self._last + self._idle_timeout
                if now >= deadline:
                    self._close()
                    return
                due = min(due, deadline)
        self._timer = self._clock.callLater(due - now, self._tick)


def _direct_socket(transport: object) -> socket.socket | None:
    """The socket of a plain TCP or UNIX transport that :meth:`SocketmapProtocol._write` may
    send on directly; None for anything else (TLS, test transports), which then only gets
    ``transport.write``."""
    if not isinstance(transport, tcp.Connection):  # TLS wraps it in its own protocol
        return None
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        return None
    if not hasattr(transport, "dataBuffer") or not hasattr(transport, "_tempDataBuffer"):
        return None
    return sock


class SocketmapFactory(Factory):
    """Builds :class:`SocketmapProtocol` connections that answer through ``lookup``.

    :param lookup: ``(map name, key) -> framed reply bytes`` or a Deferred of them.
    :param clock: the reactor (or a ``Clock`` in tests) for timeouts and log rate limits.
    :param max_connections: connections beyond this are accepted and closed at once.
    :param max_request: the largest netstring payload accepted, in bytes.
    :param max_pending: requests outstanding per connection before reading pauses.
    :param idle_timeout: seconds without a request (and nothing owed) before closing.
    :param frame_timeout: seconds a started frame has to arrive completely.
    """

    noisy = False

    def __init__(
        self,
        lookup: Lookup,
        clock: IReactorTime,
        *,
        max_connections: int = 1024,
        max_request: int = 10100,
        max_pending: int = 128,
        idle_timeout: float = 60.0,
        frame_timeout: float = 10.0,
    ) -> None:
        if max_request < 0 or max_pending < 1 or max_connections < 0:
            raise ValueError("max_request >= 0, max_pending >= 1, max_connections >= 0")
        self.lookup = lookup
        self.clock = clock
        self._clock = cast(_Clock, clock)
        self.max_connections = max_connections
        self.max_request = max_request
        self.max_pending = max_pending
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.connections: set[SocketmapProtocol] = set()
        self.requests = 0
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []
        self._drain_timer: _DelayedCall | None = None
        self._logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def buildProtocol(self, addr: IAddress | None) -> SocketmapProtocol | None:
        """A new protocol, or None (Twisted closes the connection) when full or draining."""
        if self._draining:
            return None
        if len(self.connections) >= self.max_connections:
            self._warn("connection limit", addr, self.max_connections)
            return None
        return SocketmapProtocol(self)

    def drain(self, timeout: float = 10.0) -> Deferred[None]:
        """Shut down: stop reading, close idle connections now, finish in-flight replies.

        Each connection closes after its last owed reply. The result fires when all are
        closed, or at ``timeout``: then replies still owed are answered ``TEMP shutting down``
        and those connections closed, and any still open ``ABORT_GRACE`` seconds later are
        aborted. New connections are refused from now on.
        """
        if not self._draining:
            self._draining = True
            for proto in list(self.connections):
                proto._close()
            if self.connections:
                self._drain_timer = self._clock.callLater(timeout, self._drain_expired)
        if not self.connections and not self._drain_waiters:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def _drain_expired(self) -> None:
        for proto in list(self.connections):
            proto._expire()
        if self.connections:
            self._drain_timer = self._clock.callLater(ABORT_GRACE, self._drain_abort)
        else:
            self._drain_timer = None
            self._drained()

    def _drain_abort(self) -> None:
        self._drain_timer = None
        for proto in list(self.connections):
            proto._t.abortConnection()
        self._drained()

    def _drained(self) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _lost(self, proto: SocketmapProtocol) -> None:
        self.connections.discard(proto)
        if self._draining and not self.connections:
            self._drained()

    def _warn(
        self, kind: str, peer: object, detail: object, failure: Failure | None = None
    ) -> None:
        """Log one message of ``kind`` per ``LOG_INTERVAL``; count the ones left out."""
        now = self._clock.seconds()
        last = self._logged.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._logged[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        fmt = "socketmap {kind} from {peer}: {detail!r} ({suppressed} similar not logged)"
        if failure is None:
            _log.warn(fmt, kind=kind, peer=peer, detail=detail, suppressed=suppressed)
        else:
            _log.failure(
                fmt,
                failure,
                LogLevel.error,
                kind=kind,
                peer=peer,
                detail=detail,
                suppressed=suppressed,
            )
