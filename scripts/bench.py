#!/usr/bin/env python3
"""The benchmark: calls straight to the production model server against calls through the proxy.

Starts the real production model server (logreg-v1), the candidate (gboost-v2) and the
proxy in front of them (the candidate as a shadow at sample 1.0, tracing on with the file
exporter into a temporary folder), all on loopback port 0, and measures both targets side
by side in one run:

  direct  client -> production model server
  proxy   client -> proxy -> production model server (and a copy -> shadow)

For each target: latency p50/p99 of sequential calls (concurrency 1, after a warm-up),
requests/s with --concurrency calls in flight for --duration seconds, and the CPU time
each server process spent per request during that load (utime + stime from
/proc/PID/stat). Targets run in rotated order over --repeats rounds; the figures reported
are medians over the rounds. Everything started is stopped at the end.

The load generator is a Python grpc.aio client in this process: on a machine with few
cores it competes for CPU with the servers, so absolute figures understate what the
servers could do, and the ratios of figures measured side by side are what count.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_servers.models import FAMILY, heldout  # noqa: E402
from proxy.gen import predict_pb2  # noqa: E402
from proxy.tensors import to_tensor  # noqa: E402

PREDICT = "/predict.v1.PredictionService/Predict"
TARGETS = ("direct", "proxy")
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
CLIENT_NOTE = (
    "the load generator is a Python grpc.aio client inside this process; with few cores "
    "it competes for CPU with the servers, so absolute figures understate the servers "
    "and the ratios of figures measured side by side are what count"
)


@dataclass(frozen=True)
class Plan:
    """How much to measure: rounds, calls and seconds."""

    repeats: int
    warmup: int
    calls: int
    duration_s: float
    concurrency: int


@dataclass
class Process:
    """A server this benchmark started, and where it logs."""

    name: str
    popen: subprocess.Popen[bytes]
    ready: Path
    log: Path
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

    @property
    def calls(self) -> int:
        return len(self.latencies) + self.errors


# ---------------------------------------------------------------------------------------
# Processes


def _start(name: str, args: list[str], folder: Path) -> Process:
    ready = folder / f"{name}.ready"
    log = folder / f"{name}.log"
    with log.open("wb") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", *args, "--ready-file", str(ready)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Process(name, popen, ready, log)


def _log_tail(process: Process, lines: int = 20) -> str:
    try:
        text = process.log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(process: Process) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (process.ready.exists() and process.ready.read_text().strip()):
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
    process.address = process.ready.read_text().strip()
    return process.address


def _stop(process: Process) -> int:
    """SIGTERM, then wait; killed (and said so) if it does not stop in time."""
    if process.popen.poll() is None:
        process.popen.send_signal(signal.SIGTERM)
    try:
        return process.popen.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        print(
            f"bench: {process.name} did not stop within {STOP_TIMEOUT_S:.0f} s and was killed",
            file=sys.stderr,
        )
        return process.popen.wait()


def _cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (all its threads), or of one thread, in clock ticks."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces; the fields after its ")" start at field 3.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _cpu_snapshot(processes: dict[str, Process]) -> dict[str, int]:
    snapshot = {name: _cpu_ticks(p.pid) for name, p in processes.items()}
    # The proxy's main thread runs the asyncio loop, i.e. the request path; its other
    # threads record spans, export them and run gRPC's internals.
    proxy = processes["proxy"]
    snapshot["proxy_main_thread"] = _cpu_ticks(proxy.pid, proxy.pid)
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


# ---------------------------------------------------------------------------------------
# Load


Call = Callable[..., Awaitable[bytes]]


def _payloads(target: str) -> Callable[[], bytes]:
    """Serialized PredictRequests of one held-out row, each with its own request id."""
    features, _ = heldout()
    request = predict_pb2.PredictRequest(
        model_name=FAMILY, inputs=[to_tensor("features", features[0:1])]
    )
    counter = itertools.count()

    def next_payload() -> bytes:
        request.request_id = f"bench-{target}-{next(counter)}"
        return request.SerializeToString()

    return next_payload


async def _check_reply(call: Call, payload: bytes, target: str) -> None:
    reply = predict_pb2.PredictResponse.FromString(await call(payload, timeout=CALL_TIMEOUT_S))
    if not any(output.name == "label" for output in reply.outputs):
        raise SystemExit(f"bench: {target}: the reply has no 'label' output: {reply}")


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


async def _measure(
    target: str, address: str, plan: Plan, processes: dict[str, Process]
) -> dict[str, Any]:
    """One round of one target: warm-up, sequential calls, then concurrent load."""
    # The servers on this target's path; the others idle meanwhile.
    involved = {"production": processes["production"]}
    if target == "proxy":
        involved = {
            "proxy": processes["proxy"],
            "production": processes["production"],
            "shadow": processes["shadow"],
        }
    payload = _payloads(target)
    async with aio.insecure_channel(address) as channel:
        # Bytes in, bytes out: the client spends no time on protobuf beyond building the
        # request, so more of the machine is left to the servers.
        call: Call = channel.unary_unary(PREDICT)
        await _check_reply(call, payload(), target)
        await _sequential(call, payload, plan.warmup)
        sequential = await _sequential(call, payload, plan.calls)
        await _settle(involved)
        before = _cpu_snapshot(processes)
        load = await _concurrent(call, payload, plan.concurrency, plan.duration_s)
        await _settle(involved)
        after = _cpu_snapshot(processes)
    if not sequential.latencies or not load.latencies:
        raise SystemExit(
            f"bench: {target}: every call failed "
            f"({sequential.errors} sequential, {load.errors} under load)"
        )
    p50, p99 = _percentiles_ms(sequential.latencies)
    load_p50, load_p99 = _percentiles_ms(load.latencies)
    cpu = {
        name: (after[name] - before[name]) * TICK_S * 1e6 / load.calls
        for name in (*involved, "client")
    }
    if target == "proxy":
        cpu["proxy_main_thread"] = (
            (after["proxy_main_thread"] - before["proxy_main_thread"]) * TICK_S * 1e6 / load.calls
        )
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "rps": len(load.latencies) / load.elapsed_s,
        "load_p50_ms": load_p50,
        "load_p99_ms": load_p99,
        "cpu_us_per_request": cpu,
        "sequential_calls": sequential.calls,
        "sequential_errors": sequential.errors,
        "load_calls": load.calls,
        "load_errors": load.errors,
        "load_seconds": load.elapsed_s,
    }


async def _rounds(plan: Plan, processes: dict[str, Process]) -> list[dict[str, Any]]:
    addresses = {"direct": processes["production"].address, "proxy": processes["proxy"].address}
    rounds = []
    for index in range(plan.repeats):
        # Rotated so that neither target always runs first (cold caches, turbo, neighbours).
        order = TARGETS[index % len(TARGETS) :] + TARGETS[: index % len(TARGETS)]
        results = {}
        for target in order:
            print(f"bench: round {index + 1}/{plan.repeats}: {target}", file=sys.stderr)
            results[target] = await _measure(target, addresses[target], plan, processes)
        rounds.append({"order": list(order), **results})
    return rounds


# ---------------------------------------------------------------------------------------
# Summary and report


def _median_figures(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target, the median over rounds of each figure; errors summed."""
    summary: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        runs = [r[target] for r in rounds]
        figures: dict[str, Any] = {}
        for key in ("p50_ms", "p99_ms", "rps", "load_p50_ms", "load_p99_ms"):
            figures[key] = statistics.median(run[key] for run in runs)
        figures["cpu_us_per_request"] = {
            name: statistics.median(run["cpu_us_per_request"][name] for run in runs)
            for name in runs[0]["cpu_us_per_request"]
        }
        for key in ("sequential_calls", "sequential_errors", "load_calls", "load_errors"):
            figures[key] = sum(run[key] for run in runs)
        summary[target] = figures
    return summary


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    direct, proxy = summary["direct"], summary["proxy"]
    return {
        "p50": proxy["p50_ms"] / direct["p50_ms"],
        "p99": proxy["p99_ms"] / direct["p99_ms"],
        "rps": proxy["rps"] / direct["rps"],
        "added_p50_ms": proxy["p50_ms"] - direct["p50_ms"],
        "added_p99_ms": proxy["p99_ms"] - direct["p99_ms"],
    }


def _machine() -> dict[str, Any]:
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
    }


_CELL = 26
"""Width of one target's column in the table: the median, then (min..max)."""


def _spread(
    rounds: list[dict[str, Any]], target: str, pick: Callable[[dict[str, Any]], float]
) -> str:
    values = [pick(r[target]) for r in rounds]
    return f"{_number(min(values))}..{_number(max(values))}" if len(values) > 1 else ""


def _number(value: float) -> str:
    """Three or so significant digits, never in exponent notation."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _report(result: dict[str, Any]) -> str:
    machine = result["machine"]
    summary = result["targets"]
    rounds = result["rounds"]
    ratios = result["ratios"]
    settings = result["settings"]
    quota = (
        f", cgroup quota {machine['cgroup_cpu_quota']:g} CPUs"
        if machine["cgroup_cpu_quota"]
        else ""
    )
    tracing = (
        "tracing on (file exporter, temp dir)"
        if settings["exporter"] == "file"
        else "tracing as --proxy-arg sets it"
    )
    extra = f"; proxy given {shlex.join(settings['proxy_args'])}" if settings["proxy_args"] else ""
    lines = [
        "Shadow proxy benchmark: direct to production vs. through the proxy",
        f"  date      {result['date']}",
        f"  command   {result['command']}",
        f"  machine   nproc {machine['nproc']}{quota}, {machine['cpu_model']}; "
        f"Linux {machine['kernel']}; Python {machine['python']}; grpcio {machine['grpcio']}",
        f"  setup     production {PRODUCTION_MODEL}; proxy with shadow {SHADOW_MODEL} at sample "
        f"1.0, {tracing}; loopback{extra}",
        f"  request   PredictRequest, one held-out row (30 FP64 features), "
        f"{result['request_bytes']} bytes",
        f"  plan      {settings['repeats']} round(s), targets in rotated order; per target: "
        f"{settings['warmup']} warm-up + {settings['calls']} sequential calls, then "
        f"{settings['concurrency']} in flight for {settings['duration_s']:g} s",
        "  figures   medians over rounds (min..max over rounds in brackets)",
        textwrap.fill(
            CLIENT_NOTE, width=100, initial_indent="  note      ", subsequent_indent=" " * 12
        ),
        "",
    ]

    def row(label: str, pick: Callable[[dict[str, Any]], float | None], ratio: str = "") -> str:
        cells = []
        for target in TARGETS:
            value = pick(summary[target])
            if value is None:
                cells.append(f"{'':>{_CELL}}")
                continue
            spread = _spread(rounds, target, pick)  # type: ignore[arg-type]
            cells.append(f"{_number(value):>10} {f'({spread})' if spread else '':<{_CELL - 11}}")
        return f"  {label:<38}{''.join(cells)}{ratio:>13}".rstrip()

    def cpu(name: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda figures: figures["cpu_us_per_request"].get(name)

    lines.append(
        f"  {'':<38}{'direct':>10}{'':<{_CELL - 10}}{'proxy':>10}{'':<{_CELL - 10}}"
        f"{'proxy/direct':>13}"
    )
    lines += [
        row("latency p50, concurrency 1 (ms)", lambda f: f["p50_ms"], f"{ratios['p50']:.2f}x"),
        row("latency p99, concurrency 1 (ms)", lambda f: f["p99_ms"], f"{ratios['p99']:.2f}x"),
        row(
            f"throughput, concurrency {settings['concurrency']} (req/s)",
            lambda f: f["rps"],
            f"{ratios['rps']:.2f}x",
        ),
        row(f"latency p50, concurrency {settings['concurrency']} (ms)", lambda f: f["load_p50_ms"]),
        row(f"latency p99, concurrency {settings['concurrency']} (ms)", lambda f: f["load_p99_ms"]),
        row("CPU per request under load (us):", lambda f: None),
        row("  proxy process", cpu("proxy")),
        row("    of which its main thread (loop)", cpu("proxy_main_thread")),
        row("  production model server", cpu("production")),
        row("  shadow model server", cpu("shadow")),
        row("  load generator (this process)", cpu("client")),
        "",
        f"  added latency at concurrency 1: p50 +{ratios['added_p50_ms']:.3f} ms, "
        f"p99 +{ratios['added_p99_ms']:.3f} ms; proxy throughput {ratios['rps']:.2f} of direct",
    ]
    for target in TARGETS:
        figures = summary[target]
        lines.append(
            f"  {target}: {figures['sequential_calls']} sequential calls "
            f"({figures['sequential_errors']} errors), {figures['load_calls']} calls under load "
            f"({figures['load_errors']} errors)"
        )
    code = result["proxy_exit_code"]
    lines.append(
        f"  proxy exit on SIGTERM: {code}" + ("" if code == 0 else "  <-- expected 0 (see log)")
    )
    for line in result["proxy_shutdown_log"]:
        lines.append(f"  proxy log: {line}")
    traces = result["traces"]
    lines.append(f"  traces file: {traces['lines']} lines, {traces['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


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
            "  .venv/bin/python scripts/bench.py                 # the default run, about a minute\n"
            "  .venv/bin/python scripts/bench.py --quick         # a few seconds (the test suite)\n"
            "  .venv/bin/python scripts/bench.py --repeats 5 --duration 10 --json bench.json\n"
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds in all: 1 round, 50 sequential calls, 1 s of load "
        "(other flags still override)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="rounds over both targets, in rotated order; medians are reported (default 3)",
    )
    parser.add_argument(
        "--calls",
        type=_positive_int,
        metavar="N",
        help="sequential calls per target and round for the latency figures (default 2000)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds of concurrent load per target and round (default 5)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=64,
        help="calls in flight at once during the load (default %(default)s)",
    )
    parser.add_argument(
        "--proxy-arg",
        dest="proxy_args",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for 'proxy serve' (repeatable), to compare configurations, "
        "e.g. --proxy-arg=--no-payloads or --proxy-arg=--exporter=none",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write every figure, per round, as JSON"
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
    repeats, warmup, calls, duration = (1, 10, 50, 1.0) if args.quick else (3, 200, 2000, 5.0)
    return Plan(
        repeats=args.repeats or repeats,
        warmup=warmup,
        calls=args.calls or calls,
        duration_s=args.duration or duration,
        concurrency=args.concurrency,
    )


def _raise_interrupt(signum: int, _frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the finally below stops the servers.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = _plan(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as temp:
        folder = Path(temp)
        traces = folder / "traces.jsonl"
        try:
            print("bench: starting the model servers and the proxy", file=sys.stderr)
            production = _start(
                "production",
                ["model_servers", "--listen", "127.0.0.1:0", "--model", PRODUCTION_MODEL],
                folder,
            )
            started.append(production)
            shadow = _start(
                "shadow",
                ["model_servers", "--listen", "127.0.0.1:0", "--model", SHADOW_MODEL],
                folder,
            )
            started.append(shadow)
            _wait_ready(production)
            _wait_ready(shadow)
            # The file exporter whatever OTEL_* says, unless the caller chose exporters.
            chosen = any(a.partition("=")[0] == "--exporter" for a in args.proxy_args)
            exporter = [] if chosen else ["--exporter", "file"]
            proxy = _start(
                "proxy",
                ["proxy", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                 "--production", f"production={production.address}",
                 "--shadow", f"candidate={shadow.address},sample=1.0",
                 *exporter, "--traces-file", str(traces), *args.proxy_args],
                folder,
            )  # fmt: skip
            started.append(proxy)
            _wait_ready(proxy)
            processes = {"proxy": proxy, "production": production, "shadow": shadow}
            date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            rounds = asyncio.run(_rounds(plan, processes))

            print("bench: stopping the proxy, then the model servers", file=sys.stderr)
            proxy_code = _stop(proxy)
            started.remove(proxy)
            summary = _median_figures(rounds)
            result: dict[str, Any] = {
                "date": date,
                "command": shlex.join(sys.orig_argv),
                "machine": _machine(),
                "settings": {
                    "repeats": plan.repeats,
                    "warmup": plan.warmup,
                    "calls": plan.calls,
                    "duration_s": plan.duration_s,
                    "concurrency": plan.concurrency,
                    "production_model": PRODUCTION_MODEL,
                    "shadow_model": SHADOW_MODEL,
                    "shadow_sample": 1.0,
                    "exporter": "as in proxy_args" if chosen else "file",
                    "proxy_args": args.proxy_args,
                },
                "request_bytes": len(_payloads("direct")()),
                "note": CLIENT_NOTE,
                "targets": summary,
                "ratios": _ratios(summary),
                "rounds": rounds,
                "proxy_exit_code": proxy_code,
                "proxy_shutdown_log": _shutdown_lines(proxy),
                "traces": _traces_size(traces),
            }
        except KeyboardInterrupt:
            print("bench: interrupted; stopping what was started", file=sys.stderr)
            return 130
        finally:
            for process in reversed(started):
                code = _stop(process)
                if code != 0:
                    print(f"bench: {process.name} exited with {code}", file=sys.stderr)
    print(_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  figures written to {args.json}")
    if proxy_code != 0:
        print(f"bench: the proxy exited with {proxy_code} on SIGTERM, not 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
