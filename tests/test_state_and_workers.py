"""State that is not lost, SIGHUP reloads and ``--workers``: real proxy processes on loopback.

Each test runs ``python -m proxy serve`` as a user does, with a config file, a state file
and an admin port of its own, between real backends in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.state import StateFile
from tests.admin_client import (
    free_port,
    list_backends,
    listing,
    own_channel,
    promote,
    register_shadow,
)
from tests.backends import Behaviour, ProbeBackend, wait_for

PREDICT = "/predict.v1.PredictionService/Predict"
PROXY = [sys.executable, "-m", "proxy", "serve"]

StartBackend = Callable[..., Coroutine[Any, Any, ProbeBackend]]


def _tag(name: str) -> Callable[[bytes], bytes]:
    return lambda body: name.encode() + b":" + body


def _environment() -> dict[str, str]:
    """This environment without OpenTelemetry's variables, so the flags alone decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_config(path: Path, production: str, shadows: Sequence[str] = ()) -> Path:
    """A config file as a user writes it: production and shadows as NAME=HOST:PORT specs."""
    lines = [
        "listen: 127.0.0.1:0",
        "exporters: none",
        "shutdown_grace: 2s",
        "shadow_grace: 1s",
        f"production: {production}",
        "shadows:" if shadows else "shadows: []",
        *(f"  - {spec}" for spec in shadows),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Proxy:
    """One ``serve`` process: its address, admin address and log."""

    process: asyncio.subprocess.Process
    address: str
    admin: str
    log_path: Path
    workers: list[int] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    async def wait_for_log(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)


Serve = Callable[..., Coroutine[Any, Any, Proxy]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start ``python -m proxy serve ARGS`` on a free admin port of its own and wait for its
    ready file; the log goes to ``tmp_path/LOG``. Whatever still runs is killed at the end."""
    started: list[Proxy] = []

    async def start(*args: str, log: str = "proxy.log", timeout: float = 15.0) -> Proxy:
        ready = tmp_path / "ready"
        ready.unlink(missing_ok=True)
        admin = f"127.0.0.1:{free_port()}"
        if "--admin-listen" in args:
            admin = args[args.index("--admin-listen") + 1]
        else:
            args = (*args, "--admin-listen", admin)
        log_path = tmp_path / log
        with log_path.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *PROXY, *args, "--ready-file", str(ready),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=tmp_path, env=_environment(),
            )  # fmt: skip
        proxy = Proxy(process, "", admin, log_path)
        started.append(proxy)
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            if process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"proxy did not start:\n{proxy.log()}")
            await asyncio.sleep(0.02)
        proxy.address = ready.read_text().strip()
        proxy.workers = _children(process.pid)
        return proxy

    yield start
    for proxy in started:
        if proxy.process.returncode is None:
            proxy.process.kill()
            await proxy.process.wait()
        for pid in proxy.workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


async def _call_on_own_connection(address: str, request_id: str) -> bytes:
    """One call on a connection of its own: with workers, any worker may answer it."""
    async with own_channel(address) as channel:
        reply: bytes = await channel.unary_unary(PREDICT)(
            request_id.encode(), metadata=(("x-request-id", request_id),), timeout=5
        )
    return reply


def _request_ids(backend: ProbeBackend) -> set[str]:
    return {str(r.metadata.get("x-request-id")) for r in backend.received}


def _logged_backend(log: str, role: str, address: str, source: str) -> re.Match[str] | None:
    """The start-up line naming a backend, its role and where it came from."""
    pattern = rf"{role}: \w+={re.escape(address)}\S* \(max \d+ in flight; from {source}\)"
    return re.search(pattern, log)


# ------------------------------------------------------------------------------ persistence


async def test_admin_changes_survive_a_restart_and_the_log_names_each_backends_source(
    backends: StartBackend, serve: Serve, tmp_path: Path
) -> None:
    production = await backends(Behaviour(reply=_tag("prod")))
    candidate = await backends(Behaviour(reply=_tag("cand")))
    challenger = await backends(Behaviour(reply=_tag("challenger")))
    config = _write_config(
        tmp_path / "proxy.yaml", f"prod={production.address}", [f"cand={candidate.address}"]
    )
    state = tmp_path / "state.json"
    command = (
        "--config", str(config), "--state-file", str(state),
        "--admin-listen", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    first = await serve(*command)

    await register_shadow(first.admin, "challenger", challenger.address)
    await promote(first.admin, "cand")
    expected = [
        ("cand", "production", candidate.address, 1.0, "config"),
        ("prod", "shadow", production.address, 1.0, "config"),
        ("challenger", "shadow", challenger.address, 1.0, "admin"),
    ]
    assert await listing(first.admin) == expected
    assert await first.stop() == 0, first.log()

    recorded = json.loads(state.read_text(encoding="utf-8"))
    assert [change["op"] for change in recorded["changes"]] == ["register", "promote"]

    second = await serve(*command, log="restart.log")

    assert await listing(second.admin) == expected
    assert await _call_on_own_connection(second.address, "after-restart") == b"cand:after-restart"
    await wait_for(lambda: "after-restart" in _request_ids(challenger) & _request_ids(production))
    log = second.log()
    assert _logged_backend(log, "production", candidate.address, "config"), log
    assert _logged_backend(log, "shadow", production.address, "config"), log
    assert _logged_backend(log, "shadow", challenger.address, "admin"), log
    assert "no longer applies" not in log
    assert await second.stop() == 0, second.log()


async def test_a_recorded_change_whose_backend_left_the_config_is_skipped_with_a_warning(
    backends: StartBackend, serve: Serve, tmp_path: Path
) -> None:
    production = await backends(Behaviour(reply=_tag("prod")))
    challenger = await backends()
    # Recorded while the config still had a shadow "cand"; the config no longer has it.
    state = StateFile(tmp_path / "state.json")
    with state.locked():
        state.append(
            {
                "op": "register",
                "backend": {"name": "challenger", "address": challenger.address, "role": "shadow"},
            }
        )
        state.append({"op": "promote", "name": "cand", "remove_old": False})
    config = _write_config(tmp_path / "proxy.yaml", f"prod={production.address}")

    proxy = await serve("--config", str(config), "--state-file", str(state.path))

    assert await listing(proxy.admin) == [
        ("prod", "production", production.address, 1.0, "config"),
        ("challenger", "shadow", challenger.address, 1.0, "admin"),
    ]
    assert await _call_on_own_connection(proxy.address, "r1") == b"prod:r1"
    await wait_for(lambda: "r1" in _request_ids(challenger))
    warnings = [line for line in proxy.log().splitlines() if "no longer applies" in line]
    assert len(warnings) == 1, proxy.log()
    assert " WARNING " in warnings[0] and "promote cand" in warnings[0], warnings
    assert await proxy.stop() == 0, proxy.log()


# ------------------------------------------------------------------------------ SIGHUP


async def _steady_calls(
    address: str, stop: asyncio.Event, started: dict[str, float], failed: list[str]
) -> None:
    """Call every few milliseconds until ``stop``; note each call's start and any failure."""
    async with own_channel(address) as channel:
        method = channel.unary_unary(PREDICT)
        while not stop.is_set():
            request_id = f"steady-{len(started)}"
            started[request_id] = time.monotonic()
            try:
                await method(
                    request_id.encode(), metadata=(("x-request-id", request_id),), timeout=5
                )
            except grpc.RpcError as exc:
                failed.append(f"{request_id}: {exc.code().name} {exc.details()}")
            await asyncio.sleep(0.003)


async def test_sighup_reloads_an_edited_config_without_failing_a_call(
    backends: StartBackend, serve: Serve, tmp_path: Path
) -> None:
    production = await backends(Behaviour(delay=0.002, reply=_tag("prod")))
    candidate = await backends()
    added = await backends()
    config = tmp_path / "proxy.yaml"
    _write_config(config, f"prod={production.address}", [f"cand={candidate.address},sample=0"])
    proxy = await serve("--config", str(config), "--state-file", str(tmp_path / "state.json"))
    stop = asyncio.Event()
    started: dict[str, float] = {}
    failed: list[str] = []
    clients = [
        asyncio.create_task(_steady_calls(proxy.address, stop, started, failed)) for _ in range(4)
    ]
    try:
        await wait_for(lambda: len(production.received) >= 40)
        assert candidate.received == []  # sampled out at rate 0

        _write_config(
            config,
            f"prod={production.address}",
            [f"cand={candidate.address},sample=1", f"added={added.address}"],
        )
        proxy.process.send_signal(signal.SIGHUP)
        sent_signal = time.monotonic()
        await wait_for(lambda: bool(added.received), timeout=1.0)
        await proxy.wait_for_log("SIGHUP: config reloaded")
        reloaded = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    assert failed == [], failed
    assert len(started) > 100, "the stream of calls ran through the reload"
    after = {rid for rid, at in started.items() if at > reloaded}
    assert len(after) > 20
    # Every call started after the reload reaches both shadows: the new one, and the old one
    # at its new sample rate.
    await wait_for(lambda: after <= _request_ids(added) & _request_ids(candidate))
    first_copy = min(r.at for r in added.received)
    assert first_copy - sent_signal < 1.0
    assert await listing(proxy.admin) == [
        ("prod", "production", production.address, 1.0, "config"),
        ("cand", "shadow", candidate.address, 1.0, "config"),
        ("added", "shadow", added.address, 1.0, "config"),
    ]
    assert await proxy.stop() == 0, proxy.log()


# A config the reload cannot use: one the loader rejects, and one it reads but whose new
# backend's channel cannot be made (an unreadable CA file). None: append that backend.
@pytest.mark.parametrize(
    ("edit", "logged"),
    [
        pytest.param("production: [unclosed\n", "SIGHUP: config not reloaded", id="not-yaml"),
        pytest.param(
            None,
            "SIGHUP: config not applied",
            id="unreadable-ca",
        ),
    ],
)
async def test_a_config_edit_the_reload_cannot_use_is_logged_and_the_old_registry_stays(
    edit: str | None, logged: str, backends: StartBackend, serve: Serve, tmp_path: Path
) -> None:
    production = await backends(Behaviour(reply=_tag("prod")))
    candidate = await backends()
    challenger = await backends()
    config = _write_config(
        tmp_path / "proxy.yaml", f"prod={production.address}", [f"cand={candidate.address}"]
    )
    proxy = await serve("--config", str(config), "--state-file", str(tmp_path / "state.json"))
    before = await listing(proxy.admin)

    if edit is None:
        edit = config.read_text() + f"  - other={challenger.address},ca={tmp_path / 'no-ca.pem'}\n"
    config.write_text(edit, encoding="utf-8")
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_for_log(logged)

    assert proxy.process.returncode is None
    assert await listing(proxy.admin) == before
    assert await _call_on_own_connection(proxy.address, "r1") == b"prod:r1"
    await wait_for(lambda: "r1" in _request_ids(candidate))
    # The old registry stays in force for changes too: a registration still applies.
    await register_shadow(proxy.admin, "challenger", challenger.address)
    assert await _call_on_own_connection(proxy.address, "r2") == b"prod:r2"
    await wait_for(lambda: "r2" in _request_ids(challenger))
    assert await proxy.stop() == 0, proxy.log()


# ------------------------------------------------------------------------------ workers


def _sent_per_worker(log: str, role: str, name: str) -> list[int]:
    """Each worker's closing count of calls to one backend."""
    return [int(n) for n in re.findall(rf"{role} {name}: sent=(\d+) ", log)]


async def test_workers_share_one_port_and_every_change_reaches_all_of_them_within_a_second(
    backends: StartBackend, serve: Serve, tmp_path: Path
) -> None:
    production = await backends(Behaviour(reply=_tag("prod")))
    candidate = await backends(Behaviour(reply=_tag("cand")))
    config = _write_config(tmp_path / "proxy.yaml", f"prod={production.address}")
    proxy = await serve(
        "--config", str(config), "--state-file", str(tmp_path / "state.json"), "--workers", "2"
    )
    assert len(proxy.workers) == 2, proxy.log()
    assert proxy.log().count("admin service on ") == 2

    # A registration through the admin port (one worker) is in force in both within 1 s.
    await register_shadow(proxy.admin, "cand", candidate.address)
    await asyncio.sleep(1.0)
    registered = [f"registered-{i}" for i in range(40)]
    replies = await asyncio.gather(*(_call_on_own_connection(proxy.address, r) for r in registered))
    assert replies == [b"prod:" + r.encode() for r in registered]
    await wait_for(lambda: set(registered) <= _request_ids(candidate))

    # So is a promotion.
    await promote(proxy.admin, "cand")
    await asyncio.sleep(1.0)
    promoted = [f"promoted-{i}" for i in range(40)]
    replies = await asyncio.gather(*(_call_on_own_connection(proxy.address, r) for r in promoted))
    assert replies == [b"cand:" + r.encode() for r in promoted]
    await wait_for(lambda: set(promoted) <= _request_ids(production))

    # Admin calls and health answer the same whichever worker answers.
    expected = [
        ("cand", "production", candidate.address, 1.0, "admin"),
        ("prod", "shadow", production.address, 1.0, "config"),
    ]
    production_calls_seen = set()
    for _ in range(16):
        statuses = await list_backends(proxy.admin)
        production_calls_seen.add(statuses[0].calls)
        assert await listing(proxy.admin) == expected
        async with own_channel(proxy.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    assert await proxy.stop(timeout=15) == 0, proxy.log()
    assert [pid for pid in proxy.workers if _running(pid)] == []
    log = proxy.log()
    # Both workers served calls, and each had the shadow, then the promotion.
    per_worker = _sent_per_worker(log, "production", "cand")
    assert len(per_worker) == 2 and all(per_worker), log
    assert sum(per_worker) == len(registered) + len(promoted)
    assert sum(_sent_per_worker(log, "shadow", "prod")) == len(registered) + len(promoted)
    # Each worker answered some of the admin calls: each saw only its own counts.
    assert production_calls_seen == set(per_worker)
    assert "Traceback" not in log
