"""MTA-STS rules as pure functions: keys, TXT records, policy bodies, Postfix replies.

Everything here takes values and returns values (RFC 8461; ``reference/mta-sts.md`` §1, §2,
§4 and §6). Nothing waits, reads a clock or touches the network.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import idna
from twisted.logger import Logger

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_REPLY",
    "NOTFOUND",
    "InvalidRecord",
    "NoRecord",
    "Policy",
    "PolicyError",
    "RecordError",
    "ReplyOptions",
    "is_valid_mx_pattern",
    "mx_matches",
    "netstring",
    "normalise_key",
    "parse_policy",
    "parse_sts_records",
    "policy_reply",
    "temp_reply",
]

_log = Logger()

MAX_AGE_LIMIT: int = 31557600
"""The largest ``max_age`` (RFC 8461 §3.2); larger values are clamped to it."""

MAX_REPLY: int = 100000
"""The largest reply payload, in bytes, Postfix accepts by default (socketmap_table(5))."""

_MAX_KEY = 2048
"""Keys longer than this cannot name a domain even in U-labels: ``NOTFOUND`` at once."""

_MAX_REASON = 200
"""The longest ``TEMP`` reason sent, in characters."""

_SHOW = 60
"""The longest excerpt of received text quoted in an error message."""


def _show(value: str | bytes) -> str:
    """Return C{value} as a short, printable-ASCII, quoted excerpt for messages and logs."""
    shown = (
        repr(value[:_SHOW]).removeprefix("b") if isinstance(value, bytes) else ascii(value[:_SHOW])
    )
    if len(value) > _SHOW:
        shown += "..."
    return shown


# --- Domain names -------------------------------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_FAST_KEY_RE = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}".encode("ascii"))
_PORT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME = 253


def _valid_name(name: str) -> bool:
    """Return whether C{name} is lower-case LDH labels, <= 253 octets, with >= 2 labels.

    A name whose last label is all digits (a dotted-quad address, or a short form such as
    C{127.1}) is refused too: no top-level domain is numeric (RFC 3696 §2).
    """
    if len(name) > _MAX_NAME or _NAME_RE.fullmatch(name) is None:
        return False
    _, dot, last = name.rpartition(".")
    return bool(dot) and not last.isdigit()


def _split_key(key: str) -> str | None:
    """Remove square brackets and a port from a next-hop key; C{None} if malformed."""
    if key.startswith("["):
        end = key.find("]")
        if end < 0:
            return None
        host, rest = key[1:end], key[end + 1 :]
        if not host or "[" in host or "]" in rest:
            return None
        if rest and (rest[0] != ":" or _PORT_RE.fullmatch(rest[1:]) is None):
            return None
        return host
    if "]" in key:
        return None
    host, colon, port = key.partition(":")
    # Two or more colons: an IPv6 address (never split), or garbage; neither has a policy.
    if colon and (":" in port or _PORT_RE.fullmatch(port) is None):
        return None
    return host


def normalise_key(key: bytes) -> str | None:
    """Turn a socketmap key into its policy domain, or C{None} meaning "answer NOTFOUND".

    @param key: the request's bytes after the map name and its space: a next-hop destination
        such as C{example.com}, C{[mx.example.com]:587}, C{example.com:submission}.
    @return: the policy domain in A-labels, lower-case, without a trailing dot; C{None} for an
        empty key, a parent-domain probe (C{.example.com}), an address literal, malformed
        brackets or port, bad UTF-8, control characters, an invalid or single-label name, or a
        pathname. Never raises.
    """
    # The common case, an already normal domain, skips everything below.
    if len(key) <= _MAX_NAME and _FAST_KEY_RE.fullmatch(key) is not None:
        if not key.rpartition(b".")[2].isdigit():
            return key.decode("ascii")
        return None
    if not key or key.startswith(b".") or len(key) > _MAX_KEY:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL_RE.search(text) is not None:
        return None
    host = _split_key(text)
    if not host:
        return None
    if ":" in host:  # an IPv6 literal, tagged ([ipv6:...]) or not
        return None
    host = host.removesuffix(".")
    if host.isascii():
        name = host.lower()
    else:
        try:
            name = idna.encode(host, uts46=True).decode("ascii").lower()
        except (UnicodeError, ValueError):
            return None
    return name if _valid_name(name) else None


# --- The _mta-sts TXT record ----------------------------------------------------------------


class RecordError(ValueError):
    """No usable C{_mta-sts} record; C{str()} gives a short human reason."""


class NoRecord(RecordError):
    """No C{v=STSv1} candidate among the TXT records."""


class InvalidRecord(RecordError):
    """Several C{v=STSv1} candidates, or the only candidate is invalid."""


_CANDIDATE_RE = re.compile(rb"v=STSv1[ \t]*;")
_DELIM_RE = re.compile(rb"[ \t]*;[ \t]*")
_TXT_FIELD_RE = re.compile(rb"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_TXT_ID_RE = re.compile(rb"[A-Za-z0-9]{1,32}")
_VERSION_LEN = len(b"v=STSv1")


def parse_sts_records(records: Sequence[bytes]) -> str:
    """Select the one C{v=STSv1} record among C{records} and return its id (RFC 8461 §3.1).

    @param records: the TXT records at C{_mta-sts.<domain>}, each record's strings already
        joined into one value.
    @raise NoRecord: no record begins with C{v=STSv1} and a C{;} delimiter.
    @raise InvalidRecord: two or more candidates, or the candidate breaks the grammar.
    """
    candidates = [r for r in records if _CANDIDATE_RE.match(r) is not None]
    if not candidates:
        raise NoRecord("no v=STSv1 record")
    if len(candidates) > 1:
        raise InvalidRecord(f"{len(candidates)} v=STSv1 records")
    record = candidates[0]
    if not record.isascii():
        raise InvalidRecord(f"record {_show(record)} is not US-ASCII")
    # The candidate starts with a delimiter, so the first piece is empty; a last empty piece
    # is the optional final delimiter.
    fields = _DELIM_RE.split(record[_VERSION_LEN:])[1:]
    if fields[-1] == b"":
        fields.pop()
    if not fields:
        raise InvalidRecord("record has no fields")
    sts_id: bytes | None = None
    for field in fields:
        match = _TXT_FIELD_RE.fullmatch(field)
        if match is None:
            what = "empty field" if not field else f"malformed field {_show(field)}"
            raise InvalidRecord(f"{what} in record {_show(record)}")
        if match[1] == b"id":
            if _TXT_ID_RE.fullmatch(match[2]) is None:
                raise InvalidRecord(f"id {_show(match[2])} is not 1-32 letters or digits")
            if sts_id is None:
                sts_id = match[2]
    if sts_id is None:
        raise InvalidRecord(f"no id in record {_show(record)}")
    return sts_id.decode("ascii")


# --- The policy body ------------------------------------------------------------------------


class PolicyError(ValueError):
    """The policy body is invalid; C{str()} gives a short reason with its line number."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A valid MTA-STS policy (RFC 8461 §3.2)."""

    mode: str
    """C{"enforce"}, C{"testing"} or C{"none"}."""
    mx: tuple[str, ...]
    """Validated patterns, lower-cased, de-duplicated keeping first position, C{*.} kept."""
    max_age: int
    """Seconds, clamped to L{MAX_AGE_LIMIT}."""
    lines: tuple[str, ...]
    """The received non-blank lines without terminators (a leading BOM dropped), in order."""


_BOM = "\ufeff"
_MODES = frozenset({"enforce", "testing", "none"})
_POLICY_LINE_RE = re.compile(r"[ \t]*([A-Za-z0-9][A-Za-z0-9_.-]{0,31})[ \t]*:[ \t]*(.*?)[ \t]*")
# Printable ASCII or any non-ASCII character; inner spaces allowed, none at the ends.
_EXT_VALUE_RE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
_MX_RE = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}", re.IGNORECASE | re.ASCII)
_DOTTED_QUAD_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


def is_valid_mx_pattern(pattern: str) -> bool:
    """Return whether C{pattern} is a valid C{mx} value (RFC 8461 §3.2, §4.1).

    LDH labels of 1-63 octets, optionally prefixed by C{*.}, at most 253 octets; no U-labels,
    no trailing dot, no dotted-quad address (any letter case is accepted).
    """
    return (
        len(pattern) <= _MAX_NAME
        and pattern.isascii()
        and _MX_RE.fullmatch(pattern) is not None
        and _DOTTED_QUAD_RE.fullmatch(pattern) is None
    )


def _policy_value(lineno: int, name: str, value: str) -> str | int:
    """Check one known field's value; return it (an C{int} for C{max_age})."""
    if name == "version":
        if value != "STSv1":
            raise PolicyError(f"line {lineno}: version {_show(value)} is not STSv1")
        return value
    if name == "mode":
        if value not in _MODES:
            raise PolicyError(f"line {lineno}: mode {_show(value)} is not enforce, testing or none")
        return value
    if name == "max_age":
        if _MAX_AGE_RE.fullmatch(value) is None:
            raise PolicyError(f"line {lineno}: max_age {_show(value)} is not 1-10 digits")
        return min(int(value), MAX_AGE_LIMIT)
    # mx
    if not is_valid_mx_pattern(value):
        raise PolicyError(f"line {lineno}: mx {_show(value)} is not a valid host pattern")
    return value.lower()


def parse_policy(body: bytes) -> Policy:
    """Parse and validate an MTA-STS policy body (RFC 8461 §3.2; reference §4).

    Lines end in LF or CRLF; blank lines, one leading byte-order mark and spaces/tabs around
    names and values are ignored. The first C{version}, C{mode} and C{max_age} win, but every
    repetition must be valid; every C{mx} line counts. Unknown fields must be well-formed.

    @raise PolicyError: the body is not a valid policy; nothing of it may be applied.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"not UTF-8 (byte {e.start})") from None
    text = text.removeprefix(_BOM)
    fields: dict[str, str | int] = {}
    mx: dict[str, None] = {}
    lines: list[str] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(" \t"):
            continue
        if "\r" in line:
            raise PolicyError(f"line {lineno}: bare CR")
        match = _POLICY_LINE_RE.fullmatch(line)
        if match is None:
            raise PolicyError(f"line {lineno}: {_show(line)} is not 'name: value'")
        name, value = match[1], match[2]
        if name in ("version", "mode", "max_age", "mx"):
            checked = _policy_value(lineno, name, value)
            if name == "mx":
                mx[str(checked)] = None
            else:
                fields.setdefault(name, checked)
        elif _EXT_VALUE_RE.fullmatch(value) is None:
            raise PolicyError(f"line {lineno}: field {name} has a bad value {_show(value)}")
        lines.append(line)
    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise PolicyError(f"no {required} field")
    mode = str(fields["mode"])
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without mx")
    max_age = fields["max_age"]
    assert isinstance(max_age, int)
    return Policy(mode=mode, mx=tuple(mx), max_age=max_age, lines=tuple(lines))


def mx_matches(pattern: str, hostname: str) -> bool:
    """Return whether MX host C{hostname} matches C{mx} pattern C{pattern} (RFC 8461 §4.1).

    Comparison is case-insensitive on A-labels, one trailing dot on C{hostname} is ignored,
    and C{*.example.com} matches exactly one more label (C{mail.example.com}), not
    C{example.com} nor C{a.b.example.com}.
    """
    if not (pattern.isascii() and hostname.isascii()):
        return False
    pattern = pattern.lower()
    host = hostname.lower().removesuffix(".")
    if not host or not pattern:
        return False
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


# --- Replies to Postfix ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """How one socketmap name ("zone") turns a policy into a Postfix reply."""

    strict_testing: bool = False
    """Answer C{testing} policies like C{enforce} (beyond RFC 8461 §5)."""
    require_sni: bool = True
    """Add C{servername=hostname} (Postfix >= 3.4; RFC 8461 §7.1)."""
    tlsrpt_attributes: bool = False
    """Append the STS attributes (Postfix >= 3.10; rejected by older versions)."""


def netstring(payload: bytes) -> bytes:
    """Frame C{payload} as a netstring: C{b"<length>:<payload>,"}."""
    return b"%d:%s," % (len(payload), payload)


NOTFOUND: bytes = netstring(b"NOTFOUND ")
"""The framed C{NOTFOUND } reply (with its trailing space)."""

_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]+")


def temp_reply(reason: str) -> bytes:
    """Return the framed C{TEMP <reason>} reply; C{reason} becomes bounded printable ASCII."""
    clean = _UNPRINTABLE_RE.sub("?", reason).strip()[:_MAX_REASON] or "internal error"
    return netstring(b"TEMP " + clean.encode("ascii"))


def _braces_safe(line: str) -> bool:
    """Return whether C{line} may appear inside C{{ policy_string = ... }}."""
    if "{" in line or "}" in line:
        return False
    if line.isascii():
        return _CONTROL_RE.search(line) is None
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in line)


def policy_reply(domain: str, policy: Policy, options: ReplyOptions) -> bytes:
    """Return the complete framed reply for C{policy} of C{domain} (reference §6).

    C{NOTFOUND } for mode C{none} and, unless C{options.strict_testing}, C{testing}; otherwise
    C{OK secure match=... [servername=hostname] [STS attributes]}. Only validated patterns
    and the validated domain appear outside braces; policy lines with braces or control
    characters are left out. A payload over L{MAX_REPLY} loses its C{policy_string}
    attributes, then all STS attributes; if even that is too large, C{TEMP reply too large}.
    """
    if policy.mode == "none" or (policy.mode == "testing" and not options.strict_testing):
        return NOTFOUND
    if policy.mode not in _MODES or not policy.mx:
        return NOTFOUND
    if not all(is_valid_mx_pattern(p) for p in policy.mx):
        _log.error("refusing to answer with invalid mx patterns for {domain}", domain=domain)
        return temp_reply("invalid policy data")
    patterns = [p.lower() for p in policy.mx]
    match = ":".join(p[1:] if p.startswith("*.") else p for p in patterns)
    plain = "OK secure match=" + match
    if options.require_sni:
        plain += " servername=hostname"
    # The candidate payloads, best first, each with what it leaves out.
    replies = [("", plain.encode("ascii"))]
    if options.tlsrpt_attributes:
        policy_domain = domain.lower().removesuffix(".")
        if _valid_name(policy_domain):
            sts = [plain, "policy_type=sts", "policy_domain=" + policy_domain]
            sts.extend("mx_host_pattern=" + p for p in patterns)
            strings = [
                "{ policy_string = " + line + " }" for line in policy.lines if _braces_safe(line)
            ]
            replies = [
                ("", " ".join(sts + strings).encode("utf-8")),
                ("policy_string attributes", " ".join(sts).encode("ascii")),
                ("all STS attributes", plain.encode("ascii")),
            ]
        else:
            _log.warn("no STS attributes: bad policy domain {domain!r}", domain=domain)
    for dropped, payload in replies:
        if len(payload) <= MAX_REPLY:
            if dropped:
                _log.warn(
                    "reply for {domain} over {limit} bytes: dropped {dropped}",
                    domain=domain,
                    limit=MAX_REPLY,
                    dropped=dropped,
                )
            return netstring(payload)
    _log.error(
        "reply for {domain} over {limit} bytes even without STS attributes: TEMP",
        domain=domain,
        limit=MAX_REPLY,
    )
    return temp_reply("reply too large")
