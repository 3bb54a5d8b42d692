"""Azure Key Vault backend through the real azure-keyvault-keys SDK, against the local
REST stand-in (``tests/support/azure_kv_standin.py``). NOT a real vault: see
docs/backends/azure-key-vault.md for running the conformance suite against one.

Oracles are independent of the product: the stand-in's own key store (its private keys'
public halves), ``cryptography`` with explicit JOSE parameters, jwcrypto for thumbprints,
raw REST calls that bypass the SDK. The stand-in is itself checked first (it treats the
signed value as a digest, answers the documented challenge, returns raw R || S), so that
its green results mean something.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from jwcrypto import jwk as jwcrypto_jwk

from helseid_signer.algorithms import ALGORITHMS, AlgorithmError
from helseid_signer.backends import azure_kv
from helseid_signer.backends.azure_kv import AzureKeyRef, AzureKvBackend
from helseid_signer.backends.base import (
    BackendConfigError,
    BackendThrottledError,
    BackendUnavailableError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    backend_class,
)
from helseid_signer.config import ConfigError, load_settings
from helseid_signer.keys import make_signing_key
from tests.support.azure_kv_kit import standin_backend
from tests.support.azure_kv_standin import (
    API_VERSION,
    KeyVaultStandIn,
    b64url,
    b64url_decode,
    rest_call,
    running_standin,
)

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
ES_WIDTH = {"ES256": 32, "ES384": 48, "ES512": 66}
SPEC_FOR = {"ES256": "EC-P256", "ES384": "EC-P384", "ES512": "EC-P521", "RS256": "RSA-2048", "PS256": "RSA-2048"}
_names = itertools.count()
#: What a call may overrun its deadline by on a loaded 2-core machine (the last attempt's
#: timeouts end at the deadline; returning and raising take the rest).
SLACK_S = 0.5


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    with running_standin(tmp_path_factory.mktemp("kv")) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean_faults(request):
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").clear_faults()
    yield
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").clear_faults()


@pytest.fixture
def backend(standin):
    b = standin_backend(standin)
    yield b
    b.close()


def new_key(standin: KeyVaultStandIn, spec: str, **body) -> str:
    """Create a key through raw REST (not the product); return its name."""
    name = f"t-{spec.lower()}-{next(_names)}"
    kind, _, size = spec.partition("-")
    req = {"kty": kind, **({"key_size": int(size)} if kind == "RSA" else {"crv": "P-" + size[1:]}), **body}
    status, reply = rest_call(standin, "POST", f"/keys/{name}/create", req)
    assert status == 200, reply
    return name


def ref(standin: KeyVaultStandIn, name: str, version: str | None = None) -> str:
    return "azurekv:" + standin.key_url(name, version)


def verify_jose(public_key, alg: str, data: bytes, signature: bytes) -> None:
    """Verify a JWS signature with ``cryptography`` and the JOSE rules written out here."""
    a = ALGORITHMS[alg]
    h = HASHES[a.hash_name]()
    if alg.startswith("RS"):
        public_key.verify(signature, data, padding.PKCS1v15(), h)
    elif alg.startswith("PS"):
        public_key.verify(signature, data, padding.PSS(mgf=padding.MGF1(h), salt_length=a.hash_size), h)
    else:
        w = ES_WIDTH[alg]
        assert len(signature) == 2 * w
        der = utils.encode_dss_signature(int.from_bytes(signature[:w], "big"), int.from_bytes(signature[w:], "big"))
        public_key.verify(der, data, ec.ECDSA(h))


# -- the stand-in itself (no product code) ------------------------------------------------


def test_standin_answers_the_documented_bearer_challenge(standin):
    import http.client
    import ssl

    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(standin.url.rsplit(":", 1)[1]), context=ssl.create_default_context(cafile=standin.ca_path)
    )
    conn.request("GET", f"/keys/any?api-version={API_VERSION}")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 401
    assert re.fullmatch(
        r'Bearer authorization="https://login\.microsoftonline\.com/[0-9a-f-]{36}", resource="https://vault\.azure\.net"',
        resp.getheader("WWW-Authenticate"),
    )
    assert body["error"]["code"] == "Unauthorized"


def test_standin_signs_the_value_as_a_digest_never_hashing_it_again(standin):
    """Negative control for double hashing (bug-kinds 5): the stand-in's RS256 over a
    32-byte value verifies as a signature over that DIGEST, and not over the value hashed."""
    name = new_key(standin, "RSA-2048")
    public = standin.versions(name)[-1].private_key.public_key()
    data = b"the JWS signing input"
    digest = hashlib.sha256(data).digest()
    status, reply = rest_call(
        standin,
        "POST",
        f"/keys/{name}/{standin.versions(name)[-1].version}/sign",
        {"alg": "RS256", "value": b64url(digest)},
    )
    assert status == 200
    signature = b64url_decode(reply["value"])
    public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())  # = over the digest of data
    with pytest.raises(InvalidSignature):
        public.verify(signature, digest, padding.PKCS1v15(), hashes.SHA256())  # digest hashed again
    # A value that is not a digest of the algorithm's length is refused, as by the service.
    status, reply = rest_call(
        standin,
        "POST",
        f"/keys/{name}/{standin.versions(name)[-1].version}/sign",
        {"alg": "RS256", "value": b64url(data)},
    )
    assert status == 400 and reply["error"]["code"] == "BadParameter"


def test_standin_es_signature_is_raw_r_s_not_der(standin):
    name = new_key(standin, "EC-P384")
    version = standin.versions(name)[-1]
    digest = hashlib.sha384(b"x").digest()
    status, reply = rest_call(
        standin, "POST", f"/keys/{name}/{version.version}/sign", {"alg": "ES384", "value": b64url(digest)}
    )
    assert status == 200 and reply["kid"] == standin.key_url(name, version.version)
    raw = b64url_decode(reply["value"])
    assert len(raw) == 96
    verify_jose(version.private_key.public_key(), "ES384", b"x", raw)


def test_standin_versions_rotation_and_errors(standin):
    name = new_key(standin, "EC-P256")
    first = standin.versions(name)[-1].version
    status, rotated = rest_call(standin, "POST", f"/keys/{name}/rotate")
    assert status == 200 and rotated["key"]["kid"] != standin.key_url(name, first)
    status, again = rest_call(standin, "POST", f"/keys/{name}/create", {"kty": "EC", "crv": "P-256"})
    assert status == 200
    assert len(standin.versions(name)) == 3
    status, latest = rest_call(standin, "GET", f"/keys/{name}")
    assert latest["key"]["kid"] == again["key"]["kid"]
    status, old = rest_call(standin, "GET", f"/keys/{name}/{first}")
    assert status == 200 and old["key"]["kid"] == standin.key_url(name, first)
    status, missing = rest_call(standin, "GET", "/keys/no-such-key")
    assert status == 404 and missing["error"]["code"] == "KeyNotFound"
    standin.throttle(1, retry_after="7", operations=("get",))
    status, throttled = rest_call(standin, "GET", f"/keys/{name}")
    assert status == 429 and throttled["error"]["code"] == "Throttled"


# -- references and settings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "vault", "name", "version", "hsm"),
    [
        ("azurekv:https://myvault.vault.azure.net/keys/deft-assertion", "https://myvault.vault.azure.net",
         "deft-assertion", None, False),
        ("azurekv:https://MyVault.vault.azure.net/keys/k1/9885aa558e8d448789683188f8c194b0",
         "https://myvault.vault.azure.net", "k1", "9885aa558e8d448789683188f8c194b0", False),
        ("azurekv:https://x.managedhsm.azure.net/keys/k", "https://x.managedhsm.azure.net", "k", None, True),
        ("azurekv:https://x.vault.azure.net:443/keys/k", "https://x.vault.azure.net", "k", None, False),
        ("azurekv:https://x.vault.usgovcloudapi.net/keys/k", "https://x.vault.usgovcloudapi.net", "k", None, False),
    ],
)  # fmt: skip
def test_references_parse(uri, vault, name, version, hsm):
    parsed = AzureKeyRef.parse(uri)
    assert (parsed.vault_url, parsed.name, parsed.version, parsed.managed_hsm) == (vault, name, version, hsm)


@pytest.mark.parametrize(
    "uri",
    [
        "azurekv:http://myvault.vault.azure.net/keys/k",
        "azurekv:https://myvault.example.com/keys/k",
        "azurekv:https://myvault.vault.azure.net/secrets/k",
        "azurekv:https://myvault.vault.azure.net/keys/",
        "azurekv:https://myvault.vault.azure.net/keys/k/v/extra",
        "azurekv:https://myvault.vault.azure.net/keys/k?api-version=7.4",
        "azurekv:https://myvault.vault.azure.net/keys/k_underscore",
        "azurekv:https://user@myvault.vault.azure.net/keys/k",
        "azurekv:https://myvault.vault.azure.net/keys/k/ver-sion",
        "azurekv:https://myvault.vault.azure.net/keys/k#frag",
        "azurekv: https://myvault.vault.azure.net/keys/k",
        "https://myvault.vault.azure.net/keys/k",
    ],
)
def test_bad_references_are_refused_with_a_clear_message(uri):
    with pytest.raises(BackendConfigError, match="azurekv"):
        AzureKeyRef.parse(uri)


def test_other_hosts_only_without_challenge_resource_verification():
    uri = "azurekv:https://127.0.0.1:8443/keys/k"
    with pytest.raises(BackendConfigError, match="not a Key Vault host"):
        AzureKvBackend(token_credential=object()).parse(uri)
    assert AzureKvBackend(token_credential=object(), verify_challenge_resource=False).parse(uri).vault_url == (
        "https://127.0.0.1:8443"
    )


def test_registry_and_settings(tmp_path):
    assert backend_class("azurekv") is AzureKvBackend
    with pytest.raises(BackendConfigError, match="tenant_id, client_id, certificate_path"):
        AzureKvBackend(credential="certificate")
    with pytest.raises(BackendConfigError, match="need credential = 'certificate'"):
        AzureKvBackend(tenant_id="t")
    with pytest.raises(BackendConfigError, match="credential"):
        AzureKvBackend(credential="secret")
    with pytest.raises(BackendConfigError, match="certificate credential"):
        AzureKvBackend(
            credential="certificate",
            tenant_id="00000000-0000-4000-8000-000000000001",
            client_id="c",
            certificate_path=str(tmp_path / "missing.pem"),
        )


def test_config_needs_a_backends_azurekv_section(tmp_path):
    base = [
        "[server]", 'listen = "127.0.0.1:0"', "insecure = true", "",
        "[keys.a]", 'uri = "azurekv:https://v.vault.azure.net/keys/a"', 'alg = "PS256"', "",
        "[profiles.p]", 'client_id = "c"', 'issuer = "https://127.0.0.1:4443"',
        'assertion_key = "a"', 'dpop_key = "a"', "",
    ]  # fmt: skip
    path = tmp_path / "signer.toml"
    path.write_text("\n".join(base))
    with pytest.raises(ConfigError, match=r"keys\.a\.uri: an azurekv: key needs a \[backends\.azurekv\] section"):
        load_settings(path)
    path.write_text("\n".join([*base, "[backends.azurekv]", 'ca_bundle = "ca.pem"', ""]))
    settings = load_settings(path)
    assert settings.backends.azurekv.credential == "default"
    assert settings.backends.azurekv.ca_bundle == str(tmp_path / "ca.pem")  # relative to the config file


# -- versions: pinning and rotation (bug-kinds 12) -----------------------------------------


def test_versionless_reference_is_pinned_to_the_current_version(standin, backend, caplog):
    name = new_key(standin, "EC-P256")
    rest_call(standin, "POST", f"/keys/{name}/rotate")
    current = standin.versions(name)[-1]
    with caplog.at_level(logging.WARNING, logger="helseid_signer.backends.azure_kv"):
        resolved = backend.resolve(ref(standin, name))
    assert resolved.version == standin.key_url(name, current.version)
    assert resolved.public_key.public_numbers() == current.private_key.public_key().public_numbers()
    assert "name the versioned URL" in caplog.text


def test_versioned_reference_pins_that_version_even_when_newer_exist(standin, backend):
    name = new_key(standin, "EC-P256")
    old = standin.versions(name)[0]
    rest_call(standin, "POST", f"/keys/{name}/rotate")
    key = make_signing_key("k", "ES256", backend, backend.resolve(ref(standin, name, old.version)))
    signature = key.sign(b"data")
    verify_jose(old.private_key.public_key(), "ES256", b"data", signature)
    assert standin.requests_for("sign")[-1].path == f"/keys/{name}/{old.version}/sign"


def test_new_version_later_changes_neither_kid_nor_the_signing_version(standin, backend, caplog):
    name = new_key(standin, "EC-P256")
    pinned = standin.versions(name)[-1]
    key = make_signing_key("k", "ES256", backend, backend.resolve(ref(standin, name)))
    oracle_kid = jwcrypto_jwk.JWK.from_pyca(pinned.private_key.public_key()).thumbprint()
    assert key.kid == oracle_kid
    assert backend.newer_version(key.resolved) is None

    rest_call(standin, "POST", f"/keys/{name}/rotate")  # a rotation in the vault ...
    rest_call(standin, "POST", f"/keys/{name}/create", {"kty": "EC", "crv": "P-256"})  # ... and a create again
    newest = standin.versions(name)[-1]
    assert newest.version != pinned.version

    data = b"header.payload"
    signature = key.sign(data)
    assert key.kid == oracle_kid
    assert standin.requests_for("sign")[-1].path == f"/keys/{name}/{pinned.version}/sign"
    verify_jose(pinned.private_key.public_key(), "ES256", data, signature)
    with pytest.raises(InvalidSignature):
        verify_jose(newest.private_key.public_key(), "ES256", data, signature)

    with caplog.at_level(logging.WARNING, logger="helseid_signer.backends.azure_kv"):
        assert backend.newer_version(key.resolved) == standin.key_url(name, newest.version)
        assert backend.newer_version(key.resolved) == standin.key_url(name, newest.version)
    assert caplog.text.count("has a newer version") == 1, "reported once per new version"

    # What a restart does with a versionless reference (why production names the version):
    assert backend.resolve(ref(standin, name)).version == standin.key_url(name, newest.version)


def test_a_vault_answer_for_another_version_is_refused(standin, backend):
    """Negative control: the stand-in signs with the newest version whatever the URL says;
    the backend checks the reply's kid and refuses rather than return a signature its
    cached public key (and kid) do not describe."""
    name = new_key(standin, "EC-P256")
    key = make_signing_key("k", "ES256", backend, backend.resolve(ref(standin, name)))
    rest_call(standin, "POST", f"/keys/{name}/rotate")
    standin.sign_latest_instead = True
    with pytest.raises(BackendUnavailableError, match="answered for"):
        key.sign(b"data")
    assert backend.health() is False
    standin.sign_latest_instead = False
    key.sign(b"data")
    assert backend.health() is True


# -- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_es_signature_is_returned_exactly_as_the_vault_sent_it(standin, backend, alg):
    """Azure's ES* result is already R || S (bug-kinds 1): the backend returns the vault's
    bytes unchanged. Negative control: the same bytes are not DER, so a second 'DER -> raw'
    conversion could only corrupt them."""
    name = new_key(standin, SPEC_FOR[alg])
    public = standin.versions(name)[-1].private_key.public_key()
    resolved = backend.resolve(ref(standin, name))
    for i in range(20):
        data = f"{alg}-{i}".encode()
        signature = backend.sign(resolved, ALGORITHMS[alg], data)
        assert signature == standin.last_signature
        assert len(signature) == 2 * ES_WIDTH[alg]
        verify_jose(public, alg, data, signature)
        with pytest.raises(ValueError):
            utils.decode_dss_signature(signature)


def test_a_signature_of_the_wrong_width_is_refused(standin, backend):
    """Negative control: a vault answering DER (as AWS KMS would) is caught by the width check."""
    name = new_key(standin, "EC-P256")
    resolved = backend.resolve(ref(standin, name))
    standin.es_signature_der = True
    with pytest.raises(BackendUnavailableError, match="64 expected"):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data")


def test_the_vault_gets_the_digest_of_the_signing_input(standin, backend):
    name = new_key(standin, "RSA-2048")
    resolved = backend.resolve(ref(standin, name))
    data = b"h" * 5000 + b".p"
    backend.sign(resolved, ALGORITHMS["PS384"], data)
    body = standin.requests_for("sign")[-1].body
    assert body == {"alg": "PS384", "value": b64url(hashlib.sha384(data).digest())}


def test_check_alg_refuses_what_does_not_fit(standin, backend):
    ec_key = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    rsa_key = backend.resolve(ref(standin, new_key(standin, "RSA-2048", kty="RSA-HSM")))
    backend.check_alg(ec_key, ALGORITHMS["ES256"])
    backend.check_alg(rsa_key, ALGORITHMS["PS256"])
    for key, alg in ((ec_key, "RS256"), (ec_key, "ES384"), (rsa_key, "ES256")):
        with pytest.raises(AlgorithmError):
            backend.check_alg(key, ALGORITHMS[alg])


# -- errors, throttling and deadlines (bug-kinds 24) ---------------------------------------


def test_429_then_success_within_the_deadline(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(2, retry_after="0.2")
    before = len(standin.requests_for("sign"))
    start = time.monotonic()
    signature = backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    elapsed = time.monotonic() - start
    assert len(signature) == 64
    statuses = [r.status for r in standin.requests_for("sign")[before:]]
    assert statuses == [429, 429, 200]
    assert 0.4 <= elapsed < 4.0, elapsed  # waited Retry-After twice, well inside the deadline
    assert backend.counters["throttled"] >= 2


def test_429_without_retry_after_is_retried_with_backoff(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(2, retry_after=None)
    before = len(standin.requests_for("sign"))
    backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    assert [r.status for r in standin.requests_for("sign")[before:]] == [429, 429, 200]


def test_429_forever_is_resource_exhausted_within_the_deadline(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(None, retry_after="0.3")
    before = len(standin.requests_for("sign"))
    start = time.monotonic()
    with pytest.raises(BackendThrottledError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=start + 1.5)
    elapsed = time.monotonic() - start
    assert caught.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert elapsed < 1.5 + SLACK_S, elapsed
    assert len(standin.requests_for("sign")[before:]) >= 3, "retried while the deadline allowed"
    assert backend.health() is True, "throttling is not an outage"


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(None, retry_after="30")
    before = len(standin.requests_for("sign"))
    start = time.monotonic()
    with pytest.raises(BackendThrottledError):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=start + 2)
    assert time.monotonic() - start < 1.0, "neither Retry-After (30 s) nor the deadline (2 s) was waited for"
    assert len(standin.requests_for("sign")[before:]) == 1


def test_without_a_deadline_the_default_budget_bounds_retries(standin, backend, monkeypatch):
    monkeypatch.setattr(azure_kv, "DEFAULT_BUDGET_S", 1.0)
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(None, retry_after="0.2")
    start = time.monotonic()
    with pytest.raises(BackendThrottledError):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data")
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_403_is_failed_precondition_naming_the_role(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.deny()
    with pytest.raises(KeyAccessDeniedError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    assert "Key Vault Crypto User" in str(caught.value)
    assert "Microsoft.KeyVault/vaults/keys/sign/action" in str(caught.value)  # the vault's own words
    assert backend.health() is False
    standin.deny(operations=("get",))
    with pytest.raises(KeyAccessDeniedError, match="Key Vault Crypto User"):
        backend.resolve(ref(standin, new_key(standin, "EC-P256")))


def test_a_token_the_vault_rejects_is_failed_precondition(standin):
    class WrongTenant:
        def get_token(self, *scopes, **kwargs):
            return standin.credential().get_token(*scopes, tenant_id="some-other-tenant")

    b = AzureKvBackend(token_credential=WrongTenant(), ca_bundle=str(standin.ca_path), verify_challenge_resource=False)
    with pytest.raises(KeyAccessDeniedError, match="HTTP 401.*Key Vault Crypto User") as caught:
        b.resolve(ref(standin, new_key(standin, "EC-P256")))
    assert caught.value.grpc_code == "FAILED_PRECONDITION"


def test_no_usable_identity_is_failed_precondition(standin):
    from azure.identity import CredentialUnavailableError

    class Nobody:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("no managed identity endpoint found")

    b = AzureKvBackend(token_credential=Nobody(), ca_bundle=str(standin.ca_path), verify_challenge_resource=False)
    with pytest.raises(KeyAccessDeniedError, match="could not authenticate"):
        b.resolve(ref(standin, new_key(standin, "EC-P256")))


def test_missing_key_is_key_not_found(standin, backend):
    with pytest.raises(KeyNotFoundError, match="KeyNotFound") as caught:
        backend.resolve(ref(standin, "no-such-key"))
    assert caught.value.grpc_code == "UNAVAILABLE"
    with pytest.raises(KeyNotFoundError):
        backend.resolve(ref(standin, new_key(standin, "EC-P256"), "0" * 32))


def test_disabled_key_and_key_without_sign(standin, backend):
    name = new_key(standin, "EC-P256")
    resolved = backend.resolve(ref(standin, name))
    standin.set_enabled(name, standin.versions(name)[-1].version, False)
    with pytest.raises(KeyAccessDeniedError, match="disabled"):
        backend.resolve(ref(standin, name))
    with pytest.raises(KeyAccessDeniedError):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data")
    verify_only = new_key(standin, "EC-P256", key_ops=["verify"])
    with pytest.raises(BackendConfigError, match="does not allow the sign operation"):
        backend.resolve(ref(standin, verify_only))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_vault_is_unavailable_within_the_deadline(standin):
    b = standin_backend(standin)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="cannot be reached") as caught:
        b.resolve(f"azurekv:https://127.0.0.1:{_closed_port()}/keys/k", deadline=start + 2)
    assert caught.value.grpc_code == "UNAVAILABLE"
    assert time.monotonic() - start < 2 + SLACK_S


def test_vault_going_away_makes_signing_unavailable(tmp_path):
    with running_standin(tmp_path) as gone:
        b = standin_backend(gone)
        resolved = b.resolve(ref(gone, new_key(gone, "EC-P256")))
        b.sign(resolved, ALGORITHMS["ES256"], b"data")
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        b.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=start + 2)
    assert time.monotonic() - start < 2 + SLACK_S
    assert b.health() is False


def test_a_slow_vault_is_cut_off_at_the_deadline(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.delay(3.0, count=1)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=start + 1.0)
    assert time.monotonic() - start < 1.0 + SLACK_S, "the stand-in holds the reply for 3 s"


def test_a_deadline_already_passed_makes_no_call(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    before = len(standin.log)
    with pytest.raises(BackendUnavailableError, match="deadline"):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() - 1)
    assert len(standin.log) == before


# -- keys create -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "hsm", "expected"),
    [
        ("RSA-2048", False, {"kty": "RSA", "key_size": 2048}),
        ("RSA-3072", True, {"kty": "RSA-HSM", "key_size": 3072}),
        ("EC-P256", False, {"kty": "EC", "crv": "P-256"}),
        ("EC-P384", True, {"kty": "EC-HSM", "crv": "P-384"}),
        ("EC-P521", False, {"kty": "EC", "crv": "P-521"}),
    ],
)
def test_create_key_is_non_exportable_sign_verify_only(standin, spec, hsm, expected):
    b = standin_backend(standin, hsm_keys=hsm)
    name = f"created-{spec.lower()}-{next(_names)}"
    resolved = b.create_key(ref(standin, name), spec)
    body = standin.requests_for("create")[-1].body
    assert {k: body[k] for k in expected} == expected
    assert body["key_ops"] == ["sign", "verify"]
    assert body["attributes"]["exportable"] is False
    (version,) = standin.versions(name)
    assert version.kty == expected["kty"]
    assert resolved.version == standin.key_url(name, version.version)
    assert resolved.public_key.public_numbers() == version.private_key.public_key().public_numbers()
    b.close()


def test_create_key_refuses_an_existing_name_a_version_or_a_bad_spec(standin, backend):
    name = new_key(standin, "EC-P256")
    with pytest.raises(BackendConfigError, match="already exists"):
        backend.create_key(ref(standin, name), "EC-P256")
    assert len(standin.versions(name)) == 1, "no version added"
    with pytest.raises(BackendConfigError, match="without a version"):
        backend.create_key(ref(standin, "fresh", "a" * 32), "EC-P256")
    with pytest.raises(BackendConfigError, match="key spec"):
        backend.create_key(ref(standin, "fresh"), "EC-P224")
    standin.deny(operations=("create",))
    with pytest.raises(KeyAccessDeniedError, match="Key Vault Crypto Officer"):
        backend.create_key(ref(standin, f"denied-{next(_names)}"), "EC-P256")


def _cli_env(standin: KeyVaultStandIn) -> dict[str, str]:
    import os

    return {**os.environ, **standin.identity_env()}


def test_cli_keys_create_by_configuration_alone(standin, tmp_path):
    """The real CLI in a subprocess, authenticated through DefaultAzureCredential (managed
    identity endpoint of the stand-in): no test hook in the product."""
    config = tmp_path / "create.toml"
    config.write_text(f'[backends.azurekv]\nca_bundle = "{standin.ca_path}"\nverify_challenge_resource = false\n')
    name = f"cli-{next(_names)}"
    out = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "keys", "create", "--uri", ref(standin, name),
         "--spec", "EC-P384", "--alg", "ES384", "--config", str(config)],
        env=_cli_env(standin), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    (version,) = standin.versions(name)
    assert printed["version"] == standin.key_url(name, version.version)
    oracle = jwcrypto_jwk.JWK.from_pyca(version.private_key.public_key())
    assert printed["jwk"]["kid"] == oracle.thumbprint()
    assert printed["jwk"]["alg"] == "ES384"
    assert isinstance(version.private_key, ec.EllipticCurvePrivateKey) and version.kty == "EC"
    assert not isinstance(version.private_key, rsa.RSAPrivateKey)


# -- the main job on keys in the (local) vault, by configuration alone -------------------------


def test_main_job_token_flow_with_keys_in_the_vault(standin, tmp_path):
    """``helseid-signer serve`` with azurekv keys (created by the CLI), oidc-provider with the
    assertion key registered, the client library: a DPoP-bound token and a protected API call."""
    import httpx
    from jwcrypto import jws

    from demo.deft_api import DeftApi
    from helseid_signer_client import DPoPAuth, SignerClient, TokenClient
    from tests.support.authserver import running_authserver
    from tests.support.signer_proc import running_signer

    config_create = tmp_path / "create.toml"
    backend_lines = ["[backends.azurekv]", f'ca_bundle = "{standin.ca_path}"', "verify_challenge_resource = false"]
    config_create.write_text("\n".join([*backend_lines, ""]))
    uris, jwks = {}, {}
    for key, spec, alg in (("assertion", "RSA-2048", "PS256"), ("dpop", "EC-P256", "ES256")):
        uri = ref(standin, f"main-{key}-{next(_names)}")
        out = subprocess.run(
            [sys.executable, "-m", "helseid_signer.cli", "keys", "create", "--uri", uri, "--spec", spec,
             "--alg", alg, "--config", str(config_create)],
            env=_cli_env(standin), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        printed = json.loads(out.stdout)
        uris[key], jwks[key] = (printed["version"], alg), printed["jwk"]
    client = {"client_id": "azurekv-client", "jwks": {"keys": [jwks["assertion"]]}, "scope": "nhn:deft/api"}
    with running_authserver([client]) as auth, DeftApi(auth.issuer) as api:
        lines = ["[server]", 'listen = "127.0.0.1:0"', "insecure = true", "", *backend_lines, ""]
        for key, (version_url, alg) in uris.items():
            lines += [f"[keys.{key}]", f'uri = "azurekv:{version_url}"', f'alg = "{alg}"', ""]
        lines += [
            "[profiles.app]", 'client_id = "azurekv-client"', f'issuer = "{auth.issuer}"',
            'assertion_key = "assertion"', 'dpop_key = "dpop"', f'api_base_urls = ["{api.base_url}/api"]', "",
        ]  # fmt: skip
        config = tmp_path / "signer.toml"
        config.write_text("\n".join(lines))
        signs_before = len(standin.requests_for("sign"))
        with running_signer(config, env=standin.identity_env()) as address, SignerClient(address) as signer:
            with TokenClient(signer, "app", "nhn:deft/api") as tokens:
                token = tokens.get_token()
                with httpx.Client(auth=DPoPAuth(tokens), base_url=api.base_url) as http:
                    answer = http.get(f"/api/objects/{api.put_object(b'x')}/download-status")
            assertion = signer.sign_client_assertion("app").jwt
    assert token.token_type == "DPoP"
    assert answer.status_code == 200 and api.state.log[-1].client_id == "azurekv-client"
    parsed = jws.JWS()
    parsed.deserialize(assertion, key=jwcrypto_jwk.JWK(**jwks["assertion"]))
    assert parsed.jose_header["kid"] == jwks["assertion"]["kid"]
    assert len(standin.requests_for("sign")) > signs_before, "the signatures came from the vault"


def test_concurrent_signing_from_many_threads(standin, backend):
    """The gRPC server signs from a thread pool: one backend, one client per key version."""
    from concurrent.futures import ThreadPoolExecutor

    name = new_key(standin, "EC-P256")
    public = standin.versions(name)[-1].private_key.public_key()
    key = make_signing_key("k", "ES256", backend, backend.resolve(ref(standin, name)))

    def work(i: int) -> tuple[bytes, bytes]:
        data = f"thread-{i}".encode()
        return data, key.sign(data, deadline=time.monotonic() + 10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(400)))
    for data, signature in results:
        verify_jose(public, "ES256", data, signature)
    assert backend.health() is True


# -- key custody (CustodyReporter) ---------------------------------------------------------


def test_custody_warning_names_exportable_and_software_keys(standin, backend):
    """What the vault says about the key version decides the warning: an HSM key that is
    not exportable gets none; a software-protected key (kty EC, not EC-HSM) and an
    exportable key (release policy) each get theirs. The keys still resolve and sign."""
    hsm = backend.resolve(ref(standin, new_key(standin, "EC-P256", kty="EC-HSM")))
    assert backend.custody_warning(hsm) is None

    software = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    assert backend.custody_warning(software) == (
        "software-protected key (kty EC, not EC-HSM): the private key is not in an HSM"
    )

    policy = {"contentType": "application/json; charset=utf-8", "data": "eyJhbnlPZiI6W119"}
    name = new_key(standin, "RSA-2048", kty="RSA-HSM", attributes={"exportable": True}, release_policy=policy)
    exportable = backend.resolve(ref(standin, name))
    warning = backend.custody_warning(exportable)
    assert warning == "private key is exportable (exportable = true: a release policy can release it)"
    signature = backend.sign(exportable, ALGORITHMS["RS256"], b"a.b")
    verify_jose(exportable.public_key, "RS256", b"a.b", signature)


# -- what real vaults answer (issue 17): validity window, 403 reasons, bare 429, Managed HSM ------
# Where each answer's shape comes from is listed in docs/backends/azure-key-vault.md.


def test_standin_refuses_sign_outside_the_window_but_still_answers_get(standin):
    now = int(time.time())
    for attributes in ({"exp": now - 60}, {"nbf": now + 3600}):
        name = new_key(standin, "EC-P256", attributes=attributes)
        status, bundle = rest_call(standin, "GET", f"/keys/{name}")
        assert status == 200 and {k: bundle["attributes"][k] for k in attributes} == attributes
        version = bundle["key"]["kid"].rsplit("/", 1)[1]
        digest = hashlib.sha256(b"data").digest()
        request = {"alg": "ES256", "value": b64url(digest)}
        status, reply = rest_call(standin, "POST", f"/keys/{name}/{version}/sign", request)
        assert status == 403 and reply["error"]["code"] == "Forbidden", reply


def test_standin_answers_403_with_the_inner_codes_real_vaults_send(standin):
    digest = b64url(hashlib.sha256(b"data").digest())
    verify_only = new_key(standin, "EC-P256", key_ops=["verify"])
    version = standin.versions(verify_only)[-1].version
    status, reply = rest_call(standin, "POST", f"/keys/{verify_only}/{version}/sign", {"alg": "ES256", "value": digest})
    assert status == 403, "a key whose key_ops lack sign is 403 KeyOperationForbidden, not 400"
    assert reply["error"] == {
        "code": "Forbidden",
        "message": "Operation sign is not permitted on this key.",
        "innererror": {"code": "KeyOperationForbidden"},
    }
    disabled = new_key(standin, "EC-P256")
    version = standin.versions(disabled)[-1].version
    standin.set_enabled(disabled, version, False)
    status, reply = rest_call(standin, "POST", f"/keys/{disabled}/{version}/sign", {"alg": "ES256", "value": digest})
    assert (status, reply["error"]["innererror"]["code"]) == (403, "KeyDisabled")
    reasons = (("rbac", "ForbiddenByRbac"), ("policy", "ForbiddenByPolicy"), ("firewall", "ForbiddenByFirewall"))
    for reason, inner in reasons:
        standin.deny(1, operations=("get",), reason=reason)
        status, reply = rest_call(standin, "GET", f"/keys/{disabled}")
        assert (status, reply["error"]["code"], reply["error"]["innererror"]["code"]) == (403, "Forbidden", inner)


def test_standin_throttles_without_retry_after_by_default(standin):
    import http.client
    import ssl

    name = new_key(standin, "EC-P256")
    rest_call(standin, "GET", f"/keys/{name}")  # a token the stand-in accepts
    token = standin.credential().get_token(standin.resource + "/.default", tenant_id=standin.tenant).token
    standin.throttle(1, operations=("get",))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(standin.url.rsplit(":", 1)[1]), context=ssl.create_default_context(cafile=str(standin.ca_path))
    )
    conn.request("GET", f"/keys/{name}?api-version={API_VERSION}", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 429 and body["error"]["code"] == "Throttled"
    assert response.getheader("Retry-After") is None


def test_a_key_outside_its_validity_window_is_refused_at_resolve(standin, backend):
    now = int(time.time())
    expired = new_key(standin, "EC-P256", attributes={"exp": now - 3600})
    with pytest.raises(KeyAccessDeniedError, match=r"expired at \d{4}-\d\d-\d\dT.*exp attribute") as caught:
        backend.resolve(ref(standin, expired))
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    assert "Crypto User" not in str(caught.value), "an expired key is not a missing role"
    early = new_key(standin, "EC-P256", attributes={"nbf": now + 86400})
    with pytest.raises(KeyAccessDeniedError, match=r"not valid before .*nbf attribute"):
        backend.resolve(ref(standin, early))


def test_a_key_that_expires_within_the_warning_period_resolves_with_a_warning(standin, backend):
    soon = new_key(standin, "EC-P256", attributes={"exp": int(time.time()) + 3 * 86400 + 3600})
    resolved = backend.resolve(ref(standin, soon))
    warning = backend.custody_warning(resolved)
    assert warning is not None and "expires at" in warning and "3 day(s) left" in warning
    later = new_key(standin, "EC-P256", attributes={"exp": int(time.time()) + 30 * 86400})
    b = standin_backend(standin)
    assert b.custody_warning(b.resolve(ref(standin, later))) == (
        "software-protected key (kty EC, not EC-HSM): the private key is not in an HSM"
    ), "30 days left: no expiry warning"
    b.close()


def test_the_validity_warning_period_is_the_rotation_warning_period():
    from helseid_signer.rotation import EXPIRY_WARNING_DAYS

    assert azure_kv.VALIDITY_WARNING_DAYS == EXPIRY_WARNING_DAYS == 14


def test_the_warning_reaches_the_start_up_log(standin, caplog):
    from helseid_signer.config import KeySettings
    from helseid_signer.keys import KeySlot

    soon = new_key(standin, "EC-P256", attributes={"exp": int(time.time()) + 86400 + 600})
    b = standin_backend(standin)
    slot = KeySlot("k", KeySettings(uri=ref(standin, soon), alg="ES256"), b)
    with caplog.at_level(logging.WARNING):
        assert slot.try_resolve(time.monotonic())
    assert any("keys.k:" in r.getMessage() and "1 day(s) left" in r.getMessage() for r in caplog.records)
    b.close()


def test_a_key_that_expires_after_resolve_names_expiry_when_the_vault_refuses(standin, backend):
    name = new_key(standin, "EC-P256", attributes={"exp": int(time.time()) + 2})
    resolved = backend.resolve(ref(standin, name))
    backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    time.sleep(max(0.0, standin.versions(name)[-1].attributes["exp"] - time.time()) + 0.2)
    with pytest.raises(KeyAccessDeniedError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    text = str(caught.value)
    assert "expired at" in text and "nbf/exp" in text and "register" in text
    assert "Crypto User" not in text, "the fix is a new key version, not a role"
    assert [r.status for r in standin.requests_for("sign")][-1] == 403, "the vault was asked and refused"


@pytest.mark.parametrize(
    ("reason", "inner", "words", "not_words"),
    [
        ("rbac", "ForbiddenByRbac", ("Azure RBAC", "'Key Vault Crypto User'"), ("access polic", "firewall")),
        ("policy", "ForbiddenByPolicy", ("access policies", "get and sign", "set-policy"), ("Crypto User",)),
        ("firewall", "ForbiddenByFirewall", ("firewall", "networking rules", "private endpoint"), ("Crypto User",)),
    ],
)
def test_each_403_reason_gets_its_own_hint(standin, backend, reason, inner, words, not_words):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.deny(1, reason=reason)
    with pytest.raises(KeyAccessDeniedError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    text = str(caught.value)
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    assert f"HTTP 403, {inner}" in text
    for word in words:
        assert word in text, (word, text)
    for word in not_words:
        assert word not in text.split("Vault said:")[0], (word, text)


def test_403_reasons_when_creating_name_the_create_permissions(standin, backend):
    standin.deny(1, operations=("create",), reason="rbac")
    with pytest.raises(KeyAccessDeniedError, match="ForbiddenByRbac.*'Key Vault Crypto Officer'"):
        backend.create_key(ref(standin, f"denied-{next(_names)}"), "EC-P256")
    standin.deny(1, operations=("create",), reason="policy")
    with pytest.raises(KeyAccessDeniedError, match="ForbiddenByPolicy.*get and create"):
        backend.create_key(ref(standin, f"denied-{next(_names)}"), "EC-P256")


def test_a_key_disabled_after_resolve_is_named_disabled(standin, backend):
    name = new_key(standin, "EC-P256")
    resolved = backend.resolve(ref(standin, name))
    standin.set_enabled(name, standin.versions(name)[-1].version, False)
    with pytest.raises(KeyAccessDeniedError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    assert "HTTP 403, KeyDisabled" in str(caught.value) and "enable it" in str(caught.value)


def test_sign_taken_out_of_key_ops_after_resolve_is_named(standin, backend):
    name = new_key(standin, "EC-P256", key_ops=["sign", "verify"])
    resolved = backend.resolve(ref(standin, name))
    standin.versions(name)[-1].key_ops[:] = ["verify"]  # as `az keyvault key set-attributes --ops verify`
    with pytest.raises(KeyAccessDeniedError) as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 5)
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    assert "HTTP 403, KeyOperationForbidden" in str(caught.value) and "key_ops" in str(caught.value)


def _gaps(records) -> list[float]:
    return [b.time - a.time for a, b in itertools.pairwise(records)]


def test_bare_429s_are_retried_after_1_then_2_seconds(standin, backend):
    """Microsoft's Key Vault throttling guidance: wait 1 s, then 2 s, 4 s ... (jittered up)."""
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(2)  # no Retry-After, as real vaults answer
    before = len(standin.requests_for("sign"))
    backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=time.monotonic() + 10)
    records = standin.requests_for("sign")[before:]
    assert [r.status for r in records] == [429, 429, 200]
    first, second = _gaps(records)
    assert first >= 1.0 and second >= 2.0, (first, second)


def test_bare_429s_past_the_deadline_are_resource_exhausted_in_time(standin, backend):
    resolved = backend.resolve(ref(standin, new_key(standin, "EC-P256")))
    standin.throttle(None)
    before = len(standin.requests_for("sign"))
    start = time.monotonic()
    with pytest.raises(BackendThrottledError):
        backend.sign(resolved, ALGORITHMS["ES256"], b"data", deadline=start + 2.0)
    assert time.monotonic() - start < 2.0 + SLACK_S
    sent = standin.requests_for("sign")[before:]
    assert len(sent) == 2, "at 0 s and after 1-1.25 s; waiting 2 s more would pass the deadline"


def test_keys_create_waits_out_bare_429s(standin):
    b = standin_backend(standin)
    name = f"throttled-{next(_names)}"
    standin.throttle(2, operations=("create",))
    before = len(standin.requests_for("create"))
    resolved = b.create_key(ref(standin, name), "EC-P256")
    assert [r.status for r in standin.requests_for("create")[before:]] == [429, 429, 200]
    assert len(standin.versions(name)) == 1 and resolved.version.endswith(standin.versions(name)[0].version)
    b.close()


def test_keys_create_is_not_repeated_after_an_answer_that_may_have_made_the_key(standin):
    b = standin_backend(standin)
    name = f"unsure-{next(_names)}"
    standin.unavailable(1, operations=("create",))
    before = len(standin.requests_for("create"))
    with pytest.raises(BackendUnavailableError, match="may have been created nonetheless"):
        b.create_key(ref(standin, name), "EC-P256")
    assert [r.status for r in standin.requests_for("create")[before:]] == [503], "a POST create is never repeated"
    b.close()


@pytest.fixture(scope="module")
def hsm_standin(tmp_path_factory):
    with running_standin(tmp_path_factory.mktemp("mhsm"), managed_hsm=True) as s:
        yield s


def test_standin_in_managed_hsm_mode_answers_as_a_managed_hsm(hsm_standin):
    import http.client
    import ssl

    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(hsm_standin.url.rsplit(":", 1)[1]),
        context=ssl.create_default_context(cafile=str(hsm_standin.ca_path)),
    )  # fmt: skip
    conn.request("GET", f"/keys/x?api-version={API_VERSION}")
    response = conn.getresponse()
    assert response.status == 401 and response.read() == b"", "a Managed HSM's challenge has an empty body"
    assert 'resource="https://managedhsm.azure.net"' in response.getheader("WWW-Authenticate")
    conn.close()
    status, reply = rest_call(hsm_standin, "POST", "/keys/soft/create", {"kty": "EC", "crv": "P-256"})
    assert status == 400, "a Managed HSM makes HSM keys only"
    status, bundle = rest_call(hsm_standin, "POST", "/keys/hsm/create", {"kty": "EC-HSM", "crv": "P-521"})
    assert status == 200 and bundle["key"]["key_ops"] == ["verify", "deriveKey", "sign"]
    assert "hsmPlatform" not in bundle["attributes"]
    version = bundle["key"]["kid"].rsplit("/", 1)[1]
    digest = hashlib.sha512(b"data").digest()
    request = {"alg": "ES512", "value": b64url(digest)}
    status, signed = rest_call(hsm_standin, "POST", f"/keys/hsm/{version}/sign", request)
    assert status == 200 and signed["alg"] == "ES512" and len(b64url_decode(signed["value"])) == 132


def test_backend_signs_through_the_managed_hsm_standin(hsm_standin):
    b = standin_backend(hsm_standin, hsm_keys=True)
    resolved = b.create_key(ref(hsm_standin, f"mhsm-{next(_names)}"), "EC-P384")
    signature = b.sign(resolved, ALGORITHMS["ES384"], b"signing input", deadline=time.monotonic() + 5)
    verify_jose(resolved.public_key, "ES384", b"signing input", signature)
    assert b.custody_warning(resolved) is None, "an EC-HSM key in a Managed HSM is held as promised"
    b.close()


def test_check_warns_of_a_key_that_expires_soon_and_refuses_an_expired_one(standin, tmp_path):
    """``helseid-signer check`` (the real CLI, DefaultAzureCredential through the stand-in's
    managed-identity endpoint): the expiry warning and the refusal, each naming the key."""
    now = int(time.time())
    soon = new_key(standin, "EC-P256", attributes={"exp": now + 2 * 86400 + 600})
    gone = new_key(standin, "EC-P256", attributes={"exp": now - 600})
    config = tmp_path / "check.toml"
    config.write_text(
        "\n".join([
            "[server]", 'listen = "127.0.0.1:0"', "insecure = true", "",
            "[backends.azurekv]", f'ca_bundle = "{standin.ca_path}"', "verify_challenge_resource = false", "",
            "[keys.soon]", f'uri = "{ref(standin, soon)}"', 'alg = "ES256"', "",
            "[keys.gone]", f'uri = "{ref(standin, gone)}"', 'alg = "ES256"', "",
            "[profiles.p]", 'client_id = "c"', 'issuer = "https://127.0.0.1:4443"',
            'assertion_key = "soon"', 'dpop_key = "soon"', "",
        ])
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "check", "--config", str(config), "--timeout", "3"],
        env=_cli_env(standin), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("warning: keys.soon:")]
    errors = [line for line in lines if line.startswith("error: keys.gone:")]
    assert warnings and "expires at" in warnings[0] and "2 day(s) left" in warnings[0], proc.stdout
    assert errors and "expired at" in errors[0] and "exp attribute" in errors[0], proc.stdout
    assert proc.returncode != 0
