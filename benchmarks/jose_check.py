"""Independent checks of the JWTs the benchmark receives: signature with ``cryptography``
(not with the service's code), header and claims against what was asked for."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC_CURVES = {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48), "P-521": (ec.SECP521R1, 66)}


class CheckFailed(AssertionError):
    """A JWT failed a check; the message says which."""


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_key(jwk: dict[str, str]) -> Any:
    """A ``cryptography`` public key from a public JWK (RSA or EC)."""
    if jwk["kty"] == "RSA":
        return rsa.RSAPublicNumbers(
            int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big")
        ).public_key()
    curve, _ = _EC_CURVES[jwk["crv"]]
    x, y = (int.from_bytes(b64d(jwk[c]), "big") for c in ("x", "y"))
    return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()


def verify_signature(key: Any, alg: str, signing_input: bytes, signature: bytes) -> None:
    """Raise CheckFailed unless ``signature`` is a valid JWS ``alg`` signature (PSS: salt = hash length)."""
    digest = _HASHES[alg[2:]]()
    try:
        if alg.startswith("RS"):
            key.verify(signature, signing_input, padding.PKCS1v15(), digest)
        elif alg.startswith("PS"):
            pss = padding.PSS(mgf=padding.MGF1(_HASHES[alg[2:]]()), salt_length=digest.digest_size)
            key.verify(signature, signing_input, pss, digest)
        else:
            size = (key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                raise CheckFailed(f"{alg} signature is {len(signature)} bytes, not {2 * size}")
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
            key.verify(der, signing_input, ec.ECDSA(digest))
    except InvalidSignature:
        raise CheckFailed(f"{alg} signature does not verify") from None


def decode_and_verify(jwt: str, key: Any, alg: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a compact JWS and return (header, claims)."""
    parts = jwt.split(".")
    if len(parts) != 3:
        raise CheckFailed("not a compact JWS")
    header = json.loads(b64d(parts[0]))
    if header.get("alg") != alg:
        raise CheckFailed(f"header alg {header.get('alg')!r} is not {alg}")
    verify_signature(key, alg, f"{parts[0]}.{parts[1]}".encode("ascii"), b64d(parts[2]))
    return header, json.loads(b64d(parts[1]))


def ath(access_token: str) -> str:
    return b64e(hashlib.sha256(access_token.encode("ascii")).digest())


def check_assertion(
    jwt: str, *, jwk: dict, alg: str, client_id: str, issuer: str, lifetime: int, jti: str, issued_at: int
) -> None:
    """A client assertion: signature, header exactly, iss/sub/aud/iat/nbf/exp/jti."""
    header, claims = decode_and_verify(jwt, public_key(jwk), alg)
    expected = {"alg": alg, "typ": "client-authentication+jwt", "kid": jwk["kid"]}
    if header != expected:
        raise CheckFailed(f"assertion header {header} is not {expected}")
    if not (claims.get("iss") == claims.get("sub") == client_id and claims.get("aud") == issuer):
        raise CheckFailed("assertion iss/sub/aud")
    if claims.get("jti") != jti or claims.get("iat") != issued_at or claims.get("nbf") != issued_at:
        raise CheckFailed("assertion jti/iat/nbf differ from the response")
    if claims.get("exp") != issued_at + lifetime:
        raise CheckFailed("assertion exp")


def check_proof(
    jwt: str, *, jwk: dict, alg: str, htm: str, htu: str, nonce: str | None, access_token: str | None, jti: str
) -> None:
    """A DPoP proof: signature by the key in its own header, typ, htm/htu/nonce/ath/jti."""
    public = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    header, claims = decode_and_verify(jwt, public_key(public), alg)
    if header != {"alg": alg, "typ": "dpop+jwt", "jwk": public}:
        raise CheckFailed(f"proof header {header}")
    if claims.get("htm") != htm or claims.get("htu") != htu or claims.get("jti") != jti:
        raise CheckFailed("proof htm/htu/jti")
    if claims.get("nonce") != nonce:
        raise CheckFailed("proof nonce")
    if claims.get("ath") != (ath(access_token) if access_token else None):
        raise CheckFailed("proof ath")
