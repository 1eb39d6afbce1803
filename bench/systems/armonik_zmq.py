"""armonik_zmq through its Python-native API: ``LocalCluster`` + ``Client.submit``/``map``/``gather``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import System


class ArmoniKZmq(System):
    name = "armonik_zmq"
    description = "armonik_zmq futures API (cloudpickle calls, durable LMDB broker, 1 agent)"
    requires = ("armonik_zmq",)

    #: calls per broker message in ``map``
    chunksize = 1000

    def start(self, workers: int) -> None:
        import armonik_zmq

        from ..common import broker_args

        self.cluster = armonik_zmq.LocalCluster(n_workers=workers, broker_args=broker_args(), retries=1, timeout=600)
        self.client = self.cluster.__enter__()

    def stop(self) -> None:
        self.cluster.__exit__(None, None, None)

    def version(self) -> str:
        import armonik_zmq

        return armonik_zmq.__version__

    def submit(self, fn: Callable, *args) -> Any:
        return self.client.submit(fn, *args)

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        return self.client.map(fn, *zip(*calls), chunksize=self.chunksize) if calls else []

    def gather(self, handles: Sequence[Any]) -> list:
        return self.client.gather(handles)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def release(self, handles: Sequence[Any]) -> None:
        self.client.release(handles)


ADAPTER = ArmoniKZmq
