"""Shared tools of the reliability tests (T1..T15 of RELIABILITY.md section 6).

- ``History``: a Jepsen "total-queue" style checker. A test records the task ids it attempted to
  submit, those whose submission was acknowledged, and those it saw completed; the workers record
  every execution (``tests/processors.py`` appends one line per execution to the file named by
  ``ARMONIK_ZMQ_EXEC_LOG``). ``report()`` says what was lost, unexpected, duplicated or recovered.
- ``scale``: a fixture parametrized ``full`` (slow, nightly) and ``ci`` (1/10); tests compute their
  counts from it. ``ARMONIK_ZMQ_SIZE=full`` keeps only the full-size variants (``bench/faults.py``).
- ``figure()``: appends one measured figure as a JSON line to the file named by
  ``ARMONIK_ZMQ_FIGURES`` (no-op when unset); ``bench/faults.py`` renders them into
  ``docs/reliability.md``.

This module is a pytest plugin (``tests/conftest.py`` registers it), so every test module can use
the ``scale`` fixture without importing anything.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
import warnings
from typing import Iterable, Optional

import pytest

EXEC_LOG_ENV = "ARMONIK_ZMQ_EXEC_LOG"
FIGURES_ENV = "ARMONIK_ZMQ_FIGURES"
SIZE_ENV = "ARMONIK_ZMQ_SIZE"

# a retried task runs as "<initial id>###<n>": all its attempts are executions of the same task
_RETRY_SUFFIX = re.compile(r"###\d+$")


def initial_task_id(task_id: str) -> str:
    """The id of the task's first attempt (ArmoniK retries run as ``<initial id>###<n>``)."""
    return _RETRY_SUFFIX.sub("", task_id)


def read_executions(path: str) -> list[tuple[str, int, float, str]]:
    """The execution log (written by ``tests/processors.py``) as (task id, worker pid, wall time, key) rows.

    ``key`` is the KEY of a ``b"sha256:KEY:..."`` payload, "" for other payloads. A missing file means no
    execution yet.
    """
    rows = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    rows.append((parts[0], int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else ""))
    except FileNotFoundError:
        pass
    return rows


def execution_id(row: tuple) -> str:
    """The logical id of an execution: its payload key when it has one, else its initial task id."""
    return row[3] or initial_task_id(row[0])


class History:
    """What a reliability test did and saw, checked like Jepsen's total-queue.

    Ids are logical task ids: the initial task id (retries fold into it), or, for ``b"sha256:KEY:..."``
    payloads, their KEY (a test that must resubmit cannot know the task ids of submissions that were
    never acknowledged, but it chose their keys).

    - attempted: the test tried to submit it (whether or not the broker answered);
    - acknowledged: the broker acknowledged the submission (it promised to keep it);
    - executed: a worker started running it (from the execution log; may happen several times);
    - completed: the test saw it Completed with the right result (once per result record seen).

    ``report()``:
    - lost: acknowledged but never completed;
    - unexpected: completed (or executed) but never attempted;
    - duplicated: completed more than once (more than one result record);
    - recovered: completed although its submission was never acknowledged.
    """

    def __init__(self, exec_log: Optional[str] = None):
        self.exec_log = exec_log
        self._lock = threading.Lock()
        self.attempted: set[str] = set()
        self.acknowledged: set[str] = set()
        self.completed: collections.Counter[str] = collections.Counter()
        self._executed: collections.Counter[str] = collections.Counter()

    def attempt(self, ids: Iterable[str]) -> None:
        with self._lock:
            self.attempted.update(ids)

    def acknowledge(self, ids: Iterable[str]) -> None:
        with self._lock:
            self.acknowledged.update(ids)

    def complete(self, ids: Iterable[str]) -> None:
        with self._lock:
            self.completed.update(ids)

    def execute(self, ids: Iterable[str]) -> None:
        """Record executions by hand (when there is no execution log)."""
        with self._lock:
            self._executed.update(initial_task_id(i) for i in ids)

    @property
    def executed(self) -> collections.Counter[str]:
        """Executions per logical id: those recorded by hand plus those in the execution log."""
        counts = collections.Counter(self._executed)
        if self.exec_log:
            counts.update(execution_id(row) for row in read_executions(self.exec_log))
        return counts

    def extra_executions(self) -> int:
        """Executions beyond the first of each task (at-least-once execution's price)."""
        return sum(n - 1 for n in self.executed.values() if n > 1)

    def details(self) -> dict[str, set[str]]:
        with self._lock:
            completed = set(self.completed)
            return {
                "lost": self.acknowledged - completed,
                "unexpected": (completed | set(self.executed)) - self.attempted,
                "duplicated": {i for i, n in self.completed.items() if n > 1},
                "recovered": completed & (self.attempted - self.acknowledged),
            }

    def report(self) -> dict[str, int]:
        """Counts of lost / unexpected / duplicated / recovered task ids."""
        return {name: len(ids) for name, ids in self.details().items()}

    def explain(self, limit: int = 5) -> str:
        """A short text for assertion messages: the counts and a few ids of each kind."""
        parts = []
        for name, ids in self.details().items():
            sample = ", ".join(sorted(ids)[:limit])
            parts.append(f"{name}={len(ids)}" + (f" (e.g. {sample})" if ids else ""))
        return (f"attempted={len(self.attempted)} acknowledged={len(self.acknowledged)} "
                f"completed={len(self.completed)} extra executions={self.extra_executions()}: " + "; ".join(parts))


def overloaded() -> bool:
    """True when the machine runs far more than its cores can (load average > 2 x CPUs).

    Wall-clock criteria of a few milliseconds or seconds measure the code only when it gets the CPU:
    tests still record such figures, but judge them only on a machine that is not oversubscribed
    (CI runs one suite on a fresh machine; a developer box may run several at once).
    """
    return os.getloadavg()[0] > 2 * (os.cpu_count() or 1)

def judge_latency(what: str, seconds: float, limit: float) -> None:
    """Assert a wall-clock latency criterion, unless other processes hold the CPUs (``overloaded()``).

    On an oversubscribed machine a wall-clock figure measures the scheduler, not the broker: it is
    recorded (``figure()``) by the caller, and only warned about here.
    """
    if seconds > limit and overloaded():
        warnings.warn(f"{what} {seconds * 1000:.1f} ms not judged: load average {os.getloadavg()[0]:.1f} on "
                      f"{os.cpu_count()} CPUs (criterion {limit * 1000:g} ms)")
        return
    assert seconds <= limit, (f"{what} {seconds * 1000:.1f} ms (criterion {limit * 1000:g} ms; "
                              f"load {os.getloadavg()[0]:.1f})")


def figure(test_id: str, name: str, value, unit: str, criterion: str, passed: bool) -> None:
    """Record one measured figure (e.g. ``figure("T1", "lost", 0, "tasks", "= 0", True)``).

    Appends a JSON line to the file named by ``ARMONIK_ZMQ_FIGURES``; does nothing when it is unset.
    The pytest node id (with its ``[full]``/``[ci]`` size) is kept so that the report can say how to
    rerun the test that measured it.
    """
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    row = {"test": test_id, "name": name, "value": value, "unit": unit, "criterion": criterion,
           "passed": bool(passed), "node": current.rsplit(" (", 1)[0], "time": time.time()}
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@pytest.fixture(params=[pytest.param(1.0, id="full", marks=pytest.mark.slow), pytest.param(0.1, id="ci")])
def scale(request) -> float:
    """1.0 for the full-size run (marked slow), 0.1 for CI: multiply the test's large counts by it."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """With ARMONIK_ZMQ_SIZE=full (or ci), keep only that size of the tests that use ``scale``."""
    size = os.environ.get(SIZE_ENV)
    if size not in ("full", "ci"):
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "scale" in callspec.params:
            wanted = callspec.params["scale"] == (1.0 if size == "full" else 0.1)
            (keep if wanted else drop).append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
