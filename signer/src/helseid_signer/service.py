"""The gRPC servicer: request -> checks -> claims -> backend signature -> compact JWS.

Every header and claim the service can know is built here, never taken from the caller
(architecture.md, "The data path"). Errors map to gRPC status codes once, in
:meth:`SignerServicer._call`: RequestError -> its code (INVALID_ARGUMENT / NOT_FOUND /
PERMISSION_DENIED), BackendError -> its ``grpc_code``, anything else -> INTERNAL with
no detail (the detail goes to the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from helseid_signer_client._proto import signer_pb2 as pb
from helseid_signer_client._proto import signer_pb2_grpc

from .backends.base import BackendError
from .claims import (
    RequestError,
    assertion_details,
    canonical_htu,
    check_access_token_sha256,
    check_htm,
    check_nonce,
    check_profile_name,
    new_jti,
)
from .config import ProfileSettings
from .jwt import compact, json_b64, signing_input
from .keys import SigningKey

log = logging.getLogger("helseid_signer.service")
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["SignerService"]
KEY_SET_REFRESH_HINT = 3600  # seconds


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse (e.g. a string field that is not
    UTF-8). grpcio would answer UNKNOWN with the parser's exception text; the servicer
    answers INVALID_ARGUMENT naming the message type instead."""

    message_type: str


def _safe_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.name

    def deserialize(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except Exception:  # protobuf's DecodeError, or anything else a hostile input triggers
            return MalformedRequest(name)

    return deserialize


def add_to_server(servicer: SignerServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` for every RPC of ``helseid.signer.v1.SignerService``, with
    request parsing that cannot fail with UNKNOWN (see :class:`MalformedRequest`)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_safe_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


@dataclass(frozen=True)
class Profile:
    """A client profile with its keys resolved."""

    name: str
    settings: ProfileSettings
    token_endpoint: str
    assertion_key: SigningKey
    dpop_key: SigningKey


class SignerServicer(signer_pb2_grpc.SignerServiceServicer):
    """Implements ``helseid.signer.v1.SignerService`` (see proto/.../signer.proto).

    Args:
        profiles: the configured profiles by name.
        executor: where blocking backend calls run, off the event loop.
        clock: returns the current time in seconds since the epoch (tests may fix it).
    """

    def __init__(
        self,
        profiles: dict[str, Profile],
        executor: Executor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._profiles = profiles
        self._executor = executor
        self._clock = clock

    def _profile(self, name: str) -> Profile:
        check_profile_name(name)
        profile = self._profiles.get(name)
        if profile is None:
            raise RequestError("profile", f"no profile named {name!r}", code="NOT_FOUND")
        return profile

    async def _sign(self, key: SigningKey, header_b64: str, claims: dict[str, Any]) -> str:
        data = signing_input(header_b64, json_b64(claims))
        loop = asyncio.get_running_loop()
        signature = await loop.run_in_executor(self._executor, key.sign, data)
        return compact(data, signature)

    async def _call(
        self, context: grpc.aio.ServicerContext, method: str, request: Any, work: Callable[[Any], Awaitable[T]]
    ) -> T:
        try:
            if isinstance(request, MalformedRequest):
                raise RequestError("request", f"is not a valid {request.message_type} (string fields must be UTF-8)")
            return await work(request)
        except RequestError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        except BackendError as exc:
            log.warning("backend error in %s: %s", method, exc)
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        except Exception:
            log.exception("internal error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable")  # context.abort always raises

    async def SignClientAssertion(
        self, request: pb.SignClientAssertionRequest, context: Any
    ) -> pb.SignClientAssertionResponse:
        """Build and sign a client assertion (RFC 7523 section 3, HelseID profile)."""
        return await self._call(context, "SignClientAssertion", request, self._sign_client_assertion)

    async def _sign_client_assertion(self, request: pb.SignClientAssertionRequest) -> pb.SignClientAssertionResponse:
        profile = self._profile(request.profile)
        s = profile.settings
        details = assertion_details(
            s.tenancy,
            s.allowed_organization_numbers,
            request.parent_organization_number,
            request.child_organization_number,
        )
        now = int(self._clock())
        jti = new_jti()
        claims: dict[str, Any] = {
            "iss": s.client_id,
            "sub": s.client_id,
            "aud": s.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + s.assertion_lifetime,
            "jti": jti,
        }
        if details is not None:
            claims["assertion_details"] = details
        key = profile.assertion_key
        jwt = await self._sign(key, key.assertion_header, claims)
        return pb.SignClientAssertionResponse(
            jwt=jwt, kid=key.kid, alg=key.alg.name, jti=jti, issued_at=now, expires_at=claims["exp"]
        )

    async def SignDpopProof(self, request: pb.SignDpopProofRequest, context: Any) -> pb.SignDpopProofResponse:
        """Build and sign a DPoP proof (RFC 9449 section 4.2)."""
        return await self._call(context, "SignDpopProof", request, self._sign_dpop_proof)

    async def _sign_dpop_proof(self, request: pb.SignDpopProofRequest) -> pb.SignDpopProofResponse:
        profile = self._profile(request.profile)
        htm = check_htm(request.htm)
        htu = canonical_htu(request.htu)
        nonce = check_nonce(request.nonce)
        ath = check_access_token_sha256(request.access_token_sha256)
        now = int(self._clock())
        jti = new_jti()
        claims: dict[str, Any] = {"jti": jti, "htm": htm, "htu": htu, "iat": now}
        if nonce is not None:
            claims["nonce"] = nonce
        if ath is not None:
            claims["ath"] = ath
        key = profile.dpop_key
        jwt = await self._sign(key, key.dpop_header, claims)
        return pb.SignDpopProofResponse(jwt=jwt, jkt=key.kid, alg=key.alg.name, jti=jti, issued_at=now, htu=htu)

    async def GetClientProfile(self, request: pb.GetClientProfileRequest, context: Any) -> pb.GetClientProfileResponse:
        """What a client library needs to run the token flow for a profile."""

        async def work(request: pb.GetClientProfileRequest) -> pb.GetClientProfileResponse:
            p = self._profile(request.profile)
            return pb.GetClientProfileResponse(
                client_id=p.settings.client_id,
                issuer=p.settings.issuer,
                token_endpoint=p.token_endpoint,
                assertion_alg=p.assertion_key.alg.name,
                assertion_kid=p.assertion_key.kid,
                dpop_alg=p.dpop_key.alg.name,
                dpop_jkt=p.dpop_key.kid,
                assertion_lifetime_seconds=p.settings.assertion_lifetime,
            )

        return await self._call(context, "GetClientProfile", request, work)

    async def GetKeySet(self, request: pb.GetKeySetRequest, context: Any) -> pb.GetKeySetResponse:
        """The public JWKS of the profile's client-assertion key(s), to register in HelseID."""

        async def work(request: pb.GetKeySetRequest) -> pb.GetKeySetResponse:
            key = self._profile(request.profile).assertion_key
            return pb.GetKeySetResponse(
                jwks_json=json.dumps({"keys": [key.published_jwk]}, separators=(",", ":")),
                keys=[
                    pb.PublishedKey(
                        kid=key.kid,
                        alg=key.alg.name,
                        key_version=key.resolved.version,
                        status=pb.KEY_STATUS_CURRENT,
                    )
                ],
                refresh_hint_seconds=KEY_SET_REFRESH_HINT,
            )

        return await self._call(context, "GetKeySet", request, work)
