"""The nine JWS algorithms HelseID accepts, in one table every module reads.

Sources: RFC 7518 section 3 (JWS algorithms), HelseID's security profile
(RS/PS/ES 256/384/512 only; never ``none``, never HS*), RFC 8017 (RSASSA-PKCS1-v1_5
and RSASSA-PSS), RFC 7518 section 3.5 (PSS salt length = hash length, MGF1 with the
same hash) and section 3.4 (ECDSA signatures are fixed-width ``R || S``).

An ``alg`` is always taken from a key's configuration, never inferred from the key's
size; :func:`check_key_fits` refuses a key that does not fit its configured ``alg``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa


class KeyType(enum.Enum):
    """JWK ``kty`` values this product handles (RFC 7518 section 6.1)."""

    RSA = "RSA"
    EC = "EC"


class Padding(enum.Enum):
    """How an RSA signature is padded; ``NONE`` for ECDSA."""

    PKCS1V15 = "RSASSA-PKCS1-v1_5"
    PSS = "RSASSA-PSS"
    NONE = "none"


@dataclass(frozen=True)
class Curve:
    """A NIST curve as JOSE names it (RFC 7518 section 6.2.1.1).

    ``size`` is the byte width of one coordinate and of one of R and S in a JWS
    signature: 32 (P-256), 48 (P-384), 66 (P-521).
    """

    name: str
    size: int
    oid: str
    crypto: type[ec.EllipticCurve]


P256 = Curve("P-256", 32, "1.2.840.10045.3.1.7", ec.SECP256R1)
P384 = Curve("P-384", 48, "1.3.132.0.34", ec.SECP384R1)
P521 = Curve("P-521", 66, "1.3.132.0.35", ec.SECP521R1)
CURVES: dict[str, Curve] = {c.name: c for c in (P256, P384, P521)}
CURVES_BY_OID: dict[str, Curve] = {c.oid: c for c in (P256, P384, P521)}


@dataclass(frozen=True)
class Algorithm:
    """One JWS algorithm.

    Attributes:
        name: the JWS ``alg`` value, e.g. ``"PS256"``.
        kty: the key type it needs.
        hash_name: ``"sha256"``, ``"sha384"`` or ``"sha512"`` (hashlib names).
        hash_size: digest length in bytes (32, 48, 64); also the PSS salt length.
        padding: PKCS#1 v1.5, PSS, or NONE for ECDSA.
        curve: for ES*, the only curve it may be used with (RFC 7518 section 3.4).
    """

    name: str
    kty: KeyType
    hash_name: str
    hash_size: int
    padding: Padding
    curve: Curve | None = None

    @property
    def signature_size(self) -> int | None:
        """Bytes of an ES* signature (2 x coordinate size); None for RSA (= modulus size)."""
        return 2 * self.curve.size if self.curve else None

    def crypto_hash(self) -> hashes.HashAlgorithm:
        """The ``cryptography`` hash object for this algorithm."""
        return {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[self.hash_name]()


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("RS256", KeyType.RSA, "sha256", 32, Padding.PKCS1V15),
        Algorithm("RS384", KeyType.RSA, "sha384", 48, Padding.PKCS1V15),
        Algorithm("RS512", KeyType.RSA, "sha512", 64, Padding.PKCS1V15),
        Algorithm("PS256", KeyType.RSA, "sha256", 32, Padding.PSS),
        Algorithm("PS384", KeyType.RSA, "sha384", 48, Padding.PSS),
        Algorithm("PS512", KeyType.RSA, "sha512", 64, Padding.PSS),
        Algorithm("ES256", KeyType.EC, "sha256", 32, Padding.NONE, P256),
        Algorithm("ES384", KeyType.EC, "sha384", 48, Padding.NONE, P384),
        Algorithm("ES512", KeyType.EC, "sha512", 64, Padding.NONE, P521),
    )
}

#: RSA keys shorter than this are refused (HelseID's minimum; NHN's tools default to 4096).
MIN_RSA_BITS = 2048


class AlgorithmError(ValueError):
    """An ``alg`` is unknown, or does not fit the key it is configured for."""


def get_algorithm(name: str) -> Algorithm:
    """Return the table entry for ``name``; raise :class:`AlgorithmError` if HelseID does not allow it."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise AlgorithmError(
            f"alg {name!r} is not one of {', '.join(ALGORITHMS)} (HelseID allows only these)"
        ) from None


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def check_key_fits(alg: Algorithm, public_key: PublicKey) -> None:
    """Refuse a key that does not fit ``alg``, before any backend call.

    RS*/PS* need an RSA key of at least 2048 bits; ES256/ES384/ES512 need exactly
    P-256/P-384/P-521 (RFC 7518 section 3.4). Raises :class:`AlgorithmError` naming both.
    """
    if alg.kty is KeyType.RSA:
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise AlgorithmError(f"alg {alg.name} needs an RSA key, the key is {_describe(public_key)}")
        if public_key.key_size < MIN_RSA_BITS:
            raise AlgorithmError(
                f"alg {alg.name}: RSA key of {public_key.key_size} bits is below the minimum {MIN_RSA_BITS}"
            )
        return
    assert alg.curve is not None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise AlgorithmError(f"alg {alg.name} needs an EC {alg.curve.name} key, the key is {_describe(public_key)}")
    if not isinstance(public_key.curve, alg.curve.crypto):
        raise AlgorithmError(f"alg {alg.name} needs curve {alg.curve.name}, the key is {_describe(public_key)}")


def _describe(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size} bits"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = next((c.name for c in CURVES.values() if isinstance(public_key.curve, c.crypto)), public_key.curve.name)
        return f"EC {curve}"
    return type(public_key).__name__
