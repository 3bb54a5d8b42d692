"""One configuration generation, assembled: settings -> backends -> key slots -> profiles
and callers (:func:`build_runtime`), and the holder that swaps a generation as a whole on
reload. The server and ``keys list`` / ``keys register`` build it the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .audit import AuditLog
from .backends.base import KeyBackend
from .config import Settings
from .htu import HtuPolicy
from .keys import KeySlot, build_backends, resolve_key_slots
from .policy import UNBOUNDED_IN_FLIGHT, Caller, RateLimiter
from .rotation import AssertionKeys, RegistrationBook
from .signing import Profile

#: The caller of a plaintext development listener without ``insecure_caller``.
IMPLICIT_INSECURE_CALLER = "insecure-development"


@dataclass
class Runtime:
    """Everything one configuration generation needs: its settings, backends, key slots,
    profiles and callers. Built at start-up and again on each reload."""

    settings: Settings
    backends: dict[str, KeyBackend]
    slots: dict[str, KeySlot]
    profiles: dict[str, Profile]
    callers: dict[str, Caller]
    tls_callers: dict[str, Caller]
    book: RegistrationBook


def build_runtime(settings: Settings) -> Runtime:
    """Build backends and resolve keys (a key whose backend is unreachable stays pending);
    raise KeyResolutionError / BackendError for configuration errors."""
    backends = build_backends(settings)
    slots = resolve_key_slots(settings, backends, time.monotonic())
    assertion_slots = [slots[name] for p in settings.profiles.values()
                       for name in (p.assertion_key, p.rotation.next_key, p.rotation.previous_key) if name]  # fmt: skip
    book = RegistrationBook(settings.selfservice.records_dir if settings.selfservice else None, assertion_slots)
    profiles = {
        name: Profile(
            name=name,
            settings=p,
            token_endpoint=p.effective_token_endpoint,
            assertion_keys=AssertionKeys(
                current=slots[p.assertion_key],
                next=slots[p.rotation.next_key] if p.rotation.next_key else None,
                next_active_from=p.rotation.next_active_from.timestamp() if p.rotation.next_active_from else None,
                previous=slots[p.rotation.previous_key] if p.rotation.previous_key else None,
                previous_until=(
                    p.rotation.previous_published_until.timestamp() if p.rotation.previous_published_until else None
                ),
                book=book,
                keeps_old_key=p.rotation.helseid_keeps_old_key,
                client_id=p.client_id,
                issuer=p.issuer,
            ),
            dpop_slot=slots[p.dpop_key],
            htu_policy=HtuPolicy.from_settings(p.effective_token_endpoint, p.api_base_urls),
        )
        for name, p in settings.profiles.items()
    }
    callers = build_callers(settings)
    if settings.server.insecure and not settings.server.insecure_caller:
        callers[IMPLICIT_INSECURE_CALLER] = Caller(
            IMPLICIT_INSECURE_CALLER, frozenset(profiles), max_in_flight=UNBOUNDED_IN_FLIGHT
        )
    tls_callers = {n: callers[name] for name, c in settings.callers.items() for n in c.tls_names}
    return Runtime(settings, backends, slots, profiles, callers, tls_callers, book)


def build_callers(settings: Settings) -> dict[str, Caller]:
    """The configured callers, each with its rate limiter."""
    callers = {}
    for name, c in settings.callers.items():
        limiter = None
        if c.rate_limit is not None:
            limiter = RateLimiter(c.rate_limit, c.rate_burst or max(1, int(c.rate_limit)))
        callers[name] = Caller(name, frozenset(c.profiles), limiter, c.max_in_flight)
    return callers


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


class RuntimeHolder(ServiceState):
    """The current :class:`Runtime` and the servicers' :class:`Snapshot`, swapped together."""

    def __init__(self, runtime: Runtime, audit: AuditLog) -> None:
        super().__init__(Snapshot(runtime.profiles, audit))
        self.runtime = runtime

    def swap(self, runtime: Runtime, audit: AuditLog) -> None:
        self.runtime = runtime
        self.current = Snapshot(runtime.profiles, audit)
