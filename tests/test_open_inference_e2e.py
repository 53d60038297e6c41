"""The Open Inference Protocol (KServe v2) end to end: real v2 model servers behind a real
proxy, called by tritonclient, Triton's own client, and the v2 model server on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from model_servers import ModelServerOptions, RunningModelServer, start_model_server
from model_servers.cli import build_parser
from model_servers.models import FEATURE_COUNT, fitted_model, heldout
from model_servers.server import ProxyRegistration, register_with_proxy
from proxy.protocols import open_inference as v2
from tests.backends import wait_for

ROWS = 40
"""Held-out rows sent one call each: enough for the two models to disagree on a few."""

_METHOD = "/inference.GRPCInferenceService/{}"


@pytest.fixture
async def v2_servers() -> AsyncIterator[tuple[RunningModelServer, RunningModelServer]]:
    """Production logreg-v1 and candidate gboost-v2, both speaking v2."""
    production = await start_model_server(ModelServerOptions(model="logreg-v1", protocol="v2"))
    candidate = await start_model_server(ModelServerOptions(model="gboost-v2", protocol="v2"))
    yield production, candidate
    await production.stop()
    await candidate.stop()


def _triton_infer(address: str, rows: np.ndarray, ids: list[str], model: str = "breast-cancer"):
    """One tritonclient infer() per row (raw inputs, as tritonclient always sends them)."""
    client = triton.InferenceServerClient(url=address)
    try:
        results = []
        for row, request_id in zip(rows, ids, strict=True):
            features = triton.InferInput("features", [1, FEATURE_COUNT], "FP64")
            features.set_data_from_numpy(row.reshape(1, FEATURE_COUNT))
            results.append(client.infer(model, [features], request_id=request_id))
        return results
    finally:
        client.close()


def _unary(channel: aio.Channel, method: str, response: Any) -> aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        _METHOD.format(method),
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )


def _payload(span: Any, event_name: str) -> dict[str, Any]:
    (event,) = [e for e in span.events if e.name == event_name]
    assert event.attributes["payload.encoding"] == "json"
    assert event.attributes["payload.truncated"] is False
    return json.loads(event.attributes["payload"])


def _spans_by_id(finished: Any, name: str) -> dict[str, Any]:
    return {s.attributes["shadow.request_id"]: s for s in finished if s.name == name}


# ------------------------------------------------------------------- through the proxy


async def test_tritonclient_through_the_proxy_equals_production_and_is_compared(
    v2_servers, make_proxy
):
    production, candidate = v2_servers
    proxy, spans = await make_proxy(
        f"production={production.address}", [f"candidate={candidate.address}"]
    )
    features, _ = heldout()
    rows = features[:ROWS]
    ids = [f"row-{i}" for i in range(ROWS)]
    # What the test expects, computed without any server: the two models' own predictions.
    expected_production, production_probabilities = fitted_model("logreg-v1").predict(rows)
    expected_candidate, _ = fitted_model("gboost-v2").predict(rows)
    expected_agree = {
        ids[i]: bool(expected_production[i] == expected_candidate[i]) for i in range(ROWS)
    }
    assert 0 < sum(expected_agree.values()) < ROWS

    proxied = await asyncio.to_thread(_triton_infer, proxy.address, rows, ids)
    direct = await asyncio.to_thread(_triton_infer, production.address, rows, ids)
    await wait_for(lambda: proxy.shadows.stats["candidate"].ok == ROWS)
    assert proxy.recorder.flush()
    finished = spans.get_finished_spans()

    for i, (through, straight) in enumerate(zip(proxied, direct, strict=True)):
        assert (
            through.get_response().SerializeToString()
            == straight.get_response().SerializeToString()
        )
        assert through.get_response().id == ids[i]
        assert len(through.get_response().raw_output_contents) == 2  # raw in, raw out
        np.testing.assert_array_equal(through.as_numpy("label"), straight.as_numpy("label"))
        np.testing.assert_array_equal(through.as_numpy("label"), expected_production[i : i + 1])
        np.testing.assert_array_equal(
            through.as_numpy("probabilities"), production_probabilities[i : i + 1]
        )
    # Every ModelInfer reached each backend once through the proxy, production once more direct.
    assert (production.calls, candidate.calls) == (2 * ROWS, ROWS)

    # The proxy span shows the raw request decoded: the feature values, readable.
    calls = _spans_by_id(finished, "inference.GRPCInferenceService/ModelInfer")
    request = _payload(calls["row-3"], "request")
    assert request["model_name"] == "breast-cancer" and request["id"] == "row-3"
    (tensor,) = request["inputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"], tensor["raw"]) == (
        "features",
        "FP64",
        [1, FEATURE_COUNT],
        True,
    )
    assert tensor["contents"]["fp64_contents"] == rows[3].tolist()
    # Backend spans show the replies decoded; shadow spans carry the comparison.
    production_spans = _spans_by_id(finished, "production production")
    shadow_spans = _spans_by_id(finished, "shadow candidate")
    assert len(production_spans) == len(shadow_spans) == ROWS
    agreed = 0
    for i, request_id in enumerate(ids):
        reply = _payload(production_spans[request_id], "response")
        outputs = {o["name"]: o for o in reply["outputs"]}
        assert outputs["label"]["contents"] == {"int64_contents": [int(expected_production[i])]}
        assert outputs["probabilities"]["datatype"] == "FP32"
        assert production_spans[request_id].attributes["shadow.predicted_labels"] == (
            str(expected_production[i]),
        )
        attributes = shadow_spans[request_id].attributes
        assert attributes["shadow.compared"] is True
        assert attributes["shadow.agree"] is expected_agree[request_id], request_id
        assert attributes["shadow.max_abs_diff"] > 0  # the probabilities always differ a bit
        assert attributes["shadow.predicted_labels"] == (str(expected_candidate[i]),)
        assert ("label" in attributes["shadow.differing_outputs"]) is not expected_agree[request_id]
        agreed += attributes["shadow.agree"]
    assert agreed == sum(expected_agree.values())


def _triton_stream(address: str, rows: np.ndarray, models: list[str]) -> list[tuple[str, Any]]:
    """tritonclient's streaming API (blocking): (request id, labels or the error text)."""
    answers: list[tuple[str, Any]] = []

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            answers.append(("error", str(error)))
        else:
            answers.append((result.get_response().id, result.as_numpy("label").tolist()))

    client = triton.InferenceServerClient(url=address)
    try:
        client.start_stream(callback=callback, stream_timeout=10)
        for n, (row, model) in enumerate(zip(rows, models, strict=True)):
            features = triton.InferInput("features", [1, FEATURE_COUNT], "FP64")
            features.set_data_from_numpy(row.reshape(1, FEATURE_COUNT))
            client.async_stream_infer(model, [features], request_id=f"s-{n}")
        client.stop_stream()
    finally:
        client.close()
    return answers


async def test_model_stream_infer_through_the_proxy_reaches_production_only(
    v2_servers, make_proxy
) -> None:
    production, candidate = v2_servers
    proxy, _ = await make_proxy(
        f"production={production.address}", [f"candidate={candidate.address}"]
    )
    features, _ = heldout()
    rows = features[:6]
    models = ["breast-cancer"] * 3 + ["no-such-model"] + ["breast-cancer"] * 2
    answers = await asyncio.to_thread(_triton_stream, proxy.address, rows, models)
    expected = fitted_model("logreg-v1").predict(rows)[0]
    # One answer per request, in order; the bad one is answered with an error and the
    # stream goes on.
    assert [a[0] for a in answers] == ["s-0", "s-1", "s-2", "error", "s-4", "s-5"]
    assert "no-such-model" in answers[3][1]
    for n in (0, 1, 2, 4, 5):
        assert answers[n][1] == [int(expected[n])]
    assert proxy.streams.stats.replies == 6
    # Never shadowed: no copy was sent (a copy is counted before it leaves).
    assert proxy.shadows.stats["candidate"].sent == 0


async def test_typed_requests_through_the_proxy_get_typed_replies(
    v2_servers, make_proxy, channel_to
):
    production, candidate = v2_servers
    proxy, spans = await make_proxy(
        f"production={production.address}", [f"candidate={candidate.address}"]
    )
    features, _ = heldout()
    # The family name: both models answer to it (each to its own name only otherwise).
    request = v2.ModelInferRequest(model_name="breast-cancer", id="typed-1")
    v2.add_input(request, "features", features[:5].astype(np.float32), "FP32", raw=False)
    data = request.SerializeToString()
    through = await channel_to(proxy.address).unary_unary(_METHOD.format("ModelInfer"))(data)
    direct = await channel_to(production.address).unary_unary(_METHOD.format("ModelInfer"))(data)
    assert through == direct  # byte for byte

    reply = v2.ModelInferResponse.FromString(through)
    assert (reply.model_name, reply.model_version, reply.id) == ("logreg-v1", "1", "typed-1")
    assert len(reply.raw_output_contents) == 0
    label = next(o for o in reply.outputs if o.name == "label")
    assert label.datatype == "INT64" and list(label.shape) == [5]
    expected = fitted_model("logreg-v1").predict(features[:5])[0]
    assert list(label.contents.int64_contents) == expected.tolist()
    np.testing.assert_array_equal(v2.response_outputs(reply)["label"], expected)

    await wait_for(lambda: proxy.shadows.stats["candidate"].ok == 1)
    assert proxy.recorder.flush()
    finished = spans.get_finished_spans()
    (call,) = _spans_by_id(finished, "inference.GRPCInferenceService/ModelInfer").values()
    (tensor,) = _payload(call, "request")["inputs"]
    assert "raw" not in tensor and len(tensor["contents"]["fp32_contents"]) == 5 * FEATURE_COUNT
    shadow = _spans_by_id(finished, "shadow candidate")["typed-1"]
    assert shadow.attributes["shadow.compared"] is True
    assert len(shadow.attributes["shadow.predicted_labels"]) == 5


async def test_tritonclient_health_and_metadata_through_the_proxy(v2_servers, make_proxy):
    production, _ = v2_servers
    proxy, _ = await make_proxy(f"production={production.address}")

    def ask() -> dict[str, Any]:
        client = triton.InferenceServerClient(url=proxy.address)
        try:
            return {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model ready": client.is_model_ready("logreg-v1"),
                "family ready": client.is_model_ready("breast-cancer", "1"),
                "unknown ready": client.is_model_ready("iris"),
                "server": client.get_server_metadata(as_json=True),
                "model": client.get_model_metadata("logreg-v1", as_json=True),
            }
        finally:
            client.close()

    answers = await asyncio.to_thread(ask)
    assert answers["live"] and answers["ready"]
    assert answers["model ready"] and answers["family ready"]
    assert answers["unknown ready"] is False
    assert answers["server"]["name"] == "model-server"
    model = answers["model"]
    assert (model["name"], model["versions"], model["platform"]) == (
        "logreg-v1",
        ["1"],
        "scikit-learn",
    )
    assert model["inputs"] == [
        {"name": "features", "datatype": "FP64", "shape": ["-1", str(FEATURE_COUNT)]}
    ]
    assert [(o["name"], o["datatype"]) for o in model["outputs"]] == [
        ("label", "INT64"),
        ("probabilities", "FP32"),
    ]


async def test_a_v2_candidate_registers_itself_with_the_proxy(v2_servers, make_proxy):
    production, candidate = v2_servers
    proxy, spans = await make_proxy(f"production={production.address}", admin_listen="127.0.0.1:0")
    await register_with_proxy(
        candidate, ProxyRegistration(admin=f"127.0.0.1:{proxy.admin_port}", name="candidate")
    )
    features, _ = heldout()
    await asyncio.to_thread(_triton_infer, proxy.address, features[:2], ["a", "b"])
    await wait_for(lambda: proxy.shadows.stats["candidate"].ok == 2)
    assert proxy.recorder.flush()
    shadows = _spans_by_id(spans.get_finished_spans(), "shadow candidate")
    assert sorted(shadows) == ["a", "b"]
    assert all(s.attributes["shadow.compared"] is True for s in shadows.values())


# ------------------------------------------------------------- the v2 model server alone


@pytest.fixture
async def logreg_v2() -> AsyncIterator[RunningModelServer]:
    server = await start_model_server(ModelServerOptions(model="logreg-v1", protocol="v2"))
    yield server
    await server.stop()


def _request(
    *,
    model_name: str = "logreg-v1",
    shape: tuple[int, ...] = (2, FEATURE_COUNT),
    datatype: str = "FP64",
    name: str = "features",
    data: bytes | None = None,
    outputs: tuple[str, ...] = (),
) -> bytes:
    request = v2.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(
        v2.encode_raw(np.ones(shape), "FP64") if data is None else data
    )
    for output in outputs:
        request.outputs.add(name=output)
    return request.SerializeToString()


def _typed_request(raw: bytes | None = None, **contents: list[float]) -> bytes:
    request = v2.ModelInferRequest()
    request.inputs.add(
        name="features", datatype="FP64", shape=(2, FEATURE_COUNT), contents=contents
    )
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request.SerializeToString()


_BAD_INFERENCES: dict[str, tuple[bytes, grpc.StatusCode, str]] = {
    "unknown model": (
        _request(model_name="iris"),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'iris': this server serves 'logreg-v1' version '1' (breast-cancer)",
    ),
    "wrong shape": (
        _request(shape=(2, 29)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'features': expected shape [batch, 30] with batch >= 1 (or [30] for one row), "
        "got [2, 29]",
    ),
    "INT64 datatype": (
        _request(datatype="INT64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'features': expected FP32 or FP64, got 'INT64'",
    ),
    "no datatype": (
        _request(datatype=""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'features': expected FP32 or FP64, got no datatype",
    ),
    "wrong input name": (
        _request(name="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected exactly one input tensor named 'features' (FP32 or FP64, shape [batch, 30]), "
        "got ['x']",
    ),
    "raw bytes too short": (
        _request(data=b"\x00" * 8),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'features': FP64 tensor of shape [2, 30] needs 480 raw bytes, got 8",
    ),
    "FP32 datatype, FP64 bytes": (
        _request(datatype="FP32"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'features': FP32 tensor of shape [2, 30] needs 240 raw bytes, got 480",
    ),
    "typed, too few values": (
        _typed_request(fp64_contents=[1.0] * 59),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'features': FP64 tensor of shape [2, 30] needs 60 fp64_contents values, has 59",
    ),
    "typed and raw at once": (
        _typed_request(fp64_contents=[1.0] * 60, raw=v2.encode_raw(np.ones((2, 30)), "FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'features' has contents and raw_input_contents; send one or the other",
    ),
    "NaN": (
        _request(data=v2.encode_raw(np.array([[1.0] * 30, [np.nan] * 30]), "FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "row 1 holds NaN or infinity",
    ),
    "unknown requested output": (
        _request(outputs=("score",)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown requested output 'score': this model's outputs are 'label', 'probabilities'",
    ),
    "undecodable": (
        b"\x0a\x05ab",
        grpc.StatusCode.INVALID_ARGUMENT,
        "request is not a valid inference.ModelInferRequest",
    ),
}


@pytest.mark.parametrize(
    ("data", "code", "message"), _BAD_INFERENCES.values(), ids=list(_BAD_INFERENCES)
)
async def test_bad_inference_requests_are_refused_clearly(
    logreg_v2: RunningModelServer, data: bytes, code: grpc.StatusCode, message: str
) -> None:
    async with aio.insecure_channel(logreg_v2.address) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(_METHOD.format("ModelInfer"))(data, timeout=5)
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    assert logreg_v2.received[-1].request_bytes == data  # recorded before validation


async def test_tritonclient_sees_the_server_errors(logreg_v2: RunningModelServer) -> None:
    def infer_unknown_model() -> InferenceServerException:
        with pytest.raises(InferenceServerException) as caught:
            _triton_infer(logreg_v2.address, np.ones((1, FEATURE_COUNT)), ["x"], model="iris")
        return caught.value

    def metadata_of_unknown_model() -> InferenceServerException:
        client = triton.InferenceServerClient(url=logreg_v2.address)
        try:
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("iris")
            return caught.value
        finally:
            client.close()

    for error in (
        await asyncio.to_thread(infer_unknown_model),
        await asyncio.to_thread(metadata_of_unknown_model),
    ):
        assert error.status() == "StatusCode.NOT_FOUND"
        assert "unknown model 'iris'" in (error.message() or "")


async def test_requested_outputs_and_the_id_fallback(logreg_v2: RunningModelServer) -> None:
    async with aio.insecure_channel(logreg_v2.address) as channel:
        infer = _unary(channel, "ModelInfer", v2.ModelInferResponse)
        reply = await infer(
            v2.ModelInferRequest.FromString(_request(outputs=("probabilities",))),
            metadata=[("x-request-id", "from-header")],
        )
    # Only the output asked for; no id in the request, so the x-request-id header's.
    assert [o.name for o in reply.outputs] == ["probabilities"]
    assert v2.response_outputs(reply)["probabilities"].shape == (2, 2)
    assert reply.id == "from-header"


async def test_faults_apply_to_inference_only() -> None:
    server = await start_model_server(
        ModelServerOptions(model="logreg-v1", protocol="v2", error_rate=1.0)
    )
    try:
        async with aio.insecure_channel(server.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await channel.unary_unary(_METHOD.format("ModelInfer"))(_request(), timeout=5)
            live = await _unary(channel, "ServerLive", v2.ServerLiveResponse)(
                v2.ServerLiveRequest(), timeout=5
            )
    finally:
        await server.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected failure" in (caught.value.details() or "")
    assert live.live is True
    assert server.calls == 1 and server.received[0].request_bytes == _request()


async def test_health_and_reflection_describe_the_v2_service(
    logreg_v2: RunningModelServer,
) -> None:
    async with aio.insecure_channel(logreg_v2.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=v2.SERVICE), timeout=5)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            # What grpcurl asks to describe or call a method, and to check health.
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=v2.SERVICE),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        ]
        listing, service_file, health_file = [
            reply async for reply in reflection.ServerReflectionInfo(iter(requests))
        ]
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert {s.name for s in listing.list_services_response.service} == {
        v2.SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    for reply in (service_file, health_file):
        assert not reply.HasField("error_response"), reply.error_response
        assert reply.file_descriptor_response.file_descriptor_proto


def test_cli_accepts_protocol_v2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args([]).protocol == "predict-v1"
    assert parser.parse_args(["--protocol", "v2"]).protocol == "v2"
    with pytest.raises(SystemExit):
        parser.parse_args(["--protocol", "v3"])
    assert "invalid choice: 'v3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown protocol 'v3'"):
        ModelServerOptions(protocol="v3")
