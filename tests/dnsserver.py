"""A real DNS server on loopback for integration tests: twisted.names with a zone from a dict.

In a test::

    server = await start_dns_server(reactor, {
        "_mta-sts.example.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.example.test": [("A", "127.0.0.1")],
        "example.test": [("MX", (10, "mx.example.test"))],
        "_mta-sts.alias.test": [("CNAME", "_mta-sts.example.test")],
    })
    try:
        client = DNSClient(reactor, [server.address])
        ...
    finally:
        await server.stop()

or use its fixtures after ``pytest_plugins = ["tests.dnsserver"]`` (best in the root
``tests/conftest.py``: a test module that lists it must not also import this module, or
pytest warns that it cannot rewrite its asserts): ``dns_server`` (an empty zone, filled with
``server.set``), ``dns_server_factory`` (``await dns_server_factory(zone, host="::1")`` for
more servers) and ``reactor`` (the reactor pytest-twisted runs on).

Records: ``("TXT", "text")`` (strings over 255 bytes are split), ``("TXT", ["a", "b"])`` (one
record, several character-strings), ``("A", "192.0.2.1")``, ``("AAAA", "::1")``,
``("MX", (10, "mx.example.test"))`` (``"."`` for a null MX), ``("CNAME", "target.test")``.
Text may be ``bytes``. A name listed with no records exists (NODATA); an unlisted one is
NXDOMAIN. The server follows CNAMEs inside its zone like a recursive resolver (loops end the
chain), except for names in ``server.unchased``, whose CNAME is answered alone.

Misbehaviour, per name (lower-case, no trailing dot) or per ``(name, "TYPE")``:
``servfail``, ``refused``, ``blackhole`` (never answers), ``truncate`` (UDP answers have TC
and no records; TCP answers fully). ``server.queries`` lists ``(name, type, "udp"|"tcp")``;
``await server.received(n)`` waits until it holds ``n`` entries.

From a shell (benchmarks): ``python -m tests.dnsserver --zone-file zone.json [--port N]
[--stats-file PATH]`` prints the port on its first line and serves until SIGTERM; the JSON maps
names to lists of ``[type, value]``. With ``--stats-file``, each SIGUSR1 rewrites PATH
(atomically) with ``{"seq": n, "total": queries, "by_type": {"TXT": n, ...}, "by_name":
{"name TYPE": n, ...}}``; ``seq`` counts the dumps, so a reader knows when its signal was served.
"""

# mypy: disable-error-code="no-untyped-call"
# (twisted.names has no type hints)

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import react
from twisted.names import common, dns, server
from twisted.names.error import DomainError

RecordSpec = tuple[str, Any]
Zone = Mapping[str, Iterable[RecordSpec]]
ServerFactory = Callable[..., Awaitable["DNSTestServer"]]
Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]

TTL = 300
MAX_CHASE = 16


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "backslashreplace")
    return name.lower().rstrip(".")


def _bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _record(kind: str, value: Any) -> Any:
    """A twisted.names record payload from one ``(type, value)`` spec."""
    kind = kind.upper()
    if kind == "TXT":
        strings = [value] if isinstance(value, str | bytes) else list(value)
        chunks = [
            data[i : i + 255]
            for data in map(_bytes, strings)
            for i in range(0, max(len(data), 1), 255)
        ]
        return dns.Record_TXT(*chunks, ttl=TTL)
    if kind == "A":
        return dns.Record_A(value, ttl=TTL)
    if kind == "AAAA":
        return dns.Record_AAAA(value, ttl=TTL)
    if kind == "MX":
        preference, host = value
        return dns.Record_MX(int(preference), _bytes(host).rstrip(b"."), ttl=TTL)
    if kind == "CNAME":
        return dns.Record_CNAME(_bytes(value), ttl=TTL)
    raise ValueError(f"unsupported record type {kind!r} in the test zone")


class _NameError(DomainError):
    """NXDOMAIN, with the CNAMEs that led to the missing name."""

    def __init__(self, answers: list[dns.RRHeader]) -> None:
        super().__init__()
        self.answers = answers


class _ZoneAuthority(common.ResolverBase):
    """The authority of the test server: answers from ``DNSTestServer.zone``."""

    def __init__(self, owner: DNSTestServer) -> None:
        common.ResolverBase.__init__(self)
        self._owner = owner

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> Deferred[Answer]:
        zone = self._owner.zone
        answers: list[dns.RRHeader] = []
        owner = _key(name)
        seen = {owner}
        while len(answers) < MAX_CHASE:
            if owner not in zone:
                return fail(_NameError(answers))
            records = zone[owner]
            wanted = [r for r in records if type in (r.TYPE, dns.ALL_RECORDS)]
            cnames = [r for r in records if r.TYPE == dns.CNAME]
            if wanted or not cnames:
                answers += [_header(owner, r) for r in wanted]
                break
            answers.append(_header(owner, cnames[0]))
            if owner in self._owner.unchased:
                break
            owner = _key(cnames[0].name.name)
            if owner in seen:
                break
            seen.add(owner)
        return succeed((answers, [], []))


def _header(owner: str, payload: Any) -> dns.RRHeader:
    return dns.RRHeader(owner.encode(), payload.TYPE, dns.IN, TTL, payload, auth=True)


class _Factory(server.DNSServerFactory):
    """DNSServerFactory that records queries and misbehaves on request."""

    def __init__(self, owner: DNSTestServer) -> None:
        super().__init__(authorities=[_ZoneAuthority(owner)])
        self._owner = owner
        self._closed: list[Deferred[None]] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        name = _key(query.name.name)
        kind = dns.QUERY_TYPES.get(query.type, str(query.type))
        udp = address is not None
        owner = self._owner
        owner.record_query(name, kind, "udp" if udp else "tcp")
        if owner.matches(owner.blackhole, name, kind):
            return
        if owner.matches(owner.servfail, name, kind):
            response = self._responseFromMessage(message, rCode=dns.ESERVER)
        elif owner.matches(owner.refused, name, kind):
            response = self._responseFromMessage(message, rCode=dns.EREFUSED)
        elif udp and owner.matches(owner.truncate, name, kind):
            response = self._responseFromMessage(message)
            response.trunc = 1
        else:
            super().handleQuery(message, protocol, address)
            return
        self.sendReply(protocol, response, address)

    def _responseFromMessage(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        response = super()._responseFromMessage(message, *args, **kwargs)
        # The UDP size limit: the EDNS payload the client advertised, else 512 bytes.
        payloads = [r.cls for r in message.additional if r.type == dns.OPT]
        response.maxSize = max([*payloads, 512])
        return response

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        """Send ``message``; over UDP, one over the client's limit goes empty with TC."""
        if address is None:
            message.maxSize = 0
        elif len(message.toStr()) > message.maxSize:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = 1
        super().sendReply(protocol, message, address)

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(_NameError):
            response = self._responseFromMessage(
                message, rCode=dns.ENAME, answers=failure.value.answers
            )
            self.sendReply(protocol, response, address)
        else:
            super().gotResolverError(failure, protocol, message, address)

    def connectionLost(self, protocol: Any) -> None:
        super().connectionLost(protocol)
        if not self.connections:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        """Close the TCP connections still open; fires once they are gone."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        return d


class DNSTestServer:
    """A test DNS server; see the module docstring. ``start`` it, then ``await stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.zone: dict[str, list[Any]] = {}
        self.queries: list[tuple[str, str, str]] = []
        self.servfail: set[Any] = set()
        self.refused: set[Any] = set()
        self.blackhole: set[Any] = set()
        self.truncate: set[Any] = set()
        self.unchased: set[str] = set()
        self._factory: _Factory | None = None
        self._listening: list[Any] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, as ``DNSClient`` takes it."""
        return (self.host, self.port)

    def set(self, name: str, records: Sequence[RecordSpec] | None) -> None:
        """Replace the records of ``name``; ``[]`` leaves it with none, None removes it."""
        if records is None:
            self.zone.pop(_key(name), None)
        else:
            self.zone[_key(name)] = [_record(kind, value) for kind, value in records]

    def update(self, zone: Zone) -> None:
        """``set`` every name of ``zone``."""
        for name, records in zone.items():
            self.set(name, list(records))

    def received(self, count: int) -> Deferred[None]:
        """Fires once the server has seen ``count`` queries in all (at once if it has)."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def record_query(self, name: str, kind: str, protocol: str) -> None:
        """Note a query in ``queries`` and wake whoever waits for it."""
        self.queries.append((name, kind, protocol))
        self._wake()

    def _wake(self) -> None:
        ready = [d for count, d in self._waiters if count <= len(self.queries)]
        self._waiters = [(c, d) for c, d in self._waiters if d not in ready]
        for d in ready:
            d.callback(None)

    @staticmethod
    def matches(names: AbstractSet[Any], name: str, kind: str) -> bool:
        """Whether ``name`` or ``(name, kind)`` is in one of the misbehaviour sets."""
        return name in names or (name, kind) in names

    def start(self, reactor: Any) -> None:
        """Listen on TCP and UDP, both on ``self.port`` (a free one if 0)."""
        self._factory = _Factory(self)
        for _ in range(20):
            tcp = reactor.listenTCP(self.port, self._factory, interface=self.host)
            try:
                udp = reactor.listenUDP(
                    tcp.getHost().port, dns.DNSDatagramProtocol(self._factory), interface=self.host
                )
            except CannotListenError:
                if self.port:
                    tcp.stopListening()
                    raise
                tcp.stopListening()
                continue
            # A large receive buffer, so that bursts from benchmarks are not dropped here.
            udp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self.port = tcp.getHost().port
            self._listening = [tcp, udp]
            return
        raise CannotListenError(self.host, self.port, OSError("no free port for TCP and UDP"))

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        for port in self._listening:
            await port.stopListening()
        self._listening = []
        if self._factory is not None:
            await self._factory.all_closed()


async def start_dns_server(
    reactor: Any, zone: Zone | None = None, host: str = "127.0.0.1", port: int = 0
) -> DNSTestServer:
    """Start a test DNS server on ``host`` (UDP and TCP on one port) answering from ``zone``."""
    dns_server = DNSTestServer(host=host, port=port)
    dns_server.update(zone or {})
    dns_server.start(reactor)
    return dns_server


@pytest.fixture
def reactor() -> Any:
    """The global reactor, which pytest-twisted runs the tests on."""
    from twisted.internet import reactor as global_reactor  # noqa: TID251

    return global_reactor


@pytest_twisted.async_yield_fixture()
async def dns_server(reactor: Any) -> AsyncIterator[DNSTestServer]:
    """A test DNS server on 127.0.0.1 with an empty zone, stopped after the test."""
    started = await start_dns_server(reactor)
    yield started
    await started.stop()


@pytest_twisted.async_yield_fixture()
async def dns_server_factory(reactor: Any) -> AsyncIterator[ServerFactory]:
    """``await dns_server_factory(zone, host=...)`` starts more servers, all stopped after."""
    started: list[DNSTestServer] = []

    async def start(zone: Zone | None = None, host: str = "127.0.0.1") -> DNSTestServer:
        started.append(await start_dns_server(reactor, zone, host))
        return started[-1]

    yield start
    for each in started:
        await each.stop()


def _write_stats(path: str, seq: int, queries: Sequence[tuple[str, str, str]]) -> None:
    """Write the query counts of ``queries`` to ``path`` as JSON, atomically."""
    by_type: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for name, kind, _protocol in queries:
        by_type[kind] = by_type.get(kind, 0) + 1
        key = f"{name} {kind}"
        by_name[key] = by_name.get(key, 0) + 1
    stats = {"seq": seq, "total": len(queries), "by_type": by_type, "by_name": by_name}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a JSON zone file until stopped; print the port first."""
    parser = argparse.ArgumentParser(prog="python -m tests.dnsserver")
    parser.add_argument("--zone-file", required=True, help="JSON: {name: [[type, value], ...]}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stats-file", help="rewritten with the query counts on each SIGUSR1")
    args = parser.parse_args(argv)
    with open(args.zone_file, encoding="utf-8") as f:
        zone = {name: [tuple(r) for r in records] for name, records in json.load(f).items()}

    async def serve(reactor: Any) -> None:
        started = await start_dns_server(reactor, zone, args.host, args.port)
        if args.stats_file:
            dumps = [0]

            def dump() -> None:
                dumps[0] += 1
                _write_stats(args.stats_file, dumps[0], started.queries)

            signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
        print(started.port, flush=True)
        await Deferred()

    react(lambda reactor: Deferred.fromCoroutine(serve(reactor)))


if __name__ == "__main__":
    main()
