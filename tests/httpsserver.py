"""A scriptable HTTPS server on loopback for policy-host tests and benchmarks.

Each ``(host, path)`` gets a :class:`Reply` chosen by the test: a good policy, any status,
a redirect, any or no Content-Type, a body framed by Content-Length, chunks or the close, a
body dripped one byte at a time, or headers and then silence. Every request is logged in
``server.requests`` (method, path, Host, headers) so a test can check what the client sent
and what it never asked for. The HTTP side is a deliberately small raw protocol, so each
reply is exactly the bytes the test asked for (no default headers)::

    server = PolicyServer(reactor, SNIContextFactory(ca))
    server.set("mta-sts.example.test", policy(GOOD_POLICY))
    port = await server.start()
    ...
    await server.stop()

As a script (benchmarks run it in its own process)::

    python -m tests.httpsserver CONFIG.json

CONFIG is ``{"ca_file": PATH, "port": 0, "hosts": {HOST: REPLY, ...}, "default": REPLY}``
where REPLY is ``{"status": 200, "body": "...", "content_type": "text/plain",
"headers": [[name, value], ...], "framing": "length", "content_length": null, "drip": 0,
"hang": false}`` (all optional; see :class:`Reply`). The script writes its test CA to
``ca_file``, serves every host name with a certificate issued on demand, prints
``{"port": N}`` on one line and runs until stopped. Optional keys: ``"interface"`` (default
127.0.0.1); ``"stats_file"``: each SIGUSR1 rewrites that file (atomically) with ``{"seq": n,
"total": requests, "by_host": {HOST: n, ...}}``, ``seq`` counting the dumps.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

WELL_KNOWN = "/.well-known/mta-sts.txt"

GOOD_POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 86400\r\n"

Framing = Literal["length", "chunked", "close"]


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request.

    ``framing``: ``length`` sends Content-Length (``content_length`` overrides its value),
    ``chunked`` uses chunked transfer coding, ``close`` ends the body by closing.
    ``drip`` > 0 sends the body one byte per ``drip`` seconds; ``hang`` keeps the connection
    open after the body instead of ending the response (with an empty body and a
    Content-Length or chunked framing: headers, then silence).
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    framing: Framing = "length"
    content_length: int | None = None
    drip: float = 0.0
    hang: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        """A reply from its JSON description (see the module docstring)."""
        body = data.get("body", "")
        return cls(
            status=int(data.get("status", 200)),
            body=body.encode() if isinstance(body, str) else bytes(body),
            content_type=data.get("content_type", "text/plain"),
            headers=tuple((str(n), str(v)) for n, v in data.get("headers", ())),
            framing=data.get("framing", "length"),
            content_length=data.get("content_length"),
            drip=float(data.get("drip", 0.0)),
            hang=bool(data.get("hang", False)),
        )


def policy(body: bytes = GOOD_POLICY, content_type: str | None = "text/plain") -> Reply:
    """A 200 reply carrying ``body``."""
    return Reply(body=body, content_type=content_type)


def status(code: int, body: bytes = b"no policy here\n") -> Reply:
    """A reply with status ``code`` and a short text body."""
    return Reply(status=code, body=body)


def redirect(location: str, code: int = 301) -> Reply:
    """A redirect to ``location``."""
    return Reply(status=code, body=b"moved\n", headers=(("Location", location),))


@dataclass
class SeenRequest:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def host(self) -> str:
        """The Host header without a port, lower-cased ("" if missing)."""
        value = (self.header("host") or "").lower()
        return value.rsplit(":", 1)[0] if value.count(":") == 1 else value

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        for n, v in self.headers:
            if n == name.lower():
                return v
        return None


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


class _PolicyHostProtocol(LineReceiver):
    """Reads one request's head, answers it as its :class:`Reply` says, then closes."""

    MAX_LENGTH = 16384

    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._request: SeenRequest | None = None
        self._bad = False
        self._drip: Any = None  # an IDelayedCall
        self._t: Any = None  # the TLS transport
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._t = self.transport
        self._server._connections.add(self)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("latin-1")
        if self._request is None:
            parts = text.split(" ")
            if len(parts) != 3:
                self._bad = True
                parts = ["?", "?", "?"]
            self._request = SeenRequest(parts[0], parts[1], parts[2])
        elif text:
            name, _, value = text.partition(":")
            self._request.headers.append((name.strip().lower(), value.strip(" \t")))
        else:
            self.setRawMode()  # type: ignore[no-untyped-call]
            self._server.requests.append(self._request)
            if self._bad:
                self._answer(Reply(status=400, body=b"bad request\n"))
            else:
                self._answer(self._server.reply_for(self._request.host, self._request.path))

    def rawDataReceived(self, data: bytes) -> None:
        """Ignore anything after the request head (GET has no body)."""

    def _answer(self, reply: Reply) -> None:
        body = reply.body
        self._send_head(reply, body)
        if reply.drip > 0:
            self._drip_next(body, reply)
            return
        self._send_body(body, reply)
        self._finish(reply)

    def _send_head(self, reply: Reply, body: bytes) -> None:
        lines = [f"HTTP/1.1 {reply.status} {_phrase(reply.status)}", "Connection: close"]
        if reply.content_type is not None:
            lines.append(f"Content-Type: {reply.content_type}")
        if reply.framing == "length":
            length = reply.content_length if reply.content_length is not None else len(body)
            lines.append(f"Content-Length: {length}")
        elif reply.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        lines.extend(f"{n}: {v}" for n, v in reply.headers)
        self._t.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_body(self, data: bytes, reply: Reply) -> None:
        if not data:
            return
        if reply.framing == "chunked":
            step = 4096
            for i in range(0, len(data), step):
                chunk = data[i : i + step]
                self._t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._t.write(data)

    def _finish(self, reply: Reply) -> None:
        if reply.hang:
            return
        if reply.framing == "chunked":
            self._t.write(b"0\r\n\r\n")
        self._t.loseConnection()

    def _drip_next(self, rest: bytes, reply: Reply) -> None:
        self._drip = None
        if not rest:
            self._finish(reply)
            return
        self._send_body(rest[:1], reply)
        self._drip = self._server.reactor.callLater(reply.drip, self._drip_next, rest[1:], reply)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._drip is not None and self._drip.active():
            self._drip.cancel()
        self._server._connections.discard(self)
        self.lost.callback(None)


class PolicyServer:
    """An HTTPS server on 127.0.0.1 whose answers per ``(host, path)`` the test sets.

    ``context_factory`` is a server context factory from :mod:`tests.pki` (one certificate,
    SNI-picked certificates, or a TLS 1.1-only context). Unknown hosts or paths get the
    ``default`` reply, or a 404 if there is none.
    """

    def __init__(
        self,
        reactor: Any,
        context_factory: Any,
        replies: dict[str, Reply] | None = None,
        default: Reply | None = None,
    ) -> None:
        self.reactor = reactor
        self._context_factory = context_factory
        self._replies: dict[tuple[str, str], Reply] = {}
        for host, reply in (replies or {}).items():
            self.set(host, reply)
        self.default = default
        self.requests: list[SeenRequest] = []
        self._connections: set[_PolicyHostProtocol] = set()
        self._port: Any = None  # an IListeningPort

    def set(self, host: str, reply: Reply, path: str = WELL_KNOWN) -> None:
        """Answer requests for ``host`` and ``path`` with ``reply``."""
        self._replies[(host.lower(), path)] = reply

    def reply_for(self, host: str, path: str) -> Reply:
        """The reply for a request to ``host`` and ``path``."""
        reply = self._replies.get((host.lower(), path), self.default)
        return reply if reply is not None else status(404)

    def requests_for(self, host: str) -> list[SeenRequest]:
        """The requests whose Host header named ``host``."""
        return [r for r in self.requests if r.host == host.lower()]

    @property
    def open_connections(self) -> int:
        """How many client connections are open now."""
        return len(self._connections)

    def wait_closed(self) -> Deferred[list[tuple[bool, None]]]:
        """A Deferred firing once every connection open now has closed."""
        return DeferredList([c.lost for c in self._connections])

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after :meth:`start`)."""
        assert self._port is not None
        port: int = self._port.getHost().port
        return port

    async def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening (an ephemeral port by default); return the port."""
        factory = Factory.forProtocol(lambda: _PolicyHostProtocol(self))
        endpoint = SSL4ServerEndpoint(  # type: ignore[no-untyped-call]
            self.reactor, port, self._context_factory, interface=interface
        )
        self._port = await endpoint.listen(factory)  # type: ignore[no-untyped-call]
        return self.port

    async def stop(self) -> None:
        """Stop listening, drop every open connection and wait until all are closed."""
        waits = [c.lost for c in self._connections]
        for c in list(self._connections):
            c._t.abortConnection()
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        await DeferredList(waits)


def _write_stats(path: str, seq: int, requests: list[SeenRequest]) -> None:
    """Write the request counts per Host to ``path`` as JSON, atomically."""
    by_host: dict[str, int] = {}
    for request in requests:
        by_host[request.host] = by_host.get(request.host, 0) + 1
    stats = {"seq": seq, "total": len(requests), "by_host": by_host}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)


async def _serve(reactor: Any, config_path: str) -> None:
    from tests.pki import SNIContextFactory, TestCA

    config = json.loads(Path(config_path).read_text())
    ca = TestCA("Benchmark Root")
    Path(config["ca_file"]).write_bytes(ca.cert_pem)
    replies = {h: Reply.from_json(r) for h, r in config.get("hosts", {}).items()}
    default = Reply.from_json(config["default"]) if "default" in config else None
    server = PolicyServer(reactor, SNIContextFactory(ca), replies, default)
    port = await server.start(config.get("interface", "127.0.0.1"), int(config.get("port", 0)))
    stats_file = config.get("stats_file")
    if stats_file:
        dumps = [0]

        def dump() -> None:
            dumps[0] += 1
            _write_stats(stats_file, dumps[0], server.requests)

        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    await Deferred()  # until the reactor is stopped by a signal


def main(argv: list[str] | None = None) -> None:
    """Run the server described by the JSON file named on the command line."""
    from twisted.internet.task import react

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m tests.httpsserver CONFIG.json\n")
        raise SystemExit(2)
    react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, args[0])))


if __name__ == "__main__":
    main()
