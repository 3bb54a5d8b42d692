"""Audit trail: one JSON record per request, signed or refused.

A record holds: ``time`` (UTC, ISO 8601 with milliseconds), ``caller``, ``profile``,
``purpose`` (``client_assertion``, ``dpop_proof``, ``client_profile``, ``key_set``),
``outcome`` (``signed``, ``answered``, ``refused``, ``failed``), ``status`` (the gRPC
status name), ``latency_ms``, and for signatures ``kid``, ``alg``, ``jti``,
``key_version`` (the backend's exact key version), ``exp`` for assertions, ``htm``/``htu``
and ``nonce_present``/``ath_present`` for proofs; for refusals ``error`` (the message,
which names the field); for backend failures also ``ref`` (the reference the caller was
given) and ``backend_error`` (the backend's own text, which callers never see).

It NEVER holds a JWS, a signature, an access token (the service never sees one; only
whether an ``ath`` was requested), a nonce value, a key or a PIN.

Failure policy (``[audit] on_failure``): ``fail_closed`` (default) - if the record cannot
be written and flushed, the request fails with UNAVAILABLE and no JWS is returned, so
nothing is ever signed unaudited; ``continue`` - log an error and answer anyway.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO


class AuditError(Exception):
    """The audit record could not be written."""


class AuditLog:
    """Writes audit records as JSON lines to ``stream`` (stdout) or to the file ``path``.

    Args:
        path: file to append to (opened once, line-buffered), or None for stdout.
        fail_closed: raise :class:`AuditError` when a write fails (see module docstring).
    """

    def __init__(self, path: str | None = None, fail_closed: bool = True) -> None:
        self.fail_closed = fail_closed
        self._stream: TextIO = open(path, "a", encoding="utf-8", buffering=1) if path else sys.stdout  # noqa: SIM115
        self._own = path is not None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (a ``time`` field is added first) and flush it to the OS."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"time": now, **record}, separators=(",", ":"), ensure_ascii=False)
        try:
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
        except (OSError, ValueError) as exc:
            if self.fail_closed:
                raise AuditError(f"audit record not written: {exc}") from exc
            import logging

            logging.getLogger("helseid_signer.audit").error("audit record not written: %s", exc)

    def close(self) -> None:
        """Close the file (not stdout)."""
        if self._own:
            self._stream.close()
