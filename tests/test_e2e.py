"""The whole loop with a real Postfix (issue 4): policies enforced, sessions reported.

Nothing here is a mock. In a network and mount namespace of its own (loopback only, its own
``/etc/resolv.conf``) the test runs a DNS server, an HTTPS policy host with a test CA, one
ESMTP receiver per MX (good, untrusted, expired and wrong-name certificates, no STARTTLS),
an HTTPS report collector, ``postfix-mtasts serve`` and a real Postfix instance whose
``smtp_tls_policy_maps`` is the map. Mail for every domain of :data:`tests.e2eworld.DOMAINS`
goes in through Postfix's sendmail; then the reporter reads Postfix's own log and sends the
day's reports, by mail through the same Postfix and by https.

Run as root, outside a namespace, the test re-runs itself inside one with ``unshare`` (the
variable :data:`INSIDE` names the work directory there) and asserts that run passed.
``report`` only builds finished UTC days, so the reporter's commands run one day ahead under
libfaketime (Debian's ``faketime``): for them, today's sessions happened yesterday.
"""

from __future__ import annotations

import contextlib
import datetime
import email
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from postfix_mtasts.tlsrpt.report import validate_report
from tests.collectors import ReportServer
from tests.daemon import PROGRAM, Daemon, environment, require_root
from tests.dnsserver import start_dns_server
from tests.e2eworld import (
    COLLECTOR,
    COLLECTOR_IP,
    CONTACT,
    DNS_IP,
    DOMAINS,
    MAIL_FROM,
    MAP_PORT,
    ORGANIZATION,
    POLICY_HOST_IP,
    REPORT_MAILBOX,
    REPORTS,
    SENDER,
    Postfix,
    expected_policy,
    kill,
    kill_instance,
    message,
    mtasts_config,
    policy_body,
    processes_with,
    recipients,
    zone,
)
from tests.httpsserver import PolicyServer, policy, status
from tests.pki import SNIContextFactory, TestCA
from tests.smtpserver import SMTPReceiver, receiver_tls

ROOT = Path(__file__).resolve().parent.parent
INSIDE = "POSTFIX_MTASTS_E2E_INSIDE"
CHILD_LIMIT = 300  # seconds for the whole run inside the namespace
WAIT = 60.0  # seconds for mail to reach a final status or a receiver
TOOLS = ("unshare", "ip", "mount", "faketime", "/usr/sbin/postfix", "/usr/sbin/sendmail")


@pytest_twisted.ensureDeferred
async def test_postfix_end_to_end(reactor: Any) -> None:
    """Postfix delivers enforce-domain mail only over verified TLS, and each domain gets one
    report, by mail and by https, whose counts and result types match what happened."""
    work = os.environ.get(INSIDE)
    if work is None:
        run_in_namespace()
    else:
        await scenario(reactor, Path(work))


# --- outside: the namespace ----------------------------------------------------------------


def run_in_namespace() -> None:
    """Run this test file again inside new network and mount namespaces; assert it passed."""
    require_root()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        why = f"the end-to-end test needs {', '.join(missing)} (apt-get install postfix faketime)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    work = Path(tempfile.mkdtemp(prefix="postfix-mtasts-e2e-"))
    work.chmod(0o755)  # the postfix user must reach its queue and the CA file
    argv = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_e2e.py"]
    child = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=environment() | {INSIDE: str(work)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            output, _ = child.communicate(timeout=CHILD_LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            pytest.fail(f"the run in the namespace took over {CHILD_LIMIT} s:\n{output.decode()}")
    finally:
        # Whatever the run left behind: the map and Postfix, found by their environment.
        left = kill(processes_with(f"{INSIDE}={work}")) + kill_instance(work / "postfix")
        shutil.rmtree(work, ignore_errors=True)
    assert child.returncode == 0, f"the run in the namespace failed:\n{output.decode()}"
    assert left == [], f"processes outlived the run in the namespace: {left}"


# --- inside: the scenario ------------------------------------------------------------------


async def scenario(reactor: Any, work: Path) -> None:
    """Build the world, send the mail, check Postfix's deliveries, then the reports."""
    isolate_network(work)
    ca = TestCA("E2E Root")
    ca_file = ca.write_bundle(work)
    config = work / "postfix-mtasts.toml"
    config.write_text(mtasts_config(work, ca_file))
    postfix = Postfix(work, ca_file)
    survivors: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        receivers = await start_servers(reactor, ca, stack)
        collector = await start_collector(reactor, ca, stack)
        await start_map(reactor, config, work, stack)

        async def stop_postfix() -> None:
            survivors.extend(await postfix.stop(reactor))

        stack.push_async_callback(stop_postfix)
        postfix.configure()
        postfix.command("start")

        first_day = utc_today()
        await deliver_test_mail(reactor, postfix, receivers)
        days = sorted({first_day, utc_today()})  # two only if the run crossed UTC midnight
        reporter = Reporter(reactor, config, work)
        await check_reports(reactor, reporter, postfix, days, receivers[REPORTS.name], collector)
    assert survivors == [], f"Postfix processes had to be killed: {survivors}"


def isolate_network(work: Path) -> None:
    """Bring up loopback with the MX addresses, and point the resolver at the test DNS."""
    parent = os.getppid()  # the outer test; unshare exec'd this process
    for kind in ("net", "mnt"):
        assert os.readlink(f"/proc/self/ns/{kind}") != os.readlink(f"/proc/{parent}/ns/{kind}"), (
            f"{INSIDE} is set, but this is not a {kind} namespace of its own"
        )
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_IP}\n")
    commands = [["ip", "link", "set", "lo", "up"]]
    commands += [["ip", "addr", "add", f"{d.mx_ip}/32", "dev", "lo"] for d in (*DOMAINS, REPORTS)]
    commands.append(["mount", "--bind", str(resolv), "/etc/resolv.conf"])
    for argv in commands:
        subprocess.run(argv, check=True, capture_output=True)


async def start_servers(
    reactor: Any, ca: TestCA, stack: contextlib.AsyncExitStack
) -> dict[str, SMTPReceiver]:
    """The DNS server, the policy host and one receiver per MX; returns the receivers."""
    dns = await start_dns_server(reactor, zone(), DNS_IP, 53)
    stack.push_async_callback(dns.stop)
    policy_host = PolicyServer(reactor, SNIContextFactory(ca))
    for d in DOMAINS:
        if d.mode is not None:
            policy_host.set(f"mta-sts.{d.name}", policy(policy_body(d)))
    await policy_host.start(POLICY_HOST_IP, 443)
    stack.push_async_callback(policy_host.stop)
    receivers = {}
    for d in (*DOMAINS, REPORTS):
        tls = None if d.tls is None else receiver_tls(ca, d.mx, d.tls)
        receiver = SMTPReceiver(reactor, hostname=d.mx, tls=tls)
        await receiver.start(d.mx_ip, 25)
        stack.push_async_callback(receiver.stop)
        receivers[d.name] = receiver
    return receivers


async def start_collector(
    reactor: Any, ca: TestCA, stack: contextlib.AsyncExitStack
) -> ReportServer:
    """The https report collector, taking every POST to ``/tlsrpt``."""
    collector = ReportServer(reactor, SNIContextFactory(ca))
    collector.set(COLLECTOR, status(200, b"thanks\n"), path="/tlsrpt")
    await collector.start(COLLECTOR_IP, 443)
    stack.push_async_callback(collector.stop)
    return collector


async def start_map(
    reactor: Any, config: Path, work: Path, stack: contextlib.AsyncExitStack
) -> Daemon:
    """``postfix-mtasts serve`` on 127.0.0.1:8461, stopped with SIGTERM at the end."""
    daemon = Daemon(config, work / "serve.log")
    daemon.start()

    async def stop() -> None:
        daemon.signal(signal.SIGTERM)
        try:
            assert await daemon.wait_exit(reactor) == 0, daemon.output()
        finally:
            daemon.kill()

    stack.push_async_callback(stop)
    await daemon.wait_listening(reactor, "127.0.0.1", MAP_PORT)
    return daemon


async def deliver_test_mail(
    reactor: Any, postfix: Postfix, receivers: dict[str, SMTPReceiver]
) -> None:
    """One message per domain through sendmail; each is delivered over TLS or deferred with
    nothing reaching the MX, as the table says."""
    for d in DOMAINS:
        postfix.sendmail(SENDER, recipients(d), message(recipients(d)))
    final = await postfix.wait_final(reactor, [r for d in DOMAINS for r in recipients(d)])
    seen, wanted = {}, {}
    for d in DOMAINS:
        statuses = {line.status for r in recipients(d) for line in final[r]}
        arrived = receivers[d.name].messages  # each MX serves one domain
        seen[d.name] = (statuses, sorted(r for m in arrived for r in m.recipients), over(arrived))
        if d.delivered:
            wanted[d.name] = ({"sent"}, sorted(recipients(d)), "TLS")
        else:
            wanted[d.name] = ({"deferred"}, [], "nothing")
    log = postfix.log()
    assert seen == wanted, log
    good = next(d for d in DOMAINS if d.result == "success" and d.mode == "enforce")
    assert f"Verified TLS connection established to {good.mx}[{good.mx_ip}]:25" in log
    plaintext = receivers["plaintext.test"].sessions
    # Postfix did connect to the MX without STARTTLS, and left without sending anything.
    assert plaintext and all(s.tls_version is None for s in plaintext)


def over(messages: Iterable[Any]) -> str:
    """How ``messages`` travelled: ``nothing`` arrived, all over ``TLS``, or some in ``clear``."""
    versions = [m.tls_version for m in messages]
    if not versions:
        return "nothing"
    return "TLS" if all(versions) else "clear"


class Reporter:
    """``postfix-mtasts`` commands of the reporter, run one day ahead under faketime."""

    def __init__(self, reactor: Any, config: Path, work: Path) -> None:
        self._reactor = reactor
        self._config = config
        self.work = work
        self.maillog = work / "maillog"

    async def __call__(self, *args: str) -> str:
        """Run ``postfix-mtasts ARGS -c CONFIG``; return its output, which must exit 0."""
        argv = ["+1 day", *PROGRAM, *args, "-c", str(self._config)]
        out, err, code = await getProcessOutputAndValue(  # type: ignore[no-untyped-call]
            shutil.which("faketime") or "faketime", argv, env=environment(), reactor=self._reactor
        )
        text: str = out.decode() + err.decode()
        assert code == 0, f"postfix-mtasts {' '.join(args)} exited {code}:\n{text}"
        return text


async def check_reports(  # noqa: PLR0917 - the parts of the world it reads
    reactor: Any,
    reporter: Reporter,
    postfix: Postfix,
    days: list[datetime.date],
    mailbox: SMTPReceiver,
    collector: ReportServer,
) -> None:
    """tail and report --send: one report per domain, by mail and by https, matching the
    table; then the report mail's own sessions are not counted."""
    await reporter("tail", "--once", str(reporter.maillog))
    sent = reporter.work / "sent"
    for day in days:
        await reporter("report", "--day", day.isoformat(), "--send", "--out", str(sent))
    built = reports_in(sent)
    assert sorted(built) == sorted(d.name for d in DOMAINS)
    for d in DOMAINS:
        report = built[d.name]
        assert report["organization-name"] == ORGANIZATION
        assert report["contact-info"] == CONTACT
        assert report["date-range"]["start-datetime"][:10] in {day.isoformat() for day in days}
        [counted] = without_reasons(report["policies"])
        want = expected_policy(d)
        assert (counted["summary"], counted["failure-details"]) == (
            want["summary"],
            want["failure-details"],
        ), d
    untrusted = built["untrusted.test"]["policies"][0]["failure-details"][0]
    assert untrusted.get("failure-reason-code")  # RFC 8460 §4.3.1: SHOULD for this type

    assert dict(posted(collector)) == built
    await within(reactor, mailbox.wait_for(len(built)))
    final = await postfix.wait_final(reactor, [REPORT_MAILBOX], count=len(built))
    assert {(x.tag, x.status) for x in final[REPORT_MAILBOX]} == {("postfix/tlsrpt-out", "sent")}
    assert dict(mailed(mailbox)) == built

    # The feedback loop: the report mail's delivery sessions are in the log now, and are not
    # counted: building the days again gives the very same reports.
    await reporter("tail", "--once", str(reporter.maillog))
    again = reporter.work / "again"
    for day in days:
        await reporter("report", "--day", day.isoformat(), "--out", str(again))
    assert reports_in(again) == built

    # Last, the policy each session was counted under: sts with the policy's lines for the
    # MTA-STS domains, no-policy-found for the others. This fails until the reporter stops
    # losing policies fetched in the same second as the session they were fetched for:
    # Postfix's log stamps have whole seconds, and policy_at() in tlsrpt/aggregate.py skips
    # every store event later than the stamp (e.g. a fetch at 14:32:41.09 for a session
    # logged "14:32:41"), so each first session to a domain lands in no-policy-found.
    policies = {d: r["policies"][0]["policy"] for d, r in built.items()}
    assert policies == {d.name: expected_policy(d)["policy"] for d in DOMAINS}


def reports_in(directory: Path) -> dict[str, dict[str, Any]]:
    """The reports ``report --out`` wrote, by policy domain (one each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json.gz")):
        report = json.loads(gzip.decompress(path.read_bytes()))
        domain = report["policies"][0]["policy"]["policy-domain"]
        assert domain not in found, f"two reports for {domain}"
        found[domain] = report
    return found


def without_reasons(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``policies`` with the failure details' reason codes left out."""
    return [
        p
        | {
            "failure-details": [
                {k: v for k, v in f.items() if k != "failure-reason-code"}
                for f in p["failure-details"]
            ]
        }
        for p in policies
    ]


def posted(collector: ReportServer) -> list[tuple[str, dict[str, Any]]]:
    """``(policy domain, report)`` of each report POSTed to the collector, checked strictly
    and by parsedmarc."""
    assert {r.header("content-type") for r in collector.requests} == {"application/tlsrpt+gzip"}
    reports = []
    for body in collector.bodies:
        report = json.loads(gzip.decompress(body))
        assert validate_report(report) == []
        parsed: Any = parsedmarc.parse_smtp_tls_report_json(json.dumps(report))
        assert parsed["report_id"] == report["report-id"]
        reports.append((report["policies"][0]["policy"]["policy-domain"], report))
    return reports


def mailed(mailbox: SMTPReceiver) -> list[tuple[str, dict[str, Any]]]:
    """``(policy domain, report)`` of each report mail that arrived, checked strictly and
    by parsedmarc."""
    found = []
    for m in mailbox.messages:
        assert (m.mail_from, m.recipients) == (MAIL_FROM, [REPORT_MAILBOX])
        assert m.tls_version is not None
        parsed: Any = parsedmarc.parse_report_email(m.data, offline=True)
        mail = email.message_from_bytes(m.data)
        [part] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        attachment = part.get_payload(decode=True)
        assert isinstance(attachment, bytes)
        report = json.loads(gzip.decompress(attachment))
        assert validate_report(report) == []
        assert parsed["report"]["report_id"] == report["report-id"]
        assert mail["TLS-Report-Domain"] == report["policies"][0]["policy"]["policy-domain"]
        found.append((mail["TLS-Report-Domain"], report))
    return found


async def within(reactor: Any, d: Deferred[Any], limit: float = WAIT) -> Any:
    """``d``'s result, failing the test if it takes over ``limit`` seconds."""
    return await d.addTimeout(limit, reactor)


def utc_today() -> datetime.date:
    """Today's UTC date (the reporter buckets sessions by it)."""
    return datetime.datetime.now(datetime.UTC).date()
