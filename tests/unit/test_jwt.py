"""JOSE core (helseid_signer.jwt) against RFC vectors and independent JOSE libraries.

Oracles: RFC 7638 / RFC 7517 / RFC 9449 example values, jwcrypto, joserfc, PyJWT, and
``cryptography`` for signing and DER decoding. A hand-written DER encoder builds the rare
ECDSA shapes (short R or S) that key generation and signing seldom produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws
from jwcrypto.common import base64url_decode, base64url_encode

from helseid_signer.algorithms import ALGORITHMS, CURVES
from helseid_signer.jwt import (
    access_token_hash,
    b64url,
    b64url_decode,
    compact,
    curve_of,
    der_to_raw,
    json_b64,
    public_jwk,
    raw_to_der,
    signing_input,
    thumbprint,
)

EC_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
WIDTH = {"P-256": 32, "P-384": 48, "P-521": 66}
HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}

# RFC 7638 section 3.1 (the RSA key of RFC 7517 appendix A.1) and its thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
        "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQ"
        "vRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzK"
        "nqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 7517 appendix A.1 EC key; its thumbprint as in jwcrypto's own test suite.
RFC7517_EC_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
    "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
    "use": "enc",
    "kid": "1",
}
RFC7517_EC_THUMBPRINT = "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s"

# RFC 9449 section 7.1: an access token and the ath of a proof that goes with it.
RFC9449_ACCESS_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC9449_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"

# Private scalars found once by generating keys until a public coordinate began with a
# zero byte (about one key in 256 for P-256/P-384; for P-521 two zero bytes, about one in 512).
ZERO_LEADING_EC = [
    ("P-256", "x", "175c8886637c133260de11d6735998089b72b0237c29a63b2931de6eabf387b3"),
    ("P-256", "y", "52d39ecfed1b80a5b39454b2b5c2e7e39bec95d5fa80c0076ab7d8d8a4572cb9"),
    (
        "P-384",
        "x",
        "514aa6a60b58889812aa33bd2d4367b933c89b1fb8c70b12ef7c012b5945ea075e54c4c54c37961fb86358814db5d107",
    ),
    (
        "P-384",
        "y",
        "ed52b0227abffcfec88f4105f88236cf35ebb2f9df8f8cc3252443398e3efdf9f18c27d1ea80d5887074f4c33fe0e23f",
    ),
    (
        "P-521",
        "x",
        "8d20fea4f0d71556c6c8835d36913b40a71183c32abf817fc81cad27232b559f06432631e58d"
        "001674062cf78a8fe77fa331178215f807a86a99b9f6836821ac5d",
    ),
    (
        "P-521",
        "y",
        "b85dee9a1c29261317831bc94e662f1abe56d2c4c175a26ccf3bc380d05d1b20ea48593b6f2c"
        "4f8c7811713dcf7a0aad5d70e7e1864f06c89e5d1793cab3fd01b0",
    ),
]


# --------------------------------------------------------------------------- helpers


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_integer(value: int) -> bytes:
    """DER INTEGER of a non-negative value: minimal two's complement (0x00 prefix if the top bit is set)."""
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # always room for a sign bit
    while len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return b"\x02" + _der_len(len(body)) + body


def der_signature(r: int, s: int) -> bytes:
    body = der_integer(r) + der_integer(s)
    return b"\x30" + _der_len(len(body)) + body


def sign_with_cryptography(alg_name: str, key, data: bytes) -> bytes:
    """A JOSE signature made by ``cryptography`` directly (ECDSA converted by the product's der_to_raw)."""
    hash_alg = HASHES[alg_name[2:]]()
    if alg_name.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), hash_alg)
    if alg_name.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
        return key.sign(data, pss, hash_alg)
    der = key.sign(data, ec.ECDSA(hash_alg))
    return der_to_raw(der, CURVES[{"256": "P-256", "384": "P-384", "512": "P-521"}[alg_name[2:]]])


def _key_for(alg_name: str, rsa_2048, ec_keys):
    if alg_name.startswith("ES"):
        return ec_keys[{"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg_name]]
    return rsa_2048


def build_token(alg_name: str, key, claims: dict, typ: str = "dpop+jwt") -> str:
    header = {"alg": alg_name, "typ": typ, "jwk": public_jwk(key.public_key())}
    data = signing_input(json_b64(header), json_b64(claims))
    return compact(data, sign_with_cryptography(alg_name, key, data))


# --------------------------------------------------------------------------- base64url / JSON


@pytest.mark.parametrize("length", range(0, 12))
def test_b64url_matches_jwcrypto_and_has_no_padding(length: int) -> None:
    data = bytes(random.Random(length).randrange(256) for _ in range(length))
    encoded = b64url(data)
    assert encoded == base64url_encode(data)
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    assert b64url_decode(encoded) == data
    assert base64url_decode(encoded) == data


def test_b64url_uses_url_safe_alphabet() -> None:
    assert b64url(b"\xfb\xff\xbf") == "-_-_"
    assert b64url(b"\xff") == "_w"
    assert b64url(b"") == ""


@pytest.mark.parametrize(
    "text",
    ["ab+c", "ab/c", "YQ==", "YQ=", "ab!cd", "ab cd", "ab\ncd", "YWJj\x00", "YWJj.", "abcde", "é"],
)
def test_b64url_decode_refuses_outside_alphabet(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


def test_json_b64_is_compact_utf8_json() -> None:
    obj = {"b": 1, "a": "æøå", "n": {"x": [1, 2]}}
    segment = json_b64(obj)
    raw = base64url_decode(segment)
    assert raw == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert b" " not in raw
    assert json.loads(raw) == obj


def test_signing_input_and_compact_shape() -> None:
    data = signing_input("aGVhZA", "Ym9keQ")
    assert data == b"aGVhZA.Ym9keQ"
    assert compact(data, b"\xff\xfe") == "aGVhZA.Ym9keQ." + base64url_encode(b"\xff\xfe")


# --------------------------------------------------------------------------- RFC vectors


def test_rfc7638_thumbprint_vector() -> None:
    assert jwcrypto_jwk.JWK(**RFC7638_JWK).thumbprint() == RFC7638_THUMBPRINT  # the vector is typed right
    assert thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_rfc7638_key_through_public_jwk() -> None:
    n = int.from_bytes(base64url_decode(RFC7638_JWK["n"]), "big")
    e = int.from_bytes(base64url_decode(RFC7638_JWK["e"]), "big")
    jwk = public_jwk(rsa.RSAPublicNumbers(e, n).public_key())
    assert jwk == {"e": "AQAB", "kty": "RSA", "n": RFC7638_JWK["n"]}
    assert thumbprint(jwk) == RFC7638_THUMBPRINT


def test_rfc7517_ec_thumbprint_vector() -> None:
    assert jwcrypto_jwk.JWK(**RFC7517_EC_JWK).thumbprint() == RFC7517_EC_THUMBPRINT
    assert thumbprint(RFC7517_EC_JWK) == RFC7517_EC_THUMBPRINT


def test_thumbprint_ignores_optional_members_and_member_order() -> None:
    shuffled = {"kid": "x", "use": "sig", "n": RFC7638_JWK["n"], "alg": "PS256", "e": "AQAB", "kty": "RSA"}
    assert thumbprint(shuffled) == RFC7638_THUMBPRINT
    assert len(RFC7638_THUMBPRINT) == 43


def test_thumbprint_refuses_unknown_kty_or_missing_member() -> None:
    with pytest.raises(KeyError):
        thumbprint({"kty": "oct", "k": "AAAA"})
    with pytest.raises(KeyError):
        thumbprint({"kty": "EC", "crv": "P-256", "x": RFC7517_EC_JWK["x"]})


def test_rfc9449_ath_vector() -> None:
    assert access_token_hash(RFC9449_ACCESS_TOKEN) == RFC9449_ATH
    assert base64url_encode(hashlib.sha256(RFC9449_ACCESS_TOKEN.encode("ascii")).digest()) == RFC9449_ATH


def test_ath_refuses_non_ascii_token() -> None:
    with pytest.raises(ValueError):
        access_token_hash("tøken")


# --------------------------------------------------------------------------- public JWKs


def _assert_matches_oracles(public_key, jwk: dict) -> None:
    expected = jwcrypto_jwk.JWK.from_pyca(public_key)
    exported = expected.export_public(as_dict=True)
    exported.pop("kid", None)
    assert jwk == exported
    assert thumbprint(jwk) == expected.thumbprint()
    joserfc_key = (RSAKey if isinstance(public_key, rsa.RSAPublicKey) else ECKey).import_key(public_key)
    assert thumbprint(jwk) == joserfc_key.thumbprint()
    assert list(jwk) == sorted(jwk)  # RFC 7638 member order
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


def test_public_jwk_rsa_matches_jwcrypto(rsa_keys) -> None:
    for key in rsa_keys:
        pub = key.public_key()
        jwk = public_jwk(pub)
        assert set(jwk) == {"e", "kty", "n"}
        assert len(base64url_decode(jwk["n"])) == (pub.key_size + 7) // 8
        assert jwk["e"] == "AQAB"
        _assert_matches_oracles(pub, jwk)


def test_public_jwk_of_private_key_material_is_public_only(rsa_2048, ec_keys) -> None:
    for key in [rsa_2048, *ec_keys.values()]:
        jwk = public_jwk(key.public_key())
        assert "d" not in jwk
        assert jwcrypto_jwk.JWK(**jwk).has_private is False


@pytest.mark.parametrize("crv", sorted(EC_CURVES))
def test_public_jwk_ec_matches_jwcrypto_many_keys(crv: str) -> None:
    saw_leading_zero = False
    for _ in range(300):
        pub = ec.generate_private_key(EC_CURVES[crv]()).public_key()
        jwk = public_jwk(pub)
        assert set(jwk) == {"crv", "kty", "x", "y"}
        assert jwk["crv"] == crv and jwk["kty"] == "EC"
        x, y = base64url_decode(jwk["x"]), base64url_decode(jwk["y"])
        assert len(x) == len(y) == WIDTH[crv]
        nums = pub.public_numbers()
        assert int.from_bytes(x, "big") == nums.x and int.from_bytes(y, "big") == nums.y
        saw_leading_zero |= x[0] == 0 or y[0] == 0
        _assert_matches_oracles(pub, jwk)
    if crv == "P-521":
        assert saw_leading_zero  # 521 bits in 66 bytes: the top byte is 0 half of the time


@pytest.mark.parametrize(("crv", "coord", "scalar"), ZERO_LEADING_EC)
def test_public_jwk_ec_zero_leading_coordinate_fixed_vector(crv: str, coord: str, scalar: str) -> None:
    private = ec.derive_private_key(int(scalar, 16), EC_CURVES[crv]())
    pub = private.public_key()
    jwk = public_jwk(pub)
    raw = base64url_decode(jwk[coord])
    zeros = 2 if crv == "P-521" else 1
    assert raw[:zeros] == b"\0" * zeros  # the vector really has the rare shape
    assert len(base64url_decode(jwk["x"])) == len(base64url_decode(jwk["y"])) == WIDTH[crv]
    _assert_matches_oracles(pub, jwk)
    # The padded JWK is what a verifier rebuilds the key from: a proof signed with it verifies.
    alg = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[crv]
    token = build_token(alg, private, {"htm": "POST"})
    verifier = jwcrypto_jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jwcrypto_jwk.JWK(**jwk), alg=alg)


def test_public_jwk_rsa_modulus_with_top_bit_set_is_minimal(rsa_2048) -> None:
    """A modulus as a token hands it over (00 || n, as in a DER INTEGER) gives a minimal ``n``."""
    nums = rsa_2048.public_key().public_numbers()
    handed_over = b"\x00" + nums.n.to_bytes(256, "big")
    assert handed_over[1] >= 0x80
    pub = rsa.RSAPublicNumbers(nums.e, int.from_bytes(handed_over, "big")).public_key()
    jwk = public_jwk(pub)
    n = base64url_decode(jwk["n"])
    assert len(n) == 256 and n[0] >= 0x80
    assert not jwk["n"].startswith("AA")
    _assert_matches_oracles(pub, jwk)


@pytest.mark.filterwarnings("ignore:Key size should be:joserfc.errors.SecurityWarning")
def test_public_jwk_rsa_modulus_not_whole_bytes_and_small_exponent() -> None:
    # A synthetic odd 2047-bit modulus: only the encoding is under test here.
    n = (1 << 2046) | int.from_bytes(random.Random(7).randbytes(255), "big") | 1
    assert n.bit_length() == 2047
    for e, e_b64 in ((65537, "AQAB"), (3, "Aw")):
        pub = rsa.RSAPublicNumbers(e, n).public_key()
        jwk = public_jwk(pub)
        assert jwk["e"] == e_b64
        raw_n = base64url_decode(jwk["n"])
        assert len(raw_n) == 256 and 0 < raw_n[0] < 0x80
        _assert_matches_oracles(pub, jwk)


def test_public_jwk_refuses_other_curves_and_key_types() -> None:
    with pytest.raises(ValueError):
        public_jwk(ec.generate_private_key(ec.SECP256K1()).public_key())
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(TypeError):
        public_jwk(ed25519.Ed25519PrivateKey.generate().public_key())


def test_curve_of(ec_keys) -> None:
    for name, key in ec_keys.items():
        assert curve_of(key.public_key()).name == name
        assert curve_of(key.public_key()).size == WIDTH[name]


# --------------------------------------------------------------------------- ECDSA encodings


def _der_cases(size: int) -> list[tuple[int, int]]:
    top = (1 << (8 * size)) - 1  # the widest integer that still fits the fixed width
    high_bit = 1 << (8 * size - 1)  # needs a 0x00 sign byte in DER
    return [
        (1, 1),
        (1, high_bit | 0x1234),  # r = 1, s with the top bit set
        (0x1234, 1),
        (0xFF, 0x80),  # one-byte integers, one with a DER sign byte
        (1 << (8 * size - 9), 1 << (8 * size - 17)),  # one and two leading zero bytes
        (top, top),
        (high_bit, 0x7F << (8 * size - 8)),
    ]


@pytest.mark.parametrize("crv", sorted(WIDTH))
def test_der_to_raw_hand_made_short_integers(crv: str) -> None:
    curve = CURVES[crv]
    size = WIDTH[crv]
    assert curve.size == size
    for r, s in _der_cases(size):
        der = der_signature(r, s)
        assert decode_dss_signature(der) == (r, s)  # the hand-made DER is what cryptography reads
        raw = der_to_raw(der, curve)
        assert len(raw) == 2 * size == {"P-256": 64, "P-384": 96, "P-521": 132}[crv]
        assert raw == r.to_bytes(size, "big") + s.to_bytes(size, "big")
        assert raw_to_der(raw, curve) == der  # DER is canonical: the round trip is exact


@pytest.mark.parametrize("crv", sorted(WIDTH))
def test_der_to_raw_refuses_out_of_range_and_malformed(crv: str) -> None:
    curve = CURVES[crv]
    size = WIDTH[crv]
    too_wide = 1 << (8 * size)
    bad = [
        der_signature(too_wide, 1),
        der_signature(1, too_wide),
        der_signature(0, 1),
        der_signature(1, 0),
        b"\x30\x06\x02\x01\xff\x02\x01\x01",  # r = -1
        der_signature(1, 1) + b"\x00",  # trailing data
        der_signature(1, 1)[:-1],  # truncated
        b"\x30\x07\x02\x01\x01\x02\x02\x00\x01",  # non-minimal INTEGER
        b"",
        b"\x01" * (2 * size),  # raw R || S is not DER
    ]
    for der in bad:
        with pytest.raises(ValueError):
            der_to_raw(der, curve)


@pytest.mark.parametrize("crv", sorted(WIDTH))
def test_raw_to_der_refuses_wrong_length(crv: str) -> None:
    curve = CURVES[crv]
    for length in (0, 2 * WIDTH[crv] - 1, 2 * WIDTH[crv] + 1, 64 if crv != "P-256" else 96):
        with pytest.raises(ValueError):
            raw_to_der(b"\x01" * length, curve)


@pytest.mark.parametrize("crv", sorted(WIDTH))
def test_der_to_raw_on_many_real_signatures(crv: str, ec_keys) -> None:
    """Thousands of signatures: leading-zero R or S (about 1 in 128) turn up and convert right."""
    curve = CURVES[crv]
    size = WIDTH[crv]
    key = ec_keys[crv]
    pub = key.public_key()
    hash_alg = {"P-256": hashes.SHA256, "P-384": hashes.SHA384, "P-521": hashes.SHA512}[crv]()
    count = {"P-256": 5000, "P-384": 2000, "P-521": 1000}[crv]
    short = 0
    for i in range(count):
        data = i.to_bytes(4, "big")
        der = key.sign(data, ec.ECDSA(hash_alg))
        r, s = decode_dss_signature(der)
        raw = der_to_raw(der, curve)
        assert len(raw) == 2 * size
        assert raw == r.to_bytes(size, "big") + s.to_bytes(size, "big")
        short += raw[0] == 0 or raw[size] == 0
        back = der_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
        assert raw_to_der(raw, curve) == back
        pub.verify(back, data, ec.ECDSA(hash_alg))
    assert short > 0


# --------------------------------------------------------------------------- compact JWS in other libraries


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_compact_jws_verifies_in_jwcrypto_pyjwt_joserfc(alg: str, rsa_2048, ec_keys) -> None:
    key = _key_for(alg, rsa_2048, ec_keys)
    pub = key.public_key()
    claims = {"jti": b64url(os.urandom(24)), "htm": "POST", "htu": "https://helseid-sts.test.nhn.no/connect/token"}
    claims["iat"] = 1_700_000_000
    token = build_token(alg, key, claims)
    header_b64, payload_b64, sig_b64 = token.split(".")
    assert "=" not in token

    # jwcrypto, with the key taken from the proof's own jwk header (as a DPoP verifier does).
    header = json.loads(base64url_decode(header_b64))
    assert header["alg"] == alg and header["typ"] == "dpop+jwt"
    verifier = jwcrypto_jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jwcrypto_jwk.JWK(**header["jwk"]), alg=alg)
    assert json.loads(verifier.payload) == claims

    # PyJWT, with the header jwk and with the cryptography key.
    assert pyjwt.decode(token, pyjwt.PyJWK(header["jwk"], algorithm=alg), algorithms=[alg]) == claims
    assert pyjwt.decode(token, pub, algorithms=[alg]) == claims

    # joserfc (its default registry refuses headers over 512 bytes, which an RSA jwk header exceeds).
    joserfc_key = (ECKey if alg.startswith("ES") else RSAKey).import_key(header["jwk"])
    registry = JWSRegistry(algorithms=[alg])
    registry.max_header_length = 4096
    obj = joserfc_jws.deserialize_compact(token, joserfc_key, algorithms=[alg], registry=registry)
    assert json.loads(obj.payload) == claims

    if alg.startswith("ES"):
        assert len(base64url_decode(sig_b64)) == ALGORITHMS[alg].signature_size


@pytest.mark.parametrize("alg", ["PS256", "PS384", "PS512"])
def test_negative_control_pss_with_wrong_salt_is_refused(alg: str, rsa_2048) -> None:
    """The oracles do check the PSS salt length: a maximum-length salt does not pass."""
    hash_alg = HASHES[alg[2:]]()
    header = json_b64({"alg": alg, "typ": "dpop+jwt"})
    data = signing_input(header, json_b64({"jti": "x"}))
    wrong = rsa_2048.sign(data, padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=padding.PSS.MAX_LENGTH), hash_alg)
    token = compact(data, wrong)
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(token, rsa_2048.public_key(), algorithms=[alg])
    verifier = jwcrypto_jws.JWS()
    verifier.deserialize(token)
    with pytest.raises(jwcrypto_jws.InvalidJWSSignature):
        verifier.verify(jwcrypto_jwk.JWK.from_pyca(rsa_2048.public_key()), alg=alg)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_negative_control_der_ecdsa_signature_is_refused(alg: str, ec_keys) -> None:
    """A DER signature where JOSE wants R || S does not verify in the oracles."""
    key = _key_for(alg, None, ec_keys)
    hash_alg = HASHES[alg[2:]]()
    data = signing_input(json_b64({"alg": alg}), json_b64({"jti": "x"}))
    token = compact(data, key.sign(data, ec.ECDSA(hash_alg)))
    with pytest.raises((pyjwt.InvalidSignatureError, pyjwt.DecodeError)):
        pyjwt.decode(token, key.public_key(), algorithms=[alg])
    verifier = jwcrypto_jws.JWS()
    verifier.deserialize(token)
    with pytest.raises(jwcrypto_jws.InvalidJWSSignature):
        verifier.verify(jwcrypto_jwk.JWK.from_pyca(key.public_key()), alg=alg)
