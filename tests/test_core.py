"""Test the Cython dispatch core: differentially against tests/model.py, then behaviour by behaviour."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from armonik_zmq import _core
from armonik_zmq._core import (
    STATE_DEAD,
    STATE_DISPATCHED,
    STATE_FREE,
    STATE_QUEUED,
    STATE_WAITING,
    Core,
)

try:
    from .model import Model
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from model import Model

KINDS = ("task", "result", "agent")
#: ids that are invalid for both the core and the model, whatever has happened
BAD_IDS = (-1, -7, 10**9, 2**70, -(2**70))
PARTITIONS = (0, 1, 2, 3)
#: partition 3 is never served: its queue only empties through cancellation and purging
SERVED = (0, 1, 2)
PRIORITIES = (1, 2, 50, 99)
BAD_PRIORITIES = (0, 100, -3, 2**70)
BAD_PARTITIONS = (-1, 1024, 2**70)


# ---------------------------------------------------------------------------------------------
# Differential harness
# ---------------------------------------------------------------------------------------------


class Pair:
    """Send the same calls to the core and the model; translate core slots <-> model ids; compare.

    The core recycles slots and the model never reuses ids, so each kind has a live bijection. A
    freed id is still sent to the core as its former slot while no live object has taken that slot
    over, which checks that both refuse it.
    """

    def __init__(self) -> None:
        self.core = Core()
        self.model = Model()
        self.c2m: dict[str, dict[int, int]] = {k: {} for k in KINDS}
        self.m2c: dict[str, dict[int, int]] = {k: {} for k in KINDS}
        self.former: dict[str, dict[int, int]] = {k: {} for k in KINDS}

    # -- plumbing --------------------------------------------------------------------------

    def to_core(self, kind: str, m: int):
        """Return the core slot standing for model id m, or None when no core value means the same."""
        if m in self.m2c[kind]:
            return self.m2c[kind][m]
        if m in self.former[kind]:
            c = self.former[kind][m]
            return None if c in self.c2m[kind] else c
        assert m in BAD_IDS, m
        return m

    def to_model(self, kind: str, c: int) -> int:
        assert c in self.c2m[kind], f"core returned {kind} slot {c}, which holds no live {kind}"
        return self.c2m[kind][c]

    def bind(self, kind: str, c: int, m: int) -> None:
        assert type(c) is int
        assert c not in self.c2m[kind], f"core handed out {kind} slot {c}, still in use by {self.c2m[kind][c]}"
        self.c2m[kind][c] = m
        self.m2c[kind][m] = c

    def unbind(self, kind: str, m: int) -> None:
        c = self.m2c[kind].pop(m)
        del self.c2m[kind][c]
        self.former[kind][m] = c

    def call(self, name: str, core_args: tuple, model_args: tuple):
        """Call both; both must raise the same exception type or both return. Return (core, model) or None."""
        m_exc = c_exc = None
        try:
            m_val = getattr(self.model, name)(*model_args)
        except (ValueError, TypeError) as exc:
            m_exc = type(exc)
        try:
            c_val = getattr(self.core, name)(*core_args)
        except (ValueError, TypeError) as exc:
            c_exc = type(exc)
        assert c_exc is m_exc, f"{name}{model_args}: core raised {c_exc}, model raised {m_exc}"
        return None if m_exc else (c_val, m_val)

    def tasks_equal(self, core_list: list[int], model_list: list[int]) -> None:
        assert type(core_list) is list
        assert [self.to_model("task", c) for c in core_list] == model_list

    # -- operations (arguments are model ids) --------------------------------------------------

    def new_result(self) -> None:
        c, m = self.call("new_result", (), ())
        self.bind("result", c, m)

    def free_result(self, r: int) -> None:
        cr = self.to_core("result", r)
        if cr is not None and self.call("free_result", (cr,), (r,)):
            self.unbind("result", r)

    def on_result_ready(self, r: int) -> None:
        cr = self.to_core("result", r)
        if cr is not None and (out := self.call("on_result_ready", (cr,), (r,))):
            self.tasks_equal(*out)

    def on_result_aborted(self, r: int) -> None:
        cr = self.to_core("result", r)
        if cr is not None and (out := self.call("on_result_aborted", (cr,), (r,))):
            self.tasks_equal(*out)

    def add_task(self, partition: int, priority: int, missing: list[int]) -> None:
        cmissing = [self.to_core("result", r) for r in missing]
        if None in cmissing:
            return
        if out := self.call("add_task", (partition, priority, cmissing), (partition, priority, missing)):
            self.bind("task", *out)

    def task_op(self, name: str, t: int) -> None:
        ct = self.to_core("task", t)
        if ct is not None and (out := self.call(name, (ct,), (t,))):
            if name == "free_task":
                self.unbind("task", t)
            elif name == "owner" and out[0] != -1:
                assert self.to_model("agent", out[0]) == out[1]
            else:
                assert out[0] == out[1]

    def add_agent(self, partitions: list[int], capacity: int) -> None:
        if out := self.call("add_agent", (partitions, capacity), (partitions, capacity)):
            self.bind("agent", *out)

    def remove_agent(self, a: int) -> None:
        ca = self.to_core("agent", a)
        if ca is not None and (out := self.call("remove_agent", (ca,), (a,))):
            self.unbind("agent", a)
            self.tasks_equal(*out)

    def agent_op(self, name: str, a: int) -> None:
        ca = self.to_core("agent", a)
        if ca is not None and (out := self.call(name, (ca,), (a,))):
            if name == "agent_held":
                self.tasks_equal(*out)
            else:
                assert out[0] == out[1]

    def dispatch(self, max_tasks: int) -> None:
        c_out, m_out = self.call("dispatch", (max_tasks,), (max_tasks,))
        assert type(c_out) is list
        assert [(self.to_model("agent", a), self.to_model("task", t)) for a, t in c_out] == m_out

    def n_ready(self, partition: int) -> None:
        if out := self.call("n_ready", (partition,), (partition,)):
            assert out[0] == out[1]

    # -- full comparison -------------------------------------------------------------------------

    def check(self) -> None:
        core, model = self.core, self.model
        core.validate()
        model.validate()
        assert core.n_tasks() == model.n_tasks()
        assert core.n_waiting() == model.n_waiting()
        assert core.n_dispatched() == model.n_dispatched()
        assert core.n_ready() == model.n_ready()
        for p in (*PARTITIONS, 4):
            assert core.n_ready(p) == model.n_ready(p), p
        for m, c in self.m2c["task"].items():
            task = model.tasks[m]
            assert core.state(c) == task.state, m
            assert core.missing(c) == len(task.deps), m
            assert core.priority(c) == task.priority, m
            assert core.partition(c) == task.partition, m
            owner = core.owner(c)
            assert (owner if owner == -1 else self.to_model("agent", owner)) == task.owner, m
        for m, c in self.m2c["result"].items():
            self.tasks_equal(core.result_waiters(c), model.result_waiters(m))
        for m, c in self.m2c["agent"].items():
            self.tasks_equal(core.agent_held(c), model.agent_held(m))
            assert core.agent_credit(c) == model.agent_credit(m)


# ---------------------------------------------------------------------------------------------
# Random operations, shared by the hypothesis machine and the seeded long runs
# ---------------------------------------------------------------------------------------------


class HypothesisChooser:
    def __init__(self, data) -> None:
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return self.rng.choice(list(seq))


def pick(pair: Pair, ch, kind: str, where=None) -> int:
    """Pick mostly a live id (of the ``where`` subset if given and not empty), sometimes a freed or invalid one."""
    k = ch.int(0, 19)
    live = sorted(pair.m2c[kind])
    if where is not None and k < 12:
        subset = [m for m in live if where(m)]
        if subset:
            return ch.choice(subset)
    if k == 0 or (k == 1 and not pair.former[kind]) or not live:
        return ch.choice(BAD_IDS)
    if k == 1:
        return ch.choice(sorted(pair.former[kind]))
    return ch.choice(live)


def op_new_result(pair: Pair, ch) -> None:
    pair.new_result()


def _pending(pair: Pair):
    return lambda r: pair.model.results[r].state == "pending"


def op_free_result(pair: Pair, ch) -> None:
    pair.free_result(pick(pair, ch, "result", lambda r: not pair.model.results[r].waiters))


def op_result_ready(pair: Pair, ch) -> None:
    pair.on_result_ready(pick(pair, ch, "result", _pending(pair)))


def op_result_aborted(pair: Pair, ch) -> None:
    pair.on_result_aborted(pick(pair, ch, "result", _pending(pair)))


def op_add_task(pair: Pair, ch) -> None:
    k = ch.int(0, 29)
    partition = ch.choice(BAD_PARTITIONS) if k == 0 else ch.choice(PARTITIONS)
    priority = ch.choice(BAD_PRIORITIES) if k == 1 else ch.choice(PRIORITIES)
    n = ch.int(0, 3) if pair.m2c["result"] else 0
    missing = [pick(pair, ch, "result", _pending(pair)) for _ in range(n)]
    if n and ch.int(0, 3) == 0:
        missing.append(missing[0])
    pair.add_task(partition, priority, missing)


def _in_state(pair: Pair, state: int):
    return lambda t: pair.model.tasks[t].state == state


def op_cancel_task(pair: Pair, ch) -> None:
    pair.task_op("cancel_task", pick(pair, ch, "task"))


def op_free_task(pair: Pair, ch) -> None:
    pair.task_op("free_task", pick(pair, ch, "task"))


def op_requeue(pair: Pair, ch) -> None:
    pair.task_op("requeue", pick(pair, ch, "task", _in_state(pair, STATE_DISPATCHED)))


def op_task_getter(pair: Pair, ch) -> None:
    pair.task_op(ch.choice(("state", "missing", "priority", "partition", "owner")), pick(pair, ch, "task"))


def op_add_agent(pair: Pair, ch) -> None:
    k = ch.int(0, 19)
    n = 0 if k == 0 else ch.int(1, 3)
    partitions = [ch.choice(SERVED) for _ in range(n)]
    if k == 1:
        partitions.append(ch.choice(BAD_PARTITIONS))
    capacity = ch.choice((0, -1, 2**70)) if k == 2 else ch.int(1, 3)
    pair.add_agent(partitions, capacity)


def op_set_agent_capacity(pair: Pair, ch) -> None:
    a = pick(pair, ch, "agent")
    ca = pair.to_core("agent", a)
    if ca is not None:
        capacity = ch.choice((0, -1, 2**70)) if ch.int(0, 9) == 0 else ch.int(1, 4)
        if out := pair.call("set_agent_capacity", (ca, capacity), (a, capacity)):
            assert out[0] is out[1] is None


def op_remove_agent(pair: Pair, ch) -> None:
    pair.remove_agent(pick(pair, ch, "agent"))


def op_agent_getter(pair: Pair, ch) -> None:
    pair.agent_op(ch.choice(("agent_held", "agent_credit")), pick(pair, ch, "agent"))


def op_dispatch(pair: Pair, ch) -> None:
    pair.dispatch(ch.choice((-1, -1, 0, 1, 2, 5)))


def op_n_ready(pair: Pair, ch) -> None:
    pair.n_ready(ch.choice((-1, 0, 1, 3, 5, -2, 1024, 2**70)))


#: (operation, weight in the seeded runs)
OPS = [
    (op_new_result, 8), (op_free_result, 2), (op_result_ready, 4), (op_result_aborted, 1),
    (op_add_task, 14), (op_cancel_task, 2), (op_free_task, 6), (op_requeue, 2), (op_task_getter, 1),
    (op_add_agent, 1), (op_set_agent_capacity, 1), (op_remove_agent, 1), (op_agent_getter, 1), (op_dispatch, 5),
    (op_n_ready, 1),
]


class CoreVsModel(RuleBasedStateMachine):
    """Run random sequences of calls; compare every returned value and every raised error with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()

    def _run(self, op, data) -> None:
        op(self.pair, HypothesisChooser(data))

    @rule(data=st.data())
    def new_result(self, data):
        self._run(op_new_result, data)

    @rule(data=st.data())
    def free_result(self, data):
        self._run(op_free_result, data)

    @rule(data=st.data())
    def result_ready(self, data):
        self._run(op_result_ready, data)

    @rule(data=st.data())
    def result_aborted(self, data):
        self._run(op_result_aborted, data)

    @rule(data=st.data())
    def add_task(self, data):
        self._run(op_add_task, data)

    @rule(data=st.data())
    def add_task_again(self, data):  # tasks are the point: give them twice the weight
        self._run(op_add_task, data)

    @rule(data=st.data())
    def cancel_task(self, data):
        self._run(op_cancel_task, data)

    @rule(data=st.data())
    def free_task(self, data):
        self._run(op_free_task, data)

    @rule(data=st.data())
    def requeue(self, data):
        self._run(op_requeue, data)

    @rule(data=st.data())
    def task_getter(self, data):
        self._run(op_task_getter, data)

    @rule(data=st.data())
    def add_agent(self, data):
        self._run(op_add_agent, data)

    @rule(data=st.data())
    def set_agent_capacity(self, data):
        self._run(op_set_agent_capacity, data)

    @rule(data=st.data())
    def remove_agent(self, data):
        self._run(op_remove_agent, data)

    @rule(data=st.data())
    def agent_getter(self, data):
        self._run(op_agent_getter, data)

    @rule(data=st.data())
    def dispatch(self, data):
        self._run(op_dispatch, data)

    @rule(data=st.data())
    def n_ready(self, data):
        self._run(op_n_ready, data)

    @invariant()
    def same_state(self):
        self.pair.check()


TestCoreVsModel = CoreVsModel.TestCase
TestCoreVsModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("seed", range(4))
def test_long_random_runs_match_model(seed):
    """Run longer sequences than hypothesis explores: queues get deep enough to purge dead entries."""
    rng = random.Random(seed)
    pair = Pair()
    ch = RandomChooser(rng)
    ops, weights = zip(*OPS)
    for step in range(6000):
        rng.choices(ops, weights)[0](pair, ch)
        if step % 97 == 0:
            pair.check()
    pair.check()
    # Drain: every live task can still be finished, and then nothing is left anywhere.
    for m in list(pair.m2c["task"]):
        pair.task_op("free_task", m)
    for m in list(pair.m2c["result"]):
        pair.free_result(m)
    for m in list(pair.m2c["agent"]):
        pair.remove_agent(m)
    pair.check()
    assert pair.core.n_tasks() == pair.core.n_ready() == pair.core.n_waiting() == pair.core.n_dispatched() == 0


# ---------------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------------


def test_constants():
    assert (STATE_FREE, STATE_WAITING, STATE_QUEUED, STATE_DISPATCHED, STATE_DEAD) == (0, 1, 2, 3, 4)
    assert (_core.PRIORITY_MIN, _core.PRIORITY_MAX, _core.MAX_PARTITIONS) == (1, 99, 1024)


def test_add_task_without_dependencies_is_queued():
    c = Core()
    t = c.add_task(2, 7, [])
    assert (c.state(t), c.missing(t), c.priority(t), c.partition(t), c.owner(t)) == (STATE_QUEUED, 0, 7, 2, -1)
    assert (c.n_ready(), c.n_ready(2), c.n_ready(0), c.n_ready(500), c.n_tasks(), c.n_waiting()) == (1, 1, 0, 0, 1, 0)
    c.validate()


def test_add_task_counts_distinct_missing_results():
    c = Core()
    r1, r2 = c.new_result(), c.new_result()
    t = c.add_task(0, 1, [r1, r2, r1, r2, r1])
    assert (c.state(t), c.missing(t)) == (STATE_WAITING, 2)
    assert c.result_waiters(r1) == [t] and c.result_waiters(r2) == [t]
    assert c.n_waiting() == 1 and c.n_ready() == 0
    c.validate()


def test_add_task_accepts_any_iterable_of_ints():
    np = pytest.importorskip("numpy")
    c = Core()
    rs = [c.new_result() for _ in range(3)]
    t1 = c.add_task(0, 1, tuple(rs))
    t2 = c.add_task(0, 1, np.array(rs, dtype=np.int64))
    t3 = c.add_task(0, 1, iter(rs))
    assert c.missing(t1) == c.missing(t2) == c.missing(t3) == 3
    c.validate()


@pytest.mark.parametrize("priority", [0, 100, -1, 2**70, -(2**70)])
def test_add_task_rejects_bad_priority(priority):
    c = Core()
    with pytest.raises(ValueError, match="priority"):
        c.add_task(0, priority, [])
    assert c.n_tasks() == 0


@pytest.mark.parametrize("partition", [-1, 1024, 2**70])
def test_add_task_rejects_bad_partition(partition):
    c = Core()
    with pytest.raises(ValueError, match="partition"):
        c.add_task(partition, 1, [])
    assert c.n_tasks() == 0


def test_non_integers_are_type_errors():
    c = Core()
    with pytest.raises(TypeError):
        c.add_task(0, 1.5, [])
    with pytest.raises(TypeError):
        c.add_task("0", 1, [])
    with pytest.raises(TypeError):
        c.free_task(None)


def test_add_task_with_a_bad_result_leaves_no_trace():
    c = Core()
    r = c.new_result()
    for bad in ([r, 99], [r, -1], [r, 2**80]):
        with pytest.raises(ValueError, match="result slot"):
            c.add_task(0, 1, bad)
    assert (c.n_tasks(), c.n_waiting(), c.result_waiters(r)) == (0, 0, [])
    assert c.add_task(0, 1, []) == 0  # the slot was not consumed
    c.validate()


def test_result_ready_releases_tasks_in_registration_order():
    c = Core()
    r1, r2 = c.new_result(), c.new_result()
    t1 = c.add_task(0, 1, [r1])
    t2 = c.add_task(0, 1, [r1, r2])
    t3 = c.add_task(0, 1, [r1])
    assert c.result_waiters(r1) == [t1, t2, t3]
    assert c.on_result_ready(r1) == [t1, t3]
    assert c.result_waiters(r1) == []
    assert (c.state(t1), c.state(t2), c.state(t3)) == (STATE_QUEUED, STATE_WAITING, STATE_QUEUED)
    assert c.missing(t2) == 1 and c.result_waiters(r2) == [t2]
    assert c.on_result_ready(r1) == []  # idempotent
    assert c.on_result_ready(r2) == [t2]
    assert c.n_ready() == 3 and c.n_waiting() == 0
    c.free_result(r1)
    c.free_result(r2)
    c.validate()


def test_a_ready_result_is_not_missing_and_an_aborted_one_is_refused():
    c = Core()
    ready, aborted = c.new_result(), c.new_result()
    c.on_result_ready(ready)
    c.on_result_aborted(aborted)
    t = c.add_task(0, 1, [ready])
    assert c.state(t) == STATE_QUEUED
    with pytest.raises(ValueError, match="aborted"):
        c.add_task(0, 1, [aborted])
    with pytest.raises(ValueError, match="aborted"):
        c.on_result_ready(aborted)
    with pytest.raises(ValueError, match="ready"):
        c.on_result_aborted(ready)
    assert c.on_result_aborted(aborted) == []


def test_result_aborted_kills_waiters_everywhere():
    c = Core()
    r1, r2, r3 = c.new_result(), c.new_result(), c.new_result()
    t1 = c.add_task(0, 1, [r1, r2])
    t2 = c.add_task(0, 1, [r3])
    t3 = c.add_task(0, 1, [r2, r3, r1])
    assert c.on_result_aborted(r1) == [t1, t3]
    assert (c.state(t1), c.state(t3), c.state(t2)) == (STATE_DEAD, STATE_DEAD, STATE_WAITING)
    assert c.missing(t1) == c.missing(t3) == 0
    assert c.result_waiters(r2) == [] and c.result_waiters(r3) == [t2]
    assert c.n_ready() == 0 and c.n_waiting() == 1
    c.validate()
    for t in (t1, t3):
        c.free_task(t)
    c.free_result(r1)
    c.free_result(r2)
    assert c.n_tasks() == 1
    c.validate()


def test_free_result_with_waiters_is_refused():
    c = Core()
    r = c.new_result()
    t = c.add_task(0, 1, [r])
    with pytest.raises(ValueError, match="waiting"):
        c.free_result(r)
    c.free_task(t)  # a waiting task may end (cancelled): it stops waiting
    c.free_result(r)
    with pytest.raises(ValueError, match="free"):
        c.free_result(r)
    assert c.new_result() == r  # recycled
    c.validate()


def test_priority_order_then_fifo():
    c = Core()
    a = c.add_agent([0], 100)
    low1 = c.add_task(0, 1, [])
    high1 = c.add_task(0, 99, [])
    mid = c.add_task(0, 50, [])
    high2 = c.add_task(0, 99, [])
    low2 = c.add_task(0, 1, [])
    assert [t for _, t in c.dispatch()] == [high1, high2, mid, low1, low2]
    assert c.agent_held(a) == [high1, high2, mid, low1, low2]
    c.validate()


def test_requeue_goes_to_the_front_of_its_bucket():
    c = Core()
    a = c.add_agent([0], 1)
    t1, t2, t3 = (c.add_task(0, 5, []) for _ in range(3))
    assert c.dispatch() == [(a, t1)]
    assert c.agent_credit(a) == 0
    c.requeue(t1)
    assert (c.state(t1), c.owner(t1), c.agent_credit(a), c.agent_held(a)) == (STATE_QUEUED, -1, 1, [])
    assert c.dispatch() == [(a, t1)]
    c.free_task(t1)
    assert c.dispatch() == [(a, t2)]
    c.requeue(t2)
    hi = c.add_task(0, 6, [])
    assert c.dispatch() == [(a, hi)]  # front of its own bucket, not ahead of higher priorities
    with pytest.raises(ValueError, match="not DISPATCHED"):
        c.requeue(t2)
    with pytest.raises(ValueError, match="not DISPATCHED"):
        c.requeue(t3)
    c.validate()


def test_cancelled_queued_task_is_skipped_and_its_slot_kept_until_popped():
    c = Core()
    t1 = c.add_task(0, 5, [])
    t2 = c.add_task(0, 5, [])
    c.cancel_task(t1)
    assert (c.state(t1), c.n_ready(), c.n_ready(0)) == (STATE_DEAD, 1, 1)
    c.free_task(t1)
    assert c.state(t1) == STATE_FREE
    # The dead entry still names t1: a new task must not get that slot.
    t3 = c.add_task(0, 9, [])
    assert t3 not in (t1, t2)
    c.validate()
    a = c.add_agent([0], 10)
    assert c.dispatch() == [(a, t3), (a, t2)]
    # Now popped: the slot is free for reuse, and the new task is dispatched correctly.
    t4 = c.add_task(0, 1, [])
    assert t4 == t1
    assert c.dispatch() == [(a, t4)]
    c.validate()


def test_stale_entry_of_a_reused_slot_is_never_dispatched():
    """Never let a recycled slot pop out of an old queue entry (the bug lazy deletion invites)."""
    c = Core()
    olds = [c.add_task(1, 50, []) for _ in range(10)]
    for t in olds:
        c.free_task(t)
    news = [c.add_task(1, 50, []) for _ in range(10)]
    assert not set(news) & set(olds)
    c.add_agent([1], 100)
    assert [t for _, t in c.dispatch()] == news
    c.validate()


def test_dead_entries_are_purged_when_nobody_serves_the_partition():
    c = Core()
    slots = set()
    for _ in range(50):
        batch = [c.add_task(3, 1 + len(slots) % 99, []) for _ in range(100)]
        slots.update(batch)
        for t in batch:
            c.free_task(t)
        c.validate()
    # Purging recycles the slots: 5000 tasks went through far fewer slots.
    assert len(slots) < 500
    assert c.n_ready(3) == 0 and c.n_tasks() == 0
    # Mixed: live entries survive a purge in order.
    keep = [c.add_task(3, 7, []) for _ in range(10)]
    junk = [c.add_task(3, 7, []) for _ in range(200)]
    for t in junk:
        c.cancel_task(t)
    c.validate()
    c.add_agent([3], 1000)
    assert [t for _, t in c.dispatch()] == keep
    c.validate()


def test_dispatch_round_robin_interleaves_agents():
    c = Core()
    a1, a2, a3 = c.add_agent([0], 10), c.add_agent([0], 10), c.add_agent([0], 10)
    ts = [c.add_task(0, 5, []) for _ in range(7)]
    assert c.dispatch() == [(a1, ts[0]), (a2, ts[1]), (a3, ts[2]), (a1, ts[3]), (a2, ts[4]), (a3, ts[5]),
                            (a1, ts[6])]
    # The next call starts after the last agent served.
    more = [c.add_task(0, 5, []) for _ in range(2)]
    assert c.dispatch() == [(a2, more[0]), (a3, more[1])]
    c.validate()


def test_dispatch_rotates_the_first_agent_between_calls():
    c = Core()
    agents = [c.add_agent([0], 5) for _ in range(3)]
    got = []
    for _ in range(6):
        t = c.add_task(0, 5, [])
        ((a, tt),) = c.dispatch()
        assert tt == t
        got.append(a)
    assert got == agents + agents


def test_dispatch_respects_credit_and_max_tasks():
    c = Core()
    a1, a2 = c.add_agent([0], 1), c.add_agent([0], 3)
    ts = [c.add_task(0, 5, []) for _ in range(6)]
    assert c.dispatch(0) == []
    assert c.dispatch(2) == [(a1, ts[0]), (a2, ts[1])]
    assert c.dispatch() == [(a2, ts[2]), (a2, ts[3])]
    assert (c.agent_credit(a1), c.agent_credit(a2), c.n_ready(), c.n_dispatched()) == (0, 0, 2, 4)
    assert c.dispatch() == []
    c.free_task(ts[0])  # completion gives the credit back
    assert c.agent_credit(a1) == 1
    assert c.dispatch() == [(a1, ts[4])]
    c.validate()


def test_agent_takes_best_task_across_its_partitions():
    c = Core()
    a = c.add_agent([0, 1], 1)
    other = c.add_task(2, 99, [])
    p0_low = c.add_task(0, 3, [])
    p1_high = c.add_task(1, 8, [])
    p0_old = c.add_task(0, 8, [])  # same priority as p1_high, but younger
    assert c.dispatch() == [(a, p1_high)]
    c.free_task(p1_high)
    assert c.dispatch() == [(a, p0_old)]
    c.free_task(p0_old)
    assert c.dispatch() == [(a, p0_low)]
    assert c.state(other) == STATE_QUEUED


def test_agent_partitions_are_checked_and_deduplicated():
    c = Core()
    with pytest.raises(ValueError, match="capacity"):
        c.add_agent([0], 0)
    with pytest.raises(ValueError, match="capacity"):
        c.add_agent([0], 2**40)
    with pytest.raises(ValueError, match="at least one partition"):
        c.add_agent([], 1)
    with pytest.raises(ValueError, match="partition"):
        c.add_agent([0, -1], 1)
    a = c.add_agent([5, 5, 0], 2)
    assert a == 0 and c.agent_credit(a) == 2
    c.validate()


def test_a_lowered_capacity_takes_no_task_back_and_comes_down_as_tasks_end():
    c = Core()
    a, b = c.add_agent([0], 4), c.add_agent([0], 1)
    ts = [c.add_task(0, 1, []) for _ in range(8)]
    assert len(c.dispatch()) == 5 and c.agent_credit(a) == 0
    c.set_agent_capacity(a, 2)  # it holds 4: they stay, it gets no credit until it holds fewer than 2
    assert (len(c.agent_held(a)), c.agent_credit(a)) == (4, 0)
    c.free_task(c.agent_held(b)[0])
    held = c.agent_held(a)
    c.free_task(held[0])
    c.free_task(held[1])
    c.validate()
    assert c.agent_credit(a) == 0 and c.dispatch() == [(b, ts[5])]  # credit freed by a's tasks is not b's either
    c.free_task(held[2])
    assert c.agent_credit(a) == 1
    c.set_agent_capacity(a, 6)
    assert c.agent_credit(a) == 5 and [x for x, _ in c.dispatch()] == [a, a]
    c.validate()
    with pytest.raises(ValueError, match="capacity"):
        c.set_agent_capacity(a, 0)
    c.remove_agent(a)
    c.validate()


def test_remove_agent_requeues_its_tasks_at_the_front_in_order():
    c = Core()
    a1 = c.add_agent([0], 3)
    ts = [c.add_task(0, 5, []) for _ in range(5)]
    assert [t for _, t in c.dispatch()] == ts[:3]
    assert c.remove_agent(a1) == ts[:3]
    assert [c.state(t) for t in ts[:3]] == [STATE_QUEUED] * 3
    assert [c.owner(t) for t in ts[:3]] == [-1] * 3
    assert c.n_ready() == 5 and c.n_dispatched() == 0
    with pytest.raises(ValueError, match="agent slot"):
        c.agent_credit(a1)
    a2 = c.add_agent([0], 10)
    assert a2 == a1  # recycled
    assert [t for _, t in c.dispatch()] == ts
    c.validate()


def test_removing_the_cursor_agent_moves_the_cursor_on():
    c = Core()
    a1, a2, a3 = (c.add_agent([0], 5) for _ in range(3))
    c.add_task(0, 1, [])
    assert c.dispatch()[0][0] == a1  # cursor now a2
    c.remove_agent(a2)
    c.add_task(0, 1, [])
    assert c.dispatch()[0][0] == a3
    c.remove_agent(a1)
    c.remove_agent(a3)
    assert c.dispatch() == []
    a4 = c.add_agent([0], 5)
    assert c.dispatch()[0][0] == a4
    c.validate()


def test_cancel_dispatched_task_gives_credit_back():
    c = Core()
    a = c.add_agent([0], 1)
    t = c.add_task(0, 1, [])
    c.dispatch()
    c.cancel_task(t)
    assert (c.state(t), c.owner(t), c.agent_credit(a), c.agent_held(a), c.n_dispatched()) == (STATE_DEAD, -1, 1, [], 0)
    c.cancel_task(t)  # cancelling a dead task is a no-op
    c.free_task(t)
    assert c.n_tasks() == 0
    c.validate()


def test_cancel_waiting_task_leaves_the_waiter_lists():
    c = Core()
    r = c.new_result()
    t1, t2 = c.add_task(0, 1, [r]), c.add_task(0, 1, [r])
    c.cancel_task(t1)
    assert c.result_waiters(r) == [t2] and c.missing(t1) == 0 and c.n_waiting() == 1
    assert c.on_result_ready(r) == [t2]
    c.validate()


def test_freed_slots_are_rejected_and_state_reports_free():
    c = Core()
    t = c.add_task(0, 1, [])
    a = c.add_agent([0], 1)
    c.dispatch()
    c.free_task(t)
    assert c.state(t) == STATE_FREE
    for name in ("missing", "priority", "partition", "owner", "cancel_task", "free_task", "requeue"):
        with pytest.raises(ValueError, match="free"):
            getattr(c, name)(t)
    c.remove_agent(a)
    for name in ("remove_agent", "agent_held", "agent_credit"):
        with pytest.raises(ValueError, match="free"):
            getattr(c, name)(a)


@pytest.mark.parametrize("bad", [-1, 3, 2**31, 2**70, -(2**70)])
def test_out_of_range_slots_are_value_errors(bad):
    c = Core()
    c.add_task(0, 1, [])
    c.new_result()
    c.add_agent([0], 1)
    for name in ("missing", "state", "priority", "partition", "owner", "cancel_task", "free_task", "requeue",
                 "free_result", "result_waiters", "on_result_ready", "on_result_aborted",
                 "remove_agent", "agent_held", "agent_credit"):
        with pytest.raises(ValueError, match="does not exist"):
            getattr(c, name)(bad)
    if bad not in (-1, 3):  # both are valid partition arguments
        with pytest.raises(ValueError, match="partition"):
            c.n_ready(bad)
    c.validate()


def test_wide_fan_in_and_fan_out():
    c = Core()
    rs = [c.new_result() for _ in range(3000)]
    sink = c.add_task(0, 1, rs)
    fan = [c.add_task(1, 1, [rs[0]]) for _ in range(3000)]
    assert c.missing(sink) == 3000
    assert c.on_result_ready(rs[0]) == fan
    order = rs[1:]
    random.Random(0).shuffle(order)
    for r in order[:-1]:
        assert c.on_result_ready(r) == []
    assert c.missing(sink) == 1
    c.validate()
    assert c.on_result_ready(order[-1]) == [sink]
    assert c.n_ready() == 3001
    c.validate()


def test_broker_style_lifecycle():
    """Follow broker/state.py's call pattern: slots for live objects only, results freed once resolved."""
    c = Core()
    a = c.add_agent([0, 1], 2)
    payload = c.new_result()
    parent = c.add_task(0, 1, [])
    child = c.add_task(1, 1, [payload])
    assert c.dispatch() == [(a, parent)]
    # The parent completes and writes the child's input.
    c.free_task(parent)
    assert c.on_result_ready(payload) == [child]
    c.free_result(payload)
    assert c.dispatch() == [(a, child)]
    # The child fails; its output had a waiter, which gets aborted and freed.
    out = c.new_result()
    grandchild = c.add_task(0, 1, [out])
    c.free_task(child)
    assert c.on_result_aborted(out) == [grandchild]
    c.free_task(grandchild)
    c.free_result(out)
    assert (c.n_tasks(), c.n_ready(), c.n_waiting(), c.n_dispatched(), c.agent_credit(a)) == (0, 0, 0, 0, 2)
    c.validate()


def test_repr_mentions_counts():
    c = Core()
    c.add_task(0, 1, [])
    assert "ready=1" in repr(c)
