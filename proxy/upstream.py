"""One gRPC channel per backend address; unary calls of raw bytes with deadline and metadata."""

from __future__ import annotations

import ssl

import grpc
from grpc import aio

from proxy.errors import ConfigError
from proxy.settings import BackendSettings

# A client could send calls to endless made-up method names; keep a bounded cache of stubs.
_MAX_CACHED_METHODS = 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options shared by the proxy's listener and its backend channels."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class Upstream:
    """A backend's channel; hands out byte-in, byte-out callables per method path."""

    def __init__(self, backend: BackendSettings, *, max_message_bytes: int) -> None:
        self.backend = backend
        self.host, self.port = _split_address(backend.address)
        options = channel_options(max_message_bytes)
        if backend.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read_ca(backend))
            self.channel = aio.secure_channel(backend.address, credentials, options=options)
        else:
            self.channel = aio.insecure_channel(backend.address, options=options)
        self._methods: dict[str, aio.UnaryUnaryMultiCallable] = {}

    def method(self, path: str) -> aio.UnaryUnaryMultiCallable:
        """The callable for ``/package.Service/Method``; no (de)serializer, so bytes pass through."""
        callable_ = self._methods.get(path)
        if callable_ is None:
            callable_ = self.channel.unary_unary(path)
            if len(self._methods) < _MAX_CACHED_METHODS:
                self._methods[path] = callable_
        return callable_

    async def close(self) -> None:
        await self.channel.close()


# Wordings gRPC core uses for statuses it makes itself when a backend cannot be reached.
_CHANNEL_MADE_UNAVAILABLE = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "connection refused",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
    "endpoint closing",
    "stream removed",
    "keepalive watchdog",
    "dns resolution failed",
)


def came_from_backend(error: grpc.aio.AioRpcError) -> bool:
    """True when the backend sent this status, False when the proxy's channel made it
    (connection refused or reset, deadline passed, cancelled, message over the size limit).

    gRPC Python exposes no flag for where a status came from, so this reads the wording
    gRPC core uses for the statuses it makes; a backend's own statuses pass through as sent.
    """
    code = error.code()
    details = (error.details() or "").lower()
    if code is grpc.StatusCode.UNAVAILABLE:
        return not any(marker in details for marker in _CHANNEL_MADE_UNAVAILABLE)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return details != "deadline exceeded"
    if code is grpc.StatusCode.CANCELLED:
        return False
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "message larger than max" not in details
    return True


def _read_ca(backend: BackendSettings) -> bytes | None:
    if not backend.tls_ca_file:
        return None  # gRPC's default roots
    try:
        with open(backend.tls_ca_file, "rb") as ca:
            data = ca.read()
    except OSError as exc:
        raise ConfigError(
            f"backend {backend.name!r}: cannot read CA file {backend.tls_ca_file}: {exc.strerror or exc}"
        ) from None
    try:
        ssl.create_default_context().load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"backend {backend.name!r}: {backend.tls_ca_file} holds no PEM CA certificate ({exc})"
        ) from None
    return data


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
