"""The ``shadow-proxy`` command as a user runs it: real processes, real ports, real signals."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from proxy.cli import build_parser
from tests.backends import Behaviour, ProbeBackend, wait_for
from tests.conftest import ProxyFactory
from tests.otlp_receiver import STATUS_ERROR, ReceivedSpan, spans_from_json_lines

CONSOLE_SCRIPT = Path(sys.executable).parent / "shadow-proxy"
LAUNCHERS = {
    "python-m-proxy": [sys.executable, "-m", "proxy"],
    "console-script": [str(CONSOLE_SCRIPT)],
}
PROXY = [sys.executable, "-m", "proxy"]
PREDICT = "/predict.v1.PredictionService/Predict"
ERROR_PREFIX = "shadow-proxy: error: "

StartBackend = Callable[..., Coroutine[Any, Any, ProbeBackend]]
ProxyProcess = Callable[..., Coroutine[Any, Any, tuple[asyncio.subprocess.Process, str]]]


def _environment() -> dict[str, str]:
    """This environment without OpenTelemetry's variables, so the flags alone decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=30, cwd=cwd, env=_environment(), check=False
    )


def _serve_flags() -> list[str]:
    """Every option string of ``serve``, from the parser itself."""
    parser = build_parser()
    (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = subcommands.choices["serve"]
    return [flag for action in serve._actions for flag in action.option_strings]


def _mentions(text: str, flag: str) -> bool:
    # "--shadow" must be found as itself, not inside "--shadow-grace".
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


# ------------------------------------------------------------------------------ help


@pytest.mark.parametrize("launcher", LAUNCHERS.values(), ids=LAUNCHERS.keys())
def test_help_names_the_serve_command_and_every_serve_flag(
    launcher: list[str], tmp_path: Path
) -> None:
    flags = _serve_flags()
    assert {"--production", "--shadow", "--config", "--ready-file"} <= set(flags)

    top = _run([*launcher, "--help"], tmp_path)
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: shadow-proxy")
    assert re.search(r"^\s+serve\s+run the proxy", top.stdout, re.MULTILINE), top.stdout

    serve = _run([*launcher, "serve", "--help"], tmp_path)
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout.startswith("usage: shadow-proxy serve")
    assert [flag for flag in flags if not _mentions(serve.stdout, flag)] == []
    assert list(tmp_path.iterdir()) == [], "help must not create files"


# ------------------------------------------------------------------------------ bad configuration


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_CONFIGURATIONS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "malformed-address": (
        lambda _: ["--production", "prod=127.0.0.1:port"],
        "production (prod): expected HOST:PORT, got '127.0.0.1:port'",
    ),
    "malformed-listen": (
        lambda _: ["--production", "prod=127.0.0.1:1", "--listen", "localhost"],
        "--listen: expected HOST:PORT",
    ),
    "duplicate-name": (
        lambda _: ["--production", "m=127.0.0.1:1", "--shadow", "m=127.0.0.1:2"],
        "duplicate backend name 'm'",
    ),
    "no-production": (
        lambda _: ["--shadow", "cand=127.0.0.1:2"],
        "no production backend",
    ),
    "unknown-config-key": (
        lambda tmp: [
            "--config",
            str(_write(tmp / "proxy.yaml", "production: prod=127.0.0.1:1\nlisten_port: 5\n")),
        ],
        "--config: unknown setting 'listen_port'",
    ),
    "config-file-not-utf8": (
        lambda tmp: ["--config", str(_write_bytes(tmp / "latin1.yaml", b"# caf\xe9\n"))],
        "is not UTF-8 text",
    ),
    "missing-config-file": (
        lambda tmp: ["--config", str(tmp / "absent.yaml")],
        "--config: cannot read",
    ),
    "unknown-exporter": (
        lambda _: ["--production", "prod=127.0.0.1:1", "--exporter", "file,jaeger"],
        "unknown exporter 'jaeger'",
    ),
    "traces-file-under-a-file": (
        lambda tmp: [
            "--production",
            "prod=127.0.0.1:1",
            "--traces-file",
            str(_write(tmp / "plain", "not a directory") / "sub" / "traces.jsonl"),
        ],
        "--traces-file: cannot open",
    ),
}


@pytest.mark.parametrize(
    ("make_args", "expected"), BAD_CONFIGURATIONS.values(), ids=BAD_CONFIGURATIONS.keys()
)
def test_a_bad_configuration_exits_2_with_one_line_and_starts_nothing(
    make_args: Callable[[Path], list[str]], expected: str, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    args = make_args(tmp_path)
    if "--listen" not in args:
        args = [*args, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    before = sorted(tmp_path.iterdir())

    result = _run([*PROXY, "serve", *args, "--ready-file", str(ready)], tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert expected in lines[0]
    assert not ready.exists()
    assert sorted(tmp_path.iterdir()) == before, "nothing may be created (traces file, ready file)"


# A config file is written by hand: a value of the wrong YAML type is a bad configuration
# like any other, not a crash.
WRONG_TYPES: dict[str, tuple[bytes, str]] = {
    "duration-is-a-list": (b"production: prod=127.0.0.1:1\nshutdown_grace: [1]\n", r"grace"),
    "duration-is-empty": (b"production: prod=127.0.0.1:1\nshadow_grace:\n", r"grace"),
    "exporters-is-a-number": (b"production: prod=127.0.0.1:1\nexporters: 5\n", r"exporter"),
    "traces-file-is-a-list": (b"production: prod=127.0.0.1:1\ntraces_file: [t]\n", r"traces"),
}


@pytest.mark.parametrize(("content", "pattern"), WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_a_config_value_of_the_wrong_type_exits_2_with_one_line(
    content: bytes, pattern: str, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_bytes(content)
    ready = tmp_path / "ready"

    result = _run(
        [*PROXY, "serve", "--config", str(config), "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--ready-file", str(ready)],
        tmp_path,
    )  # fmt: skip

    assert not ready.exists()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX)
    assert re.search(pattern, lines[0]), lines[0]


# ------------------------------------------------------------------------------ running proxies


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m proxy serve ...`` and wait for its ready file; returns the process
    and its address. Its stdout and stderr go to ``tmp_path/proxy.log``. Killed at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str, timeout: float = 10.0) -> tuple[asyncio.subprocess.Process, str]:
        ready = tmp_path / "ready"
        log_path = tmp_path / "proxy.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *PROXY, "serve", "--ready-file", str(ready), "--admin-listen", "127.0.0.1:0", *args,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=tmp_path, env=_environment(),
            )  # fmt: skip
        started.append(process)
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            if process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"proxy did not start:\n{log_path.read_text()}")
            await asyncio.sleep(0.02)
        return process, ready.read_text().strip()

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _stop(process: asyncio.subprocess.Process, signum: int, timeout: float) -> float:
    """Send ``signum`` and wait for the exit; returns the seconds it took."""
    started = time.monotonic()
    process.send_signal(signum)
    await asyncio.wait_for(process.wait(), timeout)
    return time.monotonic() - started


async def test_a_second_proxy_on_a_taken_port_fails_clearly(
    backends: StartBackend,
    make_proxy: ProxyFactory,
    channel_to: Callable[[str], aio.Channel],
    tmp_path: Path,
) -> None:
    production = await backends()
    first, _ = await make_proxy(f"prod={production.address}")
    ready = tmp_path / "ready"

    process = await asyncio.create_subprocess_exec(
        *PROXY, "serve", "--listen", first.address, "--production", f"prod={production.address}",
        "--admin-listen", "127.0.0.1:0", "--exporter", "none", "--ready-file", str(ready),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=tmp_path, env=_environment(),
    )  # fmt: skip
    try:
        _, stderr_bytes = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = stderr_bytes.decode()

    assert process.returncode == 2, stderr
    assert not ready.exists()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR_PREFIX), stderr
    assert f"cannot listen on {first.address}" in last
    assert "Traceback" not in stderr
    # The first proxy is untouched and still answers on its port.
    assert await channel_to(first.address).unary_unary(PREDICT)(b"still", timeout=5) == b"still"


def _by_role(spans: list[ReceivedSpan]) -> dict[str, dict[str, ReceivedSpan]]:
    """role → request id → span; fails on a duplicate."""
    table: dict[str, dict[str, ReceivedSpan]] = {}
    for span in spans:
        role_table = table.setdefault(span.attributes["shadow.role"], {})
        request_id = span.attributes["shadow.request_id"]
        assert request_id not in role_table, f"two {span.name!r} spans for {request_id}"
        role_table[request_id] = span
    return table


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_shuts_down_cleanly_and_every_completed_call_is_in_the_traces_file(
    signum: int,
    backends: StartBackend,
    proxy_process: ProxyProcess,
    channel_to: Callable[[str], aio.Channel],
    tmp_path: Path,
) -> None:
    production = await backends(Behaviour(reply=lambda body: b"production:" + body))
    shadow = await backends(Behaviour(delay=0.3))
    traces = tmp_path / "t.jsonl"
    process, address = await proxy_process(
        "--listen", "127.0.0.1:0",
        "--production", f"prod={production.address}",
        "--shadow", f"cand={shadow.address}",
        "--traces-file", str(traces),
    )  # fmt: skip
    call = channel_to(address).unary_unary(PREDICT)
    request_ids = [f"r{i}" for i in range(30)]

    replies = await asyncio.gather(
        *(call(rid.encode(), metadata=(("x-request-id", rid),), timeout=5) for rid in request_ids)
    )
    assert replies == [b"production:" + rid.encode() for rid in request_ids]
    assert shadow.completed < 30, "the shadows should still be in flight at the signal"
    took = await _stop(process, signum, timeout=8)

    log = (tmp_path / "proxy.log").read_text()
    assert process.returncode == 0, log
    assert took < 5, f"shutdown took {took:.1f}s\n{log}"
    assert shadow.completed == 30, "the shadow grace lets in-flight shadow calls finish"
    assert "Traceback" not in log
    assert "not flushed" not in log
    assert "cand: sent=30 ok=30" in log

    roles = _by_role(spans_from_json_lines(traces))
    assert sorted(roles) == ["production", "proxy", "shadow"]
    for role in ("proxy", "production", "shadow"):
        assert sorted(roles[role]) == sorted(request_ids), role
    for rid in request_ids:
        server, prod, cand = (roles[role][rid] for role in ("proxy", "production", "shadow"))
        assert server.name == "predict.v1.PredictionService/Predict"
        assert (prod.name, cand.name) == ("production prod", "shadow cand")
        assert prod.trace_id == cand.trace_id == server.trace_id
        assert prod.parent_span_id == cand.parent_span_id == server.span_id
        assert cand.attributes["rpc.grpc.status_code"] == 0, cand.attributes
        assert cand.status_code != STATUS_ERROR
        assert cand.event("response").attributes["payload.size"] == len(rid)
    assert len({roles["proxy"][rid].trace_id for rid in request_ids}) == 30


async def test_a_yaml_config_file_starts_the_proxy(
    backends: StartBackend,
    proxy_process: ProxyProcess,
    channel_to: Callable[[str], aio.Channel],
    tmp_path: Path,
) -> None:
    production = await backends(Behaviour(reply=lambda body: b"production:" + body))
    shadow = await backends()
    config = _write(
        tmp_path / "proxy.yaml",
        "listen: 127.0.0.1:0\n"
        f"production: {{name: prod, address: '{production.address}'}}\n"
        "shadows:\n"
        f"  - cand={shadow.address},sample=1,timeout=2s\n"
        "exporters: [file]\n"
        "traces_file: from-config.jsonl\n"
        "shutdown-grace: 3s\n",
    )
    process, address = await proxy_process("--config", str(config))

    reply = await channel_to(address).unary_unary(PREDICT)(
        b"hello", metadata=(("x-request-id", "cfg-1"),), timeout=5
    )
    assert reply == b"production:hello"
    await wait_for(lambda: shadow.completed == 1)
    assert shadow.received[0].metadata["x-request-id"] == "cfg-1"
    await _stop(process, signal.SIGTERM, timeout=8)
    assert process.returncode == 0, (tmp_path / "proxy.log").read_text()

    spans = spans_from_json_lines(tmp_path / "from-config.jsonl")
    assert sorted(span.name for span in spans) == [
        "predict.v1.PredictionService/Predict",
        "production prod",
        "shadow cand",
    ]


def test_grpc_io_path_default_and_the_environment_wins():
    import subprocess
    import sys

    probe = "import os, proxy.cli; print(os.environ['GRPC_EXPERIMENTS'])"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    default = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert default.stdout.split()[0] == "-event_engine_client,-event_engine_listener"
    chosen = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "GRPC_EXPERIMENTS": "-event_engine_dns"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chosen.stdout.split()[0] == "-event_engine_dns"
