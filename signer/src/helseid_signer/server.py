"""Process wiring: settings -> backends -> keys -> profiles -> gRPC server with health
(and, when configured, reflection).

``run(settings)`` serves until SIGTERM/SIGINT. The server binds its listener before it
reports ready; ``ready_file`` (if given) receives the bound ``host:port`` so tests and
supervisors can start it on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import multiprocessing
import os
import pwd
import signal
import socket
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helseid_signer_client._proto import signer_pb2

from .audit import AuditLog
from .config import Settings, UnixSocketSettings, parse_listen
from .keys import build_backends, resolve_keys
from .policy import Caller, HtuPolicy, RateLimiter
from .service import Identify, Profile, SignerServicer, add_to_server

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
            htu_policy=HtuPolicy.from_settings(p.effective_token_endpoint, p.api_base_urls),
        )
        for name, p in settings.profiles.items()
    }
    return profiles, list(backends.values())


def build_callers(settings: Settings) -> dict[str, Caller]:
    """The configured callers, each with its rate limiter."""
    callers = {}
    for name, c in settings.callers.items():
        limiter = None
        if c.rate_limit is not None:
            limiter = RateLimiter(c.rate_limit, c.rate_burst or max(1, int(c.rate_limit)))
        callers[name] = Caller(name, frozenset(c.profiles), limiter)
    return callers


def tls_identifier(settings: Settings, callers: dict[str, Caller]) -> Identify:
    """Identify a caller by its verified client certificate: a DNS or URI subjectAltName,
    or the subject CN when the certificate has no SAN, equal to one of its ``tls_names``."""
    by_name = {n: callers[caller] for caller, c in settings.callers.items() for n in c.tls_names}

    def identify(context: grpc.aio.ServicerContext) -> Caller | None:
        auth = context.auth_context()
        names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or []
        for raw in names:
            caller = by_name.get(raw.decode("utf-8", "replace"))
            if caller is not None:
                return caller
        return None

    return identify


def _fixed(caller: Caller) -> Identify:
    return lambda context: caller


def _owner_ids(owner: str | int | None, group: str | int | None) -> tuple[int, int]:
    uid = -1 if owner is None else owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid
    gid = -1 if group is None else group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    return uid, gid


def _new_server(settings: Settings) -> grpc.aio.Server:
    return grpc.aio.server(
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ],
    )


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def serve(settings: Settings, ready_file: str | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    One gRPC server per listener, so that each knows how its callers are identified:
    the TCP listener (mTLS, or plaintext with ``insecure = true``) and one Unix socket
    per caller that has one. All share the profiles, the signing executor, the audit log
    and the health status.
    """
    profiles, backends = build_profiles(settings)
    callers = build_callers(settings)
    audit = AuditLog(settings.audit.path, fail_closed=settings.audit.on_failure == "fail_closed")
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sign")
    health_servicer = health.aio.HealthServicer()
    servers: list[grpc.aio.Server] = []
    addresses: list[str] = []

    def new_server(identify: Identify) -> grpc.aio.Server:
        server = _new_server(settings)
        add_to_server(SignerServicer(profiles, executor, audit, identify), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if settings.server.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        servers.append(server)
        return server

    if settings.server.listen:
        host, port = parse_listen(settings.server.listen)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if settings.server.insecure:
            name = settings.server.insecure_caller
            caller = callers[name] if name else Caller("insecure-development", frozenset(profiles))
            log.warning(
                "listening WITHOUT TLS on %s (server.insecure = true): development only; every request "
                "there is caller %r",
                target,
                caller.name,
            )
            bound = new_server(_fixed(caller)).add_insecure_port(target)
        else:
            credentials = grpc.ssl_server_credentials(
                [(_read(settings.server.tls_private_key), _read(settings.server.tls_certificate))],
                root_certificates=_read(settings.server.client_ca),
                require_client_auth=True,
            )
            bound = new_server(tls_identifier(settings, callers)).add_secure_port(target, credentials)
        addresses.append(f"{host}:{bound}")
    sockets: list[tuple[str, UnixSocketSettings]] = []
    for name, c in settings.callers.items():
        if c.unix_socket is None:
            continue
        path = c.unix_socket.path
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier run
        old_umask = os.umask(0o177)  # the socket exists 0600 until it gets its final mode
        try:
            new_server(_fixed(callers[name])).add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old_umask)
        sockets.append((path, c.unix_socket))
        addresses.append(f"unix:{path}")
    for server in servers:
        await server.start()
    for path, sock in sockets:
        uid, gid = _owner_ids(sock.owner, sock.group)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, sock.mode)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s with %d profile(s)", SERVICE_NAME, ", ".join(addresses), len(profiles))
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(addresses[0])
        tmp.replace(ready_file)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: health NOT_SERVING, draining in-flight requests")
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(*(server.stop(grace=5) for server in servers))
    executor.shutdown(wait=True)
    audit.close()
    for backend in backends:
        backend.close()
    for path, _ in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
    assert settings.server.listen is not None  # config validation: workers > 1 means TCP only
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
