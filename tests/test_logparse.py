"""Tests for postfix_mtasts.tlsrpt.logparse: log lines, sessions and their RFC 8460 results."""

from __future__ import annotations

import pickle
import zoneinfo
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfix_mtasts.tlsrpt.logparse import (
    HOLD_SECONDS,
    PROXY_WINDOW,
    RESULT_TYPES,
    SUCCESS,
    LineParser,
    LogLine,
    PolicyKind,
    Session,
    SessionTracker,
    classify,
    parse_line,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
POLICIES: tuple[PolicyKind, ...] = ("sts-enforce", "sts-testing", "none", "tlsa")


def ts(text: str) -> float:
    """Unix time of an ISO 8601 date-time with its offset."""
    return datetime.fromisoformat(text).timestamp()


# --- The real lines of reference/postfix-log-samples.txt ----------------------------------

# (line, UTC time, host, pid) for every complete syslog line of the reference samples, read
# with tz=UTC and now=2026-01-20 (so every month but January is 2025).
SAMPLE_NOW = datetime(2026, 1, 20, tzinfo=UTC)
SAMPLE_LINES: list[tuple[str, str, str | None, int]] = [
    (
        "Jul 24 04:38:17 mail postfix/smtp[30582]: Verified TLS connection established to "
        "gmail-smtp-in.l.google.com[108.177.14.26]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
        " (256/256 bits) key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest "
        "SHA256",
        "2025-07-24T04:38:17+00:00",
        "mail",
        30582,
    ),
    (
        "Jul 27 23:55:10 helios postfix/smtp[56218]: Verified TLS connection established to "
        "mail.nwex.de[2a01:4f8:222:1548::]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 "
        "(256/256 bits) key-exchange x25519 server-signature RSA-PSS (4096 bits) server-digest "
        "SHA256",
        "2025-07-27T23:55:10+00:00",
        "helios",
        56218,
    ),
    (
        "Dec  9 10:18:24 mail postfix/smtp[20053]: Trusted TLS connection established to "
        "aspmx.l.google.com[74.125.143.26]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 "
        "(256/256 bits) key-exchange X25519 server-signature ECDSA (P-256) server-digest SHA256",
        "2025-12-09T10:18:24+00:00",
        "mail",
        20053,
    ),
    (
        "Dec  9 10:18:25 mail postfix/smtp[20058]: Trusted TLS connection established to "
        "mx.zoho.com[136.143.191.44]:25: TLSv1.2 with cipher ECDHE-RSA-AES256-SHA (256/256 bits)",
        "2025-12-09T10:18:25+00:00",
        "mail",
        20058,
    ),
    (
        "Feb  4 09:29:29 mail postfix/smtp[6655]: Anonymous TLS connection established to "
        "balzers.recipient.example.com[217.173.226.42]:25: TLSv1.2 with cipher "
        "ADH-AES256-GCM-SHA384 (256/256 bits)",
        "2025-02-04T09:29:29+00:00",
        "mail",
        6655,
    ),
    (
        "Jun 20 05:02:55 ns4 postfix/smtp[16589]: Untrusted TLS connection established to "
        "h-7a12f4efdf064cf[147.53.75.38]:25: TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 "
        "(256/256 bits)",
        "2025-06-20T05:02:55+00:00",
        "ns4",
        16589,
    ),
    (
        "Apr 22 16:04:29 lightmetermail postfix/smtp[2153]: Untrusted TLS connection established "
        "to email-smtp.us-east-1.amazonaws.com[3.3.3.3]:587: TLSv1.2 with cipher "
        "ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)",
        "2025-04-22T16:04:29+00:00",
        "lightmetermail",
        2153,
    ),
    (
        "May 27 06:47:34 mail-postfix postfix/smtp[920]: Anonymous TLS connection established to "
        "relay.example.org[31.0.0.0]:25: TLSv1 with cipher ADH-AES256-SHA (256/256 bits)",
        "2025-05-27T06:47:34+00:00",
        "mail-postfix",
        920,
    ),
    (
        "Sep 16 10:30:20 vps1 postfix/smtp[11276]: Untrusted TLS connection established to "
        "gmail-smtp-in.l.google.com",
        "2025-09-16T10:30:20+00:00",
        "vps1",
        11276,
    ),
    (
        "Dec  7 13:28:01 mail postfix/smtp[18503]: 939E030001C8: to=<mail@another.com>, "
        "relay=127.0.0.1[127.0.0.1]:10024, delay=0.18, delays=0.09/0/0/0.08, dsn=2.0.0, "
        "status=sent (250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as "
        "BA8BA30001C7)",
        "2025-12-07T13:28:01+00:00",
        "mail",
        18503,
    ),
    (
        "May 27 06:47:35 mail-postfix postfix/smtp[920]: F1F0A200CB: to=<admin@dest.example.org>, "
        "orig_to=<real-admin@dest.example.org>, relay=relay.example.org[31.0.0.0]:25, delay=4.2, "
        "delays=3.4/0.01/0.39/0.38, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as D08D220196)",
        "2025-05-27T06:47:35+00:00",
        "mail-postfix",
        920,
    ),
    (
        "Jul 27 23:55:10 helios postfix/smtp[56218]: 317123EE1029: to=<admin@nwex.de>, "
        "relay=mail.nwex.de[2a01:4f8:222:1548::]:25, delay=1.5, delays=0.61/0.07/0.29/0.54, "
        "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 322881B17FA)",
        "2025-07-27T23:55:10+00:00",
        "helios",
        56218,
    ),
    (
        "Jul 27 23:55:10 helios postfix/smtp[56218]: TLSRPT: status=success, domain=nwex.de, "
        "receiving_mx=mail.nwex.de[2a01:4f8:222:1548::]",
        "2025-07-27T23:55:10+00:00",
        "helios",
        56218,
    ),
    (
        "Jul 28 11:08:05 mon postfix/smtp[3866]: certificate verification failed for "
        "smtp.gmail.com[74.125.20.109]:587: untrusted issuer /C=US/O=Equifax/OU=Equifax Secure "
        "Certificate Authority",
        "2025-07-28T11:08:05+00:00",
        "mon",
        3866,
    ),
    (
        "Jul 28 11:08:05 mon postfix/smtp[3866]: 1A0B4101023: Server certificate not trusted",
        "2025-07-28T11:08:05+00:00",
        "mon",
        3866,
    ),
    (
        "Jul 28 11:08:05 mon postfix/smtp[3866]: 1A0B4101023: to=<staff@freedom.press>, "
        "relay=smtp.gmail.com[74.125.20.108]:587, delay=1.3, delays=0.02/0.03/1.3/0, dsn=4.7.5, "
        "status=deferred (Server certificate not trusted)",
        "2025-07-28T11:08:05+00:00",
        "mon",
        3866,
    ),
    (
        "Nov 21 18:40:03 node1 postfix/smtp[16969]: certificate verification failed for "
        "webmail.schleunungdruck.de[117.243.191.210]:25: untrusted issuer /C=de/L=XXX/O=XXX "
        "GmbH/CN=XX XX XXX CA/emailAddress=XX@XX",
        "2025-11-21T18:40:03+00:00",
        "node1",
        16969,
    ),
    (
        "Feb  2 12:15:21 postfix/smtp[1520]: Trusted TLS connection established to "
        "domain.tld[2001:1111:1:1111::1]:25: TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 "
        "(256/256 bits)",
        "2025-02-02T12:15:21+00:00",
        None,
        1520,
    ),
    (
        "Feb  2 12:15:21 postfix/smtp[1520]: 30E4E7461347: Server certificate not verified",
        "2025-02-02T12:15:21+00:00",
        None,
        1520,
    ),
    (
        "Feb  2 12:15:22 postfix/smtp[1520]: Trusted TLS connection established to "
        "domain.tld[1.2.3.4]:25: TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)",
        "2025-02-02T12:15:22+00:00",
        None,
        1520,
    ),
    (
        "Feb  2 12:15:22 postfix/smtp[1520]: 30E4E7461347: to=<mailer@domain.tld>, "
        "relay=domain.tld[1.2.3.4]:25, delay=433522, delays=433521/0.09/0.63/0, dsn=4.7.5, "
        "status=deferred (Server certificate not verified)",
        "2025-02-02T12:15:22+00:00",
        None,
        1520,
    ),
    (
        "Oct 11 03:58:22 box postfix/smtp[1885]: 7356ABD12E: to=<emailaddress@hotmail.com>, "
        "relay=hotmail-com.olc.protection.outlook.com[104.47.2.33]:25, delay=21537, "
        "delays=21536/0.08/0.72/0, dsn=4.7.4, status=deferred (TLS is required, but was not "
        "offered by host hotmail-com.olc.protection.outlook.com[104.47.2.33])",
        "2025-10-11T03:58:22+00:00",
        "box",
        1885,
    ),
    (
        "2024-12-30T12:16:32.052659+01:00 INFO    postfix/smtp[1204]: SSL_connect error to "
        "smtp.gmail.com[142.250.110.108]:587: -1",
        "2024-12-30T11:16:32.052659+00:00",
        None,
        1204,
    ),
    (
        "2024-12-30T12:16:32.052694+01:00 WARNING postfix/smtp[1204]: warning: TLS library "
        "problem: error:0A00010B:SSL routines::wrong version number:../ssl/record/ssl3_record.c"
        ":354:",
        "2024-12-30T11:16:32.052694+00:00",
        None,
        1204,
    ),
    (
        "Jan 17 13:01:58 hz-relay01 postfix/smtp[42498]: warning: socketmap:inet:10.11.0.42:8462:"
        'query lookup error for "REDACTED"',
        "2026-01-17T13:01:58+00:00",
        "hz-relay01",
        42498,
    ),
    (
        "Jun 22 10:27:40 Fred-Linode postfix/smtp[28944]: warning: smtp_tls_policy_maps, "
        'next-hop destination "gmail.com": invalid attribute name: "servername"',
        "2025-06-22T10:27:40+00:00",
        "Fred-Linode",
        28944,
    ),
    (
        "Jun 22 10:27:40 Fred-Linode postfix/smtp[28944]: warning: TLS policy lookup for "
        "gmail.com/gmail-smtp-in.l.google.com: client TLS configuration problem",
        "2025-06-22T10:27:40+00:00",
        "Fred-Linode",
        28944,
    ),
    (
        "2025-01-26T01:03:02.997382+00:00 mail postfix/smtp[27991]: warning: smtp_tls_policy_maps,"
        ' next-hop destination "gmail.com": invalid attribute name: "policy_type"',
        "2025-01-26T01:03:02.997382+00:00",
        "mail",
        27991,
    ),
    (
        "2025-01-26T01:03:02.997394+00:00 mail postfix/smtp[27991]: warning: TLS policy lookup "
        "for gmail.com/gmail-smtp-in.l.google.com: client TLS configuration problem",
        "2025-01-26T01:03:02.997394+00:00",
        "mail",
        27991,
    ),
]
assert len(SAMPLE_LINES) == 29

# The samples quoted without their syslog prefix (message part only).
SAMPLE_FRAGMENTS = [
    "Trusted TLS connection established to gmail-smtp-in.l.google.com[74.125.133.27]:25: "
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-sig",
    "server certificate verification failed for mx-mibc-fr-03.mailinblack.com[40.89.154.15]:25:"
    " num=62:hostname mismatch",
    "server certificate verification failed for mail4.aboutmy.email[209.182.238.63]:25: "
    "certificate has expired",
    'warning: smtp_tls_policy_maps, next-hop destination "lebenshilfe-neuwied.de": attribute '
    '"match" has empty value',
]


@pytest.mark.parametrize(("line", "utc", "host", "pid"), SAMPLE_LINES)
def test_sample_lines(line: str, utc: str, host: str | None, pid: int) -> None:
    """Every complete line of the reference samples splits into time, host, tag and message."""
    parsed = parse_line(line, tz=UTC, now=SAMPLE_NOW)
    assert parsed is not None
    assert parsed.time == pytest.approx(ts(utc), abs=1e-6)
    assert parsed.host == host
    assert (parsed.syslog_name, parsed.service, parsed.pid) == ("postfix", "smtp", pid)
    assert line.endswith(": " + parsed.message)
    assert parsed.message == line.split(f"[{pid}]: ", 1)[1]


@pytest.mark.parametrize("fragment", SAMPLE_FRAGMENTS)
def test_sample_fragments(fragment: str) -> None:
    """Message-only samples are no tag line alone, and parse once given a syslog prefix."""
    assert parse_line(fragment, tz=UTC, now=NOW) is None
    parsed = parse_line(f"Nov 23 08:00:00 mail postfix/smtp[77]: {fragment}", tz=UTC, now=NOW)
    assert parsed == LogLine(
        ts("2026-11-23T08:00:00+00:00"), "mail", "postfix", "smtp", 77, fragment
    )


# --- Time stamps and tags ------------------------------------------------------------------


JAN_2 = datetime(2027, 1, 2, tzinfo=UTC)
EVE = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)  # New Year's Eve in UTC
EVE_UTC_NEW_YEAR_BERLIN = datetime(2026, 12, 31, 23, 45, tzinfo=UTC)  # Jan 1st in Berlin
NOV_UTC_DEC_BERLIN = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)  # Dec 1st in Berlin
MINUS_5 = timezone(timedelta(hours=-5))


@pytest.mark.parametrize(
    ("prefix", "tz", "now", "utc", "host"),
    [
        # BSD syslog (space-padded day) and postlogd (zero-padded day), read in tz.
        ("Nov  3 08:26:01 mail", UTC, NOW, "2026-11-03T08:26:01Z", "mail"),
        ("Nov 03 08:26:01 mail", UTC, NOW, "2026-11-03T08:26:01Z", "mail"),
        ("Nov 3 08:26:01 mail", UTC, NOW, "2026-11-03T08:26:01Z", "mail"),
        ("Nov  3 08:26:01", UTC, NOW, "2026-11-03T08:26:01Z", None),
        ("Nov  3 08:26:01 mail", MINUS_5, NOW, "2026-11-03T13:26:01Z", "mail"),
        # A month after now's month is last year: the December-to-January turn.
        ("Dec 31 23:59:59 mail", UTC, JAN_2, "2026-12-31T23:59:59Z", "mail"),
        ("Jan  1 00:00:01 mail", UTC, JAN_2, "2027-01-01T00:00:01Z", "mail"),
        ("Dec 31 23:59:59 mail", UTC, EVE, "2026-12-31T23:59:59Z", "mail"),
        # Read on New Year's Eve, a stamp of January 1st is the coming year.
        ("Jan  1 00:00:00 mail", UTC, EVE, "2027-01-01T00:00:00Z", "mail"),
        (
            "Feb 29 12:00:00 mail",
            UTC,
            datetime(2028, 3, 1, tzinfo=UTC),
            "2028-02-29T12:00Z",
            "mail",
        ),
        # Europe/Berlin: CET in winter, CEST in summer; now's month is taken in that zone.
        ("Jan 15 12:00:00 mail", BERLIN, NOW, "2026-01-15T11:00:00Z", "mail"),
        ("Jul  1 12:00:00 mail", BERLIN, NOW, "2026-07-01T10:00:00Z", "mail"),
        ("Jan  1 00:30:00 mail", BERLIN, EVE_UTC_NEW_YEAR_BERLIN, "2026-12-31T23:30:00Z", "mail"),
        ("Dec  1 00:10:00 mail", BERLIN, NOV_UTC_DEC_BERLIN, "2026-11-30T23:10:00Z", "mail"),
        # DST gap and overlap: read with the offset in force before the change (fold=0).
        ("Mar 29 02:30:00 mail", BERLIN, NOW, "2026-03-29T02:30:00+01:00", "mail"),
        ("Oct 25 02:30:00 mail", BERLIN, NOW, "2026-10-25T02:30:00+02:00", "mail"),
        # RFC 3339: rsyslog high precision, journalctl short-iso, Z, container with severity.
        (
            "2025-01-26T01:03:02.997382+00:00 mail",
            BERLIN,
            NOW,
            "2025-01-26T01:03:02.997382Z",
            "mail",
        ),
        ("2026-11-23T08:26:01+0000 mail", BERLIN, NOW, "2026-11-23T08:26:01Z", "mail"),
        ("2026-11-23T08:26:01+0100 mail", UTC, NOW, "2026-11-23T07:26:01Z", "mail"),
        ("2026-11-23T08:26:01Z mail", BERLIN, NOW, "2026-11-23T08:26:01Z", "mail"),
        (
            "2026-11-23T08:26:01.5Z mx.example.org",
            BERLIN,
            NOW,
            "2026-11-23T08:26:01.5Z",
            "mx.example.org",
        ),
        ("2026-11-23T08:26:01.123-05:00 mail", UTC, NOW, "2026-11-23T13:26:01.123Z", "mail"),
        ("2024-12-30T12:16:32.052659+01:00 INFO   ", UTC, NOW, "2024-12-30T11:16:32.052659Z", None),
        ("2024-12-30T12:16:32+01:00 WARNING", UTC, NOW, "2024-12-30T11:16:32Z", None),
        # No offset in an ISO stamp: read in tz like a BSD stamp.
        ("2026-07-01T12:00:00 mail", BERLIN, NOW, "2026-07-01T10:00:00Z", "mail"),
    ],
)
def test_timestamps(
    prefix: str, tz: timezone | zoneinfo.ZoneInfo, now: datetime, utc: str, host: str | None
) -> None:
    """Both stamp families become UTC seconds; zone-less ones are read in tz with now's year."""
    line = f"{prefix} postfix/smtp[42]: hello"
    parsed = LineParser(tz).parse(line, now)
    assert parsed is not None
    assert parsed.time == pytest.approx(ts(utc), abs=1e-6)
    assert parsed.host == host
    # The cache gives the same answer the second time, and parse_line agrees.
    assert parse_line(line, tz=tz, now=now) == parsed
    assert parse_line(line, tz=tz, now=now) == parsed


def test_local_time_zone() -> None:
    """tz=None reads BSD stamps in the host's local time, as log_timezone = "local" asks."""
    parsed = parse_line("Jul  1 12:00:00 mail postfix/smtp[1]: x", tz=None, now=NOW)
    assert parsed is not None
    assert parsed.time == datetime(2026, 7, 1, 12, 0, 0).timestamp()


def test_year_follows_now() -> None:
    """One parser reads the same stamp in a new year once now has moved on."""
    parser = LineParser(UTC)
    line = "Dec 31 23:59:59 mail postfix/smtp[1]: x"
    first = parser.parse(line, datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    later = parser.parse(line, datetime(2027, 1, 1, 0, 0, 5, tzinfo=UTC))
    assert first is not None and later is not None
    assert first.time == ts("2026-12-31T23:59:59+00:00") == later.time
    next_year = parser.parse(line, datetime(2027, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert next_year is not None
    assert next_year.time == ts("2027-12-31T23:59:59+00:00")


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        (
            ["2026-11-23T08:00:00.5Z", "2026-11-23T08:00:07.250000Z", "2026-11-23T08:00:59Z"],
            ["2026-11-23T08:00:00.5+00:00", "2026-11-23T08:00:07.25+00:00", "2026-11-23T08:00:59"],
        ),
        (
            ["2026-11-23T09:00:01.123456+01:00", "2026-11-23T09:00:02.000001+01:00"],
            ["2026-11-23T08:00:01.123456+00:00", "2026-11-23T08:00:02.000001+00:00"],
        ),
        (
            ["Nov 23 08:00:00", "Nov 23 08:00:30", "Nov 23 08:00:59", "Nov 23 08:01:00"],
            [
                "2026-11-23T08:00:00",
                "2026-11-23T08:00:30",
                "2026-11-23T08:00:59",
                "2026-11-23T08:01",
            ],
        ),
        (
            ["Nov 23 08:00:01", "Nov 23 08:00:60", "Nov 23 08:00:6x", "Nov 23 08:00:02"],
            ["2026-11-23T08:00:01", None, None, "2026-11-23T08:00:02"],
        ),
        (
            ["2026-11-23T08:00:01Z", "2026-11-23T08:00:60Z", "2026-11-23T08:00:1.5Z"],
            ["2026-11-23T08:00:01", None, None],
        ),
        (
            ["2026-11-23T08:00:01.Z", "2026-11-23T08:00:01.5xZ", "2026-11-23T08:00:01.25Z"],
            [None, None, "2026-11-23T08:00:01.25"],
        ),
    ],
)
def test_stamps_within_a_minute(stamps: list[str], expected: list[str | None]) -> None:
    """Stamps of one minute, read by one parser from its cache of minutes, keep their
    seconds and fractions, and invalid seconds stay unreadable."""
    parser = LineParser(UTC)
    times = []
    for stamp in stamps:
        parsed = parser.parse(f"{stamp} mail postfix/smtp[1]: x", NOW)
        times.append(None if parsed is None else parsed.time)
    assert times == [
        None if e is None else datetime.fromisoformat(e).replace(tzinfo=UTC).timestamp()
        for e in expected
    ]


@pytest.mark.parametrize(
    ("tag", "syslog_name", "service"),
    [
        ("postfix/smtp", "postfix", "smtp"),
        ("postfix-out/smtp", "postfix-out", "smtp"),
        ("postfix/relay/smtp", "postfix/relay", "smtp"),
        ("postfix/tlsproxy", "postfix", "tlsproxy"),
        ("postfix/qmgr", "postfix", "qmgr"),
        ("mail/smtpd", "mail", "smtpd"),
    ],
)
def test_tags(tag: str, syslog_name: str, service: str) -> None:
    """The tag splits at its last slash into syslog name and service, whatever the name."""
    parsed = parse_line(f"Nov 23 08:00:00 mail {tag}[4711]: a: b]: c\n", tz=UTC, now=NOW)
    assert parsed == LogLine(
        ts("2026-11-23T08:00:00+00:00"), "mail", syslog_name, service, 4711, "a: b]: c"
    )


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "Nov 23 08:00:00 mail dovecot: imap-login: Login: user=<u@example.org>",
        "Nov 23 08:00:00 mail CRON[123]: (root) CMD (true)",
        "Nov 23 08:00:00 mail postfix/smtp[12a]: x",
        "Nov 23 08:00:00 mail postfix/smtp[]: x",
        "Nov 23 08:00:00 mail postfix/[12]: x",
        "Nov 23 08:00:00 mail /smtp[12]: x",
        "Nov 23 08:00:00 mail postfix/smtp[١٢]: x",
        "postfix/smtp[12]: no prefix",
        "Foo 23 08:00:00 mail postfix/smtp[12]: x",
        "Nov 31 08:00:00 mail postfix/smtp[12]: x",
        "Nov 23 25:00:00 mail postfix/smtp[12]: x",
        "2026-13-01T00:00:00Z mail postfix/smtp[12]: x",
        "2026-11-23 08:00:00 mail postfix/smtp[12]: x",
    ],
)
def test_not_tag_lines(line: str) -> None:
    """Lines without a process tag, or with an unreadable prefix, parse to None."""
    assert parse_line(line, tz=UTC, now=NOW) is None


def test_services_filter_and_unreadable_count() -> None:
    """A services filter drops other services before their stamp is read; bad stamps count."""
    parser = LineParser(UTC)
    assert parser.parse("bad stamp postfix/smtpd[1]: x", NOW, {"smtp"}) is None
    assert parser.unreadable == 0
    assert parser.parse("bad stamp postfix/smtp[1]: x", NOW, {"smtp"}) is None
    assert parser.unreadable == 1


# --- Log builders for the session tests ----------------------------------------------------

MX = "mx1.example.net[192.0.2.25]:25"
MX2 = "mx2.example.net[192.0.2.26]:25"
QID = "3F1A2B4C5D"


def log(*messages: str, pid: int = 4242, start: int = 0, tag: str = "postfix/smtp") -> list[str]:
    """BSD syslog lines of one process, one second apart from 08:00:00 + start seconds."""
    base = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    return [
        f"{(base + timedelta(seconds=start + i)).strftime('%b %e %H:%M:%S')} mail {tag}[{pid}]: {m}"
        for i, m in enumerate(messages)
    ]


def summary(trust: str = "Verified", mx: str = MX, verb: str = "established") -> str:
    cipher = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    return f"{trust} TLS connection {verb} to {mx}: {cipher}"


def delivery(
    status: str = "sent",
    reason: str = "250 2.0.0 Ok: queued as 4XY",
    rcpt: str = "user@example.net",
    relay: str = MX,
    qid: str = QID,
) -> str:
    return (
        f"{qid}: to=<{rcpt}>, relay={relay}, delay=1.2, delays=0.1/0/0.5/0.6, dsn=2.0.0, "
        f"status={status} ({reason})"
    )


def verify(text: str, mx: str = MX, prefix: str = "") -> str:
    return f"{prefix}certificate verification failed for {mx}: {text}"


def deferred(reason: str, relay: str = MX) -> str:
    return delivery("deferred", reason, relay=relay)


def run(
    lines: list[str], *, sender: str = "", skip: tuple[str, ...] = ()
) -> tuple[list[Session], SessionTracker]:
    """Feed lines to a fresh tracker, flush it, and return the sessions and the tracker."""
    tracker = SessionTracker(report_sender=sender, tz=UTC)
    tracker.skip_queue_ids.update(skip)
    sessions: list[Session] = []
    for line in lines:
        sessions += tracker.feed_text(line, NOW)
    sessions += tracker.flush()
    return sessions, tracker


def results(sessions: list[Session], policy: PolicyKind) -> list[tuple[str, str | None] | None]:
    return [classify(s, policy) for s in sessions]


# --- §7.4: from log evidence to result, row by row -----------------------------------------

NOT_VERIFIED = deferred("Server certificate not verified")
OK = (SUCCESS, None)
TLSA_RECORDS_UNUSABLE = f"warning: {MX}: all TLSA records unusable"
DNS_PROBLEM = (
    "Host or domain name not found. Name service error for name=_25._tcp.mx1.example.net "
    "type=TLSA: Host not found, try again"
)

EVIDENCE_ROWS: list[tuple[str, list[str], dict[PolicyKind, tuple[str, str | None] | None]]] = [
    (
        "verified",
        [summary("Verified"), delivery()],
        dict.fromkeys(POLICIES, OK),
    ),
    (
        "trusted, no failure line",
        [summary("Trusted"), delivery()],
        {"none": OK, "sts-testing": OK, "sts-enforce": OK, "tlsa": ("tlsa-invalid", None)},
    ),
    (
        "untrusted, no failure line",
        [summary("Untrusted"), delivery()],
        {"none": OK, "sts-testing": ("certificate-not-trusted", None)},
    ),
    (
        "anonymous, no failure line",
        [summary("Anonymous"), delivery()],
        {"none": OK, "sts-testing": ("validation-failure", "no-peer-certificate")},
    ),
    (
        "STARTTLS not offered",
        [deferred("TLS is required, but was not offered by host mx1.example.net[192.0.2.25]")],
        {"sts-enforce": ("starttls-not-supported", None), "none": ("starttls-not-supported", None)},
    ),
    (
        "STARTTLS refused",
        [
            deferred(
                "TLS is required, but host mx1.example.net[192.0.2.25] refused to start TLS: "
                "454 4.7.0 TLS not available due to local problem"
            )
        ],
        {
            "sts-enforce": (
                "starttls-not-supported",
                "454 4.7.0 TLS not available due to local problem",
            )
        },
    ),
    (
        "untrusted issuer",
        [verify("untrusted issuer /C=US/O=Example CA"), summary("Untrusted"), NOT_VERIFIED],
        {
            "sts-enforce": (
                "certificate-not-trusted",
                "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
            )
        },
    ),
    (
        "self-signed certificate",
        [verify("self-signed certificate"), summary("Untrusted"), NOT_VERIFIED],
        {"sts-enforce": ("certificate-not-trusted", "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT")},
    ),
    (
        "not trusted by local or TLSA policy",
        [verify("not trusted by local or TLSA policy"), summary("Untrusted"), NOT_VERIFIED],
        {
            "sts-enforce": ("certificate-not-trusted", "X509_V_ERR_CERT_UNTRUSTED"),
            "tlsa": ("tlsa-invalid", "X509_V_ERR_CERT_UNTRUSTED"),
        },
    ),
    (
        "certificate has expired",
        [verify("certificate has expired", prefix="server "), summary("Untrusted"), NOT_VERIFIED],
        dict.fromkeys(POLICIES, ("certificate-expired", None)),
    ),
    (
        "CA certificate has expired",
        [verify("certificate has expired", prefix="CA "), summary("Untrusted"), NOT_VERIFIED],
        {"none": ("certificate-expired", None)},
    ),
    (
        "certificate not yet valid",
        [verify("certificate not yet valid", prefix="server "), summary("Untrusted"), NOT_VERIFIED],
        dict.fromkeys(POLICIES, ("validation-failure", "X509_V_ERR_CERT_NOT_YET_VALID")),
    ),
    (
        "not designated for use as a server certificate",
        [verify("not designated for use as a server certificate"), NOT_VERIFIED],
        {"sts-enforce": ("validation-failure", "X509_V_ERR_INVALID_PURPOSE")},
    ),
    (
        "certificate chain longer than limit",
        [verify("certificate chain longer than limit(9)"), summary("Untrusted"), NOT_VERIFIED],
        {"sts-testing": ("validation-failure", "X509_V_ERR_CERT_CHAIN_TOO_LONG")},
    ),
    (
        "num=62 hostname mismatch",
        [verify("num=62:hostname mismatch", prefix="server "), summary("Trusted"), NOT_VERIFIED],
        {
            "sts-enforce": ("certificate-host-mismatch", "X509_V_ERR_HOSTNAME_MISMATCH"),
            "tlsa": ("tlsa-invalid", "X509_V_ERR_HOSTNAME_MISMATCH"),
        },
    ),
    (
        "num=N other",
        [verify("num=19:self-signed certificate in certificate chain"), NOT_VERIFIED],
        dict.fromkeys(
            POLICIES, ("validation-failure", "num=19:self-signed certificate in certificate chain")
        ),
    ),
    (
        "num=10 is expiry",
        [verify("num=10:certificate has expired"), summary("Untrusted"), NOT_VERIFIED],
        {"sts-enforce": ("certificate-expired", "num=10:certificate has expired")},
    ),
    (
        "not verified, Trusted summary (Postfix <= 3.5 name mismatch)",
        [summary("Trusted"), NOT_VERIFIED],
        {
            "sts-enforce": ("certificate-host-mismatch", None),
            "sts-testing": ("certificate-host-mismatch", None),
            "tlsa": ("tlsa-invalid", None),
        },
    ),
    (
        "not verified, Untrusted summary",
        [summary("Untrusted"), NOT_VERIFIED],
        dict.fromkeys(POLICIES, ("certificate-not-trusted", None)),
    ),
    (
        "not trusted (Postfix <= 3.5)",
        [
            summary("Untrusted"),
            f"{QID}: Server certificate not trusted",
            deferred("Server certificate not trusted"),
        ],
        dict.fromkeys(POLICIES, ("certificate-not-trusted", None)),
    ),
    (
        "SSL_connect error then TLS library problem",
        [
            "SSL_connect error to mx1.example.net[192.0.2.25]:25: -1",
            "warning: TLS library problem: error:0A00010B:SSL routines::wrong version number:"
            "../ssl/record/ssl3_record.c:354:",
            deferred("Cannot start TLS: handshake failure"),
        ],
        dict.fromkeys(POLICIES, ("validation-failure", "wrong version number")),
    ),
    (
        "TLS library problem then SSL_connect error (OpenSSL 1.1 format)",
        [
            "warning: TLS library problem: error:1408F10B:SSL routines:ssl3_get_record:wrong "
            "version number:../ssl/record/ssl3_record.c:332:",
            "SSL_connect error to mx1.example.net[192.0.2.25]:25: -1",
            deferred("Cannot start TLS: handshake failure"),
        ],
        {"sts-enforce": ("validation-failure", "wrong version number")},
    ),
    (
        "SSL_connect error alone",
        [
            "SSL_connect error to mx1.example.net[192.0.2.25]:25: lost connection",
            deferred("Cannot start TLS: handshake failure"),
        ],
        {"sts-enforce": ("validation-failure", "lost connection")},
    ),
    (
        "Cannot start TLS alone",
        [deferred("Cannot start TLS: handshake failure")],
        {"sts-enforce": ("validation-failure", "handshake failure")},
    ),
    (
        "all TLSA records unusable, mail went out",
        [
            TLSA_RECORDS_UNUSABLE + ", fallback to unauthenticated TLS",
            summary("Untrusted"),
            delivery(),
        ],
        {
            "tlsa": ("tlsa-invalid", "all-TLSA-records-unusable"),
            "none": OK,
            "sts-testing": ("certificate-not-trusted", None),
        },
    ),
    (
        "all TLSA records unusable",
        [TLSA_RECORDS_UNUSABLE, summary("Untrusted"), NOT_VERIFIED],
        {"tlsa": ("tlsa-invalid", "all-TLSA-records-unusable")},
    ),
    (
        "TLSA lookup error with the DNS problem",
        [
            f"warning: DANE TLSA lookup problem: {DNS_PROBLEM}",
            deferred("TLSA lookup error for mx1.example.net:25", relay="none"),
        ],
        {"tlsa": ("dnssec-invalid", DNS_PROBLEM), "sts-enforce": None, "none": None},
    ),
    (
        "TLSA lookup error alone",
        [deferred("TLSA lookup error for mx1.example.net:25", relay="none")],
        {"tlsa": ("dnssec-invalid", None)},
    ),
    (
        "no TLSA records found",
        [deferred("no TLSA records found")],
        {"tlsa": ("dane-required", None), "sts-testing": None},
    ),
    (
        "non DNSSEC destination",
        [deferred("non DNSSEC destination")],
        {"tlsa": ("dane-required", None)},
    ),
    (
        "TLSA records unusable (dane-only)",
        [deferred("TLSA records unusable")],
        {"tlsa": ("tlsa-invalid", None), "none": None},
    ),
    (
        "external policy failure",
        [verify("external policy failure (sts_webpki_invalid)"), NOT_VERIFIED],
        {"sts-enforce": ("sts-webpki-invalid", None)},
    ),
    (
        "external policy failure of an unknown type",
        [verify("external policy failure (no_such_thing)"), NOT_VERIFIED],
        {"sts-enforce": ("validation-failure", "no_such_thing")},
    ),
    (
        "TLSRPT success after the delivery line",
        [
            summary("Trusted"),
            delivery(),
            "TLSRPT: status=success, domain=example.net, receiving_mx=mx1.example.net[192.0.2.25]",
        ],
        dict.fromkeys(POLICIES, OK),
    ),
    (
        "TLSRPT failure after the delivery line overrides a success",
        [
            summary("Verified"),
            delivery(),
            "TLSRPT: status=failure, domain=example.net, receiving_mx=mx1.example.net"
            "[192.0.2.25], failure_type=validation_failure, failure_reason=self-signed_certificate",
        ],
        dict.fromkeys(POLICIES, ("validation-failure", "self-signed_certificate")),
    ),
    (
        "TLSRPT failure before the delivery line",
        [
            verify("untrusted issuer /CN=x"),
            summary("Untrusted"),
            "TLSRPT: status=failure, domain=example.net, receiving_mx=mx1.example.net"
            "[192.0.2.25], failure_type=starttls_not_supported",
            NOT_VERIFIED,
        ],
        dict.fromkeys(POLICIES, ("starttls-not-supported", None)),
    ),
]


@pytest.mark.parametrize(
    ("lines", "expected"), [pytest.param(lines, exp, id=name) for name, lines, exp in EVIDENCE_ROWS]
)
def test_evidence_table(
    lines: list[str], expected: dict[PolicyKind, tuple[str, str | None] | None]
) -> None:
    """Each §7.4 row yields one session to mx1 whose result under each policy is the table's."""
    sessions, tracker = run(log(*lines))
    assert len(sessions) == 1
    session = sessions[0]
    assert (session.domain, session.queue_id) == ("example.net", QID)
    assert session.mx_host == "mx1.example.net"
    if session.mx_ip:
        assert (session.mx_ip, session.port) == ("192.0.2.25", 25)
    for policy, result in expected.items():
        assert classify(session, policy) == result, policy
    for policy in POLICIES:
        result = classify(session, policy)
        assert result is None or result[0] == SUCCESS or result[0] in RESULT_TYPES
    assert tracker.unparsed == 0


@pytest.mark.parametrize(
    ("reason", "result"),
    [
        ("no TLSA records found", "dane-required"),
        ("non DNSSEC destination", "dane-required"),
        ("TLSA records unusable", "tlsa-invalid"),
    ],
)
def test_dane_reason_without_relay(reason: str, result: str) -> None:
    """A dane-only deferral with relay=none is a session with no MX named."""
    (session,) = run(log(deferred(reason, relay="none")))[0]
    assert (session.mx_host, session.mx_ip, session.domain) == ("", "", "example.net")
    assert classify(session, "tlsa") == (result, None)
    assert classify(session, "sts-enforce") is None


TLSRPT_EXPIRED = (
    "TLSRPT: status=failure, domain=Example.NET, receiving_mx=mx1.example.net[192.0.2.25], "
    "failure_type=certificate_expired, failure_reason=x509 expired"
)


def test_tlsrpt_fields() -> None:
    """A TLSRPT line's result and reason are kept on the session it names, not its domain
    (the TLSRPT policy domain, which may differ from the session's)."""
    (session,) = run(log(summary("Verified"), delivery(), TLSRPT_EXPIRED))[0]
    assert (session.tlsrpt_result, session.tlsrpt_reason) == ("certificate-expired", "x509 expired")
    assert session.trust == "Verified"
    assert "tlsrpt_domain" not in Session._fields


def test_tlsrpt_fields_of_a_tracker_saved_with_the_domain() -> None:
    """A tracker saved while open sessions kept a TLSRPT line's domain as well gives those
    sessions the line's result and reason."""
    tracker = SessionTracker(tz=UTC)
    for line in log(summary("Verified"), TLSRPT_EXPIRED):
        tracker.feed_text(line, NOW)
    (proc,) = tracker._procs.values()
    assert proc.open is not None and proc.open.tlsrpt is not None
    proc.open.tlsrpt = ("example.net", *proc.open.tlsrpt)  # type: ignore[assignment]
    restored = pickle.loads(pickle.dumps(tracker))
    (session,) = restored.feed_text(log(delivery(), start=2)[0], NOW) + restored.flush()
    assert (session.tlsrpt_result, session.tlsrpt_reason) == ("certificate-expired", "x509 expired")


@pytest.mark.parametrize(
    "message",
    [
        "TLSRPT: status=failure, domain=example.net, receiving_mx=mx1[192.0.2.25], failure_type=x",
        "TLSRPT: status=maybe, domain=example.net, receiving_mx=mx1[192.0.2.25]",
        "TLSRPT: nonsense",
    ],
)
def test_tlsrpt_unknown(message: str) -> None:
    """A TLSRPT line with an unknown status or type is counted unparsed and changes nothing."""
    sessions, tracker = run(log(summary("Verified"), delivery(), message))
    assert results(sessions, "sts-enforce") == [OK]
    assert tracker.unparsed == 1


def test_tlsrpt_without_session_is_ignored() -> None:
    """A TLSRPT line with no session in its process is ignored."""
    line = "TLSRPT: status=success, domain=example.net, receiving_mx=mx1[192.0.2.25]"
    sessions, tracker = run(log(line))
    assert sessions == []
    assert tracker.ignored == 1


# --- §7.5: never reported ------------------------------------------------------------------

CONNECT_TIMEOUT = "connect to mx1.example.net[192.0.2.25]:25: Connection timed out"
LOST = (
    "lost connection with mx1.example.net[192.0.2.25] while receiving the initial server greeting"
)

NEVER_ROWS: list[tuple[str, list[str], int]] = [
    ("connect timeout", log(CONNECT_TIMEOUT, deferred(CONNECT_TIMEOUT, relay="none")), 0),
    (
        "connect refused",
        log(
            "connect to mx1.example.net[192.0.2.25]:25: Connection refused",
            "connect to mx2.example.net[192.0.2.26]:25: Connection refused",
            deferred("connect to mx2.example.net[192.0.2.26]:25: Connection refused", relay="none"),
        ),
        0,
    ),
    ("lost before STARTTLS", log(f"{QID}: {LOST}", deferred(LOST)), 0),
    (
        "conversation timed out before STARTTLS",
        log(
            deferred(
                "conversation with mx1.example.net[192.0.2.25] timed out while receiving the "
                "initial server greeting"
            )
        ),
        0,
    ),
    (
        "rejected before STARTTLS",
        log(delivery("bounced", f"host {MX[:-3]} said: 554 5.7.1 go away (in reply to MAIL FROM)")),
        0,
    ),
    (
        "socketmap lookup error",
        log('warning: socketmap:inet:127.0.0.1:8461:postfix lookup error for "example.net"'),
        1,
    ),
    (
        "policy table lookup error",
        log(
            'warning: smtp_tls_policy_maps, next-hop destination "example.net": policy table '
            "lookup error"
        ),
        1,
    ),
    (
        "invalid attribute and configuration problem, then relay=none",
        log(
            'warning: smtp_tls_policy_maps, next-hop destination "example.net": invalid attribute '
            'name: "policy_type"',
            "warning: TLS policy lookup for example.net/mx1.example.net: client TLS configuration "
            "problem",
            deferred("client TLS configuration problem", relay="none"),
        ),
        3,
    ),
    (
        "empty match attribute",
        log(
            'warning: smtp_tls_policy_maps, next-hop destination "example.net": attribute '
            '"match" has empty value'
        ),
        1,
    ),
    (
        "socketmap server error",
        log("warning: socketmap:inet:127.0.0.1:8461 socketmap server temporary error: timeout"),
        1,
    ),
    (
        "TLS engine unavailable",
        log(deferred("TLS is required, but our TLS engine is unavailable")),
        1,
    ),
    (
        "relay=none",
        log(
            deferred(
                "Host or domain name not found. Name service error for "
                "name=example.net type=MX: Host not found",
                relay="none",
            )
        ),
        0,
    ),
    (
        "postfix/error",
        log(
            deferred(
                "delivery temporarily suspended: TLS is required, but was not offered by "
                "host mx1.example.net[192.0.2.25]",
                relay="none",
            ),
            tag="postfix/error",
        ),
        0,
    ),
    (
        "content filter on loopback",
        log(
            summary("Trusted", "127.0.0.1[127.0.0.1]:10024"),
            delivery(relay="127.0.0.1[127.0.0.1]:10024"),
        ),
        0,
    ),
    (
        "IPv6 loopback",
        log(
            summary("Untrusted", "localhost[::1]:10025"),
            deferred("Server certificate not verified", relay="localhost[::1]:10025"),
        ),
        0,
    ),
    ("UNIX socket", log(delivery(relay="mail.example.org[private/dovecot-lmtp]")), 0),
    ("lmtp", log(summary("Verified"), delivery(), tag="postfix/lmtp"), 0),
    ("local", log(delivery(relay="local"), tag="postfix/local"), 0),
    ("virtual", log(delivery(relay="virtual"), tag="postfix/virtual"), 0),
    ("reused handshake", log(summary("Verified", verb="reused"), delivery()), 0),
    (
        "reused handshake after a failed one",
        log(summary("Untrusted", verb="reused"), NOT_VERIFIED),
        0,
    ),
    (
        "report mail (qmgr from=)",
        log(
            f"{QID}: from=<TLSRPT@example.org>, size=4242, nrcpt=1 (queue active)",
            tag="postfix/qmgr",
            pid=900,
        )
        + log(summary("Untrusted"), NOT_VERIFIED, start=1),
        0,
    ),
]


@pytest.mark.parametrize(
    ("lines", "config_problems"),
    [pytest.param(lines, n, id=name) for name, lines, n in NEVER_ROWS],
)
def test_never_reported(lines: list[str], config_problems: int) -> None:
    """The §7.5 cases give no session; local configuration problems are counted."""
    sessions, tracker = run(lines, sender="tlsrpt@example.org")
    assert sessions == []
    assert tracker.config_problems == config_problems
    assert tracker.unparsed == 0


def test_report_mail_skipped_by_queue_id() -> None:
    """Sessions of queue ids in skip_queue_ids (learnt from SMTP "queued as") are dropped."""
    lines = log(summary("Untrusted"), NOT_VERIFIED, summary("Verified"), delivery(qid="AAAAA11111"))
    sessions, _ = run(lines, skip=(QID,))
    assert [s.queue_id for s in sessions] == ["AAAAA11111"]


def test_report_mail_other_sender_counted() -> None:
    """Other senders' qmgr lines skip nothing; a removed report queue id is forgotten."""
    tracker = SessionTracker(report_sender="tlsrpt@example.org", tz=UTC)
    qmgr = log(
        f"{QID}: from=<someone@example.org>, size=1, nrcpt=1 (queue active)",
        "BBBBB22222: from=<tlsrpt@example.org>, size=1, nrcpt=1 (queue active)",
        tag="postfix/qmgr",
        pid=900,
    )
    for line in qmgr:
        assert tracker.feed_text(line, NOW) == []
    assert tracker.skip_queue_ids == {"BBBBB22222"}
    sessions: list[Session] = []
    for line in log(summary(), delivery(), start=2):
        sessions += tracker.feed_text(line, NOW)
    sessions += tracker.flush()
    assert [s.queue_id for s in sessions] == [QID]
    tracker.feed_text(log("BBBBB22222: removed", tag="postfix/qmgr", pid=900)[0], NOW)
    assert tracker.skip_queue_ids == set()


# --- Sessions: shapes of real deliveries ---------------------------------------------------


def test_several_recipients_one_session() -> None:
    """A delivery line per recipient over one session counts once; TLSRPT still attaches."""
    lines = log(
        summary(),
        delivery(rcpt="a@Example.NET"),
        delivery(rcpt="b@example.net"),
        delivery(rcpt="c@example.net"),
        "TLSRPT: status=success, domain=example.net, receiving_mx=mx1.example.net[192.0.2.25]",
    )
    sessions, tracker = run(lines)
    assert len(sessions) == 1
    assert sessions[0].domain == "example.net"
    assert sessions[0].tlsrpt_result == SUCCESS
    assert tracker.unparsed == 0


def test_same_queue_id_new_handshake_is_new_session() -> None:
    """A second handshake to the same MX for the same queue id is a second session."""
    sessions, _ = run(log(summary(), delivery(rcpt="a@example.net"), summary(), delivery()))
    assert len(sessions) == 2


def test_two_mx_in_one_delivery() -> None:
    """MX 1 greylists after TLS, MX 2 accepts: two successes, both for the recipient's domain."""
    lines = log(
        summary(mx=MX),
        f"{QID}: host mx1.example.net[192.0.2.25] said: 451 4.7.1 Greylisted (in reply to RCPT "
        "TO command)",
        summary(mx=MX2),
        delivery(relay=MX2, rcpt="user@EXAMPLE.net."),
    )
    sessions, tracker = run(lines)
    assert [(s.mx_host, s.mx_ip, s.domain) for s in sessions] == [
        ("mx1.example.net", "192.0.2.25", "example.net"),
        ("mx2.example.net", "192.0.2.26", "example.net"),
    ]
    assert results(sessions, "sts-enforce") == [OK, OK]
    assert tracker.unparsed == 0


def test_failed_mx_then_success() -> None:
    """MX 1 fails verification, MX 2 succeeds: one failure and one success in one delivery."""
    lines = log(
        verify("certificate has expired", mx=MX),
        summary("Untrusted", mx=MX),
        f"{QID}: Server certificate not verified",
        "connect to mx2.example.net[192.0.2.26]:25: Connection timed out",
        summary("Verified", mx=MX2),
        delivery(relay=MX2),
    )
    sessions, _ = run(lines)
    assert results(sessions, "sts-enforce") == [("certificate-expired", None), OK]


def test_lost_connection_after_tls_is_still_a_session() -> None:
    """A connection lost after the handshake leaves the handshake's result."""
    lost = "lost connection with mx1.example.net[192.0.2.25] while sending end of data"
    sessions, _ = run(log(summary(), f"{QID}: {lost}", summary(mx=MX2), delivery(relay=MX2)))
    assert results(sessions, "sts-enforce") == [OK, OK]
    assert sessions[0].mx_host == "mx1.example.net"


def test_ipv6_and_long_queue_ids() -> None:
    """IPv6 MX addresses and long queue ids are read from summary and delivery line."""
    mx6 = "mail.example.net[2001:db8::25]:25"
    lines = log(summary(mx=mx6), delivery(relay=mx6, qid="3Pt2mN2VXxznjll"))
    (session,) = run(lines)[0]
    assert (session.mx_host, session.mx_ip, session.port) == (
        "mail.example.net",
        "2001:db8::25",
        25,
    )
    assert session.queue_id == "3Pt2mN2VXxznjll"


def test_postfix2_summary_without_address() -> None:
    """A Postfix 2.x summary without [addr]:port takes the address from the delivery line."""
    lines = log(
        "Untrusted TLS connection established to gmail-smtp-in.l.google.com",
        delivery(relay="gmail-smtp-in.l.google.com[74.125.133.27]:25", rcpt="x@gmail.com"),
    )
    (session,) = run(lines)[0]
    assert (session.mx_host, session.mx_ip, session.port) == (
        "gmail-smtp-in.l.google.com",
        "74.125.133.27",
        25,
    )
    assert session.trust == "Untrusted"
    assert classify(session, "none") == OK


def test_interleaved_processes() -> None:
    """Two smtp processes writing alternately keep their own sessions."""
    a = log(summary("Verified", mx=MX), delivery(qid="AAAAA11111", relay=MX), pid=101)
    b = log(
        summary("Trusted", mx=MX2),
        delivery(
            "deferred",
            "Server certificate not verified",
            qid="BBBBB22222",
            relay=MX2,
            rcpt="u@other.example",
        ),
        pid=102,
    )
    sessions, _ = run([a[0], b[0], a[1], b[1]])
    by_qid = {s.queue_id: s for s in sessions}
    assert set(by_qid) == {"AAAAA11111", "BBBBB22222"}
    assert classify(by_qid["AAAAA11111"], "sts-enforce") == OK
    assert by_qid["BBBBB22222"].domain == "other.example"
    assert classify(by_qid["BBBBB22222"], "sts-enforce") == ("certificate-host-mismatch", None)


def test_same_pid_other_instance_is_another_process() -> None:
    """postfix/smtp[7] and postfix-out/smtp[7] are different processes."""
    a = log(summary("Verified"), delivery(qid="AAAAA11111"), pid=7)
    b = log(
        summary("Untrusted", mx=MX2),
        deferred("Server certificate not verified", relay=MX2),
        pid=7,
        tag="postfix-out/smtp",
    )
    sessions, _ = run([a[0], b[0], a[1], b[1]])
    assert sorted(results(sessions, "sts-enforce"), key=str) == [
        ("certificate-not-trusted", None),
        OK,
    ]


def test_recipient_domain_to_a_labels() -> None:
    """The recipient domain is lower-cased and written in A-labels."""
    (session,) = run(log(summary(), delivery(rcpt="Jörg@Bücher.Example")))[0]
    assert session.domain == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "rcpt",
    [
        "user@[192.0.2.9]",
        "user@[IPv6:2001:db8::9]",
        "root@localhost",
        "user@under_score.example",
        "user@192.0.2.9",
        "user@\u2603.example",  # a snowman: IDNA refuses it
        "user@xn--zz.example",  # not a valid A-label
        "nobody",
    ],
)
def test_recipient_that_is_no_policy_domain_is_not_counted(rcpt: str) -> None:
    """Deliveries to an address literal or a name that is no domain give no session (a single
    MX, or two), each delivery line counts as ignored, and the process's next delivery is
    counted as usual."""
    lines = log(
        summary(),
        delivery(rcpt=rcpt),
        summary(mx=MX),
        f"BBBBB22222: host {MX[:-3]} said: 451 4.7.1 Greylisted (in reply to RCPT TO command)",
        summary(mx=MX2),
        delivery(relay=MX2, rcpt=rcpt, qid="BBBBB22222"),
        summary(),
        delivery(qid="CCCCC33333"),
    )
    sessions, tracker = run(lines)
    assert [(s.domain, s.queue_id) for s in sessions] == [("example.net", "CCCCC33333")]
    assert (tracker.ignored, tracker.unparsed) == (2, 0)


def test_reference_sample_sessions() -> None:
    """The reference's sample deliveries give the sessions and results the table predicts."""
    lines = [line for line, *_ in SAMPLE_LINES]
    groups = {
        "systemli": [lines[7], lines[10]],
        "sys4": [lines[1], lines[11], lines[12]],
        "securedrop": lines[13:16],
        "kernel-error": lines[17:21],
        "hotmail": [lines[21]],
        "lightmeter-filter": [lines[9]],
    }
    found = {name: run(group)[0] for name, group in groups.items()}
    (anonymous,) = found["systemli"]
    assert anonymous.domain == "dest.example.org"
    assert classify(anonymous, "none") == OK
    assert classify(anonymous, "sts-testing") == ("validation-failure", "no-peer-certificate")
    (nwex,) = found["sys4"]
    assert (nwex.mx_ip, nwex.domain, nwex.tlsrpt_result) == (
        "2a01:4f8:222:1548::",
        "nwex.de",
        SUCCESS,
    )
    assert [s.mx_ip for s in found["securedrop"]] == ["74.125.20.109", "74.125.20.108"]
    assert results(found["securedrop"], "sts-enforce") == [
        ("certificate-not-trusted", "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
        ("certificate-not-trusted", None),
    ]
    assert [s.mx_ip for s in found["kernel-error"]] == ["2001:1111:1:1111::1", "1.2.3.4"]
    assert results(found["kernel-error"], "tlsa") == [("tlsa-invalid", None)] * 2
    assert results(found["hotmail"], "sts-enforce") == [("starttls-not-supported", None)]
    assert found["lightmeter-filter"] == []


def test_reference_sample_handshake_failure() -> None:
    """The container-format handshake failure, once its delivery line follows, is typed."""
    lines = [line for line, *_ in SAMPLE_LINES[22:24]]
    lines.append(
        "2024-12-30T12:16:33.100000+01:00 INFO    postfix/smtp[1204]: 4ABC123DEF: to=<x@gmail.com>,"
        " relay=smtp.gmail.com[142.250.110.108]:587, delay=1, delays=0/0/1/0, dsn=4.7.5, "
        "status=deferred (Cannot start TLS: handshake failure)"
    )
    (session,) = run(lines)[0]
    assert classify(session, "none") == ("validation-failure", "wrong version number")
    assert session.time == pytest.approx(ts("2024-12-30T11:16:32.052659+00:00"))


def test_reference_sample_config_problems() -> None:
    """The reference's policy-lookup problem lines are all counted as configuration problems."""
    lines = [line for line, *_ in SAMPLE_LINES[24:]]
    lines.append(log(SAMPLE_FRAGMENTS[3])[0])
    sessions, tracker = run(lines)
    assert sessions == []
    assert tracker.config_problems == 6


def test_open_session_without_delivery_line_is_dropped() -> None:
    """A handshake whose delivery line never comes has no domain: dropped, counted unparsed."""
    sessions, tracker = run(log(summary()))
    assert sessions == []
    assert tracker.unparsed == 1


def test_held_session_released_by_time() -> None:
    """A finished session waits for a TLSRPT line only HOLD_SECONDS of log time."""
    tracker = SessionTracker(tz=UTC)
    for line in log(summary(), delivery()):
        assert tracker.feed_text(line, NOW) == []
    later = log(
        "connect to x[192.0.2.1]:25: Connection refused", pid=9, start=int(HOLD_SECONDS) + 3
    )
    (session,) = tracker.feed_text(later[0], NOW)
    assert session.queue_id == QID
    assert tracker.flush() == []


def test_held_session_released_by_next_session() -> None:
    """The process's next session releases the previous one at once."""
    tracker = SessionTracker(tz=UTC)
    lines = log(summary(), delivery(), summary(mx=MX2))
    assert tracker.feed_text(lines[0], NOW) == []
    assert tracker.feed_text(lines[1], NOW) == []
    (session,) = tracker.feed_text(lines[2], NOW)
    assert session.mx_ip == "192.0.2.25"


def test_idle_process_forgotten() -> None:
    """A process silent for an hour of log time is forgotten; its open session is unparsed."""
    tracker = SessionTracker(tz=UTC)
    tracker.feed_text(log(summary())[0], NOW)
    tracker.feed_text(log("x", pid=9, start=4000, tag="postfix/smtpd")[0], NOW)
    tracker.feed_text(
        log("connect to x[192.0.2.1]:25: Connection refused", pid=9, start=4400)[0], NOW
    )
    assert tracker.unparsed == 1
    assert tracker.flush() == []


def test_idle_process_forgotten_while_fed_in_batches() -> None:
    """A process forgotten after an hour of silence starts afresh when its tag comes back
    in a batch, and its old open session is counted as unparsed."""
    tracker = SessionTracker(tz=UTC)
    first = log(summary(), pid=7)
    later = log(summary(), delivery(), pid=7, start=4000)
    assert tracker.feed_lines(first + later, NOW) == []
    assert tracker.unparsed == 1
    (session,) = tracker.flush()
    assert (session.domain, session.trust, session.time) == (
        "example.net",
        "Verified",
        ts("2026-11-23T09:06:40+00:00"),
    )


def test_tracker_pickled_between_batches() -> None:
    """A tracker pickled and restored between two batches yields what an uninterrupted one
    does."""
    lines = log(summary(), delivery(), summary("Trusted"), delivery(qid="BBBBB22222"), pid=5)
    whole = SessionTracker(tz=UTC)
    expected = whole.feed_lines(lines, NOW) + whole.flush()
    first = SessionTracker(tz=UTC)
    got = first.feed_lines(lines[:3], NOW)
    restored = pickle.loads(pickle.dumps(first))
    got += restored.feed_lines(lines[3:], NOW) + restored.flush()
    assert got == expected
    assert [s.trust for s in got] == ["Verified", "Trusted"]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 59),
    st.integers(0, 999_999),
    st.sampled_from(["+00:00", "-05:30", "Z", "+0100"]),
)
def test_cached_minute_reads_the_same_time(second: int, micros: int, offset: str) -> None:
    """An rsyslog stamp read from the cache of minutes has the same time as when it was
    read first, through the general path."""
    parser = LineParser(UTC)
    line = f"2026-11-23T08:00:{second:02d}.{micros:06d}{offset} mail postfix/smtp[1]: x"
    first, again = parser.parse(line, NOW), parser.parse(line, NOW)
    assert first is not None and again is not None
    assert again.time == first.time


# --- tlsproxy (§7.6) -----------------------------------------------------------------------


TLSPROXY = "postfix/tlsproxy"


def test_tlsproxy_pairing() -> None:
    """A tlsproxy handshake pairs with the next smtp delivery naming its MX; reused adds none."""
    lines = (
        log(verify("certificate has expired"), summary("Untrusted"), pid=300, tag=TLSPROXY)
        + log(deferred("Server certificate not verified"), pid=301, start=2)
        + log(summary("Verified", verb="reused"), delivery(qid="CCCCC33333"), pid=302, start=3)
        + log(
            "Anonymous TLS connection established from unknown[198.51.100.7]: TLSv1.3 with "
            "cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
            pid=300,
            start=5,
            tag="postfix/tlsproxy",
        )
    )
    sessions, tracker = run(lines)
    assert [(s.queue_id, s.domain, s.trust) for s in sessions] == [
        (QID, "example.net", "Untrusted")
    ]
    assert classify(sessions[0], "sts-enforce") == ("certificate-expired", None)
    assert tracker.unparsed == 0


def test_tlsproxy_too_old() -> None:
    """A tlsproxy handshake older than PROXY_WINDOW pairs with nothing."""
    lines = log(summary("Verified"), pid=300, tag="postfix/tlsproxy") + log(
        delivery(), pid=301, start=int(PROXY_WINDOW) + 5
    )
    assert run(lines)[0] == []


# --- Garbage is counted, never fatal -------------------------------------------------------


def test_unknown_smtp_lines_counted() -> None:
    """smtp lines of no known shape count as unparsed; other lines as ignored."""
    lines = [
        *log("something new and strange", "QIDLESS: to=<x>", "Verified TLS connection maybe"),
        "random words",
        "Nov 23 08:00:00 mail postfix/smtpd[1]: connect from x[192.0.2.9]",
        *log(
            "warning: numeric hostname: 192.0.2.1",
            "enabling PIX workarounds: disable_esmtp for x[192.0.2.1]:25",
            start=5,
        ),
    ]
    sessions, tracker = run(lines)
    assert sessions == []
    assert tracker.unparsed == 3
    assert tracker.ignored == 4


def test_feed_parsed_lines_of_other_services() -> None:
    """feed() takes LogLines directly and ignores services it does not read."""
    tracker = SessionTracker()
    line = LogLine(0.0, None, "postfix", "smtpd", 1, "connect from x[192.0.2.1]")
    assert tracker.feed(line) == []
    assert tracker.ignored == 1


def test_feed_lines() -> None:
    """feed_lines feeds many lines and returns every session they completed."""
    tracker = SessionTracker(tz=UTC)
    found = tracker.feed_lines(log(summary(), delivery(), summary(mx=MX2)), NOW)
    assert [s.mx_ip for s in found] == ["192.0.2.25"]


PIECES = [
    summary(),
    summary("Trusted", MX2),
    summary("Untrusted", "h[2001:db8::1]:25"),
    summary("Anonymous", verb="reused"),
    verify("certificate has expired"),
    verify("num=62:hostname mismatch", MX2),
    "SSL_connect error to mx1.example.net[192.0.2.25]:25: -1",
    "warning: TLS library problem: error:0A00010B:SSL routines::x:y:1:",
    f"warning: {MX}: all TLSA records unusable",
    "warning: DANE TLSA lookup problem: SERVFAIL",
    delivery(),
    delivery(relay=MX2, qid="AAAAA11111"),
    deferred("Server certificate not verified"),
    deferred("TLSA lookup error for mx1.example.net:25", relay="none"),
    f"{QID}: Server certificate not verified",
    f"{QID}: host mx1.example.net[192.0.2.25] said: 451 try later",
    "TLSRPT: status=success, domain=example.net, receiving_mx=mx1.example.net[192.0.2.25]",
    "TLSRPT: status=failure, domain=d, receiving_mx=h[1], failure_type=tlsa_invalid",
    f"{QID}: from=<r@example.org>, size=1, nrcpt=1 (queue active)",
    f"{QID}: removed",
]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    """Arbitrary text never raises: it parses to a LogLine or None, and is counted."""
    parsed = parse_line(text, tz=BERLIN, now=NOW)
    assert parsed is None or isinstance(parsed, LogLine)
    tracker = SessionTracker(report_sender="r@example.org", tz=BERLIN)
    for line in (text, f"Nov 23 08:00:00 mail postfix/smtp[1]: {text}"):
        tracker.feed_text(line, NOW)
    tracker.flush()
    assert tracker.unparsed + tracker.ignored + tracker.config_problems <= 2


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PIECES) | st.text(max_size=40),
            st.sampled_from(["postfix/smtp", "postfix/tlsproxy", "postfix/qmgr"]),
            st.integers(1, 3),
            st.integers(0, 400),
        ),
        max_size=30,
    )
)
def test_mixed_lines_never_raise(pieces: list[tuple[str, str, int, int]]) -> None:
    """Any order of plausible and garbage lines never raises, and every result is a known type."""
    tracker = SessionTracker(report_sender="r@example.org", tz=UTC)
    sessions: list[Session] = []
    second = 0
    for message, tag, pid, step in pieces:
        second += step
        sessions += tracker.feed_text(log(message, pid=pid, tag=tag, start=second)[0], NOW)
    sessions += tracker.flush()
    for session in sessions:
        for policy in POLICIES:
            result = classify(session, policy)
            assert result is None or result[0] == SUCCESS or result[0] in RESULT_TYPES


def test_release_emits_held_sessions_and_keeps_open_ones() -> None:
    """release() hands out complete sessions but keeps one still waiting for its delivery line."""
    now = datetime(2026, 11, 23, tzinfo=UTC)
    tracker = SessionTracker(tz=UTC)
    prefix = "2026-11-22T10:00:00+00:00 mail postfix/smtp"
    tls = (
        " Verified TLS connection established to mx.a.example[192.0.2.1]:25: TLSv1.3 with"
        " cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    )
    sent = (
        ": 1A2B3C: to=<u@a.example>, relay=mx.a.example[192.0.2.1]:25, delay=1,"
        " delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)"
    )
    for line in (f"{prefix}[1]:{tls}", f"{prefix}[1]{sent}", f"{prefix}[2]:{tls}"):
        assert tracker.feed_text(line, now) == []
    released = tracker.release()
    assert [(s.domain, s.trust) for s in released] == [("a.example", "Verified")]
    second = sent.replace("1A2B3C", "4D5E6F")
    later = tracker.feed_text(f"{prefix}[2]{second}", now) + tracker.release()
    assert [(s.domain, s.queue_id) for s in later] == [("a.example", "4D5E6F")]
