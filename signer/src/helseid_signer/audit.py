"""Audit trail: one JSON record per request, signed or refused, in hash chains.

A record holds: ``time`` (UTC, ISO 8601 with milliseconds), ``chain``, ``seq`` and ``prev``
(below), ``caller``, ``profile``, ``purpose`` (``client_assertion``, ``dpop_proof``,
``client_profile``, ``key_set``), ``outcome`` (``signed``, ``answered``, ``refused``,
``failed``), ``status`` (the gRPC status name), ``latency_ms``, and for signatures ``kid``,
``alg``, ``jti``, ``key_version`` (the backend's exact key version), ``exp`` for assertions,
``htm``/``htu`` and ``nonce_present``/``ath_present`` for proofs; for refusals ``error``
(the message, which names the field); for backend failures also ``ref`` (the reference the
caller was given) and ``backend_error`` (the backend's own text, which callers never see).

**Refusals are counted, not each written** (:class:`RefusalCounter`): per caller,
``purpose``, ``status`` and ``error``, the first refusal in each ``[audit]
refusal_interval`` (10 s) is a record as above; the others in that interval become ONE
record with ``outcome`` ``repeated``, ``count`` (how many were not written one by one),
``first_time``/``last_time`` (of those) and ``interval_s``. Such records are in the hash
chain like every other. Every signature and every backend failure keeps its own record.

**Where records are written.** With ``fsync``, or to stdout (often a pipe to a collector
that can fall behind), on a writer thread of their own, off the event loop; records that
arrive while a write is under way are written together (one ``os.write``, one ``fsync``).
To a regular file without ``fsync`` at once (a write into the page cache does not wait for
the disk). A JWS is still returned only after its record is written.

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

**Chain anchors (insertion of whole chains).** A chain id carries no secret, so a forged,
self-consistent chain inserted into the file verifies on its own. Hence every chain is also
announced where the records are not: the service log (stderr, shipped separately) gets one
line with an ``audit_chain`` field when a chain's first record is written
(``{"event": "start", "chain", "sink"}``) and one when the chain ends - at close, reload or
after a failed write (``{"event": "end", "chain", "seq", "last"}``, ``last`` the hash of its
last line). :func:`verify_anchors` (``audit verify --service-log``) then reports a chain the
log never announced (inserted), an announced chain missing from the files (removed), and a
chain whose last record is not the one the log names (its tail removed or its last record
edited).

Failure policy (``[audit] on_failure``): ``fail_closed`` (default) - if the record cannot
be written and flushed (and, with ``fsync = true``, synced to disk), the request fails with
UNAVAILABLE and no JWS is returned, so nothing is ever signed unaudited; ``continue`` - log
an error and answer anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .jwt import b64url

log = logging.getLogger("helseid_signer.audit")


class AuditError(Exception):
    """The audit record could not be written."""


#: Seconds over which repeated refusals of one kind become one record (``[audit] refusal_interval``).
REFUSAL_INTERVAL = 10.0
#: Kinds of refusal counted separately per interval, in all and per caller; beyond them a
#: caller's refusals of one purpose and status share one count whatever their ``error``
#: (messages may quote a little of the request, so a caller could make many kinds).
MAX_REFUSAL_KINDS = 256
MAX_REFUSAL_KINDS_PER_CALLER = 16


def _resolve(waiters: list[asyncio.Future], error: Exception | None) -> None:
    for done in waiters:
        if done.done():  # the request was cancelled meanwhile
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


class RefusalCounter:
    """Bounded audit of refusals: per kind - (``caller``, ``profile``, ``purpose``, ``status``,
    ``error``) - and ``interval`` seconds, the first refusal is returned to be written as
    its own record; the rest are counted, and when the interval has ended one record with
    ``outcome`` ``repeated``, ``count``, ``first_time`` and ``last_time`` stands for them.
    Not thread-safe: the event loop alone uses it.

    So a caller that sends thousands of refused requests a second costs at most two records
    per kind and interval, at most :data:`MAX_REFUSAL_KINDS_PER_CALLER` kinds per caller and
    :data:`MAX_REFUSAL_KINDS` in all per interval."""

    def __init__(self, interval: float = REFUSAL_INTERVAL, clock=time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._counts: dict[tuple, dict[str, Any]] = {}
        self._kinds: dict[Any, int] = {}  # caller -> kinds counted in this interval

    def note(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The records to write for this refusal: the ended interval's counts, and the
        refusal itself when it is the first of its kind in this interval."""
        out = self.due()
        caller = record.get("caller")
        # Profiles are configured names (None before the name is checked): the kinds stay bounded.
        key = (caller, record.get("profile"), record.get("purpose"), record.get("status"), record.get("error"))
        entry = self._counts.get(key)
        if entry is None and (
            len(self._counts) >= MAX_REFUSAL_KINDS or self._kinds.get(caller, 0) >= MAX_REFUSAL_KINDS_PER_CALLER
        ):
            key = (caller, record.get("profile"), record.get("purpose"), record.get("status"), None)
            entry = self._counts.get(key)
        now = _utc_now()
        if entry is None:
            self._counts[key] = {"count": 0, "first_time": None, "last_time": None}
            self._kinds[caller] = self._kinds.get(caller, 0) + 1
            out.append(record)
        else:
            entry["count"] += 1
            entry["first_time"] = entry["first_time"] or now
            entry["last_time"] = now
        return out

    def due(self, force: bool = False) -> list[dict[str, Any]]:
        """The ``repeated`` records of an interval that has ended (``force``: now), each
        kind with a count; the counter then starts a new interval."""
        if not force and self._clock() - self._started < self.interval:
            return []
        self._started = self._clock()
        counts, self._counts = self._counts, {}
        self._kinds = {}
        return [
            {
                "caller": caller,
                "profile": profile,
                "purpose": purpose,
                "outcome": "repeated",
                "status": status,
                "error": error if error is not None else "(several messages)",
                "count": entry["count"],
                "first_time": entry["first_time"],
                "last_time": entry["last_time"],
                "interval_s": self.interval,
            }
            for (caller, profile, purpose, status, error), entry in counts.items()
            if entry["count"]
        ]


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        refusal_interval: seconds over which repeated refusals of one kind are counted
            into one record (:class:`RefusalCounter`).
    """

    def __init__(
        self,
        path: str | None = None,
        fail_closed: bool = True,
        fsync: bool = False,
        refusal_interval: float = REFUSAL_INTERVAL,
    ) -> None:
        self.fail_closed = fail_closed
        if path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            sys.stdout.flush()
            self._fd = sys.stdout.fileno()
        self._own = path is not None
        self.path = path
        self._fsync = fsync and path is not None
        # A write into a regular file's page cache does not wait for the disk: done on the
        # caller's thread (the event loop). fsync, and pipes (stdout to a log collector that
        # may fall behind), can wait: those go to the writer thread.
        self._direct = not self._fsync and stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._lock = threading.Lock()
        self._partial = False
        self._pending: list[tuple[dict[str, Any], asyncio.Future | None]] = []
        self._pending_lock = threading.Lock()
        self._flushing = False
        self._executor: ThreadPoolExecutor | None = None
        self.refusals = RefusalCounter(refusal_interval)
        self._new_chain()

    def _new_chain(self) -> None:
        self._announce_end()
        self.chain = secrets.token_hex(8)
        self._seq = 0
        self._prev: str | None = None

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (``time``, ``chain``, ``seq`` and ``prev`` are added first) and
        hand it to the OS (and sync it to disk with ``fsync``) on this thread. Raises
        AuditError (fail-closed)."""
        self._write_many([record])

    def _write_many(self, records: list[dict[str, Any]]) -> None:
        """Write ``records`` in order, in this log's chain, with ONE ``os.write`` (and one
        ``fsync``): a batch either reaches the file whole or starts a new chain."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            seq, prev = self._seq, self._prev
            lines = []
            for record in records:
                entry = {"time": now, "chain": self.chain, "seq": seq + 1, "prev": prev, **record}
                line = json.dumps(entry, separators=(",", ":"), default=str)
                lines.append(line)
                seq, prev = seq + 1, line_hash(line)
            # After a partial write the file ends inside a line: start on a new one.
            data = ("\n" if self._partial else "").encode() + "".join(line + "\n" for line in lines).encode("ascii")
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
            started = self._seq == 0
            self._seq, self._prev = seq, prev
            if started:
                anchor = {"event": "start", "chain": self.chain, "sink": self.path or "stdout"}
                log.info("audit chain %s started", self.chain, extra={"audit_chain": anchor})

    def _announce_end(self) -> None:
        """Log the end of the current chain (its last seq and line hash), if it has records."""
        if getattr(self, "_seq", 0) > 0:
            anchor = {"event": "end", "chain": self.chain, "seq": self._seq, "last": self._prev}
            log.info("audit chain %s ended at seq %d", self.chain, self._seq, extra={"audit_chain": anchor})

    async def write_async(self, record: dict[str, Any]) -> None:
        """Write one record and return once it is written (and synced with ``fsync``). With
        ``fsync``, or a sink that is not a regular file (stdout, often a pipe), on this log's
        writer thread, off the event loop: records that arrive while a write is under way
        are written together in the next ``os.write`` (group commit: one ``fsync`` for the
        batch). A regular file without ``fsync`` is written at once (the page cache does not
        wait for the disk). Raises AuditError (fail-closed) like :meth:`write`."""
        if self._direct:
            self._write_many([record])
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._pending_lock:
            self._pending.append((record, done))
            start = not self._flushing
            self._flushing = True
        if start:
            self._writer().submit(self._flush_pending)
        await done

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record for the writer thread and return at once (a failure is logged)."""
        with self._pending_lock:
            self._pending.append((record, None))
            start = not self._flushing
            self._flushing = True
        if start:
            self._writer().submit(self._flush_pending)

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        return self._executor

    def _flush_pending(self) -> None:
        """The writer thread: write what is pending, batch after batch, until nothing is."""
        while True:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._flushing = False
                    return
            error: Exception | None = None
            try:
                self._write_many([record for record, _ in batch])
            except Exception as exc:  # AuditError (fail-closed), or a closed descriptor
                error = exc
            waiters = [done for _, done in batch if done is not None]
            if error is not None and len(waiters) < len(batch):
                log.error("audit record of a refusal not written: %s", error)
            if waiters:
                target = waiters[0].get_loop()
                try:
                    target.call_soon_threadsafe(_resolve, waiters, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def flush_refusals(self, force: bool = False) -> None:
        """Write the counts of intervals that have ended (all of them with ``force``)."""
        for entry in self.refusals.due(force):
            self.submit(entry)

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
        """Write the pending refusal counts and queued records, log the chain's end anchor and
        close the file (not stdout)."""
        self.flush_refusals(force=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            self._announce_end()
            self._seq = 0
            if self._own and self._fd >= 0:
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


def verify_anchors(log_lines: Iterable[str], result: Verification) -> int:
    """Check the chains :func:`verify_lines` found against the chain anchors in the service
    log ``log_lines`` (JSON lines; those without an ``audit_chain`` field are skipped).

    Adds a problem for: a chain in the files whose start the log never announced (a chain
    the signer did not write: inserted); a chain the log announced that is not in the files
    (removed whole - pass the log of the same period as the files); a chain whose last
    record in the files is not the seq and line hash its end anchor names (records removed
    from its end, or its last record edited). Returns the number of anchors read. Never
    raises on bad input."""
    started: dict[str, str | None] = {}
    ended: dict[str, tuple[Any, Any]] = {}
    anchors = 0
    for raw in log_lines:
        line = raw.strip()
        if '"audit_chain"' not in line or len(line) > MAX_LINE:
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        anchor = entry.get("audit_chain") if isinstance(entry, dict) else None
        if not isinstance(anchor, dict) or not isinstance(anchor.get("chain"), str):
            continue
        anchors += 1
        if anchor.get("event") == "start":
            started[anchor["chain"]] = _printable(entry.get("time"))
        elif anchor.get("event") == "end":
            ended[anchor["chain"]] = (anchor.get("seq"), anchor.get("last"))
    for chain, report in result.chains.items():
        if chain not in started:
            report.problems.append("not announced in the service log: a chain the signer did not write (inserted)")
        if chain in ended and result.last.get(chain) != ended[chain]:
            seq = result.last[chain][0] if chain in result.last else 0
            report.problems.append(
                f"its last record (seq {seq}) is not the one the service log names (it was changed)"
                if seq == ended[chain][0]
                else f"ends at seq {seq}, the service log says it ended at seq {ended[chain][0]} (records removed)"
            )
    for chain, when in started.items():
        if chain not in result.chains:
            result.problems.append(
                f"chain {_printable(chain)}: announced in the service log ({when}) but not in the files (removed)"
            )
    return anchors


def _printable(value: Any) -> str | None:
    """A record's ``time`` for the report: printable ASCII only (a tampered file must not
    write control characters to the operator's terminal)."""
    if value is None:
        return None
    text = str(value)[:40]
    return "".join(c if " " <= c <= "~" else "?" for c in text)
