"""Golden replay: answers that real vaults and a real Managed HSM gave, recorded by the Azure
SDK for Python's own tests, replayed through the real azure-keyvault-keys SDK into the
azurekv backend - independent of the project's Key Vault stand-in, so that a parsing or
width bug cannot hide behind a stand-in that agrees with itself.

The recordings are in ``tests/backends/recordings/azure_kv/``; each file names the
repository, path and commit its bodies come from (``source``):

* ``vault_rsa_2048_create_get.json`` - Azure/azure-sdk-assets,
  python/sdk/keyvault/azure-keyvault-keys/tests/recordings/
  test_crypto_client.pyTestCryptoClienttest_rsa_key_id[2025-07-01_vault].json at
  229759aadfb1f31b8f77887c461e6e267a6b3bb2: the 401 challenge, an RSA key's create and GET
  answers with ``key_size`` and ``hsmPlatform`` in ``attributes``; plus a real 404
  ``KeyNotFound`` body from Azure/azure-sdk-for-js,
  sdk/keyvault/keyvault-keys/recordings/node/keys_client__restore_keys_and_recover_backups/
  recording_fails_to_generate_a_backup_of_a_nonexisting_key.json at
  2e9ed18fdb671cb79164994400e1a09fcc426750.
* ``vault_ec_p521_es512.json`` - Azure/azure-sdk-assets, ...test_ec_verify_local[2025-07-01_vault].json
  at 229759aadfb1f31b8f77887c461e6e267a6b3bb2: a P-521 key whose x starts with byte 0x01 and
  an ES512 signature whose first byte is zero.
* ``managed_hsm_ec_p521_es512.json`` - Azure/azure-sdk-assets, ...test_ec_verify_local[2025-07-01_mhsm].json
  at 229759aadfb1f31b8f77887c461e6e267a6b3bb2: a Managed HSM's empty-bodied 401 challenge
  (resource https://managedhsm.azure.net), an EC-HSM P-521 key (key_ops with deriveKey, no
  hsmPlatform) and a sign reply that carries ``alg``.

No body here is reconstructed. Oracles: the recorded JWKs read by jwcrypto, and
``cryptography`` verifying the recorded signatures over the recorded digests.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from jwcrypto import jwk as jwcrypto_jwk

from helseid_signer.algorithms import ALGORITHMS
from helseid_signer.backends.azure_kv import AzureKvBackend
from helseid_signer.keys import make_signing_key
from tests.support.azure_replay import ReplayCredential, ReplayTransport, load_recording


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def replay_backend(transport: ReplayTransport) -> tuple[AzureKvBackend, ReplayCredential]:
    credential = ReplayCredential()
    return AzureKvBackend(token_credential=credential, transport=transport), credential


def recorded(recording: dict, method: str, suffix: str) -> dict:
    """The authenticated recorded answer to ``method`` on a path ending in ``suffix``."""
    (entry,) = [
        e for e in recording["entries"]
        if e["method"] == method and e["path"].endswith(suffix) and not e.get("unauthenticated")
    ]  # fmt: skip
    return entry


def challenge(recording: dict) -> dict:
    return next(e["response"] for e in recording["entries"] if e.get("unauthenticated"))


def jwcrypto_public(jwk: dict):
    """The recorded JWK's public key, read by jwcrypto (not by the product)."""
    members = {k: jwk[k] for k in ("kty", "n", "e", "crv", "x", "y") if k in jwk}
    members["kty"] = members["kty"].removesuffix("-HSM")
    return jwcrypto_jwk.JWK(**members)


def test_rsa_key_with_key_size_and_hsm_platform_resolves_to_the_recorded_key():
    """Source: vault_rsa_2048_create_get.json (GET answer, recorded from a real vault)."""
    rec = load_recording("vault_rsa_2048_create_get.json")
    get = recorded(rec, "GET", "/4547fa19cdd24eb688e18c556a8382e8")
    bundle = get["response"]["body"]
    assert bundle["attributes"]["key_size"] == 2048 and bundle["attributes"]["hsmPlatform"] == "0"
    transport = ReplayTransport(challenge(rec), {("GET", get["path"]): get["response"]})
    backend, credential = replay_backend(transport)
    resolved = backend.resolve(f"azurekv:{bundle['key']['kid']}")
    assert resolved.version == bundle["key"]["kid"]
    expected = jwcrypto_public(bundle["key"])
    assert resolved.public_key.public_numbers() == expected.get_op_key("verify").public_numbers()
    key = make_signing_key("k", "PS256", backend, resolved)
    assert key.kid == expected.thumbprint()
    assert backend.custody_warning(resolved) == (
        "software-protected key (kty RSA, not RSA-HSM): the private key is not in an HSM"
    )
    assert credential.scopes == [("https://vault.azure.net/.default",)], "scope from the recorded challenge"
    assert [(s.method, s.authorized) for s in transport.seen] == [("GET", False), ("GET", True)]
    backend.close()


def test_keys_create_of_an_rsa_key_against_recorded_answers():
    """Sources: the 404 from azure-sdk-for-js (see the module docstring) for the name check,
    and the create answer of vault_rsa_2048_create_get.json."""
    rec = load_recording("vault_rsa_2048_create_get.json")
    create = recorded(rec, "POST", "/create")
    not_found = rec["extra"]["404"]["response"]
    name_path = create["path"].removesuffix("/create")
    transport = ReplayTransport(
        challenge(rec), {("GET", name_path): not_found, ("POST", create["path"]): create["response"]}
    )
    backend, _ = replay_backend(transport)
    resolved = backend.create_key("azurekv:https://vaultname.vault.azure.net" + name_path, "RSA-2048")
    bundle = create["response"]["body"]
    assert resolved.version == bundle["key"]["kid"]
    assert resolved.public_key.public_numbers() == jwcrypto_public(bundle["key"]).get_op_key("verify").public_numbers()
    (sent,) = [s.body for s in transport.seen if s.method == "POST" and s.authorized]
    assert sent["kty"] == "RSA" and sent["key_size"] == 2048 and sent["key_ops"] == ["sign", "verify"]
    assert sent["attributes"]["exportable"] is False
    backend.close()


@pytest.mark.parametrize(
    ("recording", "hsm"),
    [("vault_ec_p521_es512.json", False), ("managed_hsm_ec_p521_es512.json", True)],
)
def test_p521_key_and_es512_signature_come_through_at_full_width(recording, hsm):
    """Sources: vault_ec_p521_es512.json (x starts with 0x01; the signature with a zero
    byte) and managed_hsm_ec_p521_es512.json (sign reply with ``alg``, empty 401 body)."""
    rec = load_recording(recording)
    create = recorded(rec, "POST", "/create")
    sign = recorded(rec, "POST", "/sign")
    bundle = create["response"]["body"]
    kid = bundle["key"]["kid"]
    version_path = sign["path"].removesuffix("/sign")
    transport = ReplayTransport(
        challenge(rec), {("GET", version_path): create["response"], ("POST", sign["path"]): sign["response"]}
    )
    backend, credential = replay_backend(transport)
    resolved = backend.resolve(f"azurekv:{kid}")
    assert resolved.handle.ref.managed_hsm is hsm
    x = b64d(bundle["key"]["x"])
    assert len(x) == 66 and x[0] == 0x01, "the recording holds the property under test"
    expected = jwcrypto_public(bundle["key"])
    assert resolved.public_key.public_numbers() == expected.get_op_key("verify").public_numbers()
    key = make_signing_key("k", "ES512", backend, resolved)
    assert key.kid == expected.thumbprint()
    assert key.jwk["x"] == bundle["key"]["x"] and key.jwk["y"] == bundle["key"]["y"]

    signature = backend.sign(resolved, ALGORITHMS["ES512"], b"header.payload")
    recorded_signature = b64d(sign["response"]["body"]["value"])
    assert signature == recorded_signature and len(signature) == 132
    if not hsm:
        assert signature[0] == 0, "the recording holds the property under test"
    else:
        assert sign["response"]["body"]["alg"] == "ES512"
    # The backend asked for ES512 over the SHA-512 digest of its signing input ...
    (sent,) = [s.body for s in transport.seen if s.path.endswith("/sign") and s.authorized]
    assert sent["alg"] == "ES512" and b64d(sent["value"]) == hashlib.sha512(b"header.payload").digest()
    # ... and what it returned is the vault's signature, valid over the recorded digest.
    r, s = int.from_bytes(signature[:66], "big"), int.from_bytes(signature[66:], "big")
    prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA512()))
    resolved.public_key.verify(utils.encode_dss_signature(r, s), b64d(sign["request_body"]["value"]), prehashed)
    resource = "https://managedhsm.azure.net" if hsm else "https://vault.azure.net"
    assert credential.scopes[0] == (resource + "/.default",)
    assert backend.custody_warning(resolved) == (
        None if hsm else "software-protected key (kty EC, not EC-HSM): the private key is not in an HSM"
    )
    backend.close()


def test_a_signature_that_lost_its_leading_zero_byte_is_refused():
    """Negative control, CONSTRUCTED from vault_ec_p521_es512.json: the recorded ES512 reply
    with its leading zero byte dropped (what an integer round-trip would do). The backend
    must refuse it rather than pass a 131-byte signature on."""
    rec = load_recording("vault_ec_p521_es512.json")
    create = recorded(rec, "POST", "/create")
    sign = recorded(rec, "POST", "/sign")
    body = dict(sign["response"]["body"])
    stripped = b64d(body["value"])[1:]
    body["value"] = base64.urlsafe_b64encode(stripped).rstrip(b"=").decode()
    transport = ReplayTransport(
        challenge(rec),
        {
            ("GET", sign["path"].removesuffix("/sign")): create["response"],
            ("POST", sign["path"]): {**sign["response"], "body": body},
        },
    )
    backend, _ = replay_backend(transport)
    resolved = backend.resolve(f"azurekv:{create['response']['body']['key']['kid']}")
    from helseid_signer.backends.base import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="131-byte ES512 signature, 132 expected"):
        backend.sign(resolved, ALGORITHMS["ES512"], b"header.payload")
    backend.close()
