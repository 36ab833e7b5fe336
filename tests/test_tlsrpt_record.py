"""Tests for postfix_mtasts.tlsrpt.record: the _smtp._tls TXT record (RFC 8460 §3)."""

from __future__ import annotations

import pytest
from checkdmarc.smtp_tls_reporting import SMTPTLSReportingError, parse_smtp_tls_reporting_record
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.tlsrpt.record import (
    InvalidReportRecord,
    NoReportRecord,
    ReportRecord,
    ReportRecordError,
    is_domain_name,
    mailto_address,
    parse_tlsrpt_records,
)

MAILTO = b"mailto:tlsrpt@example.com"
RECORD = b"v=TLSRPTv1; rua=" + MAILTO


def parse(*records: bytes) -> ReportRecord:
    return parse_tlsrpt_records(list(records))


# --- Selection of the one candidate (§3.1) --------------------------------------------------


@pytest.mark.parametrize(
    "records",
    [
        [],
        [b"v=spf1 -all"],
        [b"v=tlsrptv1; rua=mailto:tlsrpt@example.com"],  # case-sensitive
        [b"V=TLSRPTv1; rua=mailto:tlsrpt@example.com"],
        [b"v=TLSRPTv1 rua=mailto:tlsrpt@example.com"],  # no delimiter after the version
        [b"v=TLSRPTv10; rua=mailto:tlsrpt@example.com"],
        [b"v=TLSRPTv1"],
        [b" v=TLSRPTv1; rua=mailto:tlsrpt@example.com"],  # must begin with the version
        [b"v = TLSRPTv1; rua=mailto:tlsrpt@example.com"],
        [b"v=STSv1; id=1", b"google-site-verification=abc"],
    ],
)
def test_no_candidate(records: list[bytes]) -> None:
    """Without a record beginning with exactly "v=TLSRPTv1" and a ";" the domain has no record."""
    with pytest.raises(NoReportRecord):
        parse_tlsrpt_records(records)


def test_two_candidates_are_invalid() -> None:
    """Two v=TLSRPTv1 records, even identical ones, mean no reports (exactly one must remain)."""
    with pytest.raises(InvalidReportRecord, match="2 v=TLSRPTv1 records"):
        parse(RECORD, RECORD)
    with pytest.raises(InvalidReportRecord):
        parse(RECORD, b"v=TLSRPTv1;rua=https://reports.example.com/")


def test_unrelated_records_are_discarded() -> None:
    """Records that are not candidates are ignored beside the one that is."""
    assert parse(b"v=spf1 -all", RECORD, b"v=tlsrptv1;rua=mailto:x@example.org").rua == (
        MAILTO.decode(),
    )


def test_errors_are_value_errors() -> None:
    """Both error kinds share one base class, itself a ValueError."""
    assert issubclass(NoReportRecord, ReportRecordError)
    assert issubclass(InvalidReportRecord, ReportRecordError)
    assert issubclass(ReportRecordError, ValueError)


# --- Record grammar (§3) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "rua"),
    [
        # The reference's examples.
        (b"v=TLSRPTv1; rua=mailto:tlsrpt@example.com", ["mailto:tlsrpt@example.com"]),
        (
            b"v=TLSRPTv1;rua=https://reports.example.com/v1/tlsrpt,mailto:tls@example.com",
            ["https://reports.example.com/v1/tlsrpt", "mailto:tls@example.com"],
        ),
        # Spaces and tabs around delimiters, before the first ";" included (Decision).
        (b"v=TLSRPTv1 ;rua=mailto:a@example.com", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1\t;\trua=mailto:a@example.com\t;\t", ["mailto:a@example.com"]),
        # An optional final delimiter.
        (b"v=TLSRPTv1;rua=mailto:a@example.com;", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1;rua=mailto:a@example.com ; ", ["mailto:a@example.com"]),
        # Several rua fields are merged in record order.
        (
            b"v=TLSRPTv1;rua=mailto:a@example.com;rua=https://r.example.com/",
            ["mailto:a@example.com", "https://r.example.com/"],
        ),
        (
            b"v=TLSRPTv1;rua=https://r.example.com/;x=1;rua=mailto:a@example.com",
            ["https://r.example.com/", "mailto:a@example.com"],
        ),
        # URIs split on "," with spaces or tabs around it.
        (
            b"v=TLSRPTv1;rua=mailto:a@example.com , https://r.example.com/ ,\tmailto:b@example.com",
            ["mailto:a@example.com", "https://r.example.com/", "mailto:b@example.com"],
        ),
        # Unknown, well-formed extension fields are ignored, wherever they stand.
        (b"v=TLSRPTv1;ext=1;rua=mailto:a@example.com;x.y_z-1=abc", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;" + b"e" * 32 + b"=1", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;RUA=mailto:b@example.com", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;v=TLSRPTv1", ["mailto:a@example.com"]),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ruf=mailto:b@example.com", ["mailto:a@example.com"]),
        # De-duplicated, first position kept; scheme, host and mail domain compared without case.
        (
            b"v=TLSRPTv1;rua=mailto:a@example.com,https://r.example.com/,mailto:a@example.com",
            ["mailto:a@example.com", "https://r.example.com/"],
        ),
        (
            b"v=TLSRPTv1;rua=MAILTO:a@EXAMPLE.com;rua=mailto:a@example.COM",
            ["MAILTO:a@EXAMPLE.com"],
        ),
        (
            b"v=TLSRPTv1;rua=mailto:a%2Bb@example.com,mailto:a+b@example.com",
            ["mailto:a%2Bb@example.com"],
        ),
        (
            b"v=TLSRPTv1;rua=https://R.example.com/x,https://r.EXAMPLE.com/x",
            ["https://R.example.com/x"],
        ),
        # Local parts and paths are case-sensitive: not duplicates.
        (
            b"v=TLSRPTv1;rua=mailto:A@example.com,mailto:a@example.com",
            ["mailto:A@example.com", "mailto:a@example.com"],
        ),
        (
            b"v=TLSRPTv1;rua=https://r.example.com/X,https://r.example.com/x",
            ["https://r.example.com/X", "https://r.example.com/x"],
        ),
    ],
)
def test_valid_records(record: bytes, rua: list[str]) -> None:
    """A valid record gives its usable URIs in record order, de-duplicated."""
    assert parse(record) == ReportRecord(rua=tuple(rua), skipped=())


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"v=TLSRPTv1;", "no rua field"),
        (b"v=TLSRPTv1; ", "no rua field"),
        (b"v=TLSRPTv1;ext=1", "no rua field"),
        (b"v=TLSRPTv1;RUA=mailto:a@example.com", "no rua field"),  # names are case-sensitive
        (b"v=TLSRPTv1;rua =mailto:a@example.com", "malformed field"),
        (b"v=TLSRPTv1;;rua=mailto:a@example.com", "empty field"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;;", "empty field"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;junk", "malformed field"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;-ext=1", "malformed field"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;" + b"e" * 33 + b"=1", "malformed field"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ext=a b", "malformed value"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ext=", "malformed value"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ext==", "malformed value"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ext=\xc3\xa9", "malformed value"),
        (b"v=TLSRPTv1;rua=mailto:a@example.com;ext=\x00", "malformed value"),
        # No usable URI at all.
        (b"v=TLSRPTv1;rua=", "no usable rua URI"),
        (b"v=TLSRPTv1;rua=postmaster@example.net", "no usable rua URI"),
        (b"v=TLSRPTv1;rua=http://r.example.com/,mailto:", "no usable rua URI"),
        (b"v=TLSRPTv1;rua= mailto:a@example.com", "no usable rua URI"),
    ],
)
def test_invalid_records(record: bytes, reason: str) -> None:
    """A candidate that breaks the grammar, lacks rua, or has no usable URI is invalid."""
    with pytest.raises(InvalidReportRecord, match=reason):
        parse(record)


def test_long_uri_is_cut_short_in_messages() -> None:
    """A long malformed URI is quoted in part, in the skip reason and in the error."""
    uri = "mailto:" + "a" * 5000 + "@localhost"
    with pytest.raises(InvalidReportRecord) as info:
        parse(b"v=TLSRPTv1;rua=" + uri.encode())
    assert len(str(info.value)) < 400
    record = parse(b"v=TLSRPTv1;rua=" + uri.encode() + b"," + MAILTO)
    assert record.skipped[0][0] == uri
    assert len(record.skipped[0][1]) < 200


def test_no_usable_uri_names_the_reasons() -> None:
    """The error for a record without a usable URI says why its URIs were skipped."""
    with pytest.raises(InvalidReportRecord) as info:
        parse(b"v=TLSRPTv1; rua=postmaster@example.net")
    assert "'postmaster@example.net': not a URI" in str(info.value)


def test_error_messages_are_bounded() -> None:
    """Quoted record text in an error is cut short and stays printable ASCII."""
    with pytest.raises(InvalidReportRecord) as info:
        parse(b"v=TLSRPTv1;" + b"\xff" * 500 + b";rua=" + MAILTO)
    message = str(info.value)
    assert len(message) < 600  # two quoted excerpts, not 2000 characters of escapes
    assert message.isascii()
    assert message.isprintable()


# --- Each URI on its own (§3; RFC 6068; RFC 3986) ---------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "mailto:tlsrpt@example.com",
        "MAILTO:tlsrpt@example.com",
        "Mailto:tlsrpt@sub.example.co.uk",
        "mailto:tls%2Brpt@example.com",
        "mailto:tls+rpt@example.com",
        "mailto:first.last@example.com",
        "mailto:%22john%20doe%22@example.com",  # quoted-string local part
        "mailto:a/b@example.com",  # "/" is atext
        "mailto:tlsrpt@xn--bcher-kva.example",
        "mailto:tlsrpt@b%C3%BCcher.example",  # RFC 6068 §2: percent-encoded UTF-8 U-label
        "mailto:tlsrpt@example.com?subject=TLS%20report",  # header fields: valid, ignored
        "mailto:tlsrpt@example.com?subject=a&body=b",
        "https://reports.example.com/v1/tlsrpt",
        "HTTPS://Reports.Example.com",
        "https://reports.example.com",
        "https://reports.example.com/",
        "https://reports.example.com?x=1",
        "https://reports.example.com:8443/x",
        "https://[2001:db8::1]/x",
        "https://192.0.2.1/x",
        "https://reports.example.com/a?b=c&d=%2C#frag",
        "https://reports.example.com/a:b@c/~d_e.f-g$h&i'j(k)l*m+n=o",
        "https://xn--bcher-kva.example/report",
    ],
)
def test_usable_uris(uri: str) -> None:
    """Well-formed mailto: and https: URIs are used as published."""
    assert parse(b"v=TLSRPTv1;rua=" + uri.encode()) == ReportRecord(rua=(uri,), skipped=())


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "empty URI"),
        # No scheme: the URI that once crashed a reporter.
        ("postmaster@example.net", "not a URI"),
        ("tlsrpt", "not a URI"),
        ("1mailto:a@example.com", "not a URI"),
        # Other schemes are unsupported.
        ("http://reports.example.com/", "unsupported scheme 'http'"),
        ("ftp://reports.example.com/", "unsupported scheme 'ftp'"),
        ("tel:+15555550100", "unsupported scheme 'tel'"),
        # Characters a tlsrpt-uri may not carry as they are.
        ("mailto:tlsrpt@example.com!10m", "'!' must be percent-encoded"),
        ("mailto:a b@example.com", "character ' '"),
        ("mailto:a{b}@example.com", "character '{'"),
        ('mailto:a"b@example.com', "character '\"'"),
        ("https://r.example.com/a b", "character ' '"),
        ("https://r.example.com/a\\b", "character '\\\\'"),
        ("mailto:a@example.com%ZZ", "malformed percent-encoding"),
        ("https://r.example.com/a%2", "malformed percent-encoding"),
        # mailto: exactly one addr-spec.
        ("mailto:", "no address"),
        ("mailto:?to=a@example.com", "no address"),
        ("mailto:postmaster", "no '@'"),
        ("mailto:a@b%2Cc@example.com", "malformed local part"),  # one URI, one address
        ("mailto:a..b@example.com", "malformed local part"),
        ("mailto:.a@example.com", "malformed local part"),
        ("mailto:a.@example.com", "malformed local part"),
        ("mailto:@example.com", "malformed local part"),
        ("mailto:%C3%A9@example.com", "malformed local part"),  # no SMTPUTF8 local parts
        ("mailto:a%FF@example.com", "not UTF-8"),
        ("mailto:a@[192.0.2.1]", "address literals"),
        ("mailto:a@localhost", "not a fully qualified"),
        ("mailto:a@example.com.", "not a fully qualified"),
        ("mailto:a@exa_mple.com", "not a fully qualified"),
        ("mailto:a@-example.com", "not a fully qualified"),
        ("mailto:a@192.0.2.1", "not a fully qualified"),
        ("mailto:a@", "not a fully qualified"),
        ("mailto:a@example.com#frag", "'#' is not allowed"),
        ("mailto:a@example.com?subject", "malformed header fields"),
        ("mailto:a@example.com?a=b/c", "malformed header fields"),
        # https: a valid URL with a host.
        ("https:/reports.example.com", "no '//' authority"),
        ("https:reports.example.com", "no '//' authority"),
        ("https://", "no host"),
        ("https:///path", "no host"),
        ("https://:443/", "no host"),
        ("https://user@reports.example.com/", "user information"),
        ("https://user:pw@reports.example.com/", "user information"),
        ("https://reports.example.com:0/", "bad port"),
        ("https://reports.example.com:65536/", "bad port"),
        ("https://reports.example.com:/", "bad port"),
        ("https://reports.example.com:https/", "bad port"),
        ("https://reports.example.com:443:443/", "malformed host"),
        ("https://localhost/", "not a fully qualified"),
        ("https://-bad.example.com/", "not a fully qualified"),
        ("https://r_1.example.com/", "not a fully qualified"),
        ("https://reports.example.com./", "not a fully qualified"),
        ("https://256.1.1.1/", "malformed IPv4"),
        ("https://[2001:db8::zz]/", "malformed IPv6"),
        ("https://[2001:db8::1/", "malformed host"),
        ("https://[fe80::1%25eth0]/", "malformed host"),
        ("https://re%70orts.example.com/", "malformed host"),
        ("https://reports.example.com/a#b#c", "malformed path"),
        ("https://reports.example.com/a[b]", "malformed path"),
    ],
)
def test_skipped_uris(uri: str, reason: str) -> None:
    """A malformed or unsupported URI is skipped with its reason; the others are still used."""
    record = parse(b"v=TLSRPTv1;rua=" + uri.encode() + b"," + MAILTO)
    assert record.rua == (MAILTO.decode(),)
    assert len(record.skipped) == 1
    skipped_uri, why = record.skipped[0]
    assert skipped_uri == uri
    assert reason in why


def test_non_ascii_uri_is_skipped() -> None:
    """A URI with raw non-ASCII bytes is skipped as not US-ASCII (IRIs are not URIs)."""
    record = parse("v=TLSRPTv1;rua=mailto:tlsrpt@bücher.example,".encode() + MAILTO)
    assert record.rua == (MAILTO.decode(),)
    assert record.skipped == (("mailto:tlsrpt@bücher.example", "not US-ASCII"),)


def test_skipped_keeps_record_order() -> None:
    """Skipped URIs are listed in record order, each once per occurrence."""
    record = parse(
        b"v=TLSRPTv1;rua=http://a.example/,mailto:x;rua=" + MAILTO + b",ftp://b.example/"
    )
    assert record.rua == (MAILTO.decode(),)
    assert [uri for uri, _ in record.skipped] == [
        "http://a.example/",
        "mailto:x",
        "ftp://b.example/",
    ]


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("mailto:tlsrpt@example.com", "tlsrpt@example.com"),
        ("MAILTO:TLSRPT@EXAMPLE.COM", "TLSRPT@example.com"),
        ("mailto:tls%2Brpt@example.com", "tls+rpt@example.com"),
        ("mailto:%22john%20doe%22@example.com", '"john doe"@example.com'),
        ("mailto:tlsrpt@b%C3%BCcher.example", "tlsrpt@xn--bcher-kva.example"),
        ("mailto:tlsrpt@example.com?subject=x", "tlsrpt@example.com"),
    ],
)
def test_mailto_address(uri: str, address: str) -> None:
    """mailto_address gives the percent-decoded addr-spec with an A-label, lower-case domain."""
    assert mailto_address(uri) == address


@pytest.mark.parametrize("uri", ["https://r.example.com/", "mailto:x", "x@example.com"])
def test_mailto_address_refuses(uri: str) -> None:
    """mailto_address raises ValueError for anything but a usable mailto: URI."""
    with pytest.raises(ValueError):
        mailto_address(uri)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("example.com", True),
        ("a.b", True),
        ("xn--bcher-kva.example", True),
        ("ab--cd.example.com", True),
        ("Example.com", False),  # lower-case only
        ("example.com.", False),
        ("localhost", False),
        ("192.0.2.1", False),
        ("xn--zz.example", False),  # not a valid A-label
        ("bücher.example", False),
        ("-a.example", False),
        ("a_b.example", False),
        ("", False),
        (".".join(["a" * 63] * 3 + ["b" * 61]), True),  # 253 octets
        (".".join(["a" * 63] * 3 + ["b" * 62]), False),
        ("a" * 64 + ".example", False),
    ],
)
def test_is_domain_name(name: str, valid: bool) -> None:
    """is_domain_name accepts lower-case A-label FQDNs of two labels or more, nothing else."""
    assert is_domain_name(name) is valid


# --- Cross-check with checkdmarc's offline parser ---------------------------------------------


def checkdmarc_rua(record: str) -> list[str] | None:
    """Return checkdmarc's rua URIs for C{record}, or C{None} if it rejects the record."""
    try:
        parsed = parse_smtp_tls_reporting_record(record)
    except SMTPTLSReportingError:
        return None
    return list(parsed["tags"]["rua"]["value"])


def ours(record: str) -> ReportRecord | None:
    try:
        return parse_tlsrpt_records([record.encode()])
    except ReportRecordError:
        return None


# URIs both parsers accept, and URIs both refuse.
GOOD_URIS = [
    "mailto:tlsrpt@example.com",
    "MAILTO:tlsrpt@example.com",
    "mailto:tls%2Brpt@example.com",
    "mailto:%22john%20doe%22@example.com",
    "mailto:tlsrpt@xn--bcher-kva.example",
    "https://reports.example.com/v1/tlsrpt",
    "HTTPS://Reports.Example.com",
    "https://reports.example.com:8443/x",
    "https://[2001:db8::1]/x",
    "https://192.0.2.1/x",
    "https://reports.example.com/a?b=c#d",
    "https://reports.example.com?x=1",
]
BAD_URIS = [
    "postmaster@example.net",
    "http://reports.example.com/",
    "mailto:tlsrpt@example.com!10m",
    "mailto:a@example.com%ZZ",
    "mailto:postmaster",
    "mailto:a@b%2Cc@example.com",
    "mailto:a..b@example.com",
    "mailto:a@[192.0.2.1]",
    "mailto:a@example.com#frag",
    "mailto:a@exa_mple.com",
    "mailto:a@example.com.",
    "mailto:a{b}@example.com",
    "https:/reports.example.com",
    "https://user@reports.example.com/",
    "https://reports.example.com:/",
    "https://[2001:db8::zz]/",
    "https://reports.example.com/a#b#c",
    "https://reports.example.com/a%2",
    "https://reports.example.com/a[b]",
]

# Where the two differ, on purpose. checkdmarc refuses the whole record for one bad URI, where
# this project skips that URI (§1); and the URI rules differ as listed.
STRICTER_HERE = {
    "mailto:a@localhost": "a report destination needs a fully qualified domain",
    "https://localhost/": "a report destination needs a fully qualified domain",
    "mailto:a@-example.com": "a label cannot begin with a hyphen",
    "https://-bad.example.com/": "a label cannot begin with a hyphen",
    "mailto:a%FF@example.com": "the decoded address must be UTF-8 (RFC 6068 §2)",
    "https://reports.example.com:0/": "no TCP port 0",
    "https://reports.example.com:65536/": "no TCP port above 65535",
    "https://256.1.1.1/": "not an IPv4 address",
}
LENIENT_HERE = {
    "mailto:tlsrpt@b%C3%BCcher.example": "RFC 6068 §2 allows percent-encoded UTF-8 domains",
    "mailto:tlsrpt@example.com?subject=TLS%20report": "RFC 6068 header fields (ignored)",
    "mailto:a/b@example.com": "'/' is atext (RFC 5322 §3.2.3)",
    "mailto:a%40example.com": "the to part is percent-decoded before it is parsed",
}


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_checkdmarc_agrees_on_good_uris(uri: str) -> None:
    """A URI checkdmarc accepts is usable here too, and appears the same in rua."""
    record = f"v=TLSRPTv1; rua={uri}"
    assert checkdmarc_rua(record) == [uri]
    assert ours(record) == ReportRecord(rua=(uri,), skipped=())


@pytest.mark.parametrize("uri", BAD_URIS)
def test_checkdmarc_agrees_on_bad_uris(uri: str) -> None:
    """A URI checkdmarc refuses is skipped here (its record alone gives no report)."""
    record = f"v=TLSRPTv1; rua={uri}"
    assert checkdmarc_rua(record) is None
    assert ours(record) is None
    assert ours(f"{record},mailto:x@example.com") == ReportRecord(
        rua=("mailto:x@example.com",), skipped=((uri, parse_skip_reason(uri)),)
    )


def parse_skip_reason(uri: str) -> str:
    record = parse(b"v=TLSRPTv1;rua=mailto:x@example.com," + uri.encode())
    return record.skipped[0][1]


@pytest.mark.parametrize("uri", sorted(STRICTER_HERE))
def test_stricter_than_checkdmarc(uri: str) -> None:
    """The URIs checkdmarc accepts but this project skips, each for a stated reason."""
    record = f"v=TLSRPTv1; rua={uri}"
    assert checkdmarc_rua(record) == [uri]
    assert ours(record) is None


@pytest.mark.parametrize("uri", sorted(LENIENT_HERE))
def test_more_lenient_than_checkdmarc(uri: str) -> None:
    """The URIs checkdmarc refuses but this project uses, each for a stated reason."""
    record = f"v=TLSRPTv1; rua={uri}"
    assert checkdmarc_rua(record) is None
    assert ours(record) == ReportRecord(rua=(uri,), skipped=())


@pytest.mark.parametrize(
    "record",
    [
        "v=TLSRPTv1 ;rua=mailto:a@example.com",
        "v=TLSRPTv1\t;\trua=mailto:a@example.com\t;\t",
        "v=TLSRPTv1;rua=mailto:a@example.com;",
        "v=TLSRPTv1;;rua=mailto:a@example.com",
        "v=TLSRPTv1;rua=mailto:a@example.com;;",
        "v=TLSRPTv1;",
        "v=TLSRPTv1;ext=1",
        "v=TLSRPTv1;RUA=mailto:a@example.com",
        "v=TLSRPTv1;ext=1;rua=mailto:a@example.com;x.y_z-1=abc",
        "v=TLSRPTv1;rua=mailto:a@example.com;ext=a b",
        "v=TLSRPTv1;rua=mailto:a@example.com;ext=",
        "v=TLSRPTv1;rua=mailto:a@example.com;-ext=1",
        "v=TLSRPTv1;rua=mailto:a@example.com;junk",
        "v=TLSRPTv1;rua=mailto:a@example.com;rua=https://r.example.com/",
        "v=TLSRPTv1;rua=mailto:a@example.com , https://r.example.com/ ,\tmailto:b@example.com",
        "v=TLSRPTv1;rua=",
        "v=TLSRPTv1;rua= mailto:a@example.com",
        "v=TLSRPTv1;rua=mailto:a@example.com;v=TLSRPTv1",
    ],
)
def test_checkdmarc_agrees_on_record_grammar(record: str) -> None:
    """Both parsers accept and refuse the same records, with the same URIs."""
    theirs = checkdmarc_rua(record)
    mine = ours(record)
    assert (mine is None) == (theirs is None)
    if mine is not None:
        assert mine.rua == tuple(theirs or ())
        assert mine.skipped == ()


def test_lenient_on_empty_uris() -> None:
    """An empty URI (a stray comma) is skipped here, where checkdmarc refuses the record."""
    record = "v=TLSRPTv1;rua=mailto:a@example.com,"
    assert checkdmarc_rua(record) is None
    assert ours(record) == ReportRecord(rua=("mailto:a@example.com",), skipped=(("", "empty URI"),))


# No two of these are duplicates of each other, so de-duplication is exact on them.
RANDOM_GOOD = [u for u in GOOD_URIS if u != "MAILTO:tlsrpt@example.com"]
_WSP = st.text(alphabet=" \t", max_size=2)
_EXT = st.sampled_from(["ext=1", "x.y_z-1=abc", "ruf=mailto:b@example.com", "RUA=x"])
_BAD_EXT = st.sampled_from(["ext=a b", "junk", "-x=1", "ext="])


@st.composite
def records(draw: st.DrawFn) -> tuple[str, list[str], list[str], bool]:
    """A record of rua and extension fields, with the good and bad URIs it holds."""
    fields: list[str] = []
    good: list[str] = []
    bad: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            uris = draw(st.lists(st.sampled_from(RANDOM_GOOD + BAD_URIS), min_size=1, max_size=3))
            good += [u for u in uris if u in RANDOM_GOOD]
            bad += [u for u in uris if u in BAD_URIS]
            fields.append("rua=" + ",".join(draw(_WSP) + u + draw(_WSP) for u in uris).strip(" \t"))
        else:
            fields.append(draw(_EXT))
    broken = draw(st.integers(0, 7)) == 0
    if broken:
        fields.insert(draw(st.integers(0, len(fields))), draw(_BAD_EXT))
    text = "v=TLSRPTv1"
    for field in fields:
        text += f"{draw(_WSP)};{draw(_WSP)}{field}"
    if draw(st.booleans()):
        text += f"{draw(_WSP)};{draw(_WSP)}"
    has_rua = any(f.startswith("rua=") for f in fields)
    return text, good, bad, broken or not has_rua


@settings(max_examples=60, deadline=None)
@given(records())
def test_checkdmarc_agrees_on_random_records(case: tuple[str, list[str], list[str], bool]) -> None:
    """On records built from shared-verdict URIs and fields, the two parsers agree."""
    record, good, bad, broken = case
    theirs = checkdmarc_rua(record)
    mine = ours(record)
    if broken:
        assert theirs is None
        assert mine is None
    elif not bad:
        assert theirs == good
        assert mine is not None
        assert mine.rua == tuple(dict.fromkeys(good))  # our de-duplication is exact here
        assert mine.skipped == ()
    else:
        assert theirs is None
        if good:
            assert mine is not None
            assert [uri for uri, _ in mine.skipped] == bad
        else:
            assert mine is None
