"""``RequestsDPoPAuth`` (the client's ``requests`` extra) against the same loopback
resource server as the httpx tests (tests/support/dpop_resource.py), with tokens from
oidc-provider through the real signer. Same rules as DPoPAuth: docs/client.md."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator

import httpx
import pytest
import requests

from helseid_signer_client import RedirectRefused, SignerClient, TokenClient, UnreplayableBodyError
from helseid_signer_client.requests_auth import RequestsDPoPAuth
from tests.support.client_world import PROFILE, SCOPE, client_world

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
EMPTY_SHA = hashlib.sha256(b"").hexdigest()
TIMEOUT = 15  # seconds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with client_world(tmp_path_factory.mktemp("client-requests")) as w, SignerClient(w.address) as signer:
        w.signer = signer
        yield w


@pytest.fixture
def data_file():
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.seek(0)
        yield f


@pytest.fixture
def tokens(world):
    posts: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [lambda r: posts.append(r) if r.method == "POST" else None]})
    with TokenClient(world.signer, PROFILE, SCOPE, http=http) as client:
        client.posts = posts
        yield client
    http.close()


@pytest.fixture
def session(tokens):
    with requests.Session() as s:
        s.auth = RequestsDPoPAuth(tokens, session=s)
        yield s


def chunks(data: bytes, size: int = 65_536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def uploads(world) -> list:
    return [s for s in world.api.state.seen if s.method in ("POST", "PUT")]


BODIES = {
    "bytes": lambda f: {"data": DATA},
    "seekable-file": lambda f: {"data": f},
    "generator": lambda f: {"data": chunks(DATA)},
    "multipart": lambda f: {"files": {"file": ("a.bin", f)}, "data": {"SenderHerId": "8142987"}},
}


CHALLENGES = {"nonce": {"require_nonce": True}, "refused-token": {"refuse_token": 1}}


@pytest.mark.parametrize("challenge", list(CHALLENGES))
@pytest.mark.parametrize("kind", list(BODIES))
def test_first_upload_arrives_whole(world, session, data_file, kind, challenge):
    world.api.reset(**CHALLENGES[challenge])
    answer = session.post(world.api.base_url + "/api/upload", timeout=TIMEOUT, **BODIES[kind](data_file))
    assert answer.status_code == 201, answer.text
    if kind == "multipart":
        assert answer.json()["parts"] == {"file": SHA, "SenderHerId": hashlib.sha256(b"8142987").hexdigest()}
        assert {s.parts["file"] for s in uploads(world)} == {SHA}
    else:
        assert (answer.json()["length"], answer.json()["sha256"]) == (len(DATA), SHA)
        assert {s.sha256 for s in uploads(world)} == {SHA}, "every attempt carried every byte"
    assert [s.status for s in uploads(world)].count(201) == 1


def test_empty_generator_upload_is_sent_once_as_empty(world, session):
    world.api.reset(require_nonce=True)
    answer = session.post(world.api.base_url + "/api/upload", data=chunks(b""), timeout=TIMEOUT)
    assert answer.status_code == 201 and answer.json()["sha256"] == EMPTY_SHA
    assert [s.method for s in world.api.state.seen] == ["HEAD", "HEAD", "POST"], "probe, its nonce retry, upload"


@pytest.mark.parametrize("body", [lambda: b"", lambda: None, lambda: iter([])], ids=["bytes", "none", "iterator"])
def test_empty_upload_arrives_as_empty(world, session, body):
    world.api.reset(require_nonce=True, refuse_token=1)
    answer = session.post(world.api.base_url + "/api/upload", data=body(), timeout=TIMEOUT)
    assert answer.status_code == 201 and (answer.json()["length"], answer.json()["sha256"]) == (0, EMPTY_SHA)
    assert all(s.body == b"" for s in world.api.state.seen)


def test_one_shot_body_without_a_probe_is_refused_not_resent(world, tokens):
    world.api.reset(require_nonce=True)
    with pytest.raises(UnreplayableBodyError) as caught:
        requests.post(
            world.api.base_url + "/api/upload", data=chunks(DATA), auth=RequestsDPoPAuth(tokens), timeout=TIMEOUT
        )
    assert caught.value.reason == "use_dpop_nonce" and caught.value.response.status_code == 401
    assert [s.status for s in uploads(world)] == [401]


def test_refused_token_is_replaced_once(world, session, data_file):
    world.api.reset(refuse_token=1)
    answer = session.put(world.api.base_url + "/api/upload", data=data_file, timeout=TIMEOUT)
    assert answer.status_code == 201 and answer.json()["sha256"] == SHA
    refused, accepted = uploads(world)
    assert refused.token != accepted.token == session.auth.token_client.get_token().access_token
    world.api.reset(refuse_token=10)
    again = session.post(world.api.base_url + "/api/upload", data=DATA, timeout=TIMEOUT)
    assert again.status_code == 401 and len(uploads(world)) == 2, "one retry, never a loop"


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
@pytest.mark.parametrize("where", ["cross-origin", "same-origin-outside-bases"])
def test_redirect_is_refused_and_its_target_gets_nothing(world, session, follow, where):
    target = world.other.base_url + "/steal" if where == "cross-origin" else "/elsewhere/steal"
    world.api.reset(redirects={"/api/moved": target})
    world.other.reset()
    try:
        session.post(world.api.base_url + "/api/moved", data=DATA, allow_redirects=follow, timeout=TIMEOUT)
        refused = None
    except RedirectRefused as exc:
        refused = exc
    stolen = [s for s in world.other.state.seen + world.api.state.seen if "steal" in s.path]
    assert [(s.headers.get("authorization"), s.headers.get("dpop")) for s in stolen] == [], "target got nothing"
    assert refused is not None and refused.response.status_code == 307
    assert session.get(world.api.base_url + "/api/whoami", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("bad", ["has space", 'quote"d', "x" * 513], ids=["space", "quote", "513-chars"])
def test_a_bad_nonce_does_not_poison_later_requests(world, session, bad):
    world.api.reset(require_nonce=True, bad_nonce_once=bad)
    first = session.get(world.api.base_url + "/api/whoami", timeout=TIMEOUT)
    later = [session.get(world.api.base_url + "/api/whoami", timeout=TIMEOUT).status_code for _ in range(2)]
    assert first.status_code == 401 and later == [200, 200]
