"""Relay streaming calls to production only, message by message, as bytes.

A streaming call is never shadowed and never compared: the proxy's comparison is of one
reply with another, and a stream has no one reply to compare. When to cut a stream into
comparable pieces (per request? per sequence? per generated token?) is the model's
business, not the transport's, and a stream copied to a shadow would hold the shadow's
resources for as long as the client's stream lasts.

Streams are counted (:class:`StreamStats`, the production backend's call counters), logged
at DEBUG level and traced like unary calls: a proxy span and a production span, with how
many messages went each way (``shadow.stream.requests``, ``shadow.stream.replies``) instead
of payloads. Production gets its span's ``traceparent``, as for unary calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc import aio

from proxy.errors import BackendUnreachable, status_for_unreachable
from proxy.fanout import (
    REQUEST_ID_KEY,
    new_request_id,
    not_serving_details,
    production_outcome,
    split_metadata,
    trace_context,
)
from proxy.protocols import MethodList
from proxy.records import BackendOutcome, CallRecord, Metadata, StreamCounts, TraceContext
from proxy.registry import Backend, Registry
from proxy.upstream import came_from_backend

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StreamStats:
    """Counters of the relayed streams, logged at shutdown."""

    streams: int = 0
    errors: int = 0
    """Streams that ended with a status other than OK (unreachable and cancelled included)."""
    unreachable: int = 0
    cancelled: int = 0
    """Streams the client cancelled or whose deadline passed (or cut at shutdown)."""
    requests: int = 0
    """Messages relayed from clients to production."""
    replies: int = 0
    """Messages relayed from production to clients."""

    def summary(self) -> str:
        return (
            f"streams={self.streams} errors={self.errors} unreachable={self.unreachable} "
            f"cancelled={self.cancelled} requests={self.requests} replies={self.replies}"
        )


@dataclass(slots=True)
class _Counts:
    requests: int = 0
    replies: int = 0


class StreamRelay:
    """Relays the calls of the configured streaming methods to production.

    Each side's messages are relayed one at a time, as they come: a message is read from
    one side only after the previous one was handed to the other side's transport, so
    memory stays bounded by gRPC's flow control, however long the stream.
    """

    def __init__(
        self,
        registry: Registry,
        methods: Iterable[str],
        record: Callable[[CallRecord], None] = lambda _: None,
    ) -> None:
        self.registry = registry
        self._record = record
        self._methods = MethodList(methods)
        self.stats = StreamStats()

    def relays(self, method: str) -> bool:
        """Whether calls of ``method`` are relayed as streams (else they are unary)."""
        return self._methods.matches(method)

    async def relay(
        self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> None:
        """The gRPC edge of one stream: production's messages, initial metadata, status,
        details and trailing metadata, exactly, to the client (plus ``x-request-id``).

        The client's deadline bounds the call to production (production's own ``timeout``
        is for unary calls and does not cut streams); a client cancel cancels it.
        """
        start = time.monotonic()
        start_ns = time.time_ns()
        received = tuple(context.invocation_metadata() or ())
        forwarded, request_id, traceparent, tracestate = split_metadata(received)
        if not request_id:
            request_id = new_request_id()
            forwarded.append((REQUEST_ID_KEY, request_id))
        trace = trace_context(traceparent, tracestate)
        if tracestate is not None and trace.remote_parent_span_id is None:
            # W3C: a tracestate without a valid traceparent belongs to no trace; drop it.
            forwarded = [(k, v) for k, v in forwarded if k != "tracestate"]
        span_id = random.getrandbits(64) or 1
        forwarded.append(("traceparent", trace.traceparent(span_id)))
        peer = context.peer()
        request_id_trailer = ((REQUEST_ID_KEY, request_id),)
        # One snapshot per stream: a promotion mid-stream does not move it.
        production = self.registry.snapshot.production
        backend = production.settings
        self.stats.streams += 1
        if not production.serving:
            self.stats.errors += 1
            self.stats.unreachable += 1
            details = not_serving_details(production)
            self._submit(
                method, request_id, trace, start_ns, received, peer, grpc.StatusCode.UNAVAILABLE,
                details, None, StreamCounts(0, 0),
            )  # fmt: skip
            await context.abort(grpc.StatusCode.UNAVAILABLE, details, request_id_trailer)

        call: aio.StreamStreamCall = production.upstream.channel.stream_stream(method)(
            metadata=tuple(forwarded), timeout=context.time_remaining()
        )
        production.stats.sent += 1
        production.in_flight += 1
        prod_start_ns = time.time_ns()
        counts = _Counts()
        pump = asyncio.create_task(_pump(requests, call, counts))
        from_backend = True
        try:
            initial: Metadata = tuple(await call.initial_metadata() or ())
            if initial:
                await context.send_initial_metadata(initial)
            while (reply := await call.read()) is not aio.EOF:
                counts.replies += 1
                await context.write(reply)
            code, details = grpc.StatusCode.OK, ""
            trailing: Metadata = tuple(await call.trailing_metadata() or ())
        except aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            trailing = tuple(error.trailing_metadata() or ())
            from_backend = came_from_backend(error)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The client cancelled, its deadline passed, or the shutdown grace ran out.
                call.cancel()
                self._finish(
                    method, request_id, start, counts, grpc.StatusCode.CANCELLED, production,
                    client_cancelled=True,
                )  # fmt: skip
                streamed = StreamCounts(counts.requests, counts.replies)
                outcome = production_outcome(
                    backend, method, request_id, trace, span_id, prod_start_ns, 0,
                    grpc.StatusCode.CANCELLED, "cancelled by the client", None, (), False,
                    stream=streamed,
                )  # fmt: skip
                self._submit(
                    method, request_id, trace, start_ns, received, peer,
                    grpc.StatusCode.CANCELLED, "cancelled by the client", outcome, streamed,
                )  # fmt: skip
                raise
            # The call was cancelled under us: the proxy closed production's channel (the
            # backend was removed and its grace ran out).
            code, details, trailing = grpc.StatusCode.UNAVAILABLE, "channel closed", ()
            from_backend = False
        except Exception as exc:  # a bug of ours must cost one stream, not the proxy
            log.exception("relaying the stream %s to production failed", method)
            call.cancel()
            code, details, trailing = grpc.StatusCode.INTERNAL, f"proxy error: {exc}", ()
            from_backend = False
        finally:
            pump.cancel()
        self._finish(method, request_id, start, counts, code, production)
        streamed = StreamCounts(counts.requests, counts.replies)
        outcome = production_outcome(
            backend, method, request_id, trace, span_id, prod_start_ns, 0, code, details,
            None, trailing, from_backend, stream=streamed,
        )  # fmt: skip
        if not any(key == REQUEST_ID_KEY for key, _ in trailing):
            trailing = (*trailing, *request_id_trailer)
        if code is grpc.StatusCode.OK:
            self._submit(method, request_id, trace, start_ns, received, peer, code, details,
                         outcome, streamed)  # fmt: skip
            context.set_trailing_metadata(trailing)
            return
        if not from_backend:
            # The backend never answered: tell the client which backend, in one line.
            self.stats.unreachable += 1
            unreachable = BackendUnreachable(
                "production", backend.name, backend.address, code, details
            )
            code, details = status_for_unreachable(code), unreachable.client_details()
        self._submit(method, request_id, trace, start_ns, received, peer, code, details,
                     outcome, streamed)  # fmt: skip
        await context.abort(code, details, trailing)

    def _submit(
        self,
        method: str,
        request_id: str,
        trace: TraceContext,
        start_ns: int,
        received: Metadata,
        peer: str,
        code: grpc.StatusCode,
        details: str,
        production: BackendOutcome | None,
        counts: StreamCounts,
    ) -> None:
        """Hand the stream to the recorder (which never raises into the request path)."""
        self._record(
            CallRecord(
                method=method,
                request_id=request_id,
                trace=trace,
                start_ns=start_ns,
                end_ns=time.time_ns(),
                request=b"",
                metadata=received,
                peer=peer,
                code=code,
                details=details,
                production=production,
                stream=counts,
            )
        )

    def _finish(
        self,
        method: str,
        request_id: str,
        start: float,
        counts: _Counts,
        code: grpc.StatusCode,
        production: Backend,
        *,
        client_cancelled: bool = False,
    ) -> None:
        production.in_flight -= 1
        production.stats.count(code, cancelled_by_proxy=client_cancelled)
        stats = self.stats
        stats.requests += counts.requests
        stats.replies += counts.replies
        if code is not grpc.StatusCode.OK:
            stats.errors += 1
        if client_cancelled:
            stats.cancelled += 1
        log.debug(
            "stream %s (request id %s) to production %s: %d requests, %d replies, %s, %.3fs",
            method, request_id, production.name, counts.requests, counts.replies, code.name,
            time.monotonic() - start,
        )  # fmt: skip


async def _pump(
    requests: AsyncIterator[bytes], call: aio.StreamStreamCall, counts: _Counts
) -> None:
    """Client to production: each message as it comes, then the client's half-close."""
    try:
        async for message in requests:
            await call.write(message)
            counts.requests += 1
        await call.done_writing()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # Production ended the call (its status is what the client gets), or the client's
        # side failed (its own status says so); either way this direction is over.
        log.debug("stream to production: stopped relaying requests: %r", exc)
