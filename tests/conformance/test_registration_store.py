"""RegistrationStore, on every backend that offers it: a registration record written beside
a key is read back exactly (JSON compared field by field), a new one replaces the old,
a record of one key is never read for another, and a deleted one is gone. Every registered
backend has the capability (a new one without it must be named in WITHOUT_STORE and in
docs/operations.md, "Where registration records live")."""

from __future__ import annotations

import json

from helseid_signer.backends.base import RegistrationStore
from helseid_signer.rotation import parse_record

#: backends that keep records in records_dir instead (docs/operations.md, "Where registration records live")
WITHOUT_STORE: set[str] = set()


def _record(kid: str, source: str, expires: str | None) -> dict:
    return {"kid": kid, "client_id": "store-client", "issuer": "https://helseid-sts.test.nhn.no",
            "registered_at": "2026-12-05T10:00:00Z", "expires_at": expires, "source": source}  # fmt: skip


def test_a_record_beside_the_key_reads_back_and_is_replaced_and_deleted(backend_under_test):
    backend = backend_under_test.backend
    if not isinstance(backend, RegistrationStore):
        assert backend_under_test.name in WITHOUT_STORE
        return
    assert backend_under_test.name not in WITHOUT_STORE
    first = backend.resolve(backend_under_test.make_key("EC-P256"))
    second = backend.resolve(backend_under_test.make_key("EC-P256"))
    kid1, kid2 = "A" * 43, "B" * 43
    assert backend.read_registration(first, kid1) is None

    pending = _record(kid1, "selfservice-api-pending", None)
    place = backend.write_registration(first, kid1, json.dumps(pending))
    assert place == backend.registration_place(first, kid1) and place
    assert json.loads(backend.read_registration(first, kid1)) == pending

    final = _record(kid1, "selfservice-api", "2027-12-05T10:00:00Z")
    backend.write_registration(first, kid1, json.dumps(final))
    text = backend.read_registration(first, kid1)
    assert json.loads(text) == final and parse_record(text, kid1).expires_at == "2027-12-05T10:00:00Z"
    assert backend.read_registration(second, kid2) is None  # never another key's record

    backend.delete_registration(first, kid1)
    assert backend.read_registration(first, kid1) is None
    backend.delete_registration(first, kid1)  # nothing there: no error
