"""The standard library's ``ProcessPoolExecutor``: no broker, nothing durable, the floor to beat."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any, Callable

from . import System


class ProcessPool(System):
    name = "processpool"
    description = "concurrent.futures.ProcessPoolExecutor (forkserver), submit per task"
    native_deps = False
    dag_note = "no futures as arguments: DAG arguments resolved in the client"

    def start(self, workers: int) -> None:
        self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        # Start the workers now, not inside the first timed run.
        list(self.pool.map(int, range(workers * 4)))

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def version(self) -> str:
        import platform

        return platform.python_version()

    def submit(self, fn: Callable, *args) -> Any:
        return self.pool.submit(fn, *args)

    def result(self, handle: Any) -> Any:
        return handle.result()


ADAPTER = ProcessPool
