"""The socketmap load client: a small C program compiled at run time, or a Python fallback.

Both take the same arguments and print the same JSON line (see ``smclient.c``); the client
runs as a subprocess pinned to the CPUs the daemon is not on, and reports its own CPU time
so the table can show what the load itself cost.

``python -m bench.client HOST PORT KEYFILE CONNS DEPTH SECONDS MAX_REQUESTS ONCE TIMEOUT``
runs the Python fallback directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.testbed import child_setup

SOURCE = Path(__file__).with_name("smclient.c")


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured (latencies in microseconds)."""

    requests: int
    answered: int
    unanswered: int
    elapsed: float
    client_cpu: float
    ok: int
    notfound: int
    temp: int
    other: int
    errors: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @property
    def rate(self) -> float:
        """Answered requests per second."""
        return self.answered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def client_cpu_per_request_us(self) -> float:
        """The client's own CPU time per answered request, in microseconds."""
        return self.client_cpu / self.answered * 1e6 if self.answered else 0.0


def compiled_client() -> Path | None:
    """The C client, compiled once per source version; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or os.environ.get("BENCH_PYTHON_CLIENT"):
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"postfix-mtasts-smclient-{digest}"
    if target.exists():
        return target
    partial = target.with_suffix(f".{os.getpid()}")
    result = subprocess.run(
        [cc, "-O2", "-o", str(partial), str(SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.stderr.write(f"bench: cannot compile the C client, using Python:\n{result.stderr}")
        return None
    partial.replace(target)
    return target


def run_load(
    address: tuple[str, int],
    key_file: Path,
    *,
    conns: int,
    depth: int = 1,
    seconds: float = 0.0,
    max_requests: int = 0,
    once: bool = False,
    timeout: float = 60.0,
    cpus: set[int] | None = None,
) -> LoadResult:
    """Run one load against ``address`` and return what it measured.

    ``seconds`` and ``max_requests`` bound the requests sent (0: unbounded; give one);
    ``once`` asks each key of ``key_file`` exactly once; ``timeout`` bounds the whole run.
    """
    binary = compiled_client()
    args = [
        address[0],
        str(address[1]),
        str(key_file),
        str(conns),
        str(depth),
        repr(seconds if seconds > 0 else timeout),
        str(max_requests),
        "1" if once else "0",
        repr(timeout),
    ]
    argv = [str(binary), *args] if binary else [sys.executable, "-m", "bench.client", *args]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        # The bench runs no threads, so preexec_fn is safe here.
        preexec_fn=lambda: child_setup(cpus),
    )
    if result.returncode != 0:
        raise RuntimeError(f"load client failed ({result.returncode}): {result.stderr.strip()}")
    return LoadResult(**json.loads(result.stdout))


def write_keys(path: Path, keys: Sequence[str], name: str = "postfix") -> Path:
    """Write a key file: one request payload (``"<map name> <key>"``) per line."""
    path.write_text("".join(f"{name} {key}\n" for key in keys))
    return path


# -- the Python fallback ---------------------------------------------------------------------


class _Conn:
    __slots__ = ("buf", "cursor", "sent", "sock")

    def __init__(self, sock: socket.socket, cursor: int) -> None:
        self.sock = sock
        self.buf = b""
        self.cursor = cursor
        self.sent: list[int] = []


def _python_client(argv: Sequence[str]) -> dict[str, float]:
    host, port, key_file = argv[0], int(argv[1]), argv[2]
    nconns, depth = int(argv[3]), int(argv[4])
    seconds, max_requests, once, timeout = (
        float(argv[5]),
        int(argv[6]),
        argv[7] == "1",
        float(argv[8]),
    )
    keys = []
    for line in Path(key_file).read_text().splitlines():
        payload = line.encode()
        keys.append(b"%d:%s," % (len(payload), payload))
    sel = selectors.DefaultSelector()
    conns = []
    for i in range(nconns):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, i * len(keys) // nconns)
        conns.append(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
    counts = dict.fromkeys(("ok", "notfound", "temp", "other", "errors"), 0)
    latencies: list[int] = []
    issued = answered = lost = 0
    shared = 0
    stopping = False
    clock = time.perf_counter_ns
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = clock()
    stop_at = t0 + int(seconds * 1e9)
    give_up = t0 + int(timeout * 1e9)

    def send_next(conn: _Conn) -> None:
        nonlocal issued, shared
        if stopping or (max_requests and issued >= max_requests):
            return
        if once:
            if shared >= len(keys):
                return
            key = keys[shared]
            shared += 1
        else:
            key = keys[conn.cursor % len(keys)]
            conn.cursor += 1
        conn.sock.sendall(key)
        conn.sent.append(clock())
        issued += 1

    for _ in range(depth):
        for conn in conns:
            send_next(conn)
    live = len(conns)
    while live:
        now = clock()
        if now >= stop_at:
            stopping = True
        if now >= give_up:
            break
        if answered + lost >= issued and (
            stopping or (max_requests and issued >= max_requests) or (once and shared >= len(keys))
        ):
            break
        for selected, _ in sel.select(0.1):
            conn = selected.data
            data = conn.sock.recv(65536)
            now = clock()
            if not data:
                counts["errors"] += 1
                lost += len(conn.sent)
                conn.sent.clear()
                sel.unregister(conn.sock)
                live -= 1
                continue
            buf = conn.buf + data
            while True:
                colon = buf.find(b":")
                if colon < 0:
                    break
                end = colon + 1 + int(buf[:colon])
                if end >= len(buf):
                    break
                reply = buf[colon + 1 : end]
                buf = buf[end + 1 :]
                kind = (
                    "ok"
                    if reply.startswith(b"OK ")
                    else "notfound"
                    if reply.startswith(b"NOTFOUND")
                    else "temp"
                    if reply.startswith(b"TEMP")
                    else "other"
                )
                counts[kind] += 1
                latencies.append(now - conn.sent.pop(0))
                answered += 1
                send_next(conn)
            conn.buf = buf
    elapsed = (clock() - t0) / 1e9
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[round(q * (len(latencies) - 1))] / 1000 if latencies else 0.0

    for conn in conns:
        conn.sock.close()
    return {
        "requests": issued,
        "answered": answered,
        "unanswered": issued - answered,
        "elapsed": elapsed,
        "client_cpu": cpu,
        **counts,
        "p50_us": pct(0.5),
        "p90_us": pct(0.9),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": latencies[-1] / 1000 if latencies else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the Python fallback client with smclient's arguments; print its JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 9:
        sys.stderr.write(
            "usage: python -m bench.client HOST PORT KEYFILE CONNS DEPTH SECONDS"
            " MAX_REQUESTS ONCE TIMEOUT\n"
        )
        raise SystemExit(2)
    print(json.dumps(_python_client(args)))


if __name__ == "__main__":
    main()
