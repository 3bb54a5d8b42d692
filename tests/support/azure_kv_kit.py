"""Azure Key Vault backends for tests: against the local stand-in, or against a real vault
the user names (``HELSEID_AZUREKV_TEST_VAULT``; see docs/backends/azure-key-vault.md).

The stand-in module itself imports nothing of the product; this module joins the two.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helseid_signer.backends.azure_kv import AzureKvBackend
from tests.support.azure_kv_standin import KeyVaultStandIn, running_standin

#: Set to a vault URL (``https://NAME.vault.azure.net``) to run the azurekv conformance
#: tests against that vault with DefaultAzureCredential instead of the stand-in.
LIVE_VAULT_ENV = "HELSEID_AZUREKV_TEST_VAULT"
#: Set to a Managed HSM URL (``https://NAME.managedhsm.azure.net``) to run the Managed HSM
#: round of the conformance tests against it instead of the stand-in in Managed HSM mode.
LIVE_MANAGED_HSM_ENV = "HELSEID_AZUREKV_TEST_MANAGED_HSM"

log = logging.getLogger(__name__)


def standin_backend(standin: KeyVaultStandIn, **settings: Any) -> AzureKvBackend:
    """An AzureKvBackend that trusts the stand-in's CA and uses its credential."""
    options: dict[str, Any] = {"ca_bundle": str(standin.ca_path), "verify_challenge_resource": False}
    options.update(settings)
    return AzureKvBackend(token_credential=standin.credential(), **options)


def key_maker(backend: AzureKvBackend, vault_url: str, prefix: str) -> tuple[Callable[[str], str], list[str]]:
    """``make_key(spec) -> versionless azurekv: reference`` of a fresh key, and the list of
    names made (for clean-up)."""
    made: list[str] = []

    def make_key(spec: str) -> str:
        name = f"{prefix}-{spec.lower()}-{len(made)}"
        made.append(name)
        return backend.create_key(f"azurekv:{vault_url}/keys/{name}", spec).uri

    return make_key, made


@contextmanager
def conformance_target(
    folder: Path, *, managed_hsm: bool = False
) -> Iterator[tuple[AzureKvBackend, Callable[[str], str], str]]:
    """(backend, make_key, description) for the conformance suite: the stand-in (in Managed
    HSM mode with ``managed_hsm``), or the real vault named by ``HELSEID_AZUREKV_TEST_VAULT``
    (Managed HSM: ``HELSEID_AZUREKV_TEST_MANAGED_HSM``). Keys made in a real vault are
    deleted afterwards (best effort; soft-deleted keys stay recoverable until purged)."""
    live = os.environ.get(LIVE_MANAGED_HSM_ENV if managed_hsm else LIVE_VAULT_ENV)
    if not live:
        with running_standin(folder, managed_hsm=managed_hsm) as standin:
            backend = standin_backend(standin, hsm_keys=managed_hsm)
            make_key, _ = key_maker(backend, standin.url, "conformance")
            mode = "Managed HSM mode" if managed_hsm else "vault mode"
            try:
                yield backend, make_key, f"local stand-in {standin.url} ({mode})"
            finally:
                backend.close()
        return
    vault_url = live.rstrip("/")
    backend = AzureKvBackend(hsm_keys=managed_hsm or os.environ.get("HELSEID_AZUREKV_TEST_HSM") == "1")
    make_key, made = key_maker(backend, vault_url, f"helseid-conformance-{secrets.token_hex(4)}")
    try:
        yield backend, make_key, f"REAL vault {vault_url}"
    finally:
        _delete_keys(backend, vault_url, made)
        backend.close()


def _delete_keys(backend: AzureKvBackend, vault_url: str, names: list[str]) -> None:
    if not names:
        return
    from azure.keyvault.keys import KeyClient

    client = KeyClient(vault_url, backend._credential)
    for name in names:
        try:
            client.begin_delete_key(name)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort
            log.warning("could not delete test key %s in %s: %s", name, vault_url, exc)
    client.close()
