"""End to end: keys in a real SoftHSM token, the real ``helseid-signer serve`` process,
the client library, and oidc-provider configured like HelseID.

Oracles are independent: jwcrypto verifies assertions, proofs and access tokens;
oidc-provider decides whether a token request is acceptable.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from jwcrypto import jwk, jws, jwt

from demo.deft_api import DeftApi
from helseid_signer_client import (
    AsyncSignerClient,
    AsyncTokenClient,
    DPoPAuth,
    SignerClient,
    TokenClient,
    TokenError,
)
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
    keys = {
        "assertion": ("RSA-2048", "PS256"),
        "dpop": ("EC-P256", "ES256"),
        "stranger": ("EC-P256", "ES256"),
        "dpop-next": ("EC-P384", "ES384"),
    }
    jwks = {name: keys_create(token, name, spec, alg) for name, (spec, alg) in keys.items()}
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client]) as auth, DeftApi(auth.issuer) as api:
        config = write_config(
            folder / "signer.toml",
            token,
            issuer=auth.issuer,
            client_id=CLIENT_ID,
            keys={name: alg for name, (_, alg) in keys.items()},
            profiles={"app": ("assertion", "dpop"), "unregistered": ("stranger", "dpop")},
            api_base_urls=(api.base_url + "/api",),
        )
        rotated = write_config(
            folder / "signer-rotated.toml",
            token,
            issuer=auth.issuer,
            client_id=CLIENT_ID,
            keys={"assertion": "PS256", "dpop-next": "ES384"},
            profiles={"app": ("assertion", "dpop-next")},
            api_base_urls=(api.base_url + "/api",),
        )
        env = {"SOFTHSM2_CONF": str(token.conf)}
        with running_signer(config, env=env) as address, running_signer(rotated, env=env) as rotated_address:
            with SignerClient(address) as signer:
                yield {
                    "auth": auth,
                    "signer": signer,
                    "address": address,
                    "rotated_address": rotated_address,
                    "jwks": jwks,
                    "token": token,
                    "api": api,
                }


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


@pytest.mark.parametrize("require_nonce", [False, True], ids=["no-nonce", "api-nonce"])
def test_dpop_auth_calls_protected_api(world, require_nonce):
    seen: list[tuple[str, str, str]] = []  # (path, Authorization, DPoP) as sent: auth flows reuse the object

    def record(r: httpx.Request) -> None:
        seen.append((r.url.path, r.headers.get("Authorization", ""), r.headers.get("DPoP", "")))

    api = world["api"].reset(require_nonce=require_nonce)
    with TokenClient(world["signer"], "app", SCOPE) as tokens:
        hooks = {"request": [record]}
        with httpx.Client(auth=DPoPAuth(tokens), event_hooks=hooks, base_url=api.base_url) as client:
            first = client.post(
                "/api/objects/initialization",
                json={"fileName": "a", "senderHerId": 8142987, "receiverHerIds": [8142988]},
            )
            first_seen = api.state.log[-1]
            upload = client.post(
                "/api/objects?SenderHerId=8142987&ReceiverHerIds=8142988#x", files={"file": ("a.xml", b"x" * 1000)}
            )
            key = upload.json()["key"]
            again = client.get(f"/api/objects/{key}/download-status?page=2")
    assert first.status_code == 200, first.text
    # What the API saw: the token's client_id and scope, the proof's htu (no query, no fragment).
    assert (first_seen.client_id, first_seen.scope) == (CLIENT_ID, SCOPE)
    assert first_seen.htu == api.base_url + "/api/objects/initialization"
    assert upload.status_code == 201 and api.state.objects[key].size == 1000
    assert api.state.objects[key].sender_her_id == 8142987
    assert api.state.log[-2].htu == api.base_url + "/api/objects"
    assert again.status_code == 200 and again.json() == {"receiverDownloadStatus": {"8142988": False}}
    # One nonce challenge at most (the first call), then the remembered nonce is reused.
    assert api.state.accepted == 3
    api_calls = [r for r in seen if r[0].startswith("/api/")]
    assert len(api_calls) == (4 if require_nonce else 3)
    proofs = [dpop for _, _, dpop in api_calls]
    assert len(set(proofs)) == len(proofs), "a new proof for every request and retry"
    assert all(authz.startswith("DPoP ") for _, authz, _ in api_calls)


def test_dpop_auth_async_with_concurrent_requests_shares_one_token(world):
    async def run() -> tuple[list[int], int, int]:
        posts: list[httpx.Request] = []

        async def record(request: httpx.Request) -> None:
            if request.method == "POST":
                posts.append(request)

        async with AsyncSignerClient(world["address"]) as signer:
            http = httpx.AsyncClient(event_hooks={"request": [record]})
            async with AsyncTokenClient(signer, "app", SCOPE, http=http) as tokens:
                api = world["api"].reset(require_nonce=False)
                status = f"/api/objects/{api.put_object(b'x')}/download-status"
                async with httpx.AsyncClient(auth=DPoPAuth(tokens), base_url=api.base_url) as client:
                    answers = await asyncio.gather(*(client.get(status) for _ in range(20)))
                    accepted = api.state.accepted
            await http.aclose()
        return [a.status_code for a in answers], len(posts), accepted

    statuses, token_posts, accepted = asyncio.run(run())
    assert statuses == [200] * 20 and accepted == 20
    assert token_posts == 2, "one token request (plus its nonce retry) for 20 concurrent calls"


def test_rotated_dpop_key_makes_the_client_fetch_a_new_token(world):
    api = world["api"].reset(require_nonce=False)
    status = f"/api/objects/{api.put_object(b'x')}/download-status"
    with TokenClient(world["signer"], "app", SCOPE) as tokens:
        auth = DPoPAuth(tokens)
        with httpx.Client(auth=auth, base_url=api.base_url) as client:
            assert client.get(status).status_code == 200
            old = tokens.get_token()
            # The signer restarts with a new DPoP key for the same profile.
            with SignerClient(world["rotated_address"]) as rotated:
                tokens.signer = rotated
                answer = client.get(status)
                new = tokens.get_token()
    assert answer.status_code == 200, answer.text
    assert old.jkt == jwk.JWK(**world["jwks"]["dpop"]).thumbprint()
    assert new.jkt == jwk.JWK(**world["jwks"]["dpop-next"]).thumbprint() != old.jkt


def test_requests_auth_calls_the_protected_api_with_its_nonce(world):
    """The `requests` extra end to end: oidc-provider's token through the real signer, the
    DEFT stand-in demanding its nonce, an upload whose body arrives whole."""
    import requests

    from helseid_signer_client.requests_auth import RequestsDPoPAuth

    api = world["api"].reset(require_nonce=True)
    key = api.put_object(b"seed")
    status_url = f"{api.base_url}/api/objects/{key}/download-status"
    with TokenClient(world["signer"], "app", SCOPE) as tokens, requests.Session() as session:
        session.auth = RequestsDPoPAuth(tokens, session=session)
        first = session.get(status_url, timeout=10)
        upload = session.post(
            api.base_url + "/api/objects?SenderHerId=8142987&ReceiverHerIds=8142988",
            files={"file": ("x.bin", b"x" * 1000)},
            timeout=10,
        )
    assert first.status_code == 200, first.text
    assert first.json() == {"receiverDownloadStatus": {"2": False}}
    seen = api.state.log[-2]
    assert (seen.client_id, seen.scope, seen.htu) == (CLIENT_ID, SCOPE, status_url)
    assert upload.status_code == 201, upload.text
    assert api.state.objects[upload.json()["key"]].size == 1000
    assert api.state.accepted == 2, "the nonce retry of the first call, then the remembered nonce"
