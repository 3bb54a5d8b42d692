"""The gRPC servicer: caller -> policy -> claims -> backend signature -> compact JWS -> audit.

Every header and claim the service can know is built here, never taken from the caller
(architecture.md, "The data path"). Each request passes, in order:

1. parsing (a request that does not parse gets INVALID_ARGUMENT, not UNKNOWN);
2. the caller's identity (UNAUTHENTICATED when unknown) and whether it may use the
   profile (PERMISSION_DENIED, same message whether the profile exists or not), and its
   rate limit (RESOURCE_EXHAUSTED);
3. the profile's rules for the request fields (INVALID_ARGUMENT when malformed,
   PERMISSION_DENIED when well-formed but not allowed);
4. signing in the key's backend, bounded by the caller's deadline;
5. the audit record - with ``fail_closed`` a JWS is returned only once it is written.

Errors map to gRPC status codes once, in :meth:`SignerServicer._call`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc

from helseid_signer_client._proto import signer_pb2 as pb

from . import metrics
from .audit import AuditError, AuditLog
from .backends.base import (
    BackendConfigError,
    BackendError,
    BackendThrottledError,
    BackendUnavailableError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyReplacedError,
)
from .claims import (
    RequestError,
    assertion_details,
    build_assertion_claims,
    build_proof_claims,
    check_access_token_sha256,
    check_htm,
    check_nonce,
    check_profile_name,
    new_jti,
)
from .config import ProfileSettings
from .drain import CallTracker
from .jwt import compact, json_b64, signing_input
from .keys import KeySlot, SigningKey
from .policy import Caller, HtuPolicy, check_caller_may_use
from .rotation import AssertionKeys

log = logging.getLogger("helseid_signer.service")
SERVICE = pb.DESCRIPTOR.services_by_name["SignerService"]
KEY_SET_REFRESH_HINT = 3600  # seconds

#: Finds the caller of a request from its gRPC context (None: unknown caller).
Identify = Callable[[grpc.aio.ServicerContext], Caller | None]


@dataclass(frozen=True)
class Profile:
    """A client profile: its settings, its key slots (resolved or pending) and its ``htu`` policy."""

    name: str
    settings: ProfileSettings
    token_endpoint: str
    assertion_keys: AssertionKeys
    dpop_slot: KeySlot
    htu_policy: HtuPolicy


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


def add_to_server(servicer: SignerServicer, server: grpc.aio.Server, tracker: CallTracker | None = None) -> None:
    """Register ``servicer`` for every RPC of ``helseid.signer.v1.SignerService``, with
    request parsing that cannot fail with UNKNOWN (see :class:`MalformedRequest`), each
    call counted by ``tracker`` (the drain on SIGTERM) when given."""
    track = tracker.wrap if tracker is not None else (lambda behaviour: behaviour)
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            track(getattr(servicer, method.name)),
            request_deserializer=_safe_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def sign_compact(key: SigningKey, header_b64: str, claims: dict[str, Any], deadline: float | None = None) -> str:
    """Sign ``claims`` under the JOSE header ``header_b64`` with ``key`` (blocking, within
    ``deadline``) and return the compact JWS. The service's signing path; ``check`` uses it too."""
    return sign_input(key, signing_input(header_b64, json_b64(claims)), deadline)


def sign_input(key: SigningKey, data: bytes, deadline: float | None = None) -> str:
    """Sign the JWS signing input ``data`` (``header.payload``, RFC 7515 section 5.1) with
    ``key`` (blocking, within ``deadline``); return the compact JWS."""
    started = time.perf_counter()
    signature = key.sign(data, deadline)
    _observe_sign(key, started)
    return compact(data, signature)


def sign_input_now(key: SigningKey, data: bytes) -> str | None:
    """:func:`sign_input` on the caller's thread when the backend can sign without waiting
    (``sign_now``, PKCS#11 with ``sign_on_event_loop``); None when it cannot (use
    :func:`sign_input` on the signing thread)."""
    started = time.perf_counter()
    signature = key.backend.sign_now(key.resolved, key.alg, data)
    if signature is None:
        return None
    _observe_sign(key, started)
    return compact(data, signature)


def _observe_sign(key: SigningKey, started: float) -> None:
    metrics.BACKEND_SIGN_SECONDS.labels(key.backend.scheme, key.alg.name).observe(time.perf_counter() - started)


#: What a caller is told for each kind of backend failure (:func:`caller_message`).
_BACKEND_SUMMARIES: tuple[tuple[type[BackendError], str], ...] = (
    (KeyNotFoundError, "the signing key is not available in its key store"),
    (KeyReplacedError, "the signing key in the key store was replaced; the signer will not sign with it"),
    (BackendThrottledError, "the key store is throttling requests; retry later"),
    (
        KeyAccessDeniedError,
        "the key store refused to sign (the key is disabled, expired or being deleted, or the signer lacks rights "
        "or network access to it)",
    ),
    (BackendConfigError, "the key store configuration is wrong"),
    (BackendUnavailableError, "the signing key or its key store is not available"),
)


def caller_message(exc: BackendError, ref: str) -> str:
    """The gRPC status message for a backend failure: its kind and ``ref``, the reference
    of the log line (and audit record) that holds the details. Backend texts name key
    references, ARNs, vault URLs and endpoints; callers do not need them to decide whether
    to retry (the status code says that), and on-call staff find them by ``ref``."""
    summary = next((text for kind, text in _BACKEND_SUMMARIES if isinstance(exc, kind)), "the key store failed")
    return f"{summary} (ref {ref}; details in the signer's log)"


Work = Callable[[Profile, Any, dict[str, Any], float | None], Awaitable[Any]]


@dataclass(frozen=True)
class Snapshot:
    """What a request reads: one consistent configuration generation. ``calls`` counts the
    requests still running with it (a one-element list, changed only on the event loop), so
    a reload closes the audit file and backends it replaced only once they are done."""

    profiles: dict[str, Profile]
    audit: AuditLog
    calls: list[int] = field(default_factory=lambda: [0])


class ServiceState:
    """Holds the current :class:`Snapshot`; a reload replaces it in one assignment, so a
    request sees either the old or the new configuration, never a mix."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot


class SignerServicer:
    """Implements ``helseid.signer.v1.SignerService`` (see proto/.../signer.proto).

    Args:
        state: the current profiles and audit log (replaced as a whole on reload).
        executor: where blocking backend calls run, off the event loop (a backend with a
            ``sign_executor`` attribute, PKCS#11, gets its signatures run there instead).
        identify: finds the caller of a request (per listener: TLS certificate, Unix
            socket, or the configured insecure caller).
        clock: current time in seconds since the epoch.
    """

    def __init__(
        self,
        state: ServiceState,
        executor: Executor,
        identify: Identify,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._executor = executor
        self._identify = identify
        self._clock = clock

    async def _sign(self, key: SigningKey, header_b64: str, claims: dict[str, Any], deadline: float | None) -> str:
        data = signing_input(header_b64, json_b64(claims))
        if getattr(key.backend, "sign_on_event_loop", False):  # opt-in, PKCS#11 (docs/performance.md)
            jws = sign_input_now(key, data)
            if jws is not None:
                return jws
        loop = asyncio.get_running_loop()
        executor = getattr(key.backend, "sign_executor", None) or self._executor  # PKCS#11: its own thread
        return await loop.run_in_executor(executor, sign_input, key, data, deadline)

    async def _call(self, context: grpc.aio.ServicerContext, purpose: str, request: Any, work: Work) -> Any:
        started = time.perf_counter()
        record: dict[str, Any] = {"caller": None, "profile": None, "purpose": purpose}
        state = self._state.current  # one configuration generation for the whole request
        state.calls[0] += 1
        try:
            caller = self._identify(context)
            record["caller"] = caller.name if caller else None
            if isinstance(request, MalformedRequest):
                raise RequestError(
                    "request",
                    f"is not a valid {request.message_type} (malformed protobuf, or a string that is not UTF-8)",
                )
            if caller is not None:
                record["profile"] = check_profile_name(request.profile)
            check_caller_may_use(caller, request.profile)
            profile = state.profiles.get(request.profile)
            if profile is None:  # a reload in between removed it: as for any profile not allowed
                raise RequestError("profile", "is not a profile this caller may use", code="PERMISSION_DENIED")
            remaining = context.time_remaining()
            # Backends must give up a little BEFORE the caller does, so that the caller gets
            # this service's answer (UNAVAILABLE, RESOURCE_EXHAUSTED) instead of DEADLINE_EXCEEDED.
            deadline = None if remaining is None else time.monotonic() + remaining - min(0.5, 0.1 * remaining)
            response = await work(profile, request, record, deadline)
            record.update(outcome="signed" if "jti" in record else "answered", status="OK")
            self._write_audit(state, record, started)
            return response
        except AuditError as exc:
            log.error("refusing to answer without an audit record: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable; nothing was signed")
        except RequestError as exc:
            await self._refuse(context, state, record, started, "refused", exc.code, str(exc))
        except BackendError as exc:
            # The caller gets what kind of failure it was and a reference; key references,
            # ARNs, vault URLs and endpoints stay in the log and the audit record.
            ref = secrets.token_hex(4)
            log.warning("backend error in %s (ref %s): %s", purpose, ref, exc)
            record.update(ref=ref, backend_error=str(exc))
            await self._refuse(context, state, record, started, "failed", exc.grpc_code, caller_message(exc, ref))
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("internal error in %s (ref %s)", purpose, ref)
            record["ref"] = ref
            message = f"internal error (ref {ref}; details in the signer's log)"
            await self._refuse(context, state, record, started, "failed", "INTERNAL", message)
        finally:
            state.calls[0] -= 1
        raise AssertionError("unreachable")  # context.abort always raises

    def _write_audit(self, state: Snapshot, record: dict[str, Any], started: float) -> None:
        elapsed = time.perf_counter() - started
        record["latency_ms"] = round(elapsed * 1000, 3)
        # Only configured profile names become label values: callers cannot inflate the label set.
        profile = record["profile"] if record["profile"] in state.profiles else "-"
        metrics.REQUESTS.labels(
            profile, record["purpose"], record.get("alg", ""), record.get("backend", ""), record["status"]
        ).inc()
        metrics.REQUEST_SECONDS.labels(record["purpose"]).observe(elapsed)
        state.audit.write(record)

    async def _refuse(
        self, context: Any, state: Snapshot, record: dict, started: float, outcome: str, code: str, message: str
    ) -> None:
        record.update(outcome=outcome, status=code, error=message)
        try:
            self._write_audit(state, record, started)
        except AuditError as exc:  # the request is refused anyway; say so in the log
            log.error("audit record of a refusal not written: %s", exc)
        await context.abort(grpc.StatusCode[code], message)

    async def SignClientAssertion(self, request: Any, context: Any) -> pb.SignClientAssertionResponse:
        """Build and sign a client assertion (RFC 7523 section 3, HelseID profile)."""
        return await self._call(context, "client_assertion", request, self._sign_client_assertion)

    async def _sign_client_assertion(
        self, profile: Profile, request: pb.SignClientAssertionRequest, record: dict, deadline: float | None
    ) -> pb.SignClientAssertionResponse:
        s = profile.settings
        details = assertion_details(
            s.tenancy,
            s.allowed_organization_numbers,
            request.parent_organization_number,
            request.child_organization_number,
        )
        now = int(self._clock())
        jti = new_jti()
        claims = build_assertion_claims(s, now, jti, details)
        if details is not None:
            record["organization_numbers"] = [n for n in (request.parent_organization_number,
                                                          request.child_organization_number) if n]  # fmt: skip
        key = profile.assertion_keys.signing(now).get()
        jwt = await self._sign(key, key.assertion_header, claims, deadline)
        record.update(kid=key.kid, alg=key.alg.name, backend=key.backend.scheme, key_version=key.resolved.version)
        record.update(jti=jti, exp=claims["exp"])
        return pb.SignClientAssertionResponse(
            jwt=jwt, kid=key.kid, alg=key.alg.name, jti=jti, issued_at=now, expires_at=claims["exp"]
        )

    async def SignDpopProof(self, request: Any, context: Any) -> pb.SignDpopProofResponse:
        """Build and sign a DPoP proof (RFC 9449 section 4.2)."""
        return await self._call(context, "dpop_proof", request, self._sign_dpop_proof)

    async def _sign_dpop_proof(
        self, profile: Profile, request: pb.SignDpopProofRequest, record: dict, deadline: float | None
    ) -> pb.SignDpopProofResponse:
        htm = check_htm(request.htm)
        htu = profile.htu_policy.check(request.htu)
        record.update(htm=htm, htu=htu)
        nonce = check_nonce(request.nonce)
        ath = check_access_token_sha256(request.access_token_sha256)
        record.update(nonce_present=nonce is not None, ath_present=ath is not None)
        now = int(self._clock())
        jti = new_jti()
        claims = build_proof_claims(jti, htm, htu, now, nonce, ath)
        key = profile.dpop_slot.get()
        jwt = await self._sign(key, key.dpop_header, claims, deadline)
        record.update(kid=key.kid, alg=key.alg.name, backend=key.backend.scheme, key_version=key.resolved.version)
        record["jti"] = jti
        return pb.SignDpopProofResponse(jwt=jwt, jkt=key.kid, alg=key.alg.name, jti=jti, issued_at=now, htu=htu)

    async def GetClientProfile(self, request: Any, context: Any) -> pb.GetClientProfileResponse:
        """What a client library needs to run the token flow for a profile."""
        return await self._call(context, "client_profile", request, self._client_profile)

    async def _client_profile(self, p: Profile, request: Any, record: dict, deadline: float | None) -> Any:
        assertion_key = p.assertion_keys.signing(self._clock()).get()
        dpop_key = p.dpop_slot.get()
        return pb.GetClientProfileResponse(
            client_id=p.settings.client_id,
            issuer=p.settings.issuer,
            token_endpoint=p.token_endpoint,
            assertion_alg=assertion_key.alg.name,
            assertion_kid=assertion_key.kid,
            dpop_alg=dpop_key.alg.name,
            dpop_jkt=dpop_key.kid,
            assertion_lifetime_seconds=p.settings.assertion_lifetime,
        )

    async def GetKeySet(self, request: Any, context: Any) -> pb.GetKeySetResponse:
        """The public JWKS of the profile's client-assertion key(s), to register in HelseID."""
        return await self._call(context, "key_set", request, self._key_set)

    async def _key_set(self, p: Profile, request: Any, record: dict, deadline: float | None) -> Any:
        published = [(slot.get(), status, since, until) for slot, status, since, until in
                     p.assertion_keys.published(self._clock())]  # fmt: skip
        return pb.GetKeySetResponse(
            jwks_json=json.dumps({"keys": [key.published_jwk for key, *_ in published]}, separators=(",", ":")),
            keys=[
                pb.PublishedKey(
                    kid=key.kid,
                    alg=key.alg.name,
                    key_version=key.resolved.version,
                    status=pb.KeyStatus.Value(f"KEY_STATUS_{status}"),
                    active_from=int(since),
                    published_until=int(until),
                )
                for key, status, since, until in published
            ],
            refresh_hint_seconds=KEY_SET_REFRESH_HINT,
        )
