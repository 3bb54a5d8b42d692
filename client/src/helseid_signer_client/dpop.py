"""DPoP for outgoing API calls (DEFT and other NHN APIs) as an ``httpx.Auth``.

Sources: RFC 9449 section 7 (``Authorization: DPoP <token>`` + a proof with ``ath``),
sections 8 and 9 (server nonces: 401 with ``WWW-Authenticate: DPoP
error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header; nonce syntax 8.1), section 4.3
(``htu`` without query and fragment - the signer canonicalises it), RFC 6750 section 3.1
(``invalid_token``).

For every request (and every retry) a NEW proof is signed: proofs are never pre-built or
cached. The rules (``docs/client.md``; the decisions are shared with the ``requests`` auth
in :mod:`helseid_signer_client._rules`):

* nonces: the last valid ``DPoP-Nonce`` per origin is remembered and put in every proof to
  that origin; an invalid one (not 1..512 NQCHAR) is ignored, never stored;
* ``use_dpop_nonce``: one retry with the new nonce; ``invalid_token`` (also an expired
  token): the token is dropped from the TokenClient's cache and one retry is made with a
  new token. A second challenge of the same kind goes to the application: never a loop;
* bodies: a retry sends the body again whole - bytes, a form, JSON, a seekable file (sought
  back to where it started) and multipart with bytes or seekable files. A body that can be
  read only once (a generator, an iterator, an async iterator, a pipe) is never re-sent:
  before the first such request to an origin whose nonce is not known yet, a ``HEAD`` to the
  same URL learns the nonce; if a retry is needed anyway, :class:`UnreplayableBodyError` is
  raised (the application never gets a success for a short body);
* redirects: a token and a proof are never sent to a URL they were not signed for. A
  redirect answer raises :class:`RedirectRefused`; with ``follow_redirects=True`` the next
  hop is stopped before its headers are sent;
* the DPoP key changed (``jkt`` differs from the cached token's): a new token first.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

import httpx

from ._rules import Action, Answer, Attempts, NonceStore, classify, origin
from .errors import RedirectRefused, UnreplayableBodyError
from .signer import DpopProof
from .token import AccessToken, AsyncTokenClient, TokenClient


def is_nonce_challenge(response: httpx.Response) -> bool:
    """True for a resource server's 401 ``DPoP error="use_dpop_nonce"`` with a valid nonce."""
    return _classify(response) is Answer.NONCE


def _classify(response: httpx.Response) -> Answer:
    return classify(
        response.status_code,
        response.headers.get_list("WWW-Authenticate"),
        response.headers.get("DPoP-Nonce"),
        response.headers.get("Location"),
    )


def _origin(url: httpx.URL) -> str:
    return origin(url.scheme, url.host, url.port)


def authorization_headers(token: AccessToken, proof: DpopProof) -> dict[str, str]:
    """``Authorization: DPoP <token>`` and ``DPoP: <proof>`` (RFC 9449 section 7.1)."""
    return {"Authorization": f"DPoP {token.access_token}", "DPoP": proof.jwt}


def sign_request(tokens: TokenClient, method: str, url: str, nonce: str | None) -> tuple[dict[str, str], AccessToken]:
    """The headers of one DPoP-authorised request and the token they carry.

    A cached token whose ``jkt`` differs from the proof's (the signer's DPoP key was
    rotated) is dropped and a new one fetched first. Raises TokenError, SignerError (e.g.
    PERMISSION_DENIED for a URL outside the profile's ``api_base_urls``), DiscoveryError.
    """
    token = tokens.get_token()
    proof = tokens.signer.sign_dpop_proof(tokens.profile, method, url, nonce=nonce, access_token=token.access_token)
    if proof.jkt != token.jkt:  # the DPoP key changed: the token is bound to the old one
        tokens.invalidate(token)
        token = tokens.get_token()
        proof = tokens.signer.sign_dpop_proof(tokens.profile, method, url, nonce=nonce, access_token=token.access_token)
    return authorization_headers(token, proof), token


async def asign_request(
    tokens: AsyncTokenClient, method: str, url: str, nonce: str | None
) -> tuple[dict[str, str], AccessToken]:
    """asyncio version of :func:`sign_request`."""
    token = await tokens.get_token()
    proof = await tokens.signer.sign_dpop_proof(
        tokens.profile, method, url, nonce=nonce, access_token=token.access_token
    )
    if proof.jkt != token.jkt:
        tokens.invalidate(token)
        token = await tokens.get_token()
        proof = await tokens.signer.sign_dpop_proof(
            tokens.profile, method, url, nonce=nonce, access_token=token.access_token
        )
    return authorization_headers(token, proof), token


class _Body:
    """Whether an httpx request body can be sent again whole, and how to rewind it.

    Replayable: no body, bytes (``content=``, ``data=``, ``json=``), a seekable file given as
    ``content=`` (sought back to its position at the first send), multipart (``files=``) whose
    files are bytes/str or seekable (httpx itself seeks each file to 0 when it sends it).
    Anything else - generators, iterators, async iterators, pipes, a stream type this module
    does not know - is read only once. The stream classes are httpx's own (0.28).
    """

    def __init__(self, request: httpx.Request) -> None:
        self._rewind: Callable[[], None] | None = None
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            self.replayable = True
            return
        inner = getattr(stream, "_stream", None)  # httpx's (Async)IteratorByteStream
        kind = type(stream).__name__
        if kind in ("IteratorByteStream", "AsyncIteratorByteStream") and _seekable(inner):
            start = inner.tell()
            self._rewind = lambda: inner.seek(start)
            self.replayable = True
        elif kind == "MultipartStream":
            files = [getattr(f, "file", None) for f in getattr(stream, "fields", [])]
            self.replayable = all(f is None or isinstance(f, (bytes, str)) or _seekable(f) for f in files)
        else:
            self.replayable = False

    def rewind(self) -> None:
        if self._rewind is not None:
            self._rewind()


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) and isinstance(f.tell(), int)
    except (AttributeError, OSError, ValueError):
        return False


def _wire(method: bytes | str, scheme: bytes, host: bytes, port: int | None, target: bytes) -> tuple:
    if isinstance(method, str):
        method = method.encode("ascii")
    if target.startswith((b"http://", b"https://")):  # absolute form, through a forwarding proxy
        url = httpx.URL(target.decode("ascii"))
        scheme, host, port, target = url.raw_scheme, url.raw_host, url.port, url.raw_path
    scheme = scheme.lower()
    if port is None:
        port = {b"http": 80, b"https": 443}.get(scheme)
    return method, scheme, host.lower(), port, target


class _RedirectGuard:
    """A ``trace`` request extension (httpcore's documented hook, called as each request's
    headers are about to be sent) that refuses to send the token and proof of ``request`` to
    any other method or URL: httpx, with ``follow_redirects=True``, follows a redirect inside
    one step of an auth flow and copies every header but ``Authorization`` across origins
    (and keeps even that from http to https and within an origin). A CONNECT to a proxy is
    let through; an existing ``trace`` is called first."""

    def __init__(self, request: httpx.Request, asynchronous: bool) -> None:
        url = request.url
        self.url = str(url.copy_with(query=None, fragment=None))
        self.signed = _wire(request.method, url.raw_scheme, url.raw_host, url.port, url.raw_path)
        self.previous = request.extensions.get("trace")
        request.extensions = {**request.extensions, "trace": self.atrace if asynchronous else self.trace}

    def _check(self, name: str, info: dict[str, Any]) -> None:
        if not name.endswith("send_request_headers.started"):
            return
        hop = info.get("request")
        if hop is None or (hop.method == b"CONNECT" and self.signed[0] != b"CONNECT"):
            return
        seen = _wire(hop.method, hop.url.scheme, hop.url.host, hop.url.port, hop.url.target)
        if seen != self.signed:
            location = f"{seen[1].decode()}://{seen[2].decode()}:{seen[3]}{seen[4].decode().split('?')[0]}"
            raise RedirectRefused(self.url, location)

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if self.previous is not None:
            self.previous(name, info)
        self._check(name, info)

    async def atrace(self, name: str, info: dict[str, Any]) -> None:
        if self.previous is not None:
            result = self.previous(name, info)
            if inspect.isawaitable(result):
                await result
        self._check(name, info)


class DPoPAuth(httpx.Auth):
    """``httpx.Auth`` that adds a DPoP-bound HelseID token and a fresh DPoP proof.

    Args:
        token_client: gets (and caches) the access token; its signer signs the proofs. A
            :class:`TokenClient` serves ``httpx.Client``; an :class:`AsyncTokenClient`
            serves ``httpx.AsyncClient``.
        probe_nonce: before the first request with a body that can be read only once to an
            origin whose nonce is not known yet, send a ``HEAD`` to the same URL to learn the
            nonce (default True; see the module docstring).

    Raises, from inside ``httpx`` calls: TokenError / SignerError / DiscoveryError (no
    token, no proof), :class:`UnreplayableBodyError` (a retry was needed and the body can be
    read only once), :class:`RedirectRefused` (the server answered with a redirect).
    """

    requires_response_body = False
    #: Must stay False: True would make httpx read the whole body into memory before the
    #: flow starts. Bodies stream; the flow decides from the body's kind whether it can be
    #: sent again (see :class:`_Body`).
    requires_request_body = False

    def __init__(self, token_client: TokenClient | AsyncTokenClient, *, probe_nonce: bool = True) -> None:
        self.token_client = token_client
        self.probe_nonce = probe_nonce
        self.nonces = NonceStore()
        self._probed: set[str] = set()

    def _sync_client(self) -> TokenClient:
        if not isinstance(self.token_client, TokenClient):
            raise TypeError("DPoPAuth with an AsyncTokenClient needs httpx.Client")
        return self.token_client

    def _async_client(self) -> AsyncTokenClient:
        if not isinstance(self.token_client, AsyncTokenClient):
            raise TypeError("DPoPAuth with a TokenClient needs httpx.AsyncClient")
        return self.token_client

    def _needs_probe(self, where: str, body: _Body) -> bool:
        return self.probe_nonce and not body.replayable and self.nonces.get(where) is None and where not in self._probed

    @staticmethod
    def _probe_request(request: httpx.Request, asynchronous: bool) -> httpx.Request:
        """A ``HEAD`` to the request's URL (same timeouts), guarded against redirects."""
        extensions = {k: v for k, v in request.extensions.items() if k != "trace"}
        probe = httpx.Request("HEAD", request.url, extensions=extensions)
        _RedirectGuard(probe, asynchronous)
        return probe

    def _after_probe(self, probe: httpx.Request, response: httpx.Response, token: AccessToken) -> None:
        """Learn the origin's nonce from the probe's answer (whatever its status); drop a
        refused token. Never retried: the request that follows carries what was learnt."""
        if response.request is not probe:
            url = str(probe.url.copy_with(query=None, fragment=None))
            raise RedirectRefused(url, str(response.url.copy_with(query=None, fragment=None)), response)
        where = _origin(probe.url)
        self._probed.add(where)
        self.nonces.remember(where, response.headers.get("DPoP-Nonce"))
        if _classify(response) is Answer.INVALID_TOKEN:
            self.token_client.invalidate(token)

    def _after(
        self, request: httpx.Request, response: httpx.Response, body: _Body, attempts: Attempts, token: AccessToken
    ) -> Action:
        """Remember the answer's nonce, drop a refused token, decide; raise for a refusal."""
        signed_url = str(request.url.copy_with(query=None, fragment=None))
        if response.request is not request:  # a redirect was followed by a transport without `trace`
            raise RedirectRefused(signed_url, str(response.url.copy_with(query=None, fragment=None)), response)
        self.nonces.remember(_origin(request.url), response.headers.get("DPoP-Nonce"))
        answer = _classify(response)
        action = attempts.decide(answer, body.replayable)
        if answer is Answer.INVALID_TOKEN and action is not Action.RETURN:  # once per request: never a loop
            self.token_client.invalidate(token)
        if action is Action.REFUSE_REDIRECT:
            raise RedirectRefused(signed_url, response.headers["Location"], response)
        if action is Action.REFUSE_BODY:
            raise UnreplayableBodyError(answer.value, response)
        return action

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Sign and send; on a nonce challenge or a refused token sign again and resend once
        (when the body can be sent again); see the module docstring."""
        tokens = self._sync_client()
        body, where, attempts = _Body(request), _origin(request.url), Attempts()
        if self._needs_probe(where, body):
            probe = self._probe_request(request, asynchronous=False)
            headers, token = sign_request(tokens, "HEAD", str(probe.url), None)
            probe.headers.update(headers)
            self._after_probe(probe, (yield probe), token)
        _RedirectGuard(request, asynchronous=False)
        while True:
            headers, token = sign_request(tokens, request.method, str(request.url), self.nonces.get(where))
            request.headers.update(headers)
            response = yield request
            if self._after(request, response, body, attempts, token) is Action.RETURN:
                return
            body.rewind()

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The same flow as :meth:`sync_auth_flow`, for ``httpx.AsyncClient``."""
        tokens = self._async_client()
        body, where, attempts = _Body(request), _origin(request.url), Attempts()
        if self._needs_probe(where, body):
            probe = self._probe_request(request, asynchronous=True)
            headers, token = await asign_request(tokens, "HEAD", str(probe.url), None)
            probe.headers.update(headers)
            self._after_probe(probe, (yield probe), token)
        _RedirectGuard(request, asynchronous=True)
        while True:
            headers, token = await asign_request(tokens, request.method, str(request.url), self.nonces.get(where))
            request.headers.update(headers)
            response = yield request
            if self._after(request, response, body, attempts, token) is Action.RETURN:
                return
            body.rewind()
