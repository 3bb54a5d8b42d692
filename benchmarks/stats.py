"""Latency and throughput summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of sorted nanosecond values, in milliseconds
    (NaN when there are none)."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def summarize(latencies_ns: list[int], duration_s: float) -> dict[str, float]:
    """Completed calls per second over the window, p50 and p99 latency in milliseconds."""
    values = sorted(latencies_ns)
    return {
        "n": len(values),
        "throughput": len(values) / duration_s if duration_s > 0 else math.nan,
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
    }


def composed_limit(raw: float, grpc: float) -> float:
    """``1 / (1/raw + 1/grpc)``: the rate if each call cost one gRPC call plus one raw signature
    in sequence on the same resources."""
    if not raw or not grpc or math.isnan(raw) or math.isnan(grpc):
        return math.nan
    return 1 / (1 / raw + 1 / grpc)
