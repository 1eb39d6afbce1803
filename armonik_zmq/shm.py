"""Data that never crosses a socket on one host: descriptors handed over a Unix socket (SCM_RIGHTS).

A worker writes a large result once, into a nameless file (``O_TMPFILE``, mode 0400) of the
broker's segment directory, and links it under a fresh token when complete; only the token, the
size and a checksum travel on the ZeroMQ sockets. The completion naming it makes the broker adopt
the file once nobody can write it any more (a read lease is granted only then): the worker's bytes
are the stored data, nothing is copied, no message is needed. Where the worker cannot write there
(the directory is not on a filesystem with ``O_TMPFILE`` and leases), it writes a memfd, seals it
(``F_SEAL_SHRINK|GROW|WRITE|SEAL``) and hands it to the broker's data socket with
``socket.send_fds``; the broker copies it into the file (``sendfile``, in a helper thread) before
answering. Either way the task's completion is acknowledged only once the file is complete (and
fsynced, if asked): the result then survives a broker SIGKILL.
A local client (or worker) asks the same data socket for a result by id and gets a read-only
descriptor of that file, which it maps: the bytes are never copied into a socket, and the
checksum recorded in LMDB is verified on every read. See docs/data-path.md.

The data socket is ``SOCK_SEQPACKET`` (message boundaries kept, descriptors ride in the message's
ancillary data), in the broker's data directory (0700): only the broker's user can connect.
Messages are msgpack maps: ``{"op": "hello"}`` answered ``{"segment_dir": path or None, "fsync": bool}``;
``{"op": "put", "token", "size", "checksum"}`` + one fd, answered
``{"ok": true}`` or ``{"error": ...}``; ``{"op": "get", "session_id", "result_ids"}`` answered
``{"items": [...]}`` + one fd per item that has ``"fd": true``; such an item says ``"unchanged": true`` when the
broker vouches that the file is as it was when adopted (then the reader need not hash it, see ``_unchanged``).

Nothing here is named in ``/dev/shm``: a memfd, like a file not linked yet, disappears with its
last descriptor and mapping, so a crash leaks nothing; segment files are owned by LMDB rows and
swept when no row names them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import socket
import stat
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Optional, Sequence

import msgpack

try:  # xxh3 hashes 256 MiB in ~16 ms here, blake2b in ~520 ms: the checksum must not cost more than the copy
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; blake2b keeps working without it
    xxhash = None

log = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
#: tokens are made by the writer; the broker accepts only this shape, so a token can name a file safely
TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")
#: result ids per "get" message (SCM_RIGHTS carries at most 253 descriptors per message)
GET_BATCH = 200
_MAX_MESSAGE = 1 << 20
_PUT_TIMEOUT = 60.0


class DataError(Exception):
    """Shared-memory data that cannot be used: a checksum mismatch, a segment lost or not sealed."""


# -- checksums ----------------------------------------------------------------------------------------

def _hasher(algorithm: str):
    if algorithm == "xxh3" and xxhash is not None:
        return xxhash.xxh3_128()
    if algorithm == "b2":
        return hashlib.blake2b(digest_size=16)
    raise DataError(f"unknown checksum algorithm {algorithm!r} (install xxhash to read xxh3 checksums)")


def checksum(buffers: Iterable, algorithm: Optional[str] = None) -> str:
    """Return ``"<algorithm>:<hex digest>"`` of the concatenated buffers (xxh3-128 if available, else blake2b)."""
    algorithm = algorithm or ("xxh3" if xxhash is not None else "b2")
    h = _hasher(algorithm)
    for buf in buffers:
        h.update(buf)
    return f"{algorithm}:{h.hexdigest()}"


def verify(view, expected: str, what: str) -> None:
    """Raise ``DataError`` unless ``view`` has the checksum ``expected`` (computed with the same algorithm)."""
    algorithm = expected.partition(":")[0]
    got = checksum([view], algorithm)
    if got != expected:
        raise DataError(f"{what}: checksum mismatch (recorded {expected}, read {got}): the data is damaged; "
                        f"run the task that produced it again")


# -- segments ---------------------------------------------------------------------------------------

def nbytes(buffers: Sequence) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


#: bytes per write(2): a 256 MiB write in one call makes the page cache take 2 MiB folios, which on a VM
#: whose balloon reports free 2 MiB blocks to the host cost a host fault each (256 MiB: 0.1 s to 1.5 s);
#: 256 KiB writes keep 0.09-0.23 s (docs/data-path.md)
_WRITE_CHUNK = 256 << 10


#: buffers per writev(2) at most (IOV_MAX is 1024)
_MAX_IOV = 512


def _write_all(fd: int, buffers: Sequence) -> tuple[int, str]:
    """Write the buffers to ``fd`` once, hashing them on the way; return (size, checksum).

    Every write ends at a multiple of ``_WRITE_CHUNK`` in the file, small buffers (a pickle's header and stream)
    joining the next slice in one ``writev``: writes that start off those boundaries (a 192-byte header, then
    the array) made the page cache take small folios all along, +30% kernel time per MiB written here.
    """
    algorithm = "xxh3" if xxhash is not None else "b2"
    h = _hasher(algorithm)
    size = 0
    batch: list = []
    room = _WRITE_CHUNK
    for buf in buffers:
        view = memoryview(buf).cast("B")
        h.update(view)
        while view:
            piece = view[:room]
            batch.append(piece)
            room -= len(piece)
            view = view[len(piece):]
            if not room or len(batch) >= _MAX_IOV:
                size += _writev_all(fd, batch)
                batch, room = [], _WRITE_CHUNK - size % _WRITE_CHUNK
    if batch:
        size += _writev_all(fd, batch)
    return size, f"{algorithm}:{h.hexdigest()}"


def _writev_all(fd: int, views: list) -> int:
    """``writev`` the views completely (again after a short write); return their size."""
    total = left = sum(len(v) for v in views)
    while True:
        n = os.writev(fd, views)
        left -= n
        if not left:
            return total
        while n:  # drop what went
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def write_segment(buffers: Sequence, name: str = "armonik-zmq") -> tuple[int, int, str]:
    """Write the buffers once into a new sealed memfd; return (fd, size, checksum). The caller closes fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size, digest = _write_all(fd, buffers)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd, size, digest


def write_file(dir_fd: int, token: str, buffers: Sequence, fsync: bool = False) -> tuple[int, str]:
    """Write the buffers once into a new file ``token`` (mode 0400) of the directory ``dir_fd``; return (size, checksum).

    The file is written nameless (``O_TMPFILE``) and linked under ``token`` only when complete (and
    fsynced, if asked): its name never shows a partial file, and a writer killed half-way leaves
    nothing behind. The writable descriptor is closed on return.
    """
    wfd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o400, dir_fd=dir_fd)
    try:
        size, digest = _write_all(wfd, buffers)
        if fsync:
            os.fsync(wfd)
        # os.link follows the /proc magic link only through linkat, which a dir fd selects
        os.link(f"/proc/self/fd/{wfd}", token, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(wfd)
    if fsync:
        os.fsync(dir_fd)
    return size, digest


def check_unwritable(fd: int) -> None:
    """Raise ``DataError`` if any process holds the file open for writing (or mapped writable).

    A read lease is granted only when there is no writer; it is dropped at once: it is a probe.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        raise DataError(f"the file is still open for writing somewhere ({exc.strerror}): "
                        f"close every writable descriptor before handing it over") from None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


#: the name of files_supported's test file (removed at once; a broker start removes one a crash left)
_PROBE = "probe-"


def files_supported(directory: str) -> bool:
    """Whether writers can put segments straight into ``directory`` (O_TMPFILE, linkat and read leases work)."""
    token = f"{_PROBE}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        write_file(dir_fd, token, [b"\0"])
        fd = os.open(token, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            check_unwritable(fd)
        finally:
            os.close(fd)
        return True
    except (OSError, DataError):
        return False
    finally:
        try:
            os.unlink(token, dir_fd=dir_fd)
        except OSError:
            pass
        os.close(dir_fd)


def map_fd(fd: int, size: int) -> memoryview:
    """Map ``size`` bytes of ``fd`` read-only; the returned view keeps the mapping alive (fd may be closed)."""
    if size == 0:
        return memoryview(b"")
    return memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))


def check_sealed(fd: int, size: int) -> None:
    """Refuse a descriptor that is not a fully sealed memfd of ``size`` bytes."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise DataError(f"the descriptor is not a sealable memfd ({exc.strerror})") from None
    if seals & SEALS != SEALS:
        raise DataError(f"the memfd is not sealed (seals {seals:#x}, need {SEALS:#x})")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise DataError(f"the memfd holds {actual} bytes, the message says {size}")


def host_id() -> str:
    """Identify this host (and boot): a data socket path seen from another host must not be trusted."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


# -- the client side of the data socket ------------------------------------------------------------

class DataChannel:
    """A connection to a broker's data socket: hand over segments, get result descriptors."""

    def __init__(self, path: str, timeout: float = _PUT_TIMEOUT):
        self.path = path
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        #: the broker's segment directory, where results are written straight into files ("": memfds; None: not asked yet)
        self.segment_dir: Optional[str] = None
        self._dir_fd = -1
        self._fsync = False

    @classmethod
    def open(cls, config: dict) -> Optional["DataChannel"]:
        """Connect to the data socket a broker advertised (``data_socket``, ``host_id``), if it is on this host."""
        path = config.get("data_socket")
        if not path or config.get("host_id") != host_id():
            return None
        try:
            return cls(path)
        except OSError as exc:
            log.info("broker data socket %s unreachable (%s): data goes over the sockets", path, exc.strerror)
            return None

    def _request(self, msg: dict, fds: Sequence[int] = ()) -> tuple[dict, list[int]]:
        with self._lock:
            raw = msgpack.packb(msg, use_bin_type=True)
            if fds:
                socket.send_fds(self.sock, [raw], list(fds))
            else:
                self.sock.sendall(raw)
            data, got, flags, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, GET_BATCH + 1)
        if not data:
            for fd in got:
                os.close(fd)
            raise DataError("the broker closed its data socket")
        reply = msgpack.unpackb(data, raw=False)
        if "error" in reply:
            for fd in got:
                os.close(fd)
            raise DataError(reply["error"])
        return reply, got

    def put(self, buffers: Sequence) -> dict:
        """Write the buffers once where the broker keeps them; return ``{token, size, checksum}``.

        When the broker offers its segment directory, the file is written there and named by the
        writer: no message, no copy; the completion naming it makes the broker adopt it. Otherwise the
        buffers go into a sealed memfd that is handed to the broker, which copies it into its file
        before answering.
        """
        if self.segment_dir is None:
            self._hello()
        token = os.urandom(16).hex()
        if self._dir_fd >= 0:
            try:
                size, digest = write_file(self._dir_fd, token, buffers, self._fsync)
                return {"token": token, "size": size, "checksum": digest}
            except OSError as exc:
                log.warning("cannot write into %s (%s): this result goes through a memfd", self.segment_dir, exc)
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT,
                                 errno.EXDEV, errno.EINVAL):  # it will not work next time either
                    os.close(self._dir_fd)
                    self._dir_fd, self.segment_dir = -1, ""
        fd, size, digest = write_segment(buffers)
        try:
            self._request({"op": "put", "token": token, "size": size, "checksum": digest}, [fd])
        finally:
            os.close(fd)
        return {"token": token, "size": size, "checksum": digest}

    def _hello(self) -> None:
        """Ask the broker where it keeps segment files (and whether it fsyncs them)."""
        reply, fds = self._request({"op": "hello"})
        for fd in fds:
            os.close(fd)
        self.segment_dir = reply.get("segment_dir") or ""
        self._fsync = bool(reply.get("fsync"))
        if self.segment_dir:
            try:
                self._dir_fd = os.open(self.segment_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                log.info("cannot open %s (%s): results go through memfds", self.segment_dir, exc.strerror)
                self.segment_dir = ""

    def segments(self, session_id: str, result_ids: Sequence[str]) -> set:
        """Return which of the results are shared-memory segments (nothing is opened or mapped)."""
        found = set()
        for start in range(0, len(result_ids), GET_BATCH):
            reply, fds = self._request({"op": "get", "session_id": session_id,
                                        "result_ids": list(result_ids[start:start + GET_BATCH]), "open": False})
            for fd in fds:
                os.close(fd)
            found.update(item["result_id"] for item in reply["items"] if item.get("segment"))
        return found

    def get(self, session_id: str, result_ids: Sequence[str], check: bool = True) -> dict:
        """Map the results of the list that are shared segments; return result id -> read-only memoryview.

        Results kept another way (small ones, in LMDB) are absent: fetch them over the sockets. A
        result whose data does not match its recorded checksum maps to a ``DataError`` instead; the
        checksum is computed unless the broker says the file is unchanged since it adopted it.
        """
        out = {}
        for start in range(0, len(result_ids), GET_BATCH):
            batch = list(result_ids[start:start + GET_BATCH])
            reply, fds = self._request({"op": "get", "session_id": session_id, "result_ids": batch})
            fds_iter = iter(fds)
            try:
                for item in reply["items"]:
                    if not item.get("fd"):
                        continue
                    fd = next(fds_iter)
                    try:
                        view = map_fd(fd, item["size"])
                    finally:
                        os.close(fd)
                    if check and not item.get("unchanged"):
                        try:
                            verify(view, item["checksum"], f"result {item['result_id']}")
                        except DataError as exc:
                            view = exc
                    out[item["result_id"]] = view
            finally:
                for fd in fds_iter:
                    os.close(fd)
        return out

    def close(self) -> None:
        self.sock.close()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


# -- the broker side ------------------------------------------------------------------------------

_client_channels: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def channel_of(conn) -> Optional[DataChannel]:
    """The data socket of the broker a client ``Connection`` talks to, if it is on this host (cached per connection)."""
    if conn in _client_channels:
        return _client_channels[conn]
    from .protocol import Op

    header, _ = conn.call(Op.GET_SERVICE_CONFIG)
    channel = DataChannel.open(header)
    _client_channels[conn] = channel
    return channel


def drop_channel(conn) -> None:
    """Forget (and close) the cached data socket of a client ``Connection``: the next use connects again."""
    channel = _client_channels.pop(conn, None)
    if channel is not None:
        channel.close()


#: seconds between two looks at released segments (their files go at once, not at the next sweep)
_UNLINK_INTERVAL = 0.1

#: <time.h> (Linux): the clock the kernel stamps file times with
_CLOCK_REALTIME_COARSE = 5

#: segment files the broker vouches for at once (64k: at least 16 GiB of results at the default threshold)
_MAX_STAMPS = 1 << 16

#: seconds an adopted segment stays pinned while no committed row names it (its completion was rolled back)
_ADOPTED_PIN = 600.0


class _Segment:
    __slots__ = ("fd", "size", "checksum", "spill", "received", "adopted")

    def __init__(self, fd: int, size: int, digest: str, spill: Future):
        self.fd = fd
        self.size = size
        self.checksum = digest
        self.spill = spill
        self.received = time.monotonic()
        #: a completion named it: kept until a committed row names it (never judged by ``grace``)
        self.adopted = False


class SegmentStore:
    """The broker's segments: receives memfds on the data socket, spills them to files, serves descriptors.

    Files live in ``<data_dir>/segments`` (0700), one per segment, named by its token, mode 0400.
    A file is the result's data once an LMDB ``segment_files`` row names it; the sweeper removes
    files no row names (a task that failed after writing, a result deleted or purged), after
    ``grace`` seconds, so a completion re-sent after a restart still finds its file.
    """

    def __init__(self, store, data_dir: str, socket_path: Optional[str] = None, fsync: bool = False,
                 grace: float = 600.0, sweep_interval: Optional[float] = None):
        self.store = store
        self.dir = os.path.join(os.path.abspath(data_dir), "segments")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        #: writers put files straight into ``dir`` (one copy per byte); else sealed memfds copied here
        self.files = files_supported(self.dir)
        self.fsync = fsync
        self.grace = grace
        #: seconds between sweeps (sooner with a short grace, so tests and small hosts see files go quickly)
        self.sweep_interval = sweep_interval if sweep_interval is not None else min(5.0, max(0.2, grace / 2))
        self.path = socket_path or os.path.join(os.path.abspath(data_dir), "data.sock")
        if len(self.path.encode()) > 107:
            raise RuntimeError(f"data socket path {self.path!r} is longer than a Unix socket allows (107 bytes): "
                             f"use a shorter --data-dir")
        self._segments: dict[str, _Segment] = {}
        #: tokens whose row was deleted: their file goes at the next sweep that no longer sees the row
        self._released: set[str] = set()
        #: token -> the file's identity when it was adopted with nobody writing it (see ``_unchanged``)
        self._stamps: dict[str, tuple] = {}
        #: at most this many (~0.4 KiB each): files adopted beyond it are hashed by their readers
        self.max_stamps = _MAX_STAMPS
        #: files changed before this process started are never vouched for (an OS crash may have torn them);
        #: read on the clock file times come from (coarse: it may lag the precise one by a tick)
        self._started_ns = time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._spiller = ThreadPoolExecutor(max_workers=2, thread_name_prefix="armonik-zmq-spill")
        self.stats = {"put": 0, "get": 0, "spilled_bytes": 0, "swept": 0, "refused": 0}
        for name in os.listdir(self.dir):  # a copy (or a start-up probe) cut short by a crash is garbage
            if name.endswith(".part") or name.startswith(_PROBE):
                os.unlink(os.path.join(self.dir, name))
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket file is 0600 from birth: no window where others could connect
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(64)
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="armonik-zmq-data", daemon=True)
        self._thread.start()

    def advertise(self) -> dict:
        """The fields peers need to find this socket (GET_SERVICE_CONFIG, AGENT_REGISTER replies)."""
        return {"data_socket": self.path, "host_id": host_id()}

    def file_path(self, token: str) -> str:
        return os.path.join(self.dir, token)

    # -- receiving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        next_sweep = time.monotonic() + self.sweep_interval
        next_unlink = 0.0
        while self._running:
            for key, _ in sel.select(min(0.5, self.sweep_interval)):
                if key.fileobj is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    self._serve_one(conn)
                except (ConnectionError, BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sel.unregister(conn)
                    conn.close()
                except _Closed:
                    sel.unregister(conn)
                    conn.close()
            now = time.monotonic()
            try:
                if now >= next_sweep:
                    next_sweep = now + self.sweep_interval
                    self.sweep()
                elif self._released and now >= next_unlink:
                    next_unlink = now + _UNLINK_INTERVAL
                    self.unlink_released()
            except Exception:
                log.exception("segment sweep failed")
        sel.close()

    def _serve_one(self, conn: socket.socket) -> None:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 4)
        if not data:
            for fd in fds:
                os.close(fd)
            raise _Closed()
        try:
            msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=1 << 16, max_array_len=GET_BATCH,
                                  max_map_len=16, max_bin_len=0, max_ext_len=0)
            if not isinstance(msg, dict):
                raise DataError("a data socket message is a msgpack map")
            op = msg.get("op")
            if op == "put":
                self._put(conn, msg, fds)  # answered once the segment is in its file (see _spill)
                return
            elif op == "get":
                reply, out = self._get(msg)
            elif op == "hello":
                reply, out = {"segment_dir": self.dir if self.files else None, "fsync": self.fsync}, []
            else:
                raise DataError(f"unknown op {op!r} on the data socket (put, get, hello)")
        except (DataError, ValueError, KeyError, TypeError) as exc:
            self.stats["refused"] += 1
            reply, out = {"error": str(exc)}, []
        finally:
            for fd in fds:
                os.close(fd)
        try:
            self._send(conn, reply, out)
        finally:
            for fd in out:
                os.close(fd)

    def _send(self, conn: socket.socket, reply: dict, fds: Sequence[int] = ()) -> None:
        """Send one reply on a (non-blocking) connection; from the serving thread or a spill thread."""
        import select

        raw = msgpack.packb(reply, use_bin_type=True)
        deadline = time.monotonic() + 5.0
        with self._send_lock:
            while True:
                try:
                    if fds:
                        socket.send_fds(conn, [raw], list(fds))
                    else:
                        conn.send(raw)
                    return
                except (BlockingIOError, InterruptedError):
                    if time.monotonic() > deadline:
                        raise ConnectionError("peer does not read its replies") from None
                    select.select([], [conn], [], 0.1)

    def _put(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        """Take a sealed memfd; answer once it is copied into its file, so a worker never outruns the copies.

        That answer is the backpressure that bounds the memfds the broker holds (one per writing
        worker), and it comes before the worker's report: the completion then never waits.
        """
        token, size, digest = msg.get("token"), msg.get("size"), msg.get("checksum")
        if len(fds) != 1:
            raise DataError(f"a put carries exactly one descriptor, got {len(fds)}")
        if not isinstance(token, str) or not TOKEN_RE.match(token):
            raise DataError("token must be 32 lowercase hex digits")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or ":" not in digest:
            raise DataError("put needs an integer size and a checksum '<algorithm>:<hex>'")
        fd = fds[0]
        check_sealed(fd, size)
        with self._lock:
            if token in self._segments or os.path.exists(self.file_path(token)):
                raise DataError(f"segment {token} was already handed over")
            seg = _Segment(fd, size, digest, None)
            self._segments[token] = seg
        fds.clear()
        seg.spill = self._spiller.submit(self._spill, token, seg)
        self.stats["put"] += 1

        def answer(done: Future) -> None:
            exc = done.exception()
            try:
                self._send(conn, {"ok": True} if exc is None else {"error": f"segment {token} not stored: {exc}"})
            except OSError:
                pass  # the worker is gone; its segment is swept after the grace period

        seg.spill.add_done_callback(answer)

    def _spill(self, token: str, seg: _Segment) -> None:
        """Copy a memfd into its file (sendfile: no user-space copy); fsync when asked; then drop the memfd."""
        part = self.file_path(token) + ".part"
        out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            offset = 0
            while offset < seg.size:
                n = os.sendfile(out, seg.fd, offset, seg.size - offset)
                if n == 0:
                    raise DataError(f"segment {token} ended after {offset} of {seg.size} bytes")
                offset += n
            if self.fsync:
                os.fsync(out)
        except BaseException:
            os.close(out)
            os.unlink(part)
            with self._lock:  # the memfd is useless now: the completion naming it is refused (SEGMENT_LOST)
                if seg.fd >= 0:
                    os.close(seg.fd)
                    seg.fd = -1
            raise
        os.close(out)
        os.rename(part, self.file_path(token))
        st = os.stat(self.file_path(token))  # after the rename, which sets the ctime
        self._stamp(token, st, st)
        if self.fsync:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.stats["spilled_bytes"] += seg.size
        with self._lock:
            if self._segments.get(token) is seg:
                os.close(seg.fd)
                seg.fd = -1

    # -- the broker loop's side -----------------------------------------------------------------------

    def adopt(self, token: str, size: int, digest: str, what: str) -> None:
        """Wait until segment ``token`` is safely in its file; raise ``DataError`` if it cannot be.

        A file its writer named in the segment directory (the usual way) is adopted once it is a
        private file of the right size that nobody has open for writing; so is a memfd's copy made
        before a broker restart (the memfd itself died with the broker).
        """
        if not TOKEN_RE.match(token):
            raise DataError(f"{what}: invalid segment token")
        with self._lock:
            seg = self._segments.get(token)
        if seg is not None:
            if seg.size != size or seg.checksum != digest:
                raise DataError(f"{what}: segment {token} is {seg.size} bytes with checksum {seg.checksum}, "
                                f"the report says {size} bytes, {digest}")
            try:
                seg.spill.result(timeout=_PUT_TIMEOUT)
            except Exception as exc:
                raise DataError(f"{what}: segment {token} could not be stored: {exc}") from None
            seg.received = time.monotonic()
            seg.adopted = True  # pinned: a turn may take long before its commit makes the row visible
            return
        # Its bytes are not read here (a 256 MiB checksum would stall the loop): every reader verifies it.
        done: Future = Future()
        done.set_result(None)
        seg = _Segment(-1, size, digest, done)
        seg.adopted = True
        with self._lock:  # pending from now until its row is committed: the sweeper must not take it
            self._segments[token] = seg
        try:
            self._check_file(token, size, what)
        except BaseException:
            with self._lock:
                if self._segments.get(token) is seg:
                    del self._segments[token]
            raise

    def _check_file(self, token: str, size: int, what: str) -> None:
        try:
            fd = os.open(self.file_path(token), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            raise DataError(f"{what}: segment {token} is lost (never written, or the broker restarted "
                            f"before storing it)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise DataError(f"{what}: segment {token} is not a private file of the broker's user")
            if st.st_size != size:
                raise DataError(f"{what}: segment {token} holds {st.st_size} bytes, the report says {size}")
            try:  # its writer closed it: nobody can change it under its readers any more
                check_unwritable(fd)
            except DataError as exc:
                raise DataError(f"{what}: segment {token}: {exc}") from None
            self._stamp(token, st, os.fstat(fd))
        finally:
            os.close(fd)

    def _stamp(self, token: str, before: os.stat_result, after: os.stat_result) -> None:
        """Remember a file's identity at adoption (taken around the no-writer check, and unchanged across it).

        A file changed before this broker started (a restart, maybe after an OS crash that tore it) is not
        stamped: its readers hash it.
        """
        stamp = _identity(after)
        if _identity(before) == stamp and after.st_ctime_ns >= self._started_ns:
            with self._lock:
                if len(self._stamps) < self.max_stamps:
                    self._stamps[token] = stamp

    def _unchanged(self, token: str, fd: int) -> bool:
        """Whether the open segment file ``fd`` is, byte for byte, what its writer hashed.

        Its writer computed the checksum over the bytes it wrote; when the broker adopted the file nobody
        held it writable. Any later change (a write, through a descriptor or a mapping, a truncate, a chmod
        to make it writable) sets its ctime, which nobody can set back, and the kernel (6.13+: multigrain
        timestamps) gives a change after our fstat a later ctime even within one clock tick. The page cache
        cannot tear without an OS crash, after which this process is gone with its stamps. So the checksum
        then proves nothing more, and the reader skips hashing (0.02-0.05 s per 256 MiB, page faults
        included; the broker's fstat costs microseconds). Any doubt (no stamp: adopted before a restart) and
        the reader hashes.
        """
        with self._lock:
            stamp = self._stamps.get(token)
        return stamp is not None and _identity(os.fstat(fd)) == stamp

    def open_file(self, token: str) -> int:
        return os.open(self.file_path(token), os.O_RDONLY | os.O_CLOEXEC)

    def read(self, token: str, offset: int, length: int) -> bytes:
        fd = self.open_file(token)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    # -- serving reads ------------------------------------------------------------------------------

    def _get(self, msg: dict) -> tuple[dict, list[int]]:
        sid, ids = msg.get("session_id"), msg.get("result_ids")
        if not isinstance(sid, str) or not isinstance(ids, list) or not all(isinstance(r, str) for r in ids):
            raise DataError("get needs a session_id and a list of result_ids")
        if len(ids) > GET_BATCH:
            raise DataError(f"at most {GET_BATCH} result ids per get")
        items, fds = [], []
        open_fds = msg.get("open", True) is not False
        from .broker.store import decode_row
        try:
            with self.store.readers_lock, self.store.env.begin(write=False) as txn:
                for rid in ids:
                    item = {"result_id": rid}
                    items.append(item)
                    row = txn.get(rid.encode(), db=self.store.results)
                    row = decode_row(row) if row is not None else None
                    if row is None or row["session_id"] != sid:
                        item["error"] = f"result {rid} not found in session {sid}"
                        continue
                    if row["status"] != 2:  # ResultStatus.COMPLETED
                        item["error"] = f"result {rid} has no data (status {row['status']})"
                        continue
                    obj = txn.get(rid.encode(), db=self.store.data)  # its object row
                    obj = decode_row(obj) if obj is not None else None
                    if obj is None or "segment" not in obj:
                        continue  # kept in LMDB: over the sockets
                    if not open_fds:
                        item["segment"] = True
                        continue
                    try:
                        fds.append(self.open_file(obj["segment"]))
                    except OSError as exc:  # gone (e.g. after an OS crash): the socket path reports it
                        item["error"] = f"result {rid}: segment {obj['segment']} cannot be read ({exc.strerror})"
                        continue
                    item.update(fd=True, size=obj["size"], checksum=obj["checksum"])
                    if self._unchanged(obj["segment"], fds[-1]):
                        item["unchanged"] = True
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.stats["get"] += len(fds)
        return {"items": items}, fds

    # -- lifetime -------------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Remove segment files no LMDB row names (at once if released, else after ``grace``); return how many.

        Segments received but never adopted (their task failed, its report never came) are forgotten
        after ``grace``; adopted ones as soon as their row is committed.
        """
        now_wall = time.time()
        mono = time.monotonic()
        removed = 0
        with self.store.readers_lock, self.store.env.begin(write=False) as txn:
            def named(token: str) -> bool:
                return txn.get(token.encode(), db=self.store.segment_files) is not None

            # a segment leaves ``pending`` once a committed row names it; one never adopted after
            # ``grace``; an adopted one whose completion was rolled back after a long pin
            with self._lock:
                for token, seg in list(self._segments.items()):
                    limit = max(self.grace, _ADOPTED_PIN) if seg.adopted else self.grace
                    gone = token in self._released  # committed, then deleted before a sweep saw it
                    if seg.spill.done() and (named(token) or gone or mono - seg.received > limit):
                        del self._segments[token]
                        if seg.fd >= 0:
                            os.close(seg.fd)
                            seg.fd = -1
                pending = set(self._segments)
                released, self._released = self._released, set()
        # a snapshot taken after that decision: it sees every commit of the segments just let go
        with self.store.readers_lock, self.store.env.begin(write=False) as txn:
            for name in os.listdir(self.dir):
                if name in pending or not TOKEN_RE.match(name):
                    continue
                if named(name):
                    continue
                path = self.file_path(name)
                try:
                    if name not in released and now_wall - os.stat(path).st_mtime < self.grace:
                        continue
                    os.unlink(path)
                    removed += 1
                    with self._lock:
                        self._stamps.pop(name, None)
                except FileNotFoundError:
                    pass
            # a released token whose row is still there (the delete was rolled back) stays released
            with self._lock:
                self._released |= {t for t in released if named(t)}
        self.stats["swept"] += removed
        return removed

    def unlink_released(self) -> int:
        """Remove now the files of released tokens that no committed row names any more; return how many.

        The sweep would remove them too, up to ``sweep_interval`` later; freed at once, their pages are
        reused by the next results instead of fresh ones (on a VM whose balloon takes back free memory
        after ~2 s, fresh pages cost more: docs/data-path.md, "Fresh memory"). A token whose row is
        still there (its delete not committed yet, or rolled back) stays released.
        """
        with self._lock:
            released, self._released = self._released, set()
        kept, removed = set(), 0
        with self.store.readers_lock, self.store.env.begin(write=False) as txn:
            for token in released:
                if txn.get(token.encode(), db=self.store.segment_files) is not None:
                    kept.add(token)
                    continue
                with self._lock:  # as in sweep: adopted, committed, then deleted before a sweep saw it
                    seg = self._segments.get(token)
                    if seg is not None:
                        if not seg.spill.done():
                            kept.add(token)
                            continue
                        del self._segments[token]
                        if seg.fd >= 0:
                            os.close(seg.fd)
                            seg.fd = -1
                    self._stamps.pop(token, None)
                try:
                    os.unlink(self.file_path(token))
                    removed += 1
                except FileNotFoundError:
                    pass
        with self._lock:
            self._released |= kept
        self.stats["swept"] += removed
        return removed

    def forget(self, token: str) -> None:
        """Called when a row naming ``token`` is deleted: the file goes at the first sweep after the commit."""
        with self._lock:
            self._released.add(token)
            self._stamps.pop(token, None)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self.listener.close()
        self._spiller.shutdown(wait=True)
        with self._lock:
            for seg in self._segments.values():
                if seg.fd >= 0:
                    os.close(seg.fd)
            self._segments.clear()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Closed(Exception):
    pass


def _identity(st: os.stat_result) -> tuple:
    """What changes with any change to a file's bytes or mode (ctime cannot be set back by anyone)."""
    return st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns


def segment_mode_ok(path: str) -> bool:
    """True if a file is readable by its owner only (0400 or 0600)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
