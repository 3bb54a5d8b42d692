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
import queue
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helseid_signer_client._proto import signer_pb2

from . import metrics
from .audit import AuditLog
from .backends.base import BackendConfigError, BackendError, DriftReporter, KeyBackend
from .config import (
    SIGN_ON_EVENT_LOOP_WARNING,
    ConfigError,
    ServerSettings,
    Settings,
    UnixSocketSettings,
    load_settings,
    parse_listen,
)
from .drain import CallTracker, drain_and_stop
from .keys import KeyResolutionError, KeySlot, build_backends, resolve_key_slots
from .policy import Caller, HtuPolicy, RateLimiter
from .rotation import AssertionKeys, RegistrationBook, days_to_expiry
from .service import Identify, Profile, ServiceState, SignerServicer, Snapshot, add_to_server

log = logging.getLogger("helseid_signer.server")
SERVICE_NAME = signer_pb2.DESCRIPTOR.services_by_name["SignerService"].full_name

#: Requests are a few hundred bytes; anything near this is hostile.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONNECTION_AGE_MS = 300_000
MAX_CONNECTION_AGE_GRACE_MS = 30_000
STOP_GRACE = 5.0  # seconds in-flight requests get after SIGTERM
IMPLICIT_INSECURE_CALLER = "insecure-development"
PROBE_TIMEOUT = 3.0  # seconds a health probe signature may take
DRIFT_CHECK_INTERVAL = 300.0  # seconds between asking cloud backends whether a pinned key moved on
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Runtime:
    """Everything one configuration generation needs: its settings, backends, key slots,
    profiles and callers. Built at start-up and again on each reload."""

    settings: Settings
    backends: dict[str, KeyBackend]
    slots: dict[str, KeySlot]
    profiles: dict[str, Profile]
    callers: dict[str, Caller]
    tls_callers: dict[str, Caller]
    book: RegistrationBook


def build_runtime(settings: Settings) -> Runtime:
    """Build backends and resolve keys (a key whose backend is unreachable stays pending);
    raise KeyResolutionError / BackendError for configuration errors."""
    backends = build_backends(settings)
    slots = resolve_key_slots(settings, backends, time.monotonic())
    book = RegistrationBook(settings.selfservice.records_dir if settings.selfservice else None)
    profiles = {
        name: Profile(
            name=name,
            settings=p,
            token_endpoint=p.effective_token_endpoint,
            assertion_keys=AssertionKeys(
                current=slots[p.assertion_key],
                next=slots[p.rotation.next_key] if p.rotation.next_key else None,
                next_active_from=p.rotation.next_active_from.timestamp() if p.rotation.next_active_from else None,
                previous=slots[p.rotation.previous_key] if p.rotation.previous_key else None,
                previous_until=(
                    p.rotation.previous_published_until.timestamp() if p.rotation.previous_published_until else None
                ),
                book=book,
                client_id=p.client_id,
                issuer=p.issuer,
            ),
            dpop_slot=slots[p.dpop_key],
            htu_policy=HtuPolicy.from_settings(p.effective_token_endpoint, p.api_base_urls),
        )
        for name, p in settings.profiles.items()
    }
    callers = build_callers(settings)
    if settings.server.insecure and not settings.server.insecure_caller:
        callers[IMPLICIT_INSECURE_CALLER] = Caller(IMPLICIT_INSECURE_CALLER, frozenset(profiles))
    tls_callers = {n: callers[name] for name, c in settings.callers.items() for n in c.tls_names}
    return Runtime(settings, backends, slots, profiles, callers, tls_callers, book)


def build_callers(settings: Settings) -> dict[str, Caller]:
    """The configured callers, each with its rate limiter."""
    callers = {}
    for name, c in settings.callers.items():
        limiter = None
        if c.rate_limit is not None:
            limiter = RateLimiter(c.rate_limit, c.rate_burst or max(1, int(c.rate_limit)))
        callers[name] = Caller(name, frozenset(c.profiles), limiter)
    return callers


def certificate_names(pem: bytes) -> tuple[str, ...]:
    """The identities a client certificate carries, as callers are matched: its DNS and
    URI subjectAltNames; only when it has no subjectAltName at all, its subject CN (RFC 6125
    section 6.4.4 practice). E-mail and IP SANs never identify a caller."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(
            a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)
        )
    return tuple(san.get_values_for_type(x509.DNSName)) + tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def tls_identifier(holder: RuntimeHolder) -> Identify:
    """Identify a caller by its verified client certificate (gRPC has checked the chain
    against ``client_ca``): one of :func:`certificate_names` equal to one of its
    ``tls_names``. A certificate whose names match two different callers is no caller
    (UNAUTHENTICATED). Names are cached per certificate."""
    cache: dict[bytes, tuple[str, ...]] = {}
    ambiguous: set[bytes] = set()  # certificates already logged as naming several callers
    seen_runtime: list[object] = [None]  # the configuration generation those were logged in

    def identify(context: grpc.aio.ServicerContext) -> Caller | None:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if not pem:
            return None
        names = cache.get(pem)
        if names is None:
            if len(cache) > 1024:
                cache.clear()
            names = cache[pem] = certificate_names(pem)
        if seen_runtime[0] is not holder.runtime:  # a reload: log ambiguous certificates afresh
            seen_runtime[0] = holder.runtime
            ambiguous.clear()
        by_name = holder.runtime.tls_callers
        matched = {id(c): c for c in (by_name.get(name) for name in names) if c is not None}
        if len(matched) > 1:
            # One certificate, two identities: which one it is would depend on the order of
            # its names. Neither is trusted; the issuing CA needs fixing.
            if pem not in ambiguous:
                if len(ambiguous) > 1024:
                    ambiguous.clear()
                ambiguous.add(pem)
                log.warning(
                    "a client certificate names %d callers (%s); refusing it as unauthenticated",
                    len(matched),
                    ", ".join(sorted(c.name for c in matched.values())),
                )
            return None
        return next(iter(matched.values()), None)

    return identify


def named_identifier(holder: RuntimeHolder, name: str) -> Identify:
    """Every request on this listener is the caller ``name`` (a Unix socket, or the
    insecure development listener); looked up per request so a reload takes effect."""
    return lambda context: holder.runtime.callers.get(name)


class RuntimeHolder(ServiceState):
    """The current :class:`Runtime` and the servicers' :class:`Snapshot`, swapped together."""

    def __init__(self, runtime: Runtime, audit: AuditLog) -> None:
        super().__init__(Snapshot(runtime.profiles, audit))
        self.runtime = runtime

    def swap(self, runtime: Runtime, audit: AuditLog) -> None:
        self.runtime = runtime
        self.current = Snapshot(runtime.profiles, audit)


def _owner_ids(owner: str | int | None, group: str | int | None) -> tuple[int, int]:
    uid = -1 if owner is None else owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid
    gid = -1 if group is None else group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    return uid, gid


def _new_server(settings: Settings, reuse_port: bool = False) -> grpc.aio.Server:
    return grpc.aio.server(
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # SO_REUSEPORT only for the worker processes of one supervisor (which reserved the
            # port): a single server must fail to start on a port another instance holds.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Connections are recycled (GOAWAY, then a grace period) so that clients balancing
            # with round_robin over DNS also reach replicas added after they connected.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ],
    )


class TlsFiles:
    """The server's TLS certificate, key and client CA, re-read on reload: gRPC asks the
    fetcher at every new handshake, so new connections get new certificates while open
    connections continue undisturbed."""

    def __init__(self, server: ServerSettings) -> None:
        self._config = self._load(server)
        self._fresh: object | None = None

    @staticmethod
    def _load(server: ServerSettings) -> object:
        assert server.tls_private_key and server.tls_certificate and server.client_ca
        return grpc.ssl_server_certificate_configuration(
            [(Path(server.tls_private_key).read_bytes(), Path(server.tls_certificate).read_bytes())],
            root_certificates=Path(server.client_ca).read_bytes(),
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch, require_client_authentication=True)

    def _fetch(self) -> object | None:
        fresh, self._fresh = self._fresh, None
        return fresh

    def reload(self, server: ServerSettings) -> None:
        """Read the files again (OSError/ValueError if unreadable: the old ones stay)."""
        self._fresh = self._load(server)


def _listeners(settings: Settings) -> tuple:
    s = settings.server
    sockets = tuple(sorted((n, c.unix_socket) for n, c in settings.callers.items() if c.unix_socket))
    return (s.listen, s.insecure, s.insecure_caller, s.workers, s.reflection, sockets)


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
            settings.audit.path, fail_closed=settings.audit.on_failure == "fail_closed", fsync=settings.audit.fsync
        )

    def _new_grpc_server(self, identify: Identify) -> grpc.aio.Server:
        server = _new_server(self.settings, reuse_port=self.is_worker)
        add_to_server(SignerServicer(self.holder, self.executor, identify), server, self.calls)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.server.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        self.servers.append(server)
        return server

    async def start(self) -> None:
        """Bind every listener, start serving, and set the health status."""
        server_settings = self.settings.server
        if self.settings.backends.pkcs11 is not None and self.settings.backends.pkcs11.sign_on_event_loop:
            log.warning(SIGN_ON_EVENT_LOOP_WARNING)
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
                    bound = self._new_grpc_server(named_identifier(self.holder, name)).add_insecure_port(target)
                else:
                    self.tls = TlsFiles(server_settings)
                    grpc_server = self._new_grpc_server(tls_identifier(self.holder))
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
            if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
            old_umask = os.umask(0o177)  # the socket exists 0600 until it gets its final mode
            try:
                self._new_grpc_server(named_identifier(self.holder, name)).add_insecure_port(f"unix:{path}")
            finally:
                os.umask(old_umask)
            self.sockets.append((path, c.unix_socket))
            self.addresses.append(f"unix:{path}")
        for server in self.servers:
            await server.start()
        for path, sock in self.sockets:
            uid, gid = _owner_ids(sock.owner, sock.group)
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)
            os.chmod(path, sock.mode)
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
            if slot.key is None and now >= slot.next_attempt:
                if await loop.run_in_executor(self.executor, slot.try_resolve, now):
                    log.info("key %s resolved: kid %s", slot.name, slot.key.kid)
                else:
                    log.warning("key %s still unavailable (next attempt in %.0f s): %s", slot.name,
                                slot.next_attempt - now, slot.error)  # fmt: skip
        await loop.run_in_executor(self.executor, runtime.book.refresh)
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
            rotation_ok[f"rotation:{profile.name}"] = not warnings and not profile.assertion_keys.rotation_blocked(wall)
        for profile in runtime.profiles.values():
            for slot, status, _, _ in profile.assertion_keys.published(wall):
                days = days_to_expiry(runtime.book, slot.key.kid, wall) if slot.key else None
                if days is not None:
                    metrics.KEY_EXPIRY_DAYS.labels(profile.name, slot.name, slot.key.kid, status).set(days)
        if time.monotonic() >= self._next_drift_check:
            self._next_drift_check = time.monotonic() + DRIFT_CHECK_INTERVAL
            await self._check_drift(runtime)
        statuses: dict[str, bool] = {}
        for scheme, backend in runtime.backends.items():
            pending = [s for s in runtime.slots.values() if s.backend is backend and s.key is None]
            probe = getattr(backend, "probe", None) or self._probe_fallback(runtime, backend)
            # Always probe, also while another key of this backend is pending: the probe is
            # what finds a replaced key restored (PKCS#11) and clears its state.
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
            runtime = await loop.run_in_executor(self.executor, build_runtime, settings)
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
            return False
        old_runtime, old_snapshot = self.holder.runtime, self.holder.current
        audit = new_audit or old_snapshot.audit
        self.holder.swap(runtime, audit)
        self.settings = settings
        # What the new configuration no longer uses is closed once the requests that
        # started with the old one are done (they still write their audit records there).
        replaced = [b for s, b in old_runtime.backends.items() if runtime.backends.get(s) is not b]
        self._retired.append((old_snapshot, old_snapshot.audit if new_audit else None, replaced))
        self._close_retired()
        if settings.backends.pkcs11 is not None and settings.backends.pkcs11.sign_on_event_loop:
            log.warning(SIGN_ON_EVENT_LOOP_WARNING)
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

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Health NOT_SERVING first, answer every call that has arrived (drain.py), then stop:
        calls still running get ``grace`` s."""
        self._stopping = True
        log.info("stopping: health NOT_SERVING, draining in-flight requests")
        await drain_and_stop(self.servers, self.health, self.calls, grace=grace)  # see drain.py
        self.executor.shutdown(wait=True)
        self._close_retired(force=True)
        self.holder.current.audit.close()
        for backend in self.holder.runtime.backends.values():
            backend.close()
        for path, _ in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


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
    await stop.wait()
    if own_signals:  # stopping: no more reloads, and a late SIGHUP (forwarded by a supervisor) cannot kill us
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    health_task.cancel()
    await server.stop()


def start_metrics_server(listen: str, registry: Any = None) -> None:
    """Serve ``GET /metrics`` on ``listen`` (host:port) in a daemon thread."""
    import prometheus_client

    host, port = parse_listen(listen)
    kwargs = {"registry": registry} if registry is not None else {}
    prometheus_client.start_http_server(port, addr=host, **kwargs)
    log.info("metrics on http://%s/metrics", listen)


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
    from .cli import setup_logging

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
