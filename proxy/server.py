"""Wire the pieces: grpc.aio server, forwarding edge, health, reflection, ordered shutdown."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from proxy import metrics
from proxy.admin import ADMIN_SERVICE, AdminServicer
from proxy.errors import ConfigError
from proxy.fanout import FanOut
from proxy.feedback import FEEDBACK_SERVICE, FeedbackServicer
from proxy.gen import admin_pb2_grpc, feedback_pb2_grpc, predict_pb2
from proxy.health import HealthWatcher
from proxy.metrics import ProxyMetrics, build_metrics
from proxy.protocols import known_codecs
from proxy.recording import Recorder
from proxy.reflection import enable_reflection
from proxy.registry import Registry, RegistryError, Snapshot, replay
from proxy.settings import BackendSettings, Settings
from proxy.shadow import ShadowWriter
from proxy.state import StateFile
from proxy.streaming import StreamRelay
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
    # Never forwarded: an admin call sent to the wrong port must not carry its token on.
    f"/{ADMIN_SERVICE}/",
)
_MAX_CACHED_HANDLERS = 1024


class _ForwardingHandler(grpc.GenericRpcHandler):
    """Answers every method the proxy does not own by forwarding its bytes: the configured
    streaming methods as streams, every other method as unary."""

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
            streams = self._proxy.streams
            if streams.relays(method):
                handler = grpc.stream_stream_rpc_method_handler(
                    functools.partial(streams.relay, method)
                )
            else:
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
        reload_base: Callable[[], list[BackendSettings]] | None = None,
    ) -> None:
        self.settings = settings
        self._reload_base = reload_base
        self._base = list(settings.backends)
        self._changes: list[dict[str, Any]] = []  # run-time changes when there is no state file
        self.state = StateFile(settings.state_file) if settings.state_file else None
        changes = self.state.load() if self.state else []
        backends, skipped = replay(self._base, changes)
        for reason in skipped:
            log.warning("state file: a recorded change no longer applies, skipped: %s", reason)
        self.telemetry = telemetry or build_telemetry(settings, span_exporters)
        self.metrics: ProxyMetrics = build_metrics(settings, metric_readers)
        self.port = 0
        self._server: aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._admin_server: aio.Server | None = None
        self.admin_port = 0
        self._background: list[asyncio.Task[None]] = []
        self._closing_channels: set[asyncio.Task[None]] = set()
        self.recorder = Recorder(settings, self.telemetry, metrics=self.metrics)

        def make_upstream(backend: BackendSettings) -> Upstream:
            return Upstream(backend, max_message_bytes=settings.max_message_bytes)

        try:
            self.registry = Registry(backends, make_upstream)
        except RegistryError as exc:
            raise ConfigError(exc.message) from None
        self.registry.listeners.append(self._on_registry_change)
        self.recorder.registry = self.registry
        self.shadows = ShadowWriter(self.registry, self.recorder.submit)
        self.fanout = FanOut(
            self.registry, self.shadows, self.recorder.submit, self.settings.never_shadowed
        )
        self.streams = StreamRelay(self.registry, settings.streaming_methods, self.recorder.submit)
        self.feedback = FeedbackServicer(self.recorder.submit)
        self.health = HealthWatcher(self.registry, settings.health_interval, self._set_health)
        self.admin = AdminServicer(self.registry, self.change, settings.admin_token)
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
            ("grpc.so_reuseport", 1 if self.settings.reuse_port else 0),
        ]
        server = aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.feedback, server)

        def production_channel() -> aio.Channel | None:
            # Read per request: a promotion changes where reflection is forwarded.
            production = self.registry.snapshot.production
            return production.upstream.channel if production.serving else None

        enable_reflection(
            (
                PREDICT_SERVICE,
                FEEDBACK_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            server,
            production_channel,
            # Forwarded like any other method: listed only where production serves it.
            forwarded=(PREDICT_SERVICE,),
        )
        server.add_generic_rpc_handlers((_ForwardingHandler(self),))
        port = _bind(server, self.settings.listen, "--listen", self._server_credentials())
        self.port = port
        self.recorder.listen_port = port
        # Build the protocol codecs now (tens of ms of message classes), not on the first call.
        known_codecs()
        self.recorder.start()
        await server.start()
        self._server = server
        log.info(
            "shadow-proxy listening on %s%s",
            self.address,
            " (TLS, client certificates required)"
            if self.settings.tls_client_ca
            else " (TLS)"
            if self.settings.tls_cert
            else "",
        )
        for backend in self.registry.backends():
            log.info(
                "%s: %s (max %d in flight; from %s)",
                backend.role,
                backend.settings.describe(),
                backend.settings.max_in_flight,
                backend.settings.source,
            )
        if self.state is not None:
            log.info("run-time changes are kept in %s", self.state.path.resolve())
        await self._start_admin(options)
        self._log_exporters()
        if self.metrics.prometheus_port is not None:
            log.info(
                "metrics: Prometheus endpoint on http://%s:%d/metrics",
                self.settings.metrics_host,
                self.metrics.prometheus_port,
            )
        await self.health.check_all()
        self._background.append(asyncio.create_task(self.health.run()))
        if self.state is not None:
            self._background.append(asyncio.create_task(self._follow_state()))
        return port

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def _start_admin(self, options: list[tuple[str, int]]) -> None:
        if self.settings.admin_listen is None:
            log.info("admin service off")
            return
        server = aio.server(options=options)
        admin_pb2_grpc.add_ProxyAdminServicer_to_server(self.admin, server)
        reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), server)
        self.admin_port = _bind(
            server, self.settings.admin_listen, "--admin-listen", self._server_credentials()
        )
        await server.start()
        self._admin_server = server
        host = self.settings.admin_listen.rpartition(":")[0]
        log.info(
            "admin service on %s:%d (%s)",
            host,
            self.admin_port,
            "bearer token required" if self.settings.admin_token else "no token: loopback only",
        )

    # ------------------------------------------------------------------ backends at run time

    def change(self, change: Mapping[str, Any]) -> None:
        """Validate, apply and persist one change to the backends (from the admin API).

        Under the state file's lock, the registry first catches up with changes other
        workers made, so the change is checked against the registry every worker has.
        Raises RegistryError and changes nothing when the change is refused.
        """
        if self.state is None:
            self.registry.apply(change)
            self._changes.append(dict(change))
        else:
            with self.state.locked():
                self._resync()
                self.registry.apply(change)
                self.state.append(change)
        log.info("admin: %s", _describe_change(change))

    def _resync(self) -> None:
        """Rebuild the registry from the base backends and the state file's changes."""
        changes = self.state.load() if self.state else []
        backends, skipped = replay(self._base, changes)
        for reason in skipped:
            log.warning("state file: a recorded change no longer applies, skipped: %s", reason)
        if [s for s in backends] != self.registry.settings() or [s.role for s in backends] != [
            s.role for s in self.registry.settings()
        ]:
            self.registry.replace_all(backends)

    async def _follow_state(self) -> None:
        """Pick up changes other workers wrote to the state file."""
        assert self.state is not None
        while True:
            await asyncio.sleep(self.settings.state_poll_interval)
            try:
                if self.state.changed():
                    with self.state.locked():
                        self._resync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not follow the state file")

    def reload(self) -> None:
        """SIGHUP: read the config again and apply it, with the run-time changes on top,
        without dropping a call (in-flight calls keep the backends they started with)."""
        if self._reload_base is None:
            log.warning("SIGHUP: nothing to reload (no --config)")
            return
        try:
            base = self._reload_base()
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        previous, self._base = self._base, base
        try:
            if self.state is None:
                self._resync()
            else:
                with self.state.locked():
                    self._resync()
        except RegistryError as exc:
            # The running backends stay, and so does the config they came from.
            self._base = previous
            log.error("SIGHUP: config not applied: %s", exc.message)
            return
        log.info(
            "SIGHUP: config reloaded; backends: %s",
            ", ".join(f"{b.role} {b.name}" for b in self.registry.backends()),
        )

    def _on_registry_change(self, snapshot: Snapshot) -> None:
        # A removed backend's channel closes once its in-flight calls end (bounded).
        for upstream in self.registry.take_retired():
            task = asyncio.get_running_loop().create_task(upstream.channel.close(grace=30.0))
            self._closing_channels.add(task)
            task.add_done_callback(self._closing_channels.discard)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if not serving:
            production = self.registry.snapshot.production
            log.warning(
                "production %s is not serving: the proxy reports NOT_SERVING and fails calls fast",
                production.name,
            )
        await self._health.set("", status)
        await self._health.set(PREDICT_SERVICE, status)

    def _observe_metrics(self) -> None:
        registry, recorder, telemetry = self.registry, self.recorder, self.telemetry

        def calls() -> list[tuple[int, dict[str, str]]]:
            return [
                (
                    count,
                    {
                        "shadow.backend": backend.name,
                        "shadow.role": backend.role,
                        "rpc.grpc.status_code": code,
                    },
                )
                for backend in registry.backends()
                for code, count in backend.stats.by_code.items()
            ]

        def per_copy(field: str) -> Callable[[], list[tuple[int, dict[str, str]]]]:
            def observe() -> list[tuple[int, dict[str, str]]]:
                return [
                    (
                        getattr(b.stats, field),
                        {"shadow.backend": b.name, "shadow.role": b.role},
                    )
                    for b in registry.snapshot.copies
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
                metrics.UNHEALTHY_SKIPPED: (
                    "Shadow copies not sent while the shadow's health check failed",
                    per_copy("unhealthy_skipped"),
                ),
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

    async def stop(self) -> None:
        """Ordered shutdown: stop accepting, finish production calls, drain shadows, flush."""
        if self._stopped:
            return
        self._stopped = True
        settings = self.settings
        log.info("shutting down: finishing in-flight calls (up to %.1fs)", settings.shutdown_grace)
        await self._health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._admin_server is not None:
            await self._admin_server.stop(grace=1.0)
        if self._server is not None:
            await self._server.stop(grace=settings.shutdown_grace)
        await self.shadows.drain(settings.shadow_grace)
        for backend in self.registry.backends():
            await backend.upstream.close()
        for upstream in self.registry.take_retired():
            await upstream.close()
        for task in list(self._closing_channels):
            task.cancel()
        await asyncio.to_thread(self.recorder.close)
        flushed = await asyncio.to_thread(self.telemetry.shutdown)
        await asyncio.to_thread(self.metrics.shutdown)
        log.info("production calls: %s", self.fanout.stats.summary())
        if self.streams.stats.streams:
            log.info("streams relayed to production: %s", self.streams.stats.summary())
        for backend in self.registry.backends():
            log.info("%s %s: %s", backend.role, backend.name, backend.stats.summary())
        if self.recorder.enabled:
            log.info(
                "recorder: %s; exporters: %s", self.recorder.summary(), self.telemetry.summary()
            )
        log.info("stopped%s", "" if flushed else " (some spans were not flushed)")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


# Python's default collects the young generation every 700 net allocations: several
# hundred times a second under load, and every full collection walked everything startup
# built. The request path and the recorder make short-lived objects that reference counting
# frees and few cycles, so collections can be rarer; not much rarer, since a timed-out
# shadow call leaves a cycle (its exception and traceback) that only a collection frees.
# Measured side by side (scripts/bench.py's setup): a few percent of the CPU per request.
_GC_THRESHOLDS = (10_000, 10, 10)


def _tune_garbage_collector() -> None:
    """Make collections rarer, and keep what startup built (modules, descriptors,
    settings) out of every later full collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


async def run(
    settings: Settings,
    ready_file: Path | None = None,
    reload_base: Callable[[], list[BackendSettings]] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; SIGHUP reloads the config.
    Returns the exit code."""
    proxy = ProxyServer(settings, reload_base=reload_base)
    await proxy.start()
    _tune_garbage_collector()
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
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    await stop.wait()
    await proxy.stop()
    if ready_file is not None:
        # A supervisor must not read a stopped proxy's address.
        await asyncio.to_thread(ready_file.unlink, missing_ok=True)
    return 0


def _bind(
    server: aio.Server, address: str, flag: str, credentials: grpc.ServerCredentials | None
) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"{flag}: cannot listen on {address}: {exc}") from None
    if not port:
        raise ConfigError(f"{flag}: cannot listen on {address} (address in use?)")
    return int(port)


def _describe_change(change: Mapping[str, Any]) -> str:
    op = change.get("op")
    if op == "register":
        backend = change.get("backend") or {}
        return f"registered {backend.get('role')} {backend.get('name')} at {backend.get('address')}"
    if op == "promote":
        return f"promoted {change.get('name')} to production" + (
            " (old production removed)" if change.get("remove_old") else ""
        )
    if op == "update":
        return f"updated {change.get('name')}: {change.get('changes')}"
    return f"{op} {change.get('name')}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
