"""Every backend signs exactly as JOSE wants, proven by independent verifiers
(``cryptography`` and jwcrypto), never by the product's own code. bug-kinds.md 1-12."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwcrypto import jwk, jws

from helseid_signer.algorithms import ALGORITHMS, AlgorithmError
from helseid_signer.jwt import compact, json_b64, signing_input
from helseid_signer.keys import make_signing_key

SPEC_FOR = {
    "RS256": "RSA-2048", "RS384": "RSA-3072", "RS512": "RSA-4096",
    "PS256": "RSA-2048", "PS384": "RSA-3072", "PS512": "RSA-4096",
    "ES256": "EC-P256", "ES384": "EC-P384", "ES512": "EC-P521",
}  # fmt: skip


def _hash(alg):
    return ALGORITHMS[alg].crypto_hash()


def verify_independently(public_key, alg: str, data: bytes, signature: bytes) -> None:
    """Verify with ``cryptography`` using the JOSE rules spelled out here, not the product's table."""
    a = ALGORITHMS[alg]
    if alg.startswith("RS"):
        public_key.verify(signature, data, padding.PKCS1v15(), _hash(alg))
    elif alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(_hash(alg)), salt_length=a.hash_size)
        public_key.verify(signature, data, pss, _hash(alg))
    else:
        width = {"ES256": 32, "ES384": 48, "ES512": 66}[alg]
        assert len(signature) == 2 * width
        der = encode_dss_signature(int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big"))
        public_key.verify(der, data, ec.ECDSA(_hash(alg)))


@pytest.mark.parametrize("alg", list(SPEC_FOR))
def test_every_algorithm_signs_a_jws_that_independent_verifiers_accept(backend_under_test, key_for, alg):
    backend = backend_under_test.backend
    resolved = backend.resolve(key_for(SPEC_FOR[alg]))
    key = make_signing_key("k", alg, backend, resolved)
    data = signing_input(key.assertion_header, json_b64({"sub": "conformance", "alg": alg}))
    signature = key.sign(data)
    verify_independently(resolved.public_key, alg, data, signature)
    token = compact(data, signature)
    public = jwk.JWK.from_pyca(resolved.public_key)
    parsed = jws.JWS()
    parsed.deserialize(token, key=public, alg=alg)
    assert json.loads(parsed.payload) == {"sub": "conformance", "alg": alg}
    assert parsed.jose_header["kid"] == public.thumbprint() == key.kid
    assert key.jwk == {k: v for k, v in json.loads(public.export_public()).items() if k in key.jwk}


@pytest.mark.parametrize("alg", ["PS256", "PS384", "PS512"])
def test_pss_salt_is_the_hash_length(backend_under_test, key_for, alg):
    """Negative controls: the same signature must fail with another salt length."""
    backend = backend_under_test.backend
    resolved = backend.resolve(key_for(SPEC_FOR[alg]))
    data = b"salt-length check"
    signature = backend.sign(resolved, ALGORITHMS[alg], data)
    hash_size = ALGORITHMS[alg].hash_size
    verify_independently(resolved.public_key, alg, data, signature)
    # (cryptography's MAX_LENGTH means "detect" when verifying, so it is no control.)
    for wrong in (0, 20, hash_size - 1, hash_size + 1):
        with pytest.raises(InvalidSignature):
            pss = padding.PSS(mgf=padding.MGF1(_hash(alg)), salt_length=wrong)
            resolved.public_key.verify(signature, data, pss, _hash(alg))


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_digest_is_not_hashed_twice(backend_under_test, key_for, alg):
    """Negative control: the signature must NOT verify over SHA-256(data) as the message."""
    backend = backend_under_test.backend
    resolved = backend.resolve(key_for(SPEC_FOR[alg]))
    data = b"double hashing check"
    signature = backend.sign(resolved, ALGORITHMS[alg], data)
    verify_independently(resolved.public_key, alg, data, signature)
    with pytest.raises(InvalidSignature):
        verify_independently(resolved.public_key, alg, hashlib.sha256(data).digest(), signature)


def test_thousands_of_es512_signatures_are_132_bytes_and_valid(backend_under_test, key_for):
    """R or S with a leading zero byte turns up about once in 128 signatures (bug-kinds 2)."""
    backend = backend_under_test.backend
    resolved = backend.resolve(key_for("EC-P521"))
    alg = ALGORITHMS["ES512"]
    short = 0
    for i in range(2000):
        data = f"es512-{i}".encode()
        signature = backend.sign(resolved, alg, data)
        assert len(signature) == 132
        short += signature[0] == 0 or signature[66] == 0
        verify_independently(resolved.public_key, "ES512", data, signature)
    assert short > 0, "no signature with a leading zero byte in R or S: the width rule went untested"


def test_signing_input_far_over_4096_bytes(backend_under_test, key_for):
    backend = backend_under_test.backend
    for spec, alg in (("RSA-2048", "PS256"), ("EC-P256", "ES256")):
        resolved = backend.resolve(key_for(spec))
        data = b"x" * 100_000
        verify_independently(resolved.public_key, alg, data, backend.sign(resolved, ALGORITHMS[alg], data))


@pytest.mark.parametrize(
    ("spec", "alg"),
    [("EC-P384", "ES256"), ("EC-P256", "ES512"), ("EC-P256", "PS256"), ("RSA-2048", "ES256"), ("EC-P521", "RS256")],
)
def test_alg_that_does_not_fit_the_key_is_refused_before_any_backend_call(backend_under_test, key_for, spec, alg):
    backend = backend_under_test.backend
    resolved = backend.resolve(key_for(spec))
    calls = []
    original = backend.sign
    backend.sign = lambda *a, **k: calls.append(a) or original(*a, **k)  # observe, do not replace
    try:
        with pytest.raises(AlgorithmError):
            make_signing_key("k", alg, backend, resolved)
    finally:
        del backend.sign
    assert calls == []


def test_jwk_and_thumbprint_match_jwcrypto_for_many_keys(backend_under_test):
    """Fresh keys on every curve: coordinates full width, thumbprints as jwcrypto computes."""
    backend = backend_under_test.backend
    for spec in ("EC-P256", "EC-P384", "EC-P521", "EC-P256", "EC-P256", "RSA-2048"):
        resolved = backend.resolve(backend_under_test.make_key(spec))
        key = make_signing_key("k", {"EC-P256": "ES256", "EC-P384": "ES384", "EC-P521": "ES512"}.get(spec, "RS256"),
                               backend, resolved)  # fmt: skip
        oracle = jwk.JWK.from_pyca(resolved.public_key)
        assert key.kid == oracle.thumbprint() and len(key.kid) == 43
        if isinstance(resolved.public_key, ec.EllipticCurvePublicKey):
            width = {"P-256": 32, "P-384": 48, "P-521": 66}[key.jwk["crv"]]
            for coordinate in ("x", "y"):
                assert len(jwk.base64url_decode(key.jwk[coordinate])) == width
        else:
            assert isinstance(resolved.public_key, rsa.RSAPublicKey)


def test_kid_names_the_key_that_signed(backend_under_test, key_for):
    """Two keys of the same type: each signature verifies only under the key its kid names."""
    backend = backend_under_test.backend
    first = make_signing_key("a", "ES256", backend, backend.resolve(key_for("EC-P256")))
    second = make_signing_key("b", "ES256", backend, backend.resolve(backend_under_test.make_key("EC-P256")))
    assert first.kid != second.kid
    for key, other in ((first, second), (second, first)):
        data = signing_input(key.assertion_header, json_b64({"n": 1}))
        signature = key.sign(data)
        verify_independently(key.resolved.public_key, "ES256", data, signature)
        with pytest.raises(InvalidSignature):
            verify_independently(other.resolved.public_key, "ES256", data, signature)
