"""Seats-in-use charts for `report seats --chart` and the console, demand beside them where planned.

matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from license_server.reports.plan import LicensePlan
from license_server.reports.seats import LicenseUsage, SeatReport
from license_server.reports.tables import printable
from license_server.storage.seats import License

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from numpy import datetime64
    from numpy.typing import NDArray

INSTALL_HINT = "in the license-server checkout, run .venv/bin/pip install '.[charts]'"
FORMATS: tuple[str, ...] = ("svg", "png")
MAX_STEP_POINTS = 5000  # per license; beyond that a step line is unreadable, and peaks per bucket are drawn
_SIZE_INCHES = (12.0, 5.0)
_DPI = 150


class ChartsUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require() -> None:
    """Raise ChartsUnavailableError unless matplotlib can be imported (checked before a long report runs)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        raise ChartsUnavailableError(INSTALL_HINT) from exc


def chart_format(path: Path) -> str:
    """The picture format a chart file's extension names; ValueError for any other extension."""
    form = path.suffix.lower().removeprefix(".")
    if form not in FORMATS:
        raise ValueError(f"--chart {path}: the file name must end in .svg or .png")
    return form


def seat_series(report: SeatReport, usage: LicenseUsage) -> tuple[list[float], list[int]]:
    """Seats in use over the range as a step line: each point holds until the next, the last until `until`.

    Every change when the report kept them, else the peak of each bucket.
    """
    since, until = report.query.since, report.query.until
    if usage.steps is not None:
        times, counts = [since], [0]
        for moment, live in usage.steps:
            if moment == times[-1]:
                counts[-1] = live
            else:
                times.append(moment)
                counts.append(live)
    else:
        peaks = {row.interval_start: row.peak_seats for row in usage.rows}
        starts = [report.buckets.start(index) for index in range(report.buckets.count)]
        times = [max(float(start), since) for start in starts]
        counts = [peaks.get(start, 0) for start in starts]
    times.append(until)
    counts.append(counts[-1])
    return times, counts


def demand_series(report: SeatReport, plan: LicensePlan) -> tuple[list[float], list[int]]:
    """Demand (leases and waiting machines) over the range as a step line, as seat_series draws seats.

    Every change when there are at most MAX_STEP_POINTS, else the peak of each of the report's buckets.
    """
    since, until = report.query.since, report.query.until
    if len(plan.steps) <= MAX_STEP_POINTS:
        times = [max(moment / 1_000_000, since) for moment, _, _ in plan.steps] or [since]
        counts = [held + waiting for _, held, waiting in plan.steps] or [0]
    else:
        buckets = report.buckets
        peaks = [0] * buckets.count
        ends = [moment / 1_000_000 for moment, _, _ in plan.steps[1:]] + [until]
        for (moment, held, waiting), end in zip(plan.steps, ends, strict=True):
            # the buckets the step is live in, [moment, end): from the one holding it to the one before end
            first = max(buckets.index(moment / 1_000_000), 0)
            last = min(math.ceil((end - buckets.origin) / buckets.size) - 1, buckets.count - 1)
            for index in range(first, last + 1):
                peaks[index] = max(peaks[index], held + waiting)
        times = [max(float(buckets.start(index)), since) for index in range(buckets.count)]
        counts = peaks
    times.append(until)
    counts.append(counts[-1])
    return times, counts


def draw_seats(report: SeatReport, path: Path, demand: Mapping[License, LicensePlan] | None = None) -> None:
    """Write the chart of floating seats in use against each license's limit to an .svg or .png file.

    With `demand` (the plan of the same range), each license's demand is drawn dotted beside its seats.
    """
    form = chart_format(path)
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ChartsUnavailableError(INSTALL_HINT) from exc

    # A context, not matplotlib.rcParams: the settings end with this chart. Keys are the workstations'
    # text: drawn as plain text, never as mathtext or TeX, whatever a matplotlibrc says.
    with matplotlib.rc_context(
        {"date.converter": "concise", "timezone": "UTC", "text.usetex": False, "text.parse_math": False}
    ):
        figure = Figure(figsize=_SIZE_INCHES, layout="constrained")
        FigureCanvasAgg(figure)  # no display: Agg draws PNGs, and SVGs are written by their own backend
        axes = figure.add_subplot()
        for usage in report.licenses:
            times, counts = seat_series(report, usage)
            label = printable(f"{usage.key} (product {usage.product_id})")
            (line,) = axes.step(_dates(times), counts, where="post", label=label, linewidth=1.2)
            planned = None if demand is None else demand.get((usage.product_id, usage.key))
            if planned is not None and planned.peak_demand > planned.peak_seats:
                wanted, levels = demand_series(report, planned)
                axes.step(
                    _dates(wanted),
                    levels,
                    where="post",
                    color=line.get_color(),
                    linestyle=":",
                    linewidth=1.2,
                    label=printable(f"{usage.key}: demand, refused machines included"),
                )
            if usage.seat_limit:
                limit = printable(f"{usage.key}: limit of {usage.seat_limit}")
                axes.axhline(usage.seat_limit, color=line.get_color(), linestyle="--", label=limit)
        if not report.licenses:
            axes.step(_dates([report.query.since, report.query.until]), [0, 0], where="post")
            axes.text(0.5, 0.5, "no seat activity in this range", transform=axes.transAxes, ha="center")
        else:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # beside, not over
        _label(axes, report)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.savefig(path, format=form, dpi=_DPI, metadata=_metadata(form))


def _dates(times: list[float]) -> NDArray[datetime64]:
    """Unix times as datetime64, which matplotlib labels as dates."""
    import numpy  # comes with matplotlib

    return numpy.array([round(moment * 1_000_000) for moment in times], dtype="datetime64[us]")


def _label(axes: Axes, report: SeatReport) -> None:
    """Title, axis labels and limits of the chart."""
    since, until = (
        datetime.fromtimestamp(moment, UTC) for moment in (report.query.since, report.query.until)
    )
    bucket_peaks = any(usage.steps is None for usage in report.licenses)
    kind = f"peak per {report.query.every}" if bucket_peaks else "at each moment"
    axes.set_title(f"Floating seats in use ({kind}), {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC")
    axes.set_xlabel("date (UTC)")
    axes.set_ylabel("floating seats in use")
    axes.margins(x=0)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)


def _metadata(form: str) -> dict[str, str | None]:
    """File metadata without a creation date, so that the same report draws the same file."""
    return {"Date": None} if form == "svg" else {"Software": "license-server"}
