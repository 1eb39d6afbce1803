"""OpenGRIS Scaler: ``SchedulerClusterCombo(n_workers)`` (scheduler, object storage, workers) + ``Client``.

Its futures are not task arguments: DAGs go through its graph API (``Client.get``), as its users do.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import System


class _Done:
    """A value ``Client.map`` already returned (Scaler's bulk call blocks until all are done)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class Scaler(System):
    name = "scaler"
    description = "opengris-scaler SchedulerClusterCombo(n_workers=N), Client.map in bulk, graphs via Client.get"
    requires = ("scaler",)
    native_deps = False
    dag_note = "DAGs through its graph API (Client.get)"

    def start(self, workers: int) -> None:
        from scaler import Client, SchedulerClusterCombo

        self.cluster = SchedulerClusterCombo(n_workers=workers, logging_level="WARNING")
        self.client = Client(address=self.cluster.get_address())

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.cluster.shutdown()

    def version(self) -> str:
        import scaler

        return scaler.__version__

    def submit(self, fn: Callable, *args) -> Any:
        return self.client.submit(fn, *args)

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        return [_Done(v) for v in self.client.starmap(fn, calls)] if calls else []

    def result(self, handle: Any) -> Any:
        return handle.value if isinstance(handle, _Done) else handle.result()

    @staticmethod
    def _call_node(graph: dict, key: str, fn: Callable, args: tuple) -> None:
        """Add ``key = fn(*args)``: literal arguments become data nodes (a graph argument names a key)."""
        for j, arg in enumerate(args):
            graph[f"{key}/{j}"] = arg
        graph[key] = (fn, *(f"{key}/{j}" for j in range(len(args))))

    def fan_in(self, fn: Callable, calls: Sequence[tuple], reduce: Callable) -> Any:
        graph: dict = {}
        for i, call in enumerate(calls):
            self._call_node(graph, f"x{i}", fn, call)
        graph["reduce"] = (reduce, *(f"x{i}" for i in range(len(calls))))
        return self.client.get(graph, ["reduce"])["reduce"]

    def chains(self, fn: Callable, starts: Sequence[int], length: int) -> list:
        graph: dict = {}
        for c, s in enumerate(starts):
            self._call_node(graph, f"c{c}-0", fn, (s,))
            for k in range(1, length):
                graph[f"c{c}-{k}"] = (fn, f"c{c}-{k - 1}")
        keys = [f"c{c}-{length - 1}" for c in range(len(starts))]
        values = self.client.get(graph, keys)
        return [values[k] for k in keys]


ADAPTER = Scaler
