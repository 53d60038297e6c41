"""Validates predict.v1 requests and answers them with a fitted model; knows nothing of gRPC."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from model_servers.models import FAMILY, FEATURE_COUNT, FittedModel
from proxy.gen import predict_pb2
from proxy.tensors import TensorError, dtype_name, from_tensor, to_tensor

__all__ = ["INPUT_NAME", "InvalidRequest", "Predictor", "RequestError", "UnknownModel"]

INPUT_NAME = "features"
"""The one input tensor a request carries: FP32 or FP64, shape [batch, 30] or [30]."""


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

    def predict(
        self, request: predict_pb2.PredictRequest, fallback_request_id: str = ""
    ) -> predict_pb2.PredictResponse:
        """The PredictResponse to `request`; raises InvalidRequest or UnknownModel."""
        spec = self.model.spec
        if request.model_name not in self._accepted_names:
            raise UnknownModel(
                f"unknown model {request.model_name!r}: {self._serves}; "
                f"send model_name {spec.name!r}, {FAMILY!r} or leave it empty"
            )
        if request.model_version not in ("", spec.version):
            raise UnknownModel(
                f"unknown version {request.model_version!r} of model {spec.name!r}: "
                f"{self._serves}; send model_version {spec.version!r} or leave it empty"
            )
        features = _features(request)
        labels, probabilities = self.model.predict(features)
        return predict_pb2.PredictResponse(
            model_name=spec.name,
            model_version=spec.version,
            request_id=request.request_id or fallback_request_id,
            outputs=[to_tensor("label", labels), to_tensor("probabilities", probabilities)],
        )


def _features(request: predict_pb2.PredictRequest) -> np.ndarray:
    """The request's feature rows as a finite [n, FEATURE_COUNT] array, or InvalidRequest."""
    names = [tensor.name for tensor in request.inputs]
    if names != [INPUT_NAME]:
        raise InvalidRequest(
            f"expected exactly one input tensor named {INPUT_NAME!r} "
            f"(FP32 or FP64, shape [batch, {FEATURE_COUNT}]), got {names}"
        )
    tensor = request.inputs[0]
    if tensor.dtype not in (predict_pb2.DATA_TYPE_FP32, predict_pb2.DATA_TYPE_FP64):
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: expected FP32 or FP64, got {dtype_name(tensor.dtype)}"
        )
    shape = list(tensor.shape)
    valid_shape = shape == [FEATURE_COUNT] or (
        len(shape) == 2 and shape[0] >= 1 and shape[1] == FEATURE_COUNT
    )
    if not valid_shape:
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: expected shape [batch, {FEATURE_COUNT}] with batch >= 1 "
            f"(or [{FEATURE_COUNT}] for one row), got {shape}"
        )
    try:
        values = from_tensor(tensor)
    except TensorError as exc:
        raise InvalidRequest(str(exc)) from exc
    rows = values.reshape(-1, FEATURE_COUNT)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        # scikit-learn would raise on NaN or infinity; say which row instead.
        bad_row = int(np.argmin(finite))
        raise InvalidRequest(
            f"input {INPUT_NAME!r}: row {bad_row} holds NaN or infinity; values must be finite"
        )
    return rows
