"""Conversion between numpy arrays and predict.v1 Tensor messages."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from proxy.gen import predict_pb2

__all__ = [
    "TensorError",
    "bfloat16_bits",
    "dtype_name",
    "from_bfloat16_bits",
    "from_tensor",
    "to_tensor",
]

_FP32 = predict_pb2.DATA_TYPE_FP32
_FP64 = predict_pb2.DATA_TYPE_FP64
_INT64 = predict_pb2.DATA_TYPE_INT64
_INT32 = predict_pb2.DATA_TYPE_INT32
_BOOL = predict_pb2.DATA_TYPE_BOOL
_BYTES = predict_pb2.DATA_TYPE_BYTES

# DataType -> (the TensorContents list that carries it, the numpy dtype it decodes to).
_LAYOUT: dict[int, tuple[str, np.dtype[Any]]] = {
    _FP32: ("fp32_contents", np.dtype(np.float32)),
    _FP64: ("fp64_contents", np.dtype(np.float64)),
    _INT64: ("int64_contents", np.dtype(np.int64)),
    _INT32: ("int32_contents", np.dtype(np.int32)),
    _BOOL: ("bool_contents", np.dtype(np.bool_)),
    _BYTES: ("bytes_contents", np.dtype(object)),
}

# numpy dtype -> DataType, for the dtypes that map without loss. Other dtypes (float16,
# uint8, ...) need an explicit `dtype=` so that no widening happens by surprise.
_DATA_TYPE_OF: dict[np.dtype[Any], int] = {
    np.dtype(np.float32): _FP32,
    np.dtype(np.float64): _FP64,
    np.dtype(np.int64): _INT64,
    np.dtype(np.int32): _INT32,
    np.dtype(np.bool_): _BOOL,
}


_SMALL = 64


class TensorError(ValueError):
    """A tensor that cannot be converted: bad dtype, or values that do not fit its shape."""


def dtype_name(dtype: int) -> str:
    """The short name of a DataType value, as in error messages: "FP32", "INT64", ..."""
    try:
        return predict_pb2.DataType.Name(dtype).removeprefix("DATA_TYPE_")
    except ValueError:
        # proto3 enums are open: a peer may send a number this build does not know.
        return f"DataType({dtype})"


def to_tensor(
    name: str, array: np.ndarray[Any, Any] | list[Any], dtype: int | None = None
) -> predict_pb2.Tensor:
    """A Tensor named `name` holding `array` (flattened row-major, shape kept).

    The DataType follows the array's numpy dtype (float32 -> FP32, float64 -> FP64,
    int64 -> INT64, int32 -> INT32, bool -> BOOL, str/bytes/object -> BYTES, str encoded
    as UTF-8); pass `dtype` to convert to another DataType instead. For bytes with
    trailing NULs pass a list or an object array: numpy "S" arrays have already lost them.
    """
    values = np.asarray(array)
    if values.dtype.kind in ("S", "U") and not isinstance(array, np.ndarray):
        # numpy's fixed-width strings drop trailing NULs; keep a list's elements exact.
        values = np.array(array, dtype=object)
    data_type = _data_type_for(values) if dtype is None else dtype
    if data_type not in _LAYOUT:
        raise TensorError(f"tensor {name!r}: cannot encode as {dtype_name(data_type)}")
    field, numpy_dtype = _LAYOUT[data_type]
    # Checked against _LAYOUT above, so the int is a known DataType value.
    tensor = predict_pb2.Tensor(
        name=name, dtype=cast("predict_pb2.DataType", data_type), shape=values.shape
    )
    contents = getattr(tensor.contents, field)
    if data_type == _BYTES:
        contents.extend(_encode_bytes(name, values.ravel().tolist()))
        return tensor
    try:
        flat = values.astype(numpy_dtype, copy=False).ravel()
    except (TypeError, ValueError) as exc:
        raise TensorError(
            f"tensor {name!r}: cannot convert {values.dtype} values to {dtype_name(data_type)}"
        ) from exc
    # tolist() hands protobuf plain Python scalars, much faster than numpy scalars one by one.
    contents.extend(flat.tolist())
    return tensor


def from_tensor(tensor: predict_pb2.Tensor) -> np.ndarray[Any, Any]:
    """The tensor's values as a numpy array of its shape.

    Raises TensorError when the dtype is unspecified or unknown, a dimension is negative,
    or the number of values does not match the shape. BYTES tensors decode to an object
    array of `bytes`.
    """
    shape = list(tensor.shape)
    if tensor.dtype == predict_pb2.DATA_TYPE_UNSPECIFIED:
        raise TensorError(f"tensor {tensor.name!r} has no dtype (DATA_TYPE_UNSPECIFIED)")
    if tensor.dtype not in _LAYOUT:
        raise TensorError(f"tensor {tensor.name!r} has unknown dtype {tensor.dtype}")
    if any(dim < 0 for dim in shape):
        raise TensorError(f"tensor {tensor.name!r} has a negative dimension in shape {shape}")
    field, numpy_dtype = _LAYOUT[tensor.dtype]
    values = getattr(tensor.contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise TensorError(
            f"tensor {tensor.name!r} has shape {shape} ({expected} values) "
            f"but {len(values)} {dtype_name(tensor.dtype)} values"
        )
    if numpy_dtype == np.dtype(object):
        # np.asarray would turn a list of bytes into a fixed-width "S" array and strip
        # trailing NULs; an object array keeps every element exactly as sent.
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    elif expected <= _SMALL:
        # Most replies are a few values (a label, a probability per class): fromiter is
        # about 6x faster than np.array on a repeated field that short.
        flat = np.fromiter(values, dtype=numpy_dtype, count=expected)
    else:
        # upb's repeated fields hand numpy their values in one copy (~40x faster than
        # going through list() for 30k values); np.array copies, so the result owns them.
        flat = np.array(values, dtype=numpy_dtype)
    return flat.reshape(shape)


def _data_type_for(values: np.ndarray[Any, Any]) -> int:
    if values.dtype.kind in ("U", "S", "O"):
        return _BYTES
    data_type = _DATA_TYPE_OF.get(values.dtype)
    if data_type is None:
        raise TensorError(
            f"no predict.v1 DataType for numpy dtype {values.dtype}; "
            "convert the array or pass dtype= explicitly"
        )
    return data_type


def _encode_bytes(name: str, elements: list[Any]) -> list[bytes]:
    encoded = []
    for element in elements:
        if isinstance(element, bytes):
            encoded.append(element)
        elif isinstance(element, str):
            encoded.append(element.encode("utf-8"))
        else:
            raise TensorError(
                f"tensor {name!r}: BYTES elements must be str or bytes, "
                f"got {type(element).__name__}"
            )
    return encoded


# bfloat16 (the Open Inference Protocol's BF16, TensorFlow's DT_BFLOAT16) is the upper half
# of a float32; numpy has no such dtype, so both protocols carry it as 16-bit patterns.


def bfloat16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Values (converted to float32) as little-endian bfloat16 bit patterns, rounded to
    nearest with ties to even; a NaN stays a NaN (quiet, same sign)."""
    single = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = single.view(np.uint32).astype(np.uint64)
    # Add just under half an ulp of bf16, plus the lowest kept bit; NaNs would round into
    # infinities, so they keep their top bits instead, made quiet.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits >> 16 | 0x0040) & 0xFFFF
    return np.where(np.isnan(single), nan, rounded).astype("<u2")


def from_bfloat16_bits(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """bfloat16 bit patterns as float32 values (exact: every bfloat16 is a float32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)
