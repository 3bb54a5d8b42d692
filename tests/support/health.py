"""Read a signer's standard gRPC health service (plaintext listener) in tests."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "") -> int:
    """The status of ``service`` ("" overall, ``backend:<scheme>`` per backend)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status


def wait_health(address: str, status: int, service: str = "", timeout: float = 20.0) -> None:
    """Poll until ``service`` reports ``status``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while health(address, service) != status:
        assert time.monotonic() < deadline, f"health of {service!r} did not become {status}"
        time.sleep(0.1)
