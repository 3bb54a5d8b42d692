"""The benchmark of issue 7: the service against the raw backend, the gRPC ceiling and an
in-process key, in one run. Entry point: ``python -m benchmarks`` (see run.py)."""
