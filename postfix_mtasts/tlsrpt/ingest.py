"""Log lines into the store: the tracker, the aggregator and the commit, per batch.

Each batch of lines the follower hands out is parsed, its sessions are attributed and
counted, and the counts are committed together with the follower's position and the
tracker's open sessions (pickled), in one SQLite transaction.  A restart, even after
``kill -9``, resumes at the last commit with the sessions that were open then: no line is
lost and none is counted twice.

Each commit also records how far in time the log has been read (:attr:`Ingest.read_through`),
so that a day's reports are built only once its lines are all counted (see there).
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from postfix_mtasts.config import TLSRPTConfig
from postfix_mtasts.store import Store, StoreError
from postfix_mtasts.tlsrpt.aggregate import Aggregator, count_row
from postfix_mtasts.tlsrpt.logparse import Session, SessionTracker
from postfix_mtasts.tlsrpt.tailer import Batches, LogFollower, Position, StreamFollower, follow

log = Logger()

READ_THROUGH = "log_read_through"
"""The ``meta`` key holding the latest :attr:`Ingest.read_through` any tailer committed."""


def log_read_through(store: Store) -> float | None:
    """The time up to which a tailer has read its log, as its last commit recorded (the
    furthest of them when several logs are followed into one store); ``None``: never."""
    value = store.meta(READ_THROUGH)
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


class Ingest:
    """Counts the sessions of one log ``source`` (a path, or ``"-"`` for standard input)."""

    def __init__(
        self,
        store: Store,
        config: TLSRPTConfig,
        source: str,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._source = source
        self._now = now
        position, state = store.log_position(source)
        self.position = Position.from_json(position) if position else None
        self.tracker = _restore(state) or SessionTracker(tz=config.log_tzinfo)
        self.tracker.report_sender = config.sender
        self._aggregator = Aggregator(store.events, now=now)
        self.sessions = 0
        self.results: Counter[str] = Counter()
        """Sessions committed since start, by result type (``success`` or a failure)."""
        self.read_through: float | None = None
        """The time up to which the log had been read at the last commit since start.

        Every line logged before it has been counted (or is held in the tracker's open
        sessions, committed with the counts): it is the latest of the stamp of the last line
        read (never beyond the clock), and the time when the follower last found nothing
        more to read (:meth:`caught_up`), so that a log idle after midnight is past the day
        too.  Lines that reach the log late by a few seconds are what the reports' grace
        after midnight is for (``outbox.BUILD_GRACE``).  Each commit also raises the
        store's :data:`READ_THROUGH` to it.
        """
        self._seen: float | None = None  # read_through once the next commit is done

    def handle(self, lines: list[bytes], position: Position | None) -> None:
        """Count the sessions ``lines`` complete and commit them with ``position``."""
        if lines:
            self._skip_report_mail()
            now = self._now()
            today = datetime.datetime.fromtimestamp(now, datetime.UTC)
            # One decode for the batch: "\n" never occurs inside a UTF-8 sequence, so each
            # line decodes as it would alone, bad bytes included.
            text = b"\n".join(lines).decode("utf-8", "replace").split("\n")
            self._add(self.tracker.feed_lines(text, today))
            for line in reversed(text[-8:]):  # the last line with a stamp
                if (t := self.tracker.line_time(line, today)) is not None:
                    self._reached(min(t, now))
                    break
        self._commit(position)

    def caught_up(self) -> None:
        """The follower has read all there is: the log is read through the present (unless
        it does not exist: then nothing is known)."""
        if self._source == "-" or os.path.exists(self._source):
            self._reached(self._now())

    def _reached(self, t: float) -> None:
        if self._seen is None or t > self._seen:
            self._seen = t

    def finish(self) -> None:
        """The input paused (the end of ``--once``, or a quiet spell while following): count
        the complete sessions held back, and commit; sessions still waiting for their
        delivery line stay open for more input."""
        self._add(self.tracker.release())
        self._commit(self.position)

    def _skip_report_mail(self) -> None:
        """Tell the tracker the queue ids of the report mail recorded since the last look
        (reference/tlsrpt.md §6): the sessions that carry it are not counted, even when its
        qmgr ``from=`` line is missing."""
        tracker = self.tracker
        ids, tracker.skip_mark = self._store.report_mail_ids(tracker.skip_mark)
        tracker.skip_queue_ids.update(ids)

    def _add(self, sessions: list[Session]) -> None:
        add = self._aggregator.add
        for session in sessions:
            add(session)
        self.sessions += len(sessions)

    def _commit(self, position: Position | None) -> None:
        if position is not None:
            self.position = position
        taken = self._aggregator.take()
        counts = {count_row(k): n for k, n in taken.items()}
        state = pickle.dumps(self.tracker, protocol=pickle.HIGHEST_PROTOCOL)
        where = None if self.position is None else self.position.to_json()
        try:
            self._store.commit_counts(self._source, where, counts, self._now(), state)
        except BaseException:
            # Not committed: the counts wait for the next commit (the tracker has already
            # let their sessions go).
            self._aggregator.counts.update(taken)
            raise
        for key, n in taken.items():
            self.results[key.result] += n
        seen = self._seen
        if seen is not None and seen != self.read_through:
            stored = log_read_through(self._store)
            if stored is None or stored < seen:
                self._store.set_meta(READ_THROUGH, repr(seen))
            self.read_through = seen


RELEASE_INTERVAL = 30.0
"""Seconds between commits of held-back sessions while a log is followed."""


async def follow_into(
    reactor: IReactorTime,
    follower: LogFollower | StreamFollower,
    ingest: Ingest,
    handle: Callable[[list[bytes], Position | None], object] | None = None,
    *,
    release_interval: float = RELEASE_INTERVAL,
    stop: Deferred[object] | None = None,
    caught_up: Callable[[], object] | None = None,
) -> None:
    """Follow a log into the store until ``stop`` fires (or a stream ends).

    ``handle`` (default: ``ingest.handle``) gets each batch.  Every ``release_interval``
    seconds the sessions held back for a Postfix 3.10 ``TLSRPT:`` line are counted, so that a
    quiet log does not keep its last deliveries uncounted; a store error then is logged, and
    the counts wait for the next commit.  Each time the follower has read all there is,
    :meth:`Ingest.caught_up` is told, then ``caught_up`` is called (the ``tail`` service
    starts its report schedule then: after the backlog).
    """

    def release_held() -> None:
        try:
            ingest.finish()
        except StoreError as e:  # the counts wait for the next commit
            log.error("cannot commit the held sessions: {error}", error=str(e))

    release = LoopingCall(release_held)
    release.clock = reactor
    release.start(release_interval, now=False)
    try:
        marked = _Marked(follower, ingest, caught_up)
        await follow(reactor, marked, handle or ingest.handle, stop=stop)
    finally:
        release.stop()


class _Marked:
    """``follower``, telling ``ingest`` (and ``then``) when it has read all there is."""

    def __init__(
        self,
        follower: LogFollower | StreamFollower,
        ingest: Ingest,
        then: Callable[[], object] | None,
    ) -> None:
        self._follower = follower
        self._ingest = ingest
        self._then = then

    @property
    def finished(self) -> bool:
        return self._follower.finished

    def read_available(self) -> Batches[Position | None]:
        yield from self._follower.read_available()
        self._ingest.caught_up()  # not reached when the reading was stopped
        if self._then is not None:
            self._then()


def _restore(state: bytes | None) -> SessionTracker | None:
    if not state:
        return None
    try:
        tracker = pickle.loads(state)  # noqa: S301 (our own store, written by this class)
    except Exception as e:  # noqa: BLE001 (e.g. saved by another version)
        log.warn("starting without the saved open sessions: {error}", error=str(e))
        return None
    return tracker if isinstance(tracker, SessionTracker) else None
