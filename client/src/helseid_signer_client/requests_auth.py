"""DPoP for ``requests`` users: :class:`RequestsDPoPAuth`, a ``requests.auth.AuthBase``.

Install with the extra: ``pip install 'helseid-signer-client[requests]'``. The rules are the
ones of :class:`helseid_signer_client.DPoPAuth` (``docs/client.md``), from the same code
(:mod:`helseid_signer_client._rules` decides; :func:`helseid_signer_client.dpop.sign_request`
signs):

* a new proof for every request and retry; the last valid ``DPoP-Nonce`` per origin in it;
  an invalid nonce (not 1..512 RFC 9449 NQCHAR) is ignored;
* ``use_dpop_nonce``: one retry with the nonce; ``invalid_token``: the token is dropped from
  the TokenClient's cache and one retry is made with a new one; never a loop;
* a retry sends the body again whole: bytes, a form, JSON, multipart (``files=``, which
  ``requests`` builds as bytes), a seekable file (sought back). A generator or other one-shot
  body is never re-sent: :class:`~helseid_signer_client.UnreplayableBodyError`. Give
  ``session=`` to let the auth learn an origin's nonce with a ``HEAD`` before the first
  one-shot body (``requests`` gives an auth no other way to send a request);
* a redirect answer raises :class:`~helseid_signer_client.RedirectRefused` before
  ``requests`` can follow it (``requests`` would copy the ``DPoP`` header to any host, and
  ``Authorization`` within a host), whatever ``allow_redirects`` says.

Usage::

    import requests
    from helseid_signer_client import SignerClient, TokenClient
    from helseid_signer_client.requests_auth import RequestsDPoPAuth

    tokens = TokenClient(SignerClient("127.0.0.1:50051"), profile="deft", scope="nhn:deft/api")
    with requests.Session() as session:
        session.auth = RequestsDPoPAuth(tokens, session=session)
        session.post("https://deft.example/api/...", data=open("file.bin", "rb"))
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
import requests.auth

from ._rules import Action, Answer, Attempts, NonceStore, classify, origin
from .dpop import sign_request
from .errors import RedirectRefused, UnreplayableBodyError
from .token import DEFAULT_HTTP_TIMEOUT, AccessToken, TokenClient

PROBE_TIMEOUT = DEFAULT_HTTP_TIMEOUT  # seconds for the nonce HEAD (requests gives an auth no caller timeout)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return origin(parts.scheme, parts.hostname or "", parts.port)


def _without_query(url: str) -> str:
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _classify(response: requests.Response) -> Answer:
    return classify(
        response.status_code,
        [response.headers.get("WWW-Authenticate", "")],
        response.headers.get("DPoP-Nonce"),
        response.headers.get("Location"),
    )


class _Body:
    """Whether a prepared ``requests`` body can be sent again whole, and how to rewind it."""

    def __init__(self, body: Any) -> None:
        self._start: int | None = None
        self._file = body
        if body is None or isinstance(body, (bytes, str)):
            self.replayable = True
        elif hasattr(body, "read"):
            try:
                self.replayable = bool(body.seekable())
                self._start = body.tell() if self.replayable else None
            except (AttributeError, OSError, ValueError):
                self.replayable = False
        else:  # a generator or another iterable: read once
            self.replayable = False

    def rewind(self) -> None:
        if self._start is not None:
            self._file.seek(self._start)


class RequestsDPoPAuth(requests.auth.AuthBase):
    """``requests`` auth that adds a DPoP-bound HelseID token and a fresh DPoP proof.

    Args:
        token_client: a :class:`~helseid_signer_client.TokenClient` (its signer signs the proofs).
        session: the ``requests.Session`` this auth is used with, for the nonce ``HEAD`` before
            a one-shot body; None: no such probe (a challenge to a one-shot body then raises).

    Raises, from inside ``requests`` calls: TokenError / SignerError / DiscoveryError,
    :class:`~helseid_signer_client.UnreplayableBodyError`,
    :class:`~helseid_signer_client.RedirectRefused`.
    """

    def __init__(self, token_client: TokenClient, *, session: requests.Session | None = None) -> None:
        if not isinstance(token_client, TokenClient):
            raise TypeError("RequestsDPoPAuth needs a TokenClient (requests is synchronous)")
        self.token_client = token_client
        self.session = session
        self.nonces = NonceStore()
        self._probed: set[str] = set()

    def _sign(self, request: requests.PreparedRequest) -> AccessToken:
        url = str(request.url)
        headers, token = sign_request(self.token_client, str(request.method), url, self.nonces.get(_origin(url)))
        request.headers.update(headers)
        return token

    def _probe(self, url: str) -> None:
        """``HEAD url`` through the session (this auth signs it and learns the nonce from its
        answer). An optimisation only: a redirect or a transport failure is left to the
        request that follows."""
        self._probed.add(_origin(url))
        try:
            self.session.head(url, auth=self, allow_redirects=False, timeout=PROBE_TIMEOUT).close()  # type: ignore[union-attr]
        except (RedirectRefused, requests.RequestException):
            pass

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        url = str(request.url)
        body = _Body(request.body)
        where = _origin(url)
        if self.session is not None and not body.replayable and self.nonces.get(where) is None:
            if where not in self._probed:
                self._probe(url)
        token = self._sign(request)
        attempts = Attempts()

        def on_response(response: requests.Response, **kwargs: Any) -> requests.Response:
            nonlocal token
            while True:
                self.nonces.remember(where, response.headers.get("DPoP-Nonce"))
                answer = _classify(response)
                action = attempts.decide(answer, body.replayable)
                if answer is Answer.INVALID_TOKEN and action is not Action.RETURN:  # once per request
                    self.token_client.invalidate(token)
                if action is Action.RETURN:
                    return response
                response.content  # noqa: B018 - read the (small) answer so its connection can be reused
                response.close()
                if action is Action.REFUSE_REDIRECT:
                    raise RedirectRefused(_without_query(url), response.headers["Location"], response)
                if action is Action.REFUSE_BODY:
                    raise UnreplayableBodyError(answer.value, response)
                retry = response.request.copy()
                body.rewind()
                token = self._sign(retry)
                again = response.connection.send(retry, **kwargs)
                again.history.append(response)
                again.request = retry
                response = again

        request.register_hook("response", on_response)
        return request
