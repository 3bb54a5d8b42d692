"""Configuration rules that keep keys and callers apart: a key bound to issuers, callers
naming profiles, sockets, rotation and metrics settings - each refusal names the key."""

from __future__ import annotations

import pytest

from helseid_signer.config import load_settings
from tests.unit.test_config import VALID, VALID_TLS, load_error, write

TEST_ISSUER = "https://127.0.0.1:4443"


def test_a_key_bound_to_the_test_issuer_never_signs_for_production(tmp_path):
    bound = VALID.replace('alg = "PS256"', f'alg = "PS256"\nissuers = ["{TEST_ISSUER}"]')
    assert load_settings(write(tmp_path, bound)).keys["assertion"].issuers == (TEST_ISSUER,)
    production = bound.replace(f'issuer = "{TEST_ISSUER}"', 'issuer = "https://helseid-sts.nhn.no"')
    error = load_error(tmp_path, production)
    assert "profiles.demo.assertion_key" in error and "bound to issuers" in error


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[callers.app]\ntls_names = ["dns:app.example"]\nprofiles = ["missing"]', "callers.app.profiles"),
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
    text = VALID.replace('issuer = "https://127.0.0.1:4443"', 'issuer = "https://helseid-sts.nhn.no"')
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
        '\n[callers.a]\ntls_names = ["dns:app.vendor.test"]\nprofiles = ["demo"]\n'
        '\n[callers.b]\ntls_names = ["dns:app.vendor.test"]\nprofiles = ["demo"]\n'
    )
    error = load_error(tmp_path, text)
    assert "callers.b.tls_names" in error and "'a'" in error


# ------------------------------------------------- insecure = true is development only

_CALLER = '[callers.app]\nprofiles = ["demo"]\ntls_names = ["dns:app.example"]\n'


@pytest.mark.parametrize(
    ("change", "where"),
    [
        # a plaintext listener on a non-loopback address
        (('listen = "127.0.0.1:50051"', 'listen = "0.0.0.0:50051"'),
         "server.listen: '0.0.0.0:50051' is not a loopback"),
        (('listen = "127.0.0.1:50051"', 'listen = "[::]:50051"'), "server.listen: '[::]:50051' is not a loopback"),
        (('listen = "127.0.0.1:50051"', 'listen = "10.0.0.5:50051"'), "server.listen:"),
        # TLS files that insecure would silently ignore
        (("insecure = true", 'insecure = true\ntls_certificate = "server.pem"'), "server.tls_certificate: not used"),
        (("insecure = true", 'insecure = true\nclient_ca = "ca.pem"'), "server.client_ca: not used"),
        # a real issuer or token endpoint
        (('issuer = "https://127.0.0.1:4443"', 'issuer = "https://helseid-sts.nhn.no"'),
         "profiles.demo.issuer: 'https://helseid-sts.nhn.no' is not on a loopback address"),
        (('issuer = "https://127.0.0.1:4443"', 'issuer = "https://helseid-sts.test.nhn.no"'), "profiles.demo.issuer:"),
        (('dpop_key = "dpop"', 'dpop_key = "dpop"\ntoken_endpoint = "https://helseid-sts.nhn.no/connect/token"'),
         "profiles.demo.token_endpoint:"),
        # callers configured: plaintext requests must be one of them, never an implicit every-profile caller
        ((VALID, VALID + "\n" + _CALLER), "server.insecure_caller: required"),
    ],
)  # fmt: skip
def test_insecure_is_refused_outside_local_development(tmp_path, change, where):
    text = VALID.replace(*change)
    assert text != VALID
    assert where in load_error(tmp_path, text)


def test_insecure_caller_set_other_tls_only_callers_are_refused(tmp_path):
    other = '[callers.other]\nprofiles = ["demo"]\ntls_names = ["dns:other.example"]\n'
    text = VALID.replace("insecure = true", 'insecure = true\ninsecure_caller = "app"') + "\n" + _CALLER
    assert load_settings(write(tmp_path, text)).server.insecure_caller == "app"
    assert "callers.other.tls_names: no TLS listener identifies" in load_error(tmp_path, text + other)
    socket = '[callers.other]\nprofiles = ["demo"]\nunix_socket = { path = "/run/o.sock" }\n'
    assert load_settings(write(tmp_path, text.replace("workers = 2", "workers = 1") + socket)).callers["other"]


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.8.9.10:1", "[::1]:50051", "localhost:50051"])
def test_insecure_on_loopback_with_a_loopback_issuer_loads(tmp_path, listen):
    text = VALID.replace('listen = "127.0.0.1:50051"', f'listen = "{listen}"')
    assert load_settings(write(tmp_path, text)).server.listen == listen


@pytest.mark.parametrize(
    ("name", "hint"),
    [("app.example", "dns:app.example"), ("spiffe://x/y", "uri:spiffe://x/y"), ("legacy", "dns:legacy"),
     ("dns:", "dns:dns:"), ("ip:10.0.0.1", "dns:ip:10.0.0.1"), ("DNS:app.example", "dns:app.example")],
)  # fmt: skip
def test_an_untyped_tls_name_is_refused_with_the_fix(tmp_path, name, hint):
    text = VALID_TLS + f'\n[callers.app]\nprofiles = ["demo"]\ntls_names = ["{name}"]\n'
    error = load_error(tmp_path, text)
    assert f"callers.app.tls_names: {name!r} has no type: write {hint} " in error, error


def test_typed_tls_names_load_and_the_same_value_may_have_two_types(tmp_path):
    text = VALID_TLS + (
        '\n[callers.a]\nprofiles = ["demo"]\ntls_names = ["dns:app.example", "cn:legacy app"]\n'
        '\n[callers.b]\nprofiles = ["demo"]\ntls_names = ["uri:spiffe://vendor/app", "cn:app.example"]\n'
    )
    callers = load_settings(write(tmp_path, text)).callers
    assert callers["a"].tls_names == ("dns:app.example", "cn:legacy app")
    assert callers["b"].tls_names == ("uri:spiffe://vendor/app", "cn:app.example")
