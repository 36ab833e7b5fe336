"""Delivering reports: the outbox in the store, its retries, and the daily schedule.

A finished day's reports are queued in the store (``reference/tlsrpt.md`` §5).  Each report
first gets one outbox row with no destination: when it is due, the policy domain's
``_smtp._tls`` record is looked up and every usable ``rua`` URI gets a row of its own, tried
at once.  A failed row is retried from 5 minutes, doubling, up to 4 hours apart, with jitter,
for 24 hours after its first attempt, then given up with a log line.  Once one destination has
taken the report it counts as delivered, and the others' retries stop.  The outbox lives in
the store, so retries survive restarts; a row is claimed before each attempt, so two
processes (the ``tail`` service and a ``report --send`` timer) never send it twice.
"""

from __future__ import annotations

import datetime
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from postfix_mtasts.config import Config, ConfigError
from postfix_mtasts.mtasts.dns import DNSFailure
from postfix_mtasts.mtasts.resolver import iso_utc
from postfix_mtasts.store import OutboxRow, QueuedReport, Store, StoreError
from postfix_mtasts.tlsrpt.daily import DayReport, day_reports
from postfix_mtasts.tlsrpt.deliver import (
    DeliveryError,
    build_report_message,
    dkim_sign,
    post_https,
    send_mail,
)
from postfix_mtasts.tlsrpt.ingest import log_read_through
from postfix_mtasts.tlsrpt.record import ReportRecordError, mailto_address, parse_tlsrpt_records

log = Logger()

RETRY_FIRST = 300.0
"""Seconds before the first retry; each further one waits twice as long ..."""
RETRY_CAP = 4 * 3600.0
"""... up to this many seconds."""
GIVE_UP_AFTER = 24 * 3600.0
"""Seconds after its first attempt when a destination is given up (RFC 8460 §5.5)."""
JITTER = 0.1
"""Each retry delay is stretched or shrunk by up to this fraction, at random."""
ATTEMPT_LEASE = 600.0
"""Seconds a claimed row stays out of other processes' reach (longer than any attempt)."""
DELIVERY_TIMEOUT = 60.0
"""Seconds for one attempt: an SMTP hand-over or an HTTPS POST."""
CONCURRENCY = 8
"""Attempts in flight at once."""
BUILD_GRACE = 300.0
"""Seconds after UTC midnight that the log must have been read past before a day's reports
are built (:func:`day_ready`), so that the last lines of the day have reached the log."""
CATCH_UP_DAYS = 7
"""How many missed days the ``tail`` service queues when it was not running at midnight."""
KEEP_DAYS = 32
"""Days of counts, report ids and finished outbox rows kept (``report --day`` can rebuild
any of them); report mail queue ids are kept for :data:`CATCH_UP_DAYS`."""
QUEUED_THROUGH = "reports_queued_through"
"""The ``meta`` key holding the last day the ``tail`` service queued."""


class TXTLookup(Protocol):
    """The part of :class:`postfix_mtasts.mtasts.dns.DNSClient` the outbox uses."""

    async def txt(self, name: str) -> list[bytes]: ...

    async def addresses(self, name: str) -> list[str]: ...


def day_ready(day: datetime.date, read_through: float | None) -> bool:
    """Whether ``day``'s reports may be built: the log has been read (and the reading
    committed) up to :data:`BUILD_GRACE` after the day's end; see
    :attr:`postfix_mtasts.tlsrpt.ingest.Ingest.read_through`."""
    end = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    return read_through is not None and read_through >= end.timestamp() + BUILD_GRACE


def retry_delay(failures: int, spread: float) -> float:
    """Seconds to wait after the ``failures``-th failure (1, 2, ...); ``spread`` in [0, 1)
    picks the jitter."""
    base = min(RETRY_FIRST * 2.0 ** min(failures - 1, 16), RETRY_CAP)
    return base * (1 - JITTER + 2 * JITTER * spread)


def after_failure(
    row: OutboxRow, now: float, error: str, *, final: bool, spread: float
) -> OutboxRow:
    """``row`` after an attempt at ``now`` failed with ``error``: retried later, or ``failed``
    when ``final`` (retrying cannot help), or ``expired`` 24 hours after the first attempt."""
    first = now if row.first_at is None else row.first_at
    attempts = row.attempts + 1
    give_up = first + GIVE_UP_AFTER
    if final:
        return replace(
            row, state="failed", attempts=attempts, first_at=first, last_error=error, done_at=now
        )
    if now >= give_up:
        return replace(
            row, state="expired", attempts=attempts, first_at=first, last_error=error, done_at=now
        )
    due = min(now + retry_delay(attempts, spread), give_up)
    return replace(row, attempts=attempts, first_at=first, next_at=due, last_error=error)


def summary_text(report: dict[str, Any], policy_domain: str) -> str:
    """The short human-readable part of report mail."""
    ok = failed = 0
    for policy in report["policies"]:
        ok += policy["summary"]["total-successful-session-count"]
        failed += policy["summary"]["total-failure-session-count"]
    span = report["date-range"]
    return (
        f"This is an SMTP TLS report (RFC 8460) from {report['organization-name']}"
        f" for {policy_domain}.\n\n"
        f"From {span['start-datetime']} to {span['end-datetime']}, {ok + failed} outbound"
        f" TLS sessions to {policy_domain} were counted: {ok} succeeded, {failed} failed.\n"
        "The details are in the attached report.\n"
    )


def queued(report: DayReport, day: datetime.date) -> QueuedReport:
    """What the outbox keeps of ``report``."""
    return QueuedReport(
        day=day.isoformat(),
        policy_domain=report.policy_domain,
        report_id=report.report_id,
        filename=report.filename,
        summary=summary_text(report.report, report.policy_domain),
        gz=report.gz,
    )


def days_to_queue(store: Store, now: float) -> list[datetime.date]:
    """The finished days not queued yet at ``now``: those after the last day queued, at most
    :data:`CATCH_UP_DAYS` back, or yesterday alone when nothing was ever queued.  Each is
    queued once :func:`day_ready` says so."""
    today = datetime.datetime.fromtimestamp(now - BUILD_GRACE, datetime.UTC).date()
    last = today - datetime.timedelta(days=1)
    through = store.meta(QUEUED_THROUGH)
    first = last
    if through is not None:
        first = max(
            datetime.date.fromisoformat(through) + datetime.timedelta(days=1),
            today - datetime.timedelta(days=CATCH_UP_DAYS),
        )
    return [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]


def queue_days(
    store: Store,
    config: Config,
    days: list[datetime.date],
    now: float,
    delay: Callable[[], float] = lambda: 0.0,
) -> list[tuple[datetime.date, list[DayReport], int]]:
    """Queue ``days`` (see :func:`queue_day`) and mark the last as queued; returns each day
    built with its reports and how many were new.  A day that cannot be built is logged and
    left out; a :class:`StoreError` stops there, to be tried again."""
    built = []
    for day in days:
        try:
            reports, new = queue_day(store, config, day, now, delay)
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - one bad day must not stop the others
            log.failure("reports of {day}: not built", day=day.isoformat())
            continue
        built.append((day, reports, new))
        log.info(
            "reports of {day}: {n} built, {new} queued",
            day=day.isoformat(),
            n=len(reports),
            new=new,
        )
    if days:
        store.set_meta(QUEUED_THROUGH, days[-1].isoformat())
        prune(store, now)
    return built


def queue_day(
    store: Store,
    config: Config,
    day: datetime.date,
    now: float,
    delay: Callable[[], float] = lambda: 0.0,
) -> tuple[list[DayReport], int]:
    """Build ``day``'s reports and queue each, its delivery due ``delay()`` seconds from
    ``now``; returns the reports and how many of them were new to the outbox (a day queued
    before keeps what was queued then)."""
    reports = day_reports(store, config.tlsrpt, day, now)
    new = sum(store.queue_report(queued(r, day), now + delay(), now) for r in reports)
    return reports, new


def prune(store: Store, now: float) -> int:
    """Forget reporting data older than :data:`KEEP_DAYS` (see there); returns the rows."""
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    oldest = (today - datetime.timedelta(days=KEEP_DAYS)).isoformat()
    deleted = store.prune_reporting(oldest, now - CATCH_UP_DAYS * 86400)
    if deleted:
        log.info("forgot {n} rows of reporting data from before {day}", n=deleted, day=oldest)
    return deleted


def read_dkim_key(config: Config) -> bytes | None:
    """The configured DKIM key (PEM), ``None`` when the local MTA signs; a file that cannot
    be read is a configuration error."""
    dkim = config.tlsrpt.dkim
    if not dkim.enabled:
        return None
    try:
        with open(dkim.key_file, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            config.source, "[tlsrpt.dkim] key_file", f"{dkim.key_file}: {e.strerror or e}"
        ) from None


Sender = Callable[..., Awaitable[str]]
Poster = Callable[..., Awaitable[int]]


class Outbox:
    """Delivers the store's due outbox rows.

    ``send_mail`` and ``post_https`` default to :mod:`postfix_mtasts.tlsrpt.deliver`'s;
    ``spread()`` returns a number in [0, 1) for the retry jitter.
    """

    def __init__(
        self,
        reactor: Any,
        store: Store,
        config: Config,
        dns: TXTLookup,
        *,
        dkim_key: bytes | None = None,
        send: Sender = send_mail,
        post: Poster = post_https,
        spread: Callable[[], float] = random.random,
        timeout: float = DELIVERY_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._config = config
        self._dns = dns
        self._dkim_key = dkim_key
        self._send = send
        self._post = post
        self._spread = spread
        self._timeout = timeout
        self._limit = DeferredSemaphore(CONCURRENCY)
        self.totals: Counter[str] = Counter()
        """Attempts so far by the state they left their row in (``pending``: to be retried)."""

    async def deliver_due(self) -> Counter[str]:
        """Attempt every due row (and the destinations their lookups find); returns how many
        rows ended in each state."""
        outcome: Counter[str] = Counter()
        for _ in range(2):  # the second pass tries the destinations the first one found
            rows = self._store.outbox_due(self._reactor.seconds())
            if not rows:
                break
            attempts = [self._limit.run(self._guarded, row) for row in rows]
            for _, state in await DeferredList(attempts):
                outcome[state] += 1
        self.totals.update(outcome)
        return outcome

    async def _guarded(self, row: OutboxRow) -> str:
        try:
            return await self._attempt(row)
        except Exception:  # noqa: BLE001 - logged; the row is retried when its lease ends
            log.failure(
                "delivering {filename} to {destination} failed unexpectedly",
                filename=f"{row.day}/{row.policy_domain}",
                destination=row.destination,
            )
            return "error"

    async def _attempt(self, row: OutboxRow) -> str:
        now = self._reactor.seconds()
        if not self._store.claim_outbox(row, now + ATTEMPT_LEASE):
            return "skipped"
        report = self._store.queued_report(row.day, row.policy_domain)
        if report is None:
            return self._done(row, "dropped", "the report is no longer kept", now)
        if row.destination == "":
            return await self._look_up(row, report, now)
        if row.attempts and (taken := self._taken_by(row)):
            return self._done(row, "dropped", f"delivered to {taken}", now)
        try:
            queue_id = await self._deliver(row.destination, report)
        except DeliveryError as e:
            return self._failed(row, report, e.detail, final=e.permanent)
        now = self._reactor.seconds()
        done = replace(
            row,
            state="sent",
            attempts=row.attempts + 1,
            first_at=row.first_at or now,
            queue_id=queue_id,
            last_error="",
            done_at=now,
        )
        self._store.update_outbox(done)
        log.info(
            "report {filename} delivered to {destination}{qid}",
            filename=report.filename,
            destination=row.destination,
            qid=f", queue id {queue_id}" if queue_id else "",
        )
        return "sent"

    async def _look_up(self, row: OutboxRow, report: QueuedReport, now: float) -> str:
        name = f"_smtp._tls.{row.policy_domain}"
        try:
            record = parse_tlsrpt_records(await self._dns.txt(name))
        except DNSFailure as e:
            return self._failed(row, report, f"{name}: {e}", final=False)
        except (ReportRecordError, ValueError) as e:
            log.info(
                "no report for {domain}: {name}: {reason}",
                domain=row.policy_domain,
                name=name,
                reason=str(e),
            )
            return self._done(row, "dropped", f"{name}: {e}", now)
        for uri, why in record.skipped:
            log.warn("{name}: skipping rua {uri!r}: {why}", name=name, uri=uri, why=why)
        now = self._reactor.seconds()
        found = replace(
            row, state="resolved", attempts=row.attempts + 1, first_at=row.first_at or now
        )
        self._store.update_outbox(replace(found, next_at=now, done_at=now), record.rua)
        return "resolved"

    async def _deliver(self, destination: str, report: QueuedReport) -> str:
        if destination.lower().startswith("mailto:"):
            return await self._mail(mailto_address(destination), report)
        await self._post(
            self._reactor,
            url=destination,
            body=report.gz,
            resolve=self._dns.addresses,
            ca_file=self._config.https.ca_file,
            verify=self._config.tlsrpt.verify_https,
            timeout=self._timeout,
        )
        return ""

    async def _mail(self, rcpt: str, report: QueuedReport) -> str:
        tlsrpt = self._config.tlsrpt
        submitter = tlsrpt.submitter_domain
        try:
            message = build_report_message(
                report_gz=report.gz,
                filename=report.filename,
                policy_domain=report.policy_domain,
                submitter=submitter,
                report_id=report.report_id,
                mail_from=tlsrpt.sender,
                rcpt=rcpt,
                organization_name=tlsrpt.organization_name,
                summary_text=report.summary,
                date=datetime.datetime.fromtimestamp(self._reactor.seconds(), datetime.UTC),
                message_id_domain=submitter,
            )
        except ValueError as e:
            raise DeliveryError(f"cannot build the message: {e}", permanent=True) from e
        if self._dkim_key is not None:
            dkim = tlsrpt.dkim
            message = dkim_sign(
                message, domain=dkim.domain, selector=dkim.selector, key_pem=self._dkim_key
            )
        host, port = tlsrpt.smtp_address
        return await self._send(
            self._reactor,
            smtp_host=host,
            smtp_port=port,
            mail_from=tlsrpt.sender,
            rcpt=rcpt,
            message=message,
            timeout=self._timeout,
        )

    def _taken_by(self, row: OutboxRow) -> str | None:
        for other in self._store.outbox(row.day, row.policy_domain):
            if other.state == "sent":
                return other.destination
        return None

    def _failed(self, row: OutboxRow, report: QueuedReport, error: str, *, final: bool) -> str:
        now = self._reactor.seconds()
        after = after_failure(row, now, error, final=final, spread=self._spread())
        self._store.update_outbox(after)
        what = row.destination or "the _smtp._tls lookup"
        if after.state == "pending":
            log.info(
                "report {filename} to {destination}: {error}; next try at {at}",
                filename=report.filename,
                destination=what,
                error=error,
                at=iso_utc(after.next_at),
            )
        else:
            log.warn(
                "giving up report {filename} to {destination} after {n} attempt(s): {error}",
                filename=report.filename,
                destination=what,
                n=after.attempts,
                error=error,
            )
        return after.state

    def _done(self, row: OutboxRow, state: str, why: str, now: float) -> str:
        self._store.update_outbox(replace(row, state=state, last_error=why, done_at=now))
        return state


class DailySchedule:
    """Inside the ``tail`` service: once the log has been read past each UTC midnight (plus
    :data:`BUILD_GRACE`), build the finished day's reports, each due after a random delay of
    up to ``[tlsrpt] send_delay``; and every ``interval`` seconds deliver what is due.

    ``before_build`` is called first, so that the sessions the tailer holds are counted;
    then ``read_through()`` tells how far the log has been read (default: the store's
    :func:`~postfix_mtasts.tlsrpt.ingest.log_read_through`), and the days it is not past
    (:func:`day_ready`) wait for a later tick.
    A store error ends the tick, and the next one tries again; a day whose build fails
    otherwise (a bug) is logged and passed over (``report --day DAY --send`` builds it by
    hand), so that one bad day stops neither the days after it nor the schedule.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        config: Config,
        outbox: Outbox,
        before_build: Callable[[], object] = lambda: None,
        *,
        read_through: Callable[[], float | None] | None = None,
        interval: float = 60.0,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._clock = clock
        self._store = store
        self._config = config
        self._outbox = outbox
        self._before_build = before_build
        self._read_through = read_through or (lambda: log_read_through(store))
        self._uniform = uniform
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval = interval
        self.built = 0
        """Reports built so far."""

    def start(self) -> None:
        """Tick now and every ``interval`` seconds."""
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("the report schedule stopped", f)
        )

    @property
    def running(self) -> bool:
        """Whether the schedule ticks."""
        return self._loop.running

    def stop(self) -> None:
        """Stop ticking (an attempt in flight finishes on its own)."""
        if self._loop.running:
            self._loop.stop()

    async def tick(self) -> None:
        """Queue the days due, then deliver the outbox rows due."""
        self.queue_due_days()
        await self._outbox.deliver_due()

    def _tick(self) -> Deferred[None]:
        async def guarded() -> None:
            try:
                await self.tick()
            except StoreError as e:  # the next tick tries again
                log.error("the report schedule: {error}", error=str(e))
            except Exception:  # noqa: BLE001 - logged; the schedule must go on
                log.failure("the report schedule failed unexpectedly")

        return Deferred.fromCoroutine(guarded())

    def queue_due_days(self) -> list[datetime.date]:
        """Queue every finished day not queued yet (at most :data:`CATCH_UP_DAYS` back) that
        the log has been read past; returns those days."""
        now = self._clock.seconds()
        days = days_to_queue(self._store, now)
        if not days:
            return []
        self._before_build()
        read_through = self._read_through()
        days = [day for day in days if day_ready(day, read_through)]
        delay = self._config.tlsrpt.send_delay
        built = queue_days(self._store, self._config, days, now, lambda: self._uniform(0.0, delay))
        self.built += sum(len(reports) for _, reports, _ in built)
        return days


def outcome_lines(rows: Iterable[OutboxRow]) -> str:
    """One line per destination for ``report --send``: where each report went, or why not."""
    lines = []
    for row in rows:
        where = row.destination or "_smtp._tls lookup"
        detail = row.last_error or (f"queue id {row.queue_id}" if row.queue_id else "")
        if row.state == "pending":
            detail = f"{detail}; next try at {iso_utc(row.next_at)}"
        lines.append(
            f"{row.policy_domain}: {where}: {row.state}" + (f" ({detail})" if detail else "")
        )
    return "\n".join(lines)
