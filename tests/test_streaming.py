"""Streaming methods: relayed message by message to production only, never shadowed.

A real bidirectional backend on a loopback port, the proxy in front of it and a probe
backend as the shadow (which must see nothing).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio

from proxy.errors import ConfigError
from proxy.gen import admin_pb2, feedback_pb2, predict_pb2
from proxy.gen.serving_descriptors import FILE_DESCRIPTOR_SET
from proxy.protocols import DEFAULT_STREAMING_METHODS, serving_pool
from proxy.settings import load_settings
from tests.backends import wait_for

SERVICE = "test.v1.Chat"
TALK = f"/{SERVICE}/Talk"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class ChatBackend:
    """A bidi backend: answers each message with ``replies`` messages, as it comes."""

    replies: int = 2
    fail_after: int | None = None
    """Abort with ``error`` after this many messages."""
    error: tuple[grpc.StatusCode, str] = (grpc.StatusCode.FAILED_PRECONDITION, "no more")
    hang: bool = False
    initial_metadata: Metadata = (("x-initial", "hello"),)
    trailing_metadata: Metadata = (("x-trailer", "bye"), ("x-blob-bin", b"\x00\xff"))
    received: list[bytes] = field(default_factory=list)
    metadata: dict[str, str | bytes] = field(default_factory=dict)
    time_remaining: float | None = None
    calls: int = 0
    cancelled: int = 0
    port: int = 0
    _server: aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _talk(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        self.metadata = dict(context.invocation_metadata() or ())
        self.time_remaining = context.time_remaining()
        await context.send_initial_metadata(self.initial_metadata)
        try:
            async for message in requests:
                self.received.append(message)
                if self.hang:
                    await asyncio.Event().wait()
                if self.fail_after is not None and len(self.received) >= self.fail_after:
                    await context.abort(*self.error, trailing_metadata=self.trailing_metadata)
                for n in range(1, self.replies + 1):
                    yield message + f"-{n}".encode()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        context.set_trailing_metadata(self.trailing_metadata)

    async def start(self) -> ChatBackend:
        server = aio.server()
        handlers = {"Talk": grpc.stream_stream_rpc_method_handler(self._talk)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


@pytest.fixture
async def chat() -> AsyncIterator[list[ChatBackend]]:
    started: list[ChatBackend] = []
    yield started
    for backend in started:
        await backend.stop()


async def _start(started: list[ChatBackend], **kwargs: object) -> ChatBackend:
    backend = await ChatBackend(**kwargs).start()  # type: ignore[arg-type]
    started.append(backend)
    return backend


async def test_every_message_and_reply_is_relayed_in_order_to_production_only(
    chat, backends, make_proxy, channel_to
) -> None:
    production = await _start(chat)
    shadow = await backends()
    proxy, spans = await make_proxy(
        f"prod={production.address}", [f"cand={shadow.address}"], streaming_methods=[TALK]
    )
    call = channel_to(proxy.address).stream_stream(TALK)(
        metadata=(("x-tenant", "acme"), ("x-request-id", "req-7")), timeout=5
    )
    # Lock-step: each reply arrives before the next message is sent, so nothing waits
    # for the client's half-close (a unary relay would hang here).
    for message in (b"a", b"b", b"c"):
        await call.write(message)
        assert [await call.read(), await call.read()] == [message + b"-1", message + b"-2"]
    await call.done_writing()
    assert await call.read() is aio.EOF
    assert await call.code() is grpc.StatusCode.OK
    assert tuple(await call.initial_metadata()) == (("x-initial", "hello"),)
    assert tuple(await call.trailing_metadata()) == (
        ("x-trailer", "bye"),
        ("x-blob-bin", b"\x00\xff"),
        ("x-request-id", "req-7"),
    )
    assert production.received == [b"a", b"b", b"c"]
    assert production.metadata["x-tenant"] == "acme"
    assert production.metadata["x-request-id"] == "req-7"
    assert "x-shadow" not in production.metadata
    # A copy is counted as sent before it leaves: none was.
    assert proxy.shadows.stats["cand"].sent == 0
    assert shadow.received == []
    stats = proxy.streams.stats
    assert (stats.streams, stats.requests, stats.replies, stats.errors) == (1, 3, 6, 0)
    prod = proxy.registry.snapshot.production
    assert (prod.stats.sent, prod.stats.ok, prod.in_flight) == (1, 1, 0)
    # Traced like a unary call, with message counts instead of payloads; not compared.
    assert proxy.recorder.flush()
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert set(finished) == {f"{SERVICE}/{TALK.rsplit('/', 1)[1]}", "production prod"}
    for span in finished.values():
        assert span.attributes["shadow.stream"] is True
        assert span.attributes["shadow.stream.requests"] == 3
        assert span.attributes["shadow.stream.replies"] == 6
        assert span.attributes["shadow.request_id"] == "req-7"
        assert span.events == ()
        assert "shadow.compared" not in span.attributes
    server, client = finished[f"{SERVICE}/{TALK.rsplit('/', 1)[1]}"], finished["production prod"]
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert production.metadata["traceparent"] == (
        f"00-{client.context.trace_id:032x}-{client.context.span_id:016x}-01"
    )


async def test_production_gets_its_span_in_the_clients_trace(chat, make_proxy, channel_to):
    production = await _start(chat, replies=1)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    for sent, same_trace, tracestate in (
        ((("traceparent", traceparent), ("tracestate", "k=v")), True, "k=v"),
        # W3C: a tracestate without a valid traceparent belongs to no trace.
        ((("traceparent", "00-bad"), ("tracestate", "k=v")), False, None),
        ((), False, None),
    ):
        call = channel_to(proxy.address).stream_stream(TALK)(metadata=sent, timeout=5)
        await call.write(b"x")
        await call.done_writing()
        assert [reply async for reply in call] == [b"x-1"]
        received = production.metadata
        _, got_trace, span_id, _ = str(received["traceparent"]).split("-")
        assert (got_trace == trace_id) is same_trace
        assert span_id != "b7ad6b7169203331"  # the proxy's production span, not the client's
        assert received.get("tracestate") == tracestate


async def test_request_id_is_made_when_the_client_sends_none(chat, make_proxy, channel_to):
    production = await _start(chat, replies=1)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    await call.write(b"x")
    await call.done_writing()
    assert [reply async for reply in call] == [b"x-1"]
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == production.metadata["x-request-id"]
    assert trailing["x-request-id"]


async def test_a_whole_service_can_be_listed(chat, make_proxy, channel_to):
    production = await _start(chat, replies=3)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[f"/{SERVICE}/"])
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    await call.write(b"x")
    await call.done_writing()
    assert [reply async for reply in call] == [b"x-1", b"x-2", b"x-3"]


async def test_backend_error_status_passes_through_after_the_replies_before_it(
    chat, make_proxy, channel_to
) -> None:
    production = await _start(chat, fail_after=2)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)(
        metadata=(("x-request-id", "r-1"),), timeout=5
    )
    await call.write(b"a")
    assert [await call.read(), await call.read()] == [b"a-1", b"a-2"]
    await call.write(b"b")
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    error = info.value
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "no more"
    assert tuple(error.initial_metadata()) == (("x-initial", "hello"),)
    assert tuple(error.trailing_metadata()) == (
        ("x-trailer", "bye"),
        ("x-blob-bin", b"\x00\xff"),
        ("x-request-id", "r-1"),
    )
    await wait_for(lambda: proxy.streams.stats.errors == 1)
    assert proxy.streams.stats.unreachable == 0


async def test_production_down_gives_unavailable_naming_it(chat, make_proxy, channel_to):
    production = await _start(chat)
    # Health checks far apart: the stream itself must find production gone.
    proxy, _ = await make_proxy(
        f"prod={production.address}", streaming_methods=[TALK], health_interval="60s"
    )
    await production.stop()
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    with pytest.raises(aio.AioRpcError) as info:
        await call.write(b"a")
        await call.read()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert details.startswith(f"production backend 'prod' ({production.address}) is unavailable")
    await wait_for(lambda: proxy.streams.stats.unreachable == 1)


async def test_production_not_serving_fails_fast_naming_it(chat, make_proxy, channel_to):
    dead = await _start(chat)
    dead_address = dead.address
    await dead.stop()
    proxy, _ = await make_proxy(f"prod={dead_address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert (info.value.details() or "").startswith(
        f"production backend 'prod' ({dead_address}) is not serving"
    )
    assert "x-request-id" in dict(info.value.trailing_metadata())


async def test_production_channel_closed_mid_stream_gives_unavailable(
    chat, make_proxy, channel_to
) -> None:
    # What happens when a removed production's channel is closed under a stream.
    production = await _start(chat, hang=True)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    await call.write(b"a")
    await wait_for(lambda: production.received == [b"a"])
    await proxy.registry.snapshot.production.upstream.channel.close()
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == (
        f"production backend 'prod' ({production.address}) is unavailable: channel closed"
    )
    await wait_for(lambda: production.cancelled == 1, timeout=3.0)
    assert proxy.streams.stats.cancelled == 0


async def test_client_cancel_reaches_the_backend(chat, make_proxy, channel_to):
    production = await _start(chat, hang=True)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)()
    await call.write(b"a")
    await wait_for(lambda: production.received == [b"a"])
    call.cancel()
    await wait_for(lambda: production.cancelled == 1, timeout=3.0)
    await wait_for(lambda: proxy.streams.stats.cancelled == 1)
    prod = proxy.registry.snapshot.production
    assert (prod.stats.cancelled, prod.in_flight) == (1, 0)


async def test_client_deadline_bounds_the_production_stream(chat, make_proxy, channel_to):
    production = await _start(chat, hang=True)
    proxy, _ = await make_proxy(f"prod={production.address}", streaming_methods=[TALK])
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=0.5)
    await call.write(b"a")
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert production.time_remaining is not None and production.time_remaining < 0.6
    await wait_for(lambda: production.cancelled == 1, timeout=3.0)


async def test_a_promotion_mid_stream_does_not_move_it(chat, make_proxy, channel_to):
    first, second = await _start(chat, replies=1), await _start(chat, replies=1)
    proxy, _ = await make_proxy(
        f"prod={first.address}", [f"next={second.address}"], streaming_methods=[TALK]
    )
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    await call.write(b"a")
    assert await call.read() == b"a-1"
    proxy.change({"op": "promote", "name": "next"})
    await call.write(b"b")
    assert await call.read() == b"b-1"
    await call.done_writing()
    assert await call.code() is grpc.StatusCode.OK
    assert (first.received, second.received) == ([b"a", b"b"], [])
    # A new stream goes to the new production.
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    await call.write(b"c")
    await call.done_writing()
    assert [reply async for reply in call] == [b"c-1"]
    assert second.received == [b"c"]


async def test_a_streaming_method_not_in_the_list_is_cut_after_its_first_message(
    chat, backends, make_proxy, channel_to
) -> None:
    """The known limit: gRPC's wire format does not say that a call streams, so a method
    missing from ``streaming_methods`` is served as unary: production gets the stream's
    first message only, and the client gets one reply."""
    production = await _start(chat, replies=1)
    shadow = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"cand={shadow.address}"], streaming_methods="none"
    )
    call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
    for message in (b"a", b"b", b"c"):
        await call.write(message)
    await call.done_writing()
    assert [reply async for reply in call] == [b"a-1"]
    assert production.received == [b"a"]
    # As a unary call it is shadowed, with its first message.
    await wait_for(lambda: [r.body for r in shadow.received] == [b"a"])
    assert proxy.streams.stats.streams == 0


# ----------------------------------------------------------------------------- settings


def _streaming_methods_in(services: list[object]) -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"  # type: ignore[attr-defined]
        for service in services
        for method in service.methods  # type: ignore[attr-defined]
        if method.client_streaming or method.server_streaming
    }


def test_default_list_is_every_streaming_method_the_proxy_knows() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file
    serving = [
        serving_pool.service_descriptor(f"{file.package}.{service.name}")
        for file in files
        for service in file.service
    ]
    assert len(serving) == 2  # Open Inference and TF Serving
    own = [
        service
        for module in (predict_pb2, feedback_pb2, admin_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    ]
    assert set(DEFAULT_STREAMING_METHODS) == _streaming_methods_in([*serving, *own])
    assert MODEL_STREAM_INFER in DEFAULT_STREAMING_METHODS
    base = {"production": "prod=127.0.0.1:1"}
    settings = load_settings(overrides=base, environ={})
    assert settings.streaming_methods == DEFAULT_STREAMING_METHODS


def test_streaming_methods_are_parsed_like_never_shadowed() -> None:
    base = {"production": "prod=127.0.0.1:1"}

    def parsed(value: object) -> tuple[str, ...]:
        return load_settings(
            overrides={**base, "streaming_methods": value}, environ={}
        ).streaming_methods

    assert parsed(["/a.B/C", " /a.B/C ", "/x.Y/"]) == ("/a.B/C", "/x.Y/")
    assert parsed("/a.B/C,/d.E/F") == ("/a.B/C", "/d.E/F")
    assert parsed("none") == ()
    assert parsed([]) == ()
    from_file = load_settings(config={**base, "streaming_methods": ["/a.B/C"]}, environ={})
    assert from_file.streaming_methods == ("/a.B/C",)


@pytest.mark.parametrize("bad", ["Talk", "/a.B/C/D", "a.B/C", "/", "/a.B/C D"])
def test_bad_streaming_method_names_are_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^--streaming-method: .*/package\.Service/Method"):
        load_settings(
            overrides={"production": "prod=127.0.0.1:1", "streaming_methods": [bad]}, environ={}
        )
    with pytest.raises(ConfigError, match="streaming_methods must be a list"):
        load_settings(
            overrides={"production": "prod=127.0.0.1:1", "streaming_methods": 3}, environ={}
        )


def test_cli_flag_replaces_the_default_and_bad_ones_exit_2(tmp_path) -> None:
    from proxy.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        ["serve", "--production", "p=127.0.0.1:1", "--streaming-method", "/a.B/C",
         "--streaming-method", "/d.E/"]
    )  # fmt: skip
    assert settings_from_args(args).streaming_methods == ("/a.B/C", "/d.E/")
    args = build_parser().parse_args(["serve", "--production", "p=127.0.0.1:1"])
    assert settings_from_args(args).streaming_methods == DEFAULT_STREAMING_METHODS
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--production", "p=127.0.0.1:1",
         "--streaming-method", "Talk", "--state-file", "none"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--streaming-method: 'Talk' is not a gRPC method name" in result.stderr


# --------------------------------------------------------------------------- tritonclient


class _StreamInferBackend:
    """A small Open Inference backend with Triton's ModelStreamInfer only: each request's
    INPUT0 (INT32) comes back as two responses, its sum and then its product."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self._request = serving_pool.message_class("inference.ModelInferRequest")
        self._response = serving_pool.message_class("inference.ModelStreamInferResponse")
        self._server: aio.Server | None = None
        self.port = 0

    async def _stream_infer(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for data in requests:
            request = self._request.FromString(data)
            self.received.append(request.id)  # type: ignore[attr-defined]
            values = np.frombuffer(request.raw_input_contents[0], dtype="<i4")  # type: ignore[attr-defined]
            for result in (values.sum(), values.prod()):
                reply = self._response()
                infer = reply.infer_response  # type: ignore[attr-defined]
                infer.model_name = request.model_name  # type: ignore[attr-defined]
                infer.id = request.id  # type: ignore[attr-defined]
                output = infer.outputs.add()
                output.name, output.datatype = "OUTPUT0", "INT32"
                output.shape.append(1)
                infer.raw_output_contents.append(np.array([result], dtype="<i4").tobytes())
                yield reply.SerializeToString()

    async def start(self) -> _StreamInferBackend:
        server = aio.server()
        handlers = {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._stream_infer)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)


def _triton_stream(address: str, rows: list[list[int]]) -> list[tuple[str, int]]:
    """tritonclient's own streaming API, blocking (run it in a thread)."""
    import tritonclient.grpc as triton

    results: list[tuple[str, int]] = []
    errors: list[object] = []

    def callback(result: object, error: object) -> None:
        if error is not None:
            errors.append(error)
        else:
            response = result.get_response()  # type: ignore[attr-defined]
            results.append((response.id, int(result.as_numpy("OUTPUT0")[0])))  # type: ignore[attr-defined]

    client = triton.InferenceServerClient(url=address)
    try:
        client.start_stream(callback=callback, stream_timeout=10)
        for n, row in enumerate(rows):
            tensor = triton.InferInput("INPUT0", [len(row)], "INT32")
            tensor.set_data_from_numpy(np.array(row, dtype=np.int32))
            client.async_stream_infer("adder", [tensor], request_id=f"req-{n}")
        client.stop_stream()
    finally:
        client.close()
    assert errors == []
    return results


async def test_tritonclient_stream_goes_through_the_proxy_to_production_only(
    backends, make_proxy
) -> None:
    pytest.importorskip("tritonclient.grpc")
    production = await _StreamInferBackend().start()
    try:
        shadow = await backends()
        # The default list: ModelStreamInfer is relayed without any configuration.
        proxy, _ = await make_proxy(f"prod=127.0.0.1:{production.port}", [f"cand={shadow.address}"])
        rows = [[1, 2, 3], [4, 5], [6]]
        results = await asyncio.to_thread(_triton_stream, proxy.address, rows)
        assert results == [
            ("req-0", 6), ("req-0", 6), ("req-1", 9), ("req-1", 20), ("req-2", 6), ("req-2", 6),
        ]  # fmt: skip
        assert production.received == ["req-0", "req-1", "req-2"]
        assert shadow.received == []
        assert proxy.streams.stats.replies == 6
    finally:
        await production.stop()


async def test_traced_streams_read_back_in_the_report(chat, tmp_path, channel_to) -> None:
    from proxy.compare.report import build_report, render_text
    from proxy.otlp_json import JsonLinesSpanExporter
    from proxy.server import ProxyServer
    from tests.conftest import proxy_settings

    production = await _start(chat, replies=2)
    traces = tmp_path / "traces.jsonl"
    proxy = ProxyServer(
        proxy_settings(f"prod={production.address}", streaming_methods=[TALK]),
        span_exporters=[JsonLinesSpanExporter(traces)],
    )
    await proxy.start()
    try:
        call = channel_to(proxy.address).stream_stream(TALK)(timeout=5)
        for message in (b"a", b"b"):
            await call.write(message)
        await call.done_writing()
        assert len([reply async for reply in call]) == 4
        assert proxy.recorder.flush()
    finally:
        await proxy.stop()
    report = build_report(traces)
    production_row = {b["name"]: b for b in report.to_dict()["backends"]}["prod"]
    assert production_row["calls"] == 1
    assert "Talk" in render_text(report)
