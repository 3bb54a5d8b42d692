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
