"""Prometheus metrics for both services: off by default, on with ``[metrics]`` endpoints.

The hot paths keep plain integer counters (``PolicyResolver.stats``, the tailer's counts, the
outbox's), as they do anyway; the collectors here turn them into metric families only when
Prometheus scrapes, so a lookup pays nothing for being measured.  prometheus_client writes the
exposition format; the page is served by twisted.web on the reactor thread, never from a
thread pool, so every value is read between two events.
"""

# twisted.web's Resource and Site have no type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

PREFIX = "postfix_mtasts_"

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The text format every Prometheus reads (our names need none of 1.0.0's escaping)."""

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of the lookup latency histogram."""


class Histogram:
    """Counts of observations per bucket and their sum: a list index per observation."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, count: int, value: float = 0.0) -> None:
        """Count ``count`` observations known to fall in the first bucket, summing to ``value``."""
        self.counts[0] += count
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus reads it: cumulative buckets."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return HistogramMetricFamily(
            PREFIX + name, documentation, buckets=buckets, sum_value=self.sum
        )


def counter(name: str, documentation: str, values: dict[str, int] | int, label: str = "") -> Metric:
    """A counter family: one value, or one per ``label`` value."""
    family = CounterMetricFamily(PREFIX + name, documentation, labels=[label] if label else None)
    if isinstance(values, int):
        family.add_metric([], values)
    else:
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
    return family


def gauge(name: str, documentation: str, value: float) -> Metric:
    """A gauge family with one value."""
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


class _Collect(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def make_registry(*collectors: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry reading each of ``collectors`` at every scrape."""
    registry = CollectorRegistry(auto_describe=False)
    for collect in collectors:
        registry.register(_Collect(collect))
    return registry


class MetricsPage(Resource):
    """``/metrics``: the registry in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        return generate_latest(self._registry)


class _Root(Resource):
    """``/metrics`` and a plain 404 for anything else."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return notFound()  # type: ignore[return-value]


class _QuietSite(Site):
    """No access log: a scrape every few seconds is not news."""

    def log(self, request: http.Request) -> None:
        """Log nothing."""


async def listen_metrics(
    reactor: Any, endpoint: str, registry: CollectorRegistry
) -> IListeningPort:
    """Serve ``registry`` at ``/metrics`` on the Twisted ``endpoint`` string."""
    root = _Root()
    root.putChild(b"metrics", MetricsPage(registry))
    site = _QuietSite(root)
    site.noisy = False
    port: IListeningPort = await serverFromString(reactor, endpoint).listen(site)
    return port


def reporter_metrics(
    follower: Any, ingest: Any, outbox: Any | None = None, schedule: Any | None = None
) -> Callable[[], Iterable[Metric]]:
    """The ``tail`` service's collector: log lines, sessions by result, reports and sendings.

    ``follower`` has ``lines_read``; ``ingest`` has ``tracker`` (with ``unparsed`` and
    ``ignored``) and ``results``; ``outbox`` (``totals``) and ``schedule`` (``built``) are
    there when the service sends reports itself.
    """

    def collect() -> Iterable[Metric]:
        tracker = ingest.tracker
        yield counter("log_lines_read_total", "Mail log lines read.", follower.lines_read)
        skipped = {"not-understood": tracker.unparsed, "not-tls": tracker.ignored}
        yield counter(
            "log_lines_skipped_total",
            "Lines that counted no session: not understood, or of no TLS session.",
            skipped,
            "why",
        )
        yield counter(
            "sessions_total",
            "TLS sessions counted, by result type.",
            dict(ingest.results),
            "result",
        )
        yield counter(
            "reports_built_total", "Reports built.", 0 if schedule is None else schedule.built
        )
        yield counter(
            "report_attempts_total",
            "Report deliveries by the state they left: sent, pending (to be retried), failed or"
            " expired (given up), dropped (another address took it), resolved (addresses found).",
            {} if outbox is None else dict(outbox.totals),
            "state",
        )

    return collect
