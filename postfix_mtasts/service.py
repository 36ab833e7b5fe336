"""Wiring: each job as a Twisted service built from a :class:`~postfix_mtasts.config.Config`.

``make_policy_map(config, reactor)`` returns the policy map: the socketmap listeners, the
resolver behind them and the refresh timer, over one store.  Nothing here imports the global
reactor; :mod:`postfix_mtasts.cli` passes it in.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from postfix_mtasts.config import Config, ConfigError
from postfix_mtasts.mtasts.dns import DNSClient, parse_nameservers
from postfix_mtasts.mtasts.fetch import PolicyFetcher
from postfix_mtasts.mtasts.resolver import PolicyResolver
from postfix_mtasts.socketmap import SocketmapFactory
from postfix_mtasts.store import Store

REFRESH_TICK = 30.0
"""Seconds between two looks for policies due for a refresh."""

log = Logger()


def make_resolver(config: Config, reactor: Any, store: Store) -> PolicyResolver:
    """The resolver with its DNS client and fetcher, as ``serve`` and ``query`` both use it."""
    dns = DNSClient(reactor, parse_nameservers(config.dns.nameservers), timeout=config.dns.timeout)
    try:
        fetcher = PolicyFetcher(
            reactor,
            dns.ipv4,
            ca_file=config.https.ca_file,
            timeout=config.https.timeout,
            fallback=dns.ipv6,
        )
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where, detail = "[https] ca_file", f"{config.https.ca_file}: {problem}"
        raise ConfigError(config.source, where, detail) from None
    return PolicyResolver(reactor, dns, fetcher, store, zones=config.zones)


class PolicyMap(MultiService):
    """The policy map: listeners, resolver, refresh timer and the store they share."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.store = Store(config.store_path())
        self.resolver = make_resolver(config, reactor, self.store)
        self.factory = SocketmapFactory(self.resolver.lookup, reactor)
        self.endpoints = [(d, _endpoint(reactor, d)) for d in config.server.listen]
        self.ports: list[Any] = []
        timer = TimerService(REFRESH_TICK, self.resolver.refresh_due)
        timer.clock = reactor
        timer.setServiceParent(self)

    async def listen(self) -> None:
        """Listen on every endpoint, load the held policies, then start serving.

        Raises :class:`StartError` (after closing what was opened) if an endpoint fails.
        """
        for description, endpoint in self.endpoints:
            try:
                self.ports.append(await endpoint.listen(self.factory))
            except Exception as e:  # noqa: BLE001 (CannotListenError, OSError, ...)
                for port in self.ports:
                    await port.stopListening()
                self.ports = []
                raise StartError(f"listen {description!r}: {e}") from None
        loaded = self.resolver.load()
        log.info(
            "postfix-mtasts map: {count} policies loaded from {path}, listening on {listen}",
            count=loaded,
            path=str(self.store.path),
            listen=", ".join(self.config.server.listen),
        )
        self.startService()
        sd_notify(b"READY=1")

    def stopService(self) -> Deferred[None]:
        sd_notify(b"STOPPING=1")

        async def stop() -> None:
            # Stop accepting, then let in-flight replies finish, then close the store.
            for port in self.ports:
                await port.stopListening()
            await super(PolicyMap, self).stopService()
            await self.factory.drain()
            self.store.close()
            log.info("postfix-mtasts map stopped")

        return ensureDeferred(stop())


class StartError(Exception):
    """The service cannot start; ``str()`` says why in one line."""


def _endpoint(reactor: Any, description: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except IndexError:  # systemd:index=N beyond the inherited sockets
        raise StartError(
            f"listen {description!r}: no such inherited socket (is the service socket-activated?)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise StartError(f"listen {description!r}: {e}") from None


def sd_notify(state: bytes) -> None:
    """Tell systemd about our state when it asked (``Type=notify``); otherwise do nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state, address)
    except OSError as e:
        log.warn("cannot notify systemd: {error}", error=str(e))
