"""``avoid_kid``: a client assertion HelseID refused (``invalid_client``) is signed again by
ANOTHER key of the profile - one the service publishes, that is registered and unexpired -
or refused with FAILED_PRECONDITION. A real signer process on a SoftHSM token; records in
a folder, written as ``keys register`` writes them; signatures verified with jwcrypto; the
audit file names the avoided kid and the kid that signed.

Profiles (current key ``cur`` everywhere):

* ``plain``: no rotation - no other key;
* ``unreg``: next key ``nx1`` without a record - never an unregistered next key; then a
  pending record (an upload in flight) makes it a retry candidate, not a signer;
* ``overlap``: next key ``nx2`` registered, ``helseid_keeps_old_key`` with a far switch time:
  ``cur`` signs, ``nx2`` is the alternative, and ``cur`` the alternative to ``nx2``;
* ``gone`` / ``kept``: a ``previous_key`` published until a past / future time;
* ``late``: next key ``nx3`` registered only after start-up, with a one-minute health
  interval: the refused request makes the replica read the records at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from jwcrypto import jwk

from helseid_signer.rotation import SOURCE_PENDING, RegistrationRecord, utc_text, write_record
from helseid_signer_client import SignerClient, SignerError
from tests.support.jose_verify import verified_header
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"  # insecure = true needs a loopback issuer (docs/security.md, "Insecure mode")
CLIENT_ID = "avoid-client"
KEYS = ("cur", "nx1", "nx2", "nx3", "old", "dpop")


def _record(kid: str, source: str = "selfservice-api", days: float | None = 365) -> RegistrationRecord:
    now = time.time()
    expires = None if days is None else utc_text(now + days * 86400)
    return RegistrationRecord(kid, CLIENT_ID, ISSUER, utc_text(now), expires, source)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avoid-kid")
    token = create_token(folder / "token", label="avoid")
    jwks = {name: keys_create(token, name, "EC-P256", "ES256") for name in KEYS}
    kid = {name: jwk.JWK(**j).thumbprint() for name, j in jwks.items()}
    records = folder / "records"
    write_record(records, _record(kid["nx2"]))
    audit = folder / "audit.jsonl"

    def rotation(profile: str, *lines: str) -> list[str]:
        return ["", f"[profiles.{profile}.rotation]", *lines]

    config = write_config(
        folder / "signer.toml", token, issuer=ISSUER, client_id=CLIENT_ID,
        keys=dict.fromkeys(KEYS, "ES256"),
        profiles={p: ("cur", "dpop") for p in ("plain", "unreg", "overlap", "gone", "kept", "late")},
        extra_profile_lines={
            "unreg": rotation("unreg", 'next_key = "nx1"'),
            "overlap": rotation("overlap", 'next_key = "nx2"', "next_active_from = 2030-01-01T00:00:00Z",
                                "helseid_keeps_old_key = true"),
            "gone": rotation("gone", 'previous_key = "old"', "previous_published_until = 2020-01-01T00:00:00Z"),
            "kept": rotation("kept", 'previous_key = "old"', "previous_published_until = 2030-01-01T00:00:00Z"),
            "late": rotation("late", 'next_key = "nx3"'),
        },
        extra_lines=("[selfservice]", f'records_dir = "{records}"', "",
                     "[audit]", 'sink = "file"', f'path = "{audit}"'),
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 60"),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        with SignerClient(address) as signer:
            yield {"signer": signer, "kid": kid, "jwks": jwks, "records": records, "audit": audit}


def _signed_by(world, profile: str, avoid: str | None = None) -> str:
    answer = world["signer"].sign_client_assertion(profile, avoid_kid=avoid)
    name = next(n for n, k in world["kid"].items() if k == answer.kid)
    assert verified_header(answer.jwt, world["jwks"][name])["kid"] == answer.kid  # jwcrypto, the named key
    return name


def _refused(world, profile: str, avoid: str) -> SignerError:
    with pytest.raises(SignerError) as caught:
        world["signer"].sign_client_assertion(profile, avoid_kid=avoid)
    return caught.value


def test_no_other_key_is_failed_precondition_and_a_malformed_kid_invalid_argument(world):
    kid = world["kid"]
    error = _refused(world, "plain", kid["cur"])
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.details.startswith("avoid_kid: no other")
    assert _signed_by(world, "plain", kid["old"]) == "cur"  # a kid the profile never used: the normal key
    for bad in ("short", kid["cur"] + "A", kid["cur"][:-1] + "="):
        error = _refused(world, "plain", bad)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.details.startswith("avoid_kid:")


def test_never_an_unregistered_next_key_but_a_pending_upload_may_sign_the_retry(world):
    kid = world["kid"]
    assert _refused(world, "unreg", kid["cur"]).code == grpc.StatusCode.FAILED_PRECONDITION
    write_record(world["records"], _record(kid["nx1"], SOURCE_PENDING, days=None))
    try:
        assert _signed_by(world, "unreg", kid["cur"]) == "nx1"  # re-read at once, the retry only
        assert _signed_by(world, "unreg") == "cur"  # pending is not registered: cur still signs
    finally:
        (world["records"] / f"{kid['nx1']}.json").unlink()


def test_overlap_each_key_is_the_others_alternative(world):
    kid = world["kid"]
    assert _signed_by(world, "overlap") == "cur"  # keeps_old_key: the switch waits for 2030
    assert _signed_by(world, "overlap", kid["cur"]) == "nx2"
    assert _signed_by(world, "overlap", kid["nx2"]) == "cur"


def test_a_previous_key_only_while_published(world):
    kid = world["kid"]
    assert _refused(world, "gone", kid["cur"]).code == grpc.StatusCode.FAILED_PRECONDITION
    assert _signed_by(world, "kept", kid["cur"]) == "old"
    assert _signed_by(world, "kept") == "cur"


def test_a_record_written_after_the_last_health_check_is_read_on_demand(world):
    kid = world["kid"]
    assert _signed_by(world, "late") == "cur"
    write_record(world["records"], _record(kid["nx3"]))
    # The health check runs once a minute; the refused request reads the records itself.
    assert _signed_by(world, "late", kid["cur"]) == "nx3"
    assert _signed_by(world, "late") == "nx3"  # and this replica has switched


def test_audit_names_the_avoided_kid_and_the_kid_that_signed(world):
    kid = world["kid"]
    _signed_by(world, "kept", kid["cur"])
    _refused(world, "gone", kid["cur"])
    records = [json.loads(line) for line in Path(world["audit"]).read_text().splitlines()]
    signed = [r for r in records if r.get("profile") == "kept" and r.get("avoid_kid")][-1]
    assert (signed["avoid_kid"], signed["kid"], signed["status"]) == (kid["cur"], kid["old"], "OK")
    refused = [r for r in records if r.get("profile") == "gone" and r.get("avoid_kid")][-1]
    assert refused["status"] == "FAILED_PRECONDITION" and "kid" not in refused
