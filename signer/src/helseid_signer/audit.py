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
import re
import secrets
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .jwt import b64url

log = logging.getLogger("helseid_signer.audit")


class AuditError(Exception):
    """The audit record could not be written."""


def line_hash(line: str) -> str:
    """base64url(SHA-256(``line`` as UTF-8)): the ``prev`` of the record after ``line``."""
    return b64url(hashlib.sha256(line.encode("utf-8")).digest())


class AuditLog:
    """Writes audit records as JSON lines to stdout or to the file ``path``, each in this
    log's hash chain (see the module docstring).

    Each record is one ``os.write`` of its whole line to a descriptor opened with
    ``O_APPEND`` (no Python buffer: a record that failed is never written later by
    accident, and worker processes appending to one file do not interleave lines). After a
    failed write the log starts a new chain, so the verifier reports the failure point, not
    tampering after it. Lines are ASCII (``json.dumps`` escapes the rest), so any text a key
    store returns can be written.

    Args:
        path: file to append to (created 0600 if missing), or None for stdout.
        fail_closed: raise :class:`AuditError` when a write fails (see module docstring).
        fsync: also ``fsync`` the file after each record (a record survives a crash of the
            host, at the cost of a disk sync per request); not for stdout.
    """

    def __init__(self, path: str | None = None, fail_closed: bool = True, fsync: bool = False) -> None:
        self.fail_closed = fail_closed
        if path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            sys.stdout.flush()
            self._fd = sys.stdout.fileno()
        self._own = path is not None
        self.path = path
        self._fsync = fsync and path is not None
        self._lock = threading.Lock()
        self._partial = False
        self._new_chain()

    def _new_chain(self) -> None:
        self.chain = secrets.token_hex(8)
        self._seq = 0
        self._prev: str | None = None

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (``time``, ``chain``, ``seq`` and ``prev`` are added first) and
        hand it to the OS (and sync it to disk with ``fsync``). Raises AuditError (fail-closed)."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            entry = {"time": now, "chain": self.chain, "seq": self._seq + 1, "prev": self._prev, **record}
            line = json.dumps(entry, separators=(",", ":"), default=str)
            # After a partial write the file ends inside a line: start on a new one.
            data = ("\n" if self._partial else "").encode() + (line + "\n").encode("ascii")
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                # Part of the line may have reached the file: the next record starts on a new
                # line and in a new chain (the fragment is no record; the old chain ends before it).
                self._partial = self._partial or written > 0
                self._new_chain()
                metrics.AUDIT_WRITE_FAILURES.inc()
                if self.fail_closed:
                    raise AuditError(f"audit record not written: {exc}") from exc
                log.error("audit record not written: %s", exc)
                return
            self._partial = False
            self._seq += 1
            self._prev = line_hash(line)

    def moved(self) -> bool:
        """True when ``path`` no longer names the open file (log rotation moved or deleted it):
        the service then opens the path anew at the next reload (SIGHUP). False for stdout."""
        if not self._own or self._fd < 0 or self.path is None:
            return False
        try:
            at_path, open_file = os.stat(self.path), os.fstat(self._fd)
        except FileNotFoundError:
            return True
        return (at_path.st_dev, at_path.st_ino) != (open_file.st_dev, open_file.st_ino)

    def close(self) -> None:
        """Close the file (not stdout)."""
        if self._own:
            with self._lock:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1


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
    last: dict[str, tuple[int, str]] = field(default_factory=dict)  # chain -> (seq, hash) of its last line

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains.values())

    @property
    def ok(self) -> bool:
        """Every chain intact, no unreadable record, and at least one record found."""
        return self.records > 0 and not self.problems and all(not c.problems for c in self.chains.values())


#: Longest line the verifier parses (an audit record is a few hundred bytes).
MAX_LINE = 1 << 20


def verify_lines(lines: Iterable[str], result: Verification | None = None, source: str = "line") -> Verification:
    """Check the hash chains of audit records (see the module docstring).

    ``lines``: the file's lines (with or without newlines; numbered from 1 in messages as
    ``<source> <n>``). Pass the ``result`` of the previous file to carry chains across
    rotated files given in order (``audit.jsonl.1`` then ``audit.jsonl``). A chain must
    start at ``seq`` 1 with ``prev`` null, go up by one, and each ``prev`` must be the hash
    of the chain's previous line. Lines without ``chain`` are not audit records and are
    counted, not checked (an audit stream on stdout also carries log lines). Never raises
    on bad input."""
    result = result if result is not None else Verification()
    last = result.last
    for number, raw in enumerate(lines, start=1):
        where = f"{source} {number}"
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            result.problems.append(f"{where}: longer than {MAX_LINE} characters; not read")
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            if '"chain"' in line:
                result.problems.append(f"{where}: an audit record that is not valid JSON")
            else:
                result.other_lines += 1
            continue
        if not isinstance(entry, dict) or "chain" not in entry:
            result.other_lines += 1
            continue
        chain, seq, prev = entry.get("chain"), entry.get("seq"), entry.get("prev")
        if (
            not isinstance(chain, str)
            or not _CHAIN_ID.fullmatch(chain)
            or type(seq) is not int
            or not (prev is None or isinstance(prev, str))
        ):
            result.problems.append(f"{where}: chain, seq or prev missing or malformed")
            continue
        report = result.chains.setdefault(chain, ChainReport(chain))
        report.records += 1
        report.first_time = report.first_time or _printable(entry.get("time"))
        report.last_time = _printable(entry.get("time"))
        expected_seq, expected_prev = (1, None) if chain not in last else (last[chain][0] + 1, last[chain][1])
        if seq != expected_seq:
            what = "the chain starts" if chain not in last else "after seq " + str(last[chain][0])
            report.problems.append(f"{where}: seq {seq} where {what} needs {expected_seq} (records missing or moved)")
        elif prev != expected_prev:
            report.problems.append(f"{where}: prev does not match the previous record (it was changed)")
        last[chain] = (seq, line_hash(line))
    return result


_CHAIN_ID = re.compile(r"[0-9a-f]{16}")


def _printable(value: Any) -> str | None:
    """A record's ``time`` for the report: printable ASCII only (a tampered file must not
    write control characters to the operator's terminal)."""
    if value is None:
        return None
    text = str(value)[:40]
    return "".join(c if " " <= c <= "~" else "?" for c in text)
