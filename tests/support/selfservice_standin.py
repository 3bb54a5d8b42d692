"""A local stand-in of HelseID's self-service client-secret endpoint (``POST /v1/client-secret``)
on http://127.0.0.1, as strict as the real one must be about what a client sends.

A request is accepted only with all of:

* ``Authorization: DPoP <jwt>`` whose JWT (``typ`` ``at+jwt``) verifies against the local
  authorization server's JWKS (oidc-provider, :mod:`tests.support.authserver`), has that
  server's ``iss``, has not expired, carries the required scope (``nhn:selvbetjening/client``)
  and ``cnf.jkt``;
* exactly one ``DPoP`` header: a proof (``typ`` ``dpop+jwt``, one of the nine HelseID
  algorithms, a PUBLIC ``jwk`` whose RFC 7638 thumbprint is the token's ``cnf.jkt``) that
  verifies, with ``htm`` ``POST``, ``htu`` this endpoint, ``iat`` within a minute, a ``jti``
  never seen before, ``ath`` = base64url(SHA-256(token)) and - when ``require_nonce`` - the
  stand-in's current ``DPoP-Nonce`` (else 401 ``use_dpop_nonce``, RFC 9449 section 9);
* ``Content-Type: application/json`` and a body that is a PUBLIC JWK (RSA or EC; any
  private member, ``oct`` keys and unknown ``alg`` are refused).

It answers 200 ``{"expiration": "<one year ahead, ISO 8601>"}`` (the field NHN's libraries
read), or, when :attr:`SelfServiceStandIn.answer_error` is set, that status and body. Token
and proof problems get 401/403 with ``WWW-Authenticate: DPoP error=...``, body problems 400/415,
all with an RFC 9457 problem-details body. Every accepted upload is kept in
:attr:`SelfServiceStandIn.received`; every refusal in :attr:`SelfServiceStandIn.refused`.
Verification uses jwcrypto only, never the product's code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jwcrypto import jwk, jws, jwt

PATH = "/v1/client-secret"
SCOPE = "nhn:selvbetjening/client"
ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
PROOF_MAX_AGE = 60  # seconds either side of now


class Refusal(Exception):
    """An answer other than 200: status, a short reason, and the WWW-Authenticate error."""

    def __init__(self, status: int, reason: str, challenge: str | None = None, headers: dict | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.challenge, self.headers = status, reason, challenge, headers or {}


@dataclass(frozen=True)
class Upload:
    """One accepted upload: the JWK as received, and the token's and proof's claims."""

    jwk: dict[str, Any]
    token_claims: dict[str, Any]
    proof_claims: dict[str, Any]
    proof_header: dict[str, Any]
    content_type: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class SelfServiceStandIn:
    """The stand-in's state. Attributes set by tests: ``answer_error`` (status, body) or
    (status, body, extra headers) to refuse every otherwise valid upload; ``expiration`` to
    override the answered time text; ``on_upload`` to act on each accepted key (e.g. change
    what the authorization server accepts); ``require_nonce``."""

    issuer: str
    jwks_uri: str
    scope: str = SCOPE
    require_nonce: bool = False
    answer_error: tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]] | None = None
    expiration: Callable[[], str] | None = None
    #: called with each accepted JWK (and the token's client id) before the answer: a test
    #: tells the authorization server what HelseID now accepts for that client
    on_upload: Callable[[dict[str, Any], str], None] | None = None
    base_url: str = ""
    received: list[Upload] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    _seen_jti: set[str] = field(default_factory=set)
    _keys: jwk.JWKSet | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        """The full URL of ``POST /v1/client-secret`` (what ``htu`` must be)."""
        return self.base_url + PATH

    def _authserver_keys(self, refresh: bool = False) -> jwk.JWKSet:
        if self._keys is None or refresh:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.jwks_uri, timeout=10) as response:
                self._keys = jwk.JWKSet.from_json(response.read())
        return self._keys

    def _check_token(self, authorization: str | None) -> tuple[str, dict[str, Any]]:
        if not authorization or not authorization.startswith("DPoP "):
            raise Refusal(401, "Authorization must be 'DPoP <access token>'", "invalid_token")
        token = authorization[len("DPoP ") :].strip()
        header = {}
        try:
            parsed = jws.JWS()
            parsed.deserialize(token)
            header = parsed.jose_header
            kid = header.get("kid")
            keys = self._authserver_keys()
            if kid is not None and keys.get_key(kid) is None:
                keys = self._authserver_keys(refresh=True)
            claims = json.loads(jwt.JWT(jwt=token, key=keys, algs=["RS256"], check_claims={}).claims)
        except Exception as exc:
            raise Refusal(401, f"access token does not verify: {type(exc).__name__}", "invalid_token") from None
        if header.get("typ") != "at+jwt":
            raise Refusal(401, "access token typ must be at+jwt", "invalid_token")
        if claims.get("iss") != self.issuer:
            raise Refusal(401, "access token from another issuer", "invalid_token")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time():
            raise Refusal(401, "access token expired", "invalid_token")
        if self.scope not in str(claims.get("scope", "")).split():
            raise Refusal(403, f"access token lacks scope {self.scope}", "insufficient_scope")
        jkt = (claims.get("cnf") or {}).get("jkt")
        if not isinstance(jkt, str) or not jkt:
            raise Refusal(401, "access token is not DPoP-bound (no cnf.jkt)", "invalid_token")
        return token, claims

    def _check_proof(self, proofs: list[str], token: str, jkt: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if len(proofs) != 1:
            raise Refusal(401, "exactly one DPoP header is required", "invalid_dpop_proof")
        try:
            proof = jws.JWS()
            proof.deserialize(proofs[0])
            header = proof.jose_header
            if header.get("typ") != "dpop+jwt" or header.get("alg") not in ALGS:
                raise ValueError("typ must be dpop+jwt and alg one of HelseID's")
            key = jwk.JWK(**header["jwk"])
            if key.has_private or any(m in header["jwk"] for m in PRIVATE_MEMBERS):
                raise ValueError("the jwk header holds private members")
            proof.verify(key, alg=header["alg"])
            claims = json.loads(proof.payload)
        except Exception as exc:
            raise Refusal(401, f"DPoP proof invalid: {exc}", "invalid_dpop_proof") from None
        now = time.time()
        problems = []
        if key.thumbprint() != jkt:
            problems.append("proof key does not match the token's cnf.jkt")
        if claims.get("htm") != "POST":
            problems.append("htm must be POST")
        if claims.get("htu") != self.endpoint:
            problems.append(f"htu must be {self.endpoint}")
        if not isinstance(claims.get("iat"), int) or abs(claims["iat"] - now) > PROOF_MAX_AGE:
            problems.append("iat missing or not within a minute of now")
        if claims.get("ath") != _b64url(hashlib.sha256(token.encode("ascii")).digest()):
            problems.append("ath must be the SHA-256 of the access token")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            problems.append("jti missing")
        if problems:
            raise Refusal(401, "DPoP proof invalid: " + "; ".join(problems), "invalid_dpop_proof")
        if self.require_nonce and claims.get("nonce") != self.nonce:
            raise Refusal(401, "a DPoP nonce is required", "use_dpop_nonce", {"DPoP-Nonce": self.nonce})
        with self._lock:
            if jti in self._seen_jti:
                raise Refusal(401, "DPoP proof replayed (jti seen before)", "invalid_dpop_proof")
            self._seen_jti.add(jti)
        return header, claims

    @staticmethod
    def _check_body(content_type: str, body: bytes) -> dict[str, Any]:
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise Refusal(415, "Content-Type must be application/json")
        try:
            key = json.loads(body)
        except ValueError:
            raise Refusal(400, "body is not JSON") from None
        if not isinstance(key, dict):
            raise Refusal(400, "body must be a JWK object")
        private = [m for m in PRIVATE_MEMBERS if m in key]
        if private:
            raise Refusal(400, f"the JWK holds private members {private}: upload the PUBLIC key only")
        if key.get("kty") not in ("RSA", "EC"):
            raise Refusal(400, "kty must be RSA or EC")
        if "alg" in key and key["alg"] not in ALGS:
            raise Refusal(400, f"alg must be one of {', '.join(ALGS)}")
        try:
            if jwk.JWK(**key).has_private:
                raise Refusal(400, "the JWK holds private material")
        except Refusal:
            raise
        except Exception as exc:
            raise Refusal(400, f"not a valid JWK: {type(exc).__name__}") from None
        return key

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Decide one request: (status, extra headers, JSON body)."""
        try:
            if path.split("?")[0] != PATH:
                raise Refusal(404, "no such endpoint")
            if method != "POST":
                raise Refusal(405, "only POST")
            token, token_claims = self._check_token(headers.get("Authorization"))
            proof_header, proof_claims = self._check_proof(
                headers.get_all("DPoP") or [], token, token_claims["cnf"]["jkt"]
            )
            key = self._check_body(headers.get("Content-Type", ""), body)
            if self.answer_error is not None:
                status, problem, *extra = self.answer_error
                self.refused.append((status, "answer_error"))
                return status, {"Content-Type": "application/problem+json", **(extra[0] if extra else {})}, problem
            self.received.append(Upload(key, token_claims, proof_claims, proof_header, headers.get("Content-Type")))
            if self.on_upload is not None:
                self.on_upload(key, str(token_claims.get("client_id", "")))
            expires = (datetime.now(UTC) + timedelta(days=365)).isoformat()
            return 200, {}, {"expiration": self.expiration() if self.expiration else expires}
        except Refusal as refusal:
            self.refused.append((refusal.status, refusal.reason))
            extra = dict(refusal.headers)
            if refusal.challenge:
                extra["WWW-Authenticate"] = f'DPoP error="{refusal.challenge}", algs="{" ".join(ALGS)}"'
            problem = {"type": "about:blank", "title": refusal.reason, "status": refusal.status}
            return refusal.status, {"Content-Type": "application/problem+json", **extra}, problem


def _handler(state: SelfServiceStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, extra, payload = state.handle(self.command, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", extra.pop("Content-Type", "application/json"))
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET = do_PUT = _answer

        def log_message(self, format: str, *args: Any) -> None:
            """No access log: it would hold nothing secret, but it is noise on stderr."""

    return Handler


@contextlib.contextmanager
def running_selfservice(issuer: str, jwks_uri: str, **options: Any) -> Iterator[SelfServiceStandIn]:
    """Serve a :class:`SelfServiceStandIn` on 127.0.0.1 and a free port until the block ends.
    ``issuer``/``jwks_uri``: the local authorization server's; ``options``: its attributes."""
    state = SelfServiceStandIn(issuer=issuer, jwks_uri=jwks_uri, **options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="selfservice-standin", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
