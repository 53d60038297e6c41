"""The demo over the Open Inference Protocol (KServe v2), as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from proxy.compare.traces import read_calls

ROOT = Path(__file__).resolve().parent.parent


def test_demo_over_v2_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--protocol", "v2",
         "--requests", "20", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "over the Open Inference Protocol (v2)" in out
    assert "requests sent               20" in out
    assert "production errors           0" in out
    assert "completed 20, failed 0, dropped 0" in out
    # Rows 4 and 15 are two the models disagree on (see the README's sample output).
    assert "agreement with production   18/20 (90.0%) same predicted label" in out
    assert "inference.GRPCInferenceService/ModelInfer 20" in out
    # True labels went through the Feedback service under the ModelInfer ids.
    assert "20 request ids from feedback spans; 20 calls labelled" in out
    calls = read_calls(tmp_path / "traces.jsonl")
    assert sorted(c.request_id for c in calls) == [f"demo-{i:04d}" for i in range(20)]
    for call in calls:
        assert call.production is not None and call.production.reply is not None
        (label,) = [o for o in call.production.reply["outputs"] if o["name"] == "label"]
        assert label["raw"] is True and len(label["contents"]["int64_contents"]) == 1
    model_log = (tmp_path / "production.log").read_text()
    assert "stopped; 20 ModelInfer calls received" in model_log
