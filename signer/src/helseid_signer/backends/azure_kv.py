"""Azure Key Vault backend (azure-keyvault-keys): keys in a vault or a Managed HSM.

Key references are key URLs, with or without a version::

    azurekv:https://myvault.vault.azure.net/keys/deft-assertion
    azurekv:https://myvault.vault.azure.net/keys/deft-assertion/9885aa558e8d448789683188f8c194b0
    azurekv:https://myhsm.managedhsm.azure.net/keys/deft-assertion

Versions (bug-kinds 12): :meth:`AzureKvBackend.resolve` pins a versionless reference to
the version that is current when configuration is loaded; ``ResolvedKey.version`` is that
versioned key URL and ``ResolvedKey.public_key`` that version's public key, so ``kid``
describes it. Every signature is made by a CryptographyClient bound to the versioned URL,
and the ``kid`` in the vault's reply is checked against it: a cached public key never
describes a different version than the one that signed. A version created later never
signs by itself; :meth:`AzureKvBackend.newer_version` reports it (log line; the service
can show it in health detail). A versionless reference pins the CURRENT version at each
start, so a restart after a rotation in the vault pins the new one: production
configuration should name the versioned URL (a warning is logged otherwise).

Signing (bug-kinds 1, 5, 6): the vault gets the SHA-2 digest of the JWS signing input
(``CryptographyClient.sign(alg, digest)``), never the message. Azure's ES* result is
already JOSE ``R || S`` and is returned as it is (no DER conversion); its width is checked
(64/96/132 bytes; RSA: the modulus length). ``alg`` comes from configuration.

Errors and throttling (bug-kinds 24): azure-core's RetryPolicy retries 429, 408/5xx and
connection errors, never past the caller's deadline: a retry whose wait would end after
the deadline is not made, and each attempt's connect and read timeouts are cut to the time
left. A 429 with ``Retry-After`` waits that long; a bare 429 (what real vaults send) waits
1, 2, 4, 8, 16 s, jittered, as Microsoft's throttling guidance asks. Without a deadline a
default budget applies (:data:`DEFAULT_BUDGET_S`; ``keys create``: :data:`CREATE_BUDGET_S`,
retrying only 429 and unsent requests), so no loop is unbounded. Mapped to typed errors:
429 after the retries -> BackendThrottledError (RESOURCE_EXHAUSTED); 403 ->
KeyAccessDeniedError (FAILED_PRECONDITION) with a hint chosen by the vault's
``innererror.code`` (RBAC, access policy, firewall, disabled key, key_ops without sign) or
naming the key's nbf/exp window; 401 -> KeyAccessDeniedError (token not accepted); 404 ->
KeyNotFoundError; unreachable, 5xx, timeouts -> BackendUnavailableError (UNAVAILABLE);
other 4xx -> BackendConfigError. :meth:`AzureKvBackend.resolve` refuses a key version
outside its ``nbf``/``exp`` window (the vault still answers GET for it, but will not sign)
and warns when ``exp`` is less than :data:`VALIDITY_WARNING_DAYS` days away.

Tests run against a local stand-in of the REST API (``tests/support/azure_kv_standin.py``);
this backend has NOT been run against a real vault (docs/backends/azure-key-vault.md).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import CustomHookPolicy, RetryPolicy
from azure.keyvault.keys import KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError, model_validator

from .. import metrics
from ..algorithms import CURVES, Algorithm, AlgorithmError, KeyType, PublicKey, check_key_fits
from ..settings_types import BackendSettings, Bool, ConfigPath
from .base import (
    KEY_SPECS,
    BackendConfigError,
    BackendError,
    BackendThrottledError,
    BackendUnavailableError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    ResolvedKey,
)

log = logging.getLogger(__name__)

#: Time budget (seconds) of a call made without a caller deadline (resolve, create, or a
#: sign without one): retries stop when it is spent.
DEFAULT_BUDGET_S = 15.0
#: Per-attempt timeouts before the deadline cuts them (seconds).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
#: A retry is not started with less than this left before the deadline (seconds).
MIN_ATTEMPT_S = 0.05
#: Waits (seconds) after the 1st, 2nd, ... 429 without Retry-After in one call: Microsoft's
#: Key Vault throttling guidance (overview-throttling); the last one repeats.
THROTTLE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)
#: Time budget (seconds) of ``keys create``: an operator waits, and throttling by the vault
#: (counted per 10-second window) may take a few windows to pass.
CREATE_BUDGET_S = 60.0
#: A key whose ``exp`` is less than this many days away gets a warning at resolve (start-up
#: log, ``helseid-signer check``): the same period as HelseID registration expiry warnings
#: (rotation.EXPIRY_WARNING_DAYS).
VALIDITY_WARNING_DAYS = 14

#: Host suffixes of Azure Key Vault vaults and Managed HSMs (public, China, US Gov clouds).
VAULT_SUFFIXES = (".vault.azure.net", ".vault.azure.cn", ".vault.usgovcloudapi.net", ".vault.microsoftazure.de")
MANAGED_HSM_SUFFIXES = (
    ".managedhsm.azure.net",
    ".managedhsm.azure.cn",
    ".managedhsm.usgovcloudapi.net",
    ".managedhsm.microsoftazure.de",
)
_NAME_RE = re.compile(r"[0-9A-Za-z-]{1,127}")
_VERSION_RE = re.compile(r"[0-9A-Za-z]{1,64}")

ROLE_HINT = (
    "the service's identity needs the Azure role 'Key Vault Crypto User' on the key or vault "
    "(or, with vault access policies, the key permissions get and sign)"
)
CREATE_ROLE_HINT = (
    "creating keys needs the Azure role 'Key Vault Crypto Officer' (or the key permissions get and create)"
)
HSM_ROLE_HINT = (
    "the service's identity needs the Managed HSM local role 'Managed HSM Crypto User' on the key "
    "(in a Managed HSM, the vault roles such as 'Key Vault Crypto User' do not apply)"
)
HSM_CREATE_ROLE_HINT = "creating keys in a Managed HSM needs the local role 'Managed HSM Crypto Officer'"
VALIDITY_HINT = (
    "Create a new key version (or key), register its public JWK with HelseID and configure it; or, if the "
    "window was set by mistake, change the version's expiry/activation date (az keyvault key set-attributes "
    "--expires/--not-before)"
)


def _rbac_hint(create: bool, hsm: bool) -> str:
    role = {
        (False, False): "'Key Vault Crypto User'",
        (True, False): "'Key Vault Crypto Officer'",
        (False, True): "the Managed HSM local role 'Managed HSM Crypto User'",
        (True, True): "the Managed HSM local role 'Managed HSM Crypto Officer'",
    }[(create, hsm)]
    return (
        f"Azure RBAC has no role assignment that allows this: assign {role} to the service's identity on the "
        "key or vault (a new assignment can take several minutes to apply)"
    )


def _policy_hint(create: bool, _hsm: bool) -> str:
    perms = "get and create" if create else "get and sign"
    return (
        f"the vault uses access policies (not Azure RBAC) and none gives the service's identity the key "
        f"permissions {perms}: add them to the identity's access policy "
        f"(az keyvault set-policy --key-permissions {perms.replace(' and ', ' ')})"
    )


#: innererror.code of a 403 -> the operator's hint (a text, or a function of (create, hsm)).
FORBIDDEN_HINTS: dict[str, Any] = {
    "ForbiddenByRbac": _rbac_hint,
    "ForbiddenByPolicy": _policy_hint,
    "ForbiddenByFirewall": (
        "the vault's firewall refused the service's network address - no role or permission helps: add the "
        "host's outbound IP address or subnet to the vault's networking rules, or reach the vault through a "
        "private endpoint"
    ),
    "KeyDisabled": (
        "the key version is disabled in the vault: enable it (az keyvault key set-attributes --enabled true) "
        "or configure another key"
    ),
    "KeyOperationForbidden": (
        "the key version's permitted operations (key_ops) do not include sign: allow it (az keyvault key "
        "set-attributes --ops sign verify) or create a signing key with helseid-signer keys create"
    ),
}

_KTY_FAMILY = {"RSA": KeyType.RSA, "RSA-HSM": KeyType.RSA, "EC": KeyType.EC, "EC-HSM": KeyType.EC}

#: The caller's deadline (``time.monotonic()`` seconds) of the call in progress on this
#: thread; read by the retry and timeout policies below.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("azurekv_deadline", default=None)
#: True while a call runs that must not be repeated once the vault may have acted on it.
_UNPROCESSED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("azurekv_unprocessed_only", default=False)


@dataclass(frozen=True)
class AzureKeyRef:
    """A parsed ``azurekv:`` reference.

    Attributes:
        vault_url: ``https://host[:port]`` (host lower-case).
        name: the key name.
        version: the key version, or None (the current version at resolve time).
        managed_hsm: the host is a Managed HSM (keys are always HSM keys there).
    """

    vault_url: str
    name: str
    version: str | None
    managed_hsm: bool

    @classmethod
    def parse(cls, uri: str, *, any_host: bool = False) -> AzureKeyRef:
        """Parse ``uri``; BackendConfigError naming the problem if it is not usable.

        The host must be a Key Vault or Managed HSM host unless ``any_host`` (the backend's
        ``verify_challenge_resource = false``, for tests and private stand-ins).
        """
        if not uri.startswith("azurekv:"):
            raise BackendConfigError(f"{uri!r} is not an azurekv: key reference")
        url = uri[len("azurekv:") :]
        if any(c <= " " or c == "\x7f" for c in url):
            raise BackendConfigError(f"azurekv reference {uri!r} contains spaces or control characters")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise BackendConfigError(f"azurekv reference {uri!r}: the key URL must start with https://")
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise BackendConfigError(f"azurekv reference {uri!r}: no userinfo, query or fragment in the key URL")
        try:
            port = parts.port
        except ValueError:
            raise BackendConfigError(f"azurekv reference {uri!r} has an invalid port") from None
        host = parts.hostname.lower()
        managed_hsm = host.endswith(MANAGED_HSM_SUFFIXES)
        if not (managed_hsm or host.endswith(VAULT_SUFFIXES) or any_host):
            raise BackendConfigError(
                f"azurekv reference {uri!r}: {host} is not a Key Vault host (*{VAULT_SUFFIXES[0]}) "
                f"or a Managed HSM (*{MANAGED_HSM_SUFFIXES[0]})"
            )
        segments = parts.path.split("/")[1:]
        if len(segments) not in (2, 3) or segments[0] != "keys" or not _NAME_RE.fullmatch(segments[1]):
            raise BackendConfigError(
                f"azurekv reference {uri!r}: the path must be /keys/<name> or /keys/<name>/<version> "
                "(name: letters, digits and '-')"
            )
        version = segments[2] if len(segments) == 3 else None
        if version is not None and not _VERSION_RE.fullmatch(version):
            raise BackendConfigError(f"azurekv reference {uri!r}: {version!r} is not a key version")
        vault_url = f"https://{host}" + (f":{port}" if port is not None and port != 443 else "")
        return cls(vault_url=vault_url, name=segments[1], version=version, managed_hsm=managed_hsm)

    def key_url(self, version: str | None = None) -> str:
        v = version or self.version
        return f"{self.vault_url}/keys/{self.name}" + (f"/{v}" if v else "")


@dataclass(frozen=True)
class _Handle:
    """Backend-private state of a resolved key."""

    ref: AzureKeyRef
    version: str
    kid: str
    kty: str
    key_ops: frozenset[str]
    client: CryptographyClient
    exportable: bool | None = None
    not_before: datetime | None = None
    expires_on: datetime | None = None


class DeadlineRetryPolicy(RetryPolicy):
    """azure-core's RetryPolicy, bounded by the call's deadline and jittered.

    * The wait before a retry is ``Retry-After`` when the service sent one (+0-10 % jitter).
    * A 429 without ``Retry-After`` - what real vaults send - waits as Microsoft's Key Vault
      throttling guidance asks (learn.microsoft.com/azure/key-vault/general/overview-throttling,
      "Recommended client throttling method"): 1 s, then 2, 4, 8, 16 s for each further
      429 of the same call (:data:`THROTTLE_BACKOFF_S`), each stretched by 0-25 % random
      jitter so that replicas throttled together do not come back together.
    * Other retryable failures (408, 5xx, connection errors): azure-core's exponential
      backoff, 50-100 % of ``backoff_factor * 2**n``, at most ``backoff_max``.
    * In a call that must not be repeated once the vault may have acted on it (``keys
      create``: each POST adds a key version), only answers that prove nothing was done are
      retried: 429 (Key Vault does not process a throttled request) and errors raised
      before the request was sent. A 5xx or a timeout is returned at once.
    * A retry is not made when its wait would end within :data:`MIN_ATTEMPT_S` of the
      deadline: the last response (e.g. the 429) or error is returned at once instead.
    * The retry policy's total ``timeout`` is the time left to the deadline.

    Only public RetryPolicy methods are overridden (configure_retries, increment, sleep).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("retry_total", 8)
        kwargs.setdefault("retry_connect", 3)
        kwargs.setdefault("retry_read", 2)
        kwargs.setdefault("retry_status", 8)
        kwargs.setdefault("retry_backoff_factor", 0.25)
        kwargs.setdefault("retry_backoff_max", 4)
        super().__init__(**kwargs)
        self.retries = 0  # counters for metrics / health detail
        self.throttled = 0
        self._count_lock = threading.Lock()

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        deadline = _DEADLINE.get()
        settings["deadline"] = deadline
        if deadline is not None:
            settings["timeout"] = max(0.001, deadline - time.monotonic())
        return settings

    def increment(self, settings: dict[str, Any], response: Any = None, error: Any = None) -> bool:
        status = None
        if isinstance(response, PipelineResponse):
            status = response.http_response.status_code
            if status == 429:
                metrics.BACKEND_THROTTLED.labels("azurekv").inc()
                with self._count_lock:
                    self.throttled += 1
        if _UNPROCESSED_ONLY.get() and status != 429 and not isinstance(error, ServiceRequestError):
            log.debug("azurekv: no retry of a call that may have been carried out (status %s, %r)", status, error)
            return False
        if not super().increment(settings, response=response, error=error):
            return False
        retry_after = self.get_retry_after(response) if isinstance(response, PipelineResponse) else None
        if retry_after:
            delay = retry_after * random.uniform(1.0, 1.1)
        elif status == 429:
            throttled = sum(1 for h in settings["history"] if getattr(h.http_response, "status_code", None) == 429)
            step = THROTTLE_BACKOFF_S[min(throttled, len(THROTTLE_BACKOFF_S)) - 1]
            delay = step * random.uniform(1.0, 1.25)
        else:
            delay = self.get_backoff_time(settings) * random.uniform(0.5, 1.0)
        deadline = settings.get("deadline")
        if deadline is not None and time.monotonic() + delay > deadline - MIN_ATTEMPT_S:
            log.debug("azurekv: no retry (status %s): waiting %.2fs would pass the deadline", status, delay)
            return False
        settings["next_delay"] = delay
        metrics.BACKEND_RETRIES.labels("azurekv").inc()
        with self._count_lock:
            self.retries += 1
        return True

    def sleep(self, settings: dict[str, Any], transport: Any, response: Any = None) -> None:
        delay = settings.pop("next_delay", None)
        if delay is None:
            super().sleep(settings, transport, response=response)
        elif delay > 0:
            transport.sleep(delay)


class DeadlineTimeoutPolicy(CustomHookPolicy):
    """Runs before every attempt (after the retry and authentication policies): cuts the
    attempt's connect and read timeouts to the time left before the deadline."""

    def on_request(self, request: Any) -> None:
        super().on_request(request)
        deadline = _DEADLINE.get()
        options = request.context.options
        if deadline is None:
            return
        left = max(0.001, deadline - time.monotonic())
        options["connection_timeout"] = min(options.get("connection_timeout", CONNECT_TIMEOUT_S), left)
        options["read_timeout"] = min(options.get("read_timeout", READ_TIMEOUT_S), left)


class AzureKvSettings(BackendSettings):
    """``[backends.azurekv]``: how the Azure Key Vault backend authenticates and connects.

    ``credential = "default"``: azure-identity's DefaultAzureCredential (workload identity,
    managed identity, environment, Azure CLI). ``"certificate"``: a service principal's
    client certificate for on-premises hosts (``tenant_id``, ``client_id``,
    ``certificate_path``: PEM or PKCS#12 holding the private key; a password, if any, from
    the environment variable ``certificate_password_env``). ``ca_bundle``: PEM CAs to trust
    for the vault's TLS. ``verify_challenge_resource = false`` allows a vault host outside
    the Azure Key Vault domains (tests). ``hsm_keys``: ``keys create`` makes RSA-HSM/EC-HSM
    keys (always so in a Managed HSM). See docs/backends/azure-key-vault.md.
    """

    credential: Literal["default", "certificate"] = "default"
    tenant_id: str | None = None
    client_id: str | None = None
    certificate_path: ConfigPath | None = None
    certificate_password_env: str | None = None
    ca_bundle: ConfigPath | None = None
    verify_challenge_resource: Bool = True
    hsm_keys: Bool = False

    @model_validator(mode="after")
    def _credential_fields(self) -> AzureKvSettings:
        needed = ("tenant_id", "client_id", "certificate_path")
        if self.credential == "certificate":
            missing = [f for f in needed if not getattr(self, f)]
            if missing:
                raise ValueError(f"credential = 'certificate' needs {', '.join(missing)}")
        elif any(getattr(self, f) for f in (*needed, "certificate_password_env")):
            raise ValueError(f"{', '.join(needed)} and certificate_password_env need credential = 'certificate'")
        return self


class AzureKvBackend:
    """Keys in Azure Key Vault or a Managed HSM. See the module docstring.

    Keyword args are the fields of :class:`AzureKvSettings`
    (``[backends.azurekv]``), plus ``token_credential``: an object with ``get_token`` to
    use instead of the configured credential (tests, or an embedding application), and
    ``transport``: an azure-core ``HttpTransport`` for every client (an embedding
    application's proxy set-up; the tests' replay of recorded vault answers).

    Raises BackendConfigError for invalid settings or an unusable client certificate.
    """

    scheme: ClassVar[str] = "azurekv"
    Settings: ClassVar[type[BackendSettings]] = AzureKvSettings

    def __init__(self, *, token_credential: Any = None, transport: Any = None, **settings: Any) -> None:
        try:
            self.settings = AzureKvSettings.model_validate(settings)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise BackendConfigError(f"[backends.azurekv]: {problems}") from None
        self._credential = token_credential if token_credential is not None else self._make_credential()
        self._transport = transport
        self._key_clients: dict[str, KeyClient] = {}
        self._crypto_clients: dict[str, CryptographyClient] = {}  # versioned key URL -> client
        self._policies: list[DeadlineRetryPolicy] = []
        self._lock = threading.Lock()
        self._healthy = True
        self._reported_newer: dict[str, str] = {}
        http_log = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
        if http_log.level == logging.NOTSET:  # one INFO line per HTTP request otherwise
            http_log.setLevel(logging.WARNING)

    def _make_credential(self) -> Any:
        s = self.settings
        try:
            if s.credential == "certificate":
                from azure.identity import CertificateCredential

                password = None
                if s.certificate_password_env:
                    password = os.environ.get(s.certificate_password_env)
                    if password is None:
                        raise BackendConfigError(
                            f"environment variable {s.certificate_password_env} (the certificate password) is not set"
                        )
                return CertificateCredential(
                    s.tenant_id, s.client_id, s.certificate_path, password=password.encode() if password else None
                )
            from azure.identity import DefaultAzureCredential

            return DefaultAzureCredential()
        except (ValueError, OSError) as exc:
            raise BackendConfigError(f"[backends.azurekv]: cannot set up the {s.credential} credential: {exc}") from exc

    def _client_options(self) -> dict[str, Any]:
        policy = DeadlineRetryPolicy()
        self._policies.append(policy)
        options: dict[str, Any] = {
            "retry_policy": policy,
            "custom_hook_policy": DeadlineTimeoutPolicy(),
            "verify_challenge_resource": self.settings.verify_challenge_resource,
            "connection_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        }
        if self.settings.ca_bundle:
            options["connection_verify"] = self.settings.ca_bundle
        if self._transport is not None:
            options["transport"] = self._transport
        return options

    def _key_client(self, vault_url: str) -> KeyClient:
        with self._lock:
            client = self._key_clients.get(vault_url)
            if client is None:
                client = KeyClient(vault_url, self._credential, **self._client_options())
                self._key_clients[vault_url] = client
            return client

    def parse(self, uri: str) -> AzureKeyRef:
        """Parse a reference under this backend's host rule (see :meth:`AzureKeyRef.parse`)."""
        return AzureKeyRef.parse(uri, any_host=not self.settings.verify_challenge_resource)

    # -- KeyBackend -----------------------------------------------------------------

    def resolve(self, uri: str, deadline: float | None = None) -> ResolvedKey:
        """Pin ``uri`` to one key version: the named one, or the current one for a
        versionless reference. Checks the key is enabled, allows ``sign``, is within its
        ``nbf``/``exp`` validity window (KeyAccessDeniedError naming the date otherwise) and
        is RSA or EC on P-256/P-384/P-521."""
        ref = self.parse(uri)
        with self._deadline(deadline):
            try:
                key = self._key_client(ref.vault_url).get_key(ref.name, ref.version)
            except Exception as exc:
                raise self._error(exc, f"reading key {ref.key_url()}", hsm=ref.managed_hsm) from exc
        resolved = self._resolved(uri, ref, key)
        if ref.version is None:
            log.warning(
                "azurekv: %s has no version; pinned to %s until restart. A restart after a new version "
                "appears pins that one: name the versioned URL in production configuration",
                uri,
                resolved.version,
            )
        return resolved

    def _resolved(self, uri: str, ref: AzureKeyRef, key: KeyVaultKey) -> ResolvedKey:
        if not key.id:
            raise BackendUnavailableError(f"the vault returned no key id for {ref.key_url()}")
        version = key.properties.version or ""
        if not version or (ref.version is not None and version != ref.version):
            raise BackendUnavailableError(
                f"asked for {ref.key_url()}, the vault answered with {key.id}: refusing a key of another version"
            )
        kty = str(key.key_type.value if hasattr(key.key_type, "value") else key.key_type)
        key_ops = frozenset(str(getattr(op, "value", op)) for op in (key.key_operations or ()))
        if key.properties.enabled is False:
            raise KeyAccessDeniedError(f"key {key.id} is disabled in the vault")
        if "sign" not in key_ops:
            raise BackendConfigError(f"key {key.id} does not allow the sign operation (key_ops {sorted(key_ops)})")
        not_before, expires_on = key.properties.not_before, key.properties.expires_on
        window = _window_problem(not_before, expires_on)
        if window is not None:  # the vault answers GET for it, but refuses to sign
            raise KeyAccessDeniedError(
                f"key {key.id} {window}: the vault refuses to sign outside a key's nbf/exp window. {VALIDITY_HINT}"
            )
        public_key = _public_key(key)
        with self._lock:  # one client per key version, however often it is resolved
            client = self._crypto_clients.get(key.id)
            if client is None:
                client = CryptographyClient(key, self._credential, **self._client_options())
                self._crypto_clients[key.id] = client
        handle = _Handle(
            ref=ref,
            version=version,
            kid=key.id,
            kty=kty,
            key_ops=key_ops,
            client=client,
            exportable=key.properties.exportable,
            not_before=not_before,
            expires_on=expires_on,
        )
        return ResolvedKey(uri=uri, version=key.id, public_key=public_key, handle=handle)

    def custody_warning(self, key: ResolvedKey) -> str | None:
        """:class:`~.base.CustodyReporter`: what the vault said about the key version at
        resolve. ``exportable = true`` (a key with a release policy: it can be released out
        of the vault) and a software-protected key type (``RSA``/``EC``, not
        ``RSA-HSM``/``EC-HSM``: the private key is not in an HSM) each get a warning, and so
        does a key version whose ``exp`` is less than :data:`VALIDITY_WARNING_DAYS` days away
        (the vault refuses to sign after it; start-up log and ``helseid-signer check``)."""
        handle: _Handle = key.handle
        problems = []
        if handle.expires_on is not None:
            left = handle.expires_on - datetime.now(UTC)
            if left < timedelta(days=VALIDITY_WARNING_DAYS):
                problems.append(
                    f"the key version expires at {_iso(handle.expires_on)} (its exp attribute, "
                    f"{max(0, int(left.total_seconds() // 86400))} day(s) left): the vault will refuse to sign after "
                    "that; create and register the next key now"
                )
        if handle.exportable:
            problems.append("private key is exportable (exportable = true: a release policy can release it)")
        if handle.kty in ("RSA", "EC"):
            problems.append(
                f"software-protected key (kty {handle.kty}, not {handle.kty}-HSM): the private key is not in an HSM"
            )
        return "; ".join(problems) or None

    def check_alg(self, key: ResolvedKey, alg: Algorithm) -> None:
        """Refuse ``alg`` for this key before any call: key family (RSA/RSA-HSM vs EC/EC-HSM),
        curve and size as :func:`check_key_fits`, and ``sign`` among the key's operations.
        Raises AlgorithmError."""
        handle: _Handle = key.handle
        if _KTY_FAMILY.get(handle.kty) is not alg.kty:
            raise AlgorithmError(f"alg {alg.name} needs an {alg.kty.value} key, {handle.kid} is {handle.kty}")
        check_key_fits(alg, key.public_key)
        if "sign" not in handle.key_ops:
            raise AlgorithmError(f"key {handle.kid} does not allow the sign operation")

    def sign(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes, deadline: float | None = None) -> bytes:
        """Sign the digest of ``signing_input`` with the pinned version; JOSE bytes back.

        ``deadline``: ``time.monotonic()`` seconds by which the answer is needed; retries
        (429 after ``Retry-After`` or Microsoft's 1-2-4-8-16 s back-off, 5xx, connection
        errors) stop before it. None: the default budget. Raises BackendThrottledError,
        KeyAccessDeniedError (the vault's 403 reason, or the version's nbf/exp window, named),
        KeyNotFoundError, BackendUnavailableError.
        """
        handle: _Handle = key.handle
        digest = hashlib.new(alg.hash_name, signing_input).digest()
        seen: list[Any] = []

        def keep(_pipeline_response: Any, deserialized: Any, _headers: Any) -> Any:
            seen.append(deserialized)
            return deserialized

        with self._deadline(deadline):
            try:
                result = handle.client.sign(
                    SignatureAlgorithm(alg.name),
                    digest,
                    cls=keep,
                    retry_on_methods=frozenset({"GET", "POST"}),  # signing again is harmless
                )
            except Exception as exc:
                error = self._error(exc, f"signing with {handle.kid}", hsm=handle.ref.managed_hsm, handle=handle)
                if not isinstance(error, BackendThrottledError):
                    self._healthy = False
                raise error from exc
        signed_by = getattr(seen[0], "kid", None) if seen else None
        if signed_by is not None and not _same_key_version(signed_by, handle):
            self._healthy = False
            raise BackendUnavailableError(f"asked {handle.kid} to sign, the vault answered for {signed_by}: refused")
        signature = bytes(result.signature)
        expected = alg.signature_size or (key.public_key.key_size + 7) // 8
        if len(signature) != expected:
            self._healthy = False
            raise BackendUnavailableError(
                f"the vault returned a {len(signature)}-byte {alg.name} signature, {expected} expected"
            )
        self._healthy = True
        return signature

    def health(self) -> bool:
        """False after a failed call (other than throttling) until a signature succeeds."""
        return self._healthy

    def close(self) -> None:
        with self._lock:
            clients = [*self._crypto_clients.values(), *self._key_clients.values()]
            self._crypto_clients.clear()
            self._key_clients.clear()
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("azurekv: closing a client failed", exc_info=True)
        close = getattr(self._credential, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001
                log.debug("azurekv: closing the credential failed", exc_info=True)

    # -- versions -------------------------------------------------------------------

    def drift_message(self, key: ResolvedKey, deadline: float | None = None) -> str | None:
        """:class:`~.base.DriftReporter`: a newer version of the key exists in the vault."""
        newer = self.newer_version(key, deadline)
        return None if newer is None else f"the vault's current version is {newer}; {key.version} keeps signing"

    def newer_version(self, key: ResolvedKey, deadline: float | None = None) -> str | None:
        """The versioned URL of the vault's current version of ``key`` when it is not the
        pinned one (a rotation happened since resolve), else None. Logged once per new
        version as a warning: the new version never signs until configuration names it.
        Raises BackendError subclasses when the vault cannot be asked."""
        handle: _Handle = key.handle
        with self._deadline(deadline):
            try:
                current = self._key_client(handle.ref.vault_url).get_key(handle.ref.name)
            except Exception as exc:
                raise self._error(
                    exc, f"reading the current version of {handle.ref.key_url()}", hsm=handle.ref.managed_hsm
                ) from exc
        current_version = current.properties.version
        if current_version is None or current_version == handle.version:
            return None
        if self._reported_newer.get(handle.kid) != current.id:
            self._reported_newer[handle.kid] = str(current.id)
            log.warning(
                "azurekv: %s has a newer version %s; signing continues with the pinned %s until the "
                "configuration names the new one (HelseID must have it registered first)",
                key.uri,
                current.id,
                handle.kid,
            )
        return str(current.id)

    # -- RegistrationStore ----------------------------------------------------------

    def registration_place(self, key: ResolvedKey, kid: str) -> str:
        """:class:`~.base.RegistrationStore`: the tags' description."""
        return f"Azure Key Vault key {key.version}, tags {REGISTRATION_TAG_PREFIX}*"

    def _tags(self, key: ResolvedKey) -> dict[str, str]:
        handle: _Handle = key.handle
        with self._deadline(None):
            try:
                found = self._key_client(handle.ref.vault_url).get_key(handle.ref.name, handle.version)
            except Exception as exc:
                raise self._error(exc, f"reading the tags of {key.version}", hsm=handle.ref.managed_hsm) from exc
        return dict(found.properties.tags or {})

    def _set_tags(self, key: ResolvedKey, tags: dict[str, str]) -> None:
        handle: _Handle = key.handle
        with self._deadline(None):
            try:
                self._key_client(handle.ref.vault_url).update_key_properties(
                    handle.ref.name, handle.version, tags=tags
                )
            except Exception as exc:
                raise self._error(exc, f"tagging {key.version}", hsm=handle.ref.managed_hsm) from exc

    def read_registration(self, key: ResolvedKey, kid: str) -> str | None:
        """:class:`~.base.RegistrationStore`: the record from the pinned key version's tags
        ``helseid-signer-registration-<field>`` (Get Key: the service's identity needs the
        ``get`` key permission it has anyway), as JSON; None without a ``kid`` tag."""
        tags = self._tags(key)
        prefix = REGISTRATION_TAG_PREFIX
        fields = {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}
        if "kid" not in fields:
            return None
        return json.dumps({f: (fields.get(f) or None) for f in REGISTRATION_FIELDS})

    def write_registration(self, key: ResolvedKey, kid: str, record_json: str) -> str:
        """:class:`~.base.RegistrationStore`: one tag per record field on the pinned version
        (Update Key, the ``update`` key permission - the operator's, not the service's);
        other tags are kept. BackendConfigError when a value is longer than 256 characters."""
        record = json.loads(record_json)
        tags = {k: v for k, v in self._tags(key).items() if not k.startswith(REGISTRATION_TAG_PREFIX)}
        for name in REGISTRATION_FIELDS:
            value = "" if record.get(name) is None else str(record[name])
            if len(value) > MAX_TAG_VALUE:
                raise BackendConfigError(f"registration field {name} is longer than {MAX_TAG_VALUE} characters")
            tags[REGISTRATION_TAG_PREFIX + name] = value
        self._set_tags(key, tags)
        return self.registration_place(key, kid)

    def delete_registration(self, key: ResolvedKey, kid: str) -> None:
        """:class:`~.base.RegistrationStore`: remove the record's tags, keeping the others."""
        tags = self._tags(key)
        kept = {k: v for k, v in tags.items() if not k.startswith(REGISTRATION_TAG_PREFIX)}
        if kept != tags:
            self._set_tags(key, kept)

    # -- KeyCreator -----------------------------------------------------------------

    def create_key(self, uri: str, key_spec: str, alg: Algorithm | None = None) -> ResolvedKey:
        """Create a non-exportable key (key_ops sign and verify only) named by the
        versionless ``uri``. ``key_spec``: RSA-2048/3072/4096 or EC-P256/P384/P521; an HSM
        key type (RSA-HSM/EC-HSM) with ``hsm_keys = true`` or in a Managed HSM. Refuses a
        name that exists (creating again would add a version to that key). ``alg`` is not
        used: key_ops sign/verify already keep the key to signing."""
        if key_spec not in KEY_SPECS:
            raise BackendConfigError(f"key spec {key_spec!r} is not one of {', '.join(KEY_SPECS)}")
        ref = self.parse(uri)
        if ref.version is not None:
            raise BackendConfigError(f"keys create needs a key URL without a version, got {uri!r}")
        kind, _, size = key_spec.partition("-")
        hsm = self.settings.hsm_keys or ref.managed_hsm
        kty = kind + ("-HSM" if hsm else "")
        client = self._key_client(ref.vault_url)
        with self._deadline(None):
            try:
                client.get_key(ref.name)
            except ResourceNotFoundError:
                pass
            except Exception as exc:
                raise self._error(
                    exc, f"checking whether {ref.key_url()} exists", create=True, hsm=ref.managed_hsm
                ) from exc
            else:
                raise BackendConfigError(
                    f"key {ref.key_url()} already exists; creating it again would add a version to it. "
                    "Choose a new name (or rotate it deliberately in Azure)"
                )
        options: dict[str, Any] = {"key_operations": ["sign", "verify"], "exportable": False, "enabled": True}
        if kind == "RSA":
            options["size"] = int(size)
        else:
            options["curve"] = CURVES["P-" + size[1:]].name
        # A throttled create (429: not processed) is retried with Microsoft's back-off within
        # CREATE_BUDGET_S; a 5xx or a timeout is not, since the vault may have made the key
        # and a second POST would add a second version (docs/backends/azure-key-vault.md).
        with self._deadline(time.monotonic() + CREATE_BUDGET_S), _unprocessed_only():
            try:
                key = client.create_key(ref.name, kty, retry_on_methods=frozenset({"GET", "POST"}), **options)
            except Exception as exc:
                raise self._error(exc, f"creating {ref.key_url()}", create=True, hsm=ref.managed_hsm) from exc
        log.info("azurekv: created %s (%s %s)", key.id, kty, key_spec)
        return self._resolved(uri, ref, key)

    # -- helpers --------------------------------------------------------------------

    @staticmethod
    def _deadline(deadline: float | None) -> _DeadlineScope:
        return _DeadlineScope(deadline if deadline is not None else time.monotonic() + DEFAULT_BUDGET_S)

    @property
    def counters(self) -> dict[str, int]:
        """Retries made and 429 answers seen, over all clients of this backend."""
        return {
            "retries": sum(p.retries for p in self._policies),
            "throttled": sum(p.throttled for p in self._policies),
        }

    def _error(
        self, exc: Exception, what: str, *, create: bool = False, hsm: bool = False, handle: _Handle | None = None
    ) -> BackendError:
        """Map an azure-core / azure-identity exception to a typed backend error whose text
        says what the vault answered and what the operator should change.

        A 403 is told apart by the ``innererror.code`` the vault sends (Key Vault REST
        reference, "Azure Key Vault error codes" and the Azure SDK troubleshooting guides):
        ``ForbiddenByRbac``, ``ForbiddenByPolicy`` (access policies), ``ForbiddenByFirewall``,
        ``KeyDisabled``, ``KeyOperationForbidden``; each gets its own hint (:data:`FORBIDDEN_HINTS`).
        When ``handle`` (the signing key version) is outside its ``nbf``/``exp`` window, the
        refusal is named as that whatever code came with it. A 401 means the vault did not
        accept the service's token (another tenant, or an identity that is gone).
        """
        if isinstance(exc, BackendError):
            return exc
        hint = {
            (False, False): ROLE_HINT,
            (True, False): CREATE_ROLE_HINT,
            (False, True): HSM_ROLE_HINT,
            (True, True): HSM_CREATE_ROLE_HINT,
        }[(create, hsm)]
        if isinstance(exc, HttpResponseError) and exc.status_code is not None:
            status = exc.status_code
            detail = _service_message(exc)
            inner = _inner_code(exc)
            if status == 429:
                return BackendThrottledError(f"{what}: the vault is throttling (HTTP 429) past the deadline: {detail}")
            if status == 403:
                window = _window_problem(handle.not_before, handle.expires_on) if handle is not None else None
                if window is not None:
                    return KeyAccessDeniedError(
                        f"{what}: the vault refused (HTTP 403{', ' + inner if inner else ''}): the key version "
                        f"{window}; a vault signs only within a key's nbf/exp window. {VALIDITY_HINT}. "
                        f"Vault said: {detail}"
                    )
                specific = FORBIDDEN_HINTS.get(inner or "")
                if specific is not None:
                    text = specific(create, hsm) if callable(specific) else specific
                    return KeyAccessDeniedError(
                        f"{what}: the vault refused (HTTP 403, {inner}): {text}. Vault said: {detail}"
                    )
                return KeyAccessDeniedError(f"{what}: access denied (HTTP 403): {hint}. Vault said: {detail}")
            if status == 401:
                return KeyAccessDeniedError(
                    f"{what}: the vault did not accept the service's Entra ID token (HTTP 401): check that the "
                    f"identity exists and belongs to the vault's tenant; then {hint}. Vault said: {detail}"
                )
            if status == 404:
                return KeyNotFoundError(f"{what}: no such key (HTTP 404): {detail}")
            if status in (408,) or status >= 500:
                again = (
                    " The key may have been created nonetheless: look for it in the vault before creating it again"
                    if create
                    else ""
                )
                return BackendUnavailableError(f"{what}: the vault answered HTTP {status}: {detail}.{again}")
            return BackendConfigError(f"{what}: the vault refused the request (HTTP {status}): {detail}")
        if isinstance(exc, ClientAuthenticationError):  # no token: no usable identity, or Entra ID refused it
            return KeyAccessDeniedError(f"{what}: could not authenticate to Azure: {exc}; {hint}")
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            again = ""
            if create and isinstance(exc, ServiceResponseError):
                again = ". The key may have been created nonetheless: look for it in the vault before creating it again"
            return BackendUnavailableError(f"{what}: the vault cannot be reached: {type(exc).__name__}: {exc}{again}")
        if isinstance(exc, AzureError):
            return BackendUnavailableError(f"{what}: {type(exc).__name__}: {exc}")
        return BackendUnavailableError(f"{what}: unexpected {type(exc).__name__}: {exc}")


class _unprocessed_only:  # noqa: N801 - used as a context manager
    """Within the block, retries are limited to answers proving the vault did nothing."""

    def __enter__(self) -> None:
        self._token = _UNPROCESSED_ONLY.set(True)

    def __exit__(self, *exc: object) -> None:
        _UNPROCESSED_ONLY.reset(self._token)


class _DeadlineScope:
    """Sets the deadline the retry and timeout policies read, for one call on this thread."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._token: contextvars.Token[float | None] | None = None

    def __enter__(self) -> _DeadlineScope:
        if self.deadline - time.monotonic() < MIN_ATTEMPT_S:
            raise BackendUnavailableError("the caller's deadline has passed before the vault was asked")
        self._token = _DEADLINE.set(self.deadline)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _DEADLINE.reset(self._token)


#: Tag names of a registration record on a key version: this prefix and the record's field name.
REGISTRATION_TAG_PREFIX = "helseid-signer-registration-"
REGISTRATION_FIELDS = ("kid", "client_id", "issuer", "registered_at", "expires_at", "source")
MAX_TAG_VALUE = 256


def _same_key_version(kid: str, handle: _Handle) -> bool:
    """Whether the ``kid`` a reply names is the pinned key version (names compare
    case-insensitively, as the vault treats them; versions exactly)."""
    segments = urlsplit(kid).path.split("/")[1:]
    return (
        len(segments) == 3
        and segments[0] == "keys"
        and segments[1].lower() == handle.ref.name.lower()
        and segments[2] == handle.version
    )


def _inner_code(exc: HttpResponseError) -> str | None:
    """The ``error.innererror.code`` of a Key Vault error body (``ForbiddenByRbac`` ...), or None."""
    model = getattr(exc, "model", None)
    inner = getattr(getattr(model, "error", None), "inner_error", None)
    code = getattr(inner, "code", None)
    if code:
        return str(code)
    response = getattr(exc, "response", None)
    try:
        body = json.loads(response.text()) if response is not None else None
    except Exception:  # noqa: BLE001 - an empty or non-JSON body (Managed HSM 401) has no inner code
        return None
    error = body.get("error") if isinstance(body, dict) else None
    inner = error.get("innererror") if isinstance(error, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return str(code) if code else None


def _window_problem(
    not_before: datetime | None, expires_on: datetime | None, now: datetime | None = None
) -> str | None:
    """Why ``now`` is outside a key's validity window (``nbf``/``exp`` attributes), or None."""
    now = now or datetime.now(UTC)
    if expires_on is not None and now >= expires_on:
        return f"expired at {_iso(expires_on)} (its exp attribute)"
    if not_before is not None and now < not_before:
        return f"is not valid before {_iso(not_before)} (its nbf attribute)"
    return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _service_message(exc: HttpResponseError) -> str:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    message = getattr(error, "message", None)
    if code or message:
        return f"{code}: {message}"
    return str(exc.reason or exc)


def _public_key(key: KeyVaultKey) -> PublicKey:
    """The ``cryptography`` public key of a KeyVaultKey; BackendConfigError for key types
    and curves HelseID does not allow."""
    jwk = key.key
    kty = str(getattr(jwk.kty, "value", jwk.kty))
    family = _KTY_FAMILY.get(kty)
    if family is KeyType.RSA:
        if not jwk.n or not jwk.e:
            raise BackendUnavailableError(f"the vault returned RSA key {key.id} without n or e")
        return rsa.RSAPublicNumbers(int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")).public_key()
    if family is KeyType.EC:
        crv = str(getattr(jwk.crv, "value", jwk.crv))
        curve = CURVES.get(crv)
        if curve is None:
            raise BackendConfigError(f"key {key.id} is on curve {crv}; HelseID allows P-256, P-384 and P-521")
        if not jwk.x or not jwk.y or len(jwk.x) > curve.size or len(jwk.y) > curve.size:
            raise BackendUnavailableError(f"the vault returned malformed EC coordinates for {key.id}")
        try:
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"), curve.crypto()
            )
            return numbers.public_key()
        except ValueError as exc:
            raise BackendUnavailableError(f"the vault returned an invalid EC point for {key.id}: {exc}") from exc
    raise BackendConfigError(f"key {key.id} has type {kty}; a signing key must be RSA, RSA-HSM, EC or EC-HSM")
