"""TensorFlow Serving's PredictionService (protos/serving/tf_serving.proto): tensors and codecs.

Tensors convert between numpy arrays and ``tensorflow.TensorProto`` as TensorFlow itself
reads them: values from ``tensor_content`` (raw little-endian element bytes) or from the
typed ``*_val`` field of the dtype, where fewer values than the shape needs are padded with
the last one and none at all mean zeros.

Recorded payloads (:class:`PredictCodec`) keep the messages' fields, with each tensor map
turned into a list of ``{"name", "dtype", "shape", "contents"}`` dicts sorted by name:
``dtype`` is the DataType's name (``"DT_FLOAT"``), ``shape`` a list of ints, ``contents``
the values flattened row-major, however they were encoded. Floats follow protobuf's JSON
form (NaN and infinities as strings), complex values are ``[real, imaginary]`` pairs, and
DT_STRING values are UTF-8 text when every element of the tensor is valid UTF-8, else all
base64; such a tensor says which in its ``"encoding"`` (``"utf-8"`` or ``"base64"``). A
tensor that does not decode keeps its name, dtype and shape and gets an ``"error"``
instead of ``contents``.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from google.protobuf.message import Message

from proxy.protocols import MethodCodec, Outputs, serving_pool
from proxy.protocols.predict_v1 import json_float
from proxy.tensors import TensorError, bfloat16_bits, from_bfloat16_bits

__all__ = [
    "CODECS",
    "GET_MODEL_METADATA",
    "PREDICT",
    "SIGNATURE_DEF_MAP_URL",
    "GetModelMetadataCodec",
    "GetModelMetadataRequest",
    "GetModelMetadataResponse",
    "ModelSpec",
    "PredictCodec",
    "PredictRequest",
    "PredictResponse",
    "SignatureDef",
    "SignatureDefMap",
    "TensorInfo",
    "TensorProto",
    "TensorShapeProto",
    "array_to_tensor",
    "data_type_name",
    "tensor_shape",
    "tensor_to_array",
]

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"

TensorProto = serving_pool.message_class("tensorflow.TensorProto")
TensorShapeProto = serving_pool.message_class("tensorflow.TensorShapeProto")
TensorInfo = serving_pool.message_class("tensorflow.TensorInfo")
SignatureDef = serving_pool.message_class("tensorflow.SignatureDef")
ModelSpec = serving_pool.message_class("tensorflow.serving.ModelSpec")
PredictRequest = serving_pool.message_class("tensorflow.serving.PredictRequest")
PredictResponse = serving_pool.message_class("tensorflow.serving.PredictResponse")
SignatureDefMap = serving_pool.message_class("tensorflow.serving.SignatureDefMap")
GetModelMetadataRequest = serving_pool.message_class("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = serving_pool.message_class("tensorflow.serving.GetModelMetadataResponse")

SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
"""The Any type URL of GetModelMetadataResponse.metadata["signature_def"]."""

_DATA_TYPE = serving_pool.POOL.FindEnumTypeByName("tensorflow.DataType")


def _data_type(name: str) -> int:
    return int(_DATA_TYPE.values_by_name[name].number)


DT_INVALID = _data_type("DT_INVALID")
DT_FLOAT = _data_type("DT_FLOAT")
DT_DOUBLE = _data_type("DT_DOUBLE")
DT_INT32 = _data_type("DT_INT32")
DT_UINT8 = _data_type("DT_UINT8")
DT_INT16 = _data_type("DT_INT16")
DT_INT8 = _data_type("DT_INT8")
DT_STRING = _data_type("DT_STRING")
DT_COMPLEX64 = _data_type("DT_COMPLEX64")
DT_INT64 = _data_type("DT_INT64")
DT_BOOL = _data_type("DT_BOOL")
DT_QINT8 = _data_type("DT_QINT8")
DT_QUINT8 = _data_type("DT_QUINT8")
DT_QINT32 = _data_type("DT_QINT32")
DT_BFLOAT16 = _data_type("DT_BFLOAT16")
DT_QINT16 = _data_type("DT_QINT16")
DT_QUINT16 = _data_type("DT_QUINT16")
DT_UINT16 = _data_type("DT_UINT16")
DT_COMPLEX128 = _data_type("DT_COMPLEX128")
DT_HALF = _data_type("DT_HALF")
DT_UINT32 = _data_type("DT_UINT32")
DT_UINT64 = _data_type("DT_UINT64")

# DataType -> (the typed field that carries it, the numpy dtype of its raw bytes in
# tensor_content, the numpy dtype tensor_to_array returns). numpy has no bfloat16: those
# values come back as float32, which holds every one of them exactly.
_LAYOUT: dict[int, tuple[str, np.dtype[Any], np.dtype[Any]]] = {
    DT_FLOAT: ("float_val", np.dtype("<f4"), np.dtype(np.float32)),
    DT_DOUBLE: ("double_val", np.dtype("<f8"), np.dtype(np.float64)),
    DT_INT32: ("int_val", np.dtype("<i4"), np.dtype(np.int32)),
    DT_UINT8: ("int_val", np.dtype("u1"), np.dtype(np.uint8)),
    DT_INT16: ("int_val", np.dtype("<i2"), np.dtype(np.int16)),
    DT_INT8: ("int_val", np.dtype("i1"), np.dtype(np.int8)),
    DT_UINT16: ("int_val", np.dtype("<u2"), np.dtype(np.uint16)),
    DT_QINT8: ("int_val", np.dtype("i1"), np.dtype(np.int8)),
    DT_QUINT8: ("int_val", np.dtype("u1"), np.dtype(np.uint8)),
    DT_QINT16: ("int_val", np.dtype("<i2"), np.dtype(np.int16)),
    DT_QUINT16: ("int_val", np.dtype("<u2"), np.dtype(np.uint16)),
    DT_QINT32: ("int_val", np.dtype("<i4"), np.dtype(np.int32)),
    DT_INT64: ("int64_val", np.dtype("<i8"), np.dtype(np.int64)),
    DT_UINT32: ("uint32_val", np.dtype("<u4"), np.dtype(np.uint32)),
    DT_UINT64: ("uint64_val", np.dtype("<u8"), np.dtype(np.uint64)),
    DT_BOOL: ("bool_val", np.dtype("?"), np.dtype(np.bool_)),
    DT_HALF: ("half_val", np.dtype("<f2"), np.dtype(np.float16)),
    DT_BFLOAT16: ("half_val", np.dtype("<u2"), np.dtype(np.float32)),
    DT_COMPLEX64: ("scomplex_val", np.dtype("<c8"), np.dtype(np.complex64)),
    DT_COMPLEX128: ("dcomplex_val", np.dtype("<c16"), np.dtype(np.complex128)),
    DT_STRING: ("string_val", np.dtype(object), np.dtype(object)),
}

# numpy dtype -> DataType for array_to_tensor without dtype=. bfloat16 and the quantized
# types have no numpy dtype of their own: pass dtype= for them.
_DATA_TYPE_OF: dict[np.dtype[Any], int] = {
    np.dtype(np.float32): DT_FLOAT,
    np.dtype(np.float64): DT_DOUBLE,
    np.dtype(np.int32): DT_INT32,
    np.dtype(np.uint8): DT_UINT8,
    np.dtype(np.int16): DT_INT16,
    np.dtype(np.int8): DT_INT8,
    np.dtype(np.uint16): DT_UINT16,
    np.dtype(np.int64): DT_INT64,
    np.dtype(np.uint32): DT_UINT32,
    np.dtype(np.uint64): DT_UINT64,
    np.dtype(np.bool_): DT_BOOL,
    np.dtype(np.float16): DT_HALF,
    np.dtype(np.complex64): DT_COMPLEX64,
    np.dtype(np.complex128): DT_COMPLEX128,
}

_COMPLEX = frozenset({DT_COMPLEX64, DT_COMPLEX128})
# Padding a few typed values out to a huge shape would allocate it all in the recorder;
# a tensor that asks for more than this beyond the values it carries is not decoded.
_MAX_PADDED_ELEMENTS = 1 << 22
# numpy builds no array of more dimensions than this (32 before numpy 2, 64 since), nor
# one whose dimensions, zeros left out, multiply past what it can address: even an empty
# tensor of shape [0, 2**62, 2**62] is refused. The widest element decoded is complex128.
_MAX_RANK = 32
_MAX_ELEMENTS = np.iinfo(np.intp).max // 16


def data_type_name(dtype: int) -> str:
    """The name of a DataType value ("DT_FLOAT"), or "DataType(<n>)" for an unknown one."""
    value = _DATA_TYPE.values_by_number.get(dtype)
    return value.name if value is not None else f"DataType({dtype})"


# ------------------------------------------------------------------ tensor <-> array


def tensor_shape(tensor: Message) -> tuple[int, ...]:
    """The shape of a TensorProto (a scalar when it has none); TensorError when the rank
    is unknown or a dimension is negative, which no tensor with values can have, or when
    no numpy array can have the shape (over 32 dimensions, or too many elements)."""
    t: Any = tensor
    if not t.HasField("tensor_shape"):
        return ()
    if t.tensor_shape.unknown_rank:
        raise TensorError("tensor has an unknown rank")
    if len(t.tensor_shape.dim) > _MAX_RANK:
        raise TensorError(
            f"tensor has {len(t.tensor_shape.dim)} dimensions; at most {_MAX_RANK} are decoded"
        )
    shape = tuple(int(dim.size) for dim in t.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise TensorError(f"tensor has a negative dimension in shape {list(shape)}")
    if math.prod(size for size in shape if size) > _MAX_ELEMENTS:
        raise TensorError(f"tensor shape {list(shape)} is too large for an array")
    return shape


def tensor_to_array(tensor: Message) -> np.ndarray[Any, Any]:
    """The values of a TensorProto as a numpy array of its shape.

    Reads ``tensor_content`` when it is set, else the dtype's typed field (padded to the
    shape with its last value, or zeros when empty, as TensorFlow does). DT_STRING
    becomes an object array of ``bytes``, DT_HALF float16, DT_BFLOAT16 float32. Raises
    TensorError for an unknown or unset dtype, a bad shape, or contents that do not fit it.
    """
    t: Any = tensor
    if t.dtype not in _LAYOUT:
        raise TensorError(f"cannot decode a {data_type_name(t.dtype)} tensor")
    shape = tensor_shape(tensor)
    count = math.prod(shape)
    if t.tensor_content:
        flat = _from_content(t.dtype, t.tensor_content, count)
    else:
        flat = _from_typed_field(t, count)
    return flat.reshape(shape)


def array_to_tensor(
    array: np.ndarray[Any, Any] | list[Any], dtype: int | None = None, *, raw: bool
) -> Message:
    """A TensorProto holding `array` (shape kept, values flattened row-major).

    The DataType follows the numpy dtype (float32 -> DT_FLOAT, float16 -> DT_HALF,
    str/bytes/object -> DT_STRING with str encoded as UTF-8, and so on); pass `dtype` for
    another one, e.g. DT_BFLOAT16 (rounded to nearest even from float32) or a quantized
    type. `raw` puts the values in ``tensor_content`` (what TensorFlow's own clients send
    for large tensors) instead of the dtype's typed ``*_val`` field.
    """
    values = array if isinstance(array, np.ndarray) else _list_array(array)
    data_type = _data_type_for(values) if dtype is None else dtype
    if data_type not in _LAYOUT:
        raise TensorError(f"cannot encode a tensor as {data_type_name(data_type)}")
    field, wire, _ = _LAYOUT[data_type]
    tensor: Any = TensorProto(dtype=data_type)
    for size in values.shape:
        tensor.tensor_shape.dim.add(size=size)
    if data_type == DT_STRING:
        elements = _encode_strings(values.ravel().tolist())
        if raw:
            tensor.tensor_content = _encode_string_list(elements)
        else:
            tensor.string_val.extend(elements)
        return tensor
    try:
        if data_type == DT_BFLOAT16:
            flat = bfloat16_bits(values.astype(np.float32, copy=False).ravel())
        else:
            flat = values.astype(wire, copy=False).ravel()
    except (TypeError, ValueError) as exc:
        raise TensorError(
            f"cannot convert {values.dtype} values to {data_type_name(data_type)}"
        ) from exc
    if raw:
        tensor.tensor_content = flat.tobytes()
    elif data_type in _COMPLEX:
        # Alternating real and imaginary parts.
        getattr(tensor, field).extend(flat.view(flat.real.dtype).tolist())
    elif data_type == DT_HALF:
        getattr(tensor, field).extend(flat.view(np.uint16).tolist())
    else:
        # tolist() hands protobuf plain Python scalars, much faster than numpy's one by one.
        getattr(tensor, field).extend(flat.tolist())
    return tensor


def _list_array(elements: list[Any]) -> np.ndarray[Any, Any]:
    try:
        values = np.asarray(elements)
    except (UnicodeDecodeError, ValueError):  # str and non-ASCII bytes mixed, say
        return np.array(elements, dtype=object)
    if values.dtype.kind in ("S", "U"):
        # numpy's fixed-width strings drop trailing NULs; keep a list's elements exact.
        return np.array(elements, dtype=object)
    return values


def _data_type_for(values: np.ndarray[Any, Any]) -> int:
    if values.dtype.kind in ("U", "S", "O"):
        return DT_STRING
    data_type = _DATA_TYPE_OF.get(values.dtype)
    if data_type is None:
        raise TensorError(
            f"no TensorFlow DataType for numpy dtype {values.dtype}; "
            "convert the array or pass dtype= explicitly"
        )
    return data_type


def _from_content(data_type: int, content: bytes, count: int) -> np.ndarray[Any, Any]:
    if data_type == DT_STRING:
        return _decode_string_list(content, count)
    _, wire, result = _LAYOUT[data_type]
    if len(content) != count * wire.itemsize:
        raise TensorError(
            f"{data_type_name(data_type)} tensor of {count} values has "
            f"{len(content)} bytes of tensor_content, not {count * wire.itemsize}"
        )
    flat = np.frombuffer(content, dtype=wire)
    if data_type == DT_BOOL:
        # Any nonzero byte is true; numpy would keep the byte as it is.
        return np.frombuffer(content, dtype=np.uint8) != 0
    if data_type == DT_BFLOAT16:
        return from_bfloat16_bits(flat)
    # astype copies: the array owns its memory and is in native byte order.
    return flat.astype(result)


def _from_typed_field(tensor: Any, count: int) -> np.ndarray[Any, Any]:
    field, _, result = _LAYOUT[tensor.dtype]
    values = getattr(tensor, field)
    if tensor.dtype == DT_STRING:
        flat = np.empty(len(values), dtype=object)
        # Assigned element by element: np.array would make fixed-width "S" strings and
        # strip trailing NULs.
        flat[:] = list(values)
    elif tensor.dtype in _COMPLEX:
        parts = np.array(values, dtype=np.float32 if tensor.dtype == DT_COMPLEX64 else np.float64)
        if parts.size % 2:
            raise TensorError(
                f"{data_type_name(tensor.dtype)} tensor has an odd number ({parts.size}) "
                "of real and imaginary parts"
            )
        flat = parts.view(result)
    elif tensor.dtype in (DT_HALF, DT_BFLOAT16):
        bits = np.array(values, dtype=np.int32).astype(np.uint16)
        flat = bits.view(np.float16) if tensor.dtype == DT_HALF else from_bfloat16_bits(bits)
    else:
        # int_val carries the narrow integer types too; astype wraps as TensorFlow's cast does.
        wide = np.int32 if field == "int_val" else result
        flat = np.array(values, dtype=wide).astype(result, copy=False)
    return _pad(flat, count, tensor.dtype)


def _pad(flat: np.ndarray[Any, Any], count: int, data_type: int) -> np.ndarray[Any, Any]:
    if len(flat) >= count:
        # TensorFlow ignores values beyond the shape.
        return flat[:count]
    if count > _MAX_PADDED_ELEMENTS:
        raise TensorError(
            f"{data_type_name(data_type)} tensor of {count} values carries {len(flat)}; "
            f"not padding it past {_MAX_PADDED_ELEMENTS} values"
        )
    filler = flat[-1] if len(flat) else (b"" if flat.dtype == object else 0)
    padded = np.empty(count, dtype=flat.dtype)
    padded[: len(flat)] = flat
    padded[len(flat) :] = filler
    return padded


def _encode_strings(elements: list[Any]) -> list[bytes]:
    encoded = []
    for element in elements:
        if isinstance(element, bytes):
            encoded.append(element)
        elif isinstance(element, str):
            encoded.append(element.encode("utf-8"))
        else:
            raise TensorError(
                f"DT_STRING elements must be str or bytes, got {type(element).__name__}"
            )
    return encoded


def _encode_string_list(elements: list[bytes]) -> bytes:
    # TensorFlow's tensor_content for strings: every length as a varint32, then the bytes.
    lengths = bytearray()
    for element in elements:
        size = len(element)
        while size >= 0x80:
            lengths.append(size & 0x7F | 0x80)
            size >>= 7
        lengths.append(size)
    return bytes(lengths) + b"".join(elements)


def _decode_string_list(content: bytes, count: int) -> np.ndarray[Any, Any]:
    sizes = []
    position = 0
    for _ in range(count):
        size = shift = 0
        while True:
            if position >= len(content) or shift > 28:
                raise TensorError("DT_STRING tensor_content has a bad length prefix")
            byte = content[position]
            position += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        sizes.append(size)
    if position + sum(sizes) != len(content):
        raise TensorError(
            f"DT_STRING tensor_content of {count} strings has {len(content) - position} "
            f"bytes of data, not {sum(sizes)}"
        )
    flat = np.empty(count, dtype=object)
    for index, size in enumerate(sizes):
        flat[index] = content[position : position + size]
        position += size
    return flat


# ------------------------------------------------------------------------- codecs


class PredictCodec(MethodCodec):
    """``PredictionService/Predict``: readable payloads, and outputs for comparison."""

    method = PREDICT
    request_type = PredictRequest.DESCRIPTOR.full_name
    reply_type = PredictResponse.DESCRIPTOR.full_name

    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        try:
            parsed: Any = (PredictResponse if reply else PredictRequest).FromString(data)
            out: dict[str, Any] = {}
            if parsed.HasField("model_spec"):
                out["model_spec"] = _model_spec_dict(parsed.model_spec)
            if reply:
                out["outputs"] = _tensor_list(parsed.outputs)
            else:
                out["inputs"] = _tensor_list(parsed.inputs)
                if parsed.output_filter:
                    out["output_filter"] = list(parsed.output_filter)
        except Exception:  # protobuf's DecodeError (not this message), or a bug: no payload
            return None
        return out

    def outputs(self, reply: bytes) -> Outputs | None:
        """The reply's outputs by name; all but DT_STRING are numeric. Complex outputs
        become float arrays with a last axis of (real, imaginary), so that the tolerance
        applies to both parts."""
        try:
            message: Any = PredictResponse.FromString(reply)
            arrays = {}
            for name, tensor in message.outputs.items():
                array = tensor_to_array(tensor)
                if tensor.dtype in _COMPLEX:
                    # np.stack, not a view: numpy cannot view a scalar as two floats.
                    array = np.stack((array.real, array.imag), axis=-1)
                arrays[name] = array
            numeric = frozenset(
                name for name, tensor in message.outputs.items() if tensor.dtype != DT_STRING
            )
        except Exception:  # TensorError, or protobuf's DecodeError: compare the bytes
            return None
        return Outputs(arrays, numeric)


class GetModelMetadataCodec(MethodCodec):
    """``PredictionService/GetModelMetadata``: readable payloads only. A
    ``signature_def`` entry is unpacked into its signatures; any other metadata value
    stays ``{"@type": url, "value": base64}``."""

    method = GET_MODEL_METADATA
    request_type = GetModelMetadataRequest.DESCRIPTOR.full_name
    reply_type = GetModelMetadataResponse.DESCRIPTOR.full_name

    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        try:
            parsed: Any = (
                GetModelMetadataResponse if reply else GetModelMetadataRequest
            ).FromString(data)
            out: dict[str, Any] = {}
            if parsed.HasField("model_spec"):
                out["model_spec"] = _model_spec_dict(parsed.model_spec)
            if reply:
                out["metadata"] = {
                    key: _metadata_value(value) for key, value in sorted(parsed.metadata.items())
                }
            elif parsed.metadata_field:
                out["metadata_field"] = list(parsed.metadata_field)
        except Exception:  # protobuf's DecodeError: not this message
            return None
        return out


CODECS: tuple[MethodCodec, ...] = (PredictCodec(), GetModelMetadataCodec())


# ---------------------------------------------------------------- payload helpers


def _model_spec_dict(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.name:
        out["name"] = spec.name
    if spec.HasField("version"):
        out["version"] = spec.version.value
    if spec.HasField("version_label"):
        out["version_label"] = spec.version_label
    if spec.signature_name:
        out["signature_name"] = spec.signature_name
    return out


def _dtype_json(dtype: int) -> str | int:
    value = _DATA_TYPE.values_by_number.get(dtype)
    return value.name if value is not None else dtype


def _shape_json(shape: Any) -> list[int] | None:
    # -1 marks a free dimension in signatures; None an unknown rank.
    return None if shape.unknown_rank else [int(dim.size) for dim in shape.dim]


def _tensor_list(tensors: Any) -> list[dict[str, Any]]:
    return [_tensor_dict(name, tensors[name]) for name in sorted(tensors)]


def _tensor_dict(name: str, tensor: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "dtype": _dtype_json(tensor.dtype)}
    out["shape"] = _shape_json(tensor.tensor_shape) if tensor.HasField("tensor_shape") else []
    encoding: str | None = None
    contents: list[Any]
    try:
        array = tensor_to_array(tensor)
        if tensor.dtype == DT_STRING:
            encoding, contents = _strings_json(array.ravel().tolist())
        else:
            contents = _values_json(array.ravel())
    except Exception as exc:  # whatever the cause, only this tensor loses its contents
        out["error"] = str(exc) if isinstance(exc, TensorError) else f"{type(exc).__name__}: {exc}"
        return out
    if encoding is not None:
        out["encoding"] = encoding
    out["contents"] = contents
    return out


def _values_json(flat: np.ndarray[Any, Any]) -> list[Any]:
    if flat.dtype.kind == "c":
        single = flat.dtype == np.complex64
        pairs = flat.view(flat.real.dtype).reshape(-1, 2).tolist()
        return [[json_float(re, single), json_float(im, single)] for re, im in pairs]
    if flat.dtype.kind == "f":
        # float16 values are float32 values too; their shortest float32 form reads well.
        single = flat.dtype != np.float64
        return [json_float(value, single) for value in flat.tolist()]
    return flat.tolist()


def _strings_json(elements: list[bytes]) -> tuple[str, list[str]]:
    try:
        return "utf-8", [element.decode("utf-8") for element in elements]
    except UnicodeDecodeError:
        return "base64", [base64.b64encode(element).decode("ascii") for element in elements]


def _metadata_value(value: Any) -> dict[str, Any]:
    if value.type_url == SIGNATURE_DEF_MAP_URL:
        signatures: Any = SignatureDefMap.FromString(value.value)
        return {
            "signature_def": {
                key: _signature_dict(signature)
                for key, signature in sorted(signatures.signature_def.items())
            }
        }
    return {"@type": value.type_url, "value": base64.b64encode(value.value).decode("ascii")}


def _signature_dict(signature: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if signature.method_name:
        out["method_name"] = signature.method_name
    for side in ("inputs", "outputs"):
        infos = getattr(signature, side)
        out[side] = [_tensor_info_dict(name, infos[name]) for name in sorted(infos)]
    return out


def _tensor_info_dict(name: str, info: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "dtype": _dtype_json(info.dtype)}
    if info.name:
        out["tensor_name"] = info.name
    if info.HasField("tensor_shape"):
        out["shape"] = _shape_json(info.tensor_shape)
    return out
