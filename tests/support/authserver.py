"""Run the local HelseID-like authorization server (``authserver/server.mjs``) for tests.

The server is oidc-provider configured like HelseID: client_credentials only,
``private_key_jwt`` only, DPoP with server nonces always required, DPoP-bound JWT
access tokens with ``cnf.jkt``, client assertions with ``typ`` ``client-authentication+jwt``
and ``aud`` equal to the issuer. It needs ``node`` on PATH and ``npm ci --prefix authserver``
to have been run; without them this module raises, it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = REPO_ROOT / "authserver" / "server.mjs"
NODE_MODULES = REPO_ROOT / "authserver" / "node_modules"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class AuthServerError(RuntimeError):
    """The local authorization server could not be started."""


@dataclass(frozen=True)
class AuthServer:
    """A running local authorization server.

    Attributes:
        issuer: issuer identifier, ``"http://127.0.0.1:<port>"`` (no trailing slash); the
            value a client assertion's ``aud`` must carry.
        token_endpoint: from discovery: ``issuer + "/connect/token"`` (HelseID's path).
        jwks_uri: URL of the server's public JWK Set (RS256 key generated at start-up).
        stderr_log_path: file (deleted when the context exits) collecting the server's stderr: one JSON line per
            ``grant.error`` / ``server_error`` (fields ``event``, ``error``,
            ``error_description``, ``error_detail``, ``client_id``, ``path``) plus
            oidc-provider's plain-text warnings. Never contains tokens or keys.
    """

    issuer: str
    token_endpoint: str
    jwks_uri: str
    stderr_log_path: Path

    def error_log(self) -> list[dict[str, Any]]:
        """Return the JSON lines of the stderr log (plain-text warnings are left out)."""
        entries = []
        for line in self.stderr_log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries


def _check_prerequisites() -> str:
    node = shutil.which("node")
    if node is None:
        raise AuthServerError("`node` is not on PATH; install Node.js 20+ to run the local authorization server")
    if not NODE_MODULES.is_dir():
        raise AuthServerError(f"{NODE_MODULES} is missing; run `npm ci --prefix authserver` in {REPO_ROOT}")
    return node


@contextlib.contextmanager
def running_authserver(
    clients: Sequence[Mapping[str, Any]],
    scopes: Sequence[str] = ("nhn:deft/api",),
    access_token_ttl: int = 300,
) -> Iterator[AuthServer]:
    """Start the local authorization server on 127.0.0.1 and a free port; stop it on exit.

    Args:
        clients: one mapping per client: ``{"client_id": str, "jwks": {"keys": [public JWK
            dicts]}, "scope": "nhn:deft/api ..."}`` (space-separated scopes the client may ask for).
            Only the assertion key is registered; DPoP keys are never registered.
        scopes: every scope the server knows (all map to one resource, ``urn:nhn:deft``,
            which becomes the access token's ``aud``).
        access_token_ttl: access-token lifetime in seconds.

    Yields:
        AuthServer with the issuer, token endpoint, JWKS URI and stderr log path.

    Raises:
        AuthServerError: node or ``authserver/node_modules`` missing, the server exited, or
            it printed no ready line within ``READY_TIMEOUT_S`` (20 s).
    """
    node = _check_prerequisites()
    config = {
        "host": "127.0.0.1",
        "port": 0,
        "clients": [dict(c) for c in clients],
        "scopes": list(scopes),
        "access_token_ttl": access_token_ttl,
    }
    with tempfile.TemporaryDirectory(prefix="authserver-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        stderr_path = Path(tmp) / "stderr.log"
        with stderr_path.open("wb") as stderr_file:
            proc = subprocess.Popen(
                [node, str(SERVER_SCRIPT), str(config_path)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
            )
            try:
                ready = _wait_ready(proc, stderr_path)
                issuer = ready["issuer"]
                yield AuthServer(
                    issuer=issuer,
                    token_endpoint=_discover(issuer)["token_endpoint"],
                    jwks_uri=ready["jwks_uri"],
                    stderr_log_path=stderr_path,
                )
            finally:
                _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], stderr_path: Path) -> dict[str, Any]:
    """Read the single JSON ready line from stdout, waiting at most READY_TIMEOUT_S seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AuthServerError(
                    f"authorization server not ready after {READY_TIMEOUT_S:.0f} s; stderr: {_tail(stderr_path)}"
                )
            if not sel.select(timeout=remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=STOP_TIMEOUT_S)
                raise AuthServerError(
                    f"authorization server exited with code {proc.returncode}; stderr: {_tail(stderr_path)}"
                )
            buffer += chunk
    return json.loads(buffer.split(b"\n", 1)[0])


def _discover(issuer: str) -> dict[str, Any]:
    """Fetch ``{issuer}/.well-known/openid-configuration`` (loopback only, stdlib client)."""
    url = issuer + "/.well-known/openid-configuration"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with opener.open(url, timeout=READY_TIMEOUT_S) as response:
        return json.load(response)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return "<no stderr log>"
