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


def test_the_alarm_is_set_through_the_core():
    """A run's start sets the alarm and an idle worker clears it, twice per lone task on the worker's path: through the
    Cython core (~0.75 us a call here) rather than ctypes (~2.7 us; the fallback of a core built before it). A core
    built from this tree has it. (The per-call figures come from measurements, not from this test.)"""
    from armonik_zmq import _core
    from armonik_zmq.worker import alarm as alarm_module

    assert alarm_module._timerfd_at is _core.timerfd_at
