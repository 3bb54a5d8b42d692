"""Key lifecycle on the command line: which keys HelseID should have, which are registered,
and registration of the next client-assertion key through HelseID's self-service API.

* :func:`list_keys` - every configured key with its kid, backend version, the profiles
  that use it and as what, and its registration record (``keys list``);
* :func:`profile_jwks` - the JWK Set a profile publishes now, exactly as GetKeySet does
  (``jwks``): the same :class:`~.rotation.AssertionKeys` decides;
* :func:`register_next_key` - ``keys register``: the profile's NEXT key's public JWK is
  POSTed to ``{selfservice.url}/v1/client-secret`` (``Content-Type: application/json``)
  with ``Authorization: DPoP <token>`` and a DPoP proof carrying ``ath``. The token is
  fetched by this process with the profile's CURRENT assertion key and its DPoP key
  (client credentials, scope ``selfservice.scope``), through the client library's own
  :class:`~helseid_signer_client.TokenClient` and :class:`~helseid_signer_client.DPoPAuth`
  driving a :class:`~.local_signer.LocalSigner`. The answer's ``expiration`` (the field
  NHN's .NET and Java libraries read) becomes a registration record (:mod:`.rotation`),
  kept beside the key in its key store when the backend can (PKCS#11: a data object on
  the token), else in ``records_dir`` (:func:`record_writer`); the output says where, and
  when the key takes over (:func:`takes_over`);
* :func:`register_manual` - ``keys register --manual``: a key uploaded by hand in the
  self-service portal, recorded with the expiry the portal shows.

Nothing here prints or logs a PIN, a token or private key material: only public JWKs,
kids, backend versions and HelseID's error fields.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from helseid_signer_client import DiscoveryError, DPoPAuth, RedirectRefused, SignerError, TokenClient, TokenError

from .backends.base import BackendError, RegistrationStore
from .config import Settings
from .htu import HtuPolicy
from .keys import KeySlot, SigningKey
from .local_signer import LocalSigner
from .rotation import (
    EXPIRY_WARNING_DAYS,
    PENDING_SECONDS,
    SOURCE_PENDING,
    RegistrationRecord,
    days_to_expiry,
    record_from_response,
    record_json,
    utc_text,
    write_record,
)
from .runtime import Runtime, build_runtime

log = logging.getLogger("helseid_signer.register")
CLIENT_SECRET_PATH = "/v1/client-secret"
SOURCE_API = "selfservice-api"
SOURCE_MANUAL = "manual"
HTTP_TIMEOUT = 30.0  # seconds per HTTP request to HelseID
#: HelseID's error fields (OAuth errors and RFC 9457 problem details), printed on a refusal.
ERROR_FIELDS = ("error", "error_description", "title", "detail", "type", "instance", "errors", "message")
_PIN_VALUE = re.compile(r"(pin-value=)[^;&?]*", re.I)


class RegistrationRefused(Exception):
    """``keys register`` refused before sending anything, or HelseID refused the key;
    the message says which and why (exit status 1)."""


class RegistrationUsageError(RegistrationRefused):
    """The command or the configuration cannot work as given: an unknown profile, no next
    key, no ``[selfservice]``, a bad ``--expires``, a key that is not the profile's (exit
    status 2, like other usage and configuration errors). Nothing was sent."""


def client_secret_endpoint(url: str) -> str:
    """``{url}/v1/client-secret`` for the configured self-service API base URL (a URL that
    already ends with that path is taken as it is)."""
    base = url.rstrip("/")
    return base if base.endswith(CLIENT_SECRET_PATH) else base + CLIENT_SECRET_PATH


def shown_uri(uri: str) -> str:
    """A key reference fit to print: a PKCS#11 ``pin-value`` (refused anyway) is masked."""
    return _PIN_VALUE.sub(r"\1***", uri)


@contextlib.contextmanager
def opened_runtime(settings: Settings, profiles: Iterable[str] | None = None) -> Iterator[Runtime]:
    """The service's own :func:`~.runtime.build_runtime` for ``profiles`` (all when None):
    only their keys are resolved, so a backend no chosen profile uses is never contacted.
    Backends are closed on exit."""
    if profiles is not None:
        chosen = {name: settings.profiles[name] for name in profiles}
        used = {k for p in chosen.values()
                for k in (p.assertion_key, p.dpop_key, p.rotation.next_key, p.rotation.previous_key) if k}  # fmt: skip
        keys = {name: key for name, key in settings.keys.items() if name in used}
        settings = settings.model_copy(update={"keys": keys, "profiles": chosen})
    runtime = build_runtime(settings)
    try:
        yield runtime
    finally:
        for backend in runtime.backends.values():
            backend.close()


def _profile_settings(settings: Settings, profile: str):
    if profile not in settings.profiles:
        raise RegistrationUsageError(f"no [profiles.{profile}] in the configuration")
    return settings.profiles[profile]


# --- keys list and jwks -------------------------------------------------------------------


def profile_jwks(settings: Settings, profile: str, now: float | None = None) -> dict[str, list[dict[str, str]]]:
    """The JWK Set ``profile`` publishes at ``now`` (CURRENT, NEXT, PREVIOUS assertion keys),
    member for member what GetKeySet's ``jwks_json`` holds. BackendUnavailableError when a
    published key is not available."""
    _profile_settings(settings, profile)
    now = time.time() if now is None else now
    with opened_runtime(settings, [profile]) as runtime:
        published = runtime.profiles[profile].assertion_keys.published(now)
        return {"keys": [slot.get().published_jwk for slot, *_ in published]}


def _uses(runtime: Runtime, slot: KeySlot, now: float) -> list[dict[str, Any]]:
    uses: list[dict[str, Any]] = []
    for name, profile in runtime.profiles.items():
        keys = profile.assertion_keys
        status = {id(s): (st, since, until) for s, st, since, until in keys.published(now)}
        roles = [("current", keys.current), ("next", keys.next), ("previous", keys.previous)]
        for role, candidate in roles:
            if candidate is not slot:
                continue
            published, since, until = status.get(id(slot), (None, 0.0, 0.0))
            use: dict[str, Any] = {"profile": name, "use": "assertion", "role": role, "published": published,
                                   "signing": keys.signing(now) is slot}  # fmt: skip
            if role == "next":
                use["active_from"] = utc_text(keys.next_active_from) if keys.next_active_from else None
            if role == "previous":
                use["published_until"] = utc_text(keys.previous_until) if keys.previous_until else None
            uses.append(use)
        if profile.dpop_slot is slot:
            uses.append({"profile": name, "use": "dpop", "signing": True})
    return uses


def list_keys(settings: Settings, now: float | None = None) -> list[dict[str, Any]]:
    """Every configured key: name, uri, alg, kid and backend version (or why it is not
    available), the profiles using it and as what, and its registration record."""
    now = time.time() if now is None else now
    entries = []
    with opened_runtime(settings) as runtime:
        for name, slot in runtime.slots.items():
            key = slot.key
            entry: dict[str, Any] = {
                "name": name,
                "uri": shown_uri(slot.settings.uri),
                "alg": slot.settings.alg,
                "kid": key.kid if key else None,
                "key_version": key.resolved.version if key else None,
                "error": None if key else slot.error,
                "uses": _uses(runtime, slot, now),
                "registration": None,
            }
            record = runtime.book.records.get(key.kid) if key else None
            if record is not None:
                days = days_to_expiry(runtime.book, record.kid, now)
                entry["registration"] = {
                    **record.__dict__,
                    "days_to_expiry": None if days is None else round(days, 1),
                    "registered": runtime.book.is_registered(record.kid, now),
                }
            entries.append(entry)
    return entries


def format_key_list(entries: list[dict[str, Any]]) -> str:
    """``keys list`` as text for operators (``--json`` prints the entries instead)."""
    lines = []
    for e in entries:
        head = f"{e['name']}  {e['alg']}  " + (f"kid {e['kid']}" if e["kid"] else f"NOT AVAILABLE: {e['error']}")
        lines += [head, f"    uri        {e['uri']}"]
        if e["key_version"]:
            lines.append(f"    version    {e['key_version']}")
        uses = []
        for u in e["uses"]:
            if u["use"] == "dpop":
                uses.append(f"{u['profile']}: dpop")
                continue
            text = f"{u['profile']}: assertion {u['role']} ({u['published'] or 'not published'}"
            text += ", signing" if u["signing"] else ""
            if u.get("active_from"):
                text += f", active from {u['active_from']}"
            if u.get("published_until"):
                text += f", published until {u['published_until']}"
            uses.append(text + ")")
        lines.append("    used by    " + ("; ".join(uses) if uses else "no profile"))
        r = e["registration"]
        if r is None and e["uses"] and all(u["use"] == "dpop" for u in e["uses"]):
            lines.append("    HelseID    not registered (a DPoP key never is)")
        elif r is None:
            lines.append("    HelseID    no registration record")
        else:
            days = r["days_to_expiry"]
            if days is None:
                expiry = "no expiry date"
            elif days < 0:
                expiry = f"EXPIRED {r['expires_at']}"
            else:
                expiry = f"expires {r['expires_at']} ({days} days"
                expiry += ", WARNING: renew now)" if days < EXPIRY_WARNING_DAYS else ")"
            lines.append(
                f"    HelseID    registered {r['registered_at']} for {r['client_id']} ({r['source']}), {expiry}"
            )
        lines.append("")
    return "\n".join(lines)


# --- keys register ------------------------------------------------------------------------


def _describe_error(response: httpx.Response) -> str:
    """HelseID's error fields from a refusal (problem details or OAuth error), else the text."""
    parts = [f"HTTP {response.status_code}"]
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and any(body.get(f) for f in ERROR_FIELDS):
        parts += [f"{f}: {json.dumps(body[f]) if not isinstance(body[f], str) else body[f]}"
                  for f in ERROR_FIELDS if body.get(f)]  # fmt: skip
    elif response.text.strip():
        parts.append("body: " + "".join(c if c.isprintable() else "?" for c in response.text[:500]))
    challenge = response.headers.get("WWW-Authenticate")
    if challenge:
        parts.append(f"WWW-Authenticate: {challenge}")
    return "; ".join(parts)


def expiration_text(value: Any) -> str:
    """The self-service answer's ``expiration`` as ``2027-11-29T10:00:00Z``.

    Takes ISO 8601 with an offset or ``Z`` and any number of fractional digits (.NET
    writes seven), and Java's ``ZonedDateTime`` form with a trailing ``[Zone/Id]``. A time
    without an offset is taken as UTC (logged). ValueError when there is no readable time.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"no expiration in the answer (got {value!r})")
    text = re.sub(r"\[[A-Za-z0-9_/+-]+\]$", "", value.strip())
    fraction = re.search(r"\.(\d+)", text)
    if fraction and len(fraction.group(1)) > 6:  # Python reads at most microseconds
        text = text.replace(fraction.group(0), "." + fraction.group(1)[:6], 1)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        log.warning("the self-service answer's expiration %r has no UTC offset; taken as UTC", value)
        moment = moment.replace(tzinfo=UTC)
    return utc_text(moment.timestamp())


def writable_records_dir(folder: str | Path) -> Path:
    """``folder``, created if needed, once it is known to take a record: checked BEFORE
    anything is sent, so a key is never registered with HelseID without its record (a
    read-only mount, say a ConfigMap, is refused here - give ``--records-dir``)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise RegistrationRefused(
            f"cannot write registration records to {path}: {exc.strerror or exc}; nothing was sent "
            "(give --records-dir a writable folder and copy the record to every replica's records_dir)"
        ) from None
    return path


def _refuse_if_registered(runtime: Runtime, key: SigningKey, now: float) -> None:
    book = runtime.book
    if book.is_registered(key.kid, now):
        record = book.records[key.kid]
        place = book.places.get(key.kid, "?")
        raise RegistrationRefused(
            f"key {key.name} (kid {key.kid}) is already registered with HelseID for {record.client_id} "
            f"(source {record.source}, expires {record.expires_at or 'never'}; record in {place}); "
            "delete that record first to register it again"
        )


def record_writer(
    settings: Settings, slot: KeySlot, records_dir: str | Path | None
) -> tuple[str, Callable[[RegistrationRecord], str], Callable[[], None]]:
    """Where ``keys register`` puts the record of ``slot``'s key, checked BEFORE anything is
    sent (so a key is never registered with HelseID without its record): ``records_dir``
    when given (``--records-dir``), else the configured ``[selfservice] records_dir`` (the
    operator chose a folder); else beside the key in its key store when the backend is a
    :class:`~.backends.base.RegistrationStore` (every replica reads it there). Returns
    (where, in words; a function that writes a record and returns where it went; one that
    removes it again). RegistrationUsageError when there is no place."""
    key = slot.get()
    folder = records_dir or (settings.selfservice.records_dir if settings.selfservice else None)
    if folder is None and isinstance(slot.backend, RegistrationStore):
        store = slot.backend
        return (
            store.registration_place(key.resolved, key.kid),
            lambda record: store.write_registration(key.resolved, key.kid, record_json(record)),
            lambda: store.delete_registration(key.resolved, key.kid),
        )
    if folder is None:
        raise RegistrationUsageError(
            f"key {key.name}'s backend cannot keep registration records ({slot.backend.scheme}) and no "
            "[selfservice] records_dir is configured: set one (every replica must read it) or give --records-dir"
        )
    target = writable_records_dir(folder)
    path = target / f"{key.kid}.json"
    return str(path), lambda record: str(write_record(target, record)), lambda: path.unlink(missing_ok=True)


def takes_over(settings: Settings, profile: str) -> str:
    """When a just-registered next key starts signing, in words for ``keys register``'s output."""
    rotation = settings.profiles[profile].rotation
    interval = settings.server.health_interval
    if rotation.helseid_keeps_old_key and rotation.next_active_from is not None:
        return (
            f"at {utc_text(rotation.next_active_from.timestamp())} (helseid_keeps_old_key = true; if that is "
            f"already past, within {interval:g} s), on every replica"
        )
    return f"within {interval:g} s (one health interval) on every replica that reads this record"


def _next_key(runtime: Runtime, profile: str) -> tuple[SigningKey, SigningKey]:
    keys = runtime.profiles[profile].assertion_keys
    if keys.next is None:
        raise RegistrationUsageError(
            f"profile {profile} has no next key: set [profiles.{profile}.rotation] next_key "
            "to the new key first (keys register uploads the NEXT key)"
        )
    return keys.next.get(), keys.current.get()


def _result(profile: str, key: SigningKey, record: RegistrationRecord, place: str, when: str) -> dict[str, Any]:
    return {
        "profile": profile,
        "key": key.name,
        "kid": key.kid,
        "jwk": key.published_jwk,
        "client_id": record.client_id,
        "expires_at": record.expires_at,
        "source": record.source,
        "record": place,
        "takes_over": when,
    }


def register_next_key(
    settings: Settings,
    profile: str,
    *,
    http: httpx.Client | None = None,
    records_dir: str | Path | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Upload ``profile``'s NEXT assertion key to HelseID's self-service API and record the
    expiry it answers (see the module docstring) in ``records_dir`` (default: the
    configured ``[selfservice] records_dir``). Returns what was done (public values only).
    Raises RegistrationRefused: no ``[selfservice] url``, no next key, the key already
    registered (an unexpired record), a records folder that cannot be written, or HelseID
    (token endpoint or self-service) refused - with HelseID's error fields."""
    p = _profile_settings(settings, profile)
    selfservice = settings.selfservice
    if selfservice is None or not selfservice.url:
        raise RegistrationUsageError("keys register needs [selfservice] url in the configuration")
    endpoint = client_secret_endpoint(selfservice.url)
    with opened_runtime(settings, [profile]) as runtime:
        next_key, current = _next_key(runtime, profile)
        if next_key.kid == current.kid:
            raise RegistrationUsageError(
                f"next key {next_key.name} is the same key (kid {next_key.kid}) as the current one"
            )
        _refuse_if_registered(runtime, next_key, clock())
        place, write, undo = record_writer(settings, runtime.profiles[profile].assertion_keys.next, records_dir)
        # A pending record first: HelseID may stop accepting the current key the moment it
        # accepts this upload, before the final record below is written; meanwhile a refused
        # client may have a retry signed by this key (rotation.SOURCE_PENDING). It also proves
        # the record can be written before anything is sent.
        try:
            write(RegistrationRecord(next_key.kid, p.client_id, p.issuer, utc_text(clock()), None, SOURCE_PENDING))
        except (BackendError, OSError) as exc:
            raise RegistrationRefused(
                f"cannot write the registration record to {place}: {exc}; nothing was sent"
            ) from None
        log.info("registering key %s (kid %s) for %s at %s", next_key.name, next_key.kid, p.client_id, endpoint)
        try:
            response = _upload(settings, profile, runtime, next_key, current, endpoint, http, clock)
        except RegistrationRefused:
            with contextlib.suppress(BackendError, OSError):
                undo()  # HelseID did not take the key: no pending record stays
            raise
        # HelseID took the key. Without a readable expiry the pending record stays (for
        # PENDING_SECONDS it lets a refused client retry with this key) and the operator
        # records the expiry with --manual.
        record = _record_from_answer(response, profile, p.client_id, p.issuer, next_key)
        try:
            place = write(record)
        except (BackendError, OSError) as exc:
            raise RegistrationRefused(
                f"HelseID accepted key {next_key.name} (kid {next_key.kid}) but its record could not be written to "
                f"{place}: {exc}. The key does NOT sign until it is recorded: run helseid-signer keys register "
                f"--config ... --profile {profile} --manual --expires {record.expires_at or '<UTC time>'}"
            ) from None
        when = takes_over(settings, profile)
        log.info("key %s (kid %s) registered; HelseID expiry %s; record in %s; takes over %s", next_key.name,
                 next_key.kid, record.expires_at, place, when)  # fmt: skip
        return _result(profile, next_key, record, place, when)


def _upload(
    settings: Settings,
    profile: str,
    runtime: Runtime,
    next_key: SigningKey,
    current: SigningKey,
    endpoint: str,
    http: httpx.Client | None,
    clock: Callable[[], float],
) -> httpx.Response:
    """POST the next key's public JWK with a token got by the current key; HelseID's
    accepting answer. RegistrationRefused otherwise."""
    selfservice = settings.selfservice
    assert selfservice is not None
    p = settings.profiles[profile]
    dpop = runtime.profiles[profile].dpop_slot.get()
    policy = HtuPolicy.from_settings(p.effective_token_endpoint, (endpoint,))
    signer = LocalSigner(profile, p, current, dpop, policy, clock)
    own_http = http is None
    client = http or httpx.Client(timeout=HTTP_TIMEOUT)
    tokens = TokenClient(signer, profile, selfservice.scope, http=client, clock=clock)  # type: ignore[arg-type]
    try:
        response = client.post(
            endpoint,
            content=json.dumps(next_key.published_jwk).encode("utf-8"),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            auth=DPoPAuth(tokens),
        )
    except TokenError as exc:
        raise RegistrationRefused(
            f"HelseID refused the token for scope {selfservice.scope!r} (current key {current.name}, "
            f"kid {current.kid}): {exc}"
        ) from None
    except (DiscoveryError, SignerError) as exc:
        raise RegistrationRefused(f"no token for the self-service API: {exc}") from None
    except RedirectRefused as exc:  # the token and proof are never sent on to another URL
        raise RegistrationRefused(f"HelseID self-service answered with a redirect: {exc}") from None
    except httpx.HTTPError as exc:
        try:
            where = str(exc.request.url)
        except RuntimeError:  # no request attached
            where = endpoint
        raise RegistrationRefused(f"cannot reach {where}: {exc}") from None
    finally:
        if own_http:
            client.close()
    if not response.is_success:
        raise RegistrationRefused(f"HelseID self-service refused key {next_key.name}: {_describe_error(response)}")
    return response


def _record_from_answer(
    response: httpx.Response, profile: str, client_id: str, issuer: str, next_key: SigningKey
) -> RegistrationRecord:
    """The record of HelseID's accepting answer (its ``expiration``); RegistrationRefused
    when the answer has none readable."""
    try:
        answer = response.json()
        expires = expiration_text(answer.get("expiration") if isinstance(answer, dict) else None)
    except ValueError as exc:
        raise RegistrationRefused(
            f"HelseID accepted key {next_key.name} (kid {next_key.kid}, HTTP {response.status_code}) but its "
            f"answer has no readable expiration ({exc}); NO record was written (only a pending one, which lets "
            f"it sign nothing but retries for {PENDING_SECONDS // 60} minutes). Read the expiry in the "
            f"self-service portal and run: helseid-signer keys register --config ... --profile {profile} "
            "--manual --expires <UTC time>"
        ) from None
    return record_from_response(next_key.kid, client_id, issuer, {"expiration": expires}, SOURCE_API)


def parse_expires(text: str, now: float) -> str:
    """``--expires``: an ISO 8601 time with ``Z`` or an offset, in the future; as ``...Z``."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RegistrationUsageError(
            f"--expires {text!r} is not an ISO 8601 time such as 2027-11-29T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise RegistrationUsageError(f"--expires {text!r} needs a UTC offset or Z, e.g. 2027-11-29T00:00:00Z")
    if moment.timestamp() <= now:
        raise RegistrationUsageError(f"--expires {text!r} is in the past: that registration has already expired")
    return utc_text(moment.timestamp())


def register_manual(
    settings: Settings,
    profile: str,
    expires: str,
    *,
    key_name: str | None = None,
    records_dir: str | Path | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Record a key uploaded by hand in the self-service portal (source ``manual``) with the
    expiry the portal shows. The key is the profile's next key, or ``key_name`` when that
    is its current or next assertion key (e.g. a current key registered when the client
    was made, so its expiry is watched). Returns what was done, the public JWK included.
    Raises RegistrationRefused."""
    p = _profile_settings(settings, profile)
    now = clock()
    expires_at = parse_expires(expires, now)
    with opened_runtime(settings, [profile]) as runtime:
        keys = runtime.profiles[profile].assertion_keys
        if key_name is None:
            _next_key(runtime, profile)
            slot = keys.next
        else:
            slots = {s.name: s for s in (keys.current, keys.next) if s is not None}
            if key_name not in slots:
                raise RegistrationUsageError(
                    f"key {key_name} is neither the current nor the next assertion key of profile {profile}"
                )
            slot = slots[key_name]
        key = slot.get()  # type: ignore[union-attr]
        _refuse_if_registered(runtime, key, now)
        _, write, _ = record_writer(settings, slot, records_dir)  # type: ignore[arg-type]
        record = RegistrationRecord(
            kid=key.kid,
            client_id=p.client_id,
            issuer=p.issuer,
            registered_at=utc_text(now),
            expires_at=expires_at,
            source=SOURCE_MANUAL,
        )
        try:
            place = write(record)
        except (BackendError, OSError) as exc:
            raise RegistrationRefused(f"the record of key {key.name} could not be written: {exc}") from None
        when = takes_over(settings, profile) if slot is keys.next else "now (it is the current key)"
        return _result(profile, key, record, place, when)
