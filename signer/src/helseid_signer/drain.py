"""Draining on SIGTERM: answer every call that reached the process, then stop.

``grpc.aio.Server.stop(grace)`` alone is not enough. gRPC core accepts a call as soon as
its stream arrives, but grpc.aio hands calls to Python one at a time; a call still
waiting in core's queue when ``stop`` begins is cancelled on the spot (the caller gets
CANCELLED), however long the grace. Under load that was most of the calls in flight: of
200 calls sent at once to one signer, 189 were lost when SIGTERM came after the first
few answers (tests/service/test_lifecycle.py, before this module).

So the stop has two phases (:func:`drain_and_stop`):

1. **settle**: health goes NOT_SERVING (readiness probes fail, Kubernetes takes the pod
   out of the headless Service's DNS, clients that watch health move away) while the
   servers keep taking and answering calls, until no SignerService call has been
   running or started for ``quiet`` seconds (every call that had reached the process
   is answered), or ``settle`` seconds have passed (clients that keep sending here);
2. **stop**: ``server.stop(grace)`` sends GOAWAY (clients send new calls elsewhere), and
   calls already running get ``grace`` seconds to finish.

A call that arrives in the instant between the end of phase 1 and the GOAWAY is still
cancelled; the client library retries CANCELLED as well as UNAVAILABLE on another replica
(see ``helseid_signer_client.signer.DEFAULT_SERVICE_CONFIG``).

:class:`CallTracker` knows how many SignerService calls are running and when the last
one started or ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health

#: Seconds at most that phase 1 waits for calls to stop arriving.
SETTLE = 2.0
#: Phase 1 ends once no SignerService call has run or started for this many seconds.
QUIET = 0.25


class CallTracker:
    """Counts the SignerService calls in progress (health and reflection calls are not
    counted: an open health ``Watch`` never ends by itself).

    The servicer's methods are wrapped once, when they are registered (:meth:`wrap`, used by
    ``service.add_to_server``), not by a server interceptor: an interceptor puts a chain of
    coroutines and a new method handler on EVERY call of the server, health checks included
    (gRPC ceiling -17 %, docs/performance.md)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.active = 0
        self.last_change = clock()

    def wrap(self, behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        """``behaviour`` (an async unary-unary servicer method), counted while it runs."""

        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.active += 1
            self.last_change = self._clock()
            try:
                return await behaviour(request, context)
            finally:
                self.active -= 1
                self.last_change = self._clock()

        return tracked

    async def wait_quiet(self, quiet: float, timeout: float, poll: float = 0.01) -> bool:
        """Wait until no call has run for ``quiet`` seconds; False if ``timeout`` came first."""
        deadline = self._clock() + timeout
        while True:
            now = self._clock()
            if self.active == 0 and now - self.last_change >= quiet:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(poll)


async def drain_and_stop(
    servers: Iterable[grpc.aio.Server],
    health_servicer: health.aio.HealthServicer,
    tracker: CallTracker,
    *,
    grace: float,
    settle: float = SETTLE,
    quiet: float = QUIET,
) -> bool:
    """NOT_SERVING, answer what has arrived (at most ``settle`` s), then stop with ``grace``.
    Returns True when phase 1 ended quiet (nothing was still arriving)."""
    await health_servicer.enter_graceful_shutdown()
    settled = await tracker.wait_quiet(quiet, settle)
    await asyncio.gather(*(server.stop(grace=grace) for server in servers))
    return settled
