"""The streamed-upload cells (issue 14): a file of ``--upload-gb`` GB, generated on the fly and
never stored by the client, goes to the DEFT stand-in with DEFT's multipart protocol
(``demo/deft_client.py``: initialization, one ``POST /objects/{key}/part`` per part, completion)
through ``DPoPAuth`` on ``httpx.Client`` - once with proofs from the service, once with an
in-process key (the baseline of ``benchmarks/inprocess.py``).

Each run is a fresh process of its own (spawned; the stand-in, in the benchmark's process, is
not in its memory). It fetches its token and sends one small warm-up upload (connection, the
API's nonce), then takes its baseline resident set (VmRSS), samples VmRSS every 10 ms during
the upload, and reports: bytes, seconds from initialization to completion, throughput, parts,
part requests (re-sent = requests - parts), token requests, RSS baseline and peak. Every
part's ``eTag`` from the stand-in is checked against the client's SHA-256 of that part, so a
finished upload is also a verified one.
"""

from __future__ import annotations

import gc
import resource
import threading
import time
import traceback
from multiprocessing.connection import Connection

import httpx

from demo.deft_client import DeftClient, generated_parts
from helseid_signer_client import DPoPAuth, SignerClient, TokenClient

from .inprocess import SyncInProcessSigner
from .procstat import rss_bytes

SENDER, RECEIVERS = 8142987, [8142988]


class RssSampler(threading.Thread):
    """Largest VmRSS of this process seen while running (every ``every`` seconds)."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop_event.wait(self.every)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(conn: Connection, setup: dict) -> None:
    """Run one upload as ``setup`` says and send back what was measured (or {"error"})."""
    import os

    try:
        if setup["signer"] == "service":
            signer = SignerClient(setup["target"])
            profile = setup["profile"]
        else:
            signer = SyncInProcessSigner(
                setup["inproc_client_id"], setup["issuer"], setup["token_endpoint"],
                setup["inproc_assertion_pem"], setup["inproc_dpop_pem"], setup["lifetime"],
            )  # fmt: skip
            profile = "inproc"
        token_requests = []
        token_http = httpx.Client(event_hooks={"request": [token_requests.append]})
        with TokenClient(signer, profile, setup["scope"], http=token_http) as tokens:
            tokens.get_token()
            with httpx.Client(auth=DPoPAuth(tokens), base_url=setup["api_url"], timeout=120) as http:
                client = DeftClient(http)
                warm = client.upload(generated_parts(1024, 1024), "warm-up.bin", SENDER, RECEIVERS)
                gc.collect()
                pid = os.getpid()
                baseline = rss_bytes(pid)
                sampler = RssSampler(pid)
                sampler.start()
                cpu0 = _cpu_seconds()
                started = time.perf_counter()
                result = client.upload(
                    generated_parts(setup["size"], setup["part_size"]), "bench.bin", SENDER, RECEIVERS
                )
                seconds = time.perf_counter() - started
                cpu = _cpu_seconds() - cpu0
                peak = sampler.stop()
        token_http.close()
        signer.close()
        conn.send(
            {
                "key": result.key,
                "warm_key": warm.key,
                "bytes": result.size,
                "seconds": seconds,
                "client_cpu_s": cpu,
                "client_cpu_total_s": _cpu_seconds(),
                "parts": result.parts,
                "part_requests": result.part_requests,
                "token_requests": len([r for r in token_requests if r.method == "POST"]),
                "sha256": result.sha256,
                "rss_baseline": baseline,
                "rss_peak": peak,
            }
        )
    except BaseException:  # noqa: BLE001 - reported to the benchmark, which fails the run
        conn.send({"error": traceback.format_exc()})
