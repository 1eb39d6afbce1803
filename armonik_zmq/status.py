"""ArmoniK's statuses (same names and numbers) and the one table of legal task transitions.

The numbers are part of the wire protocol and of the LMDB rows: never renumber them.
The Cython core has states of its own (waiting, queued, dispatched); only the broker speaks these.
"""

from __future__ import annotations

from enum import IntEnum


class SessionStatus(IntEnum):
    UNSPECIFIED = 0
    RUNNING = 1
    CANCELLED = 2
    PAUSED = 3
    CLOSED = 4
    PURGED = 5
    DELETED = 6


class TaskStatus(IntEnum):
    UNSPECIFIED = 0
    CREATING = 1
    SUBMITTED = 2
    DISPATCHED = 3
    COMPLETED = 4
    ERROR = 5
    TIMEOUT = 6
    CANCELLING = 7
    CANCELLED = 8
    PROCESSING = 9
    PROCESSED = 10
    RETRIED = 11
    PENDING = 12
    PAUSED = 13


class ResultStatus(IntEnum):
    UNSPECIFIED = 0
    CREATED = 1
    COMPLETED = 2
    ABORTED = 3
    DELETED = 4
    NOTFOUND = 127


class EventTypes(IntEnum):
    """ArmoniK's ``EVENTS_ENUM_*`` values."""

    UNSPECIFIED = 0
    NEW_TASK = 1
    TASK_STATUS_UPDATE = 2
    NEW_RESULT = 3
    RESULT_STATUS_UPDATE = 4
    RESULT_OWNER_UPDATE = 5

    @classmethod
    def from_string(cls, name: str) -> "EventTypes":
        return getattr(cls, name.upper())


def as_ints(enum: type[IntEnum]) -> type:
    """Return a class holding ``enum``'s members as plain int attributes, for the broker's hot path.

    Reading an enum member (``TaskStatus.SUBMITTED``) runs Python code (~100 ns), and the broker compares
    statuses many times per task; reading a class attribute is a dict lookup. Numbers and names are the enum's.
    """
    return type(f"{enum.__name__}Ints", (), {m.name: int(m) for m in enum})


#: A task in one of these states never changes again.
TASK_FINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.TIMEOUT, TaskStatus.CANCELLED, TaskStatus.RETRIED}
)

_T = TaskStatus

#: Every legal task transition (ArmoniK Core's lifecycle, ARMONIK.md 1.2 and 3.x).
#: ``Broker`` changes a task's status only through ``check_task_transition``.
TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    _T.CREATING: frozenset({_T.PENDING, _T.SUBMITTED, _T.CANCELLED, _T.ERROR, _T.PAUSED}),
    _T.PENDING: frozenset({_T.SUBMITTED, _T.ERROR, _T.CANCELLING, _T.CANCELLED, _T.PAUSED}),
    _T.SUBMITTED: frozenset({_T.DISPATCHED, _T.ERROR, _T.CANCELLING, _T.CANCELLED, _T.PAUSED}),
    # DISPATCHED -> SUBMITTED: the owner agent was lost or gave the task back.
    _T.DISPATCHED: frozenset(
        {_T.PROCESSING, _T.SUBMITTED, _T.COMPLETED, _T.ERROR, _T.TIMEOUT, _T.RETRIED,
         _T.CANCELLING, _T.CANCELLED, _T.PAUSED}
    ),
    _T.PROCESSING: frozenset(
        {_T.PROCESSED, _T.COMPLETED, _T.ERROR, _T.TIMEOUT, _T.RETRIED, _T.SUBMITTED,
         _T.CANCELLING, _T.CANCELLED}
    ),
    _T.PROCESSED: frozenset({_T.COMPLETED, _T.ERROR}),
    # PAUSED -> ERROR: an input was aborted while the task was paused (found when it is resumed).
    _T.PAUSED: frozenset({_T.SUBMITTED, _T.PENDING, _T.CANCELLING, _T.CANCELLED, _T.ERROR}),
    _T.CANCELLING: frozenset({_T.CANCELLED}),
    _T.COMPLETED: frozenset(),
    _T.ERROR: frozenset(),
    _T.TIMEOUT: frozenset(),
    _T.CANCELLED: frozenset(),
    _T.RETRIED: frozenset(),
}


class IllegalTransition(Exception):
    """Raised when code tries a task transition that ArmoniK does not allow (a bug, not bad input)."""


def check_task_transition(old: int, new: int) -> None:
    if new not in TASK_TRANSITIONS.get(old, ()):  # an int finds its IntEnum key: no enum made per transition
        raise IllegalTransition(f"task cannot go from {TaskStatus(old).name} to {TaskStatus(new).name}")
