"""The RFC 8460 aggregate report: JSON object, gzip body, file name, Subject, strict check.

Pure functions (``reference/tlsrpt.md`` §2, §5, §8, §9): counters in, the report's bytes and
names out. A report is built with deterministic order, so rebuilding the same day gives the
same bytes, and L{build_report} never returns a report that L{validate_report} rejects.
"""

from __future__ import annotations

import calendar
import datetime
import gzip
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import idna

from postfix_mtasts.tlsrpt.record import is_domain_name

__all__ = [
    "POLICY_TYPES",
    "RESULT_TYPES",
    "FailureKey",
    "PolicyCounts",
    "PolicyKey",
    "build_report",
    "make_report_id",
    "report_filename",
    "report_gzip",
    "report_json",
    "report_subject",
    "validate_report",
]

POLICY_TYPES: frozenset[str] = frozenset({"sts", "tlsa", "no-policy-found"})
"""The values of C{policy-type} (RFC 8460 §4.4)."""

RESULT_TYPES: frozenset[str] = frozenset(
    {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }
)
"""The eleven result types (RFC 8460 §4.3, IANA "STARTTLS Validation Result Types")."""

_DAY_SECONDS = 86400
_MAX_INT = 2**53 - 1
"""The largest integer I-JSON (RFC 7493 §2.2) carries exactly."""


@dataclass(frozen=True, slots=True)
class PolicyKey:
    """Which policy applied to a group of sessions: one C{policies[]} element."""

    policy_type: str
    """C{"sts"}, C{"tlsa"} or C{"no-policy-found"}."""
    policy_domain: str
    """The policy domain (A-labels; lower-cased by the builder)."""
    policy_string: tuple[str, ...] = ()
    """The policy's lines as received (sts) or TLSA records (tlsa); empty: omitted."""
    mx_host: tuple[str, ...] = ()
    """The sts policy's C{mx} patterns; empty: omitted (always omitted for other types)."""


@dataclass(frozen=True, slots=True)
class FailureKey:
    """One distinct kind of failure: one C{failure-details} entry."""

    result_type: str
    """One of L{RESULT_TYPES}."""
    mx_host: str | None
    """The receiving MX host name, or C{None} if unknown."""
    mx_ip: str | None
    """The receiving MX address, or C{None} if unknown."""
    reason: str | None
    """The C{failure-reason-code}, or C{None}."""


@dataclass(slots=True)
class PolicyCounts:
    """The sessions counted under one policy: successes, and failures by kind."""

    successes: int = 0
    failures: dict[FailureKey, int] = field(default_factory=dict)


# --- Building -------------------------------------------------------------------------------


def _domain(name: str) -> str:
    """Return C{name} lower-cased, without one trailing dot, in A-labels (as is if invalid)."""
    if name.isascii():
        return name.lower().removesuffix(".")
    try:
        return idna.encode(name.removesuffix("."), uts46=True).decode("ascii")
    except (UnicodeError, ValueError):
        return name


def _optional_host(name: str | None) -> str | None:
    """Return an MX host name normalised, or C{None} if absent or not a valid name."""
    if not name:
        return None
    name = _domain(name)
    return name if is_domain_name(name) else None


def _optional_ip(text: str | None) -> str | None:
    """Return an address in canonical text (RFC 5952 for IPv6), or C{None} if absent or bad."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.removeprefix("[").removesuffix("]")))
    except ValueError:
        return None


def _failure_sort_key(key: FailureKey) -> tuple[str, str, str, str]:
    return (key.result_type, key.mx_host or "", key.mx_ip or "", key.reason or "")


def _policy_sort_key(key: PolicyKey) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    return (key.policy_type, key.policy_domain, key.policy_string, key.mx_host)


def _count(what: str, value: object) -> int:
    """Return C{value} if it is a count (an C{int}, not a C{bool}, >= 0); else raise."""
    if type(value) is not int:
        raise ValueError(f"invalid report: {what}: not an integer ({value!r})")
    if value < 0:
        raise ValueError(f"invalid report: {what}: {value} is out of range")
    return value


def _normalise(
    policies: Mapping[PolicyKey, PolicyCounts],
) -> dict[PolicyKey, tuple[int, dict[FailureKey, int]]]:
    """Normalise the keys' values and merge the counts of keys that become equal."""
    merged: dict[PolicyKey, tuple[int, dict[FailureKey, int]]] = {}
    for key, counts in policies.items():
        policy_string = (
            () if key.policy_type == "no-policy-found" else tuple(s for s in key.policy_string if s)
        )
        # mx-host describes an sts policy's text: without that text it is left out too.
        sts_text = key.policy_type == "sts" and bool(policy_string)
        mx_host = tuple(p.lower() for p in key.mx_host if p) if sts_text else ()
        norm = PolicyKey(key.policy_type, _domain(key.policy_domain), policy_string, mx_host)
        successes, failures = merged.get(norm, (0, {}))
        for fkey, value in counts.failures.items():
            count = _count(f"failure count of {fkey}", value)
            if count == 0:
                continue
            fnorm = FailureKey(
                fkey.result_type,
                _optional_host(fkey.mx_host),
                _optional_ip(fkey.mx_ip),
                fkey.reason or None,
            )
            failures[fnorm] = failures.get(fnorm, 0) + count
        merged[norm] = (successes + _count(f"successes of {key}", counts.successes), failures)
    return merged


def build_report(
    *,
    organization_name: str,
    contact_info: str,
    report_id: str,
    day: datetime.date,
    policies: Mapping[PolicyKey, PolicyCounts],
    sending_mta_ip: str | None = None,
) -> dict[str, Any]:
    """Build the report of one UTC C{day} as a JSON-ready C{dict} (RFC 8460 §4.4).

    Key order follows the RFC; policies and failure details are sorted, so the same input
    gives the same output. Domains are lower-cased and written in A-labels, addresses in
    canonical form; an MX host name or address that is not valid is omitted (the failure
    still counts), as are empty optional values. Keys that become equal are merged; policies
    without sessions and zero failure counts are left out. C{policy-string} is omitted for
    C{no-policy-found} and when empty; C{mx-host} is given only for C{sts} with a
    C{policy-string}, when not empty.

    @raise ValueError: the result would not pass L{validate_report} (e.g. an unknown type,
        a negative count, no session at all); the message lists the problems.
    """
    sending_ip = _optional_ip(sending_mta_ip)
    elements: list[dict[str, Any]] = []
    merged = _normalise(policies)
    for key in sorted(merged, key=_policy_sort_key):
        successes, failures = merged[key]
        if successes == 0 and not failures:
            continue
        policy: dict[str, Any] = {"policy-type": key.policy_type}
        if key.policy_string:
            policy["policy-string"] = list(key.policy_string)
        policy["policy-domain"] = key.policy_domain
        if key.mx_host:
            policy["mx-host"] = list(key.mx_host)
        details: list[dict[str, Any]] = []
        for fkey in sorted(failures, key=_failure_sort_key):
            entry: dict[str, Any] = {"result-type": fkey.result_type}
            if sending_ip is not None:
                entry["sending-mta-ip"] = sending_ip
            if fkey.mx_host is not None:
                entry["receiving-mx-hostname"] = fkey.mx_host
            if fkey.mx_ip is not None:
                entry["receiving-ip"] = fkey.mx_ip
            entry["failed-session-count"] = failures[fkey]
            if fkey.reason is not None:
                entry["failure-reason-code"] = fkey.reason
            details.append(entry)
        elements.append(
            {
                "policy": policy,
                "summary": {
                    "total-successful-session-count": successes,
                    "total-failure-session-count": sum(failures.values()),
                },
                "failure-details": details,
            }
        )
    report: dict[str, Any] = {
        "organization-name": organization_name,
        "date-range": {
            "start-datetime": f"{day.isoformat()}T00:00:00Z",
            "end-datetime": f"{day.isoformat()}T23:59:59Z",
        },
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": elements,
    }
    problems = validate_report(report)
    if problems:
        raise ValueError("invalid report: " + "; ".join(problems[:5]))
    return report


def report_json(report: Mapping[str, Any]) -> bytes:
    """Return C{report} as compact UTF-8 JSON (I-JSON, RFC 7493: no NaN, no lone surrogate).

    @raise ValueError: a value cannot be written as I-JSON.
    """
    text = json.dumps(report, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"report text is not valid Unicode: {e}") from None


def report_gzip(report: Mapping[str, Any]) -> bytes:
    """Return the gzip-compressed JSON of C{report}, byte-identical for the same report."""
    return gzip.compress(report_json(report), compresslevel=6, mtime=0)


def _day_bounds(day: datetime.date) -> tuple[int, int]:
    """Return the Unix seconds of C{day}'s first and last second (UTC)."""
    begin = calendar.timegm(day.timetuple())
    return begin, begin + _DAY_SECONDS - 1


def _a_label(what: str, name: str) -> str:
    """Return the domain C{name} in A-labels, or raise C{ValueError} naming C{what}."""
    normal = _domain(name)
    if not is_domain_name(normal):
        raise ValueError(f"{what} {name!r} is not a valid domain name")
    return normal


_ALNUM_RE = re.compile(r"[A-Za-z0-9]+")


def report_filename(submitter: str, policy_domain: str, day: datetime.date, unique_id: str) -> str:
    """Return the report's file name (RFC 8460 §5.1), always C{.json.gz}.

    C{<submitter>!<policy-domain>!<begin>!<end>!<unique-id>.json.gz}: both domains in
    A-labels, begin the day's 00:00:00Z and end 23:59:59Z in Unix seconds.

    @raise ValueError: a domain is invalid, or C{unique_id} is not letters and digits only.
    """
    if _ALNUM_RE.fullmatch(unique_id) is None or not unique_id.isascii():
        raise ValueError(f"unique id {unique_id!r} is not letters and digits only")
    begin, end = _day_bounds(day)
    return (
        f"{_a_label('submitter', submitter)}!{_a_label('policy domain', policy_domain)}"
        f"!{begin}!{end}!{unique_id}.json.gz"
    )


def make_report_id(day: datetime.date, policy_domain: str, submitter: str, token: str) -> str:
    """Return a report-id shaped like a message-id.

    C{<YYYYMMDD>.<policy-domain>.<token>@<submitter>}, both domains in A-labels.

    C{token} comes from the caller (random, kept in the outbox), so the id is made once and
    reused for every destination and retry.

    @raise ValueError: a domain is invalid, or C{token} is not letters and digits only.
    """
    if _ALNUM_RE.fullmatch(token) is None or not token.isascii():
        raise ValueError(f"token {token!r} is not letters and digits only")
    domain = _a_label("policy domain", policy_domain)
    return f"{day:%Y%m%d}.{domain}.{token}@{_a_label('submitter', submitter)}"


def report_subject(policy_domain: str, submitter: str, report_id: str) -> str:
    """Return the mail Subject of a report (RFC 8460 §5.3), unfolded.

    C{Report Domain: <policy-domain> Submitter: <submitter> Report-ID: <<report-id>>}.

    @raise ValueError: a domain is invalid, or C{report_id} cannot sit between angle brackets.
    """
    if _REPORT_ID_RE.fullmatch(report_id) is None:
        raise ValueError(f"report id {report_id!r} is not printable ASCII without <>")
    return (
        f"Report Domain: {_a_label('policy domain', policy_domain)}"
        f" Submitter: {_a_label('submitter', submitter)} Report-ID: <{report_id}>"
    )


# --- Checking -------------------------------------------------------------------------------

_REPORT_ID_RE = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")
_DATE_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})T00:00:00Z")
_TOP_KEYS = ("organization-name", "date-range", "contact-info", "report-id", "policies")
_ELEMENT_KEYS = ("policy", "summary", "failure-details")
_POLICY_KEYS = frozenset({"policy-type", "policy-string", "policy-domain", "mx-host"})
_SUMMARY_KEYS = ("total-successful-session-count", "total-failure-session-count")
_DETAIL_KEYS = frozenset(
    {
        "result-type",
        "sending-mta-ip",
        "receiving-mx-hostname",
        "receiving-mx-helo",
        "receiving-ip",
        "failed-session-count",
        "additional-information",
        "failure-reason-code",
    }
)
_DETAIL_IPS = ("sending-mta-ip", "receiving-ip")
_DETAIL_TEXTS = ("receiving-mx-helo", "additional-information", "failure-reason-code")


def _identity(value: Mapping[str, Any], *leave_out: str) -> str:
    """Return a text that is equal for objects with the same members (order aside)."""
    return repr(sorted((k, repr(v)) for k, v in value.items() if k not in leave_out))


class _Checker:
    """Collects the problems of one report; each method checks one value at one path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, path: str, what: str) -> None:
        self.problems.append(f"{path}: {what}")

    def keys(self, path: str, value: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for key in value:
            if key not in allowed:
                self.bad(path, f"unknown key {key!r}")

    def text(self, path: str, value: object) -> bool:
        if not isinstance(value, str):
            self.bad(path, f"not a string ({value!r})")
            return False
        if not value:
            self.bad(path, "empty string")
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.bad(path, "not valid Unicode")
            return False
        return True

    def count(self, path: str, value: object, minimum: int) -> int | None:
        if type(value) is not int:
            self.bad(path, f"not an integer ({value!r})")
            return None
        if not minimum <= value <= _MAX_INT:
            self.bad(path, f"{value} is out of range")
            return None
        return value

    def domain(self, path: str, value: object, *, wildcard: bool = False) -> None:
        if self.text(path, value):
            assert isinstance(value, str)
            name = value.removeprefix("*.") if wildcard else value
            if not is_domain_name(name):
                self.bad(path, f"{value!r} is not a lower-case A-label domain name")

    def ip(self, path: str, value: object) -> None:
        if self.text(path, value):
            assert isinstance(value, str)
            try:
                canonical = str(ipaddress.ip_address(value))
            except ValueError:
                self.bad(path, f"{value!r} is not an IP address")
                return
            if canonical != value:
                self.bad(path, f"{value!r} is not in canonical form ({canonical})")

    def strings(self, path: str, value: object, *, domains: bool = False) -> None:
        if not isinstance(value, list):
            self.bad(path, f"not an array ({value!r})")
            return
        if not value:
            self.bad(path, "empty array")
        for i, item in enumerate(value):
            if domains:
                self.domain(f"{path}[{i}]", item, wildcard=True)
            else:
                self.text(f"{path}[{i}]", item)

    def date_range(self, value: object) -> None:
        path = "date-range"
        if not isinstance(value, dict):
            self.bad(path, f"not an object ({value!r})")
            return
        self.keys(path, value, frozenset({"start-datetime", "end-datetime"}))
        start, end = value.get("start-datetime"), value.get("end-datetime")
        match = _DATE_RE.fullmatch(start) if isinstance(start, str) else None
        day = None
        if match is not None:
            try:
                day = datetime.date.fromisoformat(match[1])
            except ValueError:
                day = None
        if day is None:
            self.bad(f"{path}.start-datetime", f"{start!r} is not YYYY-MM-DDT00:00:00Z")
        elif end != f"{day.isoformat()}T23:59:59Z":
            self.bad(f"{path}.end-datetime", f"{end!r} is not {day.isoformat()}T23:59:59Z")

    def policy(self, path: str, value: object) -> None:
        if not isinstance(value, dict):
            self.bad(path, f"not an object ({value!r})")
            return
        self.keys(path, value, _POLICY_KEYS)
        ptype = value.get("policy-type")
        if ptype not in POLICY_TYPES:
            self.bad(f"{path}.policy-type", f"{ptype!r} is not sts, tlsa or no-policy-found")
        if "policy-domain" not in value:
            self.bad(path, "missing policy-domain")
        else:
            self.domain(f"{path}.policy-domain", value["policy-domain"])
        if "policy-string" in value:
            if ptype == "no-policy-found":
                self.bad(path, "policy-string given for no-policy-found")
            self.strings(f"{path}.policy-string", value["policy-string"])
        if "mx-host" in value:
            if ptype != "sts":
                self.bad(path, f"mx-host given for {ptype!r}")
            elif "policy-string" not in value:
                self.bad(path, "mx-host given without policy-string")
            self.strings(f"{path}.mx-host", value["mx-host"], domains=True)

    def detail(self, path: str, value: object) -> tuple[str, int | None] | None:
        if not isinstance(value, dict):
            self.bad(path, f"not an object ({value!r})")
            return None
        self.keys(path, value, _DETAIL_KEYS)
        rtype = value.get("result-type")
        if rtype not in RESULT_TYPES:
            self.bad(f"{path}.result-type", f"{rtype!r} is not an RFC 8460 result type")
        if "failed-session-count" not in value:
            self.bad(path, "missing failed-session-count")
        count = self.count(f"{path}.failed-session-count", value.get("failed-session-count"), 1)
        if "receiving-mx-hostname" in value:
            self.domain(f"{path}.receiving-mx-hostname", value["receiving-mx-hostname"])
        for key in _DETAIL_IPS:
            if key in value:
                self.ip(f"{path}.{key}", value[key])
        for key in _DETAIL_TEXTS:
            if key in value:
                self.text(f"{path}.{key}", value[key])
        return _identity(value, "failed-session-count"), count

    def element(self, path: str, value: object) -> None:
        if not isinstance(value, dict):
            self.bad(path, f"not an object ({value!r})")
            return
        self.keys(path, value, frozenset(_ELEMENT_KEYS))
        for key in _ELEMENT_KEYS:
            if key not in value:
                self.bad(path, f"missing {key}")
        if "policy" in value:
            self.policy(f"{path}.policy", value["policy"])
        failures = self.summary(f"{path}.summary", value) if "summary" in value else None
        if "failure-details" not in value:
            return
        details = value["failure-details"]
        if not isinstance(details, list):
            self.bad(f"{path}.failure-details", f"not an array ({details!r})")
            return
        seen: set[str] = set()
        total: int | None = 0
        for i, item in enumerate(details):
            checked = self.detail(f"{path}.failure-details[{i}]", item)
            if checked is None:
                total = None
                continue
            identity, count = checked
            if identity in seen:
                self.bad(f"{path}.failure-details[{i}]", "repeats an earlier entry")
            seen.add(identity)
            total = None if total is None or count is None else total + count
        if failures is not None and total is not None and total != failures:
            self.bad(f"{path}.failure-details", f"counts add up to {total}, not {failures}")

    def summary(self, path: str, element: Mapping[str, Any]) -> int | None:
        """Check the summary; return its failure count if valid."""
        value = element["summary"]
        if not isinstance(value, dict):
            self.bad(path, f"not an object ({value!r})")
            return None
        self.keys(path, value, frozenset(_SUMMARY_KEYS))
        for key in _SUMMARY_KEYS:
            if key not in value:
                self.bad(path, f"missing {key}")
        successes = self.count(f"{path}.{_SUMMARY_KEYS[0]}", value.get(_SUMMARY_KEYS[0]), 0)
        failures = self.count(f"{path}.{_SUMMARY_KEYS[1]}", value.get(_SUMMARY_KEYS[1]), 0)
        if successes == 0 and failures == 0:
            self.bad(path, "no sessions")
        return failures


def validate_report(report: object) -> list[str]:
    """Check C{report} against the project's strict schema; return its problems (C{[]}: valid).

    Beyond RFC 8460 §4.4 (``reference/tlsrpt.md`` §2, §9): the known keys only; non-empty
    strings; integer counts (C{bool} is not one) in I-JSON's exact range; one full UTC day,
    C{T00:00:00Z} to C{T23:59:59Z}; C{policies} a non-empty array, no policy repeated and each
    with sessions; C{policy-domain} always present; lower-case A-label domains; C{mx-host} an
    array, for C{sts} only; no C{policy-string} for C{no-policy-found}; the eleven result
    types; canonical IP addresses; C{failure-details} present, without repeated entries, its
    counts adding up to C{total-failure-session-count}.
    """
    check = _Checker()
    if not isinstance(report, dict):
        return [f"report: not an object ({type(report).__name__})"]
    check.keys("report", report, frozenset(_TOP_KEYS))
    for key in _TOP_KEYS:
        if key not in report:
            check.bad("report", f"missing {key}")
    for key in ("organization-name", "contact-info"):
        if key in report:
            check.text(key, report[key])
    if "report-id" in report:
        rid = report["report-id"]
        if check.text("report-id", rid) and _REPORT_ID_RE.fullmatch(rid) is None:
            check.bad("report-id", f"{rid!r} is not printable ASCII without spaces or <>")
    if "date-range" in report:
        check.date_range(report["date-range"])
    policies = report.get("policies", [])
    if not isinstance(policies, list):
        check.bad("policies", f"not an array ({type(policies).__name__})")
        return check.problems
    if not policies and "policies" in report:
        check.bad("policies", "empty array")
    seen: set[str] = set()
    for i, element in enumerate(policies):
        check.element(f"policies[{i}]", element)
        if isinstance(element, dict) and isinstance(element.get("policy"), dict):
            identity = _identity(element["policy"])
            if identity in seen:
                check.bad(f"policies[{i}].policy", "repeats an earlier policy")
            seen.add(identity)
    return check.problems
