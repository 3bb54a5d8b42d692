"""Against HelseID's TEST environment - never part of the default test run.

tests/conftest.py leaves this folder out unless ``HELSEID_LIVE=1``; the command in
docs/operations.md ("Key rotation") sets it together with
``HELSEID_SELFSERVICE_TEST_CONFIG`` (a signer configuration whose profile uses HelseID's
test issuer and a registered test client) and ``HELSEID_SELFSERVICE_TEST_PROFILE``. A
missing variable fails the test; nothing here skips.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

from helseid_signer.config import load_settings
from helseid_signer.htu import HtuPolicy
from helseid_signer.local_signer import LocalSigner
from helseid_signer.register import opened_runtime, register_next_key
from helseid_signer_client import TokenClient

# --- against HelseID's test environment (a separate, opt-in command; see docs/operations.md) ----


def _required(name: str) -> str:
    value = os.environ.get(name)
    assert value, f"set {name} (see docs/operations.md, 'Key rotation'); this test never skips"
    return value


HELSEID_TEST_ISSUER = "https://helseid-sts.test.nhn.no"
HELSEID_TEST_SELFSERVICE = "https://api.selvbetjening.test.nhn.no"


def test_register_against_helseid_test_environment():
    """Registers the profile's NEXT key in HelseID's TEST environment, then shows with real
    tokens that HelseID accepts the NEXT key and still accepts the CURRENT one (the rotation
    model assumes the old key stays valid until the switch; NHN's documentation does not say).
    Only for the test issuer and the test self-service API; run it alone (it loads the
    configured backend in this process)."""
    settings = load_settings(_required("HELSEID_SELFSERVICE_TEST_CONFIG"))
    profile = _required("HELSEID_SELFSERVICE_TEST_PROFILE")
    p = settings.profiles[profile]
    assert p.issuer == HELSEID_TEST_ISSUER, f"only for HelseID's test environment, not {p.issuer}"
    assert settings.selfservice and settings.selfservice.url == HELSEID_TEST_SELFSERVICE

    result = register_next_key(settings, profile)
    expires = datetime.fromisoformat(result["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC) + timedelta(days=30), result
    print(json.dumps({k: v for k, v in result.items() if k != "jwk"}, indent=2))

    with opened_runtime(settings, [profile]) as runtime:
        keys = runtime.profiles[profile].assertion_keys
        dpop = runtime.profiles[profile].dpop_slot.get()
        policy = HtuPolicy.from_settings(p.effective_token_endpoint, ())
        for role, slot in (("next", keys.next), ("current", keys.current)):
            signer = LocalSigner(profile, p, slot.get(), dpop, policy)
            with TokenClient(signer, profile, settings.selfservice.scope) as tokens:  # type: ignore[arg-type]
                token = tokens.get_token()
            assert token.token_type == "DPoP", role
            print(f"HelseID issued a token for the {role} key {slot.name} (kid {slot.get().kid})")
