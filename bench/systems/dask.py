"""Dask distributed: ``LocalCluster(n_workers, threads_per_worker=1, processes=True)``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import System


class Dask(System):
    name = "dask"
    description = "dask.distributed LocalCluster, 1 thread per worker process, pure=False"
    requires = ("distributed",)

    def start(self, workers: int) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()

    def version(self) -> str:
        import distributed

        return distributed.__version__

    def submit(self, fn: Callable, *args) -> Any:
        return self.client.submit(fn, *args, pure=False)  # pure=False: equal calls must not share a key

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        return self.client.map(fn, *zip(*calls), pure=False) if calls else []

    def gather(self, handles: Sequence[Any]) -> list:
        return self.client.gather(list(handles))

    def result(self, handle: Any) -> Any:
        return handle.result()


ADAPTER = Dask
