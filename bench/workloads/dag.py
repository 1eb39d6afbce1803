"""DAG: 1,000 independent tasks + 1 reduce over all of them; 200 chains of 10 -> tasks/s each."""

from __future__ import annotations

import time

from ..tasks import inc, total
from . import figure, scaled

FAN_IN = 1_000
CHAINS = 200
LENGTH = 10


def run(system, scale: float) -> dict:
    n = scaled(FAN_IN, scale)
    started = time.perf_counter()
    value = system.fan_in(inc, [(i,) for i in range(n)], total)
    fan_in_s = time.perf_counter() - started
    if value != sum(range(1, n + 1)):
        raise AssertionError(f"{system.name}: fan-in reduced to {value!r}")
    chains = scaled(CHAINS, scale)
    started = time.perf_counter()
    ends = system.chains(inc, list(range(chains)), LENGTH)
    chains_s = time.perf_counter() - started
    if ends != [s + LENGTH for s in range(chains)]:
        raise AssertionError(f"{system.name}: chains ended with wrong values")
    return {"tasks": n + 1 + chains * LENGTH,
            "figures": {"dag_fan_in_tasks_per_s": figure((n + 1) / fan_in_s, "tasks/s"),
                        "dag_chains_tasks_per_s": figure(chains * LENGTH / chains_s, "tasks/s")}}
