"""Server reflection through the proxy: its own services, and production's behind them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from proxy.admin import ADMIN_SERVICE
from proxy.feedback import FEEDBACK_SERVICE
from proxy.reflection import enable_reflection

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
PROXY_OWN = {
    "predict.v1.PredictionService",
    FEEDBACK_SERVICE,
    "grpc.health.v1.Health",
    V1ALPHA,
    V1,
}
# What the proxy lists of its own in front of a production that does not list
# predict.v1.PredictionService: the proxy only forwards that service.
PROXY_OWN_BEFORE_OTHERS = PROXY_OWN - {"predict.v1.PredictionService"}


def _service_file(package: str) -> descriptor_pb2.FileDescriptorProto:
    """``<package>/service.proto``: service ``Echo`` with ``Say``, a type the proxy lacks."""
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/service.proto",
        package=package,
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    for name in ("SayRequest", "SayReply"):
        message = proto.message_type.add(name=name)
        message.field.add(
            name="text",
            number=1,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
        message.field.add(
            name="at",
            number=2,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".google.protobuf.Timestamp",
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    proto.service.add(name="Echo").method.add(
        name="Say", input_type=f".{package}.SayRequest", output_type=f".{package}.SayReply"
    )
    return proto


@dataclass
class ReflectingBackend:
    """A backend with a service only it knows, served with grpc_reflection's own servicer
    (for the versions asked), recording the reflection streams and requests it gets."""

    package: str = "echo.v1"
    versions: Sequence[str] = (V1ALPHA, V1)
    listed: Sequence[str] = ()
    streams: int = 0
    requests: list[Request] = field(default_factory=list)
    metadata: list[dict[str, str | bytes]] = field(default_factory=list)
    port: int = 0
    _server: aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service(self) -> str:
        return f"{self.package}.Echo"

    async def start(self) -> ReflectingBackend:
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
        pool.Add(_service_file(self.package))
        say_request = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{self.package}.SayRequest")
        )
        say_reply = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{self.package}.SayReply")
        )
        backend = self

        class Recording(reflection.aio.ReflectionServicer):
            async def ServerReflectionInfo(
                self, requests: AsyncIterator[Request], context: Any
            ) -> AsyncIterator[Response]:
                backend.streams += 1
                backend.metadata.append(dict(context.invocation_metadata() or ()))

                async def recorded() -> AsyncIterator[Request]:
                    async for request in requests:
                        backend.requests.append(request)
                        yield request

                async for response in super().ServerReflectionInfo(recorded(), context):
                    yield response

        async def say(request: Any, context: aio.ServicerContext) -> Any:
            return say_reply(text=request.text.upper(), at=request.at)

        server = aio.server()
        servicer = Recording((self.service, *self.listed, *self.versions), pool=pool)
        for version in self.versions:
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        version,
                        {
                            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                                servicer.ServerReflectionInfo,
                                request_deserializer=Request.FromString,
                                response_serializer=Response.SerializeToString,
                            )
                        },
                    ),
                )
            )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    self.service,
                    {
                        "Say": grpc.unary_unary_rpc_method_handler(
                            say,
                            request_deserializer=say_request.FromString,
                            response_serializer=say_reply.SerializeToString,
                        )
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
            await self._server.stop(grace=None)
            self._server = None


@pytest.fixture
async def reflecting() -> AsyncIterator[Callable[..., Coroutine[Any, Any, ReflectingBackend]]]:
    started: list[ReflectingBackend] = []

    async def start(**kwargs: Any) -> ReflectingBackend:
        backend = await ReflectingBackend(**kwargs).start()
        started.append(backend)
        return backend

    yield start
    await asyncio.gather(*(b.stop() for b in started))


class Reflector:
    """One client reflection stream, asked one request at a time."""

    def __init__(
        self, channel: aio.Channel, service: str = V1ALPHA, metadata: aio.Metadata | None = None
    ) -> None:
        self._call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )(timeout=10, metadata=metadata)

    async def ask(self, request: Request) -> Response:
        await self._call.write(request)
        response = await self._call.read()
        assert response is not aio.EOF
        assert response.original_request == request
        return response

    async def services(self) -> set[str]:
        response = await self.ask(Request(list_services=""))
        return {s.name for s in response.list_services_response.service}

    async def files(self, request: Request) -> dict[str, descriptor_pb2.FileDescriptorProto]:
        response = await self.ask(request)
        assert response.HasField("file_descriptor_response"), response
        protos = (
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in response.file_descriptor_response.file_descriptor_proto
        )
        return {p.name: p for p in protos}

    async def close(self) -> None:
        await self._call.done_writing()
        assert await self._call.read() is aio.EOF
        assert await self._call.code() is grpc.StatusCode.OK


@pytest.mark.parametrize("version", [V1ALPHA, V1])
async def test_list_services_is_the_proxy_s_and_production_s(
    reflecting, make_proxy, channel_to, version
):
    # Production listing an admin service (another proxy, say) must not leak it either.
    production = await reflecting(listed=(ADMIN_SERVICE,))
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(channel_to(proxy.address), version)

    services = await reflector.services()

    # predict.v1.PredictionService is only forwarded, and this production does not serve it.
    assert services == PROXY_OWN_BEFORE_OTHERS | {"echo.v1.Echo"}
    assert ADMIN_SERVICE not in services
    await reflector.close()


async def test_the_forwarded_prediction_service_is_listed_where_production_serves_it(
    reflecting, make_proxy, channel_to
):
    production = await reflecting(listed=("predict.v1.PredictionService",))
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(channel_to(proxy.address), V1)

    assert await reflector.services() == PROXY_OWN | {"echo.v1.Echo"}
    await reflector.close()


@pytest.mark.parametrize("version", [V1ALPHA, V1])
async def test_lookups_the_proxy_cannot_answer_go_to_production(
    reflecting, make_proxy, channel_to, version
):
    production = await reflecting()
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(
        channel_to(proxy.address), version, aio.Metadata(("authorization", "Bearer t"))
    )

    by_symbol = await reflector.files(Request(file_containing_symbol="echo.v1.Echo"))
    assert set(by_symbol) == {"echo/v1/service.proto", "google/protobuf/timestamp.proto"}
    assert by_symbol["echo/v1/service.proto"] == _service_file("echo.v1")
    by_name = await reflector.files(Request(file_by_filename="echo/v1/service.proto"))
    assert by_name["echo/v1/service.proto"] == _service_file("echo.v1")
    numbers = await reflector.ask(Request(all_extension_numbers_of_type="echo.v1.SayRequest"))
    assert numbers.all_extension_numbers_response.base_type_name == "echo.v1.SayRequest"
    # The proxy's own services are answered by the proxy.
    own = await reflector.files(
        Request(file_containing_symbol="predict.v1.PredictionService", host="proxy")
    )
    assert any(p.package == "predict.v1" for p in own.values())
    await reflector.close()

    # One upstream stream for the client's stream, and only the lookups the proxy lacked.
    assert production.streams == 1
    assert production.metadata[0]["authorization"] == "Bearer t"
    assert [r.WhichOneof("message_request") for r in production.requests] == [
        "file_containing_symbol",
        "file_by_filename",
        "all_extension_numbers_of_type",
    ]


@pytest.mark.parametrize("version", [V1ALPHA, V1])
async def test_what_nobody_has_is_not_found(reflecting, make_proxy, channel_to, version):
    production = await reflecting()
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(channel_to(proxy.address), version)

    for request in (
        Request(file_containing_symbol="nobody.v1.Nothing"),
        Request(file_by_filename="nobody/nothing.proto"),
        Request(all_extension_numbers_of_type="nobody.v1.Nothing"),
        Request(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="echo.v1.SayRequest", extension_number=100
            )
        ),
    ):
        response = await reflector.ask(request)
        assert response.error_response.error_code == NOT_FOUND, request
    # The stream goes on after a NOT_FOUND, production still behind it.
    assert "echo.v1.Echo" in await reflector.services()
    await reflector.close()


@pytest.mark.parametrize(
    ("client", "backend"),
    [(V1, (V1ALPHA,)), (V1ALPHA, (V1,))],
    ids=["v1-to-v1alpha", "v1alpha-to-v1"],
)
async def test_production_with_only_the_other_version_still_answers(
    reflecting, make_proxy, channel_to, client, backend
):
    # grpcurl asks v1 first; a grpc-python production serves only v1alpha.
    production = await reflecting(versions=backend)
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(channel_to(proxy.address), client)

    assert "echo.v1.Echo" in await reflector.services()
    assert "echo/v1/service.proto" in await reflector.files(
        Request(file_containing_symbol="echo.v1.SayReply")
    )
    await reflector.close()


async def test_production_down_leaves_the_proxy_s_own_answers(reflecting, make_proxy, channel_to):
    production = await reflecting()
    await production.stop()  # nothing listens on its port now
    proxy, _ = await make_proxy(f"prod={production.address}")
    reflector = Reflector(channel_to(proxy.address), V1)

    assert await reflector.services() == PROXY_OWN
    assert await reflector.files(Request(file_containing_symbol=FEEDBACK_SERVICE))
    assert await reflector.files(Request(file_containing_symbol=V1))
    missing = await reflector.ask(Request(file_containing_symbol="echo.v1.Echo"))
    assert missing.error_response.error_code == NOT_FOUND
    await reflector.close()


async def test_production_without_reflection_leaves_the_proxy_s_own_answers(make_proxy, channel_to):
    bare = aio.server()  # answers UNIMPLEMENTED to everything, health included
    port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    try:
        proxy, _ = await make_proxy(f"prod=127.0.0.1:{port}")
        reflector = Reflector(channel_to(proxy.address), V1)
        assert await reflector.services() == PROXY_OWN
        missing = await reflector.ask(Request(file_containing_symbol="echo.v1.Echo"))
        assert missing.error_response.error_code == NOT_FOUND
        await reflector.close()
    finally:
        await bare.stop(grace=None)


async def test_a_silent_production_costs_one_short_wait_per_stream(channel_to):
    received: list[Request] = []

    async def silent(requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
        async for request in requests:
            received.append(request)
            await asyncio.Event().wait()
        yield Response()  # not reached; makes this an async generator

    production = aio.server()
    production.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                V1ALPHA,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        silent,
                        request_deserializer=Request.FromString,
                        response_serializer=Response.SerializeToString,
                    )
                },
            ),
        )
    )
    production_port = production.add_insecure_port("127.0.0.1:0")
    front = aio.server()
    to_production = aio.insecure_channel(f"127.0.0.1:{production_port}")
    enable_reflection(
        ("predict.v1.PredictionService",),
        front,
        lambda: to_production,
        # Far apart, and both within the client stream's 10 s deadline: the bounds below
        # only tell the two waits apart; what production received is the proof.
        lookup_timeout=5.0,
        list_timeout=0.2,
    )
    front_port = front.add_insecure_port("127.0.0.1:0")
    await production.start()
    await front.start()
    try:
        reflector = Reflector(channel_to(f"127.0.0.1:{front_port}"))
        start = time.monotonic()
        assert await reflector.services() == {"predict.v1.PredictionService", V1ALPHA, V1}
        assert 0.2 <= time.monotonic() - start < 5.0
        # Given up for the rest of this stream: the lookup is not forwarded, so no wait.
        start = time.monotonic()
        missing = await reflector.ask(Request(file_containing_symbol="echo.v1.Echo"))
        assert missing.error_response.error_code == NOT_FOUND
        assert time.monotonic() - start < 5.0
        # At most the list request (the proxy may give up before production reads it).
        assert [r.WhichOneof("message_request") for r in received] in ([], ["list_services"])
        await reflector.close()
    finally:
        await front.stop(grace=None)
        await production.stop(grace=None)
        await to_production.close()


async def test_reflection_follows_a_promotion_within_a_stream(reflecting, make_proxy, channel_to):
    old = await reflecting(package="echo.v1")
    new = await reflecting(package="echo.v2")
    proxy, _ = await make_proxy(f"prod={old.address}", [f"cand={new.address}"])
    reflector = Reflector(channel_to(proxy.address))

    assert await reflector.services() == PROXY_OWN_BEFORE_OTHERS | {"echo.v1.Echo"}
    proxy.change({"op": "promote", "name": "cand"})
    assert await reflector.services() == PROXY_OWN_BEFORE_OTHERS | {"echo.v2.Echo"}
    assert "echo/v2/service.proto" in await reflector.files(
        Request(file_containing_symbol="echo.v2.Echo")
    )
    await reflector.close()


async def test_a_reflection_client_resolves_and_calls_production_s_service(
    reflecting, make_proxy, channel_to
):
    production = await reflecting()
    proxy, _ = await make_proxy(f"prod={production.address}")

    def resolve() -> tuple[list[str], Any]:
        # The reference client is synchronous; the proxy serves on this test's loop.
        with grpc.insecure_channel(proxy.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            pool = descriptor_pool.DescriptorPool(database)
            return services, pool.FindServiceByName("echo.v1.Echo").FindMethodByName("Say")

    services, say = await asyncio.to_thread(resolve)
    assert "echo.v1.Echo" in services
    request_class = message_factory.GetMessageClass(say.input_type)
    reply_class = message_factory.GetMessageClass(say.output_type)
    request = request_class(text="hello")
    request.at.seconds = 42

    call = channel_to(proxy.address).unary_unary(
        f"/{say.containing_service.full_name}/{say.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    reply = await call(request, timeout=5)

    assert reply.text == "HELLO"
    assert reply.at.seconds == 42
