"""Client-assertion key rotation in a running signer: keys in a real SoftHSM token, the real
``helseid-signer serve`` process, registration records written as ``keys register`` writes
them, and the CLI's ``jwks`` / ``keys list`` / ``keys jwk`` against the same configuration.

One process serves five profiles that share a current key ``cur`` and a switch time ``T``
a few seconds after start-up:

* ``a`` rotates to ``nxt_a``, registered (record from the start): switches at ``T``;
* ``b`` rotates to ``nxt_b``, unregistered: keeps ``cur`` after ``T`` (and logs why) until a
  record appears, then switches within a health interval;
* ``e`` rotates to ``nxt_e`` whose registration has expired: keeps ``cur``;
* ``c`` keeps ``old`` published until a time in the past (not published); ``d`` until 2030.

``cur``'s registration expires in 10 days: the 14-day warning must be logged; ``nxt_a``'s in
365 days: no warning. Signatures are verified with jwcrypto against the JWKs ``keys create``
printed, never with the product's code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from helseid_signer.rotation import RegistrationRecord, utc_text, write_record
from helseid_signer_client import SignerClient
from tests.support.jose_verify import verified_header as _verify
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"
CLIENT_ID = "rotation-client"
LEAD = 12  # seconds from writing the configuration to the switch time T (start-up must fit in it)
KEYS = {"cur": "ES256", "nxt_a": "ES384", "nxt_b": "ES256", "nxt_e": "ES256", "old": "ES256", "dpop": "ES256"}
SPECS = {"ES256": "EC-P256", "ES384": "EC-P384"}


def _record(kid: str, expires_in_days: float | None) -> RegistrationRecord:
    now = time.time()
    return RegistrationRecord(
        kid=kid,
        client_id=CLIENT_ID,
        issuer=ISSUER,
        registered_at=utc_text(now),
        expires_at=None if expires_in_days is None else utc_text(now + expires_in_days * 86400),
        source="selfservice-api",
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotation-keys")
    token = create_token(folder / "token", label="rotation")
    jwks = {name: keys_create(token, name, SPECS[alg], alg) for name, alg in KEYS.items()}
    return {"token": token, "jwks": jwks, "kid": {name: jwk.JWK(**j).thumbprint() for name, j in jwks.items()}}


def _write(tmp_path: Path, token, switch_at: str) -> Path:
    def rotation(profile: str, *lines: str) -> list[str]:
        return ["", f"[profiles.{profile}.rotation]", *lines]

    nxt = f"next_active_from = {switch_at}\nhelseid_keeps_old_key = true"  # the switch waits for T
    return write_config(
        tmp_path / "signer.toml",
        token,
        issuer=ISSUER,
        client_id=CLIENT_ID,
        keys=KEYS,
        profiles={p: ("cur", "dpop") for p in ("a", "b", "c", "d", "e")},
        extra_profile_lines={
            "a": rotation("a", 'next_key = "nxt_a"', nxt),
            "b": rotation("b", 'next_key = "nxt_b"', nxt),
            "e": rotation("e", 'next_key = "nxt_e"', nxt),
            "c": rotation("c", 'previous_key = "old"', "previous_published_until = 2020-01-01T00:00:00Z"),
            "d": rotation("d", 'previous_key = "old"', "previous_published_until = 2030-01-01T00:00:00Z"),
        },
        extra_lines=("[selfservice]", f'records_dir = "{tmp_path / "records"}"'),
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 0.2"),
    )


def _key_set(signer: SignerClient, profile: str) -> tuple[dict, list[tuple[str, str, int, int]]]:
    ks = signer.get_key_set(profile)
    return ks.jwks, [(k["kid"], k["status"], k["active_from"], k["published_until"]) for k in ks.keys]


def _cli(keys, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", *args, "--config", str(config)],
        env=keys["token"].env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    with open(str(config) + ".cli.log", "a") as log:  # scanned by tests/zz_last
        log.write(f"$ {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
    return proc


def _log_lines(config: Path) -> list[dict]:
    lines = []
    for line in Path(str(config) + ".log").read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "message" in entry:
                lines.append(entry)
    return lines


def _wait_log(config: Path, *needles: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for entry in _log_lines(config):
            if all(n in entry["message"] for n in needles):
                return entry
        assert time.monotonic() < deadline, f"no log line with {needles}"
        time.sleep(0.1)


def _published_jwks(keys, *names: str) -> dict:
    return {"keys": [dict(keys["jwks"][n], use="sig") for n in names]}


def test_rotation_by_configuration_in_a_running_signer(keys, tmp_path):
    kid, public = keys["kid"], keys["jwks"]
    switch = math.ceil(time.time()) + LEAD
    switch_at = datetime.fromtimestamp(switch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = _write(tmp_path, keys["token"], switch_at)
    records = tmp_path / "records"
    write_record(records, _record(kid["nxt_a"], 365))
    write_record(records, _record(kid["nxt_e"], -1))  # expired yesterday
    write_record(records, _record(kid["cur"], 10))  # within the 14-day warning

    with running_signer(config, env={"SOFTHSM2_CONF": str(keys["token"].conf)}) as address:
        with SignerClient(address) as signer:
            assert time.time() < switch - 1, "start-up took longer than LEAD seconds; raise LEAD"

            # Before T: CURRENT + NEXT (with active_from) published; the current key signs.
            for profile, nxt in (("a", "nxt_a"), ("b", "nxt_b"), ("e", "nxt_e")):
                jwks, entries = _key_set(signer, profile)
                assert entries == [(kid["cur"], "CURRENT", 0, 0), (kid[nxt], "NEXT", switch, 0)], profile
                assert jwks == _published_jwks(keys, "cur", nxt)
                assertion = signer.sign_client_assertion(profile)
                assert assertion.kid == kid["cur"] and _verify(assertion.jwt, public["cur"])["kid"] == kid["cur"]

            # The 14-day warning for cur (10 days left), none for nxt_a (365 days).
            warning = _wait_log(config, "profile a:", kid["cur"], "expires in HelseID in")
            assert warning["level"] == "warning" and "current key cur" in warning["message"]
            _wait_log(config, "profile e:", kid["nxt_e"], "has EXPIRED in HelseID")

            # After T: a (registered) switches; b (no record) and e (expired record) keep cur.
            time.sleep(max(0.0, switch - time.time()) + 0.3)
            assertion = signer.sign_client_assertion("a")
            assert assertion.kid == kid["nxt_a"] and _verify(assertion.jwt, public["nxt_a"])["kid"] == kid["nxt_a"]
            with pytest.raises(jws.InvalidJWSSignature):
                _verify(assertion.jwt, public["cur"])
            assert _key_set(signer, "a") == (
                _published_jwks(keys, "nxt_a", "cur"),
                [(kid["nxt_a"], "CURRENT", 0, 0), (kid["cur"], "PREVIOUS", 0, 0)],
            )
            profile_a = signer.get_client_profile("a")
            assert profile_a.assertion_kid == kid["nxt_a"] and profile_a.assertion_alg == "ES384"
            for profile, nxt in (("b", "nxt_b"), ("e", "nxt_e")):
                assertion = signer.sign_client_assertion(profile)
                assert assertion.kid == kid["cur"] and _verify(assertion.jwt, public["cur"])
                assert [e[:2] for e in _key_set(signer, profile)[1]] == [(kid["cur"], "CURRENT"), (kid[nxt], "NEXT")]
            refusal = _wait_log(config, "rotation: next key nxt_b", kid["nxt_b"], "not registered with HelseID")
            assert refusal["level"] == "error" and f"due since {switch_at}" in refusal["message"]
            assert "the current key keeps signing" in refusal["message"]
            _wait_log(config, "rotation: next key nxt_e", "not registered with HelseID")

            # The CLI publishes exactly what GetKeySet does, now.
            for profile in ("a", "b", "c", "d"):
                out = _cli(keys, config, "jwks", "--profile", profile)
                assert out.returncode == 0, out.stderr
                assert json.loads(out.stdout) == _key_set(signer, profile)[0], profile

            # Previous keys: one published until a past time is gone, one until 2030 stays (verify-only).
            assert _key_set(signer, "c") == (_published_jwks(keys, "cur"), [(kid["cur"], "CURRENT", 0, 0)])
            until = int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
            assert _key_set(signer, "d") == (
                _published_jwks(keys, "cur", "old"),
                [(kid["cur"], "CURRENT", 0, 0), (kid["old"], "PREVIOUS", 0, until)],
            )
            assert signer.sign_client_assertion("d").kid == kid["cur"]

            # A record for nxt_b appears (as keys register writes it): b switches within a health interval.
            write_record(records, _record(kid["nxt_b"], 365))
            deadline = time.monotonic() + 10
            while (assertion := signer.sign_client_assertion("b")).kid != kid["nxt_b"]:
                assert time.monotonic() < deadline, "b did not switch after its record appeared"
                time.sleep(0.1)
            assert _verify(assertion.jwt, public["nxt_b"])["kid"] == kid["nxt_b"]
            assert _key_set(signer, "b")[1] == [(kid["nxt_b"], "CURRENT", 0, 0), (kid["cur"], "PREVIOUS", 0, 0)]
            assert signer.sign_client_assertion("e").kid == kid["cur"]  # still expired

            # DPoP proofs are untouched by assertion-key rotation.
            proof = signer.sign_dpop_proof("a", "POST", ISSUER + "/connect/token")
            assert proof.jkt == kid["dpop"] and _verify(proof.jwt, public["dpop"])

            listed = _cli(keys, config, "keys", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            by_name = {e["name"]: e for e in json.loads(listed.stdout)}
            text = _cli(keys, config, "keys", "list").stdout

    assert not [e for e in _log_lines(config) if kid["nxt_a"] in e["message"] and "HelseID in" in e["message"]]

    # keys list: every key, its kid and version, how each profile uses it now, its registration.
    assert set(by_name) == set(KEYS)
    for name in KEYS:
        assert by_name[name]["kid"] == kid[name] and by_name[name]["key_version"].startswith("serial=")
    assert {"profile": "a", "use": "assertion", "role": "next", "published": "CURRENT", "signing": True,
            "active_from": switch_at} in by_name["nxt_a"]["uses"]  # fmt: skip
    assert {"profile": "a", "use": "assertion", "role": "current", "published": "PREVIOUS", "signing": False} in (
        by_name["cur"]["uses"]
    )
    assert {"profile": "c", "use": "assertion", "role": "previous", "published": None, "signing": False,
            "published_until": "2020-01-01T00:00:00Z"} in by_name["old"]["uses"]  # fmt: skip
    assert {"profile": "d", "use": "dpop", "signing": True} in by_name["dpop"]["uses"]
    assert 9.9 < by_name["cur"]["registration"]["days_to_expiry"] <= 10
    assert by_name["nxt_e"]["registration"]["registered"] is False
    assert by_name["old"]["registration"] is None
    assert "WARNING: renew now" in text and "EXPIRED" in text and "no registration record" in text
    assert "a: assertion next (CURRENT, signing, active from " + switch_at in text
    assert "c: assertion previous (not published, published until 2020-01-01T00:00:00Z)" in text


def test_keys_jwk_prints_kid_alg_and_use(keys, tmp_path):
    config = _write(tmp_path, keys["token"], "2030-01-01T00:00:00Z")
    out = _cli(keys, config, "keys", "jwk", "--key", "nxt_a")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed == dict(keys["jwks"]["nxt_a"], alg="ES384", use="sig")
    assert printed["kid"] == jwk.JWK(**printed).thumbprint() == keys["kid"]["nxt_a"]
    assert not {"d", "p", "q"} & set(printed)


def test_jwks_of_an_unknown_profile_is_refused(keys, tmp_path):
    config = _write(tmp_path, keys["token"], "2030-01-01T00:00:00Z")
    out = _cli(keys, config, "jwks", "--profile", "nope")
    assert out.returncode == 2 and "no [profiles.nope]" in out.stderr
