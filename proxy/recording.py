"""Turn call outcomes into spans, attributes and payload events, off the request path.

The request path only appends a record to a bounded queue (never blocks, never raises);
a recorder thread decodes payloads and builds the spans, and the batch processors export
them. When the queue is full the record is dropped and counted.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, sampling
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from proxy import __version__
from proxy.compare.pair import compare_replies, decode_outputs, predicted_labels
from proxy.metrics import ProxyMetrics
from proxy.payloads import PayloadCodec, metadata_attributes
from proxy.protocols import Outputs
from proxy.records import (
    BackendOutcome,
    CallRecord,
    FeedbackRecord,
    StreamCounts,
    TraceContext,
)
from proxy.registry import Registry
from proxy.settings import Settings
from proxy.telemetry import Telemetry

log = logging.getLogger(__name__)

_POLL_S = 0.02
_UNSET = Status(StatusCode.UNSET)
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
# Production replies whose decoded outputs wait for their shadows (one entry per call).
_DECODED_REPLIES = 4096
_DECODED_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Decoded:
    """Production's decoded outputs, waiting for the call's copies to be compared."""

    reply: bytes | None
    outputs: Outputs
    copies: int
    """Copies still to come."""
    size: int
    """Bytes the entry keeps alive: the reply and its decoded arrays."""


def status_code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def _rpc_names(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _stream_attributes(counts: StreamCounts) -> dict[str, Any]:
    return {
        "shadow.stream": True,
        "shadow.stream.requests": counts.requests,
        "shadow.stream.replies": counts.replies,
    }


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
        # Production's decoded outputs by trace id, for its shadows' comparisons (bounded).
        self._decoded: dict[tuple[int, int], _Decoded] = {}
        self._decoded_bytes = 0
        provider = telemetry.provider
        # Spans are built directly as finished ReadableSpans and handed to the provider's
        # processors: the SDK's live-span machinery (locks, limits, per-span context
        # objects) was a tenth of the proxy's CPU for spans that are finished on arrival.
        self._tracing = provider is not None
        self._processors = list(telemetry.processors)
        self._resource = provider.resource if provider is not None else None
        self._scope = InstrumentationScope("shadow-proxy", __version__)
        self._sampler = provider.sampler if provider is not None else None
        self._default_sampling = (
            self._sampler is not None
            and self._sampler.get_description() == sampling.DEFAULT_ON.get_description()
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
        return self._tracing or self._metrics.enabled

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
        if not self._tracing:
            if record.production is not None:
                self._record_backend(record.production, len(record.shadows_sent))
            return
        parent = None
        trace_state = (
            TraceState.from_header([trace_ctx.tracestate]) if trace_ctx.tracestate else None
        )
        if trace_ctx.remote_parent_span_id is not None:
            parent = SpanContext(
                trace_ctx.trace_id,
                trace_ctx.remote_parent_span_id,
                is_remote=True,
                trace_flags=TraceFlags(trace_ctx.trace_flags),
                trace_state=trace_state,
            )
        service, method = _rpc_names(record.method)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": status_code_number(record.code),
            "shadow.role": "proxy",
            "shadow.request_id": record.request_id,
            "shadow.production": record.production.name if record.production else "",
            "shadow.sampled": record.shadows_sent,
            "shadow.dropped": record.shadows_dropped,
            "shadow.sampled_out": record.shadows_sampled_out,
        }
        if record.stream is None:
            attributes["shadow.request.size"] = len(record.request)
        else:
            attributes.update(_stream_attributes(record.stream))
        if self.listen_port:
            attributes["server.port"] = self.listen_port
        peer = _peer_address(record.peer)
        if peer:
            attributes["client.address"], attributes["client.port"] = peer
        attributes.update(
            metadata_attributes("rpc.grpc.request.metadata", record.metadata, self._redact_metadata)
        )
        events = []
        if self._record_payloads and record.stream is None:
            events.append(
                Event(
                    "request",
                    self._codec.event_attributes(record.method, record.request, reply=False),
                    timestamp=record.start_ns,
                )
            )
        status = (
            Status(StatusCode.ERROR, f"{record.code.name}: {record.details}")
            if record.code in _SERVER_ERROR_CODES
            else _UNSET
        )
        self._emit(
            f"{service}/{method}", SpanKind.SERVER, trace_ctx.trace_id, trace_ctx.proxy_span_id,
            trace_ctx.trace_flags, trace_state, parent, attributes, events, status,
            record.start_ns, record.end_ns,
        )  # fmt: skip
        if record.production is not None:
            self._record_backend(record.production, len(record.shadows_sent))

    def _remember(self, request_id: str, trace_ctx: TraceContext) -> None:
        recent = self._recent
        recent[request_id] = (trace_ctx.trace_id, trace_ctx.proxy_span_id)
        recent.move_to_end(request_id)
        if len(recent) > _RECENT_CALLS:
            recent.popitem(last=False)

    def _remember_outputs(self, outcome: BackendOutcome, outputs: Outputs, copies: int) -> None:
        # Production's outcome is always queued before its shadows' (the request path sets
        # production's answer and submits its record in one step, and a shadow's record
        # waits for that answer), so each of the call's copies finds the decoded outputs
        # here; the last one to arrive removes them. A copy whose outcome never arrives
        # (dropped from a full queue) leaves its entry behind: the bounds below evict it.
        size = len(outcome.reply or b"") + sum(a.nbytes for a in outputs.arrays.values())
        key = (outcome.trace.trace_id, outcome.trace.proxy_span_id)
        decoded = self._decoded
        previous = decoded.pop(key, None)
        if previous is not None:
            self._decoded_bytes -= previous.size
        decoded[key] = _Decoded(outcome.reply, outputs, copies, size)
        self._decoded_bytes += size
        while decoded and (len(decoded) > _DECODED_REPLIES or self._decoded_bytes > _DECODED_BYTES):
            self._decoded_bytes -= decoded.pop(next(iter(decoded))).size

    def _production_outputs(self, trace_ctx: TraceContext, reply: bytes | None) -> Outputs | None:
        key = (trace_ctx.trace_id, trace_ctx.proxy_span_id)
        known = self._decoded.get(key)
        # The same bytes object: production's reply to this very call, decoded once.
        if known is None or known.reply is not reply:
            return None
        known.copies -= 1
        if known.copies <= 0:
            del self._decoded[key]
            self._decoded_bytes -= known.size
        return known.outputs

    def _comparison_attributes(self, outcome: BackendOutcome, copies: int = 0) -> dict[str, Any]:
        """Predicted labels, and for shadows the comparison with production's reply."""
        attributes: dict[str, Any] = {}
        outputs = None
        production = outcome.production
        if outcome.reply is not None:
            outputs = decode_outputs(outcome.reply, outcome.method)
            labels = predicted_labels(outputs)
            if labels is not None:
                attributes["shadow.predicted_labels"] = labels
            if copies and outputs is not None:
                self._remember_outputs(outcome, outputs, copies)
        latency_ms = (outcome.end_ns - outcome.start_ns) / 1e6
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
                production_outputs=self._production_outputs(outcome.trace, production.reply),
                other_outputs=outputs,
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
        if not self._tracing:
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
        self._emit(
            "feedback", SpanKind.INTERNAL, random.getrandbits(128) or 1,
            random.getrandbits(64) or 1, 1, None, None, attributes, [], _UNSET,
            record.received_ns, record.received_ns, links,
        )  # fmt: skip

    def _record_backend(self, outcome: BackendOutcome, copies: int = 0) -> None:
        """``copies``: for production, how many shadow copies of the call were sent."""
        comparison_attributes = self._comparison_attributes(outcome, copies)
        if not self._tracing:
            return
        trace_ctx: TraceContext = outcome.trace
        parent = SpanContext(
            trace_ctx.trace_id,
            trace_ctx.proxy_span_id,
            is_remote=False,
            trace_flags=TraceFlags(trace_ctx.trace_flags),
        )
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
            "shadow.status_from_backend": outcome.from_backend,
        }
        if outcome.stream is None:
            attributes["shadow.request.size"] = outcome.request_size
        else:
            attributes.update(_stream_attributes(outcome.stream))
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
        events = []
        if self._record_payloads and outcome.reply is not None:
            events.append(
                Event(
                    "response",
                    self._codec.event_attributes(outcome.method, outcome.reply, reply=True),
                    timestamp=outcome.end_ns,
                )
            )
        status = (
            _UNSET
            if outcome.code is grpc.StatusCode.OK
            else Status(StatusCode.ERROR, f"{outcome.code.name}: {outcome.details}")
        )
        self._emit(
            f"{outcome.role} {outcome.name}", SpanKind.CLIENT, trace_ctx.trace_id,
            outcome.span_id, trace_ctx.trace_flags, None, parent, attributes, events, status,
            outcome.start_ns, outcome.end_ns,
        )  # fmt: skip

    def _emit(
        self,
        name: str,
        kind: SpanKind,
        trace_id: int,
        span_id: int,
        flags: int,
        trace_state: TraceState | None,
        parent: SpanContext | None,
        attributes: dict[str, Any],
        events: list[Event],
        status: Status,
        start_ns: int,
        end_ns: int,
        links: Sequence[trace.Link] = (),
    ) -> None:
        """Hand one finished span to the exporters, if the sampler keeps it."""
        if self._default_sampling:
            # ParentBased(ALWAYS_ON), the SDK's default: keep roots and sampled parents.
            if parent is not None and not parent.trace_flags.sampled:
                return
        elif self._sampler is not None:
            context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
            decision = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            if not decision.decision.is_sampled():
                return
            if decision.attributes:
                attributes.update(decision.attributes)
            trace_state = decision.trace_state or trace_state
        span = ReadableSpan(
            name=name,
            context=SpanContext(
                trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags | 0x01),
                trace_state=trace_state,
            ),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            events=events,
            links=links,
            kind=kind,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self._scope,
        )  # fmt: skip
        for processor in self._processors:
            processor.on_end(span)
