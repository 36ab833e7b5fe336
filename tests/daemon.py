"""Run the real ``postfix-mtasts`` program from integration tests, without blocking the reactor.

The in-process DNS and HTTPS test servers run on the reactor pytest-twisted drives, so the
daemon and its clients (``postmap``, ``postfix-mtasts query``) run as child processes that are
waited on asynchronously.
"""

# twisted.internet.utils has no type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

PROGRAM = [sys.executable, "-m", "postfix_mtasts.cli"]
STARTUP_LIMIT = 200  # polls of 50 ms: the daemon must answer within 10 s
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"


def require_root() -> None:
    """Tests that bind port 443 need root: fail under CI without it, skip elsewhere."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail("this integration test must run as root in CI (it binds port 443)")
    pytest.skip("needs root to bind port 443 (run ./dev test as root)")


def require_postmap() -> None:
    """Postfix's postmap is the real socketmap client: fail under CI without it."""
    if os.path.exists(POSTMAP):
        return
    if os.environ.get("CI"):
        pytest.fail("postmap is missing: ./dev test installs Debian's postfix as root")
    pytest.skip("postmap is missing (apt-get install postfix)")


def require_tool(program: str, package: str) -> None:
    """A test that runs ``program``: fail under CI without it (``./dev test`` installs
    ``package``), skip elsewhere."""
    if shutil.which(program):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{program} is missing: ./dev test installs Debian's {package} as root")
    pytest.skip(f"{program} is missing (apt-get install {package})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


async def run(reactor: Any, args: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """Run ``postfix-mtasts ARGS``; return ``(stdout, stderr, exit code)`` as text."""
    out, err, code = await getProcessOutputAndValue(
        PROGRAM[0], [*PROGRAM[1:], *args], env=env or environment(), reactor=reactor
    )
    return out.decode(), err.decode(), code


async def postmap(reactor: Any, key: str, map_spec: str) -> tuple[str, str, int]:
    """``postmap -q KEY MAP``: Postfix's own socketmap client. Returns (stdout, stderr, code)."""
    out, err, code = await getProcessOutputAndValue(
        POSTMAP, ["-q", key, map_spec], env={"PATH": "/usr/sbin:/usr/bin:/bin"}, reactor=reactor
    )
    return out.decode().rstrip("\n"), err.decode(), code


class Daemon:
    """``postfix-mtasts serve -c CONFIG`` (or other ``args``) as a child process, stopped by
    the test."""

    def __init__(self, config: Path, log: Path, pass_fds: Sequence[int] = (), **env: str):
        self.config = config
        self.log = log
        self.pass_fds = tuple(pass_fds)
        self.env = environment() | env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, prefix: Sequence[str] = (), args: Sequence[str] = ("serve",)) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *PROGRAM, *args, "-c", str(self.config)],
                stdout=log,
                stderr=log,
                env=self.env,
                pass_fds=self.pass_fds,
                start_new_session=True,
            )

    async def wait_listening(self, reactor: Any, host: str, port: int) -> None:
        """Poll until the daemon accepts connections on ``host:port`` (bounded)."""
        await self.wait_until(reactor, lambda: _accepts(host, port))

    async def wait_until(self, reactor: Any, ready: Any) -> None:
        for _ in range(STARTUP_LIMIT):
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited early:\n{self.output()}")
            if ready():
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"the daemon did not get ready:\n{self.output()}")

    async def wait_exit(self, reactor: Any, limit: float = 15.0) -> int:
        assert self.process is not None
        for _ in range(int(limit / 0.05)):
            code = self.process.poll()
            if code is not None:
                return code
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("the daemon did not exit")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, if still running, and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
