"""Watch every backend with the standard gRPC health service (Check on an interval)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2

from proxy.registry import Backend, Registry

log = logging.getLogger(__name__)


async def check_backend(backend: Backend, timeout: float) -> tuple[str, str]:
    """(``serving`` | ``not_serving``, why) from one health Check of a backend."""
    check = backend.upstream.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        response = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except aio.AioRpcError as error:
        # A backend without the health service still answers calls: it is reachable.
        if error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return "serving", ""
        return "not_serving", f"health check: {error.code().name}: {error.details()}"
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return "serving", ""
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return "not_serving", f"health check: {status}"


class HealthWatcher:
    """Checks each registered backend every ``interval`` seconds and records the result on
    it; a backend that disappears is marked not serving, never forgotten."""

    def __init__(
        self,
        registry: Registry,
        interval: float,
        on_production: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._registry = registry
        self._interval = interval
        self._on_production = on_production
        self._production_serving: bool | None = None

    async def check_all(self) -> None:
        backends = self._registry.backends()
        timeout = min(1.0, self._interval)
        results = await asyncio.gather(
            *(check_backend(b, timeout) for b in backends), return_exceptions=True
        )
        for backend, result in zip(backends, results, strict=True):
            if isinstance(result, BaseException):
                health, detail = "not_serving", f"health check failed: {result}"
            else:
                health, detail = result
            if health != backend.health:
                level = logging.INFO if health == "serving" else logging.WARNING
                log.log(
                    level,
                    "%s %s (%s) is %s%s",
                    backend.role,
                    backend.name,
                    backend.settings.address,
                    health.replace("_", " "),
                    f" ({detail})" if detail else "",
                )
            backend.health, backend.health_detail = health, detail
        production = self._registry.snapshot.production
        if production.serving != self._production_serving:
            self._production_serving = production.serving
            await self._on_production(production.serving)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health checks failed")
