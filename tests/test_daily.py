"""The reports of a day: built from the store's counters, stable ids, and `report --out`."""

from __future__ import annotations

import datetime
import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import parsedmarc
import pytest
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from postfix_mtasts.config import TLSRPTConfig
from postfix_mtasts.mtasts.policy import Policy
from postfix_mtasts.store import Store
from postfix_mtasts.tlsrpt.aggregate import CountKey, count_row
from postfix_mtasts.tlsrpt.daily import day_reports
from postfix_mtasts.tlsrpt.report import PolicyKey, validate_report

DAY = datetime.date(2026, 11, 22)
LINES = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")
POLICY = Policy("enforce", ("mx.example.net",), 86400, LINES)
STS = PolicyKey("sts", "example.net", POLICY.lines, POLICY.mx)
NONE = PolicyKey("no-policy-found", "plain.example")
CONFIG = TLSRPTConfig(organization_name="Example Org", contact_info="mailto:tlsrpt@example.org")
COUNTS = {
    CountKey("2026-11-22", STS, "success"): 41,
    CountKey("2026-11-22", STS, "certificate-expired", "mx.example.net", "192.0.2.25"): 1,
    CountKey("2026-11-22", NONE, "success"): 7,
    CountKey("2026-11-21", NONE, "success"): 3,  # another day: not in this report
}


def filled_store(path: Path) -> Store:
    store = Store(path)
    store.commit_counts("mail.log", None, {count_row(k): n for k, n in COUNTS.items()}, 0.0)
    return store


def test_one_valid_report_per_domain(tmp_path: Path) -> None:
    """Each domain with sessions that day gets one report that passes the strict check."""
    store = filled_store(tmp_path / "s.sqlite")
    reports = day_reports(store, CONFIG, DAY, 0.0)
    assert [r.policy_domain for r in reports] == ["example.net", "plain.example"]
    sts = reports[0].report
    assert validate_report(sts) == []
    assert sts["policies"][0]["summary"] == {
        "total-successful-session-count": 41,
        "total-failure-session-count": 1,
    }
    assert sts["policies"][0]["failure-details"] == [
        {
            "result-type": "certificate-expired",
            "receiving-mx-hostname": "mx.example.net",
            "receiving-ip": "192.0.2.25",
            "failed-session-count": 1,
        }
    ]
    assert reports[1].report["policies"][0]["summary"]["total-successful-session-count"] == 7
    for r in reports:
        assert json.loads(gzip.decompress(r.gz)) == r.report
        parsed = parsedmarc.parse_smtp_tls_report_json(json.dumps(r.report))
        assert parsed["report_id"] == r.report_id
    store.close()


def test_report_ids_are_stable_and_unique(tmp_path: Path) -> None:
    """Building a day again reuses each report's id; different domains get different ids."""
    store = filled_store(tmp_path / "s.sqlite")
    first = day_reports(store, CONFIG, DAY, 0.0)
    again = day_reports(store, CONFIG, DAY, 1.0)
    assert [r.report_id for r in first] == [r.report_id for r in again]
    assert [r.filename for r in first] == [r.filename for r in again]
    assert len({r.report_id for r in first}) == 2
    assert first[0].report_id.startswith("20261122.example.net.")
    assert first[0].report_id.endswith("@example.org")
    assert first[0].filename.startswith("example.org!example.net!1795305600!1795391999!")
    store.close()


BAD_DOMAINS = ("[192.0.2.9]", "localhost")
"""Policy domains no report can name, as an older version counted them."""


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The text of each warning logged while the test runs."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def add_bad_domains(store: Store) -> None:
    keys = [CountKey("2026-11-22", PolicyKey("no-policy-found", d), "success") for d in BAD_DOMAINS]
    rows = {count_row(key): 2 for key in keys}
    store.commit_counts("old.log", None, rows, 0.0)


def test_domain_that_cannot_be_built_is_left_out(tmp_path: Path, warnings: list[str]) -> None:
    """A policy domain no report can name is left out with one warning each; the day's other
    reports are built."""
    store = filled_store(tmp_path / "s.sqlite")
    add_bad_domains(store)
    reports = day_reports(store, CONFIG, DAY, 0.0)
    assert [r.policy_domain for r in reports] == ["example.net", "plain.example"]
    assert len(warnings) == 2
    for domain, line in zip(BAD_DOMAINS, warnings, strict=True):
        assert line.startswith(f"reports of 2026-11-22: leaving out {domain!r}: ")
    store.close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postfix_mtasts.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_report_command_writes_files_parsedmarc_reads(tmp_path: Path) -> None:
    """`report --day --out` writes one .json.gz per domain that parsedmarc reads back, and
    leaves out with a warning the domains no report can name."""
    store = filled_store(tmp_path / "s.sqlite")
    add_bad_domains(store)
    store.close()
    config = tmp_path / "c.toml"
    config.write_text(
        '[store]\npath = "%s"\n[tlsrpt]\norganization_name = "Example Org"\n'
        'contact_info = "mailto:tlsrpt@example.org"\n' % (tmp_path / "s.sqlite")
    )
    out = tmp_path / "out"
    result = run("report", "-c", str(config), "--day", "2026-11-22", "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2
    assert result.stdout.splitlines()[0].startswith("example.net: 42 sessions, 1 failed: ")
    assert "leaving out '[192.0.2.9]'" in result.stderr and "Traceback" not in result.stderr
    for name in files:
        parsed = parsedmarc.parse_report_file(str(out / name), offline=True)
        assert parsed["report_type"] == "smtp_tls"
    again = run("report", "-c", str(config), "--day", "2026-11-22", "--out", str(out))
    assert again.returncode == 0 and sorted(p.name for p in out.iterdir()) == files


@pytest.mark.parametrize(
    ("text", "args", "named"),
    [
        ("", ["--day", "2026-11-22"], "[tlsrpt] organization_name"),
        (
            '[tlsrpt]\norganization_name = "X"\ncontact_info = "mailto:a@example.org"\n',
            ["--day", "2999-01-01"],
            "--day",
        ),
        (
            '[tlsrpt]\norganization_name = "X"\ncontact_info = "mailto:a@example.org"\n',
            ["--day", "yesterday"],
            "--day",
        ),
    ],
)
def test_report_usage_errors(tmp_path: Path, text: str, args: list[str], named: str) -> None:
    """A missing required key or a bad or unfinished day exits 2 with one line naming it."""
    config = tmp_path / "c.toml"
    config.write_text(text + f'[store]\npath = "{tmp_path}/s.sqlite"\n')
    result = run("report", "-c", str(config), *args)
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr
