"""Everything a benchmark run starts, in a temporary folder, and stops again:

* a SoftHSM token (``tests/support/softhsm.py``) with keys made by the product's own
  ``helseid-signer keys create``: RSA-2048 for RS256 and for PS256, P-256 for ES256;
* the local HelseID-like authorization server (oidc-provider) knowing the service's
  assertion key and the in-process baseline's;
* the DEFT stand-in API (DPoP-protected, verifies with jwcrypto), in this process;
* ``helseid-signer serve`` with ``workers`` processes on a loopback port, configured as
  production is: audit records to a file (in the temporary folder) with
  ``on_failure = "fail_closed"``, and Prometheus metrics on (``[metrics]``, multiprocess mode
  when there are several workers).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from demo.deft_api import DeftApi
from tests.support.authserver import AuthServer, running_authserver
from tests.support.signerkit import keys_create
from tests.support.softhsm import SoftHsmToken, create_token

from . import inprocess, procstat

SCOPE = "nhn:deft/api"
CLIENT_ID = "bench-client"
INPROC_CLIENT_ID = "bench-inprocess"
LIFETIME = 10
#: key name -> (key spec, alg)
KEYS = {"rs256": ("RSA-2048", "RS256"), "ps256": ("RSA-2048", "PS256"), "es256": ("EC-P256", "ES256")}
#: profile -> (assertion key, DPoP key); "rs" is the one the token flow uses
PROFILES = {"rs": ("rs256", "es256"), "ps": ("ps256", "es256"), "es": ("es256", "es256")}
FLOW_PROFILE = "rs"


@dataclass
class World:
    folder: Path
    token: SoftHsmToken
    jwks: dict[str, dict]
    auth: AuthServer
    api: DeftApi
    config: Path
    audit: Path
    signer: subprocess.Popen
    address: str
    workers: int
    inproc_pems: tuple[bytes, bytes]
    worker_pids: list[int] = field(default_factory=list)

    @property
    def server_pids(self) -> list[int]:
        """The processes of the service: the supervisor (if any) and its workers."""
        return [self.signer.pid] + [p for p in self.worker_pids if p != self.signer.pid]

    def find_workers(self) -> list[int]:
        if self.workers == 1:
            return [self.signer.pid]
        return sorted(p for p in procstat.children(self.signer.pid) if "spawn_main" in procstat.cmdline(p))

    def loadgen_setup(self, channels: int) -> dict:
        issuer = self.auth.issuer
        return {
            "target": self.address,
            "worker_pids": self.worker_pids,
            "channels": channels,
            "issuer": issuer,
            "token_endpoint": self.auth.token_endpoint,
            "client_id": CLIENT_ID,
            "inproc_client_id": INPROC_CLIENT_ID,
            "scope": SCOPE,
            "lifetime": LIFETIME,
            "inproc_assertion_pem": self.inproc_pems[0],
            "inproc_dpop_pem": self.inproc_pems[1],
            "jwks": self.jwks,
            "algs": {name: alg for name, (_, alg) in KEYS.items()},
            "profiles": {p: {"assertion_key": a, "dpop_key": d} for p, (a, d) in PROFILES.items()},
            "flow_profile": FLOW_PROFILE,
            "api_url": self.api.api_url + "/objects",
            # the DPoP API call cell: GET download-status of an object stored at start-up
            "api_url_status": f"{self.api.api_url}/objects/{self.api.put_object(b'bench')}/download-status",
        }

    def raw_keys(self) -> dict[str, tuple[str, str, dict]]:
        return {name: (self.token.uri(name), alg, self.jwks[name]) for name, (_, alg) in KEYS.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signer_config(
    path: Path,
    token: SoftHsmToken,
    issuer: str,
    api_base: str,
    workers: int,
    audit: Path,
    sign_on_event_loop: bool = False,
) -> Path:
    lines = [
        "# Written by the benchmark (benchmarks/world.py) for one run.",
        "[server]",
        'listen = "127.0.0.1:0"',
        "insecure = true",
        f"workers = {workers}",
        "",
        "[backends.pkcs11]",
        f'module = "{token.module}"',
        f'pin_file = "{token.pin_file}"',
        f"sign_on_event_loop = {'true' if sign_on_event_loop else 'false'}",
        "",
        "[audit]",
        'sink = "file"',
        f'path = "{audit}"',
        'on_failure = "fail_closed"',
        "",
        "[metrics]",
        f'listen = "127.0.0.1:{_free_port()}"',
        "",
    ]
    for name, (_, alg) in KEYS.items():
        lines += [f"[keys.{name}]", f'uri = "{token.uri(name)}"', f'alg = "{alg}"', ""]
    for name, (assertion, dpop) in PROFILES.items():
        lines += [
            f"[profiles.{name}]",
            f'client_id = "{CLIENT_ID}"',
            f'issuer = "{issuer}"',
            f'assertion_key = "{assertion}"',
            f'dpop_key = "{dpop}"',
            f"assertion_lifetime = {LIFETIME}",
            f'api_base_urls = ["{api_base}"]',
            "",
        ]
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def start_signer(
    config: Path, env: dict[str, str], log: Path, timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen, str]]:
    ready = config.parent / "ready"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config), "--ready-file", str(ready)],
            env={**os.environ, **env},
            stdout=log_file,
            stderr=log_file,
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"signer exited with {proc.returncode}: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"signer not ready after {timeout} s: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            yield proc, ready.read_text()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def world(folder: Path, workers: int, say=print, sign_on_event_loop: bool = False) -> Iterator[World]:
    """Start everything (see the module docstring) and stop it on exit."""
    say("  SoftHSM token and keys (helseid-signer keys create) ...")
    token = create_token(folder / "token", label="bench")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)  # for the raw-backend processes (spawned from here)
    jwks = {name: keys_create(token, name, spec, alg) for name, (spec, alg) in KEYS.items()}
    pems = inprocess.new_keys()
    clients = [
        {"client_id": CLIENT_ID, "jwks": {"keys": [jwks[PROFILES[FLOW_PROFILE][0]]]}, "scope": SCOPE},
        {"client_id": INPROC_CLIENT_ID, "jwks": {"keys": [inprocess.public_assertion_jwk(pems[0])]}, "scope": SCOPE},
    ]
    say("  authorization server (oidc-provider) and DEFT stand-in API ...")
    with running_authserver(clients, access_token_ttl=3600) as auth, DeftApi(auth.issuer) as api:
        audit = folder / "audit.jsonl"
        config = signer_config(
            folder / "signer.toml", token, auth.issuer, api.base_url + "/api", workers, audit, sign_on_event_loop
        )
        say(f"  helseid-signer serve with {workers} worker(s) ...")
        with start_signer(config, {"SOFTHSM2_CONF": str(token.conf)}, folder / "signer.log") as (proc, address):
            w = World(folder, token, jwks, auth, api, config, audit, proc, address, workers, pems)
            w.worker_pids = w.find_workers()
            if len(w.worker_pids) != workers:
                raise RuntimeError(f"expected {workers} worker processes, found {w.worker_pids}")
            yield w
