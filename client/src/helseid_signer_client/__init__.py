"""helseid-signer-client: get HelseID tokens and call DPoP-protected APIs with keys that
stay in the helseid-signer service.

Typical use::

    from helseid_signer_client import SignerClient, TokenClient, DPoPAuth
    signer = SignerClient("127.0.0.1:50051")
    tokens = TokenClient(signer, profile="deft", scope="nhn:deft/api")
    with httpx.Client(auth=DPoPAuth(tokens)) as api:
        api.get("https://deft.example/api/...")
"""

from .dpop import DPoPAuth
from .errors import (
    DiscoveryError,
    HelseIdSignerError,
    RedirectRefused,
    SignerError,
    TokenError,
    UnreplayableBodyError,
)
from .signer import (
    AsyncSignerClient,
    ClientAssertion,
    ClientProfile,
    DpopProof,
    KeySet,
    SignerClient,
    access_token_sha256,
)
from .token import AccessToken, AsyncTokenClient, TokenClient

__all__ = [
    "AccessToken",
    "AsyncSignerClient",
    "AsyncTokenClient",
    "ClientAssertion",
    "ClientProfile",
    "DPoPAuth",
    "DiscoveryError",
    "DpopProof",
    "HelseIdSignerError",
    "KeySet",
    "RedirectRefused",
    "SignerClient",
    "SignerError",
    "TokenClient",
    "TokenError",
    "UnreplayableBodyError",
    "access_token_sha256",
]
