"""Who may ask: caller identity, the profiles a caller may use, per-caller rate limits.
(Which URLs a profile's DPoP proofs may name is :mod:`.htu`.)

Decisions (docs/security.md):

* a caller is named in configuration and identified by its TLS client certificate (a
  DNS or URI subjectAltName, or the subject CN when the certificate has no SAN) or by the
  Unix socket it reached (one socket per caller); an unknown identity gets
  UNAUTHENTICATED;
* a profile the caller may not use - whether it exists or not - gets PERMISSION_DENIED
  with the same message, so callers cannot probe which profiles exist.
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


@dataclass(frozen=True)
class Caller:
    """A configured caller.

    Attributes:
        name: the ``[callers.NAME]`` name (audit records carry it).
        profiles: the profiles it may use.
        limiter: its rate limiter, or None for no limit.
    """

    name: str
    profiles: frozenset[str]
    limiter: RateLimiter | None = field(default=None, compare=False)


def check_caller_may_use(caller: Caller | None, profile: str) -> None:
    """UNAUTHENTICATED for no caller; PERMISSION_DENIED for a profile it may not use
    (same message whether the profile exists or not); RESOURCE_EXHAUSTED over its rate."""
    if caller is None:
        raise RequestError("caller", "is not a configured caller of this service", code="UNAUTHENTICATED")
    if profile not in caller.profiles:
        raise RequestError("profile", "is not a profile this caller may use", code="PERMISSION_DENIED")
    if caller.limiter is not None and not caller.limiter.allow():
        raise RequestError("caller", "rate limit exceeded; retry later", code="RESOURCE_EXHAUSTED")
