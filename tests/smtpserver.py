"""A real ESMTP receiver on loopback for integration tests: STARTTLS with a chosen certificate.

Twisted's ESMTP server, listening on a given address and port, offering STARTTLS or not with
the certificate and protocol versions a test picks, accepting every message and recording
it (and every session) so that a test can check what arrived and how::

    ca = TestCA("Test Root")
    receiver = SMTPReceiver(reactor, hostname="mx1.example.test",
                            tls=receiver_tls(ca, "mx1.example.test"))
    port = await receiver.start("127.0.0.2")        # an ephemeral port
    other = SMTPReceiver(reactor, tls=receiver_tls(ca, "mx2.example.test", kind="expired"))
    await other.start("127.0.0.3", port)             # the same port on another address
    ...
    await receiver.stop(); await other.stop()

or the fixture ``smtp_receiver_factory`` (``await smtp_receiver_factory("127.0.0.2", port,
hostname=..., tls=...)``; everything it started is stopped after the test). Import it into a
test module, or list ``"tests.smtpserver"`` in ``pytest_plugins`` of ``tests/conftest.py``.

``tls`` is ``None`` (no STARTTLS in the EHLO reply) or a server context factory; see
:func:`receiver_tls` for the usual kinds (good, untrusted CA, expired, expiring soon, wrong
name, TLS 1.1 only). ``refuse_starttls`` advertises STARTTLS but answers it with 454. Both,
like ``hostname``, may be changed between connections.

Recorded: ``messages`` (:class:`Received`: envelope, data, EHLO name, TLS version) and
``sessions`` (:class:`Session`: client address, EHLO name, TLS version, whether QUIT was
sent). ``await receiver.wait_for(n)`` waits until ``n`` messages arrived.
"""

# mypy: disable-error-code="no-untyped-call"
# (twisted.mail.smtp has no type hints)

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLContextFactory
from twisted.internet.protocol import Factory, connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.pki import (
    TestCA,
    TLS11OnlyContextFactory,
    expired_leaf,
    server_options,
    untrusted_leaf,
)

__all__ = [
    "Received",
    "SMTPReceiver",
    "Session",
    "TLSKind",
    "receiver_tls",
    "smtp_receiver_factory",
]

TLSKind = Literal["good", "untrusted", "expired", "expiring", "wrong-name", "tls11"]


def receiver_tls(ca: TestCA, hostname: str, kind: TLSKind = "good") -> IOpenSSLContextFactory:
    """A server context factory for an MX called ``hostname``.

    ``good``: a certificate for ``hostname`` from ``ca``, TLS 1.2 and up (Twisted's default);
    ``untrusted``: from a root no test trusts; ``expired``: expired yesterday; ``expiring``:
    expires in 5 days; ``wrong-name``: valid, but for ``other.invalid.test`` only; ``tls11``:
    a good certificate over TLS 1.1 and nothing else (check ``tests.pki.tls11_available()``).
    """
    now = datetime.datetime.now(datetime.UTC)
    if kind == "good":
        pems = ca.issue([hostname])
    elif kind == "untrusted":
        pems = untrusted_leaf([hostname])
    elif kind == "expired":
        pems = expired_leaf(ca, [hostname])
    elif kind == "expiring":
        pems = ca.issue(
            [hostname],
            not_before=now - datetime.timedelta(days=80),
            not_after=now + datetime.timedelta(days=5, hours=12),
        )
    elif kind == "wrong-name":
        pems = ca.issue(["other.invalid.test"])
    elif kind == "tls11":
        return TLS11OnlyContextFactory(*ca.issue([hostname]))
    else:
        raise ValueError(f"unknown TLS kind {kind!r}")
    options: IOpenSSLContextFactory = server_options(*pems)
    return options


@dataclass
class Session:
    """One SMTP connection as the receiver saw it."""

    client: str
    """The client's IP address."""
    helo: str = ""
    """The last EHLO/HELO name given."""
    tls_version: str | None = None
    """The negotiated protocol (``TLSv1.3``...) once STARTTLS completed, else None."""
    quit: bool = False
    """Whether the client said QUIT."""


@dataclass
class Received:
    """One message accepted by the receiver."""

    mail_from: str
    recipients: list[str]
    data: bytes
    """The message as transferred, lines ending in CRLF (dot-unstuffed)."""
    helo: str
    tls_version: str | None
    """The TLS protocol the message travelled over; None if in the clear."""
    stored: bool = field(default=False, repr=False)


@implementer(smtp.IMessage)
class _Message:
    """The part of one message for one recipient; the first to end stores the message."""

    def __init__(self, receiver: SMTPReceiver, envelope: Received) -> None:
        self._receiver = receiver
        self._envelope = envelope
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        if not self._envelope.stored:
            self._envelope.stored = True
            self._envelope.data = b"".join(line + b"\r\n" for line in self._lines)
            self._receiver._store(self._envelope)
        return succeed(None)

    def connectionLost(self) -> None:
        """Nothing to clean up: a message not ended is not stored."""


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Accepts every sender and recipient of one session."""

    def __init__(self, receiver: SMTPReceiver, session: Session) -> None:
        self._receiver = receiver
        self._session = session
        self._envelope: Received | None = None

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None  # store the message exactly as sent

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        name = helo[0].decode("ascii", "replace") if helo else ""
        self._envelope = Received(str(origin), [], b"", name, self._session.tls_version)
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _Message]:
        envelope = self._envelope
        assert envelope is not None  # Twisted asks for MAIL FROM first
        envelope.recipients.append(str(user.dest))
        return lambda: _Message(self._receiver, envelope)


@implementer(IHandshakeListener)
class _ReceiverESMTP(smtp.ESMTP):
    """Twisted's ESMTP server, recording its session and choosing STARTTLS per receiver."""

    timeout: Any = None  # no idle timer (it would use the global reactor's clock)

    def __init__(self, receiver: SMTPReceiver, session: Session) -> None:
        base: Any = super()
        base.__init__(contextFactory=receiver.tls)
        self.host = receiver.hostname.encode("ascii")
        self._receiver = receiver
        self._session = session
        self.delivery = _Delivery(receiver, session)
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        base: Any = super()
        base.connectionMade()
        self._receiver._connections.add(self)

    def do_EHLO(self, rest: bytes) -> None:
        self._session.helo = rest.strip().decode("ascii", "replace")
        base: Any = super()
        base.do_EHLO(rest)

    def do_HELO(self, rest: bytes) -> None:
        self._session.helo = rest.strip().decode("ascii", "replace")
        base: Any = super()
        base.do_HELO(rest)

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self._receiver.refuse_starttls:
            self.sendCode(454, b"4.7.0 TLS not available due to local problem")
            return
        base: Any = super()
        base.ext_STARTTLS(rest)

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        self._session.tls_version = transport.getHandle().get_protocol_version_name()

    def do_QUIT(self, rest: bytes) -> None:
        self._session.quit = True
        base: Any = super()
        base.do_QUIT(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        base: Any = super()
        base.connectionLost(reason)
        self._receiver._connections.discard(self)
        self.lost.callback(None)


class SMTPReceiver:
    """A test ESMTP receiver; see the module docstring. ``start`` it, then ``await stop()``."""

    def __init__(
        self,
        reactor: Any,
        *,
        hostname: str = "mx.example.test",
        tls: IOpenSSLContextFactory | None = None,
        refuse_starttls: bool = False,
    ) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.tls = tls
        self.refuse_starttls = refuse_starttls
        self.messages: list[Received] = []
        self.sessions: list[Session] = []
        self._connections: set[_ReceiverESMTP] = set()
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._port: Any = None

    def _build(self, addr: Any) -> _ReceiverESMTP:
        session = Session(client=getattr(addr, "host", ""))
        self.sessions.append(session)
        return _ReceiverESMTP(self, session)

    def _store(self, message: Received) -> None:
        self.messages.append(message)
        self._wake()

    def wait_for(self, count: int) -> Deferred[None]:
        """Fires once ``count`` messages have arrived (at once if they have)."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def _wake(self) -> None:
        ready = [d for count, d in self._waiters if count <= len(self.messages)]
        self._waiters = [(c, d) for c, d in self._waiters if d not in ready]
        for d in ready:
            d.callback(None)

    @property
    def port(self) -> int:
        """The TCP port listened on (after :meth:`start`)."""
        assert self._port is not None
        port: int = self._port.getHost().port
        return port

    async def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``interface`` and ``port`` (0: an ephemeral one); return the port."""
        factory = Factory()
        factory.buildProtocol = self._build  # type: ignore[method-assign]
        factory.noisy = False
        self._port = self.reactor.listenTCP(port, factory, interface=interface)
        return self.port

    async def stop(self) -> None:
        """Stop listening, drop every open connection and wait until all are closed."""
        waits = [c.lost for c in self._connections]
        for c in list(self._connections):
            transport: Any = c.transport
            transport.abortConnection()
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        await DeferredList(waits)


StartReceiver = Callable[..., Awaitable[SMTPReceiver]]


@pytest_twisted.async_yield_fixture()
async def smtp_receiver_factory(reactor: Any) -> AsyncIterator[StartReceiver]:
    """Start receivers with ``await smtp_receiver_factory(interface, port, **options)``.

    ``options`` are :class:`SMTPReceiver`'s; every receiver started is stopped after the test.
    """
    started: list[SMTPReceiver] = []

    async def start(interface: str = "127.0.0.1", port: int = 0, **options: Any) -> SMTPReceiver:
        receiver = SMTPReceiver(reactor, **options)
        await receiver.start(interface, port)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()
