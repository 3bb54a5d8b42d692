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
from cryptography.x509.oid import NameOID

from .config import ServerSettings
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


class TlsFiles:
    """The server's TLS certificate, key and client CA, re-read on reload: gRPC asks the
    fetcher at every new handshake, so new connections get new certificates while open
    connections continue undisturbed."""

    def __init__(self, server: ServerSettings) -> None:
        self._config = self._load(server)
        self._fresh: object | None = None

    @staticmethod
    def _load(server: ServerSettings) -> object:
        assert server.tls_private_key and server.tls_certificate and server.client_ca
        return grpc.ssl_server_certificate_configuration(
            [(Path(server.tls_private_key).read_bytes(), Path(server.tls_certificate).read_bytes())],
            root_certificates=Path(server.client_ca).read_bytes(),
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch, require_client_authentication=True)

    def _fetch(self) -> object | None:
        fresh, self._fresh = self._fresh, None
        return fresh

    def reload(self, server: ServerSettings) -> None:
        """Read the files again (OSError/ValueError if unreadable: the old ones stay)."""
        self._fresh = self._load(server)
