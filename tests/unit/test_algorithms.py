"""The algorithm table and key/alg fit (helseid_signer.algorithms).

Expected values are typed in from RFC 7518 section 3.1 and the HelseID profile, not read
from the product's table.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from helseid_signer.algorithms import (
    ALGORITHMS,
    CURVES,
    MIN_RSA_BITS,
    AlgorithmError,
    KeyType,
    Padding,
    check_key_fits,
    get_algorithm,
)

# alg -> (kty, hashlib name, digest bytes, padding, curve) per RFC 7518 section 3.1.
EXPECTED = {
    "RS256": ("RSA", "sha256", 32, "RSASSA-PKCS1-v1_5", None),
    "RS384": ("RSA", "sha384", 48, "RSASSA-PKCS1-v1_5", None),
    "RS512": ("RSA", "sha512", 64, "RSASSA-PKCS1-v1_5", None),
    "PS256": ("RSA", "sha256", 32, "RSASSA-PSS", None),
    "PS384": ("RSA", "sha384", 48, "RSASSA-PSS", None),
    "PS512": ("RSA", "sha512", 64, "RSASSA-PSS", None),
    "ES256": ("EC", "sha256", 32, "none", "P-256"),
    "ES384": ("EC", "sha384", 48, "none", "P-384"),
    "ES512": ("EC", "sha512", 64, "none", "P-521"),
}
CURVE_OF = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
RSA_ALGS = [a for a, v in EXPECTED.items() if v[0] == "RSA"]
EC_ALGS = [a for a, v in EXPECTED.items() if v[0] == "EC"]


@pytest.fixture(scope="module")
def ec_public() -> dict[type, ec.EllipticCurvePublicKey]:
    curves = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1, ec.SECP256K1)
    return {c: ec.generate_private_key(c()).public_key() for c in curves}


def _synthetic_rsa(bits: int) -> rsa.RSAPublicKey:
    """An RSA public key of exactly ``bits`` bits (not a real modulus; only the size matters)."""
    n = (1 << (bits - 1)) | random.Random(bits).getrandbits(bits - 1) | 1
    return rsa.RSAPublicNumbers(65537, n).public_key()


def test_table_has_exactly_the_nine_helseid_algs() -> None:
    assert set(ALGORITHMS) == set(EXPECTED)
    assert len(ALGORITHMS) == 9


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_table_entry(name: str) -> None:
    kty, hash_name, hash_size, pad, curve = EXPECTED[name]
    alg = ALGORITHMS[name]
    assert alg.name == name
    assert alg.kty is KeyType(kty)
    assert alg.hash_name == hash_name
    assert alg.hash_size == hash_size == hashlib.new(hash_name).digest_size
    assert alg.padding is Padding(pad)
    assert alg.crypto_hash().name == hash_name
    assert alg.crypto_hash().digest_size == hash_size
    assert (alg.curve.name if alg.curve else None) == curve
    assert get_algorithm(name) is alg


@pytest.mark.parametrize(("name", "size"), [("ES256", 64), ("ES384", 96), ("ES512", 132)])
def test_signature_size(name: str, size: int) -> None:
    assert ALGORITHMS[name].signature_size == size


@pytest.mark.parametrize("name", RSA_ALGS)
def test_signature_size_none_for_rsa(name: str) -> None:
    assert ALGORITHMS[name].signature_size is None


def test_curves() -> None:
    assert {n: (c.size, c.oid) for n, c in CURVES.items()} == {
        "P-256": (32, "1.2.840.10045.3.1.7"),
        "P-384": (48, "1.3.132.0.34"),
        "P-521": (66, "1.3.132.0.35"),
    }


@pytest.mark.parametrize("name", ["HS256", "HS512", "none", "None", "", "rs256", "es256", "EdDSA", "ES256K", "PS256 "])
def test_get_algorithm_refuses_unknown(name: str) -> None:
    with pytest.raises(AlgorithmError, match="not one of"):
        get_algorithm(name)


def test_algorithm_error_is_value_error() -> None:
    assert issubclass(AlgorithmError, ValueError)


@pytest.mark.parametrize("name", RSA_ALGS)
def test_rsa_algs_accept_rsa_2048_and_larger(name: str, rsa_2048) -> None:
    check_key_fits(ALGORITHMS[name], rsa_2048.public_key())
    check_key_fits(ALGORITHMS[name], _synthetic_rsa(MIN_RSA_BITS))
    check_key_fits(ALGORITHMS[name], _synthetic_rsa(4096))


@pytest.mark.parametrize("name", RSA_ALGS)
def test_rsa_algs_refuse_short_rsa(name: str, rsa_1024) -> None:
    with pytest.raises(AlgorithmError, match=f"{name}.*1024"):
        check_key_fits(ALGORITHMS[name], rsa_1024.public_key())
    with pytest.raises(AlgorithmError, match="2047"):
        check_key_fits(ALGORITHMS[name], _synthetic_rsa(2047))


@pytest.mark.parametrize("name", RSA_ALGS)
def test_rsa_algs_refuse_ec_keys(name: str, ec_public) -> None:
    for key in ec_public.values():
        with pytest.raises(AlgorithmError, match=f"{name} needs an RSA key"):
            check_key_fits(ALGORITHMS[name], key)


@pytest.mark.parametrize("name", EC_ALGS)
def test_ec_algs_accept_only_their_curve(name: str, ec_public) -> None:
    alg = ALGORITHMS[name]
    for curve, key in ec_public.items():
        if curve is CURVE_OF[name]:
            check_key_fits(alg, key)
        else:
            with pytest.raises(AlgorithmError, match=f"{name} needs curve {alg.curve.name}"):
                check_key_fits(alg, key)


@pytest.mark.parametrize(
    ("name", "curve", "described"),
    [("ES256", ec.SECP384R1, "EC P-384"), ("ES512", ec.SECP256R1, "EC P-256"), ("ES384", ec.SECP521R1, "EC P-521")],
)
def test_ec_mismatch_message_names_both(name: str, curve: type, described: str, ec_public) -> None:
    with pytest.raises(AlgorithmError) as info:
        check_key_fits(ALGORITHMS[name], ec_public[curve])
    assert name in str(info.value) and described in str(info.value)


@pytest.mark.parametrize("name", EC_ALGS)
def test_ec_algs_refuse_rsa(name: str, rsa_2048) -> None:
    with pytest.raises(AlgorithmError, match=f"{name} needs an EC .*RSA 2048 bits"):
        check_key_fits(ALGORITHMS[name], rsa_2048.public_key())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_refuse_other_key_types(name: str) -> None:
    with pytest.raises(AlgorithmError):
        check_key_fits(ALGORITHMS[name], ed25519.Ed25519PrivateKey.generate().public_key())
