"""Tests for postfix_mtasts.mtasts.policy: keys, TXT records, policy bodies, replies."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs

from postfix_mtasts.mtasts.policy import (
    MAX_AGE_LIMIT,
    MAX_REPLY,
    NOTFOUND,
    InvalidRecord,
    NoRecord,
    Policy,
    PolicyError,
    RecordError,
    ReplyOptions,
    is_valid_mx_pattern,
    mx_matches,
    netstring,
    normalise_key,
    parse_policy,
    parse_sts_records,
    policy_reply,
    temp_reply,
)

# --- §1: socketmap key -> policy domain -----------------------------------------------------

LABEL63 = "a" * 63
NAME253 = ".".join([LABEL63, LABEL63, LABEL63, "b" * 61])  # 63*3 + 61 + 3 dots = 253
assert len(NAME253) == 253


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # The common case and the reference's key forms.
        (b"example.com", "example.com"),
        (b"sub.example.com", "sub.example.com"),
        (b"a.b", "a.b"),
        (b"xn--fa-hia.de", "xn--fa-hia.de"),
        (b"mail-1.example.com", "mail-1.example.com"),
        (b"ab--cd.example.com", "ab--cd.example.com"),
        (b"[mx.example.com]", "mx.example.com"),
        (b"[mx.example.com]:587", "mx.example.com"),
        (b"[mx.example.com]:25", "mx.example.com"),
        (b"[mx.example.com]:smtp", "mx.example.com"),
        (b"example.com:587", "example.com"),
        (b"example.com:submission", "example.com"),
        (b"example.com:25", "example.com"),
        # Case and exactly one trailing dot (postmap -q does not lower-case).
        (b"Example.COM.", "example.com"),
        (b"EXAMPLE.COM", "example.com"),
        (b"example.com.", "example.com"),
        (b"[Mx.Example.com.]:587", "mx.example.com"),
        (b"example.com.:25", "example.com"),
        # U-labels (smtputf8_enable = yes): IDNA2008/UTS #46, not IDNA2003.
        ("faß.de".encode(), "xn--fa-hia.de"),
        ("Faß.DE".encode(), "xn--fa-hia.de"),
        ("bücher.example.".encode(), "xn--bcher-kva.example"),
        ("[bücher.example]:25".encode(), "xn--bcher-kva.example"),
        ("münchen.de:smtp".encode(), "xn--mnchen-3ya.de"),
        # Length limits.
        ((LABEL63 + ".com").encode(), LABEL63 + ".com"),
        (NAME253.encode(), NAME253),
        ((NAME253 + ".").encode(), NAME253),
        (NAME253.upper().encode(), NAME253),
    ],
)
def test_normalise_key_valid(key: bytes, expected: str) -> None:
    """A next-hop key is reduced to its lower-case A-label policy domain."""
    assert normalise_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        # Empty key and parent-domain probes.
        b"",
        b".",
        b"..",
        b".example.com",
        b".Example.COM",
        b".example.com:25",
        # Address literals, with or without brackets, port or tag.
        b"[192.0.2.1]",
        b"[192.0.2.1]:25",
        b"192.0.2.1",
        b"192.0.2.1:25",
        b"192.0.2.1.",
        b"127.1",
        b"[2001:db8::1]",
        b"[2001:db8::1]:25",
        b"[ipv6:2001:db8::1]",
        b"[IPv6:2001:db8::1]:25",
        b"2001:db8::1",
        b"::1",
        b"[::1]",
        b"ipv6:2001:db8::1",
        # Bracket and port errors.
        b"[]",
        b"[]:25",
        b"[mx.example.com",
        b"mx.example.com]",
        b"[[mx.example.com]]",
        b"[mx.example.com]]",
        b"[mx.[example].com]",
        b"[mx.example.com]x",
        b"[mx.example.com]:",
        b"[mx.example.com]:25:26",
        b"[mx.example.com] :25",
        b"example.com:",
        b"example.com:25:26",
        b"example.com: 25",
        b"example.com:-25",
        b"mx.example.com[:25]",
        b":25",
        # Bad UTF-8, NUL and other control characters, spaces.
        b"\xff.example.com",
        b"ex\xc3ample.com",
        b"exa\x00mple.com",
        b"example.com\n",
        b"example.com\r",
        b"exam\tple.com",
        b"example.com\x7f",
        b"exam ple.com",
        b"example.com extra",
        b" example.com",
        "exam\u00a0ple.com".encode(),
        "exam\u0085ple.com".encode(),
        # Invalid names.
        b"example.com..",
        b"example..com",
        b"-example.com",
        b"example-.com",
        b"_mta-sts.example.com",
        b"exa_mple.com",
        b"*.example.com",
        b"example.com/",
        b"ex@mple.com",
        ("a" * 64 + ".com").encode(),
        ("a." + NAME253).encode(),
        (NAME253 + "a").encode(),
        b"x" * 10000,
        "faß..de".encode(),
        "☃\u200d.example".encode(),
        "xn--bad.example.ü".encode(),
        # Single-label names and pathnames (LMTP over UNIX sockets).
        b"localhost",
        b"LOCALHOST",
        b"com",
        b"com.",
        b"[localhost]",
        b"localhost:25",
        b"/var/run/lmtp",
        b"private/dovecot-lmtp",
        b"unix:/var/run/lmtp",
    ],
)
def test_normalise_key_notfound(key: bytes) -> None:
    """Keys that cannot name a policy domain yield None (answer NOTFOUND at once)."""
    assert normalise_key(key) is None


@given(st.binary(max_size=300))
def test_normalise_key_arbitrary_bytes(key: bytes) -> None:
    """Arbitrary bytes never raise and give None or an already normal, fixed-point domain."""
    name = normalise_key(key)
    if name is not None:
        assert name == name.lower()
        assert name.isascii()
        assert not name.endswith(".")
        assert normalise_key(name.encode()) == name


_LDH = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1)


@given(
    labels=st.lists(_LDH | st.text(min_size=1, max_size=8), min_size=1, max_size=5),
    prefix=st.sampled_from(["", "[", "."]),
    suffix=st.sampled_from(["", ".", "]", "]:25", ":smtp", ":", "]:"]),
)
def test_normalise_key_domain_like(labels: list[str], prefix: str, suffix: str) -> None:
    """Domain-like keys never raise and normalise to a fixed point."""
    name = normalise_key((prefix + ".".join(labels) + suffix).encode("utf-8", "surrogatepass"))
    if name is not None:
        assert normalise_key(name.encode()) == name
        assert normalise_key(f"[{name}]:25".encode()) == name


# --- §2: the _mta-sts TXT record ------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # RFC 8461 §3.1 example.
        ([b"v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        ([b"v=STSv1; id=20160831085700Z"], "20160831085700Z"),
        ([b"v=STSv1;id=x"], "x"),
        # Strings of one record joined with nothing between them (by the DNS layer).
        ([b"".join([b"v=STS", b"v1; id=x"])], "x"),
        # Erratum 6285 Decision: spaces or tabs before the ";".
        ([b"v=STSv1 ; id=x"], "x"),
        ([b"v=STSv1\t;\tid=x\t;\t"], "x"),
        ([b"v=STSv1; id=x; "], "x"),
        # Unknown fields ignored, any order after v=.
        ([b"v=STSv1; ext=val; id=abc"], "abc"),
        ([b"v=STSv1; id=abc; a.b-c_d=!#$%&'()*+,-./0123456789:<>?@[]^_`{|}~"], "abc"),
        ([b"v=STSv1; " + b"e" * 32 + b"=1; id=x"], "x"),
        # ID= is an extension (case-sensitive names), not the id.
        ([b"v=STSv1; ID=ignored; id=real"], "real"),
        # Decision: a repeated id keeps the first.
        ([b"v=STSv1; id=first; id=second"], "first"),
        # Ids are case-sensitive and kept verbatim.
        ([b"v=STSv1; id=AbC123"], "AbC123"),
        ([b"v=STSv1; id=" + b"Z" * 32], "Z" * 32),
        # Non-candidates, even non-ASCII ones, are skipped without error.
        ([b"v=spf1 -all", b"\xff\xfe garbage", b"v=STSv1; id=x"], "x"),
        ([b"V=STSv1; id=a", b"v=STSv10; id=b", b" v=STSv1; id=c", b"v=STSv1; id=d"], "d"),
        ([b"v=STSv1", b"v=STSv1; id=e"], "e"),
    ],
)
def test_parse_sts_records_valid(records: list[bytes], expected: str) -> None:
    """The single v=STSv1 candidate's id is returned."""
    assert parse_sts_records(records) == expected


@pytest.mark.parametrize(
    "records",
    [
        [],
        [b""],
        [b"v=spf1 -all"],
        [b"V=STSv1; id=x"],
        [b"v=stsv1; id=x"],
        [b"v=STSv10; id=x"],
        [b" v=STSv1; id=x"],
        [b"\tv=STSv1; id=x"],
        [b"v=STSv1"],
        [b"v=STSv1 id=x"],
        [b"v=STSv1 "],
        [b"v=STSv1,id=x"],
        [b"\xff\xfev=STSv1; id=x"],
    ],
)
def test_parse_sts_records_no_candidate(records: list[bytes]) -> None:
    """Without a record beginning with v=STSv1 and a delimiter there is no record."""
    with pytest.raises(NoRecord):
        parse_sts_records(records)


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        # Exactly one candidate, counted before validation.
        ([b"v=STSv1; id=a", b"v=STSv1; id=a"], "2 v=STSv1 records"),
        ([b"v=STSv1; id=a", b"v=STSv1; id=b"], "2 v=STSv1 records"),
        ([b"v=STSv1;;", b"v=STSv1; id=a"], "2 v=STSv1 records"),
        ([b"v=STSv1; id=a", b"v=spf1", b"v=STSv1; id=b", b"v=STSv1; id=c"], "3 v=STSv1"),
        # US-ASCII only.
        ([b"v=STSv1; id=x; ext=\xc3\xa9"], "not US-ASCII"),
        ([b"v=STSv1; id=x\xff"], "not US-ASCII"),
        # Grammar.
        ([b"v=STSv1;"], "no fields"),
        ([b"v=STSv1 ; "], "no fields"),
        ([b"v=STSv1;; id=x"], "empty field"),
        ([b"v=STSv1; id=x;;"], "empty field"),
        ([b"v=STSv1; ; id=x"], "empty field"),
        ([b"v=STSv1; id=x "], "malformed field"),
        ([b"v=STSv1; id=x; ext=1 "], "malformed field"),
        ([b"v=STSv1; id=x id=y"], "malformed field"),
        ([b"v=STSv1; id=x; foo"], "malformed field"),
        ([b"v=STSv1; id=x; =v"], "malformed field"),
        ([b"v=STSv1; id=x; ext="], "malformed field"),
        ([b"v=STSv1; id=x; a=b=c"], "malformed field"),
        ([b"v=STSv1; id=x; _ext=1"], "malformed field"),
        ([b"v=STSv1; id=x; " + b"e" * 33 + b"=1"], "malformed field"),
        ([b"v=STSv1; id=x\x00"], "malformed field"),
        ([b"v=STSv1; id=x\t"], "malformed field"),
        ([b"v=STSv1; id=x,y"], "is not 1-32 letters or digits"),
        # Missing, empty or malformed id.
        ([b"v=STSv1; ext=1"], "no id"),
        ([b"v=STSv1; ID=abc"], "no id"),
        ([b"v=STSv1; Id=abc;"], "no id"),
        ([b"v=STSv1; id="], "malformed field"),
        ([b"v=STSv1; id=a-b"], "is not 1-32 letters or digits"),
        ([b"v=STSv1; id=a_b"], "is not 1-32 letters or digits"),
        ([b"v=STSv1; id=a.b"], "is not 1-32 letters or digits"),
        ([b"v=STSv1; id=" + b"a" * 33], "is not 1-32 letters or digits"),
        ([b"v=STSv1; id=good; id=b-d"], "is not 1-32 letters or digits"),
    ],
)
def test_parse_sts_records_invalid(records: list[bytes], reason: str) -> None:
    """Several candidates or a single invalid candidate raise InvalidRecord with a reason."""
    with pytest.raises(InvalidRecord) as info:
        parse_sts_records(records)
    assert reason in str(info.value)
    assert isinstance(info.value, RecordError)
    assert str(info.value).isascii()
    assert str(info.value).isprintable()


def test_record_errors_are_value_errors() -> None:
    """NoRecord and InvalidRecord are distinct RecordErrors, which are ValueErrors."""
    assert issubclass(NoRecord, RecordError)
    assert issubclass(InvalidRecord, RecordError)
    assert issubclass(RecordError, ValueError)
    assert not issubclass(NoRecord, InvalidRecord)
    assert not issubclass(InvalidRecord, NoRecord)


@given(st.lists(st.binary(max_size=60), max_size=4))
def test_parse_sts_records_arbitrary(records: list[bytes]) -> None:
    """Arbitrary records give an ASCII id or a RecordError, never another exception."""
    try:
        sts_id = parse_sts_records(records)
    except RecordError as e:
        assert str(e).isprintable()
    else:
        assert re.fullmatch("[A-Za-z0-9]{1,32}", sts_id)


# --- §4: the policy body ----------------------------------------------------------------------

RFC_BODY = (
    b"version: STSv1\n"
    b"mode: enforce\n"
    b"mx: mail.example.com\n"
    b"mx: *.example.net\n"
    b"mx: backupmx.example.com\n"
    b"max_age: 604800\n"
)
RFC_MX = ("mail.example.com", "*.example.net", "backupmx.example.com")
RFC_LINES = (
    "version: STSv1",
    "mode: enforce",
    "mx: mail.example.com",
    "mx: *.example.net",
    "mx: backupmx.example.com",
    "max_age: 604800",
)


def body(*lines: str, sep: str = "\n", end: str = "\n") -> bytes:
    """Join policy lines into a body."""
    return (sep.join(lines) + end).encode("utf-8")


def test_parse_policy_rfc_example() -> None:
    """The RFC 8461 §3.2 example policy parses to its fields and lines."""
    assert parse_policy(RFC_BODY) == Policy(
        mode="enforce", mx=RFC_MX, max_age=604800, lines=RFC_LINES
    )


V, E, A = "version: STSv1", "mode: enforce", "max_age: 86400"
MX = "mx: mail.example.com"


@pytest.mark.parametrize(
    ("data", "mode", "mx", "max_age"),
    [
        # Terminators: LF, CRLF, mixed, the last one optional, doubled final newline.
        (body(V, E, MX, A), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, sep="\r\n", end="\r\n"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, end=""), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, sep="\r\n", end=""), "enforce", ("mail.example.com",), 86400),
        (b"version: STSv1\r\nmode: enforce\nmx: m.example\r\nmax_age: 1", "enforce",
         ("m.example",), 1),
        (body(V, E, MX, A, end="\n\n"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, end="\r\n\r\n"), "enforce", ("mail.example.com",), 86400),
        # Blank and whitespace-only lines anywhere.
        (body("", V, " ", E, "\t", MX, " \t ", A, ""), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, sep="\n\r\n"), "enforce", ("mail.example.com",), 86400),
        # One leading byte-order mark.
        (b"\xef\xbb\xbf" + body(V, E, MX, A), "enforce", ("mail.example.com",), 86400),
        # SP/HTAB around names and values, and between name and colon.
        (body(" version: STSv1 ", "\tmode:\tenforce\t", "mx:mail.example.com", A), "enforce",
         ("mail.example.com",), 86400),
        (body(V, "mode : enforce", "mx\t:  mail.example.com  ", "max_age :86400"), "enforce",
         ("mail.example.com",), 86400),
        # Any order; version need not come first.
        (body(A, MX, E, V), "enforce", ("mail.example.com",), 86400),
        # Modes; none needs no mx, but may have some.
        (body(V, "mode: testing", MX, A), "testing", ("mail.example.com",), 86400),
        (body(V, "mode: none", A), "none", (), 86400),
        (body(V, "mode: none", MX, A), "none", ("mail.example.com",), 86400),
        # Duplicates: first wins except mx; every mx counts, lower-cased and de-duplicated.
        (body(V, "mode: testing", E, MX, A, "max_age: 5", V), "testing",
         ("mail.example.com",), 86400),
        (body(V, E, "mx: B.example.com", "mx: a.example.com", "mx: b.EXAMPLE.com", "mx: *.X.org",
              "mx: *.x.org", A), "enforce", ("b.example.com", "a.example.com", "*.x.org"), 86400),
        # max_age: leading zeros, 0, ten digits, the limit, clamped above it.
        (body(V, E, MX, "max_age: 0086400"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, "max_age: 0"), "enforce", ("mail.example.com",), 0),
        (body(V, E, MX, "max_age: 0000000000"), "enforce", ("mail.example.com",), 0),
        (body(V, E, MX, "max_age: 31557600"), "enforce", ("mail.example.com",), MAX_AGE_LIMIT),
        (body(V, E, MX, "max_age: 31557601"), "enforce", ("mail.example.com",), MAX_AGE_LIMIT),
        (body(V, E, MX, "max_age: 9999999999"), "enforce", ("mail.example.com",), MAX_AGE_LIMIT),
        # Valid mx patterns.
        (body(V, E, "mx: *.example.com", A), "enforce", ("*.example.com",), 86400),
        (body(V, E, "mx: xn--bcher-kva.example", A), "enforce", ("xn--bcher-kva.example",), 86400),
        (body(V, E, "mx: MAIL.Example.COM", A), "enforce", ("mail.example.com",), 86400),
        (body(V, E, "mx: localhost", A), "enforce", ("localhost",), 86400),
        (body(V, E, "mx: *.com", A), "enforce", ("*.com",), 86400),
        (body(V, E, f"mx: {LABEL63}.example", A), "enforce", (f"{LABEL63}.example",), 86400),
        (body(V, E, f"mx: {NAME253}", A), "enforce", (NAME253,), 86400),
        (body(V, E, "mx: 1.2.3.example", A), "enforce", ("1.2.3.example",), 86400),
        (body(V, E, "mx: mail-1.ex-ample.com", A), "enforce", ("mail-1.ex-ample.com",), 86400),
        # Extensions: ignored when well-formed, including UTF-8 values and inner spaces.
        (body(V, E, MX, A, "foo: bar"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, "ext_1.x-Y: a value  with   spaces"), "enforce",
         ("mail.example.com",), 86400),
        (body(V, E, MX, A, "comment: café ☃ {braces} \x85 ok"), "enforce",
         ("mail.example.com",), 86400),
        (body(V, E, MX, A, "9" + "x" * 31 + ": 1"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, "note: a:b: c=d; e"), "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, "nbsp:\u00a0x\u00a0"), "enforce", ("mail.example.com",), 86400),
        # Names are case-sensitive: these are extensions, not the known fields.
        (body(V, E, MX, A, "Mode: bogus", "MX: bad_host", "Version: 9", "MAX_AGE: x"),
         "enforce", ("mail.example.com",), 86400),
        (body(V, E, MX, A, "report: x"), "enforce", ("mail.example.com",), 86400),
    ],
)  # fmt: skip
def test_parse_policy_valid(data: bytes, mode: str, mx: tuple[str, ...], max_age: int) -> None:
    """Valid bodies, including the liberal forms of the reference, parse to their fields."""
    policy = parse_policy(data)
    assert (policy.mode, policy.mx, policy.max_age) == (mode, mx, max_age)


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (body(V, "", E, MX, A, end="\r\n\r\n"), (V, E, MX, A)),
        (b"\xef\xbb\xbf" + body(V, E, MX, A, sep="\r\n", end=""), (V, E, MX, A)),
        (body(" version : STSv1\t", E, "x: y ", MX, A), (" version : STSv1\t", E, "x: y ", MX, A)),
        (body(V, E, MX, "mx: MAIL.example.com", A), (V, E, MX, "mx: MAIL.example.com", A)),
    ],
)
def test_parse_policy_lines(data: bytes, lines: tuple[str, ...]) -> None:
    """Lines keep their text minus terminators, skip blank lines and drop a leading BOM."""
    assert parse_policy(data).lines == lines


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # Encoding and terminators.
        (b"version: STSv1\nmode: enforce\nmx: m\xffx.example\nmax_age: 1\n", "not UTF-8"),
        (b"\xff" + body(V, E, MX, A), "not UTF-8"),
        (body(V, E, MX, A)[:-1] + b"\xc3", "not UTF-8"),
        (body(V, E, MX, A, sep="\r"), "line 1: bare CR"),
        (body(V, E, MX, A, sep="\r\r\n"), "line 1: bare CR"),
        (body(V, E, MX, A, sep="\n\r"), "line 2: bare CR"),
        (body(V, E, MX, A + "\rfoo: bar"), "line 4: bare CR"),
        (b"\xef\xbb\xbf\xef\xbb\xbf" + body(V, E, MX, A), "line 1: "),
        (body(V, E, MX, A, "\u2028"), "line 5: "),
        (body(V, E + "\u2028" + MX, A), "line 2: mode"),
        (body(V, E + "\x0b", MX, A), "line 2: mode"),
        (body(V, E + "\x0c", MX, A), "line 2: mode"),
        # Missing fields.
        (body(E, MX, A), "no version field"),
        (body(V, MX, A), "no mode field"),
        (body(V, E, MX), "no max_age field"),
        (body(V, "Mode: enforce", MX, A), "no mode field"),
        (b"", "no version field"),
        (b"\n\n", "no version field"),
        (body(V, E, A), "mode enforce without mx"),
        (body(V, "mode: testing", A), "mode testing without mx"),
        (body(V, E, "MX: mail.example.com", A), "mode enforce without mx"),
        # Known values are case-sensitive and exact.
        (body("version: STSv2", E, MX, A), "line 1: version 'STSv2' is not STSv1"),
        (body("version: stsv1", E, MX, A), "line 1: version"),
        (body("version: STSv1;", E, MX, A), "line 1: version"),
        (body(V, "mode: Enforce", MX, A), "line 2: mode 'Enforce' is not enforce, testing or none"),
        (body(V, "mode: report", MX, A), "line 2: mode 'report'"),
        (body(V, "mode: enforce testing", MX, A), "line 2: mode"),
        (body(V, "mode:", MX, A), "line 2: mode ''"),
        (body(V, "mode:\u00a0enforce", MX, A), "line 2: mode"),
        # max_age: ASCII digits only, 1 to 10 of them.
        (body(V, E, MX, "max_age: +5"), "line 4: max_age '+5' is not 1-10 digits"),
        (body(V, E, MX, "max_age: -1"), "max_age '-1'"),
        (body(V, E, MX, "max_age: 1e6"), "max_age '1e6'"),
        (body(V, E, MX, "max_age: 86400s"), "max_age '86400s'"),
        (body(V, E, MX, "max_age:"), "max_age ''"),
        (body(V, E, MX, "max_age: 1_000"), "max_age '1_000'"),
        (body(V, E, MX, "max_age: 12345678901"), "max_age '12345678901'"),
        (body(V, E, MX, "max_age: 86 400"), "max_age"),
        (body(V, E, MX, "max_age: 0x10"), "max_age"),
        (body(V, E, MX, "max_age: \uff18\uff16\uff14\uff10\uff10"), "max_age"),
        (body(V, E, MX, "max_age: ²"), "max_age"),
        (body(V, E, MX, "max_age: ٨٦٤٠٠"), "max_age"),
        # Decision: later duplicates must be well-formed.
        (body(V, E, "mode: bogus", MX, A), "line 3: mode 'bogus'"),
        (body(V, E, MX, A, "max_age: x"), "line 5: max_age 'x'"),
        (body(V, E, MX, A, "version: 2"), "line 5: version '2'"),
        # Invalid mx patterns (one bad mx spoils the whole policy).
        (body(V, E, "mx: bücher.example", A), "line 3: mx"),
        (body(V, E, "mx: *example.com", A), "line 3: mx '*example.com' is not a valid host"),
        (body(V, E, "mx: *", A), "line 3: mx"),
        (body(V, E, "mx: *.", A), "line 3: mx"),
        (body(V, E, "mx: *.*.example.com", A), "line 3: mx"),
        (body(V, E, "mx: mail.*.example.com", A), "line 3: mx"),
        (body(V, E, "mx: .example.com", A), "line 3: mx"),
        (body(V, E, "mx: mail_1.example.com", A), "line 3: mx"),
        (body(V, E, "mx: [192.0.2.1]", A), "line 3: mx"),
        (body(V, E, "mx: 192.0.2.1", A), "line 3: mx '192.0.2.1'"),
        (body(V, E, "mx: 2001:db8::1", A), "line 3: mx"),
        (body(V, E, "mx: mail.example.com.", A), "line 3: mx"),
        (body(V, E, "mx: mail..example.com", A), "line 3: mx"),
        (body(V, E, f"mx: a{LABEL63}.example", A), "line 3: mx"),
        (body(V, E, f"mx: a.{NAME253}", A), "line 3: mx"),
        (body(V, E, "mx: -mail.example.com", A), "line 3: mx"),
        (body(V, E, "mx: mail-.example.com", A), "line 3: mx"),
        (body(V, E, "mx: a.example.com b.example.com", A), "line 3: mx"),
        (body(V, E, "mx: a.example.com,b.example.com", A), "line 3: mx"),
        (body(V, E, "mx: a.example.com servername=evil", A), "line 3: mx"),
        (body(V, E, "mx: a.example.com\tb.example.com", A), "line 3: mx"),
        (body(V, E, "mx:", A), "line 3: mx ''"),
        (body(V, E, "mx: \u212a.example.com", A), "line 3: mx"),
        (body(V, E, "mx: mail.exampl\u017f.com", A), "line 3: mx"),
        (body(V, "mode: none", "mx: *", A), "line 3: mx"),
        (body(V, E, MX, "mx: bad_one.example", A), "line 4: mx"),
        # Lines outside the grammar, and malformed extensions.
        (body(V, E, MX, A, "garbage"), "line 5: 'garbage' is not 'name: value'"),
        (body(V, E, MX, A, ": value"), "line 5:"),
        (body(V, E, MX, A, "_foo: bar"), "line 5:"),
        (body(V, E, MX, A, "foo bar: x"), "line 5:"),
        (body(V, E, MX, A, "mode x: enforce"), "line 5:"),
        (body(V, E, MX, A, "fo\u00e9: x"), "line 5:"),
        (body(V, E, MX, A, "x" * 33 + ": 1"), "line 5:"),
        (body(V, E, MX, A, "foo= bar"), "line 5:"),
        (body(V, E, MX, A, "foo:"), "line 5: field foo has a bad value"),
        (body(V, E, MX, A, "foo: a\tb"), "line 5: field foo"),
        (body(V, E, MX, A, "foo: a\x7fb"), "line 5: field foo"),
        (body(V, E, MX, A, "foo: \x01"), "line 5: field foo"),
        (body(V, E, MX, A, "foo: a\x00b"), "line 5: field foo"),
        (body(V, E, MX, A, "\u00a0foo: x"), "line 5:"),
    ],
)
def test_parse_policy_invalid(data: bytes, reason: str) -> None:
    """Invalid bodies raise PolicyError with a short printable reason naming the line."""
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    assert reason in str(info.value)
    assert str(info.value).isascii()
    assert str(info.value).isprintable()
    assert len(str(info.value)) < 150


def test_policy_error_is_value_error() -> None:
    """PolicyError is a ValueError, unrelated to the record errors."""
    assert issubclass(PolicyError, ValueError)
    assert not issubclass(PolicyError, RecordError)


@given(st.binary(max_size=200))
def test_parse_policy_arbitrary_bytes(data: bytes) -> None:
    """Arbitrary bytes give a Policy or a PolicyError, never another exception."""
    try:
        policy = parse_policy(data)
    except PolicyError as e:
        assert str(e).isprintable()
    else:
        assert policy.mode in ("enforce", "testing", "none")


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_LABEL_ST = st.builds(
    "{}{}{}".format,
    st.text(_LOWER + "0123456789", min_size=1, max_size=6),
    st.sampled_from(["", "-", "--"]),
    st.text(_LOWER, min_size=1, max_size=4),
)
_PATTERN = st.builds(
    lambda wild, labels: wild + ".".join(labels),
    st.sampled_from(["", "*."]),
    st.lists(_LABEL_ST, min_size=2, max_size=4),
)
_EXT_LINE = st.builds(
    "{}:{}{}".format,
    st.text(_LOWER + "0123456789_.-", min_size=1, max_size=10).map("x".__add__),
    st.sampled_from(["", " ", "\t "]),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="\x7f"),
        min_size=1,
        max_size=20,
    ),
)


@given(
    mode=st.sampled_from(["enforce", "testing", "none"]),
    patterns=st.lists(_PATTERN, min_size=1, max_size=5),
    max_age=st.integers(0, 9999999999),
    extensions=st.lists(_EXT_LINE, max_size=3),
    crlf=st.booleans(),
)
def test_parse_policy_generated(
    mode: str, patterns: list[str], max_age: int, extensions: list[str], crlf: bool
) -> None:
    """Generated valid bodies parse back to the fields they were built from."""
    lines = [f"max_age: {max_age}", f"mode: {mode}", *extensions, "version: STSv1"]
    lines += [f"mx: {p}" for p in patterns]
    policy = parse_policy(body(*lines, sep="\r\n" if crlf else "\n"))
    assert policy.mode == mode
    assert policy.max_age == min(max_age, MAX_AGE_LIMIT)
    assert policy.mx == tuple(dict.fromkeys(patterns))
    assert policy.lines == tuple(lines)


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [
        ("mail.example.com", True),
        ("MAIL.example.COM", True),
        ("*.example.net", True),
        ("*.example", True),
        ("*example.com", False),
        ("*.*.example.com", False),
        ("192.0.2.1", False),
        ("mail.example.com.", False),
        ("bücher.example", False),
        ("\u212a.example", False),
        ("", False),
    ],
)
def test_is_valid_mx_pattern(pattern: str, valid: bool) -> None:
    """The mx pattern check accepts LDH names with an optional '*.' and nothing else."""
    assert is_valid_mx_pattern(pattern) is valid


# --- §4.1: MX host matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "hostname", "expected"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM", True),
        ("MAIL.example.com", "mail.example.com", True),
        ("mail.example.com", "mail.example.com.", True),
        ("mail.example.com", "mail.example.com..", False),
        ("mail.example.com", "other.example.com", False),
        ("mail.example.com", "mail.example.com.evil", False),
        ("example.com", "mail.example.com", False),
        ("mail.example.com", "", False),
        ("mail.example.com", ".", False),
        # The reference's wildcard examples.
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "foo.bar.example.com", False),
        ("*.example.com", "Mail.EXAMPLE.com.", True),
        ("*.Example.COM", "mail.example.com", True),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mailexample.com", False),
        ("*.example.net", "mail.example.com", False),
        # RFC sample policy.
        ("*.example.net", "mx1.example.net", True),
        ("backupmx.example.com", "backupmx.example.com", True),
        # A-labels only.
        ("xn--bcher-kva.example", "XN--BCHER-KVA.example.", True),
        ("xn--bcher-kva.example", "bücher.example", False),
    ],
)
def test_mx_matches(pattern: str, hostname: str, expected: bool) -> None:
    """MX names match patterns as RFC 8461 §4.1 says."""
    assert mx_matches(pattern, hostname) is expected


# --- §6: replies to Postfix -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "framed"),
    [
        (b"", b"0:,"),
        (b"OK x", b"4:OK x,"),
        (b"NOTFOUND ", b"9:NOTFOUND ,"),
        ("é".encode(), b"2:\xc3\xa9,"),
        (b"a" * 12, b"12:" + b"a" * 12 + b","),
    ],
)
def test_netstring(payload: bytes, framed: bytes) -> None:
    """netstring frames a payload with its byte length."""
    assert netstring(payload) == framed


def test_notfound_constant() -> None:
    """NOTFOUND is the framed NOTFOUND with its trailing space."""
    assert NOTFOUND == b"9:NOTFOUND ,"


@pytest.mark.parametrize(
    ("reason", "framed"),
    [
        ("store unreadable", b"21:TEMP store unreadable,"),
        ("reply too large", b"20:TEMP reply too large,"),
        ("bad\r\nline\x00é{x}", b"17:TEMP bad?line?{x},"),
        ("", b"19:TEMP internal error,"),
        (" \n ", b"6:TEMP ?,"),
        ("x" * 1000, netstring(b"TEMP " + b"x" * 200)),
    ],
)
def test_temp_reply(reason: str, framed: bytes) -> None:
    """temp_reply frames TEMP with a bounded, printable-ASCII reason."""
    assert temp_reply(reason) == framed


def parse_netstring(data: bytes) -> bytes:
    """Return the payload of exactly one netstring, asserting its framing."""
    length, colon, rest = data.partition(b":")
    assert colon
    assert length.isdigit()
    assert str(int(length)).encode() == length
    assert rest[int(length) :] == b","
    return rest[: int(length)]


RFC_POLICY = Policy(mode="enforce", mx=RFC_MX, max_age=604800, lines=RFC_LINES)
RFC_PLAIN = b"OK secure match=mail.example.com:.example.net:backupmx.example.com"
STRICT = ReplyOptions(strict_testing=True)
NO_SNI = ReplyOptions(require_sni=False)
TLSRPT = ReplyOptions(tlsrpt_attributes=True)


def with_mode(mode: str, policy: Policy = RFC_POLICY) -> Policy:
    """Return C{policy} with another mode."""
    return Policy(mode=mode, mx=policy.mx, max_age=policy.max_age, lines=policy.lines)


@pytest.mark.parametrize(
    ("policy", "options", "payload"),
    [
        # enforce, with and without servername=hostname.
        (RFC_POLICY, ReplyOptions(), RFC_PLAIN + b" servername=hostname"),
        (RFC_POLICY, NO_SNI, RFC_PLAIN),
        (RFC_POLICY, STRICT, RFC_PLAIN + b" servername=hostname"),
        # testing only with strict_testing; none never.
        (with_mode("testing"), ReplyOptions(), b"NOTFOUND "),
        (with_mode("testing"), TLSRPT, b"NOTFOUND "),
        (with_mode("testing"), STRICT, RFC_PLAIN + b" servername=hostname"),
        (with_mode("testing"), ReplyOptions(True, False, False), RFC_PLAIN),
        (with_mode("none"), ReplyOptions(), b"NOTFOUND "),
        (with_mode("none"), ReplyOptions(True, True, True), b"NOTFOUND "),
        (Policy("none", (), 86400, (V, "mode: none", A)), STRICT, b"NOTFOUND "),
        # Defensive: a hand-built policy that parse_policy would never return.
        (Policy("enforce", (), 86400, ()), ReplyOptions(), b"NOTFOUND "),
        (Policy("Enforce", RFC_MX, 86400, ()), STRICT, b"NOTFOUND "),
        (Policy("enforce", ("a.example", "x y"), 1, ()), ReplyOptions(),
         b"TEMP invalid policy data"),
        (Policy("enforce", ("a.example servername=evil",), 1, ()), TLSRPT,
         b"TEMP invalid policy data"),
        # Patterns lower-cased; "*.x" written ".x"; policy order kept.
        (Policy("enforce", ("B.example", "*.A.example", "a.example"), 1, ()), ReplyOptions(),
         b"OK secure match=b.example:.a.example:a.example servername=hostname"),
    ],
)  # fmt: skip
def test_policy_reply(policy: Policy, options: ReplyOptions, payload: bytes) -> None:
    """policy_reply answers each mode and zone option as reference §6 says."""
    assert policy_reply("example.com", policy, options) == netstring(payload)


def test_policy_reply_from_parsed_rfc_example() -> None:
    """The RFC's sample policy gives the reference's exact reply."""
    reply = policy_reply("example.com", parse_policy(RFC_BODY), ReplyOptions())
    assert reply == netstring(
        b"OK secure match=mail.example.com:.example.net:backupmx.example.com servername=hostname"
    )


REFERENCE_STS_BODY = body(
    "version: STSv1",
    "mode: enforce",
    "mx: mail.example.com",
    "mx: *.example.net",
    "max_age: 604800",
)
REFERENCE_STS_REPLY = (
    b"OK secure match=mail.example.com:.example.net servername=hostname policy_type=sts"
    b" policy_domain=example.com mx_host_pattern=mail.example.com mx_host_pattern=*.example.net"
    b" { policy_string = version: STSv1 } { policy_string = mode: enforce }"
    b" { policy_string = mx: mail.example.com } { policy_string = mx: *.example.net }"
    b" { policy_string = max_age: 604800 }"
)


def test_policy_reply_sts_attributes_reference_example() -> None:
    """With tlsrpt_attributes the reply is the reference's example, on one line."""
    policy = parse_policy(REFERENCE_STS_BODY)
    assert policy_reply("example.com", policy, TLSRPT) == netstring(REFERENCE_STS_REPLY)


@pytest.mark.parametrize("domain", ["example.com", "Example.COM.", "EXAMPLE.com"])
def test_policy_reply_policy_domain_normal(domain: str) -> None:
    """policy_domain is written in lower case without a trailing dot."""
    policy = parse_policy(REFERENCE_STS_BODY)
    assert policy_reply(domain, policy, TLSRPT) == netstring(REFERENCE_STS_REPLY)


def test_policy_reply_sts_attributes_without_sni() -> None:
    """Without require_sni the STS attributes follow match= directly."""
    policy = parse_policy(body(V, E, "mx: MX.example.com", A))
    options = ReplyOptions(require_sni=False, tlsrpt_attributes=True)
    assert policy_reply("example.com", policy, options) == netstring(
        b"OK secure match=mx.example.com policy_type=sts policy_domain=example.com"
        b" mx_host_pattern=mx.example.com { policy_string = version: STSv1 }"
        b" { policy_string = mode: enforce } { policy_string = mx: MX.example.com }"
        b" { policy_string = max_age: 86400 }"
    )


def test_policy_reply_bad_domain_omits_sts_attributes() -> None:
    """A domain that is no valid A-label name never reaches the reply; the plain reply does."""
    policy = parse_policy(REFERENCE_STS_BODY)
    with capturedLogs() as events:
        reply = policy_reply("evil.example servername=x", policy, TLSRPT)
    assert reply == netstring(b"OK secure match=mail.example.com:.example.net servername=hostname")
    assert [e["log_level"] for e in events] == [LogLevel.warn]


def test_policy_reply_leaves_out_unsafe_lines() -> None:
    """Lines with braces or control characters stay out of policy_string; the rest is kept."""
    policy = parse_policy(
        body(
            V,
            "mx:\tmail.example.com",
            "note: } servername=evil {",
            "note: a { b",
            "note: c\x85d",
            "note: café",
            "mode: enforce",
            A,
        )
    )
    assert policy_reply("example.com", policy, TLSRPT) == netstring(
        "OK secure match=mail.example.com servername=hostname policy_type=sts"
        " policy_domain=example.com mx_host_pattern=mail.example.com"
        " { policy_string = version: STSv1 } { policy_string = note: café }"
        " { policy_string = mode: enforce } { policy_string = max_age: 86400 }".encode()
    )


def test_policy_reply_names_sni_once() -> None:
    """servername=hostname appears exactly once, whatever the options."""
    for options in (ReplyOptions(), STRICT, TLSRPT, ReplyOptions(True, True, True)):
        payload = parse_netstring(policy_reply("example.com", RFC_POLICY, options))
        assert payload.count(b"servername=") == 1


def many_patterns(count: int) -> tuple[str, ...]:
    """Return C{count} distinct 62-octet mx patterns."""
    return tuple(f"mx{i:05d}.{'a' * 42}.example.com" for i in range(count))


def test_policy_reply_drops_policy_strings_when_too_large() -> None:
    """An oversized reply first loses its policy_string attributes, with a warning."""
    lines = [V, E, MX, A] + [f"note{i}: {'x' * 100}" for i in range(1000)]
    policy = parse_policy(body(*lines))
    with capturedLogs() as events:
        reply = policy_reply("example.com", policy, TLSRPT)
    assert reply == netstring(
        b"OK secure match=mail.example.com servername=hostname policy_type=sts"
        b" policy_domain=example.com mx_host_pattern=mail.example.com"
    )
    assert [e["log_level"] for e in events] == [LogLevel.warn]
    assert events[0]["dropped"] == "policy_string attributes"


def test_policy_reply_drops_sts_attributes_when_too_large() -> None:
    """If the STS attributes alone are too large, the plain reply is sent in full."""
    patterns = many_patterns(1000)
    policy = Policy("enforce", patterns, 86400, ())
    with capturedLogs() as events:
        reply = policy_reply("example.com", policy, TLSRPT)
    payload = parse_netstring(reply)
    assert payload == ("OK secure match=" + ":".join(patterns) + " servername=hostname").encode()
    assert MAX_REPLY // 2 < len(payload) <= MAX_REPLY
    assert [e["dropped"] for e in events] == ["all STS attributes"]


def test_policy_reply_exact_limit() -> None:
    """A payload of exactly MAX_REPLY bytes is sent; one byte more is not."""
    prefix = len("OK secure match=")
    count = (MAX_REPLY - prefix) // 63
    patterns = list(many_patterns(count))
    rest = MAX_REPLY - prefix - 63 * count + 1  # bytes the last pattern must add
    patterns[-1] = "b" * (rest - 1) + "." + patterns[-1]
    policy = Policy("enforce", tuple(patterns), 1, ())
    payload = parse_netstring(policy_reply("example.com", policy, NO_SNI))
    assert len(payload) == MAX_REPLY
    longer = Policy("enforce", (*patterns[:-1], "c" + patterns[-1]), 1, ())
    with capturedLogs():
        assert policy_reply("example.com", longer, NO_SNI) == temp_reply("reply too large")


def test_policy_reply_temp_when_plain_reply_too_large() -> None:
    """Never truncate match= nor answer NOTFOUND: a plain reply over the limit is TEMP."""
    policy = Policy("enforce", many_patterns(2000), 86400, ())
    for options in (ReplyOptions(), TLSRPT):
        with capturedLogs() as events:
            reply = policy_reply("example.com", policy, options)
        assert reply == netstring(b"TEMP reply too large")
        assert events[-1]["log_level"] == LogLevel.error


def test_policy_reply_from_parsed_temp_on_bad_patterns() -> None:
    """A hand-built policy with an unvalidated pattern is an internal error, logged."""
    with capturedLogs() as events:
        reply = policy_reply("example.com", Policy("enforce", ("a b",), 1, ()), TLSRPT)
    assert reply == netstring(b"TEMP invalid policy data")
    assert events[0]["log_level"] == LogLevel.error


_OUTSIDE_TOKEN = re.compile(
    rb"OK|secure|match=[a-z0-9.:-]+|servername=hostname|policy_type=sts"
    rb"|policy_domain=[a-z0-9.-]+|mx_host_pattern=[a-z0-9.*-]+"
)


@given(
    mode=st.sampled_from(["enforce", "testing", "none"]),
    patterns=st.lists(_PATTERN, min_size=1, max_size=4, unique=True),
    lines=st.lists(st.text(max_size=30), max_size=6),
    options=st.builds(ReplyOptions, st.booleans(), st.booleans(), st.booleans()),
)
def test_policy_reply_never_injects(
    mode: str, patterns: list[str], lines: list[str], options: ReplyOptions
) -> None:
    """Replies are one bounded netstring without line breaks; policy text stays in braces."""
    policy = Policy(mode, tuple(patterns), 86400, tuple(lines))
    payload = parse_netstring(policy_reply("example.com", policy, options))
    assert len(payload) <= MAX_REPLY
    assert b"\n" not in payload
    assert b"\r" not in payload
    if payload == b"NOTFOUND ":
        assert mode == "none" or (mode == "testing" and not options.strict_testing)
        return
    outside = re.sub(rb" \{ policy_string = [^{}]* \}", b"", payload)
    assert b"{" not in outside
    assert b"}" not in outside
    assert all(_OUTSIDE_TOKEN.fullmatch(t) for t in outside.split(b" "))
    assert outside.count(b"match=") == 1
    assert outside.count(b"servername=") == int(options.require_sni)
    text = payload.decode("utf-8")
    assert not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)
