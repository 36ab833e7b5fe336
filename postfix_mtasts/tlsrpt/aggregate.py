"""From TLS sessions to report counters: which policy applied, and what to count.

The policy map records in the store every policy it fetched and every fetch failure it met
(:meth:`postfix_mtasts.store.Store.events`).  For a session to domain D at time T the policy
in force is read from D's events up to T (``reference/tlsrpt.md`` §8):

- the latest event is a failure less than :data:`FAILURE_LASTS` old: the session counts once,
  as that ``sts-policy-*`` failure, under the policy still held then (its lines and ``mx``
  patterns), or under a bare ``sts`` policy when nothing valid was held (§10:
  ``policy-string`` and ``mx-host`` omitted);
- the latest event is a policy unexpired at T: ``enforce`` and ``testing`` policies are
  ``sts`` with their lines; ``none`` is as if there were no policy (RFC 8461 §8.3);
- otherwise ``no-policy-found``.

Then :func:`postfix_mtasts.tlsrpt.logparse.classify` turns the session's evidence into a
result under that policy.  Everything here is pure; :class:`Aggregator` adds a small cache of
each domain's events in front of the store.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from postfix_mtasts.store import CountRow, PolicyEvent
from postfix_mtasts.tlsrpt.logparse import SUCCESS, PolicyKind, Session, classify
from postfix_mtasts.tlsrpt.report import PolicyKey

NO_POLICY = "no-policy-found"


@dataclass(frozen=True, slots=True)
class Applied:
    """The policy in force for a session, as the reporter sees it."""

    kind: PolicyKind
    key: PolicyKey
    sts_failure: tuple[str, str] | None = None  # (result type, detail) recorded by the map


@dataclass(frozen=True, slots=True)
class CountKey:
    """One counter: a UTC day, a policy, a result and where it happened."""

    day: str  # YYYY-MM-DD, UTC
    policy: PolicyKey
    result: str  # "success" or an RFC 8460 result type
    mx_host: str = ""
    mx_ip: str = ""
    reason: str = ""


STAMP_SLACK = 1.0
"""Seconds by which a policy event may follow the log stamp of a session it applied to: the
map records a policy before Postfix opens the session that uses it, but Postfix's traditional
stamps cut the time to whole seconds, and the store's event times do not."""


FAILURE_LASTS = 900.0
"""Seconds for which a failure event speaks for the sessions after it.  The map records one
at each failed attempt, and while Postfix asks about the domain it tries again at least every
six minutes (``resolver.BACKOFF`` plus ``resolver.GRACE``); a failure older than this with
nothing after it means the map stopped failing: the record went away, or came back to the
policy held."""


def policy_at(domain: str, events: Sequence[PolicyEvent], at: float) -> Applied:
    """The policy in force for ``domain`` at ``at`` (a log stamp, see :data:`STAMP_SLACK`),
    from its events in time order."""
    latest: PolicyEvent | None = None
    held: PolicyEvent | None = None  # the latest policy event up to ``at``
    for event in events:
        if event.at >= at + STAMP_SLACK:
            break
        latest = event
        if event.kind == "policy":
            held = event
    valid = held if held is not None and (held.expires_at or 0.0) > at else None
    sts_key = PolicyKey("sts", domain)
    if valid is not None and valid.policy is not None:
        sts_key = PolicyKey("sts", domain, valid.policy.lines, valid.policy.mx)
    failure = latest.failure_type if latest is not None and latest.kind == "failure" else None
    if failure and latest is not None and at - latest.at < FAILURE_LASTS:
        if valid is not None and valid.policy is not None and valid.policy.mode == "none":
            return Applied("none", PolicyKey(NO_POLICY, domain))  # never reported for none
        kind: PolicyKind = "sts-enforce"
        if valid is not None and valid.policy is not None and valid.policy.mode == "testing":
            kind = "sts-testing"
        return Applied(kind, sts_key, (failure, latest.detail or ""))
    if valid is not None and valid.policy is not None and valid.policy.mode != "none":
        mode: PolicyKind = "sts-enforce" if valid.policy.mode == "enforce" else "sts-testing"
        return Applied(mode, sts_key)
    return Applied("none", PolicyKey(NO_POLICY, domain))


def count_row(key: CountKey) -> CountRow:
    """``key`` as the store keeps it."""
    p = key.policy
    return (
        key.day,
        p.policy_domain,
        p.policy_type,
        "\n".join(p.policy_string),
        "\n".join(p.mx_host),
        key.result,
        key.mx_host,
        key.mx_ip,
        key.reason,
    )


def count_key_from_row(row: CountRow) -> CountKey:
    """The inverse of :func:`count_row`."""
    day, domain, ptype, pstring, patterns, result, mx_host, mx_ip, reason = row
    lines = tuple(pstring.split("\n")) if pstring else ()
    mx = tuple(patterns.split("\n")) if patterns else ()
    return CountKey(day, PolicyKey(ptype, domain, lines, mx), result, mx_host, mx_ip, reason)


_DAYS: dict[float, str] = {}


def utc_day(at: float) -> str:
    """The UTC day of a Unix time, as YYYY-MM-DD."""
    start = at - at % 86400
    if start + 0.000001 <= at < start + 86399.999999:  # not rounded to another day's µs
        day = _DAYS.get(start)
        if day is None:
            if len(_DAYS) > 1000:
                _DAYS.clear()
            day = _DAYS[start] = _utc_day(start + 43200)
        return day
    return _utc_day(at)


def _utc_day(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def count_key(session: Session, applied: Applied) -> CountKey | None:
    """The counter ``session`` adds one to under ``applied``, or None if it is not counted."""
    day = utc_day(session.time)
    if applied.sts_failure is not None and session.tlsrpt_result is None:
        result_type, detail = applied.sts_failure
        return CountKey(day, applied.key, result_type, reason=detail)
    outcome = classify(session, applied.kind)
    if outcome is None:
        return None
    result, reason = outcome
    if result == SUCCESS:
        return CountKey(day, applied.key, SUCCESS)
    return CountKey(day, applied.key, result, session.mx_host, session.mx_ip, reason or "")


EventSource = Callable[[str, float, float], list[PolicyEvent]]


COMPLETE_AFTER = 60.0
"""Seconds after which the store holds every policy event up to a time: the map writes each
event as it happens."""


CACHED_DOMAINS = 10_000
"""Domains whose events an :class:`Aggregator` keeps at most; past that it starts afresh."""


class Aggregator:
    """Counts sessions per :class:`CountKey`, reading each domain's events once a while.

    ``events(domain, start, end)`` is :meth:`Store.events`.  A domain's events are read from
    the start of the session's UTC day and kept for the later sessions of the span read.
    With ``now`` (the clock), the span ends where events can still be added
    (:data:`COMPLETE_AFTER` before now) or at the day's end: a log read well after it was
    written costs one read per domain and day, and a session of the last minute (a log
    followed live) reads the events up to its own time, which the map has written before
    Postfix opened it.  Without a clock, a span is ``refresh`` seconds of log time.  Only the
    latest day's domains are kept, at most :data:`CACHED_DOMAINS` of them.
    """

    def __init__(
        self,
        events: EventSource,
        refresh: float = 300.0,
        now: Callable[[], float] | None = None,
    ) -> None:
        self._events = events
        self._refresh = refresh
        self._now = now
        self._day = -1.0
        self._cache: dict[str, tuple[float, float, list[PolicyEvent], Applied | None]] = {}
        self.counts: Counter[CountKey] = Counter()
        self.not_counted = 0

    def add(self, session: Session) -> None:
        """Count ``session``."""
        domain = session.domain
        cached = self._cache.get(domain)
        at = session.time
        if cached is None or not (cached[0] <= at < cached[1]):
            cached = self._read(domain, at)
        applied = cached[3] or policy_at(domain, cached[2], at)
        key = count_key(session, applied)
        if key is None:
            self.not_counted += 1
        else:
            self.counts[key] += 1

    def _read(
        self, domain: str, at: float
    ) -> tuple[float, float, list[PolicyEvent], Applied | None]:
        start = at - at % 86400
        if start > self._day:  # a new day: the previous one's domains are done with
            self._day = start
            self._cache.clear()
        if self._now is None:
            end = at + self._refresh
        else:
            end = max(at + STAMP_SLACK, self._now() - COMPLETE_AFTER)
        end = min(start + 86400, end)
        events = self._events(domain, start, end)
        # Without events, the same policy applies all along.
        always = None if events else policy_at(domain, events, at)
        if len(self._cache) >= CACHED_DOMAINS:  # bounded memory, whatever the log's length
            self._cache.clear()
        cached = self._cache[domain] = (start, end, events, always)
        return cached

    def take(self) -> Counter[CountKey]:
        """The counts since the last call, which the caller commits; starts afresh."""
        counts, self.counts = self.counts, Counter()
        return counts
