"""A host install as docs/operations.md describes it (issue 18): ``check`` refuses what
``serve`` refuses (each host-side fault exit 2, naming the key, and ``serve`` says so in
one JSON log line, never a traceback); a reload with bad TLS files is refused as a whole;
refusals are counted per caller; reloads, TLS expiry and audit write failures are metrics;
``helseid-signer health``; gRPC core's own lines in the JSON log; the client-side symptoms
of TLS mistakes (docs/operations.md, "Troubleshooting"); ``check``'s warnings about rate
bursts and rotation readiness.

Real parts: a SoftHSM token with keys made by ``keys create``, a throwaway CA made with
``cryptography``, real signer processes. Oracles: exit statuses, the JSON log parsed line
by line, the Prometheus text parsed by prometheus-client, gRPC status codes.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from helseid_signer.audit import AuditLog
from helseid_signer_client import SignerClient, SignerError
from tests.support.pki import CertificateAuthority
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

AUDIT_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_issuer() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # discovery unreachable: a warning only


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A SoftHSM token with keys ``assertion`` and ``dpop``, a CA ``apps`` with a server
    certificate for 127.0.0.1 and client certificates, and another CA ``other``."""
    folder = tmp_path_factory.mktemp("host")
    token = create_token(folder / "token", label="host")
    keys_create(token, "assertion", "EC-P256", "ES256")
    keys_create(token, "dpop", "EC-P256", "ES256")
    ca = CertificateAuthority(folder / "pki", "apps")
    other = CertificateAuthority(folder / "other", "other")
    return {
        "folder": folder,
        "token": token,
        "ca": ca,
        "other": other,
        "server": ca.issue("server", ips=("127.0.0.1",), server=True),
        "app": ca.issue("app", dns=("app.example",)),
        "stranger": ca.issue("stranger", dns=("stranger.example",)),
        "other_app": other.issue("other-app", dns=("app.example",)),
    }


def make_config(kit, name: str, *, extra: tuple[str, ...] = (), **paths: str) -> Path:
    """An mTLS signer config in a folder of its own: caller ``app`` (TLS, rate 1/s, burst 1),
    caller ``local`` (Unix socket), audit to a file, metrics on a free port. ``paths``
    override ``tls_certificate``, ``tls_private_key``, ``client_ca``, ``audit``, ``socket``,
    ``socket_group`` (text added to the socket's table)."""
    folder = kit["folder"] / name
    folder.mkdir()
    tls_key = folder / "tls.key"
    shutil.copy(kit["server"].key_path, tls_key)  # a copy: a test may replace it
    files = {
        "tls_certificate": str(kit["server"].cert_path),
        "tls_private_key": str(tls_key),
        "client_ca": str(kit["ca"].cert_path),
        "audit": str(folder / "audit.jsonl"),
        "socket": str(folder / "local.sock"),
        **paths,
    }
    metrics_port = _free_port()
    path = write_config(
        folder / "signer.toml", kit["token"], issuer=_closed_issuer(), client_id="host-client",
        keys={"assertion": "ES256", "dpop": "ES256"}, profiles={"p": ("assertion", "dpop")},
        server_lines=(
            'listen = "127.0.0.1:0"', f'tls_certificate = "{files["tls_certificate"]}"',
            f'tls_private_key = "{files["tls_private_key"]}"', f'client_ca = "{files["client_ca"]}"',
            "health_interval = 0.5",
        ),
        extra_lines=(
            "[audit]", 'sink = "file"', f'path = "{files["audit"]}"', "",
            "[metrics]", f'listen = "127.0.0.1:{metrics_port}"', "",
            "[callers.app]", 'tls_names = ["dns:app.example"]', 'profiles = ["p"]',
            "rate_limit = 1", "rate_burst = 1", "",
            "[callers.local]", 'profiles = ["p"]',
            f'unix_socket = {{ path = "{files["socket"]}", mode = 0o600{files.get("socket_group", "")} }}', "",
            *extra,
        ),
    )  # fmt: skip
    path.with_suffix(".metrics").write_text(f"http://127.0.0.1:{metrics_port}/metrics")
    return path


def run_cli(kit, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", *args],
        env=kit["token"].env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON object (fails on a line that is not one)."""
    out = []
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON log line: {line!r}"
        out.append(json.loads(line))
    return out


def samples(config: Path) -> dict[tuple[str, tuple], float]:
    text = httpx.get(config.with_suffix(".metrics").read_text(), timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _mismatched_key(kit) -> str:
    return str(kit["app"].key_path)  # a real key, of another certificate


BROKEN = {
    # case: (overrides, key named in the error)
    "client_ca missing": (lambda kit, d: {"client_ca": str(d / "absent-ca.pem")}, "server.client_ca"),
    "client_ca is a leaf": (lambda kit, d: {"client_ca": str(kit["app"].cert_path)}, "server.client_ca"),
    "key does not match": (lambda kit, d: {"tls_private_key": _mismatched_key(kit)}, "server.tls_private_key"),
    "audit folder missing": (lambda kit, d: {"audit": str(d / "no-such-dir" / "audit.jsonl")}, "audit.path"),
    "socket group missing": (
        lambda kit, d: {"socket_group": ', group = "no-such-group-18"'},
        "callers.local.unix_socket.group: no group 'no-such-group-18'",
    ),
    "socket folder missing": (
        lambda kit, d: {"socket": str(d / "no-such-dir" / "s.sock")},
        "callers.local.unix_socket",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_and_serve_refuse_each_broken_host_file_naming_the_key(kit, case, tmp_path):
    overrides, key = BROKEN[case]
    config = make_config(kit, f"broken-{case.replace(' ', '-')}", **overrides(kit, tmp_path))
    checked = run_cli(kit, "check", "--config", str(config), "--timeout", "1")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    errors = [line for line in checked.stdout.splitlines() if line.startswith("error: ")]
    assert any(line.startswith(f"error: configuration: {key}") for line in errors), checked.stdout
    served = run_cli(kit, "serve", "--config", str(config), timeout=60)
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr
    lines = json_lines(served.stderr)
    refusals = [entry for entry in lines if entry["level"] == "error"]
    assert refusals and all(entry["message"].startswith("configuration error: ") for entry in refusals), lines
    assert any(key in entry["message"] for entry in refusals), lines


@pytest.fixture(scope="module")
def running(kit):
    config = make_config(kit, "running")
    signer = start_signer(config, {"SOFTHSM2_CONF": str(kit["token"].conf)}, timeout=60)
    try:
        yield {"config": config, "signer": signer}
    finally:
        signer.stop()


def _mtls_client(kit, address: str, who: str = "app", ca: str = "ca") -> SignerClient:
    issued = kit[who]
    credentials = grpc.ssl_channel_credentials(kit[ca].cert_path.read_bytes(), issued.key, issued.cert)
    return SignerClient(address, credentials=credentials, timeout=5)


def _wait_for_log(log: Path, text: str, before: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) <= before:
        assert time.monotonic() < deadline, f"{text!r} not logged: {log.read_text()[-2000:]}"
        time.sleep(0.05)


def test_reload_with_a_key_that_does_not_match_is_refused_and_the_old_certificate_serves(kit, running):
    config, signer = running["config"], running["signer"]
    key_file = config.parent / "tls.key"
    good_key = key_file.read_bytes()
    before = signer.log.read_text().count("reload refused")
    key_file.write_bytes(Path(_mismatched_key(kit)).read_bytes())
    try:
        signer.signal(signal.SIGHUP)
        _wait_for_log(signer.log, "reload refused", before)
    finally:
        key_file.write_bytes(good_key)
    refused = [e for e in json_lines(signer.log.read_text()) if "reload refused" in e["message"]]
    assert "server.tls_private_key: does not match the certificate" in refused[-1]["message"]
    assert refused[-1]["level"] == "error"
    # The old certificate and key still serve, on new connections too.
    with _mtls_client(kit, signer.address) as client:
        assert client.get_client_profile("p").client_id == "host-client"
    got = samples(config)
    assert got[("helseid_signer_reloads_total", (("result", "refused"),))] >= 1
    not_after = x509.load_pem_x509_certificate(kit["server"].cert).not_valid_after_utc.timestamp()
    ca_not_after = kit["ca"].cert.not_valid_after_utc.timestamp()
    expiry = "helseid_signer_tls_certificate_expiry_timestamp_seconds"
    assert got[(expiry, (("certificate", "server"),))] == not_after
    assert got[(expiry, (("certificate", "client_ca"),))] == ca_not_after
    # A good reload is counted as applied.
    before = signer.log.read_text().count("configuration reloaded")
    signer.signal(signal.SIGHUP)
    _wait_for_log(signer.log, "configuration reloaded", before)
    assert samples(config)[("helseid_signer_reloads_total", (("result", "applied"),))] >= 1


def test_refusals_are_counted_per_configured_caller(kit, running):
    config, address = running["config"], running["signer"].address
    name = "helseid_signer_caller_refusals_total"
    limited = (name, (("caller", "app"), ("status", "RESOURCE_EXHAUSTED")))
    unknown = (name, (("caller", "-"), ("status", "UNAUTHENTICATED")))
    before = samples(config)
    with _mtls_client(kit, address) as client:
        codes = []
        for _ in range(3):  # burst 1, 1 per second: at least one of three quick calls is refused
            try:
                client.sign_client_assertion("p")
                codes.append("OK")
            except SignerError as exc:
                codes.append(exc.code.name)
    with _mtls_client(kit, address, who="stranger") as client, pytest.raises(SignerError) as caught:
        client.sign_client_assertion("p")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    after = samples(config)
    assert after.get(limited, 0) - before.get(limited, 0) == codes.count("RESOURCE_EXHAUSTED") >= 1
    assert after.get(unknown, 0) - before.get(unknown, 0) == 1
    # Only configured names (and "-") ever become caller labels.
    callers = {dict(labels)["caller"] for (n, labels) in after if n == name}
    assert callers <= {"app", "local", "-"}


def test_health_command_answers_for_systemd_hosts_and_scripts(kit, running):
    config, address = running["config"], running["signer"].address
    by_socket = run_cli(kit, "health", "--config", str(config))
    assert by_socket.returncode == 0, by_socket.stderr
    assert by_socket.stdout.strip() == f"unix:{config.parent / 'local.sock'} (overall): SERVING"
    pki = ("--ca-file", str(kit["ca"].cert_path), "--cert-file", str(kit["app"].cert_path),
           "--key-file", str(kit["app"].key_path))  # fmt: skip
    over_tls = run_cli(kit, "health", "--target", address, *pki, "--service", "backend:pkcs11")
    assert over_tls.returncode == 0 and over_tls.stdout.strip().endswith("backend:pkcs11: SERVING"), over_tls.stderr
    nobody = run_cli(kit, "health", "--target", f"unix:{config.parent / 'absent.sock'}", "--timeout", "1")
    assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr
    unknown = run_cli(kit, "health", "--config", str(config), "--service", "no-such-service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    usage = run_cli(kit, "health", "--target", address, "--ca-file", str(kit["ca"].cert_path))
    assert usage.returncode == 2 and "--cert-file" in usage.stderr


def _symptom(address: str, credentials: grpc.ChannelCredentials | None) -> tuple[str, str]:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with SignerClient(address, channel=channel, timeout=3) as client:
        try:
            client.get_client_profile("p")
        except SignerError as exc:
            return exc.code.name, str(exc)
    return "OK", ""


def test_client_side_tls_mistakes_are_unavailable_and_the_log_stays_json(kit, running):
    """The symptoms docs/operations.md "Troubleshooting" lists, each tried for real."""
    address, log = running["signer"].address, running["signer"].log
    ca, app, other = kit["ca"].cert_path.read_bytes(), kit["app"], kit["other"].cert_path.read_bytes()
    cases = {
        "wrong CA for the server": grpc.ssl_channel_credentials(other, app.key, app.cert),
        "no client certificate": grpc.ssl_channel_credentials(ca),
        "plaintext to the TLS port": None,
    }
    other_app = kit["other_app"]
    cases["client certificate from a CA not in client_ca"] = grpc.ssl_channel_credentials(
        ca, other_app.key, other_app.cert
    )
    seen = {name: _symptom(address, credentials) for name, credentials in cases.items()}
    port = address.rsplit(":", 1)[1]
    seen["server certificate without the name dialled"] = _symptom(
        f"localhost:{port}", grpc.ssl_channel_credentials(ca, app.key, app.cert)
    )
    for name, (code, message) in seen.items():
        assert code == "UNAVAILABLE", (name, message)
    assert "CERTIFICATE_VERIFY_FAILED" in seen["wrong CA for the server"][1]
    assert "Socket closed" in seen["no client certificate"][1]
    assert "Socket closed" in seen["plaintext to the TLS port"][1]
    print(json.dumps(seen, indent=2))  # the messages docs/operations.md quotes
    # gRPC core's own lines (the handshake failures above) are JSON lines of logger grpc.core.
    time.sleep(0.5)
    entries = json_lines(log.read_text())
    assert all(AUDIT_TIME.match(entry["time"]) for entry in entries), entries[:3]
    handshakes = [e for e in entries if e["logger"] == "grpc.core" and "Handshake failed" in e["message"]]
    assert len(handshakes) >= 2, entries  # no client certificate; plaintext (WRONG_VERSION_NUMBER)
    assert all(e["source"].startswith("ssl_transport_security") for e in handshakes)


def test_audit_write_failures_are_counted(tmp_path):
    name = "helseid_signer_audit_write_failures_total"
    before = REGISTRY.get_sample_value(name) or 0.0
    audit = AuditLog("/dev/full", fail_closed=False)  # every write: ENOSPC
    try:
        audit.write({"purpose": "test"})
        audit.write({"purpose": "test"})
    finally:
        audit.close()
    assert REGISTRY.get_sample_value(name) == before + 2


def test_check_warns_about_a_small_burst_and_an_unregistered_next_key(kit, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    keys_create(kit["token"], "next", "EC-P256", "ES256")
    config = make_config(
        kit, "warnings",
        extra=("[selfservice]", f'records_dir = "{records}"'),
    )  # fmt: skip
    text = config.read_text().replace(
        "[keys.dpop]",
        '[keys.next]\nuri = "' + kit["token"].uri("next") + '"\nalg = "ES256"\n\n[keys.dpop]',
    )
    text = text.replace(
        "api_base_urls = []\n",
        'api_base_urls = []\n\n[profiles.p.rotation]\nnext_key = "next"\nnext_active_from = 2030-01-01T00:00:00Z\n',
        1,
    )
    config.write_text(text)
    checked = run_cli(kit, "check", "--config", str(config), "--timeout", "1")
    assert checked.returncode == 0, checked.stdout
    warnings = [line for line in checked.stdout.splitlines() if line.startswith("warning: ")]
    assert any(w.startswith("warning: callers.app.rate_burst: 1 cannot cover a first API call") for w in warnings)
    assert not any("callers.local.rate_burst" in w for w in warnings)  # no rate limit: info only
    unregistered = "warning: profiles.p.rotation.next_key: keys.next (kid "
    assert any(w.startswith(unregistered) and "has no registration record" in w for w in warnings), warnings
    # Recorded (as `keys register --manual` does): no warning, an ok line instead.
    registered = run_cli(
        kit, "keys", "register", "--config", str(config), "--profile", "p", "--manual",
        "--expires", "2031-01-01T00:00:00Z",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    again = run_cli(kit, "check", "--config", str(config), "--timeout", "1")
    assert unregistered not in again.stdout
    assert "ok: profiles.p.rotation.next_key: keys.next" in again.stdout


def test_log_time_is_the_audit_time_format():
    import logging

    from helseid_signer.logs import _JsonFormatter

    record = logging.LogRecord("helseid_signer.server", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.created = 1764945642.1234
    entry = json.loads(_JsonFormatter().format(record))
    assert entry == {"time": "2025-12-05T14:40:42.123Z", "level": "info", "logger": "helseid_signer.server",
                     "message": "hello x"}  # fmt: skip
