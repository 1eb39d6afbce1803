"""Ids for tasks and results: time-ordered UUID strings (RFC 9562 version 7), cheap to make.

Why time-ordered: LMDB keeps rows sorted by key. Random (version 4) ids land each new row on a random
B-tree page, so a turn that writes N rows dirties ~N pages and its commit writes them all. Ids that
grow with time put the rows of one batch side by side: a turn dirties a few pages.

Layout (still a valid UUID string): 48-bit Unix milliseconds, version 7, a 12-bit sequence that orders
ids made in the same millisecond by this process, the variant, then 62 random bits (different
processes never collide). The sequence borrows the next millisecond when 4,096 ids are made in one.
"""

from __future__ import annotations

import os
import time

#: random bytes drawn from the OS 4 KiB at a time (one system call per 512 ids); a forked child draws its own
_random_pool = bytearray()
_clock = [0, 0]  # last millisecond used, sequence inside it


def _after_fork() -> None:
    _random_pool.clear()


os.register_at_fork(after_in_child=_after_fork)

_prefix = [-1, ""]  # the millisecond of the cached "tttttttt-tttt-" text, and that text


def new_id() -> str:
    """Return a new version 7 UUID string; ids made by one process sort in the order they were made."""
    if len(_random_pool) < 8:
        _random_pool.extend(os.urandom(4096))
    raw = _random_pool[-8:]
    del _random_pool[-8:]
    raw[0] = raw[0] & 0x3F | 0x80  # the variant
    ms = time.time_ns() // 1_000_000
    last, seq = _clock
    if ms > last:
        last, seq = ms, 0
    else:
        seq += 1
        if seq > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one (order is kept)
            last, seq = last + 1, 0
    _clock[0], _clock[1] = last, seq
    if _prefix[0] != last:
        t = "%012x" % last
        _prefix[0], _prefix[1] = last, f"{t[:8]}-{t[8:]}-7"
    r = raw.hex()
    return f"{_prefix[1]}{seq:03x}-{r[:4]}-{r[4:]}"
