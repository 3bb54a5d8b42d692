"""Make keys and signer configurations for tests through the product's real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.softhsm import SoftHsmToken


def keys_create(token: SoftHsmToken, name: str, spec: str, alg: str) -> dict[str, str]:
    """Run ``helseid-signer keys create`` in a subprocess; return the printed public JWK."""
    out = subprocess.run(
        [
            sys.executable, "-m", "helseid_signer.cli", "keys", "create",
            "--uri", token.uri(name), "--spec", spec, "--alg", alg,
            "--module", token.module, "--pin-file", str(token.pin_file),
        ],
        env=token.env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)["jwk"]


def write_config(
    path: Path,
    token: SoftHsmToken,
    *,
    issuer: str,
    client_id: str,
    keys: dict[str, str],
    profiles: dict[str, tuple[str, str]],
    extra_profile_lines: dict[str, list[str]] | None = None,
    api_base_urls: tuple[str, ...] = (),
    extra_lines: tuple[str, ...] = (),
    server_lines: tuple[str, ...] = ('listen = "127.0.0.1:0"', "insecure = true"),
    pkcs11_lines: tuple[str, ...] = (),
) -> Path:
    """Write a signer TOML: ``keys`` maps key name -> alg (object label = key name);
    ``profiles`` maps profile name -> (assertion key, DPoP key), each with ``api_base_urls``;
    ``extra_lines`` are appended (callers, audit, ...); ``server_lines`` make the
    ``[server]`` section (default: plaintext on a free loopback port); ``pkcs11_lines``
    are added to ``[backends.pkcs11]``."""
    lines = [
        "[server]", *server_lines, "",
        "[backends.pkcs11]", f'module = "{token.module}"', f'pin_file = "{token.pin_file}"', *pkcs11_lines, "",
    ]  # fmt: skip
    for name, alg in keys.items():
        lines += [f"[keys.{name}]", f'uri = "{token.uri(name)}"', f'alg = "{alg}"', ""]
    for name, (assertion_key, dpop_key) in profiles.items():
        lines += [
            f"[profiles.{name}]", f'client_id = "{client_id}"', f'issuer = "{issuer}"',
            f'assertion_key = "{assertion_key}"', f'dpop_key = "{dpop_key}"',
            "api_base_urls = [" + ", ".join(f'"{u}"' for u in api_base_urls) + "]",
        ]  # fmt: skip
        lines += (extra_profile_lines or {}).get(name, []) + [""]
    path.write_text("\n".join([*lines, *extra_lines, ""]))
    return path
