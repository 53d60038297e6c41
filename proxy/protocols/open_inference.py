"""The Open Inference Protocol (KServe v2, Triton): its messages, tensors as numpy arrays, codecs.

The messages come from protos/serving/open_inference.proto through the private descriptor
pool of :mod:`proxy.protocols.serving_pool`, so they have no static types: functions here
take and return them as ``Any``.

A tensor travels in one of two forms. *Typed*: its ``contents`` holds the elements in the
list of its datatype (``fp32_contents``, ``int_contents``, ...). *Raw*: the message's
``raw_input_contents`` / ``raw_output_contents`` holds one bytes entry per tensor, in
tensor order, each the elements little-endian in row-major order; a BYTES element is a
4-byte little-endian length and then its bytes. FP16 and BF16 have no typed list and
travel raw only. numpy has no bfloat16: BF16 decodes to float32 (the upper 16 bits) and
encodes by rounding float32 to the nearest bfloat16, ties to even.

Payloads (span events) follow the protocol's field names, with two readability choices:
raw contents are decoded and shown under ``contents`` as the typed list of their datatype
(``fp16_contents`` and ``bf16_contents`` for the two without one), the tensor marked
``"raw": true``; and a BYTES element is a JSON string when it is valid UTF-8, else
``{"base64": "..."}``. Integers are JSON numbers (as in the protocol's REST form). A
tensor that does not decode gets an ``"error"`` and keeps its contents as sent: a typed
one its lists, a raw one its bytes in base64 under ``contents.undecodable``.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format

from proxy.protocols import MethodCodec, Outputs, serving_pool
from proxy.protocols.predict_v1 import json_float
from proxy.tensors import TensorError, bfloat16_bits, from_bfloat16_bits

__all__ = [
    "CODECS",
    "DATATYPES",
    "MODEL_INFER",
    "SERVICE",
    "ModelInferCodec",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "TensorError",
    "add_input",
    "add_output",
    "datatype_of",
    "decode_contents",
    "decode_raw",
    "encode_raw",
    "infer_json",
    "request_inputs",
    "response_outputs",
    "set_contents",
]

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"


def _message(name: str) -> type[Any]:
    return serving_pool.message_class(f"inference.{name}")


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
_InferTensorContents = _message("InferTensorContents")


# ------------------------------------------------------------------------------ datatypes


@dataclass(frozen=True, slots=True)
class _Layout:
    name: str
    dtype: np.dtype[Any]
    """What the tensor decodes to (native byte order; object of bytes for BYTES)."""
    wire: np.dtype[Any] | None
    """One raw element, little-endian; None for BYTES (length-prefixed)."""
    field: str | None = None
    """The InferTensorContents list of the typed form; None: raw only."""
    field_dtype: np.dtype[Any] | None = None
    """The protobuf scalar type of `field`, which may be wider than `dtype`."""

    @property
    def payload_field(self) -> str:
        """Where a payload shows the values: the typed list, or e.g. ``fp16_contents``."""
        return self.field or f"{self.name.lower()}_contents"


def _layout(
    name: str, dtype: Any, wire: Any, field: str | None = None, field_dtype: Any = None
) -> _Layout:
    return _Layout(
        name,
        np.dtype(dtype),
        None if wire is None else np.dtype(wire),
        field,
        None if field_dtype is None else np.dtype(field_dtype),
    )


_LAYOUTS: dict[str, _Layout] = {
    layout.name: layout
    for layout in (
        _layout("BOOL", np.bool_, "u1", "bool_contents", np.bool_),
        _layout("UINT8", np.uint8, "u1", "uint_contents", np.uint32),
        _layout("UINT16", np.uint16, "<u2", "uint_contents", np.uint32),
        _layout("UINT32", np.uint32, "<u4", "uint_contents", np.uint32),
        _layout("UINT64", np.uint64, "<u8", "uint64_contents", np.uint64),
        _layout("INT8", np.int8, "i1", "int_contents", np.int32),
        _layout("INT16", np.int16, "<i2", "int_contents", np.int32),
        _layout("INT32", np.int32, "<i4", "int_contents", np.int32),
        _layout("INT64", np.int64, "<i8", "int64_contents", np.int64),
        _layout("FP16", np.float16, "<f2"),
        _layout("FP32", np.float32, "<f4", "fp32_contents", np.float32),
        _layout("FP64", np.float64, "<f8", "fp64_contents", np.float64),
        _layout("BF16", np.float32, "<u2"),
        _layout("BYTES", object, None, "bytes_contents", object),
    )
}

DATATYPES: tuple[str, ...] = tuple(_LAYOUTS)
"""Every datatype name of the protocol."""

_DATATYPE_OF_DTYPE = {
    layout.dtype: name for name, layout in _LAYOUTS.items() if name not in ("BF16", "BYTES")
}


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The protocol datatype that holds a numpy array's dtype without loss: float32 ->
    "FP32", int8 -> "INT8", str/bytes/object -> "BYTES", ... (never "BF16": numpy has none)."""
    dtype = np.asarray(array).dtype
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    name = _DATATYPE_OF_DTYPE.get(dtype.newbyteorder("="))
    if name is None:
        raise TensorError(f"no Open Inference datatype for numpy dtype {dtype}")
    return name


def _layout_of(datatype: str) -> _Layout:
    layout = _LAYOUTS.get(datatype)
    if layout is None:
        raise TensorError(f"unknown datatype {datatype!r}; the protocol has {', '.join(DATATYPES)}")
    return layout


# numpy builds no array of more dimensions than this (32 before numpy 2, 64 since), nor
# one whose dimensions, zeros left out, multiply past what it can address: even an empty
# tensor of shape [0, 2**62, 2**62] is refused. The widest element decoded is 8 bytes.
_MAX_RANK = 32
_MAX_ELEMENTS = np.iinfo(np.intp).max // 8


def _element_count(shape: Iterable[int]) -> tuple[list[int], int]:
    """The dimensions of `shape` and their element count; TensorError for a shape that no
    numpy array can have, so that decoding never meets numpy's own ValueError."""
    dims = [int(dim) for dim in shape]
    if len(dims) > _MAX_RANK:
        raise TensorError(f"shape of {len(dims)} dimensions; at most {_MAX_RANK} are decoded")
    if any(dim < 0 for dim in dims):
        raise TensorError(f"shape {dims} has a negative dimension")
    if math.prod(dim for dim in dims if dim) > _MAX_ELEMENTS:
        raise TensorError(f"shape {dims} is too large for an array")
    return dims, math.prod(dims)


def _as_array(array: Any) -> np.ndarray[Any, Any]:
    if isinstance(array, np.ndarray):
        return array
    try:
        values = np.asarray(array)
    except (TypeError, ValueError):  # e.g. str and non-ASCII bytes in one list
        values = np.array(array, dtype=object)
    if values.dtype.kind in ("S", "U"):
        # numpy's fixed-width strings drop trailing NULs; keep a list's elements exact.
        values = np.array(array, dtype=object)
    return values


def _cast(
    values: np.ndarray[Any, Any], datatype: str, dtype: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    """`values` as `dtype`, refusing conversions that would change an integer or bool value
    (floats narrow silently, as float64 -> FP32 is an ordinary choice)."""
    if values.dtype == dtype:
        return values
    kind = values.dtype.kind
    if kind not in "biufO" or (
        kind == "O"
        and not all(isinstance(v, int | float | np.number | np.bool_) for v in values.flat)
    ):
        raise TensorError(f"cannot encode {values.dtype} values as {datatype}")
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            converted = values.astype(dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TensorError(f"cannot encode these {values.dtype} values as {datatype}") from exc
    if dtype.kind in "biu" and not np.array_equal(converted, values):
        raise TensorError(f"values out of range of {datatype} or not integral")
    return converted


def _bytes_elements(values: np.ndarray[Any, Any]) -> list[bytes]:
    elements = []
    for element in values.ravel().tolist():
        if isinstance(element, bytes):
            elements.append(element)
        elif isinstance(element, str):
            elements.append(element.encode("utf-8"))
        else:
            raise TensorError(f"BYTES elements must be str or bytes, got {type(element).__name__}")
    return elements


# ---------------------------------------------------------------------------- raw form


def encode_raw(array: Any, datatype: str) -> bytes:
    """The raw form of `array` as a tensor of `datatype`: row-major, little-endian; BYTES
    elements (str as UTF-8, or bytes) each as a 4-byte little-endian length then the bytes."""
    layout = _layout_of(datatype)
    values = _as_array(array)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for element in _bytes_elements(values):
            if len(element) > 0xFFFFFFFF:
                raise TensorError("a BYTES element longer than 4 GiB has no raw form")
            parts += (struct.pack("<I", len(element)), element)
        return b"".join(parts)
    if datatype == "BF16":
        return bfloat16_bits(_cast(values, datatype, np.dtype(np.float32))).tobytes()
    assert layout.wire is not None
    return np.ascontiguousarray(_cast(values, datatype, layout.dtype), dtype=layout.wire).tobytes()


def decode_raw(data: bytes, datatype: str, shape: Iterable[int]) -> np.ndarray[Any, Any]:
    """A raw tensor as a numpy array of `shape`. BYTES decodes to an object array of bytes,
    BF16 to float32. Raises TensorError for an unknown datatype, a shape no array can have,
    a size that does not match the shape, or a truncated BYTES element."""
    layout = _layout_of(datatype)
    dims, count = _element_count(shape)
    data = bytes(data)
    if layout.wire is None:
        # _split_bytes parses what the data holds and checks its count against the shape's,
        # so an array of `count` elements is allocated only when the data has them all.
        elements = _split_bytes(data, count)
        flat = np.empty(count, dtype=object)
        flat[:] = elements
        return flat.reshape(dims)
    expected = count * layout.wire.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{datatype} tensor of shape {dims} needs {expected} raw bytes, got {len(data)}"
        )
    wire = np.frombuffer(data, dtype=layout.wire)
    if datatype == "BF16":
        flat = from_bfloat16_bits(wire)
    elif datatype == "BOOL":
        flat = wire != 0
    else:
        flat = wire.astype(layout.dtype)  # a copy: the array owns its memory
    return flat.reshape(dims)


def _split_bytes(data: bytes, count: int) -> list[bytes]:
    elements: list[bytes] = []
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise TensorError(
                f"raw BYTES truncated: {end - offset} bytes left where a 4-byte length "
                f"should start element {len(elements)}"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > end:
            raise TensorError(
                f"raw BYTES truncated: element {len(elements)} claims {length} bytes, "
                f"{end - offset} left"
            )
        elements.append(data[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise TensorError(f"raw BYTES holds {len(elements)} elements, the shape needs {count}")
    return elements


# -------------------------------------------------------------------------- typed form


def set_contents(contents: Any, array: Any, datatype: str) -> None:
    """Fill an InferTensorContents with `array` in the list of `datatype` (flattened,
    row-major). FP16 and BF16 have no list: they raise TensorError (send them raw)."""
    layout = _layout_of(datatype)
    if layout.field is None or layout.field_dtype is None:
        raise TensorError(f"{datatype} has no typed contents in the protocol; send it raw")
    values = _as_array(array)
    target = getattr(contents, layout.field)
    if datatype == "BYTES":
        target.extend(_bytes_elements(values))
        return
    # tolist() hands protobuf plain Python scalars, much faster than numpy scalars.
    target.extend(_cast(values, datatype, layout.dtype).ravel().tolist())


def decode_contents(tensor: Any) -> np.ndarray[Any, Any]:
    """A typed tensor (an input or output tensor message) as a numpy array of its shape.
    Raises TensorError for an unknown datatype, a shape no array can have, a count that
    does not fit the shape, or values out of the datatype's range."""
    layout = _layout_of(tensor.datatype)
    dims, count = _element_count(tensor.shape)
    if layout.field is None or layout.field_dtype is None:
        if count == 0:
            return np.empty(dims, dtype=layout.dtype)
        raise TensorError(f"{tensor.datatype} has no typed contents in the protocol; only raw")
    values = getattr(tensor.contents, layout.field)
    if len(values) != count:
        raise TensorError(
            f"{tensor.datatype} tensor of shape {dims} needs {count} {layout.field} "
            f"values, has {len(values)}"
        )
    if tensor.datatype == "BYTES":
        flat = np.empty(count, dtype=object)
        flat[:] = list(values)
        return flat.reshape(dims)
    # upb's repeated fields hand numpy their values in one copy.
    wide = np.array(values, dtype=layout.field_dtype)
    if layout.field_dtype != layout.dtype:
        narrow = wide.astype(layout.dtype)
        if not np.array_equal(narrow, wide):
            raise TensorError(f"{layout.field} holds values out of range of {tensor.datatype}")
        wide = narrow
    return wide.reshape(dims)


# ----------------------------------------------------------------------------- messages


def request_inputs(request: Any) -> dict[str, np.ndarray[Any, Any]]:
    """A ModelInferRequest's inputs as arrays by name (raw or typed, as sent)."""
    return _tensors_by_name(request.inputs, request.raw_input_contents, "raw_input_contents")


def response_outputs(response: Any) -> dict[str, np.ndarray[Any, Any]]:
    """A ModelInferResponse's outputs as arrays by name (raw or typed, as sent)."""
    return _tensors_by_name(response.outputs, response.raw_output_contents, "raw_output_contents")


def _tensors_by_name(
    tensors: Sequence[Any], raw: Sequence[bytes], raw_field: str
) -> dict[str, np.ndarray[Any, Any]]:
    if raw and len(raw) != len(tensors):
        raise TensorError(
            f"{len(raw)} {raw_field} entries for {len(tensors)} tensors; "
            "the protocol sends every tensor raw or none"
        )
    arrays = {}
    for index, tensor in enumerate(tensors):
        try:
            if raw:
                arrays[tensor.name] = decode_raw(raw[index], tensor.datatype, tensor.shape)
            else:
                arrays[tensor.name] = decode_contents(tensor)
        except TensorError as exc:
            raise TensorError(f"tensor {tensor.name!r}: {exc}") from exc
    return arrays


def add_input(request: Any, name: str, array: Any, datatype: str, *, raw: bool) -> Any:
    """Append an input tensor holding `array` (its shape kept) to a ModelInferRequest, in
    raw_input_contents when `raw`, else typed; return the tensor message. A request holds
    either every input raw or none, so mixing the two raises TensorError."""
    return _add_tensor(request.inputs, request.raw_input_contents, name, array, datatype, raw)


def add_output(response: Any, name: str, array: Any, datatype: str, *, raw: bool) -> Any:
    """Append an output tensor to a ModelInferResponse, as :func:`add_input` does."""
    return _add_tensor(response.outputs, response.raw_output_contents, name, array, datatype, raw)


def _add_tensor(
    tensors: Any, raw_contents: Any, name: str, array: Any, datatype: str, raw: bool
) -> Any:
    holds_typed = len(tensors) > len(raw_contents)
    if (raw and holds_typed) or (not raw and raw_contents):
        kind = "typed" if raw else "raw"
        raise TensorError(
            f"tensor {name!r}: the message already holds {kind} tensors; "
            "the protocol sends every tensor raw or none"
        )
    values = _as_array(array)
    try:
        if raw:
            data = encode_raw(values, datatype)
        else:
            contents = _InferTensorContents()
            set_contents(contents, values, datatype)
    except TensorError as exc:
        raise TensorError(f"tensor {name!r}: {exc}") from exc
    tensor = tensors.add(name=name, datatype=datatype, shape=values.shape)
    if raw:
        raw_contents.append(data)
    else:
        tensor.contents.CopyFrom(contents)
    return tensor


# ------------------------------------------------------------------------------ payloads


def _bytes_value(element: bytes) -> Any:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(element).decode("ascii")}


def _floats(values: Iterable[float], single: bool) -> list[float | str]:
    return [json_float(v, single) for v in values]


def _half_floats(values: np.ndarray[Any, Any]) -> list[float | str]:
    # str() of a numpy float16 is its shortest round-tripping form ("0.1", not 0.0999755859375).
    return [json_float(float(str(v)), False) for v in values.ravel()]


_TYPED_JSON = {
    "bool_contents": list,
    "int_contents": list,
    "int64_contents": list,
    "uint_contents": list,
    "uint64_contents": list,
    "fp32_contents": lambda values: _floats(values, True),
    "fp64_contents": lambda values: _floats(values, False),
    "bytes_contents": lambda values: [_bytes_value(v) for v in values],
}


def _array_json(array: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [_bytes_value(v) for v in array.ravel().tolist()]
    if datatype == "FP16":
        return _half_floats(array)
    if datatype in ("FP32", "BF16"):
        return _floats(array.ravel().tolist(), True)
    if datatype == "FP64":
        return _floats(array.ravel().tolist(), False)
    return list(array.ravel().tolist())


def _parameters_json(parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(parameters):
        parameter = parameters[key]
        which = parameter.WhichOneof("parameter_choice")
        if which is None:
            out[key] = None
        elif which == "double_param":
            out[key] = json_float(parameter.double_param, False)
        else:
            out[key] = getattr(parameter, which)
    return out


def _tensor_json(tensor: Any, raw: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
    }
    if tensor.parameters:
        out["parameters"] = _parameters_json(tensor.parameters)
    if raw is not None:
        out["raw"] = True
        try:
            array = decode_raw(raw, tensor.datatype, tensor.shape)
            field = _layout_of(tensor.datatype).payload_field
            out["contents"] = {field: _array_json(array, tensor.datatype)}
        except Exception as exc:  # whatever the cause, only this tensor loses its values
            # Kept under "contents" so that redacting the tensor's name still hides it.
            out["contents"] = {"undecodable": base64.b64encode(raw).decode("ascii")}
            out["error"] = _error_text(exc)
        return out
    if tensor.HasField("contents"):
        # The values as sent, whichever lists they are in, even when they do not decode.
        out["contents"] = {
            field: convert(getattr(tensor.contents, field))
            for field, convert in _TYPED_JSON.items()
            if getattr(tensor.contents, field)
        }
    try:
        decode_contents(tensor)
    except Exception as exc:
        out["error"] = _error_text(exc)
    return out


def _error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, TensorError) else f"{type(exc).__name__}: {exc}"


def infer_json(message: Any) -> dict[str, Any]:
    """A ModelInferRequest or ModelInferResponse as a JSON-ready dict (see the module's
    docstring for the layout)."""
    reply = message.DESCRIPTOR.full_name == "inference.ModelInferResponse"
    out: dict[str, Any] = {}
    for field in ("model_name", "model_version", "id"):
        value = getattr(message, field)
        if value:
            out[field] = value
    if message.parameters:
        out["parameters"] = _parameters_json(message.parameters)
    tensors = message.outputs if reply else message.inputs
    raw = message.raw_output_contents if reply else message.raw_input_contents
    if tensors:
        out["outputs" if reply else "inputs"] = [
            _tensor_json(tensor, raw[index] if index < len(raw) else None)
            for index, tensor in enumerate(tensors)
        ]
    if len(raw) > len(tensors):
        # Bytes that belong to no tensor cannot be named, so neither shown nor redacted.
        out["unmatched_raw_contents"] = len(raw) - len(tensors)
    if not reply and message.outputs:
        requested = []
        for output in message.outputs:
            entry: dict[str, Any] = {"name": output.name}
            if output.parameters:
                entry["parameters"] = _parameters_json(output.parameters)
            requested.append(entry)
        out["outputs"] = requested
    return out


# -------------------------------------------------------------------------------- codecs


class ModelInferCodec(MethodCodec):
    """``ModelInfer``: readable payloads, outputs for comparison, the request's ``id``."""

    method = MODEL_INFER
    request_type = "inference.ModelInferRequest"
    reply_type = "inference.ModelInferResponse"

    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        try:
            message = (ModelInferResponse if reply else ModelInferRequest).FromString(data)
            return infer_json(message)
        except Exception:  # protobuf's DecodeError: not this message
            return None

    def outputs(self, reply: bytes) -> Outputs | None:
        try:
            response = ModelInferResponse.FromString(reply)
            arrays = response_outputs(response)
        except Exception:  # DecodeError, TensorError: then replies are compared as bytes
            return None
        numeric = frozenset(t.name for t in response.outputs if t.datatype != "BYTES")
        return Outputs(arrays, numeric)

    def request_id(self, request: bytes) -> str:
        try:
            return _top_level_string(request, _ID_FIELD)
        except (IndexError, ValueError):
            # An undecodable request still goes to production, which answers the client.
            return ""


class _MetadataCodec(MethodCodec):
    """A health or metadata method: payloads only (these methods are never shadowed by
    default, see DEFAULT_NEVER_SHADOWED, and their replies say nothing about a model)."""

    def __init__(self, name: str) -> None:
        self.method = f"/{SERVICE}/{name}"
        self.request_type = f"inference.{name}Request"
        self.reply_type = f"inference.{name}Response"
        self._request = _message(f"{name}Request")
        self._reply = _message(f"{name}Response")

    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        try:
            message = (self._reply if reply else self._request).FromString(data)
            out = json_format.MessageToDict(message, preserving_proto_field_name=True)
        except Exception:
            return None
        for key in ("inputs", "outputs"):  # ModelMetadataResponse: shapes as numbers
            for tensor in out.get(key, ()):
                tensor["shape"] = [int(dim) for dim in tensor.get("shape", ())]
        return out


# ----------------------------------------------------------------------- the request id
# request_id runs on the request path: rather than parse every tensor (and copy the raw
# contents), walk the top-level fields of the wire format and keep only `id`.

_ID_FIELD = 3  # ModelInferRequest.id
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]  # IndexError when truncated
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _top_level_string(data: bytes, number: int) -> str:
    """The last value of top-level string field `number` ("" when absent); ValueError or
    IndexError when the bytes are not a protobuf message."""
    found = b""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire_type == _VARINT:
            _, position = _varint(data, position)
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _FIXED32:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            if field == number:
                found = data[position : position + length]
            position += length
        else:
            raise ValueError(f"wire type {wire_type}")
        if field == number and wire_type != _LENGTH_DELIMITED:
            raise ValueError("the string field has a scalar wire type")
        if position > end:
            raise ValueError("truncated")
    return found.decode("utf-8")  # UnicodeDecodeError is a ValueError


CODECS: tuple[MethodCodec, ...] = (
    ModelInferCodec(),
    *(
        _MetadataCodec(name)
        for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata")
    ),
)
