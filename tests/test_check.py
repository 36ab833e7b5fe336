"""``postfix-mtasts check``: a domain's own MTA-STS and TLS-RPT setup, audited on loopback.

Each network test builds the whole inbound setup of ``example.test``: the project's DNS test
server, the HTTPS policy host (``tests.httpsserver``) with certificates from ``tests.pki``, and
two real ESMTP receivers with STARTTLS (``tests.smtpserver``) at 127.0.0.2 and 127.0.0.3 on
one ephemeral port; then it breaks one thing and checks that exactly that is reported.
"""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionAborted
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail import smtp
from twisted.python.failure import Failure

from postfix_mtasts.check import (
    CheckResult,
    Failed,
    Finding,
    MXObservation,
    Observations,
    _probe_each,
    assess,
    check_domain,
    exit_code,
    main,
    normalise_domain,
    render_json,
    render_text,
)
from postfix_mtasts.config import parse_config
from postfix_mtasts.mtasts.fetch import STS_FETCH_ERROR, FetchError
from postfix_mtasts.probe import HTTPSProbe, Prober, SMTPProbe, TLSFacts
from tests.daemon import run
from tests.dnsserver import DNSTestServer
from tests.httpsserver import PolicyServer, Reply, policy, redirect
from tests.pki import (
    SNIContextFactory,
    TestCA,
    expired_leaf,
    tls11_available,
    untrusted_leaf,
    wrong_name_leaf,
)
from tests.smtpserver import SMTPReceiver, TLSKind, receiver_tls, smtp_receiver_factory

__all__ = ["smtp_receiver_factory"]  # the fixture, imported so that tests here can use it

CA = TestCA("Check Test Root")
DOMAIN = "example.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
MX1, MX2 = f"mx1.{DOMAIN}", f"mx2.{DOMAIN}"
ADDRESSES = {MX1: "127.0.0.2", MX2: "127.0.0.3"}
TXT_ID = "20240101"
NOW = datetime.datetime(2030, 5, 1, 12, 0, tzinfo=datetime.UTC)


def policy_body(
    mode: str = "testing", mx: Sequence[str] = (MX1, MX2), max_age: int = 604800
) -> bytes:
    """A policy file with these fields."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Site:
    """``example.test`` on loopback: DNS, policy host, two MX receivers, all healthy."""

    reactor: Any
    dns: DNSTestServer
    sni: SNIContextFactory
    https: PolicyServer
    mx: dict[str, SMTPReceiver]
    smtp_port: int
    ca_file: str

    def reset_zone(self) -> None:
        """The zone of a domain in testing, with TLS-RPT."""
        self.dns.update(
            {
                f"_mta-sts.{DOMAIN}": [("TXT", f"v=STSv1; id={TXT_ID}")],
                POLICY_HOST: [("A", "127.0.0.1")],
                DOMAIN: [("MX", (10, MX1)), ("MX", (20, MX2))],
                MX1: [("A", ADDRESSES[MX1])],
                MX2: [("A", ADDRESSES[MX2])],
                f"_smtp._tls.{DOMAIN}": [("TXT", f"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}")],
            }
        )

    def serve_policy(self, body: bytes = b"", reply: Reply | None = None) -> None:
        """Answer the policy request with ``reply``, or a 200 ``text/plain`` ``body``."""
        self.https.set(POLICY_HOST, reply or policy(body or policy_body()))

    def mx_tls(self, host: str, kind: TLSKind | None) -> None:
        """Give MX ``host`` a certificate of ``kind``; None: no STARTTLS at all."""
        self.mx[host].tls = receiver_tls(CA, host, kind) if kind else None

    async def check(self, **options: Any) -> CheckResult:
        """Run the check of ``example.test`` against this site."""
        return await check_domain(
            self.reactor,
            DOMAIN,
            nameservers=[self.dns.address],
            ca_file=self.ca_file,
            timeout=5.0,
            dns_timeout=2.0,
            smtp_port=self.smtp_port,
            https_port=self.https.port,
            helo="client.test",
            **options,
        )


async def _start_receivers(reactor: Any) -> tuple[dict[str, SMTPReceiver], int]:
    """Both MX receivers on one ephemeral port (another try if the port is taken there)."""
    for _ in range(10):
        receivers = {
            host: SMTPReceiver(reactor, hostname=host, tls=receiver_tls(CA, host))
            for host in (MX1, MX2)
        }
        port = await receivers[MX1].start(ADDRESSES[MX1])
        try:
            await receivers[MX2].start(ADDRESSES[MX2], port)
        except CannotListenError:
            await receivers[MX1].stop()
            continue
        return receivers, port
    raise RuntimeError("no port free on both MX addresses")


@pytest_twisted.async_yield_fixture()
async def site(reactor: Any, dns_server: DNSTestServer, tmp_path: Path) -> AsyncIterator[Site]:
    """A healthy ``example.test`` in mode testing; tests break one part of it."""
    sni = SNIContextFactory(CA)
    https = PolicyServer(reactor, sni)
    await https.start()
    receivers, smtp_port = await _start_receivers(reactor)
    built = Site(
        reactor, dns_server, sni, https, receivers, smtp_port, str(CA.write_bundle(tmp_path))
    )
    built.reset_zone()
    built.serve_policy()
    yield built
    for receiver in receivers.values():
        await receiver.stop()
    await https.stop()


def findings(result: CheckResult, check: str, subject: str | None = None) -> list[Finding]:
    """The findings of ``check`` (on ``subject`` if given)."""
    return [f for f in result.findings if f.check == check and subject in (None, f.subject)]


def statuses(result: CheckResult, check: str, subject: str | None = None) -> list[str]:
    """The statuses of the findings of ``check`` (on ``subject`` if given)."""
    return [f.status for f in findings(result, check, subject)]


def problems(result: CheckResult) -> list[tuple[str, str]]:
    """``(check, subject)`` of every problem."""
    return [(f.check, f.subject) for f in result.findings if f.status == "problem"]


# --- The healthy domain and the verdicts ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_clean_testing_domain_is_ready_for_enforce(site: Site) -> None:
    """A domain in testing with everything right passes every check and is ready for enforce."""
    result = await site.check(now=datetime.datetime.now(datetime.UTC))
    assert problems(result) == []
    assert result.count("warning") == 0
    assert (result.mode, result.sts_id) == ("testing", TXT_ID)
    assert result.verdict.code == "ready-for-enforce"
    assert "change the id" in result.verdict.message
    assert exit_code(result) == 0
    for host in (MX1, MX2):
        assert statuses(result, "mx-policy", host) == ["ok"]
        assert statuses(result, "mx-starttls", host) == ["ok"]
        assert statuses(result, "mx-certificate-name", host) == ["ok"]
        assert statuses(result, "mx-certificate-expiry", host) == ["ok"]
        # The probe said EHLO with the given name and ended with QUIT over TLS.
        (session,) = site.mx[host].sessions
        assert (session.helo, session.tls_version, session.quit) == ("client.test", "TLSv1.3", True)
        assert site.mx[host].messages == []
    for check in ("policy-reachable", "policy-certificate", "policy-http", "policy-syntax"):
        assert statuses(result, check) == ["ok"]
    assert statuses(result, "tlsrpt-record") == ["ok"]
    text = render_text(result)
    assert "✘" not in text
    assert f"✔ one valid v=STSv1 record, id {TXT_ID}" in text
    assert "ready for enforce" in text


@pytest_twisted.ensureDeferred
async def test_enforce_with_a_problem_puts_mail_at_risk(site: Site) -> None:
    """An enforced policy with a broken MX is a problem and the verdict says mail is at risk."""
    site.serve_policy(policy_body(mode="enforce"))
    site.mx_tls(MX2, "expired")
    result = await site.check()
    assert problems(result) == [("mx-certificate-expiry", MX2)]
    assert result.verdict.code == "at-risk"
    assert "at risk" in result.verdict.message
    assert exit_code(result) == 1
    assert "✘ certificate expired" in render_text(result)


@pytest_twisted.ensureDeferred
async def test_clean_enforced_domain(site: Site) -> None:
    """An enforced policy with everything right gets the enforced verdict and exit code 0."""
    site.serve_policy(policy_body(mode="enforce", max_age=1209600))
    result = await site.check()
    assert problems(result) == []
    assert (result.verdict.code, exit_code(result)) == ("enforced", 0)


# --- The _mta-sts record --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "shown"),
    [
        ([], "no v=STSv1 TXT record"),
        ([("TXT", "v=STSv1; id=1"), ("TXT", "v=STSv1; id=2")], "2 v=STSv1 records"),
        ([("TXT", "v=STSv1; id=not-an-id")], "is not 1-32 letters or digits"),
        ([("TXT", "v=STSv1;")], "record has no fields"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_sts_record_problems(site: Site, records: list[Any], shown: str) -> None:
    """A missing, doubled or malformed _mta-sts record is a problem: MTA-STS is not in effect."""
    site.dns.set(f"_mta-sts.{DOMAIN}", records)
    result = await site.check()
    (finding,) = findings(result, "sts-record")
    assert finding.status == "problem"
    assert shown in finding.message
    assert "v=STSv1; id=" in finding.fix
    assert problems(result) == [("sts-record", f"_mta-sts.{DOMAIN}")]
    assert (result.sts_id, result.verdict.code, exit_code(result)) == (None, "not-published", 1)


# --- The policy host and the policy ---------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "shown", "fix"),
    [
        (None, "no A or AAAA record", "publish A/AAAA records"),
        ([("A", "127.0.0.9")], "connection refused", "serve HTTPS on port 443"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_policy_host_unreachable(
    site: Site, records: list[Any] | None, shown: str, fix: str
) -> None:
    """A policy host without an address, or refusing connections, is one problem."""
    site.dns.set(POLICY_HOST, records)
    result = await site.check()
    (finding,) = findings(result, "policy-reachable")
    assert finding.status == "problem"
    assert shown in finding.message
    assert fix in finding.fix
    assert statuses(result, "policy-fetch") == ["info"]  # what senders see, not counted twice
    assert [p[0] for p in problems(result)] == ["policy-reachable"]
    assert result.verdict.code == "policy-unusable"
    assert exit_code(result) == 1


@pytest.mark.parametrize(
    ("pems", "check", "shown"),
    [
        (wrong_name_leaf(CA), "policy-certificate-name", f"not valid for {POLICY_HOST}"),
        (untrusted_leaf([POLICY_HOST]), "policy-certificate", "not trusted"),
        (expired_leaf(CA, [POLICY_HOST]), "policy-certificate-expiry", "expired 1 day(s) ago"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_policy_certificate_problems(
    site: Site, pems: tuple[bytes, bytes], check: str, shown: str
) -> None:
    """A policy host certificate for another name, from an unknown CA or expired is a problem."""
    site.sni.set_certificate(POLICY_HOST, *pems)
    result = await site.check()
    (finding,) = findings(result, check)
    assert finding.status == "problem"
    assert shown in finding.message
    assert finding.fix
    assert [p for p in problems(result) if p[0].startswith("policy")] == [(check, finding.subject)]
    (fetch,) = findings(result, "policy-fetch")
    assert "sts-webpki-invalid" in fetch.message
    assert result.verdict.code == "policy-unusable"


@pytest_twisted.ensureDeferred
async def test_policy_certificate_expiring_soon(site: Site) -> None:
    """A policy host certificate that expires within two weeks is a warning, not a problem."""
    now = datetime.datetime.now(datetime.UTC)
    site.sni.set_certificate(
        POLICY_HOST,
        *CA.issue([POLICY_HOST], not_after=now + datetime.timedelta(days=3, hours=12)),
    )
    result = await site.check(now=now)
    (finding,) = findings(result, "policy-certificate-expiry")
    assert (finding.status, "expires in 3 day(s)" in finding.message) == ("warning", True)
    assert problems(result) == []
    assert result.verdict.code == "ready-for-enforce"


@pytest_twisted.ensureDeferred
async def test_policy_redirect(site: Site) -> None:
    """A redirect is a problem naming its target; senders never follow it."""
    site.serve_policy(reply=redirect("https://policies.example.net/example.test.txt"))
    result = await site.check()
    (finding,) = findings(result, "policy-redirect")
    assert finding.status == "problem"
    assert "HTTP 301 redirects to https://policies.example.net/example.test.txt" in finding.message
    assert "redirect" in findings(result, "policy-fetch")[0].message
    assert [r.host for r in site.https.requests] == [POLICY_HOST, POLICY_HOST]  # probe, fetch


@pytest.mark.parametrize(
    ("reply", "check", "shown"),
    [
        (policy(content_type="text/html"), "policy-content-type", "'text/html'"),
        (policy(content_type=None), "policy-content-type", "no content type"),
        (Reply(status=404, body=b"not here\n"), "policy-http", "HTTP 404 instead of 200"),
        (policy(policy_body() + b"#" * 70000), "policy-size", "70"),
        (policy(b"version: STSv1\nmode: enforce\nmax_age: 86400\n"), "policy-syntax", "without mx"),
        (policy(b"version: STSv1\nmode: Enforce\n"), "policy-syntax", "not enforce, testing"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_policy_response_problems(site: Site, reply: Reply, check: str, shown: str) -> None:
    """A wrong content type or status, an oversized or invalid policy is one named problem."""
    site.serve_policy(reply=reply)
    result = await site.check()
    found = [f for f in findings(result, check) if f.status == "problem"]
    assert len(found) == 1
    assert shown in found[0].message
    assert found[0].fix
    assert [p[0] for p in problems(result)] == [check]
    assert result.verdict.code == "policy-unusable"


@pytest.mark.parametrize(
    ("mode", "max_age", "status", "shown"),
    [
        ("enforce", 86400, "warning", "short for enforce"),
        ("enforce", 3600, "warning", "short for enforce"),
        ("enforce", 604800, "ok", "sensible for mode enforce"),
        ("testing", 86400, "ok", "sensible for mode testing"),
        ("testing", 31557600, "info", "fine for testing"),
        ("enforce", 99999999, "warning", "over the maximum"),
    ],
)
def test_max_age_for_mode(mode: str, max_age: int, status: str, shown: str) -> None:
    """max_age is judged for its mode: enforce wants weeks; testing can be anything."""
    result = assess(observed(policy_body(mode=mode, max_age=max_age)), NOW)
    (finding,) = findings(result, "policy-max-age")
    assert (finding.status, shown in finding.message) == (status, True)


@pytest_twisted.ensureDeferred
async def test_mode_none(site: Site) -> None:
    """Mode none is a warning and the verdict says MTA-STS is switched off."""
    site.serve_policy(policy_body(mode="none", mx=()))
    result = await site.check()
    assert statuses(result, "policy-mode") == ["warning"]
    assert result.verdict.code == "disabled"
    assert statuses(result, "mx-policy") == []  # mode none: no MX is held to the policy


# --- MX records against the policy ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mx_not_covered_by_policy(site: Site) -> None:
    """An MX host no policy pattern matches is a problem on that host."""
    site.serve_policy(policy_body(mx=[MX1]))
    result = await site.check()
    assert problems(result) == [("mx-policy", MX2)]
    (finding,) = findings(result, "mx-policy", MX2)
    assert f"mx: {MX2}" in finding.fix
    assert statuses(result, "mx-policy", MX1) == ["ok"]
    assert result.verdict.code == "testing-with-problems"


@pytest_twisted.ensureDeferred
async def test_policy_pattern_matching_no_mx(site: Site) -> None:
    """A policy pattern that matches no MX host is a warning; a wildcard covers both MXes."""
    site.serve_policy(policy_body(mx=[f"*.{DOMAIN}", "old-mx.example.net"]))
    result = await site.check()
    (finding,) = findings(result, "mx-pattern")
    assert (finding.status, "old-mx.example.net" in finding.message) == ("warning", True)
    assert [f.message for f in findings(result, "mx-policy")] == [
        f"matched by policy pattern *.{DOMAIN}"
    ] * 2
    assert problems(result) == []


@pytest.mark.parametrize(
    ("records", "status", "shown"),
    [
        ([], "problem", "no MX records"),
        ([("MX", (0, "."))], "warning", "null MX"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_missing_or_null_mx(site: Site, records: list[Any], status: str, shown: str) -> None:
    """No MX records is a problem; a null MX a warning; either way no MX is probed."""
    site.dns.set(DOMAIN, records)
    result = await site.check()
    (finding,) = findings(result, "mx-records")
    assert (finding.status, shown in finding.message) == (status, True)
    assert all(not r.sessions for r in site.mx.values())


# --- Each MX over SMTP ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "check", "shown"),
    [
        (None, "mx-starttls", "does not offer STARTTLS"),
        ("untrusted", "mx-certificate", "not trusted"),
        ("wrong-name", "mx-certificate-name", f"not valid for {MX2}"),
        ("expired", "mx-certificate-expiry", "expired 1 day(s) ago"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_mx_tls_problems(site: Site, kind: TLSKind | None, check: str, shown: str) -> None:
    """No STARTTLS, an untrusted, misnamed or expired MX certificate is a problem on that MX."""
    site.mx_tls(MX2, kind)
    result = await site.check()
    (finding,) = findings(result, check, MX2)
    assert finding.status == "problem"
    assert shown in finding.message
    assert finding.fix
    assert problems(result) == [(check, MX2)]
    assert statuses(result, check, MX1) == ["ok"]


@pytest_twisted.ensureDeferred
async def test_mx_starttls_refused(site: Site) -> None:
    """An MX that offers STARTTLS but refuses it is a problem quoting its reply."""
    site.mx[MX1].refuse_starttls = True
    result = await site.check()
    (finding,) = findings(result, "mx-starttls", MX1)
    assert finding.status == "problem"
    assert "454 4.7.0" in finding.message


@pytest.mark.skipif(not tls11_available(), reason="this OpenSSL cannot negotiate TLS 1.1")
@pytest_twisted.ensureDeferred
async def test_mx_old_tls(site: Site) -> None:
    """An MX that speaks only TLS 1.1 is a problem: senders require TLS 1.2."""
    site.mx_tls(MX1, "tls11")
    result = await site.check()
    (finding,) = findings(result, "mx-tls", MX1)
    assert finding.status == "problem"
    assert "TLSv1.1 negotiated" in finding.message
    assert problems(result) == [("mx-tls", MX1)]


@pytest_twisted.ensureDeferred
async def test_mx_certificate_expiring_soon(site: Site) -> None:
    """An MX certificate expiring within two weeks is a warning with a fix."""
    site.mx_tls(MX1, "expiring")
    result = await site.check(now=datetime.datetime.now(datetime.UTC))
    (finding,) = findings(result, "mx-certificate-expiry", MX1)
    assert finding.status == "warning"
    assert "expires in 5 day(s)" in finding.message
    assert "⚠ certificate expires in 5 day(s)" in render_text(result)
    assert problems(result) == []


@pytest_twisted.ensureDeferred
async def test_mx_unreachable(site: Site) -> None:
    """An MX whose address refuses connections is a problem; the other MX is still checked."""
    await site.mx[MX2].stop()
    result = await site.check()
    (finding,) = findings(result, "mx-connect", MX2)
    assert finding.status == "problem"
    assert "connection refused" in finding.message
    assert problems(result) == [("mx-connect", MX2)]
    assert statuses(result, "mx-starttls", MX1) == ["ok"]


@pytest_twisted.ensureDeferred
async def test_mx_second_address_used(site: Site) -> None:
    """An MX with a dead first address is probed at the next one; the dead one is a warning."""
    site.dns.set(MX1, [("A", "127.0.0.9"), ("A", ADDRESSES[MX1])])
    result = await site.check()
    ok, warning = findings(result, "mx-connect", MX1)
    assert (ok.status, ok.message) == ("ok", f"reachable at {ADDRESSES[MX1]}")
    assert warning.status == "warning"
    assert "127.0.0.9 unreachable" in warning.message
    assert statuses(result, "mx-starttls", MX1) == ["ok"]
    assert problems(result) == []


@pytest_twisted.ensureDeferred
async def test_every_mx_address_is_judged(site: Site, smtp_receiver_factory: Any) -> None:
    """An MX whose second address serves a certificate for another name has that problem,
    said of that address; what holds at both addresses is said once."""
    bad = "127.0.0.4"
    await smtp_receiver_factory(
        bad, site.smtp_port, hostname=MX1, tls=receiver_tls(CA, MX1, "wrong-name")
    )
    site.dns.set(MX1, [("A", ADDRESSES[MX1]), ("A", bad)])
    result = await site.check()
    assert problems(result) == [("mx-certificate-name", MX1)]
    (finding,) = [f for f in findings(result, "mx-certificate-name", MX1) if f.status != "ok"]
    assert finding.message.startswith(f"at {bad}: certificate not valid for {MX1}")
    ok = [f.message for f in findings(result, "mx-certificate-name", MX1) if f.status == "ok"]
    assert ok == [f"at {ADDRESSES[MX1]}: certificate valid for {MX1}"]
    assert [f.message for f in findings(result, "mx-starttls", MX1)] == [
        "STARTTLS offered and accepted"
    ]
    assert [f.message for f in findings(result, "mx-connect", MX1)] == [
        f"reachable at {ADDRESSES[MX1]}, {bad}"
    ]
    assert result.verdict.code == "testing-with-problems"


@pytest_twisted.ensureDeferred
async def test_mx_host_without_address(site: Site) -> None:
    """An MX host that does not resolve is a problem."""
    site.dns.set(MX2, None)
    result = await site.check()
    assert problems(result) == [("mx-address", MX2)]


# --- The _smtp._tls record ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], [("tlsrpt-record", "warning")]),
        (
            ["v=TLSRPTv1; rua=mailto:a@example.test", "v=TLSRPTv1; rua=mailto:b@example.test"],
            [("tlsrpt-record", "problem")],
        ),
        (["v=TLSRPTv1; ruf=mailto:a@example.test"], [("tlsrpt-record", "problem")]),
        (["v=TLSRPTv1; rua=tlsrpt@example.test"], [("tlsrpt-record", "problem")]),
        (
            ["v=TLSRPTv1; rua=mailto:tlsrpt@example.test,ftp://example.test/x"],
            [("tlsrpt-record", "ok"), ("tlsrpt-rua", "ok"), ("tlsrpt-rua", "problem")],
        ),
        (
            ["v=TLSRPTv1;rua=https://reports.example.test/v1,mailto:tls@example.test"],
            [("tlsrpt-record", "ok"), ("tlsrpt-rua", "ok"), ("tlsrpt-rua", "ok")],
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tlsrpt_record(
    site: Site, records: list[str], expected: list[tuple[str, str]]
) -> None:
    """The _smtp._tls record: missing is a warning; doubled, broken or an unusable rua a problem."""
    site.dns.set(f"_smtp._tls.{DOMAIN}", [("TXT", r) for r in records])
    result = await site.check()
    got = [(f.check, f.status) for f in result.findings if f.check.startswith("tlsrpt")]
    assert got == expected
    assert exit_code(result) == int(any(s == "problem" for _, s in expected))


# --- Output, exit codes, usage --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_json_output(site: Site) -> None:
    """--json prints one object: domain, mode, id, verdict, counts and every finding."""
    site.mx_tls(MX2, None)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    result = await site.check(now=now)
    document = json.loads(render_json(result))
    assert set(document) == {
        "domain",
        "checked_at",
        "sts_id",
        "mode",
        "verdict",
        "counts",
        "findings",
    }
    assert document["domain"] == DOMAIN
    assert document["checked_at"] == now.isoformat().replace("+00:00", "Z")
    assert (document["sts_id"], document["mode"]) == (TXT_ID, "testing")
    assert document["verdict"]["code"] == "testing-with-problems"
    assert document["counts"]["problem"] == 1
    assert sum(document["counts"].values()) == len(document["findings"])
    for item in document["findings"]:
        assert set(item) == {"check", "subject", "status", "message", "fix"}
        assert item["status"] in {"ok", "problem", "warning", "info"}
        assert (item["fix"] is not None) or item["status"] != "problem"
    starttls = [
        (f["subject"], f["status"]) for f in document["findings"] if f["check"] == "mx-starttls"
    ]
    assert starttls == [(MX1, "ok"), (MX2, "problem")]


@pytest_twisted.ensureDeferred
async def test_main_prints_and_returns_exit_code(site: Site, tmp_path: Path) -> None:
    """main() reads the configuration, prints the checklist or JSON and returns 0 or 1."""
    config = parse_config(
        f'[dns]\nnameservers = ["127.0.0.1:{site.dns.port}"]\n'
        f'[https]\nca_file = "{site.ca_file}"\n',
        source="test.toml",
    )
    # main() uses the standard ports: no policy host with a certificate listens on 443 here.
    out = io.StringIO()
    code = await main(site.reactor, config, "Example.TEST.", True, out, err=io.StringIO())
    document = json.loads(out.getvalue())
    assert document["domain"] == DOMAIN
    assert document["sts_id"] == TXT_ID
    assert code == 1
    assert document["counts"]["problem"] >= 1
    text = io.StringIO()
    assert await main(site.reactor, config, DOMAIN, False, text, err=io.StringIO()) == 1
    assert text.getvalue().startswith(f"MTA-STS and TLS-RPT check of {DOMAIN} (")


@pytest_twisted.ensureDeferred
async def test_check_command(site: Site, tmp_path: Path) -> None:
    """`postfix-mtasts check --json` runs the same audit as a program: JSON out, exit 1."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{site.dns.port}"]\n'
        f'[https]\nca_file = "{site.ca_file}"\ntimeout = 3\n'
    )
    out, err, code = await run(site.reactor, ["check", "-c", str(config), "--json", DOMAIN])
    assert code == 1, err
    document = json.loads(out)
    assert document["domain"] == DOMAIN and document["sts_id"] == TXT_ID
    usage = await run(site.reactor, ["check", "-c", str(config), "not a domain"])
    assert usage[2] == 2 and usage[1].count("\n") == 1 and "not a domain" in usage[1]


@pytest.mark.parametrize("domain", ["", "exa mple.test", "localhost", "-bad-.test", "a..b"])
@pytest_twisted.ensureDeferred
async def test_bad_domain_is_a_usage_error(reactor: Any, domain: str) -> None:
    """A bad domain gives exit code 2 and one line on standard error, with no lookup."""
    out, err = io.StringIO(), io.StringIO()
    config = parse_config('[dns]\nnameservers = ["127.0.0.1:9"]\n', source="test.toml")
    code = await main(reactor, config, domain, False, out, err=err)
    assert code == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("postfix-mtasts: check: not a domain name: ")
    assert err.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    ("content", "shown"), [(None, "No such file or directory"), (b"not a PEM file\n", "PEM")]
)
@pytest_twisted.ensureDeferred
async def test_unusable_ca_file_is_a_usage_error(
    reactor: Any, tmp_path: Path, content: bytes | None, shown: str
) -> None:
    """An [https] ca_file that is missing or holds no certificate gives exit code 2 naming it."""
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    config = parse_config(f'[https]\nca_file = "{path}"\n', source="test.toml")
    out, err = io.StringIO(), io.StringIO()
    code = await main(reactor, config, DOMAIN, False, out, err=err)
    assert code == 2
    assert out.getvalue() == ""
    line = err.getvalue()
    assert line.startswith(f"postfix-mtasts: test.toml: [https] ca_file: {path}: ")
    assert shown in line
    assert line.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.test", "example.test"),
        ("Example.TEST.", "example.test"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),
    ],
)
def test_normalise_domain(text: str, expected: str) -> None:
    """Domains become lower-case A-labels (IDNA2008) without the trailing dot."""
    assert normalise_domain(text) == expected


@pytest.mark.parametrize(
    "text", ["", ".", "com", "a_b.test", "xn--zz.test", "1.2.3.4", "a" * 64 + ".test"]
)
def test_normalise_domain_refuses(text: str) -> None:
    """Anything but a fully qualified domain name is a ValueError with a one-line reason."""
    with pytest.raises(ValueError, match=r"^not a domain name: ") as caught:
        normalise_domain(text)
    assert "\n" not in str(caught.value)


# --- Pure assessment ------------------------------------------------------------------------


def tls_facts(host: str, **changes: Any) -> TLSFacts:
    """A TLS 1.3 handshake showing a certificate for ``host`` valid around ``NOW``."""
    cert_pem, _ = CA.issue(
        [host],
        not_before=NOW - datetime.timedelta(days=10),
        not_after=NOW + datetime.timedelta(days=80),
    )
    leaf = x509.load_pem_x509_certificate(cert_pem)
    facts = TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", (leaf,), "", (leaf, CA.cert))
    return replace(facts, **changes)


def observed(body: bytes | FetchError, **changes: Any) -> Observations:
    """Observations of a domain whose policy host answered ``body`` and has nothing else wrong:
    records valid, a healthy policy host, a null MX (so no MX probed)."""
    probe = HTTPSProbe(
        "127.0.0.1",
        connected=True,
        tls=tls_facts(POLICY_HOST),
        status=200,
        headers=[("content-type", "text/plain")],
    )
    obs = Observations(
        domain=DOMAIN,
        sts_records=(b"v=STSv1; id=1",),
        policy=body,
        policy_addresses=("127.0.0.1",),
        policy_probes=(probe,),
        mx_records=((0, ""),),
        mx=(),
        tlsrpt_records=(b"v=TLSRPTv1; rua=mailto:tlsrpt@example.test",),
    )
    return replace(obs, **changes)


BROKEN_RUA = (b"v=TLSRPTv1; rua=mailto:tlsrpt@example.test,ftp://example.test/",)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"sts_records": Failed("SERVFAIL from 127.0.0.1:53")}, "not-published"),
        ({"sts_records": ()}, "not-published"),
        ({"policy": FetchError(STS_FETCH_ERROR, "HTTP 404")}, "policy-unusable"),
        ({"policy": b"version: STSv1\n"}, "policy-unusable"),
        ({"policy": policy_body(mode="none", mx=())}, "disabled"),
        ({"policy": policy_body(mode="testing")}, "ready-for-enforce"),
        ({"tlsrpt_records": BROKEN_RUA}, "testing-with-problems"),
        ({"policy": policy_body(mode="enforce")}, "enforced"),
        ({"policy": policy_body(mode="enforce"), "tlsrpt_records": BROKEN_RUA}, "at-risk"),
    ],
)
def test_verdicts(changes: dict[str, Any], code: str) -> None:
    """The verdict follows the record, the policy's mode and whether problems were found."""
    result = assess(observed(policy_body(), **changes), NOW)
    assert result.verdict.code == code
    assert exit_code(result) == int(result.count("problem") > 0)


def test_ready_verdict_suggests_a_new_id() -> None:
    """The ready-for-enforce verdict reminds to change the TXT id and suggests one from now."""
    result = assess(observed(policy_body()), NOW)
    assert result.verdict.code == "ready-for-enforce"
    assert "'mode: enforce'" in result.verdict.message
    assert f"_mta-sts.{DOMAIN} TXT record (e.g. to id=20300501120000)" in result.verdict.message


@pytest.mark.parametrize(
    ("changes", "check", "status", "shown"),
    [
        ({"version": "TLSv1"}, "policy-tls", "problem", "TLSv1 negotiated"),
        ({"trust_error": "self-signed certificate"}, "policy-certificate", "problem", "self"),
        ({"chain": ()}, "policy-certificate", "problem", "no certificate"),
    ],
)
def test_policy_host_tls_facts(
    changes: dict[str, Any], check: str, status: str, shown: str
) -> None:
    """An old protocol, an untrusted chain or no certificate on the policy host is a problem."""
    probe = replace(observed(b"").policy_probes[0], tls=tls_facts(POLICY_HOST, **changes))
    result = assess(observed(policy_body(), policy_probes=(probe,)), NOW)
    (finding,) = findings(result, check)
    assert (finding.status, shown in finding.message) == (status, True)


def test_lookup_failures_are_problems() -> None:
    """A DNS lookup without an answer is a problem naming the failure, never a crash."""
    failed = Failed("timeout from 127.0.0.1:53")
    result = assess(
        observed(policy_body(), sts_records=failed, mx_records=failed, tlsrpt_records=failed),
        NOW,
    )
    for check in ("sts-record", "mx-records", "tlsrpt-record"):
        (finding,) = findings(result, check)
        assert finding.status == "problem"
        assert "timeout from 127.0.0.1:53" in finding.message


def test_mx_lookup_results_render_per_host() -> None:
    """Findings are grouped under their subject in the text, each problem with its fix."""
    mx = MXObservation(10, MX1, ("127.0.0.2",), (SMTPProbe("127.0.0.2", connected=True),))
    result = assess(observed(policy_body(mx=[MX1]), mx_records=((10, MX1),), mx=(mx,)), NOW)
    text = render_text(result)
    block = text.split(f"\n{MX1}\n", 1)[1].split("\n\n", 1)[0]
    assert block.splitlines() == [
        f"  ✔ matched by policy pattern {MX1}",
        "  ✔ reachable at 127.0.0.2",
        "  ✘ does not offer STARTTLS",
        "      fix: enable STARTTLS (Postfix: smtpd_tls_security_level = may, "
        "smtpd_tls_chain_files)",
    ]
    assert text.startswith(f"MTA-STS and TLS-RPT check of {DOMAIN} (2030-05-01T12:00:00Z)\n")
    assert text.endswith(f"Verdict: {result.verdict.message}\n")


# --- The SMTP receiver fixture --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_receiver_records_a_message_over_starttls(
    reactor: Any, smtp_receiver_factory: Any
) -> None:
    """The receiver fixture takes a message over STARTTLS and records envelope, data and TLS."""
    receiver = await smtp_receiver_factory("127.0.0.2", hostname=MX1, tls=receiver_tls(CA, MX1))
    sent: Deferred[Any] = Deferred()
    factory = smtp.ESMTPSenderFactory(  # type: ignore[no-untyped-call]
        None,
        None,
        "sender@client.test",
        ["a@example.test", "b@example.test"],
        io.BytesIO(b"Subject: hello\n\nfirst line\n.leading dot\n"),
        sent,
        contextFactory=optionsForClientTLS(MX1, trustRoot=Certificate.loadPEM(CA.cert_pem)),
        retries=0,
        requireAuthentication=False,
        requireTransportSecurity=True,
    )
    factory.domain = b"client.test"
    reactor.connectTCP("127.0.0.2", receiver.port, factory)
    await sent
    await receiver.wait_for(1)
    (message,) = receiver.messages
    assert (message.mail_from, message.recipients) == (
        "sender@client.test",
        ["a@example.test", "b@example.test"],
    )
    assert message.data == b"Subject: hello\r\n\r\nfirst line\r\n.leading dot\r\n"
    assert (message.helo, message.tls_version) == ("client.test", "TLSv1.3")
    assert receiver.sessions[0].tls_version == "TLSv1.3"


# --- Deadlines (deterministic, on a memory reactor) -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_silent_mx_is_given_up_at_the_deadline() -> None:
    """An MX that accepts the connection but never greets is abandoned when the deadline passes."""
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    prober = Prober(clock, timeout=3.0, helo="client.test")
    probing = Deferred.fromCoroutine(prober.smtp("127.0.0.2", 25, MX1))
    host, port, factory, _, _ = clock.tcpClients[0]
    assert (host, port) == ("127.0.0.2", 25)
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    clock.advance(2.9)
    assert not probing.called
    clock.advance(0.2)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionAborted()))  # type: ignore[no-untyped-call]
    probe = await probing
    assert probe.connected
    assert probe.error == "no reply within 3 s (waiting for greeting)"


@pytest_twisted.ensureDeferred
async def test_unanswered_connection_is_given_up_at_the_deadline() -> None:
    """A connection attempt that never completes is cancelled when the deadline passes."""
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    prober = Prober(clock, timeout=3.0)
    probing = Deferred.fromCoroutine(prober.https("127.0.0.1", 443, POLICY_HOST, "/"))
    clock.advance(3.0)
    probe = await probing
    assert not probe.connected
    assert probe.error == "no connection within 3 s on port 443"


# --- Hostile server bytes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "problem"),
    [("\u00b2", False), ("\u0667\u0660\u0660\u0660\u0660", False), ("70000", True)],
)
def test_content_length_must_be_ascii_digits(length: str, problem: bool) -> None:
    """A Content-Length of non-ASCII digits is ignored, not a crash; an ASCII one is judged."""
    probe = replace(
        observed(b"").policy_probes[0],
        headers=[("content-type", "text/plain"), ("content-length", length)],
    )
    result = assess(observed(policy_body(), policy_probes=(probe,)), NOW)
    assert statuses(result, "policy-size").count("problem") == int(problem)


def test_mx_host_that_is_no_dns_id() -> None:
    """An MX host service_identity refuses as a DNS-ID (an IP address) gets a certificate-name
    problem, not a crash."""
    host = "192.0.2.1"
    probe = SMTPProbe("127.0.0.2", connected=True, starttls_offered=True, tls=tls_facts(MX1))
    mx = MXObservation(10, host, ("127.0.0.2",), (probe,))
    result = assess(observed(policy_body(), mx_records=((10, host),), mx=(mx,)), NOW)
    (finding,) = findings(result, "mx-certificate-name", host)
    assert finding.status == "problem"
    assert f"not valid for {host}" in finding.message


class _TLSStringTransport(StringTransport):
    """A StringTransport that accepts (and ignores) startTLS."""

    def startTLS(self, contextFactory: Any) -> None:
        """Pretend TLS started."""


@pytest.mark.parametrize("status", [b"\xb2\xb2\xb2", b"2000", b"20"])
@pytest_twisted.ensureDeferred
async def test_https_status_must_be_three_ascii_digits(status: bytes) -> None:
    """A status line whose code is not three ASCII digits ends the probe with a reason."""
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    prober = Prober(clock, timeout=3.0)
    probing = Deferred.fromCoroutine(prober.https("127.0.0.1", 443, POLICY_HOST, "/"))
    protocol: Any = clock.tcpClients[0][2].buildProtocol(None)
    transport = _TLSStringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    protocol.dataReceived(b"HTTP/1.1 " + status + b" OK\r\n")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionAborted()))  # type: ignore[no-untyped-call]
    probe = await probing
    assert (probe.status, probe.error.startswith("not an HTTP response: ")) == (0, True)


def test_text_output_escapes_server_text() -> None:
    """Control characters a server puts in a header or certificate names never reach the
    terminal: the text output shows them escaped."""
    evil = "Evil\x1b]0;owned\x07\x1b[2J CA\u202e"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, POLICY_HOST)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, evil)]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("x\x1b[31m.example.test")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    probe = HTTPSProbe(
        "127.0.0.1",
        connected=True,
        tls=TLSFacts("TLSv1.3", "x", (cert,), "self-signed certificate (depth 0)", ()),
        status=301,
        headers=[("location", "\x1b]0;pwned\x07https://x/\r\n")],
    )
    obs = observed(FetchError(STS_FETCH_ERROR, "redirect (301)"), policy_probes=(probe,))
    text = render_text(assess(obs, NOW))
    assert all(c.isprintable() for c in text.replace("\n", ""))
    assert "(issuer Evil\\x1b]0;owned\\x07\\x1b[2J CA\\u202e)" in text
    assert "(its DNS names: x\\x1b[31m.example.test)" in text
    assert "redirects to \\x1b]0;pwned\\x07https://x/\\r\\n: senders" in text


def test_addresses_beyond_the_cap_are_named() -> None:
    """A host with more addresses than are probed gets an info finding saying how many were
    checked."""
    addresses = tuple(f"192.0.2.{i}" for i in range(1, 21))
    probes = tuple(SMTPProbe(a, error="connection refused on port 25") for a in addresses[:16])
    mx = MXObservation(10, MX1, addresses, probes)
    result = assess(observed(policy_body(), mx_records=((10, MX1),), mx=(mx,)), NOW)
    assert [(f.status, f.message) for f in findings(result, "mx-connect", MX1)][1:] == [
        ("info", "20 addresses: only the first 16 were checked")
    ]


@pytest_twisted.ensureDeferred
async def test_addresses_share_one_deadline() -> None:
    """A host's addresses are probed eight at a time within one deadline for them all: forty
    silent addresses take the deadline once, and those left when it passes are not tried."""
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    prober = Prober(clock, timeout=10.0, helo="client.test")
    addresses = [f"192.0.2.{i}" for i in range(1, 41)]
    probing = Deferred.fromCoroutine(
        _probe_each(
            clock, addresses, 10.0, lambda a, t: prober.smtp(a, 25, MX1, timeout=t), SMTPProbe
        )
    )
    assert [c[0] for c in clock.tcpClients] == addresses[:8]
    clock.advance(9.9)
    assert not probing.called
    clock.advance(0.1)
    probes = await probing
    assert [p.address for p in probes] == addresses[:16]
    assert {p.error for p in probes[:8]} == {"no connection within 10 s on port 25"}
    assert {p.error for p in probes[8:]} == {"not probed: the host's 10 s ran out first"}
    assert len(clock.tcpClients) == 8


@pytest_twisted.ensureDeferred
async def test_a_later_address_gets_what_is_left_of_the_deadline() -> None:
    """An address probed when a slot frees up gets only the rest of the host's deadline."""
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    prober = Prober(clock, timeout=10.0, helo="client.test")
    addresses = [f"192.0.2.{i}" for i in range(1, 10)]
    probing = Deferred.fromCoroutine(
        _probe_each(
            clock, addresses, 10.0, lambda a, t: prober.smtp(a, 25, MX1, timeout=t), SMTPProbe
        )
    )
    clock.advance(4.0)
    factory: Any = clock.tcpClients[0][2]
    refused = Failure(Refused())  # type: ignore[no-untyped-call]
    factory.clientConnectionFailed(None, refused)  # the first address refuses
    assert [(c[0], c[3]) for c in clock.tcpClients[8:]] == [(addresses[8], 6.0)]
    clock.advance(6.0)
    probes = await probing
    assert probes[0].error == "connection refused on port 25"
    assert probes[8].error == "no connection within 6 s on port 25"
