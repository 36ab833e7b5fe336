"""The C{_smtp._tls} TXT record: who takes TLS reports, and where (RFC 8460 §3, §3.1).

Pure functions (``reference/tlsrpt.md`` §1): the DNS layer hands over the TXT records with each
record's strings already joined; L{parse_tlsrpt_records} picks the one C{v=TLSRPTv1} record and
returns its usable C{rua} URIs. The record's grammar is enforced; each URI is then judged on its
own, so one malformed URI costs only itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import idna

__all__ = [
    "InvalidReportRecord",
    "NoReportRecord",
    "ReportRecord",
    "ReportRecordError",
    "is_domain_name",
    "mailto_address",
    "parse_tlsrpt_records",
]

_SHOW = 60
"""The longest excerpt of received text quoted in an error message."""


def _show(value: bytes) -> str:
    """Return C{value} as a short, printable-ASCII, quoted excerpt for messages."""
    shown = repr(value[:_SHOW]).removeprefix("b")
    return shown + "..." if len(value) > _SHOW else shown


def _quote(value: str) -> str:
    """Return C{value} quoted for a message, cut short if long."""
    return repr(value[:_SHOW]) + ("..." if len(value) > _SHOW else "")


# --- Domain names -------------------------------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")
_MAX_NAME = 253


def is_domain_name(name: str) -> bool:
    """Return whether C{name} is a fully qualified domain name written in A-labels.

    Lower-case LDH labels of 1-63 octets, at least two labels, at most 253 octets, no trailing
    dot, a top-level label that is not all digits (so no dotted-quad address), and every
    C{xn--} label a valid A-label.
    """
    if len(name) > _MAX_NAME or _NAME_RE.fullmatch(name) is None:
        return False
    if name.rpartition(".")[2].isdigit():
        return False
    if "xn--" in name:
        try:
            idna.decode(name)
        except (UnicodeError, ValueError):
            return False
    return True


def _a_label_name(name: str) -> str | None:
    """Return C{name} lower-cased in A-labels if it is a valid domain name, else C{None}."""
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (UnicodeError, ValueError):
            return None
    name = name.lower()
    return name if is_domain_name(name) else None


# --- URIs -----------------------------------------------------------------------------------

# RFC 3986 characters, with "!", "," and ";" left out: RFC 8460 §3 requires them
# percent-encoded inside a tlsrpt-uri ("," and ";" never get here: they split URIs and fields).
_URI_CHAR_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@$&'()*+=%]*")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")

# RFC 6068 §2: hfields = "?" hfield *( "&" hfield ); hfield = hfname "=" hfvalue; *qchar each.
_QCHAR = r"(?:[A-Za-z0-9\-._~$'()*+:@]|%[0-9A-Fa-f]{2})"
_HFIELDS_RE = re.compile(rf"{_QCHAR}*={_QCHAR}*(?:&{_QCHAR}*={_QCHAR}*)*")
# RFC 5322 §3.2.3, §3.4.1: dot-atom-text or a quoted-string (after percent-decoding).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART_RE = re.compile(
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*|\"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\""
)

# RFC 3986 §3.2-§3.5 for https: authority, then path-abempty, query and fragment.
_HTTPS_RE = re.compile(r"//(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)
_PCHAR = r"(?:[A-Za-z0-9\-._~$&'()*+=:@]|%[0-9A-Fa-f]{2})"
_HTTPS_REST_RE = re.compile(
    rf"(?:/(?:{_PCHAR}|/)*)?(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?"
)
_HOST_PORT_RE = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[^:]*))?")
_DOTTED_QUAD_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _check_uri_characters(uri: str) -> None:
    """Raise C{ValueError} naming the first character a tlsrpt-uri may not carry as is."""
    if _URI_CHAR_RE.fullmatch(uri) is None:
        bad = next(c for c in uri if _URI_CHAR_RE.fullmatch(c) is None)
        if bad == "!":
            raise ValueError("'!' must be percent-encoded")
        raise ValueError(f"character {bad!r} is not allowed in a URI")
    if _BAD_PERCENT_RE.search(uri) is not None:
        raise ValueError("malformed percent-encoding")


def _split_scheme(uri: str) -> tuple[str, str]:
    """Return C{(lower-cased scheme, rest)}, or raise C{ValueError} if C{uri} has no scheme."""
    scheme, colon, rest = uri.partition(":")
    if not colon or _SCHEME_RE.fullmatch(scheme) is None:
        raise ValueError("not a URI (no scheme, e.g. mailto:)")
    return scheme.lower(), rest


def mailto_address(uri: str) -> str:
    """Return the address of a C{mailto:} URI as an addr-spec with an A-label domain.

    RFC 6068: the C{to} part is percent-decoded (UTF-8) and must be exactly one addr-spec whose
    local part is a dot-atom or a quoted string and whose domain is a fully qualified name
    (no address literal). Header fields after C{?} must be well-formed and are ignored.

    @raise ValueError: C{uri} is not such a URI; C{str()} gives the reason.
    """
    _check_uri_characters(uri)
    scheme, rest = _split_scheme(uri)
    if scheme != "mailto":
        raise ValueError(f"scheme {_quote(scheme)} is not mailto")
    to, question, hfields = rest.partition("?")
    if "#" in rest:
        raise ValueError("'#' is not allowed in a mailto URI")
    if question and _HFIELDS_RE.fullmatch(hfields) is None:
        raise ValueError("malformed header fields after '?'")
    if not to:
        raise ValueError("no address after mailto:")
    try:
        address = unquote_to_bytes(to).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("percent-encoded address is not UTF-8") from None
    local, at, domain = address.rpartition("@")
    if not at:
        raise ValueError("address has no '@'")
    if _LOCAL_PART_RE.fullmatch(local) is None:
        raise ValueError(f"malformed local part {_quote(local)}")
    if domain.startswith("["):
        raise ValueError("address literals are not supported")
    name = _a_label_name(domain)
    if name is None:
        raise ValueError(f"{_quote(domain)} is not a fully qualified domain name")
    return f"{local}@{name}"


def _https_key(uri: str) -> str:
    """Check an C{https:} URL; return it with scheme and host lower-cased (the dedup key).

    @raise ValueError: the URL is malformed; C{str()} gives the reason.
    """
    _check_uri_characters(uri)
    _, rest = _split_scheme(uri)
    match = _HTTPS_RE.fullmatch(rest)
    if match is None:
        raise ValueError("https URL has no '//' authority")
    authority, path = match["authority"], match["rest"]
    if "@" in authority:
        raise ValueError("user information is not allowed in an https URL")
    host_port = _HOST_PORT_RE.fullmatch(authority)
    if host_port is None or "%" in authority:
        raise ValueError(f"malformed host {_quote(authority)}")
    if not host_port["host"]:
        raise ValueError("https URL has no host")
    host, port = host_port["host"], host_port["port"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"malformed IPv6 literal {_quote(host)}") from None
    elif _DOTTED_QUAD_RE.fullmatch(host) is not None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"malformed IPv4 address {_quote(host)}") from None
    elif not is_domain_name(host.lower()):
        raise ValueError(f"host {_quote(host)} is not a fully qualified domain name")
    if port is not None and (_PORT_RE.fullmatch(port) is None or not 0 < int(port) < 65536):
        raise ValueError(f"bad port {_quote(port)}")
    if path.count("#") > 1 or _HTTPS_REST_RE.fullmatch(path) is None:
        raise ValueError("malformed path, query or fragment")
    return "https://" + authority.lower() + path


def _uri_key(uri: str) -> str:
    """Return the de-duplication key of a usable URI; raise C{ValueError} why it is not."""
    if not uri:
        raise ValueError("empty URI")
    _check_uri_characters(uri)
    scheme, _ = _split_scheme(uri)
    if scheme == "mailto":
        return "mailto:" + mailto_address(uri)
    if scheme == "https":
        return _https_key(uri)
    raise ValueError(f"unsupported scheme {_quote(scheme)}")


# --- The record -----------------------------------------------------------------------------


class ReportRecordError(ValueError):
    """The domain takes no reports; C{str()} gives a short human reason."""


class NoReportRecord(ReportRecordError):
    """No C{v=TLSRPTv1} candidate among the TXT records."""


class InvalidReportRecord(ReportRecordError):
    """Several candidates, or the only one breaks the grammar or has no usable C{rua} URI."""


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """The reporting destinations of a valid C{_smtp._tls} record."""

    rua: tuple[str, ...]
    """The usable C{mailto:} and C{https:} URIs as published, in record order, de-duplicated
    (scheme, host and mail domain compared without case); never empty."""
    skipped: tuple[tuple[str, str], ...]
    """C{(uri, reason)} for each malformed or unsupported URI, in record order."""


_CANDIDATE_RE = re.compile(rb"v=TLSRPTv1[ \t]*;")
_DELIM_RE = re.compile(rb"[ \t]*;[ \t]*")
_FIELD_RE = re.compile(rb"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=(.*)", re.DOTALL)
_EXT_VALUE_RE = re.compile(rb"[\x21-\x3a\x3c\x3e-\x7e]+")
_URI_DELIM_RE = re.compile(rb"[ \t]*,[ \t]*")
_VERSION_LEN = len(b"v=TLSRPTv1")


def parse_tlsrpt_records(records: Sequence[bytes]) -> ReportRecord:
    """Select the one C{v=TLSRPTv1} record among C{records} and return its destinations.

    A candidate begins with C{v=TLSRPTv1} (case-sensitive), optional spaces or tabs, and
    C{;}. Its fields follow RFC 8460 §3: C{rua} is required and may repeat (the URIs are
    merged, split on C{,} with optional spaces or tabs around it); other fields are
    extensions, ignored when well-formed. Each URI is then checked on its own (see
    L{mailto_address} for C{mailto:}; C{https:} needs a host and no user information);
    malformed and other-scheme URIs land in L{ReportRecord.skipped}.

    @param records: the TXT records at C{_smtp._tls.<domain>}, each record's strings already
        joined into one value.
    @raise NoReportRecord: no candidate.
    @raise InvalidReportRecord: two or more candidates, a field breaks the grammar, no C{rua}
        field, or no usable URI.
    """
    candidates = [r for r in records if _CANDIDATE_RE.match(r) is not None]
    if not candidates:
        raise NoReportRecord("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        raise InvalidReportRecord(f"{len(candidates)} v=TLSRPTv1 records")
    record = candidates[0]
    # The candidate continues with a delimiter, so the first piece is empty; a last empty
    # piece is the optional final delimiter.
    fields = _DELIM_RE.split(record[_VERSION_LEN:])[1:]
    if fields[-1] == b"":
        fields.pop()
    uris: list[bytes] = []
    has_rua = False
    for field in fields:
        match = _FIELD_RE.fullmatch(field)
        if match is None:
            what = "empty field" if not field else f"malformed field {_show(field)}"
            raise InvalidReportRecord(f"{what} in record {_show(record)}")
        if match[1] == b"rua":
            has_rua = True
            uris.extend(_URI_DELIM_RE.split(match[2]))
        elif _EXT_VALUE_RE.fullmatch(match[2]) is None:
            raise InvalidReportRecord(f"malformed value in field {_show(field)}")
    if not has_rua:
        raise InvalidReportRecord(f"no rua field in record {_show(record)}")
    usable: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for raw in uris:
        try:
            uri = raw.decode("ascii")
        except UnicodeDecodeError:
            skipped.append((raw.decode("utf-8", "replace"), "not US-ASCII"))
            continue
        try:
            usable.setdefault(_uri_key(uri), uri)
        except ValueError as e:
            skipped.append((uri, str(e)))
    if not usable:
        reasons = "; ".join(f"{_quote(uri)}: {why}" for uri, why in skipped[:3])
        raise InvalidReportRecord(f"no usable rua URI ({reasons})")
    return ReportRecord(rua=tuple(usable.values()), skipped=tuple(skipped))
