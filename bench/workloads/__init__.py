"""The workloads of issue 4, one module each; every ``run(system, scale)`` returns its figures.

A figure is ``{"value": float, "unit": str, "better": "higher" | "lower"}``; ``tasks`` counts the
tasks a run executed, for CPU time per task.
"""

from __future__ import annotations

import importlib

WORKLOADS = {
    "tiny": "bench.workloads.tiny",
    "latency": "bench.workloads.latency",
    "dag": "bench.workloads.dag",
    "data": "bench.workloads.data",
}


def load(name: str):
    return importlib.import_module(WORKLOADS[name])


def figure(value: float, unit: str, better: str = "higher") -> dict:
    return {"value": value, "unit": unit, "better": better}


def scaled(n: int, scale: float, least: int = 1) -> int:
    return max(least, int(round(n * scale)))
