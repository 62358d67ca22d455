#!/usr/bin/env bash
# The test command: make sure ./.venv is set up, then run the whole suite on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --install-only || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
