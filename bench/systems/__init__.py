"""One adapter per system under test; each runs the workloads through that system's own API.

An adapter subclasses ``System``: ``start(workers)`` brings up a local cluster with that many worker
processes, ``submit``/``map``/``gather``/``result`` drive it. Systems whose futures cannot be passed
as task arguments (``native_deps = False``) get the values resolved in the client first, which is
what their users do; the table says so.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

#: adapter module per system name, in the order of a run
SYSTEMS = {
    "armonik_zmq": "bench.systems.armonik_zmq",
    "armonik_api": "bench.systems.armonik_api",
    "dask": "bench.systems.dask",
    "ray": "bench.systems.ray",
    "ipyparallel": "bench.systems.ipyparallel",
    "scaler": "bench.systems.scaler",
    "processpool": "bench.systems.processpool",
}


class System:
    """A system under test, started once per benchmark run."""

    name = ""
    #: one line on what this adapter runs (shown in the table's notes)
    description = ""
    #: futures/handles can be task arguments (the system tracks the dependency)
    native_deps = True
    #: how DAG arguments travel, for the table's notes
    dag_note = "futures as task arguments"
    #: python modules the adapter needs; a missing one skips the system
    requires: Sequence[str] = ()

    @classmethod
    def missing(cls) -> Optional[str]:
        """Why this system cannot run here (a module not installed), or None."""
        for module in cls.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"{module} is not installed ({exc}); `pip install -e .[bench]` installs the peers"
        return None

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    # -- calls --------------------------------------------------------------------------------------

    def submit(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)``; return a handle. Handles among ``args`` are dependencies."""
        raise NotImplementedError

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """Submit ``fn(*call)`` for every call, in bulk where the system can; return their handles."""
        return [self.submit(fn, *call) for call in calls]

    def gather(self, handles: Sequence[Any]) -> list:
        """Wait for the handles; return their values in order."""
        return [self.result(h) for h in handles]

    def result(self, handle: Any) -> Any:
        raise NotImplementedError

    def release(self, handles: Sequence[Any]) -> None:
        """Forget what the handles hold (big arrays), so the next run starts clean."""

    # -- graphs: the generic form passes handles as arguments ----------------------------------------

    def fan_in(self, fn: Callable, calls: Sequence[tuple], reduce: Callable) -> Any:
        """Run ``fn`` over ``calls`` then ``reduce`` over all their outputs; return the reduced value."""
        parts = self.map(fn, calls)
        if not self.native_deps:
            parts = self.gather(parts)
        return self.result(self.submit(reduce, *parts))

    def chains(self, fn: Callable, starts: Sequence[int], length: int) -> list:
        """``len(starts)`` chains of ``length`` calls ``fn(previous)``; return the last values.

        Submitted level by level (in bulk where futures can be arguments), so a system that resolves
        arguments in the client waits for the previous level's results in the order they come.
        """
        level = self.map(fn, [(s,) for s in starts])
        for _ in range(length - 1):
            if self.native_deps:
                level = self.map(fn, [(h,) for h in level])
            else:
                level = [self.submit(fn, self.result(h)) for h in level]
        return self.gather(level)


def load(name: str) -> type:
    """Return the adapter class of a system name."""
    module = importlib.import_module(SYSTEMS[name])
    return module.ADAPTER
