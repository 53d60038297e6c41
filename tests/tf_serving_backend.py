"""A small model server that speaks TensorFlow Serving's gRPC protocol, for the tests.

It serves ``PredictionService/Predict`` and ``GetModelMetadata`` on a loopback port 0
through a generic handler (the private pool's message classes, see
proxy/protocols/serving_pool.py), with a deterministic linear model: input ``x``
(float, ``[batch, 3]``) gives ``scores`` (DT_FLOAT, ``[batch, 3]``) and ``label``
(DT_STRING, ``[batch]``, ``b"class-<argmax>"``). ``perturbation`` is added to every row's
scores, so a shadow built with one answers differently from production.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc import aio

from proxy.protocols import tf_serving as tf
from proxy.tensors import TensorError

SERVICE = "tensorflow.serving.PredictionService"
MODEL = "linear"
VERSION = 7
SIGNATURE = "serving_default"
FEATURES = 3
CLASSES = ("class-0", "class-1", "class-2")

WEIGHTS = np.array([[0.5, 0.0, -0.5], [0.0, 1.0, 0.0], [-0.5, 0.0, 0.5]], dtype=np.float32)
BIAS = np.array([0.1, 0.0, -0.1], dtype=np.float32)


def linear_model(
    x: np.ndarray[Any, Any], perturbation: tuple[float, ...] = ()
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The scores and labels the backend answers for inputs `x` (what tests expect)."""
    scores = x.astype(np.float32) @ WEIGHTS + BIAS
    if perturbation:
        scores = scores + np.asarray(perturbation, dtype=np.float32)
    labels = np.empty(len(scores), dtype=object)
    labels[:] = [CLASSES[int(k)].encode() for k in scores.argmax(axis=1)]
    return scores.astype(np.float32), labels


@dataclass
class TfServingBackend:
    """A grpc.aio server on 127.0.0.1, port 0, answering the TF Serving protocol."""

    perturbation: tuple[float, ...] = ()
    """Added to every row's scores (one value per class)."""
    raw: bool = True
    """Reply tensors in ``tensor_content`` (else in the typed ``*_val`` fields)."""
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    """Calls received, by method name (``Predict``, ``GetModelMetadata``)."""
    port: int = 0
    _server: aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TfServingBackend:
        server = aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Predict": grpc.unary_unary_rpc_method_handler(
                            self._predict,
                            request_deserializer=tf.PredictRequest.FromString,
                            response_serializer=tf.PredictResponse.SerializeToString,
                        ),
                        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                            self._metadata,
                            request_deserializer=tf.GetModelMetadataRequest.FromString,
                            response_serializer=tf.GetModelMetadataResponse.SerializeToString,
                        ),
                    },
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def _predict(self, request: Any, context: aio.ServicerContext) -> Any:
        self.calls["Predict"] += 1
        if "x" not in request.inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is missing")
        try:
            x = tf.tensor_to_array(request.inputs["x"])
        except TensorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input 'x': {exc}")
        if x.ndim != 2 or x.shape[1] != FEATURES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"input 'x' must be [batch, {FEATURES}]"
            )
        scores, labels = linear_model(x, self.perturbation)
        reply: Any = tf.PredictResponse()
        _fill_spec(reply.model_spec)
        wanted = set(request.output_filter) or {"scores", "label"}
        if "scores" in wanted:
            reply.outputs["scores"].CopyFrom(tf.array_to_tensor(scores, raw=self.raw))
        if "label" in wanted:
            reply.outputs["label"].CopyFrom(tf.array_to_tensor(labels, raw=self.raw))
        return reply

    async def _metadata(self, request: Any, context: aio.ServicerContext) -> Any:
        self.calls["GetModelMetadata"] += 1
        signatures: Any = tf.SignatureDefMap()
        signature = signatures.signature_def[SIGNATURE]
        signature.method_name = "tensorflow/serving/predict"
        for side, name, dtype, shape in (
            (signature.inputs, "x", tf.DT_FLOAT, (-1, FEATURES)),
            (signature.outputs, "scores", tf.DT_FLOAT, (-1, len(CLASSES))),
            (signature.outputs, "label", tf.DT_STRING, (-1,)),
        ):
            info = side[name]
            info.name = f"{name}:0"
            info.dtype = dtype
            for size in shape:
                info.tensor_shape.dim.add(size=size)
        reply: Any = tf.GetModelMetadataResponse()
        _fill_spec(reply.model_spec)
        metadata = reply.metadata["signature_def"]
        metadata.type_url = tf.SIGNATURE_DEF_MAP_URL
        metadata.value = signatures.SerializeToString()
        return reply


def _fill_spec(spec: Any) -> None:
    spec.name = MODEL
    spec.version.value = VERSION
    spec.signature_name = SIGNATURE
