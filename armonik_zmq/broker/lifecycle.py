"""Pause, resume, stop submission and purge of sessions; cancel tasks (ArmoniK 1.1, 1.2, 3.7).

A task an agent holds is stopped on that agent: the broker pushes ``STOP_TASKS`` (after the turn
commits), the agent drops the attempts it has not started and kills the worker running the others,
then reports ``TASKS_STOPPED``. A cancelled task stays CANCELLING until then; a paused one is PAUSED
at once, since no report of its attempt is accepted any more.

A purge marks the session PURGED at once and deletes its results' data afterwards, ``PURGE_CHUNK``
results or ``PURGE_SLICE`` seconds per turn (``Purges``): in one transaction, a session of a million results would hold every
other client for seconds and need the map room for all of its freed pages at once. The sessions
being purged, with how far each got, are a table of their own, written in the turns' transactions:
a restart (or an aborted turn) resumes each purge where its last committed chunk ended.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from ..protocol import ErrorCode, Op, ProtocolError, request
from ..status import ResultStatus, SessionStatus, TaskStatus
from .store import Store, Txn, session_results_key

if TYPE_CHECKING:
    from .server import Broker, Request

log = logging.getLogger(__name__)

_R = ResultStatus
_S = SessionStatus
_T = TaskStatus
#: results whose data a turn deletes at most, across the sessions being purged (each costs ~10-20 µs)
PURGE_CHUNK = 500
#: ... and seconds it spends on them at most: a request that arrives meanwhile waits for this turn's commit
PURGE_SLICE = 0.002
#: what a pause takes out of the queues; running tasks (PROCESSING) finish
_PAUSABLE = (_T.PENDING, _T.SUBMITTED, _T.DISPATCHED)


class Purges:
    """The sessions whose results' data is being deleted: session id -> the last result id done (b"": none)."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.env.open_db(b"purging")
        #: whether a turn should look at the table (a hint: the table is the truth; True until a turn found it empty)
        self.pending = True

    def start(self, txn: Txn, session_id: str) -> None:
        txn.txn.put(session_id.encode(), b"", db=self.db)
        self.pending = True

    def advance(self, txn: Txn, delete: Callable[[Txn, dict], None], budget: int = PURGE_CHUNK,
                seconds: float = PURGE_SLICE) -> int:
        """Delete the data of up to ``budget`` results of the sessions being purged, for about ``seconds`` at most;
        return how many were looked at.

        An imported result's data belongs to the object storage, not to the session: kept like
        manual_deletion ones (ArmoniK would delete the object unless the client set manual_deletion).
        """
        seen = 0
        deadline = time.monotonic() + seconds
        while seen < budget:
            with txn.txn.cursor(db=self.db) as cur:
                if not cur.first():
                    self.pending = False
                    return seen
                key, last = cur.key(), cur.value()
            with txn.txn.cursor(db=self.store.session_index) as cur:
                index_key = session_results_key(key.decode())
                found = cur.set_range_dup(index_key, last) if last else cur.set_key(index_key)
                if found and last and cur.value() == last:
                    found = cur.next_dup()
                while found and seen < budget:
                    last = cur.value()
                    seen += 1
                    row = txn.get_result(last.decode())
                    if not (row is None or row["manual_deletion"] or row["opaque_id"] or row["status"] == _R.DELETED):
                        delete(txn, row)
                    found = cur.next_dup()
                    if seen % 32 == 0 and time.monotonic() > deadline:
                        budget = seen  # this turn's share is spent: the rest waits for the next turn
            if found:
                txn.txn.put(key, last, db=self.db)
            else:
                txn.txn.delete(key, db=self.db)
                log.info("session %s purged", key.decode())
        return seen


class Lifecycle:
    """Mixed into ``Broker``: the handlers that stop, pause, resume and purge work."""

    def handle_purge_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        """CLOSED or CANCELLED -> PURGED at once; the results' data goes a chunk per turn (``Purges``)."""
        def purge(txn: Txn, row: dict, now: float) -> None:
            row.update(status=int(_S.PURGED), purged_at=now, client_submission=False, worker_submission=False)
            self.purges.start(txn, row["session_id"])
        self._session_transition(req, txn, (_S.CLOSED, _S.CANCELLED), "purged", purge)

    def handle_pause_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        """RUNNING -> PAUSED: tasks not started become PAUSED and leave the queues; running ones finish."""
        def pause(txn: Txn, row: dict, now: float) -> None:
            row["status"] = int(_S.PAUSED)
            stops = []
            pausable = [t for t in map(txn.get_task, txn.session_task_ids(row["session_id"]))
                        if t["status"] in _PAUSABLE]
            # Paused in submission order (one request's tasks share a time): resumed so within each priority.
            for trow in sorted(pausable, key=lambda t: t["created_at"]):
                if trow["status"] == _T.DISPATCHED:
                    stops.append((trow["owner_pod_id"], trow["task_id"], trow["attempt"]))
                self.state.pause_task(txn, trow, now, f"session {row['session_id']} was paused")
            self.stop_on_agents(req, txn, stops)
        self._session_transition(req, txn, (_S.RUNNING,), "paused", pause)

    def handle_resume_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        """PAUSED -> RUNNING (RUNNING: nothing to do): PAUSED tasks go back to the queues, by priority."""
        def resume(txn: Txn, row: dict, now: float) -> None:
            if row["status"] == _S.PAUSED:
                row["status"] = int(_S.RUNNING)
                self.state.resume_tasks(txn, row["session_id"], now)
        self._session_transition(req, txn, (_S.RUNNING, _S.PAUSED), "resumed", resume)

    def handle_stop_submission(self: "Broker", req: "Request", txn: Txn) -> None:
        """Switch off client submission, worker submission (subtasks), or both."""
        h = req.header

        def stop(txn: Txn, row: dict, now: float) -> None:
            if h["client"]:
                row["client_submission"] = False
            if h["worker"]:
                row["worker_submission"] = False
        self._session_transition(req, txn, tuple(_S), "changed", stop)

    def handle_cancel_tasks(self: "Broker", req: "Request", txn: Txn) -> None:
        """Cancel tasks: outputs ABORTED, dependents CANCELLED; the ones agents hold are stopped there.

        ``force`` (default true): a running task's worker is killed; false: it runs to its end and its
        outcome is discarded (the worker lives on).
        """
        ids = list(dict.fromkeys(req.header["task_ids"]))
        for tid in ids:
            self.state.require_task(txn, tid)
        self.cancel_tasks(req, txn, ids, "cancelled by a client", force=req.header.get("force", True))
        req.reply(tasks=[txn.get_task(tid) for tid in ids])

    def cancel_tasks(self: "Broker", req: "Request", txn: Txn, task_ids, message: str, force: bool = True) -> None:
        """Cancel every unfinished task of ``task_ids`` (read afresh: cancelling one may end others)."""
        stops = []
        for tid in task_ids:
            row = txn.get_task(tid)
            attempt = row["attempt"]
            agent_id = self.state.cancel_task(txn, row, req.now, message)
            if agent_id:
                stops.append((agent_id, tid, attempt))
        self.stop_on_agents(req, txn, stops, force)

    def stop_on_agents(self: "Broker", req: "Request", txn: Txn, stops: list[tuple[str, str, int]],
                       force: bool = True) -> None:
        """Push ``STOP_TASKS`` to each agent holding one of these (agent id, task id, attempt); sent after commit."""
        by_agent: dict[str, list] = {}
        for agent_id, task_id, attempt in stops:
            by_agent.setdefault(agent_id, []).append([task_id, attempt])
        for agent_id, tasks in by_agent.items():
            agent = self.agents.get(agent_id)
            if agent is None or agent.peer is None:
                # Its agent is gone (its tasks were taken back), or not back since a broker restart (it will be
                # told to drop them when it registers again): nothing runs them for the broker any more.
                for task_id, _ in tasks:
                    row = txn.get_task(task_id)
                    if row["status"] == _T.CANCELLING:
                        self.state.finish_cancel(txn, row, req.now)
                continue
            fields = {} if force else {"force": False}  # absent: kill running ones (the default)
            entry = (self.backend, [agent.peer, request(Op.STOP_TASKS, 0, tasks=tasks, **fields)], agent)
            self._outbox.append(entry)
            req.on_rollback(lambda entry=entry: self._outbox.remove(entry))
            log.info("asking agent %s to stop %d task(s)", agent_id, len(tasks))

    def handle_tasks_stopped(self: "Broker", req: "Request", txn: Txn) -> None:
        """The agent no longer runs these attempts: CANCELLING tasks are CANCELLED."""
        agent = self._agent(req)
        for item in req.header["tasks"]:
            if len(item) != 2 or type(item[0]) is not str or type(item[1]) is not int:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "tasks items must be [task_id, attempt]")
        for task_id, attempt in req.header["tasks"]:
            row = txn.get_task(task_id)
            if (row is not None and row["status"] == _T.CANCELLING and row["attempt"] == attempt
                    and row["owner_pod_id"] == agent.agent_id):
                self.state.finish_cancel(txn, row, req.now)
        req.reply()
