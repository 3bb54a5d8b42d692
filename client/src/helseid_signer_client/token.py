"""The HelseID token flow: client credentials with ``private_key_jwt`` and DPoP.

Sources: RFC 6749 section 4.4 (client credentials), RFC 7523 section 2.2 (client
assertion), RFC 9449 sections 5 and 8 (DPoP at the token endpoint, server nonces),
RFC 8414 section 3.3 (the discovery ``issuer`` must equal the issuer), HelseID's
machine-client profile (``docs/helseid-profile.md`` of the project, sections 1-3).

Flow (:meth:`TokenClient.get_token`):

1. discovery: ``{issuer}/.well-known/openid-configuration``; its ``issuer`` and
   ``token_endpoint`` must equal what the signer's profile says (else DiscoveryError);
2. POST to the token endpoint with a fresh client assertion and a fresh DPoP proof
   (carrying the last valid ``DPoP-Nonce`` the server sent, if any: a value that is not
   1..512 RFC 9449 NQCHAR is ignored, never stored); a redirect is never followed (the
   assertion goes to the profile's token endpoint only): TokenError ``redirect_refused``;
3. on HTTP 400 ``use_dpop_nonce`` with a ``DPoP-Nonce`` header: exactly one retry with a
   NEW assertion (the first spent its ``jti``) and a NEW proof carrying the nonce; a
   second ``use_dpop_nonce`` is an error, never a loop;
4. on ``invalid_client`` (HTTP 400 or 401; around a key rotation HelseID may refuse the
   old key at once, or accept the new one only a moment later): exactly one retry with a
   NEW assertion the signer signs with another of the profile's registered keys
   (``avoid_kid`` = the refused assertion's kid; the signer decides which key may) and a
   NEW proof (the nonce retry of step 3 may follow it, if not used yet: each retry at most
   once). When the signer has no other key (FAILED_PRECONDITION) the first refusal is
   returned. Never a loop;
5. refuse a ``token_type`` other than ``DPoP``; cache the token until ``refresh_margin``
   seconds before it expires. The cached token remembers the ``jkt`` of the DPoP key it is
   bound to; :class:`~helseid_signer_client.dpop.DPoPAuth` fetches a new token when the
   signer's DPoP key changes.

The cache key is the TokenClient itself: one instance per (profile, scope, organisation
numbers); its token is bound to one ``jkt``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from ._rules import REDIRECT_STATUSES, valid_nonce
from .errors import DiscoveryError, SignerError, TokenError
from .signer import AsyncSignerClient, ClientProfile, SignerClient

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_REFRESH_MARGIN = 30.0  # seconds before expiry that a cached token is replaced
DEFAULT_HTTP_TIMEOUT = 10.0  # seconds

log = logging.getLogger("helseid_signer_client")


@dataclass(frozen=True)
class AccessToken:
    """A DPoP-bound access token.

    Attributes:
        access_token: the token (never logged; hidden from ``repr``).
        token_type: ``"DPoP"``.
        expires_at: seconds since the epoch when it expires (issue time + ``expires_in``).
        scope: the granted scope, if the server said.
        jkt: RFC 7638 thumbprint of the DPoP key the token is bound to (``cnf.jkt``).
        rejected_scope: HelseID's ``rejected_scope``, if present.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    scope: str | None
    jkt: str
    rejected_scope: str | None = None

    def usable(self, now: float, margin: float) -> bool:
        """True while ``now`` is more than ``margin`` seconds before ``expires_at``."""
        return now < self.expires_at - margin


def token_form(client_id: str, scope: str, client_assertion: str) -> dict[str, str]:
    """The form of a client-credentials token request with a client assertion."""
    return {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "scope": scope,
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": client_assertion,
    }


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def nonce_challenge(response: httpx.Response) -> str | None:
    """The ``DPoP-Nonce`` of a token-endpoint ``use_dpop_nonce`` answer (HTTP 400), else None.

    A nonce that is not 1..512 RFC 9449 NQCHAR (section 8.1) is None: the client cannot put
    it in a proof, so the answer is an error, not a challenge."""
    if response.status_code == 400 and _json(response).get("error") == "use_dpop_nonce":
        nonce = response.headers.get("DPoP-Nonce")
        return nonce if valid_nonce(nonce) else None
    return None


def client_refused(response: httpx.Response) -> bool:
    """True for a token-endpoint ``invalid_client`` answer (HTTP 400 or 401, RFC 6749 section 5.2)."""
    return response.status_code in (400, 401) and _json(response).get("error") == "invalid_client"


def parse_token_response(response: httpx.Response, jkt: str, now: float) -> AccessToken:
    """Turn a token-endpoint response into an :class:`AccessToken` or raise :class:`TokenError`.

    Refuses a ``token_type`` other than DPoP (compared case-insensitively, RFC 6749
    section 5.1), a missing or non-ASCII ``access_token`` and a non-positive ``expires_in``.
    A redirect (3xx with ``Location``) is refused as ``redirect_refused``: the client
    assertion is never sent to a URL other than the profile's token endpoint.
    """
    if response.status_code in REDIRECT_STATUSES and "Location" in response.headers:
        raise TokenError(
            "redirect_refused",
            f"the token endpoint redirected to {response.headers['Location']}; a client assertion is sent only "
            "to the profile's token_endpoint",
            status_code=response.status_code,
        )
    body = _json(response)
    if response.status_code != 200:
        raise TokenError(
            str(body.get("error") or "invalid_response"),
            body.get("error_description"),
            status_code=response.status_code,
            rejected_scope=body.get("rejected_scope"),
        )
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "dpop":
        raise TokenError(
            "invalid_token_type",
            f"expected token_type DPoP for a DPoP-bound request, got {token_type!r}",
            status_code=200,
        )
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token or not access_token.isascii():
        raise TokenError("invalid_response", "access_token missing or not ASCII", status_code=200)
    expires_in = body.get("expires_in")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise TokenError("invalid_response", f"expires_in must be a positive integer, got {expires_in!r}")
    return AccessToken(
        access_token=access_token,
        token_type="DPoP",
        expires_at=now + expires_in,
        scope=body.get("scope"),
        jkt=jkt,
        rejected_scope=body.get("rejected_scope"),
    )


def check_discovery(document: Mapping[str, Any], profile: ClientProfile) -> None:
    """The discovery document must name the profile's issuer and token endpoint exactly."""
    if document.get("issuer") != profile.issuer:
        raise DiscoveryError(
            f"discovery issuer {document.get('issuer')!r} differs from the profile's issuer {profile.issuer!r}"
        )
    if document.get("token_endpoint") != profile.token_endpoint:
        raise DiscoveryError(
            f"discovery token_endpoint {document.get('token_endpoint')!r} differs from the signer's "
            f"{profile.token_endpoint!r}; fix token_endpoint in the signer's profile"
        )


def discovery_url(issuer: str) -> str:
    """``{issuer}/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0 section 4)."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


class _TokenClientBase:
    """What the sync and asyncio token clients share: settings, the cache, the nonce."""

    def __init__(
        self,
        signer: Any,
        profile: str,
        scope: str,
        http: Any,
        child_organization_number: str | None,
        parent_organization_number: str | None,
        refresh_margin: float,
        clock: Callable[[], float],
    ) -> None:
        self.signer = signer
        self.profile = profile
        self.scope = scope
        self._own_http = http is None
        self._http = http
        self._child = child_organization_number
        self._parent = parent_organization_number
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._token: AccessToken | None = None
        self._profile_info: ClientProfile | None = None
        self._nonce: str | None = None

    def _cached(self) -> AccessToken | None:
        token = self._token
        return token if token is not None and token.usable(self._clock(), self._refresh_margin) else None

    def _drop(self, token: AccessToken | None) -> None:
        if token is None or self._token is token:
            self._token = None

    def _assertion_kwargs(self) -> dict[str, str | None]:
        return {"child_organization_number": self._child, "parent_organization_number": self._parent}

    def _remember_nonce(self, response: httpx.Response) -> None:
        """Keep the server's ``DPoP-Nonce`` for the next proof, if it is a valid nonce (RFC 9449
        section 8.1, 1..512 NQCHAR); an invalid one is ignored and the previous nonce kept."""
        nonce = response.headers.get("DPoP-Nonce")
        if valid_nonce(nonce):
            self._nonce = nonce
        elif nonce is not None:
            log.warning("ignored an invalid DPoP-Nonce from the token endpoint (%d characters)", len(nonce))

    @staticmethod
    def _discovered(info: ClientProfile, response: httpx.Response) -> ClientProfile:
        try:
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DiscoveryError(f"discovery at {discovery_url(info.issuer)} failed: {exc}") from exc
        check_discovery(document, info)
        return info


class TokenClient(_TokenClientBase):
    """Gets and caches DPoP-bound access tokens from HelseID for one profile and scope.

    Args:
        signer: the signer service client.
        profile: the signer profile name.
        scope: space-separated scopes, e.g. ``"nhn:deft/api"``.
        http: an ``httpx.Client`` for the token endpoint (one is made if None; it is then
            closed by :meth:`close`).
        child_organization_number / parent_organization_number: for ``assertion_details``.
        refresh_margin: seconds before expiry that a cached token is replaced.
        clock: current time in seconds since the epoch.

    Thread-safe: concurrent callers share one refresh.
    """

    def __init__(
        self,
        signer: SignerClient,
        profile: str,
        scope: str,
        *,
        http: httpx.Client | None = None,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            signer, profile, scope, http, child_organization_number, parent_organization_number, refresh_margin, clock
        )
        self._http: httpx.Client = http or httpx.Client(timeout=DEFAULT_HTTP_TIMEOUT)
        self._lock = threading.Lock()

    @property
    def profile_info(self) -> ClientProfile:
        """The signer's description of the profile, fetched once and checked against discovery."""
        if self._profile_info is None:
            info = self.signer.get_client_profile(self.profile)
            self._profile_info = self._discovered(info, self._http.get(discovery_url(info.issuer)))
        return self._profile_info

    def invalidate(self, token: AccessToken | None = None) -> None:
        """Drop the cached token (only if it is still ``token``, when given)."""
        with self._lock:
            self._drop(token)

    def get_token(self) -> AccessToken:
        """A cached token, or a new one from the token endpoint. Raises TokenError,
        DiscoveryError, SignerError."""
        token = self._cached()
        if token is not None:
            return token
        with self._lock:
            token = self._cached()
            if token is None:
                token = self._token = self._request_token()
            return token

    def _post(self, info: ClientProfile, avoid_kid: str | None = None) -> tuple[httpx.Response, str, str]:
        kwargs = self._assertion_kwargs() if avoid_kid is None else {**self._assertion_kwargs(), "avoid_kid": avoid_kid}
        assertion = self.signer.sign_client_assertion(self.profile, **kwargs)
        proof = self.signer.sign_dpop_proof(self.profile, "POST", info.token_endpoint, nonce=self._nonce)
        form = token_form(info.client_id, self.scope, assertion.jwt)
        # never follow a redirect: the assertion and proof are for the token endpoint only
        response = self._http.post(info.token_endpoint, data=form, headers={"DPoP": proof.jwt}, follow_redirects=False)
        self._remember_nonce(response)
        return response, proof.jkt, assertion.kid

    def _request_token(self) -> AccessToken:
        info = self.profile_info
        response, jkt, kid = self._post(info)
        nonce_retried = bool(nonce_challenge(response))
        if nonce_retried:
            response, jkt, kid = self._post(info)  # new assertion AND new proof, once
        if client_refused(response):
            try:  # another registered key, once (and its nonce retry, if not used yet)
                response, jkt, _ = self._post(info, avoid_kid=kid)
                if not nonce_retried and nonce_challenge(response):
                    response, jkt, _ = self._post(info, avoid_kid=kid)
            except SignerError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        return parse_token_response(response, jkt, self._clock())

    def close(self) -> None:
        """Close the HTTP client if this object made it."""
        if self._own_http:
            self._http.close()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTokenClient(_TokenClientBase):
    """asyncio version of :class:`TokenClient` (same arguments; ``http`` is an
    ``httpx.AsyncClient``; ``signer`` an :class:`AsyncSignerClient`). Concurrent callers
    share one refresh (an ``asyncio.Lock``)."""

    def __init__(
        self,
        signer: AsyncSignerClient,
        profile: str,
        scope: str,
        *,
        http: httpx.AsyncClient | None = None,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            signer, profile, scope, http, child_organization_number, parent_organization_number, refresh_margin, clock
        )
        self._http: httpx.AsyncClient = http or httpx.AsyncClient(timeout=DEFAULT_HTTP_TIMEOUT)
        self._lock = asyncio.Lock()

    async def get_profile_info(self) -> ClientProfile:
        """See :attr:`TokenClient.profile_info`."""
        if self._profile_info is None:
            info = await self.signer.get_client_profile(self.profile)
            self._profile_info = self._discovered(info, await self._http.get(discovery_url(info.issuer)))
        return self._profile_info

    def invalidate(self, token: AccessToken | None = None) -> None:
        """Drop the cached token (only if it is still ``token``, when given)."""
        self._drop(token)

    async def get_token(self) -> AccessToken:
        """See :meth:`TokenClient.get_token`."""
        token = self._cached()
        if token is not None:
            return token
        async with self._lock:
            token = self._cached()
            if token is None:
                token = self._token = await self._request_token()
            return token

    async def _post(self, info: ClientProfile, avoid_kid: str | None = None) -> tuple[httpx.Response, str, str]:
        kwargs = self._assertion_kwargs() if avoid_kid is None else {**self._assertion_kwargs(), "avoid_kid": avoid_kid}
        assertion = await self.signer.sign_client_assertion(self.profile, **kwargs)
        proof = await self.signer.sign_dpop_proof(self.profile, "POST", info.token_endpoint, nonce=self._nonce)
        form = token_form(info.client_id, self.scope, assertion.jwt)
        response = await self._http.post(
            info.token_endpoint, data=form, headers={"DPoP": proof.jwt}, follow_redirects=False
        )
        self._remember_nonce(response)
        return response, proof.jkt, assertion.kid

    async def _request_token(self) -> AccessToken:
        info = await self.get_profile_info()
        response, jkt, kid = await self._post(info)
        nonce_retried = bool(nonce_challenge(response))
        if nonce_retried:
            response, jkt, kid = await self._post(info)  # new assertion AND new proof, once
        if client_refused(response):
            try:  # another registered key, once (and its nonce retry, if not used yet)
                response, jkt, _ = await self._post(info, avoid_kid=kid)
                if not nonce_retried and nonce_challenge(response):
                    response, jkt, _ = await self._post(info, avoid_kid=kid)
            except SignerError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        return parse_token_response(response, jkt, self._clock())

    async def aclose(self) -> None:
        """Close the HTTP client if this object made it."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
