"""Audit trail: one JSON record per request, signed or refused, in hash chains.

A record holds: ``time`` (UTC, ISO 8601 with milliseconds), ``chain``, ``seq`` and ``prev``
(below), ``caller``, ``profile``, ``purpose`` (``client_assertion``, ``dpop_proof``,
``client_profile``, ``key_set``), ``outcome`` (``signed``, ``answered``, ``refused``,
``failed``), ``status`` (the gRPC status name), ``latency_ms``, and for signatures ``kid``,
``alg``, ``jti``, ``key_version`` (the backend's exact key version), ``exp`` for assertions,
``htm``/``htu`` and ``nonce_present``/``ath_present`` for proofs; for refusals ``error``
(the message, which names the field); for backend failures also ``ref`` (the reference the
caller was given) and ``backend_error`` (the backend's own text, which callers never see).

It NEVER holds a JWS, a signature, an access token (the service never sees one; only
whether an ``ath`` was requested), a nonce value, a key or a PIN.

**Hash chain (tamper evidence).** Each :class:`AuditLog` (one per worker process and
configuration generation) starts a chain with a random ``chain`` id; its records carry
``seq`` = 1, 2, 3 ... and ``prev`` = base64url(SHA-256 of the previous record's line, as
written, without the newline), ``null`` for ``seq`` 1. :func:`verify_lines` (``helseid-signer
audit verify``) finds an edited, removed, inserted or reordered record anywhere except at the
very end of a chain: the last record of a chain, or whole chains, can still be removed or
altered unnoticed by someone who can write the file - ship records off the host as they are
written (docs/security.md).

Failure policy (``[audit] on_failure``): ``fail_closed`` (default) - if the record cannot
be written and flushed (and, with ``fsync = true``, synced to disk), the request fails with
UNAVAILABLE and no JWS is returned, so nothing is ever signed unaudited; ``continue`` - log
an error and answer anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from .jwt import b64url

log = logging.getLogger("helseid_signer.audit")


class AuditError(Exception):
    """The audit record could not be written."""


def line_hash(line: str) -> str:
    """base64url(SHA-256(``line`` as UTF-8)): the ``prev`` of the record after ``line``."""
    return b64url(hashlib.sha256(line.encode("utf-8")).digest())


class AuditLog:
    """Writes audit records as JSON lines to ``stream`` (stdout) or to the file ``path``,
    each in this log's hash chain (see the module docstring).

    Args:
        path: file to append to (opened once, line-buffered), or None for stdout.
        fail_closed: raise :class:`AuditError` when a write fails (see module docstring).
        fsync: also ``fsync`` the file after each record (a record survives a crash of the
            host, at the cost of a disk sync per request); ignored for stdout.
    """

    def __init__(self, path: str | None = None, fail_closed: bool = True, fsync: bool = False) -> None:
        self.fail_closed = fail_closed
        self._stream: TextIO = open(path, "a", encoding="utf-8", buffering=1) if path else sys.stdout  # noqa: SIM115
        self._own = path is not None
        self._fsync = fsync and path is not None
        self._lock = threading.Lock()
        self.chain = secrets.token_hex(8)
        self._seq = 0
        self._prev: str | None = None

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (``time``, ``chain``, ``seq`` and ``prev`` are added first) and
        flush it to the OS (and to disk with ``fsync``). Raises AuditError (fail-closed)."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            entry = {"time": now, "chain": self.chain, "seq": self._seq + 1, "prev": self._prev, **record}
            line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
                if self._fsync:
                    os.fsync(self._stream.fileno())
            except (OSError, ValueError) as exc:
                # The chain does not advance: the next record links to the last one written.
                if self.fail_closed:
                    raise AuditError(f"audit record not written: {exc}") from exc
                log.error("audit record not written: %s", exc)
                return
            self._seq += 1
            self._prev = line_hash(line)

    def close(self) -> None:
        """Close the file (not stdout)."""
        if self._own:
            self._stream.close()


@dataclass
class ChainReport:
    """One chain as :func:`verify_lines` found it."""

    chain: str
    records: int = 0
    first_time: str | None = None
    last_time: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Verification:
    """What :func:`verify_lines` found: the chains (in order of first appearance), the
    number of lines that are not audit records (log lines in the same stream), and the
    lines that look like audit records but cannot be read."""

    chains: dict[str, ChainReport] = field(default_factory=dict)
    other_lines: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not c.problems for c in self.chains.values())


def verify_lines(lines: Iterable[str]) -> Verification:
    """Check the hash chains of audit records (see the module docstring).

    ``lines``: the file's lines (with or without newlines; numbered from 1 in messages).
    A chain must start at ``seq`` 1 with ``prev`` null, go up by one, and each ``prev`` must
    be the hash of the chain's previous line. Lines without ``chain`` are not audit records
    and are counted, not checked (an audit stream on stdout also carries log lines). Never
    raises on bad input."""
    result = Verification()
    last: dict[str, tuple[int, str]] = {}  # chain -> (seq, hash of its last line)
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if '"chain"' in line:
                result.problems.append(f"line {number}: an audit record that is not valid JSON")
            else:
                result.other_lines += 1
            continue
        if not isinstance(entry, dict) or "chain" not in entry:
            result.other_lines += 1
            continue
        chain, seq, prev = entry.get("chain"), entry.get("seq"), entry.get("prev")
        if not isinstance(chain, str) or not isinstance(seq, int) or not (prev is None or isinstance(prev, str)):
            result.problems.append(f"line {number}: chain, seq or prev missing or of the wrong type")
            continue
        report = result.chains.setdefault(chain, ChainReport(chain))
        report.records += 1
        report.first_time = report.first_time or entry.get("time")
        report.last_time = entry.get("time")
        expected_seq, expected_prev = (1, None) if chain not in last else (last[chain][0] + 1, last[chain][1])
        if seq != expected_seq:
            what = "the chain starts" if chain not in last else "after seq " + str(last[chain][0])
            report.problems.append(
                f"line {number}: seq {seq} where {what} needs {expected_seq} (records missing or moved)"
            )
        elif prev != expected_prev:
            report.problems.append(f"line {number}: prev does not match the previous record (it was changed)")
        last[chain] = (seq, line_hash(line))
    return result
