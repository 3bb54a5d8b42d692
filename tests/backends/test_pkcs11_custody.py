"""Key custody as the PKCS#11 token reports it: a key made by ``keys create`` has been
non-exportable since creation; an imported one was outside the token once, and the backend
says so (start-up log, ``helseid-signer check`` warning). The expected flags are what
PKCS#11 (v2.40 section 4.9) says each way of making a key leaves behind."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.softhsm import import_private_key


def test_generated_key_has_no_custody_warning(softhsm_token, pkcs11_backend):
    resolved = pkcs11_backend.create_key(softhsm_token.uri("custody-made"), "EC-P256")
    assert pkcs11_backend.custody_warning(resolved) is None
    assert resolved.handle.custody == {
        "extractable": False, "sensitive": True, "never_extractable": True, "always_sensitive": True,
    }  # fmt: skip


def test_imported_key_is_reported(softhsm_token, pkcs11_backend):
    import_private_key(softhsm_token, ec.generate_private_key(ec.SECP256R1()), "custody-imported", "c0ffee")
    resolved = pkcs11_backend.resolve(softhsm_token.uri("custody-imported"))
    warning = pkcs11_backend.custody_warning(resolved)
    assert warning is not None and "CKA_NEVER_EXTRACTABLE false" in warning
    assert resolved.handle.custody["never_extractable"] is False
