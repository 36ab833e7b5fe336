"""The policy map service's own timers, driven by a Clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from postfix_mtasts.config import Config, MetricsConfig, StoreConfig
from postfix_mtasts.mtasts.fetch import STS_FETCH_ERROR, FetchError
from postfix_mtasts.mtasts.policy import parse_policy
from postfix_mtasts.mtasts.resolver import REFRESH_BATCH
from postfix_mtasts.service import PRUNE_TICK, PolicyMap
from postfix_mtasts.store import StoredPolicy, StoreError

DAY = 86400.0
NOW = 1_800_000_000.0
ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 604800\n"
NONE = b"version: STSv1\nmode: none\nmax_age: 60\n"


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
        fetcher.pending[1].callback(NONE)
        assert (in_flight, failed, fetch_outcomes(policy_map)) == (
            {"ok": 0},
            {"ok": 0, STS_FETCH_ERROR: 1},
            {"ok": 1, STS_FETCH_ERROR: 1},
        )
    finally:
        policy_map.store.close()


class SlowHosts:
    """A fetcher whose policy hosts answer only at the 10 s deadline, except ``fired``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.fired: dict[str, Deferred[bytes]] = {}
        self.fetched: list[str] = []

    def fetch(self, domain: str) -> Deferred[bytes]:
        self.fetched.append(domain)
        if domain in self.fired:
            return self.fired[domain]
        d: Deferred[bytes] = Deferred()
        self.clock.callLater(10, d.errback, FetchError(STS_FETCH_ERROR, "deadline passed"))
        return d


def test_stopping_waits_for_replies_not_for_refreshes(tmp_path: Path) -> None:
    """Stopping waits for the reply owed to a client but not for a batch of slow refreshes."""
    clock = Clock()
    clock.advance(NOW)
    policy_map = PolicyMap(Config(store=StoreConfig(path=str(tmp_path / "s.sqlite"))), clock)
    policy = parse_policy(ENFORCE)
    for i in range(REFRESH_BATCH):  # overdue, as after a day with the daemon down
        policy_map.store.save_policy(
            StoredPolicy(f"d{i}.example", "a1", policy, NOW - 2 * DAY, NOW + 5 * DAY, NOW - DAY)
        )
    fetcher = SlowHosts(clock)
    fetcher.fired["new.example"] = Deferred()
    policy_map.resolver._dns = OneRecord()
    policy_map.resolver._fetcher = fetcher
    policy_map.startService()  # type: ignore[no-untyped-call]
    clock.advance(1)
    transport = StringTransport()  # type: ignore[no-untyped-call]
    client = policy_map.factory.buildProtocol(None)
    assert client is not None
    client.makeConnection(transport)  # type: ignore[no-untyped-call]
    client.dataReceived(b"19:postfix new.example,")
    assert transport.value() == b""  # type: ignore[no-untyped-call]
    stopped: list[None] = []
    policy_map.stopService().addCallback(stopped.append)
    assert stopped == []  # a reply is owed
    fetcher.fired["new.example"].callback(NONE)
    assert transport.value() == b"9:NOTFOUND ,"  # type: ignore[no-untyped-call]
    assert transport.disconnecting  # drained: closed after its last reply
    client.connectionLost(connectionDone)
    assert stopped == [None]
    with pytest.raises(StoreError):
        policy_map.store.get_policy("d0.example")  # closed
    assert fetcher.fetched.count("new.example") == 1
