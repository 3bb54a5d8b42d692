"""Signing keys as the service uses them: a configured key resolved in its backend,
checked against its ``alg``, with its public JWK, ``kid`` and JWS headers computed once.

Everything that does not change per request (JWK, RFC 7638 thumbprint, the base64url
JOSE headers) is computed here at start-up, not on the signing path.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .algorithms import Algorithm, check_key_fits, get_algorithm
from .backends.base import (
    AlgChecker,
    BackendUnavailableError,
    CustodyReporter,
    ImmediateSigner,
    KeyAccessDeniedError,
    KeyBackend,
    KeyNotFoundError,
    OwnSigningThread,
    ResolvedKey,
    VersionTracker,
    backend_class,
    scheme_of,
)
from .config import KeySettings, Settings
from .jwt import json_b64, public_jwk, thumbprint

log = logging.getLogger("helseid_signer.keys")
ASSERTION_TYP = "client-authentication+jwt"
DPOP_TYP = "dpop+jwt"


@dataclass(frozen=True)
class SigningKey:
    """One configured key, resolved and ready to sign.

    Attributes:
        name: the ``[keys.NAME]`` name.
        alg: its configured JWS algorithm.
        backend: the backend that holds it.
        resolved: the pinned key version and public key.
        jwk: public JWK (required members only).
        kid: RFC 7638 thumbprint of ``jwk`` (43 characters); also the DPoP ``jkt``.
        assertion_header: base64url JOSE header of a client assertion
            ``{"alg", "typ": "client-authentication+jwt", "kid"}``.
        dpop_header: base64url JOSE header of a DPoP proof ``{"alg", "typ": "dpop+jwt", "jwk"}``.
        executor: where its signatures run off the event loop when the backend has a
            thread of its own (:class:`~.backends.base.OwnSigningThread`); None: the
            service's pool.
        signs_on_event_loop: the backend may sign on the caller's thread when it can do so
            without waiting (:class:`~.backends.base.ImmediateSigner`, opted in).
        call_timeout: seconds a call on ``executor`` may run before the backend counts as
            hung (:class:`~.backends.base.OwnSigningThread`); None: no such bound.
    """

    name: str
    alg: Algorithm
    backend: KeyBackend = field(repr=False)
    resolved: ResolvedKey
    jwk: dict[str, str]
    kid: str
    assertion_header: str
    dpop_header: str
    executor: Executor | None = field(default=None, repr=False, compare=False)
    signs_on_event_loop: bool = False
    call_timeout: float | None = None

    @property
    def published_jwk(self) -> dict[str, str]:
        """The JWK to register in HelseID: public members, ``kid``, ``alg``, ``use: sig``."""
        return dict(self.jwk, kid=self.kid, alg=self.alg.name, use="sig")

    @property
    def version(self) -> str:
        """The exact key version that signs now (audit ``key_version``, GetKeySet): the
        backend's :class:`~.backends.base.VersionTracker` answer, else the pinned one."""
        if isinstance(self.backend, VersionTracker):
            return self.backend.current_version(self.resolved)
        return self.resolved.version

    def sign(self, signing_input: bytes, deadline: float | None = None) -> bytes:
        """Sign with this key's backend and alg, within ``deadline`` (``time.monotonic()``
        seconds; None: no deadline); raises backend errors."""
        return self.backend.sign(self.resolved, self.alg, signing_input, deadline=deadline)

    def sign_now(self, signing_input: bytes) -> bytes | None:
        """Sign on this thread if the backend can without waiting; None when it cannot (then
        use :meth:`sign` on :attr:`executor`). Only for keys with ``signs_on_event_loop``."""
        return self.backend.sign_now(self.resolved, self.alg, signing_input)  # type: ignore[attr-defined]

    @classmethod
    def _capabilities(cls, backend: KeyBackend) -> dict[str, Any]:
        return {
            "executor": backend.sign_executor if isinstance(backend, OwnSigningThread) else None,
            "signs_on_event_loop": isinstance(backend, ImmediateSigner) and bool(backend.sign_on_event_loop),
            "call_timeout": backend.call_timeout if isinstance(backend, OwnSigningThread) else None,
        }


def make_signing_key(name: str, alg_name: str, backend: KeyBackend, resolved: ResolvedKey) -> SigningKey:
    """Check that the resolved key fits ``alg_name`` and compute its JWK, kid and headers.

    Raises AlgorithmError (a ValueError) if the key does not fit.
    """
    alg = get_algorithm(alg_name)
    check_key_fits(alg, resolved.public_key)
    if isinstance(backend, AlgChecker):  # optional: the backend's own metadata (base.py)
        backend.check_alg(resolved, alg)
    jwk = public_jwk(resolved.public_key)
    kid = thumbprint(jwk)
    return SigningKey(
        name=name,
        alg=alg,
        backend=backend,
        resolved=resolved,
        jwk=jwk,
        kid=kid,
        assertion_header=json_b64({"alg": alg.name, "typ": ASSERTION_TYP, "kid": kid}),
        dpop_header=json_b64({"alg": alg.name, "typ": DPOP_TYP, "jwk": jwk}),
        **SigningKey._capabilities(backend),
    )


def build_backends(settings: Settings) -> dict[str, KeyBackend]:
    """One backend object per scheme that the configured keys use."""
    backends: dict[str, Any] = {}
    for key in settings.keys.values():
        scheme = scheme_of(key.uri)
        if scheme not in backends:
            options = settings.backends.configured[scheme]
            backends[scheme] = backend_class(scheme)(**options.model_dump())
    return backends


def resolve_keys(settings: Settings, backends: dict[str, KeyBackend]) -> dict[str, SigningKey]:
    """Resolve every ``[keys.*]`` entry in its backend and check it against its ``alg``.

    Raises KeyResolutionError naming the key on any failure.
    """
    keys: dict[str, SigningKey] = {}
    for name, key in settings.keys.items():
        backend = backends[scheme_of(key.uri)]
        try:
            resolved = backend.resolve(key.uri)
            keys[name] = make_signing_key(name, key.alg, backend, resolved)
        except Exception as exc:
            raise KeyResolutionError(f"keys.{name}: {exc}") from exc
    return keys


class KeyResolutionError(Exception):
    """A configured key could not be resolved or does not fit its ``alg``; names the key."""


STARTUP_TRIES = 5
STARTUP_RETRY_DELAY = 0.2  # seconds


class KeySlot:
    """A configured key as the running service holds it: resolved, or still pending
    because its backend was unreachable (or the key missing) at start-up.

    A pending slot answers :meth:`get` with BackendUnavailableError (UNAVAILABLE to the
    caller); the server's health loop calls :meth:`try_resolve` with backoff. A key that
    exists but does not fit its ``alg``, or a bad reference, is a configuration error and
    stops start-up instead (:func:`resolve_key_slots`).
    """

    def __init__(self, name: str, settings: KeySettings, backend: KeyBackend) -> None:
        self.name = name
        self.settings = settings
        self.backend = backend
        self.key: SigningKey | None = None
        self.error: str | None = "not resolved yet"
        self.next_attempt = 0.0  # time.monotonic() of the next resolution attempt
        self._backoff = 1.0

    @classmethod
    def holding(cls, key: SigningKey) -> KeySlot:
        """A slot that already holds ``key`` (the in-process signers of ``keys register``
        and ``check``, which resolve their keys themselves)."""
        slot = cls(key.name, KeySettings(uri=key.resolved.uri, alg=key.alg.name), key.backend)
        slot.key, slot.error = key, None
        return slot

    def try_resolve(self, now: float) -> bool:
        """Resolve the key; True when it is available. Transient failures schedule the next
        attempt (1 s doubling to 60 s); configuration errors raise KeyResolutionError."""
        try:
            resolved = self.backend.resolve(self.settings.uri)
            self.key = make_signing_key(self.name, self.settings.alg, self.backend, resolved)
            self.error = None
            if isinstance(self.backend, CustodyReporter):
                warning = self.backend.custody_warning(resolved)
                if warning:
                    log.warning("keys.%s: %s", self.name, warning)
            return True
        except (BackendUnavailableError, KeyNotFoundError, KeyAccessDeniedError) as exc:
            # Transient at start-up: an unreachable backend, a key not there yet, or rights
            # not granted yet (cloud role assignments take minutes to apply).
            self.error = str(exc)
            self.next_attempt = now + self._backoff
            self._backoff = min(60.0, self._backoff * 2)
            return False
        except Exception as exc:
            raise KeyResolutionError(f"keys.{self.name}: {exc}") from exc

    def get(self) -> SigningKey:
        """The resolved key; BackendUnavailableError while pending."""
        key = self.key
        if key is None:
            raise BackendUnavailableError(f"key {self.name!r} is not available yet: {self.error}")
        return key


def resolve_key_slots(settings: Settings, backends: dict[str, KeyBackend], now: float) -> dict[str, KeySlot]:
    """A slot per ``[keys.*]``, each resolved when its backend answers. Raises
    KeyResolutionError (naming the key) for configuration errors only."""
    slots = {name: KeySlot(name, key, backends[scheme_of(key.uri)]) for name, key in settings.keys.items()}
    for slot in slots.values():
        # A few quick tries first: processes starting together on one token store (workers,
        # replicas) can briefly miss the token; only a lasting failure leaves the key pending.
        for attempt in range(STARTUP_TRIES):
            if slot.try_resolve(now) or attempt == STARTUP_TRIES - 1:
                break
            time.sleep(STARTUP_RETRY_DELAY)
        if slot.key is None:  # the health loop goes on from 1 s, doubling to 60 s
            slot.next_attempt, slot._backoff = time.monotonic() + 1.0, 2.0
    return slots
