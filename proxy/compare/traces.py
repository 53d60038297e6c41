"""Read an OTLP JSON lines traces file back into calls: the proxy span and its backend spans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class BackendCall:
    """One backend span: who answered, how, how fast, and the decoded reply when recorded."""

    name: str
    role: str
    status_code: int
    latency_ms: float
    reply: dict[str, Any] | None
    span_id: str


@dataclass(slots=True)
class RecordedCall:
    """One client call as recorded: the proxy span with its production and shadow spans."""

    trace_id: str
    request_id: str = ""
    method: str = ""
    start_ns: int = 0
    status_code: int | None = None
    dropped: tuple[str, ...] = ()
    production: BackendCall | None = None
    shadows: dict[str, BackendCall] = field(default_factory=dict)


_CALL_ROLES = frozenset(("proxy", "production", "shadow", "reference"))


def _value(raw: dict[str, Any]) -> Any:
    if "stringValue" in raw:
        return raw["stringValue"]
    if "intValue" in raw:
        return int(raw["intValue"])
    if "boolValue" in raw:
        return raw["boolValue"]
    if "doubleValue" in raw:
        return raw["doubleValue"]
    if "arrayValue" in raw:
        return tuple(_value(v) for v in raw["arrayValue"].get("values", []))
    return None


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def document_spans(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The spans of one OTLP JSON traces document, as they are (attributes not flattened).

    Accepts ``scopeSpans`` and the older ``instrumentationLibrarySpans`` that some
    Collectors still write.
    """
    for resource_spans in document["resourceSpans"] or ():
        scopes = resource_spans.get("scopeSpans") or resource_spans.get(
            "instrumentationLibrarySpans"
        )
        for scope_spans in scopes or ():
            yield from scope_spans.get("spans") or ()


def iter_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Every OTLP JSON traces document in the file, one per non-empty line.

    Raises ValueError naming the line when a line is not OTLP JSON.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                document = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(document, dict) or "resourceSpans" not in document:
                raise ValueError(f"{path}:{number}: not an OTLP traces document (no resourceSpans)")
            yield document


def iter_spans(path: Path) -> Iterator[dict[str, Any]]:
    """Every span in the file, as the OTLP JSON dict with ``attributes`` flattened to a dict.

    Raises ValueError naming the line when a line is not OTLP JSON.
    """
    for document in iter_documents(path):
        for span in document_spans(document):
            span["attributes"] = _attributes(span.get("attributes", []))
            yield span


def _reply(span: dict[str, Any]) -> dict[str, Any] | None:
    for event in span.get("events", []):
        if event.get("name") != "response":
            continue
        attributes = _attributes(event.get("attributes", []))
        if attributes.get("payload.encoding") == "json" and not attributes.get("payload.truncated"):
            try:
                decoded = json.loads(attributes.get("payload", ""))
            except json.JSONDecodeError:
                return None
            return decoded if isinstance(decoded, dict) else None
    return None


def read_calls(path: Path) -> list[RecordedCall]:
    """Group the file's spans into calls by trace id (the proxy starts one trace per call)."""
    calls: dict[str, RecordedCall] = {}
    for span in iter_spans(path):
        attributes = span["attributes"]
        role = attributes.get("shadow.role")
        if role not in _CALL_ROLES:
            continue  # not a call's span (feedback spans, other services)
        trace_id = span.get("traceId", "")
        call = calls.get(trace_id)
        if call is None:
            call = calls[trace_id] = RecordedCall(trace_id=trace_id)
        if role == "proxy":
            call.request_id = attributes.get("shadow.request_id", "")
            call.method = f"{attributes.get('rpc.service', '')}/{attributes.get('rpc.method', '')}"
            call.start_ns = int(span.get("startTimeUnixNano", 0))
            call.status_code = attributes.get("rpc.grpc.status_code")
            call.dropped = tuple(attributes.get("shadow.dropped", ()))
            continue
        backend = BackendCall(
            name=attributes.get("shadow.backend", ""),
            role=role,
            status_code=attributes.get("rpc.grpc.status_code", 2),
            latency_ms=(int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6,
            reply=_reply(span),
            span_id=span.get("spanId", ""),
        )
        if role == "production":
            call.production = backend
        else:
            call.shadows[backend.name] = backend
    return sorted(calls.values(), key=lambda c: c.start_ns)


def merge_for_upload(path: Path, out: Path) -> int:
    """Write the file's lines as one OTLP JSON document (``{"resourceSpans": [...]}``), the
    form the Jaeger UI's "Upload JSON" accepts; returns the number of spans written."""
    resource_spans: list[Any] = []
    spans = 0
    for document in iter_documents(path):
        for entry in document["resourceSpans"]:
            spans += sum(len(s.get("spans", [])) for s in entry.get("scopeSpans", []))
            resource_spans.append(entry)
    out.write_text(
        json.dumps({"resourceSpans": resource_spans}, separators=(",", ":")), encoding="utf-8"
    )
    return spans
