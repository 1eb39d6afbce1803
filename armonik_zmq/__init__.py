"""armonik_zmq: a task orchestrator with ArmoniK's semantics (ZeroMQ broker, LMDB tables, Cython core).

Importing the package is cheap: the client (and ZeroMQ) load on first use of ``connect`` or of a
client class.
"""

from typing import TYPE_CHECKING, Optional

from .common import (
    NewResultEvent,
    NewTaskEvent,
    Output,
    Result,
    ResultOwnerUpdateEvent,
    ResultStatusUpdateEvent,
    Session,
    Task,
    TaskDefinition,
    TaskOptions,
    TaskStatusUpdateEvent,
)
from .status import EventTypes, ResultStatus, SessionStatus, TaskStatus

if TYPE_CHECKING:
    from .client import ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, Connection
    from .futures import Client, Future, LocalCluster, as_completed, wait
    from .subtasks import get_client, worker_client

__version__ = "0.1.0"

__all__ = [
    "__version__", "connect", "Connection", "Client", "Future", "LocalCluster", "as_completed", "wait",
    "get_client", "worker_client",
    "ArmoniKSessions", "ArmoniKResults", "ArmoniKTasks", "ArmoniKEvents",
    "TaskOptions", "TaskDefinition", "Task", "Result", "Session", "Output",
    "TaskStatus", "ResultStatus", "SessionStatus", "EventTypes",
    "NewTaskEvent", "TaskStatusUpdateEvent", "NewResultEvent", "ResultStatusUpdateEvent", "ResultOwnerUpdateEvent",
]

_LAZY = frozenset({"Connection", "ArmoniKSessions", "ArmoniKResults", "ArmoniKTasks", "ArmoniKEvents"})
#: the futures API, loaded on first use too
_LAZY_FUTURES = frozenset({"Client", "Future", "LocalCluster", "as_completed", "wait"})


def connect(endpoint: Optional[str] = None, *, timeout: float = 30.0) -> "Connection":
    """Open a connection to the broker at ``endpoint`` (default: env ``ARMONIK_ZMQ_ENDPOINT``, else ``tcp://127.0.0.1:5555``).

    Connecting is asynchronous, like a gRPC channel: requests queue until the broker is reachable,
    and a call that gets no reply within ``timeout`` seconds raises ``BrokerUnavailableError``.
    """
    from .client.connection import connect as _connect

    return _connect(endpoint, timeout=timeout)


def __getattr__(name: str):
    """Load the client classes on first use, so importing the package does not import ZeroMQ."""
    if name in ("get_client", "worker_client"):
        from . import subtasks

        return getattr(subtasks, name)
    if name in _LAZY:
        from . import client

        return getattr(client, name)
    if name in _LAZY_FUTURES:
        from . import futures

        return getattr(futures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
