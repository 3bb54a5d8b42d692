"""The shape of the code holds: the import-linter contracts in pyproject.toml (layers from
the wiring down to the JOSE core, backends independent of each other, the client
distribution independent of the signer, only the server wiring importing the servicer),
and no import cycle in either package.

The oracles are import-linter and grimp, which read the imports themselves; the negative
controls show that a contract breach and a cycle are caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = {
    "helseid_signer": ROOT / "signer" / "src" / "helseid_signer",
    "helseid_signer_client": ROOT / "client" / "src" / "helseid_signer_client",
}


def _lint_imports(src_paths: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in src_paths))
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _copy_packages(tmp_path: Path) -> Path:
    for name, folder in PACKAGES.items():
        shutil.copytree(folder, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_import_contracts_are_kept() -> None:
    result = _lint_imports([p.parent for p in PACKAGES.values()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("keys.py", "from . import service\n", "signer layers"),
        ("backends/pkcs11.py", "from . import aws_kms\n", "backends are independent"),
        ("check.py", "from . import service\n", "only the server wiring imports the gRPC servicer"),
        ("../helseid_signer_client/token.py", "import helseid_signer.jwt\n", "never imports the signer"),
    ],
)
def test_a_breach_is_reported(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """Negative control: one added import breaks the named contract."""
    root = _copy_packages(tmp_path)
    target = root / "helseid_signer" / module
    target.write_text(target.read_text() + line)
    result = _lint_imports([root])
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout


def _cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if not n.startswith(package):
                continue
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package: str) -> None:
    graph = grimp.build_graph(package, cache_dir=None)
    assert _cycles(graph, package) == []


def test_a_cycle_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: claims.py importing signing.py (which imports claims) is a cycle."""
    root = _copy_packages(tmp_path)
    claims = root / "helseid_signer" / "claims.py"
    claims.write_text(claims.read_text() + "\nfrom . import signing  # noqa\n")
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m.startswith("helseid_signer")]:
        monkeypatch.delitem(sys.modules, name)
    graph = grimp.build_graph("helseid_signer", cache_dir=None)
    assert any({"helseid_signer.claims", "helseid_signer.signing"} <= set(c) for c in _cycles(graph, "helseid_signer"))
