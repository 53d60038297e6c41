"""The benchmark runs end to end and reports every figure; it is not a test of speed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    markdown = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--json",
            str(out),
            "--write-markdown",
            str(markdown),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    result = json.loads(out.read_text())
    targets = result["targets"]
    skipped = {item["what"]: item for item in result["skipped"]}
    expected = ["direct", "aio-forwarder", "proxy", "proxy-no-recording"]
    if importlib.util.find_spec("envoy") is not None:
        expected.append("envoy")
    else:
        # A clean machine without the bench extra: said so, with the way to install it.
        assert "pip install" in skipped["envoy"]["how"], skipped
        assert "skipped" in done.stderr and "envoy" not in targets
    assert sorted(targets) == sorted(expected)
    for target in expected:
        figures = targets[target]
        for metric in ("p50_ms", "p99_ms", "rps"):
            value = figures[metric]
            assert isinstance(value, float | int) and value > 0, (target, metric, value)
        if target != "direct":
            # The proxy's or Envoy's own process: its CPU per request and its peak RSS.
            assert figures["server_cpu_us_per_request"] > 0, (target, figures)
            assert figures["peak_rss_mb"] > 0, (target, figures)
    assert targets["proxy"]["cpu_us_per_request"]["proxy"] > 0
    # h2load, where it is installed, else the Python client, and the report says which.
    assert result["load_generator"] == ("h2load" if shutil.which("h2load") else "grpc")
    assert "h2load" in skipped or result["load_generator"] == "h2load"
    assert result["goals"], result
    assert "| latency p50, concurrency 1 (ms) |" in markdown.read_text()
