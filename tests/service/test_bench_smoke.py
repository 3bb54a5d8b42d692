"""CI runs the benchmark (issue 7) once, in its short mode: it checks correctness only -
every signature verified, no request failed, no server process died - and that the table
and the JSON are produced. No timing is asserted here: timing targets are the benchmark's
own report (``python -m benchmarks``, docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_checks_correctness_and_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    result = json.loads(out.read_text())

    groups = {r["group"] for r in result["rows"]}
    assert groups == {"raw", "grpc", "grpc_profile", "service", "flow_inproc", "flow_service", "neighbour"}
    assert {r["alg"] for r in result["rows"] if r["group"] == "raw"} == {"RS256", "PS256", "ES256"}
    assert all(r["errors"] == 0 for r in result["rows"] if not r["group"].startswith("flow"))
    # signatures the cells received were verified independently (cryptography), off the clock
    assert all(r["checked"] > 0 for r in result["rows"] if r["group"] in ("raw", "service"))
    assert all("baseline" in r for r in result["rows"] if r["group"] in ("service", "flow_service"))
    # the noisy-neighbour cells (issue 13): the victim alone and beside the neighbours, every
    # victim call answered; the flooder was refused and the unlisted certificate got no stream
    neighbour = {r["id"]: r for r in result["rows"] if r["group"] == "neighbour"}
    assert set(neighbour) == {f"neighbour/{m}/c{c}" for m in ("quiet", "noisy") for c in (1, 8)}
    for c in (1, 8):
        noisy = neighbour[f"neighbour/noisy/c{c}"]
        assert noisy["baseline"]["name"] == "victim alone" and noisy["errors"] == 0
        answers = noisy["neighbours"]["flooder"]
        assert answers.get("UNAUTHENTICATED", 0) > 0
        assert answers.get("RESOURCE_EXHAUSTED", 0) + answers.get("PERMISSION_DENIED", 0) > 0
        assert noisy["neighbours"]["watch_opened"] == 0 and noisy["neighbours"]["watch_refused"] > 0

    c = result["correctness"]
    assert c["ok"] and c["clients"] == 64
    assert c["requested"] == c["signed"] == c["verified"] == 64 * c["per_client"]
    assert c["error_count"] == 0 and c["failure_count"] == 0 and c["duplicate_jti"] == 0
    assert result["problems"] == []

    targets = "targets (issue 7; streamed upload: issue 14; noisy neighbours: issue 13):"
    assert targets in proc.stdout and "service SignClientAssertion" in proc.stdout
    # The streamed upload (issue 14), small in --quick: both variants, every byte stored, no
    # part re-sent, the client's RSS measured.
    upload = result["upload"]
    assert upload["bytes"] == 16_000_000 and set(upload["runs"]) == {"service", "inproc"}
    for run in upload["runs"].values():
        assert run["stored_bytes"] == run["bytes"] == 16_000_000
        assert run["parts"] == 4 and run["parts_resent"] == 0
        assert run["rss_peak"] >= run["rss_baseline"] > 0
    assert "streamed upload to the DEFT stand-in" in proc.stdout
    assert result["table"] in proc.stdout
