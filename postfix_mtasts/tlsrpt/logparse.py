"""Postfix mail log lines in, TLS sessions out (``reference/tlsrpt.md`` §4, §6, §7, §10).

Pure code: values in, values out, no I/O and no clock.  Three layers:

1. L{parse_line} / L{LineParser} split one syslog line at its process tag
   (C{<syslog_name>/<service>[<pid>]: }) into a L{LogLine}: a UTC time, the host, the names,
   the pid and the message.  BSD/postlogd stamps (C{Nov  3 08:26:01}, C{Nov 03 08:26:01}) are
   read in the configured zone with the year taken from C{now}; RFC 3339 stamps carry their
   own offset.  Parsed stamps are cached per distinct stamp text.
2. L{SessionTracker} follows each C{smtp} process (and C{tlsproxy}, best effort) through its
   lines and emits one L{Session} per TLS handshake to one MX address, or per failure that
   had no handshake (C{TLS is required, but was not offered}, DANE lookups).  Lines that can
   never make a reported session are dropped here (§7.5): connect failures and losses before
   STARTTLS, C{relay=none}, loopback and UNIX-socket relays, other services, C{reused}
   handshakes, and the sessions that carried report mail (§6).
3. L{classify} turns a session into an RFC 8460 result for the policy that applied to it.

Why the split between 2 and 3: several rows of the §7.4 table depend on the policy in
effect (a C{Trusted} handshake with no failure line is a success under no policy, a name
mismatch under DANE is C{tlsa-invalid}, §10's C{testing} rules), and only the store knows
which policy applied to a (domain, time).  So a L{Session} carries the evidence -- the trust
word of the handshake summary, the most specific failure line seen (C{failure}, one of
L{FAILURES}, with a C{reason}), and a Postfix 3.10 C{TLSRPT:} status if one was logged -- and
the aggregator calls C{classify(session, policy)} with the policy it looked up.
C{classify} returns C{(result_type, failure_reason_code)} or C{None} when the session is not
counted under that policy (DANE-only evidence outside a C{tlsa} policy).

Counters on the tracker (never exceptions): C{ignored} for lines that are not ours or carry
nothing to count, C{unparsed} for lines of a service we read that fit no known shape
(unreadable time stamps included) and for sessions whose delivery line never came, and
C{config_problems} for local configuration and policy-lookup problems (§7.5), a health
metric of the map and Postfix.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Container, Iterable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from operator import attrgetter
from typing import Literal, NamedTuple, cast, get_args

import idna

from postfix_mtasts.tlsrpt.record import is_domain_name
from postfix_mtasts.tlsrpt.report import RESULT_TYPES

__all__ = [
    "FAILURES",
    "HOLD_SECONDS",
    "IDLE_SECONDS",
    "PROXY_WINDOW",
    "RESULT_TYPES",
    "SUCCESS",
    "Failure",
    "LineParser",
    "LogLine",
    "PolicyKind",
    "Session",
    "SessionTracker",
    "Trust",
    "classify",
    "parse_line",
]

PolicyKind = Literal["sts-enforce", "sts-testing", "none", "tlsa"]
"""The policy that applied to a session: an MTA-STS policy by mode, none, or DANE."""

Trust = Literal["Verified", "Trusted", "Untrusted", "Anonymous"]
"""The first word of Postfix's handshake summary."""

Failure = Literal[
    "starttls-not-supported",
    "untrusted-issuer",
    "not-trusted-by-policy",
    "certificate-expired",
    "hostname-mismatch",
    "validation-failure",
    "server-not-verified",
    "server-not-trusted",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "external",
]
"""The kinds of failure evidence a session can carry; L{classify} maps them to results.

- C{starttls-not-supported}: C{TLS is required, but was not offered by host} / C{refused to
  start TLS} (reason: the refusal reply).
- C{untrusted-issuer}: C{untrusted issuer} or C{self-signed certificate} (reason: X509 name).
- C{not-trusted-by-policy}: C{not trusted by local or TLSA policy}.
- C{certificate-expired}: C{certificate has expired}, or C{num=10:...}.
- C{hostname-mismatch}: C{num=62:hostname mismatch}.
- C{validation-failure}: every other verification error, C{SSL_connect} errors, C{TLS library
  problem}, C{Cannot start TLS: handshake failure} (reason: X509 name, C{num=N:text} or
  OpenSSL's reason).
- C{server-not-verified} / C{server-not-trusted}: the generic delivery reasons
  C{Server certificate not verified} / C{not trusted} (Postfix <= 3.5) with no specific line.
- C{tlsa-invalid}, C{dnssec-invalid}, C{dane-required}: DANE evidence, counted only under a
  C{tlsa} policy.
- C{external}: Postfix 3.10 C{external policy failure (<type>)}; the reason is the type.
"""

FAILURES: frozenset[str] = frozenset(get_args(Failure))

SUCCESS = "success"

"""The eleven RFC 8460 §4.3 result types."""

_DANE_ONLY = frozenset({"tlsa-invalid", "dnssec-invalid", "dane-required"})

HOLD_SECONDS = 10.0
"""How long (in log time) a finished session waits for a Postfix 3.10 C{TLSRPT:} line."""

PROXY_WINDOW = 60.0
"""How long (in log time) a tlsproxy handshake waits for the smtp delivery line naming it."""

IDLE_SECONDS = 3600.0
"""A process silent this long (in log time) is forgotten; its open sessions are dropped."""

_STAMP_CACHE_SIZE = 8192

# --- Lines ----------------------------------------------------------------------------------


class LogLine(NamedTuple):
    """One syslog line split at its process tag C{<syslog_name>/<service>[<pid>]: }.

    A named tuple rather than a frozen dataclass: it is made for every line, and a tuple is
    built several times faster.
    """

    time: float
    """UTC Unix seconds."""
    host: str | None
    """The host column, if the format has one."""
    syslog_name: str
    """C{postfix}, C{postfix-out}, C{postfix/relay}, ...: the tag before its last C{/}."""
    service: str
    """C{smtp}, C{tlsproxy}, C{qmgr}, ...: the tag's last component."""
    pid: int
    message: str
    """Everything after C{<tag>[<pid>]: }."""


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_BSD_RE = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\s+(.*))?\Z", re.S)
_ISO_RE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(Z|z|[+-]\d\d:?\d\d)?(?:\s+(.*))?\Z", re.S
)
_SEVERITIES = frozenset(
    {
        "TRACE",
        "DEBUG",
        "INFO",
        "NOTICE",
        "WARN",
        "WARNING",
        "ERR",
        "ERROR",
        "CRIT",
        "CRITICAL",
        "ALERT",
        "EMERG",
        "FATAL",
        "PANIC",
    }
)


_new_tuple = tuple.__new__
_NO_TLSRPT = (None, None)
_NOT_DIGIT = frozenset(" +-Zz")
"""What follows the six fraction digits of an rsyslog stamp: an offset, Z, or the host."""
_SECONDS = {f"{n:02d}": float(n) for n in range(60)}
"""The seconds of a stamp: reading them and checking them in one look-up."""
_MICROS_HIGH = {f"{n:03d}": n * 1000 for n in range(1000)}
_MICROS_LOW = {f"{n:03d}": n for n in range(1000)}
"""The microseconds of a stamp, three digits at a time, read and checked by look-ups."""


class LineParser:
    """Split syslog lines into L{LogLine}s, caching the time of each distinct stamp.

    @param tz: the zone of stamps that carry none (BSD syslog, postlogd); C{None} means the
        host's local time, as C{[tlsrpt] log_timezone = "local"} does.
    """

    def __init__(self, tz: tzinfo | None) -> None:
        self._tz = tz
        self._now: datetime | None = None
        self._year_rule = (0, 0, False)
        self._cache: dict[str, tuple[float, str | None]] = {}
        self.unreadable = 0
        """Lines with a process tag of a wanted service but an unreadable prefix."""

    def parse(
        self, line: str, now: datetime, services: Container[str] | None = None
    ) -> LogLine | None:
        """Split C{line}; C{None} if it is not a process tag line (or not of C{services}).

        @param now: the current time (aware, or naive local time); BSD stamps take their
            year from it: the current year, or the previous one for a month after now's
            month (read in the log's zone).  A C{Jan  1} stamp read on December 31st is
            taken as the coming year.
        @param services: when given, lines of other services return C{None} before any
            time stamp is read.
        """
        i = line.find("]: ")
        if i < 0:
            return None
        b = line.rfind("[", 0, i)
        if b < 0:
            return None
        pid = line[b + 1 : i]
        if not (pid.isdigit() and pid.isascii()):
            return None
        s = line.rfind(" ", 0, b)
        slash = line.rfind("/", s + 1, b)
        if slash <= s + 1 or slash == b - 1:
            return None
        service = line[slash + 1 : b]
        if services is not None and service not in services:
            return None
        if now is not self._now:
            self._set_now(now)
        hit = self._stamp(line, s)
        if hit is None:
            self.unreadable += 1
            return None
        message = line[i + 3 :]
        if message[-1:] == "\n":
            message = message.rstrip("\r\n")
        # tuple.__new__ directly: the named tuple's own __new__ is a slower Python function.
        return _new_tuple(
            LogLine, (hit[0], hit[1], line[s + 1 : slash], service, int(pid), message)
        )

    def __getstate__(self) -> dict[str, object]:
        """Pickled without the stamp cache, which refills as lines come."""
        return {**self.__dict__, "_cache": {}}

    def _set_now(self, now: datetime) -> None:
        local = now.astimezone(self._tz)
        rule = (local.year, local.month, local.month == 12 and local.day == 31)
        if rule != self._year_rule:
            self._year_rule = rule
            self._cache.clear()
        self._now = now

    def _stamp(self, line: str, s: int) -> tuple[float, str | None] | None:
        """The time and host of C{line[:s]}, the part before the process tag.

        The cache holds minutes: a stamp is looked up without its seconds (and fraction),
        which are then added to the minute's time, so that nearly every line finds its
        minute in the cache, however many distinct stamps a log has.
        """
        # Fast paths for the two common stamps whose minute is cached: the same as the
        # general path below, with its checks of the digits done by the look-ups.
        if s >= 26 and line[19] == "." and line[16] == ":" and line[4] == "-":
            # rsyslog's RFC 3339 with six fraction digits: the minute plus the seconds plus
            # the microseconds / 1e6, which is float(".ffffff") exactly.
            try:
                sec = _SECONDS[line[17:19]]
                micros = _MICROS_HIGH[line[20:23]] + _MICROS_LOW[line[23:26]]
            except KeyError:
                pass
            else:
                if line[26] in _NOT_DIGIT:
                    cached = self._cache.get(line[:17] + line[26:s])
                    if cached is not None:
                        return cached[0] + sec + micros / 1e6, cached[1]
        elif s >= 15 and line[12] == ":" and line[3] == " " and line[4] != "-":
            # BSD syslog: the minute plus the seconds.
            try:
                sec = _SECONDS[line[13:15]]
            except KeyError:
                pass
            else:
                cached = self._cache.get(line[:13] + line[15:s])
                if cached is not None:
                    return cached[0] + sec, cached[1]
        if line[16:17] == ":" and line[4:5] == "-" and s >= 19:
            # RFC 3339: 2026-11-22T06:00:03[.333321][+00:00] host
            minute, end = 17, 19
            if line[19:20] == ".":
                if line[26:27] in _NOT_DIGIT and line[20:26].isdigit() and line[20:26].isascii():
                    end = 26  # rsyslog's six digits, the common case
                else:
                    end = s - len(line[20:s].lstrip("0123456789"))
                    if end == 20:
                        return None
        elif line[12:13] == ":" and line[3:4] == " " and s >= 15:
            minute, end = 13, 15  # BSD syslog, postlogd: Nov 22 06:00:03 host
        else:
            prefix = line[:s] if s > 0 else ""
            return self._cache.get(prefix) or self._remember(prefix, prefix)
        seconds = _SECONDS.get(line[minute : minute + 2])
        if seconds is None:
            return None
        head, rest = line[:minute], line[end:s]
        key = head + rest
        hit = self._cache.get(key) or self._remember(key, head + "00" + rest)
        if hit is None:
            return None
        if end > minute + 2:
            return hit[0] + seconds + float(line[minute + 2 : end]), hit[1]
        return hit[0] + seconds, hit[1]

    def _remember(self, key: str, prefix: str) -> tuple[float, str | None] | None:
        """Read C{prefix} (time stamp and host column) and cache it as C{key}."""
        hit = self._read(prefix.strip())
        if hit is not None:
            if len(self._cache) >= _STAMP_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def _read(self, prefix: str) -> tuple[float, str | None] | None:
        try:
            if prefix[:1].isdigit():
                m = _ISO_RE.match(prefix)
                if m is None:
                    return None
                y, mo, d, h, mi, s, offset, rest = m.groups()
                when = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))
                return _aware(when, offset, self._tz), _host(rest)
            m = _BSD_RE.match(prefix)
            if m is None or m.group(1) not in _MONTHS:
                return None
            name, d, h, mi, s, rest = m.groups()
            month, day = _MONTHS[name], int(d)
            year, now_month, new_year_eve = self._year_rule
            if month > now_month:
                year -= 1
            elif new_year_eve and month == 1 and day == 1:
                year += 1
            when = datetime(year, month, day, int(h), int(mi), int(s))
            return _aware(when, None, self._tz), _host(rest)
        except (ValueError, OverflowError):  # 30 Feb, hour 25, year 0 ...
            return None


def _aware(when: datetime, offset: str | None, tz: tzinfo | None) -> float:
    """Return the Unix time of the wall-clock time C{when} at C{offset}, or in C{tz}.

    In C{tz}, a time in a DST gap or overlap is read with C{fold=0} (the offset in force
    before the change); for Europe/Berlin the hour in question is 00:00-01:00 UTC, so the
    UTC day of a session never changes.
    """
    if offset is None:
        return (when.replace(tzinfo=tz) if tz is not None else when).timestamp()
    if offset in ("Z", "z"):
        return when.replace(tzinfo=UTC).timestamp()
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[-2:])
    zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return when.replace(tzinfo=zone).timestamp()


def _host(rest: str | None) -> str | None:
    """The host column: the first word after the stamp, unless it is a severity word."""
    if not rest:
        return None
    word = rest.split(None, 1)[0]
    return None if word in _SEVERITIES else word


_PARSERS: dict[tzinfo | None, LineParser] = {}


def parse_line(line: str, *, tz: tzinfo | None, now: datetime) -> LogLine | None:
    """Split one syslog line at its process tag; C{None} if it has none or is unreadable.

    A convenience over L{LineParser} (one shared parser, hence one stamp cache, per zone).
    Both stamp families are read: BSD syslog and postlogd (C{Nov  3 08:26:01 host},
    C{Nov 03 ...}) in C{tz} (C{None}: local time) with the year from C{now}, and RFC 3339
    (C{2025-01-26T01:03:02.997382+00:00 host}, C{...+0000}, C{...Z}, and the container form
    with a severity column and no host).  Any syslog name is accepted.
    """
    parser = _PARSERS.get(tz)
    if parser is None:
        if len(_PARSERS) > 16:
            _PARSERS.clear()
        parser = _PARSERS[tz] = LineParser(tz)
    return parser.parse(line, now)


# --- Sessions -------------------------------------------------------------------------------


class Session(NamedTuple):
    """One TLS session (one handshake to one MX address), or a failure with no handshake.

    It carries the evidence L{classify} needs, not a result: the result depends on the policy
    that applied, which the store knows (see the module docstring).  A named tuple, like
    L{LogLine}: a frozen dataclass of eleven fields took longer to build than the rest of the
    work on the line that completes it.
    """

    time: float
    """UTC Unix seconds of the session's first line."""
    domain: str
    """The recipient domain (lower case, A-labels), from C{to=<...@domain>}; a delivery to
    an address literal or another name that is not a domain gives no session."""
    mx_host: str
    """The MX host name (lower case); C{""} if the log never named it."""
    mx_ip: str
    """The MX address as Postfix logs it; C{""} if the log never named it."""
    port: int
    """The MX port; 0 if the log never named it."""
    queue_id: str | None
    trust: Trust | None
    """The handshake summary's trust word; C{None} when no handshake completed."""
    failure: Failure | None = None
    """The most specific failure line of the session, if any."""
    reason: str | None = None
    """The failure-reason-code that goes with C{failure}."""
    tlsrpt_result: str | None = None
    """The result (C{success} or a result type) of a Postfix >= 3.10 C{TLSRPT:} line about
    this session; it decides the session's result.  The line's own domain is not kept: it
    names the TLSRPT policy domain, not necessarily the session's (reference §7.7)."""
    tlsrpt_reason: str | None = None


def classify(session: Session, policy: PolicyKind) -> tuple[str, str | None] | None:
    """Return C{(result, failure_reason_code)} for C{session} under C{policy}, or C{None}.

    C{result} is L{SUCCESS} or one of L{RESULT_TYPES}, following ``reference/tlsrpt.md``
    §7.4 and §10.  C{None} means the session is not counted under this policy: DANE-only
    evidence with no handshake outside a C{tlsa} policy.  A Postfix 3.10 C{TLSRPT:} status
    decides alone, as logged.
    """
    if session.tlsrpt_result is not None:
        return session.tlsrpt_result, session.tlsrpt_reason
    failure, reason = session.failure, session.reason
    tlsa = policy == "tlsa"
    if failure is None or (failure in _DANE_ONLY and not tlsa):
        return _by_trust(session.trust, policy)
    if failure in _DANE_ONLY or failure in ("starttls-not-supported", "validation-failure"):
        return failure, reason
    if failure == "certificate-expired":
        return failure, reason
    if failure in ("untrusted-issuer", "not-trusted-by-policy"):
        return ("tlsa-invalid" if tlsa else "certificate-not-trusted"), reason
    if failure == "hostname-mismatch":
        return ("tlsa-invalid" if tlsa else "certificate-host-mismatch"), reason
    if failure == "server-not-verified":
        if session.trust == "Trusted":
            return ("tlsa-invalid" if tlsa else "certificate-host-mismatch"), None
        if session.trust == "Anonymous":
            return "validation-failure", "no-peer-certificate"
        return "certificate-not-trusted", None
    if failure == "server-not-trusted":
        return "certificate-not-trusted", None
    # external policy failure (<type>)
    kind = (reason or "").replace("_", "-")
    if kind in RESULT_TYPES:
        return kind, None
    return "validation-failure", reason


def _by_trust(trust: Trust | None, policy: PolicyKind) -> tuple[str, str | None] | None:
    """The result of a handshake with no failure line: §7.4 rows 1-2 and §10."""
    if trust is None:
        return None
    if trust == "Verified" or policy == "none":
        return SUCCESS, None
    if policy == "tlsa":
        return "tlsa-invalid", None
    # An MTA-STS policy (testing, or enforce that Postfix did not apply): §10.
    if trust == "Trusted":
        return SUCCESS, None
    if trust == "Untrusted":
        return "certificate-not-trusted", None
    return "validation-failure", "no-peer-certificate"


class _Slotted:
    """Pickled as the tuple of its slots' values, which is smaller and several times faster
    to write than the default (a dict per object): the tracker is pickled with every commit.
    """

    __slots__ = ()
    _values: Callable[[object], tuple[object, ...]]
    """C{attrgetter} of the slots, in order; set by each subclass."""

    def __getstate__(self) -> tuple[object, ...]:
        return self._values(self)

    def __setstate__(self, state: tuple[object, ...]) -> None:
        slots: tuple[str, ...] = self.__slots__
        if len(state) == 2 and isinstance(state[1], dict):  # (None, {slot: value}): the default
            state = tuple(state[1][name] for name in slots)
        for name, value in zip(slots, state, strict=True):
            setattr(self, name, value)


class _Open(_Slotted):
    """A session being assembled from a process's lines."""

    __slots__ = (
        "domain",
        "failure",
        "mx_host",
        "mx_ip",
        "port",
        "queue_id",
        "rank",
        "reason",
        "skip",
        "time",
        "tlsrpt",
        "trust",
    )
    _values = attrgetter(*__slots__)

    def __init__(self, time: float, host: str, ip: str, port: int) -> None:
        self.time = time
        self.mx_host = host
        self.mx_ip = ip
        self.port = port
        self.trust: Trust | None = None
        self.failure: Failure | None = None
        self.reason: str | None = None
        self.rank = -1
        self.queue_id: str | None = None
        self.domain = ""
        self.tlsrpt: tuple[str, str | None] | None = None
        self.skip = False

    def add(self, failure: Failure, reason: str | None, rank: int) -> None:
        """Record a failure line; the most specific one (highest rank, first) decides."""
        if rank > self.rank:
            self.failure, self.reason, self.rank = failure, reason, rank

    def same(self, host: str, ip: str) -> bool:
        """Whether C{host[ip]} names this session's MX (by address when both are known)."""
        if ip and self.mx_ip:
            return ip == self.mx_ip
        return bool(host) and host == self.mx_host

    def fill(self, host: str, ip: str, port: int) -> None:
        """Complete an address missing from the summary (Postfix 2.x) from a later line."""
        if not self.mx_ip and ip:
            self.mx_ip = ip
        if not self.port and port:
            self.port = port
        if not self.mx_host and host:
            self.mx_host = host

    def session(self) -> Session:
        # From the end: a tracker saved by an older version led its tuples with the domain.
        t = self.tlsrpt or _NO_TLSRPT
        return _new_tuple(
            Session,
            (
                self.time,
                self.domain,
                self.mx_host,
                self.mx_ip,
                self.port,
                self.queue_id,
                self.trust,
                self.failure,
                self.reason,
                t[-2],
                t[-1],
            ),
        )


class _Proc(_Slotted):
    """The state of one smtp process (syslog name and pid)."""

    __slots__ = (
        "held",
        "last",
        "last_key",
        "open",
        "pending_dns",
        "pending_lib",
        "reused",
        "waiting",
    )
    _values = attrgetter(*__slots__)

    def __init__(self, last: float) -> None:
        self.open: _Open | None = None
        self.waiting: list[_Open] = []
        """Sessions closed by a C{QID: <reason>} line, waiting for the delivery's C{to=}."""
        self.held: _Open | None = None
        """The last finished session, waiting a moment for a C{TLSRPT:} line."""
        self.last_key: tuple[str, str] | None = None
        """(queue id, relay) of the last delivery line: later recipients add no session."""
        self.reused: str | None = None
        self.pending_lib: str | None = None
        self.pending_dns: str | None = None
        self.last = last


# Message shapes.  An endpoint is "host[addr]:port", "host[addr]" or (Postfix 2.x) "host".
_EP = r"([^\s\[\]:,]+)(?:\[([^\]\s]*)\](?::(\d+))?)?"
_SUMMARY_RE = re.compile(
    r"(Verified|Trusted|Untrusted|Anonymous) TLS connection (established|reused) (to|from) " + _EP
)
_VERIFY_RE = re.compile(r"(?:server |CA )?certificate verification failed for " + _EP + r": (.*)")
_SSL_RE = re.compile(r"SSL_connect error to " + _EP + r": (.*)")
_TLSA_UNUSABLE_RE = re.compile(_EP + r": all TLSA records unusable")
_EP_COLON_RE = re.compile(_EP + r": ")
_ENDPOINT_LINE_RE = re.compile(r"[^\s\[\]:,]+\[[^\]\s]*\](?::\d+)?: ")
_QID_RE = re.compile(r"([0-9A-F]{5,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): ")
_match_qid = _QID_RE.match
_DELIVERY_RE = re.compile(
    # queue id, the recipient's domain (after its last "@"), relay
    _QID_RE.pattern + r"to=<(?:[^>]*@)?([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,\s]*)"
)
_match_delivery = _DELIVERY_RE.match
_HOST_RE = re.compile(r"host " + _EP)
_TLSA_LOOKUP_RE = re.compile(r"TLSA lookup error for ([^\s:\[\]]+):(\d+)")
_BRACKET_IP_RE = re.compile(r"\[([0-9A-Fa-f:.]+)\]")

_TRUSTS = ("Verified ", "Trusted ", "Untrusted ", "Anonymous ")
_TRUST_WORDS: dict[str, Trust] = {
    "Verified": "Verified",
    "Trusted": "Trusted",
    "Untrusted": "Untrusted",
    "Anonymous": "Anonymous",
}
"""The trust word of a summary as a L{Trust} (for the type checker, at the cost of a look-up)."""
_PORTS = {"25": 25, "465": 465, "587": 587}
_HOST_NAMES: dict[str, str] = {}
"""Host names as logged -> as compared: lower case, no trailing dot (a bounded cache)."""


def _host_name(host: str) -> str:
    """C{host} lower-cased without its trailing dot, remembered in L{_HOST_NAMES}."""
    name = host.lower().rstrip(".")
    if len(_HOST_NAMES) >= 4096:
        _HOST_NAMES.clear()
    _HOST_NAMES[host] = name
    return name


_CERT_FAILED = ("certificate verification failed", "server certificate", "CA certificate")
_NOTHING_TO_COUNT = (
    "connect to ",
    "lost connection with ",
    "conversation with ",
    "host ",
    "enabling PIX",
    "disabling PIX",
    "server features",
    "setting up TLS connection",
    "SSL_connect:",
    "SSL_connect error from",
    "Host offered STARTTLS",
    "initializing the client-side TLS engine",
)
_CONFIG = (
    "lookup error for",
    "policy table lookup error",
    "per-site table lookup error",
    "smtp_tls_policy_maps",
    "client TLS configuration problem",
    "socketmap server",
    "TLS is required, but our TLS engine is unavailable",
    "TLS is required, but unavailable",
    "invalid attribute name",
    "has empty value",
)

# How specific a piece of failure evidence is: the highest rank decides, the first on a tie.
_GENERIC = 0  # "Server certificate not verified/trusted" as a delivery reason
_HANDSHAKE = 1  # "Cannot start TLS: handshake failure"
_SSL_CONNECT = 2  # "SSL_connect error to ...: -1"
_OPENSSL = 3  # "warning: TLS library problem: ...": OpenSSL's own reason
_X509 = 4  # a verification error typed only as validation-failure
_SPECIFIC = 5  # a verification error with its own result type, STARTTLS and DANE evidence
_EXTERNAL = 6  # Postfix 3.10 "external policy failure (<type>)"

_SERVICES_ALL = frozenset({"smtp", "tlsproxy", "qmgr"})
_SERVICES_TLS = frozenset({"smtp", "tlsproxy"})

_Evidence = tuple[Failure, str | None, int, str, str, int]
"""(failure, reason, rank, host, ip, port) read from a delivery reason."""


_VERIFY_TEXTS: tuple[tuple[str, Failure, str | None, int], ...] = (
    # Postfix's tls_verify.c wording -> evidence, X509_V_ERR_* reason code, rank (§7.4)
    ("untrusted issuer", "untrusted-issuer", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", _SPECIFIC),
    ("self-signed certificate", "untrusted-issuer", "DEPTH_ZERO_SELF_SIGNED_CERT", _SPECIFIC),
    ("not trusted by local or TLSA policy", "not-trusted-by-policy", "CERT_UNTRUSTED", _SPECIFIC),
    ("certificate has expired", "certificate-expired", None, _SPECIFIC),
    ("certificate not yet valid", "validation-failure", "CERT_NOT_YET_VALID", _X509),
    ("not designated for use as a", "validation-failure", "INVALID_PURPOSE", _X509),
    ("certificate chain longer than limit", "validation-failure", "CERT_CHAIN_TOO_LONG", _X509),
)  # fmt: skip


def _verify_failure(text: str) -> tuple[Failure, str | None, int]:
    """Classify the text after C{certificate verification failed for H[A]:P: }."""
    for prefix, failure, code, rank in _VERIFY_TEXTS:
        if text.startswith(prefix):
            return failure, None if code is None else "X509_V_ERR_" + code, rank
    if text.startswith("external policy failure (") and text.endswith(")"):
        return "external", text[25:-1], _EXTERNAL
    if text.startswith("num="):
        number = text[4:].split(":", 1)[0]
        if number == "62":
            return "hostname-mismatch", "X509_V_ERR_HOSTNAME_MISMATCH", _SPECIFIC
        if number == "10":
            return "certificate-expired", text, _SPECIFIC
    return "validation-failure", text, _X509


def _openssl_reason(text: str) -> str:
    """OpenSSL's reason from C{error:0A00010B:SSL routines::wrong version number:...}."""
    parts = text.split(":")
    if len(parts) > 4 and parts[0] == "error" and parts[4]:
        return parts[4]
    return text


def _endpoint(m: re.Match[str], first: int) -> tuple[str, str, int]:
    """(host, ip, port) from the three groups of an C{_EP} starting at group C{first}."""
    host, ip, port = m.group(first, first + 1, first + 2)
    return host.lower().rstrip("."), ip or "", int(port) if port else 0


def _is_pid(text: str) -> bool:
    """Whether C{text} is a process id: ASCII digits."""
    return text.isdigit() and text.isascii()


def _relay(relay: str) -> tuple[str, str, int] | None:
    """Parse a C{relay=} value; C{None} for a UNIX socket or a name without an address."""
    b = relay.find("[")
    e = relay.rfind("]")
    if b <= 0 or e < b:
        return None
    port = relay[e + 2 :] if relay[e + 1 : e + 2] == ":" else ""
    return relay[:b].lower().rstrip("."), relay[b + 1 : e], int(port) if port.isdigit() else 0


_RELAYS: dict[str, tuple[str, str, int, bool]] = {}
_NOT_MX = ("", "", 0, True)


def _read_relay(relay: str) -> tuple[str, str, int, bool]:
    """C{(host, ip, port, local)} of a C{relay=} value, where local means no MX session of
    its own (§7.5): C{relay=none}, a UNIX socket, a loopback hop.  Cached: the same relays
    come back with the deliveries to them."""
    parsed = _relay(relay)
    hit = _NOT_MX if parsed is None else (*parsed, _is_local(parsed[1]))
    if len(_RELAYS) >= 4096:
        _RELAYS.clear()
    _RELAYS[relay] = hit
    return hit


_LOOPBACK_PREFIXES = ("127.", "::ffff:127.")
_LOOPBACK_IPS = frozenset({"::1", "0:0:0:0:0:0:0:1"})


def _is_local(ip: str) -> bool:
    """Whether C{ip} is loopback or a UNIX socket path (content filters, LMTP)."""
    return "/" in ip or ip.startswith(_LOOPBACK_PREFIXES) or ip in _LOOPBACK_IPS


_DOMAINS: dict[str, str] = {}
"""Recipient domains as logged -> as counted (a bounded cache of L{_domain})."""


def _domain(address: str) -> str:
    """The recipient domain of C{address}: lower-cased, A-labels, no trailing dot; C{""} when
    it is no policy domain (an address literal, a single label, a name IDNA refuses), which
    no report could name.

    Remembered in L{_DOMAINS} under C{address}, which is the domain alone when called so.
    """
    domain = address.rpartition("@")[2].rstrip(".")
    if domain.isascii():
        name = domain.lower()
    else:
        try:
            name = idna.encode(domain, uts46=True).decode("ascii")
        except (UnicodeError, ValueError):  # idna.IDNAError and the like
            name = ""
    if not is_domain_name(name):
        name = ""
    if len(_DOMAINS) >= 4096:
        _DOMAINS.clear()
    _DOMAINS[address] = name
    return name


_EVIDENCE_PREFIXES = (
    "TLS is required, but ",
    "Server certificate not ",
    "Cannot start TLS: handshake failure",
    "TLSA ",
    "no TLSA records found",
    "non DNSSEC destination",
    "client TLS configuration problem",
)
"""Every reason L{_reason_evidence} reads starts with one of these."""


def _reason_evidence(reason: str, pending_dns: str | None) -> _Evidence | Literal["config"] | None:
    """The TLS evidence in a delivery reason; C{"config"} for a local problem."""
    if not reason.startswith(_EVIDENCE_PREFIXES):
        return None  # the common case: one test instead of one per prefix
    if reason.startswith("TLS is required, but "):
        if reason.startswith(("TLS is required, but our", "TLS is required, but unavailable")):
            return "config"
        m = _HOST_RE.search(reason)
        host, ip, port = _endpoint(m, 1) if m else ("", "", 0)
        refused = reason.find(" refused to start TLS: ")
        why = reason[refused + 23 :] if refused >= 0 else None
        return "starttls-not-supported", why, _SPECIFIC, host, ip, port
    if reason.startswith("Server certificate not verified"):
        return "server-not-verified", None, _GENERIC, "", "", 0
    if reason.startswith("Server certificate not trusted"):
        return "server-not-trusted", None, _GENERIC, "", "", 0
    if reason.startswith("Cannot start TLS: handshake failure"):
        return "validation-failure", "handshake failure", _HANDSHAKE, "", "", 0
    if reason.startswith("TLSA lookup error for "):
        m = _TLSA_LOOKUP_RE.match(reason)
        host, port = (m.group(1).lower(), int(m.group(2))) if m else ("", 0)
        return "dnssec-invalid", pending_dns, _SPECIFIC, host, "", port
    if reason.startswith(("no TLSA records found", "non DNSSEC destination")):
        return "dane-required", None, _SPECIFIC, "", "", 0
    if reason.startswith("TLSA records unusable"):
        return "tlsa-invalid", None, _SPECIFIC, "", "", 0
    if reason.startswith("client TLS configuration problem"):
        return "config"
    return None


def _status_reason(text: str, start: int = 0) -> str:
    """The parenthesised reason after C{status=...} in C{text[start:]}, a delivery line's tail."""
    s = text.find(" status=", start)
    if s < 0:
        return ""
    p = text.find(" (", s + 8)
    if p < 0:
        return ""
    return text[p + 2 : -1] if text[-1:] == ")" else text[p + 2 :]


class SessionTracker:
    """Turn Postfix log lines into L{Session}s: one state machine per smtp process (§7.3).

    Feed lines in log order with L{feed_text} (or L{feed} for lines already parsed); each
    call returns the sessions it completed.  Call L{flush} at the end of the input.

    A session is complete when its delivery line (C{QID: to=<...>, relay=...}) names its
    recipient domain.  The last session of a delivery is then held back until the process
    logs its next line, C{HOLD_SECONDS} of log time pass, or L{flush}, because a Postfix
    3.10 C{TLSRPT:} status about it may follow the delivery line.

    @param report_sender: the envelope sender of report mail (L{report_sender}).
    @param tz: the zone of log stamps that carry none (C{None}: local time).
    """

    skip_mark = 0
    """Where the caller last read the queue ids it adds to L{skip_queue_ids} (for the
    reporter, the store's C{report_mail} row); it is saved with them, in the pickled tracker.
    """

    def __init__(self, *, report_sender: str = "", tz: tzinfo | None = None) -> None:
        self._sender = report_sender.lower()
        self._parser = LineParser(tz)
        self.skip_queue_ids: set[str] = set()
        """Queue ids of report mail, whose sessions are never emitted; each is forgotten
        when qmgr logs it C{removed}."""
        self.config_problems = 0
        """Local configuration and policy-lookup problems seen (§7.5)."""
        self._unparsed = 0
        self._ignored = 0
        self._skipped = 0
        self._procs: dict[tuple[str, int], _Proc] = {}
        self._tags: dict[str, _Proc] = {}
        """The processes of C{_procs} by the text of their tags, for L{feed_lines}; not
        pickled, and emptied whenever processes are forgotten."""
        self._held: deque[tuple[float, _Proc, _Open]] = deque()
        self._proxy: dict[str, list[_Open]] = {}
        self._proxy_order: deque[tuple[float, str, _Open]] = deque()
        self._next_sweep = 0.0

    def __getstate__(self) -> dict[str, object]:
        """Pickled without the processes by tag text, which refill as lines come."""
        state = self.__dict__.copy()
        state.pop("_tags", None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._tags = {}

    @property
    def report_sender(self) -> str:
        """The envelope sender of report mail (lower case): queue ids whose qmgr line shows
        C{from=<it>} are added to L{skip_queue_ids} (§6)."""
        return self._sender

    @report_sender.setter
    def report_sender(self, sender: str) -> None:
        self._sender = sender.lower()

    @property
    def unparsed(self) -> int:
        """Lines of smtp or tlsproxy that fit no known shape, and sessions left incomplete."""
        return self._unparsed + self._parser.unreadable

    @property
    def ignored(self) -> int:
        """Lines that are not ours or carry nothing to count."""
        return self._ignored + self._skipped - self._parser.unreadable

    def feed_text(self, line: str, now: datetime) -> list[Session]:
        """Parse and feed one raw log line; lines of other services cost little.

        @param now: the current time, for the year of BSD stamps (see L{LineParser.parse}).
        """
        return self.feed_lines((line,), now)

    def feed_lines(self, lines: Iterable[str], now: datetime) -> list[Session]:
        """Feed many raw lines; return the sessions they completed.

        Most lines of a mail log belong to other services: a line without C{/smtp[},
        C{/tlsproxy[} (or C{/qmgr[} while report mail is watched for) cannot carry one of
        their process tags, and is skipped before it is parsed, and so is a qmgr line that
        names no report mail.  An smtp line is split here, without a L{LogLine}; any other
        goes through L{LineParser.parse}, with the same result.
        """
        out: list[Session] = []
        parser = self._parser
        parse = parser.parse
        if now is not parser._now:
            parser._set_now(now)
        stamp = parser._stamp
        held = self._held
        smtp = self._smtp
        tags = self._tags
        qmgr = bool(self._sender or self.skip_queue_ids)
        services = _SERVICES_ALL if qmgr else _SERVICES_TLS
        skipped = 0
        for line in lines:
            # "in" before find: most lines have no "/smtp[", and "in" is the cheaper test.
            if "/smtp[" not in line:
                if "/tlsproxy[" not in line and not (
                    qmgr and "/qmgr[" in line and self._may_be_report_mail(line)
                ):
                    skipped += 1
                    continue
            else:
                # The fast path: the same steps as LineParser.parse, knowing where the tag is.
                k = line.find("/smtp[")
                # The tag's text (C{postfix/smtp[123}) names its process: a text seen before
                # was checked then, and finds its process in C{tags} (C{self._procs[key]}).
                i = line.find("]: ")
                s = line.rfind(" ", 0, k)
                tag = line[s + 1 : i]
                proc = tags.get(tag)
                if proc is not None or (i > k + 6 and s + 1 < k and _is_pid(line[k + 6 : i])):
                    hit = stamp(line, s)
                    if hit is not None:
                        t = hit[0]
                        mark = len(out)
                        if held and held[0][0] < t - HOLD_SECONDS:
                            self._release_held(t, out)
                        if t >= self._next_sweep:
                            self._sweep(t, out)
                            proc = tags.get(tag)  # unless the sweep forgot it
                        if proc is None:
                            proc = tags[tag] = self._proc(
                                (line[s + 1 : k], int(line[k + 6 : i])), t
                            )
                        else:
                            proc.last = t
                        message = line[i + 3 :]
                        if line[-1] == "\n":
                            message = message.rstrip("\r\n")
                        smtp(t, proc, message, out, mark)
                        continue
            parsed = parse(line, now, services)
            if parsed is None:
                skipped += 1
            elif self._feed(parsed, out):
                # A qmgr line changes which lines can matter.
                qmgr = bool(self._sender or self.skip_queue_ids)
                services = _SERVICES_ALL if qmgr else _SERVICES_TLS
        self._skipped += skipped
        return out

    def line_time(self, line: str, now: datetime) -> float | None:
        """The UTC Unix time of a raw line of any service, C{None} if it has no process tag
        or no readable stamp; the line is not fed, and not counted anywhere.

        @param now: as for L{feed_text}.
        """
        parser = self._parser
        unreadable = parser.unreadable
        parsed = parser.parse(line, now)
        parser.unreadable = unreadable
        return None if parsed is None else parsed[0]

    def feed(self, line: LogLine) -> list[Session]:
        """Feed one parsed line; return the sessions it completed."""
        out: list[Session] = []
        self._feed(line, out)
        return out

    def _feed(self, line: LogLine, out: list[Session]) -> bool:
        """Feed C{line}, adding the sessions it completes to C{out}; True for a qmgr line."""
        t = line[0]
        mark = len(out)
        if self._held and self._held[0][0] < t - HOLD_SECONDS:
            self._release_held(t, out)
        if t >= self._next_sweep:
            self._sweep(t, out)
        service = line[3]
        if service == "smtp":
            self._smtp(t, self._proc((line[2], line[4]), t), line[5], out, mark)
        elif service == "qmgr":
            self._qmgr(line[5])
            return True
        elif service == "tlsproxy":
            self._tlsproxy(line)
        else:
            self._ignored += 1
        return False

    def release(self) -> list[Session]:
        """Emit every held session now, and keep the open ones for more input.

        For a pause in the input that may not be its end (``tail --once`` on a log that
        grows): a session whose delivery line is still to come is not lost.
        """
        out: list[Session] = []
        for proc in self._procs.values():
            self._release(proc, out)
        self._held.clear()
        return out

    def flush(self) -> list[Session]:
        """End of input: emit every held session; open ones, lacking a domain, are dropped."""
        out: list[Session] = []
        for proc in self._procs.values():
            self._release(proc, out)
            self._unparsed += len(proc.waiting) + (proc.open is not None)
        self._procs.clear()
        self._tags.clear()
        self._held.clear()
        self._proxy.clear()
        self._proxy_order.clear()
        return out

    # --- qmgr: report mail (§6) -------------------------------------------------------------

    def _may_be_report_mail(self, line: str) -> bool:
        """Whether a raw qmgr line may be about report mail: C{from=<sender>}, or C{removed}
        while queue ids are skipped.  The others, most qmgr lines, are skipped unparsed."""
        if self.skip_queue_ids and ": removed" in line:
            return True
        sender = self._sender
        if not sender:
            return False
        f = line.find("from=<")
        if f <= 0:
            return False
        text = line[f + 6 : f + 7 + len(sender)]
        # text.lower() == sender + ">" only if text ends with ">": no other character
        # lower-cases to one that ends with ">".  That test first, as most senders differ.
        return text[-1:] == ">" and text.lower() == sender + ">"

    def _qmgr(self, m: str) -> None:
        c = m.find(": ")
        if c > 0 and self._sender and m.startswith("from=<", c + 2):
            end = m.find(">", c + 8)
            if end > 0 and m[c + 8 : end].lower() == self._sender:
                self.skip_queue_ids.add(m[:c])
                return
        elif m.endswith(": removed") and self.skip_queue_ids:
            self.skip_queue_ids.discard(m[:c])
            return
        self._ignored += 1

    # --- smtp ---------------------------------------------------------------------------------

    def _proc(self, key: tuple[str, int], t: float) -> _Proc:
        """The smtp process C{key} (syslog name, pid), which logged a line at C{t}."""
        proc = self._procs.get(key)
        if proc is None:
            proc = self._procs[key] = _Proc(t)
        else:
            proc.last = t
        return proc

    def _smtp(self, t: float, proc: _Proc, m: str, out: list[Session], mark: int) -> None:
        """The message C{m} of the smtp process C{proc}, logged at C{t};
        C{out[mark:]} holds the sessions the line completed so far."""
        if m.startswith(_TRUSTS):  # the commonest lines, with the deliveries
            summary = _SUMMARY_RE.match(m)
            if summary is not None:
                # All groups at once: trust, established/reused, to/from, host, ip, port.
                trust, kind, direction, host, ip, port = summary.groups()
                if direction == "to":
                    # _endpoint(summary, 4), with host names and ports read before looked up
                    endpoint = (
                        _HOST_NAMES.get(host) or _host_name(host),
                        ip or "",
                        _PORTS.get(port) or (int(port) if port else 0),
                    )
                    if kind == "reused":
                        self._reused(proc, endpoint[0], endpoint[1])
                    else:
                        self._summary(proc, _TRUST_WORDS[trust], endpoint, t, out)
                    return
            self._unparsed += 1
            return
        delivery = _match_delivery(m)
        if delivery is not None:
            self._delivery(proc, delivery, t, out, mark)
            return
        q = _match_qid(m)
        if q is not None:
            end = q.end()
            if m.startswith("to=<", end):
                self._unparsed += 1  # a delivery line of no known shape
            else:
                self._attempt(proc, q[1], m[end:], t, out)
            return
        if m.startswith(_CERT_FAILED):
            verify = _VERIFY_RE.match(m)
            if verify is None:
                self._unparsed += 1
                return
            self._evidence(proc, _endpoint(verify, 1), _verify_failure(verify.group(4)), t, out)
            return
        if m.startswith("SSL_connect error to "):
            ssl = _SSL_RE.match(m)
            if ssl is None:
                self._unparsed += 1
                return
            reason, proc.pending_lib = proc.pending_lib, None
            if reason is None:
                reason, rank = ssl.group(4), _SSL_CONNECT
            else:
                rank = _OPENSSL
            found: tuple[Failure, str | None, int] = ("validation-failure", reason, rank)
            self._evidence(proc, _endpoint(ssl, 1), found, t, out)
            return
        if m.startswith("TLSRPT: "):
            self._tlsrpt(proc, m, out)
            return
        if m.startswith("warning: "):
            self._warning(proc, m[9:], t, out)
            return
        if m.startswith(_NOTHING_TO_COUNT) or _ENDPOINT_LINE_RE.match(m):
            self._ignored += 1
            return
        if any(c in m for c in _CONFIG):
            self.config_problems += 1
            return
        self._unparsed += 1

    def _warning(self, proc: _Proc, w: str, t: float, out: list[Session]) -> None:
        if w.startswith("TLS library problem: "):
            reason = _openssl_reason(w[21:])
            o = proc.open
            if o is not None and o.trust is None:
                o.add("validation-failure", reason, _OPENSSL)
            else:
                proc.pending_lib = reason
            return
        if w.startswith("DANE TLSA lookup problem: "):
            proc.pending_dns = w[26:]
            return
        if "all TLSA records unusable" in w:
            m = _TLSA_UNUSABLE_RE.match(w)
            if m is not None:
                found: tuple[Failure, str, int] = (
                    "tlsa-invalid",
                    "all-TLSA-records-unusable",
                    _SPECIFIC,
                )
                self._evidence(proc, _endpoint(m, 1), found, t, out)
                return
        if any(c in w for c in _CONFIG):
            self.config_problems += 1
            return
        self._ignored += 1

    def _reused(self, proc: _Proc, host: str, ip: str) -> None:
        """C{<trust> TLS connection reused to H[A]:P}: no new handshake (§7.5), and the
        delivery over it adds no session."""
        o = proc.open
        if o is not None and not o.same(host, ip):
            self._interrupt(proc)
        proc.reused = ip or host
        self._ignored += 1

    def _summary(
        self,
        proc: _Proc,
        trust: Trust,
        endpoint: tuple[str, str, int],
        t: float,
        out: list[Session],
    ) -> None:
        """C{<trust> TLS connection established to H[A]:P}: a handshake."""
        host, ip, port = endpoint
        o = proc.open
        if proc.held is not None:
            self._release(proc, out)
        proc.pending_lib = None
        if o is not None and o.trust is None and o.same(host, ip):
            o.trust = trust
            o.fill(host, ip, port)
            return
        if o is not None:
            self._interrupt(proc)
        o = proc.open = _Open(t, host, ip, port)
        o.trust = trust

    def _evidence(
        self,
        proc: _Proc,
        endpoint: tuple[str, str, int],
        found: tuple[Failure, str | None, int],
        t: float,
        out: list[Session],
    ) -> None:
        """A failure line naming C{H[A]:P}: before (or instead of) a handshake summary."""
        self._release(proc, out)
        host, ip, port = endpoint
        failure, reason, rank = found
        o = proc.open
        if o is None or o.trust is not None or not o.same(host, ip):
            if o is not None:
                self._interrupt(proc)
            o = proc.open = _Open(t, host, ip, port)
        o.add(failure, reason, rank)

    def _interrupt(self, proc: _Proc) -> None:
        """A new session began before the open one was closed: it waits for a domain."""
        if proc.open is not None:
            proc.waiting.append(proc.open)
            proc.open = None

    def _attempt(self, proc: _Proc, qid: str, reason: str, t: float, out: list[Session]) -> None:
        """C{QID: <reason>}: one MX of the delivery failed, the next may follow (§7.3)."""
        if reason.startswith(("enabling PIX", "disabling PIX")):
            self._ignored += 1
            return
        ev = _reason_evidence(reason, proc.pending_dns)
        proc.pending_dns = proc.pending_lib = None
        if ev == "config":
            self.config_problems += 1
            return
        self._release(proc, out)
        o = proc.open
        if o is not None:
            proc.open = None
        elif isinstance(ev, tuple):
            ip = _BRACKET_IP_RE.search(reason)
            o = self._from_proxy(ip.group(1), t) if ip else None
        if o is not None:
            if isinstance(ev, tuple):
                o.add(ev[0], ev[1], ev[2])
        elif isinstance(ev, tuple) and (ev[3] or ev[4]):
            o = _Open(t, ev[3], ev[4], ev[5])
            o.add(ev[0], ev[1], ev[2])
        else:
            self._ignored += 1
            return
        o.queue_id = qid
        proc.waiting.append(o)

    def _delivery(
        self, proc: _Proc, m: re.Match[str], t: float, out: list[Session], mark: int
    ) -> None:
        """C{QID: to=<rcpt>, relay=H[A]:P, ..., status=S (reason)}: the delivery's end."""
        qid, recipient_domain, relay_text = m.groups()
        key = (qid, relay_text)
        if key == proc.last_key and proc.open is None:
            self._ignored += 1  # another recipient of the same session
            return
        proc.last_key = key
        if proc.held is not None:
            self._release(proc, out)
        domain = _DOMAINS.get(recipient_domain)
        if domain is None:
            domain = _domain(recipient_domain)
        # _reason_evidence(_status_reason(text, end)), called only for the reasons it reads
        text = m.string
        status = text.find(" status=", m.end())
        p = text.find(" (", status + 8) if status >= 0 else -1
        if p >= 0 and text.startswith(_EVIDENCE_PREFIXES, p + 2):
            ev = _reason_evidence(_status_reason(text, m.end()), proc.pending_dns)
        else:
            ev = None
        proc.pending_dns = proc.pending_lib = None
        if ev == "config":
            self.config_problems += 1
            ev = None
        evidence = ev if isinstance(ev, tuple) else None
        host, ip, port, local = _RELAYS.get(relay_text) or _read_relay(relay_text)
        session: _Open | None = None
        o, proc.open = proc.open, None
        if local:
            # relay=none, a UNIX socket or a loopback hop: no MX session of its own (§7.5).
            if relay_text == "none":
                if evidence is not None and evidence[0] in _DANE_ONLY:
                    session = _Open(t, evidence[3], evidence[4], evidence[5])
                    session.add(evidence[0], evidence[1], evidence[2])
                if o is not None:
                    proc.waiting.append(o)  # an earlier MX of this delivery
            # Otherwise the open session, if any, was with that local hop: dropped.
        elif o is not None and o.same(host, ip):
            o.fill(host, ip, port)
            if evidence is not None:
                o.add(evidence[0], evidence[1], evidence[2])
            session = o
        else:
            if o is not None:
                proc.waiting.append(o)
            if proc.reused is not None and proc.reused in (ip, host):
                proc.reused = None
            elif not any(w.queue_id == qid and w.same(host, ip) for w in proc.waiting):
                session = self._from_proxy(ip, t)
                if session is None and evidence is not None:
                    session = _Open(t, host, ip, port)
                if session is not None:
                    session.fill(host, ip, port)
                    if evidence is not None:
                        session.add(evidence[0], evidence[1], evidence[2])
        for w in proc.waiting:
            if w.queue_id in (qid, None):
                w.queue_id = qid
                w.domain = domain
                self._finish(w, out)
            else:
                self._unparsed += 1
        proc.waiting.clear()
        if session is None:
            if len(out) == mark:
                self._ignored += 1
            return
        session.queue_id = qid
        session.domain = domain
        if not domain:
            self._ignored += 1  # no policy domain: nothing to report
            session.skip = True
        elif session.queue_id in self.skip_queue_ids:
            session.skip = True
        proc.held = session
        self._held.append((t, proc, session))

    def _finish(self, o: _Open, out: list[Session]) -> None:
        if o.skip or not o.domain or o.queue_id in self.skip_queue_ids or _is_local(o.mx_ip):
            return
        out.append(o.session())

    def _release(self, proc: _Proc, out: list[Session]) -> None:
        o = proc.held
        if o is not None:
            proc.held = None
            if not o.skip and not _is_local(o.mx_ip):
                out.append(o.session())

    def _release_held(self, t: float, out: list[Session]) -> None:
        limit = t - HOLD_SECONDS
        held = self._held
        while held and held[0][0] < limit:
            _, proc, o = held.popleft()
            if proc.held is o:
                self._release(proc, out)

    def _tlsrpt(self, proc: _Proc, m: str, out: list[Session]) -> None:
        """C{TLSRPT: status=..., domain=D, receiving_mx=H[A][, failure_type=T[, ...]]}."""
        text = m[8:]
        reason: str | None = None
        r = text.find(", failure_reason=")
        if r >= 0:
            text, reason = text[:r], text[r + 17 :]
        fields = dict(part.partition("=")[::2] for part in text.split(", "))
        status = fields.get("status")
        if status == "success":
            result, reason = SUCCESS, None
        elif status == "failure":
            result = fields.get("failure_type", "").replace("_", "-")
        else:
            result = ""
        if result != SUCCESS and result not in RESULT_TYPES:
            self._unparsed += 1
            return
        ep = _EP_COLON_RE.match(fields.get("receiving_mx", "") + ": ")
        host, ip, _ = _endpoint(ep, 1) if ep else ("", "", 0)
        candidates = [o for o in (proc.open, *reversed(proc.waiting), proc.held) if o is not None]
        if not candidates:
            self._ignored += 1
            return
        target = next((o for o in candidates if o.same(host, ip)), candidates[0])
        target.tlsrpt = (result, reason)
        if target is proc.held:
            self._release(proc, out)

    # --- tlsproxy (§7.6) ------------------------------------------------------------------

    def _tlsproxy(self, line: LogLine) -> None:
        m = line.message
        t = line.time
        if m.startswith(_TRUSTS):
            summary = _SUMMARY_RE.match(m)
            if summary is None or summary.group(3) != "to" or summary.group(2) == "reused":
                self._ignored += 1
                return
            host, ip, port = _endpoint(summary, 4)
            o = self._proxy_open(host, ip, port, t)
            o.trust = cast(Trust, summary.group(1))
            return
        verify = _VERIFY_RE.match(m) if m.startswith(_CERT_FAILED) else None
        if verify is not None:
            host, ip, port = _endpoint(verify, 1)
            self._proxy_open(host, ip, port, t).add(*_verify_failure(verify.group(4)))
            return
        ssl = _SSL_RE.match(m) if m.startswith("SSL_connect error to ") else None
        if ssl is not None:
            host, ip, port = _endpoint(ssl, 1)
            self._proxy_open(host, ip, port, t).add(
                "validation-failure", ssl.group(4), _SSL_CONNECT
            )
            return
        self._ignored += 1

    def _proxy_open(self, host: str, ip: str, port: int, t: float) -> _Open:
        """The tlsproxy handshake in progress with C{host[ip]}, or a new one."""
        key = ip or host
        entries = self._proxy.setdefault(key, [])
        if entries and entries[-1].trust is None:
            return entries[-1]
        o = _Open(t, host, ip, port)
        entries.append(o)
        self._proxy_order.append((t, key, o))
        return o

    def _from_proxy(self, key: str, t: float) -> _Open | None:
        """Pair a delivery to C{key} with the oldest recent tlsproxy handshake to it."""
        if not self._proxy:
            return None
        entries = self._proxy.get(key)
        while entries:
            o = entries.pop(0)
            if not entries:
                del self._proxy[key]
            if o.time >= t - PROXY_WINDOW:
                return o
        return None

    # --- housekeeping -----------------------------------------------------------------------

    def _sweep(self, t: float, out: list[Session]) -> None:
        """Forget silent processes and stale tlsproxy handshakes (every few minutes)."""
        self._next_sweep = t + 300.0
        stale = [k for k, p in self._procs.items() if p.last < t - IDLE_SECONDS]
        if stale:
            self._tags.clear()
        for k in stale:
            proc = self._procs.pop(k)
            self._release(proc, out)
            self._unparsed += len(proc.waiting) + (proc.open is not None)
        order = self._proxy_order
        while order and order[0][0] < t - PROXY_WINDOW:
            _, key, o = order.popleft()
            entries = self._proxy.get(key)
            if entries and o in entries:
                entries.remove(o)
                if not entries:
                    del self._proxy[key]
