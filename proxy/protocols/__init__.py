"""The model-serving protocols the proxy reads: per gRPC method, how to decode payloads and outputs.

The production path forwards bytes and never decodes them (except a request id, see
:meth:`MethodCodec.request_id`); the recorder uses a method's codec off the path to turn
payloads into readable span events and replies into named output arrays for comparison.
A method without a codec is recorded as base64 and compared byte for byte.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_NEVER_SHADOWED",
    "DEFAULT_STREAMING_METHODS",
    "REDACTED",
    "MethodCodec",
    "MethodList",
    "Outputs",
    "codec_for",
    "known_codecs",
    "redact_named_tensors",
]

REDACTED = "[REDACTED]"

# Liveness, readiness and metadata calls say something about the backend that answers, not
# about a model's predictions: shadowing them would only double the load on the shadow.
DEFAULT_NEVER_SHADOWED: tuple[str, ...] = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
)

# The streaming methods of the services the proxy knows (protos/ and protos/serving/; a
# test checks this list against their descriptors). gRPC's wire format does not say
# whether a call streams, so the proxy can relay a stream only when told which methods do.
DEFAULT_STREAMING_METHODS: tuple[str, ...] = ("/inference.GRPCInferenceService/ModelStreamInfer",)


class MethodList:
    """A configured list of gRPC methods (``never_shadowed``, ``streaming_methods``):
    full names ``/package.Service/Method``, or ``/package.Service/`` for a whole service."""

    # Method names come from clients; remembering every one would let a client grow memory.
    _REMEMBERED = 1024

    def __init__(self, names: Iterable[str]) -> None:
        names = tuple(names)
        self._methods = frozenset(n for n in names if not n.endswith("/"))
        self._services = tuple(n for n in names if n.endswith("/"))
        # Method name -> listed?, so the per-call check is one dict lookup.
        self._known: dict[str, bool] = {}

    def matches(self, method: str) -> bool:
        """Whether ``method`` is listed, by name or by its service."""
        listed = self._known.get(method)
        if listed is None:
            listed = method in self._methods or method.startswith(self._services)
            if len(self._known) < self._REMEMBERED:
                self._known[method] = listed
        return listed


@dataclass(slots=True)
class Outputs:
    """A reply's output tensors as arrays by name, and which of them are numeric."""

    arrays: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    numeric: frozenset[str] = frozenset()


class MethodCodec(abc.ABC):
    """How the proxy reads the messages of one unary method. Implementations never raise
    on bad bytes: they return None (or "") and the recorder falls back to raw bytes."""

    method: str
    """The full gRPC method name, ``/package.Service/Method``."""
    request_type: str
    """Full protobuf name of the request message (the span event's ``message.type``)."""
    reply_type: str

    @abc.abstractmethod
    def payload(self, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        """The message as a JSON-ready dict, or None when the bytes do not parse."""

    def redact(self, payload: dict[str, Any], names: frozenset[str]) -> None:
        """Replace the values of the tensors named in `names` with REDACTED, in place."""
        redact_named_tensors(payload, names)

    def outputs(self, reply: bytes) -> Outputs | None:
        """The reply's outputs for comparison, or None (then replies are compared as bytes)."""
        return None

    def request_id(self, request: bytes) -> str:
        """The request's own id field, "" when it has none. This one runs on the request
        path (only when the client sent no x-request-id), so it must be cheap."""
        return ""


def redact_named_tensors(node: Any, names: frozenset[str]) -> None:
    """Redact, anywhere in a decoded payload, every dict whose ``name`` is in `names`:
    its ``contents`` become REDACTED (the layout predict.v1 and the Open Inference
    Protocol share: a tensor is a dict with a name and its contents)."""
    if isinstance(node, dict):
        if node.get("name") in names and "contents" in node:
            node["contents"] = REDACTED
        for value in node.values():
            redact_named_tensors(value, names)
    elif isinstance(node, list):
        for item in node:
            redact_named_tensors(item, names)


_CODECS: dict[str, MethodCodec] | None = None


def known_codecs() -> dict[str, MethodCodec]:
    """Every codec the proxy has, by full method name (built once, on first use)."""
    global _CODECS
    if _CODECS is None:
        # Imported here: each protocol module builds its message classes on import.
        from proxy.protocols import open_inference, predict_v1, tf_serving

        codecs = [*predict_v1.CODECS, *open_inference.CODECS, *tf_serving.CODECS]
        _CODECS = {codec.method: codec for codec in codecs}
    return _CODECS


def codec_for(method: str) -> MethodCodec | None:
    """The codec of a full method name, or None for a method the proxy cannot read."""
    return known_codecs().get(method)
