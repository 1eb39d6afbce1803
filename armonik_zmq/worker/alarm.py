"""A one-shot alarm on the monotonic clock that one thread sets and another sleeps on (Linux timerfd).

The worker's guard thread must act when a run lasts past a deadline, and almost no run does. With an
alarm, starting a run costs the worker's main thread one system call (setting the alarm), and the guard
sleeps through every run that ends before its deadline. With an Event, each run's start woke the guard,
which then slept until the deadline: two context switches per run on an idle worker.
"""

from __future__ import annotations

import ctypes
import os

#: <sys/timerfd.h>, <time.h>
_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)

try:
    from .._core import timerfd_at as _timerfd_at
except ImportError:  # a core built before it (a stale build): ctypes, slower
    _timerfd_at = None


class Alarm:
    """``set(deadline)`` (``time.monotonic()`` seconds) or ``clear()`` from any thread, one call at a time;
    ``wait()`` sleeps until the alarm set last goes off (one set again, or cleared, before its deadline never
    goes off)."""

    def __init__(self) -> None:
        self._fd = _timerfd_create(_CLOCK_MONOTONIC, _TFD_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._spec = _Itimerspec()  # reused (hence one call at a time): set() is on the worker's per-run path
        if _timerfd_at is not None:
            # set() and clear() run on the worker's per-run path: the core's call costs ~0.75 us, ctypes' ~2.7 us
            fd = self._fd
            self.set = lambda deadline: _timerfd_at(fd, deadline if deadline > 0 else 1e-9)
            self.clear = lambda: _timerfd_at(fd, 0.0)

    def set(self, deadline: float) -> None:
        """Go off at ``deadline`` (at once if it passed), replacing the alarm set before."""
        value = self._spec.it_value
        seconds = int(deadline)
        value.tv_sec = seconds
        # 0 would disarm the timer: a deadline on a whole second goes off a nanosecond later
        value.tv_nsec = int((deadline - seconds) * 1e9) or 1
        self._settime()

    def clear(self) -> None:
        """Do not go off (until set again)."""
        value = self._spec.it_value
        value.tv_sec = value.tv_nsec = 0
        self._settime()

    def _settime(self) -> None:
        if _timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, self._spec, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def wait(self) -> None:
        """Sleep until the alarm goes off (a timerfd read blocks until then, and follows a set() meanwhile)."""
        os.read(self._fd, 8)

    def close(self) -> None:
        os.close(self._fd)
