"""Every ``docs/<name>.md`` a source file or document points at exists.

Five files once pointed at docs/helseid-profile.md before it was written; this finds any
such dangling reference in code, tests, scripts, the authorization server, the proto and
the documentation itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"(?<![\w/.-])(?:\.\./)?(docs/[\w./-]+?\.md)\b")
BARE = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")  # in docs/*.md: a sibling, or a file at the root
SUFFIXES = {".py", ".md", ".mjs", ".js", ".proto", ".sh", ".toml", ".yaml", ".yml"}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if not line.startswith("contract/")]
    return [ROOT / line for line in lines if Path(line).suffix in SUFFIXES]


def test_every_referenced_doc_exists():
    missing = []
    for path in tracked_files():
        if not path.is_file():
            continue
        for match in REFERENCE.finditer(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / match.group(1)).is_file():
                missing.append(f"{path.relative_to(ROOT)} -> {match.group(1)}")
        if path.parent == ROOT / "docs":
            for match in BARE.finditer(path.read_text(encoding="utf-8")):
                name = match.group(1)
                if not (path.parent / name).is_file() and not (ROOT / name).is_file():
                    missing.append(f"{path.relative_to(ROOT)} -> {name}")
    assert not missing, "dangling documentation references:\n" + "\n".join(sorted(set(missing)))
