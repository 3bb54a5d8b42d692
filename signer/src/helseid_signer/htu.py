"""``htu``: the URL a DPoP proof names, in one place - its canonical form (RFC 9449
section 4.2, RFC 3986 section 6.2.3), the refusals a signer makes of unclean paths, and
which URLs a profile's proofs may name (:class:`HtuPolicy`).

Decisions (docs/security.md, "What a caller can get signed"): a DPoP ``htu`` must be the
profile's token endpoint or lie under one of its API base URLs - scheme, host and port
equal; the path equal to the base path or continuing after ``/``. Dot-segments (also
percent-encoded, or with ``;`` parameters as in ``..;x``), encoded slashes and backslashes
are refused, so ``https://api.x.no.evil``, ``/api-admin`` and ``/api/..;/admin`` never
match ``https://api.x.no/api``. A signer signs only clean paths (:func:`unclean_path`):
also refused are invalid percent-encoding (``x%``, ``x%zz``), encoded bytes that are not
UTF-8 (over-long forms such as ``%c0%ae``), encoded control characters (``%00``), an
encoded ``;`` (``%3b``), and segments that Windows servers reduce to a dot-segment by
dropping trailing dots and spaces (``...``, ``..%20``, ``.%20``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

from .errors import RequestError

MAX_HTU_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 section 3.2.2/3.2.3: IP-literal (IPv6 only) or reg-name, then an optional port.
_AUTHORITY_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|25)", re.I)  # encoded /, \ and % (double encoding)
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a % not followed by two hex digits
_ENCODED_UNCLEAN = re.compile(r"%(3b|[01][0-9a-f]|7f)", re.I)  # encoded ;, control characters


def unclean_path(path: str) -> str | None:
    """Why the (ASCII, canonical) ``path`` of an ``htu`` is not clean, or None when it is.

    Refused: backslashes; invalid percent-encoding (a ``%`` without two hex digits after
    it, RFC 3986 section 2.1); encoded ``/``, ``\\``, ``%`` (double encoding), ``;`` and
    control characters (``%00``-``%1f``, ``%7f``); percent-encoded bytes that are not
    valid UTF-8 (over-long ``%c0%ae``, RFC 3629 section 10); dot-segments (RFC 3986
    section 3.3), also percent-encoded or with ``;`` parameters (``..;x``); and segments
    that become one once trailing dots and spaces are dropped, as Windows/IIS does
    (``...``, ``..%20``, ``.%20``).
    """
    if "\\" in path:
        return "must not contain backslashes"
    if _PERCENT.search(path):
        return "has invalid percent-encoding (a % must be followed by two hex digits)"
    if _ENCODED_SEPARATOR.search(path) or _ENCODED_UNCLEAN.search(path):
        return "must not contain encoded slashes, backslashes, %, ; or control characters"
    try:
        segments = [unquote_to_bytes(s.partition(";")[0]).decode("utf-8") for s in path.split("/")]
    except UnicodeDecodeError:
        return "has percent-encoded bytes that are not UTF-8 (e.g. over-long forms such as %c0%ae)"
    if any(segment and not segment.rstrip(". ") for segment in segments):
        return "must not contain dot-segments (also encoded, with ;parameters, or with trailing dots or spaces)"
    return None


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
        if reason := unclean_path(parts.path):
            raise ValueError(f"{url!r}: a base URL's path {reason}")
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
        if reason := unclean_path(path):
            raise RequestError("htu", reason)
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
