"""Online comparison, references, metrics and feedback with real model servers that disagree."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from grpc import aio
from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from model_servers import ModelServerOptions, start_model_server
from model_servers.models import fitted_model, heldout
from proxy import metrics
from proxy.compare.report import build_report
from proxy.gen import feedback_pb2, feedback_pb2_grpc, predict_pb2
from proxy.server import ProxyServer
from proxy.tensors import to_tensor
from tests.backends import Behaviour, wait_for
from tests.conftest import proxy_settings

PREDICT = "/predict.v1.PredictionService/Predict"
ROWS = 80


def _metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    found: dict[str, list] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


@pytest.fixture
async def model_servers():
    servers = [
        await start_model_server(ModelServerOptions(model="logreg-v1")),
        await start_model_server(ModelServerOptions(model="gboost-v2")),
        await start_model_server(ModelServerOptions(model="logreg-v1")),
    ]
    yield servers
    for server in servers:
        await server.stop()


async def test_shadow_replies_are_compared_with_production_and_counted(model_servers, tmp_path):
    production, candidate, twin = model_servers
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    traces = tmp_path / "traces.jsonl"
    proxy = ProxyServer(
        proxy_settings(
            f"production={production.address}",
            [f"candidate={candidate.address}"],
            references=[f"twin={twin.address}"],
        ),
        span_exporters=[spans, FileSpanExporter(traces)],
        metric_readers=[reader],
    )
    await proxy.start()
    features, truth = heldout()
    features, truth = features[:ROWS], truth[:ROWS]
    # What the test expects, computed without the proxy: the two models' own predictions.
    expected_production = fitted_model("logreg-v1").predict(features)[0]
    expected_candidate = fitted_model("gboost-v2").predict(features)[0]
    expected_agree = {
        f"row-{i}": bool(expected_production[i] == expected_candidate[i]) for i in range(ROWS)
    }
    assert 0 < sum(expected_agree.values()) < ROWS
    try:
        async with aio.insecure_channel(proxy.address) as channel:
            for i in range(ROWS):
                request = predict_pb2.PredictRequest(
                    request_id=f"row-{i}", inputs=[to_tensor("features", features[i : i + 1])]
                ).SerializeToString()
                await channel.unary_unary(PREDICT)(request)
            await wait_for(lambda: proxy.shadows.stats["candidate"].ok == ROWS)
            await wait_for(lambda: proxy.shadows.stats["twin"].ok == ROWS)
            feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
            reply = await feedback.SubmitLabels(
                feedback_pb2.SubmitLabelsRequest(
                    labels=[
                        feedback_pb2.Label(request_id=f"row-{i}", labels=[str(int(truth[i]))])
                        for i in range(ROWS)
                    ]
                )
            )
            assert reply.accepted == ROWS
        assert proxy.recorder.flush()
        # Production's outputs are decoded once per call and kept only until both copies
        # (the shadow and the reference) have been compared with them.
        assert proxy.recorder._decoded == {}
        finished = spans.get_finished_spans()
        points = _metric_points(reader)
    finally:
        await proxy.stop()

    shadow_spans = {
        s.attributes["shadow.request_id"]: s for s in finished if s.name == "shadow candidate"
    }
    twin_spans = [s for s in finished if s.name == "reference twin"]
    production_spans = {
        s.attributes["shadow.request_id"]: s for s in finished if s.name == "production production"
    }
    assert len(shadow_spans) == len(twin_spans) == len(production_spans) == ROWS
    for request_id, agree in expected_agree.items():
        attributes = shadow_spans[request_id].attributes
        assert attributes["shadow.compared"] is True
        assert attributes["shadow.agree"] is agree, request_id
        assert attributes["shadow.status_mismatch"] is False
        assert ("label" in attributes["shadow.differing_outputs"]) is (not agree)
        assert attributes["shadow.max_abs_diff"] >= 0
        assert isinstance(attributes["shadow.latency_diff_ms"], float)
        row = int(request_id.split("-")[1])
        assert attributes["shadow.predicted_labels"] == (str(expected_candidate[row]),)
        assert production_spans[request_id].attributes["shadow.predicted_labels"] == (
            str(expected_production[row]),
        )
    # The twin runs the same deterministic model: no noise.
    assert all(s.attributes["shadow.agree"] is True for s in twin_spans)
    assert all(s.attributes["shadow.role"] == "reference" for s in twin_spans)
    assert all(s.attributes["shadow.max_abs_diff"] == 0.0 for s in twin_spans)

    # Feedback: one span per label, linked to the labelled call's proxy span.
    feedback_spans = [s for s in finished if s.name == "feedback"]
    assert len(feedback_spans) == ROWS
    proxy_spans = {
        s.attributes["shadow.request_id"]: s
        for s in finished
        if s.attributes["shadow.role"] == "proxy"
    }
    for span in feedback_spans:
        request_id = span.attributes["shadow.request_id"]
        assert span.attributes["shadow.labels"] == (str(int(truth[int(request_id.split("-")[1])])),)
        (link,) = span.links
        assert link.context.trace_id == proxy_spans[request_id].context.trace_id
        assert link.context.span_id == proxy_spans[request_id].context.span_id

    # Metrics: agreement counts, calls by code, latency histograms, shadow counters.
    comparisons = {
        (p.attributes["shadow.backend"], p.attributes["shadow.agree"]): p.value
        for p in points[metrics.COMPARISONS]
    }
    agreed = sum(expected_agree.values())
    assert comparisons[("candidate", True)] == agreed
    assert comparisons.get(("candidate", False), 0) == ROWS - agreed
    assert comparisons[("twin", True)] == ROWS
    calls = {
        (p.attributes["shadow.backend"], p.attributes["rpc.grpc.status_code"]): p.value
        for p in points[metrics.CALLS]
    }
    assert (
        calls[("production", "OK")] == calls[("candidate", "OK")] == calls[("twin", "OK")] == ROWS
    )
    durations = {p.attributes["shadow.backend"]: p.count for p in points[metrics.DURATION]}
    assert durations == {"production": ROWS, "candidate": ROWS, "twin": ROWS}
    assert {p.attributes["shadow.backend"] for p in points[metrics.MAX_ABS_DIFF]} == {
        "candidate",
        "twin",
    }
    assert all(p.value == 0 for p in points[metrics.DROPPED])

    # The report, read from the file the proxy wrote, against the same independent counts.
    report = {b["name"]: b for b in build_report(traces).to_dict()["backends"]}
    assert report["candidate"]["agreement"]["successes"] == agreed
    assert report["candidate"]["agreement"]["total"] == ROWS
    assert report["twin"]["noise_rate"]["successes"] == 0
    assert report["candidate"]["noise"] == 0 and report["candidate"]["real"] == ROWS - agreed
    for name, predictions in (
        ("production", expected_production),
        ("candidate", expected_candidate),
    ):
        correct = int(sum(int(predictions[i]) == int(truth[i]) for i in range(ROWS)))
        assert report[name]["accuracy"]["successes"] == correct
        assert report[name]["accuracy"]["total"] == ROWS


async def test_shadow_errors_are_status_mismatches(backends, make_proxy, channel_to):
    production = await backends()
    broken = await backends(Behaviour(error=(grpc.StatusCode.INTERNAL, "boom")))
    proxy, spans = await make_proxy(f"prod={production.address}", [f"broken={broken.address}"])
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    await wait_for(lambda: proxy.shadows.stats["broken"].failed == 1)
    assert proxy.recorder.flush()
    (span,) = [s for s in spans.get_finished_spans() if s.name == "shadow broken"]
    assert span.attributes["shadow.status_mismatch"] is True
    assert span.attributes["shadow.compared"] is False
    assert "shadow.agree" not in span.attributes


async def test_feedback_rejects_bad_batches_whole(backends, make_proxy, channel_to):
    production = await backends()
    proxy, spans = await make_proxy(f"prod={production.address}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel_to(proxy.address))
    bad_batches = {
        "request_id is empty": [
            feedback_pb2.Label(request_id="a", labels=["1"]),
            feedback_pb2.Label(labels=["1"]),
        ],
        "no label values": [feedback_pb2.Label(request_id="a")],
    }
    for message, labels in bad_batches.items():
        with pytest.raises(aio.AioRpcError) as info:
            await stub.SubmitLabels(feedback_pb2.SubmitLabelsRequest(labels=labels))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    too_many = [feedback_pb2.Label(request_id=str(i), labels=["1"]) for i in range(10_001)]
    with pytest.raises(aio.AioRpcError) as info:
        await stub.SubmitLabels(feedback_pb2.SubmitLabelsRequest(labels=too_many))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert proxy.recorder.flush()
    assert [s for s in spans.get_finished_spans() if s.name == "feedback"] == []
    # Feedback is the proxy's own service: never forwarded to production.
    assert production.received == []
    # A label for a call the proxy never saw is still recorded, just not linked.
    reply = await stub.SubmitLabels(
        feedback_pb2.SubmitLabelsRequest(
            labels=[feedback_pb2.Label(request_id="unknown", labels=["0"])]
        )
    )
    assert reply.accepted == 1
    assert proxy.recorder.flush()
    (span,) = [s for s in spans.get_finished_spans() if s.name == "feedback"]
    assert span.attributes["shadow.linked"] is False and span.links == ()


async def test_prometheus_endpoint_serves_the_metrics(backends):
    production = await backends()
    shadow = await backends(Behaviour(hang=True))
    proxy = ProxyServer(
        proxy_settings(
            f"prod={production.address}",
            [f"cand={shadow.address},max_in_flight=1"],
            metrics_port=0,
            shadow_grace=0.1,
        )
    )
    await proxy.start()
    try:
        async with aio.insecure_channel(proxy.address) as channel:
            for _ in range(3):
                await channel.unary_unary("/m.S/M")(b"x")
        url = f"http://127.0.0.1:{proxy.metrics.prometheus_port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    finally:
        await proxy.stop()
    samples = {
        (
            sample.name,
            sample.labels.get("shadow_backend"),
            sample.labels.get("rpc_grpc_status_code"),
        ): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("shadow_proxy_backend_calls_total", "prod", "OK")] == 3
    assert samples[("shadow_proxy_shadow_dropped_total", "cand", None)] == 2
    assert samples[("shadow_proxy_recorder_dropped_total", None, None)] == 0


def test_production_outputs_wait_for_each_copy_and_stay_bounded(monkeypatch) -> None:
    from proxy.recording import Recorder
    from proxy.telemetry import build_telemetry

    settings = proxy_settings("prod=127.0.0.1:1")
    telemetry = build_telemetry(settings, [InMemorySpanExporter()])
    recorder = Recorder(settings, telemetry)
    try:
        _check_decoded_outputs(recorder, monkeypatch)
    finally:
        telemetry.shutdown()


def _check_decoded_outputs(recorder, monkeypatch) -> None:
    from proxy import recording
    from proxy.protocols import Outputs
    from proxy.records import BackendOutcome, TraceContext

    def outcome(n: int, reply: bytes) -> BackendOutcome:
        trace = TraceContext(7, n + 1, 1, None)  # one client trace, many calls
        return BackendOutcome(
            "production", "prod", "127.0.0.1:1", PREDICT, f"r{n}", trace, n + 100, 0, 1,
            grpc.StatusCode.OK, "", reply, (), 0,
        )  # fmt: skip

    outputs = Outputs({"score": np.zeros(1000)}, frozenset({"score"}))  # 8000 bytes
    first, second = outcome(0, b"a" * 10), outcome(1, b"b" * 10)
    recorder._remember_outputs(first, outputs, copies=2)
    recorder._remember_outputs(second, outputs, copies=1)
    # Calls of one client trace do not share an entry; another reply's bytes never match.
    assert recorder._production_outputs(first.trace, b"a" * 10) is None
    assert recorder._production_outputs(first.trace, first.reply) is outputs
    assert recorder._production_outputs(second.trace, second.reply) is outputs
    assert recorder._production_outputs(first.trace, first.reply) is outputs
    assert recorder._decoded == {} and recorder._decoded_bytes == 0

    # Copies that never come back (dropped from a full queue) are evicted, oldest first.
    monkeypatch.setattr(recording, "_DECODED_BYTES", 5 * 8010)
    for n in range(20):
        recorder._remember_outputs(outcome(n, b"r" * 10), outputs, copies=1)
    assert len(recorder._decoded) == 5 and recorder._decoded_bytes == 5 * 8010
    assert min(key[1] for key in recorder._decoded) == 16  # calls 15..19 remain
    monkeypatch.setattr(recording, "_DECODED_BYTES", 1 << 40)
    monkeypatch.setattr(recording, "_DECODED_REPLIES", 3)
    recorder._remember_outputs(outcome(50, b"r" * 10), outputs, copies=1)
    assert len(recorder._decoded) == 3
