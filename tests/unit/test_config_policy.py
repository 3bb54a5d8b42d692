"""Configuration rules that keep keys and callers apart: a key bound to issuers, callers
naming profiles, sockets, rotation and metrics settings - each refusal names the key."""

from __future__ import annotations

import pytest

from helseid_signer.config import load_settings
from tests.unit.test_config import VALID, load_error, write

TEST_ISSUER = "https://helseid-sts.test.nhn.no"


def test_a_key_bound_to_the_test_issuer_never_signs_for_production(tmp_path):
    bound = VALID.replace('alg = "PS256"', f'alg = "PS256"\nissuers = ["{TEST_ISSUER}"]')
    assert load_settings(write(tmp_path, bound)).keys["assertion"].issuers == (TEST_ISSUER,)
    production = bound.replace(f'issuer = "{TEST_ISSUER}"', 'issuer = "https://helseid-sts.nhn.no"')
    error = load_error(tmp_path, production)
    assert "profiles.demo.assertion_key" in error and "bound to issuers" in error


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[callers.app]\ntls_names = ["app.example"]\nprofiles = ["missing"]', "callers.app.profiles"),
        ('[callers.app]\nprofiles = ["demo"]', "callers.app"),  # no identity
        ('[callers.a]\nprofiles = ["demo"]\nunix_socket = { path = "/run/s.sock" }\n'
         '[callers.b]\nprofiles = ["demo"]\nunix_socket = { path = "/run/s.sock" }', "callers"),
        ('[callers.a]\nprofiles = ["demo"]\nunix_socket = { path = "/run/a.sock" }', "server.workers"),
        ('[metrics]\nlisten = "nowhere"', "metrics.listen"),
        ('[audit]\nsink = "file"', "audit"),
        ("[profiles.demo.rotation]\nnext_key = \"dpop\"\nnext_active_from = 2026-12-01T00:00:00Z", "rotation.next_key"),
        ('[selfservice]\n[profiles.demo.rotation]\nnext_key = "dpop"\nhelseid_keeps_old_key = true',
         "helseid_keeps_old_key = true needs next_active_from"),
        ("[profiles.demo.rotation]\nnext_active_from = 2026-12-01T00:00:00Z", "need next_key"),
        ("[profiles.demo.rotation]\nprevious_key = \"dpop\"\nprevious_published_until = 2026-12-01T00:00:00+01:00",
         "previous_published_until"),
    ],
)  # fmt: skip
def test_policy_settings_are_checked_and_name_the_key(tmp_path, extra, where):
    assert where in load_error(tmp_path, VALID + "\n" + extra + "\n")


def test_insecure_caller_must_be_a_configured_caller(tmp_path):
    text = VALID.replace("insecure = true", 'insecure = true\ninsecure_caller = "ghost"')
    assert "server.insecure_caller" in load_error(tmp_path, text)


def test_tls_listener_needs_certificate_key_and_client_ca(tmp_path):
    text = VALID.replace("insecure = true\n", 'tls_certificate = "server.pem"\n')
    error = load_error(tmp_path, text)
    assert "tls_private_key" in error and "client_ca" in error and "tls_certificate" not in error.split("needs")[1]


def test_a_test_key_cannot_become_a_production_key_through_rotation(tmp_path):
    text = VALID.replace('issuer = "https://helseid-sts.test.nhn.no"', 'issuer = "https://helseid-sts.nhn.no"')
    text += (
        '\n[keys.test-next]\nuri = "pkcs11:token=helseid;object=test-next"\nalg = "PS256"\n'
        f'issuers = ["{TEST_ISSUER}"]\n'
        '\n[selfservice]\nrecords_dir = "records"\n'
        '\n[profiles.demo.rotation]\nnext_key = "test-next"\nnext_active_from = 2026-12-01T00:00:00Z\n'
    )
    error = load_error(tmp_path, text)
    assert "profiles.demo.rotation.next_key" in error and "bound to issuers" in error


def test_one_certificate_name_identifies_one_caller(tmp_path):
    text = VALID + (
        '\n[callers.a]\ntls_names = ["app.vendor.test"]\nprofiles = ["demo"]\n'
        '\n[callers.b]\ntls_names = ["app.vendor.test"]\nprofiles = ["demo"]\n'
    )
    error = load_error(tmp_path, text)
    assert "callers.b.tls_names" in error and "'a'" in error
