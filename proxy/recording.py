"""Turn call outcomes into spans, attributes and payload events, off the request path.

The request path only appends a record to a bounded queue (never blocks, never raises);
a recorder thread decodes payloads and builds the spans, and the batch processors export
them. When the queue is full the record is dropped and counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from proxy.compare.pair import PREDICT_METHOD, compare_replies, decode_outputs, predicted_labels
from proxy.metrics import ProxyMetrics
from proxy.payloads import PayloadCodec, metadata_attributes
from proxy.records import BackendOutcome, CallRecord, FeedbackRecord, TraceContext
from proxy.registry import Registry
from proxy.settings import Settings
from proxy.telemetry import Telemetry

log = logging.getLogger(__name__)

_POLL_S = 0.02
# Server spans are errors only for codes that mean the server failed (RPC conventions).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Record = CallRecord | BackendOutcome | FeedbackRecord
# Calls remembered so that feedback sent later can link to the call's trace.
_RECENT_CALLS = 100_000


def status_code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def _rpc_names(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _peer_address(peer: str) -> tuple[str, int] | None:
    # gRPC peers look like "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555".
    _, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class Recorder:
    """Owns the bounded queue of outcomes and the thread that records them as spans."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        listen_port: int = 0,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._metrics = metrics or ProxyMetrics(None)
        self.registry: Registry | None = None
        """Where per-backend agreement counts go (the admin API lists them)."""
        self._tolerance = settings.tolerance
        self._recent: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self._tracer: Tracer | None = (
            telemetry.provider.get_tracer("shadow-proxy") if telemetry.provider else None  # type: ignore[assignment]
        )
        self._codec = PayloadCodec(settings.payload_max_bytes, settings.redact_tensors)
        self._record_payloads = settings.record_payloads
        self._redact_metadata = frozenset(settings.redact_metadata)
        self._max_queue = settings.recorder_queue_size
        self._queue: collections.deque[Record] = collections.deque()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.listen_port = listen_port
        self.submitted = 0
        self.dropped = 0
        self.recorded = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self._tracer is not None or self._metrics.enabled

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="shadow-recorder", daemon=True)
        self._thread.start()

    def submit(self, record: Record) -> None:
        """Queue an outcome for recording. Never blocks and never raises."""
        if self._thread is None:
            return
        # deque.append and len are atomic under the GIL; the bound is approximate by at most
        # the number of threads submitting at once, which is one (the event loop).
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("recorder queue full: %d outcomes dropped so far", self.dropped)
            return
        self.submitted += 1
        self._queue.append(record)

    def close(self, timeout: float = 10.0) -> None:
        """Record everything still queued, then stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("recorder did not finish within %.1fs; %d outcomes unrecorded",
                            timeout, len(self._queue))  # fmt: skip

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued outcome is a span and the exporters have it."""
        deadline = time.monotonic() + timeout
        while self._queue or not self._idle.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        provider = self._telemetry.provider
        return (
            provider.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000))
            if provider
            else True
        )

    def summary(self) -> str:
        return (
            f"submitted={self.submitted} recorded={self.recorded} dropped={self.dropped} "
            f"failed={self.failed}"
        )

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        queue = self._queue
        while True:
            stopping = self._stop.is_set()
            if queue:
                self._idle.clear()
                while queue:
                    self._record_one(queue.popleft())
                self._idle.set()
            if stopping:
                return
            time.sleep(_POLL_S)

    def _record_one(self, record: Record) -> None:
        try:
            if isinstance(record, CallRecord):
                self._record_call(record)
            elif isinstance(record, BackendOutcome):
                self._record_backend(record)
            else:
                self._record_feedback(record)
            self.recorded += 1
        except Exception:
            self.failed += 1
            if self.failed == 1 or self.failed % 1000 == 0:
                log.exception("could not record an outcome (%d so far)", self.failed)

    def _record_call(self, record: CallRecord) -> None:
        trace_ctx = record.trace
        self._remember(record.request_id, trace_ctx)
        if self._tracer is None:
            if record.production is not None:
                self._record_backend(record.production)
            return
        parent = None
        if trace_ctx.remote_parent_span_id is not None:
            remote = SpanContext(
                trace_ctx.trace_id,
                trace_ctx.remote_parent_span_id,
                is_remote=True,
                trace_flags=TraceFlags(trace_ctx.trace_flags),
                trace_state=TraceState.from_header([trace_ctx.tracestate])
                if trace_ctx.tracestate
                else None,
            )
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        service, method = _rpc_names(record.method)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": status_code_number(record.code),
            "shadow.role": "proxy",
            "shadow.request_id": record.request_id,
            "shadow.request.size": len(record.request),
            "shadow.production": record.production.name if record.production else "",
            "shadow.sampled": record.shadows_sent,
            "shadow.dropped": record.shadows_dropped,
            "shadow.sampled_out": record.shadows_sampled_out,
        }
        if self.listen_port:
            attributes["server.port"] = self.listen_port
        peer = _peer_address(record.peer)
        if peer:
            attributes["client.address"], attributes["client.port"] = peer
        attributes.update(
            metadata_attributes("rpc.grpc.request.metadata", record.metadata, self._redact_metadata)
        )
        self._telemetry.ids.preset(trace_ctx.trace_id, trace_ctx.proxy_span_id)
        span = self._tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=record.start_ns,
        )
        if self._record_payloads:
            span.add_event(
                "request",
                self._codec.event_attributes(record.method, record.request, reply=False),
                timestamp=record.start_ns,
            )
        if record.code in _SERVER_ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, f"{record.code.name}: {record.details}"))
        span.end(end_time=record.end_ns)
        if record.production is not None:
            self._record_backend(record.production)

    def _remember(self, request_id: str, trace_ctx: TraceContext) -> None:
        recent = self._recent
        recent[request_id] = (trace_ctx.trace_id, trace_ctx.proxy_span_id)
        recent.move_to_end(request_id)
        if len(recent) > _RECENT_CALLS:
            recent.popitem(last=False)

    def _comparison_attributes(self, outcome: BackendOutcome) -> dict[str, Any]:
        """Predicted labels, and for shadows the comparison with production's reply."""
        attributes: dict[str, Any] = {}
        outputs = None
        if outcome.method == PREDICT_METHOD and outcome.reply is not None:
            outputs = decode_outputs(outcome.reply)
            labels = predicted_labels(outputs)
            if labels is not None:
                attributes["shadow.predicted_labels"] = labels
        latency_ms = (outcome.end_ns - outcome.start_ns) / 1e6
        production = outcome.production
        agree: bool | None = None
        max_abs_diff: float | None = None
        if production is not None:
            comparison = compare_replies(
                outcome.method,
                production.code,
                production.reply,
                outcome.code,
                outcome.reply,
                self._tolerance,
            )
            comparison.latency_diff_ms = latency_ms - production.latency_ns / 1e6
            attributes.update(comparison.attributes())
            agree, max_abs_diff = comparison.agree, comparison.max_abs_diff
        self._metrics.record_call(outcome.name, outcome.role, latency_ms)
        if production is not None:
            self._metrics.record_comparison(outcome.name, outcome.role, agree, max_abs_diff)
            backend = self.registry.find(outcome.name) if self.registry is not None else None
            if backend is not None and agree is not None:
                backend.stats.compared += 1
                backend.stats.agreed += agree
        return attributes

    def _record_feedback(self, record: FeedbackRecord) -> None:
        if self._tracer is None:
            return
        attributes: dict[str, Any] = {
            "shadow.role": "feedback",
            "shadow.request_id": record.request_id,
            "shadow.labels": record.labels,
            "shadow.label_output": record.output,
        }
        links = []
        known = self._recent.get(record.request_id)
        if known is not None:
            linked = SpanContext(known[0], known[1], is_remote=False, trace_flags=TraceFlags(1))
            links.append(trace.Link(linked, {"shadow.link": "labelled call"}))
        attributes["shadow.linked"] = known is not None
        span = self._tracer.start_span(
            "feedback",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
            start_time=record.received_ns,
        )
        span.end(end_time=record.received_ns)

    def _record_backend(self, outcome: BackendOutcome) -> None:
        comparison_attributes = self._comparison_attributes(outcome)
        if self._tracer is None:
            return
        trace_ctx: TraceContext = outcome.trace
        proxy_span = SpanContext(
            trace_ctx.trace_id,
            trace_ctx.proxy_span_id,
            is_remote=False,
            trace_flags=TraceFlags(trace_ctx.trace_flags),
        )
        parent = trace.set_span_in_context(NonRecordingSpan(proxy_span))
        service, method = _rpc_names(outcome.method)
        host, _, port = outcome.address.rpartition(":")
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": status_code_number(outcome.code),
            "server.address": host.strip("[]"),
            "server.port": int(port),
            "shadow.role": outcome.role,
            "shadow.backend": outcome.name,
            "shadow.request_id": outcome.request_id,
            "shadow.request.size": outcome.request_size,
            "shadow.status_from_backend": outcome.from_backend,
        }
        if outcome.role != "production":
            attributes["shadow.sampled"] = True
        attributes.update(comparison_attributes)
        if outcome.reply is not None:
            attributes["shadow.response.size"] = len(outcome.reply)
        attributes.update(
            metadata_attributes(
                "rpc.grpc.response.metadata", outcome.trailing_metadata, self._redact_metadata
            )
        )
        self._telemetry.ids.preset(trace_ctx.trace_id, outcome.span_id)
        span = self._tracer.start_span(
            f"{outcome.role} {outcome.name}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=outcome.start_ns,
        )
        if self._record_payloads and outcome.reply is not None:
            span.add_event(
                "response",
                self._codec.event_attributes(outcome.method, outcome.reply, reply=True),
                timestamp=outcome.end_ns,
            )
        if outcome.code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{outcome.code.name}: {outcome.details}"))
        span.end(end_time=outcome.end_ns)
