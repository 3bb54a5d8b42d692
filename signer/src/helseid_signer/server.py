"""Process wiring: settings -> backends -> keys -> profiles -> gRPC server with health
(and, when configured, reflection).

``run(settings)`` serves until SIGTERM/SIGINT. The server binds its listener before it
reports ready; ``ready_file`` (if given) receives the bound ``host:port`` so tests and
supervisors can start it on port 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helseid_signer_client._proto import signer_pb2

from .config import Settings, parse_listen
from .keys import build_backends, resolve_keys
from .service import Profile, SignerServicer, add_to_server

log = logging.getLogger("helseid_signer.server")
SERVICE_NAME = signer_pb2.DESCRIPTOR.services_by_name["SignerService"].full_name

#: Requests are a few hundred bytes; anything near this is hostile.
MAX_MESSAGE_BYTES = 64 * 1024


def build_profiles(settings: Settings) -> tuple[dict[str, Profile], list]:
    """Resolve every key and return (profiles by name, backends to close)."""
    backends = build_backends(settings)
    keys = resolve_keys(settings, backends)
    profiles = {
        name: Profile(
            name=name,
            settings=p,
            token_endpoint=p.effective_token_endpoint,
            assertion_key=keys[p.assertion_key],
            dpop_key=keys[p.dpop_key],
        )
        for name, p in settings.profiles.items()
    }
    return profiles, list(backends.values())


async def serve(settings: Settings, ready_file: str | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    profiles, backends = build_profiles(settings)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sign")
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ],
    )
    add_to_server(SignerServicer(profiles, executor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.server.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    host, port = parse_listen(settings.server.listen)
    if settings.server.insecure:
        log.warning("listening WITHOUT TLS on %s:%s (server.insecure = true): development only", host, port)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    log.info("serving %s on %s with %d profile(s)", SERVICE_NAME, address, len(profiles))
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(address)
        tmp.replace(ready_file)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: health NOT_SERVING, draining in-flight requests")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    executor.shutdown(wait=True)
    for backend in backends:
        backend.close()


def _worker(settings: Settings, ready_file: str) -> None:
    """One worker process: its own event loop, gRPC server and Cryptoki instance
    (initialised here, after the spawn: bug-kinds.md 23)."""
    from .cli import setup_logging

    setup_logging("info")
    asyncio.run(serve(settings, ready_file=ready_file))


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket so every worker binds the same concrete port.
    A bound socket that is not listening receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, sock.getsockname()[1]


def run(settings: Settings, ready_file: str | None = None) -> None:
    """Serve with ``server.workers`` processes sharing one port (SO_REUSEPORT).

    With one worker the server runs in this process. With more, this process supervises:
    it spawns the workers (``spawn``, so no Cryptoki or gRPC state crosses a fork),
    writes ``ready_file`` once every worker is serving, restarts a worker that dies (at
    most once per second), and on SIGTERM/SIGINT stops them all (each drains its
    in-flight requests).
    """
    workers = settings.server.workers
    if workers == 1:
        asyncio.run(serve(settings, ready_file=ready_file))
        return
    host, port = parse_listen(settings.server.listen)
    reservation, port = _reserve_port(host, port)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"listen": listen})})
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with tempfile.TemporaryDirectory(prefix="helseid-signer-") as tmp:
        ready_paths = [str(Path(tmp) / f"ready.{i}") for i in range(workers)]
        procs = [
            context.Process(target=_worker, args=(settings, p), name=f"worker-{i}") for i, p in enumerate(ready_paths)
        ]
        for proc in procs:
            proc.start()
        announced = False
        last_restart = 0.0
        while not stopping.wait(0.05):
            if not announced and all(Path(p).exists() for p in ready_paths):
                log.info("%d workers serving on %s", workers, listen)
                if ready_file:
                    Path(ready_file + ".tmp").write_text(listen)
                    Path(ready_file + ".tmp").replace(ready_file)
                announced = True
            for i, proc in enumerate(procs):
                if not proc.is_alive() and time.monotonic() - last_restart > 1.0:
                    log.error("worker %d exited with %s; restarting it", i, proc.exitcode)
                    last_restart = time.monotonic()
                    procs[i] = context.Process(target=_worker, args=(settings, ready_paths[i]), name=f"worker-{i}")
                    procs[i].start()
        for proc in procs:
            proc.terminate()  # SIGTERM: each worker drains, then exits
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
    reservation.close()
