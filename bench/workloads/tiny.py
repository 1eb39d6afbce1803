"""Tiny tasks: 20,000 no-op tasks submitted in bulk, every result gathered -> tasks/s."""

from __future__ import annotations

import time

from ..tasks import noop
from . import figure, scaled

TASKS = 20_000


def run(system, scale: float) -> dict:
    n = scaled(TASKS, scale)
    started = time.perf_counter()
    values = system.gather(system.map(noop, [(i,) for i in range(n)]))
    seconds = time.perf_counter() - started
    if len(values) != n or any(v is not None for v in values):
        raise AssertionError(f"{system.name}: tiny tasks returned wrong values")
    return {"tasks": n, "figures": {"tiny_tasks_per_s": figure(n / seconds, "tasks/s")}}
