"""The agent (ArmoniK's polling agent, without the polling): one per node or worker group.

It registers with the broker's backend and declares a capacity (workers x per-worker window); the
broker then pushes tasks while the agent has credit. For each task it checks the preconditions,
prefetches inputs that did not travel inside the DISPATCH, queues the task at a worker, answers the
worker's requests (new results, data, subtasks) from local buffers, and reports the outcome. Reports
go out once per loop turn, batched.
"""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import logging
import math
import os
import select
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections import deque
from typing import Callable, Optional

import zmq

from ..broker.options import merge as merge_options
from ..config import AgentConfig
from ..ids import new_id
from ..security import ClientKeys
from ..protocol import (DATA_CHUNK_MAX_SIZE, MAX_HEADER_SIZE, WORKER_OPS, ErrorCode, Op, ProtocolError, decode_header,
                        envelope_of, reply_error, reply_ok, request, split_frames, validate)
from .. import shm
from ..status import ResultStatus, SessionStatus, TaskStatus
from ..worker.link import Link, LinkClosed, peer_pid
from ..unixlink import LinkDealer, is_link
from ..zmqio import readable, recv_message, send_message
from .pool import WorkerPool, WorkerProc, run_below

log = logging.getLogger(__name__)

#: stands for an input the worker maps from the broker's data socket (no bytes at the agent)
_MAPPED = object()


_tokens = itertools.count(1)

#: numbers compared on every lone task's way, as ints: an enum member's lookup is one more object to wake up cold
_DISPATCH, _STOP_TASKS = int(Op.DISPATCH), int(Op.STOP_TASKS)
_DISPATCHED, _RUNNING = int(TaskStatus.DISPATCHED), int(SessionStatus.RUNNING)

#: tasks whose runs average less than this (seconds) are queued deeper at workers (``Agent._depth``)
TINY_RUN = 0.001
#: the start of a task is reported once it has run this long (seconds); a task that ends first has its start
#: carried by its completion: one broker turn (one commit) on a short task's way to its result instead of two
#: in a row, and one row write per task of a batch of short ones instead of two
START_REPORT_DELAY = 0.002
#: the same while tasks are tiny (``TINY_RUN``): they travel to workers in batches and their outputs come back
#: in batches, a few milliseconds after the agent marked the first of a batch started
TINY_START_REPORT_DELAY = 0.010
#: a due start whose worker does not run the task yet (or any more) is looked at again this much later
START_RECHECK = 0.01
#: seconds tasks must run longer than TINY_RUN before the agent asks for its own capacity back (and hands back
#: what it holds beyond it): one task slowed down by a loaded machine does not bounce hundreds of tasks
CAPACITY_HOLD = 0.5
#: TASKS_DONE messages of ``report_max`` completions an agent may have unacknowledged: enough for the completions
#: of all the tasks it holds while they are tiny (``tiny_prefetch`` 512 beyond its workers' queues)
REPORTS_IN_FLIGHT = 16
#: bytes of replies a connection to the worker socket that is not a worker's may leave unread before it is closed
LINK_PENDING_MAX = 16 << 20


def _oldest_due(starts: dict) -> float:
    """When the first of the unreported starts ``starts`` is due."""
    return min(starts.values())[0] if starts else math.inf  # (entries are (due, [...]): the first due is the least)


def _queued(proc: WorkerProc) -> int:
    return len(proc.queue)


def _new_token() -> str:
    """A fresh run token: a counter is enough, as a worker's message must also come from the worker
    whose running task holds it (``_task_of``); uuid4 cost more than the rest of the task's setup."""
    return f"{next(_tokens):x}"


class LocalTask:
    """A task this agent holds, from DISPATCH until its report is acknowledged."""

    __slots__ = ("msg", "task_id", "attempt", "data", "token", "worker", "created_results",
                 "results", "result_frames", "subtasks", "fetched_at", "started_at", "mapped")

    def __init__(self, msg: dict):
        self.msg = msg
        self.task_id: str = msg["task_id"]
        self.attempt: int = msg["attempt"]
        #: input data by result id (payload and dependencies)
        self.data: dict[str, object] = {}
        #: some inputs are segments the worker maps itself (``_MAPPED`` in ``data``)
        self.mapped = False
        self.token = _new_token()
        self.worker: Optional[WorkerProc] = None
        # What the worker produced, committed by the broker only if the task ends OK.
        self.created_results: list[dict] = []
        self.results: list[dict] = []
        self.result_frames: list = []
        self.subtasks: list[dict] = []
        self.fetched_at: Optional[float] = None
        self.started_at: Optional[float] = None

    def inputs(self) -> list[str]:
        return list(dict.fromkeys([self.msg["payload_id"], *self.msg["data_dependencies"]]))


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        #: the nice value in effect, set before any thread or worker starts (they inherit it)
        self.nice = run_below(config.nice)
        self.agent_id = config.agent_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.hostname = socket.gethostname()
        #: the capacity it registers with; more while tasks are tiny (``_capacity``)
        self.capacity = config.workers * (1 + config.window) + config.prefetch
        #: the capacity last asked for (registration or heartbeat), and since when ``_capacity`` says otherwise
        self._asked = self.capacity
        #: the capacity while tasks are tiny (``_capacity``), or ``capacity`` if it is not more
        #: ``_depth()`` while tasks are tiny
        self._tiny_depth = 1 + max(config.window, config.tiny_window) if config.window else 1
        self._tiny_capacity = (config.workers * self._tiny_depth + config.tiny_prefetch
                               if config.tiny_prefetch > config.prefetch else self.capacity)
        self._differs_since: Optional[float] = None
        #: CURVE keys to reach the broker (None: NULL security)
        self.keys = ClientKeys.from_options(config.server_key or None, config.agent_secret or None,
                                            "--server-key", "--agent-secret")
        self.ctx = zmq.Context()
        self._sockdir = tempfile.mkdtemp(prefix="armonik-zmq-agent-")  # mkdtemp makes it 0700
        #: the Unix socket workers connect to (worker/link.py), and the links accepted on it, by fd
        self.worker_path = os.path.join(self._sockdir, "workers")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.worker_path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.links: dict[int, Link] = {}
        self.pool = WorkerPool(config.workers, self.worker_path, config.processor, config.worker_env,
                               state_dir=self._sockdir)
        #: the connection to the broker: a DEALER, or on this host a Unix-socket link (unixlink.py)
        self.broker: Optional[zmq.Socket | LinkDealer] = None
        self._broker_fd = -1
        self.tasks: dict[str, LocalTask] = {}
        self.by_token: dict[str, LocalTask] = {}
        self.ready: deque[str] = deque()
        #: (time.monotonic() deadline, token) of each task started on a worker, soonest first. Entries of
        #: tasks that ended are skipped when they come up, and swept when they outnumber the live ones.
        self._deadlines: list[tuple[float, str]] = []
        self._rids = itertools.count(1)
        self._pending: dict[int, Callable[[dict, list], None]] = {}
        #: starts not reported yet, by task id: (time.monotonic() when due at the broker, [task_id, attempt,
        #: started_at]); a task that ends drops its own (its completion carries the start)
        self._started: dict[str, tuple[float, list]] = {}
        self._done: list[tuple[dict, list]] = []
        self._released: list = []
        #: [task_id, attempt] the broker asked to stop (STOP_TASKS) and that run nowhere here any more
        self._stopped: list = []
        #: tasks to stop that are queued at a worker behind its running task: their RUN is already there,
        #: so the worker is killed when it would start them
        self._stopping: set[str] = set()
        #: tasks cancelled without force that are at a worker: they run to their end, then their outcome is
        #: dropped and they are reported stopped
        self._discarding: set[str] = set()
        #: reports sent but not acknowledged, by rid: sent again if the broker forgets us
        self._unacked: dict[int, tuple[str, list]] = {}
        self.registered = False
        self._running = False
        self._last_heard = time.monotonic()
        self._next_heartbeat = 0.0
        self._next_register = 0.0
        self._backoff = 0.5
        self.heartbeat_interval = 1.0
        self.lease = 5.0
        self.data_chunk_max_size = DATA_CHUNK_MAX_SIZE
        #: where the broker takes shared-memory results (data_socket, host_id, shm_threshold), if it does
        self.shm_config: dict = {}
        #: what every RUNS tells the worker (built once: it changes with a registration only)
        self._run_configuration = {"data_chunk_max_size": DATA_CHUNK_MAX_SIZE, "keep": config.window}
        #: the broker's data socket, when it is on this host: large inputs are then mapped by the worker
        self._data: Optional[shm.DataChannel] = None
        self.stats = {"completed": 0, "failed": 0, "released": 0, "refused": 0, "discarded": 0}
        #: moving average of the run time of tasks (seconds, from the workers' W_OUTPUTS); unknown = long
        self._run_avg = 1.0
        #: tokens of the outputs of the W_OUTPUTS being handled: those tasks already ended on their worker
        self._ended: set = set()

    # -- broker connection ------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.broker is not None:
            self.poller.unregister(self._broker_fd)
            self.broker.close(linger=0)
        if is_link(self.config.broker):
            # reconnects by itself (to the restarted broker: the next heartbeat's UNKNOWN_AGENT then
            # registers again, as over ZeroMQ); its fd stays the same
            self.broker = link = LinkDealer(self.config.broker, self.agent_id.encode())
            self._broker_send, self._broker_readable, self._broker_recv = link.send, link.readable, link.recv
            self._broker_waiting = link.waiting  # level-triggered: the poll tells of what the socket holds
            self._broker_fd = link.fileno()
            self.poller.register(self._broker_fd, select.EPOLLIN)
            self._connected()
            return
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        if self.keys is None:
            self.broker.setsockopt(zmq.IDENTITY, self.agent_id.encode())
        else:
            # With CURVE the broker never hands a live routing id over to a new connection, so each
            # connection gets its own: a reconnection is never refused because the old one lingers.
            self.keys.apply(self.broker)
            self.broker.setsockopt(zmq.IDENTITY, f"{self.agent_id}/{uuid.uuid4().hex[:8]}".encode())
        self.broker.setsockopt(zmq.SNDHWM, 0)
        self.broker.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        self.broker.connect(self.config.broker)
        # Waited for as a plain fd, with the workers' links: ZeroMQ signals on it that the socket's state may
        # have changed (edge-like), so the loop checks EVENTS before it sleeps and reads while there is input.
        self._broker_fd = self.broker.getsockopt(zmq.FD)
        self.poller.register(self._broker_fd, select.EPOLLIN)
        self._broker_send = self._send_zmq
        self._broker_readable = self._broker_waiting = functools.partial(readable, self.broker)
        self._broker_recv = functools.partial(recv_message, self.broker)
        self._connected()

    def _connected(self) -> None:
        """A new connection to the broker: what the old one had in flight is asked or sent again."""
        self._pending.clear()
        self.registered = False
        # Whatever the old socket had not had acknowledged goes out again on the new one.
        for kind, items in self._unacked.values():
            (self._done if kind == "done" else self._released).extend(items)
        self._unacked.clear()

    def _call(self, op: Op, data=(), on_reply: Optional[Callable[[dict, list], None]] = None, **fields) -> int:
        """Send a request (header fields + ``data`` frames) to the broker; ``on_reply`` gets its reply."""
        rid = next(self._rids)
        if on_reply is not None:
            self._pending[rid] = on_reply
        self._broker_send([request(op, rid, agent_id=self.agent_id, **fields), *data])
        return rid

    def _send_zmq(self, frames: list) -> None:
        try:
            send_message(self.broker, frames, copy=False)
        except zmq.Again:  # no pipe to the broker yet (never seen with SNDHWM 0): wait for one, as pyzmq's send does
            self.broker.send_multipart(frames, copy=False)

    def _register(self) -> None:
        mono = time.monotonic()
        if mono < self._next_register:
            return
        # Capped exponential backoff while the broker does not answer (zguide's Paranoid Pirate).
        # A new socket only when the previous attempt got no answer in time: a reply may still be on its way.
        self._next_register = mono + self._backoff
        self._backoff = min(self._backoff * 2, self.config.reconnect_max)
        self._connect()
        holds = self._holds()
        self._asked = self._capacity()
        self._call(Op.AGENT_REGISTER, on_reply=self._on_registered, capacity=self._asked,
                   partitions=list(self.config.partitions), hostname=self.hostname, pid=os.getpid(),
                   holds=holds, acks_inline=True)

    def _holds(self) -> list:
        """The attempts to re-announce: every task held (running or not), and every finished one not yet reported.

        The broker keeps those it still gives to this agent, and pushes STOP_TASKS for the others.
        """
        holds = [[t.task_id, t.attempt, t.started_at is not None] for t in self.tasks.values()]
        holds += [[c["task_id"], c["attempt"], True] for c, _ in self._done]
        return holds

    def _on_registered(self, header: dict, frames: list) -> None:
        self.registered = True
        self._backoff = 0.5
        self.heartbeat_interval = header["heartbeat_interval"]
        self.lease = header["lease"]
        self.data_chunk_max_size = header["data_chunk_max_size"]
        self.shm_config = {k: header[k] for k in ("data_socket", "host_id", "shm_threshold") if k in header}
        self._run_configuration = {"data_chunk_max_size": self.data_chunk_max_size, "keep": self.config.window,
                                   **self.shm_config}
        self._last_heard = time.monotonic()
        log.info("agent %s registered with %s (%d slots, %d attempt(s) kept)", self.agent_id, self.config.broker,
                 self.capacity, header.get("kept", 0))
        # Fetches in flight on the previous socket were lost with it: ask again.
        for task in list(self.tasks.values()):
            if task.fetched_at is None:
                self._prefetch(task, [rid for rid in task.inputs() if rid not in task.data])

    def _on_broker_message(self, frames: list) -> None:
        self._last_heard = time.monotonic()
        try:
            header = decode_header(frames[0].bytes)
        except ProtocolError as exc:
            log.error("undecodable message from the broker ignored: %s", exc)
            return
        op = header["op"]
        if op == _DISPATCH:
            self._on_dispatch(header, frames[1:])
        elif op == _STOP_TASKS:
            self._on_stop(header["tasks"], header.get("force", True))
        else:
            self._on_reply(header, frames[1:])
        # Replies to our TASKS_DONE the broker held for this push (we registered with acks_inline): after it,
        # as they came when they travelled on their own.
        for ack in header.get("acks", ()):
            if type(ack) is dict and type(ack.get("rid")) is int and type(ack.get("op")) is int:
                self._on_reply(ack, [])
            else:
                log.error("malformed acknowledgement inside a broker message ignored: %r", ack)

    def _on_reply(self, header: dict, frames: list) -> None:
        """A reply to one of our requests: to its callback (``frames``: its data frames)."""
        callback = self._pending.pop(header["rid"], None)
        err = header.get("error")
        if err is not None:
            if err.get("code") == ErrorCode.UNKNOWN_AGENT:
                if self.registered:
                    log.warning("broker does not know this agent (restarted?): registering again")
                    self._next_register = 0.0
                    self.registered = False
                return
            self._unacked.pop(header["rid"], None)  # refused for good: sending it again would not help
            log.error("broker refused %s: [%s] %s", Op(header["op"]).name if header["op"] in Op._value2member_map_ else header["op"],
                      err.get("code"), err.get("message"))
            if header["op"] == Op.FETCH_DATA and callback is not None:
                callback(header, [])
            return
        if callback is not None:
            callback(header, [f.buffer for f in frames])

    # -- tasks from the broker ----------------------------------------------------------------------

    def _on_dispatch(self, header: dict, frames: list) -> None:
        if not self.registered:
            # Sent to the registration our pending REGISTER replaces: the broker answers a REGISTER before it
            # dispatches to it, and it queues again whatever the REGISTER does not announce. These tasks reach
            # the new socket because it took over the routing id; running one, even briefly, would be a second
            # execution of the attempt the broker hands out again.
            log.info("%d task(s) dispatched to the previous registration: dropped", len(header["tasks"]))
            return
        counts = header["frames"]
        # one task (a lone one) takes every frame: split_frames only checks that
        groups = (frames,) if len(counts) == 1 and counts[0] == len(frames) else split_frames(frames, counts)
        options = header["options"]  # each distinct options map once; a task names its own by index
        for msg, data in zip(header["tasks"], groups):
            msg["options"] = options[msg["options"]]
            held = self.tasks.get(msg["task_id"])
            if held is not None:
                # A restarted broker gave us back a task we are still running: keep running it, under
                # the new attempt, so that our report is the one the broker now expects.
                log.info("task %s dispatched again (attempt %d): still running it here", held.task_id, msg["attempt"])
                held.attempt = msg["attempt"]
                held.msg = msg
                continue
            task = LocalTask(msg)
            self.tasks[task.task_id] = task
            for rid, frame in zip(msg["inline"], data):
                task.data[rid] = frame.buffer
            reason = self._precondition_failure(task)
            if reason is not None:
                self._release(task, reason)
                continue
            if msg["data_dependencies"]:
                missing = [rid for rid in task.inputs() if rid not in task.data]
            else:  # (most tasks: the payload alone, inline)
                missing = [] if msg["payload_id"] in task.data else [msg["payload_id"]]
            if missing:
                self._prefetch(task, missing)
            else:
                task.fetched_at = time.time()
                self.ready.append(task.task_id)

    def _precondition_failure(self, task: LocalTask) -> Optional[str]:
        """Check what ArmoniK's agent checks before running a task; return why not, or None."""
        msg = task.msg
        if msg["status"] != _DISPATCHED:
            return f"task is {TaskStatus(msg['status']).name}, not DISPATCHED"
        if msg["session_status"] != _RUNNING:
            return f"session is {SessionStatus(msg['session_status']).name}"
        retries = len(msg["retry_of_ids"])
        if retries > msg["options"]["max_retries"]:
            return f"retries exhausted ({retries} > max_retries {msg['options']['max_retries']})"
        return None

    def _prefetch(self, task: LocalTask, missing: list[str]) -> None:
        """Fetch inputs too large to travel inside DISPATCH, before a worker is free.

        Inputs that are shared-memory segments of a broker on this host are not fetched: the worker
        maps them (they reach it by descriptor, never as bytes).
        """
        mapped = self._mapped_inputs(task.msg["session_id"], missing)
        if mapped:
            task.mapped = True
            for rid in mapped:
                task.data[rid] = _MAPPED
            missing = [rid for rid in missing if rid not in mapped]
            if not missing:
                task.fetched_at = time.time()
                self.ready.append(task.task_id)
                return

        def on_data(header: dict, frames: list) -> None:
            if self.tasks.get(task.task_id) is not task:
                return
            if "error" in header:
                self._release(task, f"input data unavailable: {header['error'].get('message')}")
                return
            for rid, group in zip(header["result_ids"] if "result_ids" in header else missing,
                                  split_frames(frames, header["frames"])):
                # A large input comes in chunks: one copy joins them (the worker gets it in one frame).
                task.data[rid] = group[0] if len(group) == 1 else b"".join(group)
            task.fetched_at = time.time()
            self.ready.append(task.task_id)

        self._call(Op.FETCH_DATA, on_reply=on_data, session_id=task.msg["session_id"], result_ids=missing)

    def _mapped_inputs(self, session_id: str, result_ids: list[str]) -> set:
        if not self.shm_config:
            return set()
        if self._data is None:
            self._data = shm.DataChannel.open(self.shm_config)
            if self._data is None:
                return set()
        try:
            return self._data.segments(session_id, result_ids)
        except (OSError, shm.DataError) as exc:  # the broker restarted: fetch this time, reconnect next time
            log.info("data socket unusable (%s): fetching inputs over the socket", exc)
            self._data.close()
            self._data = None
            return set()

    def _release(self, task: LocalTask, reason: str) -> None:
        log.info("releasing task %s: %s", task.task_id, reason)
        self._released.append([task.task_id, task.attempt, reason])
        self._forget(task)
        self.stats["released"] += 1

    def _forget(self, task: LocalTask) -> None:
        self.tasks.pop(task.task_id, None)
        self._started.pop(task.task_id, None)
        self.by_token.pop(task.token, None)
        self._stopping.discard(task.task_id)
        self._discarding.discard(task.task_id)

    def _on_stop(self, items: list, force: bool = True) -> None:
        """Stop the attempts the broker no longer wants run (cancelled, paused), then report them stopped.

        One not at a worker yet is dropped; a running one has its worker killed; one queued behind the
        running task is dropped when its worker would start it (see ``_drop_if_stopping``). Without
        ``force``, one already at a worker runs to its end and is reported stopped then (``_finish``).
        """
        for task_id, attempt in items:
            task = self.tasks.get(task_id)
            if task is not None and task.attempt <= attempt and not force and task.worker is not None:
                self._discarding.add(task_id)
                log.info("task %s cancelled: its run goes on, its outcome will be dropped", task_id)
                continue
            if task is not None and task.attempt <= attempt:
                proc = task.worker
                if proc is not None and proc.queue and proc.queue[0] == task_id:
                    self._kill_running(task, "the broker no longer gives this agent that attempt (cancelled, paused, or "
                                               "taken back while the agent was unreachable): its result would be refused")
                    self._forget(task)
                elif proc is not None:
                    self._stopping.add(task_id)
                else:
                    self._forget(task)
                log.info("task %s stopped at the broker's request", task_id)
            self._stopped.append([task_id, attempt])

    def _abandon_all(self, silent_for: float) -> None:
        """Stop every task held: the broker has been silent longer than ``outage_tolerance``.

        Their reports would come too late to matter (the broker requeues what an agent does not re-announce in
        time), so the workers are freed for the work the broker hands out once it is back. Reports of tasks
        that finished stay queued: the broker takes those it still expects.
        """
        log.warning("no word from the broker for %.0fs (outage tolerance %gs): stopping the %d task(s) held",
                    silent_for, self.config.outage_tolerance, len(self.tasks))
        for task in list(self.tasks.values()):
            self._kill_running(task, "the broker is unreachable past the outage tolerance")
            self._forget(task)
        self.ready.clear()

    def _drop_if_stopping(self, task: LocalTask) -> bool:
        """Drop a task the broker stopped, about to start (killing its worker if the RUN reached it); say if so."""
        if task.task_id in self._discarding and task.worker is None:  # sent back by a dead worker before it ran
            self._stopped.append([task.task_id, task.attempt])
            self._forget(task)
            return True
        if task.task_id not in self._stopping or task.token in self._ended:
            return False  # one that already ended on its worker is reported stopped with its output (_finish)
        proc = task.worker
        if proc is not None and proc.queue and proc.queue[0] == task.task_id:
            self._kill_running(task, "it would start a task the broker stopped")
        self._forget(task)
        return True

    # -- workers ------------------------------------------------------------------------------------

    def _depth(self) -> int:
        """Tasks queued at each worker, the running one included.

        ``1 + window``; while tasks run shorter than ``TINY_RUN`` (their average), up to ``1 + tiny_window``:
        the worker then gets them in batches and reports them in batches (one message per several tasks
        each way), and a task waits behind the others at most a few milliseconds. A window of 0 stays 0.
        """
        if self._run_avg < TINY_RUN:
            return self._tiny_depth
        return 1 + self.config.window

    def _capacity(self) -> int:
        """The capacity to ask the broker for: with tasks shorter than ``TINY_RUN``, ``tiny_prefetch`` tasks held
        beyond those queued at workers. A broker turn (one commit) then takes hundreds of completions and
        hands out as many tasks, where with ``prefetch`` the agent's credit ran out between two turns. Not while
        every worker runs a long task (``slow``: it gave back what waited behind it): what the agent holds
        would wait for them, when another agent may be free."""
        if self._run_avg < TINY_RUN and self._tiny_capacity > self.capacity:
            for proc in self.pool.workers.values():  # (a loop, not all(): this runs on every turn of the loop)
                if not proc.slow:
                    return self._tiny_capacity
        return self.capacity

    def _capacity_changed(self, mono: float) -> bool:
        """Whether to ask for another capacity now: more at once, less once tasks ran long for CAPACITY_HOLD."""
        wanted = self._capacity()
        if wanted == self._asked:
            self._differs_since = None
            return False
        if self._differs_since is None:
            self._differs_since = mono
        return wanted > self._asked or mono - self._differs_since >= CAPACITY_HOLD

    def _heartbeat(self, mono: float) -> None:
        """Tell the broker we are alive, with the capacity to ask for when it changed.

        Asking for less, the agent also hands back (TASKS_RELEASE) the tasks it holds beyond it that no worker
        has: they were taken while tasks were tiny, and other agents may run them sooner.
        """
        self._next_heartbeat = mono + self.heartbeat_interval
        fields = {}
        if self._capacity_changed(mono):
            self._asked = fields["capacity"] = self._capacity()
            self._differs_since = None
        self._call(Op.AGENT_HEARTBEAT, on_reply=lambda h, f: None, **fields)
        if "capacity" not in fields:
            return
        extra = len(self.tasks) - self._asked
        while extra > 0 and self.ready:
            task = self.tasks.get(self.ready.pop())
            if task is not None:
                self._release(task, "handed back: its agent holds fewer tasks now that they run longer")
                extra -= 1

    def _assign(self) -> None:
        """Queue ready tasks at workers, least loaded first, several per RUNS message; payloads already there."""
        if not self.ready:
            return
        depth = self._depth()
        shallow = 1 + self.config.window
        # A deep queue is topped up once half empty: fewer, fuller RUNS (the worker still has half of it to run)
        refill = depth // 2 + 1 if depth > shallow else depth
        free = [p for p in self.pool.workers.values()
                if p.ready and len(p.queue) < (shallow if p.slow else refill)]
        if not free:
            return
        ready = self.ready
        if len(free) > 1:
            if len(ready) == 1:  # (a lone task: the least loaded worker, the first of equals as the sort gives)
                best = free[0]
                for proc in free:
                    if len(proc.queue) < len(best.queue):
                        best = proc
                free = [best]
            else:
                free.sort(key=_queued)
        for i, proc in enumerate(free):
            # An even share of what is ready for each worker with room, so that one worker's batch does not
            # take the tasks another one idles for.
            share = -(-len(ready) // (len(free) - i))
            most = min(share, (shallow if proc.slow else depth) - len(proc.queue))
            batch = []
            while ready and len(batch) < most:
                task = self.tasks.get(ready.popleft())
                if task is None or ((self._stopping or self._discarding) and self._drop_if_stopping(task)):
                    continue
                batch.append(task)
            if batch and not self._send_runs(proc, batch):
                return  # tried again on the next loop turn
            if not self.ready:
                return

    def _send_runs(self, proc: WorkerProc, tasks: list[LocalTask]) -> bool:
        """Send tasks to a worker in one RUNS; False if it could not take them (they are back in ``ready``)."""
        runs, counts, data = [], [], []
        # Each distinct options map travels once (the tasks of a batch mostly share theirs): the worker's
        # decoding of a tiny task's RUNS entry was mostly its options.
        options: list[dict] = []
        for task in tasks:
            msg = task.msg
            if not options or options[-1] != msg["options"]:
                options.append(msg["options"])
            run = {"token": task.token, "task_id": task.task_id, "session_id": msg["session_id"],
                   "payload_id": msg["payload_id"], "data_dependencies": msg["data_dependencies"],
                   "expected_output_ids": msg["expected_output_ids"], "options": len(options) - 1}
            deps = msg["data_dependencies"]
            inputs = [task.data[msg["payload_id"]], *[task.data[d] for d in deps]] if deps else [task.data[msg["payload_id"]]]
            # Not "_MAPPED in inputs": that compares every buffer input with it (~1 us each: 1 ms for a reduce's 1,000)
            if task.mapped:
                run["mapped"] = [rid for rid in task.inputs() if task.data[rid] is _MAPPED]
                inputs = [d for d in inputs if d is not _MAPPED]
            runs.append(run)
            counts.append(len(inputs))
            data.extend(inputs)
        # What the worker got in the last RUNS is not sent again (it keeps them): a lone task's RUNS was 1/3 these
        fields = {}
        if options != proc.sent_options:
            fields["options"] = proc.sent_options = options
        if self._run_configuration is not proc.sent_configuration:
            fields["configuration"] = proc.sent_configuration = self._run_configuration
        header = request(Op.RUNS, 0, runs=runs, frames=counts, **fields)
        if not self._send_to(proc.link, [header, *data]):
            # The worker's link broke before the agent read its end: the tasks wait for another worker. The
            # worker is killed, so that it is replaced for sure. Never let a worker's death take the agent down.
            log.warning("worker %d (pid %d) unreachable: %d task(s) wait for another worker", proc.index, proc.pid,
                        len(tasks))
            self.pool.kill(proc)
            self.ready.extendleft(task.task_id for task in reversed(tasks))
            return False
        for task in tasks:
            task.worker = proc
            self.by_token[task.token] = task
            proc.queue.append(task.task_id)
            if len(proc.queue) == 1:
                self._mark_started(task)
        return True

    def _mark_started(self, task: LocalTask) -> None:
        """Record that ``task`` now runs on its worker; its max_duration counts from here (ArmoniK: Process deadline)."""
        if (self._stopping or self._discarding) and self._drop_if_stopping(task):
            return
        task.started_at = time.time()
        mono = time.monotonic()
        delay = TINY_START_REPORT_DELAY if self._run_avg < TINY_RUN else START_REPORT_DELAY
        self._started.pop(task.task_id, None)  # one run again (its worker died) goes last
        self._started[task.task_id] = (mono + delay, [task.task_id, task.attempt, task.started_at])
        heapq.heappush(self._deadlines, (mono + task.msg["options"]["max_duration"], task.token))
        if len(self._deadlines) > 2 * len(self.by_token) + 64:
            self._deadlines = [d for d in self._deadlines if d[1] in self.by_token]
            heapq.heapify(self._deadlines)

    # -- worker links -------------------------------------------------------------------------------

    def _accept(self) -> None:
        """Take the connections waiting on the worker socket: workers (they say WORKER_READY), or any other
        process of this user that can reach the agent's private directory (answered like a worker)."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the connection waits for the next turn
                log.warning("cannot accept a worker connection: %s", exc)
                return
            sock.setblocking(False)
            # Frames a worker sends are cut at the data chunk size (or are headers): a bigger one is refused.
            link = Link(sock, max_frame=max(self.data_chunk_max_size, MAX_HEADER_SIZE))
            link.pid = peer_pid(sock)
            self.links[sock.fileno()] = link
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def _on_link_event(self, fd: int, event: int) -> None:
        link = self.links.get(fd)
        if link is None:
            return
        if event & select.EPOLLOUT:
            try:
                if link.flush():
                    self.poller.modify(fd, select.EPOLLIN)
            except LinkClosed:
                pass  # the read below finds the link closed
        for frames in link.read():
            self._on_worker_message(link, frames)
        if link.closed is not None:
            self._drop_link(link)

    def _send_to(self, link: Link, frames: list) -> bool:
        """Send a message on a worker link without waiting (what the socket does not take now goes once it
        can); False if the link is gone."""
        try:
            if not link.send(frames):
                if link.pending > LINK_PENDING_MAX and link not in self.pool.by_link:
                    raise LinkClosed("a peer that does not read its replies")
                self.poller.modify(link.fileno(), select.EPOLLIN | select.EPOLLOUT)
        except LinkClosed as exc:
            link.closed = link.closed or str(exc)
            return False
        return True

    def _drop_link(self, link: Link) -> None:
        """Close a link; a worker's means the worker is gone: its tasks are taken care of at once."""
        if link.malformed:
            log.warning("worker link of pid %d closed: %s", link.pid, link.closed)
            self._send_to(link, [reply_error(0, 0, ErrorCode.MALFORMED, f"link closed: {link.closed}")])
        fd = link.fileno()
        if self.links.pop(fd, None) is not None:
            self.poller.unregister(fd)
        link.close()
        proc = self.pool.by_link.get(link)
        if proc is None or self.pool.workers.get(proc.index) is not proc:
            return
        code = self.pool.lost(proc)
        if code is not None:  # else the reaper finds it dead later
            self._on_worker_death(proc, code)

    def _on_worker_message(self, link: Link, frames: list) -> None:
        raw = frames[0]
        try:
            header = decode_header(raw)
            op = validate(header, WORKER_OPS)
            reply = self._handle_worker(link, op, header, frames[1:])
        except ProtocolError as exc:
            op_num, rid = envelope_of(raw)
            reply = [reply_error(op_num, rid, exc.code, exc.message)]
        except Exception as exc:  # a bug: answer, log loudly, keep serving the other workers
            log.exception("request from worker pid %d failed inside the agent", link.pid)
            op_num, rid = envelope_of(raw)
            reply = [reply_error(op_num, rid, ErrorCode.INTERNAL, f"internal error in the agent: {exc!r}")]
        if reply is None:
            return  # an accepted W_OUTPUT: the worker does not wait for it, so no message at all
        if not self._send_to(link, reply):
            log.warning("reply to worker pid %d lost: %s", link.pid, link.closed)

    def _task_of(self, link: Link, token: str) -> LocalTask:
        task = self.by_token.get(token)
        proc = self.pool.by_link.get(link)
        if task is None or proc is None or not proc.queue or proc.queue[0] != task.task_id:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "unknown or stale task token")
        return task

    def _handle_worker(self, link: Link, op: Op, h: dict, frames: list) -> Optional[list]:
        if op is Op.W_OUTPUTS:  # (the one message of a task's run, most often)
            return self._on_outputs(link, h, frames)
        rid = h["rid"]
        if op == Op.WORKER_READY:
            # The pid the kernel saw connect, not only the one claimed: a worker's link is its own.
            proc = self.pool.on_ready(link, h["pid"]) if h["pid"] == link.pid else None
            if proc is None:
                raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"pid {h['pid']} is not a worker of this agent "
                                    "(or not the process on this connection)")
            return [reply_ok(op, rid)]
        task = self._task_of(link, h["token"])
        sid = task.msg["session_id"]
        now = time.time()
        if op == Op.W_CREATE_RESULTS_METADATA or op == Op.W_CREATE_RESULTS:
            rows = []
            if op == Op.W_CREATE_RESULTS:
                if len(h["frames"]) != len(h["names"]):
                    raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "'frames' must have one count per name")
                groups = split_frames(frames, h["frames"])
            for i, name in enumerate(h["names"]):
                rid_ = new_id()
                task.created_results.append({"result_id": rid_, "name": name})
                status = ResultStatus.CREATED
                if op == Op.W_CREATE_RESULTS:
                    task.results.append({"result_id": rid_, "frames": len(groups[i])})
                    task.result_frames.extend(groups[i])
                    status = ResultStatus.COMPLETED
                rows.append({"result_id": rid_, "name": name, "session_id": sid, "status": int(status),
                             "created_at": now, "created_by": task.task_id, "owner_task_id": "",
                             "completed_at": now if status == ResultStatus.COMPLETED else None,
                             "size": sum(len(f) for f in groups[i]) if op == Op.W_CREATE_RESULTS else 0,
                             "opaque_id": b"", "manual_deletion": False})
            return [reply_ok(op, rid, results=rows)]
        if op == Op.W_SEND_RESULTS:
            self._keep_results(task, h, frames)
            return [reply_ok(op, rid)]
        if op == Op.W_SUBMIT_TASKS:
            infos = []
            for t in h["tasks"]:
                # Pre-merge the request's options so each subtask carries its own (task > request).
                opts = merge_options(t.get("options"), h.get("task_options")) if (t.get("options") or h.get("task_options")) else None
                sub = {"task_id": new_id(), "payload_id": t["payload_id"],
                       "expected_output_ids": t["expected_output_ids"],
                       "data_dependencies": t.get("data_dependencies", []), "options": opts}
                task.subtasks.append(sub)
                infos.append({k: sub[k] for k in ("task_id", "payload_id", "data_dependencies", "expected_output_ids")})
            return [reply_ok(op, rid, tasks=infos)]
        if op == Op.W_OUTPUT:
            if "result_ids" in h:
                self._keep_results(task, h, frames)
            for seg in h.get("segments", ()):  # handed to the broker's data socket: only the reference travels
                task.results.append({"result_id": seg["result_id"], "frames": 0, "segment": seg["segment"]})
            self._finish(task, h["ok"], h.get("error"), h.get("raised", False))
            return None
        raise ProtocolError(ErrorCode.UNIMPLEMENTED, f"op {op.name} is not served by the agent")

    def _on_outputs(self, link: Link, h: dict, frames: list) -> Optional[list]:
        """The outputs of consecutive runs of one worker, in order; refused ones are answered in one error."""
        outputs, returned = h["outputs"], h.get("returned", ())
        if not outputs and not returned:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "W_OUTPUTS carries no output and gives back no run")
        if len(outputs) == 1:  # (a lone task's: no comprehension to run, each one more code to wake up cold)
            count = sum(outputs[0].get("frames", ()))
            groups = (frames,) if count == len(frames) else split_frames(frames, [count])
        else:
            groups = split_frames(frames, [sum(o.get("frames", ())) for o in outputs])
        proc = self.pool.by_link.get(link)
        if proc is not None and outputs:
            proc.slow = False
        refused = self._take_back(proc, returned) if returned else []
        self._ended = {outputs[0]["token"]} if len(outputs) == 1 else {o["token"] for o in outputs}
        try:
            for o, group in zip(outputs, groups):
                try:
                    task = self._task_of(link, o["token"])
                    if "result_ids" in o:
                        self._keep_results(task, o, group)
                except ProtocolError as exc:
                    refused.append(f"{o['token']}: {exc.message}")
                    continue
                for seg in o.get("segments", ()):
                    task.results.append({"result_id": seg["result_id"], "frames": 0, "segment": seg["segment"]})
                started, ended = o.get("started_at"), o.get("ended_at")
                if started is not None and ended is not None:
                    task.started_at = started  # the worker's clock: the task may have waited here unnoticed
                    self._run_avg += 0.2 * (max(0.0, ended - started) - self._run_avg)
                self._finish(task, o["ok"], o.get("error"), o.get("raised", False), processed_at=ended)
        finally:
            self._ended = set()
        if refused:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"{len(refused)} of {len(outputs) + len(returned)} "
                                "outputs and runs given back refused: " + "; ".join(refused))
        return None

    def _take_back(self, proc: Optional[WorkerProc], tokens: list) -> list[str]:
        """Runs a worker gives back unstarted (they were queued behind a long task): other workers take them.

        Return why each token not queued at this worker (a stale or made-up one) is refused.
        """
        if proc is None:
            return [f"{token}: not a worker of this agent" for token in tokens]
        proc.slow = True
        wanted = set(tokens)
        back = [task for task in (self.tasks.get(task_id) for task_id in proc.queue)
                if task is not None and task.token in wanted and task.worker is proc]
        found = {task.token for task in back}
        refused = [f"{token}: unknown or stale run token" for token in tokens if token not in found]
        if not back:
            return refused
        ids = {task.task_id for task in back}
        kept = [task_id for task_id in proc.queue if task_id not in ids]
        proc.queue.clear()
        proc.queue.extend(kept)
        self._requeue(back)
        return refused

    @staticmethod
    def _keep_results(task: LocalTask, h: dict, frames: list) -> None:
        """Buffer result data until the task's completion report."""
        counts, ids = h.get("frames", ()), h["result_ids"]
        if len(counts) != len(ids):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "'frames' must have one count per result id")
        if len(ids) == 1 and counts[0] == len(frames):  # (a function's one result: every frame is its own)
            task.results.append({"result_id": ids[0], "frames": counts[0]})
            task.result_frames.extend(frames)
            return
        for result_id, group in zip(ids, split_frames(frames, counts)):
            task.results.append({"result_id": result_id, "frames": len(group)})
            task.result_frames.extend(group)

    def _finish(self, task: LocalTask, ok: bool, error: Optional[str], raised: bool, timeout: bool = False,
                processed_at: Optional[float] = None) -> None:
        """Turn the worker's output into a completion report; start the worker's next task.

        ``raised``: the processor raised or its worker died (the broker retries the task); ``timeout``: it ran
        past its max_duration (TIMEOUT); neither: it returned Output(error) (ERROR).
        """
        timestamps = {"processed_at": processed_at or time.time()}
        if task.fetched_at is not None:
            timestamps["fetched_at"] = task.fetched_at
        if task.started_at is not None:
            timestamps["started_at"] = task.started_at
        completion = {"task_id": task.task_id, "attempt": task.attempt, "ok": ok, "timestamps": timestamps}
        frames: list = []
        # Cancelled without force, or stopped while queued behind a task at its worker, which ran it before
        # the agent heard the previous one had ended (batched outputs): the run ended, nothing to report.
        if task.task_id in self._discarding or task.task_id in self._stopping:
            self._stopped.append([task.task_id, task.attempt])
            self.stats["discarded"] += 1
        elif ok:
            # empty lists are left out: the broker decodes a short task's completion for less
            if task.results:
                completion["results"] = task.results
            if task.created_results:
                completion["created_results"] = task.created_results
            if task.subtasks:
                completion["subtasks"] = task.subtasks
            frames = task.result_frames
            self.stats["completed"] += 1
        else:
            completion.update(error=error or "task failed", raised=raised, timeout=timeout)
            self.stats["failed"] += 1
        if task.task_id not in self._discarding and task.task_id not in self._stopping:
            self._done.append((completion, frames))
        proc = task.worker
        if proc is not None and proc.queue and proc.queue[0] == task.task_id:
            proc.queue.popleft()
            if proc.queue:
                nxt = self.tasks.get(proc.queue[0])
                if nxt is not None:
                    self._mark_started(nxt)
        self._forget(task)

    def _on_worker_death(self, proc: WorkerProc, code: int) -> None:
        """A dead worker fails the task it was running (retry path); the others queued there run elsewhere."""
        running = self._take_tasks_off(proc, self.pool.run_state(proc))
        self.pool.forget_state(proc)
        if running is not None:
            self._finish(running, False, f"worker process {proc.pid} died (exit code {code}) while running the task",
                         raised=True)

    def _take_tasks_off(self, proc: WorkerProc, state: Optional[tuple[str, bool]]) -> Optional[LocalTask]:
        """Empty the queue of a worker that died or is being killed; return the task it was running.

        ``state`` is the worker's run state (``WorkerPool.run_state``): outputs travel in batches, so the
        task the worker was running may come after others that ended but were not reported yet. Without it
        the first task of the queue is taken as the running one. The others go back to the front of the
        ready queue, in order, under a fresh token (a late message about their old run is then refused);
        those that had ended run again (their outputs died with the worker).
        """
        queued = [self.tasks.get(task_id) for task_id in proc.queue]
        proc.queue.clear()
        at = 0
        if state is not None:
            token, running = state
            found = next((i for i, task in enumerate(queued) if task is not None and task.token == token), None)
            if found is not None:
                at = found if running else found + 1
        running = queued[at] if at < len(queued) else None
        self._requeue([task for i, task in enumerate(queued) if i != at and task is not None])
        if running is not None:
            running.worker = None
        return running

    def _requeue(self, tasks: list[LocalTask]) -> None:
        """Put tasks taken off a worker back at the front of the ready queue, in order, under fresh tokens."""
        for task in tasks:
            self.by_token.pop(task.token, None)
            task.token = _new_token()
            task.worker = None
        self.ready.extendleft(task.task_id for task in reversed(tasks))

    def _kill_running(self, task: LocalTask, reason: str) -> None:
        """Stop a task that is running on a worker by killing that worker (SIGKILL to its process group).

        The caller reports the task (``_finish``) or drops it (``_forget``). The tasks queued behind it go back
        to the ready queue, and the pool starts a replacement worker at its next reap.
        """
        proc = task.worker
        if proc is None or not proc.queue or proc.queue[0] != task.task_id:
            return
        state = self.pool.run_state(proc)  # before the kill: a dying worker writes nothing more
        log.warning("task %s: killing worker process %d: %s", task.task_id, proc.pid, reason)
        self.pool.kill(proc)
        running = self._take_tasks_off(proc, state)
        if running is not None and running is not task:
            # The task had ended (its output was on its way) and the worker was running a later one: that
            # one runs again elsewhere.
            self._requeue([running])

    def _expire_deadlines(self, mono: float) -> None:
        """End in TIMEOUT every running task past its max_duration (ArmoniK: no retry)."""
        while self._deadlines and self._deadlines[0][0] <= mono:
            _, token = heapq.heappop(self._deadlines)
            task = self.by_token.get(token)
            proc = task.worker if task is not None else None
            if proc is None or not proc.queue or proc.queue[0] != task.task_id:
                continue
            message = f"task exceeded its max_duration of {task.msg['options']['max_duration']:g}s"
            self._kill_running(task, message)
            self._finish(task, False, f"{message}: worker process {proc.pid} killed", raised=False, timeout=True)

    # -- reporting ----------------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self.registered:
            return
        # A task that ends before its start is reported needs no STARTED: its completion carries started_at,
        # and the broker passes it through PROCESSING on the way (one row write, and no turn of its own for a
        # lone task). So starts go out once the first is due (START_REPORT_DELAY, TINY_START_REPORT_DELAY):
        # short tasks, alone or in batches, never have theirs reported.
        if self._started and time.monotonic() >= _oldest_due(self._started):
            self._report_starts()
        if self._released:
            released, self._released = self._released, []
            rid = self._call(Op.TASKS_RELEASE, on_reply=self._on_ack, tasks=released)
            self._unacked[rid] = ("released", released)
        if self._done:
            self._report_done()
        if self._stopped:
            # Not re-sent after a reconnection: a broker that lost us finishes the cancellation itself.
            self._call(Op.TASKS_STOPPED, tasks=self._stopped)
            self._stopped = []

    def _report_done(self) -> None:
        """Send the completions waiting, in TASKS_DONE messages of at most ``report_max``.

        The broker handles a message in one piece, and a client's request that comes meanwhile waits for
        it: a report of 500 tiny tasks' completions held a submit for 9-18 ms. Cut at ``report_max``, the
        broker looks for clients between the pieces. A full piece goes at once (up to ``REPORTS_IN_FLIGHT``
        unacknowledged), so the broker finds the next one waiting when it ends a turn; fewer wait for the
        acknowledgements in flight (the broker's next commit) and go out together: the batch size follows
        the broker's pace, and a lone task is still reported at once.
        """
        most = self.config.report_max
        in_flight = sum(kind == "done" for kind, _ in self._unacked.values()) if self._unacked else 0
        while self._done and (not in_flight or (len(self._done) >= most and in_flight < REPORTS_IN_FLIGHT)):
            done, self._done = self._done[:most], self._done[most:]
            if len(done) == 1:  # (a lone task's: no comprehension to run)
                rid = self._call(Op.TASKS_DONE, done[0][1], on_reply=self._on_ack, tasks=[done[0][0]])
            else:
                frames = [f for _, fs in done for f in fs]
                rid = self._call(Op.TASKS_DONE, frames, on_reply=self._on_ack, tasks=[c for c, _ in done])
            self._unacked[rid] = ("done", done)
            in_flight += 1

    def _report_starts(self) -> None:
        """Report the starts not reported yet (one is due) of the tasks their workers run now; look at the others
        again ``START_RECHECK`` later.

        The agent marks a task started when its worker should take it up (the outputs before it came back), but
        with outputs in batches the worker may have ended it already, and a loaded machine may not have run the
        worker yet: its run state (the worker's mapped file) tells. A task that ended is reported by its output
        (which carries its start), and a start reported for it would cost the broker a turn and a commit of its
        own (15-75 per 20,000 tiny tasks at load 5-9)."""
        started, self._started = self._started, {}
        recheck = time.monotonic() + START_RECHECK
        starts = []
        for task_id, entry in started.items():
            task = self.tasks.get(task_id)
            if task is not None and task.worker is not None and self.pool.running(task.worker, task.token) is False:
                self._started[task_id] = (recheck, entry[1])
            else:
                starts.append(entry[1])
        if starts:
            self._call(Op.TASKS_STARTED, tasks=starts)

    def _on_ack(self, header: dict, frames: list) -> None:
        self._unacked.pop(header["rid"], None)
        for task_id, code, message in header.get("refused", ()):
            self.stats["refused"] += 1
            log.warning("broker refused the report of task %s: [%s] %s", task_id, ErrorCode(code).name, message)

    # -- loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()`` or SIGINT/SIGTERM."""
        # epoll: the fds stay registered between waits (poll(2) hooks itself on each of them at every wait)
        self.poller = select.epoll()
        listener = self.listener.fileno()
        self.poller.register(listener, select.EPOLLIN)
        self.pool.start()
        gc.freeze()
        self._running = True
        next_reap = 0.0
        log.info("agent %s starting %d worker(s) running %s, broker %s", self.agent_id, self.config.workers,
                 self.config.processor, self.config.broker)
        try:
            while self._running:
                mono = time.monotonic()
                if self.tasks and mono - self._last_heard > self.config.outage_tolerance:
                    self._abandon_all(mono - self._last_heard)
                if not self.registered:
                    self._register()
                elif mono - self._last_heard > self.lease:
                    log.warning("no word from the broker for %.1fs: reconnecting", mono - self._last_heard)
                    self._next_register = 0.0
                    self._register()
                elif mono >= self._next_heartbeat or self._capacity_changed(mono):
                    self._heartbeat(mono)
                wait = 0.05
                if self._started and self.registered:  # wake up when a start is due
                    wait = min(wait, max(0.0, _oldest_due(self._started) - time.monotonic()))
                broker_input = self.broker is not None and self._broker_waiting()
                events = self.poller.poll(0 if broker_input else wait)
                links = []
                for fd, event in events:
                    if fd == self._broker_fd:
                        broker_input = True
                    elif fd == listener:
                        self._accept()
                    else:
                        links.append((fd, event))
                if broker_input:
                    self._read_broker()
                for fd, event in links:
                    self._on_link_event(fd, event)
                if mono >= next_reap:
                    next_reap = mono + 0.2
                    for proc, code in self.pool.reap():
                        self._on_worker_death(proc, code)
                if self._deadlines and self._deadlines[0][0] <= mono:
                    self._expire_deadlines(mono)
                self._assign()
                self._flush()
        finally:
            self._shutdown()

    def _read_broker(self) -> None:
        """Handle the broker's messages waiting (up to 1,000 a turn), without a failing read at the end."""
        readable = self._broker_readable
        for _ in range(1000):
            if not readable():
                return
            self._on_broker_message(self._broker_recv())
            readable = self._broker_waiting  # (a link was read to its end: the next poll tells of more)

    def stop(self, *_args) -> None:
        self._running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _shutdown(self) -> None:
        """Stop workers and hand back every task not finished (ArmoniK: released, not counted as a retry)."""
        self.pool.stop()
        for task in list(self.tasks.values()):
            self._release(task, "agent shutting down")
        try:
            if self.registered:
                self._flush()
                deadline = time.monotonic() + 1.0
                while self._pending and time.monotonic() < deadline:
                    if self.broker.poll(100) and self._broker_readable():
                        self._on_broker_message(self._broker_recv())
                        self._flush()  # reports held back while one was in flight
        except zmq.ZMQError:
            pass
        if self.broker is not None:
            self.broker.close(linger=0)
        for link in self.links.values():
            link.close()
        self.poller.close()
        self.listener.close()
        self.ctx.term()
        shutil.rmtree(self._sockdir, ignore_errors=True)
        log.info("agent %s stopped: %s", self.agent_id, ", ".join(f"{v} {k}" for k, v in self.stats.items()))
