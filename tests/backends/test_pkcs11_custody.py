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
        "sign_recover": False, "decrypt": False, "unwrap": False, "derive": False, "modifiable": False,
        "copyable": False,
    }  # fmt: skip


def test_imported_key_is_reported(softhsm_token, pkcs11_backend):
    import_private_key(softhsm_token, ec.generate_private_key(ec.SECP256R1()), "custody-imported", "c0ffee")
    resolved = pkcs11_backend.resolve(softhsm_token.uri("custody-imported"))
    warning = pkcs11_backend.custody_warning(resolved)
    assert warning is not None and "CKA_NEVER_EXTRACTABLE false" in warning
    assert resolved.handle.custody["never_extractable"] is False


# ---------------------------------- keys create restricts the key to signing (issue 13 point 9)
# Oracle: python-pkcs11 on the raw token (its own session and its own reading of
# CKA_ALLOWED_MECHANISMS, an array of CK_ULONG), and `cryptography` for the signatures.

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import struct  # noqa: E402

import pkcs11  # noqa: E402
import pytest  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass  # noqa: E402
from pkcs11.attributes import AttributeMapper  # noqa: E402
from pkcs11.exceptions import PKCS11Error  # noqa: E402

from helseid_signer.algorithms import ALGORITHMS, AlgorithmError  # noqa: E402
from helseid_signer.backends.pkcs11 import module_lock  # noqa: E402


@contextlib.contextmanager
def _raw_session(token):
    mapper = AttributeMapper()
    mapper.register_handler(
        Attribute.ALLOWED_MECHANISMS,
        lambda ms: b"".join(struct.pack("L", int(m)) for m in ms),
        lambda v: [m for (m,) in struct.iter_unpack("L", v)],
    )
    with module_lock(token.module):
        tok = pkcs11.lib(token.module).get_token(token_label=token.label)
        try:
            session = tok.open(user_pin=token.pin, rw=True, attribute_mapper=mapper)
        except pkcs11.UserAlreadyLoggedIn:
            session = tok.open(rw=True, attribute_mapper=mapper)
        yield session


def _private(session, label):
    (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
    return private


def test_keys_create_restricts_an_rsa_key_to_its_alg_s_one_mechanism(softhsm_token, pkcs11_backend):
    resolved = pkcs11_backend.create_key(softhsm_token.uri("restricted-ps256"), "RSA-2048", alg=ALGORITHMS["PS256"])
    public = resolved.public_key
    data = b"header.payload"
    with _raw_session(softhsm_token) as session:
        private = _private(session, "restricted-ps256")
        flags = {a: private[a] for a in (Attribute.SIGN, Attribute.SIGN_RECOVER, Attribute.DECRYPT, Attribute.UNWRAP,
                                         Attribute.DERIVE, Attribute.MODIFIABLE, Attribute.COPYABLE)}  # fmt: skip
        allowed = private[Attribute.ALLOWED_MECHANISMS]
        # Raw RSA with the PIN - the attack the open attributes allowed - is refused by the token.
        with pytest.raises(PKCS11Error):
            private.sign(b"\x00" * 256, mechanism=Mechanism.RSA_X_509)
        with pytest.raises(PKCS11Error):
            private.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.RSA_PKCS)
        with pytest.raises(PKCS11Error):  # another padding than the key's alg
            private.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        with pytest.raises(PKCS11Error):  # attributes cannot be loosened afterwards
            private[Attribute.ALLOWED_MECHANISMS] = [Mechanism.RSA_X_509]
    assert flags == {
        Attribute.SIGN: True, Attribute.SIGN_RECOVER: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
        Attribute.DERIVE: False, Attribute.MODIFIABLE: False, Attribute.COPYABLE: False,
    }  # fmt: skip
    assert allowed == [int(Mechanism.SHA256_RSA_PKCS_PSS)]
    # The backend still signs with the alg (and its health probe picks the allowed mechanism).
    signature = pkcs11_backend.sign(resolved, ALGORITHMS["PS256"], data)
    public.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert pkcs11_backend.probe() is True
    assert pkcs11_backend.custody_warning(resolved) is None
    with pytest.raises(AlgorithmError, match="CKA_ALLOWED_MECHANISMS"):
        pkcs11_backend.check_alg(resolved, ALGORITHMS["RS256"])
    pkcs11_backend.check_alg(resolved, ALGORITHMS["PS256"])


def test_keys_create_restricts_an_ec_key_to_ecdsa(softhsm_token, pkcs11_backend):
    resolved = pkcs11_backend.create_key(softhsm_token.uri("restricted-es256"), "EC-P256")
    with _raw_session(softhsm_token) as session:
        private = _private(session, "restricted-es256")
        assert private[Attribute.ALLOWED_MECHANISMS] == [int(Mechanism.ECDSA)]
        assert (private[Attribute.MODIFIABLE], private[Attribute.COPYABLE], private[Attribute.DERIVE]) == (
            False, False, False,
        )  # fmt: skip
    assert pkcs11_backend.custody_warning(resolved) is None


def test_an_unrestricted_key_is_reported_and_signs_raw_rsa(softhsm_token, pkcs11_backend):
    """Negative control: a key made as keys create made it before (no CKA_ALLOWED_MECHANISMS,
    CKA_SIGN_RECOVER/MODIFIABLE/COPYABLE left to the token's defaults): raw RSA works with
    the PIN, and the custody report names every open attribute."""
    with _raw_session(softhsm_token) as session:
        public, private = session.generate_keypair(
            KeyType.RSA, 2048, store=True, label="open-rsa", id=b"open-rsa",
            public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                              Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False},
        )  # fmt: skip
        raw = private.sign(b"\x00" + b"\x01" * 255, mechanism=Mechanism.RSA_X_509)  # textbook RSA
    n = int.from_bytes(bytes(public[Attribute.MODULUS]), "big")
    e = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
    assert pow(int.from_bytes(raw, "big"), e, n) == int.from_bytes(b"\x00" + b"\x01" * 255, "big")
    resolved = pkcs11_backend.resolve(softhsm_token.uri("open-rsa"))
    warning = pkcs11_backend.custody_warning(resolved)
    assert warning is not None
    for text in ("CKA_SIGN_RECOVER true", "CKA_MODIFIABLE true", "CKA_COPYABLE true", "no CKA_ALLOWED_MECHANISMS"):
        assert text in warning, warning
    assert isinstance(resolved.public_key, rsa.RSAPublicKey)
    with pytest.raises(InvalidSignature):  # the raw result is no PKCS#1 signature of anything
        resolved.public_key.verify(raw, b"x", padding.PKCS1v15(), hashes.SHA256())
