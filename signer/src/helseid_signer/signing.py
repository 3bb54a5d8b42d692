"""The signing core: from a client profile and the checked request fields to a signed
client assertion or DPoP proof. It knows nothing of gRPC.

The rule sequence of each JWT exists once, here:

* client assertion (RFC 7523 section 3, HelseID): organisation numbers against the
  profile's tenancy and allow-list -> ``iat``/``jti`` -> claims -> the assertion key that
  signs at ``iat`` (rotation) -> signing input (:func:`client_assertion`);
* DPoP proof (RFC 9449 section 4.2): ``htm`` -> ``htu`` against the profile's
  :class:`~.htu.HtuPolicy` -> ``nonce`` -> ``ath`` -> ``iat``/``jti`` -> claims -> the
  profile's DPoP key -> signing input (:func:`dpop_proof`).

Each returns a :class:`Signable`; :func:`sign` (blocking, within a deadline) or
:func:`sign_now` (on the caller's thread, when the backend can without waiting) turns it
into the compact JWS. Every adapter - the gRPC servicer (:mod:`.service`), the in-process
signer of ``keys register`` (:mod:`.local_signer`) and ``check`` - calls these functions,
so a rule added here holds for all of them. Errors: :class:`~.errors.RequestError` (a
field), :class:`~.backends.base.BackendError` (the key store); :func:`~.errors.refusal`
maps both to a status.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from helseid_signer_client import ClientProfile

from . import metrics
from .claims import (
    assertion_details,
    build_assertion_claims,
    build_proof_claims,
    check_access_token_sha256,
    check_avoid_kid,
    check_htm,
    check_nonce,
    new_jti,
)
from .config import ProfileSettings
from .errors import RequestError
from .htu import HtuPolicy
from .jwt import compact, json_b64, signing_input
from .keys import KeySlot, SigningKey
from .rotation import AssertionKeys

#: Seconds a client of GetKeySet may cache the key set before asking again.
KEY_SET_REFRESH_HINT = 3600


@dataclass(frozen=True)
class Profile:
    """A client profile: its settings, its key slots (resolved or pending) and its ``htu`` policy."""

    name: str
    settings: ProfileSettings
    token_endpoint: str
    assertion_keys: AssertionKeys
    dpop_slot: KeySlot
    htu_policy: HtuPolicy

    @classmethod
    def with_keys(
        cls,
        name: str,
        settings: ProfileSettings,
        assertion_key: SigningKey,
        dpop_key: SigningKey,
        htu_policy: HtuPolicy,
    ) -> Profile:
        """A profile with fixed, already resolved keys and no rotation (the in-process
        signers of ``keys register`` and ``check``, which choose the key themselves)."""
        return cls(
            name=name,
            settings=settings,
            token_endpoint=settings.effective_token_endpoint,
            assertion_keys=AssertionKeys(current=KeySlot.holding(assertion_key)),
            dpop_slot=KeySlot.holding(dpop_key),
            htu_policy=htu_policy,
        )


@dataclass(frozen=True)
class Signable:
    """A JWT whose header and claims are built and checked, ready to be signed.

    Attributes:
        key: the key that signs it.
        signing_input: ``base64url(header) "." base64url(claims)`` (RFC 7515 section 5.1).
        jti: its ``jti``.
        issued_at: its ``iat``, seconds since the epoch.
        expires_at: its ``exp`` (client assertions); None for DPoP proofs.
        htu: the canonical ``htu`` it carries (DPoP proofs); None for client assertions.
        signed_facts: what the audit record gains once it is signed (``kid``, ``alg``,
            ``backend``, ``key_version``, ``jti``, and ``exp`` for an assertion).
    """

    key: SigningKey
    signing_input: bytes
    jti: str
    issued_at: int
    expires_at: int | None = None
    htu: str | None = None
    signed_facts: dict[str, Any] = field(default_factory=dict)


def _signable(key: SigningKey, header_b64: str, claims: dict[str, Any], **extra: Any) -> Signable:
    facts = {"kid": key.kid, "alg": key.alg.name, "backend": key.backend.scheme, "key_version": key.version}
    facts["jti"] = claims["jti"]
    if "exp" in claims:
        facts["exp"] = claims["exp"]
    return Signable(
        key=key,
        signing_input=signing_input(header_b64, json_b64(claims)),
        jti=claims["jti"],
        issued_at=claims["iat"],
        signed_facts=facts,
        **extra,
    )


class NoOtherKeyError(RequestError):
    """``avoid_kid`` was given and no other key of the profile may sign (FAILED_PRECONDITION)."""

    def __init__(self) -> None:
        super().__init__(
            "avoid_kid",
            "no other published, registered, unexpired client-assertion key of this profile may sign",
            code="FAILED_PRECONDITION",
        )


def client_assertion(
    profile: Profile,
    parent_organization_number: str,
    child_organization_number: str,
    now: int,
    audit: dict[str, Any],
    avoid_kid: str = "",
) -> Signable:
    """Check the request and build a client assertion for ``profile`` at ``now``.

    Args:
        parent_organization_number: 9 digits, or "" for none (multi-tenant profiles).
        child_organization_number: 9 digits, or "" for none.
        now: ``iat``/``nbf``, seconds since the epoch.
        audit: the request's audit record; gains ``organization_numbers`` when given, and
            ``avoid_kid`` when given.
        avoid_kid: "" (the key that signs now), or the kid (43 base64url characters) of an
            assertion HelseID refused: another eligible key signs
            (:meth:`~.rotation.AssertionKeys.alternative`).

    Raises RequestError (a number or ``avoid_kid`` malformed, a number not allowed),
    NoOtherKeyError (no other key may sign), BackendUnavailableError (the key is pending).
    """
    s = profile.settings
    avoid = check_avoid_kid(avoid_kid)
    details = assertion_details(
        s.tenancy, s.allowed_organization_numbers, parent_organization_number, child_organization_number
    )
    claims = build_assertion_claims(s, now, new_jti(), details)
    if details is not None:
        audit["organization_numbers"] = [n for n in (parent_organization_number, child_organization_number) if n]
    if avoid is None:
        slot = profile.assertion_keys.signing(now)
    else:
        audit["avoid_kid"] = avoid
        found = profile.assertion_keys.alternative(avoid, now)
        if found is None:
            raise NoOtherKeyError()
        slot = found
    key = slot.get()
    return _signable(key, key.assertion_header, claims, expires_at=claims["exp"])


def dpop_proof(
    profile: Profile, htm: str, htu: str, nonce: str, access_token_sha256: bytes, now: int, audit: dict[str, Any]
) -> Signable:
    """Check the request and build a DPoP proof with ``profile``'s DPoP key at ``now``.

    Args:
        htm: the HTTP method, upper case exactly (RFC 9110 section 9.1).
        htu: the request URL; its canonical form must be allowed by the profile's policy.
        nonce: the server's ``DPoP-Nonce`` (1..512 NQCHAR), or "" for none.
        access_token_sha256: SHA-256 of the access token (32 bytes, becomes ``ath``), or
            b"" for a token-endpoint proof.
        now: ``iat``, seconds since the epoch.
        audit: the request's audit record; gains ``htm``, ``htu``, ``nonce_present``,
            ``ath_present`` as they are checked.

    Raises RequestError naming the field, BackendUnavailableError (the DPoP key is pending).
    """
    checked_htm = check_htm(htm)
    checked_htu = profile.htu_policy.check(htu)
    audit.update(htm=checked_htm, htu=checked_htu)
    checked_nonce = check_nonce(nonce)
    ath = check_access_token_sha256(access_token_sha256)
    audit.update(nonce_present=checked_nonce is not None, ath_present=ath is not None)
    claims = build_proof_claims(new_jti(), checked_htm, checked_htu, now, checked_nonce, ath)
    key = profile.dpop_slot.get()
    return _signable(key, key.dpop_header, claims, htu=checked_htu)


def sign(signable: Signable, deadline: float | None = None) -> str:
    """Sign ``signable`` in its key's backend (blocking, within ``deadline``, a
    ``time.monotonic()`` value; None: none) and return the compact JWS. Raises BackendError."""
    started = time.perf_counter()
    signature = signable.key.sign(signable.signing_input, deadline)
    _observe(signable.key, started)
    signable.signed_facts["key_version"] = signable.key.version  # what signed (recovery may have moved it)
    return compact(signable.signing_input, signature)


def sign_now(signable: Signable) -> str | None:
    """:func:`sign` on the caller's thread when the key's backend can sign without waiting
    (``signs_on_event_loop``); None when it cannot (use :func:`sign` on the key's executor)."""
    started = time.perf_counter()
    signature = signable.key.sign_now(signable.signing_input)
    if signature is None:
        return None
    _observe(signable.key, started)
    signable.signed_facts["key_version"] = signable.key.version
    return compact(signable.signing_input, signature)


def _observe(key: SigningKey, started: float) -> None:
    metrics.BACKEND_SIGN_SECONDS.labels(key.backend.scheme, key.alg.name).observe(time.perf_counter() - started)


def profile_info(profile: Profile, now: float) -> ClientProfile:
    """What GetClientProfile answers: the profile's client id, issuer, token endpoint, and
    the keys that sign at ``now`` (the client library's own value type). Raises
    BackendUnavailableError while one of them is pending."""
    assertion_key = profile.assertion_keys.signing(now).get()
    dpop_key = profile.dpop_slot.get()
    return ClientProfile(
        client_id=profile.settings.client_id,
        issuer=profile.settings.issuer,
        token_endpoint=profile.token_endpoint,
        assertion_alg=assertion_key.alg.name,
        assertion_kid=assertion_key.kid,
        dpop_alg=dpop_key.alg.name,
        dpop_jkt=dpop_key.kid,
        assertion_lifetime_seconds=profile.settings.assertion_lifetime,
    )


@dataclass(frozen=True)
class PublishedKey:
    """One client-assertion key in a profile's key set (GetKeySet).

    Attributes:
        key: the key.
        status: ``CURRENT``, ``NEXT`` or ``PREVIOUS``.
        active_from: when a NEXT key starts signing, seconds since the epoch (0: n/a).
        published_until: when a PREVIOUS key leaves the set (0: n/a).
    """

    key: SigningKey
    status: str
    active_from: float
    published_until: float


def key_set(profile: Profile, now: float) -> tuple[str, list[PublishedKey]]:
    """The profile's published client-assertion keys at ``now``: the JWKS as compact JSON
    (RFC 7517 section 5) and each key with its rotation status, CURRENT first. Raises
    BackendUnavailableError while a published key is pending."""
    published = [PublishedKey(slot.get(), status, since, until) for slot, status, since, until in
                 profile.assertion_keys.published(now)]  # fmt: skip
    jwks = json.dumps({"keys": [p.key.published_jwk for p in published]}, separators=(",", ":"))
    return jwks, published
