"""Follow a mail log the way ``tail -F`` does, with a position that survives restarts.

:class:`LogFollower` hands out complete lines (bytes, without the ``\\n``) in batches, each
with the :class:`Position` just after its last line.  The caller commits that position in
the same transaction as what the lines produced, and gives it back on restart: no line is
lost or read twice across a crash.  The follower knows nothing of Postfix or the store.

What happens to the file while it is followed:

- **rename and create** (logrotate's default): the old file stays open.  It is read to its
  end and left only once the file now at the path has data, i.e. once the writer has moved
  to it; then the new file is read from offset 0.  Lines the writer adds to the old file
  between the rename and its move to the new file are therefore not lost.
- **copytruncate**: the open file shrinks below the read offset, or its first bytes change
  (truncated and regrown past the offset between two polls).  If ``path.1`` holds a copy of
  what was being read, its unread rest is read first; then the file is read again from 0.
- **missing**: no error; reading starts when the file appears.
- **unreadable** (no permission, not a regular file): logged, at most every
  :data:`REPEAT_EVERY` attempts for the same error, and tried again at each read; the file
  being read meanwhile (after a rotation, the old one) goes on being read.
  :func:`check_log_file` tells such a path at once, for a caller that would rather stop.

A resumed position is looked for in ``path``, then in ``path.1`` (logrotate's name for the
previous file).  A file holds it when it is at least ``offset`` long and its first
``min(offset, 4096)`` bytes hash to ``head``; at offset 0 (empty head) the inode must match
as well.  The device number is recorded but not compared: it is not stable across reboots on
every file system.  If neither file holds the position, the current file is read from 0.

Memory does not grow with the log: files are read in chunks, a batch holds the lines of one
chunk, and a line longer than the chunk size is handed out in pieces of that size (the same
pieces after a resume with the same chunk size).
:class:`StreamFollower` does the same for a pipe such as standard input, without positions.
:func:`follow` polls a follower on an injected reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

HEAD_SIZE = 4096
"""How many leading bytes of a file identify it in a :class:`Position`."""

CHUNK = 1 << 20
"""The default read size (1 MiB).  Each batch is committed with the tracker's state, which
costs about 4 ms of CPU whatever its length: with 256 KiB reads (about 1,500 lines) that
was a quarter of ``tail --once``'s time, with 1 MiB reads about a tenth, for 5 MiB more peak
memory."""

REPEAT_EVERY = 300
"""A file that cannot be opened is logged at its first failure, then once every this many
failed attempts with the same error (every five minutes at :func:`follow`'s default pace)."""

_log = Logger()

_T = TypeVar("_T")
_P_co = TypeVar("_P_co", covariant=True)

Batches = Generator[tuple[list[bytes], _T], None, None]


@dataclass(frozen=True, slots=True)
class Position:
    """Where to resume reading a log file.

    ``offset`` is just after the last complete line handed out; ``head`` is the SHA-256 of
    the file's first ``min(offset, 4096)`` bytes, which tells a file replaced or truncated
    and regrown past ``offset`` from the one that was read.
    """

    device: int
    inode: int
    offset: int
    head: bytes

    def to_json(self) -> str:
        """This position as a compact JSON object (``head`` in hex)."""
        return json.dumps(
            {"device": self.device, "inode": self.inode, "offset": self.offset,
             "head": self.head.hex()},
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str | bytes) -> Position:
        """Parse :meth:`to_json`'s output; raise ValueError for anything else."""
        try:
            data = json.loads(text)
            fields = [data[name] for name in ("device", "inode", "offset")]
            head = bytes.fromhex(data["head"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a log position: {text!r}") from e
        if any(type(v) is not int or v < 0 for v in fields) or len(head) != 32:
            raise ValueError(f"not a log position: {text!r}")
        device, inode, offset = fields
        return cls(device, inode, offset, head)


def _head(prefix: bytes, offset: int) -> bytes:
    return hashlib.sha256(prefix[: min(offset, HEAD_SIZE)]).digest()


def _split(pending: bytes, data: bytes, limit: int) -> tuple[list[bytes], bytes]:
    """Split C{pending + data} into complete lines and the unfinished rest.

    A line longer than C{limit} bytes is cut into pieces of C{limit} bytes counted from its
    start (the last piece holds 1 to C{limit} bytes), whether or not its end has been read:
    the pieces are the same however the reads fall, and after a resume.  C{pending} and
    C{data} must each be at most C{limit} bytes long; so is the rest returned.
    """
    end = data.rfind(b"\n")
    if end < 0:
        lines: list[bytes] = []
        rest = pending + data
    else:
        lines = (pending + data[:end]).split(b"\n") if pending else data[:end].split(b"\n")
        rest = data[end + 1 :]
        if len(first := lines[0]) > limit:  # only the first line can span two reads
            lines[0:1] = [first[i : i + limit] for i in range(0, len(first), limit)]
    while len(rest) > limit:
        lines.append(rest[:limit])
        rest = rest[limit:]
    return lines, rest


class _OpenFile:
    """One open log file and how far it has been read."""

    __slots__ = ("_head", "device", "fd", "inode", "name", "offset", "pending", "prefix")

    def __init__(self, fd: int, st: os.stat_result, name: str, offset: int, prefix: bytes):
        self.fd = fd
        self.device = st.st_dev
        self.inode = st.st_ino
        self.name = name
        self.offset = offset  # just after the last line handed out
        self.pending = b""  # read beyond offset: the start of an unfinished line
        self.prefix = prefix  # the file's first min(read_pos, HEAD_SIZE) bytes, as read
        self._head: bytes | None = None  # cached once offset >= HEAD_SIZE

    @property
    def read_pos(self) -> int:
        return self.offset + len(self.pending)

    def restart(self) -> None:
        """Read this file again from its start."""
        self.offset, self.pending, self.prefix, self._head = 0, b"", b"", None

    def position(self) -> Position:
        if self.offset < HEAD_SIZE:
            head = _head(self.prefix, self.offset)
        else:
            if self._head is None:
                self._head = _head(self.prefix, HEAD_SIZE)
            head = self._head
        return Position(self.device, self.inode, self.offset, head)


class LogFileError(Exception):
    """A log path that cannot be read as a log file; ``str()`` is one line, ``PATH: why``."""


def _open(name: str) -> tuple[int, os.stat_result] | None:
    """The regular file C{name} opened for reading, or None if it is missing.

    Raises L{LogFileError} for anything else: no permission, a directory, a FIFO or a device
    (opened without blocking, so that a FIFO with no writer does not hang).
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LogFileError(f"{name}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LogFileError(f"{name}: not a regular file; use - to read standard input")
    return fd, st


def check_log_file(path: str) -> bool:
    """Whether the log file ``path`` exists; raises :class:`LogFileError` if it cannot be
    read as one (no permission, not a regular file).  :class:`LogFollower` logs such a file
    and waits instead."""
    opened = _open(path)
    if opened is not None:
        os.close(opened[0])
    return opened is not None


class LogFollower:
    """Follow the log file at ``path`` from ``position`` (or its start), across rotations.

    ``chunk`` is the read size, which bounds a batch and the longest line.  ``lines_read``
    and ``bytes_read`` (bytes read from files) count progress.
    """

    finished = False  # a file can always grow

    def __init__(self, path: str, position: Position | None = None, *, chunk: int = CHUNK):
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self._path = path
        self._resume = position
        self._chunk = chunk
        self._file: _OpenFile | None = None
        self._failures: dict[str, tuple[str, int]] = {}  # name: (error, attempts)
        self.lines_read = 0
        self.bytes_read = 0

    @property
    def position(self) -> Position | None:
        """The position after the last line handed out (the resumed one before any read)."""
        return self._resume if self._file is None else self._file.position()

    def read_available(self) -> Batches[Position]:
        """Batches of complete lines readable now, each with the position after its last line.

        Lines lack their ``\\n`` (a ``\\r`` before it stays); an unfinished last line is held
        back until it is completed.  Stops at the end of what is there now.
        """
        while True:
            f = self._file
            if f is None:
                f = self._file = self._open_first()
                if f is None:
                    return
            else:
                f = self._file = self._check_rewritten(f)
            yield from self._drain(f)
            successor = self._successor(f)
            if successor is None:
                return
            yield from self._drain(f)  # what the writer added before it moved
            _log.info("log {old} rotated: reading {new} from its start", old=f.name, new=self._path)
            os.close(f.fd)
            self._file = successor

    def close(self) -> None:
        """Close the open file; a later read resumes where this one stopped."""
        if self._file is not None:
            self._resume = self._file.position()
            os.close(self._file.fd)
            self._file = None

    def _drain(self, f: _OpenFile) -> Batches[Position]:
        while data := os.pread(f.fd, self._chunk, f.read_pos):
            self.bytes_read += len(data)
            if len(f.prefix) < HEAD_SIZE:
                f.prefix += data[: HEAD_SIZE - len(f.prefix)]
            read_pos = f.read_pos + len(data)
            lines, f.pending = _split(f.pending, data, self._chunk)
            f.offset = read_pos - len(f.pending)
            if lines:
                self.lines_read += len(lines)
                yield lines, f.position()

    def _try_open(self, name: str) -> tuple[int, os.stat_result] | None:
        """L{_open}, with a file that cannot be opened logged now and then and taken as
        missing."""
        try:
            opened = _open(name)
        except LogFileError as e:
            error, attempts = self._failures.get(name, ("", 0))
            attempts = attempts + 1 if error == str(e) else 1
            self._failures[name] = (str(e), attempts)
            if (attempts - 1) % REPEAT_EVERY == 0:
                _log.error("cannot read log {error}; trying again", error=str(e))
            return None
        self._failures.pop(name, None)
        return opened

    def _find(self, position: Position, names: tuple[str, ...]) -> _OpenFile | None:
        """Open the first of C{names} that holds C{position} (see the module docstring)."""
        for name in names:
            opened = self._try_open(name)
            if opened is None:
                continue
            fd, st = opened
            size = min(position.offset, HEAD_SIZE)
            if (
                st.st_size >= position.offset
                and (position.offset > 0 or st.st_ino == position.inode)
                and hashlib.sha256(prefix := os.pread(fd, size, 0)).digest() == position.head
            ):
                return _OpenFile(fd, st, name, position.offset, prefix)
            os.close(fd)
        return None

    def _open_first(self) -> _OpenFile | None:
        position = self._resume
        if position is not None:
            found = self._find(position, (self._path, self._path + ".1"))
            if found is not None:
                self._resume = None
                return found
        opened = self._try_open(self._path)
        if opened is None:
            return None
        if position is not None:
            _log.warn(
                "log {path}: saved position {position} not found, reading from the start",
                path=self._path,
                position=position.to_json(),
            )
        self._resume = None
        return _OpenFile(*opened, self._path, 0, b"")

    def _check_rewritten(self, f: _OpenFile) -> _OpenFile:
        """C{f}, or what to read instead if it was truncated or rewritten in place."""
        size = os.fstat(f.fd).st_size
        if size >= f.read_pos and os.pread(f.fd, len(f.prefix), 0) == f.prefix:
            return f
        position = f.position()
        copy = self._find(position, (self._path + ".1",)) if position.offset > 0 else None
        if copy is not None and copy.inode != f.inode:
            _log.info(
                "log {path} truncated: finishing its copy {copy}", path=f.name, copy=copy.name
            )
            os.close(f.fd)
            return copy
        if copy is not None:
            os.close(copy.fd)
        _log.warn("log {path} truncated or rewritten: reading it from the start", path=f.name)
        f.restart()
        return f

    def _successor(self, f: _OpenFile) -> _OpenFile | None:
        """The file now at the path, once it differs from C{f} and has data, else None."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        except OSError:
            pass  # opening it logs why
        else:
            if (st.st_dev, st.st_ino) == (f.device, f.inode) or st.st_size == 0:
                return None
        opened = self._try_open(self._path)
        if opened is None:
            return None
        fd, st = opened
        if (st.st_dev, st.st_ino) == (f.device, f.inode) or st.st_size == 0:
            os.close(fd)
            return None
        return _OpenFile(fd, st, self._path, 0, b"")


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class StreamFollower:
    """Batches of lines from a pipe or other stream (``tail -``), with no position.

    Reads the descriptor directly.  On a non-blocking descriptor :meth:`read_available`
    returns when nothing is waiting; on a blocking one it reads until end of file.  At end
    of file an unfinished last line is handed out too, and ``finished`` becomes true.
    """

    def __init__(self, stream: _HasFileno | int, *, chunk: int = CHUNK):
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self._fd = stream if isinstance(stream, int) else stream.fileno()
        self._chunk = chunk
        self._pending = b""
        self.finished = False
        self.lines_read = 0
        self.bytes_read = 0

    def read_available(self) -> Batches[None]:
        """Batches of complete lines readable now (the position is always None)."""
        while not self.finished:
            try:
                data = os.read(self._fd, self._chunk)
            except BlockingIOError:
                return
            if data:
                self.bytes_read += len(data)
                lines, self._pending = _split(self._pending, data, self._chunk)
            else:
                self.finished = True
                lines, self._pending = ([self._pending] if self._pending else []), b""
            if lines:
                self.lines_read += len(lines)
                yield lines, None


class Follower(Protocol[_P_co]):
    """What :func:`follow` polls: a :class:`LogFollower` or a :class:`StreamFollower`."""

    @property
    def finished(self) -> bool:
        """True once nothing more can come."""

    def read_available(self) -> Generator[tuple[list[bytes], _P_co], None, None]:
        """Batches of complete lines readable now."""


class _Waiter:
    """Sleeps on a reactor; a stop ends the current sleep at once."""

    def __init__(self, reactor: IReactorTime):
        self._reactor = reactor
        self._wake: Deferred[None] | None = None
        self._call: IDelayedCall | None = None
        self._stopped = False

    def stopped(self) -> bool:
        return self._stopped

    def stop(self, result: _T) -> _T:
        self._stopped = True
        self.wake()
        return result

    def sleep(self, seconds: float) -> Deferred[None]:
        self._wake = Deferred()
        self._call = self._reactor.callLater(seconds, self.wake)
        return self._wake

    def wake(self) -> None:
        self.cancel()
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


async def follow(
    reactor: IReactorTime,
    follower: Follower[_T],
    handle_batch: Callable[[list[bytes], _T], object],
    interval: float = 1.0,
    stop: Deferred[Any] | None = None,
) -> None:
    """Hand every batch of C{follower} to C{handle_batch}, polling every C{interval} seconds.

    Returns when C{stop} fires (after the batch being handled, if any) or when the follower
    is finished.  C{stop}'s result passes through unchanged.  An exception from
    C{handle_batch} ends the loop and propagates.
    """
    waiter = _Waiter(reactor)
    if stop is not None:
        stop.addBoth(waiter.stop)
    try:
        while not waiter.stopped():
            batches = follower.read_available()
            try:
                for lines, position in batches:
                    handle_batch(lines, position)
                    if waiter.stopped():
                        return
            finally:
                batches.close()
            if follower.finished:
                return
            await waiter.sleep(interval)
    finally:
        waiter.cancel()
