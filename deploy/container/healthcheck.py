"""Health probe of a helseid-signer replica: one ``grpc.health.v1.Health/Check`` call.

Used by Kubernetes as an ``exec`` probe (deploy/kubernetes/deployment.yaml) and usable by
any supervisor. It runs inside the signer's container with the signer's own Python, and
calls the pod-local probe socket (a caller with no profiles, see the ConfigMap) in plain
gRPC: nothing leaves the pod.

Why not Kubernetes' built-in ``grpc:`` probe: the kubelet speaks plaintext gRPC to the pod
IP, and the signer's TCP port accepts only mTLS. A plaintext TCP port for probes would be
a port that anyone who reaches the pod can talk to; the Unix socket is reachable only
inside the pod.

Usage::

    python3 healthcheck.py [--alive] [--service NAME] [--timeout S] [TARGET]

TARGET defaults to ``unix:/run/helseid-signer/probe.sock``. Exit status:

- 0: the service is SERVING (readiness: send traffic here); with ``--alive``, any
  answer at all (liveness: the process answers; a backend that cannot sign makes it
  NOT_SERVING, but the process recovers by itself and a restart would not help);
- 1: NOT_SERVING or unknown (without ``--alive``), no answer, or an error.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "unix:/run/helseid-signer/probe.sock"


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The status name the service reports for ``service`` ("" = overall), or the gRPC
    status code name when the call fails (e.g. ``UNAVAILABLE``)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=DEFAULT_TARGET)
    parser.add_argument("--alive", action="store_true", help="succeed on any answer, SERVING or not")
    parser.add_argument("--service", default="", help='health service name (default "": the overall status)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    answered = status in health_pb2.HealthCheckResponse.ServingStatus.keys()
    ok = answered if args.alive else status == "SERVING"
    print(f"{args.target} {args.service or '(overall)'}: {status}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
