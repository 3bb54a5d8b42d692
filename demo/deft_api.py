"""A small DPoP-protected API standing in for DEFT, for the demo and the tests.

It checks every request the way an NHN resource server does (RFC 9449 sections 4.3 and
7.1), with jwcrypto - an implementation independent of helseid-signer:

* ``Authorization: DPoP <token>`` (a ``Bearer`` scheme is refused for a bound token);
* the access token: a JWT signed by the authorization server (its JWKS), ``iss`` equal to
  the issuer, ``aud`` the expected resource, not expired, carrying ``cnf.jkt``;
* the DPoP proof: ``typ`` ``dpop+jwt``, an asymmetric ``alg``, a public-only ``jwk``, a
  valid signature by that ``jwk``, ``htm`` = the request method, ``htu`` = the request URL
  without query and fragment, ``iat`` within -6 s ... +5 s of now, a ``jti`` not seen
  before (replay cache), ``ath`` = base64url(SHA-256(token)), and the ``jwk``'s RFC 7638
  thumbprint equal to the token's ``cnf.jkt``;
* optionally a server nonce (``require_nonce``): a proof without the current nonce gets
  401 ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header.

Routes: ``GET /api/whoami`` answers the token's ``client_id``, ``scope`` and the proof's
``htu``; ``POST /api/files`` (DEFT-like upload, query ``SenderHerId``/``ReceiverHerIds``)
answers the byte count. Everything else is 404. Errors are JSON ``{"error", "detail"}``.
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
from urllib.parse import parse_qs, urlsplit

import httpx
from jwcrypto import jwk, jws, jwt

ALLOWED_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
IAT_PAST, IAT_FUTURE = 6, 5  # seconds of skew accepted for a proof's iat


class Refused(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class ApiState:
    """What the API remembers: the authorization server's keys, seen ``jti`` values, the nonce."""

    issuer: str
    audience: str
    jwks: jwk.JWKSet
    require_nonce: bool = False
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    seen_jti: dict[str, float] = field(default_factory=dict)
    pruned_at: float = 0.0
    accepted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_request(state: ApiState, method: str, url: str, headers: dict[str, str]) -> tuple[dict, dict]:
    """Check a request's token and DPoP proof; return (token claims, proof claims) or raise Refused."""
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "dpop" or not token:
        raise Refused(401, "invalid_token", "Authorization must be 'DPoP <access token>'")
    try:
        claims = json.loads(jwt.JWT(jwt=token, key=state.jwks, algs=["RS256"]).claims)
    except Exception as exc:
        raise Refused(401, "invalid_token", f"access token: {type(exc).__name__}") from None
    now = time.time()
    if claims.get("iss") != state.issuer or claims.get("aud") != state.audience or claims.get("exp", 0) <= now:
        raise Refused(401, "invalid_token", "access token: wrong iss/aud or expired")
    jkt = (claims.get("cnf") or {}).get("jkt")
    if not jkt:
        raise Refused(401, "invalid_token", "access token is not DPoP-bound (no cnf.jkt)")
    proof_jwt = headers.get("dpop")
    if not proof_jwt or "," in proof_jwt:
        raise Refused(401, "invalid_dpop_proof", "exactly one DPoP header is required")
    try:
        header = json.loads(base64.urlsafe_b64decode(proof_jwt.split(".")[0] + "=="))
        if header.get("typ") != "dpop+jwt" or header.get("alg") not in ALLOWED_ALGS:
            raise Refused(401, "invalid_dpop_proof", "typ must be dpop+jwt with an asymmetric alg")
        key = jwk.JWK(**header["jwk"])
        if key.has_private:
            raise Refused(401, "invalid_dpop_proof", "jwk holds private key material")
        proof = jws.JWS()
        proof.deserialize(proof_jwt, key=key, alg=header["alg"])
        pclaims = json.loads(proof.payload)
    except Refused:
        raise
    except Exception as exc:
        raise Refused(401, "invalid_dpop_proof", f"proof does not verify: {type(exc).__name__}") from None
    parts = urlsplit(url)
    expected_htu = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
    if pclaims.get("htm") != method:
        raise Refused(401, "invalid_dpop_proof", f"htm {pclaims.get('htm')!r} is not {method!r}")
    if pclaims.get("htu") != expected_htu:
        raise Refused(401, "invalid_dpop_proof", f"htu {pclaims.get('htu')!r} is not {expected_htu!r}")
    iat = pclaims.get("iat")
    if not isinstance(iat, int) or not now - IAT_PAST <= iat <= now + IAT_FUTURE:
        raise Refused(401, "invalid_dpop_proof", "iat outside the accepted window")
    if pclaims.get("ath") != _b64(hashlib.sha256(token.encode("ascii")).digest()):
        raise Refused(401, "invalid_dpop_proof", "ath does not match the access token")
    if key.thumbprint() != jkt:
        raise Refused(401, "invalid_dpop_proof", "proof key does not match the token's cnf.jkt")
    with state.lock:
        if state.require_nonce and pclaims.get("nonce") != state.nonce:
            raise Refused(401, "use_dpop_nonce", "a DPoP nonce is required")
        jti = pclaims.get("jti")
        if not isinstance(jti, str) or not jti or jti in state.seen_jti:
            raise Refused(401, "invalid_dpop_proof", "jti missing or replayed")
        if now - state.pruned_at >= 1.0:  # at most once a second: a rebuild per request is O(n^2) under load
            state.seen_jti = {j: t for j, t in state.seen_jti.items() if t > now - 60}
            state.pruned_at = now
        state.seen_jti[jti] = now
        state.accepted += 1
    return claims, pclaims


def make_handler(state: ApiState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # no access log: it would hold tokens
            pass

        def _answer(self, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            host = self.headers.get("Host", f"{self.server.server_address[0]}:{self.server.server_address[1]}")
            url = f"http://{host}{self.path}"
            route = urlsplit(self.path).path
            if (self.command, route) not in {("GET", "/api/whoami"), ("POST", "/api/files")}:
                self._answer(404, {"error": "not_found", "detail": route})
                return
            try:
                claims, proof = check_request(state, self.command, url, {k.lower(): v for k, v in self.headers.items()})
            except Refused as exc:
                extra = {"WWW-Authenticate": f'DPoP error="{exc.error}", algs="{" ".join(ALLOWED_ALGS)}"'}
                if exc.error == "use_dpop_nonce" or state.require_nonce:
                    extra["DPoP-Nonce"] = state.nonce
                self._answer(exc.status, {"error": exc.error, "detail": exc.detail}, extra)
                return
            if route == "/api/whoami":
                answer = {"client_id": claims.get("client_id"), "scope": claims.get("scope"), "htu": proof["htu"]}
            else:
                query = parse_qs(urlsplit(self.path).query)
                answer = {"received_bytes": len(body), "sender": query.get("SenderHerId"),
                          "receivers": query.get("ReceiverHerIds")}  # fmt: skip
            self._answer(200, answer)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler


class DeftApi:
    """Runs the API on 127.0.0.1 in a background thread.

    Args:
        issuer: the authorization server's issuer (its JWKS is fetched from discovery).
        audience: the ``aud`` access tokens must carry (oidc-provider's resource).
        require_nonce: demand the API's own DPoP nonce (RFC 9449 section 9).
        port: the TCP port on 127.0.0.1 (0: a free one).
    """

    def __init__(self, issuer: str, audience: str = "urn:nhn:deft", require_nonce: bool = False, port: int = 0) -> None:
        document = httpx.get(issuer.rstrip("/") + "/.well-known/openid-configuration").json()
        jwks = jwk.JWKSet.from_json(httpx.get(document["jwks_uri"]).text)
        self.state = ApiState(issuer=issuer, audience=audience, jwks=jwks, require_nonce=require_nonce)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.state))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="deft-api", daemon=True)

    def reset(self, require_nonce: bool) -> DeftApi:
        """Start counting afresh, with a new nonce and the given nonce demand (tests)."""
        with self.state.lock:
            self.state.require_nonce = require_nonce
            self.state.nonce = secrets.token_urlsafe(16)
            self.state.accepted = 0
        return self

    def __enter__(self) -> DeftApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.deft_api --issuer URL [--port N] [--audience A] [--require-nonce]``
    (from the repository root, with the project's .venv): serve the stand-in on 127.0.0.1
    until Ctrl-C. Prints one JSON line ``{"base_url": ...}`` when ready (docs/operations.md,
    "Trying a configuration before HelseID")."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m demo.deft_api", description="DPoP-protected DEFT stand-in")
    parser.add_argument("--issuer", required=True, help="the authorization server's issuer (its JWKS is fetched)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--audience", default="urn:nhn:deft", help="the aud access tokens must carry")
    parser.add_argument("--require-nonce", action="store_true", help="demand the API's own DPoP nonce")
    args = parser.parse_args(argv)
    with DeftApi(args.issuer, args.audience, args.require_nonce, args.port) as api:
        print(json.dumps({"base_url": api.base_url + "/api"}), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
