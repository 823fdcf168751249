#!/usr/bin/env bash
# GPU smoke check of a whole install (see tests/gpu/check.py): `make gpu-check`, or
#   bash tests/gpu/check.sh [--device cpu] [--steps N] [--out summary.json]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" tests/gpu/check.py "$@"
