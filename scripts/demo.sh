#!/usr/bin/env bash
# The main job on the embedded default (SoftHSM): installs what it needs (scripts/setup.sh),
# then runs the whole flow once and prints an account of it (python -m demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
exec .venv/bin/python -m demo "$@"
