"""The processor agents run by default: calls of the futures API go to the function processor,
every other payload to the demo's processor.

``with_functions(my_processor)`` gives any worker module the same routing, so a cluster running
``mypkg.tasks:processor = with_functions(handle)`` serves both its ArmoniK-style tasks and
``armonik_zmq.Client.submit``. Calls are recognised by ``functions.PAYLOAD_MAGIC``, a prefix no
JSON, text or pickle payload starts with.
"""

from __future__ import annotations

from typing import Callable

from . import demo, functions
from .common import Output


def with_functions(fallback: Callable[..., Output]) -> Callable[..., Output]:
    """Return a processor that runs pickled calls itself and hands every other task to ``fallback``."""

    def processor(task_handler) -> Output:
        if functions.is_call(task_handler.payload):
            return functions.processor(task_handler)
        return fallback(task_handler)

    processor.__wrapped__ = fallback
    processor.__doc__ = f"Pickled calls -> armonik_zmq.functions; other payloads -> {fallback.__module__}.{fallback.__qualname__}."
    return processor


#: the default processor of ``armonik-zmq agent`` and ``up``
processor = with_functions(demo.processor)
