"""Real report receivers on loopback for the reporter's tests.

:class:`MailServer` is Twisted's ESMTP server standing in for the local MTA: it stores each
message with its envelope and ends DATA with the reply the test chooses (``250 ... queued as
ABC123`` by default).  :class:`ReportServer` is the HTTPS test server of
:mod:`tests.httpsserver` that also reads request bodies, and can stay silent for some paths.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.httpsserver import PolicyServer, _PolicyHostProtocol


@implementer(smtp.IMessage)
class _StoredMessage:
    """One incoming message, stored in its server's C{messages} at the end of DATA."""

    def __init__(self, server: MailServer, mail_from: str, rcpt: str) -> None:
        self._server = server
        self._envelope = (mail_from, rcpt)
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[bytes]:
        data = b"".join(line + b"\r\n" for line in self._lines)
        self._server.messages.append((*self._envelope, data))
        return succeed(b"")

    def connectionLost(self) -> None:
        """Nothing to clean up."""


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Accepts every sender; refuses recipients with 550 if its server says so."""

    def __init__(self, server: MailServer) -> None:
        self._server = server
        self._from = ""

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None  # store the message exactly as sent

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self._server.helos.append(helo[0])
        self._from = str(origin)
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        if self._server.refuse_rcpt:
            raise smtp.SMTPBadRcpt(user)  # type: ignore[no-untyped-call]
        rcpt = str(user.dest)
        return lambda: _StoredMessage(self._server, self._from, rcpt)


class _TestESMTP(smtp.ESMTP):
    """Twisted's ESMTP server ending DATA with the reply its test server chooses."""

    timeout: Any = None

    def __init__(self, server: MailServer) -> None:
        base: Any = super()
        base.__init__()
        self._server = server
        self.delivery = _Delivery(server)

    def _messageHandled(self, resultList: Any) -> None:
        base: Any = super()
        base.sendCode(self._server.final_code, self._server.final_text)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        base: Any = super()
        base.connectionLost(reason)
        self._server.closed.append(reason)


class MailServer:
    """A real ESMTP server on 127.0.0.1 storing C{(mail_from, rcpt, data)} per message."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.messages: list[tuple[str, str, bytes]] = []
        self.closed: list[Failure] = []
        self.helos: list[bytes] = []
        self.final_code = 250
        self.final_text = b"2.0.0 Ok: queued as ABC123"
        self.refuse_rcpt = False
        self._port: Any = None

    async def start(self) -> int:
        """Listen on an ephemeral port; return it."""
        factory = Factory.forProtocol(lambda: _TestESMTP(self))
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        port: int = self._port.getHost().port
        return port

    @property
    def port(self) -> int:
        """The port it listens on."""
        port: int = self._port.getHost().port
        return port

    async def stop(self) -> None:
        """Stop listening."""
        await self._port.stopListening()


class _BodyReadingProtocol(_PolicyHostProtocol):
    """The test server's protocol, reading the request body before answering.

    The body (Content-Length bytes) goes to the server's C{bodies}; a path in the server's
    C{silent} set gets no answer at all.
    """

    def __init__(self, server: ReportServer) -> None:
        super().__init__(server)
        self._report_server = server
        self._body = b""
        self._want = -1

    def lineReceived(self, line: bytes) -> None:
        if line or self._request is None:
            super().lineReceived(line)
            return
        self._want = int(self._request.header("content-length") or 0)
        self.setRawMode()  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        self._body += data
        if self._request is None or self._want < 0 or len(self._body) < self._want:
            return
        self._want = -1
        self._report_server.requests.append(self._request)
        self._report_server.bodies.append(self._body)
        if self._request.path in self._report_server.silent:
            return
        self._answer(self._report_server.reply_for(self._request.host, self._request.path))


class ReportServer(PolicyServer):
    """The HTTPS test server, also keeping request bodies and able to stay silent."""

    def __init__(self, reactor: Any, context_factory: Any) -> None:
        super().__init__(reactor, context_factory)
        self.bodies: list[bytes] = []
        self.silent: set[str] = set()

    async def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening on an ephemeral port; return it."""
        factory = Factory.forProtocol(lambda: _BodyReadingProtocol(self))
        endpoint = SSL4ServerEndpoint(  # type: ignore[no-untyped-call]
            self.reactor, port, self._context_factory, interface=interface
        )
        self._port = await endpoint.listen(factory)  # type: ignore[no-untyped-call]
        return self.port
