"""Write synthetic traces files shaped like the proxy's: calls described as plain values,
encoded as OTLP JSON spans, packed into lines, optionally out of order.

The tests describe what happened on each call here and compute what the report should
say from these descriptions themselves, never from the report.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

START_NS = 1_780_000_000_000_000_000
SERVICE = "predict.v1.PredictionService"


@dataclass
class Answer:
    """One backend's part in a call."""

    name: str
    role: str = "shadow"
    status: int = 0
    latency_ms: float = 5.0
    labels: list[str] | None = None
    """Predicted labels, one per row (``shadow.predicted_labels``); None: no label output."""
    compared: bool | None = None
    """None: the span has no comparison attributes at all (an older proxy)."""
    agree: bool | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    differing: list[str] | None = None


@dataclass
class Call:
    """One call through the proxy."""

    request_id: str
    production: Answer | None
    others: list[Answer] = field(default_factory=list)
    start_ns: int = START_NS
    dropped: list[str] = field(default_factory=list)
    sampled_out: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    """Backends the call was sent to whose span is not in the file."""
    proxy_span: bool = True
    trace_id: str = ""
    proxy_span_id: str = ""


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if value:
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"arrayValue": {}}


def attributes(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _value(value)} for key, value in values.items()]


def _hex(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def call_spans(call: Call, rng: random.Random, payloads: bool = True) -> list[dict[str, Any]]:
    """The proxy span and backend spans of a call, as the proxy's file exporter writes them."""
    call.trace_id = call.trace_id or _hex(rng, 128)
    call.proxy_span_id = call.proxy_span_id or _hex(rng, 64)
    answers = ([call.production] if call.production else []) + call.others
    sent = [a.name for a in call.others] + call.lost
    spans: list[dict[str, Any]] = []
    production_ms = call.production.latency_ms if call.production else 0.0
    if call.proxy_span:
        proxy: dict[str, Any] = {
            "traceId": call.trace_id,
            "spanId": call.proxy_span_id,
            "flags": 256,
            "name": f"{SERVICE}/Predict",
            "kind": 2,
            "startTimeUnixNano": str(call.start_ns),
            "endTimeUnixNano": str(call.start_ns + int((production_ms + 0.2) * 1e6)),
            "attributes": attributes(
                {
                    "rpc.system": "grpc",
                    "rpc.service": SERVICE,
                    "rpc.method": "Predict",
                    "rpc.grpc.status_code": call.production.status if call.production else 8,
                    "shadow.role": "proxy",
                    "shadow.request_id": call.request_id,
                    "shadow.production": call.production.name if call.production else "",
                    "shadow.sampled": sent,
                    "shadow.dropped": call.dropped,
                    "shadow.sampled_out": call.sampled_out,
                    "rpc.grpc.request.metadata.user-agent": ["grpc-python/1.0"],
                }
            ),
            "events": [],
            "status": {},
        }
        if payloads:
            proxy["events"].append(
                {
                    "timeUnixNano": str(call.start_ns),
                    "name": "request",
                    "attributes": attributes(
                        {
                            "payload.encoding": "json",
                            "payload": '{"request_id":"' + call.request_id + '","x":"],\\"a\\"]"}',
                            "payload.truncated": False,
                        }
                    ),
                }
            )
        spans.append(proxy)
    for answer in answers:
        values: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": "Predict",
            "rpc.grpc.status_code": answer.status,
            "shadow.role": answer.role,
            "shadow.backend": answer.name,
            "shadow.request_id": call.request_id,
        }
        if answer.role != "production":
            values["shadow.sampled"] = True
        if answer.labels is not None:
            values["shadow.predicted_labels"] = answer.labels
        if answer.compared is not None:
            values["shadow.compared"] = answer.compared
            values["shadow.status_mismatch"] = (answer.status == 0) != (
                call.production is not None and call.production.status == 0
            )
            values["shadow.latency_diff_ms"] = answer.latency_ms - production_ms
        for key, value in (
            ("shadow.agree", answer.agree),
            ("shadow.max_abs_diff", answer.max_abs_diff),
            ("shadow.mean_abs_diff", answer.mean_abs_diff),
            ("shadow.differing_outputs", answer.differing),
        ):
            if value is not None:
                values[key] = value
        start = call.start_ns + 100_000
        end = start + round(answer.latency_ms * 1e6)
        span: dict[str, Any] = {
            "traceId": call.trace_id,
            "spanId": _hex(rng, 64),
            "parentSpanId": call.proxy_span_id,
            "flags": 256,
            "name": f"{answer.role} {answer.name}",
            "kind": 3,
            "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(end),
            "attributes": attributes(values),
            "events": [],
            "status": {} if answer.status == 0 else {"code": 2, "message": "failed"},
        }
        if payloads and answer.status == 0:
            span["events"].append(
                {
                    "timeUnixNano": str(end),
                    "name": "response",
                    "attributes": attributes({"payload": '{"outputs":[{"name":"label"}]}'}),
                }
            )
        spans.append(span)
    return spans


def feedback_span(request_id: str, labels: Sequence[str], rng: random.Random) -> dict[str, Any]:
    """A feedback span: the true labels of one earlier call."""
    return {
        "traceId": _hex(rng, 128),
        "spanId": _hex(rng, 64),
        "flags": 256,
        "name": "feedback",
        "kind": 1,
        "startTimeUnixNano": str(START_NS),
        "endTimeUnixNano": str(START_NS + 1000),
        "attributes": attributes(
            {
                "shadow.role": "feedback",
                "shadow.request_id": request_id,
                "shadow.labels": list(labels),
            }
        ),
        "links": [{"traceId": _hex(rng, 128), "spanId": _hex(rng, 64)}],
        "status": {},
    }


def document(spans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": attributes({"service.name": "shadow-proxy"})},
                "scopeSpans": [{"scope": {"name": "shadow-proxy"}, "spans": list(spans)}],
            }
        ]
    }


def write_traces(
    path: Path,
    spans: Sequence[dict[str, Any]],
    per_line: int = 512,
    shuffle_window: int = 0,
    rng: random.Random | None = None,
    extra_lines: Iterable[tuple[int, bytes]] = (),
) -> Path:
    """Write spans as OTLP JSON lines, ``per_line`` spans a line.

    ``shuffle_window``: shuffle the spans within consecutive windows of that many, so that a
    call's spans come out of order and across lines, but near each other.
    ``extra_lines``: (index in the file, raw line) to insert, for bad input.
    """
    ordered = list(spans)
    if shuffle_window > 1:
        rng = rng or random.Random(0)
        for start in range(0, len(ordered), shuffle_window):
            window = ordered[start : start + shuffle_window]
            rng.shuffle(window)
            ordered[start : start + shuffle_window] = window
    lines = [
        orjson.dumps(document(ordered[i : i + per_line])) for i in range(0, len(ordered), per_line)
    ]
    for index, raw in sorted(extra_lines):
        lines.insert(index, raw)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_calls(
    path: Path,
    calls: Sequence[Call],
    feedback: Sequence[tuple[str, Sequence[str]]] = (),
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write calls (then feedback spans, later in the file) to a traces file."""
    rng = random.Random(seed)
    spans = [span for call in calls for span in call_spans(call, rng)]
    spans += [feedback_span(request_id, labels, rng) for request_id, labels in feedback]
    return write_traces(path, spans, rng=rng, **options)
