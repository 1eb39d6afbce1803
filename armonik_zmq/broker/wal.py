"""The broker's write-ahead log: a commit is durable once its record is flushed (one ``fdatasync`` of a few pages).

With the log on, LMDB commits with ``sync=False``; each write transaction's puts and deletes (captured by
``_core.LoggedTxn``) are appended to the log as one record, then the log is flushed, and only then does anything
leave that acknowledges the transaction (docs/durability.md). A checkpoint (``Checkpoints`` in store.py) makes
LMDB durable up to a record, and the log before it is recycled.

A record is ``checksum (4 bytes) | seq (8) | length (4) | ops`` (little-endian); the checksum covers seq, length and
ops. The length's top bit says which checksum: set, CRC32C (``_core.crc32c``: the CPU's crc32 instruction, ~3x zlib's
crc32, which was the log's largest CPU cost in bulk); clear, zlib's crc32 (records written before it, still read). Records follow one another in segment files ``<index>.wal`` (16 digits), which are preallocated with real
blocks (written zeros, or a recycled segment) so that a flush commits no file size or extent: only the record's
pages. Sequence numbers never repeat, so the bytes of a recycled segment's earlier records are recognised as
stale; a record cut short by a crash fails its checksum and ends the log there.

Segments are written with O_DIRECT and O_DSYNC where the file system allows it: a record goes from the turn's
``WalOps`` buffer to the disk in one ``pwrite`` of whole 4 KiB blocks (the active segment's last partial block again,
the record, zeros to the block's end), durable when it returns: no copy into the page cache, no writeback, one system
call. Elsewhere (tmpfs, a file system that refuses O_DIRECT or its alignment) a record is written through the page
cache and flushed with ``fdatasync``. The bytes on disk are the same either way.

A turn whose ops reach ``STREAM_PIECE`` streams them to a file of its record's own as it adds them (``WalOps.spill_to``,
``Log.spill``); the record's first block, with the head, is written last, then the file is flushed. The format is
the same: a crash before the head leaves a file starting with zeros, which the replay passes over.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from typing import Iterator

from .._core import WAL_PUT, WalOps, crc32c, crc32c_combine

log = logging.getLogger("armonik_zmq.broker")

#: a segment's size: a record that does not fit in the rest of one starts the next (a larger record gets a
#: file of its own). 16 MiB: thousands of turns of small tasks; a new segment costs one directory flush.
SEGMENT_BYTES = 16 << 20
#: recycled segments kept for reuse (more are deleted). Four: a checkpoint is due after 32 MiB of log (two
#: segments), and the log goes on while its flush runs, so at full speed a second's worth of segments is freed at
#: once; with fewer, the loop would write a new segment of zeros (16 MiB and its flush) every second or so
SPARE_SEGMENTS = 4
#: a record larger than this, when no spare segment is left, gets a file of its own rather than a new segment: 16 MiB
#: of zeros written first (~35 ms, the disk's) would cost more than the record's own file (its size committed with it)
LARGE_RECORD = 4 << 20
#: a turn's ops stream to a file of their record's own once they reach this many bytes (``WalOps.spill_to``), in
#: whole blocks as they come: the turns' buffer then stays this size for good, where bulk records (9-52 MB) made it
#: grow, a page fault per 4 KiB
STREAM_PIECE = 4 << 20
_HEAD = struct.Struct("<IQI")  # crc32, seq, length of the ops
_SEQ_LENGTH = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_OP = struct.Struct("<BBHI")  # kind, table, key length, value length (_core.WalOps)
_ZEROS = bytes(1 << 20)
#: a direct write's alignment: memory, file offset and length (_core.WalOps.write_direct)
BLOCK = 4096


#: in a record's length field: its checksum is CRC32C (else zlib's crc32); the length is the other 31 bits
_CRC32C_FLAG = 1 << 31


def _crc(seq_and_length: bytes, ops) -> int:
    """The checksum of a record whose head (after the checksum) is ``seq_and_length``, by the kind its flag names."""
    if _SEQ_LENGTH.unpack(seq_and_length)[1] & _CRC32C_FLAG:
        return crc32c(ops, crc32c(seq_and_length))
    return zlib.crc32(ops, zlib.crc32(seq_and_length))


def frame(seq: int, ops) -> bytes:
    """The head of the record ``seq`` carrying ``ops`` (the record is this followed by ops): a CRC32C record."""
    if len(ops) >= _CRC32C_FLAG:
        raise OSError(f"a write-ahead log record of {len(ops)} bytes (at most {_CRC32C_FLAG - 1})")
    body = _SEQ_LENGTH.pack(seq, len(ops) | _CRC32C_FLAG)
    return _CRC.pack(crc32c(ops, crc32c(body))) + body


def frame_streamed(seq: int, length: int, ops_crc: int) -> bytes:
    """``frame`` of ``length`` bytes of ops whose CRC32C is ``ops_crc`` (a streamed record: its ops are on disk)."""
    if length >= _CRC32C_FLAG:
        raise OSError(f"a write-ahead log record of {length} bytes (at most {_CRC32C_FLAG - 1})")
    body = _SEQ_LENGTH.pack(seq, length | _CRC32C_FLAG)
    return _CRC.pack(crc32c_combine(crc32c(body), ops_crc, length)) + body


#: zeros in page-aligned memory, for direct writes (``_fill_zeros``); mapped at first use
_direct_zeros: mmap.mmap | None = None


def _fill_zeros(fd: int, size: int, path: str | None = None) -> None:
    """Write ``size`` bytes of zeros at the start of ``fd`` (file ``path``) and flush them: real blocks, no hole.

    Directly (O_DIRECT) where the file system allows it: through the page cache, 16 MiB of zeros cost the broker
    ~34 ms of CPU (the copy, then the writeback), directly ~1 ms, and they leave no 16 MiB of cached zeros behind."""
    global _direct_zeros
    done = 0
    if path is not None and hasattr(os, "O_DIRECT") and size % BLOCK == 0:
        try:
            direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:  # no O_DIRECT here (tmpfs): through the page cache
            direct = -1
        if direct >= 0:
            try:
                if _direct_zeros is None:
                    _direct_zeros = mmap.mmap(-1, len(_ZEROS))
                with memoryview(_direct_zeros) as zeros:
                    while done < size:
                        done += os.pwrite(direct, zeros[:min(len(zeros), size - done)], done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the alignment is refused; the rest through the page cache
                    raise
            finally:
                os.close(direct)
    while done < size:
        done += os.pwrite(fd, _ZEROS[:min(len(_ZEROS), size - done)], done)
    os.fsync(fd)  # the blocks, the file's size and extents, and the disk's cache (direct writes too: per inode)


def sync_directory(directory: str) -> None:
    """Flush ``directory`` itself, so that a file created, renamed or removed in it stays so after a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def decode_ops(ops: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Yield (kind, table index, key, value) for each op of a record (``_core.WalOps``' encoding)."""
    at, end = 0, len(ops)
    view = memoryview(ops)
    while at < end:
        kind, table, klen, vlen = _OP.unpack_from(ops, at)
        at += _OP.size
        key = bytes(view[at:at + klen])
        at += klen
        yield kind, table, key, bytes(view[at:at + vlen])
        at += vlen


def read_records(data, after: int) -> tuple[list[tuple[int, bytes]], int, str]:
    """Read the records of one segment's bytes that follow record ``after``, in order.

    Return (the records as (seq, ops), the offset where reading stopped, why it stopped). Records numbered
    ``after`` or below are skipped (the checkpoint covers them, or they are a recycled segment's stale ones); the
    first record that is neither that nor the next expected number, or fails its checksum, ends the segment.
    """
    records = []
    expected = after + 1
    at, size = 0, len(data)
    while True:
        if at + _HEAD.size > size:
            return records, at, "the end of the segment"
        crc, seq, length = _HEAD.unpack_from(data, at)
        if seq > expected or (seq == 0 and crc == 0 and length == 0):
            return records, at, _describe(data, at, seq, expected)
        end = at + _HEAD.size + (length & ~_CRC32C_FLAG)
        if end > size or _crc(data[at + 4:at + _HEAD.size], data[at + _HEAD.size:end]) != crc:
            return records, at, _describe(data, at, seq, expected)
        if seq == expected:
            records.append((seq, bytes(data[at + _HEAD.size:end])))
            expected += 1
        at = end


def _describe(data, at: int, seq: int, expected: int) -> str:
    if not any(data[at:at + 4096]):
        return "zeros"
    if seq == expected:
        return f"record {seq} incomplete or damaged (a torn write): dropped"
    return "bytes of no record that follows (stale or damaged): ignored"


class Log:
    """The log's segment files in ``directory``: replay what follows a checkpoint, append, recycle."""

    def __init__(self, directory: str, segment_bytes: int = SEGMENT_BYTES, direct: bool = True):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.segment_bytes = segment_bytes
        #: whether segments are opened with O_DIRECT and O_DSYNC (turned off for good when the file system refuses)
        self.direct = direct and hasattr(os, "O_DIRECT")
        #: the active segment's file and where the next record goes in it (no segment before ``start``)
        self.fd = -1
        self.offset = 0
        #: whether ``fd`` is O_DIRECT and O_DSYNC, and then the bytes of its last partial block (``offset % BLOCK``
        #: of them), written again before the next record
        self.fd_direct = False
        self.tail = b""
        #: the headroom a WalOps needs for the next record to be written from it without a copy (``append``)
        self.headroom = 0
        self.index = 0
        #: a record larger than this gets a file of its own when no spare segment is left (``_next_segment``)
        self.large_record = LARGE_RECORD
        #: whether the active file holds a large record of its own (not a preallocated segment: ``_next_segment``)
        self.own = False
        #: the next record's number
        self.next_seq = 1
        #: (index, path, last record's number) of the segments written since the last ``recycle``, oldest first
        self.segments: list[tuple[int, str, int]] = []
        #: bytes appended since the start (checkpoints are due by it)
        self.appended = 0
        #: (descriptor, path, whether O_DIRECT) of the file the turn's record streams into (``spill``), until
        #: ``append`` makes it the active file or ``drop_stream`` deletes it
        self.stream: tuple[int, str, bool] | None = None
        #: the thread making a spare segment ahead (``prepare_spare_ahead``), if any
        self._preparing: threading.Thread | None = None

    def _paths(self) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            stem, dot, ext = name.partition(".")
            if ext == "wal" and stem.isdigit():
                found.append((int(stem), os.path.join(self.directory, name)))
        return sorted(found)

    def _spares(self) -> list[str]:
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory)
                      if n.startswith("spare-") and n.endswith(".wal"))

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """Yield (seq, ops) of every complete record numbered after ``after``, in order, and log where the log
        ends. Then ``next_seq`` follows the last one."""
        expected = after
        paths = self._paths()
        for i, (index, path) in enumerate(paths):
            with open(path, "rb") as f:
                data = f.read()
            records, stop, why = read_records(data, expected)
            yield from records
            if records:
                expected = records[-1][0]
            last = i == len(paths) - 1
            if why != "zeros" and why != "the end of the segment" and (last or records):
                log.warning("write-ahead log %s: %d record(s) replayed; at byte %d, %s", path, len(records), stop, why)
            self.index = index
        self.next_seq = expected + 1

    def start(self, upto: int) -> None:
        """Begin appending after record ``upto`` (a checkpoint covers every record so far): every segment
        becomes a spare, and the next record opens a new one."""
        self.next_seq = max(self.next_seq, upto + 1)
        for name in os.listdir(self.directory):  # a spare being made when the broker stopped
            if name.startswith("prepared") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, name))
        spare_indexes = [os.path.basename(p)[6:-4] for p in self._spares()]  # "spare-prepared-*": none
        self.index = max([self.index] + [int(i) for i in spare_indexes if i.isdigit()]
                         + [index for index, _ in self._paths()])
        self.segments = [(index, path, upto) for index, path in self._paths()]
        self.recycle(upto, keep_active=False)

    def append(self, ops) -> int:
        """Write one record carrying ``ops`` (bytes, or a WalOps: read in place) and flush it; return its number.
        Durable once this returns."""
        if self.stream is not None:
            if type(ops) is WalOps and ops.streaming:
                return self._append_streamed(ops)
            self.drop_stream()  # its ops were cut back into the buffer
        seq = self.next_seq
        head = frame(seq, ops)
        size = len(head) + len(ops)
        if self.fd < 0 or self.own or self.offset + size > self.segment_bytes:  # (a file of its own is never grown)
            self._next_segment(size)
        if self.fd_direct:
            self._write_direct(head, ops, size)
        else:
            written = os.pwritev(self.fd, [head, ops], self.offset)
            if written != size:
                raise OSError(f"the write-ahead log wrote {written} of a record's {size} bytes")
            os.fdatasync(self.fd)
        self.offset += size
        self.headroom = self.offset % BLOCK + _HEAD.size if self.fd_direct else 0
        self.next_seq = seq + 1
        self.appended += size
        index, path, _ = self.segments[-1]
        self.segments[-1] = (index, path, seq)
        return seq

    def spill(self, ops: WalOps) -> int:
        """A turn's ops reached ``STREAM_PIECE`` (``WalOps.spill_to``): open the file of its record's own, numbered
        after every file so far, and return its descriptor (-1 if it cannot be made: the ops stay in memory). The
        record's first block, with its head, is written last (``_append_streamed``): a crash before leaves a file
        that starts with zeros, which the replay passes over."""
        self.index += 1
        path = os.path.join(self.directory, f"{self.index:016d}.wal")
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            try:
                fd, direct = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o600), self.direct
            except OSError as exc:
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                fd, direct = os.open(path, flags, 0o600), False  # no O_DIRECT on this file system
        except OSError as exc:
            log.warning("the write-ahead log could not stream a large record to %s (%r): it stays in memory", path, exc)
            return -1
        self.stream = (fd, path, direct)
        return fd

    def _append_streamed(self, ops: WalOps) -> int:
        """Finish the record streaming into its own file: its last blocks, then its first with the head, then one
        flush of the file (its every block and its size) and of the directory (its name). It becomes the active file,
        as any record's of its own: the next record opens a segment after it."""
        fd, path, direct = self.stream
        seq = self.next_seq
        try:
            ops_crc, size = ops.stream_end()
            ops.stream_head(frame_streamed(seq, len(ops), ops_crc))
            if os.fstat(fd).st_size > size:  # pieces of a part that aborted (cut) went further: no stale bytes after
                os.ftruncate(fd, size)
            os.fdatasync(fd)
            sync_directory(self.directory)
        except BaseException:
            self.drop_stream()
            raise
        self.stream = None
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.fd_direct, self.own = fd, direct, True
        self.offset, self.tail = size, b""
        self.headroom = _HEAD.size if self.direct else 0  # the next record opens a segment
        self.segments.append((self.index, path, seq))
        self.next_seq = seq + 1
        self.appended += _HEAD.size + len(ops)
        return seq

    def drop_stream(self) -> None:
        """Delete the file a turn's record was streaming into, if any: the turn aborted, or its ops were cut back into
        the buffer. (Its first block is zeros: if the deletion is lost, the replay passes over it.)"""
        if self.stream is None:
            return
        fd, path, _direct = self.stream
        self.stream = None
        os.close(fd)
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("the write-ahead log could not delete %s: %r", path, exc)

    def _write_direct(self, head: bytes, ops, size: int) -> None:
        """Write the record (``head`` then ``ops``) at ``offset`` of the O_DIRECT segment, from the last whole block
        on: durable when this returns (O_DSYNC)."""
        tail = self.tail
        start = self.offset - len(tail)
        try:
            if type(ops) is WalOps:
                if ops.headroom != len(tail) + len(head):  # the record opened a segment
                    ops.rebase(len(tail) + len(head))
                self.tail = ops.write_direct(self.fd, start, tail + head)  # from the turn's buffer, no copy
                return
            # bytes (tests, tools): through an aligned buffer of our own
            end = len(tail) + size
            length = -(-end // BLOCK) * BLOCK
            with mmap.mmap(-1, length) as buf:
                buf[:len(tail)] = tail
                buf[len(tail):len(tail) + len(head)] = head
                buf[len(tail) + len(head):end] = ops
                with memoryview(buf) as view:
                    written = os.pwrite(self.fd, view, start)
                if written != length:
                    raise OSError(f"the write-ahead log wrote {written} of a record's {length} bytes")
                self.tail = buf[end - end % BLOCK:end]
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # the file system refuses this direct write (its alignment): the page cache and fdatasync from now on
            log.warning("the write-ahead log cannot write %s directly (%s): it writes through the page cache",
                        self.directory, exc)
            self.direct = False
            path = self.segments[-1][1]
            self._open_fd(os.open(path, os.O_RDWR | os.O_CLOEXEC), path)
            written = os.pwritev(self.fd, [head, ops], self.offset)
            if written != size:
                raise OSError(f"the write-ahead log wrote {written} of a record's {size} bytes") from None
            os.fdatasync(self.fd)

    def _open_fd(self, fd: int, path: str) -> None:
        """Make ``fd`` (segment ``path``, opened without O_DIRECT) the one records go to: opened again with O_DIRECT
        and O_DSYNC if the log writes directly and the file system allows it."""
        direct = False
        if self.direct:
            try:
                direct_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT | os.O_DSYNC)
            except OSError as exc:  # EINVAL: no O_DIRECT on this file system (tmpfs)
                log.info("the write-ahead log writes %s through the page cache (%s)", self.directory, exc)
                self.direct = False
            else:
                os.close(fd)
                fd, direct = direct_fd, True
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.fd_direct = fd, direct

    def _next_segment(self, size: int) -> None:
        """Make the next segment the active one: a spare renamed, or a new file of zeros, then the directory flushed
        so that its name survives. A record larger than a segment, or than ``large_record`` when no spare is left,
        gets an empty file of its own instead: its one flush commits the file's size too, which costs little beside
        its megabytes (bulk turns log 9-52 MB), where a segment's zeros would be written first."""
        self.index += 1
        path = os.path.join(self.directory, f"{self.index:016d}.wal")
        spares = self._spares()
        if not spares and self._preparing is not None:  # the open's spare, nearly made: better than zeros of our own
            self.wait_spare()
            spares = self._spares()
        self.own = size > self.segment_bytes or (size > self.large_record and not spares)
        if self.own:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        elif spares:
            os.rename(spares[0], path)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            _fill_zeros(fd, self.segment_bytes, path)
        sync_directory(self.directory)
        self.offset = 0
        self.segments.append((self.index, path, self.next_seq - 1))
        self._open_fd(fd, path)
        self.tail = b""
        self.headroom = _HEAD.size if self.fd_direct else 0

    def recycle(self, upto: int, keep_active: bool = True) -> None:
        """Turn the segments whose records are all covered by a checkpoint at record ``upto`` into spares (all but
        ``SPARE_SEGMENTS`` deleted, and the files of single large records). The active one stays
        (``keep_active``). The directory is not flushed: a rename or deletion that a power loss undoes leaves a
        segment of records the checkpoint covers, which the replay skips as stale (and the next segment's flush
        makes them durable anyway)."""
        keep = []
        spares = self._spares()
        for index, path, last in self.segments:
            if last > upto or (keep_active and path == self.segments[-1][1] and self.fd >= 0):
                keep.append((index, path, last))
                continue
            if len(spares) < SPARE_SEGMENTS and os.path.getsize(path) == self.segment_bytes:
                spare = os.path.join(self.directory, f"spare-{index:016d}.wal")
                os.rename(path, spare)
                spares.append(spare)
            else:
                os.unlink(path)
        if not keep_active and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.segments = keep

    def discard(self) -> None:
        """Delete every segment and spare, durably (before a first checkpoint: ``WriteAhead.open``)."""
        for _index, path in self._paths():
            os.unlink(path)
        for path in self._spares():
            os.unlink(path)
        sync_directory(self.directory)

    def needs_spare(self) -> bool:
        """Whether a spare should be made ahead: no spare is left and the active segment is past its half or is a
        large record's file of its own (a broker's first segments; later ones are recycled)."""
        return self.fd >= 0 and (self.own or 2 * self.offset > self.segment_bytes) and not self._spares()

    def prepare_spare(self) -> None:
        """Make a spare segment of zeros, off the loop's thread (``needs_spare``): the commit that fills the active
        segment then renames it instead of writing 16 MiB of zeros and flushing them on a turn's path. It is
        complete and flushed before it is named a spare. (Two may be made at once: the open's and a checkpoint's.)"""
        tmp = os.path.join(self.directory, f"prepared-{threading.get_ident()}-{time.time_ns()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _fill_zeros(fd, self.segment_bytes, tmp)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.directory, f"spare-prepared-{time.time_ns()}.wal"))

    def prepare_spare_ahead(self) -> None:
        """``prepare_spare`` on a thread of its own (a fresh log's first segment: ~35 ms of the disk's, off the loop);
        ``wait_spare`` waits for it."""
        self._preparing = threading.Thread(target=self._prepare_ahead, name="wal-spare", daemon=True)
        self._preparing.start()

    def _prepare_ahead(self) -> None:
        try:
            self.prepare_spare()
        except OSError as exc:  # the first record makes its segment itself
            log.warning("the write-ahead log could not prepare a spare segment: %r", exc)

    def wait_spare(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def close(self) -> None:
        self.wait_spare()
        if self.stream is not None:
            self.drop_stream()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- checkpoints: LMDB durable up to a record ---------------------------------------------------------------------
# LMDB commits with sync=False write their pages and meta page without flushing them, and ext4 keeps no order
# between those writes: after a power loss data.mdb may hold a meta page naming pages that never reached the
# disk. So a checkpoint saves the two meta pages as they are right after the commit it covers (txn C), flushes
# data.mdb (every page of C is then on disk), and keeps a read transaction open at C until the next checkpoint:
# LMDB never reuses a page reachable from an open reader's snapshot, so C's pages stay as they were whatever is
# written after. At start the saved meta pages are written back (data.mdb is then C, whole) and the log's records
# after C's are applied again (blind puts and deletes, in order). docs/durability.md has the reasoning.

CHECKPOINT_FILE = "checkpoint"
_CHECKPOINT = struct.Struct("<8sIQQI")  # magic, crc32 of what follows it, record number, LMDB txn id, meta bytes
_CHECKPOINT_MAGIC = b"AZWALCK1"
#: where an LMDB meta page keeps its transaction id, and its magic number (lmdb's MDB_meta after the page header)
_META_TXNID_AT = 144
_META_MAGIC_AT = 16
_META_MAGIC = 0xBEEFC0DE


class WalError(Exception):
    """The write-ahead log or its checkpoint cannot be used (the broker does not start on it)."""


def meta_txnid(page: bytes) -> int:
    """The transaction id an LMDB meta page names (0 if the page is not a meta page)."""
    if len(page) < _META_TXNID_AT + 8 or struct.unpack_from("<I", page, _META_MAGIC_AT)[0] != _META_MAGIC:
        return 0
    return struct.unpack_from("<Q", page, _META_TXNID_AT)[0]


def read_metas(data_path: str, page_size: int) -> bytes:
    """The two meta pages at the start of ``data_path`` (data.mdb)."""
    fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 2 * page_size, 0)
    finally:
        os.close(fd)


def write_checkpoint(directory: str, seq: int, txnid: int, metas: bytes) -> None:
    """Record durably that LMDB's transaction ``txnid`` (meta pages ``metas``) holds every record up to ``seq``."""
    rest = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, 0, seq, txnid, len(metas))[12:] + metas
    path = os.path.join(directory, CHECKPOINT_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, _CHECKPOINT_MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_directory(directory)


def read_checkpoint(directory: str) -> tuple[int, int, bytes] | None:
    """(record number, LMDB txn id, meta pages) of the last checkpoint, or None if there is none."""
    try:
        with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _CHECKPOINT.size or data[:8] != _CHECKPOINT_MAGIC:
        raise WalError(f"{directory}/{CHECKPOINT_FILE} is not a checkpoint of the write-ahead log")
    magic, crc, seq, txnid, n = _CHECKPOINT.unpack_from(data)
    if zlib.crc32(data[12:]) != crc or len(data) != _CHECKPOINT.size + n:
        raise WalError(f"{directory}/{CHECKPOINT_FILE} is damaged (its checksum does not match)")
    return seq, txnid, data[_CHECKPOINT.size:]


def restore_metas(data_path: str, metas: bytes, txnid: int) -> None:
    """Write a checkpoint's meta pages back at the start of data.mdb (before LMDB opens it) and flush them."""
    try:
        fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise WalError(f"{data_path} is missing, but the write-ahead log beside it has a checkpoint") from None
    try:
        current = os.pread(fd, len(metas), 0)
        newest = max(meta_txnid(current[:len(metas) // 2]), meta_txnid(current[len(metas) // 2:]))
        # after a power loss a meta page may be back at what it was before the checkpoint (C - 1) and the other one
        # torn: anything older than that is another file (a copy restored from before)
        if newest < txnid - 1:
            raise WalError(f"{data_path} is older (transaction {newest}) than the write-ahead log's checkpoint "
                           f"(transaction {txnid}): it is not the file the log belongs to")
        if current != metas:
            os.pwrite(fd, metas, 0)
            os.fsync(fd)
    finally:
        os.close(fd)


#: a checkpoint is due once this many bytes were logged since the last one, or this many seconds later when anything
#: was. Until then LMDB reuses no page freed since the last one (the pinned snapshot) and the log keeps every record:
#: 1 s bounds that to one second of the broker's writes (tens of MiB at full speed), 32 MiB bounds the log's segments
#: and the replay at start (well under a second); the flush itself runs on a thread of its own.
CHECKPOINT_BYTES = 32 << 20
CHECKPOINT_SECONDS = 1.0


class _Running:
    """A checkpoint in progress: its flush and its record made durable by a thread of their own."""

    __slots__ = ("pin", "seq", "txnid", "metas", "spare_for", "error", "thread")

    def __init__(self, pin, seq: int, txnid: int, metas: bytes, spare_for: Log | None):
        self.pin, self.seq, self.txnid, self.metas = pin, seq, txnid, metas
        #: the log to make a spare segment for once the checkpoint is written (``Log.needs_spare``), if any
        self.spare_for = spare_for
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def run(self, env, directory: str) -> None:
        try:
            env.sync(True)  # data.mdb's pages up to this checkpoint's transaction on disk (py-lmdb frees the GIL)
            write_checkpoint(directory, self.seq, self.txnid, self.metas)
        except BaseException as exc:  # reported by the loop's thread (``WriteAhead.poll``)
            self.error = exc
            return
        if self.spare_for is not None:
            try:
                self.spare_for.prepare_spare()
            except OSError as exc:  # the loop makes the next segment itself
                log.warning("the write-ahead log could not prepare a spare segment: %r", exc)


class WriteAhead:
    """The log beside one LMDB environment opened with ``sync=False``: replay at open, a record per commit, and
    checkpoints (started between turns, flushed on a thread of their own)."""

    def __init__(self, directory: str, data_path: str, page_size: int, interval: float = CHECKPOINT_SECONDS):
        self.directory = directory
        #: seconds between checkpoints (when anything was logged)
        self.interval = interval
        self.data_path = data_path
        self.page_size = page_size
        self.log = Log(directory)
        #: a read transaction at the last checkpoint's LMDB transaction: no page of it is reused while it is open
        self._pin = None
        self._running: _Running | None = None
        self._last = time.monotonic()
        self._logged_at_last = 0
        #: checkpoints made since the start
        self.checkpoints = 0

    @staticmethod
    def restore(directory: str, data_path: str) -> int | None:
        """Before LMDB opens data.mdb: put back the last checkpoint's meta pages; return the number of the last
        record it covers (None: no checkpoint, nothing to replay)."""
        checkpoint = read_checkpoint(directory)
        if checkpoint is None:
            return None
        seq, txnid, metas = checkpoint
        restore_metas(data_path, metas, txnid)
        return seq

    @staticmethod
    def check_opened(env, directory: str) -> None:
        """Right after LMDB opened a data.mdb whose meta pages ``restore`` put back: refuse it when LMDB's lock file
        names another transaction than the checkpoint's. Another process (``armonik-zmq inspect``, say) kept the
        lock file open through the broker's stop, so LMDB did not reset it and keeps the stopped broker's last
        transaction number, by which it would pick a meta page and number the next commits: writes built on the
        wrong snapshot, acknowledged data lost."""
        checkpoint = read_checkpoint(directory)
        with env.begin() as txn:
            last = txn.id()  # a read transaction's number is the lock file's (env.info() reads the meta pages)
        if checkpoint is not None and last != checkpoint[1]:
            raise WalError(f"another process has {env.path()} open: LMDB's lock file still names transaction {last} "
                           f"from before the broker stopped, and the write-ahead log restored transaction "
                           f"{checkpoint[1]}; stop the process that holds its lock.mdb open, then start the broker again")

    def replay(self, env, tables: list, after: int) -> int:
        """Apply every record after ``after`` to LMDB in one transaction, in order; return how many."""
        count = 0
        with env.begin(write=True) as txn:
            for _seq, ops in self.log.replay(after):
                for kind, table, key, value in decode_ops(ops):
                    if kind == WAL_PUT:
                        txn.put(key, value, db=tables[table])
                    else:
                        txn.delete(key, value, db=tables[table])
                count += 1
        return count

    def open(self, env) -> None:
        """Start logging: a checkpoint at LMDB's last transaction, then a fresh log after it. Segments found with no
        checkpoint are deleted first: no checkpoint means no replay (a start in another mode replayed them and
        dropped it), and the records numbered from 1 again would meet theirs (a recycled segment's stale record
        that happens to follow the last new one with the next number would be replayed as new)."""
        if read_checkpoint(self.directory) is None:
            self.log.discard()
        self.checkpoint(env, wait=True)
        self.log.start(self.log.next_seq - 1)
        if not self.log._spares():  # a fresh log: its first segment's zeros are written off the loop's thread
            self.log.prepare_spare_ahead()

    def append(self, ops) -> int:
        return self.log.append(ops)

    def due(self, mono: float) -> bool:
        logged = self.log.appended - self._logged_at_last
        return self._running is None and logged > 0 and (
            logged >= CHECKPOINT_BYTES or mono - self._last >= self.interval)

    def checkpoint(self, env, wait: bool = False) -> None:
        """Start a checkpoint at LMDB's last commit (no write transaction may be open); ``wait``: and finish it."""
        self.finish()
        pin = env.begin()
        metas = read_metas(self.data_path, self.page_size)
        txnid = pin.id()
        half = len(metas) // 2
        if max(meta_txnid(metas[:half]), meta_txnid(metas[half:])) != txnid:
            pin.abort()
            raise WalError(f"data.mdb's meta pages do not name LMDB's last transaction {txnid}")
        self._last = time.monotonic()
        self._logged_at_last = self.log.appended
        spare_for = self.log if not wait and self.log.needs_spare() else None
        running = self._running = _Running(pin, self.log.next_seq - 1, txnid, metas, spare_for)
        if wait:
            running.run(env, self.directory)
            self.poll()
        else:
            running.thread = threading.Thread(target=running.run, args=(env, self.directory),
                                              name="wal-checkpoint", daemon=True)
            running.thread.start()

    def poll(self) -> None:
        """Finish a checkpoint whose flush is done: move the pin to it and recycle the log it covers."""
        running = self._running
        if running is None or (running.thread is not None and running.thread.is_alive()):
            return
        self._running = None
        if running.error is not None:
            running.pin.abort()
            if running.thread is None:
                raise WalError(f"a checkpoint of the write-ahead log failed: {running.error!r}") from running.error
            # the log still holds every record since the last checkpoint that succeeded: the next one tries again
            log.error("a checkpoint of the write-ahead log failed (the log keeps its records): %r", running.error)
            return
        if self._pin is not None:
            self._pin.abort()
        self._pin = running.pin
        self.log.recycle(running.seq)
        self.checkpoints += 1

    def finish(self) -> None:
        """Wait for a checkpoint in progress and finish it (and for the open's spare segment)."""
        self.log.wait_spare()
        running = self._running
        if running is not None and running.thread is not None:
            running.thread.join()
        self.poll()

    def unpin(self) -> None:
        """Close the pinned snapshot (before the map is resized; a checkpoint must follow before the next write)."""
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    def close(self, env) -> None:
        """A last checkpoint (the next start replays nothing), then close the log."""
        self.checkpoint(env, wait=True)
        self.unpin()
        self.log.close()
