"""Typed wrappers over the helseid-signer gRPC stubs (``helseid.signer.v1.SignerService``).

The application host never handles a private key: it asks the service for a client
assertion (RFC 7523) or a DPoP proof (RFC 9449) and gets a compact JWS back.

Many replicas: the service is stateless, so a client may spread its calls over several
replicas. ``target`` may name several addresses (``"ipv4:10.0.0.5:50051,10.0.0.6:50051"``)
or a DNS name that resolves to all of them (``"dns:///helseid-signer.ns.svc.cluster.local:50051"``,
a Kubernetes headless Service). Every channel gets :data:`DEFAULT_SERVICE_CONFIG` unless the
caller passes another: gRPC ``round_robin`` over every resolved address, and up to five
attempts of a call that failed with ``UNAVAILABLE`` (a replica that died, stopped or lost
its backend) or was cancelled by a stopping replica, each on the next replica, all within
the call's one deadline.

Why a retry is safe: every RPC of the service is idempotent in effect. A signing RPC
stores nothing and has no side effect but an audit record; a retried one simply yields a
fresh JWS with a fresh ``jti``. If the first attempt did sign before its answer was lost,
that JWS never left the replica (it appears in that replica's audit trail as signed, and
can never be presented to anyone), so no ``jti`` is ever used twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import SignerError
from .proto import signer_pb2 as pb
from .proto import signer_pb2_grpc

DEFAULT_TIMEOUT = 5.0  # seconds, per RPC

#: The gRPC service config every channel of :class:`SignerClient` and
#: :class:`AsyncSignerClient` gets by default (see gRPC's service_config.md and
#: A6-client-retries): ``round_robin`` over all resolved addresses, and retries of
#: ``UNAVAILABLE`` and ``CANCELLED`` only (never of a refusal such as PERMISSION_DENIED),
#: at most 5 attempts with jittered exponential backoff (0.1 s, 0.2 s, ... at most 1 s),
#: all inside the one deadline of the call. The service never answers CANCELLED itself:
#: gRPC does, for a call that reached a replica in the instant it began to stop (see
#: helseid_signer/drain.py); a call the application cancels is never retried. Treat it as
#: read-only; pass a modified deep copy to change it.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": pb.DESCRIPTOR.services_by_name["SignerService"].full_name}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}


def channel_options(
    service_config: Mapping[str, Any] | None = DEFAULT_SERVICE_CONFIG,
    options: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel options: ``service_config`` as ``grpc.service_config`` (None: gRPC's own
    defaults, i.e. ``pick_first`` and no retries), followed by ``options``."""
    out: list[tuple[str, Any]] = []
    if service_config is not None:
        out.append(("grpc.service_config", json.dumps(service_config)))
    return out + list(options)


def _open_channel(
    api: Any, target: str | None, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> Any:
    """A channel to ``target`` from ``api`` (``grpc`` or ``grpc.aio``): TLS when
    ``credentials`` are given, else plaintext. ValueError without a target."""
    if target is None:
        raise ValueError("give a target or a channel")
    if credentials:
        return api.secure_channel(target, credentials, options=options)
    return api.insecure_channel(target, options=options)


@dataclass(frozen=True)
class ClientAssertion:
    """A signed client assertion.

    Attributes:
        jwt: compact JWS for the ``client_assertion`` form parameter.
        kid: RFC 7638 thumbprint of the signing key. alg: the JWS alg.
        jti: the single-use id. issued_at / expires_at: seconds since the epoch.
    """

    jwt: str
    kid: str
    alg: str
    jti: str
    issued_at: int
    expires_at: int


@dataclass(frozen=True)
class DpopProof:
    """A signed DPoP proof for one HTTP request.

    Attributes:
        jwt: compact JWS for the ``DPoP`` header. jkt: RFC 7638 thumbprint of the DPoP key.
        alg, jti, issued_at (seconds since the epoch), htu (as signed, canonical).
    """

    jwt: str
    jkt: str
    alg: str
    jti: str
    issued_at: int
    htu: str


@dataclass(frozen=True)
class ClientProfile:
    """What the service says about a profile (see GetClientProfileResponse in the proto)."""

    client_id: str
    issuer: str
    token_endpoint: str
    assertion_alg: str
    assertion_kid: str
    dpop_alg: str
    dpop_jkt: str
    assertion_lifetime_seconds: int


@dataclass(frozen=True)
class KeySet:
    """The public keys of a profile to register in HelseID self-service.

    Attributes:
        jwks: the JWK Set as a dict ``{"keys": [...]}`` (public members, kid, alg, use).
        keys: per key: ``kid``, ``alg``, ``key_version`` (backend id), ``status``
            (``"CURRENT"``, ``"NEXT"``, ``"PREVIOUS"``), ``active_from`` / ``published_until``
            (seconds since the epoch, 0 when not set).
        refresh_hint_seconds: how long the answer may be reused.
    """

    jwks: dict
    keys: tuple[dict, ...]
    refresh_hint_seconds: int


def _key_set(r: pb.GetKeySetResponse) -> KeySet:
    keys = tuple(
        {
            "kid": k.kid,
            "alg": k.alg,
            "key_version": k.key_version,
            "status": pb.KeyStatus.Name(k.status).removeprefix("KEY_STATUS_"),
            "active_from": k.active_from,
            "published_until": k.published_until,
        }
        for k in r.keys
    )
    return KeySet(json.loads(r.jwks_json), keys, r.refresh_hint_seconds)


def access_token_sha256(access_token: str) -> bytes:
    """SHA-256 of the ASCII access token: what the service encodes as ``ath`` (RFC 9449 4.2).

    Raises UnicodeEncodeError for a non-ASCII token (access tokens are ASCII, RFC 6750 2.1).
    """
    return hashlib.sha256(access_token.encode("ascii")).digest()


def _assertion(r: pb.SignClientAssertionResponse) -> ClientAssertion:
    return ClientAssertion(r.jwt, r.kid, r.alg, r.jti, r.issued_at, r.expires_at)


def _proof(r: pb.SignDpopProofResponse) -> DpopProof:
    return DpopProof(r.jwt, r.jkt, r.alg, r.jti, r.issued_at, r.htu)


def _profile(r: pb.GetClientProfileResponse) -> ClientProfile:
    return ClientProfile(
        r.client_id,
        r.issuer,
        r.token_endpoint,
        r.assertion_alg,
        r.assertion_kid,
        r.dpop_alg,
        r.dpop_jkt,
        r.assertion_lifetime_seconds,
    )


def _assertion_request(
    profile: str, child: str | None, parent: str | None, avoid_kid: str | None = None
) -> pb.SignClientAssertionRequest:
    return pb.SignClientAssertionRequest(
        profile=profile,
        child_organization_number=child or "",
        parent_organization_number=parent or "",
        avoid_kid=avoid_kid or "",
    )


def _proof_request(
    profile: str, htm: str, htu: str, nonce: str | None, access_token: str | None
) -> pb.SignDpopProofRequest:
    return pb.SignDpopProofRequest(
        profile=profile,
        htm=htm,
        htu=htu,
        nonce=nonce or "",
        access_token_sha256=access_token_sha256(access_token) if access_token else b"",
    )


class SignerClient:
    """Synchronous client of the signer service.

    Args:
        target: gRPC target, e.g. ``"127.0.0.1:50051"``, ``"unix:/run/helseid-signer/app.sock"``
            or ``"dns:///signer.ns.svc:50051"``. Ignored when ``channel`` is given.
        credentials: channel credentials (mTLS: ``grpc.ssl_channel_credentials(root, key, chain)``);
            None means a plaintext channel (development and Unix sockets only).
        channel: an existing channel to use instead.
        timeout: deadline of each RPC, in seconds (retries included).
        service_config: the gRPC service config of the channel (load balancing and
            retries); default :data:`DEFAULT_SERVICE_CONFIG`, None for gRPC's defaults.
            Ignored when ``channel`` is given.
        options: further gRPC channel options, e.g. ``[("grpc.ssl_target_name_override",
            "helseid-signer.example")]``. Ignored when ``channel`` is given.

    Every method raises :class:`SignerError` (with the gRPC status code) on failure.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        service_config: Mapping[str, Any] | None = DEFAULT_SERVICE_CONFIG,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if channel is None:
            channel = _open_channel(grpc, target, credentials, channel_options(service_config, options))
        self._channel = channel
        self._stub = signer_pb2_grpc.SignerServiceStub(channel)
        self.timeout = timeout

    def sign_client_assertion(
        self,
        profile: str,
        *,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
        avoid_kid: str | None = None,
    ) -> ClientAssertion:
        """A fresh client assertion for ``profile`` (single use: never reuse it).

        ``avoid_kid``: the kid of an assertion HelseID just refused (``invalid_client``); the
        service then signs with another registered key of the profile, or answers
        FAILED_PRECONDITION when there is none (see the proto's ``avoid_kid``)."""
        request = _assertion_request(profile, child_organization_number, parent_organization_number, avoid_kid)
        try:
            return _assertion(self._stub.SignClientAssertion(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    def sign_dpop_proof(
        self,
        profile: str,
        htm: str,
        htu: str,
        *,
        nonce: str | None = None,
        access_token: str | None = None,
    ) -> DpopProof:
        """A fresh DPoP proof for one request (``htm`` upper case, ``htu`` the request URL).

        ``access_token``: the token the request will carry; only its SHA-256 is sent, and
        the service puts it in ``ath``. Leave it None for the token endpoint.
        """
        request = _proof_request(profile, htm, htu, nonce, access_token)
        try:
            return _proof(self._stub.SignDpopProof(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    def get_client_profile(self, profile: str) -> ClientProfile:
        """Client id, issuer, token endpoint, algorithms and DPoP ``jkt`` of ``profile``."""
        try:
            return _profile(
                self._stub.GetClientProfile(pb.GetClientProfileRequest(profile=profile), timeout=self.timeout)
            )
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    def get_key_set(self, profile: str) -> KeySet:
        """The public JWKS of ``profile``'s client-assertion keys (for HelseID self-service)."""
        try:
            return _key_set(self._stub.GetKeySet(pb.GetKeySetRequest(profile=profile), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> SignerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSignerClient:
    """asyncio client of the signer service (``grpc.aio``); same arguments and errors as
    :class:`SignerClient`, methods are coroutines. Create it inside the running event loop."""

    def __init__(
        self,
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        service_config: Mapping[str, Any] | None = DEFAULT_SERVICE_CONFIG,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if channel is None:
            channel = _open_channel(grpc.aio, target, credentials, channel_options(service_config, options))
        self._channel = channel
        self._stub = signer_pb2_grpc.SignerServiceStub(channel)
        self.timeout = timeout

    async def sign_client_assertion(
        self,
        profile: str,
        *,
        child_organization_number: str | None = None,
        parent_organization_number: str | None = None,
        avoid_kid: str | None = None,
    ) -> ClientAssertion:
        """See :meth:`SignerClient.sign_client_assertion`."""
        request = _assertion_request(profile, child_organization_number, parent_organization_number, avoid_kid)
        try:
            return _assertion(await self._stub.SignClientAssertion(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    async def sign_dpop_proof(
        self,
        profile: str,
        htm: str,
        htu: str,
        *,
        nonce: str | None = None,
        access_token: str | None = None,
    ) -> DpopProof:
        """See :meth:`SignerClient.sign_dpop_proof`."""
        request = _proof_request(profile, htm, htu, nonce, access_token)
        try:
            return _proof(await self._stub.SignDpopProof(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    async def get_client_profile(self, profile: str) -> ClientProfile:
        """See :meth:`SignerClient.get_client_profile`."""
        request = pb.GetClientProfileRequest(profile=profile)
        try:
            return _profile(await self._stub.GetClientProfile(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    async def get_key_set(self, profile: str) -> KeySet:
        """See :meth:`SignerClient.get_key_set`."""
        try:
            return _key_set(await self._stub.GetKeySet(pb.GetKeySetRequest(profile=profile), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise SignerError.from_rpc_error(exc) from None

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncSignerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
