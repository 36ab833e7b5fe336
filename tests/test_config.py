"""Tests for postfix_mtasts.config: TOML into validated, frozen dataclasses."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import textwrap
import tomllib
from datetime import UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint

from postfix_mtasts.config import (
    Config,
    ConfigError,
    DKIMConfig,
    DNSConfig,
    HTTPSConfig,
    MetricsConfig,
    ServerConfig,
    StoreConfig,
    TLSRPTConfig,
    load_config,
    parse_config,
    parse_nameserver,
    state_dir,
)
from postfix_mtasts.mtasts.dns import parse_nameservers
from postfix_mtasts.mtasts.policy import ReplyOptions

EXAMPLE = Path(__file__).parent.parent / "contrib" / "postfix-mtasts.toml"

FULL = """\
[server]
listen = ["tcp:0:interface=127.0.0.1", "unix:/run/postfix-mtasts/map.sock:mode=660"]
user = "postfix-mtasts"
group = "postfix-mtasts"
allow_root = true
[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.53", "2001:db8::53"]
timeout = 2
[https]
ca_file = "/etc/ssl/policy-hosts.pem"
timeout = 7.5
[store]
path = "/srv/mtasts/store.sqlite"
[zones.postfix]
require_sni = false
[zones.strict]
strict_testing = true
tlsrpt_attributes = true
[tlsrpt]
organization_name = "Example Org"
contact_info = "mailto:tlsrpt@Example.ORG"
submitter = "example.org"
mail_from = "noreply@example.org"
smtp = "[::1]:2525"
sending_mta_ip = ["192.0.2.1", "2001:DB8:0:0::25"]
send = true
send_delay = 600
log_timezone = "Europe/Berlin"
[tlsrpt.dkim]
domain = "example.org"
selector = "tlsrpt"
key_file = "/etc/dkim/tlsrpt.pem"
[metrics]
serve = "tcp:9461"
tail = "unix:/run/postfix-mtasts/tail-metrics.sock"
"""


def _error(text: str, source: str = "/etc/x.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    message = str(info.value)
    assert "\n" not in message
    return message


def _toml(value: str) -> str:
    """``value`` as a TOML basic string."""
    return json.dumps(value)


class _NoReactor:
    """Stands where a reactor would: endpoint construction must not use it."""


def test_defaults() -> None:
    """No file gives the documented defaults, with the default zone present."""
    config = load_config(None)
    assert config == Config()
    assert config.source == "<defaults>"
    assert config.server.listen == ("tcp:8461:interface=127.0.0.1",)
    assert config.dns == DNSConfig(nameservers=(), timeout=5.0)
    assert config.https == HTTPSConfig(ca_file="", timeout=10.0)
    assert config.store == StoreConfig(path="")
    assert dict(config.zones) == {"postfix": ReplyOptions()}
    assert config.tlsrpt == TLSRPTConfig(
        organization_name="",
        contact_info="",
        submitter="",
        mail_from="",
        smtp="127.0.0.1:25",
        sending_mta_ip=(),
        send=False,
        send_delay=14400,
        log_timezone="local",
        dkim=DKIMConfig(domain="", selector="", key_file=""),
    )
    assert config.tlsrpt.submitter_domain == ""
    assert config.tlsrpt.smtp_address == ("127.0.0.1", 25)
    assert config.tlsrpt.log_tzinfo is None
    assert not config.tlsrpt.dkim.enabled


def test_empty_file_is_defaults() -> None:
    """An empty file and empty sections give the defaults, naming the file as the source."""
    assert parse_config("", "f.toml") == Config(source="f.toml")
    empty_sections = "[server]\n[dns]\n[https]\n[store]\n[zones]\n[tlsrpt]\n[tlsrpt.dkim]\n"
    assert parse_config(empty_sections, "f.toml") == Config(source="f.toml")


def test_full_file(tmp_path: Path) -> None:
    """A file setting every key is read into the dataclasses, with derived values."""
    path = tmp_path / "full.toml"
    path.write_text(FULL)
    config = load_config(str(path))
    assert config.source == str(path)
    assert config.server == ServerConfig(
        listen=("tcp:0:interface=127.0.0.1", "unix:/run/postfix-mtasts/map.sock:mode=660"),
        user="postfix-mtasts",
        group="postfix-mtasts",
        allow_root=True,
    )
    assert config.dns.nameservers == ("127.0.0.1:5353", "[::1]:53", "192.0.2.53", "2001:db8::53")
    assert tuple(map(parse_nameserver, config.dns.nameservers)) == (
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("192.0.2.53", 53),
        ("2001:db8::53", 53),
    )
    assert config.dns.timeout == 2.0
    assert isinstance(config.dns.timeout, float)
    assert config.https == HTTPSConfig(ca_file="/etc/ssl/policy-hosts.pem", timeout=7.5)
    assert config.store_path() == Path("/srv/mtasts/store.sqlite")
    assert config.zone("postfix") == ReplyOptions(require_sni=False)
    assert config.zone("strict") == ReplyOptions(strict_testing=True, tlsrpt_attributes=True)
    assert config.zone("typo") == ReplyOptions(require_sni=False)
    t = config.tlsrpt
    assert t.organization_name == "Example Org"
    assert t.submitter_domain == "example.org"
    assert t.mail_from == "noreply@example.org"
    assert t.smtp_address == ("::1", 2525)
    assert t.sending_mta_ip == ("192.0.2.1", "2001:db8::25")
    assert t.send is True
    assert t.send_delay == 600.0
    assert t.log_tzinfo == ZoneInfo("Europe/Berlin")
    assert t.dkim == DKIMConfig("example.org", "tlsrpt", "/etc/dkim/tlsrpt.pem")
    assert t.dkim.enabled
    config.require_reporting()
    assert config.metrics == MetricsConfig(
        serve="tcp:9461", tail="unix:/run/postfix-mtasts/tail-metrics.sock"
    )


def test_config_is_immutable() -> None:
    """The configuration and its zone table cannot be changed after loading."""
    config = parse_config(FULL, "f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dns = DNSConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.zones["new"] = ReplyOptions()  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[dns]\ntimeout = "fast"', "[dns] timeout: expected a number, got 'fast'"),
        ("[dns]\ntimeout = true", "[dns] timeout: expected a number, got true"),
        ("[https]\ntimeout = [1]", "[https] timeout: expected a number, got an array"),
        ("[https]\nca_file = 1", "[https] ca_file: expected a string, got 1"),
        ("[store]\npath = {a = 1}", "[store] path: expected a string, got a table"),
        ("[tlsrpt]\nsend = 1", "[tlsrpt] send: expected true or false, got 1"),
        ('[tlsrpt]\nsend = "yes"', "[tlsrpt] send: expected true or false, got 'yes'"),
        (
            "[tlsrpt]\nsend_delay = 1979-05-27",
            "[tlsrpt] send_delay: expected a number, got a date/time (1979-05-27)",
        ),
        (
            '[dns]\nnameservers = "192.0.2.53"',
            "[dns] nameservers: expected an array of strings, got '192.0.2.53'",
        ),
        ("[server]\nlisten = [8461]", "[server] listen: expected an array of strings, got 8461"),
        ("[server]\nuser = 999", "[server] user: expected a string, got 999"),
        ("[server]\nallow_root = 'yes'", "[server] allow_root: expected true or false, got 'yes'"),
        (
            "[zones.postfix]\nrequire_sni = 0",
            "[zones.postfix] require_sni: expected true or false, got 0",
        ),
        ("server = 1", "[server]: expected a table, got 1"),
        ("[tlsrpt]\ndkim = 'x'", "[tlsrpt.dkim]: expected a table, got 'x'"),
        ("[zones]\nfoo = true", "[zones.foo]: expected a table, got true"),
    ],
)
def test_wrong_types(text: str, expected: str) -> None:
    """A value of the wrong TOML type is a one-line error naming the file and the key."""
    assert _error(text) == f"/etc/x.toml: {expected}"


@pytest.mark.parametrize("key", ["user", "group"])
@pytest.mark.parametrize("name", ["a\u0000b", "nobody\n", "\u007f"])
def test_account_with_a_control_character(key: str, name: str) -> None:
    """A user or group name with a control character is an error naming the key."""
    assert _error(f"[server]\n{key} = {_toml(name)}") == (
        f"/etc/x.toml: [server] {key}: {name!r}: contains a control character"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nlisen = []", "[server] lisen: unknown key"),
        ("[servr]\nlisten = []", "[servr]: unknown section"),
        ("listen = []", "listen: unknown key"),
        ("[zones.postfix]\nstrict = true", "[zones.postfix] strict: unknown key"),
        ("[zones.other]\nrequire_sni = true\nsni = false", "[zones.other] sni: unknown key"),
        ('[zones."a.b"]\nx = 1', '[zones."a.b"] x: unknown key'),
        ("[zones.postfix.deeper]", "[zones.postfix.deeper]: unknown section"),
        ("[tlsrpt.dkm]", "[tlsrpt.dkm]: unknown section"),
        ("[tlsrpt.dkim]\nkey = 'x'", "[tlsrpt.dkim] key: unknown key"),
        ('[zones."two words"]', '[zones."two words"]: not a socketmap name (empty or with spaces)'),
    ],
)
def test_unknown_keys_and_sections(text: str, expected: str) -> None:
    """Unknown keys and sections, in zones too, are errors naming the file and the key."""
    assert _error(text) == f"/etc/x.toml: {expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dns]\ntimeout = 0", "[dns] timeout: must be more than 0 and at most 300 seconds, got 0"),
        (
            "[dns]\ntimeout = -1.5",
            "[dns] timeout: must be more than 0 and at most 300 seconds, got -1.5",
        ),
        (
            "[dns]\ntimeout = nan",
            "[dns] timeout: must be more than 0 and at most 300 seconds, got nan",
        ),
        (
            "[https]\ntimeout = 301",
            "[https] timeout: must be more than 0 and at most 300 seconds, got 301",
        ),
        (
            "[https]\ntimeout = inf",
            "[https] timeout: must be more than 0 and at most 300 seconds, got inf",
        ),
        (
            "[tlsrpt]\nsend_delay = -1",
            "[tlsrpt] send_delay: must be at least 0 and at most 86400 seconds, got -1",
        ),
        (
            "[tlsrpt]\nsend_delay = 86401",
            "[tlsrpt] send_delay: must be at least 0 and at most 86400 seconds, got 86401",
        ),
    ],
)
def test_numbers_out_of_range(text: str, expected: str) -> None:
    """Timeouts must be positive and bounded, and send_delay within a day."""
    assert _error(text) == f"/etc/x.toml: {expected}"


HUGE = "1" + "0" * 400  # beyond any float
SHOWN = HUGE[:57] + "..."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"[dns]\ntimeout = {HUGE}",
            f"[dns] timeout: must be more than 0 and at most 300 seconds, got {SHOWN}",
        ),
        (
            f"[tlsrpt]\nsend_delay = -{HUGE}",
            "[tlsrpt] send_delay: must be at least 0 and at most 86400 seconds,"
            f" got -{SHOWN[:-4]}...",
        ),
        (
            "[server]\nuser = 0x1" + "0" * 4000,  # hexadecimal: read, but too long for str()
            "[server] user: expected a string, got an integer too long to show",
        ),
        (
            "[server]\nuser = 1" + "0" * 5000,  # decimal: too long for tomllib to read
            "syntax error: Exceeds the limit (4300 digits) for integer string conversion:"
            " value has 5001 digits",
        ),
    ],
)
def test_huge_integers(text: str, expected: str) -> None:
    """Integers too large for a float or for str() are one-line errors, not tracebacks."""
    assert _error(text) == f"/etc/x.toml: {expected}"


def test_number_bounds_are_inclusive() -> None:
    """The upper bounds, and a send_delay of 0, are accepted."""
    config = parse_config(
        "[dns]\ntimeout = 300\n[https]\ntimeout = 0.5\n[tlsrpt]\nsend_delay = 0", "f"
    )
    assert (config.dns.timeout, config.https.timeout, config.tlsrpt.send_delay) == (300, 0.5, 0)


@pytest.mark.parametrize(
    "entry",
    [
        "tcp:8461",
        "tcp:0:interface=127.0.0.1",
        "tcp:8461:127.0.0.1",
        "tcp:port=8461:interface=127.0.0.1:backlog=10",
        r"tcp:8461:interface=\:\:1",
        "tcp6:8461",
        r"tcp6:8461:interface=\:\:1",
        "unix:/run/postfix-mtasts/map.sock",
        "unix:/run/map.sock:mode=660:lockfile=0",
        "systemd:domain=INET:index=0",
        "systemd:domain=UNIX:name=map",
    ],
)
def test_good_endpoints(entry: str) -> None:
    """Endpoint strings a socketmap server can listen on are accepted, as Twisted reads them."""
    config = parse_config(f"[server]\nlisten = [{_toml(entry)}]", "f")
    assert config.server.listen == (entry,)
    if not entry.startswith("systemd:"):  # systemd: needs descriptors passed by systemd
        endpoint = endpoints.serverFromString(_NoReactor(), entry)  # type: ignore[no-untyped-call]
        assert IStreamServerEndpoint.providedBy(endpoint)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("", "no endpoint type"),
        ("interface=127.0.0.1", "no endpoint type"),
        ("port=8461:interface=127.0.0.1", "no endpoint type"),
        ("8461", "unknown endpoint type '8461' (use tcp, tcp6, unix or systemd)"),
        ("udp:53", "unknown endpoint type 'udp' (use tcp, tcp6, unix or systemd)"),
        ("ssl:443", "unknown endpoint type 'ssl' (use tcp, tcp6, unix or systemd)"),
        ("tcp", "tcp: missing a required argument: 'port'"),
        ("tcp:http", "port must be a number from 0 to 65535, got 'http'"),
        ("tcp:65536", "port must be a number from 0 to 65535, got '65536'"),
        ("tcp:-1", "port must be a number from 0 to 65535, got '-1'"),
        ("tcp:8461:iface=127.0.0.1", "tcp: got an unexpected keyword argument 'iface'"),
        ("tcp:8461:interface=localhost", "interface must be an IP address, got 'localhost'"),
        ("tcp:8461:backlog=0", "backlog must be a number from 1 to 65535, got '0'"),
        ("tcp:1:2:3:4", "tcp: too many positional arguments"),
        ("unix:", "the socket path is empty"),
        ("unix:/x.sock:mode=999", "mode must be octal permissions, got '999'"),
        ("systemd:domain=INET", "give exactly one of index= and name="),
        ("systemd:domain=INET:index=0:name=x", "give exactly one of index= and name="),
        ("systemd:domain=DGRAM:index=0", "domain must be INET, INET6 or UNIX, got 'DGRAM'"),
        ("tcp:8461\\", "ends with a lone backslash"),
    ],
)
def test_bad_endpoints(entry: str, problem: str) -> None:
    """A listen entry that is not a usable endpoint string names [server] listen and the entry."""
    text = f"[server]\nlisten = ['tcp:8461', {_toml(entry)}]"
    assert _error(text) == f"/etc/x.toml: [server] listen: {entry!r}: {problem}"


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp:9461", "tcp:9461:interface=127.0.0.1"),
        ("tcp6:9461", r"tcp6:9461:interface=\:\:1"),
        ("tcp:9461:interface=0.0.0.0", "tcp:9461:interface=0.0.0.0"),
        ("tcp:9461:0.0.0.0", "tcp:9461:0.0.0.0"),
        ("tcp:port=9461:backlog=5", "tcp:port=9461:backlog=5:interface=127.0.0.1"),
        ("tcp6:9461:5", r"tcp6:9461:5:interface=\:\:1"),
        (r"tcp6:9461:5:\:\:", r"tcp6:9461:5:\:\:"),
        ("unix:/run/m.sock", "unix:/run/m.sock"),
    ],
)
def test_metrics_listen_on_loopback_unless_told(endpoint: str, expected: str) -> None:
    """A metrics endpoint without an interface, by name or by position, listens on loopback."""
    config = parse_config(f"[metrics]\nserve = {_toml(endpoint)}", "f")
    assert MetricsConfig.loopback(config.metrics.serve) == expected
    endpoints.serverFromString(_NoReactor(), expected)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("endpoint", ["http:9462", "port=9462"])
def test_bad_metrics_endpoint(endpoint: str) -> None:
    """A metrics endpoint that is not an endpoint string names its key."""
    assert _error(f"[metrics]\ntail = {_toml(endpoint)}").startswith(
        "/etc/x.toml: [metrics] tail: "
    )


def test_listen_must_not_be_empty() -> None:
    """A server that listens nowhere is a configuration error."""
    assert _error("[server]\nlisten = []") == (
        "/etc/x.toml: [server] listen: must list at least one endpoint"
    )


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("[2001:DB8:0::1]:5300", ("2001:db8::1", 5300)),
        ("2001:DB8:0::53", ("2001:db8::53", 53)),
        ("::ffff:192.0.2.1", ("::ffff:c000:201", 53)),
        ("fe80::1%eth0", ("fe80::1%eth0", 53)),
    ],
)
def test_good_nameservers(entry: str, address: tuple[str, int]) -> None:
    """Nameservers are IP addresses with an optional port, IPv6 with a port in brackets;
    the DNS client reads each as the configuration checked it, in canonical text."""
    config = parse_config(f"[dns]\nnameservers = [{_toml(entry)}]", "f")
    assert config.dns.nameservers == (entry,)
    assert parse_nameserver(entry) == address
    assert parse_nameservers(config.dns.nameservers) == [address]


def test_config_reads_no_dns_library() -> None:
    """Checking nameservers in the configuration loads neither dnspython nor the DNS client."""
    code = textwrap.dedent("""
        import sys
        from postfix_mtasts.config import parse_config
        parse_config('[dns]\\nnameservers = ["::1"]', "f")
        print(sorted(m for m in sys.modules if m == "dns" or m.endswith(".dns")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("dns.example.org", "not an IP address"),
        ("192.0.2.300", "not an IP address"),
        ("192.0.2.53:x", "port must be a number from 1 to 65535, got 'x'"),
        ("192.0.2.53:0", "port must be a number from 1 to 65535, got '0'"),
        ("[::1]:", "port must be a number from 1 to 65535, got ''"),
        ("[192.0.2.53]:53", "only an IPv6 address goes in brackets"),
        ("[::1:53", "expected [IPv6 address]:port"),
        ("[::1]53", "expected [IPv6 address]:port"),
        ("", "not an IP address"),
    ],
)
def test_bad_nameservers(entry: str, problem: str) -> None:
    """A bad nameserver is an error naming [dns] nameservers and the entry."""
    text = f"[dns]\nnameservers = ['127.0.0.1', {_toml(entry)}]"
    assert _error(text) == f"/etc/x.toml: [dns] nameservers: {entry!r}: {problem}"


@pytest.mark.parametrize(
    ("contact_info", "submitter", "domain"),
    [
        ("mailto:tlsrpt@example.org", "", "example.org"),
        ("MAILTO:TLSRPT@Example.Org.", "", "example.org"),
        ("mailto:tls%2Brpt@example.org?subject=x", "", "example.org"),
        ("https://reports.example.org/v1/tlsrpt", "", "reports.example.org"),
        ("https://reports.example.org:8443/", "REPORTS.example.org.", "reports.example.org"),
        ("mailto:tlsrpt@bücher.example", "xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("", "example.net", "example.net"),
    ],
)
def test_submitter_domain(contact_info: str, submitter: str, domain: str) -> None:
    """The submitter is the configured domain, else contact_info's, as a lower-case A-label."""
    text = f"[tlsrpt]\ncontact_info = {_toml(contact_info)}\nsubmitter = {_toml(submitter)}"
    assert parse_config(text, "f").tlsrpt.submitter_domain == domain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'contact_info = "tlsrpt@example.org"',
            "contact_info: 'tlsrpt@example.org': expected a mailto: or https: URI",
        ),
        (
            'contact_info = "http://example.org/"',
            "contact_info: 'http://example.org/': expected a mailto: or https: URI",
        ),
        (
            'contact_info = "mailto:example.org"',
            "contact_info: 'mailto:example.org': expected an address like reports@example.org",
        ),
        ('contact_info = "https:///x"', "contact_info: 'https:///x': expected https://host/..."),
        (
            'contact_info = "mailto:a@example.org"\nsubmitter = "example.net"',
            "submitter: must equal the domain of contact_info (example.org), got 'example.net'",
        ),
        ('submitter = "not a domain"', "submitter: 'not a domain': not a domain name"),
        (
            'mail_from = "<a@example.org>"',
            "mail_from: '<a@example.org>': expected an address like reports@example.org",
        ),
        ('smtp = "localhost"', "smtp: 'localhost': expected host:port"),
        ('smtp = "mail_relay:25"', "smtp: 'mail_relay:25': expected a host name or IP address"),
        (
            'smtp = "localhost:smtp"',
            "smtp: 'localhost:smtp': port must be a number from 1 to 65535, got 'smtp'",
        ),
        ('sending_mta_ip = ["192.0.2.1", "mx"]', "sending_mta_ip: 'mx': not an IP address"),
        (
            'log_timezone = "Mars/Olympus_Mons"',
            "log_timezone: 'Mars/Olympus_Mons': expected local, UTC or an IANA time zone name",
        ),
        (
            'log_timezone = "../etc/passwd"',
            "log_timezone: '../etc/passwd': expected local, UTC or an IANA time zone name",
        ),
        ("send = true", "organization_name: required when send = true"),
        ('send = true\norganization_name = "O"', "contact_info: required when send = true"),
    ],
)
def test_bad_tlsrpt_values(text: str, expected: str) -> None:
    """Bad [tlsrpt] values are one-line errors naming the key."""
    assert _error(f"[tlsrpt]\n{text}") == f"/etc/x.toml: [tlsrpt] {expected}"


@pytest.mark.parametrize(
    ("name", "tzinfo"),
    [("local", None), ("UTC", UTC), ("Europe/Berlin", ZoneInfo("Europe/Berlin"))],
)
def test_log_timezone(name: str, tzinfo: object) -> None:
    """log_timezone takes local, UTC or an IANA zone name."""
    assert parse_config(f"[tlsrpt]\nlog_timezone = {_toml(name)}", "f").tlsrpt.log_tzinfo == tzinfo


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'domain = "example.org"',
            "[tlsrpt.dkim] selector: required when any [tlsrpt.dkim] key is set",
        ),
        ('key_file = "/k.pem"', "[tlsrpt.dkim] domain: required when any [tlsrpt.dkim] key is set"),
        (
            'domain = "example.org"\nselector = "a b"\nkey_file = "/k.pem"',
            "[tlsrpt.dkim] selector: 'a b': not a DKIM selector",
        ),
    ],
)
def test_dkim_is_all_or_nothing(text: str, expected: str) -> None:
    """Built-in DKIM signing needs its domain, selector and key file together."""
    assert _error(f"[tlsrpt.dkim]\n{text}") == f"/etc/x.toml: {expected}"


def test_require_reporting() -> None:
    """Building reports needs organization_name and contact_info; the error names the key."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            "[tlsrpt]\ncontact_info = 'mailto:a@example.org'", "/e.toml"
        ).require_reporting()
    assert str(info.value) == "/e.toml: [tlsrpt] organization_name: required for reports"


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error is one line naming the file and the line."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten = []\n[dns\ntimeout = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: line 3: ")
    assert "\n" not in str(info.value)


def test_syntax_error_at_end_of_file() -> None:
    """A file cut short names its last line."""
    assert _error("[dns]\nnameservers = [").startswith("/etc/x.toml: line 2: ")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    """A file that cannot be read is one line naming it and the reason."""
    path = tmp_path / "config.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    reason = "No such file or directory" if kind == "missing" else "Is a directory"
    assert str(info.value) == f"{path}: cannot read: {reason}"


def test_file_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is an error naming the line of the first bad byte."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[tlsrpt]\norganization_name = "M\xfcller"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: line 2: not valid UTF-8"


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/pm"}, 0, "/var/lib/pm"),
        ({"STATE_DIRECTORY": "/var/lib/pm:/var/lib/other"}, 1000, "/var/lib/pm"),
        ({"STATE_DIRECTORY": "", "HOME": "/home/u"}, 1000, "/home/u/.local/state/postfix-mtasts"),
        ({"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"}, 0, "/var/lib/postfix-mtasts"),
        ({"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"}, 1000, "/xdg/postfix-mtasts"),
        (
            {"HOME": "/home/u", "XDG_STATE_HOME": "relative"},
            1000,
            "/home/u/.local/state/postfix-mtasts",
        ),
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/state/postfix-mtasts"),
    ],
)
def test_state_dir(environ: dict[str, str], euid: int, expected: str) -> None:
    """The state directory is systemd's, else the root or per-user default."""
    assert state_dir(environ, euid=euid) == Path(expected)


def test_store_path() -> None:
    """The store is [store] path if set, else store.sqlite in the state directory."""
    environ = {"STATE_DIRECTORY": "/var/lib/pm"}
    assert Config().store_path(environ) == Path("/var/lib/pm/store.sqlite")
    assert Config().store_path({"HOME": "/h"}, euid=0) == Path(
        "/var/lib/postfix-mtasts/store.sqlite"
    )
    configured = parse_config("[store]\npath = '/srv/s.sqlite'", "f")
    assert configured.store_path(environ) == Path("/srv/s.sqlite")


def test_example_file_is_the_defaults() -> None:
    """contrib/postfix-mtasts.toml parses to exactly the defaults."""
    assert load_config(str(EXAMPLE)) == Config(source=str(EXAMPLE))


def test_example_file_lists_every_key() -> None:
    """contrib/postfix-mtasts.toml sets every key of every section, each after a comment."""
    example = tomllib.loads(EXAMPLE.read_text())
    sections = {
        "server": ServerConfig,
        "dns": DNSConfig,
        "https": HTTPSConfig,
        "store": StoreConfig,
        "tlsrpt": TLSRPTConfig,
        "metrics": MetricsConfig,
    }
    for name, cls in sections.items():
        assert set(example[name]) == {f.name for f in dataclasses.fields(cls)}
    assert set(example["tlsrpt"]["dkim"]) == {f.name for f in dataclasses.fields(DKIMConfig)}
    assert set(example["zones"]["postfix"]) == {f.name for f in dataclasses.fields(ReplyOptions)}
    lines = EXAMPLE.read_text().splitlines()
    for previous, line in itertools.pairwise(lines):
        if line and line[0].isalpha():
            assert previous.startswith("# "), line


def test_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins, then $POSTFIX_MTASTS_CONFIG, then the default file if it exists, else none."""
    from postfix_mtasts import cli

    default = tmp_path / "postfix-mtasts.toml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(default))
    monkeypatch.delenv("POSTFIX_MTASTS_CONFIG", raising=False)
    assert cli._config_path(None) is None
    default.write_text("")
    assert cli._config_path(None) == str(default)
    monkeypatch.setenv("POSTFIX_MTASTS_CONFIG", "/env.toml")
    assert cli._config_path(None) == "/env.toml"
    assert cli._config_path("/given.toml") == "/given.toml"
