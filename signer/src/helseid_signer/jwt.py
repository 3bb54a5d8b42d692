"""JOSE core: base64url, compact JWS assembly, public JWKs, RFC 7638 thumbprints,
and ECDSA signature encodings.

Sources: RFC 7515 (JWS compact serialisation, base64url without padding),
RFC 7517/7518 section 6 (JWK members), RFC 7638 (JWK thumbprint), RFC 7518
section 3.4 (ECDSA signature as fixed-width ``R || S``), RFC 9449 section 4.2 (``ath``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .algorithms import CURVES, Curve, PublicKey

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url`; raises ValueError on characters outside the alphabet."""
    # base64.urlsafe_b64decode silently drops characters outside the alphabet: check first.
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def json_b64(obj: dict[str, Any]) -> str:
    """Compact JSON (no whitespace, UTF-8) of ``obj``, base64url-encoded: one JWS segment."""
    return b64url(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def signing_input(header_b64: str, payload_b64: str) -> bytes:
    """The JWS signing input ``ASCII(header '.' payload)`` (RFC 7515 section 5.1)."""
    return f"{header_b64}.{payload_b64}".encode("ascii")


def compact(signing_input_bytes: bytes, signature: bytes) -> str:
    """Compact serialisation: ``header.payload.signature`` (RFC 7515 section 7.1)."""
    return f"{signing_input_bytes.decode('ascii')}.{b64url(signature)}"


def _uint_min(value: int) -> bytes:
    """Big-endian unsigned integer in the minimum number of octets (RFC 7518 section 6.3.1)."""
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def curve_of(public_key: ec.EllipticCurvePublicKey) -> Curve:
    """The JOSE curve of an EC key; ValueError for curves HelseID does not allow."""
    for curve in CURVES.values():
        if isinstance(public_key.curve, curve.crypto):
            return curve
    raise ValueError(f"curve {public_key.curve.name} is not P-256, P-384 or P-521")


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """The public JWK of a key, required members only, in RFC 7638 member order.

    RSA: ``e``, ``kty``, ``n`` with ``n``/``e`` in the minimum number of octets (a
    modulus handed over with a leading zero byte gives the same JWK). EC: ``crv``,
    ``kty``, ``x``, ``y`` with coordinates left-padded to the curve size (32/48/66
    bytes). Never contains private members.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        return {"e": b64url(_uint_min(nums.e)), "kty": "RSA", "n": b64url(_uint_min(nums.n))}
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = curve_of(public_key)
        nums = public_key.public_numbers()
        return {
            "crv": curve.name,
            "kty": "EC",
            "x": b64url(nums.x.to_bytes(curve.size, "big")),
            "y": b64url(nums.y.to_bytes(curve.size, "big")),
        }
    raise TypeError(f"unsupported public key type {type(public_key).__name__}")


_REQUIRED_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of a JWK, base64url without padding (43 characters).

    Hashes only the required members, in lexicographic order, without whitespace.
    Raises KeyError for an unknown ``kty`` or a missing member.
    """
    members = _REQUIRED_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(access_token: str) -> str:
    """The DPoP ``ath`` value: base64url(SHA-256(ASCII access token)) (RFC 9449 section 4.2)."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def der_to_raw(der: bytes, curve: Curve) -> bytes:
    """ECDSA DER ``SEQUENCE { r INTEGER, s INTEGER }`` -> fixed-width ``R || S``.

    Each integer is left-padded to the curve size (32/48/66 bytes), so the result is
    64/96/132 bytes. Raises ValueError for malformed DER or an integer wider than the curve.
    """
    r, s = decode_dss_signature(der)
    limit = 1 << (8 * curve.size)
    if not (0 < r < limit and 0 < s < limit):
        raise ValueError(f"ECDSA integer out of range for {curve.name}")
    return r.to_bytes(curve.size, "big") + s.to_bytes(curve.size, "big")


def raw_to_der(raw: bytes, curve: Curve) -> bytes:
    """Fixed-width ``R || S`` -> DER; ValueError if the length is not 2 x curve size."""
    if len(raw) != 2 * curve.size:
        raise ValueError(f"{curve.name} signature must be {2 * curve.size} bytes, got {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[: curve.size], "big"), int.from_bytes(raw[curve.size :], "big"))
