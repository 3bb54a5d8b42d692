"""docs/operations.md "Metrics" lists every metric family the service defines, with the
same labels, so the table cannot fall behind metrics.py (issue 18, point 8)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from helseid_signer import metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _table_rows() -> dict[str, str]:
    text = DOCS.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(helseid_signer_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] = f"{match.group(2)} | {match.group(3)}"
    return rows


def test_every_metric_family_is_in_the_docs_table_with_its_type_and_labels():
    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(defined) >= 13
    rows = _table_rows()
    for metric in defined:
        kind = metric._type  # counter, gauge, histogram
        name = metric._name + ("_total" if kind == "counter" else "")
        assert name in rows, f"{name} is not in docs/operations.md, Metrics"
        documented_kind, labels = rows[name].split(" | ")
        assert documented_kind == kind, name
        documented = set(re.findall(r"`(\w+)`", labels.split("(")[0] if "(" in labels else labels))
        assert documented == set(metric._labelnames), (name, documented, metric._labelnames)
    assert len(rows) == len(defined), sorted(set(rows) - {m._name for m in defined})
