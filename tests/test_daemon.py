"""The real daemon on loopback: real DNS, a real HTTPS policy host, Postfix's postmap as client.

The policy host listens on port 443 of a loopback address of its own, as the daemon fetches
from ``https://mta-sts.<domain>/`` exactly as in production; binding it needs root.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.daemon import Daemon, free_port, postmap, require_postmap, require_root, run
from tests.dnsserver import DNSTestServer
from tests.httpsserver import PolicyServer, Reply, policy
from tests.pki import SNIContextFactory, TestCA
from tests.scrape import scrape

ENFORCE = (
    b"version: STSv1\nmode: enforce\nmx: mail.enforce.test\nmx: *.backup.test\nmax_age: 86400\n"
)
ENFORCE_REPLY = "secure match=mail.enforce.test:.backup.test servername=hostname"
WILD = b"version: STSv1\nmode: enforce\nmx: *.wild.test\nmax_age: 604800\n"
TESTING = b"version: STSv1\nmode: testing\nmx: mail.testing.test\nmax_age: 86400\n"
NONE = b"version: STSv1\nmode: none\nmax_age: 86400\n"

POLICIES = {"enforce.test": ENFORCE, "wild.test": WILD, "testing.test": TESTING, "none.test": NONE}


@dataclass
class Bed:
    dns: DNSTestServer
    https: PolicyServer
    https_host: str
    ca_file: Path
    tmp: Path

    def config(self, listen: str, **extra: str) -> Path:
        lines = [
            "[server]",
            f"listen = [{json.dumps(listen)}]",
            "allow_root = true",  # CI runs the tests as root
            "[dns]",
            f'nameservers = ["{self.dns.host}:{self.dns.port}"]',
            "timeout = 3.0",
            "[https]",
            f"ca_file = {json.dumps(str(self.ca_file))}",
            "timeout = 5.0",
            "[store]",
            f"path = {json.dumps(str(self.tmp / 'store.sqlite'))}",
        ]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        path = self.tmp / "postfix-mtasts.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


@pytest_twisted.async_yield_fixture()
async def testbed(reactor: Any, dns_server: DNSTestServer, tmp_path: Path) -> AsyncIterator[Bed]:
    """DNS records and policies for the test domains, and a policy host on port 443."""
    require_root()
    require_postmap()
    https_host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    ca = TestCA("Daemon Test Root")
    https = PolicyServer(reactor, SNIContextFactory(ca))
    for domain, body in POLICIES.items():
        dns_server.set(f"_mta-sts.{domain}", [("TXT", "v=STSv1; id=20261123")])
        dns_server.set(f"mta-sts.{domain}", [("A", https_host)])
        https.set(f"mta-sts.{domain}", policy(body))
    await https.start(interface=https_host, port=443)
    bed = Bed(dns_server, https, https_host, ca.write_bundle(tmp_path), tmp_path)
    yield bed
    await https.stop()


@pytest_twisted.async_yield_fixture()
async def daemon(reactor: Any, testbed: Bed) -> AsyncIterator[tuple[Daemon, str]]:
    """The daemon on a free loopback port; yields it and the postmap map spec."""
    port = free_port()
    d = Daemon(testbed.config(f"tcp:{port}:interface=127.0.0.1"), testbed.tmp / "daemon.log")
    d.start()
    try:
        await d.wait_listening(reactor, "127.0.0.1", port)
        yield d, f"socketmap:inet:127.0.0.1:{port}:postfix"
    finally:
        d.kill()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("enforce.test", ENFORCE_REPLY),
        ("ENFORCE.test.", ENFORCE_REPLY),
        ("[enforce.test]", ENFORCE_REPLY),
        ("[enforce.test]:587", ENFORCE_REPLY),
        ("enforce.test:25", ENFORCE_REPLY),
        ("wild.test", "secure match=.wild.test servername=hostname"),
        ("testing.test", None),
        ("none.test", None),
        ("norecord.test", None),
        (".enforce.test", None),
        ("[192.0.2.1]", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_postmap_gets_the_policy_reply(
    reactor: Any, daemon: tuple[Daemon, str], key: str, expected: str | None
) -> None:
    """Postfix's own socketmap client gets the policy for enforce domains, else not found."""
    _, spec = daemon
    out, err, code = await postmap(reactor, key, spec)
    if expected is None:
        assert (out, code) == ("", 1), err  # postmap -q: exit 1 means "not found"
    else:
        assert (out, code) == (expected, 0), err


@pytest_twisted.ensureDeferred
async def test_policies_survive_sigkill_with_dns_and_https_gone(reactor: Any, testbed: Bed) -> None:
    """After kill -9, a restart with DNS and HTTPS unreachable still answers fetched policies."""
    port = free_port()
    config = testbed.config(f"tcp:{port}:interface=127.0.0.1")
    spec = f"socketmap:inet:127.0.0.1:{port}:postfix"
    first = Daemon(config, testbed.tmp / "first.log")
    first.start()
    try:
        await first.wait_listening(reactor, "127.0.0.1", port)
        assert (await postmap(reactor, "enforce.test", spec))[0] == ENFORCE_REPLY
        assert (await postmap(reactor, "wild.test", spec))[0].startswith("secure match=.wild")
    finally:
        first.kill()
    await testbed.https.stop()
    testbed.dns.blackhole.update(["_mta-sts.enforce.test", "_mta-sts.wild.test"])
    second = Daemon(config, testbed.tmp / "second.log")
    second.start()
    try:
        await second.wait_listening(reactor, "127.0.0.1", port)
        assert await postmap(reactor, "enforce.test", spec) == (ENFORCE_REPLY, "", 0)
        out, _, code = await postmap(reactor, "wild.test", spec)
        assert (out, code) == ("secure match=.wild.test servername=hostname", 0)
    finally:
        second.kill()
    assert "2 policies loaded" in second.output()


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_cleanly(reactor: Any, daemon: tuple[Daemon, str]) -> None:
    """SIGTERM ends the daemon with exit code 0, the store closed and no traceback."""
    d, spec = daemon
    assert (await postmap(reactor, "enforce.test", spec))[0] == ENFORCE_REPLY
    d.signal(signal.SIGTERM)
    assert await d.wait_exit(reactor) == 0
    log = d.output()
    assert "map stopped" in log
    assert "Traceback" not in log
    assert "policy fetched: id 20261123, mode enforce" in log


@pytest_twisted.ensureDeferred
async def test_unix_socket_with_mode(reactor: Any, testbed: Bed) -> None:
    """A unix: endpoint with a file mode serves postmap over the socket file."""
    path = testbed.tmp / "run" / "map.sock"
    path.parent.mkdir()
    d = Daemon(testbed.config(f"unix:{path}:mode=660"), testbed.tmp / "unix.log")
    d.start()
    try:
        await d.wait_until(reactor, path.exists)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        out, err, code = await postmap(reactor, "enforce.test", f"socketmap:unix:{path}:postfix")
        assert (out, code) == (ENFORCE_REPLY, 0), err
    finally:
        d.kill()


@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation(reactor: Any, testbed: Bed) -> None:
    """A systemd: endpoint serves on the socket passed in as LISTEN_FDS."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    os.set_inheritable(listener.fileno(), True)
    fd = listener.fileno()
    config = testbed.config("systemd:domain=INET:index=0")
    d = Daemon(
        config, testbed.tmp / "systemd.log", pass_fds=[fd], LISTEN_FDS="1", LISTEN_FDNAMES="map"
    )
    # systemd passes the socket as fd 3 and names the receiving pid: so does this wrapper.
    wrapper = (
        f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_PID'] = str(os.getpid());"
        " os.execv(sys.argv[1], sys.argv[1:])"
    )
    d.start(prefix=[sys.executable, "-c", wrapper])
    listener.close()
    try:
        spec = f"socketmap:inet:127.0.0.1:{port}:postfix"
        await d.wait_until(reactor, lambda: "policies loaded" in d.output())
        out, err, code = await postmap(reactor, "enforce.test", spec)
        assert (out, code) == (ENFORCE_REPLY, 0), err + d.output()
    finally:
        d.kill()


@pytest_twisted.ensureDeferred
async def test_systemd_endpoint_without_socket_is_one_line(reactor: Any, testbed: Bed) -> None:
    """A systemd: endpoint started without an inherited socket fails in one line, exit 1."""
    config = testbed.config("systemd:domain=INET:index=0")
    _out, err, code = await run(reactor, ["serve", "-c", str(config)])
    assert code == 1
    assert err.count("\n") == 1 and "systemd:domain=INET:index=0" in err, err


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_one_line(reactor: Any, testbed: Bed) -> None:
    """A listening port already taken stops serve with one line and exit code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = testbed.config(f"tcp:{port}:interface=127.0.0.1")
        _out, err, code = await run(reactor, ["serve", "-c", str(config)])
    assert code == 1
    assert "cannot start" in err and "Traceback" not in err, err


@pytest_twisted.ensureDeferred
async def test_query_prints_the_reply_and_json(reactor: Any, testbed: Bed) -> None:
    """query prints the exact reply; --json tells the policy, its source and expiry."""
    config = str(testbed.config("tcp:0:interface=127.0.0.1"))
    out, err, code = await run(reactor, ["query", "-c", config, "enforce.test"])
    assert (out, code) == (f"OK {ENFORCE_REPLY}\n", 0), err
    out, err, code = await run(reactor, ["query", "-c", config, "--json", "enforce.test"])
    assert code == 0, err
    answer = json.loads(out)
    assert answer["reply"] == f"OK {ENFORCE_REPLY}"
    assert answer["source"] == "store"  # the first query stored it
    assert answer["policy"]["mx"] == ["mail.enforce.test", "*.backup.test"]
    assert answer["policy"]["mode"] == "enforce"
    assert answer["expires_at"].endswith("Z")
    assert answer["last_failure"] is None
    out, err, code = await run(reactor, ["query", "-c", config, "norecord.test"])
    assert (out, code) == ("NOTFOUND \n", 0), err


@pytest_twisted.ensureDeferred
async def test_query_json_reports_the_last_failure(reactor: Any, testbed: Bed) -> None:
    """A failed fetch answers NOTFOUND and --json names its RFC 8460 type and detail."""
    testbed.https.set("mta-sts.enforce.test", Reply(status=404, body=b"gone\n"))
    config = str(testbed.config("tcp:0:interface=127.0.0.1"))
    out, err, code = await run(reactor, ["query", "-c", config, "--json", "enforce.test"])
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["reply"], answer["source"], answer["policy"]) == ("NOTFOUND ", "none", None)
    assert answer["last_failure"]["type"] == "sts-policy-fetch-error"
    assert answer["last_failure"]["detail"] == "HTTP 404"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nlisen = []\n", "[server] lisen"),
        ("[dns]\ntimeout = 'fast'\n", "[dns] timeout"),
        ("[server]\nlisten = ['bogus:1']\n", "[server] listen"),
        ("[zones.postfix]\nstrict = true\n", "strict"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_configuration_is_one_line_and_exit_2(
    reactor: Any, tmp_path: Path, text: str, named: str
) -> None:
    """A bad key stops serve with one line naming the file and the key, exit code 2."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out, err, code = await run(reactor, ["serve", "-c", str(path)])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and named in err


@pytest.mark.parametrize(
    "args", [[], ["frobnicate"], ["query"], ["serve", "--bogus"], ["query", "-c"]]
)
@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2_without_traceback(reactor: Any, args: list[str]) -> None:
    """Usage errors exit 2 with a short message and no traceback."""
    _out, err, code = await run(reactor, args)
    assert code == 2
    assert "Traceback" not in err and err.strip()


@pytest.mark.parametrize("content", [None, "no certificates here\n"])
@pytest_twisted.ensureDeferred
async def test_unusable_ca_file_names_the_key(
    reactor: Any, tmp_path: Path, content: str | None
) -> None:
    """A missing or certificate-less [https] ca_file is a configuration error naming the key."""
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    path = tmp_path / "c.toml"
    path.write_text(f'[https]\nca_file = "{bundle}"\n[store]\npath = "{tmp_path}/s.sqlite"\n')
    _out, err, code = await run(reactor, ["query", "-c", str(path), "example.com"])
    assert code == 2
    assert err.count("\n") == 1 and "[https] ca_file" in err and str(bundle) in err, err


@pytest_twisted.ensureDeferred
async def test_unusable_store_is_one_line_exit_1(reactor: Any, tmp_path: Path) -> None:
    """A store that cannot be created stops the program with one line and exit code 1."""
    (tmp_path / "file").write_text("x")
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\npath = "{tmp_path}/file/store.sqlite"\n')
    _out, err, code = await run(reactor, ["query", "-c", str(path), "example.com"])
    assert code == 1
    assert err.count("\n") == 1 and "cannot open the store" in err


@pytest_twisted.ensureDeferred
async def test_metrics_page(reactor: Any, testbed: Bed) -> None:
    """With [metrics] serve, a scrape shows the lookups postmap made: answers, cache hits and
    misses, fetches by outcome and failure type, latency, policies cached."""
    testbed.dns.set("_mta-sts.invalid.test", [("TXT", "v=STSv1; id=1")])
    testbed.dns.set("mta-sts.invalid.test", [("A", testbed.https_host)])
    testbed.https.set("mta-sts.invalid.test", policy(b"version: STSv1\nmode: sometimes\n"))
    port, metrics_port = free_port(), free_port()
    config = testbed.config(f"tcp:{port}:interface=127.0.0.1")
    with config.open("a") as f:
        f.write(f'[metrics]\nserve = "tcp:{metrics_port}"\n')
    d = Daemon(config, testbed.tmp / "daemon.log")
    d.start()
    try:
        await d.wait_listening(reactor, "127.0.0.1", port)
        spec = f"socketmap:inet:127.0.0.1:{port}:postfix"
        for key in ("enforce.test", "enforce.test", "[enforce.test]:25", "none.test",
                    "norecord.test", "invalid.test"):  # fmt: skip
            await postmap(reactor, key, spec)
        samples = await scrape(reactor, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        d.kill()
    m = "postfix_mtasts_"
    assert samples[(m + "lookups_total", "ok")] == 3
    assert samples[(m + "lookups_total", "notfound")] == 3
    assert samples[(m + "cache_hits_total", "")] == 2
    assert samples[(m + "cache_misses_total", "")] == 4
    assert samples[(m + "txt_lookups_total", "")] == 4
    assert samples[(m + "fetches_total", "ok")] == 2
    assert samples[(m + "fetches_total", "sts-policy-invalid")] == 1
    assert samples[(m + "policies_cached", "")] == 2
    assert samples[(m + "lookups_in_flight", "")] == 0
    assert samples[(m + "lookup_seconds_count", "")] == 6
    assert samples[(m + "lookup_seconds_bucket", "0.001")] >= 2  # the two cache hits
