"""The server in one process: its listeners (TCP with mTLS, or plaintext for development;
one Unix socket per caller that has one), the SignerService adapter and the health service
on each, health checks (pending keys, backend probes, rotation, pinned-key drift), reloads
(SIGHUP) and the drain on SIGTERM. :func:`serve` runs it until stopped; the worker
supervisor (:mod:`.supervisor`) runs several.

The server binds its listener before it reports ready; ``ready_file`` (if given) receives
the bound ``host:port`` so tests and supervisors can start it on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helseid_signer_client.proto import signer_pb2

from . import metrics
from .audit import AuditLog
from .backends.base import BackendError, DriftReporter, KeyBackend, OwnSigningThread, Prober, RegistrationStore
from .config import (
    ConfigError,
    ServerSettings,
    Settings,
    UnixSocketSettings,
    load_settings,
    parse_listen,
)
from .drain import CallTracker, drain_and_stop
from .identity import (
    Identify,
    TlsFiles,
    certificate_expiry,
    create_caller_socket,
    named_identifier,
    owner_ids,
    socket_directory_problem,
    tls_identifier,
)
from .rotation import days_to_expiry
from .runtime import IMPLICIT_INSECURE_CALLER, Runtime, RuntimeHolder, Snapshot, build_runtime
from .service import SignerServicer, add_to_server

log = logging.getLogger("helseid_signer.server")
SERVICE_NAME = signer_pb2.DESCRIPTOR.services_by_name["SignerService"].full_name

#: Requests are a few hundred bytes; anything near this is hostile.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONNECTION_AGE_MS = 300_000
MAX_CONNECTION_AGE_GRACE_MS = 30_000
STOP_GRACE = 5.0  # seconds in-flight requests get after SIGTERM
PROBE_TIMEOUT = 3.0  # seconds a health probe signature may take
#: Descriptors kept for everything but TCP connections (token store files, audit, metrics, logs).
FD_RESERVE = 256
#: Health.Watch streams one configured caller may hold open at once (per process).
WATCHES_PER_CALLER = 4
#: How often (seconds) the server looks for a backend whose call has run past its call_timeout.
STALL_CHECK_INTERVAL = 0.25
#: Seconds a reload may take to build the new configuration (resolve its keys).
RELOAD_TIMEOUT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def connection_cap() -> int:
    """Connections the TCP listener accepts at once: the process's descriptor limit less
    :data:`FD_RESERVE`, so peers holding connections (each a descriptor) can never take the
    descriptors the key store, the audit file and the metrics port need (issue 13: about
    1,000 idle connections used up the descriptors and SoftHSM itself failed). Beyond it a
    new connection is closed at once; open connections go on."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - FD_RESERVE)


def _new_server(settings: Settings, reuse_port: bool = False, tcp: bool = False) -> grpc.aio.Server:
    # Only the TCP listener is capped: a caller's Unix socket is reachable by its owner only.
    capped = [("grpc.max_allowed_incoming_connections", connection_cap())] if tcp else []
    return grpc.aio.server(
        # Unset by default: gRPC counts it before anyone is identified, so a peer that fills
        # it refuses every caller. Admission is per caller instead (policy.InFlight) and
        # Health.Watch is capped (HealthFront).
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # No cap on HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS): what can
            # hold a stream is bounded by identity instead (max_in_flight, Health.Watch), and a
            # cap would queue a busy caller's calls in its client, where the drain on SIGTERM
            # cannot see them (tests/service/test_lifecycle.py failed with a cap of 100).
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # SO_REUSEPORT only for the worker processes of one supervisor (which reserved the
            # port): a single server must fail to start on a port another instance holds.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Connections are recycled (GOAWAY, then a grace period) so that clients balancing
            # with round_robin over DNS also reach replicas added after they connected.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
            *capped,
        ],
    )


def _listeners(settings: Settings) -> tuple:
    s = settings.server
    sockets = tuple(sorted((n, c.unix_socket) for n, c in settings.callers.items() if c.unix_socket))
    return (s.listen, s.insecure, s.insecure_caller, s.workers, s.reflection, sockets)


class HealthFront(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` on one listener, in front of the process's one status
    (``health.aio.HealthServicer``), on terms that cannot starve signing:

    * ``Check`` for any peer that reached the listener (a unary answer from memory; the
      probe socket and load balancers use it);
    * ``Watch`` (a stream that stays open) only for a configured caller, at most
      :data:`WATCHES_PER_CALLER` at once per caller: an unknown peer gets
      UNAUTHENTICATED, more get RESOURCE_EXHAUSTED - so no peer can hold open streams
      without limit (issue 13: 1,000 Watch streams of a trusted but unlisted certificate
      filled ``max_concurrent_rpcs`` and every caller got RESOURCE_EXHAUSTED).
    """

    def __init__(self, status: health.aio.HealthServicer, identify: Identify, watches: dict[str, int]) -> None:
        self._status = status
        self._identify = identify
        self._watches = watches  # caller name -> open Watch streams (shared by every listener)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The status of ``request.service`` (NOT_FOUND for a name never set)."""
        return await self._status.Check(request, context)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Stream the status of ``request.service`` - configured callers only, capped."""
        caller = self._identify(context)
        if caller is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "Health.Watch is for configured callers; use Health.Check"
            )
        open_streams = self._watches.get(caller.name, 0)
        if open_streams >= WATCHES_PER_CALLER:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {WATCHES_PER_CALLER} Health.Watch streams of this caller; use Health.Check",
            )
        self._watches[caller.name] = open_streams + 1
        try:
            await self._status.Watch(request, context)
        finally:
            self._watches[caller.name] -= 1
            if not self._watches[caller.name]:
                del self._watches[caller.name]


class Server:
    """The running service in one process: listeners, servicers, health, reloads.

    One gRPC server per listener, so that each knows how its callers are identified:
    the TCP listener (mTLS, or plaintext with ``insecure = true``) and one Unix socket per
    caller that has one. All share the runtime, the signing executor, the audit log and
    the health status.
    """

    def __init__(self, settings: Settings, config_path: str | None = None, listen: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.listen = listen or settings.server.listen
        self.is_worker = listen is not None  # a supervisor's worker, sharing a reserved port
        self.holder = RuntimeHolder(build_runtime(settings), self._audit_log(settings))
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sign")
        self.health = health.aio.HealthServicer()
        self._watches: dict[str, int] = {}  # Health.Watch streams per caller (HealthFront)
        self.calls = CallTracker()  # SignerService calls in progress, for the drain on SIGTERM
        self.servers: list[grpc.aio.Server] = []
        self.addresses: list[str] = []
        self.sockets: list[tuple[str, UnixSocketSettings]] = []
        self.tls: TlsFiles | None = None
        self._statuses: dict[str, bool] = {}
        self._warned: set[object] = set()
        self._next_drift_check = 0.0
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        #: (snapshot, audit log, backends) that a reload replaced, closed once no request uses them
        self._retired: list[tuple[Snapshot, AuditLog | None, list[KeyBackend]]] = []

    @staticmethod
    def _audit_log(settings: Settings) -> AuditLog:
        return AuditLog(
            settings.audit.path,
            fail_closed=settings.audit.on_failure == "fail_closed",
            fsync=settings.audit.fsync,
            refusal_interval=settings.audit.refusal_interval,
        )

    def _new_grpc_server(self, identify: Identify, tcp: bool = False) -> grpc.aio.Server:
        server = _new_server(self.settings, reuse_port=self.is_worker, tcp=tcp)
        add_to_server(SignerServicer(self.holder, self.executor, identify), server, self.calls)
        health_pb2_grpc.add_HealthServicer_to_server(HealthFront(self.health, identify, self._watches), server)
        if self.settings.server.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        self.servers.append(server)
        return server

    async def start(self) -> None:
        """Bind every listener, start serving, and set the health status."""
        server_settings = self.settings.server
        for warning in self.settings.backends.warnings():
            log.warning(warning)
        if self.listen:
            host, port = parse_listen(self.listen)
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                if server_settings.insecure:
                    name = server_settings.insecure_caller or IMPLICIT_INSECURE_CALLER
                    log.warning(
                        "listening WITHOUT TLS on %s (server.insecure = true): development only; every request "
                        "there is caller %r",
                        target,
                        name,
                    )
                    bound = self._new_grpc_server(named_identifier(self.holder, name), tcp=True).add_insecure_port(
                        target
                    )
                else:
                    self.tls = TlsFiles(server_settings)
                    _publish_tls_expiry(server_settings)
                    grpc_server = self._new_grpc_server(tls_identifier(self.holder), tcp=True)
                    bound = grpc_server.add_secure_port(target, self.tls.credentials())
            except RuntimeError as exc:  # grpcio: "Failed to bind to address ..."
                bound = 0
                log.debug("bind failed: %s", exc)
            if not bound:
                raise ConfigError(f"server.listen: cannot listen on {target} (in use by another process?)")
            self.addresses.append(f"{host}:{bound}")
        for name, c in self.settings.callers.items():
            if c.unix_socket is None:
                continue
            path = c.unix_socket.path
            grpc_server = self._new_grpc_server(named_identifier(self.holder, name))
            try:
                if problem := socket_directory_problem(path):
                    raise ValueError(problem)
                uid, gid = owner_ids(c.unix_socket.owner, c.unix_socket.group)
                old_umask = os.umask(0o177)  # the socket exists 0600 until it gets its final mode
                try:
                    create_caller_socket(
                        path, c.unix_socket.mode, uid, gid, lambda p, s=grpc_server: s.add_insecure_port(f"unix:{p}")
                    )
                finally:
                    os.umask(old_umask)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"callers.{name}.unix_socket.path: {exc}") from None
            self.sockets.append((path, c.unix_socket))
            self.addresses.append(f"unix:{path}")
        for server in self.servers:
            await server.start()
        await self.check_health()
        log.info(
            "serving %s on %s with %d profile(s)",
            SERVICE_NAME,
            ", ".join(self.addresses),
            len(self.holder.runtime.profiles),
        )

    async def check_health(self) -> None:
        """Resolve pending keys whose backoff has passed, probe every backend, and publish
        ``backend:<scheme>`` statuses and the overall one (SERVING only when every backend
        can sign: a replica that cannot sign for some profile takes no traffic)."""
        runtime = self.holder.runtime
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for slot in runtime.slots.values():
            if slot.key is None and now >= slot.next_attempt and not self._hung(slot.backend):
                if await self._bounded(self.executor, slot.try_resolve, now):
                    log.info("key %s resolved: kid %s", slot.name, slot.key.kid)
                else:
                    log.warning("key %s still unavailable (next attempt in %.0f s): %s", slot.name,
                                slot.next_attempt - now, slot.error)  # fmt: skip
        # Registration records are read from the key stores too (issue 16): never from one
        # that hangs, and never for longer than a probe, so a hung key store cannot hold the
        # health check - and with it reloads - behind it (issue 13).
        if not any(self._hung(b) for b in runtime.backends.values() if isinstance(b, RegistrationStore)):
            await self._bounded(self.executor, runtime.book.refresh)
        wall = time.time()
        rotation_ok: dict[str, bool] = {}
        for profile in runtime.profiles.values():
            warnings = profile.assertion_keys.expiry_warnings(wall)
            for warning in warnings:
                if (profile.name, warning) not in self._warned:
                    self._warned.add((profile.name, warning))
                    log.warning("profile %s: %s", profile.name, warning)
            # Health detail: rotation:<profile> is NOT_SERVING while a due next key cannot take
            # over or a published key's HelseID registration expires within 14 days. It does
            # not change the overall status: the current key still signs.
            blocked = profile.assertion_keys.rotation_blocked(wall)
            metrics.ROTATION_BLOCKED.labels(profile.name).set(1 if blocked else 0)
            rotation_ok[f"rotation:{profile.name}"] = not warnings and not blocked
        for profile in runtime.profiles.values():
            for slot, status, _, _ in profile.assertion_keys.published(wall):
                days = days_to_expiry(runtime.book, slot.key.kid, wall) if slot.key else None
                if days is not None:
                    metrics.KEY_EXPIRY_DAYS.labels(profile.name, slot.name, slot.key.kid, status).set(days)
        if time.monotonic() >= self._next_drift_check:
            self._next_drift_check = time.monotonic() + self.settings.server.drift_check_interval
            await self._check_drift(runtime)
        statuses: dict[str, bool] = {}
        for scheme, backend in runtime.backends.items():
            pending = [s for s in runtime.slots.values() if s.backend is backend and s.key is None]
            probe = backend.probe if isinstance(backend, Prober) else self._probe_fallback(runtime, backend)
            # Always probe, also while another key of this backend is pending: the probe is
            # what finds a replaced key restored (PKCS#11) and clears its state. A backend
            # with a signing thread of its own is probed there, behind its signatures, and
            # not at all while a call on it has run past call_timeout.
            if isinstance(backend, OwnSigningThread):
                try:  # behind the queued signatures; given up only when a call there hangs
                    probed = await backend.sign_executor.call(backend.call_timeout, None, probe)
                except BackendError:
                    probed = False
            else:
                probed = await loop.run_in_executor(self.executor, probe)
            ok = probed and not pending
            statuses[f"backend:{scheme}"] = bool(ok)
            metrics.BACKEND_UP.labels(scheme).set(1 if ok else 0)
        overall = all(statuses.values())
        for name, ok in {**statuses, **rotation_ok, "": overall, SERVICE_NAME: overall}.items():
            if self._statuses.get(name) != ok:
                if name.startswith("backend:") and name in self._statuses:
                    log.warning("%s is now %s", name, "SERVING" if ok else "NOT_SERVING")
                await self.health.set(name, SERVING if ok else NOT_SERVING)
        self._statuses = {**statuses, **rotation_ok, "": overall, SERVICE_NAME: overall}

    @staticmethod
    def _hung(backend: KeyBackend) -> bool:
        """True while a call on the backend's own signing thread has run past its call_timeout."""
        return isinstance(backend, OwnSigningThread) and backend.sign_executor.busy_for() > backend.call_timeout

    async def _bounded(self, executor: Any, fn: Callable[..., Any], *args: Any, timeout: float = PROBE_TIMEOUT) -> Any:
        """``fn(*args)`` on ``executor``, waited for at most ``timeout`` seconds (False after
        that: the call may hang in a key store, and the health check must go on)."""
        future = executor.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            future.cancel()
            log.warning("%s did not return within %.1f s", getattr(fn, "__qualname__", fn), timeout)
            return False

    async def stall_loop(self) -> None:
        """Every :data:`STALL_CHECK_INTERVAL` s: a backend whose signing thread has run one
        call past its ``call_timeout`` is shown NOT_SERVING at once (with the overall status),
        so load balancers and clients move away within ``call_timeout`` plus this interval.
        The next health check that can probe it again restores it."""
        while True:
            await asyncio.sleep(STALL_CHECK_INTERVAL)
            for scheme, backend in self.holder.runtime.backends.items():
                name = f"backend:{scheme}"
                if self._hung(backend) and self._statuses.get(name, True):
                    log.error(
                        "%s is hung: a call has run %.1f s (call_timeout %g s); NOT_SERVING",
                        name,
                        backend.sign_executor.busy_for(),  # type: ignore[attr-defined]
                        backend.call_timeout,  # type: ignore[attr-defined]
                    )
                    metrics.BACKEND_UP.labels(scheme).set(0)
                    for status in (name, "", SERVICE_NAME):
                        self._statuses[status] = False
                        await self.health.set(status, NOT_SERVING)

    @staticmethod
    def _probe_fallback(runtime: Runtime, backend: KeyBackend) -> Callable[[], bool]:
        """For a backend without ``probe()``: its own ``health()``, and when that says no, one
        real signature with one of its keys - so a backend that came back (a KMS endpoint
        restarted) is seen as SERVING again even when no request has arrived since."""
        slot = next((s for s in runtime.slots.values() if s.backend is backend and s.key is not None), None)

        def probe() -> bool:
            if backend.health():
                return True
            if slot is None or slot.key is None:
                return False
            try:
                slot.key.sign(b"helseid-signer health probe", time.monotonic() + PROBE_TIMEOUT)
                return True
            except BackendError:
                return False

        return probe

    async def _check_drift(self, runtime: Runtime) -> None:
        """Ask backends that can tell whether a pinned key's reference moved on (an AWS alias,
        a newer Azure version); log each new finding once and export it as a metric."""
        loop = asyncio.get_running_loop()
        for slot in runtime.slots.values():
            if slot.key is None or not isinstance(slot.backend, DriftReporter):
                continue
            try:
                message = await loop.run_in_executor(self.executor, slot.backend.drift_message, slot.key.resolved)
            except BackendError as exc:
                message = f"cannot check: {exc}"
            metrics.KEY_PINNING_DRIFT.labels(slot.name).set(1 if message else 0)
            if message and message not in self._warned:
                self._warned.add(message)
                log.warning("key %s (kid %s): %s", slot.name, slot.key.kid, message)

    async def health_loop(self, interval: float) -> None:
        """Run :meth:`check_health` every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._reload_lock:  # never a check of a configuration a reload replaced
                    self._close_retired()
                    self.holder.current.audit.flush_refusals()
                    await self.check_health()
            except Exception:
                log.exception("health check failed")

    async def reload(self) -> bool:
        """Re-read the configuration file and the TLS files (SIGHUP). A configuration that
        does not load, does not resolve, or changes the listeners is refused and the old
        one stays. Open connections are never dropped. Reloads run one at a time (a second
        SIGHUP waits, then reads the file as it is then). Returns True when applied."""
        if not self.config_path:
            log.error("reload: no configuration file to re-read")
            return False
        async with self._reload_lock:
            if self._stopping:
                log.info("reload ignored: the service is stopping")
                return False
            return await self._reload()

    async def _reload(self) -> bool:
        assert self.config_path
        loop = asyncio.get_running_loop()
        runtime: Runtime | None = None
        new_audit: AuditLog | None = None
        try:
            settings = load_settings(self.config_path)
            if _listeners(settings) != _listeners(self.settings):
                raise ConfigError("listener settings changed (listen, insecure, workers, sockets): restart to apply")
            hung = [s for s, b in self.holder.runtime.backends.items() if self._hung(b)]
            if hung:
                raise ConfigError(f"backend(s) {hung} hung in a call (call_timeout passed); retry once they answer")
            building = loop.run_in_executor(self.executor, build_runtime, settings)
            try:
                runtime = await asyncio.wait_for(asyncio.shield(building), RELOAD_TIMEOUT)
            except TimeoutError:
                # A key store hangs while the new keys are resolved: refuse now; whatever the
                # late build returns is closed when it returns.
                building.add_done_callback(_close_late_runtime)
                raise ConfigError(
                    f"resolving the keys took more than {RELOAD_TIMEOUT:g} s (a key store hangs?)"
                ) from None
            pending = [slot.name for slot in runtime.slots.values() if slot.key is None]
            if pending:
                raise ConfigError(f"keys {pending} cannot be resolved now; the running configuration can still sign")
            if settings.audit != self.settings.audit or self.holder.current.audit.moved():
                # New settings, or the file was moved away (log rotation): open the path anew.
                new_audit = self._audit_log(settings)  # OSError when the new path cannot be opened
            if self.tls is not None:
                self.tls.reload(settings.server)  # last: nothing after it can fail
        except Exception as exc:
            if new_audit is not None:
                new_audit.close()
            if runtime is not None:
                for backend in runtime.backends.values():
                    backend.close()
            log.error("reload refused, the running configuration stays: %s", exc)
            metrics.RELOADS.labels("refused").inc()
            return False
        if self.tls is not None:
            _publish_tls_expiry(settings.server)
        metrics.RELOADS.labels("applied").inc()
        old_runtime, old_snapshot = self.holder.runtime, self.holder.current
        audit = new_audit or old_snapshot.audit
        self.holder.swap(runtime, audit)
        self.settings = settings
        # What the new configuration no longer uses is closed once the requests that
        # started with the old one are done (they still write their audit records there).
        replaced = [b for s, b in old_runtime.backends.items() if runtime.backends.get(s) is not b]
        self._retired.append((old_snapshot, old_snapshot.audit if new_audit else None, replaced))
        self._close_retired()
        for warning in settings.backends.warnings():
            log.warning(warning)
        await self.check_health()
        log.info("configuration reloaded: %d profile(s), %d caller(s)", len(runtime.profiles), len(runtime.callers))
        return True

    def _close_retired(self, force: bool = False) -> None:
        """Close the audit logs and backends of earlier configurations whose requests have all
        finished (all of them with ``force``, at stop)."""
        keep = []
        # An audit log can serve several generations (a reload that left [audit] alone):
        # it is closed only when no generation that still has requests writes to it.
        busy_audits = {id(s.audit) for s, _, _ in self._retired if s.calls[0]}
        for snapshot, audit, backends in self._retired:
            busy = snapshot.calls[0] or (audit is not None and id(audit) in busy_audits)
            if busy and not force:
                keep.append((snapshot, audit, backends))
                continue
            if audit is not None:
                audit.close()
            for backend in backends:
                backend.close()
        self._retired = keep

    def hung(self) -> bool:
        """True while a call on some backend's own signing thread has run past its call_timeout."""
        return any(self._hung(b) for b in self.holder.runtime.backends.values())

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Health NOT_SERVING first, answer every call that has arrived (drain.py), then stop:
        calls still running get ``grace`` s."""
        self._stopping = True
        log.info("stopping: health NOT_SERVING, draining in-flight requests")
        await drain_and_stop(self.servers, self.health, self.calls, grace=grace)  # see drain.py
        # Never wait for a call that hangs in a key store: stop in bounded time.
        self.executor.shutdown(wait=not self.hung(), cancel_futures=True)
        self._close_retired(force=True)
        self.holder.current.audit.close()
        for backend in self.holder.runtime.backends.values():
            backend.close()
        for path, _ in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _publish_tls_expiry(server: ServerSettings) -> None:
    """Set the certificate-expiry gauge for the TLS files just loaded."""
    for name, when in certificate_expiry(server).items():
        metrics.TLS_CERTIFICATE_EXPIRY.labels(name).set(when)


async def serve(
    settings: Settings,
    ready_file: str | None = None,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
    listen: str | None = None,
    on_reload: Callable[[Settings], None] | None = None,
    reload_pending: threading.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None); SIGHUP reloads
    ``config_path``. ``listen`` overrides ``server.listen`` (a worker binds the concrete port
    its supervisor reserved); ``on_reload`` gets each configuration a reload applied (a
    worker tells its supervisor, which restarts workers with it); ``reload_pending`` set
    means a SIGHUP came while the worker was starting: reload once serving."""
    server = Server(settings, config_path, listen)
    await server.start()
    if settings.metrics and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        start_metrics_server(settings.metrics.listen)
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(server.addresses[0])
        tmp.replace(ready_file)
    loop = asyncio.get_running_loop()
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def reload() -> None:
            if await server.reload() and on_reload is not None:
                on_reload(server.settings)

        reloads: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

        def start_reload() -> None:
            task = loop.create_task(reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, start_reload)
        if reload_pending is not None and reload_pending.is_set():
            start_reload()
    health_task = loop.create_task(server.health_loop(settings.server.health_interval))
    stall_task = loop.create_task(server.stall_loop())
    await stop.wait()
    if own_signals:  # stopping: no more reloads, and a late SIGHUP (forwarded by a supervisor) cannot kill us
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    health_task.cancel()
    stall_task.cancel()
    await server.stop()
    if own_signals and server.hung():
        # A thread is stuck in a key store call that cannot be cancelled; the interpreter would
        # wait for it at exit. Every answered request has its audit record; leave now.
        log.error("stopped with a key store call still hanging; exiting without waiting for it")
        logging.shutdown()
        os._exit(0)


def start_metrics_server(listen: str, registry: Any = None) -> None:
    """Serve ``GET /metrics`` on ``listen`` (host:port) in a daemon thread, with bounded
    connections and timeouts (:func:`.metrics.serve_metrics`)."""
    host, port = parse_listen(listen)
    metrics.serve_metrics(host, port, registry)
    log.info("metrics on http://%s/metrics", listen)


def _close_late_runtime(building: Any) -> None:
    """Close the backends of a runtime a timed-out reload built after all."""
    if building.cancelled() or building.exception() is not None:
        return
    for backend in building.result().backends.values():
        backend.close()
