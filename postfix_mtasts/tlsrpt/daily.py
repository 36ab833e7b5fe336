"""The reports of one finished UTC day, built from the store's counters.

One RFC 8460 report per policy domain that had sessions that day.  Each report's id is made
once (a random token kept in the store) and reused when the day is built again, so receivers
can tell a re-sent report from a new one.  A domain whose report cannot be built (counters
under a name that is not a domain, kept by an older version) is left out with a log line;
the day's other reports are built all the same.
"""

from __future__ import annotations

import datetime
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from postfix_mtasts.config import TLSRPTConfig
from postfix_mtasts.store import Store
from postfix_mtasts.tlsrpt.aggregate import CountKey, count_key_from_row
from postfix_mtasts.tlsrpt.logparse import SUCCESS
from postfix_mtasts.tlsrpt.report import (
    FailureKey,
    PolicyCounts,
    PolicyKey,
    build_report,
    make_report_id,
    report_filename,
    report_gzip,
)

log = Logger()


@dataclass(frozen=True, slots=True)
class DayReport:
    """One built report, ready to write or send."""

    policy_domain: str
    report_id: str
    token: str
    filename: str
    report: dict[str, Any]
    gz: bytes


def group_counts(rows: Iterable[tuple[CountKey, int]]) -> dict[str, dict[PolicyKey, PolicyCounts]]:
    """Counters by policy domain, then by policy, as :func:`build_report` takes them."""
    grouped: dict[str, dict[PolicyKey, PolicyCounts]] = defaultdict(dict)
    for key, sessions in rows:
        policies = grouped[key.policy.policy_domain]
        counts = policies.setdefault(key.policy, PolicyCounts())
        if key.result == SUCCESS:
            counts.successes += sessions
        else:
            failure = FailureKey(
                key.result, key.mx_host or None, key.mx_ip or None, key.reason or None
            )
            counts.failures[failure] = counts.failures.get(failure, 0) + sessions
    return dict(grouped)


def day_reports(
    store: Store,
    config: TLSRPTConfig,
    day: datetime.date,
    now: float,
    new_token: Callable[[], str] = lambda: secrets.token_hex(8),
) -> list[DayReport]:
    """Build the reports of ``day`` (a finished UTC day) for every domain with sessions."""
    rows = ((count_key_from_row(row), n) for row, n in store.day_counts(day.isoformat()))
    submitter = config.submitter_domain
    # Postfix does not log which address a session left from: only a single configured
    # address can be reported as the sending-mta-ip.
    sending_ip = config.sending_mta_ip[0] if len(config.sending_mta_ip) == 1 else None
    reports = []
    for domain, policies in sorted(group_counts(rows).items()):
        try:
            token = store.report_token(day.isoformat(), domain, new_token(), now)
            report_id = make_report_id(day, domain, submitter, token)
            report = build_report(
                organization_name=config.organization_name,
                contact_info=config.contact_info,
                report_id=report_id,
                day=day,
                policies=policies,
                sending_mta_ip=sending_ip,
            )
            filename = report_filename(submitter, domain, day, token)
        except ValueError as e:
            log.warn(
                "reports of {day}: leaving out {domain!r}: {error}",
                day=day.isoformat(),
                domain=domain,
                error=str(e),
            )
            continue
        reports.append(DayReport(domain, report_id, token, filename, report, report_gzip(report)))
    return reports
