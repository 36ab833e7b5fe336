"""The resolver's cache rules, driven by a Clock with scripted DNS and HTTPS answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from postfix_mtasts.mtasts.dns import DNSFailure
from postfix_mtasts.mtasts.fetch import STS_FETCH_ERROR, STS_POLICY_INVALID, FetchError
from postfix_mtasts.mtasts.policy import NOTFOUND, ReplyOptions
from postfix_mtasts.mtasts.resolver import (
    BACKOFF,
    GRACE,
    NEGATIVE_TTL,
    Answer,
    Entry,
    PolicyResolver,
)
from postfix_mtasts.store import Store, StoredPolicy

ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"
ENFORCE_REPLY = b"OK secure match=mx1.example.com:.example.net servername=hostname"
TESTING = ENFORCE.replace(b"enforce", b"testing")
NONE = b"version: STSv1\nmode: none\nmax_age: 86400\n"


def framed(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class ScriptedDNS:
    """TXT answers by name: a list of records, an exception, or a Deferred the test fires."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {}
        self.queries: list[str] = []

    def txt(self, name: str) -> Deferred[list[bytes]]:
        self.queries.append(name)
        answer = self.answers.get(name, [])
        if len(name) > 253:  # as DNSClient, which cannot put such a name in a query
            answer = ValueError(f"bad DNS name {name!r}: too long")
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            d: Deferred[list[bytes]] = Deferred()
            d.errback(answer)
            return d
        return succeed(list(answer))  # type: ignore[call-overload]


class ScriptedFetcher:
    """Policy bodies by domain: bytes, a FetchError, or a Deferred the test fires."""

    def __init__(self) -> None:
        self.bodies: dict[str, object] = {}
        self.fetched: list[str] = []

    def fetch(self, domain: str) -> Deferred[bytes]:
        self.fetched.append(domain)
        body = self.bodies[domain]
        if isinstance(body, Deferred):
            return body
        if isinstance(body, Exception):
            d: Deferred[bytes] = Deferred()
            d.errback(body)
            return d
        return succeed(body)  # type: ignore[arg-type]


class World:
    """A resolver over a fresh store with scripted DNS and HTTPS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.dns = ScriptedDNS()
        self.fetcher = ScriptedFetcher()
        self.store = Store(path / "store.sqlite")
        self.resolver = self.new_resolver()

    def new_resolver(self, **kwargs: object) -> PolicyResolver:
        zones = {"postfix": ReplyOptions(), "strict": ReplyOptions(strict_testing=True)}
        return PolicyResolver(
            self.clock,
            self.dns,
            self.fetcher,
            self.store,
            zones=zones,
            **kwargs,  # type: ignore[arg-type]
        )

    def publish(self, domain: str, txt_id: str, body: object) -> None:
        self.dns.answers[f"_mta-sts.{domain}"] = [b"v=STSv1; id=" + txt_id.encode()]
        self.fetcher.bodies[domain] = body

    def ask(self, key: bytes, name: bytes = b"postfix") -> bytes:
        """The reply to one lookup, which must be complete once scripted answers have fired."""
        result = self.resolver.lookup(name, key)
        if isinstance(result, bytes):
            return result
        out: list[bytes] = []
        result.addCallback(out.append)
        assert out, "the lookup is still waiting"
        return out[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def test_miss_fetches_then_hits_from_memory(world: World) -> None:
    """A first lookup discovers and fetches the policy; the next is answered from memory."""
    world.publish("example.com", "a1", ENFORCE)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    hit = world.resolver.lookup(b"postfix", b"Example.COM.")
    assert hit == framed(ENFORCE_REPLY)
    assert world.dns.queries == ["_mta-sts.example.com"]
    assert world.fetcher.fetched == ["example.com"]


def test_miss_reads_the_store_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup of a domain held nowhere reads the store once, not again to resolve it."""
    world.publish("example.com", "a1", ENFORCE)
    reads: list[str] = []
    get_policy = world.store.get_policy

    def counting(domain: str) -> StoredPolicy | None:
        reads.append(domain)
        return get_policy(domain)

    monkeypatch.setattr(world.store, "get_policy", counting)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    assert reads == ["example.com"]


def test_herd_of_lookups_shares_one_query_and_one_fetch(world: World) -> None:
    """500 simultaneous lookups of an uncached domain cause one TXT query and one fetch."""
    pending: Deferred[list[bytes]] = Deferred()
    world.dns.answers["_mta-sts.example.com"] = pending
    world.fetcher.bodies["example.com"] = ENFORCE
    waiting = [world.resolver.lookup(b"postfix", b"example.com") for _ in range(500)]
    replies: list[bytes] = []
    for d in waiting:
        assert isinstance(d, Deferred)
        d.addCallback(replies.append)
    pending.callback([b"v=STSv1; id=1"])
    assert replies == [framed(ENFORCE_REPLY)] * 500
    assert len(world.dns.queries) == 1
    assert world.fetcher.fetched == ["example.com"]


def test_unchanged_id_means_no_fetch(world: World) -> None:
    """After the grace period a hit re-checks the record in the background; same id, no fetch."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE + 1)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    assert len(world.dns.queries) == 2
    assert world.fetcher.fetched == ["example.com"]


def test_hits_within_grace_start_no_check(world: World) -> None:
    """Hits inside the grace period cause no DNS traffic at all."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE - 1)
    for _ in range(10):
        world.ask(b"example.com")
    assert len(world.dns.queries) == 1


def test_changed_id_fetches_the_new_policy(world: World) -> None:
    """A new id in the record makes the background check fetch and replace the policy."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE + 1)
    world.publish("example.com", "a2", ENFORCE.replace(b"mx1.example.com", b"mx9.example.com"))
    world.ask(b"example.com")  # served from memory; starts the check
    assert world.ask(b"example.com") == framed(
        b"OK secure match=mx9.example.com:.example.net servername=hostname"
    )
    assert world.fetcher.fetched == ["example.com", "example.com"]


def test_failed_fetch_keeps_valid_policy_and_records_failure(world: World) -> None:
    """A failing fetch for a new id keeps serving the held policy and records the failure."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE + 1)
    world.publish("example.com", "a2", FetchError(STS_FETCH_ERROR, "HTTP 404"))
    world.ask(b"example.com")
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    failure = world.store.last_failure("example.com")
    assert failure is not None
    assert (failure.failure_type, failure.detail, failure.txt_id) == (
        STS_FETCH_ERROR,
        "HTTP 404",
        "a2",
    )


@pytest.mark.parametrize(
    "answer",
    [[], [b"v=STSv1; id=x", b"v=STSv1; id=y"], [b"v=STSv1; id="], DNSFailure("SERVFAIL")],
    ids=["vanished", "two records", "invalid", "servfail"],
)
def test_record_trouble_never_evicts_a_valid_policy(world: World, answer: object) -> None:
    """A vanished, doubled or invalid record or a DNS failure keeps the policy until expiry."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.dns.answers["_mta-sts.example.com"] = answer
    world.clock.advance(GRACE + 1)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    world.clock.advance(86400 - GRACE - 2)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    world.clock.advance(2)
    assert world.ask(b"example.com") == NOTFOUND


def test_unchanged_id_does_not_extend_the_lifetime(world: World) -> None:
    """Expiry is the last successful fetch plus max_age, however often the id is confirmed."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"3600"))
    world.ask(b"example.com")
    for _ in range(50):
        world.clock.advance(GRACE + 1)
        world.ask(b"example.com")
    assert world.fetcher.fetched == ["example.com"]
    world.clock.advance(3600 - 50 * (GRACE + 1))
    # Expired: the next lookup checks the record (same id) and must fetch again.
    world.ask(b"example.com")
    assert world.fetcher.fetched == ["example.com", "example.com"]


def test_no_record_is_remembered_for_a_while(world: World) -> None:
    """A domain without a record answers NOTFOUND from the negative cache, then is re-checked."""
    assert world.ask(b"plain.example") == NOTFOUND
    world.clock.advance(NEGATIVE_TTL - 1)
    assert world.ask(b"plain.example") == NOTFOUND
    assert len(world.dns.queries) == 1
    world.clock.advance(2)
    world.ask(b"plain.example")
    assert len(world.dns.queries) == 2


def test_backoff_window(world: World) -> None:
    """Inside the back-off window the same id is not refetched; a new id is."""
    world.publish("example.com", "a1", FetchError(STS_FETCH_ERROR, "connection refused"))
    assert world.ask(b"example.com") == NOTFOUND
    world.clock.advance(BACKOFF / 2)
    assert world.ask(b"example.com") == NOTFOUND
    assert world.fetcher.fetched == ["example.com"]
    world.publish("example.com", "a2", ENFORCE)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    assert world.fetcher.fetched == ["example.com", "example.com"]


def test_max_age_zero_answers_only_the_fetching_lookup(world: World) -> None:
    """A max_age 0 policy answers only its own lookup, then NOTFOUND until the back-off ends."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"0"))
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    world.clock.advance(1)
    assert world.ask(b"example.com") == NOTFOUND
    assert world.fetcher.fetched == ["example.com"]
    world.clock.advance(BACKOFF)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    assert world.fetcher.fetched == ["example.com", "example.com"]


def test_invalid_policy_is_no_policy_and_is_recorded(world: World) -> None:
    """A body that fails validation answers NOTFOUND and records sts-policy-invalid."""
    world.publish("example.com", "a1", b"version: STSv1\nmode: Enforce\nmax_age: 60\nmx: a.b\n")
    assert world.ask(b"example.com") == NOTFOUND
    failure = world.store.last_failure("example.com")
    assert failure is not None and failure.failure_type == STS_POLICY_INVALID


def test_testing_answers_notfound_unless_zone_is_strict(world: World) -> None:
    """A testing policy is NOTFOUND in the default zone and enforced in a strict_testing zone."""
    world.publish("example.com", "a1", TESTING)
    assert world.ask(b"example.com") == NOTFOUND
    assert world.ask(b"example.com", b"strict") == framed(ENFORCE_REPLY)
    assert world.ask(b"example.com", b"unknown-zone") == NOTFOUND


def test_mode_none_replaces_enforce(world: World) -> None:
    """A new policy in mode none replaces an enforce policy and answers NOTFOUND."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE + 1)
    world.publish("example.com", "a2", NONE)
    world.ask(b"example.com")
    assert world.ask(b"example.com") == NOTFOUND
    assert world.fetcher.fetched == ["example.com", "example.com"]


def test_policies_survive_a_restart_without_network(world: World) -> None:
    """A new resolver over the same store answers held policies with DNS and HTTPS gone."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.dns.answers["_mta-sts.example.com"] = DNSFailure("timeout")
    world.fetcher.bodies.clear()
    world.resolver = world.new_resolver()
    assert world.resolver.load() == 1
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)


def test_entry_pushed_out_of_memory_is_read_from_the_store(world: World) -> None:
    """With room for one entry in memory, the other domain is answered from the store."""
    world.resolver = world.new_resolver(max_entries=1)
    world.publish("a.example", "1", ENFORCE)
    world.publish("b.example", "1", ENFORCE)
    world.ask(b"a.example")
    world.ask(b"b.example")
    assert world.ask(b"a.example") == framed(ENFORCE_REPLY)
    assert world.fetcher.fetched == ["a.example", "b.example"]


def test_store_unreadable_and_nothing_cached_answers_temp(world: World) -> None:
    """If the store cannot be read and memory has nothing, the answer is TEMP, not NOTFOUND."""
    world.store._db.close()
    reply = world.ask(b"example.com")
    assert reply.split(b":", 1)[1].startswith(b"TEMP ")


def test_refresh_refetches_even_when_the_record_is_gone(world: World) -> None:
    """The refresh timer re-fetches a policy at half its max_age whatever the TXT record says."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"7200"))
    world.ask(b"example.com")
    world.dns.answers["_mta-sts.example.com"] = []
    world.clock.advance(3600)
    world.resolver.refresh_due()
    assert world.fetcher.fetched == ["example.com", "example.com"]
    stored = world.store.get_policy("example.com")
    assert stored is not None and stored.expires_at == world.clock.seconds() + 7200


def test_failed_refresh_moves_the_next_attempt(world: World) -> None:
    """A failed refresh is retried after the back-off, and the held policy stays served."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"7200"))
    world.ask(b"example.com")
    world.fetcher.bodies["example.com"] = FetchError(STS_FETCH_ERROR, "HTTP 500")
    world.clock.advance(3600)
    world.resolver.refresh_due()
    assert world.store.due_for_refresh(world.clock.seconds(), 10) == []
    world.clock.advance(BACKOFF)
    assert world.store.due_for_refresh(world.clock.seconds(), 10) == ["example.com"]
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)


@pytest.mark.parametrize("key", [b"", b".example.com", b"[192.0.2.1]", b"192.0.2.1", b"\xff"])
def test_keys_without_policy_cause_no_lookup(world: World, key: bytes) -> None:
    """Empty, parent-probe, IP-literal and undecodable keys answer NOTFOUND with no query."""
    assert world.ask(key) == NOTFOUND
    assert world.dns.queries == []


def test_smart_host_key_resolves_the_host(world: World) -> None:
    """A bracketed key with a port looks up the host's own policy."""
    world.publish("mx.example.com", "1", ENFORCE)
    assert world.ask(b"[mx.example.com]:587") == framed(ENFORCE_REPLY)
    assert world.dns.queries == ["_mta-sts.mx.example.com"]


def test_domain_too_long_for_its_record_name_has_no_policy(world: World) -> None:
    """A domain whose _mta-sts name exceeds 255 octets answers NOTFOUND, negatively cached."""
    label = "a" * 63
    domain = ".".join([label, label, label, "b" * 51, "com"])  # 247 octets, legal by itself
    assert world.ask(domain.encode()) == NOTFOUND
    assert world.ask(domain.encode()) == NOTFOUND
    assert world.resolver.stats["negative_hits"] == 1
    answers: list[Answer] = []
    Deferred.fromCoroutine(world.resolver.query(domain)).addCallback(answers.append)
    assert answers == [Answer(domain, NOTFOUND, "none", None)]  # what `query` prints
    assert world.dns.queries == []


@pytest.mark.parametrize("max_age", [1, 120, 299])
def test_short_max_age_is_refetched_not_backed_off(world: World, max_age: int) -> None:
    """A policy with max_age under the back-off period is refetched on time, with no warning."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"%d" % max_age))
    with capturedLogs() as events:
        for _ in range(40):  # 20 minutes of lookups and refresh ticks
            assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
            world.clock.advance(30)
            world.resolver.refresh_due()
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []


def test_refresh_inside_a_backoff_waits_without_counting_a_failure(world: World) -> None:
    """A refresh due while a failed fetch's back-off runs is moved to its end, not failed."""
    world.publish("example.com", "a1", ENFORCE.replace(b"86400", b"7200"))
    world.ask(b"example.com")
    world.clock.advance(3600)  # due for refresh
    world.publish("example.com", "a2", FetchError(STS_FETCH_ERROR, "HTTP 500"))
    world.ask(b"example.com")  # the hit's background check fails to fetch id a2
    with capturedLogs() as events:
        world.resolver.refresh_due()
    assert [formatEvent(e) for e in events if "refresh" in formatEvent(e)] == []
    assert world.fetcher.fetched == ["example.com", "example.com"]
    now = world.clock.seconds()
    assert world.store.due_for_refresh(now + BACKOFF - 1, 10) == []
    world.publish("example.com", "a2", ENFORCE)
    world.clock.advance(BACKOFF)
    world.resolver.refresh_due()
    stored = world.store.get_policy("example.com")
    assert stored is not None and (stored.txt_id, stored.fetched_at) == ("a2", now + BACKOFF)


def test_refresh_joining_a_record_check_in_flight_still_refetches(world: World) -> None:
    """A refresh asked while a plain record check is in flight makes that lookup re-fetch."""
    world.publish("example.com", "a1", ENFORCE)
    world.ask(b"example.com")
    world.clock.advance(GRACE + 1)
    pending: Deferred[list[bytes]] = Deferred()
    world.dns.answers["_mta-sts.example.com"] = pending
    world.ask(b"example.com")  # a hit: starts a background check of the record
    refreshed: list[Entry | None] = []
    world.resolver.resolve("example.com", refresh=True).addCallback(refreshed.append)
    pending.callback([b"v=STSv1; id=a1"])  # unchanged id: the check alone would not fetch
    assert world.fetcher.fetched == ["example.com", "example.com"]
    assert len(world.dns.queries) == 2
    [entry] = refreshed
    assert entry is not None and entry.fetched_at == world.clock.seconds()


def test_refresh_starts_each_domain_once_and_stop_drops_the_queue(world: World) -> None:
    """A due domain queued or refreshing is not started again; stop() drops those queued."""
    world.resolver = world.new_resolver(refresh_concurrency=1)
    body = ENFORCE.replace(b"86400", b"7200")
    slow: dict[str, Deferred[bytes]] = {}
    for domain in ("a.example", "b.example"):
        world.publish(domain, "1", body)
        world.ask(domain.encode())
        slow[domain] = world.fetcher.bodies[domain] = Deferred()
    world.clock.advance(3600)
    world.resolver.refresh_due()  # one runs, the other waits for the slot
    world.clock.advance(30)
    world.resolver.refresh_due()  # the next tick starts neither again
    [running] = world.fetcher.fetched[2:]
    world.resolver.stop()
    slow[running].callback(body)
    assert world.fetcher.fetched[2:] == [running]
    stored = world.store.get_policy(running)
    assert stored is not None and stored.fetched_at == world.clock.seconds()


@pytest.mark.parametrize("step", [-86400.0, 86400.0])
def test_a_wall_clock_step_neither_revives_nor_ends_a_policy(tmp_path: Path, step: float) -> None:
    """Entries expire by the monotonic clock: after a step of the wall clock, an expired policy
    stays expired and an unexpired one stays held (reference/mta-sts.md §5)."""
    world = World(tmp_path)
    monotonic = Clock()
    world.resolver = world.new_resolver(monotonic=monotonic.seconds)
    short = ENFORCE.replace(b"max_age: 86400", b"max_age: 600")
    world.publish("example.com", "a1", short)
    world.publish("example.org", "b1", ENFORCE)
    assert world.ask(b"example.com") == framed(ENFORCE_REPLY)
    assert world.ask(b"example.org") == framed(ENFORCE_REPLY)
    world.fetcher.bodies["example.com"] = FetchError(STS_FETCH_ERROR, "HTTP 500")
    world.fetcher.bodies["example.org"] = FetchError(STS_FETCH_ERROR, "HTTP 500")
    monotonic.advance(700)  # example.com expired; the wall clock steps instead of moving on
    world.clock.advance(step if step > 0 else 0)
    world.clock.rightNow += min(step, 0)
    assert world.ask(b"example.com") == NOTFOUND
    assert world.ask(b"example.org") == framed(ENFORCE_REPLY)
    world.store.close()
