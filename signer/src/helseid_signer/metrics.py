"""Prometheus metrics (prometheus-client), served on their own port (``[metrics] listen``).

Names and labels (no label ever holds a token, a key or a caller-chosen free text):

* ``helseid_signer_requests_total{profile,purpose,alg,backend,status}`` - every request,
  signed or refused (``status`` is the gRPC status name; ``alg``/``backend`` empty when the
  request was refused before a key was chosen; ``profile`` is a configured profile name or
  ``-``, so callers cannot grow the label set with names of their own);
* ``helseid_signer_request_duration_seconds{purpose}`` - whole-request latency;
* ``helseid_signer_backend_sign_duration_seconds{backend,alg}`` - the backend call alone;
* ``helseid_signer_backend_retries_total{backend}``, ``helseid_signer_backend_throttled_total{backend}``;
* ``helseid_signer_backend_up{backend}`` - 1 while the backend can sign (health probe);
* ``helseid_signer_pkcs11_sessions{module}`` - open PKCS#11 sessions;
* ``helseid_signer_key_pinning_drift{key}`` - 1 when an alias now names another key or a
  newer key version exists (the pinned version keeps signing);
* ``helseid_signer_key_registration_expiry_days{profile,key,kid,status}`` - days until a
  published assertion key's HelseID registration expires (alert below 14);
* ``helseid_signer_caller_refusals_total{caller,status}`` - refused requests per caller
  (``caller`` is a configured caller name, or ``-`` for an unknown one: bounded);
* ``helseid_signer_reloads_total{result}`` - reloads ``applied`` or ``refused``;
* ``helseid_signer_audit_write_failures_total`` - audit records that could not be written;
* ``helseid_signer_tls_certificate_expiry_timestamp_seconds{certificate}`` - when the
  server certificate (``server``) and the earliest CA in ``client_ca`` (``client_ca``) expire;
* ``helseid_signer_rotation_blocked{profile}`` - 1 while a next key is due
  (``next_active_from`` passed) but not registered (or not available), so it cannot sign;
* ``helseid_signer_assertion_key_retries_total{profile,status}`` - client assertions asked
  for with ``avoid_kid`` (HelseID refused the first), by gRPC status.

``deploy/prometheus/helseid-signer-alerts.yaml`` holds alert rules on these;
docs/operations.md, "Metrics", has the table operators read.

Served by :func:`serve_metrics` (the standard library's HTTP server, bounded: at most
:data:`METRICS_MAX_CONNECTIONS` connections at once, each closed after
:data:`METRICS_TIMEOUT` seconds idle), on loopback unless ``[metrics] listen`` says otherwise.

With several worker processes the metrics use prometheus-client's multiprocess mode: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the workers and serves the
aggregate; gauges report the most recent live value.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "helseid_signer_requests",
    "Requests by profile, purpose, alg, backend and gRPC status.",
    ["profile", "purpose", "alg", "backend", "status"],
)
REQUEST_SECONDS = Histogram(
    "helseid_signer_request_duration_seconds", "Whole-request latency.", ["purpose"], buckets=_LATENCY_BUCKETS
)
BACKEND_SIGN_SECONDS = Histogram(
    "helseid_signer_backend_sign_duration_seconds",
    "Latency of the backend's sign call.",
    ["backend", "alg"],
    buckets=_LATENCY_BUCKETS,
)
BACKEND_RETRIES = Counter("helseid_signer_backend_retries", "Retries made by a cloud backend.", ["backend"])
BACKEND_THROTTLED = Counter(
    "helseid_signer_backend_throttled", "Throttling answers (AWS ThrottlingException, Azure 429).", ["backend"]
)
BACKEND_UP = Gauge(
    "helseid_signer_backend_up", "1 while the backend can sign.", ["backend"], multiprocess_mode="livemostrecent"
)
PKCS11_SESSIONS = Gauge(
    "helseid_signer_pkcs11_sessions", "Open PKCS#11 sessions.", ["module"], multiprocess_mode="livesum"
)
KEY_EXPIRY_DAYS = Gauge(
    "helseid_signer_key_registration_expiry_days",
    "Days until a published assertion key's HelseID registration expires.",
    ["profile", "key", "kid", "status"],
    multiprocess_mode="livemostrecent",
)
KEY_PINNING_DRIFT = Gauge(
    "helseid_signer_key_pinning_drift",
    "1 when the key store has moved on from the pinned key version (alias moved, newer version).",
    ["key"],
    multiprocess_mode="livemostrecent",
)
CALLER_REFUSALS = Counter(
    "helseid_signer_caller_refusals",
    "Refused requests per configured caller ('-' for an unknown caller) and gRPC status.",
    ["caller", "status"],
)
RELOADS = Counter("helseid_signer_reloads", "Configuration reloads (SIGHUP) by result: applied, refused.", ["result"])
AUDIT_WRITE_FAILURES = Counter("helseid_signer_audit_write_failures", "Audit records that could not be written.")
TLS_CERTIFICATE_EXPIRY = Gauge(
    "helseid_signer_tls_certificate_expiry_timestamp_seconds",
    "Unix time at which the server certificate (server) or the earliest CA in client_ca (client_ca) expires.",
    ["certificate"],
    multiprocess_mode="livemostrecent",
)

ROTATION_BLOCKED = Gauge(
    "helseid_signer_rotation_blocked",
    "1 while a profile's next key is due but not registered with HelseID (it cannot sign).",
    ["profile"],
    multiprocess_mode="livemostrecent",
)
ASSERTION_KEY_RETRIES = Counter(
    "helseid_signer_assertion_key_retries",
    "Client assertions requested with avoid_kid (HelseID refused one by that key), by gRPC status.",
    ["profile", "status"],
)


#: Connections the metrics endpoint serves at once; more are closed as they are accepted.
METRICS_MAX_CONNECTIONS = 8
#: Seconds a metrics connection may sit idle (or dribble a request) before it is closed.
METRICS_TIMEOUT = 5.0


class _MetricsHandler(BaseHTTPRequestHandler):
    """``GET /metrics`` (and ``/``): the registry in the Prometheus text format. A socket
    timeout (:data:`METRICS_TIMEOUT`) ends idle and slow connections."""

    timeout = METRICS_TIMEOUT
    registry: Any = REGISTRY
    protocol_version = "HTTP/1.0"  # one request per connection: nothing is held open after it

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path.split("?", 1)[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # scrapes are not logged


class BoundedMetricsServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with at most ``max_connections`` connections being served
    (a thread each); a connection beyond that is closed as soon as it is accepted, so idle
    or slow peers can hold neither threads nor descriptors without limit. (prometheus-client's
    ``start_http_server`` takes one thread per connection with no timeout: about 1,000 idle
    connections used up the process's descriptors, issue 13.)"""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int = METRICS_MAX_CONNECTIONS):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(host: str, port: int, registry: Any = None) -> BoundedMetricsServer:
    """Serve ``GET /metrics`` of ``registry`` (default: this process's) on ``host:port`` in a
    daemon thread, bounded by :class:`BoundedMetricsServer`; returns the server (``port``
    0: see ``server.server_address``)."""
    handler = type("Handler", (_MetricsHandler,), {"registry": registry if registry is not None else REGISTRY})
    server = BoundedMetricsServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
