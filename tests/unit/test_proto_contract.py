"""The API contract is guarded by buf (installed pinned by scripts/setup.sh, tools/):

* ``buf lint`` with the STANDARD and COMMENTS rules (buf.yaml): naming, versioned
  package, and a comment on every message, field, enum value and RPC;
* ``buf breaking`` (FILE rules: wire, JSON and generated-source compatibility) against
  the last released contract, kept as a checked-in copy in contract/released-0.1.0/
  (CI clones fresh, so a committed snapshot is sturdier than a git tag).

Negative controls show the checks can fail: a deleted field is reported as breaking, a
field without a comment as a lint error.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
RELEASED = ROOT / "contract" / "released-0.1.0"
PROTO = Path("proto") / "helseid" / "signer" / "v1" / "signer.proto"


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), f"{BUF} is missing: run scripts/setup.sh"
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of buf.yaml and proto/ to edit."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    return tmp_path


def test_buf_lint_is_clean():
    done = buf("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_breaking_change_against_the_released_contract():
    assert (RELEASED / "helseid" / "signer" / "v1" / "signer.proto").is_file()
    done = buf("breaking", "--against", str(RELEASED))
    assert done.returncode == 0, done.stdout + done.stderr


def test_deleted_field_is_reported_as_breaking(workspace: Path):
    proto = workspace / PROTO
    text = proto.read_text()
    assert text.count("string nonce = 4;") == 1
    proto.write_text(text.replace("string nonce = 4;", ""))
    done = buf("breaking", "--against", str(RELEASED), "--error-format", "json", cwd=workspace)
    assert done.returncode != 0
    assert 'field \\"4\\" with name \\"nonce\\"' in done.stdout and '"type":"FIELD_NO_DELETE"' in done.stdout


def test_renamed_field_is_reported_as_breaking(workspace: Path):
    """Hosts compile stubs from the .proto: a rename breaks their source, not the wire."""
    proto = workspace / PROTO
    proto.write_text(proto.read_text().replace("string dpop_jkt = 7;", "string dpop_thumbprint = 7;"))
    done = buf("breaking", "--against", str(RELEASED), "--error-format", "json", cwd=workspace)
    assert done.returncode != 0 and "FIELD_SAME_NAME" in done.stdout


def test_field_without_comment_fails_lint(workspace: Path):
    proto = workspace / PROTO
    text = proto.read_text()
    proto.write_text(text.replace("  string jwks_json = 1;", "  string jwks_json = 1;\n  string added = 4;"))
    done = buf("lint", cwd=workspace)
    assert done.returncode != 0 and 'Field "added" should have a non-empty comment' in done.stdout
