"""Backends at run time through the admin API: changes, refusals, promotion under load, health."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.gen import admin_pb2, admin_pb2_grpc
from proxy.registry import RegistryError, apply_change, replay
from proxy.settings import BackendSettings
from tests.backends import Behaviour, wait_for


def _tag(name: str):
    return lambda body: name.encode() + b":" + body


async def _admin(make_proxy, channel_to, production, shadows=(), **overrides):
    proxy, spans = await make_proxy(
        f"prod={production.address}", list(shadows), admin_listen="127.0.0.1:0", **overrides
    )
    stub = admin_pb2_grpc.ProxyAdminStub(channel_to(f"127.0.0.1:{proxy.admin_port}"))
    return proxy, spans, stub


async def _listing(stub) -> list[tuple[str, int, str]]:
    reply = await stub.ListBackends(admin_pb2.ListBackendsRequest())
    return [(b.spec.name, b.spec.role, b.spec.address) for b in reply.backends]


async def test_register_update_deregister_through_the_api(backends, make_proxy, channel_to):
    production = await backends(Behaviour(reply=_tag("prod")))
    candidate = await backends(Behaviour(reply=_tag("cand")))
    proxy, _, stub = await _admin(make_proxy, channel_to, production)
    method = channel_to(proxy.address).unary_unary("/m.S/M")

    reply = await stub.RegisterBackend(
        admin_pb2.RegisterBackendRequest(
            backend=admin_pb2.BackendSpec(
                name="cand", address=candidate.address, role=admin_pb2.ROLE_SHADOW, sample_rate=1.0
            )
        )
    )
    assert reply.backend.spec.name == "cand" and reply.backend.source == "admin"
    assert reply.backend.spec.timeout_seconds == 5.0
    assert await method(b"x") == b"prod:x"
    await wait_for(lambda: len(candidate.received) == 1)

    updated = await stub.UpdateBackend(admin_pb2.UpdateBackendRequest(name="cand", sample_rate=0.0))
    assert updated.backend.spec.sample_rate == 0.0
    await method(b"y")
    await asyncio.sleep(0.1)
    assert len(candidate.received) == 1  # sampled out now

    listing = await stub.ListBackends(admin_pb2.ListBackendsRequest())
    by_name = {b.spec.name: b for b in listing.backends}
    assert [b.spec.name for b in listing.backends] == ["prod", "cand"]
    assert by_name["prod"].calls == 2 and by_name["prod"].health == "serving"
    assert by_name["cand"].calls == 1 and by_name["cand"].sampled_out == 1

    await stub.DeregisterBackend(admin_pb2.DeregisterBackendRequest(name="cand"))
    assert await _listing(stub) == [("prod", admin_pb2.ROLE_PRODUCTION, production.address)]
    assert await method(b"z") == b"prod:z"


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda s, a: s.RegisterBackend(admin_pb2.RegisterBackendRequest(backend=admin_pb2.BackendSpec(name="new", address="nowhere", role=admin_pb2.ROLE_SHADOW))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected HOST:PORT",
        ),
        (
            lambda s, a: s.RegisterBackend(admin_pb2.RegisterBackendRequest(backend=admin_pb2.BackendSpec(name="bad name!", address=a, role=admin_pb2.ROLE_SHADOW))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "backend name",
        ),
        (
            lambda s, a: s.RegisterBackend(admin_pb2.RegisterBackendRequest(backend=admin_pb2.BackendSpec(name="cand", address=a, role=admin_pb2.ROLE_SHADOW))),
            grpc.StatusCode.ALREADY_EXISTS,
            "already exists",
        ),
        (
            lambda s, a: s.RegisterBackend(admin_pb2.RegisterBackendRequest(backend=admin_pb2.BackendSpec(name="x", address=a, role=admin_pb2.ROLE_PRODUCTION))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "promote",
        ),
        (
            lambda s, a: s.RegisterBackend(admin_pb2.RegisterBackendRequest(backend=admin_pb2.BackendSpec(name="x", address=a, role=admin_pb2.ROLE_SHADOW, sample_rate=1.5))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sample rate",
        ),
        (
            lambda s, a: s.DeregisterBackend(admin_pb2.DeregisterBackendRequest(name="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "ghost",
        ),
        (
            lambda s, a: s.DeregisterBackend(admin_pb2.DeregisterBackendRequest(name="prod")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "production",
        ),
        (
            lambda s, a: s.Promote(admin_pb2.PromoteRequest(name="prod")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "already the production",
        ),
        (
            lambda s, a: s.Promote(admin_pb2.PromoteRequest(name="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "ghost",
        ),
        (
            lambda s, a: s.Promote(admin_pb2.PromoteRequest(name="twin")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "only a shadow",
        ),
        (
            lambda s, a: s.UpdateBackend(admin_pb2.UpdateBackendRequest(name="cand", max_in_flight=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_in_flight",
        ),
        (
            lambda s, a: s.UpdateBackend(admin_pb2.UpdateBackendRequest(name="cand")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "nothing to update",
        ),
        (
            lambda s, a: s.UpdateBackend(admin_pb2.UpdateBackendRequest(name="ghost", sample_rate=0.5)),
            grpc.StatusCode.NOT_FOUND,
            "ghost",
        ),
    ],
)  # fmt: skip
async def test_bad_admin_input_gets_the_right_status_and_changes_nothing(
    call, code, message, backends, make_proxy, channel_to
):
    production = await backends()
    candidate = await backends()
    twin = await backends()
    _, _, stub = await _admin(
        make_proxy,
        channel_to,
        production,
        [f"cand={candidate.address}"],
        references=[f"twin={twin.address}"],
    )
    before = await stub.ListBackends(admin_pb2.ListBackendsRequest())
    with pytest.raises(aio.AioRpcError) as info:
        await call(stub, candidate.address)
    assert info.value.code() is code
    assert message in info.value.details()
    after = await stub.ListBackends(admin_pb2.ListBackendsRequest())
    assert [b.spec for b in after.backends] == [b.spec for b in before.backends]


async def test_admin_token_is_required_when_set(backends, make_proxy, channel_to):
    production = await backends()
    _, _, stub = await _admin(make_proxy, channel_to, production, admin_token="s3cret")
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
        with pytest.raises(aio.AioRpcError) as info:
            await stub.ListBackends(admin_pb2.ListBackendsRequest(), metadata=metadata)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    ok = await stub.ListBackends(
        admin_pb2.ListBackendsRequest(), metadata=(("authorization", "Bearer s3cret"),)
    )
    assert [b.spec.name for b in ok.backends] == ["prod"]


async def test_promotion_under_load_fails_no_call_and_each_has_one_production(
    backends, make_proxy, channel_to
):
    old = await backends(Behaviour(reply=_tag("old"), delay=0.002))
    new = await backends(Behaviour(reply=_tag("new"), delay=0.002))
    proxy, _, stub = await _admin(make_proxy, channel_to, old, [f"new={new.address}"])
    method = channel_to(proxy.address).unary_unary("/m.S/M")
    replies: list[bytes] = []
    failures: list[Exception] = []
    stop = asyncio.Event()

    async def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            body = f"{index}-{n}".encode()
            n += 1
            try:
                replies.append(await method(body, timeout=5))
            except aio.AioRpcError as error:
                failures.append(error)

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    await asyncio.sleep(0.4)
    promoted = await stub.Promote(admin_pb2.PromoteRequest(name="new"))
    switched_at = len(replies)
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    assert promoted.production.spec.name == "new"
    assert (
        promoted.previous.spec.name == "prod"
        and promoted.previous.spec.role == admin_pb2.ROLE_SHADOW
    )
    # Every reply came from exactly one production: the old one before, the new one after.
    assert all(r.startswith((b"old:", b"new:")) for r in replies)
    assert replies[-1].startswith(b"new:")
    assert any(r.startswith(b"old:") for r in replies[:switched_at])
    late = replies[switched_at + 16 :]
    assert late and all(r.startswith(b"new:") for r in late)
    # The old production is a shadow now: it still gets copies.
    listing = {
        b.spec.name: b for b in (await stub.ListBackends(admin_pb2.ListBackendsRequest())).backends
    }
    assert listing["new"].spec.role == admin_pb2.ROLE_PRODUCTION
    assert listing["prod"].spec.role == admin_pb2.ROLE_SHADOW
    # Each request went to production once: old+new saw every request exactly once as
    # production (the old one's later requests are shadow copies, marked x-shadow).
    production_bodies = [r.body for r in old.received if "x-shadow" not in r.metadata] + [
        r.body for r in new.received if "x-shadow" not in r.metadata
    ]
    assert sorted(production_bodies) == sorted(r.split(b":", 1)[1] for r in replies)


async def test_promote_with_remove_old(backends, make_proxy, channel_to):
    old = await backends()
    new = await backends()
    _, _, stub = await _admin(make_proxy, channel_to, old, [f"new={new.address}"])
    reply = await stub.Promote(admin_pb2.PromoteRequest(name="new", remove_old=True))
    assert not reply.HasField("previous")
    assert await _listing(stub) == [("new", admin_pb2.ROLE_PRODUCTION, new.address)]


async def test_health_transitions_of_shadow_and_production(backends, make_proxy, channel_to):
    production = await backends(Behaviour(reply=_tag("prod")))
    shadow = await backends()
    prod_port, shadow_port = production.port, shadow.port
    proxy, _, stub = await _admin(
        make_proxy, channel_to, production, [f"cand={shadow.address}"], health_interval=0.1
    )
    channel = channel_to(proxy.address)
    method = channel.unary_unary("/m.S/M")
    health = health_pb2_grpc.HealthStub(channel)

    async def backend_health(name: str) -> str:
        listing = await stub.ListBackends(admin_pb2.ListBackendsRequest())
        return next(b.health for b in listing.backends if b.spec.name == name)

    async def until(predicate, what: str) -> None:
        deadline = time.monotonic() + 5
        while not await predicate():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    # A shadow that disappears is marked not serving (not forgotten) and skipped, counted.
    await shadow.stop()
    await until(lambda: _is(backend_health("cand"), "not_serving"), "shadow never marked down")
    await method(b"a")
    stats = proxy.shadows.stats["cand"]
    assert stats.unhealthy_skipped >= 1
    assert "cand" in [
        b.spec.name for b in (await stub.ListBackends(admin_pb2.ListBackendsRequest())).backends
    ]
    await shadow.start(shadow_port)
    await until(lambda: _is(backend_health("cand"), "serving"), "shadow recovery not picked up")
    sent = stats.sent
    await method(b"b")
    await wait_for(lambda: stats.sent == sent + 1)

    # Production down: the proxy reports NOT_SERVING and fails calls fast, naming it.
    await production.stop()

    async def proxy_status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status

    await until(
        lambda: _is(proxy_status(), health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING"
    )
    started = time.perf_counter()
    with pytest.raises(aio.AioRpcError) as info:
        await method(b"c", timeout=5)
    assert time.perf_counter() - started < 0.5
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "production backend 'prod'" in info.value.details()
    await production.start(prod_port)
    await until(
        lambda: _is(proxy_status(), health_pb2.HealthCheckResponse.SERVING), "SERVING again"
    )
    assert await method(b"d") == b"prod:d"


async def _is(awaitable, expected) -> bool:
    return (await awaitable) == expected


def test_replay_applies_changes_in_order_and_skips_what_no_longer_applies():
    base = [
        BackendSettings("prod", "127.0.0.1:1", role="production", source="config"),
        BackendSettings("cand", "127.0.0.1:2", timeout=5.0, source="config"),
    ]
    changes = [
        {
            "op": "register",
            "backend": {"name": "extra", "address": "127.0.0.1:3", "role": "shadow"},
        },
        {"op": "promote", "name": "cand"},
        {"op": "update", "name": "extra", "changes": {"sample_rate": 0.5}},
        {"op": "deregister", "name": "gone"},
    ]
    result, skipped = replay(base, changes)
    assert [(s.name, s.role, s.source) for s in result] == [
        ("cand", "production", "config"),
        ("prod", "shadow", "config"),
        ("extra", "shadow", "admin"),
    ]
    assert result[2].sample_rate == 0.5 and result[1].timeout == 5.0
    assert skipped == ["deregister gone: no backend named 'gone'"]
    with pytest.raises(RegistryError) as info:
        apply_change(result, {"op": "teleport"})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_admin_calls_on_the_main_port_are_not_forwarded(backends, make_proxy, channel_to):
    production = await backends()
    proxy, _, _ = await _admin(make_proxy, channel_to, production, admin_token="s3cret")
    wrong_port = admin_pb2_grpc.ProxyAdminStub(channel_to(proxy.address))
    with pytest.raises(aio.AioRpcError) as info:
        await wrong_port.ListBackends(
            admin_pb2.ListBackendsRequest(), metadata=(("authorization", "Bearer s3cret"),)
        )
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert production.received == []  # the token never left the proxy


async def test_a_promoted_shadow_drops_its_shadow_timeout(backends, make_proxy, channel_to):
    old = await backends()
    new = await backends(Behaviour(delay=0.3))
    proxy, _, stub = await _admin(make_proxy, channel_to, old, [f"new={new.address},timeout=100ms"])
    reply = await stub.Promote(admin_pb2.PromoteRequest(name="new"))
    assert not reply.production.spec.HasField("timeout_seconds")
    assert reply.previous.spec.timeout_seconds == 5.0
    # A 0.3 s production answer is not cut by the 100 ms it had as a shadow.
    assert await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", timeout=5) == b"x"
