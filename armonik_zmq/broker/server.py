"""The broker's loop: two ROUTER sockets, one LMDB write transaction per turn, replies after the commit.

One thread does everything, in turns:

1. drain waiting messages from both sockets (up to ``max_batch_messages`` held), and take the turn's
   batch from them peer by peer, cut at ``turn_budget`` seconds of estimated work, clients' requests
   first (broker/fairness.py);
2. open one write transaction; decode, validate and handle each message in a nested transaction
   (a failing request undoes only itself); expire lost agents; dispatch ready tasks to agents, and send
   those DISPATCHes at once (``_dispatch_early``: a DISPATCH acknowledges nothing); when one gave an idle
   agent its only task, wait a little for its report and handle it in this transaction too (``_join_reports``,
   broker/reportwait.py: a short lone task's submit and completion in one commit);
3. commit (the group commit: one fsync for the whole turn);
4. only then send the turn's replies, events and other pushes (the acknowledgement of a completion that left
   its agent with no task waits for the next message to that agent, at most ``ACK_HOLD``: broker/acks.py).

A crash anywhere before 3 loses nothing that was acknowledged: nothing of that turn was acknowledged
(an attempt dispatched in it runs for nothing: its report is refused, the task is dispatched again).
A turn with clients' requests and agents' reports commits and answers the clients' part first.

When the LMDB map fills during a turn (``MapFullError``), the turn's transaction is aborted, the
in-memory state is put back as it was before the turn (each request's ``on_rollback`` undos, then
queues and dependency counts reloaded from LMDB with every agent keeping the tasks it holds), the
map grows, and the same batch is handled again: no request fails. The map also grows ahead of a
turn when a quarter of it is no longer free, so this is rare.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from typing import Callable, Optional

import lmdb
import zmq

from ..config import BrokerConfig
from ..protocol import (BACKEND_OPS, FRONTEND_OPS, MAX_HEADER_SIZE, ErrorCode, Op, ProtocolError, decode_header,
                        envelope_of, reply_error, reply_ok, request, validate, with_field)
from ..security import check_bind
from ..unixlink import LinkRouter
from ..zmqio import recv_message, send_message
from .acks import HeldAcks
from .readiness import Readiness
from .reportwait import ReportWait
from .backend import AgentInfo, Backend
from .data import ResultData
from .auth import Authorizer, Guard, Security
from .events import EVENTS_PER_PUSH, EventBus
from .fairness import LOOK_EVERY, PREEMPT_TAKES, FairQueue
from .gcpolicy import GcPolicy
from .handlers import Handlers, handler_table
from .idempotency import Idempotency
from .lifecycle import Deletions, Lifecycle, Purges
from .listing import Listing
from .metrics import Metrics, serve_http
from .objects import ObjectStorage
from ..shm import SegmentStore
from .state import BrokerState, now as wall_now
from .store import MapAtLimit, Store

log = logging.getLogger(__name__)

#: metrics' reason for a frame refused by decode_header/validate, by the error code it got
_REJECT_REASON = {ErrorCode.MALFORMED: "malformed", ErrorCode.UNSUPPORTED_VERSION: "unsupported_version",
                  ErrorCode.UNIMPLEMENTED: "unknown_op", ErrorCode.INVALID_ARGUMENT: "invalid"}


#: turns in a row a snapshot slice may wait for clients' requests (broker/events.py)
SLICES_PUT_OFF = 4


def _errno_name(errno: int) -> str:
    return {zmq.EHOSTUNREACH: "EHOSTUNREACH", zmq.EAGAIN: "EAGAIN"}.get(errno, str(errno))


class Request:
    """One decoded request, with the reply it will get once the turn commits."""

    __slots__ = ("broker", "sock", "peer", "header", "frames", "op", "rid", "now", "user", "out", "_rollbacks")

    def __init__(self, broker: "Broker", sock: zmq.Socket, peer: bytes, header: dict, frames: list, now: float):
        self.broker = broker
        self.sock = sock
        self.peer = peer
        self.header = header
        self.frames = frames
        self.op = header["op"]
        self.rid = header["rid"]
        self.now = now
        #: authenticated identity (ZAP User-Id) once security is on; "" means the local, trusted default
        self.user = ""
        self.out: Optional[list] = None
        self._rollbacks: list[Callable[[], None]] = []

    def reply(self, data=(), **fields) -> None:
        self.out = [self.peer, reply_ok(self.op, self.rid, **fields), *data]

    def fail(self, code: ErrorCode, message: str) -> None:
        self.broker.metrics.error(int(code))
        self.out = [self.peer, reply_error(self.op, self.rid, code, message)]

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Register an undo for an in-memory change, run if this request's transaction is aborted."""
        self._rollbacks.append(fn)

    def mark(self):
        events = self.broker.state.events
        return len(self._rollbacks), len(events.dirty), [(s, len(s.pending)) for s in events.dirty]

    def rollback_to(self, mark) -> None:
        n_undo, n_dirty, lengths = mark
        while len(self._rollbacks) > n_undo:
            self._rollbacks.pop()()
        events = self.broker.state.events
        for sub in events.dirty[n_dirty:]:
            sub.pending.clear()
        del events.dirty[n_dirty:]
        for sub, n in lengths:
            del sub.pending[n:]


def ask_for_nice(nice: int) -> int:
    """Lower this thread's nice value to ``nice`` if it is higher (threads started after it inherit it); return it.

    Linux sets a nice value per thread: the broker asks before its ZeroMQ context starts its I/O threads.
    The value ranks the broker only among the processes of its scheduling group: with autogroups on
    (/proc/sys/kernel/sched_autogroup_enabled), that is its session. Workers share their agent's session
    (agent/pool.py), so with a broker, agents and workers started from one shell, nice values do weigh
    them against each other. In T15 measured at load 4-7 (3 interleaved pairs, 30,000 tasks; workers then
    each in a session of their own, which made their nice values weigh nothing against the broker's),
    nice -5 gave submit-ack p50 19.1 / 17.3 / 17.8 ms against 14.1 / 12.9 / 21.0 at 0: no gain shown,
    so it is an option (``--nice``), not the default.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice != 0 and nice < current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except PermissionError:
            log.info("the broker keeps nice %d: nice %d needs CAP_SYS_NICE or RLIMIT_NICE", current, nice)
    return os.getpriority(os.PRIO_PROCESS, 0)


class Broker(Handlers, Backend, Listing, Lifecycle, ResultData, Security):
    """The control plane: serve clients on ``endpoint`` and agents on ``agents_endpoint``."""

    def __init__(self, config: BrokerConfig):
        if config.server_secret and (config.client_link or config.agent_link):
            raise RuntimeError(f"cannot serve links ({config.client_link or config.agent_link}) with CURVE keys: a "
                               f"link's peer has no authenticated identity. Serve links without --keys, or every "
                               f"peer on ZeroMQ.")
        self.config = config
        #: the nice value in effect (config.nice, when the broker may have it)
        self.nice = ask_for_nice(config.nice)
        self.store = Store(config.data_dir, map_size=config.map_size, max_map_size=config.max_map_size,
                           durability=config.durability if config.sync else "none",
                           checkpoint_interval=config.checkpoint_interval,
                           chunk_size=config.data_chunk_max_size,
                           object_storage=ObjectStorage(config.object_storage) if config.object_storage else None)
        #: large results handed over as sealed memfds on a Unix socket (None: shared memory off)
        self.segments = (SegmentStore(self.store, config.data_dir, fsync=config.shm_fsync,
                                         grace=config.shm_grace)
                         if config.shm_threshold > 0 else None)
        self.store.segments = self.segments
        #: sessions whose results' data is deleted a chunk per turn, and sessions deleted so (broker/lifecycle.py)
        self.purges = Purges(self.store)
        self.deletions = Deletions(self.store)
        self.agents: dict[str, AgentInfo] = {}
        self.agent_by_slot: dict[int, AgentInfo] = {}
        self.state = self._load_state()
        self.hold_for_absent_agents(self.state.orphans)
        self.handlers = handler_table(self)
        self.ctx = zmq.Context()
        #: CURVE + ZAP when the broker has keys (broker/auth.py); None: NULL security, local peers only
        self.guard = Guard(self.ctx, config) if config.server_secret else None
        self.auth = Authorizer(self) if self.guard is not None else None
        self.frontend = self._router(config.endpoint)
        self.backend = self._router(config.agents_endpoint, sndhwm=config.backend_sndhwm)
        #: one poll over both ROUTERs and the links, and a ROUTER's ZMQ_EVENTS read only when it may have a message
        self.poller = Readiness()
        self.poller.add_router(self.frontend)
        self.poller.add_router(self.backend)
        #: Unix-socket links for the peers of this host (unixlink.py), by the ROUTER whose role they share: their
        #: messages are received and answered as that ROUTER's (the same ``sock`` in the fair queue and requests)
        self.links: dict[zmq.Socket, LinkRouter] = {}
        self._agent_fds: set = {self.backend}
        for sock, endpoint in ((self.frontend, config.client_link), (self.backend, config.agent_link)):
            if endpoint:
                link = self.links[sock] = LinkRouter(endpoint, config.max_message_size, config.link_buffer)
                self.poller.add_fd(link.fileno())
                if sock is self.backend:
                    self._agent_fds.add(link.fileno())
        if not self.links:  # no link to look at: nothing in between on the paths of every message
            self._readable, self._arrived, self._recv = self.poller.readable, self.poller.arrived, recv_message
        # Set here only: ``run`` serves right after, and a broker driven turn by turn (tests) never calls it. A
        # lease from now: no agent can have been silent for a whole lease sooner.
        self._next_lease_check = time.monotonic() + config.lease
        if self.guard is not None:
            self.guard.start()
        self._outbox: list[tuple[zmq.Socket, list, Optional[AgentInfo]]] = []
        #: agents whose DISPATCH of this turn names inputs not inline (read from LMDB): sent after the commit
        self.dispatch_after_commit: set[bytes] = set()
        self._lost_agents: list[AgentInfo] = []
        self.scan_jobs: deque = deque()
        #: turns in a row that put a snapshot slice off for a waiting client's request
        self._slices_put_off = 0
        self._running = False
        self.stats = {"turns": 0, "requests": 0, "errors": 0, "commits": 0, "map_growths": 0, "turns_replayed": 0,
                      "stale_readers_cleared": 0}
        self.metrics = Metrics()
        self.idempotency = Idempotency(self.store, config.idempotency_ttl, self.metrics)
        self.idempotency.wrap(self.handlers)
        self.handlers[Op.DELETE_SESSIONS] = self.hold_delete_replies(self.handlers[Op.DELETE_SESSIONS])
        #: received messages waiting for a turn, served peer by peer within a time budget per turn
        self.fair = FairQueue(config.turn_budget, config.max_batch_messages, by_user=self.guard is not None)
        self._handling_seconds = 0.0
        if config.metrics_port:
            serve_http(self.metrics, config.metrics_port, config.metrics_address, self.gauges)
            log.info("metrics served on http://%s:%d/metrics", config.metrics_address, config.metrics_port)
        #: the requests of the running turn (their undos run if the turn is aborted and replayed)
        self._turn_requests: list[Request] = []
        #: the running part's TASKS_DONE requests, and acknowledgements held for their agent's next message
        self._turn_acks: list[Request] = []
        self.held_acks = HeldAcks()
        #: the in-turn wait for a lone task's report (broker/reportwait.py), and the agents it waits for
        self.report_wait = ReportWait(config.report_wait)
        self._awaited: set[bytes] = set()
        self._next_reader_check = time.monotonic() + config.reader_check_interval
        #: when the state was loaded, until the first dispatch after it is logged (the restart figure)
        self._loaded_at: Optional[float] = time.monotonic()
        #: full garbage collections wait for idle moments (gcpolicy.py: they were the submit-ack tail)
        self.gc_policy = GcPolicy()

    def _load_state(self, events: Optional[EventBus] = None, agents: Optional[dict] = None) -> BrokerState:
        """Build the in-memory state from LMDB: after a restart, or (``agents`` given) after an aborted turn."""
        started = time.monotonic()
        while True:
            state = BrokerState(self.config.partitions, events or EventBus())
            try:
                with self.store.write() as txn:
                    counts = state.rebuild(txn, wall_now(), agents)
                break
            except lmdb.MapFullError:
                self._grow_map("while rebuilding the state")
        if agents is not None:
            self.agent_by_slot = {a.slot: a for a in agents.values()}
        self.deletions.reloaded()
        # "state rebuilt ... in Xs" is the restart-time figure (tests/test_lmdb_faults.py reads it)
        log.info("state rebuilt from %s in %.3fs: %s", self.config.data_dir, time.monotonic() - started,
                 ", ".join(f"{v} {k}" for k, v in counts.items()))
        return state

    # -- LMDB upkeep -----------------------------------------------------------------------------------

    def _grow_map(self, why: str, incoming: int = -1) -> bool:
        """Grow the map (double it; ahead of a turn, enough for ``incoming`` bytes); return whether it grew.

        Raise MapAtLimit if it is full and cannot grow. Growing invalidates this process's read
        transactions, so the scans in progress start again from a fresh snapshot (none has replied yet).
        """
        if incoming >= 0 and not self.store.needs_room(incoming):
            return False
        before = self.store.map_size
        for job in getattr(self, "scan_jobs", ()):  # none yet while __init__ loads the state
            if job.txn is not None:
                job.txn.abort()
                job.txn = None
                job.steps = None
        grown = self.store.room_for(incoming) if incoming >= 0 else self.store.grow()
        if not grown:
            if incoming >= 0:
                return False
            raise MapAtLimit(f"the LMDB map is full at its limit of {before} bytes")
        if hasattr(self, "stats"):
            self.stats["map_growths"] += 1
        log.warning("LMDB map grown from %d to %d bytes %s (%d bytes in use; limit %d)", before, self.store.map_size,
                    why, self.store.used_bytes(), self.store.max_map_size)
        return True

    def _check_readers(self, mono: float) -> None:
        self._next_reader_check = mono + self.config.reader_check_interval
        cleared = self.store.reader_check()
        if cleared:
            self.stats["stale_readers_cleared"] += cleared
            # A dead reader's slot pins every page freed after its snapshot: the file would grow without bound.
            log.warning("cleared %d stale LMDB reader slot(s) left by dead processes", cleared)

    def _router(self, endpoint: str, sndhwm: int = 100_000) -> zmq.Socket:
        check_bind(endpoint, self.guard is not None, "clients on" if endpoint == self.config.endpoint else "agents on")
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Never drop silently: an unroutable reply raises EHOSTUNREACH, a full pipe EAGAIN (RELIABILITY.md 3.2).
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1 if self.config.router_mandatory else 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size)
        sock.setsockopt(zmq.SNDHWM, sndhwm)  # before bind: the listener copies the options then
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.guard is not None:
            self.guard.protect(sock, endpoint)
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[len("ipc://"):]) or ".", mode=0o700, exist_ok=True)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise RuntimeError(f"cannot listen on {endpoint}: {exc.strerror}. Is another broker running there? "
                               f"Choose another endpoint.") from None
        return sock

    # -- sending ---------------------------------------------------------------------------------

    def _readable(self, sock: zmq.Socket) -> bool:
        """Whether a message waits on ``sock`` (as known since the last poll: a ROUTER's newcomer waits for the next
        poll) or on its link."""
        poller = self.poller
        if sock in poller.maybe and poller.readable(sock):  # no call for a ROUTER known empty (links-only clusters)
            return True
        link = self.links.get(sock)
        return link is not None and link.readable()

    def _arrived(self, sock: zmq.Socket) -> bool:
        """Whether a message waits on ``sock`` or on its link, one that came since the last poll included."""
        if self.poller.arrived(sock):
            return True
        link = self.links.get(sock)
        return link is not None and link.readable()

    def _recv(self, sock: zmq.Socket) -> list:
        """A waiting message of ``sock``'s link, else of ``sock`` (call after ``_readable``)."""
        link = self.links.get(sock)
        if link is not None and link.inbox:
            return link.recv()
        return recv_message(sock)

    def _send(self, sock: zmq.Socket, frames: list, copy: bool = True) -> None:
        """Send to the peer ``frames[0]`` on the link it came by, else on ``sock`` (raises as send_message)."""
        link = self.links.get(sock)
        if link is not None and frames[0] in link.peers:
            link.send(frames)
        else:
            self.poller.touched(sock)
            send_message(sock, frames, copy)

    def send_backend(self, peer: bytes, frames: list, on_fail: Optional[AgentInfo] = None) -> None:
        self._outbox.append((self.backend, [peer, *frames], on_fail))

    def _flush(self, client_replies: list = (), agent_replies: list = ()) -> None:
        """Send what the committed turn produced: the clients' replies, the subscribers' events, the agents'
        replies, then the pushes to agents (the outbox: DISPATCH, STOP_TASKS).

        Events go before the agents' replies: a completion's event is what its client waits for, the
        agent's ack is not (a send costs about 70 us on this VM). Pushes stay after the replies to agents,
        so an agent has its registration's reply before its first DISPATCH. A subscription's events may go
        inside its client's reply instead (``_carry_events``).
        """
        outbox, self._outbox = self._outbox, []
        subs = self.state.events.take()
        if subs and client_replies:
            client_replies = self._carry_events(client_replies, subs)
        if client_replies:
            self._send_all(client_replies)
        for sub in subs:
            events, sub.pending = sub.pending, []
            if events:
                self._push_events(sub, events)
        if agent_replies:
            self._send_all(agent_replies)
        if outbox:
            self._send_all(outbox)

    def _carry_events(self, client_replies: list, subs: list) -> list:
        """Put the events of subscriptions that take them with replies (SUBSCRIBE_EVENTS ``with_replies``) inside
        the last reply of this flush to the same client, as one EVENT header in its ``pushes`` field; return the
        replies. The client routes them right after that reply, as when they came next as messages of their own:
        one message less each way (the futures API: a lone task's submit is answered with its completion)."""
        last = {out[0]: i for i, (_, out, _) in enumerate(client_replies)}
        carried: dict[int, list] = {}
        for sub in subs:
            i = last.get(sub.peer)
            if i is not None and sub.with_replies and 0 < len(sub.pending) <= EVENTS_PER_PUSH:
                carried.setdefault(i, []).append(sub)
        if not carried:
            return client_replies
        client_replies = list(client_replies)
        for i, carrying in carried.items():
            sock, out, agent = client_replies[i]
            header = with_field(out[1], "pushes", [request(Op.EVENT, sub.rid, events=sub.pending) for sub in carrying])
            if header is None or len(header) > MAX_HEADER_SIZE:
                continue  # they go as messages of their own
            client_replies[i] = (sock, [out[0], header, *out[2:]], agent)
            for sub in carrying:
                sub.pending = []
            self.metrics.counters["events_carried"] += len(carrying)
        return client_replies

    def _push_events(self, sub, events: list) -> None:
        """Send a subscription its events, ``EVENTS_PER_PUSH`` at most per push (the client decodes each in one go)."""
        try:
            for at in range(0, len(events), EVENTS_PER_PUSH):
                self._send(self.frontend, [sub.peer, request(Op.EVENT, sub.rid, events=events[at:at + EVENTS_PER_PUSH])])
        except zmq.ZMQError as exc:
            self.metrics.send_failed(_errno_name(exc.errno))
            log.info("subscriber gone (%s): subscription %d dropped", exc.strerror, sub.rid)
            self.state.events.unsubscribe(sub.peer, sub.rid)

    def _snapshot_slice(self) -> bool:
        """Send one slice of the oldest subscription snapshot in progress (broker/events.py); return whether
        some remain. Between turns, from the last commit: every event of that commit has left already.

        A client's request already waiting goes first (the slice waits for the next turn), but a slice is put
        off at most ``SLICES_PUT_OFF`` turns in a row: a stream of requests cannot hold a snapshot forever."""
        events = self.state.events
        if self._slices_put_off < SLICES_PUT_OFF and self._arrived(self.frontend):
            self._slices_put_off += 1
            return True
        self._slices_put_off = 0
        try:
            with self.store.read() as txn:
                out = events.snapshot_slice(txn)
        except Exception:  # a bug: drop that subscription, log loudly, keep serving
            sub = events.snapshots.popleft()
            log.exception("snapshot of subscription %d failed inside the broker: subscription dropped", sub.rid)
            events.unsubscribe(sub.peer, sub.rid)
            out = None
        if out is not None:
            self._push_events(*out)
        return bool(events.snapshots)

    def _send_all(self, outbox) -> None:
        held_acks, backend = self.held_acks, self.backend
        for sock, frames, agent in outbox:
            # Acks held for this agent (committed before) go with the message: inside it (its ``acks`` field) when
            # it is a push to an agent that takes them so, else right after it (a DISPATCH first: it starts a
            # task), so the agent, busy with that message when they come, reads them without a wake-up of their own.
            acks = held_acks.take(frames[0]) if held_acks.by_peer and sock is backend else ()
            if acks and agent is not None and agent.acks_inline and all(len(ack) == 2 for ack in acks):
                carrying = with_field(frames[1], "acks", [ack[1] for ack in acks])
                if carrying is not None and len(carrying) <= MAX_HEADER_SIZE:
                    frames = [frames[0], carrying, *frames[2:]]
                    self.metrics.counters["completion_acks_carried"] += len(acks)
                    acks = ()
            self._send_one(sock, frames, agent)
            for ack in acks:
                self._send_one(backend, ack, None)

    def _send_one(self, sock: zmq.Socket, frames: list, agent: Optional[AgentInfo]) -> None:
        """Send one message; a failed send to an agent puts it in ``_lost_agents`` (its tasks are queued again)."""
        try:
            self._send(sock, frames, False)
        except zmq.ZMQError as exc:
            self.metrics.send_failed(_errno_name(exc.errno))
            if agent is None and sock is self.backend and exc.errno == zmq.EAGAIN:
                # A reply to an agent whose pipe is full (e.g. a FETCH_DATA it waits for): treat it like a
                # lost DISPATCH. Not EHOSTUNREACH: that is an old connection of an agent that reconnected
                # under the same routing id (or one gone for good, which its lease settles).
                agent = next((a for a in self.agents.values() if a.peer == frames[0]), None)
            if agent is not None:
                self.metrics.counters["agent_send_failures"] += 1
                log.warning("cannot reach agent %s (%s): its tasks go back to the queue", agent.agent_id, exc.strerror)
                self._lost_agents.append(agent)
            else:
                log.info("reply to a departed peer dropped (%s)", exc.strerror)
                if sock is self.frontend:
                    self.state.events.drop_peer(frames[0])

    # -- one turn ----------------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket, key: int, limit: int, ready: bool = False) -> bool:
        """Move up to ``limit`` waiting messages of ``sock`` into the fair queue (while it has room); return
        whether it stopped at that limit, not because ``sock`` had no more. ``ready``: a message is known waiting.

        ``sock``'s link is read once, first; then its messages and the ROUTER's are taken in turn (``_alternate``).
        What the link's peers send after that read comes with the next poll (one read takes what every connection
        holds)."""
        fair = self.fair
        n = min(limit, fair.room())
        link = self.links.get(sock)
        if link is None:
            readable = self.poller.readable
            for _ in range(n):
                if not ready and not readable(sock):
                    return False
                ready = False
                fair.add(key, sock, recv_message(sock))
            return True
        if not link.inbox:
            link.pump()
        return self._alternate(sock, key, n, link.inbox, self.poller.readable)

    def _preempt(self, batch: list, handled: int) -> None:
        """Mid-turn: a client that had nothing waiting joins this turn instead of the batch's rest (fairness.py).
        The client link is read once per look, then its messages and the ROUTER's are taken in turn."""
        frontend, fair, poller = self.frontend, self.fair, self.poller
        link = self.links.get(frontend)
        # past the queue's room if need be: by one batch at most, which the next turns' drains leave in ZeroMQ
        if link is None:
            for _ in range(PREEMPT_TAKES):
                if not poller.arrived(frontend):
                    break
                fair.add(0, frontend, recv_message(frontend))
        else:
            if not link.inbox:
                link.pump()
            self._alternate(frontend, 0, PREEMPT_TAKES, link.inbox, poller.arrived)
        if fair.newcomers:
            fair.preempt(batch, handled)

    def _alternate(self, sock: zmq.Socket, key: int, n: int, inbox, has_message: Callable) -> bool:
        """Move up to ``n`` messages into the fair queue, one from ``sock``'s link (``inbox``, read already) and one
        from ``sock`` in turn (``has_message(sock)``: whether the ROUTER holds one); return whether it took ``n``.

        Neither source keeps the other's peers out: looked at first, the ROUTER kept a link's clients out of the
        queue until it ran dry (T12b: the flooder on ZeroMQ, the polite client on a link), and a link's flooder
        taken first would do the same to ZeroMQ clients."""
        add = self.fair.add
        router = True  # may hold a message, until a look finds none
        while n > 0:
            before = n
            if inbox:
                add(key, sock, inbox.popleft())
                n -= 1
            if router and n > 0:
                if has_message(sock):
                    add(key, sock, recv_message(sock))
                    n -= 1
                else:
                    router = False
            if n == before:
                return False
        return True

    def _handle(self, txn, sock: zmq.Socket, frames: list, now: float) -> Optional[list]:
        peer = frames[0].bytes
        if len(frames) < 2:
            self.stats["errors"] += 1
            self.metrics.reject("malformed", ErrorCode.MALFORMED)
            return [peer, reply_error(0, 0, ErrorCode.MALFORMED, "message has no header frame")]
        raw = frames[1].bytes
        try:
            header = decode_header(raw)
            op = validate(header, FRONTEND_OPS if sock is self.frontend else BACKEND_OPS)
        except ProtocolError as exc:
            self.stats["errors"] += 1
            self.metrics.reject("oversize" if len(raw) > MAX_HEADER_SIZE else _REJECT_REASON.get(exc.code, "invalid"), exc.code)
            op_num, rid = envelope_of(raw)
            log.info("bad request from %s: %s", peer.hex(), exc)
            return [peer, reply_error(op_num, rid, exc.code, exc.message)]
        self.metrics.requests[op] += 1
        req = Request(self, sock, peer, header, [f.buffer for f in frames[2:]], now)
        self._turn_requests.append(req)
        mark = req.mark()
        try:
            with txn.nested() as child:
                if self.auth is not None:
                    self.auth.authorize(req, child, frames[1])
                self.handlers[op](req, child)
            if op is Op.SUBMIT_TASKS:
                self.metrics.counters["tasks_submitted"] += len(header["tasks"])
            elif op is Op.TASKS_DONE:
                self._turn_acks.append(req)
        except lmdb.MapFullError:
            raise  # the whole turn is replayed once the map has grown
        except ProtocolError as exc:
            req.rollback_to(mark)
            self.stats["errors"] += 1
            log.info("rid=%d %s refused: %s", req.rid, op.name, exc)
            req.fail(exc.code, exc.message)
        except Exception as exc:  # a bug: answer, log loudly, keep serving
            req.rollback_to(mark)
            self.stats["errors"] += 1
            log.exception("rid=%d %s failed inside the broker", req.rid, op.name)
            req.fail(ErrorCode.INTERNAL, f"internal error while handling {op.name}: {exc!r}; the request was not applied")
        return req.out

    def turn(self, timeout_ms: int) -> None:
        if self.held_acks.by_peer:  # their agents got no message within ACK_HOLD: they go alone
            wait = self.held_acks.due - time.monotonic()
            if wait <= 0:
                self._send_all([(self.backend, ack, None) for ack in self.held_acks.take_all()])
            else:
                timeout_ms = min(timeout_ms, math.ceil(wait * 1000))
        # long lists run between turns, after the commit of the turn that received them
        scanning = bool(self.scan_jobs) and self.advance_scans()
        # and big subscriptions' snapshots, a slice at a time
        scanning = (bool(self.state.events.snapshots) and self._snapshot_slice()) or scanning
        # One poll tells which sockets have messages, waiting for one only when the turn has nothing else
        # to do. Only those sockets are read: an empty one costs nothing more (an empty non-blocking read
        # raises, and every read of libzmq first processes the socket's commands: two system calls).
        may_wait = not (scanning or self._lost_agents or self.fair.waiting or self.purges.pending
                        or self.deletions.pending
                        or self._dispatch_possible())
        # messages a link read already (while looking for one) are in no fd's readiness any more
        taken_in = self.links and [sock for sock, link in self.links.items() if link.inbox]
        ready = self.poller.poll(timeout_ms if may_wait and not taken_in else 0)
        idle = may_wait and not ready
        turn_started = time.monotonic()
        self.forgive_stall(turn_started)
        if taken_in:
            ready += [(sock, zmq.POLLIN) for sock in taken_in]
        if ready:
            agents = clients = False
            agent_fds = self._agent_fds
            for sock, _ in ready:
                if sock in agent_fds:
                    agents = True
                else:
                    clients = True
            # agents first (their reports free tasks and credit), then clients, then agents again; a link's fd
            # says only that a connection has input (maybe not a whole message): no message is known waiting
            room, known = self.fair.room(), not self.links
            if agents:
                agents = self._drain(self.backend, 1, room // 2, ready=known)
            if clients:
                self._drain(self.frontend, 0, room, ready=known)
            if agents:
                self._drain(self.backend, 1, room)
        # peers in rotation, cut at the turn's time budget (broker/fairness.py)
        batch, batch_units = self.fair.take()
        mono = time.monotonic()
        if mono >= self._next_reader_check:
            self._check_readers(mono)
        self.store.checkpoint_if_due(mono)  # between turns: no write transaction is open
        lease_due = mono >= self._next_lease_check
        if (not batch and not lease_due and not self._lost_agents and not self.purges.pending
                and not self.deletions.pending and not self._dispatch_possible()):
            if idle:
                self.gc_policy.idle()
            return
        now = wall_now()
        self._handling_seconds = 0.0
        clients = self.fair.clients_ahead(batch)
        if 0 < clients < len(batch):
            # The clients' requests are committed and answered before the agents' reports are handled:
            # a submit's ack waits for no completion report of its turn, nor for the turn's dispatch
            # (fairness.py). The second commit happens only in turns that have both.
            self._commit_part(batch[:clients], now, mono, False, turn_started, upkeep=False)
            batch = batch[clients:]
        self._commit_part(batch, now, mono, lease_due, turn_started, upkeep=True)
        self.stats["turns"] += 1
        self.fair.record(self._handling_seconds, self.fair.turn_units)
        if self._loaded_at is not None and self.state.core.n_dispatched():
            log.info("first dispatch %.3fs after the state was loaded", time.monotonic() - self._loaded_at)
            self._loaded_at = None
        self.metrics.turn(time.monotonic() - turn_started)
        # a client already waiting is served before the collector's step (gcpolicy.py)
        if self.gc_policy.step_due():
            self.gc_policy.busy(wanted=self._arrived(self.frontend))

    def _commit_part(self, batch: list, now: float, mono: float, lease_due: bool, turn_started: float,
                     upkeep: bool) -> None:
        """Handle ``batch`` (with ``upkeep``: and lost agents, purges, leases, dispatch) in one transaction,
        commit it, then send its replies, dispatches and events."""
        replies: list = []
        #: agents' messages received while the turn waited for a lone task's report, with their wall-clock time of
        #: arrival (handled again, at that time, if the turn is replayed)
        joined: list = []
        incoming = sum(sum(map(len, frames)) for _, frames in batch)  # len(Frame): no memoryview per frame
        try:
            self._grow_map("ahead of a turn", incoming)
            while True:
                snapshot = (dict(self.agents), list(self._lost_agents), len(self._outbox), self._next_lease_check)
                self._turn_requests = []
                self._turn_acks = []
                replies = []
                try:
                    self._run_turn(batch, replies, now, mono, lease_due, turn_started, upkeep, joined)
                    break
                except lmdb.MapFullError:
                    self._undo_turn(*snapshot)
                    self._grow_map(f"after MapFullError: replaying the turn's {len(batch)} request(s)")
                    self.stats["turns_replayed"] += 1
        except MapAtLimit as exc:
            # the turn was undone before the growth that failed
            log.error("%s: %d request(s) refused; raise --max-map-size or delete data", exc, len(batch))
            for sock, frames in [*batch, *((self.backend, frames) for frames, _ in joined)]:
                if len(frames) >= 2:
                    op_num, rid = envelope_of(frames[1].bytes)
                    self._send_now(sock, [frames[0].bytes, reply_error(
                        op_num, rid, ErrorCode.STORAGE_FULL,
                        f"{exc}: the request was not applied (the operator must raise --max-map-size, or delete "
                        f"sessions or result data)")])
            return
        except Exception:
            # The turn's transaction is gone: nothing of it happened. Answer everyone, rebuild from LMDB.
            log.exception("turn aborted: %d request(s) answered UNAVAILABLE, state reloaded from LMDB", len(batch))
            self._outbox = []
            self.state.events.discard_pending()
            for sock, out, _ in replies:
                self.metrics.error(ErrorCode.UNAVAILABLE)
                header = decode_header(bytes(out[1]))
                self._send_now(sock, [out[0], reply_error(header["op"], header["rid"], ErrorCode.UNAVAILABLE,
                                                          "the broker could not commit this request; retry")])
            events = self.state.events
            for agent in list(self.agents.values()):
                self.forget_agent(agent)
            self.state = self._load_state(events)
            self.hold_for_absent_agents(self.state.orphans)
            return
        finally:
            self._turn_requests = []
        self.stats["commits"] += 1
        self.stats["requests"] += len(batch)
        frontend = self.frontend
        agent_replies = [r for r in replies if r[0] is not frontend]
        if self._turn_acks:
            agent_replies = self._hold_acks(agent_replies)
        client_replies = [r for r in replies if r[0] is frontend]
        if self.deletions.marked:  # deletes answered once their sessions are gone (broker/lifecycle.py)
            client_replies = self.deletions.hold(client_replies)
        if self.deletions.finished:
            client_replies += self.deletions.release()
        self._flush(client_replies, agent_replies)

    def _hold_acks(self, agent_replies: list) -> list:
        """Hold the committed part's TASKS_DONE replies to agents left with no task (broker/acks.py); return the
        agent replies to send now."""
        requests, self._turn_acks = self._turn_acks, []
        held = set()
        mono = time.monotonic()
        core = self.state.core
        for req in requests:
            agent = self.agents.get(req.header["agent_id"])
            if req.out is not None and agent is not None and agent.peer == req.peer and not core.agent_held(agent.slot):
                self.held_acks.hold(req.out, mono)
                held.add(id(req.out))
        if not held:
            return agent_replies
        self.metrics.counters["completion_acks_held"] += len(held)
        return [r for r in agent_replies if id(r[1]) not in held]

    def _run_turn(self, batch: list, replies: list, now: float, mono: float, lease_due: bool,
                  turn_started: float, upkeep: bool = True, joined: Optional[list] = None) -> None:
        """Handle the batch (with ``upkeep``: lost agents, purges, leases and dispatch, then a lone task's report
        if it comes soon: ``joined``) in one write transaction, then commit."""
        with self.store.write() as txn:
            started = looked = time.monotonic()
            i = 0
            while i < len(batch):  # preempt() may replace the batch's rest
                sock, frames = batch[i]
                i += 1
                out = self._handle(txn, sock, frames, now)
                if out is not None:
                    replies.append((sock, out, None))
                # after the last message too: a newcomer then joins this commit (fairness.py)
                mono_now = time.monotonic()
                if mono_now - looked >= LOOK_EVERY:
                    looked = mono_now
                    self._preempt(batch, i)
            self._handling_seconds += time.monotonic() - started
            if upkeep:
                self._upkeep(txn, now, mono, lease_due, turn_started)
                if joined is not None:
                    self._join_reports(txn, joined, replies, now)
            commit_started = time.monotonic()
        self.metrics.commit(time.monotonic() - commit_started)

    def _upkeep(self, txn, now: float, mono: float, lease_due: bool, turn_started: float) -> None:
        """The turn's own work after its messages: lost agents, purges, expired leases, dispatch."""
        for agent in self._lost_agents:
            if self.agents.get(agent.agent_id) is agent:
                self.metrics.add("send_failure_requeues", self.drop_agent(txn, agent, "could not be reached", now))
            # dropped now, or by an earlier failure or lease expiry: either way its tasks are queued again
            self.metrics.counters["agent_send_failures_handled"] += 1
        self._lost_agents = []
        if self.purges.pending:
            self.purges.advance(txn, self.state.delete_result_data)
        if self.deletions.pending:
            self.advance_deletions(txn, now)
        if lease_due:
            self._next_lease_check = mono + min(0.25, self.config.lease / 4)
            self.expire_leases(txn, now, turn_started)
            if self.idempotency.due(mono):
                self.idempotency.collect(txn, now, mono)
        pushed = len(self._outbox)
        self._awaited = set()
        self.dispatch(txn, now)
        self._dispatch_early(pushed)

    def _dispatch_early(self, pushed: int) -> None:
        """Send the DISPATCHes queued after ``pushed`` now, before the turn's commit: the agent starts while the
        broker commits (and fsyncs), one commit off every task's path.

        A DISPATCH acknowledges nothing, so durability holds: a client's reply and a completion's ack
        still follow their commit. If the commit never happens (a crash, an aborted or replayed turn),
        an agent runs an attempt that the broker does not know or has not dispatched: its report is
        refused, its re-registration drops it (STOP_TASKS), and the task is dispatched again: an extra
        execution, never a second result (a completion is fenced by task, attempt and owner). An agent
        gets its DISPATCH after the commit, as before, when it registers in this turn or gets an earlier
        push of it (a STOP_TASKS): an agent drops a DISPATCH that comes before its registration's reply;
        and when a task of it has inputs too large to travel inline (``dispatch_after_commit``): the
        agent maps or fetches them from LMDB, which shows them only once committed (an input made in this
        turn, by the completion that made the task ready, would be fetched as bytes, not mapped).
        """
        waiting, self.dispatch_after_commit = self.dispatch_after_commit, set()
        if len(self._outbox) == pushed:
            return
        waiting.update(req.peer for req in self._turn_requests if req.op == Op.AGENT_REGISTER)
        waiting.update(frames[0] for _, frames, _ in self._outbox[:pushed])
        early, late = [], []
        for item in self._outbox[pushed:]:
            (late if item[1][0] in waiting else early).append(item)
        if early:
            del self._outbox[pushed:]
            self._outbox.extend(late)
            self.metrics.counters["dispatches_before_commit"] += len(early)
            self._send_all(early)
            core = self.state.core
            # an agent that holds only the task just sent: the turn may wait for its report (broker/reportwait.py)
            self._awaited.update(frames[0] for _, frames, agent in early
                                 if agent is not None and len(core.agent_held(agent.slot)) == 1)

    def _join_reports(self, txn, joined: list, replies: list, now: float) -> None:
        """Before the commit: wait up to the report window for the agents given their only task early in this turn
        (``_awaited``), handling in this transaction what they send, and dispatching what their completions made
        ready (broker/reportwait.py). A client's request ends the wait: the turn commits, the request is next.

        A replayed turn (MapFullError) handles ``joined``, what the first attempt received, again; its DISPATCHes
        left already, so it does not wait."""
        awaited, self._awaited = self._awaited, set()
        backend, handled = self.backend, len(joined)
        for frames, came in joined:
            out = self._handle(txn, backend, frames, came)
            if out is not None:
                replies.append((backend, out, None))
        if handled or not awaited or self.fair.waiting or self._lost_agents or not self.report_wait.wanted():
            return
        began = time.monotonic()
        deadline = began + self.report_wait.window
        frontend, poller, agent_fds = self.frontend, self.poller, self._agent_fds
        client_link = self.links.get(frontend)
        client_fd = client_link.fileno() if client_link is not None else None
        while awaited:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if client_link is not None and client_link.inbox:
                break
            ready = poller.poll(math.ceil(left * 1000))
            woken = [sock for sock, _ in ready if sock not in agent_fds]
            # the clients' link also wakes with no request (an output flushed, a connection, part of a message):
            # serve that and wait on; only a request ends the wait
            if woken and (woken != [client_fd] or client_link.pump()):
                break
            while awaited and self._readable(backend):
                frames = self._recv(backend)
                now = wall_now()  # the turn's clock is behind by the wait: a report's stamps follow its task's
                joined.append((frames, now))
                reports = len(self._turn_acks)
                out = self._handle(txn, backend, frames, now)
                if out is not None:
                    replies.append((backend, out, None))
                if len(self._turn_acks) > reports:  # a TASKS_DONE (another message, a heartbeat, does not end it)
                    awaited.discard(frames[0].bytes)
        if joined and self.state.core.n_ready():  # what the completions made ready (a chain's next link) leaves now too
            pushed = len(self._outbox)
            self.dispatch(txn, now)
            self._dispatch_early(pushed)
            self._awaited = set()
        if awaited:
            self.report_wait.miss(time.monotonic() - began)
            self.metrics.counters["report_waits_missed"] += 1
        else:
            self.report_wait.hit(time.monotonic() - began)
        self.metrics.counters["reports_joined"] += len(joined)

    def _undo_turn(self, agents: dict, lost: list, outbox_len: int, next_lease_check: float) -> None:
        """Put the in-memory state back as it was before an aborted turn (its transaction is gone).

        Every undo the turn's requests registered runs, newest first; agents dropped or registered
        during the turn are as before; queues, dependency counts and who holds what come from LMDB.
        """
        for req in reversed(self._turn_requests):
            while req._rollbacks:
                req._rollbacks.pop()()
        self._turn_requests = []
        self.state.events.discard_pending()
        del self._outbox[outbox_len:]
        self.agents = agents
        self._lost_agents = lost
        self._next_lease_check = next_lease_check
        self.state = self._load_state(self.state.events, agents)
        self.hold_for_absent_agents(self.state.orphans)

    def _send_now(self, sock: zmq.Socket, frames: list) -> None:
        try:
            self._send(sock, frames)
        except zmq.ZMQError:
            pass

    def gauges(self) -> dict:
        """Current levels, next to the counters (HEALTH metrics, Prometheus gauges)."""
        return {"agents": len(self.agents), "agents_capacity": sum(a.capacity for a in self.agents.values()),
                "tasks_ready": self.state.core.n_ready(),
                "messages_waiting": self.fair.waiting, "turn_seconds_per_unit": self.fair.seconds_per_unit,
                **self.gc_policy.gauges(),
                "lmdb_last_txnid": self.store.env.info()["last_txnid"]}

    def _dispatch_possible(self) -> bool:
        return bool(self.agents) and self.state.core.n_ready() > 0 and any(
            self.state.core.agent_credit(a.slot) > 0 for a in self.agents.values())

    # -- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()`` or SIGINT/SIGTERM."""
        self._running = True
        self.gc_policy.start()
        log.info("broker serving clients on %s and agents on %s (data in %s, durability %s)",
                 " and ".join(filter(None, (self.config.endpoint, self.config.client_link))),
                 " and ".join(filter(None, (self.config.agents_endpoint, self.config.agent_link))),
                 self.config.data_dir, self.store.durability)
        try:
            while self._running:
                self.turn(100)
        finally:
            self._send_all([(self.backend, ack, None) for ack in self.held_acks.take_all()])
            self.gc_policy.stop()
            self.close()

    def stop(self, *_args) -> None:
        self._running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def close(self) -> None:
        for sock in (self.frontend, self.backend):
            sock.close(linger=0)
        for link in self.links.values():
            link.close()
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()
        if self.segments is not None:
            self.segments.close()
        self.store.close()
        log.info("broker stopped: %s", ", ".join(f"{v} {k}" for k, v in self.stats.items()))
