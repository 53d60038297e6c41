"""Server reflection on the proxy's port: its own services first, production's behind them.

A reflection client (``grpcurl``, Postman, a reflection descriptor database) pointed at the
proxy should see what it would see at production, because every method the proxy does not
own is forwarded there. Each request is answered from the proxy's own descriptors when they
have the answer; a lookup they cannot answer (NOT_FOUND) is asked of production's reflection
service, and ``list_services`` is the union of both lists, less the services the proxy only
forwards (``predict.v1.PredictionService``) when production does not list them: in front of
Triton, say, a client must not be shown a service nobody behind the proxy serves. Production being down, slow, or
without reflection never fails the client's stream: the proxy's own answer is sent instead.

Both ``grpc.reflection.v1alpha`` and ``grpc.reflection.v1`` are served. Their messages are
the same on the wire (v1 is v1alpha renamed), so one set of message classes serves both;
grpcio-reflection ships only v1alpha, so the v1 descriptor is derived from it here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_reflection.v1alpha import reflection as _reference
from grpc_reflection.v1alpha import reflection_pb2

from proxy.admin import ADMIN_SERVICE
from proxy.fanout import split_metadata

__all__ = [
    "LIST_TIMEOUT",
    "LOOKUP_TIMEOUT",
    "V1ALPHA_SERVICE",
    "V1_SERVICE",
    "ReflectionServicer",
    "enable_reflection",
]

log = logging.getLogger(__name__)

V1ALPHA_SERVICE = _reference.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_METHOD = "ServerReflectionInfo"
LOOKUP_TIMEOUT = 5.0
"""Seconds production has to answer one forwarded lookup (bounded by the client's deadline)."""
LIST_TIMEOUT = 1.0
"""Seconds production has to list its services; the proxy's own list is sent without them."""

Request: TypeAlias = reflection_pb2.ServerReflectionRequest
Response: TypeAlias = reflection_pb2.ServerReflectionResponse
ProductionChannel: TypeAlias = Callable[[], aio.Channel | None]

# The lookups production may answer when the proxy cannot, and the reply each expects.
_LOOKUP_REPLIES = {
    "file_by_filename": "file_descriptor_response",
    "file_containing_symbol": "file_descriptor_response",
    "file_containing_extension": "file_descriptor_response",
    "all_extension_numbers_of_type": "all_extension_numbers_response",
}
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, made from the v1alpha file it copies."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


# A private pool: protobuf's default pool belongs to generated code, and a future
# grpcio-reflection may register the real v1 file there.
_V1_POOL = descriptor_pool.DescriptorPool()
_V1_POOL.Add(_v1_file())


def _is_not_found(response: Response) -> bool:
    return response.HasField("error_response") and response.error_response.error_code == _NOT_FOUND


class ReflectionServicer:
    """``ServerReflectionInfo`` for one reflection version, with production behind it.

    ``production`` is called for every forwarded request and returns production's channel,
    or None when production is known not to serve; a promotion therefore takes effect at
    once, even within a client's stream.
    """

    def __init__(
        self,
        service: str,
        service_names: Iterable[str],
        production: ProductionChannel,
        *,
        pool: descriptor_pool.DescriptorPool | None = None,
        forwarded: Iterable[str] = (),
        lookup_timeout: float = LOOKUP_TIMEOUT,
        list_timeout: float = LIST_TIMEOUT,
    ) -> None:
        if service not in (V1ALPHA_SERVICE, V1_SERVICE):
            raise ValueError(f"not a reflection service: {service!r}")
        self.service = service
        # Services among ``service_names`` that the proxy does not serve itself but forwards:
        # listed when production lists them, or when production's list cannot be had.
        self._forwarded = frozenset(forwarded)
        names = {*service_names, V1ALPHA_SERVICE, V1_SERVICE} - {ADMIN_SERVICE}
        # grpc_reflection's own servicer answers locally; the v1 file lives in its own pool.
        self._local = (
            _reference.ReflectionServicer(names, pool=pool),
            _reference.ReflectionServicer(names, pool=_V1_POOL),
        )
        self._production = production
        self._lookup_timeout = lookup_timeout
        self._list_timeout = list_timeout

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Request], context: aio.ServicerContext
    ) -> AsyncIterator[Response]:
        forwarded, *_ = split_metadata(context.invocation_metadata() or ())
        upstream = _ProductionStream(
            self._production, self.service, tuple(forwarded), context.time_remaining
        )
        try:
            async for request in requests:
                yield await self._answer(request, upstream)
        finally:
            upstream.close()

    async def _answer(self, request: Request, upstream: _ProductionStream) -> Response:
        local = self._answer_locally(request)
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            remote = await upstream.ask(request, self._list_timeout)
            if remote is None or not remote.HasField("list_services_response"):
                return local
            names = {s.name for s in local.list_services_response.service} - self._forwarded
            names.update(s.name for s in remote.list_services_response.service if s.name)
            names.discard(ADMIN_SERVICE)
            return Response(
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=n) for n in sorted(names)]
                ),
                original_request=request,
            )
        if kind not in _LOOKUP_REPLIES or not _is_not_found(local):
            return local
        remote = await upstream.ask(request, self._lookup_timeout)
        if remote is None:
            return local
        if remote.WhichOneof("message_response") not in (_LOOKUP_REPLIES[kind], "error_response"):
            log.debug("reflection: production answered %s with %s", kind, remote)
            return local
        # The client must see its own request, whatever production echoed.
        remote.original_request.CopyFrom(request)
        return remote

    def _answer_locally(self, request: Request) -> Response:
        response: Response | None = None
        for servicer in self._local:
            response = next(iter(servicer.ServerReflectionInfo(iter((request,)), None)))
            if not _is_not_found(response):
                return response
        assert response is not None
        return response


class _ProductionStream:
    """The one reflection stream to production behind one client stream, opened on first
    need; after a failure it is given up for the rest of the client's stream, unless
    production changes."""

    def __init__(
        self,
        production: ProductionChannel,
        service: str,
        metadata: Sequence[tuple[str, str | bytes]],
        time_remaining: Callable[[], float | None],
    ) -> None:
        self._production = production
        self._metadata = metadata
        self._time_remaining = time_remaining
        self._channel: aio.Channel | None = None
        self._call: aio.StreamStreamCall | None = None
        self._given_up = False
        self._answered = False
        # The client's version first; the other one when production lacks it (a grpc-python
        # production serves only v1alpha, while grpcurl asks v1 first).
        other = V1_SERVICE if service == V1ALPHA_SERVICE else V1ALPHA_SERVICE
        self._versions = (service, other)
        self._services = list(self._versions)

    async def ask(self, request: Request, timeout: float) -> Response | None:
        """Production's response to ``request``, or None when it cannot give one in time."""
        channel = self._production()
        if channel is None:
            return None
        if channel is not self._channel:
            self.close()
            self._channel, self._given_up, self._answered = channel, False, False
            self._services = list(self._versions)
        if self._given_up:
            return None
        try:
            async with asyncio.timeout(timeout):
                response = await self._exchange(channel, request)
        except Exception as exc:
            log.debug("reflection: production did not answer %s: %r", request, exc)
            self._given_up = True
            self.close()
            return None
        self._answered = True
        return response

    async def _exchange(self, channel: aio.Channel, request: Request) -> Response:
        while True:
            if self._call is None:
                self._call = channel.stream_stream(
                    f"/{self._services[0]}/{_METHOD}",
                    request_serializer=Request.SerializeToString,
                    response_deserializer=Response.FromString,
                )(metadata=self._metadata, timeout=self._time_remaining())
            try:
                await self._call.write(request)
                response = await self._call.read()
            except aio.AioRpcError as error:
                if (
                    error.code() is grpc.StatusCode.UNIMPLEMENTED
                    and not self._answered
                    and len(self._services) > 1
                ):
                    self.close()
                    self._services.pop(0)
                    continue
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the client went away, or our own timeout
                # The call was cancelled under us: production's channel was closed.
                raise ConnectionError("production's channel closed") from None
            if response is aio.EOF:
                raise ConnectionError("production ended the reflection stream")
            return response

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def enable_reflection(
    service_names: Iterable[str],
    server: aio.Server,
    production: ProductionChannel,
    *,
    forwarded: Iterable[str] = (),
    lookup_timeout: float = LOOKUP_TIMEOUT,
    list_timeout: float = LIST_TIMEOUT,
) -> None:
    """Serve v1alpha and v1 reflection on ``server``: ``service_names`` (the reflection
    services are added, the admin service never listed) and production's services behind
    them; those of ``service_names`` that are only ``forwarded`` are listed when production
    lists them too, or when it cannot be asked."""
    names = tuple(service_names)
    for service in (V1ALPHA_SERVICE, V1_SERVICE):
        servicer = ReflectionServicer(
            service,
            names,
            production,
            forwarded=forwarded,
            lookup_timeout=lookup_timeout,
            list_timeout=list_timeout,
        )
        handlers = {
            _METHOD: grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=Request.FromString,
                response_serializer=Response.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
