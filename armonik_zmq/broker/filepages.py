"""Give back the pages of data.mdb that LMDB's read-only map holds in the broker's resident memory.

LMDB reads every page through a shared, read-only map of data.mdb (the broker does not use
MDB_WRITEMAP). Each page the broker ever touched stays mapped, so its resident size (VmRSS, what T15
bounds) grows with the data file, not with what it keeps in memory: with 100,000 tasks the file
pages alone were ~230 MiB of it. They are the kernel's page cache, already on disk: dropping them
from the broker's map (``madvise(MADV_DONTNEED)``) loses nothing, changes no byte of the file, and
the next read of such a page maps it again from the page cache (a minor fault). This runs after a
commit, once per ``interval`` seconds, and sooner once the process's resident file pages grew by
``grown_bytes`` since the last release (looked at every ``check_interval`` seconds): with the write-ahead log, LMDB
reuses no page freed since the last checkpoint, so each commit's pages are new ones, mapped afresh when
read, and T15's broker mapped ~120 MiB of them in one second where the pages it reuses at once without
the log stay a few MiB. Only on Linux (elsewhere it does nothing).
"""

from __future__ import annotations

import ctypes
import os
import time

#: <sys/mman.h>: the pages are dropped from this process's map (a file mapping keeps its contents)
MADV_DONTNEED = 4

try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # no libc madvise: nothing to do
    _madvise = None


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Return the (start, end) address ranges where this process maps the file ``path``."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.endswith(path + "\n"):
                    start, end = line.split(None, 1)[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def resident_file_pages() -> int:
    """Pages of files (and shared memory) this process has resident (/proc/self/statm; 0 where it cannot tell)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 0


#: release sooner than the interval once this many more bytes of the file are resident (the write-ahead log's
#: fresh pages: store.py turns the trigger on only with the log)
GROWN_BYTES = 16 << 20


class FilePages:
    """Drop the mapped pages of one file from this process's resident memory, now and then."""

    def __init__(self, path: str, interval: float = 1.0, grown_bytes: int = GROWN_BYTES, check_interval: float = 0.05):
        self.path = os.path.realpath(path)
        self.interval = interval
        #: release sooner once the resident file pages grew by this many since the last release (0: never sooner, and
        #: /proc is not read: without the write-ahead log the pages LMDB reuses stay few)
        self.grown_pages = grown_bytes // os.sysconf("SC_PAGE_SIZE")
        #: seconds between two looks at the resident file pages (reading /proc/self/statm: ~10 us)
        self.check_interval = check_interval
        self._next = time.monotonic()  # due at the first commit (after a restart: the rebuild's reads)
        self._next_check = self._next
        #: resident file pages right after the last release
        self._resident = 0
        #: bytes of mapping released so far (the map's size each time, not the pages that were resident)
        self.released = 0
        #: where the file was mapped at the last release (``_mapped``)
        self._ranges: list[tuple[int, int]] = []

    def maybe_release(self) -> None:
        """Release the pages if ``interval`` seconds have passed since the last time, or the resident file pages grew
        by ``grown_bytes``."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval
        grown = self.grown_pages
        if now >= self._next or (grown and resident_file_pages() - self._resident >= grown):
            self._next = now + self.interval
            self.release()
            if grown:
                self._resident = resident_file_pages()

    def release(self) -> int:
        """Release every mapped page of the file now; return the bytes of mapping covered."""
        if _madvise is None:
            return 0
        covered = 0
        for start, end in self._mapped():
            # Only this read-only shared map of the file: its pages stay in the page cache and on disk.
            if _madvise(start, end - start, MADV_DONTNEED) == 0:
                covered += end - start
        self.released += covered
        return covered

    def _mapped(self) -> list[tuple[int, int]]:
        """Where the file is mapped: the ranges found last time while each one still maps exactly the file (one
        readlink of /proc/self/map_files each, ~5 us), else read again from /proc/self/maps (~1 ms in a broker: a
        pause of the loop once a second). LMDB maps the file anew only when the map is resized."""
        ranges = self._ranges
        if ranges:
            try:
                if all(os.readlink(f"/proc/self/map_files/{start:x}-{end:x}") == self.path for start, end in ranges):
                    return ranges
            except OSError:  # no such mapping any more, or no map_files here
                pass
        ranges = self._ranges = mapped_ranges(self.path)
        return ranges
