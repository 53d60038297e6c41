#!/usr/bin/env python3
"""Worker scaling: requests/s of `shadow-proxy serve --workers N` for several N, side by side.

The proxy runs in its default configuration (one shadow at sample 1.0, tracing and
payload recording on, file exporter into a temp folder) in front of two "canned"
backends: gRPC servers that answer every Predict with one fixed, real PredictResponse
(production and shadow differ slightly, so every call is decoded and compared). They cost
a fraction of a model server's CPU, so that on a many-core machine the proxy, not the
backends, is what runs out of cores. Each backend is several processes on one port
(SO_REUSEPORT); each counts the calls it receives, so gRPC errors, which h2load counts as
successes, are caught.

h2load (Debian's nghttp2-client) is the load generator: several threads and many HTTP/2
connections, so that the kernel spreads them over the workers' shared port. With 8 or
more cores the roles are pinned to their own cores (sched_setaffinity): half for the
backends, two for h2load, the rest for the proxy (6 of 16), with worker counts 1, 2, 4 up
to the proxy's cores. With fewer, everything shares every core, and the scaling
measured is the limit of that machine, not of the proxy.

For each worker count, in rotated order over --repeats rounds: requests/s for --duration
seconds of full load (after a warm-up), the CPU the proxy's processes used (all workers
and the supervisor, from /proc/PID/stat, until their spans are exported) per request and
in cores, and the share of their cores the backends used (near 100% means the backends,
not the proxy, were the limit). Medians over the rounds, with the ratio to 1 worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: its h2load parsing, /proc readers and request

from proxy.gen import predict_pb2
from proxy.tensors import to_tensor

_CANNED_BACKEND = "--canned-backend"
"""The first argument that makes this script one process of a canned backend."""
START_TIMEOUT_S = 60.0
WARMUP_S = 2.0
SETTLE_S = 2.0
"""After the load (and the warm-up), the proxy's batch span processors (1 s schedule
delay) export the spans of that load; that CPU belongs to its requests."""
_H2LOAD_MEAN = re.compile(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)")


# ---------------------------------------------------------------------------------------
# The canned backend (this script, started with _CANNED_BACKEND)


def _reply(probabilities: Sequence[float]) -> bytes:
    """A PredictResponse like the model servers' (probabilities and a label)."""
    scores = np.array([probabilities], dtype=np.float64)
    label = np.array([int(np.argmax(scores))], dtype=np.int64)
    return predict_pb2.PredictResponse(
        model_name="canned",
        outputs=[to_tensor("probabilities", scores), to_tensor("label", label)],
    ).SerializeToString()


def _serve_canned(argv: list[str]) -> int:
    """One process of a canned backend: listen, reply, keep a call count in a file."""
    listen, reply_hex, calls_file, ready_file = argv
    reply = bytes.fromhex(reply_hex)
    calls = 0

    async def predict(_request: bytes, _context: aio.ServicerContext) -> bytes:
        nonlocal calls
        calls += 1
        return reply

    class Canned(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if details.method == bench.PREDICT:
                return grpc.unary_unary_rpc_method_handler(predict)
            return None

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = aio.server(options=[("grpc.so_reuseport", 1)])
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_generic_rpc_handlers((Canned(),))
        if server.add_insecure_port(listen) == 0:
            raise SystemExit(f"canned backend: cannot listen on {listen}")
        await server.start()
        bench._write_atomically(Path(ready_file), "ready\n")
        written = -1
        while not stop.is_set():
            if calls != written:
                written = calls
                bench._write_atomically(Path(calls_file), f"{written}\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), bench.CALLS_WRITE_INTERVAL_S * 4)
        await server.stop(grace=1.0)
        bench._write_atomically(Path(calls_file), f"{calls}\n")
        return 0

    return asyncio.run(serve())


# ---------------------------------------------------------------------------------------
# Processes


@dataclass
class Backend:
    """One canned backend: several processes serving one port."""

    name: str
    address: str
    processes: list[subprocess.Popen[bytes]]
    calls_files: list[Path]

    def calls(self) -> int:
        total = 0
        for path in self.calls_files:
            with contextlib.suppress(OSError, ValueError):
                total += int(path.read_text())
        return total

    def cpu_ticks(self) -> int:
        return sum(bench._cpu_ticks(p.pid) for p in self.processes)


def _affinity(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and what it starts) to ``cpus``; None: unpinned."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def _start_backend(
    name: str, reply: bytes, processes: int, cpus: Sequence[int] | None, folder: Path
) -> Backend:
    address = f"127.0.0.1:{bench._free_port()}"
    started: list[subprocess.Popen[bytes]] = []
    calls_files, ready_files = [], []
    for index in range(processes):
        calls, ready = folder / f"{name}-{index}.calls", folder / f"{name}-{index}.ready"
        command = [
            sys.executable, str(Path(__file__).resolve()), _CANNED_BACKEND,
            address, reply.hex(), str(calls), str(ready),
        ]  # fmt: skip
        with (folder / f"{name}-{index}.log").open("wb") as log:
            started.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_affinity(cpus)
                )
            )
        calls_files.append(calls)
        ready_files.append(ready)
    backend = Backend(name, address, started, calls_files)
    _wait_files(ready_files, started, f"backend {name}", folder)
    return backend


def _wait_files(
    files: Sequence[Path], processes: Sequence[subprocess.Popen[bytes]], what: str, folder: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(path.exists() for path in files):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in sorted(folder.glob("*.log")))
            raise SystemExit(f"bench_workers: {what} did not start\n{logs}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (the supervisor's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


def _ticks(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        # A process that ended: its ticks are gone with it.
        with contextlib.suppress(OSError):
            total += bench._cpu_ticks(pid)
    return total


# ---------------------------------------------------------------------------------------
# Load


@dataclass
class Load:
    """One h2load run: calls done, wall seconds, mean latency."""

    done: int
    elapsed_s: float
    mean_ms: float | None


def _h2load(
    binary: str, body: Path, address: str, args: argparse.Namespace, seconds: float
) -> Load:
    command = [
        binary, "-t", str(args.threads), "-c", str(args.connections),
        "-m", str(args.streams), "-D", f"{round(seconds * 1000)}ms",
        "-N", f"{bench.CALL_TIMEOUT_S:g}s",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(body), f"http://{address}{bench.PREDICT}",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60 + 2 * seconds,
        preexec_fn=_affinity(args.loadgen_cpus),
    )
    requests = bench._H2LOAD_REQUESTS.search(done.stdout)
    finished = bench._H2LOAD_FINISHED.search(done.stdout)
    if done.returncode != 0 or requests is None or finished is None:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"bench_workers: h2load failed (exit {done.returncode})\n{tail}")
    mean = _H2LOAD_MEAN.search(done.stdout)
    return Load(
        done=int(requests.group(3)),
        elapsed_s=float(finished.group(1)) * bench._SECONDS[finished.group(2)],
        mean_ms=float(mean.group(1)) * bench._SECONDS[mean.group(2)] * 1000 if mean else None,
    )


@dataclass
class Run:
    """What one worker count gave in one round."""

    workers: int
    rps: float
    done: int
    mean_ms: float | None
    proxy_cpu_us: float
    """The proxy's processes' CPU per request, spans exported included."""
    proxy_cores: float
    """The proxy's processes' CPU during the load, in cores."""
    backend_busy: dict[str, float]
    """Each backend's CPU during the load, as a share of the cores it was given."""
    received: dict[str, int] = field(default_factory=dict)


def _measure(
    workers: int,
    backends: dict[str, Backend],
    h2load: str,
    body: Path,
    args: argparse.Namespace,
    folder: Path,
    index: int,
) -> Run:
    name = f"proxy-{workers}w-{index}"
    ready = folder / f"{name}.ready"
    command = [
        sys.executable, "-m", "proxy", "serve", "--workers", str(workers),
        "--listen", "127.0.0.1:0", "--admin-listen", "off",
        "--production", f"production={backends['production'].address}",
        "--shadow", f"candidate={backends['shadow'].address},sample=1.0",
        "--state-file", str(folder / f"{name}.state.json"),
        "--traces-file", str(folder / f"{name}.traces.jsonl"),
        *args.proxy_args, "--ready-file", str(ready),
    ]  # fmt: skip
    with (folder / f"{name}.log").open("wb") as log:
        proxy = subprocess.Popen(
            command,
            cwd=bench.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_affinity(args.proxy_cpus),
        )
    try:
        _wait_files([ready], [proxy], f"the proxy with {workers} workers", folder)
        address = ready.read_text().strip()
        pids = [proxy.pid, *_children(proxy.pid)]
        _h2load(h2load, body, address, args, args.warmup)
        time.sleep(args.settle)
        received = {role: b.calls() for role, b in backends.items()}
        before = _ticks(pids), {role: b.cpu_ticks() for role, b in backends.items()}
        load = _h2load(h2load, body, address, args, args.duration)
        during = _ticks(pids), {role: b.cpu_ticks() for role, b in backends.items()}
        time.sleep(args.settle)
        after = _ticks(pids)
        counted = _settled_counts(backends)
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
    tick = bench.TICK_S
    backend_busy = {}
    for role, backend in backends.items():
        # Pinned, each backend has half the backends' cores; else one core per process.
        cores = args.backend_cores / 2 if args.backend_cores else len(backend.processes)
        used = (during[1][role] - before[1][role]) * tick / load.elapsed_s
        backend_busy[role] = used / cores
    return Run(
        workers=workers,
        rps=load.done / load.elapsed_s,
        done=load.done,
        mean_ms=load.mean_ms,
        proxy_cpu_us=(after - before[0]) * tick / max(load.done, 1) * 1e6,
        proxy_cores=(during[0] - before[0]) * tick / load.elapsed_s,
        backend_busy=backend_busy,
        received={role: counted[role] - received[role] for role in backends},
    )


def _settled_counts(backends: dict[str, Backend]) -> dict[str, int]:
    counted = {role: b.calls() for role, b in backends.items()}
    for _ in range(40):
        time.sleep(bench.CALLS_WRITE_INTERVAL_S * 6)
        again = {role: b.calls() for role, b in backends.items()}
        if again == counted:
            break
        counted = again
    return counted


# ---------------------------------------------------------------------------------------
# Report


def _summary(runs: list[Run], workers: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    base = statistics.median(r.rps for r in runs if r.workers == workers[0])
    for count in workers:
        mine = [r for r in runs if r.workers == count]
        rps = [r.rps for r in mine]
        rows.append(
            {
                "workers": count,
                "rps": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "vs_first": statistics.median(rps) / base,
                "proxy_cores": statistics.median(r.proxy_cores for r in mine),
                "proxy_cpu_us": statistics.median(r.proxy_cpu_us for r in mine),
                "mean_ms": statistics.median(r.mean_ms for r in mine if r.mean_ms is not None)
                if any(r.mean_ms is not None for r in mine)
                else None,
                "production_busy": statistics.median(r.backend_busy["production"] for r in mine),
                "shadow_busy": statistics.median(r.backend_busy["shadow"] for r in mine),
                "calls_ok": all(
                    r.received["production"] >= r.done and r.received["shadow"] > 0 for r in mine
                ),
            }
        )
    return rows


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Worker scaling",
        "",
        "`shadow-proxy serve --workers N` in its default configuration (one shadow at 100%, "
        "tracing and payload recording on), measured by `scripts/bench_workers.py` (see its "
        "`--help`).",
        "",
    ]
    for key in ("date", "command", "machine", "pinning", "load", "backends"):
        lines.append(f"- **{key}**: {result[key]}")
    lines += [
        "",
        f"| workers | req/s, median (min..max of {result['repeats']}) | vs {result['rows'][0]['workers']} "
        "worker(s) | proxy CPU, cores | proxy CPU per request (µs) | mean latency (ms) "
        "| production backend busy | shadow backend busy | calls counted at the backends |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        mean = f"{row['mean_ms']:.1f}" if row["mean_ms"] is not None else "-"
        lines.append(
            f"| {row['workers']} | {row['rps']:.0f} ({row['rps_min']:.0f}..{row['rps_max']:.0f}) "
            f"| {row['vs_first']:.2f}x | {row['proxy_cores']:.2f} | {row['proxy_cpu_us']:.0f} "
            f"| {mean} | {row['production_busy']:.0%} | {row['shadow_busy']:.0%} "
            f"| {'every call' if row['calls_ok'] else 'MISSING CALLS'} |"
        )
    lines += [
        "",
        "Backend busy: the backend processes' CPU during the load over the cores they had. "
        "Near 100%, the backends and not the proxy set the ceiling.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_workers.py",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  .venv/bin/python scripts/bench_workers.py                  # 1, 2, 4, ... workers\n"
            "  .venv/bin/python scripts/bench_workers.py --workers 1,2,4 --duration 10\n"
            "  .venv/bin/python scripts/bench_workers.py --quick          # a few seconds\n"
        ),
    )
    parser.add_argument(
        "--workers",
        help="comma-separated worker counts (default: 1 and powers of two up to the proxy's "
        "cores, at least 1,2)",
    )
    parser.add_argument(
        "--duration",
        type=bench._positive_float,
        default=8.0,
        metavar="SECONDS",
        help="seconds of full load per worker count and round (default %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=bench._positive_int,
        default=2,
        metavar="N",
        help="rounds over the worker counts, in rotated order; medians reported "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        help="give the proxy, h2load and the backends their own cores (default: with 8 or "
        "more cores)",
    )
    parser.add_argument(
        "--backend-processes",
        type=bench._positive_int,
        metavar="N",
        help="processes per canned backend (default: half the backends' cores, at least 1)",
    )
    parser.add_argument(
        "--proxy-arg",
        dest="proxy_args",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for every 'proxy serve', e.g. --proxy-arg=--exporter=none",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 and 2 workers, 1 round of 1 s"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--write-markdown", type=Path, metavar="PATH", help="also write the report as Markdown"
    )
    return parser


def _plan(args: argparse.Namespace, cpus: Iterable[int]) -> None:
    """Fill in cores, worker counts and load shape from the flags and the machine's cpus."""
    ordered = sorted(cpus)
    pin = len(ordered) >= 8 if args.pin is None else args.pin
    if pin and len(ordered) < 4:
        raise SystemExit("bench_workers: --pin needs at least 4 cores")
    if pin:
        # The backends get half: a canned reply still costs a Python gRPC server about a
        # third of the proxy's CPU per call, and there are two backends.
        backends = len(ordered) // 2
        proxy = len(ordered) - backends - 2
        args.proxy_cpus, args.loadgen_cpus = ordered[:proxy], ordered[proxy : proxy + 2]
        args.backend_cpus = ordered[proxy + 2 :]
    else:
        args.proxy_cpus = args.loadgen_cpus = args.backend_cpus = None
    args.backend_cores = len(args.backend_cpus) if args.backend_cpus else None
    proxy_cores = len(args.proxy_cpus) if args.proxy_cpus else len(ordered)
    if args.workers:
        args.worker_counts = sorted({bench._positive_int(w) for w in args.workers.split(",")})
    elif args.quick:
        args.worker_counts = [1, 2]
    else:
        top = max(2, proxy_cores)
        counts, n = [1], 2
        while n < top:
            counts.append(n)
            n *= 2
        args.worker_counts = [*counts, top]
    args.warmup, args.settle = WARMUP_S, SETTLE_S
    if args.quick:
        # Enough to show that every figure comes out, not to trust them.
        args.duration, args.repeats, args.warmup, args.settle = 1.0, 1, 0.5, 1.0
    args.backend_processes = args.backend_processes or max(1, (args.backend_cores or 2) // 2)
    args.threads = len(args.loadgen_cpus) if args.loadgen_cpus else 1
    # Many connections, so that SO_REUSEPORT spreads them evenly enough over the workers.
    connections = max(16, 8 * max(args.worker_counts))
    args.connections = connections + (-connections % args.threads)
    args.streams = 4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_CANNED_BACKEND]:
        return _serve_canned(argv[1:])
    args = build_parser().parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit(
            f"bench_workers: needs h2load on PATH ({bench.INSTALL_H2LOAD}); the load it makes "
            "must come from its own process"
        )
    _plan(args, os.sched_getaffinity(0))
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    message = bench._request("")
    body = folder / "request.grpc"
    body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    backends: dict[str, Backend] = {}
    runs: list[Run] = []
    try:
        backends["production"] = _start_backend(
            "production", _reply([0.1, 0.9]), args.backend_processes, args.backend_cpus, folder
        )
        backends["shadow"] = _start_backend(
            "shadow", _reply([0.15, 0.85]), args.backend_processes, args.backend_cpus, folder
        )
        index = 0
        for round_ in range(args.repeats):
            for workers in bench._rotated(args.worker_counts, round_):
                run = _measure(workers, backends, h2load, body, args, folder, index)
                index += 1
                runs.append(run)
                print(
                    f"round {round_ + 1}, {workers} worker(s): {run.rps:.0f} req/s, proxy "
                    f"{run.proxy_cores:.2f} cores, {run.proxy_cpu_us:.0f} µs/request, "
                    f"backends busy {run.backend_busy['production']:.0%}/"
                    f"{run.backend_busy['shadow']:.0%}, received {run.received} of {run.done}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for backend in backends.values():
            for process in backend.processes:
                process.send_signal(signal.SIGTERM)
            for process in backend.processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    result = _result(args, argv, runs, h2load)
    text = _markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({**result, "runs": [vars(r) for r in runs]}, indent=2))
    if args.write_markdown:
        args.write_markdown.write_text(text)
    return 0 if all(row["calls_ok"] for row in result["rows"]) else 1


def _result(
    args: argparse.Namespace, argv: Sequence[str], runs: list[Run], h2load: str
) -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0))
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    h2load_version = bench._version([h2load, "--version"], r"(nghttp2/[\w.]+)")
    if args.proxy_cpus:
        pinning = (
            f"proxy on {len(args.proxy_cpus)} cores, h2load on {len(args.loadgen_cpus)}, "
            f"the backends on {len(args.backend_cpus)}"
        )
    else:
        pinning = "none: every process shares every core"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "`" + " ".join(["scripts/bench_workers.py", *argv]) + "`",
        "machine": f"{cpus} cores, {model}; Linux {platform.release()}; Python "
        f"{platform.python_version()}; grpcio {grpc.__version__}; "
        f"{h2load_version}",
        "pinning": pinning,
        "load": f"h2load, {args.threads} thread(s), {args.connections} connections x "
        f"{args.streams} streams; {args.warmup:g} s warm-up, then {args.duration:g} s per worker "
        f"count and round, counts in rotated order",
        "backends": f"canned replies, {args.backend_processes} process(es) each for "
        "production and shadow on one SO_REUSEPORT port",
        "repeats": args.repeats,
        "rows": _summary(runs, args.worker_counts),
    }


if __name__ == "__main__":
    sys.exit(main())
