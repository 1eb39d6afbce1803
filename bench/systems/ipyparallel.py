"""IPyParallel: ``Cluster(n=workers)`` engines behind a load-balanced view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import System


@dataclass(frozen=True)
class _Item:
    """One call of a ``map_async``: its batch and its index there."""

    batch: Any
    index: int


class IPyParallel(System):
    name = "ipyparallel"
    description = "ipyparallel Cluster(n=N) engines, load-balanced view"
    requires = ("ipyparallel",)
    native_deps = False
    dag_note = "no futures as arguments: DAG arguments resolved in the client"

    def start(self, workers: int) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=workers, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(workers, timeout=120)
        self.view = self.rc.load_balanced_view()

    def stop(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()

    def version(self) -> str:
        import ipyparallel

        return ipyparallel.__version__

    def submit(self, fn: Callable, *args) -> Any:
        return self.view.apply_async(fn, *args)

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        if not calls:
            return []
        batch = self.view.map_async(fn, *zip(*calls))  # one engine task per call (chunksize 1)
        return [_Item(batch, i) for i in range(len(calls))]

    def gather(self, handles: Sequence[Any]) -> list:
        batches: dict[int, list] = {}
        out = []
        for h in handles:
            if isinstance(h, _Item):
                if id(h.batch) not in batches:
                    batches[id(h.batch)] = h.batch.get()
                out.append(batches[id(h.batch)][h.index])
            else:
                out.append(h.get())
        return out

    def result(self, handle: Any) -> Any:
        return self.gather([handle])[0]

    def release(self, handles: Sequence[Any]) -> None:
        self.rc.purge_everything()


ADAPTER = IPyParallel
