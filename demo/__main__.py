"""The main job, end to end on this machine (README command one):

1. the SoftHSM kit makes a token with a client-assertion key and a DPoP key
   (``softhsm-test/make-token.sh``; kept between runs in ``softhsm-test/.state/``);
2. the local HelseID-like authorization server (oidc-provider) starts, with the assertion
   key's public JWK registered - as a vendor uploads it in HelseID self-service;
3. ``helseid-signer serve`` starts on SoftHSM;
4. a DPoP-protected API standing in for DEFT starts (it verifies with jwcrypto);
5. the client library gets a DPoP-bound token (nonce retry included) and calls the API;
6. a readable account is printed: the decoded client assertion and DPoP proofs (headers
   and claims, never a token), the token type, the API's answers. Everything started is
   stopped again.

Run: ``python -m demo`` (after ``scripts/setup.sh``; ``scripts/demo.sh`` does both).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from demo.deft_api import DeftApi
from helseid_signer_client import DPoPAuth, SignerClient, TokenClient
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "softhsm-test"
STATE = KIT / ".state"
CLIENT_ID = "helseid-signer-demo"
SCOPE = "nhn:deft/api"
PROFILE = "demo"


def _decode(compact: str) -> tuple[dict, dict]:
    header, payload, _ = compact.split(".")
    return tuple(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in (header, payload))


def _show(title: str, compact: str) -> None:
    header, claims = _decode(compact)
    if "jwk" in header:
        header = dict(header, jwk={k: (v if len(v) < 24 else v[:20] + "...") for k, v in header["jwk"].items()})
    print(f"\n  {title}")
    print(f"    header: {json.dumps(header)}")
    print(f"    claims: {json.dumps(claims)}")


def _env() -> dict[str, str]:
    return {**os.environ, "SOFTHSM2_CONF": str(STATE / "softhsm2.conf")}


def demo_config(issuer: str, api_base_url: str) -> Path:
    """The signer configuration for this run: the kit's keys, the local issuer, the API."""
    path = STATE / "demo-signer.toml"
    path.write_text(
        f"""# Written by `python -m demo` for one run; see softhsm-test/signer.example.toml.
[server]
listen = "127.0.0.1:0"
insecure = true

[backends.pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
pin_file = "user.pin"

[keys.demo-assertion]
uri = "pkcs11:token=helseid-dev;object=demo-assertion"
alg = "PS256"

[keys.demo-dpop]
uri = "pkcs11:token=helseid-dev;object=demo-dpop"
alg = "ES256"

[profiles.{PROFILE}]
client_id = "{CLIENT_ID}"
issuer = "{issuer}"
assertion_key = "demo-assertion"
dpop_key = "demo-dpop"
assertion_lifetime = 10
api_base_urls = ["{api_base_url}"]
"""
    )
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when the API accepted the calls, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = time.monotonic()
    print("helseid-signer demo: SoftHSM keys -> signer -> HelseID-like token -> DPoP-protected API\n")

    print("1. SoftHSM kit (softhsm-test/make-token.sh)")
    subprocess.run([str(KIT / "make-token.sh")], check=True, stdout=subprocess.DEVNULL)
    jwk_out = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "keys", "jwk", "--config", str(STATE / "signer.toml"),
         "--key", "demo-assertion"],
        check=True, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assertion_jwk = json.loads(jwk_out.stdout)
    print(f"   assertion key: {assertion_jwk['kty']} {assertion_jwk['alg']}, kid {assertion_jwk['kid']}")

    client = {"client_id": CLIENT_ID, "jwks": {"keys": [assertion_jwk]}, "scope": SCOPE}
    with running_authserver([client]) as auth:
        print(f"2. authorization server (oidc-provider, HelseID profile): {auth.issuer}")
        with DeftApi(auth.issuer, require_nonce=True) as api:
            print(f"3. DEFT stand-in API (DPoP-protected, demands its own nonce): {api.base_url}")
            config = demo_config(auth.issuer, api.base_url + "/api")
            with running_signer(config, env={"SOFTHSM2_CONF": str(STATE / "softhsm2.conf")}) as addr:
                print(f"4. helseid-signer serving on {addr} (keys in SoftHSM token 'helseid-dev')")
                return _run_client(addr, api, started)


def _run_client(address: str, api: DeftApi, started: float) -> int:
    sent: list[tuple[str, str, dict[str, str]]] = []

    def record(request: httpx.Request) -> None:
        form = dict(httpx.QueryParams(request.content.decode())) if request.method == "POST" else {}
        sent.append((request.method, str(request.url), {"DPoP": request.headers.get("DPoP", ""), **form}))

    print("5. client library: TokenClient + DPoPAuth (application host holds no key)")
    with SignerClient(address) as signer:
        token_http = httpx.Client(event_hooks={"request": [record]})
        with TokenClient(signer, PROFILE, SCOPE, http=token_http) as tokens:
            token = tokens.get_token()
            with httpx.Client(auth=DPoPAuth(tokens), base_url=api.base_url, event_hooks={"request": [record]}) as c:
                whoami = c.get("/api/whoami")
                upload = c.post("/api/files?SenderHerId=8142987&ReceiverHerIds=8142988", content=b"<Message/>" * 100)
        token_http.close()

    token_posts = [s for s in sent if s[2].get("client_assertion")]
    print(f"\n6. token endpoint: {len(token_posts)} request(s) (the first is answered use_dpop_nonce)")
    for i, (_, url, fields) in enumerate(token_posts, 1):
        _show(f"request {i} client assertion:", fields["client_assertion"])
        _show(f"request {i} DPoP proof ({url}):", fields["DPoP"])
    remaining = int(token.expires_at - time.time())
    print(f"\n  token: type {token.token_type}, scope {token.scope!r}, expires in {remaining} s, cnf.jkt {token.jkt}")

    api_calls = [s for s in sent if "/api/" in s[1]]
    print(f"\n7. API calls: {len(api_calls)} request(s) (the first is answered use_dpop_nonce by the API)")
    _show(f"last DPoP proof ({api_calls[-1][0]} {api_calls[-1][1]}):", api_calls[-1][2]["DPoP"])
    print(f"\n  GET  /api/whoami -> {whoami.status_code} {whoami.text}")
    print(f"  POST /api/files  -> {upload.status_code} {upload.text}")
    ok = whoami.status_code == 200 and upload.status_code == 200 and token.token_type == "DPoP"
    print(f"\n{'ACCEPTED' if ok else 'FAILED'}: the API accepted {api.state.accepted} DPoP-bound call(s); "
          f"{time.monotonic() - started:.1f} s in all. Everything started is stopped.")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
