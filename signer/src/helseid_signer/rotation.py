"""Client-assertion key rotation by configuration, and HelseID registration records.

HelseID accepts a client assertion only if its key is registered for the client (in
self-service, by hand or through the self-service API), and registered keys expire.
The service therefore:

* publishes a *next* key (GetKeySet, status NEXT) before it signs, and switches to it at
  ``next_active_from`` - a UTC instant in configuration, so every replica switches at the
  same second - **only if a registration record for its kid exists**; otherwise the
  current key keeps signing and the refusal is logged and reported in health;
* keeps publishing the key it switched away from as PREVIOUS (verify-only), and a
  configured ``previous_key`` until ``previous_published_until``;
* warns (log, metric, health detail) when a registered key is within
  :data:`EXPIRY_WARNING_DAYS` days of its HelseID expiry.

A registration record is a small JSON file ``<records_dir>/<kid>.json``::

    {"kid": "...", "client_id": "...", "issuer": "...", "registered_at": "2026-11-29T10:00:00Z",
     "expires_at": "2027-11-29T10:00:00Z" | null, "source": "selfservice-api" | "manual"}

written by ``helseid-signer keys register`` and read by the service at start-up and on
every health check.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .keys import KeySlot

log = logging.getLogger("helseid_signer.rotation")
EXPIRY_WARNING_DAYS = 14


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
    """The registration records in ``records_dir`` (None: no records kept), re-read by
    :meth:`refresh`. A record is only trusted when its file name matches its kid."""

    def __init__(self, records_dir: str | None) -> None:
        self.records_dir = records_dir
        self.records: dict[str, RegistrationRecord] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the folder; unreadable or malformed files are logged and ignored."""
        if self.records_dir is None:
            return
        records = {}
        for path in sorted(Path(self.records_dir).glob("*.json")) if Path(self.records_dir).is_dir() else []:
            try:
                record = RegistrationRecord(**json.loads(path.read_text()))
                if path.stem != record.kid:
                    raise ValueError("file name and kid differ")
                records[record.kid] = record
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring registration record %s: %s", path.name, exc)
        self.records = records

    def is_registered(self, kid: str, now: float, client_id: str | None = None, issuer: str | None = None) -> bool:
        """A record exists for ``kid`` - for this ``client_id`` and ``issuer`` when given - and
        has not expired."""
        record = self.records.get(kid)
        if record is None:
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
        next: ``rotation.next_key`` and the epoch second it may start signing.
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
    _refused_kid: str | None = field(default=None, repr=False)
    _announced_kid: str | None = field(default=None, repr=False)

    def next_is_active(self, now: float) -> bool:
        """True once the next key is due, resolved and registered (see module docstring)."""
        if self.next is None or self.next_active_from is None or now < self.next_active_from:
            return False
        key = self.next.key
        if key is None or self.book is None or not self.book.is_registered(key.kid, now, self.client_id, self.issuer):
            if key is not None and self._refused_kid != key.kid:
                self._refused_kid = key.kid
                log.error(
                    "rotation: next key %s (kid %s) is due since %s but is not registered with HelseID; "
                    "the current key keeps signing",
                    self.next.name, key.kid, utc_text(self.next_active_from),
                )  # fmt: skip
            return False
        if self._announced_kid != key.kid:
            self._announced_kid = key.kid
            log.warning(
                "rotation: next key %s (kid %s) signs client assertions from now on (due %s)",
                self.next.name, key.kid, utc_text(self.next_active_from),
            )  # fmt: skip
        return True

    def signing(self, now: float) -> KeySlot:
        """The slot that signs client assertions at ``now``."""
        return self.next if self.next_is_active(now) else self.current  # type: ignore[return-value]

    def published(self, now: float) -> list[tuple[KeySlot, str, float, float]]:
        """(slot, status, active_from, published_until) for GetKeySet: CURRENT first."""
        entries: list[tuple[KeySlot, str, float, float]] = []
        if self.next is not None and self.next_active_from is not None:
            if self.next_is_active(now):
                entries += [(self.next, "CURRENT", 0.0, 0.0), (self.current, "PREVIOUS", 0.0, 0.0)]
            else:
                entries += [(self.current, "CURRENT", 0.0, 0.0), (self.next, "NEXT", self.next_active_from, 0.0)]
        else:
            entries.append((self.current, "CURRENT", 0.0, 0.0))
        if self.previous is not None and self.previous_until is not None and now < self.previous_until:
            entries.append((self.previous, "PREVIOUS", 0.0, self.previous_until))
        return entries

    def rotation_blocked(self, now: float) -> bool:
        """True while the next key is due but cannot become current (unresolved or unregistered)."""
        return (
            self.next is not None
            and self.next_active_from is not None
            and now >= self.next_active_from
            and not self.next_is_active(now)
        )

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
