"""OpenTelemetry metrics: per-backend calls, errors, latency, shadow drops, agreement.

Counters that the request path already keeps (calls by status, drops, samples) are read by
callbacks at collection time, so the request path pays nothing for metrics; histograms and
comparison counts are recorded by the recorder thread, off the request path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from proxy.settings import Settings

log = logging.getLogger(__name__)

# Metric names, documented in the README; Prometheus shows dots as underscores.
CALLS = "shadow_proxy.backend.calls"
DURATION = "shadow_proxy.backend.duration"
SAMPLED_OUT = "shadow_proxy.shadow.sampled_out"
DROPPED = "shadow_proxy.shadow.dropped"
TIMED_OUT = "shadow_proxy.shadow.timed_out"
UNHEALTHY_SKIPPED = "shadow_proxy.shadow.unhealthy_skipped"
COMPARISONS = "shadow_proxy.comparison.count"
MAX_ABS_DIFF = "shadow_proxy.comparison.max_abs_diff"
RECORDER_DROPPED = "shadow_proxy.recorder.dropped"
EXPORTER_FAILED = "shadow_proxy.exporter.failed_spans"

Observer = Callable[[], Iterable[tuple[int | float, dict[str, Any]]]]
"""Returns (value, attributes) pairs for one observable instrument at collection time."""


@dataclass
class ProxyMetrics:
    """The meter provider and the instruments the recorder writes to."""

    provider: MeterProvider | None
    readers: list[MetricReader] = field(default_factory=list)
    prometheus_port: int | None = None
    _prometheus_server: Any = None

    def __post_init__(self) -> None:
        if self.provider is None:
            return
        meter = self.provider.get_meter("shadow-proxy")
        self._duration = meter.create_histogram(
            DURATION, unit="ms", description="Latency of backend calls, by backend and role"
        )
        self._comparisons = meter.create_counter(
            COMPARISONS,
            description="Replies compared with production's, by backend and shadow.agree",
        )
        self._max_abs_diff = meter.create_histogram(
            MAX_ABS_DIFF, description="Largest absolute difference from production per reply"
        )

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def record_call(self, backend: str, role: str, latency_ms: float) -> None:
        if self.provider is not None:
            self._duration.record(latency_ms, {"shadow.backend": backend, "shadow.role": role})

    def record_comparison(
        self, backend: str, role: str, agree: bool | None, max_abs_diff: float | None
    ) -> None:
        if self.provider is None or agree is None:
            return
        self._comparisons.add(
            1, {"shadow.backend": backend, "shadow.role": role, "shadow.agree": agree}
        )
        if max_abs_diff is not None:
            self._max_abs_diff.record(max_abs_diff, {"shadow.backend": backend})

    def observe(self, observers: dict[str, tuple[str, Observer]]) -> None:
        """Register observable counters: name → (description, observer)."""
        if self.provider is None:
            return
        meter = self.provider.get_meter("shadow-proxy")
        for name, (description, observer) in observers.items():
            meter.create_observable_counter(
                name, callbacks=[_callback(name, observer)], description=description
            )

    def shutdown(self) -> None:
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
        if self.provider is not None:
            try:
                self.provider.shutdown(timeout_millis=5_000)
            except Exception:
                log.exception("metrics shutdown failed")


def _callback(name: str, observer: Observer) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        try:
            return [Observation(value, attributes) for value, attributes in observer()]
        except Exception:  # a metric must never take collection (or the proxy) down
            log.exception("observing %s failed", name)
            return []

    return callback


def build_metrics(
    settings: Settings, readers: Sequence[MetricReader] | None = None
) -> ProxyMetrics:
    """Metrics exported with the traces over OTLP, and on a Prometheus endpoint when
    ``metrics_port`` is set; ``readers`` (tests) replaces both."""
    chosen: list[MetricReader] = list(readers or [])
    prometheus_server = None
    prometheus_port = None
    if readers is None:
        if "otlp" in settings.exporters:
            chosen.append(_otlp_reader(settings))
        if settings.metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry(auto_describe=True)
            chosen.append(PrometheusMetricReader(registry=registry))
            try:
                prometheus_server, _ = start_http_server(
                    settings.metrics_port, addr=settings.metrics_host, registry=registry
                )
            except OSError as exc:
                from proxy.errors import ConfigError

                raise ConfigError(
                    f"--metrics-port: cannot listen on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}"
                ) from None
            prometheus_port = prometheus_server.server_port
    if not chosen:
        return ProxyMetrics(None)
    resource = Resource.create({"service.name": "shadow-proxy"})
    provider = MeterProvider(resource=resource, metric_readers=chosen)
    return ProxyMetrics(provider, chosen, prometheus_port, prometheus_server)


def _otlp_reader(settings: Settings) -> MetricReader:
    exporter: Any
    if settings.otlp_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        exporter = GrpcMetricExporter()
    # OTEL_METRIC_EXPORT_INTERVAL wins; otherwise every 10 s rather than the SDK's 60 s.
    interval = None if "OTEL_METRIC_EXPORT_INTERVAL" in os.environ else 10_000
    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval)
