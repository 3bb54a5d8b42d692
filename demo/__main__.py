"""The main job, end to end on this machine (README command one):

1. the SoftHSM kit makes a token with a client-assertion key and a DPoP key
   (``softhsm-test/make-token.sh``; kept between runs in ``softhsm-test/.state/``);
2. the local HelseID-like authorization server (oidc-provider) starts, with the assertion
   key's public JWK registered - as a vendor uploads it in HelseID self-service;
3. ``helseid-signer serve`` starts on SoftHSM;
4. a stand-in for DEFT starts: DEFT's REST API, every token and DPoP proof checked with
   jwcrypto, its own DPoP nonce demanded (demo/deft_api.py, docs/demo.md);
5. the client library gets a DPoP-bound token (nonce retry included) and moves real bytes
   through ``DPoPAuth``: a generated file (default 32 MiB) is uploaded with DEFT's multipart
   protocol (initialization, parts, completion), downloaded again and its SHA-256 compared;
   the receiver marks it downloaded and the download status is read;
6. a readable account is printed: the decoded client assertion and DPoP proofs (headers
   and claims, never a token), the token type, the API's answers. ACCEPTED only when the
   bytes came back unchanged. Everything started is stopped again.

Run: ``python -m demo [--size-mb N] [--part-mb N] [--token-ttl S]`` (after
``scripts/setup.sh``; ``scripts/demo.sh`` does both).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from demo.deft_api import DeftApi
from demo.deft_client import DeftClient, DeftError, generated_parts
from helseid_signer_client import DPoPAuth, SignerClient, TokenClient
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "softhsm-test"
STATE = KIT / ".state"
CLIENT_ID = "helseid-signer-demo"
SCOPE = "nhn:deft/api"
PROFILE = "demo"
SENDER, RECEIVER = 8142987, 8142988  # HER-ids of the demo's sender and receiver
MIB = 1024 * 1024


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
    """Run the demo; 0 when the bytes round-tripped through the API, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=32, help="size of the generated file in MiB (default 32)")
    parser.add_argument("--part-mb", type=float, default=8, help="size of one upload part in MiB (default 8)")
    parser.add_argument(
        "--token-ttl", type=int, default=300,
        help="access-token lifetime in seconds at the local authorization server (default 300; "
        "a few seconds show a long upload replacing its token between parts)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    size, part_size = int(args.size_mb * MIB), int(args.part_mb * MIB)
    if size <= 0 or part_size <= 0 or -(-size // part_size) > 10_000 or args.token_ttl <= 0:
        parser.error("--size-mb and --part-mb must be > 0 with at most 10000 parts; --token-ttl > 0")
    started = time.monotonic()
    print("helseid-signer demo: SoftHSM keys -> signer -> HelseID-like token -> DPoP-protected DEFT stand-in\n")

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
    with running_authserver([client], access_token_ttl=args.token_ttl) as auth:
        print(f"2. authorization server (oidc-provider, HelseID-like): {auth.issuer}; tokens live {args.token_ttl} s")
        with DeftApi(auth.issuer, require_nonce=True) as api:
            print(f"3. DEFT stand-in (DEFT's REST API, DPoP-protected, its own nonce): {api.api_url}")
            config = demo_config(auth.issuer, api.api_url)
            with running_signer(config, env={"SOFTHSM2_CONF": str(STATE / "softhsm2.conf")}) as addr:
                print(f"4. helseid-signer serving on {addr} (keys in SoftHSM token 'helseid-dev')")
                return _run_client(addr, api, started, size, part_size, args.token_ttl)


class Progress:
    """Progress of a transfer: a redrawn bar on a terminal, plain lines (about ten) otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.started = label, total, time.monotonic()
        self.tty = sys.stdout.isatty()
        self.next_line = 0.0

    def __call__(self, done: int) -> None:
        share = done / self.total if self.total else 1.0
        rate = done / MIB / max(time.monotonic() - self.started, 1e-6)
        text = f"{done / MIB:8.1f} / {self.total / MIB:.1f} MiB  {rate:7.1f} MiB/s"
        if self.tty:
            bar = "#" * int(share * 30)
            print(f"\r   {self.label} [{bar:<30}] {text}", end="" if share < 1 else "\n", flush=True)
        elif share >= self.next_line or share >= 1:
            print(f"   {self.label} {share:4.0%} {text}", flush=True)
            self.next_line = min(1.0, share + 0.1)


def _run_client(address: str, api: DeftApi, started: float, size: int, part_size: int, ttl: int) -> int:
    token_forms: list[tuple[str, dict[str, str]]] = []
    api_calls: list[tuple[str, str, str]] = []

    def record_token(request: httpx.Request) -> None:
        form = dict(httpx.QueryParams(request.content.decode())) if request.method == "POST" else {}
        if form.get("client_assertion"):
            token_forms.append((str(request.url), {"DPoP": request.headers.get("DPoP", ""), **form}))

    def record_api(request: httpx.Request) -> None:
        api_calls.append((request.method, str(request.url), request.headers.get("DPoP", "")))

    print("5. client library: TokenClient + DPoPAuth (the application host holds no key)")
    parts = -(-size // part_size)
    print(f"   a generated file of {size / MIB:.1f} MiB in {parts} part(s) of {part_size / MIB:g} MiB")
    failure = ""
    result = received = status_before = status_after = None
    gone = None
    with SignerClient(address) as signer:
        token_http = httpx.Client(event_hooks={"request": [record_token]})
        margin = min(30.0, ttl / 3)  # with short test tokens: replace them a third of their life early
        with TokenClient(signer, PROFILE, SCOPE, http=token_http, refresh_margin=margin) as tokens:
            token = tokens.get_token()
            hooks = {"request": [record_api]}
            with httpx.Client(auth=DPoPAuth(tokens), base_url=api.api_url, event_hooks=hooks, timeout=60) as http:
                deft = DeftClient(http)
                try:
                    up = Progress("upload  ", size)
                    result = deft.upload(generated_parts(size, part_size), "demo-file.bin", SENDER, [RECEIVER],
                                         progress=lambda _n, sent: up(sent))  # fmt: skip
                    status_before = deft.download_status(result.key)
                    received = deft.download(result.key, progress=Progress("download", size))
                    deft.mark_downloaded(result.key, RECEIVER)
                    status_after = deft.download_status(result.key)
                    gone = http.get(f"objects/{result.key}").status_code
                except DeftError as exc:
                    failure = str(exc)
        token_http.close()

    print(f"\n6. token endpoint: {len(token_forms)} request(s) (the first is answered use_dpop_nonce)")
    for i, (url, fields) in enumerate(token_forms[:2], 1):
        _show(f"request {i} client assertion:", fields["client_assertion"])
        _show(f"request {i} DPoP proof ({url}):", fields["DPoP"])
    if len(token_forms) > 2:
        print(f"\n  ... and {len(token_forms) - 2} more: tokens replaced during the transfer (they live {ttl} s)")
    remaining = int(token.expires_at - time.time())
    print(f"\n  first token: type {token.token_type}, scope {token.scope!r}, expires in {remaining} s, "
          f"cnf.jkt {token.jkt}")  # fmt: skip

    print(f"\n7. DEFT calls: {len(api_calls)} request(s) (the first is answered use_dpop_nonce by the API)")
    a_part = next((c for c in api_calls if c[1].endswith("/part")), None)
    for title, call in (("first", api_calls[0]), ("a part", a_part), ("last", api_calls[-1])):
        if call is not None:
            _show(f"{title} DPoP proof ({call[0]} {call[1]}):", call[2])
    generated = hashlib.sha256()  # the file made again, independently of what the upload hashed
    for data in generated_parts(size, part_size):
        generated.update(data)
    print()
    if result is not None:
        print(
            f"  upload:   key {result.key}, {result.size:,} bytes in {result.parts} part(s), "
            f"{result.part_requests - result.parts} part(s) re-sent, Location {result.location}"
        )
        print(f"            SHA-256 sent      {result.sha256}")
    if received is not None:
        print(f"  download: {received[0]:,} bytes, SHA-256 received {received[1]}")
        print(f"  download-status before the receipt {status_before}, after {status_after}; "
              f"GET after every receipt -> {gone}")  # fmt: skip
    ok = (
        not failure
        and result is not None
        and received == (size, result.sha256)
        and generated.hexdigest() == result.sha256
        and status_before == {str(RECEIVER): False}
        and status_after == {str(RECEIVER): True}
        and gone == 404
        and token.token_type == "DPoP"
    )
    if failure:
        print(f"  FAILED: {failure}")
    print(f"\n{'ACCEPTED' if ok else 'FAILED'}: {size:,} bytes went up and came back "
          f"{'unchanged' if ok else 'NOT unchanged'}; the API accepted {api.state.accepted} DPoP-bound call(s), "
          f"answered {sum(api.state.refused.values())} with an error {dict(api.state.refused)}; "
          f"{time.monotonic() - started:.1f} s in all. Everything started is stopped.")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
