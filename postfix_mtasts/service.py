"""Wiring: each job as a Twisted service built from a :class:`~postfix_mtasts.config.Config`.

:class:`PolicyMap` is the policy map: the socketmap listeners, the resolver behind them, the
refresh timer and, with ``[metrics] serve``, the ``/metrics`` page, over one store.  Nothing
here imports the global reactor; :mod:`postfix_mtasts.cli` passes it in.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from postfix_mtasts.config import Config, ConfigError, MetricsConfig
from postfix_mtasts.metrics import Histogram, counter, gauge, listen_metrics, make_registry
from postfix_mtasts.mtasts.dns import DNSClient, parse_nameservers
from postfix_mtasts.mtasts.fetch import PolicyFetcher
from postfix_mtasts.mtasts.resolver import PolicyResolver
from postfix_mtasts.socketmap import Lookup, SocketmapFactory
from postfix_mtasts.store import Store, StoreError

REFRESH_TICK = 30.0
"""Seconds between two looks for policies due for a refresh."""

EVENTS_KEPT = 32 * 86400.0
"""Seconds the store keeps the policy events the reporter reads (each domain's latest stays)."""
PRUNE_TICK = 6 * 3600.0
"""Seconds between two prunings of old policy events (the first at start)."""

log = Logger()


def make_resolver(config: Config, reactor: Any, store: Store) -> PolicyResolver:
    """The resolver with its DNS client and fetcher, as ``serve`` and ``query`` both use it."""
    dns = DNSClient(reactor, parse_nameservers(config.dns.nameservers), timeout=config.dns.timeout)
    try:
        fetcher = PolicyFetcher(
            reactor,
            dns.ipv4,
            ca_file=config.https.ca_file,
            timeout=config.https.timeout,
            fallback=dns.ipv6,
        )
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where, detail = "[https] ca_file", f"{config.https.ca_file}: {problem}"
        raise ConfigError(config.source, where, detail) from None
    return PolicyResolver(
        reactor, dns, fetcher, store, zones=config.zones, monotonic=time.monotonic
    )


class PolicyMap(MultiService):
    """The policy map: listeners, resolver, refresh timer and the store they share."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.store = Store(config.store_path())
        self.resolver = make_resolver(config, reactor, self.store)
        lookup: Lookup = self.resolver.lookup
        self.measured: MeasuredLookup | None = None
        if config.metrics.serve:
            lookup = self.measured = MeasuredLookup(lookup, reactor)
        self.factory = SocketmapFactory(lookup, reactor)
        self._reactor = reactor
        self.endpoints = [(d, _endpoint(reactor, d)) for d in config.server.listen]
        self.ports: list[Any] = []
        for interval, call in ((REFRESH_TICK, self.resolver.refresh_due),
                               (PRUNE_TICK, self.prune_events)):  # fmt: skip
            timer = TimerService(interval, call)
            timer.clock = reactor
            timer.setServiceParent(self)

    async def listen(self, bound: Callable[[], object] | None = None) -> None:
        """Listen on every endpoint (and the metrics one), call ``bound``, load the held
        policies, then start serving.  ``bound`` is where the command line gives up root.

        Raises :class:`StartError` (after closing what was opened) if an endpoint fails.
        """
        for description, endpoint in self.endpoints:
            try:
                self.ports.append(await endpoint.listen(self.factory))
            except Exception as e:  # noqa: BLE001 (CannotListenError, OSError, ...)
                await self._close_ports()
                raise StartError(f"listen {description!r}: {e}") from None
        if self.measured is not None:
            where = MetricsConfig.loopback(self.config.metrics.serve)
            registry = make_registry(self.collect)
            try:
                self.ports.append(await listen_metrics(self._reactor, where, registry))
            except Exception as e:  # noqa: BLE001 (CannotListenError, OSError, ...)
                await self._close_ports()
                raise StartError(f"[metrics] serve {where!r}: {e}") from None
        if bound is not None:
            bound()
        loaded = self.resolver.load()
        log.info(
            "postfix-mtasts map: {count} policies loaded from {path}, listening on {listen}",
            count=loaded,
            path=str(self.store.path),
            listen=", ".join(self.config.server.listen),
        )
        self.startService()
        sd_notify(b"READY=1")

    def stopService(self) -> Deferred[None]:
        sd_notify(b"STOPPING=1")

        async def stop() -> None:
            # Stop accepting, then let in-flight replies finish, then close the store.
            # Refreshes are not waited for: the timer's call returns at once.
            for port in self.ports:
                await port.stopListening()
            self.resolver.stop()
            await super(PolicyMap, self).stopService()
            await self.factory.drain()
            self.store.close()
            log.info("postfix-mtasts map stopped")

        return ensureDeferred(stop())

    def prune_events(self) -> None:
        """Forget policy events older than :data:`EVENTS_KEPT`, keeping each domain's last."""
        try:
            count = self.store.prune_events(self._reactor.seconds() - EVENTS_KEPT)
        except StoreError as e:
            log.error("pruning old policy events: {error}", error=str(e))
            return
        if count:
            log.info("forgot {count} policy events older than 32 days", count=count)

    async def _close_ports(self) -> None:
        for port in self.ports:
            await port.stopListening()
        self.ports = []

    def collect(self) -> Iterator[Metric]:
        """The map's metrics, read at each scrape."""
        stats = self.resolver.stats
        if self.measured is not None:
            yield from self.measured.collect()
        yield counter("cache_hits_total", "Lookups answered from a cached policy.", stats["hits"])
        yield counter(
            "cache_negative_hits_total",
            "Lookups answered from the memory of domains without MTA-STS.",
            stats["negative_hits"],
        )
        yield counter(
            "cache_misses_total", "Lookups that had to look the domain up.", stats["misses"]
        )
        yield counter("txt_lookups_total", "_mta-sts TXT lookups sent.", stats["txt_lookups"])
        outcomes = Counter({"ok": stats["fetches_ok"]})
        outcomes.update(self.resolver.failure_types)
        yield counter(
            "fetches_total",
            "Policy fetches by outcome: ok or the RFC 8460 failure type.",
            dict(outcomes),
            "outcome",
        )
        yield gauge("policies_cached", "Policies held in memory.", self.resolver.cached)
        yield gauge("connections", "Open socketmap connections.", len(self.factory.connections))


_ANSWERS = {b"OK": "ok", b"NO": "notfound", b"TE": "temp", b"PE": "perm"}


class MeasuredLookup:
    """A socketmap lookup that counts answers by type, in-flight lookups and latency.

    Used only when metrics are on; an answer ready at once is counted in the latency
    histogram's first bucket without reading the clock.
    """

    def __init__(self, lookup: Lookup, clock: Any) -> None:
        self._lookup = lookup
        self._clock = clock
        self.answers: Counter[bytes] = Counter()
        self.in_flight = 0
        self.latency = Histogram()

    def __call__(self, name: bytes, key: bytes) -> bytes | Deferred[bytes]:
        """Look up ``key`` in map ``name`` and count the answer."""
        reply = self._lookup(name, key)
        if isinstance(reply, bytes):
            self.answers[_kind(reply)] += 1
            self.latency.add(1)
            return reply
        self.in_flight += 1
        started = self._clock.seconds()

        def done(result: bytes) -> bytes:
            self.in_flight -= 1
            self.latency.observe(self._clock.seconds() - started)
            self.answers[_kind(result) if isinstance(result, bytes) else b"TE"] += 1
            return result

        return reply.addBoth(done)

    def collect(self) -> Iterator[Metric]:
        """Answers, lookups in flight and the latency histogram."""
        answers = {_ANSWERS.get(kind, "other"): n for kind, n in self.answers.items()}
        yield counter("lookups_total", "Socketmap lookups by answer.", answers, "answer")
        yield gauge("lookups_in_flight", "Lookups waiting on DNS or a fetch.", self.in_flight)
        yield self.latency.family("lookup_seconds", "Time from request to answer.")


def _kind(reply: bytes) -> bytes:
    """The first two letters of a netstring reply's payload: OK, NO(TFOUND), TE(MP), PE(RM)."""
    colon = reply.find(b":")
    return reply[colon + 1 : colon + 3]


class StartError(Exception):
    """The service cannot start; ``str()`` says why in one line."""


def _endpoint(reactor: Any, description: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except IndexError:  # systemd:index=N beyond the inherited sockets
        raise StartError(
            f"listen {description!r}: no such inherited socket (is the service socket-activated?)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise StartError(f"listen {description!r}: {e}") from None


def sd_notify(state: bytes) -> None:
    """Tell systemd about our state when it asked (``Type=notify``); otherwise do nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state, address)
    except OSError as e:
        log.warn("cannot notify systemd: {error}", error=str(e))
