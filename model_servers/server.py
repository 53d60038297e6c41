"""The grpc.aio model server: predict.v1 or v2 over a fitted model; health, reflection, faults."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model_servers import open_inference
from model_servers.models import FAMILY, MODELS, ModelSpec, fitted_model
from model_servers.predictor import InvalidRequest, Predictor, RequestError, UnknownModel
from proxy.admin_cli import AdminClient, AdminError, AdminTarget, backend_spec
from proxy.gen import predict_pb2

__all__ = [
    "PREDICTION_SERVICE",
    "PROTOCOLS",
    "RECEIVED_MAXLEN",
    "REGISTER_TIMEOUT_S",
    "BindError",
    "ModelServerOptions",
    "ProxyRegistration",
    "ReceivedCall",
    "RegistrationError",
    "RunningModelServer",
    "deregister_from_proxy",
    "parse_listen",
    "register_with_proxy",
    "start_model_server",
]

logger = logging.getLogger(__name__)

PREDICTION_SERVICE: str = predict_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
"""The full gRPC service name, "predict.v1.PredictionService"."""

PROTOCOLS: tuple[str, ...] = ("predict-v1", "v2")
"""What a model server can speak: the project's own predict.v1, or "v2", the Open Inference
Protocol (KServe v2, as Triton and MLServer serve it; see model_servers/open_inference.py)."""

RECEIVED_MAXLEN = 10_000
"""How many calls RunningModelServer.received remembers; older ones are dropped."""

REGISTER_TIMEOUT_S = 10.0
"""How long registering with a proxy may take, waiting for its admin service to come up."""
DEREGISTER_TIMEOUT_S = 5.0
"""How long deregistering at shutdown may take; the proxy may be gone already."""

# Each error class maps to one status code, here at the edge and nowhere else.
_STATUS_OF: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
}

# A wildcard listen address accepts connections on loopback too; tell clients to dial that.
_DIALABLE_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class BindError(OSError):
    """The server could not listen on the requested address (for example, port in use)."""


class RegistrationError(Exception):
    """A shadow proxy's admin service refused the registration, or could not be reached."""


@dataclass(frozen=True)
class ModelServerOptions:
    """How to run one model server. Validated on construction (ValueError)."""

    listen: str = "127.0.0.1:0"
    """HOST:PORT to listen on ("[::1]:PORT" for IPv6); port 0 picks any free port."""
    model: str = "logreg-v1"
    """The model to serve, a key of model_servers.models.MODELS."""
    latency_ms: float = 0.0
    """Added delay before every answer, in milliseconds."""
    latency_jitter_ms: float = 0.0
    """The delay varies uniformly by up to this much either way (never below 0)."""
    error_rate: float = 0.0
    """The fraction of calls, in [0, 1], answered UNAVAILABLE instead of a prediction."""
    hang: bool = False
    """Accept calls and never answer them (until the server stops)."""
    seed: int | None = None
    """Seeds the random choices of jitter and injected errors; None seeds from the OS."""
    protocol: str = "predict-v1"
    """The protocol to serve, one of PROTOCOLS."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"unknown protocol {self.protocol!r}; known protocols: {', '.join(PROTOCOLS)}"
            )
        if self.model not in MODELS:
            raise ValueError(
                f"unknown model {self.model!r}; known models: {', '.join(sorted(MODELS))}"
            )
        for name in ("latency_ms", "latency_jitter_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (0.0 <= self.error_rate <= 1.0):  # also rejects NaN
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate!r}")
        parse_listen(self.listen)


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (or "[IPv6]:PORT") into host and port; ValueError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an unbracketed IPv6 address is ambiguous
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"listen address must be HOST:PORT with PORT in 0..65535 "
            f"(IPv6 as [ADDR]:PORT), got {listen!r}"
        )
    return host, int(port_text)


@dataclass(frozen=True)
class ReceivedCall:
    """One Predict (or v2 ModelInfer) call as the server received it, before any validation."""

    request_bytes: bytes
    """The request exactly as it arrived on the wire."""
    metadata: tuple[tuple[str, str | bytes], ...]
    """The invocation metadata, in arrival order (binary "-bin" values are bytes)."""
    received_at: float
    """time.monotonic() when the call arrived."""


class _PredictionServicer:
    """The Predict handler: records each call, injects faults, then asks the Predictor.

    Its `answer` does the same for the v2 servicer's ModelInfer (open_inference.CallGate).
    """

    def __init__(self, predictor: Predictor, options: ModelServerOptions) -> None:
        self._predictor = predictor
        self._options = options
        self._random = random.Random(options.seed)
        # Set only by stop(): hung calls wait on it, so a stopping server need not wait
        # out its whole grace period for calls that would never finish.
        self._stopping = asyncio.Event()
        self.received: collections.deque[ReceivedCall] = collections.deque(maxlen=RECEIVED_MAXLEN)
        self.calls = 0

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: the handler gets the raw bytes, so `received` records them
        # exactly, and an undecodable request becomes a clear INVALID_ARGUMENT.
        return grpc.method_handlers_generic_handler(
            PREDICTION_SERVICE, {"Predict": grpc.unary_unary_rpc_method_handler(self.predict)}
        )

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def predict(self, request_bytes: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self.answer(request_bytes, context, self._predictor.predict_bytes)

    async def answer(
        self,
        request_bytes: bytes,
        context: grpc.aio.ServicerContext,
        predict: Callable[[bytes, str], bytes],
    ) -> bytes:
        """Record the call, inject the configured faults, then reply with
        ``predict(request_bytes, x-request-id)``, its RequestErrors mapped to status codes."""
        self.calls += 1
        call_number = self.calls  # self.calls moves on while this call awaits
        metadata = tuple((key, value) for key, value in context.invocation_metadata() or ())
        self.received.append(ReceivedCall(request_bytes, metadata, time.monotonic()))
        options = self._options

        if options.hang:
            await self._stopping.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model server is stopping (--hang)")

        delay_ms = options.latency_ms
        if options.latency_jitter_ms:
            jitter = options.latency_jitter_ms
            delay_ms = max(0.0, delay_ms + self._random.uniform(-jitter, jitter))
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

        # random() is in [0, 1): error_rate 0 never fails, error_rate 1 always does.
        if self._random.random() < options.error_rate:
            logger.debug("call %d: injected UNAVAILABLE", call_number)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"injected failure (--error-rate {options.error_rate:g})",
            )

        request_id = next((str(v) for k, v in metadata if k == "x-request-id"), "")
        try:
            # Inline, not in a thread: a batch of rows takes well under a millisecond.
            return predict(request_bytes, request_id)
        except RequestError as exc:
            logger.debug("call %d: %s: %s", call_number, type(exc).__name__, exc)
            await self.refuse(context, exc)
        except Exception as exc:
            logger.exception("prediction failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"prediction failed: {exc!r}")
        raise AssertionError("unreachable: context.abort() raises")

    async def refuse(self, context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
        """End the call with the status code of `error`'s class and its message."""
        await context.abort(_STATUS_OF[type(error)], str(error))
        raise AssertionError("unreachable: context.abort() raises")


class RunningModelServer:
    """A started model server. Stop it with `await server.stop()`."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: _PredictionServicer,
        health_servicer: health.aio.HealthServicer,
        model: ModelSpec,
        options: ModelServerOptions,
        host: str,
        port: int,
    ) -> None:
        self._server = server
        self._servicer = servicer
        self._health = health_servicer
        self.model = model
        self.options = options
        self.port = port
        # Where clients dial it, e.g. "127.0.0.1:PORT" (loopback for a wildcard host).
        dial_host = _DIALABLE_HOST.get(host, host)
        self.address = f"[{dial_host}]:{port}" if ":" in dial_host else f"{dial_host}:{port}"

    @property
    def received(self) -> collections.deque[ReceivedCall]:
        """The last RECEIVED_MAXLEN Predict (v2: ModelInfer) calls, oldest first, valid or not.

        v2's health and metadata calls are not recorded, and get no injected faults.
        """
        return self._servicer.received

    @property
    def calls(self) -> int:
        """How many Predict (v2: ModelInfer) calls arrived, including rejected and failed ones."""
        return self._servicer.calls

    def describe(self) -> str:
        """A one-line summary for logs: model, version, family, address and protocol."""
        over = " over the Open Inference Protocol (v2)" if self.options.protocol == "v2" else ""
        return (
            f"{self.model.name} (version {self.model.version}, {FAMILY}) on {self.address}{over}"
            + _fault_summary(self.options)
        )

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let calls in flight finish within `grace` seconds, stop.

        Calls held by `hang` end at once with UNAVAILABLE. Safe to call more than once.
        """
        await self._health.enter_graceful_shutdown()
        self._servicer.stop()
        await self._server.stop(grace)


async def start_model_server(options: ModelServerOptions) -> RunningModelServer:
    """Train (or reuse) the model, bind `options.listen`, and start serving.

    Raises BindError when the address cannot be bound.
    """
    # Training takes ~0.2 s the first time; a thread keeps the event loop responsive.
    model = await asyncio.to_thread(fitted_model, options.model)
    host, _ = parse_listen(options.listen)
    predictor = Predictor(model)
    servicer = _PredictionServicer(predictor, options)
    # gRPC sets SO_REUSEPORT by default, which would let a second server "bind" a port
    # already in use and silently share its traffic; turn it off so that fails loudly.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if options.protocol == "v2":
        service = open_inference.SERVICE
        inference = open_inference.OpenInferencePredictor(predictor)
        v2_servicer = open_inference.OpenInferenceServicer(inference, servicer)
        server.add_generic_rpc_handlers((v2_servicer.generic_handler(),))
        reflection_pool = open_inference.reflection_pool()
    else:
        service = PREDICTION_SERVICE
        server.add_generic_rpc_handlers((servicer.generic_handler(),))
        reflection_pool = None  # predict.v1 lives in protobuf's default pool

    health_servicer = health.aio.HealthServicer()
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=reflection_pool
    )

    try:
        port = server.add_insecure_port(options.listen)
    except RuntimeError as exc:
        await server.stop(None)
        raise BindError(
            f"cannot listen on {options.listen}: the port is in use or the address is "
            "not available on this machine"
        ) from exc
    await server.start()
    running = RunningModelServer(server, servicer, health_servicer, model.spec, options, host, port)
    return running


def _fault_summary(options: ModelServerOptions) -> str:
    faults = []
    if options.latency_ms or options.latency_jitter_ms:
        faults.append(f"latency {options.latency_ms:g}±{options.latency_jitter_ms:g} ms")
    if options.error_rate:
        faults.append(f"error rate {options.error_rate:g}")
    if options.hang:
        faults.append("hanging every call")
    return f" [injecting {', '.join(faults)}]" if faults else ""


# ------------------------------------------------------------------ registering with a proxy


@dataclass(frozen=True)
class ProxyRegistration:
    """How a model server registers itself with a shadow proxy's admin service."""

    admin: str
    """HOST:PORT of the proxy's admin service (its --admin-listen)."""
    name: str
    """The backend name to register under; unique in that proxy."""
    role: str = "shadow"
    """``shadow`` (a candidate) or ``reference`` (a second instance of production's model)."""
    sample_rate: float | None = None
    """Fraction of requests the proxy copies to this server; None takes the proxy's default."""
    token: str | None = None
    """The proxy's admin token, when it has one."""


def _target(registration: ProxyRegistration, timeout: float) -> AdminTarget:
    return AdminTarget(address=registration.admin, token=registration.token, timeout=timeout)


async def register_with_proxy(running: RunningModelServer, registration: ProxyRegistration) -> None:
    """Register ``running.address`` with the proxy; raises RegistrationError if refused.

    Waits up to REGISTER_TIMEOUT_S for the admin service, so the proxy may start later.
    """
    spec = backend_spec(
        registration.name,
        running.address,
        role=registration.role,
        sample_rate=registration.sample_rate,
    )
    target = _target(registration, REGISTER_TIMEOUT_S)
    try:
        async with AdminClient(target, wait_for_ready=True) as admin:
            await admin.register(spec)
    except AdminError as exc:
        waited = "" if exc.reached else f" (waited up to {REGISTER_TIMEOUT_S:g} s)"
        raise RegistrationError(
            f"cannot register as {registration.role} {registration.name!r} ({running.address}) "
            f"with the shadow proxy's admin service at {registration.admin}{waited}: {exc}"
        ) from None
    logger.info(
        "registered with the shadow proxy at %s as %s %r (%s)",
        registration.admin,
        registration.role,
        registration.name,
        running.address,
    )


async def deregister_from_proxy(registration: ProxyRegistration) -> None:
    """Remove this server from the proxy's backends; raises RegistrationError if refused."""
    try:
        async with AdminClient(_target(registration, DEREGISTER_TIMEOUT_S)) as admin:
            await admin.deregister(registration.name)
    except AdminError as exc:
        raise RegistrationError(
            f"cannot deregister {registration.name!r} from the shadow proxy's admin service "
            f"at {registration.admin}: {exc}"
        ) from None
    logger.info(
        "deregistered %r from the shadow proxy at %s", registration.name, registration.admin
    )
