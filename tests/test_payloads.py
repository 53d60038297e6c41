"""Pure helpers of the request path: payload and metadata attributes for span events,
W3C trace headers, the metadata forwarded to backends, and where a status came from."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from proxy.fanout import parse_traceparent, split_metadata
from proxy.gen import predict_pb2
from proxy.payloads import REDACTED, PayloadCodec, metadata_attributes
from proxy.upstream import came_from_backend

PREDICT = "/predict.v1.PredictionService/Predict"
SECRET = b"123-45-6789"


def _request() -> predict_pb2.PredictRequest:
    return predict_pb2.PredictRequest(
        model_name="breast-cancer",
        model_version="2",
        request_id="req-1",
        inputs=[
            predict_pb2.Tensor(
                name="features",
                dtype=predict_pb2.DATA_TYPE_FP32,
                shape=[1, 3],
                contents=predict_pb2.TensorContents(fp32_contents=[0.5, 1.5, -2.25]),
            ),
            predict_pb2.Tensor(
                name="ssn",
                dtype=predict_pb2.DATA_TYPE_BYTES,
                shape=[1],
                contents=predict_pb2.TensorContents(bytes_contents=[SECRET]),
            ),
        ],
        parameters={"threshold": "0.5", "note": "café ☕"},
    )


def _response() -> predict_pb2.PredictResponse:
    return predict_pb2.PredictResponse(
        model_name="breast-cancer",
        model_version="2",
        request_id="req-1",
        outputs=[
            predict_pb2.Tensor(
                name="label",
                dtype=predict_pb2.DATA_TYPE_INT64,
                shape=[1],
                contents=predict_pb2.TensorContents(int64_contents=[1]),
            ),
            predict_pb2.Tensor(
                name="probabilities",
                dtype=predict_pb2.DATA_TYPE_FP64,
                shape=[1, 2],
                contents=predict_pb2.TensorContents(fp64_contents=[0.125, 0.875]),
            ),
        ],
    )


# --------------------------------------------------------------------------- payload events


@pytest.mark.parametrize(
    ("message", "reply", "type_name"),
    [
        (_request(), False, "predict.v1.PredictRequest"),
        (_response(), True, "predict.v1.PredictResponse"),
    ],
)
def test_known_message_is_recorded_as_json(
    message: predict_pb2.PredictRequest | predict_pb2.PredictResponse, reply: bool, type_name: str
) -> None:
    data = message.SerializeToString()
    attributes = PayloadCodec(max_bytes=65536).event_attributes(PREDICT, data, reply=reply)
    assert attributes["payload.encoding"] == "json"
    assert attributes["message.type"] == type_name
    assert attributes["payload.size"] == len(data)
    assert attributes["payload.truncated"] is False
    assert "payload.decode_error" not in attributes
    parsed_back = json_format.ParseDict(json.loads(attributes["payload"]), type(message)())
    assert parsed_back == message


def test_unknown_method_is_recorded_as_base64_of_the_exact_bytes() -> None:
    data = b"\x00\xff raw bytes \x80"
    attributes = PayloadCodec(max_bytes=65536).event_attributes(
        "/other.v1.Service/Call", data, reply=False
    )
    assert attributes["payload.encoding"] == "base64"
    assert base64.b64decode(attributes["payload"], validate=True) == data
    assert attributes["payload.truncated"] is False
    assert attributes["payload.size"] == len(data)
    assert "message.type" not in attributes
    assert "payload.decode_error" not in attributes


def test_known_method_with_undecodable_bytes_is_base64_with_a_decode_error() -> None:
    data = b"\x0a\x05ab"  # field 1 claims five bytes, two follow
    with pytest.raises(DecodeError):
        predict_pb2.PredictRequest.FromString(data)
    attributes = PayloadCodec(max_bytes=65536).event_attributes(PREDICT, data, reply=False)
    assert attributes["payload.encoding"] == "base64"
    assert attributes["payload.decode_error"] is True
    assert base64.b64decode(attributes["payload"], validate=True) == data
    assert "message.type" not in attributes


def test_undecodable_bytes_are_not_recorded_when_tensors_are_redacted() -> None:
    # A valid request with trailing junk: base64 of it would reveal the redacted tensor.
    data = _request().SerializeToString() + b"\x0a\x05ab"
    codec = PayloadCodec(max_bytes=65536, redact_tensors=["features"])
    attributes = codec.event_attributes(PREDICT, data, reply=False)
    assert attributes["payload.decode_error"] is True
    assert attributes["payload.encoding"] == "redacted"
    assert base64.b64encode(data).decode() not in attributes["payload"]


def test_json_payload_is_cut_at_max_bytes() -> None:
    data = _request().SerializeToString()
    full = PayloadCodec(max_bytes=1 << 20).event_attributes(PREDICT, data, reply=False)
    full_bytes = full["payload"].encode("utf-8")
    assert not full_bytes.isascii(), "the payload should hold multi-byte characters to cut"
    # Every cap, including ones that fall inside a multi-byte character.
    for cap in range(1, len(full_bytes) + 2):
        attributes = PayloadCodec(max_bytes=cap).event_attributes(PREDICT, data, reply=False)
        cut = attributes["payload"].encode("utf-8")
        assert len(cut) <= cap
        assert full_bytes.startswith(cut)
        assert attributes["payload.truncated"] is (len(full_bytes) > cap), cap
        assert attributes["payload.size"] == len(data)


def test_base64_payload_is_cut_at_max_bytes() -> None:
    data = bytes(range(256)) * 2
    full_text = base64.b64encode(data).decode("ascii")
    codec_method = "/other.v1.Service/Call"
    for cap in range(1, len(full_text) + 2):
        attributes = PayloadCodec(max_bytes=cap).event_attributes(codec_method, data, reply=False)
        text = attributes["payload"]
        assert len(text) <= cap
        assert data.startswith(base64.b64decode(text, validate=True))
        assert attributes["payload.truncated"] is (len(full_text) > cap), cap


def _tensors(attributes: dict[str, Any], field: str) -> dict[str, Any]:
    return {tensor["name"]: tensor for tensor in json.loads(attributes["payload"])[field]}


def test_named_tensor_contents_are_redacted() -> None:
    request, response = _request(), _response()
    plain = PayloadCodec(max_bytes=65536)
    redacting = PayloadCodec(max_bytes=65536, redact_tensors=["ssn", "probabilities"])

    recorded = redacting.event_attributes(PREDICT, request.SerializeToString(), reply=False)
    inputs = _tensors(recorded, "inputs")
    assert inputs["ssn"]["contents"] == REDACTED == "[REDACTED]"
    assert inputs["ssn"]["shape"] == ["1"]
    assert base64.b64encode(SECRET).decode() not in recorded["payload"]
    unredacted = plain.event_attributes(PREDICT, request.SerializeToString(), reply=False)
    assert inputs["features"] == _tensors(unredacted, "inputs")["features"]

    recorded = redacting.event_attributes(PREDICT, response.SerializeToString(), reply=True)
    outputs = _tensors(recorded, "outputs")
    assert outputs["probabilities"]["contents"] == REDACTED
    assert outputs["label"]["contents"] == {"int64_contents": ["1"]}


def test_metadata_attributes_redact_keys_and_encode_binary_values() -> None:
    metadata = (
        ("authorization", "Bearer secret"),
        ("x-api-key", b"binary-secret"),
        ("x-tenant", "acme"),
        ("x-tenant", "beta"),
        ("trace-bin", b"\x00\x01\xfe"),
    )
    attributes = metadata_attributes(
        "rpc.grpc.request.metadata", metadata, frozenset({"authorization", "x-api-key"})
    )
    assert attributes == {
        "rpc.grpc.request.metadata.authorization": (REDACTED,),
        "rpc.grpc.request.metadata.x-api-key": (REDACTED,),
        "rpc.grpc.request.metadata.x-tenant": ("acme", "beta"),
        "rpc.grpc.request.metadata.trace-bin": ("AAH+",),
    }


# --------------------------------------------------------------------------- traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)),
        (f"00-{TRACE_ID}-{SPAN_ID}-00", (int(TRACE_ID, 16), int(SPAN_ID, 16), 0)),
        (f"  {VALID}  ", (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)),
        # A later version may append fields; the first four are read as version 00's.
        (f"cc-{TRACE_ID}-{SPAN_ID}-01-what-comes-next", (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)),
    ],
)
def test_valid_traceparent_is_parsed(header: str, expected: tuple[int, int, int]) -> None:
    assert parse_traceparent(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("", id="empty"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}", id="three-parts"),
        pytest.param(f"0-{TRACE_ID}-{SPAN_ID}-01", id="short-version"),
        pytest.param(f"000-{TRACE_ID}-{SPAN_ID}-01", id="long-version"),
        pytest.param(f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", id="short-trace-id"),
        pytest.param(f"00-{TRACE_ID}0-{SPAN_ID}-01", id="long-trace-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID[:-1]}-01", id="short-span-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}0-01", id="long-span-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-1", id="short-flags"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-001", id="long-flags"),
        pytest.param(f"00-{'0' * 32}-{SPAN_ID}-01", id="zero-trace-id"),
        pytest.param(f"00-{TRACE_ID}-{'0' * 16}-01", id="zero-span-id"),
        pytest.param(f"ff-{TRACE_ID}-{SPAN_ID}-01", id="version-ff"),
        pytest.param(f"00-{'z' * 32}-{SPAN_ID}-01", id="non-hex-trace-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID[:-1]}g-01", id="non-hex-span-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-0g", id="non-hex-flags"),
    ],
)
def test_malformed_traceparent_is_none(header: str) -> None:
    assert parse_traceparent(header) is None


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(f"zz-{TRACE_ID}-{SPAN_ID}-01", id="non-hex-version"),
        pytest.param(f"00-0x{TRACE_ID[2:]}-{SPAN_ID}-01", id="0x-prefixed-trace-id"),
        pytest.param(f"00-{TRACE_ID[:8]}_{TRACE_ID[9:]}-{SPAN_ID}-01", id="underscore-in-trace-id"),
        pytest.param(f"00-{TRACE_ID}- {SPAN_ID[1:]}-01", id="space-in-span-id"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-+1", id="signed-flags"),
        pytest.param(f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", id="upper-case-trace-id"),
        pytest.param(f"{VALID}-extra", id="version-00-with-a-fifth-field"),
    ],
)
def test_traceparent_that_is_not_lowercase_hex_is_none(header: str) -> None:
    assert parse_traceparent(header) is None


# --------------------------------------------------------------------------- forwarded metadata


def test_split_metadata_drops_transport_and_trace_headers() -> None:
    received = (
        (":authority", "proxy:50051"),
        ("user-agent", "grpc-python/1.70"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("grpc-timeout", "1S"),
        ("grpc-accept-encoding", "identity,deflate,gzip"),
        ("traceparent", VALID),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-request-id", "req-7"),
        ("x-tenant", "acme"),
        ("x-trace-bin", b"\x00\x01"),
    )
    forwarded, request_id, traceparent, tracestate = split_metadata(received)
    assert forwarded == [
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-request-id", "req-7"),
        ("x-tenant", "acme"),
        ("x-trace-bin", b"\x00\x01"),
    ]
    assert request_id == "req-7"
    assert traceparent == VALID
    assert tracestate == "congo=t61rcWkgMzE"


def test_split_metadata_without_id_or_trace_headers() -> None:
    forwarded, request_id, traceparent, tracestate = split_metadata((("x-tenant", "acme"),))
    assert forwarded == [("x-tenant", "acme")]
    assert (request_id, traceparent, tracestate) == ("", None, None)


# --------------------------------------------------------------------------- status origin


def _error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "details", "from_backend"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: x", False),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False),
        (grpc.StatusCode.UNAVAILABLE, "model is warming up", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "model took too long", True),
        (grpc.StatusCode.CANCELLED, "Cancelled", False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota used up", True),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad input", True),
        (grpc.StatusCode.NOT_FOUND, "", True),
    ],
)
def test_came_from_backend_tells_channel_statuses_apart(
    code: grpc.StatusCode, details: str, from_backend: bool
) -> None:
    assert came_from_backend(_error(code, details)) is from_backend


def _random_message(rng: Any, response: bool) -> Any:
    cls = predict_pb2.PredictResponse if response else predict_pb2.PredictRequest
    message = cls(
        model_name=rng.choice(["", "m", "ünï"]),
        model_version=rng.choice(["", "2"]),
        request_id=rng.choice(["", "r-1"]),
    )
    if rng.random() < 0.5:
        message.parameters["threshold"] = "0.5"
    tensors = message.outputs if response else message.inputs
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 0.1, 1e-7, 3.4e38, 123456.789]
    for index in range(rng.randint(0, 3)):
        tensor = tensors.add(name=rng.choice(["", f"t{index}"]), dtype=rng.randint(0, 7))
        tensor.shape.extend(rng.sample(range(1, 9), rng.randint(0, 2)))
        if rng.random() < 0.8:
            contents = tensor.contents
            contents.SetInParent()
            n = rng.randint(0, 4)
            contents.fp32_contents.extend(rng.choice([*specials, rng.random()]) for _ in range(n))
            contents.fp64_contents.extend(rng.choice([*specials, rng.random()]) for _ in range(n))
            contents.int64_contents.extend(rng.randint(-(2**63), 2**63 - 1) for _ in range(n))
            contents.int32_contents.extend(rng.randint(-(2**31), 2**31 - 1) for _ in range(n))
            contents.bool_contents.extend(rng.random() < 0.5 for _ in range(n))
            contents.bytes_contents.extend(rng.randbytes(rng.randint(0, 5)) for _ in range(n))
    return message


def test_fast_predict_conversion_equals_message_to_dict() -> None:
    import random

    from proxy.protocols.predict_v1 import predict_dict as _predict_dict

    rng = random.Random(7)
    for _ in range(500):
        message = _random_message(rng, response=rng.random() < 0.5)
        expected = json_format.MessageToDict(message, preserving_proto_field_name=True)
        assert _predict_dict(message) == expected, message
    codec = PayloadCodec(max_bytes=1 << 20)
    request = _random_message(rng, response=False)
    request.inputs.add(name="x", dtype=predict_pb2.DATA_TYPE_FP32).contents.fp32_contents.append(
        0.9
    )
    decoded = codec.decode(PREDICT, request.SerializeToString(), reply=False)
    assert decoded == json_format.MessageToDict(request, preserving_proto_field_name=True)
