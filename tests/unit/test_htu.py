"""``htu`` canonicalisation and refusals (helseid_signer.htu).

Expected values are written out by hand from RFC 9449 section 4.2 and RFC 3986 section
6.2.3 (scheme-based normalisation).
"""

from __future__ import annotations

import pytest

from helseid_signer.htu import canonical_htu
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
