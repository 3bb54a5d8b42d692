"""Who may ask for what: caller identity, the profiles a caller may use, per-caller rate
limits, and the URLs a DPoP proof may name (``htu``) for a profile.

Decisions (docs/security.md):

* a caller is named in configuration and identified by its TLS client certificate (a
  DNS or URI subjectAltName, or the subject CN when the certificate has no SAN) or by the
  Unix socket it reached (one socket per caller); an unknown identity gets
  UNAUTHENTICATED;
* a profile the caller may not use - whether it exists or not - gets PERMISSION_DENIED
  with the same message, so callers cannot probe which profiles exist;
* a DPoP ``htu`` must be the profile's token endpoint or lie under one of its API base
  URLs: scheme, host and port equal; the path equal to the base path or continuing
  after ``/``. Dot-segments (also percent-encoded, or with ``;`` parameters as in
  ``..;x``), encoded slashes and backslashes are refused, so ``https://api.x.no.evil``,
  ``/api-admin`` and ``/api/..;/admin`` never match ``https://api.x.no/api``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .claims import RequestError, canonical_htu

#: A dot-segment, also percent-encoded, also with path parameters (``..;x``: Tomcat and
#: other servlet containers strip ``;...`` and then resolve ``..``).
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(;[^/]*)?(/|$)", re.I)
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|25)", re.I)  # encoded /, \ and % (double encoding)


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


@dataclass(frozen=True)
class UrlBase:
    """An allowed ``htu`` prefix: canonical scheme://host[:port] and a path."""

    origin: str
    path: str

    @classmethod
    def parse(cls, url: str) -> UrlBase:
        """From a configured base URL (ValueError if it has a query, fragment or dot-segments)."""
        canonical = canonical_htu(url)
        if urlsplit(url).query or "#" in url:
            raise ValueError(f"{url!r}: a base URL has no query or fragment")
        parts = urlsplit(canonical)
        if _DOT_SEGMENT.search(parts.path) or _ENCODED_SEPARATOR.search(parts.path):
            raise ValueError(f"{url!r}: a base URL has no dot-segments or encoded slashes")
        return cls(f"{parts.scheme}://{parts.netloc}", parts.path)

    def admits(self, origin: str, path: str) -> bool:
        """Same origin; path equal to the base path or continuing after ``/``."""
        if origin != self.origin:
            return False
        base = self.path.rstrip("/")
        return path == self.path or path == base or path.startswith(base + "/")


@dataclass(frozen=True)
class HtuPolicy:
    """The ``htu`` values a profile's DPoP proofs may carry."""

    token_endpoint: str
    api_bases: tuple[UrlBase, ...]

    @classmethod
    def from_settings(cls, token_endpoint: str, api_base_urls: tuple[str, ...]) -> HtuPolicy:
        """ValueError naming the URL if one is unusable."""
        return cls(canonical_htu(token_endpoint), tuple(UrlBase.parse(u) for u in api_base_urls))

    def check(self, htu: str) -> str:
        """Canonicalise ``htu`` (INVALID_ARGUMENT if malformed) and check it is allowed
        (PERMISSION_DENIED otherwise). Returns the canonical ``htu``."""
        canonical = canonical_htu(htu)
        path = urlsplit(canonical).path
        if "\\" in path or _DOT_SEGMENT.search(path) or _ENCODED_SEPARATOR.search(path):
            raise RequestError("htu", "must not contain dot-segments, encoded slashes, encoded % or backslashes")
        if canonical == self.token_endpoint:
            return canonical
        parts = urlsplit(canonical)
        origin = f"{parts.scheme}://{parts.netloc}"
        if any(base.admits(origin, path) for base in self.api_bases):
            return canonical
        raise RequestError(
            "htu", "is neither the profile's token endpoint nor under one of its API base URLs",
            code="PERMISSION_DENIED",
        )  # fmt: skip
