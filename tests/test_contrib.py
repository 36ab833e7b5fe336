"""The deployment files under contrib/, checked with the tools that will read them.

systemd units: the keys that matter, their command lines against our own argument parser, and
``systemd-analyze verify`` when it is installed. Postfix snippets: Debian's ``postconf`` and
``postfix check`` on a scratch configuration directory, so a misspelt parameter fails here.
The socket unit's path is exercised end to end: a daemon handed the socket the way systemd
hands it, asked by ``postmap`` the way a chrooted smtp(8) asks.
"""

# twisted.internet.utils has no type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from postfix_mtasts.cli import build_parser
from tests.daemon import (
    PROGRAM,
    Daemon,
    environment,
    require_postmap,
    require_root,
    require_tool,
)

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
BINARY = "/usr/local/bin/postfix-mtasts"
CONFIG = "/etc/postfix-mtasts/postfix-mtasts.toml"
USER = "postfix-mtasts"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
QUEUE_DIRECTORY = "/var/spool/postfix"
SERVICES = [
    "postfix-mtasts.service",
    "postfix-mtasts-tail.service",
    "postfix-mtasts-report.service",
]
UNITS = [*SERVICES, "postfix-mtasts.socket", "postfix-mtasts-report.timer"]
DROP_IN = "postfix-mtasts-tail.service.d/journal.conf"

Unit = dict[str, list[tuple[str, str]]]


def read_unit(name: str) -> Unit:
    """A unit file as ``{section: [(key, value), ...]}``, every assignment kept in order."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    text = (CONTRIB / name).read_text().replace("\\\n", " ")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        assert equals and section is not None, f"{name}:{number}: not an assignment: {raw!r}"
        section.append((key.strip(), value.strip()))
    return unit


def value(unit: Unit, section: str, key: str) -> str:
    """The effective value of a single-valued key: its last assignment."""
    values = [v for k, v in unit.get(section, []) if k == key]
    assert values, f"[{section}] {key} is not set"
    return values[-1]


def values(unit: Unit, section: str, key: str) -> list[str]:
    """The values of a list key, an empty assignment resetting the list as systemd does."""
    result: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            result = [*result, v] if v else []
    return result


def postfix_mtasts_argv(unit: Unit) -> list[str]:
    """The ``postfix-mtasts`` command line of a unit's ExecStart, also inside ``sh -c '… | …'``."""
    (command,) = values(unit, "Service", "ExecStart")
    argv = shlex.split(command)
    if argv[:2] == ["/bin/sh", "-c"]:
        stages = [shlex.split(stage) for stage in argv[2].split("|")]
        argv = next(s for s in stages if BINARY in s)
        argv = argv[argv.index(BINARY) :]
    assert argv[0] == BINARY
    return argv[1:]


def parses(argv: list[str]) -> bool:
    """Whether our argument parser accepts ``argv`` (it exits on a usage error)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


# -- systemd units ----------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "User": USER,
    "Group": USER,
    "StateDirectory": "postfix-mtasts",
}


@pytest.mark.parametrize(
    ("name", "kind", "command"),
    [
        ("postfix-mtasts.service", "notify", "serve"),
        ("postfix-mtasts-tail.service", "exec", "tail"),
        ("postfix-mtasts-report.service", "oneshot", "report"),
    ],
)
def test_service(name: str, kind: str, command: str) -> None:
    """Each service runs one of our subcommands with valid options, as the user, hardened."""
    unit = read_unit(name)
    assert value(unit, "Service", "Type") == kind
    argv = postfix_mtasts_argv(unit)
    assert argv[:3] == [command, "-c", CONFIG]
    assert parses(argv), argv
    for key, expected in HARDENING.items():
        assert value(unit, "Service", key) == expected, key
    assert "MemoryDenyWriteExecute" not in dict(unit["Service"])


def test_map_service_restarts_and_installs() -> None:
    """The map restarts after a failure and starts at boot, before Postfix."""
    unit = read_unit("postfix-mtasts.service")
    assert value(unit, "Service", "Restart") == "on-failure"
    assert int(value(unit, "Service", "LimitNOFILE")) >= 1024 + 1024
    assert "postfix.service" in value(unit, "Unit", "Before").split()
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_tail_reads_the_mail_log_it_may_read() -> None:
    """The tailer follows /var/log/mail.log, which Debian lets group adm read."""
    unit = read_unit("postfix-mtasts-tail.service")
    assert postfix_mtasts_argv(unit)[-1] == "/var/log/mail.log"
    assert values(unit, "Service", "SupplementaryGroups") == ["adm"]


def test_journal_drop_in() -> None:
    """The journal drop-in replaces ExecStart with journalctl piped into ``tail -``."""
    unit = read_unit(DROP_IN)
    argv = postfix_mtasts_argv(unit)
    assert argv == ["tail", "-c", CONFIG, "-"]
    assert parses(argv)
    assert values(unit, "Service", "SupplementaryGroups") == ["systemd-journal"]
    script = shlex.split(values(unit, "Service", "ExecStart")[0])[2]
    journalctl = shlex.split(script.split("|")[0])
    assert journalctl[0] == "journalctl"
    assert "--output=short-iso" in journalctl and "--follow" in journalctl
    if shutil.which("journalctl") is None:
        return
    # journalctl reads every option before acting on a final --help: a typo fails here.
    options = [o.replace("%S", "/var/lib") for o in journalctl[1:]]
    done = subprocess.run(["journalctl", *options, "--help"], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr


def test_socket_unit_matches_main_cf() -> None:
    """The socket sits where main.cf's relative socketmap path points, and is postfix's."""
    unit = read_unit("postfix-mtasts.socket")
    listen = value(unit, "Socket", "ListenStream")
    relative = unix_map_spec().split(":")[2]
    assert listen == f"{QUEUE_DIRECTORY}/{relative}"
    assert (value(unit, "Socket", "SocketUser"), value(unit, "Socket", "SocketGroup")) == (
        "postfix",
        "postfix",
    )
    assert value(unit, "Socket", "SocketMode") == "0660"
    assert value(unit, "Install", "WantedBy") == "sockets.target"


def test_report_timer() -> None:
    """The report runs hourly for retries, from five past, at a fixed random minute per host."""
    unit = read_unit("postfix-mtasts-report.timer")
    calendar = value(unit, "Timer", "OnCalendar")
    assert calendar == "*-*-* *:05:00 UTC"
    delay = value(unit, "Timer", "RandomizedDelaySec")
    assert delay.endswith("m") and 0 < int(delay[:-1]) < 60 - 5
    assert value(unit, "Timer", "FixedRandomDelay") == "true"
    assert value(unit, "Timer", "Persistent") == "true"
    if shutil.which("systemd-analyze"):
        done = subprocess.run(
            ["systemd-analyze", "calendar", calendar], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and f"Normalized form: {calendar}" in done.stdout, done


def test_sysusers_entry() -> None:
    """The sysusers file creates the user the units run as, with the state directory as home."""
    entry = shlex.split((CONTRIB / "postfix-mtasts.sysusers").read_text().splitlines()[-1])
    assert entry[:2] == ["u", USER]
    assert entry[-1] == "/var/lib/postfix-mtasts"


@pytest.fixture()
def unit_dir(tmp_path: Path) -> Path:
    """The units, with ExecStart pointing at this checkout's program as an install would."""
    program = Path(sys.executable).parent / "postfix-mtasts"
    assert program.exists(), f"{program} is not installed (./dev setup)"
    for path in [*(CONTRIB / name for name in UNITS), CONTRIB / DROP_IN]:
        target = tmp_path / path.relative_to(CONTRIB)
        target.parent.mkdir(exist_ok=True)
        target.write_text(path.read_text().replace(BINARY, str(program)))
    return tmp_path


def test_systemd_analyze_verify(unit_dir: Path) -> None:
    """systemd itself reads every unit and the drop-in without a single complaint."""
    require_tool("systemd-analyze", "systemd")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(unit_dir / n) for n in UNITS)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_systemd_analyze_catches_a_typo(unit_dir: Path) -> None:
    """The verify check above is not vacuous: a misspelt key is reported."""
    require_tool("systemd-analyze", "systemd")
    unit = unit_dir / "postfix-mtasts.service"
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHom="))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert "Unknown key 'ProtectHom'" in done.stderr


def test_sysusers_file() -> None:
    """systemd-sysusers reads the user definition (in a dry run that writes nothing)."""
    require_tool("systemd-sysusers", "systemd")
    done = subprocess.run(
        ["systemd-sysusers", "--dry-run", str(CONTRIB / "postfix-mtasts.sysusers")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    exists = USER in {p.pw_name for p in pwd.getpwall()}
    assert exists or f"Creating user '{USER}'" in done.stderr + done.stdout


# -- MemoryDenyWriteExecute= ------------------------------------------------------------------

# systemd's MemoryDenyWriteExecute= filter (x86-64): mmap with PROT_WRITE|PROT_EXEC, mprotect
# and pkey_mprotect adding PROT_EXEC, and shmat with SHM_EXEC fail with EPERM. Applied with
# seccomp here, then the code after it runs.
MDWE = r"""
import ctypes, os, struct
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1
program = [
    (LD, 4), (JEQ, 0xC000003E, None, "allow"), (LD, 0),
    (JEQ, 9, "mmap", None), (JEQ, 10, "mprotect", None), (JEQ, 329, "mprotect", None),
    (JEQ, 30, "shmat", "allow"),
    "mmap", (LD, 32), (AND, 6), (JEQ, 6, "deny", "allow"),
    "mprotect", (LD, 32), (AND, 4), (JEQ, 4, "deny", "allow"),
    "shmat", (LD, 32), (AND, 0o100000), (JEQ, 0o100000, "deny", "allow"),
    "allow", (RET, ALLOW), "deny", (RET, DENY),
]
labels, code = {}, []
for item in program:
    if isinstance(item, str):
        labels[item] = len(code)
    else:
        code.append((*item, None, None)[:4])
def jump(label, here):
    return 0 if label is None else labels[label] - here - 1
filt = b"".join(
    struct.pack("HBBI", op, jump(yes, n), jump(no, n), k)
    for n, (op, k, yes, no) in enumerate(code)
)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
prog = Prog(len(code), filt)
if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
    raise OSError(ctypes.get_errno(), "seccomp")
"""

VERIFY_CALLBACK = """
from OpenSSL import SSL
try:
    SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *args: True)
    print("works")
except MemoryError as e:
    print("MemoryError:", e)
"""


@pytest.mark.parametrize(("under_mdwe", "expected"), [(False, "works"), (True, "MemoryError")])
def test_memory_deny_write_execute_breaks_pyopenssl(under_mdwe: bool, expected: str) -> None:
    """Under MemoryDenyWriteExecute= pyOpenSSL cannot make its verification callback.

    This is why the units leave the option out. If this starts to say "works" under the
    filter, pyOpenSSL no longer needs writable code and the units can enable the option.
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the filter is written for Linux on x86-64")
    code = (MDWE if under_mdwe else "") + VERIFY_CALLBACK
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment(), check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(expected), done.stdout


# -- Postfix snippets -------------------------------------------------------------------------


def main_cf_lines(*, commented: bool = False) -> list[str]:
    """main.cf's settings, or with ``commented`` also its ``#name = value`` alternatives."""
    lines = []
    for raw in (CONTRIB / "main.cf").read_text().splitlines():
        line = raw[1:] if commented and re.match(r"#[a-z_]+ = ", raw) else raw
        if line and not line.startswith(("#", " ")):
            lines.append(line)
    return lines


def unix_map_spec() -> str:
    """main.cf's alternative ``smtp_tls_policy_maps`` over the socket unit's UNIX socket."""
    return next(
        line.split("=", 1)[1].strip()
        for line in main_cf_lines(commented=True)
        if line.startswith("smtp_tls_policy_maps") and "socketmap:unix:" in line
    )


def alternatives() -> list[str]:
    """The commented-out ``#name = value`` lines of main.cf."""
    return [line for line in main_cf_lines(commented=True) if line not in main_cf_lines()]


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A Postfix configuration directory: Debian's defaults plus contrib's main.cf, master.cf.

    Its queue and data directories are its own, so ``postfix check`` touches nothing else.
    """
    require_postmap()
    path = Path(tempfile.mkdtemp(prefix="pmt-postfix-"))
    try:
        debian = Path("/usr/share/postfix")
        defaults = debian / "main.cf.debian"
        main = defaults.read_text() if defaults.exists() else "compatibility_level = 3.6\n"
        main += f"queue_directory = {path}/queue\ndata_directory = {path}/data\n"
        (path / "queue").mkdir()
        (path / "data").mkdir()
        (path / "main.cf").write_text(main + (CONTRIB / "main.cf").read_text())
        master = debian / "master.cf.dist"
        base = master.read_text() if master.exists() else Path("/etc/postfix/master.cf").read_text()
        (path / "master.cf").write_text(base + (CONTRIB / "master.cf").read_text())
        yield path
    finally:
        shutil.rmtree(path)


def postconf(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTCONF, "-c", str(directory), *args], capture_output=True, text=True, check=False
    )


def test_postconf_reads_the_snippets(scratch: Path) -> None:
    """Postfix knows every parameter of main.cf and master.cf and keeps each value as written."""
    done = postconf(scratch, "-n")
    assert (done.returncode, done.stderr) == (0, "")
    for line in main_cf_lines():
        assert line in done.stdout.splitlines(), line
    service = postconf(scratch, "-M", "tlsrpt-out/unix")
    assert service.stdout.startswith("tlsrpt-out unix"), service
    for name, expected in [
        ("smtp_tls_security_level", "may"),
        ("smtp_tls_policy_maps", "static:may"),
    ]:
        override = postconf(scratch, "-P", f"tlsrpt-out/unix/{name}")
        assert override.stdout.strip() == f"tlsrpt-out/unix/{name} = {expected}", override


@pytest.mark.parametrize("line", alternatives())
def test_postconf_reads_the_alternatives(scratch: Path, line: str) -> None:
    """Each commented-out alternative in main.cf is a setting Postfix knows too."""
    name = line.split(" = ", maxsplit=1)[0]
    main = scratch / "main.cf"
    kept = [x for x in main.read_text().splitlines() if not x.startswith(f"{name} = ")]
    main.write_text("\n".join([*kept, line, ""]))
    done = postconf(scratch, "-n")
    assert (done.returncode, done.stderr) == (0, "")
    assert line in done.stdout.splitlines()


def test_report_sender_takes_the_tlsrpt_transport(scratch: Path) -> None:
    """Mail from the report sender resolves to tlsrpt-out:, a transport master.cf defines."""
    maps = postconf(scratch, "-h", "sender_dependent_default_transport_maps").stdout.strip()
    sender = re.search(r"\{\s*([^=\s]+)=", maps)
    assert sender is not None, maps
    done = subprocess.run(
        [POSTMAP, "-q", sender[1], maps], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "tlsrpt-out:"), done.stderr
    other = subprocess.run(
        [POSTMAP, "-q", "someone@example.org", maps], capture_output=True, text=True, check=False
    )
    assert (other.returncode, other.stdout) == (1, "")


@pytest.mark.parametrize(
    ("file", "typo"),
    [("main.cf", "smtp_tls_loglvel = 1"), ("master.cf", "  -o smtp_tls_polcy_maps=static:may")],
)
def test_postconf_catches_a_typo(scratch: Path, file: str, typo: str) -> None:
    """The checks above are not vacuous: a misspelt parameter makes postconf warn."""
    with (scratch / file).open("a") as f:
        f.write(typo + "\n")
    done = postconf(scratch, "-n")
    assert "unused parameter" in done.stderr


def test_postfix_check(scratch: Path) -> None:
    """``postfix check`` accepts the configuration without a warning."""
    require_root()
    done = subprocess.run(
        [POSTFIX, "-c", str(scratch), "check"], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


# -- the UNIX socket, end to end --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_socket_activation_reached_from_the_queue_directory(reactor: Any) -> None:
    """The socket unit's socket, handed over as systemd does, answers postmap run as postfix.

    The socket is made as the unit says (path under ``private/``, owner, mode) in a stand-in
    queue directory, the daemon gets it as fd 3 with ``systemd:domain=UNIX:index=0`` and tells
    its readiness on ``$NOTIFY_SOCKET`` (Type=notify), and ``postmap`` uses main.cf's relative
    map name from that directory, as a chrooted smtp(8) does.
    """
    require_postmap()
    unit = read_unit("postfix-mtasts.socket")
    relative = Path(value(unit, "Socket", "ListenStream")).relative_to(QUEUE_DIRECTORY)
    mode = int(value(unit, "Socket", "SocketMode"), 8)
    spec = unix_map_spec()
    as_postfix = os.geteuid() == 0 and _has_user("postfix")
    spool = Path(tempfile.mkdtemp(prefix="pmt-spool-"))
    spool.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon: Daemon | None = None
    try:
        path = spool / relative
        path.parent.mkdir(mode=0o700)
        listener.bind(str(path))
        listener.listen(16)
        path.chmod(mode)
        if as_postfix:
            for p in (path.parent, path):
                shutil.chown(p, value(unit, "Socket", "SocketUser"), "postfix")
        notify.bind(str(spool / "notify"))
        notify.setblocking(False)
        os.set_inheritable(listener.fileno(), True)
        config = spool / "postfix-mtasts.toml"
        config.write_text(
            '[server]\nlisten = ["systemd:domain=UNIX:index=0"]\nallow_root = true\n'
            f'[store]\npath = "{spool}/state/store.sqlite"\n'
        )
        daemon = Daemon(
            config,
            spool / "daemon.log",
            pass_fds=[listener.fileno()],
            LISTEN_FDS="1",
            LISTEN_FDNAMES="postfix-mtasts.socket",
            NOTIFY_SOCKET=str(spool / "notify"),
        )
        wrapper = (
            f"import os, sys; os.dup2({listener.fileno()}, 3);"
            " os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
        )
        daemon.start(prefix=[sys.executable, "-c", wrapper])
        listener.close()
        said: list[bytes] = []
        await daemon.wait_until(reactor, lambda: _received(notify, said, b"READY=1"))

        def lookup(map_spec: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [POSTMAP, "-q", "[192.0.2.1]", map_spec],
                cwd=spool,
                capture_output=True,
                text=True,
                check=False,
                user="postfix" if as_postfix else None,
                env={"PATH": "/usr/sbin:/usr/bin:/bin"},
            )

        # An address literal never has a policy: NOTFOUND, which postmap shows as exit 1 and
        # no output. A lookup error would say so on stderr, as the control below does.
        found = lookup(spec)
        assert (found.returncode, found.stdout, found.stderr) == (1, "", ""), daemon.output()
        missing = lookup(spec.replace(str(relative), f"{relative}-missing"))
        assert "lookup error" in missing.stderr
    finally:
        if daemon is not None:
            daemon.kill()
        listener.close()
        notify.close()
        shutil.rmtree(spool)


def _received(sock: socket.socket, said: list[bytes], wanted: bytes) -> bool:
    with contextlib.suppress(BlockingIOError):
        said.append(sock.recv(4096))
    return any(wanted in message.split(b"\n") for message in said)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("command", ["serve", "tail", "report"])
def test_help_lists_the_options_the_units_use(command: str) -> None:
    """The program's own --help for each subcommand names every option the units give it."""
    options = {
        arg
        for name in [*SERVICES, DROP_IN]
        for argv in [postfix_mtasts_argv(read_unit(name))]
        if argv[0] == command
        for arg in argv[1:]
        if arg.startswith("-") and arg != "-"
    }
    assert options
    done = subprocess.run(
        [*PROGRAM, command, "--help"],
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in options:
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", done.stdout), option
