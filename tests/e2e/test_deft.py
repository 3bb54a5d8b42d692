"""DEFT-shaped traffic end to end (issue 14, points 5 and 6): keys in a real SoftHSM token, the
real ``helseid-signer serve`` process, oidc-provider configured like HelseID, the client
library's ``DPoPAuth``, and the DEFT stand-in (demo/deft_api.py), which checks every token and
proof with jwcrypto and demands its own nonce.

Bytes are the oracle: what is downloaded must have the SHA-256 of what was generated.
"""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from demo.deft_api import DeftApi
from demo.deft_client import DeftClient, DeftError, generated_parts
from helseid_signer_client import DPoPAuth, SignerClient, TokenClient
from tests.support.authserver import running_authserver
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

SCOPE = "nhn:deft/api"
CLIENT_ID = "deft-e2e"
SENDER, RECEIVERS = 8142987, [8142988, 8142989]
#: the short-lived tokens of the expiry test (seconds)
SHORT_TTL = 4


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deft")
    token = create_token(folder / "token", label="deft")
    jwks = {"assertion": keys_create(token, "assertion", "RSA-2048", "PS256"),
            "dpop": keys_create(token, "dpop", "EC-P256", "ES256")}  # fmt: skip
    return folder, token, jwks


def _signer_config(folder, token, issuer, api):
    return write_config(
        folder / f"signer-{api.base_url.rsplit(':', 1)[1]}.toml",
        token,
        issuer=issuer,
        client_id=CLIENT_ID,
        keys={"assertion": "PS256", "dpop": "ES256"},
        profiles={"app": ("assertion", "dpop")},
        api_base_urls=(api.api_url,),
    )


@pytest.fixture(scope="module")
def world(kit):
    folder, token, jwks = kit
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client]) as auth, DeftApi(auth.issuer, require_nonce=True) as api:
        config = _signer_config(folder, token, auth.issuer, api)
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
            with SignerClient(address) as signer:
                yield {"auth": auth, "api": api, "signer": signer}


@pytest.fixture
def deft(world):
    api = world["api"].reset(require_nonce=True)
    with TokenClient(world["signer"], "app", SCOPE) as tokens:
        with httpx.Client(auth=DPoPAuth(tokens), base_url=api.api_url) as http:
            yield DeftClient(http), api


def test_multipart_upload_round_trips_the_bytes(deft):
    client, api = deft
    size, part = 3 * 1024 * 1024 + 12345, 1024 * 1024  # four parts, the last short
    expected = hashlib.sha256(b"".join(generated_parts(size, part, seed=7))).hexdigest()
    seen: list[tuple[int, int]] = []
    result = client.upload(generated_parts(size, part, seed=7), "scan.pdf", SENDER, RECEIVERS,
                           progress=lambda n, sent: seen.append((n, sent)))  # fmt: skip
    assert result.sha256 == expected and result.size == size and result.parts == 4
    assert seen[-1] == (4, size) and [n for n, _ in seen] == [1, 2, 3, 4]
    assert result.location == f"{api.api_url}/objects/{result.key}"
    # Only the first request (the initialization, a small JSON body) met the nonce challenge;
    # every part went once.
    assert result.part_requests == 4
    assert dict(api.state.refused) == {"use_dpop_nonce": 1}
    assert client.download(result.key) == (size, expected)
    assert client.download_status(result.key) == {str(r): False for r in RECEIVERS}
    # Each accepted request's proof named its own URL (htu without query) and the API's nonce.
    paths = [(a.method, a.path) for a in api.state.log]
    assert paths[:2] == [("POST", "/api/objects/initialization"), ("POST", f"/api/objects/{result.key}/part")]
    assert all(a.htu == api.base_url + a.path and a.nonce for a in api.state.log)
    assert all(a.client_id == CLIENT_ID and a.scope == SCOPE for a in api.state.log)


def test_receipts_from_every_receiver_delete_the_file(deft):
    client, api = deft
    result = client.upload(generated_parts(1000, 400), "a.txt", SENDER, RECEIVERS)
    client.mark_downloaded(result.key, RECEIVERS[0])
    assert client.download_status(result.key) == {str(RECEIVERS[0]): True, str(RECEIVERS[1]): False}
    assert client.download(result.key)[0] == 1000
    with pytest.raises(DeftError) as caught:
        client.mark_downloaded(result.key, SENDER)  # not a receiver
    assert caught.value.status_code == 403
    client.mark_downloaded(result.key, RECEIVERS[1])
    assert client.download_status(result.key) == {str(r): True for r in RECEIVERS}
    with pytest.raises(DeftError) as caught:
        client.download(result.key)
    assert caught.value.status_code == 404
    assert not any(result.key in str(p) for p in api.state.folder.iterdir())


def test_whole_file_upload_with_multipart_form_data(deft):
    client, api = deft
    data = b"".join(generated_parts(200_000, 200_000, seed=3))
    answer = client.http.post(
        "objects",
        params=[("SenderHerId", SENDER)] + [("ReceiverHerIds", r) for r in RECEIVERS],
        files={"file": ("journal.xml", data, "application/xml")},
    )
    assert answer.status_code == 201, answer.text
    key = answer.json()["key"]
    assert answer.headers["Location"] == f"{api.api_url}/objects/{key}"
    assert client.download(key) == (len(data), hashlib.sha256(data).hexdigest())
    assert client.download_status(key) == {str(r): False for r in RECEIVERS}
    # the proof's htu is the URL without its query (RFC 9449 section 4.3)
    upload = next(a for a in api.state.log if a.path == "/api/objects")
    assert upload.htu == api.api_url + "/objects"
    client.delete(key)
    with pytest.raises(DeftError):
        client.download_status(key)


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ([("ReceiverHerIds", 2)], "SenderHerId"),
        ([("SenderHerId", 1)], "ReceiverHerIds"),
        ([("SenderHerId", "x1"), ("ReceiverHerIds", 2)], "SenderHerId"),
        ([("SenderHerId", 1), ("ReceiverHerIds", "0")], "ReceiverHerIds"),
    ],
)
def test_whole_file_upload_refuses_bad_her_ids(deft, query, detail):
    client, api = deft
    before = set(api.state.folder.iterdir())
    answer = client.http.post("objects", params=query, files={"file": ("a.txt", b"abc")})
    assert answer.status_code == 400 and detail in answer.json()["detail"]
    assert set(api.state.folder.iterdir()) == before, "nothing of a refused upload is kept"


def test_part_and_completion_refusals_name_the_field(deft):
    client, api = deft
    init = client.http.post("objects/initialization",
                            json={"fileName": "x", "senderHerId": SENDER, "receiverHerIds": RECEIVERS})  # fmt: skip
    key, upload_id = init.json()["key"], init.json()["uploadId"]
    before = set(api.state.folder.iterdir())
    for number in ("0", "10001", "a"):
        bad = client.http.post(f"objects/{key}/part", data={"uploadId": upload_id, "partNumber": number},
                               files={"file": ("p", b"x" * 10)})  # fmt: skip
        assert bad.status_code == 400 and "partNumber" in bad.json()["detail"]
    wrong_id = client.http.post(f"objects/{key}/part", data={"uploadId": "nope", "partNumber": "1"},
                                files={"file": ("p", b"x")})  # fmt: skip
    assert wrong_id.status_code == 400 and "uploadId" in wrong_id.json()["detail"]
    assert set(api.state.folder.iterdir()) == before, "refused parts leave no file"
    ok = client.http.post(f"objects/{key}/part", data={"uploadId": upload_id, "partNumber": "1"},
                          files={"file": ("p", b"abc")})  # fmt: skip
    etag = ok.json()["eTag"]
    assert etag == hashlib.sha256(b"abc").hexdigest()
    for parts, field in [([{"partNumber": 1, "eTag": "0" * 64}], "eTag"),
                         ([{"partNumber": 2, "eTag": etag}], "part 2"),
                         ([{"partNumber": "1", "eTag": etag}], "partNumber")]:  # fmt: skip
        bad = client.http.post(f"objects/{key}/completion", json={"uploadId": upload_id, "parts": parts})
        assert bad.status_code == 400 and field in bad.json()["detail"], bad.text
    with pytest.raises(DeftError) as caught:
        client.download(key)
    assert caught.value.status_code == 409  # not complete yet
    cancel = client.http.post(f"objects/{key}/cancellation", json={"uploadId": upload_id})
    assert cancel.status_code == 204
    assert client.http.get(f"objects/{key}/download-status").status_code == 404


def test_replayed_proof_and_bearer_scheme_are_refused(deft, world):
    client, api = deft
    sent: list[httpx.Request] = []
    client.http.event_hooks["request"].append(sent.append)
    key = api.put_object(b"hello")
    assert client.http.get(f"objects/{key}/download-status").status_code == 200
    request = sent[-1]
    headers = {k: request.headers[k] for k in ("Authorization", "DPoP")}
    replay = httpx.get(str(request.url), headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["detail"]
    assert 'error="invalid_dpop_proof"' in replay.headers["WWW-Authenticate"]
    bearer = httpx.get(str(request.url), headers={"Authorization": "Bearer " + headers["Authorization"][5:]})
    assert bearer.status_code == 401 and bearer.json()["error"] == "invalid_token"
    # A proof for one URL does not open another (htu), nor another method (htm).
    other = httpx.get(f"{api.api_url}/objects/{key}", headers=headers)
    assert other.status_code == 401 and "htu" in other.json()["detail"]


def test_upload_outlives_its_access_token_without_failing_a_part(kit):
    """The access token lives SHORT_TTL seconds; the upload takes longer. The client replaces
    the token between parts (TokenClient's refresh margin) and no part is refused or re-sent."""
    folder, token, jwks = kit
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client], access_token_ttl=SHORT_TTL) as auth, \
            DeftApi(auth.issuer, require_nonce=True) as api:  # fmt: skip
        config = _signer_config(folder, token, auth.issuer, api)
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address, SignerClient(address) as s:
            with TokenClient(s, "app", SCOPE, refresh_margin=1.5) as tokens:
                with httpx.Client(auth=DPoPAuth(tokens), base_url=api.api_url) as http:
                    deft = DeftClient(http)

                    def slow_parts():  # a slow link: a part every 1.2 s, 8 parts
                        for data in generated_parts(8 * 50_000, 50_000, seed=5):
                            yield data
                            time.sleep(1.2)

                    result = deft.upload(slow_parts(), "big.bin", SENDER, RECEIVERS)
                    expected = hashlib.sha256(b"".join(generated_parts(8 * 50_000, 50_000, seed=5))).hexdigest()
                    assert deft.download(result.key) == (8 * 50_000, expected)
    assert result.sha256 == expected and result.parts == 8
    assert result.part_requests == 8, "no part was re-sent"
    tokens_used = {a.token_jti for a in api.state.log}
    assert len(tokens_used) >= 2, "the upload outlived its first token, so a second one was used"
    assert dict(api.state.refused) == {"use_dpop_nonce": 1}, "no expired token reached the API"


def test_whole_file_upload_with_a_chunked_body(deft):
    """A body of unknown length (Transfer-Encoding: chunked) is read as it comes."""
    client, api = deft
    assert client.http.get(f"objects/{api.put_object(b'x')}/download-status").status_code == 200  # learn the nonce
    data = b"".join(generated_parts(3 * 1024 * 1024 + 7, 1 << 20, seed=9))
    boundary = "deft-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]
        yield tail

    sent: list[httpx.Request] = []
    client.http.event_hooks["request"].append(sent.append)
    answer = client.http.post(
        "objects", params={"SenderHerId": SENDER, "ReceiverHerIds": RECEIVERS[0]}, content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert sent[-1].headers.get("Transfer-Encoding") == "chunked"
    assert answer.status_code == 201, answer.text
    assert client.download(answer.json()["key"]) == (len(data), hashlib.sha256(data).hexdigest())


def test_file_names_cannot_break_headers(deft):
    client, api = deft
    bad = client.http.post(
        "objects/initialization",
        json={"fileName": "a\r\nSet-Cookie: x=1", "senderHerId": SENDER, "receiverHerIds": RECEIVERS},
    )
    assert bad.status_code == 400 and "fileName" in bad.json()["detail"]
    answer = client.http.post(
        "objects", params={"SenderHerId": SENDER, "ReceiverHerIds": RECEIVERS[0]},
        files={"file": ('brev "æ".txt', b"hei")},
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    with client.http.stream("GET", f"objects/{answer.json()['key']}") as download:
        disposition = download.headers["Content-Disposition"]
    assert disposition == "attachment; filename=\"brev ___.txt\"; filename*=UTF-8''brev%20%22%C3%A6%22.txt"


def test_a_streamed_first_upload_learns_the_nonce_and_arrives_whole(deft):
    """The first request of a process is a read-once body (a generator) to an API that demands
    its nonce: DPoPAuth learns the nonce with a HEAD (the stand-in answers 405 with it, as it
    sends the nonce on every answer) instead of meeting the challenge with a body it cannot
    send again; every byte arrives once."""
    client, api = deft
    data = b"".join(generated_parts(2 * 1024 * 1024 + 3, 1 << 20, seed=11))
    boundary = "deft-stream-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip

    def body():
        yield head
        for i in range(0, len(data), 65_536):
            yield data[i : i + 65_536]
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = client.http.post(
        "objects", params={"SenderHerId": SENDER, "ReceiverHerIds": RECEIVERS[0]}, content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    assert dict(api.state.refused) == {}, "no request met a nonce challenge"
    assert client.download(answer.json()["key"]) == (len(data), hashlib.sha256(data).hexdigest())

