"""Keys shared by the unit tests, generated once per session (RSA key generation is slow)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

EC_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


@pytest.fixture(scope="session")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="session")
def rsa_keys(rsa_2048: rsa.RSAPrivateKey) -> list[rsa.RSAPrivateKey]:
    """Several RSA keys of the sizes HelseID clients use (2048 .. 4096 bits)."""
    sizes = (2048, 2048, 2048, 3072, 4096)
    return [rsa_2048] + [rsa.generate_private_key(public_exponent=65537, key_size=s) for s in sizes]


@pytest.fixture(scope="session")
def ec_keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    """One private key per JOSE curve name."""
    return {name: ec.generate_private_key(curve()) for name, curve in EC_CURVES.items()}
