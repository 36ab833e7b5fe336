"""Delivering one finished report to one C{rua} destination (``reference/tlsrpt.md`` §5, §6).

Each function is a single attempt: it succeeds or raises L{DeliveryError}, which says whether
trying again later is worth it. Retries, back-off and the outbox live elsewhere (the store).

- C{mailto:}: L{build_report_message} (pure) makes the RFC 6522 C{multipart/report} message,
  L{dkim_sign} optionally signs it (dkimpy, no C{l=} tag), and L{send_mail} hands it to the
  local MTA over plain ESMTP, returning the queue id of its C{250 ... queued as <QID>} reply so
  the tailer can leave that session out of the next report (§6).
- C{https:}: L{post_https} POSTs the gzip body with a bare C{Agent} (no redirects); only a 2xx
  answer is success.
"""

from __future__ import annotations

import datetime
import email.policy
import hashlib
import re
from collections.abc import Awaitable, Callable
from email.headerregistry import Address
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime
from io import BytesIO
from typing import Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion, platformTrust
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from postfix_mtasts.mtasts.fetch import (
    _LDH_NAME,
    USER_AGENT,
    _causes,
    _CheckingCreator,
    _Discard,
    _EndpointFactory,
    _load_trust_root,
    _PolicyHostEndpoint,
    _reasons,
    _Unresolved,
)
from postfix_mtasts.tlsrpt.report import report_subject

__all__ = [
    "MEDIA_TYPE",
    "SIGNED_HEADERS",
    "DeliveryError",
    "build_report_message",
    "dkim_sign",
    "post_https",
    "send_mail",
]

MEDIA_TYPE = "application/tlsrpt+gzip"
"""The media type of a gzip-compressed report (RFC 8460 §6.4)."""

SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"tls-report-domain",
    b"tls-report-submitter",
    b"mime-version",
    b"content-type",
)
"""The header fields a built-in DKIM signature covers (RFC 8460 §5.3 names the two TLS ones)."""

_log = Logger()

_QUEUED_AS = re.compile(rb"queued as ([0-9A-Za-z]+)")


class DeliveryError(Exception):
    """One delivery attempt failed; C{permanent} says that trying again will not help."""

    def __init__(self, detail: str, *, permanent: bool) -> None:
        super().__init__(detail, permanent)
        self.detail = detail
        self.permanent = permanent

    def __str__(self) -> str:
        return f"{self.detail} ({'permanent' if self.permanent else 'temporary'})"


# --- The report message (pure) -------------------------------------------------------------


def _message_id(report_id: str, rcpt: str, domain: str) -> str:
    """A Message-ID fixed by the report and recipient, so a retry resends the same message."""
    local = report_id.rpartition("@")[0] or report_id
    tag = hashlib.sha256(rcpt.lower().encode("utf-8")).hexdigest()[:12]
    return f"<{local}.{tag}@{domain}>"


def build_report_message(
    *,
    report_gz: bytes,
    filename: str,
    policy_domain: str,
    submitter: str,
    report_id: str,
    mail_from: str,
    rcpt: str,
    organization_name: str,
    summary_text: str,
    date: datetime.datetime,
    message_id_domain: str,
) -> bytes:
    """Return the report mail (RFC 8460 §5.3) as RFC 5322 bytes with CRLF line endings.

    C{multipart/report; report-type="tlsrpt"} (RFC 6522): a C{text/plain} C{summary_text},
    then C{report_gz} as a base64 C{application/tlsrpt+gzip} attachment named C{filename}.
    Headers: From (C{organization_name} <C{mail_from}>), To, Date (C{date}, timezone-aware),
    Message-ID (derived from C{report_id} and C{rcpt} under C{message_id_domain}),
    MIME-Version, Subject (L{report_subject}), TLS-Report-Domain, TLS-Report-Submitter,
    TLS-Required: No and Auto-Submitted: auto-generated. The same arguments give the same bytes.

    @raise ValueError: C{date} is naive, an address is not an addr-spec, or a value is invalid
        for L{report_subject}.
    """
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    subject = report_subject(policy_domain, submitter, report_id)
    policy = email.policy.SMTP
    # A boundary fixed by the content (so rebuilding gives the same bytes); "=_" never
    # occurs in base64 lines, and a digest never occurs by chance in the summary.
    digest = hashlib.sha256(report_gz + summary_text.encode("utf-8", "surrogatepass"))
    boundary = f"=_tlsrpt_{digest.hexdigest()[:32]}"
    root = MIMEMultipart("report", boundary, [], policy=policy)
    root.set_param("report-type", "tlsrpt")
    root["From"] = str(Address(display_name=organization_name, addr_spec=mail_from))
    root["To"] = str(Address(addr_spec=rcpt))
    root["Date"] = format_datetime(date)
    root["Message-ID"] = _message_id(report_id, rcpt, message_id_domain)
    root["Subject"] = subject
    root["TLS-Report-Domain"] = policy_domain
    root["TLS-Report-Submitter"] = submitter
    root["TLS-Required"] = "No"
    root["Auto-Submitted"] = "auto-generated"
    charset = "us-ascii" if summary_text.isascii() else "utf-8"
    root.attach(MIMEText(summary_text, "plain", charset, policy=policy))
    attachment = MIMEApplication(report_gz, "tlsrpt+gzip", policy=policy)
    attachment.add_header("Content-Disposition", "attachment", filename=filename)
    root.attach(attachment)
    return root.as_bytes(policy=policy)


def dkim_sign(message: bytes, *, domain: str, selector: str, key_pem: bytes) -> bytes:
    """Return C{message} with a DKIM-Signature of C{domain} prepended (RFC 8460 §5.3).

    rsa-sha256, relaxed/relaxed, over L{SIGNED_HEADERS}, marked as a TLS report for dkimpy
    (which never adds an C{l=} tag then). C{key_pem} is the RSA private key in PEM.

    @raise DeliveryError: signing failed (a bad key, say); permanent, since retrying the same
        key cannot help.
    """
    import dkim  # noqa: PLC0415 - optional: only built-in signing needs dkimpy

    try:
        header: bytes = dkim.sign(
            message,
            selector.encode("ascii"),
            domain.encode("ascii"),
            key_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
            tlsrpt=True,
        )
    except (dkim.DKIMException, ValueError, UnicodeError) as e:
        raise DeliveryError(f"DKIM signing failed: {e}", permanent=True) from e
    return header + message


# --- mailto: hand-over to the local MTA ----------------------------------------------------


class _Sender(smtp.ESMTPSender):
    """Twisted's single-message ESMTP sender, remembering the final reply and the close."""

    final_reply = b""

    def __init__(self, *args: Any, **kw: Any) -> None:
        base: Any = super()
        base.__init__(*args, **kw)
        self.lost: Deferred[None] = Deferred()

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: Any, log: Any) -> None:
        self.final_reply = resp if isinstance(resp, bytes) else str(resp).encode()
        base: Any = super()
        base.sentMail(code, resp, numOk, addresses, log)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        base: Any = super()
        base.connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


class _SenderFactory(smtp.ESMTPSenderFactory):
    """Builds L{_Sender}s and keeps the last one, so a deadline can drop its connection."""

    protocol = _Sender
    sender: _Sender | None = None
    noisy = False  # no "Starting factory" line per report

    def buildProtocol(self, addr: Any) -> _Sender:
        base: Any = super()
        sender: _Sender = base.buildProtocol(addr)
        self.sender = sender
        return sender


def _smtp_failure(e: Exception) -> DeliveryError:
    """Turn what Twisted's SMTP client raised into a L{DeliveryError}."""
    if isinstance(e, smtp.SMTPClientError) and e.code >= 400:
        resp = e.resp if isinstance(e.resp, bytes) else str(e.resp).encode()
        text = resp.decode("utf-8", "replace").replace("\n", " ")[:200]
        return DeliveryError(f"SMTP {e.code} {text}", permanent=e.code >= 500)
    cause = e.__cause__ if isinstance(e, smtp.SMTPConnectError) and e.__cause__ else e
    if isinstance(cause, error.ConnectionRefusedError):
        return DeliveryError("SMTP connection refused", permanent=False)
    return DeliveryError(f"SMTP failed: {type(cause).__name__}: {cause}"[:200], permanent=False)


async def send_mail(
    reactor: Any,
    *,
    smtp_host: str,
    smtp_port: int,
    mail_from: str,
    rcpt: str,
    message: bytes,
    timeout: float = 60.0,
    helo: str = "",
) -> str:
    """Hand C{message} for C{rcpt} to the MTA at C{smtp_host}:C{smtp_port}; return its queue id.

    Plain ESMTP with Twisted's client: no authentication, no TLS required (this is the local
    MTA). The queue id comes from a final C{250 ... queued as <QID>} reply, C{""} without
    one. One deadline of C{timeout} seconds covers the session up to the acceptance; the
    polite QUIT after it gets what is left of it. C{message} has CRLF line endings. C{helo}
    is the EHLO name (default: this host's FQDN, as Twisted finds it).

    @raise DeliveryError: a 4xx reply, a connection failure or the deadline (temporary), or a
        5xx reply or an address that is not ASCII (permanent).
    """
    if not (mail_from.isascii() and rcpt.isascii()):
        raise DeliveryError("an address is not ASCII (SMTPUTF8 is not supported)", permanent=True)
    result: Deferred[Any] = Deferred()
    # Twisted's client sends "\n"-separated data, writing each "\n" as CRLF (and dot-stuffing
    # within its 16 KiB chunks: only base64 lines, which never start with ".", cross them).
    data = BytesIO(message.replace(b"\r\n", b"\n"))
    factory_class: Any = _SenderFactory
    factory: _SenderFactory = factory_class(
        None,
        None,
        mail_from,
        rcpt,
        data,
        result,
        retries=0,
        requireAuthentication=False,
        requireTransportSecurity=False,
    )
    if helo:
        factory.domain = helo.encode("ascii")
    connector = reactor.connectTCP(smtp_host, smtp_port, factory, timeout=timeout)
    expired = False

    def deadline() -> None:
        nonlocal expired
        expired = True
        sender = factory.sender
        transport: Any = sender.transport if sender is not None else None
        if transport is not None:
            transport.abortConnection()
        elif connector.state == "connecting":
            connector.stopConnecting()

    timer = reactor.callLater(timeout, deadline)
    try:
        failure: Exception | None = None
        try:
            await result
        except Exception as e:  # noqa: BLE001 - classified below, once the session is over
            failure = e
        timed_out = expired
        if factory.sender is not None:
            await factory.sender.lost  # the QUIT; the deadline still bounds it
    finally:
        if timer.active():
            timer.cancel()
    if failure is not None:
        if timed_out:
            raise DeliveryError(f"SMTP deadline of {timeout:g} s passed", permanent=False)
        raise _smtp_failure(failure) from failure
    sender = factory.sender
    reply = sender.final_reply if sender is not None else b""
    found = _QUEUED_AS.search(reply)
    queue_id = found.group(1).decode("ascii") if found else ""
    _log.info("report for {rcpt} handed over, queue id {qid}", rcpt=rcpt, qid=queue_id or "-")
    return queue_id


# --- https: POST ---------------------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body known in full: written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _UncheckedCreator(_CheckingCreator):
    """TLS client connections with SNI that accept any certificate (RFC 8460 §3 allows it)."""

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A client connection sending SNI and verifying nothing."""
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        if not (isIPAddress(self._host) or isIPv6Address(self._host)):
            connection.set_tlsext_host_name(self._host.encode("ascii"))
        connection.set_verify(SSL.VERIFY_NONE, lambda *_: True)
        return connection


def _parse_url(url: str) -> URI:
    """The parsed C{https} URL, or a permanent L{DeliveryError}."""
    try:
        uri: URI = URI.fromBytes(url.encode("ascii"))  # type: ignore[no-untyped-call]
    except (UnicodeError, ValueError) as e:
        raise DeliveryError(f"not a usable https URL: {url[:100]!r}", permanent=True) from e
    host = uri.host.decode("ascii")
    if uri.scheme != b"https" or not (
        _LDH_NAME.fullmatch(host) or isIPAddress(host) or isIPv6Address(host)
    ):
        raise DeliveryError(f"not a usable https URL: {url[:100]!r}", permanent=True)
    return uri


def _status_error(code: int) -> DeliveryError:
    """The failure an HTTP status other than 2xx means."""
    if 300 <= code < 400:
        return DeliveryError(f"HTTP {code}: redirect not followed", permanent=False)
    # reference/tlsrpt.md §5: every answer but 2xx is retried, 4xx included (a collector
    # answering 404 or 413 while it is being set up or moved is common enough).
    return DeliveryError(f"HTTP {code}", permanent=False)


def _http_failure(e: Exception, creator: _CheckingCreator, port: int) -> DeliveryError:
    """Turn what a POST raised into a temporary L{DeliveryError}."""
    if isinstance(e, DeliveryError):
        return e
    if creator.problem is not None:
        return DeliveryError(creator.problem, permanent=False)
    causes = _causes(e)
    for inner in causes:
        if isinstance(inner, (VerificationError, CertificateError)):
            return DeliveryError("certificate not valid for the host", permanent=False)
        if isinstance(inner, SSL.Error):
            return DeliveryError(f"TLS error: {_reasons(inner)}", permanent=False)
        if isinstance(inner, _Unresolved):
            return DeliveryError(f"host not resolved: {inner}", permanent=False)
        if isinstance(inner, error.ConnectionRefusedError):
            return DeliveryError(f"connection refused on port {port}", permanent=False)
        if isinstance(inner, error.ConnectError):
            return DeliveryError(f"cannot connect: {inner}", permanent=False)
    if isinstance(e, ResponseNeverReceived):
        return DeliveryError("connection lost before a response", permanent=False)
    if isinstance(e, ResponseFailed):
        return DeliveryError("connection lost during the response", permanent=False)
    return DeliveryError(f"{type(e).__name__}: {e}"[:200], permanent=False)


async def post_https(
    reactor: Any,
    *,
    url: str,
    body: bytes,
    resolve: Callable[[str], Awaitable[list[str]]] | None = None,
    ca_file: str = "",
    verify: bool = True,
    timeout: float = 60.0,
) -> int:
    """POST C{body} (a gzip report) to the C{https} C{url}; return the 2xx status (§5.4).

    C{Content-Type: application/tlsrpt+gzip}, C{User-Agent: postfix-mtasts/<version>}, over
    TLS >= 1.2 with a bare C{Agent}: a redirect is not followed. The host is resolved with
    C{resolve} (the project's DNS client) when given, else by the reactor's resolver. With
    C{verify}, the certificate must chain to C{ca_file} (a PEM bundle; empty: the system's
    trust store) and name the host; without, any certificate is accepted. One deadline of
    C{timeout} seconds covers the whole request. The answer's body is not read.

    @raise DeliveryError: any answer but 2xx, or no answer: temporary, except for a bad URL.
    """
    uri = _parse_url(url)
    host = uri.host.decode("ascii")
    if verify:
        try:
            trust = _load_trust_root(ca_file) if ca_file else platformTrust()  # type: ignore[no-untyped-call]
        except (OSError, ValueError) as e:
            raise DeliveryError(f"cannot read ca_file {ca_file!r}: {e}", permanent=False) from e
        options = CertificateOptions(trustRoot=trust, raiseMinimumTo=TLSVersion.TLSv1_2)
        creator: _CheckingCreator = _CheckingCreator(host, options)
    else:
        options = CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)
        creator = _UncheckedCreator(host, options)
    posting = Deferred.fromCoroutine(_post(reactor, uri, body, resolve, creator))
    expired = False

    def deadline() -> None:
        nonlocal expired
        expired = True
        posting.cancel()

    timer = reactor.callLater(timeout, deadline)
    try:
        code = await posting
    except Exception as e:
        if expired:
            raise DeliveryError(f"deadline of {timeout:g} s passed", permanent=False) from e
        raise _http_failure(e, creator, uri.port) from e
    finally:
        if timer.active():
            timer.cancel()
    _log.info("report posted to {url}: HTTP {code}", url=url, code=code)
    return code


async def _post(
    reactor: Any,
    uri: URI,
    body: bytes,
    resolve: Callable[[str], Awaitable[list[str]]] | None,
    creator: _CheckingCreator,
) -> int:
    host = uri.host.decode("ascii")
    if isIPAddress(host) or isIPv6Address(host):
        literal = [host]

        async def resolve_literal(name: str) -> list[str]:
            return literal

        resolve = resolve_literal
    if resolve is not None:
        endpoint: Any = _PolicyHostEndpoint(reactor, resolve, host, uri.port, creator)
    else:
        endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, host, uri.port))
    # No pool given: a fresh non-persistent one. A bare Agent follows no redirects.
    agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor, _EndpointFactory(endpoint)
    )
    headers = Headers(
        {
            b"User-Agent": [USER_AGENT.encode("ascii")],
            b"Content-Type": [MEDIA_TYPE.encode("ascii")],
        }
    )
    response: Any = await agent.request(
        b"POST",
        uri.toBytes(),  # type: ignore[no-untyped-call]
        headers,
        _BytesProducer(body),
    )
    response.deliverBody(_Discard())
    code: int = response.code
    if not 200 <= code < 300:
        raise _status_error(code)
    return code
