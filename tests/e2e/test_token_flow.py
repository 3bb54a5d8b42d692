"""End to end: keys in a real SoftHSM token, the real ``helseid-signer serve`` process,
the client library, and oidc-provider configured like HelseID.

Oracles are independent: jwcrypto verifies assertions, proofs and access tokens;
oidc-provider decides whether a token request is acceptable.
"""

from __future__ import annotations

import json

import httpx
import pytest
from jwcrypto import jwk, jws, jwt

from helseid_signer_client import SignerClient, TokenClient, TokenError
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

SCOPE = "nhn:deft/api"
CLIENT_ID = "e2e-client"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SoftHSM keys, the authorization server (knowing only the registered key), the signer."""
    folder = tmp_path_factory.mktemp("e2e")
    token = create_token(folder / "token", label="e2e")
    keys = {"assertion": ("RSA-2048", "PS256"), "dpop": ("EC-P256", "ES256"), "stranger": ("EC-P256", "ES256")}
    jwks = {name: keys_create(token, name, spec, alg) for name, (spec, alg) in keys.items()}
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client]) as auth:
        config = write_config(
            folder / "signer.toml",
            token,
            issuer=auth.issuer,
            client_id=CLIENT_ID,
            keys={name: alg for name, (_, alg) in keys.items()},
            profiles={"app": ("assertion", "dpop"), "unregistered": ("stranger", "dpop")},
        )
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
            with SignerClient(address) as signer:
                yield {"auth": auth, "signer": signer, "jwks": jwks, "token": token}


def _record_token_requests(world) -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    client = httpx.Client(event_hooks={"request": [lambda r: seen.append(r)]})
    return client, seen


def test_client_gets_dpop_bound_token_with_one_nonce_retry(world):
    http, seen = _record_token_requests(world)
    with TokenClient(world["signer"], "app", SCOPE, http=http) as tokens:
        token = tokens.get_token()
        assert tokens.get_token() is token  # cached: no new request
    assert token.token_type == "DPoP"

    # The access token: signed by the authorization server, bound to the DPoP key.
    auth_jwks = jwk.JWKSet.from_json(httpx.get(world["auth"].jwks_uri).text)
    claims = json.loads(jwt.JWT(jwt=token.access_token, key=auth_jwks).claims)
    dpop_key = jwk.JWK(**world["jwks"]["dpop"])
    assert claims["cnf"]["jkt"] == dpop_key.thumbprint() == token.jkt
    assert claims["client_id"] == CLIENT_ID and claims["scope"] == SCOPE

    posts = [r for r in seen if r.method == "POST"]
    assert len(posts) == 2, "exactly one use_dpop_nonce retry"
    forms = [dict(httpx.QueryParams(r.content.decode())) for r in posts]
    assertion_key = jwk.JWK(**world["jwks"]["assertion"])
    assertions, proofs = [], []
    for form, request in zip(forms, posts, strict=True):
        a = jws.JWS()
        a.deserialize(form["client_assertion"], key=assertion_key)  # raises if the signature is bad
        assertions.append((a.jose_header, json.loads(a.payload)))
        p = jws.JWS()
        p.deserialize(request.headers["DPoP"], key=dpop_key)
        proofs.append((p.jose_header, json.loads(p.payload)))
    # A NEW assertion and a NEW proof for the retry; only the retry carries the nonce.
    assert assertions[0][1]["jti"] != assertions[1][1]["jti"]
    assert proofs[0][1]["jti"] != proofs[1][1]["jti"]
    assert "nonce" not in proofs[0][1] and proofs[1][1]["nonce"]
    header, body = assertions[1]
    assert header == {"alg": "PS256", "typ": "client-authentication+jwt", "kid": assertion_key.thumbprint()}
    assert body["iss"] == body["sub"] == CLIENT_ID and body["aud"] == world["auth"].issuer
    assert body["iat"] == body["nbf"] and 0 < body["exp"] - body["iat"] <= 60
    assert all(isinstance(body[c], int) for c in ("iat", "nbf", "exp"))
    pheader, pbody = proofs[1]
    assert pheader["typ"] == "dpop+jwt" and pheader["alg"] == "ES256"
    assert set(pheader["jwk"]) == {"kty", "crv", "x", "y"}  # public members only
    assert pbody["htm"] == "POST" and pbody["htu"] == world["auth"].token_endpoint
    assert "ath" not in pbody


def test_reused_assertion_is_rejected_by_the_authorization_server(world):
    """Why the retry needs a new assertion: the server already spent the first jti."""
    signer, auth = world["signer"], world["auth"]
    assertion = signer.sign_client_assertion("app")
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "scope": SCOPE,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion.jwt,
    }
    first = httpx.post(
        auth.token_endpoint, data=form, headers={"DPoP": signer.sign_dpop_proof("app", "POST", auth.token_endpoint).jwt}
    )
    assert first.status_code == 400 and first.json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]
    again = httpx.post(
        auth.token_endpoint,
        data=form,
        headers={"DPoP": signer.sign_dpop_proof("app", "POST", auth.token_endpoint, nonce=nonce).jwt},
    )
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"


def test_unregistered_assertion_key_is_rejected(world):
    with TokenClient(world["signer"], "unregistered", SCOPE) as tokens:
        with pytest.raises(TokenError) as caught:
            tokens.get_token()
    assert caught.value.error == "invalid_client" and caught.value.status_code == 401


def test_unknown_scope_error_carries_helseid_fields(world):
    with TokenClient(world["signer"], "app", "nhn:not-registered") as tokens:
        with pytest.raises(TokenError) as caught:
            tokens.get_token()
    assert caught.value.error == "invalid_scope" and caught.value.status_code == 400
