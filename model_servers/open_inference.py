"""The model server's Open Inference Protocol (KServe v2): ModelInfer, health and metadata.

`OpenInferencePredictor` answers v2 messages with a fitted model and knows no gRPC; the
`OpenInferenceServicer` is the thin gRPC layer over it. ModelInfer goes through the
server's `CallGate` (the predict.v1 servicer), so it is recorded in ``received`` and gets
the same injected latency, errors and hangs as predict.v1's Predict; liveness, readiness
and metadata answer at once, like the gRPC health service.

The message classes come from the proxy's private descriptor pool (tritonclient registers
the same ``inference.*`` names in protobuf's default pool), so there is no generated
``_pb2_grpc`` module: a generic handler serves the methods by name.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any, NoReturn, Protocol

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from model_servers.models import FAMILY, FEATURE_COUNT
from model_servers.predictor import (
    INPUT_NAME,
    LABEL_OUTPUT,
    PROBABILITIES_OUTPUT,
    InvalidRequest,
    Predictor,
    RequestError,
    UnknownModel,
    check_features_shape,
    check_input_names,
    feature_rows,
)
from proxy.gen.serving_descriptors import FILE_DESCRIPTOR_SET
from proxy.protocols import open_inference as v2
from proxy.protocols.serving_pool import message_class
from proxy.tensors import TensorError

__all__ = [
    "INPUT_DATATYPES",
    "PLATFORM",
    "SERVER_NAME",
    "SERVICE",
    "CallGate",
    "OpenInferencePredictor",
    "OpenInferenceServicer",
    "reflection_pool",
]

SERVICE: str = v2.SERVICE
"""The full gRPC service name, "inference.GRPCInferenceService"."""

SERVER_NAME = "model-server"
"""ServerMetadata's name."""
PLATFORM = "scikit-learn"
"""ModelMetadata's platform."""

INPUT_DATATYPES: tuple[str, ...] = ("FP64", "FP32")
"""The datatypes the features input accepts; ModelMetadata advertises the first, in which
the models compute (FP32 rows are widened, exactly)."""

# Output name -> (datatype, shape in ModelMetadata; -1 is the batch dimension).
_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    LABEL_OUTPUT: ("INT64", [-1]),
    PROBABILITIES_OUTPUT: ("FP32", [-1, 2]),
}


_ModelStreamInferResponse = message_class("inference.ModelStreamInferResponse")


class CallGate(Protocol):
    """What the v2 servicer needs from the server around it (server._PredictionServicer)."""

    @property
    def stopping(self) -> bool:
        """True once the server has begun to stop."""
        ...

    async def answer(
        self,
        request_bytes: bytes,
        context: grpc.aio.ServicerContext,
        predict: Callable[[bytes, str], bytes],
    ) -> bytes:
        """Record the call and inject faults, then ``predict(request_bytes, x-request-id)``."""
        ...

    async def refuse(self, context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
        """End the call with the status code that `error`'s class maps to."""
        ...


class OpenInferencePredictor:
    """Answers v2 requests for one fitted model; raises InvalidRequest or UnknownModel."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor
        self.spec = predictor.model.spec

    def infer_bytes(self, request_bytes: bytes, fallback_request_id: str = "") -> bytes:
        """The serialized ModelInferResponse to a serialized ModelInferRequest.

        `fallback_request_id` (the ``x-request-id`` metadata) becomes the response's id
        when the request has none, as predict.v1 does.
        """
        try:
            request = v2.ModelInferRequest.FromString(request_bytes)
        except DecodeError as exc:
            raise InvalidRequest(
                f"request is not a valid inference.ModelInferRequest ({exc})"
            ) from exc
        response: Any = self.infer(request, fallback_request_id)
        return bytes(response.SerializeToString())

    def infer(self, request: Any, fallback_request_id: str = "") -> Any:
        """The ModelInferResponse to a ModelInferRequest.

        Outputs are in raw_output_contents when the request sent its inputs raw, typed
        contents otherwise; only the requested outputs, when the request names any.
        """
        self._predictor.check_model(request.model_name, request.model_version)
        requested = _requested_outputs(request)
        labels, probabilities = self._predictor.model.predict(_features(request))
        arrays = {LABEL_OUTPUT: labels, PROBABILITIES_OUTPUT: probabilities}
        response: Any = v2.ModelInferResponse(
            model_name=self.spec.name,
            model_version=self.spec.version,
            id=request.id or fallback_request_id,
        )
        raw = len(request.raw_input_contents) > 0
        for name in requested:
            v2.add_output(response, name, arrays[name], _OUTPUTS[name][0], raw=raw)
        return response

    def model_ready(self, name: str, version: str) -> bool:
        """Whether `name` (and `version`, "" for any) is this server's model."""
        try:
            self._predictor.check_model(name, version)
        except UnknownModel:
            return False
        return True

    def model_metadata(self, name: str, version: str) -> Any:
        """The ModelMetadataResponse: versions, platform, inputs and outputs."""
        self._predictor.check_model(name, version)
        spec = self.spec
        return v2.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform=PLATFORM,
            inputs=[
                {"name": INPUT_NAME, "datatype": INPUT_DATATYPES[0], "shape": [-1, FEATURE_COUNT]}
            ],
            outputs=[
                {"name": output, "datatype": datatype, "shape": shape}
                for output, (datatype, shape) in _OUTPUTS.items()
            ],
            properties={
                "family": FAMILY,
                "estimator": spec.kind,
                "input_datatypes": ",".join(INPUT_DATATYPES),
            },
        )

    def server_metadata(self) -> Any:
        """The ServerMetadataResponse: this server's name and version, no extensions."""
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=_server_version())


def _features(request: Any) -> np.ndarray:
    """The request's feature rows as a finite [n, FEATURE_COUNT] array, or InvalidRequest."""
    check_input_names([tensor.name for tensor in request.inputs])
    tensor = request.inputs[0]
    if tensor.datatype not in INPUT_DATATYPES:
        got = repr(tensor.datatype) if tensor.datatype else "no datatype"
        raise InvalidRequest(f"input {INPUT_NAME!r}: expected FP32 or FP64, got {got}")
    check_features_shape(list(tensor.shape))
    if request.raw_input_contents and tensor.HasField("contents"):
        raise InvalidRequest(
            f"input {INPUT_NAME!r} has contents and raw_input_contents; send one or the other"
        )
    try:
        values = v2.request_inputs(request)[INPUT_NAME]
    except TensorError as exc:
        raise InvalidRequest(str(exc)) from exc
    return feature_rows(np.asarray(values))


def _requested_outputs(request: Any) -> list[str]:
    """The output names to answer with, in the order asked (all when none are asked)."""
    names = list(dict.fromkeys(output.name for output in request.outputs)) or list(_OUTPUTS)
    unknown = [name for name in names if name not in _OUTPUTS]
    if unknown:
        raise InvalidRequest(
            f"unknown requested output {unknown[0]!r}: this model's outputs are "
            f"{', '.join(repr(name) for name in _OUTPUTS)}"
        )
    return names


@functools.cache
def _server_version() -> str:
    try:
        return metadata.version("shadow-proxy")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


class OpenInferenceServicer:
    """The gRPC edge of inference.GRPCInferenceService over an OpenInferencePredictor."""

    def __init__(self, predictor: OpenInferencePredictor, gate: CallGate) -> None:
        self._predictor = predictor
        self._gate = gate

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers for the seven methods; ModelInfer takes raw bytes, so that ``received``
        records them exactly and an undecodable request gets a clear INVALID_ARGUMENT."""

        def typed(method: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    self.model_stream_infer,
                    request_deserializer=v2.ModelInferRequest.FromString,
                    response_serializer=_ModelStreamInferResponse.SerializeToString,
                ),
                "ServerLive": typed(self.server_live, v2.ServerLiveRequest, v2.ServerLiveResponse),
                "ServerReady": typed(
                    self.server_ready, v2.ServerReadyRequest, v2.ServerReadyResponse
                ),
                "ModelReady": typed(self.model_ready, v2.ModelReadyRequest, v2.ModelReadyResponse),
                "ServerMetadata": typed(
                    self.server_metadata, v2.ServerMetadataRequest, v2.ServerMetadataResponse
                ),
                "ModelMetadata": typed(
                    self.model_metadata, v2.ModelMetadataRequest, v2.ModelMetadataResponse
                ),
            },
        )

    async def model_infer(self, request_bytes: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._gate.answer(request_bytes, context, self._predictor.infer_bytes)

    async def model_stream_infer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """One response per request, in order. A request that cannot be answered gets a
        response holding only ``error_message`` and the stream goes on, as Triton does.
        Stream messages are not recorded in ``received`` and get no injected faults."""
        fallback = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        async for request in requests:
            try:
                response = self._predictor.infer(request, str(fallback))
            except RequestError as exc:
                yield _ModelStreamInferResponse(error_message=str(exc))
            else:
                yield _ModelStreamInferResponse(infer_response=response)

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerReadyResponse(ready=not self._gate.stopping)

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # An unknown model is not ready, not an error: Triton answers the same way.
        ready = self._predictor.model_ready(request.name, request.version)
        return v2.ModelReadyResponse(ready=ready and not self._gate.stopping)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._predictor.server_metadata()

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self._predictor.model_metadata(request.name, request.version)
        except RequestError as exc:
            await self._gate.refuse(context, exc)


@functools.cache
def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool for server reflection: the v2 service, health and reflection.

    Reflection answers from one pool. The proxy's serving pool holds the v2 service but not
    grpc.health.v1 or the reflection service itself, and the default pool may hold
    tritonclient's different ``inference.*``; so the server gets a pool of its own.
    """
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
        pool.Add(file)
    for module in (health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool
