"""The audit trail's hash chains: written by AuditLog, checked by ``helseid-signer audit
verify``. The oracle for ``prev`` is hashlib + base64 here, not the module's own helper."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helseid_signer.audit import AuditError, AuditLog, verify_lines
from helseid_signer.config import ConfigError, load_settings


def _sha256_b64url(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def _write(path: Path, n: int, **extra) -> AuditLog:
    log = AuditLog(str(path), **extra)
    for i in range(n):
        log.write({"caller": "app", "profile": "p", "purpose": "dpop_proof", "outcome": "signed", "jti": f"j{i}"})
    return log


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_records_form_a_chain_of_sha256_links(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 4).close()
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert len({r["chain"] for r in records}) == 1 and len(records[0]["chain"]) == 16
    assert records[0]["prev"] is None
    for before, record in zip(lines, records[1:], strict=False):
        assert record["prev"] == _sha256_b64url(before)
    assert verify_lines(lines).ok
    proc = _verify_cli(path)
    assert proc.returncode == 0 and ": 4 record(s), " in proc.stdout and "intact" in proc.stdout, proc.stdout


def test_two_writers_on_one_file_are_two_chains(tmp_path):
    """Worker processes append to the same file; each has its own chain."""
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(str(path)), AuditLog(str(path))
    for i in range(6):
        (a if i % 2 else b).write({"purpose": "key_set", "i": i})
    a.close()
    b.close()
    result = verify_lines(path.read_text().splitlines())
    assert result.ok and sorted(c.records for c in result.chains.values()) == [3, 3]


def _tampered(tmp_path: Path, change) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "audit.jsonl"
    _write(path, 5).close()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(change(lines)) + "\n")
    return _verify_cli(path)


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        ("edit a field", lambda ls: [ls[0], ls[1].replace('"j1"', '"jX"'), *ls[2:]], "line 3: prev does not match"),
        ("remove a record", lambda ls: [ls[0], *ls[2:]], "line 2: seq 3 where after seq 1 needs 2"),
        ("swap two records", lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line 2: seq 3"),
        ("remove the head", lambda ls: ls[1:], "line 1: seq 2 where the chain starts needs 1"),
        (
            "insert a forged record",
            lambda ls: [ls[0], ls[1], ls[1].replace('"seq":2', '"seq":3'), *ls[2:]],
            "line 3: prev does not match",
        ),
        ("break the JSON", lambda ls: [ls[0], ls[1][:-5], *ls[2:]], "line 2: an audit record that is not valid JSON"),
    ],
)
def test_tampering_is_found_and_named_by_line(tmp_path, name, change, words):
    proc = _tampered(tmp_path, change)
    assert proc.returncode == 1, (name, proc.stdout)
    assert words in proc.stdout, (name, proc.stdout)


def test_log_lines_among_the_records_are_counted_not_checked(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 3).close()
    lines = path.read_text().splitlines()
    log_line = json.dumps({"level": "INFO", "message": "configuration reloaded"})
    result = verify_lines([lines[0], log_line, "plain text", *lines[1:]])
    assert result.ok and result.other_lines == 2


def test_a_failed_write_raises_when_fail_closed_and_the_file_is_unreadable_for_verify(tmp_path):
    with pytest.raises(AuditError):
        AuditLog("/dev/full").write({"purpose": "key_set"})
    assert _verify_cli(tmp_path / "missing.jsonl").returncode == 2


def test_fsync_needs_a_file_sink_and_writes_records(tmp_path):
    base = (
        '[server]\nlisten = "127.0.0.1:50051"\ninsecure = true\n'
        '[backends.pkcs11]\nmodule = "/x.so"\npin_file = "/p"\n'
        '[keys.k]\nuri = "pkcs11:token=t;object=k"\nalg = "ES256"\n'
        '[profiles.p]\nclient_id = "c"\nissuer = "https://helseid-sts.test.nhn.no"\n'
        'assertion_key = "k"\ndpop_key = "k"\n'
    )
    (tmp_path / "a.toml").write_text(base + "[audit]\nfsync = true\n")
    with pytest.raises(ConfigError, match="audit: .*fsync = true needs sink = 'file'"):
        load_settings(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(base + f'[audit]\nsink = "file"\npath = "{tmp_path / "x.jsonl"}"\nfsync = true\n')
    assert load_settings(tmp_path / "b.toml").audit.fsync is True
    _write(tmp_path / "x.jsonl", 3, fsync=True).close()
    assert verify_lines((tmp_path / "x.jsonl").read_text().splitlines()).ok
