"""Configuration: one TOML file, validated at start-up into typed settings (pydantic).

Secrets never stand in the file: the PKCS#11 PIN comes from an environment variable
(``pin_env``) or a file (``pin_file``). Relative paths are resolved against the
configuration file's folder. Any error stops start-up with a message naming the key,
e.g. ``profiles.demo.issuer: must use https (http only for loopback addresses)``.
See ``docs/configuration.md`` for every key.
"""

from __future__ import annotations

import re
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails

from .algorithms import ALGORITHMS
from .audit import REFUSAL_INTERVAL
from .backends.base import REGISTRY, BackendConfigError, backend_class
from .htu import UrlBase
from .policy import DEFAULT_MAX_IN_FLIGHT
from .settings_types import (
    Bool,
    ConfigPath,
    Int,
    StrictSettings,
    check_endpoint_url,
    is_loopback_host,
)

_Strict = StrictSettings
__all__ = ["ConfigError", "Settings", "is_loopback_host", "load_settings", "parse_listen"]

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
ORGNR_PATTERN = r"^[0-9]{9}$"
#: The types of a caller's ``tls_names`` (``identity.certificate_names`` gives the same).
TLS_NAME_TYPES = ("dns", "uri", "cn")
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid. ``str()`` names the key."""


class ServerSettings(_Strict):
    """``[server]``: where and how the gRPC service listens.

    ``listen`` is a TCP listener with TLS and REQUIRED client certificates (mTLS), using
    ``tls_certificate``/``tls_private_key`` (PEM files) and ``client_ca`` (the CA bundle
    that issues application certificates). ``insecure = true`` makes ``listen`` plaintext
    instead: development only, logged as a warning at start-up; its requests come from
    the caller ``insecure_caller`` (or, when that is unset, from an implicit caller that
    may use every profile). ``listen`` may be omitted when only Unix sockets are used.
    """

    listen: str | None = None
    insecure: Bool = False
    insecure_caller: Name | None = None
    tls_certificate: ConfigPath | None = None
    tls_private_key: ConfigPath | None = None
    client_ca: ConfigPath | None = None
    workers: Annotated[Int, Field(ge=1, le=64)] = 1
    reflection: Bool = False
    #: A server-wide limit gRPC applies BEFORE the caller is known (every caller then gets
    #: RESOURCE_EXHAUSTED): unset by default; admission is per caller (``max_in_flight``).
    max_concurrent_rpcs: Annotated[Int, Field(ge=1, le=100_000)] | None = None
    #: Seconds between health checks (pending keys retried, backends probed, registration
    #: records re-read: a registered next key signs on every replica within this time).
    health_interval: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    #: Seconds between asking cloud backends whether a pinned key's reference moved on
    #: (an AWS alias, a newer Azure key version): one backend call per key each time.
    drift_check_interval: Annotated[float, Field(ge=1, le=86400)] = 300.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @model_validator(mode="after")
    def _tls(self) -> ServerSettings:
        if self.listen and not self.insecure:
            missing = [f for f in ("tls_certificate", "tls_private_key", "client_ca") if not getattr(self, f)]
            if missing:
                raise ValueError(
                    f"listen with TLS needs {', '.join(missing)} (or insecure = true for plaintext development)"
                )
        if self.insecure_caller and not (self.listen and self.insecure):
            raise ValueError("insecure_caller needs listen with insecure = true")
        return self


class UnixSocketSettings(_Strict):
    """A caller's own Unix domain socket: created at ``path`` with ``mode`` (default 0660),
    owned by ``owner``/``group`` (names or numeric ids; changing them needs root)."""

    path: ConfigPath
    owner: str | Int | None = None
    group: str | Int | None = None
    mode: Annotated[Int, Field(ge=0, le=0o777)] = 0o660


class CallerSettings(_Strict):
    """``[callers.NAME]``: one application allowed to call the service.

    ``tls_names``: identities its client certificate carries, typed: ``dns:NAME`` (a DNS
    subjectAltName), ``uri:URI`` (a URI subjectAltName), ``cn:NAME`` (the subject CN of a
    certificate without SAN); each compared within its type only. ``unix_socket``: its own socket.
    ``profiles``: the profiles it may use. ``rate_limit``: requests per second (average,
    per worker process) with bursts up to ``rate_burst``; unlimited when unset.
    ``max_in_flight``: requests it may have running at once (per worker process); more get
    RESOURCE_EXHAUSTED, so one caller cannot hold all of a worker's signing capacity.
    """

    profiles: tuple[Name, ...]
    tls_names: tuple[Annotated[str, Field(min_length=1, max_length=1024)], ...] = ()
    unix_socket: UnixSocketSettings | None = None
    rate_limit: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    rate_burst: Annotated[Int, Field(ge=1, le=1_000_000)] | None = None
    max_in_flight: Annotated[Int, Field(ge=1, le=10_000)] = DEFAULT_MAX_IN_FLIGHT

    @field_validator("tls_names")
    @classmethod
    def _typed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            kind, sep, rest = name.partition(":")
            if not sep or kind not in TLS_NAME_TYPES or not rest:
                hint = f"{kind.lower()}:{rest}" if kind.lower() in TLS_NAME_TYPES and rest else (
                    f"uri:{name}" if "://" in name else f"dns:{name}")  # fmt: skip
                raise ValueError(
                    f"{name!r} has no type: write {hint} (or dns:, uri:, cn: - the certificate field it "
                    "must match: a DNS or URI subjectAltName, or the subject CN of a certificate without SAN)"
                )
        return value

    @model_validator(mode="after")
    def _identified(self) -> CallerSettings:
        if not self.tls_names and self.unix_socket is None:
            raise ValueError("a caller needs tls_names or a unix_socket to be identified by")
        return self


class AuditSettings(_Strict):
    """``[audit]``: where audit records go (``stdout`` or ``file`` at ``path``) and what a
    failed write does (``fail_closed``: the request fails; ``continue``: answer anyway)."""

    sink: Literal["stdout", "file"] = "stdout"
    path: ConfigPath | None = None
    on_failure: Literal["fail_closed", "continue"] = "fail_closed"
    #: fsync the file after each record (with ``sink = "file"``): records survive a host crash.
    fsync: Bool = False
    #: Seconds over which repeated refusals of one kind (caller, purpose, status, message)
    #: are counted into one record instead of one record each.
    refusal_interval: Annotated[float, Field(ge=0.1, le=3600)] = REFUSAL_INTERVAL

    @model_validator(mode="after")
    def _path(self) -> AuditSettings:
        if (self.sink == "file") != (self.path is not None):
            raise ValueError("sink = 'file' needs path, and path needs sink = 'file'")
        if self.fsync and self.sink != "file":
            raise ValueError("fsync = true needs sink = 'file'")
        return self


class BackendsSettings(_Strict):
    """``[backends]``: one table per backend scheme the keys use, each validated by that
    backend's own settings class (``Backend.Settings``, in the backend's module: adding a
    backend touches no file here). ``settings.backends.pkcs11`` is the PKCS#11 settings,
    or None when there is no ``[backends.pkcs11]``."""

    configured: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _per_backend(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict) or set(value) == {"configured"}:
            return value
        configured: dict[str, Any] = {}
        errors: list[InitErrorDetails] = []
        for scheme, table in value.items():
            if scheme not in REGISTRY:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(scheme,), input=table))
                continue
            try:
                settings_class = backend_class(scheme).Settings
            except BackendConfigError as exc:  # the backend's extra is not installed
                raise ValueError(f"{scheme}: {exc}") from None
            try:
                configured[scheme] = settings_class.model_validate(table, context=info.context)
            except ValidationError as exc:
                errors += [
                    InitErrorDetails(type=e["type"], loc=(scheme, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                    for e in exc.errors()
                ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return {"configured": configured}

    def __getattr__(self, name: str) -> Any:
        if name in REGISTRY:
            return self.configured.get(name)
        return super().__getattr__(name)  # type: ignore[misc]

    def warnings(self) -> list[str]:
        """Every configured backend's :meth:`~.settings_types.BackendSettings.warnings`."""
        return [warning for settings in self.configured.values() for warning in settings.warnings()]


class KeySettings(_Strict):
    """``[keys.NAME]``: one signing key: its reference and the JWS ``alg`` it signs with."""

    uri: Annotated[str, Field(min_length=1, max_length=2048)]
    alg: str
    #: When set, the key may sign only for profiles with one of these issuers, so a test
    #: key can never sign for production.
    issuers: tuple[str, ...] | None = None

    @field_validator("alg")
    @classmethod
    def _known_alg(cls, value: str) -> str:
        if value not in ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(ALGORITHMS)}")
        return value


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and (value.tzinfo is None or value.utcoffset() != timedelta(0)):
        raise ValueError("must be a UTC time with Z, e.g. 2026-12-15T08:00:00Z (the same on every replica)")
    return value


UtcTime = Annotated[datetime, AfterValidator(_utc)]


class RotationSettings(_Strict):
    """``[profiles.NAME.rotation]``: client-assertion key rotation by configuration.

    ``next_key`` is published (GetKeySet, status NEXT) at once and becomes the signing key
    as soon as it is registered with HelseID: a registration record for its kid must exist
    (``keys register`` writes it beside the key in its key store, or in ``records_dir``);
    every replica sees it within one health interval. HelseID may refuse the old key from
    the moment of the upload, so that is the default (docs/operations.md, "Rotating the
    assertion key"). Only with ``helseid_keeps_old_key = true`` - the operator's statement
    that HelseID keeps accepting the old key - does the switch wait for
    ``next_active_from`` (UTC). Without that statement ``next_active_from`` is the time by
    which the next key should be registered: after it an unregistered next key is reported
    (log, health, metric). After the switch the old current key stays published as
    PREVIOUS until the configuration is updated. ``previous_key`` is published, verify-only
    (and a candidate for a retried assertion), until ``previous_published_until``.
    """

    next_key: Name | None = None
    next_active_from: UtcTime | None = None
    helseid_keeps_old_key: Bool = False
    previous_key: Name | None = None
    previous_published_until: UtcTime | None = None

    @model_validator(mode="after")
    def _pairs(self) -> RotationSettings:
        if self.next_key is None and (self.next_active_from is not None or self.helseid_keeps_old_key):
            raise ValueError("next_active_from and helseid_keeps_old_key need next_key")
        if self.helseid_keeps_old_key and self.next_active_from is None:
            raise ValueError(
                "helseid_keeps_old_key = true needs next_active_from (the later switch time it allows)"
            )
        if (self.previous_key is None) != (self.previous_published_until is None):
            raise ValueError("previous_key and previous_published_until go together")
        return self


class MetricsSettings(_Strict):
    """``[metrics]``: the Prometheus endpoint (plain HTTP ``GET /metrics``), on its own port
    so that a NetworkPolicy can admit only the monitoring namespace to it. Loopback unless
    ``listen`` says otherwise (``check`` warns when it is not loopback)."""

    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value


class SelfServiceSettings(_Strict):
    """``[selfservice]``: HelseID's self-service API, where ``keys register`` uploads the next
    key's public JWK (``POST {url}/v1/client-secret``, scope ``nhn:selvbetjening/client``),
    and ``records_dir``, a folder of registration records (kid, expiry) read beside those
    the key stores hold (optional: a PKCS#11 token keeps its keys' records itself)."""

    url: str | None = None
    scope: str = "nhn:selvbetjening/client"
    records_dir: ConfigPath | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)


class ProfileSettings(_Strict):
    """``[profiles.NAME]``: one HelseID client as the service signs for it."""

    client_id: Annotated[str, Field(min_length=1, max_length=256)]
    issuer: str
    token_endpoint: str | None = None
    assertion_key: Name
    dpop_key: Name
    assertion_lifetime: Annotated[Int, Field(ge=1, le=60)] = 10
    tenancy: Literal["single", "multi"] = "single"
    allowed_organization_numbers: tuple[Annotated[str, Field(pattern=ORGNR_PATTERN)], ...] = ()
    #: DPoP proofs may name the token endpoint and URLs under these bases only.
    api_base_urls: tuple[str, ...] = ()
    rotation: RotationSettings = RotationSettings()

    @field_validator("api_base_urls")
    @classmethod
    def _bases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            check_endpoint_url(url)
            UrlBase.parse(url)
        return value

    @field_validator("issuer", "token_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)

    @property
    def effective_token_endpoint(self) -> str:
        """The configured token endpoint, or ``{issuer}/connect/token`` (HelseID's)."""
        return self.token_endpoint or self.issuer.rstrip("/") + "/connect/token"


class Settings(_Strict):
    """The whole configuration file."""

    server: ServerSettings = ServerSettings()
    backends: BackendsSettings = BackendsSettings()
    audit: AuditSettings = AuditSettings()
    selfservice: SelfServiceSettings | None = None
    metrics: MetricsSettings | None = None
    keys: dict[Name, KeySettings]
    profiles: dict[Name, ProfileSettings]
    callers: dict[Name, CallerSettings] = {}

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, profile in self.profiles.items():
            rotation = profile.rotation
            for field in ("next_key", "previous_key"):
                key = getattr(rotation, field)
                if key is not None and key not in self.keys:
                    raise ValueError(f"profiles.{name}.rotation.{field}: no [keys.{key}] section")
                if key is not None and key == profile.assertion_key:
                    raise ValueError(f"profiles.{name}.rotation.{field}: is the current assertion_key")
            if rotation.next_key is not None and self.selfservice is None:
                raise ValueError(
                    f"profiles.{name}.rotation.next_key: needs [selfservice] (a key becomes current only once "
                    "registered with HelseID)"
                )
            for field in ("assertion_key", "dpop_key"):
                key = getattr(profile, field)
                if key not in self.keys:
                    raise ValueError(f"profiles.{name}.{field}: no [keys.{key}] section")
            # Every key that may sign for the profile - now or after a rotation - must be
            # allowed for its issuer: a test key never signs for production.
            signing = {
                "assertion_key": profile.assertion_key,
                "dpop_key": profile.dpop_key,
                "rotation.next_key": profile.rotation.next_key,
                "rotation.previous_key": profile.rotation.previous_key,
            }
            for field, key in signing.items():
                issuers = self.keys[key].issuers if key is not None else None
                if issuers is not None and profile.issuer not in issuers:
                    raise ValueError(
                        f"profiles.{name}.{field}: key {key!r} is bound to issuers {list(issuers)}, "
                        f"not {profile.issuer!r}"
                    )
        for name, caller in self.callers.items():
            for profile in caller.profiles:
                if profile not in self.profiles:
                    raise ValueError(f"callers.{name}.profiles: no [profiles.{profile}] section")
        seen: dict[str, str] = {}
        for name, caller in self.callers.items():
            for tls_name in caller.tls_names:
                if tls_name in seen:
                    raise ValueError(
                        f"callers.{name}.tls_names: {tls_name!r} already identifies caller {seen[tls_name]!r}"
                    )
                seen[tls_name] = name
        if self.server.insecure_caller and self.server.insecure_caller not in self.callers:
            raise ValueError(f"server.insecure_caller: no [callers.{self.server.insecure_caller}] section")
        sockets = [c.unix_socket.path for c in self.callers.values() if c.unix_socket]
        if len(sockets) != len(set(sockets)):
            raise ValueError("callers: two callers share a unix_socket path (one socket per caller)")
        if sockets and self.server.workers > 1:
            raise ValueError("server.workers: Unix sockets need workers = 1 (a socket path has one listener)")
        if not self.server.listen and not sockets:
            raise ValueError("server.listen: no listener (set listen, or give a caller a unix_socket)")
        if self.server.insecure and self.server.listen:
            self._insecure_development_only()
        for name, key in self.keys.items():
            scheme = key.uri.partition(":")[0]
            if scheme in REGISTRY and scheme not in self.backends.configured:
                article = "an" if scheme[0] in "aeiou" else "a"
                raise ValueError(f"keys.{name}.uri: {article} {scheme}: key needs a [backends.{scheme}] section")
        return self

    def _insecure_development_only(self) -> None:
        """``insecure = true`` is development on one machine: every profile's issuer and
        token endpoint on a loopback address (a local authorization server, never a HelseID
        environment), and, when callers are configured, ``insecure_caller`` naming the one
        plaintext requests are - an implicit caller that may use every profile would bypass
        them - and no other caller identified only by ``tls_names`` no listener checks.
        Also: ``listen`` on a loopback address, and no TLS files (which it would ignore)."""
        server = self.server
        if server.listen and not is_loopback_host(parse_listen(server.listen)[0]):
            raise ValueError(
                f"server.listen: {server.listen!r} is not a loopback address; insecure = true listens only on "
                "127.0.0.1, ::1 or localhost (other hosts need TLS with client certificates)"
            )
        ignored = [f for f in ("tls_certificate", "tls_private_key", "client_ca") if getattr(server, f)]
        if ignored:
            raise ValueError(
                f"server.{ignored[0]}: not used with insecure = true (plaintext); remove {', '.join(ignored)} "
                "or set insecure = false"
            )
        for name, profile in self.profiles.items():
            for field in ("issuer", "token_endpoint"):
                url = getattr(profile, field)
                if url is not None and not is_loopback_host(urlsplit(url).hostname):
                    raise ValueError(
                        f"profiles.{name}.{field}: {url!r} is not on a loopback address; with server.insecure = "
                        "true the signer signs only for a local development issuer (use TLS with client "
                        "certificates or a Unix socket for any other issuer)"
                    )
        if self.server.listen and self.callers and not self.server.insecure_caller:
            raise ValueError(
                "server.insecure_caller: required with insecure = true when [callers] are configured (else "
                "plaintext requests would come from an implicit caller that may use every profile)"
            )
        for name, caller in self.callers.items():
            if caller.tls_names and caller.unix_socket is None and name != self.server.insecure_caller:
                raise ValueError(
                    f"callers.{name}.tls_names: no TLS listener identifies this caller (insecure = true); "
                    "give it a unix_socket, name it server.insecure_caller, or remove it"
                )


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def load_settings(path: str | Path) -> Settings:
    """Read and validate the TOML file at ``path``; raise :class:`ConfigError` naming the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Settings.model_validate(data, context={"base": str(path.resolve().parent)})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format_error(exc)}") from None


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port); ValueError otherwise."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", listen)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ValueError(f"listen {listen!r} must be host:port")
    return match.group(1), int(match.group(2))
