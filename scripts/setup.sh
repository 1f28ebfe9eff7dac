#!/usr/bin/env bash
# Set up a fresh machine for mesh: a virtualenv in .venv with mesh installed.
#   scripts/setup.sh         mesh and its runtime dependencies
#   scripts/setup.sh test    plus the test extras and the Debian packages the tests use
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=${1:-}
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ "$want_tests" = test ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
else
  .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi

if [ "$want_tests" = test ]; then
  missing=()
  for pair in redis-server:redis-server wrk:wrk nginx:nginx-light dockerd:docker.io \
              iptables:iptables debootstrap:debootstrap chromium:chromium; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "missing Debian packages (install them as root): ${missing[*]}" >&2
    fi
  fi
fi
