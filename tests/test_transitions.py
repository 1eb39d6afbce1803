"""The compiled task and result transitions (``_core.Transitions``, bound by BrokerState) against the Python they
replaced: the same rows, tables, events, core slots and refusals, over hypothesis-drawn task graphs and moves."""

from __future__ import annotations

import time

from hypothesis import given, settings, strategies as st

from armonik_zmq.broker import state as state_module
from armonik_zmq.broker.backend import AgentInfo, Backend
from armonik_zmq.broker import store
from armonik_zmq.broker.events import EventBus
from armonik_zmq.broker.state import _STAMP, BrokerState
from armonik_zmq.protocol import ProtocolError, split_frames
from armonik_zmq.status import EventTypes, IllegalTransition, ResultStatus, TaskStatus, check_task_transition

_T = TaskStatus


class _RecordingBus(EventBus):
    """A session "s" subscribed to some event types (``types``; empty: all), and every event it gets, with a copy of
    its row at that moment."""

    def __init__(self, types=()):
        super().__init__()
        self.log = []
        self.subscribe(b"peer", 1, "s", list(types), None, None)

    def _emit(self, session_id, etype, body, row, is_task, data=None):
        self.log.append((int(etype), dict(body), dict(row), data))
        super()._emit(session_id, etype, body, row, is_task, data)


#: the event types a session's subscription may want (none drawn: all of them)
_event_types = st.sets(st.sampled_from([t for t in EventTypes if t]), max_size=3)


def _use_python_transitions(state: BrokerState) -> None:
    """Give ``state`` the transitions as they were written in Python before ``_core.Transitions``."""

    def set_task_status(txn, row, status, now, message=None, store=True):
        was = row["status"]
        check_task_transition(was, status)
        row["status"] = int(status)
        stamp = _STAMP.get(status)
        if stamp:
            row[stamp] = now
        if message is not None:
            row["status_message"] = message
        if store or (was == _T.SUBMITTED) != (status == _T.SUBMITTED):
            txn.put_task(row, was=was)
        state.events.task_status(row)

    def task_ended(task_id):
        slot = state.task_slot.pop(task_id, None)
        if slot is not None:
            del state.slot_task[slot]
            state.core.free_task(slot)

    def set_completed(row, size, completed_by, now):
        row["status"] = int(ResultStatus.COMPLETED)
        row["size"] = size
        row["completed_at"] = now
        row["completed_by"] = completed_by

    def mark_result_completed(txn, row, size, completed_by, now, data=None):
        set_completed(row, size, completed_by, now)
        txn.put_result(row)
        state.events.result_status(row, data)
        slot = state.result_slot.pop(row["result_id"], None)
        if slot is None:
            return
        for t in state.core.on_result_ready(slot):
            set_task_status(txn, txn.get_task(state.slot_task[t]), _T.SUBMITTED, now)
        state.core.free_result(slot)

    def complete_result(txn, row, data, completed_by, now):
        mark_result_completed(txn, row, txn.put_object(row["result_id"], data), completed_by, now, data)

    def add_to_core(task_id, opts, missing):
        slots = []
        for rid in missing:
            slot = state.result_slot.get(rid)
            if slot is None:
                slot = state.result_slot[rid] = state.core.new_result()
            slots.append(slot)
        tslot = state.core.add_task(state.partition_slot.get(opts["partition_id"], 0), opts["priority"], slots)
        state.task_slot[task_id] = tslot
        state.slot_task[tslot] = task_id

    def insert_task(txn, row, missing):
        txn.put_task(row, new=True)
        state.events.new_task(row)
        add_to_core(row["task_id"], row["options"], missing)

    def give_result(txn, rrow, task_id, new=False):
        previous = rrow["owner_task_id"]
        rrow["owner_task_id"] = task_id
        txn.put_result(rrow, new=new)
        state.events.result_owner(rrow, previous)

    state.set_task_status = set_task_status
    state._add_to_core = add_to_core
    state._insert_task = insert_task
    state._give_result = give_result
    state._task_ended = task_ended
    state._set_completed = set_completed
    state.mark_result_completed = mark_result_completed
    state.complete_result = complete_result


def _two_sides(base, types, python=None) -> list:
    """Two brokers' stores and states on real LMDB: "compiled" as built, "python" with ``python(state)`` applied
    (what swaps the compiled path for the Python reference)."""
    sides = []
    for name in ("compiled", "python"):
        state = BrokerState(["default"], _RecordingBus(types))
        if name == "python" and python is not None:
            python(state)
        sides.append((store.Store(str(base / name), map_size=1 << 24, sync=False), state))
    return sides


def _observed(txn, st_, state: BrokerState, outcomes: list) -> tuple:
    """What a side ends with, to compare: the moves' outcomes, the tables, the event log, the slot dicts and the
    core's states and counts."""
    tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.tasks, st_.results, st_.live_tasks, st_.data)]
    return (outcomes, tables, state.events.log, dict(state.task_slot), dict(state.slot_task),
            dict(state.result_slot), [state.core.state(t) for t in sorted(state.slot_task)],
            state.core.n_ready(), state.core.n_waiting(), state.core.n_dispatched())


def _play_both(sides: list, play) -> None:
    """``play`` each side (its store and state first): both end the same, and the compiled side's core is
    consistent. The stores are closed whatever happens."""
    try:
        compiled, python = (play(*side) for side in sides)
        assert compiled == python
        sides[0][1].core.validate()
    finally:
        for side in sides:
            side[0].close()


def _by_rank(seen, ids: list) -> str:
    """``repr(seen)`` with each side's own ids (``ids``: (id, label) pairs) replaced by their labels, so that two
    sides that made their ids apart compare by rank."""
    text = repr(seen)
    for id_, label in ids:
        text = text.replace(id_, label)
    return text


_graphs = st.lists(st.lists(st.integers(0, 11), max_size=3), min_size=1, max_size=12)
_moves = st.lists(st.tuples(st.sampled_from(["run", "dispatch", "complete", "fail", "cancel", "illegal"]),
                            st.integers(0, 11), st.sampled_from(list(_T))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(_graphs, _moves, _event_types)
def test_compiled_transitions_move_tasks_and_results_as_the_python_they_replaced(tmp_path_factory, graph, moves,
                                                                                   types):
    """Task i lists as inputs the outputs of the earlier tasks named in ``graph[i]``; the moves run, dispatch,
    complete, fail or cancel tasks (or try a transition that may be illegal) on both sides."""
    base = tmp_path_factory.mktemp("moves")
    now = time.time()
    sides = _two_sides(base, types, _use_python_transitions)
    for _, state in sides:
        state.core.add_agent([0], 1 << 20)
    session = {"session_id": "s", "status": 1, "partition_ids": ["default"],
               "options": {"max_duration": 60.0, "priority": 1, "max_retries": 1}}

    def play(st_, state):
        outcomes = []
        with st_.write() as txn:
            payload = state.new_result_row("s", "payload", result_id="payload", now=now)
            state.insert_completed_result(txn, payload, b"data", now)
            for i, inputs in enumerate(graph):
                out = state.new_result_row("s", f"o{i}", result_id=f"o{i}", now=now)
                state.insert_result(txn, out)
                deps = [f"o{j}" for j in dict.fromkeys(inputs) if j < i]
                state.create_tasks(txn, session, [{"payload_id": "payload", "data_dependencies": deps,
                                                   "expected_output_ids": [f"o{i}"]}], None, now, task_ids=[f"t{i}"])
            for kind, i, status in moves:
                row = txn.get_task(f"t{i % len(graph)}")
                try:
                    if kind in ("run", "dispatch"):
                        state.set_task_status(txn, row, _T.DISPATCHED, now + 1)
                        if kind == "run":
                            state.set_task_status(txn, row, _T.PROCESSING, now + 2, store=False)
                            rrow = txn.get_result(row["expected_output_ids"][0])
                            if rrow["status"] == ResultStatus.CREATED:
                                state.complete_result(txn, rrow, [b"out", b"put"], row["task_id"], now + 3)
                            state.set_task_status(txn, row, _T.COMPLETED, now + 3)
                            state._task_ended(row["task_id"])
                    elif kind == "complete":
                        rrow = txn.get_result(row["expected_output_ids"][0])
                        if rrow["status"] == ResultStatus.CREATED:
                            state.mark_result_completed(txn, rrow, 7, "someone", now + 4)
                    elif kind == "fail":
                        state.end_task(txn, row, _T.ERROR, now + 5, "failed")
                    elif kind == "cancel":
                        state.cancel_task(txn, row, now + 6, "cancelled")
                    else:
                        state.set_task_status(txn, row, status, now + 7, message="tried", store=i % 2 == 0)
                    outcomes.append("ok")
                except IllegalTransition as exc:
                    outcomes.append(str(exc))
            return _observed(txn, st_, state, outcomes)

    _play_both(sides, play)


class _Agents(Backend):
    """The agents' side of a broker (its completion paths) over a state, without the server around it."""

    def __init__(self, state: BrokerState):
        self.state = state
        self.segments = None


def _declines(*args):
    """A ``complete_simple`` that leaves every completion to Python."""
    return False


def _python_batch(state, txn, agent_id, completions, frames, now, accepted, slow):
    """``Transitions.complete_batch`` as Backend.handle_tasks_done did it in Python."""
    groups = split_frames(frames, [sum(r["frames"] for r in c.get("results") or ()) for c in completions])
    applied = 0
    for c, group in zip(completions, groups):
        if (c["ok"] and not c.get("created_results") and not c.get("subtasks")
                and state.complete_simple(txn, agent_id, c, group, now)):
            accepted.append(c["task_id"])
            applied += 1
        else:
            slow(c, group)
    return applied


#: how a task stands when its completion comes: (status reached, its agent); mostly held by agent a, which reports
_STANDINGS = [("dispatched", "a"), ("processing", "a")] * 3 + [("queued", ""), ("dispatched", "b"), ("completed", "a")]
#: what a completion's results name: (mostly) its expected outputs, none, the task's first or second output,
#: another task's, an unknown result, both its outputs, or its first output as a shared-memory segment
_WRITES = ["expected"] * 6 + ["none", "own", "second", "other", "unknown", "both", "segment", "failed", "creates"]
_completions = st.lists(st.tuples(st.integers(0, 6), st.sampled_from([1, 1, 1, 0, 2]), st.sampled_from(_WRITES),
                                  st.sets(st.sampled_from(["fetched_at", "started_at", "processed_at"]))),
                        min_size=1, max_size=10)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_STANDINGS), st.sampled_from([1, 1, 0, 2])), min_size=1, max_size=6),
       _completions, _event_types, st.booleans())
def test_a_compiled_completion_applies_or_leaves_to_python_what_the_python_path_would(tmp_path_factory, tasks,
                                                                                        completions, types,
                                                                                        extra_frame):
    """``Transitions.complete_batch`` and ``complete_simple`` against the Python loop of TASKS_DONE with
    ``Backend._complete_simple`` alone: task i stands as drawn, with 0-2 expected outputs; the completions name a
    task (one past the last: unknown), an attempt (the current one is 1), what they write (in one frame or two),
    their timestamps, or fail, or create a result; ``extra_frame``: the message has one frame too many. Outcomes
    (refusals' codes, messages and kinds, what goes to Python with which frames, in order), tables, events and
    core slots agree."""
    base = tmp_path_factory.mktemp("completions")
    now = time.time()
    sides = [(st_, state, _Agents(state)) for st_, state in
             _two_sides(base, types, lambda state: setattr(state, "complete_simple", _declines))]
    session = {"session_id": "s", "status": 1, "partition_ids": ["default"],
               "options": {"max_duration": 60.0, "priority": 1, "max_retries": 1}}

    def play(st_, state, agents):
        outcomes = []
        slots = {name: state.core.add_agent([0], 1 << 20) for name in ("a", "b")}
        with st_.write() as txn:
            payload = state.new_result_row("s", "payload", result_id="payload", now=now)
            state.insert_completed_result(txn, payload, b"data", now)
            for i, ((standing, agent), n_outputs) in enumerate(tasks):
                outputs = [f"o{i}.{k}" for k in range(max(n_outputs, 1))]
                for rid in outputs:
                    state.insert_result(txn, state.new_result_row("s", rid, result_id=rid, now=now))
                state.create_tasks(txn, session, [{"payload_id": "payload", "expected_output_ids": outputs[:n_outputs]}],
                                   None, now, task_ids=[f"t{i}"])
                row = txn.get_task(f"t{i}")
                if standing != "queued":
                    state.core.adopt(state.task_slot[f"t{i}"], slots[agent])
                    row.update(attempt=1, owner_pod_id=agent)
                    state.set_task_status(txn, row, _T.DISPATCHED, now + 1)
                if standing in ("processing", "completed"):
                    state.set_task_status(txn, row, _T.PROCESSING, now + 2)
                if standing == "completed":
                    state.set_task_status(txn, row, _T.COMPLETED, now + 3)
                    state._task_ended(f"t{i}")
            batch, frames = [], []
            for j, (i, attempt, writes, stamps) in enumerate(completions):
                i %= len(tasks) + 1  # the last one: an unknown task
                own = [f"o{i}.0", f"o{i}.1"]
                specs = {"expected": own[:tasks[i][1]] if i < len(tasks) else own[:1], "none": [], "own": own[:1],
                         "second": own[1:], "other": [f"o{(i + 1) % len(tasks)}.0"], "unknown": ["nowhere"],
                         "both": own, "segment": own[:1], "failed": [], "creates": own[:1]}[writes]
                completion = {"task_id": f"t{i}" if i < len(tasks) else "unknown", "attempt": attempt,
                              "ok": writes != "failed", "timestamps": {name: now + 10 + j for name in sorted(stamps)}}
                if specs:  # a result's data in one frame, or in two every third completion
                    completion["results"] = [{"result_id": rid, "frames": 1 + (j % 3 == 0 and k == 0)}
                                             for k, rid in enumerate(specs)]
                if writes == "segment":
                    completion["results"][0]["segment"] = {"token": "t", "size": 1, "checksum": "c"}
                if writes == "creates":
                    completion["created_results"] = [{"result_id": "new", "name": "new"}]
                batch.append(completion)
                frames += [f"data {j} {k}".encode() for r in completion.get("results", ()) for k in range(r["frames"])]
            if extra_frame:
                frames.append(b"one too many")
            accepted = []

            def slow(completion, data):
                # what Backend.handle_tasks_done does with the others, only recorded for those it nests
                if not completion["ok"] or completion.get("created_results"):
                    outcomes.append(("nested", completion["task_id"], data))
                    return
                try:
                    agents._complete_simple(txn, agents.agents["a"], completion, data, now + 20)
                    accepted.append(completion["task_id"])
                except ProtocolError as exc:
                    outcomes.append((exc.code, exc.message, getattr(exc, "refusal", None)))

            try:
                if state.complete_simple is _declines:
                    applied = _python_batch(state, txn, "a", batch, frames, now + 20, accepted, slow)
                else:
                    applied = state.complete_batch(txn, "a", batch, frames, now + 20, accepted, slow)
                # applied in C or in Python: the same completions, in the same order
                outcomes.append(("accepted", accepted, applied <= len(accepted)))
            except ProtocolError as exc:
                outcomes.append((exc.code, exc.message))
            return _observed(txn, st_, state, outcomes)

    for _, state, agents in sides:
        agents.agents = {"a": AgentInfo("a", b"peer", 0, "host", 1, ["default"], 0.0)}
    _play_both(sides, play)


#: an input of a new task: the payload (with data), a result without data yet, an aborted one, one of another
#: session, an unknown one
_INPUTS = ["payload", "waiting", "aborted", "foreign", "unknown"]
_VALID_INPUTS = ["payload", "waiting"]
#: an output of a new task: its own new result, the next task's (two tasks list it), one with data, an unknown one,
#: or one announced by the request (SUBMIT_INLINE) and not stored yet
_OUTPUTS = ["own"] * 12 + ["inline"] * 3 + ["next", "done", "unknown"]
_creations = st.lists(st.tuples(st.sampled_from(_VALID_INPUTS * 8 + _INPUTS),
                                st.lists(st.sampled_from(_VALID_INPUTS * 8 + _INPUTS), max_size=3),
                                st.lists(st.sampled_from(_OUTPUTS), min_size=1, max_size=2),
                                st.sampled_from([None] * 12 + [{}, {"priority": 3}, {"priority": 0}])),
                      min_size=0, max_size=8)


@settings(max_examples=100, deadline=None)
@given(_creations, st.sampled_from([1, 1, 1, 3]), st.sampled_from([None, None, {"priority": 2}, {"max_retries": -1}]),
       _event_types, st.booleans())
def test_compiled_task_creation_creates_or_leaves_to_python_what_create_tasks_would(tmp_path_factory, creations,
                                                                                     session_status, request_options,
                                                                                     types, payload_given):
    """``Transitions.create_tasks_simple`` then the rest of ``create_tasks`` when it declines, against that rest
    alone: tasks with inputs of every status (or none), outputs shared, written, unknown or announced by the request,
    options of their own (valid or not) or not, in a running or paused session, request options valid or not, the
    payload's row given (``new_inputs``, as SUBMIT_INLINE gives its payloads) or read. The infos or the refusal,
    tables, events and core slots agree."""
    base = tmp_path_factory.mktemp("creations")
    now = time.time()
    sides = _two_sides(base, types, lambda state: setattr(state, "_create_tasks_simple", lambda *args: None))
    session = {"session_id": "s", "status": session_status, "partition_ids": ["default"],
               "options": {"max_duration": 60.0, "priority": 1, "max_retries": 1}}

    def play(st_, state):
        with st_.write() as txn:
            for rid, sid, status in (("payload", "s", "done"), ("waiting", "s", ""), ("aborted", "s", "abort"),
                                     ("foreign", "t", "done"), ("done", "s", "done")):
                row = state.new_result_row(sid, rid, result_id=rid, now=now)
                if status == "done":
                    state.insert_completed_result(txn, row, b"data", now)
                else:
                    state.insert_result(txn, row)
                    if status == "abort":
                        state.abort_result(txn, row)
            specs, inline = [], {}
            for i, (payload, deps, outputs, options) in enumerate(creations):
                out_ids = []
                for kind in outputs:
                    rid = {"own": f"o{i}", "next": f"o{i + 1}", "inline": f"inline{i}"}.get(kind, kind)
                    if kind == "inline":
                        inline[rid] = state.new_result_row("s", rid, result_id=rid, now=now)
                        state.announce_result(inline[rid])
                    elif kind in ("own", "next") and txn.get_result(rid) is None:
                        state.insert_result(txn, state.new_result_row("s", rid, result_id=rid, now=now))
                    out_ids.append(rid)
                spec = {"payload_id": payload, "expected_output_ids": out_ids}
                if deps:
                    spec["data_dependencies"] = deps
                if options is not None:
                    spec["options"] = options
                specs.append(spec)
            if inline:  # one the request announced and no task lists: stored as made
                inline["unlisted"] = state.new_result_row("s", "unlisted", result_id="unlisted", now=now)
                state.announce_result(inline["unlisted"])
            try:
                outcome = state.create_tasks(txn, session, specs, request_options, now + 1,
                                             task_ids=[f"t{i}" for i in range(len(specs))], new_outputs=inline or None,
                                             new_inputs={"payload": txn.get_result("payload")} if payload_given else None)
            except ProtocolError as exc:
                outcome = (exc.code, exc.message)
            tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.tasks, st_.results, st_.live_tasks,
                                                                         st_.session_index)]
        return (outcome, tables, state.events.log, dict(state.task_slot), dict(state.slot_task),
                dict(state.result_slot), [(state.core.state(t), state.core.missing(t)) for t in sorted(state.slot_task)],
                state.core.n_ready(), state.core.n_waiting())

    _play_both(sides, play)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=5), st.sampled_from([None, True, False])), max_size=6), _event_types)
def test_compiled_result_creation_makes_the_rows_new_result_row_and_insert_result_make(tmp_path_factory, specs, types):
    """``Transitions.create_results`` (CREATE_RESULTS_METADATA) against ``new_result_row`` then ``insert_result`` per
    spec: the same rows, tables and events, ids aside (each side makes its own: compared by rank)."""
    base = tmp_path_factory.mktemp("results")
    now = time.time()
    sides = [(*side, compiled) for side, compiled in zip(_two_sides(base, types), (True, False))]
    wire = [{"name": n, **({} if manual is None else {"manual_deletion": manual})} for n, manual in specs]

    def play(st_, state, compiled):
        with st_.write() as txn:
            if compiled:
                rows = state.create_results(txn, "s", wire, now)
            else:
                rows = []
                for spec in wire:
                    row = state.new_result_row("s", spec["name"], manual_deletion=spec.get("manual_deletion", False),
                                               now=now)
                    state.insert_result(txn, row)
                    rows.append(row)
            tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.results, st_.session_index)]
        return _by_rank((rows, [list(r) for r in rows], tables, state.events.log),
                        [(row["result_id"], f"<result {rank}>") for rank, row in enumerate(rows)])

    _play_both(sides, play)


class _Dispatcher(_Agents):
    """``_Agents`` that dispatch: agents a and b (core slots, peers), a small inline limit, DISPATCHes recorded."""

    def __init__(self, state: BrokerState):
        super().__init__(state)
        self.config = type("Config", (), {"inline_limit": 4})()
        self.dispatch_after_commit = set()
        self.sent = []
        self.agents, self.agent_by_slot = {}, {}
        for name, capacity in (("a", 5), ("b", 3)):
            slot = state.core.add_agent([0], capacity)
            self.agents[name] = self.agent_by_slot[slot] = AgentInfo(name, f"peer {name}".encode(), slot, f"host {name}",
                                                                     capacity, ["default"], 0.0)

    def send_backend(self, peer, frames, on_fail=None):
        self.sent.append((peer, [bytes(f) for f in frames], on_fail.agent_id))


def _python_dispatch_batch(txn, pairs, now, agent_by_slot, session_status, payload_answers, per_agent, slow,
                           fallback=None):
    """``Transitions.dispatch_batch`` leaving every task to Backend.dispatch's Python."""
    for a, t in pairs:
        slow(a, agent_by_slot[a], txn.get_task(_python_dispatch_batch.state.slot_task[t]))


#: a task's session (running, paused, cancelled, deleted) and payload (inline, too large to be, without data)
_to_dispatch = st.lists(st.tuples(st.sampled_from(["s"] * 6 + ["paused", "cancelled", "deleted"]),
                                  st.sampled_from(["small"] * 6 + ["large", "gone"]), st.booleans()),
                        min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(_to_dispatch, _event_types)
def test_compiled_dispatch_hands_out_tasks_as_the_python_dispatch(tmp_path_factory, tasks, types):
    """``Transitions.dispatch_batch`` then Backend.dispatch's Python for the rest, against that Python alone: tasks of
    running, paused, cancelled or deleted sessions, their payload small enough to travel inline, too large, or
    without data, some with a data dependency, two agents of 5 and 3 slots. The DISPATCH bytes sent to each agent,
    the agents told to wait for the commit, tables, events and core slots agree."""
    base = tmp_path_factory.mktemp("dispatch")
    now = time.time()
    def python(state):
        state.dispatch_batch = _python_dispatch_batch
        _python_dispatch_batch.state = state

    sides = _two_sides(base, types, python)

    def play(st_, state):
        host = _Dispatcher(state)
        with st_.write() as txn:
            for sid in ("s", "paused", "cancelled", "deleted"):
                for rid, size in (("small", 2), ("large", 10), ("gone", 1), ("dep", 3)):
                    row = state.new_result_row(sid, rid, result_id=f"{sid}.{rid}", now=now)
                    state.insert_completed_result(txn, row, (rid[0] * size).encode(), now)
                txn.delete_object(f"{sid}.gone")
            for i, (sid, payload, with_dep) in enumerate(tasks):
                session = {"session_id": sid, "status": 1, "partition_ids": ["default"],
                           "options": {"max_duration": 60.0, "priority": 1, "max_retries": 1}}
                state.session_status[sid] = 1
                out = state.new_result_row(sid, f"o{i}", result_id=f"o{i}", now=now)
                state.insert_result(txn, out)
                state.create_tasks(txn, session, [{"payload_id": f"{sid}.{payload}", "expected_output_ids": [f"o{i}"],
                                                   **({"data_dependencies": [f"{sid}.dep"]} if with_dep else {})}],
                                   None, now, task_ids=[f"t{i}"])
            state.session_status.update(paused=3, cancelled=2)
            state.session_status.pop("deleted", None)
            host.dispatch(txn, now + 1)
            tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.tasks, st_.results, st_.live_tasks)]
        return (host.sent, host.dispatch_after_commit, tables, state.events.log, dict(state.task_slot),
                [state.core.state(t) for t in sorted(state.slot_task)], state.core.n_ready(),
                state.core.n_dispatched())

    _play_both(sides, play)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, "", "t", "é"]), st.sampled_from([None, [], ["d"]]),
                          st.sampled_from([None, {"priority": 2}]),
                          st.sampled_from([[b""], [b"ab"], [b"abcdef"], [b"a", b"b"], []])), max_size=5), _event_types)
def test_compiled_inline_results_make_the_rows_the_python_makes(tmp_path_factory, tasks, types):
    """``Transitions.inline_results`` (SUBMIT_INLINE's payloads and outputs) against new_result_row +
    insert_completed_result, then new_result_row + announce_result, per task: the same creations, rows, tables,
    events and payloads left for the dispatch (an inline limit of 4 bytes), ids aside (compared by rank)."""
    base = tmp_path_factory.mktemp("inline")
    now = time.time()
    sides = [(*side, compiled) for side, compiled in zip(_two_sides(base, types), (True, False))]
    specs = [{**({} if name is None else {"name": name}), **({} if deps is None else {"data_dependencies": deps}),
              **({} if opts is None else {"options": opts})} for name, deps, opts, _ in tasks]
    groups = [[memoryview(f) for f in frames] for *_, frames in tasks]

    def play(st_, state, compiled):
        with st_.write() as txn:
            if compiled:
                out = state.inline_results(txn, "s", specs, groups, now, state.new_payloads, 4)
            else:
                creations, payloads, outputs = [], {}, {}
                for spec, data in zip(specs, groups):
                    name = spec.get("name") or "task"
                    payload = state.new_result_row("s", f"{name}-payload", now=now)
                    state.insert_completed_result(txn, payload, data, now)
                    payloads[payload["result_id"]] = payload
                    if len(data) == 1 and len(data[0]) <= 4:
                        state.new_payloads[payload["result_id"]] = ([payload["result_id"]], data)
                    output = state.new_result_row("s", name, now=now)
                    state.announce_result(output)
                    outputs[output["result_id"]] = output
                    creations.append({"payload_id": payload["result_id"], "expected_output_ids": [output["result_id"]],
                                      "data_dependencies": spec.get("data_dependencies", []),
                                      "options": spec.get("options")})
                out = creations, payloads, outputs
            tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.results, st_.session_index, st_.data)]
        left = {k: (v[0], [bytes(f) for f in v[1]]) for k, v in state.new_payloads.items()}
        ids = [pair for rank, creation in enumerate(out[0])
               for pair in ((creation["payload_id"], f"<payload {rank}>"),
                            (creation["expected_output_ids"][0], f"<output {rank}>"))]
        return _by_rank((out, [list(r) for r in out[1].values()], tables, state.events.log, left), ids)

    _play_both(sides, play)


def test_a_payload_left_by_its_submit_is_dispatched_from_memory_until_its_data_is_deleted(tmp_path):
    """A submit leaves its payloads' data for the dispatch of its turn (state.new_payloads): the DISPATCH carries
    it as read back from LMDB, and once the data is deleted in that turn, the task ends in ERROR as it did before
    (the dispatch takes the answers it was left, and the deletion drops its own)."""
    now = time.time()
    st_ = store.Store(str(tmp_path), map_size=1 << 24, sync=False)
    try:
        state = BrokerState(["default"], EventBus())
        host = _Dispatcher(state)
        session = {"session_id": "s", "status": 1, "partition_ids": ["default"],
                   "options": {"max_duration": 60.0, "priority": 1, "max_retries": 1}}
        state.session_status["s"] = 1
        with st_.write() as txn:
            for i in range(2):
                payload = state.new_result_row("s", f"p{i}", result_id=f"p{i}", now=now)
                state.insert_completed_result(txn, payload, [memoryview(b"ab")], now)
                state.new_payloads[f"p{i}"] = ([f"p{i}"], [memoryview(b"ab")])  # as handle_submit_inline leaves it
                state.insert_result(txn, state.new_result_row("s", f"o{i}", result_id=f"o{i}", now=now))
                state.create_tasks(txn, session, [{"payload_id": f"p{i}", "expected_output_ids": [f"o{i}"]}], None, now,
                                   task_ids=[f"t{i}"])
            state.delete_result_data(txn, txn.get_result("p1"))
            host.dispatch(txn, now + 1)
            assert state.new_payloads == {}
            assert txn.get_task("t0")["status"] == TaskStatus.DISPATCHED
            assert txn.get_task("t1")["status"] == TaskStatus.ERROR
            [(peer, frames, _)] = host.sent
            assert frames[1:] == [b"ab"]
    finally:
        st_.close()


def test_the_state_binds_the_compiled_transitions():
    """BrokerState's transition methods are the compiled ones (the test above compares them with Python)."""
    state = BrokerState(["default"], EventBus())
    for name in ("set_task_status", "_task_ended", "_set_completed", "mark_result_completed", "complete_result",
                 "_add_to_core", "_insert_task", "_give_result", "complete_simple", "_create_tasks_simple",
                 "create_results", "complete_batch", "dispatch_batch", "inline_results"):
        assert type(getattr(state, name).__self__) is state_module.Transitions, name
