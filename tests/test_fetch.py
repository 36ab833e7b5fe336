"""The HTTPS policy fetcher against a real loopback server and a test CA (mta-sts.md §3)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from OpenSSL._util import lib as openssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts import __version__
from postfix_mtasts.mtasts import fetch
from postfix_mtasts.mtasts.fetch import (
    MAX_BODY,
    STS_FETCH_ERROR,
    STS_POLICY_INVALID,
    STS_WEBPKI_INVALID,
    FetchError,
    PolicyFetcher,
)
from tests.httpsserver import (
    GOOD_POLICY,
    WELL_KNOWN,
    PolicyServer,
    Reply,
    policy,
    redirect,
    status,
)
from tests.pki import (
    SNIContextFactory,
    TestCA,
    TLS11OnlyContextFactory,
    expired_leaf,
    not_yet_valid_leaf,
    server_options,
    tls11_available,
    untrusted_leaf,
    wrong_name_leaf,
)

DOMAIN = "example.test"
HOST = "mta-sts.example.test"
CA = TestCA("Fetch Test Root")


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs."""
    from twisted.internet import reactor  # noqa: TID251 - the test process's running reactor

    return reactor


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """A CA bundle holding the test root."""
    return str(CA.write_bundle(tmp_path))


@pytest.fixture
def sni() -> SNIContextFactory:
    """Server certificates issued by the test root for whatever name the client asks."""
    return SNIContextFactory(CA)


@pytest_twisted.async_yield_fixture
async def server(reactor: Any, sni: SNIContextFactory) -> AsyncIterator[PolicyServer]:
    """A running policy host serving the good policy for HOST."""
    srv = PolicyServer(reactor, sni, {HOST: policy()})
    await srv.start()
    yield srv
    await srv.stop()


class FakeResolve:
    """A resolve() that answers fixed addresses and remembers what it was asked."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.asked: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        return list(self.addresses)


@pytest.fixture
def make_fetcher(reactor: Any, server: PolicyServer, ca_file: str) -> Callable[..., PolicyFetcher]:
    """Build fetchers trusting the test root and reaching ``server`` for every host."""

    def make(**kw: Any) -> PolicyFetcher:
        kw.setdefault("resolve", FakeResolve("127.0.0.1"))
        kw.setdefault("ca_file", ca_file)
        return PolicyFetcher(reactor, port=server.port, **kw)

    return make


def memory_reactor() -> Any:
    """A fake reactor with a clock, recording connection attempts."""
    return MemoryReactorClock()  # type: ignore[no-untyped-call]


def failed(result: Deferred[bytes]) -> FetchError:
    """The FetchError a finished fetch Deferred failed with."""
    failures: list[Failure] = []
    result.addErrback(failures.append)
    [failure] = failures
    assert isinstance(failure.value, FetchError)
    return failure.value


async def fetch_error(fetcher: PolicyFetcher, domain: str = DOMAIN) -> FetchError:
    """The FetchError that fetching ``domain`` raises."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch(domain)
    return info.value


@pytest_twisted.ensureDeferred
async def test_good_policy(make_fetcher):
    """A 200 text/plain response yields the body bytes unchanged."""
    resolve = FakeResolve("127.0.0.1")
    fetcher = make_fetcher(resolve=resolve)
    assert await fetcher.fetch(DOMAIN) == GOOD_POLICY
    assert resolve.asked == [HOST]
    assert fetcher.fetches == 1


@pytest_twisted.ensureDeferred
async def test_request_is_minimal(server, make_fetcher):
    """The request is a GET of the well-known path with Host, our User-Agent, and no extras."""
    await make_fetcher().fetch(DOMAIN)
    [request] = server.requests
    assert (request.method, request.path, request.version) == ("GET", WELL_KNOWN, "HTTP/1.1")
    assert request.header("host") == HOST
    assert request.header("user-agent") == f"postfix-mtasts/{__version__}"
    names = {name for name, _ in request.headers}
    assert names.isdisjoint({"accept-encoding", "cookie", "authorization", "referer"})
    assert names <= {"host", "user-agent", "connection"}


@pytest_twisted.ensureDeferred
async def test_sni_names_policy_host(server, make_fetcher):
    """The client sends SNI for the policy host (without it the server shows "localhost")."""
    assert await make_fetcher().fetch(DOMAIN) == GOOD_POLICY
    assert [r.host for r in server.requests] == [HOST]


@pytest.mark.parametrize(
    "names",
    [["*.example.test"], ["MTA-STS.Example.Test"], ["other.test", HOST]],
    ids=["wildcard", "upper-case", "second-name"],
)
@pytest_twisted.ensureDeferred
async def test_certificate_names_accepted(make_fetcher, sni, names):
    """A DNS-ID covers the policy host whatever its case, as a wildcard, or as one of several."""
    sni.set_certificate(HOST, *CA.issue(names))
    assert await make_fetcher().fetch(DOMAIN) == GOOD_POLICY


@pytest.mark.parametrize(
    ("leaf", "detail"),
    [
        (lambda: untrusted_leaf([HOST]), "unable to get local issuer certificate"),
        (lambda: wrong_name_leaf(CA), f"certificate not valid for {HOST}"),
        (lambda: CA.issue(["*.sub.example.test"]), f"certificate not valid for {HOST}"),
        (lambda: CA.issue(["mta-*.example.test"]), f"certificate not valid for {HOST}"),
        (lambda: CA.issue(["*.test"]), f"certificate not valid for {HOST}"),
        (lambda: expired_leaf(CA, [HOST]), "certificate has expired"),
        (lambda: not_yet_valid_leaf(CA, [HOST]), "certificate is not yet valid"),
    ],
    ids=[
        "untrusted-ca",
        "wrong-name",
        "wildcard-too-deep",
        "partial-wildcard",
        "wildcard-too-shallow",
        "expired",
        "not-yet-valid",
    ],
)
@pytest_twisted.ensureDeferred
async def test_certificate_problems(server, make_fetcher, sni, leaf, detail):
    """Certificate problems are sts-webpki-invalid, with the reason in the detail."""
    sni.set_certificate(HOST, *leaf())
    e = await fetch_error(make_fetcher())
    assert e.failure_type == STS_WEBPKI_INVALID
    assert detail in e.detail
    assert server.requests == []


@pytest_twisted.ensureDeferred
async def test_host_check_in_python_when_openssl_cannot(make_fetcher, sni, monkeypatch):
    """Without OpenSSL's host check functions, service_identity decides the same way."""
    monkeypatch.setattr(fetch, "_HOST_CHECK", False)
    assert await make_fetcher().fetch(DOMAIN) == GOOD_POLICY
    sni.set_certificate(HOST, *wrong_name_leaf(CA))
    e = await fetch_error(make_fetcher())
    assert (e.failure_type, e.detail) == (STS_WEBPKI_INVALID, f"certificate not valid for {HOST}")


@pytest_twisted.ensureDeferred
async def test_system_trust_store_does_not_know_test_root(make_fetcher):
    """Without ca_file the system trust store applies, which does not trust the test root."""
    fetcher = make_fetcher(ca_file="")
    e = await fetch_error(fetcher)
    assert e.failure_type == STS_WEBPKI_INVALID


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirect_not_followed(server, make_fetcher, code):
    """A redirect is a fetch error and its target is never contacted."""
    target = "mta-sts.elsewhere.test"
    server.set(HOST, redirect(f"https://{target}{WELL_KNOWN}", code))
    server.set(target, policy())
    resolve = FakeResolve("127.0.0.1")
    e = await fetch_error(make_fetcher(resolve=resolve))
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"redirect ({code}) not followed")
    assert [r.host for r in server.requests] == [HOST]
    assert resolve.asked == [HOST]


@pytest.mark.parametrize("code", [201, 204, 206, 300, 304, 404, 500, 503])
@pytest_twisted.ensureDeferred
async def test_status_other_than_200(server, make_fetcher, code):
    """Any status but 200 is a fetch error naming the status."""
    server.set(HOST, status(code, b"" if code == 204 else GOOD_POLICY))
    e = await fetch_error(make_fetcher())
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"HTTP {code}")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "TEXT/PLAIN",
        "Text/Plain",
        "text/plain; charset=utf-8",
        "text/plain;charset=ISO-8859-1",
        " text/plain ",
    ],
)
@pytest_twisted.ensureDeferred
async def test_text_plain_accepted(server, make_fetcher, content_type):
    """The media type text/plain is accepted in any case, whatever its parameters say."""
    server.set(HOST, policy(content_type=content_type))
    assert await make_fetcher().fetch(DOMAIN) == GOOD_POLICY


@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        ("text/html", "content type 'text/html'"),
        ("application/octet-stream", "content type 'application/octet-stream'"),
        ("text/plain-ish", "content type 'text/plain-ish'"),
        ("text", "content type 'text'"),
        ("text/", "content type 'text/'"),
        ("text plain", "content type 'text plain'"),
        (None, "content type missing"),
        ("", "content type ''"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_content_type(server, make_fetcher, content_type, detail):
    """Another, missing or unparseable content type makes the response sts-policy-invalid."""
    server.set(HOST, policy(content_type=content_type))
    e = await fetch_error(make_fetcher())
    assert (e.failure_type, e.detail) == (STS_POLICY_INVALID, detail)


@pytest_twisted.ensureDeferred
async def test_conflicting_content_types(server, make_fetcher):
    """Two different Content-Type headers make the response sts-policy-invalid."""
    server.set(HOST, Reply(body=GOOD_POLICY, headers=(("Content-Type", "text/html"),)))
    e = await fetch_error(make_fetcher())
    assert e.failure_type == STS_POLICY_INVALID


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize(("size", "ok"), [(MAX_BODY, True), (MAX_BODY + 1, False)])
@pytest_twisted.ensureDeferred
async def test_body_cap(server, make_fetcher, framing, size, ok):
    """Bodies up to 65536 bytes pass however they are framed; one byte more is a fetch error."""
    body = (GOOD_POLICY * (size // len(GOOD_POLICY) + 1))[:size]
    server.set(HOST, Reply(body=body, framing=framing))
    fetcher = make_fetcher()
    if ok:
        assert await fetcher.fetch(DOMAIN) == body
    else:
        e = await fetch_error(fetcher)
        assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"body over {MAX_BODY} bytes")


@pytest_twisted.ensureDeferred
async def test_large_content_length_refused_before_body(server, make_fetcher):
    """A Content-Length over the cap fails at once, even if the body never comes."""
    server.set(HOST, Reply(body=b"", content_length=10**9, hang=True))
    e = await fetch_error(make_fetcher())
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"body over {MAX_BODY} bytes")


@pytest_twisted.ensureDeferred
async def test_huge_chunked_body_aborted(server, make_fetcher):
    """A chunked body far over the cap is cut off at the cap."""
    server.set(HOST, Reply(body=b"x" * (4 * MAX_BODY), framing="chunked"))
    e = await fetch_error(make_fetcher(max_body=1000))
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, "body over 1000 bytes")


@pytest.mark.parametrize(
    ("reply", "timeout"),
    [
        (Reply(body=GOOD_POLICY, drip=1.0), 1.0),
        (Reply(body=b"", content_length=len(GOOD_POLICY), hang=True), 0.5),
        (Reply(body=GOOD_POLICY[:10], content_length=len(GOOD_POLICY), hang=True), 0.5),
        (Reply(body=b"", framing="chunked", hang=True), 0.5),
    ],
    ids=["drip-one-byte-a-second", "hang-after-headers", "hang-mid-body", "hang-chunked"],
)
@pytest_twisted.ensureDeferred
async def test_slow_server_meets_deadline(server, make_fetcher, reply, timeout):
    """A server that sends its body slowly or not at all is cut off by the one deadline."""
    server.set(HOST, reply)
    e = await fetch_error(make_fetcher(timeout=timeout))
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"deadline of {timeout:g} s passed")


@pytest_twisted.ensureDeferred
async def test_truncated_body(server, make_fetcher):
    """A body cut short of its Content-Length is a fetch error."""
    server.set(HOST, Reply(body=GOOD_POLICY[:10], content_length=len(GOOD_POLICY)))
    e = await fetch_error(make_fetcher())
    detail = "connection lost before the end of the response"
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, detail)


@pytest_twisted.ensureDeferred
async def test_server_closes_without_response(reactor, ca_file):
    """A policy host that completes TLS and then closes without answering is a fetch error."""

    class Hangup(Protocol):
        def dataReceived(self, data: bytes) -> None:
            transport: Any = self.transport
            transport.loseConnection()

    options = server_options(*CA.issue([HOST]))
    port = reactor.listenSSL(0, Factory.forProtocol(Hangup), options, interface="127.0.0.1")
    try:
        fetcher = PolicyFetcher(
            reactor, FakeResolve("127.0.0.1"), ca_file, port=port.getHost().port
        )
        e = await fetch_error(fetcher)
    finally:
        await port.stopListening()
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, "connection lost before a response")


@pytest_twisted.ensureDeferred
async def test_silent_tls_server_meets_deadline(reactor, ca_file):
    """A server that accepts TCP but never answers the TLS handshake is cut off too."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        resolve = FakeResolve("127.0.0.1")
        fetcher = PolicyFetcher(reactor, resolve, ca_file, timeout=0.5, port=port.getHost().port)
        e = await fetch_error(fetcher)
    finally:
        await port.stopListening()
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, "deadline of 0.5 s passed")


@pytest.mark.parametrize(
    ("reply", "failure_type"),
    [
        (Reply(status=404, body=b"gone", content_length=100, hang=True), STS_FETCH_ERROR),
        (Reply(status=301, headers=(("Location", "https://x.test/"),), hang=True), STS_FETCH_ERROR),
        (Reply(body=GOOD_POLICY, content_type="text/html", hang=True), STS_POLICY_INVALID),
        (Reply(body=b"", content_length=10**9, hang=True), STS_FETCH_ERROR),
        (Reply(body=b"x" * (MAX_BODY + 10), framing="chunked", hang=True), STS_FETCH_ERROR),
        (Reply(body=b"x" * (MAX_BODY + 10), framing="close", hang=True), STS_FETCH_ERROR),
    ],
    ids=["404", "redirect", "content-type", "content-length", "chunked-over-cap", "over-cap"],
)
@pytest_twisted.ensureDeferred
async def test_client_closes_refused_response(reactor, server, make_fetcher, reply, failure_type):
    """After refusing a response the client closes the connection itself, at once."""
    server.set(HOST, reply)
    e = await fetch_error(make_fetcher(timeout=30.0))
    assert e.failure_type == failure_type
    closed = server.wait_closed()
    closed.addTimeout(5, reactor)  # a bound on the wait, not a sleep: fails if never closed
    await closed
    assert server.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_connection_closed_at_deadline(reactor, server, make_fetcher):
    """At the deadline the client drops the connection, so a dripping server stops."""
    server.set(HOST, Reply(body=b"x" * 10000, drip=1.0))
    await fetch_error(make_fetcher(timeout=0.5))
    closed = server.wait_closed()
    closed.addTimeout(5, reactor)  # a bound on the wait, not a sleep: fails if never closed
    await closed
    assert server.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_connection_refused(reactor, ca_file):
    """Nothing listening on the port is a fetch error."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    fetcher = PolicyFetcher(reactor, FakeResolve("127.0.0.1"), ca_file, port=number)
    e = await fetch_error(fetcher)
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, f"connection refused on port {number}")


@pytest_twisted.ensureDeferred
async def test_next_address_after_refusal(make_fetcher):
    """When the first address refuses the connection, the next one is tried."""
    resolve = FakeResolve("127.0.0.2", "127.0.0.1")
    fetcher = make_fetcher(resolve=resolve)
    assert await fetcher.fetch(DOMAIN) == GOOD_POLICY


class FailingResolve(FakeResolve):
    """A resolve() that raises, remembering what it was asked."""

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        raise RuntimeError("no answer")


@pytest.mark.parametrize(
    ("first", "fallback_asked"),
    [
        (FakeResolve("127.0.0.1"), False),
        (FakeResolve(), True),
        (FakeResolve("127.0.0.2"), True),
        (FailingResolve(), True),
    ],
    ids=["first-connects", "first-empty", "first-refused", "first-fails"],
)
@pytest_twisted.ensureDeferred
async def test_fallback_resolve_only_when_needed(make_fetcher, first, fallback_asked):
    """The fallback is asked for addresses only when none of the first resolver's connects."""
    fallback = FakeResolve("127.0.0.1")
    fetcher = make_fetcher(resolve=first, fallback=fallback)
    assert await fetcher.fetch(DOMAIN) == GOOD_POLICY
    assert first.asked == [HOST]
    assert fallback.asked == ([HOST] if fallback_asked else [])


@pytest.mark.parametrize(
    ("first", "fallback", "detail"),
    [
        (FakeResolve(), FakeResolve(), f"policy host not resolved: no address for {HOST}"),
        (FailingResolve(), FakeResolve(), f"policy host not resolved: {HOST}: no answer"),
        (FakeResolve(), FailingResolve(), f"policy host not resolved: {HOST}: no answer"),
        (FakeResolve("127.0.0.2"), FailingResolve(), "connection refused on port"),
    ],
    ids=["both-empty", "first-fails", "fallback-fails", "refused-then-fallback-fails"],
)
@pytest_twisted.ensureDeferred
async def test_fallback_resolve_failures(make_fetcher, first, fallback, detail):
    """With a fallback, the error names the refusal if there was one, else the lookup problem."""
    e = await fetch_error(make_fetcher(resolve=first, fallback=fallback))
    assert e.failure_type == STS_FETCH_ERROR
    assert e.detail.startswith(detail)


@pytest.mark.parametrize("addresses", [[], ["not-an-address"]])
@pytest_twisted.ensureDeferred
async def test_policy_host_without_address(make_fetcher, addresses):
    """A policy host that resolves to no usable address is a fetch error."""
    fetcher = make_fetcher(resolve=FakeResolve(*addresses))
    e = await fetch_error(fetcher)
    assert e.failure_type == STS_FETCH_ERROR
    assert e.detail.startswith("policy host not resolved")


@pytest_twisted.ensureDeferred
async def test_resolver_failure_is_fetch_error(make_fetcher):
    """Whatever the resolver raises comes out as a fetch error."""

    async def resolve(host: str) -> list[str]:
        raise RuntimeError("resolver exploded")

    e = await fetch_error(make_fetcher(resolve=resolve))
    assert e.failure_type == STS_FETCH_ERROR
    assert e.detail == f"policy host not resolved: {HOST}: resolver exploded"


@pytest.mark.parametrize(
    "domain", ["", "exa mple.test", "example.test/x", "example.test:8443", "-x.test", "ëx.test"]
)
@pytest_twisted.ensureDeferred
async def test_invalid_domain_not_fetched(server, make_fetcher, domain):
    """A domain that is no A-label host name is refused without any lookup."""
    resolve = FakeResolve("127.0.0.1")
    fetcher = make_fetcher(resolve=resolve)
    e = await fetch_error(fetcher, domain)
    assert e.failure_type == STS_FETCH_ERROR
    assert resolve.asked == []
    assert server.requests == []


@pytest_twisted.ensureDeferred
async def test_tls_1_1_server_refused(reactor, ca_file):
    """A policy host that only speaks TLS 1.1 is a fetch error, not a certificate problem."""
    if not tls11_available():
        pytest.skip("this OpenSSL build cannot negotiate TLS 1.1 at all")
    srv = PolicyServer(reactor, TLS11OnlyContextFactory(*CA.issue([HOST])), {HOST: policy()})
    await srv.start()
    try:
        fetcher = PolicyFetcher(reactor, FakeResolve("127.0.0.1"), ca_file, port=srv.port)
        e = await fetch_error(fetcher)
    finally:
        await srv.stop()
    assert e.failure_type == STS_FETCH_ERROR
    assert e.detail.startswith("TLS error")
    assert srv.requests == []


@implementer(IOpenSSLContextFactory)
class GroupsContextFactory:
    """A server context for HOST that accepts only the key exchange ``groups``."""

    def __init__(self, groups: bytes) -> None:
        self._context = server_options(*CA.issue([HOST])).getContext()
        assert openssl.SSL_CTX_set1_curves_list(self._context._context, groups) == 1

    def getContext(self) -> SSL.Context:
        """The restricted context."""
        return self._context


@pytest.mark.parametrize(
    ("groups", "fetched"),
    [
        (b"X25519", True),
        (b"P-256", True),
        (b"P-384", True),
        (b"X25519MLKEM768", False),
        (b"X448", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_classical_key_exchange_groups_only(reactor, ca_file, groups, fetched):
    """Policy hosts are offered X25519, P-256 and P-384, and no post-quantum hybrid."""
    srv = PolicyServer(reactor, GroupsContextFactory(groups), {HOST: policy()})
    await srv.start()
    try:
        fetcher = PolicyFetcher(reactor, FakeResolve("127.0.0.1"), ca_file, port=srv.port)
        if fetched:
            assert await fetcher.fetch(DOMAIN) == GOOD_POLICY
        else:
            e = await fetch_error(fetcher)  # the server alerts: no group in common
            assert (e.failure_type, e.detail) == (
                STS_FETCH_ERROR,
                "TLS error: tls alert handshake failure",
            )
    finally:
        await srv.stop()


def test_deadline_covers_resolving():
    """The deadline also bounds a resolver that never answers, and cancels its lookup."""
    clock = memory_reactor()
    pending: Deferred[list[str]] = Deferred()
    fetcher = PolicyFetcher(clock, lambda host: pending, timeout=10.0)
    result = Deferred.fromCoroutine(fetcher.fetch(DOMAIN))
    clock.advance(9.9)
    assert not result.called
    clock.advance(0.1)
    assert failed(result).detail == "deadline of 10 s passed"
    assert pending.called  # cancelled


def test_deadline_covers_connecting():
    """The deadline stops a TCP connection attempt that never completes."""
    clock = memory_reactor()
    fetcher = PolicyFetcher(clock, FakeResolve("192.0.2.1"), timeout=5.0)
    result = Deferred.fromCoroutine(fetcher.fetch(DOMAIN))
    [(host, port, *_)] = clock.tcpClients
    assert (host, port) == ("192.0.2.1", 443)
    clock.advance(5)
    e = failed(result)
    assert (e.failure_type, e.detail) == (STS_FETCH_ERROR, "deadline of 5 s passed")
    assert clock.connectors[0].stoppedConnecting


def test_deadline_timer_cancelled_after_failure():
    """A fetch that ends early leaves no timer behind."""
    clock = memory_reactor()
    fetcher = PolicyFetcher(clock, FakeResolve(), timeout=5.0)
    result = Deferred.fromCoroutine(fetcher.fetch(DOMAIN))
    assert failed(result).failure_type == STS_FETCH_ERROR
    assert clock.getDelayedCalls() == []


def test_fetches_counted():
    """Every fetch attempt is counted, failed or not."""
    fetcher = PolicyFetcher(memory_reactor(), FakeResolve(), timeout=5.0)
    for domain in ("a.test", "b.test", "not a domain"):
        failed(Deferred.fromCoroutine(fetcher.fetch(domain)))
    assert fetcher.fetches == 3


def test_ca_file_must_hold_certificates(tmp_path):
    """A ca_file without certificates is refused when the fetcher is built."""
    bad = tmp_path / "empty.pem"
    bad.write_text("nothing here\n")
    with pytest.raises(ValueError):
        PolicyFetcher(memory_reactor(), FakeResolve(), ca_file=str(bad))
