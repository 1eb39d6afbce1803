"""CPU time of this process and every process it started (Linux ``/proc``), to compare systems fairly.

Throughput on a shared 2-core machine is noisy; CPU seconds spent per task by the client, the
broker/scheduler and the workers together are not (much).
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, user+system seconds) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def tree_seconds(root: int | None = None) -> float:
    """User+system CPU seconds of ``root`` (default: this process) and all its live descendants.

    Descendants that already exited are not counted: the systems keep their processes for the
    whole run, so a difference of two readings around a workload is its cost.
    """
    root = os.getpid() if root is None else root
    if not os.path.isdir("/proc"):
        return 0.0
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None:
                parents[int(entry)], cpu[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def tree_cpu(roots: list[int]) -> dict[int, float]:
    """User+system CPU seconds by pid of the ``roots`` and every live descendant (per-process figures)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][1]
        todo.extend(children.get(pid, ()))
    return out


class CpuMeter:
    """``with CpuMeter([broker_pid, agent_pid]) as m: ...``: then ``m.seconds`` (the trees + this process)
    and ``m.by_pid`` (this process included), for CPU time per task by process."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.seconds = 0.0
        self.by_pid: dict[int, float] = {}

    def __enter__(self) -> "CpuMeter":
        self._before = tree_cpu(self.roots)
        self._self = _stat(str(os.getpid()))[1]
        return self

    def __exit__(self, *exc) -> None:
        after = tree_cpu(self.roots)
        self.by_pid = {pid: after[pid] - self._before.get(pid, 0.0) for pid in after}
        self.by_pid[os.getpid()] = _stat(str(os.getpid()))[1] - self._self
        self.seconds = sum(self.by_pid.values())
