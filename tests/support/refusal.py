"""Asserting a refusal of the signing core: the field named, the status, the message shape."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from helseid_signer.errors import RequestError


def refused(call: Callable[[], object], field: str, code: str = "INVALID_ARGUMENT") -> RequestError:
    """Run ``call``; it must raise RequestError naming ``field`` with status ``code``, and its
    message must start with the field's name. Returns the error."""
    with pytest.raises(RequestError) as info:
        call()
    assert info.value.field == field
    assert info.value.code == code
    assert str(info.value).startswith(f"{field}: ")
    return info.value
