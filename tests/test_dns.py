"""The DNS stub resolver against a real twisted.names server (and a raw UDP one) on loopback."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import pytest_twisted
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from postfix_mtasts.mtasts import dns as mtasts_dns
from postfix_mtasts.mtasts.dns import DNSClient, DNSFailure, _Query, parse_nameservers

if TYPE_CHECKING:
    from tests.dnsserver import DNSTestServer, ServerFactory


STS = "_mta-sts.example.test"


class ClockedReactor:
    """Real sockets from ``real``, time from ``clock``: the client's timers run on the Clock."""

    def __init__(self, real: Any, clock: Clock) -> None:
        self._real = real
        self.clock = clock

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        return self._real.listenUDP(*args, **kwargs)

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        return self._real.connectTCP(*args, **kwargs)

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()


class RawResponder(DatagramProtocol):
    """A UDP 'server' that answers each query with the datagrams ``respond(query)`` returns."""

    def __init__(self, respond: Callable[[dns.message.Message], list[bytes]]) -> None:
        self.respond = respond
        self.queries: list[dns.message.Message] = []
        self.peers: list[Any] = []
        self.port: Any = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        query = dns.message.from_wire(datagram)
        self.queries.append(query)
        self.peers.append(addr)
        for wire in self.respond(query):
            self.port.write(wire, addr)


def start_raw(reactor: Any, respond: Callable[[dns.message.Message], list[bytes]]) -> RawResponder:
    responder = RawResponder(respond)
    responder.port = reactor.listenUDP(0, responder, interface="127.0.0.1")
    return responder


def txt_response(query: dns.message.Message, *rrsets: tuple[str, str, str]) -> dns.message.Message:
    """A response to ``query`` whose answer holds ``(owner, type, rdata text)`` records."""
    response = dns.message.make_response(query)
    for owner, kind, text in rrsets:
        response.answer.append(dns.rrset.from_text(owner, 300, "IN", kind, text))
    return response


async def dead_port(reactor: Any) -> int:
    """A loopback UDP port that nobody listens on."""
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    number: int = port.getHost().port
    await port.stopListening()
    return number


def client_leftovers(reactor: Any) -> list[object]:
    """Sockets and timers of DNSClient still alive in the reactor."""
    selectables = set(reactor.getReaders()) | set(reactor.getWriters())
    return [
        s
        for s in selectables
        if isinstance(s, tcp.Client)
        or getattr(s, "protocol", None).__class__.__module__ == mtasts_dns.__name__
    ] + [c for c in reactor.getDelayedCalls() if c.func is mtasts_dns._expire]


# --- TXT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([("TXT", "v=STSv1; id=1")], [b"v=STSv1; id=1"]),
        ([("TXT", ["v=STS", "v1; id=x"])], [b"v=STSv1; id=x"]),
        ([("TXT", ["v=STSv1; ", "", "id=2"])], [b"v=STSv1; id=2"]),
        ([("TXT", "x" * 300)], [b"x" * 300]),
        ([("TXT", b"\xff\x00bin")], [b"\xff\x00bin"]),
        ([("TXT", "one"), ("TXT", "two"), ("A", "192.0.2.1")], [b"one", b"two"]),
        ([], []),
        (None, []),
    ],
    ids=["simple", "multi-string", "empty-string", "long", "binary", "several", "nodata", "nx"],
)
@pytest_twisted.ensureDeferred
async def test_txt(reactor: Any, dns_server: DNSTestServer, records: Any, expected: Any) -> None:
    """txt() joins each record's strings and gives [] for NODATA and NXDOMAIN."""
    dns_server.set(STS, records)
    client = DNSClient(reactor, [dns_server.address])
    assert sorted(await client.txt(STS)) == expected
    assert dns_server.queries == [(STS, "TXT", "udp")]
    assert client.queries_sent == 1


@pytest_twisted.ensureDeferred
async def test_query_shape_and_case(reactor: Any) -> None:
    """Queries ask with RD and EDNS payload 1232, and a case-changed answer still matches."""

    def respond(query: dns.message.Message) -> list[bytes]:
        name = query.question[0].name.to_text().upper()
        return [txt_response(query, (name, "TXT", '"v=STSv1; id=1"')).to_wire()]

    raw = start_raw(reactor, respond)
    try:
        client = DNSClient(reactor, [("127.0.0.1", raw.port.getHost().port)])
        assert await client.txt("_MTA-sts.Example.test.") == [b"v=STSv1; id=1"]
    finally:
        await raw.port.stopListening()
    (query,) = raw.queries
    assert query.flags & dns.flags.RD
    assert (query.edns, query.payload) == (0, 1232)
    assert query.question[0].name.to_text() == "_MTA-sts.Example.test."


@pytest.mark.parametrize("name", ["a..example", "ü.example", "x" * 64 + ".example"])
@pytest_twisted.ensureDeferred
async def test_bad_name(reactor: Any, dns_server: DNSTestServer, name: str) -> None:
    """A name that is not a valid ASCII DNS name raises ValueError without a query."""
    client = DNSClient(reactor, [dns_server.address])
    with pytest.raises(ValueError, match="bad DNS name"):
        await client.txt(name)
    assert client.queries_sent == 0


# --- CNAME -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chased", [True, False], ids=["in-answer", "second-query"])
@pytest_twisted.ensureDeferred
async def test_cname_followed(reactor: Any, dns_server: DNSTestServer, chased: bool) -> None:
    """A CNAME is followed, in the answer or with a query for its target."""
    dns_server.update(
        {
            "_mta-sts.alias.test": [("CNAME", "_mta-sts.Example.test.")],
            STS: [("TXT", "v=STSv1; id=1")],
        }
    )
    if not chased:
        dns_server.unchased.add("_mta-sts.alias.test")
    client = DNSClient(reactor, [dns_server.address])
    assert await client.txt("_mta-sts.alias.test") == [b"v=STSv1; id=1"]
    asked = ["_mta-sts.alias.test"] + ([] if chased else [STS])
    assert dns_server.queries == [(name, "TXT", "udp") for name in asked]


@pytest.mark.parametrize("chased", [True, False], ids=["in-answer", "second-query"])
@pytest.mark.parametrize(("hops", "found"), [(8, True), (9, False)])
@pytest_twisted.ensureDeferred
async def test_cname_chain_bound(
    reactor: Any, dns_server: DNSTestServer, chased: bool, hops: int, found: bool
) -> None:
    """A chain of 8 CNAMEs is followed; a 9th means no record."""
    for i in range(hops):
        dns_server.set(f"c{i}.test", [("CNAME", f"c{i + 1}.test")])
        if not chased:
            dns_server.unchased.add(f"c{i}.test")
    dns_server.set(f"c{hops}.test", [("TXT", "end")])
    client = DNSClient(reactor, [dns_server.address])
    assert await client.txt("c0.test") == ([b"end"] if found else [])


@pytest.mark.parametrize("chased", [True, False], ids=["in-answer", "second-query"])
@pytest_twisted.ensureDeferred
async def test_cname_loop(reactor: Any, dns_server: DNSTestServer, chased: bool) -> None:
    """A CNAME loop means no record, after a bounded number of queries."""
    dns_server.update({"a.test": [("CNAME", "b.test")], "b.test": [("CNAME", "a.test")]})
    if not chased:
        dns_server.unchased.update({"a.test", "b.test"})
    client = DNSClient(reactor, [dns_server.address])
    assert await client.txt("a.test") == []
    assert client.queries_sent == (1 if chased else 2)


@pytest.mark.parametrize(
    "target", [None, [], [("A", "192.0.2.1")]], ids=["nxdomain", "empty", "other-type"]
)
@pytest_twisted.ensureDeferred
async def test_cname_to_nothing(reactor: Any, dns_server: DNSTestServer, target: Any) -> None:
    """A CNAME whose target is missing or has no TXT means no record."""
    dns_server.update({"alias.test": [("CNAME", "target.test")]})
    dns_server.set("target.test", target)
    client = DNSClient(reactor, [dns_server.address])
    assert await client.txt("alias.test") == []


@pytest_twisted.ensureDeferred
async def test_only_final_target_records_kept(reactor: Any) -> None:
    """Only TXT owned by the end of the CNAME chain counts; other owners are ignored."""

    def respond(query: dns.message.Message) -> list[bytes]:
        response = txt_response(
            query,
            ("alias.test.", "TXT", '"beside the CNAME"'),
            ("alias.test.", "CNAME", "target.test."),
            ("elsewhere.test.", "TXT", '"unrelated"'),
            ("target.test.", "TXT", '"v=STSv1; id=t"'),
        )
        return [response.to_wire()]

    raw = start_raw(reactor, respond)
    try:
        client = DNSClient(reactor, [("127.0.0.1", raw.port.getHost().port)])
        assert await client.txt("alias.test") == [b"v=STSv1; id=t"]
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_other_class_ignored(reactor: Any) -> None:
    """Answer records of another class than IN do not count."""

    def respond(query: dns.message.Message) -> list[bytes]:
        response = dns.message.make_response(query)
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, 300, "CH", "TXT", '"chaos"'))
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "TXT", '"internet"'))
        return [response.to_wire()]

    raw = start_raw(reactor, respond)
    try:
        client = DNSClient(reactor, [("127.0.0.1", raw.port.getHost().port)])
        assert await client.txt(STS) == [b"internet"]
    finally:
        await raw.port.stopListening()


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [("_mta-sts.Example.test.", "TXT"), ("mta-sts.example.test.", "A"), ("x.", "AAAA")],
)
def test_query_is_dnspythons_rendering(name: str, rdtype: str) -> None:
    """A query's wire form is what dnspython renders for the same id, name and type."""
    query = _Query(dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
    expected = dns.message.make_query(name, rdtype, use_edns=0, payload=1232, id=query.id)
    assert query.to_wire() == expected.to_wire()


# --- failures and fallback ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("misbehaviour", "rcode"), [("servfail", "SERVFAIL"), ("refused", "REFUSED")]
)
@pytest_twisted.ensureDeferred
async def test_error_rcode(
    reactor: Any, dns_server: DNSTestServer, misbehaviour: str, rcode: str
) -> None:
    """SERVFAIL and REFUSED raise DNSFailure naming the code and the server, without retries."""
    dns_server.set(STS, [("TXT", "v=STSv1; id=1")])
    getattr(dns_server, misbehaviour).add(STS)
    client = DNSClient(reactor, [dns_server.address])
    with pytest.raises(DNSFailure) as caught:
        await client.txt(STS)
    assert str(caught.value) == f"{rcode} from 127.0.0.1:{dns_server.port}"
    assert client.queries_sent == 1


@pytest.mark.parametrize("misbehaviour", ["servfail", "refused", "dead"])
@pytest_twisted.ensureDeferred
async def test_fallback_to_second_server(
    reactor: Any,
    dns_server: DNSTestServer,
    dns_server_factory: ServerFactory,
    misbehaviour: str,
) -> None:
    """When the first server fails or its port is closed, the second one answers."""
    first = await dns_server_factory({STS: [("TXT", "first")]})
    if misbehaviour == "dead":
        await first.stop()
    else:
        getattr(first, misbehaviour).add(STS)
    dns_server.set(STS, [("TXT", "second")])
    client = DNSClient(reactor, [first.address, dns_server.address])
    assert await client.txt(STS) == [b"second"]


@pytest_twisted.ensureDeferred
async def test_all_servers_fail(reactor: Any, dns_server: DNSTestServer) -> None:
    """When every server fails, DNSFailure gives the last reason."""
    dead = ("127.0.0.1", await dead_port(reactor))
    dns_server.refused.add(STS)
    client = DNSClient(reactor, [dead, dns_server.address])
    with pytest.raises(DNSFailure, match=f"^REFUSED from 127.0.0.1:{dns_server.port}$"):
        await client.txt(STS)


@pytest_twisted.ensureDeferred
async def test_blackhole_deadline(reactor: Any, dns_server: DNSTestServer) -> None:
    """A silent server is asked twice (2.5 s each) and the lookup fails at the 5 s deadline."""
    dns_server.blackhole.add(STS)
    clocked = ClockedReactor(reactor, Clock())
    client = DNSClient(clocked, [dns_server.address], timeout=5.0)
    lookup = Deferred.fromCoroutine(client.txt(STS))
    await dns_server.received(1)
    clocked.clock.advance(2.4)
    assert not lookup.called
    clocked.clock.advance(0.1)
    await dns_server.received(2)
    clocked.clock.advance(2.5)
    with pytest.raises(DNSFailure, match=f"^timeout from 127.0.0.1:{dns_server.port}$"):
        await lookup
    assert client.queries_sent == 2
    assert clocked.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_blackhole_real_timeout(reactor: Any, dns_server: DNSTestServer) -> None:
    """With the real clock, a silent server makes a 0.3 s lookup fail with DNSFailure."""
    dns_server.blackhole.add(STS)
    client = DNSClient(reactor, [dns_server.address], timeout=0.3)
    with pytest.raises(DNSFailure, match="timeout"):
        await client.txt(STS)


@pytest_twisted.ensureDeferred
async def test_fallback_after_silence(
    reactor: Any, dns_server: DNSTestServer, dns_server_factory: ServerFactory
) -> None:
    """After the first server's attempt times out (5 s / 4), the second server is asked."""
    silent = await dns_server_factory({STS: [("TXT", "first")]})
    silent.blackhole.add(STS)
    dns_server.set(STS, [("TXT", "second")])
    clocked = ClockedReactor(reactor, Clock())
    client = DNSClient(clocked, [silent.address, dns_server.address], timeout=5.0)
    lookup = Deferred.fromCoroutine(client.txt(STS))
    await silent.received(1)
    clocked.clock.advance(1.2)
    assert dns_server.queries == []
    clocked.clock.advance(0.05)
    assert await lookup == [b"second"]


@pytest.mark.parametrize(
    "forgery",
    ["wrong-id", "wrong-question", "not-a-response", "garbage", "cut-short", "other-port"],
)
@pytest_twisted.ensureDeferred
async def test_forged_datagram_ignored(reactor: Any, forgery: str) -> None:
    """A datagram that does not answer the query is ignored and the genuine answer is taken."""
    other = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")

    def respond(query: dns.message.Message) -> list[bytes]:
        name = query.question[0].name.to_text()
        genuine = txt_response(query, (name, "TXT", '"genuine"')).to_wire()
        forged = txt_response(query, (name, "TXT", '"forged"'))
        if forgery == "wrong-id":
            forged.id ^= 0x5A5A
        elif forgery == "wrong-question":
            forged = txt_response(dns.message.make_query("other.test", "TXT", id=query.id))
        elif forgery == "not-a-response":
            forged.flags &= ~dns.flags.QR
        forged_wire = forged.to_wire()
        if forgery == "garbage":
            forged_wire = query.id.to_bytes(2, "big") + b"\x81\x80garbage"
        elif forgery == "cut-short":  # the right header and question, a broken answer
            forged.use_edns(False)
            forged_wire = forged.to_wire()[:-3]
        if forgery == "other-port":
            other.write(forged_wire, raw.peers[-1])
            return [genuine]
        return [forged_wire, genuine]

    raw = start_raw(reactor, respond)
    try:
        client = DNSClient(reactor, [("127.0.0.1", raw.port.getHost().port)])
        assert await client.txt(STS) == [b"genuine"]
    finally:
        await raw.port.stopListening()
        await other.stopListening()


@pytest.mark.parametrize(
    ("count", "flag", "protocols"),
    [(1, True, ["udp", "tcp"]), (5, False, ["udp"]), (6, False, ["udp", "tcp"])],
    ids=["tc-flag", "fits-1232", "over-1232"],
)
@pytest_twisted.ensureDeferred
async def test_truncation(
    reactor: Any, dns_server: DNSTestServer, count: int, flag: bool, protocols: list[str]
) -> None:
    """An answer over EDNS's 1232 bytes (or with TC set) is asked again over TCP, in full."""
    texts = [f"{i:02d}" + "r" * 198 for i in range(count)]
    dns_server.set(STS, [("TXT", text) for text in texts])
    if flag:
        dns_server.truncate.add(STS)
    client = DNSClient(reactor, [dns_server.address])
    assert sorted(await client.txt(STS)) == [text.encode() for text in texts]
    assert dns_server.queries == [(STS, "TXT", protocol) for protocol in protocols]
    assert client.queries_sent == len(protocols)


@pytest_twisted.ensureDeferred
async def test_ipv6_nameserver(reactor: Any, dns_server_factory: ServerFactory) -> None:
    """A nameserver on ::1 is queried over IPv6."""
    server = await dns_server_factory({STS: [("TXT", "v6")]}, host="::1")
    (nameserver,) = parse_nameservers([f"[::1]:{server.port}"])
    client = DNSClient(reactor, [nameserver])
    assert await client.txt(STS) == [b"v6"]
    assert server.queries == [(STS, "TXT", "udp")]


@pytest_twisted.ensureDeferred
async def test_no_sockets_or_timers_left(reactor: Any, dns_server: DNSTestServer) -> None:
    """After lookups of every outcome, no socket, connection or timer of the client remains."""
    dns_server.update({STS: [("TXT", "ok")], "trunc.test": [("TXT", "t")]})
    dns_server.truncate.add("trunc.test")
    dns_server.servfail.add("fail.test")
    dns_server.blackhole.add("silent.test")
    dead = ("127.0.0.1", await dead_port(reactor))
    client = DNSClient(reactor, [dead, dns_server.address], timeout=0.3)
    assert await client.txt(STS) == [b"ok"]
    assert await client.txt("trunc.test") == [b"t"]
    assert await client.txt("missing.test") == []
    assert await client.addresses(STS) == []
    for name in ("fail.test", "silent.test"):
        with pytest.raises(DNSFailure):
            await client.txt(name)
    assert client_leftovers(reactor) == []


@pytest_twisted.ensureDeferred
async def test_cancel_closes_socket(reactor: Any, dns_server: DNSTestServer) -> None:
    """Cancelling a lookup in flight closes its socket and cancels its timer."""
    dns_server.blackhole.add(STS)
    client = DNSClient(reactor, [dns_server.address])
    lookup = Deferred.fromCoroutine(client.txt(STS))
    await dns_server.received(1)
    assert client_leftovers(reactor) != []
    lookup.cancel()
    with pytest.raises(CancelledError):
        await lookup
    assert client_leftovers(reactor) == []


# --- addresses and MX --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_addresses(reactor: Any, dns_server: DNSTestServer) -> None:
    """addresses() gives IPv4 then IPv6 addresses after CNAMEs, [] when there are none."""
    dns_server.update(
        {
            "host.test": [("AAAA", "2001:db8::1"), ("A", "192.0.2.2"), ("A", "192.0.2.1")],
            "alias.test": [("CNAME", "host.test")],
            "v6.test": [("AAAA", "::1")],
            "none.test": [("TXT", "no addresses")],
        }
    )
    client = DNSClient(reactor, [dns_server.address])
    found = await client.addresses("alias.test")
    assert sorted(found[:2]) == ["192.0.2.1", "192.0.2.2"]
    assert found[2:] == ["2001:db8::1"]
    assert await client.addresses("v6.test") == ["::1"]
    assert await client.addresses("none.test") == []
    assert await client.addresses("missing.test") == []


@pytest_twisted.ensureDeferred
async def test_ipv4_and_ipv6(reactor: Any, dns_server: DNSTestServer) -> None:
    """ipv4() and ipv6() each ask one query and give one family's addresses after CNAMEs."""
    dns_server.update(
        {
            "host.test": [("AAAA", "2001:db8::1"), ("A", "192.0.2.1")],
            "alias.test": [("CNAME", "host.test")],
        }
    )
    client = DNSClient(reactor, [dns_server.address])
    assert await client.ipv4("alias.test") == ["192.0.2.1"]
    assert await client.ipv6("alias.test") == ["2001:db8::1"]
    assert await client.ipv6("missing.test") == []
    assert dns_server.queries == [
        ("alias.test", "A", "udp"),
        ("alias.test", "AAAA", "udp"),
        ("missing.test", "AAAA", "udp"),
    ]


@pytest_twisted.ensureDeferred
async def test_addresses_one_family_fails(reactor: Any, dns_server: DNSTestServer) -> None:
    """If only the AAAA lookup fails, addresses() gives the IPv4 addresses."""
    dns_server.set("host.test", [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")])
    dns_server.servfail.add(("host.test", "AAAA"))
    client = DNSClient(reactor, [dns_server.address])
    assert await client.addresses("host.test") == ["192.0.2.1"]


@pytest_twisted.ensureDeferred
async def test_addresses_concurrent_and_both_fail(reactor: Any, dns_server: DNSTestServer) -> None:
    """A and AAAA are asked at once; when both time out, addresses() raises DNSFailure."""
    dns_server.blackhole.add("host.test")
    clocked = ClockedReactor(reactor, Clock())
    client = DNSClient(clocked, [dns_server.address], timeout=5.0)
    lookup = Deferred.fromCoroutine(client.addresses("host.test"))
    await dns_server.received(2)
    assert sorted(dns_server.queries) == [("host.test", "A", "udp"), ("host.test", "AAAA", "udp")]
    clocked.clock.advance(5.0)
    with pytest.raises(DNSFailure, match="timeout"):
        await lookup


@pytest_twisted.ensureDeferred
async def test_mx(reactor: Any, dns_server: DNSTestServer) -> None:
    """mx() gives sorted (preference, lower-case host without dot), [] for none, "" for null MX."""
    dns_server.update(
        {
            "example.test": [
                ("MX", (20, "MX2.Example.TEST.")),
                ("MX", (10, "mx1.example.test")),
                ("MX", (10, "a.example.test")),
            ],
            "alias.test": [("CNAME", "example.test")],
            "null.test": [("MX", (0, "."))],
            "none.test": [("A", "192.0.2.1")],
        }
    )
    client = DNSClient(reactor, [dns_server.address])
    expected = [(10, "a.example.test"), (10, "mx1.example.test"), (20, "mx2.example.test")]
    assert await client.mx("example.test") == expected
    assert await client.mx("alias.test") == expected
    assert await client.mx("null.test") == [(0, "")]
    assert await client.mx("none.test") == []
    assert await client.mx("missing.test") == []


# --- parse_nameservers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("[2001:DB8:0::1]:5300", ("2001:db8::1", 5300)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("fe80::1%eth0", ("fe80::1%eth0", 53)),
    ],
)
def test_parse_nameservers(entry: str, expected: tuple[str, int]) -> None:
    """Each accepted nameserver form gives (host, port)."""
    assert parse_nameservers([entry]) == [expected]


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "ns.example.test",
        "ns.example.test:53",
        "256.0.0.1",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:dns",
        "192.0.2.1:+53",
        "192.0.2.1:\uff15\uff13",
        "[::1",
        "[::1]53",
        "[::1]:",
        "[192.0.2.1]:53",
        "[]:53",
        " 192.0.2.1",
    ],
)
def test_parse_nameservers_rejects(entry: str) -> None:
    """A bad nameserver entry raises ValueError naming it."""
    with pytest.raises(ValueError, match="bad nameserver") as caught:
        parse_nameservers(["192.0.2.1", entry])
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "# comment\nsearch example.test\nnameserver 192.0.2.1\n; other\n"
            "nameserver ::1\nnameserver junk\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n",
            [("192.0.2.1", 53), ("::1", 53), ("192.0.2.3", 53)],
        ),
        ("options edns0\n", [("127.0.0.1", 53)]),
        (None, [("127.0.0.1", 53)]),
    ],
    ids=["three-of-four", "no-nameserver", "no-file"],
)
def test_parse_nameservers_resolv_conf(tmp_path: Path, text: str | None, expected: Any) -> None:
    """Nothing configured reads resolv.conf (first three servers), else 127.0.0.1:53."""
    path = tmp_path / "resolv.conf"
    if text is not None:
        path.write_text(text)
    assert parse_nameservers([], resolv_conf=str(path)) == expected


def _wire_response(query: dns.message.Message, **change: Any) -> bytes:
    response = dns.message.make_response(query)
    for name, value in change.items():
        if name == "rcode":
            response.set_rcode(value)
        elif name == "question":
            response.question = value
        else:
            setattr(response, name, value)
    return response.to_wire()


def test_response_check_matches_dnspython() -> None:
    """The wire-level response check agrees with dnspython's is_response on each case."""
    name = dns.name.from_text("_mta-sts.Example.test.")
    query = _Query(name, dns.rdatatype.TXT)
    parsed = dns.message.from_wire(query.to_wire())
    other = dns.message.make_query("_mta-sts.other.test.", dns.rdatatype.TXT)
    cases = {
        "plain": _wire_response(parsed),
        "case changed": _wire_response(
            parsed,
            question=[
                dns.rrset.RRset(
                    dns.name.from_text("_MTA-STS.EXAMPLE.TEST."),
                    dns.rdataclass.IN,
                    dns.rdatatype.TXT,
                )
            ],
        ),
        "other id": _wire_response(parsed, id=(query.id + 1) % 65536),
        "other question": _wire_response(parsed, question=other.question),
        "refused without question": _wire_response(parsed, rcode=dns.rcode.REFUSED, question=[]),
        "noerror without question": _wire_response(parsed, question=[]),
        "not a response": query.to_wire(),
        "short": query.to_wire()[:11],
    }
    for label, wire in cases.items():
        try:
            expected = parsed.is_response(dns.message.from_wire(wire))
        except dns.exception.DNSException:
            expected = False
        assert query.answered_by(wire) == expected, label
    assert query.answered_by(cases["plain"]) and query.answered_by(cases["case changed"])
    assert not query.answered_by(cases["other question"])


def _answer_wire(query: _Query, answers: list[dns.rrset.RRset], *, compress: bool) -> bytes:
    """A NOERROR response to ``query`` with ``answers``, names compressed or written out."""
    wire = query.to_wire()
    header = wire[:2] + b"\x81\x80\x00\x01" + len(answers).to_bytes(2, "big") + b"\x00" * 4
    question_end = 12 + len(query.qname.to_wire() or b"") + 4
    out = io.BytesIO(header + wire[12:question_end])
    out.seek(0, io.SEEK_END)
    compression: dict[dns.name.Name, int] | None = {query.qname: 12} if compress else None
    for rrset in answers:
        rrset.to_wire(out, compress=compression)
    return out.getvalue()


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "written-out"])
def test_answer_owners_as_dnspython_reads_them(compress: bool) -> None:
    """The answer records and their owners are what dnspython reads, compressed or not."""
    name = dns.name.from_text("_mta-sts.Example.test.")
    query = _Query(name, dns.rdatatype.TXT)
    answers = [
        dns.rrset.from_text("_MTA-STS.example.TEST.", 300, "IN", "CNAME", "target.test."),
        dns.rrset.from_text(name, 300, "IN", "TXT", '"v=STSv1; id=a"'),
        dns.rrset.from_text("target.test.", 300, "IN", "TXT", '"v=STS" "v1; id=b"'),
        dns.rrset.from_text("target.test.", 300, "IN", "A", "192.0.2.1"),
        dns.rrset.from_text(name, 300, "CH", "TXT", '"chaos"'),
    ]
    wire = _answer_wire(query, answers, compress=compress)
    assert (b"\xc0\x0c" in wire) == compress
    response = mtasts_dns._response_to(query, wire)
    assert response is not None
    expected = [
        (rrset.name, rdata)
        for rrset in dns.message.from_wire(wire).answer
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype != dns.rdatatype.A
        for rdata in rrset
    ]
    assert response.records == expected
    assert response.cname(name) == dns.name.from_text("target.test.")
    assert response.rdatas(dns.name.from_text("target.test."), dns.rdatatype.TXT) == [
        expected[2][1]
    ]
