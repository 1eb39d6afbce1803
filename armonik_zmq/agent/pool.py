"""Worker processes: spawn N of them, watch them, replace the ones that die."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Optional

log = logging.getLogger(__name__)


class WorkerProc:
    """One worker process and the tasks the agent has queued at it (the first one is running)."""

    __slots__ = ("index", "popen", "identity", "queue", "ready", "started")

    def __init__(self, index: int, popen: subprocess.Popen):
        self.index = index
        self.popen = popen
        #: ROUTER routing id, known once the worker said WORKER_READY
        self.identity: Optional[bytes] = None
        #: task ids sent to this worker, in the order it runs them
        self.queue: deque[str] = deque()
        self.ready = False
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid


class WorkerPool:
    def __init__(self, n: int, endpoint: str, processor: str, env: Optional[dict] = None):
        self.n = n
        self.endpoint = endpoint
        self.processor = processor
        self.env = {**os.environ, **(env or {})}
        self.workers: dict[int, WorkerProc] = {}
        self.by_identity: dict[bytes, WorkerProc] = {}

    def _spawn(self, index: int) -> WorkerProc:
        cmd = [sys.executable, "-m", "armonik_zmq.worker", "--agent", self.endpoint, "--processor", self.processor,
               "--identity", f"w{index}"]
        # Own process group: a Ctrl-C in the terminal reaches the agent, which stops its workers in order.
        popen = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        proc = WorkerProc(index, popen)
        self.workers[index] = proc
        log.info("worker %d started (pid %d)", index, popen.pid)
        return proc

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)

    def on_ready(self, identity: bytes, pid: int) -> Optional[WorkerProc]:
        for proc in self.workers.values():
            if proc.pid == pid:
                proc.identity = identity
                proc.ready = True
                self.by_identity[identity] = proc
                return proc
        log.warning("WORKER_READY from unknown pid %d ignored", pid)
        return None

    def reap(self) -> list[tuple[WorkerProc, int]]:
        """Find dead workers, replace them; return (dead worker, exit code) pairs."""
        dead = []
        for index, proc in list(self.workers.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            dead.append((proc, code))
            if proc.identity is not None:
                self.by_identity.pop(proc.identity, None)
            log.warning("worker %d (pid %d) exited with code %s; starting a new one", index, proc.pid, code)
            self._spawn(index)
        return dead

    def kill(self, proc: WorkerProc) -> None:
        """SIGKILL a worker and whatever it started (its process group); the next reap replaces it."""
        proc.ready = False  # no new task for it meanwhile
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def free(self, window: int) -> list[WorkerProc]:
        """Ready workers with room in their queue, least loaded first."""
        procs = [p for p in self.workers.values() if p.ready and len(p.queue) < 1 + window]
        procs.sort(key=lambda p: len(p.queue))
        return procs

    def stop(self, timeout: float = 3.0) -> None:
        for proc in self.workers.values():
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.workers.values():
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait()
        self.workers.clear()
        self.by_identity.clear()
