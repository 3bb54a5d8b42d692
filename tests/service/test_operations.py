"""Operations with real faults: the SoftHSM token deleted and re-created under a running
service, a key missing at start-up, and configuration reloads (SIGHUP)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from helseid_signer_client import SignerError
from tests.support.health import NOT_SERVING, SERVING, health, wait_health
from tests.support.jose_verify import verifies as _verifies
from tests.support.signer_proc import plain_client, running_signer, sighup_and_wait
from tests.support.signerkit import write_config
from tests.support.softhsm import create_token, import_private_key

ISSUER = "https://127.0.0.1:4443"


def _recreate(folder: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Delete the token and make a new one with the same label holding ``key``."""
    shutil.rmtree(folder / "tokens")
    token = create_token(folder, label="ops")
    import_private_key(token, key, "k", "01")


@pytest.fixture
def ops(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    token = create_token(tmp_path / "token", label="ops")
    import_private_key(token, key, "k", "01")
    config = write_config(
        tmp_path / "signer.toml", token, issuer=ISSUER, client_id="ops",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 0.2"),
    )  # fmt: skip
    return {"key": key, "token": token, "folder": tmp_path / "token", "config": config}


def test_token_deleted_and_recreated_recovers_without_restart(ops):
    with running_signer(ops["config"], env={"SOFTHSM2_CONF": str(ops["token"].conf)}) as address:
        with plain_client(address) as client:
            assert _verifies(client.sign_client_assertion("p").jwt, ops["key"])
            wait_health(address, SERVING, "backend:pkcs11")

            # The token disappears: requests fail cleanly, health goes NOT_SERVING, the process stays up.
            shutil.rmtree(ops["folder"] / "tokens")
            (ops["folder"] / "tokens").mkdir()
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("p")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            wait_health(address, NOT_SERVING, "backend:pkcs11")
            assert health(address) == NOT_SERVING

            # The same key comes back in a new token: the service recovers by itself.
            shutil.rmtree(ops["folder"] / "tokens")
            token = create_token(ops["folder"], label="ops")
            import_private_key(token, ops["key"], "k", "01")
            wait_health(address, SERVING, "backend:pkcs11")
            results = [client.sign_client_assertion("p") for _ in range(20)]
            assert all(_verifies(r.jwt, ops["key"]) for r in results)
            # What signed is the new token's key: GetKeySet and the audit records say so.
            assert token.serial != ops["token"].serial
            assert [k["key_version"] for k in client.get_key_set("p").keys] == [f"serial={token.serial};id=01"]
    lines = Path(str(ops["config"]) + ".log").read_text().splitlines()  # log lines and audit records (stdout)
    signed = [r for r in map(json.loads, (x for x in lines if x.startswith("{"))) if r.get("outcome") == "signed"]
    assert signed[0]["key_version"] == f"serial={ops['token'].serial};id=01"
    assert {r["key_version"] for r in signed[-20:]} == {f"serial={token.serial};id=01"}


def test_replace_token_under_load_costs_at_most_one_request(ops):
    with running_signer(ops["config"], env={"SOFTHSM2_CONF": str(ops["token"].conf)}) as address:
        with plain_client(address) as client:
            assert _verifies(client.sign_dpop_proof("p", "POST", ISSUER + "/connect/token").jwt, ops["key"])
            _recreate(ops["folder"], ops["key"])
            failures, signed = 0, []
            for _ in range(30):
                try:
                    signed.append(client.sign_dpop_proof("p", "POST", ISSUER + "/connect/token"))
                except SignerError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE
                    failures += 1
                time.sleep(0.02)
    assert failures <= 1 and len(signed) >= 29
    assert all(_verifies(p.jwt, ops["key"]) for p in signed)


def test_a_different_key_in_the_recreated_token_is_never_used(ops):
    with running_signer(ops["config"], env={"SOFTHSM2_CONF": str(ops["token"].conf)}) as address:
        with plain_client(address) as client:
            kid = client.sign_client_assertion("p").kid
            impostor = ec.generate_private_key(ec.SECP256R1())
            _recreate(ops["folder"], impostor)
            time.sleep(1.2)  # past the recovery interval; the health probe has found the other key
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(SignerError) as caught:
                    client.sign_client_assertion("p")
                # An operator must act: FAILED_PRECONDITION (not retried by clients), answered
                # at once - no Cryptoki re-initialisation per request.
                assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details
                assert "signing key in the key store was replaced" in caught.value.details
                assert time.monotonic() - started < 0.25
                time.sleep(0.3)
            wait_health(address, NOT_SERVING, "backend:pkcs11")
            # The original key comes back: signing resumes, under the same kid.
            _recreate(ops["folder"], ops["key"])
            wait_health(address, SERVING, "backend:pkcs11")
            again = client.sign_client_assertion("p")
            assert again.kid == kid and _verifies(again.jwt, ops["key"])


def test_key_missing_at_start_up_makes_the_backend_not_serving_until_it_appears(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    token = create_token(tmp_path / "token", label="ops")
    config = write_config(
        tmp_path / "signer.toml", token, issuer=ISSUER, client_id="ops",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 0.2"),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        assert health(address, "backend:pkcs11") == NOT_SERVING and health(address) == NOT_SERVING
        with plain_client(address) as client:
            with pytest.raises(SignerError) as caught:
                client.sign_client_assertion("p")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "not available" in caught.value.details
            import_private_key(token, key, "k", "01")
            wait_health(address, SERVING, "backend:pkcs11", timeout=15)  # retried with backoff (1, 2, 4 s ...)
            assert _verifies(client.sign_client_assertion("p").jwt, key)


def test_bad_configuration_stops_start_up_with_a_message_naming_the_key(ops):
    bad = ops["config"].read_text().replace('alg = "ES256"', 'alg = "RS256"')
    path = ops["config"].with_name("bad.toml")
    path.write_text(bad)
    result = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(path)],
        env=ops["token"].env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "keys.k:" in result.stderr and "RSA" in result.stderr


def test_sighup_reloads_a_good_configuration_and_refuses_a_bad_one(ops):
    config = ops["config"]
    with running_signer(config, env={"SOFTHSM2_CONF": str(ops["token"].conf)}) as address:
        with plain_client(address) as client:
            assert client.get_client_profile("p").assertion_lifetime_seconds == 10
            original = config.read_text()
            # A good change: a second profile and a shorter lifetime.
            config.write_text(
                original.replace('dpop_key = "k"', 'dpop_key = "k"\nassertion_lifetime = 5', 1)
                + '\n[profiles.q]\nclient_id = "q"\nissuer = "https://localhost:4443"\n'
                'assertion_key = "k"\ndpop_key = "k"\n'
            )
            _signal_signer(config, signal.SIGHUP)
            _eventually(lambda: client.get_client_profile("p").assertion_lifetime_seconds == 5)
            assert client.get_client_profile("q").issuer == "https://localhost:4443"
            # A bad change: refused, the running configuration stays.
            config.write_text(original.replace('alg = "ES256"', 'alg = "ES384"'))
            _signal_signer(config, signal.SIGHUP)
            _eventually(lambda: "reload refused" in Path(str(config) + ".log").read_text())
            assert client.get_client_profile("q").client_id == "q"
            assert _verifies(client.sign_client_assertion("p").jwt, ops["key"])
    lines = [json.loads(line) for line in Path(str(config) + ".log").read_text().splitlines() if line.startswith("{")]
    messages = [e["message"] for e in lines if "message" in e]  # the rest are audit records (stdout)
    assert any(m.startswith("configuration reloaded") for m in messages)
    assert any("keys.k" in m for m in messages if m.startswith("reload refused"))


def _signal_signer(config: Path, sig: signal.Signals) -> None:
    """Signal the signer process started for ``config`` (found by its command line)."""
    out = subprocess.run(["pgrep", "-f", f"serve --config {config}"], capture_output=True, text=True).stdout.split()
    assert out, "signer process not found"
    for p in out:
        subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", p], check=True)


def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_token_created_after_start_up_is_found_without_restart(tmp_path):
    """Cryptoki lists tokens at C_Initialize: the backend re-initialises to find a token that
    appeared later (or that a busy token store hid at start-up)."""
    from tests.support.softhsm import DEFAULT_MODULE, SoftHsmToken, write_conf

    folder = tmp_path / "token"
    conf = write_conf(folder)
    future = SoftHsmToken(conf=conf, module=DEFAULT_MODULE, label="late", pin_file=folder / "user.pin", serial="")
    config = write_config(
        tmp_path / "signer.toml", future, issuer=ISSUER, client_id="ops",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 0.2"),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(conf)}) as address, plain_client(address) as client:
        assert health(address, "backend:pkcs11") == NOT_SERVING
        key = ec.generate_private_key(ec.SECP256R1())
        token = create_token(folder, label="late")
        import_private_key(token, key, "k", "01")
        wait_health(address, SERVING, "backend:pkcs11", timeout=15)
        assert _verifies(client.sign_client_assertion("p").jwt, key)


def test_a_replaced_key_recovers_while_another_key_of_the_backend_is_pending(tmp_path):
    """The health probe also runs while some other key of the backend is still pending
    (not in the token yet): it is what finds the original key restored."""
    key = ec.generate_private_key(ec.SECP256R1())
    token = create_token(tmp_path / "token", label="ops")
    import_private_key(token, key, "k", "01")
    config = write_config(
        tmp_path / "signer.toml", token, issuer=ISSUER, client_id="ops",
        keys={"k": "ES256", "later": "ES256"}, profiles={"p": ("k", "k"), "r": ("later", "later")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", "health_interval = 0.2"),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        with plain_client(address) as client:
            kid = client.sign_client_assertion("p").kid
            _recreate(tmp_path / "token", ec.generate_private_key(ec.SECP256R1()))
            deadline = time.monotonic() + 10
            while True:  # until the probe has seen the other key in the object
                try:
                    signed = client.sign_client_assertion("p")
                    assert _verifies(signed.jwt, key)  # never a signature of the other key
                except SignerError as exc:
                    if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                        break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            _recreate(tmp_path / "token", key)
            deadline = time.monotonic() + 10
            while True:
                try:
                    again = client.sign_client_assertion("p")
                    break
                except SignerError as exc:
                    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline
                    time.sleep(0.1)
            assert again.kid == kid and _verifies(again.jwt, key)
            with pytest.raises(SignerError) as pending:
                client.sign_client_assertion("r")
            assert pending.value.code == grpc.StatusCode.UNAVAILABLE


def test_audit_file_rotation_with_move_and_sighup(tmp_path):
    """What logrotate does with ``create`` and a postrotate ``kill -HUP``: the file is moved
    away, SIGHUP, and the service writes to a new file at the configured path (a new chain);
    records before the move stay in the moved file. Both verify."""
    key = ec.generate_private_key(ec.SECP256R1())
    token = create_token(tmp_path / "token", label="ops")
    import_private_key(token, key, "k", "01")
    audit = tmp_path / "audit.jsonl"
    config = write_config(
        tmp_path / "signer.toml", token, issuer=ISSUER, client_id="ops",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        extra_lines=("[audit]", 'sink = "file"', f'path = "{audit}"'),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        with plain_client(address) as client:
            before = client.sign_client_assertion("p")
            audit.rename(tmp_path / "audit.jsonl.1")
            sighup_and_wait(config, "configuration reloaded")
            after = client.sign_client_assertion("p")
    rotated = [json.loads(line) for line in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    fresh = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["jti"] for r in rotated if "jti" in r] == [before.jti]
    assert [r["jti"] for r in fresh if "jti" in r] == [after.jti]
    assert rotated[0]["chain"] != fresh[0]["chain"] and fresh[0]["seq"] == 1
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", str(tmp_path / "audit.jsonl.1"), str(audit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "2 chain(s)" in proc.stdout, proc.stdout
