"""The peer: postfix-mta-sts-resolver's ``mta-sts-daemon`` on the same testbed.

It is installed from PyPI into its own virtualenv (``bench/.peer-venv``, never the project's
``.venv``), with ``uvloop``, which it uses when present (``--disable-uvloop`` turns it off, so
both of its event loops are measured).

Its DNS goes through c-ares (TXT) and aiohttp's resolver (the policy host's address), both of
which read ``/etc/resolv.conf`` and know no other port than 53. So the peer runs under
``unshare --mount`` with a private bind mount of a ``resolv.conf`` naming the test DNS server
over ``/etc/resolv.conf`` (only its own mount namespace sees it: nothing on the machine
changes), and ``SSL_CERT_FILE`` pointing at the test CA. Its ``cache_grace`` is raised to an
hour so that every timed lookup is a pure cache hit, which is the most favourable setting for
it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from bench.figures import Figure
from bench.map import (
    CACHED_CONNS,
    Address,
    Run,
    Sizes,
    disturbance_note,
    hot_keys,
    measure_herd,
    median_run,
    timed,
    warm,
)
from bench.testbed import DAEMON_PORT, BenchError, Process, Testbed, wait_listening
from bench.tools import venv_tool

VENV = Path(__file__).resolve().parent / ".peer-venv"
PACKAGES = ["postfix-mta-sts-resolver[uvloop]"]


def ensure_venv() -> Path:
    """The peer's ``mta-sts-daemon``, installed into :data:`VENV` on first use."""
    return venv_tool(VENV, PACKAGES, "mta-sts-daemon")


def peer_version() -> str:
    """The installed peer's version."""
    result = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('postfix-mta-sts-resolver'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "?"


def start_peer(testbed: Testbed, name: str, *, uvloop: bool) -> tuple[Process, Address]:
    """Start ``mta-sts-daemon`` on a fresh testbed address, wait until it listens."""
    daemon = ensure_venv()
    if shutil.which("unshare") is None:
        raise BenchError("`unshare` (util-linux) is needed to point the peer at the test DNS")
    host = testbed.new_host()
    config = testbed.dir / f"{name}.yml"
    config.write_text(
        f"host: {host}\n"
        f"port: {DAEMON_PORT}\n"
        "reuse_port: true\n"
        "shutdown_timeout: 1\n"
        "cache_grace: 3600\n"
        "cache:\n"
        "  type: internal\n"
        "  options:\n"
        "    cache_size: 10000\n"
        "default_zone:\n"
        "  strict_testing: false\n"
        "  timeout: 4\n"
    )
    resolv = testbed.dir / "resolv.conf"
    resolv.write_text(f"nameserver {testbed.dns_host}\noptions attempts:1 timeout:2\n")
    command = [str(daemon), "-c", str(config), "-v", "warn"]
    if not uvloop:
        command.append("--disable-uvloop")
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    env = {**os.environ, "SSL_CERT_FILE": str(testbed.ca_file)}
    env.pop("SSL_CERT_DIR", None)
    process = testbed.spawn(
        name,
        ["unshare", "--mount", "sh", "-c", script, "sh", str(resolv), *command],
        cpus=testbed.daemon_cpus,
        env=env,
    )
    address = (host, DAEMON_PORT)
    wait_listening(address, process)
    return process, address


def measure_peer(
    testbed: Testbed, sizes: Sizes, ours: Process, ours_address: Address
) -> list[Figure]:
    """The peer's cached lookups (per event loop in ``sizes``), its herd, and our ratio.

    Our 16-connection runs are interleaved with the peer's (ours, peer, ours, peer, ...), so
    that both meet the same machine; the ratio compares the medians.  The herd (500
    simultaneous requests for one new domain) runs on the uvloop setting only.
    """
    figures: list[Figure] = []
    key_file = hot_keys(testbed, sizes)
    ratios: list[tuple[Run, Run, str]] = []

    def sixteen(daemon: Process, address: Address) -> Run:
        return timed(testbed, daemon, address, key_file, conns=CACHED_CONNS, seconds=sizes.seconds)

    for uvloop in sizes.peer_settings:
        who = "peer (uvloop)" if uvloop else "peer (asyncio)"
        name = "peer-uvloop" if uvloop else "peer-asyncio"
        process, address = start_peer(testbed, name, uvloop=uvloop)
        try:
            warm(testbed, address, key_file, sizes.hot)
            one = timed(testbed, process, address, key_file, conns=1, seconds=sizes.seconds)
            theirs: list[Run] = []
            mine: list[Run] = []
            for _ in range(sizes.peer_rounds):
                mine.append(sixteen(ours, ours_address))
                theirs.append(sixteen(process, address))
            many, ours_many = median_run(theirs), median_run(mine)
            key = name.replace("-", "_")
            figures += [
                Figure(
                    "peer",
                    f"{key}_1conn_rate",
                    f"{who}: cached lookups, 1 connection",
                    round(one.result.rate),
                    "/s",
                ),
                Figure(
                    "peer",
                    f"{key}_1conn_p99",
                    f"{who}:   latency p99, 1 connection",
                    one.result.p99_us / 1000,
                    "ms",
                ),
                Figure(
                    "peer",
                    f"{key}_16conn_rate",
                    f"{who}: cached lookups, {CACHED_CONNS} connections",
                    round(many.result.rate),
                    "/s",
                    note=disturbance_note(theirs + mine),
                ),
                Figure(
                    "peer",
                    f"{key}_16conn_daemon_cpu",
                    f"{who}:   daemon CPU per lookup, {CACHED_CONNS} connections",
                    many.daemon_cpu_us,
                    "µs",
                ),
                Figure(
                    "peer",
                    f"{key}_ours_16conn_rate",
                    f"{who}:   ours in the same rounds, {CACHED_CONNS} connections",
                    round(ours_many.result.rate),
                    "/s",
                ),
            ]
            ratios.append((ours_many, many, who))
            if uvloop:
                figures += [
                    replace(f, key=f"{key}_{f.key}")
                    for f in measure_herd(
                        testbed, process, address, shapes=("conns",), first_domain=2, who=who
                    )
                ]
        finally:
            testbed.stop(process)
    our_run, peer_run, who = min(ratios, key=lambda r: r[0].result.rate / r[1].result.rate)
    rounds = f"medians of {sizes.peer_rounds} interleaved rounds"
    figures += [
        Figure(
            "peer",
            "peer_ratio",
            f"ours / peer, cached lookups per second over {CACHED_CONNS} connections",
            our_run.result.rate / peer_run.result.rate,
            "x",
            ">= 2",
            note=f"the lowest ratio over the peer settings measured ({who}); {rounds}",
        ),
        Figure(
            "peer",
            "peer_cpu_ratio",
            f"peer / ours, daemon CPU per cached lookup over {CACHED_CONNS} connections",
            peer_run.daemon_cpu_us / our_run.daemon_cpu_us if our_run.daemon_cpu_us else None,
            "x",
        ),
    ]
    return figures
