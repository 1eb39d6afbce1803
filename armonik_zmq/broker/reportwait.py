"""Whether a turn that gave an idle agent its only task waits for that task's report before it commits.

A lone task (a client that submits and waits, one task at a time) costs two turns and two durable commits:
the submit's turn (its DISPATCH leaves before the commit, so the task runs while the broker fsyncs), then
the completion's turn. The completion's commit cannot start before the submit's has ended (one writer), and
the client sees its result only after it. When the task is short, its report reaches the broker about when
the submit's commit ends (a no-op here: ~0.5 ms from DISPATCH to report, a durable commit 0.2-0.6 ms, more
under load). Waiting for that report with the transaction still open, and handling it in the same turn,
makes one commit of the two, and the broker saves a whole turn. Sequential no-op futures tasks at load 8
(2 interleaved pairs): broker CPU per task 1,007/1,100 -> 860/813 us, all processes 1,927/2,047 ->
1,600/1,560 us, p50 2,906/2,973 -> 2,061/2,020 us. The gain in time is the submit's commit when it is
slower than the task's round trip (a loaded disk); when it is faster, the task's round trip is on the path
either way and the one commit, bigger, costs about what the second turn did.

The wait (broker/server.py ``_join_reports``) is for an agent that holds only the task just sent to it, and
it ends at once when a client's request arrives (that turn commits, the request is served next) or when
the agent's TASKS_DONE came (its other messages, a heartbeat, are handled in the turn too). What it costs when the task is not short: the submit's reply waits ``window``
more. So a wait that ends without the report (a *miss*) makes the next waits skip: 1 turn after a miss, then
3, 7, ... up to ``MAX_SKIP`` while misses follow each other; a report that comes in time ends the skipping.
Sequential tasks that take longer than the window thus pay it about once every ``MAX_SKIP`` tasks.

The window follows the reports' delays, between ``window`` (``--report-wait``) and ``LONGEST`` times it: twice
the latest late report (a miss counts as a report at the wait's end), decaying by ``DECAY`` at each hit. On a
quiet host reports come in ~0.5 ms and the window stays at its floor; on a loaded one (agent and worker wait
for a CPU) they come in 2-6 ms, and a fixed 2 ms window missed a third of them: each miss and the skip after
it cost the lone task a second turn and commit. Lone no-op futures tasks at load 6-9, 2,300 tasks:
1.31-1.43 turns per task with 2 ms, 1.11 with 6 ms.
"""

from __future__ import annotations

#: longest skip (turns that would wait but do not) after misses in a row
MAX_SKIP = 1023
#: the longest window, in times ``--report-wait``
LONGEST = 4
#: at each hit, how much of the latest late report's delay the window still heeds
DECAY = 0.9


class ReportWait:
    """The window of the in-turn wait for a lone task's report, and the back-off after misses."""

    def __init__(self, window: float) -> None:
        #: seconds a turn may wait now (0: never), from ``floor`` to ``LONGEST`` times it
        self.window = self.floor = window
        #: the latest late report's delay (seconds), decaying at each hit
        self._late = 0.0
        self._skip_next = 0
        self._skip = 0

    def wanted(self) -> bool:
        """Whether this turn may wait (counts a skipped turn when not)."""
        if self.window <= 0:
            return False
        if self._skip:
            self._skip -= 1
            return False
        return True

    def hit(self, delay: float) -> None:
        """The awaited reports came within the window, ``delay`` seconds after the wait began."""
        self._skip_next = 0
        self._follow(max(delay, self._late * DECAY))

    def miss(self, waited: float) -> None:
        """The wait ended, ``waited`` seconds after it began, before the awaited reports (the window ended, or a
        client's request came): skip the next waits, more after each miss in a row."""
        self._skip_next = min(2 * self._skip_next + 1, MAX_SKIP)
        self._skip = self._skip_next
        self._follow(max(self._late, waited))  # the reports come later than that

    def _follow(self, late: float) -> None:
        self._late = late
        self.window = min(max(2 * late, self.floor), LONGEST * self.floor)
