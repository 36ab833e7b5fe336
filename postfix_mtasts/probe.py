"""Network probes for ``postfix-mtasts check``: what a server shows of its TLS setup.

Two short sessions, each over one TCP connection to one address with one deadline:

- :meth:`Prober.smtp`: read the greeting, ``EHLO``, ``STARTTLS`` if offered, the TLS
  handshake, ``QUIT`` (RFC 3207). No mail is sent.
- :meth:`Prober.https`: a TLS handshake, then ``GET`` of the policy path, reading only the
  status line and the headers (the body is :class:`~postfix_mtasts.mtasts.fetch.PolicyFetcher`'s
  business).

The handshake accepts any TLS version from 1.0 up and verifies nothing, so that a server with
an old protocol or a bad certificate still shows what it has; the chain it sent is checked
afterwards against the trust store (``ca_file`` or the system's), validity dates aside: those
are judged against the caller's clock by :mod:`postfix_mtasts.check`. SNI carries the host
name, as a sending MTA (``servername=hostname``) and a policy fetcher send it.

Results are plain dataclasses describing what was seen; judging them is not done here.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts import __version__

__all__ = [
    "OLD_TLS_VERSIONS",
    "HTTPSProbe",
    "Prober",
    "SMTPProbe",
    "TLSFacts",
    "TrustStore",
]

_log = Logger()

OLD_TLS_VERSIONS = frozenset({"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"})
"""Protocol names (as OpenSSL gives them) below TLS 1.2, which RFC 8461 §7.2 forbids."""

_NO_CHECK_TIME = 0x200000
"""X509_V_FLAG_NO_CHECK_TIME: verify the chain, not the dates (pyOpenSSL has no name for it)."""

_STATUS_LINE = re.compile(r"HTTP/[^ ]* ([0-9]{3})(?: .*)?", re.DOTALL)
"""A status line; its code is three ASCII digits (RFC 9110 §15)."""
_MAX_LINE = 4096
_MAX_REPLY_LINES = 100
_SHOW = 200


def _seconds(value: float) -> str:
    """A duration for messages: to a tenth of a second, without trailing zeros."""
    return f"{round(value, 1):g}"


def _shown(text: bytes) -> str:
    """Received bytes as a printable, bounded string for messages."""
    return text[:_SHOW].decode("ascii", "backslashreplace").encode("unicode_escape").decode()


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What one TLS handshake showed."""

    version: str
    """The protocol, as OpenSSL names it: ``TLSv1.3``, ``TLSv1.2``, ``TLSv1.1``..."""
    cipher: str
    chain: tuple[x509.Certificate, ...]
    """The certificates the server sent, its own first."""
    trust_error: str
    """Why the chain does not lead to a trusted root (dates not considered); ``""`` if it does."""
    verified: tuple[x509.Certificate, ...]
    """The verified chain from the server's certificate to the trusted root; ``()`` if none."""


@dataclass(slots=True)
class SMTPProbe:
    """One SMTP session with one address of an MX host, as far as it went."""

    address: str
    connected: bool = False
    """Whether the TCP connection was made."""
    error: str = ""
    """What ended the session before TLS was up, in words (``""``: nothing did)."""
    banner: str = ""
    """The first line of the greeting."""
    starttls_offered: bool = False
    starttls_refused: str = ""
    """The reply to ``STARTTLS`` when it was not 220."""
    tls: TLSFacts | None = None
    tls_error: str = ""
    """Why the TLS handshake failed after ``STARTTLS`` was accepted."""


@dataclass(slots=True)
class HTTPSProbe:
    """One HTTPS request to one address of a policy host, as far as it went."""

    address: str
    connected: bool = False
    error: str = ""
    """What ended the exchange before a response head arrived (``""``: nothing did)."""
    tls: TLSFacts | None = None
    tls_error: str = ""
    status: int = 0
    """The response status; 0 if no status line arrived."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    """Response headers, names lower-cased, in order."""

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``."""
        return [v for n, v in self.headers if n == name.lower()]


class TrustStore:
    """Trusted roots: the PEM bundle ``ca_file``, or the system's store when it is empty.

    A missing or unreadable ``ca_file`` raises ``OSError``; one without certificates
    ``ValueError``.
    """

    def __init__(self, ca_file: str = "") -> None:
        self._store = crypto.X509Store()
        if ca_file:
            pems = Path(ca_file).read_bytes()
            certificates = x509.load_pem_x509_certificates(pems)  # ValueError if none
            for certificate in certificates:
                self._store.add_cert(crypto.X509.from_cryptography(certificate))
        else:
            paths = ssl.get_default_verify_paths()
            cafile = paths.cafile if paths.cafile and Path(paths.cafile).is_file() else None
            capath = paths.capath if paths.capath and Path(paths.capath).is_dir() else None
            if cafile or capath:
                store: Any = self._store  # the stubs do not allow a None cafile
                store.load_locations(cafile, capath)
        self._store.set_flags(_NO_CHECK_TIME)

    def verify(self, chain: Sequence[x509.Certificate]) -> tuple[str, tuple[x509.Certificate, ...]]:
        """``("", verified chain)`` if ``chain`` (server's own first) leads to a trusted root,
        else ``(reason, ())``. Validity dates are not checked."""
        if not chain:
            return "no certificate", ()
        leaf, *rest = (crypto.X509.from_cryptography(c) for c in chain)
        context = crypto.X509StoreContext(self._store, leaf, rest)
        try:
            verified = context.get_verified_chain()
        except crypto.X509StoreContextError as e:
            return _explain(e), ()
        return "", tuple(c.to_cryptography() for c in verified)


_CHAIN_HINTS = {
    2: "the issuer is neither sent by the server nor trusted",
    18: "a self-signed certificate",
    19: "the chain ends in a root that is not trusted",
    20: "an intermediate certificate is missing or the root is not trusted",
    21: "the server sent only its own certificate, without the intermediate",
}


def _explain(e: crypto.X509StoreContextError) -> str:
    """OpenSSL's verification error as one line, with a hint for the common ones."""
    code, depth, text = e.errors[:3] if len(e.errors) >= 3 else (0, 0, str(e))
    hint = _CHAIN_HINTS.get(int(code))
    return f"{text} (depth {depth})" + (f": {hint}" if hint else "")


def _client_context() -> SSL.Context:
    """A client context that completes a handshake with TLS 1.0 and up, verifying nothing."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    # OpenSSL refuses TLS < 1.2 above security level 0; the probe wants to see what the
    # server offers, and flags old protocols itself.
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.set_verify(SSL.VERIFY_NONE)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    """TLS client connections for one host name: the shared context, SNI set."""

    def __init__(self, context: SSL.Context, host: str) -> None:
        self._context = context
        self._host = host

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection sending the host name as SNI."""
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self._host.encode("ascii"))
        return connection


def _ssl_reasons(value: BaseException) -> str:
    """The reasons in an OpenSSL error, e.g. ``unsupported protocol``; else the text."""
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        reasons = [str(e[2]) for e in value.args[0] if isinstance(e, tuple) and len(e) == 3]
        if reasons:
            return ", ".join(reasons)
    return str(value) or type(value).__name__


@implementer(IHandshakeListener)
class _Session(LineReceiver):
    """A line-based exchange that starts TLS at some point and ends on its own.

    ``finished`` fires (with None) once the connection is closed, whatever happened.
    """

    delimiter = b"\n"
    MAX_LENGTH = _MAX_LINE

    def __init__(self, host: str, creator: _Creator, trust: TrustStore) -> None:
        self.host = host
        self._creator = creator
        self._trust = trust
        self.finished: Deferred[None] = Deferred()
        self.expired_after: float | None = None
        self.tls: TLSFacts | None = None
        self.tls_started = False

    def start_tls(self) -> None:
        """Switch to TLS; anything still buffered in plain text is dropped (RFC 3207 §4.2)."""
        self.clearLineBuffer()  # type: ignore[no-untyped-call]
        self.tls_started = True
        transport: Any = self.transport
        transport.startTLS(self._creator)

    def handshakeCompleted(self) -> None:
        """Record what the handshake showed, then go on with :meth:`secured`."""
        transport: Any = self.transport
        connection: Any = transport.getHandle()  # an SSL.Connection; its stubs are older
        chain: list[x509.Certificate] = connection.get_peer_cert_chain(as_cryptography=True) or []
        trust_error, verified = self._trust.verify(chain)
        self.tls = TLSFacts(
            version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name() or "",
            chain=tuple(chain),
            trust_error=trust_error,
            verified=verified,
        )
        self.secured()

    def secured(self) -> None:
        """Called once TLS is up."""

    def expire(self, seconds: float) -> None:
        """The deadline passed: note it and drop the connection."""
        self.expired_after = seconds
        if self.transport is not None:
            transport: Any = self.transport
            transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over the limit: give up on this server."""
        self.fail(f"line over {self.MAX_LENGTH} bytes")

    def fail(self, reason: str) -> None:
        """Record ``reason`` (subclasses say where) and close the connection."""
        if self.transport is not None:
            transport: Any = self.transport
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fire ``finished``."""
        if not self.finished.called:
            self.finished.callback(None)

    def tls_failure(self, reason: Failure) -> str:
        """Why a connection lost during the handshake was lost."""
        value = reason.value
        if self.expired_after is not None:
            return f"no TLS handshake within {_seconds(self.expired_after)} s"
        if value is None or isinstance(value, error.ConnectionDone | error.ConnectionLost):
            return "the server closed the connection during the handshake"
        return _ssl_reasons(value)


class _SMTPSession(_Session):
    """Greeting, EHLO, STARTTLS, TLS, QUIT (see :meth:`Prober.smtp`)."""

    def __init__(
        self, probe: SMTPProbe, host: str, helo: str, creator: _Creator, trust: TrustStore
    ) -> None:
        super().__init__(host, creator, trust)
        self._probe = probe
        self._helo = helo
        self._state = "greeting"
        self._reply: list[str] = []

    def lineReceived(self, line: bytes) -> None:
        """Collect a (possibly multi-line) reply, then act on it."""
        text = _shown(line.removesuffix(b"\r"))
        code = text[:3]
        if len(text) < 3 or not code.isdigit() or text[3:4] not in ("", " ", "-"):
            self.fail(f"malformed reply {text!r} in the {self._state} state")
            return
        self._reply.append(text)
        if text[3:4] == "-":
            if len(self._reply) > _MAX_REPLY_LINES:
                self.fail(f"reply of over {_MAX_REPLY_LINES} lines")
            return
        reply, self._reply = self._reply, []
        self._handle(int(code), reply)

    def _send(self, command: str, state: str) -> None:
        self._state = state
        transport: Any = self.transport
        transport.write(command.encode("ascii") + b"\r\n")

    def _quit(self) -> None:
        self._send("QUIT", "quit")

    def _handle(self, code: int, reply: list[str]) -> None:
        probe = self._probe
        if self._state == "greeting":
            probe.banner = reply[0]
            if code != 220:
                probe.error = f"greeting is not 220: {reply[0]}"
                self._quit()
                return
            self._send(f"EHLO {self._helo}", "ehlo")
        elif self._state in ("ehlo", "ehlo-tls"):
            if code != 250:
                probe.error = f"EHLO refused: {reply[0]}"
                self._quit()
                return
            if self._state == "ehlo-tls":
                self._quit()
                return
            keywords = {line[4:].split(" ", 1)[0].upper() for line in reply[1:]}
            probe.starttls_offered = "STARTTLS" in keywords
            if probe.starttls_offered:
                self._send("STARTTLS", "starttls")
            else:
                self._quit()
        elif self._state == "starttls":
            if code != 220:
                probe.starttls_refused = reply[0]
                self._quit()
                return
            self._state = "tls"
            self.start_tls()
        elif self._state == "quit":
            transport: Any = self.transport
            transport.loseConnection()

    def secured(self) -> None:
        """TLS is up: EHLO again (as a sender would), then QUIT."""
        self._probe.tls = self.tls
        self._send(f"EHLO {self._helo}", "ehlo-tls")

    def fail(self, reason: str) -> None:
        """Note a protocol failure before TLS was up, then drop the connection."""
        if not self.tls_started and not self._probe.error:
            self._probe.error = reason
        super().fail(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Say how the session ended if it ended early."""
        probe = self._probe
        if self._state == "tls" and probe.tls is None:
            probe.tls_error = self.tls_failure(reason)
        elif self._state not in ("quit", "ehlo-tls") and not probe.error and probe.tls is None:
            if self.expired_after is not None:
                probe.error = (
                    f"no reply within {_seconds(self.expired_after)} s (waiting for {self._state})"
                )
            else:
                probe.error = f"connection closed while waiting for the {self._state} reply"
        super().connectionLost(reason)


class _HTTPSSession(_Session):
    """TLS, then ``GET path``, reading the status line and headers (see :meth:`Prober.https`)."""

    def __init__(
        self, probe: HTTPSProbe, host: str, path: str, creator: _Creator, trust: TrustStore
    ) -> None:
        super().__init__(host, creator, trust)
        self._probe = probe
        self._path = path
        self._head_done = False

    def connectionMade(self) -> None:
        """TLS from the first byte."""
        self.start_tls()

    def secured(self) -> None:
        """Send the request as a policy fetcher would."""
        self._probe.tls = self.tls
        request = (
            f"GET {self._path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"User-Agent: postfix-mtasts/{__version__} (check)\r\nConnection: close\r\n\r\n"
        )
        transport: Any = self.transport
        transport.write(request.encode("ascii"))

    def lineReceived(self, line: bytes) -> None:
        """The status line, then headers up to the empty line; then hang up."""
        if self._head_done:
            return
        text = line.removesuffix(b"\r").decode("latin-1")
        probe = self._probe
        if not probe.status:
            status = _STATUS_LINE.fullmatch(text)
            if status is None:
                self.fail(f"not an HTTP response: {_shown(line)!r}")
                return
            probe.status = int(status[1])
        elif text:
            name, _, value = text.partition(":")
            probe.headers.append((name.strip().lower(), value.strip(" \t")))
            if len(probe.headers) > _MAX_REPLY_LINES:
                self.fail("over 100 response headers")
        else:
            self._head_done = True
            transport: Any = self.transport
            transport.abortConnection()

    def fail(self, reason: str) -> None:
        """Note a protocol failure, then drop the connection."""
        if not self._probe.error:
            self._probe.error = reason
        super().fail(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Say how the exchange ended if it ended early."""
        probe = self._probe
        if probe.tls is None:
            probe.tls_error = self.tls_failure(reason)
        elif not self._head_done and not probe.error:
            if self.expired_after is not None:
                probe.error = f"no response within {_seconds(self.expired_after)} s"
            else:
                probe.error = "connection closed before the end of the response head"
        super().connectionLost(reason)


def _default_helo() -> str:
    name = socket.gethostname()
    return name if name and name.isascii() and " " not in name else "localhost"


class Prober:
    """Opens probe sessions on ``reactor``; each has the deadline ``timeout`` (seconds),
    unless the call gives its own.

    ``ca_file``: trusted roots (PEM), empty for the system store; read here, so a bad file
    raises ``OSError`` or ``ValueError``. ``helo``: the name sent in ``EHLO`` (default: this
    machine's host name).
    """

    def __init__(
        self, reactor: Any, ca_file: str = "", timeout: float = 10.0, helo: str | None = None
    ) -> None:
        self._reactor = reactor
        self._trust = TrustStore(ca_file)
        self._context = _client_context()
        self._timeout = timeout
        self._helo = helo or _default_helo()

    async def smtp(
        self, address: str, port: int, host: str, *, timeout: float | None = None
    ) -> SMTPProbe:
        """Talk to the MX ``host`` at ``address``:``port`` up to STARTTLS and TLS, then QUIT."""
        probe = SMTPProbe(address)
        session = _SMTPSession(probe, host, self._helo, _Creator(self._context, host), self._trust)
        probe.connected, connect_error = await self._run(address, port, session, timeout)
        if connect_error:
            probe.error = connect_error
        return probe

    async def https(
        self, address: str, port: int, host: str, path: str, *, timeout: float | None = None
    ) -> HTTPSProbe:
        """``GET https://host{path}`` at ``address``:``port``, reading the response head."""
        probe = HTTPSProbe(address)
        session = _HTTPSSession(probe, host, path, _Creator(self._context, host), self._trust)
        probe.connected, connect_error = await self._run(address, port, session, timeout)
        if connect_error:
            probe.error = connect_error
        return probe

    async def _run(
        self, address: str, port: int, session: _Session, timeout: float | None
    ) -> tuple[bool, str]:
        """Connect ``session`` and wait until it is closed, at most ``timeout`` seconds (None:
        the prober's); ``(connected, error)``."""
        seconds = self._timeout if timeout is None else timeout
        endpoint_class = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: Any = endpoint_class(self._reactor, address, port, timeout=seconds)
        connecting: Deferred[Any] = connectProtocol(endpoint, session)  # type: ignore[no-untyped-call]
        expired = False

        def deadline() -> None:
            nonlocal expired
            expired = True
            if not connecting.called:
                connecting.cancel()
            else:
                session.expire(seconds)

        timer = self._reactor.callLater(seconds, deadline)
        try:
            try:
                await connecting
            except error.ConnectionRefusedError:
                return False, f"connection refused on port {port}"
            except (error.ConnectingCancelledError, error.TimeoutError):
                return False, f"no connection within {_seconds(seconds)} s on port {port}"
            except error.ConnectError as e:
                return False, f"cannot connect to port {port}: {e}"
            await session.finished
            return True, ""
        finally:
            if timer.active():
                timer.cancel()
