"""Sessions to counters: the policy in force at a session's time, and what is counted."""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path

import pytest

from postfix_mtasts.mtasts.policy import Policy
from postfix_mtasts.store import PolicyEvent, Store, StoredPolicy
from postfix_mtasts.tlsrpt.aggregate import (
    Aggregator,
    CountKey,
    count_key,
    count_key_from_row,
    count_row,
    policy_at,
    utc_day,
)
from postfix_mtasts.tlsrpt.logparse import Session, SessionTracker
from postfix_mtasts.tlsrpt.report import PolicyKey

DAY = datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC).timestamp()
LINES = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")
ENFORCE = Policy("enforce", ("mx.example.net",), 86400, LINES)
TESTING = Policy(
    "testing", ("mx.example.net",), 86400, tuple(x.replace("enforce", "testing") for x in LINES)
)
NONE = Policy("none", (), 86400, ("version: STSv1", "mode: none", "max_age: 86400"))
STS = PolicyKey("sts", "example.net", ENFORCE.lines, ENFORCE.mx)
NO_POLICY = PolicyKey("no-policy-found", "example.net")


def policy_event(at: float, policy: Policy) -> PolicyEvent:
    return PolicyEvent("example.net", at, "policy", "1", policy, at + policy.max_age, None, None)


def failure_event(at: float, kind: str = "sts-policy-fetch-error") -> PolicyEvent:
    return PolicyEvent("example.net", at, "failure", "2", None, None, kind, "HTTP 404")


FAILED = ("sts-policy-fetch-error", "HTTP 404")


def session(at: float, trust: str | None = "Verified", **kw: object) -> Session:
    fields: dict[str, object] = {
        "time": at,
        "domain": "example.net",
        "mx_host": "mx.example.net",
        "mx_ip": "192.0.2.25",
        "port": 25,
        "queue_id": "ABC",
        "trust": trust,
    }
    fields.update(kw)
    return Session(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("events", "at", "kind", "key", "failure"),
    [
        ([], DAY, "none", NO_POLICY, None),
        ([policy_event(DAY, ENFORCE)], DAY + 10, "sts-enforce", STS, None),
        ([policy_event(DAY, ENFORCE)], DAY - 10, "none", NO_POLICY, None),  # not yet fetched
        ([policy_event(DAY - 90000, ENFORCE)], DAY, "none", NO_POLICY, None),  # expired
        (
            [policy_event(DAY, TESTING)],
            DAY + 1,
            "sts-testing",
            PolicyKey("sts", "example.net", TESTING.lines, TESTING.mx),
            None,
        ),
        ([policy_event(DAY, NONE)], DAY + 1, "none", NO_POLICY, None),
        (
            [policy_event(DAY, ENFORCE), failure_event(DAY + 5)],
            DAY + 10,
            "sts-enforce",
            STS,
            ("sts-policy-fetch-error", "HTTP 404"),
        ),
        (
            [failure_event(DAY, "sts-webpki-invalid")],
            DAY + 10,
            "sts-enforce",
            PolicyKey("sts", "example.net"),
            ("sts-webpki-invalid", "HTTP 404"),
        ),
        (
            [policy_event(DAY, ENFORCE), failure_event(DAY + 5), policy_event(DAY + 8, ENFORCE)],
            DAY + 10,
            "sts-enforce",
            STS,
            None,
        ),  # a later success replaced the failure
        ([policy_event(DAY, NONE), failure_event(DAY + 5)], DAY + 10, "none", NO_POLICY, None),
        ([failure_event(DAY)], DAY + 899, "sts-enforce", PolicyKey("sts", "example.net"), FAILED),
        ([failure_event(DAY)], DAY + 900, "none", NO_POLICY, None),
        (
            [policy_event(DAY, ENFORCE), failure_event(DAY + 5)],
            DAY + 3600,
            "sts-enforce",
            STS,
            None,
        ),
    ],
    ids=[
        "no events",
        "enforce",
        "before the fetch",
        "expired",
        "testing",
        "none",
        "failure while held",
        "failure with nothing held",
        "failure then success",
        "failure under none is not reported",
        "failure 899 s before",
        "failure 900 s before, nothing since: the map stopped failing",
        "old failure while held: the held policy applies",
    ],
)
def test_policy_at(
    events: list[PolicyEvent],
    at: float,
    kind: str,
    key: PolicyKey,
    failure: tuple[str, str] | None,
) -> None:
    """The policy in force is read from the latest events up to the session's time."""
    applied = policy_at("example.net", events, at)
    assert (applied.kind, applied.key, applied.sts_failure) == (kind, key, failure)


@pytest.mark.parametrize(("fetched", "applies"), [(10.0, True), (10.95, True), (11.0, False)])
def test_policy_fetched_within_the_stamps_second(fetched: float, applies: bool) -> None:
    """A policy fetched later in the second a whole-second log stamp names applied to it."""
    applied = policy_at("example.net", [policy_event(DAY + fetched, ENFORCE)], DAY + 10)
    assert (applied.kind == "sts-enforce") is applies


def test_count_key_success_and_failure() -> None:
    """A verified session counts as success; an untrusted one as a typed failure with its MX."""
    applied = policy_at("example.net", [policy_event(DAY, ENFORCE)], DAY + 1)
    assert count_key(session(DAY + 1), applied) == CountKey("2026-11-22", STS, "success")
    failed = session(DAY + 2, trust=None, failure="certificate-expired")
    assert count_key(failed, applied) == CountKey(
        "2026-11-22", STS, "certificate-expired", "mx.example.net", "192.0.2.25", ""
    )


def test_map_failure_makes_the_session_an_sts_failure() -> None:
    """A session while the map's latest attempt failed counts once, as that failure."""
    events = [policy_event(DAY, ENFORCE), failure_event(DAY + 5)]
    key = count_key(session(DAY + 10), policy_at("example.net", events, DAY + 10))
    assert key == CountKey("2026-11-22", STS, "sts-policy-fetch-error", reason="HTTP 404")


def test_row_round_trip() -> None:
    """A counter key survives the trip through the store's row form."""
    key = CountKey("2026-11-22", STS, "certificate-expired", "mx.example.net", "192.0.2.25", "x")
    assert count_key_from_row(count_row(key)) == key
    bare = CountKey("2026-11-22", NO_POLICY, "success")
    assert count_key_from_row(count_row(bare)) == bare


def test_counts_commit_with_the_position(tmp_path: Path) -> None:
    """Counts and the log position commit together and add up across commits."""
    store = Store(tmp_path / "s.sqlite")
    key = CountKey("2026-11-22", STS, "success")
    store.commit_counts("/var/log/mail.log", '{"offset": 10}', {count_row(key): 3}, DAY)
    store.commit_counts("/var/log/mail.log", '{"offset": 20}', {count_row(key): 2}, DAY)
    assert store.log_position("/var/log/mail.log") == ('{"offset": 20}', None)
    assert store.log_position("other") == (None, None)
    assert [(count_key_from_row(r), n) for r, n in store.day_counts("2026-11-22")] == [(key, 5)]
    assert store.day_counts("2026-11-23") == []
    store.close()


def test_real_log_lines_through_tracker_aggregator_and_store(tmp_path: Path) -> None:
    """Postfix lines become sessions, are attributed to the map's policy, and are stored."""
    store = Store(tmp_path / "s.sqlite")
    store.save_policy(StoredPolicy("example.net", "1", ENFORCE, DAY, DAY + 86400, DAY + 43200))
    log = [
        "2026-11-22T10:00:00+00:00 mail postfix/smtp[100]: Verified TLS connection established"
        " to mx.example.net[192.0.2.25]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
        " (256/256 bits)",
        "2026-11-22T10:00:01+00:00 mail postfix/smtp[100]: 1A2B3C: to=<a@example.net>,"
        " relay=mx.example.net[192.0.2.25]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0,"
        " status=sent (250 2.0.0 Ok)",
        "2026-11-22T11:00:00+00:00 mail postfix/smtp[101]: 4D5E6F: to=<b@plain.example>,"
        " relay=mx.plain.example[198.51.100.7]:25, delay=1, delays=0/0/0.5/0.5, dsn=4.7.4,"
        " status=deferred (TLS is required, but was not offered by host"
        " mx.plain.example[198.51.100.7])",
    ]
    tracker = SessionTracker(tz=datetime.UTC)
    aggregator = Aggregator(store.events)
    now = datetime.datetime(2026, 11, 23, tzinfo=datetime.UTC)
    sessions = [s for line in log for s in tracker.feed_text(line, now)] + tracker.flush()
    for s in sessions:
        aggregator.add(s)
    counts = aggregator.take()
    store.commit_counts("mail.log", "{}", {count_row(k): n for k, n in counts.items()}, DAY)
    stored = Counter({count_key_from_row(r): n for r, n in store.day_counts("2026-11-22")})
    assert stored == Counter(
        {
            CountKey("2026-11-22", STS, "success"): 1,
            CountKey(
                "2026-11-22",
                PolicyKey("no-policy-found", "plain.example"),
                "starttls-not-supported",
                "mx.plain.example",
                "198.51.100.7",
                "",
            ): 1,
        }
    )
    assert aggregator.take() == Counter()
    store.close()


@pytest.mark.parametrize(
    "at",
    [
        DAY,
        DAY + 43200.5,
        DAY - 0.000001,
        DAY - 0.0000004,  # rounds to the next day's first microsecond
        DAY + 86399.9999996,
        DAY + 86399.999999,
        0.0,
    ],
)
def test_utc_day(at: float) -> None:
    """utc_day names the day datetime gives for the time, microsecond rounding included."""
    expected = datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")
    assert utc_day(at) == expected


class CountingEvents:
    """An event source that records each read and returns one enforce policy."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, float, float]] = []

    def __call__(self, domain: str, start: float, end: float) -> list[PolicyEvent]:
        self.reads.append((domain, start, end))
        return [policy_event(DAY - 3600, ENFORCE)]


@pytest.mark.parametrize(
    ("now", "reads"),
    [
        (None, 4),  # no clock: read again after each 300 s of log time
        (DAY + 86400 * 3, 1),  # a log read days later: one read for the day
        # A live log: up to now - 60 s the events are all written (one read for minutes 0-10);
        # after that each session reads up to its own time (minutes 11-19).
        (DAY + 700, 10),
    ],
)
def test_events_are_read_once_per_span(now: float | None, reads: int) -> None:
    """A domain's events are read again only once its cached span of log time has passed."""
    events = CountingEvents()
    aggregator = Aggregator(events, refresh=300.0, now=None if now is None else lambda: now)
    for minute in range(0, 20, 1):  # sessions every minute for 20 minutes
        aggregator.add(session(DAY + 60 * minute))
    assert len(events.reads) == reads
    assert sum(aggregator.take().values()) == 20
    assert all(end <= DAY + 86400 for _, _, end in events.reads)


def test_live_sessions_see_events_written_after_the_last_read() -> None:
    """A log followed live: a failure the map records between two sessions counts for the
    second, as it would for the same log read days later."""
    written = [policy_event(DAY - 3600, ENFORCE)]
    clock = [DAY + 1]

    def events(domain: str, start: float, end: float) -> list[PolicyEvent]:
        return [e for e in written if start - 86400 <= e.at < end]

    aggregator = Aggregator(events, now=lambda: clock[0])
    aggregator.add(session(DAY))
    written.append(failure_event(DAY + 100))
    clock[0] = DAY + 151
    aggregator.add(session(DAY + 150))
    assert aggregator.take() == Counter(
        {
            CountKey("2026-11-22", STS, "success"): 1,
            CountKey("2026-11-22", STS, "sts-policy-fetch-error", reason="HTTP 404"): 1,
        }
    )


def test_failures_outlast_the_maps_retries() -> None:
    """A failure stands for FAILURE_LASTS, longer than the map waits between its attempts
    at a failing domain that Postfix keeps asking about."""
    from postfix_mtasts.mtasts.resolver import BACKOFF, GRACE
    from postfix_mtasts.tlsrpt.aggregate import FAILURE_LASTS

    assert FAILURE_LASTS > BACKOFF + GRACE


def test_cache_keeps_only_the_latest_day() -> None:
    """Once a session of a new UTC day comes, the previous day's domains are read afresh."""
    events = CountingEvents()
    aggregator = Aggregator(events, now=lambda: DAY + 86400 * 5)
    aggregator.add(session(DAY + 100))
    aggregator.add(session(DAY + 86400 + 100, domain="other.example"))
    aggregator.add(session(DAY + 200))  # a late session of the first day
    assert [domain for domain, _, _ in events.reads] == [
        "example.net",
        "other.example",
        "example.net",
    ]
    assert sum(aggregator.take().values()) == 3


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CACHED_DOMAINS domains the cache starts afresh: a domain seen before is read again."""
    monkeypatch.setattr("postfix_mtasts.tlsrpt.aggregate.CACHED_DOMAINS", 3)
    events = CountingEvents()
    aggregator = Aggregator(events, now=lambda: DAY + 86400 * 5)
    for domain in ("a.example", "b.example", "c.example", "d.example", "a.example"):
        aggregator.add(session(DAY + 100, domain=domain))
    assert [domain for domain, _, _ in events.reads] == [
        "a.example",
        "b.example",
        "c.example",
        "d.example",
        "a.example",
    ]
    assert sum(aggregator.take().values()) == 5
