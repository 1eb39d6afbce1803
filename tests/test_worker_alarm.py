"""The worker's alarm (worker/alarm.py): its guard thread's timerfd, set when each run starts, cleared when the
worker idles."""

from __future__ import annotations

import select
import time

from armonik_zmq.worker.alarm import Alarm


def _fired(alarm: Alarm, within_ms: int) -> bool:
    poll = select.poll()
    poll.register(alarm._fd, select.POLLIN)
    return bool(poll.poll(within_ms))


def test_the_alarm_goes_off_at_its_deadline_and_never_once_cleared():
    alarm = Alarm()
    try:
        started = time.monotonic()
        alarm.set(started + 0.05)
        alarm.wait()
        assert 0.045 <= time.monotonic() - started < 1.0
        alarm.set(time.monotonic() + 0.05)
        alarm.set(time.monotonic() + 0.3)  # replaces the one before
        assert not _fired(alarm, 150)
        assert _fired(alarm, 2000)
        alarm.wait()
        alarm.set(time.monotonic() + 0.05)
        alarm.clear()
        assert not _fired(alarm, 200)
        alarm.set(time.monotonic() - 1.0)  # passed: at once
        assert _fired(alarm, 0)
        alarm.wait()
        alarm.set(float(int(time.monotonic()) + 1))  # on a whole second (a zero fraction must not disarm it)
        assert _fired(alarm, 2000)
    finally:
        alarm.close()
