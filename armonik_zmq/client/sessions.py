"""``ArmoniKSessions``: the sessions service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import List, Optional

from ..common import Session, TaskOptions
from ..protocol import Op
from .connection import Connection

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

    def cancel_session(self, session_id: str) -> Session:
        """Cancel a session: its tasks are cancelled and nothing may be submitted any more."""
        return self._one(Op.CANCEL_SESSIONS, session_id)

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
