"""When the broker's Python garbage collector may run its full collections.

A full collection scans every tracked object: the decoded-row cache alone holds several container
objects per live task, so with tens of thousands of tasks in flight one pause takes tens of
milliseconds, and CPython starts one whenever a quarter more objects have survived since the last:
exactly while the traffic grows. Such a pause lands inside a turn and delays every reply of it (the
submit-ack tail of T5/T15). The young generations still collect as usual (short pauses: they scan
only recent survivors); the full collection waits for an idle moment of the loop (nothing received
for a whole poll timeout), or for ``FORCE_AFTER`` young collections if the broker is never idle.
What was alive once the state was loaded (modules, the rebuilt state) is frozen out of every scan.
Rows and most broker objects hold no reference cycles: they are freed at once by reference counting,
whatever the generation they sit in.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

#: collections of the middle generation after which an idle moment runs a full collection (CPython's own threshold)
IDLE_AFTER = 10
#: ... and after which it runs even without an idle moment (a broker that is never idle still frees its cycles)
FORCE_AFTER = 1000
#: a full collection that took longer than this is logged
SLOW_S = 0.05


class GcPolicy:
    """Hold full collections back while the broker works; run them when it idles."""

    def __init__(self) -> None:
        self.young = gc.get_threshold()[:2]
        self.full_collections = 0

    def start(self) -> None:
        """After the state is loaded: freeze what is alive, and take the full collections over from CPython."""
        gc.collect()
        gc.freeze()
        # count[2] (middle-generation collections since the last full one) never reaches this threshold:
        # full collections happen only in ``idle`` / ``busy``.
        gc.set_threshold(self.young[0], self.young[1], 1 << 30)

    def stop(self) -> None:
        gc.set_threshold(self.young[0], self.young[1], IDLE_AFTER)
        gc.unfreeze()

    def idle(self) -> None:
        """The loop waited a whole poll timeout for nothing: a good moment for the full collection, if one is due."""
        if gc.get_count()[2] >= IDLE_AFTER:
            self._collect("idle")

    def busy(self) -> None:
        """Called once per turn: the full collection is forced only after ``FORCE_AFTER`` young ones."""
        if gc.get_count()[2] >= FORCE_AFTER:
            self._collect("busy")

    def _collect(self, why: str) -> None:
        started = time.perf_counter()
        found = gc.collect()
        self.full_collections += 1
        took = time.perf_counter() - started
        if took > SLOW_S:
            log.info("full garbage collection (%s) took %.3fs, %d object(s) freed", why, took, found)
