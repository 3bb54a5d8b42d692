"""Who may ask: caller identity, the profiles a caller may use, per-caller rate limits.
(Which URLs a profile's DPoP proofs may name is :mod:`.htu`.)

Decisions (docs/security.md):

* a caller is named in configuration and identified by its TLS client certificate (a
  DNS or URI subjectAltName, or the subject CN when the certificate has no SAN) or by the
  Unix socket it reached (one socket per caller); an unknown identity gets
  UNAUTHENTICATED;
* a profile the caller may not use - whether it exists or not - gets PERMISSION_DENIED
  with the same message, so callers cannot probe which profiles exist;
* admission (:func:`admit`) comes before any other work on a request: an unknown caller
  (UNAUTHENTICATED), a caller over its rate or with ``max_in_flight`` requests already
  running (RESOURCE_EXHAUSTED) costs no parsing, no signing and no audit record of its own
  (refusals are counted, :class:`~.audit.RefusalCounter`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .errors import RequestError


class RateLimiter:
    """Token bucket: ``rate`` requests per second on average, bursts up to ``burst``.

    Thread-safe. ``allow()`` returns False when the bucket is empty (the caller then gets
    RESOURCE_EXHAUSTED). Limits are per worker process.
    """

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take one token if there is one."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


#: Requests one caller may have running at once (per worker process) unless its
#: ``max_in_flight`` says otherwise: far above what one application's token flows need
#: (a token request needs two signatures), and a bound on how much of a worker's signing
#: queue one caller can fill. The implicit caller of a plaintext development listener
#: has no such bound.
DEFAULT_MAX_IN_FLIGHT = 64
#: ``max_in_flight`` of the implicit development caller (``server.insecure`` without
#: ``insecure_caller``): in effect none.
UNBOUNDED_IN_FLIGHT = 1_000_000


@dataclass(frozen=True)
class Caller:
    """A configured caller.

    Attributes:
        name: the ``[callers.NAME]`` name (audit records carry it).
        profiles: the profiles it may use.
        limiter: its rate limiter, or None for no limit.
        max_in_flight: how many of its requests may run at once (per worker process).
    """

    name: str
    profiles: frozenset[str]
    limiter: RateLimiter | None = field(default=None, compare=False)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


class InFlight:
    """Requests running per caller name (kept across reloads: the servicer holds one).
    Used on the event loop only."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}

    def enter(self, caller: Caller) -> None:
        """Count one more request of ``caller``; RESOURCE_EXHAUSTED when it already has
        ``max_in_flight`` running."""
        running = self.running.get(caller.name, 0)
        if running >= caller.max_in_flight:
            raise RequestError(
                "caller", f"more than {caller.max_in_flight} requests in flight; retry later", code="RESOURCE_EXHAUSTED"
            )
        self.running[caller.name] = running + 1

    def leave(self, caller: Caller) -> None:
        """One request of ``caller`` has ended."""
        running = self.running.get(caller.name, 1) - 1
        if running > 0:
            self.running[caller.name] = running
        else:
            self.running.pop(caller.name, None)


def admit(caller: Caller | None) -> Caller:
    """Admission, before any other work: UNAUTHENTICATED for no caller, RESOURCE_EXHAUSTED
    over its rate limit. Returns the caller."""
    if caller is None:
        raise RequestError("caller", "is not a configured caller of this service", code="UNAUTHENTICATED")
    if caller.limiter is not None and not caller.limiter.allow():
        raise RequestError("caller", "rate limit exceeded; retry later", code="RESOURCE_EXHAUSTED")
    return caller


def check_caller_may_use(caller: Caller, profile: str) -> None:
    """PERMISSION_DENIED for a profile ``caller`` may not use (same message whether the
    profile exists or not). Comes after :func:`admit`."""
    if profile not in caller.profiles:
        raise RequestError("profile", "is not a profile this caller may use", code="PERMISSION_DENIED")
