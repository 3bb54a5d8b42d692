"""PKCS#11 backend against a real SoftHSM token.

Every check uses an oracle independent of the product: ``cryptography`` for signatures
(ECDSA through its own DER encoder, PSS with explicit parameters and a hand-written
EMSA-PSS decoder that recovers the salt length), jwcrypto and joserfc for compact JWS,
JWKs and RFC 7638 thumbprints, python-pkcs11 directly for object attributes. The
product's own verifier and JWK code are never the oracle.

Thread-safety runs in a child process (``tests/support/pkcs11_threads.py``) so that a
crash in the module fails a test instead of killing pytest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc.jwk import ECKey, RSAKey
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws
from pkcs11 import Attribute, KeyType, ObjectClass

from helseid_signer import cli
from helseid_signer import jwt as hjwt
from helseid_signer.algorithms import ALGORITHMS, AlgorithmError
from helseid_signer.backends.base import BackendConfigError, KeyNotFoundError, ResolvedKey
from helseid_signer.backends.pkcs11 import Pkcs11Backend, Pkcs11Uri, ec_point_from_attribute, module_lock
from helseid_signer.keys import make_signing_key
from tests.support.softhsm import SoftHsmToken, import_private_key

THREADS_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "pkcs11_threads.py"
SPECS = ("RSA-2048", "RSA-3072", "RSA-4096", "EC-P256", "EC-P384", "EC-P521")
PREFIX = "p11t-"  # labels of the objects this module puts into the shared session token

#: Which created key each alg signs with (every RSA size gets used).
ALG_SPEC = {
    "RS256": "RSA-2048",
    "RS384": "RSA-3072",
    "RS512": "RSA-4096",
    "PS256": "RSA-2048",
    "PS384": "RSA-3072",
    "PS512": "RSA-4096",
    "ES256": "EC-P256",
    "ES384": "EC-P384",
    "ES512": "EC-P521",
}
HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
CURVES = {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48), "P-521": (ec.SECP521R1, 66)}

#: Fixed private scalars whose public coordinate has leading zero bytes (x or y below
#: 2**(8*(size-1)); for P-521 below 2**512, i.e. two zero bytes of the 66). Found once by
#: scanning d = SHA-512("helseid-signer <curve> <coord> <i>") (doubled) mod (n-1) + 1.
EC_VECTORS = {
    ("P-256", "x"): 0xFF9E5559B755071C05CDA2B799311C8ECA35D2F233D4A43528B03B3F0F3B4D57,
    ("P-256", "y"): 0xADEC0AA1C0EFEC6ACDD198EABAC77428C813FB44A82A488E9A4CA35E8FFC2BA9,
    ("P-384", "x"): int(
        "f6ac341b7fe32749d3f7947594ffab2945573689878b8c2c3389572e4e9757e10dc975f3ba095fbaad6071ab0450839c", 16
    ),
    ("P-384", "y"): int(
        "56502c1f043017b773eb526d42a4465e082ca24f792c4aa842d0e25eacd1fe11f3c7bab8ed94e5a602a51160029fe894", 16
    ),
    ("P-521", "x"): int(
        "12e8326a0335e17200b67fafecfba1946d2f0ab8702224219ebd91b43ed80e1250abaa3f9677454d752f18bb8b1396e6"
        "7d03d0c5364a30ba1ec64d1ca937b12e86a",
        16,
    ),
    ("P-521", "y"): int(
        "1cddd9d47755cb63fc538080f2dbea91d73b5cf0d0d1de45b7fb7b142af800bd0f56a5bbb76c06badbc3f66ced0e0699"
        "ed4b19e4f63b51c9334ee2958d481ad106f",
        16,
    ),
}


# -- helpers --------------------------------------------------------------------------


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout/stderr captured; the root logger is restored after
    (``main`` reconfigures logging for the whole process)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    return rc, out.getvalue(), err.getvalue()


def create_args(token: SoftHsmToken, label: str, spec: str, *extra: str) -> list[str]:
    return [
        "keys",
        "create",
        "--uri",
        token.uri(label),
        "--spec",
        spec,
        "--module",
        token.module,
        "--pin-file",
        str(token.pin_file),
        *extra,
    ]


def oracle_jwk(public_key: Any) -> dict[str, str]:
    """Required JWK members per jwcrypto (the thumbprint input of RFC 7638)."""
    exported = jwcrypto_jwk.JWK.from_pyca(public_key).export_public(as_dict=True)
    members = ("crv", "kty", "x", "y") if exported["kty"] == "EC" else ("e", "kty", "n")
    return {m: exported[m] for m in members}


def oracle_thumbprints(public_key: Any) -> set[str]:
    """RFC 7638 thumbprints of ``public_key`` from jwcrypto and joserfc (one value if they agree)."""
    joserfc_key = (ECKey if isinstance(public_key, ec.EllipticCurvePublicKey) else RSAKey).import_key(public_key)
    return {jwcrypto_jwk.JWK.from_pyca(public_key).thumbprint(), joserfc_key.thumbprint()}


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def pss_salt_length(public_key: rsa.RSAPublicKey, signature: bytes, message: bytes, hash_name: str) -> int:
    """EMSA-PSS-VERIFY (RFC 8017 section 9.1.2) by hand, MGF1 with ``hash_name``; returns the
    salt length it recovers, AssertionError if the encoding is not valid PSS over ``message``."""
    nums = public_key.public_numbers()
    em_bits = nums.n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    h_len = hashlib.new(hash_name).digest_size
    em = pow(int.from_bytes(signature, "big"), nums.e, nums.n).to_bytes(em_len, "big")
    assert em[-1] == 0xBC, "trailer field is not 0xbc"
    masked_db, h = em[: em_len - h_len - 1], em[em_len - h_len - 1 : -1]
    db = bytearray(a ^ b for a, b in zip(masked_db, mgf1(h, len(masked_db), hash_name), strict=True))
    db[0] &= 0xFF >> (8 * em_len - em_bits)
    one = next(i for i, byte in enumerate(db) if byte)
    assert db[one] == 0x01, "PS || 0x01 separator missing"
    salt = bytes(db[one + 1 :])
    m_hash = hashlib.new(hash_name, message).digest()
    assert hashlib.new(hash_name, b"\0" * 8 + m_hash + salt).digest() == h, "PSS hash H does not match"
    return len(salt)


def verify_with_cryptography(alg_name: str, public_key: Any, signature: bytes, message: bytes) -> None:
    """Verify a JOSE signature with ``cryptography`` and parameters spelled out here."""
    alg = ALGORITHMS[alg_name]
    digest = HASHES[alg.hash_name]()
    if alg_name.startswith("RS"):
        public_key.verify(signature, message, padding.PKCS1v15(), digest)
    elif alg_name.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(HASHES[alg.hash_name]()), salt_length=digest.digest_size)
        public_key.verify(signature, message, pss, digest)
    else:
        size = CURVES[alg.curve.name][1]
        assert len(signature) == 2 * size
        der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
        public_key.verify(der, message, ec.ECDSA(digest))


def verify_with_jwcrypto(token: str, public_key: Any, alg_name: str) -> bytes:
    obj = jwcrypto_jws.JWS()
    obj.deserialize(token)
    obj.verify(jwcrypto_jwk.JWK.from_pyca(public_key), alg=alg_name)
    return obj.payload


@contextlib.contextmanager
def raw_session(token: SoftHsmToken):
    """A python-pkcs11 session of the token, logged in, under the module lock. Never
    closed: closing would log every session of the token out."""
    with module_lock(token.module):
        tok = pkcs11.lib(token.module).get_token(token_label=token.label)
        try:
            session = tok.open(user_pin=token.pin)
        except pkcs11.UserAlreadyLoggedIn:
            session = tok.open()
        yield session


class SpyBackend:
    """Records any use; stands in for the backend where none may be called."""

    scheme = "spy"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"backend.{name} used")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def created_keys(softhsm_token: SoftHsmToken) -> dict[str, dict[str, Any]]:
    """One key per spec made by ``helseid-signer keys create`` (the CLI's printed JSON)."""
    made = {}
    for spec in SPECS:
        rc, out, err = run_cli(create_args(softhsm_token, f"{PREFIX}{spec}", spec))
        assert rc == 0, err
        made[spec] = json.loads(out)
    return made


@pytest.fixture(scope="module")
def resolved(pkcs11_backend: Pkcs11Backend, created_keys: dict[str, dict[str, Any]]) -> dict[str, ResolvedKey]:
    return {spec: pkcs11_backend.resolve(out["uri"]) for spec, out in created_keys.items()}


@pytest.fixture(scope="module")
def imported_ec(softhsm_token: SoftHsmToken, pkcs11_backend: Pkcs11Backend):
    """The fixed leading-zero EC vectors, imported; (curve, coord) -> (private key, resolved)."""
    out = {}
    for n, ((curve, coord), scalar) in enumerate(EC_VECTORS.items()):
        private = ec.derive_private_key(scalar, CURVES[curve][0]())
        uri = import_private_key(softhsm_token, private, f"{PREFIX}vec-{curve}-{coord}", bytes([0xEC, n]))
        out[(curve, coord)] = (private, pkcs11_backend.resolve(uri))
    return out


# -- keys create through the CLI -------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_keys_create_makes_a_non_extractable_key_of_the_spec(
    spec: str, softhsm_token: SoftHsmToken, created_keys: dict[str, dict[str, Any]], resolved: dict[str, ResolvedKey]
) -> None:
    out = created_keys[spec]
    object_id = Pkcs11Uri.parse(out["uri"]).object_id
    assert object_id is not None and len(object_id) == 16
    assert out["version"] == f"serial={softhsm_token.serial};id={object_id.hex()}"

    with raw_session(softhsm_token) as session:
        (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: object_id})
        (public,) = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: object_id})
        attrs = {a: private[a] for a in (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                                         Attribute.NEVER_EXTRACTABLE, Attribute.SIGN, Attribute.DECRYPT,
                                         Attribute.PRIVATE, Attribute.TOKEN, Attribute.LOCAL)}  # fmt: skip
        key_type = private[Attribute.KEY_TYPE]
        label = private[Attribute.LABEL]
        if spec.startswith("RSA"):
            modulus_bits = public[Attribute.MODULUS_BITS]
            exponent = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
        else:
            ec_params = bytes(public[Attribute.EC_PARAMS])
    assert attrs == {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.PRIVATE: True,
        Attribute.TOKEN: True,
        Attribute.LOCAL: True,
    }
    assert label == f"{PREFIX}{spec}"
    public_key = resolved[spec].public_key
    if spec.startswith("RSA"):
        assert key_type == KeyType.RSA
        assert modulus_bits == int(spec[4:]) == public_key.key_size
        assert exponent == 65537
    else:
        assert key_type == KeyType.EC
        curve_cls = CURVES["P-" + spec[4:]][0]
        expected_params = {"EC-P256": "06082a8648ce3d030107", "EC-P384": "06052b81040022", "EC-P521": "06052b81040023"}
        assert ec_params.hex() == expected_params[spec]
        assert isinstance(public_key.curve, curve_cls)

    # The printed JWK describes the key in the token, and its kid is the RFC 7638 thumbprint.
    printed = out["jwk"]
    assert {k: v for k, v in printed.items() if k != "kid"} == oracle_jwk(public_key)
    assert oracle_thumbprints(public_key) == {printed["kid"]}


def test_keys_create_prints_alg_and_refuses_alg_that_does_not_fit_spec_before_creating(
    softhsm_token: SoftHsmToken,
) -> None:
    rc, out, err = run_cli(create_args(softhsm_token, f"{PREFIX}with-alg", "EC-P256", "--alg", "ES256"))
    assert rc == 0, err
    assert json.loads(out)["jwk"]["alg"] == "ES256"

    for n, (spec, alg) in enumerate([("EC-P256", "ES384"), ("EC-P384", "ES256"), ("EC-P256", "PS256"),
                                     ("RSA-2048", "ES256"), ("EC-P256", "ES512"), ("RSA-2048", "HS256")]):  # fmt: skip
        label = f"{PREFIX}refused-{n}"
        rc, out, err = run_cli(create_args(softhsm_token, label, spec, "--alg", alg))
        assert rc == 2 and out == ""
        assert alg in err, err
        with raw_session(softhsm_token) as session:
            assert list(session.get_objects({Attribute.LABEL: label})) == [], f"{spec}/{alg}: key was created"


def test_keys_create_usage_errors_exit_2_with_a_message(softhsm_token: SoftHsmToken) -> None:
    rc, _, err = run_cli(["keys", "create", "--uri", softhsm_token.uri("x"), "--spec", "EC-P256"])
    assert rc == 2 and "--module" in err
    rc, _, err = run_cli(create_args(softhsm_token, f"{PREFIX}RSA-2048", "RSA-2048"))
    assert rc == 2 and "already exists" in err
    rc, _, err = run_cli(
        ["keys", "create", "--uri", "pkcs11:token=no-such-token;object=x", "--spec", "EC-P256",
         "--module", softhsm_token.module, "--pin-file", str(softhsm_token.pin_file)]
    )  # fmt: skip
    assert rc == 2 and "no-such-token" in err


# -- signing: all nine algorithms ----------------------------------------------------------


@pytest.mark.parametrize("payload_size", [40, 100_000], ids=["small", "100kB"])
@pytest.mark.parametrize("alg_name", list(ALGORITHMS))
def test_sign_every_alg_verifies_with_independent_libraries(
    alg_name: str, payload_size: int, pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    key = resolved[ALG_SPEC[alg_name]]
    alg = ALGORITHMS[alg_name]
    payload = {"sub": "helseid-signer-test", "pad": "x" * payload_size}
    signing_input = hjwt.signing_input(hjwt.json_b64({"alg": alg_name, "typ": "JWT"}), hjwt.json_b64(payload))
    assert payload_size < 4096 or len(signing_input) > 4096 * 20

    signature = pkcs11_backend.sign(key, alg, signing_input)
    token = hjwt.compact(signing_input, signature)

    assert json.loads(verify_with_jwcrypto(token, key.public_key, alg_name)) == payload
    verify_with_cryptography(alg_name, key.public_key, signature, signing_input)
    if alg_name.startswith("ES"):
        assert len(signature) == 2 * CURVES[alg.curve.name][1]
    else:
        assert len(signature) == key.public_key.key_size // 8
    if alg_name.startswith("PS"):
        digest = HASHES[alg.hash_name]()
        assert pss_salt_length(key.public_key, signature, signing_input, alg.hash_name) == digest.digest_size
        # The salt length really is checked: the same signature fails with other lengths.
        for wrong in (0, 20, digest.digest_size + 1):
            with pytest.raises(InvalidSignature):
                key.public_key.verify(
                    signature, signing_input, padding.PSS(mgf=padding.MGF1(HASHES[alg.hash_name]()), salt_length=wrong),
                    digest,
                )  # fmt: skip


@pytest.mark.parametrize("alg_name", ["RS256", "PS256", "ES256", "ES512"])
def test_sign_now_gives_the_same_kind_of_signature_as_sign(
    alg_name: str, pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    """``sign_now`` (the opt-in sign_on_event_loop path) uses the same mechanism table:
    its signatures verify with jwcrypto and cryptography and have the JWS size."""
    key, alg = resolved[ALG_SPEC[alg_name]], ALGORITHMS[alg_name]
    signing_input = hjwt.signing_input(hjwt.json_b64({"alg": alg_name}), hjwt.json_b64({"jti": alg_name}))
    signature = pkcs11_backend.sign_now(key, alg, signing_input)
    assert signature is not None
    assert json.loads(verify_with_jwcrypto(hjwt.compact(signing_input, signature), key.public_key, alg_name)) == {
        "jti": alg_name
    }
    verify_with_cryptography(alg_name, key.public_key, signature, signing_input)
    expected = 2 * CURVES[alg.curve.name][1] if alg_name.startswith("ES") else key.public_key.key_size // 8
    assert len(signature) == expected


def test_sign_now_never_waits_for_the_module_lock(
    pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    """While another thread holds the module lock (a signature, the health probe, a
    recovery), ``sign_now`` answers None at once - the event loop is never blocked - and
    signs again once the lock is free."""
    key, alg = resolved["EC-P256"], ALGORITHMS["ES256"]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with module_lock(pkcs11_backend.module_path):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert pkcs11_backend.sign_now(key, alg, b"a.b") is None
        assert time.monotonic() - started < 0.05
    finally:
        release.set()
        holder.join(10)
    signature = pkcs11_backend.sign_now(key, alg, b"a.b")
    assert signature is not None
    verify_with_cryptography("ES256", key.public_key, signature, b"a.b")


def test_pss_signatures_are_randomised(pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]) -> None:
    key = resolved["RSA-2048"]
    sigs = {pkcs11_backend.sign(key, ALGORITHMS["PS256"], b"same.input") for _ in range(3)}
    assert len(sigs) == 3  # a fresh 32-byte salt each time


def test_es512_many_signatures_are_132_bytes_and_valid(
    pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    key = resolved["EC-P521"]
    alg = ALGORITHMS["ES512"]
    public = key.public_key
    first_bytes = set()
    for i in range(2000):
        data = f"eyJhbGciOiJFUzUxMiJ9.{i}".encode()
        sig = pkcs11_backend.sign(key, alg, data)
        assert len(sig) == 132, (i, len(sig))
        first_bytes.add(sig[0])
        der = encode_dss_signature(int.from_bytes(sig[:66], "big"), int.from_bytes(sig[66:], "big"))
        public.verify(der, data, ec.ECDSA(hashes.SHA512()))
    # R < 2**521: its first byte is 0x00 or 0x01, both occur in 2000 signatures (p(miss) = 2**-1999)
    assert first_bytes == {0, 1}


def test_es256_many_signatures_are_64_bytes_and_valid(
    pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    key = resolved["EC-P256"]
    for i in range(1000):
        data = f"eyJhbGciOiJFUzI1NiJ9.{i}".encode()
        sig = pkcs11_backend.sign(key, ALGORITHMS["ES256"], data)
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        key.public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))


# -- JWKs and thumbprints of rare key shapes ----------------------------------------------------


@pytest.mark.parametrize("vector", list(EC_VECTORS), ids=lambda v: f"{v[0]}-{v[1]}")
def test_ec_coordinate_with_leading_zero_gives_the_oracle_jwk_and_thumbprint(
    vector: tuple[str, str], imported_ec: dict, pkcs11_backend: Pkcs11Backend
) -> None:
    curve, coord = vector
    private, key = imported_ec[vector]
    size = CURVES[curve][1]
    alg_name = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[curve]
    signing_key = make_signing_key("vec", alg_name, pkcs11_backend, key)

    expected = oracle_jwk(private.public_key())
    raw = b64d(expected[coord])
    assert len(raw) == size and raw[0] == 0, "the test vector lost its leading zero"
    assert signing_key.jwk == expected
    assert oracle_thumbprints(private.public_key()) == {signing_key.kid}
    assert len(signing_key.kid) == 43
    header = json.loads(b64d(signing_key.dpop_header))
    assert header == {"alg": alg_name, "typ": "dpop+jwt", "jwk": expected}

    # A DPoP-style proof signed in the token verifies against the JWK in its own header.
    signing_input = hjwt.signing_input(signing_key.dpop_header, hjwt.json_b64({"htm": "POST"}))
    token = hjwt.compact(signing_input, signing_key.sign(signing_input))
    obj = jwcrypto_jws.JWS()
    obj.deserialize(token)
    obj.verify(jwcrypto_jwk.JWK(**header["jwk"]), alg=alg_name)


def test_rsa_jwk_is_minimal_and_matches_the_oracles(softhsm_token: SoftHsmToken, pkcs11_backend: Pkcs11Backend) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    uri = import_private_key(softhsm_token, private, f"{PREFIX}rsa-imported", "a1b2")
    key = pkcs11_backend.resolve(uri)
    assert key.public_key.public_numbers() == private.public_key().public_numbers()
    signing_key = make_signing_key("rsa", "PS256", pkcs11_backend, key)
    assert signing_key.jwk == oracle_jwk(private.public_key())
    assert signing_key.jwk["e"] == "AQAB"
    n = b64d(signing_key.jwk["n"])
    assert len(n) == 256 and n[0] != 0
    assert oracle_thumbprints(private.public_key()) == {signing_key.kid}
    assert key.version.endswith(";id=a1b2")


class _Attrs(dict):
    """A python-pkcs11 object stand-in: ``obj[Attribute.X]``."""


def test_public_key_from_attributes_strips_a_leading_zero_modulus_and_accepts_bare_points() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = private.public_key().public_numbers()
    padded = _Attrs({
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: b"\x00" + nums.n.to_bytes(256, "big"),
        Attribute.PUBLIC_EXPONENT: b"\x00\x01\x00\x01",
    })  # fmt: skip
    public = Pkcs11Backend._public_key(padded)
    assert hjwt.public_jwk(public) == oracle_jwk(private.public_key())

    ec_private = ec.derive_private_key(EC_VECTORS[("P-256", "x")], ec.SECP256R1())
    point = ec_private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    for encoded in (point, b"\x04\x41" + point):
        attrs = _Attrs({
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"),
            Attribute.EC_POINT: encoded,
        })  # fmt: skip
        assert hjwt.public_jwk(Pkcs11Backend._public_key(attrs)) == oracle_jwk(ec_private.public_key())


# -- CKA_EC_POINT -------------------------------------------------------------------------------


def _point(curve: str) -> bytes:
    key = ec.derive_private_key(EC_VECTORS[(curve, "x")], CURVES[curve][0]())
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def test_ec_point_from_attribute_bare_and_der_wrapped() -> None:
    p256, p384, p521 = _point("P-256"), _point("P-384"), _point("P-521")
    assert (len(p256), len(p384), len(p521)) == (65, 97, 133)
    assert ec_point_from_attribute(p256, 32) == p256
    assert ec_point_from_attribute(p521, 66) == p521
    assert ec_point_from_attribute(b"\x04\x41" + p256, 32) == p256
    assert ec_point_from_attribute(b"\x04\x61" + p384, 48) == p384
    assert ec_point_from_attribute(b"\x04\x81\x85" + p521, 66) == p521  # long-form length


@pytest.mark.parametrize(
    "value, size",
    [
        (b"", 32),
        (b"\x02" + b"\x11" * 32, 32),  # compressed point, bare
        (b"\x04\x21\x02" + b"\x11" * 32, 32),  # compressed point, wrapped
        (b"\x04\x81\x85" + b"\x04" + b"\x22" * 100, 66),  # truncated DER
        (b"\x04\x41\x04" + b"\x11" * 64 + b"\x00", 32),  # trailing byte after the DER
        (b"\x04\x41\x04" + b"\x11" * 64, 48),  # a P-256 point where P-384 is expected
        (b"\x30\x00", 32),
    ],
    ids=["empty", "compressed", "wrapped-compressed", "truncated", "trailing", "wrong-curve", "sequence"],
)
def test_ec_point_from_attribute_refuses_malformed(value: bytes, size: int) -> None:
    with pytest.raises(ValueError):
        ec_point_from_attribute(value, size)


# -- PKCS#11 URIs -----------------------------------------------------------------------------


def test_uri_parse_decodes_labels_and_ids() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=helseid%20dev;object=my%2Dkey;id=%01%02%A2%ff;type=private")
    assert (uri.token, uri.object_label, uri.object_id) == ("helseid dev", "my-key", b"\x01\x02\xa2\xff")
    uri = Pkcs11Uri.parse("pkcs11:serial=474bbe005675a097;id=%00?pin-source=file:/run/pin&module-path=/m.so")
    assert (uri.token, uri.serial, uri.object_label, uri.object_id) == (None, "474bbe005675a097", None, b"\x00")
    assert (uri.pin_source, uri.module_path) == ("/run/pin", "/m.so")


@pytest.mark.parametrize(
    "uri, words",
    [
        ("pkcs11:token=t;object=k?pin-value=1234", "pin-value"),
        ("pkcs11:token=t;object=k;slot-id=0", "slot-id"),
        ("pkcs11:object=k", "no token"),
        ("pkcs11:token=t", "no key"),
        ("pkcs11:token=t;object=k;type=public", "type"),
        ("pkcs11:token=t;object=k;library-version=1", "unsupported"),
        ("pkcs11:token=t;object", "no value"),
        ("pkcs11:token=t;object=k?pin-source=/etc/pin", "file:"),
        ("awskms:alias/x", "not a PKCS#11 URI"),
    ],
)
def test_uri_parse_refuses(uri: str, words: str) -> None:
    with pytest.raises(BackendConfigError, match=words):
        Pkcs11Uri.parse(uri)


def test_resolve_by_id_only_and_module_path(
    softhsm_token: SoftHsmToken, pkcs11_backend: Pkcs11Backend, created_keys: dict[str, dict[str, Any]]
) -> None:
    object_id = Pkcs11Uri.parse(created_keys["EC-P256"]["uri"]).object_id
    by_id = f"pkcs11:token={softhsm_token.label};id={''.join(f'%{b:02X}' for b in object_id)}"
    key = pkcs11_backend.resolve(by_id)
    assert oracle_jwk(key.public_key) == {k: v for k, v in created_keys["EC-P256"]["jwk"].items() if k != "kid"}
    assert pkcs11_backend.resolve(f"{by_id}?module-path={softhsm_token.module}").version == key.version
    by_serial = f"pkcs11:serial={softhsm_token.serial};id={''.join(f'%{b:02x}' for b in object_id)}"
    assert pkcs11_backend.resolve(by_serial).version == key.version

    with pytest.raises(BackendConfigError, match="module"):
        pkcs11_backend.resolve(f"{by_id}?module-path=/usr/lib/other-pkcs11.so")
    with pytest.raises(KeyNotFoundError):
        pkcs11_backend.resolve(softhsm_token.uri(f"{PREFIX}no-such-key"))
    with pytest.raises(KeyNotFoundError):
        pkcs11_backend.resolve("pkcs11:token=no-such-token;object=x")


# -- alg must fit the key, checked before any backend call ----------------------------------------


def test_alg_that_does_not_fit_the_key_is_refused_before_any_backend_call(
    softhsm_token: SoftHsmToken, pkcs11_backend: Pkcs11Backend, resolved: dict[str, ResolvedKey]
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_key = pkcs11_backend.resolve(import_private_key(softhsm_token, weak, f"{PREFIX}rsa-1024", "1024"))
    assert weak_key.public_key.key_size == 1024
    cases = [
        ("ES256", resolved["EC-P384"], "P-256"),
        ("ES384", resolved["EC-P256"], "P-384"),
        ("ES512", resolved["EC-P256"], "P-521"),
        ("PS256", resolved["EC-P256"], "RSA"),
        ("RS256", resolved["EC-P521"], "RSA"),
        ("ES256", resolved["RSA-2048"], "EC"),
        ("RS256", weak_key, "1024"),
        ("PS512", weak_key, "1024"),
        ("HS256", resolved["RSA-2048"], "HS256"),
        ("none", resolved["EC-P256"], "none"),
    ]
    for alg_name, key, words in cases:
        spy = SpyBackend()
        with pytest.raises(AlgorithmError, match=words):
            make_signing_key("k", alg_name, spy, key)  # type: ignore[arg-type]
        assert spy.calls == [], alg_name


# -- threads ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thread_keys(softhsm_token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """RSA-2048 and P-256 keys imported from ``cryptography`` (so the public keys are
    known without the token), and the script's common arguments."""
    folder = tmp_path_factory.mktemp("threads")
    args = ["--module", softhsm_token.module, "--token", softhsm_token.label, "--pin-file", str(softhsm_token.pin_file)]
    for kind, private in (
        ("rsa", rsa.generate_private_key(65537, 2048)),
        ("ec", ec.generate_private_key(ec.SECP256R1())),
    ):
        label = f"{PREFIX}threads-{kind}"
        import_private_key(softhsm_token, private, label, f"7e{len(kind):02x}")
        pem = folder / f"{kind}.pem"
        pem.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        args += [f"--{kind}-label", label, f"--{kind}-pem", str(pem)]
    return args


def _run_threads(mode: str, args: list[str], token: SoftHsmToken) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run(
        [sys.executable, str(THREADS_SCRIPT), mode, *args, "--threads", "32", "--per-thread", "200"],
        env={**os.environ, "SOFTHSM2_CONF": str(token.conf)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = None
    return proc.returncode, result, proc.stderr[-2000:]


def test_backend_lock_makes_32_threads_safe(thread_keys: list[str], softhsm_token: SoftHsmToken) -> None:
    rc, result, stderr = _run_threads("backend", thread_keys, softhsm_token)
    assert rc == 0, f"child died (exit {rc}): {stderr}"
    assert result is not None, stderr
    assert result["errors"] == 0, result["error_samples"]
    assert result["signatures"] == result["valid"] == 32 * 200
    print(f"backend, 32 threads x 200 mixed RS256/ES256: {result['per_second']} signatures/s")


def test_negative_control_without_the_lock_python_pkcs11_is_unsafe(
    thread_keys: list[str], softhsm_token: SoftHsmToken
) -> None:
    """The same load straight into python-pkcs11 crashes the process or fails calls, even
    with one session per thread opened beforehand (only C_SignInit/C_Sign run concurrently):
    evidence that the backend's lock is what makes it safe. Measured: 20 of 20 runs failed
    (17 SIGSEGV/SIGABRT, 3 with Cryptoki errors). Up to five attempts; passes at the first
    that shows the failure."""
    outcomes = []
    for _ in range(5):
        rc, result, stderr = _run_threads("raw", thread_keys, softhsm_token)
        outcomes.append((rc, result and {k: result[k] for k in ("signatures", "valid", "invalid", "errors")}))
        if rc != 0 or result is None or result["errors"] or result["invalid"]:
            print(f"unlocked python-pkcs11 failed as expected: {outcomes}")
            return
    pytest.fail(f"5 unlocked runs all succeeded; the negative control did not reproduce: {outcomes}")
