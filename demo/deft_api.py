"""A stand-in for DEFT (NHN's large-file transport), for the demo, the tests and the benchmark.

NOT the real service: it speaks DEFT's REST API as NHN's developer portal describes it
(utviklerportal.nhn.no, "DEFT REST API" - "Store filer / DEFT" endpoint list and the "Flyt"
page), with the parts NHN does not publish reconstructed close to S3's multipart upload.
docs/demo.md has the endpoint table and, for each endpoint, what is published and what is
reconstructed. Routes (under ``/api``, the API base the signer's profile allows):

=======  =============================================  =======================================
POST     /objects?SenderHerId=..&ReceiverHerIds=..      one whole file, multipart/form-data
POST     /objects/initialization                        start a multipart upload (JSON)
POST     /objects/{key}/part                            one part (multipart/form-data)
POST     /objects/{key}/completion                      join the parts (JSON)
POST     /objects/{key}/cancellation                    drop the upload (JSON)
GET      /objects/{key}                                 download
DELETE   /objects/{key}                                 delete (the uploader)
PUT      /objects/{key}/download-receipt/{markerHerId}  a receiver marks the file downloaded
GET      /objects/{key}/download-status                 which receivers have marked it
=======  =============================================  =======================================

Every request is checked the way an NHN resource server does (RFC 9449 sections 4.3 and 7.1),
with jwcrypto - an implementation independent of helseid-signer - BEFORE its body is read
(a slow upload is not refused for a proof that aged while the bytes arrived):

* ``Authorization: DPoP <token>`` (a ``Bearer`` scheme is refused for a bound token);
* the access token: a JWT signed by the authorization server (its JWKS), ``iss`` equal to
  the issuer, ``aud`` the expected resource, not expired, carrying ``cnf.jkt``;
* the DPoP proof: ``typ`` ``dpop+jwt``, an asymmetric ``alg``, a public-only ``jwk``, a
  valid signature by that ``jwk``, ``htm`` = the request method, ``htu`` = the request URL
  without query and fragment, ``iat`` within -6 s ... +5 s of now, a ``jti`` not seen
  before (replay cache), ``ath`` = base64url(SHA-256(token)), and the ``jwk``'s RFC 7638
  thumbprint equal to the token's ``cnf.jkt``;
* optionally its own server nonce (``require_nonce``): a proof without a current nonce gets
  401 ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header. The
  nonce can rotate (``nonce_lifetime``); the previous one stays valid for one more period and
  every answer carries the current one (RFC 9449 section 8.2), so a client that remembers
  the last ``DPoP-Nonce`` it saw is never challenged again.

Bytes go to files in a temporary folder, streamed in chunks of ``CHUNK`` bytes: memory stays
bounded whatever the size of an upload. A refused request's body is read and dropped (up to
``DRAIN_LIMIT``; beyond that the connection is closed) so the client reads the answer.
Errors are JSON ``{"error", "detail"}``; nothing is logged (an access log would hold tokens).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
from jwcrypto import jwk, jws, jwt
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

ALLOWED_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
IAT_PAST, IAT_FUTURE = 6, 5  # seconds of skew accepted for a proof's iat
PREFIX = "/api"  # where the routes live; the signer's api_base_urls point here
CHUNK = 1 << 20  # bytes read from the socket / written to disk at a time
FORM_CHUNK = 256 * 1024  # multipart/form-data is parsed in pieces of this size (werkzeug is fastest here)
MAX_JSON_BYTES = 64 * 1024
MAX_FIELD_BYTES = 4096  # a non-file form field (uploadId, partNumber)
MAX_PART_NUMBER = 10_000  # "partNumber er begrenset til å være mellom 1 og 10 000" (NHN, Flyt)
DRAIN_LIMIT = 1 << 30  # a refused request's body up to this is read and dropped; beyond: close
HER_ID = re.compile(r"[1-9][0-9]{0,14}")


class Refused(Exception):
    """A request the API refuses: HTTP ``status``, an ``error`` code and a ``detail`` text."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class Accepted:
    """One request that passed the token and proof checks (what tests look at)."""

    method: str
    path: str
    htu: str
    client_id: str | None
    scope: str | None
    token_jti: str | None
    nonce: str | None


@dataclass
class StoredObject:
    """A file (or an upload under way) and who may do what with it."""

    key: str
    file_name: str
    sender_her_id: int
    receiver_her_ids: list[int]
    owner: str  # the uploading client's client_id
    upload_id: str | None = None  # set while a multipart upload is open
    parts: dict[int, tuple[Path, str, int]] = field(default_factory=dict)  # number -> (file, eTag, size)
    files: list[Path] = field(default_factory=list)  # the content, in order, once complete
    size: int = 0
    complete: bool = False
    deleted: bool = False
    receipts: dict[int, bool] = field(default_factory=dict)


@dataclass
class ApiState:
    """What the API remembers: the authorization server's keys, seen ``jti`` values, the nonce,
    the objects, and counters of what it accepted and refused."""

    issuer: str
    audience: str
    jwks: jwk.JWKSet
    folder: Path
    require_nonce: bool = False
    nonce_lifetime: float | None = None
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    previous_nonce: str | None = None
    nonce_since: float = field(default_factory=time.monotonic)
    seen_jti: dict[str, float] = field(default_factory=dict)
    pruned_at: float = 0.0
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)  # error code -> count
    log: deque = field(default_factory=lambda: deque(maxlen=10_000))  # Accepted records
    objects: dict[str, StoredObject] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current_nonce(self) -> str:
        """The nonce to announce; rotates it when ``nonce_lifetime`` has passed (call with lock)."""
        if self.nonce_lifetime is not None and time.monotonic() - self.nonce_since >= self.nonce_lifetime:
            self.previous_nonce, self.nonce = self.nonce, secrets.token_urlsafe(16)
            self.nonce_since = time.monotonic()
        return self.nonce


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_request(state: ApiState, method: str, url: str, headers: dict[str, str]) -> tuple[dict, dict]:
    """Check a request's token and DPoP proof; return (token claims, proof claims) or raise Refused.

    ``headers`` keys are lower-case. Sources: RFC 9449 sections 4.3 (proof checks), 7.1
    (``ath``, ``cnf.jkt``), 8 (server nonce), 11.1 (``jti`` replay).
    """
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
        current = state.current_nonce()
        valid = {current, state.previous_nonce} - {None}
        if state.require_nonce and pclaims.get("nonce") not in valid:
            raise Refused(401, "use_dpop_nonce", "a DPoP nonce is required")
        jti = pclaims.get("jti")
        if not isinstance(jti, str) or not jti or jti in state.seen_jti:
            raise Refused(401, "invalid_dpop_proof", "jti missing or replayed")
        if now - state.pruned_at >= 1.0:  # at most once a second: a rebuild per request is O(n^2) under load
            state.seen_jti = {j: t for j, t in state.seen_jti.items() if t > now - 60}
            state.pruned_at = now
        state.seen_jti[jti] = now
        state.accepted += 1
        state.log.append(
            Accepted(method, parts.path, pclaims["htu"], claims.get("client_id"), claims.get("scope"),
                     claims.get("jti"), pclaims.get("nonce"))
        )  # fmt: skip
    return claims, pclaims


# -- request bodies ---------------------------------------------------------------------------


class Body:
    """The request body as a stream of chunks (``Content-Length`` or chunked transfer coding)."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._rfile = handler.rfile
        self.chunked = "chunked" in handler.headers.get("Transfer-Encoding", "").lower()
        length = handler.headers.get("Content-Length")
        if not self.chunked and length is not None and not length.isdigit():
            raise Refused(400, "invalid_request", "Content-Length is not a number")
        self.length = None if self.chunked else int(length or 0)
        self._left = self.length or 0
        self._chunk_left = 0
        self.done = not self.chunked and self._left == 0

    def read(self, limit: int = CHUNK) -> bytes:
        """Up to ``limit`` bytes; b"" at the end."""
        if self.done:
            return b""
        if not self.chunked:
            data = self._rfile.read(min(limit, self._left))
            if not data:
                raise Refused(400, "invalid_request", "the body ended before Content-Length bytes")
            self._left -= len(data)
            self.done = self._left == 0
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(100)
            try:
                self._chunk_left = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise Refused(400, "invalid_request", "bad chunk size in the chunked body") from None
            if self._chunk_left == 0:
                while self._rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return b""
        data = self._rfile.read(min(limit, self._chunk_left))
        if not data:
            raise Refused(400, "invalid_request", "the chunked body ended early")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(8)  # CRLF after the chunk data
        return data

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        while data := self.read(size):
            yield data

    def read_all(self, limit: int) -> bytes:
        """The whole body, refused when longer than ``limit`` bytes (JSON bodies)."""
        out = bytearray()
        for data in self.chunks():
            out += data
            if len(out) > limit:
                raise Refused(413, "invalid_request", f"body longer than {limit} bytes")
        return bytes(out)

    def drain(self) -> bool:
        """Read and drop what is left; False when more than DRAIN_LIMIT was left (close instead)."""
        if self.length is not None and self._left > DRAIN_LIMIT:
            return False
        dropped = 0
        try:
            for data in self.chunks():
                dropped += len(data)
                if dropped > DRAIN_LIMIT:
                    return False
        except (Refused, OSError):
            return False
        return True


@dataclass
class FormFile:
    """A file field of a multipart/form-data body, written to ``path``."""

    name: str
    filename: str
    path: Path
    size: int
    sha256: str


def read_form(body: Body, content_type: str, folder: Path) -> tuple[dict[str, str], list[FormFile]]:
    """Parse multipart/form-data (RFC 7578) as it arrives: fields (small, in memory) and files
    (streamed to new files in ``folder``, hashed with SHA-256 on the way). Werkzeug's sans-IO
    decoder does the parsing."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise Refused(415, "invalid_request", "Content-Type must be multipart/form-data with a boundary")
    # No max_form_memory_size: werkzeug applies it to its whole buffer (file data too); field
    # lengths are bounded below instead.
    decoder = MultipartDecoder(match.group(1).encode("latin-1"))
    fields: dict[str, str] = {}
    files: list[FormFile] = []
    current: tuple | None = None  # ("field", name, bytearray) | ("file", FormFile, handle, hasher)
    finished = False
    chunks = body.chunks(FORM_CHUNK)
    try:
        while not finished:
            event = decoder.next_event()  # raises ValueError past the end of a truncated body
            if isinstance(event, NeedData):
                decoder.receive_data(next(chunks, None))  # None marks the end of the body
                continue
            if isinstance(event, File):
                path = folder / f"upload-{uuid.uuid4().hex}"
                form_file = FormFile(event.name, event.filename or "", path, 0, "")
                current = ("file", form_file, path.open("wb"), hashlib.sha256())
            elif isinstance(event, Field):
                current = ("field", event.name, bytearray())
            elif isinstance(event, Data):
                if current is None:
                    raise Refused(400, "invalid_request", "multipart data outside a part")
                if current[0] == "field":
                    current[2].extend(event.data)
                    if len(current[2]) > MAX_FIELD_BYTES:
                        raise Refused(413, "invalid_request", f"form field {current[1]!r} is too long")
                else:
                    current[2].write(event.data)
                    current[3].update(event.data)
                    current[1].size += len(event.data)
                if not event.more_data:
                    if current[0] == "field":
                        fields[current[1]] = current[2].decode("utf-8", "replace")
                    else:
                        current[2].close()
                        current[1].sha256 = current[3].hexdigest()
                        files.append(current[1])
                    current = None
            elif isinstance(event, Epilogue):
                finished = True
    except Refused:
        _discard(files, current)
        raise
    except ValueError as exc:  # werkzeug: malformed body
        _discard(files, current)
        raise Refused(400, "invalid_request", f"malformed multipart/form-data: {exc}") from None
    except BaseException:
        _discard(files, current)
        raise
    return fields, files


def _discard(files: list[FormFile], current: tuple | None) -> None:
    if current is not None and current[0] == "file":
        current[2].close()
        files.append(current[1])
    for f in files:
        f.path.unlink(missing_ok=True)


# -- the routes ---------------------------------------------------------------------------------


def _her_id(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and HER_ID.fullmatch(value):
        return int(value)
    raise Refused(400, "invalid_request", f"{name} must be a HER-id (a positive integer), got {value!r}")


def _json(body: Body) -> dict:
    try:
        value = json.loads(body.read_all(MAX_JSON_BYTES) or b"null")
    except ValueError:
        raise Refused(400, "invalid_request", "the body is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, "invalid_request", "the body must be a JSON object")
    return value


class Routes:
    """DEFT's routes over an :class:`ApiState`. Each returns (status, JSON body or None,
    extra headers) or, for a download, a list of files to stream."""

    def __init__(self, state: ApiState, base_url: str) -> None:
        self.state, self.base_url = state, base_url

    def location(self, key: str) -> str:
        return f"{self.base_url}{PREFIX}/objects/{key}"

    def _object(self, key: str, claims: dict | None = None, owner_only: bool = False) -> StoredObject:
        obj = self.state.objects.get(key)
        if obj is None:
            raise Refused(404, "not_found", f"no object with key {key!r}")
        if owner_only and claims is not None and claims.get("client_id") != obj.owner:
            raise Refused(403, "forbidden", "only the client that uploaded the object may do this")
        return obj

    def _created(self, obj: StoredObject) -> tuple[int, dict, dict]:
        return 201, {"key": obj.key}, {"Location": self.location(obj.key)}

    def upload_whole(self, claims: dict, query: dict, body: Body, content_type: str) -> tuple[int, dict, dict]:
        """``POST /objects?SenderHerId=..&ReceiverHerIds=..`` with one file in multipart/form-data."""
        senders = query.get("SenderHerId", [])
        if len(senders) != 1:
            raise Refused(400, "invalid_request", "SenderHerId must be given once in the query")
        sender = _her_id(senders[0], "SenderHerId")
        receivers = [_her_id(r, "ReceiverHerIds") for r in query.get("ReceiverHerIds", [])]
        if not receivers:
            raise Refused(400, "invalid_request", "ReceiverHerIds must be given at least once in the query")
        _, files = read_form(body, content_type, self.state.folder)
        if len(files) != 1 or not files[0].filename:
            _discard(files, None)
            raise Refused(400, "invalid_request", "exactly one file part with a filename in Content-Disposition")
        f = files[0]
        obj = StoredObject(str(uuid.uuid4()), f.filename, sender, receivers, claims.get("client_id") or "")
        obj.files, obj.size, obj.complete = [f.path], f.size, True
        obj.receipts = {r: False for r in receivers}
        with self.state.lock:
            self.state.objects[obj.key] = obj
        return self._created(obj)

    def initialization(self, claims: dict, body: Body) -> tuple[int, dict, dict]:
        """``POST /objects/initialization`` {fileName, senderHerId, receiverHerIds} -> {key, uploadId}."""
        request = _json(body)
        name = request.get("fileName")
        if not isinstance(name, str) or not name or len(name) > 255 or not name.isprintable():
            raise Refused(
                400, "invalid_request", "fileName must be 1..255 printable characters (no control characters)"
            )
        sender = _her_id(request.get("senderHerId"), "senderHerId")
        receivers = request.get("receiverHerIds")
        if not isinstance(receivers, list) or not receivers:
            raise Refused(400, "invalid_request", "receiverHerIds must be a non-empty list of HER-ids")
        receivers = [_her_id(r, "receiverHerIds") for r in receivers]
        obj = StoredObject(str(uuid.uuid4()), name, sender, receivers, claims.get("client_id") or "")
        obj.upload_id = _b64(secrets.token_bytes(24))
        obj.receipts = {r: False for r in receivers}
        with self.state.lock:
            self.state.objects[obj.key] = obj
        return 200, {"key": obj.key, "uploadId": obj.upload_id}, {}

    def _open_upload(self, key: str, claims: dict, upload_id: object) -> StoredObject:
        obj = self._object(key, claims, owner_only=True)
        if obj.upload_id is None:
            raise Refused(409, "conflict", "the object has no multipart upload open")
        if upload_id != obj.upload_id:
            raise Refused(400, "invalid_request", "uploadId does not match the object's upload")
        return obj

    def part(self, key: str, claims: dict, body: Body, content_type: str) -> tuple[int, dict, dict]:
        """``POST /objects/{key}/part`` form fields uploadId, partNumber (1..10000) and file -> {partNumber, eTag}.

        The part is written to disk first (NHN's example sends partNumber after the file), then
        checked; a part sent again with the same number replaces the earlier one."""
        self._object(key, claims, owner_only=True)  # refuse early, before reading a part for nothing
        fields, files = read_form(body, content_type, self.state.folder)
        try:
            if len(files) != 1:
                raise Refused(400, "invalid_request", "exactly one file part is required")
            number = fields.get("partNumber", "")
            if not number.isdigit() or not 1 <= int(number) <= MAX_PART_NUMBER:
                raise Refused(400, "invalid_request", f"partNumber must be 1..{MAX_PART_NUMBER}, got {number!r}")
            with self.state.lock:
                obj = self._open_upload(key, claims, fields.get("uploadId"))
                old = obj.parts.get(int(number))
                obj.parts[int(number)] = (files[0].path, files[0].sha256, files[0].size)
        except Refused:
            _discard(files, None)
            raise
        if old is not None:
            old[0].unlink(missing_ok=True)
        return 200, {"partNumber": int(number), "eTag": files[0].sha256}, {"ETag": f'"{files[0].sha256}"'}

    def completion(self, key: str, claims: dict, body: Body) -> tuple[int, dict, dict]:
        """``POST /objects/{key}/completion`` {uploadId, parts: [{partNumber, eTag}]} -> 201 + Location + {key}.

        The parts listed (ascending numbers, each uploaded with that eTag) become the file, in
        that order; parts uploaded but not listed are dropped (as S3 does)."""
        request = _json(body)
        listed = request.get("parts")
        if not isinstance(listed, list) or not listed:
            raise Refused(400, "invalid_request", "parts must be a non-empty list of {partNumber, eTag}")
        with self.state.lock:
            obj = self._open_upload(key, claims, request.get("uploadId"))
            numbers: list[int] = []
            for i, p in enumerate(listed):
                if not isinstance(p, dict) or not isinstance(p.get("partNumber"), int):
                    raise Refused(400, "invalid_request", f"parts[{i}].partNumber must be an integer")
                n = p["partNumber"]
                if numbers and n <= numbers[-1]:
                    raise Refused(400, "invalid_request", f"parts[{i}].partNumber {n} is not ascending")
                if n not in obj.parts:
                    raise Refused(400, "invalid_request", f"parts[{i}]: part {n} was not uploaded")
                if p.get("eTag") != obj.parts[n][1]:
                    raise Refused(400, "invalid_request", f"parts[{i}].eTag does not match part {n}")
                numbers.append(n)
            dropped = [obj.parts[n][0] for n in obj.parts if n not in numbers]
            obj.files = [obj.parts[n][0] for n in numbers]
            obj.size = sum(obj.parts[n][2] for n in numbers)
            obj.parts, obj.upload_id, obj.complete = {}, None, True
        for path in dropped:
            path.unlink(missing_ok=True)
        return self._created(obj)

    def cancellation(self, key: str, claims: dict, body: Body) -> tuple[int, None, dict]:
        """``POST /objects/{key}/cancellation`` {uploadId} -> 204; the parts are deleted."""
        request = _json(body)
        with self.state.lock:
            obj = self._open_upload(key, claims, request.get("uploadId"))
            del self.state.objects[key]
        for path, _, _ in obj.parts.values():
            path.unlink(missing_ok=True)
        return 204, None, {}

    def download(self, key: str) -> StoredObject:
        """``GET /objects/{key}``: the object, once its upload is complete."""
        with self.state.lock:
            obj = self._object(key)
            if obj.deleted:
                raise Refused(404, "not_found", f"object {key!r} was deleted")
            if not obj.complete:
                raise Refused(409, "conflict", "the upload of this object is not complete")
        return obj

    def delete(self, key: str, claims: dict) -> tuple[int, None, dict]:
        """``DELETE /objects/{key}`` (the uploader) -> 204."""
        with self.state.lock:
            obj = self._object(key, claims, owner_only=True)
            del self.state.objects[key]
        self._remove_files(obj)
        return 204, None, {}

    def receipt(self, key: str, marker: str) -> tuple[int, None, dict]:
        """``PUT /objects/{key}/download-receipt/{markerHerId}`` -> 204. When every receiver has
        marked it, the file is deleted (its download status stays readable)."""
        her_id = _her_id(marker, "markerHerId")
        with self.state.lock:
            obj = self._object(key)
            if not obj.complete:
                raise Refused(409, "conflict", "the upload of this object is not complete")
            if her_id not in obj.receipts:
                raise Refused(403, "forbidden", f"markerHerId {her_id} is not a receiver of this object")
            obj.receipts[her_id] = True
            gone = all(obj.receipts.values()) and not obj.deleted
            if gone:
                obj.deleted = True
        if gone:
            self._remove_files(obj)
        return 204, None, {}

    def download_status(self, key: str) -> tuple[int, dict, dict]:
        """``GET /objects/{key}/download-status`` -> {receiverDownloadStatus: {herId: bool}}."""
        with self.state.lock:
            obj = self._object(key)
            return 200, {"receiverDownloadStatus": {str(k): v for k, v in obj.receipts.items()}}, {}

    def _remove_files(self, obj: StoredObject) -> None:
        for path in [*obj.files, *(p for p, _, _ in obj.parts.values())]:
            path.unlink(missing_ok=True)
        obj.files, obj.parts = [], {}


OBJECT_ROUTE = re.compile(
    r"/objects/([0-9a-f-]{36})(/part|/completion|/cancellation|/download-status|/download-receipt/([^/]+))?"
)


def make_handler(state: ApiState, routes_for: callable) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"
        rbufsize = CHUNK

        def log_message(self, format: str, *args: object) -> None:  # no access log: it would hold tokens
            pass

        def _answer(self, status: int, body: dict | None, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _nonce_header(self) -> dict[str, str]:
            if not state.require_nonce:
                return {}
            with state.lock:
                return {"DPoP-Nonce": state.current_nonce()}

        def _route(self) -> tuple[str, str | None, str | None] | None:
            path = urlsplit(self.path).path
            if not path.startswith(PREFIX + "/"):
                return None
            path = path[len(PREFIX) :]
            if path == "/objects":
                return ("objects", None, None) if self.command == "POST" else None
            if path == "/objects/initialization":
                return ("initialization", None, None) if self.command == "POST" else None
            m = OBJECT_ROUTE.fullmatch(path)
            if not m:
                return None
            key, sub, marker = m.group(1), m.group(2) or "", m.group(3)
            allowed = {
                "": ("GET", "DELETE"),
                "/part": ("POST",),
                "/completion": ("POST",),
                "/cancellation": ("POST",),
                "/download-status": ("GET",),
            }
            if marker is not None:
                return ("download-receipt", key, marker) if self.command == "PUT" else None
            if self.command not in allowed[sub]:
                return None
            name = {"": "object", "/part": "part", "/completion": "completion", "/cancellation": "cancellation",
                    "/download-status": "download-status"}[sub]  # fmt: skip
            return name, key, marker

        def _handle(self) -> None:
            try:
                body = Body(self)
            except Refused as exc:
                self.close_connection = True
                self._answer(exc.status, {"error": exc.error, "detail": exc.detail})
                return
            route = self._route()
            if route is None:
                if not body.drain():
                    self.close_connection = True
                self._answer(404, {"error": "not_found", "detail": urlsplit(self.path).path}, self._nonce_header())
                return
            host = self.headers.get("Host", f"{self.server.server_address[0]}:{self.server.server_address[1]}")
            url = f"http://{host}{self.path}"
            routes = routes_for()
            try:
                claims, _ = check_request(state, self.command, url, {k.lower(): v for k, v in self.headers.items()})
                answer = self._dispatch(routes, route, claims, body)
            except Refused as exc:
                with state.lock:
                    state.refused[exc.error] += 1
                extra = self._nonce_header()
                if exc.status == 401:
                    extra["WWW-Authenticate"] = f'DPoP error="{exc.error}", algs="{" ".join(ALLOWED_ALGS)}"'
                if not body.drain():
                    self.close_connection = True
                self._answer(exc.status, {"error": exc.error, "detail": exc.detail}, extra)
                return
            if isinstance(answer, StoredObject):
                self._send_file(answer)
                return
            status, payload, extra = answer
            self._answer(status, payload, {**extra, **self._nonce_header()})

        def _dispatch(self, routes: Routes, route: tuple, claims: dict, body: Body) -> object:
            name, key, marker = route
            content_type = self.headers.get("Content-Type", "")
            if name == "objects":
                return routes.upload_whole(claims, parse_qs(urlsplit(self.path).query), body, content_type)
            if name == "initialization":
                return routes.initialization(claims, body)
            if name == "part":
                return routes.part(key, claims, body, content_type)
            if name == "completion":
                return routes.completion(key, claims, body)
            if name == "cancellation":
                return routes.cancellation(key, claims, body)
            if not body.drain():  # the remaining routes take no body
                self.close_connection = True
            if name == "object":
                return routes.download(key) if self.command == "GET" else routes.delete(key, claims)
            if name == "download-receipt":
                return routes.receipt(key, marker)
            return routes.download_status(key)

        def _send_file(self, obj: StoredObject) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(obj.size))
            # RFC 6266: an ASCII fallback without quotes or controls, and the name percent-encoded
            fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in obj.file_name)
            self.send_header(
                "Content-Disposition", f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(obj.file_name)}"
            )
            for name, value in self._nonce_header().items():
                self.send_header(name, value)
            self.end_headers()
            try:
                for path in obj.files:
                    with path.open("rb") as f:
                        shutil.copyfileobj(f, self.wfile, CHUNK)
            except FileNotFoundError:  # deleted meanwhile: the client sees a short body
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            """No DEFT route takes HEAD: 405, with the current nonce like every answer (RFC 9449
            section 9 lets a server send one on any response), so a client about to stream a
            body it cannot send twice can learn the nonce first (docs/client.md)."""
            self.send_response(405)
            self.send_header("Allow", "GET, POST, PUT, DELETE")
            self.send_header("Content-Length", "0")
            for name, value in self._nonce_header().items():
                self.send_header(name, value)
            self.end_headers()

    return Handler


class DeftApi:
    """Runs the DEFT stand-in on 127.0.0.1 in a background thread; files in a temporary folder.

    Args:
        issuer: the authorization server's issuer (its JWKS is fetched from discovery).
        audience: the ``aud`` access tokens must carry (oidc-provider's resource).
        require_nonce: demand the API's own DPoP nonce (RFC 9449 section 9).
        nonce_lifetime: seconds before the nonce rotates (None: never); the previous nonce is
            accepted for one more period.
        port: the TCP port on 127.0.0.1 (0: a free one).

    Attributes:
        base_url: ``http://127.0.0.1:<port>``; the routes are under ``base_url + "/api"``
            (:attr:`api_url`).
        state: the :class:`ApiState` (accepted count, refusals by error, the log, objects).
    """

    def __init__(
        self,
        issuer: str,
        audience: str = "urn:nhn:deft",
        require_nonce: bool = False,
        nonce_lifetime: float | None = None,
        port: int = 0,
    ) -> None:
        document = httpx.get(issuer.rstrip("/") + "/.well-known/openid-configuration").json()
        jwks = jwk.JWKSet.from_json(httpx.get(document["jwks_uri"]).text)
        self._folder = tempfile.TemporaryDirectory(prefix="deft-standin-")
        self.state = ApiState(
            issuer=issuer,
            audience=audience,
            jwks=jwks,
            folder=Path(self._folder.name),
            require_nonce=require_nonce,
            nonce_lifetime=nonce_lifetime,
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.state, lambda: self.routes))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.api_url = self.base_url + PREFIX
        self.routes = Routes(self.state, self.base_url)
        self._thread = threading.Thread(target=self._server.serve_forever, name="deft-api", daemon=True)

    def reset(self, require_nonce: bool) -> DeftApi:
        """Start counting afresh, with a new nonce and the given nonce demand (tests)."""
        with self.state.lock:
            self.state.require_nonce = require_nonce
            self.state.nonce = secrets.token_urlsafe(16)
            self.state.previous_nonce = None
            self.state.nonce_since = time.monotonic()
            self.state.accepted = 0
            self.state.refused.clear()
            self.state.log.clear()
        return self

    def put_object(self, data: bytes, file_name: str = "seed.bin", sender: int = 1, receivers: tuple = (2,)) -> str:
        """Store an object directly (no HTTP; for benchmarks and tests that need one); its key."""
        path = self.state.folder / f"seed-{uuid.uuid4().hex}"
        path.write_bytes(data)
        obj = StoredObject(str(uuid.uuid4()), file_name, sender, list(receivers), owner="")
        obj.files, obj.size, obj.complete = [path], len(data), True
        obj.receipts = {r: False for r in receivers}
        with self.state.lock:
            self.state.objects[obj.key] = obj
        return obj.key

    def drop(self, key: str) -> int:
        """Remove an object and its files (no HTTP; the benchmark frees its disk); the bytes it
        had on disk, 0 for an unknown key."""
        with self.state.lock:
            obj = self.state.objects.pop(key, None)
        if obj is None:
            return 0
        size = sum(p.stat().st_size for p in obj.files if p.exists())
        self.routes._remove_files(obj)
        return size

    def __enter__(self) -> DeftApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._folder.cleanup()


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
    try:
        api = DeftApi(args.issuer, args.audience, args.require_nonce, port=args.port)
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # the issuer's discovery or JWKS is not there (yet)
        print(f"deft_api: cannot read {args.issuer}'s discovery document and JWKS ({exc}); start the "
              "authorization server first", file=sys.stderr)  # fmt: skip
        return 1
    with api:
        print(json.dumps({"base_url": api.base_url + "/api"}), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
