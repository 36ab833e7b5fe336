"""``postfix-mtasts show``: read the TLS-RPT reports a domain received and summarise them.

Inputs (L{collect}): report files (C{.json}, C{.json.gz}; recognised by content, not by name),
whole mail messages (C{.eml}: the report is taken from any part that is
C{application/tlsrpt+gzip} or C{+json}, C{application/gzip} or C{application/json}, or carries
a C{.json}/C{.gz} file name, however deeply nested), mbox files and Maildirs of such messages,
and directories of any of these (searched recursively, hidden entries and links to
directories skipped).

Each report is checked just enough to be summarised (L{parse_report}): the required fields, their
types and integer counts. Anything that cannot be read is listed with its source and the
reason, and skipped. A report seen again (same C{organization-name} and C{report-id}, e.g. in
an mbox and as a saved attachment) is counted once.

Outputs: L{summarise} builds one JSON-ready object (its shape is documented there and is what
C{--json} prints); L{render_text} writes it as tables for an 80-column terminal;
L{postfix_mtasts.tlsrpt.showhtml.render_html} as one self-contained page.

Exit status of L{main}: 0 when at least one report was read and nothing was skipped; 1 when an
input was skipped or no report was found; 2 when a path does not exist or the C{--html} file
cannot be written (usage errors: nothing is printed but the one-line message).
"""

from __future__ import annotations

import datetime
import email
import email.errors
import email.message
import gzip
import io
import json
import mailbox
import os
import re
import sys
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from postfix_mtasts.tlsrpt.showhtml import render_html

__all__ = [
    "FORMAT",
    "MAX_COUNT",
    "MAX_REPORT_BYTES",
    "Collection",
    "Duplicate",
    "Failure",
    "PolicyResult",
    "Report",
    "ReportError",
    "Skipped",
    "collect",
    "decode_report",
    "main",
    "parse_report",
    "printable",
    "render_json",
    "render_text",
    "reports_in_message",
    "summarise",
]

FORMAT = "postfix-mtasts-show/1"
"""The C{format} member of L{summarise}'s object; changes when its shape changes."""

MAX_REPORT_BYTES = 64 * 1024 * 1024
"""The largest report accepted, uncompressed (a guard against gzip bombs)."""
MAX_COUNT = 2**53
"""The largest session count accepted (the largest integer every JSON reader holds exactly)."""

_GZIP_MAGIC = b"\x1f\x8b"
_REPORT_MEDIA = frozenset({"application/tlsrpt+gzip", "application/tlsrpt+json"})
_LOOSE_MEDIA = frozenset({"application/gzip", "application/x-gzip", "application/json"})
_REPORT_NAME = re.compile(r"\.(json|json\.gz|gz|gzip)$", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")
"""The start of a mail header field (RFC 5322 §2.2): how a message file is recognised."""
_MIDNIGHT = datetime.time(0, 0)
_WIDTH = 80


class ReportError(ValueError):
    """A report that cannot be summarised; the message says why."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One C{failure-details} entry, reduced to what the summary uses."""

    result_type: str
    count: int
    mx_host: str | None = None
    receiving_ip: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One C{policies[]} element: the sessions under one policy of one policy domain."""

    policy_type: str
    policy_domain: str
    """The policy domain; C{""} when a C{no-policy-found} element omits it (as sys4 does)."""
    successful: int
    failed: int
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    """A received report, checked and reduced to what the summary uses."""

    source: str
    """Where it was read: a path, with the message number for an mbox."""
    organization: str
    report_id: str
    start: datetime.datetime
    """C{start-datetime} in UTC."""
    end: datetime.datetime
    """C{end-datetime} in UTC."""
    policies: tuple[PolicyResult, ...]

    @property
    def day(self) -> datetime.date:
        """The UTC day the report is counted under: its start's."""
        return self.start.date()

    @property
    def last_day(self) -> datetime.date:
        """The last UTC day covered (an end at midnight belongs to the day before)."""
        if self.end > self.start and self.end.time() == _MIDNIGHT:
            return self.end.date() - datetime.timedelta(days=1)
        return self.end.date()


@dataclass(frozen=True, slots=True)
class Skipped:
    """An input that held no readable report: where, and why."""

    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A report seen again and not counted a second time."""

    source: str
    organization: str
    report_id: str
    first_source: str


@dataclass(slots=True)
class Collection:
    """Everything read from the inputs, in reading order."""

    reports: list[Report] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)


# --- One report (pure) ----------------------------------------------------------------------


def _member(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise ReportError(f"{path}: missing {key}")
    return obj[key]


def _text(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = _member(obj, key, path)
    if not isinstance(value, str):
        raise ReportError(f"{path}.{key}: not a string ({_short(value)})")
    _check_unicode(value, key, path)
    if not value.strip():
        raise ReportError(f"{path}.{key}: empty")
    return value.strip()


def _optional_text(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    """Return an optional string member; absent, C{null} or blank give C{None}."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ReportError(f"{path}.{key}: not a string ({_short(value)})")
    _check_unicode(value, key, path)
    return value.strip() or None


def _check_unicode(value: str, key: str, path: str) -> None:
    """Refuse a lone surrogate: JSON lets C{"\\ud800"} through, but no UTF-8 output holds it."""
    if _SURROGATE.search(value):
        raise ReportError(f"{path}.{key}: not Unicode text (a lone surrogate)")


def _count(obj: Mapping[str, Any], key: str, path: str) -> int:
    value = _member(obj, key, path)
    if type(value) is not int:
        raise ReportError(f"{path}.{key}: not an integer ({_short(value)})")
    if value < 0:
        raise ReportError(f"{path}.{key}: negative ({value})")
    if value > MAX_COUNT:
        raise ReportError(f"{path}.{key}: over {MAX_COUNT} ({_short(value)})")
    return value


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{path}: not an object ({_short(value)})")
    return value


def _short(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False) if _is_json(value) else type(value).__name__
    except ValueError:  # an integer of more digits than Python converts to text
        text = type(value).__name__
    text = _utf8(text)
    return text if len(text) <= 40 else text[:39] + "…"


def _utf8(text: str) -> str:
    """C{text} with each lone surrogate (e.g. from bytes that are not UTF-8) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_json(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _datetime(obj: Mapping[str, Any], key: str, path: str) -> datetime.datetime:
    text = _text(obj, key, path)
    try:
        when = datetime.datetime.fromisoformat(text.upper())
    except ValueError:
        raise ReportError(f"{path}.{key}: not an RFC 3339 date-time ({_short(text)})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        return when.astimezone(datetime.UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ReportError(f"{path}.{key}: out of range in UTC ({_short(text)})") from None


def _failure(value: object, path: str) -> Failure:
    entry = _object(value, path)
    host = _optional_text(entry, "receiving-mx-hostname", path)
    return Failure(
        result_type=_text(entry, "result-type", path),
        count=_count(entry, "failed-session-count", path),
        mx_host=host.lower().removesuffix(".") if host else None,
        receiving_ip=_optional_text(entry, "receiving-ip", path),
    )


def _policy(value: object, path: str) -> PolicyResult:
    element = _object(value, path)
    policy = _object(_member(element, "policy", path), f"{path}.policy")
    policy_type = _text(policy, "policy-type", f"{path}.policy")
    if policy_type == "no-policy-found" and policy.get("policy-domain") is None:
        domain = ""
    else:
        domain = _text(policy, "policy-domain", f"{path}.policy").lower().removesuffix(".")
    summary = _object(_member(element, "summary", path), f"{path}.summary")
    details = element.get("failure-details")
    if details is None:
        details = []
    if not isinstance(details, list):
        raise ReportError(f"{path}.failure-details: not an array ({_short(details)})")
    return PolicyResult(
        policy_type=policy_type,
        policy_domain=domain,
        successful=_count(summary, "total-successful-session-count", f"{path}.summary"),
        failed=_count(summary, "total-failure-session-count", f"{path}.summary"),
        failures=tuple(
            _failure(item, f"{path}.failure-details[{i}]") for i, item in enumerate(details)
        ),
    )


def parse_report(obj: object, source: str) -> Report:
    """Check a decoded report (RFC 8460 §4.4) just enough to summarise it.

    Required: C{organization-name}, C{report-id}, C{date-range} with two RFC 3339 date-times
    (a missing zone is read as UTC) and C{policies}, an array whose elements have
    C{policy.policy-type}, C{policy.policy-domain} (may be absent for C{no-policy-found}),
    and C{summary} with both counts. C{failure-details} may be absent; each entry needs
    C{result-type} and C{failed-session-count}. Counts are JSON integers from 0 to
    L{MAX_COUNT}. Other members are not looked at; blank optional strings count as absent, as
    some senders send C{""} for an unknown address.

    @raise ReportError: the report cannot be summarised; the message names the member.
    """
    report = _object(obj, "report")
    organization = _text(report, "organization-name", "report")
    date_range = _object(_member(report, "date-range", "report"), "date-range")
    start = _datetime(date_range, "start-datetime", "date-range")
    end = _datetime(date_range, "end-datetime", "date-range")
    if end < start:
        raise ReportError("date-range: end-datetime is before start-datetime")
    report_id = _text(report, "report-id", "report")
    policies = _member(report, "policies", "report")
    if not isinstance(policies, list):
        raise ReportError(f"policies: not an array ({_short(policies)})")
    return Report(
        source=source,
        organization=organization,
        report_id=report_id,
        start=start,
        end=end,
        policies=tuple(_policy(item, f"policies[{i}]") for i, item in enumerate(policies)),
    )


def _gunzip(data: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            body = f.read(MAX_REPORT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise ReportError(f"bad gzip data: {e or type(e).__name__}") from None
    if len(body) > MAX_REPORT_BYTES:
        raise ReportError(f"larger than {MAX_REPORT_BYTES // 2**20} MiB uncompressed")
    return body


def decode_report(data: bytes, source: str) -> Report:
    """Decode a report body, gzip-compressed or plain UTF-8 JSON (by content), and check it.

    @raise ReportError: bad gzip data, not UTF-8, bad JSON, or rejected by L{parse_report}.
    """
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data)
    elif len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"larger than {MAX_REPORT_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReportError(f"not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"bad JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ReportError("bad JSON: nested too deeply") from None
    except ValueError:  # not a JSONDecodeError: an integer of more digits than Python reads
        limit = sys.get_int_max_str_digits()
        raise ReportError(f"bad JSON: an integer of over {limit} digits") from None
    return parse_report(obj, source)


# --- Mail messages (pure) -------------------------------------------------------------------


def _report_parts(message: email.message.Message) -> list[email.message.Message]:
    parts = []
    for part in message.walk():
        if part.is_multipart():
            continue
        media = part.get_content_type()
        name = part.get_filename() or ""
        if media in _REPORT_MEDIA or media in _LOOSE_MEDIA or _REPORT_NAME.search(name):
            parts.append(part)
    return parts


def reports_in_message(data: bytes, source: str) -> list[Report | Skipped]:
    """Return the reports attached to one mail message, or why there are none.

    Every leaf part that is C{application/tlsrpt+gzip}, C{application/tlsrpt+json},
    C{application/gzip} or C{application/json}, or whose file name ends in C{.json} or
    C{.gz}, is decoded by content (gzip or JSON), whatever the declared type and transfer
    encoding; forwarded messages (C{message/rfc822}) are searched too. With several report
    parts, each part's source names its file name or type.
    """
    try:
        message = email.message_from_bytes(data)
        parts = _report_parts(message)
        if not parts:
            found = sorted({p.get_content_type() for p in message.walk() if not p.is_multipart()})
            reason = f"no TLS-RPT report in the message (parts: {', '.join(found)})"
            return [Skipped(source, reason)]
        bodies = [
            (
                f"{source} ({p.get_filename() or p.get_content_type()})"
                if len(parts) > 1
                else source,
                p.get_payload(decode=True),
            )
            for p in parts
        ]
    except (email.errors.MessageError, ValueError, LookupError, TypeError) as e:
        return [Skipped(source, f"unreadable mail message: {e}")]
    except RecursionError:
        return [Skipped(source, "unreadable mail message: parts nested too deeply")]
    results: list[Report | Skipped] = []
    for where, body in bodies:
        try:
            if not isinstance(body, bytes):
                raise ReportError("report part has no content")
            results.append(decode_report(body, where))
        except ReportError as e:
            results.append(Skipped(where, str(e)))
    return results


# --- Files, mailboxes, directories ----------------------------------------------------------


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _too_large(limit: int) -> str:
    return f"larger than {limit // 2**20} MiB"


def _read_mbox(path: Path) -> Iterator[Report | Skipped]:
    box = mailbox.mbox(path, create=False)
    limit = 2 * MAX_REPORT_BYTES
    try:
        for number, key in enumerate(box.iterkeys(), 1):
            source = f"{_source(path)}, message {number}"
            with box.get_file(key) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                yield Skipped(source, _too_large(limit))
            else:
                yield from reports_in_message(data, source)
    finally:
        box.close()


def _source(path: Path) -> str:
    """A path as text for messages: bytes that are not UTF-8 escaped (C{\\xff})."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_file(path: Path) -> Iterator[Report | Skipped]:
    source = _source(path)
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"From "):
        yield from _read_mbox(path)
        return
    if path.stat().st_size > 2 * MAX_REPORT_BYTES:
        yield Skipped(source, _too_large(2 * MAX_REPORT_BYTES))
        return
    data = path.read_bytes()
    if path.suffix.lower() in (".gz", ".gzip") and not head.startswith(_GZIP_MAGIC):
        yield Skipped(source, "not gzip data")
    elif (
        head.startswith(_GZIP_MAGIC)
        or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")
        or path.suffix.lower() == ".json"
    ):
        try:
            yield decode_report(data, source)
        except ReportError as e:
            yield Skipped(source, str(e))
    elif _HEADER_LINE.match(head):
        yield from reports_in_message(data, source)
    else:
        yield Skipped(source, "not a report, a mail message or an mbox")


def _read_path(path: Path) -> Iterator[Report | Skipped]:
    """Yield what one path holds; an I/O error skips the file or directory concerned."""
    try:
        if not path.is_dir():
            yield from _read_file(path)
            return
        if _is_maildir(path):
            entries = [e for sub in ("new", "cur") for e in _visible(path / sub) if e.is_file()]
        else:
            entries = [
                e for e in _visible(path) if e.is_file() or (e.is_dir() and not e.is_symlink())
            ]
    except OSError as e:
        yield Skipped(_source(path), f"cannot read: {e.strerror or e}")
        return
    for entry in entries:
        yield from _read_path(entry)


def collect(paths: Iterable[str | os.PathLike[str]]) -> Collection:
    """Read every report under C{paths}; a report seen again is recorded as a L{Duplicate}."""
    result = Collection()
    first: dict[tuple[str, str], str] = {}
    for path in paths:
        for item in _read_path(Path(path)):
            if isinstance(item, Skipped):
                result.skipped.append(item)
                continue
            key = (item.organization, item.report_id)
            if key in first:
                result.duplicates.append(
                    Duplicate(item.source, item.organization, item.report_id, first[key])
                )
                continue
            first[key] = item.source
            result.reports.append(item)
    return result


# --- The summary (pure) ---------------------------------------------------------------------


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _ranked(counts: Mapping[Any, int]) -> list[tuple[Any, int]]:
    """Most first, then by name (C{None}, "no details", last)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))


def _typed_failures(policy: PolicyResult) -> Iterator[tuple[str | None, int]]:
    """Failures by result type; failures a sender counted without details come as C{None}."""
    detailed = 0
    for failure in policy.failures:
        detailed += failure.count
        yield failure.result_type, failure.count
    if policy.failed > detailed:
        yield None, policy.failed - detailed


def summarise(collection: Collection) -> dict[str, Any]:
    """Return the summary as a JSON-ready object: what C{show --json} prints.

    Its shape (format C{postfix-mtasts-show/1}; lists are sorted most failures first, then
    by name, unless said otherwise)::

      format          "postfix-mtasts-show/1"
      date-range      {start-datetime, end-datetime, first-day, last-day}: the earliest
                      start and latest end (UTC, "Z") and the UTC days they cover (an end
                      at midnight ends the day before); null when no report was read
      totals          {reports, successful, failed}
      organizations   [{organization-name, reports, successful, failed}]
      policy-domains  [{policy-domain, policy-types: [..], successful, failed}]
      result-types    [{result-type, failed}]
      mx-hosts        [{receiving-mx-hostname, failed, result-types: [..]}]
      receiving-ips   [{receiving-ip, failed, receiving-mx-hostnames: [..]}]
      days            [{day, reports, successful, failed, result-types: [{result-type,
                      failed}]}], by day; a report counts under its start's UTC day
      reports         [{source, organization-name, report-id, start-datetime, end-datetime,
                      successful, failed}], by start, organization, report-id
      skipped         [{source, reason}], in reading order
      duplicates      [{source, organization-name, report-id, first-source}]

    C{successful} and C{failed} are the reports' summary counts. Failures by result type, MX
    host and address add up the C{failure-details} entries, which RFC 8460 lets overlap: they
    may exceed the summary's failures. Failures a sender counted without details appear with
    C{result-type} null. A policy domain of C{""} is a C{no-policy-found} element without one.
    """
    reports = sorted(collection.reports, key=lambda r: (r.start, r.organization, r.report_id))
    orgs: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    domains: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    domain_types: dict[str, set[str]] = defaultdict(set)
    types: Counter[str | None] = Counter()
    hosts: Counter[str] = Counter()
    host_types: dict[str, Counter[str]] = defaultdict(Counter)
    ips: Counter[str] = Counter()
    ip_hosts: dict[str, set[str]] = defaultdict(set)
    days: dict[datetime.date, list[int]] = defaultdict(lambda: [0, 0, 0])
    day_types: dict[datetime.date, Counter[str | None]] = defaultdict(Counter)
    listed = []
    for report in reports:
        ok = sum(p.successful for p in report.policies)
        bad = sum(p.failed for p in report.policies)
        for row in (orgs[report.organization], days[report.day]):
            row[0] += 1
            row[1] += ok
            row[2] += bad
        for policy in report.policies:
            domains[policy.policy_domain][0] += policy.successful
            domains[policy.policy_domain][1] += policy.failed
            domain_types[policy.policy_domain].add(policy.policy_type)
            for rtype, count in _typed_failures(policy):
                types[rtype] += count
                day_types[report.day][rtype] += count
            for failure in policy.failures:
                if failure.mx_host:
                    hosts[failure.mx_host] += failure.count
                    host_types[failure.mx_host][failure.result_type] += failure.count
                if failure.receiving_ip:
                    ips[failure.receiving_ip] += failure.count
                    if failure.mx_host:
                        ip_hosts[failure.receiving_ip].add(failure.mx_host)
        listed.append(
            {
                "source": report.source,
                "organization-name": report.organization,
                "report-id": report.report_id,
                "start-datetime": _iso(report.start),
                "end-datetime": _iso(report.end),
                "successful": ok,
                "failed": bad,
            }
        )
    date_range = None
    if reports:
        date_range = {
            "start-datetime": _iso(min(r.start for r in reports)),
            "end-datetime": _iso(max(r.end for r in reports)),
            "first-day": min(r.day for r in reports).isoformat(),
            "last-day": max(r.last_day for r in reports).isoformat(),
        }
    return {
        "format": FORMAT,
        "date-range": date_range,
        "totals": {
            "reports": len(reports),
            "successful": sum(r["successful"] for r in listed),
            "failed": sum(r["failed"] for r in listed),
        },
        "organizations": [
            {"organization-name": name, "reports": n, "successful": ok, "failed": bad}
            for name, (n, ok, bad) in sorted(orgs.items(), key=lambda kv: (-kv[1][2], kv[0]))
        ],
        "policy-domains": [
            {
                "policy-domain": name,
                "policy-types": sorted(domain_types[name]),
                "successful": ok,
                "failed": bad,
            }
            for name, (ok, bad) in sorted(domains.items(), key=lambda kv: (-kv[1][1], kv[0]))
        ],
        "result-types": [{"result-type": t, "failed": n} for t, n in _ranked(types)],
        "mx-hosts": [
            {
                "receiving-mx-hostname": host,
                "failed": n,
                "result-types": [t for t, _ in _ranked(host_types[host])],
            }
            for host, n in _ranked(hosts)
        ],
        "receiving-ips": [
            {"receiving-ip": ip, "failed": n, "receiving-mx-hostnames": sorted(ip_hosts[ip])}
            for ip, n in _ranked(ips)
        ],
        "days": [
            {
                "day": day.isoformat(),
                "reports": n,
                "successful": ok,
                "failed": bad,
                "result-types": [
                    {"result-type": t, "failed": c} for t, c in _ranked(day_types[day]) if c
                ],
            }
            for day, (n, ok, bad) in sorted(days.items())
        ],
        "reports": listed,
        "skipped": [{"source": s.source, "reason": s.reason} for s in collection.skipped],
        "duplicates": [
            {
                "source": d.source,
                "organization-name": d.organization,
                "report-id": d.report_id,
                "first-source": d.first_source,
            }
            for d in collection.duplicates
        ],
    }


# --- Text and JSON (pure) -------------------------------------------------------------------


def printable(text: str) -> str:
    """Make untrusted text safe for a terminal: each control and format character written as
    its Python escape (``check`` uses it too)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: int) -> list[str]:
    """Lay out a table within 80 columns; the first C{numeric} columns after the first are
    right-aligned numbers, the others text. Text columns shrink, widest first, to fit."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    texts = [i for i in range(len(headers)) if not 1 <= i <= numeric]
    floor = {i: max(len(headers[i]), 12) for i in texts}
    while sum(widths) + 2 * (len(widths) - 1) > _WIDTH:
        shrinkable = [i for i in texts if widths[i] > floor[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            _fit(cell, w).rjust(w) if 1 <= i <= numeric else _fit(cell, w).ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _rate(ok: int, bad: int) -> str:
    return f"{100 * bad / (ok + bad):.1f}%" if ok + bad else "-"


def _type_name(rtype: str | None) -> str:
    return "(no details)" if rtype is None else printable(rtype)


def _domain_name(name: str) -> str:
    return printable(name) if name else "(not given)"


def render_text(summary: Mapping[str, Any]) -> str:
    """Return L{summarise}'s object as text tables for an 80-column terminal."""
    totals = summary["totals"]
    out: list[str] = []
    if summary["date-range"] is None:
        out.append("No TLS-RPT report was read.")
    else:
        n, orgs = totals["reports"], len(summary["organizations"])
        out.append(
            f"{n} TLS-RPT report{'s' if n != 1 else ''} from {orgs}"
            f" organization{'s' if orgs != 1 else ''}, {_covered(summary['date-range'])} (UTC)"
        )
        ok, bad = totals["successful"], totals["failed"]
        out.append(f"Sessions: {ok} successful, {bad} failed ({_rate(ok, bad)} failed)")
        out += ["", *_sections(summary)]
    if summary["skipped"]:
        out += ["", f"Skipped inputs ({len(summary['skipped'])}):"]
        out += [f"  {printable(s['source'])}: {printable(s['reason'])}" for s in summary["skipped"]]
    if summary["duplicates"]:
        out += ["", f"Seen again, counted once ({len(summary['duplicates'])}):"]
        out += [
            f"  {printable(d['source'])}: report-id {printable(d['report-id'])}"
            f" (first read from {printable(d['first-source'])})"
            for d in summary["duplicates"]
        ]
    return "\n".join(out) + "\n"


def _covered(date_range: Mapping[str, str]) -> str:
    first, last = date_range["first-day"], date_range["last-day"]
    return first if first == last else f"{first} to {last}"


def _counts(item: Mapping[str, Any]) -> list[str]:
    """The successful, failed and failed-share cells of a summary row."""
    ok, bad = item["successful"], item["failed"]
    return [str(ok), str(bad), _rate(ok, bad)]


def _sections(summary: Mapping[str, Any]) -> list[str]:
    tables = [
        _table(
            ("Organization", "Reports", "Successful", "Failed", "Failed %"),
            [
                [printable(o["organization-name"]), str(o["reports"]), *_counts(o)]
                for o in summary["organizations"]
            ],
            4,
        ),
        _table(
            ("Policy domain", "Successful", "Failed", "Failed %", "Policy"),
            [
                [
                    _domain_name(d["policy-domain"]),
                    *_counts(d),
                    printable(", ".join(d["policy-types"])),
                ]
                for d in summary["policy-domains"]
            ],
            3,
        ),
    ]
    if summary["result-types"]:
        rows = [[_type_name(t["result-type"]), str(t["failed"])] for t in summary["result-types"]]
        tables.append(_table(("Result type", "Failed"), rows, 1))
    if summary["mx-hosts"]:
        rows = [
            [h["receiving-mx-hostname"], str(h["failed"]), ", ".join(h["result-types"])]
            for h in summary["mx-hosts"]
        ]
        tables.append(_table(("Failing MX host", "Failed", "Result types"), _cleaned(rows), 1))
    if summary["receiving-ips"]:
        rows = [
            [i["receiving-ip"], str(i["failed"]), ", ".join(i["receiving-mx-hostnames"])]
            for i in summary["receiving-ips"]
        ]
        tables.append(_table(("Receiving IP", "Failed", "MX hosts"), _cleaned(rows), 1))
    rows = [[d["day"], str(d["reports"]), *_counts(d)] for d in summary["days"]]
    tables.append(_table(("Day", "Reports", "Successful", "Failed", "Failed %"), rows, 4))
    lines: list[str] = []
    for table in tables:
        lines += ["", *table]
    return lines[1:]


def _cleaned(rows: list[list[str]]) -> list[list[str]]:
    return [[printable(cell) for cell in row] for row in rows]


def render_json(summary: Mapping[str, Any]) -> str:
    """Return L{summarise}'s object as indented JSON text with a final newline."""
    return json.dumps(summary, indent=2, ensure_ascii=False) + "\n"


# --- The command ----------------------------------------------------------------------------


def main(
    paths: Sequence[str],
    *,
    as_json: bool = False,
    html: str | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run C{postfix-mtasts show [--json] [--html OUT] FILE…}; return the exit status.

    Prints the text tables (or the JSON object with C{as_json}) to C{out}; with C{html},
    also writes the page there. Returns 0 when at least one report was read and no input was
    skipped, 1 when an input was skipped or no report was found, 2 (after one line on
    C{err}) when a path does not exist or C{html} cannot be written.
    """
    if not paths:
        print("postfix-mtasts show: no FILE given", file=err)
        return 2
    for path in paths:
        if not os.path.exists(path):
            print(f"postfix-mtasts show: no such file or directory: {path}", file=err)
            return 2
    collection = collect(paths)
    summary = summarise(collection)
    if html is not None:
        try:
            Path(html).write_text(render_html(summary), encoding="utf-8")
        except OSError as e:
            print(f"postfix-mtasts show: cannot write --html {html}: {e.strerror or e}", file=err)
            return 2
    out.write(render_json(summary) if as_json else render_text(summary))
    return 0 if collection.reports and not collection.skipped else 1
