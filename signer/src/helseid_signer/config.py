"""Configuration: one TOML file, validated at start-up into typed settings (pydantic).

Secrets never stand in the file: the PKCS#11 PIN comes from an environment variable
(``pin_env``) or a file (``pin_file``). Relative paths are resolved against the
configuration file's folder. Any error stops start-up with a message naming the key,
e.g. ``profiles.demo.issuer: must use https (http only for loopback addresses)``.
See ``docs/configuration.md`` for every key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algorithms import ALGORITHMS

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
ORGNR_PATTERN = r"^[0-9]{9}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid. ``str()`` names the key."""


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str) -> str:
    """An issuer or token endpoint: absolute https URL (http only on loopback), no
    userinfo, query, fragment, spaces or control characters, a valid port if any.
    Returned unchanged (the issuer is compared exactly)."""
    if any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute https URL")
    try:
        _ = parts.port  # parsing the port is the check
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("must use https (http only for loopback addresses)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain userinfo")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must not contain a query or fragment")
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    """``[server]``: where and how the gRPC service listens."""

    listen: str = "127.0.0.1:50051"
    insecure: bool = False
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    reflection: bool = False
    max_concurrent_rpcs: Annotated[int, Field(ge=1, le=100_000)] = 1000

    @field_validator("insecure")
    @classmethod
    def _insecure_only_for_now(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "only insecure = true (plaintext, development) is implemented so far; "
                "TLS with client certificates is on the way"
            )
        return value


class Pkcs11Settings(_Strict):
    """``[backends.pkcs11]``: the PKCS#11 module and where its user PIN comes from."""

    module: str
    pin_env: str | None = None
    pin_file: str | None = None

    @model_validator(mode="after")
    def _one_pin_source(self) -> Pkcs11Settings:
        if not self.pin_env and not self.pin_file:
            raise ValueError("set pin_env (an environment variable name) or pin_file (a path)")
        return self


class BackendsSettings(_Strict):
    """``[backends]``: settings per backend scheme."""

    pkcs11: Pkcs11Settings | None = None


class KeySettings(_Strict):
    """``[keys.NAME]``: one signing key: its reference and the JWS ``alg`` it signs with."""

    uri: Annotated[str, Field(min_length=1, max_length=2048)]
    alg: str

    @field_validator("alg")
    @classmethod
    def _known_alg(cls, value: str) -> str:
        if value not in ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(ALGORITHMS)}")
        return value


class ProfileSettings(_Strict):
    """``[profiles.NAME]``: one HelseID client as the service signs for it."""

    client_id: Annotated[str, Field(min_length=1, max_length=256)]
    issuer: str
    token_endpoint: str | None = None
    assertion_key: Name
    dpop_key: Name
    assertion_lifetime: Annotated[int, Field(ge=1, le=60)] = 10
    tenancy: Literal["single", "multi"] = "single"
    allowed_organization_numbers: tuple[Annotated[str, Field(pattern=ORGNR_PATTERN)], ...] = ()

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

    server: ServerSettings = ServerSettings(insecure=True)
    backends: BackendsSettings = BackendsSettings()
    keys: dict[Name, KeySettings]
    profiles: dict[Name, ProfileSettings]

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, profile in self.profiles.items():
            for field in ("assertion_key", "dpop_key"):
                key = getattr(profile, field)
                if key not in self.keys:
                    raise ValueError(f"profiles.{name}.{field}: no [keys.{key}] section")
        for name, key in self.keys.items():
            scheme = key.uri.partition(":")[0]
            if scheme == "pkcs11" and self.backends.pkcs11 is None:
                raise ValueError(f"keys.{name}.uri: a pkcs11: key needs a [backends.pkcs11] section")
        return self


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    p11 = settings.backends.pkcs11
    if p11 and p11.pin_file and not Path(p11.pin_file).is_absolute():
        p11 = p11.model_copy(update={"pin_file": str(base / p11.pin_file)})
        backends = settings.backends.model_copy(update={"pkcs11": p11})
        settings = settings.model_copy(update={"backends": backends})
    return settings


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
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format_error(exc)}") from None
    return _resolve_paths(settings, path.resolve().parent)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port); ValueError otherwise."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", listen)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ValueError(f"listen {listen!r} must be host:port")
    return match.group(1), int(match.group(2))
