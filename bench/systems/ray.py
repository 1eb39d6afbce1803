"""Ray: ``ray.init(num_cpus=workers)``, one remote function per Python function."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import System


class Ray(System):
    name = "ray"
    description = "ray.init(num_cpus=N) local, @ray.remote tasks, ObjectRefs as arguments"
    requires = ("ray",)

    def start(self, workers: int) -> None:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
        self._remote: dict[Callable, Any] = {}

    def stop(self) -> None:
        import ray

        ray.shutdown()

    def version(self) -> str:
        import ray

        return ray.__version__

    def _fn(self, fn: Callable):
        remote = self._remote.get(fn)
        if remote is None:
            import ray

            remote = self._remote[fn] = ray.remote(fn)
        return remote

    def submit(self, fn: Callable, *args) -> Any:
        return self._fn(fn).remote(*args)

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        remote = self._fn(fn)
        return [remote.remote(*call) for call in calls]

    def gather(self, handles: Sequence[Any]) -> list:
        import ray

        return ray.get(list(handles))

    def result(self, handle: Any) -> Any:
        import ray

        return ray.get(handle)


ADAPTER = Ray
