"""The tests' one independent JWS verifier: jwcrypto (not the product's own code) checks
the signature of a compact JWS and hands back its header and claims."""

from __future__ import annotations

import json
from typing import Any

from jwcrypto import jwk, jws


def _as_jwk(key: Any) -> jwk.JWK:
    """A jwcrypto JWK from a JWK, a JWK dict, or a ``cryptography`` key (public or private:
    only its public half is used)."""
    if isinstance(key, jwk.JWK):
        return key
    if isinstance(key, dict):
        return jwk.JWK(**key)
    public = key.public_key() if hasattr(key, "public_key") else key
    return jwk.JWK.from_pyca(public)


def verified(token: str, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JOSE header, claims) of ``token`` once its signature verified with ``key``; raises
    jwcrypto's InvalidJWSSignature (or InvalidJWSObject) otherwise."""
    obj = jws.JWS()
    obj.deserialize(token, key=_as_jwk(key))
    return obj.jose_header, json.loads(obj.payload)


def verified_header(token: str, key: Any) -> dict[str, Any]:
    """The JOSE header of ``token`` once verified with ``key`` (see :func:`verified`)."""
    return verified(token, key)[0]


def verified_claims(token: str, key: Any) -> dict[str, Any]:
    """The claims of ``token`` once verified with ``key`` (see :func:`verified`)."""
    return verified(token, key)[1]


def verifies(token: str, key: Any) -> bool:
    """True when ``token``'s signature verifies with ``key``, False when it does not."""
    try:
        verified(token, key)
    except jws.InvalidJWSSignature:
        return False
    return True
