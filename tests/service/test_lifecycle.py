"""Lifecycle of the process: SIGTERM drains.

On SIGTERM the signer reports NOT_SERVING on the gRPC health service first (to every
open ``Watch`` and to every new ``Check``), answers every call that has reached it, then
stops (GOAWAY) and exits 0 - see helseid_signer/drain.py for why answering what has
arrived needs more than ``grpc.aio.Server.stop(grace)``. Tested on a real
``helseid-signer serve`` process, with one worker and with two (the supervisor passes
SIGTERM on to each worker, which drains on its own).

Oracles: the caller's own view (every call sent before the signal is answered with a JWS
that jwcrypto verifies; a health check on a new connection during the drain says
NOT_SERVING), the order of events on the caller's clock (NOT_SERVING arrives while answers
to calls in flight are still arriving), and the exit code and time of the process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwcrypto import jwk, jws

from helseid_signer.drain import SETTLE
from helseid_signer.server import STOP_GRACE
from helseid_signer_client import AsyncSignerClient, SignerClient, SignerError
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"
GRACE = STOP_GRACE  # seconds calls still running get once the stop (GOAWAY) begins
IN_FLIGHT = 200  # RSA signatures, serialised per Cryptoki instance: a backlog of a good fraction of a second


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle")
    token = create_token(folder / "token", label="lifecycle")
    public = jwk.JWK(**keys_create(token, "slow", "RSA-2048", "PS256"))
    return token, public


def _config(tmp_path, token, workers: int):
    config = write_config(
        tmp_path / "signer.toml", token, issuer=ISSUER, client_id="lifecycle",
        keys={"slow": "PS256"}, profiles={"p": ("slow", "slow")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", f"workers = {workers}"),
        extra_lines=("[audit]", 'sink = "file"', f'path = "{tmp_path / "audit.jsonl"}"'),
    )  # fmt: skip
    return start_signer(config, {"SOFTHSM2_CONF": str(token.conf)}, timeout=60)


def _check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_calls_in_flight_after_health_goes_not_serving(kit, tmp_path, workers):
    token, public = kit
    signer = _config(tmp_path, token, workers)
    try:
        assert _check(signer.address) == health_pb2.HealthCheckResponse.SERVING
        assert _check(signer.address, "helseid.signer.v1.SignerService") == health_pb2.HealthCheckResponse.SERVING
        outcome = asyncio.run(_drain_scenario(signer))
        exit_code = signer.wait(timeout=GRACE + 10)
    finally:
        signer.stop()
    exited_after = time.monotonic() - outcome["sigterm_at"]

    answers, errors = outcome["answers"], outcome["errors"]
    assert errors == [], errors  # every call sent before SIGTERM was answered (none refused)
    assert len(answers) == IN_FLIGHT
    for _, answer in answers:
        obj = jws.JWS()
        obj.deserialize(answer.jwt, key=public)
        assert json.loads(obj.payload)["jti"] == answer.jti
    # The drain is real: answers kept arriving after SIGTERM, and after health said NOT_SERVING.
    not_serving_at = outcome["not_serving_at"]
    assert not_serving_at is not None, "no NOT_SERVING on the health Watch before the stream ended"
    late = [t for t, _ in answers if t > not_serving_at]
    assert outcome["sigterm_at"] < not_serving_at and len(late) >= 10, (len(late), outcome["answered_at_sigterm"])
    # A readiness probe during the drain (a new connection, like the kubelet's) says NOT_SERVING.
    probed_at, probe_status = outcome["probe"]
    assert probe_status == "NOT_SERVING" and probed_at < answers[-1][0], (probe_status, len(late))
    assert exit_code == 0 and exited_after < SETTLE + GRACE, (exit_code, exited_after)


async def _drain_scenario(signer) -> dict:
    """Fill the signer with IN_FLIGHT calls, SIGTERM it once a few are answered, and record
    what the caller sees and when (time.monotonic)."""
    answers: list[tuple[float, object]] = []
    errors: list[str] = []
    out: dict = {"not_serving_at": None}

    async def call(client: AsyncSignerClient) -> None:
        try:
            answer = await client.sign_client_assertion("p")
            answers.append((time.monotonic(), answer))
        except SignerError as exc:
            errors.append(f"{exc.code.name}: {exc.details}")

    async def watch(channel: grpc.aio.Channel, seen_serving: asyncio.Event) -> None:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        async for update in stream:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                seen_serving.set()
            elif update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                out["not_serving_at"] = time.monotonic()
                stream.cancel()  # an open Watch would hold the drain until the grace ends
                return

    async with grpc.aio.insecure_channel(signer.address) as health_channel:
        seen_serving = asyncio.Event()
        watcher = asyncio.create_task(watch(health_channel, seen_serving))
        await asyncio.wait_for(seen_serving.wait(), 10)
        async with AsyncSignerClient(signer.address, timeout=GRACE + 10) as client:
            await client.get_client_profile("p")  # connected before the burst
            calls = [asyncio.create_task(call(client)) for _ in range(IN_FLIGHT)]
            while len(answers) < 5:
                await asyncio.sleep(0.002)
            out["answered_at_sigterm"] = len(answers)
            out["sigterm_at"] = time.monotonic()
            signer.signal(signal.SIGTERM)
            while out["not_serving_at"] is None and not watcher.done():
                await asyncio.sleep(0.002)
            # A health check on a new connection, while the drain goes on.
            async with grpc.aio.insecure_channel(signer.address) as probe_channel:
                probe = health_pb2_grpc.HealthStub(probe_channel)
                try:
                    status = (await probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status
                    out["probe"] = (time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                except grpc.aio.AioRpcError as exc:
                    out["probe"] = (time.monotonic(), exc.code().name)
            await asyncio.gather(*calls)
        try:
            await asyncio.wait_for(watcher, 5)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
    out.update(answers=answers, errors=errors)
    return out


def test_sigterm_when_idle_exits_0_at_once(kit, tmp_path):
    token, _ = kit
    signer = _config(tmp_path, token, 1)
    try:
        with SignerClient(signer.address) as client:
            assert client.get_client_profile("p").client_id == "lifecycle"
        started = time.monotonic()
        signer.signal(signal.SIGTERM)
        assert signer.wait(timeout=GRACE + 10) == 0
        assert time.monotonic() - started < SETTLE  # nothing in flight: no wait for the grace
    finally:
        signer.stop()
    log = [json.loads(line) for line in signer.log.read_text().splitlines() if line.startswith("{")]
    assert any("draining" in r.get("message", "") for r in log)
