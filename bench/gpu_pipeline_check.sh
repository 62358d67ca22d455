#!/usr/bin/env bash
# The real extraction job (plan_run, background commits, DuckLake commits) on CUDA against the same job on
# CPU: bench/gpu_pipeline_check.py; docs/gpu.md. Needs torch, transformers, pyarrow, numpy, duckdb (+ the
# duckdb-ext-ducklake/sqlite wheels) and pydantic; no prefect, no datasets, no network.
#
#   bash bench/gpu_pipeline_check.sh --tokenizer DIR --data counterfact-edit-1k.json
#   bash bench/gpu_pipeline_check.sh ... --candidate-device cpu      # a rehearsal without a GPU
#
# As bench/gpu_check.sh, the project is not installed: blens.extract, blens.store and blens.queries are
# mapped onto their folders through a temporary directory of symlinks (pyproject.toml's package-dir).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/blens"
: > "$T/blens/__init__.py"
for pkg in extract store queries; do ln -s "$REPO/$pkg" "$T/blens/$pkg"; done
ln -s "$REPO/bench" "$T/bench"
PYTHONPATH="$T${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/bench/gpu_pipeline_check.py" "$@"
