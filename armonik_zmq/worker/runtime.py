"""The worker process: connect to the agent (worker/link.py), run each task given, report its output."""

from __future__ import annotations

import ctypes
import importlib
import itertools
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Optional

from .. import hostmem
from ..common import Output
from ..protocol import Op, ProtocolError, check_reply, decode_header, request, split_frames
from .alarm import Alarm
from .link import Link, LinkClosed
from .taskhandler import TaskHandler, mapped_inputs

log = logging.getLogger(__name__)

#: prctl(2) option: the signal this process gets when its parent dies
_PR_SET_PDEATHSIG = 1

#: the ops the per-task path compares with, as ints (an IntEnum member's lookup and compare cost ~0.1 us each)
_RUN, _RUNS, _W_OUTPUT, _W_OUTPUTS = int(Op.RUN), int(Op.RUNS), int(Op.W_OUTPUT), int(Op.W_OUTPUTS)
_RUN_OPS = (_RUN, _RUNS)


def load_processor(spec: str) -> Callable[[TaskHandler], Output]:
    """Import ``module:function``; raise a clear error when it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"processor must be given as MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import processor module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no callable named {attr!r}")
    return fn


#: size of a worker's run-state file: byte 0 is 1 while a task runs (0 once it ended), bytes 1.. the token
#: of the task started last. The worker writes it through a shared mapping (no syscall per task); its
#: agent reads it when the worker dies, to know which of the tasks queued there was running.
STATE_SIZE = 32

#: seconds a worker waits for its agent's next message before it checks that the agent still lives
PARENT_CHECK = 1

#: outputs held back at most this long (seconds) while the worker runs the next task of its queue
OUTPUT_DELAY = 0.001
#: outputs sent in one message at most; short tasks' outputs otherwise go when the queue runs dry (one W_OUTPUTS
#: per RUNS: each message costs both processes more than a tiny task), or once held this long (seconds)
OUTPUT_BATCH = 32
OUTPUT_HOLD_MAX = 0.003
#: a task still running after this long (seconds) gives the runs queued behind it back to the agent,
#: beyond the agent's ``keep`` (its window), so that another worker can take them
GIVE_BACK_AFTER = 0.005
#: ... and looks again at doubling intervals up to this one while the task lasts
GIVE_BACK_MAX = 0.1


class WorkerRuntime:
    """Runs the tasks the agent queues here, one at a time, in order.

    Outputs are batched: the output of a task that ends while another task is queued here waits to travel
    with the next ones, as one ``W_OUTPUTS``, sent when the queue runs dry (unless runs arrived meanwhile),
    at ``OUTPUT_BATCH`` outputs, or by the guard thread. Each message wakes the agent, which costs more than
    a tiny task. The guard sends the held outputs when the next task runs longer than
    ``OUTPUT_DELAY``, so a long task never holds back the report of a short one (its agent would count that
    one as still running), or when they were held ``OUTPUT_HOLD_MAX``; it gives back the runs queued here
    once the task has run ``GIVE_BACK_AFTER``, so that they do not wait behind it.

    The guard sleeps on an alarm (worker/alarm.py) that a run's start sets to that run's first deadline
    unless an earlier one is set already (runs in a row: the guard then wakes for the run of that moment):
    a run that ends before its deadline (almost every one) costs the guard no wake-up.
    """

    def __init__(self, agent_path: str, processor: Callable[[TaskHandler], Output], state_path: str = "",
                 agent_pid: Optional[int] = None):
        self.processor = processor
        #: the run-state file shared with the agent (pool.STATE_SIZE bytes), mapped: a write costs no syscall
        self._state: Optional[mmap.mmap] = None
        if state_path:
            with open(state_path, "r+b") as f:
                self._state = mmap.mmap(f.fileno(), STATE_SIZE)
        self._rids = itertools.count(1)
        self._agent_pid = agent_pid or os.getppid()
        sock = self._connect(agent_path)
        # A read that waits for the agent's next message returns empty after this long (the socket stays in
        # blocking mode): the worker then checks that its agent still lives.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", PARENT_CHECK, 0))
        self.link = Link(sock, copy_big=True)
        self._readable = select.poll()
        self._readable.register(self.link.fileno(), select.POLLIN)
        #: messages read from the link, not handled yet
        self._inbox: deque = deque()
        #: runs queued here by the agent (RUN, RUNS), not started yet
        self._runs: deque = deque()
        #: outputs not sent yet: (fields, data frames), and time.monotonic() when the first was held
        self._outputs: list = []
        self._held_since = 0.0
        #: the link is used by this thread and the guard thread: one at a time
        self._lock = threading.Lock()
        #: the guard's alarm and when it is set to go off (0: not set), and what the guard watches: runs started
        #: so far, when the last one started, whether one runs, and the interval of its next give-back (all
        #: changed under ``_watch``)
        self._alarm = Alarm()
        self._armed = 0.0
        self._watch = threading.Lock()
        self._seq = 0
        self._run_started = 0.0
        self._busy = False
        self._pause = GIVE_BACK_AFTER
        #: runs the agent wants kept here behind a long task (its window; from RUNS' configuration)
        self._keep = 1
        #: the configuration and options list of the last RUNS that had them (a RUNS leaves out what did not change)
        self._configuration: dict = {}
        self._options: Optional[list] = None
        threading.Thread(target=self._guard, name="output-guard", daemon=True).start()

    def _connect(self, path: str) -> socket.socket:
        """Connect to the agent's worker socket; wait for it while the agent lives (it may not listen yet)."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if os.getppid() != self._agent_pid:
                raise SystemExit("the agent is gone: worker exiting")
            time.sleep(0.1)

    def send(self, op: Op, data=(), **fields) -> int:
        rid = next(self._rids)
        with self._lock:
            self.link.send([request(op, rid, **fields), *data])
        return rid

    def call(self, op: Op, data=(), **fields) -> dict:
        """Send one request (header fields + ``data`` frames) to the agent and wait for its reply.

        Held outputs go first (the agent checks the request's token against the task it thinks is running).
        Runs that arrive meanwhile are kept for later.
        """
        rid = next(self._rids)
        with self._lock:
            self._flush()
            self.link.send([request(op, rid, **fields), *data])
            while True:
                header, frames = self._receive()
                if header is None:
                    continue
                if header["op"] in _RUN_OPS:
                    self._queue_runs(header, frames)
                elif header["rid"] == rid:
                    try:
                        return check_reply(header)
                    except ProtocolError as exc:
                        raise RuntimeError(f"agent refused {op.name}: {exc}") from None

    def _output(self, data=(), **fields) -> None:
        """Hold a task's output (sent by ``_flush``): W_OUTPUT's ``fields``, its ``data`` frames."""
        with self._lock:
            if not self._outputs:
                self._held_since = time.monotonic()
            self._outputs.append((fields, data))
            if len(self._outputs) >= OUTPUT_BATCH:
                self._flush()

    def _flush(self) -> None:
        """Send the held outputs as one W_OUTPUTS (the caller holds ``_lock``)."""
        if not self._outputs:
            return
        outputs, self._outputs = self._outputs, []
        if len(outputs) == 1:  # (a lone task's: no comprehension to run, each one more code to wake up cold)
            fields, data = outputs[0]
            self.link.send([request(Op.W_OUTPUTS, next(self._rids), outputs=[fields]), *data])
            return
        data = [f for _, frames in outputs for f in frames]
        self.link.send([request(Op.W_OUTPUTS, next(self._rids), outputs=[o for o, _ in outputs]), *data])

    def _guard(self) -> None:
        """Send held outputs once the task that runs after them has run ``OUTPUT_DELAY``, or once they were held
        ``OUTPUT_HOLD_MAX``; give back the runs queued behind a task that runs ``GIVE_BACK_AFTER``, then again
        at doubling intervals up to ``GIVE_BACK_MAX`` while it lasts (see the class). It looks at the run of
        the moment each time the alarm goes off, and sets it again for that run's next deadline."""
        while True:
            self._alarm.wait()
            with self._watch:
                self._armed = 0.0
                seq, started, busy = self._seq, self._run_started, self._busy
            if not busy:
                continue  # between runs: the next one sets the alarm, or the main thread sends what is held
            mono = time.monotonic()
            if self._outputs and (mono >= started + OUTPUT_DELAY or mono >= self._held_since + OUTPUT_HOLD_MAX):
                with self._lock:
                    self._flush()
            give_back = False
            with self._watch:
                if self._seq != seq:  # another run started meanwhile (it left the alarm to us if it was set)
                    if self._busy:
                        self._arm(self._first_deadline(self._run_started))
                    continue
                if not self._busy:
                    continue
                if mono >= started + GIVE_BACK_AFTER:
                    give_back = True  # runs may still come: look again, less and less often
                    self._pause = min(2 * self._pause, GIVE_BACK_MAX)
                    self._arm(mono + self._pause)
                else:
                    self._arm(self._first_deadline(started))
            if give_back:
                self._give_back()

    def _first_deadline(self, started: float) -> float:
        """When the guard first looks at a run that starts at ``started``."""
        if self._outputs:
            return min(started + OUTPUT_DELAY, self._held_since + OUTPUT_HOLD_MAX)
        return started + GIVE_BACK_AFTER

    def _arm(self, deadline: float) -> None:
        """Have the alarm go off by ``deadline`` (the caller holds ``_watch``): set it unless it is set sooner."""
        if not self._armed or deadline < self._armed:
            self._alarm.set(deadline)
            self._armed = deadline

    def _give_back(self) -> None:
        """Hand the runs queued here beyond ``_keep`` back to the agent (the task running is a long one)."""
        with self._lock:
            self._drain()  # runs the agent sent while this task ran are still in the socket
            returned = []
            while len(self._runs) > self._keep:
                try:
                    header, _ = self._runs.pop()  # the main thread takes from the other end
                except IndexError:
                    break
                returned.append(header["token"])
            if returned:
                returned.reverse()
                self.link.send([request(Op.W_OUTPUTS, next(self._rids), outputs=[], returned=returned)])

    def _drain(self) -> None:
        """Queue the runs that arrived, without waiting (the caller holds ``_lock``, no call in progress). The link is
        polled before it is read: an idle worker's drain mostly finds nothing, and a read that finds nothing costs
        the system call and a Python exception (BlockingIOError), a poll only the call."""
        while self._inbox or (self._readable.poll(0) and self._read()):
            header, frames = self._receive()
            if header is not None and header["op"] in _RUN_OPS:
                self._queue_runs(header, frames)

    def _queue_runs(self, header: dict, frames: list) -> None:
        if header["op"] == _RUN:
            self._runs.append((header, frames))
            return
        # A RUNS leaves out the configuration and options the previous one on this link had: kept here
        configuration = header.get("configuration")
        if configuration is None:
            configuration = self._configuration
        else:
            self._configuration = configuration
            self._keep = configuration.get("keep", self._keep)
        options = header.get("options")
        if options is None:
            options = self._options
        else:
            self._options = options
        try:
            counts = header["frames"]
            # one run (a lone task's) takes every frame: split_frames only checks that
            groups = (frames,) if len(counts) == 1 and counts[0] == len(frames) else split_frames(frames, counts)
            if options is not None:  # each run names its options map by index
                for run in header["runs"]:
                    run["options"] = options[run["options"]]
        except (ProtocolError, KeyError, TypeError, IndexError) as exc:
            log.error("malformed RUNS from the agent ignored: %s", exc)
            return
        for run, group in zip(header["runs"], groups):
            run["configuration"] = configuration
            self._runs.append((run, group))

    def _read(self) -> bool:
        """Take the messages the link holds now into the inbox, without waiting; say if it has any."""
        self._inbox.extend(self.link.read())
        return bool(self._inbox)

    def _receive(self):
        """The next message from the agent, waiting for it (the caller holds ``_lock``). With none in the inbox, the
        read waits: one system call, where a poll then a read took two, and a read that finds nothing yet (what
        the link held was read) a third and an exception."""
        inbox = self._inbox
        while not inbox:
            inbox.extend(self.link.read(wait=True))
            if inbox:
                break
            if self.link.closed is not None:
                raise SystemExit(f"the agent is gone ({self.link.closed}): worker exiting")
            # Nothing yet (or part of a message): wait, but notice when the agent died (we were re-parented) even if
            # its end of the link lives on in another process, so that a SIGKILLed agent leaves no orphan workers.
            if os.getppid() != self._agent_pid:
                raise SystemExit("the agent is gone: worker exiting")
        msg = inbox.popleft()
        try:
            header = decode_header(msg[0])
        except ProtocolError as exc:
            log.error("undecodable message from the agent ignored: %s", exc)
            return None, []
        if "error" in header and header["op"] in (_W_OUTPUT, _W_OUTPUTS):
            # Outputs are not waited for (the next task starts at once), so their refusals surface here.
            log.error("agent refused an output: %s", header["error"].get("message"))
        return header, msg[1:]

    def _next_run(self):
        """The next run queued here; when there is none, send the held outputs and wait for the agent."""
        runs = self._runs
        try:  # (tested first: a lone task finds the queue empty, and a raised IndexError costs ~1 us)
            run = runs.popleft() if runs else None
        except IndexError:  # the guard thread gave the last ones back meanwhile
            run = None
        if run is None:
            with self._lock:
                # Runs the agent sent meanwhile: the held outputs may still wait for more. Not for one output
                # (a lone task's): it goes now, and the wait below finds those runs all the same (a system
                # call less per lone task).
                if len(self._outputs) > 1:
                    self._drain()
                if not runs:
                    self._flush()
                    with self._watch:
                        if self._armed:  # idle: nothing to watch
                            self._alarm.clear()
                            self._armed = 0.0
                while not runs:
                    header, frames = self._receive()
                    if header is not None and header["op"] in _RUN_OPS:
                        self._queue_runs(header, frames)
                run = runs.popleft()
        with self._watch:  # the guard watches this run (held outputs, runs that would wait behind it)
            self._seq += 1
            self._run_started = started = time.monotonic()
            self._busy = True
            self._pause = GIVE_BACK_AFTER
            # (_arm(_first_deadline(started)) written out: two calls less per run)
            deadline = started + GIVE_BACK_AFTER if not self._outputs else self._first_deadline(started)
            if not self._armed or deadline < self._armed:
                self._alarm.set(deadline)
                self._armed = deadline
        return run

    def run_one(self, header: dict, frames: list) -> None:
        token = header["token"]
        self._busy = True
        state = self._state
        if state is not None:
            # token, then flag: a kill between the two (nanoseconds) reads as "that task ended" (it runs again)
            state[1:STATE_SIZE] = token.encode()[:STATE_SIZE - 1].ljust(STATE_SIZE - 1, b"\0")
            state[0] = 1
        try:
            self._run(header, frames, token)
        finally:
            self._busy = False
            if state is not None:
                state[0] = 0

    def _run(self, header: dict, frames: list, token: str) -> None:
        started_at = time.time()
        inputs = frames
        if header.get("mapped"):
            try:
                inputs = mapped_inputs(header, inputs)
            except Exception as exc:  # the data is gone or damaged: the retry path (maybe elsewhere)
                self._output(token=token, ok=False, raised=True, started_at=started_at, ended_at=time.time(),
                             error=f"cannot map the task's inputs from the broker's data socket: {exc}")
                return
        handler = TaskHandler(header, inputs, self.call)
        try:
            output = self.processor(handler)
        except Exception:
            # ArmoniK: an exception is not an Output: the task takes the retry path.
            self._output(token=token, ok=False, raised=True, error=traceback.format_exc(), started_at=started_at,
                         ended_at=time.time())
            return
        if not isinstance(output, Output):
            self._output(token=token, ok=False, raised=True, started_at=started_at, ended_at=time.time(),
                         error=f"processor returned {type(output).__name__}, expected armonik_zmq.worker.Output")
            return
        if output.error is None:  # success (``error?``: a success sends none)
            fields, frames = handler.output_message()
            self._output(frames, token=token, ok=True, started_at=started_at, ended_at=time.time(), **fields)
        else:
            self._output(token=token, ok=False, error=output.error, started_at=started_at, ended_at=time.time())
        if handler.report_before_freeing:
            with self._lock:
                self._flush()

    def serve(self) -> None:
        self.call(Op.WORKER_READY, pid=os.getpid())
        while True:
            header, frames = self._next_run()
            self.run_one(header, frames)


def _die_with_agent() -> None:
    """Have Linux SIGKILL this worker the moment its agent dies, even in the middle of a long task.

    Elsewhere the parent pid check in ``_receive`` still applies, between tasks.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(agent_path: str, processor_spec: str, state_path: str = "", agent_pid: Optional[int] = None) -> None:
    _die_with_agent()
    # An agent that died between starting this process and the prctl above sent no signal: this process is
    # already an orphan, and os.getppid() names its new parent, so compare with the pid the agent gave.
    if agent_pid is not None and os.getppid() != agent_pid:
        print(f"armonik-zmq worker: agent {agent_pid} is gone (parent is {os.getppid()}): exiting", file=sys.stderr)
        sys.exit(3)
    logging.basicConfig(level=os.environ.get("ARMONIK_ZMQ_LOG", "WARNING"),
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    hostmem.prefer_small_pages_for_arrays()  # before the processor's module imports numpy
    try:
        processor = load_processor(processor_spec)
    except ValueError as exc:
        print(f"armonik-zmq worker: {exc}", file=sys.stderr)
        sys.exit(2)
    runtime = WorkerRuntime(agent_path, processor, state_path, agent_pid)
    try:
        runtime.serve()
    except KeyboardInterrupt:
        pass
    except LinkClosed as exc:
        raise SystemExit(f"the agent is gone ({exc}): worker exiting") from None
