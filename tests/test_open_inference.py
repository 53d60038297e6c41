"""The Open Inference Protocol: its wire format, tensors of every datatype, the ModelInfer codec."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from proxy.compare.pair import compare_replies, decode_outputs, predicted_labels
from proxy.payloads import REDACTED, PayloadCodec
from proxy.protocols import codec_for, known_codecs, serving_pool
from proxy.protocols import open_inference as oi
from proxy.tensors import TensorError

OK = grpc.StatusCode.OK

# One array per datatype, with the edge values the type has. BF16 values are exact in
# bfloat16, so that encoding does not round them.
SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 1, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 1, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, -1, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), -1, 0, 2**15 - 1], dtype=np.int16),
    "INT32": np.array([[-(2**31), -1], [0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([-(2**63), -1, 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.0, -0.0, 0.1, 65504.0, 6e-8, np.inf, -np.inf, np.nan], dtype=np.float16),
    "FP32": np.array(
        [[0.0, -0.0, 0.1, np.finfo(np.float32).max], [1e-45, np.inf, -np.inf, np.nan]],
        dtype=np.float32,
    ),
    "FP64": np.array([0.0, -0.0, 0.1, 1.7976931348623157e308, 5e-324, np.inf, -np.inf, np.nan]),
    "BF16": np.array([[1.0, -2.0, 3.140625], [0.0, np.inf, np.nan]], dtype=np.float32),
    "BYTES": np.array([b"", b"a\x00b", "héllo".encode(), b"\x00\x00", b"\xff\xfe"], dtype=object),
}
EMPTY_DTYPES = {name: array.dtype for name, array in SAMPLES.items()}
TYPED = [name for name in oi.DATATYPES if name not in ("FP16", "BF16")]


def assert_same(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> None:
    """Same shape, dtype and values, bit for bit (NaN, -0.0 included)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.tobytes() == expected.tobytes()


def test_every_datatype_of_the_protocol_is_known() -> None:
    assert set(oi.DATATYPES) == set(SAMPLES)


# ------------------------------------------------------------------------ wire format
# Field numbers and types as the published protocol description gives them (KServe's
# "Open Inference Protocol" gRPC reference): they are the wire format.
PUBLISHED = {
    "ModelInferRequest": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "id": (3, "string"),
        "parameters": (4, "map"),
        "inputs": (5, "repeated ModelInferRequest.InferInputTensor"),
        "outputs": (6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
        "raw_input_contents": (7, "repeated bytes"),
    },
    "ModelInferRequest.InferInputTensor": {
        "name": (1, "string"),
        "datatype": (2, "string"),
        "shape": (3, "repeated int64"),
        "parameters": (4, "map"),
        "contents": (5, "InferTensorContents"),
    },
    "ModelInferRequest.InferRequestedOutputTensor": {
        "name": (1, "string"),
        "parameters": (2, "map"),
    },
    "ModelInferResponse": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "id": (3, "string"),
        "parameters": (4, "map"),
        "outputs": (5, "repeated ModelInferResponse.InferOutputTensor"),
        "raw_output_contents": (6, "repeated bytes"),
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": (1, "string"),
        "datatype": (2, "string"),
        "shape": (3, "repeated int64"),
        "parameters": (4, "map"),
        "contents": (5, "InferTensorContents"),
    },
    "InferParameter": {
        "bool_param": (1, "bool"),
        "int64_param": (2, "int64"),
        "string_param": (3, "string"),
        "double_param": (4, "double"),
        "uint64_param": (5, "uint64"),
    },
    "InferTensorContents": {
        "bool_contents": (1, "repeated bool"),
        "int_contents": (2, "repeated int32"),
        "int64_contents": (3, "repeated int64"),
        "uint_contents": (4, "repeated uint32"),
        "uint64_contents": (5, "repeated uint64"),
        "fp32_contents": (6, "repeated float"),
        "fp64_contents": (7, "repeated double"),
        "bytes_contents": (8, "repeated bytes"),
    },
    "ModelStreamInferResponse": {
        "error_message": (1, "string"),
        "infer_response": (2, "ModelInferResponse"),
    },
    "ServerLiveRequest": {},
    "ServerLiveResponse": {"live": (1, "bool")},
    "ServerReadyRequest": {},
    "ServerReadyResponse": {"ready": (1, "bool")},
    "ModelReadyRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelReadyResponse": {"ready": (1, "bool")},
    "ServerMetadataRequest": {},
    "ServerMetadataResponse": {
        "name": (1, "string"),
        "version": (2, "string"),
        "extensions": (3, "repeated string"),
    },
    "ModelMetadataRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelMetadataResponse": {
        "name": (1, "string"),
        "versions": (2, "repeated string"),
        "platform": (3, "string"),
        "inputs": (4, "repeated ModelMetadataResponse.TensorMetadata"),
        "outputs": (5, "repeated ModelMetadataResponse.TensorMetadata"),
        "properties": (6, "map"),
    },
    "ModelMetadataResponse.TensorMetadata": {
        "name": (1, "string"),
        "datatype": (2, "string"),
        "shape": (3, "repeated int64"),
    },
}


def _field_kind(field: Any) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return "map"
    if field.message_type is not None:
        kind = field.message_type.full_name.removeprefix("inference.")
    else:
        kind = {
            field.TYPE_BOOL: "bool",
            field.TYPE_INT32: "int32",
            field.TYPE_INT64: "int64",
            field.TYPE_UINT32: "uint32",
            field.TYPE_UINT64: "uint64",
            field.TYPE_FLOAT: "float",
            field.TYPE_DOUBLE: "double",
            field.TYPE_STRING: "string",
            field.TYPE_BYTES: "bytes",
        }[field.type]
    return f"repeated {kind}" if field.is_repeated else kind


def _layout_of(descriptor: Any) -> dict[str, tuple[int, str]]:
    return {field.name: (field.number, _field_kind(field)) for field in descriptor.fields}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_messages_have_the_published_field_numbers_and_types(name: str) -> None:
    descriptor = serving_pool.POOL.FindMessageTypeByName(f"inference.{name}")
    assert _layout_of(descriptor) == PUBLISHED[name]


def test_service_has_the_unary_methods_and_triton_stream() -> None:
    service = serving_pool.service_descriptor(oi.SERVICE)
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods  # type: ignore[attr-defined]
    }
    assert methods == {
        **{
            name: (f"{name}Request", f"{name}Response", False, False)
            for name in (
                "ServerLive",
                "ServerReady",
                "ModelReady",
                "ServerMetadata",
                "ModelMetadata",
                "ModelInfer",
            )
        },
        "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse", True, True),
    }
    assert oi.MODEL_INFER == "/inference.GRPCInferenceService/ModelInfer"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _packed(number: int, fmt: str, values: list[Any]) -> bytes:
    if fmt == "varint":
        return _field(number, b"".join(_varint(v & (2**64 - 1)) for v in values))
    return _field(number, b"".join(struct.pack(fmt, v) for v in values))


def test_decodes_a_request_written_by_hand_from_the_published_field_numbers() -> None:
    typed_tensor = (
        _field(1, "x")
        + _field(2, "FP32")
        + _packed(3, "varint", [1, 2])
        + _field(5, _packed(6, "<f", [0.5, -1.0]))
    )
    ints = _field(1, "n") + _field(2, "INT64") + _packed(3, "varint", [2])
    ints += _field(5, _packed(3, "varint", [-5, 7]))
    request = _field(1, "model") + _field(2, "3") + _field(3, "req-9")
    request += _field(5, typed_tensor) + _field(5, ints) + _field(6, _field(1, "y"))
    message = oi.ModelInferRequest.FromString(request)
    assert (message.model_name, message.model_version, message.id) == ("model", "3", "req-9")
    inputs = oi.request_inputs(message)
    assert_same(inputs["x"], np.array([[0.5, -1.0]], dtype=np.float32))
    assert_same(inputs["n"], np.array([-5, 7], dtype=np.int64))
    assert message.outputs[0].name == "y"
    assert oi.ModelInferCodec().request_id(request) == "req-9"

    raw_tensor = _field(1, "b") + _field(2, "UINT16") + _packed(3, "varint", [3])
    response = _field(1, "model") + _field(5, raw_tensor) + _field(6, struct.pack("<3H", 1, 2, 3))
    outputs = oi.response_outputs(oi.ModelInferResponse.FromString(response))
    assert_same(outputs["b"], np.array([1, 2, 3], dtype=np.uint16))


# ------------------------------------------------------------------- tensor round trips


def _shapes(array: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    """The sample as given, as a 3-d tensor, and empty in two ways."""
    flat = array.reshape(-1)
    empty = flat[:0]
    return [array, flat.reshape(1, -1, 1), empty, empty.reshape(2, 0, 3)]


@pytest.mark.parametrize("datatype", oi.DATATYPES)
def test_raw_round_trip(datatype: str) -> None:
    for array in _shapes(SAMPLES[datatype]):
        data = oi.encode_raw(array, datatype)
        assert_same(oi.decode_raw(data, datatype, array.shape), array)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_round_trip(datatype: str) -> None:
    for array in _shapes(SAMPLES[datatype]):
        request = oi.ModelInferRequest()
        tensor = oi.add_input(request, "t", array, datatype, raw=False)
        assert not request.raw_input_contents
        assert_same(oi.decode_contents(tensor), array)


@pytest.mark.parametrize("datatype", oi.DATATYPES)
def test_raw_and_typed_messages_decode_to_the_same_arrays(datatype: str) -> None:
    array = SAMPLES[datatype]
    forms = [True] if datatype in ("FP16", "BF16") else [True, False]
    for raw in forms:
        request, response = oi.ModelInferRequest(), oi.ModelInferResponse()
        oi.add_input(request, "t", array, datatype, raw=raw)
        oi.add_input(request, "empty", array.reshape(-1)[:0], datatype, raw=raw)
        oi.add_output(response, "t", array, datatype, raw=raw)
        assert len(request.raw_input_contents) == (2 if raw else 0)
        inputs = oi.request_inputs(oi.ModelInferRequest.FromString(request.SerializeToString()))
        outputs = oi.response_outputs(
            oi.ModelInferResponse.FromString(response.SerializeToString())
        )
        assert_same(inputs["t"], array)
        assert_same(inputs["empty"], array.reshape(-1)[:0])
        assert_same(outputs["t"], array)


def test_typed_contents_use_the_protocols_field_per_datatype() -> None:
    expected = {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
    for datatype, field in expected.items():
        tensor = oi.add_input(oi.ModelInferRequest(), "t", SAMPLES[datatype], datatype, raw=False)
        filled = [f.name for f, _ in tensor.contents.ListFields()]
        assert filled == [field], datatype


def test_raw_layout_is_little_endian_row_major() -> None:
    array = np.array([[1, 2], [3, 4]], dtype=np.int16)
    assert oi.encode_raw(array, "INT16") == struct.pack("<4h", 1, 2, 3, 4)
    assert oi.encode_raw(array.T, "INT16") == struct.pack("<4h", 1, 3, 2, 4)
    big_endian = np.array([1.5, -2.0], dtype=">f8")
    assert oi.encode_raw(big_endian, "FP64") == struct.pack("<2d", 1.5, -2.0)
    assert oi.encode_raw([True, False], "BOOL") == b"\x01\x00"
    assert_same(oi.decode_raw(b"\x00\x02", "BOOL", [2]), np.array([False, True]))


def test_raw_bytes_are_length_prefixed() -> None:
    assert oi.encode_raw([b"", b"a\x00", "é"], "BYTES") == (
        b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00a\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    )
    # A list keeps trailing NULs that numpy's fixed-width strings would drop.
    decoded = oi.decode_raw(oi.encode_raw([b"ab\x00\x00"], "BYTES"), "BYTES", [1])
    assert decoded.tolist() == [b"ab\x00\x00"]


def test_fp16_known_bit_patterns() -> None:
    values = np.array([1.0, -2.0, 65504.0, np.inf, 2**-24], dtype=np.float16)
    patterns = [0x3C00, 0xC000, 0x7BFF, 0x7C00, 0x0001]
    assert oi.encode_raw(values, "FP16") == struct.pack("<5H", *patterns)
    assert_same(oi.decode_raw(struct.pack("<5H", *patterns), "FP16", [5]), values)


def _bf16(value_bits: int) -> int:
    single = np.array([value_bits], dtype=np.uint32).view(np.float32)
    return int(struct.unpack("<H", oi.encode_raw(single, "BF16"))[0])


def test_bf16_encodes_by_rounding_to_nearest_even() -> None:
    assert _bf16(0x3F800000) == 0x3F80  # 1.0, exact
    assert _bf16(0xC0000000) == 0xC000  # -2.0, exact
    assert _bf16(0x40490FDB) == 0x4049  # pi: below half an ulp rounds down
    assert _bf16(0x3F808001) == 0x3F81  # above half rounds up
    assert _bf16(0x3F808000) == 0x3F80  # a tie rounds to the even neighbour, down...
    assert _bf16(0x3F818000) == 0x3F82  # ...or up
    assert _bf16(0x7F7FFFFF) == 0x7F80  # float32's largest rounds to infinity
    assert _bf16(0xFF800000) == 0xFF80  # -inf
    assert _bf16(0x7FC00000) == 0x7FC0  # NaN stays NaN...
    assert _bf16(0x7F800001) & 0x7FC0 == 0x7FC0  # ...even one whose payload would round away
    assert _bf16(0x00000001) == 0x0000  # a float32 subnormal too small for bf16


def test_bf16_decodes_to_float32_from_the_upper_bits() -> None:
    data = struct.pack("<6H", 0x3F80, 0xC000, 0x7F80, 0xFF80, 0x0001, 0x4049)
    decoded = oi.decode_raw(data, "BF16", [2, 3])
    assert decoded.dtype == np.float32
    bits = decoded.reshape(-1).view(np.uint32).tolist()
    assert bits == [0x3F800000, 0xC0000000, 0x7F800000, 0xFF800000, 0x00010000, 0x40490000]
    assert decoded[1, 2] == np.float32(3.140625)


def test_datatype_of_numpy_dtypes() -> None:
    for datatype, array in SAMPLES.items():
        if datatype != "BF16":
            assert oi.datatype_of(array) == datatype
    assert oi.datatype_of(np.array(["a"])) == "BYTES"
    assert oi.datatype_of(np.array([1.0], dtype=">f4")) == "FP32"
    with pytest.raises(TensorError):
        oi.datatype_of(np.array([1j]))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        (b"\x00" * 7, "FP32", [2], "needs 8 raw bytes, got 7"),
        (b"\x00" * 8, "FP32", [1], "needs 4 raw bytes, got 8"),
        (b"", "FP33", [0], "unknown datatype 'FP33'"),
        (b"", "fp32", [0], "unknown datatype"),
        (b"\x00", "UINT8", [-1], "negative dimension"),
        (b"\x01\x00", "BYTES", [1], "4-byte length"),
        (b"\x05\x00\x00\x00abc", "BYTES", [1], "claims 5 bytes, 3 left"),
        (b"\x01\x00\x00\x00a", "BYTES", [2], "holds 1 elements, the shape needs 2"),
        (b"\x00\x00\x00\x00" * 3, "BYTES", [2], "holds 3 elements"),
        # A shape far larger than the data fails before anything of its size is allocated.
        (b"\x00\x00\x00\x00", "BYTES", [2**20, 2**20, 2**19], "the shape needs"),
        (b"\x00" * 4, "FP64", [2**30, 2**20], "raw bytes, got 4"),
        # Shapes no numpy array can have, empty ones included: TensorError, not numpy's
        # ValueError.
        (b"\x00" * 4, "FP64", [2**40, 2**20], "too large for an array"),
        (b"", "FP32", [0, 2**62, 2**62], "too large for an array"),
        (b"", "BYTES", [2**62, 2**62, 0], "too large for an array"),
        (b"", "BOOL", [0, 2**64], "too large for an array"),
        (b"\x00" * 4, "FP32", [1] * 33, "33 dimensions"),
    ],
)
def test_decode_raw_rejects_bad_data(
    data: bytes, datatype: str, shape: list[int], message: str
) -> None:
    with pytest.raises(TensorError, match=message) as caught:
        oi.decode_raw(data, datatype, shape)
    assert isinstance(caught.value, ValueError)


def test_encoding_rejects_values_the_datatype_cannot_hold() -> None:
    with pytest.raises(TensorError, match="out of range of UINT8"):
        oi.encode_raw(np.array([256]), "UINT8")
    with pytest.raises(TensorError, match="out of range of INT8"):
        oi.set_contents(oi.ModelInferRequest.InferInputTensor().contents, [-129], "INT8")
    with pytest.raises(TensorError, match="UINT64"):
        oi.encode_raw(np.array([-1]), "UINT64")
    with pytest.raises(TensorError, match="not integral"):
        oi.encode_raw(np.array([1.5]), "INT32")
    with pytest.raises(TensorError, match="BOOL"):
        oi.encode_raw(np.array([2]), "BOOL")
    with pytest.raises(TensorError, match="cannot encode"):
        oi.encode_raw(np.array(["1"]), "INT32")
    with pytest.raises(TensorError, match="str or bytes"):
        oi.encode_raw(np.array([1, None], dtype=object), "BYTES")
    with pytest.raises(TensorError, match="no typed contents"):
        oi.set_contents(oi.ModelInferRequest.InferInputTensor().contents, [1.0], "FP16")
    with pytest.raises(TensorError, match="unknown datatype"):
        oi.encode_raw([1], "INT128")


def test_typed_contents_that_do_not_fit_are_rejected() -> None:
    tensor = oi.ModelInferRequest.InferInputTensor(name="t", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(TensorError, match="needs 3 fp32_contents values, has 2"):
        oi.decode_contents(tensor)
    wrong_list = oi.ModelInferRequest.InferInputTensor(name="t", datatype="FP32", shape=[1])
    wrong_list.contents.fp64_contents.append(1.0)
    with pytest.raises(TensorError, match="fp32_contents"):
        oi.decode_contents(wrong_list)
    narrow = oi.ModelInferRequest.InferInputTensor(name="t", datatype="UINT8", shape=[1])
    narrow.contents.uint_contents.append(256)
    with pytest.raises(TensorError, match="out of range of UINT8"):
        oi.decode_contents(narrow)
    half = oi.ModelInferRequest.InferInputTensor(name="t", datatype="BF16", shape=[1])
    with pytest.raises(TensorError, match="only raw"):
        oi.decode_contents(half)
    for datatype in ("FP16", "FP32", "BYTES"):
        empty = oi.ModelInferRequest.InferInputTensor(
            name="t", datatype=datatype, shape=[0, 2**62, 2**62]
        )
        with pytest.raises(TensorError, match="too large for an array"):
            oi.decode_contents(empty)


def test_a_shape_no_array_can_have_is_refused_naming_the_tensor() -> None:
    request = oi.ModelInferRequest()
    oi.add_input(request, "fine", [1.0], "FP32", raw=True)
    request.inputs.add(name="empty", datatype="FP32", shape=[0, 2**62, 2**62])
    request.raw_input_contents.append(b"")
    with pytest.raises(TensorError, match=r"tensor 'empty': shape .* too large for an array"):
        oi.request_inputs(request)


def test_a_message_holds_every_tensor_raw_or_none() -> None:
    request = oi.ModelInferRequest()
    oi.add_input(request, "a", [1.0], "FP32", raw=True)
    with pytest.raises(TensorError, match=r"'b'.*raw tensors"):
        oi.add_input(request, "b", [1.0], "FP32", raw=False)
    response = oi.ModelInferResponse()
    oi.add_output(response, "a", [1.0], "FP32", raw=False)
    with pytest.raises(TensorError, match="typed tensors"):
        oi.add_output(response, "b", [1.0], "FP32", raw=True)
    # A failed add leaves the message as it was.
    with pytest.raises(TensorError, match="'c'"):
        oi.add_input(request, "c", [300], "UINT8", raw=True)
    assert [t.name for t in request.inputs] == ["a"] and len(request.raw_input_contents) == 1

    request.raw_input_contents.append(b"\x00" * 4)
    with pytest.raises(TensorError, match="2 raw_input_contents entries for 1 tensors"):
        oi.request_inputs(request)
    request.raw_input_contents.pop()
    request.inputs[0].shape[:] = [2]
    with pytest.raises(TensorError, match="tensor 'a': FP32 tensor of shape"):
        oi.request_inputs(request)


# ----------------------------------------------------------------------------- codec


def _infer_request() -> Any:
    request = oi.ModelInferRequest(model_name="fraud", model_version="2", id="req-7")
    request.parameters["threshold"].double_param = 0.5
    request.parameters["debug"].bool_param = True
    request.parameters["batch"].int64_param = -3
    request.parameters["big"].uint64_param = 2**64 - 1
    request.parameters["note"].string_param = "café"
    request.parameters["bad"].double_param = math.nan
    request.parameters["unset"].SetInParent()
    oi.add_input(
        request, "features", np.array([[0.5, np.nan, -np.inf]], np.float32), "FP32", raw=True
    )
    oi.add_input(request, "ssn", [b"123-45-6789"], "BYTES", raw=True)
    oi.add_input(request, "notes", ["ok", b"\xff\x00", b""], "BYTES", raw=True)
    oi.add_input(request, "half", np.array([0.1, 65504], np.float16), "FP16", raw=True)
    oi.add_input(request, "brain", np.array([3.140625], np.float32), "BF16", raw=True)
    oi.add_input(request, "counts", np.array([0, 2**64 - 1], np.uint64), "UINT64", raw=True)
    request.inputs[0].parameters["binary_data_size"].int64_param = 12
    request.outputs.add(name="label")
    return request


def _infer_response(raw: bool = False, label: str = "fraud", score: float = 0.875) -> Any:
    response = oi.ModelInferResponse(model_name="fraud", model_version="2", id="req-7")
    oi.add_output(response, "label", np.array([label], dtype=object), "BYTES", raw=raw)
    oi.add_output(response, "score", np.array([[score]], np.float32), "FP32", raw=raw)
    oi.add_output(response, "flags", np.array([True, False]), "BOOL", raw=raw)
    return response


def test_request_payload_is_readable_json() -> None:
    payload = oi.ModelInferCodec().payload(_infer_request().SerializeToString(), reply=False)
    assert payload is not None
    assert json.loads(orjson.dumps(payload)) == payload
    assert payload["model_name"] == "fraud" and payload["model_version"] == "2"
    assert payload["id"] == "req-7"
    assert payload["parameters"] == {
        "bad": "NaN",
        "batch": -3,
        "big": 2**64 - 1,
        "debug": True,
        "note": "café",
        "threshold": 0.5,
        "unset": None,
    }
    inputs = {tensor["name"]: tensor for tensor in payload["inputs"]}
    assert inputs["features"] == {
        "name": "features",
        "datatype": "FP32",
        "shape": [1, 3],
        "parameters": {"binary_data_size": 12},
        "raw": True,
        "contents": {"fp32_contents": [0.5, "NaN", "-Infinity"]},
    }
    assert inputs["ssn"]["contents"] == {"bytes_contents": ["123-45-6789"]}
    assert inputs["notes"]["contents"] == {"bytes_contents": ["ok", {"base64": "/wA="}, ""]}
    # Half floats at their shortest form that reads back as the same half: 65504 -> 65500.
    assert inputs["half"]["contents"] == {"fp16_contents": [0.1, 65500.0]}
    assert np.float16(65500.0) == np.float16(65504.0)
    assert inputs["brain"]["contents"] == {"bf16_contents": [3.140625]}
    assert inputs["counts"]["contents"] == {"uint64_contents": [0, 2**64 - 1]}
    assert payload["outputs"] == [{"name": "label"}]
    assert "raw_input_contents" not in payload


def test_reply_payload_with_typed_contents() -> None:
    codec = oi.ModelInferCodec()
    payload = codec.payload(_infer_response().SerializeToString(), reply=True)
    assert payload == {
        "model_name": "fraud",
        "model_version": "2",
        "id": "req-7",
        "outputs": [
            {
                "name": "label",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["fraud"]},
            },
            {
                "name": "score",
                "datatype": "FP32",
                "shape": [1, 1],
                "contents": {"fp32_contents": [0.875]},
            },
            {
                "name": "flags",
                "datatype": "BOOL",
                "shape": [2],
                "contents": {"bool_contents": [True, False]},
            },
        ],
    }
    # The same reply sent raw reads the same, marked raw.
    raw = codec.payload(_infer_response(raw=True).SerializeToString(), reply=True)
    assert raw is not None and payload is not None
    assert [t.pop("raw") for t in raw["outputs"]] == [True, True, True]
    assert raw == payload


def test_payload_event_redacts_named_tensors_raw_or_typed() -> None:
    codec = PayloadCodec(max_bytes=1 << 20, redact_tensors=["ssn", "score"])
    request = codec.event_attributes(
        oi.MODEL_INFER, _infer_request().SerializeToString(), reply=False
    )
    assert request["payload.encoding"] == "json"
    assert request["message.type"] == "inference.ModelInferRequest"
    assert "123-45-6789" not in request["payload"]
    inputs = {t["name"]: t for t in json.loads(request["payload"])["inputs"]}
    assert inputs["ssn"]["contents"] == REDACTED and inputs["ssn"]["shape"] == [1]
    assert inputs["features"]["contents"] != REDACTED
    for raw in (False, True):
        reply = codec.event_attributes(
            oi.MODEL_INFER, _infer_response(raw=raw).SerializeToString(), reply=True
        )
        assert reply["message.type"] == "inference.ModelInferResponse"
        outputs = {t["name"]: t for t in json.loads(reply["payload"])["outputs"]}
        assert outputs["score"]["contents"] == REDACTED
        assert outputs["label"]["contents"] == {"bytes_contents": ["fraud"]}


def test_undecodable_raw_tensor_is_shown_under_its_contents_and_still_redacted() -> None:
    request = oi.ModelInferRequest()
    oi.add_input(request, "secret", [b"abc"], "BYTES", raw=True)
    request.raw_input_contents[0] = b"\x09\x00\x00\x00abc"  # claims nine bytes
    request.raw_input_contents.append(b"stray")
    data = request.SerializeToString()
    payload = oi.ModelInferCodec().payload(data, reply=False)
    assert payload is not None
    tensor = payload["inputs"][0]
    assert tensor["raw"] is True and "claims 9 bytes" in tensor["error"]
    assert base64.b64decode(tensor["contents"]["undecodable"]) == b"\x09\x00\x00\x00abc"
    assert payload["unmatched_raw_contents"] == 1
    attributes = PayloadCodec(1 << 20, redact_tensors=["secret"]).event_attributes(
        oi.MODEL_INFER, data, reply=False
    )
    assert "abc" not in attributes["payload"] and "YWJj" not in attributes["payload"]
    assert "stray" not in attributes["payload"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_a_tensor_no_array_can_hold_loses_only_its_own_contents(raw: bool) -> None:
    reply = oi.ModelInferResponse()
    oi.add_output(reply, "score", np.array([0.5], np.float32), "FP32", raw=raw)
    reply.outputs.add(name="empty", datatype="FP32", shape=[0, 2**62, 2**62])
    if raw:
        reply.raw_output_contents.append(b"")
    payload = oi.ModelInferCodec().payload(reply.SerializeToString(), reply=True)
    assert payload is not None
    score, empty = payload["outputs"]
    assert score["contents"] == {"fp32_contents": [0.5]} and "error" not in score
    assert empty["error"] == f"shape {[0, 2**62, 2**62]} is too large for an array"
    assert empty["shape"] == [0, 2**62, 2**62]
    assert oi.ModelInferCodec().outputs(reply.SerializeToString()) is None


def test_a_typed_tensor_that_does_not_decode_keeps_its_values_and_gets_an_error() -> None:
    request = oi.ModelInferRequest()
    unknown = request.inputs.add(name="unknown", datatype="FP33", shape=[1])
    unknown.contents.fp32_contents.append(1.5)
    short = request.inputs.add(name="short", datatype="FP32", shape=[3])
    short.contents.fp32_contents.extend([1.0, 2.0])
    wide = request.inputs.add(name="wide", datatype="UINT8", shape=[1])
    wide.contents.uint_contents.append(256)
    request.inputs.add(name="absent", datatype="INT32", shape=[2])
    oi.add_input(request, "fine", [1, 2], "INT32", raw=False)
    payload = oi.ModelInferCodec().payload(request.SerializeToString(), reply=False)
    assert payload is not None
    inputs = {tensor["name"]: tensor for tensor in payload["inputs"]}
    assert inputs["unknown"]["contents"] == {"fp32_contents": [1.5]}
    assert inputs["unknown"]["error"].startswith("unknown datatype 'FP33'")
    assert inputs["short"]["contents"] == {"fp32_contents": [1.0, 2.0]}
    assert inputs["short"]["error"] == (
        "FP32 tensor of shape [3] needs 3 fp32_contents values, has 2"
    )
    assert inputs["wide"]["contents"] == {"uint_contents": [256]}
    assert inputs["wide"]["error"] == "uint_contents holds values out of range of UINT8"
    assert "contents" not in inputs["absent"]
    assert (
        inputs["absent"]["error"] == "INT32 tensor of shape [2] needs 2 int_contents values, has 0"
    )
    assert inputs["fine"] == {
        "name": "fine",
        "datatype": "INT32",
        "shape": [2],
        "contents": {"int_contents": [1, 2]},
    }


def test_a_tensor_that_fails_to_decode_for_any_reason_keeps_the_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decode_raw, decode_contents = oi.decode_raw, oi.decode_contents

    def raw_failing_on_fp64(data: bytes, datatype: str, shape: Any) -> Any:
        if datatype == "FP64":
            raise RuntimeError("a bug")
        return decode_raw(data, datatype, shape)

    def typed_failing_on_fp64(tensor: Any) -> Any:
        if tensor.datatype == "FP64":
            raise RuntimeError("a bug")
        return decode_contents(tensor)

    monkeypatch.setattr(oi, "decode_raw", raw_failing_on_fp64)
    monkeypatch.setattr(oi, "decode_contents", typed_failing_on_fp64)
    for raw in (True, False):
        reply = oi.ModelInferResponse()
        oi.add_output(reply, "a", [0.5], "FP64", raw=raw)
        oi.add_output(reply, "b", [0.5], "FP32", raw=raw)
        payload = oi.ModelInferCodec().payload(reply.SerializeToString(), reply=True)
        assert payload is not None
        a, b = payload["outputs"]
        assert a["error"] == "RuntimeError: a bug"
        if raw:
            assert base64.b64decode(a["contents"]["undecodable"]) == struct.pack("<d", 0.5)
        else:
            assert a["contents"] == {"fp64_contents": [0.5]}
        assert b["contents"] == {"fp32_contents": [0.5]} and "error" not in b


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x1a\x02\xff\xfe"])
def test_bad_bytes_give_no_payload_outputs_or_id(data: bytes) -> None:
    codec = oi.ModelInferCodec()
    assert codec.payload(data, reply=False) is None
    assert codec.payload(data, reply=True) is None
    assert codec.outputs(data) is None
    assert codec.request_id(data) == ""


def test_outputs_are_numeric_except_bytes() -> None:
    reply = _infer_response(raw=True)
    oi.add_output(reply, "half", np.array([1.5], np.float16), "FP16", raw=True)
    outputs = decode_outputs(reply.SerializeToString(), oi.MODEL_INFER)
    assert outputs is not None
    assert outputs.numeric == frozenset({"score", "flags", "half"})
    assert outputs.arrays["label"].tolist() == [b"fraud"]
    assert predicted_labels(outputs) == ("fraud",)
    assert_same(outputs.arrays["half"], np.array([1.5], np.float16))


def test_outputs_that_do_not_decode_are_none() -> None:
    reply = oi.ModelInferResponse()
    oi.add_output(reply, "score", [1.0, 2.0], "FP32", raw=True)
    reply.outputs[0].shape[:] = [3]
    assert oi.ModelInferCodec().outputs(reply.SerializeToString()) is None


def _compare(production: Any, other: Any, tolerance: float = 1e-6) -> Any:
    return compare_replies(
        oi.MODEL_INFER,
        OK,
        production.SerializeToString(),
        OK,
        other.SerializeToString(),
        tolerance,
    )


def test_comparison_of_model_infer_replies() -> None:
    same = _compare(_infer_response(raw=True), _infer_response(raw=False))
    assert same.compared and same.agree is True and same.differing_outputs == ()
    assert same.max_abs_diff == 0.0

    close = _compare(_infer_response(score=0.875), _infer_response(score=0.75), tolerance=0.2)
    assert close.agree is True and close.differing_outputs == ()
    assert close.max_abs_diff == pytest.approx(0.125)

    numeric = _compare(_infer_response(score=0.875), _infer_response(score=0.5))
    assert numeric.agree is True, "the label decides agreement"
    assert numeric.differing_outputs == ("score",)
    assert numeric.max_abs_diff == pytest.approx(0.375)

    label = _compare(_infer_response(label="fraud"), _infer_response(label="ok", raw=True))
    assert label.agree is False and label.differing_outputs == ("label",)

    fewer = oi.ModelInferResponse()
    oi.add_output(fewer, "label", np.array(["fraud"], dtype=object), "BYTES", raw=False)
    missing = _compare(_infer_response(), fewer)
    assert missing.agree is True and set(missing.differing_outputs) == {"score", "flags"}


def test_request_id_reads_the_id_field() -> None:
    codec = oi.ModelInferCodec()
    request = _infer_request()
    data = request.SerializeToString()
    assert codec.request_id(data) == "req-7" == oi.ModelInferRequest.FromString(data).id
    assert codec.request_id(oi.ModelInferRequest(model_name="m").SerializeToString()) == ""
    assert codec.request_id(b"") == ""
    # protobuf keeps the last value of a repeated scalar field.
    assert codec.request_id(data + _field(3, "later")) == "later"
    assert codec.request_id(data[:-1]) == ""
    assert codec.request_id(b"\x18\x01") == "", "field 3 as a varint is not a string"
    assert codec_for(oi.MODEL_INFER) is not None
    assert codec_for(oi.MODEL_INFER).request_id(data) == "req-7"  # type: ignore[union-attr]


def test_health_and_metadata_codecs_give_payloads() -> None:
    codecs = known_codecs()
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata"):
        assert f"/{oi.SERVICE}/{name}" in codecs
    metadata = oi.ModelMetadataResponse(name="fraud", versions=["1", "2"], platform="onnx")
    metadata.inputs.add(name="features", datatype="FP32", shape=[-1, 30])
    codec = codecs[f"/{oi.SERVICE}/ModelMetadata"]
    assert codec.payload(metadata.SerializeToString(), reply=True) == {
        "name": "fraud",
        "versions": ["1", "2"],
        "platform": "onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
    }
    live = codecs[f"/{oi.SERVICE}/ServerLive"]
    assert live.payload(oi.ServerLiveResponse(live=True).SerializeToString(), reply=True) == {
        "live": True
    }
    assert live.payload(b"\xff", reply=True) is None
    assert live.outputs(b"") is None and live.request_id(b"") == ""


# ------------------------------------------------------------------ a real implementation


def test_tritonclient_requests_decode_and_our_replies_read_back() -> None:
    """Bytes from tritonclient (its own protobuf classes, its own tensor serialization)
    decode with ours to the same arrays, and tritonclient reads our raw replies: both
    implementations agree on field numbers and the raw layout."""
    triton_grpc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import _utils as triton_utils
    from tritonclient.grpc import service_pb2 as triton_pb2

    inputs = []
    for datatype, array in SAMPLES.items():
        tensor = triton_grpc.InferInput(datatype, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    triton_request = triton_utils._get_inference_request(
        model_name="m",
        inputs=inputs,
        model_version="1",
        request_id="triton-1",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    data = triton_request.SerializeToString()
    assert oi.ModelInferCodec().request_id(data) == "triton-1"
    decoded = oi.request_inputs(oi.ModelInferRequest.FromString(data))
    for datatype, array in SAMPLES.items():
        assert_same(decoded[datatype], array)

    response = oi.ModelInferResponse(model_name="m", id="triton-1")
    for datatype, array in SAMPLES.items():
        oi.add_output(response, datatype, array, datatype, raw=True)
    result = triton_grpc.InferResult(
        triton_pb2.ModelInferResponse.FromString(response.SerializeToString())
    )
    for datatype, array in SAMPLES.items():
        assert_same(result.as_numpy(datatype), array)


def test_tritonclient_descriptors_match_ours() -> None:
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as triton_pb2

    for name, fields in PUBLISHED.items():
        descriptor = triton_pb2.DESCRIPTOR.message_types_by_name[name.split(".")[0]]
        for nested in name.split(".")[1:]:
            descriptor = descriptor.nested_types_by_name[nested]
        theirs = _layout_of(descriptor)
        # Triton's ModelMetadataResponse predates the optional `properties` map.
        assert theirs == {k: v for k, v in fields.items() if k in theirs}, name
        assert set(fields) - set(theirs) <= {"properties"}, name
