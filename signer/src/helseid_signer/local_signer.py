"""An in-process signer for the signer's own HelseID calls (``keys register``).

:class:`LocalSigner` has the three methods that the client library's
:class:`~helseid_signer_client.TokenClient` and :class:`~helseid_signer_client.DPoPAuth`
call on a :class:`~helseid_signer_client.SignerClient` - ``get_client_profile``,
``sign_client_assertion`` and ``sign_dpop_proof`` - with the same arguments, answers and
errors (:class:`~helseid_signer_client.SignerError` with a gRPC status code). It signs
with keys already resolved in their backend, builds every claim with the service's own
functions (:mod:`.claims`) and applies the same request checks (``htm``, ``htu`` against
an :class:`~.policy.HtuPolicy`, ``nonce``, ``ath``), so the token flow and DPoP for the
self-service call run through the real client library, unchanged, without a gRPC hop.

It serves one profile, and its ``htu`` policy is given by the caller: ``keys register``
allows only the token endpoint and the self-service endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from helseid_signer_client import ClientAssertion, ClientProfile, DpopProof, SignerError, access_token_sha256

from .backends.base import BackendError
from .claims import (
    RequestError,
    assertion_details,
    build_assertion_claims,
    build_proof_claims,
    check_access_token_sha256,
    check_htm,
    check_nonce,
    new_jti,
)
from .config import ProfileSettings
from .keys import SigningKey
from .policy import HtuPolicy
from .service import sign_compact

#: Seconds each signature may take (the service takes the caller's gRPC deadline instead).
SIGN_TIMEOUT = 10.0


class LocalSigner:
    """Signs client assertions and DPoP proofs for one profile, in this process.

    Args:
        name: the profile name callers must pass (any other is PERMISSION_DENIED, as in the service).
        settings: the profile's settings (client id, issuer, lifetime, tenancy, organisation numbers).
        assertion_key: the key that signs client assertions (resolved).
        dpop_key: the key that signs DPoP proofs (resolved).
        htu_policy: the URLs proofs may name.
        clock: current time in seconds since the epoch.
    """

    def __init__(
        self,
        name: str,
        settings: ProfileSettings,
        assertion_key: SigningKey,
        dpop_key: SigningKey,
        htu_policy: HtuPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.settings = settings
        self.assertion_key = assertion_key
        self.dpop_key = dpop_key
        self.htu_policy = htu_policy
        self._clock = clock

    def _check_profile(self, profile: str) -> None:
        if profile != self.name:
            raise SignerError(grpc.StatusCode.PERMISSION_DENIED, "profile: is not a profile this caller may use")

    @staticmethod
    def _sign(key: SigningKey, header_b64: str, claims: dict) -> str:
        try:
            return sign_compact(key, header_b64, claims, time.monotonic() + SIGN_TIMEOUT)
        except BackendError as exc:
            raise SignerError(grpc.StatusCode[exc.grpc_code], str(exc)) from exc

    def get_client_profile(self, profile: str) -> ClientProfile:
        """What GetClientProfile would answer for the profile."""
        self._check_profile(profile)
        s = self.settings
        return ClientProfile(
            client_id=s.client_id,
            issuer=s.issuer,
            token_endpoint=s.effective_token_endpoint,
            assertion_alg=self.assertion_key.alg.name,
            assertion_kid=self.assertion_key.kid,
            dpop_alg=self.dpop_key.alg.name,
            dpop_jkt=self.dpop_key.kid,
            assertion_lifetime_seconds=s.assertion_lifetime,
        )

    def sign_client_assertion(
        self,
        profile: str,
        *,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
    ) -> ClientAssertion:
        """A fresh client assertion (see SignerClient.sign_client_assertion)."""
        self._check_profile(profile)
        s = self.settings
        try:
            details = assertion_details(
                s.tenancy,
                s.allowed_organization_numbers,
                parent_organization_number or "",
                child_organization_number or "",
            )
        except RequestError as exc:
            raise SignerError(grpc.StatusCode[exc.code], str(exc)) from None
        now = int(self._clock())
        jti = new_jti()
        claims = build_assertion_claims(s, now, jti, details)
        key = self.assertion_key
        jwt = self._sign(key, key.assertion_header, claims)
        return ClientAssertion(jwt, key.kid, key.alg.name, jti, now, claims["exp"])

    def sign_dpop_proof(
        self,
        profile: str,
        htm: str,
        htu: str,
        *,
        nonce: str | None = None,
        access_token: str | None = None,
    ) -> DpopProof:
        """A fresh DPoP proof for one request (see SignerClient.sign_dpop_proof)."""
        self._check_profile(profile)
        try:
            method = check_htm(htm)
            canonical = self.htu_policy.check(htu)
            checked_nonce = check_nonce(nonce or "")
            ath = check_access_token_sha256(access_token_sha256(access_token) if access_token else b"")
        except RequestError as exc:
            raise SignerError(grpc.StatusCode[exc.code], str(exc)) from None
        now = int(self._clock())
        jti = new_jti()
        claims = build_proof_claims(jti, method, canonical, now, checked_nonce, ath)
        key = self.dpop_key
        jwt = self._sign(key, key.dpop_header, claims)
        return DpopProof(jwt, key.kid, key.alg.name, jti, now, canonical)
