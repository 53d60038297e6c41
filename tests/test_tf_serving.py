"""TensorFlow Serving's protocol: tensors both ways, the codecs, and the proxy between
TF-Serving-protocol backends."""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from proxy.compare.pair import compare_replies
from proxy.protocols import REDACTED, codec_for, redact_named_tensors
from proxy.protocols import tf_serving as tf
from proxy.protocols.predict_v1 import json_float
from proxy.tensors import TensorError
from tests.backends import wait_for
from tests.tf_serving_backend import CLASSES, MODEL, VERSION, TfServingBackend, linear_model

OK = grpc.StatusCode.OK

# ------------------------------------------------------------------------ wire format


def test_field_numbers_and_enum_values_are_tensorflows() -> None:
    """The numbers TensorFlow publishes; a typo in the .proto would silently misread."""
    fields = {f.name: f.number for f in tf.TensorProto.DESCRIPTOR.fields}
    assert fields == {
        "dtype": 1,
        "tensor_shape": 2,
        "version_number": 3,
        "tensor_content": 4,
        "float_val": 5,
        "double_val": 6,
        "int_val": 7,
        "string_val": 8,
        "scomplex_val": 9,
        "int64_val": 10,
        "bool_val": 11,
        "dcomplex_val": 12,
        "half_val": 13,
        "uint32_val": 16,
        "uint64_val": 17,
    }
    assert {
        name: tf.TensorProto.DESCRIPTOR.fields_by_name[name].is_packed
        for name in ("float_val", "int_val", "half_val", "uint64_val", "bool_val")
    } == dict.fromkeys(("float_val", "int_val", "half_val", "uint64_val", "bool_val"), True)
    published = {
        "DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT16": 5,
        "DT_INT8": 6, "DT_STRING": 7, "DT_COMPLEX64": 8, "DT_INT64": 9, "DT_BOOL": 10,
        "DT_QINT8": 11, "DT_QUINT8": 12, "DT_QINT32": 13, "DT_BFLOAT16": 14,
        "DT_QINT16": 15, "DT_QUINT16": 16, "DT_UINT16": 17, "DT_COMPLEX128": 18,
        "DT_HALF": 19, "DT_UINT32": 22, "DT_UINT64": 23,
    }  # fmt: skip
    assert {name: getattr(tf, name) for name in published} == published
    assert {name: tf.data_type_name(number) for name, number in published.items()} == {
        name: name for name in published
    }
    spec = {f.name: f.number for f in tf.ModelSpec.DESCRIPTOR.fields}
    assert spec == {"name": 1, "version": 2, "signature_name": 3, "version_label": 4}
    assert {f.name: f.number for f in tf.PredictRequest.DESCRIPTOR.fields} == {
        "model_spec": 1,
        "inputs": 2,
        "output_filter": 3,
    }
    assert {f.name: f.number for f in tf.PredictResponse.DESCRIPTOR.fields} == {
        "outputs": 1,
        "model_spec": 2,
    }


def test_a_tensor_encodes_as_tensorflow_writes_it() -> None:
    # dtype=DT_FLOAT (field 1, varint), shape [2] (field 2 > dim 2 > size 1),
    # float_val packed (field 5, length-delimited): 1.0 and -2.0 little-endian.
    typed = tf.array_to_tensor(np.array([1.0, -2.0], np.float32), raw=False)
    assert typed.SerializeToString() == (
        b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x2a\x08\x00\x00\x80\x3f\x00\x00\x00\xc0"
    )
    raw = tf.array_to_tensor(np.array([1.0, -2.0], np.float32), raw=True)
    assert raw.SerializeToString() == (
        b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x22\x08\x00\x00\x80\x3f\x00\x00\x00\xc0"
    )


# ------------------------------------------------------------------ tensor <-> array

_STRINGS = np.empty(4, dtype=object)
_STRINGS[:] = [b"plain", "héllo".encode(), b"\xff\xfe not utf-8", b"nul\x00"]

# (array, explicit DataType or None, the DataType expected)
ROUND_TRIPS: list[tuple[np.ndarray[Any, Any], int | None, int]] = [
    (np.array([[1.5, -0.25, np.nan], [np.inf, -np.inf, 3e38]], np.float32), None, tf.DT_FLOAT),
    (np.array([0.1, -1e300, np.nan], np.float64), None, tf.DT_DOUBLE),
    (np.array([-(2**31), 0, 2**31 - 1], np.int32), None, tf.DT_INT32),
    (np.array([0, 7, 255], np.uint8), None, tf.DT_UINT8),
    (np.array([-32768, 0, 32767], np.int16), None, tf.DT_INT16),
    (np.array([-128, 0, 127], np.int8), None, tf.DT_INT8),
    (np.array([0, 1, 65535], np.uint16), None, tf.DT_UINT16),
    (np.array([-(2**63), 0, 2**63 - 1], np.int64), None, tf.DT_INT64),
    (np.array([0, 2**32 - 1], np.uint32), None, tf.DT_UINT32),
    (np.array([0, 2**64 - 1], np.uint64), None, tf.DT_UINT64),
    (np.array([[True, False], [False, True]]), None, tf.DT_BOOL),
    (np.array([0.5, -65504.0, np.inf, np.nan], np.float16), None, tf.DT_HALF),
    # Values that bfloat16 holds exactly; they come back as float32.
    (np.array([1.0, -0.5, 3.140625, 2.0**120, np.inf], np.float32), tf.DT_BFLOAT16, tf.DT_BFLOAT16),
    (np.array([1 + 2j, -3.5 - 0.25j], np.complex64), None, tf.DT_COMPLEX64),
    (np.array([[1e-300 + 1j], [np.nan - 2j]], np.complex128), None, tf.DT_COMPLEX128),
    (_STRINGS.reshape(2, 2), None, tf.DT_STRING),
    (np.array([-5, 5], np.int8), tf.DT_QINT8, tf.DT_QINT8),
    (np.array([0, 200], np.uint8), tf.DT_QUINT8, tf.DT_QUINT8),
    (np.array([-300, 300], np.int16), tf.DT_QINT16, tf.DT_QINT16),
    (np.array([0, 60000], np.uint16), tf.DT_QUINT16, tf.DT_QUINT16),
    (np.array([-(2**31), 2**31 - 1], np.int32), tf.DT_QINT32, tf.DT_QINT32),
    (np.zeros((2, 0, 3), np.float32), None, tf.DT_FLOAT),
    (np.array(2.5, np.float64), None, tf.DT_DOUBLE),
]


@pytest.mark.parametrize("raw", [True, False], ids=["tensor_content", "typed"])
@pytest.mark.parametrize(
    ("array", "dtype", "expected"),
    ROUND_TRIPS,
    ids=[f"{tf.data_type_name(e)}-{a.dtype}-{a.shape}" for a, _, e in ROUND_TRIPS],
)
def test_every_dtype_round_trips(
    array: np.ndarray[Any, Any], dtype: int | None, expected: int, raw: bool
) -> None:
    tensor = tf.array_to_tensor(array, dtype, raw=raw)
    assert tensor.dtype == expected
    assert [d.size for d in tensor.tensor_shape.dim] == list(array.shape)
    # One representation only: tensor_content, or the typed field.
    filled = {f.name for f, _ in tensor.ListFields()} - {"dtype", "tensor_shape"}
    if array.size:
        assert (filled == {"tensor_content"}) is raw
    # Through the wire and back.
    back = tf.tensor_to_array(tf.TensorProto.FromString(tensor.SerializeToString()))
    assert back.shape == array.shape
    if expected == tf.DT_BFLOAT16:
        assert back.dtype == np.float32
    else:
        assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    if expected == tf.DT_STRING:
        assert all(type(v) is bytes for v in back.ravel())


def test_lists_of_str_and_bytes_become_strings() -> None:
    tensor = tf.array_to_tensor(["héllo", b"\xff", b"nul\x00"], raw=False)
    assert tensor.dtype == tf.DT_STRING
    assert list(tensor.string_val) == ["héllo".encode(), b"\xff", b"nul\x00"]


def test_bfloat16_rounds_to_nearest_even() -> None:
    halfway_down = 1 + 2**-8  # between 1.0 (even) and 1.0078125
    halfway_up = 1 + 3 * 2**-8  # between 1.0078125 (odd) and 1.015625 (even)
    values = np.array([halfway_down, halfway_up, 1 + 2**-7 + 2**-10, np.nan, -np.nan], np.float32)
    tensor = tf.array_to_tensor(values, tf.DT_BFLOAT16, raw=False)
    assert list(tensor.half_val)[:3] == [0x3F80, 0x3F82, 0x3F81]
    back = tf.tensor_to_array(tensor)
    assert back[:3].tolist() == [1.0, 1.015625, 1.0078125]
    assert np.isnan(back[3:]).all()
    assert np.signbit(back[4]) and not np.signbit(back[3])


def test_typed_values_are_padded_with_the_last_one_as_tensorflow_does() -> None:
    tensor: Any = tf.TensorProto(dtype=tf.DT_FLOAT)
    for size in (2, 3):
        tensor.tensor_shape.dim.add(size=size)
    tensor.float_val.append(7.0)
    np.testing.assert_array_equal(tf.tensor_to_array(tensor), np.full((2, 3), 7.0, np.float32))
    tensor.float_val.extend([1.0, 2.0])
    assert tf.tensor_to_array(tensor).ravel().tolist() == [7, 1, 2, 2, 2, 2]
    # No values at all: zeros. More than the shape holds: the rest is ignored.
    del tensor.float_val[:]
    np.testing.assert_array_equal(tf.tensor_to_array(tensor), np.zeros((2, 3), np.float32))
    tensor.float_val.extend(range(10))
    assert tf.tensor_to_array(tensor).ravel().tolist() == [0, 1, 2, 3, 4, 5]

    strings: Any = tf.TensorProto(dtype=tf.DT_STRING)
    strings.tensor_shape.dim.add(size=3)
    strings.string_val.append(b"same")
    assert tf.tensor_to_array(strings).tolist() == [b"same"] * 3
    complex_: Any = tf.TensorProto(dtype=tf.DT_COMPLEX64)
    complex_.tensor_shape.dim.add(size=2)
    complex_.scomplex_val.extend([1.0, -1.0])
    assert tf.tensor_to_array(complex_).tolist() == [1 - 1j, 1 - 1j]
    # No shape at all: a scalar.
    scalar: Any = tf.TensorProto(dtype=tf.DT_INT64, int64_val=[42])
    assert tf.tensor_to_array(scalar).shape == ()
    assert tf.tensor_to_array(scalar).item() == 42


def _tensor(dtype: int, shape: tuple[int, ...], **fields: Any) -> Any:
    tensor: Any = tf.TensorProto(dtype=dtype, **fields)
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    return tensor


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_tensor(tf.DT_INVALID, (1,), float_val=[1.0]), "DT_INVALID"),
        (_tensor(99, (1,)), r"DataType\(99\)"),
        (_tensor(tf.DT_FLOAT, (3,), tensor_content=b"\x00" * 8), "8 bytes"),
        (_tensor(tf.DT_FLOAT, (-1,), float_val=[1.0]), "negative dimension"),
        (_tensor(tf.DT_FLOAT, (1 << 30,), float_val=[1.0]), "not padding"),
        (_tensor(tf.DT_COMPLEX64, (1,), scomplex_val=[1.0, 2.0, 3.0]), "odd number"),
        (_tensor(tf.DT_STRING, (2,), tensor_content=b"\x01\x01ab c"), "bytes of data"),
        (_tensor(tf.DT_STRING, (2,), tensor_content=b"\x01"), "length prefix"),
        # Empty, yet no numpy array has this shape: TensorError, not numpy's ValueError.
        (_tensor(tf.DT_FLOAT, (0, 2**62, 2**62)), "too large for an array"),
        (_tensor(tf.DT_STRING, (2**62, 0, 2**62)), "too large for an array"),
        (_tensor(tf.DT_COMPLEX128, (0, 2**59)), "too large for an array"),
        (_tensor(tf.DT_FLOAT, (1,) * 33, float_val=[1.0]), "33 dimensions"),
    ],
    ids=[
        "invalid",
        "unknown",
        "content-size",
        "negative",
        "huge",
        "odd-complex",
        "str-size",
        "varint",
        "empty-huge",
        "empty-huge-strings",
        "empty-huge-complex",
        "rank",
    ],
)
def test_bad_tensors_raise_tensor_error(tensor: Any, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        tf.tensor_to_array(tensor)


def test_unknown_rank_and_unencodable_arrays_raise_tensor_error() -> None:
    tensor: Any = tf.TensorProto(dtype=tf.DT_FLOAT)
    tensor.tensor_shape.unknown_rank = True
    with pytest.raises(TensorError, match="unknown rank"):
        tf.tensor_to_array(tensor)
    with pytest.raises(TensorError, match="pass dtype="):
        tf.array_to_tensor(np.array(["2020-01-01"], "datetime64[D]"), raw=True)
    with pytest.raises(TensorError, match="str or bytes"):
        tf.array_to_tensor(np.array([1, "a"], dtype=object), raw=False)
    with pytest.raises(TensorError, match="cannot encode"):
        tf.array_to_tensor(np.array([1]), 99, raw=True)


# ----------------------------------------------------------------------------- codecs


def _request(**inputs: Any) -> Any:
    request: Any = tf.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.version.value = VERSION
    for name, (array, raw) in inputs.items():
        request.inputs[name].CopyFrom(tf.array_to_tensor(array, raw=raw))
    return request


def test_predict_payload_is_readable_json() -> None:
    codec = codec_for(tf.PREDICT)
    assert isinstance(codec, tf.PredictCodec)
    assert codec.request_type == "tensorflow.serving.PredictRequest"
    request = _request(
        x=(np.array([[1.0, np.nan]], np.float32), True),
        words=(np.array([b"hi", "é".encode()], dtype=object), False),
        blob=(np.array([b"\xff"], dtype=object), True),
        ids=(np.array([2**63 - 1], np.int64), False),
    )
    request.output_filter.append("label")
    request.inputs["bad"].CopyFrom(_tensor(tf.DT_FLOAT, (2,), tensor_content=b"\x00"))
    payload = codec.payload(request.SerializeToString(), reply=False)
    assert payload == {
        "model_spec": {"name": MODEL, "version": VERSION},
        "inputs": [
            {
                "name": "bad",
                "dtype": "DT_FLOAT",
                "shape": [2],
                "error": "DT_FLOAT tensor of 2 values has 1 bytes of tensor_content, not 8",
            },
            {
                "name": "blob",
                "dtype": "DT_STRING",
                "shape": [1],
                "encoding": "base64",
                "contents": ["/w=="],
            },
            {"name": "ids", "dtype": "DT_INT64", "shape": [1], "contents": [2**63 - 1]},
            {
                "name": "words",
                "dtype": "DT_STRING",
                "shape": [2],
                "encoding": "utf-8",
                "contents": ["hi", "é"],
            },
            {"name": "x", "dtype": "DT_FLOAT", "shape": [1, 2], "contents": [1.0, "NaN"]},
        ],
        "output_filter": ["label"],
    }
    json.dumps(payload, allow_nan=False)  # JSON-ready: no bytes, no numpy scalars, no NaN
    redact_named_tensors(payload, frozenset({"x"}))
    assert payload["inputs"][-1]["contents"] == REDACTED


def test_predict_payload_of_every_dtype_is_json_ready() -> None:
    reply: Any = tf.PredictResponse()
    for index, (array, dtype, _) in enumerate(ROUND_TRIPS):
        reply.outputs[f"t{index}"].CopyFrom(tf.array_to_tensor(array, dtype, raw=index % 2 == 0))
    payload = tf.PredictCodec().payload(reply.SerializeToString(), reply=True)
    assert payload is not None
    json.dumps(payload, allow_nan=False)
    outputs = {t["name"]: t for t in payload["outputs"]}
    assert outputs["t13"]["contents"] == [[1.0, 2.0], [-3.5, -0.25]]
    assert outputs["t11"]["contents"] == [0.5, -65504.0, "Infinity", "NaN"]
    assert outputs["t12"]["dtype"] == "DT_BFLOAT16"
    assert outputs["t12"]["contents"] == [
        1.0,
        -0.5,
        3.140625,
        json_float(2.0**120, True),
        "Infinity",
    ]


def test_undecodable_bytes_give_no_payload_and_no_outputs() -> None:
    codec = tf.PredictCodec()
    assert codec.payload(b"\xff\xff\xff", reply=False) is None
    assert codec.payload(b"\xff\xff\xff", reply=True) is None
    assert codec.outputs(b"\xff\xff\xff") is None
    reply: Any = tf.PredictResponse()
    reply.outputs["scores"].CopyFrom(_tensor(tf.DT_FLOAT, (2,), tensor_content=b"\x00"))
    assert codec.outputs(reply.SerializeToString()) is None
    assert tf.GetModelMetadataCodec().payload(b"\xff\xff\xff", reply=True) is None


def test_outputs_are_arrays_and_strings_are_not_numeric() -> None:
    scores, labels = linear_model(np.array([[1.0, 2.0, 3.0]], np.float32))
    reply: Any = tf.PredictResponse()
    reply.outputs["scores"].CopyFrom(tf.array_to_tensor(scores, raw=True))
    reply.outputs["label"].CopyFrom(tf.array_to_tensor(labels, raw=False))
    reply.outputs["z"].CopyFrom(tf.array_to_tensor(np.array([1 + 2j], np.complex64), raw=False))
    outputs = tf.PredictCodec().outputs(reply.SerializeToString())
    assert outputs is not None
    assert outputs.numeric == frozenset({"scores", "z"})
    np.testing.assert_array_equal(outputs.arrays["scores"], scores)
    assert outputs.arrays["label"].tolist() == labels.tolist()
    # Complex outputs compare as (real, imaginary) pairs.
    assert outputs.arrays["z"].tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_a_complex_scalar_compares_part_by_part_typed_or_raw(dtype: Any) -> None:
    def reply(value: complex, raw: bool) -> bytes:
        message: Any = tf.PredictResponse()
        message.outputs["z"].CopyFrom(tf.array_to_tensor(np.array(value, dtype), raw=raw))
        return bytes(message.SerializeToString())

    for raw in (False, True):
        outputs = tf.PredictCodec().outputs(reply(1 + 2j, raw))
        assert outputs is not None and outputs.numeric == frozenset({"z"})
        assert outputs.arrays["z"].shape == (2,)
        assert outputs.arrays["z"].tolist() == [1.0, 2.0]
    same = compare_replies(tf.PREDICT, OK, reply(1 + 2j, False), OK, reply(1 + 2j, True), 0.0)
    assert same.compared and same.agree is True and same.max_abs_diff == 0.0
    close = compare_replies(tf.PREDICT, OK, reply(1 + 2j, True), OK, reply(1.25 + 1.5j, False), 0.6)
    assert close.agree is True and close.max_abs_diff == 0.5
    far = compare_replies(tf.PREDICT, OK, reply(1 + 2j, True), OK, reply(1 + 3j, False), 0.6)
    assert far.agree is False and far.differing_outputs == ("z",)


def test_a_tensor_no_array_can_hold_loses_only_its_own_contents() -> None:
    request = _request(x=(np.array([1.0, 2.0], np.float32), True))
    request.inputs["empty"].CopyFrom(_tensor(tf.DT_FLOAT, (0, 2**62, 2**62)))
    payload = tf.PredictCodec().payload(request.SerializeToString(), reply=False)
    assert payload is not None
    assert payload["inputs"] == [
        {
            "name": "empty",
            "dtype": "DT_FLOAT",
            "shape": [0, 2**62, 2**62],
            "error": f"tensor shape {[0, 2**62, 2**62]} is too large for an array",
        },
        {"name": "x", "dtype": "DT_FLOAT", "shape": [2], "contents": [1.0, 2.0]},
    ]
    reply: Any = tf.PredictResponse()
    reply.outputs["empty"].CopyFrom(_tensor(tf.DT_FLOAT, (0, 2**62, 2**62)))
    assert tf.PredictCodec().outputs(reply.SerializeToString()) is None


def test_a_tensor_that_fails_to_decode_for_any_reason_keeps_the_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decode = tf.tensor_to_array

    def failing_on_doubles(tensor: Any) -> np.ndarray[Any, Any]:
        if tensor.dtype == tf.DT_DOUBLE:
            raise RuntimeError("a bug")
        return decode(tensor)

    monkeypatch.setattr(tf, "tensor_to_array", failing_on_doubles)
    request = _request(a=(np.array([0.5]), False), b=(np.array(["hi"], dtype=object), True))
    payload = tf.PredictCodec().payload(request.SerializeToString(), reply=False)
    assert payload is not None
    assert payload["inputs"] == [
        {"name": "a", "dtype": "DT_DOUBLE", "shape": [1], "error": "RuntimeError: a bug"},
        {
            "name": "b",
            "dtype": "DT_STRING",
            "shape": [1],
            "encoding": "utf-8",
            "contents": ["hi"],
        },
    ]


# ------------------------------------------------------------------ through the proxy


async def _call(channel: aio.Channel, method: str, body: bytes, request_id: str) -> bytes:
    reply: bytes = await channel.unary_unary(method)(body, metadata=(("x-request-id", request_id),))
    return reply


async def test_predict_through_the_proxy_is_recorded_decoded_and_compared(make_proxy) -> None:
    production = await TfServingBackend(raw=True).start()
    shadows = {
        # The same model with typed replies: the bytes differ, the values do not.
        "twin": await TfServingBackend(raw=False).start(),
        "close": await TfServingBackend(perturbation=(0.001, 0.001, 0.001)).start(),
        "far": await TfServingBackend(perturbation=(0.0, 0.0, 5.0)).start(),
    }
    backends = [production, *shadows.values()]
    try:
        proxy, spans = await make_proxy(
            f"production={production.address}",
            [f"{name}={backend.address}" for name, backend in shadows.items()],
            tolerance=0.01,
        )
        x = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
        body = _request(x=(x, True)).SerializeToString()
        async with (
            aio.insecure_channel(proxy.address) as via_proxy,
            aio.insecure_channel(production.address) as direct,
        ):
            reply = await _call(via_proxy, tf.PREDICT, body, "tf-1")
            assert reply == await _call(direct, tf.PREDICT, body, "direct")
            metadata_body = tf.GetModelMetadataRequest(metadata_field=["signature_def"])
            metadata_body.model_spec.name = MODEL
            metadata_request = metadata_body.SerializeToString()
            metadata_reply = await _call(via_proxy, tf.GET_MODEL_METADATA, metadata_request, "md")
            assert metadata_reply == await _call(
                direct, tf.GET_MODEL_METADATA, metadata_request, "direct-md"
            )
        await wait_for(lambda: all(b.calls["Predict"] == 1 for b in shadows.values()))
        await wait_for(lambda: not any(proxy.shadows.in_flight().values()))
        assert proxy.recorder.flush()
        finished = [
            s for s in spans.get_finished_spans() if s.attributes.get("shadow.request_id") == "tf-1"
        ]
    finally:
        for backend in backends:
            await backend.stop()
    assert production.calls["Predict"] == 2  # the proxied call and the direct one

    by_name = {s.name: s for s in finished}
    root = by_name["tensorflow.serving.PredictionService/Predict"]
    (request_event,) = [e for e in root.events if e.name == "request"]
    assert request_event.attributes["payload.encoding"] == "json"
    assert request_event.attributes["message.type"] == "tensorflow.serving.PredictRequest"
    assert json.loads(request_event.attributes["payload"]) == {
        "model_spec": {"name": MODEL, "version": VERSION},
        "inputs": [
            {"name": "x", "dtype": "DT_FLOAT", "shape": [2, 3], "contents": x.ravel().tolist()}
        ],
    }
    scores, labels = linear_model(x)
    (reply_event,) = [e for e in by_name["production production"].events if e.name == "response"]
    assert reply_event.attributes["payload.encoding"] == "json"
    assert reply_event.attributes["message.type"] == "tensorflow.serving.PredictResponse"
    reply_payload = json.loads(reply_event.attributes["payload"])
    assert reply_payload["model_spec"] == {
        "name": MODEL,
        "version": VERSION,
        "signature_name": "serving_default",
    }
    assert reply_payload["outputs"] == [
        {
            "name": "label",
            "dtype": "DT_STRING",
            "shape": [2],
            "encoding": "utf-8",
            "contents": ["class-0", "class-1"],
        },
        {
            "name": "scores",
            "dtype": "DT_FLOAT",
            "shape": [2, 3],
            "contents": [json_float(v, True) for v in scores.ravel().tolist()],
        },
    ]
    assert labels.tolist() == [CLASSES[0].encode(), CLASSES[1].encode()]

    twin = by_name["shadow twin"].attributes
    assert twin["shadow.compared"] is True
    assert twin["shadow.agree"] is True
    assert twin["shadow.max_abs_diff"] == 0.0
    assert twin["shadow.differing_outputs"] == ()

    close = by_name["shadow close"].attributes
    assert close["shadow.agree"] is True
    assert close["shadow.max_abs_diff"] == pytest.approx(0.001, abs=1e-6)
    assert close["shadow.differing_outputs"] == ()

    far_scores, far_labels = linear_model(x, (0.0, 0.0, 5.0))
    far = by_name["shadow far"].attributes
    assert far_labels.tolist() != labels.tolist()
    assert far["shadow.agree"] is False
    assert far["shadow.max_abs_diff"] == pytest.approx(float(np.abs(far_scores - scores).max()))
    assert far["shadow.differing_outputs"] == ("label", "scores")


async def test_get_model_metadata_payload_shows_the_signatures() -> None:
    backend = await TfServingBackend().start()
    try:
        request: Any = tf.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = MODEL
        async with aio.insecure_channel(backend.address) as channel:
            reply = await channel.unary_unary(tf.GET_MODEL_METADATA)(request.SerializeToString())
    finally:
        await backend.stop()
    codec = codec_for(tf.GET_MODEL_METADATA)
    assert codec is not None
    assert codec.payload(request.SerializeToString(), reply=False) == {
        "model_spec": {"name": MODEL},
        "metadata_field": ["signature_def"],
    }
    payload = codec.payload(reply, reply=True)
    assert payload is not None
    signature = payload["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"] == [
        {"name": "x", "dtype": "DT_FLOAT", "tensor_name": "x:0", "shape": [-1, 3]}
    ]
    assert [o["name"] for o in signature["outputs"]] == ["label", "scores"]


async def test_the_backend_rejects_a_request_without_x() -> None:
    backend = await TfServingBackend().start()
    try:
        async with aio.insecure_channel(backend.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await channel.unary_unary(tf.PREDICT)(tf.PredictRequest().SerializeToString())
    finally:
        await backend.stop()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert backend.calls == {"Predict": 1}
