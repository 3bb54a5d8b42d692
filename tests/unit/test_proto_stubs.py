"""The committed gRPC stubs are what scripts/gen_proto.py makes of the .proto today.

Regenerates into a temporary folder and compares bytes, so a .proto change without
regenerated stubs (or a hand edit of a stub) fails CI. Fix: ``python scripts/gen_proto.py``.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_proto.py"
COMMITTED = ROOT / "client" / "src" / "helseid_signer_client" / "proto"
NAMES = ("signer_pb2.py", "signer_pb2.pyi", "signer_pb2_grpc.py")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = runpy.run_path(str(SCRIPT))  # __name__ is not "__main__": nothing runs on import
    assert tuple(script["NAMES"]) == NAMES
    out = tmp_path_factory.mktemp("proto")
    script["generate"](out)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_committed_stub_is_up_to_date(generated: Path, name: str) -> None:
    fresh = (generated / name).read_bytes()
    committed = (COMMITTED / name).read_bytes()
    assert fresh == committed, f"{name} is stale: run python scripts/gen_proto.py and commit the result"


def test_grpc_stub_imports_messages_relatively(generated: Path) -> None:
    text = (generated / "signer_pb2_grpc.py").read_text()
    assert "from . import signer_pb2 as" in text
    assert "from helseid.signer.v1 import" not in text


def test_no_extra_generated_files(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == sorted(NAMES)
