"""The local authorization server is as strict as HelseID.

Uses only independent libraries (jwcrypto for keys and signatures, httpx for HTTP), never
product code, so a bug in the product cannot hide a bug in the stand-in it is tested against.
Each refusal is also checked against the server's stderr log (``error_detail``), so a request
that fails for an unintended reason does not pass by accident.
"""

from __future__ import annotations

import functools
import itertools
import json
import secrets
import time
from typing import Any

import httpx
import pytest
from jwcrypto import jwk, jwt

from tests.support.authserver import AuthServer, AuthServerError, running_authserver

SCOPE = "nhn:deft/api"
RESOURCE = "urn:nhn:deft"
ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
HAPPY_ALGS = ("RS256", "PS256", "ES256", "ES512")
CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@functools.cache
def key_for(alg: str, role: str) -> jwk.JWK:
    """A private key fitting ``alg`` (RSA 2048 or the alg's EC curve); one per (alg, role)."""
    if alg in CURVES:
        return jwk.JWK.generate(kty="EC", crv=CURVES[alg])
    return jwk.JWK.generate(kty="RSA", size=2048)


def client_id_for(alg: str) -> str:
    return f"client-{alg.lower()}"


def registered_jwk(alg: str) -> dict[str, Any]:
    """The public JWK registered for the client using ``alg`` (kid = RFC 7638 thumbprint)."""
    key = key_for(alg, "assertion")
    return {**key.export_public(as_dict=True), "kid": key.thumbprint(), "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def server() -> AuthServer:
    clients = [
        {"client_id": client_id_for(alg), "jwks": {"keys": [registered_jwk(alg)]}, "scope": SCOPE} for alg in ALGS
    ]
    with running_authserver(clients, scopes=(SCOPE, "nhn:other/api"), access_token_ttl=300) as srv:
        yield srv


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    with httpx.Client(timeout=10, trust_env=False) as client:
        yield client


def sign(key: jwk.JWK, header: dict[str, Any], claims: dict[str, Any]) -> str:
    token = jwt.JWT(header=header, claims=claims)
    token.make_signed_token(key)
    return token.serialize()


def client_assertion(server: AuthServer, alg: str, **overrides: Any) -> str:
    """A correct HelseID client assertion for ``client_id_for(alg)``; ``overrides`` replace parts.

    Keyword overrides: ``typ``, ``aud``, ``sub``, ``exp_after`` (seconds after iat),
    ``key`` (signing key), ``kid``, ``jti``.
    """
    key = overrides.get("key", key_for(alg, "assertion"))
    now = int(time.time())
    claims = {
        "iss": client_id_for(alg),
        "sub": overrides.get("sub", client_id_for(alg)),
        "aud": overrides.get("aud", server.issuer),
        "iat": now,
        "nbf": now,
        "exp": now + overrides.get("exp_after", 10),
        "jti": overrides.get("jti", secrets.token_urlsafe(32)),
    }
    header = {
        "alg": alg,
        "typ": overrides.get("typ", "client-authentication+jwt"),
        "kid": overrides.get("kid", key_for(alg, "assertion").thumbprint()),
    }
    return sign(key, header, claims)


def dpop_proof(server: AuthServer, alg: str, nonce: str | None = None) -> str:
    """A DPoP proof for POST to the token endpoint, signed by the (unregistered) DPoP key."""
    key = key_for(alg, "dpop")
    claims = {"jti": secrets.token_urlsafe(32), "htm": "POST", "htu": server.token_endpoint, "iat": int(time.time())}
    if nonce is not None:
        claims["nonce"] = nonce
    header = {"alg": alg, "typ": "dpop+jwt", "jwk": key.export_public(as_dict=True)}
    return sign(key, header, claims)


def token_request(
    http: httpx.Client, server: AuthServer, alg: str, assertion: str, proof: str | None, scope: str = SCOPE
) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id_for(alg),
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    headers = {"DPoP": proof} if proof is not None else {}
    return http.post(server.token_endpoint, data=form, headers=headers)


def get_nonce(http: httpx.Client, server: AuthServer, alg: str = "ES256") -> str:
    """Spend one correct assertion to learn the current DPoP nonce."""
    response = token_request(http, server, alg, client_assertion(server, alg), dpop_proof(server, alg))
    assert response.status_code == 400
    assert response.json()["error"] == "use_dpop_nonce"
    return response.headers["DPoP-Nonce"]


def assert_refused(server: AuthServer, response: httpx.Response, status: int, error: str, detail: str) -> None:
    """The response is ``status``/``error`` and the server logged ``detail`` for it (last log line).

    ``detail`` is looked for in ``error_detail`` (only in the log), else ``error_description``.
    """
    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert "access_token" not in response.json()
    last = server.error_log()[-1]
    assert (last["event"], last["error"]) == ("grant.error", error)
    assert detail in last.get("error_detail", last["error_description"])


@pytest.mark.parametrize(("assertion_alg", "dpop_alg"), list(itertools.product(HAPPY_ALGS, HAPPY_ALGS)))
def test_nonce_round_trip_yields_dpop_bound_jwt(http, server, assertion_alg, dpop_alg):
    first = token_request(
        http, server, assertion_alg, client_assertion(server, assertion_alg), dpop_proof(server, dpop_alg)
    )
    assert first.status_code == 400
    assert first.json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]

    retry = token_request(
        http, server, assertion_alg, client_assertion(server, assertion_alg), dpop_proof(server, dpop_alg, nonce)
    )
    assert retry.status_code == 200, retry.text
    body = retry.json()
    assert body["token_type"] == "DPoP"
    assert body["scope"] == SCOPE
    assert 0 < body["expires_in"] <= 300

    jwks = jwk.JWKSet.from_json(http.get(server.jwks_uri).text)
    assert all("d" not in k for k in json.loads(jwks.export(private_keys=False))["keys"])
    access_token = jwt.JWT(jwt=body["access_token"], key=jwks, algs=["RS256"])
    claims = json.loads(access_token.claims)
    assert claims["cnf"]["jkt"] == key_for(dpop_alg, "dpop").thumbprint()
    assert claims["iss"] == server.issuer
    assert claims["aud"] == RESOURCE
    assert claims["client_id"] == client_id_for(assertion_alg)
    assert claims["scope"] == SCOPE


@pytest.mark.parametrize("alg", ALGS)
def test_every_profile_alg_is_accepted_for_both_keys(http, server, alg):
    nonce = get_nonce(http, server, alg)
    response = token_request(http, server, alg, client_assertion(server, alg), dpop_proof(server, alg, nonce))
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"


def test_reused_assertion_is_refused(http, server):
    assertion = client_assertion(server, "ES256")
    first = token_request(http, server, "ES256", assertion, dpop_proof(server, "ES256"))
    assert first.json()["error"] == "use_dpop_nonce"
    retry = token_request(http, server, "ES256", assertion, dpop_proof(server, "ES256", first.headers["DPoP-Nonce"]))
    assert_refused(server, retry, 401, "invalid_client", "client assertion tokens must only be used once")


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        pytest.param(
            {"aud": "{issuer}/"},
            "audience (aud) must equal the endpoint url, issuer identifier or token endpoint url",
            id="aud-trailing-slash",
        ),
        pytest.param(
            {"aud": "{token_endpoint}"}, "client assertion aud must be the issuer identifier", id="aud-token-endpoint"
        ),
        pytest.param({"aud": ["{issuer}"]}, "client assertion aud must be the issuer identifier", id="aud-array"),
        pytest.param({"typ": "JWT"}, "client assertion typ must be client-authentication+jwt", id="typ-JWT"),
        pytest.param({"exp_after": 61}, "exp at most 60s after iat", id="exp-too-far"),
    ],
)
def test_bad_assertion_is_refused(http, server, overrides, detail):
    fill = {"issuer": server.issuer, "token_endpoint": server.token_endpoint}
    aud = overrides.get("aud")
    if isinstance(aud, str):
        overrides = {**overrides, "aud": aud.format(**fill)}
    elif isinstance(aud, list):
        overrides = {**overrides, "aud": [a.format(**fill) for a in aud]}
    nonce = get_nonce(http, server)
    response = token_request(
        http, server, "ES256", client_assertion(server, "ES256", **overrides), dpop_proof(server, "ES256", nonce)
    )
    assert_refused(server, response, 401, "invalid_client", detail)


@pytest.mark.parametrize(
    ("kid_of", "detail"),
    [
        pytest.param("registered", "signature verification failed", id="registered-kid"),
        pytest.param("unregistered", "no applicable key found in the JSON Web Key Set", id="own-kid"),
    ],
)
def test_assertion_signed_with_unregistered_key_is_refused(http, server, kid_of, detail):
    stranger = jwk.JWK.generate(kty="EC", crv="P-256")
    kid = key_for("ES256", "assertion").thumbprint() if kid_of == "registered" else stranger.thumbprint()
    nonce = get_nonce(http, server)
    response = token_request(
        http,
        server,
        "ES256",
        client_assertion(server, "ES256", key=stranger, kid=kid),
        dpop_proof(server, "ES256", nonce),
    )
    assert_refused(server, response, 401, "invalid_client", detail)


def test_assertion_sub_other_than_client_id_is_refused(http, server):
    # oidc-provider finds the client by `sub` and refuses a mismatch with the client_id
    # parameter before any signature check (HelseID would likely say invalid_client).
    nonce = get_nonce(http, server)
    response = token_request(
        http, server, "ES256", client_assertion(server, "ES256", sub="someone-else"), dpop_proof(server, "ES256", nonce)
    )
    assert_refused(server, response, 400, "invalid_request", "client_id mismatch")


def test_missing_dpop_proof_is_refused(http, server):
    response = token_request(http, server, "ES256", client_assertion(server, "ES256"), proof=None)
    assert_refused(server, response, 400, "invalid_grant", "DPoP proof JWT not provided")


@pytest.mark.parametrize(
    ("client_alg", "scope"),
    [
        pytest.param("ES256", "nhn:unknown/api", id="unknown-scope"),
        pytest.param("ES256", "nhn:other/api", id="scope-not-granted-to-client"),
    ],
)
def test_scope_not_allowed_is_refused(http, server, client_alg, scope):
    nonce = get_nonce(http, server)
    response = token_request(
        http, server, client_alg, client_assertion(server, client_alg), dpop_proof(server, "ES256", nonce), scope=scope
    )
    assert_refused(server, response, 400, "invalid_scope", "requested scope is not allowed")


def test_server_log_holds_no_tokens(server):
    # Runs last in this module: by now the log holds every refusal above. JWTs start with "eyJ".
    log = server.stderr_log_path.read_text(encoding="utf-8")
    assert '"event":"grant.error"' in log
    assert "eyJ" not in log


def test_access_token_lifetime_from_the_environment(http, monkeypatch):
    """AUTHSERVER_ACCESS_TOKEN_TTL (seconds) overrides the configured lifetime (short tokens for
    the long-upload test and ``python -m demo --token-ttl``); a bad value stops the server."""
    monkeypatch.setenv("AUTHSERVER_ACCESS_TOKEN_TTL", "7")
    clients = [{"client_id": client_id_for("ES256"), "jwks": {"keys": [registered_jwk("ES256")]}, "scope": SCOPE}]
    with running_authserver(clients, access_token_ttl=300) as srv:
        nonce = get_nonce(http, srv)
        answer = token_request(http, srv, "ES256", client_assertion(srv, "ES256"), dpop_proof(srv, "ES256", nonce))
        assert answer.status_code == 200, answer.text
        claims = json.loads(jwt.JWT(jwt=answer.json()["access_token"], key=jwk.JWKSet.from_json(
            http.get(srv.jwks_uri).text), algs=["RS256"]).claims)  # fmt: skip
    assert answer.json()["expires_in"] == 7 and claims["exp"] - claims["iat"] == 7
    monkeypatch.setenv("AUTHSERVER_ACCESS_TOKEN_TTL", "7s")
    with pytest.raises(AuthServerError, match="AUTHSERVER_ACCESS_TOKEN_TTL must be a positive integer"):
        with running_authserver(clients):
            pass
