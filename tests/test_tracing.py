"""Spans: one trace per call, the proxy span over production and shadow spans, payloads."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from grpc import aio
from opentelemetry.trace import SpanKind, StatusCode

from proxy.gen import predict_pb2
from tests.backends import Behaviour, wait_for

PREDICT = "/predict.v1.PredictionService/Predict"


def _request(request_id: str = "", secret: float = 0.0) -> bytes:
    return predict_pb2.PredictRequest(
        model_name="breast-cancer",
        request_id=request_id,
        inputs=[
            predict_pb2.Tensor(
                name="features",
                dtype=predict_pb2.DATA_TYPE_FP64,
                shape=[1, 3],
                contents=predict_pb2.TensorContents(fp64_contents=[1.5, 2.5, 3.5]),
            ),
            predict_pb2.Tensor(
                name="ssn",
                dtype=predict_pb2.DATA_TYPE_FP64,
                shape=[1],
                contents=predict_pb2.TensorContents(fp64_contents=[secret]),
            ),
        ],
    ).SerializeToString()


def _reply_with(label: int):
    def reply(body: bytes) -> bytes:
        request = predict_pb2.PredictRequest.FromString(body)
        return predict_pb2.PredictResponse(
            model_name=f"model-{label}",
            request_id=request.request_id,
            outputs=[
                predict_pb2.Tensor(
                    name="label",
                    dtype=predict_pb2.DATA_TYPE_INT64,
                    shape=[1],
                    contents=predict_pb2.TensorContents(int64_contents=[label]),
                )
            ],
        ).SerializeToString()

    return reply


async def _call_and_collect(proxy, spans, channel, request, metadata=()):
    call = channel.unary_unary(PREDICT)(request, metadata=metadata)
    await call
    await wait_for(lambda: not any(proxy.shadows.in_flight().values()))
    assert proxy.recorder.flush()
    return spans.get_finished_spans()


async def test_one_trace_per_call_with_proxy_production_and_shadow_spans(
    backends, make_proxy, channel_to
):
    production = await backends(Behaviour(reply=_reply_with(1)))
    good = await backends(Behaviour(reply=_reply_with(0)))
    broken = await backends(Behaviour(error=(grpc.StatusCode.INTERNAL, "boom")))
    proxy, spans = await make_proxy(
        f"prod={production.address}", [f"cand={good.address}", f"broken={broken.address}"]
    )
    finished = await _call_and_collect(proxy, spans, channel_to(proxy.address), _request("t-1"))
    by_name = {s.name: s for s in finished}
    assert set(by_name) == {
        "predict.v1.PredictionService/Predict",
        "production prod",
        "shadow cand",
        "shadow broken",
    }
    root = by_name["predict.v1.PredictionService/Predict"]
    assert root.kind is SpanKind.SERVER and root.parent is None
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.service"] == "predict.v1.PredictionService"
    assert root.attributes["rpc.method"] == "Predict"
    assert root.attributes["shadow.request_id"] == "t-1"
    assert set(root.attributes["shadow.sampled"]) == {"cand", "broken"}
    for name in ("production prod", "shadow cand", "shadow broken"):
        child = by_name[name]
        assert child.kind is SpanKind.CLIENT
        assert child.context.trace_id == root.context.trace_id
        assert child.parent.span_id == root.context.span_id
        assert child.attributes["shadow.request_id"] == "t-1"
        assert child.attributes["server.address"] == "127.0.0.1"
    assert by_name["production prod"].attributes["shadow.role"] == "production"
    assert by_name["shadow cand"].attributes["shadow.role"] == "shadow"
    assert by_name["shadow cand"].attributes["shadow.sampled"] is True
    assert by_name["shadow broken"].status.status_code is StatusCode.ERROR
    assert by_name["shadow broken"].attributes["rpc.grpc.status_code"] == 13
    # The span ids are the ones each backend was told in its traceparent.
    for backend, name in ((production, "production prod"), (good, "shadow cand")):
        _, trace_id, span_id, _ = backend.received[0].metadata["traceparent"].split("-")
        assert int(trace_id, 16) == root.context.trace_id
        assert int(span_id, 16) == by_name[name].context.span_id


async def test_payload_events_are_decoded_json_and_redacted(backends, make_proxy, channel_to):
    production = await backends(Behaviour(reply=_reply_with(1)))
    shadow = await backends(Behaviour(reply=_reply_with(0)))
    proxy, spans = await make_proxy(
        f"prod={production.address}",
        [f"cand={shadow.address}"],
        redact_tensors=["ssn"],
        redact_metadata=["x-api-key"],
    )
    finished = await _call_and_collect(
        proxy,
        spans,
        channel_to(proxy.address),
        _request("t-2", secret=123456789.0),
        metadata=(("authorization", "Bearer top-secret"), ("x-api-key", "k"), ("x-tenant", "acme")),
    )
    by_name = {s.name: s for s in finished}
    root = by_name["predict.v1.PredictionService/Predict"]
    (request_event,) = [e for e in root.events if e.name == "request"]
    assert request_event.attributes["payload.encoding"] == "json"
    assert request_event.attributes["message.type"] == "predict.v1.PredictRequest"
    assert request_event.attributes["payload.truncated"] is False
    payload = json.loads(request_event.attributes["payload"])
    tensors = {t["name"]: t for t in payload["inputs"]}
    assert tensors["features"]["contents"]["fp64_contents"] == [1.5, 2.5, 3.5]
    assert tensors["ssn"]["contents"] == "[REDACTED]"
    assert "123456789" not in request_event.attributes["payload"]
    assert root.attributes["rpc.grpc.request.metadata.authorization"] == ("[REDACTED]",)
    assert root.attributes["rpc.grpc.request.metadata.x-api-key"] == ("[REDACTED]",)
    assert root.attributes["rpc.grpc.request.metadata.x-tenant"] == ("acme",)
    for name, label in (("production prod", 1), ("shadow cand", 0)):
        (reply_event,) = [e for e in by_name[name].events if e.name == "response"]
        assert reply_event.attributes["message.type"] == "predict.v1.PredictResponse"
        reply = json.loads(reply_event.attributes["payload"])
        assert reply["outputs"][0]["contents"]["int64_contents"] == [str(label)]
    # Nothing secret anywhere in any exported span.
    for span in finished:
        assert "top-secret" not in span.to_json()


async def test_unknown_payloads_are_base64_and_capped(backends, make_proxy, channel_to):
    production = await backends()
    proxy, spans = await make_proxy(f"prod={production.address}", payload_max_bytes=100)
    body = bytes(range(256))
    await channel_to(proxy.address).unary_unary("/opaque.Service/Do")(body)
    assert proxy.recorder.flush()
    root = next(s for s in spans.get_finished_spans() if s.attributes["shadow.role"] == "proxy")
    (event,) = root.events
    assert event.attributes["payload.encoding"] == "base64"
    assert event.attributes["payload.truncated"] is True
    assert event.attributes["payload.size"] == 256
    assert len(event.attributes["payload"]) <= 100
    assert body.startswith(base64.b64decode(event.attributes["payload"]))


async def test_incoming_traceparent_is_continued(backends, make_proxy, channel_to):
    production = await backends()
    proxy, spans = await make_proxy(f"prod={production.address}")
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (
        ("traceparent", f"00-{trace_id}-{parent_id}-01"),
        ("tracestate", "vendor=abc"),
    )
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", metadata=metadata)
    assert proxy.recorder.flush()
    root = next(s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER)
    assert root.context.trace_id == int(trace_id, 16)
    assert root.parent is not None and root.parent.span_id == int(parent_id, 16)
    assert root.parent.is_remote
    sent = production.received[0].metadata
    assert sent["traceparent"].split("-")[1] == trace_id
    assert sent["traceparent"].split("-")[2] != parent_id  # the production span, not the client's
    assert sent["tracestate"] == "vendor=abc"


async def test_production_unreachable_is_recorded(backends, make_proxy, channel_to):
    production = await backends()
    # Health checked only at start: production dies between checks, so the call is tried.
    proxy, spans = await make_proxy(f"prod={production.address}", health_interval=60)
    await production.stop()
    with pytest.raises(aio.AioRpcError):
        await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", timeout=5)
    assert proxy.recorder.flush()
    by_kind = {s.kind: s for s in spans.get_finished_spans()}
    assert by_kind[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert by_kind[SpanKind.SERVER].attributes["rpc.grpc.status_code"] == 14
    production_span = by_kind[SpanKind.CLIENT]
    assert production_span.attributes["shadow.status_from_backend"] is False
    assert "production backend 'prod'" in by_kind[SpanKind.SERVER].status.description


async def test_production_known_down_fails_fast_and_is_recorded(backends, make_proxy, channel_to):
    dead = await backends()
    address = dead.address
    await dead.stop()
    proxy, spans = await make_proxy(f"prod={address}")
    with pytest.raises(aio.AioRpcError) as info:
        await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", timeout=5)
    assert "production backend 'prod'" in info.value.details()
    assert "is not serving" in info.value.details()
    assert proxy.recorder.flush()
    (span,) = spans.get_finished_spans()  # no backend was called
    assert span.kind is SpanKind.SERVER
    assert span.attributes["rpc.grpc.status_code"] == 14


async def test_no_payloads_when_turned_off(backends, make_proxy, channel_to):
    production = await backends()
    proxy, spans = await make_proxy(f"prod={production.address}", record_payloads=False)
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    assert proxy.recorder.flush()
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    assert all(not s.events for s in finished)


async def test_the_sampler_is_honoured(backends, make_proxy, channel_to, monkeypatch):
    production = await backends()
    # The default sampler follows the client: an unsampled incoming trace records nothing.
    proxy, spans = await make_proxy(f"prod={production.address}")
    unsampled = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),)
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", metadata=unsampled)
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"y")
    assert proxy.recorder.flush()
    assert len(spans.get_finished_spans()) == 2  # the second call only: proxy + production
    # OTEL_TRACES_SAMPLER keeps its standard meaning.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    quiet, quiet_spans = await make_proxy(f"prod={production.address}")
    await channel_to(quiet.address).unary_unary("/m.S/M")(b"z")
    assert quiet.recorder.flush()
    assert quiet_spans.get_finished_spans() == ()
