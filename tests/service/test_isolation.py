"""One application cannot hurt the others (issue 13, availability): a real
``helseid-signer serve`` on SoftHSM with mTLS callers (certificates made at set-up), a
victim caller, a flooding caller, a trusted but unlisted certificate, and a Unix-socket
probe caller (no profiles) that reads health.

What must hold, whatever the neighbours do: the victim's calls succeed (or, while the key
store hangs, fail with UNAVAILABLE so that a client fails over - never DEADLINE_EXCEEDED);
unlisted peers hold no streams; refusals leave a bounded audit trail that still verifies;
health turns NOT_SERVING while the key store hangs, and reload and SIGTERM still finish;
idle connections to the metrics port hold neither threads nor descriptors. No timings are
asserted.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwcrypto import jwk

from helseid_signer_client import SignerClient, SignerError
from tests.support.health import NOT_SERVING, SERVING, health, wait_health
from tests.support.jose_verify import verified_claims
from tests.support.pki import CertificateAuthority
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://helseid-sts.test.nhn.no"
FLOOD_RATE = 50  # requests/s the flooding caller is allowed


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("isolation")
    token = create_token(folder / "token", label="isolation")
    keys = {name: jwk.JWK(**keys_create(token, name, "EC-P256", "ES256")) for name in ("ka", "kb")}
    ca = CertificateAuthority(folder / "pki", "signer-clients")
    certs = {
        "server": ca.issue("server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        "victim": ca.issue("victim", dns=("victim.vendor.test",)),
        "flooder": ca.issue("flooder", dns=("flooder.vendor.test",)),
        "unlisted": ca.issue("unlisted", dns=("stranger.vendor.test",)),  # trusted CA, no caller
    }
    return {"folder": folder, "token": token, "keys": keys, "ca": ca, "certs": certs}


def _config(kit, name: str, *extra: str) -> tuple[Path, Path, Path]:
    """A signer configuration in its own folder: (config, audit file, probe socket)."""
    folder = kit["folder"] / name
    folder.mkdir()
    audit, probe = folder / "audit.jsonl", folder / "probe.sock"
    certs = kit["certs"]
    config = write_config(
        folder / "signer.toml", kit["token"], issuer=ISSUER, client_id="isolation",
        keys={"ka": "ES256", "kb": "ES256"}, profiles={"a": ("ka", "ka"), "b": ("kb", "kb")},
        api_base_urls=("https://api.example.no",),
        server_lines=(
            'listen = "127.0.0.1:0"',
            f'tls_certificate = "{certs["server"].cert_path}"',
            f'tls_private_key = "{certs["server"].key_path}"',
            f'client_ca = "{kit["ca"].cert_path}"',
            "health_interval = 0.5",
        ),
        extra_lines=(
            "[audit]", 'sink = "file"', f'path = "{audit}"', "",
            "[callers.victim]", 'tls_names = ["dns:victim.vendor.test"]', 'profiles = ["a"]', "",
            "[callers.flooder]", 'tls_names = ["dns:flooder.vendor.test"]', 'profiles = ["b"]',
            f"rate_limit = {FLOOD_RATE}", "rate_burst = 5", "",
            "[callers.probe]", "profiles = []", f'unix_socket = {{ path = "{probe}", mode = 0o600 }}', "",
            *extra,
        ),
    )  # fmt: skip
    return config, audit, probe


@contextmanager
def _signer(kit, config: Path):
    signer = start_signer(config, env={"SOFTHSM2_CONF": str(kit["token"].conf)})
    try:
        yield signer
    finally:
        signer.stop()


def _channel(kit, signer, who: str) -> grpc.Channel:
    cert = kit["certs"][who]
    credentials = grpc.ssl_channel_credentials(kit["ca"].cert_path.read_bytes(), cert.key, cert.cert)
    # No client-side retries, and a channel of its own: each test sees the service's own answer.
    return grpc.secure_channel(signer.address, credentials, options=[("grpc.enable_retries", 0)])


def _client(kit, signer, who: str, timeout: float = 10.0) -> SignerClient:
    return SignerClient(channel=_channel(kit, signer, who), timeout=timeout)


def _code(call) -> str:
    try:
        call()
        return "OK"
    except SignerError as exc:
        return exc.code.name


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- 1. health streams and per-caller concurrency -----------------------------------------


def test_an_unlisted_certificate_cannot_hold_health_watch_streams(kit):
    """Issue 13 point 1: a trusted but unlisted certificate filled the server with
    Health.Watch streams and every caller got RESOURCE_EXHAUSTED. Watch is now for
    configured callers only, and capped per caller; Check stays open to any peer."""
    config, _, probe = _config(kit, "watch")
    with _signer(kit, config) as signer, ExitStack() as stack:
        request = health_pb2.HealthCheckRequest()
        stranger = stack.enter_context(_channel(kit, signer, "unlisted"))
        stranger_health = health_pb2_grpc.HealthStub(stranger)
        codes = []
        for _ in range(50):
            stream = stranger_health.Watch(request, timeout=10)
            stack.callback(stream.cancel)
            try:
                codes.append(next(stream).status)
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes == ["UNAUTHENTICATED"] * 50
        assert stranger_health.Check(request, timeout=5).status == SERVING  # Check: any peer

        victim_channel = stack.enter_context(_channel(kit, signer, "victim"))
        victim_health = health_pb2_grpc.HealthStub(victim_channel)
        streams = [victim_health.Watch(request, timeout=10) for _ in range(4)]
        for stream in streams:
            stack.callback(stream.cancel)
        assert [next(s).status for s in streams] == [SERVING] * 4
        with pytest.raises(grpc.RpcError) as caught:
            next(victim_health.Watch(request, timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with _client(kit, signer, "victim") as victim:
            for _ in range(10):
                answer = victim.sign_client_assertion("a")
                assert verified_claims(answer.jwt, kit["keys"]["ka"])["sub"] == "isolation"
        assert health(f"unix:{probe}") == SERVING


# -- 2. refusals are bounded -----------------------------------------------------------


def test_a_flood_of_refusals_leaves_a_bounded_audit_trail_and_the_victim_signs(kit):
    """Issue 13 point 2: each refused request wrote its own audit record (a caller limited to
    50/s filled a 1 MiB volume in about 2 s). Now refusals are counted: the first of each kind
    has its record, the rest one ``repeated`` record with their count - and the counts add up
    to exactly what the callers were refused. Every signature keeps its own record."""
    config, audit, _ = _config(kit, "flood")
    refused: dict[str, int] = {}
    lock = threading.Lock()
    with _signer(kit, config) as signer:
        with (
            _client(kit, signer, "flooder") as flooder,
            _client(kit, signer, "unlisted") as stranger,
            _client(kit, signer, "victim") as victim,
        ):

            def flood(n: int) -> None:
                for i in range(n):
                    who, call = [
                        (flooder, lambda: flooder.get_client_profile("b")),  # over its rate
                        (flooder, lambda: flooder.sign_client_assertion("a")),  # not its profile
                        (stranger, lambda: stranger.sign_client_assertion("a")),  # no caller
                    ][i % 3]
                    code = _code(call)
                    if code != "OK":
                        with lock:
                            refused[code] = refused.get(code, 0) + 1

            with ThreadPoolExecutor(4) as pool:
                floods = [pool.submit(flood, 400) for _ in range(3)]
                signed = [victim.sign_client_assertion("a") for _ in range(20)]
                for f in floods:
                    f.result()
        for answer in signed:
            verified_claims(answer.jwt, kit["keys"]["ka"])
        signer.stop()  # the counts of the last interval are written at stop
    total_refused = sum(refused.values())
    assert total_refused > 1000
    assert set(refused) == {"RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"}
    records = _audit(audit)
    single = [r for r in records if r["outcome"] == "refused"]
    repeated = [r for r in records if r["outcome"] == "repeated"]
    assert len(single) + sum(r["count"] for r in repeated) == total_refused  # each refusal, counted once
    # Four kinds (caller, purpose, status, message), each a first record and a count per
    # interval (10 s): a handful of records for over a thousand refusals.
    assert len(single) + len(repeated) <= 24, len(single) + len(repeated)
    assert {r["caller"] for r in repeated} <= {"flooder", None}
    assert all(r["count"] > 0 and r["first_time"] and r["last_time"] for r in repeated)
    jtis = {r.get("jti") for r in records if r["outcome"] == "signed"}
    assert {a.jti for a in signed} <= jtis  # every signature has its own record
    verify = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "audit", "verify", str(audit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout


# -- 3. a hung key store ---------------------------------------------------------------


@contextmanager
def _token_store_locked(token):
    """Hold POSIX locks on the token store's files, as another process writing the store
    would: SoftHSM's next access waits for them (its C_Sign blocks)."""
    store = Path(token.conf).parent / "tokens"
    files = [open(p, "r+b") for p in sorted(store.glob("*/*.object")) + sorted(store.glob("*/generation"))]
    try:
        for f in files:
            fcntl.lockf(f, fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            fcntl.lockf(f, fcntl.LOCK_UN)
            f.close()


def _wait_log(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged: {path.read_text()[-1500:]}"
        time.sleep(0.1)


def test_a_hung_key_store_turns_health_not_serving_and_answers_unavailable(kit):
    """Issue 13 point 3 (and point 1's per-caller limit): while SoftHSM waits for a file lock
    another process holds on its token store, requests get UNAVAILABLE before their deadline
    (clients fail over), one caller cannot have more than ``max_in_flight`` requests waiting,
    another caller's requests that need no signature are still answered, health turns
    NOT_SERVING, a reload is refused, and SIGTERM ends the process."""
    config, _, probe = _config(kit, "hung")
    signer = start_signer(config, env={"SOFTHSM2_CONF": str(kit["token"].conf)})
    try:
        with _token_store_locked(kit["token"]):
            with _client(kit, signer, "victim") as victim, _client(kit, signer, "flooder") as flooder:
                with ThreadPoolExecutor(40) as pool:
                    # The flooder's rate allows a burst of 5; these 40 come at once and 5 are admitted.
                    waiting = [pool.submit(_code, lambda: flooder.sign_client_assertion("b")) for _ in range(40)]
                    time.sleep(0.5)
                    assert victim.get_client_profile("a").client_id == "isolation"  # no signature needed
                    codes = [f.result() for f in waiting]
                assert "DEADLINE_EXCEEDED" not in codes and codes.count("UNAVAILABLE") >= 1
                assert set(codes) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
                wait_health(f"unix:{probe}", NOT_SERVING, timeout=20)
                wait_health(f"unix:{probe}", NOT_SERVING, "backend:pkcs11", timeout=5)
                with pytest.raises(SignerError) as caught:
                    victim.sign_client_assertion("a")  # deadline 10 s
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            signer.signal(signal.SIGHUP)
            _wait_log(signer.log, "reload refused")
            signer.signal(signal.SIGTERM)
            assert signer.wait(timeout=30) == 0  # while the key store still hangs
    finally:
        signer.stop()


def test_max_in_flight_limits_one_caller(kit):
    """Issue 13 point 1: one caller may not hold all of a worker's capacity - beyond its
    ``max_in_flight`` (here 2) its requests get RESOURCE_EXHAUSTED at once, while they wait on
    a key store that hangs; the victim's requests are admitted."""
    config, _, _ = _config(kit, "in-flight")
    text = config.read_text().replace("rate_burst = 5", "rate_burst = 5\nmax_in_flight = 2")
    config.write_text(text)
    with _signer(kit, config) as signer, _token_store_locked(kit["token"]):
        with _client(kit, signer, "victim") as victim, _client(kit, signer, "flooder") as flooder:
            with ThreadPoolExecutor(5) as pool:
                waiting = [pool.submit(_code, lambda: flooder.sign_client_assertion("b")) for _ in range(5)]
                time.sleep(0.5)
                assert victim.get_client_profile("a").client_id == "isolation"
                codes = [f.result() for f in waiting]
    assert sorted(codes) == ["RESOURCE_EXHAUSTED"] * 3 + ["UNAVAILABLE"] * 2


# -- 4. the metrics port -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_idle_metrics_connections_hold_no_descriptors_and_signing_goes_on(kit):
    """Issue 13 point 4: prometheus-client's server took a thread and a descriptor per
    connection, without timeout; about 1,000 idle connections exhausted the process. Now at
    most a few are served at once; the rest are closed as they are accepted."""
    port = _free_port()
    config, _, _ = _config(kit, "metrics", "[metrics]", f'listen = "127.0.0.1:{port}"')
    with _signer(kit, config) as signer:
        fds = lambda: len(os.listdir(f"/proc/{signer.pid}/fd"))  # noqa: E731
        before = fds()
        idle = []
        try:
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(1.0)
            held = fds() - before
            with _client(kit, signer, "victim") as victim:
                assert all(victim.sign_client_assertion("a").jwt for _ in range(5))
        finally:
            for s in idle:
                s.close()
        assert held < 50, f"{held} descriptors held by 300 idle metrics connections"
        deadline = time.monotonic() + 30
        while True:  # the few connections being served are closed after their timeout
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert "helseid_signer_requests_total" in body


def test_connections_cannot_use_up_the_descriptors_the_key_store_needs(kit):
    """Issue 13 points 1 and 4: peers that hold connections (each a descriptor) made the
    process run out of descriptors - then SoftHSM and the audit file failed for everyone.
    The TCP listener now accepts connections only up to the descriptor limit less a reserve
    (``server.connection_cap``); beyond it new connections are closed, and a caller already
    connected keeps signing."""
    config, _, _ = _config(kit, "connections")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))  # inherited by the signer
    try:
        signer = start_signer(config, env={"SOFTHSM2_CONF": str(kit["token"].conf)})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    idle = []
    try:
        with _client(kit, signer, "victim") as victim:
            victim.sign_client_assertion("a")  # connected before the flood of connections
            host, port = signer.address.rsplit(":", 1)
            for _ in range(600):  # more than the signer's 400 descriptors
                idle.append(socket.create_connection((host, int(port)), timeout=5))
            time.sleep(1.0)
            for _ in range(5):
                answer = victim.sign_client_assertion("a")
                assert verified_claims(answer.jwt, kit["keys"]["ka"])["sub"] == "isolation"
            assert len(os.listdir(f"/proc/{signer.pid}/fd")) < 400
    finally:
        for s in idle:
            s.close()
        signer.stop()


def test_metrics_listen_defaults_to_loopback_and_check_warns_otherwise(kit, tmp_path):
    from helseid_signer.config import load_settings

    config, _, _ = _config(kit, "metrics-default", "[metrics]")
    assert load_settings(str(config)).metrics.listen == "127.0.0.1:9464"
    config.write_text(config.read_text().replace("[metrics]", '[metrics]\nlisten = "0.0.0.0:9464"'))
    proc = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=kit["token"].env(),
    )  # fmt: skip
    assert "warning: metrics.listen: 0.0.0.0:9464 is not loopback" in proc.stdout, proc.stdout
