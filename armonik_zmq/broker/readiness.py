"""Which of the broker's inputs may have a message: one poll(2) over its ROUTERs' and links' file descriptors, and a
ROUTER's ZMQ_EVENTS read only while it may hold a message.

zmq.Poller (zmq_poll) reads every ZeroMQ socket's ZMQ_EVENTS before and after each wait, and each read costs two
system calls (libzmq's fork check, getpid, and a poll of the socket's command mailbox) plus pyzmq's Python. With
its peers on Unix-socket links (local clusters) the broker's ROUTERs stay idle, yet a lone task paid about twenty
of those calls in the turns of its submit and of its report.

A ROUTER's ZMQ_FD (its mailbox) becomes readable when a command for the socket comes: a new peer's pipe, or a
message in a pipe the socket found empty when it last looked (libzmq sends "activate read" then). It says nothing
of a message in a pipe not found empty since. So a socket is "maybe readable" from the moment its fd fires until a
ZMQ_EVENTS read finds no message (every pipe found empty: the next message fires the fd again). Any other call that
processes the socket's commands may take the fd's signal away: after a send (``touched``) the socket is looked at
again, and nothing else may read the broker's sockets' ZMQ_EVENTS (tests wait through ``poll``).
"""

from __future__ import annotations

import select

import zmq

from ..zmqio import readable

_POLLIN = int(zmq.POLLIN)


class Readiness:
    """The broker's poller: ROUTER sockets and plain file descriptors (its links' epoll fds)."""

    __slots__ = ("_poll", "_routers", "_fd_of", "_alone", "maybe")

    def __init__(self):
        self._poll = select.poll()
        #: fd -> its ROUTER
        self._routers: dict[int, zmq.Socket] = {}
        #: ROUTER -> its fd, and its own poll object (``arrived``)
        self._fd_of: dict[zmq.Socket, int] = {}
        self._alone: dict[zmq.Socket, select.poll] = {}
        #: ROUTERs that may hold a message: ZMQ_EVENTS is read for these only
        self.maybe: set[zmq.Socket] = set()

    def add_router(self, sock: zmq.Socket) -> None:
        fd = sock.get(zmq.FD)
        self._routers[fd] = sock
        self._fd_of[sock] = fd
        self._poll.register(fd, select.POLLIN)
        alone = self._alone[sock] = select.poll()
        alone.register(fd, select.POLLIN)
        self.maybe.add(sock)  # whatever came before this registration fired no fd we watched

    def add_fd(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)

    def readable(self, sock: zmq.Socket) -> bool:
        """Whether a message waits on ``sock``, as known since the last ``poll``: no system call while it may hold none."""
        if sock not in self.maybe:
            return False
        if readable(sock):
            return True
        self.maybe.discard(sock)
        return False

    def arrived(self, sock: zmq.Socket) -> bool:
        """Whether a message waits on ``sock``, one that came since the last ``poll`` included (one poll of its fd)."""
        if sock not in self.maybe and self._alone[sock].poll(0):
            self.maybe.add(sock)
        return self.readable(sock)

    def touched(self, sock: zmq.Socket) -> None:
        """``sock`` was sent on: that may have processed its commands and taken its fd's signal."""
        self.maybe.add(sock)

    def poll(self, timeout_ms: int) -> list:
        """Wait up to ``timeout_ms`` (none when a ROUTER has a message already) for input; return what may have some,
        as zmq.Poller does: ``(socket, POLLIN)`` for a ROUTER with a message waiting, ``(fd, POLLIN)`` for an fd."""
        ready = [(sock, _POLLIN) for sock in tuple(self.maybe) if self.readable(sock)] if self.maybe else []
        routers = self._routers
        for fd, _ in self._poll.poll(0 if ready else timeout_ms):
            sock = routers.get(fd)
            if sock is None:
                ready.append((fd, _POLLIN))
            elif sock not in self.maybe:  # a ROUTER found readable above is in ``ready`` already
                self.maybe.add(sock)
                if self.readable(sock):
                    ready.append((sock, _POLLIN))
        return ready
