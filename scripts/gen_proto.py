#!/usr/bin/env python3
"""Generate the Python gRPC stubs of proto/helseid/signer/v1/signer.proto.

Usage: python scripts/gen_proto.py [OUT_DIR]

Writes signer_pb2.py, signer_pb2.pyi and signer_pb2_grpc.py into OUT_DIR
(default: client/src/helseid_signer_client/proto/, where they are committed).
The stub's absolute import of signer_pb2 is rewritten to a relative one so the
generated package needs nothing on sys.path. tests/unit/test_proto_stubs.py
regenerates into a temporary folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "helseid/signer/v1/signer.proto"
DEFAULT_OUT = ROOT / "client" / "src" / "helseid_signer_client" / "proto"
NAMES = ("signer_pb2.py", "signer_pb2.pyi", "signer_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc into out_dir; raise RuntimeError if protoc fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO}")
        generated = Path(tmp) / "helseid" / "signer" / "v1"
        for name in NAMES:
            text = (generated / name).read_text()
            text = re.sub(
                r"^from helseid\.signer\.v1 import signer_pb2 as",
                "from . import signer_pb2 as",
                text,
                flags=re.M,
            )
            (out_dir / name).write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
