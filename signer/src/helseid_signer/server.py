"""Process wiring: settings -> backends -> keys -> profiles -> gRPC server with health
(and, when configured, reflection).

``run(settings)`` serves until SIGTERM/SIGINT. The server binds its listener before it
reports ready; ``ready_file`` (if given) receives the bound ``host:port`` so tests and
supervisors can start it on port 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
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
