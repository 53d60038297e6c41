"""The production path: exact bytes, statuses, metadata, deadlines, request ids, health."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proxy.gen import predict_pb2
from tests.backends import Behaviour, wait_for

PREDICT = "/predict.v1.PredictionService/Predict"


def _reverse(body: bytes) -> bytes:
    return body[::-1] + b"!"


async def test_reply_bytes_status_and_metadata_are_production_s(backends, make_proxy, channel_to):
    production = await backends(
        Behaviour(
            reply=_reverse,
            initial_metadata=(("x-model", "v1"),),
            trailing_metadata=(("x-served-by", "prod-7"), ("x-cost-bin", b"\x00\x01\xff")),
        )
    )
    shadow = await backends(Behaviour(reply=lambda body: b"something else entirely"))
    proxy, _ = await make_proxy(f"prod={production.address}", [f"cand={shadow.address}"])
    request = bytes(range(256)) * 3  # not a protobuf message: forwarded as opaque bytes

    direct = channel_to(production.address).unary_unary("/any.Service/Method")(request)
    direct_reply = await direct
    through = channel_to(proxy.address).unary_unary("/any.Service/Method")(request)
    proxied_reply = await through

    assert proxied_reply == direct_reply == _reverse(request)
    assert await through.initial_metadata() == await direct.initial_metadata()
    trailing = tuple(await through.trailing_metadata())
    assert trailing[: len(await direct.trailing_metadata())] == tuple(
        await direct.trailing_metadata()
    )
    assert ("x-served-by", "prod-7") in trailing and ("x-cost-bin", b"\x00\x01\xff") in trailing


async def test_every_backend_gets_the_same_request_bytes(backends, make_proxy, channel_to):
    production = await backends()
    shadows = [await backends(), await backends()]
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"a={shadows[0].address}", f"b={shadows[1].address}"]
    )
    request = predict_pb2.PredictRequest(model_name="m", request_id="req-1").SerializeToString()
    await channel_to(proxy.address).unary_unary(PREDICT)(request)
    await wait_for(lambda: all(s.received for s in shadows))
    for backend in (production, *shadows):
        assert [(r.method, r.body) for r in backend.received] == [(PREDICT, request)]


async def test_production_error_passes_through_unchanged(backends, make_proxy, channel_to):
    production = await backends(
        Behaviour(
            error=(grpc.StatusCode.INVALID_ARGUMENT, "expected shape [batch, 30], got [2, 29]"),
            trailing_metadata=(("x-why", "shape"),),
        )
    )
    proxy, _ = await make_proxy(f"prod={production.address}")
    with pytest.raises(aio.AioRpcError) as info:
        await channel_to(proxy.address).unary_unary("/m.S/Predict")(b"x")
    error = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "expected shape [batch, 30], got [2, 29]"
    assert ("x-why", "shape") in tuple(error.trailing_metadata())


async def test_backend_unavailable_status_is_not_rewritten(backends, make_proxy, channel_to):
    # A backend that says UNAVAILABLE itself is production's answer, details and all.
    production = await backends(Behaviour(error=(grpc.StatusCode.UNAVAILABLE, "model warming up")))
    proxy, _ = await make_proxy(f"prod={production.address}")
    with pytest.raises(aio.AioRpcError) as info:
        await channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "model warming up"


async def test_production_down_gives_unavailable_naming_it_and_proxy_stays_up(
    backends, make_proxy, channel_to
):
    dead = await backends()
    dead_address = dead.address
    await dead.stop()
    proxy, _ = await make_proxy(f"prod={dead_address}")
    channel = channel_to(proxy.address)
    for _ in range(2):
        with pytest.raises(aio.AioRpcError) as info:
            await channel.unary_unary("/m.S/M")(b"x", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "production backend 'prod'" in info.value.details()
        assert dead_address in info.value.details()
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert proxy.fanout.stats.unreachable == 2


async def test_client_deadline_bounds_production_and_cancels_it(backends, make_proxy, channel_to):
    production = await backends(Behaviour(delay=3.0))
    proxy, _ = await make_proxy(f"prod={production.address}")
    start = time.perf_counter()
    with pytest.raises(aio.AioRpcError) as info:
        await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", timeout=0.3)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - start < 2.0
    # The proxy passed the deadline on: production gave up too, long before its 3 s.
    await wait_for(lambda: production.cancelled == 1, timeout=2.0)
    assert production.completed == 0


async def test_client_cancel_cancels_production(backends, make_proxy, channel_to):
    production = await backends(Behaviour(hang=True))
    proxy, _ = await make_proxy(f"prod={production.address}")
    call = channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    await wait_for(lambda: len(production.received) == 1)
    call.cancel()
    await wait_for(lambda: production.cancelled == 1, timeout=3.0)
    await wait_for(lambda: proxy.fanout.stats.cancelled == 1)


async def test_request_id_from_metadata_body_or_generated(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}")
    channel = channel_to(proxy.address)

    from_metadata = channel.unary_unary(PREDICT)(b"", metadata=(("x-request-id", "from-md"),))
    await from_metadata
    body = predict_pb2.PredictRequest(request_id="from-body").SerializeToString()
    from_body = channel.unary_unary(PREDICT)(body)
    await from_body
    generated = channel.unary_unary("/other.S/M")(b"opaque")
    await generated

    ids = []
    for call in (from_metadata, from_body, generated):
        trailing = dict(tuple(await call.trailing_metadata()))
        ids.append(trailing["x-request-id"])
    assert ids[:2] == ["from-md", "from-body"]
    assert len(ids[2]) == 16 and ids[2] not in ids[:2]
    assert [r.metadata["x-request-id"] for r in production.received] == ids


async def test_a_body_id_that_cannot_be_a_header_is_replaced(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}")
    channel = channel_to(proxy.address)
    for body_id, kept in (
        ("order-1234", True),
        ("order-ü", False),  # metadata values must be printable ASCII
        ("line\nbreak", False),
        ("x" * 300, False),  # too long to carry on every call
    ):
        body = predict_pb2.PredictRequest(request_id=body_id).SerializeToString()
        call = channel.unary_unary(PREDICT)(body)
        assert await call == body  # the call itself goes through untouched
        sent = dict(tuple(await call.trailing_metadata()))["x-request-id"]
        assert (sent == body_id) is kept
        if not kept:
            assert len(sent) == 16
        assert production.received[-1].metadata["x-request-id"] == sent


async def test_metadata_forwarded_minus_hop_by_hop_and_shadows_marked(
    backends, make_proxy, channel_to
):
    production = await backends()
    shadow = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", [f"cand={shadow.address}"])
    metadata = (
        ("x-tenant", "acme"),
        ("authorization", "Bearer s3cret"),
        ("x-blob-bin", b"\x01\x02"),
    )
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", metadata=metadata)
    await wait_for(lambda: bool(shadow.received))
    prod_md, shadow_md = production.received[0].metadata, shadow.received[0].metadata
    for md in (prod_md, shadow_md):
        assert md["x-tenant"] == "acme"
        assert md["authorization"] == "Bearer s3cret"  # forwarded; only traces redact it
        assert md["x-blob-bin"] == b"\x01\x02"
        assert md["traceparent"].startswith("00-")
    assert shadow_md["x-shadow"] == "true"
    assert "x-shadow" not in prod_md
    # Each backend call carries its own span context in the same trace.
    assert prod_md["traceparent"].split("-")[1] == shadow_md["traceparent"].split("-")[1]
    assert prod_md["traceparent"].split("-")[2] != shadow_md["traceparent"].split("-")[2]


async def test_oversize_request_is_refused_and_proxy_stays_up(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", max_message_bytes=1024)
    channel = channel_to(proxy.address)
    with pytest.raises(aio.AioRpcError) as info:
        await channel.unary_unary("/m.S/M")(b"x" * 4096)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await channel.unary_unary("/m.S/M")(b"small") == b"small"
    assert len(production.received) == 1


async def test_health_serving_and_reflection(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}")
    channel = channel_to(proxy.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "predict.v1.PredictionService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Health is answered by the proxy itself, never forwarded.
    assert production.received == []

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> reflection_pb2.ServerReflectionResponse:
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in responses:
            return response
        raise AssertionError("no reflection response")

    services = {s.name for s in (await ask()).list_services_response.service}
    assert "predict.v1.PredictionService" in services
    assert "grpc.health.v1.Health" in services


async def test_proxy_health_follows_production(backends, make_proxy, channel_to):
    production = await backends()
    port = production.port
    proxy, _ = await make_proxy(f"prod={production.address}", health_interval=0.1)
    health = health_pb2_grpc.HealthStub(channel_to(proxy.address))

    async def status() -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return reply.status

    assert await status() == health_pb2.HealthCheckResponse.SERVING
    await production.stop()
    deadline = time.monotonic() + 5
    while await status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "proxy never noticed production went away"
        await asyncio.sleep(0.05)
    await production.start(port)
    while await status() != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline + 5, "proxy never noticed production came back"
        await asyncio.sleep(0.05)


async def test_tracestate_without_a_valid_traceparent_is_dropped(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}")
    metadata = (("traceparent", "garbage"), ("tracestate", "vendor=abc"))
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", metadata=metadata)
    sent = production.received[0].metadata
    assert "tracestate" not in sent
    assert sent["traceparent"].startswith("00-")
