"""Fixtures: real proxies between real backends on loopback port 0, spans in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import pytest
from grpc import aio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.server import ProxyServer
from proxy.settings import Settings, load_settings
from tests.backends import Behaviour, ProbeBackend

ProxyFactory = Callable[..., Coroutine[Any, Any, tuple[ProxyServer, InMemorySpanExporter]]]


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Coroutine[Any, Any, ProbeBackend]]]:
    """Start probe backends: ``await backends(Behaviour(delay=2))``; all stopped at the end."""
    started: list[ProbeBackend] = []

    async def start(behaviour: Behaviour | None = None, **kwargs: Any) -> ProbeBackend:
        backend = await ProbeBackend(behaviour or Behaviour(), **kwargs).start()
        started.append(backend)
        return backend

    yield start
    await asyncio.gather(*(b.stop() for b in started))


def proxy_settings(production: str, shadows: Sequence[str] = (), **overrides: Any) -> Settings:
    return load_settings(
        overrides={
            "listen": "127.0.0.1:0",
            "production": production,
            "shadows": list(shadows),
            "exporters": "none",
            "shutdown_grace": 2.0,
            "admin_listen": "off",
            "shadow_grace": 1.0,
            **overrides,
        },
        environ={},
    )


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """Start an in-process proxy recording to an in-memory exporter; stopped at the end."""
    started: list[ProxyServer] = []

    async def make(
        production: str,
        shadows: Sequence[str] = (),
        **overrides: Any,
    ) -> tuple[ProxyServer, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        proxy = ProxyServer(
            proxy_settings(production, shadows, **overrides), span_exporters=[exporter]
        )
        await proxy.start()
        started.append(proxy)
        return proxy, exporter

    yield make
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[str], aio.Channel]]:
    """Client channels, closed at the end."""
    channels: list[aio.Channel] = []

    def open_channel(address: str) -> aio.Channel:
        channel = aio.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()
