"""The metrics page: histogram arithmetic, the exposition text, and a real scrape over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from postfix_mtasts.metrics import (
    Histogram,
    counter,
    gauge,
    listen_metrics,
    make_registry,
)
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
