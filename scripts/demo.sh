#!/usr/bin/env bash
# The demo: a production and a candidate model behind the proxy, every call traced.
# Creates .venv and installs on first use. Arguments go to scripts/demo.py (--help).
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec "$PY" "$ROOT/scripts/demo.py" "$@"
