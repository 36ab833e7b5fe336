"""An asynchronous DNS stub resolver: dnspython builds and parses messages, Twisted moves them.

Each query is a fresh message (random id, RD set, EDNS with a 1232-byte payload) sent over UDP
from a new socket on a random port, connected to the nameserver so that the kernel drops
datagrams from anyone else and reports an unreachable port. Only a response whose id, opcode
and question match the query is accepted; anything else is ignored and the wait goes on. A
truncated response (TC) is asked again over TCP from the same server.

Timing: one deadline (``timeout``) covers a whole lookup, CNAME re-queries included. Within it
the servers are tried in order, each attempt waiting ``max(timeout / (2 * servers), 0.5)``
seconds (never past the deadline), then round again. With the default 5 s and one server
that is two attempts of 2.5 s; with two servers four attempts of 1.25 s. A server that
answers SERVFAIL, REFUSED (or another error code) or whose port is unreachable is not asked
again in the same lookup; when none is left, or the deadline passes, the lookup fails with
:class:`DNSFailure`. Every socket and connection a lookup opened is closed before it returns.

See ``reference/mta-sts.md`` §2 for why CNAMEs are walked here. Twisted logs the opening and
closing of every UDP port; those lines carry the prefix ``DNSClient``.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.wire
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from postfix_mtasts.config import parse_nameserver

DEFAULT_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
MAX_CNAME_HOPS = 8
"""CNAMEs followed per lookup, across queries; a longer chain or a loop means no records."""
EDNS_PAYLOAD = 1232
MIN_ATTEMPT = 0.5
"""Shortest wait for one attempt at one server (seconds), unless the deadline is nearer."""

_IN = dns.rdataclass.IN
_log = Logger()


class DNSFailure(Exception):
    """No live answer: SERVFAIL, REFUSED, timeout, bad responses, every server failed.

    ``str(e)`` is a short reason, e.g. ``"SERVFAIL from 127.0.0.1:5353"``.
    """


class DNSReactor(Protocol):
    """What :class:`DNSClient` needs of a reactor: IReactorUDP, IReactorTCP and IReactorTime."""

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = ..., maxPacketSize: int = ...
    ) -> Any:
        """Start a UDP port; the result has ``connect``, ``write`` and ``stopListening``."""

    def connectTCP(self, host: str, port: int, factory: ClientFactory, timeout: float = ...) -> Any:
        """Start a TCP connection; the result has ``disconnect``."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any:
        """Schedule a call; the result has ``active`` and ``cancel``."""

    def seconds(self) -> float:
        """The current time, in the clock's seconds."""


def parse_nameservers(
    configured: Sequence[str], resolv_conf: str = RESOLV_CONF
) -> list[tuple[str, int]]:
    """Turn configured nameserver strings into ``(host, port)`` pairs.

    Each entry is read by :func:`postfix_mtasts.config.parse_nameserver` (``192.0.2.53``,
    ``127.0.0.1:5353``, ``[::1]:53``, ``[::1]``, ``::1``). Raises :class:`ValueError` naming the
    first bad entry. With nothing configured, the ``nameserver`` lines of ``resolv_conf`` are
    used (the first three, as the C library does), else ``127.0.0.1:53``.
    """
    if configured:
        return [_nameserver(entry) for entry in configured]
    return _read_resolv_conf(resolv_conf) or [("127.0.0.1", DEFAULT_PORT)]


def _nameserver(entry: str) -> tuple[str, int]:
    try:
        return parse_nameserver(entry)  # the parser that checks the configuration
    except ValueError as e:
        raise ValueError(f"bad nameserver {entry!r}: {e}") from None


def _read_resolv_conf(path: str) -> list[tuple[str, int]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append((str(ipaddress.ip_address(fields[1])), DEFAULT_PORT))
            except ValueError:
                continue
    return servers[:3]


@dataclass(frozen=True, slots=True)
class _Server:
    host: str
    port: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    @property
    def label(self) -> str:
        if self.address.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def sent(self, addr: object) -> bool:
        """Whether a datagram from ``addr`` (a ``(host, port)`` tuple) came from this server."""
        if not isinstance(addr, tuple) or len(addr) < 2 or addr[1] != self.port:
            return False
        try:
            return ipaddress.ip_address(addr[0]) == self.address
        except ValueError:
            return False


class _Timeout(Exception):
    """One attempt at one server got no answer in time."""


def _expire(answered: Deferred[_Response]) -> None:
    if not answered.called:
        answered.errback(_Timeout())


@functools.cache
def _template(rdtype: dns.rdatatype.RdataType) -> bytes:
    """A query of type ``rdtype`` for the root name, as dnspython renders it (id 0, RD, EDNS
    with our payload): the header, a one-byte name, type and class, then the OPT record."""
    query = dns.message.make_query(dns.name.root, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    query.id = 0
    return query.to_wire()


_QUESTION_OPTIONAL = frozenset(
    {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}
)


class _Query:
    """One query message, sent with a fresh random id.

    Rendering a dnspython message costs more than the rest of a lookup, and queries differ
    only in id, name and type: so the message is dnspython's rendering of a query for the
    root name of the type (made once per type), with the id and dnspython's wire form of
    the name put in. The name keeps the case it was asked in.
    """

    __slots__ = ("_question", "_wire", "id", "qname", "rdtype")

    def __init__(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
        template = _template(rdtype)
        name = qname.to_wire()
        assert name is not None  # to_wire() without a file returns the bytes
        self.id = secrets.randbits(16)
        self.qname = qname
        self.rdtype = rdtype
        self._wire = b"".join((self.id.to_bytes(2, "big"), template[2:12], name, template[13:]))
        self._question = (name + template[13:17]).lower()

    def to_wire(self) -> bytes:
        return self._wire

    def answered_by(self, wire: bytes) -> bool:
        """Whether ``wire`` is a response to this query (what dnspython's is_response checks):
        same id, QR set, opcode QUERY, and our question, compared case-insensitively; error
        responses may leave the question out."""
        if len(wire) < 12 or wire[:2] != self._wire[:2] or not wire[2] & 0x80 or wire[2] & 0x78:
            return False
        if wire[4:6] == b"\x00\x01":
            end = 12 + len(self._question)
            return wire[12:end].lower() == self._question
        return wire[4:6] == b"\x00\x00" and (wire[3] & 0x0F) in _QUESTION_OPTIONAL

    @property
    def question_end(self) -> int:
        """Where the answer section starts in a response that repeats our question."""
        return 12 + len(self._question)


@dataclass(frozen=True, slots=True)
class _Response:
    """What a lookup uses of a response: its RCODE, its TC flag, and the records of its
    answer section that are of class IN and of the asked type or CNAME, as ``(owner,
    rdata)`` in wire order (empty unless the RCODE is NOERROR and TC is clear)."""

    rcode: int
    truncated: bool
    records: list[tuple[dns.name.Name, dns.rdata.Rdata]]

    def cname(self, owner: dns.name.Name) -> dns.name.Name | None:
        """The target of ``owner``'s CNAME in the answer, if there is one."""
        for name, rdata in self.records:
            if isinstance(rdata, dns.rdtypes.ANY.CNAME.CNAME) and name == owner:
                return rdata.target
        return None

    def rdatas(self, owner: dns.name.Name, rdtype: int) -> list[dns.rdata.Rdata]:
        """``owner``'s records of type ``rdtype`` in the answer."""
        return [r for name, r in self.records if r.rdtype == rdtype and name == owner]


_QUESTION_POINTER = b"\xc0\x0c"
"""A compressed name pointing at offset 12: the question's name."""


@functools.cache
def _rdata_class(rdtype: int) -> Any:
    """dnspython's class for IN records of ``rdtype`` (its own lookup costs more each time)."""
    return dns.rdata.get_rdata_class(_IN, dns.rdatatype.RdataType.make(rdtype))  # type: ignore[no-untyped-call]


def _response_to(query: _Query, wire: bytes) -> _Response | None:
    """The response in ``wire`` if it answers ``query``, else None.

    Only the header and the answer section are read, with dnspython's wire parser and rdata
    decoders: building a whole dnspython message costs several times more, and the other
    sections say nothing a stub resolver uses here. (The extended RCODE bits of an OPT
    record are not read: they only signal EDNS versions and cookies, which we do not send.)
    """
    if not query.answered_by(wire):
        return None
    rcode, truncated = wire[3] & 0x0F, bool(wire[2] & dns.flags.TC >> 8)
    records: list[tuple[dns.name.Name, dns.rdata.Rdata]] = []
    if rcode != dns.rcode.NOERROR or truncated:
        return _Response(rcode, truncated, records)
    try:
        parser = dns.wire.Parser(wire, query.question_end)
        for _ in range(int.from_bytes(wire[6:8], "big")):
            if wire[parser.current : parser.current + 2] == _QUESTION_POINTER:
                # Owned by the question's name (which answered_by compared with ours):
                # the usual case, and reading a name is the costliest step here.
                owner = query.qname
                parser.seek(parser.current + 2)
            else:
                owner = parser.get_name(decompress=True)
            rrtype, rrclass, _ttl, length = parser.get_struct("!HHIH")
            if rrclass != _IN or rrtype not in (query.rdtype, dns.rdatatype.CNAME):
                parser.seek(parser.current + length)
                continue
            with parser.restrict_to(length):
                rdata = _rdata_class(rrtype).from_wire_parser(_IN, rrtype, parser)
            records.append((owner, rdata))
    except Exception:  # noqa: BLE001 - untrusted bytes: whatever fails to parse is not an answer
        return None
    return _Response(rcode, truncated, records)


class _UDPExchange(DatagramProtocol):
    noisy = False

    def logPrefix(self) -> str:
        return "DNSClient"

    def __init__(
        self,
        query: _Query,
        server: _Server,
        answered: Deferred[_Response],
    ) -> None:
        self._query = query
        self._server = server
        self._answered = answered

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self._answered.called:
            return
        response = _response_to(self._query, datagram) if self._server.sent(addr) else None
        if response is None:
            _log.debug("Ignored a datagram from {peer!r} that does not answer", peer=addr)
            return
        self._answered.callback(response)

    def connectionRefused(self) -> None:
        if not self._answered.called:
            self._answered.errback(DNSFailure(f"port unreachable at {self._server.label}"))

    def stopProtocol(self) -> None:
        # The epoll reactor closes a connected UDP port on an ICMP error without calling
        # connectionRefused, so a port that closes before the answer means the same.
        self.connectionRefused()


class _TCPExchange(Int16StringReceiver):
    def __init__(
        self,
        query: _Query,
        answered: Deferred[_Response],
        on_sent: Callable[[], None],
    ) -> None:
        self._query = query
        self._answered = answered
        self._on_sent = on_sent

    def connectionMade(self) -> None:
        self.sendString(self._query.to_wire())  # type: ignore[no-untyped-call]
        self._on_sent()

    def stringReceived(self, string: bytes) -> None:
        response = _response_to(self._query, string)
        if response is not None and not self._answered.called:
            self._answered.callback(response)


class _TCPFactory(ClientFactory):
    noisy = False

    def __init__(
        self,
        query: _Query,
        server: _Server,
        answered: Deferred[_Response],
        on_sent: Callable[[], None],
    ) -> None:
        self._query = query
        self._server = server
        self._answered = answered
        self._on_sent = on_sent
        self.closed: Deferred[None] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> _TCPExchange:
        return _TCPExchange(self._query, self._answered, self._on_sent)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._end(f"TCP connection to {self._server.label} failed")

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self._end(f"TCP connection to {self._server.label} closed without an answer")

    def _end(self, reason: str) -> None:
        if not self._answered.called:
            self._answered.errback(DNSFailure(reason))
        if not self.closed.called:
            self.closed.callback(None)


def _name(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text.encode("ascii"))
    except (UnicodeError, dns.exception.DNSException) as e:
        raise ValueError(f"bad DNS name {text!r}: {e}") from None


def _addresses(records: list[dns.rdata.Rdata]) -> list[str]:
    return [
        r.address for r in records if isinstance(r, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
    ]


def _host(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


class DNSClient:
    """A stub resolver asking ``nameservers`` in order; see the module docstring for timing.

    ``queries_sent`` counts the query messages sent, over UDP and TCP.
    """

    def __init__(
        self,
        reactor: DNSReactor,
        nameservers: Sequence[tuple[str, int]],
        timeout: float = 5.0,
    ) -> None:
        if not nameservers:
            raise ValueError("DNSClient needs at least one nameserver")
        self._reactor = reactor
        self._servers = [
            _Server(host, port, ipaddress.ip_address(host)) for host, port in nameservers
        ]
        self._timeout = timeout
        self._attempt = max(timeout / (2 * len(self._servers)), MIN_ATTEMPT)
        self.queries_sent = 0

    async def txt(self, name: str) -> list[bytes]:
        """TXT records of ``name`` after CNAMEs, each record's strings joined with nothing.

        ``[]`` for NXDOMAIN, NODATA, a CNAME loop or a chain over 8 hops. Raises
        :class:`DNSFailure` without a live answer, :class:`ValueError` for a malformed name.
        ``name`` is an ASCII (A-label) name and may begin with an underscore.
        """
        records = await self._lookup(_name(name), dns.rdatatype.TXT, self._deadline())
        return [b"".join(r.strings) for r in records if isinstance(r, dns.rdtypes.ANY.TXT.TXT)]

    async def addresses(self, name: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``name`` after CNAMEs (A and AAAA asked concurrently).

        ``[]`` when there are none; :class:`DNSFailure` only if both lookups failed.
        """
        qname = _name(name)
        deadline = self._deadline()
        lookups = [
            Deferred.fromCoroutine(self._lookup(qname, rdtype, deadline))
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        found: list[str] = []
        failures: list[DNSFailure] = []
        try:
            for lookup in lookups:
                try:
                    found.extend(_addresses(await lookup))
                except DNSFailure as failure:
                    failures.append(failure)
        finally:
            for lookup in lookups:
                if not lookup.called:
                    lookup.addErrback(lambda _: None)
                    lookup.cancel()
        if len(failures) == len(lookups):
            raise failures[0]
        return found

    async def ipv4(self, name: str) -> list[str]:
        """IPv4 addresses of ``name`` after CNAMEs (A records), ``[]`` when there are none."""
        return _addresses(await self._lookup(_name(name), dns.rdatatype.A, self._deadline()))

    async def ipv6(self, name: str) -> list[str]:
        """IPv6 addresses of ``name`` after CNAMEs (AAAA records), ``[]`` when there are none."""
        return _addresses(await self._lookup(_name(name), dns.rdatatype.AAAA, self._deadline()))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """MX records of ``name`` after CNAMEs: sorted ``(preference, host)``, ``[]`` for none.

        Hosts are lower-case without the trailing dot; a null MX (RFC 7505) gives ``(0, "")``.
        """
        records = await self._lookup(_name(name), dns.rdatatype.MX, self._deadline())
        return sorted(
            (r.preference, _host(r.exchange))
            for r in records
            if isinstance(r, dns.rdtypes.ANY.MX.MX)
        )

    def _count_sent(self) -> None:
        self.queries_sent += 1

    def _deadline(self) -> float:
        return self._reactor.seconds() + self._timeout

    async def _lookup(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> list[dns.rdata.Rdata]:
        """The ``rdtype`` records at the end of ``qname``'s CNAME chain."""
        seen = {qname}
        while True:
            response = await self._query(qname, rdtype, deadline)
            if response.rcode == dns.rcode.NXDOMAIN:
                return []
            owner = qname
            while (target := response.cname(owner)) is not None:
                if target in seen or len(seen) > MAX_CNAME_HOPS:
                    _log.debug("CNAME loop or chain over {hops} hops", hops=MAX_CNAME_HOPS)
                    return []
                seen.add(target)
                owner = target
            records = response.rdatas(owner, rdtype)
            if records:
                return records
            if owner == qname:
                return []
            qname = owner

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> _Response:
        """A NOERROR or NXDOMAIN response from one of the servers, else DNSFailure."""
        live = list(self._servers)
        reason = f"no answer within {self._timeout:g} s"
        while live:
            for server in list(live):
                if self._reactor.seconds() >= deadline:
                    raise DNSFailure(reason)
                try:
                    response = await self._exchange(qname, rdtype, server, deadline)
                except _Timeout:
                    reason = f"timeout from {server.label}"
                    continue
                except DNSFailure as failure:
                    reason = str(failure)
                    live.remove(server)
                    continue
                rcode = response.rcode
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                reason = f"{dns.rcode.to_text(dns.rcode.Rcode.make(rcode))} from {server.label}"
                live.remove(server)
        raise DNSFailure(reason)

    async def _exchange(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        server: _Server,
        deadline: float,
    ) -> _Response:
        """One attempt: a fresh query over UDP, then over TCP if the answer was truncated."""
        query = _Query(qname, rdtype)
        response = await self._udp(query, server, self._wait(deadline))
        if response.truncated:
            response = await self._tcp(query, server, self._wait(deadline))
        return response

    def _wait(self, deadline: float) -> float:
        wait = min(self._attempt, deadline - self._reactor.seconds())
        if wait <= 0:
            raise _Timeout()
        return wait

    async def _udp(self, query: _Query, server: _Server, wait: float) -> _Response:
        answered: Deferred[_Response] = Deferred()
        interface = "::" if server.address.version == 6 else "0.0.0.0"
        try:
            port = self._reactor.listenUDP(
                0, _UDPExchange(query, server, answered), interface=interface
            )
        except CannotListenError as e:
            raise DNSFailure(f"no UDP socket for {server.label}: {e.socketError}") from None
        timer = self._reactor.callLater(wait, _expire, answered)
        try:
            port.connect(server.host, server.port)
            port.write(query.to_wire())
            self._count_sent()
            return await answered
        except (OSError, ValueError) as e:
            raise DNSFailure(f"cannot send to {server.label}: {e}") from None
        finally:
            if timer.active():
                timer.cancel()
            stopped = port.stopListening()  # None if the port closed by itself
            if stopped is not None:
                await stopped

    async def _tcp(self, query: _Query, server: _Server, wait: float) -> _Response:
        answered: Deferred[_Response] = Deferred()
        factory = _TCPFactory(query, server, answered, self._count_sent)
        connector = self._reactor.connectTCP(server.host, server.port, factory, timeout=wait)
        timer = self._reactor.callLater(wait, _expire, answered)
        try:
            return await answered
        finally:
            if timer.active():
                timer.cancel()
            connector.disconnect()
            await factory.closed
