"""``shadow-proxy backends`` and ``model-server --register-with`` as a user runs them: real
proxies with their admin service on port 0, real backends, the commands as subprocesses."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from model_servers import ModelServerOptions, heldout, start_model_server
from proxy.admin_cli import ADMIN_ENV, TOKEN_ENV
from proxy.cli import build_parser
from proxy.gen import admin_pb2, admin_pb2_grpc, predict_pb2
from proxy.server import ProxyServer
from proxy.settings import BackendSettings
from proxy.tensors import to_tensor
from tests.backends import ProbeBackend, wait_for
from tests.conftest import ProxyFactory

BACKENDS_CLI = [sys.executable, "-m", "proxy", "backends"]
MODEL_SERVER = [sys.executable, "-m", "model_servers"]
ERROR_PREFIX = "shadow-proxy backends: error: "
ECHO = "/test.Echo/Call"  # not Predict: the proxy compares the replies as bytes
PREDICT = "/predict.v1.PredictionService/Predict"
COLUMNS = [
    "NAME",
    "ROLE",
    "ADDRESS",
    "HEALTH",
    "SAMPLE",
    "TIMEOUT",
    "IN FLIGHT",
    "CALLS",
    "ERRORS",
    "AGREEMENT",
    "DROPPED",
    "SOURCE",
]

StartBackend = Callable[..., Coroutine[Any, Any, ProbeBackend]]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def _environment(**extra: str) -> dict[str, str]:
    """This environment without the admin's and OpenTelemetry's variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", ADMIN_ENV)) and k != TOKEN_ENV
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def backends_cli(*args: str, env: dict[str, str] | None = None) -> Run:
    """Run ``python -m proxy backends ARGS`` without blocking the proxy's event loop."""
    process = await asyncio.create_subprocess_exec(
        *BACKENDS_CLI,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or _environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def admin_of(proxy: ProxyServer) -> str:
    return f"127.0.0.1:{proxy.admin_port}"


async def listing(admin: str, token: str | None = None) -> list[tuple[Any, ...]]:
    """The registry as ListBackends reports it, settings only (no counters, no health)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with aio.insecure_channel(admin) as channel:
        reply = await admin_pb2_grpc.ProxyAdminStub(channel).ListBackends(
            admin_pb2.ListBackendsRequest(), timeout=5, metadata=metadata
        )
    return [
        (
            b.spec.name,
            b.spec.address,
            b.spec.role,
            b.spec.sample_rate,
            b.spec.timeout_seconds,
            b.spec.max_in_flight,
            b.source,
        )
        for b in reply.backends
    ]


def table_rows(text: str) -> list[dict[str, str]]:
    """Parse the table: columns are separated by two or more spaces."""
    lines = text.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == COLUMNS, lines[0]
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(COLUMNS), line
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def assert_refused(run: Run, status: str) -> None:
    """Exit 1, nothing on stdout, and one line on stderr naming the status."""
    assert run.code == 1, run
    assert run.stdout == "", run
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"{ERROR_PREFIX}{status}: "), run.stderr


async def _send(proxy: ProxyServer, calls: int, method: str = ECHO, body: bytes = b"x") -> None:
    async with aio.insecure_channel(proxy.address) as channel:
        call = channel.unary_unary(method)
        for i in range(calls):
            await call(body, metadata=(("x-request-id", f"req-{i}"),), timeout=5)


# ------------------------------------------------------------------------------ the CLI


async def test_add_list_update_promote_and_remove_through_the_cli(
    backends: StartBackend, make_proxy: ProxyFactory
) -> None:
    production, candidate, twin = await backends(), await backends(), await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", admin_listen="127.0.0.1:0")
    admin = admin_of(proxy)

    added = await backends_cli(
        "add", "cand", candidate.address, "--sample", "0.5", "--timeout", "2s",
        "--max-in-flight", "8", "--admin", admin,
    )  # fmt: skip
    assert added.code == 0, added
    assert added.stdout.strip() == (
        f"added shadow 'cand' at {candidate.address} (sample 0.5, timeout 2s, max 8 in flight)"
    )
    backend = proxy.registry.get("cand")
    assert backend.settings == BackendSettings(
        "cand", candidate.address, "shadow", sample_rate=0.5, timeout=2.0, max_in_flight=8
    )
    assert backend.settings.source == "admin"

    # The connection options go before the action too; --json gives the new status.
    reference = await backends_cli(
        "--admin", admin, "--json", "add", "twin", twin.address, "--role", "reference"
    )
    assert reference.code == 0, reference
    twin_status = json.loads(reference.stdout)
    assert twin_status["name"] == "twin"
    assert twin_status["role"] == "reference"
    assert twin_status["address"] == twin.address
    assert twin_status["sample_rate"] == 1.0
    assert twin_status["timeout_seconds"] == 5.0
    assert twin_status["source"] == "admin"

    updated = await backends_cli("update", "cand", "--sample", "1", "--admin", admin)
    assert updated.code == 0, updated
    assert "sample 1, timeout 2s" in updated.stdout
    assert proxy.registry.get("cand").settings.sample_rate == 1.0
    assert proxy.registry.get("cand").settings.timeout == 2.0  # unset fields stay

    await _send(proxy, 6)
    await wait_for(lambda: all(proxy.registry.get(n).stats.compared >= 6 for n in ("cand", "twin")))

    table = await backends_cli("list", "--admin", admin)
    assert table.code == 0, table
    rows = table_rows(table.stdout)
    assert [(r["NAME"], r["ROLE"]) for r in rows] == [
        ("prod", "production"),
        ("cand", "shadow"),
        ("twin", "reference"),
    ]
    cand = rows[1]
    assert cand["ADDRESS"] == candidate.address
    assert cand["HEALTH"] in ("serving", "unknown")
    assert (cand["SAMPLE"], cand["TIMEOUT"], cand["IN FLIGHT"]) == ("1", "2s", "0/8")
    assert (cand["CALLS"], cand["ERRORS"], cand["DROPPED"]) == ("6", "0", "0")
    assert cand["AGREEMENT"] == "100.0% (6/6)"
    assert cand["SOURCE"] == "admin"
    assert rows[0]["SOURCE"] == "flags"
    assert rows[0]["CALLS"] == "6"
    assert rows[0]["AGREEMENT"] == "-"  # production is what the others are compared with

    as_json = await backends_cli("list", "--json", "--admin", admin)
    assert as_json.code == 0, as_json
    listed = json.loads(as_json.stdout)
    assert [b["name"] for b in listed] == ["prod", "cand", "twin"]
    assert listed[1] | {"health": "?", "health_detail": "?"} == {
        "name": "cand",
        "role": "shadow",
        "address": candidate.address,
        "health": "?",
        "health_detail": "?",
        "sample_rate": 1.0,
        "timeout_seconds": 2.0,
        "max_in_flight": 8,
        "tls": False,
        "tls_ca_file": None,
        "in_flight": 0,
        "calls": 6,
        "errors": 0,
        "compared": 6,
        "agreed": 6,
        "agreement": 1.0,
        "dropped": 0,
        "sampled_out": 0,
        "unhealthy_skipped": 0,
        "source": "admin",
    }

    promoted = await backends_cli("promote", "cand", "--admin", admin, "--json")
    assert promoted.code == 0, promoted
    outcome = json.loads(promoted.stdout)
    assert outcome["production"]["name"] == "cand"
    assert outcome["production"]["role"] == "production"
    assert outcome["previous"]["name"] == "prod"
    assert outcome["previous"]["role"] == "shadow"
    assert proxy.registry.snapshot.production.name == "cand"
    assert [b.name for b in proxy.registry.snapshot.copies] == ["prod", "twin"]

    removed = await backends_cli("remove", "prod", "--admin", admin)
    assert removed.code == 0, removed
    assert removed.stdout.strip() == "removed 'prod'"
    assert [(n, r) for n, _, r, *_ in await listing(admin)] == [
        ("cand", admin_pb2.ROLE_PRODUCTION),
        ("twin", admin_pb2.ROLE_REFERENCE),
    ]

    # Calls now go to the promoted backend, and only to it as production.
    before = len(candidate.received), len(production.received)
    await _send(proxy, 3)
    assert len(candidate.received) == before[0] + 3
    assert len(production.received) == before[1]


async def test_promote_with_remove_old_prints_what_happened(
    backends: StartBackend, make_proxy: ProxyFactory
) -> None:
    production, candidate = await backends(), await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        [f"cand={candidate.address}"],
        admin_listen="127.0.0.1:0",
    )
    run = await backends_cli("promote", "cand", "--remove-old", "--admin", admin_of(proxy))
    assert run.code == 0, run
    assert run.stdout.strip() == "promoted 'cand' to production; the old production was removed"
    assert [b.name for b in proxy.registry.backends()] == ["cand"]


REFUSED = [
    # (what the user typed after "backends", the status)
    (["add", "new", "not-an-address"], "INVALID_ARGUMENT"),
    (["add", "new", "127.0.0.1:99999"], "INVALID_ARGUMENT"),
    (["add", "new", "[::1:50000"], "INVALID_ARGUMENT"),
    (["add", "bad name", "127.0.0.1:50000"], "INVALID_ARGUMENT"),
    (["add", "new", "127.0.0.1:50000", "--sample", "1.5"], "INVALID_ARGUMENT"),
    (["add", "new", "127.0.0.1:50000", "--max-in-flight", "0"], "INVALID_ARGUMENT"),
    (["add", "cand", "127.0.0.1:50000"], "ALREADY_EXISTS"),
    (["add", "prod", "127.0.0.1:50000"], "ALREADY_EXISTS"),
    (["remove", "ghost"], "NOT_FOUND"),
    (["update", "ghost", "--sample", "0.5"], "NOT_FOUND"),
    (["promote", "ghost"], "NOT_FOUND"),
    (["update", "cand"], "INVALID_ARGUMENT"),
    (["update", "cand", "--sample", "-0.1"], "INVALID_ARGUMENT"),
    (["update", "prod", "--sample", "0.5"], "FAILED_PRECONDITION"),
    (["promote", "prod"], "FAILED_PRECONDITION"),
    (["promote", "twin"], "FAILED_PRECONDITION"),
    (["remove", "prod"], "FAILED_PRECONDITION"),
]


async def test_refused_changes_name_the_status_exit_1_and_change_nothing(
    backends: StartBackend, make_proxy: ProxyFactory
) -> None:
    production, candidate, twin = await backends(), await backends(), await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        [f"cand={candidate.address},sample=0.5"],
        references=[f"twin={twin.address}"],
        admin_listen="127.0.0.1:0",
    )
    admin = admin_of(proxy)
    before = await listing(admin)
    assert [name for name, *_ in before] == ["prod", "cand", "twin"]

    # All at once, to keep the test short: each is refused, so none changes what the
    # others find, and any change would show in the listing after them.
    runs = await asyncio.gather(*(backends_cli(*args, "--admin", admin) for args, _ in REFUSED))
    for (_, status), run in zip(REFUSED, runs, strict=True):
        assert_refused(run, status)
    assert await listing(admin) == before
    assert proxy.registry.get("cand").settings.sample_rate == 0.5

    # The proxy's reasons reach the user.
    messages = {" ".join(args): run.stderr for (args, _), run in zip(REFUSED, runs, strict=True)}
    assert "'not-an-address'" in messages["add new not-an-address"]
    assert "already exists" in messages["add cand 127.0.0.1:50000"]
    assert "promote another backend first" in messages["remove prod"]
    assert "already the production backend" in messages["promote prod"]


async def test_usage_errors_exit_2_without_calling_the_proxy(
    backends: StartBackend, make_proxy: ProxyFactory
) -> None:
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", admin_listen="127.0.0.1:0")
    admin = admin_of(proxy)
    before = await listing(admin)
    runs = await asyncio.gather(
        backends_cli("add", "cand", "--admin", admin),  # no address
        backends_cli("add", "cand", "127.0.0.1:1", "--timeout", "soon", "--admin", admin),
        backends_cli("add", "cand", "127.0.0.1:1", "--role", "production", "--admin", admin),
        backends_cli("list", "--admin", admin, "--tls-ca", "/no/such/ca.pem"),
        backends_cli("list", "--admin", admin, "--tls-cert", "/no/such/cert.pem"),
        backends_cli("--admin", admin),  # no action
    )
    for run in runs:
        assert run.code == 2, run
        # argparse's own errors name the action: "shadow-proxy backends add: error: ...".
        assert re.match(r"shadow-proxy backends( \w+)?: error: ", run.stderr.splitlines()[-1]), run
        assert "Traceback" not in run.stderr
    assert "cannot read /no/such/ca.pem" in runs[3].stderr
    assert "--tls-cert and --tls-key go together" in runs[4].stderr
    assert await listing(admin) == before


async def test_an_admin_token_is_required_when_the_proxy_has_one(
    backends: StartBackend, make_proxy: ProxyFactory
) -> None:
    production, candidate = await backends(), await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}", admin_listen="127.0.0.1:0", admin_token="s3cret"
    )
    admin = admin_of(proxy)
    before = await listing(admin, token="s3cret")

    without, wrong, add_without = await asyncio.gather(
        backends_cli("list", "--admin", admin),
        backends_cli("list", "--admin", admin, "--token", "guess"),
        backends_cli("add", "cand", candidate.address, "--admin", admin),
    )
    for run in (without, wrong, add_without):
        assert_refused(run, "UNAUTHENTICATED")
    assert "Bearer" in without.stderr
    assert await listing(admin, token="s3cret") == before

    with_flag = await backends_cli("list", "--admin", admin, "--token", "s3cret")
    assert with_flag.code == 0, with_flag
    assert [r["NAME"] for r in table_rows(with_flag.stdout)] == ["prod"]

    # Both the address and the token can come from the environment.
    from_env = await backends_cli(
        "add",
        "cand",
        candidate.address,
        env=_environment(**{ADMIN_ENV: admin, TOKEN_ENV: "s3cret"}),
    )
    assert from_env.code == 0, from_env
    assert proxy.registry.get("cand").settings.address == candidate.address


async def test_an_unreachable_admin_service_exits_2_and_says_where_it_tried() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening
        by_flag, by_env = await asyncio.gather(
            backends_cli("list", "--admin", nobody),
            backends_cli("remove", "cand", env=_environment(**{ADMIN_ENV: nobody})),
        )
    for run in (by_flag, by_env):
        assert run.code == 2, run
        assert run.stdout == ""
        (line,) = run.stderr.splitlines()
        assert line.startswith(f"{ERROR_PREFIX}UNAVAILABLE: cannot reach the admin service at "), (
            line
        )
        assert nobody in line
    assert "(from --admin)" in by_flag.stderr
    assert f"(from ${ADMIN_ENV})" in by_env.stderr


async def test_an_address_that_is_not_an_admin_service_exits_2() -> None:
    running = await start_model_server(ModelServerOptions(listen="127.0.0.1:0"))
    try:
        run = await backends_cli("list", "--admin", running.address)
    finally:
        await running.stop()
    assert run.code == 2, run
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"{ERROR_PREFIX}UNIMPLEMENTED: {running.address} (from --admin) "), line
    assert "--admin-listen" in line


async def test_tls_and_mutual_tls_to_the_admin_service(
    backends: StartBackend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    from tests.certs import issue_certificates

    certs = issue_certificates(tmp_path)
    production = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        admin_listen="127.0.0.1:0",
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
    )
    admin = admin_of(proxy)
    client = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    accepted, no_client_cert, wrong_ca, plaintext = await asyncio.gather(
        backends_cli("list", "--admin", admin, "--tls-ca", str(certs.ca), *client),
        backends_cli("list", "--admin", admin, "--tls-ca", str(certs.ca)),
        backends_cli("list", "--admin", admin, "--tls-ca", str(certs.other_ca), *client),
        backends_cli("list", "--admin", admin, "--timeout", "2s"),
    )
    assert accepted.code == 0, accepted
    assert [r["NAME"] for r in table_rows(accepted.stdout)] == ["prod"]
    for run in (no_client_cert, wrong_ca, plaintext):
        assert run.code == 2, run
        # gRPC's core may log the failed handshake on a line of its own before ours.
        assert run.stderr.splitlines()[-1].startswith(f"{ERROR_PREFIX}UNAVAILABLE: "), run
        assert "Traceback" not in run.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr.splitlines()[-1]


def test_every_flag_has_help() -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    backends = commands.choices["backends"]
    (actions,) = (a for a in backends._actions if isinstance(a, argparse._SubParsersAction))
    assert set(actions.choices) == {"list", "add", "remove", "update", "promote"}
    for each in (backends, *actions.choices.values()):
        for action in each._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (each.prog, action.dest)


# ------------------------------------------------------------------------------ model servers


@pytest.fixture
async def model_server(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start ``python -m model_servers ARGS`` with its stderr in a file; killed at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> tuple[asyncio.subprocess.Process, Path]:
        log_path = tmp_path / f"model-server-{len(started)}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *MODEL_SERVER, *args,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_environment(),
            )  # fmt: skip
        started.append(process)
        return process, log_path

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _ready(
    process: asyncio.subprocess.Process, ready: Path, log: Path, timeout: float = 20
) -> str:
    deadline = time.monotonic() + timeout
    while not _text(ready):
        if process.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"model server not ready:\n{_text(log)}")
        await asyncio.sleep(0.05)
    return _text(ready)


def _text(path: Path) -> str:
    """The file's text, stripped; empty when there is no file yet."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _predict_request(rows: int) -> bytes:
    features = heldout()[0][:rows]
    return predict_pb2.PredictRequest(inputs=[to_tensor("features", features)]).SerializeToString()


async def test_a_model_server_registers_itself_as_a_shadow_and_leaves_on_sigterm(
    backends: StartBackend,
    make_proxy: ProxyFactory,
    model_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", admin_listen="127.0.0.1:0")
    ready = tmp_path / "ready"
    process, log = await model_server(
        "--listen", "127.0.0.1:0", "--model", "gboost-v2", "--register-with", admin_of(proxy),
        "--as", "cand", "--sample", "1", "--ready-file", str(ready),
    )  # fmt: skip
    address = await _ready(process, ready, log)

    # Ready means registered: the proxy knows it, at the port it actually bound.
    backend = proxy.registry.get("cand")
    assert backend.settings.role == "shadow"
    assert backend.settings.address == address
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0")
    assert backend.settings.source == "admin"

    # It gets a copy of every call sent through the proxy, and answers it.
    await _send(proxy, 4, PREDICT, _predict_request(2))
    await wait_for(lambda: backend.stats.ok >= 4, timeout=10)
    assert backend.stats.failed == 0

    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 15) == 0, _text(log)
    assert proxy.registry.find("cand") is None
    assert [name for name, *_ in await listing(admin_of(proxy))] == ["prod"]
    assert "deregistered 'cand'" in _text(log)


async def test_a_model_server_whose_registration_is_refused_stops_and_exits_1(
    backends: StartBackend,
    make_proxy: ProxyFactory,
    model_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    production = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", admin_listen="127.0.0.1:0")
    before = await listing(admin_of(proxy))
    ready = tmp_path / "ready"
    process, log = await model_server(
        "--listen", "127.0.0.1:0", "--register-with", admin_of(proxy), "--as", "prod",
        "--ready-file", str(ready),
    )  # fmt: skip
    assert await asyncio.wait_for(process.wait(), 20) == 1
    last = _text(log).strip().splitlines()[-1]
    assert last.startswith("model-server: error: cannot register as shadow 'prod'"), last
    assert "ALREADY_EXISTS" in last
    assert admin_of(proxy) in last
    assert not ready.exists()
    assert await listing(admin_of(proxy)) == before


def test_model_server_registration_flags_go_together() -> None:
    from model_servers.cli import build_parser as model_server_parser
    from model_servers.cli import main as model_server_main

    with pytest.raises(SystemExit) as exited:
        model_server_main(["--register-with", "127.0.0.1:50052"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        model_server_main(["--as", "cand"])
    assert exited.value.code == 2
    flags = {
        flag: action.help
        for action in model_server_parser()._actions
        for flag in action.option_strings
    }
    for flag in ("--register-with", "--as", "--role", "--sample", "--admin-token"):
        assert flags[flag], flag
