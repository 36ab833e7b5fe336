"""Tests for postfix_mtasts.tlsrpt.tailer: following a log file on real files in tmp_path."""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import shutil
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from postfix_mtasts.tlsrpt.tailer import (
    REPEAT_EVERY,
    LogFileError,
    LogFollower,
    Position,
    StreamFollower,
    check_log_file,
    follow,
)

Batch = tuple[list[bytes], Position]


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _log(prefix: str, first: int, last: int) -> list[bytes]:
    """Distinct syslog-like lines, numbered C{first}..C{last}."""
    return [
        f"Nov  3 08:26:{n % 60:02d} mail postfix/smtp[{n}]: {prefix}{n:04d}: status=sent".encode()
        for n in range(first, last + 1)
    ]


def _data(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _read(follower: LogFollower) -> list[Batch]:
    return list(follower.read_available())


def _lines(batches: list[Batch]) -> list[bytes]:
    return [line for lines, _ in batches for line in lines]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """The path of the followed log (not created)."""
    return tmp_path / "mail.log"


@pytest.fixture
def open_follower(log: Path) -> Iterator[Callable[..., LogFollower]]:
    """Make followers of C{log} that are closed after the test."""
    made: list[LogFollower] = []

    def make(position: Position | None = None, chunk: int = 1 << 20) -> LogFollower:
        made.append(LogFollower(str(log), position, chunk=chunk))
        return made[-1]

    yield make
    for follower in made:
        follower.close()


@pytest.mark.parametrize(
    "position",
    [
        Position(0, 0, 0, hashlib.sha256(b"").digest()),
        Position(2049, 1234567, 98765, hashlib.sha256(b"x").digest()),
    ],
)
def test_position_json_round_trip(position: Position) -> None:
    """A position survives to_json and from_json unchanged."""
    assert Position.from_json(position.to_json()) == position


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"device":1,"inode":2,"offset":3}',
        '{"device":1,"inode":2,"offset":-3,"head":"' + "00" * 32 + '"}',
        '{"device":1,"inode":2,"offset":true,"head":"' + "00" * 32 + '"}',
        '{"device":1,"inode":"2","offset":3,"head":"' + "00" * 32 + '"}',
        '{"device":1,"inode":2,"offset":3,"head":"abcd"}',
        '{"device":1,"inode":2,"offset":3,"head":"zz"}',
    ],
)
def test_position_from_json_rejects(text: str) -> None:
    """Anything but a well-formed position is a ValueError."""
    with pytest.raises(ValueError, match="not a log position"):
        Position.from_json(text)


def test_batches_with_exact_positions(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """Each batch's position is just after its last line, with the head hash of the file."""
    content = _data(_log("A", 1, 150))  # longer than 4096 bytes: head hash stops growing
    log.write_bytes(content)
    follower = open_follower(chunk=256)
    batches = _read(follower)
    st = os.stat(log)
    offset = 0
    for lines, position in batches:
        offset += sum(len(line) + 1 for line in lines)
        head = hashlib.sha256(content[: min(offset, 4096)]).digest()
        assert position == Position(st.st_dev, st.st_ino, offset, head)
    assert len(batches) > len(content) // 256 - 1
    assert _lines(batches) == _log("A", 1, 150)
    assert (follower.lines_read, follower.bytes_read) == (150, len(content))
    assert follower.position == batches[-1][1]
    assert _read(follower) == []


def test_partial_last_line_held_back(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """An unfinished last line is handed out only once its newline is written."""
    log.write_bytes(b"one\ntw")
    follower = open_follower()
    [(lines, position)] = _read(follower)
    assert (lines, position.offset) == ([b"one"], 4)
    assert _read(follower) == []
    _append(log, b"o\nthr")
    [(lines, position)] = _read(follower)
    assert (lines, position.offset) == ([b"two"], 8)
    _append(log, b"ee\n")
    assert _lines(_read(follower)) == [b"three"]


def test_crlf_lines_keep_their_carriage_return(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """Lines end at b"\\n" only; a b"\\r" before it stays on the line."""
    log.write_bytes(b"one\r\ntwo\r\n\r\nlast\r")
    follower = open_follower()
    assert _lines(_read(follower)) == [b"one\r", b"two\r", b"\r"]
    _append(log, b"\n")
    assert _lines(_read(follower)) == [b"last\r"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"x" * 20 + b"\n", [b"x" * 8, b"x" * 8, b"x" * 4]),
        (b"x" * 16 + b"\nab\n", [b"x" * 8, b"x" * 8, b"ab"]),
        (b"ab\n" + b"y" * 17 + b"\n", [b"ab", b"y" * 8, b"y" * 8, b"y"]),
    ],
)
@pytest.mark.parametrize("chunk", [8])
def test_overlong_line_in_pieces(
    log: Path,
    open_follower: Callable[..., LogFollower],
    content: bytes,
    expected: list[bytes],
    chunk: int,
) -> None:
    """A line longer than the chunk is cut into chunk-sized pieces, the same after any resume."""
    log.write_bytes(content)
    assert _lines(_read(open_follower(chunk=chunk))) == expected
    # Resuming at every batch boundary cuts the same pieces.
    for k in range(1, len(_read(open_follower(chunk=chunk)))):
        first = open_follower(chunk=chunk)
        batches = _read(first)[:k]
        rest = _read(open_follower(batches[-1][1], chunk=chunk))
        assert _lines(batches) + _lines(rest) == expected


def test_rename_and_create_rotation(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """The old file is read to its end, including lines written after the rename, then the new."""
    rotated = log.with_name("mail.log.1")
    log.write_bytes(_data(_log("A", 1, 5)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 5)
    _append(log, _data(_log("A", 6, 7)))
    log.rename(rotated)
    _append(rotated, _data(_log("A", 8, 9)))  # the writer has not reopened yet
    log.touch()  # logrotate's "create": empty until the writer moves to it
    assert _lines(_read(follower)) == _log("A", 6, 9)
    _append(rotated, _data(_log("A", 10, 10)) + b"A-partial")
    _append(log, _data(_log("B", 1, 3)))
    batches = _read(follower)
    assert _lines(batches) == _log("A", 10, 10) + _log("B", 1, 3)
    assert batches[-1][1].inode == os.stat(log).st_ino
    assert batches[-1][1].offset == log.stat().st_size
    _append(rotated, _data(_log("A", 11, 11)))  # too late: the follower has moved on
    _append(log, _data(_log("B", 4, 4)))
    assert _lines(_read(follower)) == _log("B", 4, 4)


@pytest.mark.parametrize("regrown", [3, 40], ids=["shorter", "regrown-past-offset"])
@pytest.mark.parametrize("copy", [True, False], ids=["copy-in-path.1", "no-copy"])
def test_copytruncate(
    log: Path, open_follower: Callable[..., LogFollower], regrown: int, copy: bool
) -> None:
    """After copytruncate, the unread rest comes from path.1's copy if any, then the file from 0."""
    log.write_bytes(_data(_log("A", 1, 10)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 10)
    inode = os.stat(log).st_ino
    _append(log, _data(_log("A", 11, 12)))  # written, not yet read, before the copy
    if copy:
        shutil.copyfile(log, log.with_name("mail.log.1"))
    with log.open("r+b") as f:
        f.truncate(0)
    _append(log, _data(_log("B", 1, regrown)))
    assert os.stat(log).st_ino == inode
    batches = _read(follower)
    assert _lines(batches) == (_log("A", 11, 12) if copy else []) + _log("B", 1, regrown)
    assert batches[-1][1].inode == inode
    assert batches[-1][1].offset == log.stat().st_size


def test_truncated_then_empty(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """A file truncated to nothing gives nothing until it grows again from 0."""
    log.write_bytes(_data(_log("A", 1, 3)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 3)
    log.write_bytes(b"")
    assert _read(follower) == []
    _append(log, _data(_log("B", 1, 1)))
    assert _lines(_read(follower)) == _log("B", 1, 1)


def test_rewritten_past_offset_detected_by_head(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """A same-inode file rewritten longer than the offset between two reads is read from 0."""
    log.write_bytes(_data(_log("A", 1, 2)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 2)
    with log.open("r+b") as f:  # in place, same inode, bigger than before
        f.write(_data(_log("B", 1, 5)))
    assert _lines(_read(follower)) == _log("B", 1, 5)


def test_missing_file_then_reappearing(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """A missing file is no error; reading starts when it appears, and again when it is replaced."""
    follower = open_follower()
    assert _read(follower) == []
    assert follower.position is None
    log.write_bytes(_data(_log("A", 1, 2)))
    assert _lines(_read(follower)) == _log("A", 1, 2)
    log.unlink()
    assert _read(follower) == []
    log.write_bytes(_data(_log("B", 1, 2)))
    assert _lines(_read(follower)) == _log("B", 1, 2)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged during the test."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("kind", ["file", "missing", "directory", "fifo"])
def test_check_log_file(log: Path, kind: str) -> None:
    """A regular file exists, a missing one does not, and anything else is a one-line error;
    a FIFO with no writer does not hang the check."""
    if kind == "file":
        log.write_bytes(b"")
    elif kind == "directory":
        log.mkdir()
    elif kind == "fifo":
        os.mkfifo(log)
    if kind in ("file", "missing"):
        assert check_log_file(str(log)) is (kind == "file")
        return
    with pytest.raises(LogFileError) as e:
        check_log_file(str(log))
    assert str(e.value) == f"{log}: not a regular file; use - to read standard input"


def test_unreadable_path_is_logged_and_waited_for(
    log: Path, open_follower: Callable[..., LogFollower], logged: list[str]
) -> None:
    """A path that is no regular file gives no lines and one log line, and is read once it is."""
    log.mkdir()
    follower = open_follower()
    assert _read(follower) == [] and _read(follower) == []
    assert logged == [
        f"cannot read log {log}: not a regular file; use - to read standard input; trying again"
    ]
    log.rmdir()
    log.write_bytes(_data(_log("A", 1, 2)))
    assert _lines(_read(follower)) == _log("A", 1, 2)


def test_rotated_in_file_that_cannot_be_opened(
    log: Path,
    open_follower: Callable[..., LogFollower],
    logged: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a rotation to a file it may not open, the old file is still read, the error is
    logged now and then, and the new file is read from its start once it can be opened."""
    rotated = log.with_name("mail.log.1")
    log.write_bytes(_data(_log("A", 1, 2)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 2)
    log.rename(rotated)
    log.write_bytes(_data(_log("B", 1, 2)))  # created with permissions the reader lacks
    _append(rotated, _data(_log("A", 3, 3)))
    real_open = os.open

    def refuse(path: Any, flags: int, *args: Any) -> int:
        if path == str(log):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    assert _lines(_read(follower)) == _log("A", 3, 3)
    for _ in range(REPEAT_EVERY):
        assert _read(follower) == []
    assert logged == [f"cannot read log {log}: Permission denied; trying again"] * 2
    monkeypatch.undo()
    assert _lines(_read(follower)) == _log("B", 1, 2)
    assert "rotated" in logged[-1]


def test_close_then_read_resumes(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """After close(), a further read continues where the last one stopped."""
    log.write_bytes(_data(_log("A", 1, 2)))
    follower = open_follower()
    assert _lines(_read(follower)) == _log("A", 1, 2)
    follower.close()
    _append(log, _data(_log("A", 3, 3)))
    assert _lines(_read(follower)) == _log("A", 3, 3)


def test_resume_after_rotation_to_path_1(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """A position in a file since renamed to path.1 resumes there, then reads the new file."""
    log.write_bytes(_data(_log("A", 1, 40)))
    batches = _read(open_follower(chunk=512))
    saved = batches[0][1].to_json()
    handed = _lines(batches[:1])
    log.rename(log.with_name("mail.log.1"))
    log.write_bytes(_data(_log("B", 1, 2)))
    rest = _lines(_read(open_follower(Position.from_json(saved))))
    assert handed + rest == _log("A", 1, 40) + _log("B", 1, 2)


@pytest.mark.parametrize("rotated", ["absent", "unrelated"])
def test_resume_position_gone_reads_current_from_start(
    log: Path, open_follower: Callable[..., LogFollower], rotated: str
) -> None:
    """A position found in neither path nor path.1 restarts the current file at 0."""
    log.write_bytes(_data(_log("A", 1, 5)))
    [(_, position)] = _read(open_follower())
    log.unlink()
    if rotated == "unrelated":
        log.with_name("mail.log.1").write_bytes(_data(_log("Z", 1, 50)))
    log.write_bytes(_data(_log("B", 1, 2)))
    assert _lines(_read(open_follower(position))) == _log("B", 1, 2)


def test_resume_position_at_start_needs_its_inode(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """At offset 0 the head says nothing, so path.1 is finished only if it has the inode."""
    log.write_bytes(b"")
    position = LogFollower(str(log)).position
    assert position is None
    st = os.stat(log)
    empty = Position(st.st_dev, st.st_ino, 0, hashlib.sha256(b"").digest())
    _append(log, _data(_log("A", 1, 2)))
    log.rename(log.with_name("mail.log.1"))
    log.write_bytes(_data(_log("B", 1, 1)))
    assert _lines(_read(open_follower(empty))) == _log("A", 1, 2) + _log("B", 1, 1)
    other = Position(st.st_dev, st.st_ino + 1, 0, empty.head)
    assert _lines(_read(open_follower(other))) == _log("B", 1, 1)


# A log's life: partial lines, rename-and-create with late writes to the old file, an
# overlong line, copytruncate with a copy in path.1.  None means "read what is there".
CHUNK = 300


def _life(log: Path) -> tuple[list[Callable[[], object] | None], list[bytes]]:
    r1, r2 = log.with_name("mail.log.1"), log.with_name("mail.log.2")

    def copytruncate() -> None:
        r1.rename(r2)
        shutil.copyfile(log, r1)
        with log.open("r+b") as f:
            f.truncate(0)

    steps: list[Callable[[], object] | None] = [
        lambda: log.write_bytes(_data(_log("L", 1, 10))),
        None,
        lambda: _append(log, _data(_log("L", 11, 12)) + b"L0013 partial"),
        None,
        lambda: _append(log, b" done\n" + _data(_log("L", 14, 20))),
        None,
        lambda: log.rename(r1),
        lambda: _append(r1, _data(_log("L", 21, 23))),
        log.touch,
        None,
        lambda: _append(r1, _data(_log("L", 24, 24))),
        lambda: _append(log, _data(_log("M", 1, 5))),
        None,
        lambda: _append(log, b"X" * 700 + b"\n" + _data(_log("M", 6, 12))),
        None,
        lambda: _append(log, _data(_log("M", 13, 14))),
        copytruncate,
        lambda: _append(log, _data(_log("N", 1, 5))),
        None,
        lambda: _append(log, _data(_log("N", 6, 20))),
        None,
        None,
    ]
    expected = [
        *_log("L", 1, 12),
        b"L0013 partial done",
        *_log("L", 14, 24),
        *_log("M", 1, 5),
        b"X" * 300,
        b"X" * 300,
        b"X" * 100,
        *_log("M", 6, 14),
        *_log("N", 1, 20),
    ]
    return steps, expected


def _live(log: Path, kill: Callable[[int], bool], restart_at_once: bool) -> list[bytes]:
    """Run the log's life, killing the follower after the batches C{kill} picks.

    A killed follower's last position goes through JSON to a new follower, created at once
    or only at the next read (after that step's changes to the files).
    """
    steps, _ = _life(log)
    out: list[bytes] = []
    follower: LogFollower | None = None
    saved: str | None = None
    count = 0
    for step in steps:
        if step is not None:
            step()
            continue
        while True:
            if follower is None:
                position = None if saved is None else Position.from_json(saved)
                follower = LogFollower(str(log), position, chunk=CHUNK)
            batches = follower.read_available()
            killed = False
            for lines, position in batches:
                out.extend(lines)
                count += 1
                if kill(count):
                    saved, killed = position.to_json(), True
                    break
            batches.close()
            if not killed:
                break
            follower.close()
            follower = None
            if not restart_at_once:
                break
    if follower is None:  # killed at the last read: one more run to the end
        follower = LogFollower(str(log), Position.from_json(saved or ""), chunk=CHUNK)
        out.extend(line for lines, _ in follower.read_available() for line in lines)
    follower.close()
    return out


def test_uninterrupted_life(log: Path) -> None:
    """Without a kill, every line of the log's life comes out once, in order."""
    _, expected = _life(log)
    assert _live(log, lambda n: False, restart_at_once=True) == expected


def test_kill_after_every_batch(log: Path) -> None:
    """Restarting from the saved position after every batch loses no line and repeats none."""
    _, expected = _life(log)
    assert _live(log, lambda n: True, restart_at_once=True) == expected


def test_kill_at_each_batch_boundary(tmp_path: Path) -> None:
    """A kill after any one batch, with the files changing while down, loses and repeats nothing."""
    first = tmp_path / "count"
    first.mkdir()
    boundaries: list[int] = []

    def note(n: int) -> bool:
        boundaries.append(n)
        return False

    _live(first / "mail.log", note, restart_at_once=True)
    _, expected = _life(first / "mail.log")
    assert len(boundaries) > 15
    for k in boundaries:
        where = tmp_path / f"kill{k}"
        where.mkdir()
        killed = _live(where / "mail.log", partial(operator.eq, k), restart_at_once=False)
        assert killed == expected, k


def test_large_file_bounded_memory(log: Path, open_follower: Callable[..., LogFollower]) -> None:
    """A 5 MB file is read in chunk-sized batches, never all at once."""
    chunk = 64 * 1024
    line = b"Nov  3 08:26:01 mail postfix/smtp[123]: 317123EE1029: to=<a@example.org>, status=sent"
    count = 5_000_000 // (len(line) + 1) + 1
    with log.open("wb") as f:
        for _ in range(count // 1000):
            f.write((line + b"\n") * 1000)
        f.write((line + b"\n") * (count % 1000))
    follower = open_follower(chunk=chunk)
    biggest = batches = lines = 0
    tracemalloc.start()
    try:
        for batch, _ in follower.read_available():
            biggest = max(biggest, sum(len(x) + 1 for x in batch))
            batches += 1
            lines += len(batch)
            del batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == count
    assert biggest <= chunk + len(line) + 1
    assert batches >= log.stat().st_size // (chunk + len(line) + 1)
    assert peak < 8 * chunk


class _Pipe:
    """A pipe whose read end is non-blocking."""

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        os.set_blocking(self.r, False)
        self._writing = True

    def write(self, data: bytes) -> None:
        os.write(self._w, data)

    def close_write(self) -> None:
        os.close(self._w)
        self._writing = False

    def close(self) -> None:
        os.close(self.r)
        if self._writing:
            os.close(self._w)


@pytest.fixture
def pipe() -> Iterator[_Pipe]:
    """A pipe, closed after the test."""
    made = _Pipe()
    yield made
    made.close()


def test_stream_follower_over_a_pipe(pipe: _Pipe) -> None:
    """Lines from a non-blocking pipe come as they complete; at EOF the unfinished rest too."""
    stream = StreamFollower(pipe.r, chunk=6)
    assert list(stream.read_available()) == []
    pipe.write(b"one\ntw")
    assert [lines for lines, _ in stream.read_available()] == [[b"one"]]
    pipe.write(b"o\r\nthree\nfou")
    got = list(stream.read_available())
    assert [line for lines, _ in got for line in lines] == [b"two\r", b"three"]
    assert {position for _, position in got} == {None}
    finished = [stream.finished]
    pipe.close_write()
    assert list(stream.read_available()) == [([b"fou"], None)]
    assert [*finished, stream.finished] == [False, True]
    assert list(stream.read_available()) == []
    assert (stream.lines_read, stream.bytes_read) == (4, 18)


def test_stream_follower_blocking_reads_to_eof(tmp_path: Path) -> None:
    """On a blocking descriptor one read_available call reads everything up to EOF."""
    source = tmp_path / "in"
    source.write_bytes(_data(_log("A", 1, 100)))
    with source.open("rb") as f:
        stream = StreamFollower(f, chunk=100)
        assert [x for lines, _ in stream.read_available() for x in lines] == _log("A", 1, 100)
        assert stream.finished


def _following(
    clock: Clock, follower: LogFollower | StreamFollower, stop: Deferred[object] | None = None
) -> tuple[Deferred[None], list[list[bytes]]]:
    seen: list[list[bytes]] = []
    done = Deferred.fromCoroutine(
        follow(clock, follower, lambda lines, _: seen.append(lines), interval=5.0, stop=stop)
    )
    return done, seen


@pytest_twisted.ensureDeferred
async def test_follow_polls_until_stop(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """follow() reads at once, then every interval, and returns when stop fires."""
    clock, stop = Clock(), Deferred[object]()
    log.write_bytes(b"a\n")
    done, seen = _following(clock, open_follower(), stop)
    assert seen == [[b"a"]]
    _append(log, b"b\n")
    clock.advance(4.9)
    assert seen == [[b"a"]]
    clock.advance(0.1)
    assert seen == [[b"a"], [b"b"]]
    called = [done.called]
    stop.callback("stopped")
    assert [*called, done.called] == [False, True]
    await done
    assert clock.getDelayedCalls() == []
    assert await stop == "stopped"
    _append(log, b"c\n")
    clock.advance(60)
    assert seen == [[b"a"], [b"b"]]


@pytest_twisted.ensureDeferred
async def test_follow_stop_during_a_batch(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """A stop fired while a batch is handled ends follow() before the next batch."""
    clock, stop = Clock(), Deferred[object]()
    log.write_bytes(_data(_log("A", 1, 10)))
    handled: list[list[bytes]] = []

    def handle(lines: list[bytes], position: Position) -> None:
        handled.append(lines)
        stop.callback(None)

    follower = open_follower(chunk=100)
    await follow(clock, follower, handle, stop=stop)
    assert len(handled) == 1
    assert follower.position is not None
    assert follower.position.offset == sum(len(x) + 1 for x in handled[0])
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_follow_ends_with_the_stream(pipe: _Pipe) -> None:
    """follow() returns once a stream follower reaches end of file."""
    clock = Clock()
    pipe.write(b"x\n")
    done, seen = _following(clock, StreamFollower(pipe.r))
    assert seen == [[b"x"]]
    pipe.write(b"y")
    pipe.close_write()
    assert not done.called
    clock.advance(5)
    await done
    assert seen == [[b"x"], [b"y"]]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_follow_propagates_handler_errors(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """An exception from the batch handler ends follow() with that exception."""
    log.write_bytes(b"a\n")

    def handle(lines: list[bytes], position: Position) -> None:
        raise RuntimeError("store unavailable")

    with pytest.raises(RuntimeError, match="store unavailable"):
        await follow(Clock(), open_follower(), handle)


@pytest_twisted.ensureDeferred
async def test_follow_already_stopped_reads_nothing(
    log: Path, open_follower: Callable[..., LogFollower]
) -> None:
    """A stop that has already fired means follow() returns without reading."""
    log.write_bytes(b"a\n")
    stop = Deferred[object]()
    stop.callback(None)
    done, seen = _following(Clock(), open_follower(), stop)
    await done
    assert seen == []
