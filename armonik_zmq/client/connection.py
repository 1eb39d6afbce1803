"""The client's connection to the broker: one DEALER socket, one I/O thread, futures by request id.

A user thread encodes a request, registers a ``Future`` under its ``rid`` and sends the request on the
DEALER itself, under ``_sock_lock`` (ZeroMQ sockets are not thread-safe: one thread at a time, and a lock is
the full barrier a socket needs to change threads). Handing it to the I/O thread instead cost a thread
wake-up (~90 us on a VM) on every call's path.

Replies are read by a *reader*: whichever thread holds the reader role (``_role``) waits on the DEALER's
file descriptor outside libzmq, receives under ``_sock_lock`` and routes every reply to its future by ``rid``,
and every ``EVENT`` push to the queue of its subscription. A user thread that waits for a reply (or for a
subscription's events, or for a ``futures.Future``) takes the role when it is free and reads until what it
waits for has arrived: the reply reaches the thread that wants it without a hand-off from another thread
(two thread wake-ups on the path instead of one). While it reads, the descriptor is masked in the I/O thread's
epoll set, so the I/O thread sleeps; it reads whenever no user thread does (replies of calls whose caller
found the role taken, events nobody waits on). Messages are routed in arrival order by the role's holder; a
wait started while routing (a done callback that calls the broker) reads on, in the same thread.

The descriptor only signals new activity: a send may take in commands that announce incoming messages, so a
user thread that sees messages waiting after its send rings the reader's doorbell (``_look``, an eventfd
polled with the descriptor); whoever settles from another thread what a reader waits for rings it too.
The I/O thread has a doorbell of its own (``_ctl``: stop, a resend scheduled) and watches the socket monitor.

Broker restarts are survived Lazy-Pirate style. Each request that changes something
(``protocol.KEYED_OPS``: creations, uploads, cancels, session changes) carries an ``idempotency_key``
(``<client id>:<sequence>``), so the broker applies it once however often it arrives. When the
connection drops (the socket monitor sees a closed connection at once, a silent broker through ZMTP
heartbeats), libzmq reconnects with capped exponential backoff, and every keyed or read-only request
still without a reply is sent again; any other request fails with ``ConnectionLostError``, as it may
or may not have been applied. A request answered ``UNAVAILABLE`` (the broker could not commit its turn) is retried the same way. The call's
``timeout`` bounds the whole.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import queue
import select
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import errors, protocol
from ..common import event_from_wire
from ..config import default_endpoint
from ..protocol import KEYED_OPS, ErrorCode, Op
from ..security import ClientKeys, KeyInput
from ..unixlink import LinkDealer, is_link
from ..zmqio import readable, recv_message, send_message
from .arrived import ArrivedData

__all__ = ["Connection", "Subscription", "connect"]

log = logging.getLogger(__name__)

_EVENT = int(Op.EVENT)
_VERSION = protocol.PROTOCOL_VERSION
#: Most messages received per wake-up before they are routed, so replies do not wait behind a long stream.
_DRAIN = 256
#: Seconds between the I/O thread's looks when nothing happens (it sends deferred UNSUBSCRIBEs then).
_IDLE_TICK = 0.5
#: ZMTP heartbeats detect a broker that vanished without closing the TCP connection (milliseconds).
_HEARTBEAT_IVL = 2_000
_HEARTBEAT_TIMEOUT = 6_000
#: Put in a subscription's queue to wake a reader blocked on it (an empty batch of events).
_WAKE: tuple = ()
#: libzmq's reconnection backoff: first retry after this, doubling up to the cap (milliseconds)
_RECONNECT_IVL = 100
_RECONNECT_IVL_MAX = 2_000
#: Requests that change nothing (or only this connection's subscriptions): safe to send again.
READ_ONLY_OPS = frozenset({
    Op.GET_SERVICE_CONFIG, Op.GET_SESSIONS, Op.DOWNLOAD_RESULT_DATA, Op.GET_RESULTS, Op.GET_TASKS, Op.HEALTH,
    Op.LIST_SESSIONS, Op.LIST_TASKS, Op.COUNT_TASKS_BY_STATUS, Op.GET_RESULT_IDS, Op.LIST_RESULTS,
    Op.LIST_PARTITIONS, Op.GET_PARTITIONS, Op.LIST_VERSIONS, Op.GET_OWNER_TASK_ID, Op.SUBSCRIBE_EVENTS,
    Op.UNSUBSCRIBE_EVENTS, Op.AUTH_INFO,
})
#: Seconds before sending again a request answered UNAVAILABLE, doubling up to the cap.
_UNAVAILABLE_RETRY = 0.05
_UNAVAILABLE_RETRY_MAX = 2.0


#: the handshake failures a client socket can see
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _handshake_failure(event: int, with_keys: bool) -> str:
    """Say what a failed handshake means for the user, and what to do."""
    if not with_keys:
        return ("the broker requires CURVE: pass server_key= (its server.key) and secret= (this client's "
                ".key_secret), or set ARMONIK_ZMQ_SERVER_KEY and ARMONIK_ZMQ_SECRET")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("the broker refused this client's key: it is not in the broker's client allow-list (or it is an "
                "agent key); ask for a client key made by `armonik-zmq keys DIR --client NAME`")
    return ("the CURVE handshake failed: is server_key the broker's public key (server.key of its key directory), "
            "and does this broker use CURVE (started with --keys)?")


def connect(endpoint: Optional[str] = None, *, timeout: float = 30.0, server_key: Optional[KeyInput] = None,
            secret=None) -> "Connection":
    """Open a connection to the broker at ``endpoint`` (default: ``config.default_endpoint()``).

    Connecting is asynchronous, like a gRPC channel: requests queue until the broker is reachable,
    and a call that gets no reply within ``timeout`` seconds raises ``BrokerUnavailableError``.

    With CURVE, ``server_key`` is the broker's public key (the ``server.key`` file, or its 40 Z85
    characters) and ``secret`` this client's key pair (its ``.key_secret`` file, or a (public,
    secret) pair); they default to the files named by ``ARMONIK_ZMQ_SERVER_KEY`` and
    ``ARMONIK_ZMQ_SECRET``. A refused handshake fails the pending calls with ``AuthenticationError``.
    """
    return Connection(endpoint, timeout=timeout, server_key=server_key, secret=secret)


def _with_counts(fields: dict, frames: Sequence[Any], counts: Optional[list[int]]) -> dict:
    """Put the header's ``frames`` field (data frames per item), which ``call``'s own ``frames`` shadows."""
    if counts is not None:
        fields["frames"] = list(counts)
    elif frames:
        fields["frames"] = [len(frames)]
    return fields


class Connection:
    """A thread-safe connection to the broker's client endpoint; use it as a context manager."""

    def __init__(self, endpoint: Optional[str] = None, *, timeout: float = 30.0,
                 server_key: Optional[KeyInput] = None, secret=None):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        if server_key is None and secret is None:
            server_key = os.environ.get("ARMONIK_ZMQ_SERVER_KEY") or None
            secret = os.environ.get("ARMONIK_ZMQ_SECRET") or None
        self._curve = ClientKeys.from_options(server_key, secret)
        #: why the last handshake failed, until one succeeds (explains timeouts)
        self._handshake_error: Optional[str] = None
        self._rids = itertools.count(1)  # rid 0 is what the broker answers when it cannot read ours
        #: this connection's name in idempotency keys, and their sequence
        self.client_id = uuid.uuid4().hex
        self._keys = itertools.count(1)
        #: under _sock_lock: rid -> _Inflight of each request sent to the broker and not answered yet
        self._inflight: dict[int, _Inflight] = {}
        #: under _lock: (monotonic time, rid) of requests to send again after an UNAVAILABLE reply (the I/O thread
        #: sends them)
        self._later: list[tuple[float, int]] = []
        #: under _sock_lock: how many times the connection dropped (requests sent before a drop were maybe lost)
        self._epoch = 0
        self.stats = {"resent": 0, "lost": 0, "reconnections": 0}
        self._pending: dict[int, "Future | _Reply"] = {}
        self._subs: dict[int, Subscription] = {}
        #: small results' data that came with their completion event during a wait, for the download that follows
        self.arrived = ArrivedData()
        self._lock = threading.Lock()  # guards _pending, _subs and _later
        #: guards the DEALER, _closed, _inflight, _epoch and _unsubs; reentrant: a future's done callback, run
        #: by the thread that settles it (maybe holding it), may send a request
        self._sock_lock = threading.RLock()
        #: the DEALER, or with a ``unix://`` endpoint a link (unixlink.py: a broker on this host, no ZeroMQ I/O
        #: threads in between), and what sends, tells of and takes its messages
        self._dealer: Optional[zmq.Socket | LinkDealer] = None
        self._dealer_fd = -1
        self._send_msg: Callable[[list], None] = None
        self._has_msg: Callable[[], bool] = None
        self._take_msg: Callable[[], list] = None
        #: whether a message is known to wait without reading: a link's inbox (its descriptor is level-triggered,
        #: so a poll tells of what its socket holds, and a read before it would come back empty); on ZeroMQ the
        #: same as _has_msg (its descriptor tells only of what comes once the socket was looked at)
        self._msg_known: Callable[[], bool] = None
        self._closed = False
        self._connected = False  # a ZMTP handshake with the broker succeeded and has not dropped since
        #: subscriptions closed here whose UNSUBSCRIBE leaves after the next request (or at the I/O thread's tick)
        self._unsubs: list[int] = []
        #: the reader role: its holder alone receives and routes (``_reader`` is its thread's ident)
        self._role = threading.Lock()
        self._reader: Optional[int] = None
        #: set by the I/O thread that needs the role (a dropped connection, the end): the holder lets go
        self._yield = False
        #: _reader_poll is out of the I/O thread's set (masked): while a user thread holds the role, and after it
        #: while nothing can come that nobody reads (``_idle``), so that a lone call costs no epoll_ctl. Changed
        #: under _mask_lock, by the role's holder or by new interest while nobody holds the role (``expect``)
        self._masked = False
        self._mask_lock = threading.Lock()
        #: the descriptor tells of what waits whenever it is polled (a link), not only of what comes (ZeroMQ)
        self._level = is_link(self.endpoint)
        #: messages received and not routed yet, routed in order by the role's holder
        self._inbox: deque = deque()
        #: the reader's doorbell (polled with the DEALER's descriptor) and the I/O thread's
        self._look = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed with the object, not at close(): a late ring from another thread must never hit a reused number.
        weakref.finalize(self, _close_fds, self._look, self._ctl)
        #: what the reader waits on: the DEALER's descriptor and _look
        self._reader_poll = select.epoll()
        #: the I/O thread's descriptors; _reader_poll's is watched while no user thread reads, masked (no events)
        #: while one does: one EPOLL_CTL_MOD each way (a delete and a re-add of an epoll in an epoll also checks
        #: the nesting for loops under a global lock: ~2.3-3 us of CPU a pair against ~1.1)
        self._io_poll = select.epoll()
        self._ctx = zmq.Context()
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._io_ident: Optional[int] = None
        self._thread = threading.Thread(target=self._io_main, daemon=True, name=f"armonik-zmq-io {self.endpoint}")
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self._io_poll.close()
            self._reader_poll.close()
            self._ctx.term()
            raise self._start_error

    # -- public API -----------------------------------------------------------------------------

    def call(self, op: Op, *, frames: Sequence[Any] = (), timeout: Optional[float] = None,
             counts: Optional[list[int]] = None, **fields: Any) -> tuple[dict, list]:
        """Send one request and wait for its reply; return ``(header, data frames)``.

        ``frames`` are the request's data frames; ``counts`` becomes the header's ``frames`` field
        (data frames per item; default: all of them belong to one item). Reply data frames are
        memoryviews over the received ZeroMQ frames (no copy). An error reply raises its exception
        from ``errors``; no reply within ``timeout`` (default: the connection's) raises
        ``BrokerUnavailableError``.
        """
        return self._exchange(op, _with_counts(fields, frames, counts), frames, timeout)

    def call_fields(self, op: Op, fields: dict, frames: Sequence[Any] = (),
                    timeout: Optional[float] = None) -> tuple[dict, list]:
        """``call`` with the request's header fields built already: ``fields`` holds its own ``frames`` counts
        (data frames per item, as ``call`` would put them) and is sent as it is, not copied (a hot path's caller
        builds it once)."""
        return self._exchange(op, fields, frames, timeout)

    def call_async(self, op: Op, frames: Sequence[Any] = (), *, counts: Optional[list[int]] = None,
                   **fields: Any) -> "Future[tuple[dict, list]]":
        """Send one request; return a future of ``(header, data frames)`` (no timeout of its own).

        ``frames`` and ``counts`` are as in ``call``.
        """
        return self._submit(op, _with_counts(fields, frames, counts), frames, waited=False)[1]

    def subscribe(self, session_id: str, event_types: Optional[Iterable[int]] = None,
                  task_filter: Optional[list] = None, result_filter: Optional[list] = None,
                  snapshot: bool = False, inline_max: int = 0,
                  on_events: Optional[Callable[[list], list]] = None, waiter_reads: bool = True,
                  result_ids: Optional[Sequence[str]] = None, with_replies: bool = False,
                  idle: Optional[Callable[[], bool]] = None) -> "Subscription":
        """Subscribe to the events of a session; return the confirmed ``Subscription``.

        Filters are in the wire's disjunctive normal form; ``result_ids`` keeps only those results' events
        (a wait on many results: they travel in one data frame, where a filter takes three strings and two
        lists per result).
        With ``snapshot`` the broker also pushes the current status of every result named by ``result_ids``
        or by a ``result_id eq`` term of ``result_filter`` (in pushes of at most 1,000 events).
        With ``inline_max``, a result that completes with at most that many bytes has them in its
        RESULT_STATUS_UPDATE body (``data``: read them with ``Subscription.get_batch``).
        ``on_events`` sees each push's ``[event_type, body]`` pairs first, on the thread that routes it (the I/O
        thread or a waiting user thread), and returns those left for the subscription's readers: it must be
        quick and never wait for the broker. With ``waiter_reads`` (the default) a thread waiting for the
        subscription's events reads the broker's messages itself when no other thread does; a background
        listener passes False, leaving the reading to the threads that wait for their own replies.
        With ``with_replies`` the broker may put a push inside a reply to this connection that leaves after the
        same commit (one message instead of two; routed right after that reply, as before).
        ``idle`` says, quickly and from any thread, when the subscription expects no event (the futures client: no
        future pending): the connection then leaves its messages to the next thread that calls rather than have
        its I/O thread watch (a lone call costs no epoll_ctl); whoever makes it expect events again calls
        ``expect``. Without it, the I/O thread reads whenever no user thread does.
        """
        fields: dict[str, Any] = {"session_id": session_id,
                                  "event_types": [int(t) for t in (event_types or ())]}
        if task_filter is not None:
            fields["task_filter"] = task_filter
        if result_filter is not None:
            fields["result_filter"] = result_filter
        frames: tuple = ()
        if result_ids is not None:
            # one data frame, each id ended by a NUL: the broker decodes it a slice at a time (docs/protocol.md)
            ids = "\0".join(result_ids)
            if ids.count("\0") != max(0, len(result_ids) - 1):
                raise ValueError("a result id cannot hold a NUL character")
            fields["result_ids_frame"] = True
            frames = (ids.encode() + b"\0",) if result_ids else (b"",)
        if snapshot:
            fields["snapshot"] = True
        if inline_max:
            fields["inline_max"] = inline_max
        if with_replies:
            fields["with_replies"] = True
        rid = next(self._rids)
        sub = Subscription(self, rid, session_id, on_events, waiter_reads, idle)
        # Registered before the request leaves: the snapshot pushes follow the reply immediately.
        with self._lock:
            self._subs[rid] = sub
        try:
            self._exchange(Op.SUBSCRIBE_EVENTS, fields, frames, None, rid)
        except BaseException as exc:
            with self._lock:
                self._subs.pop(rid, None)
            if isinstance(exc, errors.BrokerUnavailableError) and not self._closed:
                # The request may still reach the broker later: cancel what it would create.
                self._unsubscribe(rid)
            raise
        return sub

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def close(self) -> None:
        """Stop the I/O thread and close the sockets; pending calls fail with ``BrokerUnavailableError``."""
        with self._sock_lock:
            if self._closed:
                return
            self._closed = True
            _ring(self._ctl)
        # Not from the I/O thread, nor from the reader (a callback it runs): the I/O thread's end takes the role.
        if threading.get_ident() not in (self._io_ident, self._reader):
            self._thread.join()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._connected else "connecting")
        return f"<Connection {self.endpoint} {state}>"

    # -- user-thread side -----------------------------------------------------------------------

    def _submit(self, op: Op, fields: dict, frames: Sequence[Any], rid: Optional[int] = None,
                waited: bool = True, reads: bool = False) -> tuple[int, "Future | _Reply"]:
        """Register a future for a new request and send it to the broker. ``waited``: this connection waits for
        it (``_wait``), so a ``_Reply`` does; else the caller gets a ``concurrent.futures.Future``. ``reads``: the
        caller holds the reader role and reads next (it looks at what the send took in: no doorbell)."""
        if rid is None:
            rid = next(self._rids)
        if op in KEYED_OPS and "idempotency_key" not in fields:
            fields["idempotency_key"] = f"{self.client_id}:{next(self._keys)}"
        # ``protocol.request`` without copying the fields (a caller's fields are its request's, never reused)
        fields["v"], fields["op"], fields["rid"] = _VERSION, int(op), rid
        msg = [protocol.pack(fields), *frames]
        fut = _Reply(self._lock) if waited else Future()
        with self._sock_lock:
            if self._closed:
                raise errors.BrokerUnavailableError(f"the connection to {self.endpoint} is closed")
            # Registered under the lock, so close() cannot sweep the table between the two.
            with self._lock:
                self._pending[rid] = fut
            # Kept until the reply: sent again if the connection drops (pyzmq sends a frame by reference).
            self._inflight[rid] = _Inflight(msg if op in KEYED_OPS or op in READ_ONLY_OPS else None, self._epoch, op)
            try:
                # copy=False: bulk frames reach libzmq without being copied (small ones are, by pyzmq).
                self._send_msg(msg)
            except zmq.ZMQError as exc:  # unlimited HWM makes this unexpected; fail only that call
                if not (exc.errno == zmq.EAGAIN and not self._connected):
                    self._inflight.pop(rid, None)
                    self._fail_rid(rid, self._send_error(exc))
                # else no pipe right now (a handshake failing or a reconnect under way): the call stays in
                # flight, sent again on reconnect, failed with the reason by a refused handshake, or
                # explained at its timeout
            if not self._connected and self._handshake_error is not None:
                # The refusal's event came before this call: nothing would fail it, and the next handshake
                # is refused too until someone changes a key.
                self._inflight.pop(rid, None)
                self._fail_rid(rid, self._refused())
            if self._unsubs:  # after the request: it is the one someone waits for
                self._send_unsubscribes()
            if not reads and self._msg_known():
                _ring(self._look)  # the send took in the news of messages: the descriptor will not tell
            if len(self._inflight) > 2 * len(self._pending) + 1024:
                self._sweep_inflight()
        if not reads and self._masked:
            self.expect()  # its reply must be read by someone
        return rid, fut

    def _exchange(self, op: Op, fields: dict, frames: Sequence[Any], timeout: Optional[float],
                  rid: Optional[int] = None) -> tuple[dict, list]:
        """Send one request and wait for its reply, reading it on this thread when the reader role is free.

        The role is taken before the send: a reply that comes while this thread is preempted between its send
        and its wait finds the I/O thread's set without the descriptor, so it wakes no other thread.
        """
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        reads = self._reader != threading.get_ident() and self._take_role()
        try:
            rid, fut = self._submit(op, fields, frames, rid, reads=reads)
            if reads:
                self._read_loop(fut.done, deadline)
        finally:
            if reads:
                self._give_role()
        if fut._settled:
            if fut._error is not None:
                raise fut._error
            return fut._value
        return self._wait(op, rid, fut, timeout, deadline)

    def _call_many(self, op: Op, requests: Iterable[tuple[dict, Sequence[Any]]],
                   timeout: Optional[float] = None, window: Optional[int] = None) -> list[tuple[dict, list]]:
        """Send every request before awaiting the first reply (pipelined, applied in order); return the replies.

        ``timeout`` bounds the wait of each reply once the previous one arrived. ``window`` caps the
        requests awaiting their reply (bulk data: bounds what the broker holds at once).
        """
        requests = iter(requests)
        first = next(requests, None)
        if first is None:
            return []
        second = next(requests, None)
        if second is None:  # the usual case: one request, sent with the reader role taken (see _exchange)
            return [self._exchange(op, first[0], first[1], timeout)]
        return list(self.replies(op, itertools.chain((first, second), requests), timeout, window))

    def replies(self, op: Op, requests: Iterable[tuple[dict, Sequence[Any]]], timeout: Optional[float] = None,
                 window: Optional[int] = None) -> Iterator[tuple[dict, list]]:
        """Send ``requests`` (each its header fields, with the ``frames`` counts, and its data frames) pipelined, and
        yield each reply as it comes, in order (``_call_many`` is its list). A request is drawn from ``requests``
        before the wait for a reply that makes room for it in the window: a generator builds the next request
        while the broker handles those in flight (with ``window`` 1: one request at a time, and no pause between
        a reply and the next request)."""
        sent: deque = deque()
        try:
            for fields, frames in requests:
                if window is not None and len(sent) >= window:
                    yield self._wait(op, *sent.popleft(), timeout)
                sent.append(self._submit(op, fields, frames))
            while sent:
                yield self._wait(op, *sent.popleft(), timeout)
        finally:
            if sent:  # an error, or the caller stopped iterating: nobody will read the other replies
                with self._lock:
                    for rid, _ in sent:
                        self._pending.pop(rid, None)

    def _wait(self, op: Op, rid: int, fut: "_Reply", timeout: Optional[float],
              deadline: Optional[float] = None) -> tuple[dict, list]:
        """Return the reply of ``fut``, or raise its error, or ``BrokerUnavailableError`` on timeout (``timeout``
        seconds, or at ``deadline`` if given)."""
        if timeout is None:
            timeout = self.timeout
        if deadline is None:
            deadline = time.monotonic() + timeout
        if not fut.done():
            self.read_until(fut.done, deadline)
        try:
            return fut.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # BrokerUnavailableError is a TimeoutError too: only a future still pending timed out.
            if fut.done():
                return fut.result()
            with self._lock:
                mine = self._pending.pop(rid, None)
            if mine is None:  # the I/O thread took it: the reply is being delivered right now
                return fut.result()
            raise errors.BrokerUnavailableError(self._no_reply(op, timeout)) from None

    def _no_reply(self, op: Op, timeout: float) -> str:
        """Explain a timeout, telling a broker that never answered from one that stopped answering."""
        try:
            name = Op(op).name
        except ValueError:
            name = str(op)
        if self._handshake_error is not None and not self._connected:
            why = self._handshake_error
        elif self._connected:
            why = ("the connection is up but the broker did not answer in time (overloaded, or it restarted "
                   "and lost the request); check that `armonik-zmq up` is running")
        else:
            why = (f"nothing answers there: check that `armonik-zmq up` is running and serving {self.endpoint} "
                   f"(or set ARMONIK_ZMQ_ENDPOINT)")
        return f"no reply from the broker at {self.endpoint} to {name} within {timeout:g}s: {why}"

    def _unsubscribe(self, rid: int) -> None:
        """Drop a subscription's queue; its UNSUBSCRIBE leaves after the next request (or within ``_IDLE_TICK``).

        Sent at once, it would lie on the broker's way to the request a waiter makes next (download the
        result it waited for): the events of a subscription closed here are dropped on arrival anyway. A
        closed connection needs none: the broker drops the subscriptions of a departed client.
        """
        with self._lock:
            self._subs.pop(rid, None)
        with self._sock_lock:
            if not self._closed:
                self._unsubs.append(rid)

    def _send_unsubscribes(self) -> None:
        """Send the deferred UNSUBSCRIBEs (the caller holds _sock_lock); their answers find no future and are dropped."""
        rids, self._unsubs = self._unsubs, []
        for rid in rids:
            try:
                self._send_msg([protocol.request(Op.UNSUBSCRIBE_EVENTS, next(self._rids), subscription=rid)])
            except zmq.ZMQError:
                pass  # no pipe (reconnecting): the broker forgot the subscription with the connection

    # -- reading: the thread that holds the reader role ---------------------------------------

    def read_until(self, done: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Read and route the broker's messages on this thread until ``done()``, the deadline, or the I/O
        thread asks for the role; return False, reading nothing, when another thread holds the role."""
        if self._reader == threading.get_ident():  # a wait started while routing (a callback that calls the broker)
            self._read_loop(done, deadline)
            return True
        if not self._take_role():
            return False  # another thread reads: it routes our message to us
        try:
            self._read_loop(done, deadline)
        finally:
            self._give_role()
        return True

    def _take_role(self) -> bool:
        """Take the reader role if it is free and the I/O thread does not want it; True if this thread has it."""
        if not self._role.acquire(blocking=False):
            return False
        if self._closed or self._yield:
            self._role.release()
            return False
        me = self._reader = threading.get_ident()
        if me != self._io_ident and not self._masked:  # the I/O thread stops watching meanwhile (no wake-up of it)
            # (no _mask_lock: only a holder masks; an ``expect`` that saw the role free just before is the one race,
            # and it only leaves the I/O thread watching during this read, as the window before this line does)
            self._io_poll.modify(self._reader_poll, 0)
            self._masked = True
        return True

    def _give_role(self) -> None:
        """Let the reader role go (its holder only); the I/O thread watches the descriptor again unless nothing
        can come that nobody would read (then the next caller reads it, and new interest calls ``expect``)."""
        with self._mask_lock:
            try:
                if self._masked and (self._pending or not self._idle()):  # what came meanwhile wakes it at once
                    self._io_poll.modify(self._reader_poll, select.EPOLLIN)
                    self._masked = False
            finally:
                self._reader = None
                self._role.release()

    def _idle(self) -> bool:
        """Whether nothing can come that no thread would read: no reply awaited, and every subscription says it
        expects no event now (its ``idle`` predicate: the futures client's, while no future is pending)."""
        if self._pending:
            return False
        with self._lock:
            for sub in self._subs.values():
                idle = sub.idle
                if idle is None or not idle():
                    return False
        return True

    def expect(self) -> None:
        """Something is expected that no thread may read (a subscription's ``idle`` turned False, a call whose
        caller does not read): have the I/O thread watch again if nobody holds the role (a holder decides when
        it lets go)."""
        if not self._masked:
            return
        with self._mask_lock:
            if self._masked and not self._role.locked():
                self._io_poll.modify(self._reader_poll, select.EPOLLIN)
                self._masked = False
                if not self._level:  # what came while masked: a ZeroMQ descriptor would not tell of it again (a
                    _ring(self._look)  # link's is level-triggered: no ring, so no I/O thread wake-up for nothing)

    def _read_loop(self, done: Callable[[], bool], deadline: Optional[float]) -> None:
        """Receive and route (the caller holds the role) until ``done()``, the deadline, a close or a yield."""
        poll = self._reader_poll.poll
        look = self._look
        # Before the first wait: what a link's descriptor would not tell.
        more = (self._inbox or self._msg_known()) and self._pump(self._msg_known)
        has_msg = self._has_msg
        while not (done() or self._yield or self._closed):
            if not more:
                if deadline is None:
                    wait = None
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                for fd, _ in poll(wait):
                    if fd == look:
                        _clear(look)
            more = self._pump(has_msg)
        if more:  # the descriptor will not tell of what is left: the next holder looks
            _ring(look)

    def _pump(self, has_msg: Callable[[], bool]) -> bool:
        """Receive what waits in the DEALER (``has_msg`` looks first) and route it all, in order (the role's
        holder only); True if more messages wait."""
        inbox = self._inbox
        more = False
        take_msg, known = self._take_msg, self._msg_known
        with self._sock_lock:
            n = 0
            while has_msg():
                if n == _DRAIN:
                    more = True
                    break
                inbox.append(take_msg())
                n += 1
                has_msg = known  # a link was read to its end by the first look: its descriptor tells of more
        route = self._route
        while inbox:  # a wait started while routing continues from here: the order holds
            route(inbox.popleft())
        return more

    def poke(self) -> None:
        """Wake the reader if it is another thread: what it waits for (in ``read_until``) may have been settled
        elsewhere."""
        reader = self._reader
        if reader is not None and reader != threading.get_ident():
            _ring(self._look)

    def _seize_role(self) -> None:
        """Take the reader role, asking the user thread that holds it to let go (the I/O thread only)."""
        if self._role.acquire(blocking=False):
            return
        self._yield = True
        _ring(self._look)
        self._role.acquire()
        self._yield = False

    # -- the I/O thread -------------------------------------------------------------------------

    def _io_main(self) -> None:
        """Create the thread's sockets, run the loop, and tear everything down when it ends."""
        self._io_ident = threading.get_ident()
        if is_link(self.endpoint):
            self._io_main_link()
            return
        sockets: list[zmq.Socket] = []
        try:
            dealer = self._ctx.socket(zmq.DEALER)
            sockets.append(dealer)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.SNDHWM, 0)
            dealer.setsockopt(zmq.RCVHWM, 0)
            dealer.setsockopt(zmq.IMMEDIATE, 0)  # requests queue while the broker is not (yet) there
            dealer.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL)
            dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT)
            dealer.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX)
            if self._curve is not None:
                self._curve.apply(dealer)
            self._dealer = dealer
            self._dealer_fd = dealer.getsockopt(zmq.FD)
            self._send_msg = functools.partial(send_message, dealer, copy=False)
            self._has_msg = self._msg_known = functools.partial(readable, dealer)
            self._take_msg = functools.partial(recv_message, dealer)
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            for failure in _HANDSHAKE_FAILURES:
                events |= failure
            monitor = dealer.get_monitor_socket(events)
            sockets.append(monitor)
            try:
                dealer.connect(self.endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot connect to {self.endpoint!r}: {exc.strerror} "
                                 f"(an endpoint looks like tcp://127.0.0.1:5555)") from None
        except BaseException as exc:
            if len(sockets) == 2:
                sockets[0].disable_monitor()
            for sock in sockets:
                sock.close(linger=0)
            self._start_error = exc
            self._started.set()
            return
        def close_sockets() -> None:
            dealer.disable_monitor()
            for sock in (monitor, dealer):
                sock.close(linger=0)

        self._serve(monitor, close_sockets)

    def _io_main_link(self) -> None:
        """``_io_main`` on a Unix-socket link: its connection events come as the monitor's would, with a ring
        of ``_ctl`` (the thread that saw the link drop may be a reader)."""
        try:
            link = LinkDealer(self.endpoint, f"client-{self.client_id}".encode(), on_event=lambda: _ring(self._ctl))
        except ValueError as exc:
            self._start_error = exc
            self._started.set()
            return
        self._dealer, self._dealer_fd = link, link.fileno()
        self._send_msg, self._has_msg, self._take_msg = link.send, link.readable, link.recv
        self._msg_known = link.waiting
        self._serve(None, link.close)

    def _serve(self, monitor: Optional[zmq.Socket], close_sockets: Callable[[], None]) -> None:
        # Watched as plain files: waiting on them never calls into the sockets, which user threads use meanwhile.
        for fd in (self._dealer_fd, self._look):
            self._reader_poll.register(fd, select.EPOLLIN)
        self._io_poll.register(self._reader_poll, select.EPOLLIN)
        self._started.set()
        try:
            self._io_loop(monitor)
        except Exception:  # a bug: fail every caller now rather than let them time out
            log.exception("the armonik_zmq client I/O thread failed")
            with self._sock_lock:
                self._closed = True
        finally:
            self._fail_all(errors.BrokerUnavailableError(f"the connection to {self.endpoint} is closed"))
            self._seize_role()  # kept: nobody reads a closed connection
            with self._sock_lock:  # the lock also orders these closes after the user threads' last send
                close_sockets()
            self._io_poll.close()
            self._reader_poll.close()
            self._ctx.term()

    def _io_loop(self, monitor: Optional[zmq.Socket]) -> None:
        """Watch the connection, resend what is due, and read whenever no user thread does, until told to stop."""
        poll = self._io_poll
        reader_fd = self._reader_poll.fileno()
        link = self._dealer if monitor is None else None
        monitor_fd = -1
        if monitor is not None:
            monitor_fd = monitor.getsockopt(zmq.FD)
            poll.register(monitor_fd, select.EPOLLIN)
        poll.register(self._ctl, select.EPOLLIN)
        # A socket's descriptor tells only of what comes once the socket has been looked at with nothing to
        # read: the first events of a fresh pipe give no signal.
        self._on_monitor(monitor)
        more = False  # messages left in the DEALER after a full drain: the descriptor will not tell again
        while True:
            wait = _IDLE_TICK
            if more:
                wait = 0
            elif self._later:
                with self._lock:
                    if self._later:
                        wait = min(wait, max(0.0, self._later[0][0] - time.monotonic()))
            if link is not None and not link.connected:
                wait = min(wait, link.retry_in())
            ready = [fd for fd, _ in poll.poll(wait)]
            if link is not None:
                if not link.connected:
                    with self._sock_lock:
                        link.tick()
                if link.events:
                    self._on_monitor(None)
            # Connection changes first, so a disconnect is seen before later traffic.
            if monitor_fd in ready:
                self._on_monitor(monitor)
            if self._ctl in ready:
                _clear(self._ctl)
                if self._closed:
                    return
            if self._later:
                self._resend_due()
            if not ready and self._unsubs:  # a quiet tick: no request took them
                with self._sock_lock:
                    if not self._closed and self._unsubs:
                        self._send_unsubscribes()
            if not ready and self._masked and not self._role.locked() and self._reader_poll.poll(0):
                self.expect()  # masked while idle: a link that dropped (or a message left) is seen within a tick
            if more or reader_fd in ready:
                more = self._read_here()

    def _read_here(self) -> bool:
        """Receive and route what waits, unless a user thread holds the reader role; True if more waits."""
        if not self._role.acquire(blocking=False):
            return False  # it reads (it found the descriptor out of our set, or is about to take it out)
        try:
            self._reader = self._io_ident
            _clear(self._look)
            return self._pump(self._has_msg)
        finally:
            self._reader = None
            self._role.release()

    def _route(self, msg: list) -> None:
        """Deliver one message from the broker: a reply to its future, an EVENT to its subscription; then the EVENTs
        that came inside it (``pushes``: a subscription ``with_replies``), as if they had come next."""
        try:
            header = protocol.decode_header(msg[0].buffer)
        except protocol.ProtocolError as exc:
            log.warning("malformed message from the broker at %s: %s", self.endpoint, exc)
            self._fail_request(msg[0].bytes, f"malformed reply from the broker: {exc.message}", exc.code)
            return
        pushes = header.pop("pushes", ())
        self._deliver(header, msg)
        for push in pushes:
            if type(push) is dict and push.get("op") == _EVENT and type(push.get("rid")) is int:
                self._deliver(push, ())
            else:
                log.warning("malformed push inside a message from the broker at %s ignored", self.endpoint)

    def _deliver(self, header: dict, msg) -> None:
        """Deliver one decoded message (``msg``: its frames, the header's first)."""
        rid = header["rid"]
        if header["op"] == _EVENT:
            with self._lock:
                sub = self._subs.get(rid)
            if sub is not None:  # else: unsubscribed, the broker's answer is on its way
                events = header.get("events") or ()
                if sub.on_events is not None and events:
                    events = sub.on_events(events)
                if events:
                    sub._queue.put(events)
            return
        err = header.get("error")
        with self._sock_lock:
            inflight = self._inflight.pop(rid, None)
        if (err is not None and inflight is not None and inflight.msg is not None and isinstance(err, dict)
                and err.get("code") == ErrorCode.UNAVAILABLE and rid in self._pending):
            # The broker could not commit the turn that held it: nothing was applied, send it again shortly.
            inflight.delay = min(max(inflight.delay * 2, _UNAVAILABLE_RETRY), _UNAVAILABLE_RETRY_MAX)
            with self._sock_lock:
                self._inflight[rid] = inflight
            with self._lock:
                heapq.heappush(self._later, (time.monotonic() + inflight.delay, rid))
            if threading.get_ident() != self._io_ident:
                _ring(self._ctl)  # the I/O thread sends it: its wait must end in time
            return
        fut = self._pending.pop(rid, None)  # one dict operation: atomic, no lock needed
        if fut is None:  # the caller timed out, or a duplicate reply to a request sent again
            return
        try:
            if err is None:
                fut.set_result((header, [f.buffer for f in msg[1:]] if len(msg) > 1 else []))
            elif isinstance(err, dict):
                fut.set_exception(errors.from_error(err.get("code", ErrorCode.UNKNOWN),
                                                    str(err.get("message") or "the broker gave no message")))
            else:
                fut.set_exception(errors.MalformedError(f"malformed error reply from the broker: {err!r}"))
        except InvalidStateError:  # the caller cancelled the future
            pass

    def _fail_request(self, raw_header: bytes, message: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> None:
        """Fail the future of the request whose header is ``raw_header``, if it can be told."""
        _, rid = protocol.envelope_of(raw_header)
        with self._lock:
            fut = self._pending.pop(rid, None)
        if fut is not None:
            try:
                fut.set_exception(errors.from_error(code, message))
            except InvalidStateError:
                pass

    def _monitor_events(self, monitor: Optional[zmq.Socket]) -> Iterator[int]:
        """The connection's events: the monitor's, or the link's (None)."""
        if monitor is None:
            with self._sock_lock:
                events, self._dealer.events = self._dealer.events, []
            yield from events
            return
        while True:
            try:
                yield recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return

    def _on_monitor(self, monitor: Optional[zmq.Socket]) -> None:
        """Track the connection; on a drop, end every subscription (the broker forgot them)."""
        for event in self._monitor_events(monitor):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
                self._handshake_error = None
            elif event in _HANDSHAKE_FAILURES:
                # Retrying cannot help until someone changes a key: fail what waits now, with the reason.
                first = self._handshake_error is None
                self._handshake_error = _handshake_failure(event, self._curve is not None)
                if first:
                    log.error("cannot connect to the broker at %s: %s", self.endpoint, self._handshake_error)
                with self._lock:
                    futures = list(self._pending.values())
                    self._pending.clear()
                for fut in futures:
                    try:
                        fut.set_exception(self._refused())
                    except InvalidStateError:
                        pass
                self.poke()
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected = False
                log.info("connection to the broker at %s lost; reconnecting", self.endpoint)
                with self._lock:
                    subs = list(self._subs.values())
                    self._subs.clear()
                for sub in subs:
                    sub._queue.put(errors.ConnectionLostError(
                        f"the connection to the broker at {self.endpoint} was lost: events may have been missed; "
                        f"subscribe again"))
                self.poke()
                self._on_connection_lost()

    def _on_connection_lost(self) -> None:
        """Send again the requests the dropped connection may have lost; fail those that cannot be sent again.

        Replies that arrived before the drop are routed first, so only unanswered requests are touched. The
        requests go to the DEALER's pipe, which delivers them once libzmq has reconnected.
        """
        self.stats["reconnections"] += 1
        self._seize_role()
        try:
            self._reader = self._io_ident
            while self._pump(self._has_msg):
                pass
        finally:
            self._reader = None
            self._role.release()
        lost = []
        with self._sock_lock:  # user threads send meanwhile: each request is in the old epoch or the new one
            self._epoch += 1
            with self._lock:
                pending = set(self._pending)
            for rid, inflight in list(self._inflight.items()):
                if rid not in pending:
                    del self._inflight[rid]  # its caller gave up
                elif inflight.msg is None:
                    del self._inflight[rid]
                    lost.append((rid, inflight.op))
                elif inflight.epoch < self._epoch:
                    inflight.epoch = self._epoch
                    self.stats["resent"] += 1
                    self._send_again(rid, inflight)
        for rid, op in lost:
            self.stats["lost"] += 1
            self._fail_rid(rid, errors.ConnectionLostError(
                f"the connection to the broker at {self.endpoint} was lost while {_op_name(op)} was "
                f"in flight: it may or may not have been applied (only keyed and read-only requests are "
                f"sent again); check the state before trying again"))

    def _send_again(self, rid: int, inflight: "_Inflight") -> None:
        with self._sock_lock:
            try:
                self._send_msg(inflight.msg)
                return
            except zmq.ZMQError as exc:
                self._inflight.pop(rid, None)
                error = self._send_error(exc)
        self._fail_rid(rid, error)

    def _send_error(self, exc: zmq.ZMQError) -> BaseException:
        """The error for a send that failed: a refused handshake tears the pipe down, so say why."""
        if self._handshake_error is not None and not self._connected:
            return self._refused()
        return errors.BrokerUnavailableError(f"cannot send to {self.endpoint}: {exc.strerror}")

    def _refused(self) -> errors.AuthenticationError:
        return errors.AuthenticationError(f"cannot talk to the broker at {self.endpoint}: {self._handshake_error}")

    def _fail_rid(self, rid: int, exc: BaseException) -> None:
        with self._lock:
            fut = self._pending.pop(rid, None)
        if fut is not None:
            try:
                fut.set_exception(exc)
            except InvalidStateError:
                pass
            self.poke()

    def _resend_due(self) -> None:
        """Send again the requests whose UNAVAILABLE back-off has passed."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._later or self._later[0][0] > now:
                    return
                _, rid = heapq.heappop(self._later)
            with self._sock_lock:
                inflight = self._inflight.get(rid)
                if inflight is None or rid not in self._pending:
                    self._inflight.pop(rid, None)
                    continue
            self.stats["resent"] += 1
            self._send_again(rid, inflight)

    def _sweep_inflight(self) -> None:
        """Forget the requests whose callers gave up (timed out); the caller holds _sock_lock."""
        with self._lock:
            pending = set(self._pending)
        for rid in [r for r in self._inflight if r not in pending]:
            del self._inflight[rid]

    def _fail_all(self, exc: errors.ArmoniKZmqError) -> None:
        """Fail every pending call and end every subscription (the connection is going away)."""
        with self._lock:
            futures = list(self._pending.values())
            subs = list(self._subs.values())
            self._pending.clear()
            self._subs.clear()
        for fut in futures:
            try:
                fut.set_exception(exc)
            except InvalidStateError:
                pass
        for sub in subs:
            sub._queue.put(exc)
        self.poke()


def _ring(fd: int) -> None:
    """Ring a doorbell (an eventfd): its poller wakes, now or at its next poll."""
    os.eventfd_write(fd, 1)


def _clear(fd: int) -> None:
    """Silence a doorbell that rang."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _Reply:
    """The future of a request this connection waits for itself (``call``, ``replies``): the part of a
    ``concurrent.futures.Future`` they use, for less. The stdlib's makes a Condition, which its ``done``,
    ``result`` and ``set_result`` each take through Python code: 25 of the client's ~250 Python calls per
    sequential task. A thread that must block for the reply (another thread reads) waits on a lock made then.
    """

    __slots__ = ("_lock", "_settled", "_value", "_error", "_waiter")

    def __init__(self, lock: threading.Lock):
        #: the connection's ``_lock`` (held only around these few lines): a settle and a waiter's arrival meet in order
        self._lock = lock
        self._settled = False
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._waiter: Optional[threading.Lock] = None

    def done(self) -> bool:
        return self._settled

    def set_result(self, value: Any) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: Optional[BaseException]) -> None:
        with self._lock:
            if self._settled:
                raise InvalidStateError("the reply was settled already")
            self._value, self._error, self._settled = value, error, True
            waiter = self._waiter
        if waiter is not None:
            waiter.release()

    def result(self, timeout: Optional[float] = None) -> Any:
        """The reply, or its error raised; ``TimeoutError`` if it does not come within ``timeout`` seconds."""
        if not self._settled:
            with self._lock:
                settled = self._settled
                if not settled:
                    self._waiter = waiter = threading.Lock()
                    waiter.acquire()
            if not settled and not waiter.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError()
        if self._error is not None:
            raise self._error
        return self._value


class _Inflight:
    """A request sent to the broker and not answered yet (I/O thread only)."""

    __slots__ = ("msg", "epoch", "op", "delay")

    def __init__(self, msg: Optional[list], epoch: int, op: int):
        #: the frames to send again, or None when the request may not be sent twice
        self.msg = msg
        #: the connection epoch it was last sent in
        self.epoch = epoch
        self.op = op
        #: back-off before the next resend after an UNAVAILABLE reply
        self.delay = 0.0


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


class Subscription:
    """The events of one ``SUBSCRIBE_EVENTS``: iterate it, or ``get()`` one at a time, then ``close()``.

    Each item is ``(EventTypes, event object)``. Iteration ends when the subscription is closed
    (from any thread). When the connection closes or drops, reading raises
    ``BrokerUnavailableError`` (``ConnectionLostError`` for a drop).
    """

    def __init__(self, conn: Connection, rid: int, session_id: str,
                 on_events: Optional[Callable[[list], list]] = None, waiter_reads: bool = True,
                 idle: Optional[Callable[[], bool]] = None):
        self.id = rid
        self.session_id = session_id
        self._conn = conn
        #: called by the routing thread with each push's events; returns those left for the readers
        self.on_events = on_events
        #: whether a thread waiting for events reads the broker's messages itself (the connection's reader role)
        self._waiter_reads = waiter_reads
        #: True while it expects no event (see ``Connection.subscribe``); None: always expects some
        self.idle = idle
        # Filled by the routing thread: one list of [event_type, body] per EVENT push, or a final exception.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._buffer: deque = deque()
        self._closed = False

    def get(self, timeout: Optional[float] = None) -> tuple:
        """Return the next ``(EventTypes, event)``; raise ``queue.Empty`` if none comes within ``timeout``."""
        event = self._next(timeout)
        if event is None:
            raise RuntimeError(f"subscription {self.id} is closed")
        return event

    def get_batch(self, timeout: Optional[float] = None) -> list:
        """Return the events that arrived (at least one) as the wire has them: ``[event_type, body]`` pairs.

        Bodies are dicts with the wire's field names, a result's inline ``data`` included. Raise
        ``queue.Empty`` if none comes within ``timeout``, and ``RuntimeError`` once closed.
        """
        batch = list(self._buffer)
        self._buffer.clear()
        while not batch:
            if self._closed:
                raise RuntimeError(f"subscription {self.id} is closed")
            batch.extend(self._take(timeout))
        while True:  # and whatever else is waiting, without waiting for more
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch
            if isinstance(item, BaseException):
                self._queue.put(item)  # raised by the next read
                return batch
            batch.extend(item)

    def _take(self, timeout: Optional[float]) -> tuple:
        """The next push's events (maybe none: a wake-up); raise the connection's final exception."""
        if self._waiter_reads and self._queue.empty():
            deadline = None if timeout is None else time.monotonic() + timeout
            self._conn.read_until(self._arrived, deadline)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            self._queue.put(item)  # keep raising it on later reads
            raise item
        return item

    def __iter__(self) -> Iterator[tuple]:
        """Yield events until the subscription is closed."""
        while True:
            event = self._next(None)
            if event is None:
                return
            yield event

    def _arrived(self) -> bool:
        return not self._queue.empty()

    def _next(self, timeout: Optional[float]) -> Optional[tuple]:
        """Return the next event, or None once closed."""
        while not self._closed:
            if self._buffer:
                etype, body = self._buffer.popleft()
                return event_from_wire(etype, body)
            self._buffer.extend(self._take(timeout))  # _WAKE is empty: the loop checks _closed again
        return None

    def close(self) -> None:
        """Unsubscribe (without waiting for the broker's answer); a reader blocked in another thread stops."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_WAKE)
        self._conn.poke()
        self._conn._unsubscribe(self.id)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.id} session={self.session_id} {'closed' if self._closed else 'open'}>"
