#!/usr/bin/env bash
# Set up ./.venv, install the project and the DuckDB extensions, and (unless --install-only) run the main job on the
# embedded default model: SmolLM2-135M on a CounterFact sample, into ./warehouse, ending with a summary table.
#   bash scripts/setup.sh                  # set up + main job
#   bash scripts/setup.sh --install-only   # set up only (used by scripts/test.sh)
# Env: DATA (default ../shared/data/counterfact/counterfact-edit-1k.json), LIMIT (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# torch first, pinned to the CPU build here (pip's find-links has it); a range alone could pull a
# multi-GB CUDA build. With torch present, the project's range installs nothing more for it.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch"
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
if ! .venv/bin/python -c "import blens.extract, blens.store, blens.queries, blens.flows, blens.edit, blens.publish, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.blens-installed ]; then
  echo "[setup] installing the project and its pinned dependencies"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import blens.extract, blens.store, blens.flows, blens.edit, blens.publish, prefect, pytest"
  touch .venv/.blens-installed
fi

# The DuckLake/SQLite extensions into DuckDB's standard directory (~/.duckdb/extensions/v1.4.4/<platform>/), so
# `LOAD ducklake` works offline in any DuckDB 1.4.4 session on this machine (`blens init-sql`'s SQL needs it).
.venv/bin/python scripts/install_duckdb_extensions.py

[ "${1:-}" = "--install-only" ] && exit 0

DATA=${DATA:-../shared/data/counterfact/counterfact-edit-1k.json}
LIMIT=${LIMIT:-200}
echo "[setup] main job: blens extract --data $DATA --limit $LIMIT (embedded SmolLM2-135M -> ./warehouse)"
.venv/bin/blens extract --data "$DATA" --limit "$LIMIT"
