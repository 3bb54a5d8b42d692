"""The parts the client library's HTTP tests run against: keys in a real SoftHSM token,
the real ``helseid-signer serve`` process, oidc-provider configured like HelseID, and two
loopback recording servers (:mod:`tests.support.dpop_resource`): ``api`` (its ``/api`` is
the profile's only API base) and ``other`` (another origin, a redirect target)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.authserver import AuthServer, running_authserver
from tests.support.dpop_resource import RecordingApi
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import SoftHsmToken, create_token

SCOPE = "nhn:deft/api"
CLIENT_ID = "client-http"
PROFILE = "app"


@dataclass
class ClientWorld:
    auth: AuthServer
    api: RecordingApi
    other: RecordingApi
    address: str  # the signer's host:port
    token: SoftHsmToken
    jwks: dict[str, dict]
    folder: Path


@contextlib.contextmanager
def client_world(folder: Path) -> Iterator[ClientWorld]:
    """Start everything; the signer's profile ``app`` may sign for the token endpoint and
    ``<api>/api`` only."""
    token = create_token(folder / "token", label="client-http")
    keys = {"assertion": ("RSA-2048", "PS256"), "dpop": ("EC-P256", "ES256")}
    jwks = {name: keys_create(token, name, spec, alg) for name, (spec, alg) in keys.items()}
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["assertion"]]}, "scope": SCOPE}
    with running_authserver([client]) as auth, RecordingApi(auth.issuer) as api, RecordingApi() as other:
        config = write_config(
            folder / "signer.toml",
            token,
            issuer=auth.issuer,
            client_id=CLIENT_ID,
            keys={name: alg for name, (_, alg) in keys.items()},
            profiles={PROFILE: ("assertion", "dpop")},
            api_base_urls=(api.base_url + "/api",),
        )
        with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
            yield ClientWorld(auth, api, other, address, token, jwks, folder)
