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

A delete works the same way (``Deletions``): the session is DELETED at once (no submission, no
change, its tasks are no longer run: an agent hands back what it is given of a session not RUNNING),
then its tasks go, cancelled and stopped on their agents if unfinished, then its results with their
data, ``DELETE_CHUNK`` rows a turn at most, and ``PURGE_SLICE`` seconds when a peer waits for the turn (a
durable commit costs 0.2-5 ms here: pieces as big as nobody minds take fewer of them); its row goes
last. What the table lists is durable progress: each chunk removes its rows' index entries in its
turn's transaction.
ArmoniK answers DeleteSession once the session's tasks, results and metadata are gone, so the reply
(and that of a retry, or of another delete of the same session) waits for the commit of the last chunk.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from ..protocol import ErrorCode, Op, ProtocolError, request
from ..status import TASK_FINAL, ResultStatus, SessionStatus, TaskStatus
from .store import Store, Txn, session_results_key, session_tasks_key

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
#: rows (tasks, then results) a turn deletes at most across the sessions being deleted (each costs ~10-30 µs);
#: past ``PURGE_SLICE`` seconds, only while nobody waits for the turn to end (looked at every ``_DELETE_READ`` rows)
DELETE_CHUNK = 2000
#: rows read from a session's index at a time (the slice's clock is looked at between them)
_DELETE_READ = 32
#: what a pause takes out of the queues; running tasks (PROCESSING) finish
_PAUSABLE = (_T.PENDING, _T.SUBMITTED, _T.DISPATCHED)


class Purges:
    """The sessions whose results' data is being deleted: session id -> the last result id done (b"": none)."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.table(b"purging")
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


class Deletions:
    """The sessions being deleted (session id -> b""), and the replies that wait for their last rows to go."""

    def __init__(self, store: Store):
        self.db = store.table(b"deleting")
        #: whether a turn should look at the table (a hint: the table is the truth; True until a turn found it empty)
        self.pending = True
        #: replies to DELETE_SESSIONS that wait, each with the sessions not gone yet: [frames, {session id}]
        self.waiting: list[list] = []
        #: the replies of this turn to hold (id of the reply's frames -> (frames, sessions)); see ``hold``
        self.marked: dict[int, tuple[list, set]] = {}
        #: sessions whose last rows went in the running turn: their replies go after its commit
        self.finished: list[str] = []

    def start(self, txn: Txn, session_id: str) -> None:
        txn.txn.put(session_id.encode(), b"", db=self.db)
        self.pending = True

    def running(self, txn: Txn, session_ids) -> set:
        """The sessions of ``session_ids`` whose deletion has not ended."""
        return {sid for sid in session_ids if txn.txn.get(sid.encode(), db=self.db) is not None}

    def first(self, txn: Txn):
        with txn.txn.cursor(db=self.db) as cur:
            return cur.key().decode() if cur.first() else None

    def end(self, txn: Txn, session_id: str) -> None:
        txn.txn.delete(session_id.encode(), db=self.db)
        self.finished.append(session_id)

    def mark(self, out: list, session_ids: set) -> None:
        """Hold this reply (once its turn commits) until these sessions are gone."""
        self.marked[id(out)] = (out, session_ids)

    def hold(self, replies: list) -> list:
        """Take the marked replies out of a committed part's client replies (they wait); return the others.
        Marks of an aborted turn match nothing and are forgotten here too."""
        marked, self.marked = self.marked, {}
        kept = []
        for reply in replies:
            entry = marked.get(id(reply[1]))
            if entry is None or entry[0] is not reply[1]:
                kept.append(reply)
            else:
                self.waiting.append([reply, entry[1]])
        return kept

    def release(self) -> list:
        """The replies whose sessions are all gone with the turn just committed: send them now."""
        finished, self.finished = set(self.finished), []
        due = []
        for entry in self.waiting:
            entry[1] -= finished
            if not entry[1]:
                due.append(entry[0])
        if due:
            self.waiting = [e for e in self.waiting if e[1]]
        return due

    def reloaded(self) -> None:
        """The in-memory state was loaded from LMDB again (an aborted turn): the table is the truth."""
        self.pending = True
        self.finished = []


class Lifecycle:
    """Mixed into ``Broker``: the handlers that stop, pause, resume and purge work."""

    def handle_purge_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        """CLOSED or CANCELLED -> PURGED at once; the results' data goes a chunk per turn (``Purges``)."""
        def purge(txn: Txn, row: dict, now: float) -> None:
            row.update(status=int(_S.PURGED), purged_at=now, client_submission=False, worker_submission=False)
            self.purges.start(txn, row["session_id"])
        self._session_transition(req, txn, (_S.CLOSED, _S.CANCELLED), "purged", purge)

    def handle_delete_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        """Any status -> DELETED at once; the rows go a chunk per turn (``Deletions``), and the reply waits for
        the last (``hold_delete_replies``). A session already DELETED is being deleted: the request waits too."""
        def delete(txn: Txn, row: dict, now: float) -> None:
            if row["status"] != _S.DELETED:
                row.update(status=int(_S.DELETED), deleted_at=now, client_submission=False, worker_submission=False)
                self.deletions.start(txn, row["session_id"])
            self.state.events.drop_session(row["session_id"])
        self._session_transition(req, txn, tuple(_S), "deleted", delete)

    def hold_delete_replies(self: "Broker", handler: Callable[["Request", Txn], None]) -> Callable:
        """Wrap the DELETE_SESSIONS handler (outside the idempotency check: a replayed reply waits the same way)."""
        def held(req: "Request", txn: Txn) -> None:
            handler(req, txn)
            running = self.deletions.running(txn, req.header["session_ids"])
            if running and req.out is not None:
                self.deletions.mark(req.out, running)
        return held

    def advance_deletions(self: "Broker", txn: Txn, now: float, budget: int = DELETE_CHUNK,
                          seconds: float = PURGE_SLICE) -> int:
        """Delete up to ``budget`` rows of the sessions being deleted, for about ``seconds`` at most if someone waits
        for the turn to end (``_others_wait``), else the whole budget; return how many.

        Tasks first: an unfinished one is CANCELLED (its outputs aborted, its dependents cancelled) and stopped
        on its agent, as a cancel would, then its row goes. Results next, with their data. The session's row last.
        """
        deletions, state = self.deletions, self.state
        deadline = time.monotonic() + seconds
        done = 0
        while done < budget and (time.monotonic() <= deadline or not self._others_wait()):
            sid = deletions.first(txn)
            if sid is None:
                deletions.pending = False
                break
            task_ids = txn.first_session_ids(session_tasks_key(sid), min(_DELETE_READ, budget - done))
            if task_ids:
                stops = []
                for tid in task_ids:
                    row = txn.get_task(tid)
                    if row is not None and row["status"] not in TASK_FINAL:
                        if row["status"] in (_T.DISPATCHED, _T.PROCESSING, _T.CANCELLING):
                            stops.append((row["owner_pod_id"], tid, row["attempt"]))
                        state.end_task(txn, row, _T.CANCELLED, now, f"session {sid} was deleted")
                # The rows go, so the tasks end here; their agents still stop running them.
                self.stop_on_agents(txn, now, stops)
                for tid in task_ids:
                    txn.delete_task_row(tid, sid)
                done += len(task_ids)
                continue
            result_ids = txn.first_session_ids(session_results_key(sid), min(_DELETE_READ, budget - done))
            for rid in result_ids:
                # A result nobody produces (a client would upload it) keeps the core slot its waiting tasks had:
                # they all ended (tasks go first, and only tasks of its session may wait on it), so it is free now.
                slot = state.result_slot.pop(rid, None)
                if slot is not None:
                    state.core.free_result(slot)
                txn.delete_result_row(rid, sid)
            done += len(result_ids)
            if not result_ids:
                state.drop_pause_gate(sid)  # no task waits on it any more: they all ended
                txn.delete_session(sid)
                state.session_status.pop(sid, None)
                state.session_owner.pop(sid, None)
                state.events.drop_session(sid)
                deletions.end(txn, sid)
                log.info("session %s deleted", sid)
        return done

    def _others_wait(self: "Broker") -> bool:
        """Whether someone waits for this turn to end: a peer whose request this turn answers (after its commit),
        or a message waiting for a turn (in the fair queue, or in the clients' or the agents' socket)."""
        return (bool(self._turn_requests) or bool(self.fair.waiting) or self._arrived(self.frontend)
                or self._arrived(self.backend))

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
            self.stop_on_agents(txn, now, stops, on_rollback=req.on_rollback)
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
        self.stop_on_agents(txn, req.now, stops, force, req.on_rollback)

    def stop_on_agents(self: "Broker", txn: Txn, now: float, stops: list[tuple[str, str, int]], force: bool = True,
                       on_rollback: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        """Push ``STOP_TASKS`` to each agent holding one of these (agent id, task id, attempt); sent after commit.

        ``on_rollback``: the request's, to take the push back if the request is undone (a turn's own work has none:
        an aborted turn drops every push it queued)."""
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
                        self.state.finish_cancel(txn, row, now)
                continue
            fields = {} if force else {"force": False}  # absent: kill running ones (the default)
            entry = (self.backend, [agent.peer, request(Op.STOP_TASKS, 0, tasks=tasks, **fields)], agent)
            self._outbox.append(entry)
            if on_rollback is not None:
                on_rollback(lambda entry=entry: self._outbox.remove(entry))
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
