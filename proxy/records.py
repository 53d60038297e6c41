"""Plain records of what happened on a call, handed from the request path to the recorder."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(slots=True, frozen=True)
class TraceContext:
    """The ids of one call's trace, fixed on the request path so backends can be told them."""

    trace_id: int
    proxy_span_id: int
    trace_flags: int
    remote_parent_span_id: int | None
    """The client's span, when it sent a W3C ``traceparent``."""
    tracestate: str | None = None

    def traceparent(self, span_id: int) -> str:
        """The W3C ``traceparent`` header value for a child span with this id."""
        return f"00-{self.trace_id:032x}-{span_id:016x}-{self.trace_flags:02x}"


@dataclass(slots=True, frozen=True)
class StreamCounts:
    """How many messages a relayed stream carried each way (streams have no one payload)."""

    requests: int
    replies: int


@dataclass(slots=True)
class BackendOutcome:
    """One call to one backend, production or shadow, as the proxy saw it."""

    role: str
    """``production`` or ``shadow``."""
    name: str
    address: str
    method: str
    request_id: str
    trace: TraceContext
    span_id: int
    start_ns: int
    end_ns: int
    code: grpc.StatusCode
    details: str
    reply: bytes | None
    """The reply's exact bytes; None when the call failed."""
    trailing_metadata: Metadata
    request_size: int
    from_backend: bool = True
    """False when the status was made by the proxy's own channel (refused, timed out,
    cancelled) rather than sent by the backend."""
    production: ProductionView | None = None
    """For shadows and references: production's answer to the same request, to compare."""
    stream: StreamCounts | None = None
    """Set for a relayed stream (then ``reply`` is None and nothing is compared)."""


@dataclass(slots=True, frozen=True)
class ProductionView:
    """What a shadow's outcome is compared with: production's status, reply and latency."""

    code: grpc.StatusCode
    reply: bytes | None
    latency_ns: int


@dataclass(slots=True)
class CallRecord:
    """One client call through the proxy, with the production outcome it returned."""

    method: str
    request_id: str
    trace: TraceContext
    start_ns: int
    end_ns: int
    request: bytes
    metadata: Metadata
    peer: str
    code: grpc.StatusCode
    """The status the client got."""
    details: str
    production: BackendOutcome | None
    """None when production was never called (the call failed before)."""
    shadows_sent: tuple[str, ...] = ()
    shadows_dropped: tuple[str, ...] = ()
    shadows_sampled_out: tuple[str, ...] = ()
    stream: StreamCounts | None = None
    """Set for a relayed stream (then ``request`` is empty and no payload is recorded)."""


@dataclass(slots=True, frozen=True)
class FeedbackRecord:
    """True labels for an earlier call, as a client sent them to the Feedback service."""

    request_id: str
    labels: tuple[str, ...]
    output: str
    received_ns: int
