"""The service's own log: one JSON object per line on stderr. Never a private key, a PIN
or an access token (tests/zz_last/test_no_secrets_in_logs.py).

Fields (docs/operations.md, "The log"): ``time`` (UTC, ISO 8601 with milliseconds and
``Z``, the same format as audit records' ``time``), ``level`` (``debug``, ``info``,
``warning``, ``error``), ``logger`` (``helseid_signer.server``, ``helseid_signer.audit``,
..., ``grpc.core`` for gRPC core's own lines, ``stderr`` for any other text written
there), ``message``; ``exception`` with a traceback when there is one; ``source``
(file:line in gRPC core) on ``grpc.core`` lines.

gRPC core (C++) writes its own lines (TLS handshake failures, for instance) to file
descriptor 2, not through Python's logging. :func:`capture_native_stderr` (``serve``
calls it) puts a pipe on descriptor 2 and turns each such line into a JSON line of logger
``grpc.core`` (other lines: logger ``stderr``, level warning); lines that are already JSON
objects (the worker processes' logs, which inherit descriptor 2) pass through unchanged.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO


def utc_time(epoch: float) -> str:
    """``2026-12-05T14:20:42.123Z``: the time format of log lines and audit records."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        source = getattr(record, "native_source", None)
        if source:
            entry["source"] = source
        anchor = getattr(record, "audit_chain", None)  # audit.AuditLog's chain anchors
        if anchor is not None:
            entry["audit_chain"] = anchor
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str) -> None:
    """JSON log lines on stderr at ``level`` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


#: absl's prefix of gRPC core lines: ``E1205 14:20:42.123456   12345 file.cc:123] message``
_ABSL_LINE = re.compile(r"^([EWIF])\d{4}\s+[\d:.]+\s+\d+\s+([^\]\s]+)\]\s?(.*)$")
_ABSL_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "F": logging.CRITICAL}
_captured: list[int] = []


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _pump(read_fd: int, out: TextIO, lock: threading.RLock) -> None:
    native = logging.getLogger("grpc.core")
    other = logging.getLogger("stderr")
    with open(read_fd, encoding="utf-8", errors="replace", closefd=True) as pipe:
        for raw in pipe:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            if _is_json_object(line):
                with lock:
                    out.write(line + "\n")
                    out.flush()
                continue
            match = _ABSL_LINE.match(line)
            if match:
                native.log(_ABSL_LEVELS[match.group(1)], "%s", match.group(3), extra={"native_source": match.group(2)})
            else:  # anything else a library or a worker wrote to stderr, one line each
                other.warning("%s", line)


def capture_native_stderr() -> None:
    """Route what native code writes to descriptor 2 into the JSON log (module docstring).

    Python's own ``sys.stderr`` and the log handlers move to a copy of the original
    descriptor; descriptor 2 becomes a pipe read by a daemon thread. At exit the original
    descriptor is put back (the pipe's last lines are written first). Idempotent."""
    if _captured:
        return
    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    out = open(original, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = out
    lock = threading.RLock()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(out)
            handler.lock = lock  # the pump's pass-through lines and log records never interleave
    pump = threading.Thread(target=_pump, args=(read_fd, out, lock), name="native-stderr", daemon=True)
    pump.start()
    _captured.append(original)

    def restore() -> None:
        os.dup2(original, 2)  # closes the pipe's write end held at descriptor 2: the pump sees EOF
        pump.join(timeout=2.0)

    atexit.register(restore)
