"""Fetching a domain's policy over HTTPS (RFC 8461 §3.3; reference/mta-sts.md §3).

``GET https://mta-sts.<domain>/.well-known/mta-sts.txt`` with a bare Twisted ``Agent``, which
never follows redirects and keeps no cookies. The connection goes through our own endpoint
factory: the policy host is resolved with the project's DNS client (no resolver threads), the
first reachable address is connected over TCP, and TLS ≥ 1.2 is negotiated with SNI, a
WebPKI chain check and a DNS-ID check for ``mta-sts.<domain>`` (OpenSSL's, or
``service_identity``'s where OpenSSL's cannot be reached), offering classical key exchange
groups only (see :data:`KEY_EXCHANGE_GROUPS`).

Only a 200 response whose media type is ``text/plain`` yields a body; the body is capped at
``max_body`` bytes while it streams, and one deadline covers the whole fetch. Every failure is
a :class:`FetchError` carrying the RFC 8460 result type the reporter records. The body's
syntax and encoding are checked by :mod:`postfix_mtasts.mtasts.policy`, not here.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from postfix_mtasts import __version__

try:  # pyOpenSSL's binding of the OpenSSL library it runs on; see _restrict_groups
    from OpenSSL._util import lib as _openssl
except ImportError:  # pragma: no cover - a pyOpenSSL without it: the slower, public way
    _openssl = None

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "MAX_BODY",
    "STS_FETCH_ERROR",
    "STS_POLICY_INVALID",
    "STS_WEBPKI_INVALID",
    "USER_AGENT",
    "FetchError",
    "PolicyFetcher",
]

STS_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

MAX_BODY = 65536
"""The largest policy body accepted, in bytes (RFC 8461 §3.3 suggests 64 KiB)."""

USER_AGENT = f"postfix-mtasts/{__version__}"
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"

_log = Logger()

_LDH_NAME = re.compile(
    r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*", re.ASCII | re.IGNORECASE
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# The X509_V_ERR_* codes a policy host's certificate most often meets (they are stable
# across OpenSSL versions); others are reported by number.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    68: "CA signature digest algorithm too weak",
}


class FetchError(Exception):
    """A policy fetch failed; ``failure_type`` is the RFC 8460 result type to record."""

    def __init__(self, failure_type: str, detail: str) -> None:
        super().__init__(failure_type, detail)
        self.failure_type = failure_type
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.failure_type}: {self.detail}"


KEY_EXCHANGE_GROUPS = b"X25519:P-256:P-384"
"""The key exchange groups offered to policy hosts (X25519's key share sent first).

Classical groups only. A policy is public: TLS protects its authenticity (the certificate
and the handshake's signature), which a post-quantum key exchange does not add to; it would
only keep the policy secret from a future quantum computer. OpenSSL's default offers the
hybrid X25519MLKEM768 first, whose key share costs the client about 0.3 ms more CPU per
handshake than X25519 alone (a third of its handshake, on the bench's machine).
"""


class _Unresolved(Exception):
    """The policy host has no usable address (or resolving it failed)."""


def _load_trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """The certificates of the PEM bundle ``ca_file`` as a trust root."""
    with open(ca_file, "rb") as f:
        pems = f.read()
    certificates = [
        Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
        for c in x509.load_pem_x509_certificates(pems)
    ]
    root: IOpenSSLTrustRoot = trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    return root


@implementer(IOpenSSLClientConnectionCreator)
class _CheckingCreator:
    """TLS client connections for one policy host that remember why verification failed.

    This is what ``optionsForClientTLS(host, trustRoot, extraCertificateOptions={"raiseMinimumTo":
    TLSv1_2})`` builds, except that the ``CertificateOptions`` (the OpenSSL context with its
    trust store, costly to load) is shared by all fetches, and that the verification callback
    also records the first problem: OpenSSL's chain result, then ``service_identity``'s
    DNS-ID check of the leaf, so a failure is reported as ``sts-webpki-invalid`` with a
    useful detail. SNI carries the host name.
    """

    def __init__(self, host: str, options: CertificateOptions) -> None:
        self._host = host
        self._options: Any = options
        self.problem: str | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A client connection for the policy host, verifying as described above."""
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_tlsext_host_name(self._host.encode("ascii"))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, connection: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
        # Called by OpenSSL for each certificate, root first; nothing may raise out of here.
        if self.problem is not None:
            return False
        try:
            if not ok:
                reason = _X509_ERRORS.get(err, f"X509 error {err}")
                self.problem = f"certificate verify failed: {reason} (depth {depth})"
                return False
            if depth == 0:
                verify_certificate_hostname(cert.to_cryptography(), self._host)
        except (VerificationError, CertificateError):
            self.problem = f"certificate not valid for {self._host}"
            return False
        except Exception:  # noqa: BLE001 - an OpenSSL callback must not raise
            _log.failure("checking the certificate of {host}", host=self._host)
            self.problem = "certificate check failed"
            return False
        return True


class _PolicyHostCreator(_CheckingCreator):
    """:class:`_CheckingCreator` with the DNS-ID check done by OpenSSL, in C.

    OpenSSL checks the leaf's DNS-IDs for the host while it verifies the chain
    (``X509_check_host`` with whole-label wildcards only and no Common Name fallback), so
    the verification callback has nothing to do but record the first problem. For a name
    whose first label is not an A-label, which ``mta-sts.<domain>`` never is, it decides
    as ``service_identity`` does; it costs a fraction of building a ``cryptography``
    certificate and running ``service_identity`` in Python for each handshake.
    Without the OpenSSL functions this needs, it is :class:`_CheckingCreator`.
    """

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A client connection for the policy host, verifying as described above."""
        if not _HOST_CHECK:
            return super().clientConnectionForTLS(tlsProtocol)
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        name = self._host.encode("ascii")
        connection.set_tlsext_host_name(name)
        params = _openssl.SSL_get0_param(connection._ssl)
        _openssl.X509_VERIFY_PARAM_set_hostflags(params, _HOST_FLAGS)
        if not _openssl.X509_VERIFY_PARAM_set1_host(params, name, len(name)):
            raise SSL.Error(f"cannot set the host name {self._host} to check")
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._record)
        return connection

    def _record(self, connection: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
        # Called by OpenSSL for each certificate, root first, and for each problem found.
        if ok and self.problem is None:
            return True
        if self.problem is None:
            if err == _HOSTNAME_MISMATCH:
                self.problem = f"certificate not valid for {self._host}"
            else:
                reason = _X509_ERRORS.get(err, f"X509 error {err}")
                self.problem = f"certificate verify failed: {reason} (depth {depth})"
        return False


_HOST_CHECK = _openssl is not None and all(
    hasattr(_openssl, name)
    for name in (
        "SSL_get0_param",
        "X509_VERIFY_PARAM_set_hostflags",
        "X509_VERIFY_PARAM_set1_host",
        "X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS",
        "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT",
    )
)
_HOST_FLAGS = (
    _openssl.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | _openssl.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
    if _HOST_CHECK
    else 0
)
_HOSTNAME_MISMATCH = 62
"""X509_V_ERR_HOSTNAME_MISMATCH."""


def _restrict_groups(context: SSL.Context, groups: bytes = KEY_EXCHANGE_GROUPS) -> bool:
    """Offer only ``groups`` for the key exchange in ``context``; False if it cannot be done.

    pyOpenSSL has no call for it (``set_tmp_ecdh`` takes a single curve), so this uses the
    OpenSSL function through pyOpenSSL's own binding.
    """
    if _openssl is None or not hasattr(_openssl, "SSL_CTX_set1_curves_list"):
        return False
    if _openssl.SSL_CTX_set1_curves_list(context._context, groups) != 1:
        _openssl.ERR_clear_error()
        return False
    return True


Resolve = Callable[[str], Awaitable[list[str]]]
"""Looks up a host name's IP addresses; may return an empty list."""


@implementer(IStreamClientEndpoint)
class _PolicyHostEndpoint:
    """Resolve the host with the injected resolver, connect TCP to an address, then TLS.

    ``fallback``, if given, is asked for more addresses only when none of ``resolve``'s
    accepted a connection (``resolve`` giving IPv4 addresses and ``fallback`` IPv6 ones,
    a host reachable over IPv4 costs one DNS query instead of two).
    """

    def __init__(  # noqa: PLR0917 - tlsrpt.deliver calls it positionally
        self,
        reactor: Any,
        resolve: Resolve,
        host: str,
        port: int,
        creator: _CheckingCreator,
        fallback: Resolve | None = None,
    ) -> None:
        self._reactor = reactor
        self._resolvers = [resolve] if fallback is None else [resolve, fallback]
        self._host = host
        self._port = port
        self._creator: Any = creator

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect ``protocolFactory`` to the first address that accepts a connection."""
        # The Agent's factory is a fresh one per connection, and "noisy": it would log its
        # start and stop each time (at info level under "twisted", which the map filters out).
        if getattr(protocolFactory, "noisy", False):
            protocolFactory.noisy = False  # type: ignore[attr-defined]
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        unresolved = f"no address for {self._host}"
        failure: Exception | None = None
        for resolve in self._resolvers:
            try:
                found = await resolve(self._host)
            except CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the reason is kept for the report
                unresolved = f"{self._host}: {e}"
                continue
            for address in found:
                if not (isIPAddress(address) or isIPv6Address(address)):
                    continue
                tcp_class = TCP6ClientEndpoint if isIPv6Address(address) else TCP4ClientEndpoint
                tcp: Any = tcp_class(self._reactor, address, self._port)
                try:
                    protocol: IProtocol = await wrapClientTLS(self._creator, tcp).connect(factory)
                except error.ConnectError as e:
                    failure = e
                    continue
                return protocol
        if failure is not None:
            raise failure
        raise _Unresolved(unresolved)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """The ``Agent``'s way to the policy host: always :class:`_PolicyHostEndpoint`."""

    def __init__(self, endpoint: _PolicyHostEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: URI) -> _PolicyHostEndpoint:
        """The one endpoint of this fetch, whatever the URI (which names the policy host)."""
        return self._endpoint


def _drop(transport: Any) -> None:
    """Close a response's connection at the TCP level, not waiting for the peer's TLS close.

    A body's transport is Twisted's ``TransportProxyProducer`` (a push producer): stopping it
    stops the TCP transport, which closes at once (it has nothing left to write).
    """
    if transport is not None:
        transport.stopProducing()


class _BodyCollector(Protocol):
    """Collect a response body, dropping the connection once it grows past ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._close()

    def _close(self) -> None:
        _drop(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._close()
            self.done.errback(FetchError(STS_FETCH_ERROR, f"body over {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # PotentialDataLoss: a body without length or chunks, ended by the close (HTTP/1.0).
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


class _Discard(Protocol):
    """Take a response body nobody will read and close its connection at once."""

    def connectionMade(self) -> None:
        _drop(self.transport)


def _media_type(values: list[bytes] | None) -> bytes | None:
    """The lower-cased ``type/subtype`` of Content-Type values; None if missing or unparseable."""
    if not values or len(set(values)) != 1:
        return None
    type_, slash, subtype = values[0].split(b";", 1)[0].strip(b" \t").partition(b"/")
    if not slash or not _TOKEN.fullmatch(type_) or not _TOKEN.fullmatch(subtype):
        return None
    return (type_ + b"/" + subtype).lower()


parse_media_type = _media_type  # public: postfix_mtasts.check judges Content-Type the same way


def _shown(value: bytes, limit: int = 60) -> str:
    """``value`` made safe for a log line or a report: ASCII, escaped, shortened."""
    return value[:limit].decode("ascii", "backslashreplace").encode("unicode_escape").decode()


def _causes(exception: BaseException) -> list[BaseException]:
    """The exceptions inside Twisted's wrappers (``ResponseNeverReceived`` and kin)."""
    found: list[BaseException] = [exception]
    for inner in getattr(exception, "reasons", None) or ():
        if isinstance(inner, Failure) and inner.value is not None:
            found.extend(_causes(inner.value))
    return found


def _classify(exception: Exception, creator: _CheckingCreator, port: int) -> FetchError:
    """Turn whatever a fetch raised into a :class:`FetchError`."""
    if isinstance(exception, FetchError):
        return exception
    if creator.problem is not None:
        return FetchError(STS_WEBPKI_INVALID, creator.problem)
    for inner in _causes(exception):
        if isinstance(inner, (VerificationError, CertificateError)):
            return FetchError(STS_WEBPKI_INVALID, "certificate not valid for the policy host")
        if isinstance(inner, SSL.Error):
            text = str(inner)
            if "certificate verify failed" in text:
                return FetchError(STS_WEBPKI_INVALID, "certificate verify failed")
            return FetchError(STS_FETCH_ERROR, f"TLS error: {_reasons(inner)}")
    for inner in _causes(exception):
        if isinstance(inner, _Unresolved):
            return FetchError(STS_FETCH_ERROR, f"policy host not resolved: {inner}")
        if isinstance(inner, error.ConnectionRefusedError):
            return FetchError(STS_FETCH_ERROR, f"connection refused on port {port}")
        if isinstance(inner, error.ConnectError):
            return FetchError(STS_FETCH_ERROR, f"cannot connect: {inner}")
        if isinstance(inner, CancelledError):
            return FetchError(STS_FETCH_ERROR, "fetch cancelled")
    if isinstance(exception, ResponseNeverReceived):  # a subclass of ResponseFailed
        return FetchError(STS_FETCH_ERROR, "connection lost before a response")
    if isinstance(exception, ResponseFailed):
        return FetchError(STS_FETCH_ERROR, "connection lost before the end of the response")
    causes = _causes(exception)
    if len(causes) > 1:  # another Twisted wrapper: name what it wraps
        wrapped = ", ".join(type(c).__name__ for c in causes[1:])
        return FetchError(STS_FETCH_ERROR, f"{type(exception).__name__} ({wrapped})")
    return FetchError(STS_FETCH_ERROR, f"{type(exception).__name__}: {exception}"[:200])


def _reasons(e: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, e.g. ``unsupported protocol``."""
    reasons = [
        str(entry[2])
        for entry in (e.args[0] if e.args and isinstance(e.args[0], list) else [])
        if isinstance(entry, tuple) and len(entry) == 3
    ]
    return ", ".join(reasons) or str(e)


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` as RFC 8461 §3.3 says.

    ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``; ``resolve(hostname)`` returns
    the host's IP addresses (the project's DNS client; it may return an empty list), and
    ``fallback(hostname)``, if given, more addresses to try when none of those connects
    (the map passes its DNS client's ``ipv4`` and ``ipv6``: AAAA is asked only when needed).
    ``ca_file`` is a PEM bundle of trusted roots, empty for the system's trust store; it is
    read here, so a bad file raises ``OSError`` or ``ValueError`` at construction.
    ``timeout`` bounds the whole fetch, ``port`` is where the policy host is reached (443
    except in tests), and ``max_body`` caps the body in bytes. ``fetches`` counts attempts.
    """

    def __init__(  # noqa: PLR0917 - the documented positional API
        self,
        reactor: Any,
        resolve: Resolve,
        ca_file: str = "",
        timeout: float = 10.0,
        port: int = 443,
        max_body: int = MAX_BODY,
        *,
        fallback: Resolve | None = None,
    ) -> None:
        self._reactor = reactor
        self._resolve = resolve
        self._fallback = fallback
        trust_root: IOpenSSLTrustRoot = (
            _load_trust_root(ca_file) if ca_file else platformTrust()  # type: ignore[no-untyped-call]
        )
        # One OpenSSL context for all fetches: loading a trust store takes milliseconds.
        self._tls = CertificateOptions(trustRoot=trust_root, raiseMinimumTo=TLSVersion.TLSv1_2)
        if not _restrict_groups(self._tls.getContext()):
            _log.warn("cannot restrict TLS key exchange groups; using OpenSSL's defaults")
        self._timeout = timeout
        self._port = port
        self._max_body = max_body
        self.fetches = 0

    async def fetch(self, domain: str) -> bytes:
        """GET https://mta-sts.<domain>/.well-known/mta-sts.txt -> body bytes; raises FetchError.

        ``domain`` is the policy domain in A-labels. The body is returned undecoded.
        """
        self.fetches += 1
        if not _LDH_NAME.fullmatch(domain) or len(domain) > 245:
            raise FetchError(STS_FETCH_ERROR, f"invalid policy domain {_shown(domain.encode())}")
        host = "mta-sts." + domain.lower()
        creator = _PolicyHostCreator(host, self._tls)
        fetching = Deferred.fromCoroutine(self._fetch(host, creator))
        expired = False

        def deadline() -> None:
            nonlocal expired
            expired = True
            fetching.cancel()

        timer = self._reactor.callLater(self._timeout, deadline)
        try:
            return await fetching
        except Exception as e:
            if expired:
                raise FetchError(STS_FETCH_ERROR, f"deadline of {self._timeout:g} s passed") from e
            raise _classify(e, creator, self._port) from e
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch(self, host: str, creator: _CheckingCreator) -> bytes:
        endpoint = _PolicyHostEndpoint(
            self._reactor, self._resolve, host, self._port, creator, self._fallback
        )
        # No pool given: a fresh non-persistent one. A bare Agent follows no redirects.
        agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            self._reactor, _EndpointFactory(endpoint)
        )
        url = f"https://{host}{WELL_KNOWN_PATH}".encode("ascii")
        headers = Headers({b"User-Agent": [USER_AGENT.encode("ascii")], b"Host": [host.encode()]})
        response: Any = await agent.request(b"GET", url, headers)
        if response.code != 200:
            response.deliverBody(_Discard())
            if response.code in _REDIRECTS:
                raise FetchError(STS_FETCH_ERROR, f"redirect ({response.code}) not followed")
            raise FetchError(STS_FETCH_ERROR, f"HTTP {response.code}")
        content_types = response.headers.getRawHeaders(b"content-type")
        media_type = _media_type(content_types)
        if media_type != b"text/plain":
            response.deliverBody(_Discard())
            shown = "missing" if not content_types else repr(_shown(b", ".join(content_types)))
            raise FetchError(STS_POLICY_INVALID, f"content type {shown}")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_body:
            response.deliverBody(_Discard())
            raise FetchError(STS_FETCH_ERROR, f"body over {self._max_body} bytes")
        collector = _BodyCollector(self._max_body)
        response.deliverBody(collector)
        return await collector.done
