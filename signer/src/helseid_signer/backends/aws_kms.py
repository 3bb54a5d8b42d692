"""AWS KMS backend (boto3): asymmetric ``SIGN_VERIFY`` keys in AWS KMS.

Key references: ``awskms:`` followed by a key ARN
(``awskms:arn:aws:kms:eu-north-1:111122223333:key/1234abcd-...``), a key id
(``awskms:1234abcd-12ab-34cd-56ef-1234567890ab``), an alias name (``awskms:alias/deft-assertion``)
or an alias ARN (``awskms:arn:aws:kms:eu-north-1:111122223333:alias/deft-assertion``).

Credentials and region come from boto3's standard chain (environment, shared config and
profile, container and instance roles, IRSA web identity); ``region`` and ``endpoint_url``
(a local endpoint, or a VPC interface endpoint) may be set in ``[backends.awskms]``.

Pinning (bug-kinds 12): AWS asymmetric keys have no versions; operators rotate by making
a new key and often by moving an alias. :meth:`AwsKmsBackend.resolve` turns any reference
into the key's ARN once, at start-up; every ``Sign`` names that ARN, never the alias, and
``kid`` is the thumbprint of that ARN's public key. An alias moved later never starts
signing by itself (HelseID would answer ``invalid_client`` for a key it has not
registered): :meth:`AwsKmsBackend.check_pinning` tells when it has moved, and logs it.

Signing (bug-kinds 1, 5, 6): always ``MessageType=DIGEST`` with the SHA-2 digest of the
JWS signing input, so the input's size never matters (KMS refuses RAW messages over 4096
bytes). The ``SigningAlgorithm`` comes from this table, never from the key:

=====  ===========================  =====  ===========================
alg    KMS SigningAlgorithm         alg    KMS SigningAlgorithm
=====  ===========================  =====  ===========================
RS256  RSASSA_PKCS1_V1_5_SHA_256    PS256  RSASSA_PSS_SHA_256
RS384  RSASSA_PKCS1_V1_5_SHA_384    PS384  RSASSA_PSS_SHA_384
RS512  RSASSA_PKCS1_V1_5_SHA_512    PS512  RSASSA_PSS_SHA_512
ES256  ECDSA_SHA_256                ES384  ECDSA_SHA_384
ES512  ECDSA_SHA_512
=====  ===========================  =====  ===========================

KMS's PSS uses MGF1 with the same hash and salt = hash length, as JOSE does. KMS returns
ECDSA signatures as DER; they are converted to fixed-width ``R || S`` here.

Errors and deadlines (bug-kinds 24): botocore's own retry machinery (``standard`` or
``adaptive`` mode, ``max_attempts``) retries throttling, 5xx and connection errors. Each
call runs on a small thread pool and the caller waits at most until its ``deadline``
(``time.monotonic()`` seconds): it never waits beyond it, however long a retry backoff,
a connect or a read would take; once the deadline has passed, two botocore event hooks
stop that call's further retries and sends. Mapping (error shapes as botocore's service
model names them; AWS KMS API Reference for their statuses), each with a message naming
the cause and the fix:

* ``ThrottlingException`` (400, retried by botocore) -> BackendThrottledError
  (RESOURCE_EXHAUSTED);
* ``AccessDeniedException`` (400) -> KeyAccessDeniedError (FAILED_PRECONDITION), saying
  whether an explicit Deny, the key policy or the IAM policy is the cause;
* ``DisabledException`` (409) and ``KMSInvalidStateException`` (409; the state - pending
  deletion, pending import, ... - read from KMS's message) -> KeyAccessDeniedError
  (FAILED_PRECONDITION) with the command that fixes that state;
* ``KeyUnavailableException`` (500, retried by botocore: "You can retry the request") ->
  BackendUnavailableError (UNAVAILABLE), naming the custom key store;
* rejected credentials -> KeyAccessDeniedError; unreachable endpoint, other 5xx, no answer
  within the deadline -> BackendUnavailableError (UNAVAILABLE); unknown key -> KeyNotFoundError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pydantic import Field, field_validator

from .. import metrics
from ..algorithms import P256, P384, P521, Algorithm, AlgorithmError, Curve, KeyType, PublicKey
from ..jwt import der_to_raw
from ..settings_types import BackendSettings, check_endpoint_url
from .base import (
    KEY_SPECS,
    BackendConfigError,
    BackendError,
    BackendThrottledError,
    BackendUnavailableError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    ResolvedKey,
)

log = logging.getLogger("helseid_signer.backends.aws_kms")

#: JWS alg -> KMS SigningAlgorithm (the table in the module docstring).
KMS_SIGNING_ALGORITHMS: dict[str, str] = {
    "RS256": "RSASSA_PKCS1_V1_5_SHA_256",
    "RS384": "RSASSA_PKCS1_V1_5_SHA_384",
    "RS512": "RSASSA_PKCS1_V1_5_SHA_512",
    "PS256": "RSASSA_PSS_SHA_256",
    "PS384": "RSASSA_PSS_SHA_384",
    "PS512": "RSASSA_PSS_SHA_512",
    "ES256": "ECDSA_SHA_256",
    "ES384": "ECDSA_SHA_384",
    "ES512": "ECDSA_SHA_512",
}

#: KMS KeySpec -> (key type, RSA bits or EC curve): the only specs this backend uses.
KMS_KEY_SPECS: dict[str, tuple[KeyType, int | Curve]] = {
    "RSA_2048": (KeyType.RSA, 2048),
    "RSA_3072": (KeyType.RSA, 3072),
    "RSA_4096": (KeyType.RSA, 4096),
    "ECC_NIST_P256": (KeyType.EC, P256),
    "ECC_NIST_P384": (KeyType.EC, P384),
    "ECC_NIST_P521": (KeyType.EC, P521),
}

#: ``keys create --spec`` value -> KMS KeySpec.
CREATE_SPECS: dict[str, str] = {
    "RSA-2048": "RSA_2048",
    "RSA-3072": "RSA_3072",
    "RSA-4096": "RSA_4096",
    "EC-P256": "ECC_NIST_P256",
    "EC-P384": "ECC_NIST_P384",
    "EC-P521": "ECC_NIST_P521",
}

#: Error codes botocore's retry machinery treats as throttling (botocore.retries.standard).
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
    }
)
#: KMS key state -> what the operator does about it (KMS Developer Guide, "Key states of
#: AWS KMS keys"). Used when DescribeKey or an error message names the state.
KEY_STATE_HINTS: dict[str, str] = {
    "Disabled": "enable it (aws kms enable-key) or configure another key",
    "PendingDeletion": (
        "it is scheduled for deletion: cancel the deletion (aws kms cancel-key-deletion), then enable it "
        "(aws kms enable-key; a cancelled key stays Disabled) - or configure another key"
    ),
    "PendingReplicaDeletion": "this multi-Region replica is scheduled for deletion: cancel it or configure another key",
    "PendingImport": "its key material has not been imported (or has expired): import it, or configure another key",
    "Unavailable": (
        "its custom key store is disconnected: reconnect it (aws kms connect-custom-key-store) and check the "
        "CloudHSM cluster or external key store proxy"
    ),
    "Creating": "it is still being created: wait, then retry",
    "Updating": "it is being updated: wait, then retry",
}
#: The words KMS uses for a key state in its error messages ("<ARN> is pending deletion.").
_STATE_WORDS = {
    "pending deletion": "PendingDeletion",
    "pending replica deletion": "PendingReplicaDeletion",
    "pending import": "PendingImport",
    "unavailable": "Unavailable",
    "disabled": "Disabled",
    "creating": "Creating",
    "updating": "Updating",
}
_CREDENTIAL_CODES = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "IncompleteSignature",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
}
_TRANSIENT_CODES = {"KMSInternalException", "DependencyTimeoutException", "InternalFailure", "ServiceUnavailable"}

_ARN_RE = re.compile(r"arn:(aws[a-z-]*):kms:([a-z0-9-]+):([0-9]{12}):(key|alias)/(.+)")
_KEY_ID_RE = re.compile(r"(mrk-)?[0-9a-fA-F-]{32,36}")
_ALIAS_RE = re.compile(r"alias/[A-Za-z0-9/_-]{1,250}")


@dataclass(frozen=True)
class KmsRef:
    """A parsed ``awskms:`` key reference.

    Attributes:
        key_id: what KMS is asked about (key ARN, key id, alias name or alias ARN).
        alias: the alias name (``alias/...``) when the reference is an alias, else None.
        region: the region an ARN names, else None.
    """

    key_id: str
    alias: str | None
    region: str | None

    @classmethod
    def parse(cls, uri: str) -> KmsRef:
        """Parse ``uri``; BackendConfigError naming the accepted forms if it is none of them."""
        if not uri.startswith("awskms:"):
            raise BackendConfigError(f"{uri!r} is not an awskms: key reference")
        ref = uri[len("awskms:") :]
        arn = _ARN_RE.fullmatch(ref)
        if arn:
            kind, rest = arn.group(4), arn.group(5)
            if kind == "key" and _KEY_ID_RE.fullmatch(rest):
                return cls(ref, None, arn.group(2))
            if kind == "alias" and _ALIAS_RE.fullmatch("alias/" + rest):
                return cls(ref, "alias/" + rest, arn.group(2))
        elif _ALIAS_RE.fullmatch(ref):
            return cls(ref, ref, None)
        elif _KEY_ID_RE.fullmatch(ref):
            return cls(ref, None, None)
        raise BackendConfigError(
            f"key reference {uri!r}: after awskms: give a key ARN, a key id, alias/NAME or an alias ARN"
        )


@dataclass(frozen=True)
class KmsKey:
    """What :meth:`AwsKmsBackend.resolve` pinned (the ResolvedKey's ``handle``).

    Attributes:
        arn: the key ARN every Sign names.
        alias: the alias the reference named (``alias/...``), or None.
        key_spec: the KMS KeySpec (``RSA_2048`` ... ``ECC_NIST_P521``).
        signing_algorithms: the KMS SigningAlgorithms the key allows.
        origin: where the key material came from (``AWS_KMS``, ``AWS_CLOUDHSM``,
            ``EXTERNAL`` = imported, ``EXTERNAL_KEY_STORE``).
        multi_region: a multi-Region key (replicas in other Regions hold the same material).
    """

    arn: str
    alias: str | None
    key_spec: str
    signing_algorithms: tuple[str, ...]
    origin: str = "AWS_KMS"
    multi_region: bool = False


#: KMS key Origin -> why a key of that origin is weaker custody than a key made in KMS.
_ORIGIN_WARNINGS = {
    "EXTERNAL": "key material was imported into KMS (Origin EXTERNAL): a copy existed outside KMS",
    "EXTERNAL_KEY_STORE": "key material is held in an external key store outside AWS (Origin EXTERNAL_KEY_STORE)",
}


class _Abandoned(Exception):
    """Raised inside a call whose caller has stopped waiting (deadline passed)."""


@dataclass
class _Call:
    """Per-call state shared by the waiting caller and the pool thread that runs it."""

    deadline: float | None
    abandoned: bool = False
    sends: int = 0
    last_error: str | None = None

    def expired(self) -> bool:
        return self.abandoned or (self.deadline is not None and time.monotonic() >= self.deadline)


class AwsKmsSettings(BackendSettings):
    """``[backends.awskms]``: the AWS KMS client. Credentials never stand here: boto3's
    standard chain finds them (environment, profile, instance or pod role). ``region``
    defaults to that chain's (``AWS_DEFAULT_REGION``, the profile), then ``AWS_REGION``;
    ``endpoint_url``: a VPC interface endpoint or a local test endpoint (https; http only
    on loopback). ``retry_mode`` and
    ``max_attempts`` (first attempt included) drive botocore's retries, always bounded by
    the caller's deadline; timeouts are seconds per attempt. See docs/backends/aws-kms.md.
    """

    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")] | None = None
    endpoint_url: str | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: Annotated[int, Field(ge=1, le=10, strict=True)] = 3
    connect_timeout: Annotated[float, Field(gt=0, le=60)] = 2.0
    read_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)


class AwsKmsBackend:
    """Keys in AWS KMS. See the module docstring for references, pinning, algorithms, errors.

    Args:
        region: AWS region; None takes it from boto3's chain (``AWS_DEFAULT_REGION``, the
            profile), else from ``AWS_REGION``.
        endpoint_url: KMS endpoint URL (a VPC interface endpoint, or a local test endpoint);
            None: the region's public endpoint (or ``AWS_ENDPOINT_URL_KMS``).
        retry_mode: botocore retry mode, ``standard`` or ``adaptive`` (client-side rate
            limiting on throttling).
        max_attempts: total attempts per call, the first included (botocore's ``total_max_attempts``).
        connect_timeout, read_timeout: seconds per attempt (botocore).
        max_concurrency: calls in flight at once (thread pool and HTTP connection pool size).

    Raises BackendConfigError when no region can be found.
    """

    scheme: ClassVar[str] = "awskms"
    Settings: ClassVar[type[BackendSettings]] = AwsKmsSettings

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        retry_mode: Literal["standard", "adaptive"] = "standard",
        max_attempts: int = 3,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_concurrency: int = 32,
    ) -> None:
        config = Config(
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_concurrency,
            user_agent_extra="helseid-signer",
        )
        # botocore's chain reads AWS_DEFAULT_REGION and the profile; AWS_REGION (set by most
        # AWS runtimes and the newer SDKs) is the last resort.
        for name in (region, os.environ.get("AWS_REGION")):
            try:
                self._client: Any = boto3.session.Session().client(
                    "kms", region_name=name or region, endpoint_url=endpoint_url, config=config
                )
                break
            except NoRegionError:
                continue
        else:
            raise BackendConfigError(
                "AWS KMS: no region: set region in [backends.awskms], or AWS_DEFAULT_REGION (or AWS_REGION) "
                "in the environment"
            )
        self.region: str = self._client.meta.region_name
        self.endpoint_url: str = self._client.meta.endpoint_url
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="awskms")
        self._local = threading.local()
        self._healthy = True
        self._drift: dict[str, str] = {}
        events = self._client.meta.events
        events.register_first("before-send.kms", self._before_send)
        events.register_first("needs-retry.kms", self._needs_retry)

    # -- calls, deadlines, error mapping ----------------------------------------------

    def _before_send(self, **_: Any) -> None:
        call: _Call | None = getattr(self._local, "call", None)
        if call is not None:
            if call.expired():
                raise _Abandoned()
            call.sends += 1
            if call.sends > 1:
                metrics.BACKEND_RETRIES.labels(self.scheme).inc()

    def _needs_retry(self, response: Any = None, caught_exception: Any = None, **_: Any) -> bool | None:
        """First needs-retry handler: note the attempt's error; veto any retry once the
        caller's deadline has passed (False stops botocore; None lets its policy decide)."""
        call: _Call | None = getattr(self._local, "call", None)
        if call is None:
            return None
        if caught_exception is not None and not isinstance(caught_exception, _Abandoned):
            call.last_error = type(caught_exception).__name__
        elif response is not None:
            call.last_error = response[1].get("Error", {}).get("Code") or call.last_error
            if call.last_error in THROTTLING_CODES:
                metrics.BACKEND_THROTTLED.labels(self.scheme).inc()
        return False if call.expired() else None

    def _run(self, call: _Call, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        self._local.call = call
        try:
            return getattr(self._client, operation)(**params)
        finally:
            self._local.call = None

    def _call(self, operation: str, what: str, deadline: float | None, **params: Any) -> dict[str, Any]:
        """Run one KMS operation with botocore's retries, waiting at most until ``deadline``."""
        call = _Call(deadline)
        if call.expired():
            raise BackendUnavailableError(f"AWS KMS {what}: the caller's deadline passed before the request was sent")
        future = self._executor.submit(self._run, call, operation, params)
        try:
            result = future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except (FutureTimeoutError, _Abandoned):
            call.abandoned = True
            error = self._deadline_error(what, call)
        except (ClientError, BotoCoreError) as exc:
            error = self._map_error(exc, what)
            error.__cause__ = exc
        else:
            self._healthy = True
            return result
        if isinstance(error, BackendUnavailableError):
            self._healthy = False
        raise error

    @staticmethod
    def _deadline_error(what: str, call: _Call) -> BackendError:
        tried = f"{call.sends} attempt(s)"
        if call.last_error in THROTTLING_CODES:
            return BackendThrottledError(f"AWS KMS throttled {what} ({call.last_error}); {tried} within the deadline")
        last = f", last error {call.last_error}" if call.last_error else ""
        return BackendUnavailableError(f"AWS KMS did not answer {what} within the caller's deadline ({tried}{last})")

    def _map_error(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            message = error.get("Message", "")
            attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in THROTTLING_CODES:
                return BackendThrottledError(f"AWS KMS throttled {what} ({code}) after {attempts} attempt(s)")
            if code == "AccessDeniedException":
                return KeyAccessDeniedError(f"AWS KMS denied {what}: {_access_denied_cause(message)} ({message})")
            if code == "DisabledException":
                return KeyAccessDeniedError(
                    f"AWS KMS {what}: the key is disabled (DisabledException); {KEY_STATE_HINTS['Disabled']} "
                    f"({message})"
                )
            if code == "KMSInvalidStateException":
                state = _state_in(message)
                hint = (
                    f"the key is in state {state}; {KEY_STATE_HINTS[state]}"
                    if state
                    else "the key's state does not allow this operation (for a key in a custom key store: a "
                    "failure of that key store); see the message and aws kms describe-key"
                )
                return KeyAccessDeniedError(f"AWS KMS {what}: {hint} (KMSInvalidStateException: {message})")
            if code == "KeyUnavailableException":
                return BackendUnavailableError(
                    f"AWS KMS {what}: the key is unavailable (KeyUnavailableException) after {attempts} attempt(s); "
                    "KMS cannot reach its key material now - for a key in a custom key store, the CloudHSM cluster "
                    "or external key store proxy is disconnected or failing (aws kms describe-custom-key-stores). "
                    f"Retrying later may work ({message})"
                )
            if code in _CREDENTIAL_CODES:
                return KeyAccessDeniedError(f"AWS rejected the service's credentials for {what} ({code}: {message})")
            if code == "NotFoundException":
                return KeyNotFoundError(f"AWS KMS {what}: no such key or alias in region {self.region} ({message})")
            if code == "InvalidKeyUsageException":
                return BackendConfigError(f"AWS KMS {what}: the key is not a SIGN_VERIFY key ({message})")
            if code in _TRANSIENT_CODES or status >= 500:
                return BackendUnavailableError(
                    f"AWS KMS failed {what} ({code or status}) after {attempts} attempt(s): {message}"
                )
            return BackendError(f"AWS KMS refused {what} ({code}: {message})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return BackendConfigError(
                f"AWS KMS {what}: no usable AWS credentials (environment, profile, instance or pod role): {exc}"
            )
        if isinstance(exc, ConnectionError | HTTPClientError | CredentialRetrievalError):
            return BackendUnavailableError(f"AWS KMS unreachable at {self.endpoint_url} for {what}: {exc}")
        return BackendError(f"AWS KMS {what}: {type(exc).__name__}: {exc}")

    # -- KeyBackend ---------------------------------------------------------------------

    def resolve(self, uri: str, deadline: float | None = None) -> ResolvedKey:
        """Pin ``uri`` to its key ARN (DescribeKey) and fetch that key's public key (GetPublicKey).

        Refuses (BackendConfigError) a key that is not ``SIGN_VERIFY``, whose KeySpec is not
        RSA 2048/3072/4096 or NIST P-256/384/521, or an ARN in another region; a key that is
        not Enabled gives KeyAccessDeniedError. KMS unreachable: BackendUnavailableError.
        """
        ref = KmsRef.parse(uri)
        if ref.region is not None and ref.region != self.region:
            raise BackendConfigError(f"{uri}: the ARN is in region {ref.region}, the awskms backend uses {self.region}")
        meta = self._call("describe_key", f"DescribeKey {ref.key_id}", deadline, KeyId=ref.key_id)["KeyMetadata"]
        arn = meta["Arn"]
        if meta.get("KeyUsage") != "SIGN_VERIFY":
            raise BackendConfigError(f"{uri}: key {arn} has KeyUsage {meta.get('KeyUsage')}, not SIGN_VERIFY")
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec", "")
        if spec not in KMS_KEY_SPECS:
            raise BackendConfigError(
                f"{uri}: key {arn} has KeySpec {spec}; HelseID keys must be one of {', '.join(KMS_KEY_SPECS)}"
            )
        if meta.get("KeyState") != "Enabled":
            state = str(meta.get("KeyState"))
            hint = KEY_STATE_HINTS.get(state, "see aws kms describe-key")
            when = f" (deletion date {meta['DeletionDate']})" if meta.get("DeletionDate") else ""
            raise KeyAccessDeniedError(f"{uri}: key {arn} is {state}{when}, not Enabled; {hint}")
        public_der = self._call("get_public_key", f"GetPublicKey {arn}", deadline, KeyId=arn)["PublicKey"]
        public_key = _load_public_key(public_der, spec, arn)
        if ref.alias:
            log.info("%s pinned to key %s", uri, arn)
        handle = KmsKey(
            arn=arn,
            alias=ref.alias,
            key_spec=spec,
            signing_algorithms=tuple(meta["SigningAlgorithms"]),
            origin=str(meta.get("Origin") or "unknown"),
            multi_region=bool(meta.get("MultiRegion")),
        )
        return ResolvedKey(uri=uri, version=arn, public_key=public_key, handle=handle)

    def custody_warning(self, key: ResolvedKey) -> str | None:
        """:class:`~.base.CustodyReporter`: the key's ``Origin`` and ``MultiRegion`` as
        DescribeKey gave them at resolve. A key generated in KMS (``AWS_KMS``) or in a CloudHSM
        key store (``AWS_CLOUDHSM``) is never exportable: no warning. Imported material
        (``EXTERNAL``), an external key store, or a multi-Region key (the same private key in
        other Regions, each replica under its own key policy) get one."""
        handle: KmsKey = key.handle
        problems = []
        if handle.origin in _ORIGIN_WARNINGS:
            problems.append(_ORIGIN_WARNINGS[handle.origin])
        elif handle.origin not in ("AWS_KMS", "AWS_CLOUDHSM"):
            problems.append(f"key origin {handle.origin!r} is not one this service knows to be non-exportable")
        if handle.multi_region:
            problems.append("multi-Region key: replicas in other Regions hold the same private key")
        return "; ".join(problems) or None

    def check_alg(self, key: ResolvedKey, alg: Algorithm) -> None:
        """Optional capability (see base.py): refuse ``alg`` when the pinned key's KMS
        SigningAlgorithms do not include the one it maps to. No KMS call (uses what
        :meth:`resolve` read). Raises AlgorithmError."""
        handle: KmsKey = key.handle
        wanted = KMS_SIGNING_ALGORITHMS[alg.name]
        if wanted not in handle.signing_algorithms:
            raise AlgorithmError(
                f"alg {alg.name} needs KMS signing algorithm {wanted}; key {handle.arn} ({handle.key_spec}) "
                f"allows only {', '.join(handle.signing_algorithms) or 'none'}"
            )

    def sign(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes, deadline: float | None = None) -> bytes:
        """Sign the digest of ``signing_input`` with the pinned key ARN (MessageType=DIGEST),
        within ``deadline``; return the JOSE signature (ECDSA converted to ``R || S``)."""
        handle: KmsKey = key.handle
        algorithm = KMS_SIGNING_ALGORITHMS[alg.name]
        digest = hashlib.new(alg.hash_name, signing_input).digest()
        answer = self._call(
            "sign",
            f"Sign with {handle.arn}",
            deadline,
            KeyId=handle.arn,
            Message=digest,
            MessageType="DIGEST",
            SigningAlgorithm=algorithm,
        )
        if answer.get("KeyId", handle.arn) != handle.arn or answer.get("SigningAlgorithm", algorithm) != algorithm:
            raise BackendError(
                f"AWS KMS signed with {answer.get('KeyId')} / {answer.get('SigningAlgorithm')}, "
                f"{handle.arn} / {algorithm} was asked for"
            )
        signature: bytes = answer["Signature"]
        if alg.curve is not None:
            try:
                return der_to_raw(signature, alg.curve)
            except ValueError as exc:
                raise BackendError(f"AWS KMS returned a malformed ECDSA signature: {exc}") from exc
        expected = (key.public_key.key_size + 7) // 8
        if len(signature) != expected:
            raise BackendError(f"AWS KMS returned a {len(signature)}-byte RSA signature, {expected} expected")
        return signature

    def drift_message(self, key: ResolvedKey, deadline: float | None = None) -> str | None:
        """:class:`~.base.DriftReporter`: see :meth:`check_pinning`."""
        return self.check_pinning(key, deadline)

    def check_pinning(self, key: ResolvedKey, deadline: float | None = None) -> str | None:
        """For a key configured by alias: ask KMS where the alias points now. If it points
        to another key, log a warning and return a message for health detail; the pinned
        ARN keeps signing until the configuration changes. None when nothing moved (or the
        key was configured by ARN or id). Raises BackendError subclasses (e.g. the alias
        was deleted: KeyNotFoundError)."""
        handle: KmsKey = key.handle
        if handle.alias is None:
            return None
        current = self._call("describe_key", f"DescribeKey {handle.alias}", deadline, KeyId=handle.alias)
        now = current["KeyMetadata"]["Arn"]
        if now == handle.arn:
            self._drift.pop(key.uri, None)
            return None
        message = (
            f"{key.uri} now points to {now}, but {handle.arn} (pinned at start-up) keeps signing; "
            "register the new key in HelseID and change the configuration to switch"
        )
        if self._drift.get(key.uri) != message:
            log.warning(message)
        self._drift[key.uri] = message
        return message

    @property
    def pinning_drift(self) -> dict[str, str]:
        """Key reference -> message, for every alias that :meth:`check_pinning` last found moved."""
        return dict(self._drift)

    # -- RegistrationStore ------------------------------------------------------------------

    def registration_place(self, key: ResolvedKey, kid: str) -> str:
        """:class:`~.base.RegistrationStore`: the tags' description."""
        return f"AWS KMS key {key.version}, tags {REGISTRATION_TAG_PREFIX}*"

    def read_registration(self, key: ResolvedKey, kid: str) -> str | None:
        """:class:`~.base.RegistrationStore`: the record from the key's tags
        ``helseid-signer:registration:<field>`` (``ListResourceTags``, every page; the
        service's identity needs ``kms:ListResourceTags``), as JSON; None without a ``kid``
        tag. BackendError subclasses as for any KMS call."""
        tags: dict[str, str] = {}
        params: dict[str, Any] = {"KeyId": key.version}
        while True:
            page = self._call("list_resource_tags", f"ListResourceTags {key.version}", None, **params)
            tags.update({t["TagKey"]: t["TagValue"] for t in page.get("Tags", [])})
            if not page.get("Truncated"):
                break
            params["Marker"] = page["NextMarker"]
        fields = {k[len(REGISTRATION_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(REGISTRATION_TAG_PREFIX)}
        if "kid" not in fields:
            return None
        record = {f: (fields.get(f) or None) for f in REGISTRATION_FIELDS}
        return json.dumps(record)

    def write_registration(self, key: ResolvedKey, kid: str, record_json: str) -> str:
        """:class:`~.base.RegistrationStore`: one tag per record field (``TagResource``; the
        operator's identity needs ``kms:TagResource``). BackendConfigError when a value is
        longer than a tag value may be (256 characters)."""
        record = json.loads(record_json)
        tags = []
        for name in REGISTRATION_FIELDS:
            value = "" if record.get(name) is None else str(record[name])
            if len(value) > MAX_TAG_VALUE:
                raise BackendConfigError(f"registration field {name} is longer than {MAX_TAG_VALUE} characters")
            tags.append({"TagKey": REGISTRATION_TAG_PREFIX + name, "TagValue": value})
        self._call("tag_resource", f"TagResource {key.version}", None, KeyId=key.version, Tags=tags)
        return self.registration_place(key, kid)

    def delete_registration(self, key: ResolvedKey, kid: str) -> None:
        """:class:`~.base.RegistrationStore`: remove the record's tags (``UntagResource``)."""
        names = [REGISTRATION_TAG_PREFIX + f for f in REGISTRATION_FIELDS]
        self._call("untag_resource", f"UntagResource {key.version}", None, KeyId=key.version, TagKeys=names)

    def health(self) -> bool:
        """False after KMS was unreachable (or answered 5xx), until a call succeeds again."""
        return self._healthy

    def close(self) -> None:
        """Stop the pool (in-flight calls end on their own) and close the HTTP connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- KeyCreator -----------------------------------------------------------------------

    def create_key(self, uri: str, key_spec: str, alg: Algorithm | None = None) -> ResolvedKey:
        """Create a non-exportable ``SIGN_VERIFY`` key (Origin AWS_KMS) of ``key_spec``
        (RSA-2048/3072/4096, EC-P256/P384/P521).

        ``uri``: ``awskms:alias/NAME`` also creates that alias (refused before the key is
        made if the alias exists); ``awskms:`` alone creates a key without alias. Returns
        the new key resolved, with ``uri`` the alias reference or ``awskms:<key ARN>``.
        ``alg`` is not used: KMS signs only with its key spec's signing algorithms.
        """
        if key_spec not in KEY_SPECS:
            raise BackendConfigError(f"key spec {key_spec!r} is not one of {', '.join(KEY_SPECS)}")
        alias = None
        if uri != "awskms:":
            ref = KmsRef.parse(uri)
            if ref.alias is None or ref.key_id != ref.alias:
                raise BackendConfigError(
                    "keys create for awskms: give --uri awskms:alias/NAME, or awskms: for a key without alias "
                    "(KMS chooses the key id)"
                )
            if ref.alias.startswith("alias/aws/"):
                raise BackendConfigError(f"{ref.alias}: the alias/aws/ prefix is reserved for AWS managed keys")
            alias = ref.alias
            try:
                existing = self._call("describe_key", f"DescribeKey {alias}", None, KeyId=alias)
            except KeyNotFoundError:
                pass
            else:
                raise BackendConfigError(
                    f"alias {alias} already names key {existing['KeyMetadata']['Arn']}; choose a new alias "
                    "(to rotate, create a new key, register it, then change the configuration)"
                )
        meta = self._call(
            "create_key",
            "CreateKey",
            None,
            KeyUsage="SIGN_VERIFY",
            KeySpec=CREATE_SPECS[key_spec],
            Origin="AWS_KMS",
            Description=f"helseid-signer signing key{' ' + alias if alias else ''}",
        )["KeyMetadata"]
        arn = meta["Arn"]
        log.info("created AWS KMS key %s (%s)", arn, CREATE_SPECS[key_spec])
        if alias:
            try:
                self._call("create_alias", f"CreateAlias {alias}", None, AliasName=alias, TargetKeyId=arn)
            except BackendError as exc:
                raise type(exc)(
                    f"key {arn} was created but alias {alias} was not ({exc}); create the alias by hand "
                    "or schedule the key's deletion"
                ) from exc
        # Resolve by ARN: a new alias can take a moment to be visible everywhere in KMS.
        resolved = self.resolve(f"awskms:{arn}")
        if alias is None:
            return resolved
        return dataclasses.replace(
            resolved, uri=f"awskms:{alias}", handle=dataclasses.replace(resolved.handle, alias=alias)
        )


def _state_in(message: str) -> str | None:
    """The key state a KMS error message names (``"<ARN> is pending deletion."``), or None."""
    lowered = message.lower()
    for words, state in sorted(_STATE_WORDS.items(), key=lambda item: -len(item[0])):
        if f" is {words}" in lowered:
            return state
    return None


def _access_denied_cause(message: str) -> str:
    """What an AccessDeniedException message says is missing (IAM's wording: "with an explicit
    deny in a ... policy", "because no identity-based / resource-based policy allows ...")."""
    action = re.search(r"perform: (kms:\w+)", message)
    what = action.group(1) if action else "this KMS action"
    lowered = message.lower()
    if "explicit deny" in lowered:
        return (
            f"an explicit Deny for {what} applies to the service's AWS identity (in the key policy, an IAM policy, "
            "a permissions boundary or an SCP); remove or narrow that Deny"
        )
    if "no resource-based policy allows" in lowered:
        return f"the key policy does not allow {what} for the service's AWS identity; add it to the key policy"
    if "no identity-based policy allows" in lowered:
        return f"no IAM policy of the service's AWS identity allows {what}; attach one that does"
    return (
        f"the service's AWS identity lacks {what} in the key policy or its IAM policy (or a grant); "
        "allow it there"
    )


#: Tag keys of a registration record on a KMS key: this prefix and the record's field name.
REGISTRATION_TAG_PREFIX = "helseid-signer:registration:"
REGISTRATION_FIELDS = ("kid", "client_id", "issuer", "registered_at", "expires_at", "source")
MAX_TAG_VALUE = 256


def _load_public_key(der: bytes, spec: str, arn: str) -> PublicKey:
    """The key's SubjectPublicKeyInfo, checked against its KeySpec."""
    try:
        public_key = load_der_public_key(der)
    except ValueError as exc:
        raise BackendError(f"AWS KMS returned an unreadable public key for {arn}: {exc}") from exc
    kind, size = KMS_KEY_SPECS[spec]
    if kind is KeyType.RSA:
        fits = isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == size
    else:
        assert isinstance(size, Curve)
        fits = isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, size.crypto)
    if not fits:
        raise BackendError(f"AWS KMS returned a public key for {arn} that is not {spec}")
    return public_key  # type: ignore[return-value]
