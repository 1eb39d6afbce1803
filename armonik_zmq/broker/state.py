"""The broker's state machine: every task and result transition is written here, and only here.

LMDB holds the truth; the Cython core holds the in-memory view the hot path needs (missing
dependency counts, the result -> waiting tasks index, ready queues, who holds what). External string
ids map to the core's dense int slots in the dicts below, and only for live objects: a task has a
slot until it ends, a result only while some task waits for its data.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

from .._core import Core, Transitions
from ..ids import new_id  # noqa: F401  (re-exported: handlers and tests use state.new_id)
from ..protocol import ErrorCode, ProtocolError
from ..status import (TASK_TRANSITIONS, ResultStatus, SessionStatus, TaskStatus, TASK_FINAL, as_ints,
                      check_task_transition)
from . import options as task_options
from .events import EventBus
from .store import SESSION_CACHE_MAX, Txn

log = logging.getLogger(__name__)

_R = as_ints(ResultStatus)
_S = as_ints(SessionStatus)
_T = as_ints(TaskStatus)
#: an agent's capacity while the state is rebuilt after an aborted turn: room for whatever it holds
_ROOM = 1 << 30
#: timestamp recorded when a task enters a status
_STAMP = {_T.SUBMITTED: "submitted_at", _T.DISPATCHED: "acquired_at", _T.PROCESSING: "started_at",
          _T.COMPLETED: "ended_at", _T.ERROR: "ended_at", _T.TIMEOUT: "ended_at", _T.CANCELLED: "ended_at",
          _T.RETRIED: "ended_at"}
#: A new task row before its own fields are set, in the stored field order (store.TASK_FIELDS). Every new row starts
#: as a copy: past 16 keys a dict display is built key by key (~1.9 us for these 24), a copy of this one plus
#: the task's own fields takes ~0.5 us.
_NEW_TASK = {
    "task_id": "", "session_id": "", "owner_pod_id": "", "pod_hostname": "", "initial_task_id": "", "created_by": "",
    "parent_task_ids": (), "payload_id": "", "data_dependencies": (), "expected_output_ids": (), "retry_of_ids": (),
    "status": 0, "status_message": "", "error": None, "options": None, "attempt": 0, "created_at": None,
    "submitted_at": None, "received_at": None, "acquired_at": None, "fetched_at": None, "started_at": None,
    "processed_at": None, "ended_at": None,
}


#: A new result row before its own fields are set (``new_result_row``), in the stored field order (store.RESULT_FIELDS).
_NEW_RESULT = {
    "result_id": "", "session_id": "", "name": "", "owner_task_id": "", "created_by": "", "completed_by": "",
    "status": int(_R.CREATED), "created_at": None, "completed_at": None, "size": 0, "opaque_id": b"",
    "manual_deletion": False,
}


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
        #: result id -> core slot; also each paused session's pause gate (``pause_gate``)
        self.result_slot: dict[str, int] = {}
        self.session_status: dict[str, int] = {}
        #: after ``rebuild``: agent id -> the tasks it held (DISPATCHED, PROCESSING), kept for it a while
        self.orphans: dict[str, list[str]] = {}
        #: session id -> User-Id of its creator ("" without security), for authorization (broker/auth.py)
        self.session_owner: dict[str, str] = {}
        #: session id -> (its row, the task options its defaults give): a submit naming no options of its own (the
        #: futures API's) merges and checks them once per session row (a row read again is a new object: merged again)
        self._default_options: dict[str, tuple[dict, dict]] = {}
        #: payload id -> its inline answer (([payload id], [its data])) for the dispatch of the turn whose submit
        #: stored it with its data (handlers.handle_submit_inline): that dispatch reads it neither back nor in Python
        #: (a lone task's, dispatch_batch). Taken by each dispatch; dropped with the data (``delete_result_data``).
        self.new_payloads: dict[str, tuple[list, list]] = {}
        # The transitions every task goes through, compiled (_core.Transitions):
        # - set_task_status(txn, row, status, now, message=None, store=True): move a task to ``status`` (checked
        #   against status.TASK_TRANSITIONS), stamp it (_STAMP), store it, tell subscribers. ``store=False``: the
        #   caller moves the row on again in the same transaction and stores it then (one write for both
        #   transitions; subscribers still see each status); a move into or out of SUBMITTED is stored anyway.
        # - _task_ended(task_id): free the task's core slot (it no longer waits, queues or holds credit).
        # - _set_completed(row, size, completed_by, now): the fields of a result row that become COMPLETED.
        # - mark_result_completed(txn, row, size, completed_by, now, data=None): mark a result whose data is stored
        #   (or referenced) COMPLETED and queue the tasks waiting only for it; ``data``: the bytes (or frames)
        #   stored inline, which its event may carry to subscribers that asked.
        # - complete_result(txn, row, data, completed_by, now): store a result's data (bytes or frames), then
        #   ``mark_result_completed``.
        # - _add_to_core(task_id, opts, missing): give a task its core slot, waiting for the results in ``missing``
        #   (no data yet); queued at once if none.
        # - _insert_task(txn, row, missing): store a new task row, announce it (NEW_TASK), ``_add_to_core``.
        # - _give_result(txn, rrow, task_id, new=False): make ``task_id`` the task responsible for producing a
        #   result (RESULT_OWNER_UPDATE); ``new``: the row is stored for the first time (``announce_result``).
        # - complete_simple(txn, agent_id, completion, frames, now): apply the common completion when all its checks
        #   pass and return True, else change nothing and return False (Backend._complete_simple, which it spares).
        # - complete_batch(txn, agent_id, completions, frames, now, accepted, slow): a TASKS_DONE's completions in
        #   order, each with its frames: complete_simple's (ids appended to ``accepted``), else ``slow(completion,
        #   frames)``; return how many it applied; MALFORMED if the frames do not add up (split_frames).
        # - dispatch_batch(txn, pairs, now, agent_by_slot, session_status, payload_answers, per_agent, slow, fallback):
        #   hand the core's (agent, task) pairs to their agents in order, the common ones in C (beginning an agent's
        #   message, packed with ``fallback``, when need be), any other through ``slow`` (Backend.dispatch).
        # - _create_tasks_simple(txn, sid, creations, opts, now, task_ids, new_outputs, new_inputs): create_tasks for
        #   a client's tasks in a running session, all with the options ``opts``, when all checks pass: return their
        #   infos; else change nothing and return None (the rest of create_tasks, which it spares).
        # - create_results(txn, sid, specs, now): a new result without data per spec ({name, manual_deletion?}),
        #   stored and announced (NEW_RESULT); return the rows (``new_result_row`` + ``insert_result`` each).
        # - inline_results(txn, sid, tasks, groups, now, new_payloads, inline_limit): SUBMIT_INLINE's payloads
        #   (``new_result_row`` + ``insert_completed_result``) and outputs (``new_result_row`` + ``announce_result``),
        #   and the creations for create_tasks; one-frame payloads left in ``new_payloads``.
        moves = Transitions(self.core, self.task_slot, self.slot_task, self.result_slot, self.partition_slot,
                            TASK_TRANSITIONS, _STAMP, check_task_transition, events, int(_T.SUBMITTED),
                            int(_R.COMPLETED), _NEW_TASK, _NEW_RESULT)
        self.set_task_status = moves.set_task_status
        self._task_ended = moves.task_ended
        self._set_completed = moves.set_completed
        self.mark_result_completed = moves.mark_result_completed
        self.complete_result = moves.complete_result
        self._add_to_core = moves.add_to_core
        self._insert_task = moves.insert_task
        self._give_result = moves.give_result
        self.complete_simple = moves.complete_simple
        self.complete_batch = moves.complete_batch
        self.dispatch_batch = moves.dispatch_batch
        self._create_tasks_simple = moves.create_tasks_simple
        self.create_results = moves.create_results
        self.inline_results = moves.inline_results

    # -- sessions ------------------------------------------------------------------------------

    def require_session(self, txn: Txn, session_id: str) -> dict:
        row = txn.get_session(session_id)
        if row is None:
            raise not_found("session", session_id)
        return row

    @staticmethod
    def check_submission(session: dict, by: str) -> None:
        """Refuse a submission by ``by`` ("client" or "worker") that the session does not accept (ArmoniK 3.1)."""
        sid, status = session["session_id"], session["status"]
        if status not in (_S.RUNNING, _S.PAUSED):
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"session {sid} is {SessionStatus(status).name}: it accepts no more tasks")
        if not session[f"{by}_submission"]:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"session {sid} has {by} submission stopped: a {by} may not submit tasks to it")

    def put_session(self, txn: Txn, row: dict) -> None:
        txn.put_session(row)
        self.session_status[row["session_id"]] = row["status"]
        self.session_owner[row["session_id"]] = row.get("owner", "")

    # -- results -------------------------------------------------------------------------------

    def new_result_row(self, session_id: str, name: str, *, manual_deletion: bool = False, created_by: str = "",
                       result_id: Optional[str] = None, now: float) -> dict:
        row = _NEW_RESULT.copy()
        row["result_id"] = result_id or new_id()
        row["session_id"] = session_id
        row["name"] = name
        row["created_by"] = created_by
        row["created_at"] = now
        row["manual_deletion"] = manual_deletion
        return row

    def insert_result(self, txn: Txn, row: dict) -> None:
        txn.put_result(row, new=True)
        self.events.new_result(row)

    def announce_result(self, row: dict) -> None:
        """``insert_result`` without the write, for an output that ``create_tasks`` (``new_outputs``) stores with
        its owner task in the same request: the same events, one row write instead of two."""
        self.events.new_result(row)

    def insert_completed_result(self, txn: Txn, row: dict, data, now: float) -> None:
        """``insert_result`` then ``complete_result`` for a new result that comes with its data (nothing waits on
        it yet): the same events, one row write instead of two."""
        self.events.new_result(row)
        size = txn.rows.put_small_object(row["result_id"], data)  # compiled, for one chunk (a payload, mostly)
        if size < 0:
            size = txn.put_object(row["result_id"], data)
        self._set_completed(row, size, "", now)
        txn.put_result(row, new=True)
        self.events.result_status(row, data)

    def require_result(self, txn: Txn, result_id: str, session_id: str) -> dict:
        row = txn.get_result(result_id)
        if row is None or row["session_id"] != session_id:
            raise not_found("result", result_id, session_id)
        return row

    def delete_result_data(self, txn: Txn, row: dict) -> None:
        """Delete a result's data and keep its metadata: DELETED (an imported object's file stays)."""
        txn.delete_object(row["result_id"])
        self.new_payloads.pop(row["result_id"], None)
        row["status"] = int(_R.DELETED)
        txn.put_result(row)
        self.events.result_status(row)

    # -- tasks ---------------------------------------------------------------------------------

    def require_task(self, txn: Txn, task_id: str) -> dict:
        row = txn.get_task(task_id)
        if row is None:
            raise not_found("task", task_id)
        return row

    def _task_options(self, own: Optional[dict], request_options: Optional[dict], session: dict, where: str) -> dict:
        """Merge and check a task's options (task > request > session), on a partition this broker serves."""
        defaults = not own and not request_options
        if defaults:
            known = self._default_options.get(session["session_id"])
            if known is not None and known[0] is session:
                return known[1]
        opts = task_options.validate(task_options.merge(own, request_options, session.get("options")),
                                     session["partition_ids"], where)
        if opts["partition_id"] not in self.partition_slot:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"{where}: partition '{opts['partition_id']}' is not served by this broker "
                                f"(known: {self.partitions})")
        if defaults:
            if len(self._default_options) >= SESSION_CACHE_MAX:
                self._default_options.clear()
            self._default_options[session["session_id"]] = (session, opts)
        return opts

    def create_tasks(self, txn: Txn, session: dict, creations: list[dict], request_options: Optional[dict], now: float,
                     *, parent: Optional[dict] = None, task_ids: Optional[list[str]] = None,
                     new_outputs: Optional[dict[str, dict]] = None,
                     new_inputs: Optional[dict[str, dict]] = None) -> list[dict]:
        """Create tasks (from a client, or a worker's subtasks when ``parent`` is given), all or nothing.

        Every check runs before anything is written, so a refused batch leaves no trace. ``new_outputs``: output
        rows made by the same request and announced (``announce_result``) but not stored yet; they are
        stored here, with their owner task. ``new_inputs``: rows the same request stored (payloads with their
        data, in ``session``), looked at as they are instead of read back (a read and a decode per task).
        """
        sid = session["session_id"]
        if parent is None and creations and session["status"] == _S.RUNNING:
            # A client's tasks in a running session, most often none with options of its own: compiled, when every
            # check passes (else nothing changed, and the code below creates them or says why not).
            try:
                opts = self._task_options(None, request_options, session, "task 0")
            except ProtocolError:
                opts = None  # the tasks may all name options of their own: below
            if opts is not None:
                infos = self._create_tasks_simple(txn, sid, creations, opts, now, task_ids, new_outputs, new_inputs)
                if infos is not None:
                    return infos
        where_prefix = "subtask" if parent else "task"
        get_result = txn.get_result
        plans = []
        claimed: set[str] = set()
        inputs_seen: dict[str, dict] = dict(new_inputs) if new_inputs else {}
        #: the options of every task that names none of its own: merged and checked once, one dict shared by the rows
        shared_opts = None
        for i, c in enumerate(creations):
            if c.get("options"):
                opts = self._task_options(c["options"], request_options, session, f"{where_prefix} {i}")
            else:
                if shared_opts is None:
                    shared_opts = self._task_options(None, request_options, session, f"{where_prefix} {i}")
                opts = shared_opts
            payload_id = c["payload_id"]
            deps = c.get("data_dependencies")
            missing = []
            # each input once, in order (a dict: "not in" on the list took 12 ms for a reduce over 1,000 pending ones)
            for rid in (dict.fromkeys((payload_id, *deps)) if deps else (payload_id,)):
                # Inputs are only looked at here: a payload shared by the whole batch is read once.
                rrow = inputs_seen.get(rid)
                if rrow is None:
                    rrow = inputs_seen[rid] = self.require_result(txn, rid, sid)
                status = rrow["status"]
                if status == _R.CREATED:
                    missing.append(rid)
                elif status != _R.COMPLETED:
                    raise ProtocolError(ErrorCode.ABORTED, f"{where_prefix} {i}: input result {rid} is "
                                        f"{ResultStatus(status).name} and will never have data")
            outputs = []
            for rid in c["expected_output_ids"]:
                rrow = new_outputs.get(rid) if new_outputs else None
                if rrow is None:
                    rrow = get_result(rid)
                if rrow is None or rrow["session_id"] != sid:
                    raise not_found("result", rid, sid)
                if rrow["status"] != _R.CREATED:
                    raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"{where_prefix} {i}: expected output {rid} is "
                                        f"{ResultStatus(rrow['status']).name}; an output must not have data yet")
                outputs.append(rrow)
            plans.append((c, opts, missing, outputs))
        infos = []
        for i, (c, opts, missing, outputs) in enumerate(plans):
            tid = task_ids[i] if task_ids else new_id()
            row = _NEW_TASK.copy()
            row["task_id"] = row["initial_task_id"] = tid
            row["session_id"] = sid
            if parent:
                row["created_by"] = parent["task_id"]
                row["parent_task_ids"] = (*parent["parent_task_ids"], parent["task_id"])
            row["payload_id"] = c["payload_id"]
            row["data_dependencies"] = tuple(c.get("data_dependencies", ()))
            row["expected_output_ids"] = tuple(c["expected_output_ids"])
            row["status"] = int(_T.PENDING if missing else _T.SUBMITTED)
            row["options"] = opts
            row["created_at"] = now
            if not missing:
                row["submitted_at"] = now
            if session["status"] == _S.PAUSED:
                # ArmoniK 3.1: in a paused session a new task waits PAUSED, behind the pause gate, until resumed.
                row.update(status=int(_T.PAUSED), submitted_at=None)
                missing = [*missing, self.pause_gate(sid)]
            self._insert_task(txn, row, missing)
            for rrow in outputs:
                # ArmoniK 3.8: a result without owner goes to its new producer; a parent's output moves to
                # the child that lists it (the parent then completes without writing it).
                previous = rrow["owner_task_id"]
                if (not previous and rrow["result_id"] not in claimed) or (parent and previous == parent["task_id"]):
                    claimed.add(rrow["result_id"])
                    self._give_result(txn, rrow, tid, new=bool(new_outputs) and rrow["result_id"] in new_outputs)
            infos.append({"task_id": tid, "payload_id": row["payload_id"],
                          "data_dependencies": row["data_dependencies"], "expected_output_ids": row["expected_output_ids"]})
        for rid, rrow in (new_outputs or {}).items():
            if rid not in claimed:  # no task took it (never with SUBMIT_INLINE: one output per task): stored as made
                txn.put_result(rrow, new=True)
        return infos

    def end_task(self, txn: Txn, row: dict, status: TaskStatus, now: float, message: str) -> None:
        """End a task without success (ERROR, TIMEOUT, CANCELLED): abort its outputs and fail what waits on them.

        Every task failed down the graph names the task whose failure started it (not the chain between:
        a message per level would grow with the depth of the graph). CANCELLING does the same to the
        graph, but the task keeps its core slot (its agent's credit) until the agent has stopped it.
        """
        reason = f"task {row['task_id']} ended in {TaskStatus(status).name}: {message}"
        work = [(row, status, message)]
        while work:
            trow, st, msg = work.pop()
            trow["error"] = msg
            self.set_task_status(txn, trow, st, now, msg)
            if st != _T.CANCELLING:
                self._task_ended(trow["task_id"])
            dep_status = _T.CANCELLED if st in (_T.CANCELLED, _T.CANCELLING) else _T.ERROR
            for rid in trow["expected_output_ids"]:
                rrow = txn.get_result(rid)
                if rrow is None or rrow["owner_task_id"] != trow["task_id"] or rrow["status"] != _R.CREATED:
                    continue
                for dep in self.abort_result(txn, rrow):
                    work.append((dep, dep_status, f"input result {rid} was aborted because {reason}"))

    def abort_result(self, txn: Txn, row: dict) -> list[dict]:
        """Mark a result without data ABORTED; return the rows of the tasks that were waiting for it.

        The caller ends those tasks (ERROR or CANCELLED); they no longer wait in the core.
        """
        row["status"] = int(_R.ABORTED)
        txn.put_result(row)
        self.events.result_status(row)
        slot = self.result_slot.pop(row["result_id"], None)
        if slot is None:
            return []
        waiting = [txn.get_task(self.slot_task[t]) for t in self.core.on_result_aborted(slot)]
        self.core.free_result(slot)
        return waiting

    def retry_or_fail(self, txn: Txn, row: dict, message: str, now: float) -> None:
        """Handle a retryable failure (exception, worker or agent lost): retry the task, or ERROR when out of retries.

        ArmoniK 3.4: while ``len(retry_of_ids) < max_retries`` the task becomes RETRIED and a copy
        ``<initial_task_id>###<n>`` takes its place: same payload, inputs, outputs (ownership moves to it)
        and options, queued at once (its inputs had data, since the failed attempt ran).
        """
        if len(row["retry_of_ids"]) >= row["options"]["max_retries"]:
            self.end_task(txn, row, _T.ERROR, now, message)
            return
        row["error"] = message
        self.set_task_status(txn, row, _T.RETRIED, now, message)
        self._task_ended(row["task_id"])
        retry_of_ids = (*row["retry_of_ids"], row["task_id"])
        retry_id = f"{row['initial_task_id']}###{len(retry_of_ids)}"
        retry = {**row, "task_id": retry_id, "owner_pod_id": "", "pod_hostname": "", "retry_of_ids": retry_of_ids,
                 "status": int(_T.SUBMITTED), "status_message": "", "error": None, "attempt": 0, "created_at": now,
                 "submitted_at": now, "received_at": None, "acquired_at": None, "fetched_at": None,
                 "started_at": None, "processed_at": None, "ended_at": None}
        self._insert_task(txn, retry, [])
        for rid in row["expected_output_ids"]:
            rrow = txn.get_result(rid)
            if rrow is not None and rrow["owner_task_id"] == row["task_id"]:
                self._give_result(txn, rrow, retry_id)
        log.info("task %s retried as %s: %s", row["task_id"], retry_id, message)

    # -- pause, resume, cancel (ArmoniK 1.1, 1.2, 3.7) -------------------------------------------------
    # A paused session's tasks stay in the core, waiting for one more "result": the session's pause gate.
    # So they are never dispatched, yet an input aborted meanwhile still fails them down the graph, and
    # resuming is one ``on_result_ready`` that queues them in the order they were paused.

    @staticmethod
    def pause_gate(session_id: str) -> str:
        """Return the ``result_slot`` key of a session's pause gate (no result id holds a NUL)."""
        return "\x00paused " + session_id

    def pause_task(self, txn: Txn, row: dict, now: float, message: Optional[str] = None) -> None:
        """Take a task that has not started (or was handed back) out of the queues: PAUSED until resumed.

        A DISPATCHED task loses its agent, which the caller tells to drop it; the agent's credit comes back.
        """
        if row["status"] == _T.PROCESSING:
            # Handed back by its agent (shutting down) while its session is paused.
            self.set_task_status(txn, row, _T.SUBMITTED, now, message)
        self._task_ended(row["task_id"])
        missing = [rid for rid in dict.fromkeys([row["payload_id"], *row["data_dependencies"]])
                   if (txn.get_result(rid) or {}).get("status") == _R.CREATED]
        self._add_to_core(row["task_id"], row["options"], [*missing, self.pause_gate(row["session_id"])])
        row["owner_pod_id"] = ""
        self.set_task_status(txn, row, _T.PAUSED, now, message)

    def resume_tasks(self, txn: Txn, session_id: str, now: float) -> None:
        """Put a resumed session's PAUSED tasks back: queued (SUBMITTED), or PENDING if inputs still miss data."""
        slot = self.result_slot.pop(self.pause_gate(session_id), None)
        if slot is None:
            return
        for t in self.core.on_result_ready(slot):
            self.set_task_status(txn, txn.get_task(self.slot_task[t]), _T.SUBMITTED, now)
        self.core.free_result(slot)
        for tid in txn.session_task_ids(session_id):
            row = txn.get_task(tid)
            if row["status"] == _T.PAUSED:
                self.set_task_status(txn, row, _T.PENDING, now)

    def drop_pause_gate(self, session_id: str) -> None:
        """Forget a session's pause gate once no task waits on it any more (they all ended)."""
        slot = self.result_slot.pop(self.pause_gate(session_id), None)
        if slot is not None:
            self.core.free_result(slot)

    def cancel_task(self, txn: Txn, row: dict, now: float, message: str) -> Optional[str]:
        """Cancel a task (outputs ABORTED, dependents CANCELLED); return the agent that must stop it, if any.

        A task an agent holds (DISPATCHED, PROCESSING) is CANCELLING until that agent reports it stopped
        (``finish_cancel``); any other unfinished one is CANCELLED at once. Ended ones are left alone.
        """
        status = row["status"]
        if status in TASK_FINAL or status == _T.CANCELLING:
            return None
        if status in (_T.DISPATCHED, _T.PROCESSING):
            self.end_task(txn, row, _T.CANCELLING, now, message)
            return row["owner_pod_id"]
        self.end_task(txn, row, _T.CANCELLED, now, message)
        return None

    def finish_cancel(self, txn: Txn, row: dict, now: float) -> None:
        """CANCELLING -> CANCELLED once the task runs nowhere: its agent stopped it, or the agent is gone."""
        self.set_task_status(txn, row, _T.CANCELLED, now)
        self._task_ended(row["task_id"])

    # -- restart ---------------------------------------------------------------------------------

    def rebuild(self, txn: Txn, now: float, agents: Optional[dict] = None) -> dict:
        """Rebuild queues and dependency counts from LMDB; return counts for the log.

        Reads only the unfinished tasks (the live-task table), so it costs O(live tasks). After a
        restart (``agents`` None) the tasks agents held are
        listed in ``orphans`` by agent, queued in the core; the broker gives them to placeholders that wait
        for their agents (``Backend.hold_for_absent_agents``). After an aborted turn
        (``agents``: agent id -> AgentInfo of the agents still connected, given fresh core slots here)
        each agent holds again the tasks LMDB says it holds, so nothing moves.
        """
        for s in txn.iter_sessions():
            self.session_status[s["session_id"]] = s["status"]
            self.session_owner[s["session_id"]] = s.get("owner", "")
        counts = {"pending": 0, "queued": 0, "requeued": 0, "failed": 0, "paused": 0, "cancelled": 0, "held": 0,
                  "awaiting_agent": 0}
        holders = {}
        for agent in (agents or {}).values():
            # Room for all it holds (it may hold more than its capacity once lowered), its capacity set after.
            agent.slot = self.core.add_agent([self.partition_slot[p] for p in agent.partitions], _ROOM)
            holders[agent.agent_id] = agent
        to_fail = []
        to_cancel = []
        paused = []
        for task_id, queued in txn.iter_live_tasks():
            if queued is not None:
                # SUBMITTED: its partition and priority are all the queue needs (its row is not read)
                self._add_to_core(task_id, {"partition_id": queued[0], "priority": queued[1]}, ())
                counts["queued"] += 1
                continue
            row = txn.get_task(task_id)
            if row is None:  # never expected: both tables change in one transaction
                continue
            status = row["status"]
            if status in TASK_FINAL:
                continue
            holder = holders.get(row["owner_pod_id"]) if status in (_T.DISPATCHED, _T.PROCESSING, _T.CANCELLING) else None
            if holder is not None:
                opts = row["options"]
                tslot = self.core.add_held_task(self.partition_slot.get(opts["partition_id"], 0), opts["priority"],
                                                holder.slot)
                self.task_slot[row["task_id"]] = tslot
                self.slot_task[tslot] = row["task_id"]
                counts["held"] += 1
                continue
            if status == _T.CANCELLING:
                to_cancel.append(row)  # its agent may still finish the run: that report is refused
                continue
            missing = []
            aborted = None
            if status in (_T.PENDING, _T.PAUSED):
                for rid in dict.fromkeys([row["payload_id"], *row["data_dependencies"]]):
                    rrow = txn.get_result(rid)
                    rst = rrow["status"] if rrow else _R.NOTFOUND
                    if rst == _R.CREATED:
                        missing.append(rid)
                    elif rst != _R.COMPLETED:
                        aborted = rid
                if aborted is not None:
                    to_fail.append((row, aborted))
                    continue
                if status == _T.PAUSED:
                    paused.append((row, missing))
                    continue
                counts["pending" if missing else "queued"] += 1
            elif status in (_T.DISPATCHED, _T.PROCESSING) and row["owner_pod_id"]:
                # Kept for its agent, which re-announces it when it registers again (Backend.hold_for_absent_agents).
                self.orphans.setdefault(row["owner_pod_id"], []).append(row["task_id"])
                counts["awaiting_agent"] += 1
            elif status in (_T.DISPATCHED, _T.PROCESSING):
                row["status"] = int(_T.SUBMITTED)
                txn.put_task(row)
                counts["requeued"] += 1
            else:
                counts["queued"] += 1
            self._add_to_core(row["task_id"], row["options"], missing)
            if status == _T.PENDING and not missing:
                self.set_task_status(txn, row, _T.SUBMITTED, now)
        for agent in holders.values():
            self.core.set_agent_capacity(agent.slot, agent.capacity)
        # Behind their session's pause gate again, in the order they were created (the order they resume in).
        paused.sort(key=lambda item: item[0]["created_at"])
        for row, missing in paused:
            self._add_to_core(row["task_id"], row["options"], [*missing, self.pause_gate(row["session_id"])])
            counts["paused"] += 1
        for row, rid in to_fail:
            self.end_task(txn, row, _T.ERROR, now, f"input result {rid} will never have data")
            counts["failed"] += 1
        for row in to_cancel:
            self.finish_cancel(txn, row, now)
            counts["cancelled"] += 1
        return counts


def now() -> float:
    return time.time()
