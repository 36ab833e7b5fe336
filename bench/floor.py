"""The floor under the daemon's CPU per fetched policy: each step of a cold lookup alone.

``python -m bench.floor CA_FILE HTTPS_HOST DNS_HOST COUNT`` runs in its own process, pinned by
the bench to the daemon's CPU, against the testbed's servers. It does ``COUNT`` of each step
below, :data:`CONNS` at a time like the cold group (after a short warm-up), and prints one
JSON line: CPU milliseconds per step.

- ``fetch``: the daemon's :class:`~postfix_mtasts.mtasts.fetch.PolicyFetcher`, the address
  given: TCP, TLS 1.3 with the certificate checks, the HTTP GET through Twisted's ``Agent``;
  no DNS, no store, no socketmap;
- ``agent``: the same GET through an ``Agent`` with Twisted's stock TLS policy,
  ``BrowserLikePolicyForHTTPS`` (a TLS context per request, the host name checked by
  ``service_identity``), connecting as ``Agent`` does by itself but to the address given;
- ``dns``: one query of the daemon's DNS client (a cold lookup asks two: TXT, then A), for
  a cold-group domain's TXT record.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate
from twisted.internet.task import react
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bench.testbed import domain
from postfix_mtasts.mtasts.dns import DNSClient
from postfix_mtasts.mtasts.fetch import PolicyFetcher

CONNS = 50
WARM_UP = 50


def cpu() -> float:
    """CPU seconds used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def per_step(step: Callable[[str], Awaitable[object]], names: Sequence[str]) -> float:
    """CPU milliseconds per ``step(name)`` over ``names``, ``CONNS`` running at once."""
    queue = iter(names)

    async def worker() -> None:
        for name in queue:
            await step(name)

    started = cpu()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(CONNS)])
    return (cpu() - started) / len(names) * 1000


async def measure(
    reactor: Any, ca_file: str, https_host: str, dns_host: str, count: int
) -> dict[str, float]:
    """CPU milliseconds per fetch, per stock ``Agent`` GET and per DNS query."""

    async def address(_: str) -> list[str]:
        return [https_host]

    fetcher = PolicyFetcher(reactor, address, ca_file=ca_file)
    with open(ca_file, "rb") as f:
        policy = BrowserLikePolicyForHTTPS(Certificate.loadPEM(f.read()))  # type: ignore[no-untyped-call]

    @implementer(IAgentEndpointFactory)
    class Endpoints:
        """Agent's own way (TCP, then TLS from the policy), to ``https_host`` for every name."""

        def endpointForURI(self, uri: URI) -> object:
            tcp = TCP4ClientEndpoint(reactor, https_host, 443)
            return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), tcp)

    agent = Agent.usingEndpointFactory(reactor, Endpoints())  # type: ignore[no-untyped-call]
    dns = DNSClient(reactor, [(dns_host, 53)])

    async def stock(name: str) -> bytes:
        url = f"https://mta-sts.{name}/.well-known/mta-sts.txt"
        response = await agent.request(b"GET", url.encode())
        return await readBody(response)

    async def query(name: str) -> list[bytes]:
        return await dns.txt(f"_mta-sts.{name}")

    names = [domain("cold", i) for i in range(count + WARM_UP)]  # in the test zone
    figures = {}
    for key, step in (("fetch", fetcher.fetch), ("agent", stock), ("dns", query)):
        await per_step(step, names[:WARM_UP])
        figures[key] = await per_step(step, names[WARM_UP:])
    return figures


def main(reactor: Any, ca_file: str, https_host: str, dns_host: str, count: str) -> Any:
    """Measure, then print the figures as one JSON line (``react`` stops the reactor)."""
    measuring = Deferred.fromCoroutine(measure(reactor, ca_file, https_host, dns_host, int(count)))
    return measuring.addCallback(lambda figures: print(json.dumps(figures), flush=True))


if __name__ == "__main__":
    react(main, sys.argv[1:])
