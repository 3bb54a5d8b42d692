"""Who is calling: a caller is identified by its verified TLS client certificate (the
names it carries, :func:`certificate_names`) or by the listener it reached (a Unix socket
of its own, or the insecure development listener); plus the server's TLS files, re-read on
reload, and the ownership of caller sockets.

Decisions (docs/security.md, "Who can call"): DNS and URI subjectAltNames identify a
caller, the subject CN only when the certificate has no SAN; e-mail and IP SANs never
do; each name is typed (``dns:``, ``uri:``, ``cn:``) and compared within its type; a
certificate whose names match two different callers identifies neither. A caller
socket is created race-free (:func:`create_caller_socket`) in a directory no other user
can write (:func:`socket_directory_problem`).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import hashlib
import logging
import os
import pwd
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .config import ConfigError, ServerSettings
from .policy import Caller
from .runtime import RuntimeHolder

log = logging.getLogger("helseid_signer.server")

#: Finds the caller of a request from its gRPC context (None: unknown caller).
Identify = Callable[[grpc.aio.ServicerContext], Caller | None]


def certificate_names(pem: bytes) -> tuple[str, ...]:
    """The identities a client certificate carries, as callers are matched, each with its
    type as in ``tls_names``: ``dns:`` + a DNS subjectAltName, ``uri:`` + a URI
    subjectAltName; only when it has no subjectAltName at all, ``cn:`` + its subject CN
    (RFC 6125 section 6.4.4 practice). E-mail and IP SANs never identify a caller. A name is
    compared within its type only: a DNS SAN never matches a name meant as a URI or a CN."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(
            "cn:" + a.value
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        )
    return tuple("dns:" + v for v in san.get_values_for_type(x509.DNSName)) + tuple(
        "uri:" + v for v in san.get_values_for_type(x509.UniformResourceIdentifier)
    )


@functools.lru_cache(maxsize=1024)
def _fingerprint(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def certificate_fingerprint(context: grpc.aio.ServicerContext) -> str | None:
    """``sha256:`` + the hex SHA-256 of the DER of the client certificate the request came
    with (the audit record's ``certificate``, the form ``openssl x509 -fingerprint -sha256``
    prints without colons); None without one (a Unix socket, the insecure listener)."""
    pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
    return _fingerprint(pem) if pem else None


def tls_identifier(holder: RuntimeHolder) -> Identify:
    """Identify a caller by its verified client certificate (gRPC has checked the chain
    against ``client_ca``): one of :func:`certificate_names` equal to one of its
    ``tls_names``. A certificate whose names match two different callers is no caller
    (UNAUTHENTICATED). Names are cached per certificate."""
    cache: dict[bytes, tuple[str, ...]] = {}
    ambiguous: set[bytes] = set()  # certificates already logged as naming several callers
    seen_runtime: list[object] = [None]  # the configuration generation those were logged in

    def identify(context: grpc.aio.ServicerContext) -> Caller | None:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if not pem:
            return None
        names = cache.get(pem)
        if names is None:
            if len(cache) > 1024:
                cache.clear()
            names = cache[pem] = certificate_names(pem)
        if seen_runtime[0] is not holder.runtime:  # a reload: log ambiguous certificates afresh
            seen_runtime[0] = holder.runtime
            ambiguous.clear()
        by_name = holder.runtime.tls_callers
        matched = {id(c): c for c in (by_name.get(name) for name in names) if c is not None}
        if len(matched) > 1:
            # One certificate, two identities: which one it is would depend on the order of
            # its names. Neither is trusted; the issuing CA needs fixing.
            if pem not in ambiguous:
                if len(ambiguous) > 1024:
                    ambiguous.clear()
                ambiguous.add(pem)
                log.warning(
                    "a client certificate names %d callers (%s); refusing it as unauthenticated",
                    len(matched),
                    ", ".join(sorted(c.name for c in matched.values())),
                )
            return None
        return next(iter(matched.values()), None)

    return identify


def named_identifier(holder: RuntimeHolder, name: str) -> Identify:
    """Every request on this listener is the caller ``name`` (a Unix socket, or the
    insecure development listener); looked up per request so a reload takes effect."""
    return lambda context: holder.runtime.callers.get(name)


def socket_directory_problem(path: str) -> str | None:
    """Why the folder of a caller socket at ``path`` is unsafe, or None when it is safe.

    Safe: a directory owned by the service's user or root that no one else can write - or,
    if others can write it, with the sticky bit (as ``/tmp``), so no one else can remove or
    rename the socket. Otherwise another user could replace the socket (or a symlink in its
    place) between its creation and its ``chmod``, or afterwards, and receive the caller's
    requests (docs/security.md, "Who can call"). OSError if the folder cannot be read.
    """
    folder = os.path.dirname(os.path.abspath(path))
    info = os.stat(folder)
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a directory"
    if info.st_uid not in (os.geteuid(), 0):
        return f"its directory {folder} belongs to uid {info.st_uid}, neither the service's user nor root"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return (
            f"its directory {folder} (mode {stat.S_IMODE(info.st_mode):#o}) is writable by other users and not "
            "sticky: they could replace the socket; use a directory only the service can write"
        )
    return None


def create_caller_socket(path: str, mode: int, uid: int, gid: int, bind: Callable[[str], int]) -> None:
    """Create a caller's Unix socket at ``path`` with ``mode`` and owner ``uid``/``gid``
    (-1: unchanged) without a window for a symlink or socket swap.

    ``bind(temporary_path)`` binds the socket (returns 0 on failure). It is bound in a new
    private directory (``mkdtemp``: mode 0700, the service's own) beside ``path``, gets its
    owner and mode there, where no one else can reach it, and is then renamed into place
    (``rename`` is atomic and never follows a symlink at ``path``; it replaces a stale
    socket of an earlier run). Raises OSError; ValueError when ``path`` exists and is not a
    socket, or the bind failed."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ValueError(f"{path} exists and is not a socket")
    private = tempfile.mkdtemp(prefix=".sock-", dir=os.path.dirname(os.path.abspath(path)))
    temporary = os.path.join(private, "s")
    try:
        if not bind(temporary):
            raise ValueError(f"cannot bind a Unix socket beside {path}")
        if uid != -1 or gid != -1:
            os.chown(temporary, uid, gid)
        os.chmod(temporary, mode)
        os.rename(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.rmdir(private)


def owner_ids(owner: str | int | None, group: str | int | None) -> tuple[int, int]:
    uid = -1 if owner is None else owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid
    gid = -1 if group is None else group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    return uid, gid


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"server.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _pem_certificates(key: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(f"server.{key}: {path} holds no PEM certificate")
    return certificates


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_tls_files(server: ServerSettings) -> tuple[bytes, bytes, bytes]:
    """Read and check the server's TLS files before gRPC gets them; returns the PEM bytes
    (private key, certificate chain, client CA bundle).

    Checked with ``cryptography``: each file is readable PEM; the private key is
    unencrypted and its public key is the first certificate's (RFC 5246/8446: the key
    must sign the handshake for that certificate); every certificate in ``client_ca`` is a
    CA certificate (basicConstraints CA:TRUE, RFC 5280 section 4.2.1.9: a leaf there makes
    every client handshake fail). Raises :class:`ConfigError` naming the ``server.*`` key.
    The certificate's validity period is not checked here (an expired certificate is an
    operations matter: ``helseid_signer_tls_certificate_expiry_timestamp_seconds``).
    """
    assert server.tls_private_key and server.tls_certificate and server.client_ca
    key_pem = _read("tls_private_key", server.tls_private_key)
    cert_pem = _read("tls_certificate", server.tls_certificate)
    ca_pem = _read("client_ca", server.client_ca)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"server.tls_private_key: {server.tls_private_key} is encrypted (gRPC needs an unencrypted PEM key)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"server.tls_private_key: {server.tls_private_key} is not a PEM private key ({exc})"
        ) from None
    chain = _pem_certificates("tls_certificate", server.tls_certificate, cert_pem)
    if _public_der(private_key.public_key()) != _public_der(chain[0].public_key()):
        raise ConfigError(
            f"server.tls_private_key: does not match the certificate in server.tls_certificate "
            f"({server.tls_certificate}, subject {chain[0].subject.rfc4514_string()})"
        )
    for ca in _pem_certificates("client_ca", server.client_ca, ca_pem):
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(
                f"server.client_ca: {server.client_ca} holds {ca.subject.rfc4514_string()}, which is not a CA "
                "certificate (basicConstraints CA:TRUE); give the CA that issues the callers' certificates"
            )
    return key_pem, cert_pem, ca_pem


def certificate_expiry(server: ServerSettings) -> dict[str, float]:
    """Expiry (Unix time, seconds) of the server certificate and of the earliest-expiring
    CA in ``client_ca``: ``{"server": ..., "client_ca": ...}``. Files as checked by
    :func:`load_tls_files` (ConfigError otherwise)."""
    _, cert_pem, ca_pem = load_tls_files(server)
    server_cert = x509.load_pem_x509_certificates(cert_pem)[0]
    cas = x509.load_pem_x509_certificates(ca_pem)
    return {
        "server": server_cert.not_valid_after_utc.timestamp(),
        "client_ca": min(ca.not_valid_after_utc.timestamp() for ca in cas),
    }


class TlsFiles:
    """The server's TLS certificate, key and client CA, re-read on reload: gRPC asks the
    fetcher at every new handshake, so new connections get new certificates while open
    connections continue undisturbed."""

    def __init__(self, server: ServerSettings) -> None:
        self._config = self._load(server)
        self._fresh: object | None = None

    @staticmethod
    def _load(server: ServerSettings) -> object:
        key_pem, cert_pem, ca_pem = load_tls_files(server)  # checked here, never by gRPC core alone
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch, require_client_authentication=True)

    def _fetch(self) -> object | None:
        fresh, self._fresh = self._fresh, None
        return fresh

    def reload(self, server: ServerSettings) -> None:
        """Read and check the files again (ConfigError naming the key: the old ones stay)."""
        self._fresh = self._load(server)
