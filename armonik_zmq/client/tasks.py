"""``ArmoniKTasks``: the tasks service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..common import Task, TaskDefinition, TaskOptions
from ..protocol import MAX_BATCH, Op
from ..status import TaskStatus
from .connection import Connection
from .filters import Direction, Filter, to_wire_filter, to_wire_sort

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

    def cancel_tasks(self, task_ids: List[str], chunk_size: Optional[int] = 500, *, force: bool = True) -> List[Task]:
        """Cancel tasks and return them as they are now.

        Queued or waiting tasks are CANCELLED at once; running ones are CANCELLING until their agent has
        stopped them. Their outputs are aborted and the tasks depending on those are cancelled too.

        Args:
            task_ids: the tasks.
            chunk_size: tasks per request at least; larger batches are sent since the wire is batched.
            force: kill the worker process of a running task (the agent starts another); False lets the
                run end on its own and drops its outcome (the task is CANCELLED then).
        """
        ids = list(task_ids)
        size = min(max(chunk_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        extra = {} if force else {"force": False}
        replies = self._conn._call_many(Op.CANCEL_TASKS, [({"task_ids": ids[i:i + size], **extra}, ())
                                                          for i in range(0, len(ids), size)])
        return [Task.from_wire(t) for header, _ in replies for t in header["tasks"]]

    def list_tasks(self, task_filter: Optional[Filter] = None, with_errors: bool = False, page: int = 0,
                   page_size: int = 1000, sort_field: Filter = Task.id, sort_direction: Direction = Direction.ASC,
                   detailed: bool = True) -> Tuple[int, List[Task]]:
        """List tasks: return (how many match the filter, the tasks of the page).

        Args:
            task_filter: which tasks (``Task.session_id == ...``, ``Task.options["key"] == ...``); None: all.
            with_errors: fill ``output.error`` of failed tasks (else it is empty; ``output.success`` is right).
            page: the page (0-based).
            page_size: tasks per page (at most 10,000).
            sort_field: the field to sort on (``Task.created_at``, ``Task.options.priority``, ...).
            sort_direction: ``Direction.ASC`` or ``Direction.DESC``; tasks without the field come last.
            detailed: full tasks; else summaries, whose id lists are None and ``count_*`` give their lengths.
        """
        header, _ = self._conn.call(Op.LIST_TASKS, filter=to_wire_filter(task_filter, "task", "task_filter"),
                                    sort=to_wire_sort(sort_field, sort_direction, "task"), page=page,
                                    page_size=page_size, with_errors=with_errors, detailed=detailed)
        return header["total"], [Task.from_wire(t) for t in header["tasks"]]

    def get_result_ids(self, task_ids: List[str], chunk_size: Optional[int] = 500) -> Dict[str, List[str]]:
        """Return the expected output ids of each task.

        ``chunk_size`` is a minimum: bigger batches are sent since the wire is batched.
        """
        ids = list(task_ids)
        size = min(max(chunk_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        requests = [({"task_ids": ids[i:i + size]}, ()) for i in range(0, len(ids), size)]
        return {t["task_id"]: list(t["result_ids"])
                for header, _ in self._conn._call_many(Op.GET_RESULT_IDS, requests) for t in header["task_results"]}

    def count_tasks_by_status(self, task_filter: Optional[Filter] = None) -> Dict[TaskStatus, int]:
        """Return how many tasks matching the filter are in each status (statuses without tasks are left out)."""
        header, _ = self._conn.call(Op.COUNT_TASKS_BY_STATUS,
                                    filter=to_wire_filter(task_filter, "task", "task_filter"))
        return {TaskStatus(status): count for status, count in header["counts"]}
