#!/usr/bin/env python3
"""The demo: a production model and a candidate behind the shadow proxy, every call traced.

Starts two real model servers (logistic regression v1 in production, gradient boosting v2
as the candidate shadow) and the proxy on free loopback ports, sends the held-out part of
the breast-cancer data set through the proxy, stops everything cleanly and prints what
was recorded. Run it as ``./scripts/demo.sh`` (which sets up .venv first); with
``--protocol v2`` the models speak the Open Inference Protocol (KServe v2) and the
traffic is ModelInfer with raw tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_servers.models import heldout  # noqa: E402
from proxy.compare.agreement import labels_agree  # noqa: E402
from proxy.compare.html import render_html  # noqa: E402
from proxy.compare.report import build_report, render_text  # noqa: E402
from proxy.compare.traces import read_calls  # noqa: E402
from proxy.gen import feedback_pb2, feedback_pb2_grpc, predict_pb2, predict_pb2_grpc  # noqa: E402
from proxy.protocols import open_inference as v2  # noqa: E402
from proxy.tensors import to_tensor  # noqa: E402

PROTOCOLS = ("predict-v1", "v2")

# Sends one row ([1, 30]) under a request id through the proxy; returns production's label.
Predict = Callable[[str, np.ndarray[Any, Any]], Awaitable[int]]


def _start(name: str, args: list[str], out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    ready = out / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log = (out / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", *args, "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, ready


def _wait_ready(name: str, process: subprocess.Popen[bytes], ready: Path, out: Path) -> str:
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None:
            log = (out / f"{name}.log").read_text(errors="replace")
            raise SystemExit(f"demo: {name} exited with {process.returncode}:\n{log}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"demo: {name} did not start within 60 s; see {out / (name + '.log')}")
        time.sleep(0.05)
    return ready.read_text().strip()


def _stop(name: str, process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        print(f"demo: {name} did not stop within 30 s and was killed", file=sys.stderr)
        return process.wait()


def _predict_v1(channel: aio.Channel) -> Predict:
    stub = predict_pb2_grpc.PredictionServiceStub(channel)

    async def predict(request_id: str, row: np.ndarray[Any, Any]) -> int:
        request = predict_pb2.PredictRequest(
            model_name="breast-cancer", request_id=request_id, inputs=[to_tensor("features", row)]
        )
        reply = await stub.Predict(request, timeout=10)
        label = next(o for o in reply.outputs if o.name == "label")
        return int(label.contents.int64_contents[0])

    return predict


def _infer_v2(channel: aio.Channel) -> Predict:
    # The v2 messages live in a private descriptor pool, with no generated stub.
    model_infer = channel.unary_unary(
        v2.MODEL_INFER,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=v2.ModelInferResponse.FromString,
    )

    async def predict(request_id: str, row: np.ndarray[Any, Any]) -> int:
        # The id is the request id the proxy records (there is no x-request-id header),
        # and the one the true labels are sent under.
        request = v2.ModelInferRequest(model_name="breast-cancer", id=request_id)
        v2.add_input(request, "features", row, "FP64", raw=True)
        reply = await model_infer(request, timeout=10)
        return int(v2.response_outputs(reply)["label"][0])

    return predict


async def _send(
    address: str, limit: int | None, concurrency: int, protocol: str
) -> tuple[dict[str, int], list[float], int]:
    """Send the held-out rows; return production's label per request id, latencies, errors."""
    features, truth = heldout()
    if limit is not None:
        features = features[:limit]
    labels: dict[str, int] = {}
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(features)):
        queue.put_nowait(index)
    async with aio.insecure_channel(address) as channel:
        predict = _infer_v2(channel) if protocol == "v2" else _predict_v1(channel)
        with tqdm(total=len(features), desc="requests", unit="req", file=sys.stdout) as progress:

            async def worker() -> None:
                nonlocal errors
                while not queue.empty():
                    index = queue.get_nowait()
                    request_id = f"demo-{index:04d}"
                    start = time.perf_counter()
                    try:
                        labels[request_id] = await predict(request_id, features[index : index + 1])
                        latencies.append(time.perf_counter() - start)
                    except grpc.aio.AioRpcError as error:
                        errors += 1
                        tqdm.write(f"  {request_id}: {error.code().name}: {error.details()}")
                    progress.update(1)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        # Later, the true outcomes become known: send them as feedback, in batches.
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        known = [
            feedback_pb2.Label(request_id=f"demo-{i:04d}", labels=[str(int(truth[i]))])
            for i in range(len(features))
        ]
        for start in range(0, len(known), 100):
            await feedback.SubmitLabels(
                feedback_pb2.SubmitLabelsRequest(labels=known[start : start + 100])
            )
        print(f"demo: sent the {len(known)} true labels through the Feedback service")
    return labels, latencies, errors


def _summary(traces: Path, sent: int, errors: int, latencies: list[float], shadow: str) -> None:
    calls = read_calls(traces)
    spans = sum(1 + (c.production is not None) + len(c.shadows) for c in calls)
    completed = failed = agreed = compared = 0
    dropped = sum(1 for c in calls if shadow in c.dropped)
    disagreements: list[str] = []
    for call in calls:
        result = call.shadows.get(shadow)
        if result is None:
            continue
        if result.status_code != 0:
            failed += 1
            continue
        completed += 1
        if call.production and call.production.reply and result.reply:
            compared += 1
            if labels_agree(call.production.reply, result.reply):
                agreed += 1
            else:
                disagreements.append(call.request_id)
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    print()
    print("Shadow rollout demo: summary")
    print(f"  requests sent               {sent}")
    print(f"  production errors           {errors}")
    print(f"  production latency p50      {p50:.1f} ms (client side, through the proxy)")
    print(
        f"  shadow '{shadow}' calls     completed {completed}, failed {failed}, dropped {dropped}"
    )
    if compared:
        print(
            f"  agreement with production   {agreed}/{compared} "
            f"({100.0 * agreed / compared:.1f}%) same predicted label"
        )
    if disagreements:
        shown = ", ".join(disagreements[:8])
        print(f"  disagreeing request ids     {shown}{' ...' if len(disagreements) > 8 else ''}")
    print(f"  traces file                 {traces} ({len(calls)} calls, {spans} spans)")
    print()
    # The comparison report, exactly as `shadow-proxy report TRACES_FILE` prints it.
    report = build_report(traces)
    print(render_text(report))
    html = traces.with_name("report.html")
    html.write_text(render_html(report), encoding="utf-8")
    print(f"The same report with plots: {html}")
    print(f"  (made by: shadow-proxy report {traces} --html {html})")
    print()
    print("Look at the traces in Jaeger:")
    print("  docker run --rm -p 16686:16686 -p 4317:4317 jaegertracing/jaeger:latest")
    print("  OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 ./scripts/demo.sh")
    print("  then open http://localhost:16686 and pick the service 'shadow-proxy'")
    print(f"  or, without sending anything: shadow-proxy merge-traces {traces} -o traces.json")
    print("  and load traces.json in Jaeger's UI (Search > Upload JSON)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "demo-output",
        help="folder for the traces file and logs (default demo-output/)",
    )
    parser.add_argument(
        "--requests", type=int, help="send only the first N held-out rows (default: all)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="calls in flight at once (default 4)"
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="predict-v1",
        help="what the model servers speak: predict-v1 (the project's own) or v2 (the Open "
        "Inference Protocol, KServe v2; traffic is ModelInfer with raw tensors)",
    )
    parser.add_argument(
        "--shadow-latency-ms",
        type=float,
        default=0.0,
        help="make the candidate slower, to see that production does not wait for it",
    )
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    traces = out / "traces.jsonl"
    traces.unlink(missing_ok=True)
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        over = " over the Open Inference Protocol (v2)" if args.protocol == "v2" else ""
        print(f"demo: starting three model servers{over} and the proxy (logs in {out})")
        model_server = ["model_servers", "--listen", "127.0.0.1:0", "--protocol", args.protocol]
        production, production_ready = _start(
            "production", [*model_server, "--model", "logreg-v1"], out
        )
        started.append(("production", production))
        candidate, candidate_ready = _start(
            "candidate",
            [*model_server, "--model", "gboost-v2", "--latency-ms", str(args.shadow_latency_ms)],
            out,
        )
        started.append(("candidate", candidate))
        # A second instance of the production model: where it differs from production, the
        # difference is noise, and the report does not hold it against the candidate.
        reference, reference_ready = _start(
            "reference", [*model_server, "--model", "logreg-v1"], out
        )
        started.append(("reference", reference))
        production_address = _wait_ready("production", production, production_ready, out)
        candidate_address = _wait_ready("candidate", candidate, candidate_ready, out)
        reference_address = _wait_ready("reference", reference, reference_ready, out)
        print(
            f"demo: production logreg-v1 on {production_address}, candidate gboost-v2 on "
            f"{candidate_address}, reference logreg-v1 on {reference_address}"
        )
        proxy, proxy_ready = _start(
            "proxy",
            ["proxy", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--production", f"production={production_address}",
             "--shadow", f"candidate={candidate_address}",
             "--reference", f"reference={reference_address}",
             "--traces-file", str(traces)],
            out,
        )  # fmt: skip
        started.append(("proxy", proxy))
        proxy_address = _wait_ready("proxy", proxy, proxy_ready, out)
        otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        print(
            f"demo: proxy on {proxy_address}; traces to {traces}" + (f" and {otlp}" if otlp else "")
        )

        labels, latencies, errors = asyncio.run(
            _send(proxy_address, args.requests, args.concurrency, args.protocol)
        )

        print("demo: stopping the proxy (it drains shadows and flushes traces), then the models")
        code = _stop("proxy", proxy)
        started.remove(("proxy", proxy))
        if code != 0:
            print(f"demo: the proxy exited with {code}; see {out / 'proxy.log'}", file=sys.stderr)
        sent = len(labels) + errors
        _summary(traces, sent, errors, latencies, "candidate")
        return 0 if code == 0 and errors == 0 else 1
    finally:
        for name, process in reversed(started):
            _stop(name, process)


if __name__ == "__main__":
    sys.exit(main())
