"""The key-backend seam: one small protocol every key store meets, typed errors, and a
registry keyed by the key reference's URI scheme.

A backend's whole contract (:class:`KeyBackend`):

* ``resolve(uri)`` pins a key reference to one key version and returns its public key;
* ``sign(key, alg, signing_input)`` signs a JWS signing input and returns the signature
  already in JOSE form (RSA: modulus-size bytes; ECDSA: fixed-width ``R || S``);
* ``health()`` says whether it can sign now; ``close()`` releases it.

Creating and listing keys are optional capabilities (:class:`KeyCreator`), tested for
with ``isinstance``. Modelled on smallstep ``crypto/kms/apiv1``.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..algorithms import Algorithm, PublicKey


class BackendError(Exception):
    """Base of all backend errors. ``grpc_code`` names the gRPC status it maps to."""

    #: The gRPC status a caller gets (:func:`helseid_signer.errors.refusal`).
    grpc_code: ClassVar[str] = "INTERNAL"
    #: What the caller is told; the error's own text stays in the log and audit record.
    summary: ClassVar[str] = "the key store failed"


class BackendConfigError(BackendError):
    """The backend's configuration or a key reference is wrong; start-up stops."""

    grpc_code = "FAILED_PRECONDITION"
    summary = "the key store configuration is wrong"


class KeyNotFoundError(BackendError):
    """The key reference names no key in the backend."""

    grpc_code = "UNAVAILABLE"
    summary = "the signing key is not available in its key store"


class BackendUnavailableError(BackendError):
    """The backend cannot be reached or has lost its state; retrying later may work."""

    grpc_code = "UNAVAILABLE"
    summary = "the signing key or its key store is not available"


class BackendThrottledError(BackendError):
    """The backend throttled the request and bounded retries did not get through."""

    grpc_code = "RESOURCE_EXHAUSTED"
    summary = "the key store is throttling requests; retry later"


class KeyReplacedError(BackendError):
    """The key's object in the backend now holds another public key than the one pinned
    at start-up; the service will not sign with it until the original key is back or the
    configuration changes (an operator must act)."""

    grpc_code = "FAILED_PRECONDITION"
    summary = "the signing key in the key store was replaced; the signer will not sign with it"


class KeyAccessDeniedError(BackendError):
    """The key store refuses the key to this service until an operator acts: no rights (a
    role, a key or access policy, a firewall rule), or the key cannot sign in its state
    (disabled, outside its validity window, pending deletion, key_ops without sign)."""

    grpc_code = "FAILED_PRECONDITION"
    summary = (
        "the key store refused to sign (the key is disabled, expired or being deleted, or the signer lacks rights "
        "or network access to it)"
    )


@dataclass(frozen=True)
class ResolvedKey:
    """A key reference pinned to one key version.

    Attributes:
        uri: the key reference as configured (``pkcs11:...``, ``awskms:...``, ``azurekv:...``).
        version: what identifies the exact key version that signs (PKCS#11: token serial
            and object id; AWS: key ARN; Azure: versioned key URL). Goes into audit records.
        public_key: that version's public key (``cryptography`` object).
        handle: backend-private state needed to sign (never shown to callers).
    """

    uri: str
    version: str
    public_key: PublicKey
    handle: Any = field(default=None, compare=False, repr=False)


@runtime_checkable
class KeyBackend(Protocol):
    """What every key backend implements."""

    scheme: ClassVar[str]

    def resolve(self, uri: str) -> ResolvedKey:
        """Pin ``uri`` to one key version. Raises KeyNotFoundError, BackendConfigError,
        BackendUnavailableError."""
        ...

    def sign(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes, deadline: float | None = None) -> bytes:
        """Sign ``signing_input`` (the ASCII JWS signing input, any length) with ``alg``.

        ``deadline``: ``time.monotonic()`` value by which the caller needs the answer (the
        gRPC deadline); remote backends bound their retries by it. None: no deadline.

        The caller has already checked that ``alg`` fits the key. Returns the JWS
        signature bytes (RSA: modulus length; ES256/384/512: 64/96/132 bytes ``R || S``).
        Raises a :class:`BackendError` subclass.
        """
        ...

    def health(self) -> bool:
        """True when the backend can sign now."""
        ...

    def close(self) -> None:
        """Release sessions and connections."""
        ...


@runtime_checkable
class KeyCreator(Protocol):
    """Optional: create a non-exportable signing key."""

    def create_key(self, uri: str, key_spec: str, alg: Algorithm | None = None) -> ResolvedKey:
        """Create a key at ``uri``; ``key_spec`` is ``RSA-2048``/``RSA-3072``/``RSA-4096``
        or ``EC-P256``/``EC-P384``/``EC-P521``; ``alg``, when given, the one JWS algorithm
        the key will sign with (a backend that can restricts the key to it). Raises
        BackendError subclasses."""
        ...


@runtime_checkable
class VersionTracker(Protocol):
    """Optional: the key version that signs NOW, when the backend may find the same key
    again somewhere else (PKCS#11: after a token is deleted and re-created with the same
    key, recovery finds it under a new token serial). ``ResolvedKey.version`` stays what
    was pinned at resolve; audit records and GetKeySet report this one."""

    def current_version(self, key: ResolvedKey) -> str:
        """The version of ``key`` that signs now (no backend call)."""
        ...


@runtime_checkable
class AlgChecker(Protocol):
    """Optional: a backend's own check that a resolved key may sign with ``alg``, beyond
    :func:`~helseid_signer.algorithms.check_key_fits` (AWS KMS: the key's allowed
    SigningAlgorithms). ``keys.make_signing_key`` calls it at start-up, before any
    signature; it uses what ``resolve`` read and makes no backend call. A mismatch raises
    AlgorithmError, which stops start-up."""

    def check_alg(self, key: ResolvedKey, alg: Algorithm) -> None:
        """Raise AlgorithmError if the key cannot sign with ``alg``."""
        ...


@runtime_checkable
class CustodyReporter(Protocol):
    """Optional: say when a resolved private key is not held as this product promises -
    exportable now, or exported/imported at some time (PKCS#11 CKA_EXTRACTABLE,
    CKA_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE; AWS KMS Origin and
    MultiRegion; Azure Key Vault exportable and kty). The key still signs (the operator may
    have imported it on purpose); the server logs the message at start-up and
    ``helseid-signer check`` reports it as a warning."""

    def custody_warning(self, key: ResolvedKey) -> str | None:
        """A message when the key's custody is weaker than non-exportable-since-creation."""
        ...


@runtime_checkable
class DriftReporter(Protocol):
    """Optional: report that the key store has moved on from the pinned key version (an AWS
    alias now names another key; a newer Azure key version exists). The pinned version
    keeps signing - HelseID has registered only it - until the configuration changes; the
    server logs the message and exports it as a metric (``helseid_signer_key_pinning_drift``)."""

    def drift_message(self, key: ResolvedKey, deadline: float | None = None) -> str | None:
        """A message when the reference now resolves elsewhere, else None."""
        ...


@runtime_checkable
class OwnSigningThread(Protocol):
    """Optional: the backend's signatures must run on an executor of its own (PKCS#11: one
    thread per module, since every Cryptoki call into a module is serialised anyway). The
    service hands each signature there instead of to its shared pool.

    A call into such a backend cannot be cancelled, and one that hangs holds every call
    behind it: so the executor tells how long its running call has run
    (:class:`WatchedExecutor`), and ``call_timeout`` says how long is too long. Past it the
    backend counts as hung: health NOT_SERVING, requests UNAVAILABLE at once (clients fail
    over), reload refused, the process exits on SIGTERM without waiting for the call."""

    @property
    def sign_executor(self) -> WatchedExecutor:
        """The executor that runs this backend's :meth:`KeyBackend.sign` calls."""
        ...

    @property
    def call_timeout(self) -> float:
        """Seconds one call may run before the backend counts as hung."""
        ...


class WatchedExecutor(ThreadPoolExecutor):
    """A thread pool that knows how long its longest-running task has been running
    (:meth:`busy_for`), so that a task stuck in a call that cannot be cancelled (a hung
    PKCS#11 module) is seen from outside."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._running: dict[int, float] = {}
        self._running_lock = threading.Lock()
        self._next = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        """As :meth:`ThreadPoolExecutor.submit`, with the task's running time recorded."""

        def run() -> Any:
            with self._running_lock:
                self._next += 1
                token = self._next
                self._running[token] = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._running_lock:
                    del self._running[token]

        return super().submit(run)

    def busy_for(self) -> float:
        """Seconds the longest-running task has been running; 0.0 when idle."""
        with self._running_lock:
            oldest = min(self._running.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    async def call(self, call_timeout: float, deadline: float | None, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on this pool, awaited on the event loop. Waiting in the queue is fine
        while the pool makes progress; BackendUnavailableError instead when a task here has run
        past ``call_timeout`` seconds (a call that hangs: at once, or as soon as it is seen
        while waiting) or when ``deadline`` (``time.monotonic()``) comes first. A task still
        queued then is cancelled; one already running cannot be."""
        busy = self.busy_for()
        if busy > call_timeout:
            raise BackendUnavailableError(
                f"the key store has not answered for {busy:.1f} s (call_timeout {call_timeout:g} s)"
            )
        future = self.submit(fn, *args)
        waited = asyncio.wrap_future(future)
        try:
            while True:
                wait = call_timeout if deadline is None else min(call_timeout, deadline - time.monotonic())
                if wait <= 0:
                    future.cancel()
                    raise BackendUnavailableError("the key store did not answer before the caller's deadline")
                done, _ = await asyncio.wait({waited}, timeout=wait)
                if done:
                    return waited.result()
                busy = self.busy_for()
                if busy > call_timeout:
                    future.cancel()
                    raise BackendUnavailableError(
                        f"the key store has not answered for {busy:.1f} s (call_timeout {call_timeout:g} s)"
                    )
        except asyncio.CancelledError:
            future.cancel()
            raise


@runtime_checkable
class ImmediateSigner(Protocol):
    """Optional: the backend can sign on the caller's thread (the service's event loop) when
    that cannot wait on anything - opted in by ``sign_on_event_loop`` (PKCS#11; see
    docs/security.md, "Where signatures run")."""

    sign_on_event_loop: bool

    def sign_now(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes) -> bytes | None:
        """The JOSE signature at once, or None when signing might wait (a held lock, a
        recovery): the caller then uses :meth:`KeyBackend.sign` on the signing thread."""
        ...


@runtime_checkable
class Prober(Protocol):
    """Optional: the backend's own health probe (PKCS#11 signs a fixed input with each
    resolved key, recovering a lost token). Without it the server probes with
    :meth:`KeyBackend.health` and, when that says no, one real signature."""

    def probe(self) -> bool:
        """True when every resolved key of the backend can sign now."""
        ...


@runtime_checkable
class RegistrationStore(Protocol):
    """Optional: the key store keeps a key's HelseID registration record beside the key, so
    that every replica - which reads that key store anyway - sees the same registrations
    (PKCS#11: a ``CKO_DATA`` object on the key's token). ``keys register`` writes it with
    the operator's rights; the service only reads it (:class:`~helseid_signer.rotation.RegistrationBook`,
    once per health interval). Records are the JSON of
    :class:`~helseid_signer.rotation.RegistrationRecord`, at most 2048 bytes."""

    def read_registration(self, key: ResolvedKey, kid: str) -> str | None:
        """The record stored for ``key`` (whose RFC 7638 thumbprint is ``kid``), or None.
        Raises BackendError subclasses (the caller keeps what it read before)."""
        ...

    def write_registration(self, key: ResolvedKey, kid: str, record_json: str) -> str:
        """Store ``record_json`` for ``key``, replacing an earlier record, and return where it
        went, in words fit for an operator. Raises BackendError subclasses."""
        ...

    def delete_registration(self, key: ResolvedKey, kid: str) -> None:
        """Remove the record stored for ``key`` (none: nothing happens). Raises BackendError
        subclasses."""
        ...

    def registration_place(self, key: ResolvedKey, kid: str) -> str:
        """Where the record of ``key`` is kept, in words (no backend call)."""
        ...


@dataclass(frozen=True)
class Registration:
    """Where a backend lives: ``target`` is ``"module:Class"`` (a :class:`KeyBackend` with a
    ``Settings`` class attribute, the pydantic model of its ``[backends.SCHEME]`` table);
    ``extra`` the pip extra of ``helseid-signer`` that brings its SDK."""

    target: str
    extra: str


#: URI scheme -> the backend. Imported only when a configured key or ``[backends.SCHEME]``
#: table uses it, so the cloud SDKs need not be installed where they are not used. A new
#: backend is its module, one line here, and its docs (docs/design.md, "The backend seam").
REGISTRY: dict[str, Registration] = {
    "pkcs11": Registration("helseid_signer.backends.pkcs11:Pkcs11Backend", extra="pkcs11"),
    "azurekv": Registration("helseid_signer.backends.azure_kv:AzureKvBackend", extra="azure"),
    "awskms": Registration("helseid_signer.backends.aws_kms:AwsKmsBackend", extra="aws"),
}

KEY_SPECS = ("RSA-2048", "RSA-3072", "RSA-4096", "EC-P256", "EC-P384", "EC-P521")


def scheme_of(uri: str) -> str:
    """The scheme of a key reference; BackendConfigError if none or unknown."""
    scheme, sep, _ = uri.partition(":")
    if not sep or scheme not in REGISTRY:
        raise BackendConfigError(f"key reference {uri!r} must start with one of {', '.join(s + ':' for s in REGISTRY)}")
    return scheme


def backend_class(scheme: str) -> type:
    """Import and return the backend class registered for ``scheme``."""
    registration = REGISTRY[scheme]
    module_name, _, class_name = registration.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional extra is not installed
        raise BackendConfigError(
            f"backend {scheme!r} needs an extra that is not installed: "
            f"pip install 'helseid-signer[{registration.extra}]' ({exc})"
        ) from exc
    return getattr(module, class_name)
