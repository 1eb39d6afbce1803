"""The agent <-> worker link: length-prefixed messages over a Unix stream socket.

A message is a list of frames (a msgpack header, then data frames), as on the ZeroMQ sockets::

    u32 n | n x u64 frame sizes | frame 0 | frame 1 | ... | frame n-1      (little-endian)

A plain socket costs one wake-up per message on each side, where a ZeroMQ ipc hop costs three (the
sender's I/O thread, the receiver's I/O thread, then the receiving thread); and a closed socket tells the
agent at once that its worker is gone. The agent reads what its workers send with limits on the frame count
and sizes (a worker runs user code: it is trusted less than the agent), and never waits on a worker: its
sends queue what the socket does not take at once (``pending``) until the worker reads.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import Optional, Sequence

from .._core import link_cut, link_prefix
from ..protocol import MAX_HEADER_SIZE

#: bytes asked of the socket per read: more than a batch of tiny tasks' messages
RECV_SIZE = 256 * 1024
#: a frame this big that is not in the buffer yet is read straight into its own buffer (no copy afterwards)
BIG_FRAME = 64 * 1024
#: buffers per sendmsg (the kernel takes at most UIO_MAXIOV = 1024)
_IOV_MAX = 512
#: frames a message may have (a count per created result at most: FRAME_COUNTS' limit)
MAX_FRAMES = 1 << 20


class _OutOfLimits(Exception):
    pass


class LinkClosed(Exception):
    """The other end is gone (a send found the link closed)."""


def _nbytes(buffer) -> int:
    return len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes


def encode(frames: Sequence) -> tuple[list, int]:
    """The buffers that carry ``frames`` as one message (its prefix, then the frames themselves, not copied),
    and their total size."""
    prefix, total = link_prefix(frames)
    return [prefix, *frames], total


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (as the kernel saw it connect)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class Link:
    """One end of an agent <-> worker socket: ``read`` the messages that came, ``send`` messages.

    ``max_frame``: the largest frame accepted from the other end (None: no limit, the worker trusts its agent);
    the first frame, the header, may also be up to MAX_HEADER_SIZE. ``copy_big``: big frames are returned as
    ``bytes`` (a processor gets bytes) rather than the ``bytearray`` they were read into.
    """

    def __init__(self, sock: socket.socket, max_frame: Optional[int] = None, copy_big: bool = False):
        self.sock = sock
        self.max_frame = max_frame
        #: ``max_frame`` as ``link_cut`` takes it (-1: no limit)
        self._max_frame = -1 if max_frame is None else max_frame
        self.copy_big = copy_big
        self._buf = bytearray()
        #: what each read lands in (a new buffer of that size per read would be mapped and unmapped each time),
        #: and a view of it (never resized: the view may live as long as the link)
        self._scratch = bytearray(RECV_SIZE)
        self._scratch_view = memoryview(self._scratch)
        #: sizes of the message being read (once its size table came), and its frames read so far
        self._sizes: Optional[tuple] = None
        self._frames: list = []
        #: a big frame being read straight into its own buffer, and the bytes it has so far
        self._big: Optional[bytearray] = None
        self._filled = 0
        #: buffers a send could not hand to the socket yet (non-blocking sockets), oldest first
        self._out: deque = deque()
        #: bytes waiting in ``_out``
        self.pending = 0
        #: why the link cannot be read on (the other end closed it, or broke the format), None while it can
        self.closed: Optional[str] = None
        self.malformed = False
        #: the other end's pid, when known (the agent reads it from the kernel: ``peer_pid``)
        self.pid = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- reading ------------------------------------------------------------------------------------

    def read(self, wait: bool = False) -> list[list]:
        """The messages complete once what the socket holds now is read; never waits, unless ``wait``: then the
        first read waits for data (on a blocking socket, at most its SO_RCVTIMEO), one system call where a poll
        then a read took two.

        When the other end closed the link, or sent something out of the limits (the stream cannot be
        read on), ``closed`` says why and ``malformed`` whether it was the latter; the messages that came
        before are returned all the same.
        """
        out: list[list] = []
        sock = self.sock
        flags = 0 if wait else socket.MSG_DONTWAIT
        while self.closed is None:
            try:
                if self._big is not None:
                    with memoryview(self._big) as view:
                        n = sock.recv_into(view[self._filled:], 0, flags)
                    flags = socket.MSG_DONTWAIT  # (the reads after the first one never wait)
                    if n == 0:
                        self.closed = "the other end closed the link"
                        break
                    self._filled += n
                    if self._filled < len(self._big):
                        continue
                    big, self._big = self._big, None
                    self._frames.append(bytes(big) if self.copy_big else big)
                    full = True
                else:
                    n = sock.recv_into(self._scratch, RECV_SIZE, flags)
                    flags = socket.MSG_DONTWAIT
                    if not n:
                        self.closed = "the other end closed the link"
                        break
                    full = n == RECV_SIZE
                    if self._buf or self._sizes is not None:
                        self._buf += self._scratch_view[:n]
                    else:
                        # Nothing left over from the previous read: the complete messages are cut from the scratch
                        # buffer itself, only an incomplete one is copied to go on with it.
                        try:
                            pos, sizes = link_cut(self._scratch, 0, n, MAX_FRAMES, MAX_HEADER_SIZE, self._max_frame, out)
                        except ValueError as exc:
                            self.closed, self.malformed = str(exc), True
                            break
                        if pos == n:
                            if full:
                                continue
                            break
                        if sizes is not None:  # its size table was read (and checked): its frames follow
                            self._sizes, self._frames = sizes, []
                            pos += 4 + 8 * len(sizes)
                        self._buf += self._scratch_view[pos:n]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ECONNRESET and the like: the other end is gone
                self.closed = f"the link broke: {exc}"
                break
            try:
                self._parse(out)
            except _OutOfLimits as exc:
                self.closed, self.malformed = str(exc), True
                break
            if not full and self._big is None:
                break  # a short read took all there was: poll says when more comes
        return out

    def _parse(self, out: list) -> None:
        """Cut the complete messages out of the buffer (and start a big frame's own buffer)."""
        buf = self._buf
        pos, end = 0, len(buf)
        sizes, frames = self._sizes, self._frames
        with memoryview(buf) as view:
            while True:
                if sizes is None:
                    # Every complete message at once, then the size table of one cut by the end of the read.
                    try:
                        pos, sizes = link_cut(buf, pos, end, MAX_FRAMES, MAX_HEADER_SIZE, self._max_frame, out)
                    except ValueError as exc:
                        raise _OutOfLimits(str(exc)) from None
                    if sizes is None:
                        break
                    pos += 4 + 8 * len(sizes)
                    frames = []
                count, i = len(sizes), len(frames)
                while i < count:
                    size = sizes[i]
                    if end - pos >= size:
                        frames.append(bytes(view[pos:pos + size]))
                        pos += size
                        i += 1
                    elif size >= BIG_FRAME:
                        self._big = bytearray(size)
                        self._big[:end - pos] = view[pos:end]
                        self._filled = end - pos
                        pos = end
                        break
                    else:
                        break
                if i < count:
                    break
                out.append(frames)
                sizes, frames = None, []
        self._sizes, self._frames = sizes, frames
        del buf[:pos]

    # -- sending ------------------------------------------------------------------------------------

    def send(self, frames: Sequence) -> bool:
        """Send one message; on a non-blocking socket what it does not take now waits in ``pending``.

        Return whether everything went (nothing pending). Raises LinkClosed if the other end is gone.
        """
        buffers, total = encode(frames)
        if self._out:
            self._queue(buffers)
            return False
        return self._write(buffers, total)

    def flush(self) -> bool:
        """Send more of what is pending (the socket became writable); return whether nothing is left."""
        if not self._out:
            return True
        buffers = list(self._out)
        self._out.clear()
        self.pending = 0
        return self._write(buffers)

    def _write(self, buffers: list, total: int = -1) -> bool:
        """Hand ``buffers`` to the socket (``total``: their size, when known), queueing what it does not take."""
        sock = self.sock
        while buffers:
            whole = len(buffers) <= _IOV_MAX
            batch = buffers if whole else buffers[:_IOV_MAX]
            try:
                sent = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # EPIPE, ECONNRESET: the other end is gone
                raise LinkClosed(f"the link broke: {exc}") from None
            if total < 0 or not whole:
                total = sum(_nbytes(b) for b in batch)
            if sent == total:
                del buffers[:len(batch)]
                total = -1
                continue
            total = -1
            # Partly taken: keep the rest, starting inside the buffer the socket stopped at.
            i = 0
            while sent:
                size = _nbytes(buffers[i])
                if sent < size:
                    buffers[i] = memoryview(buffers[i]).cast("B")[sent:]
                    break
                sent -= size
                i += 1
            del buffers[:i]
            if sock.getblocking():
                continue  # a blocking socket took part of it (a signal came): go on
            self._queue(buffers)
            return False
        return True

    def _queue(self, buffers: list) -> None:
        self._out.extend(buffers)
        self.pending += sum(_nbytes(b) for b in buffers)
