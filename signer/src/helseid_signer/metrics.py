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
* ``helseid_signer_rotation_blocked{profile}`` - 1 while a next key is due
  (``next_active_from`` passed) but not registered (or not available), so it cannot sign;
* ``helseid_signer_audit_write_failures_total`` - audit records that could not be written;
* ``helseid_signer_assertion_key_retries_total{profile,status}`` - client assertions asked
  for with ``avoid_kid`` (HelseID refused the first), by gRPC status.

``deploy/prometheus/helseid-signer-alerts.yaml`` holds alert rules on these.

With several worker processes the metrics use prometheus-client's multiprocess mode: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the workers and serves the
aggregate; gauges report the most recent live value.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ROTATION_BLOCKED = Gauge(
    "helseid_signer_rotation_blocked",
    "1 while a profile's next key is due but not registered with HelseID (it cannot sign).",
    ["profile"],
    multiprocess_mode="livemostrecent",
)
AUDIT_WRITE_FAILURES = Counter("helseid_signer_audit_write_failures", "Audit records that could not be written.")
ASSERTION_KEY_RETRIES = Counter(
    "helseid_signer_assertion_key_retries",
    "Client assertions requested with avoid_kid (HelseID refused one by that key), by gRPC status.",
    ["profile", "status"],
)
