"""The proxy's spans over OTLP to a real collector, and a dead collector costing spans only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from proxy import metrics
from proxy.cli import build_parser, settings_from_args
from proxy.gen import predict_pb2
from proxy.server import ProxyServer
from tests.backends import Behaviour, ProbeBackend
from tests.conftest import proxy_settings
from tests.otlp_receiver import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_UNSET,
    OtlpGrpcReceiver,
    OtlpHttpReceiver,
    spans_from_json_lines,
)

PREDICT = "/predict.v1.PredictionService/Predict"
REQUEST = predict_pb2.PredictRequest(model_name="iris", request_id="body-id")
PRODUCTION_REPLY = predict_pb2.PredictResponse(model_name="iris", model_version="prod")
SHADOW_REPLY = predict_pb2.PredictResponse(model_name="iris", model_version="candidate")

StartBackend = Callable[..., Coroutine[Any, Any, ProbeBackend]]


@pytest.fixture(autouse=True)
def otel_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* from the outer environment; exports every 50 ms so tests wait little."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield


def _closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_proxy_production_and_shadow_spans_reach_an_otlp_collector(
    protocol: str,
    monkeypatch: pytest.MonkeyPatch,
    backends: StartBackend,
    channel_to: Callable[[str], aio.Channel],
) -> None:
    receiver_type = OtlpGrpcReceiver if protocol == "grpc" else OtlpHttpReceiver
    with receiver_type() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        production = await backends(Behaviour(reply=lambda _: PRODUCTION_REPLY.SerializeToString()))
        shadow = await backends(Behaviour(reply=lambda _: SHADOW_REPLY.SerializeToString()))
        settings = proxy_settings(
            f"prod={production.address}",
            [f"cand={shadow.address}"],
            exporters="otlp",
            otlp_protocol=protocol,
        )
        proxy = ProxyServer(settings)
        await proxy.start()
        try:
            call = channel_to(proxy.address).unary_unary(PREDICT)
            reply = await call(
                REQUEST.SerializeToString(), metadata=(("x-request-id", "otlp-1"),), timeout=5
            )
            assert reply == PRODUCTION_REPLY.SerializeToString()
            await receiver.wait_for_spans(3)
        finally:
            await proxy.stop()
        spans = receiver.spans()
        # Metrics travel with the traces (the meter provider flushes them at shutdown).
        metric_names = receiver.metric_names()

    assert {
        metrics.CALLS,
        metrics.DURATION,
        metrics.COMPARISONS,
        metrics.DROPPED,
        metrics.RECORDER_DROPPED,
        metrics.EXPORTER_FAILED,
    } <= metric_names

    assert sorted(span.name for span in spans) == [
        "predict.v1.PredictionService/Predict",
        "production prod",
        "shadow cand",
    ], "exactly one span per role, none twice"
    by_name = {span.name: span for span in spans}
    server = by_name["predict.v1.PredictionService/Predict"]
    prod = by_name["production prod"]
    cand = by_name["shadow cand"]

    # One trace: the proxy's SERVER span is the root, each backend call a CLIENT child.
    assert len(server.trace_id) == 32 and int(server.trace_id, 16)
    assert {span.trace_id for span in spans} == {server.trace_id}
    assert server.parent_span_id == ""
    assert prod.parent_span_id == server.span_id
    assert cand.parent_span_id == server.span_id
    assert len({server.span_id, prod.span_id, cand.span_id}) == 3
    assert server.kind == SPAN_KIND_SERVER
    assert prod.kind == cand.kind == SPAN_KIND_CLIENT
    # Each backend was told its own span's context, so its spans would join this trace.
    assert (
        production.received[0].metadata["traceparent"] == f"00-{server.trace_id}-{prod.span_id}-01"
    )
    assert shadow.received[0].metadata["traceparent"] == f"00-{server.trace_id}-{cand.span_id}-01"

    assert server.attributes["shadow.role"] == "proxy"
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.method"] == "Predict"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert prod.attributes["shadow.role"] == "production"
    assert prod.attributes["shadow.backend"] == "prod"
    assert cand.attributes["shadow.role"] == "shadow"
    assert cand.attributes["shadow.backend"] == "cand"
    assert cand.attributes["server.port"] == shadow.port
    for span in spans:
        assert span.attributes["shadow.request_id"] == "otlp-1"
        assert span.status_code == STATUS_UNSET
        assert span.resource["service.name"] == "shadow-proxy"

    # Payloads as events: the request on the proxy span, each reply on its backend span.
    request_event = server.event("request")
    assert request_event.attributes["payload.encoding"] == "json"
    assert request_event.attributes["message.type"] == "predict.v1.PredictRequest"
    assert json.loads(request_event.attributes["payload"])["request_id"] == "body-id"
    assert request_event.attributes["payload.size"] == REQUEST.ByteSize()
    for span, version in ((prod, "prod"), (cand, "candidate")):
        response = span.event("response")
        assert response.attributes["message.type"] == "predict.v1.PredictResponse"
        assert json.loads(response.attributes["payload"])["model_version"] == version
        assert response.attributes["payload.truncated"] is False

    exporter = proxy.telemetry.exporters[0]
    assert (exporter.name, exporter.exported, exporter.failed) == ("otlp", 3, 0)
    if isinstance(receiver, OtlpHttpReceiver):
        assert "/v1/traces" in receiver.paths


async def test_the_environment_alone_adds_otlp_to_the_file(
    monkeypatch: pytest.MonkeyPatch,
    backends: StartBackend,
    channel_to: Callable[[str], aio.Channel],
    tmp_path: Path,
) -> None:
    """As ``serve --help`` says: OTEL_EXPORTER_OTLP_ENDPOINT alone sends the spans over OTLP
    as well as to the file, OTEL_EXPORTER_OTLP_PROTOCOL picks the transport, and
    OTEL_SERVICE_NAME names the service."""
    with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "fraud-model-proxy")
        production = await backends()
        traces = tmp_path / "traces.jsonl"
        args = build_parser().parse_args(
            ["serve", "--listen", "127.0.0.1:0", "--production", f"prod={production.address}",
             "--traces-file", str(traces)]
        )  # fmt: skip
        settings = settings_from_args(args)
        assert (settings.exporters, settings.otlp_protocol) == (("file", "otlp"), "http/protobuf")
        proxy = ProxyServer(settings)
        await proxy.start()
        try:
            call = channel_to(proxy.address).unary_unary("/any.Service/Method")
            assert await call(b"ping", metadata=(("x-request-id", "env-1"),), timeout=5) == b"ping"
            await receiver.wait_for_spans(2)
        finally:
            await proxy.stop()
        over_otlp = receiver.spans()

    in_file = spans_from_json_lines(traces)
    assert sorted((s.name, s.span_id) for s in over_otlp) == sorted(
        (s.name, s.span_id) for s in in_file
    )
    assert sorted(s.name for s in over_otlp) == ["any.Service/Method", "production prod"]
    for span in (*over_otlp, *in_file):
        assert span.resource["service.name"] == "fraud-model-proxy"
        assert span.attributes["shadow.request_id"] == "env-1"
    assert [(e.name, e.exported, e.failed) for e in proxy.telemetry.exporters] == [
        ("file", 2, 0),
        ("otlp", 2, 0),
    ]


async def test_a_dead_collector_costs_spans_never_requests(
    monkeypatch: pytest.MonkeyPatch,
    backends: StartBackend,
    channel_to: Callable[[str], aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_loopback_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    caplog.set_level(logging.INFO, logger="proxy")
    production = await backends(Behaviour(reply=lambda body: b"production:" + body))
    shadow = await backends(Behaviour(reply=lambda body: b"shadow:" + body))
    proxy = ProxyServer(
        proxy_settings(f"prod={production.address}", [f"cand={shadow.address}"], exporters="otlp")
    )
    await proxy.start()
    try:
        call = channel_to(proxy.address).unary_unary(PREDICT)
        latencies: list[float] = []
        for i in range(50):
            body = f"call-{i}".encode()
            started = time.perf_counter()
            reply = await call(body, timeout=5)
            latencies.append(time.perf_counter() - started)
            assert reply == b"production:" + body
            # Spread the calls over ~1 s so they overlap the exporter's failing attempts
            # (each one waits for the connection and backs off for about a second).
            await asyncio.sleep(0.02)
        assert proxy.telemetry.exporters[0].exported == 0
    finally:
        stopping = time.monotonic()
        await asyncio.wait_for(proxy.stop(), timeout=30)
        stop_s = time.monotonic() - stopping

    # A call that waited for the exporter would take about its one-second timeout.
    assert max(latencies) < 0.5, f"slowest call {max(latencies):.3f}s"
    assert statistics.median(latencies) < 0.05, f"median {statistics.median(latencies):.3f}s"
    assert proxy.fanout.stats.calls == 50 and proxy.fanout.stats.errors == 0
    assert proxy.shadows.stats["cand"].ok == 50
    assert stop_s < 15, f"stop took {stop_s:.1f}s with the collector down"
    # The lost spans are counted (or the stop says they were not flushed) and logged.
    exporter = proxy.telemetry.exporters[0]
    messages = [record.getMessage() for record in caplog.records]
    not_flushed = any("some spans were not flushed" in message for message in messages)
    assert exporter.failed > 0 or not_flushed, proxy.telemetry.summary()
    assert exporter.exported == 0
    assert any(
        "exporter otlp could not deliver" in message and "requests are unaffected" in message
        for message in messages
    ), messages
