"""End to end: ``helseid-signer keys register`` uploads a profile's NEXT assertion key to a
stand-in of HelseID's self-service API, with a DPoP-bound token the command gets from the
local authorization server (oidc-provider) with the CURRENT key - keys in a real SoftHSM
token, the real CLI in a subprocess.

Oracles are independent: oidc-provider decides whether the token request is acceptable
(it knows only the current key); the stand-in verifies token and proof with jwcrypto and
refuses anything HelseID would; jwcrypto computes the thumbprints compared here. The
stand-in's strictness is itself proven first, with requests built by jwcrypto alone.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from jwcrypto import jwk, jws

from helseid_signer.register import expiration_text
from tests.support.authserver import running_authserver
from tests.support.selfservice_standin import PATH, running_selfservice
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

SELFSERVICE_SCOPE = "nhn:selvbetjening/client"
DEFT_SCOPE = "nhn:deft/api"
CLIENT_ID = "register-client"
DEFT_ONLY_CLIENT = "deft-only-client"
CONTROL_CLIENT = "control-client"
PUBLIC_MEMBERS = {"RSA": {"kty", "n", "e"}, "EC": {"kty", "crv", "x", "y"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SoftHSM keys; the authorization server knowing only the CURRENT key of each client
    (and a jwcrypto key for the control client); the self-service stand-in."""
    folder = tmp_path_factory.mktemp("register")
    token = create_token(folder / "token", label="register")
    specs = {"current": ("RSA-2048", "PS256"), "next": ("EC-P256", "ES256"), "dpop": ("EC-P256", "ES256"),
             "spare": ("EC-P384", "ES384")}  # fmt: skip
    jwks = {name: keys_create(token, name, spec, alg) for name, (spec, alg) in specs.items()}
    control_key = jwk.JWK.generate(kty="EC", crv="P-256")
    control_public = dict(control_key.export_public(as_dict=True), kid=control_key.thumbprint())
    clients = [
        {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["current"]]}, "scope": SELFSERVICE_SCOPE},
        {"client_id": DEFT_ONLY_CLIENT, "jwks": {"keys": [jwks["current"]]}, "scope": DEFT_SCOPE},
        {"client_id": CONTROL_CLIENT, "jwks": {"keys": [control_public]}, "scope": f"{SELFSERVICE_SCOPE} {DEFT_SCOPE}"},
    ]
    with running_authserver(clients, scopes=(SELFSERVICE_SCOPE, DEFT_SCOPE)) as auth:
        with running_selfservice(auth.issuer, auth.jwks_uri) as standin:
            yield {
                "folder": folder,
                "token": token,
                "jwks": jwks,
                "auth": auth,
                "standin": standin,
                "control_key": control_key,
                "specs": specs,
            }


@pytest.fixture
def standin(world):
    """The stand-in with a clean slate for each test."""
    s = world["standin"]
    s.received.clear()
    s.refused.clear()
    s.answer_error, s.expiration, s.require_nonce = None, None, False
    yield s
    s.answer_error, s.expiration, s.require_nonce = None, None, False


@pytest.fixture
def config(world, tmp_path) -> Path:
    """A signer configuration with its own records folder: profile ``app`` rotates from
    ``current`` to ``next``; ``norotation`` has no next key; ``deftonly`` is a client
    HelseID gives no self-service scope."""
    far = "2030-01-01T00:00:00Z"
    rotation = ["", "[profiles.{p}.rotation]", 'next_key = "{k}"', f"next_active_from = {far}"]
    return write_config(
        tmp_path / "signer.toml",
        world["token"],
        issuer=world["auth"].issuer,
        client_id=CLIENT_ID,
        keys={name: alg for name, (_, alg) in world["specs"].items()},
        profiles={"app": ("current", "dpop"), "norotation": ("current", "dpop"), "deftonly": ("current", "dpop")},
        extra_profile_lines={
            "app": [line.format(p="app", k="next") for line in rotation],
            "deftonly": [line.format(p="deftonly", k="spare") for line in rotation],
        },
        extra_lines=(
            "[selfservice]",
            f'url = "{world["standin"].base_url}"',
            f'records_dir = "{tmp_path / "records"}"',
        ),
    )


def _fix_deftonly_client(config: Path) -> None:
    """write_config gives every profile one client id; ``deftonly`` needs its own."""
    text = config.read_text()
    head, sep, tail = text.partition("[profiles.deftonly]")
    config.write_text(head + sep + tail.replace(f'client_id = "{CLIENT_ID}"', f'client_id = "{DEFT_ONLY_CLIENT}"', 1))


def _cli(world, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``helseid-signer <args> --config config``; its output is kept in ``<config>.cli.log``
    so the last test of the run scans it for tokens, PINs and private keys."""
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", *args, "--config", str(config)],
        env=world["token"].env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    with open(str(config) + ".cli.log", "a") as log:
        log.write(f"$ {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
    return proc


def _thumbprint(key: dict) -> str:
    return jwk.JWK(**key).thumbprint()


def _records(config: Path) -> list[Path]:
    folder = config.parent / "records"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


# --- the stand-in is strict (requests built with jwcrypto alone) ---------------------------


def _b64url_sha256(text: str) -> str:
    return jws.base64url_encode(hashlib.sha256(text.encode("ascii")).digest())


def _sign(key: jwk.JWK, header: dict, claims: dict) -> str:
    obj = jws.JWS(json.dumps(claims).encode())
    obj.add_signature(key, alg=header["alg"], protected=json.dumps(header))
    return obj.serialize(compact=True)


def _proof(key: jwk.JWK, target: str, **claims) -> str:
    """A DPoP proof for POST ``target``; ``claims`` add to or replace the standard ones."""
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.export_public(as_dict=True)}
    return _sign(key, header, {"jti": secrets.token_urlsafe(24), "htm": "POST", "htu": target,
                               "iat": int(time.time()), **claims})  # fmt: skip


def _control_token(world, dpop_key: jwk.JWK, scope: str) -> str:
    """A token for the control client, obtained with jwcrypto-signed assertions and proofs."""
    auth, key = world["auth"], world["control_key"]
    nonce = None
    for _ in range(2):
        now = int(time.time())
        assertion = _sign(
            key,
            {"alg": "ES256", "typ": "client-authentication+jwt", "kid": key.thumbprint()},
            {"iss": CONTROL_CLIENT, "sub": CONTROL_CLIENT, "aud": auth.issuer, "iat": now, "nbf": now,
             "exp": now + 10, "jti": secrets.token_urlsafe(24)},
        )  # fmt: skip
        proof = _proof(dpop_key, auth.token_endpoint, **({"nonce": nonce} if nonce else {}))
        response = httpx.post(
            auth.token_endpoint,
            data={"grant_type": "client_credentials", "client_id": CONTROL_CLIENT, "scope": scope,
                  "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                  "client_assertion": assertion},
            headers={"DPoP": proof},
        )  # fmt: skip
        if response.status_code == 200:
            return response.json()["access_token"]
        assert "DPoP-Nonce" in response.headers, response.text
        nonce = response.headers["DPoP-Nonce"]
    raise AssertionError(f"no control token: {response.status_code} {response.text}")


def test_standin_accepts_a_correct_upload_and_refuses_every_flaw(world, standin):
    dpop_key = jwk.JWK.generate(kty="EC", crv="P-256")
    token = _control_token(world, dpop_key, SELFSERVICE_SCOPE)
    deft_token = _control_token(world, dpop_key, DEFT_SCOPE)
    upload = jwk.JWK.generate(kty="EC", crv="P-256")
    public = dict(upload.export_public(as_dict=True), alg="ES256", use="sig")
    url = standin.endpoint

    def post(body=public, token=token, proof_key=dpop_key, proof_claims=None, headers=None, proofs=None):
        if proofs is None:
            claims = {"ath": _b64url_sha256(token)} if proof_claims is None else proof_claims
            proofs = [_proof(proof_key, url, **claims)]
        fields = {"Authorization": f"DPoP {token}", "Content-Type": "application/json", **(headers or {})}
        h = list(fields.items()) + [("DPoP", p) for p in proofs]
        return httpx.post(url, content=json.dumps(body), headers=h)

    ok = post()
    assert ok.status_code == 200, ok.text
    expiration = datetime.fromisoformat(ok.json()["expiration"])
    assert abs(expiration - (datetime.now(UTC) + timedelta(days=365))) < timedelta(minutes=1)
    assert [u.jwk for u in standin.received] == [public]

    other = jwk.JWK.generate(kty="EC", crv="P-256")
    replayed = _proof(dpop_key, url, ath=_b64url_sha256(token))
    assert post(proofs=[replayed]).status_code == 200
    flaws = {
        "no Authorization": (httpx.post(url, content=json.dumps(public), headers={"DPoP": replayed}), 401),
        "Bearer, not DPoP": (post(headers={"Authorization": f"Bearer {token}"}), 401),
        "forged token": (post(token=token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")), 401),
        "token lacks the scope": (post(token=deft_token, proof_claims={"ath": _b64url_sha256(deft_token)}), 403),
        "no DPoP proof": (post(proofs=[]), 401),
        "two DPoP proofs": (post(proofs=[_proof(dpop_key, url, ath=_b64url_sha256(token))] * 2), 401),
        "proof key is not cnf.jkt": (post(proof_key=other), 401),
        "no ath": (post(proof_claims={}), 401),
        "ath of another token": (post(proof_claims={"ath": _b64url_sha256(deft_token)}), 401),
        "wrong htu": (post(proof_claims={"ath": _b64url_sha256(token), "htu": url + "x"}), 401),
        "wrong htm": (post(proof_claims={"ath": _b64url_sha256(token), "htm": "PUT"}), 401),
        "stale iat": (post(proof_claims={"ath": _b64url_sha256(token), "iat": int(time.time()) - 600}), 401),
        "replayed proof": (post(proofs=[replayed]), 401),
        "private JWK": (post(body=dict(upload.export_private(as_dict=True), alg="ES256")), 400),
        "symmetric key": (post(body={"kty": "oct", "k": "c2VjcmV0"}), 400),
        "unknown alg": (post(body=dict(public, alg="HS256")), 400),
        "not JSON content": (post(headers={"Content-Type": "text/plain"}), 415),
    }
    wrong = {name: (r.status_code, r.text) for name, (r, want) in flaws.items() if r.status_code != want}
    assert not wrong, wrong
    assert len(standin.received) == 2, "only the two correct uploads were kept"
    challenge = flaws["token lacks the scope"][0].headers["WWW-Authenticate"]
    assert challenge.startswith("DPoP ") and 'error="insufficient_scope"' in challenge
    assert "ath" in flaws["no ath"][0].json()["title"]

    standin.require_nonce = True
    challenged = post()
    assert challenged.status_code == 401 and 'error="use_dpop_nonce"' in challenged.headers["WWW-Authenticate"]
    with_nonce = post(proof_claims={"ath": _b64url_sha256(token), "nonce": challenged.headers["DPoP-Nonce"]})
    assert with_nonce.status_code == 200, with_nonce.text


# --- keys register through the stand-in ----------------------------------------------------


def test_register_uploads_the_next_keys_public_jwk_and_records_the_expiry(world, standin, config):
    started = datetime.now(UTC)
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    next_jwk, dpop_jwk = world["jwks"]["next"], world["jwks"]["dpop"]
    kid = _thumbprint(next_jwk)

    # Exactly the next key's public JWK, with kid/alg/use, reached the self-service API.
    assert len(standin.received) == 1
    upload = standin.received[0]
    assert _thumbprint(upload.jwk) == kid and upload.jwk["kid"] == kid
    assert upload.jwk == {**{m: next_jwk[m] for m in PUBLIC_MEMBERS["EC"]}, "kid": kid, "alg": "ES256", "use": "sig"}
    assert upload.content_type == "application/json"
    # With a token HelseID gave the CURRENT key's client for the self-service scope, bound to the DPoP key.
    assert upload.token_claims["client_id"] == CLIENT_ID
    assert SELFSERVICE_SCOPE in upload.token_claims["scope"].split()
    assert upload.token_claims["cnf"]["jkt"] == _thumbprint(dpop_jwk)
    assert upload.proof_header["jwk"] == {m: dpop_jwk[m] for m in PUBLIC_MEMBERS["EC"]}
    assert upload.proof_claims["htu"] == standin.endpoint and upload.proof_claims["htm"] == "POST"

    # The record the service reads before letting the key sign.
    (record_path,) = _records(config)
    assert record_path.name == f"{kid}.json"
    record = json.loads(record_path.read_text())
    expires = datetime.fromisoformat(record["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - (started + timedelta(days=365))) < timedelta(minutes=2)
    assert record["expires_at"].endswith("Z")
    assert record | {"expires_at": None, "registered_at": None} == {
        "kid": kid, "client_id": CLIENT_ID, "issuer": world["auth"].issuer, "registered_at": None,
        "expires_at": None, "source": "selfservice-api",
    }  # fmt: skip
    assert result["kid"] == kid and result["record"] == str(record_path) and result["jwk"] == upload.jwk

    # keys list shows it; a second registration is refused and sends nothing.
    listed = _cli(world, config, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = {e["name"]: e for e in json.loads(listed.stdout)}["next"]
    assert entry["registration"]["registered"] and 364 < entry["registration"]["days_to_expiry"] <= 365
    # Registered, and HelseID is not said to keep the old key: it signs now (next_active_from
    # is only the time by which it should have been registered).
    assert {"profile": "app", "use": "assertion", "role": "next", "published": "CURRENT", "signing": True,
            "active_from": "2030-01-01T00:00:00Z"} in entry["uses"]  # fmt: skip
    assert result["takes_over"] == "within 5 s (one health interval) on every replica that reads this record"
    again = _cli(world, config, "keys", "register", "--profile", "app")
    assert again.returncode == 1 and "already registered" in again.stderr and kid in again.stderr
    assert len(standin.received) == 1 and standin.refused == []


def test_register_follows_the_apis_dpop_nonce_challenge(world, standin, config):
    standin.require_nonce = True
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 0, proc.stderr
    assert [status for status, _ in standin.refused] == [401]  # the challenge, answered once with a new proof
    assert len(standin.received) == 1 and standin.received[0].proof_claims["nonce"] == standin.nonce


def test_a_profile_without_a_next_key_is_refused_before_anything_is_sent(world, standin, config):
    proc = _cli(world, config, "keys", "register", "--profile", "norotation")
    assert proc.returncode == 2
    assert "profile norotation has no next key" in proc.stderr
    assert standin.received == [] and standin.refused == [] and _records(config) == []


def test_without_a_selfservice_url_the_api_form_exits_2_before_anything_is_sent(world, standin, config):
    """(Without any [selfservice] the configuration itself is refused: a next key needs its
    records_dir.) With records_dir but no url, only ``--manual`` can work."""
    lines = config.read_text().splitlines()
    config.write_text("\n".join(line for line in lines if not line.startswith("url = ")) + "\n")
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 2 and "keys register needs [selfservice] url" in proc.stderr, proc.stderr
    assert standin.received == [] and standin.refused == [] and _records(config) == []


def test_helseids_error_answer_is_printed_and_nothing_recorded(world, standin, config):
    problem = {
        "type": "https://tools.ietf.org/html/rfc9110#section-15.5.1",
        "title": "Invalid client secret",
        "status": 400,
        "detail": "The key size is below the minimum",
        "instance": "/v1/client-secret",
    }
    standin.answer_error = (400, problem)
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 1
    for text in ("HTTP 400", "Invalid client secret", "The key size is below the minimum", "/v1/client-secret"):
        assert text in proc.stderr
    assert _records(config) == [] and standin.received == []


def test_a_redirect_is_not_followed_and_is_named(world, standin, config):
    standin.answer_error = (307, {}, {"Location": "http://127.0.0.1:9/elsewhere"})
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 1, proc.stderr
    assert "answered with a redirect" in proc.stderr and "http://127.0.0.1:9/elsewhere" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _records(config) == [] and standin.received == []


def test_a_token_refusal_is_printed_and_nothing_is_uploaded(world, standin, config):
    _fix_deftonly_client(config)
    proc = _cli(world, config, "keys", "register", "--profile", "deftonly")
    assert proc.returncode == 1
    assert "invalid_scope" in proc.stderr and SELFSERVICE_SCOPE in proc.stderr
    assert standin.received == [] and standin.refused == [] and _records(config) == []


def test_an_unwritable_records_dir_is_refused_before_anything_is_sent(world, standin, config):
    """A record that cannot be written would leave a key registered that never signs."""
    blocker = config.parent / "not-a-folder"
    blocker.write_text("")
    config.write_text(config.read_text().replace(str(config.parent / "records"), str(blocker / "records")))
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 1 and "cannot write registration records" in proc.stderr
    assert "nothing was sent" in proc.stderr and standin.received == [] and standin.refused == []

    # --records-dir: a writable folder instead (its file is then copied to every replica).
    elsewhere = config.parent / "elsewhere"
    proc = _cli(world, config, "keys", "register", "--profile", "app", "--records-dir", str(elsewhere))
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in elsewhere.glob("*.json")] == [f"{_thumbprint(world['jwks']['next'])}.json"]
    assert len(standin.received) == 1


def test_an_unreachable_self_service_api_is_named_and_nothing_recorded(world, standin, config):
    config.write_text(config.read_text().replace(standin.base_url, "http://127.0.0.1:9"))
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 1 and "cannot reach http://127.0.0.1:9/v1/client-secret" in proc.stderr
    assert _records(config) == []


def test_a_net_style_expiration_is_recorded_in_utc(world, standin, config):
    standin.expiration = lambda: "2027-11-29T10:00:00.1234567+01:00"
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 0, proc.stderr
    (record_path,) = _records(config)
    assert json.loads(record_path.read_text())["expires_at"] == "2027-11-29T09:00:00Z"


def test_an_unreadable_expiration_writes_no_record_and_says_what_to_do(world, standin, config):
    standin.expiration = lambda: "next year"
    proc = _cli(world, config, "keys", "register", "--profile", "app")
    assert proc.returncode == 1
    assert "NO record was written" in proc.stderr and "--manual --expires" in proc.stderr
    # Only the pending record written before the upload: not a registration (HelseID took the
    # key, so it may still sign a retried assertion for a few minutes), and --manual may follow.
    (pending,) = _records(config)
    assert json.loads(pending.read_text())["source"] == "selfservice-api-pending" and len(standin.received) == 1
    manual = _cli(world, config, "keys", "register", "--profile", "app", "--manual",
                  "--expires", "2027-11-29T00:00:00Z")  # fmt: skip
    assert manual.returncode == 0, manual.stderr
    assert json.loads(pending.read_text())["source"] == "manual"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("2027-11-29T10:00:00Z", "2027-11-29T10:00:00Z"),
        ("2027-11-29T10:00:00.1234567+00:00", "2027-11-29T10:00:00Z"),
        ("2027-11-29T11:30:00+01:30", "2027-11-29T10:00:00Z"),
        ("2027-11-29T11:00:00.123456789+01:00[Europe/Oslo]", "2027-11-29T10:00:00Z"),  # Java ZonedDateTime
        ("2027-11-29T10:00:00", "2027-11-29T10:00:00Z"),  # no offset: taken as UTC
    ],
)
def test_expiration_forms(answer, expected):
    assert expiration_text(answer) == expected


@pytest.mark.parametrize("answer", [None, "", 1827482400, "29.11.2027"])
def test_unreadable_expirations(answer):
    with pytest.raises(ValueError):
        expiration_text(answer)


def test_manual_registration_prints_the_jwk_and_records_the_given_expiry(world, standin, config):
    proc = _cli(world, config, "keys", "register", "--profile", "app", "--manual", "--expires", "2027-11-29T00:00:00Z")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    kid = _thumbprint(world["jwks"]["next"])
    assert result["jwk"]["kid"] == kid and _thumbprint(result["jwk"]) == kid
    assert not set(result["jwk"]) - PUBLIC_MEMBERS["EC"] - {"kid", "alg", "use"}
    record = json.loads((config.parent / "records" / f"{kid}.json").read_text())
    assert record["source"] == "manual" and record["expires_at"] == "2027-11-29T00:00:00Z"
    assert standin.received == [] and standin.refused == []

    # The current key too (registered when the client was made), so its expiry is watched.
    current = _cli(world, config, "keys", "register", "--profile", "app", "--manual", "--key", "current",
                   "--expires", "2027-06-01T12:00:00+02:00")  # fmt: skip
    assert current.returncode == 0, current.stderr
    assert json.loads(current.stdout)["expires_at"] == "2027-06-01T10:00:00Z"
    refusals = {
        "--expires": ["--manual"],
        "in the past": ["--manual", "--expires", "2020-01-01T00:00:00Z"],
        "needs a UTC offset": ["--manual", "--expires", "2027-11-29T00:00:00", "--key", "current"],
        "neither the current nor the next": ["--manual", "--expires", "2027-11-29T00:00:00Z", "--key", "spare"],
        "go with --manual": ["--expires", "2027-11-29T00:00:00Z"],
        "already registered": ["--manual", "--expires", "2028-01-01T00:00:00Z"],
    }
    for message, args in refusals.items():
        refused = _cli(world, config, "keys", "register", "--profile", "app", *args)
        usage = message != "already registered"  # usage errors exit 2, a refusal 1
        assert refused.returncode == (2 if usage else 1) and message in refused.stderr, (args, refused.stderr)
    assert len(_records(config)) == 2


def test_no_output_holds_private_material_or_tokens(world, standin, config):
    """Besides the run-wide scan (tests/zz_last): the register command's own output."""
    standin.require_nonce = True
    proc = _cli(world, config, "--log-level", "debug", "keys", "register", "--profile", "app")
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert '"d"' not in output and "PRIVATE" not in output
    assert "eyJ" not in output, "no JWS (token, assertion or proof) in the output"
    assert world["token"].pin not in output
    assert PATH in output  # it did log where it registered
