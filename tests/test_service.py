"""The policy map service's own timers, driven by a Clock."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from postfix_mtasts.config import Config, MetricsConfig, StoreConfig
from postfix_mtasts.mtasts.fetch import STS_FETCH_ERROR, FetchError
from postfix_mtasts.service import PRUNE_TICK, PolicyMap

DAY = 86400.0
NOW = 1_800_000_000.0


def test_old_policy_events_are_pruned_at_start_and_every_tick(tmp_path: Path) -> None:
    """Events older than 32 days go at start and at each prune tick; each domain's latest stays."""
    clock = Clock()
    clock.advance(NOW)
    policy_map = PolicyMap(Config(store=StoreConfig(path=str(tmp_path / "s.sqlite"))), clock)
    store = policy_map.store
    for domain, age in [("a.example", 40), ("a.example", 33), ("a.example", 1),
                        ("b.example", 50), ("c.example", 31)]:  # fmt: skip
        store.record_failure(domain, NOW - age * DAY, "sts-policy-fetch-error", "x", None)

    def ages(domain: str) -> list[float]:
        return [(NOW - e.at) / DAY for e in store.events(domain, 0.0, NOW + 365 * DAY)]

    policy_map.startService()  # type: ignore[no-untyped-call]
    try:
        assert ages("a.example") == [1]
        assert ages("b.example") == [50]  # the domain's latest: what applies to it now
        assert ages("c.example") == [31]
        # 2 days later (8 prune ticks), c.example's event is older than 32 days but its latest.
        store.record_failure("c.example", NOW + DAY, "sts-policy-fetch-error", "y", None)
        for _ in range(int(2 * DAY / PRUNE_TICK)):
            clock.advance(PRUNE_TICK)
        assert ages("c.example") == [-1]
    finally:
        policy_map.stopService()


class OneRecord:
    """DNS that gives every name the same _mta-sts record."""

    def txt(self, name: str) -> Deferred[list[bytes]]:
        return succeed([b"v=STSv1; id=a1"])


class HeldFetches:
    """A fetcher whose fetches wait for the test to fire them."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bytes]] = []

    def fetch(self, domain: str) -> Deferred[bytes]:
        self.pending.append(Deferred())
        return self.pending[-1]


def fetch_outcomes(policy_map: PolicyMap) -> dict[str, float]:
    """The samples of fetches_total by outcome."""
    [family] = [m for m in policy_map.collect() if m.name.endswith("fetches")]
    return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_fetches_ok_counts_only_policies_fetched(tmp_path: Path) -> None:
    """fetches_total{outcome="ok"} counts fetched policies, so it never goes down."""
    clock = Clock()
    clock.advance(NOW)
    config = Config(
        store=StoreConfig(path=str(tmp_path / "s.sqlite")), metrics=MetricsConfig(serve="tcp:0")
    )
    policy_map = PolicyMap(config, clock)
    fetcher = HeldFetches()
    policy_map.resolver._dns = OneRecord()
    policy_map.resolver._fetcher = fetcher
    try:
        policy_map.factory.lookup(b"postfix", b"a.example")
        in_flight = fetch_outcomes(policy_map)
        fetcher.pending[0].errback(FetchError(STS_FETCH_ERROR, "HTTP 503"))
        failed = fetch_outcomes(policy_map)
        policy_map.factory.lookup(b"postfix", b"b.example")
        fetcher.pending[1].callback(b"version: STSv1\nmode: none\nmax_age: 60\n")
        assert (in_flight, failed, fetch_outcomes(policy_map)) == (
            {"ok": 0},
            {"ok": 0, STS_FETCH_ERROR: 1},
            {"ok": 1, STS_FETCH_ERROR: 1},
        )
    finally:
        policy_map.store.close()
