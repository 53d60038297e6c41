"""A real gRPC backend for tests: answers any unary method as told and records what it got."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Received:
    method: str
    body: bytes
    metadata: dict[str, str | bytes]
    at: float


@dataclass
class Behaviour:
    """What the backend does with a call. Defaults: echo the request bytes at once."""

    delay: float = 0.0
    hang: bool = False
    error: tuple[grpc.StatusCode, str] | None = None
    reply: Callable[[bytes], bytes] | None = None
    initial_metadata: Metadata = ()
    trailing_metadata: Metadata = ()


@dataclass
class ProbeBackend:
    """A grpc.aio server on a loopback port 0 that serves every method with one behaviour."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    with_health: bool = True
    received: list[Received] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    port: int = 0
    _server: aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, method: str, body: bytes, context: aio.ServicerContext) -> bytes:
        self.received.append(
            Received(method, body, dict(context.invocation_metadata() or ()), time.monotonic())
        )
        b = self.behaviour
        try:
            if b.hang:
                await asyncio.Event().wait()
            if b.delay:
                await asyncio.sleep(b.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if b.initial_metadata:
            await context.send_initial_metadata(b.initial_metadata)
        if b.error is not None:
            await context.abort(b.error[0], b.error[1], trailing_metadata=b.trailing_metadata)
        if b.trailing_metadata:
            context.set_trailing_metadata(b.trailing_metadata)
        self.completed += 1
        return b.reply(body) if b.reply else body

    async def start(self, port: int = 0) -> ProbeBackend:
        server = aio.server()
        if self.with_health:
            health = health_aio.HealthServicer()
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)

        probe = self

        class _Any(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                method: str = details.method  # type: ignore[attr-defined]

                async def handle(body: bytes, context: aio.ServicerContext) -> bytes:
                    return await probe._handle(method, body, context)

                return grpc.unary_unary_rpc_method_handler(handle)

        server.add_generic_rpc_handlers((_Any(),))
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def timed(call: Awaitable[object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = await call
    return result, time.perf_counter() - start
