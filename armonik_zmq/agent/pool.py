"""Worker processes: spawn N of them, watch them, replace the ones that die."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import itertools
import mmap
import time
from collections import deque
from typing import Optional

from ..worker.link import Link
from ..worker.runtime import STATE_SIZE

log = logging.getLogger(__name__)


def run_below(nice: int) -> int:
    """Give this process (every thread of it) and the workers it starts nice value ``nice``, if its own is lower;
    return the nice value in effect.

    Agents and workers are throughput work; the broker and the clients are latency work: on a busy host the
    scheduler then runs the broker and the clients first, while an idle CPU still goes to the workers (a nice
    value only ranks processes that want the same CPU). Raising one's nice value needs no privilege.

    With autogroups on (/proc/sys/kernel/sched_autogroup_enabled), a nice value ranks a process only among the
    processes of its session. An agent started in a session of its own (a service, ``setsid``) is then ranked
    against the broker by its session's nice value (/proc/self/autogroup), set here too; its workers share its
    session (``WorkerPool._spawn``).
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= current:
        return current
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]  # Linux: a nice value is per thread
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass  # a thread that just ended
    if os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
        except OSError:
            pass  # no autogroups here
    return os.getpriority(os.PRIO_PROCESS, 0)


class WorkerProc:
    """One worker process and the tasks the agent has queued at it (the first one is running)."""

    __slots__ = ("index", "popen", "link", "queue", "ready", "started", "state_path", "state", "slow",
                 "sent_configuration", "sent_options")

    def __init__(self, index: int, popen: subprocess.Popen, state_path: str = ""):
        self.index = index
        #: this worker's run-state file (STATE_SIZE), "" without one, and its mapping (read by ``running``)
        self.state_path = state_path
        self.state: Optional[mmap.mmap] = None
        if state_path:
            try:
                with open(state_path, "rb") as f:
                    self.state = mmap.mmap(f.fileno(), STATE_SIZE, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                pass  # unknown: ``running`` says so
        #: it gave back the runs queued behind a long task: no deep queue for it until its next output
        self.slow = False
        self.popen = popen
        #: its connection to the agent (worker/link.py), known once the worker said WORKER_READY on it
        self.link: Optional[Link] = None
        #: task ids sent to this worker, in the order it runs them
        self.queue: deque[str] = deque()
        self.ready = False
        self.started = time.monotonic()
        #: the ``configuration`` and ``options`` of the last RUNS sent to it: a RUNS that would repeat them leaves
        #: them out (the worker keeps the last ones it got)
        self.sent_configuration: Optional[dict] = None
        self.sent_options: Optional[list] = None

    @property
    def pid(self) -> int:
        return self.popen.pid


class WorkerPool:
    def __init__(self, n: int, path: str, processor: str, env: Optional[dict] = None, state_dir: str = ""):
        self.n = n
        #: where run-state files go (the agent's private directory); "" for none
        self.state_dir = state_dir
        self._spawns = itertools.count(1)
        #: the agent's Unix socket the workers connect to
        self.path = path
        self.processor = processor
        self.env = {**os.environ, **(env or {})}
        self.workers: dict[int, WorkerProc] = {}
        self.by_link: dict[Link, WorkerProc] = {}

    def _spawn(self, index: int) -> WorkerProc:
        cmd = [sys.executable, "-m", "armonik_zmq.worker", "--agent", self.path, "--processor", self.processor,
               "--agent-pid", str(os.getpid())]
        state_path = ""
        if self.state_dir:
            # A new file for each process: a worker being killed cannot write into its replacement's.
            state_path = os.path.join(self.state_dir, f"w{index}-{next(self._spawns)}.state")
            with open(state_path, "wb") as f:
                f.write(bytes(STATE_SIZE))
            cmd += ["--state", state_path]
        # Own process group, so a Ctrl-C in the terminal reaches the agent, which stops its workers in order.
        # Not a session of its own: Linux gives each session its own scheduler autogroup, and a worker in
        # one would get as much CPU as the broker, the agents and the client together.
        popen = subprocess.Popen(cmd, env=self.env, process_group=0)
        proc = WorkerProc(index, popen, state_path)
        self.workers[index] = proc
        log.info("worker %d started (pid %d)", index, popen.pid)
        return proc

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)

    def on_ready(self, link: Link, pid: int) -> Optional[WorkerProc]:
        for proc in self.workers.values():
            if proc.pid == pid and proc.link is None:
                proc.link = link
                proc.ready = True
                self.by_link[link] = proc
                return proc
        log.warning("WORKER_READY from unknown pid %d ignored", pid)
        return None

    def reap(self) -> list[tuple[WorkerProc, int]]:
        """Find dead workers, replace them; return (dead worker, exit code) pairs."""
        dead = []
        for proc in list(self.workers.values()):
            code = proc.popen.poll()
            if code is not None:
                self._replace(proc, code)
                dead.append((proc, code))
        return dead

    def lost(self, proc: WorkerProc, wait: float = 1.0) -> Optional[int]:
        """A worker whose link closed: kill it (useless without its link, if it lives), replace it once it
        exited (waiting up to ``wait`` seconds: a process closes its files just before it ends) and return
        its exit code; None if it has not exited yet (``reap`` replaces it then)."""
        self.kill(proc)
        try:
            code = proc.popen.wait(wait)
        except subprocess.TimeoutExpired:
            return None
        self._replace(proc, code)
        return code

    def _replace(self, proc: WorkerProc, code: int) -> None:
        if proc.link is not None:
            self.by_link.pop(proc.link, None)
        log.warning("worker %d (pid %d) exited with code %s; starting a new one", proc.index, proc.pid, code)
        self._spawn(proc.index)

    @staticmethod
    def _state_bytes(proc: WorkerProc) -> Optional[bytes]:
        """The worker's run-state file (a running flag, then the run token, NUL-padded): from its mapping (no
        system call), else read from the file; None if neither can be read."""
        state = proc.state
        if state is not None and not state.closed:
            return state[:STATE_SIZE]
        if not proc.state_path:
            return None
        try:
            with open(proc.state_path, "rb") as f:
                data = f.read(STATE_SIZE)
        except OSError:
            return None
        return data if len(data) == STATE_SIZE else None

    @staticmethod
    def run_state(proc: WorkerProc) -> Optional[tuple[str, bool]]:
        """(token of the task the worker started last, whether it was still running it), or None if unknown.

        Read when the worker is dead or being killed; the caller removes its file (``forget_state``) once done.
        """
        data = WorkerPool._state_bytes(proc)
        token = data[1:].rstrip(b"\0") if data is not None else b""
        if not token:
            return None
        return token.decode("ascii", "replace"), data[0] == 1

    @staticmethod
    def running(proc: WorkerProc, token: str) -> Optional[bool]:
        """Whether the worker runs the task of run token ``token`` right now; None if it cannot be told."""
        data = WorkerPool._state_bytes(proc)
        if data is None:
            return None
        return data[0] == 1 and data[1:].rstrip(b"\0") == token.encode()[:STATE_SIZE - 1]

    @staticmethod
    def forget_state(proc: WorkerProc) -> None:
        if proc.state is not None:
            proc.state.close()
        if proc.state_path:
            try:
                os.unlink(proc.state_path)
            except OSError:
                pass

    def kill(self, proc: WorkerProc) -> None:
        """SIGKILL a worker and whatever it started (its process group); the next reap replaces it."""
        proc.ready = False  # no new task for it meanwhile
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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
        self.by_link.clear()
