"""The README's "Deploying with Postfix", every command of it run for real (issue 4).

The section is read as a script: its ``sh`` blocks run line by line, in order, and each
``toml`` block is set in the installed configuration file where it appears, as the text
says. :data:`RUNNERS` maps every command line to how it is run; a line no runner matches
fails :func:`test_every_command_has_a_runner`.

Run as root, outside a namespace, the test re-runs itself inside new mount, network and PID
namespaces (``unshare``; :data:`INSIDE` names the work directory there) and asserts that run
passed: when that run ends, the kernel ends every process it started. Inside, the paths the
commands write get a writable layer (overlayfs on a tmpfs) over the host's files, so the host
is never changed: ``/etc``, ``/opt``, ``/usr/local``, ``/var/lib``, ``/var/log``,
``/var/spool/postfix`` and ``/var/mail``. Loopback is the only network: a DNS server (the
namespace's ``/etc/resolv.conf``), an HTTPS policy host for ``gmail.com`` (serving that
domain's published policy) and ``example.org``, an MX for ``example.org`` with STARTTLS, a
test CA added to the system trust store, and Debian's Postfix with its own ``main.cf`` and
``master.cf`` (``/usr/share/postfix``), started as on the operator's host before the
section's ``postconf -e`` lines and ``postfix reload``.

What runs as written: ``apt-get`` (with ``--simulate``: nothing is downloaded; the packages
must be installed already), ``python3 -m venv``, ``ln``, ``install``, ``systemd-sysusers``,
``postconf``, ``cat``, ``postfix reload``, ``postfix-mtasts query|check|show``, ``postmap``
and ``curl``. What needs a stand-in:

- ``pip install .`` must work offline: the run-time dependencies installed in this test's
  environment are copied into the new virtualenv (as pip would install them), then pip
  installs the checkout with ``--no-index --no-deps --no-build-isolation`` when this
  environment has a build backend that can build it (setuptools 77 or later, for the
  ``license`` string of pyproject.toml). Without one, the package is copied into
  site-packages and its ``[project.scripts]`` written as pip writes them.
- ``systemctl daemon-reload``: ``systemd-analyze verify`` on the installed units (systemd
  loads them, and the program at their ``ExecStart=`` exists).
- ``systemctl enable --now UNIT…``: ``systemctl --root=/ enable UNIT…`` (the ``[Install]``
  sections and their links), then each service started as systemd would start it: its
  ``ExecStart=`` as its ``User=``, ``Group=`` and ``SupplementaryGroups=``, with its
  ``UMask=``, its ``StateDirectory=`` made and passed as ``$STATE_DIRECTORY``, and for
  ``Type=notify`` ``$NOTIFY_SOCKET``, waited on until the daemon says ``READY=1``. A timer
  runs its service once.
- ``systemctl restart UNIT…``: SIGTERM, a clean exit, and the start again.
- ``journalctl -u UNIT``: the standard error of the unit's processes (what journald keeps,
  with ``$JOURNAL_STREAM`` set as systemd sets it); each line of the ``text`` block that
  follows the command must be a line of one of them (``YYYY-MM-DD`` standing for a date).

Before the section runs, the writable layers are cleared of anything an earlier installation
left on the host (:data:`LEFTOVERS`, the units, the ``postfix-mtasts`` user), so it starts
from a host without postfix-mtasts. It takes about 35 s.
"""

# twisted.internet.utils has no type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import datetime
import grp
import importlib.metadata
import mailbox
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from postfix_mtasts.tlsrpt.deliver import build_report_message
from postfix_mtasts.tlsrpt.report import (
    FailureKey,
    PolicyCounts,
    PolicyKey,
    build_report,
    report_filename,
    report_gzip,
)
from tests.daemon import environment, require_root
from tests.dnsserver import start_dns_server
from tests.httpsserver import PolicyServer, policy
from tests.pki import SNIContextFactory, TestCA
from tests.smtpserver import SMTPReceiver, receiver_tls

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Deploying with Postfix"
INSIDE = "POSTFIX_MTASTS_DEPLOY_INSIDE"
CHILD_LIMIT = 150  # seconds for the whole run inside the namespaces
TOOLS: tuple[str, ...] = (
    "unshare",
    "mount",
    "ip",
    "python3",
    "systemctl",
    "systemd-analyze",
    "systemd-sysusers",
)
TOOLS += ("apt-get", "curl", "/usr/sbin/postfix", "/usr/sbin/postconf", "/usr/sbin/postmap")
OVERLAID = ("/etc", "/opt", "/usr/local", "/var/lib", "/var/log", "/var/spool/postfix", "/var/mail")
UNITS = Path("/etc/systemd/system")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""root's PATH on Debian: ``python3`` is Debian's, as on an operator's host."""
SOURCE = ("pyproject.toml", "setup.cfg", "README.md", "postfix_mtasts", "contrib")
"""What a checkout or an unpacked sdist holds that the section uses."""

# The world on loopback.
DNS_IP = "127.0.0.1"
POLICY_HOST_IP = "127.0.0.10"
MX_IP = "192.0.2.25"  # TEST-NET-1, put on the namespace's loopback interface
GMAIL_POLICY = (
    "version: STSv1",
    "mode: enforce",
    "mx: gmail-smtp-in.l.google.com",
    "mx: *.gmail-smtp-in.l.google.com",
    "max_age: 86400",
)
GMAIL_REPLY = "secure match=gmail-smtp-in.l.google.com:.gmail-smtp-in.l.google.com"
GMAIL_REPLY += " servername=hostname"
OWN_POLICY = ("version: STSv1", "mode: testing", "mx: mx.example.org", "max_age: 604800")
REPORT_SENDER = "Example Sender Inc."


# --- the section ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block of the section: its language and its lines."""

    kind: str
    lines: tuple[str, ...]


def section_text(readme: Path = README) -> str:
    """The text of the README's deployment section, up to the next ``## `` heading."""
    text = readme.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of ``text``, in order."""
    found = re.findall(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)
    return [Block(kind, tuple(body.splitlines())) for kind, body in found]


def command_lines(text: str) -> list[str]:
    """Every command line of the ``sh`` blocks of ``text``."""
    return [
        line
        for block in blocks(text)
        if block.kind == "sh"
        for line in block.lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_command_has_a_runner() -> None:
    """Every command line of the section is run by some runner, and every runner runs one."""
    lines = command_lines(section_text())
    assert len(lines) > 20
    assert [line for line in lines if runner_for(line) is None] == []
    used = {pattern for pattern, _ in RUNNERS for line in lines if re.fullmatch(pattern, line)}
    assert [pattern for pattern, _ in RUNNERS if pattern not in used] == []
    assert runner_for("systemctl start postfix-mtasts.service") is None


def test_postconf_lines_are_contrib_main_cf() -> None:
    """The section's ``postconf -e`` settings are contrib/main.cf's, the example sender aside."""
    text = section_text()
    settings = re.findall(r"^postconf -e '([^']+)'$", text, re.M)
    main_cf = (ROOT / "contrib" / "main.cf").read_text().splitlines()
    assert settings and all(s in main_cf for s in settings), settings
    names = {s.split(" = ")[0] for s in settings}
    wanted = {line.split(" = ")[0] for line in main_cf if re.match(r"[A-Za-z_]+ = ", line)}
    assert names == wanted
    (toml,) = [b for b in blocks(text) if b.kind == "toml" and "[tlsrpt]" in b.lines]
    mail_from = tomllib.loads("\n".join(toml.lines))["tlsrpt"]["mail_from"]
    assert f"{{ {mail_from}=tlsrpt-out: }}" in "\n".join(settings)


# --- outside: the namespaces --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deploying_with_postfix(reactor: Any) -> None:
    """Every command of the README's deployment section runs, in order, and leaves a map that
    Postfix asks (``postmap``), a reporter, and the log lines and answers the README shows."""
    work = os.environ.get(INSIDE)
    if work is None:
        run_in_namespace()
    else:
        await deploy(reactor, Path(work))


def run_in_namespace() -> None:
    """Run this test again inside new mount, network and PID namespaces; assert it passed."""
    require_root()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        why = f"the deployment test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    work = Path(tempfile.mkdtemp(prefix="postfix-mtasts-deploy-"))
    work.chmod(0o755)
    argv = ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc"]
    argv += ["--propagation", "private", "--"]
    argv += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv += [f"{Path(__file__).relative_to(ROOT)}::test_deploying_with_postfix"]
    env = environment() | {INSIDE: str(work)}
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=CHILD_LIMIT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        output = e.output.decode(errors="replace") if e.output else ""
        pytest.fail(f"the run in the namespaces took over {CHILD_LIMIT} s:\n{output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert done.returncode == 0, done.stdout.decode(errors="replace")


# --- inside: the host --------------------------------------------------------------------------


def isolate(work: Path) -> None:
    """Check the namespaces; put a writable layer over every path the section writes."""
    assert os.getpid() == 1, f"{INSIDE} is set, but this is not a PID namespace of its own"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(work)], check=True)
    for path in OVERLAID:
        assert os.path.isdir(path), f"{path} is missing"
        name = path.strip("/").replace("/", "_")
        upper, scratch = work / "layers" / name, work / "layers" / f"{name}.work"
        upper.mkdir(parents=True)
        scratch.mkdir()
        options = f"lowerdir={path},upperdir={upper},workdir={scratch}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, path], check=True)
    fresh_host()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{MX_IP}/32", "dev", "lo"], check=True)
    resolv = Path("/etc/resolv.conf")
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text(f"nameserver {DNS_IP}\n")


LEFTOVERS = (
    "/opt/postfix-mtasts",
    "/usr/local/bin/postfix-mtasts",
    "/etc/postfix-mtasts",
    "/etc/sysusers.d/postfix-mtasts.conf",
    "/var/lib/postfix-mtasts",
    "/var/spool/postfix/pid/master.pid",
)


def fresh_host() -> None:
    """In the writable layers: no trace of an earlier installation (or of the development
    tools' ``postfix-mtasts`` user), and no pid file of the host's Postfix."""
    for path in [
        *map(Path, LEFTOVERS),
        *UNITS.glob("postfix-mtasts*"),
        *UNITS.glob("*/postfix-mtasts*"),
    ]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    with contextlib.suppress(KeyError):
        pwd.getpwnam("postfix-mtasts")
        subprocess.run(["/usr/sbin/userdel", "postfix-mtasts"], check=True, capture_output=True)
    with contextlib.suppress(KeyError):
        grp.getgrnam("postfix-mtasts")
        subprocess.run(["/usr/sbin/groupdel", "postfix-mtasts"], check=True, capture_output=True)


def checkout(work: Path) -> Path:
    """A copy of the checkout's files that the section uses (pip builds in it)."""
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    return src


def zone() -> dict[str, list[tuple[str, Any]]]:
    """gmail.com as it publishes MTA-STS; example.org, the operator's own domain, in testing."""
    return {
        "gmail.com": [("MX", (5, "gmail-smtp-in.l.google.com"))],
        "_mta-sts.gmail.com": [("TXT", "v=STSv1; id=20190429T010101;")],
        "mta-sts.gmail.com": [("A", POLICY_HOST_IP)],
        "example.org": [("MX", (10, "mx.example.org"))],
        "mx.example.org": [("A", MX_IP)],
        "_mta-sts.example.org": [("TXT", "v=STSv1; id=20261123T000000")],
        "mta-sts.example.org": [("A", POLICY_HOST_IP)],
        "_smtp._tls.example.org": [("TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@example.org")],
    }


async def start_world(reactor: Any, work: Path, stack: contextlib.AsyncExitStack) -> None:
    """DNS, the policy host, example.org's MX, the CA in the system trust store, a report
    received in /var/mail/tlsrpt, and Postfix running with Debian's own configuration."""
    ca = TestCA("Deploy Test Root")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    with bundle.open("a") as f:
        f.write(ca.write_bundle(work).read_text())
    dns = await start_dns_server(reactor, zone(), DNS_IP, 53)
    stack.push_async_callback(dns.stop)
    host = PolicyServer(reactor, SNIContextFactory(ca))
    for domain, lines in (("gmail.com", GMAIL_POLICY), ("example.org", OWN_POLICY)):
        host.set(f"mta-sts.{domain}", policy("".join(f"{x}\r\n" for x in lines).encode()))
    await host.start(POLICY_HOST_IP, 443)
    stack.push_async_callback(host.stop)
    mx = SMTPReceiver(reactor, hostname="mx.example.org", tls=receiver_tls(ca, "mx.example.org"))
    await mx.start(MX_IP, 25)
    stack.push_async_callback(mx.stop)
    write_received_report(Path("/var/mail/tlsrpt"))
    start_postfix()


def write_received_report(path: Path) -> None:
    """An mbox holding one report mail about example.org, as a sender would send it."""
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    key = PolicyKey("sts", "example.org", OWN_POLICY, ("mx.example.org",))
    expired = FailureKey("certificate-expired", "mx.example.org", MX_IP, None)
    report = build_report(
        organization_name=REPORT_SENDER,
        contact_info="mailto:tlsrpt@sender.example",
        report_id=f"{day:%Y%m%d}.example.org@sender.example",
        day=day,
        policies={key: PolicyCounts(41, {expired: 2})},
    )
    message = build_report_message(
        report_gz=report_gzip(report),
        filename=report_filename("sender.example", "example.org", day, "1"),
        policy_domain="example.org",
        submitter="sender.example",
        report_id=report["report-id"],
        mail_from="tlsrpt-noreply@sender.example",
        rcpt="tlsrpt@example.org",
        organization_name=REPORT_SENDER,
        summary_text="This is an aggregate TLS report from sender.example\n",
        date=datetime.datetime.now(datetime.UTC),
        message_id_domain="mail.sender.example",
    )
    box = mailbox.mbox(str(path))
    try:
        box.add(mailbox.mboxMessage(message))
    finally:
        box.close()


def start_postfix() -> None:
    """Debian's Postfix as on the operator's host (its own main.cf and master.cf), logging to
    /var/log/mail.log as rsyslog does (root:adm, 0640), on loopback."""
    share = Path("/usr/share/postfix")
    main = (share / "main.cf.debian").read_text() + (
        "myhostname = mta.example.org\n"
        "inet_interfaces = 127.0.0.1\n"
        "inet_protocols = ipv4\n"
        "maillog_file = /var/log/mail.log\n"
    )
    Path("/etc/postfix/main.cf").write_text(main)
    shutil.copy(share / "master.cf.dist", "/etc/postfix/master.cf")
    log = Path("/var/log/mail.log")
    log.touch()
    shutil.chown(log, "root", "adm")
    log.chmod(0o640)
    done = subprocess.run(
        ["postfix", "start"], capture_output=True, text=True, env=root_env(), check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def root_env() -> dict[str, str]:
    """The environment of a root shell on Debian."""
    return {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", "LOGNAME": "root"}


# --- inside: units as systemd would run them ---------------------------------------------------


@dataclass
class Unit:
    """An installed unit file's keys (last assignment wins; lists in order)."""

    name: str
    keys: dict[str, list[str]]

    @classmethod
    def read(cls, name: str) -> Unit:
        keys: dict[str, list[str]] = {}
        section = ""
        for raw in Path("/etc/systemd/system", name).read_text().splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
        return cls(name, keys)

    def get(self, key: str, default: str = "") -> str:
        return self.keys.get(key, [default])[-1]

    def words(self, key: str) -> list[str]:
        found: list[str] = []
        for value in self.keys.get(key, []):
            found = [*found, *value.split()] if value else []
        return found


@dataclass
class Running:
    """A service's main process and its journal (standard output and error)."""

    unit: Unit
    process: subprocess.Popen[bytes]
    journal: Path
    notify: socket.socket | None
    """systemd's end of ``$NOTIFY_SOCKET`` (``Type=notify``), open while the service runs."""


@dataclass
class Host:
    """The namespace's host: what the section has started, and where its files are."""

    reactor: Any
    work: Path
    src: Path
    running: dict[str, Running] = field(default_factory=dict)
    journals: dict[str, Path] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    """The command lines run, in order."""
    journal_lines: int = 0
    """The lines of the README's journal excerpts found in the journals."""

    async def shell(
        self, argv: list[str], expect: int | None = 0, **env: str
    ) -> tuple[str, str, int]:
        """Run ``argv`` as root in the checkout, without blocking the reactor."""
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=root_env() | env, path=str(self.src), reactor=self.reactor
        )
        text, errors = out.decode(errors="replace"), err.decode(errors="replace")
        if expect is not None:
            assert code == expect, f"{argv} exited {code}:\n{text}{errors}"
        return text, errors, code

    async def start(self, name: str) -> None:
        """Start service ``name`` as systemd would (see the module docstring)."""
        unit = Unit.read(name)
        user, group = unit.get("Service.User"), unit.get("Service.Group")
        env = {
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "HOME": pwd.getpwnam(user).pw_dir,
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/usr/sbin/nologin",
            "JOURNAL_STREAM": "0:0",  # stdout and stderr go to the journal
        }
        state = unit.get("Service.StateDirectory")
        if state:
            directory = Path("/var/lib", state)
            directory.mkdir(exist_ok=True)
            shutil.chown(directory, user, group)
            directory.chmod(int(unit.get("Service.StateDirectoryMode", "0755"), 8))
            env["STATE_DIRECTORY"] = str(directory)
        kind = unit.get("Service.Type", "simple")
        notify = None
        if kind == "notify":
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = self.work / f"notify-{name}"
            path.unlink(missing_ok=True)
            notify.bind(str(path))
            path.chmod(0o666)
            notify.setblocking(False)
            env["NOTIFY_SOCKET"] = str(path)
        journal = self.journals.setdefault(name, self.work / f"journal-{name}")
        try:
            with journal.open("ab") as log:
                process = subprocess.Popen(
                    shlex.split(unit.get("Service.ExecStart")),
                    cwd="/",
                    env=env,
                    user=user,
                    group=group,
                    extra_groups=unit.words("Service.SupplementaryGroups"),
                    umask=int(unit.get("Service.UMask", "0022"), 8),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            if kind == "oneshot":
                code = await self.wait_exit(process)
                assert code == 0, f"{name} exited {code}:\n{journal.read_text()}"
                return
        except BaseException:
            if notify is not None:
                notify.close()
            raise
        self.running[name] = Running(unit, process, journal, notify)
        if notify is not None:
            said: list[bytes] = []
            await self.wait_for(lambda: ready(notify, said), process, name)

    async def stop(self, name: str) -> None:
        """SIGTERM, as systemd stops a service; it must exit cleanly."""
        running = self.running.pop(name)
        running.process.send_signal(signal.SIGTERM)
        try:
            code = await self.wait_exit(running.process)
        finally:
            if running.notify is not None:
                running.notify.close()
        assert code in (0, -signal.SIGTERM), f"{name} exited {code}:\n{self.journal(name)}"

    async def wait_exit(self, process: subprocess.Popen[bytes], limit: float = 30.0) -> int:
        for _ in range(int(limit / 0.05)):
            code = process.poll()
            if code is not None:
                return code
            await deferLater(self.reactor, 0.05, lambda: None)
        process.kill()
        process.wait()
        raise AssertionError(f"{process.args!r} did not exit within {limit} s")

    async def wait_for(
        self, condition: Callable[[], bool], process: subprocess.Popen[bytes], name: str
    ) -> None:
        """Poll ``condition`` (bounded) while ``process`` runs."""
        for _ in range(300):
            if condition():
                return
            assert process.poll() is None, f"{name} exited:\n{self.journal(name)}"
            await deferLater(self.reactor, 0.05, lambda: None)
        raise AssertionError(f"{name} did not get ready:\n{self.journal(name)}")

    def journal(self, name: str) -> str:
        path = self.journals.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    async def stop_all(self) -> None:
        for name in list(self.running):
            await self.stop(name)


def ready(sock: socket.socket, said: list[bytes]) -> bool:
    """Whether ``READY=1`` has arrived on the notify socket."""
    with contextlib.suppress(BlockingIOError):
        said.append(sock.recv(4096))
    return any(b"READY=1" in message.split(b"\n") for message in said)


# --- inside: the runners ------------------------------------------------------------------------

Runner = Callable[[Host, str, re.Match[str]], Any]


async def as_written(host: Host, line: str, _match: re.Match[str]) -> None:
    """The line, as root, in the checkout."""
    await host.shell(["/bin/sh", "-c", line])


async def apt_get(host: Host, line: str, match: re.Match[str]) -> None:
    """``apt-get --simulate``: nothing downloaded; each package must be installed already."""
    packages = line.split()[2:]
    out, _, _ = await host.shell(["apt-get", "--simulate", "install", *packages])
    for package in packages:
        assert f"{package} is already the newest version" in out, out


async def pip_install(host: Host, line: str, _match: re.Match[str]) -> None:
    """pip offline (see the module docstring), then the venv's python runs the program."""
    argv = shlex.split(line)
    venv = Path(argv[0]).parent.parent
    out, _, _ = await host.shell([str(venv / "bin" / "python"), "-c", SITE])
    site = Path(out.strip())
    copy_dependencies(site)
    backend = build_backend()
    if backend is not None:
        options = ["--no-index", "--no-deps", "--no-build-isolation"]
        pip = [argv[0], *argv[1:-1], *options, argv[-1]]
        out, _, _ = await host.shell(pip, PYTHONPATH=backend)
        assert "Successfully installed postfix-mtasts" in out, out
    else:
        copy_package(host.src, site, venv)
    out, _, _ = await host.shell([str(venv / "bin" / "postfix-mtasts"), "--help"])
    assert "serve" in out


SITE = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def copy_dependencies(site: Path) -> None:
    """Copy into ``site`` the installed files of every distribution the project needs to run
    (its dependencies and theirs, with the extras asked for): what ``pip install .`` would
    put there, taken from this test's environment. Copied, not linked: the services run as
    their own user, who may not be able to reach this environment (a checkout under a
    directory only root can enter)."""
    for dist in runtime_distributions():
        for file in dist.files or ():
            target = site / file
            if file.parts[0] == ".." or file.suffix == ".pyc" or target.exists():
                continue  # scripts outside site-packages; caches; what the venv has already
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The distributions ``postfix-mtasts`` needs at run time, as installed here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    needed: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending = [("postfix-mtasts", "")]
    while pending:
        name, extra = pending.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        dist = importlib.metadata.distribution(name)
        for text in dist.requires or ():
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not marker.evaluate({"extra": extra}):
                continue
            if marker is None and extra:
                continue  # a base requirement, taken with the base
            wanted = canonicalize_name(requirement.name)
            needed[wanted] = importlib.metadata.distribution(wanted)
            pending += [(wanted, e) for e in ("", *sorted(requirement.extras))]
    return list(needed.values())


def build_backend() -> str | None:
    """Where this environment's setuptools lives, if it can build pyproject.toml (77+)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return None
    if int(version.split(".")[0]) < 77:
        return None
    import setuptools

    return str(Path(setuptools.__file__).parent.parent)


def copy_package(src: Path, site: Path, venv: Path) -> None:
    """Without a build backend: the packages into site-packages, the scripts into bin."""
    project = tomllib.loads((src / "pyproject.toml").read_text())
    shutil.rmtree(site / "postfix_mtasts", ignore_errors=True)
    shutil.copytree(src / "postfix_mtasts", site / "postfix_mtasts")
    for name, target in project["project"]["scripts"].items():
        module, function = target.split(":")
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv}/bin/python\nimport sys\nfrom {module} import {function}\n"
            f"if __name__ == '__main__':\n    sys.exit({function}())\n"
        )
        script.chmod(0o755)


async def sysusers(host: Host, line: str, _match: re.Match[str]) -> None:
    """systemd-sysusers as written; the user exists then, with the state directory as home."""
    await host.shell(shlex.split(line))
    entry = pwd.getpwnam("postfix-mtasts")
    assert entry.pw_dir == "/var/lib/postfix-mtasts"
    assert grp.getgrgid(entry.pw_gid).gr_name == "postfix-mtasts"


async def daemon_reload(host: Host, line: str, _match: re.Match[str]) -> None:
    """``systemd-analyze verify`` on the installed units (their programs must exist)."""
    units = sorted(str(p) for p in UNITS.glob("postfix-mtasts*") if p.is_file())
    assert len(units) == 4, units
    _, err, code = await host.shell(["systemd-analyze", "verify", *units], expect=None)
    ours = [x for x in err.splitlines() if "postfix-mtasts" in x]
    assert (code, ours) == (0, []), err


async def enable_now(host: Host, line: str, _match: re.Match[str]) -> None:
    """``systemctl --root=/ enable``, then each service started, a timer's service run once."""
    names = line.split()[3:]
    await host.shell(["systemctl", "--root=/", "enable", *names])
    for name in names:
        unit = Unit.read(name)
        wanted_by = unit.get("Install.WantedBy")
        assert (UNITS / f"{wanted_by}.wants" / name).is_symlink(), name
        if name.endswith(".timer"):
            calendar = unit.get("Timer.OnCalendar")
            await host.shell(["systemd-analyze", "calendar", calendar])
            await host.start(unit.get("Timer.Unit", name.replace(".timer", ".service")))
        else:
            await host.start(name)


async def restart(host: Host, line: str, _match: re.Match[str]) -> None:
    """Stop (SIGTERM, a clean exit) and start each service again."""
    for name in line.split()[2:]:
        await host.stop(name)
        await host.start(name)
    await wait_map(host)


async def wait_map(host: Host) -> None:
    """Wait until the map accepts connections on its port (it is ready once it said so)."""
    running = host.running["postfix-mtasts.service"]
    await host.wait_for(lambda: accepts(8461), running.process, running.unit.name)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def postfix_reload(host: Host, line: str, _match: re.Match[str]) -> None:
    """``postfix reload`` of the running Postfix; it then has every setting of the section."""
    await host.shell(shlex.split(line))
    settings, _, _ = await host.shell(["postconf", "-n"])
    for setting in re.findall(
        r"^postconf -e '([^']+)'$", section_text(host.src / "README.md"), re.M
    ):
        assert setting in settings.splitlines(), setting
    service, _, _ = await host.shell(["postconf", "-M", "tlsrpt-out/unix"])
    assert service.startswith("tlsrpt-out unix"), service


async def query(host: Host, line: str, _match: re.Match[str]) -> None:
    """The map's answer for gmail.com, fetched through the loopback DNS and policy host."""
    out, _, _ = await host.shell(shlex.split(line))
    assert out.splitlines()[0] == f"OK {GMAIL_REPLY}"


async def postmap(host: Host, line: str, _match: re.Match[str]) -> None:
    """Postfix's own socketmap client gets the same answer from the running map."""
    out, _, _ = await host.shell(shlex.split(line))
    assert out.strip() == GMAIL_REPLY


async def check(host: Host, line: str, _match: re.Match[str]) -> None:
    """``check`` finds the testing domain clean and says it is ready for enforce."""
    out, _, _ = await host.shell(shlex.split(line))
    assert "ready for enforce" in out, out


async def show(host: Host, line: str, _match: re.Match[str]) -> None:
    """``show`` reads the mailbox and lists the sender, the domain and the failure type."""
    out, _, _ = await host.shell(shlex.split(line))
    for wanted in (REPORT_SENDER, "example.org", "certificate-expired"):
        assert wanted in out, out


async def journalctl(host: Host, line: str, match: re.Match[str]) -> str:
    """The unit's journal: what its processes wrote to standard error."""
    name = match[1] if match[1].endswith((".service", ".timer")) else f"{match[1]}.service"
    journal = host.journal(name)
    assert journal, f"{name} logged nothing"
    bad = [x for x in journal.splitlines() if x.startswith(("warn:", "error:", "critical:"))]
    assert bad == [], journal
    return journal


async def curl_metrics(host: Host, line: str, match: re.Match[str]) -> None:
    """The metrics page of the restarted service lists the metric grepped for."""
    port, metric = int(match[1]), match[2]
    for _ in range(200):
        if accepts(port):
            break
        await deferLater(host.reactor, 0.05, lambda: None)
    out, _, code = await host.shell(["/bin/sh", "-c", line], expect=None)
    if code != 0:
        page, _, _ = await host.shell(["curl", "-s", f"http://127.0.0.1:{port}/metrics"])
        raise AssertionError(f"{line!r} exited {code}; the page:\n{page}")
    assert re.search(rf"^{metric}(\{{.*\}})? \d", out, re.M), out


# --- the runners: every command line of the section, and how it runs ---------------------------

RUNNERS: list[tuple[str, Runner]] = [
    (r"apt-get install( [\w.+-]+)+", apt_get),
    (r"python3 -m venv /opt/postfix-mtasts", as_written),
    (r"/opt/postfix-mtasts/bin/pip install( --upgrade)? \.", pip_install),
    (r"ln -sf /opt/postfix-mtasts/bin/postfix-mtasts /usr/local/bin/postfix-mtasts", as_written),
    (r"install (-D )?-m 0644 (contrib/\S+ )+/etc/\S+", as_written),
    (r"systemd-sysusers /etc/sysusers\.d/postfix-mtasts\.conf", sysusers),
    (r"systemctl daemon-reload", daemon_reload),
    (r"systemctl enable --now( [\w.-]+\.(service|timer))+", enable_now),
    (r"systemctl restart( [\w.-]+\.service)+", restart),
    (r"postconf -e '[A-Za-z_]+ = [^']+'", as_written),
    (r"cat contrib/master\.cf >> /etc/postfix/master\.cf", as_written),
    (r"postfix reload", postfix_reload),
    (r"postmap -q gmail\.com socketmap:inet:127\.0\.0\.1:8461:postfix", postmap),
    (r"postfix-mtasts query -c /etc/postfix-mtasts/postfix-mtasts\.toml gmail\.com", query),
    (r"postfix-mtasts check example\.org", check),
    (r"postfix-mtasts show /var/mail/tlsrpt", show),
    (r"journalctl -u ([\w.-]+)", journalctl),
    (r"curl -s http://127\.0\.0\.1:(\d+)/metrics \| grep '\^(\w+)'", curl_metrics),
]


def runner_for(line: str) -> tuple[Runner, re.Match[str]] | None:
    """The first runner whose pattern matches all of ``line``, and the match; or None."""
    for pattern, runner in RUNNERS:
        match = re.fullmatch(pattern, line)
        if match is not None:
            return runner, match
    return None


def journal_line(expected: str) -> str:
    """A pattern for the journal line ``expected``, in which ``YYYY-MM-DD`` is any date."""
    day = re.escape("YYYY-MM-DD")
    return "^" + re.escape(expected).replace(day, r"\d{4}-\d\d-\d\d") + "$"


def set_toml(path: Path, block: Block) -> None:
    """Set each ``key = value`` of ``block`` under its ``[table]`` in the file at ``path``
    (every key is already there, at its default, in contrib's example file)."""
    lines = path.read_text().splitlines()
    table = ""
    for entry in block.lines:
        if entry.startswith("["):
            table = entry
            continue
        key = entry.split("=")[0].strip()
        start = lines.index(table)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), None)
        end = len(lines) if end is None else end
        (i,) = [i for i in range(start, end) if re.match(rf"{key} = ", lines[i])]
        lines[i] = entry
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())


async def deploy(reactor: Any, work: Path) -> None:
    """The section, block by block, on the namespaces' host."""
    isolate(work)
    src = checkout(work)
    host = Host(reactor, work, src)
    text = section_text(src / "README.md")
    config = Path("/etc/postfix-mtasts/postfix-mtasts.toml")
    async with contextlib.AsyncExitStack() as stack:
        await start_world(reactor, work, stack)
        stack.push_async_callback(host.stop_all)
        journals: list[str] = []  # of the journalctl commands of the last sh block
        for block in blocks(text):
            if block.kind == "toml":
                set_toml(config, block)
            elif block.kind == "text" and journals:
                for expected in block.lines:
                    pattern = journal_line(expected)
                    assert any(re.search(pattern, j, re.M) for j in journals), expected
                    host.journal_lines += 1
            journals = []
            if block.kind != "sh":
                continue
            for line in block.lines:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                found = runner_for(line)
                assert found is not None, line
                runner, match = found
                result = await runner(host, line, match)
                if runner is journalctl:
                    journals.append(result)
                host.ran.append(line)
    assert host.ran == command_lines(text)
    assert host.journal_lines >= 5
