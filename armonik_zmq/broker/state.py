"""The broker's state machine: every task and result transition is written here, and only here.

LMDB holds the truth; the Cython core holds the in-memory view the hot path needs (missing
dependency counts, the result -> waiting tasks index, ready queues, who holds what). External string
ids map to the core's dense int slots in the dicts below, and only for live objects: a task has a
slot until it ends, a result only while some task waits for its data.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterable, Optional

from .._core import Core
from ..protocol import ErrorCode, ProtocolError
from ..status import ResultStatus, SessionStatus, TaskStatus, TASK_FINAL, check_task_transition
from . import options as task_options
from .events import EventBus
from .store import Txn

log = logging.getLogger(__name__)

_R = ResultStatus
_T = TaskStatus
#: result statuses a task may depend on (data now, or later)
_USABLE = (_R.CREATED, _R.COMPLETED)
#: timestamp recorded when a task enters a status
_STAMP = {_T.SUBMITTED: "submitted_at", _T.DISPATCHED: "acquired_at", _T.PROCESSING: "started_at",
          _T.COMPLETED: "ended_at", _T.ERROR: "ended_at", _T.TIMEOUT: "ended_at", _T.CANCELLED: "ended_at",
          _T.RETRIED: "ended_at"}


def new_id() -> str:
    return str(uuid.uuid4())


def not_found(kind: str, ident: str, session_id: Optional[str] = None) -> ProtocolError:
    where = f" in session {session_id}" if session_id else ""
    return ProtocolError(ErrorCode.NOT_FOUND, f"{kind} {ident} not found{where}")


class BrokerState:
    def __init__(self, partitions: Iterable[str], events: EventBus):
        self.core = Core()
        self.events = events
        self.partitions = list(partitions)
        self.partition_slot = {p: i for i, p in enumerate(self.partitions)}
        self.task_slot: dict[str, int] = {}
        self.slot_task: dict[int, str] = {}
        self.result_slot: dict[str, int] = {}
        self.session_status: dict[str, int] = {}

    # -- sessions ------------------------------------------------------------------------------

    def require_session(self, txn: Txn, session_id: str) -> dict:
        row = txn.get_session(session_id)
        if row is None:
            raise not_found("session", session_id)
        return row

    def put_session(self, txn: Txn, row: dict) -> None:
        txn.put_session(row)
        self.session_status[row["session_id"]] = row["status"]

    # -- results -------------------------------------------------------------------------------

    def new_result_row(self, session_id: str, name: str, *, manual_deletion: bool = False, created_by: str = "",
                       result_id: Optional[str] = None, now: float) -> dict:
        return {
            "result_id": result_id or new_id(), "session_id": session_id, "name": name, "owner_task_id": "",
            "created_by": created_by, "completed_by": "", "status": int(_R.CREATED), "created_at": now,
            "completed_at": None, "size": 0, "opaque_id": b"", "manual_deletion": manual_deletion,
        }

    def insert_result(self, txn: Txn, row: dict) -> None:
        txn.put_result(row, new=True)
        self.events.new_result(row)

    def require_result(self, txn: Txn, result_id: str, session_id: str) -> dict:
        row = txn.get_result(result_id)
        if row is None or row["session_id"] != session_id:
            raise not_found("result", result_id, session_id)
        return row

    def complete_result(self, txn: Txn, row: dict, data, completed_by: str, now: float) -> None:
        """Store a result's data, mark it COMPLETED and queue the tasks that were waiting only for it."""
        txn.put_data(row["result_id"], data)
        row["status"] = int(_R.COMPLETED)
        row["size"] = len(data)
        row["completed_at"] = now
        row["completed_by"] = completed_by
        txn.put_result(row)
        self.events.result_status(row)
        slot = self.result_slot.pop(row["result_id"], None)
        if slot is None:
            return
        for t in self.core.on_result_ready(slot):
            trow = txn.get_task(self.slot_task[t])
            self.set_task_status(txn, trow, _T.SUBMITTED, now)
        self.core.free_result(slot)

    # -- tasks ---------------------------------------------------------------------------------

    def set_task_status(self, txn: Txn, row: dict, status: TaskStatus, now: float, message: Optional[str] = None) -> None:
        """Move a task to ``status`` (checked against status.TASK_TRANSITIONS), stamp it, store it, tell subscribers."""
        check_task_transition(row["status"], status)
        row["status"] = int(status)
        stamp = _STAMP.get(status)
        if stamp:
            row[stamp] = now
        if message is not None:
            row["status_message"] = message
        txn.put_task(row)
        self.events.task_status(row)

    def require_task(self, txn: Txn, task_id: str) -> dict:
        row = txn.get_task(task_id)
        if row is None:
            raise not_found("task", task_id)
        return row

    def _task_ended(self, task_id: str) -> None:
        slot = self.task_slot.pop(task_id, None)
        if slot is not None:
            del self.slot_task[slot]
            self.core.free_task(slot)

    def create_tasks(self, txn: Txn, session: dict, creations: list[dict], request_options: Optional[dict], now: float,
                     *, parent: Optional[dict] = None, task_ids: Optional[list[str]] = None) -> list[dict]:
        """Create tasks (from a client, or a worker's subtasks when ``parent`` is given), all or nothing.

        Every check runs before anything is written, so a refused batch leaves no trace.
        """
        sid = session["session_id"]
        where_prefix = "subtask" if parent else "task"
        session_defaults = session.get("options")
        plans = []
        claimed: set[str] = set()
        for i, c in enumerate(creations):
            where = f"{where_prefix} {i}"
            opts = task_options.validate(task_options.merge(c.get("options"), request_options, session_defaults),
                                         session["partition_ids"], where)
            if opts["partition_id"] not in self.partition_slot:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                    f"{where}: partition '{opts['partition_id']}' is not served by this broker "
                                    f"(known: {self.partitions})")
            inputs = [c["payload_id"], *c.get("data_dependencies", ())]
            missing = []
            for rid in inputs:
                rrow = self.require_result(txn, rid, sid)
                if rrow["status"] not in _USABLE:
                    raise ProtocolError(ErrorCode.ABORTED, f"{where}: input result {rid} is "
                                        f"{_R(rrow['status']).name} and will never have data")
                if rrow["status"] == _R.CREATED and rid not in missing:
                    missing.append(rid)
            outputs = []
            for rid in c["expected_output_ids"]:
                rrow = self.require_result(txn, rid, sid)
                if rrow["status"] != _R.CREATED:
                    raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"{where}: expected output {rid} is "
                                        f"{_R(rrow['status']).name}; an output must not have data yet")
                outputs.append(rrow)
            plans.append((c, opts, missing, outputs))
        infos = []
        for i, (c, opts, missing, outputs) in enumerate(plans):
            tid = task_ids[i] if task_ids else new_id()
            row = {
                "task_id": tid, "session_id": sid, "owner_pod_id": "", "pod_hostname": "", "initial_task_id": tid,
                "created_by": parent["task_id"] if parent else "",
                "parent_task_ids": (parent["parent_task_ids"] + [parent["task_id"]]) if parent else [],
                "payload_id": c["payload_id"], "data_dependencies": list(c.get("data_dependencies", ())),
                "expected_output_ids": list(c["expected_output_ids"]), "retry_of_ids": [],
                "status": int(_T.PENDING if missing else _T.SUBMITTED), "status_message": "", "error": None,
                "options": opts, "attempt": 0, "created_at": now, "submitted_at": None if missing else now,
                "received_at": None, "acquired_at": None, "fetched_at": None, "started_at": None,
                "processed_at": None, "ended_at": None,
            }
            txn.put_task(row, new=True)
            self.events.new_task(row)
            for rrow in outputs:
                # ArmoniK 3.8: a result without owner goes to its new producer; a parent's output moves to
                # the child that lists it (the parent then completes without writing it).
                previous = rrow["owner_task_id"]
                if (not previous and rrow["result_id"] not in claimed) or (parent and previous == parent["task_id"]):
                    claimed.add(rrow["result_id"])
                    rrow["owner_task_id"] = tid
                    txn.put_result(rrow)
                    self.events.result_owner(rrow, previous)
            slots = []
            for rid in missing:
                slot = self.result_slot.get(rid)
                if slot is None:
                    slot = self.result_slot[rid] = self.core.new_result()
                slots.append(slot)
            tslot = self.core.add_task(self.partition_slot[opts["partition_id"]], opts["priority"], slots)
            self.task_slot[tid] = tslot
            self.slot_task[tslot] = tid
            infos.append({"task_id": tid, "payload_id": row["payload_id"],
                          "data_dependencies": row["data_dependencies"], "expected_output_ids": row["expected_output_ids"]})
        return infos

    def end_task(self, txn: Txn, row: dict, status: TaskStatus, now: float, message: str) -> None:
        """End a task without success (ERROR, TIMEOUT, CANCELLED): abort its outputs and fail what waits on them."""
        work = [(row, status, message)]
        while work:
            trow, st, msg = work.pop()
            trow["error"] = msg
            self.set_task_status(txn, trow, st, now, msg)
            self._task_ended(trow["task_id"])
            reason = f"task {trow['task_id']} ended in {TaskStatus(st).name}: {msg}"
            for rid in trow["expected_output_ids"]:
                rrow = txn.get_result(rid)
                if rrow is None or rrow["owner_task_id"] != trow["task_id"] or rrow["status"] != _R.CREATED:
                    continue
                rrow["status"] = int(_R.ABORTED)
                txn.put_result(rrow)
                self.events.result_status(rrow)
                slot = self.result_slot.pop(rid, None)
                if slot is None:
                    continue
                for t in self.core.on_result_aborted(slot):
                    dep_id = self.slot_task[t]
                    dep = txn.get_task(dep_id)
                    dep_status = _T.CANCELLED if st == _T.CANCELLED else _T.ERROR
                    work.append((dep, dep_status, f"input result {rid} was aborted because {reason}"))
                self.core.free_result(slot)

    # -- restart ---------------------------------------------------------------------------------

    def rebuild(self, txn: Txn, now: float) -> dict:
        """Rebuild queues and dependency counts from LMDB after a restart; return counts for the log."""
        for s in txn.iter_sessions():
            self.session_status[s["session_id"]] = s["status"]
        counts = {"pending": 0, "queued": 0, "requeued": 0, "failed": 0}
        to_fail = []
        for row in txn.iter_tasks():
            status = row["status"]
            if status in TASK_FINAL:
                continue
            tid = row["task_id"]
            opts = row["options"]
            slots = []
            aborted = None
            if status == _T.PENDING:
                for rid in dict.fromkeys([row["payload_id"], *row["data_dependencies"]]):
                    rrow = txn.get_result(rid)
                    rst = rrow["status"] if rrow else _R.NOTFOUND
                    if rst == _R.CREATED:
                        slot = self.result_slot.get(rid)
                        if slot is None:
                            slot = self.result_slot[rid] = self.core.new_result()
                        slots.append(slot)
                    elif rst != _R.COMPLETED:
                        aborted = rid
                if aborted is not None:
                    to_fail.append((row, aborted))
                    continue
                counts["pending" if slots else "queued"] += 1
            elif status in (_T.DISPATCHED, _T.PROCESSING):
                # The agent may still finish it: its completion is accepted while the attempt matches.
                row["status"] = int(_T.SUBMITTED)
                txn.put_task(row)
                counts["requeued"] += 1
            else:
                counts["queued"] += 1
            slot = self.core.add_task(self.partition_slot.get(opts["partition_id"], 0), opts["priority"], slots)
            self.task_slot[tid] = slot
            self.slot_task[slot] = tid
            if status == _T.PENDING and not slots:
                self.set_task_status(txn, row, _T.SUBMITTED, now)
        for row, rid in to_fail:
            self.end_task(txn, row, _T.ERROR, now, f"input result {rid} will never have data")
            counts["failed"] += 1
        return counts


def now() -> float:
    return time.time()
