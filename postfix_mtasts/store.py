"""The SQLite store both jobs share, and every query they make of it.

One file in WAL mode.  The policy map writes the policy it holds for each domain (so that a
restart, even after ``kill -9``, opens no downgrade window) and an event for every policy it
fetched and every fetch failure it met; the reporter reads those events to say which policy
applied to a session and to report the ``sts-policy-*`` failures that Postfix never logs.

The store is synchronous: each call is a few indexed statements on a local file, run on the
reactor thread.  Writes happen per fetch, never per cache hit.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postfix_mtasts.mtasts.policy import Policy

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The policy currently held for each domain: what the map serves while it is unexpired.
CREATE TABLE IF NOT EXISTS policies (
    domain     TEXT PRIMARY KEY,
    txt_id     TEXT NOT NULL,
    mode       TEXT NOT NULL,
    max_age    INTEGER NOT NULL,
    mx         TEXT NOT NULL,      -- validated patterns, one per line
    lines      TEXT NOT NULL,      -- the policy's received lines, one per line
    fetched_at REAL NOT NULL,      -- Unix time of the last successful fetch
    expires_at REAL NOT NULL,      -- fetched_at + max_age
    refresh_at REAL NOT NULL       -- when the refresh timer re-fetches it
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS policies_refresh ON policies (refresh_at);
-- History for the reporter: every policy fetched and every failure met, per domain and time.
CREATE TABLE IF NOT EXISTS policy_events (
    id           INTEGER PRIMARY KEY,
    domain       TEXT NOT NULL,
    at           REAL NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('policy', 'failure')),
    txt_id       TEXT,
    mode         TEXT,
    max_age      INTEGER,
    mx           TEXT,
    lines        TEXT,
    expires_at   REAL,
    failure_type TEXT,
    detail       TEXT
);
CREATE INDEX IF NOT EXISTS policy_events_domain_at ON policy_events (domain, at);
-- The reporter's read position in each log it follows, committed with the counts it produced.
CREATE TABLE IF NOT EXISTS log_positions (
    source     TEXT PRIMARY KEY,
    position   TEXT,              -- JSON, see postfix_mtasts.tlsrpt.tailer.Position
    state      BLOB,              -- the session tracker's open sessions at that position
    updated_at REAL NOT NULL
);
-- TLS sessions counted per UTC day, policy, result and place; "" where a part is absent.
CREATE TABLE IF NOT EXISTS session_counts (
    day           TEXT NOT NULL,  -- YYYY-MM-DD
    policy_domain TEXT NOT NULL,
    policy_type   TEXT NOT NULL,  -- sts | tlsa | no-policy-found
    policy_string TEXT NOT NULL,  -- the policy's lines, one per line
    mx_patterns   TEXT NOT NULL,  -- the policy's mx patterns, one per line
    result        TEXT NOT NULL,  -- success or an RFC 8460 result type
    mx_host       TEXT NOT NULL,
    mx_ip         TEXT NOT NULL,
    reason        TEXT NOT NULL,
    sessions      INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_patterns, result,
                 mx_host, mx_ip, reason)
) WITHOUT ROWID;
-- One report per UTC day and policy domain; its token makes the report-id, which stays the
-- same when the day's report is built again.
CREATE TABLE IF NOT EXISTS reports (
    day           TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    token         TEXT NOT NULL,
    created_at    REAL NOT NULL,
    PRIMARY KEY (day, policy_domain)
) WITHOUT ROWID;
-- Reports queued for delivery: the bytes sent, kept until every destination is done.
CREATE TABLE IF NOT EXISTS outbox_reports (
    day           TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    report_id     TEXT NOT NULL,
    filename      TEXT NOT NULL,
    summary       TEXT NOT NULL,  -- the text part of report mail
    gz            BLOB,           -- NULL once no destination waits for it
    queued_at     REAL NOT NULL,
    PRIMARY KEY (day, policy_domain)
) WITHOUT ROWID;
-- One row per report and destination: a rua URI, or "" for looking up the _smtp._tls record
-- ('resolved' once found).  Retried with back-off until delivered, refused or 24 hours old
-- (RFC 8460 §5.5); 'dropped' when another destination took the report, or none exists.
CREATE TABLE IF NOT EXISTS outbox (
    day           TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    destination   TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN
                  ('pending', 'resolved', 'sent', 'failed', 'expired', 'dropped')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    first_at      REAL,           -- the first attempt
    next_at       REAL NOT NULL,  -- when a pending row is due
    last_error    TEXT NOT NULL DEFAULT '',
    queue_id      TEXT NOT NULL DEFAULT '',
    done_at       REAL,
    PRIMARY KEY (day, policy_domain, destination)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
-- Queue ids of report mail handed to the local MTA: the tailer skips their sessions, so a
-- report's own delivery is never counted in the next report (reference/tlsrpt.md §6).
CREATE TABLE IF NOT EXISTS report_mail (
    id       INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL,
    at       REAL NOT NULL
);
"""

CountRow = tuple[str, str, str, str, str, str, str, str, str]
"""(day, policy_domain, policy_type, policy_string, mx_patterns, result, mx_host, mx_ip, reason)"""


_EVENTS = (
    "SELECT domain, at, kind, txt_id, mode, max_age, mx, lines, expires_at, failure_type,"
    " detail FROM policy_events "
)
_SPAN = """
SELECT * FROM (
    SELECT domain, at, kind, txt_id, mode, max_age, mx, lines, expires_at, failure_type, detail, id
    FROM policy_events WHERE domain = ? AND at < ? ORDER BY at DESC, id DESC LIMIT 1)
UNION
SELECT * FROM (
    SELECT domain, at, kind, txt_id, mode, max_age, mx, lines, expires_at, failure_type, detail, id
    FROM policy_events WHERE domain = ? AND at < ? AND kind = 'policy'
    ORDER BY at DESC, id DESC LIMIT 1)
UNION ALL
SELECT domain, at, kind, txt_id, mode, max_age, mx, lines, expires_at, failure_type, detail, id
FROM policy_events WHERE domain = ? AND at >= ? AND at < ?
ORDER BY at, id
"""
"""Store.events in one query: the last event and the last policy before the span (the same
one, or a failure after the policy the map still held), then the events in the span."""


@dataclass(frozen=True, slots=True)
class QueuedReport:
    """One report to deliver, as the outbox keeps it."""

    day: str
    policy_domain: str
    report_id: str
    filename: str
    summary: str
    gz: bytes


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One report and destination in the outbox."""

    day: str
    policy_domain: str
    destination: str
    state: str
    attempts: int
    first_at: float | None
    next_at: float
    last_error: str
    queue_id: str
    done_at: float | None


_OUTBOX = (
    "SELECT day, policy_domain, destination, state, attempts, first_at, next_at, last_error,"
    " queue_id, done_at FROM outbox "
)


class StoreError(Exception):
    """The store cannot be opened, read or written; ``str()`` says why, in one line."""


@dataclass(slots=True)
class StoredPolicy:
    """One row of ``policies``: a validated policy and its lifetime."""

    domain: str
    txt_id: str
    policy: Policy
    fetched_at: float
    expires_at: float
    refresh_at: float


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """One row of ``policy_events``: a policy fetched (``kind == "policy"``) or a failure."""

    domain: str
    at: float
    kind: str
    txt_id: str | None
    policy: Policy | None
    expires_at: float | None
    failure_type: str | None
    detail: str | None


def _join(items: tuple[str, ...]) -> str:
    return "\n".join(items)


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split("\n")) if text else ()


def _policy(mode: str, max_age: int, mx: str, lines: str) -> Policy:
    return Policy(mode=mode, mx=_split(mx), max_age=max_age, lines=_split(lines))


class Store:
    """The SQLite file at ``path``, created with its parent directory when missing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Committed transactions survive a killed process in WAL mode; NORMAL only risks
            # the last commits on a power failure, and saves an fsync per fetch.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the store {self.path}: {e}") from e

    def close(self) -> None:
        """Checkpoint the write-ahead log and close the file."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    # -- the policy map's side ---------------------------------------------------------------

    def get_policy(self, domain: str) -> StoredPolicy | None:
        """The policy held for ``domain``, expired or not, or None."""
        rows = self._read(
            "SELECT domain, txt_id, mode, max_age, mx, lines, fetched_at, expires_at,"
            " refresh_at FROM policies WHERE domain = ?",
            (domain,),
        )
        return self._row(rows[0]) if rows else None

    def load_policies(self, now: float, limit: int | None = None) -> Iterator[StoredPolicy]:
        """Every policy unexpired at ``now``, read as iterated; when there are more than
        ``limit``, the ``limit`` most recently fetched, newest first.

        Lines and patterns that many policies share (``version: STSv1``, ``mode: enforce``,
        a provider's ``mx``) are interned, so a hundred thousand policies cost little more
        memory than their distinct text.
        """
        sql = (
            "SELECT domain, txt_id, mode, max_age, mx, lines, fetched_at, expires_at, refresh_at"
            " FROM policies WHERE expires_at > ?"
        )
        params: tuple[float, ...] = (now,)
        try:
            if limit is not None:
                (count,) = self._db.execute(
                    "SELECT count(*) FROM policies WHERE expires_at > ?", params
                ).fetchone()
                if count > limit:  # sorting them all costs a quarter of the read: only if needed
                    sql += " ORDER BY fetched_at DESC LIMIT ?"
                    params = (now, limit)
            for row in self._db.execute(sql, params):
                yield self._row(row, intern=True)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the store: {e}") from e

    def due_for_refresh(self, now: float, limit: int) -> list[str]:
        """Domains whose policy is still unexpired and due for a proactive refresh."""
        rows = self._read(
            "SELECT domain FROM policies WHERE refresh_at <= ? AND expires_at > ?"
            " ORDER BY refresh_at LIMIT ?",
            (now, now, limit),
        )
        return [domain for (domain,) in rows]

    def save_policy(self, stored: StoredPolicy) -> None:
        """Hold ``stored`` for its domain and add a ``policy`` event, in one transaction."""
        p = stored.policy
        mx, lines = _join(p.mx), _join(p.lines)
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT OR REPLACE INTO policies (domain, txt_id, mode, max_age, mx, lines,"
                    " fetched_at, expires_at, refresh_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        stored.domain,
                        stored.txt_id,
                        p.mode,
                        p.max_age,
                        mx,
                        lines,
                        stored.fetched_at,
                        stored.expires_at,
                        stored.refresh_at,
                    ),
                )
                self._db.execute(
                    "INSERT INTO policy_events (domain, at, kind, txt_id, mode, max_age, mx,"
                    " lines, expires_at) VALUES (?, ?, 'policy', ?, ?, ?, ?, ?, ?)",
                    (
                        stored.domain,
                        stored.fetched_at,
                        stored.txt_id,
                        p.mode,
                        p.max_age,
                        mx,
                        lines,
                        stored.expires_at,
                    ),
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    def set_refresh_at(self, domain: str, refresh_at: float) -> None:
        """Move the next proactive refresh of ``domain`` (after a failed refresh)."""
        try:
            self._db.execute(
                "UPDATE policies SET refresh_at = ? WHERE domain = ?", (refresh_at, domain)
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    def record_failure(
        self, domain: str, at: float, failure_type: str, detail: str, txt_id: str | None
    ) -> None:
        """Add a ``failure`` event: an RFC 8460 ``sts-policy-*`` type and a short detail."""
        try:
            self._db.execute(
                "INSERT INTO policy_events (domain, at, kind, txt_id, failure_type, detail)"
                " VALUES (?, ?, 'failure', ?, ?, ?)",
                (domain, at, txt_id, failure_type, detail),
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    def last_failure(self, domain: str) -> PolicyEvent | None:
        """The latest failure event of ``domain``, if any."""
        events = self._events(
            "WHERE domain = ? AND kind = 'failure' ORDER BY at DESC, id DESC LIMIT 1", (domain,)
        )
        return events[0] if events else None

    # -- the reporter's side -----------------------------------------------------------------

    def events(self, domain: str, start: float, end: float) -> list[PolicyEvent]:
        """The events of ``domain`` up to ``end``, in order, from the last one before ``start``
        (and the last policy before ``start``, when a failure came after it).

        The first events tell what applied at ``start``; the others, what changed and when.
        """
        params = (domain, start, domain, start, domain, start, end)
        return self._event_rows(self._read(_SPAN, params))

    def prune_events(self, before: float) -> int:
        """Forget events older than ``before``, keeping each domain's latest event and latest
        policy (what :meth:`events` needs); returns the count forgotten."""
        try:
            with self._transaction():
                cur = self._db.execute(
                    "DELETE FROM policy_events WHERE at < ? AND id NOT IN"
                    " (SELECT max(id) FROM policy_events GROUP BY domain"
                    " UNION SELECT max(id) FROM policy_events WHERE kind = 'policy'"
                    " GROUP BY domain)",
                    (before,),
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e
        return cur.rowcount

    def log_position(self, source: str) -> tuple[str | None, bytes | None]:
        """The position and tracker state last committed for the log ``source``."""
        rows = self._read("SELECT position, state FROM log_positions WHERE source = ?", (source,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def commit_counts(
        self,
        source: str,
        position: str | None,
        counts: Mapping[CountRow, int],
        now: float,
        state: bytes | None = None,
    ) -> None:
        """Add ``counts`` and move ``source``'s position and state, in one transaction.

        A crash before the commit loses all three, so the lines are read again; after it,
        none is repeated: no session is lost or counted twice.
        """
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO session_counts (day, policy_domain, policy_type, policy_string,"
                    " mx_patterns, result, mx_host, mx_ip, reason, sessions)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                    " SET sessions = sessions + excluded.sessions",
                    [(*key, n) for key, n in counts.items()],
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO log_positions (source, position, state, updated_at)"
                    " VALUES (?, ?, ?, ?)",
                    (source, position, state, now),
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    def day_counts(self, day: str) -> list[tuple[CountRow, int]]:
        """Every counter of the UTC day ``day`` (YYYY-MM-DD)."""
        rows = self._read(
            "SELECT day, policy_domain, policy_type, policy_string, mx_patterns, result,"
            " mx_host, mx_ip, reason, sessions FROM session_counts WHERE day = ?"
            " ORDER BY policy_domain",
            (day,),
        )
        return [(tuple(row[:9]), int(row[9])) for row in rows]

    def report_token(self, day: str, policy_domain: str, new_token: str, now: float) -> str:
        """The token of the report of ``day`` and ``policy_domain``, made from ``new_token``
        the first time it is asked for."""
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT OR IGNORE INTO reports (day, policy_domain, token, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (day, policy_domain, new_token, now),
                )
                row = self._db.execute(
                    "SELECT token FROM reports WHERE day = ? AND policy_domain = ?",
                    (day, policy_domain),
                ).fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e
        return str(row[0])

    def meta(self, key: str) -> str | None:
        """A value kept in ``meta``, ``None`` when unset."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` in ``meta``."""
        try:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    # -- the outbox -----------------------------------------------------------------------

    def queue_report(self, report: QueuedReport, due: float, now: float) -> bool:
        """Queue ``report``, its destinations to be looked up at ``due``; ``False`` (and
        nothing changed) when that day's report for that domain was queued before."""
        try:
            with self._transaction():
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO outbox_reports (day, policy_domain, report_id,"
                    " filename, summary, gz, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        report.day,
                        report.policy_domain,
                        report.report_id,
                        report.filename,
                        report.summary,
                        report.gz,
                        now,
                    ),
                )
                if cur.rowcount == 0:
                    return False
                self._db.execute(
                    "INSERT INTO outbox (day, policy_domain, destination, state, next_at)"
                    " VALUES (?, ?, '', 'pending', ?)",
                    (report.day, report.policy_domain, due),
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e
        return True

    def queued_report(self, day: str, policy_domain: str) -> QueuedReport | None:
        """The queued report of ``day`` and ``policy_domain``, while a destination waits."""
        rows = self._read(
            "SELECT day, policy_domain, report_id, filename, summary, gz FROM outbox_reports"
            " WHERE day = ? AND policy_domain = ? AND gz IS NOT NULL",
            (day, policy_domain),
        )
        return QueuedReport(*rows[0]) if rows else None

    def outbox_due(self, now: float, limit: int = 1000) -> list[OutboxRow]:
        """Pending rows due at ``now``, the longest waiting first."""
        rows = self._read(
            _OUTBOX + "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
            (now, limit),
        )
        return [OutboxRow(*row) for row in rows]

    def outbox_next(self) -> float | None:
        """When the next pending row is due, ``None`` when none is pending."""
        rows = self._read("SELECT min(next_at) FROM outbox WHERE state = 'pending'")
        return None if rows[0][0] is None else float(rows[0][0])

    def outbox(self, day: str | None = None, policy_domain: str | None = None) -> list[OutboxRow]:
        """The outbox rows (of ``day``, and ``policy_domain``, when given), in key order."""
        params: tuple[str, ...] = ()
        if day is None:
            where = ""
        elif policy_domain is None:
            where, params = "WHERE day = ? ", (day,)
        else:
            where, params = "WHERE day = ? AND policy_domain = ? ", (day, policy_domain)
        rows = self._read(_OUTBOX + where + "ORDER BY day, policy_domain, destination", params)
        return [OutboxRow(*row) for row in rows]

    def claim_outbox(self, row: OutboxRow, until: float) -> bool:
        """Take the pending ``row`` for an attempt by moving its due time to ``until``, so that
        no other process tries it meanwhile; ``False`` when it has changed since it was read."""
        try:
            cur = self._db.execute(
                "UPDATE outbox SET next_at = ? WHERE day = ? AND policy_domain = ?"
                " AND destination = ? AND state = 'pending' AND next_at = ?",
                (until, row.day, row.policy_domain, row.destination, row.next_at),
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e
        return cur.rowcount == 1

    def update_outbox(self, row: OutboxRow, destinations: tuple[str, ...] = ()) -> None:
        """Save ``row`` (found by its day, domain and destination); add pending rows due at
        ``row.next_at`` for ``destinations``; record a queue id of report mail; drop the
        report's bytes once nothing waits for them."""
        key = (row.day, row.policy_domain)
        try:
            with self._transaction():
                self._db.execute(
                    "UPDATE outbox SET state = ?, attempts = ?, first_at = ?, next_at = ?,"
                    " last_error = ?, queue_id = ?, done_at = ?"
                    " WHERE day = ? AND policy_domain = ? AND destination = ?",
                    (
                        row.state,
                        row.attempts,
                        row.first_at,
                        row.next_at,
                        row.last_error,
                        row.queue_id,
                        row.done_at,
                        *key,
                        row.destination,
                    ),
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox (day, policy_domain, destination, state,"
                    " next_at) VALUES (?, ?, ?, 'pending', ?)",
                    [(*key, d, row.next_at) for d in destinations],
                )
                if row.queue_id:
                    self._db.execute(
                        "INSERT INTO report_mail (queue_id, at) VALUES (?, ?)",
                        (row.queue_id, row.done_at or row.next_at),
                    )
                self._db.execute(
                    "UPDATE outbox_reports SET gz = NULL WHERE day = ? AND policy_domain = ?"
                    " AND NOT EXISTS (SELECT 1 FROM outbox WHERE day = ? AND policy_domain = ?"
                    " AND state = 'pending')",
                    (*key, *key),
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e

    def prune_reporting(self, before_day: str, before: float) -> int:
        """Forget counts, report ids and finished outbox rows of days before ``before_day``,
        and report mail queue ids recorded before ``before``; returns the rows deleted."""
        deleted = 0
        try:
            with self._transaction():
                for sql, param in (
                    ("DELETE FROM session_counts WHERE day < ?", before_day),
                    ("DELETE FROM reports WHERE day < ?", before_day),
                    ("DELETE FROM outbox WHERE day < ? AND state != 'pending'", before_day),
                    (
                        "DELETE FROM outbox_reports WHERE day < ? AND NOT EXISTS (SELECT 1"
                        " FROM outbox o WHERE o.day = outbox_reports.day"
                        " AND o.policy_domain = outbox_reports.policy_domain)",
                        before_day,
                    ),
                    ("DELETE FROM report_mail WHERE at < ?", before),
                ):
                    deleted += self._db.execute(sql, (param,)).rowcount
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store: {e}") from e
        return deleted

    def report_mail_ids(self, after: int = 0) -> tuple[list[str], int]:
        """Queue ids of report mail recorded after row ``after``, and the last row's number."""
        rows = self._read("SELECT id, queue_id FROM report_mail WHERE id > ? ORDER BY id", (after,))
        return [qid for _, qid in rows], (rows[-1][0] if rows else after)

    # -- helpers ---------------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the store: {e}") from e

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _events(self, where: str, params: tuple[object, ...]) -> list[PolicyEvent]:
        # ``where`` is always one of this module's constant clauses.
        return self._event_rows(self._read(_EVENTS + where, params))

    @staticmethod
    def _event_rows(rows: list[Any]) -> list[PolicyEvent]:
        events = []
        for row in rows:
            domain, at, kind, txt_id, mode, max_age, mx, lines, expires_at, ftype, detail = row[:11]
            policy = _policy(mode, max_age, mx, lines) if kind == "policy" else None
            events.append(PolicyEvent(domain, at, kind, txt_id, policy, expires_at, ftype, detail))
        return events

    @staticmethod
    def _row(row: tuple[object, ...], intern: bool = False) -> StoredPolicy:
        domain, txt_id, mode, max_age, mx, lines, fetched_at, expires_at, refresh_at = row
        policy = _policy(str(mode), int(max_age), str(mx), str(lines))  # type: ignore[call-overload]
        if intern:
            policy = Policy(
                sys.intern(policy.mode),
                tuple(sys.intern(p) for p in policy.mx),
                policy.max_age,
                tuple(sys.intern(line) for line in policy.lines),
            )
        return StoredPolicy(
            domain=str(domain),
            txt_id=str(txt_id),
            policy=policy,
            fetched_at=float(fetched_at),  # type: ignore[arg-type]
            expires_at=float(expires_at),  # type: ignore[arg-type]
            refresh_at=float(refresh_at),  # type: ignore[arg-type]
        )


class _Transaction:
    """``with`` block around BEGIN IMMEDIATE ... COMMIT, rolled back on an exception.

    SQLite may have rolled back already (a full disk, an I/O error): then there is nothing to
    roll back, and the error that did it is the one raised.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")
