"""The decisions a DPoP client makes about a resource server's answer, shared by the
``httpx`` auth (:mod:`helseid_signer_client.dpop`) and the ``requests`` auth
(:mod:`helseid_signer_client.requests_auth`). Nothing here does I/O.

Sources: RFC 9449 section 8.1 (nonce syntax ``1*NQCHAR``), sections 8.2 and 9 (a server's
``DPoP-Nonce`` and ``use_dpop_nonce``), section 7.1 and RFC 6750 section 3.1
(``WWW-Authenticate`` challenges, ``invalid_token``), RFC 9110 section 11.6.1 (challenge
syntax) and section 15.4 (redirects). The rules are written down in ``docs/client.md``.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import Iterable

log = logging.getLogger("helseid_signer_client")

#: RFC 9449 section 8.1: ``nonce = 1*NQCHAR``, ``NQCHAR = %x21 / %x23-5B / %x5D-7E``; at most
#: 512 characters, the signer's own limit for the ``nonce`` field (docs/api.md).
NONCE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")
MAX_NONCE_LENGTH = 512

#: Redirect status codes an HTTP client would follow (RFC 9110 section 15.4).
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def valid_nonce(value: object) -> bool:
    """True when ``value`` is a string a DPoP proof may carry as ``nonce``: 1..512 characters
    of RFC 9449 NQCHAR (printable ASCII without space, ``"`` and ``\\``)."""
    return isinstance(value, str) and NONCE_PATTERN.fullmatch(value) is not None


class NonceStore:
    """The last valid ``DPoP-Nonce`` per origin (``scheme://host:port``); thread-safe.

    A value that is not a valid nonce is never stored: it is dropped with a warning (its
    length only, never the value) and the origin keeps the nonce it had, so one bad header
    cannot break later requests to that origin.
    """

    def __init__(self) -> None:
        self._nonces: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, origin: str) -> str | None:
        """The remembered nonce of ``origin``, or None."""
        with self._lock:
            return self._nonces.get(origin)

    def remember(self, origin: str, value: str | None) -> bool:
        """Store ``value`` for ``origin`` if it is a valid nonce; True when stored."""
        if value is None:
            return False
        if not valid_nonce(value):
            log.warning(
                "ignored an invalid DPoP-Nonce from %s (%d characters; RFC 9449 allows 1..512 NQCHAR)",
                origin,
                len(value),
            )
            return False
        with self._lock:
            self._nonces[origin] = value
        return True


def origin(scheme: str, host: str, port: int | None) -> str:
    """``scheme://host:port`` with the default port written out (the key of a nonce)."""
    scheme = scheme.lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host.lower()}:{port}"


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_challenges(values: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """Parse ``WWW-Authenticate`` header values (RFC 9110 section 11.6.1) into
    ``[(scheme lower case, {param lower case: value})]``. Several challenges may share one
    value (``requests`` joins repeated headers with ``", "``). Text that does not parse ends
    the parse of that value; what was parsed before it is kept."""
    challenges: list[tuple[str, dict[str, str]]] = []
    for value in values:
        i, n = 0, len(value)
        while i < n:
            while i < n and value[i] in " \t,":
                i += 1
            name = _TOKEN.match(value, i)
            if name is None:
                break
            j = name.end()
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] == "=" and challenges:  # an auth-param of the current challenge
                j += 1
                while j < n and value[j] in " \t":
                    j += 1
                quoted, token = _QUOTED.match(value, j), _TOKEN.match(value, j)
                if quoted is not None:
                    challenges[-1][1][name.group().lower()] = re.sub(r"\\(.)", r"\1", quoted.group(1))
                    i = quoted.end()
                elif token is not None:
                    challenges[-1][1][name.group().lower()] = token.group()
                    i = token.end()
                else:
                    break
            else:  # a new challenge's scheme
                challenges.append((name.group().lower(), {}))
                i = name.end()
    return challenges


class Answer(enum.Enum):
    """What a resource server's answer asks of the client."""

    NONE = "none"  # a final answer for the application
    NONCE = "use_dpop_nonce"  # 401 + DPoP error="use_dpop_nonce" + a valid DPoP-Nonce
    INVALID_TOKEN = "invalid_token"  # 401 + DPoP/Bearer error="invalid_token" (also expired)
    REDIRECT = "redirect"  # 301/302/303/307/308 with a Location


def classify(status: int, www_authenticate: Iterable[str], nonce: str | None, location: str | None) -> Answer:
    """Classify a resource server's answer to a DPoP-authorised request.

    Args:
        status: the HTTP status code.
        www_authenticate: the ``WWW-Authenticate`` header values.
        nonce: the ``DPoP-Nonce`` header value, if any.
        location: the ``Location`` header value, if any.

    A ``use_dpop_nonce`` challenge whose nonce is missing or invalid is NOT a nonce
    challenge (the client cannot answer it): the 401 goes to the application.
    ``invalid_token`` is accepted under the ``DPoP`` and the ``Bearer`` scheme (servers built
    on a bearer-token stack often answer an expired token with ``Bearer``).
    """
    if status in REDIRECT_STATUSES and location:
        return Answer.REDIRECT
    if status != 401:
        return Answer.NONE
    errors = {(scheme, params.get("error")) for scheme, params in parse_challenges(www_authenticate)}
    if ("dpop", "use_dpop_nonce") in errors:
        return Answer.NONCE if valid_nonce(nonce) else Answer.NONE
    if ("dpop", "invalid_token") in errors or ("bearer", "invalid_token") in errors:
        return Answer.INVALID_TOKEN
    return Answer.NONE


class Action(enum.Enum):
    """What the client does next with a request."""

    RETURN = "return"  # hand the answer to the application
    RETRY = "retry"  # sign again (nonce / new token), send the whole body again
    REFUSE_BODY = "refuse_body"  # a retry is needed but the body cannot be sent again
    REFUSE_REDIRECT = "refuse_redirect"  # never follow a redirect with a token and a proof


class Attempts:
    """The retry budget of one request: at most one retry for a nonce challenge and at most
    one for a refused token, so a request is sent at most three times and never loops; a
    second challenge of the same kind goes to the application."""

    def __init__(self) -> None:
        self.nonce_retried = False
        self.token_retried = False

    def decide(self, answer: Answer, body_replayable: bool) -> Action:
        """The action for ``answer`` given whether the body can be sent again whole."""
        if answer is Answer.REDIRECT:
            return Action.REFUSE_REDIRECT
        if answer is Answer.NONCE and not self.nonce_retried:
            self.nonce_retried = True
        elif answer is Answer.INVALID_TOKEN and not self.token_retried:
            self.token_retried = True
        else:
            return Action.RETURN
        return Action.RETRY if body_replayable else Action.REFUSE_BODY
