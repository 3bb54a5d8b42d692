"""Request checks and claim building (helseid_signer.claims); ``htu`` is tests/unit/test_htu.py.

Expected values are written out by hand from RFC 9449 (htu/htm/nonce/ath), RFC 3986 section
6.2.3 (scheme-based normalisation) and docs/helseid-profile.md section 2.1 (assertion_details).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from jwcrypto.common import base64url_decode, base64url_encode

from helseid_signer.claims import (
    assertion_details,
    check_access_token_sha256,
    check_htm,
    check_nonce,
    check_profile_name,
    new_jti,
)
from tests.support.refusal import refused as _refused

# --------------------------------------------------------------------------- htm


@pytest.mark.parametrize("htm", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"])
def test_check_htm_accepts_standard_upper_case(htm: str) -> None:
    assert check_htm(htm) == htm


@pytest.mark.parametrize("htm", ["post", "Post", "get", "pAtCh"])
def test_check_htm_refuses_lower_case_naming_htm(htm: str) -> None:
    err = _refused(lambda: check_htm(htm), "htm")
    assert "htm" in str(err)
    assert htm.upper() in str(err)


@pytest.mark.parametrize("htm", ["", "FETCH", "PROPFIND", "POST ", " POST", "POST\n", "GET/", "P0ST"])
def test_check_htm_refuses_unknown(htm: str) -> None:
    _refused(lambda: check_htm(htm), "htm")


# --------------------------------------------------------------------------- nonce

NQCHAR = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')


def test_check_nonce_empty_is_none() -> None:
    assert check_nonce("") is None


@pytest.mark.parametrize(
    "nonce",
    ["eyJ7S_zG.eyJH0-Z.HX4w-7v", "a", NQCHAR, "x" * 512, "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"],
)
def test_check_nonce_accepts_nqchar(nonce: str) -> None:
    assert check_nonce(nonce) == nonce


@pytest.mark.parametrize(
    "nonce",
    ["x" * 513, 'a"b', "a\\b", "a b", " ", "a\tb", "a\n", "\x00", "\x7f", "nønce", "a\u2028b"],
)
def test_check_nonce_refused(nonce: str) -> None:
    _refused(lambda: check_nonce(nonce), "nonce")


# --------------------------------------------------------------------------- ath


def test_access_token_sha256_empty_is_none() -> None:
    assert check_access_token_sha256(b"") is None


def test_access_token_sha256_gives_ath() -> None:
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 section 7.1
    digest = hashlib.sha256(token.encode("ascii")).digest()
    assert check_access_token_sha256(digest) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    assert check_access_token_sha256(b"\xff" * 32) == base64url_encode(b"\xff" * 32)


@pytest.mark.parametrize("length", [1, 20, 31, 33, 48, 64])
def test_access_token_sha256_wrong_length(length: int) -> None:
    err = _refused(lambda: check_access_token_sha256(b"\x01" * length), "access_token_sha256")
    assert str(length) in str(err)


# --------------------------------------------------------------------------- profile name


@pytest.mark.parametrize("name", ["demo", "a", "A-b_c.9", "x" * 64])
def test_profile_name_ok(name: str) -> None:
    assert check_profile_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "æ", "demo\n", "a:b"])
def test_profile_name_refused(name: str) -> None:
    _refused(lambda: check_profile_name(name), "profile")


# --------------------------------------------------------------------------- assertion_details

PARENT, CHILD, OTHER = "912345678", "998877665", "111111111"
ALLOWED = (PARENT, CHILD)


def _expected(system: str, value: str) -> dict:
    # Typed from docs/helseid-profile.md section 2.1, then parsed: the exact JSON shape.
    return json.loads(
        '{"type": "helseid_authorization", "practitioner_role": {"organization": {"identifier": '
        f'{{"system": "{system}", "type": "ENH", "value": "{value}"}}}}}}}}'
    )


def test_assertion_details_single_tenant_child() -> None:
    got = assertion_details("single", ALLOWED, "", CHILD)
    assert got == _expected("urn:oid:2.16.578.1.12.4.1.4.101", CHILD)
    assert json.loads(json.dumps(got)) == got


def test_assertion_details_multi_tenant_parent_only() -> None:
    assert assertion_details("multi", ALLOWED, PARENT, "") == _expected("urn:oid:1.0.6523", f"NO:ORGNR:{PARENT}")


def test_assertion_details_multi_tenant_parent_and_child() -> None:
    got = assertion_details("multi", ALLOWED, PARENT, CHILD)
    assert got == _expected("urn:oid:1.0.6523", f"NO:ORGNR:{PARENT}:{CHILD}")


@pytest.mark.parametrize("tenancy", ["single", "multi"])
def test_assertion_details_none_without_numbers(tenancy: str) -> None:
    assert assertion_details(tenancy, ALLOWED, "", "") is None
    assert assertion_details(tenancy, (), "", "") is None


def test_assertion_details_single_tenant_refuses_parent() -> None:
    _refused(lambda: assertion_details("single", ALLOWED, PARENT, ""), "parent_organization_number")
    _refused(lambda: assertion_details("single", ALLOWED, PARENT, CHILD), "parent_organization_number")


def test_assertion_details_multi_tenant_child_needs_parent() -> None:
    _refused(lambda: assertion_details("multi", ALLOWED, "", CHILD), "parent_organization_number")


BAD_ORGNR = ["12345678", "1234567890", "12345678a", "١٢٣٤٥٦٧٨٩", " 12345678", "123456789 ", "123456789\n", "+12345678"]


@pytest.mark.parametrize("bad", BAD_ORGNR)
@pytest.mark.parametrize(
    ("tenancy", "field"),
    [("single", "child_organization_number"), ("multi", "parent_organization_number")],
)
def test_assertion_details_nine_digit_rule(bad: str, tenancy: str, field: str) -> None:
    allowed = (*ALLOWED, bad)  # malformed is malformed even when listed
    parent, child = ("", bad) if tenancy == "single" else (bad, "")
    _refused(lambda: assertion_details(tenancy, allowed, parent, child), field)


@pytest.mark.parametrize("bad", BAD_ORGNR)
def test_assertion_details_nine_digit_rule_multi_child(bad: str) -> None:
    _refused(lambda: assertion_details("multi", ALLOWED, PARENT, bad), "child_organization_number")


def test_assertion_details_malformed_wins_over_not_allowed() -> None:
    _refused(lambda: assertion_details("single", (), "", "12345"), "child_organization_number")
    _refused(lambda: assertion_details("multi", (), "12345", ""), "parent_organization_number")


@pytest.mark.parametrize(
    ("tenancy", "parent", "child", "field"),
    [
        ("single", "", OTHER, "child_organization_number"),
        ("multi", OTHER, "", "parent_organization_number"),
        ("multi", OTHER, CHILD, "parent_organization_number"),
        ("multi", PARENT, OTHER, "child_organization_number"),
    ],
)
def test_assertion_details_not_on_allow_list(tenancy: str, parent: str, child: str, field: str) -> None:
    _refused(lambda: assertion_details(tenancy, ALLOWED, parent, child), field, "PERMISSION_DENIED")


def test_assertion_details_empty_allow_list_denies_everything() -> None:
    _refused(lambda: assertion_details("single", (), "", CHILD), "child_organization_number", "PERMISSION_DENIED")


# --------------------------------------------------------------------------- jti


def test_new_jti_shape_and_uniqueness() -> None:
    seen = set()
    for _ in range(20_000):
        jti = new_jti()
        assert len(jti) == 32
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", jti)
        seen.add(jti)
    assert len(seen) == 20_000
    assert len(base64url_decode(new_jti())) == 24  # 192 bits


def test_new_jti_bits_vary() -> None:
    """Every bit position takes both values over many jtis (no constant or truncated part)."""
    ored, anded = 0, (1 << 192) - 1
    for _ in range(2000):
        value = int.from_bytes(base64url_decode(new_jti()), "big")
        ored |= value
        anded &= value
    assert ored == (1 << 192) - 1
    assert anded == 0
