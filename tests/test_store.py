"""The SQLite store: what the map writes and what the reporter reads back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from postfix_mtasts.mtasts.policy import Policy
from postfix_mtasts.store import Store, StoredPolicy, StoreError

POLICY = Policy(
    mode="enforce",
    mx=("mx1.example.com", "*.example.net"),
    max_age=86400,
    lines=(
        "version: STSv1",
        "mode: enforce",
        "mx: mx1.example.com",
        "mx: *.example.net",
        "max_age: 86400",
    ),
)


def stored(
    domain: str = "example.com", at: float = 1000.0, policy: Policy = POLICY
) -> StoredPolicy:
    return StoredPolicy(domain, "id1", policy, at, at + policy.max_age, at + policy.max_age / 2)


def test_policy_round_trips(tmp_path: Path) -> None:
    """A saved policy reads back equal, from this connection and from a new one."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(stored())
    assert store.get_policy("example.com") == stored()
    store.close()
    again = Store(tmp_path / "s.sqlite")
    assert again.get_policy("example.com") == stored()
    assert again.get_policy("other.example") is None
    again.close()


def test_store_creates_its_directory_and_uses_wal(tmp_path: Path) -> None:
    """The store makes its parent directory and runs in WAL mode."""
    store = Store(tmp_path / "state" / "deeper" / "s.sqlite")
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_load_skips_expired_and_orders_by_fetch(tmp_path: Path) -> None:
    """Loading returns the unexpired policies; past the limit, the most recently fetched."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(stored("old.example", at=0.0, policy=POLICY))
    store.save_policy(stored("a.example", at=100_000.0))
    store.save_policy(stored("b.example", at=200_000.0))
    assert {p.domain for p in store.load_policies(150_000.0)} == {"a.example", "b.example"}
    assert {p.domain for p in store.load_policies(150_000.0, limit=2)} == {"a.example", "b.example"}
    assert [p.domain for p in store.load_policies(150_000.0, limit=1)] == ["b.example"]
    store.close()


def test_due_for_refresh(tmp_path: Path) -> None:
    """Only unexpired policies whose refresh time has come are due, and moving it works."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(stored("a.example", at=0.0))
    assert store.due_for_refresh(1000.0, 10) == []
    assert store.due_for_refresh(43200.0, 10) == ["a.example"]
    store.set_refresh_at("a.example", 50000.0)
    assert store.due_for_refresh(43200.0, 10) == []
    assert store.due_for_refresh(90000.0, 10) == []  # expired by then
    store.close()


def test_events_give_the_policy_in_force_and_the_changes(tmp_path: Path) -> None:
    """events() returns the last event before the range and those inside it, in order."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(stored(at=10.0))
    store.record_failure("example.com", 50.0, "sts-policy-fetch-error", "HTTP 404", "id2")
    store.record_failure("example.com", 150.0, "sts-webpki-invalid", "expired", "id2")
    store.save_policy(stored(at=250.0))
    events = store.events("example.com", 100.0, 200.0)
    assert [(e.at, e.kind, e.failure_type) for e in events] == [
        (10.0, "policy", None),  # still held after the failure that followed it
        (50.0, "failure", "sts-policy-fetch-error"),
        (150.0, "failure", "sts-webpki-invalid"),
    ]
    assert [e.at for e in store.events("example.com", 300.0, 400.0)] == [250.0]
    first = store.events("example.com", 0.0, 20.0)
    assert len(first) == 1 and first[0].policy == POLICY and first[0].expires_at == 86410.0
    last = store.last_failure("example.com")
    assert last is not None and (last.at, last.detail) == (150.0, "expired")
    store.close()


def test_events_at_the_same_time_keep_their_order(tmp_path: Path) -> None:
    """Events logged at the same time come back in the order they were recorded."""
    store = Store(tmp_path / "s.sqlite")
    for detail in ("one", "two", "three"):
        store.record_failure("example.com", 100.0, "sts-policy-fetch-error", detail, None)
    store.record_failure("example.com", 50.0, "sts-policy-fetch-error", "before", None)
    details = [e.detail for e in store.events("example.com", 60.0, 200.0)]
    assert details == ["before", "one", "two", "three"]
    store.close()


def test_prune_keeps_each_domains_latest_event_and_policy(tmp_path: Path) -> None:
    """Pruning forgets old events but never a domain's latest one, nor its latest policy."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(stored("a.example", at=10.0))
    store.save_policy(stored("a.example", at=20.0))
    store.save_policy(stored("b.example", at=5.0))
    store.save_policy(stored("c.example", at=5.0))
    store.record_failure("c.example", 6.0, "sts-policy-fetch-error", "HTTP 500", "id2")
    store.record_failure("c.example", 7.0, "sts-policy-fetch-error", "HTTP 500", "id2")
    assert store.prune_events(before=100.0) == 2
    assert [e.at for e in store.events("a.example", 0.0, 1000.0)] == [20.0]
    assert [e.at for e in store.events("b.example", 0.0, 1000.0)] == [5.0]
    assert [(e.at, e.kind) for e in store.events("c.example", 50.0, 1000.0)] == [
        (5.0, "policy"),
        (7.0, "failure"),
    ]
    store.close()


def test_unopenable_store_is_a_one_line_error(tmp_path: Path) -> None:
    """A store path that cannot be created raises StoreError naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"cannot open the store .*file/s\.sqlite"):
        Store(blocker / "s.sqlite")


def test_corrupt_store_is_a_store_error(tmp_path: Path) -> None:
    """A file that is not SQLite raises StoreError, not sqlite3's exception."""
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Store(path)
    assert issubclass(StoreError, Exception) and not issubclass(StoreError, sqlite3.Error)


def test_full_disk_reports_the_real_error(tmp_path: Path) -> None:
    """A commit that fills the disk says so, and the next one works once there is room."""
    store = Store(tmp_path / "s.sqlite")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a disk that is all but full
    counts = {
        (f"2026-11-{i % 28 + 1:02d}", f"d{i}.example", "sts", "x" * 500, "mx", "success",
         "h", "192.0.2.1", ""): 1
        for i in range(2000)
    }  # fmt: skip
    with pytest.raises(StoreError, match="full") as caught:
        store.commit_counts("mail.log", "p1", counts, 1.0)
    assert "no transaction is active" not in str(caught.value)
    assert not store._db.in_transaction
    store.commit_counts("mail.log", "p2", {}, 2.0)
    assert store.log_position("mail.log") == ("p2", None)
    store.close()
