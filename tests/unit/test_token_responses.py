"""The client's reading of token-endpoint and resource-server answers (RFC 6749 5.1/5.2,
RFC 9449 sections 5, 7 and 8, HelseID's ``rejected_scope``), on constructed responses."""

from __future__ import annotations

import httpx
import pytest

from helseid_signer_client import TokenError
from helseid_signer_client.dpop import is_nonce_challenge
from helseid_signer_client.errors import DiscoveryError
from helseid_signer_client.signer import ClientProfile
from helseid_signer_client.token import check_discovery, nonce_challenge, parse_token_response

OK = {"access_token": "eyJ.a.b", "token_type": "DPoP", "expires_in": 300, "scope": "nhn:deft/api"}


def _response(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def test_a_dpop_token_is_accepted_and_expires_relative_to_now():
    token = parse_token_response(_response(200, OK), jkt="jkt-1", now=1000.0)
    assert (token.token_type, token.expires_at, token.scope, token.jkt) == ("DPoP", 1300.0, "nhn:deft/api", "jkt-1")
    assert "eyJ" not in repr(token)  # the token never shows in logs or tracebacks
    assert parse_token_response(_response(200, dict(OK, token_type="dpop")), "j", 0).token_type == "DPoP"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"token_type": "Bearer"}, "invalid_token_type"),  # a proof was sent: a Bearer token is refused
        ({"token_type": None}, "invalid_token_type"),
        ({"access_token": ""}, "invalid_response"),
        ({"access_token": "tøken"}, "invalid_response"),
        ({"expires_in": 0}, "invalid_response"),
        ({"expires_in": "300"}, "invalid_response"),
        ({"expires_in": True}, "invalid_response"),
    ],
)
def test_unusable_success_answers_are_refused(change, error):
    with pytest.raises(TokenError) as caught:
        parse_token_response(_response(200, dict(OK, **change)), "j", 0)
    assert caught.value.error == error


def test_error_answer_carries_helseid_fields():
    body = {"error": "invalid_scope", "error_description": "terms not accepted", "rejected_scope": "nhn:deft/api"}
    with pytest.raises(TokenError) as caught:
        parse_token_response(_response(400, body), "j", 0)
    e = caught.value
    assert (e.status_code, e.error, e.error_description, e.rejected_scope) == (
        400, "invalid_scope", "terms not accepted", "nhn:deft/api",
    )  # fmt: skip
    assert "rejected_scope: nhn:deft/api" in str(e)


def test_non_json_error_answer():
    with pytest.raises(TokenError) as caught:
        parse_token_response(httpx.Response(502, text="<html>bad gateway</html>"), "j", 0)
    assert caught.value.error == "invalid_response" and caught.value.status_code == 502


def test_nonce_challenge_at_the_token_endpoint():
    challenge = _response(400, {"error": "use_dpop_nonce"}, {"DPoP-Nonce": "n-1"})
    assert nonce_challenge(challenge) == "n-1"
    assert nonce_challenge(_response(400, {"error": "invalid_client"}, {"DPoP-Nonce": "n-1"})) is None
    assert nonce_challenge(_response(401, {"error": "use_dpop_nonce"}, {"DPoP-Nonce": "n-1"})) is None
    # A nonce the client cannot put in a proof (RFC 9449 section 8.1) is no challenge.
    assert nonce_challenge(_response(400, {"error": "use_dpop_nonce"}, {"DPoP-Nonce": "n 1"})) is None
    assert nonce_challenge(_response(400, {"error": "use_dpop_nonce"}, {"DPoP-Nonce": "n" * 513})) is None


def test_token_endpoint_redirect_is_refused():
    redirect = httpx.Response(307, headers={"Location": "https://elsewhere.example/token"})
    with pytest.raises(TokenError) as caught:
        parse_token_response(redirect, "j", 0)
    assert caught.value.error == "redirect_refused" and caught.value.status_code == 307


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n"}, True),
        (401, {"WWW-Authenticate": 'DPoP algs="ES256", error="use_dpop_nonce"', "DPoP-Nonce": "n"}, True),
        (401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"'}, False),  # no nonce to use
        (401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "a b"}, False),  # not NQCHAR
        (401, {"WWW-Authenticate": 'Bearer error="use_dpop_nonce"', "DPoP-Nonce": "n"}, False),
        (401, {"WWW-Authenticate": 'DPoP error="invalid_token"', "DPoP-Nonce": "n"}, False),
        (400, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n"}, False),
    ],
)
def test_resource_server_nonce_challenge(status, headers, expected):
    assert is_nonce_challenge(httpx.Response(status, headers=headers)) is expected


def test_discovery_must_match_the_signer_profile_exactly():
    profile = ClientProfile("c", "https://helseid-sts.test.nhn.no", "https://helseid-sts.test.nhn.no/connect/token",
                            "PS256", "kid", "ES256", "jkt", 10)  # fmt: skip
    good = {"issuer": profile.issuer, "token_endpoint": profile.token_endpoint}
    check_discovery(good, profile)
    for bad in ({**good, "issuer": profile.issuer + "/"}, {**good, "token_endpoint": profile.issuer + "/token"}):
        with pytest.raises(DiscoveryError):
            check_discovery(bad, profile)
