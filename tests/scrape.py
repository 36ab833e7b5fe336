"""Scrape a Prometheus ``/metrics`` page over real HTTP, as Prometheus would."""

# twisted.web.client has no type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone

Sample = tuple[str, tuple[tuple[str, str], ...]]


class _Body(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


async def scrape_text(reactor: Any, url: str) -> str:
    """GET ``url``; the body of a 200 text/plain answer (anything else fails the test)."""
    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    body = _Body()
    response.deliverBody(body)
    text = (await body.done).decode("utf-8")
    assert response.code == 200, f"HTTP {response.code}"
    content_type = response.headers.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=0.0.4"), content_type
    return text


async def scrape(reactor: Any, url: str) -> dict[tuple[str, str], float]:
    """The samples at ``url`` as ``{(name, first label value or ""): value}``."""
    text = await scrape_text(reactor, url)
    return {
        (s.name, next(iter(s.labels.values()), "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
