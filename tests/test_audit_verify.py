"""Tests for `audit verify`: tampering is found in the right place; crashes and retention are not."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from license_server.audit import chain
from license_server.audit.verify import Problem, read_checkpoints, verify
from license_server.cli import main
from tests.audit_builder import (
    STANDARD_RECORDS,
    Placed,
    TrailBuilder,
    read_lines,
    rechain,
    standard_trail,
    write_lines,
)

SEQS = range(1, STANDARD_RECORDS + 1)


def problem_of(folder: Path, **options: Any) -> Problem:
    """The problem verify must find."""
    report = verify(folder, **options)
    assert report.problem is not None, "tampering went unnoticed"
    assert not report.ok
    return report.problem


def at(problem: Problem, file: Path | str, line: int, seq: int) -> bool:
    """Whether the problem is reported at this file, line and seq."""
    name = file if isinstance(file, str) else file.name
    return (problem.file, problem.line, problem.seq) == (name, line, seq)


def next_place(trail: TrailBuilder, seq: int) -> Placed:
    """Where the record after `seq` is."""
    return trail.at(seq + 1)


def is_last_file(trail: TrailBuilder, path: Path) -> bool:
    """Whether `path` is the trail's last file."""
    return trail.files()[-1] == path


def following_file(trail: TrailBuilder, path: Path) -> Path:
    """The file after `path` in chain order."""
    files = trail.files()
    return files[files.index(path) + 1]


def edit_line(placed: Placed, change: Callable[[bytes], list[bytes]]) -> None:
    """Replace one record's line (with its newline) by whatever `change` makes of it."""
    lines = read_lines(placed.file)
    lines[placed.line - 1 : placed.line] = change(lines[placed.line - 1])
    write_lines(placed.file, lines)


def reserialised(placed: Placed, **fields: Any) -> bytes:
    """The record's line with some fields changed, written in canonical form as a careful forger would."""
    return chain.canonical_line({**placed.record, **fields}) + b"\n"


# --- an intact trail ------------------------------------------------------------------------------


def test_the_standard_trail_has_the_records_the_tests_expect(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    assert trail.seq == STANDARD_RECORDS
    assert len(trail.files()) == 4


def test_an_intact_trail_passes(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert (report.records, report.first_seq, report.last_seq, report.files) == (23, 1, 23, 4)
    assert report.retention_start is None
    assert report.torn_tail is None
    assert report.notes == []
    assert report.lost_records == 3
    assert report.head == chain.Head(23, trail.at(23).hash, trail.at(23).file.name)


def test_recovered_crashes_are_listed_not_reported_as_tampering(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    report = verify(tmp_path)
    assert report.ok
    [recovery] = report.recovered
    assert (recovery.file, recovery.line, recovery.seq) == (trail.at(11).file.name, 1, 11)
    assert recovery.reason == "torn last line"
    assert recovery.torn_bytes == 37


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_no_trail_is_intact_with_no_records(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "audit"
    if kind == "empty":
        folder.mkdir()
    report = verify(folder)
    assert report.ok
    assert (report.records, report.files, report.first_seq, report.last_seq) == (0, 0, None, None)


def test_other_files_in_the_folder_are_ignored(tmp_path: Path) -> None:
    standard_trail(tmp_path)
    (tmp_path / "notes.txt").write_text("not part of the trail")
    (tmp_path / "audit-garbage.jsonl").write_text("{")
    (tmp_path / ".head.json.tmp").write_text("{")
    assert verify(tmp_path).ok


# --- modification ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", SEQS)
def test_a_changed_time_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    edit_line(placed, lambda line: [reserialised(placed, time="2020-01-01T00:00:00.000000Z")])
    problem = problem_of(tmp_path)
    if seq < STANDARD_RECORDS:
        after = next_place(trail, seq)
        assert at(problem, after.file, after.line, seq + 1)
        assert f"does not match the hash of seq {seq} " in problem.reason
        assert problem.reason.startswith("record changed or inserted")
    else:
        assert at(problem, placed.file, placed.line, seq)
        assert "head marker" in problem.reason


@pytest.mark.parametrize("seq", [2, 6, 7, 10, 15, 17, 18, 22])
@pytest.mark.parametrize(
    ("field", "value"), [("key", "AAAAA-BBBBB-CCCCC-DDDDD"), ("result", 99), ("machine", "x")]
)
def test_a_changed_call_field_is_found(tmp_path: Path, seq: int, field: str, value: object) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    edit_line(placed, lambda line: [reserialised(placed, **{field: value})])
    after = next_place(trail, seq)
    assert at(problem_of(tmp_path), after.file, after.line, seq + 1)


@pytest.mark.parametrize("seq", SEQS)
def test_a_changed_prev_is_found_at_the_record(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    edit_line(placed, lambda line: [reserialised(placed, prev="1" * 64)])
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line, seq)


@pytest.mark.parametrize("step", range(64))
def test_any_changed_byte_is_found_at_its_record_or_the_next(tmp_path: Path, step: int) -> None:
    trail = standard_trail(tmp_path)
    places = [(placed, len(read_lines(placed.file)[placed.line - 1])) for placed in trail.placed]
    total = sum(size for _, size in places)
    offset = (step * total) // 64 + (step * 7) % 11  # spread over the whole trail, not always the same column
    index = 0
    while offset >= places[index][1]:
        offset -= places[index][1]
        index += 1
    placed = places[index][0]

    def flip(line: bytes) -> list[bytes]:
        changed = bytearray(line)
        changed[offset] ^= 0x01
        return [bytes(changed)]

    edit_line(placed, flip)
    problem = problem_of(tmp_path)
    candidates = [(placed.file.name, placed.line, placed.seq)]
    if placed.seq < STANDARD_RECORDS:
        after = next_place(trail, placed.seq)
        candidates.append((after.file.name, after.line, after.seq))
    assert (problem.file, problem.line, problem.seq) in candidates, problem


def test_a_line_that_is_not_json_is_reported(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    edit_line(trail.at(8), lambda line: [b"hello\n"])
    problem = problem_of(tmp_path)
    assert at(problem, trail.at(8).file, 2, 8)
    assert problem.reason == "line is not JSON"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda line: [line.replace(b",", b", ", 1)], "exact form"),
        (lambda line: [b"[1, 2]\n"], "not JSON"),
        (lambda line: [b"\n"], "not JSON"),
        (lambda line: [b'{"time":"x","seq":8}\n'], "does not start with the seq"),
        (lambda line: [line.replace(b'"seq":8', b'"seq":"8"')], "positive whole number"),
        (lambda line: [line.replace(b'"seq":8', b'"seq":true')], "positive whole number"),
        (lambda line: [line.replace(b'"type":"call"', b'"type":7')], "not all text"),
        (lambda line: [line.replace(b'"machine-1"', b'"machine-\\u0031"')], "exact form"),
    ],
)
def test_lines_not_in_the_daemons_form_are_reported(
    tmp_path: Path, change: Callable[[bytes], list[bytes]], reason: str
) -> None:
    trail = standard_trail(tmp_path)
    edit_line(trail.at(8), change)
    problem = problem_of(tmp_path)
    assert at(problem, trail.at(8).file, 2, 8)
    assert reason in problem.reason


def test_a_changed_first_prev_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(1)
    edit_line(placed, lambda line: [reserialised(placed, prev="f" * 64)])
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, 1, 1)
    assert "genesis" in problem.reason


# --- deletion, reordering, insertion, duplication -------------------------------------------------


@pytest.mark.parametrize("seq", SEQS)
def test_a_deleted_record_is_found_where_it_was(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    ends_file = placed.line == len(read_lines(placed.file))
    edit_line(placed, lambda line: [])
    problem = problem_of(tmp_path)
    if ends_file and not is_last_file(trail, placed.file):
        assert at(problem, following_file(trail, placed.file), 1, seq)
    else:
        assert at(problem, placed.file, placed.line, seq)
    assert f"seq {seq} missing" in problem.reason or "cut off" in problem.reason


def test_several_deleted_records_are_named(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    lines = read_lines(trail.at(2).file)
    write_lines(trail.at(2).file, lines[:1] + lines[4:])
    problem = problem_of(tmp_path)
    assert at(problem, trail.at(2).file, 2, 2)
    assert "seqs 2..4 missing: records deleted" in problem.reason


def swap(trail: TrailBuilder, first: int, second: int) -> None:
    """Swap the lines of two records."""
    a, b = trail.at(first), trail.at(second)
    lines_a, lines_b = read_lines(a.file), read_lines(b.file)
    line_a, line_b = lines_a[a.line - 1], lines_b[b.line - 1]
    if a.file == b.file:
        lines_a[a.line - 1], lines_a[b.line - 1] = line_b, line_a
        write_lines(a.file, lines_a)
    else:
        lines_a[a.line - 1], lines_b[b.line - 1] = line_b, line_a
        write_lines(a.file, lines_a)
        write_lines(b.file, lines_b)


def same_file_pairs(distance: int) -> list[tuple[int, int]]:
    """Pairs of seqs `distance` apart in one file of the standard trail (files: 1-6, 7-10, 11-17, 18-23)."""
    files = [range(1, 7), range(7, 11), range(11, 18), range(18, 24)]
    return [(seq, seq + distance) for seqs in files for seq in seqs if seq + distance in seqs]


@pytest.mark.parametrize(("first", "second"), same_file_pairs(1) + same_file_pairs(3))
def test_swapped_records_are_found_out_of_order(tmp_path: Path, first: int, second: int) -> None:
    trail = standard_trail(tmp_path)
    swap(trail, first, second)
    problem = problem_of(tmp_path)
    assert at(problem, trail.at(first).file, trail.at(first).line, first)
    assert "out of order" in problem.reason


@pytest.mark.parametrize(("first", "second"), [(6, 7), (10, 11), (17, 18), (5, 8), (1, 23)])
def test_records_swapped_across_files_are_found(tmp_path: Path, first: int, second: int) -> None:
    trail = standard_trail(tmp_path)
    swap(trail, first, second)
    assert at(problem_of(tmp_path), trail.at(first).file, trail.at(first).line, first)


@pytest.mark.parametrize("seq", SEQS)
def test_a_duplicated_record_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    edit_line(placed, lambda line: [line, line])
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line + 1, seq + 1)
    assert problem.reason == f"seq {seq} repeated: record duplicated"


@pytest.mark.parametrize("seq", SEQS)
def test_a_copy_of_an_older_record_put_in_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    older = trail.at(max(1, seq - 3))
    copy = read_lines(older.file)[older.line - 1]
    placed = trail.at(seq)
    edit_line(placed, lambda line: [line, copy])
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line + 1, seq + 1)


@pytest.mark.parametrize("seq", SEQS)
def test_a_forged_record_with_a_wrong_prev_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    forged = {**trail.at(2).record, "seq": seq + 1, "prev": "0" * 64, "machine": "intruder"}
    edit_line(placed, lambda line: [line, chain.canonical_line(forged) + b"\n"])
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line + 1, seq + 1)
    assert problem.reason.startswith("record changed or inserted")


@pytest.mark.parametrize("seq", range(1, STANDARD_RECORDS))
def test_a_forged_record_chained_in_is_found_at_the_record_it_displaced(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    forged = {**trail.at(2).record, "seq": seq + 1, "prev": placed.hash, "machine": "intruder"}
    edit_line(placed, lambda line: [line, chain.canonical_line(forged) + b"\n"])
    displaced = trail.at(seq + 1)
    problem = problem_of(tmp_path)
    if seq + 1 == STANDARD_RECORDS:  # the head marker knows the real record
        assert at(problem, placed.file, placed.line + 1, seq + 1)
        assert problem.reason == "record changed: its hash does not match the head marker"
        return
    line = displaced.line + 1 if displaced.file == placed.file else displaced.line
    assert at(problem, displaced.file, line, seq + 2)
    assert f"seq {seq + 1} appears twice" in problem.reason


# --- truncation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", SEQS)
def test_a_file_cut_mid_line_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    lines = read_lines(placed.file)
    kept = b"".join(lines[: placed.line - 1]) + lines[placed.line - 1][: len(lines[placed.line - 1]) // 2]
    placed.file.write_bytes(kept)
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line, seq)
    if is_last_file(trail, placed.file):
        assert (
            problem.reason
            == f"the trail ends at seq {seq - 1} but the head marker says seq 23: records cut off"
        )
    else:
        assert problem.reason.startswith("torn line not explained by a recovered record")


@pytest.mark.parametrize("seq", SEQS)
def test_a_file_cut_at_a_line_boundary_is_found(tmp_path: Path, seq: int) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(seq)
    write_lines(placed.file, read_lines(placed.file)[: placed.line - 1])
    problem = problem_of(tmp_path)
    if is_last_file(trail, placed.file):
        assert at(problem, placed.file, placed.line, seq)
        assert "head marker says seq 23: records cut off" in problem.reason
    else:
        assert at(problem, following_file(trail, placed.file), 1, seq)
        assert f"seq {seq} missing" in problem.reason or f"seqs {seq}.." in problem.reason


def test_records_cut_at_a_line_boundary_past_the_head_marker_cannot_be_noticed(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    trail.write_head(20)
    last = trail.at(23)
    write_lines(last.file, read_lines(last.file)[:-2])
    report = verify(tmp_path)
    assert report.ok  # the limit of any trail without an outside witness: see the checkpoint tests
    assert report.last_seq == 21


def test_a_torn_last_line_past_the_head_is_a_pending_crash_not_tampering(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    with trail.at(23).file.open("ab") as stream:
        stream.write(b'{"seq":24,"time":"2026-')
    report = verify(tmp_path)
    assert report.ok
    assert report.torn_tail is not None
    assert (report.torn_tail.file, report.torn_tail.line, report.torn_tail.size) == (
        trail.at(23).file.name,
        7,
        23,
    )


def test_without_a_head_marker_the_report_warns(tmp_path: Path) -> None:
    standard_trail(tmp_path)
    (tmp_path / chain.HEAD_FILE).unlink()
    report = verify(tmp_path)
    assert report.ok
    assert report.head is None
    assert any("no head marker" in note for note in report.notes)


def test_a_head_marker_behind_the_end_is_fine(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    trail.write_head(20)
    assert verify(tmp_path).ok


def test_a_head_marker_whose_hash_differs_is_reported(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    placed = trail.at(20)
    chain.write_head(tmp_path, chain.Head(20, "e" * 64, placed.file.name))
    problem = problem_of(tmp_path)
    assert at(problem, placed.file, placed.line, 20)
    assert "head marker" in problem.reason


def test_a_broken_head_marker_is_reported(tmp_path: Path) -> None:
    standard_trail(tmp_path)
    (tmp_path / chain.HEAD_FILE).write_text("{not json")
    problem = problem_of(tmp_path)
    assert problem.file == chain.HEAD_FILE
    assert "head marker is not valid" in problem.reason


def test_an_emptied_folder_with_its_head_marker_left_is_reported(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    for path in trail.files():
        path.unlink()
    problem = problem_of(tmp_path)
    assert at(problem, trail.at(23).file, 1, 1)
    assert problem.reason == "the trail is empty but the head marker says seq 23: records cut off"


def test_a_head_marker_left_ahead_by_a_recovered_power_cut_is_fine(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    # The head said 26 but only 23 records reached the disk; the daemon noted it and wrote on from 24.
    chain.write_head(tmp_path, chain.Head(26, "c" * 64, trail.at(23).file.name))
    trail.rotate()
    trail.add(
        chain.RECOVERED,
        reason="head marker ahead of the file",
        torn_bytes=0,
        torn_sha256="",
        file="x",
        head_seq=26,
    )
    trail.add(chain.START, version="0.1.0", pid=300)
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert [item.head_seq for item in report.recovered] == [10, 26]


# --- whole files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [1, 2])
def test_a_removed_middle_file_is_found(tmp_path: Path, index: int) -> None:
    trail = standard_trail(tmp_path)
    files = trail.files()
    first_missing = chain.list_files(tmp_path)[index].first_seq
    files[index].unlink()
    problem = problem_of(tmp_path)
    assert at(problem, files[index + 1], 1, first_missing)
    assert "records deleted" in problem.reason


def test_a_removed_first_file_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    files = trail.files()
    files[0].unlink()
    problem = problem_of(tmp_path)
    assert at(problem, files[1], 1, 1)
    assert problem.reason.startswith("seqs 1..6 missing: records deleted")


def test_a_removed_last_file_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    files = trail.files()
    files[-1].unlink()
    problem = problem_of(tmp_path)
    assert at(problem, files[-1], 1, 18)
    assert "records cut off" in problem.reason


def renamed(path: Path, first_seq: int | None = None, stamp: str | None = None) -> Path:
    """Rename an audit file, changing the seq and/or the time in its name."""
    _, old_stamp, old_seq = path.stem.split("-")
    seq = int(old_seq) if first_seq is None else first_seq
    target = path.with_name(f"audit-{stamp or old_stamp}-{seq:012d}.jsonl")
    path.rename(target)
    return target


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_file_renamed_out_of_order_is_found(tmp_path: Path, index: int) -> None:
    trail = standard_trail(tmp_path)
    files = trail.files()
    moved_seq = chain.list_files(tmp_path)[index].first_seq
    target = renamed(files[index], first_seq=99)
    problem = problem_of(tmp_path)
    if index == 0:  # the trail now seems to start at seq 7, until the first file turns up at the end
        assert at(problem, target, 1, 24)
        assert problem.reason.startswith("records out of order: this file starts at seq 1, which comes after")
    else:
        assert at(problem, files[index + 1], 1, moved_seq)
        assert f"seq {moved_seq} starts {target.name}" in problem.reason
        assert "file renamed" in problem.reason


def test_files_whose_names_are_swapped_are_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    b, c = trail.files()[1:3]
    b_name, c_name = b.name, c.name
    b.rename(tmp_path / "swap")
    c.rename(tmp_path / b_name)
    (tmp_path / "swap").rename(tmp_path / c_name)
    problem = problem_of(tmp_path)
    assert at(problem, b_name, 1, 7)
    assert "file renamed" in problem.reason


@pytest.mark.parametrize("index", [1, 2, 3])
def test_a_file_renamed_in_order_is_found(tmp_path: Path, index: int) -> None:
    standard_trail(tmp_path)
    audit_file = chain.list_files(tmp_path)[index]
    target = renamed(audit_file.path, first_seq=audit_file.first_seq - 1)
    problem = problem_of(tmp_path)
    assert at(problem, target, 1, audit_file.first_seq)
    assert problem.reason.startswith("file renamed")


def test_the_head_file_renamed_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    target = renamed(trail.files()[-1], stamp="20261102T000000Z")
    problem = problem_of(tmp_path)
    assert at(problem, target, 6, 23)
    assert problem.reason.startswith("file renamed: the head marker")


def test_a_file_whose_name_time_was_moved_is_flagged_for_search(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    target = renamed(trail.files()[1], stamp="20261201T000000Z")
    report = verify(tmp_path)
    assert report.ok  # the chain does not cover names, but search relies on them
    assert report.notes == [
        f"{target.name}: seq 7 is dated 2026-11-01T00:07:00.000000Z, outside the times the file names allow "
        "(2026-11-30T23:59:00.000000Z to …): `audit search --since/--until` may pass it over (records held "
        "while writing failed, a renamed file, or a clock stepped back)"
    ]


def test_records_dated_before_their_file_are_flagged_for_search(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    trail.rotate()
    trail.add(chain.GAP, lost=1, since="2026-11-01T00:00:00.000000Z")
    held = trail.call(at=trail.now - 3600)  # written late, after the trail could be written again
    trail.call(at=trail.now + 7200)
    report = verify(tmp_path)
    assert report.ok
    [note] = report.notes
    assert note.startswith(
        f"{held.file.name}: seq {held.seq} is dated {held.record['time']}, outside the times"
    )


def test_a_copied_file_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    b = trail.files()[1]
    copy = renamed(b, stamp="20261102T000000Z")
    copy.with_name(b.name).write_bytes(copy.read_bytes())
    problem = problem_of(tmp_path)
    assert at(problem, copy, 1, 11)
    assert "this file starts at seq 7, which comes after seq 10: file renamed or copied" in problem.reason


# --- retention ------------------------------------------------------------------------------------


def remove_by_retention(
    trail: TrailBuilder, count: int, *, last_seq: int | None = None, last_hash: str = ""
) -> None:
    """Delete the first `count` files and record it as the retention policy does, then move the head."""
    files = trail.files()[:count]
    last = trail.at(chain.list_files(trail.folder)[count].first_seq - 1)
    for path in files:
        path.unlink()
    trail.add(
        chain.RETENTION,
        removed=[path.name for path in files],
        last_seq=last.seq if last_seq is None else last_seq,
        last_hash=last_hash or last.hash,
    )
    trail.write_head()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_files_removed_by_retention_are_explained(tmp_path: Path, count: int) -> None:
    trail = standard_trail(tmp_path)
    first_kept = chain.list_files(tmp_path)[count].first_seq
    remove_by_retention(trail, count)
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert report.retention_start == first_kept
    assert (report.first_seq, report.last_seq) == (first_kept, 24)


def test_retention_records_from_earlier_runs_do_not_matter(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    remove_by_retention(trail, 1)
    remove_by_retention(trail, 1)
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert report.retention_start == 11


def test_a_file_removed_beyond_what_retention_recorded_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    remove_by_retention(trail, 1)
    files = trail.files()
    files[0].unlink()
    problem = problem_of(tmp_path)
    assert at(problem, files[1], 1, 7)
    assert problem.reason.startswith("seqs 7..10 missing: records deleted (the trail starts at seq 11")


def test_a_retention_record_with_the_wrong_hash_is_found(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    remove_by_retention(trail, 1, last_hash="d" * 64)
    problem = problem_of(tmp_path)
    assert at(problem, trail.files()[0], 1, 7)
    assert "last_hash of the retention record" in problem.reason


def test_a_retention_record_for_other_records_explains_nothing(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    remove_by_retention(trail, 1, last_seq=5)
    problem = problem_of(tmp_path)
    assert at(problem, trail.files()[0], 1, 6)
    assert problem.reason.startswith("seq 6 missing")


# --- checkpoints ----------------------------------------------------------------------------------


def rewrite_whole_trail(trail: TrailBuilder, seq: int) -> None:
    """Change record `seq`, then recompute every hash after it and the head marker."""
    placed = trail.at(seq)
    edit_line(placed, lambda line: [reserialised(placed, time="2020-01-01T00:00:00.000000Z")])
    rechain(trail.folder)


@pytest.mark.parametrize("changed", [1, 9, 17, 23])
def test_a_rewritten_trail_is_caught_only_by_a_checkpoint(tmp_path: Path, changed: int) -> None:
    trail = standard_trail(tmp_path)
    original = [placed.hash for placed in trail.placed]
    rewrite_whole_trail(trail, changed)
    assert verify(tmp_path).ok  # consistent in itself: nothing in the folder can tell
    for seq in range(changed, STANDARD_RECORDS + 1, 3):
        problem = problem_of(tmp_path, checkpoints=[(seq, original[seq - 1])])
        assert at(problem, trail.at(seq).file, trail.at(seq).line, seq)
        assert problem.reason.startswith(f"checkpoint seq {seq} hash mismatch")
    earlier = [(seq, original[seq - 1]) for seq in range(1, changed)]
    report = verify(tmp_path, checkpoints=earlier)
    assert report.ok
    assert report.checkpoints_checked == changed - 1


def test_matching_checkpoints_are_counted(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    checkpoints = [(placed.seq, placed.hash.upper()) for placed in trail.placed[::5]]
    report = verify(tmp_path, checkpoints=checkpoints)
    assert report.ok
    assert report.checkpoints_checked == len(checkpoints)


def test_a_checkpoint_past_the_end_means_records_were_cut(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    problem = problem_of(tmp_path, checkpoints=[(30, "a" * 64)])
    assert at(problem, trail.at(23).file, 7, 24)
    assert problem.reason == "checkpoint seq 30 lies beyond the end of the trail (seq 23): records cut off"


def test_checkpoints_before_the_retained_records(tmp_path: Path) -> None:
    trail = standard_trail(tmp_path)
    hashes = {placed.seq: placed.hash for placed in trail.placed}
    remove_by_retention(trail, 1)
    report = verify(tmp_path, checkpoints=[(3, hashes[3]), (6, hashes[6])])
    assert report.ok
    assert (report.checkpoints_checked, report.checkpoints_skipped) == (1, 1)
    problem = problem_of(tmp_path, checkpoints=[(6, "b" * 64)])
    assert at(problem, trail.files()[0], 1, 7)
    assert problem.reason.startswith("checkpoint seq 6 hash mismatch")


def test_read_checkpoints_takes_only_checkpoint_events() -> None:
    log = [
        '{"event": "audit_checkpoint", "seq": 5, "hash": "' + "a" * 64 + '", "level": "info"}\n',
        '{"event": "request", "seq": 6, "hash": "b"}\n',
        "not json at all\n",
        "Nov 28 08:40:00 host license-server[12]: "
        '{"event": "audit_checkpoint", "seq": 9, "hash": "' + "c" * 64 + '"}\n',
        '{"event": "audit_checkpoint", "seq": "10", "hash": "d"}\n',
        '{"event": "audit_checkpoint", "seq": true, "hash": "d"}\n',
        "[1, 2]\n",
        "{broken\n",
    ]
    assert read_checkpoints(log) == [(5, "a" * 64), (9, "c" * 64)]


# --- the command ----------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line; its exit code, stdout and stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_an_intact_trail_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    standard_trail(tmp_path / "audit")
    code, out, _ = run(["audit", "verify", "--set", f"state_dir={tmp_path}"], capsys)
    assert code == 0
    assert "intact: 23 records, seq 1..23, 4 files" in out
    assert "recovered crash at seq 11" in out
    assert "3 records were never written" in out


def test_cli_takes_the_audit_path_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    standard_trail(tmp_path / "elsewhere")
    argv = [
        "audit",
        "verify",
        "--set",
        f"state_dir={tmp_path}",
        "--set",
        f"audit.path={tmp_path / 'elsewhere'}",
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert "23 records" in out


def test_cli_tampering_exits_1_naming_file_line_and_seq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = standard_trail(tmp_path / "audit")
    edit_line(trail.at(8), lambda line: [])
    code, out, _ = run(["audit", "verify", "--set", f"state_dir={tmp_path}"], capsys)
    assert code == 1
    assert "NOT INTACT" in out
    assert f"first bad record: {trail.at(8).file.name}, line 2, seq 8" in out
    assert "seq 8 missing: records deleted" in out


def test_cli_no_trail_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["audit", "verify", "--set", f"state_dir={tmp_path}"], capsys)
    assert code == 0
    assert "no records" in out


def test_cli_checkpoints_from_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = standard_trail(tmp_path / "audit")
    original = trail.at(20).hash
    log = tmp_path / "daemon.log"
    log.write_text(
        json.dumps({"event": "started"})
        + "\n"
        + json.dumps({"event": "audit_checkpoint", "seq": 20, "hash": original})
        + "\n"
    )
    argv = ["audit", "verify", "--set", f"state_dir={tmp_path}", "--checkpoints", str(log)]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert "checkpoints: 1 compared" in out
    rewrite_whole_trail(trail, 15)
    assert run(["audit", "verify", "--set", f"state_dir={tmp_path}"], capsys)[0] == 0
    code, out, _ = run(argv, capsys)
    assert code == 1
    assert "checkpoint seq 20 hash mismatch" in out


def test_cli_checkpoints_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = standard_trail(tmp_path / "audit")
    line = json.dumps({"event": "audit_checkpoint", "seq": 20, "hash": trail.at(20).hash})
    monkeypatch.setattr("sys.stdin", io.StringIO(line + "\n"))
    code, out, _ = run(["audit", "verify", "--set", f"state_dir={tmp_path}", "--checkpoints", "-"], capsys)
    assert code == 0
    assert "checkpoints: 1 compared" in out


def test_cli_a_log_without_checkpoints_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    standard_trail(tmp_path / "audit")
    monkeypatch.setattr("sys.stdin", io.StringIO("nothing here\n"))
    code, _, err = run(["audit", "verify", "--set", f"state_dir={tmp_path}", "--checkpoints", "-"], capsys)
    assert code == 0
    assert "no audit_checkpoint lines in standard input" in err


def test_cli_a_checkpoint_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = standard_trail(tmp_path / "audit")
    base = ["audit", "verify", "--set", f"state_dir={tmp_path}", "--checkpoint"]
    assert run([*base, f"20:{trail.at(20).hash}"], capsys)[0] == 0
    assert run([*base, f"20:{'0' * 64}"], capsys)[0] == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--checkpoints", "/nonexistent/daemon.log"],
        ["--checkpoint", "20"],
        ["--checkpoint", "x:" + "0" * 64],
        ["--checkpoint", "20:abc"],
        ["--set", "audit.retention=forever"],
    ],
)
def test_cli_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    standard_trail(tmp_path / "audit")
    code, out, err = run(["audit", "verify", "--set", f"state_dir={tmp_path}", *extra], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("license-server: ")


def test_cli_an_audit_path_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "audit").write_text("")
    code, _, err = run(["audit", "verify", "--set", f"state_dir={tmp_path}"], capsys)
    assert code == 2
    assert "is not a folder" in err
