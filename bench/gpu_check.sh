#!/usr/bin/env bash
# The device check: CPU vs CUDA equality and paper-sized throughput (bench/gpu_check.py; docs/gpu.md).
#
#   bash bench/gpu_check.sh          # on a CUDA machine: < 8 minutes
#   bash bench/gpu_check.sh --cpu    # anywhere: the same checks on CPU with small shapes, < 10 minutes
#
# Needs only python3 with torch, transformers, pyarrow and numpy ($PYTHON picks the interpreter). The
# project is not installed: blens.extract is mapped onto extract/ (and bench/ onto bench/) through a
# temporary directory of symlinks (the package-dir layout of pyproject.toml), which is the only path
# given to Python; the repository root is not on it (its blens/ is the CLI), so nothing outside the
# extraction core can be imported.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/blens"
: > "$T/blens/__init__.py"
ln -s "$REPO/extract" "$T/blens/extract"
ln -s "$REPO/bench" "$T/bench"
PYTHONPATH="$T${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/bench/gpu_check.py" "$@"
