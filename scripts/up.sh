#!/usr/bin/env bash
# Run the default mesh (mesh.toml at the repository root) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/mesh up "$@"
