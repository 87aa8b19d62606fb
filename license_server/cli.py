"""Command line: `license-server serve`, `check-config`, `audit verify`, `audit search` and `report`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from license_server import __version__, logs
from license_server.admin.credentials import token_file_problems
from license_server.audit import search as audit_search
from license_server.audit import verify as audit_verify
from license_server.config import Config, ConfigError, describe, load_config, parse_duration
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.signatures import KeyFormatError, load_keyring
from license_server.reports import charts, machines, plan, runway, tables
from license_server.reports import seats as reports
from license_server.storage.backend import seat_reader
from license_server.storage.seats import LedgerMissingError, LedgerUnreadableError
from license_server.storage.state import StateInUseError


def _parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="license-server", description="On-premises Cryptolens license server."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the daemon"),
        ("check-config", "validate a configuration file and the keys and files it names"),
    ):
        _add_config_options(sub.add_parser(name, help=text, description=text))
    audit = sub.add_parser("audit", help="check or search the audit trail", description="The audit trail.")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    _add_verify_parser(audit_sub)
    _add_search_parser(audit_sub)
    report = sub.add_parser(
        "report",
        help="seat use and machines from the seat ledger",
        description="Reports from the seat ledger.",
    )
    report_sub = report.add_subparsers(dest="report_command", required=True)
    _add_seats_parser(report_sub)
    _add_machines_parser(report_sub)
    _add_runway_parser(report_sub)
    _add_plan_parser(report_sub)
    _add_database_parser(sub)
    return parser


def _add_database_parser(sub: Any) -> None:
    """`database move-in`: copy this node's SQLite state into the shared database, once."""
    database = sub.add_parser(
        "database", help="the shared database of several nodes", description="The shared database."
    )
    database_sub = database.add_subparsers(dest="database_command", required=True)
    text = (
        "copy this node's kept answers and seat ledger from state_dir into database.url and ship its audit"
        " trail there; stop the daemon first; running it again copies nothing twice"
    )
    _add_config_options(database_sub.add_parser("move-in", help=text, description=text))


def _add_config_options(cmd: argparse.ArgumentParser) -> None:
    """The --config and --set options every sub-command takes."""
    cmd.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML configuration file (default: $LICENSE_SERVER_CONFIG, else built-in defaults)",
    )
    cmd.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set listen.port=9000 (repeatable; beats file and environment)",
    )


def _add_verify_parser(audit_sub: Any) -> None:
    """`audit verify`: check the whole trail, optionally against checkpoints from the operational log."""
    text = "check that the audit trail is intact: exit 0 intact, 1 tampered with, 2 usage or read errors"
    cmd: argparse.ArgumentParser = audit_sub.add_parser("verify", help=text, description=text)
    _add_config_options(cmd)
    cmd.add_argument(
        "--checkpoints",
        metavar="FILE|-",
        help="the daemon's operational log (JSON lines; '-' reads stdin, e.g. from journalctl -o cat): "
        "every audit_checkpoint in it must match the trail",
    )
    cmd.add_argument(
        "--checkpoint",
        dest="checkpoint_values",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="one checkpoint given by hand (repeatable)",
    )


def _add_search_parser(audit_sub: Any) -> None:
    """`audit search`: find call and admin records by key, machine, name, address and time."""
    text = "find audit records, e.g. which machines used a license last week: --key KEY --since 7d"
    cmd: argparse.ArgumentParser = audit_sub.add_parser("search", help=text, description=text)
    _add_config_options(cmd)
    cmd.add_argument("--key", help="license key (any case, whole key)")
    cmd.add_argument("--machine", help="machine code (exact)")
    cmd.add_argument("--name", help="part of the friendly name (any case)")
    cmd.add_argument("--product", help="product id (exact)")
    cmd.add_argument("--client", metavar="IP", help="workstation address (exact)")
    cmd.add_argument(
        "--node", metavar="NAME", help="the node that answered (exact; with database.url, any node's trail)"
    )
    cmd.add_argument(
        "--action",
        choices=(*audit_search.ACTIONS, *audit_search.ADMIN_ACTIONS),
        help="what the daemon did with a call, or what an admin did in the console",
    )
    for option, edge in (("--since", "from"), ("--until", "up to, not including")):
        cmd.add_argument(
            option,
            metavar="T",
            help=f"{edge} this UTC time: 2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00:00Z, "
            "or a time ago: 7d, 12h, 30m",
        )
    cmd.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output (default: table)"
    )
    cmd.add_argument("--limit", type=int, metavar="N", help="print at most N records")


def _add_seats_parser(report_sub: Any) -> None:
    """`report seats`: peak floating seats per license and hour, day or week, against the seat limit."""
    text = "peak floating seats, machines and denials per license and hour, day or week; optionally a chart"
    cmd: argparse.ArgumentParser = report_sub.add_parser("seats", help=text, description=text)
    _add_config_options(cmd)
    _add_period_options(cmd)
    cmd.add_argument(
        "--every",
        choices=tuple(reports.EVERY),
        default="day",
        help="one row per UTC hour, day or ISO week (from Monday) (default: day); "
        "the first and last may be cut short by --since and --until",
    )
    cmd.add_argument("--product", help="product id (exact)")
    cmd.add_argument("--key", help="license key (any case, whole key)")
    cmd.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output (default: table)"
    )
    cmd.add_argument(
        "--chart",
        type=Path,
        metavar="FILE",
        help="also draw seats in use against the limit to FILE.svg or FILE.png",
    )


def _add_period_options(cmd: argparse.ArgumentParser) -> None:
    """--since and --until, as the seat and plan reports take them."""
    for option, edge in (
        ("--since", "from this UTC time (default: 30 days ago at 00:00)"),
        ("--until", "up to, not including, this UTC time (default: now)"),
    ):
        cmd.add_argument(
            option,
            metavar="T",
            help=f"{edge}: 2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00:00Z, or 7d, 12h, 30m ago",
        )


def _add_plan_parser(report_sub: Any) -> None:
    """`report plan`: the floating seats demand needed, and the node-locked seats idle machines hold."""
    text = (
        "how many seats each license needs: floating demand (denied machines included) and the seats that"
        " serve 95, 99 and 100 %% of it, hours above the limit, idle node-locked machines to free"
    )
    cmd: argparse.ArgumentParser = report_sub.add_parser("plan", help=text, description=text)
    _add_config_options(cmd)
    _add_period_options(cmd)
    cmd.add_argument("--product", help="product id (exact)")
    cmd.add_argument("--key", help="license key (any case, whole key)")
    cmd.add_argument(
        "--idle-days",
        type=int,
        metavar="N",
        help="a node-locked machine not seen for N days or more is idle (default: admin.idle_days)",
    )
    cmd.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output (default: table)"
    )


def _add_machines_parser(report_sub: Any) -> None:
    """`report machines`: every machine the ledger knows, or the idle ones whose seats could be freed."""
    text = "machines by friendly name, with when they were last seen; --idle-days N lists seats to free"
    cmd: argparse.ArgumentParser = report_sub.add_parser("machines", help=text, description=text)
    _add_config_options(cmd)
    cmd.add_argument(
        "--idle-days",
        type=int,
        metavar="N",
        help="only machines not seen for N days or more and not deactivated, longest idle first",
    )
    cmd.add_argument("--name", help="part of the friendly name (any case)")
    cmd.add_argument("--product", help="product id (exact)")
    cmd.add_argument("--key", help="license key (any case, whole key)")
    cmd.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output (default: table)"
    )


def _add_runway_parser(report_sub: Any) -> None:
    """`report runway`: until when each machine stays licensed if upstream is unreachable from now on."""
    text = "until when each machine stays licensed if upstream were unreachable from now on, and why"
    cmd: argparse.ArgumentParser = report_sub.add_parser("runway", help=text, description=text)
    _add_config_options(cmd)
    cmd.add_argument("--within", metavar="D", help="only machines that lock out within D, e.g. 24h or 7d")
    cmd.add_argument("--name", help="part of the friendly name (any case)")
    cmd.add_argument("--product", help="product id (exact)")
    cmd.add_argument("--key", help="license key (any case, whole key)")
    cmd.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output (default: table)"
    )


def _load(args: argparse.Namespace) -> Config:
    """Load the configuration the command line names, with environment overrides."""
    path = args.config
    if path is None and (env_path := os.environ.get("LICENSE_SERVER_CONFIG")):
        path = Path(env_path)
    return load_config(path, overrides=args.overrides)


def _check(config: Config) -> list[str]:
    """Problems beyond the file's syntax, each naming key and file: bad vendor keys, license files, folder."""
    try:
        keyring = load_keyring(config.public_keys)
    except KeyFormatError as exc:
        return [f"public_key: {exc}"]
    _, problems = LicenseFiles.load(config.license_files, keyring)
    return [f"license_files: {p.path}: {p.reason}" for p in problems]


def _check_config(config: Config) -> int:
    """`check-config`: the resolved settings (node name included) and, with database.url, whether it answers.

    Exit 2 for a configuration error, 1 when the database cannot be reached (a node that cannot reach its
    database cannot start, so the configuration is not ready), else 0. The database's password, from the
    URL or a file, is never printed: the URL is shown redacted, and libpq's errors never hold it.
    """
    from license_server.storage.postgres import DatabaseError, Reachability, connect_info, probe

    problems = _check(config) + token_file_problems(config.admin)
    for problem in problems:
        print(f"license-server: configuration error: {problem}", file=sys.stderr)
    if problems:
        return 2
    summary = describe(config)
    unreachable: str | None = None
    if config.database.url is not None:
        try:
            found = probe(connect_info(config.database))
        except DatabaseError as exc:  # the password file cannot be read, or is empty
            found = Reachability(False, str(exc))
        shown = summary["database"]
        assert isinstance(shown, dict)
        shown.update(reachable=found.reachable, schema_version=found.schema_version, state=found.detail)
        unreachable = None if found.reachable else found.detail
    print(json.dumps(summary, indent=2, default=str))
    if unreachable is not None:
        print(f"license-server: the database is not reachable: {unreachable}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `license-server` command."""
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"license-server: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "audit":
        return _verify(args, config) if args.audit_command == "verify" else _search(args, config)
    if args.command == "report":
        return _report(args, config)
    if args.command == "database":
        return _move_in(config)
    if args.command == "check-config":
        return _check_config(config)
    try:
        load_keyring(config.public_keys)
    except KeyFormatError as exc:
        print(f"license-server: configuration error: public_key: {exc}", file=sys.stderr)
        return 2
    logging = logs.configure(config.log.level, config.log.format)
    # Worker threads (audit writes, SQLite, log output) hand the GIL back to the event loop within 1 ms
    # instead of the default 5 ms, which would otherwise show up as latency on every waiting call.
    sys.setswitchinterval(0.001)
    try:
        from license_server.daemon import serve  # here: the report and audit commands start faster without it

        asyncio.run(serve(config, load=lambda: _load(args), call_line=logging.call_line))
    except (OSError, StateInUseError) as exc:
        print(f"license-server: cannot start: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Only the database's own error is expected here; it names the database with any password hidden.
        from license_server.storage.postgres import DatabaseError

        if not isinstance(exc, DatabaseError):
            raise
        print(f"license-server: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        logging.close()
    return 0


def _audit_folder(config: Config) -> Path | None:
    """The audit folder, or None (after saying why) when that path is something other than a folder."""
    folder = config.audit_dir
    if folder.exists() and not folder.is_dir():
        print(f"license-server: the audit path {folder} is not a folder", file=sys.stderr)
        return None
    return folder


def _verify(args: argparse.Namespace, config: Config) -> int:
    """`audit verify`: 0 intact, 1 tampered with, 2 when it cannot be checked."""
    if config.database.url is not None:
        return _verify_database(args, config)
    folder = _audit_folder(config)
    if folder is None:
        return 2
    try:
        checkpoints = _checkpoints(args)
        report = audit_verify.verify(folder, checkpoints=checkpoints)
    except ValueError as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"license-server: cannot read: {exc}", file=sys.stderr)
        return 2
    for line in audit_verify.summary(folder, report):
        print(line)
    return 0 if report.ok else 1


def _verify_database(args: argparse.Namespace, config: Config) -> int:
    """`audit verify` with a shared database: every node's chain there, against its anchored head."""
    from license_server.storage.pg_audit import PgAuditStore  # a single node never loads it
    from license_server.storage.postgres import DatabaseError, connect_info

    try:
        checkpoints = _checkpoints(args)
    except ValueError as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"license-server: cannot read: {exc}", file=sys.stderr)
        return 2
    try:
        store = PgAuditStore(connect_info(config.database))
        try:
            report = audit_verify.verify_database(store, checkpoints=checkpoints, node=config.node.name)
        finally:
            store.close()
    except DatabaseError as exc:
        print(f"license-server: cannot read the shared audit trail: {exc}", file=sys.stderr)
        return 2
    for line in audit_verify.database_summary(report):
        print(line)
    return 0 if report.ok else 1


def _checkpoints(args: argparse.Namespace) -> list[tuple[int, str]]:
    """The checkpoints given by hand and those in the named log (or stdin); ValueError for a bad one."""
    found = [_checkpoint(text) for text in args.checkpoint_values]
    if args.checkpoints is None:
        return found
    if args.checkpoints == "-":
        from_log = audit_verify.read_checkpoints(sys.stdin)
    else:
        with Path(args.checkpoints).open(encoding="utf-8", errors="replace") as log:
            from_log = audit_verify.read_checkpoints(log)
    if not from_log:
        where = "standard input" if args.checkpoints == "-" else args.checkpoints
        print(f"license-server: no audit_checkpoint lines in {where}", file=sys.stderr)
    return found + from_log


def _checkpoint(text: str) -> tuple[int, str]:
    """One SEQ:HASH checkpoint from the command line."""
    seq, _, digest = text.partition(":")
    if not seq.strip().isdigit() or re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip()) is None:
        raise ValueError(f"--checkpoint {text!r}: expected SEQ:HASH, e.g. 42:<64 hex digits>")
    return int(seq), digest.strip().lower()


def _search(args: argparse.Namespace, config: Config) -> int:
    """`audit search`: print the matching records; 0 even when none match, 2 for a bad option."""
    try:
        query = _query(args, datetime.now(UTC))
    except ValueError as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    if config.database.url is not None:
        return _search_database(args, config, query)
    folder = _audit_folder(config)
    if folder is None:
        return 2
    stats = audit_search.SearchStats()
    records: Iterable[dict[str, Any]] = audit_search.search(folder, query, stats=stats)
    if query.node is not None and query.node != config.node.name:
        records = ()  # this node's files hold this node's records only
    return _print_records(args, records, stats, shared=False)


def _search_database(args: argparse.Namespace, config: Config, query: audit_search.Query) -> int:
    """`audit search` with a shared database: the records of every node, each with its node's name."""
    from license_server.storage.pg_audit import PgAuditStore  # a single node never loads it
    from license_server.storage.postgres import DatabaseError, connect_info

    try:
        store = PgAuditStore(connect_info(config.database))
    except DatabaseError as exc:
        print(f"license-server: cannot read the shared audit trail: {exc}", file=sys.stderr)
        return 2
    stats = audit_search.SearchStats()
    try:
        return _print_records(
            args, audit_search.search_database(store, query, stats=stats), stats, shared=True
        )
    except DatabaseError as exc:
        print(f"license-server: cannot read the shared audit trail: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _print_records(
    args: argparse.Namespace,
    records: Iterable[dict[str, Any]],
    stats: audit_search.SearchStats,
    *,
    shared: bool,
) -> int:
    """Print the records in the format asked for; `shared`: with the node of each (the shared trail)."""
    if args.limit is not None:
        records = itertools.islice(records, args.limit)
    write: dict[str, Callable[[Iterable[dict[str, Any]], TextIO], int]] = {
        "table": functools.partial(audit_search.write_table, nodes=shared),
        "json": tables.write_json,
        "csv": functools.partial(audit_search.write_csv, nodes=shared),
    }
    try:
        write[args.format](records, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (head, less) has gone: nothing more to say, and nothing to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"license-server: cannot read the audit trail: {exc}", file=sys.stderr)
        return 2
    if stats.bad_lines:
        print(
            f"license-server: {stats.bad_lines} lines could not be read; run `license-server audit verify`",
            file=sys.stderr,
        )
    return 0


def _query(args: argparse.Namespace, now: datetime) -> audit_search.Query:
    """The search the options describe; ValueError for a time or limit that cannot be used."""
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit: must not be negative, got {args.limit}")
    since = audit_search.parse_time(args.since, now) if args.since else None
    until = audit_search.parse_time(args.until, now) if args.until else None
    return audit_search.Query(
        key=args.key,
        machine=args.machine,
        name=args.name,
        since=since,
        until=until,
        product=args.product,
        action=args.action,
        client=args.client,
        node=args.node,
    )


def _report(args: argparse.Namespace, config: Config) -> int:
    """`report seats` and `report machines`: 0 even when nothing matches, 2 for a bad option or no ledger."""
    if args.report_command == "runway":
        return _runway(args, config)
    if args.report_command == "plan":
        return _report_plan(args, config)
    try:
        request = _seat_query(args) if args.report_command == "seats" else _machine_query(args)
        if args.report_command == "seats" and args.chart is not None:
            charts.chart_format(args.chart)
            charts.require()
        # One snapshot of the ledger, read whole before anything is written (a pager may hold the output).
        with seat_reader(config).snapshot() as ledger:
            if isinstance(request, reports.SeatQuery):
                max_steps = charts.MAX_STEP_POINTS if args.chart is not None else 0
                found: reports.SeatReport | list[dict[str, object]] = reports.seat_report(
                    ledger, request, max_steps=max_steps
                )
            else:
                found = machines.machines(ledger, request)
    except (ValueError, LedgerMissingError) as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    except charts.ChartsUnavailableError as exc:
        print(f"license-server: --chart needs matplotlib: {exc}", file=sys.stderr)
        return 2
    except LedgerUnreadableError as exc:
        print(f"license-server: cannot read the seat ledger: {exc}", file=sys.stderr)
        return 2
    if isinstance(found, reports.SeatReport):
        return _report_seats(found, args.format, args.chart)
    rows = found
    return _print(lambda: machines.write_machines(rows, sys.stdout, args.format))


def _report_seats(report: reports.SeatReport, form: str, chart: Path | None) -> int:
    """Print the seat report and draw its chart."""
    status = _print(lambda: reports.write_seats(report, sys.stdout, form))
    if not report.licenses and form != "table":
        print(f"license-server: {reports.EMPTY_SEATS}", file=sys.stderr)
    if chart is not None:
        try:
            charts.draw_seats(report, chart)
        except OSError as exc:
            print(f"license-server: cannot write the chart: {exc}", file=sys.stderr)
            return 2
    return status


def _period(args: argparse.Namespace, now: datetime) -> tuple[float, float]:
    """--since and --until as unix seconds; ValueError for a time that cannot be used."""
    default_since = (now - timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)
    since = audit_search.parse_time(args.since, now) if args.since else default_since
    until = audit_search.parse_time(args.until, now) if args.until else now
    if until <= since:
        raise ValueError(
            f"--until ({until:%Y-%m-%dT%H:%M:%SZ}) must be later than --since ({since:%Y-%m-%dT%H:%M:%SZ})"
        )
    return since.timestamp(), until.timestamp()


def _seat_query(args: argparse.Namespace) -> reports.SeatQuery:
    """The seat report the options describe; ValueError for a time that cannot be used."""
    since, until = _period(args, datetime.now(UTC))
    return reports.SeatQuery(since=since, until=until, every=args.every, product=args.product, key=args.key)


def _report_plan(args: argparse.Namespace, config: Config) -> int:
    """`report plan`: 0 even when nothing matches (saying why), 2 for a bad option or no ledger."""
    try:
        query = _plan_query(args, config)
        with seat_reader(config).snapshot() as ledger:
            report = plan.plan_report(ledger, query)
            known = bool(plan.licenses_of(ledger, query.product, query.key))
    except (ValueError, LedgerMissingError) as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    except LedgerUnreadableError as exc:
        print(f"license-server: cannot read the seat ledger: {exc}", file=sys.stderr)
        return 2
    status = _print(lambda: plan.write_plan(report, sys.stdout, args.format))
    if not known and (query.product is not None or query.key is not None):
        asked = " and ".join(
            f"{name} {tables.printable(repr(value))}"
            for name, value in (("product", query.product), ("key", query.key))
            if value is not None
        )
        print(f"license-server: the seat ledger has no license of {asked}", file=sys.stderr)
    elif not report.licenses and args.format != "table":
        print(f"license-server: {plan.EMPTY_PLAN}", file=sys.stderr)
    return status


def _plan_query(args: argparse.Namespace, config: Config) -> plan.PlanQuery:
    """The plan the options describe; ValueError for a time or --idle-days that cannot be used."""
    if args.idle_days is not None and args.idle_days < 0:
        raise ValueError(f"--idle-days: must not be negative, got {args.idle_days}")
    now = datetime.now(UTC)
    since, until = _period(args, now)
    return plan.PlanQuery(
        since=since,
        until=until,
        now=now.timestamp(),
        idle_days=config.admin.idle_days if args.idle_days is None else args.idle_days,
        product=args.product,
        key=args.key,
    )


def _machine_query(args: argparse.Namespace) -> machines.MachineQuery:
    """The machine listing the options describe; ValueError for a negative --idle-days."""
    if args.idle_days is not None and args.idle_days < 0:
        raise ValueError(f"--idle-days: must not be negative, got {args.idle_days}")
    return machines.MachineQuery(
        now=datetime.now(UTC).timestamp(),
        idle_days=args.idle_days,
        name=args.name,
        product=args.product,
        key=args.key,
    )


def _runway(args: argparse.Namespace, config: Config) -> int:
    """`report runway`: 0 even when nothing matches, 2 for a bad option or a store that cannot be read."""
    from license_server.storage.backend import answer_reader
    from license_server.storage.interfaces import StoreUnreachableError
    from license_server.storage.postgres import DatabaseError

    now = datetime.now(UTC).timestamp()
    try:
        within = None if args.within is None else parse_duration(args.within)
    except ValueError as exc:
        print(f"license-server: --within: {exc}", file=sys.stderr)
        return 2
    if within is not None and within < 0:
        print(f"license-server: --within: must not be negative, got {args.within!r}", file=sys.stderr)
        return 2
    query = runway.RunwayQuery(now=now, within=within, name=args.name, product=args.product, key=args.key)
    try:
        files, _ = LicenseFiles.load(config.license_files, load_keyring(config.public_keys))
        found = runway.collect(answer_reader(config), seat_reader(config), files, config, now)
    except KeyFormatError as exc:
        print(f"license-server: configuration error: public_key: {exc}", file=sys.stderr)
        return 2
    except (LedgerUnreadableError, StoreUnreachableError, DatabaseError, OSError) as exc:
        print(f"license-server: cannot read the kept answers or the ledger: {exc}", file=sys.stderr)
        return 2
    chosen = runway.select(found, query)
    return _print(lambda: runway.write_runway(chosen, sys.stdout, args.format, now))


def _print(write: Callable[[], object]) -> int:
    """Run a writer to stdout; a reader that went away early (head, less) is no error."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _move_in(config: Config) -> int:
    """`database move-in`: 0 moved in (or before), 1 state in use or database failed, 2 nothing to do."""
    from license_server.storage import move_in  # here: the other commands start faster without psycopg
    from license_server.storage.postgres import DatabaseError, connect_info

    if config.database.url is None:
        print("license-server: database.url is not set: there is no database to move into", file=sys.stderr)
        return 2
    folders = [config.state_dir]
    if not config.audit_dir.is_relative_to(config.state_dir):
        folders.append(config.audit_dir)
    try:
        info = connect_info(config.database)
        with move_in.locked(*folders):
            asyncio.run(_migrated(info))
            moved = move_in.move_in(config.state_dir, info, config.node.name)
            for line in moved.lines():
                print(line)
            shipped = _ship_audit(config, info)
    except StateInUseError as exc:
        print(f"license-server: {exc}: stop the daemon on this node before moving in", file=sys.stderr)
        return 1
    except move_in.MoveInError as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    except (DatabaseError, OSError) as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 1
    print(f"  audit records shipped: {shipped}")
    return 0


async def _migrated(info: Any) -> None:
    """Create or migrate the database's schema, then let go of it."""
    from license_server.storage.postgres import Database

    database = Database(info)
    await database.open()
    await database.close()


def _ship_audit(config: Config, info: Any) -> int:
    """Join this node's audit folder to the shared trail; returns how many records were added (0 twice)."""
    from license_server.audit.shipping import ship_folder
    from license_server.storage.pg_audit import PgAuditStore

    if not config.audit_dir.is_dir():
        return 0
    store = PgAuditStore(info)
    try:
        return ship_folder(config.audit_dir, config.node.name, store)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
