"""The reporter's measurements: parsing a mail log, ``tail --once`` into a store, reports.

The log is made here, deterministically (:class:`MailLog`), in the shapes of
``reference/postfix-log-samples.txt`` and of a busy Postfix 3.4-3.9 server's ordinary traffic:
postscreen and smtpd turning spam away, inbound mail delivered over LMTP, submission with a
content filter hop, and outbound deliveries by many ``smtp[PID]`` processes at once, each
handling one delivery at a time and interleaved with the others.  Outbound sessions end in
``Verified``/``Trusted``/``Untrusted``/``Anonymous`` handshakes, certificate verification
failures (untrusted issuer, host name mismatch, expired), STARTTLS not offered, handshake
errors, connection time-outs, greylisting with a second MX, deferrals and bounces.  About one
line in ten is an outbound TLS line (a handshake summary or a failure naming ``H[A]:P``).

Figures:

- ``parse``: :class:`SessionTracker` over lines already in memory, for each time stamp format
  (BSD syslog and RFC 3339 with microseconds), lines per CPU second; like ``tail`` below, it
  watches for report mail, as a reporter that sends reports does;
- ``tail``: ``postfix-mtasts tail --once FILE`` as a subprocess on a fresh store (holding the
  policies a map would have recorded for part of the domains) for two log lengths, lines per
  CPU second of the whole process (start-up included) and its peak RSS, which must not grow
  with the length;
- ``reports``: :func:`day_reports` for a day with 10,000 policy domains, CPU seconds.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.figures import Figure
from bench.testbed import BenchError
from postfix_mtasts.config import TLSRPTConfig
from postfix_mtasts.mtasts.policy import Policy
from postfix_mtasts.store import CountRow, Store, StoredPolicy
from postfix_mtasts.tlsrpt.daily import day_reports
from postfix_mtasts.tlsrpt.logparse import SessionTracker

START = datetime.datetime(2026, 11, 22, 6, 0, tzinfo=datetime.UTC)
"""The log's first time stamp; at the default rate 4M lines reach into the next UTC day."""
LINES_PER_SECOND = 40.0
"""The log's average rate (a busy single server)."""
CONCURRENT = 48
"""Stories (an SMTP conversation, a delivery) in progress at once."""
SEED = 8460
HOST = "mail"
REPORT_DOMAINS = 10_000
REPORT_SENDER = "tlsrpt-noreply@example.org"
"""A reporter that sends reports watches qmgr lines for its sender's mail (§6): so do these."""

Stamp = str  # "bsd" or "rfc3339"


@dataclass(frozen=True)
class Sizes:
    """How many lines and domains: the full run, or ``--quick``."""

    parse_lines: int
    parse_repeats: int
    tail_lines: tuple[int, int]
    tail_repeats: int

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        """The sizes of a ``--quick`` run or of a full one."""
        if quick:
            return cls(100_000, 2, (250_000, 1_000_000), 1)
        return cls(300_000, 3, (1_000_000, 4_000_000), 2)


# --- the log -------------------------------------------------------------------------------

_PROVIDERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # recipient domain, its MX hosts, the address prefix of its MX hosts
    ("gmail.com", ("gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"), "142.250.27"),
    ("googlemail.com", ("gmail-smtp-in.l.google.com",), "142.250.27"),
    ("outlook.com", ("outlook-com.olc.protection.outlook.com",), "52.101.68"),
    ("hotmail.com", ("hotmail-com.olc.protection.outlook.com",), "104.47.2"),
    ("yahoo.com", ("mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net"), "67.195.204"),
    ("gmx.de", ("mx00.emig.gmx.net", "mx01.emig.gmx.net"), "212.227.15"),
    ("web.de", ("mx-ha03.web.de", "mx-ha02.web.de"), "212.227.17"),
    ("icloud.com", ("mx01.mail.icloud.com", "mx02.mail.icloud.com"), "17.57.154"),
    ("t-online.de", ("mx00.t-online.de", "mx01.t-online.de"), "194.25.134"),
    ("protonmail.com", ("mail.protonmail.ch", "mailsec.protonmail.ch"), "185.70.42"),
)  # fmt: skip
_TAIL_DOMAINS = 200_000
"""The long tail of recipient domains: new ones keep appearing as the log grows."""

_CIPHER_13 = (
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519"
    " server-signature RSA-PSS (2048 bits) server-digest SHA256"
)
_CIPHER_12 = "TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)"
_ADH = "TLSv1.2 with cipher ADH-AES256-GCM-SHA384 (256/256 bits)"
_OPENSSL_ERRORS = (
    "error:0A000410:SSL routines::sslv3 alert handshake failure:../ssl/record/rec_layer_s3.c:"
    "1584:SSL alert number 40:",
    "error:0A00010B:SSL routines::wrong version number:../ssl/record/ssl3_record.c:354:",
)
_VERIFY_FAILURES = (
    "server certificate verification failed for {ep}: num=62:hostname mismatch",
    "certificate verification failed for {ep}: untrusted issuer /C=US/O=Example/CN=Example CA",
    "server certificate verification failed for {ep}: certificate has expired",
    "certificate verification failed for {ep}: self-signed certificate",
)
_SPAM_IPS = 4096

Line = tuple[str, int, str]
"""(tag, pid, message): one line of a story, before its time stamp."""
Story = Iterator[Line]


def tail_domain(n: int) -> str:
    """The ``n``-th domain of the long tail."""
    return f"shop{n}.example" if n % 3 else f"mail-d{n}.example.net"


def policy_domains() -> list[str]:
    """Recipient domains the map would have held an MTA-STS policy for (seeded in ``tail``)."""
    big = [name for name, _, _ in _PROVIDERS if name not in ("yahoo.com", "t-online.de")]
    return big + [tail_domain(n) for n in range(1, 20_000) if n % 4 == 0]


class MailLog:
    """A deterministic, realistic mixed Postfix log (see the module docstring)."""

    def __init__(self, seed: int = SEED) -> None:
        self._rng = random.Random(seed)
        self._qid = 0x3A1F00000
        self._smtp_free = list(range(31000, 31400))
        self._smtpd_free = list(range(22000, 22200))
        self._msg = 0
        self._spawned: list[Story] = []

    # -- helpers ---------------------------------------------------------------------------

    def _queue_id(self) -> str:
        self._qid += 0x1D3
        return f"{self._qid:X}"

    def _message_id(self) -> str:
        self._msg += 1
        return f"<{self._msg:08x}.{self._rng.getrandbits(32):08x}@example.org>"

    def _recipient(self) -> tuple[str, str, str, int]:
        """(domain, mx host, mx address, tail number or -1) of one recipient."""
        rng = self._rng
        if rng.random() < 0.45:
            name, mxs, prefix = _PROVIDERS[min(int(rng.expovariate(0.45)), len(_PROVIDERS) - 1)]
            host = mxs[0] if rng.random() < 0.8 else mxs[-1]
            if name.startswith("g") and rng.random() < 0.3:
                return name, host, f"2a00:1450:400c:c0b::{rng.randrange(16, 28):x}", -1
            return name, host, f"{prefix}.{rng.randrange(2, 250)}", -1
        n = int(_TAIL_DOMAINS ** rng.random())  # log-uniform: a few frequent, many rare
        domain = tail_domain(n)
        if n % 7 == 0:
            return domain, f"mx.{domain}", f"2001:db8:{n >> 8:x}:{n & 255:x}::25", n
        return domain, f"mx{1 + n % 2}.{domain}", f"198.{18 + n % 2}.{n >> 8 & 255}.{n & 255}", n

    def _delays(self) -> str:
        rng = self._rng
        a, b, c = rng.random() / 5, rng.random() / 50, rng.random()
        d = rng.random() * 2
        return f"delay={a + b + c + d:.1f}, delays={a:.2f}/{b:.2f}/{c:.2f}/{d:.2f}"

    # -- stories ---------------------------------------------------------------------------

    def _stories(self) -> Iterator[Story]:
        rng = self._rng
        kinds: tuple[Callable[[], Story], ...] = (
            self._inbound,
            self._spam,
            self._brute_force,
            self._outbound,
            self._noise,
        )
        weights = (32, 22, 6, 34, 6)
        while True:
            if self._spawned:
                yield self._spawned.pop()
            else:
                yield rng.choices(kinds, weights)[0]()

    def _spam(self) -> Story:
        rng = self._rng
        ip = f"185.{rng.randrange(200, 250)}.{rng.randrange(256)}.{rng.randrange(_SPAM_IPS) % 250}"
        port = rng.randrange(30000, 65000)
        yield "postfix/postscreen", 1201, f"CONNECT from [{ip}]:{port} to [192.0.2.10]:25"
        if rng.random() < 0.5:
            yield (
                "postfix/dnsblog",
                1203,
                f"addr {ip} listed by domain zen.spamhaus.org as 127.0.0.4",
            )
            yield "postfix/postscreen", 1201, f"DNSBL rank 4 for [{ip}]:{port}"
            yield (
                "postfix/postscreen",
                1201,
                f"NOQUEUE: reject: RCPT from [{ip}]:{port}: 550 5.7.1 Service unavailable; client"
                f" [{ip}] blocked using zen.spamhaus.org; from=<info@promo{port}.example>,"
                f" to=<sales@example.org>, proto=ESMTP, helo=<[{ip}]>",
            )
            yield "postfix/postscreen", 1201, f"DISCONNECT [{ip}]:{port}"
            return
        yield "postfix/postscreen", 1201, f"PASS NEW [{ip}]:{port}"
        pid = rng.choice(self._smtpd_free)
        yield "postfix/smtpd", pid, f"connect from unknown[{ip}]"
        yield (
            "postfix/smtpd",
            pid,
            f"NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 <nobody@example.net>: Relay"
            f" access denied; from=<spam@promo{port}.example> to=<nobody@example.net>"
            " proto=ESMTP helo=<WIN-3KQ2JD0>",
        )
        yield (
            "postfix/smtpd",
            pid,
            f"disconnect from unknown[{ip}] ehlo=1 mail=1 rcpt=0/1 rset=1 quit=1 commands=4/5",
        )

    def _brute_force(self) -> Story:
        rng = self._rng
        ip = f"45.{rng.randrange(120, 160)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        pid = rng.choice(self._smtpd_free)
        tag = "postfix/submission/smtpd"
        yield tag, pid, f"connect from unknown[{ip}]"
        yield tag, pid, f"Anonymous TLS connection established from unknown[{ip}]: {_CIPHER_13}"
        yield (
            tag,
            pid,
            f"warning: unknown[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6,"
            " sasl_username=admin@example.org",
        )
        yield tag, pid, f"lost connection after AUTH from unknown[{ip}]"
        yield tag, pid, f"disconnect from unknown[{ip}] ehlo=1 starttls=1 auth=0/1 commands=2/3"

    def _noise(self) -> Story:
        rng = self._rng
        r = rng.random()
        if r < 0.3:
            ip = f"185.{rng.randrange(200, 250)}.{rng.randrange(256)}.{rng.randrange(1, 250)}"
            yield (
                "postfix/anvil",
                1199,
                f"statistics: max connection rate 3/60s for (smtp:{ip}) at Nov 22 06:01:02",
            )
        elif r < 0.5:
            yield "postfix/scache", 1205, "statistics: domain lookup hits=3 miss=11 success=21%"
        elif r < 0.8:
            pid = rng.choice(self._smtpd_free)
            ip = f"103.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 250)}"
            yield (
                "postfix/smtpd",
                pid,
                f"warning: hostname ip-{ip.replace('.', '-')}.example does not resolve to address"
                f" {ip}: Name or service not known",
            )
            yield "postfix/smtpd", pid, f"connect from unknown[{ip}]"
            yield "postfix/smtpd", pid, f"lost connection after EHLO from unknown[{ip}]"
            yield "postfix/smtpd", pid, f"disconnect from unknown[{ip}] ehlo=1 commands=1"
        else:
            qid = self._queue_id()
            yield "postfix/pickup", 1190, f"{qid}: uid=33 from=<www-data>"
            yield "postfix/cleanup", 1191, f"{qid}: message-id={self._message_id()}"
            yield (
                "postfix/qmgr",
                1188,
                f"{qid}: from=<www-data@example.org>, size=912, nrcpt=1 (queue active)",
            )
            yield (
                "postfix/local",
                1195,
                f"{qid}: to=<root@example.org>, orig_to=<www-data>, relay=local,"
                f" {self._delays()}, dsn=2.0.0, status=sent (delivered to mailbox)",
            )
            yield "postfix/qmgr", 1188, f"{qid}: removed"

    def _inbound(self) -> Story:
        rng = self._rng
        sender, _, _, _ = self._recipient()
        ip = f"209.85.{rng.randrange(128, 256)}.{rng.randrange(1, 255)}"
        client = f"mail-{rng.randrange(1000):03d}.{sender}"
        port = rng.randrange(30000, 65000)
        yield "postfix/postscreen", 1201, f"CONNECT from [{ip}]:{port} to [192.0.2.10]:25"
        yield "postfix/postscreen", 1201, f"PASS OLD [{ip}]:{port}"
        pid = rng.choice(self._smtpd_free)
        qid = self._queue_id()
        yield "postfix/smtpd", pid, f"connect from {client}[{ip}]"
        yield (
            "postfix/smtpd",
            pid,
            f"Anonymous TLS connection established from {client}[{ip}]: {_CIPHER_13}",
        )
        yield "postfix/smtpd", pid, f"{qid}: client={client}[{ip}]"
        yield "postfix/cleanup", 1191, f"{qid}: message-id={self._message_id()}"
        yield (
            "postfix/qmgr",
            1188,
            f"{qid}: from=<news@{sender}>, size={rng.randrange(2000, 90000)},"
            " nrcpt=1 (queue active)",
        )
        yield (
            "postfix/smtpd",
            pid,
            f"disconnect from {client}[{ip}]"
            " ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7",
        )
        yield (
            "postfix/lmtp",
            1197,
            f"{qid}: to=<user{rng.randrange(300)}@example.org>,"
            f" relay=mail.example.org[private/dovecot-lmtp], {self._delays()}, dsn=2.0.0,"
            " status=sent (250 2.0.0 <user@example.org> kFgNJxXk3GUOFQAAdJ5wVw Saved)",
        )
        yield "postfix/qmgr", 1188, f"{qid}: removed"

    def _outbound(self) -> Story:
        """A message submitted (some through the content filter), then one smtp(8) delivery
        per recipient domain, running alongside each other."""
        rng = self._rng
        ip = f"198.51.100.{rng.randrange(1, 255)}"
        user = f"user{rng.randrange(300)}"
        pid = rng.choice(self._smtpd_free)
        tag = "postfix/submission/smtpd"
        qid = self._queue_id()
        size = rng.randrange(1500, 200000)
        yield tag, pid, f"connect from client.example.org[{ip}]"
        yield (
            tag,
            pid,
            f"Anonymous TLS connection established from client.example.org[{ip}]: {_CIPHER_13}",
        )
        yield (
            tag,
            pid,
            f"{qid}: client=client.example.org[{ip}], sasl_method=PLAIN,"
            f" sasl_username={user}@example.org",
        )
        yield "postfix/cleanup", 1191, f"{qid}: message-id={self._message_id()}"
        if rng.random() < 0.3:  # the content filter hop: an smtp line, but no MX session
            qid2 = self._queue_id()
            yield (
                "postfix/qmgr",
                1188,
                f"{qid}: from=<{user}@example.org>, size={size}, nrcpt=1 (queue active)",
            )
            yield (
                "postfix/smtp",
                rng.choice(self._smtp_free),
                f"{qid}: to=<{user}@example.org>, relay=127.0.0.1[127.0.0.1]:10024,"
                f" {self._delays()}, dsn=2.0.0, status=sent (250 2.0.0 from"
                f" MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as {qid2})",
            )
            yield "postfix/qmgr", 1188, f"{qid}: removed"
            rpid = rng.choice(self._smtpd_free)
            yield "postfix/smtpd", rpid, "connect from localhost[127.0.0.1]"
            yield "postfix/smtpd", rpid, f"{qid2}: client=localhost[127.0.0.1]"
            yield "postfix/cleanup", 1192, f"{qid2}: message-id={self._message_id()}"
            yield (
                "postfix/smtpd",
                rpid,
                "disconnect from localhost[127.0.0.1]"
                " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
            )
            qid = qid2
        r = rng.random()
        domains = 1 if r < 0.6 else rng.randrange(2, 4) if r < 0.85 else rng.randrange(5, 21)
        yield (
            "postfix/qmgr",
            1188,
            f"{qid}: from=<{user}@example.org>, size={size}, nrcpt={domains} (queue active)",
        )
        yield (
            tag,
            pid,
            f"disconnect from client.example.org[{ip}] ehlo=2 starttls=1 auth=1 mail=1"
            f" rcpt={domains} data=1 quit=1 commands={7 + domains}",
        )
        left = [domains]
        for _ in range(domains):
            self._spawned.append(self._smtp(qid, left))

    def _smtp(self, qid: str, left: list[int]) -> Story:
        """One smtp(8) process delivering to one domain; the last one ends the message."""
        free = self._smtp_free
        pid = free.pop(self._rng.randrange(len(free)))
        try:
            yield from self._delivery(pid, qid)
        finally:
            free.append(pid)
        left[0] -= 1
        if not left[0]:
            yield "postfix/qmgr", 1188, f"{qid}: removed"

    def _delivery(self, pid: int, qid: str) -> Iterator[Line]:
        rng = self._rng
        domain, host, ip, n = self._recipient()
        ep = f"{host}[{ip}]:25"
        to = f"to=<{rng.choice(('info', 'anna', 'j.smith', 'sales'))}@{domain}>"
        relay = f"relay={ep}"
        tag = "postfix/smtp"
        r = rng.random()
        if r < 0.03:  # the MX cannot be reached: never reported
            yield tag, pid, f"connect to {ep}: Connection timed out"
            yield (
                tag,
                pid,
                f"{qid}: {to}, relay=none, {self._delays()}, dsn=4.4.1, status=deferred (connect"
                f" to {ep}: Connection timed out)",
            )
            return
        if r < 0.045:  # STARTTLS required by the policy, not offered
            yield (
                tag,
                pid,
                f"{qid}: {to}, {relay}, {self._delays()}, dsn=4.7.4, status=deferred (TLS is"
                f" required, but was not offered by host {host}[{ip}])",
            )
            return
        if r < 0.06:  # a failed handshake
            yield tag, pid, f"SSL_connect error to {ep}: -1"
            yield tag, pid, f"warning: TLS library problem: {rng.choice(_OPENSSL_ERRORS)}"
            yield (
                tag,
                pid,
                f"{qid}: {to}, {relay}, {self._delays()}, dsn=4.7.5, status=deferred (Cannot start"
                " TLS: handshake failure)",
            )
            return
        if r < 0.09:  # certificate verification failures under a policy that requires it
            yield tag, pid, rng.choice(_VERIFY_FAILURES).format(ep=ep)
            yield tag, pid, f"Untrusted TLS connection established to {ep}: {_CIPHER_12}"
            yield (
                tag,
                pid,
                f"{qid}: {to}, {relay}, {self._delays()}, dsn=4.7.5, status=deferred (Server"
                " certificate not verified)",
            )
            return
        if r < 0.13:  # greylisted by the first MX, accepted by the second
            yield tag, pid, f"{self._trust(n)} TLS connection established to {ep}: {_CIPHER_13}"
            yield (
                tag,
                pid,
                f"{qid}: host {host}[{ip}] said: 451 4.7.1 Please try again later (in reply to"
                " RCPT TO command)",
            )
            ep2 = f"backup.{domain}[203.0.113.{rng.randrange(1, 255)}]:25"
            yield tag, pid, f"{self._trust(n)} TLS connection established to {ep2}: {_CIPHER_12}"
            yield (
                tag,
                pid,
                f"{qid}: {to}, relay={ep2}, {self._delays()}, dsn=2.0.0, status=sent (250 2.0.0"
                f" Ok: queued as {self._queue_id()})",
            )
            return
        trust = self._trust(n)
        cipher = _ADH if trust == "Anonymous" else (_CIPHER_13 if r < 0.6 else _CIPHER_12)
        yield tag, pid, f"{trust} TLS connection established to {ep}: {cipher}"
        if r < 0.16:  # greylisted: deferred, tried again later
            yield (
                tag,
                pid,
                f"{qid}: {to}, {relay}, {self._delays()}, dsn=4.2.0, status=deferred (host"
                f" {host}[{ip}] said: 450 4.2.0 {to[4:-1]}: Recipient address rejected:"
                " Greylisted, see https://postgrey.schweikert.ch/help/ (in reply to RCPT TO"
                " command))",
            )
            return
        if r < 0.18:  # unknown user: a bounce
            yield (
                tag,
                pid,
                f"{qid}: {to}, {relay}, {self._delays()}, dsn=5.1.1, status=bounced (host"
                f" {host}[{ip}] said: 550 5.1.1 {to[4:-1]}: Recipient address rejected: User"
                " unknown in virtual mailbox table (in reply to RCPT TO command))",
            )
            bqid = self._queue_id()
            yield "postfix/cleanup", 1192, f"{bqid}: message-id={self._message_id()}"
            yield "postfix/bounce", 1196, f"{qid}: sender non-delivery notification: {bqid}"
            yield "postfix/qmgr", 1188, f"{bqid}: from=<>, size=4321, nrcpt=1 (queue active)"
            yield (
                "postfix/lmtp",
                1197,
                f"{bqid}: to=<user1@example.org>, relay=mail.example.org[private/dovecot-lmtp],"
                f" {self._delays()}, dsn=2.0.0, status=sent (250 2.0.0 <user1@example.org>"
                " Saved)",
            )
            yield "postfix/qmgr", 1188, f"{bqid}: removed"
            return
        for i in range(1 + (rng.random() < 0.15)):  # sometimes a second recipient
            rcpt = to if i == 0 else f"to=<team@{domain}>"
            yield (
                tag,
                pid,
                f"{qid}: {rcpt}, {relay}, {self._delays()}, dsn=2.0.0, status=sent (250 2.0.0 Ok:"
                f" queued as {self._queue_id()})",
            )

    def _trust(self, n: int) -> str:
        rng = self._rng
        if n >= 0 and n % 4 != 0:  # no MTA-STS policy: opportunistic TLS
            r = rng.random()
            return "Trusted" if r < 0.6 else "Untrusted" if r < 0.97 else "Anonymous"
        return "Verified" if rng.random() < 0.97 else "Trusted"

    # -- the lines ---------------------------------------------------------------------------

    def events(self) -> Iterator[tuple[float, str, int, str]]:
        """(Unix time, tag, pid, message) of each line, forever."""
        rng = self._rng
        stories = self._stories()
        active = [next(stories) for _ in range(CONCURRENT)]
        t = START.timestamp()
        rate = LINES_PER_SECOND
        while True:
            i = rng.randrange(CONCURRENT)
            try:
                tag, pid, message = next(active[i])
            except StopIteration:
                active[i] = next(stories)
                continue
            t += rng.expovariate(rate)
            yield t, tag, pid, message

    def lines(self, count: int, stamp: Stamp) -> Iterator[str]:
        """The first ``count`` lines, without line ends, with ``stamp`` time stamps."""
        last_second = -1
        prefix = ""
        events = self.events()
        for _ in range(count):
            t, tag, pid, message = next(events)
            second = int(t)
            if second != last_second:
                last_second = second
                when = datetime.datetime.fromtimestamp(second, datetime.UTC)
                if stamp == "bsd":
                    prefix = f"{when:%b} {when.day:2d} {when:%H:%M:%S} {HOST} "
                else:
                    prefix = f"{when:%Y-%m-%dT%H:%M:%S}"
            if stamp == "bsd":
                yield f"{prefix}{tag}[{pid}]: {message}"
            else:
                micro = int((t - second) * 1e6)
                yield f"{prefix}.{micro:06d}+00:00 {HOST} {tag}[{pid}]: {message}"


_TLS_LINE_RE = re.compile(
    r"postfix/smtp\[\d+\]: (?:\w+ TLS connection established to|(?:server )?certificate"
    r" verification failed|SSL_connect error|warning: TLS library problem)"
)


def tls_share(lines: list[str]) -> float:
    """The share of outbound TLS lines (handshake summaries, TLS failures) in ``lines``."""
    return sum(1 for line in lines if _TLS_LINE_RE.search(line)) / len(lines)


# --- parse ---------------------------------------------------------------------------------


def measure_parse(sizes: Sizes) -> list[Figure]:
    """Lines per CPU second of a :class:`SessionTracker` over lines held in memory."""
    g = "parse"
    figures = []
    now = START + datetime.timedelta(days=2)
    for stamp, label in (("rfc3339", "RFC 3339 stamps"), ("bsd", "BSD syslog stamps")):
        lines = list(MailLog().lines(sizes.parse_lines, stamp))
        rates = []
        sessions = 0
        for _ in range(sizes.parse_repeats):
            tracker = SessionTracker(report_sender=REPORT_SENDER, tz=datetime.UTC)
            started = time.process_time()
            sessions = len(tracker.feed_lines(lines, now)) + len(tracker.release())
            rates.append(len(lines) / (time.process_time() - started))
        if sessions == 0 or tracker.unparsed > len(lines) // 1000:
            raise BenchError(f"parse: {sessions} sessions, {tracker.unparsed} lines not understood")
        note = (
            f"{len(lines):,} lines, {tls_share(lines):.1%} outbound TLS lines,"
            f" {sessions:,} sessions"
        )
        if stamp == "bsd":
            note = ""
        figures.append(
            Figure(
                g,
                f"parse_{stamp}",
                f"parser alone, {label}",
                round(statistics.median(rates)),
                "lines/s",
                ">= 300000",
                note=(
                    f"{note}{'; ' if note else ''}{_range(rates)} over {len(rates)} runs, CPU time"
                ),
            )
        )
        del lines
    return figures


def _range(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


# --- tail ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailRun:
    """One ``tail --once`` subprocess."""

    cpu: float
    wall: float
    max_rss: int  # bytes
    lines: int
    sessions: int
    unparsed: int


_READ_RE = re.compile(r"read (\d+) lines .*?, (\d+) sessions counted, (\d+) lines not understood")


def seed_store(path: Path) -> None:
    """A store holding what a policy map would have recorded for :func:`policy_domains`."""
    store = Store(path)
    fetched = START.timestamp() - 3 * 86400
    try:
        for i, domain in enumerate(policy_domains()):
            mode = "testing" if i % 10 == 3 else "enforce"
            mx = (
                (f"*.{domain}", f"mx.{domain}") if domain.endswith(".example") else (f"*.{domain}",)
            )
            lines = (
                "version: STSv1",
                f"mode: {mode}",
                *(f"mx: {p}" for p in mx),
                "max_age: 604800",
            )
            policy = Policy(mode, mx, 604800, lines)
            expires = fetched + 604800
            store.save_policy(StoredPolicy(domain, "20261101", policy, fetched, expires, expires))
            if i % 50 == 7:
                at = START.timestamp() + 3600 * (i % 20)
                store.record_failure(domain, at, "sts-policy-fetch-error", "timeout", "20261101")
    finally:
        store.close()


def run_tail(workdir: Path, log: Path, name: str, seed: Path | None) -> TailRun:
    """``postfix-mtasts tail --once log`` on a fresh store (a copy of ``seed``)."""
    store = workdir / f"{name}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    if seed is not None:
        shutil.copyfile(seed, store)
    config = workdir / f"{name}.toml"
    config.write_text(
        f'[server]\nallow_root = true\n[store]\npath = "{store}"\n'
        f'[tlsrpt]\nlog_timezone = "UTC"\ncontact_info = "mailto:{REPORT_SENDER}"\n'
    )
    binary = Path(sys.executable).parent / "postfix-mtasts"
    command = [str(binary), "tail", "--once", str(log), "-c", str(config)]
    errors = workdir / f"{name}.stderr"
    with errors.open("wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = errors.read_text(errors="replace")
    found = _READ_RE.findall(text)
    if proc.returncode != 0 or not found:
        raise BenchError(f"tail --once {log} failed ({proc.returncode}): {text.strip()[-500:]}")
    lines, sessions, unparsed = (int(x) for x in found[-1])
    return TailRun(
        usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss * 1024, lines, sessions, unparsed
    )


def write_logs(workdir: Path, lengths: tuple[int, ...], stamp: Stamp) -> list[Path]:
    """Log files of the given lengths, each a prefix of the longest."""
    paths = [workdir / f"mail-{n}.log" for n in lengths]
    files = [p.open("w", encoding="utf-8", newline="\n") for p in paths]
    try:
        for i, line in enumerate(MailLog().lines(max(lengths), stamp)):
            text = line + "\n"
            for n, f in zip(lengths, files, strict=True):
                if i < n:
                    f.write(text)
    finally:
        for f in files:
            f.close()
    return paths


def measure_tail(sizes: Sizes, workdir: Path) -> list[Figure]:
    """``tail --once`` lines per CPU second and peak RSS for two log lengths."""
    g = "tail"
    seed = workdir / "seed.sqlite"
    seed_store(seed)
    short, long = sizes.tail_lines
    logs = write_logs(workdir, (short, long), "rfc3339")
    empty = workdir / "empty.log"
    empty.write_bytes(b"")
    start_up = run_tail(workdir, empty, "empty", seed)
    figures = []
    rss = []
    for n, log in zip((short, long), logs, strict=True):
        runs = [run_tail(workdir, log, f"tail-{n}", seed) for _ in range(sizes.tail_repeats)]
        for r in runs:
            if r.lines != n or r.sessions == 0:
                raise BenchError(f"tail --once read {r.lines} lines of {n}, {r.sessions} sessions")
        rates = [n / r.cpu for r in runs]
        best = max(rates)
        run = runs[rates.index(best)]
        size = log.stat().st_size
        figures.append(
            Figure(
                g,
                f"tail_{n}",
                f"tail --once, {_count(n)} lines ({size / 2**20:.0f} MiB)",
                round(statistics.median(rates)),
                "lines/s",
                ">= 100000",
                note=f"{_range(rates)} over {len(runs)} runs, CPU time of the whole process"
                f" (start-up {start_up.cpu:.2f} s included); {n / run.wall:,.0f} lines/s by the"
                f" clock; {run.sessions:,} sessions, {run.unparsed} lines not understood",
            )
        )
        rss.append(max(r.max_rss for r in runs))
        figures.append(Figure(g, f"tail_{n}_rss", "  peak RSS", rss[-1] / 2**20, "MiB"))
    figures.append(
        Figure(
            g,
            "tail_rss_growth",
            f"  peak RSS growth from {_count(short)} to {_count(long)} lines",
            (rss[1] - rss[0]) / 2**20,
            "MiB",
            "<= 4",
        )
    )
    figures.append(
        Figure(g, "tail_start", "  start-up on an empty log", start_up.cpu, "s", note="CPU time")
    )
    return figures


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


# --- reports -------------------------------------------------------------------------------


def report_counts(domains: int, day: str) -> dict[CountRow, int]:
    """A day's counters for ``domains`` policy domains, as ``tail`` would have stored them."""
    rng = random.Random(SEED)
    counts: dict[CountRow, int] = {}
    for n in range(domains):
        domain = tail_domain(n + 1)
        if n % 3 == 0:
            lines = "\n".join(
                ("version: STSv1", "mode: enforce", f"mx: mx1.{domain}", f"mx: mx2.{domain}",
                 "max_age: 604800")
            )  # fmt: skip
            key = (day, domain, "sts", lines, f"mx1.{domain}\nmx2.{domain}")
        else:
            key = (day, domain, "no-policy-found", "", "")
        counts[(*key, "success", "", "", "")] = rng.randrange(1, 500)
        if n % 5 == 0:
            for ip in range(1 + n % 3):
                row = (*key, "certificate-expired", f"mx1.{domain}", f"198.18.{ip}.1", "")
                counts[row] = rng.randrange(1, 20)
        if n % 11 == 0:
            row = (
                *key,
                "validation-failure",
                f"mx2.{domain}",
                "2001:db8::25",
                "wrong version number",
            )
            counts[row] = rng.randrange(1, 5)
    return counts


def measure_reports(workdir: Path) -> list[Figure]:
    """CPU seconds of :func:`day_reports` for a day with ``REPORT_DOMAINS`` policy domains."""
    g = "reports"
    day = START.date()
    store = Store(workdir / "reports.sqlite")
    config = TLSRPTConfig(organization_name="Example Org", contact_info="mailto:tlsrpt@example.org")
    try:
        store.commit_counts("bench", None, report_counts(REPORT_DOMAINS, day.isoformat()), 0.0)
        times = []
        for _ in range(2):  # the first run makes the report tokens, the second reuses them
            started = time.process_time()
            reports = day_reports(store, config, day, START.timestamp() + 86400)
            times.append(time.process_time() - started)
    finally:
        store.close()
    if len(reports) != REPORT_DOMAINS:
        raise BenchError(f"reports: {len(reports)} built for {REPORT_DOMAINS} domains")
    return [
        Figure(
            g,
            "reports_build",
            f"report building, {REPORT_DOMAINS:,} policy domains",
            times[0],
            "s",
            "<= 10",
            note=f"day_reports, CPU time: {times[0]:.2f} s with new report ids,"
            f" {times[1]:.2f} s built again",
        )
    ]


# --- entry ---------------------------------------------------------------------------------


def measure(groups: list[str], quick: bool, progress: Callable[[str], None]) -> list[Figure]:
    """The figures of the reporter's groups among ``groups``, in a temporary directory."""
    sizes = Sizes.for_run(quick)
    workdir = Path(tempfile.mkdtemp(prefix="postfix-mtasts-bench-ingest-"))
    figures: list[Figure] = []
    try:
        if "parse" in groups:
            progress(f"parsing {sizes.parse_lines:,} log lines in memory")
            figures += measure_parse(sizes)
        if "tail" in groups:
            progress(f"tail --once on logs of {' and '.join(map(_count, sizes.tail_lines))} lines")
            figures += measure_tail(sizes, workdir)
        if "reports" in groups:
            progress(f"building the reports of {REPORT_DOMAINS:,} policy domains")
            figures += measure_reports(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures
