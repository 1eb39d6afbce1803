"""Typing stub of the Cython dispatch core (``_core.pyx``): slots in, slots out.

Every slot argument must be a live slot of its kind, else ValueError (TypeError if not an int).
"""

from typing import Final, Iterable, Optional, SupportsIndex

STATE_FREE: Final[int]
STATE_WAITING: Final[int]
STATE_QUEUED: Final[int]
STATE_DISPATCHED: Final[int]
STATE_DEAD: Final[int]
PRIORITY_MIN: Final[int]
PRIORITY_MAX: Final[int]
#: partitions are 0 .. MAX_PARTITIONS - 1
MAX_PARTITIONS: Final[int]

class Core:
    """Dependency counts, ready queues and agent credit of one broker."""

    def __init__(self) -> None: ...

    # results
    def new_result(self) -> int:
        """Allocate a result slot whose data is not available yet."""
    def free_result(self, r: SupportsIndex) -> None:
        """Recycle a result slot; ValueError while a task still waits on it."""
    def result_waiters(self, r: SupportsIndex) -> list[int]:
        """Return the task slots waiting on r, in registration order."""
    def on_result_ready(self, r: SupportsIndex) -> list[int]:
        """Mark r available; return the tasks that became ready (now queued), in registration order.

        Idempotent; ValueError if r was aborted.
        """
    def on_result_aborted(self, r: SupportsIndex) -> list[int]:
        """Mark r as never available; return its waiting tasks, now DEAD and waiting on nothing.

        Idempotent; ValueError if r is ready.
        """

    # tasks
    def add_task(self, partition: SupportsIndex, priority: SupportsIndex, missing: Iterable[SupportsIndex]) -> int:
        """Allocate a task waiting for the distinct pending results in ``missing``; queued at once if none.

        Ready results in ``missing`` are ignored; an aborted one is a ValueError. Nothing changes on error.
        """
    def add_held_task(self, partition: SupportsIndex, priority: SupportsIndex, a: SupportsIndex) -> int:
        """Allocate a task agent a already holds (DISPATCHED; the broker reloading); ValueError if a has no credit."""
    def missing(self, t: SupportsIndex) -> int: ...
    def state(self, t: SupportsIndex) -> int:
        """Return a STATE_* constant; a freed (in range) slot reports STATE_FREE."""
    def priority(self, t: SupportsIndex) -> int: ...
    def partition(self, t: SupportsIndex) -> int: ...
    def owner(self, t: SupportsIndex) -> int:
        """Return the agent slot holding t, or -1."""
    def cancel_task(self, t: SupportsIndex) -> None:
        """Take t out of waiter lists, its queue and its agent; it becomes DEAD (a no-op if already DEAD)."""
    def free_task(self, t: SupportsIndex) -> None:
        """Forget t in any state; its agent gets the credit back; the slot is recycled."""
    def requeue(self, t: SupportsIndex) -> None:
        """Put dispatched t back at the front of its priority bucket; ValueError if not DISPATCHED."""
    def adopt(self, t: SupportsIndex, a: SupportsIndex) -> None:
        """Give queued (or another agent's dispatched) t to agent a; ValueError if a has no credit left."""

    # agents
    def add_agent(self, partitions: Iterable[SupportsIndex], capacity: SupportsIndex) -> int:
        """Register an agent; partitions non-empty (duplicates ignored), capacity >= 1."""
    def remove_agent(self, a: SupportsIndex) -> list[int]:
        """Forget a; return the tasks it held (dispatch order), requeued at the front in that order."""
    def agent_held(self, a: SupportsIndex) -> list[int]:
        """Return the tasks a holds, in dispatch order."""
    def set_agent_capacity(self, a: SupportsIndex, capacity: SupportsIndex) -> None:
        """a may hold up to capacity (>= 1) tasks; below what it holds, it comes down as they end."""
    def agent_credit(self, a: SupportsIndex) -> int: ...

    # dispatch
    def dispatch(self, max_tasks: SupportsIndex = -1) -> list[tuple[int, int]]:
        """Hand ready tasks to agents with credit, one at a time round-robin; negative: no limit."""

    # introspection
    def n_ready(self, partition: SupportsIndex = -1) -> int: ...
    def n_waiting(self) -> int: ...
    def n_dispatched(self) -> int: ...
    def n_tasks(self) -> int: ...
    def validate(self) -> None:
        """Check every invariant; AssertionError naming the broken one."""

# ids (armonik_zmq/ids.py documents the layout)
def new_id() -> str:
    """Return a new version 7 UUID string; ids made by one process sort in the order they were made."""
def reset_id_pool() -> None:
    """Forget the random bytes drawn so far (a forked child must draw its own)."""

# the worker's alarm (worker/alarm.py)
def timerfd_at(fd: int, deadline: float) -> None:
    """Arm timerfd ``fd`` at ``deadline`` (absolute monotonic seconds), or disarm it (0); OSError on failure."""

# Link framing (worker/link.py)
def link_cut(buf: bytes | bytearray, pos: int, end: int, max_frames: int, max_header: int, max_frame: int,
             out: list) -> tuple[int, Optional[tuple[int, ...]]]:
    """Append each complete message of buf[pos:end] to out; return where the first incomplete one starts, and its
    frame sizes once its size table is whole (else None)."""
def link_prefix(frames: Iterable) -> tuple[bytes, int]:
    """The size table that starts a link message of frames, and the message's size."""
