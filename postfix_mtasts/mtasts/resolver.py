"""From a socketmap key to a policy: the cache, discovery, fetching and refreshing.

Three layers answer a lookup, cheapest first:

1. memory: an LRU of :class:`Entry`, each holding its ready-made reply bytes per zone; a hit
   costs a dictionary lookup and never waits on the network;
2. the store: every policy the map holds, read on a memory miss, so a restart (or an entry
   pushed out of memory) opens no downgrade window;
3. the network: the ``_mta-sts`` TXT record, then the policy over HTTPS when the record's id
   changed or nothing valid is held.  One lookup per domain is in flight however many
   requests wait on it.

Rules (see ``reference/mta-sts.md`` §5): a policy expires ``max_age`` after its last
successful fetch; an unchanged id means no fetch; no failure ever evicts a valid policy; a hit
whose last TXT check is older than :data:`GRACE` starts a background check; a timer re-fetches
every held policy a day after its fetch, or at half its ``max_age`` if sooner; domains without
a policy are remembered for :data:`NEGATIVE_TTL`; a failed fetch is not retried for the same id
within :data:`BACKOFF`.

Times kept in memory (when an entry expires, its last TXT check, negative answers, back-off)
run on a monotonic clock, so that a step of the wall clock can neither revive an expired
policy nor end one early; what goes to the store (fetch, expiry and refresh times) is UTC.
"""

from __future__ import annotations

import datetime
import gc
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cachetools import LRUCache, TLRUCache
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from postfix_mtasts.mtasts.dns import DNSFailure
from postfix_mtasts.mtasts.fetch import STS_POLICY_INVALID, FetchError
from postfix_mtasts.mtasts.policy import (
    NOTFOUND,
    InvalidRecord,
    NoRecord,
    Policy,
    PolicyError,
    ReplyOptions,
    normalise_key,
    parse_policy,
    parse_sts_records,
    policy_reply,
    temp_reply,
)
from postfix_mtasts.store import Store, StoredPolicy, StoreError

GRACE = 60.0
"""Seconds after a TXT check during which hits start no new check."""
NEGATIVE_TTL = 300.0
"""Seconds a domain without a usable record is answered ``NOTFOUND`` without a new lookup."""
DNS_FAILURE_TTL = 60.0
"""The same for a domain whose lookup failed (SERVFAIL, timeout) with nothing held."""
BACKOFF = 300.0
"""Seconds before a failed fetch is retried for the same id (RFC 8461 §3.3)."""
REFRESH_INTERVAL = 86400.0
"""A held policy is re-fetched this long after its last fetch, or at half its max_age."""
REFRESH_BATCH = 256
"""Policies started per refresh tick."""
MAX_DNS_NAME = 253
"""Octets of the longest DNS name in text form (255 on the wire); a domain longer than 244
octets thus has no ``_mta-sts`` record."""


class TXTLookup(Protocol):
    """What the resolver needs of the DNS client."""

    def txt(self, name: str) -> Awaitable[list[bytes]]: ...


class PolicyFetch(Protocol):
    """What the resolver needs of the HTTPS fetcher."""

    def fetch(self, domain: str) -> Awaitable[bytes]: ...


@dataclass(slots=True, eq=False)
class Entry:
    """A validated policy held for a domain, with its replies ready per zone."""

    domain: str
    txt_id: str
    policy: Policy
    fetched_at: float  # UTC
    expires_at: float  # UTC, for the store and people
    checked_at: float  # monotonic: the last TXT check
    deadline: float  # monotonic: when it expires
    replies: dict[ReplyOptions, bytes] | None = None  # made on the first hit

    def reply(self, options: ReplyOptions) -> bytes:
        """The framed socketmap reply for a zone with ``options``, built once."""
        replies = self.replies
        if replies is None:
            replies = self.replies = {}
        reply = replies.get(options)
        if reply is None:
            reply = replies[options] = policy_reply(self.domain, self.policy, options)
        return reply

    @classmethod
    def from_stored(cls, stored: StoredPolicy, now: float, monotonic: float) -> Entry:
        """The entry of ``stored``, read at UTC time ``now`` and monotonic time ``monotonic``."""
        # checked_at long ago: the first hit after a load starts a TXT check.
        return cls(
            stored.domain,
            stored.txt_id,
            stored.policy,
            stored.fetched_at,
            stored.expires_at,
            monotonic - GRACE - 1.0,
            monotonic + (stored.expires_at - now),
        )


@dataclass(slots=True, eq=False)
class _Flight:
    """A lookup in flight for a domain: who waits for it, and whether it must re-fetch."""

    waiters: list[Deferred[Entry | None]]
    # Read once the record is known: a refresh joining later finds the lookup fetching.
    refresh: bool


@dataclass(frozen=True, slots=True)
class Answer:
    """What ``postfix-mtasts query`` reports: the reply and where its policy came from."""

    domain: str | None
    reply: bytes
    source: str  # "cache", "store", "fetched" or "none"
    entry: Entry | None


class PolicyResolver:
    """Answers socketmap lookups with MTA-STS policies; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        dns: TXTLookup,
        fetcher: PolicyFetch,
        store: Store,
        *,
        zones: Mapping[str, ReplyOptions] | None = None,
        max_entries: int = 200_000,
        max_negative: int = 100_000,
        max_fetches: int = 64,
        refresh_concurrency: int = 8,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock
        # The daemon passes time.monotonic; tests drive both clocks with one Clock.
        self._monotonic = monotonic or clock.seconds
        self._dns = dns
        self._fetcher = fetcher
        self._store = store
        zones = dict(zones or {})
        self._default = zones.get("postfix", ReplyOptions())
        self._zones = {name.encode(): options for name, options in zones.items()}
        self._memory: LRUCache[str, Entry] = LRUCache(maxsize=max_entries)
        # Values are the time each item stops counting.
        self._negative: TLRUCache[str, float] = TLRUCache(
            maxsize=max_negative, ttu=_until, timer=self._monotonic
        )
        self._backoff: TLRUCache[str, tuple[str, float]] = TLRUCache(
            maxsize=max_negative, ttu=_until_pair, timer=self._monotonic
        )
        self._inflight: dict[str, _Flight] = {}
        self._fetch_slots = DeferredSemaphore(max_fetches)
        self._refresh_slots = DeferredSemaphore(refresh_concurrency)
        self._refresh_failures: dict[str, int] = {}
        self._refreshing: set[str] = set()  # queued or running
        self._stopped = False
        self._rng = rng or random.Random()
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "hits",
                "misses",
                "negative_hits",
                "txt_lookups",
                "fetches",  # started
                "fetches_ok",  # a policy parsed and held
                "fetch_failures",
            ),
            0,
        )
        self.failure_types: Counter[str] = Counter()
        """Failed fetches by RFC 8460 result type."""

    # -- the socketmap entry point -----------------------------------------------------------

    def lookup(self, name: bytes, key: bytes) -> bytes | Deferred[bytes]:
        """Answer one socketmap request: reply bytes now, or a Deferred that fires with them."""
        options = self._zones.get(name, self._default)
        domain = normalise_key(key)
        if domain is None:
            return NOTFOUND
        now = self._monotonic()
        entry = self._memory.get(domain)
        if entry is not None and now < entry.deadline:
            self.stats["hits"] += 1
            if now - entry.checked_at > GRACE:
                self._check_in_background(entry, now)
            return entry.reply(options)
        if domain in self._negative:
            self.stats["negative_hits"] += 1
            return NOTFOUND
        if entry is None:  # an entry expired in memory is not revived from the store
            try:
                entry = self._from_store(domain)
            except StoreError as e:
                self.log.error("{domain}: {error}; answering TEMP", domain=domain, error=str(e))
                return temp_reply("policy store unavailable")
            if entry is not None:
                self.stats["hits"] += 1
                self._check_in_background(entry, now)
                return entry.reply(options)
        self.stats["misses"] += 1
        return self.resolve(domain, read_store=False).addCallback(_reply_for, options)

    @property
    def cached(self) -> int:
        """Policies held in memory."""
        return len(self._memory)

    def load(self) -> int:
        """Fill memory from the store, most recently fetched first; returns the count."""
        count = 0
        now, monotonic = self._clock.seconds(), self._monotonic()
        # The cyclic garbage collector is off meanwhile: the entries are long-lived and make
        # no cycles, and collecting while they are made walks them again and again (a
        # quarter of the time it takes to load 100,000).
        collecting = gc.isenabled()
        gc.disable()
        try:
            for stored in self._store.load_policies(now, int(self._memory.maxsize)):
                self._memory[stored.domain] = Entry.from_stored(stored, now, monotonic)
                count += 1
        finally:
            if collecting:
                gc.enable()
        return count

    async def query(self, key: str, zone: str = "postfix") -> Answer:
        """Resolve ``key`` as a lookup of the map would, and wait for its TXT check."""
        options = self._zones.get(zone.encode(), self._default)
        domain = normalise_key(key.encode("utf-8", "surrogateescape"))
        if domain is None:
            return Answer(None, NOTFOUND, "none", None)
        entry = self._memory.get(domain)
        source = "cache"
        if entry is None:
            entry, source = self._from_store(domain), "store"
        elif self._monotonic() >= entry.deadline:
            entry = None
        if entry is not None:
            # Answered at once, as the map does; the check then updates the store.
            reply = entry.reply(options)
            await self.resolve(domain)
            return Answer(domain, reply, source, entry)
        entry = await self.resolve(domain)
        if entry is None:
            return Answer(domain, NOTFOUND, "none", None)
        return Answer(domain, entry.reply(options), "fetched", entry)

    # -- resolving -----------------------------------------------------------------------

    def resolve(
        self, domain: str, *, refresh: bool = False, read_store: bool = True
    ) -> Deferred[Entry | None]:
        """Check ``domain``'s record and fetch its policy if needed; one at a time per domain.

        Fires with the entry to apply (possibly the one already held) or None.  ``refresh``
        re-fetches the policy whatever the record says (RFC 8461 §10.2), also when it joins a
        lookup already in flight.  ``read_store=False`` says the caller has just found no
        valid policy for ``domain`` in the store, so a domain not in memory is not looked up
        there again.
        """
        waiter: Deferred[Entry | None] = Deferred()
        flight = self._inflight.get(domain)
        if flight is not None:
            flight.waiters.append(waiter)
            flight.refresh |= refresh  # a plain check in flight now re-fetches too
            return waiter
        flight = self._inflight[domain] = _Flight([waiter], refresh)

        def done(result: Entry | Failure | None) -> None:
            del self._inflight[domain]
            for w in flight.waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        Deferred.fromCoroutine(self._update(domain, flight, read_store)).addBoth(done)
        return waiter

    def _from_store(self, domain: str) -> Entry | None:
        stored = self._store.get_policy(domain)
        now = self._clock.seconds()
        if stored is None or now >= stored.expires_at:
            return None
        entry = self._memory[domain] = Entry.from_stored(stored, now, self._monotonic())
        return entry

    def _check_in_background(self, entry: Entry, now: float) -> None:
        entry.checked_at = now
        self.resolve(entry.domain).addErrback(self._unexpected, entry.domain)

    def _unexpected(self, failure: Failure, domain: str) -> None:
        self.log.failure("unexpected error while resolving {domain}", failure, domain=domain)

    async def _update(self, domain: str, flight: _Flight, read_store: bool) -> Entry | None:
        held = self._memory.get(domain)
        if held is None and read_store:
            try:
                stored = self._store.get_policy(domain)
            except StoreError as e:
                self.log.error("{domain}: {error}", domain=domain, error=str(e))
                stored = None
            if stored is not None:
                held = Entry.from_stored(stored, self._clock.seconds(), self._monotonic())
        valid = held if held is not None and self._monotonic() < held.deadline else None

        txt_id: str | None = None
        problem = ""
        name = "_mta-sts." + domain
        try:
            if len(name) > MAX_DNS_NAME:  # a valid domain, but no room for its record
                raise NoRecord(name)
            self.stats["txt_lookups"] += 1
            txt_id = parse_sts_records(await self._dns.txt(name))
        except DNSFailure as e:
            problem = f"DNS lookup of {name} failed: {e}"
        except NoRecord:
            problem = "no _mta-sts record"
        except InvalidRecord as e:
            problem = f"invalid _mta-sts record: {e}"
        now = self._monotonic()
        refresh = flight.refresh

        if txt_id is None:
            if valid is None:
                if problem != "no _mta-sts record":  # the common case says nothing
                    self.log.info("{domain}: {problem}", domain=domain, problem=problem)
                ttl = DNS_FAILURE_TTL if problem.startswith("DNS") else NEGATIVE_TTL
                self._negative[domain] = now + ttl
                return None
            valid.checked_at = now
            if valid.policy.mode != "none":
                self.log.warn(
                    "{domain}: {problem}; keeping the policy with id {id} until {expires}",
                    domain=domain,
                    problem=problem,
                    id=valid.txt_id,
                    expires=iso_utc(valid.expires_at),
                )
            if not refresh:
                return valid
            txt_id = valid.txt_id
        elif valid is not None and valid.txt_id == txt_id and not refresh:
            valid.checked_at = now
            return valid

        backoff = self._backoff.get(domain)
        if backoff is not None and backoff[0] == txt_id:
            if valid is not None:
                valid.checked_at = now
            return valid
        return await self._fetch_slots.run(self._fetch, domain, txt_id, valid)

    async def _fetch(self, domain: str, txt_id: str, valid: Entry | None) -> Entry | None:
        self.stats["fetches"] += 1
        try:
            body = await self._fetcher.fetch(domain)
            policy = parse_policy(body)
        except FetchError as e:
            return self._fetch_failed(domain, txt_id, valid, e.failure_type, e.detail)
        except PolicyError as e:
            return self._fetch_failed(domain, txt_id, valid, STS_POLICY_INVALID, str(e))
        now, monotonic = self._clock.seconds(), self._monotonic()
        refresh_in = min(REFRESH_INTERVAL, policy.max_age / 2) * self._rng.uniform(0.9, 1.0)
        expires_at = now + policy.max_age
        stored = StoredPolicy(domain, txt_id, policy, now, expires_at, now + max(refresh_in, GRACE))
        entry = Entry(
            domain, txt_id, policy, now, expires_at, monotonic, monotonic + policy.max_age
        )
        if policy.max_age == 0:
            # Held by no cache: refetched at most once per back-off period (mta-sts.md §5).
            self._backoff[domain] = (txt_id, monotonic + BACKOFF)
        else:
            self._backoff.pop(domain, None)
        self._negative.pop(domain, None)
        self._memory[domain] = entry
        self.stats["fetches_ok"] += 1
        try:
            self._store.save_policy(stored)
        except StoreError as e:
            self.log.error("{domain}: {error}", domain=domain, error=str(e))
        if valid is None:
            what = "fetched"
        elif valid.policy == policy and valid.txt_id == txt_id:
            what = "refreshed"
        else:
            what = "changed"
        self.log.info(
            "{domain}: policy {what}: id {id}, mode {mode}, max_age {max_age}, mx {mx}",
            domain=domain,
            what=what,
            id=txt_id,
            mode=policy.mode,
            max_age=policy.max_age,
            mx=",".join(policy.mx),
        )
        return entry

    def _fetch_failed(
        self, domain: str, txt_id: str, valid: Entry | None, failure_type: str, detail: str
    ) -> Entry | None:
        now, monotonic = self._clock.seconds(), self._monotonic()
        self.stats["fetch_failures"] += 1
        self.failure_types[failure_type] += 1
        self._backoff[domain] = (txt_id, monotonic + BACKOFF)
        try:
            self._store.record_failure(domain, now, failure_type, detail, txt_id)
        except StoreError as e:
            self.log.error("{domain}: {error}", domain=domain, error=str(e))
        if valid is not None:
            valid.checked_at = monotonic
            until = iso_utc(valid.expires_at)
            keeping = f"; keeping the policy with id {valid.txt_id} until {until}"
        else:
            keeping = ""
        self.log.warn(
            "{domain}: policy fetch failed ({type}): {detail}{keeping}",
            domain=domain,
            type=failure_type,
            detail=detail,
            keeping=keeping,
        )
        return valid

    # -- proactive refresh ---------------------------------------------------------------

    def refresh_due(self) -> None:
        """Start refreshing the held policies that are due, and return without waiting.

        Called by a timer (see :mod:`postfix_mtasts.service`), which thus never waits on the
        network, nor does stopping it.  At most :data:`REFRESH_BATCH` domains are queued or
        running, each once.  A failed refresh moves the next attempt :data:`BACKOFF` later
        and warns, louder when failures repeat; a refresh due inside a failed fetch's
        back-off waits for its end, which is no failure.
        """
        room = REFRESH_BATCH - len(self._refreshing)
        if self._stopped or room <= 0:
            return
        now = self._clock.seconds()
        try:
            due = self._store.due_for_refresh(now, REFRESH_BATCH)
        except StoreError as e:
            self.log.error("refresh: {error}", error=str(e))
            return
        for domain in [d for d in due if d not in self._refreshing][:room]:
            self._refreshing.add(domain)
            run = self._refresh_slots.run(self._refresh_one, domain, now)
            run.addBoth(self._refreshed, domain)

    def stop(self) -> None:
        """Start no more refreshes: those queued are dropped, those running finish on their own."""
        self._stopped = True

    def _refreshed(self, result: Failure | None, domain: str) -> None:
        self._refreshing.discard(domain)
        if isinstance(result, Failure):
            self._unexpected(result, domain)

    async def _refresh_one(self, domain: str, started: float) -> None:
        if self._stopped:
            return
        backoff = self._backoff.get(domain)
        if backoff is not None:
            # A fetch failed a moment ago (and said so): refresh when its back-off ends.
            self._refresh_at(domain, self._clock.seconds() + backoff[1] - self._monotonic())
            return
        entry = await self.resolve(domain, refresh=True)
        if entry is not None and entry.fetched_at >= started:
            self._refresh_failures.pop(domain, None)
            return
        self._refresh_at(domain, self._clock.seconds() + BACKOFF)
        failures = self._refresh_failures[domain] = self._refresh_failures.get(domain, 0) + 1
        if entry is not None and entry.policy.mode == "none":
            return
        emit = self.log.error if failures >= 3 else self.log.warn
        emit(
            "{domain}: policy refresh failed {count} time(s) in a row{expiry}",
            domain=domain,
            count=failures,
            expiry=f"; the policy expires at {iso_utc(entry.expires_at)}" if entry else "",
        )

    def _refresh_at(self, domain: str, when: float) -> None:
        try:
            self._store.set_refresh_at(domain, when)
        except StoreError as e:
            self.log.error("{domain}: {error}", domain=domain, error=str(e))


def _reply_for(entry: Entry | None, options: ReplyOptions) -> bytes:
    return NOTFOUND if entry is None else entry.reply(options)


def _until(_key: str, until: float, _now: float) -> float:
    return until


def _until_pair(_key: str, value: tuple[str, float], _now: float) -> float:
    return value[1]


def iso_utc(timestamp: float) -> str:
    """``timestamp`` as an RFC 3339 UTC date-time, to the second."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
