"""The load generator: a process of its own (never the server's), one asyncio loop, the
client library (``AsyncSignerClient``, ``AsyncTokenClient``, ``DPoPAuth``) over ``grpc.aio``.

It is started once and runs one cell per command (closed loop: ``concurrency`` tasks, each
sending its next request when the previous one is answered; a call counts when it
completes inside the measured window; what it got back is kept for checking afterwards,
off the clock).

Connections: a worker process of the service accepts a TCP connection through
SO_REUSEPORT, which hashes connections (not requests) onto workers. A few connections can
thus all land on one worker. The generator therefore opens its pool of channels so that
each worker holds the same number - it asks each new connection a few health checks and
watches which worker's CPU time moves - as a client balancing over replicas would have."""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helseid_signer_client import AsyncSignerClient, AsyncTokenClient, DPoPAuth

from . import jose_check
from .inprocess import InProcessSigner
from .procstat import run_ns

#: An access token of a realistic size (only its SHA-256 reaches the signer).
FAKE_ACCESS_TOKEN = "eyJhbGciOiJSUzI1NiJ9." + "x" * 700 + ".sig"
PROOF_NONCE = "bench-nonce-0123456789"
SAMPLE_PER_CELL = 300
TIMEOUT = 30.0


@dataclass
class Slot:
    """One connection to the service and what uses it."""

    channel: grpc.aio.Channel
    client: AsyncSignerClient
    health: Any
    worker: int | None


def _channel(target: str) -> grpc.aio.Channel:
    # A local subchannel pool: channels with equal arguments would otherwise share one connection.
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


class LoadGen:
    def __init__(self, setup: dict) -> None:
        self.s = setup
        self.slots: list[Slot] = []
        self.balance: list[int] = []

    async def start(self) -> None:
        self.slots, self.balance = await self._balanced_pool(self.s["channels"])
        self.http = httpx.AsyncClient(
            timeout=TIMEOUT, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200)
        )
        self.inproc = InProcessSigner(
            self.s["inproc_client_id"],
            self.s["issuer"],
            self.s["token_endpoint"],
            self.s["inproc_assertion_pem"],
            self.s["inproc_dpop_pem"],
        )

    async def _probe(self, slot: Slot, pids: list[int]) -> int | None:
        before = [run_ns(p) for p in pids]
        for _ in range(40):
            await slot.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        moved = [run_ns(p) - b for p, b in zip(pids, before, strict=True)]
        best = max(range(len(pids)), key=lambda i: moved[i])
        return best if moved[best] > 0 else None

    async def _balanced_pool(self, size: int) -> tuple[list[Slot], list[int]]:
        pids = self.s["worker_pids"]
        per_worker: list[list[Slot]] = [[] for _ in pids]
        want = -(-size // len(pids))
        spare: list[Slot] = []
        for _ in range(size * 8):
            if all(len(w) >= want for w in per_worker):
                break
            ch = _channel(self.s["target"])
            await ch.channel_ready()
            slot = Slot(ch, AsyncSignerClient(channel=ch, timeout=TIMEOUT), health_pb2_grpc.HealthStub(ch), None)
            worker = await self._probe(slot, pids) if len(pids) > 1 else 0
            slot.worker = worker
            if worker is not None and len(per_worker[worker]) < want:
                per_worker[worker].append(slot)
            else:
                spare.append(slot)
        ordered = [w[i] for i in range(want) for w in per_worker if i < len(w)]  # alternate workers
        if len(ordered) < size:  # could not place enough: fill up with connections as they came
            ordered += spare[: size - len(ordered)]
        for slot in spare:
            if slot not in ordered:
                await slot.channel.close()
        return ordered[:size], [len(w) for w in per_worker]

    # -- cells -------------------------------------------------------------------------

    async def closed_loop(self, concurrency: int, call: Any, t_start_ns: int, t_end_ns: int) -> dict:
        latencies: list[int] = []
        samples: list[Any] = []
        errors: list[str] = []
        error_count = 0
        seen = 0

        async def task(i: int) -> None:
            nonlocal error_count, seen
            while True:
                t0 = time.monotonic_ns()
                if t0 >= t_end_ns:
                    return
                try:
                    result = await call(i)
                except Exception as exc:
                    error_count += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.monotonic_ns()
                if t_start_ns <= t1 <= t_end_ns:
                    latencies.append(t1 - t0)
                    seen += 1
                    if len(samples) < SAMPLE_PER_CELL:
                        samples.append(result)
                    elif random.random() < SAMPLE_PER_CELL / seen:  # reservoir sample of the window
                        samples[random.randrange(SAMPLE_PER_CELL)] = result

        await asyncio.gather(*(task(i) for i in range(concurrency)))
        return {"latencies": latencies, "samples": samples, "errors": errors, "error_count": error_count}

    def _slot(self, i: int) -> Slot:
        return self.slots[i % len(self.slots)]

    async def cell(self, cmd: dict, conn: Connection) -> dict:
        """Prepare the cell, tell the orchestrator the measured window, run it, check samples."""
        kind, c = cmd["kind"], cmd["concurrency"]
        profile = cmd.get("profile")
        check: Any = None
        if kind == "health":
            request = health_pb2.HealthCheckRequest()

            async def call(i: int) -> Any:
                return await self._slot(i).health.Check(request, timeout=TIMEOUT)
        elif kind == "client_profile":

            async def call(i: int) -> Any:
                return await self._slot(i).client.get_client_profile(profile)
        elif kind == "assertion":

            async def call(i: int) -> Any:
                return await self._slot(i).client.sign_client_assertion(profile)

            check = self._check_assertion(profile)
        elif kind == "dpop":

            async def call(i: int) -> Any:
                return await self._slot(i).client.sign_dpop_proof(
                    profile, "GET", self.s["api_url"], nonce=PROOF_NONCE, access_token=FAKE_ACCESS_TOKEN
                )

            check = self._check_proof(profile, "GET", self.s["api_url"], PROOF_NONCE, FAKE_ACCESS_TOKEN)
        elif kind in ("token_flow", "api_call"):
            call, check = await self._flow(kind, cmd["signer"], c)
        elif kind == "mix":  # the soak: assertions and proofs, half each
            check_a, check_p = (
                self._check_assertion(profile),
                self._check_proof(profile, "GET", self.s["api_url"], PROOF_NONCE, FAKE_ACCESS_TOKEN),
            )

            async def call(i: int) -> Any:
                if i % 2:
                    return await self._slot(i).client.sign_client_assertion(profile)
                return await self._slot(i).client.sign_dpop_proof(
                    profile, "GET", self.s["api_url"], nonce=PROOF_NONCE, access_token=FAKE_ACCESS_TOKEN
                )

            def check(r: Any) -> None:
                (check_a if hasattr(r, "expires_at") else check_p)(r)
        else:
            raise ValueError(f"unknown cell kind {kind}")
        t_start = time.monotonic_ns() + cmd["warmup_ns"]
        t_end = t_start + cmd["duration_ns"]
        conn.send({"window": [t_start, t_end]})
        out = await self.closed_loop(c, call, t_start, t_end)
        out["checked"] = 0
        if check is not None:
            for result in out["samples"]:
                check(result)
                out["checked"] += 1
        del out["samples"]
        return out

    def _check_assertion(self, profile: str) -> Any:
        key_name = self.s["profiles"][profile]["assertion_key"]
        jwk, alg = self.s["jwks"][key_name], self.s["algs"][key_name]

        def check(r: Any) -> None:
            jose_check.check_assertion(
                r.jwt,
                jwk=jwk,
                alg=alg,
                client_id=self.s["client_id"],
                issuer=self.s["issuer"],
                lifetime=self.s["lifetime"],
                jti=r.jti,
                issued_at=r.issued_at,
            )

        return check

    def _check_proof(self, profile: str, htm: str, htu: str, nonce: str | None, token: str | None) -> Any:
        key_name = self.s["profiles"][profile]["dpop_key"]
        jwk, alg = self.s["jwks"][key_name], self.s["algs"][key_name]

        def check(r: Any) -> None:
            jose_check.check_proof(
                r.jwt, jwk=jwk, alg=alg, htm=htm, htu=htu, nonce=nonce, access_token=token, jti=r.jti
            )

        return check

    async def _flow(self, kind: str, signer: str, concurrency: int) -> tuple[Any, Any]:
        """The token flow (discovery once; then per call: assertion + proof + token request,
        and the nonce retry when the authorization server asks) or one DPoP-protected API
        call with a cached token, signed by the product (``signer='service'``) or in process."""
        if signer == "service":
            signers = [self._slot(i).client for i in range(concurrency)]
            profile = self.s["flow_profile"]
        else:
            signers = [self.inproc] * concurrency
            profile = "inproc"
        scope = self.s["scope"]
        if kind == "token_flow":
            tokens = [AsyncTokenClient(s, profile, scope, http=self.http) for s in signers]
            for t in tokens:
                await t.get_profile_info()

            async def call(i: int) -> Any:
                tokens[i].invalidate()
                token = await tokens[i].get_token()
                if token.token_type != "DPoP" or token.jkt != (await tokens[i].get_profile_info()).dpop_jkt:
                    raise AssertionError("token is not bound to the profile's DPoP key")
                return token

            return call, None
        # each task an application of its own: its token client (token fetched here, then cached)
        auths = [DPoPAuth(AsyncTokenClient(s, profile, scope, http=self.http)) for s in signers]
        await asyncio.gather(*(a.token_client.get_token() for a in auths))
        url = self.s["api_url_status"]

        async def call(i: int) -> Any:
            response = await self.http.get(url, auth=auths[i])
            if response.status_code != 200:
                raise AssertionError(f"API answered {response.status_code}: {response.text[:200]}")
            return response

        return call, None

    # -- correctness -------------------------------------------------------------------

    async def correctness(self, cmd: dict) -> dict:
        """``clients`` clients, each on its own connection, ``per_client`` signatures each,
        cycling through every profile's assertion and DPoP proof; every result is checked."""
        clients = [
            AsyncSignerClient(channel=_channel(self.s["target"]), timeout=TIMEOUT) for _ in range(cmd["clients"])
        ]
        kinds = []
        for profile in self.s["profiles"]:
            kinds.append(("assertion", profile))
        kinds.append(("dpop", self.s["flow_profile"]))
        checks = {("assertion", p): self._check_assertion(p) for p in self.s["profiles"]}
        htu = self.s["api_url"]
        checks[("dpop", self.s["flow_profile"])] = self._check_proof(
            self.s["flow_profile"], "POST", htu, PROOF_NONCE, FAKE_ACCESS_TOKEN
        )
        results: list[tuple[tuple[str, str], Any]] = []
        errors: list[str] = []
        error_count = 0
        started = time.monotonic()

        async def run(n: int, client: AsyncSignerClient) -> None:
            nonlocal error_count
            for j in range(cmd["per_client"]):
                kind = kinds[(n + j) % len(kinds)]
                try:
                    if kind[0] == "assertion":
                        r = await client.sign_client_assertion(kind[1])
                    else:
                        r = await client.sign_dpop_proof(
                            kind[1], "POST", htu, nonce=PROOF_NONCE, access_token=FAKE_ACCESS_TOKEN
                        )
                    results.append((kind, r))
                except Exception as exc:
                    error_count += 1
                    if len(errors) < 10:
                        errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
        elapsed = time.monotonic() - started
        for c in clients:
            await c.close()
        failures: list[str] = []
        failure_count = 0
        for kind, r in results:
            try:
                checks[kind](r)
            except Exception as exc:
                failure_count += 1
                if len(failures) < 10:
                    failures.append(f"{kind}: {exc}")
        jtis = [r.jti for _, r in results]
        by_kind: dict[str, int] = {}
        for kind, _ in results:
            by_kind[f"{kind[0]}:{kind[1]}"] = by_kind.get(f"{kind[0]}:{kind[1]}", 0) + 1
        return {
            "requested": cmd["clients"] * cmd["per_client"],
            "signed": len(results),
            "verified": len(results) - failure_count,
            "error_count": error_count,
            "errors": errors,
            "failure_count": failure_count,
            "failures": failures,
            "duplicate_jti": len(jtis) - len(set(jtis)),
            "elapsed_s": elapsed,
            "by_kind": by_kind,
        }

    async def close(self) -> None:
        for slot in self.slots:
            await slot.channel.close()
        await self.http.aclose()


def main(conn: Connection, setup: dict) -> None:
    """Process entry: answer commands on ``conn`` until ``stop``."""
    asyncio.run(_serve(conn, setup))


async def _serve(conn: Connection, setup: dict) -> None:
    loop = asyncio.get_running_loop()
    try:
        gen = LoadGen(setup)
        await gen.start()
    except Exception:
        conn.send({"error": traceback.format_exc()})
        return
    conn.send({"ready": True, "balance": gen.balance, "channels": len(gen.slots)})
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd["op"] == "stop":
            break
        try:
            result = await (gen.correctness(cmd) if cmd["op"] == "correctness" else gen.cell(cmd, conn))
        except Exception:
            result = {"error": traceback.format_exc()}
        conn.send(result)
    await gen.close()
