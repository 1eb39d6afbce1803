"""When the broker's Python garbage collector may run its full collections.

A full collection scans every tracked object: the decoded-row cache alone holds several container
objects per live task, so with tens of thousands of tasks in flight one pause takes tens of
milliseconds, and CPython starts one whenever a quarter more objects have survived since the last:
exactly while the traffic grows. Such a pause lands inside a turn and delays every reply of it (the
submit-ack tail of T5/T15; in the T12 flood, 30-850 ms pauses that found nothing to free).

The one place where the broker sets GC behaviour (``start`` once the state is loaded):

- What was alive once the state was loaded (modules, the rebuilt state) is frozen out of every scan,
  and CPython's own full and middle-generation collections are off. The youngest generation still
  collects as usual (short pauses over objects still in the CPU cache: ~60 ns per object). Its
  survivors wait in the middle generation for the next step, which scans them anyway: a middle
  collection scanned them once more before (up to 7,000 objects at a time, no longer in the cache),
  ~2-4 us per task of the broker's CPU in bench.broker_alone.
- ``busy`` (once per turn) runs a *step* every ``STEP_PERIOD`` seconds: a full collection of what is
  not frozen -- what survived since the last step -- then freezes the survivors. Its pause follows
  the allocations of one period, never the size of the heap. The period is short (0.1 s) so that
  each pause is: a request that arrives during a step waits for it. In T15 (6,000 tasks/s) steps every
  0.5 s took 5 ms at the median and up to 30-57 ms under load; every 0.1 s, at most 5-6.5 ms, for the
  same broker CPU. A step waits while a client's request is already waiting, by one period at most.
- ``idle`` (the loop waited a whole poll timeout for nothing) runs the full collection when the
  middle generation has grown (``IDLE_AFTER`` young collections since the last one), and every
  ``FULL_PERIOD`` seconds at most a collection of everything, frozen objects included: a reference
  cycle that outlived a step and died later is freed there.

Rows and most broker objects hold no reference cycles: they are freed at once by reference counting,
whatever the generation they sit in, frozen or not.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

#: young collections after which an idle moment runs a full collection (CPython's own middle-generation threshold)
IDLE_AFTER = 10
#: seconds between steps (collect what survived since the last one, then freeze it)
STEP_PERIOD = 0.1
#: seconds between collections of everything, frozen objects included (only at an idle moment)
FULL_PERIOD = 600.0
#: a full collection that took longer than this is logged
SLOW_S = 0.05


class GcPolicy:
    """Hold full collections back while the broker works; run them in small steps, or when it idles."""

    def __init__(self) -> None:
        self.young = gc.get_threshold()[:2]
        self.full_collections = 0
        #: collections run here: how many, objects found unreachable, seconds in all and the longest
        self.collected = 0
        self.seconds = 0.0
        self.max_seconds = 0.0
        self._next_step = 0.0
        self._next_everything = 0.0

    def start(self) -> None:
        """After the state is loaded: freeze what is alive, and take the full collections over from CPython."""
        gc.collect()
        gc.freeze()
        # count[1] (young collections since the last middle one) and count[2] (middle ones since the last full
        # one) never reach these thresholds: collections beyond the youngest happen only in ``busy`` / ``idle``.
        gc.set_threshold(self.young[0], 1 << 30, 1 << 30)
        now = time.monotonic()
        self._next_step = now + STEP_PERIOD
        self._next_everything = now + FULL_PERIOD

    def stop(self) -> None:
        gc.set_threshold(*self.young, IDLE_AFTER)
        gc.unfreeze()

    def idle(self) -> None:
        """The loop waited a whole poll timeout for nothing: a good moment for the full collection, if one is due."""
        now = time.monotonic()
        if now >= self._next_everything:
            self._next_everything = now + FULL_PERIOD
            gc.unfreeze()
            self._collect("idle, frozen objects included")
            gc.freeze()
        elif gc.get_count()[1] >= IDLE_AFTER:
            self._collect("idle")

    def step_due(self) -> bool:
        """Whether ``busy`` would run a step now if no client were waiting (the loop asks the socket only then)."""
        return time.monotonic() >= self._next_step

    def busy(self, wanted: bool = False) -> None:
        """Called once per turn: every ``STEP_PERIOD``, collect the recent survivors and freeze them.

        ``wanted``: a client's request is waiting; the step waits for a later turn, one period late at most.
        """
        now = time.monotonic()
        if now >= self._next_step and (not wanted or now >= self._next_step + STEP_PERIOD):
            self._next_step = now + STEP_PERIOD
            self._collect("step")
            gc.freeze()

    def _collect(self, why: str) -> None:
        started = time.perf_counter()
        found = gc.collect()
        self.full_collections += 1
        took = time.perf_counter() - started
        self.collected += found
        self.seconds += took
        if took > self.max_seconds:
            self.max_seconds = took
        if took > SLOW_S:
            log.info("full garbage collection (%s) took %.3fs, %d object(s) freed", why, took, found)

    def gauges(self) -> dict:
        return {"gc_collections": self.full_collections, "gc_collected": self.collected, "gc_seconds": self.seconds,
                "gc_max_seconds": self.max_seconds, "gc_frozen": gc.get_freeze_count()}
