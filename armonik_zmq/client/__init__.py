"""The client: a ``Connection`` to the broker and the four ArmoniK services on top of it.

Ported ArmoniK code changes its imports and replaces the gRPC channel by a connection::

    with connect() as conn:
        sessions, results = ArmoniKSessions(conn), ArmoniKResults(conn)
"""

from ..common import (
    NewResultEvent,
    NewTaskEvent,
    Output,
    Partition,
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
from .filters import (ArrayFilter, BooleanFilter, DateFilter, Direction, DurationFilter, Filter, FilterError,
                      NumberFilter, StatusFilter, StringFilter)
from .health_checks import ArmoniKHealthChecks, ServiceHealthCheckStatus
from .partitions import ArmoniKPartitions
from .results import ArmoniKResults
from .sessions import ArmoniKSessions
from .tasks import ArmoniKTasks
from .versions import ArmoniKVersions

__all__ = [
    "connect", "Connection", "ConnectionLostError", "Subscription",
    "ArmoniKSessions", "ArmoniKResults", "ArmoniKTasks", "ArmoniKEvents",
    "ArmoniKPartitions", "ArmoniKVersions", "ArmoniKHealthChecks", "ServiceHealthCheckStatus",
    "Direction", "Filter", "FilterError", "StringFilter", "StatusFilter", "DateFilter", "NumberFilter",
    "BooleanFilter", "ArrayFilter", "DurationFilter",
    "TaskOptions", "TaskDefinition", "Task", "Result", "Session", "Partition", "Output",
    "TaskStatus", "ResultStatus", "SessionStatus", "EventTypes",
    "NewTaskEvent", "TaskStatusUpdateEvent", "NewResultEvent", "ResultStatusUpdateEvent", "ResultOwnerUpdateEvent",
]
