"""Dropping root for the configured account, the root check, and the state directory.

The switches run in child processes (a process cannot become root again to carry on with
the next test) as a system user and group made for the test and removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from postfix_mtasts.privileges import (
    PrivilegeError,
    lookup_account,
    prepare_state_dir,
    should_drop,
)
from tests.daemon import (
    PROGRAM,
    Daemon,
    environment,
    free_port,
    postmap,
    require_postmap,
    require_root,
)

ROOT, OTHER = 0, 4242


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int
    extra_group: str
    extra_gid: int


@pytest.fixture(scope="module")
def test_user() -> Iterator[SystemUser]:
    """A system user with a group of its own and one supplementary group, removed after."""
    require_root()
    if shutil.which("useradd") is None:
        pytest.fail("useradd is missing (Debian package passwd)")
    name = f"pmt{uuid.uuid4().hex[:8]}"
    extra = f"{name}x"
    subprocess.run(["groupadd", "--system", extra], check=True)
    try:
        subprocess.run(
            [
                *("useradd", "--system", "--user-group", "--no-create-home", "--groups", extra),
                *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name),
            ],
            check=True,
        )
        try:
            uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
            gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True).stdout)
            yield SystemUser(name, uid, gid, extra, lookup_account(name, extra).gid)
        finally:
            subprocess.run(["userdel", name], check=True)
    finally:
        subprocess.run(["groupdel", extra], check=False, capture_output=True)


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pmt-privileges-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def child(code: str, **values: Any) -> dict[str, Any]:
    """Run ``code`` in a fresh Python (``values`` bound as globals); return what it prints as JSON.

    The code ends by assigning ``result``; it runs after ``from postfix_mtasts.privileges
    import *`` with ``os``, ``json`` and ``Path`` at hand.
    """
    program = "\n".join(
        [
            "import json, os, sys",
            "from pathlib import Path",
            "from postfix_mtasts.privileges import *",
            f"globals().update(json.loads({json.dumps(json.dumps(values))}))",
            textwrap.dedent(code),
            "print(json.dumps(result))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the root check: no root needed ---------------------------------------------------------


@pytest.mark.parametrize(
    ("euid", "user", "allow_root", "expected"),
    [
        (ROOT, "nobody", False, True),
        (ROOT, "nobody", True, True),
        (ROOT, "65534", False, True),
        (ROOT, "", True, False),
        (ROOT, "root", True, False),
        (OTHER, "", False, False),
        (OTHER, "nobody", False, False),
        (OTHER, "root", False, False),
    ],
)
def test_should_drop(euid: int, user: str, allow_root: bool, expected: bool) -> None:
    """Root with a configured user drops; root allowed stays; any other user carries on."""
    assert should_drop(user, None, allow_root=allow_root, euid=euid) is expected


@pytest.mark.parametrize("user", ["", "root", "0"])
def test_root_without_user_is_refused(user: str) -> None:
    """Root with no user (or root itself as the user) is refused unless allow_root is set."""
    with pytest.raises(PrivilegeError) as e:
        should_drop(user, None, allow_root=False, euid=ROOT)
    assert str(e.value) == (
        "refusing to run as root: set [server] user to the account to run as"
        " (or [server] allow_root = true)"
    )


@pytest.mark.parametrize("euid", [ROOT, OTHER])
@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("no-such-user-x", None, "[server] user: no such user 'no-such-user-x'"),
        ("4294967294", None, "[server] user: no such user '4294967294'"),
        ("99999999999999999999", None, "[server] user: no such user '99999999999999999999'"),
        ("nobody", "no-such-group-x", "[server] group: no such group 'no-such-group-x'"),
        ("a\x00b", None, "[server] user: no such user 'a\\x00b'"),
        ("nobody", "a\x00b", "[server] group: no such group 'a\\x00b'"),
    ],
)
def test_unknown_account_is_a_clear_error(
    euid: int, user: str, group: str | None, message: str
) -> None:
    """An unknown user or group is a one-line error naming the key, whoever runs it."""
    with pytest.raises(PrivilegeError) as e:
        should_drop(user, group, allow_root=True, euid=euid)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("group", "gid", "groups"),
    [(None, 65534, (65534,)), ("", 65534, (65534,)), ("root", 0, (0,)), ("0", 0, (0,))],
)
def test_lookup_groups(group: str | None, gid: int, groups: tuple[int, ...]) -> None:
    """Without a group the user's own groups are used; with one, that group alone."""
    account = lookup_account("nobody", group)
    assert (account.uid, account.gid, account.groups) == (65534, gid, groups)


# -- switching for real: root only ----------------------------------------------------------

DROP = """
result = {}
drop_privileges(user, group)
result["ids"] = [list(os.getresuid()), list(os.getresgid()), sorted(os.getgroups())]
for name, call in [("setuid", lambda: os.setuid(0)), ("seteuid", lambda: os.seteuid(0)),
                   ("setgid", lambda: os.setgid(0)), ("setgroups", lambda: os.setgroups([0]))]:
    try:
        call()
        result[name] = "succeeded"
    except PermissionError:
        result[name] = "refused"
Path(where, "made-after-drop").write_text("x")
st = os.stat(Path(where, "made-after-drop"))
result["file"] = [st.st_uid, st.st_gid, oct(st.st_mode & 0o777)]
result["env"] = [os.environ["HOME"], os.environ["USER"], os.environ["LOGNAME"]]
"""


@pytest.mark.parametrize("group", ["own", "extra", "nogroup"])
def test_drop_privileges(test_user: SystemUser, shared_dir: Path, group: str) -> None:
    """After the drop every id is the user's, root cannot come back, and files are its own."""
    shared_dir.chmod(0o777)
    given, gid, groups = {
        "own": (None, test_user.gid, [test_user.gid, test_user.extra_gid]),
        "extra": (test_user.extra_group, test_user.extra_gid, [test_user.extra_gid]),
        "nogroup": ("nogroup", 65534, [65534]),
    }[group]
    result = child(DROP, user=test_user.name, group=given, where=str(shared_dir))
    uid = test_user.uid
    assert result["ids"] == [[uid] * 3, [gid] * 3, sorted(groups)]
    assert [result[k] for k in ("setuid", "seteuid", "setgid", "setgroups")] == ["refused"] * 4
    assert result["file"] == [uid, gid, "0o640"]
    assert result["env"] == ["/nonexistent", test_user.name, test_user.name]


def test_drop_to_nobody_by_number(shared_dir: Path) -> None:
    """A numeric user id is accepted, and the drop leaves no way back to root."""
    require_root()
    shared_dir.chmod(0o777)
    result = child(DROP, user="65534", group=None, where=str(shared_dir))
    assert result["ids"][0] == [65534] * 3
    assert result["setuid"] == "refused"
    assert result["file"][0] == 65534


REFUSE = """
if not_root:
    os.setresuid(65534, 65534, 65534)
try:
    drop_privileges(user)
    result = {"error": None}
except PrivilegeError as e:
    result = {"error": str(e)}
"""


@pytest.mark.parametrize(
    ("user", "not_root", "message"),
    [
        ("root", False, "[server] user: 'root' is root, there is nothing to drop to"),
        ("nobody", True, "cannot switch to user nobody: not running as root"),
    ],
)
def test_drop_privileges_refusals(user: str, not_root: bool, message: str) -> None:
    """Dropping to root, or dropping when not root, is a clear error."""
    require_root()
    assert child(REFUSE, user=user, not_root=not_root) == {"error": message}


def test_store_created_acting_as_user_is_writable_after_drop(
    test_user: SystemUser, shared_dir: Path
) -> None:
    """The serve sequence: prepare the directory, open the store acting as the user, drop.

    Every file of the store belongs to the user, root was back between the two steps, and the
    store is still writable after the drop.
    """
    store = shared_dir / "state" / "store.sqlite"
    result = child(
        """
        from postfix_mtasts.store import Store
        prepare_state_dir(Path(store), user)
        with acting_as(user):
            db = Store(store)
        result = {"between": os.geteuid()}
        drop_privileges(user)
        db.record_failure("example.com", 1.0, "sts-policy-fetch-error", "test", None)
        db.close()
        result["after"] = os.geteuid()
        """,
        user=test_user.name,
        store=str(store),
    )
    assert result == {"between": 0, "after": test_user.uid}
    directory = os.stat(store.parent)
    assert (directory.st_uid, directory.st_gid) == (test_user.uid, test_user.gid)
    assert stat.S_IMODE(directory.st_mode) == 0o750
    for path in store.parent.iterdir():
        assert os.stat(path).st_uid == test_user.uid, path


# -- the state directory ----------------------------------------------------------------------


def test_prepare_creates_the_directory(test_user: SystemUser, shared_dir: Path) -> None:
    """A missing state directory (and its parents) is created 0750 and given to the user."""
    store = shared_dir / "var" / "lib" / "pmt" / "store.sqlite"
    prepare_state_dir(store, test_user.name)
    st = os.stat(store.parent)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        test_user.uid,
        test_user.gid,
        0o750,
    )
    assert os.stat(store.parent.parent).st_uid == 0


def test_prepare_takes_over_a_root_run(test_user: SystemUser, shared_dir: Path) -> None:
    """A directory an earlier run as root left, with only the store's files, becomes the user's."""
    directory = shared_dir / "state"
    directory.mkdir(mode=0o755)
    for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
        (directory / name).write_bytes(b"")
    prepare_state_dir(directory / "store.sqlite", test_user.name, test_user.extra_group)
    owners = {
        p.name: (os.stat(p).st_uid, os.stat(p).st_gid) for p in [directory, *directory.iterdir()]
    }
    assert set(owners.values()) == {(test_user.uid, test_user.extra_gid)}
    assert len(owners) == 4
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o750


def test_prepare_keeps_the_users_own_directory(test_user: SystemUser, shared_dir: Path) -> None:
    """A directory the user already owns keeps its mode and other files; only store files move."""
    directory = shared_dir / "state"
    directory.mkdir(mode=0o700)
    (directory / "notes.txt").write_text("mine")
    (directory / "store.sqlite").write_bytes(b"")
    os.chown(directory, test_user.uid, test_user.gid)
    prepare_state_dir(directory / "store.sqlite", test_user.name)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.stat(directory / "notes.txt").st_uid == 0
    assert os.stat(directory / "store.sqlite").st_uid == test_user.uid


def test_prepare_refuses_a_shared_directory(test_user: SystemUser, shared_dir: Path) -> None:
    """A directory owned by someone else that holds other files is not given away."""
    (shared_dir / "other.conf").write_text("")
    with pytest.raises(PrivilegeError) as e:
        prepare_state_dir(shared_dir / "store.sqlite", test_user.name)
    assert str(e.value) == (
        f"{shared_dir}: owned by uid 0 and holding other files (other.conf): chown it to"
        f" {test_user.name} or give [store] path a directory of its own"
    )
    assert os.stat(shared_dir).st_uid == 0


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_prepare_refuses_a_planted_store_file(
    test_user: SystemUser, shared_dir: Path, kind: str
) -> None:
    """A store file that is a link or a special file is refused, and its target keeps its owner."""
    directory = shared_dir / "state"
    directory.mkdir()
    os.chown(directory, test_user.uid, test_user.gid)
    target = shared_dir / "precious"
    target.write_text("root's")
    store = directory / "store.sqlite"
    if kind == "symlink":
        store.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, store)
    else:
        os.mkfifo(store)
    with pytest.raises(PrivilegeError) as e:
        prepare_state_dir(store, test_user.name)
    assert str(e.value).startswith(f"{store}: not a plain store file")
    assert os.stat(target).st_uid == 0


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("file", "is not a directory"),
        ("symlink", "is a symbolic link: give [store] path the real one"),
    ],
)
def test_prepare_refuses_a_non_directory(
    test_user: SystemUser, shared_dir: Path, kind: str, problem: str
) -> None:
    """A file or a symbolic link where the store's directory should be is a clear error."""
    state = shared_dir / "state"
    if kind == "file":
        state.write_text("")
    else:
        (shared_dir / "elsewhere").mkdir()
        state.symlink_to(shared_dir / "elsewhere")
    with pytest.raises(PrivilegeError) as e:
        prepare_state_dir(state / "store.sqlite", test_user.name)
    assert str(e.value) == f"{state}: the store's directory {problem}"
    if kind == "symlink":
        assert os.stat(shared_dir / "elsewhere").st_uid == 0


@pytest.mark.parametrize(
    ("where", "blame", "problem"),
    [
        ("file/state/store.sqlite", "file", "not a directory"),
        ("/proc/1/no-such/store.sqlite", "/proc/1/no-such", "No such file or directory"),
    ],
)
def test_prepare_os_errors_are_one_line(
    test_user: SystemUser, shared_dir: Path, where: str, blame: str, problem: str
) -> None:
    """A state directory the system will not make is a one-line error naming the path."""
    (shared_dir / "file").write_text("")
    with pytest.raises(PrivilegeError) as e:
        prepare_state_dir(shared_dir / where, test_user.name)
    assert str(e.value) == f"{shared_dir / blame}: {problem}"


def test_prepare_as_another_user_without_permission(shared_dir: Path) -> None:
    """Not root, a directory it may not create is a one-line error naming the path."""
    require_root()
    result = child(
        """
        os.setresuid(65534, 65534, 65534)
        try:
            prepare_state_dir(Path(store), "root")
            result = {"error": None}
        except PrivilegeError as e:
            result = {"error": str(e)}
        """,
        store=str(shared_dir / "state" / "store.sqlite"),
    )
    assert result == {"error": f"{shared_dir / 'state'}: Permission denied"}


def test_prepare_as_another_user_only_creates(shared_dir: Path) -> None:
    """Not root: the directory is created if missing, and nothing is chowned."""
    require_root()
    shared_dir.chmod(0o777)
    store = shared_dir / "mine" / "store.sqlite"
    result = child(
        """
        os.setresuid(65534, 65534, 65534)
        prepare_state_dir(Path(store), "root")
        st = os.stat(Path(store).parent)
        result = {"owner": st.st_uid, "mode": oct(st.st_mode & 0o777)}
        """,
        store=str(store),
    )
    assert result == {"owner": 65534, "mode": "0o750"}


def test_acting_as_needs_root() -> None:
    """acting_as refuses to start when the process is not root."""
    require_root()
    result = child(
        """
        os.setresuid(65534, 65534, 65534)
        try:
            with acting_as("nobody"):
                pass
            result = {"error": None}
        except PrivilegeError as e:
            result = {"error": str(e)}
        """
    )
    assert result == {"error": "cannot act as nobody: not running as root"}


# -- the commands ---------------------------------------------------------------------------


def _proc_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and file-system uids and gids of a running process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return [int(v) for v in fields["Uid"].split()], [int(v) for v in fields["Gid"].split()]


@pytest.mark.parametrize("command", [["serve"], ["tail", "--once", "/dev/null"]])
def test_daemons_refuse_root_without_a_user(shared_dir: Path, command: list[str]) -> None:
    """As root with no [server] user, serve and tail stop with one line and exit code 2."""
    require_root()
    config = shared_dir / "postfix-mtasts.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'[store]\npath = "{shared_dir}/state/store.sqlite"\n'
    )
    done = subprocess.run(
        [*PROGRAM, *command, "-c", str(config)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "postfix-mtasts: refusing to run as root: set [server] user to the account to run as"
        " (or [server] allow_root = true)\n"
    )
    assert not (shared_dir / "state").exists()


@pytest_twisted.ensureDeferred
async def test_serve_started_as_root_runs_as_the_user(
    reactor: Any, test_user: SystemUser, shared_dir: Path
) -> None:
    """serve --user USER as root binds, then runs with every id the user's; its store's files
    are the user's, and it answers lookups."""
    require_postmap()
    port = free_port()
    store = shared_dir / "state" / "store.sqlite"
    config = shared_dir / "postfix-mtasts.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.5\n'
        f'[store]\npath = "{store}"\n'
    )
    daemon = Daemon(config, shared_dir / "daemon.log")
    daemon.start(args=("serve", "--user", test_user.name))
    try:
        await daemon.wait_until(reactor, lambda: "policies loaded" in daemon.output())
        assert daemon.process is not None
        uids, gids = _proc_ids(daemon.process.pid)
        assert uids == [test_user.uid] * 4
        assert gids == [test_user.gid] * 4
        spec = f"socketmap:inet:127.0.0.1:{port}:postfix"
        # No nameserver answers: no policy is known, so NOTFOUND (postmap: exit 1, silent).
        out, err, code = await postmap(reactor, "unreachable.example", spec)
        assert (out, err, code) == ("", "", 1), daemon.output()
        assert "_mta-sts.unreachable.example failed" in daemon.output()
    finally:
        daemon.kill()
    assert "Traceback" not in daemon.output()
    for path in store.parent.iterdir():
        assert os.stat(path).st_uid == test_user.uid, path


def test_tail_started_as_root_runs_as_the_user(test_user: SystemUser, shared_dir: Path) -> None:
    """tail --once -u USER as root reads the log and commits as the user, whose store it is."""
    log = shared_dir / "mail.log"
    log.write_text(
        "2026-11-22T10:00:00.000000+00:00 mx postfix/smtp[7]: Verified TLS connection"
        " established to mx.example.net[192.0.2.25]:25: TLSv1.3 with cipher"
        " TLS_AES_256_GCM_SHA384 (256/256 bits)\n"
        "2026-11-22T10:00:01.000000+00:00 mx postfix/smtp[7]: 4F9D83C1E2: to=<a@example.net>,"
        " relay=mx.example.net[192.0.2.25]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0,"
        " status=sent (250 2.0.0 Ok)\n"
    )
    log.chmod(0o644)
    store = shared_dir / "state" / "store.sqlite"
    config = shared_dir / "postfix-mtasts.toml"
    config.write_text(f'[store]\npath = "{store}"\n')
    done = subprocess.run(
        [*PROGRAM, "tail", "--once", "--user", test_user.name, "-c", str(config), str(log)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 sessions counted" in done.stderr, done.stderr
    assert f"running as {test_user.name}" in done.stderr
    for path in store.parent.iterdir():
        assert os.stat(path).st_uid == test_user.uid, path
