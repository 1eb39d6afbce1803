"""Idempotency keys: a retried request gets its first reply and changes nothing more.

A client names each request that changes something (``protocol.KEYED_OPS``: creations, uploads,
cancels, session changes) with an ``idempotency_key`` (``<client id>:<sequence>``). The broker
stores, in the same LMDB transaction as the request's changes (the request's nested transaction), the key with a
digest of the request body and the reply. So either both the change and the key are durable, or
neither is: a client that never saw the reply (broker killed, connection lost) sends the request
again with the same key, and gets the stored reply (with its new ``rid``) if the first one
committed, or a first application if it did not.

The same key with a different body (anything but ``rid`` differs, data frames included) is refused
with ``IDEMPOTENCY_MISMATCH``: a client bug, never silently answered with another request's reply.

Keys expire: each is kept ``ttl`` seconds after its request was applied (``BrokerConfig.idempotency_ttl``,
15 minutes by default, far longer than any retry), then removed by a collection that runs on a
timer inside the broker's turns, a bounded number of keys per turn. So the table holds at most
the keyed requests of the last ``ttl`` seconds.

The collection finds them in expiry order through an index entry per key, ``AGE`` + 8-byte applied_at + key,
kept in the key table itself: no key starts with the byte 0xFF (it never occurs in UTF-8), so the index sorts
after every key. One table, not two: a keyed request's commit writes one B-tree path fewer.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import TYPE_CHECKING, Callable

import msgpack

from ..protocol import KEYED_OPS, ErrorCode, Op, ProtocolError, pack, reply_ok
from .metrics import Metrics
from .store import Store, Txn

if TYPE_CHECKING:
    from .server import Request

log = logging.getLogger(__name__)

#: Longest key accepted (bytes of UTF-8).
MAX_KEY = 256
#: Most expired keys removed by one collection (bounds the turn it runs in).
GC_BATCH = 2000
#: Seconds between collections.
GC_PERIOD = 1.0

_TS = struct.Struct(">Q")
#: the first byte of every index entry (``_age_key``): never the first byte of UTF-8 text
AGE = b"\xff"
#: where the index was kept before it moved into the key table (``Idempotency._move_old_index``)
_OLD_AGE_DB = b"idempotency_age"


def _age_key(applied_at_us: bytes, key: bytes) -> bytes:
    return AGE + applied_at_us + key
#: how every reply_ok reply ends (the fields are packed in insertion order)
_OK_TAIL = pack("ok") + pack(True)


def _digest(header: dict, frames: list) -> bytes:
    """Digest of a request's body: its header without the envelope's ``rid``, and its data frames."""
    h = hashlib.blake2b(digest_size=16)
    h.update(pack({k: v for k, v in header.items() if k != "rid"}))
    for frame in frames:
        h.update(_TS.pack(len(frame)))
        h.update(frame)
    return h.digest()


#: the fields that list what a keyed request works on
_TARGETS = ("session_ids", "task_ids", "result_ids", "results", "tasks")


def _names_nothing(header: dict) -> bool:
    """Whether a request lists what it works on and every such list is empty: it changed nothing, so sending
    it again is harmless, and a key stored for it would turn a no-op into a commit."""
    lists = [header[f] for f in _TARGETS if f in header]
    return bool(lists) and not any(lists)


class Idempotency:
    """The key table (two LMDB databases) and the wrapper that consults it around keyed handlers."""

    def __init__(self, store: Store, ttl: float, metrics: Metrics):
        self.store = store
        self.ttl = ttl
        self.metrics = metrics
        #: key -> msgpack [digest, applied_at, reply]: the reply's bytes as sent (a replay changes its rid);
        #: keys stored by earlier versions hold the reply's fields (a map) instead. And the expiry index:
        #: AGE + 8-byte applied_at (microseconds, big-endian) + key -> b"", after every key.
        self.keys = store.table(b"idempotency")
        self._move_old_index()
        self._next_gc = 0.0

    def _move_old_index(self) -> None:
        """Move the index of a directory written with a table of its own into the key table (once, in one
        transaction: a crash leaves the old table whole), then drop that table."""
        env = self.store.env
        with env.begin() as txn:
            if txn.get(_OLD_AGE_DB) is None:
                return
        old = env.open_db(_OLD_AGE_DB)
        with env.begin(write=True) as txn:
            with txn.cursor(db=old) as cur:
                txn.cursor(db=self.keys).putmulti((AGE + k, v) for k, v in cur.iternext())
            txn.drop(old, delete=True)

    def wrap(self, handlers: dict) -> None:
        """Put the key check around the handler of every keyed op in ``handlers`` (Op -> handler)."""
        for op in KEYED_OPS:
            if op in handlers:
                handlers[op] = self._keyed(handlers[op])

    def _keyed(self, handler: Callable[["Request", Txn], None]) -> Callable[["Request", Txn], None]:
        def keyed(req: "Request", txn: Txn) -> None:
            key = req.header.get("idempotency_key")
            if key is None:
                handler(req, txn)
                return
            kb = key.encode()
            if len(kb) > MAX_KEY:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                    f"idempotency_key has {len(kb)} bytes, at most {MAX_KEY} allowed")
            digest = _digest(req.header, req.frames)
            raw = txn.txn.get(kb, db=self.keys)
            if raw is not None:
                seen_digest, _, reply = msgpack.unpackb(raw, raw=False)
                if seen_digest != digest:
                    self.metrics.add("idempotency_mismatches")
                    raise ProtocolError(ErrorCode.IDEMPOTENCY_MISMATCH,
                                        f"idempotency_key {key!r} was already used for a different "
                                        f"{Op(req.op).name} request: use a new key for a new request")
                self.metrics.add("idempotent_replays")
                if isinstance(reply, dict):  # stored by an earlier version: the reply's fields
                    reply.pop("ok", None)
                    req.out = [req.peer, reply_ok(req.op, req.rid, **reply)]
                else:
                    fields = msgpack.unpackb(reply, raw=False)
                    fields["rid"] = req.rid
                    req.out = [req.peer, pack(fields)]
                return
            handler(req, txn)
            if req.out is None or _names_nothing(req.header):
                return
            reply = req.out[1]
            # reply_ok puts "ok": true last; anything else (an error) created nothing, so nothing to remember
            if not reply.endswith(_OK_TAIL) and "error" in msgpack.unpackb(reply, raw=False):
                return
            now = req.now
            txn.txn.put(kb, pack([digest, now, reply]), db=self.keys)
            txn.txn.put(_age_key(_TS.pack(int(now * 1e6)), kb), b"", db=self.keys)

        keyed.__name__ = getattr(handler, "__name__", "keyed")
        return keyed

    def due(self, mono: float) -> bool:
        """Whether a collection is due (checked every turn; cheap)."""
        return mono >= self._next_gc

    def collect(self, txn: Txn, now: float, mono: float) -> int:
        """Remove up to ``GC_BATCH`` keys applied more than ``ttl`` seconds ago; return how many."""
        self._next_gc = mono + GC_PERIOD
        limit = _age_key(_TS.pack(max(0, int((now - self.ttl) * 1e6))), b"")
        removed = 0
        cursor = txn.txn.cursor(db=self.keys)
        positioned = cursor.set_range(AGE)
        while positioned and removed < GC_BATCH:
            age_key = cursor.key()
            if age_key[:9] >= limit:
                break
            # through the transaction, not the cursor: with the write-ahead log on, only its writes are logged
            txn.txn.delete(age_key, db=self.keys)
            txn.txn.delete(age_key[9:], db=self.keys)
            removed += 1
            positioned = cursor.set_range(AGE)
        if removed:
            self.metrics.add("idempotency_keys_expired", removed)
            log.debug("%d idempotency key(s) expired", removed)
        return removed
