"""Request errors, and the one mapping from every error kind to a gRPC status and the
message a caller sees. Every adapter of the signing core (the gRPC servicer, the
in-process :class:`~.local_signer.LocalSigner`) answers through :func:`refusal`.

Status codes (docs/security.md, "Status codes"):

* :class:`RequestError` carries its own code: ``INVALID_ARGUMENT`` (malformed field),
  ``PERMISSION_DENIED`` (well-formed but not allowed), ``UNAUTHENTICATED`` (unknown
  caller), ``RESOURCE_EXHAUSTED`` (rate limit); its message names the field;
* a backend error (:mod:`.backends.base`) declares its code and a caller summary on its
  class (``grpc_code``, ``summary``); the backend's own text - key references, ARNs, vault
  URLs - stays in the log and the audit record, found by a reference (``ref``);
* an audit record that cannot be written: ``UNAVAILABLE`` (nothing was signed);
* anything else: ``INTERNAL`` with a reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audit import AuditError
from .backends.base import BackendError


class RequestError(ValueError):
    """A request field is unacceptable.

    Attributes:
        field: the request field's name, e.g. ``"htu"``.
        code: the gRPC status name: ``INVALID_ARGUMENT`` (malformed), ``PERMISSION_DENIED``
            (well-formed but not allowed, including a profile the caller may not use),
            ``UNAUTHENTICATED`` (unknown caller) or ``RESOURCE_EXHAUSTED`` (rate limit).
    """

    def __init__(self, field: str, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code


@dataclass(frozen=True)
class Refusal:
    """How a request that raised is answered.

    Attributes:
        code: the gRPC status name (``grpc.StatusCode[code]``).
        message: the status message the caller sees.
        outcome: the audit record's ``outcome``: ``refused`` (the request was not
            acceptable) or ``failed`` (it was, and signing failed).
    """

    code: str
    message: str
    outcome: str


def refusal(exc: Exception, ref: str | None = None) -> Refusal:
    """The answer to a request that raised ``exc``.

    ``ref`` is the reference of the log line that holds the details: with it, a backend
    failure is told to the caller as its kind and the reference only (its text names key
    references, ARNs and vault URLs; on-call staff find them by ``ref``); without it (an
    in-process adapter, where the caller is the operator) the backend's own text is given.
    """
    if isinstance(exc, RequestError):
        return Refusal(exc.code, str(exc), "refused")
    if isinstance(exc, AuditError):
        return Refusal("UNAVAILABLE", "audit trail unavailable; nothing was signed", "failed")
    if isinstance(exc, BackendError):
        message = str(exc) if ref is None else f"{exc.summary} (ref {ref}; details in the signer's log)"
        return Refusal(exc.grpc_code, message, "failed")
    where = f"ref {ref}; details in the signer's log" if ref else type(exc).__name__
    return Refusal("INTERNAL", f"internal error ({where})", "failed")
