"""The benchmark testbed: DNS, HTTPS policy host and daemons as subprocesses on loopback.

Everything lives on one random ``127.a.b.0/24`` block, so several runs (or the test suite)
never clash: the DNS server on ``.1`` port 53, the HTTPS policy host on ``.2`` port 443 (the
daemon fetches policies from port 443 only), daemons on ``.10`` upwards, port 8461. Each
subprocess runs in its own process group; :class:`Testbed` is a context manager that stops
them all (SIGTERM, then SIGKILL) and removes its temporary directory, whatever happened.

The zone publishes ``_mta-sts.<domain> TXT`` and ``mta-sts.<domain> A`` for every domain
asked for; every policy host answers with the same enforce policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository: subprocesses run from here so ``tests`` and ``bench`` import."""

DOMAIN_SUFFIX = "bench.test"
POLICY_ID = "20261101T000000"
MAX_AGE = 604800
POLICY = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mx1.mail.bench.test\r\n"
    "mx: mx2.mail.bench.test\r\n"
    "mx: *.relay.bench.test\r\n"
    f"max_age: {MAX_AGE}\r\n"
)
DAEMON_PORT = 8461
STOP_GRACE = 5.0


def cpu_split() -> tuple[set[int], set[int]]:
    """``(daemon CPUs, everything-else CPUs)``: one core for the daemon when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, set(cpus[1:])


def domain(kind: str, index: int) -> str:
    """The ``index``-th test domain of a group, e.g. ``hot17.bench.test``."""
    return f"{kind}{index}.{DOMAIN_SUFFIX}"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy() -> float:
    """CPU seconds spent outside the idle task on all CPUs since boot (steal included)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    """CPU seconds used so far by this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_probe(cpus: set[int]) -> float:
    """Milliseconds of CPU that a fixed piece of Python work takes on ``cpus`` now.

    A gauge of how fast those CPUs run at the moment: a busy hyperthread sibling or another
    virtual machine slows them without showing as load on this machine.
    """
    with pinned(cpus):
        started = time.thread_time()
        total = 0
        for i in range(200_000):
            total += i * i
        _names = {i: str(i) for i in range(30_000)}
        return (time.thread_time() - started) * 1000


def proc_rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class BenchError(Exception):
    """The testbed could not be set up or a server misbehaved; ``str()`` says what."""


@dataclass
class Process:
    """A subprocess in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return proc_cpu(self.pid)

    def rss(self) -> int:
        """Resident set size in bytes."""
        return proc_rss(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`BenchError` with the output's tail if the process has exited."""
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not gone within a grace time."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_GRACE)
        else:
            # The leader is gone; children it left in its group must not outlive us either.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


_PR_SET_PDEATHSIG = 1


NICE = -10
"""Priority of the testbed's processes (when allowed), so that other work on a shared
machine disturbs the measurements less; foreign load is still watched and reported."""


def child_setup(cpus: set[int] | None) -> None:
    """In a new child: pin it to ``cpus``, raise its priority, and have it killed (SIGKILL)
    if the bench dies first."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def read_line(stream: IO[bytes], timeout: float, what: Process) -> str:
    """The first line a subprocess prints, within ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                what.check_alive()
                raise BenchError(f"{what.name} printed nothing within {timeout} s")
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                what.check_alive()
                raise BenchError(f"{what.name} closed its output:\n{what.log_tail()}")
            data += chunk
    return data.decode().splitlines()[0]


def wait_listening(address: tuple[str, int], process: Process, timeout: float = 30.0) -> float:
    """Wait until ``address`` accepts TCP connections; returns when (``time.monotonic()``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(address, timeout=1.0):
                return time.monotonic()
        except OSError:
            process.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{process.name} is not listening on {address} after {timeout} s"
                ) from None
            time.sleep(0.005)


@dataclass
class Counts:
    """What a test server reports: totals and per-key counts."""

    total: int
    per_key: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)

    def __sub__(self, other: Counts) -> Counts:
        keys = set(self.per_key) | set(other.per_key)
        types = set(self.by_type) | set(other.by_type)
        return Counts(
            self.total - other.total,
            {k: self.per_key.get(k, 0) - other.per_key.get(k, 0) for k in keys},
            {k: self.by_type.get(k, 0) - other.by_type.get(k, 0) for k in types},
        )


class Testbed:
    """DNS server, HTTPS policy host and any number of daemons, all stopped on exit."""

    def __init__(self, domains: Iterable[str], *, keep: bool = False) -> None:
        self.daemon_cpus, self.other_cpus = cpu_split()
        self.net = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"
        self.dns_host = f"{self.net}.1"
        self.https_host = f"{self.net}.2"
        self._next_host = 10
        self.dir = Path(tempfile.mkdtemp(prefix="postfix-mtasts-bench-"))
        self.ca_file = self.dir / "ca.pem"
        self.domains = list(domains)
        self.keep = keep
        self.processes: list[Process] = []
        self._stats_seq: dict[str, int] = {}
        self._dns: Process | None = None
        self._https: Process | None = None
        self._best_probe = float("inf")

    # -- life ----------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the DNS server and the HTTPS policy host; wait until both serve."""
        os.sched_setaffinity(0, self.other_cpus)
        zone: dict[str, list[list[str]]] = {}
        for name in self.domains:
            zone[f"_mta-sts.{name}"] = [["TXT", f"v=STSv1; id={POLICY_ID}"]]
            zone[f"mta-sts.{name}"] = [["A", self.https_host]]
        zone_file = self.dir / "zone.json"
        zone_file.write_text(json.dumps(zone))
        self._dns = self.spawn(
            "dns-server",
            [
                *(sys.executable, "-m", "tests.dnsserver", "--zone-file", str(zone_file)),
                *("--host", self.dns_host, "--port", "53"),
                *("--stats-file", str(self.dir / "dns.stats")),
            ],
            cpus=self.other_cpus,
            stdout=True,
        )
        https_config = {
            "ca_file": str(self.ca_file),
            "interface": self.https_host,
            "port": 443,
            "stats_file": str(self.dir / "https.stats"),
            "default": {"body": POLICY},
        }
        (self.dir / "https.json").write_text(json.dumps(https_config))
        self._https = self.spawn(
            "https-server",
            [sys.executable, "-m", "tests.httpsserver", str(self.dir / "https.json")],
            cpus=self.other_cpus,
            stdout=True,
        )
        assert self._dns.popen.stdout is not None and self._https.popen.stdout is not None
        read_line(self._dns.popen.stdout, 30.0, self._dns)
        read_line(self._https.popen.stdout, 30.0, self._https)
        for _ in range(5):  # a first idea of how fast the daemon's CPU can run
            self.slowdown()

    def slowdown(self) -> float:
        """How much slower the daemon's CPU runs now than at its best in this run (1.0: not)."""
        probe = cpu_probe(self.daemon_cpus)
        self._best_probe = min(self._best_probe, probe)
        return probe / self._best_probe

    def close(self) -> None:
        """Stop every subprocess (newest first) and remove the temporary directory."""
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
        self.processes = []
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
        stdout: bool = False,
    ) -> Process:
        """Start ``argv`` in its own process group; stderr (and stdout unless kept) to a log."""
        log_path = self.dir / f"{name}.log"
        log = log_path.open("wb")
        started = time.monotonic()
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else log,
                stderr=log,
                env=env,
                start_new_session=True,
                # The bench runs no threads, so preexec_fn is safe here.
                preexec_fn=lambda: child_setup(cpus),  # noqa: PLW1509
            )
        finally:
            log.close()
        process = Process(name, popen, log_path, started)
        self.processes.append(process)
        return process

    def stop(self, process: Process) -> None:
        """Stop one process now and forget it."""
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def new_host(self) -> str:
        """A fresh loopback address of this testbed for one more listener."""
        self._next_host += 1
        return f"{self.net}.{self._next_host}"

    # -- our daemon ---------------------------------------------------------------------

    def daemon(self, name: str, store: Path | None = None) -> tuple[Process, tuple[str, int]]:
        """Start ``postfix-mtasts serve`` on a fresh address; returns it and its address.

        It is not waited for: see :func:`wait_listening`.
        """
        host = self.new_host()
        store = store or self.dir / f"{name}.sqlite"
        config = self.dir / f"{name}.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["tcp:{DAEMON_PORT}:interface={host}"]\n'
            "allow_root = true\n"
            "[dns]\n"
            f'nameservers = ["{self.dns_host}:53"]\n'
            "[https]\n"
            f'ca_file = "{self.ca_file}"\n'
            "[store]\n"
            f'path = "{store}"\n'
        )
        executable = Path(sys.executable).parent / "postfix-mtasts"
        argv = (
            [str(executable)]
            if executable.exists()
            else [sys.executable, "-m", "postfix_mtasts.cli"]
        )
        process = self.spawn(name, [*argv, "serve", "-c", str(config)], cpus=self.daemon_cpus)
        return process, (host, DAEMON_PORT)

    # -- counters of the test servers ------------------------------------------------------

    def dns_counts(self) -> Counts:
        """The DNS server's query counts now (per key ``"name TYPE"``)."""
        assert self._dns is not None
        stats = self._dump(self._dns, self.dir / "dns.stats")
        return Counts(stats["total"], stats["by_name"], stats["by_type"])

    def https_counts(self) -> Counts:
        """The HTTPS server's request counts now (per Host)."""
        assert self._https is not None
        stats = self._dump(self._https, self.dir / "https.stats")
        return Counts(stats["total"], stats["by_host"])

    def _dump(self, process: Process, path: Path, timeout: float = 10.0) -> dict[str, Any]:
        """Ask ``process`` (SIGUSR1) to rewrite its stats file and read the fresh one."""
        seq = self._stats_seq.get(process.name, 0) + 1
        self._stats_seq[process.name] = seq
        os.kill(process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                stats: dict[str, Any] = json.loads(path.read_text())
                if stats["seq"] >= seq:
                    return stats
            process.check_alive()
            time.sleep(0.01)
        raise BenchError(f"{process.name} did not write its stats within {timeout} s")

    def our_cpu(self) -> float:
        """CPU seconds used so far by this process and the testbed's live subprocesses."""
        total = self_cpu()
        for process in self.processes:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += process.cpu()
        return total

    @property
    def servers(self) -> list[Process]:
        """The DNS and HTTPS servers."""
        return [p for p in (self._dns, self._https) if p is not None]


def wait_for_log(process: Process, pattern: str, timeout: float) -> re.Match[str] | None:
    """Poll ``process``'s log until ``pattern`` matches a line; the match, or None."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            match = regex.search(process.log_path.read_text(errors="replace"))
            if match:
                return match
        if process.popen.poll() is not None:
            return None
        time.sleep(0.005)
    return None


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the block with this process pinned to ``cpus``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
