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

from . import signing
from .backends.base import BackendError
from .config import ProfileSettings
from .errors import RequestError, refusal
from .htu import HtuPolicy
from .keys import SigningKey

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

    Errors: :class:`~helseid_signer_client.SignerError` with the status the service would
    answer (:func:`~.errors.refusal`); a backend failure carries the backend's own text,
    since the caller here is the operator.
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
        self.profile = signing.Profile.with_keys(name, settings, assertion_key, dpop_key, htu_policy)
        self._clock = clock

    def _check_profile(self, profile: str) -> None:
        if profile != self.name:
            raise SignerError(grpc.StatusCode.PERMISSION_DENIED, "profile: is not a profile this caller may use")

    @staticmethod
    def _failed(exc: RequestError | BackendError) -> SignerError:
        answer = refusal(exc)
        return SignerError(grpc.StatusCode[answer.code], answer.message)

    def get_client_profile(self, profile: str) -> ClientProfile:
        """What GetClientProfile would answer for the profile."""
        self._check_profile(profile)
        return signing.profile_info(self.profile, self._clock())

    def sign_client_assertion(
        self,
        profile: str,
        *,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
        avoid_kid: str | None = None,
    ) -> ClientAssertion:
        """A fresh client assertion (see SignerClient.sign_client_assertion; this signer has
        one key, so ``avoid_kid`` naming it is answered FAILED_PRECONDITION)."""
        self._check_profile(profile)
        try:
            signable = signing.client_assertion(
                self.profile,
                parent_organization_number or "",
                child_organization_number or "",
                int(self._clock()),
                {},
                avoid_kid or "",
            )
            jwt = signing.sign(signable, time.monotonic() + SIGN_TIMEOUT)
        except (RequestError, BackendError) as exc:
            raise self._failed(exc) from exc
        key = signable.key
        return ClientAssertion(jwt, key.kid, key.alg.name, signable.jti, signable.issued_at, signable.expires_at)

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
        digest = access_token_sha256(access_token) if access_token else b""
        try:
            signable = signing.dpop_proof(self.profile, htm, htu, nonce or "", digest, int(self._clock()), {})
            jwt = signing.sign(signable, time.monotonic() + SIGN_TIMEOUT)
        except (RequestError, BackendError) as exc:
            raise self._failed(exc) from exc
        key = signable.key
        return DpopProof(jwt, key.kid, key.alg.name, signable.jti, signable.issued_at, signable.htu)
