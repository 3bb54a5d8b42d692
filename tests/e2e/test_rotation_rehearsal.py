"""A rotation rehearsal, end to end: three real ``helseid-signer serve`` replicas sharing one
SoftHSM token store, clients under load (TokenClient + DPoPAuth calling the DEFT stand-in's
``GET /api/objects/{key}/download-status``, a new token for every call), the self-service
stand-in, and the
authorization server (oidc-provider) playing HelseID in two ways:

* ``replace``: the old key is refused the moment the new one is uploaded (what NHN's own
  tools suggest HelseID does);
* ``overlap``: the old key keeps working, and the new one is accepted only ACCEPT_DELAY
  seconds after its upload (HelseID "needs a moment"), so replicas that already switched
  get ``invalid_client`` for the new key.

``helseid-signer keys register`` runs in the middle of the load. Oracles: the load's own
count of failed API calls (must be zero), each replica's own answer (which kid signs),
oidc-provider's refusals (proof that the retry path was really taken, so the zero is not
luck), the replicas' audit records (which key signed each retried assertion, with the kid
it avoided), jwcrypto thumbprints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from jwcrypto import jwk

from demo.deft_api import DeftApi
from helseid_signer_client import DPoPAuth, SignerClient, TokenClient
from tests.support.authserver import running_authserver
from tests.support.selfservice_standin import running_selfservice
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

CLIENT_ID = "rehearsal-client"
DEFT_SCOPE = "nhn:deft/api"
SELFSERVICE_SCOPE = "nhn:selvbetjening/client"
REPLICAS = 3
THREADS = 4
HEALTH_INTERVAL = 1.0  # seconds
SLACK = 2.0  # seconds of scheduling slack on a busy 2-core machine, on top of one interval
ACCEPT_DELAY = 3.0  # overlap mode: seconds after the upload before the new key is accepted
CALLS_BEFORE = 20  # successful API calls before keys register runs
CALLS_AFTER = 40  # successful API calls after every replica switched (and the delay passed)


def _write_kids(path: Path, entries: list[tuple[str, float]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"kids": [{"kid": k, "from": f} for k, f in entries]}))
    tmp.replace(path)


@pytest.fixture(params=["replace", "overlap"])
def world(request, tmp_path):
    mode = request.param
    token = create_token(tmp_path / "token", label="rehearsal")
    jwks = {name: keys_create(token, name, "EC-P256", "ES256") for name in ("cur", "nxt", "dpop")}
    kid = {name: jwk.JWK(**j).thumbprint() for name, j in jwks.items()}
    kids_file = tmp_path / "registered-kids.json"
    _write_kids(kids_file, [(kid["cur"], 0)])
    uploads: list[tuple[str, float]] = []

    def on_upload(key: dict, client_id: str) -> None:  # what HelseID does at the upload
        new = jwk.JWK(**key).thumbprint()
        uploads.append((new, time.time()))
        if mode == "replace":
            _write_kids(kids_file, [(new, 0)])
        else:
            _write_kids(kids_file, [(kid["cur"], 0), (new, time.time() + ACCEPT_DELAY)])

    client = {"client_id": CLIENT_ID, "jwks": {"keys": [jwks["cur"], jwks["nxt"]]},
              "scope": f"{DEFT_SCOPE} {SELFSERVICE_SCOPE}", "registered_kids_file": str(kids_file)}  # fmt: skip
    with running_authserver([client], scopes=(DEFT_SCOPE, SELFSERVICE_SCOPE)) as auth:
        with running_selfservice(auth.issuer, auth.jwks_uri) as standin, DeftApi(auth.issuer) as api:
            standin.on_upload = on_upload
            configs = []
            for i in range(REPLICAS):
                audit = tmp_path / f"audit-{i}.jsonl"
                configs.append(write_config(
                    tmp_path / f"replica-{i}.toml", token, issuer=auth.issuer, client_id=CLIENT_ID,
                    keys={"cur": "ES256", "nxt": "ES256", "dpop": "ES256"}, profiles={"app": ("cur", "dpop")},
                    extra_profile_lines={"app": ["", "[profiles.app.rotation]", 'next_key = "nxt"']},
                    api_base_urls=(api.base_url + "/api",),
                    extra_lines=("[selfservice]", f'url = "{standin.base_url}"', "",
                                 "[audit]", 'sink = "file"', f'path = "{audit}"'),
                    server_lines=('listen = "127.0.0.1:0"', "insecure = true", f"health_interval = {HEALTH_INTERVAL}"),
                ))  # fmt: skip
            # One after the other: processes logging in to one SoftHSM store at the same moment
            # race on its token file (tests/e2e/test_replicas.py).
            procs = []
            try:
                for config in configs:
                    procs.append(start_signer(config, {"SOFTHSM2_CONF": str(token.conf)}))
                yield {"mode": mode, "token": token, "kid": kid, "auth": auth, "api": api, "procs": procs,
                       "configs": configs, "uploads": uploads, "audits": [tmp_path / f"audit-{i}.jsonl"
                                                                        for i in range(REPLICAS)]}  # fmt: skip
            finally:
                for p in procs:
                    p.stop()


class Load:
    """THREADS clients, each: drop its token, then GET an object's download status through DPoPAuth (which
    fetches a new token: a client assertion by whichever replica round_robin picks)."""

    def __init__(self, target: str, api: DeftApi) -> None:
        self.signer = SignerClient(target)
        self.api = api
        self.status_path = f"/api/objects/{api.put_object(b'rehearsal')}/download-status"
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    def _run(self) -> None:
        with TokenClient(self.signer, "app", DEFT_SCOPE) as tokens:
            with httpx.Client(auth=DPoPAuth(tokens), base_url=self.api.base_url, timeout=20) as http:
                while not self.stop.is_set():
                    tokens.invalidate()
                    try:
                        response = http.get(self.status_path)
                        failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
                    except Exception as exc:  # every kind of failure counts
                        failure = f"{type(exc).__name__}: {exc}"
                    with self.lock:
                        if failure is None:
                            self.ok += 1
                        else:
                            self.failures.append(failure)

    def wait_for(self, calls: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        start = self.ok
        while self.ok < start + calls:
            assert time.monotonic() < deadline, f"load stalled: {self.ok - start} calls, failures {self.failures[:3]}"
            time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        self.signer.close()


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_rotation_under_load_has_zero_failed_calls(world):
    kid = world["kid"]
    replicas = [SignerClient(p.address) for p in world["procs"]]
    target = "ipv4:" + ",".join(p.address for p in world["procs"])
    with Load(target, world["api"]) as load:
        load.wait_for(CALLS_BEFORE)
        assert all(r.sign_client_assertion("app").kid == kid["cur"] for r in replicas)

        register = subprocess.run(
            [sys.executable, "-m", "helseid_signer.cli", "keys", "register", "--profile", "app",
             "--config", str(world["configs"][0])],
            env=world["token"].env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        registered = time.monotonic()
        assert register.returncode == 0, register.stderr
        result = json.loads(register.stdout)
        assert result["kid"] == kid["nxt"] and world["uploads"][0][0] == kid["nxt"]
        assert "PKCS#11 token label 'rehearsal'" in result["record"] and kid["nxt"] in result["record"]
        expected = f"within {HEALTH_INTERVAL:g} s (one health interval) on every replica that reads this record"
        assert result["takes_over"] == expected

        # Every replica signs with the new key within one health interval (plus slack).
        switched = [False] * REPLICAS
        while not all(switched):
            for i, r in enumerate(replicas):
                switched[i] = switched[i] or r.sign_client_assertion("app").kid == kid["nxt"]
            assert time.monotonic() - registered < HEALTH_INTERVAL + SLACK, f"replicas switched: {switched}"
            time.sleep(0.05)
        if world["mode"] == "overlap":  # run on past the moment HelseID starts accepting the new key
            time.sleep(max(0.0, world["uploads"][0][1] + ACCEPT_DELAY + 1 - time.time()))
        load.wait_for(CALLS_AFTER)
        ok, failures = load.ok, list(load.failures)

    for r in replicas:
        r.close()
    assert failures == [], failures[:5]
    assert ok >= CALLS_BEFORE + CALLS_AFTER

    # The retry path was really taken: HelseID refused some assertions, and each refused
    # token request got an assertion by the other key (audited with the kid it avoided).
    refused = [e for e in world["auth"].error_log() if e.get("error") == "invalid_client"]
    retried = [r for path in world["audits"] for r in _audit(path) if r.get("avoid_kid")]
    assert refused, "no token request was refused: the rehearsal did not test the switch"
    assert retried and len(retried) >= len(refused)
    refused_kid, other = (kid["cur"], kid["nxt"]) if world["mode"] == "replace" else (kid["nxt"], kid["cur"])
    assert {(r["avoid_kid"], r.get("kid"), r["status"]) for r in retried} == {(refused_kid, other, "OK")}
