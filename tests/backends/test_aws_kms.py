"""AWS KMS backend against a local KMS endpoint, through the real boto3 over HTTP.

The endpoint is moto 5.2.5's KMS with a small TEST-ONLY correction of its ``Sign``
(``tests/support/kms_endpoint.py`` says why): stock moto hashes a ``MessageType=DIGEST``
digest again and signs PSS with the maximum salt, and its own ``Verify`` agrees with
itself. ``test_stock_moto_has_the_two_defects_the_controls_catch`` proves on every run
that the conformance suite's negative controls fail against stock moto, so a green
conformance run on the corrected endpoint means something.

Oracles are independent of the product: ``cryptography`` (and the conformance suite's
verifier, written from the RFCs) for signatures, jwcrypto for JWKs and thumbprints, a
plain boto3 client (not the backend) to create, move, disable and inspect keys, and
botocore's own event hooks to see what the backend really sent.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import grpc
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import load_der_public_key
from jwcrypto import jwk, jws

from demo.deft_api import DeftApi
from helseid_signer.algorithms import ALGORITHMS, AlgorithmError
from helseid_signer.backends.aws_kms import KMS_SIGNING_ALGORITHMS, AwsKmsBackend, KmsRef
from helseid_signer.backends.base import (
    BackendConfigError,
    BackendThrottledError,
    BackendUnavailableError,
    KeyAccessDeniedError,
    KeyNotFoundError,
)
from helseid_signer.config import ConfigError, load_settings
from helseid_signer.keys import KeyResolutionError, build_backends, make_signing_key, resolve_keys
from helseid_signer_client import DPoPAuth, SignerClient, SignerError, TokenClient
from tests.conformance.test_backend_conformance import verify_independently
from tests.support.authserver import running_authserver
from tests.support.kms_endpoint import (
    DEFECTS,
    FAULT_TAG,
    TEST_AWS_ENV,
    TEST_REGION,
    KmsEndpoint,
    aws_test_environment,
    running_kms_endpoint,
)
from tests.support.signer_proc import running_signer

RUN = secrets.token_hex(3)  # keeps aliases unique within the module's endpoint


@pytest.fixture(scope="module")
def endpoint() -> Iterator[KmsEndpoint]:
    with aws_test_environment(), running_kms_endpoint() as running:
        yield running


@pytest.fixture(scope="module")
def kms(endpoint: KmsEndpoint) -> Any:
    """The test's own hands on KMS: a plain boto3 client, independent of the backend."""
    return boto3.client("kms", region_name=TEST_REGION, endpoint_url=endpoint.url)


@pytest.fixture(scope="module")
def backend(endpoint: KmsEndpoint) -> Iterator[AwsKmsBackend]:
    made = AwsKmsBackend(region=TEST_REGION, endpoint_url=endpoint.url)
    yield made
    made.close()


@pytest.fixture
def make_backend(endpoint: KmsEndpoint) -> Iterator[Any]:
    """``make_backend(**settings)``: a backend with its own settings, closed after the test."""
    made: list[AwsKmsBackend] = []

    def make(url: str | None = None, **settings: Any) -> AwsKmsBackend:
        made.append(AwsKmsBackend(region=TEST_REGION, endpoint_url=url or endpoint.url, **settings))
        return made[-1]

    yield make
    for b in made:
        b.close()


_counter = iter(range(10**6))


def new_key(kms: Any, spec: str = "ECC_NIST_P256", alias: bool = True, fault: str | None = None, **extra: Any):
    """Create a key with the plain client; return (key ARN, ``awskms:`` reference)."""
    usage = extra.pop("KeyUsage", "SIGN_VERIFY")
    tags = [{"TagKey": FAULT_TAG, "TagValue": fault}] if fault else []
    arn = kms.create_key(KeyUsage=usage, KeySpec=spec, Tags=tags, **extra)["KeyMetadata"]["Arn"]
    if not alias:
        return arn, f"awskms:{arn}"
    name = f"alias/t-{RUN}-{next(_counter)}"
    kms.create_alias(AliasName=name, TargetKeyId=arn)
    return arn, f"awskms:{name}"


def key_id(arn: str) -> str:
    """The key id of a key ARN (moto's DisableKey, EnableKey and ScheduleKeyDeletion take
    only ids; AWS takes either)."""
    return arn.rsplit("/", 1)[1]


def public_key_of(kms: Any, arn: str):
    return load_der_public_key(kms.get_public_key(KeyId=arn)["PublicKey"])


@contextlib.contextmanager
def sent_sign_requests(b: AwsKmsBackend) -> Iterator[list[dict[str, Any]]]:
    """The JSON bodies of the Sign requests the backend really sent: botocore's
    ``before-send`` event, on the backend's own hook's event name but registered last, so
    a send that the backend's hook stops (deadline passed) is not counted."""
    seen: list[dict[str, Any]] = []

    def record(request: Any, **_: Any) -> None:
        target = request.headers.get("X-Amz-Target")
        if (target.decode() if isinstance(target, bytes) else target) == "TrentService.Sign":
            seen.append(json.loads(request.body))

    events = b._client.meta.events
    events.register_last("before-send.kms", record, unique_id="test-sent-sign")
    try:
        yield seen
    finally:
        events.unregister("before-send.kms", unique_id="test-sent-sign")


# -- references and pinning -------------------------------------------------------------


def test_every_reference_form_pins_the_same_key_arn(kms, backend):
    arn, alias_ref = new_key(kms)
    key_id = arn.rsplit("/", 1)[1]
    alias_arn = arn.split(":key/")[0] + ":" + alias_ref.removeprefix("awskms:")
    oracle = public_key_of(kms, arn)
    refs = [f"awskms:{arn}", f"awskms:{key_id}", alias_ref, f"awskms:{alias_arn}"]
    for ref in refs:
        resolved = backend.resolve(ref)
        assert resolved.uri == ref and resolved.version == arn and resolved.handle.arn == arn
        assert resolved.public_key.public_numbers() == oracle.public_numbers()
    kids = {make_signing_key("k", "ES256", backend, backend.resolve(ref)).kid for ref in refs}
    assert kids == {jwk.JWK.from_pyca(oracle).thumbprint()}


@pytest.mark.parametrize(
    "uri",
    [
        "awskms:",
        "awskms:my-key",
        "awskms:alias/",
        "awskms:alias/has space",
        "awskms:arn:aws:kms:eu-north-1:123:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "awskms:arn:aws:kms:eu-north-1:123456789012:key/not-a-key-id",
        "awskms:arn:aws:s3:::bucket",
        "pkcs11:token=x;object=y",
    ],
)
def test_malformed_references_are_configuration_errors(uri):
    with pytest.raises(BackendConfigError, match="key reference|not an awskms"):
        KmsRef.parse(uri)


def test_arn_from_another_region_and_unknown_alias_are_refused(backend):
    other = "awskms:arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(BackendConfigError, match="region eu-west-1.*eu-north-1"):
        backend.resolve(other)
    with pytest.raises(KeyNotFoundError) as caught:
        backend.resolve(f"awskms:alias/never-made-{RUN}")
    assert caught.value.grpc_code == "UNAVAILABLE"


def test_a_moved_alias_never_changes_the_key_that_signs(kms, backend, caplog):
    """bug-kinds 12: the alias is pinned to its ARN at start-up; Sign names the ARN."""
    first, ref = new_key(kms)
    key = make_signing_key("dpop", "ES256", backend, backend.resolve(ref))
    old_public = public_key_of(kms, first)
    assert key.kid == jwk.JWK.from_pyca(old_public).thumbprint()
    assert backend.check_pinning(key.resolved) is None

    second, _ = new_key(kms, alias=False)
    kms.update_alias(AliasName=ref.removeprefix("awskms:"), TargetKeyId=second)

    data = b"header.payload after the alias moved"
    with sent_sign_requests(backend) as sent:
        signature = key.sign(data)
    assert [r["KeyId"] for r in sent] == [first], "Sign must name the pinned ARN, never the alias"
    verify_independently(old_public, "ES256", data, signature)
    with pytest.raises(InvalidSignature):
        verify_independently(public_key_of(kms, second), "ES256", data, signature)
    assert key.kid == jwk.JWK.from_pyca(old_public).thumbprint()  # unchanged: computed at start-up

    with caplog.at_level(logging.WARNING, logger="helseid_signer.backends.aws_kms"):
        message = backend.check_pinning(key.resolved)
    assert message and second in message and first in message
    assert any(second in r.getMessage() for r in caplog.records)
    assert backend.pinning_drift == {ref: message}
    # Only a configuration (re)load resolves the alias anew: then the new key is pinned.
    assert backend.resolve(ref).version == second


def test_check_pinning_is_quiet_for_arn_references(kms, backend):
    _, ref = new_key(kms, alias=False)
    assert backend.check_pinning(backend.resolve(ref)) is None


# -- start-up checks ----------------------------------------------------------------------


def _config(tmp_path: Path, url: str, keys: dict[str, tuple[str, str]]) -> Path:
    lines = [
        "[server]", 'listen = "127.0.0.1:0"', "insecure = true", "",
        "[backends.awskms]", f'region = "{TEST_REGION}"', f'endpoint_url = "{url}"', "",
    ]  # fmt: skip
    for name, (uri, alg) in keys.items():
        lines += [f"[keys.{name}]", f'uri = "{uri}"', f'alg = "{alg}"', ""]
    first = next(iter(keys))
    lines += [
        "[profiles.app]", 'client_id = "c"', 'issuer = "https://127.0.0.1:4443"',
        f'assertion_key = "{first}"', f'dpop_key = "{first}"', "",
    ]  # fmt: skip
    path = tmp_path / "signer.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize(
    ("spec", "alg", "words"),
    [
        ("ECC_NIST_P384", "ES256", "needs curve P-256"),
        ("ECC_NIST_P256", "PS256", "needs an RSA key"),
        ("RSA_2048", "ES256", "needs an EC P-256 key"),
        ("ECC_SECG_P256K1", "ES256", "KeySpec ECC_SECG_P256K1"),
    ],
)
def test_key_that_does_not_fit_its_alg_stops_start_up(kms, endpoint, tmp_path, spec, alg, words):
    _, ref = new_key(kms, spec=spec)
    settings = load_settings(_config(tmp_path, endpoint.url, {"k": (ref, alg)}))
    backends = build_backends(settings)
    try:
        with pytest.raises(KeyResolutionError, match=words) as caught:
            resolve_keys(settings, backends)
        assert "keys.k" in str(caught.value)
    finally:
        for b in backends.values():
            b.close()


def test_key_usage_other_than_sign_verify_is_refused(kms, backend):
    _, ref = new_key(kms, spec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    with pytest.raises(BackendConfigError, match="KeyUsage ENCRYPT_DECRYPT, not SIGN_VERIFY"):
        backend.resolve(ref)


def test_alg_outside_the_keys_signing_algorithms_is_refused_before_any_sign(kms, backend):
    """The optional AlgChecker: KMS metadata narrower than the key type allows."""
    _, ref = new_key(kms, spec="RSA_2048")
    resolved = backend.resolve(ref)
    assert set(resolved.handle.signing_algorithms) >= {KMS_SIGNING_ALGORITHMS[a] for a in ("RS256", "PS512")}
    narrowed = dataclasses.replace(
        resolved, handle=dataclasses.replace(resolved.handle, signing_algorithms=("RSASSA_PSS_SHA_256",))
    )
    with sent_sign_requests(backend) as sent:
        make_signing_key("k", "PS256", backend, narrowed)  # allowed
        with pytest.raises(AlgorithmError, match="RSASSA_PKCS1_V1_5_SHA_256.*allows only RSASSA_PSS_SHA_256"):
            make_signing_key("k", "RS256", backend, narrowed)
    assert sent == []


def test_disabled_or_deleted_key_at_start_up(kms, backend):
    arn, ref = new_key(kms)
    kms.disable_key(KeyId=key_id(arn))
    with pytest.raises(KeyAccessDeniedError, match="Disabled, not Enabled"):
        backend.resolve(ref)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('endpoint_url = "http://kms.example.com"', "endpoint_url: must use https"),
        ('region = "Europe"', "region: String should match pattern"),
        ('retry_mode = "legacy"', "retry_mode: Input should be 'standard' or 'adaptive'"),
        ("max_attempts = 0", "max_attempts: Input should be greater than or equal to 1"),
        ("read_timeout = 0", "read_timeout: Input should be greater than 0"),
        ('access_key = "AKIA..."', "access_key: Extra inputs are not permitted"),
    ],
)
def test_backend_section_is_validated(tmp_path, line, words):
    path = _config(tmp_path, "https://kms.eu-north-1.amazonaws.com", {"k": ("awskms:alias/x", "ES256")})
    text = path.read_text()
    key = line.split(" =")[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + " =")]
    path.write_text("\n".join(lines).replace("[backends.awskms]", f"[backends.awskms]\n{line}"))
    with pytest.raises(ConfigError, match=re.escape(f"backends.awskms.{words}")):
        load_settings(path)


def test_awskms_key_needs_the_backend_section(tmp_path):
    path = _config(tmp_path, "https://kms.eu-north-1.amazonaws.com", {"k": ("awskms:alias/x", "ES256")})
    text = path.read_text()
    path.write_text(text.split("[backends.awskms]")[0] + "[keys" + text.split("[keys", 1)[1])
    with pytest.raises(ConfigError, match=re.escape("keys.k.uri: an awskms: key needs a [backends.awskms] section")):
        load_settings(path)


def test_no_region_and_no_credentials_are_configuration_errors(monkeypatch, endpoint):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BackendConfigError, match="no region"):
        AwsKmsBackend()
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fallback = AwsKmsBackend()
    assert fallback.region == "eu-west-1"
    fallback.close()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    b = AwsKmsBackend(region=TEST_REGION, endpoint_url=endpoint.url)
    try:
        with pytest.raises(BackendConfigError, match="no usable AWS credentials"):
            b.resolve("awskms:alias/anything")
    finally:
        b.close()


# -- what is sent -------------------------------------------------------------------------


def test_sign_sends_the_digest_with_the_algs_signing_algorithm(kms, backend):
    """bug-kinds 5/6: always MessageType=DIGEST, the alg's hash, whatever the input size."""
    keys = {"RSA_2048": new_key(kms, "RSA_2048")[1], "ECC_NIST_P521": new_key(kms, "ECC_NIST_P521")[1]}
    data = b"e" * 100_000
    for alg in ("RS384", "PS512", "ES512"):
        resolved = backend.resolve(keys["ECC_NIST_P521" if alg == "ES512" else "RSA_2048"])
        with sent_sign_requests(backend) as sent:
            signature = backend.sign(resolved, ALGORITHMS[alg], data)
        (request,) = sent
        assert request["MessageType"] == "DIGEST"
        assert request["SigningAlgorithm"] == KMS_SIGNING_ALGORITHMS[alg]
        assert base64.b64decode(request["Message"]) == hashlib.new(ALGORITHMS[alg].hash_name, data).digest()
        verify_independently(resolved.public_key, alg, data, signature)


# -- errors, retries, deadlines -----------------------------------------------------------


def test_disabled_key_after_start_up_is_failed_precondition(kms, backend):
    arn, ref = new_key(kms)
    resolved = backend.resolve(ref)
    kms.disable_key(KeyId=key_id(arn))
    with pytest.raises(KeyAccessDeniedError, match=r"disabled \(DisabledException\); enable it") as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"x")
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    kms.enable_key(KeyId=key_id(arn))
    kms.schedule_key_deletion(KeyId=key_id(arn), PendingWindowInDays=7)
    with pytest.raises(KeyAccessDeniedError, match="pending deletion") as caught:
        backend.sign(resolved, ALGORITHMS["ES256"], b"x")
    assert caught.value.grpc_code == "FAILED_PRECONDITION"


def test_access_denied_is_failed_precondition_with_a_readable_message(kms, backend):
    _, ref = new_key(kms, fault="deny")
    with pytest.raises(KeyAccessDeniedError, match="denied Sign.*the key policy does not allow kms:Sign") as caught:
        backend.sign(backend.resolve(ref), ALGORITHMS["ES256"], b"x")
    assert caught.value.grpc_code == "FAILED_PRECONDITION"
    assert backend.health()  # a per-key refusal says nothing about reaching KMS


# Error shapes as the real service sends them (issue 17). Statuses and wording are
# reconstructed from the AWS KMS API Reference (per-operation Errors and Common Errors);
# botocore's service model names the shapes. docs/backends/aws-kms.md lists each refusal.

KMS_ERROR_SHAPES = {
    # fault tag (None: a real key state) -> (HTTP status, __type)
    "unavailable": (500, "KeyUnavailableException"),
    "state-PendingImport": (409, "KMSInvalidStateException"),
    "deny": (400, "AccessDeniedException"),
    "throttle": (400, "ThrottlingException"),
}


def _raw_sign(endpoint: KmsEndpoint, arn: str) -> tuple[int, dict[str, Any]]:
    """A Sign request over plain HTTP, without botocore, to see the wire answer itself."""
    import urllib.error
    import urllib.request

    body = json.dumps({
        "KeyId": arn, "Message": base64.b64encode(b"\0" * 32).decode(), "MessageType": "DIGEST",
        "SigningAlgorithm": "ECDSA_SHA_256",
    }).encode()  # fmt: skip
    request = urllib.request.Request(
        endpoint.url + "/",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Sign",
            "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20260101/{TEST_REGION}/kms/aws4_request, "
            "SignedHeaders=host, Signature=0",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_endpoint_answers_kms_errors_in_the_services_wire_shape(kms, endpoint):
    """AWS JSON 1.1: the status AWS documents and ``{"__type": <shape>, "message": ...}``."""
    for fault, (status, shape) in KMS_ERROR_SHAPES.items():
        arn, _ = new_key(kms, fault=fault)
        got_status, body = _raw_sign(endpoint, arn)
        assert (got_status, body.get("__type")) == (status, shape), (fault, got_status, body)
        assert body.get("message"), body
    arn, _ = new_key(kms)
    kms.disable_key(KeyId=key_id(arn))
    assert _raw_sign(endpoint, arn) == (409, {"__type": "DisabledException", "message": f"{arn} is disabled."})
    arn, _ = new_key(kms)
    kms.schedule_key_deletion(KeyId=key_id(arn), PendingWindowInDays=7)
    assert _raw_sign(endpoint, arn) == (
        409, {"__type": "KMSInvalidStateException", "message": f"{arn} is pending deletion."}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "error", "grpc_code", "words", "attempts"),
    [
        ("disable", KeyAccessDeniedError, "FAILED_PRECONDITION", ("DisabledException", "aws kms enable-key"), 1),
        ("delete", KeyAccessDeniedError, "FAILED_PRECONDITION", ("state PendingDeletion", "cancel-key-deletion"), 1),
        ("state-PendingImport", KeyAccessDeniedError, "FAILED_PRECONDITION", ("state PendingImport", "import"), 1),
        ("unavailable", BackendUnavailableError, "UNAVAILABLE", ("KeyUnavailableException", "custom key store"), 3),
        ("deny", KeyAccessDeniedError, "FAILED_PRECONDITION", ("the key policy does not allow kms:Sign",), 1),
        ("deny-explicit", KeyAccessDeniedError, "FAILED_PRECONDITION", ("explicit Deny for kms:Sign",), 1),
        ("throttle", BackendThrottledError, "RESOURCE_EXHAUSTED", ("ThrottlingException",), 3),
    ],
)
def test_each_kms_refusal_maps_to_its_status_and_names_its_cause(
    kms, make_backend, setup, error, grpc_code, words, attempts
):
    """Through the real botocore (its error parsing and its retry machinery: 500s and
    throttling are retried, 4xx refusals are not)."""
    b = make_backend(max_attempts=3)
    fault = None if setup in ("disable", "delete") else setup
    arn, ref = new_key(kms, fault=fault)
    resolved = b.resolve(ref)
    if setup == "disable":
        kms.disable_key(KeyId=key_id(arn))
    elif setup == "delete":
        kms.schedule_key_deletion(KeyId=key_id(arn), PendingWindowInDays=7)
    with sent_sign_requests(b) as sent, pytest.raises(error) as caught:
        b.sign(resolved, ALGORITHMS["ES256"], b"x")
    text = str(caught.value)
    assert type(caught.value) is error and caught.value.grpc_code == grpc_code, text
    for word in words:
        assert word in text, (word, text)
    if setup != "delete":
        assert "pending deletion" not in text.lower(), text
    assert len(sent) == attempts, f"{len(sent)} Sign requests sent"


def test_a_key_pending_deletion_at_start_up_names_its_deletion_date(kms, backend):
    arn, ref = new_key(kms)
    kms.schedule_key_deletion(KeyId=key_id(arn), PendingWindowInDays=7)
    with pytest.raises(KeyAccessDeniedError, match="is PendingDeletion \\(deletion date .*cancel-key-deletion"):
        backend.resolve(ref)


def test_throttling_is_retried_then_resource_exhausted(kms, make_backend):
    b = make_backend(max_attempts=3)
    _, ref = new_key(kms, fault="throttle")
    resolved = b.resolve(ref)
    with sent_sign_requests(b) as sent, pytest.raises(BackendThrottledError, match="after 3 attempt") as caught:
        b.sign(resolved, ALGORITHMS["ES256"], b"x")
    assert len(sent) == 3 and caught.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_throttling_that_eases_within_the_attempts_gets_through(kms, make_backend):
    b = make_backend(max_attempts=3)
    arn, ref = new_key(kms, fault="throttle-first-2")
    resolved = b.resolve(ref)
    with sent_sign_requests(b) as sent:
        signature = b.sign(resolved, ALGORITHMS["ES256"], b"eventually")
    assert len(sent) == 3
    verify_independently(public_key_of(kms, arn), "ES256", b"eventually", signature)


def test_retries_never_outlast_the_callers_deadline(kms, make_backend):
    """Throttled for ever with 10 attempts allowed: botocore's backoff alone would wait
    tens of seconds; the caller gets its answer at its deadline, and the call left behind
    sends nothing more."""
    b = make_backend(max_attempts=10)
    _, ref = new_key(kms, fault="throttle")
    resolved = b.resolve(ref)
    with sent_sign_requests(b) as sent:
        started = time.monotonic()
        with pytest.raises(BackendThrottledError, match="within the deadline") as caught:
            b.sign(resolved, ALGORITHMS["ES256"], b"x", deadline=started + 1.0)
        elapsed = time.monotonic() - started
        sends_at_return = len(sent)
        time.sleep(1.5)
    assert 1.0 <= elapsed < 1.5, elapsed  # margin for a loaded machine; unbounded would be ~10 s+
    assert caught.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert 1 <= sends_at_return < 10
    assert len(sent) == sends_at_return, "the abandoned call kept retrying after the deadline"


def test_a_slow_answer_is_cut_at_the_deadline(kms, make_backend):
    b = make_backend(read_timeout=10)
    _, ref = new_key(kms, fault="slow-3")
    resolved = b.resolve(ref)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="did not answer .* within the caller's deadline") as caught:
        b.sign(resolved, ALGORITHMS["ES256"], b"x", deadline=started + 0.5)
    assert time.monotonic() - started < 1.25  # the endpoint answers only after 3 s
    assert caught.value.grpc_code == "UNAVAILABLE"


def test_a_deadline_already_passed_sends_nothing(kms, backend):
    _, ref = new_key(kms)
    resolved = backend.resolve(ref)
    with sent_sign_requests(backend) as sent, pytest.raises(BackendUnavailableError, match="deadline passed"):
        backend.sign(resolved, ALGORITHMS["ES256"], b"x", deadline=time.monotonic() - 0.001)
    assert sent == []


def test_kms_internal_errors_are_unavailable_and_mark_the_backend_unhealthy(kms, make_backend):
    b = make_backend(max_attempts=2)
    _, bad = new_key(kms, fault="internal-error")
    _, good = new_key(kms)
    with pytest.raises(BackendUnavailableError, match="KMSInternalException.*after 2 attempt") as caught:
        b.sign(b.resolve(bad), ALGORITHMS["ES256"], b"x")
    assert caught.value.grpc_code == "UNAVAILABLE" and not b.health()
    b.sign(b.resolve(good), ALGORITHMS["ES256"], b"x")
    assert b.health()


def test_stopped_endpoint_is_unavailable_for_signing_and_at_start_up(kms, make_backend):
    with aws_test_environment(), running_kms_endpoint() as private:
        local = boto3.client("kms", region_name=TEST_REGION, endpoint_url=private.url)
        arn = local.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
        b = make_backend(url=private.url, max_attempts=2, connect_timeout=0.5)
        resolved = b.resolve(f"awskms:{arn}")
        private.stop()
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="unreachable") as caught:
            b.sign(resolved, ALGORITHMS["ES256"], b"x", deadline=time.monotonic() + 5)
        assert caught.value.grpc_code == "UNAVAILABLE" and not b.health()
        with pytest.raises(BackendUnavailableError, match="unreachable"):
            b.resolve(f"awskms:{arn}")  # start-up with KMS unreachable
        assert time.monotonic() - started < 5


def test_concurrent_signatures_from_many_threads(kms, backend):
    arn, ref = new_key(kms)
    resolved = backend.resolve(ref)
    public = public_key_of(kms, arn)
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                data = f"{n}-{i}".encode()
                results.append(
                    (data, backend.sign(resolved, ALGORITHMS["ES256"], data, deadline=time.monotonic() + 10))
                )
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 320
    for data, signature in results:
        verify_independently(public, "ES256", data, signature)


# -- keys create ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kms_spec"),
    [("RSA-2048", "RSA_2048"), ("RSA-3072", "RSA_3072"), ("EC-P256", "ECC_NIST_P256"), ("EC-P521", "ECC_NIST_P521")],
)
def test_create_key_makes_a_non_exportable_sign_verify_key(kms, backend, spec, kms_spec):
    alias = f"alias/created-{RUN}-{spec.lower()}"
    resolved = backend.create_key(f"awskms:{alias}", spec)
    meta = kms.describe_key(KeyId=alias)["KeyMetadata"]
    assert resolved.uri == f"awskms:{alias}" and resolved.version == meta["Arn"]
    assert (meta["KeySpec"], meta["KeyUsage"], meta["Origin"]) == (kms_spec, "SIGN_VERIFY", "AWS_KMS")
    assert resolved.public_key.public_numbers() == public_key_of(kms, meta["Arn"]).public_numbers()


def test_create_key_refuses_an_existing_alias_before_making_a_key(kms, backend):
    _, ref = new_key(kms)
    before = len(kms.list_keys(Limit=1000)["Keys"])
    with pytest.raises(BackendConfigError, match="already names key"):
        backend.create_key(ref, "EC-P256")
    with pytest.raises(BackendConfigError, match="give --uri awskms:alias/NAME"):
        backend.create_key("awskms:" + new_key(kms, alias=False)[0], "EC-P256")
    assert len(kms.list_keys(Limit=1000)["Keys"]) == before + 1  # only new_key's own key


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_create_cli_prints_the_public_jwk(kms, endpoint, tmp_path):
    config = tmp_path / "backend.toml"
    config.write_text(f'[backends.awskms]\nregion = "{TEST_REGION}"\nendpoint_url = "{endpoint.url}"\n')
    env = {**_clean_env(), **TEST_AWS_ENV}
    alias = f"alias/cli-{RUN}"
    out = _cli("keys", "create", "--uri", f"awskms:{alias}", "--spec", "EC-P384", "--alg", "ES384",
               "--config", str(config), env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    arn = kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]
    oracle = jwk.JWK.from_pyca(public_key_of(kms, arn))
    assert printed["uri"] == f"awskms:{alias}" and printed["version"] == arn
    assert printed["jwk"]["kid"] == oracle.thumbprint() and printed["jwk"]["alg"] == "ES384"
    assert jwk.JWK(**printed["jwk"]).thumbprint() == oracle.thumbprint()
    # Without --config: region and endpoint from the environment (AWS_REGION, AWS_ENDPOINT_URL_KMS).
    chain_env = {**env, "AWS_REGION": TEST_REGION, "AWS_ENDPOINT_URL_KMS": endpoint.url}
    out = _cli("keys", "create", "--uri", "awskms:", "--spec", "RSA-2048", env=chain_env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["uri"].startswith("awskms:arn:aws:kms:eu-north-1:")
    again = _cli("keys", "create", "--uri", f"awskms:{alias}", "--spec", "EC-P384", "--config", str(config), env=env)
    assert again.returncode == 2 and "already names key" in again.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


# -- the endpoint itself: the negative controls must bite --------------------------------------


def test_stock_moto_has_the_two_defects_the_controls_catch(make_backend):
    """Against moto's own Sign (no correction) the conformance suite's verifier fails, and
    each failure is exactly the documented defect: the digest hashed again; PSS with the
    maximum salt (256 - 32 - 2 = 222 bytes for RSA-2048) instead of the hash length."""
    with aws_test_environment(), running_kms_endpoint(uncorrected=DEFECTS) as stock:
        local = boto3.client("kms", region_name=TEST_REGION, endpoint_url=stock.url)
        b = make_backend(url=stock.url)
        data = b"negative control"
        digest = hashlib.sha256(data).digest()
        for alg, spec in (("RS256", "RSA_2048"), ("ES256", "ECC_NIST_P256"), ("PS256", "RSA_2048")):
            arn = local.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec)["KeyMetadata"]["Arn"]
            resolved = b.resolve(f"awskms:{arn}")
            signature = b.sign(resolved, ALGORITHMS[alg], data)
            with pytest.raises(InvalidSignature):
                verify_independently(resolved.public_key, alg, data, signature)  # what the suite checks
            if alg == "PS256":
                for salt, valid in ((222, True), (32, False)):
                    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
                    check = resolved.public_key.verify
                    if valid:
                        check(signature, digest, pss, hashes.SHA256())  # signed over H(H(m)), max salt
                    else:
                        with pytest.raises(InvalidSignature):
                            check(signature, digest, pss, hashes.SHA256())
            else:
                verify_independently(resolved.public_key, alg, digest, signature)  # signed over H(H(m))


# -- the main job, with its keys in KMS by configuration alone ---------------------------------


def test_main_job_runs_with_keys_in_kms(kms, endpoint, tmp_path):
    """Keys made by ``keys create`` in KMS, the real ``helseid-signer serve`` configured
    with ``awskms:`` references, the client library's token flow against oidc-provider
    (nonce retry included) and a DPoP-protected API call: the same job as the demo, with
    only the configuration changed."""
    backend_toml = f'[backends.awskms]\nregion = "{TEST_REGION}"\nendpoint_url = "{endpoint.url}"\n'
    (tmp_path / "backend.toml").write_text(backend_toml)
    env = {**_clean_env(), **TEST_AWS_ENV}
    refs = {"assertion": (f"awskms:alias/job-assertion-{RUN}", "RSA-2048", "PS256"),
            "dpop": (f"awskms:alias/job-dpop-{RUN}", "EC-P256", "ES256")}  # fmt: skip
    jwks = {}
    for name, (uri, spec, alg) in refs.items():
        out = _cli("keys", "create", "--uri", uri, "--spec", spec, "--alg", alg,
                   "--config", str(tmp_path / "backend.toml"), env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr
        jwks[name] = json.loads(out.stdout)["jwk"]
    client = {"client_id": "kms-job", "jwks": {"keys": [jwks["assertion"]]}, "scope": "nhn:deft/api"}
    with running_authserver([client]) as auth, DeftApi(auth.issuer) as api:
        config = tmp_path / "signer.toml"
        config.write_text(
            "\n".join(
                ["[server]", 'listen = "127.0.0.1:0"', "insecure = true", "", backend_toml]
                + [f'[keys.{n}]\nuri = "{u}"\nalg = "{a}"\n' for n, (u, _, a) in refs.items()]
                + [
                    "[profiles.app]",
                    'client_id = "kms-job"',
                    f'issuer = "{auth.issuer}"',
                    'assertion_key = "assertion"',
                    'dpop_key = "dpop"',
                    f'api_base_urls = ["{api.base_url}/api"]',
                    "",
                ]
            )  # fmt: skip
        )
        with running_signer(config, env=TEST_AWS_ENV) as address, SignerClient(address) as signer:
            with TokenClient(signer, "app", "nhn:deft/api") as tokens:
                with httpx.Client(auth=DPoPAuth(tokens), base_url=api.base_url) as http:
                    answer = http.get(f"/api/objects/{api.put_object(b'x')}/download-status")
                assert answer.status_code == 200, answer.text
                assert api.state.log[-1].client_id == "kms-job"
                assert tokens.get_token().jkt == jwk.JWK(**jwks["dpop"]).thumbprint()
            assertion = signer.sign_client_assertion("app")
            token = jws.JWS()
            token.deserialize(assertion.jwt, key=jwk.JWK(**jwks["assertion"]), alg="PS256")
            assert token.jose_header["kid"] == jwks["assertion"]["kid"] == assertion.kid
            # The error mapping through the real service: a disabled key is FAILED_PRECONDITION.
            dpop_arn = kms.describe_key(KeyId=refs["dpop"][0].removeprefix("awskms:"))["KeyMetadata"]["Arn"]
            kms.disable_key(KeyId=key_id(dpop_arn))
            with pytest.raises(SignerError) as caught:
                signer.sign_dpop_proof("app", "GET", api.base_url + "/api/objects")
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "disabled" in str(caught.value)


# -- key custody (CustodyReporter) ---------------------------------------------------------


def test_custody_warning_follows_the_keys_origin_and_multi_region(kms, backend):
    """DescribeKey's ``Origin`` and ``MultiRegion``, read at resolve, decide the warning:
    a key made in KMS gets none; imported key material (``EXTERNAL``) and a multi-Region
    key each get theirs. The keys still resolve."""
    _, made = new_key(kms)
    assert backend.custody_warning(backend.resolve(made)) is None

    _, imported = new_key(kms, Origin="EXTERNAL")
    assert backend.custody_warning(backend.resolve(imported)) == (
        "key material was imported into KMS (Origin EXTERNAL): a copy existed outside KMS"
    )

    _, replicated = new_key(kms, MultiRegion=True)
    assert backend.custody_warning(backend.resolve(replicated)) == (
        "multi-Region key: replicas in other Regions hold the same private key"
    )
