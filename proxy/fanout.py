"""The router: start production and the sampled shadows together, return production's reply.

This core knows gRPC statuses and metadata but not the server: :mod:`proxy.server` is the
thin edge that turns a :class:`ProductionReply` into what the client receives.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc import aio

from proxy.errors import BackendUnreachable, status_for_unreachable
from proxy.protocols import MethodList, codec_for
from proxy.records import (
    BackendOutcome,
    CallRecord,
    Metadata,
    ProductionView,
    StreamCounts,
    TraceContext,
)
from proxy.registry import Backend, Registry
from proxy.settings import BackendSettings
from proxy.shadow import NO_SHADOWS, ShadowDecision, ShadowWriter
from proxy.upstream import came_from_backend

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Connection-level (hop-by-hop) headers and gRPC's reserved ones are the transport's, not
# the caller's; the trace headers are replaced by the proxy's own span context per call.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-type",
        "content-length",
        "user-agent",
        "accept-encoding",
        "traceparent",
    }
)


@dataclass(slots=True)
class ProductionReply:
    """What the client gets: production's reply exactly, plus the request id trailer."""

    code: grpc.StatusCode
    details: str
    body: bytes | None
    initial_metadata: Metadata
    trailing_metadata: Metadata


@dataclass(slots=True)
class ProductionStats:
    calls: int = 0
    errors: int = 0
    unreachable: int = 0
    cancelled: int = 0

    def summary(self) -> str:
        return (
            f"calls={self.calls} errors={self.errors} unreachable={self.unreachable} "
            f"cancelled={self.cancelled}"
        )


_LONGEST_REQUEST_ID = 256
_HEADER_SAFE = re.compile(r"[\x20-\x7e]*")
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """W3C ``traceparent`` → (trace id, parent span id, flags), or None when malformed."""
    match = _TRACEPARENT_RE.match(value.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields (later versions may add).
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


class FanOut:
    """Forwards one call: production awaited in the caller's task, shadows fired alongside."""

    def __init__(
        self,
        registry: Registry,
        shadows: ShadowWriter,
        record: Callable[[CallRecord], None],
        never_shadowed: Iterable[str] = (),
    ) -> None:
        self.registry = registry
        self._never_shadowed = MethodList(never_shadowed)
        self.shadows = shadows
        self._record = record
        self.stats = ProductionStats()

    async def forward(
        self,
        method: str,
        request: bytes,
        metadata: Iterable[tuple[str, str | bytes]],
        time_remaining: float | None,
        peer: str,
    ) -> ProductionReply:
        """Send ``request`` to production and the sampled shadows; return production's reply.

        A client cancel cancels the production call (it is awaited in this task); shadow
        calls belong to the shadow writer and are not cancelled with the client.
        """
        start_ns = time.time_ns()
        received = tuple(metadata)
        forwarded, request_id, incoming_trace, tracestate = split_metadata(received)
        if not request_id:
            request_id = _request_id_from_body(method, request) or new_request_id()
            forwarded.append((REQUEST_ID_KEY, request_id))
        trace = trace_context(incoming_trace, tracestate)
        if tracestate is not None and trace.remote_parent_span_id is None:
            # W3C: a tracestate without a valid traceparent belongs to no trace; drop it.
            forwarded = [(k, v) for k, v in forwarded if k != "tracestate"]
        # One snapshot per call: a promotion mid-call cannot give it two productions.
        snapshot = self.registry.snapshot
        production = snapshot.production
        backend = production.settings
        if not production.serving:
            return self._fail_fast(
                method, request_id, trace, start_ns, request, received, peer, production
            )
        span_id = random.getrandbits(64) or 1
        production_md = (*forwarded, ("traceparent", trace.traceparent(span_id)))
        timeout = time_remaining
        if backend.timeout is not None and (timeout is None or backend.timeout < timeout):
            timeout = backend.timeout

        # Production's call object starts its RPC as soon as it exists; the shadows start in
        # the same loop iteration, so neither waits for the other.
        call = production.upstream.method(method)(request, timeout=timeout, metadata=production_md)
        prod_start_ns = time.time_ns()
        decision: ShadowDecision = NO_SHADOWS
        if snapshot.copies and not self._never_shadowed.matches(method):
            try:
                decision = self.shadows.send(
                    snapshot.copies, method, request, tuple(forwarded), request_id, trace
                )
            except Exception:  # shadowing must never cost a production call
                log.exception("could not start shadow calls")
        # The copies learn production's answer through this future, to compare with it.
        answer = decision.production
        self.stats.calls += 1
        production.stats.sent += 1
        production.in_flight += 1
        initial: Metadata = ()
        from_backend = True
        try:
            body: bytes | None = await call
            code, details = grpc.StatusCode.OK, ""
            initial = tuple(await call.initial_metadata() or ())
            trailing: Metadata = tuple(await call.trailing_metadata() or ())
        except aio.AioRpcError as error:
            body = None
            code, details = error.code(), error.details() or ""
            initial = tuple(error.initial_metadata() or ())
            trailing = tuple(error.trailing_metadata() or ())
            from_backend = came_from_backend(error)
        except Exception as exc:  # a bug of ours must cost one call, not leave shadows waiting
            log.exception("forwarding %s to production failed", method)
            body, trailing = None, ()
            code, details, from_backend = grpc.StatusCode.INTERNAL, f"proxy error: {exc}", False
        except asyncio.CancelledError:
            production.in_flight -= 1
            self.stats.cancelled += 1
            production.stats.count(grpc.StatusCode.CANCELLED, cancelled_by_proxy=True)
            if answer is not None:
                answer.set_result(
                    ProductionView(grpc.StatusCode.CANCELLED, None, time.time_ns() - prod_start_ns)
                )
            self._submit(
                method, request_id, trace, start_ns, request, received, peer, decision,
                grpc.StatusCode.CANCELLED, "cancelled by the client",
                production_outcome(backend, method, request_id, trace, span_id, prod_start_ns, len(request),
                              grpc.StatusCode.CANCELLED, "cancelled by the client", None, (), False),
            )  # fmt: skip
            raise
        end_ns = time.time_ns()
        production.in_flight -= 1
        production.stats.count(code)
        if answer is not None:
            answer.set_result(ProductionView(code, body, end_ns - prod_start_ns))
        outcome = production_outcome(
            backend, method, request_id, trace, span_id, prod_start_ns, len(request),
            code, details, body, trailing, from_backend, end_ns,
        )  # fmt: skip
        client_code, client_details = code, details
        if code is not grpc.StatusCode.OK:
            self.stats.errors += 1
            if not from_backend:
                # The backend never answered: tell the client which backend, in one line.
                self.stats.unreachable += 1
                unreachable = BackendUnreachable(
                    "production", backend.name, backend.address, code, details
                )
                client_code = status_for_unreachable(code)
                client_details = unreachable.client_details()
        if not any(key == REQUEST_ID_KEY for key, _ in trailing):
            trailing = (*trailing, (REQUEST_ID_KEY, request_id))
        self._submit(
            method, request_id, trace, start_ns, request, received, peer, decision,
            client_code, client_details, outcome,
        )  # fmt: skip
        return ProductionReply(client_code, client_details, body, initial, trailing)

    def _fail_fast(
        self,
        method: str,
        request_id: str,
        trace: TraceContext,
        start_ns: int,
        request: bytes,
        received: Metadata,
        peer: str,
        production: Backend,
    ) -> ProductionReply:
        """Production's health check says it is not serving: answer at once, naming it."""
        self.stats.calls += 1
        self.stats.errors += 1
        self.stats.unreachable += 1
        details = not_serving_details(production)
        self._submit(
            method, request_id, trace, start_ns, request, received, peer, NO_SHADOWS,
            grpc.StatusCode.UNAVAILABLE, details, None,
        )  # fmt: skip
        return ProductionReply(
            grpc.StatusCode.UNAVAILABLE, details, None, (), ((REQUEST_ID_KEY, request_id),)
        )

    def _submit(
        self,
        method: str,
        request_id: str,
        trace: TraceContext,
        start_ns: int,
        request: bytes,
        metadata: Metadata,
        peer: str,
        decision: ShadowDecision,
        code: grpc.StatusCode,
        details: str,
        production: BackendOutcome | None,
    ) -> None:
        self._record(
            CallRecord(
                method=method,
                request_id=request_id,
                trace=trace,
                start_ns=start_ns,
                end_ns=time.time_ns(),
                request=request,
                metadata=metadata,
                peer=peer,
                code=code,
                details=details,
                production=production,
                shadows_sent=decision.sent,
                shadows_dropped=decision.dropped,
                shadows_sampled_out=decision.sampled_out,
            )
        )


def not_serving_details(production: Backend) -> str:
    """What a client is told when production's health check says it is not serving."""
    backend = production.settings
    return f"production backend '{backend.name}' ({backend.address}) is not serving" + (
        f": {production.health_detail}" if production.health_detail else ""
    )


def split_metadata(
    received: Metadata,
) -> tuple[list[tuple[str, str | bytes]], str, str | None, str | None]:
    """One pass over the client's metadata: what to forward, the request id, trace headers."""
    forwarded: list[tuple[str, str | bytes]] = []
    request_id = ""
    traceparent: str | None = None
    tracestate: str | None = None
    for key, value in received:
        if key in _NOT_FORWARDED or key.startswith("grpc-") or key.startswith(":"):
            if key == "traceparent" and isinstance(value, str):
                traceparent = value
            continue
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value
        elif key == "tracestate" and isinstance(value, str):
            tracestate = value
        forwarded.append((key, value))
    return forwarded, request_id, traceparent, tracestate


def _request_id_from_body(method: str, request: bytes) -> str:
    # Reading a known request's id field is the only decoding on the production path, and
    # only when the client sent no x-request-id.
    codec = codec_for(method)
    request_id = codec.request_id(request) if codec is not None else ""
    # The id travels on as x-request-id metadata, which must be printable ASCII and small:
    # an id that cannot be a header (say "order-ü", or 20k characters) would fail the call
    # in the proxy's own channel. Such a request gets an id of the proxy's making instead.
    if len(request_id) > _LONGEST_REQUEST_ID or not _HEADER_SAFE.fullmatch(request_id):
        return ""
    return request_id


def production_outcome(
    backend: BackendSettings,
    method: str,
    request_id: str,
    trace: TraceContext,
    span_id: int,
    start_ns: int,
    request_size: int,
    code: grpc.StatusCode,
    details: str,
    body: bytes | None,
    trailing: Metadata,
    from_backend: bool,
    end_ns: int | None = None,
    stream: StreamCounts | None = None,
) -> BackendOutcome:
    """Production's side of a call (or of a relayed stream, with its message counts)."""
    return BackendOutcome(
        role="production",
        name=backend.name,
        address=backend.address,
        method=method,
        request_id=request_id,
        trace=trace,
        span_id=span_id,
        start_ns=start_ns,
        end_ns=end_ns or time.time_ns(),
        code=code,
        details=details,
        reply=body,
        trailing_metadata=trailing,
        request_size=request_size,
        from_backend=from_backend,
        stream=stream,
    )


def new_request_id() -> str:
    # 16 hex digits from the random module: an id, not a secret (it is sent in the clear to
    # every backend). secrets.token_hex read the OS's random source for every call and cost
    # about 18 µs on the request path.
    return f"{random.getrandbits(64):016x}"


def trace_context(traceparent: str | None, tracestate: str | None) -> TraceContext:
    """The call's trace ids: the client's trace continued when it sent a valid
    ``traceparent``, else a new trace; the proxy's own span id either way."""
    parsed = parse_traceparent(traceparent) if traceparent else None
    proxy_span_id = random.getrandbits(64) or 1
    if parsed is None:
        return TraceContext(random.getrandbits(128) or 1, proxy_span_id, 0x01, None, None)
    trace_id, parent_span_id, flags = parsed
    return TraceContext(trace_id, proxy_span_id, flags & 0xFF, parent_span_id, tracestate)
