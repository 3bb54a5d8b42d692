"""PKCS#11 URI refusals added after a new user's review: invalid percent-encoding, repeated
attributes (RFC 7512 section 2.3), NUL bytes in text attributes, over-long values."""

from __future__ import annotations

import pytest

from helseid_signer.backends.base import BackendConfigError
from helseid_signer.backends.pkcs11 import Pkcs11Uri


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11:token=t;object=%zz",
        "pkcs11:token=t;object=a%0",
        "pkcs11:token=t;object=a;object=b",
        "pkcs11:token=t;object=a%00b",
        "pkcs11:token=t;object=" + "x" * 513,
    ],
)
def test_refused(uri):
    with pytest.raises(BackendConfigError):
        Pkcs11Uri.parse(uri)


def test_binary_id_may_hold_zero_bytes():
    assert Pkcs11Uri.parse("pkcs11:token=t;id=%00%01%ff").object_id == b"\x00\x01\xff"
