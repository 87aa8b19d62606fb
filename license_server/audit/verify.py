"""Checks that the audit trail is the one the daemon wrote: no byte changed, no record added, moved or cut."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from license_server.audit import chain

if TYPE_CHECKING:
    from license_server.storage.pg_audit import AuditRow, PgAuditStore

_HEADER = ("seq", "time", "prev", "type")
CHECKPOINT_EVENT = "audit_checkpoint"  # the operational log's event that carries the head of the chain


@dataclass(frozen=True, slots=True)
class Problem:
    """The first place where the trail is not what the daemon wrote, and why."""

    file: str  # file name, without the folder
    seq: int  # the sequence number that belongs at this place
    line: int  # 1-based line number in `file`
    reason: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """A crash the daemon recovered from at start (a torn line cut off, lost records noted): not tampering."""

    file: str  # the file holding the `recovered` record
    line: int
    seq: int
    reason: str
    torn_bytes: int
    head_seq: int | None  # what the head marker said then; records after `seq - 1` up to it were lost


@dataclass(frozen=True, slots=True)
class TornTail:
    """An incomplete last line not yet set aside: a crash the daemon has not restarted from, or a write."""

    file: str
    line: int
    size: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify` found: counts, recovered crashes and the first problem if the trail was tampered with."""

    problem: Problem | None
    records: int
    first_seq: int | None
    last_seq: int | None
    files: int
    recovered: list[Recovery]
    retention_start: int | None  # first seq present when older files were removed by retention
    lost_records: int  # counted by `gap` records: never written while writing failed, not tampering
    torn_tail: TornTail | None
    head: chain.Head | None
    checkpoints_checked: int
    checkpoints_skipped: int  # older than the records retention kept, so nothing to compare with
    notes: list[str]  # warnings that are not tampering

    @property
    def ok(self) -> bool:
        """Whether the trail is intact."""
        return self.problem is None


def verify(folder: Path, *, checkpoints: Sequence[tuple[int, str]] = ()) -> VerifyReport:
    """Walk the whole trail in `folder`, file by file and line by line, and report the first problem.

    `checkpoints` are (seq, hash) pairs seen elsewhere (the operational log); each must match the trail.
    Raises OSError when a file cannot be read: that is no verdict either way.
    """
    return _Walk(folder, checkpoints).run()


def read_checkpoints(log_lines: Iterable[str]) -> list[tuple[int, str]]:
    """The (seq, hash) checkpoints in operational log lines; other lines and prefixes to the JSON ignored."""
    found: list[tuple[int, str]] = []
    for text in log_lines:
        start = text.find("{")
        if start < 0:
            continue
        try:
            entry = json.loads(text[start:])
        except (ValueError, RecursionError):
            continue
        if not isinstance(entry, dict) or entry.get("event") != CHECKPOINT_EVENT:
            continue
        seq, digest = entry.get("seq"), entry.get("hash")
        if type(seq) is int and isinstance(digest, str):
            found.append((seq, digest))
    return found


def summary(folder: Path, report: VerifyReport) -> list[str]:
    """The report as short lines for a person: the verdict first, then what explains the trail's shape."""
    out = [_verdict(folder, report)]
    if report.problem is not None:
        problem = report.problem
        out.append(f"  first bad record: {problem.file}, line {problem.line}, seq {problem.seq}")
        out.append(f"  {problem.reason}")
    if report.retention_start is not None:
        out.append(f"  records before seq {report.retention_start} were removed by the retention policy")
    out += [
        f"  recovered crash at seq {item.seq} ({item.file} line {item.line}): {item.reason}"
        + (f"; {item.torn_bytes} torn bytes set aside" if item.torn_bytes else "")
        for item in report.recovered
    ]
    if report.lost_records:
        out.append(f"  {report.lost_records} records were never written while writing failed (gap records)")
    if report.torn_tail is not None:
        tail = report.torn_tail
        out.append(
            f"  incomplete last line ({tail.size} bytes, {tail.file} line {tail.line}): a crash the daemon "
            "has not restarted from yet, or a write in progress"
        )
    if report.head is not None:
        out.append(f"  head marker: seq {report.head.seq}")
    if report.checkpoints_checked or report.checkpoints_skipped:
        out.append(
            f"  checkpoints: {report.checkpoints_checked} compared"
            + (
                f", {report.checkpoints_skipped} older than the records kept"
                if report.checkpoints_skipped
                else ""
            )
        )
    out += [f"  warning: {note}" for note in report.notes]
    return out


def _verdict(folder: Path, report: VerifyReport) -> str:
    """The first line of the summary."""
    if report.problem is not None:
        return f"audit trail {folder}: NOT INTACT ({report.records} records check out before the problem)"
    if report.records == 0:
        return f"audit trail {folder}: intact, but there are no records (the folder is missing or empty)"
    return (
        f"audit trail {folder}: intact: {report.records} records, seq {report.first_seq}..{report.last_seq}, "
        f"{report.files} files"
    )


@dataclass(frozen=True, slots=True)
class _Mark:
    """Where a record sits in the trail, with the hash of its line and its time text."""

    file: str
    line: int
    seq: int
    hash: str
    time: str


class _Found(Exception):
    """Ends the walk at the first problem."""

    def __init__(self, problem: Problem) -> None:
        """Carry the problem out of the walk."""
        super().__init__(problem.reason)
        self.problem = problem


class _Walk:
    """One verification: where the chain has got to and what it has seen on the way."""

    def __init__(self, folder: Path, checkpoints: Sequence[tuple[int, str]]) -> None:
        """Read the head marker, then list the files: written in that order, the files can only be ahead."""
        self.head, self.head_broken = _read_head(folder)
        self.files = chain.list_files(folder)
        self.windows = chain.time_windows(self.files)
        self.checkpoints: dict[int, set[str]] = {}
        for seq, digest in checkpoints:
            self.checkpoints.setdefault(seq, set()).add(digest.lower())
        self.first: _Mark | None = None
        self.first_prev = ""
        self.last: _Mark | None = None
        self.end = ("", 0)  # the last file's name and its count of complete lines
        self.records = 0
        self.recovered: list[Recovery] = []
        self.retention: dict[int, str] = {}  # last_seq -> last_hash, from every retention record
        self.retention_start: int | None = None
        self.lost = 0
        self.torn: TornTail | None = None
        self.checked = 0
        self.skipped = 0
        self.notes: list[str] = []

    def run(self) -> VerifyReport:
        """Walk every file, then check what can only be checked at the end."""
        problem: Problem | None = None
        try:
            for index in range(len(self.files)):
                self.read_file(index)
            self.finish()
        except _Found as found:
            problem = found.problem
        return VerifyReport(
            problem=problem,
            records=self.records,
            first_seq=self.first.seq if self.first else None,
            last_seq=self.last.seq if self.last else None,
            files=len(self.files),
            recovered=self.recovered,
            retention_start=self.retention_start,
            lost_records=self.lost,
            torn_tail=self.torn,
            head=self.head,
            checkpoints_checked=self.checked,
            checkpoints_skipped=self.skipped,
            notes=self.notes,
        )

    def fail(self, file: str, line: int, reason: str, *, seq: int | None = None) -> NoReturn:
        """Stop at a problem; `seq` defaults to the one that belongs after the last good record."""
        raise _Found(Problem(file, self.expected() if seq is None else seq, line, reason))

    def expected(self) -> int:
        """The seq that belongs next."""
        if self.last is not None:
            return self.last.seq + 1
        return self.files[0].first_seq if self.files else 1

    # --- the walk ---------------------------------------------------------------------------------

    def read_file(self, index: int) -> None:
        """Check one file line by line."""
        audit_file = self.files[index]
        name = audit_file.path.name
        window = self.windows[index]
        # Times are compared as text first (the writer's fixed format) and parsed only when they seem outside.
        low = _time_text(window[0]) if window[0] is not None else ""
        high = _time_text(window[1]) if window[1] is not None else "~"
        complete, warned = 0, False
        with audit_file.path.open("rb") as stream:
            rest = chain.lines(stream)
            for number, raw in enumerate(rest, 1):
                if not raw.endswith(b"\n"):
                    self.torn_line(name, number, len(raw), last_file=index == len(self.files) - 1)
                    break
                mark = self.record(audit_file, number, raw[:-1], rest)
                complete = number
                if not warned and not low <= mark.time <= high:
                    warned = self.check_time(name, mark, window)
        self.end = (name, complete)

    def torn_line(self, name: str, number: int, size: int, *, last_file: bool) -> None:
        """A last line without its newline: a pending crash at the very end, tampering anywhere else."""
        if not last_file:
            self.fail(name, number, "torn line not explained by a recovered record: the file ends mid-record")
        self.torn = TornTail(name, number, size)  # whether the head marker covers it is checked at the end

    def record(self, audit_file: chain.AuditFile, number: int, line: bytes, rest: Iterator[bytes]) -> _Mark:
        """Check one complete line: its form, its place in the chain, and what is known about it."""
        name = audit_file.path.name
        record = chain.parse_record(line)
        if record is None:
            self.fail(name, number, "line is not JSON")
        malformed = _malformed(record, line)
        if malformed is not None:
            self.fail(name, number, malformed)
        seq: int = record["seq"]
        if self.last is None:
            self.first_record(name, number, record)
        else:
            self.next_record(audit_file, number, line, record, rest)
        if number == 1 and seq != audit_file.first_seq:
            self.misnamed(audit_file, seq, rest)
        mark = _Mark(name, number, seq, chain.line_hash(line), record["time"])
        self.check_known(mark)
        self.take_note(record, mark)
        self.first = self.first or mark
        self.last = mark
        self.records += 1
        return mark

    def first_record(self, name: str, number: int, record: dict[str, Any]) -> None:
        """The trail's first record: seq 1 after the genesis value, or later if retention explains it."""
        if record["seq"] == 1 and record["prev"] != chain.GENESIS:
            self.fail(name, number, "record changed: the first record's prev is not the genesis value", seq=1)
        self.first_prev = record["prev"]  # a later start is checked against retention records at the end

    def next_record(
        self,
        audit_file: chain.AuditFile,
        number: int,
        line: bytes,
        record: dict[str, Any],
        rest: Iterator[bytes],
    ) -> None:
        """A record after the first: the next seq, its prev the hash of the record before."""
        assert self.last is not None
        name, seq, expected = audit_file.path.name, record["seq"], self.last.seq + 1
        if seq > expected:
            self.fail(name, number, self.jump_reason(audit_file, number, seq, rest, expected))
        if seq < expected:
            self.fail(name, number, self.behind_reason(number, seq, line))
        if record["prev"] != self.last.hash:
            where = (
                f"line {self.last.line}"
                if self.last.file == name
                else f"{self.last.file} line {self.last.line}"
            )
            self.fail(
                name,
                number,
                f"record changed or inserted: its prev does not match the hash of seq {self.last.seq} "
                f"({where}): that record was changed, or this one was put in",
            )

    def jump_reason(
        self, audit_file: chain.AuditFile, number: int, seq: int, rest: Iterator[bytes], expected: int
    ) -> str:
        """Why a record has a later seq than the one that belongs here."""
        next_seq, found_later = _look_ahead(rest, expected)
        if found_later:
            return f"records out of order: seq {seq} where seq {expected} belongs"
        if next_seq == expected + 1:
            return f"record changed: it says seq {seq} where seq {expected} belongs"
        gap = _missing(expected, seq)
        if number > 1:
            return f"{gap}: records deleted"
        holder = self.file_starting_at(expected, audit_file)
        if holder is not None:
            return f"records out of order: seq {expected} starts {holder}, whose name is wrong: file renamed"
        if audit_file.first_seq == expected:
            return f"{gap}: records deleted from the start of this file"
        return f"{gap}: records deleted"

    def behind_reason(self, number: int, seq: int, line: bytes) -> str:
        """Why a record has an earlier seq than the one that belongs here."""
        assert self.last is not None
        if chain.line_hash(line) == self.last.hash:
            return f"seq {seq} repeated: record duplicated"
        if seq == self.last.seq:
            return f"seq {seq} appears twice: a record was put in or copied"
        if number == 1:
            return (
                f"records out of order: this file starts at seq {seq}, which comes after seq "
                f"{self.last.seq}: file renamed or copied"
            )
        return (
            f"records out of order: seq {seq} comes after seq {self.last.seq} (a record copied or moved here)"
        )

    def misnamed(self, audit_file: chain.AuditFile, seq: int, rest: Iterator[bytes]) -> None:
        """A file whose name does not give the seq of its first record."""
        name, named = audit_file.path.name, audit_file.first_seq
        if (
            self.records == 0 and named < seq
        ):  # the trail's first record: what its file's name says is missing
            self.fail(name, 1, self.jump_reason(audit_file, 1, seq, rest, named), seq=named)
        self.fail(
            name,
            1,
            f"file renamed: its name says it starts at seq {named}, but its first record is seq {seq}",
            seq=seq,
        )

    def file_starting_at(self, seq: int, skip: chain.AuditFile) -> str | None:
        """The name of another file whose first record is `seq` (only read when explaining a problem)."""
        for audit_file in self.files:
            if audit_file == skip:
                continue
            try:
                with audit_file.path.open("rb") as stream:
                    first = next(chain.lines(stream), b"")
            except OSError:
                continue
            if _seq_of(first) == seq:
                return audit_file.path.name
        return None

    def check_known(self, mark: _Mark) -> None:
        """Compare a record with the head marker and the checkpoints that name its seq."""
        head = self.head
        if head is not None and mark.seq == head.seq and not self.head_predates_recovery():
            if mark.hash != head.hash:
                self.fail(
                    mark.file,
                    mark.line,
                    "record changed: its hash does not match the head marker",
                    seq=mark.seq,
                )
            if Path(head.file).name != mark.file:
                self.fail(
                    mark.file,
                    mark.line,
                    f"file renamed: the head marker puts seq {mark.seq} in {head.file}, "
                    f"but it is in {mark.file}",
                    seq=mark.seq,
                )
        for digest in sorted(self.checkpoints.get(mark.seq, ())):
            self.checked += 1
            if digest != mark.hash:
                self.fail(
                    mark.file,
                    mark.line,
                    f"checkpoint seq {mark.seq} hash mismatch: this is not the record the operational log "
                    f"saw, so the trail was rewritten{self.lost_note(mark.seq)}",
                    seq=mark.seq,
                )

    def take_note(self, record: dict[str, Any], mark: _Mark) -> None:
        """Remember what the chain's own records explain: crashes, removed files, records never written."""
        kind = record["type"]
        if kind == chain.RECOVERED:
            self.recovered.append(_recovery(record, mark))
        elif kind == chain.RETENTION:
            last_seq, last_hash = record.get("last_seq"), record.get("last_hash")
            if type(last_seq) is int and isinstance(last_hash, str):
                self.retention[last_seq] = last_hash
        elif kind == chain.GAP and type(lost := record.get("lost")) is int:
            self.lost += lost

    def check_time(self, name: str, mark: _Mark, window: tuple[datetime | None, datetime | None]) -> bool:
        """Warn (once per file) about a record whose time lies outside what the file names allow.

        A search by time skips files by their names, so it could pass such a record over. Returns
        whether a warning was added.
        """
        low, high = window
        when = chain.record_time(mark.time)
        if when is not None and (low is None or when >= low) and (high is None or when <= high):
            return False
        shown = ("…" if low is None else _time_text(low), "…" if high is None else _time_text(high))
        self.notes.append(
            f"{name}: seq {mark.seq} is dated {mark.time}, outside the times the file names allow "
            f"({shown[0]} to {shown[1]}): `audit search --since/--until` may pass it over (records held "
            "while writing failed, a renamed file, or a clock stepped back)"
        )
        return True

    # --- the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """What can only be checked once every record has been seen, in chain order."""
        self.check_start()
        self.check_head()
        self.check_outside_checkpoints()

    def check_start(self) -> None:
        """A trail that starts after seq 1 needs a retention record for the files removed before it."""
        first = self.first
        if first is None or first.seq == 1:
            return
        last_hash = self.retention.get(first.seq - 1)
        if last_hash is None:
            expected = max((seq for seq in self.retention if seq < first.seq), default=0) + 1
            self.fail(
                first.file,
                first.line,
                f"{_missing(expected, first.seq)}: records deleted (the trail starts at seq {first.seq} "
                "and no retention record explains it)",
                seq=expected,
            )
        if last_hash != self.first_prev:
            self.fail(
                first.file,
                first.line,
                f"record changed or inserted: its prev does not match the last_hash of the retention record "
                f"that removed seq {first.seq - 1}",
                seq=first.seq,
            )
        self.retention_start = first.seq

    def check_head(self) -> None:
        """The trail must reach the head marker: the daemon wrote every record up to it."""
        last_seq = self.last.seq if self.last is not None else 0
        if self.head_broken:
            self.fail(chain.HEAD_FILE, 1, "the head marker is not valid: it was changed", seq=last_seq + 1)
        head = self.head
        if head is None:
            if self.records:
                self.notes.append("no head marker: records cut off from the end could not be noticed")
            return
        if head.seq > last_seq and not self.head_predates_recovery():
            file, line = self.end_position()
            said = f"the trail ends at seq {last_seq}" if self.records else "the trail is empty"
            self.fail(file, line, f"{said} but the head marker says seq {head.seq}: records cut off")
        if self.first is not None and 0 < head.seq < self.first.seq:
            self.notes.append("the head marker is older than the first record kept")

    def check_outside_checkpoints(self) -> None:
        """Checkpoints past the end mean records were cut; those before the kept ones are rarely checkable."""
        last_seq = self.last.seq if self.last is not None else 0
        first = self.first
        for seq in sorted(self.checkpoints):
            digests = self.checkpoints[seq]
            if seq > last_seq:
                file, line = self.end_position()
                self.fail(
                    file,
                    line,
                    f"checkpoint seq {seq} lies beyond the end of the trail (seq {last_seq}): "
                    "records cut off",
                )
            elif first is not None and seq < first.seq:
                if seq != first.seq - 1 or self.retention_start is None:
                    self.skipped += len(digests)
                    continue
                self.checked += len(digests)  # the retention record kept the hash of the last removed record
                if digests != {self.first_prev.lower()}:
                    self.fail(
                        first.file,
                        first.line,
                        f"checkpoint seq {seq} hash mismatch: the retention record's hash of the last "
                        "removed record differs, so the trail was rewritten",
                        seq=first.seq,
                    )

    def end_position(self) -> tuple[str, int]:
        """Where the next record would be: after the last file's last line, or in a head file that is gone."""
        names = {audit_file.path.name for audit_file in self.files}
        if self.head is not None and Path(self.head.file).name not in names:
            return Path(self.head.file).name, 1
        return self.end[0], self.end[1] + 1

    def head_predates_recovery(self) -> bool:
        """Whether the head marker is the one a recovery found ahead of the file (not rewritten since)."""
        head = self.head
        return head is not None and any(
            item.head_seq == head.seq and item.seq <= head.seq for item in self.recovered
        )

    def lost_note(self, seq: int) -> str:
        """A hint when a checkpoint names a record lost in a crash, whose seq was used again after it."""
        for item in self.recovered:
            if item.head_seq is not None and item.seq <= seq <= item.head_seq:
                return (
                    f" (or: seqs {item.seq}..{item.head_seq} were lost in the crash recovered at seq "
                    f"{item.seq}, and this checkpoint was logged before that crash; then give only later log "
                    "lines)"
                )
        return ""


# --- the shared trail: each node's chain in the database, against its anchored head ------------------

_TIME_SLACK = 0.001  # seconds between a record's time text and the float stored beside it for searches


@dataclass(frozen=True, slots=True)
class NodeProblem:
    """The first place where a node's chain in the database is not what the node shipped, and why."""

    node: str
    seq: int  # the sequence number that belongs at this place
    reason: str


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What the walk of one node's chain in the database found."""

    node: str
    problem: NodeProblem | None
    records: int
    first_seq: int | None
    last_seq: int | None
    head: tuple[int, str] | None  # the anchored (seq, hash)
    retention_start: int | None
    recovered: int  # crashes the node recovered from (records in the chain, not tampering)
    lost_records: int  # counted by gap records
    checkpoints_checked: int
    notes: list[str]

    @property
    def ok(self) -> bool:
        """Whether the node's chain is intact."""
        return self.problem is None


@dataclass(frozen=True, slots=True)
class SharedReport:
    """What `verify_database` found, node by node."""

    nodes: list[NodeReport]

    @property
    def ok(self) -> bool:
        """Whether every node's chain is intact."""
        return all(node.ok for node in self.nodes)

    @property
    def records(self) -> int:
        """Records that check out, over every node."""
        return sum(node.records for node in self.nodes)

    @property
    def problems(self) -> list[NodeProblem]:
        """The first problem of each node that has one."""
        return [node.problem for node in self.nodes if node.problem is not None]


def verify_database(
    store: PgAuditStore, *, checkpoints: Sequence[tuple[int, str]] = (), node: str | None = None
) -> SharedReport:
    """Walk every node's chain in the shared database against its anchored head (blocking).

    `checkpoints` are (seq, hash) pairs from the operational log of node `node` (this node); each must
    match that node's chain, unless it is beyond what was shipped so far. Raises DatabaseError when the
    database cannot be read: that is no verdict either way.
    """
    heads = store.heads()
    reports = []
    for name in store.nodes():
        mine = checkpoints if name == node else ()
        reports.append(_NodeWalk(name, heads.get(name), mine).run(store.chain(name)))
    return SharedReport(reports)


def database_summary(report: SharedReport) -> list[str]:
    """The report as short lines for a person: the verdict first, then one line or more per node."""
    nodes = report.nodes
    if not nodes:
        return ["shared audit trail: intact, but there are no records yet"]
    if report.ok:
        out = [f"shared audit trail: intact: {report.records} records from {len(nodes)} nodes"]
    else:
        bad = ", ".join(problem.node for problem in report.problems)
        out = [f"shared audit trail: NOT INTACT (node {bad})"]
    for item in nodes:
        if item.problem is not None:
            out.append(f"  node {item.node}: NOT INTACT at seq {item.problem.seq}: {item.problem.reason}")
            out.append(f"    {item.records} records check out before the problem")
        else:
            span = f", seq {item.first_seq}..{item.last_seq}" if item.records else ""
            out.append(f"  node {item.node}: intact: {item.records} records{span}")
        if item.retention_start is not None:
            out.append(f"    records before seq {item.retention_start} were removed by the node's retention")
        if item.recovered:
            out.append(f"    {item.recovered} crashes recovered from (recovered records)")
        if item.lost_records:
            out.append(
                f"    {item.lost_records} records were never written while writing failed (gap records)"
            )
        if item.checkpoints_checked:
            out.append(f"    checkpoints: {item.checkpoints_checked} compared")
        out += [f"    warning: {note}" for note in item.notes]
    return out


class _Stop(Exception):
    """Ends a node's walk at its first problem."""

    def __init__(self, problem: NodeProblem) -> None:
        """Carry the problem out of the walk."""
        super().__init__(problem.reason)
        self.problem = problem


class _NodeWalk:
    """One node's chain as the database holds it, walked in seq order."""

    def __init__(
        self, node: str, head: tuple[int, str] | None, checkpoints: Sequence[tuple[int, str]]
    ) -> None:
        self.node = node
        self.head = head
        self.checkpoints: dict[int, set[str]] = {}
        for seq, digest in checkpoints:
            self.checkpoints.setdefault(seq, set()).add(digest.lower())
        self.first: int | None = None
        self.first_prev = ""
        self.last: int | None = None
        self.last_hash = ""
        self.records = 0
        self.retention: dict[int, str] = {}
        self.retention_start: int | None = None
        self.recovered = 0
        self.lost = 0
        self.checked = 0
        self.notes: list[str] = []

    def run(self, rows: Iterator[AuditRow]) -> NodeReport:
        """Walk every row, then check the end against the head."""
        problem: NodeProblem | None = None
        try:
            current: AuditRow | None = None
            for following in rows:
                if current is not None:
                    self.row(current, following)
                current = following
            if current is not None:
                self.row(current, None)
            self.finish()
        except _Stop as stop:
            problem = stop.problem
        return NodeReport(
            node=self.node,
            problem=problem,
            records=self.records,
            first_seq=self.first,
            last_seq=self.last,
            head=self.head,
            retention_start=self.retention_start,
            recovered=self.recovered,
            lost_records=self.lost,
            checkpoints_checked=self.checked,
            notes=self.notes,
        )

    def fail(self, seq: int, reason: str) -> NoReturn:
        """Stop at a problem."""
        raise _Stop(NodeProblem(self.node, seq, reason))

    def row(self, row: AuditRow, following: AuditRow | None) -> None:
        """Check one stored record: its form, its place, its link to the one before, the head."""
        seq, moment, line = row
        record = chain.parse_record(line)
        if record is None:
            self.fail(seq, "record changed: the stored line is not JSON")
        malformed = _malformed(record, line)
        if malformed is not None:
            self.fail(seq, f"record changed: {malformed}")
        if self.last is not None and seq > self.last + 1:
            self.fail(self.last + 1, f"{_missing(self.last + 1, seq)}: records removed")
        if record["seq"] != seq:
            self.fail(seq, f"records reordered: the record stored as seq {seq} is seq {record['seq']}")
        if self.head is None:
            self.fail(seq, "record inserted, or the node's head removed: this node has no anchored head")
        if seq > self.head[0]:
            self.fail(
                seq, f"record inserted: seq {seq} lies beyond the node's anchored head, seq {self.head[0]}"
            )
        digest = chain.line_hash(line)
        if self.last is None:
            if seq == 1 and record["prev"] != chain.GENESIS:
                self.fail(1, "record changed: the first record's prev is not the genesis value")
            self.first, self.first_prev = seq, record["prev"]
        elif record["prev"] != self.last_hash:
            if self.links_forward(seq, digest, following):
                self.fail(self.last, f"record changed: its hash is not the prev that seq {seq} names")
            self.fail(seq, f"record changed or inserted: its prev does not match the hash of seq {self.last}")
        if seq == self.head[0] and digest != self.head[1]:
            self.fail(seq, "record changed: its hash does not match the node's anchored head")
        when = chain.record_time(record["time"])
        if when is None or abs(when.timestamp() - moment) > _TIME_SLACK:
            self.fail(seq, "the time stored beside the record is not the record's own: the table was changed")
        for expected in sorted(self.checkpoints.get(seq, ())):
            self.checked += 1
            if expected != digest:
                self.fail(seq, f"checkpoint seq {seq} hash mismatch: the chain was rewritten")
        self.note(record)
        self.last, self.last_hash = seq, digest
        self.records += 1

    def links_forward(self, seq: int, digest: str, following: AuditRow | None) -> bool:
        """Whether the record after this one (or the head) names this one's hash: then it is genuine."""
        if self.head is not None and self.head == (seq, digest):
            return True
        if following is None or following[0] != seq + 1:
            return False
        after = chain.parse_record(following[2])
        return after is not None and after.get("prev") == digest

    def note(self, record: dict[str, Any]) -> None:
        """Remember what the chain's own records explain: crashes, removed files, records never written."""
        kind = record["type"]
        if kind == chain.RECOVERED:
            self.recovered += 1
        elif kind == chain.RETENTION:
            last_seq, last_hash = record.get("last_seq"), record.get("last_hash")
            if type(last_seq) is int and isinstance(last_hash, str):
                self.retention[last_seq] = last_hash
        elif kind == chain.GAP and type(lost := record.get("lost")) is int:
            self.lost += lost

    def finish(self) -> None:
        """The chain must reach the anchored head, and start at seq 1 or where retention says."""
        head = self.head
        if head is not None and (self.last is None or head[0] > self.last):
            said = f"the chain ends at seq {self.last}" if self.last is not None else "no records are left"
            after = 1 if self.last is None else self.last + 1
            self.fail(after, f"records cut off: {said}, but the node's anchored head is seq {head[0]}")
        if self.first is not None and self.first > 1:
            last_hash = self.retention.get(self.first - 1)
            if last_hash is None:
                self.fail(
                    1,
                    f"{_missing(1, self.first)}: records removed (the chain starts at seq {self.first} "
                    "and no retention record explains it)",
                )
            if last_hash != self.first_prev:
                self.fail(
                    self.first,
                    "record changed or inserted: its prev does not match the last_hash of the retention "
                    f"record that removed seq {self.first - 1}",
                )
            self.retention_start = self.first
        beyond = [seq for seq in self.checkpoints if self.last is None or seq > self.last]
        if beyond:
            self.notes.append(
                f"{len(beyond)} checkpoints lie beyond the records shipped so far: compare them with the "
                "node's own files"
            )


def _read_head(folder: Path) -> tuple[chain.Head | None, bool]:
    """The head marker, and whether one exists that is not valid; an unreadable one raises OSError."""
    path = folder / chain.HEAD_FILE
    if not path.is_file():
        return None, False
    path.read_bytes()  # no permission to read is an error to report, not a verdict on the trail
    head = chain.read_head(folder)
    return head, head is None


def _malformed(record: dict[str, Any], line: bytes) -> str | None:
    """What is wrong with a parsed record's form, or None when it is a record as the daemon writes them."""
    if tuple(record)[: len(_HEADER)] != _HEADER:
        return "record does not start with the seq, time, prev and type fields"
    seq, time, prev, kind = (record[name] for name in _HEADER)
    if type(seq) is not int or seq < 1:
        return "record's seq is not a positive whole number"
    if not (isinstance(time, str) and isinstance(prev, str) and isinstance(kind, str)):
        return "record's time, prev and type are not all text"
    if _canonical(record) != line:
        return "line is not in the daemon's exact form (spacing, escapes or number format changed)"
    return None


def _canonical(record: dict[str, Any]) -> bytes | None:
    """The canonical line of a record, or None when it has none (text with lone surrogates)."""
    try:
        return chain.canonical_line(record)
    except UnicodeEncodeError:
        return None


def _recovery(record: dict[str, Any], mark: _Mark) -> Recovery:
    """A `recovered` record as the report lists it."""
    reason, torn, head_seq = record.get("reason"), record.get("torn_bytes"), record.get("head_seq")
    return Recovery(
        file=mark.file,
        line=mark.line,
        seq=mark.seq,
        reason=reason if isinstance(reason, str) and reason else "crash recovered",
        torn_bytes=torn if type(torn) is int else 0,
        head_seq=head_seq if type(head_seq) is int else None,
    )


def _look_ahead(rest: Iterator[bytes], wanted: int) -> tuple[int | None, bool]:
    """The seq of the next line, and whether `wanted` comes later in the same file."""
    next_seq: int | None = None
    for index, raw in enumerate(rest):
        seq = _seq_of(raw)
        if index == 0:
            next_seq = seq
        if seq == wanted:
            return next_seq, True
    return next_seq, False


def _seq_of(raw: bytes) -> int | None:
    """The seq of a raw line, if it is a record that has one."""
    record = chain.parse_record(raw.rstrip(b"\n"))
    seq = record.get("seq") if record is not None else None
    return seq if type(seq) is int else None


def _time_text(moment: datetime) -> str:
    """A moment as record time text."""
    return chain.utc_now_text(moment.timestamp())


def _missing(expected: int, found: int) -> str:
    """ "seq 5 missing" or "seqs 5..9 missing" for the records between the expected seq and the one found."""
    return f"seq {expected} missing" if found - expected == 1 else f"seqs {expected}..{found - 1} missing"
