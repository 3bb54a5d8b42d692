"""Many applications, one signer: mTLS and Unix-socket callers, per-caller profiles,
rate limits and the audit trail - with real TLS (certificates made at set-up), real
Unix sockets and a real ``helseid-signer serve`` process on SoftHSM."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwk

from helseid_signer_client import SignerClient, SignerError
from tests.support.jose_verify import verified_claims as _verify
from tests.support.pki import CertificateAuthority
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://helseid-sts.test.nhn.no"
TOKEN_ENDPOINT = ISSUER + "/connect/token"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("callers")
    token = create_token(folder / "token", label="callers")
    jwks = {name: jwk.JWK(**keys_create(token, name, "EC-P256", "ES256")) for name in ("ka", "kb")}
    ca = CertificateAuthority(folder / "pki", "signer-clients")
    other_ca = CertificateAuthority(folder / "other-pki", "stranger")
    certs = {
        "server": ca.issue("server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        "app-a": ca.issue("app-a", dns=("app-a.vendor.test",)),
        "app-b": ca.issue("app-b", uris=("spiffe://vendor.test/app-b",)),
        "app-cn": ca.issue("app-cn", common_name="legacy-app"),  # no SAN: identified by CN
        "unlisted": ca.issue("unlisted", dns=("app-c.vendor.test",)),
        # Only an e-mail SAN whose text equals a listed name: e-mail SANs never identify callers.
        "email-only": ca.issue("email-only", emails=("ops@vendor.test",)),
        "foreign": other_ca.issue("foreign", dns=("app-a.vendor.test",)),  # right name, unknown CA
        # Names of two different callers in one certificate: neither identity is trusted.
        "two-callers": ca.issue("two-callers", dns=("app-a.vendor.test",), uris=("spiffe://vendor.test/app-b",)),
        # A listed name in a field of another type: names are compared within their type only.
        "dns-as-uri": ca.issue("dns-as-uri", dns=("spiffe://vendor.test/app-b",)),
        "uri-as-dns": ca.issue("uri-as-dns", uris=("app-a.vendor.test",)),
        "cn-as-dns": ca.issue("cn-as-dns", common_name="app-a.vendor.test"),  # no SAN, CN = app-a's DNS name
        "dns-as-cn": ca.issue("dns-as-cn", dns=("legacy-app",)),
    }
    socket_path = folder / "sidecar.sock"
    audit_path = folder / "audit.jsonl"
    config = write_config(
        folder / "signer.toml", token, issuer=ISSUER, client_id="multi-app",
        keys={"ka": "ES256", "kb": "ES256"},
        profiles={"a": ("ka", "ka"), "b": ("kb", "kb")},
        api_base_urls=("https://api.example.no/deft",),
        server_lines=(
            'listen = "127.0.0.1:0"',
            f'tls_certificate = "{certs["server"].cert_path}"',
            f'tls_private_key = "{certs["server"].key_path}"',
            f'client_ca = "{ca.cert_path}"',
        ),
        extra_lines=(
            "[audit]", 'sink = "file"', f'path = "{audit_path}"', "",
            "[callers.app-a]", 'tls_names = ["dns:app-a.vendor.test"]', 'profiles = ["a"]', "",
            "[callers.app-b]", 'tls_names = ["uri:spiffe://vendor.test/app-b"]', 'profiles = ["b"]',
            "rate_limit = 0.5", "rate_burst = 3", "",
            "[callers.legacy]", 'tls_names = ["cn:legacy-app"]', 'profiles = ["a", "b"]', "",
            "[callers.mailbox]", 'tls_names = ["dns:ops@vendor.test"]', 'profiles = ["a"]', "",
            "[callers.sidecar]", 'profiles = ["b"]', f'unix_socket = {{ path = "{socket_path}", mode = 0o660 }}', "",
        ),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        yield {
            "address": address, "ca": ca, "certs": certs, "jwks": jwks,
            "socket": socket_path, "audit": audit_path, "config": config,
        }  # fmt: skip


def _client(world, name: str, ca_path: Path | None = None) -> SignerClient:
    cert = world["certs"][name]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca_path or world["ca"].cert_path).read_bytes(),
        private_key=cert.key,
        certificate_chain=cert.cert,
    )
    # No client-side retries: each test sees the service's own answer.
    channel = grpc.secure_channel(world["address"], credentials)
    return SignerClient(channel=channel, timeout=5)


def _audit(world) -> list[dict]:
    return [json.loads(line) for line in world["audit"].read_text().splitlines()]


def test_each_application_gets_only_its_own_profile(world):
    with _client(world, "app-a") as a, _client(world, "app-b") as b:
        assertion = a.sign_client_assertion("a")
        assert _verify(assertion.jwt, world["jwks"]["ka"])["sub"] == "multi-app"
        proof = b.sign_dpop_proof("b", "POST", TOKEN_ENDPOINT)
        assert _verify(proof.jwt, world["jwks"]["kb"])["htu"] == TOKEN_ENDPOINT
        refusals = []
        for client, profile in ((a, "b"), (a, "does-not-exist"), (b, "a")):
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion(profile)
            refusals.append((caught.value.code, caught.value.details))
    # The same answer for a forbidden profile and a missing one: no probing.
    assert {r for r in refusals} == {
        (grpc.StatusCode.PERMISSION_DENIED, "profile: is not a profile this caller may use")
    }


def test_certificate_without_san_is_identified_by_its_cn(world):
    with _client(world, "app-cn") as legacy:
        assert legacy.get_client_profile("a").client_id == "multi-app"
        assert legacy.get_client_profile("b").client_id == "multi-app"


@pytest.mark.parametrize(
    "who", ["unlisted", "email-only", "two-callers", "dns-as-uri", "uri-as-dns", "cn-as-dns", "dns-as-cn"]
)
def test_trusted_but_unlisted_certificate_is_unauthenticated(world, who):
    for profile in ("a", "b"):
        with _client(world, who) as stranger, pytest.raises(SignerError) as caught:
            stranger.sign_client_assertion(profile)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details.startswith("caller:")
    if who == "two-callers":
        log = Path(str(world["config"]) + ".log").read_text()
        assert "a client certificate names 2 callers (app-a, app-b)" in log


@pytest.mark.parametrize("who", ["foreign", "none"])
def test_certificate_from_unknown_ca_or_none_fails_the_handshake(world, who):
    if who == "none":
        credentials = grpc.ssl_channel_credentials(root_certificates=world["ca"].cert_path.read_bytes())
        client = SignerClient(channel=grpc.secure_channel(world["address"], credentials), timeout=3)
    else:
        client = _client(world, "foreign")
    with client, pytest.raises(SignerError) as caught:
        client.sign_client_assertion("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed; nothing reached the servicer


def test_plaintext_to_the_tls_listener_fails(world):
    with (
        SignerClient(channel=grpc.insecure_channel(world["address"]), timeout=3) as plain,
        pytest.raises(SignerError) as caught,
    ):
        plain.sign_client_assertion("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_unix_socket_caller(world):
    mode = stat.S_IMODE(os.stat(world["socket"]).st_mode)
    assert stat.S_ISSOCK(os.stat(world["socket"]).st_mode) and mode == 0o660
    with SignerClient(f"unix:{world['socket']}") as sidecar:
        proof = sidecar.sign_dpop_proof("b", "GET", "https://api.example.no/deft/files")
        assert _verify(proof.jwt, world["jwks"]["kb"])["htm"] == "GET"
        with pytest.raises(SignerError) as caught:
            sidecar.sign_client_assertion("a")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_rate_limit_gives_resource_exhausted_and_others_are_not_affected(world):
    time.sleep(2.5)  # let app-b's bucket refill (0.5/s, burst 3)
    with _client(world, "app-b") as b, _client(world, "app-a") as a:
        codes = []
        for _ in range(6):
            try:
                b.get_client_profile("b")
                codes.append("OK")
            except SignerError as exc:
                codes.append(exc.code.name)
        assert codes[:2] == ["OK", "OK"] and "RESOURCE_EXHAUSTED" in codes
        assert all(a.get_client_profile("a") for _ in range(10))  # app-a has no limit


def test_audit_records_field_by_field(world):
    with _client(world, "app-a") as a:
        assertion = a.sign_client_assertion("a")
        proof = a.sign_dpop_proof("a", "GET", "https://api.example.no/deft/x?q=1", access_token="secret-token-value")
        with pytest.raises(SignerError):
            a.sign_dpop_proof("a", "GET", "https://evil.example/deft")
    records = _audit(world)
    by_jti = {r.get("jti"): r for r in records}
    signed = by_jti[assertion.jti]
    assert signed["caller"] == "app-a" and signed["profile"] == "a" and signed["purpose"] == "client_assertion"
    assert signed["outcome"] == "signed" and signed["status"] == "OK"
    assert signed["kid"] == world["jwks"]["ka"].thumbprint() and signed["alg"] == "ES256"
    assert signed["key_version"].startswith("serial=") and signed["exp"] == assertion.expires_at
    # The certificate that was used: SHA-256 of its DER (computed here with `cryptography`).
    der = x509.load_pem_x509_certificate(world["certs"]["app-a"].cert).public_bytes(serialization.Encoding.DER)
    assert signed["certificate"] == "sha256:" + hashlib.sha256(der).hexdigest()
    assert isinstance(signed["latency_ms"], float) and signed["time"].endswith("Z")
    p = by_jti[proof.jti]
    assert (p["purpose"], p["htm"], p["htu"]) == ("dpop_proof", "GET", "https://api.example.no/deft/x")
    assert p["ath_present"] is True and p["nonce_present"] is False
    refused = [
        r for r in records if r["outcome"] == "refused" and r.get("caller") == "app-a" and r["purpose"] == "dpop_proof"
    ]
    assert refused and refused[-1]["status"] == "PERMISSION_DENIED" and refused[-1]["error"].startswith("htu:")
    unauth = [r for r in records if r["status"] == "UNAUTHENTICATED"]
    assert unauth and all(r["caller"] is None for r in unauth)
    text = world["audit"].read_text()
    assert "secret-token-value" not in text and assertion.jwt not in text and proof.jwt not in text
    # No JWS or JWT of any kind: a JOSE header and a JSON payload, each base64url of "{" (eyJ).
    # Not the bare substring "eyJ": a record's base64url SHA-256 (prev) holds it now and then.
    assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.", text)


def test_audit_failure_fails_closed(tmp_path, world):
    """/dev/full refuses every write: nothing may be signed without its audit record."""
    config = tmp_path / "signer.toml"
    text = world["config"].read_text().replace(f'path = "{world["audit"]}"', 'path = "/dev/full"')
    text = text.replace(f'path = "{world["socket"]}"', f'path = "{tmp_path / "s.sock"}"')
    config.write_text(text)
    conf = next(Path(world["config"]).parent.joinpath("token").glob("softhsm2.conf"))
    with running_signer(config, env={"SOFTHSM2_CONF": str(conf)}) as address:
        cert = world["certs"]["app-a"]
        credentials = grpc.ssl_channel_credentials(world["ca"].cert_path.read_bytes(), cert.key, cert.cert)
        with SignerClient(address, credentials=credentials) as a, pytest.raises(SignerError) as caught:
            a.sign_client_assertion("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "audit" in caught.value.details


def test_audit_names_the_caller_of_an_unparseable_request(world):
    cert = world["certs"]["app-b"]
    credentials = grpc.ssl_channel_credentials(world["ca"].cert_path.read_bytes(), cert.key, cert.cert)
    with grpc.secure_channel(world["address"], credentials) as channel:
        call = channel.unary_unary(
            "/helseid.signer.v1.SignerService/SignDpopProof",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x02\xff\xfe", timeout=5)  # field 1 (profile): invalid UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    last = [r for r in _audit(world) if r["purpose"] == "dpop_proof" and r["status"] == "INVALID_ARGUMENT"][-1]
    assert last["caller"] == "app-b" and last["error"].startswith("request:")


def test_the_services_audit_file_is_an_intact_hash_chain(world):
    """Everything the tests above made the signer write: one chain, intact."""
    with _client(world, "app-a") as a:
        a.sign_client_assertion("a")
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", str(world["audit"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "1 chain(s)" in proc.stdout and "intact" in proc.stdout, proc.stdout
    records = _audit(world)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
