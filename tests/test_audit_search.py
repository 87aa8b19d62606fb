"""Tests for `audit search`: every filter, time bounds, skipping files by name, and the output formats."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from license_server.audit import chain
from license_server.audit.search import (
    Query,
    SearchStats,
    parse_time,
    search,
    write_csv,
    write_table,
)
from license_server.cli import main
from license_server.reports.tables import write_json
from tests.audit_builder import TrailBuilder

KEY_A = "AAAAA-BBBBB-CCCCC-DDDDD"
KEY_B = "EEEEE-FFFFF-GGGGG-HHHHH"
DAYS = range(1, 8)  # one file a day, 2026-11-01 to 2026-11-07


def day(number: int, hour: int = 0, minute: int = 0) -> datetime:
    """A UTC time on 2026-11-<number>."""
    return datetime(2026, 11, number, hour, minute, tzinfo=UTC)


def build(folder: Path) -> TrailBuilder:
    """A week of trail, a file a day: a start and three calls each day, and an admin action on day 3."""
    trail = TrailBuilder(folder)
    for number in DAYS:
        trail.rotate()
        trail.add(chain.START, at=day(number).timestamp(), version="0.1.0", pid=number)
        trail.call(
            at=day(number, 9).timestamp(),
            key=KEY_A,
            machine="ws-01",
            friendly_name="Lab PC 1",
            client="10.0.0.1",
        )
        trail.call(
            at=day(number, 10).timestamp(),
            key=KEY_B,
            machine="ws-02",
            friendly_name="Office Laptop",
            client="10.0.0.2",
            product_id="42",
            action="kept_fresh",
        )
        trail.call(
            at=day(number, 11).timestamp(),
            key=KEY_A,
            machine="ws-03",
            friendly_name="lab pc 3",
            client="10.0.0.3",
            action="refused",
            status=403,
            result=1,
            message="Blocked",
        )
        if number == 3:
            trail.add(chain.ADMIN, at=day(3, 12).timestamp(), actor="root", action="reload", detail="config")
    trail.write_head()
    return trail


def found(folder: Path, **filters: Any) -> list[dict[str, Any]]:
    """Everything a search with these filters yields."""
    return list(search(folder, Query(**filters)))


def machines(records: list[dict[str, Any]]) -> list[str]:
    """The machine of each record, in order."""
    return [record.get("machine", "(admin)") for record in records]


# --- filters --------------------------------------------------------------------------------------


def test_no_filter_finds_every_call_and_admin_record_in_chain_order(tmp_path: Path) -> None:
    trail = build(tmp_path)
    records = found(tmp_path)
    assert len(records) == 3 * len(DAYS) + 1
    assert [record["seq"] for record in records] == [
        placed.seq for placed in trail.placed if placed.record["type"] in ("call", "admin")
    ]
    assert records[0] == trail.at(2).record


@pytest.mark.parametrize("key", [KEY_A, KEY_A.lower(), "aaaaa-bbbbb-CCCCC-ddddd"])
def test_key_matches_whole_keys_in_any_case(tmp_path: Path, key: str) -> None:
    build(tmp_path)
    records = found(tmp_path, key=key)
    assert machines(records) == ["ws-01", "ws-03"] * len(DAYS)
    assert {record["key"] for record in records} == {KEY_A}


@pytest.mark.parametrize("key", [KEY_A[:5], KEY_A + "X", "AAAAA"])
def test_key_does_not_match_part_of_a_key(tmp_path: Path, key: str) -> None:
    build(tmp_path)
    assert found(tmp_path, key=key) == []


def test_machine_matches_exactly(tmp_path: Path) -> None:
    build(tmp_path)
    assert machines(found(tmp_path, machine="ws-02")) == ["ws-02"] * len(DAYS)
    assert found(tmp_path, machine="WS-02") == []
    assert found(tmp_path, machine="ws-0") == []


@pytest.mark.parametrize(
    ("name", "expected"), [("lab pc", ["ws-01", "ws-03"]), ("LAPTOP", ["ws-02"]), ("PC 3", ["ws-03"])]
)
def test_name_matches_part_of_the_friendly_name_in_any_case(
    tmp_path: Path, name: str, expected: list[str]
) -> None:
    build(tmp_path)
    assert machines(found(tmp_path, name=name)) == expected * len(DAYS)


def test_product_action_and_client_match_exactly(tmp_path: Path) -> None:
    build(tmp_path)
    assert machines(found(tmp_path, product="42")) == ["ws-02"] * len(DAYS)
    assert found(tmp_path, product="4") == []
    assert machines(found(tmp_path, action="refused")) == ["ws-03"] * len(DAYS)
    assert machines(found(tmp_path, client="10.0.0.1")) == ["ws-01"] * len(DAYS)
    assert found(tmp_path, client="10.0.0") == []


def test_filters_combine(tmp_path: Path) -> None:
    build(tmp_path)
    records = found(tmp_path, key=KEY_A, action="refused", since=day(2), until=day(4))
    assert [(record["machine"], record["time"][:10]) for record in records] == [
        ("ws-03", "2026-11-02"),
        ("ws-03", "2026-11-03"),
    ]


def test_admin_records_are_found_unless_a_call_field_is_asked_for(tmp_path: Path) -> None:
    build(tmp_path)
    assert [record["type"] for record in found(tmp_path, since=day(3, 11), until=day(3, 13))] == [
        "call",
        "admin",
    ]
    assert [record["type"] for record in found(tmp_path, key=KEY_A, since=day(3), until=day(4))] == [
        "call",
        "call",
    ]


def test_a_missing_folder_has_nothing(tmp_path: Path) -> None:
    assert found(tmp_path / "nowhere", key=KEY_A) == []


# --- time -----------------------------------------------------------------------------------------


def test_since_is_inclusive_and_until_exclusive(tmp_path: Path) -> None:
    build(tmp_path)
    at_ten = found(tmp_path, since=day(3, 10), until=day(3, 11))
    assert machines(at_ten) == ["ws-02"]
    assert machines(found(tmp_path, since=day(3, 10), until=day(3, 10))) == []
    assert machines(found(tmp_path, since=day(3, 10, 1), until=day(3, 11, 1))) == ["ws-03"]


def test_times_without_a_zone_are_utc(tmp_path: Path) -> None:
    build(tmp_path)
    naive = found(tmp_path, since=datetime(2026, 11, 3, 10), until=datetime(2026, 11, 3, 11))
    assert machines(naive) == ["ws-02"]
    zoned = datetime(2026, 11, 3, 12, tzinfo=timezone(timedelta(hours=1)))  # 11:00 UTC
    assert machines(found(tmp_path, since=zoned, until=day(3, 12))) == ["ws-03"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T08:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),
        ("2026-11-01T08:00:00Z", datetime(2026, 11, 1, 8, tzinfo=UTC)),
        ("2026-11-01T10:00:00+02:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),
        (" 2026-11-01 08:00 ", datetime(2026, 11, 1, 8, tzinfo=UTC)),
    ],
)
def test_parse_time_reads_dates_and_times(text: str, expected: datetime) -> None:
    assert parse_time(text, datetime.now(UTC)) == expected


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("2w", timedelta(14)),
    ],
)
def test_parse_time_reads_times_ago(text: str, ago: timedelta) -> None:
    now = datetime(2026, 11, 28, 8, 40, tzinfo=UTC)
    assert parse_time(text, now) == now - ago


@pytest.mark.parametrize("text", ["", "yesterday", "7y", "-7d", "2026-13-01", "99999999999999d"])
def test_parse_time_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="expected a time like"):
        parse_time(text, datetime.now(UTC))


# --- skipping files -------------------------------------------------------------------------------


class OpenWatch:
    """Records the paths the process opens while active, through a Python audit hook (the OS view)."""

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        """Note every file opened while watching."""
        if self.active and event == "open" and isinstance(args[0], str | os.PathLike):
            self.paths.append(os.fspath(args[0]))

    @contextmanager
    def watching(self) -> Iterator[list[str]]:
        """Watch for opens inside the block; the list holds what was opened."""
        self.paths = []
        self.active = True
        try:
            yield self.paths
        finally:
            self.active = False


@pytest.fixture(scope="session")
def open_watch() -> OpenWatch:
    """One audit hook for the session: hooks cannot be removed once added."""
    watch = OpenWatch()
    sys.addaudithook(watch.hook)
    return watch


def garble(path: Path) -> None:
    """Make a file unreadable as a trail: anything that reads it counts bad lines."""
    path.write_bytes(b"\x00garbage that is not JSON\n" * 100)


def test_files_outside_the_time_range_are_not_opened(tmp_path: Path, open_watch: OpenWatch) -> None:
    trail = build(tmp_path)
    files = trail.files()
    garble(files[1])  # 2026-11-02
    stats = SearchStats()
    with open_watch.watching() as opened:
        records = list(search(tmp_path, Query(key=KEY_A, since=day(5, 8)), stats=stats))
    assert [record["time"][:10] for record in records] == [
        "2026-11-05",
        "2026-11-05",
        "2026-11-06",
        "2026-11-06",
    ] + ["2026-11-07"] * 2
    assert sorted(opened) == [str(path) for path in files[4:]]
    assert (stats.files_read, stats.files_skipped, stats.bad_lines) == (3, 4, 0)


def test_the_same_search_over_the_garbled_file_does_open_it(tmp_path: Path, open_watch: OpenWatch) -> None:
    trail = build(tmp_path)
    files = trail.files()
    garble(files[1])
    stats = SearchStats()
    with open_watch.watching() as opened:
        records = list(search(tmp_path, Query(since=day(1, 12)), stats=stats))
    assert str(files[1]) in opened
    assert stats.bad_lines == 100
    assert "2026-11-02" not in {record["time"][:10] for record in records}


def test_files_after_until_are_not_opened(tmp_path: Path, open_watch: OpenWatch) -> None:
    trail = build(tmp_path)
    files = trail.files()
    for path in files[3:]:
        garble(path)
    stats = SearchStats()
    with open_watch.watching() as opened:
        records = list(search(tmp_path, Query(until=day(3, 10, 30)), stats=stats))
    assert sorted(opened) == [str(path) for path in files[:3]]
    assert len(records) == 3 + 3 + 2
    assert stats.bad_lines == 0


def test_a_file_is_read_when_its_successor_starts_just_after_since(tmp_path: Path) -> None:
    build(tmp_path)
    stats = SearchStats()
    # day 2's file ends when day 3's starts, at 00:00: its last moments may hold records from 23:59:30 on
    list(search(tmp_path, Query(since=day(3) - timedelta(seconds=30)), stats=stats))
    assert (stats.files_skipped, stats.files_read) == (1, 6)


def test_a_clock_stepped_back_does_not_hide_a_file(tmp_path: Path) -> None:
    trail = TrailBuilder(tmp_path)
    trail.call(at=day(5, 10).timestamp(), machine="before-the-step")
    trail.rotate()
    trail.call(at=day(1, 10).timestamp(), machine="after-the-step")
    assert machines(found(tmp_path, since=day(4))) == ["before-the-step"]


def test_a_torn_last_line_is_passed_over_and_bad_lines_counted(tmp_path: Path) -> None:
    trail = build(tmp_path)
    with trail.files()[2].open("ab") as stream:
        stream.write(b"not json\n")
    with trail.files()[-1].open("ab") as stream:
        stream.write(b'{"seq":30,"time":"2026-11-07T')
    stats = SearchStats()
    records = list(search(tmp_path, Query(), stats=stats))
    assert len(records) == 3 * len(DAYS) + 1
    assert stats.bad_lines == 1


# --- output ---------------------------------------------------------------------------------------


def test_table_has_a_header_and_aligned_columns(tmp_path: Path) -> None:
    build(tmp_path)
    out = io.StringIO()
    assert write_table(found(tmp_path, since=day(3), until=day(4)), out) == 4
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "time",
        "client",
        "api_method",
        "key",
        "machine",
        "friendly_name",
        "action",
        "result",
        "message",
        "latency_ms",
    ]
    assert len(lines) == 5
    column = lines[0].index("machine")
    assert [line[column : column + 5] for line in lines[1:]] == ["ws-01", "ws-02", "ws-03", "-    "]
    assert lines[3].split()[-3:] == ["1", "Blocked", "12.5"]
    assert "(admin)" in lines[4]
    assert "reload" in lines[4]
    assert '{"detail":"config"}' in lines[4]


def test_table_cuts_long_messages_and_escapes_control_characters(tmp_path: Path) -> None:
    trail = TrailBuilder(tmp_path)
    trail.call(message="x" * 100, friendly_name="evil\x1b[31mred\nname")
    out = io.StringIO()
    write_table(found(tmp_path), out)
    row = out.getvalue().splitlines()[1]
    assert "x" * 39 + "…" in row
    assert "x" * 40 not in row
    assert "\x1b" not in out.getvalue()
    assert "evil\\x1b[31mred\\nname" in row


def test_table_says_when_nothing_matches() -> None:
    out = io.StringIO()
    assert write_table([], out) == 0
    assert out.getvalue() == "(no matching records)\n"


def test_json_is_one_record_per_line(tmp_path: Path) -> None:
    build(tmp_path)
    records = found(tmp_path, key=KEY_B)
    out = io.StringIO()
    assert write_json(records, out) == len(DAYS)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == records


def test_csv_has_every_call_field(tmp_path: Path) -> None:
    build(tmp_path)
    records = found(tmp_path, since=day(3), until=day(4))
    out = io.StringIO()
    assert write_csv(records, out) == 4
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == ["seq", "time", "type", *chain.CALL_FIELDS, "actor", "details"]
    assert rows[0]["key"] == KEY_A
    assert rows[0]["failure"] == ""
    assert rows[2]["result"] == "1"
    assert rows[2]["latency_ms"] == "12.5"
    assert (rows[3]["type"], rows[3]["actor"], rows[3]["action"]) == ("admin", "root", "reload")
    assert json.loads(rows[3]["details"]) == {"detail": "config"}


# --- the command ----------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line; its exit code, stdout and stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def recent_trail(folder: Path) -> None:
    """Calls for KEY_A ten days ago, three days ago and an hour ago, from three machines; another key too."""
    now = datetime.now(UTC)
    trail = TrailBuilder(folder)
    trail.call(at=(now - timedelta(days=10)).timestamp(), key=KEY_A, machine="old-box", client="10.0.0.9")
    trail.rotate()
    trail.call(at=(now - timedelta(days=3)).timestamp(), key=KEY_A, machine="ws-01", client="10.0.0.1")
    trail.call(at=(now - timedelta(days=2)).timestamp(), key=KEY_B, machine="ws-07", client="10.0.0.7")
    trail.call(
        at=(now - timedelta(hours=1)).timestamp(),
        key=KEY_A,
        machine="ws-02",
        client="10.0.0.2",
        action="refused",
        result=1,
        message="Blocked",
    )
    trail.write_head()


def test_cli_which_machines_used_a_license_last_week(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recent_trail(tmp_path / "audit")
    code, out, err = run(
        ["audit", "search", "--set", f"state_dir={tmp_path}", "--key", KEY_A.lower(), "--since", "7d"], capsys
    )
    assert code == 0
    assert err == ""
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["time", "client", "api_method", "key", "machine"]
    assert [row.split()[1:5] for row in rows] == [
        ["10.0.0.1", "key/activate", KEY_A, "ws-01"],
        ["10.0.0.2", "key/activate", KEY_A, "ws-02"],
    ]
    assert rows[0].split()[-3:] == ["forwarded", "0", "12.5"]
    assert rows[1].split()[-4:] == ["refused", "1", "Blocked", "12.5"]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_cli_formats_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    build(tmp_path / "audit")
    argv = ["audit", "search", "--set", f"state_dir={tmp_path}", "--machine", "ws-02", "--format", fmt]
    code, out, _ = run([*argv, "--limit", "3"], capsys)
    assert code == 0
    lines = out.splitlines()
    if fmt == "json":
        assert [json.loads(line)["machine"] for line in lines] == ["ws-02"] * 3
    else:
        assert lines[0].startswith("seq,time,type,request_id,client")
        assert len(lines) == 4


def test_cli_every_filter_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build(tmp_path / "audit")
    argv = [
        "audit",
        "search",
        "--set",
        f"audit.path={tmp_path / 'audit'}",
        "--key",
        KEY_B,
        "--machine",
        "ws-02",
        "--name",
        "laptop",
        "--product",
        "42",
        "--client",
        "10.0.0.2",
        "--action",
        "kept_fresh",
        "--since",
        "2026-11-03",
        "--until",
        "2026-11-05T00:00:00Z",
        "--format",
        "json",
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert [json.loads(line)["time"][:10] for line in out.splitlines()] == ["2026-11-03", "2026-11-04"]


def test_cli_no_match_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build(tmp_path / "audit")
    code, out, _ = run(["audit", "search", "--set", f"state_dir={tmp_path}", "--key", "NOPE"], capsys)
    assert (code, out) == (0, "(no matching records)\n")


def test_cli_warns_about_unreadable_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = build(tmp_path / "audit")
    with trail.files()[0].open("ab") as stream:
        stream.write(b"garbage\n")
    code, _, err = run(["audit", "search", "--set", f"state_dir={tmp_path}"], capsys)
    assert code == 0
    assert "1 lines could not be read; run `license-server audit verify`" in err


@pytest.mark.parametrize("extra", [["--since", "last tuesday"], ["--until", "7y"], ["--limit", "-1"]])
def test_cli_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    code, out, err = run(["audit", "search", "--set", f"state_dir={tmp_path}", *extra], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("license-server: ")


def test_cli_unknown_action_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "search", "--set", f"state_dir={tmp_path}", "--action", "stolen"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- admin records --------------------------------------------------------------------------------

# The actions the console writes into the trail (license_server/admin/actions.py and auth.py).
CONSOLE_ACTIONS = ("login", "login_failed", "logout", "deactivate", "activate", "download")


def console_trail(folder: Path) -> TrailBuilder:
    """A call, then one admin record per console action, shaped as the console writes them."""
    trail = TrailBuilder(folder)
    trail.call(key=KEY_A, machine="ws-01", friendly_name="Lab PC 1")
    for action in CONSOLE_ACTIONS:
        fields: dict[str, Any] = {"actor": "carol@10.0.0.9#5e1a", "client": "10.0.0.9", "session": "5e1a"}
        fields["action"] = action
        if action in ("deactivate", "activate", "download"):
            fields.update(product_id="3349", key=KEY_A, machine="ws-01", friendly_name="Lab PC 1")
            fields.update(ok=True, status=200, message="Done.", source=None, upstream=None)
        trail.add(chain.ADMIN, **fields)
    trail.write_head()
    return trail


class TestAdminRecords:
    """The console's records: found by their action, shown with the license, machine and name they concern."""

    @pytest.mark.parametrize("action", CONSOLE_ACTIONS)
    def test_cli_action_finds_the_console_records(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
    ) -> None:
        """`audit search --action deactivate` (and every other console action) finds those records."""
        console_trail(tmp_path / "audit")
        code, out, err = run(
            ["audit", "search", "--set", f"state_dir={tmp_path}", "--action", action, "--format", "json"],
            capsys,
        )
        assert (code, err) == (0, "")
        records = [json.loads(line) for line in out.splitlines()]
        assert [(record["type"], record["action"]) for record in records] == [("admin", action)]

    def test_table_shows_key_machine_and_name_of_admin_records(self, tmp_path: Path) -> None:
        """A deactivation's row names its license, machine and friendly name, which its details then omit."""
        console_trail(tmp_path)
        out = io.StringIO()
        write_table(found(tmp_path, action="deactivate"), out)
        header, row = out.getvalue().splitlines()
        cells = {
            name: row[header.index(name) :].split("  ")[0] for name in ("key", "machine", "friendly_name")
        }
        assert cells == {"key": KEY_A, "machine": "ws-01", "friendly_name": "Lab PC 1"}
        assert row.split()[1:4] == ["carol@10.0.0.9#5e1a", "(admin)", KEY_A]
        assert '"key"' not in row
        assert '"machine"' not in row

    def test_admin_records_without_a_target_show_dashes(self, tmp_path: Path) -> None:
        """A login is about no license: its key, machine and name read '-'."""
        console_trail(tmp_path)
        out = io.StringIO()
        write_table(found(tmp_path, action="login"), out)
        header, row = out.getvalue().splitlines()
        assert row[header.index("key") :].split()[:3] == ["-", "-", "-"]
