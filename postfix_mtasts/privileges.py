"""Running as the configured account: the root check, the state directory, the switch.

The command line calls these before the reactor serves anything; nothing here waits.

- :func:`should_drop` decides: started as root with ``[server] user`` set, drop to it; as root
  without one, refuse (:class:`PrivilegeError`) unless ``[server] allow_root`` is true; not
  root, nothing to do.  A process that is not root cannot become another user, so a configured
  user that differs from the current one is not an error then: the process carries on as it
  is (under systemd, ``User=`` has already switched), and file permissions decide what it may
  touch.  A user or group that does not exist is an error either way.
- :func:`prepare_state_dir` gives the store's directory to that user (as root).
- :func:`acting_as` borrows the user's identity while files are created, keeping root to bind
  listening sockets afterwards; :func:`drop_privileges` then gives root up for good.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

__all__ = [
    "STATE_DIR_MODE",
    "UMASK",
    "Account",
    "PrivilegeError",
    "acting_as",
    "drop_privileges",
    "lookup_account",
    "prepare_state_dir",
    "should_drop",
]

STATE_DIR_MODE = 0o750
"""The mode of a state directory this module creates or takes over."""

UMASK = 0o027
"""The file creation mask after dropping privileges: the group may read, others nothing."""

_STORE_SUFFIXES = ("", "-wal", "-shm", "-journal")
"""The suffixes of SQLite's files for a database: itself, its WAL, shared memory and journal."""

log = Logger()


class PrivilegeError(Exception):
    """Running as root is refused, or the configured account cannot be used.

    ``str()`` is one line that names the configuration key where one is at fault; the command
    line reports it with exit code 2, like a configuration error.
    """


@dataclass(frozen=True)
class Account:
    """A user to run as: its ids, the groups it gets, and its home."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    """Every group id the process gets: ``gid`` first, then the supplementary ones."""
    home: str


def lookup_account(user: str, group: str | None = None) -> Account:
    """The account ``user`` (a name or a numeric id), with ``group`` as its only group if given.

    Without ``group`` the process gets the user's primary group and its supplementary groups
    from the group database (as ``initgroups`` would), e.g. ``adm`` to read
    ``/var/log/mail.log`` on Debian.  With ``group`` (a name or numeric id) it gets that group
    alone.  Raises :class:`PrivilegeError` naming ``[server] user`` or ``[server] group``
    (a name with a NUL byte, which the databases cannot hold, is no such account).
    """
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError, ValueError):
        raise PrivilegeError(f"[server] user: no such user {user!r}") from None
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, OverflowError, ValueError):
            raise PrivilegeError(f"[server] group: no such group {group!r}") from None
        groups: tuple[int, ...] = (gid,)
    else:
        gid = entry.pw_gid
        supplementary = os.getgrouplist(entry.pw_name, gid)
        groups = (gid, *sorted(set(supplementary) - {gid}))
    return Account(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir)


def should_drop(
    user: str, group: str | None = None, *, allow_root: bool = False, euid: int | None = None
) -> bool:
    """Whether to switch to ``user``; raises :class:`PrivilegeError` when root is refused.

    - root and ``user`` set (and not root itself): ``True``.
    - root without ``user`` (or with a user whose id is 0): refused unless ``allow_root``,
      then ``False``.
    - not root: ``False``, whatever ``user`` says (see the module's docstring).

    ``user`` and ``group`` are checked to exist in every case, so a typo shows at once.
    ``euid`` defaults to the process's.
    """
    account = lookup_account(user, group) if user else None
    if (os.geteuid() if euid is None else euid) != 0:
        return False
    if account is not None and account.uid != 0:
        return True
    if allow_root:  # told to: no warning at every start
        return False
    raise PrivilegeError(
        "refusing to run as root: set [server] user to the account to run as"
        " (or [server] allow_root = true)"
    )


def prepare_state_dir(store_path: Path, user: str, group: str | None = None) -> None:
    """Make the directory holding ``store_path`` the user's, creating it if missing.

    As root: a missing directory is created with mode 0750 and given to ``user`` (and its
    group, or ``group``).  An existing directory owned by someone else is taken over (chown,
    mode 0750) only if it holds nothing but the store's files, e.g. after an earlier run as
    root; anything else there means it is shared, and a :class:`PrivilegeError` says so rather
    than giving it away.  The store's files (``store.sqlite`` and its ``-wal``, ``-shm`` and
    ``-journal``) are given to the user too; a store file that is a symbolic link, has other
    hard links or is not a regular file is refused.

    Not root: the directory is only created if missing (mode 0750); nothing is changed.
    An error of the system (a parent that is a file, no permission) is a
    :class:`PrivilegeError` naming the path.
    """
    account = lookup_account(user, group)
    try:
        _prepare_state_dir(store_path, account)
    except OSError as e:
        # Path.mkdir(exist_ok=True) raises FileExistsError for a file in the way.
        problem = "not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
        raise PrivilegeError(f"{e.filename or store_path.parent}: {problem}") from None


def _prepare_state_dir(store_path: Path, account: Account) -> None:
    directory = store_path.parent
    if os.geteuid() != 0:
        directory.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        return
    created = False
    if not os.path.lexists(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=STATE_DIR_MODE)
            created = True
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise PrivilegeError(
            f"{directory}: the store's directory is a symbolic link: give [store] path the real one"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PrivilegeError(f"{directory}: the store's directory is not a directory")
    names = {store_path.name + suffix for suffix in _STORE_SUFFIXES}
    if created or st.st_uid != account.uid:
        others = sorted(set(os.listdir(directory)) - names)
        if others:
            raise PrivilegeError(
                f"{directory}: owned by uid {st.st_uid} and holding other files ({others[0]}):"
                f" chown it to {account.name} or give [store] path a directory of its own"
            )
        os.chown(directory, account.uid, account.gid, follow_symlinks=False)
        os.chmod(directory, STATE_DIR_MODE)
    for name in sorted(names):
        _give(directory / name, account)


def _give(path: Path, account: Account) -> None:
    """``chown`` an existing store file to ``account``, refusing links and special files."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    except OSError as e:  # ELOOP: a symbolic link
        raise PrivilegeError(f"{path}: not a plain store file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise PrivilegeError(f"{path}: not a plain store file (special file or hard link)")
        if (st.st_uid, st.st_gid) != (account.uid, account.gid):
            os.fchown(fd, account.uid, account.gid)
    finally:
        os.close(fd)


@contextlib.contextmanager
def acting_as(user: str, group: str | None = None) -> Iterator[Account]:
    """Run the body with ``user``'s effective ids and groups, then become root again.

    For work that must create files as the user (opening the store) before root is still
    needed (binding a privileged port or a socket in a root-owned directory).  The real and
    saved ids stay 0 throughout, so this is no protection: :func:`drop_privileges` is.
    Must be entered as root.
    """
    account = lookup_account(user, group)
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot act as {account.name}: not running as root")
    egid, groups = os.getegid(), os.getgroups()
    os.setgroups(account.groups)
    os.setegid(account.gid)
    os.seteuid(account.uid)
    try:
        yield account
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def drop_privileges(user: str, group: str | None = None) -> None:
    """Become ``user`` for good: groups, then gid, then uid; check root cannot come back.

    Sets the supplementary groups (see :func:`lookup_account`), the real, effective and saved
    group id, then the three user ids; checks the result and that ``setuid(0)`` now fails.
    Then sets the umask to 027 and ``HOME``, ``USER`` and ``LOGNAME`` to the account's.  The
    working directory is left alone.  Must be called as root, with a user other than root;
    raises :class:`PrivilegeError` otherwise or if any step did not take.
    """
    account = lookup_account(user, group)
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to user {account.name}: not running as root")
    if account.uid == 0:
        raise PrivilegeError(f"[server] user: {user!r} is root, there is nothing to drop to")
    os.setgroups(account.groups)
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    uids, gids = os.getresuid(), os.getresgid()
    if uids != (account.uid,) * 3 or gids != (account.gid,) * 3:
        raise PrivilegeError(f"switching to {account.name} failed: uids {uids}, gids {gids}")
    if set(os.getgroups()) != set(account.groups):
        raise PrivilegeError(f"switching to {account.name} failed: groups {os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError(f"switching to {account.name} failed: setuid(0) still works")
    os.umask(UMASK)
    os.environ.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    log.info(
        "running as {user} (uid {uid}, gid {gid})",
        user=account.name,
        uid=account.uid,
        gid=account.gid,
    )
