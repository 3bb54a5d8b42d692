"""The gRPC adapter of the signing core: ``helseid.signer.v1.SignerService``.

Each request passes, in order (:meth:`SignerServicer._call`):

1. parsing (a request that does not parse gets INVALID_ARGUMENT, not UNKNOWN; checked
   after admission);
2. admission, before any other work: the caller's identity (UNAUTHENTICATED when
   unknown), its rate limit and its requests in flight (RESOURCE_EXHAUSTED); then whether
   it may use the profile (PERMISSION_DENIED, same message whether the profile exists or
   not);
3. the signing core (:mod:`.signing`): the profile's rules for the request fields
   (INVALID_ARGUMENT when malformed, PERMISSION_DENIED when well-formed but not allowed),
   the claims and the key;
4. signing in the key's backend, bounded by the caller's deadline;
5. the audit record - with ``fail_closed`` a JWS is returned only once it is written (with
   ``fsync`` or to stdout on the audit log's writer thread); refusals are counted into bounded
   records (:class:`~.audit.RefusalCounter`) and never wait for the file.

Errors map to gRPC status codes through :func:`~.errors.refusal`, the one table every
adapter uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc

from helseid_signer_client.proto import signer_pb2 as pb

from . import metrics, signing
from .audit import AuditError
from .backends.base import BackendError, WatchedExecutor
from .claims import check_profile_name
from .drain import CallTracker
from .errors import RequestError, refusal
from .identity import Identify, certificate_fingerprint
from .policy import InFlight, admit, check_caller_may_use
from .runtime import ServiceState, Snapshot
from .signing import Profile, Signable

log = logging.getLogger("helseid_signer.service")
SERVICE = pb.DESCRIPTOR.services_by_name["SignerService"]


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


Work = Callable[[Profile, Any, dict[str, Any], float | None], Awaitable[Any]]


class SignerServicer:
    """Implements ``helseid.signer.v1.SignerService`` (see proto/.../signer.proto).

    Args:
        state: the current profiles and audit log (replaced as a whole on reload).
        executor: where blocking backend calls run, off the event loop (a key whose backend
            has a thread of its own, ``SigningKey.executor`` (PKCS#11), signs there instead).
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
        self._in_flight = InFlight()

    async def _sign(self, signable: Signable, deadline: float | None) -> str:
        key = signable.key
        if key.signs_on_event_loop:  # opt-in, PKCS#11 (docs/performance.md)
            jws = signing.sign_now(signable)
            if jws is not None:
                return jws
        executor = key.executor or self._executor
        if key.call_timeout is not None and isinstance(executor, WatchedExecutor):
            # A call into a hung module cannot be cancelled: the request gets UNAVAILABLE in
            # time (clients retry it on another replica) instead of DEADLINE_EXCEEDED, and
            # nothing more queues behind a call that has run past call_timeout.
            return await executor.call(key.call_timeout, deadline, signing.sign, signable, deadline)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, signing.sign, signable, deadline)

    async def _call(self, context: grpc.aio.ServicerContext, purpose: str, request: Any, work: Work) -> Any:
        started = time.perf_counter()
        record: dict[str, Any] = {"caller": None, "profile": None, "purpose": purpose}
        state = self._state.current  # one configuration generation for the whole request
        # Admission first (identity, rate, requests in flight): a request refused here costs
        # no parsing, no signing, and at most a count in the audit trail (audit.RefusalCounter).
        try:
            caller = self._identify(context)
            record["caller"] = caller.name if caller else None
            if certificate := certificate_fingerprint(context):  # which certificate, not only whose name
                record["certificate"] = certificate
            caller = admit(caller)
            self._in_flight.enter(caller)
        except RequestError as exc:
            await self._refuse(context, state, record, started, refusal(exc))
            raise AssertionError("unreachable") from None  # context.abort always raises
        except Exception as exc:  # e.g. a certificate that does not parse
            ref = secrets.token_hex(4)
            log.exception("internal error identifying the caller of %s (ref %s)", purpose, ref)
            record["ref"] = ref
            await self._refuse(context, state, record, started, refusal(exc, ref))
            raise AssertionError("unreachable") from None
        state.calls[0] += 1
        try:
            if isinstance(request, MalformedRequest):
                raise RequestError(
                    "request",
                    f"is not a valid {request.message_type} (malformed protobuf, or a string that is not UTF-8)",
                )
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
            self._count(state, record, started)
            await state.audit.write_async(record)  # the answer waits for its record
            return response
        except AuditError as exc:
            log.error("refusing to answer without an audit record: %s", exc)
            answer = refusal(exc)
            await context.abort(grpc.StatusCode[answer.code], answer.message)
        except RequestError as exc:
            await self._refuse(context, state, record, started, refusal(exc))
        except BackendError as exc:
            # The caller gets what kind of failure it was and a reference; key references,
            # ARNs, vault URLs and endpoints stay in the log and the audit record.
            ref = secrets.token_hex(4)
            log.warning("backend error in %s (ref %s): %s", purpose, ref, exc)
            record.update(ref=ref, backend_error=str(exc))
            await self._refuse(context, state, record, started, refusal(exc, ref))
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.exception("internal error in %s (ref %s)", purpose, ref)
            record["ref"] = ref
            await self._refuse(context, state, record, started, refusal(exc, ref))
        finally:
            state.calls[0] -= 1
            self._in_flight.leave(caller)
        raise AssertionError("unreachable")  # context.abort always raises

    @staticmethod
    def _count(state: Snapshot, record: dict[str, Any], started: float) -> None:
        elapsed = time.perf_counter() - started
        record["latency_ms"] = round(elapsed * 1000, 3)
        # Only configured profile names become label values: callers cannot inflate the label set.
        profile = record["profile"] if record["profile"] in state.profiles else "-"
        metrics.REQUESTS.labels(
            profile, record["purpose"], record.get("alg", ""), record.get("backend", ""), record["status"]
        ).inc()
        metrics.REQUEST_SECONDS.labels(record["purpose"]).observe(elapsed)

    async def _refuse(self, context: Any, state: Snapshot, record: dict, started: float, answer: Any) -> None:
        record.update(outcome=answer.outcome, status=answer.code, error=answer.message)
        # Per caller, so an operator sees who hit a rate limit. record["caller"] comes from the
        # identifier, which returns configured callers only: the label set stays bounded.
        metrics.CALLER_REFUSALS.labels(record["caller"] or "-", answer.code).inc()
        self._count(state, record, started)
        # A refusal is counted, not each written: only the first of its kind in an interval
        # gets a record of its own (audit.RefusalCounter), so a flood of refusals cannot fill
        # the audit volume. A failure (backend, internal) keeps its own record: its ref is
        # what the caller was told.
        records = state.audit.refusals.note(record) if answer.outcome == "refused" else [record]
        try:
            for entry in records:
                await state.audit.write_async(entry)  # off the event loop
        except AuditError as exc:  # the request is refused anyway; say so in the log
            log.error("audit record of a refusal not written: %s", exc)
        await context.abort(grpc.StatusCode[answer.code], answer.message)

    async def SignClientAssertion(self, request: Any, context: Any) -> pb.SignClientAssertionResponse:
        """Build and sign a client assertion (RFC 7523 section 3, HelseID profile)."""
        return await self._call(context, "client_assertion", request, self._sign_client_assertion)

    async def _sign_client_assertion(
        self, profile: Profile, request: pb.SignClientAssertionRequest, record: dict, deadline: float | None
    ) -> pb.SignClientAssertionResponse:
        def build() -> Signable:
            return signing.client_assertion(
                profile,
                request.parent_organization_number,
                request.child_organization_number,
                int(self._clock()),
                record,
                request.avoid_kid,
            )

        arrived = time.monotonic()
        try:
            signable = build()
        except signing.NoOtherKeyError:
            # HelseID refused the caller's assertion and this replica knows no other key that
            # may sign: a registration may have been recorded since the last health check, so
            # the records are read once more (concurrent requests share one read) before refusing.
            book = profile.assertion_keys.book
            if book is None:
                metrics.ASSERTION_KEY_RETRIES.labels(profile.name, "FAILED_PRECONDITION").inc()
                raise
            await asyncio.get_running_loop().run_in_executor(self._executor, book.refresh_since, arrived)
            try:
                signable = build()
            except signing.NoOtherKeyError:
                metrics.ASSERTION_KEY_RETRIES.labels(profile.name, "FAILED_PRECONDITION").inc()
                raise
        if request.avoid_kid:
            metrics.ASSERTION_KEY_RETRIES.labels(profile.name, "OK").inc()
        jwt = await self._sign(signable, deadline)
        record.update(signable.signed_facts)
        key = signable.key
        return pb.SignClientAssertionResponse(
            jwt=jwt,
            kid=key.kid,
            alg=key.alg.name,
            jti=signable.jti,
            issued_at=signable.issued_at,
            expires_at=signable.expires_at,
        )

    async def SignDpopProof(self, request: Any, context: Any) -> pb.SignDpopProofResponse:
        """Build and sign a DPoP proof (RFC 9449 section 4.2)."""
        return await self._call(context, "dpop_proof", request, self._sign_dpop_proof)

    async def _sign_dpop_proof(
        self, profile: Profile, request: pb.SignDpopProofRequest, record: dict, deadline: float | None
    ) -> pb.SignDpopProofResponse:
        signable = signing.dpop_proof(
            profile,
            request.htm,
            request.htu,
            request.nonce,
            request.access_token_sha256,
            int(self._clock()),
            record,
        )
        jwt = await self._sign(signable, deadline)
        record.update(signable.signed_facts)
        key = signable.key
        return pb.SignDpopProofResponse(
            jwt=jwt, jkt=key.kid, alg=key.alg.name, jti=signable.jti, issued_at=signable.issued_at, htu=signable.htu
        )

    async def GetClientProfile(self, request: Any, context: Any) -> pb.GetClientProfileResponse:
        """What a client library needs to run the token flow for a profile."""
        return await self._call(context, "client_profile", request, self._client_profile)

    async def _client_profile(self, p: Profile, request: Any, record: dict, deadline: float | None) -> Any:
        info = signing.profile_info(p, self._clock())
        return pb.GetClientProfileResponse(**dataclasses.asdict(info))

    async def GetKeySet(self, request: Any, context: Any) -> pb.GetKeySetResponse:
        """The public JWKS of the profile's client-assertion key(s), to register in HelseID."""
        return await self._call(context, "key_set", request, self._key_set)

    async def _key_set(self, p: Profile, request: Any, record: dict, deadline: float | None) -> Any:
        jwks, published = signing.key_set(p, self._clock())
        return pb.GetKeySetResponse(
            jwks_json=jwks,
            keys=[
                pb.PublishedKey(
                    kid=entry.key.kid,
                    alg=entry.key.alg.name,
                    key_version=entry.key.version,
                    status=pb.KeyStatus.Value(f"KEY_STATUS_{entry.status}"),
                    active_from=int(entry.active_from),
                    published_until=int(entry.published_until),
                )
                for entry in published
            ],
            refresh_hint_seconds=signing.KEY_SET_REFRESH_HINT,
        )
