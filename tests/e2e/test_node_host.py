"""A second-language host: the Node program in examples/node-host/ runs the whole job
against a real signer over mTLS, from the .proto alone.

The PKI is made by the openssl recipe of docs/integration.md, run exactly as printed
there (so the recipe is tested); the signer process, SoftHSM keys, oidc-provider and the
DEFT stand-in are the same real parts as in test_token_flow.py. The outcome is checked
independently of the Node program: the API stand-in verified token and proof with
jwcrypto, the token's ``cnf.jkt`` equals the jwcrypto thumbprint of the DPoP key, and the
signer's audit records name the caller its certificate identifies.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from jwcrypto import jwk

from demo.deft_api import DeftApi
from helseid_signer_client import SignerClient, SignerError
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "integration.md"
HOST = ROOT / "examples" / "node-host" / "host.mjs"
SCOPE = "nhn:deft/api"
CLIENT_ID = "node-host-client"
# The names the recipe in docs/integration.md uses.
SIGNER_DNS = "helseid-signer.internal"
CALLER_NAME = "journal-app.vendor.example"


def pki_recipe() -> str:
    """The shell block after ``<!-- pki-recipe -->`` in docs/integration.md."""
    match = re.search(r"<!-- pki-recipe -->\s*```sh\n(.*?)```", GUIDE.read_text(), re.S)
    assert match, "docs/integration.md lost its <!-- pki-recipe --> block"
    return match.group(1)


def sign_client_cert(folder: Path, name: str, ext_lines: list[str]) -> None:
    """Another client certificate from the recipe's callers CA (for the EKU cases)."""

    def run(*args: str) -> None:
        subprocess.run(args, cwd=folder, check=True, capture_output=True)

    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
    run("openssl", "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={CALLER_NAME}", "-out", f"{name}.csr")
    (folder / f"{name}.ext").write_text("\n".join([f"subjectAltName=DNS:{CALLER_NAME}", *ext_lines]) + "\n")
    run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "callers-ca.pem", "-CAkey", "callers-ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    assert shutil.which("openssl"), "openssl is required (scripts/setup.sh installs it)"
    node = shutil.which("node")
    assert node, "node is required (scripts/setup.sh installs it)"
    assert (ROOT / "examples" / "node-host" / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run scripts/setup.sh"
    folder = tmp_path_factory.mktemp("node-host")
    pki = folder / "pki"
    pki.mkdir()
    subprocess.run(["bash", "-c", pki_recipe()], cwd=pki, check=True, capture_output=True)
    token = create_token(folder / "token", label="node-host")
    jwks = {
        "assertion": keys_create(token, "assertion", "RSA-2048", "PS256"),
        "dpop": keys_create(token, "dpop", "EC-P256", "ES256"),
    }
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client]) as auth, DeftApi(auth.issuer, require_nonce=True) as api:
        config = write_config(
            folder / "signer.toml",
            token,
            issuer=auth.issuer,
            client_id=CLIENT_ID,
            keys={"assertion": "PS256", "dpop": "ES256"},
            profiles={"app": ("assertion", "dpop")},
            api_base_urls=(api.base_url + "/api",),
            server_lines=(
                'listen = "127.0.0.1:0"',
                f'tls_certificate = "{pki / "server.pem"}"',
                f'tls_private_key = "{pki / "server.key"}"',
                f'client_ca = "{pki / "callers-ca.pem"}"',
            ),
            extra_lines=("[callers.journal-app]", 'profiles = ["app"]', f'tls_names = ["dns:{CALLER_NAME}"]'),
        )
        status_url = f"{api.base_url}/api/objects/{api.put_object(b'seed')}/download-status"
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
            yield {
                "node": node, "pki": pki, "address": address, "api": api, "jwks": jwks,
                "log": Path(f"{config}.log"), "status_url": status_url,
            }  # fmt: skip


def run_host(world, *extra: str) -> subprocess.CompletedProcess[str]:
    pki = world["pki"]
    args = [
        world["node"], str(HOST),
        "--signer", world["address"], "--server-name", SIGNER_DNS,
        "--ca", str(pki / "server-ca.pem"), "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"),
        "--profile", "app", "--scope", SCOPE, "--api-url", world["status_url"] + "?x=1",
        *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def audit_records(log: Path) -> list[dict]:
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "purpose" in entry and "outcome" in entry:
                records.append(entry)
    return records


def test_node_host_gets_a_bound_token_and_calls_the_api_with_both_nonce_retries(world):
    api = world["api"]
    done = run_host(world)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)

    # The API stand-in verified the token (authorization server's JWKS), the proof, ath and
    # cnf.jkt = thumbprint(proof jwk) with jwcrypto, and accepted exactly one request.
    assert out["api_status"] == 200 and api.state.accepted == 1
    assert out["api_body"] == {"receiverDownloadStatus": {"2": False}}
    seen = api.state.log[-1]
    assert (seen.client_id, seen.scope, seen.htu) == (CLIENT_ID, SCOPE, world["status_url"])
    # Both nonce retries happened, once each: 400 use_dpop_nonce at the token endpoint
    # (oidc-provider always demands a nonce) and 401 use_dpop_nonce at the API.
    assert out["token_requests"] == 2 and out["api_requests"] == 2
    assert out["token_type"] == "DPoP" and out["scope"] == SCOPE
    # The token is bound to the profile's DPoP key: jwcrypto's RFC 7638 thumbprint of the
    # key made in SoftHSM equals cnf.jkt and GetClientProfile's dpop_jkt.
    expected_jkt = jwk.JWK(**world["jwks"]["dpop"]).thumbprint()
    assert out["cnf_jkt"] == expected_jkt == out["dpop_jkt"]
    assert "eyJ" not in done.stdout + done.stderr, "no JWT (token, assertion, proof) is printed"

    # The signer identified the caller by its certificate's DNS subjectAltName.
    records = [r for r in audit_records(world["log"]) if r.get("caller") == "journal-app"]
    purposes = [r["purpose"] for r in records if r["outcome"] in ("signed", "answered")]
    assert purposes.count("client_assertion") == 2  # a NEW assertion for the token retry
    assert purposes.count("dpop_proof") == 4  # token request + retry, API call + retry
    assert "client_profile" in purposes


def test_node_host_reports_a_refusal_with_its_status(world):
    done = run_host(world, "--org-child", "12345678")  # 8 digits: malformed
    assert done.returncode == 1
    assert "SignClientAssertion: INVALID_ARGUMENT child_organization_number" in done.stderr


def _client(world, cert: str) -> SignerClient:
    pki = world["pki"]
    credentials = grpc.ssl_channel_credentials(
        (pki / "server-ca.pem").read_bytes(), (pki / f"{cert}.key").read_bytes(), (pki / f"{cert}.pem").read_bytes()
    )
    options = [("grpc.ssl_target_name_override", SIGNER_DNS)]
    return SignerClient(world["address"], credentials=credentials, options=options, service_config=None, timeout=10)


@pytest.mark.parametrize(
    ("name", "ext", "accepted"),
    [
        ("eku-client", ["extendedKeyUsage=clientAuth"], True),
        ("eku-none", [], True),
        ("eku-server", ["extendedKeyUsage=serverAuth"], False),
    ],
)
def test_client_certificate_extended_key_usage(world, name, ext, accepted):
    """What docs/integration.md says of the EKU: clientAuth or none; serverAuth only fails
    the TLS handshake (gRPC clients see UNAVAILABLE)."""
    sign_client_cert(world["pki"], name, ext)
    with _client(world, name) as signer:
        if accepted:
            assert signer.get_client_profile("app").client_id == CLIENT_ID
        else:
            with pytest.raises(SignerError) as caught:
                signer.get_client_profile("app")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
