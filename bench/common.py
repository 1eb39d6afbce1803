"""What every benchmark shares: machine details, the results file, a local cluster with bench processors."""

from __future__ import annotations

import json
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    import zmq
    import lmdb
    import msgpack

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "lmdb": lmdb.__version__,
            "msgpack": ".".join(map(str, msgpack.version)), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str, name: str, figures: dict, params: dict) -> str:
    path = path or os.path.join(ROOT, "bench", "results", f"{name}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": name, "params": params, "figures": figures, "machine": machine()}, f, indent=2)
    return path


#: how armonik_zmq's broker makes its commits durable in a run (set by ``python -m bench --durability``)
DURABILITY_ENV = "ARMONIK_ZMQ_BENCH_DURABILITY"

#: ``--durability`` of the bench -> the broker's options
DURABILITY_ARGS = {"lmdb": (), "wal": ("--durability", "wal"), "none": ("--no-sync",)}


def broker_args() -> tuple[str, ...]:
    """The broker's options for the durability this run measures (its default, LMDB's own flushes, unless set)."""
    return DURABILITY_ARGS[os.environ.get(DURABILITY_ENV) or "lmdb"]


def bench_env() -> dict:
    """Workers must import ``bench.*`` processors: put the repository on their path."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
