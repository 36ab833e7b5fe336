"""Tests for postfix_mtasts.tlsrpt.report: the RFC 8460 report, its file name and Subject."""

from __future__ import annotations

import copy
import datetime
import gzip
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsedmarc import InvalidSMTPTLSReport, parse_report_file, parse_smtp_tls_report_json

from postfix_mtasts.tlsrpt.report import (
    POLICY_TYPES,
    RESULT_TYPES,
    FailureKey,
    PolicyCounts,
    PolicyKey,
    build_report,
    make_report_id,
    report_filename,
    report_gzip,
    report_json,
    report_subject,
    validate_report,
)

DAY = datetime.date(2026, 11, 22)
REPORT_ID = "20261122.example.net.k3j9x@example.org"
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mx1.example.net", "max_age: 604800")
STS = PolicyKey("sts", "example.net", STS_LINES, ("mx1.example.net",))
NONE = PolicyKey("no-policy-found", "example.net")
EXPIRED = FailureKey("certificate-expired", "mx1.example.net", "192.0.2.25", None)

# The reference's minimal report (reference/tlsrpt.md §2).
MINIMAL: dict[str, Any] = {
    "organization-name": "Example Org",
    "contact-info": "mailto:tlsrpt@example.org",
    "report-id": REPORT_ID,
    "date-range": {
        "start-datetime": "2026-11-22T00:00:00Z",
        "end-datetime": "2026-11-22T23:59:59Z",
    },
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-domain": "example.net",
                "policy-string": list(STS_LINES),
                "mx-host": ["mx1.example.net"],
            },
            "summary": {"total-successful-session-count": 41, "total-failure-session-count": 1},
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "receiving-mx-hostname": "mx1.example.net",
                    "receiving-ip": "192.0.2.25",
                    "failed-session-count": 1,
                }
            ],
        }
    ],
}


def check_with_parsedmarc(report: Mapping[str, Any]) -> None:
    """Assert that parsedmarc reads C{report} and finds the same policies and counts."""
    parsed = parse_smtp_tls_report_json(report_json(report))
    assert parsed["report_id"] == report["report-id"]
    assert parsed["begin_date"] == report["date-range"]["start-datetime"]
    got = [
        (
            p["policy_type"],
            p["policy_domain"],
            p["successful_session_count"],
            p["failed_session_count"],
        )
        for p in parsed["policies"]
    ]
    want = [
        (
            e["policy"]["policy-type"],
            e["policy"]["policy-domain"],
            e["summary"]["total-successful-session-count"],
            e["summary"]["total-failure-session-count"],
        )
        for e in report["policies"]
    ]
    assert got == want


def build(policies: Mapping[PolicyKey, PolicyCounts], **kwargs: Any) -> dict[str, Any]:
    """Build a report for DAY; check it with validate_report and parsedmarc on the way."""
    report = build_report(
        organization_name="Example Org",
        contact_info="mailto:tlsrpt@example.org",
        report_id=REPORT_ID,
        day=DAY,
        policies=policies,
        **kwargs,
    )
    assert validate_report(report) == []
    check_with_parsedmarc(report)
    return report


def only_policy(report: Mapping[str, Any]) -> dict[str, Any]:
    (element,) = report["policies"]
    assert isinstance(element, dict)
    return element


# --- Building (§2, §8) --------------------------------------------------------------------------


def test_reference_minimal_report() -> None:
    """An sts policy with successes and one failure gives the reference's minimal report."""
    report = build({STS: PolicyCounts(41, {EXPIRED: 1})})
    assert report == MINIMAL
    assert list(report) == [
        "organization-name",
        "date-range",
        "contact-info",
        "report-id",
        "policies",
    ]


def test_no_policy_found() -> None:
    """no-policy-found keeps policy-domain and omits policy-string and mx-host, even if given."""
    key = PolicyKey("no-policy-found", "example.net", ("stray",), ("mx.example.net",))
    element = only_policy(build({key: PolicyCounts(7)}))
    assert element == {
        "policy": {"policy-type": "no-policy-found", "policy-domain": "example.net"},
        "summary": {"total-successful-session-count": 7, "total-failure-session-count": 0},
        "failure-details": [],
    }


def test_sts_fetch_error_without_cached_policy() -> None:
    """An sts-policy-fetch-error with nothing cached omits policy-string and mx-host (§10)."""
    failure = FailureKey("sts-policy-fetch-error", None, None, "connection refused")
    element = only_policy(build({PolicyKey("sts", "example.net"): PolicyCounts(0, {failure: 3})}))
    assert element == {
        "policy": {"policy-type": "sts", "policy-domain": "example.net"},
        "summary": {"total-successful-session-count": 0, "total-failure-session-count": 3},
        "failure-details": [
            {
                "result-type": "sts-policy-fetch-error",
                "failed-session-count": 3,
                "failure-reason-code": "connection refused",
            }
        ],
    }


def test_tlsa_policy() -> None:
    """A tlsa policy gives its records as policy-string and never an mx-host."""
    key = PolicyKey("tlsa", "example.net", ("3 1 1 abcd",), ("mx.example.net",))
    element = only_policy(build({key: PolicyCounts(2)}))
    assert element["policy"] == {
        "policy-type": "tlsa",
        "policy-string": ["3 1 1 abcd"],
        "policy-domain": "example.net",
    }


def test_several_policies_sorted() -> None:
    """Several policies (a policy change at noon, unprotected sessions) each get an element."""
    later = PolicyKey(
        "sts",
        "example.net",
        (*STS_LINES[:2], "mx: mx2.example.net", STS_LINES[3]),
        ("mx2.example.net",),
    )
    report = build({later: PolicyCounts(5), NONE: PolicyCounts(1), STS: PolicyCounts(3)})
    assert [
        (e["policy"]["policy-type"], e["policy"].get("mx-host")) for e in report["policies"]
    ] == [
        ("no-policy-found", None),
        ("sts", ["mx1.example.net"]),
        ("sts", ["mx2.example.net"]),
    ]
    assert [e["summary"]["total-successful-session-count"] for e in report["policies"]] == [1, 3, 5]


def test_failure_details_one_entry_per_key() -> None:
    """Each distinct failure key is one entry, sorted, with counts summed into the summary."""
    failures = {
        FailureKey(
            "validation-failure", "mx2.example.net", "192.0.2.26", "wrong version number"
        ): 2,
        FailureKey(
            "certificate-not-trusted", "mx1.example.net", "192.0.2.25", "self-signed certificate"
        ): 4,
        FailureKey(
            "certificate-not-trusted", "mx1.example.net", "2001:db8::25", "self-signed certificate"
        ): 1,
        FailureKey("starttls-not-supported", "mx1.example.net", "192.0.2.25", None): 3,
    }
    element = only_policy(build({STS: PolicyCounts(10, failures)}))
    assert element["summary"] == {
        "total-successful-session-count": 10,
        "total-failure-session-count": 10,
    }
    assert [
        (d["result-type"], d.get("receiving-ip"), d["failed-session-count"])
        for d in element["failure-details"]
    ] == [
        ("certificate-not-trusted", "192.0.2.25", 4),
        ("certificate-not-trusted", "2001:db8::25", 1),
        ("starttls-not-supported", "192.0.2.25", 3),
        ("validation-failure", "192.0.2.26", 2),
    ]
    assert element["failure-details"][0] == {
        "result-type": "certificate-not-trusted",
        "receiving-mx-hostname": "mx1.example.net",
        "receiving-ip": "192.0.2.25",
        "failed-session-count": 4,
        "failure-reason-code": "self-signed certificate",
    }


def test_sending_mta_ip_on_every_entry() -> None:
    """A configured sending address appears in every failure entry, in canonical form."""
    failures = {EXPIRED: 1, FailureKey("starttls-not-supported", None, None, None): 2}
    element = only_policy(build({STS: PolicyCounts(0, failures)}, sending_mta_ip="2001:DB8:0::1"))
    assert [d["sending-mta-ip"] for d in element["failure-details"]] == [
        "2001:db8::1",
        "2001:db8::1",
    ]
    assert list(element["failure-details"][0]) == [
        "result-type",
        "sending-mta-ip",
        "receiving-mx-hostname",
        "receiving-ip",
        "failed-session-count",
    ]


@pytest.mark.parametrize("sending_mta_ip", [None, "", "not-an-address"])
def test_sending_mta_ip_omitted(sending_mta_ip: str | None) -> None:
    """Without a valid sending address the field is omitted, never null or empty."""
    element = only_policy(
        build({STS: PolicyCounts(0, {EXPIRED: 1})}, sending_mta_ip=sending_mta_ip)
    )
    assert "sending-mta-ip" not in element["failure-details"][0]


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        # Unknown optional values are omitted, never null or "".
        (FailureKey("validation-failure", None, None, None), {}),
        (FailureKey("validation-failure", "", "", ""), {}),
        # Normalised: lower case, A-labels, no trailing dot, canonical addresses.
        (
            FailureKey("validation-failure", "MX1.Example.NET.", "2001:DB8:0:0::25", "x"),
            {
                "receiving-mx-hostname": "mx1.example.net",
                "receiving-ip": "2001:db8::25",
                "failure-reason-code": "x",
            },
        ),
        (
            FailureKey("validation-failure", "mx.bücher.example", "[192.0.2.1]", None),
            {"receiving-mx-hostname": "mx.xn--bcher-kva.example", "receiving-ip": "192.0.2.1"},
        ),
        # Values that are not host names or addresses are dropped; the failure still counts.
        (FailureKey("validation-failure", "unknown", "192.0.2.300", None), {}),
        (FailureKey("validation-failure", "bad_host.example", "mx.example.net", None), {}),
    ],
)
def test_failure_key_normalised(key: FailureKey, entry: dict[str, str]) -> None:
    """Failure keys' optional values are normalised, or omitted when absent or unusable."""
    element = only_policy(build({STS: PolicyCounts(0, {key: 2})}))
    assert element["failure-details"] == [
        {"result-type": "validation-failure", "failed-session-count": 2, **entry}
    ]


def test_keys_equal_after_normalisation_merge() -> None:
    """Keys that differ only in case, address spelling or "" vs None merge, counts summed."""
    failures = {
        FailureKey("certificate-expired", "mx1.example.net", "2001:db8::25", None): 1,
        FailureKey("certificate-expired", "MX1.example.net", "2001:DB8::25", ""): 2,
    }
    policies = {
        STS: PolicyCounts(1, failures),
        PolicyKey("sts", "EXAMPLE.net", STS_LINES, ("MX1.example.net",)): PolicyCounts(
            4, {EXPIRED: 1}
        ),
    }
    element = only_policy(build(policies))
    assert element["summary"] == {
        "total-successful-session-count": 5,
        "total-failure-session-count": 4,
    }
    assert [d["failed-session-count"] for d in element["failure-details"]] == [1, 3]


def test_u_label_policy_domain() -> None:
    """A U-label policy domain is written in A-labels, lower-cased."""
    element = only_policy(build({PolicyKey("no-policy-found", "Bücher.Example"): PolicyCounts(1)}))
    assert element["policy"]["policy-domain"] == "xn--bcher-kva.example"


def test_empty_policies_and_zero_counts_left_out() -> None:
    """Policies without sessions and zero failure counts do not appear."""
    report = build({STS: PolicyCounts(0, {EXPIRED: 0}), NONE: PolicyCounts(2, {EXPIRED: 0})})
    assert only_policy(report)["policy"]["policy-type"] == "no-policy-found"
    assert only_policy(report)["failure-details"] == []


@pytest.mark.parametrize(
    ("policies", "problem"),
    [
        ({}, "policies: empty array"),
        ({STS: PolicyCounts(0)}, "policies: empty array"),
        ({PolicyKey("dane", "example.net"): PolicyCounts(1)}, "policy-type"),
        ({PolicyKey("sts", "example"): PolicyCounts(1)}, "policy-domain"),
        ({PolicyKey("sts", ""): PolicyCounts(1)}, "policy-domain"),
        (
            {PolicyKey("sts", "example.net", STS_LINES, ("mx_1.example.net",)): PolicyCounts(1)},
            "mx-host",
        ),
        ({STS: PolicyCounts(-1, {EXPIRED: 1})}, "out of range"),
        ({STS: PolicyCounts(True)}, "not an integer"),
        ({STS: PolicyCounts(1, {EXPIRED: -2})}, "out of range"),
        (
            {STS: PolicyCounts(0, {FailureKey("certificate-mismatch", None, None, None): 1})},
            "result-type",
        ),
    ],
)
def test_build_refuses_bad_input(policies: dict[PolicyKey, PolicyCounts], problem: str) -> None:
    """Input that would make an invalid report raises ValueError naming the problem."""
    with pytest.raises(ValueError, match=problem):
        build(policies)


@pytest.mark.parametrize("field", ["organization_name", "contact_info", "report_id"])
def test_build_refuses_empty_top_level_text(field: str) -> None:
    """The configured names and the report id may not be empty."""
    values = {
        "organization_name": "Org",
        "contact_info": "mailto:a@example.org",
        "report_id": REPORT_ID,
    }
    values[field] = ""
    with pytest.raises(ValueError, match="empty string"):
        build_report(**values, day=DAY, policies={STS: PolicyCounts(1)})


@pytest.mark.parametrize(
    ("day", "start", "end"),
    [
        (datetime.date(2026, 11, 22), "2026-11-22T00:00:00Z", "2026-11-22T23:59:59Z"),
        (datetime.date(2028, 2, 29), "2028-02-29T00:00:00Z", "2028-02-29T23:59:59Z"),
        (datetime.date(2026, 12, 31), "2026-12-31T00:00:00Z", "2026-12-31T23:59:59Z"),
    ],
)
def test_date_range(day: datetime.date, start: str, end: str) -> None:
    """The date range is the whole UTC day, T00:00:00Z to T23:59:59Z (Decision)."""
    report = build_report(
        organization_name="Org",
        contact_info="mailto:a@example.org",
        report_id=REPORT_ID,
        day=day,
        policies={STS: PolicyCounts(1)},
    )
    assert report["date-range"] == {"start-datetime": start, "end-datetime": end}


def test_rebuild_is_byte_identical() -> None:
    """The same counters in any order give the same JSON and gzip bytes."""
    failures = {EXPIRED: 1, FailureKey("starttls-not-supported", "mx2.example.net", None, None): 2}
    policies = {STS: PolicyCounts(3, failures), NONE: PolicyCounts(4)}
    reordered = {NONE: PolicyCounts(4), STS: PolicyCounts(3, dict(reversed(failures.items())))}
    first, second = build(policies), build(reordered)
    assert report_json(first) == report_json(second)
    assert report_gzip(first) == report_gzip(second)


# --- JSON and gzip (§2, §5.2) ------------------------------------------------------------------


def test_report_json_compact_utf8() -> None:
    """The JSON is compact UTF-8, non-ASCII written as is, and reads back to the same object."""
    key = PolicyKey(
        "sts",
        "example.net",
        ("version: STSv1", "mode: enforce", "mx: mx1.example.net", "x_note: café"),
        ("mx1.example.net",),
    )
    report = build({key: PolicyCounts(1)})
    data = report_json(report)
    assert "café".encode() in data
    assert data.startswith(b'{"organization-name":"Example Org","date-range":{"start-datetime"')
    assert b"\n" not in data
    assert json.loads(data) == report


def test_report_json_refuses_non_i_json() -> None:
    """A lone surrogate or a NaN cannot be written as I-JSON: ValueError."""
    with pytest.raises(ValueError, match="Unicode"):
        report_json({"organization-name": "\ud800"})
    with pytest.raises(ValueError):
        report_json({"x": float("nan")})


def test_gzip_round_trip() -> None:
    """The gzip body decompresses to the JSON, has no timestamp, and parsedmarc reads the file."""
    report = build({STS: PolicyCounts(41, {EXPIRED: 1})})
    body = report_gzip(report)
    assert body[:2] == b"\x1f\x8b"
    assert body[4:8] == b"\x00\x00\x00\x00"  # MTIME = 0
    assert gzip.decompress(body) == report_json(report)
    parsed = parse_report_file(body, offline=True)
    assert parsed["report_type"] == "smtp_tls"
    assert parsed["report"]["report_id"] == REPORT_ID


# --- File name, report-id, Subject (§5.1, §5.3) -------------------------------------------------


@pytest.mark.parametrize(
    ("submitter", "domain", "day", "unique_id", "name"),
    [
        (
            "example.org",
            "example.net",
            DAY,
            "1",
            "example.org!example.net!1795305600!1795391999!1.json.gz",
        ),
        (
            "Example.ORG",
            "bücher.example",
            DAY,
            "k3j9x",
            "example.org!xn--bcher-kva.example!1795305600!1795391999!k3j9x.json.gz",
        ),
        (
            "example.org",
            "example.net",
            datetime.date(1970, 1, 1),
            "A1",
            "example.org!example.net!0!86399!A1.json.gz",
        ),
        (
            "example.org",
            "example.net",
            datetime.date(2028, 2, 29),
            "1",
            "example.org!example.net!1835395200!1835481599!1.json.gz",
        ),
    ],
)
def test_report_filename(
    submitter: str, domain: str, day: datetime.date, unique_id: str, name: str
) -> None:
    """The file name joins A-label domains, the day's first and last second, and the unique id."""
    assert report_filename(submitter, domain, day, unique_id) == name


def test_filename_bounds_are_the_day() -> None:
    """begin is the day's 00:00:00Z and end is 86399 seconds later."""
    name = report_filename("example.org", "example.net", DAY, "1")
    begin, end = (int(x) for x in name.split("!")[2:4])
    assert datetime.datetime.fromtimestamp(begin, datetime.UTC) == datetime.datetime(
        2026, 11, 22, tzinfo=datetime.UTC
    )
    assert datetime.datetime.fromtimestamp(end, datetime.UTC) == datetime.datetime(
        2026, 11, 22, 23, 59, 59, tzinfo=datetime.UTC
    )


@pytest.mark.parametrize(
    ("submitter", "domain", "unique_id", "problem"),
    [
        ("example.org", "example.net", "", "unique id"),
        ("example.org", "example.net", "a.b", "unique id"),
        ("example.org", "example.net", "a-b", "unique id"),
        ("example.org", "example.net", "é1", "unique id"),
        ("example.org", "example.net", "1\n", "unique id"),
        ("", "example.net", "1", "submitter"),
        ("example.org", "example.net!x", "1", "policy domain"),
        ("example.org", "a/b.example", "1", "policy domain"),
        ("example.org", "localhost", "1", "policy domain"),
    ],
)
def test_report_filename_refuses(submitter: str, domain: str, unique_id: str, problem: str) -> None:
    """Names that would break the §5.1 pattern (or a path) raise ValueError."""
    with pytest.raises(ValueError, match=problem):
        report_filename(submitter, domain, DAY, unique_id)


def test_make_report_id() -> None:
    """The report-id has the message-id shape of the reference's example."""
    assert make_report_id(DAY, "example.net", "example.org", "k3j9x") == REPORT_ID
    assert (
        make_report_id(DAY, "Bücher.example", "EXAMPLE.org", "Z9")
        == "20261122.xn--bcher-kva.example.Z9@example.org"
    )


@pytest.mark.parametrize("token", ["", "a.b", "a@b", "a b", "é"])
def test_make_report_id_refuses_bad_tokens(token: str) -> None:
    """A token that is not letters and digits raises ValueError."""
    with pytest.raises(ValueError, match="token"):
        make_report_id(DAY, "example.net", "example.org", token)


def test_report_subject() -> None:
    """The Subject has the §5.3 shape, the report-id in angle brackets."""
    assert report_subject("example.net", "example.org", REPORT_ID) == (
        "Report Domain: example.net Submitter: example.org"
        " Report-ID: <20261122.example.net.k3j9x@example.org>"
    )
    assert report_subject("bücher.example", "example.org", "1@x").startswith(
        "Report Domain: xn--bcher-kva.example "
    )


@pytest.mark.parametrize("report_id", ["", "a b", "<a>", "a>b", "a\r\nBcc: x"])
def test_report_subject_refuses_bad_ids(report_id: str) -> None:
    """A report-id that cannot sit inside angle brackets in a header raises ValueError."""
    with pytest.raises(ValueError, match="report id"):
        report_subject("example.net", "example.org", report_id)


def test_names_agree_with_the_json() -> None:
    """Subject, file name and JSON built from the same values agree (§5.6)."""
    report_id = make_report_id(DAY, "example.net", "example.org", "k3j9x")
    report = build({STS: PolicyCounts(1)})
    assert report["report-id"] == report_id
    assert report_id in report_subject("example.net", "example.org", report_id)
    name = report_filename(
        "example.org", report["policies"][0]["policy"]["policy-domain"], DAY, "k3j9x"
    )
    assert name.startswith("example.org!example.net!")


# --- The strict check (§9) --------------------------------------------------------------------

DELETE = object()


def valid_report() -> dict[str, Any]:
    """A valid report with an sts element (two failure kinds) and a no-policy-found element."""
    failures = {
        EXPIRED: 1,
        FailureKey(
            "validation-failure", "mx1.example.net", "2001:db8::25", "wrong version number"
        ): 2,
    }
    report = build(
        {STS: PolicyCounts(41, failures), NONE: PolicyCounts(3)}, sending_mta_ip="192.0.2.1"
    )
    assert report["policies"][1]["policy"]["policy-type"] == "sts"
    return report


def mutated(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """Return a valid report with the member at C{path} replaced by C{value} (or deleted)."""
    report = copy.deepcopy(valid_report())
    target: Any = report
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return report


P = ("policies", 1, "policy")
S = ("policies", 1, "summary")
F = ("policies", 1, "failure-details", 0)


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        # Top level.
        (("organization-name",), DELETE, "missing organization-name"),
        (("organization-name",), "", "organization-name: empty string"),
        (("organization-name",), None, "organization-name: not a string"),
        (("organization-name",), "\ud800", "organization-name: not valid Unicode"),
        (("contact-info",), None, "contact-info: not a string"),
        (("contact-info",), 5, "contact-info: not a string"),
        (("report-id",), DELETE, "missing report-id"),
        (("report-id",), "a b", "report-id"),
        (("report-id",), "<a@b>", "report-id"),
        (("extra",), 1, "unknown key 'extra'"),
        # The day's exact Z bounds.
        (("date-range",), DELETE, "missing date-range"),
        (("date-range",), "2026-11-22", "date-range: not an object"),
        (("date-range", "start-datetime"), "2026-11-22T00:00:00+00:00", "start-datetime"),
        (("date-range", "start-datetime"), "2026-11-22T00:00:01Z", "start-datetime"),
        (("date-range", "start-datetime"), "2026-02-30T00:00:00Z", "start-datetime"),
        (("date-range", "start-datetime"), 1795305600, "start-datetime"),
        (("date-range", "end-datetime"), "2026-11-23T00:00:00Z", "end-datetime"),
        (("date-range", "end-datetime"), "2026-11-22T23:59:59+00:00", "end-datetime"),
        (("date-range", "end-datetime"), "2026-11-21T23:59:59Z", "end-datetime"),
        (("date-range", "end-datetime"), DELETE, "end-datetime"),
        (("date-range", "timezone"), "UTC", "unknown key 'timezone'"),
        # Policies.
        (("policies",), DELETE, "missing policies"),
        (("policies",), {}, "policies: not an array"),
        (("policies",), [], "policies: empty array"),
        (("policies", 0), "x", "policies[0]: not an object"),
        (("policies", 0, "policy"), DELETE, "missing policy"),
        (("policies", 0, "policy", "policy-domain"), DELETE, "missing policy-domain"),
        ((*P, "policy-domain"), "Example.NET", "A-label"),
        ((*P, "policy-domain"), "bücher.example", "A-label"),
        ((*P, "policy-domain"), "", "empty string"),
        ((*P, "policy-domain"), None, "not a string"),
        ((*P, "policy-type"), "STS", "policy-type"),
        ((*P, "policy-type"), DELETE, "policy-type"),
        ((*P, "policy-string"), "version: STSv1", "policy-string: not an array"),
        ((*P, "policy-string"), [], "policy-string: empty array"),
        ((*P, "policy-string"), ["version: STSv1", ""], "policy-string[1]: empty string"),
        ((*P, "policy-string"), ["version: STSv1", None], "policy-string[1]: not a string"),
        ((*P, "policy-string"), DELETE, "mx-host given without policy-string"),
        ((*P, "mx-host"), "mx1.example.net", "mx-host: not an array"),
        ((*P, "mx-host"), [], "mx-host: empty array"),
        ((*P, "mx-host"), ["MX1.example.net"], "mx-host[0]"),
        ((*P, "mx-host"), ["*.*.example.net"], "mx-host[0]"),
        ((*P, "mx-host-pattern"), ["mx1.example.net"], "unknown key 'mx-host-pattern'"),
        ((*P, "policy-type"), "tlsa", "mx-host given for 'tlsa'"),
        (
            ("policies", 0, "policy", "policy-string"),
            ["x"],
            "policy-string given for no-policy-found",
        ),
        (
            ("policies", 0, "policy", "mx-host"),
            ["mx.example.net"],
            "mx-host given for 'no-policy-found'",
        ),
        # Summary: integer counts (a bool is not one), in range.
        (S, DELETE, "missing summary"),
        (S, [], "summary: not an object"),
        ((*S, "total-successful-session-count"), "41", "not an integer"),
        ((*S, "total-successful-session-count"), 41.0, "not an integer"),
        ((*S, "total-successful-session-count"), True, "not an integer"),
        ((*S, "total-successful-session-count"), None, "not an integer"),
        ((*S, "total-successful-session-count"), -1, "out of range"),
        ((*S, "total-successful-session-count"), 2**53, "out of range"),
        ((*S, "total-successful-session-count"), DELETE, "missing total-successful-session-count"),
        ((*S, "total-failure-session-count"), 4, "counts add up to 3, not 4"),
        ((*S, "total-failure-session-count"), False, "not an integer"),
        ((*S, "extra-count"), 1, "unknown key 'extra-count'"),
        (("policies", 0, "summary", "total-successful-session-count"), 0, "no sessions"),
        # Failure details.
        (("policies", 0, "failure-details"), DELETE, "missing failure-details"),
        (("policies", 1, "failure-details"), {}, "failure-details: not an array"),
        (F, "x", "failure-details[0]: not an object"),
        ((*F, "result-type"), "certificate-mismatch", "result-type"),
        ((*F, "result-type"), DELETE, "result-type"),
        ((*F, "failed-session-count"), 0, "out of range"),
        ((*F, "failed-session-count"), "1", "not an integer"),
        ((*F, "failed-session-count"), DELETE, "missing failed-session-count"),
        ((*F, "receiving-ip"), "192.0.2.256", "not an IP address"),
        ((*F, "receiving-ip"), "2001:DB8::25", "canonical"),
        ((*F, "receiving-ip"), "", "empty string"),
        ((*F, "sending-mta-ip"), None, "not a string"),
        ((*F, "receiving-mx-hostname"), "MX1.example.net", "A-label"),
        ((*F, "receiving-mx-hostname"), None, "not a string"),
        ((*F, "failure-reason-code"), "", "empty string"),
        ((*F, "receiving-mx-helo"), "", "empty string"),
        ((*F, "additional-info-uri"), "https://x.example/", "unknown key 'additional-info-uri'"),
        # Repeated entries.
        (
            ("policies", 1, "failure-details", 1),
            {
                "result-type": "certificate-expired",
                "sending-mta-ip": "192.0.2.1",
                "receiving-mx-hostname": "mx1.example.net",
                "receiving-ip": "192.0.2.25",
                "failed-session-count": 2,
            },
            "repeats an earlier entry",
        ),
        (
            ("policies", 0, "policy"),
            {
                "policy-type": "sts",
                "policy-string": list(STS_LINES),
                "policy-domain": "example.net",
                "mx-host": ["mx1.example.net"],
            },
            "repeats an earlier policy",
        ),
    ],
)
def test_validate_rejects(path: tuple[str | int, ...], value: object, problem: str) -> None:
    """Each kind of defect is reported, with the path of the offending member."""
    problems = validate_report(mutated(path, value))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("report", [None, [], "report", 1])
def test_validate_rejects_non_objects(report: object) -> None:
    """A report that is not a JSON object has one problem saying so."""
    assert validate_report(report) == [f"report: not an object ({type(report).__name__})"]


def test_validate_accepts_reference_and_optional_fields() -> None:
    """The reference's minimal report is valid, and so are the RFC's optional detail fields."""
    assert validate_report(MINIMAL) == []
    report = copy.deepcopy(MINIMAL)
    report["policies"][0]["failure-details"][0].update(
        {
            "receiving-mx-helo": "mx1.example.net",
            "additional-information": "https://example.org/tlsrpt/1",
            "failure-reason-code": "X509_V_ERR_CERT_HAS_EXPIRED",
            "sending-mta-ip": "2001:db8::1",
        }
    )
    report["policies"][0]["policy"]["mx-host"] = ["*.example.net", "mx1.example.net"]
    assert validate_report(report) == []


def test_parsedmarc_rejects_what_sys4_sends() -> None:
    """The consumer check is real: parsedmarc rejects a no-policy-found without policy-domain."""
    report = copy.deepcopy(MINIMAL)
    report["policies"][0] = {
        "policy": {"policy-type": "no-policy-found"},
        "summary": {"total-successful-session-count": 3, "total-failure-session-count": 0},
    }
    with pytest.raises(InvalidSMTPTLSReport):
        parse_smtp_tls_report_json(json.dumps(report))
    assert any("missing policy-domain" in p for p in validate_report(report))


# --- Built reports always validate --------------------------------------------------------------

_DOMAINS = st.sampled_from(
    ["example.net", "EXAMPLE.net", "example.net.", "bücher.example", "a.example"]
)
_HOSTS = st.one_of(
    st.none(),
    st.sampled_from(
        ["", "mx1.example.net", "MX1.example.net", "mx.bücher.example", "unknown", "a_b.example"]
    ),
)
_IPS = st.one_of(
    st.none(),
    st.just(""),
    st.just("not-an-ip"),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{str(ip).upper()}]"),
)
_FAILURES = st.builds(
    FailureKey,
    result_type=st.sampled_from(sorted(RESULT_TYPES)),
    mx_host=_HOSTS,
    mx_ip=_IPS,
    reason=st.one_of(st.none(), st.text(max_size=20)),
)
_POLICY_KEYS = st.builds(
    PolicyKey,
    policy_type=st.sampled_from(sorted(POLICY_TYPES)),
    policy_domain=_DOMAINS,
    policy_string=st.lists(st.text(max_size=12), max_size=4).map(tuple),
    mx_host=st.lists(
        st.sampled_from(["mx1.example.net", "*.example.net", "MX2.example.net"]), max_size=3
    ).map(tuple),
)
_COUNTS = st.builds(
    PolicyCounts,
    successes=st.integers(0, 10**6),
    failures=st.dictionaries(_FAILURES, st.integers(0, 10**6), max_size=5),
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(_POLICY_KEYS, _COUNTS, max_size=5),
    st.one_of(st.none(), st.ip_addresses().map(str)),
)
def test_built_reports_always_validate(
    policies: dict[PolicyKey, PolicyCounts], sending_mta_ip: str | None
) -> None:
    """Any counters give a report that validates and parsedmarc reads, with every session in it."""
    successes = sum(c.successes for c in policies.values())
    failures = sum(sum(c.failures.values()) for c in policies.values())
    if successes + failures == 0:
        with pytest.raises(ValueError, match="empty array"):
            build(policies, sending_mta_ip=sending_mta_ip)
        return
    report = build(policies, sending_mta_ip=sending_mta_ip)
    summaries = [e["summary"] for e in report["policies"]]
    assert sum(s["total-successful-session-count"] for s in summaries) == successes
    assert sum(s["total-failure-session-count"] for s in summaries) == failures
    rebuilt = build(dict(reversed(list(policies.items()))), sending_mta_ip=sending_mta_ip)
    assert report_gzip(rebuilt) == report_gzip(report)
