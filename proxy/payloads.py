"""Turn request and reply bytes into readable, capped, redacted span-event attributes."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import orjson
from google.protobuf import json_format, message, message_factory
from google.protobuf.internal.type_checkers import ToShortestFloat

from proxy.gen import predict_pb2
from proxy.records import Metadata

REDACTED = "[REDACTED]"
_MESSAGE_MODULES: tuple[ModuleType, ...] = (predict_pb2,)
MessageTypes = dict[str, tuple[type[message.Message], type[message.Message]]]


def known_methods(modules: Iterable[ModuleType] = _MESSAGE_MODULES) -> MessageTypes:
    """``/package.Service/Method`` → (request class, reply class) for the services in protos/."""
    table: MessageTypes = {}
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                table[f"/{service.full_name}/{method.name}"] = (
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                )
    return table


class PayloadCodec:
    """Encodes payloads for span events: JSON for known messages, base64 otherwise."""

    def __init__(self, max_bytes: int, redact_tensors: Iterable[str] = ()) -> None:
        self.max_bytes = max_bytes
        self.redact_tensors = frozenset(redact_tensors)
        self._types = known_methods()

    def decode(self, method: str, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        """The message as a JSON-ready dict (tensor redaction applied), or None when the
        method is not one of ours or the bytes do not parse."""
        types = self._types.get(method)
        if types is None:
            return None
        try:
            parsed = types[1 if reply else 0].FromString(data)
        except message.DecodeError:
            return None
        fast = _FAST_DICT.get(type(parsed))
        as_dict = (
            fast(parsed)
            if fast is not None
            else json_format.MessageToDict(parsed, preserving_proto_field_name=True)
        )
        if self.redact_tensors:
            _redact_tensors(as_dict, self.redact_tensors)
        return as_dict

    def event_attributes(self, method: str, data: bytes, *, reply: bool) -> dict[str, Any]:
        """Attributes of one payload event: type, encoding, the (capped) payload, sizes."""
        types = self._types.get(method)
        decoded = self.decode(method, data, reply=reply) if types else None
        attributes: dict[str, Any] = {"payload.size": len(data)}
        if decoded is not None and types is not None:
            attributes["message.type"] = types[1 if reply else 0].DESCRIPTOR.full_name
            attributes["payload.encoding"] = "json"
            encoded = orjson.dumps(decoded)
            truncated = len(encoded) > self.max_bytes
            text = (encoded[: self.max_bytes] if truncated else encoded).decode("utf-8", "ignore")
        elif types is not None and self.redact_tensors:
            # Undecodable bytes of a known message may hold a redacted tensor: keep them out.
            attributes["payload.decode_error"] = True
            attributes["payload.encoding"] = "redacted"
            text, truncated = "[REDACTED: undecodable message]", False
        else:
            if types is not None:
                attributes["payload.decode_error"] = True
            attributes["payload.encoding"] = "base64"
            # Cut before encoding so the event holds at most max_bytes of base64 text.
            keep = (self.max_bytes // 4) * 3
            truncated = len(data) > keep
            text = base64.b64encode(data[:keep] if truncated else data).decode("ascii")
        attributes["payload"] = text
        attributes["payload.truncated"] = truncated
        return attributes


def metadata_attributes(prefix: str, metadata: Metadata, redact: frozenset[str]) -> dict[str, Any]:
    """gRPC metadata as ``<prefix>.<key>`` string-array attributes (the RPC conventions' form),
    with redacted keys' values replaced and binary values base64-encoded."""
    grouped: dict[str, list[str]] = {}
    for key, value in metadata:
        if key in redact:
            text = REDACTED
        elif isinstance(value, bytes):
            text = base64.b64encode(value).decode("ascii")
        else:
            text = value
        grouped.setdefault(f"{prefix}.{key}", []).append(text)
    return {key: tuple(values) for key, values in grouped.items()}


def _redact_tensors(node: Any, names: frozenset[str]) -> None:
    if isinstance(node, dict):
        if node.get("name") in names and "contents" in node:
            node["contents"] = REDACTED
        for value in node.values():
            _redact_tensors(value, names)
    elif isinstance(node, list):
        for item in node:
            _redact_tensors(item, names)


# -------------------------------------------------------------- fast predict.v1 to JSON
# protobuf's MessageToDict walks descriptors in Python for every field of every message;
# for our own messages a direct conversion gives the same dict (tests/test_payloads.py
# checks it against MessageToDict) several times faster.

_DTYPE_NAMES = {number: name for name, number in predict_pb2.DataType.items()}


def _json_float(value: float, single: bool) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return ToShortestFloat(value) if single else value


def _contents_dict(contents: predict_pb2.TensorContents) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if contents.fp32_contents:
        out["fp32_contents"] = [_json_float(v, True) for v in contents.fp32_contents]
    if contents.fp64_contents:
        out["fp64_contents"] = [_json_float(v, False) for v in contents.fp64_contents]
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


def _predict_dict(
    message_: predict_pb2.PredictRequest | predict_pb2.PredictResponse,
) -> dict[str, Any]:
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


_FAST_DICT: dict[type, Callable[[Any], dict[str, Any]]] = {
    predict_pb2.PredictRequest: _predict_dict,
    predict_pb2.PredictResponse: _predict_dict,
}
