"""``python -m bench [--quick] [--peer] [--only NAME] [--json FILE]``: the benchmarks.

Groups (``--only`` takes one or more, comma-separated):

- ``cached``: cached lookups per second over 1 and 16 connections, latency at 1;
- ``cold``: never-seen domains with an enforce policy, and the daemon's CPU per fetch; then
  the floor under it: one fetch and one DNS query, each alone (``bench/floor.py``);
- ``herd``: 500 simultaneous requests for one uncached domain (TXT queries, fetches);
- ``store``: RSS with 100,000 stored policies and the time until the first answer;
- ``peer``: postfix-mta-sts-resolver on the same testbed, and our ratio from interleaved
  runs. Only with ``--peer`` or ``--only peer``;
- ``parse``: the reporter's log parser alone over a realistic mixed mail log, per time stamp
  format, in lines per CPU second;
- ``tail``: ``postfix-mtasts tail --once`` end to end into a fresh store, for two log lengths:
  lines per CPU second and peak RSS;
- ``reports``: building the reports of a day with 10,000 policy domains.

Everything runs on loopback, in subprocesses that are stopped when the run ends. The exit
status is 0 when every target is met, 1 when one is missed or the run failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import ingest as bench_ingest
from bench import map as bench_map
from bench.client import compiled_client
from bench.figures import Figure, table, write_json
from bench.testbed import BenchError, Process, Testbed

MAP_GROUPS = ("cached", "cold", "herd", "store", "peer")
REPORTER_GROUPS = ("parse", "tail", "reports")
GROUPS = MAP_GROUPS + REPORTER_GROUPS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    parser.add_argument("--peer", action="store_true", help="also measure postfix-mta-sts-resolver")
    parser.add_argument(
        "--only", metavar="NAME", help=f"comma-separated groups: {', '.join(GROUPS)}"
    )
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="sample our daemon with py-spy during the cached and cold groups; write to DIR",
    )
    args = parser.parse_args(argv)
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    else:
        groups = [g for g in GROUPS if g != "peer" or args.peer]
    args.groups = groups
    args.profiled = []
    return args


def environment(testbed: Testbed | None, args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "quick": args.quick,
        "groups": args.groups,
    }
    if testbed is not None:
        env["daemon_cpus"] = sorted(testbed.daemon_cpus)
        env["other_cpus"] = sorted(testbed.other_cpus)
        env["client"] = "C" if compiled_client() else "Python"
    return env


def run(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    figures: list[Figure] = []
    env = environment(None, args)
    if set(MAP_GROUPS) & set(args.groups):
        figures, env = run_map(args)
    reporter = [g for g in args.groups if g in REPORTER_GROUPS]
    if reporter:
        figures += bench_ingest.measure(reporter, args.quick, progress)
    return figures, env


def run_map(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    sizes = bench_map.Sizes.for_run(args.quick)
    groups = args.groups
    domains = bench_map.hot_domains(sizes.hot) + bench_map.herd_domains()
    if "cold" in groups:
        domains += bench_map.cold_domains(sizes.cold)
    figures: list[Figure] = []
    with Testbed(domains, keep=args.keep) as testbed:
        env = environment(testbed, args)
        if args.keep:
            sys.stderr.write(f"bench: logs in {testbed.dir}\n")
        if {"cached", "cold", "herd", "peer"} & set(groups):
            with bench_map.main_daemon(testbed) as (daemon, address):
                if "cached" in groups:
                    progress("cached lookups")
                    figures += bench_map.measure_cached(
                        testbed,
                        daemon,
                        address,
                        sizes,
                        lambda: profiling(args, testbed, daemon, "cached"),
                    )
                if "herd" in groups:
                    progress(f"{bench_map.HERD} simultaneous requests for one new domain")
                    figures += bench_map.measure_herd(testbed, daemon, address)
                if "cold" in groups:
                    progress(f"cold lookups ({sizes.cold} domains)")
                    with profiling(args, testbed, daemon, "cold"):
                        figures += bench_map.measure_cold(testbed, daemon, address, sizes)
                if "peer" in groups:
                    progress("the peer, postfix-mta-sts-resolver")
                    figures += measure_peer(testbed, sizes, daemon, address, env)
        if "store" in groups:
            progress(f"a store of {bench_map.STORE_POLICIES:,} policies")
            figures += bench_map.measure_store(testbed)
    return figures, env


def measure_peer(
    testbed: Testbed,
    sizes: bench_map.Sizes,
    daemon: Process,
    address: tuple[str, int],
    env: dict[str, Any],
) -> list[Figure]:
    """The peer's figures, or one saying why it could not be measured."""
    from bench import peer

    try:
        figures = peer.measure_peer(testbed, sizes, daemon, address)
    except BenchError as e:
        return [Figure("peer", "peer_error", "peer: not measured", None, "", note=str(e))]
    env["peer_version"] = peer.peer_version()
    return figures


@contextlib.contextmanager
def profiling(
    args: argparse.Namespace, testbed: Testbed, daemon: Process, group: str
) -> Iterator[None]:
    """With ``--profile``: sample the daemon during the block into ``DIR/<group>.txt``."""
    if args.profile is None:
        yield
        return
    from bench import profile

    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{group}.txt"
    with profile.sampling(testbed, daemon, out):
        yield
    args.profiled.append(out)


def progress(what: str) -> None:
    sys.stderr.write(f"bench: {what} ...\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every subprocess is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        figures, env = run(args)
    except (BenchError, RuntimeError) as e:
        sys.stderr.write(f"bench: {e}\n")
        return 1
    env["seconds"] = round(time.monotonic() - started, 1)
    pinning = ""
    if "daemon_cpus" in env:
        pinning = (
            f", daemon pinned to CPU {','.join(map(str, env['daemon_cpus']))}, load client and"
            f" test servers to CPU {','.join(map(str, env['other_cpus']))}; {env['client']} load"
            " client"
        )
    header = (
        f"postfix-mtasts benchmarks: {env['cpus']} CPUs{pinning}; "
        f"{'quick' if args.quick else 'full'} run in {env['seconds']} s; load average "
        f"{env['load_average'][0]:.2f} at start"
        f"{'; our daemon sampled by py-spy' if args.profile else ''}\n"
    )
    print(table(figures, header))
    if args.profile is not None:
        from bench import profile

        for raw in args.profiled:
            print(f"\nwhere the daemon's time went, {raw.stem} group (py-spy, {raw}):")
            print(profile.breakdown(raw))
    if args.json:
        write_json(args.json, figures, env)
    missed = [f for f in figures if f.ok is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
