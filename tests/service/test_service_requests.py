"""The service through its real gRPC interface: claims it builds, and bad requests.

A real ``helseid-signer serve`` process on SoftHSM. Every refusal must carry the right
gRPC status and a message naming the field, and the service must keep serving.
Oracles: jwcrypto for signatures and thumbprints; hashlib/base64 for ``ath``.
"""

from __future__ import annotations

import base64
import hashlib
import time

import grpc
import pytest
from jwcrypto import jwk

from helseid_signer_client import SignerClient, SignerError
from helseid_signer_client.proto import signer_pb2 as pb
from helseid_signer_client.proto import signer_pb2_grpc
from tests.support.jose_verify import verified as _verify
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"
CLIENT_ID = "svc-client"
ALLOWED = ("123456789", "987654321")


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc")
    token = create_token(folder / "token", label="svc")
    jwks = {
        "assertion": keys_create(token, "assertion", "EC-P384", "ES384"),
        "dpop": keys_create(token, "dpop", "RSA-2048", "RS256"),
    }
    orgs = "allowed_organization_numbers = [" + ", ".join(f'"{o}"' for o in ALLOWED) + "]"
    config = write_config(
        folder / "signer.toml",
        token,
        issuer=ISSUER,
        client_id=CLIENT_ID,
        keys={"assertion": "ES384", "dpop": "RS256"},
        profiles={"single": ("assertion", "dpop"), "multi": ("assertion", "dpop")},
        extra_profile_lines={"single": [orgs, "assertion_lifetime = 7"], "multi": [orgs, 'tenancy = "multi"']},
        api_base_urls=("https://api.example.no/deft", "https://a.example"),
    )
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        with SignerClient(address) as client:
            client.jwks = {k: jwk.JWK(**v) for k, v in jwks.items()}
            client.address = address
            yield client


def test_client_assertion_claims(signer):
    before = int(time.time())
    result = signer.sign_client_assertion("single", child_organization_number="987654321")
    header, claims = _verify(result.jwt, signer.jwks["assertion"])
    assert header == {"alg": "ES384", "typ": "client-authentication+jwt", "kid": signer.jwks["assertion"].thumbprint()}
    assert result.kid == header["kid"] and len(result.kid) == 43
    assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == ISSUER
    assert before <= claims["iat"] == claims["nbf"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 7 == result.expires_at - result.issued_at
    assert claims["jti"] == result.jti and len(base64.urlsafe_b64decode(result.jti + "==")) == 24
    assert claims["assertion_details"] == {
        "type": "helseid_authorization",
        "practitioner_role": {
            "organization": {
                "identifier": {"system": "urn:oid:2.16.578.1.12.4.1.4.101", "type": "ENH", "value": "987654321"}
            }
        },
    }


def test_multi_tenant_assertion_details(signer):
    result = signer.sign_client_assertion(
        "multi", parent_organization_number="123456789", child_organization_number="987654321"
    )
    _, claims = _verify(result.jwt, signer.jwks["assertion"])
    identifier = claims["assertion_details"]["practitioner_role"]["organization"]["identifier"]
    assert identifier == {"system": "urn:oid:1.0.6523", "type": "ENH", "value": "NO:ORGNR:123456789:987654321"}
    without_details = signer.sign_client_assertion("multi")
    assert "assertion_details" not in _verify(without_details.jwt, signer.jwks["assertion"])[1]


def test_dpop_proof_claims_and_ath(signer):
    access_token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 section 7.1
    proof = signer.sign_dpop_proof(
        "single",
        "GET",
        "HTTPS://API.Example.NO:443/deft/files?SenderHerId=1#frag",
        access_token=access_token,
        nonce="eyJ7S_zG.eyJH0-Z.HX4w-7v",
    )
    header, claims = _verify(proof.jwt, signer.jwks["dpop"])
    assert header["typ"] == "dpop+jwt" and header["alg"] == "RS256"
    assert set(header["jwk"]) == {"kty", "n", "e"}
    assert jwk.JWK(**header["jwk"]).thumbprint() == signer.jwks["dpop"].thumbprint() == proof.jkt
    assert claims["htm"] == "GET"
    assert claims["htu"] == "https://api.example.no/deft/files" == proof.htu
    assert claims["ath"] == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    assert (
        claims["ath"] == base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()).rstrip(b"=").decode()
    )
    assert claims["nonce"] == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    assert isinstance(claims["iat"], int) and abs(claims["iat"] - time.time()) < 5


def test_every_proof_and_assertion_is_new(signer):
    jtis = {signer.sign_dpop_proof("single", "POST", "https://a.example/x").jti for _ in range(50)}
    jtis |= {signer.sign_client_assertion("single").jti for _ in range(50)}
    assert len(jtis) == 100


def test_get_client_profile(signer):
    info = signer.get_client_profile("single")
    assert info.client_id == CLIENT_ID and info.issuer == ISSUER
    assert info.token_endpoint == ISSUER + "/connect/token"
    assert info.assertion_alg == "ES384" and info.dpop_alg == "RS256"
    assert info.assertion_kid == signer.jwks["assertion"].thumbprint()
    assert info.dpop_jkt == signer.jwks["dpop"].thumbprint()
    assert info.assertion_lifetime_seconds == 7


BAD_REQUESTS = [
    # (rpc, request fields, status, field named in the message)
    ("assertion", {"profile": ""}, "INVALID_ARGUMENT", "profile"),
    ("assertion", {"profile": "nope"}, "PERMISSION_DENIED", "profile"),
    ("assertion", {"profile": "x" * 65}, "INVALID_ARGUMENT", "profile"),
    ("assertion", {"profile": "sin gle"}, "INVALID_ARGUMENT", "profile"),
    ("assertion", {"profile": "single", "child_organization_number": "12345678"}, "INVALID_ARGUMENT",
     "child_organization_number"),
    ("assertion", {"profile": "single", "child_organization_number": "12345678a"}, "INVALID_ARGUMENT",
     "child_organization_number"),
    ("assertion", {"profile": "single", "child_organization_number": "111111111"}, "PERMISSION_DENIED",
     "child_organization_number"),
    ("assertion", {"profile": "single", "parent_organization_number": "123456789"}, "INVALID_ARGUMENT",
     "parent_organization_number"),
    ("assertion", {"profile": "multi", "child_organization_number": "123456789"}, "INVALID_ARGUMENT",
     "parent_organization_number"),
    ("assertion", {"profile": "multi", "parent_organization_number": "222222222"}, "PERMISSION_DENIED",
     "parent_organization_number"),
    ("proof", {"profile": "single", "htm": "post", "htu": "https://a.example/"}, "INVALID_ARGUMENT", "htm"),
    ("proof", {"profile": "single", "htm": "FETCH", "htu": "https://a.example/"}, "INVALID_ARGUMENT", "htm"),
    ("proof", {"profile": "single", "htm": "", "htu": "https://a.example/"}, "INVALID_ARGUMENT", "htm"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "/relative/path"}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "ftp://a.example/"}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://user:pw@a.example/"}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/" + "a" * 2048}, "INVALID_ARGUMENT",
     "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example:99999/"}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/\u00e6"}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": ""}, "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/", "nonce": "n" * 513},
     "INVALID_ARGUMENT", "nonce"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/", "nonce": 'a"b'},
     "INVALID_ARGUMENT", "nonce"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/", "access_token_sha256": b"\0" * 31},
     "INVALID_ARGUMENT", "access_token_sha256"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://a.example/", "access_token_sha256": b"\0" * 64},
     "INVALID_ARGUMENT", "access_token_sha256"),
    ("proof", {"profile": "absent", "htm": "GET", "htu": "https://a.example/"}, "PERMISSION_DENIED", "profile"),
    ("profile", {"profile": "absent"}, "PERMISSION_DENIED", "profile"),
    ("keyset", {"profile": "absent"}, "PERMISSION_DENIED", "profile"),
    # htu outside the profile's token endpoint and API base URLs, or trying to escape them
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no.evil/deft/x"}, "PERMISSION_DENIED",
     "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft-admin"}, "PERMISSION_DENIED",
     "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft/../admin"}, "INVALID_ARGUMENT",
     "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft/%2e%2e/admin"},
     "INVALID_ARGUMENT", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft%2fadmin"}, "INVALID_ARGUMENT",
     "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft/%252e%252e/admin"},
     "INVALID_ARGUMENT", "htu"),
    # unclean paths (issue 13 point 10): encoded ;, NUL, trailing dots/spaces, over-long UTF-8, bad %-encoding
    *[("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no/deft/" + p}, "INVALID_ARGUMENT",
       "htu") for p in ("x%3bjsessionid=1", "x%00", "..%20/admin", ".../admin", "%c0%ae%c0%ae/admin", "x%", "x%zz")],
    ("proof", {"profile": "single", "htm": "GET", "htu": "http://api.example.no/deft/x"}, "PERMISSION_DENIED", "htu"),
    ("proof", {"profile": "single", "htm": "GET", "htu": "https://api.example.no:8443/deft/x"}, "PERMISSION_DENIED",
     "htu"),
    ("proof", {"profile": "single", "htm": "POST", "htu": "https://helseid-sts.nhn.no/connect/token"},
     "PERMISSION_DENIED", "htu"),
    ("profile", {"profile": "../etc"}, "INVALID_ARGUMENT", "profile"),
]  # fmt: skip


@pytest.mark.parametrize(("rpc", "fields", "status", "field"), BAD_REQUESTS)
def test_bad_request_gets_clear_status_and_service_keeps_serving(signer, rpc, fields, status, field):
    with grpc.insecure_channel(signer.address) as channel:
        stub = signer_pb2_grpc.SignerServiceStub(channel)
        call, message = {
            "assertion": (stub.SignClientAssertion, pb.SignClientAssertionRequest),
            "proof": (stub.SignDpopProof, pb.SignDpopProofRequest),
            "profile": (stub.GetClientProfile, pb.GetClientProfileRequest),
            "keyset": (stub.GetKeySet, pb.GetKeySetRequest),
        }[rpc]
        with pytest.raises(grpc.RpcError) as caught:
            call(message(**fields), timeout=5)
    assert caught.value.code() == grpc.StatusCode[status]
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()
    # ... and the service still serves a valid request.
    assert signer.sign_dpop_proof("single", "GET", "https://a.example/").jwt


def test_non_utf8_string_field_is_refused_cleanly(signer):
    """A string field with invalid UTF-8 on the wire (field 1, length 2, bytes ff fe)."""
    with grpc.insecure_channel(signer.address) as channel:
        call = channel.unary_unary(
            "/helseid.signer.v1.SignerService/SignClientAssertion",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x02\xff\xfe", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request: is not a valid SignClientAssertionRequest")
    assert signer.sign_client_assertion("single").jwt


def test_signer_error_wraps_status(signer):
    with pytest.raises(SignerError) as caught:
        signer.sign_dpop_proof("single", "get", "https://a.example/")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "htm" in caught.value.details


def test_get_key_set_publishes_only_the_assertion_key(signer):
    key_set = signer.get_key_set("single")
    assert [k["kid"] for k in key_set.jwks["keys"]] == [signer.jwks["assertion"].thumbprint()]
    published = key_set.jwks["keys"][0]
    assert published["alg"] == "ES384" and published["use"] == "sig"
    assert set(published) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no private members
    # jwcrypto computes the same thumbprint from the published members alone.
    assert jwk.JWK(**{k: published[k] for k in ("kty", "crv", "x", "y")}).thumbprint() == published["kid"]
    assert key_set.keys[0]["status"] == "CURRENT" and key_set.keys[0]["key_version"].startswith("serial=")
    assert key_set.refresh_hint_seconds > 0


def test_health_service_reports_serving(signer):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(signer.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "helseid.signer.v1.SignerService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
