"""The service's own log: one JSON object per line on stderr (``time``, ``level``,
``logger``, ``message``, and ``exception`` with a traceback). Never a private key, a PIN
or an access token (tests/zz_last/test_no_secrets_in_logs.py).
"""

from __future__ import annotations

import json
import logging
import sys


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
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
