"""The client: a ``Connection`` to the broker and the four ArmoniK services on top of it.

Ported ArmoniK code changes its imports and replaces the gRPC channel by a connection::

    with connect() as conn:
        sessions, results = ArmoniKSessions(conn), ArmoniKResults(conn)
"""

from ..common import (
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
from ..status import EventTypes, ResultStatus, SessionStatus, TaskStatus
from ..errors import ConnectionLostError
from .connection import Connection, Subscription, connect
from .events import ArmoniKEvents
from .results import ArmoniKResults
from .sessions import ArmoniKSessions
from .tasks import ArmoniKTasks

__all__ = [
    "connect", "Connection", "ConnectionLostError", "Subscription",
    "ArmoniKSessions", "ArmoniKResults", "ArmoniKTasks", "ArmoniKEvents",
    "TaskOptions", "TaskDefinition", "Task", "Result", "Session", "Output",
    "TaskStatus", "ResultStatus", "SessionStatus", "EventTypes",
    "NewTaskEvent", "TaskStatusUpdateEvent", "NewResultEvent", "ResultStatusUpdateEvent", "ResultOwnerUpdateEvent",
]
