"""The project's own protocol, ``predict.v1.PredictionService/Predict`` (protos/predict.proto)."""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf.internal.type_checkers import ToShortestFloat

from proxy.gen import predict_pb2
from proxy.protocols import MethodCodec, Outputs
from proxy.tensors import TensorError, from_tensor

PREDICT_METHOD = "/predict.v1.PredictionService/Predict"

_NUMERIC = frozenset(
    {
        predict_pb2.DATA_TYPE_FP32,
        predict_pb2.DATA_TYPE_FP64,
        predict_pb2.DATA_TYPE_INT64,
        predict_pb2.DATA_TYPE_INT32,
        predict_pb2.DATA_TYPE_BOOL,
    }
)


class PredictCodec(MethodCodec):
    method = PREDICT_METHOD
    request_type = predict_pb2.PredictRequest.DESCRIPTOR.full_name
    reply_type = predict_pb2.PredictResponse.DESCRIPTOR.full_name

    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        try:
            parsed = (
                predict_pb2.PredictResponse if reply else predict_pb2.PredictRequest
            ).FromString(data)
        except Exception:  # protobuf's DecodeError: not this message
            return None
        return predict_dict(parsed)

    def outputs(self, reply: bytes) -> Outputs | None:
        try:
            message = predict_pb2.PredictResponse.FromString(reply)
            arrays = {tensor.name: from_tensor(tensor) for tensor in message.outputs}
            numeric = frozenset(t.name for t in message.outputs if t.dtype in _NUMERIC)
        except (TensorError, ValueError):
            return None
        except Exception:  # protobuf's DecodeError and friends: not a PredictResponse
            return None
        return Outputs(arrays, numeric)

    def request_id(self, request: bytes) -> str:
        try:
            return predict_pb2.PredictRequest.FromString(request).request_id
        except Exception:
            # An undecodable request still goes to production, which answers the client.
            return ""


CODECS: tuple[MethodCodec, ...] = (PredictCodec(),)


# -------------------------------------------------------------- fast predict.v1 to JSON
# protobuf's MessageToDict walks descriptors in Python for every field of every message;
# for our own messages a direct conversion gives the same dict (tests/test_payloads.py
# checks it against MessageToDict) several times faster.

_DTYPE_NAMES = {number: name for name, number in predict_pb2.DataType.items()}


def json_float(value: float, single: bool) -> float | str:
    """A float as protobuf's JSON mapping writes it (NaN and infinities as strings;
    single precision at its shortest round-tripping form)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return ToShortestFloat(value) if single else value


def _all_finite(values: list[float]) -> bool:
    # The sum is finite only when no value is NaN or infinite (an overflowing sum of finite
    # values only sends the list down the slow path, which gives the same result).
    total = sum(values)
    return total - total == 0.0


def _contents_dict(contents: predict_pb2.TensorContents) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if contents.fp32_contents:
        values = list(contents.fp32_contents)
        out["fp32_contents"] = (
            [ToShortestFloat(v) for v in values]
            if _all_finite(values)
            else [json_float(v, True) for v in values]
        )
    if contents.fp64_contents:
        values = list(contents.fp64_contents)
        out["fp64_contents"] = (
            values if _all_finite(values) else [json_float(v, False) for v in values]
        )
    if contents.int64_contents:
        out["int64_contents"] = [str(v) for v in contents.int64_contents]
    if contents.bool_contents:
        out["bool_contents"] = list(contents.bool_contents)
    if contents.bytes_contents:
        out["bytes_contents"] = [
            base64.b64encode(v).decode("ascii") for v in contents.bytes_contents
        ]
    if contents.int32_contents:
        out["int32_contents"] = list(contents.int32_contents)
    return out


def _tensor_dict(tensor: predict_pb2.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tensor.name:
        out["name"] = tensor.name
    if tensor.dtype:
        out["dtype"] = _DTYPE_NAMES.get(tensor.dtype, tensor.dtype)
    if tensor.shape:
        out["shape"] = [str(v) for v in tensor.shape]
    if tensor.HasField("contents"):
        out["contents"] = _contents_dict(tensor.contents)
    return out


def predict_dict(
    message_: predict_pb2.PredictRequest | predict_pb2.PredictResponse,
) -> dict[str, Any]:
    """A PredictRequest or PredictResponse as MessageToDict (proto field names) gives it."""
    out: dict[str, Any] = {}
    for field in ("model_name", "model_version", "request_id"):
        value = getattr(message_, field)
        if value:
            out[field] = value
    tensors = (
        message_.inputs if isinstance(message_, predict_pb2.PredictRequest) else message_.outputs
    )
    if tensors:
        out["inputs" if isinstance(message_, predict_pb2.PredictRequest) else "outputs"] = [
            _tensor_dict(t) for t in tensors
        ]
    if message_.parameters:
        out["parameters"] = dict(message_.parameters)
    return out
