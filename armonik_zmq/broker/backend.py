"""The agents' side of the broker: registration, leases, credit-based dispatch, fenced completions."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from .._core import STATE_QUEUED, DispatchMessage
from ..protocol import PROTOCOL_VERSION, ErrorCode, Op, ProtocolError, pack, request, split_frames
from ..status import ResultStatus, SessionStatus, TaskStatus, TASK_FINAL, as_ints
from . import segments as shm_segments
from .state import not_found
from .store import Txn, packed_options

if TYPE_CHECKING:
    from .server import Broker, Request

log = logging.getLogger(__name__)

_R = as_ints(ResultStatus)
_S = as_ints(SessionStatus)
_T = as_ints(TaskStatus)


#: metrics counter of each kind of fenced-off completion (``_refusal``)
_REFUSAL_COUNTER = {"duplicate": "completions_duplicate", "stale": "completions_stale", "foreign": "completions_foreign"}


def _refusal(kind: str, exc: ProtocolError) -> ProtocolError:
    """Tag a fencing refusal with its kind (duplicate, stale, foreign) for the metrics."""
    exc.refusal = kind
    return exc


class AgentInfo:
    __slots__ = ("agent_id", "peer", "slot", "hostname", "capacity", "partitions", "expires", "acks_inline")

    def __init__(self, agent_id: str, peer: Optional[bytes], slot: int, hostname: str, capacity: int, partitions: list[str],
                 expires: float, acks_inline: bool = False):
        self.agent_id = agent_id
        #: None for the placeholder of an agent that held tasks before a broker restart (hold_for_absent_agents)
        self.peer = peer
        self.slot = slot
        self.hostname = hostname
        self.capacity = capacity
        self.partitions = partitions
        #: time.monotonic() after which the agent has lost its lease
        self.expires = expires
        #: it takes the TASKS_DONE replies held for it inside its next push (``acks``: server.py ``_send_all``)
        self.acks_inline = acks_inline


class Backend:
    """Mixed into ``Broker``: agents by id and by core slot, and their handlers."""

    agents: dict[str, AgentInfo]
    agent_by_slot: dict[int, AgentInfo]

    def _agent(self: "Broker", req: "Request") -> AgentInfo:
        agent = self.agents.get(req.header["agent_id"])
        if agent is None or agent.peer != req.peer:
            raise ProtocolError(ErrorCode.UNKNOWN_AGENT,
                                f"agent {req.header['agent_id']} is not registered on this connection: register again")
        agent.expires = time.monotonic() + self.config.lease
        return agent

    def handle_agent_register(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        partitions = list(h.get("partitions") or [self.state.partitions[0]])
        for p in partitions:
            if p not in self.state.partition_slot:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                    f"partition '{p}' does not exist on this broker (known: {self.state.partitions})")
        holds = h.get("holds") or []
        for item in holds:
            if len(item) != 3 or type(item[0]) is not str or type(item[1]) is not int or type(item[2]) is not bool:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "holds items must be [task_id, attempt, started]")
        old = self.agents.get(h["agent_id"])
        # Room for every attempt it re-announces, even past its nominal capacity (they end soon).
        slot = self.state.core.add_agent([self.state.partition_slot[p] for p in partitions],
                                         max(h["capacity"], len(holds)))
        agent = AgentInfo(h["agent_id"], req.peer, slot, h.get("hostname", ""), max(h["capacity"], len(holds)),
                          partitions, time.monotonic() + self.config.lease, h.get("acks_inline", False))
        kept, dropped = self._adopt_holds(txn, agent, old, holds, req.now)
        if old is not None:
            # What the previous connection (or the placeholder) still holds was not re-announced: lost with it.
            self.drop_agent(txn, old, "registered again without them", req.now)
        self.agents[agent.agent_id] = agent
        self.agent_by_slot[slot] = agent
        req.on_rollback(lambda: self.forget_agent(agent))
        log.info("agent %s registered from %s: %d slots, partitions %s, %d attempt(s) kept, %d to drop",
                 agent.agent_id, agent.hostname or "?", agent.capacity, ",".join(partitions), len(kept), len(dropped))
        req.reply(heartbeat_interval=self.config.heartbeat_interval, lease=self.config.lease,
                  data_chunk_max_size=self.config.data_chunk_max_size, kept=len(kept),
                  **shm_segments.advertise(self.segments, self.config.shm_threshold))
        self.metrics.add("attempts_kept", len(kept))
        self.metrics.add("attempts_dropped", len(dropped))
        if dropped:
            # After the reply (the outbox sends replies first): the agent stops what it no longer owns.
            self.send_backend(agent.peer, [request(Op.STOP_TASKS, 0, tasks=dropped)], on_fail=agent)

    def _adopt_holds(self: "Broker", txn: Txn, agent: AgentInfo, old, holds: list, now: float) -> tuple[list, list]:
        """Give ``agent`` back the attempts it re-announces and still owns; return (kept, to drop).

        An attempt is kept when the task is still that attempt and nobody else's: held by this agent's
        previous connection (or, after a broker restart, by the placeholder that waits for it), or queued
        again without having been dispatched since (same attempt number, or the next one: a DISPATCH
        sent before a commit that never happened) while its session runs. The
        others (ended, retried, dispatched to another agent, cancelled) are dropped by the agent.
        """
        state = self.state
        core = state.core
        old_slot = old.slot if old is not None else -1
        kept, dropped = [], []
        for task_id, attempt, started in holds:
            row = txn.get_task(task_id)
            tslot = state.task_slot.get(task_id)
            keep = False
            if row is not None and tslot is not None and attempt - row["attempt"] in (0, 1):
                status = row["status"]
                if status in (_T.DISPATCHED, _T.PROCESSING):
                    keep = (row["attempt"] == attempt and row["owner_pod_id"] == agent.agent_id
                            and core.owner(tslot) == old_slot >= 0)
                elif status == _T.SUBMITTED:
                    # Queued: the attempt it was queued with, or the next one, dispatched by a turn whose commit
                    # never happened (server.py sends a turn's DISPATCH before its commit). Dropping that one
                    # would send the agent STOP_TASKS and, in the same turn, the same attempt again.
                    keep = (core.state(tslot) == STATE_QUEUED and row["owner_pod_id"] == ""
                            and state.session_status.get(row["session_id"]) == _S.RUNNING)
            if not keep:
                dropped.append([task_id, attempt])
                continue
            core.adopt(tslot, agent.slot)
            if row["status"] == _T.SUBMITTED:
                row["attempt"] = attempt
                row["owner_pod_id"] = agent.agent_id
                row["pod_hostname"] = agent.hostname
                state.set_task_status(txn, row, _T.DISPATCHED, now, f"re-announced by agent {agent.agent_id}")
            if started and row["status"] == _T.DISPATCHED:
                state.set_task_status(txn, row, _T.PROCESSING, now)
            kept.append(task_id)
        return kept, dropped

    def hold_for_absent_agents(self: "Broker", orphans: dict[str, list[str]]) -> None:
        """After a restart, keep each agent's dispatched attempts for it during ``agent_grace`` seconds.

        A placeholder agent (no connection, no credit) holds them, so they are neither dispatched
        elsewhere nor retried while the agent reconnects; the agent re-announces them when it registers
        again (``_adopt_holds``). A placeholder whose agent does not come back in time is dropped like a
        lost agent: its tasks are queued again, or retried if they had started.
        """
        core = self.state.core
        for agent_id, task_ids in orphans.items():
            slots = [self.state.task_slot[t] for t in task_ids]
            parts = sorted({core.partition(t) for t in slots})
            slot = core.add_agent(parts, len(slots))
            ghost = AgentInfo(agent_id, None, slot, "", len(slots), [self.state.partitions[p] for p in parts],
                              time.monotonic() + self.config.agent_grace)
            for t in slots:
                core.adopt(t, slot)
            self.agents[agent_id] = ghost
            self.agent_by_slot[slot] = ghost
            log.info("holding %d task(s) of agent %s for %gs, until it registers again", len(slots), agent_id,
                     self.config.agent_grace)

    def forget_agent(self: "Broker", agent: AgentInfo) -> list[int]:
        """Remove an agent from the tables; return the core task slots it held (now queued again)."""
        if self.agents.get(agent.agent_id) is agent:
            del self.agents[agent.agent_id]
        self.agent_by_slot.pop(agent.slot, None)
        return self.state.core.remove_agent(agent.slot)

    def drop_agent(self: "Broker", txn: Txn, agent: AgentInfo, why: str, now: float) -> int:
        """The agent is gone: take its tasks back, fencing off any late report from it; return how many.

        A task it had started (PROCESSING) failed with it: nothing of that run was committed, so it takes the
        retry path (ArmoniK 3.5). One it had not started goes back to its queue, not counted as a retry.
        """
        held = self.forget_agent(agent)
        retried = 0
        for t in held:
            row = txn.get_task(self.state.slot_task[t])
            if row["status"] == _T.CANCELLING:
                self.state.finish_cancel(txn, row, now)  # it runs nowhere now
            elif row["status"] == _T.PROCESSING:
                self.state.retry_or_fail(txn, row, f"agent {agent.agent_id} {why} while the task was running", now)
                retried += 1
            else:
                row["owner_pod_id"] = ""
                self.state.set_task_status(txn, row, _T.SUBMITTED, now, f"agent {agent.agent_id} {why}")
        log.warning("agent %s %s: %d task(s) back in the queue, %d running one(s) failed", agent.agent_id, why,
                    len(held) - retried, retried)
        return len(held)

    def handle_agent_heartbeat(self: "Broker", req: "Request", txn: Txn) -> None:
        agent = self._agent(req)
        capacity = req.header.get("capacity")
        if capacity is not None and capacity != agent.capacity:
            # Lowered below what it holds: it keeps them, and gets no credit until it holds fewer (core).
            self.state.core.set_agent_capacity(agent.slot, capacity)
            agent.capacity = capacity
        req.reply()

    def forgive_stall(self: "Broker", turn_started: float) -> None:
        """Give every agent a fresh lease when this broker itself stalled (stopped, swapped out, a very long turn).

        Agents could not be heard while the broker did not run: their silence is not theirs. Without this, a
        broker resumed after a pause longer than the lease would drop every agent (and retry their tasks)
        before reading the heartbeats and re-registrations waiting in its sockets.
        """
        last = getattr(self, "_last_turn_started", None)
        self._last_turn_started = turn_started
        if last is not None and turn_started - last > max(1.0, self.config.heartbeat_interval):
            for agent in self.agents.values():
                if agent.peer is not None:
                    agent.expires = max(agent.expires, turn_started + self.config.lease)

    def expire_leases(self: "Broker", txn: Txn, now: float, turn_started: float) -> None:
        """Drop agents silent for a whole lease before this turn started.

        Judged at the turn's start, not now: a heartbeat that arrived during a long turn is still
        waiting in the socket, and must not count as missed.
        """
        for agent in [a for a in self.agents.values() if a.expires < turn_started]:
            why = (f"did not register again within {self.config.agent_grace:g}s of the broker's restart"
                   if agent.peer is None else f"missed its heartbeats for {self.config.lease:g}s")
            self.drop_agent(txn, agent, why, now)

    def handle_fetch_data(self: "Broker", req: "Request", txn: Txn) -> None:
        self._agent(req)
        h = req.header
        sizes, counts, frames = self._read_data(txn, h["session_id"], h["result_ids"])
        req.reply(sizes=sizes, frames=counts, data=frames)

    def _owned(self: "Broker", txn: Txn, agent: AgentInfo, task_id: str, attempt) -> dict:
        """Return the task row if this agent's attempt still owns the task, else refuse (fencing)."""
        row = txn.get_task(task_id)
        if row is None:
            raise _refusal("foreign", not_found("task", task_id))
        if row["status"] in TASK_FINAL:
            raise _refusal("duplicate", ProtocolError(
                ErrorCode.STALE_ATTEMPT, f"task {task_id} already ended ({TaskStatus(row['status']).name}); this report is discarded"))
        if row["status"] == _T.SUBMITTED:
            raise _refusal("stale", ProtocolError(
                ErrorCode.STALE_ATTEMPT, f"task {task_id} was queued again (its agent was lost or the broker restarted); "
                                         f"this report is discarded"))
        if row["status"] in (_T.PAUSED, _T.CANCELLING):
            raise _refusal("stale", ProtocolError(
                ErrorCode.STALE_ATTEMPT, f"task {task_id} is {TaskStatus(row['status']).name}: its agent was told to stop it; "
                                         f"this report is discarded"))
        if row["attempt"] != attempt:
            # an older attempt is a late report; a newer one was never handed out by this broker
            older = type(attempt) is int and attempt < row["attempt"]
            raise _refusal("stale" if older else "foreign", ProtocolError(
                ErrorCode.STALE_ATTEMPT, f"task {task_id} attempt {attempt} was "
                                         f"{'replaced by' if older else 'never handed out; the current one is'} "
                                         f"attempt {row['attempt']}; this report is discarded"))
        if row["owner_pod_id"] not in ("", agent.agent_id):
            raise _refusal("foreign", ProtocolError(
                ErrorCode.STALE_ATTEMPT, f"task {task_id} is owned by agent {row['owner_pod_id']}, not by "
                                         f"{agent.agent_id}; this report is discarded"))
        return row

    def handle_tasks_started(self: "Broker", req: "Request", txn: Txn) -> None:
        agent = self._agent(req)
        for item in req.header["tasks"]:
            if len(item) != 3 or type(item[0]) is not str or type(item[2]) not in (int, float):
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "tasks items must be [task_id, attempt, started_at]")
        for task_id, attempt, started_at in req.header["tasks"]:
            try:
                row = self._owned(txn, agent, task_id, attempt)
            except ProtocolError as exc:
                log.info("ignoring start of %s from agent %s: %s", task_id, agent.agent_id, exc.message)
                continue
            if row["status"] == _T.DISPATCHED:
                self.state.set_task_status(txn, row, _T.PROCESSING, started_at)
        req.reply()

    def handle_tasks_release(self: "Broker", req: "Request", txn: Txn) -> None:
        """The agent would not run these tasks (a precondition failed): requeue, or end them if that is why."""
        agent = self._agent(req)
        for item in req.header["tasks"]:
            if len(item) != 3 or type(item[0]) is not str or type(item[2]) is not str:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "tasks items must be [task_id, attempt, reason]")
        for task_id, attempt, reason in req.header["tasks"]:
            try:
                row = self._owned(txn, agent, task_id, attempt)
            except ProtocolError as exc:
                log.info("ignoring release of %s from agent %s: %s", task_id, agent.agent_id, exc.message)
                continue
            session_status = self.state.session_status.get(row["session_id"], _S.DELETED)
            log.info("agent %s released task %s: %s", agent.agent_id, task_id, reason)
            if session_status == _S.PAUSED:
                self.state.pause_task(txn, row, req.now, reason)
            elif session_status != _S.RUNNING:
                self.state.end_task(txn, row, _T.CANCELLED, req.now,
                                    f"session is {SessionStatus(session_status).name}: {reason}")
            elif len(row["retry_of_ids"]) > row["options"]["max_retries"]:
                self.state.end_task(txn, row, _T.ERROR, req.now, reason)
            else:
                slot = self.state.task_slot[task_id]
                self.state.core.requeue(slot)
                row["owner_pod_id"] = ""
                self.state.set_task_status(txn, row, _T.SUBMITTED, req.now, reason)
        req.reply()

    def handle_tasks_done(self: "Broker", req: "Request", txn: Txn) -> None:
        agent = self._agent(req)
        accepted, refused = [], []
        #: succeeded, failed, subtasks created: of the completions applied in Python
        tally = [0, 0, 0]

        def apply(completion: dict, frames: list) -> None:
            task_id = completion["task_id"]
            try:
                if completion["ok"] and not completion.get("created_results") and not completion.get("subtasks"):
                    # The common case needs no child transaction nor undo mark: every refusal comes before any
                    # change (write, event, core), and a failure past that point fails the whole request.
                    self._complete_simple(txn, agent, completion, frames, req.now)
                else:
                    mark = req.mark()  # a refused completion takes back what it queued (replies, events)
                    try:
                        with txn.nested() as child:
                            self._complete(child, agent, completion, frames, req.now)
                    except BaseException:
                        req.rollback_to(mark)
                        raise
                accepted.append(task_id)
                if completion["ok"]:
                    tally[0] += 1
                    tally[2] += len(completion.get("subtasks", ()))
                else:
                    tally[1] += 1
            except ProtocolError as exc:
                refused.append([task_id, int(exc.code), exc.message])
                self.metrics.counters[_REFUSAL_COUNTER.get(getattr(exc, "refusal", None), "completions_invalid")] += 1
                if exc.code != ErrorCode.STALE_ATTEMPT:
                    self._fail_bad_completion(txn, agent, completion, exc, req.now)

        # The most common completions (state.complete_simple) are applied in C, the others by ``apply``, in order.
        succeeded = self.state.complete_batch(txn, agent.agent_id, req.header["tasks"], req.frames, req.now, accepted,
                                              apply)
        counters = self.metrics.counters
        counters["tasks_completed"] += succeeded + tally[0]
        counters["tasks_submitted"] += tally[2]
        counters["tasks_failed"] += tally[1]
        req.reply(accepted=accepted, refused=refused)

    def _fail_bad_completion(self: "Broker", txn: Txn, agent: AgentInfo, completion: dict, exc: ProtocolError,
                             now: float) -> None:
        """A completion that cannot be applied ends its task in ERROR, so nothing waits on it forever."""
        try:
            row = self._owned(txn, agent, completion["task_id"], completion["attempt"])
        except ProtocolError:
            return
        if exc.code == ErrorCode.SEGMENT_LOST:  # the data is gone, not wrong: run the task again
            log.warning("task %s: completion refused (%s): the task is retried", row["task_id"], exc)
            self.state.retry_or_fail(txn, row, exc.message, now)
            return
        log.warning("task %s: completion refused (%s): the task ends in ERROR", row["task_id"], exc)
        self.state.end_task(txn, row, _T.ERROR, now, f"invalid completion from agent {agent.agent_id}: {exc.message}")

    def _stamp(self: "Broker", txn: Txn, row: dict, c: dict) -> None:
        """Record the run's timestamps on the row (not stored yet: the outcome stores it)."""
        stamps = c.get("timestamps") or {}
        if row["status"] == _T.DISPATCHED and "started_at" in stamps:
            # The agent folds TASKS_STARTED into the completion of a task that ended before its next
            # report: pass through PROCESSING (event included); the outcome below stores the row once.
            self.state.set_task_status(txn, row, _T.PROCESSING, stamps["started_at"], store=False)
        for name in ("fetched_at", "started_at", "processed_at"):
            if name in stamps:
                row[name] = stamps[name]

    def _complete_simple(self: "Broker", txn: Txn, agent: AgentInfo, c: dict, frames: list, now: float) -> None:
        """Apply a success that creates no result and no subtask, in the request's own transaction.

        Every check runs before anything changes (row, LMDB, core, events): a refused completion leaves
        no trace, so it needs no child transaction of its own (one per task cost more than the rest).
        """
        row = self._owned(txn, agent, c["task_id"], c["attempt"])
        produced = self._produced(txn, row, c, frames, {})
        try:
            self._stamp(txn, row, c)
            self._finish(txn, row, produced, now)
        except ProtocolError as exc:
            # Past the checks nothing may refuse: a refusal now would leave half a completion in the request's
            # transaction, so it fails the whole request (its transaction is undone) instead.
            raise RuntimeError(f"task {c['task_id']}: completion refused after it began to apply: {exc}") from exc

    def _complete(self: "Broker", txn: Txn, agent: AgentInfo, c: dict, frames: list, now: float) -> None:
        """Apply one task's outcome; every side effect of a successful task commits together (ARMONIK.md 2.3)."""
        state = self.state
        row = self._owned(txn, agent, c["task_id"], c["attempt"])
        self._stamp(txn, row, c)
        if not c["ok"]:
            # ArmoniK 2.4: Output(error) ends in ERROR, a deadline in TIMEOUT, an exception or a crash is retried.
            error = c.get("error") or "the task failed without a message"
            if c.get("timeout"):
                state.end_task(txn, row, _T.TIMEOUT, now, error)
            elif c.get("raised"):
                state.retry_or_fail(txn, row, error, now)
            else:
                state.end_task(txn, row, _T.ERROR, now, error)
            return
        task_id = row["task_id"]
        sid = row["session_id"]
        # 1. results the worker created
        created = {}
        for spec in c.get("created_results", ()):
            if txn.get_result(spec["result_id"]) is not None or spec["result_id"] in created:
                raise ProtocolError(ErrorCode.ALREADY_EXISTS, f"result {spec['result_id']} already exists")
            rrow = state.new_result_row(sid, spec["name"], created_by=task_id, result_id=spec["result_id"], now=now)
            state.insert_result(txn, rrow)
            created[rrow["result_id"]] = rrow
        # 2. data it produced: its own expected outputs, or results it created
        produced = self._produced(txn, row, c, frames, created)
        # 3. subtasks, taking over the outputs they list (ownership transfer). They are created before the
        #    data is marked COMPLETED so that every check (here and above) runs before the core changes.
        subtasks = c.get("subtasks", ())
        if subtasks:
            session = state.require_session(txn, sid)
            state.check_submission(session, "worker")
            for s in subtasks:
                if txn.get_task(s["task_id"]) is not None:
                    raise ProtocolError(ErrorCode.ALREADY_EXISTS, f"task {s['task_id']} already exists")
            state.create_tasks(txn, session, list(subtasks), c.get("subtask_options"), now, parent=row,
                               task_ids=[s["task_id"] for s in subtasks])
        self._finish(txn, row, produced, now)

    def _produced(self: "Broker", txn: Txn, row: dict, c: dict, frames: list, created: dict) -> list:
        """Check the data a completion reports; return (result row, data) pairs. Reads only, changes nothing."""
        task_id = row["task_id"]
        sid = row["session_id"]
        specs = c.get("results", ())
        # one result (most tasks): its frames are the completion's (handle_tasks_done counted them)
        data_groups = [frames] if len(specs) == 1 else split_frames(frames, [r["frames"] for r in specs])
        produced = []
        for spec, data in zip(specs, data_groups):
            rid = spec["result_id"]
            rrow = created.get(rid) or txn.get_result(rid)
            if rrow is None or rrow["session_id"] != sid:
                raise not_found("result", rid, sid)
            if rid not in created and rrow["owner_task_id"] != task_id:
                raise ProtocolError(ErrorCode.PERMISSION_DENIED,
                                    f"task {task_id} may not write result {rid}: it is owned by "
                                    f"'{rrow['owner_task_id']}' (only expected outputs and created results)")
            if rrow["status"] != _R.CREATED:
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"result {rid} is {ResultStatus(rrow['status']).name}: written twice?")
            if "segment" in spec:
                data = shm_segments.check(self.segments, spec["segment"], rid)
            produced.append((rrow, data))
        return produced

    def _finish(self: "Broker", txn: Txn, row: dict, produced: list, now: float) -> None:
        """Store a successful task's data and end it COMPLETED (steps 4 and 5 of ``_complete``)."""
        state = self.state
        task_id = row["task_id"]
        # 4. the data, which releases waiting tasks (subtasks included)
        written = set()
        for rrow, data in produced:
            if isinstance(data, shm_segments.SegmentRef):
                state.mark_result_completed(txn, rrow, shm_segments.store(txn, rrow["result_id"], data), task_id, now)
            else:
                state.complete_result(txn, rrow, data, task_id, now)
            written.add(rrow["result_id"])
        # 5. ArmoniK only logs an expected output that was neither written nor handed to a subtask
        for rid in row["expected_output_ids"]:
            if rid in written:
                continue
            rrow = txn.get_result(rid)
            if rrow is not None and rrow["owner_task_id"] == task_id and rrow["status"] == _R.CREATED:
                log.warning("task %s completed without writing its expected output %s", task_id, rid)
        row["error"] = None
        state.set_task_status(txn, row, _T.COMPLETED, now)
        state._task_ended(task_id)

    # -- dispatch ----------------------------------------------------------------------------------

    @staticmethod
    def _inline_inputs(txn: Txn, row: dict, limit: int, seen: dict) -> tuple[list[str], list]:
        """Return the task's inputs small enough to travel inside DISPATCH, and their data.

        ``seen`` keeps each input's (size, inline data) for the rest of the dispatch, which writes no
        data: tasks sharing a payload read it once. Raise when an input has no data any more (deleted
        since the task was queued, or an imported object gone from the object storage): the task
        could never run.
        """
        inline, data = [], []
        for rid in dict.fromkeys([row["payload_id"], *row["data_dependencies"]]):
            known = seen.get(rid)
            if known is None:
                known = txn.small_object(rid, limit)
                if known is None:
                    raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"input result {rid} has no data any more")
                seen[rid] = known
            if known[0] <= limit:
                inline.append(rid)
                data.append(known[1])
        return inline, data

    def dispatch(self: "Broker", txn: Txn, now: float) -> None:
        """Hand ready tasks to agents with credit; one DISPATCH message per agent per turn."""
        state = self.state
        #: payload id -> _inline_inputs' answer for the tasks with no other input (most): they share it; this turn's
        #: submits left theirs (state.new_payloads)
        payload_answers = state.new_payloads
        if payload_answers:
            state.new_payloads = {}
        if not state.core.n_ready():  # e.g. after a lone task's joined report: no closure nor dicts for nothing
            return
        #: agent slot -> its DISPATCH's tasks (written as they come: DISPATCH_TASK_KEYS), inline counts and frames
        per_agent: dict[int, tuple[DispatchMessage, list, list]] = {}
        inline_limit = self.config.inline_limit
        inputs_seen: dict = {}

        def slow(a: int, agent: AgentInfo, row: dict) -> None:
            session_status = state.session_status.get(row["session_id"], _S.DELETED)
            if session_status == _S.PAUSED:
                # ArmoniK 3.3: a paused session's task is not run, nor cancelled: it waits PAUSED.
                state.pause_task(txn, row, now)
                return
            if session_status != _S.RUNNING:
                state.end_task(txn, row, _T.CANCELLED, now,
                               f"session {row['session_id']} is {SessionStatus(session_status).name}")
                return
            try:
                if row["data_dependencies"]:
                    inline, data = self._inline_inputs(txn, row, inline_limit, inputs_seen)
                else:
                    answer = payload_answers.get(row["payload_id"])
                    if answer is None:
                        answer = payload_answers[row["payload_id"]] = self._inline_inputs(txn, row, inline_limit,
                                                                                          inputs_seen)
                    inline, data = answer
            except ProtocolError as exc:
                state.end_task(txn, row, _T.ERROR, now, exc.message)
                return
            deps = row["data_dependencies"]
            if len(inline) <= len(deps) and len(inline) < (len(dict.fromkeys([row["payload_id"], *deps])) if deps else 1):
                # the agent maps or fetches the other inputs, which it can read only once this turn is committed
                self.dispatch_after_commit.add(agent.peer)
            row["attempt"] += 1
            row["owner_pod_id"] = agent.agent_id
            row["pod_hostname"] = agent.hostname
            row["received_at"] = now
            state.set_task_status(txn, row, _T.DISPATCHED, now)
            message = per_agent.get(a)
            if message is None:
                message = per_agent[a] = (DispatchMessage(pack), [], [])
            message[0].add(row, session_status, packed_options(row["options"]), inline)
            message[1].append(len(inline))
            message[2].extend(data)

        # The most common tasks (a running session's, their payload inlined as the ones before: dispatch_batch) are
        # written in C, the others by ``slow``, in order.
        state.dispatch_batch(txn, state.core.dispatch(), now, self.agent_by_slot, state.session_status, payload_answers,
                             per_agent, slow, pack)
        for a, (tasks, counts, frames) in per_agent.items():
            agent = self.agent_by_slot[a]
            header = tasks.header(Op.DISPATCH, 0, PROTOCOL_VERSION, counts)
            self.send_backend(agent.peer, [header, *frames], on_fail=agent)
