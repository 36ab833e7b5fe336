"""The metrics page: histogram arithmetic, the exposition text, and a real scrape over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from postfix_mtasts.metrics import (
    LATENCY_BUCKETS,
    Histogram,
    counter,
    gauge,
    listen_metrics,
    make_registry,
)
from postfix_mtasts.service import MeasuredLookup
from tests.scrape import scrape


def test_histogram_buckets_are_cumulative() -> None:
    """Observations land in the first bucket whose bound holds them; +Inf counts them all."""
    h = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 7.0):
        h.observe(value)
    h.add(3)
    family = h.family("lookup_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.01": 5, "0.1": 6, "1.0": 7, "+Inf": 8}
    totals = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert totals == {
        "postfix_mtasts_lookup_seconds_count": 8,
        "postfix_mtasts_lookup_seconds_sum": pytest.approx(7.565),
    }


class _Recorded(Histogram):
    """A histogram that remembers its calls of ``add``."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[int, float]] = []

    def add(self, count: int, value: float = 0.0) -> None:
        self.added.append((count, value))
        super().add(count, value)


def test_measured_lookup_latency() -> None:
    """An answer ready at once is counted by Histogram.add in the first bucket; a later one
    in the bucket of its time on the clock."""
    clock = Clock()
    later: Deferred[bytes] = Deferred()
    replies: list[bytes | Deferred[bytes]] = [b"3:OK ,", later]
    lookup = MeasuredLookup(lambda name, key: replies.pop(0), clock)
    lookup.latency = recorded = _Recorded()
    assert lookup(b"postfix", b"now.example") == b"3:OK ,"
    pending = lookup(b"postfix", b"later.example")
    assert isinstance(pending, Deferred) and lookup.in_flight == 1
    clock.advance(0.3)
    later.callback(b"9:NOTFOUND ,")
    assert recorded.added == [(1, 0.0)]
    assert recorded.counts[0] == 1
    assert recorded.counts[LATENCY_BUCKETS.index(0.5)] == 1
    assert recorded.sum == pytest.approx(0.3)
    assert lookup.in_flight == 0
    assert dict(lookup.answers) == {b"OK": 1, b"NO": 1}
    assert pending.result == b"9:NOTFOUND ,"


@pytest_twisted.ensureDeferred
async def test_scrape_over_http(reactor: Any) -> None:
    """A scrape reads the collectors' current values, as Prometheus' own parser reads them."""
    state = {"ok": 3, "failed": 1}

    def collect() -> Any:
        yield counter("fetches", "Policy fetches by outcome.", state, "outcome")
        yield gauge("policies_cached", "Policies in memory.", 42)

    port = await listen_metrics(reactor, "tcp:0:interface=127.0.0.1", make_registry(collect))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"  # type: ignore[attr-defined]
        state["ok"] += 1
        values = await scrape(reactor, url)
        assert values == {
            ("postfix_mtasts_fetches_total", "failed"): 1,
            ("postfix_mtasts_fetches_total", "ok"): 4,
            ("postfix_mtasts_policies_cached", ""): 42,
        }
        with pytest.raises(AssertionError, match="HTTP 404"):
            await scrape(reactor, url.replace("/metrics", "/other"))
    finally:
        await port.stopListening()  # type: ignore[misc]
