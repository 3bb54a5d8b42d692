"""README's first command, ``python -m demo`` (what ``./scripts/demo.sh`` runs after set-up),
with a small file: it ends ACCEPTED only when the bytes came back unchanged, and it never
prints an access token (only decoded client assertions and DPoP proofs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: a compact JWS/JWT: what an access token (or an undecoded assertion or proof) looks like
COMPACT_JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")


def test_demo_round_trips_a_file_and_prints_no_token():
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--size-mb", "3", "--part-mb", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "\nACCEPTED: 3,145,728 bytes went up and came back unchanged" in out
    sent = re.search(r"SHA-256 sent\s+([0-9a-f]{64})", out).group(1)
    received = re.search(r"SHA-256 received ([0-9a-f]{64})", out).group(1)
    assert sent == received
    assert "3 part(s), 0 part(s) re-sent" in out
    assert "{'8142988': False}, after {'8142988': True}" in out
    # stdout is not a terminal here: plain progress lines, no carriage returns
    assert "\r" not in out and "   upload   100%" in out
    # decoded proofs for a part are shown; no compact token anywhere
    assert '"htm": "POST"' in out and "/part):" in out
    assert not COMPACT_JWT.search(out + proc.stderr)
