"""Real faults under a running service with cloud keys: the KMS endpoint becomes
unreachable and comes back (through a proxy the test cuts and restores), and the Key
Vault stand-in answers 429 and 503. The process stays up, requests get clean statuses,
health follows, and every signature verifies under the key its kid names."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import grpc
import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key
from jwcrypto import jwk

from helseid_signer.audit import verify_lines
from helseid_signer_client import SignerClient, SignerError
from tests.support.azure_kv_standin import running_standin
from tests.support.health import NOT_SERVING, SERVING, health, wait_health
from tests.support.jose_verify import verified_header as _verify
from tests.support.kms_endpoint import TEST_AWS_ENV, TEST_REGION, aws_test_environment, running_kms_endpoint
from tests.support.signer_proc import running_signer, sighup_and_wait
from tests.support.tcp_proxy import TcpProxy

ISSUER = "https://127.0.0.1:4443"


def _config(path, backend_lines: list[str], uri: str, alg: str) -> None:
    path.write_text(
        "\n".join(
            [
                "[server]",
                'listen = "127.0.0.1:0"',
                "insecure = true",
                "health_interval = 0.2",
                "",
                *backend_lines,
                "",
                "[keys.k]",
                f'uri = "{uri}"',
                f'alg = "{alg}"',
                "",
                "[profiles.p]",
                'client_id = "c"',
                f'issuer = "{ISSUER}"',
                'assertion_key = "k"',
                'dpop_key = "k"',
                "",
            ]
        )  # fmt: skip
    )


def _assert_details_stay_in_the_log(details: str, config, secret_parts: tuple[str, ...]) -> None:
    """The caller's message says what kind of failure and gives a ref; the key reference,
    ARN and endpoint are only in the signer's log line and audit record with that ref."""
    match = re.search(r"\(ref ([0-9a-f]{8}); details in the signer's log\)$", details)
    assert match, details
    for part in secret_parts:
        assert part not in details
    ref = match.group(1)
    lines = [json.loads(line) for line in Path(str(config) + ".log").read_text().splitlines() if ref in line]
    logged = [entry for entry in lines if "backend error" in entry.get("message", entry.get("msg", ""))]
    audited = [entry for entry in lines if entry.get("ref") == ref]
    assert logged and audited, lines
    assert audited[0]["outcome"] == "failed" and audited[0]["error"] == details
    assert any(part in audited[0]["backend_error"] for part in secret_parts), audited[0]


def test_kms_endpoint_unreachable_then_back(tmp_path):
    with aws_test_environment(), running_kms_endpoint() as endpoint, TcpProxy(endpoint.url) as proxy:
        kms = boto3.client("kms", region_name=TEST_REGION, endpoint_url=endpoint.url)
        arn = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
        public = jwk.JWK.from_pyca(load_der_public_key(kms.get_public_key(KeyId=arn)["PublicKey"]))
        config = tmp_path / "signer.toml"
        backend = [
            "[backends.awskms]",
            f'region = "{TEST_REGION}"',
            f'endpoint_url = "{proxy.url}"',
            "max_attempts = 2",
        ]
        _config(config, backend, f"awskms:{arn}", "ES256")
        with (
            running_signer(config, env=TEST_AWS_ENV) as address,
            SignerClient(channel=grpc.insecure_channel(address), timeout=4) as client,
        ):
            assert _verify(client.sign_client_assertion("p").jwt, public)["kid"] == public.thumbprint()
            wait_health(address, SERVING, "backend:awskms")

            proxy.cut()
            started = time.monotonic()
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("p")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 4.5  # bounded by the caller's deadline
            _assert_details_stay_in_the_log(caught.value.details, config, secret_parts=(arn, proxy.url))
            wait_health(address, NOT_SERVING, "backend:awskms")
            assert health(address) == NOT_SERVING

            proxy.restore()  # the endpoint is back, with the same keys: health recovers without traffic
            wait_health(address, SERVING, "backend:awskms")
            results = [client.sign_dpop_proof("p", "POST", ISSUER + "/connect/token") for _ in range(10)]
            assert all(_verify(r.jwt, public)["jwk"] == {k: v for k, v in public.export_public(as_dict=True).items()
                                                        if k in ("kty", "crv", "x", "y")} for r in results)  # fmt: skip


def _backend_error_of(details: str, config) -> str:
    """The backend's own text in the audit record of the failed request ``details`` names."""
    ref = re.search(r"\(ref ([0-9a-f]{8});", details).group(1)
    lines = [json.loads(line) for line in Path(str(config) + ".log").read_text().splitlines() if ref in line]
    return next(entry["backend_error"] for entry in lines if entry.get("ref") == ref and "backend_error" in entry)


def test_kms_refusals_reach_the_caller_as_status_and_summary_and_the_audit_names_the_cause(tmp_path):
    """Each KMS error shape, as the real service sends it, through the real botocore into a
    running signer: the caller gets the right gRPC status and only a summary with a ref;
    the audit record with that ref names the actual cause."""
    with aws_test_environment(), running_kms_endpoint() as endpoint:
        kms = boto3.client("kms", region_name=TEST_REGION, endpoint_url=endpoint.url)
        arn = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
        key_id = arn.rsplit("/", 1)[1]
        config = tmp_path / "signer.toml"
        backend = ["[backends.awskms]", f'region = "{TEST_REGION}"', f'endpoint_url = "{endpoint.url}"',
                   "max_attempts = 2"]  # fmt: skip
        _config(config, backend, f"awskms:{arn}", "ES256")

        def fault(value: str | None) -> None:
            if value is None:
                kms.untag_resource(KeyId=key_id, TagKeys=["helseid-test-fault"])
            else:
                kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "helseid-test-fault", "TagValue": value}])

        with (
            running_signer(config, env=TEST_AWS_ENV) as address,
            SignerClient(channel=grpc.insecure_channel(address), timeout=5) as client,
        ):
            assert client.sign_client_assertion("p").jwt
            cases = [
                (lambda: kms.disable_key(KeyId=key_id), grpc.StatusCode.FAILED_PRECONDITION,
                 "the key store refused to sign", "DisabledException"),
                (lambda: (kms.enable_key(KeyId=key_id), fault("unavailable")), grpc.StatusCode.UNAVAILABLE,
                 "the signing key or its key store is not available", "KeyUnavailableException"),
                (lambda: fault("state-PendingImport"), grpc.StatusCode.FAILED_PRECONDITION,
                 "the key store refused to sign", "state PendingImport"),
                (lambda: fault("deny-explicit"), grpc.StatusCode.FAILED_PRECONDITION,
                 "the key store refused to sign", "explicit Deny for kms:Sign"),
                (lambda: fault("throttle"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "the key store is throttling requests", "ThrottlingException"),
                (lambda: (fault(None), kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)),
                 grpc.StatusCode.FAILED_PRECONDITION, "the key store refused to sign", "state PendingDeletion"),
            ]  # fmt: skip
            for arrange, code, summary, cause in cases:
                arrange()
                with pytest.raises(SignerError) as caught:
                    client.sign_client_assertion("p")
                details = caught.value.details
                assert caught.value.code == code, (cause, caught.value.code, details)
                assert details.startswith(summary) and arn not in details and cause not in details, details
                backend_error = _backend_error_of(details, config)
                assert cause in backend_error and arn in backend_error, backend_error


def test_key_vault_429_and_503(tmp_path):
    with running_standin(tmp_path / "kv") as vault:
        uri, public = _azure_key(vault, tmp_path)
        config = tmp_path / "signer.toml"
        backend = ["[backends.azurekv]", f'ca_bundle = "{vault.ca_path}"', "verify_challenge_resource = false"]
        _config(config, backend, uri, "ES256")
        # A plain channel: no client-side retries, so the test sees the service's own answer.
        with (
            running_signer(config, env=vault.identity_env()) as address,
            SignerClient(channel=grpc.insecure_channel(address), timeout=5) as client,
        ):
            assert _verify(client.sign_client_assertion("p").jwt, public)["kid"] == public.thumbprint()
            # A 429 as real vaults send it (no Retry-After): retried after Microsoft's 1 s back-off
            # within the deadline, the caller sees success.
            vault.throttle(1)
            assert _verify(client.sign_client_assertion("p").jwt, public)
            # 429 without end: RESOURCE_EXHAUSTED within the deadline, the process keeps serving.
            vault.throttle(None)
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("p")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details.startswith("the key store is throttling requests; retry later (ref ")
            _assert_details_stay_in_the_log(caught.value.details, config, secret_parts=(uri.removeprefix("azurekv:"),))
            vault.clear_faults()
            # 503 for a while: UNAVAILABLE, then service resumes.
            vault.unavailable(None)
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("p")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            vault.clear_faults()
            wait_health(address, SERVING, "backend:azurekv")
            assert _verify(client.sign_client_assertion("p").jwt, public)["kid"] == public.thumbprint()


def _azure_key(vault, tmp_path) -> tuple[str, jwk.JWK]:
    """Create a key through the real backend (the same way `keys create` does)."""
    from tests.support.azure_kv_kit import standin_backend

    backend = standin_backend(vault)
    resolved = backend.create_key(f"azurekv:{vault.url}/keys/faults", "EC-P256")
    backend.close()
    return f"azurekv:{vault.url}/keys/faults", jwk.JWK.from_pyca(resolved.public_key)


def test_a_reload_that_moves_the_audit_file_keeps_in_flight_records_and_refuses_a_bad_path(tmp_path):
    """A request that started before a reload writes its audit record to the file it
    started with, even when the reload moved the audit trail; a reload whose new audit path
    cannot be opened is refused as a whole (the second file keeps every later record)."""
    with running_standin(tmp_path / "kv") as vault:
        uri, public = _azure_key(vault, tmp_path)
        config = tmp_path / "signer.toml"
        backend = ["[backends.azurekv]", f'ca_bundle = "{vault.ca_path}"', "verify_challenge_resource = false"]
        first, second = tmp_path / "audit-1.jsonl", tmp_path / "audit-2.jsonl"

        def write(audit_path: Path, extra: tuple[str, ...] = ()) -> None:
            audit = ["[audit]", 'sink = "file"', f'path = "{audit_path}"']
            _config(config, [*backend, "", *audit, *extra], uri, "ES256")

        write(first)
        with (
            running_signer(config, env=vault.identity_env()) as address,
            SignerClient(channel=grpc.insecure_channel(address), timeout=10) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            assert _verify(client.sign_client_assertion("p").jwt, public)
            vault.delay(2.0, 1)  # the next signature takes 2 s at the vault
            slow = pool.submit(client.sign_client_assertion, "p")
            time.sleep(0.5)
            # A reload that leaves [audit] alone (the new generation shares the audit file) ...
            write(first, extra=("", "[profiles.q]", 'client_id = "c"', f'issuer = "{ISSUER}"',
                                'assertion_key = "k"', 'dpop_key = "k"'))  # fmt: skip
            sighup_and_wait(config, "configuration reloaded")
            # ... then one that moves it: the slow request still writes to the first file.
            write(second)
            sighup_and_wait(config, "configuration reloaded")
            in_flight = slow.result(timeout=10)
            assert _verify(in_flight.jwt, public)
            after = client.sign_client_assertion("p")
            write(tmp_path / "no-such-folder" / "audit.jsonl")
            sighup_and_wait(config, "reload refused")
            last = client.sign_client_assertion("p")
    first_jtis = {json.loads(line).get("jti") for line in first.read_text().splitlines()}
    second_jtis = {json.loads(line).get("jti") for line in second.read_text().splitlines()}
    assert in_flight.jti in first_jtis and in_flight.jti not in second_jtis
    assert {after.jti, last.jti} <= second_jtis
    assert verify_lines(first.read_text().splitlines()).ok and verify_lines(second.read_text().splitlines()).ok
