"""The OpenTelemetry tracer provider, its processors and the exporters chosen in settings."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from proxy.errors import ConfigError
from proxy.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "shadow-proxy"
_WARN_EVERY_S = 10.0


class CountingSpanExporter(SpanExporter):
    """Wraps an exporter to count what it delivered and what it lost, and to say so in the
    log (at most every few seconds) instead of raising: a dead collector costs spans only."""

    def __init__(self, name: str, inner: SpanExporter) -> None:
        self.name = name
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self._last_warning = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("exporter %s raised while exporting %d spans", self.name, len(spans))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "exporter %s could not deliver %d spans (%d lost so far); requests are unaffected",
                    self.name,
                    len(spans),
                    self.failed,
                )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


@dataclass
class Telemetry:
    """What the recorder needs: the provider (resource, sampler), exporters and processors."""

    provider: TracerProvider | None
    exporters: list[CountingSpanExporter] = field(default_factory=list)
    processors: list[BatchSpanProcessor] = field(default_factory=list)
    """One batch processor per exporter; the recorder hands them finished spans."""

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def summary(self) -> str:
        return ", ".join(
            f"{e.name}: exported={e.exported} failed={e.failed}" for e in self.exporters
        )

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Flush and close every exporter; give up after ``timeout`` seconds (a dead
        collector must not hold the process). Returns False when it gave up."""
        if self.provider is None:
            return True
        provider = self.provider
        done = threading.Thread(target=provider.shutdown, name="telemetry-shutdown", daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            log.warning(
                "exporters did not finish within %.1fs; spans still queued are lost", timeout
            )
            return False
        return True


def _exporter(name: str, settings: Settings) -> SpanExporter:
    if name == "file":
        from proxy.otlp_json import JsonLinesSpanExporter

        path = settings.traces_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JsonLinesSpanExporter(path)
        except OSError as exc:
            raise ConfigError(f"--traces-file: cannot open {path}: {exc.strerror or exc}") from None
    if name == "otlp":
        if settings.otlp_protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            return HttpExporter()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ConfigError(f"unknown exporter {name!r}")


def _batch_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    # The OTEL_BSP_* variables win; otherwise a larger queue than the SDK's default absorbs
    # bursts, a one-second delay keeps the local file close to live, and smaller batches
    # keep each encode (C code that holds the GIL throughout) from stalling the event loop.
    queue = None if "OTEL_BSP_MAX_QUEUE_SIZE" in os.environ else 8192
    delay = None if "OTEL_BSP_SCHEDULE_DELAY" in os.environ else 1000
    batch = None if "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in os.environ else 64
    return BatchSpanProcessor(
        exporter, max_queue_size=queue, schedule_delay_millis=delay, max_export_batch_size=batch
    )


def build_telemetry(
    settings: Settings, exporters: Sequence[SpanExporter] | None = None
) -> Telemetry:
    """A tracer provider exporting to the settings' exporters, or to ``exporters`` when given
    (tests pass an in-memory exporter). Tracing is off when there are none."""
    named: list[CountingSpanExporter] = []
    if exporters is None:
        for name in settings.exporters:
            named.append(CountingSpanExporter(name, _exporter(name, settings)))
    else:
        named = [CountingSpanExporter(type(e).__name__, e) for e in exporters]
    if not named:
        return Telemetry(None, [])
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over our default.
    resource = Resource.create({"service.name": SERVICE_NAME})
    if os.environ.get("OTEL_SERVICE_NAME"):
        resource = resource.merge(Resource({"service.name": os.environ["OTEL_SERVICE_NAME"]}))
    provider = TracerProvider(resource=resource)
    processors = [_batch_processor(exporter) for exporter in named]
    for processor in processors:
        provider.add_span_processor(processor)
    return Telemetry(provider, named, processors)
