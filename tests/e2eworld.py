"""The world of the end-to-end test (``tests/test_e2e.py``): domains, DNS, Postfix, reporter.

One table, :data:`DOMAINS`, says for each recipient domain where its MX listens, what its
STARTTLS offers, which MTA-STS policy it publishes and what must happen to mail for it; the
zone, the policies, the receivers and every expectation are built from it.

The MX addresses are TEST-NET-1 addresses (192.0.2.0/24) put on the loopback interface of
the test's own network namespace, not 127.0.0.x: the reporter rightly never counts a relay
on 127.0.0.0/8, which is where content filters listen (``reference/tlsrpt.md`` §7.5).
The policy host, the report collector, the DNS server and the policy map stay on 127.0.0.x.

:class:`Postfix` is a real Postfix instance (Debian's package) with its configuration, queue
and log in a work directory; :func:`report_transport` takes the report-mail recipe from
``contrib/main.cf`` and ``contrib/master.cf`` as an operator would.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater

from tests.smtpserver import TLSKind

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
SBIN = "/usr/sbin"
POSTFIX, SENDMAIL = f"{SBIN}/postfix", f"{SBIN}/sendmail"

DNS_IP = "127.0.0.1"
POLICY_HOST_IP = "127.0.0.10"
COLLECTOR_IP = "127.0.0.20"
MAP_PORT = 8461

SENDER_DOMAIN = "sender.test"
SENDER = f"alice@{SENDER_DOMAIN}"
MAIL_FROM = f"tlsrpt-noreply@{SENDER_DOMAIN}"
"""The dedicated envelope sender of report mail."""
REPORTS_DOMAIN = "reports.test"
REPORT_MAILBOX = f"tlsrpt@{REPORTS_DOMAIN}"
COLLECTOR = f"collector.{REPORTS_DOMAIN}"
RUA = f"mailto:{REPORT_MAILBOX},https://{COLLECTOR}/tlsrpt"
ORGANIZATION = "E2E Sender"
CONTACT = f"mailto:tlsrpt@{SENDER_DOMAIN}"
MX = ipaddress.IPv4Address("192.0.2.0")
"""TEST-NET-1: the MX addresses are ``MX + n``, put on the namespace's loopback interface."""


@dataclass(frozen=True)
class Domain:
    """A recipient domain, its single MX, and what must happen to mail for it."""

    name: str
    mx_address: ipaddress.IPv4Address
    tls: TLSKind | None
    """The MX's certificate (``tests.smtpserver.receiver_tls`` kinds); None: no STARTTLS."""
    mode: str | None
    """The MTA-STS policy mode it publishes; None: no MTA-STS."""
    delivered: bool
    """True: Postfix delivers the mail; False: it defers it and nothing reaches the MX."""
    result: str
    """The session's result in the report: ``success`` or an RFC 8460 result type."""

    @property
    def mx_ip(self) -> str:
        """The MX's address."""
        return str(self.mx_address)

    @property
    def mx(self) -> str:
        """The MX host name."""
        return f"mx.{self.name}"

    @property
    def recipient(self) -> str:
        """The address test mail goes to."""
        return f"bob@{self.name}"

    def policy_lines(self) -> list[str]:
        """The lines of its MTA-STS policy (empty without one)."""
        if self.mode is None:
            return []
        return ["version: STSv1", f"mode: {self.mode}", f"mx: {self.mx}", "max_age: 86400"]


DOMAINS = (
    #      name               MX       STARTTLS      policy     sent   result
    Domain("good.test",       MX + 10, "good",       "enforce", True,  "success"),
    Domain("untrusted.test",  MX + 11, "untrusted",  "enforce", False, "certificate-not-trusted"),
    Domain("expired.test",    MX + 12, "expired",    "enforce", False, "certificate-expired"),
    Domain("wrong-name.test", MX + 13, "wrong-name", "enforce", False, "certificate-host-mismatch"),
    Domain("plaintext.test",  MX + 14, None,         "enforce", False, "starttls-not-supported"),
    Domain("testing.test",    MX + 15, "good",       "testing", True,  "success"),
    Domain("nopolicy.test",   MX + 16, "good",       None,      True,  "success"),
)  # fmt: skip
REPORTS = Domain(REPORTS_DOMAIN, MX + 20, "good", None, True, "success")
"""Where report mail goes: a good STARTTLS MX, no MTA-STS."""
EXTRA_RECIPIENT = "carol@good.test"
"""A second recipient in the same message to good.test: one session, counted once."""


def recipients(domain: Domain) -> list[str]:
    """The recipients of the domain's test message."""
    extra = [EXTRA_RECIPIENT] if EXTRA_RECIPIENT.endswith(f"@{domain.name}") else []
    return [domain.recipient, *extra]


def zone() -> dict[str, list[tuple[str, Any]]]:
    """The DNS zone of every domain, the reports domain and the collector."""
    records: dict[str, list[tuple[str, Any]]] = {
        COLLECTOR: [("A", COLLECTOR_IP)],
        SENDER_DOMAIN: [],
    }
    for d in (*DOMAINS, REPORTS):
        records[d.name] = [("MX", (10, d.mx))]
        records[d.mx] = [("A", d.mx_ip)]
        records[f"_smtp._tls.{d.name}"] = [("TXT", f"v=TLSRPTv1; rua={RUA}")]
        if d.mode is not None:
            records[f"_mta-sts.{d.name}"] = [("TXT", "v=STSv1; id=20261123")]
            records[f"mta-sts.{d.name}"] = [("A", POLICY_HOST_IP)]
    return records


def policy_body(domain: Domain) -> bytes:
    """The policy file served at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``."""
    return "".join(f"{line}\r\n" for line in domain.policy_lines()).encode()


def expected_policy(domain: Domain) -> dict[str, Any]:
    """The ``policies[]`` element of the domain's report: one session, as the table says
    (``failure-reason-code`` left out: it is checked separately)."""
    if domain.mode is None:
        policy: dict[str, Any] = {"policy-type": "no-policy-found", "policy-domain": domain.name}
    else:
        policy = {
            "policy-type": "sts",
            "policy-domain": domain.name,
            "policy-string": domain.policy_lines(),
            "mx-host": [domain.mx],
        }
    ok = domain.result == "success"
    failures = [
        {
            "result-type": domain.result,
            "receiving-mx-hostname": domain.mx,
            "receiving-ip": domain.mx_ip,
            "failed-session-count": 1,
        }
    ]
    return {
        "policy": policy,
        "summary": {
            "total-successful-session-count": int(ok),
            "total-failure-session-count": int(not ok),
        },
        "failure-details": [] if ok else failures,
    }


def mtasts_config(work: Path, ca_file: Path) -> str:
    """``postfix-mtasts``'s configuration: the test's DNS server and CA, a store in ``work``."""
    return f"""\
[server]
listen = ["tcp:{MAP_PORT}:interface=127.0.0.1"]
allow_root = true
[dns]
nameservers = ["{DNS_IP}:53"]
[https]
ca_file = "{ca_file}"
[store]
path = "{work / "store.sqlite"}"
[tlsrpt]
organization_name = "{ORGANIZATION}"
contact_info = "{CONTACT}"
mail_from = "{MAIL_FROM}"
smtp = "127.0.0.1:25"
"""


# --- Postfix -------------------------------------------------------------------------------


def report_transport(mail_from: str, contrib: Path = CONTRIB) -> tuple[str, str]:
    """contrib's recipe for report mail: the main.cf line, with ``mail_from`` for the example
    address, and the master.cf service (its chroot column set to ``n`` by the caller)."""
    main = [
        line
        for line in (contrib / "main.cf").read_text().splitlines()
        if line.startswith("sender_dependent_default_transport_maps")
    ]
    assert len(main) == 1, "contrib/main.cf: no sender_dependent_default_transport_maps line"
    main_line = re.sub(r"\S+@\S+?=", f"{mail_from}=", main[0])
    service: list[str] = []
    for line in (contrib / "master.cf").read_text().splitlines():
        if line.startswith("tlsrpt-out ") or (service and line[:1].isspace() and line.strip()):
            service.append(line)
        elif service:
            break
    assert service, "contrib/master.cf: no tlsrpt-out service"
    return main_line, "\n".join(service)


def main_cf(work: Path, ca_file: Path, transport_line: str) -> str:
    """main.cf of the test instance: everything in ``work``, no chroot, nothing local."""
    return f"""\
compatibility_level = 3.6
queue_directory = {work / "queue"}
data_directory = {work / "data"}
maillog_file = {work / "maillog"}
maillog_file_prefixes = {work}
myhostname = mta.{SENDER_DOMAIN}
mydomain = {SENDER_DOMAIN}
mydestination =
local_transport = error:5.1.1 no local delivery here
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
biff = no
smtputf8_enable = no
# Deferred mail stays deferred while the test runs (the default retries after 5 minutes).
minimal_backoff_time = 1h
maximal_backoff_time = 2h
queue_run_delay = 1h
smtp_tls_security_level = may
smtp_tls_CAfile = {ca_file}
smtp_tls_loglevel = 1
smtp_tls_connection_reuse = no
smtp_tls_policy_maps = socketmap:inet:127.0.0.1:{MAP_PORT}:postfix
{transport_line}
"""


MASTER_CF = """\
smtp       inet  n       -       n       -       -       smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def unchrooted(service: str) -> str:
    """A master.cf entry with its chroot column (the fifth) set to ``n``."""
    first, _, rest = service.partition("\n")
    fields = first.split()
    fields[4] = "n"
    return " ".join(fields) + ("\n" + rest if rest else "")


_DELIVERY = re.compile(
    r" (?P<tag>postfix(?:/[\w.-]+)*)/smtp\[\d+\]: (?P<qid>\w+): to=<(?P<rcpt>[^>]*)>,"
    r" relay=(?P<relay>\S+), .*? status=(?P<status>\w+)"
)


@dataclass(frozen=True)
class Delivery:
    """One ``to=<…>, relay=…, status=…`` line of the mail log."""

    tag: str
    """The syslog name: ``postfix``, or ``postfix/tlsrpt-out`` for the report transport."""
    queue_id: str
    rcpt: str
    relay: str
    status: str


def deliveries(log: str) -> list[Delivery]:
    """Every smtp(8) delivery line of ``log``, in order."""
    return [
        Delivery(m["tag"], m["qid"], m["rcpt"], m["relay"], m["status"])
        for m in _DELIVERY.finditer(log)
    ]


class Postfix:
    """A Postfix instance whose configuration directory, queue and log live in ``work``."""

    def __init__(self, work: Path, ca_file: Path, contrib: Path = CONTRIB) -> None:
        self.config_dir = work / "postfix"
        self.maillog = work / "maillog"
        self._work = work
        self._ca_file = ca_file
        self._contrib = contrib

    def configure(self) -> None:
        """Write main.cf and master.cf, with contrib's transport for report mail."""
        main_line, service = report_transport(MAIL_FROM, self._contrib)
        self.config_dir.mkdir()
        (self._work / "queue").mkdir()
        data = self._work / "data"
        data.mkdir()
        postfix = pwd.getpwnam("postfix")
        os.chown(data, postfix.pw_uid, postfix.pw_gid)
        (self.config_dir / "main.cf").write_text(main_cf(self._work, self._ca_file, main_line))
        master = MASTER_CF + unchrooted(service) + "\n"
        (self.config_dir / "master.cf").write_text(master)

    def command(self, *args: str, stdin: bytes = b"") -> str:
        """Run ``postfix -c DIR ARGS`` (local work only, so the reactor may wait); return its
        output, failing the test on a non-zero exit."""
        return self._run([POSTFIX, "-c", str(self.config_dir), *args], stdin)

    def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Submit ``message`` with Postfix's own sendmail(1)."""
        self._run([SENDMAIL, "-C", str(self.config_dir), "-f", sender, *recipients], message)

    def _run(self, argv: list[str], stdin: bytes) -> str:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            timeout=60,
            env={"PATH": f"{SBIN}:/usr/bin:/bin"},
            check=False,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{output}"
        return output

    def log(self) -> str:
        """The mail log so far."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    async def wait_final(
        self, reactor: Any, rcpts: Iterable[str], count: int = 1, limit: float = 60.0
    ) -> dict[str, list[Delivery]]:
        """Poll the log until each of ``rcpts`` has ``count`` delivery lines (sent, deferred
        or bounced); return them by recipient."""
        wanted = set(rcpts)
        for _ in range(int(limit / 0.1)):
            found: dict[str, list[Delivery]] = {r: [] for r in wanted}
            for d in deliveries(self.log()):
                if d.rcpt in wanted:
                    found[d.rcpt].append(d)
            if all(len(v) >= count for v in found.values()):
                return found
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"no final status for all of {sorted(wanted)}:\n{self.log()}")

    def processes(self) -> list[int]:
        """The ids of this instance's processes (the master exports MAIL_CONFIG to them)."""
        return instance_processes(self.config_dir)

    async def stop(self, reactor: Any) -> list[int]:
        """``postfix stop``, then wait until every process of the instance has gone; kill any
        left after 15 s and return their ids (empty when all stopped on their own)."""
        if (self._work / "queue" / "pid" / "master.pid").exists():
            self.command("stop")
        for _ in range(150):
            if not self.processes():
                return []
            await deferLater(reactor, 0.1, lambda: None)
        return kill_instance(self.config_dir)


def instance_processes(config_dir: Path) -> list[int]:
    """The processes of the Postfix instance at ``config_dir``."""
    return processes_with(f"MAIL_CONFIG={config_dir}")


def processes_with(variable: str) -> list[int]:
    """The ids of the processes whose environment holds ``variable`` (``NAME=value``)."""
    marker = variable.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry))
    return found


def kill_instance(config_dir: Path) -> list[int]:
    """SIGKILL each process of the Postfix instance at ``config_dir``; return their ids."""
    return kill(instance_processes(config_dir))


def kill(pids: Iterable[int]) -> list[int]:
    """SIGKILL each of ``pids`` that still runs; return those signalled."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    return killed


def message(rcpts: Sequence[str]) -> bytes:
    """A small test message to ``rcpts``."""
    return (
        f"From: {SENDER}\nTo: {', '.join(rcpts)}\nSubject: end-to-end test\n\n"
        f"Hello {', '.join(rcpts)}.\n"
    ).encode()
