#!/usr/bin/env bash
# Runs every test. Installs what the tests need first (scripts/setup.sh): SoftHSM,
# the pinned oidc-provider, the Python virtual environment. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
.venv/bin/python -m ruff check --quiet signer/src client/src tests scripts
exec .venv/bin/python -m pytest "$@"
