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

from ._core import new_id, reset_id_pool

__all__ = ["new_id"]

# random bytes are drawn from the OS 4 KiB at a time (one system call per 512 ids): a forked child draws its own
os.register_at_fork(after_in_child=reset_id_pool)
