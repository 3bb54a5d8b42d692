"""A local stand-in for the Azure Key Vault keys REST API (API version 2025-07-01), for
tests of the ``azurekv`` backend through the real azure-keyvault-keys SDK.

No Key Vault emulator is reachable from these machines, so this module speaks the REST
subset the backend uses, following the Key Vault REST reference (learn.microsoft.com,
``rest/api/keyvault/keys``):

* every request without a valid bearer token gets ``401`` with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://vault.azure.net"`` (the challenge the SDK's ChallengeAuthPolicy answers);
  a token is valid when the stand-in's own credential issued it for ``<resource>/.default``
  and the challenge's tenant;
* ``POST /keys/{name}/create``: a new key, or a NEW VERSION when the name exists (as the
  service does); ``kty`` RSA/RSA-HSM (``key_size`` 2048/3072/4096, default 2048) or
  EC/EC-HSM (``crv`` P-256/P-384/P-521); ``key_ops`` and ``attributes`` kept as given;
  ``exportable: true`` without a release policy is refused, as by the service;
* ``POST /keys/{name}/rotate``: a new version like the current one;
* ``GET /keys/{name}``, ``GET /keys/{name}/`` (latest) and ``GET /keys/{name}/{version}``;
* ``POST /keys/{name}/{version}/sign`` with ``{"alg", "value"}``: ``value`` is a DIGEST
  (its length must be the algorithm's hash length) and is signed as a digest (never hashed
  again), with real keys through ``cryptography``: RS* PKCS#1 v1.5, PS* PSS with MGF1 of the
  same hash and salt = hash length, ES* as raw fixed-width ``R || S`` (what the service
  returns: JOSE form, not DER); the reply's ``kid`` is the versioned key URL that signed;
* errors as ``{"error": {"code", "message", "innererror": {"code"}}}`` as real vaults send
  them: 404 ``KeyNotFound``, 400 ``BadParameter``, 403 ``Forbidden`` with ``innererror.code``
  ``KeyDisabled`` (sign with a disabled key), ``KeyOperationForbidden`` (sign with a key
  whose ``key_ops`` lack ``sign``), and - injected with :meth:`KeyVaultStandIn.deny` -
  ``ForbiddenByRbac``, ``ForbiddenByPolicy`` or ``ForbiddenByFirewall``; 429 ``Throttled``
  WITHOUT ``Retry-After`` unless a test asks for one (captured real 429s carry none);
* ``sign`` outside a key version's ``nbf``/``exp`` window is refused with 403 (GET still
  answers, as real vaults do);
* attributes as real vaults return them (API 2025-07-01): ``key_size`` for RSA keys and
  ``hsmPlatform`` (``"0"`` software, ``"2"`` HSM-protected) in a vault.

Managed HSM mode (``managed_hsm=True``) answers as a Managed HSM does: the 401 challenge
has an EMPTY body and ``resource="https://managedhsm.azure.net"``, only ``RSA-HSM`` and
``EC-HSM`` keys can be made, EC keys made without ``key_ops`` get ``verify``, ``deriveKey``
and ``sign``, sign replies carry ``alg``, and attributes have no ``hsmPlatform``.

Where each of these shapes comes from (recorded real answers, or reconstructed from
documentation) is listed in docs/backends/azure-key-vault.md ("Where the stand-in's answers
come from"). Faults are injected per operation (``throttle``, ``deny``, ``delay``), and two
switches make the stand-in misbehave on purpose, for negative controls:
``sign_latest_instead`` (sign with the newest version whatever the URL says) and
``es_signature_der`` (ES* signatures in DER, as AWS KMS returns them).

A managed-identity token endpoint (the App Service protocol, ``GET
IDENTITY_ENDPOINT?api-version=2019-08-01&resource=...`` with ``X-IDENTITY-HEADER``) runs
beside the vault on plain http, as on App Service: a process started with
:meth:`KeyVaultStandIn.identity_env` authenticates through azure-identity's
DefaultAzureCredential with no test hook at all, so the real ``helseid-signer`` CLI and
server can use the stand-in by configuration alone.

HTTPS only (the SDK refuses plain http): a throw-away CA and a server certificate for
127.0.0.1 are made at start with ``cryptography``; give :attr:`KeyVaultStandIn.ca_path`
to the SDK transport (``connection_verify``). ``disable_nagle_algorithm`` is set on the
handler: without it every response waits ~40 ms for a delayed ACK.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

API_VERSION = "2025-07-01"
VAULT_RESOURCE = "https://vault.azure.net"
MANAGED_HSM_RESOURCE = "https://managedhsm.azure.net"
DEFAULT_TENANT = "00000000-0000-4000-8000-00000000a2e5"

_NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_RSA_SIZES = (2048, 3072, 4096)
_CURVES = {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48), "P-521": (ec.SECP521R1, 66)}
#: alg -> (kind, hash class, digest length, curve for ES*)
_SIGN_ALGS: dict[str, tuple[str, type[hashes.HashAlgorithm], int, str | None]] = {
    "RS256": ("RS", hashes.SHA256, 32, None),
    "RS384": ("RS", hashes.SHA384, 48, None),
    "RS512": ("RS", hashes.SHA512, 64, None),
    "PS256": ("PS", hashes.SHA256, 32, None),
    "PS384": ("PS", hashes.SHA384, 48, None),
    "PS512": ("PS", hashes.SHA512, 64, None),
    "ES256": ("ES", hashes.SHA256, 32, "P-256"),
    "ES384": ("ES", hashes.SHA384, 48, "P-384"),
    "ES512": ("ES", hashes.SHA512, 64, "P-521"),
}
_RSA_DEFAULT_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
_EC_DEFAULT_OPS = ["sign", "verify"]
#: A Managed HSM's default key_ops for EC keys (recorded, API 2025-07-01).
_HSM_EC_DEFAULT_OPS = ["verify", "deriveKey", "sign"]
#: What real vaults say in 403 bodies, by innererror.code (sources: docs/backends/azure-key-vault.md).
_CALLER = (
    "appid=00000000-0000-4000-8000-0000000000c1;oid=00000000-0000-4000-8000-0000000000c2;"
    "iss=https://sts.windows.net/00000000-0000-4000-8000-00000000a2e5/"
)
_DENIALS = {
    "rbac": (
        "ForbiddenByRbac",
        "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role "
        "definitions were changed recently, please observe propagation time.\r\nCaller: {caller}\r\nAction: "
        "'Microsoft.KeyVault/vaults/keys/{action}'\r\nResource: '/subscriptions/00000000-0000-4000-8000-000000000001/"
        "resourcegroups/rg/providers/microsoft.keyvault/vaults/standin/keys/{name}'\r\nAssignment: (not found)\r\n"
        "DenyAssignmentId: null\r\nDecisionReason: 'DeniedWithNoValidRBAC' \r\nVault: standin;location=norwayeast\r\n",
    ),
    "policy": (
        "ForbiddenByPolicy",
        "The user, group or application '{caller}' does not have keys {permission} permission on key vault "
        "'standin;location=norwayeast'. For help resolving this issue, please see "
        "https://go.microsoft.com/fwlink/?linkid=2125287",
    ),
    "firewall": (
        "ForbiddenByFirewall",
        "Client address is not authorized and caller is not a trusted service.\r\nClient address: 203.0.113.7\r\n"
        "Caller: {caller}\r\nVault: standin;location=norwayeast",
    ),
}
_RBAC_ACTIONS = {"sign": "sign/action", "get": "read", "create": "create/action", "rotate": "rotate/action"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(value: int, width: int | None = None) -> bytes:
    return value.to_bytes(width or max(1, (value.bit_length() + 7) // 8), "big")


@dataclass
class KeyVersion:
    """One version of a key in the stand-in (private key included: tests may look)."""

    name: str
    version: str
    kty: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key_ops: list[str]
    attributes: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    crv: str | None = None

    def jwk(self, kid: str) -> dict[str, Any]:
        """The public JsonWebKey as the service returns it (base64url members)."""
        out: dict[str, Any] = {"kid": kid, "kty": self.kty, "key_ops": list(self.key_ops)}
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            nums = public.public_numbers()
            out.update(n=b64url(_uint(nums.n)), e=b64url(_uint(nums.e)))
        else:
            assert self.crv is not None
            width = _CURVES[self.crv][1]
            nums = public.public_numbers()
            out.update(crv=self.crv, x=b64url(_uint(nums.x, width)), y=b64url(_uint(nums.y, width)))
        return out


@dataclass
class Fault:
    """An injected fault: applies to the next ``remaining`` matching requests (None: all)."""

    kind: str  # "throttle" | "deny" | "delay" | "unavailable"
    operations: frozenset[str]
    remaining: int | None
    retry_after: str | None = None
    seconds: float = 0.0
    reason: str = "rbac"


@dataclass(frozen=True)
class RequestRecord:
    """One request as the stand-in saw it."""

    method: str
    path: str
    operation: str
    status: int
    authorized: bool
    body: dict[str, Any] | None
    time: float


class StandInCredential:
    """A TokenCredential for the stand-in: ``get_token`` returns a token the stand-in accepts
    when asked for ``<resource>/.default`` in the stand-in's tenant. Records every request."""

    def __init__(self, standin: KeyVaultStandIn) -> None:
        self._standin = standin
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None, **_: Any) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        token = f"standin.{secrets.token_urlsafe(16)}"
        self._standin._issued[token] = (scopes, tenant_id)
        return AccessToken(token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


class KeyVaultStandIn:
    """An HTTPS Key Vault stand-in on 127.0.0.1. Use as a context manager, or start()/stop().

    Args:
        folder: where the CA and server certificate are written.
        tenant: the tenant the 401 challenge names.
        resource: the challenge's ``resource`` (default ``https://vault.azure.net``, or
            ``https://managedhsm.azure.net`` in Managed HSM mode).
        managed_hsm: answer as a Managed HSM (see the module docstring).
    """

    def __init__(
        self, folder: Path, *, tenant: str = DEFAULT_TENANT, resource: str | None = None, managed_hsm: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.tenant = tenant
        self.managed_hsm = managed_hsm
        self.resource = resource or (MANAGED_HSM_RESOURCE if managed_hsm else VAULT_RESOURCE)
        self.ca_path = self.folder / "standin-ca.pem"
        self._keys: dict[str, list[KeyVersion]] = {}  # lower-case name -> versions, oldest first
        self._issued: dict[str, tuple[tuple[str, ...], str | None]] = {}
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self.log: list[RequestRecord] = []
        self.sign_latest_instead = False
        self.es_signature_der = False  # misbehave: ES* signatures as DER (what the service never does)
        self.last_signature: bytes | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._identity_server: http.server.ThreadingHTTPServer | None = None
        self._identity_secret = secrets.token_urlsafe(16)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> KeyVaultStandIn:
        self.folder.mkdir(parents=True, exist_ok=True)
        context = self._tls_context()
        standin = self

        class Handler(_Handler):
            vault = standin

        server = _QuietServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        threading.Thread(target=server.serve_forever, name="kv-standin", daemon=True).start()

        class IdentityHandler(_IdentityHandler):
            vault = standin

        identity = _QuietServer(("127.0.0.1", 0), IdentityHandler)
        identity.daemon_threads = True
        self._identity_server = identity
        threading.Thread(target=identity.serve_forever, name="kv-standin-identity", daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._identity_server):
            if server is not None:
                server.shutdown()
                server.server_close()
                server.close_connections()
        self._server = self._identity_server = None

    def identity_env(self) -> dict[str, str]:
        """Environment of a process that should get managed-identity tokens from the stand-in
        (``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``, as App Service sets them), plus
        ``AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential`` so DefaultAzureCredential goes
        straight to it."""
        assert self._identity_server is not None, "stand-in not started"
        port = self._identity_server.server_address[1]
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{port}/msi/token",
            "IDENTITY_HEADER": self._identity_secret,
            "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        }

    def __enter__(self) -> KeyVaultStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The vault URL, ``https://127.0.0.1:<port>``."""
        assert self._server is not None, "stand-in not started"
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def credential(self) -> StandInCredential:
        """A credential whose tokens this stand-in accepts."""
        return StandInCredential(self)

    def key_url(self, name: str, version: str | None = None) -> str:
        return f"{self.url}/keys/{name}" + (f"/{version}" if version else "")

    def _tls_context(self) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helseid-signer test CA (Key Vault stand-in)")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        cert_path = self.folder / "standin-server.pem"
        key_path = self.folder / "standin-server.key"
        cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context

    # -- test controls ----------------------------------------------------------------

    def throttle(
        self, count: int | None = 1, *, retry_after: str | None = None, operations: tuple[str, ...] = ("sign",)
    ) -> None:
        """The next ``count`` authorised requests of ``operations`` (None: all from now on) get
        429 ``Throttled``; without ``Retry-After`` as real vaults send it, unless
        ``retry_after`` gives one."""
        self._add(Fault("throttle", frozenset(operations), count, retry_after=retry_after))

    def deny(
        self, count: int | None = None, *, operations: tuple[str, ...] = ("sign",), reason: str = "rbac"
    ) -> None:
        """The next ``count`` authorised requests of ``operations`` get 403 ``Forbidden`` as a
        real vault words it for ``reason``: ``rbac`` (no role assignment, innererror
        ``ForbiddenByRbac``), ``policy`` (access policies without the permission,
        ``ForbiddenByPolicy``) or ``firewall`` (network rules, ``ForbiddenByFirewall``)."""
        if reason not in _DENIALS:
            raise ValueError(f"reason must be one of {sorted(_DENIALS)}")
        self._add(Fault("deny", frozenset(operations), count, reason=reason))

    def unavailable(self, count: int | None = None, *, operations: tuple[str, ...] = ("sign",)) -> None:
        """The next ``count`` authorised requests of ``operations`` get 503
        ``ServiceUnavailable`` (a vault in trouble; azure-core retries 503)."""
        self._add(Fault("unavailable", frozenset(operations), count))

    def delay(self, seconds: float, count: int | None = None, *, operations: tuple[str, ...] = ("sign",)) -> None:
        """Hold the next ``count`` requests of ``operations`` for ``seconds`` before answering."""
        self._add(Fault("delay", frozenset(operations), count, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self.sign_latest_instead = False
            self.es_signature_der = False

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def versions(self, name: str) -> list[KeyVersion]:
        """Every version of ``name``, oldest first (empty if none)."""
        with self._lock:
            return list(self._keys.get(name.lower(), []))

    def set_enabled(self, name: str, version: str, enabled: bool) -> None:
        self.set_attributes(name, version, enabled=enabled)

    def set_attributes(self, name: str, version: str, **attributes: Any) -> None:
        """Change attributes of one key version (``enabled``, ``nbf``, ``exp`` in seconds since
        the epoch; None removes one), as ``PATCH /keys/{name}/{version}`` would."""
        with self._lock:
            for v in self._keys[name.lower()]:
                if v.version == version:
                    for k, value in attributes.items():
                        if value is None:
                            v.attributes.pop(k, None)
                        else:
                            v.attributes[k] = value

    def requests_for(self, operation: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.log if r.operation == operation]

    # -- the service ------------------------------------------------------------------

    def _take_faults(self, operation: str) -> list[Fault]:
        with self._lock:
            hits = []
            for fault in list(self._faults):
                if operation in fault.operations or "*" in fault.operations:
                    hits.append(fault)
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
            return hits

    def _token_ok(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        issued = self._issued.get(authorization[len("Bearer ") :])
        if issued is None:
            return False
        scopes, tenant = issued
        if tenant == "managed-identity":  # managed-identity tokens name no tenant
            return scopes == (self.resource + "/.default",)
        return scopes == (self.resource + "/.default",) and tenant == self.tenant

    def _bundle(self, v: KeyVersion) -> dict[str, Any]:
        kid = self.key_url(v.name, v.version)
        bundle: dict[str, Any] = {"key": v.jwk(kid), "attributes": dict(v.attributes)}
        if v.tags:
            bundle["tags"] = dict(v.tags)
        return bundle

    def _new_version(self, name: str, body: dict[str, Any]) -> KeyVersion:
        kty = body.get("kty")
        if self.managed_hsm and kty in ("RSA", "EC"):
            raise _Error(400, "BadParameter", f"Key type {kty} is not supported by Managed HSM; use {kty}-HSM")
        if kty in ("RSA", "RSA-HSM"):
            size = body.get("key_size", 2048)
            if size not in _RSA_SIZES:
                raise _Error(400, "BadParameter", f"key_size {size!r} is not supported for {kty}")
            exponent = body.get("public_exponent", 65537)
            private: Any = rsa.generate_private_key(exponent, size)
            crv = None
        elif kty in ("EC", "EC-HSM"):
            crv = body.get("crv", "P-256")
            if crv not in _CURVES:
                raise _Error(400, "BadParameter", f"crv {crv!r} is not supported by this stand-in")
            private = ec.generate_private_key(_CURVES[crv][0]())
        else:
            raise _Error(400, "BadParameter", f"kty {kty!r} is not supported by this stand-in")
        attrs_in = dict(body.get("attributes") or {})
        if attrs_in.get("exportable") and not body.get("release_policy"):
            raise _Error(400, "BadParameter", "Exportable keys must have a release policy")
        now = int(time.time())
        attributes: dict[str, Any] = {"enabled": attrs_in.get("enabled", True)}
        for k in ("nbf", "exp"):
            if k in attrs_in:
                attributes[k] = attrs_in[k]
        if crv is None:
            attributes["key_size"] = private.key_size
        attributes.update(
            created=now,
            updated=now,
            recoveryLevel="CustomizedRecoverable+Purgeable",
            recoverableDays=7 if self.managed_hsm else 90,
            exportable=bool(attrs_in.get("exportable", False)),
        )
        if not self.managed_hsm:
            attributes["hsmPlatform"] = "2" if kty.endswith("-HSM") else "0"
        if kty.startswith("RSA"):
            default_ops = _RSA_DEFAULT_OPS
        else:
            default_ops = _HSM_EC_DEFAULT_OPS if self.managed_hsm else _EC_DEFAULT_OPS
        key_ops = body.get("key_ops") or default_ops
        version = KeyVersion(
            name=name,
            version=secrets.token_hex(16),
            kty=kty,
            private_key=private,
            key_ops=list(key_ops),
            attributes=attributes,
            tags=dict(body.get("tags") or {}),
            crv=crv,
        )
        with self._lock:
            existing = self._keys.setdefault(name.lower(), [])
            if existing:
                version.name = existing[0].name  # names are case-insensitive; the first spelling stays
            existing.append(version)
        return version

    def _find(self, name: str, version: str | None) -> KeyVersion:
        with self._lock:
            versions = self._keys.get(name.lower())
            if versions:
                if not version:
                    return versions[-1]
                for v in versions:
                    if v.version == version:
                        return v
        shown = f"{name}/{version}" if version else name
        raise _Error(
            404,
            "KeyNotFound",
            f"A key with (name/id) {shown} was not found in this key vault. If you recently deleted this key you "
            "may be able to recover it using the correct recovery command.",
        )

    def _sign(self, v: KeyVersion, body: dict[str, Any]) -> dict[str, Any]:
        if self.sign_latest_instead:
            v = self._find(v.name, None)
        alg = body.get("alg")
        if alg not in _SIGN_ALGS:
            raise _Error(400, "BadParameter", f"Invalid algorithm {alg!r}")
        kind, hash_cls, digest_len, curve = _SIGN_ALGS[alg]
        try:
            digest = b64url_decode(body.get("value") or "")
        except ValueError:
            raise _Error(400, "BadParameter", "value is not base64url") from None
        if not v.attributes.get("enabled", True):
            raise _Error(403, "Forbidden", "Operation sign is not allowed on a disabled key.", inner="KeyDisabled")
        now = time.time()
        if "exp" in v.attributes and now >= v.attributes["exp"]:
            raise _Error(403, "Forbidden", "Operation sign is not allowed on an expired key.", inner="KeyExpired")
        if "nbf" in v.attributes and now < v.attributes["nbf"]:
            raise _Error(403, "Forbidden", "Operation sign is not allowed on a key that is not yet valid.",
                         inner="KeyNotYetValid")  # fmt: skip
        if "sign" not in v.key_ops:
            raise _Error(
                403, "Forbidden", "Operation sign is not permitted on this key.", inner="KeyOperationForbidden"
            )
        if len(digest) != digest_len:
            raise _Error(400, "BadParameter", f"Invalid digest length {len(digest)} for algorithm {alg}")
        prehashed = utils.Prehashed(hash_cls())
        key = v.private_key
        if kind in ("RS", "PS"):
            if not isinstance(key, rsa.RSAPrivateKey):
                raise _Error(400, "BadParameter", f"Algorithm {alg} is not valid for key type {v.kty}")
            if kind == "RS":
                pad: padding.AsymmetricPadding = padding.PKCS1v15()
            else:
                pad = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=digest_len)
            signature = key.sign(digest, pad, prehashed)
        else:
            if not isinstance(key, ec.EllipticCurvePrivateKey) or v.crv != curve:
                raise _Error(400, "BadParameter", f"Algorithm {alg} is not valid for key {v.kty} {v.crv}")
            der = key.sign(digest, ec.ECDSA(prehashed))
            r, s = utils.decode_dss_signature(der)
            width = _CURVES[curve][1]
            signature = der if self.es_signature_der else _uint(r, width) + _uint(s, width)
        with self._lock:
            self.last_signature = signature
        reply = {"kid": self.key_url(v.name, v.version), "value": b64url(signature)}
        return {"alg": alg, **reply} if self.managed_hsm else reply

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any] | None) -> Any:
        """Route one authorised request; returns the JSON reply or raises _Error."""
        if query.get("api-version") != [API_VERSION]:
            raise _Error(400, "BadParameter", f"api-version must be {API_VERSION}, got {query.get('api-version')}")
        parts = path.split("/")[1:]  # "/keys/a/b" -> ["keys", "a", "b"]
        if len(parts) < 2 or parts[0] != "keys" or not _NAME_RE.match(parts[1]):
            raise _Error(400, "BadParameter", f"unsupported path {path}")
        name, rest = parts[1], parts[2:]
        if method == "POST" and rest == ["create"]:
            return self._bundle(self._new_version(name, _need(body)))
        if method == "POST" and rest == ["rotate"]:
            current = self._find(name, None)
            like: dict[str, Any] = {"kty": current.kty, "key_ops": current.key_ops}
            if current.crv:
                like["crv"] = current.crv
            else:
                like["key_size"] = current.private_key.key_size
            return self._bundle(self._new_version(name, like))
        if method == "GET" and len(rest) <= 1:
            return self._bundle(self._find(name, rest[0] if rest else None))
        if method == "POST" and len(rest) == 2 and rest[1] == "sign":
            return self._sign(self._find(name, rest[0]), _need(body))
        if method == "PATCH" and len(rest) == 1:  # Update Key: tags (replacing all) of one version
            v = self._find(name, rest[0])
            tags = _need(body).get("tags")
            if tags is not None:
                if not isinstance(tags, dict) or len(tags) > 15 or any(
                    not isinstance(t, str) or not isinstance(val, str) or len(t) > 512 or len(val) > 256
                    for t, val in tags.items()
                ):
                    raise _Error(400, "BadParameter", "tags: at most 15, string names and values up to 256")
                v.tags = dict(tags)
            return self._bundle(v)
        raise _Error(400, "BadParameter", f"unsupported operation {method} {path}")


def operation_of(method: str, path: str) -> str:
    """``create``, ``rotate``, ``get``, ``sign`` or ``other`` (what faults are keyed by)."""
    parts = path.split("/")[1:]
    if method == "GET":
        return "get"
    if parts and parts[-1] in ("create", "rotate", "sign"):
        return parts[-1]
    return "other"


def _need(body: dict[str, Any] | None) -> dict[str, Any]:
    if body is None:
        raise _Error(400, "BadParameter", "request body is missing")
    return body


class _Error(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, inner: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.inner = status, code, message, headers or {}, inner


class _QuietServer(http.server.ThreadingHTTPServer):
    """Keeps its open connections so that stopping really stops (a keep-alive connection's
    handler thread would otherwise go on answering); a client that gave up (a deadline test)
    is not an error worth a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[Any] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        import socket

        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    vault: KeyVaultStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every reply waits for a delayed ACK (~40 ms)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        vault = self.vault
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: dict[str, Any] | None = None
        operation = operation_of(method, split.path)
        authorized = vault._token_ok(self.headers.get("Authorization"))
        status, reply, headers = 200, None, {}
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise _Error(400, "BadParameter", "request body is not JSON") from None
            if not authorized:
                raise _Error(
                    401,
                    "Unauthorized",
                    "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token.",
                    {
                        "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/{vault.tenant}", '
                        f'resource="{vault.resource}"'
                    },
                )
            for fault in vault._take_faults(operation):
                if fault.kind == "delay":
                    time.sleep(fault.seconds)
                elif fault.kind == "throttle":
                    raise _Error(
                        429,
                        "Throttled",
                        "Request was not processed because too many requests were received. "
                        "Reason: VaultRequestTypeLimitReached",
                        {"Retry-After": fault.retry_after} if fault.retry_after is not None else {},
                    )
                elif fault.kind == "unavailable":
                    raise _Error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
                elif fault.kind == "deny":
                    inner, text = _DENIALS[fault.reason]
                    parts = split.path.split("/")
                    message = text.format(
                        caller=_CALLER,
                        action=_RBAC_ACTIONS.get(operation, operation),
                        permission=operation,
                        name=parts[2] if len(parts) > 2 else "",
                    )
                    raise _Error(403, "Forbidden", message, inner=inner)
            reply = vault.handle(method, split.path, parse_qs(split.query), body)
        except _Error as err:
            status, headers = err.status, err.headers
            reply = {"error": {"code": err.code, "message": err.message}}
            if err.inner:
                reply["error"]["innererror"] = {"code": err.inner}
        with vault._lock:
            vault.log.append(RequestRecord(method, split.path, operation, status, authorized, body, time.monotonic()))
        # A Managed HSM's 401 challenge has an empty body (recorded); a vault's a JSON error.
        data = b"" if status == 401 and vault.managed_hsm else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
        self.send_header("x-ms-request-id", secrets.token_hex(16))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _IdentityHandler(http.server.BaseHTTPRequestHandler):
    """The App Service managed-identity endpoint (API version 2019-08-01)."""

    vault: KeyVaultStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        vault = self.vault
        query = parse_qs(urlsplit(self.path).query)
        status, reply = 200, {}
        if self.headers.get("X-IDENTITY-HEADER") != vault._identity_secret:
            status, reply = 401, {"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or wrong"}
        elif query.get("api-version") != ["2019-08-01"] or not query.get("resource"):
            status, reply = 400, {"statusCode": 400, "message": "api-version 2019-08-01 and resource are required"}
        else:
            resource = query["resource"][0].removesuffix("/.default").rstrip("/")
            token = f"standin-mi.{secrets.token_urlsafe(16)}"
            vault._issued[token] = ((resource + "/.default",), "managed-identity")
            reply = {
                "access_token": token,
                "expires_on": str(int(time.time()) + 3600),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": "00000000-0000-4000-8000-0000000000c1",
            }
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def running_standin(folder: Path, **kwargs: Any) -> Iterator[KeyVaultStandIn]:
    """A started stand-in for the duration of the ``with`` block."""
    standin = KeyVaultStandIn(folder, **kwargs).start()
    try:
        yield standin
    finally:
        standin.stop()


def rest_call(
    standin: KeyVaultStandIn, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """A raw REST call to the stand-in, without the SDK (challenge answered by hand): lets a
    test check the stand-in itself, independently of the code under test."""
    import http.client

    context = ssl.create_default_context(cafile=str(standin.ca_path))
    port = int(standin.url.rsplit(":", 1)[1])

    def send(headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any]]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = dict(headers, **({"Content-Type": "application/json"} if data else {}))
            conn.request(method, f"{path}?api-version={API_VERSION}", body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")
        finally:
            conn.close()

    status, headers, reply = send({})
    if status == 401:
        challenge = headers.get("WWW-Authenticate", "")
        resource = re.search(r'resource="([^"]+)"', challenge)
        tenant = re.search(r'authorization="[^"]*/([^/"]+)"', challenge)
        assert resource and tenant, challenge
        token = standin.credential().get_token(resource.group(1) + "/.default", tenant_id=tenant.group(1)).token
        status, headers, reply = send({"Authorization": f"Bearer {token}"})
    return status, reply


def digest_of(alg: str, data: bytes) -> bytes:
    """The JOSE digest of ``data`` for ``alg`` (hashlib, independent of the product)."""
    return hashlib.new({"256": "sha256", "384": "sha384", "512": "sha512"}[alg[2:]], data).digest()
