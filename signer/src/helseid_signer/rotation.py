"""Client-assertion key rotation by configuration, and HelseID registration records.

HelseID accepts a client assertion only if its key is registered for the client (in
self-service, by hand or through the self-service API), and registered keys expire.
The service therefore:

* publishes a *next* key (GetKeySet, status NEXT) before it signs, and switches to it
  **as soon as a registration record for its kid exists** (every replica re-reads the
  records once per health interval). HelseID may stop accepting the old key the moment
  the new one is uploaded (NHN's own tools replace the key at upload), so waiting would
  mean ``invalid_client`` until the switch. Only when the operator states that HelseID
  keeps the old key (``helseid_keeps_old_key = true``) does the switch wait for
  ``next_active_from``. Without a record the current key keeps signing; a next key still
  unregistered at ``next_active_from`` is logged and reported in health;
* keeps publishing the key it switched away from as PREVIOUS (verify-only), and a
  configured ``previous_key`` until ``previous_published_until``;
* warns (log, metric, health detail) when a registered key is within
  :data:`EXPIRY_WARNING_DAYS` days of its HelseID expiry.

* lets a caller whose token request HelseID refused as ``invalid_client`` have a fresh
  assertion signed by another of the profile's keys (:meth:`AssertionKeys.alternative`):
  only a published key that is registered and unexpired may sign that way.

A registration record is a small JSON document::

    {"kid": "...", "client_id": "...", "issuer": "...", "registered_at": "2026-11-29T10:00:00Z",
     "expires_at": "2027-11-29T10:00:00Z" | null, "source": "selfservice-api" | "manual"}

written by ``helseid-signer keys register`` beside the key in its key store when the
backend can hold it (:class:`~.backends.base.RegistrationStore`: a PKCS#11 data object on
the token), else as ``<records_dir>/<kid>.json``; the service reads both at start-up and on
every health check, and never writes either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backends.base import BackendError, RegistrationStore
from .keys import KeySlot

log = logging.getLogger("helseid_signer.rotation")
EXPIRY_WARNING_DAYS = 14
_KID = re.compile(r"^[A-Za-z0-9_-]{43}$")
#: ``source`` of the record ``keys register`` writes just BEFORE it uploads the key: the key
#: is not registered, but may sign a retried assertion after HelseID refused the current
#: one (HelseID may replace the key the moment it accepts the upload, before the final
#: record is written), for at most PENDING_SECONDS after ``registered_at``.
SOURCE_PENDING = "selfservice-api-pending"
PENDING_SECONDS = 300


@dataclass(frozen=True)
class RegistrationRecord:
    """That a key (by kid) is registered with HelseID for a client, and until when."""

    kid: str
    client_id: str
    issuer: str
    registered_at: str
    expires_at: str | None
    source: str

    @property
    def expires_epoch(self) -> float | None:
        """``expires_at`` in seconds since the epoch, or None when HelseID gave none."""
        return None if self.expires_at is None else _parse_time(self.expires_at)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def utc_text(epoch: float) -> str:
    """``2026-11-29T10:00:00Z`` for seconds since the epoch."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_json(record: RegistrationRecord) -> str:
    """The record as compact JSON (what a key store holds beside the key)."""
    return json.dumps(record.__dict__, separators=(",", ":"), sort_keys=True)


def parse_record(text: str | bytes, kid: str) -> RegistrationRecord:
    """A record from its JSON; ValueError/TypeError when malformed or when it names another
    kid than ``kid`` (the one it is stored for)."""
    record = RegistrationRecord(**json.loads(text))
    if record.kid != kid:
        raise ValueError(f"the record names kid {record.kid!r}, it is stored for {kid!r}")
    if not _KID.match(record.kid):
        raise ValueError("kid is not an RFC 7638 SHA-256 thumbprint")
    _parse_time(record.registered_at), record.expires_epoch  # noqa: B018 - both must be readable times
    return record


def _newer(a: RegistrationRecord | None, b: RegistrationRecord) -> RegistrationRecord:
    return b if a is None or a.registered_at <= b.registered_at else a


def write_record(records_dir: str | Path, record: RegistrationRecord) -> Path:
    """Write ``record`` atomically to ``<records_dir>/<kid>.json`` (0644; no secrets in it)."""
    folder = Path(records_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.kid}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".record-")
    with os.fdopen(fd, "w") as f:
        json.dump(record.__dict__, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


class RegistrationBook:
    """The registration records every replica reads: those stored beside the keys in their
    key stores (``slots`` whose backend is a :class:`~.backends.base.RegistrationStore`) and
    those in ``records_dir`` (None: no folder). Re-read by :meth:`refresh` (the health
    loop) and by :meth:`refresh_since` (a caller whose token request HelseID refused). When both
    places hold a record for a kid, the later ``registered_at`` wins. A record is only
    trusted when it names the kid it is stored for (file name, key)."""

    def __init__(self, records_dir: str | None, slots: Iterable[KeySlot] = ()) -> None:
        self.records_dir = records_dir
        self.slots = list(slots)
        self.records: dict[str, RegistrationRecord] = {}
        #: where each record was read: ``<records_dir>/<kid>.json`` or the key store's words
        self.places: dict[str, str] = {}
        self._refresh_started = 0.0  # time.monotonic() when the last refresh began
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the folder and the key stores; unreadable or malformed records are logged
        and ignored (a key store that cannot be read now keeps the records last read from it)."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        started = time.monotonic()
        records: dict[str, RegistrationRecord] = {}
        places: dict[str, str] = {}
        folder = Path(self.records_dir) if self.records_dir is not None else None
        for path in sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []:
            try:
                record = parse_record(path.read_text(), path.stem)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring registration record %s: %s", path.name, exc)
                continue
            records[record.kid], places[record.kid] = record, str(path)
        seen: set[str] = set()
        for slot in self.slots:
            key = slot.key
            if key is None or key.kid in seen or not isinstance(slot.backend, RegistrationStore):
                continue
            seen.add(key.kid)
            try:
                text = slot.backend.read_registration(key.resolved, key.kid)
                found = None if text is None else parse_record(text, key.kid)
            except BackendError as exc:  # keep what was read last time; say so once per message
                if (slot.name, str(exc)) not in self._warned:
                    self._warned.add((slot.name, str(exc)))
                    log.warning("cannot read the registration record of key %s: %s", slot.name, exc)
                found = self.records.get(key.kid) if self.places.get(key.kid, "").startswith("key store") else None
            except (ValueError, TypeError) as exc:
                if (slot.name, str(exc)) not in self._warned:
                    self._warned.add((slot.name, str(exc)))
                    log.warning("ignoring the registration record stored with key %s: %s", slot.name, exc)
                found = None
            if found is not None and _newer(records.get(key.kid), found) is found:
                records[key.kid] = found
                where = slot.backend.registration_place(key.resolved, key.kid)
                places[key.kid] = f"key store of {slot.name} ({where})"
        self.records, self.places = records, places
        self._refresh_started = started

    def refresh_since(self, moment: float) -> None:
        """Make sure a refresh began at or after ``moment`` (a ``time.monotonic()`` value): a
        request refused for want of a record reads the key stores once, and concurrent ones
        share one read (they wait for it)."""
        with self._lock:
            if self._refresh_started < moment:
                self._refresh_locked()

    def is_pending(self, kid: str, now: float, client_id: str | None = None, issuer: str | None = None) -> bool:
        """A record written just before the upload of ``kid`` exists - for this
        ``client_id`` and ``issuer`` when given - and is at most :data:`PENDING_SECONDS` old
        (see :data:`SOURCE_PENDING`)."""
        record = self.records.get(kid)
        return (
            record is not None
            and record.source == SOURCE_PENDING
            and (client_id is None or record.client_id == client_id)
            and (issuer is None or record.issuer == issuer)
            and 0 <= now - _parse_time(record.registered_at) <= PENDING_SECONDS
        )

    def is_registered(self, kid: str, now: float, client_id: str | None = None, issuer: str | None = None) -> bool:
        """A record exists for ``kid`` - for this ``client_id`` and ``issuer`` when given - and
        has not expired."""
        record = self.records.get(kid)
        if record is None or record.source == SOURCE_PENDING:
            return False
        if (client_id is not None and record.client_id != client_id) or (
            issuer is not None and record.issuer != issuer
        ):
            return False
        expires = record.expires_epoch
        return expires is None or now < expires


@dataclass
class AssertionKeys:
    """A profile's client-assertion keys: current, and optionally next and previous.

    Attributes:
        current: the configured ``assertion_key``.
        next: ``rotation.next_key``: signs once registered (see the module docstring).
        next_active_from: with ``keeps_old_key``, the epoch second before which the next
            key never signs; without it, the time by which it should be registered (after
            it, an unregistered next key is reported as blocking the rotation). None: not set.
        keeps_old_key: ``rotation.helseid_keeps_old_key``: the operator states that HelseID
            keeps accepting the old key after the upload, so the switch may wait.
        previous: ``rotation.previous_key`` and the epoch second it stops being published.
        book: the registration records.
    """

    current: KeySlot
    next: KeySlot | None = None
    next_active_from: float | None = None
    previous: KeySlot | None = None
    previous_until: float | None = None
    book: RegistrationBook | None = None
    client_id: str | None = None
    issuer: str | None = None
    keeps_old_key: bool = False
    _refused_kid: str | None = field(default=None, repr=False)
    _announced_kid: str | None = field(default=None, repr=False)

    def _next_registered(self, now: float) -> bool:
        key = self.next.key if self.next is not None else None
        return key is not None and self._registered(key.kid, now)

    def _registered(self, kid: str, now: float) -> bool:
        return self.book is not None and self.book.is_registered(kid, now, self.client_id, self.issuer)

    def next_due(self, now: float) -> bool:
        """True once ``next_active_from`` has passed (False when it is not set)."""
        return self.next is not None and self.next_active_from is not None and now >= self.next_active_from

    def next_is_active(self, now: float) -> bool:
        """True once the next key is resolved and registered - and, when HelseID keeps the old
        key (``keeps_old_key``), ``next_active_from`` has come (see the module docstring)."""
        if self.next is None or (self.keeps_old_key and not self.next_due(now)):
            return False
        key = self.next.key
        if not self._next_registered(now):
            if key is not None and self.next_due(now) and self._refused_kid != key.kid:
                self._refused_kid = key.kid
                log.error(
                    "rotation: next key %s (kid %s) is due since %s but is not registered with HelseID; "
                    "the current key keeps signing",
                    self.next.name, key.kid, utc_text(self.next_active_from),  # type: ignore[arg-type]
                )  # fmt: skip
            return False
        if self._announced_kid != key.kid:  # type: ignore[union-attr]
            self._announced_kid = key.kid  # type: ignore[union-attr]
            log.warning(
                "rotation: next key %s (kid %s) signs client assertions from now on (%s)",
                self.next.name, key.kid,  # type: ignore[union-attr]
                f"due {utc_text(self.next_active_from)}" if self.keeps_old_key and self.next_active_from
                else "registered with HelseID",
            )  # fmt: skip
        return True

    def alternative(self, avoid_kid: str, now: float) -> KeySlot | None:
        """The key that signs a retried client assertion after HelseID refused one signed by
        ``avoid_kid`` (``invalid_client``), or None when no other key may.

        Eligible: a key published at ``now`` (so a configured previous key only until
        ``previous_published_until``), resolved, whose kid is not ``avoid_kid``, and
        registered and unexpired - a next key that has not yet switched in needs a
        registration record (or a pending one: its upload is in flight,
        :data:`SOURCE_PENDING`); the configured current key (and the old current key a switch
        made PREVIOUS) is taken as registered, as configuration says it is, unless a record
        for it shows it expired or registered for another client. First choice is the key
        that signs now, then the others in key-set order (CURRENT, NEXT, PREVIOUS).
        """
        candidates = [self.signing(now)] + [slot for slot, _, _, _ in self.published(now)]
        for slot in candidates:
            key = slot.key
            if key is None or key.kid == avoid_kid:
                continue
            record = self.book.records.get(key.kid) if self.book is not None else None
            if slot is self.next and not self.next_is_active(now):
                pending = self.book is not None and self.book.is_pending(key.kid, now, self.client_id, self.issuer)
                if pending or self._registered(key.kid, now):
                    return slot
            elif record is None or self._registered(key.kid, now):
                return slot
        return None

    def signing(self, now: float) -> KeySlot:
        """The slot that signs client assertions at ``now``."""
        return self.next if self.next_is_active(now) else self.current  # type: ignore[return-value]

    def published(self, now: float) -> list[tuple[KeySlot, str, float, float]]:
        """(slot, status, active_from, published_until) for GetKeySet: CURRENT first."""
        entries: list[tuple[KeySlot, str, float, float]] = []
        if self.next is not None:
            if self.next_is_active(now):
                entries += [(self.next, "CURRENT", 0.0, 0.0), (self.current, "PREVIOUS", 0.0, 0.0)]
            else:
                # active_from: the switch instant when HelseID keeps the old key; else 0 (it
                # switches in once registered)
                since = self.next_active_from if (self.keeps_old_key and self.next_active_from) else 0.0
                entries += [(self.current, "CURRENT", 0.0, 0.0), (self.next, "NEXT", since, 0.0)]
        else:
            entries.append((self.current, "CURRENT", 0.0, 0.0))
        if self.previous is not None and self.previous_until is not None and now < self.previous_until:
            entries.append((self.previous, "PREVIOUS", 0.0, self.previous_until))
        return entries

    def rotation_blocked(self, now: float) -> bool:
        """True while the next key is due (``next_active_from`` passed) but cannot become
        current (unresolved or unregistered)."""
        return self.next_due(now) and not self.next_is_active(now)

    def expiry_warnings(self, now: float) -> list[str]:
        """Messages for published keys within EXPIRY_WARNING_DAYS of their HelseID expiry."""
        warnings = []
        for slot, status, _, _ in self.published(now):
            key = slot.key
            record = self.book.records.get(key.kid) if (key and self.book) else None
            expires = record.expires_epoch if record else None
            if expires is not None and expires - now < EXPIRY_WARNING_DAYS * 86400:
                days = (expires - now) / 86400
                warnings.append(
                    f"{status.lower()} key {slot.name} (kid {key.kid}) "
                    + (f"expires in HelseID in {int(days)} days" if days > 0 else "has EXPIRED in HelseID")
                    + f" ({record.expires_at})"
                )
        return warnings


def days_to_expiry(book: RegistrationBook | None, kid: str, now: float) -> float | None:
    """Days until ``kid``'s registration expires (negative when expired); None if unknown."""
    record = book.records.get(kid) if book else None
    expires = record.expires_epoch if record else None
    return None if expires is None else (expires - now) / 86400


def record_from_response(
    kid: str, client_id: str, issuer: str, body: dict[str, Any], source: str
) -> RegistrationRecord:
    """A record from the self-service API's answer (its expiry field, if any)."""
    expires = body.get("expiration") or body.get("expiresAt") or body.get("expires_at")
    return RegistrationRecord(
        kid=kid,
        client_id=client_id,
        issuer=issuer,
        registered_at=utc_text(datetime.now(UTC).timestamp()),
        expires_at=None if expires is None else utc_text(_parse_time(str(expires))),
        source=source,
    )
