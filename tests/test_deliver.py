"""Tests for postfix_mtasts.tlsrpt.deliver: the report mail, DKIM, SMTP hand-over, HTTPS POST.

The message is checked with the stdlib email package and with parsedmarc; signatures with
dkimpy's own verifier. Delivery runs against real servers on loopback: Twisted's ESMTP server
with a test delivery that stores what it receives, and the HTTPS test server with the test CA.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import gzip
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from parsedmarc import parse_report_email
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from postfix_mtasts import __version__
from postfix_mtasts.tlsrpt.deliver import (
    MEDIA_TYPE,
    DeliveryError,
    build_report_message,
    dkim_sign,
    post_https,
    send_mail,
)
from postfix_mtasts.tlsrpt.report import (
    FailureKey,
    PolicyCounts,
    PolicyKey,
    build_report,
    report_filename,
    report_gzip,
)
from tests.collectors import MailServer, ReportServer
from tests.httpsserver import Reply, redirect, status
from tests.pki import SNIContextFactory, TestCA, untrusted_leaf

DAY = datetime.date(2026, 11, 22)
SUBMITTER = "example.org"
POLICY_DOMAIN = "example.net"
REPORT_ID = "20261122.example.net.k3j9x@example.org"
MAIL_FROM = "tlsrpt-noreply@example.org"
RCPT = "tlsrpt@example.net"
FILENAME = report_filename(SUBMITTER, POLICY_DOMAIN, DAY, "1")
SENT_AT = datetime.datetime(2026, 11, 23, 1, 30, tzinfo=datetime.UTC)
REPORT = build_report(
    organization_name="Example Org",
    contact_info="tlsrpt@example.org",
    report_id=REPORT_ID,
    day=DAY,
    policies={
        PolicyKey("sts", POLICY_DOMAIN, ("version: STSv1", "mode: enforce"), ("mx.example.net",)): (
            PolicyCounts(
                successes=10,
                failures={
                    FailureKey("certificate-expired", "mx.example.net", "192.0.2.1", None): 2
                },
            )
        )
    },
)
REPORT_GZ = report_gzip(REPORT)
SUMMARY = "TLS report for example.net, 2026-11-22: 10 successful, 2 failed sessions.\n"

HOST = "tlsrpt.example.test"
CA = TestCA("Deliver Test Root")
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
PUBLIC_B64 = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
)


def message(**changes: Any) -> bytes:
    """The report mail for the constants above, with C{changes} to the arguments."""
    arguments: dict[str, Any] = {
        "report_gz": REPORT_GZ,
        "filename": FILENAME,
        "policy_domain": POLICY_DOMAIN,
        "submitter": SUBMITTER,
        "report_id": REPORT_ID,
        "mail_from": MAIL_FROM,
        "rcpt": RCPT,
        "organization_name": "Example Org",
        "summary_text": SUMMARY,
        "date": SENT_AT,
        "message_id_domain": "mail.example.org",
    }
    arguments.update(changes)
    return build_report_message(**arguments)


def parsed(raw: bytes) -> EmailMessage:
    """C{raw} parsed by the stdlib email package (modern policy)."""
    result = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(result, EmailMessage)
    return result


def key_record(service: bytes = b"tlsrpt") -> bytes:
    """The DKIM key record of the test key with service type C{service}."""
    return b"v=DKIM1; k=rsa; s=" + service + b"; p=" + PUBLIC_B64


def dns_for(record: bytes) -> Any:
    """A dkimpy C{dnsfunc} answering C{record} for the test selector only."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"rpt._domainkey.example.org." else None

    return dnsfunc


def signed(raw: bytes) -> bytes:
    """C{raw} signed with the test key as example.org, selector rpt."""
    return dkim_sign(raw, domain="example.org", selector="rpt", key_pem=KEY_PEM)


def signature_tags(raw: bytes) -> dict[str, str]:
    """The tags of the first DKIM-Signature header of C{raw}."""
    value = "".join(str(parsed(raw)["DKIM-Signature"]).split())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


# --- The message ----------------------------------------------------------------------------


def test_message_structure() -> None:
    """The mail is multipart/report; report-type=tlsrpt: a text summary, then the gzip report."""
    msg = parsed(message())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    text, attachment = msg.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(attachment, EmailMessage)
    assert text.get_content_type() == "text/plain"
    assert text.get_content().replace("\r\n", "\n") == SUMMARY
    assert attachment.get_content_type() == MEDIA_TYPE
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_filename() == FILENAME
    assert attachment.get_content() == REPORT_GZ


def test_message_headers() -> None:
    """Every header RFC 8460 §5.3 asks for is present with the expected value."""
    msg = parsed(message())
    assert msg["From"].addresses[0].addr_spec == MAIL_FROM
    assert msg["From"].addresses[0].display_name == "Example Org"
    assert msg["To"].addresses[0].addr_spec == RCPT
    assert msg["Date"].datetime == SENT_AT
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mail.example.org>")
    assert msg["MIME-Version"] == "1.0"
    assert msg["TLS-Report-Domain"] == POLICY_DOMAIN
    assert msg["TLS-Report-Submitter"] == SUBMITTER
    assert msg["TLS-Required"] == "No"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == (
        f"Report Domain: {POLICY_DOMAIN} Submitter: {SUBMITTER} Report-ID: <{REPORT_ID}>"
    )


def test_message_lines() -> None:
    """Every line ends in CRLF, none is longer than 78 characters, and all is ASCII."""
    raw = message()
    assert raw.endswith(b"\r\n")
    lines = raw.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert max(len(line) for line in lines) <= 78
    assert raw.isascii()


def test_message_is_deterministic() -> None:
    """The same arguments give the same bytes; another recipient gets another Message-ID."""
    assert message() == message()
    assert (
        parsed(message())["Message-ID"] != parsed(message(rcpt="other@example.net"))["Message-ID"]
    )


def test_message_non_ascii_summary() -> None:
    """A summary that is not ASCII is carried as UTF-8 and reads back unchanged."""
    text = "Rapport für beispiel.example\n"
    msg = parsed(message(summary_text=text))
    part: Any = next(msg.iter_parts())
    assert part.get_content().replace("\r\n", "\n") == text


def test_message_read_by_parsedmarc() -> None:
    """parsedmarc finds the TLS report in the mail and reads the same report back."""
    result: Any = parse_report_email(message(), offline=True)
    assert result["report_type"] == "smtp_tls"
    report = result["report"]
    assert report["report_id"] == REPORT_ID
    assert report["organization_name"] == "Example Org"
    assert report["policies"][0]["policy_domain"] == POLICY_DOMAIN
    assert report["policies"][0]["successful_session_count"] == 10
    assert report["policies"][0]["failed_session_count"] == 2


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"date": datetime.datetime(2026, 11, 23, 1, 30)}, "timezone-aware"),
        ({"policy_domain": "not a domain"}, "not a valid domain name"),
        ({"report_id": "a<b@example.org"}, "report id"),
    ],
)
def test_message_refuses_bad_input(changes: dict[str, Any], problem: str) -> None:
    """A naive date, an invalid domain or a report-id unfit for the Subject is refused."""
    with pytest.raises(ValueError, match=problem):
        message(**changes)


# --- DKIM -----------------------------------------------------------------------------------


def test_dkim_signature_verifies_strictly() -> None:
    """A signed report verifies with tlsrpt="strict" against a key record with s=tlsrpt."""
    raw = signed(message())
    assert dkim.verify(raw, dnsfunc=dns_for(key_record()), tlsrpt="strict")


def test_dkim_signature_tags() -> None:
    """The signature has no l= tag and covers the TLS report headers, From and Subject."""
    tags = signature_tags(signed(message()))
    assert "l" not in tags
    assert tags["d"] == "example.org"
    assert tags["s"] == "rpt"
    assert set(tags["h"].lower().split(":")) >= {
        "from",
        "subject",
        "tls-report-domain",
        "tls-report-submitter",
        "content-type",
    }


@pytest.mark.parametrize(
    ("record", "mode", "tamper", "valid"),
    [
        (key_record(b"*"), True, False, True),
        (key_record(b"*"), "strict", False, False),
        (key_record(b"email"), "strict", False, False),
        (key_record(), "strict", True, False),
    ],
)
def test_dkim_verification_outcomes(
    record: bytes, mode: bool | str, tamper: bool, valid: bool
) -> None:
    """Strict verification needs a key with s=tlsrpt, and any needs an unchanged report header."""
    raw = signed(message())
    if tamper:
        raw = raw.replace(b"TLS-Report-Domain: example.net", b"TLS-Report-Domain: example.com")
    assert dkim.verify(raw, dnsfunc=dns_for(record), tlsrpt=mode) is valid


def test_dkim_bad_key() -> None:
    """A key that is not an RSA private key is a permanent delivery error."""
    with pytest.raises(DeliveryError) as caught:
        dkim_sign(message(), domain="example.org", selector="rpt", key_pem=b"not a key")
    assert caught.value.permanent


# --- SMTP -----------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def mail_server(reactor: Any) -> AsyncIterator[MailServer]:
    """A running test ESMTP server."""
    server = MailServer(reactor)
    await server.start()
    yield server
    await server.stop()


async def send(reactor: Any, server: MailServer, raw: bytes, timeout: float = 10.0) -> str:
    """Hand C{raw} to C{server} from MAIL_FROM for RCPT."""
    return await send_mail(
        reactor,
        smtp_host="127.0.0.1",
        smtp_port=server.port,
        mail_from=MAIL_FROM,
        rcpt=RCPT,
        message=raw,
        timeout=timeout,
    )


@pytest_twisted.ensureDeferred
async def test_send_mail_delivers_and_returns_queue_id(
    reactor: Any, mail_server: MailServer
) -> None:
    """The server stores the exact message and envelope; the queue id of its reply comes back."""
    raw = message()
    assert await send(reactor, mail_server, raw) == "ABC123"
    assert mail_server.messages == [(MAIL_FROM, RCPT, raw)]
    assert len(mail_server.closed) == 1  # the session ended (QUIT) before send_mail returned
    stored = parsed(mail_server.messages[0][2])
    assert stored["TLS-Report-Domain"] == POLICY_DOMAIN
    result: Any = parse_report_email(mail_server.messages[0][2], offline=True)
    assert result["report"]["report_id"] == REPORT_ID


@pytest_twisted.ensureDeferred
async def test_signed_mail_verifies_after_transfer(reactor: Any, mail_server: MailServer) -> None:
    """A DKIM-signed report still verifies strictly as the server stored it."""
    await send(reactor, mail_server, signed(message()))
    stored = mail_server.messages[0][2]
    assert dkim.verify(stored, dnsfunc=dns_for(key_record()), tlsrpt="strict")
    assert "l" not in signature_tags(stored)


@pytest_twisted.ensureDeferred
async def test_send_mail_helo_name(reactor: Any, mail_server: MailServer) -> None:
    """The EHLO name given is the one the server sees."""
    await send_mail(
        reactor,
        smtp_host="127.0.0.1",
        smtp_port=mail_server.port,
        mail_from=MAIL_FROM,
        rcpt=RCPT,
        message=message(),
        helo="reporter.example.org",
    )
    assert mail_server.helos == [b"reporter.example.org"]


@pytest_twisted.ensureDeferred
async def test_send_mail_without_queue_id(reactor: Any, mail_server: MailServer) -> None:
    """A final 250 reply without "queued as" gives an empty queue id."""
    mail_server.final_text = b"2.0.0 Ok"
    assert await send(reactor, mail_server, message()) == ""
    assert len(mail_server.messages) == 1


@pytest.mark.parametrize(
    ("final_code", "refuse_rcpt", "permanent"),
    [(451, False, False), (554, False, True), (250, True, True)],
)
@pytest_twisted.ensureDeferred
async def test_send_mail_refused(
    reactor: Any,
    mail_server: MailServer,
    final_code: int,
    refuse_rcpt: bool,
    permanent: bool,
) -> None:
    """A 4xx reply is a temporary failure, a 5xx one (after DATA or to RCPT) a permanent one."""
    mail_server.final_code = final_code
    mail_server.final_text = b"4.3.0 try again later" if final_code < 500 else b"5.7.1 no"
    mail_server.refuse_rcpt = refuse_rcpt
    with pytest.raises(DeliveryError) as caught:
        await send(reactor, mail_server, message())
    assert caught.value.permanent is permanent
    shown = 550 if refuse_rcpt else final_code
    assert caught.value.detail.startswith(f"SMTP {shown} ")
    assert len(mail_server.closed) == 1


@pytest_twisted.ensureDeferred
async def test_send_mail_connection_refused(reactor: Any) -> None:
    """No server listening is a temporary failure."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(DeliveryError) as caught:
        await send_mail(
            reactor,
            smtp_host="127.0.0.1",
            smtp_port=number,
            mail_from=MAIL_FROM,
            rcpt=RCPT,
            message=message(),
        )
    assert not caught.value.permanent
    assert "refused" in caught.value.detail


class _Silent(Protocol):
    """Accepts a connection and never says anything; C{lost} fires when it closes."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_send_mail_deadline(reactor: Any) -> None:
    """A server that never greets is dropped at the deadline, a temporary failure."""
    accepted: list[_Silent] = []

    def build() -> _Silent:
        accepted.append(_Silent())
        return accepted[-1]

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    try:
        with pytest.raises(DeliveryError) as caught:
            await send_mail(
                reactor,
                smtp_host="127.0.0.1",
                smtp_port=port.getHost().port,
                mail_from=MAIL_FROM,
                rcpt=RCPT,
                message=message(),
                timeout=0.2,
            )
        assert not caught.value.permanent
        assert "deadline" in caught.value.detail
        await DeferredList([p.lost for p in accepted])
        assert len(accepted) == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_send_mail_non_ascii_address(reactor: Any) -> None:
    """An address that is not ASCII is refused at once, permanently (no SMTPUTF8)."""
    with pytest.raises(DeliveryError) as caught:
        await send_mail(
            reactor,
            smtp_host="127.0.0.1",
            smtp_port=1,
            mail_from=MAIL_FROM,
            rcpt="tlsrpt@exämple.net",
            message=message(),
        )
    assert caught.value.permanent


# --- HTTPS ----------------------------------------------------------------------------------

PATH = "/tlsrpt"


@pytest_twisted.async_yield_fixture
async def https_server(reactor: Any) -> AsyncIterator[ReportServer]:
    """A running HTTPS server with certificates from the test CA for any name."""
    server = ReportServer(reactor, SNIContextFactory(CA))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """A CA bundle holding the test root."""
    return str(CA.write_bundle(tmp_path))


async def resolve_loopback(host: str) -> list[str]:
    """Every name is 127.0.0.1."""
    return ["127.0.0.1"]


async def post(reactor: Any, server: ReportServer, ca_file: str, **kwargs: Any) -> int:
    """POST the test report to C{server} at https://HOST:<port>/tlsrpt."""
    kwargs.setdefault("url", f"https://{HOST}:{server.port}{PATH}")
    kwargs.setdefault("timeout", 10.0)
    return await post_https(
        reactor, body=REPORT_GZ, resolve=resolve_loopback, ca_file=ca_file, **kwargs
    )


@pytest.mark.parametrize("code", [200, 201, 204])
@pytest_twisted.ensureDeferred
async def test_post_success(
    reactor: Any, https_server: ReportServer, ca_file: str, code: int
) -> None:
    """A 2xx answer is success; the server saw one POST of the gzip body with our headers."""
    https_server.set(HOST, status(code, b"thanks\n"), path=PATH)
    assert await post(reactor, https_server, ca_file) == code
    [request] = https_server.requests
    assert (request.method, request.path, request.host) == ("POST", PATH, HOST)
    assert request.header("content-type") == "application/tlsrpt+gzip"
    assert request.header("user-agent") == f"postfix-mtasts/{__version__}"
    assert https_server.bodies == [REPORT_GZ]
    assert gzip.decompress(https_server.bodies[0]).startswith(b'{"organization-name"')


@pytest.mark.parametrize(
    ("reply", "permanent"),
    [
        (status(500), False),
        (status(503), False),
        (status(429), False),
        (status(404), False),
        (status(413), False),
        (redirect(f"https://{HOST}/elsewhere"), False),
        (redirect(f"https://{HOST}/elsewhere", 307), False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_post_failure_status(
    reactor: Any,
    https_server: ReportServer,
    ca_file: str,
    reply: Reply,
    permanent: bool,
) -> None:
    """Any answer but 2xx is a temporary failure, to be retried: 4xx, 5xx and redirects."""
    https_server.set(HOST, reply, path=PATH)
    with pytest.raises(DeliveryError) as caught:
        await post(reactor, https_server, ca_file)
    assert caught.value.permanent is permanent
    redirected = ": redirect not followed" if 300 <= reply.status < 400 else ""
    assert caught.value.detail == f"HTTP {reply.status}{redirected}"
    assert len(https_server.requests) == 1  # a redirect is not followed


@pytest_twisted.ensureDeferred
async def test_post_deadline(reactor: Any, https_server: ReportServer, ca_file: str) -> None:
    """A server that never answers is given up at the deadline, a temporary failure."""
    https_server.silent.add(PATH)
    with pytest.raises(DeliveryError) as caught:
        await post(reactor, https_server, ca_file, timeout=0.3)
    assert not caught.value.permanent
    assert "deadline" in caught.value.detail
    assert https_server.bodies == [REPORT_GZ]
    await https_server.wait_closed()
    assert https_server.open_connections == 0


@pytest.mark.parametrize(
    ("verify", "expected"),
    [(True, "certificate verify failed"), (False, None)],
)
@pytest_twisted.ensureDeferred
async def test_post_untrusted_certificate(
    reactor: Any, ca_file: str, verify: bool, expected: str | None
) -> None:
    """An untrusted certificate fails (temporarily) when verifying and is accepted when not."""
    server = ReportServer(reactor, SNIContextFactory(CA, {HOST: untrusted_leaf([HOST])}))
    server.set(HOST, status(200), path=PATH)
    await server.start()
    try:
        if expected is None:
            assert await post(reactor, server, ca_file, verify=verify) == 200
            assert server.bodies == [REPORT_GZ]
        else:
            with pytest.raises(DeliveryError) as caught:
                await post(reactor, server, ca_file, verify=verify)
            assert not caught.value.permanent
            assert expected in caught.value.detail
            assert server.requests == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_post_connection_refused(reactor: Any, ca_file: str) -> None:
    """No server listening is a temporary failure."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(DeliveryError) as caught:
        await post_https(
            reactor,
            url=f"https://{HOST}:{number}{PATH}",
            body=REPORT_GZ,
            resolve=resolve_loopback,
            ca_file=ca_file,
        )
    assert not caught.value.permanent
    assert "refused" in caught.value.detail


@pytest.mark.parametrize(
    "url", ["http://example.net/tlsrpt", "https:///x", "https://ex ample/", "https://a_b.example/"]
)
@pytest_twisted.ensureDeferred
async def test_post_bad_url(reactor: Any, url: str) -> None:
    """A URL that is not https with a host is a permanent failure, without any connection."""
    with pytest.raises(DeliveryError) as caught:
        await post_https(reactor, url=url, body=REPORT_GZ, resolve=resolve_loopback)
    assert caught.value.permanent


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_post_without_resolver(reactor: Any, https_server: ReportServer, host: str) -> None:
    """Without C{resolve}, an address literal is used as is and a name goes to the reactor."""
    https_server.set(host, status(200), path=PATH)
    url = f"https://{host}:{https_server.port}{PATH}"
    assert await post_https(reactor, url=url, body=REPORT_GZ, verify=False, timeout=10.0) == 200
    assert https_server.bodies == [REPORT_GZ]
