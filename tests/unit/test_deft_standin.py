"""The DEFT stand-in's DPoP checks (demo/deft_api.py ``check_request``), one by one, with
tokens and proofs made here with jwcrypto - so each refusal is for the reason named, and a
correct request passes. The stand-in is what the e2e tests and the benchmark trust to refuse
a bad proof; these tests make sure it would."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from pathlib import Path

import pytest
from jwcrypto import jwk, jwt

from demo.deft_api import ApiState, Refused, check_request

ISSUER, AUDIENCE = "http://127.0.0.1:1", "urn:nhn:deft"
URL = "http://127.0.0.1:2/api/objects/initialization"
AS_KEY = jwk.JWK.generate(kty="RSA", size=2048, kid="as")
DPOP_KEY = jwk.JWK.generate(kty="EC", crv="P-256")


def _sign(key: jwk.JWK, header: dict, claims: dict) -> str:
    token = jwt.JWT(header=header, claims=claims)
    token.make_signed_token(key)
    return token.serialize()


def access_token(**changes) -> str:
    """An access token as the authorization server issues it; ``changes`` replace claims (None
    drops one), ``_key`` signs with another key."""
    key = changes.pop("_key", AS_KEY)
    now = int(time.time())
    if changes.get("exp") == "1 s ago":  # computed when the test runs, not when it is collected
        changes["exp"] = now - 1
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "iat": now, "client_id": "c", "scope": "nhn:deft/api",
              "jti": secrets.token_urlsafe(8), "cnf": {"jkt": DPOP_KEY.thumbprint()}}  # fmt: skip
    claims.update(changes)
    return _sign(key, {"alg": "RS256", "kid": "as"}, {k: v for k, v in claims.items() if v is not None})


def proof(token: str, method: str = "POST", url: str = URL, key: jwk.JWK = DPOP_KEY, **changes) -> str:
    ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
    claims = {"jti": secrets.token_urlsafe(16), "htm": method, "htu": url, "iat": int(time.time()), "ath": ath}
    claims.update(changes)
    header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": key.export_public(as_dict=True)}
    return _sign(key, header, {k: v for k, v in claims.items() if v is not None})


@pytest.fixture
def state(tmp_path: Path) -> ApiState:
    keys = jwk.JWKSet()
    keys.add(jwk.JWK(**AS_KEY.export_public(as_dict=True)))
    return ApiState(issuer=ISSUER, audience=AUDIENCE, jwks=keys, folder=tmp_path)


def headers(token: str, dpop: str, scheme: str = "DPoP") -> dict[str, str]:
    return {"authorization": f"{scheme} {token}", "dpop": dpop}


def refused(state: ApiState, method: str, url: str, hdrs: dict[str, str]) -> tuple[str, str]:
    with pytest.raises(Refused) as caught:
        check_request(state, method, url, hdrs)
    return caught.value.error, caught.value.detail


def test_a_correct_request_passes_and_is_logged(state):
    token = access_token()
    claims, pclaims = check_request(state, "POST", URL + "?x=1#f", headers(token, proof(token)))
    assert claims["client_id"] == "c" and pclaims["htu"] == URL
    assert state.accepted == 1 and state.log[-1].path == "/api/objects/initialization"


@pytest.mark.parametrize(
    ("token_changes", "detail"),
    [
        ({"aud": "nhn:other"}, "wrong iss/aud or expired"),
        ({"iss": "http://elsewhere"}, "wrong iss/aud or expired"),
        ({"exp": "1 s ago"}, "wrong iss/aud or expired"),
        ({"cnf": None}, "not DPoP-bound"),
        ({"_key": jwk.JWK.generate(kty="RSA", size=2048, kid="as")}, "access token:"),
    ],
)
def test_bad_access_tokens_are_refused(state, token_changes, detail):
    token = access_token(**token_changes)
    error, text = refused(state, "POST", URL, headers(token, proof(token)))
    assert error == "invalid_token" and detail in text


def test_bearer_scheme_is_refused(state):
    token = access_token()
    assert refused(state, "POST", URL, headers(token, proof(token), scheme="Bearer"))[0] == "invalid_token"


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        (lambda t: proof(t, method="GET"), "htm"),
        (lambda t: proof(t, url=URL + "?x=1"), "htu"),  # htu must be without the query
        (lambda t: proof(t, url="http://127.0.0.1:2/api/objects"), "htu"),
        (lambda t: proof(t, iat=int(time.time()) - 30), "iat"),
        (lambda t: proof(t, iat=int(time.time()) + 30), "iat"),
        (lambda t: proof(t, ath="A" * 43), "ath"),
        (lambda t: proof(t, key=jwk.JWK.generate(kty="EC", crv="P-256")), "cnf.jkt"),
        (lambda t: proof(t, jti=None), "jti"),
        (lambda t: proof(t)[:-4] + "AAAA", "does not verify"),
    ],
)
def test_bad_proofs_are_refused(state, make, detail):
    token = access_token()
    error, text = refused(state, "POST", URL, headers(token, make(token)))
    assert error == "invalid_dpop_proof" and detail in text
    assert state.accepted == 0


def test_replayed_proof_is_refused(state):
    token = access_token()
    dpop = proof(token)
    check_request(state, "POST", URL, headers(token, dpop))
    assert refused(state, "POST", URL, headers(token, dpop)) == ("invalid_dpop_proof", "jti missing or replayed")


def test_own_nonce_is_demanded_and_the_previous_one_kept_for_a_period(state):
    state.require_nonce, state.nonce_lifetime = True, 3600.0
    token = access_token()
    assert refused(state, "POST", URL, headers(token, proof(token)))[0] == "use_dpop_nonce"
    assert refused(state, "POST", URL, headers(token, proof(token, nonce="other")))[0] == "use_dpop_nonce"
    first = state.current_nonce()
    check_request(state, "POST", URL, headers(token, proof(token, nonce=first)))
    state.nonce_since -= 3600  # the nonce's lifetime has passed
    second = state.current_nonce()
    assert second != first
    check_request(state, "POST", URL, headers(token, proof(token, nonce=first)))  # the previous one, still
    check_request(state, "POST", URL, headers(token, proof(token, nonce=second)))
    state.nonce_since -= 3600
    state.current_nonce()
    assert refused(state, "POST", URL, headers(token, proof(token, nonce=first)))[0] == "use_dpop_nonce"
