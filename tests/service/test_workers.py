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

import grpc
import pytest
from jwcrypto import jwk, jws

from helseid_signer_client import SignerClient, SignerError
from tests.support.signer_process import start_signer
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
        folder / "signer.toml", token, issuer="https://127.0.0.1:4443", client_id="w",
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
        assert all(client.sign_dpop_proof("p", "POST", "https://127.0.0.1:4443/connect/token").jwt for _ in range(50))


def test_configuration_error_in_workers_stops_the_supervisor(tmp_path):
    """A key that does not fit its alg is a configuration error: with several workers the
    supervisor exits with status 2 instead of restarting workers forever."""
    token = create_token(tmp_path / "token", label="wbad")
    keys_create(token, "ec", "EC-P256", "ES256")
    config = write_config(
        tmp_path / "signer.toml", token, issuer="https://127.0.0.1:4443", client_id="w",
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
        tmp_path / "signer.toml", token, issuer="https://127.0.0.1:4443", client_id="impostor",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=(f'listen = "{address}"', "insecure = true"),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config)],
        env=token.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "server.listen: cannot listen on" in result.stderr, result.stderr[-1500:]


def _on_every_worker(address: str, call, channels: int = 16) -> list:
    """``call(client)`` over ``channels`` new connections. SO_REUSEPORT hashes connections
    over the workers; with 2 workers, 16 connections all landing on one has odds 2 in 65,536."""
    results = []
    for _ in range(channels):
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        with SignerClient(channel=channel, timeout=10) as client:
            results.append(call(client))
    return results


def _start_workers(token, config: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start ``serve`` (workers from the config); return the process, its address, its log."""
    signer = start_signer(config, token.env(), timeout=60)
    return signer.proc, signer.address, signer.log


def _two_worker_config(tmp_path: Path, label: str):
    """A token with key ``k``, and a 2-worker configuration with profile ``p`` on it;
    returns (token, public JWK, write_config keywords, server lines, config path)."""
    token = create_token(tmp_path / "token", label=label)
    public = jwk.JWK(**keys_create(token, "k", "EC-P256", "ES256"))
    common = dict(issuer="https://127.0.0.1:4443", client_id="w", keys={"k": "ES256"})
    server = ('listen = "127.0.0.1:0"', "insecure = true", "workers = 2")
    config = write_config(tmp_path / "signer.toml", token, profiles={"p": ("k", "k")}, server_lines=server, **common)
    return token, public, common, server, config


def _issuer_of_q(public: jwk.JWK):
    """A call for :func:`_on_every_worker`: sign an assertion for profile ``q``, verify it
    with jwcrypto, return its ``iss``."""

    def sign_q(client):
        obj = jws.JWS()
        obj.deserialize(client.sign_client_assertion("q").jwt, key=public)
        return json.loads(obj.payload)["iss"]

    return sign_q


def test_a_sighup_while_a_worker_starts_is_applied_not_fatal(tmp_path):
    """A reload that arrives while a restarted worker is still starting (before its event
    loop handles SIGHUP) is kept and applied once it serves; SIGHUP's default action would
    have killed it."""
    token, public, common, server, config = _two_worker_config(tmp_path, "whup")
    proc, address, log = _start_workers(token, config)
    try:
        os.kill(max(_children(proc.pid)), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "restarting it" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        # The new worker is importing its modules now: the reload reaches it before it serves.
        profiles = {"p": ("k", "k"), "q": ("k", "k")}
        config.write_text(write_config(tmp_path / "b.toml", token, profiles=profiles, server_lines=server,
                                       **common).read_text())  # fmt: skip
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while log.read_text().count("configuration reloaded") < 2:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)

        assert _on_every_worker(address, _issuer_of_q(public)) == ["w"] * 16
        assert "exited with -1" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_restarted_worker_starts_with_the_configuration_the_workers_applied(tmp_path):
    """Reload B (adds profile q: applied), then reload C (adds profile r on a key that does
    not exist: every worker refuses it), then a worker dies. The supervisor restarts it
    with B - what the workers applied - not with the start-up file and not with C."""
    token, public, common, server, config = _two_worker_config(tmp_path, "wreload")
    proc, address, log = _start_workers(token, config)
    try:
        sign_q = _issuer_of_q(public)

        def refusal_r(client):
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("r")
            return caught.value.code

        def reload_to(name: str, profiles: dict, keys: dict, both_workers_log: str) -> None:
            """Write the configuration over the served file, SIGHUP, and wait until both
            workers have logged ``both_workers_log`` once more."""
            before = log.read_text().count(both_workers_log)
            text = write_config(
                tmp_path / name, token, profiles=profiles, server_lines=server, **{**common, "keys": keys}
            ).read_text()
            config.write_text(text)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while log.read_text().count(both_workers_log) < before + 2:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)

        # B: profile q added; both workers apply it.
        b_profiles = {"p": ("k", "k"), "q": ("k", "k")}
        reload_to("b.toml", b_profiles, {"k": "ES256"}, "configuration reloaded")
        assert _on_every_worker(address, sign_q) == ["w"] * 16

        # C: profile r on a key that is not in the token; both workers refuse it.
        c_profiles = {**b_profiles, "r": ("missing", "missing")}
        reload_to("c.toml", c_profiles, {"k": "ES256", "missing": "ES256"}, "reload refused")

        victim = max(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "restarting it" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        time.sleep(2.0)  # the new worker initialises Cryptoki and binds
        # Every connection, the restarted worker's included: q signs (B), r does not exist (not C).
        assert _on_every_worker(address, sign_q) == ["w"] * 16
        assert set(_on_every_worker(address, refusal_r)) == {grpc.StatusCode.PERMISSION_DENIED}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_sighups_during_shutdown_neither_reload_nor_kill(tmp_path):
    """SIGTERM, then a burst of SIGHUPs while the workers drain and exit: the supervisor
    still exits 0, and no worker is killed by SIGHUP's default action."""
    token = create_token(tmp_path / "token", label="wstop")
    keys_create(token, "k", "EC-P256", "ES256")
    server = ('listen = "127.0.0.1:0"', "insecure = true", "workers = 2")
    config = write_config(
        tmp_path / "signer.toml", token, issuer="https://127.0.0.1:4443", client_id="w",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")}, server_lines=server,
    )  # fmt: skip
    proc, _, log = _start_workers(token, config)
    proc.send_signal(signal.SIGTERM)
    for _ in range(20):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    assert "exited with -1" not in log.read_text()
