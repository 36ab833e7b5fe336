"""The configuration: a TOML file read into frozen dataclasses, validated once.

Every key is optional and has a default (``contrib/postfix-mtasts.toml`` lists them all).
A bad file raises :class:`ConfigError`, whose text is one line naming the file and the key::

    /etc/postfix-mtasts.toml: [dns] timeout: expected a number, got 'fast'
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import math
import os
import re
import tomllib
import types
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, tzinfo
from pathlib import Path
from typing import TypeVar, cast
from urllib.parse import unquote, urlsplit

import idna

from postfix_mtasts.mtasts.policy import ReplyOptions

__all__ = [
    "Config",
    "ConfigError",
    "DKIMConfig",
    "DNSConfig",
    "HTTPSConfig",
    "ServerConfig",
    "StoreConfig",
    "TLSRPTConfig",
    "load_config",
    "parse_config",
    "parse_nameserver",
    "state_dir",
]

DEFAULT_ZONE = "postfix"
DEFAULTS_SOURCE = "<defaults>"
MAX_TIMEOUT = 300.0
MAX_SEND_DELAY = 86400.0
_REPORTING_KEYS = ("organization_name", "contact_info")
_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line: ``<file>: <where>: <problem>``.

    ``where`` names the key (``[dns] timeout``), the line of a syntax error (``line 3``) or
    what failed (``cannot read``).
    """

    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(source, where, problem)
        self.source = source
        self.where = where
        self.problem = problem

    def __str__(self) -> str:
        return " ".join(f"{self.source}: {self.where}: {self.problem}".splitlines())


# -- the configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: where the policy map listens, and the account the services run as."""

    listen: tuple[str, ...] = ("tcp:8461:interface=127.0.0.1",)
    """Twisted server endpoint strings (``tcp:``, ``tcp6:``, ``unix:``, ``systemd:``)."""
    user: str = ""
    """Started as root, switch to this user (name or uid) once the listeners are bound."""
    group: str = ""
    """The only group to run with; empty means the user's own groups."""
    allow_root: bool = False
    """Run as root when no ``user`` is set instead of refusing to start."""


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus ``/metrics`` pages, off unless an endpoint is set."""

    serve: str = ""
    """Where ``serve`` publishes its metrics, e.g. ``tcp:9461``."""
    tail: str = ""
    """Where the ``tail`` service publishes its metrics, e.g. ``tcp:9462``."""

    @staticmethod
    def loopback(endpoint: str) -> str:
        """``endpoint`` with ``interface=`` set to loopback when a ``tcp``/``tcp6`` one has
        none, by name or by position: metrics are not published beyond the host unless asked
        for.  ``endpoint`` is a valid one (:func:`_check_endpoint`)."""
        kind, bound = _bind_endpoint(endpoint)
        if kind not in ("tcp", "tcp6") or "interface" in bound.arguments:
            return endpoint
        return endpoint + (r":interface=\:\:1" if kind == "tcp6" else ":interface=127.0.0.1")


@dataclass(frozen=True)
class DNSConfig:
    """``[dns]``: how policy records are looked up."""

    nameservers: tuple[str, ...] = ()
    """``ip``, ``ip:port``, ``[v6]:port`` or ``v6`` (see :func:`parse_nameserver`); empty
    means ``/etc/resolv.conf``."""
    timeout: float = 5.0
    """Seconds for a whole lookup."""


@dataclass(frozen=True)
class HTTPSConfig:
    """``[https]``: how policies are fetched."""

    ca_file: str = ""
    """A PEM bundle for policy hosts; empty means the system trust store."""
    timeout: float = 10.0
    """Seconds for a whole policy fetch."""


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: the SQLite file both jobs share."""

    path: str = ""
    """Empty means ``<state dir>/store.sqlite`` (see :func:`state_dir`)."""


@dataclass(frozen=True)
class DKIMConfig:
    """``[tlsrpt.dkim]``: built-in signing of report mail; all three keys or none."""

    domain: str = ""
    selector: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        """Whether reports are signed here rather than by the local MTA."""
        return bool(self.domain)


@dataclass(frozen=True)
class TLSRPTConfig:
    """``[tlsrpt]``: who this reporter is and how reports leave."""

    organization_name: str = ""
    contact_info: str = ""
    """A ``mailto:`` or ``https:`` URI; its domain is the report submitter."""
    submitter: str = ""
    """The reporting domain; must equal ``contact_info``'s domain when both are set."""
    mail_from: str = ""
    smtp: str = "127.0.0.1:25"
    sending_mta_ip: tuple[str, ...] = ()
    """Outbound addresses, in canonical text (RFC 5952 for IPv6)."""
    verify_https: bool = True
    """Whether an ``https:`` report endpoint's certificate must be valid (RFC 8460 §3 lets a
    sender ignore it)."""
    send: bool = False
    send_delay: float = 14400.0
    """Seconds after UTC midnight, at most, before a finished day's reports are sent."""
    log_timezone: str = "local"
    """The zone of log timestamps that carry none: ``local``, ``UTC`` or an IANA name."""
    dkim: DKIMConfig = DKIMConfig()

    @property
    def submitter_domain(self) -> str:
        """The TLS-Report-Submitter: ``submitter``, else ``contact_info``'s domain, else ``""``."""
        if self.submitter:
            return _domain(self.submitter)
        if self.contact_info:
            return _contact_domain(self.contact_info)
        return ""

    @property
    def sender(self) -> str:
        """The envelope sender of report mail: ``mail_from``, else ``tlsrpt-noreply@`` the
        submitter domain."""
        return self.mail_from or f"tlsrpt-noreply@{self.submitter_domain}"

    @property
    def smtp_address(self) -> tuple[str, int]:
        """``smtp`` as ``(host, port)``, brackets removed from an IPv6 host."""
        return _host_port(self.smtp, hostnames=True, default_port=None)

    @property
    def log_tzinfo(self) -> tzinfo | None:
        """The zone for log timestamps without one; ``None`` means the host's local time."""
        if self.log_timezone == "local":
            return None
        if self.log_timezone == "UTC":
            return UTC
        return zoneinfo.ZoneInfo(self.log_timezone)


def _default_zones() -> Mapping[str, ReplyOptions]:
    return types.MappingProxyType({DEFAULT_ZONE: ReplyOptions()})


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` is the defaults."""

    server: ServerConfig = ServerConfig()
    dns: DNSConfig = DNSConfig()
    https: HTTPSConfig = HTTPSConfig()
    store: StoreConfig = StoreConfig()
    zones: Mapping[str, ReplyOptions] = field(default_factory=_default_zones)
    """Reply options per socketmap name; always has ``postfix``."""
    tlsrpt: TLSRPTConfig = TLSRPTConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: str = DEFAULTS_SOURCE
    """The file read, or ``<defaults>``."""

    def zone(self, name: str) -> ReplyOptions:
        """The reply options of socketmap name ``name``; unknown names get ``postfix``'s."""
        return self.zones.get(name) or self.zones[DEFAULT_ZONE]

    def store_path(
        self, environ: Mapping[str, str] | None = None, *, euid: int | None = None
    ) -> Path:
        """``[store] path``, else ``store.sqlite`` in :func:`state_dir`."""
        if self.store.path:
            return Path(self.store.path)
        return state_dir(environ, euid=euid) / "store.sqlite"

    def require_reporting(self) -> None:
        """Raise :class:`ConfigError` naming the first key that building reports needs."""
        for key in _REPORTING_KEYS:
            if not getattr(self.tlsrpt, key):
                raise ConfigError(self.source, f"[tlsrpt] {key}", "required for reports")


def state_dir(environ: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """The directory for state files.

    ``$STATE_DIRECTORY`` (set by systemd; the first of several ``:``-separated paths), else
    ``/var/lib/postfix-mtasts`` when running as root, else ``$XDG_STATE_HOME/postfix-mtasts``
    or ``~/.local/state/postfix-mtasts``. ``euid`` defaults to the process's.
    """
    env = os.environ if environ is None else environ
    systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/postfix-mtasts")
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "postfix-mtasts"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "postfix-mtasts"


# -- reading -------------------------------------------------------------------------------


def load_config(path: str | None) -> Config:
    """Read and validate the file at ``path``; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, "cannot read", e.strerror or str(e)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}", "not valid UTF-8") from None
    return parse_config(text, path)


_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)$")


def parse_config(text: str, source: str) -> Config:
    """Validate TOML ``text``; errors name ``source`` as the file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = _TOML_POSITION.search(message)
        if match is None:
            raise ConfigError(source, "syntax error", message) from None
        problem = message[: match.start()]
        if match[1] is None:
            where = f"line {max(1, len(text.splitlines()))}"
            problem += " (at end of file)"
        else:
            where = f"line {match[1]}"
            problem += f" (column {match[2]})"
        raise ConfigError(source, where, problem[:1].lower() + problem[1:]) from None
    except ValueError as e:  # an integer of more digits than int() reads (no line known)
        raise ConfigError(source, "syntax error", str(e).partition(";")[0]) from None
    return _build(data, source)


def _build(data: Mapping[str, object], source: str) -> Config:
    root = _Table(source, "", data)
    sections = {"server", "dns", "https", "store", "zones", "tlsrpt", "metrics"}
    root.check_keys(sections)
    tlsrpt = root.table("tlsrpt")
    config = Config(
        server=_server(root.table("server")),
        dns=_dns(root.table("dns")),
        https=_https(root.table("https")),
        store=StoreConfig(path=root.table("store").check_keys({"path"}).string("path")),
        zones=_zones(root.table("zones")),
        tlsrpt=_tlsrpt(tlsrpt, _dkim(tlsrpt.table("dkim"))),
        metrics=_metrics(root.table("metrics")),
        source=source,
    )
    for key in _REPORTING_KEYS if config.tlsrpt.send else ():
        if not getattr(config.tlsrpt, key):
            raise tlsrpt.error(key, "required when send = true")
    return config


def _server(t: _Table) -> ServerConfig:
    t.check_keys({"listen", "user", "group", "allow_root"})
    listen = t.strings("listen", ServerConfig.listen)
    if not listen:
        raise t.error("listen", "must list at least one endpoint")
    for entry in listen if listen != ServerConfig.listen else ():  # the default is good
        t.valid("listen", entry, _check_endpoint)
    return ServerConfig(
        listen=listen,
        user=t.valid("user", t.string("user"), _account),
        group=t.valid("group", t.string("group"), _account),
        allow_root=t.boolean("allow_root", ServerConfig.allow_root),
    )


def _metrics(t: _Table) -> MetricsConfig:
    t.check_keys({"serve", "tail"})
    endpoints = {key: t.string(key) for key in ("serve", "tail")}
    for key, endpoint in endpoints.items():
        if endpoint:
            t.valid(key, endpoint, _check_endpoint)
    return MetricsConfig(**endpoints)


def _dns(t: _Table) -> DNSConfig:
    t.check_keys({"nameservers", "timeout"})
    nameservers = t.strings("nameservers", DNSConfig.nameservers)
    for entry in nameservers:
        t.valid("nameservers", entry, parse_nameserver)
    return DNSConfig(nameservers=nameservers, timeout=t.timeout("timeout", DNSConfig.timeout))


def _https(t: _Table) -> HTTPSConfig:
    t.check_keys({"ca_file", "timeout"})
    return HTTPSConfig(
        ca_file=t.string("ca_file"), timeout=t.timeout("timeout", HTTPSConfig.timeout)
    )


def _zones(t: _Table) -> Mapping[str, ReplyOptions]:
    zones = {DEFAULT_ZONE: ReplyOptions()}
    keys = {"strict_testing", "require_sni", "tlsrpt_attributes"}
    for name in t.names():
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise t.error(name, "not a socketmap name (empty or with spaces)", section=True)
        zone = t.table(name).check_keys(keys)
        zones[name] = ReplyOptions(
            **{key: zone.boolean(key, getattr(ReplyOptions(), key)) for key in sorted(keys)}
        )
    return types.MappingProxyType(zones)


def _dkim(t: _Table) -> DKIMConfig:
    keys = ("domain", "selector", "key_file")
    t.check_keys(set(keys))
    dkim = DKIMConfig(**{key: t.string(key) for key in keys})
    if any(getattr(dkim, key) for key in keys):
        for key in keys:
            if not getattr(dkim, key):
                raise t.error(key, "required when any [tlsrpt.dkim] key is set")
        t.valid("domain", dkim.domain, _domain)
        t.valid("selector", dkim.selector, _selector)
    return dkim


def _tlsrpt(t: _Table, dkim: DKIMConfig) -> TLSRPTConfig:
    t.check_keys({f.name for f in dataclasses.fields(TLSRPTConfig)})
    d = TLSRPTConfig()
    contact_info = t.string("contact_info")
    contact_domain = t.valid("contact_info", contact_info, _contact_domain) if contact_info else ""
    submitter = t.string("submitter")
    if submitter:
        domain = t.valid("submitter", submitter, _domain)
        if contact_domain and domain != contact_domain:
            raise t.error(
                "submitter",
                f"must equal the domain of contact_info ({contact_domain}), got {submitter!r}",
            )
    mail_from = t.string("mail_from")
    if mail_from:
        t.valid("mail_from", mail_from, _mailbox)
    smtp = t.string("smtp", d.smtp)
    t.valid("smtp", smtp, lambda s: _host_port(s, hostnames=True, default_port=None))
    log_timezone = t.string("log_timezone", d.log_timezone)
    t.valid("log_timezone", log_timezone, _check_timezone)
    return TLSRPTConfig(
        organization_name=t.string("organization_name"),
        contact_info=contact_info,
        submitter=submitter,
        mail_from=mail_from,
        smtp=smtp,
        sending_mta_ip=tuple(
            t.valid("sending_mta_ip", ip, _ip)
            for ip in t.strings("sending_mta_ip", d.sending_mta_ip)
        ),
        verify_https=t.boolean("verify_https", d.verify_https),
        send=t.boolean("send", d.send),
        send_delay=t.number("send_delay", d.send_delay, 0, MAX_SEND_DELAY, low_open=False),
        log_timezone=log_timezone,
        dkim=dkim,
    )


class _Table:
    """One TOML table with typed, validated reads that raise errors naming its keys."""

    def __init__(self, source: str, name: str, data: Mapping[str, object]) -> None:
        self._source = source
        self._name = name
        self._data = data

    def names(self) -> list[str]:
        return list(self._data)

    def where(self, key: str, *, section: bool = False) -> str:
        if not self._name:
            return f"[{key}]" if section else key
        if section:
            return f"[{self._name}.{_toml_key(key)}]"
        return f"[{self._name}] {key}"

    def error(self, key: str, problem: str, *, section: bool = False) -> ConfigError:
        return ConfigError(self._source, self.where(key, section=section), problem)

    def check_keys(self, known: set[str]) -> _Table:
        for key, value in self._data.items():
            if key not in known:
                table = isinstance(value, dict)
                raise self.error(key, f"unknown {'section' if table else 'key'}", section=table)
        return self

    def table(self, key: str) -> _Table:
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_describe(value)}", section=True)
        name = f"{self._name}.{_toml_key(key)}" if self._name else key
        return _Table(self._source, name, value)

    def _get(self, key: str, default: object, kind: type | tuple[type, ...], what: str) -> object:
        value = self._data.get(key, default)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(key, f"expected {what}, got {_describe(value)}")
        return value

    def string(self, key: str, default: str = "") -> str:
        return cast(str, self._get(key, default, str, "a string"))

    def boolean(self, key: str, default: bool) -> bool:
        return cast(bool, self._get(key, default, bool, "true or false"))

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, list(default), list, "an array of strings")
        for item in cast(list[object], value):
            if not isinstance(item, str):
                raise self.error(key, f"expected an array of strings, got {_describe(item)}")
        return tuple(cast(list[str], value))

    def number(self, key: str, default: float, low: float, high: float, *, low_open: bool) -> float:
        value = cast(float, self._get(key, default, (int, float), "a number"))
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float: out of range
            number = math.inf if value > 0 else -math.inf
        if not ((low < number if low_open else low <= number) and number <= high):
            bound = "more than" if low_open else "at least"
            huge = isinstance(value, int) and math.isinf(number)
            shown = _describe(value) if huge else f"{number:g}"
            raise self.error(
                key, f"must be {bound} {low:g} and at most {high:g} seconds, got {shown}"
            )
        return number

    def timeout(self, key: str, default: float) -> float:
        return self.number(key, default, 0, MAX_TIMEOUT, low_open=True)

    def valid(self, key: str, value: str, check: Callable[[str], _T]) -> _T:
        """``check(value)``, its ``ValueError`` turned into an error naming ``key``."""
        try:
            return check(value)
        except ValueError as e:
            raise self.error(key, f"{value!r}: {e}") from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than str() writes
        return "an integer too long to show"
    return text if len(text) <= 60 else text[:57] + "..."


# -- value checks: each raises ValueError with a short reason --------------------------------


def _split_endpoint(text: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string with the tokenizer ``serverFromString`` uses (private but
    stable); imported here, as most commands never read an endpoint string."""
    from twisted.internet import endpoints  # noqa: PLC0415

    return cast(tuple[list[str], dict[str, str]], endpoints._parse(text))  # type: ignore[no-untyped-call]


_DECIMAL = re.compile(r"[0-9]+")


def _integer(text: str, what: str, low: int, high: int) -> int:
    if not _DECIMAL.fullmatch(text) or not low <= int(text) <= high:
        raise ValueError(f"{what} must be a number from {low} to {high}, got {text!r}")
    return int(text)


def _interface(text: str) -> None:
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"interface must be an IP address, got {text!r}") from None


def _tcp(port: str, interface: str = "", backlog: str = "50") -> None:
    _integer(port, "port", 0, 65535)
    _interface(interface)
    _integer(backlog, "backlog", 1, 65535)


def _tcp6(port: str, backlog: str = "50", interface: str = "::") -> None:
    _tcp(port, interface, backlog)


def _unix(address: str, mode: str = "666", backlog: str = "50", lockfile: str = "1") -> None:
    if not address:
        raise ValueError("the socket path is empty")
    if not re.fullmatch(r"[0-7]{1,4}", mode):
        raise ValueError(f"mode must be octal permissions, got {mode!r}")
    _integer(backlog, "backlog", 1, 65535)
    if lockfile not in {"0", "1"}:
        raise ValueError(f"lockfile must be 0 or 1, got {lockfile!r}")


def _systemd(domain: str, index: str | None = None, name: str | None = None) -> None:
    if domain not in {"INET", "INET6", "UNIX"}:
        raise ValueError(f"domain must be INET, INET6 or UNIX, got {domain!r}")
    if (index is None) == (name is None):
        raise ValueError("give exactly one of index= and name=")
    if index is not None:
        _integer(index, "index", 0, 1023)


_ENDPOINT_TYPES: dict[str, Callable[..., None]] = {
    "tcp": _tcp,
    "tcp6": _tcp6,
    "unix": _unix,
    "systemd": _systemd,
}


def _check_endpoint(text: str) -> None:
    """Check a server endpoint string as Twisted's ``serverFromString`` reads it.

    Only the types a socketmap server can use are accepted, and their arguments are checked
    without a reactor (a ``systemd:`` endpoint is not looked up in the inherited descriptors).
    """
    kind, bound = _bind_endpoint(text)
    _ENDPOINT_TYPES[kind](*bound.args, **bound.kwargs)


def _bind_endpoint(text: str) -> tuple[str, inspect.BoundArguments]:
    """The type of endpoint ``text`` and its arguments, bound to that type's checker;
    ValueError with a short reason when they do not fit."""
    try:
        args, kwargs = _split_endpoint(text)
    except RuntimeError:  # a trailing backslash escapes nothing
        raise ValueError("ends with a lone backslash") from None
    if not args or not args[0]:  # "" or only key=value parts
        raise ValueError("no endpoint type")
    kind = args[0]
    check = _ENDPOINT_TYPES.get(kind)
    if check is None:
        raise ValueError(f"unknown endpoint type {kind!r} (use tcp, tcp6, unix or systemd)")
    try:
        return kind, inspect.signature(check).bind(*args[1:], **kwargs)
    except TypeError as e:
        raise ValueError(f"{kind}: {e}") from None


def _account(text: str) -> str:
    """A user or group name or id, which the account databases can look up."""
    if not text.isprintable():
        raise ValueError("contains a control character")
    return text


def _host_port(text: str, *, hostnames: bool, default_port: int | None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` (and ``host``, ``v6``, ``[v6]`` with a default port)."""
    port: str | None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6 address]:port")
        port = rest[1:] if rest else None
        if ":" not in _ip(host):
            raise ValueError("only an IPv6 address goes in brackets")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    if ":" in host or not hostnames:
        _ip(host)
    elif not _is_hostname(host):
        raise ValueError("expected a host name or IP address")
    if port is None:
        if default_port is None:
            raise ValueError("expected host:port")
        return host, default_port
    return host, _integer(port, "port", 1, 65535)


def _ip(text: str) -> str:
    """The canonical text of an IP address (RFC 5952 for IPv6)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("not an IP address") from None


def parse_nameserver(text: str) -> tuple[str, int]:
    """A nameserver entry as ``(ip, port)``, the address in canonical text, port 53 unless given.

    Accepted forms: ``192.0.2.53``, ``127.0.0.1:5353``, ``[::1]:53``, ``[::1]`` and ``::1``
    (an unbracketed IPv6 address never carries a port).  Raises ValueError with a short
    reason.  :func:`postfix_mtasts.mtasts.dns.parse_nameservers` reads entries with it.
    """
    host, port = _host_port(text, hostnames=False, default_port=53)
    return _ip(host), port


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _is_hostname(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _domain(text: str) -> str:
    """``text`` as a lower-case A-label domain without the trailing dot."""
    name = text.removesuffix(".")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a domain name ({e})") from None
    if not _is_hostname(name) or "." not in name:
        raise ValueError("not a domain name")
    return name.lower()


def _selector(text: str) -> None:
    if not _is_hostname(text) or text.endswith("."):
        raise ValueError("not a DKIM selector")


def _mailbox(text: str) -> str:
    """The domain of an address ``local@domain``."""
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c.isspace() or c in '<>,"' for c in local):
        raise ValueError("expected an address like reports@example.org")
    return _domain(domain)


def _contact_domain(uri: str) -> str:
    """The domain of a ``mailto:`` or ``https:`` URI."""
    scheme, colon, rest = uri.partition(":")
    if colon and scheme.lower() == "mailto":
        return _mailbox(unquote(rest.partition("?")[0]))
    if colon and scheme.lower() == "https":
        parts = urlsplit(uri)
        if not parts.hostname:
            raise ValueError("expected https://host/...")
        return _domain(parts.hostname)
    raise ValueError("expected a mailto: or https: URI")


def _check_timezone(name: str) -> None:
    if name in {"local", "UTC"}:
        return
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError("expected local, UTC or an IANA time zone name") from None
