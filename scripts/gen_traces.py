#!/usr/bin/env python3
"""Write a synthetic traces file shaped like the proxy's own, to time and try the report.

The file has the shape the proxy's OTLP JSON file exporter writes: one OTLP document per
line, up to 512 spans per line in the order the recorder would finish them (a shadow that
answers before production is written before the proxy span), payload events included.
Per call: the proxy span, the production span, a shadow ``candidate`` on most calls (some
sampled out, a few dropped), a ``reference`` (a second production instance) on some, a few
errors and timeouts, a few calls that never reached production, and feedback spans with
the true labels that arrive in batches thousands of calls later. Some rows are
"borderline": production, reference and candidate all flip a coin there, which is the
noise a reference reveals.

    .venv/bin/python scripts/gen_traces.py --calls 1000000 --out /tmp/traces-1m.jsonl
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

SPANS_PER_LINE = 512  # the batch span processor's default export size
SERVICE = "predict.v1.PredictionService"
METHOD = "Predict"
PRODUCTION, CANDIDATE, REFERENCE = "prod", "candidate", "reference"
TOLERANCE = 1e-6

_RESOURCE = {
    "attributes": [
        {"key": "telemetry.sdk.language", "value": {"stringValue": "python"}},
        {"key": "telemetry.sdk.name", "value": {"stringValue": "opentelemetry"}},
        {"key": "telemetry.sdk.version", "value": {"stringValue": "1.45.2"}},
        {"key": "service.name", "value": {"stringValue": "shadow-proxy"}},
    ]
}
_SCOPE = {"name": "shadow-proxy"}


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if value:
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"arrayValue": {}}


def _attributes(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _value(value)} for key, value in values.items()]


class Generator:
    """Simulates calls through a proxy with one shadow and a sampled reference."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.classes = [str(c) for c in range(args.classes)]
        self.features = [[round(self.rng.uniform(0, 100), 4) for _ in range(30)] for _ in range(64)]
        self.pending: list[tuple[int, int, dict[str, Any]]] = []  # (record time, seq, span)
        self.seq = 0
        self.feedback_due: list[tuple[int, str, list[str], str, str]] = []

    def _id(self, bits: int) -> str:
        return f"{self.rng.getrandbits(bits):0{bits // 4}x}"

    def _record(self, at_ns: int, span: dict[str, Any]) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (at_ns, self.seq, span))

    def _other(self, label: str) -> str:
        return self.rng.choice([c for c in self.classes if c != label])

    def _probabilities(self, labels: list[str], sharp: float) -> list[float]:
        values: list[float] = []
        for label in labels:
            top = round(self.rng.uniform(sharp, 0.999), 6)
            rest = (1.0 - top) / (len(self.classes) - 1)
            values.extend(top if c == label else round(rest, 6) for c in self.classes)
        return values

    def _reply(self, request_id: str, model: str, labels: list[str], probs: list[float]) -> str:
        rows = len(labels)
        return orjson.dumps(
            {
                "model_name": model,
                "model_version": "1",
                "request_id": request_id,
                "outputs": [
                    {
                        "name": "label",
                        "dtype": "DATA_TYPE_INT64",
                        "shape": [str(rows)],
                        "contents": {"int64_contents": labels},
                    },
                    {
                        "name": "probabilities",
                        "dtype": "DATA_TYPE_FP32",
                        "shape": [str(rows), str(len(self.classes))],
                        "contents": {"fp32_contents": probs},
                    },
                ],
            }
        ).decode()

    def _event(self, name: str, at_ns: int, payload: str, message_type: str) -> dict[str, Any]:
        return {
            "timeUnixNano": str(at_ns),
            "name": name,
            "attributes": _attributes(
                {
                    "payload.size": len(payload),
                    "message.type": message_type,
                    "payload.encoding": "json",
                    "payload": payload,
                    "payload.truncated": False,
                }
            ),
        }

    def _backend_span(
        self,
        trace_id: str,
        parent: str,
        role: str,
        name: str,
        request_id: str,
        start: int,
        end: int,
        code: int,
        reply: str | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": METHOD,
            "rpc.grpc.status_code": code,
            "server.address": "10.0.0.5",
            "server.port": 8500,
            "shadow.role": role,
            "shadow.backend": name,
            "shadow.request_id": request_id,
            "shadow.request.size": 291,
            "shadow.status_from_backend": code != 4,
        }
        if role != "production":
            attributes["shadow.sampled"] = True
        if reply is not None:
            attributes["shadow.response.size"] = len(reply)
        attributes.update(extra)
        span: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": self._id(64),
            "parentSpanId": parent,
            "flags": 256,
            "name": f"{role} {name}",
            "kind": 3,
            "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(end),
            "attributes": _attributes(attributes),
            "events": [],
            "status": {} if code == 0 else {"code": 2, "message": f"status {code}"},
        }
        if reply is not None and self.args.payloads:
            span["events"].append(self._event("response", end, reply, "predict.v1.PredictResponse"))
        return span

    def _compare(
        self,
        prod: tuple[int, list[str], list[float], float],
        other: tuple[int, list[str], list[float], float],
    ) -> dict[str, Any]:
        prod_code, prod_labels, prod_probs, prod_latency = prod
        code, labels, probs, latency = other
        result: dict[str, Any] = {"shadow.latency_diff_ms": round(latency - prod_latency, 4)}
        result["shadow.status_mismatch"] = (code == 0) != (prod_code == 0)
        if code != 0 or prod_code != 0:
            result["shadow.compared"] = False
            return result
        diffs = [abs(float(a) - float(b)) for a, b in zip(labels, prod_labels, strict=True)]
        diffs += [abs(a - b) for a, b in zip(probs, prod_probs, strict=True)]
        differing = []
        if labels != prod_labels:
            differing.append("label")
        if any(abs(a - b) > TOLERANCE for a, b in zip(probs, prod_probs, strict=True)):
            differing.append("probabilities")
        result.update(
            {
                "shadow.compared": True,
                "shadow.agree": labels == prod_labels,
                "shadow.max_abs_diff": max(diffs),
                "shadow.mean_abs_diff": sum(diffs) / len(diffs),
                "shadow.differing_outputs": differing,
            }
        )
        return result

    def call(self, index: int, start: int) -> None:
        rng, args = self.rng, self.args
        request_id = f"req-{index:08d}"
        trace_id, proxy_id = self._id(128), self._id(64)
        rows = 1 if rng.random() < 0.9 else rng.randint(2, 8)
        truth = [rng.choice(self.classes) for _ in range(rows)]
        borderline = [rng.random() < 0.03 for _ in range(rows)]
        features = [rng.choice(self.features) for _ in range(rows)]
        request = orjson.dumps(
            {
                "model_name": "breast-cancer",
                "request_id": request_id,
                "inputs": [
                    {
                        "name": "features",
                        "dtype": "DATA_TYPE_FP64",
                        "shape": [str(rows), "30"],
                        "contents": {"fp64_contents": [v for row in features for v in row]},
                    }
                ],
            }
        ).decode()

        never_reached = rng.random() < 0.0005  # e.g. RESOURCE_EXHAUSTED before production
        roll = rng.random()
        prod_code = 14 if roll < 0.003 else 3 if roll < 0.005 else 0
        prod_latency = rng.lognormvariate(math.log(4.0), 0.35) + 0.2 * rows
        if prod_code == 14:
            prod_latency = rng.uniform(0.2, 1.0)
        prod_labels = [
            rng.choice(self.classes)
            if b
            else (t if rng.random() < args.production_accuracy else self._other(t))
            for t, b in zip(truth, borderline, strict=True)
        ]
        prod_probs = self._probabilities(prod_labels, 0.5)

        sampled: list[str] = []
        dropped: list[str] = []
        sampled_out: list[str] = []
        if not never_reached:
            if rng.random() >= args.shadow_sample:
                sampled_out.append(CANDIDATE)
            elif rng.random() < 0.002:
                dropped.append(CANDIDATE)
            else:
                sampled.append(CANDIDATE)
            if rng.random() < args.reference_sample:
                sampled.append(REFERENCE)
            else:
                sampled_out.append(REFERENCE)

        proxy_end = start + int((prod_latency + 0.3) * 1e6)
        proxy_span: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": proxy_id,
            "flags": 256,
            "name": f"{SERVICE}/{METHOD}",
            "kind": 2,
            "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(proxy_end),
            "attributes": _attributes(
                {
                    "rpc.system": "grpc",
                    "rpc.service": SERVICE,
                    "rpc.method": METHOD,
                    "rpc.grpc.status_code": 8 if never_reached else prod_code,
                    "shadow.role": "proxy",
                    "shadow.request_id": request_id,
                    "shadow.request.size": len(request),
                    "shadow.production": "" if never_reached else PRODUCTION,
                    "shadow.sampled": sampled,
                    "shadow.dropped": dropped,
                    "shadow.sampled_out": sampled_out,
                    "server.port": 50051,
                    "client.address": "10.0.1.7",
                    "client.port": 41230,
                    "rpc.grpc.request.metadata.user-agent": ["grpc-python-asyncio/1.85.3"],
                }
            ),
            "events": [],
            "status": {},
        }
        if args.payloads:
            proxy_span["events"].append(
                self._event("request", start, request, "predict.v1.PredictRequest")
            )
        self._record(proxy_end, proxy_span)
        if never_reached:
            return

        prod_start = start + 200_000
        prod_end = prod_start + int(prod_latency * 1e6)
        prod_ok = prod_code == 0
        prod_reply = (
            self._reply(request_id, "logreg-v1", prod_labels, prod_probs) if prod_ok else None
        )
        self._record(
            proxy_end,
            self._backend_span(
                trace_id,
                proxy_id,
                "production",
                PRODUCTION,
                request_id,
                prod_start,
                prod_end,
                prod_code,
                prod_reply,
                {"shadow.predicted_labels": prod_labels} if prod_ok else {},
            ),
        )
        prod = (prod_code, prod_labels, prod_probs, prod_latency)

        for name in sampled:
            if rng.random() < 0.0001:
                continue  # the recorder's queue was full: this span is lost
            if name == REFERENCE:
                code = prod_code
                latency = rng.lognormvariate(math.log(4.0), 0.35) + 0.2 * rows
                labels = [
                    rng.choice(self.classes) if b else p
                    for p, b in zip(prod_labels, borderline, strict=True)
                ]
                noisy = rng.random() < 0.1 or any(borderline)
                probs = [p + rng.uniform(1e-5, 1e-4) if noisy else p for p in prod_probs]
                model = "logreg-v1"
            else:
                roll = rng.random()
                code = 3 if prod_code == 3 else 4 if roll < 0.004 else 13 if roll < 0.007 else 0
                latency = rng.lognormvariate(math.log(5.5), 0.45) + 0.3 * rows
                if rng.random() < 0.005:
                    latency *= 8
                if code == 4:
                    latency = 2000.0
                labels = []
                for t, p, b in zip(truth, prod_labels, borderline, strict=True):
                    if b:
                        labels.append(rng.choice(self.classes))
                    elif rng.random() < args.shadow_flip:
                        labels.append(t if rng.random() < 0.7 else self._other(t))
                    else:
                        labels.append(p)
                probs = self._probabilities(labels, 0.55)
                model = "gboost-v2"
            ok = code == 0
            reply = self._reply(request_id, model, labels, probs) if ok else None
            extra: dict[str, Any] = {"shadow.predicted_labels": labels} if ok else {}
            extra.update(self._compare(prod, (code, labels, probs, latency)))
            shadow_start = start + 250_000
            shadow_end = shadow_start + int(latency * 1e6)
            self._record(
                shadow_end,
                self._backend_span(
                    trace_id,
                    proxy_id,
                    "reference" if name == REFERENCE else "shadow",
                    name,
                    request_id,
                    shadow_start,
                    shadow_end,
                    code,
                    reply,
                    extra,
                ),
            )

        if rng.random() < args.feedback:
            delay = int(rng.uniform(5, 60) * 1e9)
            self.feedback_due.append((start + delay, request_id, truth, trace_id, proxy_id))

    def feedback(self, now: int) -> None:
        """Labels submitted in one batch: every call whose label is known by now."""
        due = [f for f in self.feedback_due if f[0] <= now]
        if not due:
            return
        self.feedback_due = [f for f in self.feedback_due if f[0] > now]
        trace_id, rpc_id = self._id(128), self._id(64)
        for _, request_id, labels, call_trace, call_span in due:
            self._record(
                now,
                {
                    "traceId": trace_id,
                    "spanId": self._id(64),
                    "parentSpanId": rpc_id,
                    "flags": 256,
                    "name": "feedback",
                    "kind": 1,
                    "startTimeUnixNano": str(now),
                    "endTimeUnixNano": str(now + 1000),
                    "attributes": _attributes(
                        {
                            "shadow.role": "feedback",
                            "shadow.request_id": request_id,
                            "shadow.labels": labels,
                        }
                    ),
                    "links": [{"traceId": call_trace, "spanId": call_span, "flags": 256}],
                    "status": {},
                },
            )

    def write(self, out: Path, progress: bool) -> tuple[int, int]:
        args = self.args
        start = 1_780_000_000 * 10**9
        spans = lines = 0
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal lines
            document = {
                "resourceSpans": [
                    {"resource": _RESOURCE, "scopeSpans": [{"scope": _SCOPE, "spans": batch}]}
                ]
            }
            sink.write(orjson.dumps(document))
            sink.write(b"\n")
            lines += 1
            batch.clear()

        def drain(until: int) -> None:
            nonlocal spans
            while self.pending and self.pending[0][0] <= until:
                batch.append(heapq.heappop(self.pending)[2])
                spans += 1
                if len(batch) == SPANS_PER_LINE:
                    flush()

        gap_ns = 1e9 / args.rate
        now = start
        with out.open("wb") as sink:
            for index in tqdm(range(args.calls), disable=not progress, unit="call"):
                now += int(self.rng.expovariate(1.0) * gap_ns) + 1
                self.call(index + 1, now)
                if index % args.feedback_every == 0:
                    self.feedback(now)
                drain(now)
            now += 120 * 10**9
            self.feedback(now)
            drain(now)
            if batch:
                flush()
        return spans, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="calls to simulate")
    parser.add_argument("--out", type=Path, required=True, help="traces file to write")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second (500)")
    parser.add_argument("--classes", type=int, default=2, help="number of labels (2)")
    parser.add_argument("--shadow-sample", type=float, default=0.9, help="candidate's rate")
    parser.add_argument("--reference-sample", type=float, default=0.2, help="reference's rate")
    parser.add_argument("--shadow-flip", type=float, default=0.03, help="candidate differs")
    parser.add_argument("--production-accuracy", type=float, default=0.93)
    parser.add_argument("--feedback", type=float, default=0.7, help="share of calls labelled")
    parser.add_argument(
        "--feedback-every", type=int, default=2000, help="calls between feedback batches"
    )
    parser.add_argument(
        "--no-payloads", dest="payloads", action="store_false", help="no payload events"
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    spans, lines = Generator(args).write(args.out, progress=sys.stderr.isatty())
    size = args.out.stat().st_size
    print(
        f"wrote {args.calls} calls, {spans} spans, {lines} lines, {size / 1e6:.1f} MB "
        f"to {args.out} in {time.monotonic() - began:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
