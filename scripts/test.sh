#!/usr/bin/env bash
# Run the whole test suite (lint, types, tests). Creates .venv and installs on first use.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k sampling -x
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
echo "[test] ruff" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[test] mypy" >&2
"$VENV/bin/mypy" proxy model_servers
echo "[test] pytest" >&2
exec "$PY" -m pytest "$@"
