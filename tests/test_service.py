"""The policy map service's own timers, driven by a Clock."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from postfix_mtasts.config import Config, StoreConfig
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
