"""The shipped Prometheus alert rules (deploy/prometheus/helseid-signer-alerts.yaml):
``promtool check rules`` accepts them, ``promtool test rules`` runs their unit tests
(tests/deploy/helseid-signer-alerts.test.yaml: each alert fires when it must and stays
silent when it must not), and every metric a rule names is one the signer exports (a
renamed metric would leave an alert that can never fire). promtool comes from the Debian
package ``prometheus`` (scripts/setup.sh); a missing promtool is a failure, never a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import prometheus_client
import yaml

from helseid_signer import metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "helseid-signer-alerts.yaml"
RULE_TESTS = Path(__file__).with_name("helseid-signer-alerts.test.yaml")
EXPECTED_ALERTS = {
    "HelseIDSignerRegistrationExpiresSoon",
    "HelseIDSignerRegistrationExpiresVerySoon",
    "HelseIDSignerNextKeyNotRegistered",
    "HelseIDSignerPinnedKeyDrift",
    "HelseIDSignerBackendNotServing",
    "HelseIDSignerAuditWriteFailures",
    "HelseIDSignerNoOtherKeyForRetry",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/setup.sh (Debian package prometheus)"
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    result = _run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass():
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in _rules()} == EXPECTED_ALERTS
    result = _run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_negative_control_promtool_test_fails_on_a_wrong_expectation(tmp_path):
    """promtool must really evaluate: a test expecting the audit alert at a time it cannot
    fire (before the counter moved) fails."""
    text = RULE_TESTS.read_text().replace(f"../../deploy/prometheus/{RULES.name}", str(RULES))
    wrong = text.replace(
        "      - eval_time: 2m\n        alertname: HelseIDSignerAuditWriteFailures\n        exp_alerts: []",
        "      - eval_time: 2m\n        alertname: HelseIDSignerAuditWriteFailures\n"
        "        exp_alerts:\n          - exp_labels: {severity: critical}",
    )
    assert wrong != text
    (tmp_path / "wrong.test.yaml").write_text(wrong)
    result = subprocess.run([_promtool(), "test", "rules", "wrong.test.yaml"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0 and "HelseIDSignerAuditWriteFailures" in result.stdout + result.stderr


def test_every_metric_a_rule_names_is_exported_by_the_signer():
    exported = set()
    for collector in vars(metrics).values():
        if isinstance(collector, prometheus_client.metrics.MetricWrapperBase):
            for family in collector.describe():
                exported.add(family.name)
                if family.type == "counter":
                    exported.add(family.name + "_total")
    named = {name for rule in _rules() for name in re.findall(r"helseid_signer_\w+", rule["expr"])}
    assert named and named <= exported, named - exported
    assert "helseid_signer_audit_write_failures_total" in named
