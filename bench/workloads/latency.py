"""Latency: 1,000 sequential submit-and-wait of a no-op task -> p50 and p99 in microseconds."""

from __future__ import annotations

import time

import numpy as np

from ..tasks import noop
from . import figure, scaled

CALLS = 1_000
#: calls not timed, so connections and worker imports are warm
WARMUP = 20


def run(system, scale: float) -> dict:
    n = scaled(CALLS, scale, least=10)
    for i in range(WARMUP):
        system.result(system.submit(noop, i))
    samples = np.empty(n)
    for i in range(n):
        started = time.perf_counter()
        if system.result(system.submit(noop, i)) is not None:
            raise AssertionError(f"{system.name}: latency task returned a value")
        samples[i] = time.perf_counter() - started
    p50, p99 = np.percentile(samples, [50, 99]) * 1e6
    return {"tasks": n + WARMUP, "figures": {"latency_p50_us": figure(p50, "us", "lower"),
                                             "latency_p99_us": figure(p99, "us", "lower")}}
