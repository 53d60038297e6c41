"""The admin API as tests call it: each call on a channel of its own, over its own connection.

A fresh connection per call matters with ``--workers``: the kernel hands each new connection
to one of the workers sharing the port, so repeated calls reach different workers.
"""

from __future__ import annotations

import socket

from grpc import aio

from proxy.gen import admin_pb2, admin_pb2_grpc

# Channels in one process share connections by default (the global subchannel pool); a
# local pool makes every channel open its own.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)

Listing = list[tuple[str, str, str, float, str]]
"""(name, role, address, sample rate, source) per backend, production first."""

_ROLE_NAMES = {
    admin_pb2.ROLE_PRODUCTION: "production",
    admin_pb2.ROLE_SHADOW: "shadow",
    admin_pb2.ROLE_REFERENCE: "reference",
}


def free_port() -> int:
    """A loopback port nobody listens on now (for a subprocess's --admin-listen)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def own_channel(address: str) -> aio.Channel:
    """A channel with a connection of its own; the caller closes it."""
    return aio.insecure_channel(address, options=OWN_CONNECTION)


async def list_backends(admin: str) -> list[admin_pb2.BackendStatus]:
    async with own_channel(admin) as channel:
        stub = admin_pb2_grpc.ProxyAdminStub(channel)
        reply = await stub.ListBackends(admin_pb2.ListBackendsRequest(), timeout=5)
    return list(reply.backends)


async def listing(admin: str) -> Listing:
    """The registry as one admin call sees it, without the counters."""
    return [
        (
            b.spec.name,
            _ROLE_NAMES[b.spec.role],
            b.spec.address,
            b.spec.sample_rate,
            b.source,
        )
        for b in await list_backends(admin)
    ]


async def register_shadow(
    admin: str, name: str, address: str, *, sample_rate: float = 1.0
) -> admin_pb2.BackendStatus:
    async with own_channel(admin) as channel:
        stub = admin_pb2_grpc.ProxyAdminStub(channel)
        spec = admin_pb2.BackendSpec(
            name=name, address=address, role=admin_pb2.ROLE_SHADOW, sample_rate=sample_rate
        )
        reply = await stub.RegisterBackend(
            admin_pb2.RegisterBackendRequest(backend=spec), timeout=5
        )
    return reply.backend


async def promote(admin: str, name: str) -> admin_pb2.PromoteResponse:
    async with own_channel(admin) as channel:
        stub = admin_pb2_grpc.ProxyAdminStub(channel)
        return await stub.Promote(admin_pb2.PromoteRequest(name=name), timeout=5)
