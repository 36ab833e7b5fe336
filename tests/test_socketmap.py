"""Tests for the socketmap_table(5) server protocol (postfix_mtasts.socketmap)."""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from postfix_mtasts import socketmap
from postfix_mtasts.mtasts.policy import netstring
from postfix_mtasts.socketmap import (
    ABORT_GRACE,
    TEMP_INTERNAL,
    TEMP_SHUTDOWN,
    SocketmapFactory,
    SocketmapProtocol,
)

PEER = cast(IAddress, IPv4Address("TCP", "127.0.0.1", 40000))
CHUNKINGS = ["whole", "bytes", "odd"]
# Framing limit plus the largest header ("10100:") and terminator.
BUFFER_BOUND = 10100 + 7


def echo(name: bytes, key: bytes) -> bytes:
    """A lookup whose reply names the request it answers."""
    return netstring(b"OK " + name + b"/" + key)


def feed(proto: SocketmapProtocol, data: bytes, chunking: str) -> None:
    """Deliver ``data`` whole, byte by byte, or in 1..9-byte chunks."""
    if chunking == "whole":
        proto.dataReceived(data)
        return
    pos = 0
    size = 1
    while pos < len(data):
        proto.dataReceived(data[pos : pos + size])
        pos += size
        if chunking == "odd":
            size = size % 9 + 1


def written(transport: StringTransport) -> bytes:
    """Everything written to ``transport`` so far."""
    value: bytes = transport.value()  # type: ignore[no-untyped-call]
    return value


def closing(transport: StringTransport) -> bool:
    """Whether the protocol has closed ``transport`` (a call, so mypy does not narrow it)."""
    return bool(transport.disconnecting)


def aborted(transport: StringTransport) -> bool:
    """Whether the protocol has aborted ``transport``."""
    return bool(transport.disconnected)


def failure(exc: BaseException) -> Failure:
    """A Failure wrapping ``exc``."""
    return Failure(exc)  # type: ignore[no-untyped-call]


def frames(*payloads: bytes) -> bytes:
    """The netstrings of ``payloads``, back to back."""
    return b"".join(netstring(p) for p in payloads)


def make(
    lookup: Callable[[bytes, bytes], Any] = echo, **kwargs: Any
) -> tuple[SocketmapFactory, Clock]:
    """A factory on a fresh Clock."""
    clock = Clock()
    return SocketmapFactory(lookup, cast(IReactorTime, clock), **kwargs), clock


def connect(factory: SocketmapFactory) -> tuple[SocketmapProtocol, StringTransport]:
    """A connected protocol over a StringTransport."""
    proto = factory.buildProtocol(PEER)
    assert proto is not None
    transport = StringTransport(peerAddress=PEER)  # type: ignore[no-untyped-call]
    proto.makeConnection(transport)  # type: ignore[no-untyped-call]
    return proto, transport


class Slow:
    """A lookup that answers from a table, or with a Deferred for keys listed as slow."""

    def __init__(self, *slow: bytes) -> None:
        self.slow = set(slow)
        self.calls: list[tuple[bytes, bytes]] = []
        self.waiting: dict[bytes, list[Deferred[bytes]]] = {}

    def __call__(self, name: bytes, key: bytes) -> bytes | Deferred[bytes]:
        self.calls.append((name, key))
        if key not in self.slow:
            return echo(name, key)
        d: Deferred[bytes] = Deferred()
        self.waiting.setdefault(key, []).append(d)
        return d

    def answer(self, key: bytes) -> None:
        """Fire the oldest Deferred handed out for ``key`` with its echo reply."""
        self.waiting[key].pop(0).callback(echo(b"postfix", key))


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap() -> Iterator[None]:
    """Collect earlier garbage once, then freeze it so each test's gc.collect() stays cheap."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Collect log events; fail the test if an unhandled Deferred error was logged."""
    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    unhandled = [e for e in seen if "Unhandled error" in str(e.get("log_format", ""))]
    assert not unhandled


@pytest.fixture(autouse=True)
def _no_unhandled(events: list[dict[str, Any]]) -> None:
    """Apply the unhandled-error check to every test."""


# -- framing and replies ------------------------------------------------------------------


def test_temp_replies_are_framed_by_the_one_netstring() -> None:
    """The TEMP constants are netstrings framed by the policy module's netstring()."""
    assert vars(socketmap)["netstring"] is netstring  # no copy of its own
    assert TEMP_INTERNAL == b"19:TEMP internal error,"
    assert TEMP_SHUTDOWN == b"18:TEMP shutting down,"


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(
    ("payloads", "expected_calls"),
    [
        ([b"postfix example.com"], [(b"postfix", b"example.com")]),
        ([b"postfix a b c"], [(b"postfix", b"a b c")]),
        ([b"postfix"], [(b"postfix", b"")]),
        ([b""], [(b"", b"")]),
        ([b"postfix "], [(b"postfix", b"")]),
        ([b" key"], [(b"", b"key")]),
        ([b"m \xff\x00,:"], [(b"m", b"\xff\x00,:")]),
        (
            [b"postfix a.example", b"other b.example", b"postfix c.example"],
            [(b"postfix", b"a.example"), (b"other", b"b.example"), (b"postfix", b"c.example")],
        ),
    ],
)
def test_requests_answered_in_order(
    chunking: str, payloads: list[bytes], expected_calls: list[tuple[bytes, bytes]]
) -> None:
    """Each frame, however segmented, is split at the first space and answered in order."""
    lookup = Slow()
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    feed(proto, frames(*payloads), chunking)
    assert lookup.calls == expected_calls
    assert written(transport) == b"".join(echo(n, k) for n, k in expected_calls)
    assert not closing(transport)
    assert proto.buffered == 0
    assert factory.requests == len(payloads)


def test_largest_request_accepted() -> None:
    """A payload of exactly max_request bytes is answered."""
    lookup = Slow()
    factory, _ = make(lookup, max_request=10100)
    proto, transport = connect(factory)
    payload = b"postfix " + b"a" * (10100 - 8)
    proto.dataReceived(netstring(payload))
    assert lookup.calls == [(b"postfix", b"a" * (10100 - 8))]
    assert not closing(transport)


def test_incomplete_frame_waits() -> None:
    """An incomplete frame is kept without a reply or a close until the rest arrives."""
    factory, _ = make()
    proto, transport = connect(factory)
    proto.dataReceived(b"10:postfix")
    assert written(transport) == b""
    assert not closing(transport)
    assert proto.buffered == len(b"10:postfix")
    proto.dataReceived(b" ab,")
    assert written(transport) == echo(b"postfix", b"ab")
    assert proto.buffered == 0


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"01:a,", id="leading-zero"),
        pytest.param(b"00:,", id="zero-zero"),
        pytest.param(b"x:a,", id="non-digit"),
        pytest.param(b"1x:a,", id="digit-then-letter"),
        pytest.param(b"-1:a,", id="negative"),
        pytest.param(b"+1:a,", id="plus-sign"),
        pytest.param(b" 1:a,", id="leading-space"),
        pytest.param(b"1_0:aaaaaaaaaa,", id="underscore"),
        pytest.param(b"\xd9\xa1:a,", id="non-ascii-digit"),
        pytest.param(b":a,", id="missing-length"),
        pytest.param(b"3abc,", id="missing-colon"),
        pytest.param(b"3:abc;", id="wrong-terminator"),
        pytest.param(b"3:abcd,", id="payload-longer-than-length"),
        pytest.param(b"10101:", id="over-limit"),
        pytest.param(b"999999:", id="too-many-digits"),
    ],
)
def test_framing_error_closes_without_reply(chunking: str, bad: bytes) -> None:
    """A malformed frame closes the connection; only earlier requests are answered."""
    lookup = Slow()
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    feed(proto, netstring(b"postfix first") + bad + netstring(b"postfix after"), chunking)
    assert written(transport) == echo(b"postfix", b"first")
    assert lookup.calls == [(b"postfix", b"first")]
    assert closing(transport)
    assert proto.buffered == 0


@pytest.mark.parametrize(
    ("digits", "closes_at"),
    [(b"10101", 4), (b"101000", 5), (b"999999", 4), (b"00", 1), (b"1a", 1), (b"-", 0)],
)
def test_bad_length_refused_while_digits_arrive(digits: bytes, closes_at: int) -> None:
    """An over-long or malformed length closes at the digit that makes it bad, before a colon."""
    factory, _ = make(max_request=10100)
    proto, transport = connect(factory)
    for index, byte in enumerate(digits):
        proto.dataReceived(bytes([byte]))
        assert closing(transport) == (index >= closes_at)
        if closing(transport):
            break
    assert closing(transport)
    assert proto.buffered == 0


def test_framing_error_logged_once_per_interval(events: list[dict[str, Any]]) -> None:
    """Framing errors are logged at most once a minute, escaped, with a count of the rest."""
    factory, clock = make()
    for _ in range(3):
        proto, transport = connect(factory)
        proto.dataReceived(b"x\x1b[31m:")
        assert closing(transport)
    warnings = [e for e in events if e.get("kind") == "framing error"]
    assert len(warnings) == 1
    assert warnings[0]["detail"] == b"x\x1b[31m:"
    assert "\x1b" not in formatEvent(warnings[0])
    clock.advance(60)
    proto, _ = connect(factory)
    proto.dataReceived(b"y:")
    warnings = [e for e in events if e.get("kind") == "framing error"]
    assert [w["suppressed"] for w in warnings] == [0, 2]


# -- Deferred lookups and pipelining -----------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_slow_lookup_holds_later_replies(chunking: str) -> None:
    """Replies to fast hits wait behind an earlier slow lookup and leave in request order."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    feed(proto, frames(b"postfix a", b"postfix slow", b"postfix b", b"postfix c"), chunking)
    assert written(transport) == echo(b"postfix", b"a")
    assert proto.outstanding == 3
    lookup.answer(b"slow")
    assert written(transport) == b"".join(echo(b"postfix", k) for k in (b"a", b"slow", b"b", b"c"))
    assert proto.outstanding == 0
    assert factory.requests == 4


def test_slow_lookups_answered_out_of_order() -> None:
    """Two slow lookups finishing in reverse order still reply in request order."""
    lookup = Slow(b"one", b"two")
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(frames(b"postfix one", b"postfix two"))
    lookup.answer(b"two")
    assert written(transport) == b""
    lookup.answer(b"one")
    assert written(transport) == echo(b"postfix", b"one") + echo(b"postfix", b"two")


def test_already_fired_deferred_keeps_order() -> None:
    """A Deferred that has already fired is answered at once, in order with its neighbours."""
    factory, _ = make(lambda n, k: succeed(echo(n, k)) if k == b"d" else echo(n, k))
    proto, transport = connect(factory)
    proto.dataReceived(frames(b"m a", b"m d", b"m b"))
    assert written(transport) == echo(b"m", b"a") + echo(b"m", b"d") + echo(b"m", b"b")
    assert proto.outstanding == 0


def test_max_pending_pauses_and_resumes() -> None:
    """Reading pauses at max_pending outstanding requests and resumes below it, in order."""
    lookup = Slow(b"k0", b"k1", b"k2", b"k3", b"k4")
    factory, _ = make(lookup, max_pending=3)
    proto, transport = connect(factory)
    proto.dataReceived(frames(*(b"postfix k%d" % i for i in range(5))))
    assert transport.producerState == "paused"
    assert [k for _, k in lookup.calls] == [b"k0", b"k1", b"k2"]
    lookup.answer(b"k0")
    assert transport.producerState == "paused"  # k3 was read and looked up: 3 outstanding
    assert [k for _, k in lookup.calls] == [b"k0", b"k1", b"k2", b"k3"]
    for key in (b"k1", b"k2", b"k3"):
        lookup.answer(key)
    assert transport.producerState == "producing"
    lookup.answer(b"k4")
    assert written(transport) == b"".join(echo(b"postfix", b"k%d" % i) for i in range(5))
    assert proto.outstanding == 0


def test_paused_connection_holds_late_bytes_and_refuses_a_flood() -> None:
    """Bytes delivered while paused wait for the resume; an unbounded flood is refused."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup, max_pending=1, max_request=100)
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix slow"))
    assert transport.producerState == "paused"
    proto.dataReceived(netstring(b"postfix late"))
    assert lookup.calls == [(b"postfix", b"slow")]
    lookup.answer(b"slow")
    assert written(transport) == echo(b"postfix", b"slow") + echo(b"postfix", b"late")
    proto.dataReceived(netstring(b"postfix slow"))
    proto.dataReceived(b"x" * 70000)
    assert closing(transport) is False  # an answer is still owed: close after it
    assert proto.buffered == 0
    lookup.answer(b"slow")
    assert closing(transport)


# -- failures ----------------------------------------------------------------------------


def test_lookup_exception_answers_temp(events: list[dict[str, Any]]) -> None:
    """A lookup that raises gets TEMP internal error, is logged, and the connection stays."""

    def lookup(name: bytes, key: bytes) -> bytes:
        if key == b"boom":
            raise RuntimeError("store unreadable")
        return echo(name, key)

    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(frames(b"postfix boom", b"postfix ok"))
    assert written(transport) == TEMP_INTERNAL + echo(b"postfix", b"ok")
    assert not closing(transport)
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["detail"] == (b"postfix", b"boom")


def test_failed_deferred_answers_temp(events: list[dict[str, Any]]) -> None:
    """A lookup Deferred that fails gets TEMP internal error in its place in the order."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(frames(b"postfix slow", b"postfix after"))
    lookup.waiting[b"slow"][0].errback(failure(ValueError("bad")))
    assert written(transport) == TEMP_INTERNAL + echo(b"postfix", b"after")
    assert not closing(transport)
    assert [e["log_failure"].check(ValueError) for e in events if "log_failure" in e] == [
        ValueError
    ]


@pytest.mark.parametrize("late", [False, True])
def test_wrong_reply_type_answers_temp(late: bool) -> None:
    """A lookup returning neither bytes nor a Deferred of bytes gets TEMP internal error."""

    def lookup(name: bytes, key: bytes) -> Any:
        return succeed("text") if late else "text"

    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix x"))
    assert written(transport) == TEMP_INTERNAL
    assert not closing(transport)


@pytest.mark.parametrize("partial", [b"", b"12:post"])
def test_eof_while_lookup_pending(partial: bytes) -> None:
    """After EOF, a pending lookup's late result is dropped without error or write."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix slow") + partial)
    proto.connectionLost(failure(ConnectionError("gone")))
    assert proto not in factory.connections
    assert proto.buffered == 0
    lookup.answer(b"slow")
    assert written(transport) == b""


def test_eof_while_lookup_fails() -> None:
    """After EOF, a pending lookup's late failure is consumed without an unhandled error."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix slow"))
    proto.connectionLost(failure(ConnectionError("gone")))
    lookup.waiting[b"slow"][0].errback(failure(ValueError("late")))
    assert written(transport) == b""


# -- timers ------------------------------------------------------------------------------


def test_idle_timeout_closes() -> None:
    """A connection without requests for idle_timeout seconds is closed; a request re-arms it."""
    factory, clock = make(idle_timeout=60.0)
    proto, transport = connect(factory)
    clock.advance(30)
    proto.dataReceived(netstring(b"postfix a"))
    clock.advance(59)
    assert not closing(transport)
    clock.advance(1)
    assert closing(transport)


def test_idle_timeout_waits_for_pending_reply() -> None:
    """A connection with a lookup in flight is not idle; the idle time counts from its reply."""
    lookup = Slow(b"slow")
    factory, clock = make(lookup, idle_timeout=60.0)
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix slow"))
    clock.advance(100)
    assert not closing(transport)
    lookup.answer(b"slow")
    clock.advance(59.5)
    assert not closing(transport)
    clock.advance(1)
    assert closing(transport)
    assert written(transport) == echo(b"postfix", b"slow")


def test_frame_deadline_closes_slow_frame(events: list[dict[str, Any]]) -> None:
    """A frame that starts but does not complete within frame_timeout closes the connection."""
    factory, clock = make(frame_timeout=10.0, idle_timeout=60.0)
    proto, transport = connect(factory)
    clock.advance(5)
    proto.dataReceived(b"12:post")
    clock.advance(9)
    proto.dataReceived(b"fix")
    assert not closing(transport)
    clock.advance(1)
    assert closing(transport)
    assert written(transport) == b""
    assert [e["kind"] for e in events if "kind" in e] == ["frame deadline"]


def test_frame_deadline_per_frame() -> None:
    """Each frame gets its own deadline: completed frames reset it, a new partial starts it."""
    factory, clock = make(frame_timeout=10.0, idle_timeout=60.0)
    proto, transport = connect(factory)
    proto.dataReceived(b"9:postfix")
    clock.advance(8)
    proto.dataReceived(b" a,9:postf")
    clock.advance(8)
    assert not closing(transport)
    clock.advance(2)
    assert closing(transport)
    assert written(transport) == echo(b"postfix", b"a")


def test_closed_connection_aborted_if_never_gone() -> None:
    """A refused connection that does not go away within idle_timeout is aborted."""
    factory, clock = make(idle_timeout=60.0)
    proto, transport = connect(factory)
    proto.dataReceived(b"x")
    assert closing(transport)
    assert not aborted(transport)
    clock.advance(60)
    assert aborted(transport)


# -- connections and shutdown ------------------------------------------------------------


def test_connection_cap(events: list[dict[str, Any]]) -> None:
    """buildProtocol refuses connections beyond max_connections until one closes."""
    factory, _ = make(max_connections=2)
    first, _ = connect(factory)
    connect(factory)
    assert factory.buildProtocol(PEER) is None
    assert [e["kind"] for e in events if "kind" in e] == ["connection limit"]
    first.connectionLost(failure(ConnectionError("gone")))
    assert factory.buildProtocol(PEER) is not None


def test_drain_without_connections() -> None:
    """drain() with no connections fires at once and refuses new connections."""
    factory, _ = make()
    fired: list[None] = []
    factory.drain().addCallback(fired.append)
    assert fired == [None]
    assert factory.buildProtocol(PEER) is None


def test_drain_finishes_in_flight_replies() -> None:
    """drain() closes idle connections, lets busy ones reply, then fires when all are closed."""
    lookup = Slow(b"slow")
    factory, _ = make(lookup)
    idle, idle_transport = connect(factory)
    busy, busy_transport = connect(factory)
    busy.dataReceived(netstring(b"postfix slow") + b"5:po")
    fired: list[None] = []
    factory.drain().addCallback(fired.append)
    assert closing(idle_transport)
    assert not closing(busy_transport)
    assert busy_transport.producerState == "paused"
    busy.dataReceived(netstring(b"postfix ignored"))
    assert factory.buildProtocol(PEER) is None
    idle.connectionLost(failure(ConnectionError("closed")))
    lookup.answer(b"slow")
    assert written(busy_transport) == echo(b"postfix", b"slow")
    assert closing(busy_transport)
    assert fired == []
    busy.connectionLost(failure(ConnectionError("closed")))
    assert fired == [None]
    assert lookup.calls == [(b"postfix", b"slow")]


def test_drain_timeout_answers_temp_then_aborts() -> None:
    """At the drain timeout owed replies become TEMP shutting down; stragglers are aborted."""
    lookup = Slow(b"slow")
    factory, clock = make(lookup)
    proto, transport = connect(factory)
    proto.dataReceived(frames(b"postfix slow", b"postfix fast"))
    fired: list[None] = []
    factory.drain(timeout=5.0).addCallback(fired.append)
    clock.advance(5)
    assert written(transport) == TEMP_SHUTDOWN + echo(b"postfix", b"fast")
    assert closing(transport)
    assert not aborted(transport)
    assert fired == []
    clock.advance(ABORT_GRACE)
    assert aborted(transport)
    assert fired == [None]
    lookup.answer(b"slow")
    assert written(transport) == TEMP_SHUTDOWN + echo(b"postfix", b"fast")
    proto.connectionLost(failure(ConnectionError("aborted")))
    assert not factory.connections
    assert not clock.getDelayedCalls()


def test_drain_timeout_fires_when_connections_go() -> None:
    """After the drain timeout, the result fires as soon as the last connection is gone."""
    factory, clock = make(Slow(b"slow"))
    proto, _ = connect(factory)
    proto.dataReceived(netstring(b"postfix slow"))
    fired: list[None] = []
    factory.drain(timeout=5.0).addCallback(fired.append)
    second: list[None] = []
    factory.drain().addCallback(second.append)
    clock.advance(5)
    proto.connectionLost(failure(ConnectionError("closed")))
    assert fired == second == [None]
    assert not clock.getDelayedCalls()


# -- random input ------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
payloads = st.binary(max_size=40)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8)


def feed_chunks(proto: SocketmapProtocol, data: bytes, sizes: list[int]) -> None:
    """Deliver ``data`` in chunks cycling through ``sizes``, checking the buffer bound."""
    pos = 0
    turn = 0
    while pos < len(data):
        size = sizes[turn % len(sizes)]
        proto.dataReceived(data[pos : pos + size])
        assert proto.buffered <= BUFFER_BOUND
        pos += size
        turn += 1


def assert_fresh_connection_works(factory: SocketmapFactory) -> None:
    """A new connection on ``factory`` still gets an answer."""
    proto, transport = connect(factory)
    proto.dataReceived(netstring(b"postfix fresh.example"))
    assert written(transport) == echo(b"postfix", b"fresh.example")


@FUZZ
@given(data=st.binary(max_size=400), sizes=chunk_sizes)
def test_random_bytes_never_escape(data: bytes, sizes: list[int]) -> None:
    """Random bytes raise nothing, keep the buffer bounded, and leave the server usable."""
    factory, clock = make()
    proto, transport = connect(factory)
    feed_chunks(proto, data, sizes)
    clock.advance(61)
    assert closing(transport)
    assert_fresh_connection_works(factory)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """Valid netstrings with a few random byte edits."""
    data = bytearray(frames(*draw(st.lists(payloads, min_size=1, max_size=5))))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        byte = draw(st.sampled_from([b"0", b"9", b":", b",", b"-", b" ", b"\x00", b"\xff"]))
        if kind == "flip" and data:
            data[at : at + 1] = byte
        elif kind == "insert":
            data[at:at] = byte
        elif data:
            del data[at]
    return bytes(data)


@FUZZ
@given(data=mutated_frames(), sizes=chunk_sizes)
def test_mutated_frames_never_escape(data: bytes, sizes: list[int]) -> None:
    """Mutated netstrings raise nothing, answer only whole frames, and leave the server usable."""
    lookup = Slow()
    factory, clock = make(lookup)
    proto, transport = connect(factory)
    feed_chunks(proto, data, sizes)
    assert written(transport) == b"".join(echo(n, k) for n, k in lookup.calls)
    clock.advance(61)
    assert closing(transport)
    assert_fresh_connection_works(factory)


@FUZZ
@given(
    items=st.lists(st.tuples(payloads, st.booleans()), max_size=6),
    sizes=chunk_sizes,
)
def test_valid_frames_then_request_answered(
    items: list[tuple[bytes, bool]], sizes: list[int]
) -> None:
    """After arbitrary valid frames, some with slow lookups, a final request's reply arrives."""
    lookup = Slow(*(p.partition(b" ")[2] for p, slow in items if slow))
    factory, _ = make(lookup, max_pending=4)
    proto, transport = connect(factory)
    requests = [p for p, _ in items] + [b"postfix last.example"]
    feed_chunks(proto, frames(*requests), sizes)
    while any(lookup.waiting.values()):
        lookup.answer(next(k for k, w in lookup.waiting.items() if w))
    replies = written(transport)
    assert replies.endswith(echo(b"postfix", b"last.example"))
    assert replies == b"".join(
        echo(b"postfix", k) if k in lookup.slow else echo(n, k) for n, k in lookup.calls
    )
    assert factory.requests == len(requests)
    assert not closing(transport)


# -- a real socket -----------------------------------------------------------------------


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs the tests in."""
    from twisted.internet import reactor as running  # noqa: TID251 -- loopback tests need it

    return running


class Client(Protocol):
    """Collects bytes until ``expected`` have arrived, and notices when the server closes."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.data = b""
        self.complete: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.complete.called:
            self.complete.callback(self.data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_loopback_tcp(reactor: Any) -> None:
    """Over a real loopback socket, pipelined requests are answered in order and drain closes."""

    def lookup(name: bytes, key: bytes) -> bytes | Deferred[bytes]:
        if key == b"later.example":
            return task.deferLater(reactor, 0, echo, name, key)
        return echo(name, key)

    factory = SocketmapFactory(lookup, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        keys = [b"later.example", b"example.com", b"x" * 5000]
        expected = b"".join(echo(b"postfix", key) for key in keys)
        client = Client(len(expected))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, client)  # type: ignore[no-untyped-call]
        transport: Any = client.transport
        request = frames(*(b"postfix " + key for key in keys))
        transport.write(request[:7])
        transport.write(request[7:])
        assert await client.complete == expected
        assert factory.requests == len(keys)
        await factory.drain(timeout=5.0)
        await client.closed
        assert not factory.connections
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_replies_larger_than_the_socket_buffer_stay_in_order(
    reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies sent directly on the socket and those queued when it is full arrive in order."""
    sizes = [90_000, 10, 90_000, 50_000, 3, 99_000] * 10
    queued: list[int] = []
    direct_write = SocketmapProtocol._write

    def counting_write(self: SocketmapProtocol, data: bytes) -> None:
        direct_write(self, data)
        t: Any = self.transport
        queued.append(len(t.dataBuffer) + sum(map(len, t._tempDataBuffer)))

    monkeypatch.setattr(SocketmapProtocol, "_write", counting_write)

    def lookup(name: bytes, key: bytes) -> bytes:
        return netstring(key.rjust(sizes[int(key)], b"."))

    factory = SocketmapFactory(lookup, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        requests = [b"postfix %d" % i for i in range(len(sizes))]
        expected = b"".join(lookup(b"postfix", r.split()[1]) for r in requests)
        client = Client(len(expected))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, client)  # type: ignore[no-untyped-call]
        transport: Any = client.transport
        while not factory.connections:
            await task.deferLater(reactor, 0.01, lambda: None)
        (server,) = factory.connections
        server_transport: Any = server.transport
        server_transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        transport.pauseProducing()  # let the server's socket buffer fill up first
        for start in range(0, len(requests), 6):
            transport.write(frames(*requests[start : start + 6]))
            await task.deferLater(reactor, 0.02, lambda: None)
        transport.resumeProducing()
        assert await client.complete == expected
        assert any(queued), "the socket never filled up: the queued path was not exercised"
        transport.loseConnection()
        await client.closed
    finally:
        await port.stopListening()
