"""Many replicas behind client-side load balancing: three real ``helseid-signer serve``
processes on 127.0.0.1 (one SoftHSM token, each process its own Cryptoki instance and its
own audit file), one client channel with the library's default service config
(``round_robin`` + retries of UNAVAILABLE), sustained load from many threads, and one
replica killed with SIGKILL in the middle of it.

Oracles: the caller's own count of failures (must be zero); each replica's audit file
(which replica signed what; every JWS a caller received has its ``jti`` in exactly one
replica's audit trail, since a fail-closed replica answers only after the record is
written); jwcrypto verifies every signature. A negative control runs the same kill with
retries switched off and must see failed calls: it proves that the kill does hit calls in
flight, so the zero of the first test is the retry policy's doing, not luck.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from jwcrypto import jwk, jws

from helseid_signer_client import AsyncSignerClient, SignerClient, SignerError
from helseid_signer_client.signer import DEFAULT_SERVICE_CONFIG, channel_options
from tests.support.signer_process import SignerProcess, start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token, write_conf

ISSUER = "https://127.0.0.1:4443"
TOKEN_ENDPOINT = ISSUER + "/connect/token"
REPLICAS = 3
THREADS = 24  # enough calls in flight that a killed replica always takes some with it


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    token = create_token(folder / "token", label="replicas")
    jwks = {
        "assertion": jwk.JWK(**keys_create(token, "assertion", "RSA-2048", "PS256")),
        "dpop": jwk.JWK(**keys_create(token, "dpop", "EC-P256", "ES256")),
    }
    return token, jwks


def _token_copy(token, folder: Path) -> Path:
    """A copy of the token's store (the same keys) with its own softhsm2.conf: each replica
    reads its own files, as each pod would reach its own HSM client. (Processes sharing one
    SoftHSM store race at start-up: a login rewrites token.object while another process
    reads it, and that one finds no token.)"""
    conf = write_conf(folder)
    shutil.copytree(token.conf.parent / "tokens", folder / "tokens", dirs_exist_ok=True)
    return conf


@pytest.fixture
def replicas(kit, tmp_path):
    """Three signer processes, each on its own free port, each with its own audit file."""
    token, _ = kit
    configs = []
    for i in range(REPLICAS):
        audit = tmp_path / f"audit-{i}.jsonl"
        config = write_config(
            tmp_path / f"replica-{i}.toml", token, issuer=ISSUER, client_id="replicated",
            keys={"assertion": "PS256", "dpop": "ES256"}, profiles={"p": ("assertion", "dpop")},
            extra_lines=("[audit]", 'sink = "file"', f'path = "{audit}"'),
        )  # fmt: skip
        configs.append((config, audit, _token_copy(token, tmp_path / f"token-{i}")))
    with ThreadPoolExecutor(REPLICAS) as pool:
        futures = [pool.submit(start_signer, c, {"SOFTHSM2_CONF": str(conf)}) for c, _, conf in configs]
        procs = [f.result() for f in futures]
    yield [(p, audit) for p, (_, audit, _) in zip(procs, configs, strict=True)]
    for p in procs:
        p.stop()


def _audit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _signed(path: Path) -> int:
    return sum(1 for r in _audit(path) if r.get("outcome") == "signed")


def _target(replicas: list[tuple[SignerProcess, Path]]) -> str:
    return "ipv4:" + ",".join(p.address for p, _ in replicas)


def _verify(token: str, key: jwk.JWK) -> tuple[dict, dict]:
    obj = jws.JWS()
    obj.deserialize(token, key=key)
    return obj.jose_header, json.loads(obj.payload)


def _load_with_kill(
    client: SignerClient, replicas, victim: int, before_kill: int, after_kill: int, sig: signal.Signals = signal.SIGKILL
):
    """Call the signer from THREADS threads; send ``sig`` to replica ``victim`` once ``before_kill``
    calls have succeeded, and go on until ``after_kill`` more have (counts, not times, so
    that a busy machine changes the duration, not the outcome; at most 60 s in all).
    Returns (results, failures, signed per replica just before the kill, results at the
    kill); results are (kind, answer) in the order they finished."""
    results: list[tuple[str, object]] = []
    failures: list[SignerError] = []
    lock = threading.Lock()
    done = threading.Event()
    deadline = time.monotonic() + 60

    def worker(n: int) -> None:
        i = n
        while not done.is_set() and time.monotonic() < deadline:
            i += 1
            try:
                if i % 2:
                    kind, answer = "assertion", client.sign_client_assertion("p")
                else:
                    kind, answer = "dpop", client.sign_dpop_proof("p", "POST", TOKEN_ENDPOINT)
                with lock:
                    results.append((kind, answer))
            except SignerError as exc:
                with lock:
                    failures.append(exc)

    def wait_for(count: int) -> None:
        while len(results) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    try:
        wait_for(before_kill)
        before = [_signed(audit) for _, audit in replicas]
        at_kill = len(results)
        replicas[victim][0].signal(sig)
        wait_for(at_kill + after_kill)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert replicas[victim][0].wait(timeout=20) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    assert len(results) >= at_kill + after_kill, "the load did not go on after the kill"
    return results, failures, before, at_kill


def test_default_service_config_is_round_robin_with_retries_of_unavailable_and_cancelled_only():
    policy = DEFAULT_SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]
    assert DEFAULT_SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"] and 2 <= policy["maxAttempts"] <= 5
    assert DEFAULT_SERVICE_CONFIG["methodConfig"][0]["name"] == [{"service": "helseid.signer.v1.SignerService"}]
    options = dict(channel_options())
    assert json.loads(options["grpc.service_config"]) == DEFAULT_SERVICE_CONFIG
    assert channel_options(None, [("grpc.primary_user_agent", "x")]) == [("grpc.primary_user_agent", "x")]


def test_sigkill_of_one_replica_under_load_fails_no_request(kit, replicas):
    _, jwks = kit
    victim = 1
    with SignerClient(_target(replicas), timeout=10) as client:
        results, failures, before, at_kill = _load_with_kill(client, replicas, victim, before_kill=600, after_kill=600)
        # The channel still works on the two survivors after the load.
        assert client.get_client_profile("p").client_id == "replicated"

    assert failures == [], f"{len(failures)} failed calls, e.g. {failures[:3]}"
    # Every replica served a fair share before the kill (round_robin, not pick_first).
    assert all(n > sum(before) / (REPLICAS * 3) for n in before), before
    after = [_signed(audit) for _, audit in replicas]
    survivors = [i for i in range(REPLICAS) if i != victim]
    assert all(after[i] - before[i] > 100 for i in survivors), (before, after)  # they took over

    # Each JWS the callers got came from exactly one replica's audited signature...
    jti_owner: dict[str, int] = {}
    for i, (_, audit) in enumerate(replicas):
        for record in _audit(audit):
            if record.get("outcome") == "signed":
                assert record["jti"] not in jti_owner
                jti_owner[record["jti"]] = i
    served = Counter(jti_owner[answer.jti] for _, answer in results)
    assert set(served) == set(range(REPLICAS))
    assert len({answer.jti for _, answer in results}) == len(results)
    # ... and verifies with the public key (jwcrypto), with the right kid / jkt.
    for kind, answer in results:
        header, claims = _verify(answer.jwt, jwks[kind])
        assert claims["jti"] == answer.jti
        if kind == "assertion":
            assert header["kid"] == jwks["assertion"].thumbprint() and claims["aud"] == ISSUER
        else:
            assert header["jwk"]["x"] == jwks["dpop"]["x"] and claims["htu"] == TOKEN_ENDPOINT


def test_negative_control_without_retries_the_same_kill_fails_calls(replicas):
    """round_robin alone (no retryPolicy): the calls in flight on the killed replica fail."""
    no_retries = {"loadBalancingConfig": [{"round_robin": {}}]}
    with SignerClient(_target(replicas), timeout=10, service_config=no_retries) as client:
        results, failures, before, _ = _load_with_kill(client, replicas, victim=2, before_kill=300, after_kill=100)
    assert all(n > 0 for n in before) and results, before
    assert failures, "the kill hit no call in flight: the retry test above would prove nothing"
    assert {f.code for f in failures} == {grpc.StatusCode.UNAVAILABLE}


def test_async_client_balances_over_every_replica(replicas):
    """AsyncSignerClient gets the same default: calls spread over every replica. (A burst
    sent the instant a channel is created all goes to the first replica that connects:
    round_robin picks among READY connections only. Hence waves.) A ``dns:///`` target is
    accepted too (here it resolves to one replica: every replica is on 127.0.0.1)."""

    async def burst() -> None:
        async with AsyncSignerClient(_target(replicas)) as client:
            for _ in range(10):
                await asyncio.gather(*(client.sign_dpop_proof("p", "GET", TOKEN_ENDPOINT) for _ in range(9)))
                await asyncio.sleep(0.02)
        port = replicas[0][0].address.rpartition(":")[2]
        async with AsyncSignerClient(f"dns:///localhost:{port}") as client:
            assert (await client.get_client_profile("p")).client_id == "replicated"

    asyncio.run(burst())
    counts = [_signed(audit) for _, audit in replicas]
    assert sum(counts) == 90 and all(n >= 10 for n in counts), counts


def test_sigterm_of_one_replica_under_load_fails_no_request(replicas):
    """A rolling restart: the replica drains (NOT_SERVING, answers what it has, GOAWAY) and
    exits 0; the callers see no failure."""
    victim = 0
    with SignerClient(_target(replicas), timeout=10) as client:
        results, failures, before, _ = _load_with_kill(
            client, replicas, victim, before_kill=300, after_kill=300, sig=signal.SIGTERM
        )
    assert failures == [], f"{len(failures)} failed calls, e.g. {failures[:3]}"
    assert all(n > 0 for n in before), before
    after = [_signed(audit) for _, audit in replicas]
    assert all(after[i] - before[i] > 50 for i in (1, 2)), (before, after)
    assert len({answer.jti for _, answer in results}) == len(results)
