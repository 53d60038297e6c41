"""The whole path with real scikit-learn model servers, and the demo as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from grpc import aio

from model_servers import ModelServerOptions, start_model_server
from model_servers.models import heldout
from proxy.compare.agreement import labels_agree
from proxy.compare.traces import read_calls
from proxy.gen import predict_pb2
from proxy.server import ProxyServer
from proxy.tensors import to_tensor
from tests.conftest import proxy_settings

ROOT = Path(__file__).resolve().parent.parent
PREDICT = "/predict.v1.PredictionService/Predict"


async def test_real_models_through_the_proxy_match_direct_calls_and_are_recorded(tmp_path):
    production = await start_model_server(ModelServerOptions(model="logreg-v1"))
    candidate = await start_model_server(ModelServerOptions(model="gboost-v2"))
    traces = tmp_path / "traces.jsonl"
    proxy = ProxyServer(
        proxy_settings(
            f"production={production.address}",
            [f"candidate={candidate.address}"],
            exporters="file",
            traces_file=str(traces),
        )
    )
    await proxy.start()
    features, _ = heldout()
    rows = 60
    expected_agreement = 0
    try:
        async with (
            aio.insecure_channel(proxy.address) as through,
            aio.insecure_channel(production.address) as to_production,
            aio.insecure_channel(candidate.address) as to_candidate,
        ):
            for i in range(rows):
                request = predict_pb2.PredictRequest(
                    model_name="breast-cancer",
                    request_id=f"row-{i}",
                    inputs=[to_tensor("features", features[i : i + 1])],
                ).SerializeToString()
                proxied = await through.unary_unary(PREDICT)(request)
                direct = await to_production.unary_unary(PREDICT)(request)
                assert proxied == direct  # byte for byte
                shadow_direct = await to_candidate.unary_unary(PREDICT)(request)
                label = predict_pb2.PredictResponse.FromString(direct).outputs[0]
                shadow_label = predict_pb2.PredictResponse.FromString(shadow_direct).outputs[0]
                expected_agreement += (
                    label.contents.int64_contents == shadow_label.contents.int64_contents
                )
    finally:
        await proxy.stop()
        await production.stop()
        await candidate.stop()

    # Production and the candidate each got every request once through the proxy (plus the
    # direct calls above), with the same bytes.
    assert production.calls == 2 * rows and candidate.calls == 2 * rows
    calls = read_calls(traces)
    assert [c.request_id for c in calls] == [f"row-{i}" for i in range(rows)]
    agreed = 0
    for call in calls:
        assert call.production is not None and call.production.status_code == 0
        shadow = call.shadows["candidate"]
        assert shadow.status_code == 0
        assert call.production.reply is not None and shadow.reply is not None
        agreed += labels_agree(call.production.reply, shadow.reply)
    assert agreed == expected_agreement
    assert 0 < agreed < rows  # the two models really differ on these rows


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--requests",
            "40",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "requests sent               40" in out
    assert "production errors           0" in out
    assert "completed 40, failed 0, dropped 0" in out
    assert "agreement with production" in out
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in out
    # The demo ends with the comparison report, true labels joined from the Feedback service.
    assert "Shadow report:" in out and "Verdict" in out
    assert "40 request ids from feedback spans" in out
    assert (tmp_path / "report.html").read_text().count("<svg") >= 3
    calls = read_calls(tmp_path / "traces.jsonl")
    assert len(calls) == 40
    assert all(c.production and "candidate" in c.shadows for c in calls)


def test_merge_traces_makes_one_document_for_the_jaeger_upload(tmp_path):
    lines = [
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "a"}, {"spanId": "b"}]}]}]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "c"}]}]}]},
    ]
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "t.json"
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "merge-traces", str(traces), "-o", str(out)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 3 spans" in result.stdout
    merged = json.loads(out.read_text())
    assert [
        s["spanId"] for r in merged["resourceSpans"] for sc in r["scopeSpans"] for s in sc["spans"]
    ] == ["a", "b", "c"]
    traces.write_text("not json\n")
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "merge-traces", str(traces), "-o", str(out)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "t.jsonl:1: not JSON" in bad.stderr
