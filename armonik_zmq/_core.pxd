# cython: language_level=3
"""Contract of the dispatch core: its limits, its records and every field of ``Core``.

Everything is a dense int slot. Records live in ``std::vector``s of plain structs; lists that need
O(1) removal from the middle (a result's waiters, a task's dependencies, an agent's held tasks, the
agent ring, the free lists) are intrusive, threaded through those records by slot number, with -1
meaning "none". Ready queues are ``std::deque``s of task slots with lazy deletion.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libcpp.deque cimport deque
from libcpp.vector cimport vector


cdef enum:
    PRIO_MIN = 1
    PRIO_MAX = 99
    # A bucket per priority, indexed by the priority itself: bucket 0 stays empty, which is
    # cheaper than subtracting 1 on every push and pop.
    N_BUCKETS = 100
    # Bits 0..127 cover buckets 0..99, two words per partition.
    BITMAP_WORDS = 2
    # Each partition costs 100 deques (tens of KiB): a stray huge partition number must not
    # allocate gigabytes, so partitions are capped.
    PART_LIMIT = 1024
    # Purge a partition's dead queue entries once there are at least this many and they
    # outnumber the live ones: amortised O(1), and a partition nobody serves cannot pin
    # freed slots forever.
    COMPACT_MIN = 64
    NONE = -1


cdef enum TaskState:
    TS_FREE = 0
    TS_WAITING = 1
    TS_QUEUED = 2
    TS_DISPATCHED = 3
    TS_DEAD = 4


cdef enum ResultState:
    RS_FREE = 0
    RS_PENDING = 1
    RS_READY = 2
    RS_ABORTED = 3


cdef struct TaskRec:
    #: queue order key: back pushes count up from 0, front pushes down from -1, so within a
    #: priority the smallest key is the oldest entry across every partition
    int64_t seq
    #: index into the partition arrays: kept small and dense by the broker
    int32_t partition
    #: agent slot holding the task while DISPATCHED, else -1
    int32_t owner
    #: results still awaited: always the length of the dependency list
    int32_t missing
    #: first edge of the task's dependency list (unordered), -1 if none
    int32_t dep_head
    #: neighbours in the owner's held list (acquisition order)
    int32_t held_prev
    int32_t held_next
    #: next slot in the free list while FREE and recyclable
    int32_t next_free
    #: PRIO_MIN..PRIO_MAX, also its bucket index
    uint8_t priority
    #: a TaskState
    uint8_t state
    #: a ready-queue entry still names this slot (maybe a dead one): the slot is not
    #: recyclable until that entry is popped
    uint8_t in_queue


cdef struct EdgeRec:
    #: "task waits for result": one edge per distinct (task, missing result) pair
    int32_t task
    int32_t result
    #: neighbours in the result's waiter list, kept in registration order; r_next also
    #: chains the edge free list
    int32_t r_prev
    int32_t r_next
    #: neighbours in the task's dependency list
    int32_t t_prev
    int32_t t_next


cdef struct ResultRec:
    #: waiter list, oldest registration first
    int32_t head
    int32_t tail
    #: length of the waiter list, for free_result's message and validate()
    int32_t n_waiters
    #: next slot in the free list while FREE
    int32_t next_free
    #: last add_task call that listed this result: dedups ``missing`` in O(1) without a set
    uint64_t stamp
    #: a ResultState: READY and ABORTED are kept so that late or contradictory calls are caught
    uint8_t state


cdef struct AgentRec:
    #: most tasks it may hold at once (its credit when idle)
    int32_t capacity
    #: the capacity it asked for last: ``capacity`` comes down to it as held tasks end, when it was
    #: lowered below what the agent held
    int32_t want
    int32_t n_held
    #: held tasks, oldest dispatch first
    int32_t head
    int32_t tail
    #: neighbours in the dispatch ring (circular, registration order)
    int32_t ring_prev
    int32_t ring_next
    #: next slot in the free list once removed
    int32_t next_free
    uint8_t alive


@cython.final
cdef class Core:
    #: task records by slot
    cdef vector[TaskRec] tasks
    #: dependency edges; freed ones are chained through r_next
    cdef vector[EdgeRec] edges
    #: result records by slot
    cdef vector[ResultRec] results
    #: agent records by slot
    cdef vector[AgentRec] agents
    #: partitions each agent serves, deduplicated, in the order given
    cdef vector[vector[int32_t]] agent_parts

    #: ready queues, flattened: bucket ``partition * N_BUCKETS + priority``
    cdef vector[deque[int32_t]] buckets
    #: non-empty buckets, BITMAP_WORDS words per partition: highest bit = best priority in O(1)
    cdef vector[uint64_t] bitmap
    #: QUEUED tasks per partition (what n_ready reports)
    cdef vector[int64_t] live
    #: entries of cancelled or freed tasks still sitting in each partition's buckets
    cdef vector[int64_t] dead
    #: partitions 0..n_partitions-1 have their arrays; grown on first use
    cdef int32_t n_partitions

    #: free-list heads (-1: allocate a new slot)
    cdef int32_t task_free
    cdef int32_t edge_free
    cdef int32_t result_free
    cdef int32_t agent_free

    #: oldest registered live agent: where the ring's registration order starts
    cdef int32_t ring_head
    #: agent that dispatch() offers a task to first; -1 only when there is no agent
    cdef int32_t cursor

    #: next queue keys (see TaskRec.seq): front pushes count down so requeued tasks sort first
    cdef int64_t back_seq
    cdef int64_t front_seq
    #: add_task call counter, for ResultRec.stamp
    cdef uint64_t stamp

    #: live task count by state, and their total
    cdef int64_t n_live_tasks
    cdef int64_t n_wait
    cdef int64_t n_queued
    cdef int64_t n_disp
    #: sum of (capacity - held) over live agents: dispatch() returns at once when 0
    cdef int64_t free_credit

    #: scratch buffers reused across calls so hot paths do not allocate
    cdef vector[int32_t] scratch
    cdef vector[int32_t] cand

    # Only these may raise: slot checks (ValueError) and growth (MemoryError). Everything
    # else is noexcept: free lists are intrusive and purging compacts deques in place, so
    # removing things never allocates. _push reports a failed allocation by returning -1
    # with nothing changed, so callers can give up before touching anything else.
    cdef int _task_slot(self, int64_t t) except -1
    cdef int _result_slot(self, int64_t r) except -1
    cdef int _agent_slot(self, int64_t a) except -1
    cdef int _ensure_free_slot(self) except -1
    cdef int _grow_partitions(self, int64_t p) except -1
    cdef int _push(self, int32_t t, bint front) noexcept

    cdef int32_t _peek(self, int32_t p) noexcept
    cdef void _pop_head(self, int32_t p, int32_t prio) noexcept
    cdef void _entry_gone(self, int32_t t) noexcept
    cdef void _maybe_compact(self, int32_t p) noexcept
    cdef int32_t _pick(self, int32_t a) noexcept
    cdef void _drop_deps(self, int32_t t) noexcept
    cdef void _hold(self, int32_t a, int32_t t) noexcept
    cdef void _unhold(self, int32_t t) noexcept
    cdef void _detach(self, int32_t t, uint8_t new_state) noexcept
    cdef void _recycle_task(self, int32_t t) noexcept
