#!/bin/sh
# Debian packages the test suite drives, installed when absent:
#   chromium (+ driver, fonts)  tests/publish/test_report.py renders the report page in headless Chromium
#   postgresql                  tests/e2e/test_racing_writers.py starts its own server as a DuckLake catalog
# Each test skips, saying why, when its package is missing; CI installs both.
set -eu
need=""
[ -x /usr/bin/chromium ] || need="$need chromium chromium-driver fonts-dejavu-core"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$need postgresql"
if [ -z "$need" ]; then
  echo "test services present: $(/usr/bin/chromium --version 2>/dev/null), $(ls -d /usr/lib/postgresql/*/bin | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_test_services.sh: need root (or sudo) to apt-get install:$need" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
echo "installed:$need"
