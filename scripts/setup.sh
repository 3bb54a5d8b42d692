#!/usr/bin/env bash
# Installs everything the demo and the tests need, on a machine that has none of it:
#   - Debian packages: softhsm2 (the PKCS#11 token for development and tests), nodejs + npm,
#     prometheus (its promtool tests the shipped alert rules)
#   - .venv/: both distributions (editable) and the test tools, pinned by requirements/constraints.txt
#   - authserver/node_modules: the pinned npm oidc-provider (package-lock.json)
# Idempotent and quick when nothing changed. A tool that cannot be installed is an error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages -----------------------------------------------------------
missing=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in softhsm2-util node npm python3 promtool; do
  command -v "$tool" >/dev/null || { echo "[setup] ERROR: $tool is still missing" >&2; exit 1; }
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || {
  echo "[setup] ERROR: Node.js 20 or newer is required for oidc-provider (found $(node --version));" \
       "install it (e.g. Debian trixie's nodejs, or NodeSource) and run again" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "[setup] ERROR: Python 3.11 or newer is required (found $(python3 --version))" >&2; exit 1; }

# 2. Python virtual environment -----------------------------------------------
stamp_py=$(cat requirements/constraints.txt requirements/dev.txt client/pyproject.toml signer/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp_py" ]; then
  say "creating .venv and installing pinned Python packages"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt \
    -r requirements/dev.txt -e ./client -e './signer[pkcs11,aws,azure]'
  echo "$stamp_py" > .venv/.setup-stamp
fi

# 3. The local authorization server (npm oidc-provider, pinned) -----------------
stamp_npm=$(sha256sum authserver/package-lock.json | cut -c1-16)
if [ "$(cat authserver/node_modules/.setup-stamp 2>/dev/null)" != "$stamp_npm" ]; then
  say "installing the pinned npm packages of authserver/"
  npm ci --prefix authserver --no-audit --no-fund --loglevel=error >/dev/null
  echo "$stamp_npm" > authserver/node_modules/.setup-stamp
fi
say "ready"
