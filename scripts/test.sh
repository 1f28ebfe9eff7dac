#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up .venv and the servers the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
