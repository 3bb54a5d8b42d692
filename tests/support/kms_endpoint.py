"""A local AWS KMS endpoint for tests: moto's KMS served over HTTP on 127.0.0.1, talked to
by the real boto3, with a small TEST-ONLY correction that makes its ``Sign`` faithful.

Why a correction (measured with moto 5.2.5, pinned in requirements/constraints.txt):

* moto ignores ``MessageType=DIGEST``: it hashes the 32/48/64-byte digest AGAIN and signs
  that, so a client that sends a digest gets a signature over ``H(H(m))``;
* moto signs RSASSA-PSS with the MAXIMUM salt length; AWS KMS (and JOSE, RFC 7518 section
  3.5) use salt length = hash length.

moto's own ``Verify`` makes the same two choices, so it accepts its own wrong signatures:
only an independent verifier sees them. LocalStack's KMS is faithful but needs Python
3.13 and binds every interface. So this module starts moto in a child process after
replacing its ``Sign`` handler with one that signs exactly as AWS documents it
(``DIGEST``: the message is the digest, signed without hashing, and its length must be
the hash length; ``RAW``: at most 4096 bytes, hashed once; PSS: MGF1 with the same hash,
salt = hash length). The conformance suite's negative controls
(``test_pss_salt_is_the_hash_length``, ``test_digest_is_not_hashed_twice``) fail against
the uncorrected endpoint, and ``tests/backends/test_aws_kms.py`` proves on every run that
stock moto has exactly these two defects. ``HELSEID_KMS_ENDPOINT_UNCORRECTED`` makes the
conformance fixture leave defects in, to watch the controls fail: ``digest``,
``pss-salt`` (one defect each, emulated here), or ``all`` (moto's own signing code).

Also faithful to AWS, not to moto: ``Sign`` on a disabled key answers ``DisabledException``,
on a key pending deletion ``KMSInvalidStateException`` (moto signs with both).

Error answers have the shape of the AWS JSON 1.1 protocol that KMS speaks (botocore's
service model ``kms/2014-11-01``: ``"protocol": "json"``, ``"jsonVersion": "1.1"``): an
HTTP status and a body ``{"__type": "<error shape name>", "message": "..."}``; botocore
picks the error class by ``__type``. Statuses and wording as the AWS KMS API Reference
gives them (per-operation "Errors" sections and "Common Errors"); these are RECONSTRUCTED
from that documentation, not recorded from the service (docs/backends/aws-kms.md lists them):

=========================  ======  ============================================================
error shape                status  message
=========================  ======  ============================================================
DisabledException          409     ``<key ARN> is disabled.``
KMSInvalidStateException   409     ``<key ARN> is pending deletion.`` (or pending import, ...)
KeyUnavailableException    500     ``<key ARN> is unavailable.`` (retryable; custom key store)
AccessDeniedException      400     ``User: <principal> is not authorized to perform: kms:Sign ...``
ThrottlingException        400     ``Rate exceeded``
KMSInternalException       500     ``An internal error occurred``
=========================  ======  ============================================================

Fault injection, by a tag on the key (set with the real ``TagResource`` API), so a test can
make this endpoint misbehave the way AWS KMS does, for one key only. Tag
``helseid-test-fault`` with value:

* ``throttle``: every ``Sign`` answers ``ThrottlingException`` (HTTP 400);
* ``throttle-first-N``: the first N ``Sign`` calls for the key are throttled, later ones sign;
* ``deny``: ``AccessDeniedException`` (no policy allows kms:Sign); ``deny-explicit``: the
  same, from an explicit deny;
* ``unavailable``: ``KeyUnavailableException`` (HTTP 500), as for a key in a custom key
  store whose CloudHSM cluster or external key store proxy is disconnected;
* ``state-<KeyState>``: ``KMSInvalidStateException`` for that key state (e.g.
  ``state-PendingImport``), as if the key were in it;
* ``internal-error``: ``KMSInternalException`` (HTTP 500);
* ``slow-S``: wait S seconds (a float) before answering.

Run as a script: ``python kms_endpoint.py [--uncorrected digest|pss-salt|all]`` prints one JSON line
``{"url": "http://127.0.0.1:PORT"}`` on stdout once it is serving.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import secrets
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULT_TAG = "helseid-test-fault"
READY_TIMEOUT_S = 30.0
#: moto 5.2.5's two signing defects that the endpoint corrects (see the module docstring).
DEFECTS = frozenset({"digest", "pss-salt"})
#: Comma-separated defects (or ``all``) the conformance fixture leaves UNcorrected.
UNCORRECTED_ENV = "HELSEID_KMS_ENDPOINT_UNCORRECTED"

#: Credentials and settings for boto3 against the local endpoint: fake keys, no config or
#: credential files of the machine, no instance metadata lookups.
TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
TEST_REGION = "eu-north-1"


class KmsEndpointError(RuntimeError):
    """The local KMS endpoint could not be started."""


@dataclass
class KmsEndpoint:
    """A running local KMS endpoint.

    Attributes:
        url: ``http://127.0.0.1:PORT``, the backend's ``endpoint_url``.
        uncorrected: the moto defects left in (empty: faithful; ``DEFECTS``: moto's own Sign).
        process: the child process (stop it with :meth:`stop`).
    """

    url: str
    uncorrected: frozenset[str]
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the endpoint (idempotent); requests to :attr:`url` then fail to connect."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def running_kms_endpoint(uncorrected: frozenset[str] = frozenset()) -> Iterator[KmsEndpoint]:
    """Start the endpoint in a child process on 127.0.0.1 and a free port; stop it on exit.
    ``uncorrected``: moto defects to leave in (negative controls only).

    Raises KmsEndpointError if it exits or prints no ready line within READY_TIMEOUT_S.
    """
    args = [sys.executable, str(Path(__file__).resolve())]
    for defect in sorted(uncorrected):
        args += ["--uncorrected", defect]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        endpoint = KmsEndpoint(url="", uncorrected=frozenset(uncorrected), process=proc)
        try:
            endpoint.url = _wait_ready(proc, stderr)["url"]
            yield endpoint
        finally:
            endpoint.stop()


@contextlib.contextmanager
def aws_test_environment() -> Iterator[None]:
    """Set :data:`TEST_AWS_ENV` in ``os.environ`` for boto3's credential chain; restore on exit."""
    saved = {name: os.environ.get(name) for name in TEST_AWS_ENV}
    os.environ.update(TEST_AWS_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wait_ready(proc: subprocess.Popen[bytes], stderr) -> dict[str, str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KmsEndpointError(f"KMS endpoint not ready after {READY_TIMEOUT_S:.0f} s: {_tail(stderr)}")
            if not sel.select(timeout=remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=10)
                raise KmsEndpointError(f"KMS endpoint exited with {proc.returncode}: {_tail(stderr)}")
            buffer += chunk
    return json.loads(buffer.split(b"\n", 1)[0])


def _tail(stderr) -> str:
    stderr.seek(0)
    return stderr.read().decode("utf-8", "replace")[-2000:]


# -- the conformance target ------------------------------------------------------------

#: Set to an AWS region to run the conformance suite against REAL AWS KMS in the account
#: of boto3's standard credential chain (docs/backends/aws-kms.md); unset: the local endpoint.
REAL_AWS_ENV = "HELSEID_AWSKMS_TEST_REGION"


@contextlib.contextmanager
def kms_conformance_target() -> Iterator[tuple[Any, Callable[[str], str], str]]:
    """Yield ``(backend, make_key, where)`` for the conformance suite.

    ``make_key(spec)`` creates a fresh key with a fresh alias through the backend's own
    ``create_key`` and returns its ``awskms:alias/...`` reference, so every conformance
    test also resolves an alias. Against the local endpoint (faithful unless
    ``HELSEID_KMS_ENDPOINT_UNCORRECTED`` names defects to leave in) nothing outlives the run. Against real AWS
    (``HELSEID_AWSKMS_TEST_REGION``) every alias made is deleted and every key made is
    scheduled for deletion (7 days, the minimum) at the end.
    """
    from helseid_signer.backends.aws_kms import AwsKmsBackend

    region = os.environ.get(REAL_AWS_ENV)
    run = secrets.token_hex(4)
    counter = itertools.count()
    made: list[tuple[str, str]] = []  # (alias, key ARN)

    def make_key_in(backend: Any) -> Callable[[str], str]:
        def make_key(spec: str) -> str:
            alias = f"alias/helseid-signer-conformance-{run}-{spec.lower()}-{next(counter)}"
            resolved = backend.create_key(f"awskms:{alias}", spec)
            made.append((alias, resolved.version))
            return resolved.uri

        return make_key

    if region:
        backend = AwsKmsBackend(region=region)
        try:
            yield backend, make_key_in(backend), f"AWS KMS in {region}"
        finally:
            for alias, arn in made:
                with contextlib.suppress(Exception):
                    backend._client.delete_alias(AliasName=alias)
                with contextlib.suppress(Exception):
                    backend._client.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
            backend.close()
        return
    wanted = {d.strip() for d in os.environ.get(UNCORRECTED_ENV, "").split(",") if d.strip()}
    uncorrected = DEFECTS if "all" in wanted else frozenset(wanted)
    if not uncorrected <= DEFECTS:
        raise KmsEndpointError(f"{UNCORRECTED_ENV}: unknown defect(s) {sorted(uncorrected - DEFECTS)}")
    with aws_test_environment(), running_kms_endpoint(uncorrected) as endpoint:
        backend = AwsKmsBackend(region=TEST_REGION, endpoint_url=endpoint.url)
        try:
            yield (
                backend,
                make_key_in(backend),
                f"local KMS endpoint {endpoint.url} (uncorrected: {sorted(uncorrected)})",
            )
        finally:
            backend.close()


# -- the child process ------------------------------------------------------------------


def _faithful_sign(corrections: frozenset[str]):
    """moto's KmsResponse.sign, replaced: key-state checks and fault injection always; the
    AWS signing rules for each of ``corrections`` (``digest``: a DIGEST is not hashed again;
    ``pss-salt``: PSS salt = hash length). With none, moto's own signing code signs."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from moto.core.exceptions import JsonRESTError
    from moto.kms.exceptions import ValidationException

    class InternalError(JsonRESTError):
        code = 500

    class ConflictError(JsonRESTError):  # DisabledException, KMSInvalidStateException
        code = 409

    states = {
        "PendingDeletion": "pending deletion",
        "PendingImport": "pending import",
        "PendingReplicaDeletion": "pending replica deletion",
        "Unavailable": "unavailable",
        "Creating": "creating",
        "Updating": "updating",
    }

    hash_of = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
    throttled_so_far: dict[str, int] = {}
    guard = threading.Lock()

    def fault(backend, key) -> None:
        tags = {t["TagKey"]: t["TagValue"] for t in backend.list_resource_tags(key.id).get("Tags", [])}
        value = tags.get(FAULT_TAG, "")
        if value == "throttle":
            raise JsonRESTError("ThrottlingException", "Rate exceeded")
        if value.startswith("throttle-first-"):
            with guard:
                seen = throttled_so_far.get(key.id, 0)
                throttled_so_far[key.id] = seen + 1
            if seen < int(value.removeprefix("throttle-first-")):
                raise JsonRESTError("ThrottlingException", "Rate exceeded")
        elif value == "deny":
            raise JsonRESTError(
                "AccessDeniedException",
                f"User: arn:aws:sts::123456789012:assumed-role/test is not authorized to perform: "
                f"kms:Sign on resource: {key.arn} because no resource-based policy allows the kms:Sign action",
            )
        elif value == "deny-explicit":
            raise JsonRESTError(
                "AccessDeniedException",
                f"User: arn:aws:sts::123456789012:assumed-role/test is not authorized to perform: "
                f"kms:Sign on resource: {key.arn} with an explicit deny in a resource-based policy",
            )
        elif value == "unavailable":
            raise InternalError("KeyUnavailableException", f"{key.arn} is unavailable.")
        elif value.startswith("state-"):
            state = value.removeprefix("state-")
            raise ConflictError("KMSInvalidStateException", f"{key.arn} is {states.get(state, state)}.")
        elif value == "internal-error":
            raise InternalError("KMSInternalException", "An internal error occurred")
        elif value.startswith("slow-"):
            time.sleep(float(value.removeprefix("slow-")))

    def sign(self) -> str:
        key_id = self._get_param("KeyId")
        message = self._get_param("Message")
        message_type = self._get_param("MessageType") or "RAW"
        algorithm = self._get_param("SigningAlgorithm")
        self._validate_key_id(key_id)
        key = self.kms_backend.describe_key(key_id)
        if key.key_state == "Disabled":
            raise ConflictError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state != "Enabled":
            raise ConflictError("KMSInvalidStateException", f"{key.arn} is {states.get(key.key_state, key.key_state)}.")
        if key.key_usage != "SIGN_VERIFY":
            raise JsonRESTError("InvalidKeyUsageException", f"{key.arn} key usage is {key.key_usage}")
        if algorithm not in (key.signing_algorithms or []):
            raise ValidationException(f"SigningAlgorithm {algorithm} is not valid for {key.key_spec}")
        fault(self.kms_backend, key)
        if not message:
            raise ValidationException("Message must have length greater than or equal to 1")
        if not corrections:
            signature = key.private_key.sign(message, algorithm)  # moto's own, defects and all
        else:
            chosen = hash_of[algorithm[-3:]]()
            if message_type == "DIGEST" and "digest" not in corrections:
                hash_arg = chosen  # moto's defect: the digest is hashed again
            elif message_type == "DIGEST":
                if len(message) != chosen.digest_size:
                    raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
                hash_arg = Prehashed(chosen)
            elif message_type == "RAW":
                if len(message) > 4096:
                    raise ValidationException("Message must have length less than or equal to 4096")
                hash_arg = chosen
            else:
                raise ValidationException(f"MessageType {message_type!r} is not RAW or DIGEST")
            private = key.private_key.private_key
            if algorithm.startswith("ECDSA_"):
                signature = private.sign(message, ec.ECDSA(hash_arg))
            elif algorithm.startswith("RSASSA_PSS_"):
                salt = padding.PSS.DIGEST_LENGTH if "pss-salt" in corrections else padding.PSS.MAX_LENGTH
                pss = padding.PSS(mgf=padding.MGF1(hash_of[algorithm[-3:]]()), salt_length=salt)
                signature = private.sign(message, pss, hash_arg)
            else:
                signature = private.sign(message, padding.PKCS1v15(), hash_arg)
        return json.dumps(
            {"KeyId": key.arn, "Signature": base64.b64encode(signature).decode(), "SigningAlgorithm": algorithm}
        )

    return sign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uncorrected",
        choices=sorted(DEFECTS) + ["all"],
        action="append",
        default=[],
        help="leave this moto defect uncorrected (negative control); 'all': moto's own Sign crypto",
    )
    args = parser.parse_args()
    left = DEFECTS if "all" in args.uncorrected else frozenset(args.uncorrected)

    import logging

    from moto.kms.responses import KmsResponse
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    KmsResponse.sign = _faithful_sign(DEFECTS - left)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}"}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
