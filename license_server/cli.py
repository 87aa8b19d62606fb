"""Command line: `license-server serve`, `check-config`, `audit verify`, `audit search` and `report`."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from license_server import __version__, logs
from license_server.admin.credentials import token_file_problems
from license_server.audit import search as audit_search
from license_server.audit import verify as audit_verify
from license_server.config import Config, ConfigError, describe, load_config
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.signatures import KeyFormatError, load_keyring
from license_server.reports import charts, machines, tables
from license_server.reports import seats as reports
from license_server.storage.seats import LedgerMissingError, LedgerUnreadableError, SqliteSeatReader
from license_server.storage.state import StateFolder, StateInUseError


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
    return parser


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
    for option, edge in (
        ("--since", "from this UTC time (default: 30 days ago at 00:00)"),
        ("--until", "up to, not including, this UTC time (default: now)"),
    ):
        cmd.add_argument(
            option,
            metavar="T",
            help=f"{edge}: 2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00:00Z, or 7d, 12h, 30m ago",
        )
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
    if args.command == "check-config":
        problems = _check(config) + token_file_problems(config.admin)
        for problem in problems:
            print(f"license-server: configuration error: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(json.dumps(describe(config), indent=2, default=str))
        return 0
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
    folder = _audit_folder(config)
    if folder is None:
        return 2
    try:
        query = _query(args, datetime.now(UTC))
    except ValueError as exc:
        print(f"license-server: {exc}", file=sys.stderr)
        return 2
    stats = audit_search.SearchStats()
    records: Iterable[dict[str, Any]] = audit_search.search(folder, query, stats=stats)
    if args.limit is not None:
        records = itertools.islice(records, args.limit)
    write = {
        "table": audit_search.write_table,
        "json": tables.write_json,
        "csv": audit_search.write_csv,
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
    )


def _report(args: argparse.Namespace, config: Config) -> int:
    """`report seats` and `report machines`: 0 even when nothing matches, 2 for a bad option or no ledger."""
    try:
        request = _seat_query(args) if args.report_command == "seats" else _machine_query(args)
        if args.report_command == "seats" and args.chart is not None:
            charts.chart_format(args.chart)
            charts.require()
        # One snapshot of the ledger, read whole before anything is written (a pager may hold the output).
        with SqliteSeatReader(StateFolder(config.state_dir).seats).snapshot() as ledger:
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


def _seat_query(args: argparse.Namespace) -> reports.SeatQuery:
    """The seat report the options describe; ValueError for a time that cannot be used."""
    now = datetime.now(UTC)
    default_since = (now - timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)
    since = audit_search.parse_time(args.since, now) if args.since else default_since
    until = audit_search.parse_time(args.until, now) if args.until else now
    if until <= since:
        raise ValueError(
            f"--until ({until:%Y-%m-%dT%H:%M:%SZ}) must be later than --since ({since:%Y-%m-%dT%H:%M:%SZ})"
        )
    return reports.SeatQuery(
        since=since.timestamp(), until=until.timestamp(), every=args.every, product=args.product, key=args.key
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


def _print(write: Callable[[], object]) -> int:
    """Run a writer to stdout; a reader that went away early (head, less) is no error."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
