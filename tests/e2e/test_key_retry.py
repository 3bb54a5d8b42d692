"""The client's one retry with another key: a token request that HelseID (oidc-provider,
with a list of the kids it accepts for the client) refuses as ``invalid_client`` is sent
once more with a fresh assertion the signer signs with another registered key
(``avoid_kid``) - exactly once, never a loop - and, when the signer has no other key, the
first refusal is what the caller gets. Oracles: oidc-provider's verdict, the token requests
the client really sent (their assertions' ``kid`` read by jwcrypto)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

import httpx
import pytest
from jwcrypto import jwk, jws

from helseid_signer.rotation import RegistrationRecord, utc_text, write_record
from helseid_signer_client import AsyncSignerClient, AsyncTokenClient, SignerClient, TokenClient, TokenError
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

SCOPE = "nhn:deft/api"
CLIENT_ID = "retry-client"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("key-retry")
    token = create_token(folder / "token", label="retry")
    jwks = {name: keys_create(token, name, "EC-P256", "ES256") for name in ("cur", "nxt", "dpop")}
    kid = {name: jwk.JWK(**j).thumbprint() for name, j in jwks.items()}
    kids_file = folder / "kids.json"
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["cur"], jwks["nxt"]]}, "scope": SCOPE,
              "registered_kids_file": str(kids_file)}  # fmt: skip
    records = folder / "records"
    now = time.time()
    with running_authserver([client]) as auth:
        write_record(records, RegistrationRecord(kid["nxt"], CLIENT_ID, auth.issuer, utc_text(now),
                                                 utc_text(now + 86400 * 365), "selfservice-api"))  # fmt: skip
        config = write_config(
            folder / "signer.toml", token, issuer=auth.issuer, client_id=CLIENT_ID,
            keys={"cur": "ES256", "nxt": "ES256", "dpop": "ES256"},
            profiles={"two": ("cur", "dpop"), "one": ("cur", "dpop")},
            extra_profile_lines={"two": ["", "[profiles.two.rotation]", 'next_key = "nxt"']},
            extra_lines=("[selfservice]", f'records_dir = "{records}"'),
        )  # fmt: skip
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
            with SignerClient(address) as signer:
                yield {"signer": signer, "address": address, "kid": kid, "kids_file": kids_file}


def _accept(world, *names: str) -> None:
    world["kids_file"].write_text(json.dumps({"kids": [{"kid": world["kid"][n], "from": 0} for n in names]}))


def _assertion_kid(request: httpx.Request) -> str:
    form = urllib.parse.parse_qs(request.content.decode())
    token = jws.JWS()
    token.deserialize(form["client_assertion"][0])
    return token.jose_header["kid"]


def _token(world, profile: str) -> tuple[object, list[str]]:
    """Get a token through TokenClient; the kids of the assertions of its token requests."""
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with TokenClient(world["signer"], profile, SCOPE, http=http) as tokens:
        try:
            outcome: object = tokens.get_token()
        except TokenError as exc:
            outcome = exc
    posts = [r for r in sent if r.method == "POST"]
    return outcome, [_assertion_kid(r) for r in posts]


def test_a_refused_key_is_retried_once_with_the_other_registered_key(world):
    kid = world["kid"]
    _accept(world, "cur")  # HelseID has not taken the new key yet; the signer already signs with it
    token, kids = _token(world, "two")
    assert not isinstance(token, TokenError), token
    assert kids[0] == kid["nxt"] and kids[-1] == kid["cur"] and len(kids) <= 3


def test_never_a_loop_when_every_key_is_refused(world):
    kid = world["kid"]
    _accept(world)  # nothing accepted
    error, kids = _token(world, "two")
    assert isinstance(error, TokenError) and error.error == "invalid_client"
    # the first key (with its nonce retry) then the other key (with the nonce retry if not
    # used yet) - each retry at most once - then stop
    assert kids[0] == kid["nxt"] and kids[-1] == kid["cur"] and len(kids) <= 3


def test_without_another_key_the_first_refusal_is_returned(world):
    kid = world["kid"]
    _accept(world, "nxt")  # HelseID replaced the key; profile "one" has no other
    error, kids = _token(world, "one")
    assert isinstance(error, TokenError) and error.error == "invalid_client" and error.status_code == 401
    assert set(kids) == {kid["cur"]}  # no second key was ever used


def test_the_async_client_retries_the_same_way(world):
    kid = world["kid"]
    _accept(world, "cur")

    async def run() -> list[str]:
        sent: list[httpx.Request] = []

        async def hook(request: httpx.Request) -> None:
            sent.append(request)

        async with (
            AsyncSignerClient(world["address"]) as signer,
            httpx.AsyncClient(event_hooks={"request": [hook]}) as http,
        ):
            async with AsyncTokenClient(signer, "two", SCOPE, http=http) as tokens:
                await tokens.get_token()
        return [_assertion_kid(r) for r in sent if r.method == "POST"]

    kids = asyncio.run(run())
    assert kids[0] == kid["nxt"] and kids[-1] == kid["cur"] and len(kids) <= 3
