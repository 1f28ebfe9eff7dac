#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up .venv and the servers the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/dockerd.sh   # a Docker engine for the docker runtime tests, started if none runs
exec .venv/bin/python -m pytest "$@"
