"""The objects of the official ``armonik`` package (same names, fields and defaults), and their wire form.

Wire rows are msgpack maps whose keys are these field names; timestamps travel as float seconds
since the epoch (``None`` when unset) and durations as float seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional

from .status import EventTypes, ResultStatus, SessionStatus, TaskStatus

__all__ = [
    "TaskOptions", "TaskDefinition", "Task", "Result", "Session", "Partition", "Output",
    "TaskStatus", "ResultStatus", "SessionStatus", "EventTypes",
    "NewTaskEvent", "TaskStatusUpdateEvent", "NewResultEvent", "ResultStatusUpdateEvent",
    "ResultOwnerUpdateEvent", "event_from_wire",
]


def ts(value: Optional[float]) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def dur(value: Optional[float]) -> Optional[timedelta]:
    return None if value is None else timedelta(seconds=value)


class FilterField:
    """An attribute of a record: its value on an instance, a filter on its class (``Task.status == ...``).

    The official package's ``FilterDescriptor``, over ``__slots__``: the value lives in the slot
    ``_<name>``. The filter classes are imported on first use, so importing this module stays cheap.
    """

    __slots__ = ("name", "slot")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = owner.__dict__["_" + name]

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        if instance is None:
            from .client.filters import field_filter

            return field_filter(owner, self.name)
        return self.slot.__get__(instance, owner)

    def __set__(self, instance: Any, value: Any) -> None:
        self.slot.__set__(instance, value)


def _slots(*names: str) -> tuple[str, ...]:
    """Return the slot names behind ``FilterField`` attributes."""
    return tuple("_" + n for n in names)


@dataclass()
class TaskOptions:
    max_duration: timedelta
    priority: int
    max_retries: int
    partition_id: Optional[str] = None
    application_name: Optional[str] = None
    application_version: Optional[str] = None
    application_namespace: Optional[str] = None
    application_service: Optional[str] = None
    engine_type: Optional[str] = None
    options: Dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict:
        d: dict[str, Any] = {
            "max_duration": self.max_duration.total_seconds() if self.max_duration is not None else None,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "options": dict(self.options or {}),
        }
        for name in ("partition_id", "application_name", "application_version", "application_namespace",
                     "application_service", "engine_type"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d

    @classmethod
    def from_wire(cls, d: Optional[dict]) -> Optional["TaskOptions"]:
        if d is None:
            return None
        return cls(
            max_duration=dur(d.get("max_duration")) or timedelta(0),
            priority=d.get("priority") or 0,
            max_retries=d.get("max_retries") or 0,
            partition_id=d.get("partition_id"),
            application_name=d.get("application_name"),
            application_version=d.get("application_version"),
            application_namespace=d.get("application_namespace"),
            application_service=d.get("application_service"),
            engine_type=d.get("engine_type"),
            options=dict(d.get("options") or {}),
        )


@dataclass()
class Output:
    """What a worker's processor returns: ``Output()`` for success, ``Output("message")`` for an error."""

    error: Optional[str] = None

    @property
    def success(self) -> bool:
        return self.error is None


@dataclass()
class TaskDefinition:
    payload_id: str = ""
    expected_output_ids: List[str] = field(default_factory=list)
    data_dependencies: List[str] = field(default_factory=list)
    options: Optional[TaskOptions] = None

    def __post_init__(self):
        if len(self.expected_output_ids) <= 0:
            raise ValueError("expected_output_ids must be not be empty")

    def to_wire(self) -> dict:
        d: dict[str, Any] = {
            "payload_id": self.payload_id,
            "expected_output_ids": list(self.expected_output_ids),
            "data_dependencies": list(self.data_dependencies),
        }
        if self.options is not None:
            d["options"] = self.options.to_wire()
        return d


class Task:
    """A task as ``armonik.common.Task`` describes it (TaskDetailed fields)."""

    __slots__ = _slots(
        "id", "session_id", "owner_pod_id", "initial_task_id", "created_by", "parent_task_ids",
        "data_dependencies", "expected_output_ids", "retry_of_ids", "status", "status_message", "options",
        "created_at", "submitted_at", "received_at", "acquired_at", "fetched_at", "started_at",
        "processed_at", "ended_at", "pod_ttl", "creation_to_end_duration", "processing_to_end_duration",
        "received_to_end_duration", "output", "pod_hostname", "payload_id",
    ) + ("count_parent_task_ids", "count_data_dependencies", "count_expected_output_ids", "count_retry_of_ids")

    id = FilterField()
    session_id = FilterField()
    owner_pod_id = FilterField()
    initial_task_id = FilterField()
    created_by = FilterField()
    parent_task_ids = FilterField()
    data_dependencies = FilterField()
    expected_output_ids = FilterField()
    retry_of_ids = FilterField()
    status = FilterField()
    status_message = FilterField()
    options = FilterField()
    created_at = FilterField()
    submitted_at = FilterField()
    received_at = FilterField()
    acquired_at = FilterField()
    fetched_at = FilterField()
    started_at = FilterField()
    processed_at = FilterField()
    ended_at = FilterField()
    pod_ttl = FilterField()
    creation_to_end_duration = FilterField()
    processing_to_end_duration = FilterField()
    received_to_end_duration = FilterField()
    output = FilterField()
    pod_hostname = FilterField()
    payload_id = FilterField()

    def __init__(self, id: Optional[str] = None, session_id: Optional[str] = None, owner_pod_id: Optional[str] = None,
                 initial_task_id: Optional[str] = None, created_by: Optional[str] = None,
                 parent_task_ids: Optional[List[str]] = None, data_dependencies: Optional[List[str]] = None,
                 expected_output_ids: Optional[List[str]] = None, retry_of_ids: Optional[List[str]] = None,
                 status: TaskStatus = TaskStatus.UNSPECIFIED, status_message: Optional[str] = None,
                 options: Optional[TaskOptions] = None, created_at: Optional[datetime] = None,
                 submitted_at: Optional[datetime] = None, received_at: Optional[datetime] = None,
                 acquired_at: Optional[datetime] = None, fetched_at: Optional[datetime] = None,
                 started_at: Optional[datetime] = None, processed_at: Optional[datetime] = None,
                 ended_at: Optional[datetime] = None, pod_ttl: Optional[datetime] = None,
                 creation_to_end_duration: timedelta = timedelta(0),
                 processing_to_end_duration: timedelta = timedelta(0),
                 received_to_end_duration: timedelta = timedelta(0), output: Optional[Output] = None,
                 pod_hostname: Optional[str] = None, payload_id: Optional[str] = None):
        self._id = id
        self._session_id = session_id
        self._owner_pod_id = owner_pod_id
        self._initial_task_id = initial_task_id
        self._created_by = created_by
        self._parent_task_ids = parent_task_ids
        self._data_dependencies = data_dependencies
        self._expected_output_ids = expected_output_ids
        self._retry_of_ids = retry_of_ids
        self._status = status
        self._status_message = status_message
        self._options = options
        self._created_at = created_at
        self._submitted_at = submitted_at
        self._received_at = received_at
        self._acquired_at = acquired_at
        self._fetched_at = fetched_at
        self._started_at = started_at
        self._processed_at = processed_at
        self._ended_at = ended_at
        self._pod_ttl = pod_ttl
        self._creation_to_end_duration = creation_to_end_duration
        self._processing_to_end_duration = processing_to_end_duration
        self._received_to_end_duration = received_to_end_duration
        self._output = output
        self._pod_hostname = pod_hostname
        self._payload_id = payload_id
        self.count_parent_task_ids = None if parent_task_ids is None else len(parent_task_ids)
        self.count_data_dependencies = None if data_dependencies is None else len(data_dependencies)
        self.count_expected_output_ids = None if expected_output_ids is None else len(expected_output_ids)
        self.count_retry_of_ids = None if retry_of_ids is None else len(retry_of_ids)

    @classmethod
    def from_wire(cls, d: dict) -> "Task":
        """Build a task from a wire row: detailed (with id lists) or a summary (with their counts only)."""
        def span(a: Optional[float], b: Optional[float]) -> timedelta:
            return timedelta(seconds=b - a) if a is not None and b is not None else timedelta(0)

        def ids(name: str) -> Optional[List[str]]:
            value = d.get(name)
            return None if value is None else list(value)

        error = d.get("error")
        status = TaskStatus(d.get("status", 0))
        task = cls(
            id=d.get("task_id"), session_id=d.get("session_id"), owner_pod_id=d.get("owner_pod_id"),
            initial_task_id=d.get("initial_task_id"), created_by=d.get("created_by"),
            parent_task_ids=ids("parent_task_ids"), data_dependencies=ids("data_dependencies"),
            expected_output_ids=ids("expected_output_ids"), retry_of_ids=ids("retry_of_ids"), status=status,
            status_message=d.get("status_message") or "", options=TaskOptions.from_wire(d.get("options")),
            created_at=ts(d.get("created_at")), submitted_at=ts(d.get("submitted_at")),
            received_at=ts(d.get("received_at")), acquired_at=ts(d.get("acquired_at")),
            fetched_at=ts(d.get("fetched_at")), started_at=ts(d.get("started_at")),
            processed_at=ts(d.get("processed_at")), ended_at=ts(d.get("ended_at")), pod_ttl=None,
            creation_to_end_duration=span(d.get("created_at"), d.get("ended_at")),
            processing_to_end_duration=span(d.get("started_at"), d.get("ended_at")),
            received_to_end_duration=span(d.get("received_at"), d.get("ended_at")),
            output=Output(error=error) if status in (TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.TIMEOUT,
                                                     TaskStatus.RETRIED, TaskStatus.CANCELLED) else None,
            pod_hostname=d.get("pod_hostname"), payload_id=d.get("payload_id"),
        )
        for name in ("count_parent_task_ids", "count_data_dependencies", "count_expected_output_ids",
                     "count_retry_of_ids"):
            if name in d:
                setattr(task, name, d[name])
        return task

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self) -> str:
        status = TaskStatus(self.status).name if self.status is not None else None
        return f"Task(id={self.id!r}, status={status}, expected_output_ids={self.expected_output_ids!r})"


#: ResultStatus members by value
_RESULT_STATUSES = {int(s): s for s in ResultStatus}


class Result:
    """A result's metadata (ResultRaw fields)."""

    __slots__ = _slots("session_id", "name", "created_by", "owner_task_id", "status", "created_at", "completed_at",
                       "result_id", "size", "opaque_id") + ("manual_deletion",)

    session_id = FilterField()
    name = FilterField()
    created_by = FilterField()
    owner_task_id = FilterField()
    status = FilterField()
    created_at = FilterField()
    completed_at = FilterField()
    result_id = FilterField()
    size = FilterField()
    opaque_id = FilterField()

    def __init__(self, session_id: Optional[str] = None, name: Optional[str] = None, created_by: Optional[str] = None,
                 owner_task_id: Optional[str] = None, status: ResultStatus = ResultStatus.UNSPECIFIED,
                 created_at: Optional[datetime] = None, completed_at: Optional[datetime] = None,
                 result_id: Optional[str] = None, size: Optional[int] = None, opaque_id: Optional[bytes] = None,
                 manual_deletion: bool = False):
        self._session_id = session_id
        self._name = name
        self._created_by = created_by
        self._owner_task_id = owner_task_id
        self._status = status
        self._created_at = created_at
        self._completed_at = completed_at
        self._result_id = result_id
        self._size = size
        self._opaque_id = opaque_id
        self.manual_deletion = manual_deletion

    @classmethod
    def from_wire(cls, d: dict) -> "Result":
        # positional, and the status from a dict (ResultStatus(n) is an enum call): CREATE_RESULTS and
        # CREATE_RESULTS_METADATA make one per result on the client's thread while the broker waits for its next request
        get = d.get
        status = _RESULT_STATUSES.get(get("status", 0))
        if status is None:
            status = ResultStatus(get("status"))  # not a status: raises, as it always did
        return cls(get("session_id"), get("name"), get("created_by") or "", get("owner_task_id") or "",
                   status, ts(get("created_at")),
                   ts(get("completed_at")), get("result_id"), get("size", 0), get("opaque_id") or b"",
                   bool(get("manual_deletion", False)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Result) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self) -> str:
        return f"Result(result_id={self.result_id!r}, name={self.name!r}, status={ResultStatus(self.status).name})"


class Session:
    """A session (SessionRaw fields)."""

    __slots__ = _slots("session_id", "status", "client_submission", "worker_submission", "partition_ids", "options",
                       "created_at", "cancelled_at", "closed_at", "purged_at", "deleted_at", "duration")

    session_id = FilterField()
    status = FilterField()
    client_submission = FilterField()
    worker_submission = FilterField()
    partition_ids = FilterField()
    options = FilterField()
    created_at = FilterField()
    cancelled_at = FilterField()
    closed_at = FilterField()
    purged_at = FilterField()
    deleted_at = FilterField()
    duration = FilterField()

    def __init__(self, session_id: Optional[str] = None, status: SessionStatus = SessionStatus.UNSPECIFIED,
                 client_submission: Optional[bool] = None, worker_submission: Optional[bool] = None,
                 partition_ids: Optional[List[str]] = None, options: Optional[TaskOptions] = None,
                 created_at: Optional[datetime] = None, cancelled_at: Optional[datetime] = None,
                 closed_at: Optional[datetime] = None, purged_at: Optional[datetime] = None,
                 deleted_at: Optional[datetime] = None, duration: Optional[timedelta] = None):
        self._session_id = session_id
        self._status = status
        self._client_submission = client_submission
        self._worker_submission = worker_submission
        self._partition_ids = partition_ids if partition_ids is not None else []
        self._options = options
        self._created_at = created_at
        self._cancelled_at = cancelled_at
        self._closed_at = closed_at
        self._purged_at = purged_at
        self._deleted_at = deleted_at
        self._duration = duration

    @classmethod
    def from_wire(cls, d: dict) -> "Session":
        return cls(
            session_id=d.get("session_id"), status=SessionStatus(d.get("status", 0)),
            client_submission=d.get("client_submission"), worker_submission=d.get("worker_submission"),
            partition_ids=list(d.get("partition_ids") or []), options=TaskOptions.from_wire(d.get("options")),
            created_at=ts(d.get("created_at")), cancelled_at=ts(d.get("cancelled_at")),
            closed_at=ts(d.get("closed_at")), purged_at=ts(d.get("purged_at")),
            deleted_at=ts(d.get("deleted_at")), duration=dur(d.get("duration")),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self) -> str:
        return f"Session(session_id={self.session_id!r}, status={SessionStatus(self.status).name})"


class Partition:
    """A partition (PartitionRaw fields); only ``id`` drives behaviour, the others are informative."""

    __slots__ = _slots("id", "parent_partition_ids", "pod_reserved", "pod_max", "pod_configuration",
                       "preemption_percentage", "priority")

    id = FilterField()
    parent_partition_ids = FilterField()
    pod_reserved = FilterField()
    pod_max = FilterField()
    pod_configuration = FilterField()
    preemption_percentage = FilterField()
    priority = FilterField()

    def __init__(self, id: str, parent_partition_ids: List[str], pod_reserved: int, pod_max: int,
                 pod_configuration: Dict[str, str], preemption_percentage: int, priority: int):
        self.id = id
        self.parent_partition_ids = parent_partition_ids
        self.pod_reserved = pod_reserved
        self.pod_max = pod_max
        self.pod_configuration = pod_configuration
        self.preemption_percentage = preemption_percentage
        self.priority = priority

    @classmethod
    def from_wire(cls, d: dict) -> "Partition":
        return cls(id=d["id"], parent_partition_ids=list(d.get("parent_partition_ids") or []),
                   pod_reserved=d.get("pod_reserved", 0), pod_max=d.get("pod_max", 0),
                   pod_configuration=dict(d.get("pod_configuration") or {}),
                   preemption_percentage=d.get("preemption_percentage", 0), priority=d.get("priority", 0))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Partition) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self) -> str:
        return f"Partition(id={self.id!r}, priority={self.priority})"


# -- events (armonik.common.events) --------------------------------------------------------


@dataclass
class TaskStatusUpdateEvent:
    task_id: str
    status: TaskStatus


@dataclass
class ResultStatusUpdateEvent:
    result_id: str
    status: ResultStatus


@dataclass
class ResultOwnerUpdateEvent:
    result_id: str
    previous_owner_id: str
    current_owner_id: str


@dataclass
class NewTaskEvent:
    task_id: str
    payload_id: str
    origin_task_id: str
    status: TaskStatus
    expected_output_keys: List[str]
    data_dependencies: List[str]
    retry_of_ids: List[str]
    parent_task_ids: List[str]


@dataclass
class NewResultEvent:
    result_id: str
    owner_id: str
    status: ResultStatus


_EVENT_CLASSES = {
    EventTypes.NEW_TASK: NewTaskEvent,
    EventTypes.TASK_STATUS_UPDATE: TaskStatusUpdateEvent,
    EventTypes.NEW_RESULT: NewResultEvent,
    EventTypes.RESULT_STATUS_UPDATE: ResultStatusUpdateEvent,
    EventTypes.RESULT_OWNER_UPDATE: ResultOwnerUpdateEvent,
}


def event_from_wire(event_type: int, body: dict):
    """Build the event object of one ``[event_type, body]`` pair of an EVENT push."""
    etype = EventTypes(event_type)
    if "data" in body:  # a completed result's inline data (``Subscription.get_batch`` gives it): not an event field
        body = {k: v for k, v in body.items() if k != "data"}
    obj = _EVENT_CLASSES[etype](**body)
    if hasattr(obj, "status"):
        obj.status = (TaskStatus if etype in (EventTypes.NEW_TASK, EventTypes.TASK_STATUS_UPDATE) else ResultStatus)(obj.status)
    return etype, obj
