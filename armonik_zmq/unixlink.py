"""Unix-socket links between the broker and the agents and clients on its host, in place of ZeroMQ hops.

A ZeroMQ hop costs four steps: the sender's mailbox write, the sender's I/O thread, the receiver's I/O thread,
then the receiving thread's wake-up (100-165 us under load on this project's VM, and CPU in two I/O threads).
On a Unix stream socket it is one write and one wake-up. The broker listens on a socket per role (clients,
agents) beside its ROUTERs; a peer on the same host connects with an endpoint ``unix:///path/to.sock``.

The messages are those of the ZeroMQ sockets (docs/protocol.md), framed as on the agent <-> worker link
(worker/link.py). A connection starts with a hello: a message of one frame, the peer's identity (its ZeroMQ
routing id). Then each side sends messages as a DEALER and a ROUTER do: the peer its frames, the broker its
frames after the identity it routes by. Semantics the broker relies on are kept:

- ``LinkRouter`` (the broker's side) routes by identity; a new connection announcing an identity already
  connected takes it over (ZeroMQ's ROUTER_HANDOVER) and the old connection is closed;
- its sends never block: what a socket does not take waits in a buffer; once ``max_pending`` bytes wait for one
  peer, a send raises ``zmq.ZMQError(EAGAIN)`` and a send to no such peer ``EHOSTUNREACH``, as a ROUTER with
  ROUTER_MANDATORY does, before anything of the message is queued;
- a peer that breaks the framing or sends a frame over ``max_frame`` bytes is dropped (with a log line); a peer
  that disconnects is just gone;
- ``LinkDealer`` (the peer's side) queues what is sent while it is not connected, and connects again (with a
  back-off) when the broker goes away, as a DEALER with IMMEDIATE=0 does.

Access control is the socket's directory (created 0700), as for ipc:// endpoints. Peers on other hosts keep
ZeroMQ (tcp + CURVE).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections import deque
from typing import Callable, Optional

import zmq

from .worker.link import Link, LinkClosed

log = logging.getLogger(__name__)

SCHEME = "unix://"
#: bytes that may wait for one peer of the broker before a send to it fails with EAGAIN (a full pipe)
DEFAULT_MAX_PENDING = 64 << 20
#: a routing id is 1 to 255 bytes (ZeroMQ's limit)
MAX_IDENTITY = 255
#: seconds between a peer's connection attempts: the first, and the most (doubling in between)
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 1.0
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


def is_link(endpoint: str) -> bool:
    return endpoint.startswith(SCHEME)


def link_path(endpoint: str) -> str:
    """The socket's path in ``unix:///path``."""
    if not is_link(endpoint) or len(endpoint) == len(SCHEME):
        raise ValueError(f"not a Unix link endpoint: {endpoint!r} (expected {SCHEME}/path/to.sock)")
    return endpoint[len(SCHEME):]


class Frame:
    """A received frame, read as a ``zmq.Frame`` is: ``bytes`` and ``buffer``."""

    __slots__ = ("bytes",)

    def __init__(self, data: bytes):
        self.bytes = data

    @property
    def buffer(self) -> memoryview:
        return memoryview(self.bytes)

    def __len__(self) -> int:
        return len(self.bytes)


class LinkRouter:
    """The broker's listening socket for one role: its connections, read and written as a ROUTER's peers.

    ``fileno()`` is an epoll fd, readable while a connection has input (or is writable again with output
    waiting): register it in the broker's poller, then ``readable()``/``recv()`` take the messages.
    """

    def __init__(self, endpoint: str, max_frame: int, max_pending: int = DEFAULT_MAX_PENDING):
        self.endpoint = endpoint
        self.path = link_path(endpoint)
        self.max_frame = max_frame
        self.max_pending = max_pending
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(self.path):
                _remove_stale(self.path)
            self.listener.bind(self.path)
        except OSError as exc:
            self.listener.close()
            raise RuntimeError(f"cannot listen on {endpoint}: {exc.strerror}. Is another broker running there? "
                               f"Choose another path.") from None
        self.listener.listen(128)
        self.listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self.listener.fileno(), _IN)
        #: connections by fd; those past their hello also by identity
        self._conns: dict[int, Link] = {}
        self.peers: dict[bytes, Link] = {}
        #: messages read and not taken yet: [identity, header, *data] as ``Frame``s
        self.inbox: deque = deque()
        self.stats = {"accepted": 0, "dropped_malformed": 0, "handed_over": 0}

    def fileno(self) -> int:
        return self._epoll.fileno()

    # -- receiving -------------------------------------------------------------------------------

    def readable(self) -> bool:
        """Whether a message is waiting (reads what the connections hold first, if none is)."""
        return bool(self.inbox) or self.pump()

    def recv(self) -> list:
        return self.inbox.popleft()

    def pump(self) -> bool:
        """Serve what is ready without waiting: accept, read, write pending output; return whether a message came."""
        for fd, events in self._epoll.poll(0):
            if fd == self.listener.fileno():
                self._accept()
                continue
            link = self._conns.get(fd)
            if link is None:
                continue
            if events & _OUT:
                self._flush(link)
            if events & ~_OUT:
                self._read(link)
        return bool(self.inbox)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the peer retries
                log.warning("cannot accept a link on %s: %s", self.endpoint, exc)
                return
            sock.setblocking(False)
            link = Link(sock, max_frame=self.max_frame, copy_big=True)
            link.identity = None
            self._conns[sock.fileno()] = link
            self._epoll.register(sock.fileno(), _IN)
            self.stats["accepted"] += 1

    def _read(self, link: Link) -> None:
        messages = link.read()
        inbox = self.inbox
        for frames in messages:
            if link.identity is None:
                if len(frames) != 1 or not 1 <= len(frames[0]) <= MAX_IDENTITY:
                    link.closed, link.malformed = "its first message is not a hello (one frame: its identity)", True
                    break
                self._hello(link, bytes(frames[0]))
                continue
            identity = link.identity
            inbox.append([identity, *map(Frame, frames)])
        if link.closed is not None:
            if link.malformed:
                self.stats["dropped_malformed"] += 1
                log.warning("link peer %s on %s dropped: %s", _name(link), self.endpoint, link.closed)
            self._drop(link)

    def _hello(self, link: Link, identity: bytes) -> None:
        old = self.peers.get(identity)
        if old is not None:  # ROUTER_HANDOVER: the new connection takes the identity over
            self.stats["handed_over"] += 1
            self._drop(old)
        link.identity = Frame(identity)
        self.peers[identity] = link

    def _drop(self, link: Link) -> None:
        fd = link.fileno()
        if self._conns.pop(fd, None) is None:
            return
        if link.identity is not None and self.peers.get(link.identity.bytes) is link:
            del self.peers[link.identity.bytes]
        self._epoll.unregister(fd)
        link.close()

    # -- sending ---------------------------------------------------------------------------------

    def send(self, frames: list) -> None:
        """Send ``frames[1:]`` to the peer named ``frames[0]``; never waits (see the module's doc for errors)."""
        link = self.peers.get(frames[0])
        if link is None or link.closed is not None:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        if link.pending > self.max_pending:
            raise zmq.ZMQError(zmq.EAGAIN)
        try:
            sent = link.send(frames[1:])
        except LinkClosed:
            self._drop(link)
            raise zmq.ZMQError(zmq.EHOSTUNREACH) from None
        if not sent and link.pending:
            self._epoll.modify(link.fileno(), _IN | _OUT)

    def _flush(self, link: Link) -> None:
        try:
            if link.flush():
                self._epoll.modify(link.fileno(), _IN)
        except LinkClosed:
            self._drop(link)

    def close(self) -> None:
        for link in list(self._conns.values()):
            link.close()
        self._conns.clear()
        self.peers.clear()
        self._epoll.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _name(link: Link) -> str:
    return link.identity.bytes.hex() if link.identity is not None else f"fd {link.fileno()} (before its hello)"


def _remove_stale(path: str) -> None:
    """Remove a socket file no broker listens on (one killed before it could); refuse if one does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, "Address already in use")


class LinkDealer:
    """A peer's end of a link to the broker: ``send`` messages, ``readable``/``recv`` the broker's.

    ``fileno()`` is an epoll fd that stays the same across reconnections: poll it for input. Sends made while
    not connected wait and go out once connected; a lost connection is tried again after RECONNECT_FIRST
    seconds, then at most every RECONNECT_MAX seconds (``tick`` does it: the peer calls it when ``retry_in``
    says, ``readable`` and ``send`` call it too). With ``on_event``, ``events`` collects the connection's changes
    as a ZeroMQ socket monitor tells them (EVENT_HANDSHAKE_SUCCEEDED, EVENT_DISCONNECTED), and ``on_event()``
    is called after each.
    """

    def __init__(self, endpoint: str, identity: bytes, on_event: Optional[Callable[[], None]] = None):
        self.endpoint = endpoint
        self.path = link_path(endpoint)
        if not 1 <= len(identity) <= MAX_IDENTITY:
            raise ValueError(f"a link identity is 1 to {MAX_IDENTITY} bytes (got {len(identity)})")
        self.identity = identity
        self._epoll = select.epoll()
        self.link: Optional[Link] = None
        #: messages sent while not connected, oldest first
        self._waiting: deque = deque()
        self.inbox: deque = deque()
        self.on_event = on_event
        self.events: list[int] = []
        self._next_try = 0.0
        self._backoff = RECONNECT_FIRST
        self.closed = False
        self.tick()

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def connected(self) -> bool:
        return self.link is not None

    def retry_in(self) -> float:
        """Seconds until the next connection attempt (0 when connected)."""
        return 0.0 if self.link is not None else max(0.0, self._next_try - time.monotonic())

    def _event(self, event: int) -> None:
        if self.on_event is not None:
            self.events.append(event)
            self.on_event()

    def tick(self) -> None:
        """Connect if not connected and the back-off allows it."""
        if self.link is not None or self.closed or time.monotonic() < self._next_try:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            return
        sock.setblocking(False)
        link = Link(sock, copy_big=True)
        self.link = link
        self._backoff = RECONNECT_FIRST
        self._epoll.register(sock.fileno(), _IN)
        self._event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            self._write(link.send([self.identity]))
            while self._waiting and self.link is link:
                self._write(link.send(self._waiting.popleft()))
        except LinkClosed:
            self._lost()

    def _lost(self) -> None:
        link, self.link = self.link, None
        if link is None:
            return
        self._epoll.unregister(link.fileno())
        link.close()
        self._event(zmq.EVENT_DISCONNECTED)
        self._next_try = time.monotonic() + self._backoff

    def _write(self, sent: bool) -> None:
        if not sent and self.link is not None and self.link.pending:
            self._epoll.modify(self.link.fileno(), _IN | _OUT)

    def send(self, frames) -> None:
        """Send one message (or keep it until connected); never waits."""
        link = self.link
        if link is None:
            self._waiting.append(list(frames))
            self.tick()
            return
        try:
            self._write(link.send(frames))
        except LinkClosed:
            self._lost()

    def readable(self) -> bool:
        """Whether a message from the broker is waiting (reads the socket first if none is)."""
        if self.inbox:
            return True
        link = self.link
        if link is None:
            self.tick()
            return False
        if link.pending:
            try:
                if link.flush():
                    self._epoll.modify(link.fileno(), _IN)
            except LinkClosed:
                self._lost()
                return False
        for frames in link.read():
            self.inbox.append(list(map(Frame, frames)))
        if link.closed is not None:
            if link.malformed:
                log.error("link to the broker at %s broken: %s", self.endpoint, link.closed)
            self._lost()
        return bool(self.inbox)

    def waiting(self) -> bool:
        """Whether a message already read is waiting, without reading the socket (connects if not connected).

        For a caller that polls ``fileno()`` next, or that has just read to the end with ``readable``: the
        epoll fd is level-triggered, so it tells of what the socket holds, and a read now would come back
        empty (a system call and an exception for nothing on each sequential message).
        """
        if self.inbox:
            return True
        if self.link is None:
            self.tick()
        return False

    def recv(self) -> list:
        return self.inbox.popleft()

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for a message from the broker; return whether one is waiting."""
        if self.readable():
            return True
        self._epoll.poll(timeout_ms / 1000)
        return self.readable()

    def close(self, linger: int = 0) -> None:
        """Close now (what is not sent yet is dropped, as a ZeroMQ socket with LINGER 0 does)."""
        self.closed = True
        if self.link is not None:
            self.link.close()
            self.link = None
        self._epoll.close()
