"""Deployment files (deploy/), checked offline: hadolint lints the Containerfile,
kubernetes-validate checks every Kubernetes manifest against the API schemas (strict: an
unknown field is an error), systemd-analyze verifies the systemd unit, and our own
assertions check what the schemas cannot: hardening of every container, probes, replica
counts, the PodDisruptionBudget, the NetworkPolicy, and that the pieces fit each other
(ports, volumes, paths). The ConfigMap's signer.toml is loaded with the product's own
loader and then run: a real signer started from it (SoftHSM standing in for the HSM,
certificates made at set-up) answers the probe script and signs for its application over
mTLS, verified with jwcrypto.

No container engine exists on these machines: the image itself is never built here.
Each tool gets a negative control (a file it must reject), so a silent tool cannot pass.
"""

from __future__ import annotations

import configparser
import grp
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from jwcrypto import jwk, jws

from helseid_signer.config import load_settings
from helseid_signer_client import SignerClient, SignerError
from tests.support.pki import CertificateAuthority
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create
from tests.support.softhsm import create_token

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
HEALTHCHECK = DEPLOY / "container" / "healthcheck.py"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "helseid-signer.service"
TEMPLATE = DEPLOY / "systemd" / "signer.toml"
LOGROTATE = DEPLOY / "systemd" / "helseid-signer.logrotate"
OPERATIONS = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent
#: The oldest Kubernetes the manifests are for (preStop sleep is on by default from 1.30), and the newest known.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def _resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_resources() -> dict[tuple[str, str], dict]:
    """Every resource of kustomization.yaml, by (kind, name)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in _resources(K8S / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _deployment() -> dict:
    return _all_resources()[("Deployment", "helseid-signer")]


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _signer_toml() -> str:
    return _all_resources()[("ConfigMap", "helseid-signer-config")]["data"]["signer.toml"]


# --- Containerfile -------------------------------------------------------------------


def _hadolint(path: Path) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "hadolint"), "--no-fail", "--failure-threshold", "style", "--format", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True, cwd=path.parent,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_containerfile_passes_hadolint_at_its_strictest(tmp_path):
    assert _hadolint(CONTAINERFILE) == []
    # Negative control: hadolint does read and judge a file.
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN cd /src && pip install helseid-signer\n")
    assert {"DL3007", "DL3002", "DL3003", "DL3013", "DL3042"} <= {f["code"] for f in _hadolint(bad)}


def test_containerfile_runs_as_a_numeric_non_root_user_without_a_shell():
    lines = [line.strip() for line in CONTAINERFILE.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    final = lines[stages[-1] :]
    assert len(stages) == 2 and " AS " not in final[0]  # the final stage is the run-time image
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    uid, _, gid = user[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    for instruction in ("ENTRYPOINT", "CMD"):  # exec form: no shell starts the service
        (line,) = [x for x in final if x.startswith(instruction + " ")]
        assert isinstance(json.loads(line.split(" ", 1)[1]), list)
    assert not any(line.startswith("SHELL") for line in lines)
    assert any("PYTHONDONTWRITEBYTECODE=1" in line for line in final)  # nothing written at run time
    assert any("COPY --from=build" in line for line in final)
    assert "requirements/constraints.txt" in CONTAINERFILE.read_text()  # every package pinned
    assert "UNBUILT HERE" in CONTAINERFILE.read_text()


# --- Kubernetes manifests ------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas_strictly(version):
    paths = sorted(K8S.glob("*.yaml"))
    checked = 0
    for path in paths:
        for resource in _resources(path):
            if resource["kind"] == "Kustomization":
                continue  # not a Kubernetes API object; its list is checked below
            kubernetes_validate.validate(resource, version, strict=True)
            checked += 1
    assert checked >= 10
    # Negative controls: a misspelt field, and a wrong type, are errors.
    deployment = _deployment()
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    deployment = _deployment()
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_examples():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == present
    assert not any(doc["kind"] == "Secret" for name in listed for doc in _resources(K8S / name))


def test_every_container_is_hardened_and_bounded():
    pod = _deployment()["spec"]["template"]["spec"]
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for container in _containers(pod):
        sc = container["securityContext"]
        assert sc.get("runAsNonRoot", pod_security["runAsNonRoot"]) is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc.get("seccompProfile", pod_security["seccompProfile"])["type"] == "RuntimeDefault"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound])
    assert not any("hostPath" in v for v in pod["volumes"])


def test_probes_call_the_health_service_through_the_probe_script():
    (signer,) = _deployment()["spec"]["template"]["spec"]["containers"]
    assert "COPY deploy/container/healthcheck.py /opt/helseid-signer/healthcheck.py" in CONTAINERFILE.read_text()
    commands = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = signer[probe]["exec"]["command"]
        assert command[:2] == ["/opt/helseid-signer/bin/python", "/opt/helseid-signer/healthcheck.py"]
        commands[probe] = command[2:]
    # Ready only when SERVING; alive whenever the process answers (a backend that cannot
    # sign recovers without a restart).
    assert commands == {"startupProbe": ["--alive"], "readinessProbe": [], "livenessProbe": ["--alive"]}
    assert signer["readinessProbe"]["failureThreshold"] == 1


def test_replicas_disruption_budget_and_headless_service_fit_together():
    resources = _all_resources()
    deployment = resources[("Deployment", "helseid-signer")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = resources[("PodDisruptionBudget", "helseid-signer")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < replicas  # < replicas, or no node could ever be drained
    service = resources[("Service", "helseid-signer")]
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance over every replica
    assert service["spec"]["selector"].items() <= labels.items()
    (signer,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in signer["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"] and "grpc" in ports
    settings = tomllib.loads(_signer_toml())
    for name, listen in (("grpc", settings["server"]["listen"]), ("metrics", settings["metrics"]["listen"])):
        host, _, port = listen.rpartition(":")
        assert int(port) == ports[name] and host == "0.0.0.0"
    spec = deployment["spec"]["template"]["spec"]
    stop_budget = signer["lifecycle"]["preStop"]["sleep"]["seconds"] + 2 + 5  # preStop + settle + grace
    assert spec["terminationGracePeriodSeconds"] > stop_budget


def test_network_policy_admits_only_application_namespaces_and_monitoring():
    resources = _all_resources()
    policy = resources[("NetworkPolicy", "helseid-signer")]["spec"]
    labels = resources[("Deployment", "helseid-signer")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]
    rules = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports")  # no rule open to every source or port
        for source in rule["from"]:
            assert set(source) == {"namespaceSelector"} and source["namespaceSelector"]["matchLabels"]
        for port in rule["ports"]:
            rules[port["port"]] = [s["namespaceSelector"]["matchLabels"] for s in rule["from"]]
    assert rules == {
        "grpc": [{"helseid-signer.nhn.no/client": "true"}],
        "metrics": [{"kubernetes.io/metadata.name": "monitoring"}],
    }


def test_secrets_and_config_are_mounted_read_only_where_signer_toml_expects_them():
    pod = _deployment()["spec"]["template"]["spec"]
    (signer,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in signer["volumeMounts"]}
    assert {m["name"] for m in signer["volumeMounts"]} == set(volumes)
    config_path = Path(signer["args"][signer["args"].index("--config") + 1])
    assert volumes[mounts[str(config_path.parent)]["name"]]["configMap"]["name"] == "helseid-signer-config"
    settings = tomllib.loads(_signer_toml())
    examples = {doc["metadata"]["name"]: doc for doc in _resources(K8S / "secrets.example.yaml")}
    secret_files = [
        settings["backends"]["pkcs11"]["pin_file"],
        *(settings["server"][k] for k in ("tls_certificate", "tls_private_key", "client_ca")),
    ]
    for file in map(Path, secret_files):
        mount = mounts[str(file.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["defaultMode"] in (0o400, 0o444)
        assert file.name in examples[secret["secretName"]]["stringData"]  # the key the file is made from
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert all("emptyDir" in volumes[mounts[path]["name"]] for path in writable)
    probe_socket = Path(settings["callers"]["probe"]["unix_socket"]["path"])
    assert str(probe_socket.parent) in writable and settings["callers"]["probe"]["profiles"] == []


# --- The ConfigMap's signer.toml, loaded and run --------------------------------------


def _local_copy(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(f'"{old}"') >= 1, old
        text = text.replace(f'"{old}"', f'"{new}"')
    return text


def test_configmap_signer_toml_loads_with_the_product_loader(tmp_path):
    text = _signer_toml()
    settings = tomllib.loads(text)
    files = {
        settings["backends"]["pkcs11"]["pin_file"]: "pin",
        settings["server"]["tls_certificate"]: "tls.crt",
        settings["server"]["tls_private_key"]: "tls.key",
        settings["server"]["client_ca"]: "ca.crt",
    }
    for name in files.values():
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "signer.toml"
    path.write_text(_local_copy(text, {old: str(tmp_path / new) for old, new in files.items()}))
    loaded = load_settings(path)
    assert loaded.server.workers == 1 and not loaded.server.insecure
    assert loaded.backends.pkcs11.pin_file == str(tmp_path / "pin")
    assert loaded.callers["probe"].profiles == () and loaded.callers["probe"].unix_socket.mode == 0o600
    for key in loaded.keys.values():
        assert key.issuers == (loaded.profiles["deft"].issuer,)  # keys bound to their issuer


@pytest.fixture(scope="module")
def configmap_signer(tmp_path_factory):
    """A signer run from the ConfigMap's signer.toml, with only file paths and the listen
    port changed: SoftHSM with the keys it names, certificates from a throwaway CA."""
    folder = tmp_path_factory.mktemp("configmap")
    text = _signer_toml()
    settings = tomllib.loads(text)
    label = re.search(r"token=([^;]+)", settings["keys"]["deft-assertion"]["uri"]).group(1)
    token = create_token(folder / "token", label=label)
    public = {}
    for name, key in settings["keys"].items():
        spec = {"PS256": "RSA-2048", "ES256": "EC-P256"}[key["alg"]]
        public[name] = jwk.JWK(**keys_create(token, name, spec, key["alg"]))
    ca = CertificateAuthority(folder / "pki", "apps")
    service_name = "helseid-signer.helseid-signer.svc.cluster.local"  # what clients check (service.yaml)
    server = ca.issue("server", dns=(service_name,), ips=("127.0.0.1",), server=True)
    app_a = ca.issue("app-a", uris=tuple(n.removeprefix("uri:") for n in settings["callers"]["app-a"]["tls_names"]))
    socket = folder / "probe.sock"
    config = folder / "signer.toml"
    config.write_text(
        _local_copy(
            text,
            {
                settings["server"]["listen"]: "127.0.0.1:0",
                settings["metrics"]["listen"]: "127.0.0.1:0",
                settings["server"]["tls_certificate"]: str(server.cert_path),
                settings["server"]["tls_private_key"]: str(server.key_path),
                settings["server"]["client_ca"]: str(ca.cert_path),
                settings["backends"]["pkcs11"]["module"]: token.module,
                settings["backends"]["pkcs11"]["pin_file"]: str(token.pin_file),
                settings["callers"]["probe"]["unix_socket"]["path"]: str(socket),
            },
        )
    )
    signer = start_signer(config, {"SOFTHSM2_CONF": str(token.conf)}, timeout=60)
    try:
        yield {"signer": signer, "socket": socket, "ca": ca, "app_a": app_a, "public": public, "settings": settings}
    finally:
        signer.stop()


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_probe_script_reports_serving_and_alive_on_the_probe_socket(configmap_signer):
    target = f"unix:{configmap_signer['socket']}"
    ready, alive = _probe(target), _probe("--alive", target)
    assert (ready.returncode, ready.stdout.strip()) == (0, f"{target} (overall): SERVING")
    assert alive.returncode == 0
    unknown = _probe("--service", "no-such-service", target)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    nobody = _probe("--alive", "--timeout", "1", f"unix:{configmap_signer['socket']}.absent")
    assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr


def test_signer_from_the_configmap_signs_for_its_application_over_mtls(configmap_signer):
    app_a, ca = configmap_signer["app_a"], configmap_signer["ca"]
    credentials = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), app_a.key, app_a.cert)
    options = [("grpc.ssl_target_name_override", "helseid-signer.helseid-signer.svc.cluster.local")]
    with SignerClient(configmap_signer["signer"].address, credentials=credentials, options=options) as client:
        assertion = client.sign_client_assertion("deft")
    obj = jws.JWS()
    obj.deserialize(assertion.jwt, key=configmap_signer["public"]["deft-assertion"])
    claims = json.loads(obj.payload)
    assert claims["aud"] == configmap_signer["settings"]["profiles"]["deft"]["issuer"]
    # The probe socket's caller may use no profile.
    with SignerClient(f"unix:{configmap_signer['socket']}") as probe, pytest.raises(SignerError) as caught:
        probe.sign_client_assertion("deft")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


# --- systemd ---------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(key + "=") and not line.startswith("#")
    ]


def _verify(unit: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: apt-get install systemd (it need not run as init)"
    return subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_cleanly(tmp_path):
    # ExecStart must name an existing program for verify: the installed command of this venv.
    text = UNIT.read_text().replace("/opt/helseid-signer/bin/helseid-signer", str(BIN / "helseid-signer"))
    unit = tmp_path / "helseid-signer.service"
    unit.write_text(text)
    result = _verify(unit)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr
    # Negative control: an unknown directive is reported.
    unit.write_text(text.replace("[Service]\n", "[Service]\nProtectEverything=yes\n"))
    assert "ProtectEverything" in _verify(unit).stderr


def test_systemd_unit_is_hardened_and_stops_by_draining():
    service = _unit()["Service"]
    assert service["DynamicUser"] == "yes" or service.get("User") not in (None, "root")
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "RestrictNamespaces": "yes", "CapabilityBoundingSet": "", "KillMode": "mixed", "KillSignal": "SIGTERM",
        "RuntimeDirectory": "helseid-signer", "UMask": "0077",
    }  # fmt: skip
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["TimeoutStopSec"]) > 2 + 5  # settle + grace
    assert set(_unit_values("RestrictAddressFamilies")[0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    credentials = {v.split(":", 1)[0] for v in _unit_values("LoadCredential")}
    assert credentials == {"pin", "tls.key", "tls.crt", "client-ca.crt"}
    assert not any("PIN" in v.upper() for v in _unit_values("Environment"))  # no secret in the environment
    assert service["ExecStart"].endswith("serve --config /etc/helseid-signer/signer.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP reloads configuration and TLS files


# --- the systemd unit against the production template (deploy/systemd/signer.toml) ---


def test_every_path_the_template_writes_is_one_the_unit_makes_writable():
    service = _unit()["Service"]
    name = UNIT.name
    runtime = Path("/run") / service["RuntimeDirectory"]
    logs = Path("/var/log") / service["LogsDirectory"]
    state = Path("/var/lib") / service["StateDirectory"]
    credentials = {Path("/run/credentials") / name / v.split(":", 1)[0] for v in _unit_values("LoadCredential")}
    settings = tomllib.loads(TEMPLATE.read_text())
    assert service["ExecStart"].split("--config ")[1] == "/etc/helseid-signer/signer.toml"
    # Written by the service: the audit file, the sockets; read: registration records.
    assert Path(settings["audit"]["path"]).parent == logs
    assert Path(settings["selfservice"]["records_dir"]) == state
    sockets = [Path(c["unix_socket"]["path"]) for c in settings["callers"].values() if "unix_socket" in c]
    assert sockets and all(path.parent == runtime for path in sockets)
    # Secrets: exactly the credentials the unit loads.
    secret_paths = {Path(settings["server"][k]) for k in ("tls_certificate", "tls_private_key", "client_ca")} | {
        Path(settings["backends"]["pkcs11"]["pin_file"])
    }
    assert secret_paths == credentials
    # A configuration error stops the unit instead of a restart loop; serve exits 2 for it.
    assert service["RestartPreventExitStatus"] == "2"
    # Metrics on loopback; TLS with client certificates; audit to a file, fail-closed.
    assert settings["metrics"]["listen"].startswith("127.0.0.1:")
    assert "insecure" not in settings["server"] and settings["audit"]["on_failure"] == "fail_closed"
    # Callers over TLS and over a socket, and a rotation block.
    assert any("tls_names" in c for c in settings["callers"].values())
    assert settings["profiles"]["deft"]["rotation"]["next_key"] in settings["keys"]
    # logrotate rotates that audit file, never creates it (the service does, as its own user),
    # and makes the service reopen it.
    rotate = LOGROTATE.read_text()
    assert rotate.split("{")[0].strip().splitlines()[-1] == settings["audit"]["path"]
    directives = {line.strip() for line in rotate.split("{")[1].splitlines()}
    assert {"nocreate", "nocompress"} <= directives and "copytruncate" not in directives
    assert "systemctl reload helseid-signer.service" in rotate
    # The docs name the same files.
    docs = OPERATIONS.read_text()
    for path in (settings["audit"]["path"], "deploy/systemd/signer.toml", "deploy/systemd/helseid-signer.logrotate"):
        assert path in docs, path


def test_production_template_passes_check(tmp_path):
    """``helseid-signer check`` on deploy/systemd/signer.toml with its paths moved into a
    temporary folder: a SoftHSM token with the keys it names, a throwaway CA for the TLS
    files, the issuer on a closed loopback port (nothing leaves the machine)."""
    text = TEMPLATE.read_text()
    settings = tomllib.loads(text)
    label = re.search(r"token=([^;]+)", settings["keys"]["deft-dpop"]["uri"]).group(1)
    token = create_token(tmp_path / "token", label=label)
    for name, key in settings["keys"].items():
        keys_create(token, name, {"PS256": "RSA-2048", "ES256": "EC-P256"}[key["alg"]], key["alg"])
    credentials = tmp_path / "credentials"
    ca = CertificateAuthority(tmp_path / "pki", "apps")
    server = ca.issue("server", ips=("127.0.0.1",), server=True)
    credentials.mkdir()
    shutil.copy(server.cert_path, credentials / "tls.crt")
    shutil.copy(server.key_path, credentials / "tls.key")
    shutil.copy(ca.cert_path, credentials / "client-ca.crt")
    shutil.copy(token.pin_file, credentials / "pin")
    for folder in ("run", "log", "lib"):
        (tmp_path / folder).mkdir()
    issuer = f"http://127.0.0.1:{_closed_port()}"
    replacements = {
        "/run/credentials/helseid-signer.service/": f"{credentials}/",
        "/run/helseid-signer/": f"{tmp_path / 'run'}/",
        "/var/log/helseid-signer/": f"{tmp_path / 'log'}/",
        '"/var/lib/helseid-signer"': f'"{tmp_path / "lib"}"',
        settings["backends"]["pkcs11"]["module"]: token.module,
        settings["profiles"]["deft"]["issuer"]: issuer,
        'group = "batch-job"': f'group = "{grp.getgrgid(os.getgid()).gr_name}"',
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "signer.toml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "helseid_signer.cli", "check", "--config", str(config), "--timeout", "1"],
        env=token.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("error:")]
    warnings = sorted(line.split(":", 2)[1].strip() for line in lines if line.startswith("warning:"))
    # Expected: the issuer is not reachable here, and the next key is not registered yet.
    assert warnings == ["issuer http", "profiles.deft.rotation.next_key"], lines
    assert "ok: start-up: TLS files, audit and socket folders are usable" in lines


def _closed_port() -> int:
    """A loopback TCP port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
