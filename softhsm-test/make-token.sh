#!/usr/bin/env bash
# The SoftHSM kit: a project-local token with the demo's two signing keys and a sample
# signer configuration, all under softhsm-test/.state/ (gitignored).
#
#   softhsm-test/make-token.sh [--force] [--issuer URL]
#
#   --issuer URL  issuer of [profiles.demo] in signer.toml (default http://127.0.0.1:4000;
#                 on a loopback address: the kit's listener is plaintext, and insecure = true
#                 signs only for a local issuer - docs/security.md, "Insecure mode")
#   --force       delete the token and everything in .state/, and make them again
#
# Idempotent: when the token and its keys exist it only rewrites signer.toml (so --issuer
# can change) and prints the assertion key's JWK again. Creates:
#
#   .state/softhsm2.conf   SoftHSM configuration (token store .state/tokens/)
#   .state/user.pin        user PIN, 0600        .state/so.pin   SO-PIN, 0600
#   .state/backend.toml    [backends.pkcs11] only (for `helseid-signer keys create --config`)
#   .state/keys.json       what `keys create` printed for each key
#   .state/signer.toml     a full signer configuration using both keys
#   .state/env             the line `export SOFTHSM2_CONF=...`
#
# SoftHSM finds its token store through SOFTHSM2_CONF, read when the module is first
# loaded: whoever runs the signer with this token must export it first, e.g.
#   . softhsm-test/.state/env && .venv/bin/helseid-signer serve --config softhsm-test/.state/signer.toml
#
# Keys: demo-assertion (RSA-2048, PS256) signs client assertions; demo-dpop (EC P-256,
# ES256) signs DPoP proofs. Both are generated inside the token, non-extractable.
# Development only: the PINs are random, but pass through softhsm2-util's command line.

set -euo pipefail
umask 077

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$KIT")"
STATE="$KIT/.state"
MODULE="${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
LABEL="helseid-dev"
CLIENT_ID="helseid-signer-demo"
ISSUER="http://127.0.0.1:4000"
SIGNER="$ROOT/.venv/bin/helseid-signer"
PYTHON="$ROOT/.venv/bin/python"
FORCE=0

die() { echo "make-token.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1; shift ;;
    --issuer) [ $# -ge 2 ] || die "--issuer needs a URL"; ISSUER="$2"; shift 2 ;;
    --issuer=*) ISSUER="${1#--issuer=}"; shift ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# The issuer goes into a TOML string: refuse anything that could break out of it.
case "$ISSUER" in
  *[\"\\[:space:]]*|"") die "--issuer '$ISSUER' must be a URL without quotes, backslashes or spaces" ;;
esac
command -v softhsm2-util >/dev/null || die "softhsm2-util not found: apt-get install softhsm2 (or run scripts/setup.sh)"
[ -f "$MODULE" ] || die "PKCS#11 module $MODULE not found (set SOFTHSM2_MODULE to its path)"
[ -x "$SIGNER" ] || die "$SIGNER not found: run scripts/setup.sh first"

export SOFTHSM2_CONF="$STATE/softhsm2.conf"

wipe_state() {
  case "$STATE" in */softhsm-test/.state) rm -rf -- "$STATE" ;; *) die "refusing to delete $STATE" ;; esac
}

complete=0
[ -f "$STATE/keys.json" ] && [ -f "$SOFTHSM2_CONF" ] && [ -f "$STATE/user.pin" ] && complete=1
if [ "$FORCE" = 1 ] || [ "$complete" = 0 ]; then
  wipe_state
  # A run that stops half-way leaves nothing behind: the next run starts afresh.
  trap 'echo "make-token.sh: failed; removing the partial $STATE" >&2; wipe_state' ERR

  mkdir -p "$STATE/tokens"
  cat >"$SOFTHSM2_CONF" <<EOF
# SoftHSM configuration of the helseid-signer kit (softhsm-test/make-token.sh).
directories.tokendir = $STATE/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
  random_pin() { od -An -tx1 -N12 /dev/urandom | tr -d ' \n'; }
  PIN="$(random_pin)"
  SO_PIN="$(random_pin)"
  printf '%s' "$PIN" >"$STATE/user.pin"
  printf '%s' "$SO_PIN" >"$STATE/so.pin"
  chmod 600 "$STATE/user.pin" "$STATE/so.pin"

  softhsm2-util --init-token --free --label "$LABEL" --pin "$PIN" --so-pin "$SO_PIN" >/dev/null

  cat >"$STATE/backend.toml" <<EOF
# Backend settings for \`helseid-signer keys create --config\` (written by make-token.sh).
[backends.pkcs11]
module = "$MODULE"
pin_file = "user.pin"
EOF

  "$SIGNER" --log-level warning keys create --config "$STATE/backend.toml" \
    --uri "pkcs11:token=$LABEL;object=demo-assertion" --spec RSA-2048 --alg PS256 >"$STATE/assertion.json"
  "$SIGNER" --log-level warning keys create --config "$STATE/backend.toml" \
    --uri "pkcs11:token=$LABEL;object=demo-dpop" --spec EC-P256 --alg ES256 >"$STATE/dpop.json"
  "$PYTHON" - "$STATE" <<'EOF'
import json, pathlib, sys
state = pathlib.Path(sys.argv[1])
keys = {name: json.loads((state / f"{part}.json").read_text()) for name, part in
        (("demo-assertion", "assertion"), ("demo-dpop", "dpop"))}
(state / "keys.json").write_text(json.dumps(keys, indent=2) + "\n")
for part in ("assertion", "dpop"):
    (state / f"{part}.json").unlink()
EOF
  trap - ERR
  created=1
else
  created=0
fi

cat >"$STATE/signer.toml.new" <<EOF
# helseid-signer configuration for the SoftHSM kit (written by softhsm-test/make-token.sh;
# rewritten on every run - copy it elsewhere to change it). See softhsm-test/signer.example.toml.
#
# Needs SoftHSM's configuration in the environment:
#   export SOFTHSM2_CONF=$SOFTHSM2_CONF

[server]
listen = "127.0.0.1:50051"
insecure = true                      # plaintext gRPC: development only

[backends.pkcs11]
module = "$MODULE"
pin_file = "user.pin"                # relative to this file

[keys.demo-assertion]
uri = "pkcs11:token=$LABEL;object=demo-assertion"
alg = "PS256"

[keys.demo-dpop]
uri = "pkcs11:token=$LABEL;object=demo-dpop"
alg = "ES256"

[profiles.demo]
client_id = "$CLIENT_ID"
issuer = "$ISSUER"
assertion_key = "demo-assertion"
dpop_key = "demo-dpop"
EOF
printf 'export SOFTHSM2_CONF=%s\n' "$SOFTHSM2_CONF" >"$STATE/env"

# Load the whole configuration and resolve both keys in the token before it replaces the
# old one: a bad --issuer or a broken token is reported here, not when the signer starts.
if ! "$SIGNER" --log-level warning keys jwk --config "$STATE/signer.toml.new" >/dev/null; then
  rm -f -- "$STATE/signer.toml.new"
  die "the new signer.toml does not load (see above); fix the argument, or run with --force for a new token"
fi
mv -f -- "$STATE/signer.toml.new" "$STATE/signer.toml"

if [ "$created" = 1 ]; then
  echo "Created SoftHSM token '$LABEL' in $STATE with keys demo-assertion (PS256) and demo-dpop (ES256)."
else
  echo "SoftHSM token '$LABEL' in $STATE already exists (--force makes a new one); signer.toml rewritten."
fi
echo "Public key of demo-assertion (register this JWK for client $CLIENT_ID):"
"$PYTHON" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["demo-assertion"], indent=2))' \
  "$STATE/keys.json"
echo "Configuration: $STATE/signer.toml"
echo "Before running the signer with this token:"
echo "  export SOFTHSM2_CONF=$SOFTHSM2_CONF      (or: . softhsm-test/.state/env)"
