"""``DPoPAuth`` with httpx against a loopback resource server that demands its own nonce,
refuses tokens, redirects and sends bad nonces when told to, and records every byte it got
(tests/support/dpop_resource.py). Tokens come from oidc-provider through the real signer
(tests/support/client_world.py). Rules under test: docs/client.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from helseid_signer_client import (
    AsyncSignerClient,
    AsyncTokenClient,
    DPoPAuth,
    RedirectRefused,
    SignerClient,
    SignerError,
    TokenClient,
    TokenError,
    UnreplayableBodyError,
)
from tests.support.client_world import CLIENT_ID, PROFILE, SCOPE, client_world
from tests.support.signer_proc import running_signer
from tests.support.signerkit import write_config

DATA = os.urandom(300_000)  # 300 kB: several 64 KiB chunks
SHA = hashlib.sha256(DATA).hexdigest()
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with client_world(tmp_path_factory.mktemp("client-httpx")) as w, SignerClient(w.address) as signer:
        w.signer = signer
        yield w


@pytest.fixture
def data_file():
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.seek(0)
        yield f


def chunks(data: bytes, size: int = 65_536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def achunks(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class OneShotReader:
    """A file-like object that can be read once and not sought (a pipe, a socket)."""

    def __init__(self, data: bytes) -> None:
        self._chunks = chunks(data)

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def token_client(world, **kwargs) -> tuple[TokenClient, list[httpx.Request]]:
    """A fresh TokenClient whose token-endpoint POSTs are recorded."""
    posts: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [lambda r: posts.append(r) if r.method == "POST" else None]})
    return TokenClient(world.signer, PROFILE, SCOPE, http=http, **kwargs), posts


def api_client(world, tokens, **kwargs) -> httpx.Client:
    return httpx.Client(auth=DPoPAuth(tokens), base_url=world.api.base_url, timeout=15, **kwargs)


def uploads(world) -> list:
    return [s for s in world.api.state.seen if s.method in ("POST", "PUT")]


# 1. Bodies: never lost, never short -----------------------------------------------------


BODIES = {
    "bytes": lambda f: {"content": DATA},
    "seekable-file": lambda f: {"content": f},
    "generator": lambda f: {"content": chunks(DATA)},
    "one-shot-iterator": lambda f: {"content": iter(list(chunks(DATA)))},
    "multipart-seekable-file": lambda f: {"files": {"file": ("a.bin", f)}, "data": {"SenderHerId": "8142987"}},
    "multipart-one-shot-file": lambda f: {"files": {"file": ("a.bin", OneShotReader(DATA))}},
}


CHALLENGES = {
    "nonce": {"require_nonce": True},  # the API demands its nonce on the process's first call
    "refused-token": {"refuse_token": 1},  # the API refuses the first token it sees
}


@pytest.mark.parametrize("challenge", list(CHALLENGES))
@pytest.mark.parametrize("kind", list(BODIES))
def test_first_upload_arrives_whole(world, data_file, kind, challenge):
    """Every body kind arrives exactly as sent, and no request ever carried a short body:
    a replayable body is sent again whole, a read-once body is sent once (the HEAD before
    it met the challenge)."""
    world.api.reset(**CHALLENGES[challenge])
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens) as client:
        answer = client.post("/api/upload?SenderHerId=8142987", **BODIES[kind](data_file))
    assert answer.status_code == 201, answer.text
    received = answer.json()
    if kind.startswith("multipart"):
        assert received["parts"]["file"] == SHA
        assert {s.parts["file"] for s in uploads(world)} == {SHA}, "every attempt carried every byte"
    else:
        assert (received["length"], received["sha256"]) == (len(DATA), SHA)
        assert {s.sha256 for s in uploads(world)} == {SHA}, "every attempt carried every byte"
    assert [s.status for s in uploads(world)].count(201) == 1


@pytest.mark.parametrize("challenge", list(CHALLENGES))
@pytest.mark.parametrize(
    "body",
    [lambda: chunks(b""), lambda: iter([]), lambda: b""],
    ids=["empty-generator", "empty-iterator", "empty-bytes"],
)
def test_empty_upload_arrives_as_empty(world, body, challenge):
    world.api.reset(**CHALLENGES[challenge])
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens) as client:
        answer = client.post("/api/upload", content=body())
    assert answer.status_code == 201, answer.text
    assert (answer.json()["length"], answer.json()["sha256"]) == (0, EMPTY_SHA)
    assert all(s.body == b"" for s in uploads(world))


def test_one_probe_per_origin_when_the_api_wants_no_nonce(world):
    world.api.reset(require_nonce=False)
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens) as client:
        answers = [client.post("/api/upload", content=chunks(DATA)).status_code for _ in range(3)]
    assert answers == [201, 201, 201]
    assert [s.method for s in world.api.state.seen] == ["HEAD", "POST", "POST", "POST"]


def test_async_iterator_upload_arrives_whole(world):
    async def run() -> httpx.Response:
        async with AsyncSignerClient(world.address) as signer:
            async with AsyncTokenClient(signer, PROFILE, SCOPE) as tokens:
                async with httpx.AsyncClient(auth=DPoPAuth(tokens), base_url=world.api.base_url) as client:
                    return await client.post("/api/upload", content=achunks(DATA))

    world.api.reset(require_nonce=True)
    answer = asyncio.run(run())
    assert answer.status_code == 201, answer.text
    assert (answer.json()["length"], answer.json()["sha256"]) == (len(DATA), SHA)
    assert {s.sha256 for s in uploads(world)} == {SHA}
    assert [s.method for s in world.api.state.seen][0] == "HEAD", "the nonce was learnt before the body"


@pytest.mark.parametrize(
    "body", [lambda: chunks(DATA), lambda: iter(list(chunks(DATA)))], ids=["generator", "one-shot-iterator"]
)
def test_a_challenge_to_a_one_shot_body_is_an_error_never_a_short_upload(world, body):
    """The server rotates its nonce between two calls: the one-shot body that was challenged
    cannot be sent again - the application gets UnreplayableBodyError, never a 201 for an
    empty body - and its next attempt, with a fresh body, carries the new nonce."""
    script = world.api.reset(require_nonce=True)
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens) as client:
        assert client.get("/api/whoami").status_code == 200  # learns the nonce
        script.rotate_nonce()
        with pytest.raises(UnreplayableBodyError) as caught:
            client.post("/api/upload", content=body())
        assert caught.value.reason == "use_dpop_nonce" and caught.value.response.status_code == 401
        again = client.post("/api/upload", content=body())
    assert again.status_code == 201 and again.json()["sha256"] == SHA
    assert [s.status for s in uploads(world)] == [401, 201]
    assert {s.sha256 for s in uploads(world)} == {SHA}


def test_without_the_probe_a_one_shot_body_is_refused_not_resent(world):
    world.api.reset(require_nonce=True)
    tokens, _ = token_client(world)
    with tokens, httpx.Client(auth=DPoPAuth(tokens, probe_nonce=False), base_url=world.api.base_url) as client:
        with pytest.raises(UnreplayableBodyError):
            client.post("/api/upload", content=chunks(DATA))
    assert [(s.method, s.status) for s in world.api.state.seen] == [("POST", 401)]


# 2. A refused token is replaced, once -----------------------------------------------------


def test_refused_token_is_replaced_and_the_request_sent_again(world, data_file):
    world.api.reset(require_nonce=True)
    tokens, posts = token_client(world)
    with tokens, api_client(world, tokens) as client:
        assert client.get("/api/whoami").status_code == 200
        world.api.state.refuse_token = 1
        answer = client.post("/api/upload", content=data_file)
        current = tokens.get_token()
    assert answer.status_code == 201 and answer.json()["sha256"] == SHA
    refused, accepted = uploads(world)
    assert refused.status == 401 and accepted.status == 201
    assert refused.token != accepted.token == current.access_token, "a new token, from the TokenClient's cache"
    assert len(posts) == 3, "two token requests; the first learnt the nonce, the second used it"


def test_a_second_refusal_goes_to_the_application(world):
    world.api.reset(require_nonce=False, refuse_token=10)
    tokens, posts = token_client(world)
    with tokens, api_client(world, tokens) as client:
        answer = client.post("/api/upload", content=DATA)
    assert answer.status_code == 401 and 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
    assert len(uploads(world)) == 2, "one retry, never a loop"
    assert len(posts) == 3, "one new token, not one per refusal"


def test_refused_token_with_a_one_shot_body_drops_the_token_and_raises(world):
    world.api.reset(require_nonce=False)
    tokens, _ = token_client(world)
    with tokens, httpx.Client(auth=DPoPAuth(tokens, probe_nonce=False), base_url=world.api.base_url) as client:
        old = tokens.get_token()
        world.api.state.refuse_token = 1
        with pytest.raises(UnreplayableBodyError) as caught:
            client.post("/api/upload", content=chunks(DATA))
        assert caught.value.reason == "invalid_token"
        assert tokens.get_token().access_token != old.access_token
        again = client.post("/api/upload", content=chunks(DATA))
    assert again.status_code == 201 and again.json()["sha256"] == SHA


# 3. Redirects never carry the token or the proof -----------------------------------------


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
@pytest.mark.parametrize("where", ["cross-origin", "same-origin-outside-bases"])
def test_redirect_is_refused_and_its_target_gets_nothing(world, follow, where):
    target = world.other.base_url + "/steal" if where == "cross-origin" else "/elsewhere/steal"
    world.api.reset(redirects={"/api/moved": target})
    world.other.reset()
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens, follow_redirects=follow) as client:
        try:
            client.post("/api/moved", content=DATA)
            refused = None
        except RedirectRefused as exc:
            refused = exc
        assert client.get("/api/whoami").status_code == 200  # the auth works on after a refusal
    stolen = [s for s in world.other.state.seen + world.api.state.seen if "steal" in s.path]
    assert [(s.headers.get("authorization"), s.headers.get("dpop")) for s in stolen] == [], "target got nothing"
    assert refused is not None and refused.url == world.api.base_url + "/api/moved"
    if not follow:
        assert refused.response.status_code == 307


def test_an_applications_own_trace_extension_is_still_called(world):
    world.api.reset()
    events: list[str] = []
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens, follow_redirects=True) as client:
        answer = client.get("/api/whoami", extensions={"trace": lambda name, info: events.append(name)})
    assert answer.status_code == 200
    assert "http11.send_request_headers.started" in events and "http11.receive_response_headers.complete" in events


def test_async_client_following_redirects_stops_before_the_next_hop(world):
    async def run() -> RedirectRefused | None:
        async with AsyncSignerClient(world.address) as signer, AsyncTokenClient(signer, PROFILE, SCOPE) as tokens:
            auth = DPoPAuth(tokens)
            async with httpx.AsyncClient(auth=auth, base_url=world.api.base_url, follow_redirects=True) as client:
                try:
                    await client.get("/api/moved")
                except RedirectRefused as exc:
                    return exc
        return None

    world.api.reset(redirects={"/api/moved": world.other.base_url + "/steal"})
    world.other.reset()
    refused = asyncio.run(run())
    assert world.other.state.seen == [], "the redirect target received nothing"
    assert refused is not None and refused.location == world.other.base_url + "/steal"


# 4. Nonces are checked before they are stored --------------------------------------------


BAD_NONCES = ["has space", 'quote"d', "back\\slash", "x" * 513, "tab\tbed"]


@pytest.mark.parametrize("bad", BAD_NONCES, ids=["space", "quote", "backslash", "513-chars", "tab"])
@pytest.mark.parametrize("require_nonce", [False, True], ids=["on-200", "on-challenge"])
def test_a_bad_nonce_does_not_poison_later_requests(world, bad, require_nonce):
    world.api.reset(require_nonce=require_nonce, bad_nonce_once=bad)
    tokens, _ = token_client(world)
    with tokens, api_client(world, tokens) as client:
        first = client.get("/api/whoami")
        later = [client.get("/api/whoami").status_code for _ in range(2)]
    # A challenge whose nonce is unusable is not answered: that 401 goes to the application.
    assert first.status_code == (401 if require_nonce else 200)
    assert later == [200, 200]
    assert all(s.proof is None or s.proof.get("nonce") != bad for s in world.api.state.seen)


def _bad_nonce_once(bad: str, status: int):
    done = []

    def hook(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.status_code == status and not done:
            done.append(True)
            response.headers["DPoP-Nonce"] = bad

    return hook


@pytest.mark.parametrize("bad", BAD_NONCES, ids=["space", "quote", "backslash", "513-chars", "tab"])
def test_token_client_ignores_a_bad_nonce_in_a_challenge(world, bad):
    """oidc-provider's nonce challenge arrives with a bad DPoP-Nonce once: that token request
    fails with the server's own error, and the next one works (nothing was stored)."""
    http = httpx.Client(event_hooks={"response": [_bad_nonce_once(bad, 400)]})
    with TokenClient(world.signer, PROFILE, SCOPE, http=http) as tokens:
        with pytest.raises(TokenError) as caught:
            tokens.get_token()
        assert caught.value.error == "use_dpop_nonce" and caught.value.status_code == 400
        assert tokens.get_token().token_type == "DPoP"
    http.close()


def test_token_client_ignores_a_bad_nonce_on_a_token_answer(world):
    http = httpx.Client(event_hooks={"response": [_bad_nonce_once("bad nonce", 200)]})
    with TokenClient(world.signer, PROFILE, SCOPE, http=http) as tokens:
        first = tokens.get_token()
        tokens.invalidate(first)
        try:
            second = tokens.get_token()
        except SignerError as exc:  # the bad nonce went to the signer
            pytest.fail(f"a bad nonce was stored: {exc}")
    http.close()
    assert second.access_token != first.access_token


# The token endpoint never forwards a client assertion --------------------------------------


def test_token_client_does_not_follow_a_token_endpoint_redirect(world, tmp_path):
    from tests.support.dpop_resource import RecordingApi

    with RecordingApi() as fake_issuer:
        issuer = fake_issuer.base_url
        fake_issuer.reset(redirects={"/connect/token": world.other.base_url + "/connect/token"})
        fake_issuer.state.documents = {
            "/.well-known/openid-configuration": {"issuer": issuer, "token_endpoint": issuer + "/connect/token"}
        }
        world.other.reset()
        config = write_config(
            tmp_path / "redirecting.toml",
            world.token,
            issuer=issuer,
            client_id=CLIENT_ID,
            keys={"assertion": "PS256", "dpop": "ES256"},
            profiles={PROFILE: ("assertion", "dpop")},
        )
        with running_signer(config, env={"SOFTHSM2_CONF": str(world.token.conf)}) as address:
            with SignerClient(address) as signer, httpx.Client(follow_redirects=True) as http:
                with TokenClient(signer, PROFILE, SCOPE, http=http) as tokens, pytest.raises(TokenError) as caught:
                    tokens.get_token()
    assert caught.value.error == "redirect_refused" and caught.value.status_code == 307
    assert world.other.state.seen == [], "the client assertion went nowhere else"
