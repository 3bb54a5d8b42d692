"""Runs last (the folder sorts last): scans every log and audit file the whole test run
wrote for private-key, PIN and token material. Signer processes log to ``<config>.log``
(stdout and stderr, audit records included when the sink is stdout); audit files are
``*.jsonl``. PINs are read from the SoftHSM tokens' PIN files made during the run."""

from __future__ import annotations

import re

import pytest

JWS = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")  # a JOSE header and a JSON payload
PRIVATE_KEY = re.compile(r"PRIVATE KEY|\"d\"\s*:|\"p\"\s*:\s*\"|\"q\"\s*:\s*\"")


def test_no_private_key_pin_or_token_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    logs = [p for p in base.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl")]
    pins = {p.read_text().strip() for p in base.rglob("*.pin") if p.is_file()}
    pins.discard("")
    findings = []
    for path in logs:
        text = path.read_text(errors="replace")
        if JWS.search(text):
            findings.append(f"{path}: JWS/JWT")
        if PRIVATE_KEY.search(text):
            findings.append(f"{path}: private key material")
        findings += [f"{path}: a PIN" for pin in pins if pin in text]
        if "secret-token-value" in text:
            findings.append(f"{path}: an access token")
    assert not findings, findings
    # The scan had something to read whenever signer processes ran in this session.
    ran_signers = any(base.rglob("signer*.toml"))
    assert not ran_signers or any(p.name.endswith(".toml.log") for p in logs)
