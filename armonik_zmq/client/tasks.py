"""``ArmoniKTasks``: the tasks service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import List, Optional

from ..common import Task, TaskDefinition, TaskOptions
from ..protocol import MAX_BATCH, Op
from .connection import Connection

__all__ = ["ArmoniKTasks"]

#: Tasks per SUBMIT_TASKS message at least: the wire is batched, so fewer round trips is faster.
_MIN_WIRE_BATCH = 10_000


class ArmoniKTasks:
    """Submit tasks and inspect them."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def submit_tasks(self, session_id: str, tasks: List[TaskDefinition],
                     default_task_options: Optional[TaskOptions] = None,
                     chunk_size: Optional[int] = 100) -> List[Task]:
        """Submit tasks to a session and return them (id, session, payload, dependencies, outputs).

        Args:
            session_id: the session.
            tasks: the task definitions.
            default_task_options: options of the tasks that have none (else the session's).
            chunk_size: tasks per request at least; larger batches are sent since the wire is batched.
        """
        tasks = list(tasks)
        if not tasks:
            return []
        size = min(max(chunk_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        options = default_task_options.to_wire() if default_task_options is not None else None
        requests = []
        for start in range(0, len(tasks), size):
            fields = {"session_id": session_id, "tasks": [t.to_wire() for t in tasks[start:start + size]]}
            if options is not None:
                fields["task_options"] = options
            requests.append((fields, ()))
        submitted = []
        # Pipelined: every batch leaves before the first reply is awaited.
        for header, _ in self._conn._call_many(Op.SUBMIT_TASKS, requests):
            submitted.extend(
                Task(id=t["task_id"], session_id=session_id, expected_output_ids=list(t["expected_output_ids"]),
                     data_dependencies=list(t["data_dependencies"]), payload_id=t["payload_id"])
                for t in header["tasks"])
        return submitted

    def get_task(self, task_id: str) -> Task:
        """Return the task ``task_id`` with all its details."""
        header, _ = self._conn.call(Op.GET_TASKS, task_ids=[task_id])
        return Task.from_wire(header["tasks"][0])
