"""`postfix-mtasts tail` on real files: counts survive restarts and kill -9 exactly."""

from __future__ import annotations

import datetime
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from postfix_mtasts.config import TLSRPTConfig
from postfix_mtasts.store import OutboxRow, Store, StoreError
from postfix_mtasts.tlsrpt.ingest import RELEASE_INTERVAL, Ingest, follow_into, log_read_through
from postfix_mtasts.tlsrpt.tailer import LogFollower
from tests.daemon import require_root

TLS = (
    "2026-11-22T{t} mail postfix/smtp[{pid}]: {trust} TLS connection established to"
    " mx{n}.d{d}.example[192.0.2.{n}]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
)
SENT = (
    "2026-11-22T{t} mail postfix/smtp[{pid}]: {qid}: to=<u@d{d}.example>,"
    " relay=mx{n}.d{d}.example[192.0.2.{n}]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0,"
    " status=sent (250 2.0.0 Ok)"
)
NOISE = (
    "2026-11-22T{t} mail postfix/qmgr[77]: {qid}: from=<s@example.org>, size=1234, nrcpt=1"
    " (queue active)"
)


def write_log(path: Path, sessions: int, seed: int = 1) -> None:
    """A log of interleaved deliveries: two processes alternate, with qmgr noise between."""
    rng = random.Random(seed)
    lines = []
    for i in range(sessions):
        t = f"{10 + i // 36000 % 10:02d}:{i // 600 % 60:02d}:{i // 10 % 60:02d}+00:00"
        pid, d, n = 1000 + i % 7, rng.randrange(20), rng.randrange(1, 5)
        trust = rng.choice(["Verified", "Trusted", "Untrusted"])
        qid = f"{i:010X}"
        lines.append(TLS.format(t=t, pid=pid, trust=trust, n=n, d=d))
        lines.append(NOISE.format(t=t, qid=qid))
        lines.append(SENT.format(t=t, pid=pid, qid=qid, n=n, d=d))
    path.write_text("\n".join(lines) + "\n")


def config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[server]\nallow_root = true\n[store]\npath = "{tmp_path / name}.sqlite"\n')
    return path


def tail(cfg: Path, *args: str, stdin: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postfix_mtasts.cli", "tail", "-c", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=stdin,
    )


def counts(tmp_path: Path, name: str) -> dict[tuple[str, ...], int]:
    store = Store(tmp_path / f"{name}.sqlite")
    try:
        return dict(store.day_counts("2026-11-22"))
    finally:
        store.close()


def test_tail_once_counts_every_session(tmp_path: Path) -> None:
    """Every delivery session of the log is counted once, under no-policy-found."""
    log = tmp_path / "mail.log"
    write_log(log, 500)
    result = tail(config(tmp_path, "a"), "--once", str(log))
    assert result.returncode == 0, result.stderr
    assert "read 1500 lines" in result.stderr
    assert sum(counts(tmp_path, "a").values()) == 500


def test_appended_lines_are_counted_once(tmp_path: Path) -> None:
    """Reading a growing log in three runs counts the same as reading it whole once."""
    whole = tmp_path / "whole.log"
    write_log(whole, 900)
    lines = whole.read_text().splitlines(keepends=True)
    growing = tmp_path / "mail.log"
    cfg = config(tmp_path, "parts")
    for part in (lines[:1000], lines[1000:1001], lines[1001:]):
        with growing.open("a") as f:
            f.writelines(part)
        assert tail(cfg, "--once", str(growing)).returncode == 0
    assert tail(config(tmp_path, "whole"), "--once", str(whole)).returncode == 0
    assert counts(tmp_path, "parts") == counts(tmp_path, "whole")
    assert sum(counts(tmp_path, "whole").values()) == 900


def test_sigkill_in_the_middle_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Killed with SIGKILL while reading, then restarted, the counts equal an uninterrupted run."""
    log = tmp_path / "mail.log"
    write_log(log, 60000)
    cfg = config(tmp_path, "killed")
    kills = 0
    for delay in (0.8, 1.0, 1.2):
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "postfix_mtasts.cli",
                "tail",
                "-c",
                str(cfg),
                "--once",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(30)
    assert kills, "the run finished before it could be killed: make the log longer"
    assert tail(cfg, "--once", str(log)).returncode == 0
    assert tail(config(tmp_path, "whole"), "--once", str(log)).returncode == 0
    assert counts(tmp_path, "killed") == counts(tmp_path, "whole")
    assert sum(counts(tmp_path, "whole").values()) == 60000


def test_standard_input(tmp_path: Path) -> None:
    """`tail -` reads the log from standard input."""
    log = tmp_path / "mail.log"
    write_log(log, 50)
    with log.open("rb") as stdin:
        result = tail(config(tmp_path, "stdin"), "--once", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert sum(counts(tmp_path, "stdin").values()) == 50


def test_following_a_quiet_log_counts_the_last_delivery(tmp_path: Path) -> None:
    """While following, a delivery held back for a TLSRPT: line is counted once the log is quiet."""
    log = tmp_path / "mail.log"
    write_log(log, 1)
    store = Store(tmp_path / "s.sqlite")
    ingest = Ingest(store, TLSRPTConfig(), str(log))
    follower = LogFollower(str(log))
    clock = Clock()
    stop: Deferred[object] = Deferred()
    done = ensureDeferred(follow_into(clock, follower, ingest, stop=stop))
    clock.advance(1.0)
    assert follower.lines_read == 3
    assert store.day_counts("2026-11-22") == []  # held: a TLSRPT: line may still follow
    clock.advance(RELEASE_INTERVAL)
    assert sum(n for _, n in store.day_counts("2026-11-22")) == 1
    stop.callback(None)
    clock.advance(1.0)
    assert done.called
    follower.close()
    store.close()


class BusyStore(Store):
    """A store whose next ``busy`` commits of counts fail as a locked database does."""

    busy = 0

    def commit_counts(self, *args: Any, **kwargs: Any) -> None:
        if self.busy:
            self.busy -= 1
            raise StoreError("cannot write the store: database is locked")
        super().commit_counts(*args, **kwargs)


def test_failed_commit_keeps_its_counts(tmp_path: Path) -> None:
    """Sessions whose commit failed are committed with the next one, not lost."""
    store = BusyStore(tmp_path / "s.sqlite")
    ingest = Ingest(store, TLSRPTConfig(), "mail.log")
    ingest.handle(report_mail_log({"0000000AAA": 1}), None)  # held for a TLSRPT: line
    store.busy = 1
    with pytest.raises(StoreError):
        ingest.finish()
    ingest.handle(report_mail_log({"0000000BBB": 2}), None)
    ingest.finish()
    assert domains_counted(store) == {"d1.example", "d2.example"}
    assert ingest.results == {"success": 2}
    store.close()


def test_release_goes_on_after_a_failed_commit(tmp_path: Path) -> None:
    """While following, a failed commit of the held sessions is logged, and the next release
    commits them."""
    log = tmp_path / "mail.log"
    write_log(log, 1)
    store = BusyStore(tmp_path / "s.sqlite")
    ingest = Ingest(store, TLSRPTConfig(), str(log))
    follower = LogFollower(str(log))
    clock = Clock()
    stop: Deferred[object] = Deferred()
    done = ensureDeferred(follow_into(clock, follower, ingest, stop=stop))
    clock.advance(1.0)
    store.busy = 1
    clock.advance(RELEASE_INTERVAL)
    assert store.day_counts("2026-11-22") == []
    clock.advance(RELEASE_INTERVAL)
    assert sum(n for _, n in store.day_counts("2026-11-22")) == 1
    stop.callback(None)
    clock.advance(1.0)
    assert done.called
    follower.close()
    store.close()


def at(text: str) -> float:
    """The Unix time of a time of day on 2026-11-22, UTC."""
    return datetime.datetime.fromisoformat(f"2026-11-22T{text}+00:00").timestamp()


@pytest.mark.parametrize(
    ("lines", "now", "expected"),
    [
        ([NOISE.format(t="12:00:01+00:00", qid="A1")], at("13:00:00"), at("12:00:01")),
        (  # the last line that has a stamp
            [NOISE.format(t="12:00:01+00:00", qid="A1"), "garbage", ""],
            at("13:00:00"),
            at("12:00:01"),
        ),
        (  # never beyond the clock
            [NOISE.format(t="12:00:01+00:00", qid="A1")],
            at("11:00:00"),
            at("11:00:00"),
        ),
        (["garbage"], at("13:00:00"), None),
    ],
)
def test_read_through_is_the_last_stamp_committed(
    tmp_path: Path, lines: list[str], now: float, expected: float | None
) -> None:
    """A commit records the stamp of the last line read that has one, but not beyond the
    clock, in the Ingest and in the store."""
    store = Store(tmp_path / "s.sqlite")
    ingest = Ingest(store, TLSRPTConfig(), "mail.log", now=lambda: now)
    ingest.handle([line.encode() for line in lines], None)
    assert ingest.read_through == expected
    assert log_read_through(store) == expected
    store.close()


@pytest.mark.parametrize("exists", [True, False])
def test_caught_up_reads_through_the_present(tmp_path: Path, exists: bool) -> None:
    """Having read all of an idle log, a tailer has read it through the present; not when
    the log does not exist."""
    log = tmp_path / "mail.log"
    if exists:
        write_log(log, 1)
    store = Store(tmp_path / "s.sqlite")
    now = at("23:59:00")
    ingest = Ingest(store, TLSRPTConfig(), str(log), now=lambda: now)
    ingest.handle([NOISE.format(t="10:00:00+00:00", qid="A1").encode()], None)
    now = at("23:59:00") + 7200
    ingest.caught_up()
    assert ingest.read_through == at("10:00:00")  # until the next commit
    ingest.finish()
    assert ingest.read_through == (now if exists else at("10:00:00"))
    assert log_read_through(store) == ingest.read_through
    store.close()


def test_store_keeps_the_furthest_read_through(tmp_path: Path) -> None:
    """With two logs followed into one store, the store keeps the furthest read-through."""
    store = Store(tmp_path / "s.sqlite")
    for source, t in (("a", at("12:00:00")), ("b", at("11:00:00"))):
        ingest = Ingest(store, TLSRPTConfig(), source, now=lambda t=t: t)  # type: ignore[misc]
        ingest.handle([NOISE.format(t="23:00:00+00:00", qid="A1").encode()], None)
        assert ingest.read_through == t
    assert log_read_through(store) == at("12:00:00")
    store.close()


def test_following_tells_when_all_is_read(tmp_path: Path) -> None:
    """While following, each time the log is read to its end the tailer has read through the
    present (committed with the next release) and the caught_up hook is called."""
    log = tmp_path / "mail.log"
    write_log(log, 1)
    store = Store(tmp_path / "s.sqlite")
    clock = Clock()
    clock.advance(at("23:00:00") + 2 * 86400)
    ingest = Ingest(store, TLSRPTConfig(), str(log), now=clock.seconds)
    follower = LogFollower(str(log))
    hook: list[float] = []
    stop: Deferred[object] = Deferred()
    done = ensureDeferred(
        follow_into(clock, follower, ingest, stop=stop, caught_up=lambda: hook.append(1.0))
    )
    assert hook == [1.0]  # the backlog is read at once
    assert ingest.read_through == at("10:00:00")
    clock.pump([1.0] * int(RELEASE_INTERVAL))  # a poll a second
    assert len(hook) == 1 + int(RELEASE_INTERVAL)
    committed = log_read_through(store)
    assert committed is not None and clock.seconds() - 1.0 <= committed <= clock.seconds()
    assert ingest.read_through == committed
    stop.callback(None)
    clock.advance(1.0)
    assert done.called
    follower.close()
    store.close()


def report_mail_log(sessions: dict[str, int], qmgr_from: str = "") -> list[bytes]:
    """One delivery session to d<n>.example per queue id and n of ``sessions``, after a qmgr
    ``from=<qmgr_from>`` line when it is given."""
    lines = []
    for qid, n in sessions.items():
        t = f"12:00:{n:02d}+00:00"
        if qmgr_from:
            lines.append(
                f"2026-11-22T{t} mail postfix/qmgr[77]: {qid}: from=<{qmgr_from}>, size=1,"
                " nrcpt=1 (queue active)"
            )
        lines.append(TLS.format(t=t, pid=1000 + n, trust="Verified", n=1, d=n))
        lines.append(SENT.format(t=t, pid=1000 + n, qid=qid, n=1, d=n))
    return [line.encode() for line in lines]


def record_report_mail(store: Store, qid: str) -> None:
    """Record ``qid`` as the queue id of report mail handed to the MTA, as the outbox does."""
    row = OutboxRow(
        "2026-11-21", "d1.example", "mailto:r@d1.example", "sent", 1, 1.0, 1.0, "", qid, 1.0
    )
    store.update_outbox(row)


def domains_counted(store: Store) -> set[str]:
    return {row[1] for row, _ in store.day_counts("2026-11-22")}


@pytest.mark.parametrize("recorded", ["before the start", "between batches"])
def test_report_mail_sessions_are_not_counted(tmp_path: Path, recorded: str) -> None:
    """A session whose queue id the store records as report mail is not counted, with no qmgr
    from= line, whether the id was recorded before Ingest started or while it ran."""
    store = Store(tmp_path / "s.sqlite")
    if recorded == "before the start":
        record_report_mail(store, "0000000BBB")
    ingest = Ingest(store, TLSRPTConfig(), "mail.log")
    ingest.handle(report_mail_log({"0000000AAA": 0}), None)
    if recorded == "between batches":
        record_report_mail(store, "0000000BBB")
    ingest.handle(report_mail_log({"0000000BBB": 1, "0000000CCC": 2}), None)
    ingest.finish()
    assert domains_counted(store) == {"d0.example", "d2.example"}
    store.close()


def test_report_mail_ids_are_read_once(tmp_path: Path) -> None:
    """After a restart, Ingest goes on from the last report mail row it read with the saved
    tracker, and a new row is seen by the next batch."""
    store = Store(tmp_path / "s.sqlite")
    record_report_mail(store, "0000000AAA")
    ingest = Ingest(store, TLSRPTConfig(), "mail.log")
    ingest.handle(report_mail_log({"0000000DDD": 4}), None)
    assert (ingest.tracker.skip_mark, ingest.tracker.skip_queue_ids) == (1, {"0000000AAA"})
    restarted = Ingest(store, TLSRPTConfig(), "mail.log")
    record_report_mail(store, "0000000BBB")
    restarted.handle(report_mail_log({"0000000BBB": 1, "0000000CCC": 2}), None)
    restarted.finish()
    assert restarted.tracker.skip_mark == 2
    assert restarted.tracker.skip_queue_ids == {"0000000AAA", "0000000BBB"}
    assert domains_counted(store) == {"d2.example", "d4.example"}
    store.close()


@pytest.mark.parametrize(
    ("config", "sender"),
    [
        (TLSRPTConfig(mail_from="Reports@Example.ORG"), "reports@example.org"),
        (TLSRPTConfig(contact_info="mailto:tlsrpt@example.org"), "tlsrpt-noreply@example.org"),
    ],
)
def test_report_sender_is_the_configured_sender(
    tmp_path: Path, config: TLSRPTConfig, sender: str
) -> None:
    """Sessions of mail from [tlsrpt] mail_from, else from tlsrpt-noreply@<submitter>, are not
    counted, also by a tracker restored from the store."""
    store = Store(tmp_path / "s.sqlite")
    Ingest(store, TLSRPTConfig(), "mail.log").finish()  # saves a tracker
    ingest = Ingest(store, config, "mail.log")
    assert ingest.tracker.report_sender == sender
    ingest.handle(report_mail_log({"0000000AAA": 1}, qmgr_from=sender.upper()), None)
    ingest.handle(report_mail_log({"0000000BBB": 2}, qmgr_from="someone@example.org"), None)
    ingest.finish()
    assert domains_counted(store) == {"d2.example"}
    store.close()


def test_tail_once_on_a_missing_file_says_so(tmp_path: Path) -> None:
    """tail --once on a path that does not exist fails with one line and exit code 1."""
    missing = tmp_path / "no" / "mail.log"
    result = tail(config(tmp_path, "missing"), "--once", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"postfix-mtasts: {missing}: no such file\n"


def test_following_standard_input_counts_to_its_end(tmp_path: Path) -> None:
    """`tail -` without --once stops at the end of standard input, with every session counted."""
    log = tmp_path / "mail.log"
    write_log(log, 50)
    with log.open("rb") as stdin:
        result = tail(config(tmp_path, "follow"), "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "read 150 lines" in result.stderr
    assert sum(counts(tmp_path, "follow").values()) == 50


@pytest.mark.parametrize("once", [True, False], ids=["once", "following"])
@pytest.mark.parametrize("kind", ["directory", "fifo", "pipe"])
def test_tail_refuses_what_is_not_a_file(tmp_path: Path, kind: str, once: bool) -> None:
    """A directory, a FIFO without a writer or a pipe as /dev/stdin is refused at once, in one
    line with exit code 1, pointing to `-` for standard input."""
    path = tmp_path / "mail.log"
    r, w = os.pipe()
    os.write(w, b"a line\n")
    os.close(w)
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/stdin")
    with os.fdopen(r, "rb") as stdin:
        result = tail(config(tmp_path, "x"), *(["--once"] if once else []), str(path), stdin=stdin)
    assert result.returncode == 1
    assert result.stderr == (
        f"postfix-mtasts: {path}: not a regular file; use - to read standard input\n"
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pmt-tail-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("once", [True, False], ids=["once", "following"])
def test_tail_on_an_unreadable_log(shared_dir: Path, once: bool) -> None:
    """A log the user may not read is one line with exit code 1, not a traceback."""
    require_root()
    log = shared_dir / "secret.log"
    write_log(log, 1)
    log.chmod(0o600)
    cfg = shared_dir / "c.toml"
    cfg.write_text(f'[store]\npath = "{shared_dir}/state/store.sqlite"\n')
    result = tail(cfg, "--user", "nobody", *(["--once"] if once else []), str(log))
    assert result.returncode == 1
    assert result.stderr.endswith(f"\npostfix-mtasts: {log}: Permission denied\n")
    assert "Traceback" not in result.stderr
