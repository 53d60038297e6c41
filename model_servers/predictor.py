"""Validates predict.v1 requests (with checks the v2 protocol shares) and answers them; no gRPC."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from model_servers.models import FAMILY, FEATURE_COUNT, FittedModel
from proxy.gen import predict_pb2
from proxy.tensors import TensorError, dtype_name, from_tensor, to_tensor

__all__ = [
    "INPUT_NAME",
    "LABEL_OUTPUT",
    "PROBABILITIES_OUTPUT",
    "InvalidRequest",
    "Predictor",
    "RequestError",
    "UnknownModel",
    "check_features_shape",
    "check_input_names",
    "feature_rows",
]

INPUT_NAME = "features"
"""The one input tensor a request carries: FP32 or FP64, shape [batch, 30] or [30]."""
LABEL_OUTPUT = "label"
"""The predicted class of each row: INT64, shape [batch]."""
PROBABILITIES_OUTPUT = "probabilities"
"""Each row's class probabilities: FP32, shape [batch, 2]."""


class RequestError(Exception):
    """A request this server refuses; the gRPC edge maps each subclass to a status code."""


class InvalidRequest(RequestError):
    """The request is malformed: undecodable, or a wrong input name, dtype, shape or value."""


class UnknownModel(RequestError):
    """The request names a model or version that this server does not serve."""


class Predictor:
    """Answers PredictRequests for one fitted model."""

    def __init__(self, model: FittedModel) -> None:
        self.model = model
        spec = model.spec
        self._accepted_names = ("", FAMILY, spec.name)
        self._serves = f"this server serves {spec.name!r} version {spec.version!r} ({FAMILY})"

    def predict_bytes(self, request_bytes: bytes, fallback_request_id: str = "") -> bytes:
        """The serialized PredictResponse to a serialized PredictRequest.

        `fallback_request_id` (the `x-request-id` metadata) is echoed when the request
        carries no request_id. Raises InvalidRequest or UnknownModel.
        """
        try:
            request = predict_pb2.PredictRequest.FromString(request_bytes)
        except DecodeError as exc:
            raise InvalidRequest(
                f"request is not a valid predict.v1.PredictRequest ({exc})"
            ) from exc
        return self.predict(request, fallback_request_id).SerializeToString()

    def check_model(self, model_name: str, model_version: str) -> None:
        """Raise UnknownModel unless this server serves `model_name` at `model_version`.

        The model's own name, its family or "" name it; its version or "" pick the version.
        """
        spec = self.model.spec
        if model_name not in self._accepted_names:
            raise UnknownModel(
                f"unknown model {model_name!r}: {self._serves}; "
                f"send model_name {spec.name!r}, {FAMILY!r} or leave it empty"
            )
        if model_version not in ("", spec.version):
            raise UnknownModel(
                f"unknown version {model_version!r} of model {spec.name!r}: "
                f"{self._serves}; send model_version {spec.version!r} or leave it empty"
            )

    def predict(
        self, request: predict_pb2.PredictRequest, fallback_request_id: str = ""
    ) -> predict_pb2.PredictResponse:
        """The PredictResponse to `request`; raises InvalidRequest or UnknownModel."""
        spec = self.model.spec
        self.check_model(request.model_name, request.model_version)
        features = _features(request)
        labels, probabilities = self.model.predict(features)
        return predict_pb2.PredictResponse(
            model_name=spec.name,
            model_version=spec.version,
            request_id=request.request_id or fallback_request_id,
            outputs=[
                to_tensor(LABEL_OUTPUT, labels),
                to_tensor(PROBABILITIES_OUTPUT, probabilities),
            ],
        )


def _features(request: predict_pb2.PredictRequest) -> np.ndarray:
    """The request's feature rows as a finite [n, FEATURE_COUNT] array, or InvalidRequest."""
    check_input_names([tensor.name for tensor in request.inputs])
    tensor = request.inputs[0]
    if tensor.dtype not in (predict_pb2.DATA_TYPE_FP32, predict_pb2.DATA_TYPE_FP64):
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: expected FP32 or FP64, got {dtype_name(tensor.dtype)}"
        )
    check_features_shape(list(tensor.shape))
    try:
        values = from_tensor(tensor)
    except TensorError as exc:
        raise InvalidRequest(str(exc)) from exc
    return feature_rows(values)


def check_input_names(names: list[str]) -> None:
    """Raise InvalidRequest unless the request's input tensors are exactly [INPUT_NAME]."""
    if names != [INPUT_NAME]:
        raise InvalidRequest(
            f"expected exactly one input tensor named {INPUT_NAME!r} "
            f"(FP32 or FP64, shape [batch, {FEATURE_COUNT}]), got {names}"
        )


def check_features_shape(shape: list[int]) -> None:
    """Raise InvalidRequest unless `shape` is [batch, FEATURE_COUNT] with batch >= 1, or
    [FEATURE_COUNT] for one row. Checked before decoding, so the message names the shape."""
    valid_shape = shape == [FEATURE_COUNT] or (
        len(shape) == 2 and shape[0] >= 1 and shape[1] == FEATURE_COUNT
    )
    if not valid_shape:
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: expected shape [batch, {FEATURE_COUNT}] with batch >= 1 "
            f"(or [{FEATURE_COUNT}] for one row), got {shape}"
        )


def feature_rows(values: np.ndarray) -> np.ndarray:
    """Decoded feature values of a checked shape as finite [n, FEATURE_COUNT] rows, or
    InvalidRequest naming the first row that holds NaN or infinity."""
    rows = values.reshape(-1, FEATURE_COUNT)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        # scikit-learn would raise on NaN or infinity; say which row instead.
        bad_row = int(np.argmin(finite))
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: row {bad_row} holds NaN or infinity; values must be finite"
        )
    return rows
