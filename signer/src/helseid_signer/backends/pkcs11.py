"""PKCS#11 backend (python-pkcs11): keys in an HSM, SoftHSM for development and tests.

Key references are RFC 7512 PKCS#11 URIs, e.g.
``pkcs11:token=helseid-dev;object=demo-assertion`` (``id=%01%02`` may name the object by
CKA_ID instead of, or as well as, its label). The token is found by label (or
``serial``), never by slot number: slot ids change when a token is re-initialised.

Mechanisms are always named, with explicit parameters (python-pkcs11's defaults are
SHA-512 mechanisms and SHA-1/20-byte PSS, both wrong for JOSE):

=========  =====================================  ======================================
alg        mechanism                              input
=========  =====================================  ======================================
RS256..512 CKM_SHA{256,384,512}_RSA_PKCS           the whole signing input (hashed in token)
PS256..512 CKM_SHA{256,384,512}_RSA_PKCS_PSS       signing input; params: same hash, MGF1 of
                                                   the same hash, salt = hash length
ES256..512 CKM_ECDSA                               SHA-2 digest of the signing input
=========  =====================================  ======================================

SoftHSM 2.6 has no CKM_ECDSA_SHA*, hence ECDSA over a digest computed here. PKCS#11
returns ECDSA signatures as raw ``R || S``; the width is checked.

Concurrency: python-pkcs11 0.10.1 calls ``C_Initialize(NULL)`` - without
``CKF_OS_LOCKING_OK``, so SoftHSM disables its own locking - and releases the GIL around
every call. Two threads in one module therefore corrupt the heap. This backend holds
ONE lock per module around every Cryptoki call (and uses one logged-in session per
token, which the lock also serialises: a session runs one operation at a time).
Several cores are used by running several worker processes, each with its own
Cryptoki instance initialised after the fork (see ``server.py``). Chosen because it is
the simplest arrangement that is safe for every module, not only SoftHSM; a per-process
sign rate of ~1,500 RSA-2048 signatures/s is far above what a HelseID client needs.

Login state belongs to the token: the session is never logged out or closed while the
process serves (``Session.close`` would log out every session of the token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import unquote, unquote_to_bytes

import pkcs11
from asn1crypto.core import ObjectIdentifier, OctetString
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.attributes import AttributeMapper
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_named_curve_parameters
from pydantic import Field, model_validator

from .. import metrics
from ..algorithms import ALGORITHMS, CURVES, CURVES_BY_OID, Algorithm, AlgorithmError, Padding, PublicKey
from ..settings_types import BackendSettings, Bool, ConfigPath
from .base import (
    KEY_SPECS,
    BackendConfigError,
    BackendError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeyReplacedError,
    ResolvedKey,
    WatchedExecutor,
)

_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
MAX_ATTRIBUTE_LENGTH = 512  # characters of one (encoded) URI attribute value

_RSA_MECHANISMS = {
    ("sha256", Padding.PKCS1V15): Mechanism.SHA256_RSA_PKCS,
    ("sha384", Padding.PKCS1V15): Mechanism.SHA384_RSA_PKCS,
    ("sha512", Padding.PKCS1V15): Mechanism.SHA512_RSA_PKCS,
    ("sha256", Padding.PSS): Mechanism.SHA256_RSA_PKCS_PSS,
    ("sha384", Padding.PSS): Mechanism.SHA384_RSA_PKCS_PSS,
    ("sha512", Padding.PSS): Mechanism.SHA512_RSA_PKCS_PSS,
}
_PSS_PARAMS = {
    "sha256": (Mechanism.SHA256, MGF.SHA256, 32),
    "sha384": (Mechanism.SHA384, MGF.SHA384, 48),
    "sha512": (Mechanism.SHA512, MGF.SHA512, 64),
}
_ULONG = struct.Struct("L")  # CK_ULONG in the platform's C layout (what Cryptoki reads)
#: python-pkcs11 has no handler for CKA_ALLOWED_MECHANISMS (an array of CK_MECHANISM_TYPE).
_MAPPER = AttributeMapper()
_MAPPER.register_handler(
    Attribute.ALLOWED_MECHANISMS,
    lambda mechanisms: b"".join(_ULONG.pack(int(m)) for m in mechanisms),
    lambda value: tuple(m for (m,) in _ULONG.iter_unpack(value)),
)


def signing_mechanisms(key_type: str, alg: Algorithm | None = None) -> tuple[int, ...]:
    """The mechanisms this backend signs with (``_mechanism_input``): CKM_ECDSA for an EC
    key; for RSA the one hash-in-token mechanism of ``alg`` (CKM_SHA*_RSA_PKCS[_PSS]), or
    all six when no ``alg`` is given. Never a raw one (CKM_RSA_X_509, CKM_RSA_PKCS)."""
    if key_type == "EC":
        return (int(Mechanism.ECDSA),)
    if alg is not None:
        return (int(_RSA_MECHANISMS[(alg.hash_name, alg.padding)]),)
    return tuple(int(m) for m in _RSA_MECHANISMS.values())


log = logging.getLogger("helseid_signer.backends.pkcs11")
_CURVE_NAMES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}

#: One lock per loaded module path, shared by every backend object of this process.
_MODULE_LOCKS: dict[str, threading.RLock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module_path: str) -> threading.RLock:
    """The process-wide lock that serialises every Cryptoki call into ``module_path``."""
    with _MODULE_LOCKS_GUARD:
        return _MODULE_LOCKS.setdefault(module_path, threading.RLock())


#: One signing thread per loaded module path (see :meth:`Pkcs11Backend.sign_executor`).
_MODULE_EXECUTORS: dict[str, WatchedExecutor] = {}


def module_executor(module_path: str) -> WatchedExecutor:
    """The process-wide single thread that the service hands signatures in ``module_path`` to
    (and the health probe): it tells how long its running Cryptoki call has run."""
    with _MODULE_LOCKS_GUARD:
        if module_path not in _MODULE_EXECUTORS:
            _MODULE_EXECUTORS[module_path] = WatchedExecutor(max_workers=1, thread_name_prefix="pkcs11-sign")
        return _MODULE_EXECUTORS[module_path]


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 PKCS#11 URI this backend uses.

    ``object_id`` is the raw CKA_ID bytes (``id=%01%a2``); ``pin_source`` a ``file:`` path
    from the ``pin-source`` query attribute. ``pin-value`` is refused: PINs come only from
    an environment variable or a file, never from configuration text.
    """

    token: str | None
    serial: str | None
    object_label: str | None
    object_id: bytes | None
    module_path: str | None
    pin_source: str | None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """Parse ``uri``; BackendConfigError naming the problem if it is not usable."""
        if not uri.startswith("pkcs11:"):
            raise BackendConfigError(f"{uri!r} is not a PKCS#11 URI (RFC 7512)")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        if _BAD_PCT.search(uri):
            raise BackendConfigError(f"PKCS#11 URI {uri[:80]!r} has an invalid percent-encoding")
        attrs: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq:
                raise BackendConfigError(f"PKCS#11 URI attribute {part!r} has no value")
            if name in attrs:
                raise BackendConfigError(f"PKCS#11 URI attribute {name!r} appears twice (RFC 7512 section 2.3)")
            if len(value) > MAX_ATTRIBUTE_LENGTH or (name != "id" and "%00" in value):
                raise BackendConfigError(f"PKCS#11 URI attribute {name!r} is too long or holds a NUL byte")
            attrs[name] = value
        qattrs: dict[str, str] = {}
        for part in filter(None, query.split("&")):
            name, eq, value = part.partition("=")
            qattrs[name] = value
        if "pin-value" in qattrs:
            raise BackendConfigError(
                "PKCS#11 URI: pin-value is refused; give the PIN by pin_env, pin_file or pin-source=file:"
            )
        if "slot-id" in attrs:
            raise BackendConfigError("PKCS#11 URI: slot-id is refused; name the token by token= (label) or serial=")
        unknown = set(attrs) - {"token", "serial", "object", "id", "type", "manufacturer", "model"}
        if unknown:
            raise BackendConfigError(f"PKCS#11 URI: unsupported attribute(s) {sorted(unknown)}")
        if attrs.get("type", "private") != "private":
            raise BackendConfigError("PKCS#11 URI: type must be 'private' (or omitted)")
        if "token" not in attrs and "serial" not in attrs:
            raise BackendConfigError(f"PKCS#11 URI {uri!r} names no token (token= or serial=)")
        if "object" not in attrs and "id" not in attrs:
            raise BackendConfigError(f"PKCS#11 URI {uri!r} names no key (object= or id=)")
        pin_source = qattrs.get("pin-source")
        if pin_source is not None:
            pin_source = unquote(pin_source)
            if not pin_source.startswith("file:"):
                raise BackendConfigError("PKCS#11 URI: pin-source must be a file: URI")
            pin_source = pin_source[len("file:") :]
        return cls(
            token=unquote(attrs["token"]) if "token" in attrs else None,
            serial=unquote(attrs["serial"]) if "serial" in attrs else None,
            object_label=unquote(attrs["object"]) if "object" in attrs else None,
            object_id=unquote_to_bytes(attrs["id"]) if "id" in attrs else None,
            module_path=unquote(qattrs["module-path"]) if "module-path" in qattrs else None,
            pin_source=pin_source,
        )

    def object_template(self, object_class: ObjectClass) -> dict[Attribute, Any]:
        """A C_FindObjects template for this URI's key of ``object_class``."""
        template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
        if self.object_label is not None:
            template[Attribute.LABEL] = self.object_label
        if self.object_id is not None:
            template[Attribute.ID] = self.object_id
        return template


def ec_point_from_attribute(value: bytes, size: int) -> bytes:
    """The uncompressed EC point from CKA_EC_POINT.

    Most tokens give a DER OCTET STRING around the point (long-form length for P-521);
    some give the bare point. A bare uncompressed point is exactly ``1 + 2*size`` bytes
    starting with 0x04; anything else is parsed as DER. ValueError if neither fits.
    """
    if len(value) == 1 + 2 * size and value[0] == 0x04:
        return value
    point = OctetString.load(value, strict=True).native  # strict: no trailing bytes
    if len(point) != 1 + 2 * size or point[0] != 0x04:
        raise ValueError("CKA_EC_POINT is neither a bare nor a DER-wrapped uncompressed point")
    return point


def _attr_bytes(obj: Any, attribute: Attribute) -> bytes:
    value = obj[attribute]
    return bytes(value) if not isinstance(value, bytes) else value


RECOVERY_INTERVAL = 0.5  # seconds between attempts to re-initialise Cryptoki
CALL_TIMEOUT = 2.0  # seconds one Cryptoki call may run before the backend counts as hung
PKCS11_SIGN_ALLOWANCE = 0.1  # seconds a recovery and a signature take at most, for deadline checks
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def probe_algorithm(public_key: PublicKey, allowed: tuple[int, ...] | None = None) -> Algorithm:
    """An algorithm the key can sign with: ES* by curve; for RSA RS256, or the first RSA
    algorithm whose mechanism the key's CKA_ALLOWED_MECHANISMS lists."""
    if isinstance(public_key, rsa.RSAPublicKey):
        for alg in ALGORITHMS.values():
            if alg.kty.value == "RSA" and allowed and signing_mechanisms("RSA", alg)[0] in allowed:
                return alg
        return ALGORITHMS["RS256"]
    return next(a for a in ALGORITHMS.values() if a.curve and isinstance(public_key.curve, a.curve.crypto))


_CUSTODY_RULES = (
    ("extractable", True, "is extractable (CKA_EXTRACTABLE true)"),
    ("sensitive", False, "is not sensitive (CKA_SENSITIVE false)"),
    ("never_extractable", False, "was extractable at some time (CKA_NEVER_EXTRACTABLE false: imported or exported)"),
    ("always_sensitive", False, "was not always sensitive (CKA_ALWAYS_SENSITIVE false)"),
    ("sign_recover", True, "signs with recovery (CKA_SIGN_RECOVER true: raw RSA with the PIN)"),
    ("decrypt", True, "decrypts (CKA_DECRYPT true)"),
    ("unwrap", True, "unwraps (CKA_UNWRAP true)"),
    ("derive", True, "derives (CKA_DERIVE true)"),
    ("modifiable", True, "is modifiable (CKA_MODIFIABLE true: its attributes can be loosened)"),
    ("copyable", True, "is copyable (CKA_COPYABLE true: C_CopyObject can make a looser copy)"),
)
_CUSTODY_ATTRIBUTES = {
    "extractable": Attribute.EXTRACTABLE,
    "sensitive": Attribute.SENSITIVE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "sign_recover": Attribute.SIGN_RECOVER,
    "decrypt": Attribute.DECRYPT,
    "unwrap": Attribute.UNWRAP,
    "derive": Attribute.DERIVE,
    "modifiable": Attribute.MODIFIABLE,
    "copyable": Attribute.COPYABLE,
}


def _allowed_mechanisms(private: Any) -> tuple[int, ...] | None:
    """The private key's CKA_ALLOWED_MECHANISMS; None when the token does not report it,
    () when the list is empty (PKCS#11 3.0 section 4.7: empty means any mechanism)."""
    try:
        return tuple(private[Attribute.ALLOWED_MECHANISMS])
    except (PKCS11Error, KeyError, NotImplementedError, struct.error):
        return None


def _mechanism_name(mechanism: int) -> str:
    try:
        return "CKM_" + Mechanism(mechanism).name
    except ValueError:  # a vendor mechanism python-pkcs11 has no name for
        return hex(mechanism)


def _mechanism_warning(key_type: str, allowed: tuple[int, ...] | None) -> str | None:
    """Why the key's CKA_ALLOWED_MECHANISMS does not restrict it to signing mechanisms."""
    if not allowed:
        return "has no CKA_ALLOWED_MECHANISMS (any mechanism the token offers, raw RSA included, with the PIN)"
    extra = sorted(set(allowed) - set(signing_mechanisms(key_type)))
    if extra:
        names = ", ".join(_mechanism_name(m) for m in extra)
        return f"allows mechanisms the signer never uses (CKA_ALLOWED_MECHANISMS: {names})"
    return None


def _custody_flags(private: Any) -> dict[str, bool | None]:
    """The private key object's custody attributes (``_CUSTODY_ATTRIBUTES``: extractable,
    sensitive, ..., sign-recover, modifiable, copyable); None for one the token does not report."""
    flags: dict[str, bool | None] = {}
    for name, attribute in _CUSTODY_ATTRIBUTES.items():
        try:
            flags[name] = bool(private[attribute])
        except (PKCS11Error, KeyError, NotImplementedError):
            flags[name] = None
    return flags


def _key_version(session: Any, private: Any) -> str:
    """``serial=<token serial>;id=<CKA_ID hex>``: the exact key version (audit ``key_version``)."""
    serial = session.token.serial
    serial = serial.decode() if isinstance(serial, bytes) else serial
    return f"serial={serial.strip()};id={_attr_bytes(private, Attribute.ID).hex()}"


class _Stale(Exception):
    """A key handle lost in an earlier failure: recover before signing."""


def _mechanism_input(alg: Algorithm, signing_input: bytes) -> tuple[bytes, Any, Any]:
    """What C_Sign gets for ``alg``: (data, mechanism, mechanism parameter). ECDSA signs the
    digest (CKM_ECDSA), RSA the input itself (CKM_SHA*_RSA_PKCS[_PSS] hash inside)."""
    if alg.padding is Padding.NONE:
        return hashlib.new(alg.hash_name, signing_input).digest(), Mechanism.ECDSA, None
    param = _PSS_PARAMS[alg.hash_name] if alg.padding is Padding.PSS else None
    return signing_input, _RSA_MECHANISMS[(alg.hash_name, alg.padding)], param


def _check_signature_size(alg: Algorithm, signature: bytes) -> None:
    if alg.signature_size is not None and len(signature) != alg.signature_size:
        raise BackendUnavailableError(
            f"token returned a {len(signature)}-byte ECDSA signature, {alg.signature_size} expected"
        )


#: ``CKA_APPLICATION`` of the data objects that hold registration records (RegistrationStore).
REGISTRATION_APPLICATION = "helseid-signer registration"
MAX_REGISTRATION_BYTES = 2048


def _registered_at(text: str) -> str:
    try:
        value = json.loads(text).get("registered_at")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


@dataclass
class _KeyHandle:
    """What ``ResolvedKey.handle`` holds: the key's URI, its pinned public key, and the
    current private-key object (replaced after recovery; None while unavailable)."""

    uri: str
    parsed: Pkcs11Uri
    public_key: PublicKey
    private: Any
    error: str | None = None
    custody: dict[str, bool | None] = field(default_factory=dict)
    allowed_mechanisms: tuple[int, ...] | None = None  # CKA_ALLOWED_MECHANISMS as read at resolve
    version: str = ""  # serial=<token serial>;id=<CKA_ID hex> of the object that signs now
    replaced: bool = False  # the object now holds another public key (only the probe re-checks)


#: Logged at start-up and reported by ``check`` when ``sign_on_event_loop`` is on.
SIGN_ON_EVENT_LOOP_WARNING = (
    "backends.pkcs11.sign_on_event_loop: on; while a Cryptoki call runs this worker answers nothing else "
    "(health checks included) - a network HSM, a hung token or a SoftHSM token store locked by another "
    "process stalls it (docs/security.md, 'Where signatures run')"
)


class Pkcs11Settings(BackendSettings):
    """``[backends.pkcs11]``: the PKCS#11 module and where its user PIN comes from."""

    module: str
    pin_env: str | None = None
    pin_file: ConfigPath | None = None
    #: Sign on the worker's event loop when the module is idle (docs/configuration.md):
    #: faster for modules that compute in the process, a stall risk for network HSMs.
    sign_on_event_loop: Bool = False
    #: Seconds one Cryptoki call may run before the backend counts as hung (health
    #: NOT_SERVING, waiting requests UNAVAILABLE, reload refused; docs/configuration.md).
    call_timeout: Annotated[float, Field(ge=0.1, le=300)] = CALL_TIMEOUT

    @model_validator(mode="after")
    def _one_pin_source(self) -> Pkcs11Settings:
        if not self.pin_env and not self.pin_file:
            raise ValueError("set pin_env (an environment variable name) or pin_file (a path)")
        return self

    def warnings(self) -> tuple[str, ...]:
        """:data:`SIGN_ON_EVENT_LOOP_WARNING` when ``sign_on_event_loop`` is on."""
        return (SIGN_ON_EVENT_LOOP_WARNING,) if self.sign_on_event_loop else ()


class Pkcs11Backend:
    """Keys in a PKCS#11 token. See the module docstring for mechanisms and locking.

    Args:
        module: path of the PKCS#11 module (``/usr/lib/softhsm/libsofthsm2.so``).
        pin_env: name of an environment variable holding the user PIN, or None.
        pin_file: path of a file holding the user PIN (trailing newline stripped), or None.
        sign_on_event_loop: let the service call :meth:`sign_now` on its event loop instead
            of handing each signature to the module's signing thread (``[backends.pkcs11]
            sign_on_event_loop``; only for modules that compute in the process on a store no
            other process locks, see docs/configuration.md).
        call_timeout: seconds one call may run on the signing thread before the backend
            counts as hung (:class:`~.base.OwnSigningThread`).

    Raises BackendConfigError when neither PIN source is usable.
    """

    scheme: ClassVar[str] = "pkcs11"
    Settings: ClassVar[type[BackendSettings]] = Pkcs11Settings

    def __init__(
        self,
        module: str,
        pin_env: str | None = None,
        pin_file: str | None = None,
        sign_on_event_loop: bool = False,
        call_timeout: float = 2.0,
    ) -> None:
        # One Cryptoki instance and one lock per module FILE: a symlink and its target
        # (/usr/lib/softhsm/libsofthsm2.so -> .../x86_64-linux-gnu/...) are the same module.
        self.module_path = os.path.realpath(module)
        self._pin_env = pin_env
        self._pin_file = pin_file
        self.sign_on_event_loop = sign_on_event_loop
        self.call_timeout = call_timeout
        self._lock = module_lock(self.module_path)
        self._lib: Any = None
        self._sessions: dict[tuple[str | None, str | None], Any] = {}
        self._handles: list[_KeyHandle] = []
        self._healthy = True
        self._last_recovery = 0.0
        self._last_rescan = 0.0

    @property
    def sign_executor(self) -> WatchedExecutor:
        """Where the service runs this backend's signatures: ONE thread per module. Every call
        is serialised by the module lock anyway; one thread taking them in turn spares the
        GIL and lock hand-offs of several threads queueing on that lock (server CPU per
        signed request -6 to -19 %, see docs/performance.md)."""
        return module_executor(self.module_path)

    # -- Cryptoki state -------------------------------------------------------------

    def _library(self) -> Any:
        if self._lib is None:
            if not Path(self.module_path).exists():
                raise BackendConfigError(f"PKCS#11 module {self.module_path!r} does not exist")
            try:
                self._lib = pkcs11.lib(self.module_path)
            except PKCS11Error as exc:  # not a PKCS#11 module, or C_Initialize failed
                raise BackendConfigError(f"cannot load PKCS#11 module {self.module_path!r}: {exc}") from exc
        return self._lib

    def _read_pin(self, uri: Pkcs11Uri) -> str:
        path = uri.pin_source or self._pin_file
        if path:
            try:
                return Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise BackendConfigError(f"cannot read the PKCS#11 PIN file {path!r}: {exc.strerror}") from None
        if self._pin_env:
            pin = os.environ.get(self._pin_env)
            if pin:
                return pin
            raise BackendConfigError(f"environment variable {self._pin_env} (the PKCS#11 PIN) is not set")
        raise BackendConfigError("no PKCS#11 PIN source: set pin_env or pin_file for the pkcs11 backend")

    def _session(self, uri: Pkcs11Uri, rescan: bool = True) -> Any:
        """The logged-in session of the token ``uri`` names (caller holds the lock).

        Cryptoki lists tokens at ``C_Initialize``: a token created since then - or missed
        because another process was writing the token store at that moment - is only seen
        after re-initialising. So when the token is missing and ``rescan`` allows, Cryptoki is
        re-initialised once (at most every RECOVERY_INTERVAL) and the token looked up again;
        sessions and handles of other keys go stale and recover on their next use.
        """
        key = (uri.token, uri.serial)
        session = self._sessions.get(key)
        if session is None:
            lib = self._library()
            try:
                # python-pkcs11 compares the serial as bytes (Token.serial); a str never matches
                serial = uri.serial.encode() if uri.serial is not None else None
                token = lib.get_token(token_label=uri.token, token_serial=serial)
            except pkcs11.NoSuchToken:
                if rescan and time.monotonic() - self._last_rescan >= RECOVERY_INTERVAL:
                    self._last_rescan = time.monotonic()
                    self._sessions.clear()
                    lib.reinitialize()
                    return self._session(uri, rescan=False)
                which = f"label {uri.token!r}" if uri.serial is None else f"serial {uri.serial!r}"
                hint = " (SoftHSM: is SOFTHSM2_CONF set to the token store's configuration?)" if (
                    "softhsm" in self.module_path.lower()) else ""  # fmt: skip
                raise KeyNotFoundError(f"no PKCS#11 token with {which}{hint}") from None
            except pkcs11.MultipleTokensReturned:
                raise BackendConfigError(
                    f"several PKCS#11 tokens match label {uri.token!r}; add serial= to the URI"
                ) from None
            pin = self._read_pin(uri)
            try:
                session = token.open(user_pin=pin, rw=True, attribute_mapper=_MAPPER)
            except pkcs11.PinIncorrect:
                raise BackendConfigError(f"the PKCS#11 PIN for token {uri.token!r} is incorrect") from None
            except pkcs11.UserAlreadyLoggedIn:  # login state is per token: fine
                session = token.open(rw=True, attribute_mapper=_MAPPER)
            self._sessions[key] = session
            metrics.PKCS11_SESSIONS.labels(self.module_path).set(len(self._sessions))
        return session

    # -- KeyBackend -----------------------------------------------------------------

    def resolve(self, uri: str) -> ResolvedKey:
        """Find the private key and its public key object; pin them by token serial and CKA_ID."""
        parsed = Pkcs11Uri.parse(uri)
        self._check_module(parsed)
        with self._lock:
            try:
                session = self._session(parsed)
                private = self._find_one(session, parsed, ObjectClass.PRIVATE_KEY, uri)
                public = self._find_one(session, parsed, ObjectClass.PUBLIC_KEY, uri)
                public_key = self._public_key(public)
                custody = _custody_flags(private)
                allowed = _allowed_mechanisms(private)
                version = _key_version(session, private)
            except PKCS11Error as exc:
                raise BackendUnavailableError(f"PKCS#11 error resolving {uri!r}: {type(exc).__name__}") from exc
        handle = _KeyHandle(
            uri, parsed, public_key, private, custody=custody, allowed_mechanisms=allowed, version=version
        )
        with self._lock:
            self._handles.append(handle)
        return ResolvedKey(uri=uri, version=version, public_key=public_key, handle=handle)

    def custody_warning(self, key: ResolvedKey) -> str | None:
        """:class:`~.base.CustodyReporter`: the private key object's flags as read at resolve."""
        flags = key.handle.custody
        problems = [text for attribute, bad, text in _CUSTODY_RULES if flags.get(attribute) is bad]
        key_type = "RSA" if isinstance(key.public_key, rsa.RSAPublicKey) else "EC"
        mechanisms = _mechanism_warning(key_type, key.handle.allowed_mechanisms)
        if mechanisms:
            problems.append(mechanisms)
        return None if not problems else "private key " + "; ".join(problems)

    def current_version(self, key: ResolvedKey) -> str:
        """:class:`~.base.VersionTracker`: the token serial and CKA_ID of the object that
        signs now - after a token was re-created with the same key, the new token's serial."""
        return key.handle.version or key.version

    def check_alg(self, key: ResolvedKey, alg: Algorithm) -> None:
        """:class:`~.base.AlgChecker`: a key restricted by CKA_ALLOWED_MECHANISMS must allow
        ``alg``'s mechanism (read at resolve; no Cryptoki call). Raises AlgorithmError."""
        allowed = key.handle.allowed_mechanisms
        if not allowed or alg.kty.value not in ("RSA", "EC"):
            return
        mechanism = signing_mechanisms(alg.kty.value, alg)[0]
        if mechanism not in allowed:
            raise AlgorithmError(
                f"alg {alg.name} signs with {_mechanism_name(mechanism)}, which the key's CKA_ALLOWED_MECHANISMS "
                "does not list"
            )

    def _check_module(self, parsed: Pkcs11Uri) -> None:
        if parsed.module_path and os.path.realpath(parsed.module_path) != self.module_path:
            raise BackendConfigError(
                f"PKCS#11 URI names module {parsed.module_path!r}, the backend is configured with {self.module_path!r}"
            )

    @staticmethod
    def _find_one(session: Any, parsed: Pkcs11Uri, object_class: ObjectClass, uri: str) -> Any:
        found = list(session.get_objects(parsed.object_template(object_class)))
        kind = "private" if object_class == ObjectClass.PRIVATE_KEY else "public"
        if not found:
            raise KeyNotFoundError(f"no {kind} key object for {uri!r}")
        if len(found) > 1:
            raise BackendConfigError(f"{len(found)} {kind} key objects match {uri!r}; add id= to the URI")
        return found[0]

    @staticmethod
    def _public_key(public: Any) -> PublicKey:
        key_type = public[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            n = int.from_bytes(_attr_bytes(public, Attribute.MODULUS), "big")  # leading zeros vanish
            e = int.from_bytes(_attr_bytes(public, Attribute.PUBLIC_EXPONENT), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if key_type == KeyType.EC:
            oid = ObjectIdentifier.load(_attr_bytes(public, Attribute.EC_PARAMS)).dotted
            curve = CURVES_BY_OID.get(oid)
            if curve is None:
                raise BackendConfigError(f"EC key on curve {oid} is not P-256, P-384 or P-521")
            point = ec_point_from_attribute(_attr_bytes(public, Attribute.EC_POINT), curve.size)
            return ec.EllipticCurvePublicKey.from_encoded_point(curve.crypto(), point)
        raise BackendConfigError(f"key type {key_type!r} is neither RSA nor EC")

    def sign(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes, deadline: float | None = None) -> bytes:
        """Sign with the mechanism table above; BackendUnavailableError on any Cryptoki error,
        KeyReplacedError when the key's object now holds another public key.

        ``deadline`` bounds the wait for a recovery attempt; a Cryptoki call itself cannot be
        cancelled."""
        return self._sign(key, alg, signing_input, deadline, probing=False)

    def _sign(
        self, key: ResolvedKey, alg: Algorithm, signing_input: bytes, deadline: float | None, probing: bool
    ) -> bytes:
        data, mechanism, param = _mechanism_input(alg, signing_input)
        handle: _KeyHandle = key.handle
        if handle.replaced and not probing:
            # A replaced key stays replaced until an operator acts: answer at once instead of
            # re-initialising Cryptoki for every request. The health probe keeps looking.
            raise KeyReplacedError(handle.error or f"the key at {handle.uri!r} has changed")
        with self._lock:
            try:
                if handle.private is None:
                    raise _Stale
                signature = handle.private.sign(data, mechanism=mechanism, mechanism_param=param)
            except (PKCS11Error, _Stale) as first:
                # A re-initialised token, a restarted HSM or a device error leaves stale
                # sessions and handles (bug-kinds 22): re-initialise Cryptoki, find the key
                # again by its URI, and sign once more - only with the SAME public key.
                self._healthy = False
                if not self._recover(deadline):
                    if handle.replaced:
                        raise KeyReplacedError(handle.error or f"the key at {handle.uri!r} has changed") from None
                    raise BackendUnavailableError(f"PKCS#11 sign failed and recovery failed: {handle.error}") from None
                try:
                    if handle.private is None:
                        raise BackendUnavailableError(f"PKCS#11 key unavailable after recovery: {handle.error}")
                    signature = handle.private.sign(data, mechanism=mechanism, mechanism_param=param)
                except PKCS11Error as exc:
                    raise BackendUnavailableError(f"PKCS#11 sign failed: {type(exc).__name__}") from exc
                log.warning("PKCS#11 backend recovered after %s", type(first).__name__)
            self._healthy = True
        _check_signature_size(alg, signature)
        return bytes(signature)

    def sign_now(self, key: ResolvedKey, alg: Algorithm, signing_input: bytes) -> bytes | None:
        """Sign at once if that cannot wait on anything; None when it might, and the caller
        should use :meth:`sign` on the signing thread instead.

        "Might wait" means: the module lock is held (another signature, the health probe, a
        recovery), the backend is recovering, or the key is unavailable. A Cryptoki error
        also gives None (the signing thread's :meth:`sign` then recovers and retries), so
        this never runs recovery - which can take seconds - on the caller's thread. What it
        cannot bound is a Cryptoki call that itself blocks - a network HSM, a hung token,
        SoftHSM waiting for a file lock another process holds on its token store: hence opt-in.
        """
        handle: _KeyHandle = key.handle
        if not self._healthy or handle.private is None or not self._lock.acquire(blocking=False):
            return None
        try:
            if handle.private is None:
                return None
            data, mechanism, param = _mechanism_input(alg, signing_input)
            signature = handle.private.sign(data, mechanism=mechanism, mechanism_param=param)
        except PKCS11Error:
            return None
        finally:
            self._lock.release()
        _check_signature_size(alg, signature)
        return bytes(signature)

    def _recover(self, deadline: float | None = None) -> bool:
        """Re-initialise Cryptoki and re-find every resolved key (caller holds the lock).

        At most one attempt per RECOVERY_INTERVAL: a request that comes sooner after an
        attempt (its own, another request's or the health probe's) waits for the next one
        when its ``deadline`` allows, else it fails without touching the module. False when
        the attempt failed or was skipped. A key whose object now holds a DIFFERENT public
        key is not used again (its handle stays empty): a request must never get a signature
        from a key other than the one its kid names.
        """
        due = self._last_recovery + RECOVERY_INTERVAL
        now = time.monotonic()
        if now < due:
            if deadline is None or deadline - PKCS11_SIGN_ALLOWANCE < due:
                return False
            time.sleep(due - now)
        self._last_recovery = time.monotonic()
        self._sessions.clear()
        try:
            if self._lib is not None:
                self._lib.reinitialize()  # C_Finalize + C_Initialize: drops every stale session and handle
        except PKCS11Error as exc:
            for handle in self._handles:
                handle.private, handle.error = None, f"C_Initialize failed: {type(exc).__name__}"
            return False
        recovered = True
        for handle in self._handles:
            try:
                session = self._session(handle.parsed, rescan=False)  # Cryptoki was just re-initialised
                private = self._find_one(session, handle.parsed, ObjectClass.PRIVATE_KEY, handle.uri)
                public = self._public_key(self._find_one(session, handle.parsed, ObjectClass.PUBLIC_KEY, handle.uri))
                if public.public_bytes(*_SPKI) != handle.public_key.public_bytes(*_SPKI):
                    handle.private, handle.error = None, f"the key at {handle.uri!r} has changed; not signing with it"
                    handle.replaced = True
                    log.error("PKCS#11 key %s has a different public key after recovery", handle.uri)
                    recovered = False
                    continue
                handle.private, handle.error, handle.replaced = private, None, False
                version = _key_version(session, private)
                if version != handle.version:
                    log.warning(
                        "PKCS#11 key %s found again under key version %s (was %s): the same public key, "
                        "another token or object",
                        handle.uri,
                        version,
                        handle.version,
                    )
                    handle.version = version
            except (PKCS11Error, BackendError) as exc:
                handle.private, handle.error = None, f"{type(exc).__name__}: {exc}"
                recovered = False
        return recovered

    def probe(self) -> bool:
        """Health probe: sign a fixed input with each resolved key (recovering if needed)."""
        for handle in list(self._handles):
            alg = probe_algorithm(handle.public_key, handle.allowed_mechanisms)
            resolved = ResolvedKey(handle.uri, "", handle.public_key, handle)
            try:
                self._sign(resolved, alg, b"helseid-signer health probe", None, probing=True)
            except BackendError:
                return False
        return True

    def health(self) -> bool:
        """False after a failed Cryptoki call, until a signature succeeds again."""
        return self._healthy

    def close(self) -> None:
        """Forget sessions (they end with the process; an explicit close would log the token out)."""
        self._sessions.clear()

    # -- RegistrationStore ----------------------------------------------------------

    def _registration_template(self, kid: str) -> dict[Attribute, Any]:
        return {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: REGISTRATION_APPLICATION,
            Attribute.LABEL: kid,
        }

    def registration_place(self, key: ResolvedKey, kid: str) -> str:
        """:class:`~.base.RegistrationStore`: the data object's description."""
        parsed = key.handle.parsed
        token = f"label {parsed.token!r}" if parsed.token is not None else f"serial {parsed.serial!r}"
        return f"PKCS#11 token {token}, data object application {REGISTRATION_APPLICATION!r} label {kid!r}"

    def read_registration(self, key: ResolvedKey, kid: str) -> str | None:
        """:class:`~.base.RegistrationStore`: the ``CKA_VALUE`` of the private ``CKO_DATA``
        object with ``CKA_APPLICATION`` :data:`REGISTRATION_APPLICATION` and ``CKA_LABEL``
        ``kid`` on the key's token (the newest by ``registered_at`` when several remain
        after an interrupted write), or None. BackendUnavailableError on a Cryptoki error."""
        parsed = key.handle.parsed
        with self._lock:
            try:
                session = self._session(parsed)
                values = [bytes(o[Attribute.VALUE]) for o in session.get_objects(self._registration_template(kid))]
            except PKCS11Error as exc:
                self._sessions.clear()  # a stale session is opened anew on the next call
                raise BackendUnavailableError(
                    f"PKCS#11 error reading a registration record: {type(exc).__name__}"
                ) from exc
        texts = [v.decode("utf-8", "replace") for v in values]
        return max(texts, key=_registered_at) if texts else None

    def write_registration(self, key: ResolvedKey, kid: str, record_json: str) -> str:
        """:class:`~.base.RegistrationStore`: create the record's data object on the key's
        token (``CKA_TOKEN``, ``CKA_PRIVATE``: only a logged-in user reads or changes it),
        then destroy older ones, so a reader always finds one. BackendUnavailableError on a
        Cryptoki error, BackendConfigError when the record is too large."""
        value = record_json.encode("utf-8")
        if len(value) > MAX_REGISTRATION_BYTES:
            raise BackendConfigError(f"a registration record of {len(value)} bytes is too large")
        parsed = key.handle.parsed
        with self._lock:
            try:
                session = self._session(parsed)
                old = list(session.get_objects(self._registration_template(kid)))
                session.create_object(
                    {**self._registration_template(kid), Attribute.TOKEN: True, Attribute.PRIVATE: True,
                     Attribute.MODIFIABLE: True, Attribute.VALUE: value}  # fmt: skip
                )
                for obj in old:
                    obj.destroy()
            except PKCS11Error as exc:
                raise BackendUnavailableError(
                    f"PKCS#11 error writing a registration record: {type(exc).__name__}"
                ) from exc
        return self.registration_place(key, kid)

    def delete_registration(self, key: ResolvedKey, kid: str) -> None:
        """:class:`~.base.RegistrationStore`: destroy the record's data objects on the key's
        token. BackendUnavailableError on a Cryptoki error."""
        with self._lock:
            try:
                for obj in list(self._session(key.handle.parsed).get_objects(self._registration_template(kid))):
                    obj.destroy()
            except PKCS11Error as exc:
                raise BackendUnavailableError(
                    f"PKCS#11 error deleting a registration record: {type(exc).__name__}"
                ) from exc

    # -- KeyCreator -----------------------------------------------------------------

    def create_key(self, uri: str, key_spec: str, alg: Algorithm | None = None) -> ResolvedKey:
        """Generate a non-exportable key pair in the token ``uri`` names, labelled with its
        ``object=``, restricted to signing: CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_SIGN only
        (CKA_SIGN_RECOVER, CKA_DECRYPT, CKA_UNWRAP, CKA_DERIVE false), not CKA_MODIFIABLE or
        CKA_COPYABLE, and CKA_ALLOWED_MECHANISMS = :func:`signing_mechanisms` (``alg``'s one
        mechanism; the hashed RSA ones when no ``alg`` is given) - so the PIN alone never
        gets a raw RSA operation (CKM_RSA_X_509) from the key (docs/security.md, "Key custody").

        ``key_spec``: RSA-2048/3072/4096 (public exponent 65537) or EC-P256/P384/P521.
        The CKA_ID is 16 random bytes unless the URI gives ``id=``. Raises
        BackendConfigError if an object with that label already exists.
        """
        if key_spec not in KEY_SPECS:
            raise BackendConfigError(f"key spec {key_spec!r} is not one of {', '.join(KEY_SPECS)}")
        parsed = Pkcs11Uri.parse(uri)
        if parsed.object_label is None:
            raise BackendConfigError("keys create needs object=<label> in the PKCS#11 URI")
        self._check_module(parsed)
        object_id = parsed.object_id or secrets.token_bytes(16)
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.SIGN_RECOVER: False,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
            Attribute.MODIFIABLE: False,
            Attribute.COPYABLE: False,
            Attribute.ALLOWED_MECHANISMS: signing_mechanisms(key_spec.partition("-")[0], alg),
        }
        public_template = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.VERIFY_RECOVER: False,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
            Attribute.MODIFIABLE: False,
        }
        with self._lock:
            try:
                session = self._session(parsed)
                existing = list(session.get_objects({Attribute.LABEL: parsed.object_label}))
                if existing:
                    raise BackendConfigError(f"an object labelled {parsed.object_label!r} already exists in the token")
                kind, _, size = key_spec.partition("-")
                common = dict(
                    store=True,
                    label=parsed.object_label,
                    id=object_id,
                    public_template=public_template,
                    private_template=private_template,
                )
                if kind == "RSA":
                    session.generate_keypair(KeyType.RSA, int(size), **common)
                else:
                    curve = CURVES["P-" + size[1:]]
                    params = session.create_domain_parameters(
                        KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_NAMES[curve.name])},
                        local=True,
                    )
                    params.generate_keypair(**common)
            except PKCS11Error as exc:
                raise BackendUnavailableError(f"PKCS#11 error creating {uri!r}: {type(exc).__name__}") from exc
        if parsed.object_id is None:
            path, sep, query = uri.partition("?")
            uri = f"{path};id={''.join(f'%{b:02x}' for b in object_id)}{sep}{query}"
        return self.resolve(uri)
