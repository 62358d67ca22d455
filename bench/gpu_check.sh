#!/usr/bin/env bash
# The device check: CPU vs CUDA equality and paper-sized throughput (bench/gpu_check.py; docs/gpu.md).
#
#   bash bench/gpu_check.sh          # on a CUDA machine: < 8 minutes
#   bash bench/gpu_check.sh --cpu    # anywhere: the same checks on CPU with small shapes, < 10 minutes
#
# Needs only a Python with torch, transformers, pyarrow and numpy: $PYTHON if set, else the checkout's
# .venv/bin/python if there is one, else python3. The project is not installed: blens.extract is mapped
# onto extract/ (blens.run onto run/, for its overlap writer; bench/ onto bench/) through a temporary directory of symlinks (the package-dir layout
# of pyproject.toml), which is the only path given to Python; the repository root is not on it (its blens/
# is the CLI), so nothing outside the extraction core can be imported.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/blens"
: > "$T/blens/__init__.py"
SCRIPT=gpu_check.py PACKAGES="extract run"  # run: the overlap writer (stdlib only)
if [ "${1:-}" = "--pipeline" ]; then  # bench/gpu_pipeline_check.sh: the real job, so the store too
  SCRIPT=gpu_pipeline_check.py PACKAGES="extract store queries run"
  shift
fi
for pkg in $PACKAGES; do ln -s "$REPO/$pkg" "$T/blens/$pkg"; done
ln -s "$REPO/blens/errors.py" "$T/blens/errors.py"  # the UserError base the domain errors subclass (no imports)
ln -s "$REPO/bench" "$T/bench"
PYTHONPATH="$T${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/bench/$SCRIPT" "$@"
