"""The compiled task and result transitions (``_core.Transitions``, bound by BrokerState) against the Python they
replaced: the same rows, tables, events, core slots and refusals, over hypothesis-drawn task graphs and moves."""

from __future__ import annotations

import time

from hypothesis import given, settings, strategies as st

from armonik_zmq.broker import state as state_module
from armonik_zmq.broker import store
from armonik_zmq.broker.events import EventBus
from armonik_zmq.broker.state import _STAMP, BrokerState
from armonik_zmq.status import IllegalTransition, ResultStatus, TaskStatus, check_task_transition

_T = TaskStatus


class _RecordingBus(EventBus):
    """Every task and result event, with a copy of its row at that moment."""

    def __init__(self):
        super().__init__()
        self.log = []

    def task_status(self, row):
        self.log.append(("task", dict(row)))
        super().task_status(row)

    def result_status(self, row, data=None):
        self.log.append(("result", dict(row), data))
        super().result_status(row, data)

    def new_task(self, row):
        self.log.append(("new task", dict(row)))
        super().new_task(row)

    def result_owner(self, row, previous):
        self.log.append(("owner", dict(row), previous))
        super().result_owner(row, previous)


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


_graphs = st.lists(st.lists(st.integers(0, 11), max_size=3), min_size=1, max_size=12)
_moves = st.lists(st.tuples(st.sampled_from(["run", "dispatch", "complete", "fail", "cancel", "illegal"]),
                            st.integers(0, 11), st.sampled_from(list(_T))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(_graphs, _moves)
def test_compiled_transitions_move_tasks_and_results_as_the_python_they_replaced(tmp_path_factory, graph, moves):
    """Task i lists as inputs the outputs of the earlier tasks named in ``graph[i]``; the moves run, dispatch,
    complete, fail or cancel tasks (or try a transition that may be illegal) on both sides."""
    base = tmp_path_factory.mktemp("moves")
    now = time.time()
    sides = []
    for name in ("compiled", "python"):
        st_ = store.Store(str(base / name), map_size=1 << 24, sync=False)
        state = BrokerState(["default"], _RecordingBus())
        if name == "python":
            _use_python_transitions(state)
        state.core.add_agent([0], 1 << 20)
        sides.append((st_, state))
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
            tables = [list(txn.txn.cursor(db=db).iternext()) for db in (st_.tasks, st_.results, st_.live_tasks,
                                                                         st_.data)]
        return (outcomes, tables, state.events.log, dict(state.task_slot), dict(state.slot_task),
                dict(state.result_slot), [state.core.state(t) for t in sorted(state.slot_task)],
                state.core.n_ready(), state.core.n_waiting(), state.core.n_dispatched())

    try:
        compiled, python = (play(*side) for side in sides)
        assert compiled == python
        sides[0][1].core.validate()
    finally:
        for st_, _ in sides:
            st_.close()


def test_the_state_binds_the_compiled_transitions():
    """BrokerState's transition methods are the compiled ones (the test above compares them with Python)."""
    state = BrokerState(["default"], EventBus())
    for name in ("set_task_status", "_task_ended", "_set_completed", "mark_result_completed", "complete_result",
                 "_add_to_core", "_insert_task", "_give_result"):
        assert type(getattr(state, name).__self__) is state_module.Transitions, name
