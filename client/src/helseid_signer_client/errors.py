"""Errors raised by the client library."""

from __future__ import annotations

import grpc


class HelseIdSignerError(Exception):
    """Base of this library's errors."""


class SignerError(HelseIdSignerError):
    """The signer service refused or failed a request.

    Attributes:
        code: the gRPC status (``grpc.StatusCode``), e.g. INVALID_ARGUMENT, PERMISSION_DENIED,
            UNAVAILABLE.
        details: the service's message; it names the offending request field.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> SignerError:
        """Wrap a ``grpc.RpcError`` (sync or aio)."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, details or "")


class TokenError(HelseIdSignerError):
    """HelseID (or another authorization server) refused a token request, or answered
    with something a DPoP client must refuse.

    Attributes:
        status_code: the HTTP status, or None when the response was unusable.
        error: the OAuth ``error`` code (``invalid_client``, ``use_dpop_nonce``, ...) or a
            client-side code such as ``invalid_token_type``.
        error_description: the server's ``error_description``, if any.
        rejected_scope: HelseID's ``rejected_scope``, if any (multi-tenant terms of use).
    """

    def __init__(
        self,
        error: str,
        error_description: str | None = None,
        *,
        status_code: int | None = None,
        rejected_scope: str | None = None,
    ) -> None:
        text = error if not error_description else f"{error}: {error_description}"
        if rejected_scope:
            text += f" (rejected_scope: {rejected_scope})"
        if status_code is not None:
            text = f"HTTP {status_code}: {text}"
        super().__init__(text)
        self.status_code = status_code
        self.error = error
        self.error_description = error_description
        self.rejected_scope = rejected_scope


class DiscoveryError(HelseIdSignerError):
    """The issuer's discovery document is unreachable or does not match the profile."""


class UnreplayableBodyError(HelseIdSignerError):
    """A request had to be sent again - the server asked for a DPoP nonce
    (``use_dpop_nonce``) or refused the access token (``invalid_token``) - but its body can
    be read only once (a generator, an iterator, an async iterator, a pipe), so it was not
    sent again. Nothing was re-sent and no success is reported for a short body: send the
    request again with a fresh body. The nonce the server gave is remembered, and a refused
    token was dropped from the cache, so the next attempt carries what the server asked for.

    Attributes:
        reason: ``"use_dpop_nonce"`` or ``"invalid_token"``.
        response: the server's answer (an ``httpx.Response`` or ``requests.Response``, body
            not read; status and headers usable).
    """

    def __init__(self, reason: str, response: object) -> None:
        super().__init__(
            f"the server answered {reason}: the request must be sent again, but its body can be read only once "
            "(a generator, iterator or pipe) and was not re-sent; send it again with a new body, or give a bytes "
            "or seekable-file body"
        )
        self.reason = reason
        self.response = response


class RedirectRefused(HelseIdSignerError):
    """A server answered a request that carries an access token and a DPoP proof (or a
    client assertion) with a redirect. The client never sends them to a URL they were not
    signed for, so the redirect is not followed with them (with httpx ``follow_redirects=True``
    the next hop is stopped before its headers are sent). To go on, send a new request to
    ``location`` yourself: it gets a new proof, and the signer refuses a URL outside the
    profile's ``api_base_urls`` (PERMISSION_DENIED).

    Attributes:
        url: the URL the request was signed for (without query).
        location: where the server redirected to (without query when known only from the hop).
        response: the redirect answer, when there is one (None when the hop was stopped inside
            httpx's redirect handling).
    """

    def __init__(self, url: str, location: str, response: object | None = None) -> None:
        super().__init__(
            f"refused to follow a redirect from {url} to {location} with an access token and DPoP proof; "
            "send a new request to that URL if it is one the profile may call"
        )
        self.url = url
        self.location = location
        self.response = response
