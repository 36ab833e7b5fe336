"""Fixtures every test module may use.

- ``reactor``, ``dns_server``, ``dns_server_factory``: from :mod:`tests.dnsserver`.
- Every test fails if an unhandled error (a Deferred garbage-collected with a failure, or a
  ``log.failure``) reached the log while it ran: pytest-twisted does not check this itself.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

pytest_plugins = ["tests.dnsserver"]


@pytest.fixture(autouse=True)
def _no_logged_errors(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """Fail the test if a critical event or an unhandled Deferred error was logged during it."""
    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
        gc.collect(1)  # young generations: surfaces dropped Deferreds holding a failure
    finally:
        globalLogPublisher.removeObserver(observer)
    if request.node.get_closest_marker("logged_errors_expected"):
        return
    bad = [
        e
        for e in seen
        if e.get("log_level") == LogLevel.critical
        or "Unhandled error" in str(e.get("log_format", ""))
    ]
    assert not bad, f"unhandled errors were logged: {bad}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "logged_errors_expected: the test logs failures on purpose")
