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

Keys expire: each is kept at least ``ttl`` seconds after its request was applied
(``BrokerConfig.idempotency_ttl``, 15 minutes by default, far longer than any retry), and removed
within half a ``ttl`` more by a collection that runs on a timer inside the broker's turns: it walks
the key table in key order, a bounded number of keys per turn, from where the last one stopped,
fast enough to go round the whole table every half ``ttl``. So the table holds at most the keyed
requests of the last 1.5 ``ttl``.

The walk reads each key's ``applied_at`` from its value; there is no index by age. An index meant a
second table written by every keyed request: in a commit of one small request (a sequential submit),
each table written costs its own pages to write and sync. A data directory written by an earlier
version has that index: its first collection empties it (its keys are expired by the walk all the same).
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
#: Fewest keys one collection looks at (more when the table is large: see ``Idempotency.collect``).
WALK_MIN = 2000
#: Seconds between collections.
GC_PERIOD = 1.0

#: a stored key's value is msgpack [digest (16-byte bin), applied_at (float 64), reply]: how it starts,
#: and where its applied_at is
_VALUE_HEAD = b"\x93\xc4\x10"
_FLOAT64 = 0xCB
_APPLIED_AT = struct.Struct(">d")
#: a data frame's length, in the digest
_TS = struct.Struct(">Q")
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


def _applied_at(value: bytes) -> float:
    """When the request of a stored key was applied (read in place; any other packing through msgpack)."""
    if value[:3] == _VALUE_HEAD and value[19] == _FLOAT64:
        return _APPLIED_AT.unpack_from(value, 20)[0]
    return float(msgpack.unpackb(value, raw=False)[1])


def _names_nothing(header: dict) -> bool:
    """Whether a request lists what it works on and every such list is empty: it changed nothing, so sending
    it again is harmless, and a key stored for it would turn a no-op into a commit."""
    lists = [header[f] for f in _TARGETS if f in header]
    return bool(lists) and not any(lists)


class Idempotency:
    """The key table and the wrapper that consults it around keyed handlers."""

    def __init__(self, store: Store, ttl: float, metrics: Metrics):
        self.store = store
        self.ttl = ttl
        self.metrics = metrics
        #: key -> msgpack [digest, applied_at, reply]: the reply's bytes as sent (a replay changes its rid);
        #: keys stored by earlier versions hold the reply's fields (a map) instead
        self.keys = store.env.open_db(b"idempotency")
        #: the expiry index of earlier versions (8-byte applied_at + key -> b""): emptied, never written
        self.by_age = store.env.open_db(b"idempotency_age")
        with store.env.begin() as txn:
            self._old_index = txn.stat(self.by_age)["entries"] > 0
        self._next_gc = 0.0
        #: the key the next collection's walk starts at (b"": the first)
        self._walk_from = b""

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

        keyed.__name__ = getattr(handler, "__name__", "keyed")
        return keyed

    def due(self, mono: float) -> bool:
        """Whether a collection is due (checked every turn; cheap)."""
        return mono >= self._next_gc

    def collect(self, txn: Txn, now: float, mono: float) -> int:
        """Remove keys applied more than ``ttl`` seconds ago, up to ``GC_BATCH``; return how many.

        The walk goes on from where the last collection stopped, round and round the table, and looks at
        ``2 * GC_PERIOD / ttl`` of the table's keys (``WALK_MIN`` at least): every key is looked at at
        least once per half ``ttl`` while the table's size holds.
        """
        self._next_gc = mono + GC_PERIOD
        if self._old_index:
            txn.txn.drop(self.by_age, delete=False)
            self._old_index = False
        entries = txn.txn.stat(self.keys)["entries"]
        if not entries:
            return 0
        budget = max(WALK_MIN, int(entries * 2 * GC_PERIOD / self.ttl) + 1)
        oldest = now - self.ttl
        removed = looked = 0
        cursor = txn.txn.cursor(db=self.keys)
        positioned = cursor.set_range(self._walk_from) if self._walk_from else cursor.first()
        wrapped = not self._walk_from
        while looked < budget and removed < GC_BATCH:
            if not positioned:  # past the last key: on from the first, once
                if wrapped:
                    break
                wrapped = True
                positioned = cursor.first()
                continue
            looked += 1
            if _applied_at(cursor.value()) < oldest:
                cursor.delete()  # moves to the next entry, or off the end (empty key)
                removed += 1
                positioned = bool(cursor.key())
            else:
                positioned = cursor.next()
        self._walk_from = cursor.key() if positioned else b""
        if removed:
            self.metrics.add("idempotency_keys_expired", removed)
            log.debug("%d idempotency key(s) expired", removed)
        return removed
