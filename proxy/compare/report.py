"""The offline comparison report: production against each shadow and reference, from a
traces file, in bounded memory.

``shadow-proxy report TRACES_FILE`` reads the proxy's OTLP JSON lines file (or a
Collector's file exporter output) in two passes. The first only parses the lines that
hold feedback spans (a substring test) to collect the true labels; the second assembles
each call's spans in a bounded buffer keyed by trace and proxy span, adds every finished
call to streaming statistics and forgets it. Large files are read by several processes,
each over its own byte range; their statistics merge, and the calls cut by a range
boundary are put back together before they are counted.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import math
import multiprocessing
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from proxy.compare.stats import OTHER_LABEL, Confusion, LogHistogram, Proportion, TimeBuckets, TopN
from proxy.compare.traces import document_spans

__all__ = [
    "BackendReport",
    "Disagreement",
    "Report",
    "ReportInputError",
    "Thresholds",
    "Verdict",
    "add_report_parser",
    "build_report",
    "read_labels_file",
    "render_text",
    "run_report",
    "table_rows",
    "verdict_lines",
]

STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

PRODUCTION, SHADOW, REFERENCE, PROXY, FEEDBACK = (
    "production",
    "shadow",
    "reference",
    "proxy",
    "feedback",
)
_BACKEND_ROLES = frozenset((PRODUCTION, SHADOW, REFERENCE))
_ROLE_ORDER = {PRODUCTION: 0, SHADOW: 1, REFERENCE: 2}
_FEEDBACK_MARKER = b'"feedback"'
"""Every feedback span holds this (its role value); lines without it are not parsed in
the first pass."""

# The attributes the report reads; every other attribute (metadata, sizes, addresses) is
# skipped without decoding its value.
_WANTED = frozenset(
    (
        "shadow.role",
        "shadow.backend",
        "shadow.request_id",
        "rpc.grpc.status_code",
        "rpc.service",
        "rpc.method",
        "shadow.production",
        "shadow.sampled",
        "shadow.dropped",
        "shadow.sampled_out",
        "shadow.predicted_labels",
        "shadow.compared",
        "shadow.agree",
        "shadow.max_abs_diff",
        "shadow.mean_abs_diff",
        "shadow.differing_outputs",
        "shadow.labels",
        "shadow.label_output",
    )
)
_MAX_EXAMPLES = 5
_MAX_OUTPUT_NAMES = 64
_MAX_METHODS = 64
_TIMELINE_FIELDS = ("calls", "errors", "compared", "agreed", "noise")
_AUTO_PARALLEL_BYTES = 32 * 1024 * 1024


class ReportInputError(Exception):
    """The input cannot give a report (missing or unreadable file, not OTLP JSON, no call
    with a production span, an unusable labels file); ``run_report`` exits 2 with it."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a candidate looks safe to promote."""

    min_agreement: float = 0.95
    """The lower bound of the 95% Wilson interval of the noise-adjusted agreement must
    reach this (the bound, not the rate, so that 20 lucky calls do not pass)."""
    max_error_rate: float = 0.01
    """At most this share of the candidate's calls may fail where production succeeded
    (errors production also had, such as a bad request, do not count against it)."""
    max_latency_ratio: float = 1.5
    """The candidate's p99 latency at most this multiple of production's."""
    min_calls: int = 100
    """Fewer compared calls than this: too few to tell (unless agreement is clearly bad)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be within 0..1, not {self.min_agreement}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be within 0..1, not {self.max_error_rate}")
        if not self.max_latency_ratio > 0:
            raise ValueError(f"max_latency_ratio must be above 0, not {self.max_latency_ratio}")
        if self.min_calls < 0:
            raise ValueError(f"min_calls must be 0 or more, not {self.min_calls}")


_DEFAULT_THRESHOLDS = Thresholds()


# ---------------------------------------------------------------------------------------
# The report's figures


@dataclass(slots=True)
class LatencySummary:
    """Latency of one backend's calls in milliseconds, from a 1%-accurate histogram
    (min, max and mean are exact)."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    min_ms: float | None
    histogram: list[tuple[float, float, int]]
    """(low ms, high ms, calls) per bucket in use."""


@dataclass(slots=True)
class Disagreement:
    """One call on which a candidate differed from production, to look up in Jaeger."""

    backend: str
    kind: str
    """``real``, ``noise`` (every differing output also differed for the reference), or
    ``error`` (the candidate failed where production did not)."""
    request_id: str
    trace_id: str
    span_id: str
    time_ns: int
    differing_outputs: list[str]
    max_abs_diff: float | None
    production_labels: list[str]
    candidate_labels: list[str]
    production_status: str
    candidate_status: str


@dataclass(slots=True)
class Verdict:
    """Whether a candidate looks safe to promote, and why (not)."""

    decision: str
    """``safe``, ``not safe`` or ``cannot tell``."""
    reasons: list[str]
    passed: list[str]


@dataclass(slots=True)
class ConfusionReport:
    """Production's predicted label (rows) against the candidate's (columns), per row."""

    labels: list[str]
    matrix: list[list[int]]
    total: int
    other: int
    """Rows counted under ``(other)`` because there were over the cap of distinct labels."""


@dataclass(slots=True)
class BackendReport:
    """Every figure of one backend column."""

    role: str
    name: str
    calls: int
    errors: int
    error_rate: float | None
    errors_by_code: dict[str, int]
    latency: LatencySummary
    sent: int | None = None
    """Calls the proxy span lists as sent to it (None for production)."""
    dropped: int | None = None
    sampled_out: int | None = None
    missing_spans: int | None = None
    """Sent, but no span of it was found (lost by the recorder, or the file was cut)."""
    compared: int = 0
    uncompared: int = 0
    """Both answered, but the span holds no comparison (a proxy without comparisons)."""
    agreement: Proportion | None = None
    noise_adjusted_agreement: Proportion | None = None
    """Agreement counting noise disagreements as agreeing: what the verdict uses."""
    disagreements: int = 0
    noise: int = 0
    real: int = 0
    real_with_reference: int = 0
    """Real disagreements on calls where a reference was compared too."""
    noise_rate: Proportion | None = None
    """For a reference: the share of compared calls on which it differed from production."""
    status_mismatches: int = 0
    excess_errors: int = 0
    excess_error_rate: float | None = None
    mean_abs_diff: float | None = None
    max_abs_diff: float | None = None
    latency_diff_mean_ms: float | None = None
    differing_outputs: dict[str, int] = field(default_factory=dict)
    accuracy: Proportion | None = None
    """Rows whose predicted label equals the true label, of the labelled rows."""
    labelled_calls: int = 0
    label_length_mismatches: int = 0
    confusion: ConfusionReport | None = None
    top_disagreements: list[Disagreement] = field(default_factory=list)
    verdict: Verdict | None = None

    @property
    def column(self) -> str:
        return f"{self.role}:{self.name}"


@dataclass(slots=True)
class LabelsSummary:
    """Where the true labels came from and how many were joined to a call."""

    feedback_spans: int = 0
    feedback_request_ids: int = 0
    file: str | None = None
    file_request_ids: int = 0
    file_rows: int = 0
    file_skipped_lines: int = 0
    file_errors: list[str] = field(default_factory=list)
    overridden_by_file: int = 0
    request_ids: int = 0
    labelled_calls: int = 0
    matched_request_ids: int = 0
    unmatched_request_ids: int = 0


@dataclass(slots=True)
class TimelineBucket:
    start_ns: int
    backends: dict[str, dict[str, int]]
    """Per column (``role:name``): calls, errors, compared, agreed, noise."""


@dataclass(slots=True)
class Report:
    """Everything the report knows; ``to_dict()`` for JSON."""

    path: str
    file_bytes: int
    lines: int
    spans: int
    calls: int
    """Calls with a production span: the ones the figures are about."""
    first_call_ns: int | None
    last_call_ns: int | None
    methods: dict[str, int]
    backends: list[BackendReport]
    thresholds: Thresholds
    labels: LabelsSummary
    agreement_known: bool
    timeline: list[TimelineBucket]
    timeline_width_s: float
    skipped: dict[str, int]
    """What was not counted, and why: lines, spans, calls."""
    skipped_examples: dict[str, list[str]]
    warnings: list[str]
    elapsed_s: float
    jobs: int
    """Processes that read the file."""
    phases_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: checking, labels file, labels pass, calls pass, summing up."""

    def backend(self, role: str, name: str) -> BackendReport:
        for backend in self.backends:
            if backend.role == role and backend.name == name:
                return backend
        raise KeyError(f"{role}:{name}")

    @property
    def candidates(self) -> list[BackendReport]:
        return [b for b in self.backends if b.role == SHADOW]

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as plain JSON values."""
        data = asdict(self)
        for backend, raw in zip(self.backends, data["backends"], strict=True):
            for name in ("agreement", "noise_adjusted_agreement", "noise_rate", "accuracy"):
                value = getattr(backend, name)
                raw[name] = value.to_dict() if value is not None else None
            raw["column"] = backend.column
        data["thresholds"] = asdict(self.thresholds)
        return data


# ---------------------------------------------------------------------------------------
# Labels


def _label_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return None


class _LabelRows:
    """Labels of one request id being gathered from a file, row by row."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}

    def put(self, row: int | None, label: str) -> None:
        self.rows[len(self.rows) if row is None else row] = label

    def labels(self) -> tuple[str, ...] | None:
        """The rows in order; None when a row in the middle is missing."""
        if sorted(self.rows) != list(range(len(self.rows))):
            return None
        return tuple(self.rows[i] for i in range(len(self.rows)))


def _row_number(value: Any) -> int:
    if value is None or value == "":
        raise ValueError("empty row")
    row = int(value)
    if row < 0:
        raise ValueError(f"row {row} is negative")
    return row


def read_labels_file(path: Path) -> tuple[dict[str, tuple[str, ...]], LabelsSummary]:
    """Read true labels from CSV (header ``request_id,label``, optional ``row``) or JSON
    lines (``{"request_id": ..., "label": ...}``; ``label`` may be a list, one per row).

    A request id on several lines gets one label per line, in file order (a batch call's
    rows), unless a ``row`` column or key says which row. Malformed lines are skipped and
    counted; an unreadable file or a CSV without the two columns raises ReportInputError.
    """
    summary = LabelsSummary(file=str(path))
    gathered: dict[str, _LabelRows] = {}
    whole: dict[str, tuple[str, ...]] = {}

    def bad(number: int, why: str) -> None:
        summary.file_skipped_lines += 1
        if len(summary.file_errors) < _MAX_EXAMPLES:
            summary.file_errors.append(f"{path}:{number}: {why}")

    def put(number: int, request_id: Any, label: Any, row: Any) -> None:
        rid = _label_text(request_id)
        if not rid:
            bad(number, "no request_id")
            return
        if isinstance(label, list):
            texts = [_label_text(v) for v in label]
            if not texts or any(t is None or t == "" for t in texts):
                bad(number, "label list is empty or holds a value that is not a label")
                return
            whole[rid] = tuple(t for t in texts if t is not None)
            summary.file_rows += len(texts)
            return
        text = _label_text(label)
        if text is None or text == "":
            bad(number, "no label")
            return
        try:
            row_number = None if row is None else _row_number(row)
        except (TypeError, ValueError) as exc:
            bad(number, f"bad row ({exc})")
            return
        gathered.setdefault(rid, _LabelRows()).put(row_number, text)
        summary.file_rows += 1

    try:
        with path.open("rb") as raw:
            head = raw.read(4096)
            raw.seek(0)
            text_stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
            is_json = path.suffix.lower() in (".jsonl", ".ndjson", ".json") or (
                path.suffix.lower() != ".csv" and head.lstrip().startswith(b"{")
            )
            if is_json:
                for number, line in enumerate(text_stream, 1):
                    if not line.strip():
                        continue
                    try:
                        item = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        bad(number, f"not JSON ({exc})")
                        continue
                    if not isinstance(item, dict):
                        bad(number, "not a JSON object")
                        continue
                    label = item.get("label", item.get("labels"))
                    put(number, item.get("request_id"), label, item.get("row"))
            else:
                reader = csv.reader(text_stream)
                header = next(reader, None)
                columns = [c.strip().lower() for c in header or []]
                if "request_id" not in columns or "label" not in columns:
                    raise ReportInputError(
                        f"{path}: a labels CSV needs a header line with the columns "
                        f"request_id and label (and optionally row); found {header!r}"
                    )
                rid_at, label_at = columns.index("request_id"), columns.index("label")
                row_at = columns.index("row") if "row" in columns else None
                for cells in reader:
                    number = reader.line_num
                    if not cells or not any(c.strip() for c in cells):
                        continue
                    if len(cells) < len(columns):
                        bad(number, f"{len(cells)} fields, the header has {len(columns)}")
                        continue
                    put(
                        number,
                        cells[rid_at],
                        cells[label_at],
                        cells[row_at] if row_at is not None else None,
                    )
    except FileNotFoundError:
        raise ReportInputError(f"labels file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ReportInputError(f"labels file {path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ReportInputError(f"labels file {path} is not CSV: {exc}") from None
    except OSError as exc:
        raise ReportInputError(f"cannot read labels file {path}: {exc.strerror}") from None

    labels: dict[str, tuple[str, ...]] = {}
    for rid, rows in gathered.items():
        ordered = rows.labels()
        if ordered is None:
            bad(0, f"request id {rid!r}: rows {sorted(rows.rows)} leave a gap")
            continue
        labels[rid] = ordered
    labels.update(whole)
    summary.file_request_ids = len(labels)
    return labels, summary


# ---------------------------------------------------------------------------------------
# Reading


def _text(raw: dict[str, Any]) -> str:
    """One element of an array attribute, as text (labels may come as ints)."""
    if "stringValue" in raw:
        return str(raw["stringValue"])
    value = _value(raw)
    text = _label_text(value)
    return text if text is not None else str(value)


def _value(raw: dict[str, Any]) -> Any:
    if "stringValue" in raw:
        return raw["stringValue"]
    if "intValue" in raw:
        return int(raw["intValue"])
    if "boolValue" in raw:
        return raw["boolValue"]
    if "doubleValue" in raw:
        return float(raw["doubleValue"])
    if "arrayValue" in raw:
        # Every array the report reads is a list of names or labels: keep them as text.
        values = raw["arrayValue"].get("values") or ()
        return tuple([v["stringValue"] if "stringValue" in v else _text(v) for v in values])
    return None


def _attributes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The attributes the report reads, decoded; the rest are skipped undecoded."""
    found: dict[str, Any] = {}
    wanted = _WANTED
    for item in items:
        key = item["key"]
        if key in wanted:
            raw = item["value"]
            # The common kinds inline: this runs for every span of a million calls.
            if "stringValue" in raw:
                found[key] = raw["stringValue"]
            elif "intValue" in raw:
                found[key] = int(raw["intValue"])
            elif "boolValue" in raw:
                found[key] = raw["boolValue"]
            else:
                found[key] = _value(raw)
    return found


def _strings(value: Any) -> tuple[str, ...] | None:
    if value is None or isinstance(value, tuple):
        return value
    return (value if isinstance(value, str) else str(value),)


class _Span:
    """A backend span, reduced to what the report reads."""

    __slots__ = (
        "attrs",
        "latency_ms",
        "name",
        "request_id",
        "role",
        "span_id",
        "start_ns",
        "status",
    )

    def __init__(self, span: dict[str, Any], attrs: dict[str, Any], role: str) -> None:
        self.role = role
        self.name = str(attrs.get("shadow.backend") or span.get("name", "").partition(" ")[2])
        self.request_id = str(attrs.get("shadow.request_id", ""))
        self.span_id = str(span.get("spanId", ""))
        self.start_ns = int(span.get("startTimeUnixNano") or 0)
        end_ns = int(span.get("endTimeUnixNano") or self.start_ns)
        self.latency_ms = max(0.0, (end_ns - self.start_ns) / 1e6)
        status = attrs.get("rpc.grpc.status_code")
        if not isinstance(status, int) or isinstance(status, bool):
            # No gRPC code recorded: fall back on the span status (2 is ERROR).
            status = 2 if (span.get("status") or {}).get("code") in (2, "STATUS_CODE_ERROR") else 0
        self.status = status
        self.attrs = attrs


class _Proxy:
    """The proxy span of a call: what was sent where."""

    __slots__ = (
        "dropped",
        "method",
        "production",
        "request_id",
        "sampled",
        "sampled_out",
        "start_ns",
        "status",
    )

    def __init__(self, span: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.request_id = str(attrs.get("shadow.request_id", ""))
        self.status = attrs.get("rpc.grpc.status_code")
        self.production = str(attrs.get("shadow.production") or "")
        self.sampled = _strings(attrs.get("shadow.sampled")) or ()
        self.dropped = _strings(attrs.get("shadow.dropped")) or ()
        self.sampled_out = _strings(attrs.get("shadow.sampled_out")) or ()
        self.start_ns = int(span.get("startTimeUnixNano") or 0)
        self.method = f"{attrs.get('rpc.service', '')}/{attrs.get('rpc.method', '')}"


class _Call:
    """A call being assembled: its proxy span and backend spans, keyed by backend name."""

    __slots__ = ("proxy", "seq", "spans", "trace_id")

    def __init__(self, trace_id: str, seq: int) -> None:
        self.trace_id = trace_id
        self.seq = seq
        self.proxy: _Proxy | None = None
        self.spans: dict[str, _Span] = {}

    def complete(self) -> bool:
        proxy = self.proxy
        if proxy is None:
            return False
        spans = self.spans
        if proxy.production and proxy.production not in spans:
            return False
        return all(name in spans for name in proxy.sampled)

    def absorb(self, other: _Call) -> None:
        if self.proxy is None:
            self.proxy = other.proxy
        for name, span in other.spans.items():
            self.spans.setdefault(name, span)


class _BackendStats:
    """Running figures of one backend column."""

    def __init__(self, role: str, name: str, top: int, max_labels: int) -> None:
        self.role = role
        self.name = name
        self.calls = 0
        self.errors: dict[int, int] = {}
        self.latency = LogHistogram(0.01)
        self.compared = 0
        self.uncompared = 0
        self.agreed = 0
        self.noise = 0
        self.real_with_reference = 0
        self.status_mismatches = 0
        self.excess_errors = 0
        self.abs_diff_sum = 0.0
        self.abs_diff_n = 0
        self.max_abs_diff: float | None = None
        self.latency_diff_sum = 0.0
        self.latency_diff_n = 0
        self.differing: dict[str, int] = {}
        self.label_rows = 0
        self.label_correct = 0
        self.labelled_calls = 0
        self.label_length_mismatches = 0
        self.confusion = Confusion(max_labels)
        self.top: TopN[Disagreement] = TopN(top)

    def merge(self, other: _BackendStats) -> None:
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.latency.merge(other.latency)
        for name in (
            "calls",
            "compared",
            "uncompared",
            "agreed",
            "noise",
            "real_with_reference",
            "status_mismatches",
            "excess_errors",
            "abs_diff_sum",
            "abs_diff_n",
            "latency_diff_sum",
            "latency_diff_n",
            "label_rows",
            "label_correct",
            "labelled_calls",
            "label_length_mismatches",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.max_abs_diff is not None:
            self.max_abs_diff = (
                other.max_abs_diff
                if self.max_abs_diff is None
                else max(self.max_abs_diff, other.max_abs_diff)
            )
        for name, n in other.differing.items():
            _count_output(self.differing, name, n)
        self.confusion.merge(other.confusion)
        self.top.merge(other.top)


def _count_output(counts: dict[str, int], name: str, n: int = 1) -> None:
    if name not in counts and len(counts) >= _MAX_OUTPUT_NAMES:
        name = OTHER_LABEL
    counts[name] = counts.get(name, 0) + n


class _Tally:
    """The statistics of a part of the file (or of all of it); merges with another."""

    def __init__(self, top: int, max_labels: int) -> None:
        self.top = top
        self.max_labels = max_labels
        self.backends: dict[tuple[str, str], _BackendStats] = {}
        self.routing: dict[str, list[int]] = {}  # name: sent, dropped, sampled out, missing
        self.timeline = TimeBuckets(len(_TIMELINE_FIELDS))
        self.methods: dict[str, int] = {}
        self.calls = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.skipped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.matched: set[str] = set()
        self.labelled_calls = 0
        self.agreement_seen = False

    def skip(self, reason: str, example: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES and example:
            examples.append(example)

    def _backend(self, role: str, name: str) -> _BackendStats:
        stats = self.backends.get((role, name))
        if stats is None:
            stats = self.backends[role, name] = _BackendStats(role, name, self.top, self.max_labels)
        return stats

    def _route(self, name: str, slot: int) -> None:
        counts = self.routing.get(name)
        if counts is None:
            counts = self.routing[name] = [0, 0, 0, 0]
        counts[slot] += 1

    def add(self, call: _Call, labels: dict[str, tuple[str, ...]] | None) -> None:
        """Count one finished call (complete or not)."""
        production: _Span | None = None
        others: list[_Span] = []
        for span in call.spans.values():
            if span.role == PRODUCTION and production is None:
                production = span
            else:
                others.append(span)
        proxy = call.proxy
        if production is None:
            request_id = proxy.request_id if proxy else next(iter(call.spans.values())).request_id
            example = f"request {request_id} (trace {call.trace_id})"
            if proxy is None:
                self.skip("calls with no proxy and no production span", example)
            elif not proxy.production:
                self.skip("calls on which production was never called", example)
            else:
                self.skip("calls whose production span is missing", example)
            return

        request_id = proxy.request_id if proxy else production.request_id
        start_ns = proxy.start_ns if proxy else production.start_ns
        self.calls += 1
        if self.first_ns is None or start_ns < self.first_ns:
            self.first_ns = start_ns
        if self.last_ns is None or start_ns > self.last_ns:
            self.last_ns = start_ns
        if proxy is None:
            self.skip("calls without a proxy span (counted; sent/dropped unknown)", request_id)
        else:
            method = proxy.method
            if method in self.methods or len(self.methods) < _MAX_METHODS:
                self.methods[method] = self.methods.get(method, 0) + 1
            for name in proxy.sampled:
                self._route(name, 0)
                if name not in call.spans:
                    self._route(name, 3)
            for name in proxy.dropped:
                self._route(name, 1)
            for name in proxy.sampled_out:
                self._route(name, 2)

        truth = labels.get(request_id) if labels else None
        if truth is not None:
            self.labelled_calls += 1
            self.matched.add(request_id)

        stats = self._backend(PRODUCTION, production.name)
        prod_ok = production.status == 0
        self._count(stats, production, truth, start_ns)
        prod_labels = _strings(production.attrs.get("shadow.predicted_labels"))
        self.timeline.add(start_ns, (PRODUCTION, production.name), (1, not prod_ok, 0, 0, 0))

        # Outputs on which production and a reference differed in this call: noise.
        reference_diff: set[str] | None = None
        for span in others:
            if span.role == REFERENCE and span.attrs.get("shadow.compared") is True:
                outputs = _strings(span.attrs.get("shadow.differing_outputs"))
                if reference_diff is None:
                    reference_diff = set()
                if outputs:
                    reference_diff.update(outputs)

        for span in others:
            stats = self._backend(span.role, span.name)
            self._count(stats, span, truth, start_ns)
            ok = span.status == 0
            if ok != prod_ok:
                stats.status_mismatches += 1
            attrs = span.attrs
            stats.latency_diff_sum += span.latency_ms - production.latency_ms
            stats.latency_diff_n += 1
            compared = attrs.get("shadow.compared")
            agreed = noise = 0
            kind = ""
            if compared is True:
                self.agreement_seen = True
                stats.compared += 1
                outputs = _strings(attrs.get("shadow.differing_outputs"))
                for name in outputs or ():
                    _count_output(stats.differing, name)
                max_diff = attrs.get("shadow.max_abs_diff")
                if (
                    isinstance(max_diff, (int, float))
                    and not math.isnan(max_diff)
                    and (stats.max_abs_diff is None or max_diff > stats.max_abs_diff)
                ):
                    stats.max_abs_diff = float(max_diff)
                mean_diff = attrs.get("shadow.mean_abs_diff")
                if isinstance(mean_diff, (int, float)) and not math.isnan(mean_diff):
                    stats.abs_diff_sum += mean_diff
                    stats.abs_diff_n += 1
                if attrs.get("shadow.agree") is True:
                    stats.agreed += 1
                    agreed = 1
                elif span.role == SHADOW:
                    if (
                        outputs
                        and reference_diff is not None
                        and reference_diff.issuperset(outputs)
                    ):
                        stats.noise += 1
                        noise = 1
                        kind = "noise"
                    else:
                        if reference_diff is not None:
                            stats.real_with_reference += 1
                        kind = "real"
            elif ok and prod_ok:
                stats.uncompared += 1
            if not ok and prod_ok:
                stats.excess_errors += 1
                kind = kind or "error"
            self.timeline.add(
                start_ns, (span.role, span.name), (1, not ok, compared is True, agreed, noise)
            )
            span_labels = _strings(attrs.get("shadow.predicted_labels"))
            if prod_labels and span_labels and span.role == SHADOW:
                for expected, actual in zip(prod_labels, span_labels, strict=False):
                    stats.confusion.add(expected, actual)
            if kind and span.role == SHADOW:
                rank = {"real": 3, "error": 2, "noise": 1}[kind]
                top_diff = attrs.get("shadow.max_abs_diff")
                mean_diff = attrs.get("shadow.mean_abs_diff")
                stats.top.offer(
                    (
                        rank,
                        float(top_diff) if isinstance(top_diff, (int, float)) else 0.0,
                        float(mean_diff) if isinstance(mean_diff, (int, float)) else 0.0,
                    ),
                    _disagreement_maker(
                        span, production, call.trace_id, request_id, start_ns, kind
                    ),
                )

    def _count(
        self,
        stats: _BackendStats,
        span: _Span,
        truth: tuple[str, ...] | None,
        start_ns: int,
    ) -> None:
        stats.calls += 1
        if span.status != 0:
            stats.errors[span.status] = stats.errors.get(span.status, 0) + 1
        stats.latency.add(span.latency_ms)
        if truth is not None:
            predicted = _strings(span.attrs.get("shadow.predicted_labels"))
            if predicted:
                stats.labelled_calls += 1
                if len(predicted) != len(truth):
                    stats.label_length_mismatches += 1
                for expected, actual in zip(truth, predicted, strict=False):
                    stats.label_rows += 1
                    if expected == actual:
                        stats.label_correct += 1

    def merge(self, other: _Tally) -> None:
        for key, stats in other.backends.items():
            mine = self.backends.get(key)
            if mine is None:
                self.backends[key] = stats
            else:
                mine.merge(stats)
        for name, counts in other.routing.items():
            into = self.routing.setdefault(name, [0, 0, 0, 0])
            for i, n in enumerate(counts):
                into[i] += n
        self.timeline.merge(other.timeline)
        for method, n in other.methods.items():
            if method in self.methods or len(self.methods) < _MAX_METHODS:
                self.methods[method] = self.methods.get(method, 0) + n
        self.calls += other.calls
        for bound in (other.first_ns, other.last_ns):
            if bound is None:
                continue
            self.first_ns = bound if self.first_ns is None else min(self.first_ns, bound)
            self.last_ns = bound if self.last_ns is None else max(self.last_ns, bound)
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            examples = self.examples.setdefault(reason, [])
            for example in other.examples.get(reason, []):
                if len(examples) < _MAX_EXAMPLES:
                    examples.append(example)
        self.matched |= other.matched
        self.labelled_calls += other.labelled_calls
        self.agreement_seen |= other.agreement_seen


def _disagreement_maker(
    span: _Span, production: _Span, trace_id: str, request_id: str, start_ns: int, kind: str
) -> Callable[[], Disagreement]:
    def make() -> Disagreement:
        diff = span.attrs.get("shadow.max_abs_diff")
        return Disagreement(
            backend=span.name,
            kind=kind,
            request_id=request_id,
            trace_id=trace_id,
            span_id=span.span_id,
            time_ns=start_ns,
            differing_outputs=list(_strings(span.attrs.get("shadow.differing_outputs")) or ()),
            max_abs_diff=float(diff) if isinstance(diff, (int, float)) else None,
            production_labels=list(
                (_strings(production.attrs.get("shadow.predicted_labels")) or ())[:8]
            ),
            candidate_labels=list((_strings(span.attrs.get("shadow.predicted_labels")) or ())[:8]),
            production_status=STATUS_NAMES.get(production.status, str(production.status)),
            candidate_status=STATUS_NAMES.get(span.status, str(span.status)),
        )

    return make


@dataclass(slots=True)
class _Options:
    top: int
    max_labels: int
    buffer_calls: int


@dataclass
class _Part:
    """What reading one byte range gave."""

    tally: _Tally
    lines: int = 0
    spans: int = 0
    leftovers: list[tuple[str, _Call]] = field(default_factory=list)
    """Calls still open at the range's ends, for the next range to complete (parallel)."""
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    """(line number within the range, why), the first few."""
    bad_line_count: int = 0


_PROGRESS: Any = None  # a shared byte counter in worker processes
_LABELS: dict[str, tuple[str, ...]] | None = None  # inherited by worker processes


def _init_worker(labels: dict[str, tuple[str, ...]] | None, progress: Any) -> None:
    global _LABELS, _PROGRESS
    _LABELS, _PROGRESS = labels, progress


def _lines(
    path: Path, start: int, end: int, report: Callable[[int], None] | None
) -> Iterator[bytes]:
    """The lines that start within [start, end) (start is a line start)."""
    with path.open("rb") as source:
        source.seek(start)
        position = start
        pending = 0
        for line in source:
            if position >= end:
                break
            position += len(line)
            if report is not None:
                pending += len(line)
                if pending >= 1 << 20:
                    report(pending)
                    pending = 0
            yield line
        if report is not None and pending:
            report(pending)


def _shared_progress(n: int) -> None:
    with _PROGRESS.get_lock():
        _PROGRESS.value += n


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Parsing allocates millions of short-lived dicts and lists; each allocation burst
    makes the cyclic collector walk every live container (the labels, the buffer),
    which cost a quarter of the time. Nothing read here forms a cycle: reference
    counting frees it all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_part(
    path: Path,
    start: int,
    end: int,
    options: _Options,
    keep_open_calls: bool,
    report: Callable[[int], None] | None = None,
    labels: dict[str, tuple[str, ...]] | None = None,
) -> _Part:
    """Read the lines of one byte range into a tally.

    ``keep_open_calls``: hand back the calls still open at the end (and those evicted
    early in the range, which may have begun in the previous range) instead of counting
    them as incomplete, so that the parent can join them with the neighbours'.
    """
    with _no_cyclic_gc():
        return _read_part_now(path, start, end, options, keep_open_calls, report, labels)


def _read_part_now(
    path: Path,
    start: int,
    end: int,
    options: _Options,
    keep_open_calls: bool,
    report: Callable[[int], None] | None,
    labels: dict[str, tuple[str, ...]] | None,
) -> _Part:
    if report is None and _PROGRESS is not None:
        report = _shared_progress
    if labels is None:
        labels = _LABELS
    loads = orjson.loads
    tally = _Tally(options.top, options.max_labels)
    part = _Part(tally)
    # Ordered dicts: evicting the oldest is O(1) (a plain dict's next(iter(d)) crawls over
    # the holes its deletions leave at the front).
    buffer: OrderedDict[str, _Call] = OrderedDict()
    finished: OrderedDict[str, None] = OrderedDict()  # recently counted, to tell late spans
    bound = options.buffer_calls
    seq = 0

    def finish(key: str, call: _Call) -> None:
        tally.add(call, labels)
        finished[key] = None
        if len(finished) > bound:
            finished.popitem(last=False)

    number = 0
    for line in _lines(path, start, end, report):
        number += 1
        if len(line) < 3 and not line.strip():
            continue
        try:
            document = loads(_without_events(line))
        except orjson.JSONDecodeError:
            try:
                document = loads(line)
            except orjson.JSONDecodeError as exc:
                _bad_line(part, number, f"not JSON ({exc})")
                continue
        if not isinstance(document, dict) or "resourceSpans" not in document:
            if isinstance(document, dict) and (
                "resourceMetrics" in document or "resourceLogs" in document
            ):
                tally.skip("lines of metrics or logs, not traces", f"line {number}")
            else:
                _bad_line(part, number, "not an OTLP traces document (no resourceSpans)")
            continue
        try:
            spans = document_spans(document)
            for span in spans:
                part.spans += 1
                attrs = _attributes(span.get("attributes") or ())
                role = attrs.get("shadow.role")
                if role is None:
                    tally.skip("spans without shadow.role (not the proxy's)", span.get("name", ""))
                    continue
                if role == FEEDBACK:
                    continue
                trace_id = span.get("traceId") or ""
                if role == PROXY:
                    key = trace_id + (span.get("spanId") or "")
                elif role in _BACKEND_ROLES:
                    key = trace_id + (span.get("parentSpanId") or "")
                else:
                    tally.skip(f"spans with an unknown role {role!r}"[:80], trace_id)
                    continue
                call = buffer.get(key)
                if call is None:
                    if key in finished:
                        tally.skip(
                            "spans that came after their call was counted (raise --buffer-calls)",
                            f"trace {trace_id}",
                        )
                        continue
                    seq += 1
                    call = buffer[key] = _Call(trace_id, seq)
                if role == PROXY:
                    if call.proxy is None:
                        call.proxy = _Proxy(span, attrs)
                else:
                    backend = _Span(span, attrs, role)
                    if backend.name not in call.spans:
                        call.spans[backend.name] = backend
                if call.complete():
                    del buffer[key]
                    finish(key, call)
                elif len(buffer) > bound:
                    old_key, old = buffer.popitem(last=False)
                    if keep_open_calls and old.seq <= bound:
                        part.leftovers.append((old_key, old))
                    else:
                        finish(old_key, old)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            _bad_line(part, number, f"malformed OTLP span ({type(exc).__name__}: {exc})")
    part.lines = number
    for key, call in buffer.items():
        if keep_open_calls:
            part.leftovers.append((key, call))
        else:
            tally.add(call, labels)
    return part


def _bad_line(part: _Part, number: int, why: str) -> None:
    part.bad_line_count += 1
    if len(part.bad_lines) < _MAX_EXAMPLES:
        part.bad_lines.append((number, why[:200]))


_EVENTS = b'"events":['


def _without_events(line: bytes) -> bytes:
    """The line with every span's events (the payloads) left out before parsing: the
    report never reads them, and not building them saves a sixth of the parsing.

    An events array ends at the first ``],"`` after it: inside a JSON string a quote is
    always escaped, so that sequence cannot be in a payload. Where another encoder puts a
    key after an array inside an event, the cut is wrong, the result is unbalanced and
    fails to parse, and the caller parses the line as it is.
    """
    position = line.find(_EVENTS)
    if position < 0:
        return line
    pieces = []
    last = 0
    while position >= 0:
        start = position + len(_EVENTS)
        end = line.find(b'],"', start)
        if end < 0:
            return line
        pieces.append(line[last:start])
        last = end
        position = line.find(_EVENTS, end)
    pieces.append(line[last:])
    return b"".join(pieces)


_SPAN_START = b'{"traceId":'
_SPAN_ENDS = (b'},{"traceId":', b"}]")


def _sliced_feedback_spans(line: bytes) -> list[dict[str, Any]] | None:
    """The feedback spans of a line, each parsed on its own from a slice of the line;
    None when the slices do not give whole feedback spans (then parse the line whole).

    Feedback spans are a small part of a line that also holds calls' spans; parsing only
    them keeps the first pass cheap. A slice starts at the ``{"traceId":`` before a marker
    and ends at the first span end after it that makes valid JSON; any doubt (another
    key order, nested links) falls back to the whole line.
    """
    found: list[dict[str, Any]] = []
    loads = orjson.loads
    position = line.find(_FEEDBACK_MARKER)
    while position >= 0:
        start = line.rfind(_SPAN_START, 0, position)
        if start < 0:
            return None
        search = position
        span = None
        for _ in range(32):
            ends = [e for e in (line.find(marker, search) for marker in _SPAN_ENDS) if e >= 0]
            if not ends:
                return None
            end = min(ends) + 1
            try:
                span = loads(line[start:end])
                break
            except orjson.JSONDecodeError:
                search = end
        if not isinstance(span, dict) or not isinstance(span.get("attributes"), list):
            return None
        if _attributes(span["attributes"]).get("shadow.role") != FEEDBACK:
            return None
        found.append(span)
        position = line.find(_FEEDBACK_MARKER, end)
    return found


_SCAN_BYTES = 8 << 20


def _marked_lines(
    path: Path, start: int, end: int, report: Callable[[int], None] | None
) -> Iterator[bytes]:
    """The lines starting within [start, end) that hold the feedback marker.

    The file is read in blocks of whole lines and searched block by block, so the lines
    without feedback, nearly all of them, are never made into Python objects. (Not mmap:
    the pages it touches would count in the process's resident memory.)
    """
    with path.open("rb") as source:
        source.seek(start)
        offset = start  # where ``block`` starts in the file
        carry = b""
        while offset < end:
            data = source.read(_SCAN_BYTES)
            block = carry + data if carry else data
            if not block:
                return
            cut = block.rfind(b"\n") + 1 if data else len(block)
            if cut == 0:
                carry = block  # a line longer than a block: read on
                continue
            carry = block[cut:]
            limit = end - offset  # lines starting at or past this belong to the next range
            position = block.find(_FEEDBACK_MARKER, 0, cut)
            while position >= 0:
                line_start = block.rfind(b"\n", 0, position) + 1
                if line_start >= limit:
                    break
                line_end = block.find(b"\n", position, cut)
                line_end = cut if line_end < 0 else line_end + 1
                yield block[line_start:line_end]
                position = block.find(_FEEDBACK_MARKER, line_end, cut)
            if report is not None:
                report(min(cut, max(0, limit)))
            offset += cut


def _read_feedback(
    path: Path, start: int, end: int, report: Callable[[int], None] | None = None
) -> tuple[dict[str, tuple[str, ...]], int]:
    """The true labels in feedback spans of one byte range: {request id: labels}, spans."""
    with _no_cyclic_gc():
        return _read_feedback_now(path, start, end, report)


def _read_feedback_now(
    path: Path, start: int, end: int, report: Callable[[int], None] | None
) -> tuple[dict[str, tuple[str, ...]], int]:
    if report is None and _PROGRESS is not None:
        report = _shared_progress
    labels: dict[str, tuple[str, ...]] = {}
    spans = 0
    interned: dict[str, str] = {}
    for line in _marked_lines(path, start, end, report):
        try:
            # Slice out the feedback spans where they are a small part of the line (labels
            # sent one call at a time); parse the line whole where they fill it (batches).
            sparse = line.count(_FEEDBACK_MARKER) * 2048 < len(line)
            sliced = _sliced_feedback_spans(line) if sparse else None
            if sliced is None:
                document = orjson.loads(line)
                if not isinstance(document, dict) or "resourceSpans" not in document:
                    continue
                sliced = list(document_spans(document))
            for span in sliced:
                attrs = _attributes(span.get("attributes") or ())
                if attrs.get("shadow.role") != FEEDBACK:
                    continue
                spans += 1
                request_id = attrs.get("shadow.request_id")
                values = _strings(attrs.get("shadow.labels"))
                if not request_id or not values:
                    continue
                if attrs.get("shadow.label_output", "label") != "label":
                    continue  # labels of another output than the predicted label
                labels[str(request_id)] = tuple(interned.setdefault(v, v) for v in values)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            continue  # the main pass reports the line
    return labels, spans


# ---------------------------------------------------------------------------------------
# Building the report


def _ranges(path: Path, size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges of the file, each starting at a line start."""
    starts = [0]
    with path.open("rb") as source:
        for i in range(1, parts):
            source.seek(size * i // parts)
            source.readline()
            position = source.tell()
            if position > starts[-1] and position < size:
                starts.append(position)
    return [(s, e) for s, e in zip(starts, [*starts[1:], size], strict=True)]


def _jobs_for(size: int, jobs: int | None) -> int:
    if jobs is not None:
        return max(1, jobs)
    if size < _AUTO_PARALLEL_BYTES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _check_first_line(path: Path) -> None:
    """Fail fast, naming the line, when the file does not start like OTLP JSON."""
    with path.open("rb") as source:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                document = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ReportInputError(
                    f"{path}:{number}: not OTLP JSON lines: the line is not JSON ({exc}); "
                    'expected one OTLP traces document ({{"resourceSpans": [...]}}) per line, '
                    "as the proxy's file exporter or a Collector's file exporter writes"
                ) from None
            if not isinstance(document, dict) or not (
                {"resourceSpans", "resourceMetrics", "resourceLogs"} & document.keys()
            ):
                what = (
                    "a Jaeger UI export (use the proxy's traces file instead)"
                    if isinstance(document, dict) and "data" in document
                    else f"a JSON {type(document).__name__} without resourceSpans"
                )
                raise ReportInputError(
                    f"{path}:{number}: not an OTLP traces document: {what}; expected "
                    'one {"resourceSpans": [...]} document per line'
                )
            return
    raise ReportInputError(f"{path} is empty: no spans to report on")


class _Progress:
    """A tqdm bar on stderr by bytes, or nothing."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            class _Bar(tqdm):  # type: ignore[type-arg]
                # No monitor thread: worker processes are forked while a bar may exist,
                # and forking a process that runs threads is unsafe.
                monitor_interval = 0

            self.bar = _Bar(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=description,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_to(self, n: int) -> None:
        if self.bar is not None and n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_parallel(
    jobs: int,
    labels: dict[str, tuple[str, ...]] | None,
    progress: _Progress,
    task: Callable[..., Any],
    arguments: list[tuple[Any, ...]],
) -> list[Any]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    counter = context.Value("q", 0)
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(labels, counter),
    ) as pool:
        futures: list[Future[Any]] = [pool.submit(task, *a) for a in arguments]
        while True:
            done, pending = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)
            progress.set_to(counter.value)
            if not pending or any(f.exception() for f in done):
                break
        return [f.result() for f in futures]


def build_report(
    path: Path | str,
    labels_path: Path | str | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = False,
    *,
    top: int = 10,
    buffer_calls: int = 100_000,
    max_labels: int = 50,
    jobs: int | None = None,
) -> Report:
    """Read a traces file (and optionally a labels file) into a Report.

    ``buffer_calls`` bounds the calls held open while their spans arrive; ``max_labels``
    caps the confusion matrix; ``jobs`` is the number of processes reading (default: one
    for files under 32 MiB, else one per CPU up to 8). Raises ReportInputError when the
    input cannot give any report; what it skipped on the way is in ``skipped``.
    """
    began = time.monotonic()
    phases: dict[str, float] = {}
    clock = [began]

    def lap(name: str) -> None:
        now = time.monotonic()
        phases[name] = phases.get(name, 0.0) + now - clock[0]
        clock[0] = now

    path = Path(path)
    thresholds = thresholds or Thresholds()
    if buffer_calls < 1:
        raise ValueError("buffer_calls must be at least 1")
    if not path.exists():
        raise ReportInputError(f"traces file {path} does not exist")
    if path.is_dir():
        raise ReportInputError(f"{path} is a directory, not a traces file")
    try:
        size = path.stat().st_size
        _check_first_line(path)
    except OSError as exc:
        raise ReportInputError(f"cannot read {path}: {exc.strerror}") from None
    lap("checking the file")

    summary = LabelsSummary()
    file_labels: dict[str, tuple[str, ...]] = {}
    if labels_path is not None:
        file_labels, summary = read_labels_file(Path(labels_path))
        lap("reading the labels file")

    jobs = _jobs_for(size, jobs)
    ranges = _ranges(path, size, jobs) if jobs > 1 else [(0, size)]
    jobs = len(ranges)
    options = _Options(top=top, max_labels=max_labels, buffer_calls=buffer_calls)

    # Pass 1: the true labels in feedback spans.
    bar = _Progress(progress, size, "labels")
    try:
        if jobs > 1:
            found = _run_parallel(
                jobs, None, bar, _read_feedback, [(path, s, e) for s, e in ranges]
            )
        else:
            found = [_read_feedback(path, 0, size, bar.update)]
    finally:
        bar.close()
    labels: dict[str, tuple[str, ...]] = {}
    for part_labels, spans in found:
        labels.update(part_labels)
        summary.feedback_spans += spans
    summary.feedback_request_ids = len(labels)
    summary.overridden_by_file = sum(1 for rid in file_labels if rid in labels)
    labels.update(file_labels)
    summary.request_ids = len(labels)
    lap("pass 1: feedback labels")

    # Pass 2: the calls.
    bar = _Progress(progress, size, "calls")
    try:
        if jobs > 1:
            parts: list[_Part] = _run_parallel(
                jobs,
                labels or None,
                bar,
                _read_part,
                [(path, s, e, options, True) for s, e in ranges],
            )
        else:
            parts = [_read_part(path, 0, size, options, False, bar.update, labels or None)]
    finally:
        bar.close()
    lap("pass 2: calls")

    tally = parts[0].tally
    for part in parts[1:]:
        tally.merge(part.tally)
    if jobs > 1:
        # Calls cut by a range boundary: join their pieces, then count them.
        joined: dict[str, _Call] = {}
        for part in parts:
            for key, call in part.leftovers:
                if key in joined:
                    joined[key].absorb(call)
                else:
                    joined[key] = call
        for call in joined.values():
            tally.add(call, labels or None)

    lines = spans = 0
    bad: list[str] = []
    bad_count = 0
    for part in parts:
        for number, why in part.bad_lines:
            if len(bad) < _MAX_EXAMPLES:
                bad.append(f"line {lines + number}: {why}")
        bad_count += part.bad_line_count
        lines += part.lines
        spans += part.spans
    skipped = dict(tally.skipped)
    examples = {k: list(v) for k, v in tally.examples.items()}
    if bad_count:
        skipped["lines that are not OTLP JSON"] = bad_count
        examples["lines that are not OTLP JSON"] = bad

    if tally.calls == 0:
        reasons = "; ".join(f"{n} {reason}" for reason, n in skipped.items()) or "no spans"
        raise ReportInputError(
            f"{path}: no call with a production span to report on ({spans} spans in {lines} "
            f"lines; skipped: {reasons})"
        )

    summary.labelled_calls = tally.labelled_calls
    summary.matched_request_ids = len(tally.matched)
    summary.unmatched_request_ids = summary.request_ids - summary.matched_request_ids
    report = _assemble(
        path,
        size,
        lines,
        spans,
        tally,
        thresholds,
        summary,
        skipped,
        examples,
        time.monotonic() - began,
        jobs,
    )
    lap("merging and summing up")
    report.phases_s = phases
    report.elapsed_s = time.monotonic() - began
    return report


def _latency(histogram: LogHistogram) -> LatencySummary:
    return LatencySummary(
        count=histogram.count,
        mean_ms=histogram.mean,
        p50_ms=histogram.quantile(0.5),
        p90_ms=histogram.quantile(0.9),
        p99_ms=histogram.quantile(0.99),
        max_ms=histogram.max if histogram.count else None,
        min_ms=histogram.min if histogram.count else None,
        histogram=histogram.buckets(),
    )


def _backend_report(stats: _BackendStats, routing: list[int] | None) -> BackendReport:
    errors = sum(stats.errors.values())
    by_code = {
        STATUS_NAMES.get(code, str(code)): n
        for code, n in sorted(stats.errors.items(), key=lambda item: -item[1])
    }
    backend = BackendReport(
        role=stats.role,
        name=stats.name,
        calls=stats.calls,
        errors=errors,
        error_rate=errors / stats.calls if stats.calls else None,
        errors_by_code=by_code,
        latency=_latency(stats.latency),
    )
    if stats.role != PRODUCTION:
        sent, dropped, sampled_out, missing = routing or [0, 0, 0, 0]
        backend.sent, backend.dropped = sent, dropped
        backend.sampled_out, backend.missing_spans = sampled_out, missing
        backend.compared = stats.compared
        backend.uncompared = stats.uncompared
        backend.status_mismatches = stats.status_mismatches
        backend.excess_errors = stats.excess_errors
        backend.excess_error_rate = stats.excess_errors / stats.calls if stats.calls else None
        if stats.compared:
            backend.agreement = Proportion.of(stats.agreed, stats.compared)
            backend.disagreements = stats.compared - stats.agreed
            if stats.role == SHADOW:
                backend.noise = stats.noise
                backend.real = backend.disagreements - stats.noise
                backend.real_with_reference = stats.real_with_reference
                backend.noise_adjusted_agreement = Proportion.of(
                    stats.agreed + stats.noise, stats.compared
                )
            else:
                backend.noise_rate = Proportion.of(backend.disagreements, stats.compared)
        if stats.abs_diff_n:
            backend.mean_abs_diff = stats.abs_diff_sum / stats.abs_diff_n
        backend.max_abs_diff = stats.max_abs_diff
        if stats.latency_diff_n:
            backend.latency_diff_mean_ms = stats.latency_diff_sum / stats.latency_diff_n
        backend.differing_outputs = dict(sorted(stats.differing.items(), key=lambda i: -i[1]))
        if stats.confusion.total:
            matrix_labels, matrix = stats.confusion.matrix()
            backend.confusion = ConfusionReport(
                matrix_labels, matrix, stats.confusion.total, stats.confusion.other
            )
        backend.top_disagreements = stats.top.items()
    if stats.label_rows:
        backend.accuracy = Proportion.of(stats.label_correct, stats.label_rows)
    backend.labelled_calls = stats.labelled_calls
    backend.label_length_mismatches = stats.label_length_mismatches
    return backend


def _percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _verdict(
    candidate: BackendReport, production: BackendReport | None, thresholds: Thresholds
) -> Verdict:
    failed: list[str] = []
    passed: list[str] = []
    unknown: list[str] = []
    agreement = candidate.noise_adjusted_agreement
    if agreement is None or agreement.low is None:
        unknown.append(
            "agreement unknown: no call was compared with production"
            + ("" if candidate.uncompared == 0 else " (the spans hold no comparison results)")
        )
    elif agreement.low < thresholds.min_agreement:
        # With fewer calls than asked for, a low bound says "not enough data" as much as
        # "disagrees": a failure once there are enough calls, or when even the upper
        # bound is below the threshold (then more calls would not help).
        high = agreement.high if agreement.high is not None else 1.0
        enough = candidate.compared >= thresholds.min_calls or high < thresholds.min_agreement
        (failed if enough else unknown).append(
            f"agreement {_percent(agreement.rate)} (95% CI lower bound "
            f"{_percent(agreement.low)}) is below {_percent(thresholds.min_agreement)}"
        )
    else:
        passed.append(
            f"agreement lower bound {_percent(agreement.low)} >= "
            f"{_percent(thresholds.min_agreement)}"
        )
    rate = candidate.excess_error_rate
    if rate is not None and rate > thresholds.max_error_rate:
        failed.append(
            f"{_percent(rate, 2)} of its calls failed where production succeeded "
            f"(max {_percent(thresholds.max_error_rate, 2)})"
        )
    elif rate is not None:
        passed.append(f"extra errors {_percent(rate, 2)}")
    ours = candidate.latency.p99_ms
    theirs = production.latency.p99_ms if production else None
    if ours is not None and theirs:
        ratio = ours / theirs
        if ratio > thresholds.max_latency_ratio:
            failed.append(
                f"p99 latency {ours:.1f} ms is {ratio:.2f}x production's {theirs:.1f} ms "
                f"(max {thresholds.max_latency_ratio:g}x)"
            )
        else:
            passed.append(f"p99 latency {ratio:.2f}x production")
    compared = candidate.compared
    if compared < thresholds.min_calls and agreement is not None:
        unknown.append(f"only {compared} compared calls (need {thresholds.min_calls})")
    if failed:
        return Verdict("not safe", failed + unknown, passed)
    if unknown:
        return Verdict("cannot tell", unknown, passed)
    return Verdict("safe", [], passed)


def _assemble(
    path: Path,
    size: int,
    lines: int,
    spans: int,
    tally: _Tally,
    thresholds: Thresholds,
    labels: LabelsSummary,
    skipped: dict[str, int],
    examples: dict[str, list[str]],
    elapsed: float,
    jobs: int,
) -> Report:
    keys = sorted(tally.backends, key=lambda k: (_ROLE_ORDER[k[0]], k[0] != PRODUCTION or 0, k[1]))
    # Production columns: the busiest first (a promotion mid-file gives two).
    productions = sorted(
        (k for k in keys if k[0] == PRODUCTION), key=lambda k: -tally.backends[k].calls
    )
    others = [k for k in keys if k[0] != PRODUCTION]
    backends = [
        _backend_report(tally.backends[k], tally.routing.get(k[1])) for k in productions + others
    ]
    known = {b.name for b in backends if b.role != PRODUCTION}
    for name, routing in sorted(tally.routing.items()):
        if name not in known:
            # Sent nowhere (every copy dropped or sampled out): still a column.
            empty = _BackendStats(SHADOW, name, 0, 1)
            backends.append(_backend_report(empty, routing))
    production = backends[0] if backends and backends[0].role == PRODUCTION else None
    for backend in backends:
        if backend.role == SHADOW:
            backend.verdict = _verdict(backend, production, thresholds)

    warnings: list[str] = []
    if not tally.agreement_seen and any(b.role != PRODUCTION for b in backends):
        warnings.append(
            "agreement unknown: no shadow span holds comparison results (shadow.compared); "
            "this file was recorded by a proxy without online comparison"
        )
    if len(productions) > 1:
        names = ", ".join(k[1] for k in productions)
        warnings.append(
            f"production changed during the file ({names}); latency ratios use the busiest"
        )
    if labels.file and labels.file_request_ids and not labels.matched_request_ids:
        warnings.append(
            f"labels file {labels.file}: none of its {labels.file_request_ids} request ids "
            "matches a call in the traces file"
        )
    elif labels.request_ids and not labels.matched_request_ids:
        warnings.append(f"none of the {labels.request_ids} labelled request ids matches a call")
    if labels.file and not labels.file_request_ids:
        warnings.append(f"labels file {labels.file}: no usable label in it")
    if labels.file_skipped_lines:
        warnings.append(
            f"labels file {labels.file}: skipped {labels.file_skipped_lines} malformed "
            f"line(s), e.g. {labels.file_errors[0]}"
        )
    for reason, n in skipped.items():
        if reason.startswith(("lines that", "calls whose", "calls with no", "spans that came")):
            example = examples.get(reason)
            warnings.append(f"skipped {n} {reason}" + (f", e.g. {example[0]}" if example else ""))

    timeline = [
        TimelineBucket(
            start_ns=start,
            backends={
                f"{key[0]}:{key[1]}": dict(zip(_TIMELINE_FIELDS, row, strict=True))  # type: ignore[index]
                for key, row in bucket.items()
            },
        )
        for start, bucket in tally.timeline.rows()
    ]
    return Report(
        path=str(path),
        file_bytes=size,
        lines=lines,
        spans=spans,
        calls=tally.calls,
        first_call_ns=tally.first_ns,
        last_call_ns=tally.last_ns,
        methods=dict(sorted(tally.methods.items(), key=lambda i: -i[1])),
        backends=backends,
        thresholds=thresholds,
        labels=labels,
        agreement_known=tally.agreement_seen,
        timeline=timeline,
        timeline_width_s=tally.timeline.width_ns / 1e9,
        skipped=skipped,
        skipped_examples=examples,
        warnings=warnings,
        elapsed_s=elapsed,
        jobs=jobs,
    )


# ---------------------------------------------------------------------------------------
# Text


def _count(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if value < 10 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _interval(p: Proportion | None) -> str:
    if p is None or p.rate is None or p.low is None or p.high is None:
        return ""
    return f"{_percent(p.rate)} [{100 * p.low:.1f}, {100 * p.high:.1f}]"


def _time(ns: int | None) -> str:
    if ns is None:
        return "?"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _diff(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _signed_ms(value: float | None) -> str:
    if value is None:
        return ""
    return ("+" if value >= 0 else "-") + _ms(abs(value))


def table_rows(report: Report) -> list[tuple[str, list[str]]]:
    """The side-by-side table: (row name, one cell per backend)."""
    backends = report.backends
    production = backends[0] if backends and backends[0].role == PRODUCTION else None
    candidates = [b for b in backends if b.role != PRODUCTION]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Callable[[BackendReport], str], only: bool = True) -> None:
        if only:
            rows.append((name, [cell(b) for b in backends]))

    def for_others(cell: Callable[[BackendReport], str]) -> Callable[[BackendReport], str]:
        return lambda b: "" if b.role == PRODUCTION else cell(b)

    row("role", lambda b: b.role)
    row("backend", lambda b: b.name)
    row("calls", lambda b: _count(b.calls))
    row("errors", lambda b: f"{_percent(b.error_rate, 2)} ({b.errors:,})" if b.calls else "")
    codes: list[str] = []
    for b in backends:
        codes.extend(c for c in b.errors_by_code if c not in codes)
    for code in codes:
        row(f"  {code}", lambda b, code=code: _count(b.errors_by_code.get(code)))  # type: ignore[misc]
    row("latency p50 ms", lambda b: _ms(b.latency.p50_ms))
    row("latency p90 ms", lambda b: _ms(b.latency.p90_ms))
    row("latency p99 ms", lambda b: _ms(b.latency.p99_ms))
    row("latency max ms", lambda b: _ms(b.latency.max_ms))
    if not candidates:
        return rows
    base = production.latency.p99_ms if production else None
    row(
        "p99 / production",
        for_others(
            lambda b: f"{b.latency.p99_ms / base:.2f}x" if b.latency.p99_ms and base else ""
        ),
    )
    row(
        "latency diff mean ms",
        for_others(lambda b: _signed_ms(b.latency_diff_mean_ms)),
    )
    known = report.agreement_known
    row(
        "agreement",
        for_others(
            lambda b: (
                f"{b.agreement.successes:,}/{b.agreement.total:,}"
                if b.agreement
                else ("unknown" if b.calls else "")
            )
        ),
    )
    row("  rate [95% CI]", lambda b: _interval(b.agreement), known)
    has_reference = any(b.role == REFERENCE and b.compared for b in backends)
    row("  noise-adjusted", lambda b: _interval(b.noise_adjusted_agreement), has_reference)
    row(
        "disagreements", for_others(lambda b: _count(b.disagreements) if b.agreement else ""), known
    )
    row(
        "  real",
        lambda b: _count(b.real) if b.noise_adjusted_agreement else "",
        has_reference,
    )
    row(
        "  noise",
        lambda b: _count(b.noise) if b.noise_adjusted_agreement else "",
        has_reference,
    )
    row("noise rate (reference)", lambda b: _interval(b.noise_rate), has_reference)
    row("mean abs diff", lambda b: _diff(b.mean_abs_diff), known)
    row("max abs diff", lambda b: _diff(b.max_abs_diff), known)
    outputs: list[str] = []
    for b in backends:
        outputs.extend(o for o in list(b.differing_outputs)[:6] if o not in outputs)
    for output in outputs:
        row(
            f"  differs: {output}"[:26],
            lambda b, output=output: (
                _percent(b.differing_outputs.get(output, 0) / b.compared)  # type: ignore[misc]
                if b.compared
                else ""
            ),
        )
    if not known and any(b.uncompared for b in backends):
        row("answered, not compared", for_others(lambda b: _count(b.uncompared)))
    row("status mismatches", for_others(lambda b: _count(b.status_mismatches)))
    row(
        "extra errors",
        for_others(
            lambda b: (
                f"{_percent(b.excess_error_rate, 2)} ({b.excess_errors:,})"
                if b.excess_error_rate is not None
                else ""
            )
        ),
    )
    if any(b.accuracy for b in backends):
        row("accuracy [95% CI]", lambda b: _interval(b.accuracy))
        row("  labelled rows", lambda b: _count(b.accuracy.total) if b.accuracy else "")
    row("sent", for_others(lambda b: _count(b.sent)))
    row("dropped", for_others(lambda b: _count(b.dropped)))
    row("sampled out", for_others(lambda b: _count(b.sampled_out)))
    row(
        "sent, no span found",
        for_others(lambda b: _count(b.missing_spans)),
        any(b.missing_spans for b in backends),
    )
    return rows


def verdict_lines(report: Report) -> list[str]:
    t = report.thresholds
    lines = [
        f"Verdict (agreement 95% CI lower bound >= {_percent(t.min_agreement)}, noise "
        f"excused; extra errors <= {_percent(t.max_error_rate, 2)}; p99 <= "
        f"{t.max_latency_ratio:g}x production; >= {t.min_calls} compared calls):"
    ]
    candidates = report.candidates
    if not candidates:
        lines.append("  no shadow in this file: nothing to promote")
    for backend in candidates:
        verdict = backend.verdict
        assert verdict is not None
        if verdict.decision == "safe":
            lines.append(f"  {backend.name}: looks SAFE to promote ({'; '.join(verdict.passed)})")
        elif verdict.decision == "not safe":
            lines.append(f"  {backend.name}: NOT safe to promote: {'; '.join(verdict.reasons)}")
        else:
            lines.append(f"  {backend.name}: CANNOT TELL yet: {'; '.join(verdict.reasons)}")
    return lines


def render_text(report: Report) -> str:
    """The report as a person reads it in a terminal: one column per backend."""
    out: list[str] = []
    write = out.append
    duration = (
        (report.last_call_ns - report.first_call_ns) / 1e9
        if report.first_call_ns is not None and report.last_call_ns is not None
        else 0.0
    )
    write(f"Shadow report: {report.path}")
    write(
        f"  read        {report.file_bytes / 1e6:,.1f} MB, {report.lines:,} lines, "
        f"{report.spans:,} spans in {report.elapsed_s:.1f} s"
    )
    write(
        f"  calls       {report.calls:,} with a production span, {_time(report.first_call_ns)} "
        f"to {_time(report.last_call_ns)} UTC ({duration:,.{0 if duration >= 10 else 2}f} s)"
    )
    if report.methods:
        methods = ", ".join(f"{m} {n:,}" for m, n in list(report.methods.items())[:4])
        more = f" and {len(report.methods) - 4} more" if len(report.methods) > 4 else ""
        write(f"  methods     {methods}{more}")
    labels = report.labels
    if labels.request_ids:
        sources = [f"{labels.feedback_request_ids:,} request ids from feedback spans"]
        if labels.file:
            sources.append(f"{labels.file_request_ids:,} from {labels.file}")
        unmatched = (
            f"{labels.unmatched_request_ids:,} matched no call"
            if labels.unmatched_request_ids
            else "every one matched a call"
        )
        write(
            f"  labels      {', '.join(sources)}; {labels.labelled_calls:,} calls labelled, "
            f"{unmatched}"
        )
    else:
        write("  labels      none (no feedback spans, no --labels file): accuracy unknown")
    if report.skipped:
        parts = [f"{n:,} {reason}" for reason, n in report.skipped.items()]
        write("  skipped     " + "; ".join(parts))
    write("")

    rows = table_rows(report)
    label_width = max(len(name) for name, _ in rows) + 2
    widths = [max(12, *(len(cells[i]) for _, cells in rows)) + 2 for i in range(len(rows[0][1]))]
    for name, cells in rows:
        cells_text = "".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        write((name.ljust(label_width) + cells_text).rstrip())

    for backend in report.backends:
        if not backend.top_disagreements:
            continue
        write("")
        write(
            f"Top disagreements of {backend.name} (real first, then errors, then noise; "
            "find the trace id in Jaeger)"
        )
        write(
            f"  {'request id':<24}{'trace id':<34}{'kind':<7}{'max diff':>9}  production -> shadow"
        )
        for d in backend.top_disagreements:
            if d.kind == "error":
                what = f"{d.production_status} -> {d.candidate_status}"
            else:
                ours = ",".join(d.production_labels) or "?"
                theirs = ",".join(d.candidate_labels) or "?"
                what = f"{ours} -> {theirs}"
                if d.differing_outputs:
                    what += f"  (differs: {', '.join(d.differing_outputs)})"
            write(
                f"  {d.request_id[:23]:<24}{d.trace_id:<34}{d.kind:<7}"
                f"{_diff(d.max_abs_diff):>9}  {what}"
            )

    for warning in report.warnings:
        write("")
        write(f"note: {warning}")
    write("")
    out.extend(verdict_lines(report))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Command line

_EPILOG = """\
how to read the report:
  One column per backend: production, each shadow (a candidate), each reference (a second
  instance of the production model, when one ran).
  errors            share of the backend's calls with a non-OK gRPC status, then per code.
  latency           p50/p90/p99 within 1% (a log-bucket histogram), max exact, in ms.
  agreement         calls on which the proxy found the backend's reply equal to
                    production's (same predicted label, or outputs within tolerance), of
                    those it compared; the 95% Wilson confidence interval in brackets.
  noise             where a reference ran, production and the reference may differ on the
                    same request (non-determinism). A shadow disagreement is noise when every
                    output it differs on also differed between reference and production in
                    the same call (as Diffy does); "noise rate" is the share of compared
                    calls on which the reference differed. noise-adjusted agreement counts
                    noise disagreements as agreeing.
  status mismatches one of production and the backend failed, the other did not.
  extra errors      calls the candidate failed where production succeeded.
  abs diff          mean and max absolute difference over numeric outputs.
  differs: OUTPUT   share of compared calls on which that output differed.
  accuracy          rows whose predicted label equals the true label, of labelled rows;
                    labels come from feedback spans in the file and from --labels (which
                    wins for the same request id), joined by request id, row by row.
  sent/dropped/sampled out   copies the proxy sent, dropped over the in-flight bound, or
                    did not sample.
  Top disagreements list request ids and trace ids to open in Jaeger.
  skipped / notes   what was not counted and why (lines that are not OTLP JSON, calls
                    without a production span, spans that came too late for the buffer).
  --html adds plots: latency distribution and tail per backend, agreement over time, and
  a confusion matrix of production's predicted labels against each shadow's.

verdict:
  A shadow looks safe to promote when the lower bound of its noise-adjusted agreement
  interval is at least --min-agreement (the bound rather than the rate, so that a small
  sample cannot pass by luck: 100 agreeing calls of 100 give a bound of 96.3%), at most
  --max-error-rate of its calls failed where production succeeded, its p99 latency is at
  most --max-latency-ratio times production's, and it has --min-calls compared calls.
  With fewer calls, a low agreement says "cannot tell yet", unless even the interval's
  upper bound is below --min-agreement (then more calls would not change the answer).

labels file (--labels):
  CSV with a header:   request_id,label          JSON lines:  {"request_id": "r1", "label": 1}
                       r1,1                                   {"request_id": "r2", "label": [0, 1]}
  A request id on several lines is a batch call, one row per line in order (or say which
  with a "row" column or key); a JSON list gives all rows at once.

exit codes: 0 report printed (possibly partial: see "skipped" and the notes), 2 unusable
input (missing file, not OTLP JSON, no call with a production span, a bad labels file).
"""


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="compare production with its shadows from a traces file",
        description=(
            "Read a traces file written by the proxy (OTLP JSON lines; a Collector's file\n"
            "exporter output works too) and print, per backend side by side: calls, errors by\n"
            "code, latency percentiles, agreement with production with a 95% confidence\n"
            "interval, noise measured by a reference, numeric differences, accuracy against\n"
            "true labels, the top disagreeing requests, and a verdict per candidate.\n"
            "Memory stays bounded whatever the file's size (--buffer-calls), apart from the\n"
            "true labels (one entry per labelled request id); large files are read by\n"
            "several processes (--jobs)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("traces_file", type=Path, metavar="TRACES_FILE", help="the traces file")
    p.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="true labels, CSV (request_id,label) or JSON lines; joined by request id",
    )
    p.add_argument("--html", type=Path, metavar="OUT.html", help="also write an HTML report")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write every figure as JSON")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=_DEFAULT_THRESHOLDS.min_agreement,
        metavar="RATE",
        help="verdict: lowest acceptable lower CI bound of agreement (default %(default)s)",
    )
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=_DEFAULT_THRESHOLDS.max_error_rate,
        metavar="RATE",
        help="verdict: highest share of calls failing where production succeeded "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-latency-ratio",
        type=float,
        default=_DEFAULT_THRESHOLDS.max_latency_ratio,
        metavar="X",
        help="verdict: highest p99 latency as a multiple of production's (default %(default)s)",
    )
    p.add_argument(
        "--min-calls",
        type=int,
        default=_DEFAULT_THRESHOLDS.min_calls,
        metavar="N",
        help="verdict: fewest compared calls to decide on (default %(default)s)",
    )
    p.add_argument(
        "--top",
        type=int,
        default=10,
        metavar="N",
        help="disagreeing requests listed per shadow (default %(default)s)",
    )
    p.add_argument(
        "--buffer-calls",
        type=int,
        default=100_000,
        metavar="N",
        help="calls held open while their spans arrive; bounds memory (default %(default)s)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="processes reading the file (default: 1 under 32 MiB, else one per CPU, max 8)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return p


def run_report(args: argparse.Namespace) -> int:
    """Run ``report`` with parsed arguments; prints the report, returns the exit code."""
    prog = "shadow-proxy report"
    try:
        thresholds = Thresholds(
            min_agreement=args.min_agreement,
            max_error_rate=args.max_error_rate,
            max_latency_ratio=args.max_latency_ratio,
            min_calls=args.min_calls,
        )
        if args.top < 0 or args.buffer_calls < 1 or (args.jobs is not None and args.jobs < 1):
            raise ValueError("--top must be 0 or more, --buffer-calls and --jobs 1 or more")
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        report = build_report(
            args.traces_file,
            args.labels,
            thresholds,
            progress,
            top=args.top,
            buffer_calls=args.buffer_calls,
            jobs=args.jobs,
        )
    except ReportInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    sys.stdout.write(render_text(report))
    try:
        if args.json is not None:
            args.json.write_bytes(
                orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
            )
            print(f"wrote {args.json}")
        if args.html is not None:
            from proxy.compare.html import render_html

            args.html.write_text(render_html(report), encoding="utf-8")
            print(f"wrote {args.html}")
    except OSError as exc:
        print(f"{prog}: error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0
