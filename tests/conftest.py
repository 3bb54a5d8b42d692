"""Shared fixtures. Keep this file small and generic; feature-specific fixtures live in
the test modules that use them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.softhsm import SoftHsmToken, create_token

#: Tests against real services (HelseID's test environment) run only on request, with their
#: own documented command: HELSEID_LIVE=1 .venv/bin/python -m pytest tests/live ...
collect_ignore = [] if os.environ.get("HELSEID_LIVE") == "1" else ["live"]


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A fresh SoftHSM token (label ``helseid-test``) for the whole test session.

    Sets ``SOFTHSM2_CONF`` in ``os.environ`` to the token's configuration: SoftHSM reads
    it once, at the first ``pkcs11.lib()`` of the process, so every test that loads the
    module must depend on this fixture (directly or through ``pkcs11_backend``).
    """
    token = create_token(tmp_path_factory.mktemp("softhsm"), label="helseid-test")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    yield token
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def pkcs11_backend(softhsm_token: SoftHsmToken):
    """A :class:`Pkcs11Backend` logged in to ``softhsm_token`` (PIN from its file)."""
    from helseid_signer.backends.pkcs11 import Pkcs11Backend

    backend = Pkcs11Backend(softhsm_token.module, pin_file=str(softhsm_token.pin_file))
    yield backend
    backend.close()
