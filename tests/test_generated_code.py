"""The committed code in proxy/gen/ is what scripts/gen_protos.py makes from protos/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED = REPO_ROOT / "proxy" / "gen"
HOW_TO_FIX = "run `.venv/bin/python scripts/gen_protos.py` and commit proxy/gen/"


def _generated_files(folder: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in {".py", ".pyi"}
    }


def test_committed_generated_code_is_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 0, f"scripts/gen_protos.py failed:\n{result.stderr}"
    fresh = _generated_files(tmp_path / "proxy" / "gen")
    committed = _generated_files(COMMITTED)
    assert "predict_pb2.py" in fresh

    missing = sorted(fresh.keys() - committed.keys())
    assert not missing, f"proxy/gen/ lacks {missing}; {HOW_TO_FIX}"
    extra = sorted(committed.keys() - fresh.keys())
    assert not extra, f"proxy/gen/ holds {extra}, made from no proto in protos/; delete them"
    stale = [name for name, content in fresh.items() if committed[name] != content]
    assert not stale, f"proxy/gen/{', '.join(stale)} differ from protos/; {HOW_TO_FIX}"
