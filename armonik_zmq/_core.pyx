# distutils: language = c++
"""Dispatch core of the broker: dependency counting, ready queues and credit-based dispatch.

Pure bookkeeping on dense int slots: the broker maps its string ids to slots, calls in, and acts on
the slots that come back. No I/O, no per-task Python objects; the layout is described in
``_core.pxd``.

Task life cycle inside the core (these are not ArmoniK statuses)::

    add_task --> WAITING --(last missing result ready)--> QUEUED <--requeue-- DISPATCHED
                    |                                       |     --dispatch-->    |
                    +--(a missing result aborted)--> DEAD <-+--- cancel_task ------+
    free_task: any live state --> FREE (slot recycled once no queue entry names it)

Ordering rules, all deterministic:

* ``on_result_ready`` / ``on_result_aborted`` / ``result_waiters`` list tasks in the order they
  were registered on the result.
* A queue serves higher priority first; within one priority, entries are FIFO across every
  partition (an agent serving several partitions takes the oldest), and ``requeue`` puts a task
  before everything else of its priority.
* ``dispatch`` offers one task at a time to each agent with credit, in agent registration order
  starting at a cursor that moves to the agent after the last one served.
* ``agent_held`` / ``remove_agent`` list tasks in the order the agent received them;
  ``remove_agent`` requeues them so that they come out again in that same order.
"""

cimport cython
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cython.operator cimport dereference as deref
from libc.stdint cimport INT32_MAX, INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t, uint64_t
from libcpp.deque cimport deque
from libcpp.vector cimport vector


cdef extern from *:
    """
    #include <deque>
    #include <new>
    #if defined(_MSC_VER)
    #include <intrin.h>
    static inline int armonik_top_bit(unsigned long long x) {
        unsigned long i; _BitScanReverse64(&i, x); return (int)i;
    }
    #else
    static inline int armonik_top_bit(unsigned long long x) { return 63 - __builtin_clzll(x); }
    #endif
    /* Push without letting std::bad_alloc escape: -1 means nothing was pushed. */
    static inline int armonik_deque_push(std::deque<int32_t>& d, int32_t v, int front) {
        try {
            if (front) d.push_front(v); else d.push_back(v);
        } catch (...) {
            return -1;
        }
        return 0;
    }
    """
    int top_bit "armonik_top_bit"(uint64_t x) noexcept nogil
    int deque_push "armonik_deque_push"(deque[int32_t]& d, int32_t v, int front) noexcept nogil


STATE_FREE = TS_FREE
STATE_WAITING = TS_WAITING
STATE_QUEUED = TS_QUEUED
STATE_DISPATCHED = TS_DISPATCHED
STATE_DEAD = TS_DEAD
PRIORITY_MIN = PRIO_MIN
PRIORITY_MAX = PRIO_MAX
MAX_PARTITIONS = PART_LIMIT

_STATE_NAMES = ("FREE", "WAITING", "QUEUED", "DISPATCHED", "DEAD")
_RESULT_NAMES = ("FREE", "PENDING", "READY", "ABORTED")


cdef inline int64_t _as_int(object o) except? -1:
    """Convert an int-like to int64, clamping huge values so that range checks reject them."""
    # Clamping turns "2**70" into a clean ValueError from the range check instead of an
    # OverflowError from the argument conversion.
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0:
        return INT64_MIN
    return v


cdef inline void _set_bit(vector[uint64_t]& bitmap, int32_t p, int32_t prio) noexcept:
    bitmap[p * BITMAP_WORDS + (prio >> 6)] |= (<uint64_t>1) << (prio & 63)


cdef inline void _clear_bit(vector[uint64_t]& bitmap, int32_t p, int32_t prio) noexcept:
    bitmap[p * BITMAP_WORDS + (prio >> 6)] &= ~((<uint64_t>1) << (prio & 63))


cdef inline int32_t _top_bucket(vector[uint64_t]& bitmap, int32_t p) noexcept:
    cdef uint64_t w = bitmap[p * BITMAP_WORDS + 1]
    if w:
        return 64 + top_bit(w)
    w = bitmap[p * BITMAP_WORDS]
    if w:
        return top_bit(w)
    return 0


def _broken(name, detail):
    raise AssertionError(f"core invariant '{name}' broken: {detail}")


@cython.final
cdef class Core:
    """Dependency counts, ready queues and agent credit of one broker; slots in, slots out."""

    def __cinit__(self):
        self.n_partitions = 0
        self.task_free = NONE
        self.edge_free = NONE
        self.result_free = NONE
        self.agent_free = NONE
        self.ring_head = NONE
        self.cursor = NONE
        self.back_seq = 0
        self.front_seq = -1
        self.stamp = 0
        self.n_live_tasks = 0
        self.n_wait = 0
        self.n_queued = 0
        self.n_disp = 0
        self.free_credit = 0

    def __repr__(self):
        return (f"<Core tasks={self.n_live_tasks} waiting={self.n_wait} ready={self.n_queued} "
                f"dispatched={self.n_disp} free_credit={self.free_credit} partitions={self.n_partitions}>")

    # -- slot checks (cold paths raise; the checks themselves are two int comparisons) -----------

    cdef int _task_slot(self, int64_t t) except -1:
        if t < 0 or t >= <int64_t>self.tasks.size():
            raise ValueError(f"task slot {t} does not exist (allocated slots: 0..{<int64_t>self.tasks.size() - 1})")
        if self.tasks[t].state == TS_FREE:
            raise ValueError(f"task slot {t} is free: its task was freed")
        return 0

    cdef int _result_slot(self, int64_t r) except -1:
        if r < 0 or r >= <int64_t>self.results.size():
            raise ValueError(f"result slot {r} does not exist (allocated slots: 0..{<int64_t>self.results.size() - 1})")
        if self.results[r].state == RS_FREE:
            raise ValueError(f"result slot {r} is free: it was freed")
        return 0

    cdef int _agent_slot(self, int64_t a) except -1:
        if a < 0 or a >= <int64_t>self.agents.size():
            raise ValueError(f"agent slot {a} does not exist (allocated slots: 0..{<int64_t>self.agents.size() - 1})")
        if not self.agents[a].alive:
            raise ValueError(f"agent slot {a} is free: its agent was removed")
        return 0

    cdef int _ensure_free_slot(self) except -1:
        """Make sure the free list has a head. A new slot joins the free list first, so that every
        caller takes the head of the list and a failure after this leaves it there untouched."""
        if self.task_free != NONE:
            return 0
        if self.tasks.size() >= <size_t>INT32_MAX:
            raise MemoryError("no task slot left (2**31 - 1 in use)")
        cdef TaskRec rec
        rec.seq = 0
        rec.partition = 0
        rec.owner = NONE
        rec.missing = 0
        rec.dep_head = NONE
        rec.held_prev = NONE
        rec.held_next = NONE
        rec.next_free = NONE
        rec.priority = 0
        rec.state = TS_FREE
        rec.in_queue = 0
        self.tasks.push_back(rec)
        self.task_free = <int32_t>self.tasks.size() - 1
        return 0

    cdef int _grow_partitions(self, int64_t p) except -1:
        if p < self.n_partitions:
            return 0
        if p < 0 or p >= PART_LIMIT:
            raise ValueError(f"partition {p} is out of range (0..{PART_LIMIT - 1})")
        cdef size_t n = <size_t>p + 1
        # A failure halfway leaves some vectors longer than n_partitions, which is harmless:
        # n_partitions only moves once all of them are long enough.
        self.buckets.resize(n * N_BUCKETS)
        self.bitmap.resize(n * BITMAP_WORDS, 0)
        self.live.resize(n, 0)
        self.dead.resize(n, 0)
        self.n_partitions = <int32_t>n
        return 0

    # -- ready queues ---------------------------------------------------------------------------

    cdef int _push(self, int32_t t, bint front) noexcept:
        cdef TaskRec* tr = &self.tasks[t]
        cdef int32_t p = tr.partition
        cdef int32_t prio = tr.priority
        if deque_push(self.buckets[p * N_BUCKETS + prio], t, front) < 0:
            return -1
        if front:
            tr.seq = self.front_seq
            self.front_seq -= 1
        else:
            tr.seq = self.back_seq
            self.back_seq += 1
        _set_bit(self.bitmap, p, prio)
        tr.in_queue = 1
        tr.state = TS_QUEUED
        self.live[p] += 1
        self.n_queued += 1
        return 0

    cdef int32_t _peek(self, int32_t p) noexcept:
        """Return the live head of p's best bucket (-1 if none), discarding dead heads on the way."""
        cdef int32_t prio, t
        cdef deque[int32_t]* dq
        while True:
            prio = _top_bucket(self.bitmap, p)
            if prio == 0:
                return NONE
            dq = &self.buckets[p * N_BUCKETS + prio]
            while not dq.empty():
                t = dq.front()
                if self.tasks[t].state == TS_QUEUED:
                    return t
                dq.pop_front()
                self._entry_gone(t)
            _clear_bit(self.bitmap, p, prio)

    cdef void _pop_head(self, int32_t p, int32_t prio) noexcept:
        cdef deque[int32_t]* dq = &self.buckets[p * N_BUCKETS + prio]
        self.tasks[dq.front()].in_queue = 0
        dq.pop_front()
        if dq.empty():
            _clear_bit(self.bitmap, p, prio)
        self.live[p] -= 1
        self.n_queued -= 1

    cdef void _entry_gone(self, int32_t t) noexcept:
        """Forget a dead entry that was just removed from a queue; recycle its slot if freed."""
        cdef TaskRec* tr = &self.tasks[t]
        tr.in_queue = 0
        self.dead[tr.partition] -= 1
        if tr.state == TS_FREE:
            self._recycle_task(t)

    cdef void _maybe_compact(self, int32_t p) noexcept:
        if self.dead[p] < COMPACT_MIN or self.dead[p] <= self.live[p]:
            return
        cdef int32_t prio, t
        cdef size_t i, k, n
        cdef deque[int32_t]* dq
        for prio in range(PRIO_MIN, PRIO_MAX + 1):
            dq = &self.buckets[p * N_BUCKETS + prio]
            n = dq.size()
            k = 0
            for i in range(n):
                t = deref(dq)[i]
                if self.tasks[t].state == TS_QUEUED:
                    deref(dq)[k] = t
                    k += 1
                else:
                    self._entry_gone(t)
            # Shrinking from the back only frees blocks: compaction never allocates.
            while dq.size() > k:
                dq.pop_back()
            if k == 0:
                _clear_bit(self.bitmap, p, prio)

    cdef int32_t _pick(self, int32_t a) noexcept:
        """Pop the best ready task among a's partitions: highest priority, then oldest entry."""
        cdef vector[int32_t]* parts = &self.agent_parts[a]
        cdef int32_t best = NONE, best_p = 0, p, t
        cdef uint8_t best_prio = 0
        cdef int64_t best_seq = 0
        cdef TaskRec* tr
        cdef size_t i
        for i in range(parts.size()):
            p = deref(parts)[i]
            if self.live[p] == 0:
                continue
            t = self._peek(p)
            tr = &self.tasks[t]
            if best == NONE or tr.priority > best_prio or (tr.priority == best_prio and tr.seq < best_seq):
                best = t
                best_p = p
                best_prio = tr.priority
                best_seq = tr.seq
        if best != NONE:
            self._pop_head(best_p, best_prio)
        return best

    # -- links ----------------------------------------------------------------------------------

    cdef void _drop_deps(self, int32_t t) noexcept:
        """Unlink every dependency edge of t from its result's waiter list and free the edges."""
        cdef TaskRec* tr = &self.tasks[t]
        cdef int32_t e = tr.dep_head, nxt
        cdef EdgeRec* er
        cdef ResultRec* rr
        while e != NONE:
            er = &self.edges[e]
            nxt = er.t_next
            rr = &self.results[er.result]
            if er.r_prev != NONE:
                self.edges[er.r_prev].r_next = er.r_next
            else:
                rr.head = er.r_next
            if er.r_next != NONE:
                self.edges[er.r_next].r_prev = er.r_prev
            else:
                rr.tail = er.r_prev
            rr.n_waiters -= 1
            er.task = NONE
            er.result = NONE
            er.r_next = self.edge_free
            self.edge_free = e
            e = nxt
        tr.dep_head = NONE
        tr.missing = 0

    cdef void _hold(self, int32_t a, int32_t t) noexcept:
        cdef AgentRec* ar = &self.agents[a]
        cdef TaskRec* tr = &self.tasks[t]
        tr.owner = a
        tr.held_prev = ar.tail
        tr.held_next = NONE
        if ar.tail != NONE:
            self.tasks[ar.tail].held_next = t
        else:
            ar.head = t
        ar.tail = t
        ar.n_held += 1
        self.free_credit -= 1

    cdef void _unhold(self, int32_t t) noexcept:
        cdef TaskRec* tr = &self.tasks[t]
        cdef AgentRec* ar = &self.agents[tr.owner]
        if tr.held_prev != NONE:
            self.tasks[tr.held_prev].held_next = tr.held_next
        else:
            ar.head = tr.held_next
        if tr.held_next != NONE:
            self.tasks[tr.held_next].held_prev = tr.held_prev
        else:
            ar.tail = tr.held_prev
        ar.n_held -= 1
        if ar.capacity > ar.want:  # lowered below what it held: the task's credit goes with it
            ar.capacity -= 1
        else:
            self.free_credit += 1
        tr.owner = NONE
        tr.held_prev = NONE
        tr.held_next = NONE

    cdef void _detach(self, int32_t t, uint8_t new_state) noexcept:
        """Take t out of whatever holds it and move it to DEAD or FREE."""
        cdef TaskRec* tr = &self.tasks[t]
        cdef uint8_t old = tr.state
        cdef int32_t p = tr.partition
        if old == TS_WAITING:
            self._drop_deps(t)
            self.n_wait -= 1
        elif old == TS_QUEUED:
            # Lazy deletion: the entry stays and is skipped (or purged) later.
            self.live[p] -= 1
            self.dead[p] += 1
            self.n_queued -= 1
        elif old == TS_DISPATCHED:
            self._unhold(t)
            self.n_disp -= 1
        tr.state = new_state
        if new_state == TS_FREE:
            self.n_live_tasks -= 1
            if not tr.in_queue:
                self._recycle_task(t)
        if old == TS_QUEUED:
            self._maybe_compact(p)

    cdef void _recycle_task(self, int32_t t) noexcept:
        self.tasks[t].next_free = self.task_free
        self.task_free = t

    # -- results --------------------------------------------------------------------------------

    def new_result(self):
        """Allocate a result slot whose data is not available yet."""
        cdef int32_t r
        cdef ResultRec rec
        rec.head = NONE
        rec.tail = NONE
        rec.n_waiters = 0
        rec.next_free = NONE
        rec.stamp = 0
        rec.state = RS_PENDING
        if self.result_free != NONE:
            r = self.result_free
            self.result_free = self.results[r].next_free
            self.results[r] = rec
        else:
            if self.results.size() >= <size_t>INT32_MAX:
                raise MemoryError("no result slot left (2**31 - 1 in use)")
            r = <int32_t>self.results.size()
            self.results.push_back(rec)
        return r

    def free_result(self, r):
        """Recycle a result slot; it must have no waiting task left."""
        cdef int64_t ri = _as_int(r)
        self._result_slot(ri)
        cdef ResultRec* rr = &self.results[ri]
        if rr.head != NONE:
            raise ValueError(f"result slot {ri} still has {rr.n_waiters} waiting task(s): "
                             "call on_result_ready or on_result_aborted first")
        rr.state = RS_FREE
        rr.next_free = self.result_free
        self.result_free = <int32_t>ri

    def result_waiters(self, r):
        """Return the task slots waiting on result r, in registration order."""
        cdef int64_t ri = _as_int(r)
        self._result_slot(ri)
        cdef list out = []
        cdef int32_t e = self.results[ri].head
        while e != NONE:
            out.append(self.edges[e].task)
            e = self.edges[e].r_next
        return out

    def on_result_ready(self, r):
        """Record that result r has data; queue and return the tasks that no longer miss anything."""
        cdef int64_t ri = _as_int(r)
        self._result_slot(ri)
        cdef ResultRec* rr = &self.results[ri]
        if rr.state == RS_ABORTED:
            raise ValueError(f"result slot {ri} was aborted: it cannot become ready")
        cdef list out = []
        cdef int32_t e, t, nxt
        cdef EdgeRec* er
        cdef TaskRec* tr
        # Edges are consumed one at a time from the head, each one completely, so a MemoryError
        # leaves a consistent core and a later call finishes the job.
        while rr.head != NONE:
            e = rr.head
            er = &self.edges[e]
            t = er.task
            tr = &self.tasks[t]
            if tr.missing == 1:
                out.append(t)
                if self._push(t, False) < 0:
                    raise MemoryError("cannot grow a ready queue")
                self.n_wait -= 1
            nxt = er.r_next
            rr.head = nxt
            if nxt != NONE:
                self.edges[nxt].r_prev = NONE
            else:
                rr.tail = NONE
            rr.n_waiters -= 1
            if er.t_prev != NONE:
                self.edges[er.t_prev].t_next = er.t_next
            else:
                tr.dep_head = er.t_next
            if er.t_next != NONE:
                self.edges[er.t_next].t_prev = er.t_prev
            tr.missing -= 1
            er.task = NONE
            er.result = NONE
            er.r_next = self.edge_free
            self.edge_free = e
        rr.state = RS_READY
        return out

    def on_result_aborted(self, r):
        """Record that result r will never have data; return its waiting tasks, now DEAD."""
        cdef int64_t ri = _as_int(r)
        self._result_slot(ri)
        cdef ResultRec* rr = &self.results[ri]
        if rr.state == RS_READY:
            raise ValueError(f"result slot {ri} is ready: it cannot be aborted")
        cdef list out = []
        cdef int32_t t
        while rr.head != NONE:
            t = self.edges[rr.head].task
            out.append(t)
            self._drop_deps(t)
            self.tasks[t].state = TS_DEAD
            self.n_wait -= 1
        rr.state = RS_ABORTED
        return out

    # -- tasks ----------------------------------------------------------------------------------

    def add_task(self, partition, priority, missing):
        """Allocate a task slot waiting for the ``missing`` result slots, queued at once if none."""
        cdef int64_t p = _as_int(partition)
        cdef int64_t prio = _as_int(priority)
        if prio < PRIO_MIN or prio > PRIO_MAX:
            raise ValueError(f"priority {priority!r} is out of range ({PRIO_MIN}..{PRIO_MAX})")
        if p < 0 or p >= PART_LIMIT:
            raise ValueError(f"partition {partition!r} is out of range (0..{PART_LIMIT - 1})")
        cdef int64_t ri
        cdef ResultRec* rr
        # Validate everything before changing anything: a bad slot leaves no trace.
        self.stamp += 1
        self.scratch.clear()
        for obj in missing:
            ri = _as_int(obj)
            self._result_slot(ri)
            rr = &self.results[ri]
            if rr.state == RS_ABORTED:
                raise ValueError(f"result slot {ri} was aborted: no task can wait for it")
            # An already available result is not missing; a repeated one counts once.
            if rr.state == RS_PENDING and rr.stamp != self.stamp:
                rr.stamp = self.stamp
                self.scratch.push_back(<int32_t>ri)
        self._grow_partitions(p)
        cdef size_t n = self.scratch.size()
        if self.edges.size() + n > <size_t>INT32_MAX:
            raise MemoryError("no dependency edge left (2**31 - 1 in use)")
        if self.edges.capacity() < self.edges.size() + n:
            self.edges.reserve(max(2 * self.edges.capacity(), self.edges.size() + n))
        cdef int32_t t
        self._ensure_free_slot()
        t = self.task_free
        cdef TaskRec* tr = &self.tasks[t]
        tr.partition = <int32_t>p
        tr.priority = <uint8_t>prio
        tr.seq = 0
        tr.held_prev = NONE
        tr.held_next = NONE
        if n == 0:
            if self._push(t, False) < 0:
                raise MemoryError("cannot grow a ready queue")
        else:
            tr.state = TS_WAITING
            self.n_wait += 1
        self.task_free = tr.next_free
        tr.next_free = NONE
        self.n_live_tasks += 1
        if n == 0:
            return t
        cdef int32_t e, r
        cdef EdgeRec* er
        cdef size_t i
        for i in range(n):
            r = self.scratch[i]
            if self.edge_free != NONE:
                e = self.edge_free
                self.edge_free = self.edges[e].r_next
            else:
                e = <int32_t>self.edges.size()
                self.edges.push_back(EdgeRec(NONE, NONE, NONE, NONE, NONE, NONE))
            er = &self.edges[e]
            er.task = t
            er.result = r
            rr = &self.results[r]
            er.r_prev = rr.tail
            er.r_next = NONE
            if rr.tail != NONE:
                self.edges[rr.tail].r_next = e
            else:
                rr.head = e
            rr.tail = e
            rr.n_waiters += 1
            er.t_prev = NONE
            er.t_next = tr.dep_head
            if tr.dep_head != NONE:
                self.edges[tr.dep_head].t_prev = e
            tr.dep_head = e
        tr.missing = <int32_t>n
        return t

    def add_held_task(self, partition, priority, a):
        """Allocate a task that agent a already holds (DISPATCHED): the broker reloading its state.

        It takes one of a's credits; ValueError if a has none left. Nothing changes on error.
        """
        cdef int64_t p = _as_int(partition)
        cdef int64_t prio = _as_int(priority)
        cdef int64_t ai = _as_int(a)
        if prio < PRIO_MIN or prio > PRIO_MAX:
            raise ValueError(f"priority {priority!r} is out of range ({PRIO_MIN}..{PRIO_MAX})")
        if p < 0 or p >= PART_LIMIT:
            raise ValueError(f"partition {partition!r} is out of range (0..{PART_LIMIT - 1})")
        self._agent_slot(ai)
        if self.agents[ai].n_held >= self.agents[ai].capacity:
            raise ValueError(f"agent slot {ai} has no credit left (it holds {self.agents[ai].n_held})")
        self._grow_partitions(p)
        cdef int32_t t
        self._ensure_free_slot()
        t = self.task_free
        cdef TaskRec* tr = &self.tasks[t]
        self.task_free = tr.next_free
        tr.next_free = NONE
        tr.partition = <int32_t>p
        tr.priority = <uint8_t>prio
        tr.seq = 0
        tr.missing = 0
        tr.dep_head = NONE
        tr.in_queue = 0
        tr.state = TS_DISPATCHED
        self._hold(<int32_t>ai, t)
        self.n_disp += 1
        self.n_live_tasks += 1
        return t

    def missing(self, t):
        """Return how many results task t still waits for."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        return self.tasks[ti].missing

    def state(self, t):
        """Return task t's STATE_* constant; a freed slot reports STATE_FREE."""
        cdef int64_t ti = _as_int(t)
        if ti < 0 or ti >= <int64_t>self.tasks.size():
            self._task_slot(ti)  # raises: out of range
        return self.tasks[ti].state

    def priority(self, t):
        """Return task t's priority."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        return self.tasks[ti].priority

    def partition(self, t):
        """Return task t's partition."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        return self.tasks[ti].partition

    def owner(self, t):
        """Return the agent slot holding task t, or -1."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        return self.tasks[ti].owner

    def cancel_task(self, t):
        """Take task t out of waiter lists, its queue (lazily) and its agent; it becomes DEAD."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        self._detach(<int32_t>ti, TS_DEAD)

    def free_task(self, t):
        """Forget finished task t: its agent gets the credit back and its slot is recycled."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        self._detach(<int32_t>ti, TS_FREE)

    def requeue(self, t):
        """Put dispatched task t back at the front of its priority bucket, taking it from its agent."""
        cdef int64_t ti = _as_int(t)
        self._task_slot(ti)
        if self.tasks[ti].state != TS_DISPATCHED:
            raise ValueError(f"task slot {ti} is {_STATE_NAMES[self.tasks[ti].state]}, not DISPATCHED: "
                             "only a dispatched task can be requeued")
        if self._push(<int32_t>ti, True) < 0:
            raise MemoryError("cannot grow a ready queue")
        self._unhold(<int32_t>ti)
        self.n_disp -= 1

    def adopt(self, t, a):
        """Give task t (QUEUED, or DISPATCHED to another agent) to agent a, as if dispatched to it.

        For an attempt an agent re-announces after a reconnection or a broker restart: it keeps
        running there instead of being queued again. A queued entry is deleted lazily.
        """
        cdef int64_t ti = _as_int(t)
        cdef int64_t ai = _as_int(a)
        self._task_slot(ti)
        self._agent_slot(ai)
        cdef TaskRec* tr = &self.tasks[ti]
        cdef int32_t p = tr.partition
        if tr.state == TS_DISPATCHED and tr.owner == ai:
            return
        if self.agents[ai].n_held >= self.agents[ai].capacity:
            raise ValueError(f"agent slot {ai} has no credit left to adopt task slot {ti}")
        cdef deque[int32_t]* dq
        cdef size_t i, k, n
        if tr.state == TS_QUEUED:
            # Taken out of its bucket now (rare: a linear scan of one bucket), so no entry names it.
            dq = &self.buckets[p * N_BUCKETS + tr.priority]
            n = dq.size()
            k = 0
            for i in range(n):
                if deref(dq)[i] != ti:
                    deref(dq)[k] = deref(dq)[i]
                    k += 1
            while dq.size() > k:
                dq.pop_back()
            if k == 0:
                _clear_bit(self.bitmap, p, tr.priority)
            tr.in_queue = 0
            self.live[p] -= 1
            self.n_queued -= 1
            tr.state = TS_DISPATCHED
            self.n_disp += 1
            self._hold(<int32_t>ai, <int32_t>ti)
        elif tr.state == TS_DISPATCHED:
            self._unhold(<int32_t>ti)
            self._hold(<int32_t>ai, <int32_t>ti)
        else:
            raise ValueError(f"task slot {ti} is {_STATE_NAMES[tr.state]}: only a queued or dispatched task "
                             "can be adopted")

    # -- agents ---------------------------------------------------------------------------------

    def add_agent(self, partitions, capacity):
        """Register an agent serving ``partitions`` that may hold up to ``capacity`` tasks."""
        cdef int64_t cap = _as_int(capacity)
        if cap < 1 or cap > INT32_MAX:
            raise ValueError(f"capacity {capacity!r} is out of range (1..{INT32_MAX})")
        cdef int64_t p, top = -1
        cdef int32_t q
        cdef bint seen
        self.scratch.clear()
        for obj in partitions:
            p = _as_int(obj)
            if p < 0 or p >= PART_LIMIT:
                raise ValueError(f"partition {obj!r} is out of range (0..{PART_LIMIT - 1})")
            seen = False
            for q in self.scratch:
                if q == p:
                    seen = True
                    break
            if not seen:
                self.scratch.push_back(<int32_t>p)
                top = max(top, p)
        if top < 0:
            raise ValueError("an agent must serve at least one partition")
        self._grow_partitions(top)
        cdef int32_t a
        cdef AgentRec rec
        rec.capacity = <int32_t>cap
        rec.want = <int32_t>cap
        rec.n_held = 0
        rec.head = NONE
        rec.tail = NONE
        rec.ring_prev = NONE
        rec.ring_next = NONE
        rec.next_free = NONE
        rec.alive = 1
        # Every step that may fail comes before the slot is taken: a MemoryError leaves no trace.
        if self.agent_free != NONE:
            a = self.agent_free
            self.agent_parts[a].assign(self.scratch.begin(), self.scratch.end())
            self.agent_free = self.agents[a].next_free
            self.agents[a] = rec
        else:
            if self.agents.size() >= <size_t>INT32_MAX:
                raise MemoryError("no agent slot left (2**31 - 1 in use)")
            a = <int32_t>self.agents.size()
            if self.agent_parts.size() <= <size_t>a:
                self.agent_parts.resize(a + 1)
            self.agent_parts[a].assign(self.scratch.begin(), self.scratch.end())
            self.agents.push_back(rec)
        cdef AgentRec* ar = &self.agents[a]
        if self.ring_head == NONE:
            ar.ring_prev = a
            ar.ring_next = a
            self.ring_head = a
            self.cursor = a
        else:
            # Append at the end of the registration order, i.e. just before the oldest agent.
            ar.ring_next = self.ring_head
            ar.ring_prev = self.agents[self.ring_head].ring_prev
            self.agents[ar.ring_prev].ring_next = a
            self.agents[self.ring_head].ring_prev = a
        self.free_credit += cap
        return a

    def remove_agent(self, a):
        """Forget agent a; return the task slots it held, requeued at the front in the same order."""
        cdef int64_t ai = _as_int(a)
        self._agent_slot(ai)
        cdef AgentRec* ar = &self.agents[ai]
        cdef list held = []
        cdef int32_t t = ar.head, prev
        while t != NONE:
            held.append(t)
            t = self.tasks[t].held_next
        # Newest first, each pushed to the front: the oldest ends up first in line again.
        # One task at a time, so a MemoryError leaves a consistent core with the agent still there.
        t = ar.tail
        while t != NONE:
            prev = self.tasks[t].held_prev
            if self._push(t, True) < 0:
                raise MemoryError("cannot grow a ready queue")
            self._unhold(t)
            self.n_disp -= 1
            t = prev
        self.free_credit -= ar.capacity
        if ar.ring_next == ai:
            self.ring_head = NONE
            self.cursor = NONE
        else:
            self.agents[ar.ring_prev].ring_next = ar.ring_next
            self.agents[ar.ring_next].ring_prev = ar.ring_prev
            if self.ring_head == ai:
                self.ring_head = ar.ring_next
            if self.cursor == ai:
                self.cursor = ar.ring_next
        ar.ring_prev = NONE
        ar.ring_next = NONE
        ar.alive = 0
        ar.capacity = 0
        ar.next_free = self.agent_free
        self.agent_free = <int32_t>ai
        self.agent_parts[ai].clear()
        return held

    def agent_held(self, a):
        """Return the task slots agent a holds, in the order it received them."""
        cdef int64_t ai = _as_int(a)
        self._agent_slot(ai)
        cdef list out = []
        cdef int32_t t = self.agents[ai].head
        while t != NONE:
            out.append(t)
            t = self.tasks[t].held_next
        return out

    def set_agent_capacity(self, a, capacity):
        """Let agent a hold up to ``capacity`` tasks from now on (an agent's credit follows its tasks' length).

        Lowered below what it holds, it gets no credit, and its capacity comes down with each task it ends
        until it reaches ``capacity``: no task is taken back.
        """
        cdef int64_t ai = _as_int(a)
        cdef int64_t cap = _as_int(capacity)
        self._agent_slot(ai)
        if cap < 1 or cap > INT32_MAX:
            raise ValueError(f"capacity {capacity!r} is out of range (1..{INT32_MAX})")
        cdef AgentRec* ar = &self.agents[ai]
        cdef int32_t now = <int32_t>max(cap, <int64_t>ar.n_held)
        self.free_credit += now - ar.capacity
        ar.capacity = now
        ar.want = <int32_t>cap

    def agent_credit(self, a):
        """Return how many more tasks agent a may receive."""
        cdef int64_t ai = _as_int(a)
        self._agent_slot(ai)
        return self.agents[ai].capacity - self.agents[ai].n_held

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, max_tasks=-1):
        """Hand ready tasks to agents with credit, round-robin; return [(agent, task), ...]."""
        cdef int64_t budget = _as_int(max_tasks)
        if budget < 0:
            budget = INT64_MAX
        cdef list out = []
        if budget == 0 or self.n_queued == 0 or self.free_credit == 0:
            return out
        cdef int32_t a = self.cursor, t, last = NONE
        cdef AgentRec* ar
        self.cand.clear()
        while True:
            ar = &self.agents[a]
            if ar.n_held < ar.capacity:
                self.cand.push_back(a)
            a = ar.ring_next
            if a == self.cursor:
                break
        # Room for every assignment this call can make, so the loop below cannot fail halfway.
        cdef int64_t bound = min(budget, min(self.n_queued, self.free_credit))
        self.scratch.clear()
        self.scratch.reserve(<size_t>(2 * bound))
        cdef size_t i, k
        cdef TaskRec* tr
        while not self.cand.empty() and budget > 0 and self.n_queued > 0:
            k = 0
            for i in range(self.cand.size()):
                if budget == 0:
                    break
                a = self.cand[i]
                t = self._pick(a)
                if t == NONE:
                    # Queues only shrink during a call: this agent will find nothing later either.
                    continue
                self.tasks[t].state = TS_DISPATCHED
                self._hold(a, t)
                self.n_disp += 1
                self.scratch.push_back(a)
                self.scratch.push_back(t)
                budget -= 1
                last = a
                ar = &self.agents[a]
                if ar.n_held < ar.capacity:
                    self.cand[k] = a
                    k += 1
            self.cand.resize(k)
        if last != NONE:
            self.cursor = self.agents[last].ring_next
        for i in range(0, self.scratch.size(), 2):
            out.append((self.scratch[i], self.scratch[i + 1]))
        return out

    # -- introspection --------------------------------------------------------------------------

    def n_ready(self, partition=-1):
        """Return how many live tasks are queued in ``partition`` (-1: in all partitions)."""
        cdef int64_t p = _as_int(partition)
        if p == -1:
            return self.n_queued
        if p < 0 or p >= PART_LIMIT:
            raise ValueError(f"partition {partition!r} is out of range (-1 for all, or 0..{PART_LIMIT - 1})")
        if p >= self.n_partitions:
            return 0
        return self.live[p]

    def n_waiting(self):
        """Return how many tasks wait for at least one result."""
        return self.n_wait

    def n_dispatched(self):
        """Return how many tasks agents hold."""
        return self.n_disp

    def n_tasks(self):
        """Return how many task slots are live (any state but FREE)."""
        return self.n_live_tasks

    def validate(self):
        """Check every invariant; raise AssertionError naming the first broken one."""
        cdef size_t nt = self.tasks.size(), ne = self.edges.size()
        cdef size_t nr = self.results.size(), na = self.agents.size()
        cdef int64_t np_ = self.n_partitions
        cdef int32_t t, e, r, a, p, prio, x
        cdef int64_t count, i
        cdef TaskRec* tr
        cdef EdgeRec* er
        cdef ResultRec* rr
        cdef AgentRec* ar

        if (self.buckets.size() < <size_t>(np_ * N_BUCKETS) or self.bitmap.size() < <size_t>(np_ * BITMAP_WORDS)
                or self.live.size() < <size_t>np_ or self.dead.size() < <size_t>np_):
            _broken("partition arrays", f"shorter than n_partitions={np_}")

        # Free lists: in range, acyclic, only free records.
        task_on_free = set()
        t = self.task_free
        while t != NONE:
            if t < 0 or <size_t>t >= nt or t in task_on_free:
                _broken("task free list", f"bad or repeated slot {t}")
            if self.tasks[t].state != TS_FREE or self.tasks[t].in_queue:
                _broken("task free list", f"slot {t} is listed but is {_STATE_NAMES[self.tasks[t].state]}"
                        f" (in_queue={self.tasks[t].in_queue})")
            task_on_free.add(t)
            t = self.tasks[t].next_free
        edge_on_free = set()
        e = self.edge_free
        while e != NONE:
            if e < 0 or <size_t>e >= ne or e in edge_on_free:
                _broken("edge free list", f"bad or repeated edge {e}")
            if self.edges[e].task != NONE:
                _broken("edge free list", f"edge {e} is listed but still links task {self.edges[e].task}")
            edge_on_free.add(e)
            e = self.edges[e].r_next
        result_on_free = set()
        r = self.result_free
        while r != NONE:
            if r < 0 or <size_t>r >= nr or r in result_on_free:
                _broken("result free list", f"bad or repeated slot {r}")
            if self.results[r].state != RS_FREE:
                _broken("result free list", f"slot {r} is listed but is {_RESULT_NAMES[self.results[r].state]}")
            result_on_free.add(r)
            r = self.results[r].next_free
        agent_on_free = set()
        a = self.agent_free
        while a != NONE:
            if a < 0 or <size_t>a >= na or a in agent_on_free:
                _broken("agent free list", f"bad or repeated slot {a}")
            if self.agents[a].alive:
                _broken("agent free list", f"slot {a} is listed but alive")
            agent_on_free.add(a)
            a = self.agents[a].next_free

        # Results and their waiter lists (which are the edges in use).
        edges_seen = set()
        for r in range(<int32_t>nr):
            rr = &self.results[r]
            if rr.state > RS_ABORTED:
                _broken("result state", f"result {r} has state {rr.state}")
            if rr.state == RS_FREE and r not in result_on_free:
                _broken("result free list", f"free result {r} is not on the free list")
            if rr.state != RS_PENDING and rr.head != NONE:
                _broken("waiters", f"result {r} is {_RESULT_NAMES[rr.state]} but has waiters")
            count = 0
            x = NONE
            e = rr.head
            while e != NONE:
                if e < 0 or <size_t>e >= ne or e in edges_seen:
                    _broken("waiters", f"result {r} lists bad or repeated edge {e}")
                edges_seen.add(e)
                er = &self.edges[e]
                if er.result != r or er.r_prev != x:
                    _broken("waiters", f"edge {e} in result {r}'s list has result={er.result} r_prev={er.r_prev}")
                if er.task < 0 or <size_t>er.task >= nt or self.tasks[er.task].state != TS_WAITING:
                    _broken("waiters", f"result {r} lists task {er.task}, which is not WAITING")
                count += 1
                x = e
                e = er.r_next
            if rr.tail != x:
                _broken("waiters", f"result {r} tail is {rr.tail}, list ends at {x}")
            if count != rr.n_waiters:
                _broken("waiters", f"result {r} counts {rr.n_waiters} waiters, lists {count}")
        if len(edges_seen) + len(edge_on_free) != <Py_ssize_t>ne or edges_seen & edge_on_free:
            _broken("edges", f"{ne} edges: {len(edges_seen)} linked, {len(edge_on_free)} free")

        # Tasks, their dependency lists and states.
        cdef int64_t by_state[5]
        by_state[:] = [0, 0, 0, 0, 0]
        cdef int64_t in_queue_count = 0
        edges_by_task = 0
        for t in range(<int32_t>nt):
            tr = &self.tasks[t]
            if tr.state > TS_DEAD:
                _broken("task state", f"task {t} has state {tr.state}")
            by_state[tr.state] += 1
            in_queue_count += tr.in_queue
            if tr.state == TS_FREE:
                if not tr.in_queue and t not in task_on_free:
                    _broken("task free list", f"free task {t} is neither queued nor on the free list")
                continue
            if tr.priority < PRIO_MIN or tr.priority > PRIO_MAX or tr.partition < 0 or tr.partition >= np_:
                _broken("task fields", f"task {t} has priority {tr.priority}, partition {tr.partition}")
            count = 0
            x = NONE
            e = tr.dep_head
            while e != NONE:
                if e < 0 or <size_t>e >= ne or e not in edges_seen:
                    _broken("missing counts", f"task {t} lists edge {e}, which no result lists")
                er = &self.edges[e]
                if er.task != t or er.t_prev != x:
                    _broken("missing counts", f"edge {e} in task {t}'s list has task={er.task} t_prev={er.t_prev}")
                count += 1
                if count > <int64_t>ne:
                    _broken("missing counts", f"task {t}'s dependency list loops")
                x = e
                e = er.t_next
            edges_by_task += count
            if count != tr.missing:
                _broken("missing counts", f"task {t} counts {tr.missing} missing, lists {count}")
            if (tr.state == TS_WAITING) != (tr.missing > 0):
                _broken("missing counts", f"task {t} is {_STATE_NAMES[tr.state]} with {tr.missing} missing")
            if (tr.state == TS_QUEUED) and not tr.in_queue:
                _broken("queue membership", f"task {t} is QUEUED but no queue entry names it")
            if tr.state in (TS_WAITING, TS_DISPATCHED) and tr.in_queue:
                _broken("queue membership", f"task {t} is {_STATE_NAMES[tr.state]} but a queue entry names it")
            if tr.state == TS_DISPATCHED:
                if tr.owner < 0 or <size_t>tr.owner >= na or not self.agents[tr.owner].alive:
                    _broken("ownership", f"task {t} is DISPATCHED to {tr.owner}, not a live agent")
            elif tr.owner != NONE:
                _broken("ownership", f"task {t} is {_STATE_NAMES[tr.state]} but owned by agent {tr.owner}")
        if edges_by_task != len(edges_seen):
            _broken("missing counts", f"tasks list {edges_by_task} edges, results {len(edges_seen)}")
        if by_state[<int>TS_FREE] != len(task_on_free) + sum(
                1 for t in range(<int32_t>nt) if self.tasks[t].state == TS_FREE and self.tasks[t].in_queue):
            _broken("task free list", "free slots do not match the free list plus queued free slots")
        if (self.n_live_tasks != <int64_t>nt - by_state[<int>TS_FREE] or self.n_wait != by_state[<int>TS_WAITING]
                or self.n_queued != by_state[<int>TS_QUEUED] or self.n_disp != by_state[<int>TS_DISPATCHED]):
            _broken("counters", f"tasks/waiting/ready/dispatched = {self.n_live_tasks}/{self.n_wait}/"
                    f"{self.n_queued}/{self.n_disp}, states say {nt - by_state[<int>TS_FREE]}/{by_state[<int>TS_WAITING]}/"
                    f"{by_state[<int>TS_QUEUED]}/{by_state[<int>TS_DISPATCHED]}")

        # Queues: each in_queue slot appears exactly once, in the bucket its fields name, in key order.
        queued_seen = set()
        cdef int64_t live_p, dead_p, prev_seq
        cdef deque[int32_t]* dq
        cdef uint64_t bit
        for p in range(<int32_t>np_):
            live_p = 0
            dead_p = 0
            for prio in range(N_BUCKETS):
                dq = &self.buckets[p * N_BUCKETS + prio]
                bit = (self.bitmap[p * BITMAP_WORDS + (prio >> 6)] >> (prio & 63)) & 1
                if <bint>bit != (not dq.empty()):
                    _broken("bucket bitmap", f"partition {p} priority {prio}: bit {bit}, {dq.size()} entries")
                prev_seq = INT64_MIN
                for i in range(<int64_t>dq.size()):
                    t = deref(dq)[i]
                    if t < 0 or <size_t>t >= nt or t in queued_seen:
                        _broken("queue membership", f"partition {p} priority {prio} holds bad or repeated slot {t}")
                    queued_seen.add(t)
                    tr = &self.tasks[t]
                    if not tr.in_queue or tr.partition != p or tr.priority != prio:
                        _broken("queue membership", f"task {t} sits in partition {p} priority {prio} but has "
                                f"in_queue={tr.in_queue} partition={tr.partition} priority={tr.priority}")
                    if tr.state == TS_QUEUED:
                        live_p += 1
                        if tr.seq <= prev_seq:
                            _broken("queue order", f"task {t} key {tr.seq} follows key {prev_seq}")
                        prev_seq = tr.seq
                    else:
                        dead_p += 1
            if live_p != self.live[p] or dead_p != self.dead[p]:
                _broken("ready counts", f"partition {p} counts {self.live[p]} live / {self.dead[p]} dead, "
                        f"queues hold {live_p} / {dead_p}")
        if len(queued_seen) != in_queue_count:
            _broken("queue membership", f"{in_queue_count} slots flagged in_queue, queues hold {len(queued_seen)}")

        # Agents: held lists, credit, partitions, ring.
        cdef int64_t credit = 0, held_total = 0, alive = 0
        for a in range(<int32_t>na):
            ar = &self.agents[a]
            if not ar.alive:
                if a not in agent_on_free:
                    _broken("agent free list", f"dead agent {a} is not on the free list")
                continue
            alive += 1
            count = 0
            x = NONE
            t = ar.head
            while t != NONE:
                if t < 0 or <size_t>t >= nt:
                    _broken("held sets", f"agent {a} holds bad slot {t}")
                tr = &self.tasks[t]
                if tr.state != TS_DISPATCHED or tr.owner != a or tr.held_prev != x:
                    _broken("held sets", f"agent {a} holds task {t}: state {_STATE_NAMES[tr.state]}, owner {tr.owner}")
                count += 1
                if count > <int64_t>nt:
                    _broken("held sets", f"agent {a}'s held list loops")
                x = t
                t = tr.held_next
            if ar.tail != x or count != ar.n_held:
                _broken("held sets", f"agent {a} counts {ar.n_held} held (tail {ar.tail}), lists {count} (ends {x})")
            if ar.n_held > ar.capacity or ar.capacity < 1:
                _broken("credits", f"agent {a} holds {ar.n_held} with capacity {ar.capacity}")
            if ar.want < 1 or (ar.capacity != ar.want and not ar.want < ar.capacity == ar.n_held):
                _broken("credits", f"agent {a} asked for capacity {ar.want}, has {ar.capacity} and holds {ar.n_held}")
            credit += ar.capacity - ar.n_held
            held_total += ar.n_held
            parts = list(self.agent_parts[a])
            if not parts or len(set(parts)) != len(parts) or not all(0 <= q < np_ for q in parts):
                _broken("agent partitions", f"agent {a} serves {parts}")
        if credit != self.free_credit:
            _broken("credits", f"free_credit is {self.free_credit}, agents have {credit}")
        if held_total != self.n_disp:
            _broken("held sets", f"agents hold {held_total} tasks, {self.n_disp} are DISPATCHED")
        if alive == 0:
            if self.ring_head != NONE or self.cursor != NONE:
                _broken("agent ring", f"no agent but ring_head={self.ring_head} cursor={self.cursor}")
        else:
            ring = []
            a = self.ring_head
            while True:
                if a < 0 or <size_t>a >= na or not self.agents[a].alive or len(ring) > alive:
                    _broken("agent ring", f"ring reaches {a} after {ring}")
                ring.append(a)
                if self.agents[self.agents[a].ring_next].ring_prev != a:
                    _broken("agent ring", f"agent {a}'s next does not point back")
                a = self.agents[a].ring_next
                if a == self.ring_head:
                    break
            if len(ring) != alive or self.cursor not in ring:
                _broken("agent ring", f"ring {ring} vs {alive} live agents, cursor {self.cursor}")


# -- ids (armonik_zmq/ids.py documents the layout) ------------------------------------------------------
# In C: the broker makes two ids per submitted task, and the Python version cost ~1.4 us each.

from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec
import os as _os

cdef unsigned char _id_pool[4096]
cdef int _id_left = 0
cdef int64_t _id_last_ms = 0
cdef int _id_seq = 0
cdef const char* _HEX = b"0123456789abcdef"


def reset_id_pool():
    """Forget the random bytes drawn so far (a forked child must draw its own)."""
    global _id_left
    _id_left = 0


def new_id():
    """Return a new version 7 UUID string; ids made by one process sort in the order they were made."""
    return _new_id()


@cython.boundscheck(False)
@cython.wraparound(False)
cdef str _new_id():
    global _id_left, _id_last_ms, _id_seq
    cdef char out[36]
    cdef timespec ts
    cdef int64_t ms, last
    cdef int seq, i
    cdef unsigned char* raw
    cdef bytes fresh
    if _id_left < 8:
        fresh = _os.urandom(4096)  # one system call per 512 ids
        memcpy(_id_pool, <const char*>fresh, 4096)
        _id_left = 4096
    _id_left -= 8
    raw = _id_pool + _id_left
    clock_gettime(CLOCK_REALTIME, &ts)
    ms = <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
    last = _id_last_ms
    seq = _id_seq
    if ms > last:
        last = ms
        seq = 0
    else:
        seq += 1
        if seq > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one (order is kept)
            last += 1
            seq = 0
    _id_last_ms = last
    _id_seq = seq
    # tttttttt-tttt-7sss-vrrr-rrrrrrrrrrrr: 48-bit milliseconds, version, sequence, variant + 62 random bits
    for i in range(8):
        out[i] = _HEX[(last >> (4 * (11 - i))) & 0xF]
    out[8] = b'-'
    for i in range(4):
        out[9 + i] = _HEX[(last >> (4 * (3 - i))) & 0xF]
    out[13] = b'-'
    out[14] = b'7'
    out[15] = _HEX[(seq >> 8) & 0xF]
    out[16] = _HEX[(seq >> 4) & 0xF]
    out[17] = _HEX[seq & 0xF]
    out[18] = b'-'
    out[19] = _HEX[((raw[0] & 0x3F) | 0x80) >> 4]
    out[20] = _HEX[raw[0] & 0xF]
    out[21] = _HEX[raw[1] >> 4]
    out[22] = _HEX[raw[1] & 0xF]
    out[23] = b'-'
    for i in range(6):
        out[24 + 2 * i] = _HEX[raw[2 + i] >> 4]
        out[25 + 2 * i] = _HEX[raw[2 + i] & 0xF]
    return out[:36].decode("ascii")


# -- the worker's alarm (worker/alarm.py) ---------------------------------------------------------------
# A worker sets its guard's timerfd when each run starts and clears it when it idles: through ctypes that was
# ~2.7 us a call (argument conversion around the system call), here ~0.75 us.

cdef extern from "<sys/timerfd.h>" nogil:
    """
    #include <errno.h>
    #include <sys/timerfd.h>
    /* Arm (absolute CLOCK_MONOTONIC seconds) or disarm (0) a timerfd: 0, or errno. */
    static int armonik_timerfd_at(int fd, double deadline) {
        struct itimerspec spec = {{0, 0}, {0, 0}};
        if (deadline > 0) {
            spec.it_value.tv_sec = (time_t)deadline;
            spec.it_value.tv_nsec = (long)((deadline - (double)spec.it_value.tv_sec) * 1e9);
            /* 0 would disarm the timer: a deadline on a whole second goes off a nanosecond later */
            if (spec.it_value.tv_nsec == 0) spec.it_value.tv_nsec = 1;
        }
        return timerfd_settime(fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0 ? errno : 0;
    }
    """
    int _timerfd_at "armonik_timerfd_at"(int fd, double deadline) noexcept nogil


def timerfd_at(int fd, double deadline):
    """Have timerfd ``fd`` go off at ``deadline`` (``time.monotonic()`` seconds; at once if it passed), or never
    (``deadline`` 0): ``timerfd_settime`` with an absolute time. OSError if the system call fails."""
    cdef int err = _timerfd_at(fd, deadline)
    if err:
        raise OSError(err, f"timerfd_settime: {_os.strerror(err)}")


# -- request schemas (protocol.py) ---------------------------------------------------------------------
# protocol.validate checks every request against its op's schema. The schema classes there name the field
# at fault, building a path string per field and item as they go: on a 10,000-task TASKS_DONE that was a
# tenth of the broker's CPU. ``schema_valid`` answers only yes or no, over the same schema compiled to
# tuples (``protocol._Type.compiled``); on no, protocol.py runs its own check for the message.

# node kinds: (kind, ...) as compiled by protocol.py
SCHEMA_STR = 0          # (kind, nonempty)
SCHEMA_STR_OR_BYTES = 1  # (kind, nonempty)
SCHEMA_INT = 2          # (kind, lo or None, hi or None)
SCHEMA_NUM = 3          # (kind,)
SCHEMA_BOOL = 4         # (kind,)
SCHEMA_ANY = 5          # (kind,)
SCHEMA_SCALAR = 6       # (kind,)
SCHEMA_LIST = 7         # (kind, item, max_len, nonempty)
SCHEMA_STRMAP = 8       # (kind,)
SCHEMA_OPT = 9          # (kind, inner)
SCHEMA_MAP = 10         # (kind, ((name, node), ...) required, {name: node} optional, top level?, {name: node} required)

#: the envelope's fields, allowed in a request's top-level map besides its op's own
cdef frozenset _ENVELOPE = frozenset(("v", "op", "rid"))
#: what ``dict.get`` returns for a field that is not there (no decoded value is this object)
cdef object _MISSING = object()


def schema_valid(tuple node, value):
    """Return whether ``value`` matches the compiled schema ``node`` (no message: see protocol.validate)."""
    return _schema_valid(node, value)


cdef bint _schema_valid(tuple node, object value) except -1:
    cdef int kind = node[0]
    cdef type t = type(value)
    cdef Py_ssize_t n
    cdef dict d, optional
    cdef tuple item
    cdef object name, v, sub, lo, hi
    if kind == 0:  # SCHEMA_STR
        return t is str and not (node[1] and len(<str>value) == 0)
    if kind == 1:  # SCHEMA_STR_OR_BYTES
        return (t is str or t is bytes) and not (node[1] and len(value) == 0)
    if kind == 2:  # SCHEMA_INT
        if t is not int:
            return False
        lo = node[1]
        hi = node[2]
        return not ((lo is not None and value < lo) or (hi is not None and value > hi))
    if kind == 3:  # SCHEMA_NUM
        return t is int or t is float
    if kind == 4:  # SCHEMA_BOOL
        return t is bool
    if kind == 5:  # SCHEMA_ANY
        return True
    if kind == 6:  # SCHEMA_SCALAR
        return t is str or t is int or t is float or t is bool or t is bytes or value is None
    if kind == 7:  # SCHEMA_LIST
        if t is not list:
            return False
        n = len(<list>value)
        if n > <Py_ssize_t>node[2] or (node[3] and n == 0):
            return False
        item = <tuple>node[1]
        for v in <list>value:
            if not _schema_valid(item, v):
                return False
        return True
    if kind == 8:  # SCHEMA_STRMAP
        if t is not dict:
            return False
        for v in (<dict>value).values():
            if type(v) is not str:
                return False
        return True
    if kind == 9:  # SCHEMA_OPT
        return value is None or _schema_valid(<tuple>node[1], value)
    if kind == 10:  # SCHEMA_MAP
        if t is not dict:
            return False
        d = <dict>value
        n = 0
        for name, sub in <tuple>node[1]:
            v = d.get(name, _MISSING)
            if v is _MISSING or not _schema_valid(<tuple>sub, v):
                return False
            n += 1
        if len(d) == n:
            return True
        optional = <dict>node[2]
        for name, v in d.items():
            sub = optional.get(name)
            if sub is None:
                if name in <dict>node[4] or (node[3] and name in _ENVELOPE):  # the envelope: top level only
                    continue
                return False
            if not _schema_valid(<tuple>sub, v):
                return False
        return True
    raise ValueError(f"unknown schema node kind {kind}")


# -- stored rows (broker/store.py) -------------------------------------------------------------------------
# The broker stores each task row three times (submitted, dispatched, ended) and each result row three times,
# as a msgpack array of its fields in a fixed order. Packing through msgpack's generic Packer took 1.3 us a
# task row (a list of the values first, then a type dispatch per value); ``pack_fields`` writes the array
# straight from the row. Values of any other type than the ones below go through ``fallback`` (a msgpack
# pack function), so every row packs: only faster.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Size
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef struct Writer:
    char* p        # the bytes written so far: ``stack`` until they outgrow it, then a PyMem block
    size_t n
    size_t cap
    char* heap
    int depth      # arrays being written; deeper ones go to the fallback (msgpack refuses a cycle)


cdef inline void _writer_on(Writer* w, char* buf, size_t cap) noexcept:
    """Start ``w`` empty on ``buf`` (a stack array): it moves to a PyMem block only if it outgrows it."""
    w.p = buf
    w.n = 0
    w.cap = cap
    w.heap = NULL
    w.depth = 0

#: nesting this deep is not a row's: the codec leaves it to msgpack (which limits its own recursion)
cdef enum:
    _MAX_DEPTH = 32


cdef inline int _room(Writer* w, size_t extra) except -1:
    """Make room for ``extra`` more bytes."""
    if w.n + extra <= w.cap:
        return 0
    return _grow(w, extra)


cdef int _grow(Writer* w, size_t extra) except -1:
    cdef size_t cap
    cdef char* grown
    cap = 2 * w.cap
    while cap < w.n + extra:
        cap *= 2
    grown = <char*>PyMem_Malloc(cap)
    if grown == NULL:
        raise MemoryError()
    memcpy(grown, w.p, w.n)
    PyMem_Free(w.heap)
    w.heap = grown
    w.p = grown
    w.cap = cap
    return 0


cdef inline void _put_be(Writer* w, unsigned char code, uint64_t v, int nbytes) noexcept:
    """``code`` then ``v`` big-endian on ``nbytes`` bytes (room already made)."""
    cdef int i
    w.p[w.n] = <char>code
    for i in range(nbytes):
        w.p[w.n + 1 + i] = <char>((v >> (8 * (nbytes - 1 - i))) & 0xFF)
    w.n += 1 + nbytes


cdef inline int _put_head(Writer* w, size_t n, unsigned char fix, size_t fix_max, unsigned char c8,
                          unsigned char c16, unsigned char c32) except -1:
    """A str, bin or array header: fix form when ``fix`` and n < fix_max, else the 8 (if c8), 16 or 32-bit form."""
    _room(w, 5)
    if fix and n < fix_max:
        w.p[w.n] = <char>(fix | n)
        w.n += 1
    elif c8 and n <= 0xFF:
        _put_be(w, c8, n, 1)
    elif n <= 0xFFFF:
        _put_be(w, c16, n, 2)
    else:
        _put_be(w, c32, n, 4)
    return 0


cdef inline int _put_raw(Writer* w, const char* s, size_t n) except -1:
    _room(w, n)
    memcpy(w.p + w.n, s, n)
    w.n += n
    return 0


cdef int _put_value(Writer* w, object v, object fallback) except -1:
    cdef type t = type(v)
    cdef Py_ssize_t n, i
    cdef const char* s
    cdef int overflow = 0
    cdef long long x
    cdef double d
    cdef uint64_t bits
    cdef bytes packed
    if t is str:
        s = PyUnicode_AsUTF8AndSize(v, &n)
        _put_head(w, <size_t>n, 0xA0, 32, 0xD9, 0xDA, 0xDB)
        _put_raw(w, s, <size_t>n)
        return 0
    _room(w, 9)
    if v is None:
        w.p[w.n] = <char>0xC0
        w.n += 1
    elif t is bool:
        w.p[w.n] = <char>(0xC3 if v is True else 0xC2)
        w.n += 1
    elif t is int:
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            packed = fallback(v)
            _put_raw(w, PyBytes_AS_STRING(packed), <size_t>PyBytes_GET_SIZE(packed))
        elif 0 <= x < 0x80 or -32 <= x < 0:
            w.p[w.n] = <char>(x & 0xFF)
            w.n += 1
        elif x > 0:
            if x <= 0xFF:
                _put_be(w, 0xCC, <uint64_t>x, 1)
            elif x <= 0xFFFF:
                _put_be(w, 0xCD, <uint64_t>x, 2)
            elif x <= 0xFFFFFFFF:
                _put_be(w, 0xCE, <uint64_t>x, 4)
            else:
                _put_be(w, 0xCF, <uint64_t>x, 8)
        elif x >= -0x80:
            _put_be(w, 0xD0, <uint64_t>x, 1)
        elif x >= -0x8000:
            _put_be(w, 0xD1, <uint64_t>x, 2)
        elif x >= -0x80000000:
            _put_be(w, 0xD2, <uint64_t>x, 4)
        else:
            _put_be(w, 0xD3, <uint64_t>x, 8)
    elif t is float:
        d = PyFloat_AS_DOUBLE(v)
        memcpy(&bits, &d, 8)
        _put_be(w, 0xCB, bits, 8)
    elif t is bytes:
        n = PyBytes_GET_SIZE(v)
        _put_head(w, <size_t>n, 0, 0, 0xC4, 0xC5, 0xC6)
        _put_raw(w, PyBytes_AS_STRING(v), <size_t>n)
    elif (t is list or t is tuple) and w.depth < _MAX_DEPTH:  # both are "fast" sequences: one item accessor
        n = PySequence_Fast_GET_SIZE(v)
        _put_head(w, <size_t>n, 0x90, 16, 0, 0xDC, 0xDD)
        w.depth += 1
        for i in range(n):
            _put_value(w, <object>PySequence_Fast_GET_ITEM(v, i), fallback)
        w.depth -= 1
    else:  # maps, int and float subclasses (IntEnum), bytearray, ...: as msgpack packs them
        packed = fallback(v)
        _put_raw(w, PyBytes_AS_STRING(packed), <size_t>PyBytes_GET_SIZE(packed))
    return 0


def pack_fields(dict row, tuple fields, Py_ssize_t packed_at, packed, fallback):
    """Return ``row``'s values in the order of ``fields`` as a msgpack array, or None if ``row`` has other keys.

    The value at index ``packed_at`` (if >= 0) is replaced by ``packed``, stored as msgpack bin (bytes already
    packed by the caller). Values this function does not pack itself are packed by ``fallback(value) -> bytes``.
    """
    return _pack_fields(row, fields, packed_at, packed, fallback)


cdef object _pack_fields(dict row, tuple fields, Py_ssize_t packed_at, object packed, object fallback):
    cdef Py_ssize_t n = len(fields), i
    cdef PyObject* v
    cdef char stack[1024]
    cdef Writer w
    if PyDict_Size(row) != n:
        return None
    if packed_at >= 0 and type(packed) is not bytes:
        raise TypeError("packed must be bytes")
    _writer_on(&w, stack, sizeof(stack))
    try:
        _put_head(&w, <size_t>n, 0x90, 16, 0, 0xDC, 0xDD)
        for i in range(n):
            v = PyDict_GetItem(row, <object>PyTuple_GET_ITEM(fields, i))
            if v == NULL:
                return None
            if i == packed_at:
                _put_value(&w, packed, fallback)
            else:
                _put_value(&w, <object>v, fallback)
        return PyBytes_FromStringAndSize(w.p, <Py_ssize_t>w.n)
    finally:
        PyMem_Free(w.heap)


# The rows of tasks and results are read and written several times per task (a task row at submit, dispatch and
# completion; its output's at creation, when given an owner and when completed), each time through the decoded-row
# caches of the Store and the live-task table. ``RowTables`` holds one transaction's part of that, compiled: the
# methods of store.Txn that were Python (get_task, put_task, get_result, put_result), with the same reads, writes
# and caching. ``RowRules`` holds what store.py defines (fields, codec callables, cache sizes), once per Store.

cdef class RowRules:
    """What ``RowTables`` follows, from store.py: the stored fields, the codec's callables, the caches' sizes."""

    cdef tuple task_fields, result_fields
    cdef Py_ssize_t options_at, task_cache_max, result_cache_max
    cdef object packed_options, fallback, decode, live_value, tasks_key, results_key
    cdef frozenset task_ended
    cdef object submitted, result_created
    #: the last options dict packed, and its bytes: the rows of one submission share one dict (and no code changes a
    #: row's options in place: store.py), so most rows find theirs here without a Python call; the same for the
    #: live-task value of a queued task, which its options decide
    cdef object last_options, last_packed, last_live_options, last_live
    #: store.py's decoded options by their packed bytes, and the fields of a stored array by its length
    cdef dict options_by_bytes, fields_by_length

    def __init__(self, tuple task_fields, tuple result_fields, Py_ssize_t options_at, packed_options, fallback,
                 decode, live_value, tasks_key, results_key, frozenset task_ended, submitted, result_created,
                 Py_ssize_t task_cache_max, Py_ssize_t result_cache_max):
        self.task_fields = task_fields
        self.result_fields = result_fields
        self.options_at = options_at
        self.packed_options = packed_options
        self.fallback = fallback
        self.decode = decode
        self.live_value = live_value
        self.tasks_key = tasks_key
        self.results_key = results_key
        self.task_ended = task_ended
        self.submitted = submitted
        self.result_created = result_created
        self.task_cache_max = task_cache_max
        self.result_cache_max = result_cache_max

    def use_decoding(self, dict options_by_bytes, dict fields_by_length):
        """Decode rows in C (``decode`` only for what it cannot: maps, ext types, options seen for the first time)
        with store.py's options cache and stored fields."""
        self.options_by_bytes = options_by_bytes
        self.fields_by_length = fields_by_length

    cdef object _decode(self, object buf):
        cdef object row
        cdef PyObject* opts
        if self.fields_by_length is None:
            return self.decode(buf)
        row = _unpack_fields(buf, self.fields_by_length, True)
        if row is None or PyDict_Size(row) != len(self.task_fields):
            return self.decode(buf) if row is None else row
        opts = PyDict_GetItem(self.options_by_bytes, row["options"])
        if opts == NULL:
            return self.decode(buf)
        row["options"] = <object>opts
        return row

    cdef object _live(self, dict row):
        cdef object opts = row["options"]
        if opts is not self.last_live_options:
            self.last_live = self.live_value(row)
            self.last_live_options = opts
        return self.last_live

    def options_packed(self, opts):
        """A task's options packed (``packed_options``), the last dict's bytes kept here."""
        return self._options_packed(opts)

    cdef object _options_packed(self, object opts):
        if opts is not self.last_options:
            self.last_packed = self.packed_options(opts)
            self.last_options = opts
        return self.last_packed

    def encode_task(self, dict row):
        """A task row's stored bytes: an array of TASK_FIELDS (options packed inside), or a map if it has others."""
        return _encode_task(self, row)

    def encode_result(self, dict row):
        """A result row's stored bytes: an array of RESULT_FIELDS, or a map if it has other fields."""
        return _encode_result(self, row)


cdef object _encode_task(RowRules rules, dict row):
    cdef PyObject* opts = PyDict_GetItem(row, "options")
    cdef object packed = None
    if opts != NULL and type(<object>opts) is dict:
        packed = _pack_fields(row, rules.task_fields, rules.options_at, rules._options_packed(<object>opts),
                              rules.fallback)
    return rules.fallback(row) if packed is None else packed


cdef object _encode_result(RowRules rules, dict row):
    cdef object packed = _pack_fields(row, rules.result_fields, -1, None, rules.fallback)
    return rules.fallback(row) if packed is None else packed


#: what follows a result id in the key of its data's first chunk (objects.chunk_key)
cdef bytes _FIRST_CHUNK = b"\x00" + (0).to_bytes(4, "big")
#: a one-chunk object row, {"size": ..., "chunks": 1, "chunk_size": ...} packed: before the size, and between it and the
#: chunk size
cdef bytes _OBJECT_ROW_HEAD = b"\x83" + _fixstr("size")
cdef bytes _OBJECT_ROW_MIDDLE = _fixstr("chunks") + b"\x01" + _fixstr("chunk_size")


cdef class Puts:
    """The ``put(key, value)`` of a cursor on each table the hot path writes (``tasks``, ``live_tasks``,
    ``session_index``, ``results``, ``data``), in one transaction, each opened at its table's first write
    (store.Txn.puts).

    A cursor's put takes two positional arguments; ``txn.put(key, value, db=...)`` parses keywords and looks the
    table up on every call: a third of the cost of a put, and a task takes about ten. Compiled: a lone task opens
    ten of them (five tables, two requests), and a Python ``__getattr__`` per first use cost more than the cursor.
    """

    cdef object _txn, _store
    cdef object _tasks, _live_tasks, _session_index, _results, _data

    def __init__(self, txn, store):
        self._txn = txn
        self._store = store

    cdef object _open(self, object db):
        if type(self._txn) is LoggedTxn:
            return (<LoggedTxn>self._txn).putter(db)
        return self._txn.cursor(db).put

    @property
    def tasks(self):
        if self._tasks is None:
            self._tasks = self._open(self._store.tasks)
        return self._tasks

    @property
    def live_tasks(self):
        if self._live_tasks is None:
            self._live_tasks = self._open(self._store.live_tasks)
        return self._live_tasks

    @property
    def session_index(self):
        if self._session_index is None:
            self._session_index = self._open(self._store.session_index)
        return self._session_index

    @property
    def results(self):
        if self._results is None:
            self._results = self._open(self._store.results)
        return self._results

    @property
    def data(self):
        if self._data is None:
            self._data = self._open(self._store.data)
        return self._data


cdef class RowTables:
    """One transaction's task and result rows (store.Txn delegates to it); ``touched``: as ``Txn.touched``."""

    cdef RowRules rules
    cdef object txn, puts, tasks_db, results_db, live_db, data_db
    cdef dict task_rows, result_rows
    cdef object touched
    cdef Py_ssize_t chunk_size

    def __init__(self, RowRules rules, txn, puts, tasks_db, results_db, live_db, dict task_rows, dict result_rows,
                 touched, data_db=None, Py_ssize_t chunk_size=-1):
        self.rules = rules
        self.data_db = data_db
        self.chunk_size = chunk_size
        self.txn = txn
        self.puts = puts
        self.tasks_db = tasks_db
        self.results_db = results_db
        self.live_db = live_db
        self.task_rows = task_rows
        self.result_rows = result_rows
        self.touched = touched

    def put_small_object(self, str result_id, data):
        """``store.Txn.put_object`` for data that fits one chunk (bytes, a buffer, or a list of one) when the result
        has none yet (most results): store it, return its size. Else do nothing and return -1 (``put_object`` will)."""
        return self._put_small_object(result_id, data)

    cdef Py_ssize_t _put_small_object(self, str result_id, object data) except -2:
        cdef object frame = data
        cdef Py_ssize_t size
        cdef bytes key
        cdef Writer w
        cdef char stack[64]
        if type(data) is list:
            if len(<list>data) != 1:
                return -1
            frame = (<list>data)[0]
        if type(frame) is bytes:
            size = PyBytes_GET_SIZE(frame)
        elif type(frame) is memoryview:
            size = (<memoryview>frame).nbytes
        else:
            return -1
        if size > self.chunk_size or self.data_db is None:
            return -1
        key = result_id.encode()
        if self.txn.get(key, db=self.data_db) is not None:
            return -1  # data to replace: put_object deletes it first
        self.puts.data(key + _FIRST_CHUNK, frame)
        # its object row: {"size": size, "chunks": 1, "chunk_size": chunk_size}, as msgpack packs it
        _writer_on(&w, stack, sizeof(stack))
        try:
            _put_raw(&w, _OBJECT_ROW_HEAD, len(_OBJECT_ROW_HEAD))
            _put_value(&w, size, None)
            _put_raw(&w, _OBJECT_ROW_MIDDLE, len(_OBJECT_ROW_MIDDLE))
            _put_value(&w, self.chunk_size, None)
            self.puts.data(key, PyBytes_FromStringAndSize(w.p, <Py_ssize_t>w.n))
        finally:
            PyMem_Free(w.heap)
        return size

    cdef object _read(self, object db, str key):
        cdef object buf = self.txn.get(key.encode(), db=db)
        return None if buf is None else self.rules._decode(buf)

    def get_task(self, str task_id):
        return self._get_task(task_id)

    cdef object _get_task(self, str task_id):
        cdef PyObject* cached = PyDict_GetItem(self.task_rows, task_id)
        cdef object row
        if cached == NULL:
            row = self._read(self.tasks_db, task_id)
            if (row is None or row["status"] in self.rules.task_ended
                    or PyDict_Size(self.task_rows) >= self.rules.task_cache_max):
                return row
            self.task_rows[task_id] = row
        else:
            row = <object>cached
        if self.touched is not None:
            self.touched.add(task_id)
        return row

    def put_task(self, dict row, bint new=False, was=None):
        """Store a task row (``was``: its status before, when known) and keep the live-task table in step.

        The table changes in the same transaction as the status: a task leaves it when it ends, and its
        value changes only when the task enters or leaves SUBMITTED.
        """
        self._put_task(row, new, was)

    cdef int _put_task(self, dict row, bint new, object was) except -1:
        cdef RowRules rules = self.rules
        cdef object task_id = row["task_id"]
        cdef bytes key = (<str>task_id).encode()
        cdef object puts = self.puts
        cdef object status, submitted = rules.submitted
        cdef bint ended, is_submitted, was_submitted
        puts.tasks(key, _encode_task(rules, row))
        status = row["status"]
        ended = status in rules.task_ended
        is_submitted = status == submitted
        was_submitted = was is not None and was == submitted
        if ended:
            self.txn.delete(key, db=self.live_db)
        elif new or was is None or was_submitted != is_submitted:
            puts.live_tasks(key, rules._live(row) if is_submitted else b"")
        if new:
            puts.session_index(rules.tasks_key(row["session_id"]), key)
        if ended:
            self.task_rows.pop(task_id, None)
        elif PyDict_Size(self.task_rows) < rules.task_cache_max or task_id in self.task_rows:
            self.task_rows[task_id] = row
            if self.touched is not None:
                self.touched.add(task_id)
        return 0

    def get_result(self, str result_id):
        return self._get_result(result_id)

    cdef object _get_result(self, str result_id):
        cdef PyObject* cached = PyDict_GetItem(self.result_rows, result_id)
        cdef object row
        if cached == NULL:
            row = self._read(self.results_db, result_id)
            if (row is None or row["status"] != self.rules.result_created
                    or PyDict_Size(self.result_rows) >= self.rules.result_cache_max):
                return row
            self.result_rows[result_id] = row
        else:
            row = <object>cached
        if self.touched is not None:
            self.touched.add(result_id)
        return row

    def put_result(self, dict row, bint new=False):
        self._put_result(row, new)

    cdef int _put_result(self, dict row, bint new) except -1:
        cdef RowRules rules = self.rules
        cdef object result_id = row["result_id"]
        cdef bytes key = (<str>result_id).encode()
        cdef object puts = self.puts
        puts.results(key, _encode_result(rules, row))
        if new:
            puts.session_index(rules.results_key(row["session_id"]), key)
        if row["status"] != rules.result_created:
            self.result_rows.pop(result_id, None)
        elif PyDict_Size(self.result_rows) < rules.result_cache_max or result_id in self.result_rows:
            self.result_rows[result_id] = row
            if self.touched is not None:
                self.touched.add(result_id)
        return 0


# Every task goes through set_task_status three or four times, and its output through mark_result_completed once:
# ``Transitions`` holds them compiled, bound by BrokerState as its own methods (state.py documents each). The rules
# stay where they are defined: status.TASK_TRANSITIONS (an illegal move is raised by status.check_task_transition),
# state._STAMP, and the events of events.EventBus.

from armonik_zmq.status import EventTypes as _EventTypes, ResultStatus as _ResultStatus, TaskStatus as _TaskStatus

from armonik_zmq.status import SessionStatus as _SessionStatus

cdef object _SESSION_RUNNING = int(_SessionStatus.RUNNING)
cdef object _E_NEW_TASK = _EventTypes.NEW_TASK
cdef object _E_NEW_RESULT = _EventTypes.NEW_RESULT
cdef object _E_TASK_STATUS = _EventTypes.TASK_STATUS_UPDATE
cdef object _E_RESULT_STATUS = _EventTypes.RESULT_STATUS_UPDATE
cdef object _E_RESULT_OWNER = _EventTypes.RESULT_OWNER_UPDATE

cdef object _TASK_DISPATCHED = int(_TaskStatus.DISPATCHED)
cdef object _TASK_PROCESSING = int(_TaskStatus.PROCESSING)
cdef object _TASK_COMPLETED = int(_TaskStatus.COMPLETED)
cdef object _TASK_PENDING = int(_TaskStatus.PENDING)
cdef object _RESULT_CREATED = int(_ResultStatus.CREATED)
#: the run's timestamps a completion reports, recorded on its task row
cdef tuple _RUN_STAMPS = ("fetched_at", "started_at", "processed_at")


cdef class Transitions:
    """BrokerState's task and result transitions: set_task_status, task_ended, set_completed,
    mark_result_completed, complete_result, add_to_core, insert_task and give_result (state.py describes them)."""

    cdef Core core
    cdef dict task_slot, slot_task, result_slot, partition_slot, transitions, stamps
    cdef object check_transition, task_status_event, result_status_event, new_task_event, result_owner_event
    cdef object submitted, result_completed, protocol_error, malformed
    cdef dict new_task, new_result
    cdef object new_result_event
    #: events.EventBus.wanted: session id -> the event types some subscription of it wants (an event no one wants is
    #: not even handed to the bus)
    cdef dict wanted

    def __init__(self, Core core, dict task_slot, dict slot_task, dict result_slot, dict partition_slot,
                 dict transitions, dict stamps, check_transition, events, submitted, result_completed,
                 dict new_task, dict new_result):
        from armonik_zmq.protocol import ErrorCode, ProtocolError
        self.protocol_error = ProtocolError
        self.malformed = ErrorCode.MALFORMED
        self.new_task = new_task
        self.new_result = new_result
        self.new_result_event = events.new_result
        self.wanted = events.wanted
        self.core = core
        self.partition_slot = partition_slot
        self.new_task_event = events.new_task
        self.result_owner_event = events.result_owner
        self.task_slot = task_slot
        self.slot_task = slot_task
        self.result_slot = result_slot
        self.transitions = transitions
        self.stamps = stamps
        self.check_transition = check_transition
        self.task_status_event = events.task_status
        self.result_status_event = events.result_status
        self.submitted = submitted
        self.result_completed = result_completed

    cdef inline bint _wants(self, dict row, object etype) except -1:
        cdef PyObject* types = PyDict_GetItem(self.wanted, row["session_id"])
        return types != NULL and etype in <object>types

    def set_task_status(self, txn, dict row, status, now, message=None, bint store=True):
        cdef object was = row["status"]
        cdef PyObject* allowed = PyDict_GetItem(self.transitions, was)
        cdef PyObject* stamp
        if allowed == NULL or status not in <object>allowed:
            self.check_transition(was, status)  # raises IllegalTransition
        row["status"] = int(status)
        stamp = PyDict_GetItem(self.stamps, status)
        if stamp != NULL:
            row[<object>stamp] = now
        if message is not None:
            row["status_message"] = message
        # A move into or out of SUBMITTED is always stored: the live-task table's entry changes with it.
        if store or (was == self.submitted) != (status == self.submitted):
            (<RowTables>txn.rows)._put_task(row, False, was)
        if self._wants(row, _E_TASK_STATUS):
            self.task_status_event(row)

    def task_ended(self, task_id):
        cdef object slot = self.task_slot.pop(task_id, None)
        if slot is not None:
            del self.slot_task[slot]
            self.core.free_task(slot)

    def set_completed(self, dict row, size, completed_by, now):
        row["status"] = self.result_completed
        row["size"] = size
        row["completed_at"] = now
        row["completed_by"] = completed_by

    def mark_result_completed(self, txn, dict row, size, completed_by, now, data=None):
        cdef object slot, t
        cdef RowTables rows = txn.rows
        self.set_completed(row, size, completed_by, now)
        rows._put_result(row, False)
        if self._wants(row, _E_RESULT_STATUS):
            self.result_status_event(row, data)
        slot = self.result_slot.pop(row["result_id"], None)
        if slot is None:
            return
        for t in self.core.on_result_ready(slot):
            self.set_task_status(txn, rows._get_task(self.slot_task[t]), self.submitted, now)
        self.core.free_result(slot)

    def complete_result(self, txn, dict row, data, completed_by, now):
        cdef object size = (<RowTables>txn.rows)._put_small_object(row["result_id"], data)
        if size < 0:
            size = txn.put_object(row["result_id"], data)
        self.mark_result_completed(txn, row, size, completed_by, now, data)

    def dispatch_batch(self, txn, list pairs, now, dict agent_by_slot, dict session_status, dict payload_answers,
                       dict per_agent, slow, fallback=None):
        """Hand the core's (agent slot, task slot) ``pairs`` to their agents, in order: a task of a RUNNING session
        with its payload as only input, whose inline answer (``payload_answers``: payload id -> (inline ids, their
        data)) inlines it, is written here: attempt, owner, DISPATCHED, its map in its agent's message (``per_agent``:
        agent slot -> (DispatchMessage, inline counts, frames)), begun here if need be when ``fallback`` (its
        DispatchMessage's) is given. Any other goes through ``slow(agent slot, agent, row)`` (Backend.dispatch's
        Python), which begins those answers and messages."""
        cdef RowTables rows = txn.rows
        cdef RowRules rules = rows.rules
        cdef tuple pair, answer, message
        cdef object a, agent, status
        cdef dict row
        cdef list inline
        cdef PyObject* p
        for pair in pairs:
            a = pair[0]
            agent = agent_by_slot[a]
            row = rows._get_task(self.slot_task[pair[1]])
            p = PyDict_GetItem(session_status, row["session_id"])
            if p == NULL or <object>p != _SESSION_RUNNING or row["data_dependencies"]:
                slow(a, agent, row)
                continue
            p = PyDict_GetItem(payload_answers, row["payload_id"])
            if p == NULL:
                slow(a, agent, row)
                continue
            answer = <tuple>p
            inline = answer[0]
            if not inline:  # the agent fetches its payload (after the commit)
                slow(a, agent, row)
                continue
            p = PyDict_GetItem(per_agent, a)
            if p != NULL:
                message = <tuple>p
            elif fallback is not None:  # this agent's first task in this dispatch
                message = (DispatchMessage(fallback), [], [])
                per_agent[a] = message
            else:
                slow(a, agent, row)
                continue
            row["attempt"] += 1
            row["owner_pod_id"] = agent.agent_id
            row["pod_hostname"] = agent.hostname
            row["received_at"] = now
            self.set_task_status(txn, row, _TASK_DISPATCHED, now)
            message[0].add(row, _SESSION_RUNNING, rules._options_packed(row["options"]), inline)
            (<list>message[1]).append(len(inline))
            (<list>message[2]).extend(<list>answer[1])

    def complete_batch(self, txn, str agent_id, list completions, list frames, now, list accepted, slow):
        """Apply a TASKS_DONE's completions in order, each with its data frames (counted from its ``results``): the
        common ones that pass every check here (``complete_simple``: their ids appended to ``accepted``), any
        other through ``slow(completion, frames)``. Return how many were applied here. Raise MALFORMED, before
        anything, when the frames are not as many as the completions announce (``protocol.split_frames``)."""
        cdef list counts = []
        cdef Py_ssize_t pos = 0, n, applied = 0, i
        cdef dict c
        cdef object specs, spec, group
        for c in completions:
            specs = c.get("results")
            n = 0
            if specs:
                for spec in specs:
                    n += <Py_ssize_t>spec["frames"]
            counts.append(n)
            pos += n
        if pos != len(frames):
            raise self.protocol_error(self.malformed, f"header announces {pos} data frames but {len(frames)} came")
        pos = 0
        for i in range(len(completions)):
            c = completions[i]
            n = counts[i]
            group = frames[pos:pos + n]
            pos += n
            if (c["ok"] and not c.get("created_results") and not c.get("subtasks")
                    and self.complete_simple(txn, agent_id, c, group, now)):
                accepted.append(c["task_id"])
                applied += 1
            else:
                slow(c, group)
        return applied

    def complete_simple(self, txn, str agent_id, dict c, list frames, now):
        """Apply the common completion when every check of ``Backend._complete_simple`` passes, and return True.

        The common one: a success that creates no result nor subtask and writes, from ``frames``, at most one
        result, not a shared-memory segment, which is all its task's expected outputs. Anything else (a refusal
        included) changes nothing and returns False: ``Backend._complete_simple`` then applies it, or says why it
        is refused. A completion that fails once it began to apply fails the whole request (RuntimeError).
        """
        cdef RowTables rows = txn.rows
        cdef object task_id = c["task_id"]
        cdef dict row = rows._get_task(task_id)
        cdef object status, owner, rid = None, spec, specs, stamps, name
        cdef dict rrow = None
        cdef PyObject* v
        if row is None:
            return False
        status = row["status"]
        if status != _TASK_DISPATCHED and status != _TASK_PROCESSING:
            return False
        if row["attempt"] != c["attempt"]:
            return False
        owner = row["owner_pod_id"]
        if owner != "" and owner != agent_id:
            return False
        specs = c.get("results")
        if specs:
            if len(specs) != 1:
                return False
            spec = specs[0]
            if "segment" in spec:
                return False
            rid = spec["result_id"]
            rrow = rows._get_result(rid)
            if (rrow is None or rrow["session_id"] != row["session_id"] or rrow["owner_task_id"] != task_id
                    or rrow["status"] != _RESULT_CREATED):
                return False
        for name in row["expected_output_ids"]:
            if name != rid:
                return False  # an expected output left unwritten: the Python path logs it
        try:
            stamps = c.get("timestamps")
            if stamps:
                if status == _TASK_DISPATCHED and "started_at" in stamps:
                    # TASKS_STARTED folded into the completion: through PROCESSING (its event), stored once below
                    self.set_task_status(txn, row, _TASK_PROCESSING, stamps["started_at"], None, False)
                for name in _RUN_STAMPS:
                    v = PyDict_GetItem(stamps, name)
                    if v != NULL:
                        row[name] = <object>v
            if rrow is not None:
                self.complete_result(txn, rrow, frames, task_id, now)
            row["error"] = None
            self.set_task_status(txn, row, _TASK_COMPLETED, now)
            self.task_ended(task_id)
        except self.protocol_error as exc:
            raise RuntimeError(f"task {task_id}: completion refused after it began to apply: {exc}") from exc
        return True

    def create_results(self, txn, str sid, list specs, now):
        """New results without data (CREATE_RESULTS_METADATA): a row per spec ({name, manual_deletion?}), stored and
        announced (NEW_RESULT); return the rows."""
        cdef RowTables rows = txn.rows
        cdef list out = []
        cdef dict spec, row
        cdef PyObject* manual
        for spec in specs:
            row = self.new_result.copy()
            row["result_id"] = _new_id()
            row["session_id"] = sid
            row["name"] = spec["name"]
            row["created_at"] = now
            manual = PyDict_GetItem(spec, "manual_deletion")
            if manual != NULL:
                row["manual_deletion"] = <object>manual
            rows._put_result(row, True)
            if self._wants(row, _E_NEW_RESULT):
                self.new_result_event(row)
            out.append(row)
        return out

    def inline_results(self, txn, str sid, list tasks, list groups, now, dict new_payloads, Py_ssize_t inline_limit):
        """SUBMIT_INLINE's results (Handlers.handle_submit_inline): per task spec ({name?, data_dependencies?,
        options?}) and its data frames (``groups``), its payload (named "<name>-payload", stored COMPLETED with its
        data, announced: NEW_RESULT then its RESULT_STATUS with the data) and its output (named "<name>", announced
        only: create_tasks stores it with its owner). A one-frame payload within ``inline_limit`` is left in
        ``new_payloads`` as its inline answer (state.new_payloads). Return (creations for create_tasks, payload id
        -> row, output id -> row): the rows, writes and events of new_result_row, insert_completed_result and
        announce_result, in that order."""
        cdef RowTables rows = txn.rows
        cdef list creations = []
        cdef dict payloads = {}, outputs = {}, payload, output
        cdef object spec, data, name, size, pid, oid
        cdef Py_ssize_t i
        for i in range(len(tasks)):
            spec = tasks[i]
            data = groups[i]
            name = spec.get("name") or "task"
            payload = self.new_result.copy()
            pid = payload["result_id"] = _new_id()
            payload["session_id"] = sid
            payload["name"] = f"{name}-payload"
            payload["created_at"] = now
            if self._wants(payload, _E_NEW_RESULT):
                self.new_result_event(payload)
            size = rows._put_small_object(pid, data)
            if size < 0:
                size = txn.put_object(pid, data)
            payload["status"] = self.result_completed  # set_completed's fields (the keys are the row's already)
            payload["size"] = size
            payload["completed_at"] = now
            payload["completed_by"] = ""
            rows._put_result(payload, True)
            if self._wants(payload, _E_RESULT_STATUS):
                self.result_status_event(payload, data)
            payloads[pid] = payload
            if len(data) == 1 and len(data[0]) <= inline_limit:  # what Backend._inline_inputs would read back
                new_payloads[pid] = ([pid], data)
            output = self.new_result.copy()
            oid = output["result_id"] = _new_id()
            output["session_id"] = sid
            output["name"] = name
            output["created_at"] = now
            if self._wants(output, _E_NEW_RESULT):
                self.new_result_event(output)
            outputs[oid] = output
            creations.append({"payload_id": pid, "expected_output_ids": [oid],
                              "data_dependencies": spec.get("data_dependencies", []), "options": spec.get("options")})
        return creations, payloads, outputs

    def create_tasks_simple(self, txn, str sid, list creations, dict opts, now, list task_ids, dict new_outputs,
                            dict new_inputs):
        """``BrokerState.create_tasks`` for a client's tasks in a RUNNING session, none with options of its own (they
        all take ``opts``), when every check passes: create them and return their infos. Else change nothing and
        return None: ``create_tasks`` then creates them, or says why not. ``new_outputs``, ``new_inputs``: as there.

        The same reads (each input once per call), rows, writes, events and core slots as ``create_tasks``.
        """
        cdef RowTables rows = txn.rows
        cdef dict inputs_seen = dict(new_inputs) if new_inputs else {}, c, rrow, row
        cdef list plans = [], missing, outputs, infos = []
        cdef object inputs
        cdef set claimed = set()
        cdef object rid, status, deps, payload_id, tid, previous, plan
        cdef Py_ssize_t i, k
        cdef PyObject* p
        for c in creations:
            p = PyDict_GetItem(c, "options")
            if p != NULL and <object>p:
                return None
            payload_id = c["payload_id"]
            deps = c.get("data_dependencies")
            missing = []
            inputs = dict.fromkeys((payload_id, *deps)) if deps else (payload_id,)  # each input once, in order
            for rid in inputs:
                # inputs are only looked at here: a payload shared by the whole batch is read once
                p = PyDict_GetItem(inputs_seen, rid)
                if p == NULL:
                    rrow = rows._get_result(rid)
                    if rrow is None or rrow["session_id"] != sid:
                        return None
                    inputs_seen[rid] = rrow
                else:
                    rrow = <dict>p
                status = rrow["status"]
                if status == _RESULT_CREATED:
                    missing.append(rid)
                elif status != self.result_completed:
                    return None
            outputs = []
            for rid in c["expected_output_ids"]:
                rrow = None
                if new_outputs:
                    p = PyDict_GetItem(new_outputs, rid)
                    if p != NULL:
                        rrow = <dict>p
                if rrow is None:
                    rrow = rows._get_result(rid)
                if rrow is None or rrow["session_id"] != sid or rrow["status"] != _RESULT_CREATED:
                    return None
                outputs.append(rrow)
            plans.append((c, missing, outputs))
        for i in range(len(plans)):
            c, missing, outputs = plans[i]
            tid = task_ids[i] if task_ids else _new_id()
            row = self.new_task.copy()
            row["task_id"] = tid
            row["initial_task_id"] = tid
            row["session_id"] = sid
            row["payload_id"] = c["payload_id"]
            deps = c.get("data_dependencies")
            row["data_dependencies"] = tuple(deps) if deps is not None else ()
            row["expected_output_ids"] = tuple(c["expected_output_ids"])
            if missing:
                row["status"] = _TASK_PENDING
            else:
                row["status"] = self.submitted
                row["submitted_at"] = now
            row["options"] = opts
            row["created_at"] = now
            self.insert_task(txn, row, missing)
            for rrow in outputs:
                # ArmoniK 3.8: a result without owner goes to its new producer
                rid = rrow["result_id"]
                if not rrow["owner_task_id"] and rid not in claimed:
                    claimed.add(rid)
                    self.give_result(txn, rrow, tid, bool(new_outputs) and rid in new_outputs)
            infos.append({"task_id": tid, "payload_id": row["payload_id"],
                          "data_dependencies": row["data_dependencies"],
                          "expected_output_ids": row["expected_output_ids"]})
        if new_outputs:
            for rid, rrow in new_outputs.items():
                if rid not in claimed:  # no task took it: stored as made
                    rows._put_result(rrow, True)
        return infos

    def add_to_core(self, task_id, opts, missing):
        cdef list slots = []
        cdef object rid, slot, tslot
        for rid in missing:
            slot = self.result_slot.get(rid)
            if slot is None:
                slot = self.result_slot[rid] = self.core.new_result()
            slots.append(slot)
        tslot = self.core.add_task(self.partition_slot.get(opts["partition_id"], 0), opts["priority"], slots)
        self.task_slot[task_id] = tslot
        self.slot_task[tslot] = task_id

    def insert_task(self, txn, dict row, missing):
        (<RowTables>txn.rows)._put_task(row, True, None)
        if self._wants(row, _E_NEW_TASK):
            self.new_task_event(row)
        self.add_to_core(row["task_id"], row["options"], missing)

    def give_result(self, txn, dict rrow, task_id, bint new=False):
        cdef object previous = rrow["owner_task_id"]
        rrow["owner_task_id"] = task_id
        (<RowTables>txn.rows)._put_result(rrow, new)
        if self._wants(rrow, _E_RESULT_OWNER):
            self.result_owner_event(rrow, previous)


# A DISPATCH message is one map holding a list of task maps, one per dispatched task: built as dicts and packed by
# msgpack, each task cost a 12-key dict (kept alive, and scanned by the GC, until the message was sent) and the
# packing of its options map again. ``DispatchMessage`` writes each task's map as it is added, with the keys
# written once here. A task's options are the index of its options map in the message's ``options`` list, where
# each distinct map is written once, already packed (the row's stored form keeps them packed): the tasks of one
# submission share one map, which the agent decodes once instead of once per task. The same bytes as
# ``protocol.request(Op.DISPATCH, rid, tasks=[...], options=[...], frames=[...])`` with those dicts.

cdef bytes _fixstr(str s):
    cdef bytes b = s.encode()
    assert len(b) < 32
    return bytes([0xA0 | len(b)]) + b


#: a task's map in a DISPATCH: these keys, in this order (``Backend.dispatch`` documents each)
DISPATCH_TASK_KEYS = ("task_id", "attempt", "session_id", "session_status", "status", "payload_id",
                      "data_dependencies", "expected_output_ids", "options", "retry_of_ids", "initial_task_id",
                      "inline")
cdef tuple _DISPATCH_KEY_NAMES = DISPATCH_TASK_KEYS
cdef list _DISPATCH_KEYS = [_fixstr(k) for k in DISPATCH_TASK_KEYS]
cdef bytes _KEY_TASKS = _fixstr("tasks")
cdef bytes _KEY_OPTIONS = _fixstr("options")
cdef bytes _KEY_FRAMES = _fixstr("frames")
cdef bytes _KEY_V = _fixstr("v")
cdef bytes _KEY_OP = _fixstr("op")
cdef bytes _KEY_RID = _fixstr("rid")
cdef Py_ssize_t _AT_SESSION_STATUS = DISPATCH_TASK_KEYS.index("session_status")
cdef Py_ssize_t _AT_OPTIONS = DISPATCH_TASK_KEYS.index("options")
cdef Py_ssize_t _AT_INLINE = DISPATCH_TASK_KEYS.index("inline")


from cpython.list cimport PyList_GET_ITEM


cdef inline int _put_bytes_raw(Writer* w, bytes b) except -1:
    return _put_raw(w, PyBytes_AS_STRING(b), <size_t>PyBytes_GET_SIZE(b))


cdef class DispatchMessage:
    """The header of one DISPATCH to one agent, written task by task (``add``), finished by ``header``.

    ``fallback(value) -> bytes`` packs what the writer does not (as in ``pack_fields``).
    """

    cdef Writer w
    cdef readonly Py_ssize_t n_tasks
    cdef object fallback
    #: the distinct options maps (packed) in the order first seen, and each one's index in that list
    cdef list options
    cdef dict option_index

    def __cinit__(self, fallback):
        self.options = []
        self.option_index = {}
        self.w.heap = <char*>PyMem_Malloc(4096)
        if self.w.heap == NULL:
            raise MemoryError()
        self.w.p = self.w.heap
        self.w.n = 0
        self.w.cap = 4096
        self.w.depth = 0
        self.n_tasks = 0
        self.fallback = fallback

    def __dealloc__(self):
        PyMem_Free(self.w.heap)

    def add(self, dict row, object session_status, bytes options, list inline):
        """Add a task: ``row``'s fields, its session's status, its options already packed, its inline inputs' ids."""
        cdef Writer* w = &self.w
        cdef Py_ssize_t i, at
        cdef PyObject* v
        cdef size_t start = w.n
        cdef PyObject* known = PyDict_GetItem(self.option_index, options)
        cdef object index = <object>known if known != NULL else len(self.options)
        _room(w, 1)
        w.p[w.n] = <char>(0x80 | len(_DISPATCH_KEY_NAMES))
        w.n += 1
        try:
            for i in range(len(_DISPATCH_KEY_NAMES)):
                _put_bytes_raw(w, <bytes>PyList_GET_ITEM(_DISPATCH_KEYS, i))
                if i == _AT_SESSION_STATUS:
                    _put_value(w, session_status, self.fallback)
                elif i == _AT_OPTIONS:
                    _put_value(w, index, self.fallback)
                elif i == _AT_INLINE:
                    _put_value(w, inline, self.fallback)
                else:
                    v = PyDict_GetItem(row, <object>PyTuple_GET_ITEM(_DISPATCH_KEY_NAMES, i))
                    if v == NULL:
                        raise KeyError(_DISPATCH_KEY_NAMES[i])
                    _put_value(w, <object>v, self.fallback)
        except BaseException:
            w.n = start  # a task that failed to pack leaves nothing behind
            raise
        if known == NULL:
            self.option_index[options] = index
            self.options.append(options)
        self.n_tasks += 1

    def header(self, int op, rid, version, list frames):
        """The whole header: ``{"tasks": [...], "options": [...], "frames": frames, "v": version, "op": op, "rid": rid}``."""
        cdef Writer out
        cdef bytes packed
        cdef char stack[256]
        _writer_on(&out, stack, sizeof(stack))
        try:
            _room(&out, 1)
            out.p[out.n] = <char>0x86
            out.n += 1
            _put_bytes_raw(&out, _KEY_TASKS)
            _put_head(&out, <size_t>self.n_tasks, 0x90, 16, 0, 0xDC, 0xDD)
            _put_raw(&out, self.w.p, self.w.n)
            _put_bytes_raw(&out, _KEY_OPTIONS)
            _put_head(&out, <size_t>len(self.options), 0x90, 16, 0, 0xDC, 0xDD)
            for packed in self.options:
                _put_bytes_raw(&out, packed)
            _put_bytes_raw(&out, _KEY_FRAMES)
            _put_value(&out, frames, self.fallback)
            _put_bytes_raw(&out, _KEY_V)
            _put_value(&out, version, self.fallback)
            _put_bytes_raw(&out, _KEY_OP)
            _put_value(&out, op, self.fallback)
            _put_bytes_raw(&out, _KEY_RID)
            _put_value(&out, rid, self.fallback)
            return PyBytes_FromStringAndSize(out.p, <Py_ssize_t>out.n)
        finally:
            PyMem_Free(out.heap)


# Reading a row back: msgpack's unpackb built a list of the values, then ``dict(zip(fields, values))`` the row
# (2 us a task row). ``unpack_fields`` builds the row straight from the bytes. It reads every msgpack type but
# ext; for those (never written by the broker) and for anything malformed it returns None: the caller decodes
# with msgpack, which reads or refuses it.

from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int16_t, uint32_t

cdef struct Reader:
    const unsigned char* p
    Py_ssize_t n
    Py_ssize_t at
    int depth  # arrays and maps being read; deeper ones are left to msgpack
    bint tuples  # arrays become tuples, not lists

#: what ``_get_value`` returns for an ext type or malformed bytes (no decoded value is this object)
cdef object _UNREAD = object()


cdef inline bint _need(Reader* r, Py_ssize_t k) noexcept:
    return r.at + k <= r.n


cdef inline uint64_t _be(Reader* r, int k) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(k):
        v = (v << 8) | r.p[r.at + i]
    r.at += k
    return v


cdef object _get_sized(Reader* r, int kind, Py_ssize_t size):
    """A str (kind 0), bin (1), array (2) or map (3) of ``size`` items or bytes, at ``r.at``."""
    cdef Py_ssize_t i
    cdef list items
    cdef tuple row_items
    cdef dict d
    cdef object k, v
    if kind <= 1:
        if not _need(r, size):
            return _UNREAD
        if kind == 0:
            v = PyUnicode_DecodeUTF8(<const char*>(r.p + r.at), size, NULL)
        else:
            v = PyBytes_FromStringAndSize(<const char*>(r.p + r.at), size)
        r.at += size
        return v
    if size > r.n - r.at or r.depth >= _MAX_DEPTH:  # every item takes a byte at least
        return _UNREAD
    r.depth += 1
    if kind == 2 and r.tuples:
        row_items = PyTuple_New(size)
        for i in range(size):
            v = _get_value(r)
            if v is _UNREAD:
                return _UNREAD
            Py_INCREF(v)
            PyTuple_SET_ITEM(row_items, i, v)
        r.depth -= 1
        return row_items
    if kind == 2:
        items = [None] * size
        for i in range(size):
            v = _get_value(r)
            if v is _UNREAD:
                return _UNREAD
            items[i] = v
        r.depth -= 1
        return items
    d = {}
    for i in range(size):
        k = _get_value(r)
        if k is _UNREAD or type(k) is not str:  # msgpack's strict_map_key: str keys only (the broker writes no other)
            return _UNREAD
        v = _get_value(r)
        if v is _UNREAD:
            return _UNREAD
        d[k] = v
    r.depth -= 1
    return d


cdef object _get_value(Reader* r):
    cdef unsigned char c
    cdef uint64_t bits
    cdef double d
    cdef float f
    cdef uint32_t bits32
    if not _need(r, 1):
        return _UNREAD
    c = r.p[r.at]
    r.at += 1
    if c < 0x80:
        return <long>c
    if c >= 0xE0:
        return <long>(<signed char>c)
    if c & 0xE0 == 0xA0:
        return _get_sized(r, 0, c & 0x1F)
    if c & 0xF0 == 0x90:
        return _get_sized(r, 2, c & 0x0F)
    if c & 0xF0 == 0x80:
        return _get_sized(r, 3, c & 0x0F)
    if c == 0xC0:
        return None
    if c == 0xC2:
        return False
    if c == 0xC3:
        return True
    if c == 0xCB:
        if not _need(r, 8):
            return _UNREAD
        bits = _be(r, 8)
        memcpy(&d, &bits, 8)
        return d
    if c == 0xCA:
        if not _need(r, 4):
            return _UNREAD
        bits32 = <uint32_t>_be(r, 4)
        memcpy(&f, &bits32, 4)
        return <double>f
    if 0xCC <= c <= 0xCF:  # uint 8, 16, 32, 64
        if not _need(r, 1 << (c - 0xCC)):
            return _UNREAD
        return _be(r, 1 << (c - 0xCC))
    if 0xD0 <= c <= 0xD3:  # int 8, 16, 32, 64
        if not _need(r, 1 << (c - 0xD0)):
            return _UNREAD
        bits = _be(r, 1 << (c - 0xD0))
        if c == 0xD0:
            return <long long>(<int8_t>bits)
        if c == 0xD1:
            return <long long>(<int16_t>bits)
        if c == 0xD2:
            return <long long>(<int32_t>bits)
        return <long long>bits
    if 0xD9 <= c <= 0xDB:  # str 8, 16, 32
        if not _need(r, 1 << (c - 0xD9)):
            return _UNREAD
        return _get_sized(r, 0, <Py_ssize_t>_be(r, 1 << (c - 0xD9)))
    if 0xC4 <= c <= 0xC6:  # bin 8, 16, 32
        if not _need(r, 1 << (c - 0xC4)):
            return _UNREAD
        return _get_sized(r, 1, <Py_ssize_t>_be(r, 1 << (c - 0xC4)))
    if c == 0xDC or c == 0xDD:  # array 16, 32
        if not _need(r, 2 if c == 0xDC else 4):
            return _UNREAD
        return _get_sized(r, 2, <Py_ssize_t>_be(r, 2 if c == 0xDC else 4))
    if c == 0xDE or c == 0xDF:  # map 16, 32
        if not _need(r, 2 if c == 0xDE else 4):
            return _UNREAD
        return _get_sized(r, 3, <Py_ssize_t>_be(r, 2 if c == 0xDE else 4))
    return _UNREAD  # ext types, 0xC1


def unpack_fields(buf, dict fields_by_length, bint tuples=False):
    """Return the row stored in ``buf`` (bytes) as a msgpack array of field values, or None if it is not one.

    ``fields_by_length`` maps an array's length to its field names (tuples). None also for an array of another
    length, for ext types, for malformed or trailing bytes, and for a buffer that is not bytes: the caller
    decodes those with msgpack. ``tuples``: arrays inside the row become tuples (untracked by the garbage
    collector once it has seen them, and the empty one is shared), not lists.
    """
    return _unpack_fields(buf, fields_by_length, tuples)


cdef object _unpack_fields(object buf, dict fields_by_length, bint tuples):
    cdef Reader r
    cdef Py_ssize_t size, i
    cdef unsigned char c
    cdef tuple fields
    cdef dict row
    cdef object v
    if type(buf) is not bytes or PyBytes_GET_SIZE(buf) == 0:
        return None
    r.p = <const unsigned char*>PyBytes_AS_STRING(buf)
    r.n = PyBytes_GET_SIZE(buf)
    r.depth = 0
    r.tuples = tuples
    c = r.p[0]
    r.at = 1
    if c & 0xF0 == 0x90:
        size = c & 0x0F
    elif c == 0xDC and _need(&r, 2):
        size = <Py_ssize_t>_be(&r, 2)
    else:
        return None
    fields = fields_by_length.get(size)
    if fields is None:
        return None
    row = {}
    for i in range(size):
        v = _get_value(&r)
        if v is _UNREAD:
            return None
        row[<object>PyTuple_GET_ITEM(fields, i)] = v
    return row if r.at == r.n else None


# -- the write-ahead log's capture (broker/wal.py) ---------------------------------------------------------------
# With the write-ahead log on, a turn's write transaction is a LoggedTxn: every put or delete that changes LMDB is
# also encoded into the turn's WalOps, which the log writes as one record when the transaction commits. One op:
# kind (1 byte: WAL_PUT or WAL_DELETE), table (1 byte: its index in the store's table list), key length (2 bytes,
# little-endian), value length (4 bytes, little-endian), the key, the value (a delete's: the duplicate it removes
# from a dupsort table, or empty for the key's every value).

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer

cdef enum:
    _WAL_PUT = 80  # "P"
    _WAL_DELETE = 68  # "D"
    _WAL_OP_HEAD = 8

WAL_PUT = _WAL_PUT
WAL_DELETE = _WAL_DELETE
#: the bytes of an op before its key
WAL_OP_HEAD = _WAL_OP_HEAD


cdef enum:
    _WAL_OPS_KEPT = 32 << 20

#: capacity a WalOps keeps for good (a larger buffer, from large turns, is given back by ``trim`` once unused)
WAL_OPS_KEPT = _WAL_OPS_KEPT


from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc

cdef extern from "<unistd.h>" nogil:
    ssize_t pwrite(int fd, const void* buf, size_t count, long long offset)
    ssize_t pread(int fd, void* buf, size_t count, long long offset)

from libc.errno cimport EIO, errno
from libc.string cimport memmove, memset

cdef enum:
    #: the alignment of a direct write (O_DIRECT): its memory, file offset and length
    _WAL_BLOCK = 4096
    #: a record's head (checksum, seq, length: wal.py), before its ops
    _WAL_HEAD = 16


# -- the log's record checksum: CRC32C (Castagnoli) ----------------------------------------------------------------
# The SSE4.2 crc32 instruction where the CPU has it (~3x zlib's crc32 here: 2.7 GB/s for zlib), else a table (slicing
# by 8). Records keep their own flag saying which checksum they carry (wal.py), so older logs still replay.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static uint32_t az_crc32c_table[8][256];
    static int az_crc32c_hw = 0;
    #define AZ_CRC_LONG 8192
    #define AZ_CRC_SHORT 256
    static uint32_t az_crc32c_long[4][256];
    static uint32_t az_crc32c_short[4][256];
    static void az_crc32c_zeros(uint32_t zeros[4][256], size_t len);
    static void az_crc32c_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
            az_crc32c_table[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = az_crc32c_table[0][i];
            for (int t = 1; t < 8; t++) {
                c = az_crc32c_table[0][c & 0xFF] ^ (c >> 8);
                az_crc32c_table[t][i] = c;
            }
        }
    #if defined(__x86_64__) && defined(__GNUC__)
        __builtin_cpu_init();
        az_crc32c_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    #endif
        az_crc32c_zeros(az_crc32c_long, AZ_CRC_LONG);
        az_crc32c_zeros(az_crc32c_short, AZ_CRC_SHORT);
    }
    static uint32_t az_crc32c_table8(uint32_t c, const unsigned char* p, size_t n) {
        while (n && ((uintptr_t)p & 7)) { c = az_crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8); n--; }
        while (n >= 8) {
            uint32_t lo, hi;
            memcpy(&lo, p, 4);
            memcpy(&hi, p + 4, 4);
            lo ^= c;  /* little-endian: the x86 and arm64 the package builds on */
            c = az_crc32c_table[7][lo & 0xFF] ^ az_crc32c_table[6][(lo >> 8) & 0xFF]
                ^ az_crc32c_table[5][(lo >> 16) & 0xFF] ^ az_crc32c_table[4][lo >> 24]
                ^ az_crc32c_table[3][hi & 0xFF] ^ az_crc32c_table[2][(hi >> 8) & 0xFF]
                ^ az_crc32c_table[1][(hi >> 16) & 0xFF] ^ az_crc32c_table[0][hi >> 24];
            p += 8;
            n -= 8;
        }
        while (n) { c = az_crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8); n--; }
        return c;
    }
    /* Three streams at once (the crc32 instruction's latency is 3 cycles, its throughput 1): the CRC of A|B is the
       CRC of A shifted over len(B) zero bytes, xor B's CRC from 0. The shift is a 32x32 matrix over GF(2), tabled
       for the two stream lengths below (Mark Adler's crc32c.c). ~2.5x one stream on bulk records. */
    static uint32_t az_gf2_times(const uint32_t* mat, uint32_t vec) {
        uint32_t sum = 0;
        while (vec) { if (vec & 1) sum ^= *mat; vec >>= 1; mat++; }
        return sum;
    }
    static void az_gf2_square(uint32_t* square, const uint32_t* mat) {
        for (int n = 0; n < 32; n++) square[n] = az_gf2_times(mat, mat[n]);
    }
    static void az_crc32c_zeros(uint32_t zeros[4][256], size_t len) {  /* len: a power of two, in bytes */
        uint32_t even[32], odd[32], row = 1;
        odd[0] = 0x82F63B78u;  /* one zero bit */
        for (int n = 1; n < 32; n++) { odd[n] = row; row <<= 1; }
        az_gf2_square(even, odd);  /* two */
        az_gf2_square(odd, even);  /* four */
        for (;;) {  /* one zero byte in even, two in odd, ... until len is used up */
            az_gf2_square(even, odd);
            len >>= 1;
            if (len == 0) break;
            az_gf2_square(odd, even);
            len >>= 1;
            if (len == 0) { memcpy(even, odd, sizeof(even)); break; }
        }
        for (uint32_t n = 0; n < 256; n++) {
            zeros[0][n] = az_gf2_times(even, n);
            zeros[1][n] = az_gf2_times(even, n << 8);
            zeros[2][n] = az_gf2_times(even, n << 16);
            zeros[3][n] = az_gf2_times(even, n << 24);
        }
    }
    static inline uint32_t az_crc32c_shift(uint32_t zeros[4][256], uint32_t c) {
        return zeros[0][c & 0xFF] ^ zeros[1][(c >> 8) & 0xFF] ^ zeros[2][(c >> 16) & 0xFF] ^ zeros[3][c >> 24];
    }
    #if defined(__x86_64__) && defined(__GNUC__)
    __attribute__((target("sse4.2")))
    static uint64_t az_crc32c_3way(uint64_t c0, const unsigned char** pp, size_t* np, size_t len,
                                   uint32_t zeros[4][256]) {
        const unsigned char* p = *pp;
        size_t n = *np;
        while (n >= 3 * len) {
            uint64_t c1 = 0, c2 = 0, v0, v1, v2;
            const unsigned char* end = p + len;
            do {
                memcpy(&v0, p, 8);
                memcpy(&v1, p + len, 8);
                memcpy(&v2, p + 2 * len, 8);
                c0 = __builtin_ia32_crc32di(c0, v0);
                c1 = __builtin_ia32_crc32di(c1, v1);
                c2 = __builtin_ia32_crc32di(c2, v2);
                p += 8;
            } while (p < end);
            c0 = az_crc32c_shift(zeros, (uint32_t)c0) ^ c1;
            c0 = az_crc32c_shift(zeros, (uint32_t)c0) ^ c2;
            p += 2 * len;
            n -= 3 * len;
        }
        *pp = p;
        *np = n;
        return c0;
    }
    __attribute__((target("sse4.2")))
    static uint32_t az_crc32c_sse42(uint32_t c, const unsigned char* p, size_t n) {
        uint64_t c64;
        while (n && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi(c, *p++); n--; }
        c64 = c;
        c64 = az_crc32c_3way(c64, &p, &n, AZ_CRC_LONG, az_crc32c_long);
        c64 = az_crc32c_3way(c64, &p, &n, AZ_CRC_SHORT, az_crc32c_short);
        while (n >= 8) {
            uint64_t v;
            memcpy(&v, p, 8);
            c64 = __builtin_ia32_crc32di(c64, v);
            p += 8;
            n -= 8;
        }
        c = (uint32_t)c64;
        while (n) { c = __builtin_ia32_crc32qi(c, *p++); n--; }
        return c;
    }
    #endif
    /* The CRC of A|B from the CRCs of A and B and B's length (zlib's crc32_combine): A's CRC shifted over len2 zero
       bytes, by squarings of the one-zero-bit matrix. A streamed record's head comes before its ops, and is known
       only once they all are (wal.py). */
    static uint32_t az_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
        uint32_t even[32], odd[32], row = 1;
        if (len2 == 0) return crc1 ^ crc2;
        odd[0] = 0x82F63B78u;
        for (int n = 1; n < 32; n++) { odd[n] = row; row <<= 1; }
        az_gf2_square(even, odd);
        az_gf2_square(odd, even);
        do {
            az_gf2_square(even, odd);
            if (len2 & 1) crc1 = az_gf2_times(even, crc1);
            len2 >>= 1;
            if (len2 == 0) break;
            az_gf2_square(odd, even);
            if (len2 & 1) crc1 = az_gf2_times(odd, crc1);
            len2 >>= 1;
        } while (len2);
        return crc1 ^ crc2;
    }
    static uint32_t az_crc32c(uint32_t crc, const unsigned char* p, size_t n, int hardware) {
        uint32_t c = ~crc;
    #if defined(__x86_64__) && defined(__GNUC__)
        if (hardware && az_crc32c_hw) return ~az_crc32c_sse42(c, p, n);
    #endif
        return ~az_crc32c_table8(c, p, n);
    }
    """
    void az_crc32c_init()
    int az_crc32c_hw
    unsigned int az_crc32c(unsigned int crc, const unsigned char* p, size_t n, int hardware) nogil
    unsigned int az_crc32c_combine(unsigned int crc1, unsigned int crc2, uint64_t len2) nogil

az_crc32c_init()

#: whether ``crc32c`` uses the CPU's crc32 instruction
CRC32C_HARDWARE = bool(az_crc32c_hw)


def crc32c(data, unsigned int value=0, bint hardware=True):
    """The CRC32C (Castagnoli) of ``data`` (any buffer), continuing from ``value`` (as zlib.crc32 continues).
    ``hardware=False``: the table, whatever the CPU (for tests)."""
    cdef Py_buffer b
    cdef unsigned int out
    PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
    try:
        with nogil:
            out = az_crc32c(value, <const unsigned char*>b.buf, <size_t>b.len, hardware)
    finally:
        PyBuffer_Release(&b)
    return out


def crc32c_combine(unsigned int crc1, unsigned int crc2, uint64_t len2):
    """The CRC32C of A then B, from A's (``crc1``), B's (``crc2``) and B's length (as zlib.crc32_combine)."""
    return az_crc32c_combine(crc1, crc2, len2)


cdef class WalOps:
    """The encoded puts and deletes of one write transaction and of its nested ones: a nested one that aborts cuts
    its own off (``mark`` before it, ``cut`` to the mark).

    One WalOps serves every turn (``clear`` between them keeps its buffer: a fresh one costs a page fault per 4 KiB
    written), and the log reads the ops through the buffer protocol, without a copy. No op may be added while the
    buffer is exported (it could move).

    The buffer is aligned to 4 KiB and the ops start ``headroom`` bytes into it (``clear``): room for the record's
    head and for the bytes of the log's last partial block before it, so that ``write_direct`` writes the record
    from this buffer, in whole blocks, with no copy (the log's O_DIRECT segments: wal.py).

    A large transaction streams (``spill_to``): once its ops reach ``piece`` bytes, they go to a file of the record's
    own (from offset 0, its first block kept back for the head) in whole blocks as they come, and the buffer keeps only
    the last partial block. Bulk turns log 9-52 MB each: a buffer that held them all faulted in a page per 4 KiB on its
    first growth (+1.5-2.6 us a task in a fresh broker). The CRC32C of the ops is kept as they leave; the log writes
    the rest (``stream_end``), then the first block with the head (``stream_head``). A cut below what was written
    reads the piece it falls in back from the file (rare: a request that failed after its own ops spilled).
    """

    cdef char* raw
    cdef char* mem
    cdef char* buf
    cdef Py_ssize_t n, cap, base
    #: the most of the buffer a transaction used since the last ``trim``
    cdef Py_ssize_t high
    cdef int exports
    #: how many ops were added
    cdef readonly Py_ssize_t count
    #: streaming (``spill_to``): the callable that opens a record's own file, the size that starts it, this
    #: transaction's (0: no more spills), the file, whether the first block is out of the buffer (kept in ``first``)
    cdef object spiller
    cdef Py_ssize_t piece, spill_at
    cdef int out_fd
    cdef bint streamed
    #: the file offset of the buffer's start, the ops no longer in the buffer, and their CRC32C
    cdef long long out_off
    cdef Py_ssize_t gone
    cdef uint32_t crc
    cdef char* first_raw
    cdef char* first
    #: the errno of a spill or read-back that failed (the record cannot be written: ``stream_end`` raises)
    cdef int failed
    #: (ops out, their CRC32C) at each block boundary a spill ended on, oldest first: where a cut reads back from
    cdef list marks

    def __cinit__(self):
        self.out_fd = -1

    def __dealloc__(self):
        PyMem_RawFree(self.raw)
        PyMem_RawFree(self.first_raw)

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.streamed:
            raise BufferError("a streamed WalOps holds only its last ops")
        PyBuffer_FillInfo(view, self, self.buf, self.n, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    cdef int _room(self, Py_ssize_t need) except -1:
        """Make the buffer hold ``need`` bytes of ops after its headroom, and a block of padding after them."""
        cdef Py_ssize_t cap, shift
        cdef char* p
        if self.base + need + _WAL_BLOCK <= self.cap:
            return 0
        cap = max(self.base + need + _WAL_BLOCK, 2 * self.cap, 4 * _WAL_BLOCK)
        # realloc (a large block moves by mremap, its pages not copied nor faulted again), a block more to align in
        p = <char*>PyMem_RawRealloc(self.raw, cap + _WAL_BLOCK)
        if p == NULL:
            raise MemoryError()
        shift = (-<Py_ssize_t>p) & (_WAL_BLOCK - 1)
        if self.raw != NULL and shift != self.mem - self.raw:
            memmove(p + shift, p + (self.mem - self.raw), self.base + self.n)
        self.raw, self.mem, self.cap = p, p + shift, cap
        self.buf = self.mem + self.base
        return 0

    cdef int add(self, char kind, int table, object key, object value) except -1:
        cdef Py_buffer kb, vb
        cdef Py_ssize_t need
        cdef char* p
        if self.exports:
            raise BufferError("an op added to a WalOps whose buffer is exported")
        PyObject_GetBuffer(key, &kb, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(value, &vb, PyBUF_SIMPLE)
            try:
                if kb.len > 0xFFFF or vb.len > 0xFFFFFFFF:
                    raise ValueError(f"a key of {kb.len} bytes or a value of {vb.len} bytes cannot be logged")
                need = self.n + _WAL_OP_HEAD + kb.len + vb.len
                self._room(need)
                p = self.buf + self.n
                p[0] = kind
                p[1] = <char>table
                p[2] = <char>(kb.len & 0xFF)
                p[3] = <char>(kb.len >> 8)
                p[4] = <char>(vb.len & 0xFF)
                p[5] = <char>((vb.len >> 8) & 0xFF)
                p[6] = <char>((vb.len >> 16) & 0xFF)
                p[7] = <char>((vb.len >> 24) & 0xFF)
                memcpy(p + _WAL_OP_HEAD, kb.buf, kb.len)
                memcpy(p + _WAL_OP_HEAD + kb.len, vb.buf, vb.len)
                self.n = need
                self.count += 1
            finally:
                PyBuffer_Release(&vb)
        finally:
            PyBuffer_Release(&kb)
        if self.spill_at and self.base + self.n >= self.spill_at:
            self._spill()
        return 0

    cdef int _spill(self) except -1:
        """Write the buffer's whole blocks of ops to the record's own file and keep the last partial block; the first
        spill opens the file (``spiller``) and keeps the record's first block back (its head is written last)."""
        cdef Py_ssize_t start = 0, end, whole
        cdef ssize_t done
        cdef int fd
        if not self.streamed:
            if self.out_fd < 0:
                fd = self.spiller(self)
                if fd < 0:  # no file: this transaction's ops stay in the buffer
                    self.spill_at = 0
                    return 0
                self.out_fd = fd
            if self.base != _WAL_HEAD:  # the record starts its file: its head, then its ops
                self._rebase(_WAL_HEAD)
            if self.first == NULL:
                self.first_raw = <char*>PyMem_RawMalloc(2 * _WAL_BLOCK)
                if self.first_raw == NULL:
                    raise MemoryError()
                self.first = self.first_raw + ((-<Py_ssize_t>self.first_raw) & (_WAL_BLOCK - 1))
            memcpy(self.first, self.mem, _WAL_BLOCK)
            self.crc = az_crc32c(0, <const unsigned char*>self.buf, _WAL_BLOCK - _WAL_HEAD, 1)
            self.marks = [(_WAL_BLOCK - _WAL_HEAD, self.crc)]
            self.out_off = 0
            self.streamed = True
            start = _WAL_BLOCK
        end = self.base + self.n
        whole = end & ~(<Py_ssize_t>_WAL_BLOCK - 1)
        if whole > start:
            with nogil:
                done = pwrite(self.out_fd, self.mem + start, whole - start, self.out_off + start)
            if done != whole - start:
                self.failed = errno if done < 0 else EIO
                self.spill_at = 0
                return 0
            start = max(start, self.base)
            self.crc = az_crc32c(self.crc, <const unsigned char*>self.mem + start, whole - start, 1)
        self.gone += whole - self.base
        memmove(self.mem, self.mem + whole, end - whole)
        self.n = end - whole
        self.base = 0
        self.buf = self.mem
        self.out_off += whole
        self.marks.append((self.gone, self.crc))
        return 0

    cdef int _unwind(self, Py_ssize_t pos) except -1:
        """Make the ops end at ``pos``, below what left the buffer (a cut): back to the buffer alone if ``pos`` is in
        the first block, else the piece ``pos`` falls in read back from the file."""
        cdef Py_ssize_t k, g, length
        cdef ssize_t done
        if pos < _WAL_BLOCK - _WAL_HEAD:
            self.base = 0
            self._room(_WAL_BLOCK)
            memcpy(self.mem, self.first, _WAL_BLOCK)
            self.base, self.buf, self.n = _WAL_HEAD, self.mem + _WAL_HEAD, pos
            self.gone = self.crc = self.out_off = 0
            self.streamed = False
            self.marks = None
            return 0
        k = len(self.marks) - 1
        while self.marks[k][0] > pos:
            k -= 1
        g, self.crc = self.marks[k]
        del self.marks[k + 1:]
        length = ((_WAL_HEAD + pos + _WAL_BLOCK - 1) & ~(<Py_ssize_t>_WAL_BLOCK - 1)) - (_WAL_HEAD + g)
        self.base = self.n = 0
        self.buf = self.mem
        self._room(length)
        with nogil:
            done = pread(self.out_fd, self.mem, length, _WAL_HEAD + g)
        if done != length:
            self.failed = errno if done < 0 else EIO
            self.spill_at = 0
        self.gone, self.n, self.out_off = g, pos - g, _WAL_HEAD + g
        return 0

    cdef void _unstream(self):
        self.out_fd = -1
        self.streamed = False
        self.gone = self.crc = self.out_off = self.failed = 0
        self.marks = None
        self.spill_at = self.piece

    def __len__(self):
        return self.gone + self.n

    def clear(self, Py_ssize_t headroom=0):
        """Drop every op, for the next transaction (the buffer stays: ``trim`` gives a large one back); its ops will
        start ``headroom`` bytes (at most a block and 64) into the buffer. A streamed record's file is the log's to
        close."""
        if self.exports:
            raise BufferError("a WalOps cleared while its buffer is exported")
        if headroom < 0 or headroom > _WAL_BLOCK + 64:
            raise ValueError(f"a WalOps headroom of {headroom} bytes")
        if self.base + self.n > self.high:
            self.high = self.base + self.n
        self.n = self.count = 0
        self._unstream()
        self.base = headroom
        self.buf = self.mem + headroom
        self._room(0)

    def trim(self):
        """Drop every op (as ``clear``, between transactions), and give the buffer back if it is larger than
        ``WAL_OPS_KEPT`` and no transaction needed more than that since the last ``trim`` (the store calls it once
        a second); return whether it did. Bulk turns log 9-52 MB each: when the buffer was given back after each,
        the next one faulted its pages in again (+0.57 us a task in bench.broker_alone)."""
        cdef bint freed = False
        if self.exports:
            raise BufferError("a WalOps trimmed while its buffer is exported")
        if self.base + self.n > self.high:
            self.high = self.base + self.n
        self.n = self.count = 0
        self._unstream()
        if self.cap > _WAL_OPS_KEPT and self.high <= _WAL_OPS_KEPT:
            PyMem_RawFree(self.raw)
            self.raw = self.mem = self.buf = NULL
            self.cap = 0
            self._room(0)
            freed = True
        self.high = 0
        return freed

    @property
    def capacity(self):
        """The buffer's size in bytes."""
        return self.cap

    def spill_to(self, spiller, Py_ssize_t piece):
        """Stream each transaction whose ops reach ``piece`` bytes (0: never; else at least two blocks):
        ``spiller(self)`` returns the descriptor of the file its record goes to from offset 0 (O_DIRECT or not; the
        caller closes it), or -1 (its ops stay in the buffer)."""
        if piece and piece < 2 * _WAL_BLOCK:
            raise ValueError(f"a WalOps spill size of {piece} bytes (at least {2 * _WAL_BLOCK}, or 0)")
        self.spiller, self.piece = spiller, piece
        if not self.streamed:
            self.spill_at = piece

    @property
    def streaming(self):
        """Whether this transaction's ops are streaming to a file (``stream_end`` and ``stream_head`` finish it)."""
        return self.streamed

    @property
    def spilled(self):
        """How many bytes of this transaction's ops left the buffer (its record's first block, kept back, included)."""
        return self.gone

    def stream_end(self):
        """Write the rest of a streamed record's ops (its last blocks, zeros to the block's end); return (the CRC32C of
        all its ops, the file's size). OSError if that write, or an earlier spill, failed."""
        cdef Py_ssize_t end, length
        cdef ssize_t done = 0
        if not self.streamed:
            raise ValueError("no record is streaming")
        if self.failed:
            raise OSError(self.failed, f"the write-ahead log could not write a record's ops: {_os.strerror(self.failed)}")
        end = self.base + self.n
        length = (end + _WAL_BLOCK - 1) & ~(<Py_ssize_t>_WAL_BLOCK - 1)
        memset(self.mem + end, 0, length - end)
        if length:
            with nogil:
                done = pwrite(self.out_fd, self.mem, length, self.out_off)
            if done != length:
                if done < 0:
                    raise OSError(errno, _os.strerror(errno))
                raise OSError(f"the write-ahead log wrote {done} of a record's {length} last bytes")
        return az_crc32c(self.crc, <const unsigned char*>self.buf, self.n, 1), self.out_off + length

    def stream_head(self, head):
        """Write a streamed record's first block: ``head`` (the record's 16 bytes), then its first ops."""
        cdef Py_buffer hb
        cdef ssize_t done
        if not self.streamed:
            raise ValueError("no record is streaming")
        PyObject_GetBuffer(head, &hb, PyBUF_SIMPLE)
        try:
            if hb.len != _WAL_HEAD:
                raise ValueError(f"a record head of {hb.len} bytes")
            memcpy(self.first, hb.buf, _WAL_HEAD)
        finally:
            PyBuffer_Release(&hb)
        with nogil:
            done = pwrite(self.out_fd, self.first, _WAL_BLOCK, 0)
        if done < 0:
            raise OSError(errno, _os.strerror(errno))
        if done != _WAL_BLOCK:
            raise OSError(f"the write-ahead log wrote {done} of a record's first {_WAL_BLOCK} bytes")

    cdef int _rebase(self, Py_ssize_t headroom) except -1:
        if headroom > self.base:
            self._room(self.n + headroom - self.base)
        memmove(self.mem + headroom, self.buf, self.n)
        self.base = headroom
        self.buf = self.mem + headroom
        return 0

    def rebase(self, Py_ssize_t headroom):
        """Move the ops to start ``headroom`` bytes into the buffer (``clear``'s guess was wrong: the record opens a
        segment)."""
        if self.exports:
            raise BufferError("a WalOps moved while its buffer is exported")
        if self.streamed:
            raise ValueError("a streamed WalOps moved")
        if headroom < 0 or headroom > _WAL_BLOCK + 64:
            raise ValueError(f"a WalOps headroom of {headroom} bytes")
        self._rebase(headroom)

    @property
    def headroom(self):
        """Where the ops start in the buffer (``clear``)."""
        return self.base

    def mark(self):
        """Where the ops of a nested transaction starting now begin (for ``cut``)."""
        return self.gone + self.n, self.count

    def cut(self, mark):
        """Drop every op added since ``mark`` (its nested transaction aborted)."""
        cdef Py_ssize_t pos = mark[0]
        if pos >= self.gone:
            self.n = pos - self.gone
        elif self.failed:  # the record cannot be written anyway
            self.gone, self.n = pos, 0
        else:
            self._unwind(pos)
        self.count = mark[1]

    def encoded(self):
        """The ops, encoded (a copy)."""
        if self.streamed:
            raise ValueError("a streamed WalOps holds only its last ops")
        return PyBytes_FromStringAndSize(self.buf, self.n)

    def write_direct(self, int fd, long long offset, prefix):
        """Write ``prefix`` (exactly ``headroom`` bytes: the log's last partial block, then the record's head), the
        ops, and zeros up to a whole block, at ``offset`` of ``fd`` (a multiple of 4 KiB) in one ``pwrite`` from
        this buffer (no copy: the write may be O_DIRECT). Return the bytes of the last partial block written (what
        the next record's prefix starts with). OSError if the write fails or is short."""
        cdef Py_buffer pb
        cdef Py_ssize_t end, length
        cdef ssize_t done
        if self.exports:
            raise BufferError("a WalOps written while its buffer is exported")
        if self.streamed:
            raise ValueError("a streamed WalOps written in one piece")
        if offset % _WAL_BLOCK:
            raise ValueError(f"a direct write at offset {offset}, not a multiple of {_WAL_BLOCK}")
        self._room(self.n)
        PyObject_GetBuffer(prefix, &pb, PyBUF_SIMPLE)
        try:
            if pb.len != self.base:
                raise ValueError(f"a prefix of {pb.len} bytes for a headroom of {self.base}")
            memcpy(self.mem, pb.buf, pb.len)
        finally:
            PyBuffer_Release(&pb)
        end = self.base + self.n
        length = (end + _WAL_BLOCK - 1) & ~(<Py_ssize_t>_WAL_BLOCK - 1)
        memset(self.mem + end, 0, length - end)
        with nogil:
            done = pwrite(fd, self.mem, length, offset)
        if done < 0:
            raise OSError(errno, _os.strerror(errno))
        if done != length:
            raise OSError(f"the write-ahead log wrote {done} of a record's {length} bytes")
        return PyBytes_FromStringAndSize(self.mem + (end & ~(<Py_ssize_t>_WAL_BLOCK - 1)), end & (_WAL_BLOCK - 1))


cdef class _LoggedPut:
    """A cursor's ``put(key, value)`` whose changes are logged (Puts' hot-path puts)."""

    cdef object put
    cdef WalOps ops
    cdef int table

    def __call__(self, key, value):
        if self.put(key, value):
            self.ops.add(_WAL_PUT, self.table, key, value)
            return True
        return False


cdef class LoggedTxn:
    """An LMDB write transaction (``raw``) whose puts and deletes are also added to ``ops``.

    Reads go straight to ``raw``. Its cursors are for reading: a write through one would not be logged (writes go
    through ``put``, ``delete`` and ``putter``). ``tables`` maps each table handle to its index in the log's ops; a
    write to a table not in it raises (every table the broker writes is listed: store.TABLES).
    """

    cdef readonly object raw
    cdef readonly WalOps ops
    cdef dict tables

    def __init__(self, raw, WalOps ops, dict tables):
        self.raw = raw
        self.ops = ops
        self.tables = tables

    cdef int _index(self, object db) except -1:
        cdef object index = self.tables.get(db)
        if index is None:
            raise ValueError(f"a write to LMDB table {db!r}, which the write-ahead log does not know")
        return <int>index

    def get(self, key, default=None, db=None):
        return self.raw.get(key, default, db)

    def cursor(self, db=None):
        return self.raw.cursor(db)

    def stat(self, db):
        return self.raw.stat(db)

    def id(self):
        return self.raw.id()

    def put(self, key, value, dupdata=True, overwrite=True, append=False, db=None):
        cdef int table = self._index(db)
        if self.raw.put(key, value, dupdata, overwrite, append, db):
            self.ops.add(_WAL_PUT, table, key, value)
            return True
        return False

    def delete(self, key, value=b"", db=None):
        cdef int table = self._index(db)
        if self.raw.delete(key, value, db):
            self.ops.add(_WAL_DELETE, table, key, value)
            return True
        return False

    def putter(self, db):
        """A cursor's ``put(key, value)`` on table ``db``, logged."""
        cdef _LoggedPut put = _LoggedPut.__new__(_LoggedPut)
        put.table = self._index(db)
        put.put = self.raw.cursor(db).put
        put.ops = self.ops
        return put


# ------------------------------------------------------------------------------------------------------------------
# Link framing (worker/link.py): u32 n | n x u64 frame sizes | frames, little-endian. Every process cuts and
# frames each message of a lone task's path here: the Python loop cost ~7 us a message, on every hop.
# ------------------------------------------------------------------------------------------------------------------

from cpython.buffer cimport PyBUF_FULL_RO, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


cdef inline uint64_t _le64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>p[0] | <uint64_t>p[1] << 8 | <uint64_t>p[2] << 16 | <uint64_t>p[3] << 24
            | <uint64_t>p[4] << 32 | <uint64_t>p[5] << 40 | <uint64_t>p[6] << 48 | <uint64_t>p[7] << 56)


def link_cut(buf, Py_ssize_t pos, Py_ssize_t end, uint64_t max_frames, uint64_t max_header, int64_t max_frame,
             list out):
    """Append each complete message of ``buf[pos:end]`` to ``out`` (a list of ``bytes`` frames); return where
    the first incomplete one starts (``end`` if none is), and that message's frame sizes (a tuple) once its whole
    size table is there (else None): the caller reads its frames on from there. ``max_frame`` < 0: data frames
    are not limited (nor the header). A message out of the limits raises ValueError saying which (the stream
    cannot be read on)."""
    cdef const unsigned char[::1] view = buf
    if end > view.shape[0] or pos < 0 or pos > end:
        raise ValueError("link_cut: range out of the buffer")
    if end == pos:
        return pos, None
    cdef const unsigned char* p = &view[0]
    cdef uint64_t n, size, i, left
    cdef Py_ssize_t q
    cdef list frames
    cdef bint whole
    while end - pos >= 4:
        n = <uint64_t>p[pos] | <uint64_t>p[pos + 1] << 8 | <uint64_t>p[pos + 2] << 16 | <uint64_t>p[pos + 3] << 24
        if n < 1 or n > max_frames:
            raise ValueError(f"a message of {n} frames (1 to {max_frames} allowed)")
        if <uint64_t>(end - pos - 4) < 8 * n:
            break
        q = pos + 4
        left = <uint64_t>(end - q) - 8 * n
        whole = True
        for i in range(n):
            size = _le64(p + q + 8 * i)
            if max_frame >= 0:
                if i == 0:
                    if size > max_header:
                        raise ValueError(f"a header of {size} bytes (at most {max_header})")
                elif size > <uint64_t>max_frame:
                    raise ValueError(f"a data frame of {size} bytes (at most {max_frame})")
            if size > left:
                whole = False
                left = 0
            else:
                left -= size
        if not whole:  # incomplete: its sizes (all in the limits) for the caller to go on with
            return pos, tuple([_le64(p + q + 8 * i) for i in range(n)])
        frames = []
        q = pos + 4 + <Py_ssize_t>(8 * n)
        for i in range(n):
            size = _le64(p + pos + 4 + 8 * i)
            frames.append(PyBytes_FromStringAndSize(<const char*>(p + q), <Py_ssize_t>size))
            q += <Py_ssize_t>size
        out.append(frames)
        pos = q
    return pos, None


def link_prefix(frames):
    """The size table that starts a link message of ``frames`` (bytes or buffers), and the message's size."""
    cdef Py_ssize_t n = len(frames), i = 0, size, total = 0
    prefix = PyBytes_FromStringAndSize(NULL, 4 + 8 * n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(prefix)
    cdef Py_buffer b
    cdef int k
    for k in range(4):
        p[k] = (n >> (8 * k)) & 0xFF
    for f in frames:
        if i == n:
            raise ValueError("link_prefix: the frames changed while being framed")
        if type(f) is bytes:
            size = PyBytes_GET_SIZE(f)
        else:
            PyObject_GetBuffer(f, &b, PyBUF_FULL_RO)
            size = b.len
            PyBuffer_Release(&b)
        for k in range(8):
            p[4 + 8 * i + k] = (<uint64_t>size >> (8 * k)) & 0xFF
        total += size
        i += 1
    if i != n:
        raise ValueError("link_prefix: the frames changed while being framed")
    return prefix, total + 4 + 8 * n
