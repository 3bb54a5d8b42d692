"""Request checks and claim building for client assertions and DPoP proofs.

The service, not the caller, decides every header and claim it can know. Sources:
RFC 7523 section 3 and HelseID's client-assertion profile (``iss``/``sub``/``aud``/
``exp``/``jti``, ``typ: client-authentication+jwt``, ``assertion_details``), RFC 9449
section 4.2 (DPoP proof: ``typ: dpop+jwt``, ``jwk``, ``jti``, ``htm``, ``htu``, ``iat``,
``nonce``, ``ath``), RFC 9110 section 9.1 (methods are case-sensitive). ``htu`` has a
module of its own (:mod:`.htu`). The order in which these checks run for a request is
fixed once, in :mod:`.signing`.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Protocol

from .errors import RequestError
from .jwt import b64url


class AssertionSettings(Protocol):
    """What a client assertion's claims take from a profile (``config.ProfileSettings``)."""

    client_id: str
    issuer: str
    assertion_lifetime: int


#: HTTP methods a DPoP ``htm`` may name, exactly as written (RFC 9110 section 9 + PATCH).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
MAX_NONCE_LENGTH = 512
_PROFILE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NONCE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # NQCHAR, RFC 9449 section 8.1
_ORGNR_RE = re.compile(r"[0-9]{9}")
HELSEID_ORGNR_SYSTEM = "urn:oid:2.16.578.1.12.4.1.4.101"
MULTI_TENANT_SYSTEM = "urn:oid:1.0.6523"


def new_jti() -> str:
    """A fresh ``jti``: 24 random bytes (192 bits) as 32 base64url characters."""
    return b64url(secrets.token_bytes(24))


def check_profile_name(profile: str) -> str:
    """1..64 characters of ``[A-Za-z0-9._-]``; RequestError naming ``profile`` otherwise."""
    if not _PROFILE_RE.fullmatch(profile):
        raise RequestError("profile", "must be 1..64 characters of A-Z a-z 0-9 . _ -")
    return profile


def check_htm(htm: str) -> str:
    """``htm`` must be a standard method in upper case, exactly (RFC 9110 section 9.1)."""
    if htm not in HTTP_METHODS:
        if htm.upper() in HTTP_METHODS:
            raise RequestError("htm", f"methods are case-sensitive: send {htm.upper()!r}, not {htm[:16]!r}")
        raise RequestError("htm", f"must be one of {', '.join(sorted(HTTP_METHODS))}")
    return htm


def check_nonce(nonce: str) -> str | None:
    """Empty -> None; else 1..512 NQCHAR characters (RFC 9449 section 8.1)."""
    if not nonce:
        return None
    if len(nonce) > MAX_NONCE_LENGTH:
        raise RequestError("nonce", f"is longer than {MAX_NONCE_LENGTH} characters")
    if not _NONCE_RE.fullmatch(nonce):
        raise RequestError("nonce", "must contain only NQCHAR characters (RFC 9449 section 8.1)")
    return nonce


def check_access_token_sha256(digest: bytes) -> str | None:
    """Empty -> None (token-endpoint proof); exactly 32 bytes -> the ``ath`` value."""
    if not digest:
        return None
    if len(digest) != 32:
        raise RequestError("access_token_sha256", f"must be exactly 32 bytes (SHA-256), got {len(digest)}")
    return b64url(digest)


_KID = re.compile(r"^[A-Za-z0-9_-]{43}$")


def check_avoid_kid(kid: str) -> str | None:
    """``avoid_kid``: "" (None), or an RFC 7638 SHA-256 thumbprint - exactly 43 base64url
    characters (RFC 4648 section 5, no padding). RequestError otherwise."""
    if not kid:
        return None
    if not _KID.match(kid):
        raise RequestError("avoid_kid", "must be a kid: 43 base64url characters (RFC 7638 SHA-256 thumbprint)")
    return kid


def assertion_details(
    tenancy: str,
    allowed: tuple[str, ...],
    parent: str,
    child: str,
) -> dict[str, Any] | None:
    """The HelseID ``assertion_details`` claim for the requested organisation numbers.

    Single-tenant: only ``child`` may be given; the identifier is
    ``{system: urn:oid:2.16.578.1.12.4.1.4.101, type: ENH, value: <child>}``.
    Multi-tenant: ``parent`` (and optionally ``child``); the identifier is
    ``{system: urn:oid:1.0.6523, type: ENH, value: NO:ORGNR:<parent>[:<child>]}``.
    Each number must be 9 digits (INVALID_ARGUMENT) and on ``allowed``
    (PERMISSION_DENIED). Returns None when no number is given.
    """
    for field, value in (("parent_organization_number", parent), ("child_organization_number", child)):
        if value and not _ORGNR_RE.fullmatch(value):
            raise RequestError(field, "must be exactly 9 digits")
    if tenancy == "single":
        if parent:
            raise RequestError("parent_organization_number", "is only for multi-tenant profiles")
        if not child:
            return None
        system, value = HELSEID_ORGNR_SYSTEM, child
    else:
        if child and not parent:
            raise RequestError("parent_organization_number", "is required with a child organisation number")
        if not parent:
            return None
        system = MULTI_TENANT_SYSTEM
        value = f"NO:ORGNR:{parent}:{child}" if child else f"NO:ORGNR:{parent}"
    for field, number in (("parent_organization_number", parent), ("child_organization_number", child)):
        if number and number not in allowed:
            raise RequestError(field, "is not allowed for this profile", code="PERMISSION_DENIED")
    return {
        "type": "helseid_authorization",
        "practitioner_role": {"organization": {"identifier": {"system": system, "type": "ENH", "value": value}}},
    }


def build_assertion_claims(
    profile: AssertionSettings, now: int, jti: str, details: dict[str, Any] | None
) -> dict[str, Any]:
    """The claims of a client assertion for ``profile`` (RFC 7523 section 3, HelseID):
    ``iss``/``sub`` the client id, ``aud`` the issuer exactly as configured, ``iat``/``nbf``
    ``now``, ``exp`` ``now`` + the profile's lifetime, ``jti``, and ``assertion_details``
    when given (see :func:`assertion_details`)."""
    claims: dict[str, Any] = {
        "iss": profile.client_id,
        "sub": profile.client_id,
        "aud": profile.issuer,
        "iat": now,
        "nbf": now,
        "exp": now + profile.assertion_lifetime,
        "jti": jti,
    }
    if details is not None:
        claims["assertion_details"] = details
    return claims


def build_proof_claims(
    jti: str, htm: str, htu: str, now: int, nonce: str | None = None, ath: str | None = None
) -> dict[str, Any]:
    """The claims of a DPoP proof (RFC 9449 section 4.2) from already checked values:
    ``jti``, ``htm``, ``htu``, ``iat``, and ``nonce``/``ath`` when given."""
    claims: dict[str, Any] = {"jti": jti, "htm": htm, "htu": htu, "iat": now}
    if nonce is not None:
        claims["nonce"] = nonce
    if ath is not None:
        claims["ath"] = ath
    return claims
