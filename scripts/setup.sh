#!/usr/bin/env bash
# Installs everything the demo and the tests need, on a machine that has none of it:
#   - Debian packages: softhsm2 (the PKCS#11 token for development and tests), nodejs + npm,
#     openssl (the mTLS recipe of docs/integration.md is run by the tests)
#     prometheus (its promtool tests the shipped alert rules)
#   - .venv/: both distributions (editable) and the test tools, pinned by requirements/constraints.txt
#   - authserver/, examples/node-host/, tools/ node_modules: pinned npm packages (package-lock.json):
#     oidc-provider, @grpc/grpc-js + @grpc/proto-loader, buf
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
command -v openssl >/dev/null || missing+=(openssl)
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in softhsm2-util node npm openssl python3 promtool; do
  command -v "$tool" >/dev/null || { echo "[setup] ERROR: $tool is still missing" >&2; exit 1; }
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || {
  echo "[setup] ERROR: Node.js 20 or newer is required for oidc-provider (found $(node --version));" \
       "install it (e.g. Debian trixie's nodejs, or NodeSource) and run again" >&2; exit 1; }
[ "$node_major" -ge 22 ] || echo "[setup] note: Node.js $(node --version) runs the local authorization server," \
  "but oidc-provider supports only Node.js 22 LTS or later (it warns 'Unsupported runtime'); use 22 where you can" >&2
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "[setup] ERROR: Python 3.11 or newer is required (found $(python3 --version))" >&2; exit 1; }

# 2. Python virtual environment -----------------------------------------------
stamp_py=$(cat requirements/constraints.txt requirements/dev.txt client/pyproject.toml signer/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp_py" ]; then
  say "creating .venv and installing pinned Python packages"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt \
    -r requirements/dev.txt -e './client[requests]' -e './signer[pkcs11,aws,azure]'
  echo "$stamp_py" > .venv/.setup-stamp
fi

# 3. Pinned npm packages (package-lock.json each): the local authorization server
#    (oidc-provider), the Node example host (@grpc/grpc-js, @grpc/proto-loader) and the
#    tools CI runs (buf, for proto lint and breaking-change checks) ---------------------
for dir in authserver examples/node-host tools; do
  stamp_npm=$(sha256sum "$dir/package-lock.json" | cut -c1-16)
  if [ "$(cat "$dir/node_modules/.setup-stamp" 2>/dev/null)" != "$stamp_npm" ]; then
    say "installing the pinned npm packages of $dir/"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
    echo "$stamp_npm" > "$dir/node_modules/.setup-stamp"
  fi
done
tools/node_modules/.bin/buf --version >/dev/null || { echo "[setup] ERROR: buf does not run" >&2; exit 1; }
say "ready"
