"""Wire the pieces: grpc.aio server, forwarding edge, health, reflection, ordered shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from proxy import metrics
from proxy.errors import ConfigError
from proxy.fanout import FanOut
from proxy.feedback import FEEDBACK_SERVICE, FeedbackServicer
from proxy.gen import feedback_pb2_grpc, predict_pb2
from proxy.metrics import ProxyMetrics, build_metrics
from proxy.recording import Recorder
from proxy.settings import Settings
from proxy.shadow import ShadowWriter
from proxy.telemetry import Telemetry, build_telemetry
from proxy.upstream import Upstream, channel_options

log = logging.getLogger(__name__)

PREDICT_SERVICE = predict_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
# Services the proxy answers itself; every other method is forwarded.
_OWN_SERVICES = (
    f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/",
    f"/{reflection.SERVICE_NAME}/",
    "/grpc.reflection.v1.ServerReflection/",
    f"/{FEEDBACK_SERVICE}/",
)
_MAX_CACHED_HANDLERS = 1024


class _ForwardingHandler(grpc.GenericRpcHandler):
    """Answers every unary method the proxy does not own by forwarding its bytes."""

    def __init__(self, proxy: ProxyServer) -> None:
        self._proxy = proxy
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is None:
            if method.startswith(_OWN_SERVICES):
                return None
            # No (de)serializers: the request and the reply stay bytes end to end.
            handler = grpc.unary_unary_rpc_method_handler(
                functools.partial(self._proxy.forward, method)
            )
            if len(self._handlers) < _MAX_CACHED_HANDLERS:
                self._handlers[method] = handler
        return handler


class ProxyServer:
    """The proxy as one object: ``await start()``, serve, ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        telemetry: Telemetry | None = None,
        span_exporters: Sequence[SpanExporter] | None = None,
        metric_readers: Sequence[MetricReader] | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or build_telemetry(settings, span_exporters)
        self.metrics: ProxyMetrics = build_metrics(settings, metric_readers)
        self.port = 0
        self._server: aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._production_serving: bool | None = None
        self._stopped = False
        self.recorder = Recorder(settings, self.telemetry, metrics=self.metrics)
        self.production = Upstream(
            settings.production, max_message_bytes=settings.max_message_bytes
        )
        self.shadow_upstreams = [
            Upstream(backend, max_message_bytes=settings.max_message_bytes)
            for backend in settings.copies
        ]
        self.shadows = ShadowWriter(self.shadow_upstreams, self.recorder.submit)
        self.fanout = FanOut(self.production, self.shadows, self.recorder.submit)
        self.feedback = FeedbackServicer(self.recorder.submit)
        self._observe_metrics()

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def forward(
        self, method: str, request: bytes, context: aio.ServicerContext
    ) -> bytes | None:
        """The gRPC edge: production's reply, status and metadata, exactly, to the client."""
        reply = await self.fanout.forward(
            method,
            request,
            context.invocation_metadata() or (),
            context.time_remaining(),
            context.peer(),
        )
        if reply.initial_metadata:
            await context.send_initial_metadata(reply.initial_metadata)
        if reply.code is grpc.StatusCode.OK:
            context.set_trailing_metadata(reply.trailing_metadata)
            return reply.body
        await context.abort(reply.code, reply.details, reply.trailing_metadata)
        return None  # not reached: abort raises

    async def start(self) -> int:
        """Bind, start serving, and check production once; returns the bound port."""
        options = [
            *channel_options(self.settings.max_message_bytes),
            # One process per port unless --workers says otherwise: a second proxy on the
            # same port must fail loudly, not share the traffic silently.
            ("grpc.so_reuseport", 0),
        ]
        server = aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.feedback, server)
        reflection.enable_server_reflection(
            (
                PREDICT_SERVICE,
                FEEDBACK_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        server.add_generic_rpc_handlers((_ForwardingHandler(self),))
        try:
            port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as exc:
            raise ConfigError(f"--listen: cannot listen on {self.settings.listen}: {exc}") from None
        if not port:
            raise ConfigError(
                f"--listen: cannot listen on {self.settings.listen} (address in use?)"
            )
        self.port = port
        self.recorder.listen_port = port
        self.recorder.start()
        await server.start()
        self._server = server
        log.info("shadow-proxy listening on %s", self.address)
        log.info("production: %s", self.settings.production.describe())
        for backend in self.settings.copies:
            log.info(
                "%s: %s (max %d in flight)", backend.role, backend.describe(), backend.max_in_flight
            )
        self._log_exporters()
        if self.metrics.prometheus_port is not None:
            log.info(
                "metrics: Prometheus endpoint on http://%s:%d/metrics",
                self.settings.metrics_host,
                self.metrics.prometheus_port,
            )
        await self._check_production()
        self._health_task = asyncio.create_task(self._watch_production())
        return port

    def _observe_metrics(self) -> None:
        production = self.settings.production
        writer, fanout, recorder, telemetry = (
            self.shadows,
            self.fanout,
            self.recorder,
            self.telemetry,
        )

        def calls() -> list[tuple[int, dict[str, str]]]:
            found = [
                (
                    count,
                    {
                        "shadow.backend": production.name,
                        "shadow.role": "production",
                        "rpc.grpc.status_code": code,
                    },
                )
                for code, count in fanout.stats.by_code.items()
            ]
            for backend in self.settings.copies:
                stats = writer.stats[backend.name]
                found += [
                    (
                        count,
                        {
                            "shadow.backend": backend.name,
                            "shadow.role": backend.role,
                            "rpc.grpc.status_code": code,
                        },
                    )
                    for code, count in stats.by_code.items()
                ]
            return found

        def per_copy(field: str) -> Callable[[], list[tuple[int, dict[str, str]]]]:
            def observe() -> list[tuple[int, dict[str, str]]]:
                return [
                    (
                        getattr(writer.stats[b.name], field),
                        {"shadow.backend": b.name, "shadow.role": b.role},
                    )
                    for b in self.settings.copies
                ]

            return observe

        self.metrics.observe(
            {
                metrics.CALLS: ("Backend calls by status code", calls),
                metrics.SAMPLED_OUT: (
                    "Requests a shadow's sample rate left out",
                    per_copy("sampled_out"),
                ),
                metrics.DROPPED: (
                    "Shadow copies dropped at the in-flight bound",
                    per_copy("dropped"),
                ),
                metrics.TIMED_OUT: ("Shadow calls past their timeout", per_copy("timed_out")),
                metrics.RECORDER_DROPPED: (
                    "Outcomes (spans, payloads) dropped because the recorder queue was full",
                    lambda: [(recorder.dropped, {})],
                ),
                metrics.EXPORTER_FAILED: (
                    "Spans an exporter could not deliver",
                    lambda: [(e.failed, {"exporter": e.name}) for e in telemetry.exporters],
                ),
            }
        )

    def _log_exporters(self) -> None:
        if not self.telemetry.enabled:
            log.info("tracing off (no exporters)")
            return
        for exporter in self.telemetry.exporters:
            if exporter.name == "file":
                log.info(
                    "traces: OTLP JSON lines appended to %s",
                    Path(self.settings.traces_file).resolve(),
                )
            elif exporter.name == "otlp":
                log.info(
                    "traces: OTLP (%s) to the endpoint in OTEL_EXPORTER_OTLP_*",
                    self.settings.otlp_protocol,
                )
            else:
                log.info("traces: %s exporter", exporter.name)

    async def _check_production(self) -> None:
        timeout = min(1.0, self.settings.health_interval)
        check = self.production.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            serving = response.status == health_pb2.HealthCheckResponse.SERVING
            why = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except aio.AioRpcError as error:
            # A backend without the health service still answers: it is reachable.
            serving = error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
            why = f"{error.code().name}: {error.details()}"
        if serving != self._production_serving:
            backend = self.settings.production
            if serving:
                log.info("production %s (%s) is serving", backend.name, backend.address)
            else:
                log.warning(
                    "production %s (%s) is not serving (%s); the proxy reports NOT_SERVING",
                    backend.name,
                    backend.address,
                    why,
                )
            self._production_serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set("", status)
            await self._health.set(PREDICT_SERVICE, status)

    async def _watch_production(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self._check_production()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check of production failed")

    async def stop(self) -> None:
        """Ordered shutdown: stop accepting, finish production calls, drain shadows, flush."""
        if self._stopped:
            return
        self._stopped = True
        settings = self.settings
        log.info("shutting down: finishing in-flight calls (up to %.1fs)", settings.shutdown_grace)
        await self._health.enter_graceful_shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=settings.shutdown_grace)
        await self.shadows.drain(settings.shadow_grace)
        for upstream in (self.production, *self.shadow_upstreams):
            await upstream.close()
        await asyncio.to_thread(self.recorder.close)
        flushed = await asyncio.to_thread(self.telemetry.shutdown)
        await asyncio.to_thread(self.metrics.shutdown)
        log.info("production %s: %s", settings.production.name, self.fanout.stats.summary())
        for backend in settings.copies:
            log.info(
                "%s %s: %s", backend.role, backend.name, self.shadows.stats[backend.name].summary()
            )
        if self.recorder.enabled:
            log.info(
                "recorder: %s; exporters: %s", self.recorder.summary(), self.telemetry.summary()
            )
        log.info("stopped%s", "" if flushed else " (some spans were not flushed)")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run(settings: Settings, ready_file: Path | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order. Returns the exit code."""
    proxy = ProxyServer(settings)
    await proxy.start()
    if ready_file is not None:
        _write_atomically(ready_file, f"{proxy.address}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("%s again: already shutting down", signal.Signals(signum).name)
            return
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await proxy.stop()
    if ready_file is not None:
        # A supervisor must not read a stopped proxy's address.
        await asyncio.to_thread(ready_file.unlink, missing_ok=True)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
