"""A small DEFT client on ``httpx`` (for the demo, the tests and the benchmark).

DEFT's multipart upload (NHN developer portal, "DEFT REST API", "Flyt"): ``POST
/objects/initialization`` gives a ``key`` and an ``uploadId``; each part goes as
multipart/form-data (``uploadId``, ``partNumber`` 1..10000, ``file``) to ``POST
/objects/{key}/part``, answered with its ``eTag``; ``POST /objects/{key}/completion`` joins
them. Authentication is whatever ``httpx.Auth`` the client has - here ``DPoPAuth``.

Every part is handed to httpx as ``bytes``: a request httpx can send again whole, so a DPoP
nonce challenge (``DPoPAuth`` resends the request) never loses or truncates a part. Memory is
bounded by the part size: parts are produced one at a time from an iterator and dropped once
their answer is in (with a young-generation GC run per part, see :meth:`DeftClient.upload`).
The client checks every ``eTag`` against its own SHA-256 of the part.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PART_SIZE = 8 * 1024 * 1024  # bytes per part by default


class DeftError(RuntimeError):
    """DEFT answered something else than expected: ``status_code`` and the answer's text."""

    def __init__(self, what: str, response: httpx.Response) -> None:
        super().__init__(f"{what}: HTTP {response.status_code} {response.text[:300]}")
        self.status_code = response.status_code


@dataclass
class UploadResult:
    """What an upload did: the object's ``key`` and ``location``, bytes and parts sent, the
    SHA-256 of the whole file as sent, and how many part requests went out in all (a part
    sent twice, e.g. after a nonce challenge, counts twice: ``part_requests - parts`` were
    re-sent)."""

    key: str
    location: str
    size: int
    parts: int
    sha256: str
    part_requests: int = 0
    etags: list[str] = field(default_factory=list)


def generated_parts(size: int, part_size: int = PART_SIZE, seed: int = 14) -> Iterator[bytes]:
    """``size`` bytes of pseudo-random data in parts of ``part_size`` bytes (the last shorter),
    made on the fly and reproducible from ``seed``: nothing is stored.

    The bytes are the AES-128-CTR keystream under a key derived from ``seed`` (``cryptography``;
    about 1 GB/s, where ``random.randbytes`` and ``os.urandom`` make under 100 MB/s here and
    would be what a benchmark of the upload measures)."""
    key = hashlib.sha256(f"deft-demo-{seed}".encode()).digest()[:16]
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = memoryview(bytes(min(part_size, size)))  # one buffer of zeros, encrypted part after part
    left = size
    while left > 0:
        n = min(part_size, left)
        yield keystream.update(zeros[:n])
        left -= n


class DeftClient:
    """DEFT's routes on an ``httpx.Client`` whose ``base_url`` is the API base (``.../api``)
    and whose ``auth`` is a ``DPoPAuth``.

    Raises :class:`DeftError` on an unexpected answer; the errors of the client's auth
    (TokenError, SignerError) pass through.
    """

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.part_requests = 0
        http.event_hooks.setdefault("request", []).append(self._count)

    def _count(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/part"):
            self.part_requests += 1

    def upload(
        self,
        parts: Iterable[bytes],
        file_name: str,
        sender: int,
        receivers: list[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> UploadResult:
        """Multipart upload of ``parts`` (each ``bytes``, in order); ``progress(part_number,
        bytes_so_far)`` after each part. On any failure the upload is cancelled and the error
        raised."""
        init = self.http.post(
            "objects/initialization",
            json={"fileName": file_name, "senderHerId": sender, "receiverHerIds": receivers},
        )
        if init.status_code != 200:
            raise DeftError("initialization", init)
        key, upload_id = init.json()["key"], init.json()["uploadId"]
        whole, sent, listed = hashlib.sha256(), 0, []
        requests_before = self.part_requests
        try:
            for number, data in enumerate(parts, 1):
                digest = hashlib.sha256(data).hexdigest()
                answer = self.http.post(
                    f"objects/{key}/part",
                    data={"uploadId": upload_id, "partNumber": str(number)},
                    files={"file": (f"{file_name}.part{number}", data, "application/octet-stream")},
                )
                if answer.status_code != 200:
                    raise DeftError(f"part {number}", answer)
                etag = answer.json().get("eTag")
                if etag != digest:
                    raise DeftError(f"part {number}: eTag {etag!r} is not the SHA-256 of the part sent", answer)
                whole.update(data)
                sent += len(data)
                listed.append({"partNumber": number, "eTag": etag})
                # httpx's Response and its BoundSyncStream refer to each other, and the response
                # holds the request, which holds the part: without a collection each part would
                # stay in memory until the cyclic GC happened to run (measured: +150 MB for a
                # 200 MB upload). Collecting the young generations costs about a millisecond.
                del data, answer
                gc.collect(1)
                if progress is not None:
                    progress(number, sent)
            done = self.http.post(f"objects/{key}/completion", json={"uploadId": upload_id, "parts": listed})
            if done.status_code != 201:
                raise DeftError("completion", done)
        except BaseException:
            try:
                self.http.post(f"objects/{key}/cancellation", json={"uploadId": upload_id})
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        return UploadResult(
            key=key,
            location=done.headers.get("Location", ""),
            size=sent,
            parts=len(listed),
            sha256=whole.hexdigest(),
            part_requests=self.part_requests - requests_before,
            etags=[p["eTag"] for p in listed],
        )

    def download(self, key: str, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
        """Stream ``GET /objects/{key}``; (bytes received, SHA-256 hex). Nothing is kept."""
        digest, size = hashlib.sha256(), 0
        with self.http.stream("GET", f"objects/{key}") as answer:
            if answer.status_code != 200:
                answer.read()
                raise DeftError("download", answer)
            for chunk in answer.iter_bytes(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(size)
        return size, digest.hexdigest()

    def download_status(self, key: str) -> dict[str, bool]:
        """``GET /objects/{key}/download-status``: receiver HER-id -> has marked it downloaded."""
        answer = self.http.get(f"objects/{key}/download-status")
        if answer.status_code != 200:
            raise DeftError("download-status", answer)
        return answer.json()["receiverDownloadStatus"]

    def mark_downloaded(self, key: str, her_id: int) -> None:
        """``PUT /objects/{key}/download-receipt/{markerHerId}``."""
        answer = self.http.put(f"objects/{key}/download-receipt/{her_id}")
        if answer.status_code not in (200, 204):
            raise DeftError("download-receipt", answer)

    def delete(self, key: str) -> None:
        """``DELETE /objects/{key}`` (the uploader)."""
        answer = self.http.delete(f"objects/{key}")
        if answer.status_code not in (200, 204):
            raise DeftError("delete", answer)
