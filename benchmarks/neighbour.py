"""The noisy-neighbour cells (issue 13): one application must not hurt the others.

A second ``helseid-signer serve`` (as many workers as the main one) with mTLS and three
certificates from one client CA: the **victim** (a configured caller without a rate
limit), the **flooder** (a configured caller limited to :data:`FLOOD_RATE` requests/s) and
an **unlisted** certificate (trusted by the CA, no caller). Each cell runs the victim's
closed loop of ``SignClientAssertion`` (RS256) at 1 and 8 in flight, once alone ("quiet")
and once ("noisy") while, in processes of their own,

* the flooder sends :data:`FLOOD_RPS` requests/s (20 times its limit): its own profile
  (over its rate: RESOURCE_EXHAUSTED) and the victim's profile (PERMISSION_DENIED or
  RESOURCE_EXHAUSTED), and the unlisted certificate a third of them (UNAUTHENTICATED), and
* the unlisted certificate keeps opening ``Health.Watch``
  streams (up to :data:`WATCH_STREAMS` open at once; on this code each is refused).

Target: the victim keeps >= 80 % of its quiet throughput and its p50 stays within 2x of
the quiet cell's.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.pki import CertificateAuthority

from . import world

FLOOD_RATE = 50
#: What the flood sends: 20 times the flooder's rate limit (a third each over its rate, for
#: a profile it may not use, and from the unlisted certificate), paced, with at most
#: FLOOD_IN_FLIGHT calls outstanding. Paced rather than as fast as possible: on a 2-core
#: machine an unpaced client would take a core from the server by itself, and the cell
#: would measure the client's CPU, not the service's isolation.
FLOOD_RPS = 1000
FLOOD_IN_FLIGHT = 16
WATCH_STREAMS = 200
VICTIM_PROFILE, FLOOD_PROFILE = "victim", "flood"
TIMEOUT = 30.0


@dataclass
class Neighbours:
    """The second signer and what its load processes need."""

    address: str
    pids: list[int]
    certs: dict[str, tuple[bytes, bytes]]  # name -> (certificate PEM, key PEM)
    ca: bytes
    proc: Any


def _config(path: Path, w: world.World, ca: CertificateAuthority, certs: dict, workers: int) -> Path:
    key, _ = world.PROFILES[world.FLOW_PROFILE]
    lines = [
        "# Written by the benchmark (benchmarks/neighbour.py) for the noisy-neighbour cells.",
        "[server]",
        'listen = "127.0.0.1:0"',
        f"workers = {workers}",
        f'tls_certificate = "{certs["server"].cert_path}"',
        f'tls_private_key = "{certs["server"].key_path}"',
        f'client_ca = "{ca.cert_path}"',
        "",
        "[backends.pkcs11]",
        f'module = "{w.token.module}"',
        f'pin_file = "{w.token.pin_file}"',
        "",
        "[audit]",
        'sink = "file"',
        f'path = "{path.parent / "neighbour-audit.jsonl"}"',
        'on_failure = "fail_closed"',
        "",
        f"[keys.{key}]",
        f'uri = "{w.token.uri(key)}"',
        f'alg = "{world.KEYS[key][1]}"',
        "",
    ]
    for profile in (VICTIM_PROFILE, FLOOD_PROFILE):
        lines += [
            f"[profiles.{profile}]",
            f'client_id = "{world.CLIENT_ID}"',
            f'issuer = "{w.auth.issuer}"',
            f'assertion_key = "{key}"',
            f'dpop_key = "{key}"',
            "",
        ]
    lines += [
        "[callers.victim]",
        'tls_names = ["dns:victim.bench.test"]',
        f'profiles = ["{VICTIM_PROFILE}"]',
        "",
        "[callers.flooder]",
        'tls_names = ["dns:flooder.bench.test"]',
        f'profiles = ["{FLOOD_PROFILE}"]',
        f"rate_limit = {FLOOD_RATE}",
        "rate_burst = 5",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def neighbours(w: world.World, workers: int) -> Iterator[Neighbours]:
    """Start the mTLS signer of the noisy-neighbour cells (stopped on exit)."""
    folder = w.folder / "neighbour"
    folder.mkdir(exist_ok=True)
    ca = CertificateAuthority(folder / "pki", "bench-clients")
    issued = {
        "server": ca.issue("server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        "victim": ca.issue("victim", dns=("victim.bench.test",)),
        "flooder": ca.issue("flooder", dns=("flooder.bench.test",)),
        "unlisted": ca.issue("unlisted", dns=("stranger.bench.test",)),
    }
    config = _config(folder / "signer.toml", w, ca, issued, workers)
    env = {"SOFTHSM2_CONF": str(w.token.conf)}
    with world.start_signer(config, env, folder / "signer.log") as (proc, address):
        from . import procstat

        pids = [proc.pid] + (
            sorted(p for p in procstat.children(proc.pid) if "spawn_main" in procstat.cmdline(p)) if workers > 1 else []
        )
        certs = {name: (i.cert, i.key) for name, i in issued.items() if name != "server"}
        yield Neighbours(address, pids, certs, ca.cert_path.read_bytes(), proc)


# -- the load processes -------------------------------------------------------------------


def _channel(n: Neighbours | dict, who: str) -> Any:
    import grpc

    cert, key = n["certs"][who]
    credentials = grpc.ssl_channel_credentials(n["ca"], key, cert)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    return grpc.aio.secure_channel(n["address"], credentials, options=options)


async def _victim(n: dict, concurrency: int, t_start: int, t_end: int) -> dict:
    from helseid_signer_client import AsyncSignerClient

    channels = [_channel(n, "victim") for _ in range(min(concurrency, 4))]
    clients = [AsyncSignerClient(channel=ch, timeout=TIMEOUT) for ch in channels]
    latencies: list[int] = []
    errors: list[str] = []
    error_count = 0

    async def task(i: int) -> None:
        nonlocal error_count
        client = clients[i % len(clients)]
        while (t0 := time.monotonic_ns()) < t_end:
            try:
                await client.sign_client_assertion(VICTIM_PROFILE)
            except Exception as exc:
                error_count += 1
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)
                continue
            t1 = time.monotonic_ns()
            if t_start <= t1 <= t_end:
                latencies.append(t1 - t0)

    await asyncio.gather(*(task(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    return {"latencies": latencies, "errors": errors, "error_count": error_count}


async def _flooder(n: dict, t_end: int) -> dict:
    from helseid_signer_client import AsyncSignerClient, SignerError

    flooder = AsyncSignerClient(channel=_channel(n, "flooder"), timeout=TIMEOUT)
    stranger = AsyncSignerClient(channel=_channel(n, "unlisted"), timeout=TIMEOUT)
    codes: dict[str, int] = {}
    calls = [
        lambda: flooder.sign_client_assertion(FLOOD_PROFILE),  # over its rate
        lambda: flooder.sign_client_assertion(VICTIM_PROFILE),  # not its profile
        lambda: stranger.sign_client_assertion(VICTIM_PROFILE),  # no caller
    ]

    interval = FLOOD_IN_FLIGHT / FLOOD_RPS  # seconds between one task's calls

    async def task(i: int) -> None:
        k = i
        next_at = time.monotonic() + i * interval / FLOOD_IN_FLIGHT
        while time.monotonic_ns() < t_end:
            k += 1
            next_at += interval
            try:
                await calls[k % 3]()
                code = "OK"
            except SignerError as exc:
                code = exc.code.name
            codes[code] = codes.get(code, 0) + 1
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    await asyncio.gather(*(task(i) for i in range(FLOOD_IN_FLIGHT)))
    return {"codes": codes}


async def _watcher(n: dict, t_end: int) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(n, "unlisted")
    stub = health_pb2_grpc.HealthStub(channel)
    opened = refused = 0
    open_streams: list[Any] = []

    async def one() -> None:
        nonlocal opened, refused
        call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        try:
            async for _ in call:
                opened += 1
                open_streams.append(call)
                return  # keep it open: it holds a stream on the server if the server lets it
        except Exception:
            refused += 1

    while time.monotonic_ns() < t_end:
        pending = max(0, WATCH_STREAMS - len(open_streams))
        if pending:
            await asyncio.gather(*(one() for _ in range(min(pending, 50))))
        await asyncio.sleep(0.05)
    for call in open_streams:
        call.cancel()
    await channel.close()
    return {"watch_opened": opened, "watch_refused": refused}


def _role(role: str, n: dict, concurrency: int, inbox: Any, out: Any) -> None:
    """A load process: import and connect, say ready, wait for the window, run, report."""
    try:
        import grpc  # noqa: F401 - imported before "ready", not inside the window

        import helseid_signer_client  # noqa: F401

        out.put((role, "ready"))
        t_start, t_end = inbox.get(timeout=300)
        if role == "victim":
            result = asyncio.run(_victim(n, concurrency, t_start, t_end))
        elif role == "flooder":
            result = asyncio.run(_flooder(n, t_end))
        else:
            result = asyncio.run(_watcher(n, t_end))
        out.put((role, result))
    except Exception:
        out.put((role, {"error": traceback.format_exc()}))


def run_cell(n: Neighbours, concurrency: int, noisy: bool, warmup: float, duration: float) -> tuple[dict, int, int]:
    """Start the victim (and with ``noisy`` the flooder and the watcher) in processes of
    their own; once all are ready, give them the window (after ``warmup``) and return
    (a handle for :func:`collect`, window start, window end)."""
    ctx = multiprocessing.get_context("spawn")
    shared = {"address": n.address, "certs": n.certs, "ca": n.ca}
    out = ctx.Queue()
    roles = ["victim"] + (["flooder", "watcher"] if noisy else [])
    inboxes = {role: ctx.Queue() for role in roles}
    procs = [
        ctx.Process(target=_role, args=(role, shared, concurrency, inboxes[role], out), daemon=True) for role in roles
    ]
    for p in procs:
        p.start()
    for _ in roles:
        role, answer = out.get(timeout=300)
        if answer != "ready":
            raise RuntimeError(f"noisy-neighbour {role} failed to start:\n{answer.get('error')}")
    # The neighbours start with the victim's warm-up, so the window sees them in full swing.
    t_start = time.monotonic_ns() + int(warmup * 1e9)
    t_end = t_start + int(duration * 1e9)
    for inbox in inboxes.values():
        inbox.put((t_start, t_end))
    return {"procs": procs, "out": out, "roles": len(roles)}, t_start, t_end


def collect(handle: dict) -> dict:
    """The results of the cell's processes, by role (RuntimeError if one failed)."""
    results = {}
    for _ in range(handle["roles"]):
        role, result = handle["out"].get(timeout=300)
        if "error" in result:
            raise RuntimeError(f"noisy-neighbour {role} failed:\n{result['error']}")
        results[role] = result
    for p in handle["procs"]:
        p.join(timeout=30)
    return results
