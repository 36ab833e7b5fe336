"""``--profile DIR``: sample the daemon with py-spy while a group runs; say where time goes.

py-spy comes from PyPI into its own virtualenv (``bench/.tools-venv``) unless it is already
on the PATH. It samples without pausing the daemon (``--nonblocking``) on the CPUs the daemon
is not on. Each sample is put in one *area* by its innermost frame that belongs to a known
one (so time in the standard library counts for the code that called it), and the table
shows each area's share of the daemon's busy samples, with the functions that took the most
time themselves.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.testbed import Process, Testbed
from bench.tools import venv_tool

VENV = Path(__file__).resolve().parent / ".tools-venv"
RATE = 200

AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("TLS (OpenSSL, certificate checks)", ("OpenSSL/", "cryptography/", "service_identity/")),
    ("TLS glue (twisted.protocols.tls)", ("twisted/protocols/tls.py", "twisted/internet/_ssl")),
    ("DNS messages (dnspython)", ("dns/",)),
    ("DNS client (mtasts/dns.py, UDP ports)", ("postfix_mtasts/mtasts/dns.py", "internet/udp.py")),
    ("HTTP client (twisted.web)", ("twisted/web/",)),
    ("policy fetcher (mtasts/fetch.py)", ("postfix_mtasts/mtasts/fetch.py",)),
    (
        "resolver and cache (mtasts/resolver.py)",
        ("postfix_mtasts/mtasts/resolver.py", "cachetools/"),
    ),
    ("policy parsing and replies (mtasts/policy.py)", ("postfix_mtasts/mtasts/policy.py",)),
    ("store (SQLite)", ("postfix_mtasts/store.py",)),
    ("socketmap protocol", ("postfix_mtasts/socketmap.py",)),
    ("logging (twisted.logger)", ("twisted/logger/",)),
    ("Deferreds and coroutines", ("twisted/internet/defer.py",)),
    (
        "reactor and TCP transport",
        tuple(
            f"twisted/internet/{name}.py"
            for name in ("tcp", "epollreactor", "posixbase", "abstract", "base", "main")
        ),
    ),
]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?)(?::\d+)?\)$")


def py_spy() -> Path:
    """The py-spy executable: on the PATH, or installed into :data:`VENV` on first use."""
    found = shutil.which("py-spy")
    return Path(found) if found else venv_tool(VENV, ["py-spy"], "py-spy")


@contextmanager
def sampling(testbed: Testbed, daemon: Process, out: Path) -> Iterator[None]:
    """Sample ``daemon`` into ``out`` (py-spy's raw collapsed stacks) during the block."""
    spy = testbed.spawn(
        f"py-spy-{out.stem}",
        [
            str(py_spy()),
            "record",
            *("--pid", str(daemon.pid), "--rate", str(RATE), "--nonblocking"),
            *("--format", "raw", "--output", str(out)),
        ],
        cpus=testbed.other_cpus,
    )
    try:
        yield
    finally:
        spy.popen.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.popen.wait(30)
        finally:
            testbed.stop(spy)


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        path = match.group("path") if match else frame
        path = "/" + path
        for name, needles in AREAS:
            if any("/" + needle in path for needle in needles):
                return name
    return "other"


def breakdown(raw: Path, top: int = 12) -> str:
    """A text table of where the sampled time went: areas, then the top functions."""
    if not raw.exists():
        return f"(no samples in {raw})"
    areas: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        areas[_area(frames)] += n
        functions[frames[-1] or "(native code)"] += n
    if not total:
        return f"(no samples in {raw})"
    width = max(len(name) for name, _ in AREAS)
    lines = [f"{'area':<{width}}  share", "-" * (width + 7)]
    lines += [f"{name:<{width}}  {n / total:5.1%}" for name, n in areas.most_common()]
    lines += ["", "functions by their own time:"]
    lines += [f"  {n / total:5.1%}  {name}" for name, n in functions.most_common(top)]
    return "\n".join(lines)
