#!/usr/bin/env bash
# The test command: make sure ./.venv is set up, then run the whole suite on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --install-only || exit 1
# One pytest worker per core (pytest-xdist), a test file kept on one worker (its module fixtures are built once,
# tests/cli/test_readme.py's commands run in README order); tests/conftest.py puts the slow files first.
# BLENS_TEST_WORKERS=0 runs in this one process.
.venv/bin/python -m pytest -q -n "${BLENS_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
