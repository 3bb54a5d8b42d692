"""The Prometheus endpoint of a real signer process, read with prometheus-client's own
text parser: counts per profile/purpose/alg/backend/status, backend health, sessions,
and the aggregate over several worker processes."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helseid_signer_client import SignerClient, SignerError
from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def token_and_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics")
    token = create_token(folder / "token", label="metrics")
    keys_create(token, "k", "EC-P256", "ES256")
    return folder, token


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_requests_by_outcome(token_and_keys, workers):
    folder, token = token_and_keys
    port = _free_port()
    config = write_config(
        folder / f"signer-{workers}.toml", token, issuer=ISSUER, client_id="m", keys={"k": "ES256"},
        profiles={"p": ("k", "k")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", f"workers = {workers}", "health_interval = 0.2"),
        extra_lines=("[metrics]", f'listen = "127.0.0.1:{port}"'),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        with SignerClient(address) as client:
            for _ in range(20):
                client.sign_client_assertion("p")
            for _ in range(7):
                client.sign_dpop_proof("p", "POST", ISSUER + "/connect/token")
            for profile in ("nope", "x" * 40):
                with pytest.raises(SignerError):
                    client.get_client_profile(profile)
            with pytest.raises(SignerError):
                client.sign_dpop_proof("p", "post", ISSUER + "/connect/token")
        time.sleep(0.5)  # health loop sets the gauges
        samples = _samples(url)
    common = {"profile": "p", "alg": "ES256", "backend": "pkcs11", "status": "OK"}
    assert _value(samples, "helseid_signer_requests_total", purpose="client_assertion", **common) == 20
    assert _value(samples, "helseid_signer_requests_total", purpose="dpop_proof", **common) == 7
    # Unknown profiles never become label values.
    denied = {"profile": "-", "purpose": "client_profile", "alg": "", "backend": "", "status": "PERMISSION_DENIED"}
    assert _value(samples, "helseid_signer_requests_total", **denied) == 2
    bad = {"profile": "p", "purpose": "dpop_proof", "alg": "", "backend": "", "status": "INVALID_ARGUMENT"}
    assert _value(samples, "helseid_signer_requests_total", **bad) == 1
    assert not any("nope" in str(key) for key in samples)
    assert _value(samples, "helseid_signer_request_duration_seconds_count", purpose="client_assertion") == 20
    assert _value(samples, "helseid_signer_backend_sign_duration_seconds_count", backend="pkcs11", alg="ES256") >= 27
    assert _value(samples, "helseid_signer_backend_up", backend="pkcs11") == 1
    sessions = [v for (name, _), v in samples.items() if name == "helseid_signer_pkcs11_sessions"]
    assert sessions and sum(sessions) == workers  # one logged-in session per token per worker


def test_metrics_listen_must_be_host_port(token_and_keys):
    from helseid_signer.config import ConfigError, load_settings

    folder, token = token_and_keys
    config = write_config(
        folder / "bad.toml", token, issuer=ISSUER, client_id="m", keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        extra_lines=("[metrics]", 'listen = "9464"'),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="metrics.listen"):
        load_settings(config)
