"""The building blocks of settings: strict frozen tables, paths relative to the
configuration file, strict integers and booleans, endpoint URL checks. Shared by
:mod:`.config` and each backend's own settings class (``[backends.SCHEME]``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationInfo


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


class StrictSettings(BaseModel):
    """A settings table: unknown keys are errors, values are frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSettings(StrictSettings):
    """Base of each backend's ``[backends.SCHEME]`` settings class, which lives in the
    backend's own module (``Backend.Settings``) and whose fields are the backend's
    constructor arguments."""

    def warnings(self) -> tuple[str, ...]:
        """Settings that work but weaken a promise: logged at start-up and on reload,
        reported by ``check`` as warnings."""
        return ()


def _config_path(value: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the configuration file's folder."""
    base = (info.context or {}).get("base")
    if base is not None and value and not Path(value).is_absolute():
        return str(Path(base) / value)
    return value


#: A file path; relative paths are taken from the configuration file's folder.
ConfigPath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_config_path)]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
