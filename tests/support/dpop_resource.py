"""A loopback DPoP resource server for the client library's tests: it checks every request
with jwcrypto (independent of the product), demands its own nonce when told to, and records
exactly what reached it - the headers and the SHA-256 of every body byte, chunked or not.

Behaviour is set per test on :attr:`RecordingApi.state` (a :class:`Script`):

* ``require_nonce``: a proof without the current nonce gets 401 ``use_dpop_nonce`` and
  ``DPoP-Nonce``; ``rotate_nonce()`` makes a new one;
* ``bad_nonce_once``: the next answer carries this (invalid) ``DPoP-Nonce`` instead;
* ``refuse_token``: the next N requests get 401 ``DPoP error="invalid_token"``;
* ``redirects``: path -> Location; a request to that path gets 307 without any check;
* ``documents``: path -> JSON answered to any request for that path without any check (a
  discovery document).

Routes (everything under ``/api`` is protected): ``HEAD`` / ``GET`` any path -> 200 ``{}``;
``POST`` / ``PUT`` -> 201 with ``{"length", "sha256", "parts"}`` of the body received
(``parts``: name -> SHA-256 of each multipart part's content). Paths outside ``/api``
(``/elsewhere/...``) are recorded and answered 200 without any check: they stand for a
URL the signer never signed for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
from jwcrypto import jwk, jws, jwt

IAT_WINDOW = 10  # seconds a proof's iat may differ from now


@dataclass
class Seen:
    """One request as it reached the server."""

    method: str
    path: str
    headers: dict[str, str] = field(repr=False)  # holds the token: never in a test's output
    body: bytes = field(repr=False)
    status: int = 0
    token: str | None = field(default=None, repr=False)
    proof: dict | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def parts(self) -> dict[str, str]:
        """Multipart part name -> SHA-256 of its content."""
        return _multipart_parts(self.headers.get("content-type", ""), self.body)


@dataclass
class Script:
    require_nonce: bool = False
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    bad_nonce_once: str | None = None
    refuse_token: int = 0
    redirects: dict[str, str] = field(default_factory=dict)
    documents: dict[str, dict] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    jti: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rotate_nonce(self) -> None:
        self.nonce = secrets.token_urlsafe(16)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _multipart_parts(content_type: str, body: bytes) -> dict[str, str]:
    if not content_type.startswith("multipart/form-data") or "boundary=" not in content_type:
        return {}
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    parts: dict[str, str] = {}
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        parts[name] = hashlib.sha256(content).hexdigest()
    return parts


class Refused(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def check(script: Script, keys: jwk.JWKSet, issuer: str, method: str, url: str, headers: dict[str, str]) -> tuple:
    """RFC 9449 section 7.1 checks: token signature and iss, cnf.jkt, proof signature, htm,
    htu (without query), iat, jti, ath, the nonce. Returns (token, proof claims)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "dpop" or not token:
        raise Refused("invalid_token")
    try:
        claims = json.loads(jwt.JWT(jwt=token, key=keys, algs=["RS256"]).claims)
    except Exception:
        raise Refused("invalid_token") from None
    if claims.get("iss") != issuer or claims.get("exp", 0) <= time.time():
        raise Refused("invalid_token")
    proof_jwt = headers.get("dpop", "")
    try:
        header = json.loads(base64.urlsafe_b64decode(proof_jwt.split(".")[0] + "=="))
        key = jwk.JWK(**header["jwk"])
        verified = jws.JWS()
        verified.deserialize(proof_jwt, key=key, alg=header["alg"])
        proof = json.loads(verified.payload)
    except Exception:
        raise Refused("invalid_dpop_proof") from None
    parts = urlsplit(url)
    if header.get("typ") != "dpop+jwt" or proof.get("htm") != method:
        raise Refused("invalid_dpop_proof")
    if proof.get("htu") != f"{parts.scheme}://{parts.netloc}{parts.path or '/'}":
        raise Refused("invalid_dpop_proof")
    if abs(proof.get("iat", 0) - time.time()) > IAT_WINDOW:
        raise Refused("invalid_dpop_proof")
    if proof.get("ath") != _b64(hashlib.sha256(token.encode()).digest()):
        raise Refused("invalid_dpop_proof")
    if key.thumbprint() != (claims.get("cnf") or {}).get("jkt"):
        raise Refused("invalid_dpop_proof")
    with script.lock:
        if proof.get("jti") in script.jti:
            raise Refused("invalid_dpop_proof")
        script.jti.add(proof.get("jti"))
        if script.refuse_token > 0:
            script.refuse_token -= 1
            raise Refused("invalid_token")
        if script.require_nonce and proof.get("nonce") != script.nonce:
            raise Refused("use_dpop_nonce")
    return token, proof


def _handler(api: RecordingApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        timeout = 10  # seconds: a client that declares more bytes than it sends must not hang a test

        def log_message(self, format: str, *args: object) -> None:  # no access log: it would hold tokens
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _answer(self, seen: Seen, status: int, body: dict, extra: dict[str, str]) -> None:
            script = api.state
            with script.lock:
                if script.bad_nonce_once is not None:
                    extra["DPoP-Nonce"], script.bad_nonce_once = script.bad_nonce_once, None
            data = b"" if self.command == "HEAD" else json.dumps(body).encode()
            seen.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            script = api.state
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = urlsplit(self.path).path
            seen = Seen(self.command, path, headers, body)
            seen.token = headers.get("authorization", "").partition(" ")[2] or None
            with script.lock:
                script.seen.append(seen)
            if path in script.redirects:
                self._answer(seen, 307, {}, {"Location": script.redirects[path]})
                return
            if path in script.documents:
                self._answer(seen, 200, script.documents[path], {})
                return
            if path.startswith("/api/"):
                try:
                    _, seen.proof = check(script, api.keys, api.issuer, self.command, api.base_url + self.path, headers)
                except Refused as exc:
                    extra = {"WWW-Authenticate": f'DPoP error="{exc.error}", algs="ES256 PS256"'}
                    if script.require_nonce:
                        extra["DPoP-Nonce"] = script.nonce
                    self._answer(seen, 401, {"error": exc.error}, extra)
                    return
            extra = {"DPoP-Nonce": script.nonce} if script.require_nonce else {}
            if self.command in ("POST", "PUT"):
                answer = {
                    "length": len(body),
                    "sha256": seen.sha256,
                    "parts": seen.parts,
                }
                self._answer(seen, 201, answer, extra)
            else:
                self._answer(seen, 200, {}, extra)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    return Handler


class RecordingApi:
    """Runs the server on 127.0.0.1 (a free port) in a background thread.

    Args:
        issuer: the authorization server whose access tokens are accepted (JWKS from its
            discovery); None for a server that checks nothing (a redirect target).
    """

    def __init__(self, issuer: str | None = None) -> None:
        self.issuer = issuer or ""
        self.keys = jwk.JWKSet()
        if issuer:
            document = httpx.get(issuer.rstrip("/") + "/.well-known/openid-configuration").json()
            self.keys = jwk.JWKSet.from_json(httpx.get(document["jwks_uri"]).text)
        self.state = Script()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-api", daemon=True)

    def reset(self, **script: object) -> Script:
        """A new script (and an empty record) for the next test."""
        self.state = Script(**script)  # type: ignore[arg-type]
        return self.state

    def __enter__(self) -> RecordingApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
