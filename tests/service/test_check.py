"""``helseid-signer check --config FILE`` (issue 6, item 6), run as a subprocess on SoftHSM
keys made with ``keys create``, against the local oidc-provider authorization server for
discovery, a closed port for an unreachable issuer, and a small HTTP stub for a server
whose clock is off.

Oracles: the findings are read line by line (``ok|info|warning|error: ...``) and the exit
status; the verifier inside ``check`` is itself tested against signatures made here with
``cryptography`` (a wrong PSS salt, a DER ECDSA signature, a changed payload must fail).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from helseid_signer.check import VerifyError, rfc7638_thumbprint, verify_jws
from tests.support.authserver import running_authserver
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token, import_private_key

CLIENT_ID = "check-client"
JWS_RE = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    """A SoftHSM token with: ``es384`` (P-384), ``ps256`` (RSA 2048), ``es256`` (P-256),
    ``rsa1024`` (imported, too small); and the public JWKs ``keys create`` printed."""
    folder = tmp_path_factory.mktemp("check")
    token = create_token(folder / "token", label="check")
    jwks = {
        "es384": keys_create(token, "es384", "EC-P384", "ES384"),
        "ps256": keys_create(token, "ps256", "RSA-2048", "PS256"),
        "es256": keys_create(token, "es256", "EC-P256", "ES256"),
    }
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    import_private_key(token, small, "rsa1024", "0a0b")
    return {"token": token, "folder": folder, "jwks": jwks}


@pytest.fixture(scope="module")
def authserver(hsm):
    client = {"client_id": CLIENT_ID, "jwks": {"keys": [hsm["jwks"]["es384"]]}, "scope": "nhn:deft/api"}
    with running_authserver([client]) as server:
        yield server


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def profile_lines(name: str, issuer: str, assertion: str, dpop: str, *extra: str) -> list[str]:
    return [
        f"[profiles.{name}]", f'client_id = "{CLIENT_ID}"', f'issuer = "{issuer}"',
        f'assertion_key = "{assertion}"', f'dpop_key = "{dpop}"', *extra, "",
    ]  # fmt: skip


def config(hsm, name: str, *, keys: dict[str, str], issuer: str, extra: list[str] = (), server: str = "") -> Path:
    """A signer TOML with the keys (name -> alg), one profile ``main`` (es384 assertion,
    ps256 DPoP key) at ``issuer``, ``extra`` lines appended and ``server`` lines added."""
    path = write_config(
        hsm["folder"] / f"{name}.toml", hsm["token"], issuer=issuer, client_id=CLIENT_ID,
        keys=keys, profiles={"main": ("es384", "ps256")}, extra_lines=tuple(extra),
    )  # fmt: skip
    if server:
        path.write_text(path.read_text().replace("insecure = true", "insecure = true\n" + server))
    return path


def run_check(hsm, path: Path) -> tuple[int, list[str], str]:
    """Run ``helseid-signer check`` in a subprocess; return (exit status, stdout lines, all output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "check", "--config", str(path), "--timeout", "5"],
        env=hsm["token"].env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    # Never a PIN, a private key or a JWS, whatever the outcome.
    assert hsm["token"].pin not in output
    assert "PRIVATE KEY" not in output and not JWS_RE.search(output), output
    return proc.returncode, proc.stdout.splitlines(), output


def findings(lines: list[str], level: str) -> list[str]:
    return [line.removeprefix(f"{level}: ") for line in lines if line.startswith(f"{level}: ")]


def test_good_config_passes_with_only_the_expected_warning(hsm, authserver):
    path = config(
        hsm, "good", keys={"es384": "ES384", "ps256": "PS256"}, issuer=authserver.issuer,
        extra=["[callers.app]", 'profiles = ["main"]', 'tls_names = ["dns:app.example"]', "rate_limit = 50.0"],
        server='insecure_caller = "app"',
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 0, output
    assert all(re.match(r"(ok|info|warning|error): ", line) for line in lines[:-1]), lines
    assert lines[-1].startswith("check passed:") and "0 error(s)" in lines[-1]
    ok = findings(lines, "ok")
    kid = hsm["jwks"]["es384"]["kid"]  # as keys create printed it
    assert any(line.startswith("keys.es384: EC P-384 fits ES384") and kid in line for line in ok), ok
    assert any(line.startswith("keys.ps256: RSA 2048 bits fits PS256") for line in ok), ok
    signed = "profiles.main: test client assertion signed with keys.es384 and verified (kid " + kid
    assert any(line.startswith(signed) for line in ok), ok
    assert any(line.startswith("profiles.main: test DPoP proof signed with keys.ps256 and verified") for line in ok)
    assert "profiles.main.issuer: equals discovery's issuer" in ok
    assert f"profiles.main.token_endpoint: {authserver.token_endpoint} equals discovery's" in ok
    assert any(line.startswith(f"issuer {authserver.issuer}: clock within") for line in ok), ok
    # The one risky setting: write_config's plaintext development listener.
    warnings = findings(lines, "warning")
    assert len(warnings) == 1 and warnings[0].startswith("server.insecure: 127.0.0.1:0 listens in plaintext"), warnings
    assert findings(lines, "info") == [] and findings(lines, "error") == []


def test_risky_settings_are_warnings_not_errors(hsm, authserver, tmp_path):
    other_issuer = closed_port_url()
    path = config(
        hsm, "risky", keys={"es384": "ES384", "ps256": "PS256", "es256": "ES256", "also_es256": "ES256"},
        issuer=authserver.issuer,
        extra=[
            *profile_lines("shared", authserver.issuer, "es256", "es256", "assertion_lifetime = 45"),
            # the same HSM object under a second name, for another issuer
            *profile_lines("elsewhere", other_issuer, "also_es256", "ps256"),
            "[callers.app]", 'profiles = ["main", "shared"]', 'tls_names = ["dns:app.example"]', "",
            "[callers.local]", 'profiles = ["main"]', "rate_limit = 5.0", "[callers.local.unix_socket]",
            f'path = "{tmp_path / "local.sock"}"', "mode = 0o666", "",
            "[audit]", 'on_failure = "continue"',
        ],
        server='reflection = true\ninsecure_caller = "app"',
    )  # fmt: skip
    path.write_text(
        path.read_text().replace(
            '[keys.also_es256]\nuri = "pkcs11:token=check;object=also_es256"',
            '[keys.also_es256]\nuri = "pkcs11:token=check;object=es256"',
        )
    )
    status, lines, output = run_check(hsm, path)
    assert status == 0, output
    warnings = findings(lines, "warning")
    both = ", ".join(sorted([authserver.issuer, other_issuer]))
    expected = [
        "server.insecure: ",
        "server.reflection: on",
        "callers.local.unix_socket.mode: 0o666 lets other users connect",
        "callers.local.rate_burst: 5 cannot cover a first API call",  # rate_limit 5, default burst 5 < 7
        "audit.on_failure: continue",
        "profiles.shared.assertion_lifetime: 45 s is long",
        "profiles.shared: one key (keys.es256) signs both client assertions and DPoP proofs",
        f"keys.also_es256 = keys.es256: one key signs for 2 issuers ({both})",
        f"keys.ps256: one key signs for 2 issuers ({both})",
        f"issuer {other_issuer}: discovery not reachable",
    ]
    for start in expected:
        assert sum(w.startswith(start) for w in warnings) == 1, (start, warnings)
    assert len(warnings) == len(expected), warnings
    assert findings(lines, "info") == ["callers.app: no rate_limit"]
    assert findings(lines, "error") == []
    assert lines[-1] == f"check passed: {len(findings(lines, 'ok'))} ok, 1 info, {len(expected)} warning(s), 0 error(s)"


def test_rotation_next_key_signs_a_test_assertion_too(hsm, tmp_path):
    issuer = closed_port_url()
    path = config(
        hsm, "rotation", keys={"es384": "ES384", "ps256": "PS256", "es256": "ES256"}, issuer=issuer,
        extra=["[selfservice]", f'records_dir = "{tmp_path}"'],
    )  # fmt: skip
    path.write_text(
        path.read_text().replace(
            "[profiles.main]\n",
            '[profiles.main]\nrotation = { next_key = "es256", next_active_from = 2030-01-01T00:00:00Z }\n',
        )
    )
    status, lines, output = run_check(hsm, path)
    assert status == 0, output
    ok = findings(lines, "ok")
    signed = "profiles.main: test client assertion (rotation.next_key) signed with keys.es256 and verified (kid "
    assert any(line.startswith(signed + hsm["jwks"]["es256"]["kid"]) for line in ok), ok


def test_alg_that_does_not_fit_its_key_is_an_error_naming_the_key(hsm):
    issuer = closed_port_url()
    path = config(
        hsm, "misfit", keys={"es384": "ES256", "ps256": "ES512", "rsa1024": "RS256"}, issuer=issuer,
        extra=profile_lines("small", issuer, "rsa1024", "rsa1024"),
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    errors = findings(lines, "error")
    assert any(e.startswith("keys.es384: EC P-384 does not fit alg ES256") and "P-256" in e for e in errors), errors
    assert any(e.startswith("keys.ps256: RSA 2048 bits does not fit alg ES512") for e in errors), errors
    assert any(e.startswith("keys.rsa1024: RSA 1024 bits does not fit alg RS256") and "2048" in e for e in errors)
    # ... and the profiles that need them sign nothing.
    assert "profiles.main: no test client assertion: keys.es384 is not usable (see above)" in errors
    assert "profiles.small: no test DPoP proof: keys.rsa1024 is not usable (see above)" in errors
    assert lines[-1].startswith("check FAILED:")


def test_missing_key_is_an_error_naming_the_key(hsm):
    path = config(hsm, "missing", keys={"es384": "ES384", "ps256": "PS256"}, issuer=closed_port_url())
    path.write_text(path.read_text().replace("object=ps256", "object=no-such-key"))
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    assert any(e.startswith("keys.ps256: cannot resolve pkcs11:token=check;object=no-such-key") for e in
               findings(lines, "error")), lines  # fmt: skip


def test_token_endpoint_that_differs_from_discovery_is_an_error(hsm, authserver):
    path = config(
        hsm, "endpoint", keys={"es384": "ES384", "ps256": "PS256"}, issuer=authserver.issuer,
        extra=profile_lines("custom", authserver.issuer, "es384", "ps256",
                            f'token_endpoint = "{authserver.issuer}/oauth2/token"'),
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    assert f"profiles.main.token_endpoint: {authserver.token_endpoint} equals discovery's" in findings(lines, "ok")
    assert findings(lines, "error") == [
        f"profiles.custom.token_endpoint: '{authserver.issuer}/oauth2/token' differs from discovery's "
        f"token_endpoint '{authserver.token_endpoint}'"
    ]


def test_issuer_with_trailing_slash_differs_from_discovery(hsm, authserver):
    path = config(hsm, "slash", keys={"es384": "ES384", "ps256": "PS256"}, issuer=authserver.issuer + "/")
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    assert any(e.startswith(f"profiles.main.issuer: '{authserver.issuer}/' differs from discovery's issuer")
               for e in findings(lines, "error")), lines  # fmt: skip


def test_unreachable_issuer_is_a_warning(hsm):
    issuer = closed_port_url()
    path = config(hsm, "unreachable", keys={"es384": "ES384", "ps256": "PS256"}, issuer=issuer)
    started = time.monotonic()
    status, lines, output = run_check(hsm, path)
    assert status == 0, output
    assert any(
        w.startswith(f"issuer {issuer}: discovery not reachable (ConnectError") for w in findings(lines, "warning")
    )
    assert time.monotonic() - started < 60


class _Discovery(BaseHTTPRequestHandler):
    """Serves a discovery document naming itself; ``skew`` shifts its Date header."""

    skew = 0.0
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        body = json.dumps({"issuer": issuer, "token_endpoint": issuer + "/connect/token"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def date_time_string(self, timestamp=None):
        return formatdate(time.time() + self.skew, usegmt=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_issuer():
    def start(skew: float = 0.0, status: int = 200) -> str:
        handler = type("Handler", (_Discovery,), {"skew": skew, "status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_issuer_clock_off_by_a_minute_is_a_warning(hsm, stub_issuer):
    fast, exact = stub_issuer(skew=60), stub_issuer(skew=0)
    path = config(
        hsm, "clock", keys={"es384": "ES384", "ps256": "PS256"}, issuer=fast,
        extra=profile_lines("exact", exact, "es384", "ps256"),
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 0, output
    warnings = findings(lines, "warning")
    assert any(w.startswith(f"issuer {fast}: its clock differs from the local clock by +6") for w in warnings), warnings
    assert any(o.startswith(f"issuer {exact}: clock within") for o in findings(lines, "ok"))
    assert not any(w.startswith(f"issuer {exact}") for w in warnings)


def test_issuer_without_discovery_is_an_error(hsm, stub_issuer):
    issuer = stub_issuer(status=404)
    path = config(hsm, "nodiscovery", keys={"es384": "ES384", "ps256": "PS256"}, issuer=issuer)
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    assert findings(lines, "error") == [
        f"issuer {issuer}: {issuer}/.well-known/openid-configuration answered HTTP 404, not a discovery document"
    ]


def test_invalid_configuration_exits_2_naming_the_key(hsm):
    path = config(
        hsm, "invalid", keys={"es384": "ES384", "ps256": "PS256"}, issuer="https://127.0.0.1:4443",
        extra=profile_lines("long", "https://127.0.0.1:4443", "es384", "ps256", "assertion_lifetime = 90"),
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 2, output
    assert lines[0].startswith("error: configuration: ") and "profiles.long.assertion_lifetime" in lines[0], lines
    assert lines[-1].startswith("check FAILED:")


def test_a_socket_directory_others_can_write_is_an_error(hsm, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    path = config(
        hsm, "sockdir", keys={"es384": "ES384", "ps256": "PS256"}, issuer=closed_port_url(),
        extra=["[callers.local]", 'profiles = ["main"]', f'unix_socket = {{ path = "{folder / "s.sock"}" }}'],
        server='insecure_caller = "local"',
    )  # fmt: skip
    status, lines, output = run_check(hsm, path)
    assert status == 1, output
    errors = findings(lines, "error")
    assert any(e.startswith("callers.local.unix_socket.path: its directory") and "not sticky" in e for e in errors)


@pytest.mark.parametrize(
    ("server", "issuer", "key"),
    [
        ('listen = "0.0.0.0:0"\ninsecure = true', "http://127.0.0.1:9", "server.listen"),
        ('listen = "127.0.0.1:0"\ninsecure = true\ntls_certificate = "s.pem"', "http://127.0.0.1:9",
         "server.tls_certificate"),
        ('listen = "127.0.0.1:0"\ninsecure = true', "https://helseid-sts.nhn.no", "profiles.main.issuer"),
    ],
)  # fmt: skip
def test_insecure_outside_development_exits_2_naming_the_key(hsm, server, issuer, key):
    path = config(hsm, "insecure", keys={"es384": "ES384", "ps256": "PS256"}, issuer=issuer)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"\ninsecure = true', server))
    status, lines, output = run_check(hsm, path)
    assert status == 2, output
    assert lines[0].startswith("error: configuration: ") and f"{key}: " in lines[0], lines


# ---------------------------------------------------------------- the verifier inside check


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(alg: str, sign) -> str:
    data = f"{_b64(json.dumps({'alg': alg}).encode())}.{_b64(b'{}')}"
    return f"{data}.{_b64(sign(data.encode()))}"


def test_verifier_accepts_good_and_refuses_wrong_signatures():
    """Negative controls: the check's own verifier is not vacuous."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    good = _token("PS256", lambda d: rsa_key.sign(d, pss, hashes.SHA256()))
    assert verify_jws(good, rsa_key.public_key())[0] == {"alg": "PS256"}
    max_salt = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    with pytest.raises(VerifyError, match="does not verify"):
        verify_jws(_token("PS256", lambda d: rsa_key.sign(d, max_salt, hashes.SHA256())), rsa_key.public_key())
    with pytest.raises(VerifyError, match="does not verify"):  # PKCS#1 v1.5 under a PS256 header
        verify_jws(
            _token("PS256", lambda d: rsa_key.sign(d, padding.PKCS1v15(), hashes.SHA256())), rsa_key.public_key()
        )
    header, payload, signature = good.split(".")
    with pytest.raises(VerifyError, match="does not verify"):
        verify_jws(".".join([header, _b64(b'{"a":1}'), signature]), rsa_key.public_key())
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerifyError, match="not R || S"):  # DER, as KMS returns it
        verify_jws(_token("ES256", lambda d: ec_key.sign(d, ec.ECDSA(hashes.SHA256()))), ec_key.public_key())
    with pytest.raises(VerifyError, match="not one HelseID accepts"):
        verify_jws(_token("HS256", lambda d: b"x"), ec_key.public_key())


def test_thumbprint_matches_rfc7638_example():
    """RFC 7638 section 3.1's example key and thumbprint."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajr"
        "n1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    e = int.from_bytes(base64.urlsafe_b64decode("AQAB"), "big")
    key = rsa.RSAPublicNumbers(e, int.from_bytes(base64.urlsafe_b64decode(n + "=="), "big")).public_key()
    assert rfc7638_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
