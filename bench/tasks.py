"""The task functions every system runs, and the same tasks as an ArmoniK-style worker module.

The Python functions go to each system as it ships functions (by reference: workers import
``bench.tasks``, the benchmark puts the repository on their ``PYTHONPATH``). ``processor`` runs the
same work from plain payload bytes, the way an ArmoniK worker module does, so the cost of the
futures API (pickling, the function processor) shows against the bare task path.
"""

from __future__ import annotations

import json

import numpy as np

from armonik_zmq.worker import Output


def noop(i=None):
    """Do nothing (the tiny-task and latency workloads)."""
    return None


def inc(x: int) -> int:
    return x + 1


def total(*xs: int) -> int:
    return sum(xs)


def array(nbytes: int, value: float) -> np.ndarray:
    """A float64 array of ``nbytes`` bytes filled with ``value`` (the data workloads)."""
    return np.full(nbytes // 8, value, dtype=np.float64)


FUNCTIONS = {f.__name__: f for f in (noop, inc, total, array)}


# -- the ArmoniK-style path ---------------------------------------------------------------------------
# Payload: b"<function name> <JSON list of literal arguments>"; a data dependency stands in the list as
# {"$": index into the task's data dependencies}. Outputs: b"" (noop), the decimal integer (inc, total),
# the array's raw float64 bytes (array).

def encode_call(name: str, args: list) -> bytes:
    return name.encode() + b" " + json.dumps(args, separators=(",", ":")).encode()


def decode_output(name: str, data) -> object:
    if name == "noop":
        return None
    if name == "array":
        return np.frombuffer(data, dtype=np.float64)
    return int(bytes(data))


def processor(task_handler) -> Output:
    """Run one bench task from its payload bytes; its output's data is the encoded return value."""
    name, _, literal = bytes(task_handler.payload).partition(b" ")
    name = name.decode()
    if name not in FUNCTIONS:
        return Output(f"unknown bench function {name!r}")
    deps = list(task_handler.data_dependencies.values())
    args = [int(bytes(deps[a["$"]])) if isinstance(a, dict) else a for a in json.loads(literal)]
    value = FUNCTIONS[name](*args)
    out = task_handler.expected_results[0]
    if value is None:
        data = b""
    elif isinstance(value, np.ndarray):
        data = memoryview(value).cast("B")  # a view: its length counts bytes
    else:
        data = str(value).encode()
    task_handler.send_results({out: data})
    return Output()
