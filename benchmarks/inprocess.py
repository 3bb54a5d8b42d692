"""The baseline "without this product": the same two JWT shapes signed in the application's
own process with keys held in memory (``cryptography`` + the JOSE helpers), behind the same
interface as :class:`~helseid_signer_client.AsyncSignerClient`, so the client library's
token flow and ``DPoPAuth`` run unchanged on top of it. Benchmark use only."""

from __future__ import annotations

import hashlib
import secrets
import time
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from helseid_signer.jwt import b64url, json_b64, public_jwk, thumbprint
from helseid_signer_client.signer import ClientAssertion, ClientProfile, DpopProof


def new_keys() -> tuple[bytes, bytes]:
    """PKCS#8 PEM of a fresh RSA-2048 assertion key and a fresh P-256 DPoP key."""
    pem = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return (
        rsa.generate_private_key(65537, 2048).private_bytes(*pem),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(*pem),
    )


def public_assertion_jwk(assertion_pem: bytes, alg: str = "RS256") -> dict[str, str]:
    """The JWK to register for the in-memory assertion key (with kid and alg)."""
    key = serialization.load_pem_private_key(assertion_pem, None)
    jwk = public_jwk(key.public_key())
    return dict(jwk, kid=thumbprint(jwk), alg=alg, use="sig")


class InProcessSigner:
    """Signs RS256 client assertions and ES256 DPoP proofs in this process.

    Args:
        client_id, issuer, token_endpoint: the HelseID client, as the service's profile has them.
        assertion_pem, dpop_pem: PKCS#8 PEM private keys (RSA, P-256).
        lifetime: assertion lifetime in seconds.
    """

    def __init__(
        self,
        client_id: str,
        issuer: str,
        token_endpoint: str,
        assertion_pem: bytes,
        dpop_pem: bytes,
        lifetime: int = 10,
    ) -> None:
        self._assertion_key = serialization.load_pem_private_key(assertion_pem, None)
        self._dpop_key = serialization.load_pem_private_key(dpop_pem, None)
        self._client_id, self._issuer, self._lifetime = client_id, issuer, lifetime
        self._token_endpoint = token_endpoint
        assertion_jwk = public_jwk(self._assertion_key.public_key())
        self._kid = thumbprint(assertion_jwk)
        dpop_jwk = public_jwk(self._dpop_key.public_key())
        self._jkt = thumbprint(dpop_jwk)
        self._assertion_header = json_b64({"alg": "RS256", "typ": "client-authentication+jwt", "kid": self._kid})
        self._dpop_header = json_b64({"alg": "ES256", "typ": "dpop+jwt", "jwk": dpop_jwk})

    async def get_client_profile(self, profile: str) -> ClientProfile:
        return ClientProfile(
            self._client_id, self._issuer, self._token_endpoint, "RS256", self._kid, "ES256", self._jkt, self._lifetime
        )

    async def sign_client_assertion(
        self,
        profile: str,
        *,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
    ) -> ClientAssertion:
        now = int(time.time())
        jti = b64url(secrets.token_bytes(24))
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self._lifetime,
            "jti": jti,
        }
        data = f"{self._assertion_header}.{json_b64(claims)}".encode("ascii")
        signature = self._assertion_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return ClientAssertion(
            f"{data.decode('ascii')}.{b64url(signature)}", self._kid, "RS256", jti, now, now + self._lifetime
        )

    async def sign_dpop_proof(
        self, profile: str, htm: str, htu: str, *, nonce: str | None = None, access_token: str | None = None
    ) -> DpopProof:
        parts = urlsplit(htu)
        htu = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        now = int(time.time())
        jti = b64url(secrets.token_bytes(24))
        claims: dict = {"jti": jti, "htm": htm, "htu": htu, "iat": now}
        if nonce:
            claims["nonce"] = nonce
        if access_token:
            claims["ath"] = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
        data = f"{self._dpop_header}.{json_b64(claims)}".encode("ascii")
        r, s = decode_dss_signature(self._dpop_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return DpopProof(
            f"{data.decode('ascii')}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}",
            self._jkt,
            "ES256",
            jti,
            now,
            htu,
        )

    async def close(self) -> None:
        pass


def _now(coroutine):  # noqa: ANN001, ANN202
    """The result of a coroutine that never awaits (InProcessSigner's methods sign at once)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("an InProcessSigner method awaited something")


class SyncInProcessSigner:
    """:class:`InProcessSigner` behind the :class:`~helseid_signer_client.SignerClient`
    interface (blocking calls), for ``TokenClient`` and ``DPoPAuth`` on ``httpx.Client``."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._signer = InProcessSigner(*args, **kwargs)

    def get_client_profile(self, profile: str) -> ClientProfile:
        return _now(self._signer.get_client_profile(profile))

    def sign_client_assertion(self, profile: str, **kwargs) -> ClientAssertion:  # noqa: ANN003
        return _now(self._signer.sign_client_assertion(profile, **kwargs))

    def sign_dpop_proof(self, profile: str, htm: str, htu: str, **kwargs) -> DpopProof:  # noqa: ANN003
        return _now(self._signer.sign_dpop_proof(profile, htm, htu, **kwargs))

    def close(self) -> None:
        pass
