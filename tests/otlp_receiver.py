"""Real OTLP trace receivers for tests (gRPC and HTTP/protobuf on loopback port 0), and a
reader for the OTLP JSON lines file, all giving the same plain :class:`ReceivedSpan`."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

# OTLP's enums, as numbers, the same in protobuf and in OTLP JSON.
SPAN_KIND_SERVER = trace_pb2.Span.SPAN_KIND_SERVER
SPAN_KIND_CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
STATUS_UNSET = trace_pb2.Status.STATUS_CODE_UNSET
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as a collector got it; ids are lowercase hex, ``parent_span_id`` is ``""``
    for a root span."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    status_code: int
    resource: dict[str, Any]

    def event(self, name: str) -> ReceivedEvent:
        """The one event called ``name``; fails the test when there is not exactly one."""
        found = [event for event in self.events if event.name == name]
        assert len(found) == 1, f"span {self.name!r} has {len(found)} {name!r} events"
        return found[0]


# ------------------------------------------------------------------------ protobuf form


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """The spans of one export request, in the order they were sent."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        attributes=_attributes(span.attributes),
                        events=tuple(
                            ReceivedEvent(event.name, _attributes(event.attributes))
                            for event in span.events
                        ),
                        status_code=span.status.code,
                        resource=resource,
                    )
                )
    return spans


# ------------------------------------------------------------------------ OTLP JSON form


def _json_value(value: Mapping[str, Any]) -> Any:
    if not value:
        return None
    (which, inner), *_ = value.items()
    if which == "intValue":
        return int(inner)  # 64-bit integers are strings in OTLP JSON
    if which == "arrayValue":
        return [_json_value(item) for item in inner.get("values", [])]
    if which == "kvlistValue":
        return _json_attributes(inner.get("values", []))
    return inner


def _json_attributes(pairs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {pair["key"]: _json_value(pair.get("value", {})) for pair in pairs}


def spans_from_json_lines(path: Path) -> list[ReceivedSpan]:
    """Every span in an OTLP JSON lines file (one ``{"resourceSpans": ...}`` per line);
    in this form ids are already hex strings."""
    spans: list[ReceivedSpan] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        for resource_spans in json.loads(line).get("resourceSpans", []):
            resource = _json_attributes(resource_spans.get("resource", {}).get("attributes", []))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    spans.append(
                        ReceivedSpan(
                            name=span["name"],
                            trace_id=span["traceId"].lower(),
                            span_id=span["spanId"].lower(),
                            parent_span_id=span.get("parentSpanId", "").lower(),
                            kind=int(span.get("kind", 0)),
                            attributes=_json_attributes(span.get("attributes", [])),
                            events=tuple(
                                ReceivedEvent(
                                    event["name"], _json_attributes(event.get("attributes", []))
                                )
                                for event in span.get("events", [])
                            ),
                            status_code=int(span.get("status", {}).get("code", 0)),
                            resource=resource,
                        )
                    )
    return spans


# ------------------------------------------------------------------------ receivers


class _SpanStore:
    """The export requests a receiver got, safe to read from any thread or the event loop."""

    def __init__(self) -> None:
        self._arrived = threading.Condition()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def _store_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._arrived:
            self.metric_requests.append(request)
            self._arrived.notify_all()

    def metric_names(self) -> set[str]:
        """Names of every metric received so far."""
        with self._arrived:
            requests = list(self.metric_requests)
        return {
            metric.name
            for request in requests
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    def _store(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._arrived:
            requests = list(self.requests)
        return [span for request in requests for span in spans_of(request)]

    def wait_for_spans_blocking(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Block until at least ``count`` spans arrived (not from the event loop's thread)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while sum(len(spans_of(r)) for r in self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
        spans = self.spans()
        assert len(spans) >= count, f"{len(spans)} spans arrived in {timeout}s, wanted {count}"
        return spans

    async def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Wait, without blocking the event loop, until at least ``count`` spans arrived."""
        deadline = time.monotonic() + timeout
        while len(spans := self.spans()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(spans)} spans arrived in {timeout}s, wanted {count}")
            await asyncio.sleep(0.02)
        return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _SpanStore) -> None:
        self._store = store

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store._store(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _SpanStore) -> None:
        self._store = store

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._store._store_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpGrpcReceiver(_SpanStore):
    """An OTLP/gRPC collector on ``127.0.0.1:0``; a threaded server, so it answers whether
    or not the test's event loop is free. Use as a context manager."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` should be set to."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpGrpcReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> OtlpGrpcReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OtlpHttpReceiver(_SpanStore):
    """An OTLP/HTTP (protobuf) collector on ``127.0.0.1:0``: POST /v1/traces, in a thread."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.paths: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` should be set to (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpHttpReceiver:
        receiver = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.paths.append(self.path)
                if self.path == "/v1/traces":
                    receiver._store(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._store_metrics(
                        metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    )
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="otlp-http-receiver", daemon=True
        )
        self._thread.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OtlpHttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
