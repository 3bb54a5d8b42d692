"""Who is calling: a caller is identified by its verified TLS client certificate (the
names it carries, :func:`certificate_names`) or by the listener it reached (a Unix socket
of its own, or the insecure development listener); plus the server's TLS files, re-read on
reload, and the ownership of caller sockets.

Decisions (docs/security.md, "Who can call"): DNS and URI subjectAltNames identify a
caller, the subject CN only when the certificate has no SAN; e-mail and IP SANs never
do; a certificate whose names match two different callers identifies neither.
"""

from __future__ import annotations

import grp
import logging
import pwd
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
    """The identities a client certificate carries, as callers are matched: its DNS and
    URI subjectAltNames; only when it has no subjectAltName at all, its subject CN (RFC 6125
    section 6.4.4 practice). E-mail and IP SANs never identify a caller."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(
            a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)
        )
    return tuple(san.get_values_for_type(x509.DNSName)) + tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


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
