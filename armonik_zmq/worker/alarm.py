"""A one-shot alarm on the monotonic clock that one thread sets and another sleeps on (Linux timerfd).

The worker's guard thread must act when a run lasts past a deadline, and almost no run does. With an
alarm, starting a run costs the worker's main thread one system call (setting the alarm), and the guard
sleeps through every run that ends before its deadline. With an Event, each run's start woke the guard,
which then slept until the deadline: two context switches per run on an idle worker.
"""

from __future__ import annotations

import ctypes
import os

from .._core import timerfd_at

#: <sys/timerfd.h>, <time.h>
_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = os.O_CLOEXEC


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)


class Alarm:
    """``set(deadline)`` (``time.monotonic()`` seconds) or ``clear()`` from any thread, one call at a time;
    ``wait()`` sleeps until the alarm set last goes off (one set again, or cleared, before its deadline never
    goes off)."""

    def __init__(self) -> None:
        self._fd = _timerfd_create(_CLOCK_MONOTONIC, _TFD_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")

    def set(self, deadline: float) -> None:
        """Go off at ``deadline`` (at once if it passed), replacing the alarm set before."""
        # on the worker's per-run path: the core's call costs ~0.75 us, ctypes' cost ~2.7 us
        timerfd_at(self._fd, deadline if deadline > 0 else 1e-9)  # (0 would disarm it)

    def clear(self) -> None:
        """Do not go off (until set again)."""
        timerfd_at(self._fd, 0.0)

    def wait(self) -> None:
        """Sleep until the alarm goes off (a timerfd read blocks until then, and follows a set() meanwhile)."""
        os.read(self._fd, 8)

    def close(self) -> None:
        os.close(self._fd)
