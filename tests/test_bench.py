"""The benchmark runs end to end and reports every figure; it is not a test of speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    result = json.loads(out.read_text())
    targets = result["targets"]
    for target in ("direct", "proxy"):
        for metric in ("p50_ms", "p99_ms", "rps"):
            value = targets[target][metric]
            assert isinstance(value, float | int) and value > 0, (target, metric, value)
    assert targets["proxy"]["cpu_us_per_request"]["proxy"] > 0
