"""Plain-Python reference model of ``armonik_zmq._core.Core``: the test oracle, never imported by the package.

Written for obviousness, not speed: plain lists and dicts, linear scans, eager removal. It shares no
design with the core on purpose:

* ids are never reused (the core recycles slots; the tests keep a core slot <-> model id map);
* a cancelled task leaves its queue at once (the core deletes lazily);
* one FIFO list per priority holds every partition's tasks (the core keeps a bucket per partition and
  priority and compares queue keys across partitions).

If the two disagree on any returned value or on which calls raise, one of them is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import index

STATE_FREE, STATE_WAITING, STATE_QUEUED, STATE_DISPATCHED, STATE_DEAD = range(5)
PRIORITY_MIN, PRIORITY_MAX = 1, 99
MAX_PARTITIONS = 1024
CAPACITY_MAX = 2**31 - 1

PENDING, READY, ABORTED = "pending", "ready", "aborted"


@dataclass
class Task:
    partition: int
    priority: int
    state: int
    #: results still awaited
    deps: list[int] = field(default_factory=list)
    owner: int = -1


@dataclass
class Result:
    state: str = PENDING
    #: tasks waiting on it, registration order
    waiters: list[int] = field(default_factory=list)


@dataclass
class Agent:
    partitions: list[int]
    #: the capacity asked for last: it may hold more, taken before the capacity was lowered (no credit then)
    capacity: int
    #: tasks held, dispatch order
    held: list[int] = field(default_factory=list)

    @property
    def credit(self) -> int:
        return max(0, self.capacity - len(self.held))


class Model:
    """Same API and semantics as ``_core.Core``."""

    def __init__(self) -> None:
        self.tasks: dict[int, Task] = {}
        self.freed_tasks: set[int] = set()
        self.results: dict[int, Result] = {}
        self.agents: dict[int, Agent] = {}
        #: live agents in registration order: dispatch walks it circularly from the cursor
        self.order: list[int] = []
        self.cursor: int | None = None
        #: priority -> FIFO of queued task ids, all partitions mixed
        self.queue: dict[int, list[int]] = {p: [] for p in range(PRIORITY_MIN, PRIORITY_MAX + 1)}
        self._ids = 0

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids - 1

    # -- lookups ---------------------------------------------------------------------------

    def _task(self, t) -> Task:
        t = index(t)
        if t not in self.tasks:
            raise ValueError(f"no live task {t}")
        return self.tasks[t]

    def _result(self, r) -> Result:
        r = index(r)
        if r not in self.results:
            raise ValueError(f"no live result {r}")
        return self.results[r]

    def _agent(self, a) -> Agent:
        a = index(a)
        if a not in self.agents:
            raise ValueError(f"no live agent {a}")
        return self.agents[a]

    @staticmethod
    def _partition(p) -> int:
        p = index(p)
        if not 0 <= p < MAX_PARTITIONS:
            raise ValueError(f"bad partition {p}")
        return p

    # -- results ---------------------------------------------------------------------------

    def new_result(self) -> int:
        r = self._new_id()
        self.results[r] = Result()
        return r

    def free_result(self, r) -> None:
        res = self._result(r)
        if res.waiters:
            raise ValueError("result still has waiters")
        del self.results[index(r)]

    def result_waiters(self, r) -> list[int]:
        return list(self._result(r).waiters)

    def on_result_ready(self, r) -> list[int]:
        res = self._result(r)
        if res.state == ABORTED:
            raise ValueError("aborted result cannot become ready")
        ready = []
        for t in res.waiters:
            task = self.tasks[t]
            task.deps.remove(index(r))
            if not task.deps:
                self._enqueue(t, front=False)
                ready.append(t)
        res.waiters = []
        res.state = READY
        return ready

    def on_result_aborted(self, r) -> list[int]:
        res = self._result(r)
        if res.state == READY:
            raise ValueError("ready result cannot be aborted")
        dead = list(res.waiters)
        for t in dead:
            self._stop_waiting(t)
            self.tasks[t].state = STATE_DEAD
        res.state = ABORTED
        return dead

    # -- tasks -----------------------------------------------------------------------------

    def add_task(self, partition, priority, missing) -> int:
        priority = index(priority)
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ValueError(f"bad priority {priority}")
        partition = self._partition(partition)
        deps = []
        for r in missing:
            res = self._result(r)
            if res.state == ABORTED:
                raise ValueError("cannot wait for an aborted result")
            if res.state == PENDING and index(r) not in deps:
                deps.append(index(r))
        t = self._new_id()
        self.tasks[t] = Task(partition, priority, STATE_WAITING, deps)
        if deps:
            for r in deps:
                self.results[r].waiters.append(t)
        else:
            self._enqueue(t, front=False)
        return t

    def _enqueue(self, t: int, front: bool) -> None:
        task = self.tasks[t]
        task.state = STATE_QUEUED
        if front:
            self.queue[task.priority].insert(0, t)
        else:
            self.queue[task.priority].append(t)

    def _stop_waiting(self, t: int) -> None:
        task = self.tasks[t]
        for r in task.deps:
            self.results[r].waiters.remove(t)
        task.deps = []

    def _detach(self, t: int) -> None:
        task = self.tasks[t]
        if task.state == STATE_WAITING:
            self._stop_waiting(t)
        elif task.state == STATE_QUEUED:
            self.queue[task.priority].remove(t)
        elif task.state == STATE_DISPATCHED:
            self.agents[task.owner].held.remove(t)
            task.owner = -1

    def missing(self, t) -> int:
        return len(self._task(t).deps)

    def state(self, t) -> int:
        if index(t) in self.freed_tasks:
            return STATE_FREE
        return self._task(t).state

    def priority(self, t) -> int:
        return self._task(t).priority

    def partition(self, t) -> int:
        return self._task(t).partition

    def owner(self, t) -> int:
        return self._task(t).owner

    def cancel_task(self, t) -> None:
        task = self._task(t)
        self._detach(index(t))
        task.state = STATE_DEAD

    def free_task(self, t) -> None:
        self._task(t)
        self._detach(index(t))
        del self.tasks[index(t)]
        self.freed_tasks.add(index(t))

    def requeue(self, t) -> None:
        task = self._task(t)
        if task.state != STATE_DISPATCHED:
            raise ValueError("only a dispatched task can be requeued")
        self.agents[task.owner].held.remove(index(t))
        task.owner = -1
        self._enqueue(index(t), front=True)

    # -- agents ----------------------------------------------------------------------------

    def add_agent(self, partitions, capacity) -> int:
        capacity = index(capacity)
        if not 1 <= capacity <= CAPACITY_MAX:
            raise ValueError(f"bad capacity {capacity}")
        parts = []
        for p in partitions:
            p = self._partition(p)
            if p not in parts:
                parts.append(p)
        if not parts:
            raise ValueError("an agent must serve at least one partition")
        a = self._new_id()
        self.agents[a] = Agent(parts, capacity)
        self.order.append(a)
        if self.cursor is None:
            self.cursor = a
        return a

    def remove_agent(self, a) -> list[int]:
        agent = self._agent(a)
        a = index(a)
        held = list(agent.held)
        for t in reversed(held):
            self.tasks[t].owner = -1
            self._enqueue(t, front=True)
        i = self.order.index(a)
        if self.cursor == a:
            self.cursor = self.order[(i + 1) % len(self.order)] if len(self.order) > 1 else None
        self.order.remove(a)
        del self.agents[a]
        return held

    def agent_held(self, a) -> list[int]:
        return list(self._agent(a).held)

    def set_agent_capacity(self, a, capacity) -> None:
        agent = self._agent(a)
        capacity = index(capacity)
        if not 1 <= capacity <= CAPACITY_MAX:
            raise ValueError(f"bad capacity {capacity}")
        agent.capacity = capacity

    def agent_credit(self, a) -> int:
        return self._agent(a).credit

    # -- dispatch --------------------------------------------------------------------------

    def _take(self, a: int) -> int | None:
        """Remove and return the first task, best priority first, that agent a may run."""
        parts = self.agents[a].partitions
        for prio in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1):
            for t in self.queue[prio]:
                if self.tasks[t].partition in parts:
                    self.queue[prio].remove(t)
                    return t
        return None

    def dispatch(self, max_tasks=-1) -> list[tuple[int, int]]:
        budget = index(max_tasks)
        if budget < 0:
            budget = float("inf")
        out: list[tuple[int, int]] = []
        if budget == 0 or not self.order:
            return out
        start = self.order.index(self.cursor)
        ring = self.order[start:] + self.order[:start]
        candidates = [a for a in ring if self.agents[a].credit > 0]
        last = None
        while candidates and budget > 0:
            still = []
            for a in candidates:
                if budget == 0:
                    break
                t = self._take(a)
                if t is None:
                    continue
                self.tasks[t].state = STATE_DISPATCHED
                self.tasks[t].owner = a
                self.agents[a].held.append(t)
                out.append((a, t))
                budget -= 1
                last = a
                if self.agents[a].credit > 0:
                    still.append(a)
            candidates = still
        if last is not None:
            self.cursor = self.order[(self.order.index(last) + 1) % len(self.order)]
        return out

    # -- introspection ---------------------------------------------------------------------

    def n_ready(self, partition=-1) -> int:
        partition = index(partition)
        if partition == -1:
            return sum(len(q) for q in self.queue.values())
        partition = self._partition(partition)
        return sum(1 for q in self.queue.values() for t in q if self.tasks[t].partition == partition)

    def n_waiting(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state == STATE_WAITING)

    def n_dispatched(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state == STATE_DISPATCHED)

    def n_tasks(self) -> int:
        return len(self.tasks)

    def validate(self) -> None:
        for t, task in self.tasks.items():
            assert (task.state == STATE_WAITING) == bool(task.deps), t
            in_queue = t in self.queue[task.priority]
            assert in_queue == (task.state == STATE_QUEUED), t
            assert (task.owner != -1) == (task.state == STATE_DISPATCHED), t
        for a, agent in self.agents.items():
            assert agent.capacity >= 1, a
