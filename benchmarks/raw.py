"""The raw backend: ``Pkcs11Backend.sign`` called in-process, no gRPC, in as many processes
as the service has workers (each process its own Cryptoki instance, as a worker has).

Each process is started once (``spawn``) and then runs one cell per command: ``threads``
threads call ``sign`` in a closed loop; a signature counts when it completes inside the
measured window. The signing input is a JWS signing input of a realistic size."""

from __future__ import annotations

import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

#: ~ the size of a client assertion's signing input (header + claims, base64url)
SIGNING_INPUT = b"eyJhbGciOiJSUzI1NiIsInR5cCI6ImNsaWVudC1hdXRoZW50aWNhdGlvbitqd3QiLCJraWQiOiJ" + b"A" * 260


def worker(conn: Connection, module: str, pin_file: str, keys: dict[str, tuple[str, str, dict]]) -> None:
    """Process entry: ``keys`` maps name -> (uri, alg, public JWK). Answers commands on ``conn``."""
    from helseid_signer.algorithms import get_algorithm
    from helseid_signer.backends.pkcs11 import Pkcs11Backend

    from .jose_check import public_key, verify_signature

    try:
        backend = Pkcs11Backend(module, pin_file=pin_file)
        resolved = {
            name: (backend.resolve(uri), get_algorithm(alg), public_key(jwk)) for name, (uri, alg, jwk) in keys.items()
        }
    except Exception:
        conn.send({"error": traceback.format_exc()})
        return
    conn.send({"ready": True})
    while True:
        cmd = conn.recv()
        if cmd["op"] == "stop":
            break
        try:
            conn.send(_run(backend, resolved[cmd["key"]], cmd, verify_signature))
        except Exception:
            conn.send({"error": traceback.format_exc()})
    backend.close()


def _run(backend: Any, key: tuple, cmd: dict, verify_signature: Any) -> dict:
    resolved, alg, public = key
    t_start, t_end = cmd["t_start_ns"], cmd["t_end_ns"]
    latencies: list[list[int]] = [[] for _ in range(cmd["threads"])]
    errors: list[str] = []
    checked = [0]

    def loop(mine: list[int]) -> None:
        first = True
        while True:
            t0 = time.monotonic_ns()
            if t0 >= t_end:
                return
            try:
                signature = backend.sign(resolved, alg, SIGNING_INPUT)
            except Exception as exc:  # counted, and the bench fails on any
                errors.append(repr(exc))
                continue
            t1 = time.monotonic_ns()
            if t_start <= t1 <= t_end:
                mine.append(t1 - t0)
            if first:  # one signature per thread is verified (off the measured path: before t_start)
                verify_signature(public, alg.name, SIGNING_INPUT, signature)
                checked[0] += 1
                first = False

    threads = [threading.Thread(target=loop, args=(mine,)) for mine in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "latencies": [v for mine in latencies for v in mine],
        "errors": errors[:5],
        "error_count": len(errors),
        "checked": checked[0],
    }


class RawPool:
    """The raw-backend processes; one command runs one cell across all of them."""

    def __init__(self, processes: int, module: str, pin_file: str, keys: dict[str, tuple[str, str, dict]]) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(processes):
            # One at a time, and again on failure: SoftHSM 2.6 sometimes misses a token (or
            # answers CKR_GENERAL_ERROR) when two processes initialise on one token store at once.
            for attempt in range(4):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker, args=(child, module, pin_file, keys), daemon=True, name="bench-raw")
                proc.start()
                answer = parent.recv()
                if "error" not in answer:
                    break
                proc.join(timeout=10)
                if attempt == 3:
                    raise RuntimeError(f"raw backend process failed to start:\n{answer['error']}")
                time.sleep(0.5)
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, key: str, concurrency: int, t_start_ns: int, t_end_ns: int) -> None:
        """Spread ``concurrency`` threads over the processes (1 in flight: one process signs)."""
        n = len(self.conns)
        for i, conn in enumerate(self.conns):
            threads = concurrency // n + (1 if i < concurrency % n else 0)
            conn.send({"op": "run", "key": key, "threads": threads, "t_start_ns": t_start_ns, "t_end_ns": t_end_ns})

    def results(self) -> dict:
        merged: dict[str, Any] = {"latencies": [], "errors": [], "error_count": 0, "checked": 0}
        for conn in self.conns:
            answer = conn.recv()
            if "error" in answer:
                raise RuntimeError(f"raw backend process failed:\n{answer['error']}")
            merged["latencies"] += answer["latencies"]
            merged["errors"] += answer["errors"]
            merged["error_count"] += answer["error_count"]
            merged["checked"] += answer["checked"]
        return merged

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send({"op": "stop"})
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
