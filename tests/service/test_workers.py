"""Several worker processes on one port (SO_REUSEPORT): every core signs, each worker has
its own Cryptoki instance, and the supervisor restarts a worker that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from helseid_signer_client import SignerClient
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in text]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    token = create_token(folder / "token", label="workers")
    public = jwk.JWK(**keys_create(token, "rsa", "RSA-2048", "RS256"))
    config = write_config(
        folder / "signer.toml", token, issuer="https://helseid-sts.test.nhn.no", client_id="w",
        keys={"rsa": "RS256"}, profiles={"p": ("rsa", "rsa")},
    )  # fmt: skip
    config.write_text(config.read_text().replace("insecure = true", "insecure = true\nworkers = 2"))
    ready = Path(tempfile.mkdtemp()) / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config), "--ready-file", str(ready)],
        env=token.env(), stdout=subprocess.DEVNULL, stderr=open(folder / "log", "wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (folder / "log").read_text()
        assert time.monotonic() < deadline, "workers not ready"
        time.sleep(0.05)
    yield proc, ready.read_text(), public
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_two_workers_sign_concurrently_and_all_signatures_verify(two_workers):
    proc, address, public = two_workers
    assert len(_children(proc.pid)) >= 2  # spawn may add a resource tracker
    with SignerClient(address) as client, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.sign_client_assertion("p"), range(400)))
    for result in results:
        obj = jws.JWS()
        obj.deserialize(result.jwt, key=public)
        assert json.loads(obj.payload)["jti"] == result.jti
    assert len({r.jti for r in results}) == 400


def test_supervisor_restarts_a_killed_worker(two_workers):
    proc, address, _ = two_workers
    before = set(_children(proc.pid))
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = set(_children(proc.pid))
        if victim not in now and len(now) >= len(before):
            break
        time.sleep(0.1)
    assert victim not in now and len(now) >= len(before)
    time.sleep(1.5)  # the new worker initialises Cryptoki and binds
    with SignerClient(address) as client:
        assert all(
            client.sign_dpop_proof("p", "POST", "https://helseid-sts.test.nhn.no/connect/token").jwt for _ in range(50)
        )


def test_configuration_error_in_workers_stops_the_supervisor(tmp_path):
    """A key that does not fit its alg is a configuration error: with several workers the
    supervisor exits with status 2 instead of restarting workers forever."""
    token = create_token(tmp_path / "token", label="wbad")
    keys_create(token, "ec", "EC-P256", "ES256")
    config = write_config(
        tmp_path / "signer.toml", token, issuer="https://helseid-sts.test.nhn.no", client_id="w",
        keys={"ec": "ES384"}, profiles={"p": ("ec", "ec")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "workers = 2"),
    )  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config)],
        env=token.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "keys.ec" in result.stderr and time.monotonic() - started < 30
    assert "TypeError" not in result.stderr


def test_a_second_single_server_cannot_take_over_a_port_in_use(two_workers, tmp_path):
    """SO_REUSEPORT is only for one supervisor's workers: another instance on the same port
    must fail to start, not silently take half of the connections."""
    _, address, _ = two_workers
    token = create_token(tmp_path / "token", label="second")
    keys_create(token, "k", "EC-P256", "ES256")
    config = write_config(
        tmp_path / "signer.toml", token, issuer="https://helseid-sts.test.nhn.no", client_id="impostor",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=(f'listen = "{address}"', "insecure = true"),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config)],
        env=token.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "server.listen: cannot listen on" in result.stderr, result.stderr[-1500:]
