"""One conformance suite, run against every key backend.

Each backend under test is described by a :class:`BackendUnderTest` made by a factory
fixture named ``conformance_<scheme>``. The schemes come from the backend registry
(``backends.base.REGISTRY``): a registered backend without its fixture fails the suite
instead of being left out. The tests in this
folder use only the :class:`~helseid_signer.backends.base.KeyBackend` protocol, the
optional :class:`KeyCreator`, and independent verifiers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from helseid_signer.backends.base import REGISTRY, KeyBackend
from tests.support.softhsm import SoftHsmToken

#: Further rounds of a registered backend in another mode of its service.
MODES = {"azurekv": ("azurekv_mhsm",)}  # Azure Key Vault, and Managed HSM (FIPS 140-3 level 3)
BACKENDS = [name for scheme in REGISTRY for name in (scheme, *MODES.get(scheme, ()))]


@dataclass
class BackendUnderTest:
    """A backend plus a way to make fresh keys in it.

    Attributes:
        name: the scheme (``pkcs11``, ``awskms``, ``azurekv``).
        backend: the backend object, as the service would build it.
        make_key: ``make_key(spec) -> uri`` creates a fresh key (``RSA-2048`` ... ``EC-P521``)
            and returns its key reference.
        fault: for backends whose endpoint the suite can break (None otherwise): callables
            used by error-mapping tests.
    """

    name: str
    backend: KeyBackend
    make_key: Callable[[str], str]
    fault: dict[str, Callable[[], None]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def conformance_pkcs11(softhsm_token: SoftHsmToken, pkcs11_backend) -> BackendUnderTest:
    counter = itertools.count()

    def make_key(spec: str) -> str:
        uri = softhsm_token.uri(f"conformance-{spec.lower()}-{next(counter)}")
        return pkcs11_backend.create_key(uri, spec).uri

    return BackendUnderTest("pkcs11", pkcs11_backend, make_key)


@pytest.fixture(scope="session")
def conformance_awskms() -> Iterator[BackendUnderTest]:
    """AWS KMS through the real boto3, against the local endpoint (moto with a test-only
    correction, tests/support/kms_endpoint.py), or real AWS KMS when
    HELSEID_AWSKMS_TEST_REGION is set (docs/backends/aws-kms.md)."""
    from tests.support.kms_endpoint import kms_conformance_target

    with kms_conformance_target() as (backend, make_key, _where):
        yield BackendUnderTest("awskms", backend, make_key)


@pytest.fixture(scope="session")
def conformance_azurekv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendUnderTest]:
    """Azure Key Vault through the real SDK, against the local stand-in of the REST API, or
    the real vault named by HELSEID_AZUREKV_TEST_VAULT (docs/backends/azure-key-vault.md)."""
    from tests.support.azure_kv_kit import conformance_target

    with conformance_target(tmp_path_factory.mktemp("azurekv")) as (backend, make_key, _where):
        yield BackendUnderTest("azurekv", backend, make_key)


@pytest.fixture(scope="session")
def conformance_azurekv_mhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendUnderTest]:
    """The azurekv backend against a Managed HSM: the stand-in in Managed HSM mode (empty
    401 body, resource https://managedhsm.azure.net, HSM key types only, ``alg`` in sign
    replies), or the real Managed HSM named by HELSEID_AZUREKV_TEST_MANAGED_HSM."""
    from tests.support.azure_kv_kit import conformance_target

    with conformance_target(tmp_path_factory.mktemp("azurekv-mhsm"), managed_hsm=True) as (backend, make_key, _):
        yield BackendUnderTest("azurekv-mhsm", backend, make_key)


@pytest.fixture(scope="session", params=BACKENDS)
def backend_under_test(request: pytest.FixtureRequest) -> BackendUnderTest:
    """Each backend in turn."""
    return request.getfixturevalue(f"conformance_{request.param}")


_KEYS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="session")
def key_for(backend_under_test: BackendUnderTest) -> Callable[[str], str]:
    """``key_for(spec) -> uri``: one key per (backend, spec), made on first use."""

    def get(spec: str) -> str:
        cache_key = (backend_under_test.name, spec)
        if cache_key not in _KEYS:
            _KEYS[cache_key] = backend_under_test.make_key(spec)
        return _KEYS[cache_key]

    return get
