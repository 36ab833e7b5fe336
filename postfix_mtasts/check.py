"""``postfix-mtasts check DOMAIN``: audit a domain's own MTA-STS and TLS-RPT setup.

Two halves. :func:`check_domain` gathers what the network shows, every step with a deadline
and independent steps at once: the ``_mta-sts`` and ``_smtp._tls`` records, the policy (fetched
exactly as the policy map fetches it, and probed for what the fetcher does not tell: the
certificate's dates, a redirect's target, the content type seen) and each MX host over SMTP
(:mod:`postfix_mtasts.probe`). :func:`assess` then judges those :class:`Observations`, taking
values and returning values: a checklist of :class:`Finding` (each ok, problem, warning or
info, a problem with its fix) and a :class:`Verdict`. :func:`render_text` and
:func:`render_json` print the :class:`CheckResult`; :func:`main` is what the command line
runs (exit codes: :func:`exit_code`, and 2 for usage errors).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO, TypeVar

import idna
from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed

from postfix_mtasts.config import Config, ConfigError
from postfix_mtasts.mtasts.dns import DNSClient, DNSFailure, parse_nameservers
from postfix_mtasts.mtasts.fetch import (
    MAX_BODY,
    STS_POLICY_INVALID,
    STS_WEBPKI_INVALID,
    FetchError,
    PolicyFetcher,
    parse_media_type,
)
from postfix_mtasts.mtasts.policy import (
    MAX_AGE_LIMIT,
    NoRecord,
    Policy,
    PolicyError,
    RecordError,
    mx_matches,
    parse_policy,
    parse_sts_records,
)
from postfix_mtasts.probe import (
    OLD_TLS_VERSIONS,
    HTTPSProbe,
    Prober,
    SMTPProbe,
    TLSFacts,
    TrustStore,
)
from postfix_mtasts.tlsrpt.record import (
    NoReportRecord,
    ReportRecordError,
    is_domain_name,
    parse_tlsrpt_records,
)
from postfix_mtasts.tlsrpt.show import printable

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "MAX_ADDRESSES",
    "PARALLEL_PROBES",
    "CheckResult",
    "Failed",
    "Finding",
    "MXObservation",
    "Observations",
    "Verdict",
    "assess",
    "check_domain",
    "exit_code",
    "main",
    "normalise_domain",
    "render_json",
    "render_text",
]

Status = Literal["ok", "problem", "warning", "info"]
OK: Status = "ok"
PROBLEM: Status = "problem"
WARNING: Status = "warning"
INFO: Status = "info"

EXPIRY_WARNING_DAYS = 14
"""A certificate expiring in fewer days than this is a warning."""
MAX_ADDRESSES = 16
"""The most addresses of one host that are probed; a finding says when there were more."""
PARALLEL_PROBES = 8
"""The most connections to the addresses of one host at once."""
_DAY = 86400
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
"""Where the policy is served on ``mta-sts.<domain>`` (RFC 8461 §3.2)."""
_WEEK = 7 * _DAY

_T = TypeVar("_T")
_P = TypeVar("_P", SMTPProbe, HTTPSProbe)
_Add = Callable[[str, Status, str, str], None]
"""Records a finding: check, status, message, fix."""


# --- Results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One item of the checklist."""

    check: str
    """What was checked, e.g. ``mx-starttls`` (stable: scripts may match on it)."""
    subject: str
    """What it was checked on: a DNS name, the policy URL or an MX host."""
    status: Status
    message: str
    """What was found, in plain words."""
    fix: str = ""
    """How to fix it (problems, and some warnings)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The overall conclusion."""

    code: str
    """``not-published``, ``policy-unusable``, ``ready-for-enforce``, ``testing-with-problems``,
    ``enforced``, ``at-risk`` or ``disabled``."""
    message: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Everything ``check`` found about one domain."""

    domain: str
    checked_at: datetime
    sts_id: str | None
    """The id of the valid ``_mta-sts`` record, if there is one."""
    mode: str | None
    """The mode of the valid policy, if there is one."""
    findings: tuple[Finding, ...]
    verdict: Verdict

    def count(self, status: Status) -> int:
        """How many findings have ``status``."""
        return sum(1 for f in self.findings if f.status == status)


def exit_code(result: CheckResult) -> int:
    """0 when no problem was found, 1 otherwise."""
    return 1 if result.count(PROBLEM) else 0


# --- Observations: what the network showed --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failed:
    """A lookup that got no answer; ``reason`` in words."""

    reason: str


@dataclass(frozen=True, slots=True)
class MXObservation:
    """One MX host: its addresses and an SMTP session with each."""

    preference: int
    host: str
    addresses: tuple[str, ...] | Failed
    probes: tuple[SMTPProbe, ...]
    """One per address, in order; only the first :data:`MAX_ADDRESSES` addresses are probed."""


@dataclass(frozen=True, slots=True)
class Observations:
    """The raw material of :func:`assess`."""

    domain: str
    sts_records: tuple[bytes, ...] | Failed
    policy: bytes | FetchError
    """The body as the policy map's fetcher got it, or why it got none."""
    policy_addresses: tuple[str, ...] | Failed
    """The policy host's addresses, or why the lookup got none."""
    policy_probes: tuple[HTTPSProbe, ...]
    """The policy host at each address as :class:`~postfix_mtasts.probe.Prober` saw it, in
    order; only the first :data:`MAX_ADDRESSES` addresses are probed."""
    mx_records: tuple[tuple[int, str], ...] | Failed
    mx: tuple[MXObservation, ...]
    tlsrpt_records: tuple[bytes, ...] | Failed
    https_port: int = 443
    smtp_port: int = 25


# --- Domain input ---------------------------------------------------------------------------


def normalise_domain(text: str) -> str:
    """``text`` as a lower-case A-label domain without a trailing dot.

    U-labels are converted with IDNA2008/UTS #46. Raises ``ValueError`` with a one-line
    reason for anything that is not a fully qualified domain name.
    """
    name = text.removesuffix(".")
    shown = ascii(text)
    if not name:
        raise ValueError(f"not a domain name: {shown}")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"not a domain name: {shown} ({e})") from None
    name = name.lower()
    if not is_domain_name(name):
        raise ValueError(f"not a domain name: {shown}")
    return name


# --- Assessment (pure) ----------------------------------------------------------------------


def assess(obs: Observations, now: datetime) -> CheckResult:
    """Judge ``obs`` as of ``now`` (an aware datetime): the findings and the verdict."""
    findings: list[Finding] = []
    sts_id, record_ok = _sts_record(obs, findings)
    policy = _policy(obs, now, findings)
    _mx(obs, policy, now, findings)
    _tlsrpt(obs, findings)
    problems = sum(1 for f in findings if f.status == PROBLEM)
    verdict = _verdict(obs.domain, record_ok, policy, problems, now)
    return CheckResult(
        domain=obs.domain,
        checked_at=now,
        sts_id=sts_id,
        mode=policy.mode if policy is not None else None,
        findings=tuple(findings),
        verdict=verdict,
    )


def _new_id(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S")


def _sts_record(obs: Observations, out: list[Finding]) -> tuple[str | None, bool]:
    """The ``_mta-sts`` TXT record; returns its id (if valid) and whether it is usable."""
    name = f"_mta-sts.{obs.domain}"
    check = "sts-record"
    records = obs.sts_records
    example = f'{name}. IN TXT "v=STSv1; id=20240101000000"'
    if isinstance(records, Failed):
        out.append(
            Finding(
                check,
                name,
                PROBLEM,
                f"the TXT lookup failed: {records.reason}",
                f"make the domain's nameservers answer TXT queries for {name}",
            )
        )
        return None, False
    try:
        sts_id = parse_sts_records(records)
    except NoRecord:
        out.append(
            Finding(
                check,
                name,
                PROBLEM,
                "no v=STSv1 TXT record: senders never look for the policy",
                f"publish one: {example}",
            )
        )
        return None, False
    except RecordError as e:
        out.append(
            Finding(
                check,
                name,
                PROBLEM,
                f"senders ignore the record: {e}",
                f"publish exactly one record of the form {example} (id: 1 to 32 letters or digits)",
            )
        )
        return None, False
    out.append(Finding(check, name, OK, f"one valid v=STSv1 record, id {sts_id}"))
    return sts_id, True


def _policy(obs: Observations, now: datetime, out: list[Finding]) -> Policy | None:
    """The policy host and the policy; returns the policy if senders can use it."""
    host = f"mta-sts.{obs.domain}"
    port = "" if obs.https_port == 443 else f":{obs.https_port}"
    url = f"https://{host}{port}{WELL_KNOWN_PATH}"
    start = len(out)

    def add(check: str, status: Status, message: str, fix: str = "") -> None:
        out.append(Finding(check, url, status, message, fix))

    addresses = obs.policy_addresses
    fetched = obs.policy
    if isinstance(addresses, Failed):
        add(
            "policy-reachable",
            PROBLEM,
            f"cannot reach {host}: address lookup failed: {addresses.reason}",
            f"make the nameservers of {host} answer A/AAAA queries",
        )
    elif not addresses:
        add(
            "policy-reachable",
            PROBLEM,
            f"cannot reach {host}: no A or AAAA record",
            f"publish A/AAAA records for {host} and serve HTTPS on port 443 there",
        )
    else:
        fix = f"serve HTTPS on port 443 of {host}, reachable from the Internet"
        reached = _connected("policy-reachable", addresses, obs.policy_probes, fix, add)
        _each_address(reached, lambda p, note: _https_findings(p, host, url, now, note), add)
    body = fetched if isinstance(fetched, bytes) else None
    if body is not None:  # the fetcher fails a body over MAX_BODY
        add("policy-size", OK, f"{len(body)} bytes (senders accept up to {MAX_BODY})")
    if isinstance(fetched, FetchError):
        explained = any(f.status == PROBLEM for f in out[start:])
        sender_view = f"senders fetching the policy now fail with {fetched}"
        if explained:
            add("policy-fetch", INFO, sender_view)
        else:
            add("policy-fetch", PROBLEM, sender_view, _fetch_fix(fetched, url))
        return None
    assert body is not None
    try:
        policy = parse_policy(body)
    except PolicyError as e:
        add(
            "policy-syntax",
            PROBLEM,
            f"not a valid policy: {e}",
            "write the policy as RFC 8461 §3.2 says: 'version: STSv1', 'mode: testing' (or "
            "enforce), 'max_age: <seconds>' and one 'mx: <host>' line per MX host",
        )
        return None
    add(
        "policy-syntax",
        OK,
        f"valid: mode {policy.mode}, {len(policy.mx)} mx pattern(s), max_age {policy.max_age}",
    )
    _mode_findings(policy, add)
    return policy


def _https_findings(probe: HTTPSProbe, host: str, url: str, now: datetime, add: _Add) -> None:
    """TLS and the response head at one address of the policy host."""
    if probe.tls is None:
        add(
            "policy-tls",
            PROBLEM,
            f"TLS handshake with {host} failed: {probe.tls_error}",
            f"serve HTTPS with TLS 1.2 or later and a certificate for {host}",
        )
        return
    _tls_findings("policy", host, probe.tls, now, add)
    _http_findings(probe, url, add)


def _fetch_fix(error: FetchError, url: str) -> str:
    if error.failure_type == STS_WEBPKI_INVALID:
        return "serve a certificate valid for the policy host from a public CA, with its chain"
    if error.failure_type == STS_POLICY_INVALID:
        return f"serve the policy at {url} as text/plain, UTF-8, following RFC 8461 §3.2"
    return f"make {url} answer 200 with the policy, directly and quickly"


def _http_findings(
    probe: HTTPSProbe, url: str, add: Callable[[str, Status, str, str], None]
) -> None:
    """Status, redirect, content type and announced size of the policy response."""
    if not probe.status:
        add("policy-http", PROBLEM, f"no HTTP response: {probe.error}", f"serve {url}")
        return
    if 300 <= probe.status < 400:
        location = probe.header("location")
        target = f" to {location[0]}" if location else ""
        add(
            "policy-redirect",
            PROBLEM,
            f"HTTP {probe.status} redirects{target}: senders never follow redirects",
            f"serve the policy itself at {url}, with status 200",
        )
        return
    if probe.status != 200:
        add(
            "policy-http",
            PROBLEM,
            f"HTTP {probe.status} instead of 200",
            f"serve the policy file at {url}",
        )
        return
    add("policy-http", OK, "HTTP 200, no redirect", "")
    values = probe.header("content-type")
    # The fetcher's rule, on the bytes received (the probe decodes header values as latin-1).
    media_type = parse_media_type([v.encode("latin-1", "replace") for v in values])
    if media_type == b"text/plain":
        add("policy-content-type", OK, f"content type {values[0]}", "")
    else:
        seen = "no content type" if not values else f"content type {', '.join(values)!r}"
        add(
            "policy-content-type",
            PROBLEM,
            f"{seen}: senders require text/plain",
            "serve mta-sts.txt with 'Content-Type: text/plain'",
        )
    lengths = probe.header("content-length")
    if len(lengths) == 1 and _is_number(lengths[0]) and int(lengths[0]) > MAX_BODY:
        add(
            "policy-size",
            PROBLEM,
            f"{lengths[0]} bytes: senders refuse policies over {MAX_BODY} bytes",
            "shorten the policy: list MX host patterns only",
        )


def _is_number(text: str) -> bool:
    """Whether ``text`` is ASCII digits only (``str.isdigit`` also takes e.g. ``"²"``)."""
    return text.isascii() and text.isdigit()


def _mode_findings(policy: Policy, add: Callable[[str, Status, str, str], None]) -> None:
    """Mode and whether ``max_age`` suits it."""
    if policy.mode == "enforce":
        add(
            "policy-mode",
            OK,
            "mode enforce: senders deliver only to listed MX hosts over valid TLS",
            "",
        )
    elif policy.mode == "testing":
        add("policy-mode", INFO, "mode testing: senders report failures but deliver anyway", "")
    else:
        add(
            "policy-mode",
            WARNING,
            "mode none: MTA-STS is switched off (senders drop the policies they cached)",
            "when the domain is ready, publish 'mode: testing' and change the TXT id",
        )
    raw = [line.split(":", 1)[1].strip(" \t") for line in policy.lines if _is_max_age(line)]
    if raw and _is_number(raw[0]) and int(raw[0]) > MAX_AGE_LIMIT:
        add(
            "policy-max-age",
            WARNING,
            f"max_age {raw[0]} is over the maximum {MAX_AGE_LIMIT}: senders cap it",
            f"use at most 'max_age: {MAX_AGE_LIMIT}'",
        )
        return
    age = policy.max_age
    shown = f"max_age {age} s ({_duration(age)})"
    if policy.mode == "enforce" and age < _WEEK:
        add(
            "policy-max-age",
            WARNING,
            f"{shown} is short for enforce: an attacker who blocks the next fetch after it "
            "runs out gets mail delivered without the policy",
            "use weeks or more, e.g. 'max_age: 1209600' (2 weeks) up to 31557600 (a year)",
        )
    elif policy.mode == "testing" and age > 4 * _WEEK:
        add(
            "policy-max-age",
            INFO,
            f"{shown}: fine for testing; senders refetch at once when the TXT id changes",
            "",
        )
    else:
        add("policy-max-age", OK, f"{shown}, sensible for mode {policy.mode}", "")


def _is_max_age(line: str) -> bool:
    name, colon, _ = line.partition(":")
    return bool(colon) and name.strip(" \t") == "max_age"


def _duration(seconds: int) -> str:
    if seconds >= _DAY:
        days = seconds / _DAY
        return f"{days:g} day" + ("" if days == 1 else "s")
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds} s"


def _tls_findings(
    prefix: str,
    host: str,
    tls: TLSFacts,
    now: datetime,
    add: Callable[[str, Status, str, str], None],
) -> None:
    """Protocol version, chain, names and dates of one TLS server (policy host or MX)."""
    if tls.version in OLD_TLS_VERSIONS:
        add(
            f"{prefix}-tls",
            PROBLEM,
            f"{tls.version} negotiated: senders require TLS 1.2 or later (RFC 8461 §7.2)",
            "enable TLS 1.2 and 1.3 on the server",
        )
    else:
        add(f"{prefix}-tls", OK, f"{tls.version} ({tls.cipher})", "")
    if not tls.chain:
        add(f"{prefix}-certificate", PROBLEM, "the server sent no certificate", "")
        return
    leaf = tls.chain[0]
    issuer = _common_name(leaf.issuer) or leaf.issuer.rfc4514_string()
    if tls.trust_error:
        add(
            f"{prefix}-certificate",
            PROBLEM,
            f"certificate not trusted: {tls.trust_error} (issuer {issuer})",
            "use a certificate from a public CA and send its intermediate certificates too",
        )
    else:
        add(f"{prefix}-certificate", OK, f"certificate chain trusted (issuer {issuer})", "")
    names = _dns_names(leaf)
    listed = ", ".join(names) if names else "none"
    try:
        verify_certificate_hostname(leaf, host)
    except (VerificationError, CertificateError, ValueError):  # ValueError: host not a DNS-ID
        add(
            f"{prefix}-certificate-name",
            PROBLEM,
            f"certificate not valid for {host} (its DNS names: {listed})",
            f"get a certificate whose subjectAltName includes {host}",
        )
    else:
        add(f"{prefix}-certificate-name", OK, f"certificate valid for {host}", "")
    _expiry(prefix, tls, now, add)


def _expiry(
    prefix: str, tls: TLSFacts, now: datetime, add: Callable[[str, Status, str, str], None]
) -> None:
    """The earliest end of validity in the chain (the verified one if any)."""
    chain = tls.verified or tls.chain[:1]
    check = f"{prefix}-certificate-expiry"
    for cert in chain:
        if cert.not_valid_before_utc > now:
            add(
                check,
                PROBLEM,
                f"{_label(cert, chain)} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check the server's clock and certificate",
            )
            return
    soonest = min(chain, key=lambda c: c.not_valid_after_utc)
    end = soonest.not_valid_after_utc
    days = int((end - now).total_seconds() // _DAY)
    which = _label(soonest, chain)
    if end <= now:
        ago = int((now - end).total_seconds() // _DAY)
        when = f"{ago} day(s) ago" if ago else "less than a day ago"
        add(
            check,
            PROBLEM,
            f"{which} expired {when} ({end:%Y-%m-%d})",
            "renew the certificate and install it with its chain",
        )
    elif days < EXPIRY_WARNING_DAYS:
        add(
            check,
            WARNING,
            f"{which} expires in {days} day(s) ({end:%Y-%m-%d})",
            "renew the certificate now (automate renewal, e.g. with ACME)",
        )
    else:
        add(check, OK, f"{which} expires in {days} days ({end:%Y-%m-%d})", "")


def _label(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> str:
    """``certificate`` for the server's own, else the chain certificate's name."""
    if cert is chain[0]:
        return "certificate"
    return f"chain certificate {_common_name(cert.subject) or cert.subject.rfc4514_string()!r}"


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = values[0].value if values else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def _mx(obs: Observations, policy: Policy | None, now: datetime, out: list[Finding]) -> None:
    """The MX records against the policy, then each MX host over SMTP."""
    domain = obs.domain
    subject = f"MX of {domain}"
    records = obs.mx_records
    if isinstance(records, Failed):
        out.append(
            Finding(
                "mx-records",
                subject,
                PROBLEM,
                f"the MX lookup failed: {records.reason}",
                f"make the domain's nameservers answer MX queries for {domain}",
            )
        )
        return
    hosts = [host for _, host in records if host]
    if not records:
        out.append(
            Finding(
                "mx-records",
                subject,
                PROBLEM,
                "no MX records: MTA-STS names MX hosts, and senders have none to check",
                f"publish MX records for {domain} naming the hosts in the policy",
            )
        )
        return
    if not hosts:
        out.append(
            Finding(
                "mx-records",
                subject,
                WARNING,
                f"null MX (RFC 7505): {domain} accepts no mail, so MTA-STS protects nothing",
            )
        )
        return
    listed = ", ".join(f"{host} ({pref})" for pref, host in records if host)
    out.append(Finding("mx-records", subject, OK, f"{len(hosts)} MX host(s): {listed}"))
    applies = policy is not None and policy.mode != "none"
    if policy is not None and applies:
        for pattern in policy.mx:
            if not any(mx_matches(pattern, host) for host in hosts):
                out.append(
                    Finding(
                        "mx-pattern",
                        subject,
                        WARNING,
                        f"policy pattern {pattern} matches no MX host",
                        "remove it from the policy (and change the TXT id), or fix its typo",
                    )
                )
    for mx in obs.mx:
        _mx_host(mx, policy if applies else None, obs.smtp_port, now, out)


def _mx_host(
    mx: MXObservation, policy: Policy | None, port: int, now: datetime, out: list[Finding]
) -> None:
    host = mx.host

    def add(check: str, status: Status, message: str, fix: str = "") -> None:
        out.append(Finding(check, host, status, message, fix))

    if policy is not None:
        covering = [p for p in policy.mx if mx_matches(p, host)]
        if covering:
            add("mx-policy", OK, f"matched by policy pattern {covering[0]}")
        else:
            add(
                "mx-policy",
                PROBLEM,
                f"no mx pattern of the policy matches {host}: under enforce, senders "
                "refuse to deliver to it",
                f"add 'mx: {host}' to the policy and change the TXT id",
            )
    if isinstance(mx.addresses, Failed):
        add(
            "mx-address",
            PROBLEM,
            f"address lookup failed: {mx.addresses.reason}",
            f"make the nameservers of {host} answer A/AAAA queries",
        )
        return
    if not mx.addresses:
        add("mx-address", PROBLEM, "no A or AAAA record", f"publish the address of {host}")
        return
    fix = f"accept SMTP connections on port {port} from the Internet"
    reached = _connected("mx-connect", mx.addresses, mx.probes, fix, add)
    _each_address(reached, lambda p, note: _smtp_findings(p, host, now, note), add)


def _connected(
    check: str, addresses: Sequence[str], probes: Sequence[_P], fix: str, add: _Add
) -> list[_P]:
    """Which addresses accepted a connection (returned) and which did not: a problem if none
    did, else a warning for each."""
    reached = [p for p in probes if p.connected]
    unreachable = [p for p in probes if not p.connected]
    if not reached:
        tried = "; ".join(f"{p.address}: {p.error}" for p in unreachable)
        add(check, PROBLEM, f"no address accepted a connection ({tried})", fix)
    else:
        add(check, OK, f"reachable at {', '.join(p.address for p in reached)}", "")
        for p in unreachable:
            add(check, WARNING, f"{p.address} unreachable ({p.error})", fix)
    if len(addresses) > len(probes):
        add(
            check,
            INFO,
            f"{len(addresses)} addresses: only the first {len(probes)} were checked",
            "",
        )
    return reached


def _each_address(probes: Sequence[_P], judge: Callable[[_P, _Add], None], add: _Add) -> None:
    """Judge the server at each address. A finding made at every address is told once; one
    made at only some of them starts with those addresses."""
    made: dict[tuple[str, Status, str, str], list[str]] = {}

    def noting(address: str) -> _Add:
        def note(check: str, status: Status, message: str, fix: str) -> None:
            where = made.setdefault((check, status, message, fix), [])
            if address not in where:
                where.append(address)

        return note

    for probe in probes:
        judge(probe, noting(probe.address))
    order = {check: i for i, check in enumerate(dict.fromkeys(key[0] for key in made))}
    for (check, status, message, fix), where in sorted(made.items(), key=lambda m: order[m[0][0]]):
        at_some = f"at {', '.join(where)}: " if len(where) < len(probes) else ""
        add(check, status, at_some + message, fix)


def _smtp_findings(probe: SMTPProbe, host: str, now: datetime, add: _Add) -> None:
    """The SMTP session at one address of an MX host."""
    if probe.error:
        add(
            "mx-smtp",
            PROBLEM,
            f"SMTP session failed: {probe.error}",
            "the MX must greet with 220 and answer EHLO with 250",
        )
        return
    if not probe.starttls_offered:
        add(
            "mx-starttls",
            PROBLEM,
            "does not offer STARTTLS",
            "enable STARTTLS (Postfix: smtpd_tls_security_level = may, smtpd_tls_chain_files)",
        )
        return
    if probe.starttls_refused:
        add(
            "mx-starttls",
            PROBLEM,
            f"offers STARTTLS but refuses it: {probe.starttls_refused}",
            "check the server's TLS certificate and key configuration",
        )
        return
    add("mx-starttls", OK, "STARTTLS offered and accepted", "")
    if probe.tls is None:
        add(
            "mx-tls",
            PROBLEM,
            f"TLS handshake failed: {probe.tls_error}",
            "enable TLS 1.2 or later with a certificate for the MX host name",
        )
        return
    _tls_findings("mx", host, probe.tls, now, add)


def _tlsrpt(obs: Observations, out: list[Finding]) -> None:
    """The ``_smtp._tls`` record and each of its ``rua`` URIs."""
    name = f"_smtp._tls.{obs.domain}"
    check = "tlsrpt-record"
    records = obs.tlsrpt_records
    example = f'{name}. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{obs.domain}"'
    if isinstance(records, Failed):
        out.append(
            Finding(
                check,
                name,
                PROBLEM,
                f"the TXT lookup failed: {records.reason}",
                f"make the domain's nameservers answer TXT queries for {name}",
            )
        )
        return
    try:
        record = parse_tlsrpt_records(records)
    except NoReportRecord:
        out.append(
            Finding(
                check,
                name,
                WARNING,
                "no v=TLSRPTv1 record: senders send no reports of failed TLS sessions",
                f"publish one: {example}",
            )
        )
        return
    except ReportRecordError as e:
        out.append(
            Finding(
                check,
                name,
                PROBLEM,
                f"senders ignore the record: {e}",
                f"publish exactly one record of the form {example}",
            )
        )
        return
    out.append(
        Finding(
            check, name, OK, f"one valid v=TLSRPTv1 record, {len(record.rua)} usable rua URI(s)"
        )
    )
    for uri in record.rua:
        out.append(Finding("tlsrpt-rua", name, OK, f"reports go to {uri}"))
    for uri, reason in record.skipped:
        out.append(
            Finding(
                "tlsrpt-rua",
                name,
                PROBLEM,
                f"rua {uri!r} is unusable: {reason}",
                "use mailto:address@domain or https://host/path URIs, separated by commas",
            )
        )


def _verdict(
    domain: str, record_ok: bool, policy: Policy | None, problems: int, now: datetime
) -> Verdict:
    if not record_ok:
        return Verdict(
            "not-published",
            f"MTA-STS is not in effect for {domain}: senders find no usable _mta-sts record. "
            "Fix the problems above, starting in mode testing.",
        )
    if policy is None:
        return Verdict(
            "policy-unusable",
            f"senders find the _mta-sts record of {domain} but no usable policy: they apply "
            "none, or keep a policy cached earlier until its max_age runs out.",
        )
    if policy.mode == "none":
        return Verdict("disabled", f"MTA-STS is switched off for {domain} (mode none).")
    if policy.mode == "testing":
        if problems:
            return Verdict(
                "testing-with-problems",
                f"{domain} is in testing with {problems} problem(s): fix them before "
                "switching to enforce, or senders honouring MTA-STS will refuse to deliver "
                "to the affected MX hosts.",
            )
        return Verdict(
            "ready-for-enforce",
            f"{domain} is in testing and no problem was found: it is ready for enforce. "
            "Change 'mode: testing' to 'mode: enforce' in the policy, then change the id of "
            f"the _mta-sts.{domain} TXT record (e.g. to id={_new_id(now)}) so that senders "
            "fetch the new policy.",
        )
    if problems:
        return Verdict(
            "at-risk",
            f"mail to {domain} is at risk: the policy is enforced and {problems} problem(s) "
            "were found; senders honouring MTA-STS defer or bounce mail they cannot deliver "
            "over valid TLS to a listed MX host.",
        )
    return Verdict("enforced", f"{domain} enforces MTA-STS and no problem was found.")


# --- Rendering ------------------------------------------------------------------------------

_MARKS = {OK: "✔", PROBLEM: "✘", WARNING: "⚠", INFO: "•"}


def render_text(result: CheckResult) -> str:
    """A checklist grouped by subject: ✔ passed, ✘ problem (with its fix), ⚠ warning.

    Findings quote what servers sent (headers, certificate names): control and format
    characters in them are escaped, so that none reaches the terminal.
    """
    lines = [f"MTA-STS and TLS-RPT check of {result.domain} ({_iso(result.checked_at)})"]
    subject = None
    for f in result.findings:
        if f.subject != subject:
            subject = f.subject
            lines += ["", printable(subject)]
        lines.append(f"  {_MARKS[f.status]} {printable(f.message)}")
        if f.fix and f.status in (PROBLEM, WARNING):
            lines.append(f"      fix: {printable(f.fix)}")
    problems, warnings = result.count(PROBLEM), result.count(WARNING)
    lines += [
        "",
        f"{problems} problem(s), {warnings} warning(s), {result.count(OK)} passed",
        f"Verdict: {printable(result.verdict.message)}",
    ]
    return "\n".join(lines) + "\n"


def render_json(result: CheckResult) -> str:
    """The result as a JSON document (one object, UTF-8 text, ending in a newline)."""
    document: dict[str, Any] = {
        "domain": result.domain,
        "checked_at": _iso(result.checked_at),
        "sts_id": result.sts_id,
        "mode": result.mode,
        "verdict": {"code": result.verdict.code, "message": result.verdict.message},
        "counts": {status: result.count(status) for status in (OK, PROBLEM, WARNING, INFO)},
        "findings": [
            {
                "check": f.check,
                "subject": f.subject,
                "status": f.status,
                "message": f.message,
                "fix": f.fix or None,
            }
            for f in result.findings
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Gathering (network) --------------------------------------------------------------------


async def _outcome(step: Awaitable[_T]) -> _T | Failed:
    """The result of a lookup, or :class:`Failed` saying why it had none."""
    try:
        return await step
    except (DNSFailure, ValueError) as e:
        return Failed(str(e))


async def _fetch(fetcher: PolicyFetcher, domain: str) -> bytes | FetchError:
    try:
        return await fetcher.fetch(domain)
    except FetchError as e:
        return e


async def _probe_each(
    clock: Any,
    addresses: Sequence[str],
    timeout: float,
    probe: Callable[[str, float], Coroutine[Any, Any, _P]],
    unprobed: type[_P],
) -> list[_P]:
    """Probe the first :data:`MAX_ADDRESSES` of ``addresses``, :data:`PARALLEL_PROBES` at a
    time, all within ``timeout`` seconds from now on ``clock``; the probes in address order.

    ``probe(address, seconds)`` makes one probe within ``seconds``; an address whose turn
    comes after the deadline gets ``unprobed(address, error=...)``.
    """
    deadline = clock.seconds() + timeout
    slots = DeferredSemaphore(PARALLEL_PROBES)

    def start(address: str) -> Deferred[_P]:
        left = deadline - clock.seconds()
        if left <= 0:
            error = f"not probed: the host's {timeout:g} s ran out first"
            return succeed(unprobed(address, error=error))
        return Deferred.fromCoroutine(probe(address, left))

    steps = [slots.run(start, address) for address in addresses[:MAX_ADDRESSES]]
    return await gatherResults(steps, consumeErrors=True)


async def check_domain(
    reactor: Any,
    domain: str,
    *,
    nameservers: Sequence[tuple[str, int]],
    ca_file: str = "",
    timeout: float = 10.0,
    dns_timeout: float = 5.0,
    smtp_port: int = 25,
    https_port: int = 443,
    helo: str | None = None,
    now: datetime | None = None,
) -> CheckResult:
    """Audit ``domain``'s MTA-STS and TLS-RPT setup as senders on the Internet see it.

    ``nameservers``: ``(ip, port)`` pairs to ask (see
    :func:`~postfix_mtasts.mtasts.dns.parse_nameservers`); each DNS lookup has the deadline
    ``dns_timeout``, the policy fetch ``timeout`` (seconds), and so have the probes of each
    host, all its addresses together (:data:`PARALLEL_PROBES` at a time). ``ca_file``:
    trusted roots for the policy host and the MX hosts (empty: the system store).
    ``smtp_port`` and ``https_port`` are where MX and policy hosts are reached (tests use
    ephemeral ports). ``now`` (default: the current time) dates the check and judges
    certificate expiry.

    Raises ``ValueError`` for a ``domain`` that is not a domain name, ``OSError`` or
    ``ValueError`` for an unreadable ``ca_file``; network trouble becomes findings.
    """
    domain = normalise_domain(domain)
    dns = DNSClient(reactor, nameservers, timeout=dns_timeout)
    prober = Prober(reactor, ca_file=ca_file, timeout=timeout, helo=helo)
    policy_host = f"mta-sts.{domain}"
    known: dict[str, list[str]] = {}

    async def resolve(name: str) -> list[str]:
        # The policy host's addresses are looked up once, for the fetcher and the probe.
        return known[name] if name in known else await dns.addresses(name)

    fetcher = PolicyFetcher(reactor, resolve, ca_file=ca_file, timeout=timeout, port=https_port)

    async def observe_policy() -> tuple[bytes | FetchError, list[str] | Failed, list[HTTPSProbe]]:
        found = await _outcome(dns.addresses(policy_host))
        if not isinstance(found, Failed):
            known[policy_host] = found
        fetching = Deferred.fromCoroutine(_fetch(fetcher, domain))
        probes = []
        if not isinstance(found, Failed):
            probes = await _probe_each(
                reactor,
                found,
                timeout,
                lambda a, t: prober.https(a, https_port, policy_host, WELL_KNOWN_PATH, timeout=t),
                HTTPSProbe,
            )
        return await fetching, found, probes

    async def observe_mx(preference: int, host: str) -> MXObservation:
        addresses = await _outcome(dns.addresses(host))
        if isinstance(addresses, Failed):
            return MXObservation(preference, host, addresses, ())
        probes = await _probe_each(
            reactor,
            addresses,
            timeout,
            lambda a, t: prober.smtp(a, smtp_port, host, timeout=t),
            SMTPProbe,
        )
        return MXObservation(preference, host, tuple(addresses), tuple(probes))

    async def observe_mxs() -> tuple[tuple[tuple[int, str], ...] | Failed, list[MXObservation]]:
        records = await _outcome(dns.mx(domain))
        if isinstance(records, Failed):
            return records, []
        preference: dict[str, int] = {}
        for pref, host in records:  # sorted: a host listed twice keeps its best preference
            if host:
                preference.setdefault(host, pref)
        steps = [Deferred.fromCoroutine(observe_mx(p, h)) for h, p in preference.items()]
        return tuple(records), await gatherResults(steps, consumeErrors=True)

    sts = Deferred.fromCoroutine(_outcome(dns.txt(f"_mta-sts.{domain}")))
    tlsrpt = Deferred.fromCoroutine(_outcome(dns.txt(f"_smtp._tls.{domain}")))
    policy = Deferred.fromCoroutine(observe_policy())
    mxs = Deferred.fromCoroutine(observe_mxs())
    steps: list[Deferred[Any]] = [sts, tlsrpt, policy, mxs]
    await gatherResults(steps, consumeErrors=True)
    sts_records, tlsrpt_records = await sts, await tlsrpt
    (fetched, policy_addresses, policy_probes), (mx_records, mx) = await policy, await mxs
    observations = Observations(
        domain=domain,
        sts_records=sts_records if isinstance(sts_records, Failed) else tuple(sts_records),
        policy=fetched,
        policy_addresses=(
            policy_addresses if isinstance(policy_addresses, Failed) else tuple(policy_addresses)
        ),
        policy_probes=tuple(policy_probes),
        mx_records=mx_records,
        mx=tuple(mx),
        tlsrpt_records=(
            tlsrpt_records if isinstance(tlsrpt_records, Failed) else tuple(tlsrpt_records)
        ),
        https_port=https_port,
        smtp_port=smtp_port,
    )
    return assess(observations, now or datetime.now(UTC))


async def main(
    reactor: Any,
    config: Config,
    domain: str,
    as_json: bool,
    out: TextIO,
    *,
    err: TextIO | None = None,
) -> int:
    """Run ``postfix-mtasts check [--json] DOMAIN``: print the result to ``out``.

    Returns the exit code: 0 clean, 1 problems found, 2 for a bad domain or an unreadable
    ``[https] ca_file`` (told in one line on ``err``, standard error by default).
    """
    errors = err if err is not None else sys.stderr
    try:
        name = normalise_domain(domain)
    except ValueError as e:
        errors.write(f"postfix-mtasts: check: {e}\n")
        return 2
    ca_file = config.https.ca_file
    try:
        TrustStore(ca_file)
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        bad = ConfigError(config.source, "[https] ca_file", f"{ca_file}: {problem}")
        errors.write(f"postfix-mtasts: {bad}\n")
        return 2
    result = await check_domain(
        reactor,
        name,
        nameservers=parse_nameservers(config.dns.nameservers),
        ca_file=ca_file,
        timeout=config.https.timeout,
        dns_timeout=config.dns.timeout,
    )
    out.write(render_json(result) if as_json else render_text(result))
    return exit_code(result)
