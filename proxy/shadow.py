"""Fire-and-forget shadow calls: bounded per shadow, own timeout, drop-and-count, drain on close."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

from proxy.records import BackendOutcome, Metadata, ProductionView, TraceContext
from proxy.registry import Backend, BackendStats, Registry
from proxy.sampling import should_shadow
from proxy.upstream import came_from_backend

log = logging.getLogger(__name__)

SHADOW_MARKER = ("x-shadow", "true")


@dataclass(slots=True, frozen=True)
class ShadowDecision:
    """Which shadows got a copy of one request, for the proxy span."""

    sent: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    sampled_out: tuple[str, ...] = ()
    unhealthy: tuple[str, ...] = ()
    production: asyncio.Future[ProductionView] | None = None
    """Where the caller puts production's answer for the copies to compare with; made only
    when a copy was sent."""


NO_SHADOWS = ShadowDecision()


class ShadowWriter:
    """Owns every shadow call: starts them, bounds them, hands each outcome to the recorder.

    A shadow call never affects the caller: it runs in a task of its own with its own
    deadline, so it outlives the client call, and nothing it does can raise into the request.
    """

    def __init__(self, registry: Registry, record: Callable[[BackendOutcome], None]) -> None:
        self._registry = registry
        self._record = record
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def stats(self) -> dict[str, BackendStats]:
        """Counters of every backend now registered, production's included."""
        return {backend.name: backend.stats for backend in self._registry.backends()}

    def in_flight(self) -> dict[str, int]:
        return {backend.name: backend.in_flight for backend in self._registry.snapshot.copies}

    def send(
        self,
        copies: Sequence[Backend],
        method: str,
        request: bytes,
        metadata: Metadata,
        request_id: str,
        trace: TraceContext,
    ) -> ShadowDecision:
        """Start a copy of the request to every shadow that samples it, is healthy and has
        room; ``copies`` are the shadows and references of the call's registry snapshot."""
        sent: list[str] = []
        dropped: list[str] = []
        sampled_out: list[str] = []
        unhealthy: list[str] = []
        production: asyncio.Future[ProductionView] | None = None
        for shadow in copies:
            backend = shadow.settings
            if not should_shadow(request_id, backend.sample_rate):
                shadow.stats.sampled_out += 1
                sampled_out.append(backend.name)
                continue
            if not shadow.serving:
                shadow.stats.unhealthy_skipped += 1
                unhealthy.append(backend.name)
                continue
            if shadow.in_flight >= backend.max_in_flight or self._closing:
                # Shed shadow load, never production load: the copy is dropped, not queued.
                shadow.stats.dropped += 1
                dropped.append(backend.name)
                continue
            shadow.in_flight += 1
            shadow.stats.sent += 1
            sent.append(backend.name)
            if production is None:
                production = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(
                self._call(shadow, method, request, metadata, request_id, trace, production)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return ShadowDecision(
            tuple(sent), tuple(dropped), tuple(sampled_out), tuple(unhealthy), production
        )

    async def _call(
        self,
        shadow: Backend,
        method: str,
        request: bytes,
        metadata: Metadata,
        request_id: str,
        trace: TraceContext,
        production: asyncio.Future[ProductionView] | None,
    ) -> None:
        span_id = random.getrandbits(64) or 1
        outgoing = (*metadata, ("traceparent", trace.traceparent(span_id)), SHADOW_MARKER)
        start_ns = time.time_ns()
        reply: bytes | None = None
        trailing: Metadata = ()
        from_backend = True
        try:
            call = shadow.upstream.method(method)(
                request, timeout=shadow.settings.timeout, metadata=outgoing
            )
            reply = await call
            code, details = grpc.StatusCode.OK, ""
            trailing = tuple(await call.trailing_metadata() or ())
        except aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            trailing = tuple(error.trailing_metadata() or ())
            from_backend = came_from_backend(error)
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "shadow call cancelled: proxy shutting down"
            from_backend = False
        except Exception as exc:  # a shadow must never take the proxy down
            log.exception("shadow %s: unexpected error", shadow.name)
            code, details = grpc.StatusCode.INTERNAL, f"proxy error: {exc}"
            from_backend = False
        finally:
            shadow.in_flight -= 1
        end_ns = time.time_ns()
        shadow.stats.count(code, cancelled_by_proxy=not from_backend)
        view: ProductionView | None = None
        if production is not None:
            if production.done() and not production.cancelled():
                view = production.result()  # the usual case: production answered first
            else:
                try:
                    # A shadow faster than production waits here, after its own call, so
                    # the comparison has both replies.
                    view = await asyncio.shield(production)
                except asyncio.CancelledError:
                    view = None
        self._record(
            BackendOutcome(
                role=shadow.role,
                name=shadow.name,
                address=shadow.settings.address,
                method=method,
                request_id=request_id,
                trace=trace,
                span_id=span_id,
                start_ns=start_ns,
                end_ns=end_ns,
                code=code,
                details=details,
                reply=reply,
                trailing_metadata=trailing,
                request_size=len(request),
                from_backend=from_backend,
                production=view,
            )
        )

    async def drain(self, grace: float) -> None:
        """Stop sending; give in-flight shadow calls ``grace`` seconds, then cancel the rest.

        Cancelled calls are still recorded (status CANCELLED), so the record has every call.
        """
        self._closing = True
        pending = set(self._tasks)
        if not pending:
            return
        log.info("waiting up to %.1fs for %d in-flight shadow calls", grace, len(pending))
        _, still_pending = await asyncio.wait(pending, timeout=grace)
        if still_pending:
            log.warning(
                "cancelling %d shadow calls still in flight after %.1fs", len(still_pending), grace
            )
            for task in still_pending:
                task.cancel()
            await asyncio.gather(*still_pending, return_exceptions=True)
