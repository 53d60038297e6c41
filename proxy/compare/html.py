"""The report as one self-contained HTML page: tables and inline SVG plots drawn here,
no scripts, no fonts or styles fetched from anywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from proxy.compare.report import (
    PRODUCTION,
    REFERENCE,
    SHADOW,
    BackendReport,
    Report,
    table_rows,
    verdict_lines,
)
from proxy.compare.stats import OTHER_LABEL

__all__ = ["render_html"]

_PRODUCTION_COLOUR = "#1f4e79"
_SHADOW_COLOURS = ("#d9480f", "#7048e8", "#c2255c", "#e67700", "#0b7285")
_REFERENCE_COLOURS = ("#2b8a3e", "#5c940d", "#087f5b")
_CONFUSION_LABELS = 20  # more than this many labels on an axis is unreadable

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529;
       margin: 24px auto; max-width: 1180px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px;
     border-bottom: 1px solid #dee2e6; padding-bottom: 4px; }
.meta { color: #495057; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e9ecef; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #adb5bd; }
td.sub { padding-left: 24px; color: #495057; }
.verdict { padding: 8px 12px; border-radius: 6px; margin: 6px 0; }
.safe { background: #d3f9d8; border-left: 5px solid #2b8a3e; }
.unsafe { background: #ffe3e3; border-left: 5px solid #c92a2a; }
.unknown { background: #f1f3f5; border-left: 5px solid #868e96; }
.note { background: #fff9db; border-left: 5px solid #f08c00; padding: 6px 12px; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 24px; }
figure { margin: 0; } figcaption { color: #495057; font-size: 13px; max-width: 560px; }
svg text { font: 11px system-ui, sans-serif; fill: #343a40; }
svg .title { font-size: 13px; font-weight: 600; }
svg .grid { stroke: #e9ecef; stroke-width: 1; }
svg .axis { stroke: #868e96; stroke-width: 1; }
code { font-size: 12px; }
"""


def _colours(backends: Sequence[BackendReport]) -> dict[str, str]:
    colours: dict[str, str] = {}
    shadows = references = 0
    for backend in backends:
        if backend.role == PRODUCTION:
            colours[backend.column] = _PRODUCTION_COLOUR
        elif backend.role == REFERENCE:
            colours[backend.column] = _REFERENCE_COLOURS[references % len(_REFERENCE_COLOURS)]
            references += 1
        else:
            colours[backend.column] = _SHADOW_COLOURS[shadows % len(_SHADOW_COLOURS)]
            shadows += 1
    return colours


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


class _Plot:
    """An SVG canvas with a plotting area, scales and axes."""

    def __init__(self, width: int = 560, height: int = 320, title: str = "") -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 64, 30, 40, 46
        self.parts: list[str] = []
        self.title = title
        self.x0 = self.x1 = self.y0 = self.y1 = 0.0
        self.x_log = False

    @property
    def inner_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def inner_height(self) -> float:
        return self.height - self.top - self.bottom

    def scales(self, x0: float, x1: float, y0: float, y1: float, x_log: bool = False) -> None:
        if x1 <= x0:
            x1 = x0 + 1
        if y1 <= y0:
            y1 = y0 + 1
        self.x0, self.x1, self.y0, self.y1, self.x_log = x0, x1, y0, y1, x_log

    def x(self, value: float) -> float:
        if self.x_log:
            value, low, high = math.log10(value), math.log10(self.x0), math.log10(self.x1)
        else:
            low, high = self.x0, self.x1
        return self.left + (value - low) / (high - low) * self.inner_width

    def y(self, value: float) -> float:
        return self.top + (1 - (value - self.y0) / (self.y1 - self.y0)) * self.inner_height

    def add(self, element: str) -> None:
        self.parts.append(element)

    def x_ticks(self, ticks: Sequence[tuple[float, str]], label: str) -> None:
        bottom = self.top + self.inner_height
        for value, text in ticks:
            x = self.x(value)
            self.add(
                f'<line class="grid" x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{bottom}"/>'
            )
            self.add(
                f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{escape(text)}</text>'
            )
        self.add(
            f'<text x="{self.left + self.inner_width / 2:.1f}" y="{self.height - 8}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )

    def y_ticks(self, ticks: Sequence[tuple[float, str]], label: str) -> None:
        right = self.left + self.inner_width
        for value, text in ticks:
            y = self.y(value)
            self.add(
                f'<line class="grid" x1="{self.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
            )
            self.add(
                f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(text)}</text>'
            )
        middle = self.top + self.inner_height / 2
        self.add(
            f'<text x="14" y="{middle:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {middle:.1f})">{escape(label)}</text>'
        )

    def legend(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """(colour, text, dash) per entry, in a row under the title."""
        x: float = self.left
        for colour, text, dash in entries:
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            self.add(
                f'<line x1="{x}" y1="28" x2="{x + 18}" y2="28" stroke="{colour}" '
                f'stroke-width="2.5"{dashes}/>'
            )
            self.add(f'<text x="{x + 22}" y="32">{escape(text)}</text>')
            x += 30 + 6.5 * len(text)

    def svg(self, label: str) -> str:
        axes = (
            f'<line class="axis" x1="{self.left}" y1="{self.top + self.inner_height}" '
            f'x2="{self.left + self.inner_width}" y2="{self.top + self.inner_height}"/>'
            f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" '
            f'y2="{self.top + self.inner_height}"/>'
        )
        title = f'<text class="title" x="{self.left}" y="14">{escape(self.title)}</text>'
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" '
            f'aria-label="{escape(label)}">{title}{"".join(self.parts)}{axes}</svg>'
        )


def _polyline(points: Sequence[tuple[float, float]], colour: str, dash: str = "") -> str:
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
        f'stroke-linejoin="round"{dashes}/>'
    )


def _log_ticks(low: float, high: float) -> list[tuple[float, str]]:
    ticks = []
    decades = math.log10(high) - math.log10(low)
    steps = (1, 2, 5) if decades <= 3 else (1, 3) if decades <= 5 else (1,)
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for step in steps:
            value = step * 10.0**exponent
            if low <= value <= high:
                ticks.append((value, _number(value)))
    return ticks


def _legend_name(backend: BackendReport) -> str:
    return backend.name if backend.name == backend.role else f"{backend.name} ({backend.role})"


def _latency_curves(
    report: Report, tail: bool
) -> tuple[list[tuple[BackendReport, list[tuple[float, float]]]], float, float]:
    """Per backend, the share of calls within (or, for ``tail``, slower than) x ms."""
    curves: list[tuple[BackendReport, list[tuple[float, float]]]] = []
    low, high = math.inf, 0.0
    for backend in report.backends:
        histogram = [(lo, hi, n) for lo, hi, n in backend.latency.histogram if n]
        if not histogram:
            continue
        total = sum(n for _, _, n in histogram)
        points: list[tuple[float, float]] = []
        seen = 0
        for lo, hi, n in histogram:
            lo = max(lo, 1e-3)
            hi = max(hi, lo * 1.0001)
            share = 1 - seen / total if tail else seen / total
            points.append((lo, share))
            seen += n
            points.append((hi, 1 - seen / total if tail else seen / total))
        if tail:
            # On a log scale the last point (nothing slower) cannot be drawn: stop at 1 call.
            points = [(x, max(y, 0.5 / total)) for x, y in points]
        curves.append((backend, points))
        low = min(low, points[0][0])
        high = max(high, points[-1][0])
    return curves, low, high


def latency_plot(report: Report) -> str:
    """The share of calls answered within a latency, per backend (log scale)."""
    colours = _colours(report.backends)
    curves, low, high = _latency_curves(report, tail=False)
    plot = _Plot(title="Latency: share of calls answered within x ms")
    if not curves:
        return plot.svg("no latency")
    low = 10 ** math.floor(math.log10(low))
    high = 10 ** math.ceil(math.log10(high))
    plot.scales(low, high, 0, 1, x_log=True)
    plot.x_ticks(_log_ticks(low, high), "latency, ms (log scale)")
    plot.y_ticks([(v / 100, f"{v}%") for v in range(0, 101, 20)], "calls")
    for level in (0.5, 0.9):
        y = plot.y(level)
        plot.add(
            f'<line x1="{plot.left}" y1="{y:.1f}" x2="{plot.left + plot.inner_width}" '
            f'y2="{y:.1f}" stroke="#adb5bd" stroke-dasharray="3 3"/>'
            f'<text x="{plot.left + plot.inner_width - 2}" y="{y - 3:.1f}" '
            f'text-anchor="end" fill="#868e96">p{round(level * 100)}</text>'
        )
    for backend, points in curves:
        colour = colours[backend.column]
        plot.add(_polyline([(plot.x(x), plot.y(y)) for x, y in points], colour))
    plot.legend([(colours[b.column], _legend_name(b), "") for b, _ in curves])
    return plot.svg("latency distribution per backend")


def latency_tail_plot(report: Report) -> str:
    """The share of calls slower than a latency, both axes on log scales: the tail."""
    colours = _colours(report.backends)
    curves, low, high = _latency_curves(report, tail=True)
    plot = _Plot(title="Latency tail: share of calls slower than x ms")
    if not curves:
        return plot.svg("no latency")
    low = 10 ** math.floor(math.log10(low))
    high = 10 ** math.ceil(math.log10(high))
    smallest = min(y for _, points in curves for _, y in points)
    bottom = 10 ** math.floor(math.log10(smallest))
    decades = max(1, round(-math.log10(bottom)))
    # The y axis is log10(share), drawn as a linear scale from log10(bottom) to 0.
    plot.scales(low, high, -decades, 0, x_log=True)
    plot.x_ticks(_log_ticks(low, high), "latency, ms (log scale)")
    plot.y_ticks(
        [(-d, f"{100 * 10.0**-d:.{max(0, d - 2)}f}%") for d in range(decades + 1)],
        "calls slower (log scale)",
    )
    for percentile, d in (("p90", 1), ("p99", 2), ("p99.9", 3)):
        if d <= decades:
            y = plot.y(-d)
            plot.add(
                f'<text x="{plot.left + plot.inner_width - 2}" y="{y - 3:.1f}" '
                f'text-anchor="end" fill="#868e96">{percentile}</text>'
            )
    for backend, points in curves:
        colour = colours[backend.column]
        plot.add(_polyline([(plot.x(x), plot.y(math.log10(y))) for x, y in points], colour))
    plot.legend([(colours[b.column], _legend_name(b), "") for b, _ in curves])
    return plot.svg("latency tail per backend")


def _clock(ns: float, span_s: float) -> str:
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    if span_s < 10:
        return moment.strftime("%H:%M:%S.%f")[:-3]
    return moment.strftime("%H:%M:%S" if span_s < 86400 else "%m-%d %H:%M")


_MIN_CALLS_PER_POINT = 20
_MAX_POINTS = 80


def _regrouped(report: Report) -> tuple[list[tuple[int, dict[str, dict[str, int]]]], float]:
    """The timeline's buckets merged so that a point has enough calls to mean something
    (a rate of 1 of 2 calls is noise), at most ``_MAX_POINTS`` of them."""
    timeline = report.timeline
    compared = sum(
        counts["compared"]
        for bucket in timeline
        for column, counts in bucket.backends.items()
        if column.startswith("shadow:")
    ) or sum(c["compared"] for b in timeline for c in b.backends.values())
    points = max(1, min(_MAX_POINTS, compared // _MIN_CALLS_PER_POINT))
    group = max(1, math.ceil(len(timeline) / points))
    merged: list[tuple[int, dict[str, dict[str, int]]]] = []
    for i in range(0, len(timeline), group):
        sums: dict[str, dict[str, int]] = {}
        for bucket in timeline[i : i + group]:
            for column, counts in bucket.backends.items():
                into = sums.setdefault(column, dict.fromkeys(counts, 0))
                for key, n in counts.items():
                    into[key] += n
        merged.append((timeline[i].start_ns, sums))
    return merged, report.timeline_width_s * group


def _nice_floor(lowest: float) -> tuple[float, float]:
    """A round bottom for a 0..1 axis that shows ``lowest``, and a round tick step."""
    for step in (0.01, 0.02, 0.05, 0.1, 0.2):
        floor = math.floor(lowest / step) * step
        if (1.0 - floor) / step <= 6:
            return max(0.0, floor), step
    return 0.0, 0.2


def agreement_plot(report: Report) -> str:
    """Agreement with production per time bucket, per shadow and reference; calls as bars."""
    colours = _colours(report.backends)
    others = [b for b in report.backends if b.role != PRODUCTION and b.compared]
    plot = _Plot(title="Agreement with production over time")
    if not report.timeline or not others:
        plot.scales(0, 1, 0, 1)
        plot.add(
            f'<text x="{plot.left + 20}" y="{plot.top + 40}">no compared calls: agreement '
            "unknown</text>"
        )
        return plot.svg("agreement over time: unknown")
    buckets, width_s = _regrouped(report)
    width_ns = width_s * 1e9
    start = buckets[0][0]
    end = buckets[-1][0] + width_ns
    lowest = 1.0
    series: list[tuple[BackendReport, list[tuple[float, float]], list[tuple[float, float]]]] = []
    most = 1
    for backend in others:
        plain: list[tuple[float, float]] = []
        adjusted: list[tuple[float, float]] = []
        for bucket_start, columns in buckets:
            counts = columns.get(backend.column)
            if not counts or not counts["compared"]:
                continue
            middle = bucket_start + width_ns / 2
            rate = counts["agreed"] / counts["compared"]
            plain.append((middle, rate))
            adjusted.append((middle, (counts["agreed"] + counts["noise"]) / counts["compared"]))
            lowest = min(lowest, rate)
            most = max(most, counts["compared"])
        series.append((backend, plain, adjusted))
    floor, step = _nice_floor(lowest)
    plot.scales(start, end, floor, 1.0)
    span_s = (end - start) / 1e9
    ticks = [
        (start + i * (end - start) / 4, _clock(start + i * (end - start) / 4, span_s))
        for i in range(5)
    ]
    plot.x_ticks(ticks, f"time, UTC (points of {_number(width_s)} s)")
    ticks_y = [floor + i * step for i in range(round((1.0 - floor) / step) + 1)]
    plot.y_ticks([(v, f"{100 * v:.0f}%") for v in ticks_y], "agree")
    # Call volume as light bars behind, scaled to a third of the plot's height.
    first = series[0][0]
    bar_width = max(1.0, plot.inner_width * width_ns / (end - start) - 1)
    for bucket_start, columns in buckets:
        counts = columns.get(first.column)
        if not counts or not counts["compared"]:
            continue
        height = counts["compared"] / most * plot.inner_height * 0.35
        x = plot.x(bucket_start)
        plot.add(
            f'<rect x="{x:.1f}" y="{plot.top + plot.inner_height - height:.1f}" '
            f'width="{bar_width:.1f}" height="{height:.1f}" fill="#e9ecef">'
            f"<title>{counts['compared']:,} compared calls of {escape(first.name)}</title></rect>"
        )
    legend: list[tuple[str, str, str]] = []
    for backend, plain, adjusted in series:
        colour = colours[backend.column]
        plot.add(_polyline([(plot.x(x), plot.y(y)) for x, y in plain], colour))
        legend.append((colour, _legend_name(backend), ""))
        if backend.role == SHADOW and backend.noise:
            plot.add(_polyline([(plot.x(x), plot.y(y)) for x, y in adjusted], colour, "5 3"))
            legend.append((colour, "noise excused", "5 3"))
        for x, y in plain if len(plain) < 40 else ():
            plot.add(f'<circle cx="{plot.x(x):.1f}" cy="{plot.y(y):.1f}" r="2.5" fill="{colour}"/>')
    plot.legend(legend)
    return plot.svg("agreement over time")


def _shade(share: float) -> str:
    # White to deep blue, on a square-root scale so that small counts still show.
    level = math.sqrt(max(0.0, min(1.0, share)))
    red = round(255 - level * (255 - 31))
    green = round(255 - level * (255 - 78))
    blue = round(255 - level * (255 - 121))
    return f"#{red:02x}{green:02x}{blue:02x}"


def confusion_plot(backend: BackendReport) -> str:
    """Production's label (rows) against the candidate's (columns), one cell per pair."""
    confusion = backend.confusion
    assert confusion is not None
    labels, matrix = confusion.labels, confusion.matrix
    if len(labels) > _CONFUSION_LABELS:
        # Keep the busiest labels; fold the rest into "(other)".
        weight = {
            label: sum(matrix[i]) + sum(row[i] for row in matrix) for i, label in enumerate(labels)
        }
        kept = sorted(labels, key=lambda label: -weight[label])[: _CONFUSION_LABELS - 1]
        kept_set = set(kept)
        folded_labels = [label for label in labels if label in kept_set] + [OTHER_LABEL]
        position = {label: i for i, label in enumerate(folded_labels)}
        folded = [[0] * len(folded_labels) for _ in folded_labels]
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                row = position.get(a, position[OTHER_LABEL])
                column = position.get(b, position[OTHER_LABEL])
                folded[row][column] += matrix[i][j]
        labels, matrix = folded_labels, folded
    n = len(labels)
    cell = max(22, min(56, 440 // max(n, 1)))
    longest = max((len(label) for label in labels), default=1)
    margin_left = 40 + min(120, 7 * longest)
    margin_top = 70
    width = max(380, margin_left + n * cell + 20)
    height = margin_top + n * cell + 40
    total = sum(sum(row) for row in matrix) or 1
    biggest = max((max(row) for row in matrix), default=1) or 1
    parts = [
        f'<text class="title" x="4" y="14">Predicted labels: production vs {escape(backend.name)}'
        "</text>",
        f'<text x="{margin_left + n * cell / 2:.1f}" y="34" text-anchor="middle">'
        f"{escape(backend.name)} (shadow) predicts</text>",
        f'<text x="12" y="{margin_top + n * cell / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {margin_top + n * cell / 2:.1f})">production predicts</text>',
    ]
    for j, label in enumerate(labels):
        x = margin_left + j * cell + cell / 2
        parts.append(
            f'<text x="{x:.1f}" y="{margin_top - 8}" text-anchor="middle">{escape(label[:10])}</text>'
        )
    for i, label in enumerate(labels):
        y = margin_top + i * cell + cell / 2 + 4
        parts.append(
            f'<text x="{margin_left - 6}" y="{y:.1f}" text-anchor="end">{escape(label[:18])}</text>'
        )
        for j in range(n):
            count = matrix[i][j]
            x, top = margin_left + j * cell, margin_top + i * cell
            colour = _shade(count / biggest) if count else "#ffffff"
            edge = "#2b8a3e" if i == j else "#dee2e6"
            parts.append(
                f'<rect x="{x}" y="{top}" width="{cell}" height="{cell}" fill="{colour}" '
                f'stroke="{edge}" stroke-width="{2 if i == j else 1}"><title>production '
                f"{escape(label)}, {escape(backend.name)} {escape(labels[j])}: {count:,} rows "
                f"({100 * count / total:.2f}%)</title></rect>"
            )
            if count and cell >= 22:
                dark = count / biggest > 0.35
                text = _number(count) if count < 10_000 else f"{count / 1000:.0f}k"
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{top + cell / 2 + 4:.1f}" '
                    f'text-anchor="middle" style="fill:{"#ffffff" if dark else "#212529"}">'
                    f"{text}</text>"
                )
    parts.append(
        f'<text x="4" y="{height - 12}">{total:,} rows; diagonal (green edge): same label</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="confusion matrix '
        f'{escape(backend.name)}">{"".join(parts)}</svg>'
    )


def _figures_table(report: Report) -> str:
    rows = table_rows(report)
    head, *body = rows
    names = next(cells for name, cells in rows if name == "backend")
    columns = "".join(
        f"<th>{escape(role)}<br>{escape(name)}</th>"
        for role, name in zip(head[1], names, strict=True)
    )
    lines = [f"<table><thead><tr><th></th>{columns}</tr></thead><tbody>"]
    for name, cells in body:
        if name == "backend":
            continue
        cls = ' class="sub"' if name.startswith("  ") else ""
        tds = "".join(f"<td>{escape(cell)}</td>" for cell in cells)
        lines.append(f"<tr><td{cls}>{escape(name.strip())}</td>{tds}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _disagreements_table(backend: BackendReport) -> str:
    rows = [
        "<table><thead><tr><th>request id</th><th>trace id</th><th>kind</th><th>when (UTC)</th>"
        "<th>max abs diff</th><th>production</th><th>shadow</th><th>differing outputs</th>"
        "</tr></thead><tbody>"
    ]
    for d in backend.top_disagreements:
        when = datetime.fromtimestamp(d.time_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        ours = d.production_status if d.kind == "error" else ",".join(d.production_labels)
        theirs = d.candidate_status if d.kind == "error" else ",".join(d.candidate_labels)
        diff = "" if d.max_abs_diff is None else f"{d.max_abs_diff:.4g}"
        rows.append(
            f"<tr><td><code>{escape(d.request_id)}</code></td><td><code>{escape(d.trace_id)}"
            f"</code></td><td>{escape(d.kind)}</td><td>{when}</td><td>{diff}</td>"
            f"<td>{escape(ours)}</td><td>{escape(theirs)}</td>"
            f"<td>{escape(', '.join(d.differing_outputs))}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def render_html(report: Report) -> str:
    """The whole report as one HTML page with its plots inline."""
    first = report.first_call_ns
    last = report.last_call_ns

    def when(ns: int | None) -> str:
        if ns is None:
            return "?"
        return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    body: list[str] = [
        f"<h1>Shadow report: {escape(report.path)}</h1>",
        f'<p class="meta">{report.calls:,} calls with a production span, {when(first)} to '
        f"{when(last)}; {report.spans:,} spans in {report.lines:,} lines "
        f"({report.file_bytes / 1e6:,.1f} MB), read in {report.elapsed_s:.1f} s.</p>",
    ]
    labels = report.labels
    if labels.request_ids:
        body.append(
            f'<p class="meta">True labels: {labels.feedback_request_ids:,} request ids from '
            f"feedback spans"
            + (f", {labels.file_request_ids:,} from {escape(labels.file)}" if labels.file else "")
            + f"; {labels.labelled_calls:,} calls labelled.</p>"
        )
    if report.skipped:
        skipped = "; ".join(f"{n:,} {escape(reason)}" for reason, n in report.skipped.items())
        body.append(f'<p class="meta">Skipped: {skipped}.</p>')

    body.append("<h2>Verdict</h2>")
    criteria = verdict_lines(report)[0]
    body.append(f'<p class="meta">{escape(criteria)}</p>')
    for backend in report.candidates:
        verdict = backend.verdict
        assert verdict is not None
        cls = {"safe": "safe", "not safe": "unsafe"}.get(verdict.decision, "unknown")
        text = {
            "safe": "looks safe to promote",
            "not safe": "not safe to promote",
        }.get(verdict.decision, "cannot tell yet")
        reasons = "".join(f"<li>{escape(r)}</li>" for r in verdict.reasons)
        passed = "".join(f"<li>{escape(r)}</li>" for r in verdict.passed)
        body.append(
            f'<div class="verdict {cls}"><strong>{escape(backend.name)}: {text}</strong>'
            + (f"<ul>{reasons}</ul>" if reasons else "")
            + (f'<div class="meta">passed:</div><ul>{passed}</ul>' if passed else "")
            + "</div>"
        )
    if not report.candidates:
        body.append(
            '<div class="verdict unknown">No shadow in this file: nothing to promote.</div>'
        )
    for warning in report.warnings:
        body.append(f'<div class="note">{escape(warning)}</div>')

    body.append("<h2>Side by side</h2>")
    body.append(_figures_table(report))

    body.append("<h2>Plots</h2>")
    body.append('<div class="plots">')
    body.append(
        f"<figure>{latency_plot(report)}<figcaption>Each curve climbs from the fastest to the "
        "slowest call of a backend; a curve to the right is slower. Dashed lines: p50 and "
        "p90.</figcaption></figure>"
    )
    body.append(
        f"<figure>{latency_tail_plot(report)}<figcaption>The slowest calls: the share of a "
        "backend's calls slower than x, on log scales, where timeouts and stragglers show."
        "</figcaption></figure>"
    )
    body.append(
        f"<figure>{agreement_plot(report)}<figcaption>Share of compared calls that agreed with "
        "production, per time bucket; dashed: counting noise (differences the reference also "
        "showed) as agreeing; grey bars: compared calls per bucket.</figcaption></figure>"
    )
    for backend in report.backends:
        if backend.confusion is not None:
            body.append(
                f"<figure>{confusion_plot(backend)}<figcaption>Rows: production's predicted "
                f"label; columns: {escape(backend.name)}'s, per batch row, for calls both "
                "answered.</figcaption></figure>"
            )
    body.append("</div>")

    for backend in report.backends:
        if backend.top_disagreements:
            body.append(f"<h2>Top disagreements: {escape(backend.name)}</h2>")
            body.append(
                '<p class="meta">Real disagreements first (largest difference first), then '
                "calls only the shadow failed, then noise. Search Jaeger for the trace id, or "
                "for the tag <code>shadow.request_id</code>.</p>"
            )
            body.append(_disagreements_table(backend))

    if report.phases_s:
        phases = ", ".join(f"{escape(k)} {v:.1f} s" for k, v in report.phases_s.items())
        body.append(f'<p class="meta">Read by {report.jobs} process(es): {phases}.</p>')

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Shadow report: {escape(report.path)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{chr(10).join(body)}\n</body></html>\n"
    )
