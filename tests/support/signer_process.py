"""A real ``helseid-signer serve`` process that a test can signal: start it, read its
bound address, send it SIGTERM or SIGKILL, and wait for its exit code.

(``tests/support/signer_proc.running_signer`` is the simpler context manager for tests
that never signal the process themselves.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class SignerProcessError(RuntimeError):
    """The signer process exited or did not report ready in time."""


@dataclass
class SignerProcess:
    """A started signer. ``address`` is the ``host:port`` its ready file named; its stderr
    and stdout (JSON log lines, and audit records with ``sink = "stdout"``) go to ``log``."""

    proc: subprocess.Popen
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; never raises (for clean-up)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_signer(config: Path, env: dict[str, str] | None = None, timeout: float = 30.0) -> SignerProcess:
    """Start ``helseid-signer serve --config config`` (``env`` added to the current
    environment) and return once it wrote its ready file. Log: ``<config>.log``."""
    ready = Path(str(config) + ".ready")
    ready.unlink(missing_ok=True)
    log = Path(str(config) + ".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "helseid_signer.cli", "serve", "--config", str(config), "--ready-file", str(ready)],
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise SignerProcessError(f"signer exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SignerProcessError(f"signer not ready after {timeout} s: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return SignerProcess(proc, ready.read_text(), log)
