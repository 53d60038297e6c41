"""TLS and mutual TLS with certificates made at test time: the proxy's listener, its admin
listener (and its token), the backend channels; and the start-up refusals of unsafe or
broken settings, from ``load_settings`` and from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from proxy.errors import ConfigError
from proxy.gen import admin_pb2, admin_pb2_grpc
from proxy.server import ProxyServer
from proxy.settings import load_settings
from tests.backends import ProbeBackend, wait_for
from tests.certs import Certificates, issue_certificates
from tests.conftest import proxy_settings

METHOD = "/m.S/Predict"
TOKEN = "s3cret"
ERROR_PREFIX = "shadow-proxy: error: "

OpenChannel = Callable[..., aio.Channel]
StartTlsBackend = Callable[..., Coroutine[Any, Any, "TlsBackend"]]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return issue_certificates(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certificates, **overrides: Any) -> dict[str, Any]:
    """The proxy's settings for a TLS listener (add ``tls_client_ca`` for mTLS)."""
    return {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key), **overrides}


def _credentials(
    root: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """A client that trusts ``root``, presenting ``cert`` when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


@dataclass
class TlsBackend(ProbeBackend):
    """A :class:`ProbeBackend` that speaks TLS with the test server certificate."""

    certs: Certificates | None = None

    async def start(self, port: int = 0) -> TlsBackend:
        assert self.certs is not None
        server = aio.server()
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        probe = self

        class _Any(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                method: str = details.method  # type: ignore[attr-defined]

                async def handle(body: bytes, context: aio.ServicerContext) -> bytes:
                    return await probe._handle(method, body, context)

                return grpc.unary_unary_rpc_method_handler(handle)

        server.add_generic_rpc_handlers((_Any(),))
        credentials = grpc.ssl_server_credentials(
            [(self.certs.server_key.read_bytes(), self.certs.server_cert.read_bytes())]
        )
        self.port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
        await server.start()
        self._server = server
        return self


@pytest.fixture
async def tls_backends(certs: Certificates) -> AsyncIterator[StartTlsBackend]:
    started: list[TlsBackend] = []

    async def start() -> TlsBackend:
        backend = await TlsBackend(certs=certs).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


@pytest.fixture
async def open_channel() -> AsyncIterator[OpenChannel]:
    """``open_channel(address)`` is plaintext; ``open_channel(address, credentials)`` is TLS."""
    channels: list[aio.Channel] = []

    def open_(address: str, credentials: grpc.ChannelCredentials | None = None) -> aio.Channel:
        channel = (
            aio.insecure_channel(address)
            if credentials is None
            else aio.secure_channel(address, credentials)
        )
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        await channel.close()


async def _refused(channel: aio.Channel) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await channel.unary_unary(METHOD)(b"x", timeout=5)
    return info.value


# ------------------------------------------------------------------- the proxy's listener


async def test_tls_listener_serves_a_client_that_trusts_the_ca(
    certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", **_tls(certs))
    channel = open_channel(proxy.address, _credentials(certs.ca))
    assert await channel.unary_unary(METHOD)(b"over tls", timeout=5) == b"over tls"
    assert [r.body for r in production.received] == [b"over tls"]


@pytest.mark.parametrize("client", ["plaintext", "trusts only the other CA"])
async def test_tls_listener_refuses_plaintext_and_untrusted_clients(
    client, certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", **_tls(certs))
    credentials = None if client == "plaintext" else _credentials(certs.other_ca)
    error = await _refused(open_channel(proxy.address, credentials))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    if credentials is not None:
        assert "handshake failed" in error.details().lower()
    assert production.received == []


async def test_mtls_serves_a_client_with_a_certificate_the_ca_signed(
    certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}", **_tls(certs, tls_client_ca=str(certs.ca))
    )
    channel = open_channel(
        proxy.address, _credentials(certs.ca, certs.client_cert, certs.client_key)
    )
    assert await channel.unary_unary(METHOD)(b"mutual", timeout=5) == b"mutual"


@pytest.mark.parametrize("client", ["no certificate", "certificate of the other CA"])
async def test_mtls_refuses_a_client_without_a_certificate_the_ca_signed(
    client, certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}", **_tls(certs, tls_client_ca=str(certs.ca))
    )
    credentials = (
        _credentials(certs.ca)
        if client == "no certificate"
        else _credentials(certs.ca, certs.other_client_cert, certs.other_client_key)
    )
    error = await _refused(open_channel(proxy.address, credentials))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert production.received == []


# ------------------------------------------------------------------- backend channels


async def test_backend_channels_over_tls(certs, tls_backends, make_proxy, open_channel):
    production, shadow = await tls_backends(), await tls_backends()
    tls = f"tls=true,ca={certs.ca}"
    proxy, _ = await make_proxy(
        f"prod={production.address},{tls}", [f"cand={shadow.address},{tls}"]
    )
    channel = open_channel(proxy.address)
    assert await channel.unary_unary(METHOD)(b"to both", timeout=5) == b"to both"
    await wait_for(lambda: len(shadow.received) == 1)
    assert [r.body for r in production.received] == [b"to both"]
    assert shadow.received[0].body == b"to both"
    assert {b.name: b.health for b in proxy.registry.backends()} == {
        "prod": "serving",
        "cand": "serving",
    }


@pytest.mark.parametrize("trust", ["ca=OTHER", "tls=true"], ids=["other CA", "system roots"])
async def test_production_with_an_untrusted_certificate_is_unavailable_naming_it(
    trust, certs, tls_backends, make_proxy, open_channel
):
    production = await tls_backends()
    option = f"ca={certs.other_ca}" if trust == "ca=OTHER" else trust
    proxy, _ = await make_proxy(f"prod={production.address},{option}")
    error = await _refused(open_channel(proxy.address))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "production backend 'prod'" in error.details()
    assert production.address in error.details()
    assert "handshake failed" in error.details().lower()
    assert production.received == []


async def test_backend_ca_file_that_is_not_pem_is_refused_at_start(
    tmp_path, certs, tls_backends, make_proxy
):
    production = await tls_backends()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="prod"):
        await make_proxy(f"prod={production.address},ca={junk}")


# ------------------------------------------------------------------- the admin listener


async def _list_backends(
    channel: aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> admin_pb2.ListBackendsResponse:
    stub = admin_pb2_grpc.ProxyAdminStub(channel)
    return await stub.ListBackends(admin_pb2.ListBackendsRequest(), metadata=metadata, timeout=5)


def _admin_address(proxy: ProxyServer) -> str:
    return f"127.0.0.1:{proxy.admin_port}"


async def test_admin_listener_uses_tls_and_accepts_the_token(
    certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        admin_listen="127.0.0.1:0",
        admin_token=TOKEN,
        **_tls(certs),
    )
    channel = open_channel(_admin_address(proxy), _credentials(certs.ca))
    reply = await _list_backends(channel, (("authorization", f"Bearer {TOKEN}"),))
    assert [b.spec.name for b in reply.backends] == ["prod"]

    with pytest.raises(aio.AioRpcError) as info:
        await _list_backends(
            open_channel(_admin_address(proxy)), (("authorization", f"Bearer {TOKEN}"),)
        )
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
    ids=["missing", "wrong", "no Bearer scheme"],
)
async def test_admin_call_without_the_right_token_is_unauthenticated(
    metadata, certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        admin_listen="127.0.0.1:0",
        admin_token=TOKEN,
        **_tls(certs),
    )
    channel = open_channel(_admin_address(proxy), _credentials(certs.ca))
    with pytest.raises(aio.AioRpcError) as info:
        await _list_backends(channel, metadata)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in info.value.details()


async def test_admin_listener_with_mtls_needs_the_client_certificate_too(
    certs, backends, make_proxy, open_channel
):
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        admin_listen="127.0.0.1:0",
        admin_token=TOKEN,
        **_tls(certs, tls_client_ca=str(certs.ca)),
    )
    token = (("authorization", f"Bearer {TOKEN}"),)
    without = open_channel(_admin_address(proxy), _credentials(certs.ca))
    with pytest.raises(aio.AioRpcError) as info:
        await _list_backends(without, token)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    with_cert = open_channel(
        _admin_address(proxy), _credentials(certs.ca, certs.client_cert, certs.client_key)
    )
    assert [b.spec.name for b in (await _list_backends(with_cert, token)).backends] == ["prod"]


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:50052", "192.0.2.7:50052"])
def test_non_loopback_admin_without_a_token_is_refused_at_start(address):
    with pytest.raises(ConfigError) as info:
        proxy_settings("prod=127.0.0.1:1", admin_listen=address)
    message = str(info.value)
    assert "\n" not in message
    assert address in message
    assert "--admin-token" in message
    assert "SHADOW_PROXY_ADMIN_TOKEN" in message

    assert proxy_settings("prod=127.0.0.1:1", admin_listen=address, admin_token=TOKEN)
    from_env = load_settings(
        overrides={"production": "prod=127.0.0.1:1", "admin_listen": address},
        environ={"SHADOW_PROXY_ADMIN_TOKEN": TOKEN},
    )
    assert from_env.admin_token == TOKEN


# ------------------------------------------------------------------- the command line


def _serve(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m proxy serve ...`` with none of the environment's OTEL_* or admin token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k != "SHADOW_PROXY_ADMIN_TOKEN"
    }
    command = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--production",
        "prod=127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--exporter",
        "none",
        "--state-file",
        "none",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=20, cwd=cwd, env=env, check=False
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX)
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_refuses_a_non_loopback_admin_address_without_a_token(tmp_path):
    result = _serve(["--admin-listen", "0.0.0.0:0"], tmp_path)
    _assert_one_line_error(result, "0.0.0.0:0", "not a loopback address", "--admin-token")


CASES = {
    "cert without key": (["--tls-cert", "{server_cert}"], "--tls-cert and --tls-key go together"),
    "key without cert": (["--tls-key", "{server_key}"], "--tls-cert and --tls-key go together"),
    "missing cert file": (
        ["--tls-cert", "{tmp}/nope.pem", "--tls-key", "{server_key}"],
        "--tls-cert: no such file {tmp}/nope.pem",
    ),
    "missing key file": (
        ["--tls-cert", "{server_cert}", "--tls-key", "{tmp}/nope.key"],
        "--tls-key: no such file {tmp}/nope.key",
    ),
    "missing client CA file": (
        [
            "--tls-cert",
            "{server_cert}",
            "--tls-key",
            "{server_key}",
            "--tls-client-ca",
            "{tmp}/nope-ca.pem",
        ],
        "--tls-client-ca: no such file {tmp}/nope-ca.pem",
    ),
    "client CA without cert": (
        ["--tls-client-ca", "{ca}"],
        "--tls-client-ca needs --tls-cert and --tls-key",
    ),
}


def _fill(text: str, certs: Certificates, tmp: Path) -> str:
    return text.format(
        server_cert=certs.server_cert, server_key=certs.server_key, ca=certs.ca, tmp=tmp
    )


@pytest.mark.parametrize(("args", "message"), CASES.values(), ids=CASES.keys())
def test_bad_tls_settings_are_refused_by_load_settings(args, message, certs, tmp_path):
    flags = [_fill(a, certs, tmp_path) for a in args]
    overrides = {
        flag.removeprefix("--").replace("-", "_"): value
        for flag, value in zip(flags[::2], flags[1::2], strict=True)
    }
    with pytest.raises(ConfigError) as info:
        proxy_settings("prod=127.0.0.1:1", **overrides)
    assert _fill(message, certs, tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [CASES["cert without key"], CASES["missing cert file"], CASES["client CA without cert"]],
    ids=["cert without key", "missing cert file", "client CA without cert"],
)
def test_bad_tls_flags_exit_2_with_one_line(args, message, certs, tmp_path):
    result = _serve([_fill(a, certs, tmp_path) for a in args], tmp_path)
    _assert_one_line_error(result, _fill(message, certs, tmp_path))


@pytest.mark.parametrize("broken", ["cert not PEM", "key of another certificate"])
def test_unusable_certificate_or_key_is_named_in_one_line(broken, certs, tmp_path):
    cert, key = certs.server_cert, certs.server_key
    if broken == "cert not PEM":
        cert = tmp_path / "junk.pem"
        cert.write_text("not a certificate\n")
    else:
        key = certs.client_key
    result = _serve(["--tls-cert", str(cert), "--tls-key", str(key)], tmp_path)
    _assert_one_line_error(result, "--tls-")
