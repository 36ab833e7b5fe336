"""Tests for postfix_mtasts.tlsrpt.show and showhtml: reading received TLS-RPT reports.

Reports come from the project's own builder (and its report mail), and from hand-written
reports shaped like those other senders send: Google's (policy without failures omits
C{failure-details}), Microsoft's (C{policy-string} arrays, optional fields left out, failures
counted without details), Mail.ru's (overlapping failure details, a range ending at the next
midnight) and sys4's (C{no-policy-found} without C{policy-domain}). The HTML page is loaded in
a real headless Chromium driven over the DevTools protocol (on a pipe), which reports every
request the page makes, its script errors, and the DOM the script drew.
"""

from __future__ import annotations

import base64
import copy
import datetime
import email.policy
import fcntl
import gzip
import io
import json
import mailbox
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.tlsrpt import show
from postfix_mtasts.tlsrpt.deliver import build_report_message
from postfix_mtasts.tlsrpt.report import (
    FailureKey,
    PolicyCounts,
    PolicyKey,
    build_report,
    report_filename,
    report_gzip,
    report_json,
)
from postfix_mtasts.tlsrpt.show import (
    Collection,
    Failure,
    PolicyResult,
    Report,
    ReportError,
    Skipped,
    collect,
    decode_report,
    parse_report,
    render_json,
    render_text,
    reports_in_message,
    summarise,
)
from postfix_mtasts.tlsrpt.showhtml import render_html

UTC = datetime.UTC
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mx1.example.net", "max_age: 604800")
STS = PolicyKey("sts", "example.net", STS_LINES, ("mx1.example.net",))
EXPIRED = FailureKey("certificate-expired", "mx1.example.net", "192.0.2.25", None)
NO_STARTTLS = FailureKey("starttls-not-supported", "mx2.example.net", "2001:db8::25", None)


def own_report(day: datetime.date, token: str, successes: int, failures: Any) -> dict[str, Any]:
    """A report made by the project's own builder for example.net."""
    return build_report(
        organization_name="Example Org",
        contact_info="mailto:tlsrpt@example.org",
        report_id=f"{day:%Y%m%d}.example.net.{token}@example.org",
        day=day,
        policies={STS: PolicyCounts(successes, failures)},
    )


OWN_1 = own_report(datetime.date(2026, 11, 20), "a1", 40, {EXPIRED: 2})
OWN_2 = own_report(datetime.date(2026, 11, 21), "b2", 41, {EXPIRED: 1, NO_STARTTLS: 1})

GOOGLE: dict[str, Any] = {
    "organization-name": "Google Inc.",
    "date-range": {
        "start-datetime": "2026-11-21T00:00:00Z",
        "end-datetime": "2026-11-21T23:59:59Z",
    },
    "contact-info": "smtp-tls-reporting@google.com",
    "report-id": "2026-11-21T00:00:00Z_example.com",
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": ["version: STSv1", "mode: testing", "mx: mx.example.com"],
                "policy-domain": "example.com",
                "mx-host": ["mx.example.com"],
            },
            "summary": {"total-successful-session-count": 120, "total-failure-session-count": 2},
            "failure-details": [
                {
                    "result-type": "certificate-host-mismatch",
                    "sending-mta-ip": "209.85.222.201",
                    "receiving-ip": "192.0.2.26",
                    "receiving-mx-hostname": "mx.example.com",
                    "failed-session-count": 2,
                }
            ],
        }
    ],
}

MICROSOFT: dict[str, Any] = {
    "organization-name": "Microsoft Corporation",
    "date-range": {
        "start-datetime": "2026-11-22T00:00:00Z",
        "end-datetime": "2026-11-22T23:59:59Z",
    },
    "contact-info": "tlsrpt-noreply@microsoft.com",
    "report-id": "134083008000000000+example.net",
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": [
                    "version: STSv1",
                    "mode: enforce",
                    "mx: mx1.example.net",
                    "mx: mx2.example.net",
                    "max_age: 604800",
                ],
                "policy-domain": "example.net",
            },
            "summary": {"total-successful-session-count": 310, "total-failure-session-count": 3},
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "receiving-mx-hostname": "MX1.example.net.",
                    "failed-session-count": 1,
                }
            ],
        },
        {
            "policy": {"policy-type": "no-policy-found", "policy-domain": "example.net"},
            "summary": {"total-successful-session-count": 5, "total-failure-session-count": 0},
        },
    ],
}

MAILRU: dict[str, Any] = {
    "contact-info": "tls_support@corp.mail.ru",
    "date-range": {
        "end-datetime": "2026-11-23T00:00:00Z",
        "start-datetime": "2026-11-22T00:00:00Z",
    },
    "organization-name": "Mail.ru",
    "policies": [
        {
            "failure-details": [
                {
                    "failed-session-count": 1,
                    "failure-reason-code": "bad https response code: 404",
                    "result-type": "sts-policy-fetch-error",
                },
                {
                    "failed-session-count": 1,
                    "failure-reason-code": "bad https response code: 500",
                    "result-type": "sts-policy-fetch-error",
                    "receiving-ip": "",
                    "sending-mta-ip": "",
                },
            ],
            "policy": {"policy-domain": "example.net", "policy-type": "sts"},
            "summary": {"total-failure-session-count": 1, "total-successful-session-count": 0},
        }
    ],
    "report-id": "b28254de-7b2e-be36-bb5c-4c3b92da8b25@mail.ru",
}

SYS4: dict[str, Any] = {
    "organization-name": "Example Relay",
    "date-range": {
        "start-datetime": "2026-11-22T00:00:00Z",
        "end-datetime": "2026-11-22T23:59:59Z",
    },
    "contact-info": "mailto:tlsrpt@relay.example",
    "report-id": "2026-11-22.relay.example.1",
    "policies": [
        {
            "policy": {"policy-type": "no-policy-found"},
            "summary": {"total-successful-session-count": 3, "total-failure-session-count": 0},
            "failure-details": [],
        }
    ],
}

FIVE = [OWN_1, OWN_2, GOOGLE, MICROSOFT, MAILRU]


def gz(report: dict[str, Any]) -> bytes:
    """The report's gzip body, as the project's own builder writes it."""
    return report_gzip(report)


def own_message(report: dict[str, Any]) -> bytes:
    """The project's own report mail (RFC 8460 §5.3) for one of our reports."""
    day = datetime.date.fromisoformat(report["date-range"]["start-datetime"][:10])
    return build_report_message(
        report_gz=gz(report),
        filename=report_filename("example.org", "example.net", day, "1"),
        policy_domain="example.net",
        submitter="example.org",
        report_id=report["report-id"],
        mail_from="tlsrpt-noreply@example.org",
        rcpt="tlsrpt@example.net",
        organization_name="Example Org",
        summary_text="This is an aggregate TLS report from example.org\n",
        date=datetime.datetime(2026, 11, 23, 1, 30, tzinfo=UTC),
        message_id_domain="mail.example.org",
    )


def google_message(report: dict[str, Any]) -> bytes:
    """A report mail laid out as Google's: folded parameters, quoted-printable flowed text."""
    body = base64.encodebytes(gzip.compress(report_json(report))).decode()
    return (
        "Date: Sun, 22 Nov 2026 03:53:20 -0700\r\n"
        "TLS-Report-Domain: example.com\r\n"
        "TLS-Report-Submitter: google.com\r\n"
        "Message-ID: <66d83c20.050a0220.a0566.1e8dtls@google.com>\r\n"
        "Subject: Report Domain: example.com Submitter: google.com\r\n"
        " Report-ID: <2026.11.21T00.00.00Z+example.com@google.com>\r\n"
        "From: noreply-smtp-tls-reporting@google.com\r\n"
        "To: tlsrpt@example.com\r\n"
        'Content-Type: multipart/report; boundary="0000000000007877ce062148fba9";'
        " report-type=tlsrpt\r\n"
        "MIME-Version: 1.0\r\n"
        "\r\n"
        "--0000000000007877ce062148fba9\r\n"
        'Content-Type: text/plain; charset="UTF-8"; format=flowed; delsp=yes\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
        "This is an aggregate TLS report from google.com =E2=80=93 see the attachme=\r\n"
        "nt\r\n"
        "\r\n"
        "--0000000000007877ce062148fba9\r\n"
        "Content-Type: application/tlsrpt+gzip; \r\n"
        '\tname="google.com!example.com!1795219200!1795305599!001.json.gz"\r\n'
        "Content-Disposition: attachment; \r\n"
        '\tfilename="google.com!example.com!1795219200!1795305599!001.json.gz"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n" + body.replace("\n", "\r\n") + "\r\n"
        "--0000000000007877ce062148fba9--\r\n"
    ).encode()


def mime_message(
    payload: bytes, maintype: str, subtype: str, filename: str | None = None, **kw: Any
) -> EmailMessage:
    """A multipart/report message with a text part and C{payload} as a second part."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "reports@sender.example"
    msg["To"] = "tlsrpt@example.net"
    msg["Subject"] = "Report Domain: example.net"
    msg.set_content("A TLS report.\n")
    msg.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename, **kw)
    return msg


def write(path: Path, data: bytes | str) -> Path:
    """Write C{data} to C{path}, creating its directories; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def read_all(*paths: Path) -> Collection:
    """Collect the reports under C{paths}."""
    return collect([str(p) for p in paths])


def collection_of(results: list[Report | Skipped]) -> Collection:
    """The reports and skipped inputs of C{results}, as L{collect} gathers them."""
    return Collection(
        reports=[r for r in results if isinstance(r, Report)],
        skipped=[r for r in results if isinstance(r, Skipped)],
    )


def reports_of(reports: list[dict[str, Any]]) -> Collection:
    """A collection of C{reports} as if read from files named after their position."""
    return Collection(
        reports=[decode_report(report_json(r), f"r{i}.json") for i, r in enumerate(reports)]
    )


# --- One report -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (
            OWN_2,
            [
                PolicyResult(
                    "sts",
                    "example.net",
                    41,
                    2,
                    (
                        Failure("certificate-expired", 1, "mx1.example.net", "192.0.2.25"),
                        Failure("starttls-not-supported", 1, "mx2.example.net", "2001:db8::25"),
                    ),
                )
            ],
        ),
        (
            GOOGLE,
            [
                PolicyResult(
                    "sts",
                    "example.com",
                    120,
                    2,
                    (Failure("certificate-host-mismatch", 2, "mx.example.com", "192.0.2.26"),),
                )
            ],
        ),
        (
            MICROSOFT,
            [
                PolicyResult(
                    "sts",
                    "example.net",
                    310,
                    3,
                    (Failure("certificate-expired", 1, "mx1.example.net", None),),
                ),
                PolicyResult("no-policy-found", "example.net", 5, 0, ()),
            ],
        ),
        (
            MAILRU,
            [
                PolicyResult(
                    "sts",
                    "example.net",
                    0,
                    1,
                    (
                        Failure("sts-policy-fetch-error", 1, None, None),
                        Failure("sts-policy-fetch-error", 1, None, None),
                    ),
                )
            ],
        ),
        (SYS4, [PolicyResult("no-policy-found", "", 3, 0, ())]),
    ],
    ids=["own", "google", "microsoft", "mailru", "sys4"],
)
def test_parse_report_shapes(report: dict[str, Any], expected: list[PolicyResult]) -> None:
    """Each sender's shape is read into the same policies and counts, optional fields or not."""
    parsed = parse_report(copy.deepcopy(report), "src")
    assert parsed.policies == tuple(expected)
    assert parsed.organization == report["organization-name"]
    assert parsed.report_id == report["report-id"]
    assert parsed.source == "src"


@pytest.mark.parametrize(
    ("start", "end", "day", "last_day"),
    [
        ("2026-11-22T00:00:00Z", "2026-11-22T23:59:59Z", "2026-11-22", "2026-11-22"),
        ("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z", "2026-11-22", "2026-11-22"),
        ("2026-11-22T00:00:00.000+00:00", "2026-11-22T23:59:59.999Z", "2026-11-22", "2026-11-22"),
        ("2026-11-22T01:00:00+01:00", "2026-11-23T00:59:59+01:00", "2026-11-22", "2026-11-22"),
        ("2026-11-22t00:00:00z", "2026-11-22T23:59:59", "2026-11-22", "2026-11-22"),
        ("2026-11-20T00:00:00Z", "2026-11-23T00:00:00Z", "2026-11-20", "2026-11-22"),
    ],
)
def test_date_range_forms(start: str, end: str, day: str, last_day: str) -> None:
    """RFC 3339 date-times in their usual forms are read in UTC; an end at midnight ends the day
    before."""
    report = copy.deepcopy(GOOGLE)
    report["date-range"] = {"start-datetime": start, "end-datetime": end}
    parsed = parse_report(report, "src")
    assert (parsed.day.isoformat(), parsed.last_day.isoformat()) == (day, last_day)
    assert parsed.start.tzinfo is UTC


def _broken(path: str, value: Any) -> dict[str, Any]:
    """GOOGLE with the member at dotted C{path} set to C{value} (or removed, for C{...})."""
    report = copy.deepcopy(GOOGLE)
    *parents, last = path.split(".")
    node: Any = report
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return report


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        ([GOOGLE], "report: not an object"),
        (_broken("organization-name", ...), "report: missing organization-name"),
        (_broken("organization-name", 7), "report.organization-name: not a string (7)"),
        (_broken("organization-name", " "), "report.organization-name: empty"),
        (_broken("report-id", ...), "report: missing report-id"),
        (_broken("date-range", ...), "report: missing date-range"),
        (_broken("date-range.start-datetime", "yesterday"), "not an RFC 3339 date-time"),
        (
            _broken("date-range.end-datetime", "2026-11-20T00:00:00Z"),
            "date-range: end-datetime is before start-datetime",
        ),
        (_broken("policies", {}), "policies: not an array"),
        (_broken("policies.0.policy", ...), "policies[0]: missing policy"),
        (_broken("policies.0.policy.policy-domain", ...), "policies[0].policy: missing policy-d"),
        (_broken("policies.0.summary", ...), "policies[0]: missing summary"),
        (
            _broken("policies.0.summary.total-successful-session-count", "120"),
            'policies[0].summary.total-successful-session-count: not an integer ("120")',
        ),
        (
            _broken("policies.0.summary.total-failure-session-count", 2.0),
            "policies[0].summary.total-failure-session-count: not an integer (2.0)",
        ),
        (
            _broken("policies.0.summary.total-failure-session-count", True),
            "total-failure-session-count: not an integer (true)",
        ),
        (
            _broken("policies.0.summary.total-failure-session-count", -1),
            "total-failure-session-count: negative (-1)",
        ),
        (
            _broken("policies.0.summary.total-failure-session-count", 2**53 + 1),
            "total-failure-session-count: over 9007199254740992 (9007199254740993)",
        ),
        (
            _broken("policies.0.summary.total-successful-session-count", int("9" * 4300)),
            "total-successful-session-count: over 9007199254740992 (999999999999",
        ),
        (_broken("organization-name", 10**5000), "report.organization-name: not a string (int)"),
        (
            _broken("date-range.start-datetime", "0001-01-01T00:00:00+01:00"),
            'date-range.start-datetime: out of range in UTC ("0001-01-01T00:00:00+01:00")',
        ),
        (
            _broken("date-range.end-datetime", "9999-12-31T23:59:59-01:00"),
            "date-range.end-datetime: out of range in UTC",
        ),
        (_broken("report-id", "r\ud800"), "report.report-id: not Unicode text (a lone surrogate)"),
        (
            _broken("policies.0.failure-details.0.receiving-ip", "\udcff"),
            "failure-details[0].receiving-ip: not Unicode text",
        ),
        (
            _broken("policies.0.summary.total-failure-session-count", "\ud800"),
            'total-failure-session-count: not an integer ("\\ud800")',
        ),
        (_broken("policies.0.failure-details", {}), "policies[0].failure-details: not an array"),
        (
            _broken("policies.0.failure-details.0.result-type", ...),
            "policies[0].failure-details[0]: missing result-type",
        ),
        (
            _broken("policies.0.failure-details.0.failed-session-count", None),
            "failure-details[0].failed-session-count: not an integer (null)",
        ),
        (
            _broken("policies.0.failure-details.0.receiving-ip", ["192.0.2.26"]),
            "failure-details[0].receiving-ip: not a string (list)",
        ),
    ],
)
def test_parse_report_rejects(report: Any, reason: str) -> None:
    """A report missing a required member, or with a wrong type or a non-integer count, is
    rejected with a reason that names the member."""
    with pytest.raises(ReportError) as e:
        parse_report(report, "src")
    assert reason in str(e.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x1f\x8b\x08\x00garbage", "bad gzip data"),
        (gz(GOOGLE)[:-12], "bad gzip data"),
        (b'{"organization-name": "\xff"}', "not UTF-8 text (byte 23)"),
        (b'{"organization-name": }', "bad JSON: Expecting value (line 1 column 23)"),
        (b"[" * 100000, "bad JSON: nested too deeply"),
        (gzip.compress(b" " * (2**20 + 1)), "larger than 1 MiB uncompressed"),
        (b'{"organization-name": ' + b"1" * 5000 + b"}", "bad JSON: an integer of over 4300"),
    ],
    ids=["not-gzip", "truncated-gzip", "not-utf8", "bad-json", "deep-json", "gzip-bomb", "long"],
)
def test_decode_report_errors(data: bytes, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad gzip, bad UTF-8, bad JSON (an integer too long to read among it) and over-large
    bodies are rejected with the reason."""
    monkeypatch.setattr(show, "MAX_REPORT_BYTES", 2**20)
    with pytest.raises(ReportError, match=re.escape(reason)):
        decode_report(data, "src")


@pytest.mark.parametrize(
    "data",
    [gz(GOOGLE), report_json(GOOGLE), b"\xef\xbb\xbf" + report_json(GOOGLE)],
    ids=["gzip", "json", "json-bom"],
)
def test_decode_report_by_content(data: bytes) -> None:
    """Gzip and plain JSON bodies (with or without a byte order mark) decode alike."""
    assert decode_report(data, "src").report_id == GOOGLE["report-id"]


HOSTILE_VALUES = st.sampled_from(
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        2**53,
        2**53 + 1,
        int("9" * 4300),
        "\ud800",
        "a\udcffb",
    ]
)
"""Values that once got past parse_report or broke it: dates out of range in UTC, counts
too large to add up and print, lone surrogates (which no UTF-8 output can hold)."""

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every member path in a decoded JSON value."""
    items = (
        enumerate(node)
        if isinstance(node, list)
        else node.items()
        if isinstance(node, dict)
        else ()
    )
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


@st.composite
def mutated_reports(draw: st.DrawFn) -> Any:
    """One of the sample reports with one member replaced by an arbitrary JSON value, half
    of the time one of the L{HOSTILE_VALUES}."""
    report = copy.deepcopy(draw(st.sampled_from([OWN_2, GOOGLE, MICROSOFT, MAILRU, SYS4])))
    *parents, last = draw(st.sampled_from(list(_paths(report))))
    node = report
    for key in parents:
        node = node[key]
    node[last] = draw(HOSTILE_VALUES | JSON_VALUES)
    return report


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON_VALUES, mutated_reports()))
def test_parse_report_only_raises_report_error(obj: Any) -> None:
    """Whatever JSON value it is given, parse_report returns a report or raises ReportError;
    a report it returns can be summarised and printed every way."""
    try:
        report = parse_report(obj, "src")
    except ReportError as e:
        assert str(e).encode("utf-8")
    else:
        assert all(p.successful >= 0 and p.failed >= 0 for p in report.policies)
        summary = summarise(Collection(reports=[report]))
        for output in (render_text(summary), render_json(summary), render_html(summary)):
            assert output.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_messages_are_never_fatal(data: st.DataObject) -> None:
    """A report mail with bytes changed, cut or inserted anywhere gives reports or reasons,
    never an exception."""
    message = bytearray(own_message(OWN_1))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(message)))
        end = data.draw(st.integers(at, min(len(message), at + 8)))
        message[at:end] = data.draw(st.binary(max_size=8))
    results = reports_in_message(bytes(message), "m.eml")
    assert results
    assert all(isinstance(r, Report | Skipped) for r in results)
    assert render_json(summarise(collection_of(results))).encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64).map(lambda b: gz(OWN_1)[:20] + b) | st.binary(max_size=64))
def test_decode_report_only_raises_report_error(data: bytes) -> None:
    """Arbitrary bytes, gzip-looking or not, are rejected with a ReportError, never another
    exception."""
    with pytest.raises(ReportError):
        decode_report(data, "src")


# --- Mail messages --------------------------------------------------------------------------


def _forwarded() -> bytes:
    outer = EmailMessage(policy=email.policy.SMTP)
    outer["From"] = "postmaster@example.net"
    outer["Subject"] = "Fwd: a TLS report"
    outer.set_content("Forwarding this one.\n")
    inner = email.message_from_bytes(own_message(OWN_1), policy=email.policy.SMTP)
    outer.add_attachment(inner)
    return outer.as_bytes()


def _single_part() -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "reports@sender.example"
    msg.set_content(gz(OWN_1), maintype="application", subtype="tlsrpt+gzip")
    return msg.as_bytes()


@pytest.mark.parametrize(
    "data",
    [
        own_message(OWN_1),
        google_message(OWN_1),
        mime_message(gz(OWN_1), "application", "tlsrpt+gzip", "r.json.gz").as_bytes(),
        mime_message(report_json(OWN_1), "application", "tlsrpt+json", "r.json").as_bytes(),
        mime_message(
            report_json(OWN_1), "application", "tlsrpt+json", cte="quoted-printable"
        ).as_bytes(),
        mime_message(gz(OWN_1), "application", "gzip").as_bytes(),
        mime_message(gz(OWN_1), "application", "octet-stream", "x!y!1!2.json.gz").as_bytes(),
        mime_message(report_json(OWN_1), "application", "octet-stream", "report.JSON").as_bytes(),
        mime_message(gz(OWN_1), "application", "tlsrpt+json").as_bytes(),
        _single_part(),
        _forwarded(),
    ],
    ids=[
        "own",
        "google-layout",
        "tlsrpt-gzip",
        "tlsrpt-json-base64",
        "tlsrpt-json-quoted-printable",
        "application-gzip",
        "octet-stream-json-gz-name",
        "octet-stream-json-name",
        "gzip-labelled-json",
        "single-part",
        "forwarded",
    ],
)
def test_report_in_message(data: bytes) -> None:
    """The report is taken from a message whatever its MIME wrapping and declared type."""
    results = reports_in_message(data, "m.eml")
    assert [type(r) for r in results] == [Report]
    assert isinstance(results[0], Report)
    assert results[0].report_id == OWN_1["report-id"]
    assert results[0].source == "m.eml"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"From: a@example.net\r\nSubject: hello\r\n\r\nNo report here.\r\n",
            "no TLS-RPT report in the message (parts: text/plain)",
        ),
        (
            mime_message(b"%PDF-1.4", "application", "pdf", "report.pdf").as_bytes(),
            "no TLS-RPT report in the message (parts: application/pdf, text/plain)",
        ),
        (
            mime_message(b"\x1f\x8b\x08junk", "application", "tlsrpt+gzip", "r.json.gz").as_bytes(),
            "bad gzip data",
        ),
        (
            mime_message(b'{"policies": []}', "application", "tlsrpt+json").as_bytes(),
            "report: missing organization-name",
        ),
    ],
    ids=["text-only", "other-attachment", "bad-gzip", "missing-fields"],
)
def test_message_without_readable_report(data: bytes, reason: str) -> None:
    """A message with no report part, or a bad one, is skipped with the reason."""
    (result,) = reports_in_message(data, "m.eml")
    assert isinstance(result, Skipped)
    assert result.source == "m.eml"
    assert result.reason.startswith(reason)


def _nested(depth: int, kind: str) -> bytes:
    """A message whose only text part lies C{depth} multiparts or forwarded messages deep."""
    if kind == "multipart":
        head = b"From: a@example.net\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
        parts = b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(depth)
        )
        return head + parts + b"--b%d\r\nContent-Type: text/plain\r\n\r\nx\r\n" % depth
    forward = b"From: a@example.net\r\nContent-Type: message/rfc822\r\n\r\n"
    return forward * depth + b"From: a@example.net\r\n\r\nx\r\n"


@pytest.mark.parametrize("kind", ["multipart", "rfc822"])
def test_deeply_nested_message_is_skipped(kind: str) -> None:
    """A message nested a thousand levels deep is skipped with a reason, not a traceback."""
    (result,) = reports_in_message(_nested(1000, kind), "m.eml")
    assert result == Skipped("m.eml", "unreadable mail message: parts nested too deeply")


def test_message_with_two_reports() -> None:
    """Each report part of one message is read, its source naming the attachment."""
    msg = mime_message(gz(OWN_1), "application", "tlsrpt+gzip", "one.json.gz")
    msg.add_attachment(gz(OWN_2), maintype="application", subtype="tlsrpt+gzip")
    results = reports_in_message(msg.as_bytes(), "m.eml")
    assert [(r.source, r.report_id) for r in results if isinstance(r, Report)] == [
        ("m.eml (one.json.gz)", OWN_1["report-id"]),
        ("m.eml (application/tlsrpt+gzip)", OWN_2["report-id"]),
    ]


# --- Files, mailboxes, directories ----------------------------------------------------------


def test_maildir_mbox_and_files(tmp_path: Path) -> None:
    """Maildir (new/ and cur/), mbox and report files are read; the same report seen twice is
    counted once, and unreadable messages are listed with their place."""
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=True)
    maildir.add(own_message(OWN_1))
    seen = mailbox.MaildirMessage(google_message(GOOGLE))
    seen.set_subdir("cur")
    maildir.add(seen)
    maildir.add(b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n")
    maildir.close()
    box = mailbox.mbox(tmp_path / "reports.mbox")
    box.add(own_message(OWN_2))
    box.add(mime_message(b"\x1f\x8bjunk", "application", "tlsrpt+gzip").as_bytes())
    box.add(mime_message(gz(OWN_1), "application", "tlsrpt+gzip").as_bytes())
    box.flush()
    box.close()
    saved = write(tmp_path / "saved" / "example.org!example.net!1!2!1.json.gz", gz(OWN_2))

    result = read_all(tmp_path / "Maildir", tmp_path / "reports.mbox", saved)

    mbox = tmp_path / "reports.mbox"
    new = {b"hello" in p.read_bytes(): p for p in (tmp_path / "Maildir" / "new").iterdir()}
    (cur,) = (tmp_path / "Maildir" / "cur").iterdir()
    assert [(r.source, r.report_id) for r in result.reports] == [
        (str(new[False]), OWN_1["report-id"]),
        (str(cur), GOOGLE["report-id"]),
        (f"{mbox}, message 1", OWN_2["report-id"]),
    ]
    assert [s.source for s in result.skipped] == [str(new[True]), f"{mbox}, message 2"]
    assert result.skipped[0].reason == "no TLS-RPT report in the message (parts: text/plain)"
    assert result.skipped[1].reason.startswith("bad gzip data")
    assert [(d.source, d.report_id, d.first_source) for d in result.duplicates] == [
        (f"{mbox}, message 3", OWN_1["report-id"], str(new[False])),
        (str(saved), OWN_2["report-id"], f"{mbox}, message 1"),
    ]


def test_directory_is_searched(tmp_path: Path) -> None:
    """A directory that is not a Maildir gives its files and subdirectories' files, skipping
    hidden entries and links to directories."""
    write(tmp_path / "a" / "one.json", report_json(OWN_1))
    write(tmp_path / "a" / "deeper" / "two.eml", own_message(OWN_2))
    write(tmp_path / "a" / ".hidden.json", "not json")
    write(tmp_path / "a" / ".cache" / "x.json", "not json")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    result = read_all(tmp_path / "a")
    assert [r.source for r in result.reports] == [
        str(tmp_path / "a" / "deeper" / "two.eml"),
        str(tmp_path / "a" / "one.json"),
    ]
    assert result.skipped == []


MALFORMED_FILES = [
    ("bad.json", b"{nope", "bad JSON: Expecting property name enclosed in double quotes"),
    ("text.json.gz", report_json(GOOGLE), "not gzip data"),
    ("cut.json.gz", gz(GOOGLE)[:40], "bad gzip data"),
    ("fields.json", b'{"organization-name": "X"}', "report: missing date-range"),
    (
        "string-count.json",
        report_json(_broken("policies.0.summary.total-failure-session-count", "2")),
        "not an integer",
    ),
    ("noreport.eml", b"From: a@example.net\r\n\r\nhi\r\n", "no TLS-RPT report in the message"),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00", "not a report, a mail message or an mbox"),
]


@pytest.mark.parametrize(
    ("name", "data", "reason"), MALFORMED_FILES, ids=[m[0] for m in MALFORMED_FILES]
)
def test_malformed_file_is_skipped(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    """A malformed input of each kind is listed with its path and reason, beside good ones."""
    good = write(tmp_path / "good.json.gz", gz(GOOGLE))
    bad = write(tmp_path / name, data)
    result = read_all(good, bad)
    assert [r.source for r in result.reports] == [str(good)]
    assert len(result.skipped) == 1
    assert result.skipped[0].source == str(bad)
    assert reason in result.skipped[0].reason


def test_mbox_message_over_the_size_cap_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An mbox message over the size cap of a message file is skipped with the same reason,
    and the messages after it are read."""
    monkeypatch.setattr(show, "MAX_REPORT_BYTES", 2**19)
    padding = (b"x" * 1023 + b"\n") * 1024
    box = mailbox.mbox(tmp_path / "reports.mbox")
    box.add(own_message(OWN_1))
    box.add(own_message(OWN_2) + padding)
    box.add(google_message(GOOGLE))
    box.flush()
    box.close()
    big = write(tmp_path / "big.eml", own_message(OWN_2) + padding)
    result = read_all(tmp_path / "reports.mbox", big)
    assert [r.report_id for r in result.reports] == [OWN_1["report-id"], GOOGLE["report-id"]]
    assert result.skipped == [
        Skipped(f"{tmp_path / 'reports.mbox'}, message 2", "larger than 1 MiB"),
        Skipped(str(big), "larger than 1 MiB"),
    ]


def test_undecodable_names_are_escaped(tmp_path: Path) -> None:
    """A file name that is not UTF-8 is shown with its bytes escaped, so the JSON and HTML
    outputs can be written as UTF-8."""
    directory = os.fsencode(tmp_path)
    with open(directory + b"/\xff.json", "wb") as f:
        f.write(report_json(OWN_1))
    with open(directory + b"/\xfe.mbox", "wb") as f:
        f.write(b"From a@example.net Mon Jan  1 00:00:00 2024\n" + own_message(OWN_2))
    with open(directory + b"/\xfd.json", "wb") as f:
        f.write(b"{")
    result = read_all(tmp_path)
    assert [r.source for r in result.reports] == [
        f"{tmp_path}/\\xfe.mbox, message 1",
        f"{tmp_path}/\\xff.json",
    ]
    assert [s.source for s in result.skipped] == [f"{tmp_path}/\\xfd.json"]
    summary = summarise(result)
    for output in (render_json(summary), render_html(summary), render_text(summary)):
        assert output.encode("utf-8")


def test_unreadable_path_is_skipped(tmp_path: Path) -> None:
    """A path that cannot be opened (here a link to nothing) is listed with the system's
    reason, not raised."""
    link = tmp_path / "gone.json"
    link.symlink_to(tmp_path / "nowhere.json")
    assert read_all(link).skipped == [Skipped(str(link), "cannot read: No such file or directory")]


# --- The summary ----------------------------------------------------------------------------


def test_summary_json_shape() -> None:
    """The JSON summary has the documented shape, with overlapping details and undetailed
    failures kept apart from the summary counts."""
    collection = reports_of([OWN_1, MAILRU, MICROSOFT])
    collection.skipped.append(Skipped("bad.json", "bad JSON: x"))
    assert summarise(collection) == {
        "format": "postfix-mtasts-show/1",
        "date-range": {
            "start-datetime": "2026-11-20T00:00:00Z",
            "end-datetime": "2026-11-23T00:00:00Z",
            "first-day": "2026-11-20",
            "last-day": "2026-11-22",
        },
        "totals": {"reports": 3, "successful": 355, "failed": 6},
        "organizations": [
            {
                "organization-name": "Microsoft Corporation",
                "reports": 1,
                "successful": 315,
                "failed": 3,
            },
            {"organization-name": "Example Org", "reports": 1, "successful": 40, "failed": 2},
            {"organization-name": "Mail.ru", "reports": 1, "successful": 0, "failed": 1},
        ],
        "policy-domains": [
            {
                "policy-domain": "example.net",
                "policy-types": ["no-policy-found", "sts"],
                "successful": 355,
                "failed": 6,
            }
        ],
        "result-types": [
            {"result-type": "certificate-expired", "failed": 3},
            {"result-type": "sts-policy-fetch-error", "failed": 2},
            {"result-type": None, "failed": 2},
        ],
        "mx-hosts": [
            {
                "receiving-mx-hostname": "mx1.example.net",
                "failed": 3,
                "result-types": ["certificate-expired"],
            }
        ],
        "receiving-ips": [
            {
                "receiving-ip": "192.0.2.25",
                "failed": 2,
                "receiving-mx-hostnames": ["mx1.example.net"],
            }
        ],
        "days": [
            {
                "day": "2026-11-20",
                "reports": 1,
                "successful": 40,
                "failed": 2,
                "result-types": [{"result-type": "certificate-expired", "failed": 2}],
            },
            {
                "day": "2026-11-22",
                "reports": 2,
                "successful": 315,
                "failed": 4,
                "result-types": [
                    {"result-type": "sts-policy-fetch-error", "failed": 2},
                    {"result-type": None, "failed": 2},
                    {"result-type": "certificate-expired", "failed": 1},
                ],
            },
        ],
        "reports": [
            {
                "source": "r0.json",
                "organization-name": "Example Org",
                "report-id": OWN_1["report-id"],
                "start-datetime": "2026-11-20T00:00:00Z",
                "end-datetime": "2026-11-20T23:59:59Z",
                "successful": 40,
                "failed": 2,
            },
            {
                "source": "r1.json",
                "organization-name": "Mail.ru",
                "report-id": MAILRU["report-id"],
                "start-datetime": "2026-11-22T00:00:00Z",
                "end-datetime": "2026-11-23T00:00:00Z",
                "successful": 0,
                "failed": 1,
            },
            {
                "source": "r2.json",
                "organization-name": "Microsoft Corporation",
                "report-id": MICROSOFT["report-id"],
                "start-datetime": "2026-11-22T00:00:00Z",
                "end-datetime": "2026-11-22T23:59:59Z",
                "successful": 315,
                "failed": 3,
            },
        ],
        "skipped": [{"source": "bad.json", "reason": "bad JSON: x"}],
        "duplicates": [],
    }


EXPECTED_TEXT = """\
5 TLS-RPT reports from 4 organizations, 2026-11-20 to 2026-11-22 (UTC)
Sessions: 516 successful, 10 failed (1.9% failed)

Organization           Reports  Successful  Failed  Failed %
Example Org                  2          81       4      4.7%
Microsoft Corporation        1         315       3      0.9%
Google Inc.                  1         120       2      1.6%
Mail.ru                      1           0       1    100.0%

Policy domain  Successful  Failed  Failed %  Policy
example.net           396       8      2.0%  no-policy-found, sts
example.com           120       2      1.6%  sts

Result type                Failed
certificate-expired             4
certificate-host-mismatch       2
sts-policy-fetch-error          2
(no details)                    2
starttls-not-supported          1

Failing MX host  Failed  Result types
mx1.example.net       4  certificate-expired
mx.example.com        2  certificate-host-mismatch
mx2.example.net       1  starttls-not-supported

Receiving IP  Failed  MX hosts
192.0.2.25         3  mx1.example.net
192.0.2.26         2  mx.example.com
2001:db8::25       1  mx2.example.net

Day         Reports  Successful  Failed  Failed %
2026-11-20        1          40       2      4.8%
2026-11-21        2         161       4      2.4%
2026-11-22        2         315       4      1.3%
"""


def test_text_output() -> None:
    """The text tables: totals, per organization, per policy domain, per result type, failing
    MX hosts and addresses, and per day."""
    assert render_text(summarise(reports_of(FIVE))) == EXPECTED_TEXT


def test_text_lists_skipped_and_duplicates() -> None:
    """Skipped inputs and reports seen again are listed after the tables."""
    collection = reports_of([GOOGLE])
    collection.skipped.append(
        Skipped("x.eml", "no TLS-RPT report in the message (parts: text/plain)")
    )
    collection.duplicates.append(
        show.Duplicate("y.json", "Google Inc.", "id1", "x.mbox, message 2")
    )
    text = render_text(summarise(collection))
    assert text.endswith(
        "\nSkipped inputs (1):\n"
        "  x.eml: no TLS-RPT report in the message (parts: text/plain)\n"
        "\nSeen again, counted once (1):\n"
        "  y.json: report-id id1 (first read from x.mbox, message 2)\n"
    )


def test_text_without_reports() -> None:
    """With nothing read, the text says so and lists what was skipped."""
    collection = Collection(skipped=[Skipped("a.json", "bad JSON: x")])
    assert render_text(summarise(collection)) == (
        "No TLS-RPT report was read.\n\nSkipped inputs (1):\n  a.json: bad JSON: x\n"
    )


def test_text_fits_80_columns_and_escapes_control_characters() -> None:
    """Long names are shortened to keep every line within 80 columns, and control characters
    from a report cannot reach the terminal."""
    report = copy.deepcopy(GOOGLE)
    report["organization-name"] = "Evil\x1b[2J Org " + "x" * 100
    report["policies"][0]["failure-details"][0]["receiving-mx-hostname"] = "m" * 90 + ".example"
    text = render_text(summarise(reports_of([report])))
    assert "\x1b" not in text
    assert "Evil\\x1b[2J Org xxx" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "mmm…" in text


def test_json_output_round_trips() -> None:
    """--json prints the summary object as JSON."""
    summary = summarise(reports_of(FIVE))
    assert json.loads(render_json(summary)) == summary


# --- The command ----------------------------------------------------------------------------


def run_main(*args: str, as_json: bool = False, html: str | None = None) -> tuple[int, str, str]:
    """Run show.main; return its exit status, output and errors."""
    out, err = io.StringIO(), io.StringIO()
    code = show.main(list(args), as_json=as_json, html=html, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_main_all_read(tmp_path: Path) -> None:
    """Exit 0 when every input was read; the text goes to the output, nothing to errors."""
    for i, report in enumerate(FIVE):
        write(tmp_path / f"r{i}.json.gz", gz(report))
    assert run_main(str(tmp_path)) == (0, EXPECTED_TEXT, "")


def test_main_json_and_html(tmp_path: Path) -> None:
    """--json prints the summary and --html writes the page beside it."""
    write(tmp_path / "in" / "g.json", report_json(GOOGLE))
    page = tmp_path / "out.html"
    code, out, err = run_main(str(tmp_path / "in"), as_json=True, html=str(page))
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert summary["totals"] == {"reports": 1, "successful": 120, "failed": 2}
    assert page.read_text(encoding="utf-8") == render_html(summary)


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ({"g.json": report_json(GOOGLE), "bad.json": b"{"}, 1),
        ({"bad.json": b"{"}, 1),
        ({}, 1),
    ],
    ids=["some-skipped", "all-skipped", "empty-directory"],
)
def test_main_exit_one(tmp_path: Path, files: dict[str, bytes], code: int) -> None:
    """Exit 1 when an input was skipped or no report was found; the output still summarises."""
    (tmp_path / "in").mkdir()
    for name, data in files.items():
        write(tmp_path / "in" / name, data)
    got, out, err = run_main(str(tmp_path / "in"))
    assert (got, err) == (code, "")
    assert out


def test_show_command(tmp_path: Path) -> None:
    """`postfix-mtasts show` runs without a configuration and prints the same summary."""
    for i, report in enumerate(FIVE):
        write(tmp_path / f"r{i}.json.gz", gz(report))
    env = {**os.environ, "POSTFIX_MTASTS_CONFIG": str(tmp_path / "missing.toml")}
    result = subprocess.run(
        [sys.executable, "-m", "postfix_mtasts.cli", "show", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, EXPECTED_TEXT, "")


def test_main_missing_path(tmp_path: Path) -> None:
    """A path that does not exist is a usage error: exit 2, one line naming it, no output."""
    write(tmp_path / "g.json", report_json(GOOGLE))
    missing = tmp_path / "nope.json"
    assert run_main(str(tmp_path / "g.json"), str(missing)) == (
        2,
        "",
        f"postfix-mtasts show: no such file or directory: {missing}\n",
    )


def test_main_unwritable_html(tmp_path: Path) -> None:
    """An --html path that cannot be written is a usage error naming it."""
    write(tmp_path / "g.json", report_json(GOOGLE))
    page = tmp_path / "no-such-dir" / "out.html"
    assert run_main(str(tmp_path / "g.json"), html=str(page)) == (
        2,
        "",
        f"postfix-mtasts show: cannot write --html {page}: No such file or directory\n",
    )


# --- The HTML page --------------------------------------------------------------------------

HOSTILE_NAME = '</script><script>alert(1)</script><img src="https://attacker.example/x.png">'


def hostile_report() -> dict[str, Any]:
    """A report whose organization name tries to inject markup into the page."""
    report = copy.deepcopy(MICROSOFT)
    report["organization-name"] = HOSTILE_NAME
    report["report-id"] = "hostile-1"
    report["policies"] = report["policies"][1:]
    report["policies"][0]["summary"]["total-successful-session-count"] = 7
    return report


class _Markup(HTMLParser):
    """Collects the elements, attributes, styles and scripts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.texts: dict[str, list[str]] = {"style": [], "script": []}
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.update(name for name, _ in attrs)
        self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] in self.texts:
            self.texts[self._open[-1]].append(data)


def test_html_is_self_contained() -> None:
    """The page has no element or attribute that loads anything, forbids loading anything,
    escapes report text, and embeds the summary as JSON."""
    summary = summarise(reports_of([*FIVE, hostile_report()]))
    page = render_html(summary)
    markup = _Markup()
    markup.feed(page)
    assert set(markup.tags) <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "section", "div",
        "span", "ul", "li", "svg", "noscript", "table", "thead", "tbody", "tr", "th", "td",
        "script",
    }  # fmt: skip
    assert not markup.attributes & {"src", "href", "srcset", "action", "data", "poster", "style"}
    assert markup.tags.count("script") == 2
    css = "".join(markup.texts["style"])
    assert "url(" not in css
    assert "@import" not in css
    data, script = markup.texts["script"]
    assert json.loads(data) == summary
    assert "<" not in data
    script = script.replace('"http://www.w3.org/2000/svg"', "")  # a namespace name, not a URL
    assert not re.search(r"https?:|fetch\(|XMLHttpRequest|import\(|\.src\b", script)
    assert "content=\"default-src 'none';" in page


def test_html_without_reports() -> None:
    """With nothing read, the page says so and lists the skipped inputs."""
    page = render_html(summarise(Collection(skipped=[Skipped("a.json", "bad <JSON>")])))
    assert '<p id="range">No TLS-RPT report was read.</p>' in page
    assert "<td>a.json</td><td>bad &lt;JSON&gt;</td>" in page


def _above_four(fd: int) -> int:
    """Return a duplicate of C{fd} numbered 10 or more, closing C{fd}."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
        # Nothing the browser might try on its own reaches a real network.
        "--host-resolver-rules=MAP * ~NOTFOUND",
    )

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's redirections must not clobber each other: pass fds numbered above 4.
        to_browser_r, from_browser_w = (_above_four(fd) for fd in (to_browser_r, from_browser_w))
        args = [executable, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self._process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}', *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self, wanted: Any, deadline: float) -> dict[str, Any]:
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message: dict[str, Any] = json.loads(raw)
                if wanted(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed the pipe")
                self._buffer += chunk

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result."""
        self._last_id += 1
        ident = self._last_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        answer = self._receive(lambda m: m.get("id") == ident, time.monotonic() + 60)
        assert "error" not in answer, answer
        result: dict[str, Any] = answer["result"]
        return result

    def load(self, url: str, before: str = "") -> tuple[str, Any]:
        """Open C{url} in the first tab and wait for its load event; return the session and a
        function evaluating a JavaScript expression there. C{before}: a script to run before
        the page's own."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)[
            "sessionId"
        ]
        for domain in ("Network", "Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session)
        if before:
            self.call("Page.addScriptToEvaluateOnNewDocument", session, source=before)
        self.call("Page.navigate", session, url=url)
        self._receive(lambda m: m.get("method") == "Page.loadEventFired", time.monotonic() + 60)

        def evaluate(expression: str) -> Any:
            result = self.call(
                "Runtime.evaluate", session, expression=expression, returnByValue=True
            )
            assert "exceptionDetails" not in result, result
            return result["result"]["value"]

        return session, evaluate

    def requests(self) -> list[str]:
        """The URLs of every request the page made."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def problems(self) -> list[dict[str, Any]]:
        """Script exceptions, error-level log entries (CSP violations among them), dialogs."""
        return [
            e
            for e in self.events
            if e.get("method") in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]

    def close(self) -> None:
        """Close the browser, or kill its process group if it does not go."""
        try:
            if self._process.poll() is None:
                try:
                    self.call("Browser.close")
                    self._process.wait(30)
                except (OSError, EOFError, TimeoutError, subprocess.TimeoutExpired):
                    pass
        finally:
            if self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A fresh headless Chromium; missing, it fails the test under CI and skips it elsewhere."""
    executable = shutil.which("chromium")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (Debian: apt-get install chromium)")
        pytest.skip("chromium is not installed")
    b = Browser(executable, tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


def test_browser_sees_external_requests(browser: Browser, tmp_path: Path) -> None:
    """The harness does see a page's external request, so its absence below means something."""
    page = write(tmp_path / "control.html", '<p>x</p><img src="http://example.invalid/x.png">')
    browser.load(page.as_uri())
    assert browser.requests() == [page.as_uri(), "http://example.invalid/x.png"]


def test_html_in_chromium(browser: Browser, tmp_path: Path) -> None:
    """In a real browser the page shows the totals, one bar per day and series with heights
    in proportion, the result types' stacks and legend; it requests nothing but itself, runs
    without errors, and report text cannot inject markup."""
    summary = summarise(reports_of([*FIVE, hostile_report()]))
    page = write(tmp_path / "report.html", render_html(summary))
    _session, evaluate = browser.load(page.as_uri())

    assert browser.requests() == [page.as_uri()]
    assert browser.problems() == []
    assert evaluate("document.documentElement.dataset.drawn") == "yes"
    assert evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert evaluate("document.querySelectorAll('script').length") == 2
    assert evaluate("document.getElementById('range').textContent") == (
        "6 reports from 5 organizations, 2026-11-20 to 2026-11-22 (UTC)"
    )
    totals = evaluate(
        "Array.from(document.querySelectorAll('#totals .total'))"
        ".map(e => [e.id, e.querySelector('.value').textContent])"
    )
    assert totals == [
        ["total-reports", "6"],
        ["total-successful", "523"],
        ["total-failed", "10"],
        ["total-rate", "1.9%"],
    ]
    organizations = evaluate(
        "Array.from(document.querySelectorAll('#organizations tbody tr'))"
        ".map(r => r.cells[0].textContent)"
    )
    assert HOSTILE_NAME in organizations

    bars = "Array.from(document.querySelectorAll('#{} rect.bar')).map(r => [r.dataset.day, \
r.dataset.series, Number(r.dataset.value), r.getBBox().height])"
    per_day = evaluate(bars.format("chart-days"))
    assert [b[:3] for b in per_day] == [
        ["2026-11-20", "successful", 40],
        ["2026-11-20", "failed", 2],
        ["2026-11-21", "successful", 161],
        ["2026-11-21", "failed", 4],
        ["2026-11-22", "successful", 322],
        ["2026-11-22", "failed", 4],
    ]
    ratios = {round(height / value, 6) for _, _, value, height in per_day if height > 2}
    assert len(ratios) == 1
    labels = evaluate(
        "Array.from(document.querySelectorAll('#chart-days .day-label')).map(t => t.textContent)"
    )
    assert labels == ["11-20", "11-21", "11-22"]

    stacks = evaluate(bars.format("chart-types"))
    assert sorted(tuple(b[:3]) for b in stacks) == sorted(
        (day["day"], t["result-type"] or "(no details)", t["failed"])
        for day in summary["days"]
        for t in day["result-types"]
    )
    assert all(height >= 2 for *_, height in stacks)
    legend = evaluate(
        "Array.from(document.querySelectorAll('#legend-types li')).map(l => l.textContent)"
    )
    assert legend == [
        "certificate-expired: 4",
        "certificate-host-mismatch: 2",
        "sts-policy-fetch-error: 2",
        "(no details): 2",
        "starttls-not-supported: 1",
    ]


COUNT_CALLBACKS = """
window.callbacks = 0;
var forEach = Array.prototype.forEach;
Array.prototype.forEach = function (callback, self) {
  return forEach.call(this, function () {
    window.callbacks += 1;
    return callback.apply(this, arguments);
  }, self);
};
"""
"""Counts every callback that C{Array.prototype.forEach} makes: the page's unit of work."""


def test_chart_work_grows_linearly_with_result_types(browser: Browser, tmp_path: Path) -> None:
    """The result-type chart of a day with 300 distinct result types draws each once, with
    work in proportion to their number, not to its square."""
    types = 300
    details = [{"result-type": f"type-{i:03}", "failed-session-count": 1} for i in range(types)]
    summary = summarise(reports_of([_broken("policies.0.failure-details", details)]))
    page = write(tmp_path / "types.html", render_html(summary))
    _session, evaluate = browser.load(page.as_uri(), before=COUNT_CALLBACKS)
    assert browser.problems() == []
    assert evaluate("document.querySelectorAll('#chart-types rect.bar').length") == types
    assert evaluate("window.callbacks") < 50 * types
