"""The outbox: queueing a day's reports, finding their destinations, delivering, retrying.

The retry arithmetic is tested as pure functions; delivery against real servers on loopback:
the twisted.names test DNS server publishing ``_smtp._tls`` records, Twisted's ESMTP server as
the local MTA, and the HTTPS test server with the test CA as a report collector. Every message
and body that arrives is read back by parsedmarc and the strict schema check.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock, deferLater

from postfix_mtasts.config import Config, HTTPSConfig, TLSRPTConfig
from postfix_mtasts.mtasts.dns import DNSClient
from postfix_mtasts.store import OutboxRow, Store
from postfix_mtasts.tlsrpt.aggregate import CountKey, count_row
from postfix_mtasts.tlsrpt.ingest import Ingest
from postfix_mtasts.tlsrpt.outbox import (
    BUILD_GRACE,
    GIVE_UP_AFTER,
    QUEUED_THROUGH,
    DailySchedule,
    Outbox,
    after_failure,
    day_ready,
    outcome_lines,
    prune,
    queue_day,
    retry_delay,
    summary_text,
)
from postfix_mtasts.tlsrpt.report import PolicyKey, validate_report
from tests.collectors import MailServer, ReportServer
from tests.daemon import Daemon, free_port, run
from tests.httpsserver import status
from tests.pki import SNIContextFactory, TestCA
from tests.scrape import scrape

DAY = datetime.date(2026, 11, 22)
MIDNIGHT = datetime.datetime(2026, 11, 23, tzinfo=datetime.UTC).timestamp()
DOMAIN = "example.net"
COLLECTOR = "reports.example.net"
CA = TestCA("Outbox Test Root")
POLICY = PolicyKey(
    "sts", DOMAIN, ("version: STSv1", "mode: enforce", "mx: mx.example.net"), ("mx.example.net",)
)
COUNTS = {
    CountKey(DAY.isoformat(), POLICY, "success"): 12,
    CountKey(DAY.isoformat(), POLICY, "certificate-expired", "mx.example.net", "192.0.2.25"): 3,
}


# --- pure: the retry schedule ---------------------------------------------------------------


def test_retry_delay_doubles_from_five_minutes_to_four_hours() -> None:
    """Without jitter the delays are 5, 10, 20 ... minutes, capped at 4 hours."""
    delays = [retry_delay(n, 0.5) for n in range(1, 10)]
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]


@pytest.mark.parametrize(("spread", "factor"), [(0.0, 0.9), (0.5, 1.0), (0.999999, 1.1)])
def test_retry_delay_jitter(spread: float, factor: float) -> None:
    """The jitter stretches or shrinks a delay by up to a tenth."""
    assert retry_delay(3, spread) == pytest.approx(1200 * factor, rel=1e-5)


def row(**changes: Any) -> OutboxRow:
    base = OutboxRow(DAY.isoformat(), DOMAIN, "mailto:a@example.net", "pending", 0, None, 0.0,
                     "", "", None)  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("before", "now", "final", "expected"),
    [
        # the first failure starts the 24 hours and waits 5 minutes
        (row(), 1000.0, False, row(attempts=1, first_at=1000.0, next_at=1300.0)),
        # the third waits 20 minutes
        (
            row(attempts=2, first_at=0.0),
            900.0,
            False,
            row(attempts=3, first_at=0.0, next_at=2100.0),
        ),
        # the last retry comes exactly 24 hours after the first attempt
        (
            row(attempts=10, first_at=0.0),
            80000.0,
            False,
            row(attempts=11, first_at=0.0, next_at=GIVE_UP_AFTER),
        ),
        # a failure 24 hours after the first attempt gives up
        (
            row(attempts=11, first_at=0.0),
            GIVE_UP_AFTER,
            False,
            row(state="expired", attempts=12, first_at=0.0, done_at=GIVE_UP_AFTER),
        ),
        # a permanent failure gives up at once
        (row(), 5.0, True, row(state="failed", attempts=1, first_at=5.0, done_at=5.0)),
    ],
)
def test_after_failure(before: OutboxRow, now: float, final: bool, expected: OutboxRow) -> None:
    """A failure schedules the next try, or gives up when final or 24 hours on."""
    after = after_failure(before, now, "boom", final=final, spread=0.5)
    assert after == dataclasses.replace(expected, last_error="boom")


def test_summary_text() -> None:
    """The mail's text part names the domain, the day and the session counts."""
    report = {
        "organization-name": "Example Org",
        "date-range": {
            "start-datetime": "2026-11-22T00:00:00Z",
            "end-datetime": "2026-11-22T23:59:59Z",
        },
        "policies": [
            {"summary": {"total-successful-session-count": 12, "total-failure-session-count": 3}}
        ],
    }
    text = summary_text(report, DOMAIN)
    assert "from Example Org for example.net" in text
    assert "2026-11-22T00:00:00Z" in text
    assert "15 outbound TLS sessions" in text and "12 succeeded, 3 failed" in text


def test_outcome_lines() -> None:
    """`report --send` prints one line per destination with its state and detail."""
    rows = [
        row(state="sent", queue_id="ABC123"),
        row(
            destination="https://r.example.net/",
            state="pending",
            last_error="HTTP 500",
            next_at=MIDNIGHT,
        ),
    ]
    assert outcome_lines(rows).splitlines() == [
        "example.net: mailto:a@example.net: sent (queue id ABC123)",
        "example.net: https://r.example.net/: pending (HTTP 500; next try at 2026-11-23T00:00:00Z)",
    ]


# --- the store's outbox -------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store holding COUNTS."""
    s = Store(tmp_path / "store.sqlite")
    s.commit_counts("mail.log", None, {count_row(k): n for k, n in COUNTS.items()}, 0.0)
    yield s
    s.close()


def config_for(smtp_port: int = 25, ca_file: str = "", **tlsrpt: Any) -> Config:
    """The reporter's configuration, handing mail to 127.0.0.1:smtp_port."""
    values: dict[str, Any] = {
        "organization_name": "Example Org",
        "contact_info": "mailto:tlsrpt@example.org",
        "mail_from": "tlsrpt-noreply@example.org",
        "smtp": f"127.0.0.1:{smtp_port}",
    }
    values.update(tlsrpt)
    return Config(tlsrpt=TLSRPTConfig(**values), https=HTTPSConfig(ca_file=ca_file))


def test_queue_day_is_idempotent(store: Store) -> None:
    """A day queued twice keeps its first report and one lookup row per domain."""
    reports, new = queue_day(store, config_for(), DAY, 100.0, lambda: 60.0)
    assert [r.policy_domain for r in reports] == [DOMAIN] and new == 1
    again, new_again = queue_day(store, config_for(), DAY, 200.0)
    assert new_again == 0 and again[0].report_id == reports[0].report_id
    assert [(r.destination, r.state, r.next_at) for r in store.outbox()] == [("", "pending", 160.0)]
    kept = store.queued_report(DAY.isoformat(), DOMAIN)
    assert kept is not None and kept.gz == reports[0].gz


def test_prune_forgets_old_reporting_data(store: Store) -> None:
    """Counts, ids and finished rows older than KEEP_DAYS go; waiting rows and newer days stay."""
    now = MIDNIGHT + 25 * 86400  # 2026-12-18: days before 2026-11-16 go
    old = CountKey("2026-11-01", POLICY, "success")
    store.commit_counts("mail.log", None, {count_row(old): 1}, 0.0)
    queue_day(store, config_for(), datetime.date(2026, 11, 1), 0.0)
    queue_day(store, config_for(), DAY, 0.0)
    [lookup, _] = store.outbox()
    store.update_outbox(dataclasses.replace(lookup, state="dropped", done_at=1.0))
    store.update_outbox(dataclasses.replace(store.outbox()[1], queue_id="OLD1", done_at=1.0))
    assert prune(store, now) > 0
    assert store.day_counts("2026-11-01") == []
    assert len(store.day_counts(DAY.isoformat())) == 2
    assert [(r.day, r.state) for r in store.outbox()] == [(DAY.isoformat(), "pending")]
    assert store.report_mail_ids() == ([], 0)
    assert store.queued_report("2026-11-01", DOMAIN) is None


# --- delivery against real servers ----------------------------------------------------------


class Shifted:
    """The real reactor, with ``seconds()`` moved ``offset`` seconds ahead (retry schedules)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.offset = 0.0

    def seconds(self) -> float:
        now: float = self._reactor.seconds()
        return now + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@pytest_twisted.async_yield_fixture
async def mail_server(reactor: Any) -> AsyncIterator[MailServer]:
    """The local MTA stand-in."""
    server = MailServer(reactor)
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def collector(reactor: Any) -> AsyncIterator[ReportServer]:
    """An HTTPS report collector with a certificate from the test CA."""
    server = ReportServer(reactor, SNIContextFactory(CA))
    await server.start()
    yield server
    await server.stop()


class Setup:
    """The store, servers and outbox of one delivery test."""

    def __init__(
        self, reactor: Any, store: Store, *, dns: Any, mail: MailServer, web: ReportServer, ca: str
    ) -> None:
        self.clock = Shifted(reactor)
        self.store = store
        self.dns = dns
        self.mail = mail
        self.web = web
        self.url = f"https://{COLLECTOR}:{web.port}/tlsrpt"
        self.config = config_for(mail.port, ca)
        self.client = DNSClient(reactor, [dns.address], timeout=2.0)
        dns.set(COLLECTOR, [("A", "127.0.0.1")])
        web.set(COLLECTOR, status(200, b""), path="/tlsrpt")
        self.publish(f"v=TLSRPTv1; rua=mailto:tlsrpt@example.net,{self.url}")

    def publish(self, *records: str) -> None:
        self.dns.set(f"_smtp._tls.{DOMAIN}", [("TXT", r) for r in records])

    def outbox(self, **kwargs: Any) -> Outbox:
        kwargs.setdefault("spread", lambda: 0.5)
        return Outbox(self.clock, self.store, self.config, self.client, **kwargs)

    def states(self) -> dict[str, tuple[str, int]]:
        return {r.destination: (r.state, r.attempts) for r in self.store.outbox()}

    def later(self) -> None:
        """Move the clock to the next due row."""
        due = self.store.outbox_next()
        assert due is not None
        self.clock.offset += max(0.0, due - self.clock.seconds()) + 1


@pytest.fixture
def setup(  # noqa: PLR0917 - fixtures
    reactor: Any,
    store: Store,
    dns_server: Any,
    mail_server: MailServer,
    collector: ReportServer,
    tmp_path: Path,
) -> Setup:
    """A queued report for DOMAIN, whose record lists a mailbox and the collector."""
    ca = str(CA.write_bundle(tmp_path))
    s = Setup(reactor, store, dns=dns_server, mail=mail_server, web=collector, ca=ca)
    queue_day(store, s.config, DAY, s.clock.seconds())
    return s


def check_report(gz: bytes) -> dict[str, Any]:
    """Decode a delivered report and check it strictly and with parsedmarc."""
    report: dict[str, Any] = json.loads(gzip.decompress(gz))
    assert validate_report(report) == []
    parsed = parsedmarc.parse_smtp_tls_report_json(json.dumps(report))
    assert parsed["policies"][0]["failed_session_count"] == 3
    return report


@pytest_twisted.ensureDeferred
async def test_delivers_by_mail_and_https(setup: Setup) -> None:
    """The lookup finds both destinations; the mail and the POST carry the same report."""
    outcome = await setup.outbox().deliver_due()
    assert outcome == {"resolved": 1, "sent": 2}
    assert setup.states() == {"": ("resolved", 1), "mailto:tlsrpt@example.net": ("sent", 1),
                              setup.url: ("sent", 1)}  # fmt: skip
    [(mail_from, rcpt, data)] = setup.mail.messages
    assert (mail_from, rcpt) == ("tlsrpt-noreply@example.org", "tlsrpt@example.net")
    parsed: Any = parsedmarc.parse_report_email(data, offline=True)
    [body] = setup.web.bodies
    report = check_report(body)
    assert parsed["report"]["report_id"] == report["report-id"]
    assert setup.web.requests[0].header("content-type") == "application/tlsrpt+gzip"
    assert setup.store.report_mail_ids() == (["ABC123"], 1)
    assert setup.store.queued_report(DAY.isoformat(), DOMAIN) is None  # nothing waits now
    assert await setup.outbox().deliver_due() == {}


@pytest_twisted.ensureDeferred
async def test_https_retried_after_500(setup: Setup) -> None:
    """A collector answering 500 is tried again 5 minutes later and then takes the report."""
    setup.publish(f"v=TLSRPTv1; rua={setup.url}")
    setup.web.set(COLLECTOR, status(500), path="/tlsrpt")
    outbox = setup.outbox()
    assert await outbox.deliver_due() == {"resolved": 1, "pending": 1}
    pending = setup.store.outbox(DAY.isoformat(), DOMAIN)[1]
    assert (pending.attempts, pending.last_error) == (1, "HTTP 500")
    assert pending.next_at == pytest.approx(setup.clock.seconds() + 300, abs=5)
    assert await outbox.deliver_due() == {}  # not due yet
    setup.web.set(COLLECTOR, status(200), path="/tlsrpt")
    setup.later()
    assert await outbox.deliver_due() == {"sent": 1}
    assert setup.states()[setup.url] == ("sent", 2)
    assert outbox.totals == {"resolved": 1, "pending": 1, "sent": 1}
    assert len(setup.web.bodies) == 2 and setup.web.bodies[0] == setup.web.bodies[1]
    check_report(setup.web.bodies[1])


@pytest_twisted.ensureDeferred
async def test_silent_collector_given_up_after_24_hours(setup: Setup) -> None:
    """A collector that never answers is tried on the back-off schedule, then given up."""
    setup.publish(f"v=TLSRPTv1; rua={setup.url}")
    setup.web.silent.add("/tlsrpt")
    outbox = setup.outbox(timeout=0.2)
    await outbox.deliver_due()
    started = setup.clock.seconds()
    for _ in range(20):
        if setup.states()[setup.url][0] != "pending":
            break
        setup.later()
        await outbox.deliver_due()
    [_, last] = setup.store.outbox()
    assert (last.state, last.attempts) == ("expired", 12)
    assert "deadline" in last.last_error
    assert last.done_at is not None and last.done_at - started >= GIVE_UP_AFTER
    assert len(setup.web.bodies) == 12


@pytest_twisted.ensureDeferred
async def test_delivered_elsewhere_stops_retries(setup: Setup) -> None:
    """Once the collector took the report, the mailbox's failed hand-over is not retried."""
    setup.mail.final_code, setup.mail.final_text = 451, b"4.3.0 try again later"
    outbox = setup.outbox()
    assert await outbox.deliver_due() == {"resolved": 1, "sent": 1, "pending": 1}
    setup.later()
    assert await outbox.deliver_due() == {"dropped": 1}
    mail = setup.store.outbox(DAY.isoformat(), DOMAIN)[2]
    assert mail.destination == "mailto:tlsrpt@example.net"
    assert (mail.state, mail.attempts) == ("dropped", 1)
    assert mail.last_error == f"delivered to {setup.url}"
    assert len(setup.mail.messages) == 1  # the first hand-over, answered with 451


@pytest_twisted.ensureDeferred
async def test_smtp_rejection_is_final(setup: Setup) -> None:
    """A 5xx from the local MTA is not retried; the exit status of the day shows it."""
    setup.publish("v=TLSRPTv1; rua=mailto:tlsrpt@example.net")
    setup.mail.final_code, setup.mail.final_text = 554, b"5.7.1 no"
    assert await setup.outbox().deliver_due() == {"resolved": 1, "failed": 1}
    assert setup.states()["mailto:tlsrpt@example.net"] == ("failed", 1)


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ((), "no v=TLSRPTv1 record"),
        (("v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"), "2 "),
        (("v=TLSRPTv1; rua=ftp://example.net/",), "no usable rua URI"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_no_usable_record_means_no_report(
    setup: Setup, records: tuple[str, ...], reason: str
) -> None:
    """No record, two records or no usable URI: the report is dropped, nothing is sent."""
    setup.publish(*records)
    assert await setup.outbox().deliver_due() == {"dropped": 1}
    [lookup] = setup.store.outbox()
    assert lookup.state == "dropped" and reason in lookup.last_error
    assert setup.mail.messages == [] and setup.web.bodies == []


@pytest_twisted.ensureDeferred
async def test_malformed_uri_skipped(setup: Setup) -> None:
    """A malformed rua URI is skipped with a log line; the usable one still gets the report."""
    setup.publish(f"v=TLSRPTv1; rua=mailto:not-an-address,{setup.url}")
    assert await setup.outbox().deliver_due() == {"resolved": 1, "sent": 1}
    assert set(setup.states()) == {"", setup.url}


@pytest_twisted.ensureDeferred
async def test_dns_failure_retried(setup: Setup) -> None:
    """A lookup that fails (SERVFAIL) is retried like a delivery, and then finds the record."""
    setup.dns.servfail.add(f"_smtp._tls.{DOMAIN}")
    outbox = setup.outbox()
    assert await outbox.deliver_due() == {"pending": 1}
    [lookup] = setup.store.outbox()
    assert lookup.attempts == 1 and "_smtp._tls.example.net" in lookup.last_error
    setup.dns.servfail.clear()
    setup.later()
    assert await outbox.deliver_due() == {"resolved": 1, "sent": 2}


@pytest_twisted.ensureDeferred
async def test_concurrent_senders_send_once(setup: Setup) -> None:
    """Two outboxes on one store (a timer run beside the tail service) send each report once."""
    first, second = setup.outbox().deliver_due(), setup.outbox().deliver_due()
    await DeferredList([Deferred.fromCoroutine(first), Deferred.fromCoroutine(second)])
    assert len(setup.mail.messages) == 1 and len(setup.web.bodies) == 1


@pytest_twisted.ensureDeferred
async def test_queued_again_not_sent_twice(setup: Setup) -> None:
    """Queueing the same day again after delivery sends nothing more."""
    await setup.outbox().deliver_due()
    queue_day(setup.store, setup.config, DAY, setup.clock.seconds())
    assert await setup.outbox().deliver_due() == {}
    assert len(setup.mail.messages) == 1 and len(setup.web.bodies) == 1


# --- the daily schedule ---------------------------------------------------------------------


class NoDNS:
    """A resolver for tests that must not look anything up."""

    async def txt(self, name: str) -> list[bytes]:
        raise AssertionError(f"looked up {name}")

    async def addresses(self, name: str) -> list[str]:
        raise AssertionError(f"looked up {name}")


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def schedule_for(
    store: Store, clock: Clock, before: Calls, *, log_read: bool = True
) -> DailySchedule:
    """A schedule of the ``tail`` service whose log is read up to the clock's time, or (not
    ``log_read``) as far as the store says."""
    config = config_for(send_delay=3600.0)
    outbox = Outbox(clock, store, config, NoDNS())
    return DailySchedule(
        clock,
        store,
        config,
        outbox,
        before,
        read_through=clock.seconds if log_read else None,
        uniform=lambda a, b: b,
    )


def read_log_through(store: Store, at: float) -> None:
    """Have a tailer commit that it has read its log (standard input) through ``at``."""
    ingest = Ingest(store, TLSRPTConfig(), "-", now=lambda: at)
    ingest.caught_up()
    ingest.finish()


@pytest.mark.parametrize(
    ("read_through", "ready"),
    [
        (None, False),
        (MIDNIGHT + BUILD_GRACE - 0.001, False),
        (MIDNIGHT + BUILD_GRACE, True),
        (MIDNIGHT + 86400, True),
    ],
)
def test_day_ready(read_through: float | None, ready: bool) -> None:
    """A day is ready once the log has been read up to the grace after its end."""
    assert day_ready(DAY, read_through) is ready


def test_schedule_waits_for_the_log_to_be_read_past_the_day(store: Store) -> None:
    """However late the clock, a day is queued only once the tailer has committed that it read
    its log past the day's end plus the grace: a day missed while it was stopped waits."""
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT + 3600)
    store.set_meta(QUEUED_THROUGH, "2026-11-20")
    schedule = schedule_for(store, clock, before, log_read=False)
    assert schedule.queue_due_days() == []  # no log read at all
    read_log_through(store, MIDNIGHT - 3 * 3600)  # stopped at 21:00 on DAY
    assert schedule.queue_due_days() == [datetime.date(2026, 11, 21)]
    assert store.meta(QUEUED_THROUGH) == "2026-11-21" and store.outbox() == []
    read_log_through(store, MIDNIGHT + BUILD_GRACE - 1)
    assert schedule.queue_due_days() == []
    read_log_through(store, MIDNIGHT + BUILD_GRACE)
    assert schedule.queue_due_days() == [DAY]
    assert [r.day for r in store.outbox()] == [DAY.isoformat()]
    assert before.count == 4


def test_schedule_waits_for_the_grace_after_midnight(store: Store) -> None:
    """Before midnight plus the grace nothing is queued; after it, yesterday, once."""
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT + BUILD_GRACE - 1)
    schedule = schedule_for(store, clock, before)
    assert store.meta(QUEUED_THROUGH) is None
    assert schedule.queue_due_days() == [datetime.date(2026, 11, 21)]  # no sessions that day
    assert store.meta(QUEUED_THROUGH) == "2026-11-21" and store.outbox() == []
    clock.advance(2)
    assert schedule.queue_due_days() == [DAY]
    assert before.count == 2 and store.meta(QUEUED_THROUGH) == DAY.isoformat()
    assert schedule.built == 1
    [lookup] = store.outbox()
    assert lookup.next_at == clock.seconds() + 3600.0  # the random delay, here its maximum
    assert schedule.queue_due_days() == [] and before.count == 2


def test_schedule_catches_up_on_missed_days(store: Store) -> None:
    """After days without the service, the last week's unqueued days are queued in order."""
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT + 3600)
    store.set_meta(QUEUED_THROUGH, "2026-11-01")
    days = schedule_for(store, clock, before).queue_due_days()
    assert days == [datetime.date(2026, 11, d) for d in range(16, 23)]
    assert before.count == 1


def test_schedule_ticks(store: Store) -> None:
    """Started, the schedule queues at once and looks again every interval."""
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT - 60)
    schedule = schedule_for(store, clock, before)
    schedule.start()
    assert store.outbox() == []
    clock.advance(60 + BUILD_GRACE)
    assert len(store.outbox()) == 1
    schedule.stop()
    clock.advance(86400)
    assert store.meta(QUEUED_THROUGH) == DAY.isoformat()


def test_schedule_builds_a_day_with_a_domain_it_cannot_name(store: Store) -> None:
    """Counts under a name no report can carry leave that name out: the day's other reports
    are queued, the day is marked done and the schedule goes on ticking."""
    bad = CountKey(DAY.isoformat(), PolicyKey("no-policy-found", "[192.0.2.9]"), "success")
    store.commit_counts("old.log", None, {count_row(bad): 1}, 0.0)
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT + BUILD_GRACE + 1)
    schedule = schedule_for(store, clock, before)
    schedule.start()
    assert [r.policy_domain for r in store.outbox()] == [DOMAIN]
    assert store.meta(QUEUED_THROUGH) == DAY.isoformat()
    assert schedule.running
    schedule.stop()


@pytest.mark.logged_errors_expected
def test_schedule_passes_over_a_day_that_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day whose build fails unexpectedly is logged and passed over; the days after it are
    queued all the same."""
    real = queue_day

    def failing(store: Store, config: Config, day: datetime.date, *args: Any) -> Any:
        if day == datetime.date(2026, 11, 20):
            raise RuntimeError("a bug")
        return real(store, config, day, *args)

    monkeypatch.setattr("postfix_mtasts.tlsrpt.outbox.queue_day", failing)
    clock, before = Clock(), Calls()
    clock.advance(MIDNIGHT + 3600)
    store.set_meta(QUEUED_THROUGH, "2026-11-18")
    schedule = schedule_for(store, clock, before)
    assert schedule.queue_due_days() == [datetime.date(2026, 11, d) for d in (19, 20, 21, 22)]
    assert store.meta(QUEUED_THROUGH) == DAY.isoformat()
    assert [r.day for r in store.outbox()] == [DAY.isoformat()]


class FailingOutbox(Outbox):
    """An outbox whose every delivery round fails unexpectedly."""

    rounds = 0

    async def deliver_due(self) -> Counter[str]:
        self.rounds += 1
        raise RuntimeError("a bug")


@pytest.mark.logged_errors_expected
def test_schedule_goes_on_after_a_failed_tick(store: Store) -> None:
    """An unexpected error in a tick is logged, and the next tick comes all the same."""
    clock = Clock()
    config = config_for()
    outbox = FailingOutbox(clock, store, config, NoDNS())
    schedule = DailySchedule(clock, store, config, outbox)
    schedule.start()
    clock.advance(60)
    assert outbox.rounds == 2 and schedule.running
    schedule.stop()
    assert not schedule.running


# --- the commands -----------------------------------------------------------------------------


def write_config(path: Path, setup: Setup, **tlsrpt: str) -> Path:
    """A configuration file for the real program, reaching the test's servers."""
    host, port = setup.dns.address
    extra = "".join(f"{key} = {value}\n" for key, value in tlsrpt.items())
    path.write_text(
        "[server]\nallow_root = true\n"  # CI runs the tests as root
        f'[store]\npath = "{setup.store.path}"\n'
        f'[dns]\nnameservers = ["{host}:{port}"]\n'
        f'[https]\nca_file = "{setup.config.https.ca_file}"\n'
        '[tlsrpt]\norganization_name = "Example Org"\n'
        'contact_info = "mailto:tlsrpt@example.org"\n'
        f'smtp = "127.0.0.1:{setup.mail.port}"\n' + extra
    )
    return path


@pytest_twisted.ensureDeferred
async def test_report_send_command(reactor: Any, setup: Setup, tmp_path: Path) -> None:
    """`report --send` delivers the day's report to each address and says where it went."""
    config = write_config(tmp_path / "c.toml", setup)
    out, err, code = await run(reactor, ["report", "-c", str(config), "--day", "2026-11-22",
                                         "--send"])  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[-2:] == [
        f"example.net: {setup.url}: sent",
        "example.net: mailto:tlsrpt@example.net: sent (queue id ABC123)",
    ]
    again = await run(reactor, ["report", "-c", str(config), "--day", "2026-11-22", "--send"])
    assert again[2] == 0 and again[0].splitlines()[-2:] == out.splitlines()[-2:]
    assert len(setup.mail.messages) == 1 and len(setup.web.bodies) == 1
    check_report(setup.web.bodies[0])


@pytest_twisted.ensureDeferred
async def test_report_send_command_waits_for_the_log(
    reactor: Any, setup: Setup, tmp_path: Path
) -> None:
    """`report --send` queues a day only once a tailer has read the log past its end and the
    grace; before, it says so, delivers what else is due and exits 0."""
    day = datetime.date(2026, 11, 21)
    key = CountKey(day.isoformat(), PolicyKey("no-policy-found", "gate.example"), "success")
    setup.store.commit_counts("mail.log", None, {count_row(key): 4}, 0.0)
    setup.dns.set("_smtp._tls.gate.example", [("TXT", f"v=TLSRPTv1; rua={setup.url}")])
    config = write_config(tmp_path / "c.toml", setup)
    args = ["report", "-c", str(config), "--day", day.isoformat(), "--send"]
    read_log_through(setup.store, MIDNIGHT - 86400 + BUILD_GRACE - 1)
    out, err, code = await run(reactor, args)
    assert code == 0, err
    assert out.splitlines()[0] == (
        "2026-11-21: not queued yet: the mail log has been read through"
        " 2026-11-22T00:04:59Z only; a later run queues it"
    )
    assert setup.store.outbox(day.isoformat()) == []
    read_log_through(setup.store, MIDNIGHT - 86400 + BUILD_GRACE)
    out, err, code = await run(reactor, args)
    assert code == 0, err
    assert out.splitlines()[-1] == f"gate.example: {setup.url}: sent"


@pytest_twisted.ensureDeferred
async def test_report_send_command_catches_up(reactor: Any, setup: Setup, tmp_path: Path) -> None:
    """Without --day, `report --send` queues every finished day since the last one queued
    that the log has been read past, as the tail service's schedule does."""
    today = datetime.datetime.fromtimestamp(time.time() - BUILD_GRACE, datetime.UTC).date()
    days = [today - datetime.timedelta(days=n) for n in (3, 2)]
    for n, day in enumerate(days, 1):
        key = CountKey(day.isoformat(), PolicyKey("no-policy-found", "gate.example"), "success")
        setup.store.commit_counts("mail.log", None, {count_row(key): n}, 0.0)
    setup.store.set_meta(QUEUED_THROUGH, (today - datetime.timedelta(days=4)).isoformat())
    setup.dns.set("_smtp._tls.gate.example", [("TXT", f"v=TLSRPTv1; rua={setup.url}")])
    read_log_through(setup.store, time.time())
    config = write_config(tmp_path / "c.toml", setup)
    out, err, code = await run(reactor, ["report", "-c", str(config), "--send"])
    assert code == 0, err
    for day in days:
        sent = [r.state for r in setup.store.outbox(day.isoformat()) if r.destination]
        assert sent == ["sent"], day
    assert out.count(f"gate.example: {setup.url}: sent") == 2
    yesterday = today - datetime.timedelta(days=1)
    assert setup.store.meta(QUEUED_THROUGH) == yesterday.isoformat()


@pytest_twisted.ensureDeferred
async def test_report_send_command_fails_when_refused(
    reactor: Any, setup: Setup, tmp_path: Path
) -> None:
    """A report the local MTA refuses for good makes `report --send` exit 1, saying why."""
    setup.publish("v=TLSRPTv1; rua=mailto:tlsrpt@example.net")
    setup.mail.final_code, setup.mail.final_text = 554, b"5.7.1 no"
    config = write_config(tmp_path / "c.toml", setup)
    out, err, code = await run(reactor, ["report", "-c", str(config), "--day", "2026-11-22",
                                         "--send"])  # fmt: skip
    assert code == 1, err
    assert out.splitlines()[-1] == (
        "example.net: mailto:tlsrpt@example.net: failed (SMTP 554 5.7.1 no)"
    )
    assert "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_tail_service_sends_finished_days(reactor: Any, setup: Setup, tmp_path: Path) -> None:
    """With send = true, the running tail service queues the finished day and delivers it,
    with the day's log lines it read when it started; its metrics page counts the log lines,
    the sessions, the report built and its sending."""
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=2)
    policy = PolicyKey("no-policy-found", "tail.example")
    counts = {count_row(CountKey(day.isoformat(), policy, "success")): 5}
    setup.store.commit_counts("other.log", None, counts, 0)
    setup.store.set_meta(QUEUED_THROUGH, (day - datetime.timedelta(days=1)).isoformat())
    setup.dns.set("_smtp._tls.tail.example", [("TXT", f"v=TLSRPTv1; rua={setup.url}")])
    config = write_config(tmp_path / "c.toml", setup, send="true", send_delay="0")
    metrics_port = free_port()
    with config.open("a") as f:
        f.write(f'[metrics]\ntail = "tcp:{metrics_port}"\n')
    log = tmp_path / "mail.log"
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    late = datetime.datetime.combine(day, datetime.time(23, 30), datetime.UTC)
    log_lines = [  # a session late on the day, logged while the service was stopped
        f"{late.isoformat()} mx postfix/smtp[6]: Verified TLS connection established to"
        " mx.tail.example[192.0.2.27]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
        " (256/256 bits)",
        f"{late.isoformat()} mx postfix/smtp[6]: 5A0E94D2F3: to=<b@tail.example>,"
        " relay=mx.tail.example[192.0.2.27]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0,"
        " status=sent (250 2.0.0 Ok)",
    ]
    lines = [
        (0, 7, "Verified TLS connection established to mx.example.net[192.0.2.25]:25:"
               " TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"),
        (1, 7, "4F9D83C1E2: to=<a@example.net>, relay=mx.example.net[192.0.2.25]:25,"
               " delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 2.0.0 Ok)"),
        (60, 8, "connect to mx.example.org[192.0.2.26]:25: Connection timed out"),
    ]  # fmt: skip
    log_lines += [
        f"{(now + datetime.timedelta(seconds=s)).isoformat()} mx postfix/smtp[{pid}]: {m}"
        for s, pid, m in lines
    ]
    log.write_text("".join(line + "\n" for line in log_lines))
    daemon = Daemon(config, tmp_path / "tail.out")
    daemon.start(args=("tail", str(log)))

    def received() -> list[dict[str, Any]]:
        reports = [json.loads(gzip.decompress(body)) for body in setup.web.bodies]
        return [r for r in reports if r["policies"][0]["policy"]["policy-domain"] == "tail.example"]

    try:
        await daemon.wait_until(reactor, received)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        m = "postfix_mtasts_"
        for _ in range(100):  # the totals are added when the whole sending round ends
            samples = await scrape(reactor, url)
            if (m + "report_attempts_total", "sent") in samples:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert samples[(m + "log_lines_read_total", "")] == 5
        assert samples[(m + "log_lines_skipped_total", "not-understood")] == 0
        assert samples[(m + "sessions_total", "success")] == 2
        # Two finished days have counts: the setup's example.net and this test's tail.example.
        assert samples[(m + "reports_built_total", "")] == 2, daemon.output()
        # example.net's report goes to its two addresses at once, tail.example's to one.
        assert samples[(m + "report_attempts_total", "sent")] == 3, daemon.output()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(reactor) == 0
    finally:
        daemon.kill()
    [report] = received()
    assert validate_report(report) == []
    assert report["date-range"]["start-datetime"] == f"{day.isoformat()}T00:00:00Z"
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 6
    assert "delivered to " + setup.url in daemon.output()
