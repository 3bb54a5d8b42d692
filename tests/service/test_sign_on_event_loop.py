"""``[backends.pkcs11] sign_on_event_loop``: the opt-in that signs on the worker's event loop.

A real ``helseid-signer serve`` on SoftHSM, with the option on and (as the control) off.
What must hold either way: every answer is a valid JWS (jwcrypto is the oracle). What the
option changes: WHERE the Cryptoki signature runs - on the main thread (the event loop)
when on, on the module's signing thread when off. Linux accounts CPU per thread
(``/proc/<pid>/task/<tid>/stat``); an RSA-4096 signature on SoftHSM costs milliseconds, so
100 of them are far above what gRPC's own threads spend on 100 calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from helseid_signer_client import SignerClient
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

CALLS = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the main thread, CPU seconds of all other threads) of ``pid``."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if task.name == str(pid):
            main += seconds
        else:
            other += seconds
    return main, other


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inline")
    token = create_token(folder / "token", label="inline")
    jwks = {
        "assertion": keys_create(token, "assertion", "RSA-4096", "RS256"),
        "dpop": keys_create(token, "dpop", "EC-P256", "ES256"),
    }
    return token, jwks, folder


@pytest.mark.parametrize("on_event_loop", [True, False], ids=["on", "off (control)"])
def test_where_the_signature_runs(token, on_event_loop: bool) -> None:
    token, jwks, folder = token
    config = write_config(
        folder / f"signer-{on_event_loop}.toml",
        token,
        issuer="https://127.0.0.1:4443",
        client_id="inline-client",
        keys={"assertion": "RS256", "dpop": "ES256"},
        profiles={"p": ("assertion", "dpop")},
        api_base_urls=("https://api.example.no",),
        pkcs11_lines=(f"sign_on_event_loop = {'true' if on_event_loop else 'false'}",),
    )
    signer = start_signer(config, env={"SOFTHSM2_CONF": str(token.conf)})
    try:
        with SignerClient(signer.address) as client:
            assertion_key, dpop_key = jwk.JWK(**jwks["assertion"]), jwk.JWK(**jwks["dpop"])
            client.sign_client_assertion("p")  # warm-up: connection, first calls
            main_before, other_before = thread_cpu(signer.pid)
            assertions = [client.sign_client_assertion("p") for _ in range(CALLS)]
            main_after, other_after = thread_cpu(signer.pid)
            proof = client.sign_dpop_proof("p", "POST", "https://api.example.no/files")
        for answer in assertions:
            obj = jws.JWS()
            obj.deserialize(answer.jwt, key=assertion_key)  # raises unless the signature verifies
            assert json.loads(obj.payload)["jti"] == answer.jti
        obj = jws.JWS()
        obj.deserialize(proof.jwt, key=dpop_key)
        assert json.loads(obj.payload)["htu"] == "https://api.example.no/files"
        assert len({a.jti for a in assertions}) == CALLS
    finally:
        signer.stop()
    # The trade-off is never silent: the start-up log and `check` name it when it is on.
    assert ("sign_on_event_loop: on" in signer.log.read_text()) is on_event_loop
    checked = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "check", "--config", str(config)],
        env={**os.environ, "SOFTHSM2_CONF": str(token.conf)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout  # warnings only, no errors
    assert ("backends.pkcs11.sign_on_event_loop: on" in checked.stdout) is on_event_loop, checked.stdout
    main, other = main_after - main_before, other_after - other_before
    # Each RSA-4096 signature costs several ms of CPU on SoftHSM: CALLS of them are >= 0.2 s.
    if on_event_loop:
        assert main > 0.2 and other < main / 2, (main, other)
    else:
        assert other > 0.2 and main < other, (main, other)
