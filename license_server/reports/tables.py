"""The one home of the table, CSV and JSON writers, and of the cell escaping that keeps their output safe."""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TextIO

# First characters that make a spreadsheet read a cell as a formula (or, for tab and CR, can be trimmed
# away in front of one); the full-width forms are read as formulas by some spreadsheets in East Asian locales.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_NO_FOOTERS: Mapping[int, str] = MappingProxyType({})


def iso(moment: float | None) -> str | None:
    """A unix time as ISO 8601 UTC to the second, e.g. 2026-11-01T00:00:00Z; None stays None."""
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))  # a third of datetime's cost


# --- cells ------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Text with control, bidirectional and other unprintable characters as visible escapes, e.g. \\x1b."""
    # Workstations choose keys, machine codes and names: never let them put terminal escapes on an admin's
    # screen, nor reorder what a table or a spreadsheet shows.
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def cell(value: object) -> str:
    """One table cell: null as '-', booleans as yes/no, control characters escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))


def json_text(value: object) -> str:
    """Compact JSON that decodes to exactly `value`, with every unprintable character as a \\u escape.

    Programs read the exact value back; a terminal that shows the line gets no control or bidirectional
    character (json.dumps itself escapes only those below U+0020).
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isprintable():
        return text
    # Outside strings JSON has only printable ASCII, so every character replaced here is inside a string.
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def csv_value(value: object) -> object:
    """A field as a CSV cell: null empty, booleans and nested values as JSON, text safe for a spreadsheet.

    Every CSV writer writes its cells through this. Text gets unprintable characters as visible escapes, and
    text a spreadsheet would take for a formula (= + - @, their full-width forms, a tab or carriage return
    first) gets a leading single quote, as OWASP advises; numbers stay numbers.
    """
    if isinstance(value, str):
        return _neutralised(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json_text(value)
    return value


def _neutralised(text: str) -> str:
    """Text as a CSV cell: visible escapes, and a quote first if it would start a formula."""
    if text.startswith(_FORMULA_STARTS):
        return "'" + printable(text)
    return printable(text)


# --- writers ----------------------------------------------------------------------------------------


def write_json(rows: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """Write rows as JSON lines, every value exact; returns how many."""
    count = 0
    for row in rows:
        out.write(json_text(row) + "\n")
        count += 1
    return count


def write_csv(columns: Sequence[str], rows: Iterable[Iterable[object]], out: TextIO) -> int:
    """Write a header and one line per row, every cell through csv_value; returns how many rows."""
    return write_prepared_csv(columns, ([csv_value(value) for value in row] for row in rows), out)


def write_prepared_csv(columns: Sequence[str], rows: Iterable[Iterable[object]], out: TextIO) -> int:
    """Write a header and rows whose cells the caller already passed through csv_value; returns how many.

    For reports of hundreds of thousands of rows that make each repeated cell once (a key, a day).
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


def write_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    out: TextIO,
    *,
    empty: str,
    right_aligned: Collection[str] = frozenset(),
    footers: Mapping[int, str] = _NO_FOOTERS,
    width_sample: int | None = None,
) -> int:
    """Write cells as aligned columns under a header, or `empty` when there are none; returns how many rows.

    Widths are fixed from the first `width_sample` rows (all when None), so that a long output streams. A
    footer line follows each row (by number) that `footers` names, and a blank line parts it from the next.
    """
    rest = iter(rows)
    sample = list(itertools.islice(rest, width_sample)) if width_sample is not None else list(rest)
    if not sample:
        out.write(empty + "\n")
        return 0
    widths = [max(len(column), *(len(row[index]) for row in sample)) for index, column in enumerate(columns)]
    out.write(_aligned(columns, widths, columns, right_aligned))
    count = 0
    for number, row in enumerate(itertools.chain(sample, rest)):
        if number - 1 in footers:
            out.write("\n")
        out.write(_aligned(row, widths, columns, right_aligned))
        if number in footers:
            out.write(f"  {footers[number]}\n")
        count += 1
    return count


def _aligned(
    cells: Sequence[str], widths: Sequence[int], columns: Sequence[str], right_aligned: Collection[str]
) -> str:
    """One table line: cells padded to their column's width, those in `right_aligned` to the right."""
    parts = [
        text.rjust(width) if column in right_aligned else text.ljust(width)
        for text, width, column in zip(cells, widths, columns, strict=True)
    ]
    return "  ".join(parts).rstrip() + "\n"
