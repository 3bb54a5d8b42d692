"""``htu``: the URL a DPoP proof names, in one place - its canonical form (RFC 9449
section 4.2, RFC 3986 section 6.2.3), the refusals a signer makes of unclean paths, and
which URLs a profile's proofs may name (:class:`HtuPolicy`).

Decisions (docs/security.md, "What a caller can get signed"): a DPoP ``htu`` must be the
profile's token endpoint or lie under one of its API base URLs - scheme, host and port
equal; the path equal to the base path or continuing after ``/``. Dot-segments (also
percent-encoded, or with ``;`` parameters as in ``..;x``), encoded slashes and backslashes
are refused, so ``https://api.x.no.evil``, ``/api-admin`` and ``/api/..;/admin`` never
match ``https://api.x.no/api``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import RequestError

MAX_HTU_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 section 3.2.2/3.2.3: IP-literal (IPv6 only) or reg-name, then an optional port.
_AUTHORITY_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?")
#: A dot-segment, also percent-encoded, also with path parameters (``..;x``: Tomcat and
#: other servlet containers strip ``;...`` and then resolve ``..``).
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(;[^/]*)?(/|$)", re.I)
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|25)", re.I)  # encoded /, \ and % (double encoding)


def canonical_htu(htu: str) -> str:
    """The ``htu`` claim for request URI ``htu`` (RFC 9449 section 4.2, RFC 3986 6.2.3).

    Keeps scheme, host, non-default port and path (an empty path becomes ``/``); drops
    query and fragment; lower-cases scheme and host. Refuses (RequestError on field
    ``htu``): over 2048 characters, non-ASCII or control characters or spaces, a scheme
    other than http/https, a missing or malformed host, userinfo, an invalid port.
    """
    if not htu:
        raise RequestError("htu", "is required")
    if len(htu) > MAX_HTU_LENGTH:
        raise RequestError("htu", f"is longer than {MAX_HTU_LENGTH} characters")
    if not htu.isascii() or any(c <= " " or c == "\x7f" for c in htu):
        raise RequestError("htu", "must be ASCII without spaces or control characters (percent-encode)")
    try:
        parts = urlsplit(htu)
    except ValueError:  # e.g. an unbalanced "[" in the host
        raise RequestError("htu", "is not a valid URI") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise RequestError("htu", "must be an absolute http or https URI")
    if "@" in parts.netloc:
        raise RequestError("htu", "must not contain userinfo")
    if not _AUTHORITY_RE.fullmatch(parts.netloc):
        raise RequestError("htu", "has an invalid host or port")
    host = parts.hostname
    if not host:
        raise RequestError("htu", "has no host")
    try:
        port = parts.port
    except ValueError:
        raise RequestError("htu", "has an invalid port") from None
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RequestError("htu", "has an invalid IPv6 address") from None
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


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
