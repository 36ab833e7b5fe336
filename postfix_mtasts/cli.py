"""The ``postfix-mtasts`` command line: the only module that imports the global reactor.

Exit codes: 0 success, 1 the thing asked about failed, 2 a usage or configuration error, told
in one line that names the bad key or argument.  No traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.internet.task import react
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatTime,
    globalLogBeginner,
)

from postfix_mtasts import __version__
from postfix_mtasts.config import Config, ConfigError, MetricsConfig, StoreConfig, load_config
from postfix_mtasts.privileges import (
    PrivilegeError,
    acting_as,
    drop_privileges,
    prepare_state_dir,
    should_drop,
)
from postfix_mtasts.store import Store, StoreError
from postfix_mtasts.tlsrpt.ingest import Ingest, follow_into
from postfix_mtasts.tlsrpt.tailer import LogFileError, LogFollower, StreamFollower, check_log_file

# Each command imports the rest of what it needs itself (PLC0415 below): `tail`, restarted
# by systemd and run on every log, does not load DNS, HTTPS and the policy map.
if TYPE_CHECKING:
    from postfix_mtasts.mtasts.dns import DNSClient
    from postfix_mtasts.mtasts.resolver import Answer
    from postfix_mtasts.tlsrpt.daily import DayReport

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
self_log = Logger(namespace="postfix_mtasts")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="postfix-mtasts",
        description="MTA-STS policy map and SMTP TLS reporting for Postfix.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists)",
        )

    def user_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-u", "--user", help="started as root, run as USER (instead of [server] user)"
        )

    serve = commands.add_parser("serve", help="run the socketmap policy map until stopped")
    config_option(serve)
    user_option(serve)

    query = commands.add_parser("query", help="print the reply the map gives for a domain")
    config_option(query)
    query.add_argument("--json", action="store_true", help="print the policy and its state")
    query.add_argument("domain", help="a domain or a next-hop key such as [mx.example.com]:25")

    tail = commands.add_parser("tail", help="follow the mail log and count TLS sessions")
    config_option(tail)
    user_option(tail)
    tail.add_argument("--once", action="store_true", help="read to the end, then exit")
    tail.add_argument(
        "path", nargs="?", default="/var/log/mail.log", help="the log file, or - for stdin"
    )

    report = commands.add_parser("report", help="build the TLS reports of one finished UTC day")
    config_option(report)
    report.add_argument(
        "--day",
        type=_day,
        help="the UTC day, YYYY-MM-DD (default: yesterday; with --send, each day not queued yet)",
    )
    report.add_argument("--out", metavar="DIR", type=Path, help="write each report to DIR")
    report.add_argument(
        "--send",
        action="store_true",
        help="queue the reports for their rua addresses and deliver what the outbox has due",
    )
    check = commands.add_parser("check", help="audit a domain's own MTA-STS and TLS-RPT setup")
    config_option(check)
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.add_argument("domain", help="the domain to audit, e.g. example.com")

    show = commands.add_parser("show", help="summarise TLS reports you received")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page")
    show.add_argument(
        "files", nargs="+", metavar="FILE", help=".json, .json.gz, .eml, a Maildir or an mbox"
    )
    return parser


def _day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day in the form YYYY-MM-DD: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``postfix-mtasts`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "show":  # reads files only: no configuration
        from postfix_mtasts.tlsrpt import show  # noqa: PLC0415 (only this command needs it)

        sys.exit(show.main(args.files, as_json=args.json, html=args.html, out=sys.stdout,
                           err=sys.stderr))  # fmt: skip
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as e:
        _fail(EXIT_USAGE, str(e))
    # Pinned before any switch of user: the default path depends on who runs.
    store = StoreConfig(path=str(config.store_path()))
    config = dataclasses.replace(config, store=store)
    if getattr(args, "user", None):
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, user=args.user)
        )
    handlers = {"serve": _serve, "query": _query, "tail": _tail, "report": _report, "check": _check}
    handler = handlers[args.command]
    try:
        code = handler(config, args)
    except (ConfigError, PrivilegeError) as e:
        _fail(EXIT_USAGE, str(e))
    except StoreError as e:
        _fail(EXIT_FAILED, str(e))
    except KeyboardInterrupt:
        code = EXIT_FAILED
    sys.exit(code)


DEFAULT_CONFIG = "/etc/postfix-mtasts/postfix-mtasts.toml"


def _config_path(given: str | None) -> str | None:
    """``-c FILE``, else ``$POSTFIX_MTASTS_CONFIG``, else :data:`DEFAULT_CONFIG` if it exists;
    ``None``: the defaults."""
    path = given or os.environ.get("POSTFIX_MTASTS_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG):
        return DEFAULT_CONFIG
    return path


def _fail(code: int, message: str) -> NoReturn:
    print(f"postfix-mtasts: {message}", file=sys.stderr)
    sys.exit(code)


def _start_logging(level: LogLevel) -> None:
    """Log to standard error: with timestamps on a terminal, without them under journald."""
    journald = "JOURNAL_STREAM" in os.environ
    stamp: list[Any] = [object(), ""]  # the last second formatted, and how

    def line(event: dict[str, Any]) -> str | None:
        text = formatEvent(event)
        if not text:
            return None
        lvl = event.get("log_level", LogLevel.info).name
        if "log_failure" in event:
            text += "\n" + event["log_failure"].getTraceback()
        if journald:
            return f"{lvl}: {text}\n"
        when = event.get("log_time")
        second = int(when) if when is not None else None
        if second != stamp[0]:
            stamp[:] = second, formatTime(when)
        return f"{stamp[1]} {lvl}: {text}\n"

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    # Twisted's own chatter ("UDP Port 5 Closed", "Starting factory") only from warnings up.
    predicate.setLogLevelForNamespace("log_legacy", max(level, LogLevel.warn))
    predicate.setLogLevelForNamespace("twisted", max(level, LogLevel.warn))
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, line), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _switch_user(config: Config, *, daemon: bool) -> bool:
    """Whether to become ``[server] user`` (its state directory made ready for it).

    As root, the daemons (``serve``, ``tail``) refuse to run without a user unless
    ``[server] allow_root`` (:class:`PrivilegeError`); one-shot commands then run as they are.
    """
    server = config.server
    if not daemon and not server.user:
        return False
    if not should_drop(server.user, server.group or None, allow_root=server.allow_root):
        return False
    prepare_state_dir(config.store_path(), server.user, server.group or None)
    return True


def _drop(config: Config) -> None:
    drop_privileges(config.server.user, config.server.group or None)


def _serve(config: Config, args: argparse.Namespace) -> int:
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when needed)

    from postfix_mtasts.service import PolicyMap, StartError  # noqa: PLC0415

    _start_logging(LogLevel.info)
    switch = _switch_user(config, daemon=True)
    # The store's files are created as the user; the listeners are bound as root.
    acting = acting_as(config.server.user, config.server.group or None) if switch else None
    with acting or contextlib.nullcontext():
        try:
            policy_map = PolicyMap(config, reactor)
        except StartError as e:
            _fail(EXIT_FAILED, str(e))
    failed: list[str] = []

    async def start() -> None:
        try:
            await policy_map.listen(bound=(lambda: _drop(config)) if switch else None)
        except (StartError, PrivilegeError) as e:
            failed.append(str(e))
            policy_map.store.close()
            reactor.stop()
            return
        # What start-up made (the modules, the policies loaded) lives as long as the process:
        # the collector need not walk it again and again.
        gc.freeze()

    reactor.callWhenRunning(lambda: ensureDeferred(start()))
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: policy_map.stopService() if policy_map.running else None
    )
    _raise_file_limit(policy_map.factory.max_connections)
    reactor.run()
    if failed:
        print(f"postfix-mtasts: cannot start: {failed[0]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _raise_file_limit(connections: int) -> None:
    """Room for every allowed connection plus outbound DNS and HTTPS sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _query(config: Config, args: argparse.Namespace) -> int:
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when needed)

    from postfix_mtasts.service import make_resolver  # noqa: PLC0415

    _start_logging(LogLevel.warn)
    if _switch_user(config, daemon=False):
        _drop(config)
    store = Store(config.store_path())
    resolver = make_resolver(config, reactor, store)

    async def run(_reactor: Any) -> int:
        try:
            answer = await resolver.query(args.domain)
        except StoreError as e:
            print(f"postfix-mtasts: {e}", file=sys.stderr)
            return EXIT_FAILED
        payload = answer.reply[answer.reply.index(b":") + 1 : -1].decode()
        if args.json:
            print(json.dumps(_answer_json(answer, payload, store), indent=2))
        else:
            print(payload)
        return EXIT_FAILED if payload.startswith("TEMP") else EXIT_OK

    try:
        return _react(run)
    finally:
        store.close()


def _check(config: Config, args: argparse.Namespace) -> int:
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when needed)

    from postfix_mtasts import check  # noqa: PLC0415 (only this command needs it)

    _start_logging(LogLevel.warn)
    return _react(lambda _: check.main(reactor, config, args.domain, args.json, sys.stdout))


def _react(main: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``main(reactor)`` on the reactor until it returns its exit code (1 if it fails)."""
    result: list[int] = []

    async def run(reactor: Any) -> None:
        result.append(await main(reactor))

    try:
        react(lambda r: ensureDeferred(run(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILED
    return result[0] if result else EXIT_FAILED


def _tail(config: Config, args: argparse.Namespace) -> int:
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when needed)

    _start_logging(LogLevel.info)
    dkim_key = None
    if config.tlsrpt.send:
        from postfix_mtasts.tlsrpt.outbox import read_dkim_key  # noqa: PLC0415

        dkim_key = read_dkim_key(config)  # before the switch: root may own the key
    if _switch_user(config, daemon=True):
        _drop(config)
    source = "-" if args.path == "-" else os.path.abspath(args.path)
    if source != "-":  # checked as the user that reads it
        try:
            exists = check_log_file(source)
        except LogFileError as e:
            _fail(EXIT_FAILED, str(e))
        if args.once and not exists:
            _fail(EXIT_FAILED, f"{source}: no such file")  # following, it is waited for
    store = Store(config.store_path())
    ingest = Ingest(store, config.tlsrpt, source)
    follower: LogFollower | StreamFollower
    if source == "-":
        follower = StreamFollower(sys.stdin.buffer.fileno())
    else:
        follower = LogFollower(source, ingest.position)
    progress = _Progress(follower, ingest)

    def ended() -> None:  # all the input is read: count the sessions held back
        ingest.caught_up()
        ingest.finish()
        progress.report(final=True)

    try:
        if args.once:
            for lines, position in follower.read_available():
                ingest.handle(lines, position)
                progress.maybe_report()
            ended()
            return EXIT_OK
        if isinstance(follower, StreamFollower):
            os.set_blocking(sys.stdin.buffer.fileno(), False)

        async def run(_reactor: Any) -> None:
            outbox = schedule = metrics = None
            if config.tlsrpt.send:
                from postfix_mtasts.tlsrpt.outbox import DailySchedule, Outbox  # noqa: PLC0415

                outbox = Outbox(reactor, store, config, _dns(config, reactor), dkim_key=dkim_key)
                schedule = DailySchedule(
                    reactor,
                    store,
                    config,
                    outbox,
                    ingest.finish,
                    read_through=lambda: ingest.read_through,
                )
            if config.metrics.tail:
                from postfix_mtasts import metrics as m  # noqa: PLC0415

                where = MetricsConfig.loopback(config.metrics.tail)
                registry = m.make_registry(m.reporter_metrics(follower, ingest, outbox, schedule))
                try:
                    metrics = await m.listen_metrics(reactor, where, registry)
                except Exception as e:  # noqa: BLE001 (CannotListenError, OSError, ...)
                    print(f"postfix-mtasts: cannot start: [metrics] tail: {e}", file=sys.stderr)
                    raise SystemExit(EXIT_FAILED) from None

            def start_schedule() -> None:  # once the backlog is read
                if schedule is not None and not schedule.running:
                    schedule.start()

            try:
                await follow_into(
                    reactor, follower, ingest, progress.handle, caught_up=start_schedule
                )
            finally:
                if schedule is not None:
                    schedule.stop()
                if metrics is not None:
                    await maybeDeferred(metrics.stopListening)

        react(lambda r: ensureDeferred(run(r)))  # exits through SystemExit
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILED
        if follower.finished:  # standard input ended, rather than a stop
            ended()
        return EXIT_OK
    finally:
        if isinstance(follower, LogFollower):
            follower.close()
        store.close()


class _Progress:
    """Reports reading progress every few seconds while a backlog is read."""

    INTERVAL = 5.0

    def __init__(self, follower: LogFollower | StreamFollower, ingest: Ingest) -> None:
        self._follower = follower
        self._ingest = ingest
        self._next = time.monotonic() + self.INTERVAL

    def handle(self, lines: list[bytes], position: Any) -> None:
        self._ingest.handle(lines, position)
        self.maybe_report()

    def maybe_report(self) -> None:
        if time.monotonic() >= self._next:
            self.report()
            self._next = time.monotonic() + self.INTERVAL

    def report(self, final: bool = False) -> None:
        f = self._follower
        tracker = self._ingest.tracker
        self_log.info(
            "{what} {lines} lines ({mb:.1f} MB), {sessions} sessions counted,"
            " {unparsed} lines not understood",
            what="read" if final else "reading:",
            lines=f.lines_read,
            mb=f.bytes_read / 1e6,
            sessions=self._ingest.sessions,
            unparsed=tracker.unparsed,
        )


def _report(config: Config, args: argparse.Namespace) -> int:
    from postfix_mtasts.mtasts.resolver import iso_utc  # noqa: PLC0415
    from postfix_mtasts.tlsrpt.daily import day_reports  # noqa: PLC0415
    from postfix_mtasts.tlsrpt.ingest import log_read_through  # noqa: PLC0415
    from postfix_mtasts.tlsrpt.outbox import (  # noqa: PLC0415
        day_ready,
        days_to_queue,
        prune,
        queue_day,
        queue_days,
        read_dkim_key,
    )

    config.require_reporting()
    _start_logging(LogLevel.warn)
    today = datetime.datetime.now(datetime.UTC).date()
    day = args.day or today - datetime.timedelta(days=1)
    if day >= today:
        _fail(EXIT_USAGE, f"--day: {day} has not finished yet (UTC)")
    dkim_key = read_dkim_key(config) if args.send else None
    if _switch_user(config, daemon=False):
        _drop(config)
    store = Store(config.store_path())
    try:
        now = time.time()
        if not args.send:
            return _write_reports(day_reports(store, config.tlsrpt, day, now), args.out, day)
        # Without --day, every day not queued yet, as the tail service's schedule does.
        days = [args.day] if args.day else days_to_queue(store, now)
        read_through = log_read_through(store)
        ready = [d for d in days if day_ready(d, read_through)]  # the earliest days first
        why = (  # for those whose lines are not all counted: a later run queues them
            "no mail log has been read yet"
            if read_through is None
            else f"the mail log has been read through {iso_utc(read_through)} only"
        )
        for waiting in days[len(ready) :]:
            print(f"{waiting}: not queued yet: {why}; a later run queues it")
        if args.day:
            built = [(d, *queue_day(store, config, d, now)) for d in ready]
            prune(store, now)
        else:
            built = queue_days(store, config, ready, now)
        code = EXIT_OK
        for built_day, reports, _ in built:
            code = max(code, _write_reports(reports, args.out, built_day))
        shown = [d for d, _, _ in built] or [day]
        return max(code, _send(config, store, shown, dkim_key))
    finally:
        store.close()


def _write_reports(reports: list[DayReport], out: Path | None, day: datetime.date) -> int:
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for r in reports:
                (out / r.filename).write_bytes(r.gz)
        except OSError as e:
            _fail(EXIT_FAILED, f"--out: {e.strerror or e}: {e.filename or out}")
    for r in reports:
        sessions = sum(
            p["summary"]["total-successful-session-count"]
            + p["summary"]["total-failure-session-count"]
            for p in r.report["policies"]
        )
        failed = sum(p["summary"]["total-failure-session-count"] for p in r.report["policies"])
        print(f"{r.policy_domain}: {sessions} sessions, {failed} failed: {r.filename}")
    if not reports:
        print(f"no sessions were counted on {day}")
    return EXIT_OK


def _send(config: Config, store: Store, days: list[datetime.date], dkim_key: bytes | None) -> int:
    """Deliver what the outbox has due; 1 when one of ``days``' reports was given up."""
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when needed)

    from postfix_mtasts.tlsrpt.outbox import Outbox, outcome_lines  # noqa: PLC0415

    async def run(_reactor: Any) -> int:
        outbox = Outbox(reactor, store, config, _dns(config, reactor), dkim_key=dkim_key)
        await outbox.deliver_due()
        return EXIT_OK

    code = _react(run)
    rows = [row for day in days for row in store.outbox(day.isoformat())]
    if rows:
        print(outcome_lines(rows))
    if any(r.state in ("failed", "expired") for r in rows):
        return EXIT_FAILED
    return code


def _dns(config: Config, reactor: Any) -> DNSClient:
    from postfix_mtasts.mtasts.dns import DNSClient, parse_nameservers  # noqa: PLC0415

    return DNSClient(reactor, parse_nameservers(config.dns.nameservers), config.dns.timeout)


def _answer_json(answer: Answer, payload: str, store: Store) -> dict[str, Any]:
    from postfix_mtasts.mtasts.resolver import iso_utc  # noqa: PLC0415

    out: dict[str, Any] = {"reply": payload, "domain": answer.domain, "source": answer.source}
    entry = answer.entry
    if entry is not None:
        p = entry.policy
        out["policy"] = {
            "id": entry.txt_id,
            "mode": p.mode,
            "mx": list(p.mx),
            "max_age": p.max_age,
            "lines": list(p.lines),
        }
        out["fetched_at"] = iso_utc(entry.fetched_at)
        out["expires_at"] = iso_utc(entry.expires_at)
    else:
        out["policy"] = None
    failure = store.last_failure(answer.domain) if answer.domain else None
    out["last_failure"] = (
        None
        if failure is None
        else {"at": iso_utc(failure.at), "type": failure.failure_type, "detail": failure.detail}
    )
    return out


if __name__ == "__main__":
    main()
