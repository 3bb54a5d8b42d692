"""Run the real ``helseid-signer serve`` as a subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.signer_process import start_signer


@contextlib.contextmanager
def running_signer(config: Path, env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start ``helseid-signer serve --config config`` and yield its bound ``host:port``.

    ``env`` is added to the current environment (e.g. SOFTHSM2_CONF). The process gets
    SIGTERM on exit; its stderr (JSON log lines) is kept at ``<config>.log``
    (:func:`tests.support.signer_process.start_signer`).
    """
    signer = start_signer(config, env, timeout)
    try:
        yield signer.address
    finally:
        signer.stop()


def plain_client(address: str, timeout: float = 5.0):
    """A SignerClient WITHOUT the library's default retries and balancing: tests of the
    service's own answers (UNAVAILABLE, RESOURCE_EXHAUSTED...) must see each answer once."""
    import grpc

    from helseid_signer_client import SignerClient

    return SignerClient(channel=grpc.insecure_channel(address), timeout=timeout)


def signer_pid(config: Path) -> int:
    """The pid of the ``helseid-signer serve --config <config>`` process (from /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and str(config).encode() in args:
                return int(entry.name)
    raise AssertionError(f"no signer process for {config}")


def sighup_and_wait(config: Path, text: str, timeout: float = 15.0) -> None:
    """SIGHUP the signer started with ``config`` and wait until its log (``<config>.log``)
    shows ``text`` once more."""
    log = Path(str(config) + ".log")
    before = log.read_text().count(text)
    os.kill(signer_pid(config), signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) <= before:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged after SIGHUP: {log.read_text()[-2000:]}")
        time.sleep(0.05)
