"""``ArmoniKSessions``: the sessions service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..common import Session, TaskOptions
from ..protocol import Op
from .connection import Connection
from .filters import Direction, Filter, to_wire_filter, to_wire_sort

__all__ = ["ArmoniKSessions"]


class ArmoniKSessions:
    """Create, inspect and change the status of sessions."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def create_session(self, default_task_options: TaskOptions, partition_ids: Optional[List[str]] = None) -> str:
        """Create a session and return its id.

        Args:
            default_task_options: options of the tasks submitted without their own.
            partition_ids: partitions the session may send tasks to (default: the default partition).
        """
        header, _ = self._conn.call(
            Op.CREATE_SESSION,
            default_task_options=default_task_options.to_wire() if default_task_options is not None else None,
            partition_ids=list(partition_ids or []),
        )
        return header["session_id"]

    def get_session(self, session_id: str) -> Session:
        """Return the session ``session_id``."""
        return self._one(Op.GET_SESSIONS, session_id)

    def list_sessions(self, session_filter: Optional[Filter] = None, page: int = 0, page_size: int = 1000,
                      sort_field: Filter = Session.status,
                      sort_direction: Direction = Direction.ASC) -> Tuple[int, List[Session]]:
        """List sessions: return (how many match the filter, the sessions of the page).

        Args:
            session_filter: which sessions (``Session.status == SessionStatus.RUNNING``, ...); None: all.
            page: the page (0-based).
            page_size: sessions per page (at most 10,000).
            sort_field: the field to sort on (``Session.created_at``, ``Session.options["key"]``, ...).
            sort_direction: ``Direction.ASC`` or ``Direction.DESC``; sessions without the field come last.
        """
        header, _ = self._conn.call(Op.LIST_SESSIONS,
                                    filter=to_wire_filter(session_filter, "session", "session_filter"),
                                    sort=to_wire_sort(sort_field, sort_direction, "session"), page=page,
                                    page_size=page_size)
        return header["total"], [Session.from_wire(s) for s in header["sessions"]]

    def cancel_session(self, session_id: str) -> Session:
        """Cancel a session: its tasks are cancelled (running ones stopped) and nothing may be submitted any more."""
        return self._one(Op.CANCEL_SESSIONS, session_id)

    def pause_session(self, session_id: str) -> Session:
        """Pause a running session: its tasks not started wait PAUSED; running ones finish."""
        return self._one(Op.PAUSE_SESSIONS, session_id)

    def resume_session(self, session_id: str) -> Session:
        """Resume a paused session: its paused tasks go back to the queues (a running session is left as is)."""
        return self._one(Op.RESUME_SESSIONS, session_id)

    def stop_submission_session(self, session_id: str, client: bool, worker: bool) -> Session:
        """Stop clients (``client``) and/or workers (``worker``, subtasks) from submitting tasks to a session."""
        header, _ = self._conn.call(Op.STOP_SUBMISSION, session_ids=[session_id], client=client, worker=worker)
        return Session.from_wire(header["sessions"][0])

    def close_session(self, session_id: str) -> Session:
        """Close a session: no more submissions, running tasks still finish."""
        return self._one(Op.CLOSE_SESSIONS, session_id)

    def purge_session(self, session_id: str) -> Session:
        """Purge a session: delete the data of its results."""
        return self._one(Op.PURGE_SESSIONS, session_id)

    def delete_session(self, session_id: str) -> Session:
        """Delete a session and everything it holds."""
        return self._one(Op.DELETE_SESSIONS, session_id)

    def _one(self, op: Op, session_id: str) -> Session:
        """Apply a batched session op to one session and return its row."""
        header, _ = self._conn.call(op, session_ids=[session_id])
        return Session.from_wire(header["sessions"][0])
