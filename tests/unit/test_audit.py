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
        ("edit a field", lambda ls: [ls[0], ls[1].replace('"j1"', '"jX"'), *ls[2:]], ".jsonl 3: prev does not match"),
        ("remove a record", lambda ls: [ls[0], *ls[2:]], ".jsonl 2: seq 3 where after seq 1 needs 2"),
        ("swap two records", lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], ".jsonl 2: seq 3"),
        ("remove the head", lambda ls: ls[1:], ".jsonl 1: seq 2 where the chain starts needs 1"),
        (
            "insert a forged record",
            lambda ls: [ls[0], ls[1], ls[1].replace('"seq":2', '"seq":3'), *ls[2:]],
            ".jsonl 3: prev does not match",
        ),
        ("break the JSON", lambda ls: [ls[0], ls[1][:-5], *ls[2:]], ".jsonl 2: an audit record that is not valid JSON"),
        ("seq as a boolean", lambda ls: [ls[0].replace('"seq":1', '"seq":true'), *ls[1:]], ".jsonl 1: chain, seq"),
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
        '[profiles.p]\nclient_id = "c"\nissuer = "https://127.0.0.1:4443"\n'
        'assertion_key = "k"\ndpop_key = "k"\n'
    )
    (tmp_path / "a.toml").write_text(base + "[audit]\nfsync = true\n")
    with pytest.raises(ConfigError, match="audit: .*fsync = true needs sink = 'file'"):
        load_settings(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(base + f'[audit]\nsink = "file"\npath = "{tmp_path / "x.jsonl"}"\nfsync = true\n')
    assert load_settings(tmp_path / "b.toml").audit.fsync is True
    _write(tmp_path / "x.jsonl", 3, fsync=True).close()
    assert verify_lines((tmp_path / "x.jsonl").read_text().splitlines()).ok


def test_a_chain_continues_across_rotated_files_given_in_order(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 5).close()
    lines = path.read_text().splitlines(keepends=True)
    (tmp_path / "audit.jsonl.1").write_text("".join(lines[:2]))
    path.write_text("".join(lines[2:]))
    in_order = _verify_cli_files(tmp_path / "audit.jsonl.1", path)
    assert in_order.returncode == 0 and "1 chain(s), 5 record(s)" in in_order.stdout, in_order.stdout
    reversed_order = _verify_cli_files(path, tmp_path / "audit.jsonl.1")
    assert reversed_order.returncode == 1 and "seq 3 where the chain starts needs 1" in reversed_order.stdout


def _verify_cli_files(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_garbage_is_reported_never_a_traceback(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 2).close()
    good = path.read_text()
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_bytes(
        good.encode()
        + b"[" * 5000 + b"\n"  # nesting deeper than the JSON parser's recursion limit
        + b'{"chain":' + b"[" * 5000 + b"\n"
        + b'{"chain":"0123456789abcdef\\u001b[2J","seq":1,"prev":null}\n'  # control characters in the id
        + bytes(range(256)) + b"\n"
    )  # fmt: skip
    proc = _verify_cli(hostile)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hostile.jsonl 4: an audit record that is not valid JSON" in proc.stdout
    assert "hostile.jsonl 5: chain, seq or prev missing or malformed" in proc.stdout
    assert "\x1b" not in proc.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"level":"INFO","message":"no records here"}\n')
    none_found = _verify_cli(empty)
    assert none_found.returncode == 1 and "no audit records found" in none_found.stdout


def test_any_text_a_key_store_returns_is_written_and_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.write({"outcome": "failed", "backend_error": "unpaired \ud800 surrogate, æøå, \n newline, \x00"})
    log.write({"outcome": "signed"})
    log.close()
    raw = path.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 2
    assert json.loads(raw.splitlines()[0])["backend_error"].startswith("unpaired \ud800")
    assert verify_lines(path.read_text().splitlines()).ok


FAILING_WRITE = """
import json, resource, signal, sys
from helseid_signer.audit import AuditError, AuditLog
path = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
log = AuditLog(path)
log.write({"outcome": "signed", "jti": "before"})
size = len(open(path, "rb").read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
try:
    log.write({"outcome": "signed", "jti": "FAILED-ONE", "pad": "x" * 200})
    print("no error")
except AuditError:
    print("AuditError")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.write({"outcome": "signed", "jti": "after"})
log.close()
"""


def test_a_failed_write_is_never_written_later_and_the_next_record_starts_a_new_chain(tmp_path):
    """The file system refuses one record (a file size limit, as a full disk would): the
    caller was told UNAVAILABLE, so that record must not appear later; the records around
    it verify, in two chains."""
    path = tmp_path / "audit.jsonl"
    proc = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "AuditError", proc.stdout + proc.stderr
    text = path.read_text()
    assert '"jti":"FAILED-ONE"' not in text
    lines = text.splitlines()
    assert len(lines) == 3  # the record before, a fragment of the failed one, the record after
    assert [json.loads(lines[0])["jti"], json.loads(lines[2])["jti"]] == ["before", "after"]
    result = verify_lines(lines)
    assert result.ok and len(result.chains) == 2 and result.other_lines == 1


# ------------------------------------- chain anchors in the service log (issue 13, point 8)


@pytest.fixture
def service_log(tmp_path):
    """The signer's JSON service log (logs.setup_logging's formatter), written to a file."""
    import logging

    from helseid_signer.logs import _JsonFormatter

    path = tmp_path / "service.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(_JsonFormatter())
    logger = logging.getLogger("helseid_signer.audit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    handler.close()


def _verify_with_log(path: Path, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", str(path), "--service-log", str(log)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _forged_chain(n: int) -> list[str]:
    """A self-consistent chain anyone can write: a random id, seq 1.., each prev the hash
    of the line before (hashlib, not the product's helper)."""
    lines, prev = [], None
    for i in range(n):
        entry = {"time": "2026-12-05T10:00:00.000Z", "chain": "00112233445566ff", "seq": i + 1, "prev": prev,
                 "caller": "app", "purpose": "client_assertion", "outcome": "signed", "jti": f"forged{i}"}  # fmt: skip
        line = json.dumps(entry, separators=(",", ":"))
        lines.append(line)
        prev = _sha256_b64url(line)
    return lines


def test_a_forged_chain_inserted_in_the_middle_is_found_with_the_service_log(tmp_path, service_log):
    path = tmp_path / "audit.jsonl"
    _write(path, 4).close()
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], *_forged_chain(3), *lines[2:]]) + "\n")
    # Without the anchors the forged chain is indistinguishable from a new worker's chain:
    # this is what audit verify alone cannot prove (docs/security.md).
    assert _verify_cli(path).returncode == 0
    proc = _verify_with_log(path, service_log)
    assert proc.returncode == 1, proc.stdout
    assert "chain 00112233445566ff: 3 record(s)" in proc.stdout
    assert "not announced in the service log: a chain the signer did not write (inserted)" in proc.stdout
    assert "service log: 2 chain anchor(s)" in proc.stdout  # the real chain's start and end


def test_anchors_find_a_removed_tail_and_a_removed_chain(tmp_path, service_log):
    path = tmp_path / "audit.jsonl"
    _write(path, 4).close()
    lines = path.read_text().splitlines()
    assert _verify_with_log(path, service_log).returncode == 0  # intact, with its anchors
    path.write_text("\n".join(lines[:3]) + "\n")  # the last record removed: verify alone cannot see it
    assert _verify_cli(path).returncode == 0
    proc = _verify_with_log(path, service_log)
    assert proc.returncode == 1 and "ends at seq 3, the service log says it ended at seq 4" in proc.stdout, proc.stdout
    path.write_text("\n".join([*lines[:3], lines[3].replace('"j3"', '"jX"')]) + "\n")  # last record edited
    assert _verify_cli(path).returncode == 0
    assert "last record (seq 4) is not the one the service log names" in _verify_with_log(path, service_log).stdout
    other = tmp_path / "other.jsonl"
    _write(other, 2).close()
    proc = _verify_with_log(other, service_log)  # the first file's chain is missing from this one
    assert proc.returncode == 1 and "announced in the service log" in proc.stdout and "(removed)" in proc.stdout


def test_a_failed_write_ends_the_chain_in_the_log_and_the_next_chain_is_announced(tmp_path, service_log):
    path = tmp_path / "audit.jsonl"
    log = _write(path, 2)
    log._new_chain()  # what a failed write does (the record is not written; a new chain begins)
    log.write({"purpose": "key_set"})
    log.close()
    anchors = [json.loads(line)["audit_chain"] for line in service_log.read_text().splitlines()]
    assert [(a["event"], a.get("seq")) for a in anchors] == [("start", None), ("end", 2), ("start", None), ("end", 1)]
    assert anchors[0]["sink"] == str(path)
    assert _verify_with_log(path, service_log).returncode == 0
