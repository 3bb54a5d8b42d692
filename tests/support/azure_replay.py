"""Replay of recorded Azure Key Vault answers through the real azure-keyvault-keys SDK.

:class:`ReplayTransport` is an azure-core ``HttpTransport`` - the SDK's own seam for the
HTTP layer - that answers each request with a response recorded from a real vault or
Managed HSM (``tests/backends/recordings/azure_kv/*.json``, each naming the repository,
path and commit it was taken from). The recorded status, headers and body are written out
as HTTP/1.1 bytes and parsed by ``http.client``, so the SDK's whole pipeline - challenge
authentication, error mapping, deserialisation - runs on them as on a vault's answer.
Nothing of the product is replaced; no stand-in logic is involved.

Requests are matched by method and path (the query, e.g. ``api-version``, is ignored); a
request without ``Authorization`` gets the recorded 401 challenge, as a vault answers the
SDK's first, unauthenticated request.
"""

from __future__ import annotations

import http.client
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._http_response_impl import RestHttpClientTransportResponse

RECORDINGS = Path(__file__).resolve().parent.parent / "backends" / "recordings" / "azure_kv"


def load_recording(name: str) -> dict[str, Any]:
    """One recording file (``source``, ``recorded``, ``entries``, optional ``extra``)."""
    return json.loads((RECORDINGS / name).read_text())


@dataclass
class SeenRequest:
    method: str
    path: str
    authorized: bool
    body: Any


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *_: Any, **__: Any) -> io.BytesIO:
        return self._file


def http_response(recorded: dict[str, Any]) -> http.client.HTTPResponse:
    """The recorded response (``status``, ``headers``, ``body``: JSON or None for an empty
    body) as an ``http.client`` response parsed from HTTP/1.1 bytes."""
    body = b"" if recorded["body"] is None else json.dumps(recorded["body"]).encode()
    headers = {k: v for k, v in recorded["headers"].items() if k.lower() != "content-length"}
    lines = [f"HTTP/1.1 {recorded['status']} {http.client.responses.get(recorded['status'], '')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    response = http.client.HTTPResponse(_Socket(raw))  # type: ignore[arg-type]
    response.begin()
    return response


@dataclass
class ReplayTransport(HttpTransport):
    """Answers from recordings: ``routes`` maps ``(method, path)`` to a recorded response;
    ``challenge`` answers any request without ``Authorization``. A request with no route is
    an error of the test (it raises, so it cannot pass unnoticed)."""

    challenge: dict[str, Any]
    routes: dict[tuple[str, str], dict[str, Any]]
    seen: list[SeenRequest] = field(default_factory=list)

    def send(self, request: Any, **kwargs: Any) -> RestHttpClientTransportResponse:
        path = urlsplit(request.url).path
        authorized = "Authorization" in request.headers
        content = request.content if hasattr(request, "content") else None
        body = json.loads(content) if content else None
        self.seen.append(SeenRequest(request.method, path, authorized, body))
        if not authorized:
            recorded = self.challenge
        else:
            recorded = self.routes.get((request.method, path.rstrip("/")))
            if recorded is None:
                raise AssertionError(f"no recorded answer for {request.method} {path}")
        return RestHttpClientTransportResponse(request=request, internal_response=http_response(recorded))

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> ReplayTransport:
        return self

    def __exit__(self, *args: Any) -> None:
        pass


class ReplayCredential:
    """A token credential for replays: the recorded vault never sees the token."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("replayed-recording-token", int(time.time()) + 3600)

    def close(self) -> None:
        pass
