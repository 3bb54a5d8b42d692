"""``htu`` canonicalisation and refusals (helseid_signer.htu).

Expected values are written out by hand from RFC 9449 section 4.2 and RFC 3986 section
6.2.3 (scheme-based normalisation).
"""

from __future__ import annotations

import pytest

from helseid_signer.htu import HtuPolicy, UrlBase, canonical_htu
from tests.support.refusal import refused as _refused

# --------------------------------------------------------------------------- htu

HTU_OK = [
    ("https://api.example.no/deft/v1/files", "https://api.example.no/deft/v1/files"),
    ("HTTPS://API.Example.NO/Deft/V1", "https://api.example.no/Deft/V1"),  # path case kept
    ("HtTp://LocalHost:8080/x", "http://localhost:8080/x"),
    ("https://a.example:443/p", "https://a.example/p"),
    ("http://a.example:80/p", "http://a.example/p"),
    ("https://a.example:80/p", "https://a.example:80/p"),  # not the default for https
    ("http://a.example:443/p", "http://a.example:443/p"),  # not the default for http
    ("https://a.example:8443/p", "https://a.example:8443/p"),
    ("https://a.example:/p", "https://a.example/p"),  # empty port = default (RFC 3986 6.2.3)
    ("https://a.example", "https://a.example/"),
    ("https://a.example:443", "https://a.example/"),
    ("https://a.example?x=1", "https://a.example/"),
    ("https://a.example#frag", "https://a.example/"),
    ("https://a.example/p?SenderHerId=1&ReceiverHerIds=2", "https://a.example/p"),
    ("https://a.example/p?q#f", "https://a.example/p"),
    ("https://a.example/p/#f", "https://a.example/p/"),
    ("https://a.example/a%2Fb%20c/%7Euser", "https://a.example/a%2Fb%20c/%7Euser"),  # percent-encoding as is
    ("https://a.example/a%2fb", "https://a.example/a%2fb"),
    ("https://a.example/./a/../b", "https://a.example/./a/../b"),  # no dot-segment removal
    ("https://a.example//double//slash", "https://a.example//double//slash"),
    ("https://a.example/p;params", "https://a.example/p;params"),
    ("https://[::1]/p", "https://[::1]/p"),
    ("https://[::1]:443/p", "https://[::1]/p"),
    ("http://[2001:DB8::1]:8080/p?x", "http://[2001:db8::1]:8080/p"),
    ("https://[::ffff:192.0.2.1]/", "https://[::ffff:192.0.2.1]/"),
    ("https://192.0.2.1:8443/p", "https://192.0.2.1:8443/p"),
    ("https://helseid-sts.test.nhn.no/connect/token", "https://helseid-sts.test.nhn.no/connect/token"),
]


@pytest.mark.parametrize(("htu", "expected"), HTU_OK)
def test_canonical_htu(htu: str, expected: str) -> None:
    assert canonical_htu(htu) == expected


HTU_REFUSED = [
    "",
    "/connect/token",  # relative
    "connect/token",
    "//a.example/p",  # scheme-relative
    "a.example/p",
    "ftp://a.example/p",
    "file:///etc/passwd",
    "ws://a.example/p",
    "urn:example:x",
    "https:/a.example/p",
    "https:///p",  # no host
    "https://",
    "https://user@a.example/p",  # userinfo
    "https://user:pw@a.example/p",
    "https://@a.example/p",
    "https://a.example/" + "p" * 2048,  # over 2048 characters
    "https://a.example/a b",  # space
    " https://a.example/p",
    "https://a.example/p\n",
    "https://a.example/p\r\nX: y",
    "https://a.example/\tp",
    "https://a.example/\x00",
    "https://a.example/\x7f",
    "https://a.example/ø",  # non-ASCII
    "https://bücher.example/",
    "https://a.example:99999/p",  # bad ports
    "https://a.example:65536/p",
    "https://a.example:-1/p",
    "https://a.example:+80/p",
    "https://a.example:8o/p",
    "https://a.example:80:80/p",
    "https://a.example:١٢/p",
    "https://[::1/p",  # malformed hosts
    "https://::1]/p",
    "https://[::1]x/p",
    "https://[::1]:x/p",
    "https://[1.2.3.4]/p",
    "https://[v1.fe]/p",
    "https://[fe80::1%25eth0]/p",
    "https://[zz::1]/p",
    "https://a<b>.example/p",
    "https://a\\b.example/p",
    'https://a"b.example/p',
    "https://a%zz.example/p",
]


@pytest.mark.parametrize("htu", HTU_REFUSED)
def test_canonical_htu_refused(htu: str) -> None:
    _refused(lambda: canonical_htu(htu), "htu")


def test_canonical_htu_length_limit() -> None:
    base = "https://a.example/"
    assert canonical_htu(base + "p" * (2048 - len(base))) == base + "p" * (2048 - len(base))
    _refused(lambda: canonical_htu(base + "p" * (2049 - len(base))), "htu")


# ------------------------------------------------------- unclean paths (HtuPolicy)

POLICY = HtuPolicy.from_settings("https://helseid-sts.test.nhn.no/connect/token", ("https://api.example.no/deft",))

UNCLEAN_PATHS = [
    "/deft/x%3bjsessionid=1",  # encoded ;
    "/deft/x%3Ba",
    "/deft/x%00",  # encoded NUL and other control characters
    "/deft/x%0a",
    "/deft/x%0D%0A",
    "/deft/x%1f",
    "/deft/x%7F",
    "/deft/..%20/admin",  # Windows drops trailing dots and spaces: ".. " and "..." are ".."
    "/deft/.%20/admin",
    "/deft/...",
    "/deft/.../admin",
    "/deft/..../admin",
    "/deft/%2e%2e%2e/admin",
    "/deft/..%20%20/admin",
    "/deft/%c0%ae%c0%ae/admin",  # over-long UTF-8 for "."
    "/deft/%c0%af",  # over-long "/"
    "/deft/%e0%80%ae",
    "/deft/%ff",  # not UTF-8 at all
    "/deft/%c3",  # truncated sequence
    "/deft/x%",  # invalid percent-encoding
    "/deft/x%z",
    "/deft/x%zz",
    "/deft/x%2",
    "/deft/x%g0",
    "/deft/..",  # still refused: dot-segments, also encoded and with parameters
    "/deft/./x",
    "/deft/%2e",
    "/deft/..;x/admin",
    "/deft/a%2fb",
    "/deft/a%5cb",
    "/deft/%252e%252e",
]


@pytest.mark.parametrize("path", UNCLEAN_PATHS)
def test_unclean_paths_refused(path: str) -> None:
    error = _refused(lambda: POLICY.check("https://api.example.no" + path), "htu")
    assert error.code == "INVALID_ARGUMENT"


CLEAN_PATHS = [
    "/deft/files",
    "/deft/a%20b",  # a space inside a name is fine
    "/deft/%C3%A6%C3%B8%C3%A5",  # UTF-8 "æøå"
    "/deft/%41%7e",
    "/deft/.well-known/x",
    "/deft/a.",  # a trailing dot after a name
    "/deft/..foo",
    "/deft/x;v=1",  # a path parameter (unencoded ;) is clean
    "/deft//double",
]


@pytest.mark.parametrize("path", CLEAN_PATHS)
def test_clean_paths_signed(path: str) -> None:
    assert POLICY.check("https://api.example.no" + path) == "https://api.example.no" + path


@pytest.mark.parametrize("path", ["/deft%3b", "/deft/...", "/deft/%c0%ae", "/deft%"])
def test_unclean_base_url_refused(path: str) -> None:
    with pytest.raises(ValueError, match="a base URL's path"):
        UrlBase.parse("https://api.example.no" + path)
