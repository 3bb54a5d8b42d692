"""DPoP for outgoing API calls (DEFT and other NHN APIs) as an ``httpx.Auth``.

Sources: RFC 9449 section 7 (``Authorization: DPoP <token>`` + a proof with ``ath``),
section 8 (resource-server nonces: 401 with ``WWW-Authenticate: DPoP
error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header), section 4.3 (``htu`` without
query and fragment - the signer canonicalises it).

For every request (and every retry) a NEW proof is signed: proofs are never
pre-built or cached. On a ``use_dpop_nonce`` challenge the request is sent once more
with a proof carrying the nonce; the last nonce per origin is remembered. If the
signer's DPoP key no longer matches the token's ``jkt`` (the key was rotated), the
cached token is dropped and a new one fetched before the request is sent.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncGenerator, Generator

import httpx

from .signer import DpopProof
from .token import AccessToken, AsyncTokenClient, TokenClient

_NONCE_ERROR = re.compile(r'error\s*=\s*"?use_dpop_nonce"?', re.I)


def is_nonce_challenge(response: httpx.Response) -> bool:
    """True for a resource server's 401 ``DPoP error="use_dpop_nonce"`` with a nonce."""
    if response.status_code != 401 or "DPoP-Nonce" not in response.headers:
        return False
    challenges = response.headers.get_list("WWW-Authenticate")
    return any(c.lstrip().lower().startswith("dpop") and _NONCE_ERROR.search(c) for c in challenges)


def _set_headers(request: httpx.Request, token: AccessToken, proof: DpopProof) -> None:
    request.headers["Authorization"] = f"DPoP {token.access_token}"
    request.headers["DPoP"] = proof.jwt


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port or ''}"


class DPoPAuth(httpx.Auth):
    """``httpx.Auth`` that adds a DPoP-bound HelseID token and a fresh DPoP proof.

    Args:
        token_client: gets (and caches) the access token; its signer signs the proofs. A
            :class:`TokenClient` serves ``httpx.Client``; an :class:`AsyncTokenClient`
            serves ``httpx.AsyncClient``.

    Raises TokenError / SignerError / DiscoveryError from inside ``httpx`` calls.
    """

    requires_response_body = False

    def __init__(self, token_client: TokenClient | AsyncTokenClient) -> None:
        self.token_client = token_client
        self._nonces: dict[str, str] = {}
        self._lock = threading.Lock()

    def _sync_client(self) -> TokenClient:
        if not isinstance(self.token_client, TokenClient):
            raise TypeError("DPoPAuth with an AsyncTokenClient needs httpx.AsyncClient")
        return self.token_client

    def _async_client(self) -> AsyncTokenClient:
        if not isinstance(self.token_client, AsyncTokenClient):
            raise TypeError("DPoPAuth with a TokenClient needs httpx.Client")
        return self.token_client

    def _proof(self, request: httpx.Request, token: AccessToken, nonce: str | None) -> DpopProof:
        return self._sync_client().signer.sign_dpop_proof(
            self.token_client.profile,
            request.method,
            str(request.url),
            nonce=nonce,
            access_token=token.access_token,
        )

    def _authorise(self, request: httpx.Request, nonce: str | None) -> None:
        tokens = self._sync_client()
        token = tokens.get_token()
        proof = self._proof(request, token, nonce)
        if proof.jkt != token.jkt:  # the DPoP key changed: the token is bound to the old one
            tokens.invalidate(token)
            token = tokens.get_token()
            proof = self._proof(request, token, nonce)
        _set_headers(request, token, proof)

    async def _aproof(self, request: httpx.Request, token: AccessToken, nonce: str | None) -> DpopProof:
        return await self._async_client().signer.sign_dpop_proof(
            self.token_client.profile,
            request.method,
            str(request.url),
            nonce=nonce,
            access_token=token.access_token,
        )

    async def _aauthorise(self, request: httpx.Request, nonce: str | None) -> None:
        tokens = self._async_client()
        token = await tokens.get_token()
        proof = await self._aproof(request, token, nonce)
        if proof.jkt != token.jkt:  # the DPoP key changed: the token is bound to the old one
            tokens.invalidate(token)
            token = await tokens.get_token()
            proof = await self._aproof(request, token, nonce)
        _set_headers(request, token, proof)

    def _remember(self, request: httpx.Request, response: httpx.Response) -> None:
        nonce = response.headers.get("DPoP-Nonce")
        if nonce:
            with self._lock:
                self._nonces[_origin(request.url)] = nonce

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Sign, send; on a nonce challenge sign once more with the nonce and resend."""
        self._authorise(request, self._nonces.get(_origin(request.url)))
        response = yield request
        self._remember(request, response)
        if is_nonce_challenge(response):
            self._authorise(request, response.headers["DPoP-Nonce"])
            response = yield request
            self._remember(request, response)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The same flow as :meth:`sync_auth_flow`, for ``httpx.AsyncClient``."""
        await self._aauthorise(request, self._nonces.get(_origin(request.url)))
        response = yield request
        self._remember(request, response)
        if is_nonce_challenge(response):
            await self._aauthorise(request, response.headers["DPoP-Nonce"])
            response = yield request
            self._remember(request, response)
