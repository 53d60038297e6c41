"""The worker-scaling benchmark runs end to end and reports every figure; not a test of speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_quick_worker_scaling_reports_every_worker_count(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    markdown = tmp_path / "workers.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_workers.py"),
            "--quick",
            "--json",
            str(out),
            "--write-markdown",
            str(markdown),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = json.loads(out.read_text())
    assert [row["workers"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["rps"] > 0 and row["proxy_cpu_us"] > 0 and row["proxy_cores"] > 0, row
        # Every call h2load finished reached production, and the shadow got copies.
        assert row["calls_ok"], row
    for run in result["runs"]:
        assert run["received"]["production"] >= run["done"] > 0, run
    assert "| 2 |" in markdown.read_text()


def test_pinned_plan_gives_each_role_its_own_cores() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_workers

    args = bench_workers.build_parser().parse_args([])
    bench_workers._plan(args, range(16))
    proxy, loadgen, backends = args.proxy_cpus, args.loadgen_cpus, args.backend_cpus
    assert len(proxy) == 6 and len(loadgen) == 2 and len(backends) == 8
    assert not set(proxy) & set(loadgen) and not set(proxy) & set(backends)
    assert args.worker_counts == [1, 2, 4, 6]
    assert args.connections % args.threads == 0

    unpinned = bench_workers.build_parser().parse_args(["--workers", "3,1"])
    bench_workers._plan(unpinned, range(2))
    assert unpinned.proxy_cpus is None and unpinned.worker_counts == [1, 3]
