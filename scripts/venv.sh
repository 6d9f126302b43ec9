#!/usr/bin/env bash
# Creates .venv with the Python packages the interop checks and peer benchmarks
# need (duckdb, pyarrow, polars), from the package index. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import duckdb, pyarrow, polars' 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
fi
