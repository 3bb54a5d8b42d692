"""The worker supervisor: ``server.workers`` processes sharing one port (SO_REUSEPORT),
each with its own event loop, gRPC server and Cryptoki instance; restarts, reloads
(SIGHUP forwarded) and shutdown (SIGTERM drains every worker).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .backends.base import BackendConfigError
from .config import ConfigError, Settings, parse_listen
from .keys import KeyResolutionError
from .logs import setup_logging
from .server import serve, start_metrics_server

log = logging.getLogger("helseid_signer.server")


#: A worker's exit status for a configuration error: the supervisor stops, it does not restart.
CONFIG_ERROR_EXIT = 2


def _worker(settings: Settings, ready_file: str, config_path: str | None, listen: str, accepted: Any = None) -> None:
    """One worker process: its own event loop, gRPC server and Cryptoki instance
    (initialised here, after the spawn: bug-kinds.md 23). Each configuration a reload
    applied is put on the ``accepted`` queue for the supervisor. Exits with
    :data:`CONFIG_ERROR_EXIT` on a configuration error."""
    # The supervisor starts workers with SIGHUP blocked (inherited through spawn): one that
    # arrives before the event loop handles it is kept here and applied once serving,
    # instead of killing the worker (SIGHUP's default action).
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    setup_logging("info")
    on_reload = accepted.put if accepted is not None else None
    try:
        asyncio.run(
            serve(
                settings,
                ready_file=ready_file,
                config_path=config_path,
                listen=listen,
                on_reload=on_reload,
                reload_pending=hup,
            )
        )
    except (ConfigError, KeyResolutionError, BackendConfigError) as exc:
        log.error("configuration error: %s", exc)
        sys.exit(CONFIG_ERROR_EXIT)


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket so every worker binds the same concrete port.
    A bound socket that is not listening receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, sock.getsockname()[1]


def run(settings: Settings, ready_file: str | None = None, config_path: str | None = None) -> None:
    """Serve with ``server.workers`` processes sharing one port (SO_REUSEPORT).

    With one worker the server runs in this process. With more, this process supervises:
    it spawns the workers (``spawn``, so no Cryptoki or gRPC state crosses a fork),
    writes ``ready_file`` once every worker is serving, restarts a worker that dies (at
    most once per second), and on SIGTERM/SIGINT stops them all (each drains its
    in-flight requests).
    """
    workers = settings.server.workers
    if workers == 1:
        asyncio.run(serve(settings, ready_file=ready_file, config_path=config_path))
        return
    assert settings.server.listen is not None  # config validation: workers > 1 means TCP only
    host, port = parse_listen(settings.server.listen)
    reservation, port = _reserve_port(host, port)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    context = multiprocessing.get_context("spawn")
    metrics_dir = None
    if settings.metrics:
        # prometheus-client multiprocess mode: set before the workers import it
        metrics_dir = tempfile.mkdtemp(prefix="helseid-signer-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        start_metrics_server(settings.metrics.listen, registry)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    # What a restarted worker starts with: the last configuration a worker's reload APPLIED
    # (it loaded, its keys resolved, the listeners are unchanged). The supervisor does not
    # judge a file itself: it cannot resolve keys without a Cryptoki instance of its own.
    current = settings
    accepted = context.Queue()
    exit_status = 0
    reloads = 0  # SIGHUPs received: a worker restarted after one reloads the file itself too

    def on_sighup(*_: object) -> None:
        nonlocal reloads
        reloads += 1
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGHUP)  # every worker reloads the file itself

    with tempfile.TemporaryDirectory(prefix="helseid-signer-") as tmp:
        ready_paths = [str(Path(tmp) / f"ready.{i}") for i in range(workers)]

        def spawn(i: int) -> multiprocessing.process.BaseProcess:
            proc = context.Process(
                target=_worker, args=(current, ready_paths[i], config_path, listen, accepted), name=f"worker-{i}"
            )
            # Started with SIGHUP blocked: the worker unblocks it once it can handle it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            if reloads and config_path and proc.pid:
                # It starts with the configuration a worker last applied; a reload may still
                # be under way in the others: let it read the file itself as well.
                os.kill(proc.pid, signal.SIGHUP)
            return proc

        procs: list[multiprocessing.process.BaseProcess] = []
        signal.signal(signal.SIGHUP, on_sighup)
        procs.extend(spawn(i) for i in range(workers))
        announced = False
        last_restart = 0.0
        while not stopping.wait(0.05):
            while True:
                try:
                    current = accepted.get_nowait()
                except queue.Empty:
                    break
            if not announced and all(Path(p).exists() for p in ready_paths):
                log.info("%d workers serving on %s", workers, listen)
                if ready_file:
                    Path(ready_file + ".tmp").write_text(listen)
                    Path(ready_file + ".tmp").replace(ready_file)
                announced = True
            for i, proc in enumerate(procs):
                if proc.is_alive():
                    continue
                if proc.exitcode == CONFIG_ERROR_EXIT:
                    log.error("worker %d stopped on a configuration error; stopping the service", i)
                    exit_status = CONFIG_ERROR_EXIT
                    stopping.set()
                    break
                if time.monotonic() - last_restart > 1.0:
                    log.error("worker %d exited with %s; restarting it", i, proc.exitcode)
                    if metrics_dir and proc.pid:
                        from prometheus_client import multiprocess

                        multiprocess.mark_process_dead(proc.pid, metrics_dir)
                    last_restart = time.monotonic()
                    procs[i] = spawn(i)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: no more reloads, and none can kill us
        for proc in procs:
            proc.terminate()  # SIGTERM: each worker drains, then exits
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
    reservation.close()
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if exit_status:
        sys.exit(exit_status)
