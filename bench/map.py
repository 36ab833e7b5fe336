"""The policy map's measurements: cached and cold lookups, coalescing, loading a big store.

Each ``measure_*`` function takes a running :class:`~bench.testbed.Testbed` (and a daemon when
it needs one), runs bounded loads and returns :class:`~bench.figures.Figure` objects.

Timed runs watch the machine: CPU time spent by processes other than the testbed's (other
work on a shared machine) shows up as ``foreign`` load, and a fixed piece of work timed on
the daemon's CPU before and after shows whether that CPU ran slower than at its best (a busy
hyperthread sibling or another virtual machine). A cached-lookup run with more than
:data:`FOREIGN_LIMIT` of foreign load or a slowdown over :data:`SLOW_LIMIT` is repeated (up to
:data:`ATTEMPTS` times), the calmest attempt kept, and the figure flagged if none was calm.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.client import LoadResult, run_load, write_keys
from bench.figures import Figure
from bench.testbed import (
    POLICY_ID,
    BenchError,
    Process,
    Testbed,
    domain,
    read_line,
    system_busy,
    wait_for_log,
    wait_listening,
)

CACHED_CONNS = 16
HERD = 500
"""Simultaneous requests for one uncached domain."""
COLD_CONNS = 50
"""Connections asking for never-seen domains at once (Postfix runs up to 100 smtp(8))."""
STORE_POLICIES = 100_000
FOREIGN_LIMIT = 0.10
"""CPUs' worth of other processes' work beyond which a timed run is repeated."""
SLOW_LIMIT = 1.3
"""How much slower than its best the daemon's CPU may run before a timed run is repeated."""
ATTEMPTS = 3

Address = tuple[str, int]


@dataclass(frozen=True)
class Sizes:
    """How long and how much: the full run, or ``--quick``."""

    hot: int
    """Domains the cached-lookup runs cycle over (each fetched once to warm the cache)."""
    seconds: float
    """Length of one timed cached-lookup run."""
    repeats: int
    """Timed runs per figure (the median is shown)."""
    cold: int
    """Never-seen domains in the cold run."""
    peer_rounds: int
    """Interleaved rounds (ours, then the peer's) per peer setting."""
    peer_settings: tuple[bool, ...]
    """The peer's event loops to measure: True for uvloop, False for asyncio."""

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        """The sizes of a ``--quick`` run or of a full one."""
        if quick:
            return cls(200, seconds=2.0, repeats=1, cold=400, peer_rounds=3, peer_settings=(True,))
        return cls(
            1000, seconds=3.0, repeats=3, cold=2000, peer_rounds=5, peer_settings=(True, False)
        )


@dataclass(frozen=True)
class Run:
    """One timed load: what the client saw, the daemon's CPU per request, disturbances."""

    result: LoadResult
    daemon_cpu_us: float
    foreign: float
    """Other processes' CPU time during the run, in CPUs."""
    slowdown: float
    """How much slower than its best the daemon's CPU ran around the run (1.0: not)."""

    @property
    def disturbed(self) -> float:
        """0 for a calm run; more the more it was disturbed."""
        return max(self.foreign / FOREIGN_LIMIT, (self.slowdown - 1) / (SLOW_LIMIT - 1))


def hot_domains(count: int) -> list[str]:
    """The domains of the cached-lookup runs."""
    return [domain("hot", i) for i in range(count)]


def cold_domains(count: int) -> list[str]:
    """``count`` domains that only the cold run asks for."""
    return [domain("cold", i) for i in range(count)]


def herd_domains() -> list[str]:
    """One fresh domain per herd run (ours over connections, ours pipelined, the peer)."""
    return [domain("herd", i) for i in range(4)]


def measured(
    testbed: Testbed, daemon: Process, load: Callable[[], LoadResult]
) -> tuple[LoadResult, float, float]:
    """Run ``load``: its result, the daemon's CPU seconds, foreign load in CPUs."""
    busy0, ours0, cpu0 = system_busy(), testbed.our_cpu(), daemon.cpu()
    result = load()
    cpu = daemon.cpu() - cpu0
    ours = testbed.our_cpu() - ours0 + result.client_cpu
    busy = system_busy() - busy0
    daemon.check_alive()
    foreign = max(0.0, busy - ours) / result.elapsed if result.elapsed > 0 else 0.0
    return result, cpu, foreign


def timed(
    testbed: Testbed,
    daemon: Process,
    address: Address,
    key_file: Path,
    *,
    conns: int,
    seconds: float,
) -> Run:
    """A timed cached-lookup run, repeated (up to ``ATTEMPTS`` times) while disturbed."""
    best: Run | None = None
    for _ in range(ATTEMPTS):
        before = testbed.slowdown()
        result, cpu, foreign = measured(
            testbed,
            daemon,
            lambda: run_load(
                address,
                key_file,
                conns=conns,
                seconds=seconds,
                timeout=seconds + 30,
                cpus=testbed.other_cpus,
            ),
        )
        slowdown = max(before, testbed.slowdown())
        if result.ok != result.answered or result.unanswered or result.errors:
            raise BenchError(f"cached run: not every request got an OK reply: {result}")
        per_request = cpu / result.answered * 1e6 if result.answered else 0.0
        run = Run(result, per_request, foreign, slowdown)
        if best is None or run.disturbed < best.disturbed:
            best = run
        if run.disturbed <= 1:
            break
    assert best is not None
    return best


def median_run(runs: Sequence[Run]) -> Run:
    """The run with the median rate."""
    ordered = sorted(runs, key=lambda r: r.result.rate)
    return ordered[len(ordered) // 2]


def warm(testbed: Testbed, address: Address, key_file: Path, keys: int) -> None:
    """Ask every key once (16 at a time) so that it is cached; fail loudly if one is not OK."""
    result = run_load(
        address, key_file, conns=CACHED_CONNS, once=True, timeout=120.0, cpus=testbed.other_cpus
    )
    if result.ok != keys:
        raise BenchError(f"warming: {result.ok} of {keys} keys answered OK ({result})")
    # A short untimed run, so that the first timed one starts in a steady state.
    run_load(address, key_file, conns=CACHED_CONNS, seconds=0.5, cpus=testbed.other_cpus)


def hot_keys(testbed: Testbed, sizes: Sizes) -> Path:
    """The key file of the hot domains."""
    return write_keys(testbed.dir / "hot.keys", hot_domains(sizes.hot))


def disturbance_note(runs: Sequence[Run]) -> str:
    """A warning for a figure whose runs were disturbed; "" when none was."""
    worst = max(runs, key=lambda r: r.disturbed)
    if worst.disturbed <= 1:
        return ""
    return (
        f"disturbed: other processes used up to {worst.foreign:.0%} of a CPU, and the"
        f" daemon's CPU ran up to {worst.slowdown:.2f}x slower than at its best;"
        " less reliable, run again"
    )


def measure_cached(
    testbed: Testbed,
    daemon: Process,
    address: Address,
    sizes: Sizes,
    sample: Callable[[], AbstractContextManager[None]] | None = None,
) -> list[Figure]:
    """Cached lookups per second over 1 and 16 sequential connections; latency at 1.

    ``sample``, if given, wraps the 16-connection runs (for ``--profile``).
    """
    key_file = hot_keys(testbed, sizes)
    warm(testbed, address, key_file, sizes.hot)
    ones = [
        timed(testbed, daemon, address, key_file, conns=1, seconds=sizes.seconds)
        for _ in range(sizes.repeats)
    ]
    with sample() if sample is not None else contextlib.nullcontext():
        manys = [
            timed(testbed, daemon, address, key_file, conns=CACHED_CONNS, seconds=sizes.seconds)
            for _ in range(sizes.repeats)
        ]
    one, many = median_run(ones), median_run(manys)
    g = "cached"
    return [
        Figure(
            g,
            "cached_1conn_rate",
            "cached lookups, 1 connection",
            round(one.result.rate),
            "/s",
            note=disturbance_note(ones),
        ),
        Figure(
            g, "cached_1conn_p50", "  latency p50, 1 connection", one.result.p50_us / 1000, "ms"
        ),
        Figure(
            g,
            "cached_1conn_p99",
            "  latency p99, 1 connection",
            one.result.p99_us / 1000,
            "ms",
            "<= 1",
        ),
        Figure(
            g,
            "cached_1conn_daemon_cpu",
            "  daemon CPU per lookup, 1 connection",
            one.daemon_cpu_us,
            "µs",
        ),
        Figure(
            g,
            "cached_16conn_rate",
            f"cached lookups, {CACHED_CONNS} connections",
            round(many.result.rate),
            "/s",
            ">= 30000",
            note=disturbance_note(manys),
        ),
        Figure(
            g,
            "cached_16conn_p99",
            f"  latency p99, {CACHED_CONNS} connections",
            many.result.p99_us / 1000,
            "ms",
        ),
        Figure(
            g,
            "cached_16conn_daemon_cpu",
            f"  daemon CPU per lookup, {CACHED_CONNS} connections",
            many.daemon_cpu_us,
            "µs",
        ),
        Figure(
            g,
            "cached_16conn_daemon_busy",
            f"  daemon CPU busy, {CACHED_CONNS} connections",
            many.daemon_cpu_us * many.result.rate / 1e6 * 100,
            "%",
        ),
        Figure(
            g,
            "cached_foreign",
            "  other processes' CPU during these runs, at most",
            max(r.foreign for r in [*ones, *manys]) * 100,
            "%",
        ),
        Figure(
            g,
            "cached_slowdown",
            "  daemon's CPU slower than at its best, at most",
            max(r.slowdown for r in [*ones, *manys]),
            "x",
        ),
        Figure(
            g,
            "cached_client_cpu",
            f"  load client CPU per lookup, {CACHED_CONNS} connections",
            many.result.client_cpu_per_request_us,
            "µs",
        ),
    ]


def measure_cold(testbed: Testbed, daemon: Process, address: Address, sizes: Sizes) -> list[Figure]:
    """Never-seen domains with an enforce policy, ``COLD_CONNS`` at a time: rate and CPU."""
    domains = cold_domains(sizes.cold)
    key_file = write_keys(testbed.dir / "cold.keys", domains)
    dns0, https0 = testbed.dns_counts(), testbed.https_counts()
    servers0 = sum(p.cpu() for p in testbed.servers)
    before = testbed.slowdown()
    result, cpu, foreign = measured(
        testbed,
        daemon,
        lambda: run_load(
            address, key_file, conns=COLD_CONNS, once=True, timeout=120.0, cpus=testbed.other_cpus
        ),
    )
    slowdown = max(before, testbed.slowdown())
    servers = sum(p.cpu() for p in testbed.servers) - servers0
    dns, https = testbed.dns_counts() - dns0, testbed.https_counts() - https0
    if result.ok != len(domains):
        raise BenchError(f"cold run: {result.ok} of {len(domains)} domains answered OK: {result}")
    fetches = https.total
    floor = fetch_floor(testbed, sizes.cold // 2)
    g = "cold"
    note = f"{cpu:.2f} s of daemon CPU for {fetches} fetches: DNS, TLS, HTTP, parsing, store, logs"
    if foreign > FOREIGN_LIMIT or slowdown > SLOW_LIMIT:
        note += (
            f"; disturbed: other processes used {foreign:.0%} of a CPU meanwhile, and the"
            f" daemon's CPU ran up to {slowdown:.2f}x slower than at its best"
        )
    return [
        Figure(g, "cold_rate", f"cold lookups, {COLD_CONNS} connections", round(result.rate), "/s"),
        Figure(g, "cold_p50", "  latency p50", result.p50_us / 1000, "ms"),
        Figure(g, "cold_p99", "  latency p99", result.p99_us / 1000, "ms"),
        Figure(
            g,
            "cold_cpu_per_fetch",
            "  daemon CPU per fetched policy",
            cpu / fetches * 1000 if fetches else None,
            "ms",
            "<= 2",
            note=note,
        ),
        Figure(g, "cold_daemon_busy", "  daemon CPU busy", cpu / result.elapsed * 100, "%"),
        Figure(g, "cold_fetches", "  HTTPS fetches", fetches, "", f"== {len(domains)}"),
        Figure(g, "cold_dns_per_domain", "  DNS queries per domain", dns.total / len(domains), ""),
        Figure(
            g,
            "cold_floor_fetch",
            "  one fetch alone (TCP, TLS, HTTP)",
            floor["fetch"],
            "ms",
            note="the floor under the daemon's CPU per fetched policy: its fetcher in a bare"
            " process, the address given (no DNS, store or socketmap); see bench/floor.py",
        ),
        Figure(g, "cold_floor_agent", "    stock Agent + TLS policy", floor["agent"], "ms"),
        Figure(g, "cold_floor_dns", "  one DNS query alone", floor["dns"], "ms"),
        Figure(
            g,
            "cold_testbed_cpu_per_fetch",
            "  test DNS + HTTPS servers' CPU per fetch",
            servers / fetches * 1000 if fetches else None,
            "ms",
        ),
    ]


def fetch_floor(testbed: Testbed, count: int) -> dict[str, float]:
    """CPU ms per step of a cold lookup, each alone, on the daemon's CPU (bench/floor.py)."""
    process = testbed.spawn(
        "floor",
        [
            sys.executable,
            "-m",
            "bench.floor",
            str(testbed.ca_file),
            testbed.https_host,
            testbed.dns_host,
            str(count),
        ],
        cpus=testbed.daemon_cpus,
        stdout=True,
    )
    try:
        assert process.popen.stdout is not None
        figures: dict[str, float] = json.loads(read_line(process.popen.stdout, 120.0, process))
    finally:
        testbed.stop(process)
    return figures


def herd(
    testbed: Testbed, address: Address, name: str, *, conns: int, depth: int
) -> tuple[LoadResult, int, int]:
    """``HERD`` requests for one uncached domain at once: the result, TXT queries, fetches.

    The client opens every connection first, then sends all the requests in one burst.
    """
    key_file = write_keys(testbed.dir / f"{name}.keys", [name] * HERD)
    dns0, https0 = testbed.dns_counts(), testbed.https_counts()
    result = run_load(
        address,
        key_file,
        conns=conns,
        depth=depth,
        once=True,
        timeout=60.0,
        cpus=testbed.other_cpus,
    )
    dns, https = testbed.dns_counts() - dns0, testbed.https_counts() - https0
    return (
        result,
        dns.per_key.get(f"_mta-sts.{name} TXT", 0),
        https.per_key.get(f"mta-sts.{name}", 0),
    )


HERD_SHAPES = {
    "conns": ("500 connections", HERD, 1),
    "pipelined": ("1 connection, pipelined", 1, HERD),
}


def measure_herd(
    testbed: Testbed,
    daemon: Process,
    address: Address,
    *,
    shapes: Sequence[str] = ("conns", "pipelined"),
    first_domain: int = 0,
    who: str = "",
) -> list[Figure]:
    """500 simultaneous requests for one uncached domain: exactly one TXT query and one fetch."""
    figures = []
    ours = not who
    prefix = f"{who}: " if who else ""
    g = "peer" if who else "herd"
    for i, shape in enumerate(shapes):
        label, conns, depth = HERD_SHAPES[shape]
        name = herd_domains()[first_domain + i]
        result, txt, fetches = herd(testbed, address, name, conns=conns, depth=depth)
        daemon.check_alive()
        key = f"herd_{shape}"
        figures += [
            Figure(
                g,
                f"{key}_txt",
                f"{prefix}{HERD} requests for one new domain, {label}: TXT queries",
                txt,
                "",
                "== 1" if ours else None,
            ),
            Figure(
                g,
                f"{key}_fetches",
                f"{prefix}  HTTPS fetches",
                fetches,
                "",
                "== 1" if ours else None,
            ),
            Figure(
                g,
                f"{key}_ok",
                f"{prefix}  OK replies",
                result.ok,
                "",
                f"== {HERD}" if ours else None,
            ),
            Figure(
                g,
                f"{key}_time",
                f"{prefix}  time until the last reply",
                result.elapsed * 1000,
                "ms",
            ),
        ]
    return figures


# -- a big store --------------------------------------------------------------------------


def _policies(now: float, rng: random.Random) -> Callable[[int], Any]:
    """A factory of realistic ``StoredPolicy`` rows: own MX hosts, big providers, testing."""
    from postfix_mtasts.mtasts.policy import parse_policy
    from postfix_mtasts.store import StoredPolicy

    def body(mode: str, mx: Sequence[str], max_age: int) -> bytes:
        lines = [
            "version: STSv1",
            f"mode: {mode}",
            *(f"mx: {m}" for m in mx),
            f"max_age: {max_age}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    google = parse_policy(
        body(
            "enforce",
            ["smtp.google.com", "aspmx.l.google.com", "*.aspmx.l.google.com", "*.googlemail.com"],
            86400,
        )
    )
    microsoft = parse_policy(body("enforce", ["*.mail.protection.outlook.com"], 604800))
    own = parse_policy(body("enforce", ["mx1.example.test", "mx2.example.test"], 604800))
    testing = parse_policy(body("testing", ["*.example.test"], 86400))

    def make(i: int) -> Any:
        name = domain("st", i)
        pick = rng.random()
        if pick < 0.2:
            policy = google
        elif pick < 0.35:
            policy = microsoft
        else:
            template = own if pick < 0.95 else testing
            policy = replace(
                template,
                mx=tuple(m.replace("example.test", name) for m in template.mx),
                lines=tuple(line.replace("example.test", name) for line in template.lines),
            )
        # Fetched in the last 6 hours: unexpired, and no refresh falls due while measuring.
        fetched = now - rng.uniform(0, 6 * 3600)
        refresh = fetched + min(86400, policy.max_age / 2) * rng.uniform(0.9, 1.0)
        return StoredPolicy(name, POLICY_ID, policy, fetched, fetched + policy.max_age, refresh)

    return make


def build_store(path: Path, count: int, seed: int = 8461) -> float:
    """Write ``count`` policies to a new store at ``path`` with ``Store.save_policy``; seconds.

    Built on tmpfs when there is one (each save is a transaction of its own), then copied.
    """
    from postfix_mtasts.store import Store

    started = time.monotonic()
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else path.parent))
    try:
        store = Store(work / "store.sqlite")
        make = _policies(time.time(), random.Random(seed))
        try:
            for i in range(count):
                store.save_policy(make(i))
        finally:
            store.close()
        shutil.copyfile(work / "store.sqlite", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return time.monotonic() - started


@dataclass(frozen=True)
class Start:
    """A daemon's start on a store: seconds to the first answer, policies loaded, RSS."""

    first_answer: float
    loaded: int | None
    rss: int


def start_on(testbed: Testbed, name: str, store: Path, key: str) -> Start:
    """Start a daemon on ``store``, time its first answer (for ``key``), read its RSS, stop it."""
    daemon, address = testbed.daemon(name, store)
    try:
        wait_listening(address, daemon, timeout=60.0)
        key_file = write_keys(testbed.dir / f"{name}.keys", [key])
        result = run_load(
            address, key_file, conns=1, once=True, timeout=30.0, cpus=testbed.other_cpus
        )
        answered = time.monotonic()
        if result.answered != 1:
            raise BenchError(f"{name}: no answer to the first request: {result}")
        loaded = wait_for_log(daemon, r"(\d+) policies loaded", 5.0)
        time.sleep(0.2)  # let the background check of the first key settle
        return Start(
            answered - daemon.started, int(loaded.group(1)) if loaded else None, daemon.rss()
        )
    finally:
        testbed.stop(daemon)


def measure_store(testbed: Testbed) -> list[Figure]:
    """RSS with 100,000 stored policies, and the time from the start to the first answer."""
    count = STORE_POLICIES
    store = testbed.dir / "big.sqlite"
    built = build_store(store, count)
    empty = start_on(testbed, "empty-store", testbed.dir / "empty.sqlite", domain("hot", 0))
    big = start_on(testbed, "big-store", store, domain("st", 7))
    if big.loaded is not None and big.loaded != count:
        raise BenchError(f"the daemon loaded {big.loaded} policies of {count}")
    g = "store"
    return [
        Figure(
            g, "store_build", f"building a store of {count:,} policies (save_policy)", built, "s"
        ),
        Figure(g, "store_size", "  store file size", store.stat().st_size / 2**20, "MiB"),
        Figure(
            g,
            "store_first_answer",
            f"start with {count:,} stored policies, to the first answer",
            big.first_answer,
            "s",
            "<= 3",
            note="from the process start, interpreter start-up and imports included",
        ),
        Figure(
            g, "store_empty_first_answer", "  the same with an empty store", empty.first_answer, "s"
        ),
        Figure(
            g,
            "store_rss",
            f"  daemon RSS with {count:,} policies",
            big.rss / 2**20,
            "MiB",
            "<= 200",
        ),
        Figure(g, "store_empty_rss", "  daemon RSS with an empty store", empty.rss / 2**20, "MiB"),
    ]


@contextlib.contextmanager
def main_daemon(testbed: Testbed) -> Iterator[tuple[Process, Address]]:
    """Our daemon on a fresh store, listening; stopped on exit."""
    daemon, address = testbed.daemon("postfix-mtasts")
    try:
        wait_listening(address, daemon)
        yield daemon, address
    finally:
        testbed.stop(daemon)
