"""The broker's tables in one LMDB environment: sessions, tasks, results, object data, and indexes.

Rows are msgpack maps keyed by the id's UTF-8 bytes. Every write goes through a ``Txn`` opened by the
broker's single thread, once per loop turn (group commit); a request that fails part-way is undone
with a nested transaction, so the other requests of the turn still commit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from typing import Iterator, Optional

import lmdb
import msgpack

from .._core import LoggedTxn, Puts, RowRules, RowTables, WalOps, unpack_fields
from ..protocol import DATA_CHUNK_MAX_SIZE, ErrorCode, ProtocolError
from ..status import TASK_FINAL, ResultStatus, TaskStatus

_SUBMITTED = int(TaskStatus.SUBMITTED)
from .filepages import GROWN_BYTES, FilePages
from .objects import ObjectStorage, chunk_key, n_chunks, rechunk
from .wal import CHECKPOINT_FILE, CHECKPOINT_SECONDS, STREAM_PIECE, WalError, WriteAhead, sync_directory

log = logging.getLogger("armonik_zmq.broker")

_pack = msgpack.Packer(use_bin_type=True).pack

#: rows of live tasks kept decoded (``Store.task_rows``): at most this many. A decoded task row takes ~1.5 KB:
#: 16k of them (~25 MiB) cover every task agents hold at once; a queued task past the cap is read from LMDB
#: when it is dispatched (and cached then, once finished tasks made room).
TASK_CACHE_MAX = 16_384
#: session rows kept decoded (``Store.session_rows``): at most this many (all dropped when full: sessions are few)
SESSION_CACHE_MAX = 4096
#: rows of results still waiting for data kept decoded (``Store.result_rows``): at most this many. A decoded
#: result row takes ~0.8 KB (64k: ~50 MiB, within T15's 300 MiB with 100,000 tasks queued). A bulk submission
#: reads each output at submit and again at completion: with 16k, a 50,000-task batch decoded two thirds of
#: its outputs twice (a tenth of the broker's CPU in bench.broker_alone).
RESULT_CACHE_MAX = 65_536
_TASK_ENDED = frozenset(int(s) for s in TASK_FINAL)
_RESULT_CREATED = int(ResultStatus.CREATED)
#: LMDB's longest key (bytes)
_MAX_KEY = 511
#: what a turn is counted to add to the data file between two reads of the map's figures (``Store.needs_room``):
#: this many bytes (its rows, index entries and copied pages) plus this many times the bytes it received. A
#: turn beyond it before the next read meets a full map at worst, which the broker's replay handles.
TURN_GROWTH_BOUND = 16 << 20
TURN_GROWTH_FACTOR = 8


def _unpack(buf):
    return msgpack.unpackb(buf, raw=False)


# -- the stored form of task and result rows ---------------------------------------------------------
# A task or result row is stored as a msgpack array of its fields in the order below, not as a map: a map
# repeats every field name in every value and decoding creates every key again (decoding a map took twice as
# long, and a task row took 680 bytes instead of 390, which LMDB copies and writes at each commit). The task's
# options are stored inside as their own packed bytes, decoded once per distinct value: the rows of one
# submission share one options dict, as they do when created (so no code may change a row's options in place).
# A row with other fields than these (a row of an older format) is stored as a map; ``decode_row`` reads both.

TASK_FIELDS = ("task_id", "session_id", "owner_pod_id", "pod_hostname", "initial_task_id", "created_by",
               "parent_task_ids", "payload_id", "data_dependencies", "expected_output_ids", "retry_of_ids", "status",
               "status_message", "error", "options", "attempt", "created_at", "submitted_at", "received_at",
               "acquired_at", "fetched_at", "started_at", "processed_at", "ended_at")
RESULT_FIELDS = ("result_id", "session_id", "name", "owner_task_id", "created_by", "completed_by", "status",
                 "created_at", "completed_at", "size", "opaque_id", "manual_deletion")
#: an array row's length tells its kind
_FIELDS_BY_LENGTH = {len(TASK_FIELDS): TASK_FIELDS, len(RESULT_FIELDS): RESULT_FIELDS}
assert len(_FIELDS_BY_LENGTH) == 2
_OPTIONS_AT = TASK_FIELDS.index("options")
#: distinct options seen (packed -> dict, and id(dict) -> (dict, packed)): a few per session, bounded all the same
_OPTIONS_BY_BYTES: dict[bytes, dict] = {}
_BYTES_BY_OPTIONS: dict[int, tuple[dict, bytes]] = {}
_OPTIONS_KEPT = 1024


def _remember_options(opts: dict, packed: bytes) -> None:
    if len(_BYTES_BY_OPTIONS) >= _OPTIONS_KEPT:
        _BYTES_BY_OPTIONS.clear()
        _OPTIONS_BY_BYTES.clear()
    _BYTES_BY_OPTIONS[id(opts)] = (opts, packed)
    _OPTIONS_BY_BYTES[packed] = opts


def _packed_options(opts: dict) -> bytes:
    """A task's options packed (msgpack), once per distinct options dict (``packed_options``: the last one is kept
    in C too)."""
    known = _BYTES_BY_OPTIONS.get(id(opts))
    if known is not None and known[0] is opts:
        return known[1]
    packed = _pack(opts)
    _remember_options(opts, packed)
    return packed


def encode_task(row: dict) -> bytes:
    return _RULES.encode_task(row)


def encode_result(row: dict) -> bytes:
    return _RULES.encode_result(row)


def decode_row(buf) -> dict:
    """Return the row stored in ``buf`` (a task, result or session row; an array or a map)."""
    row = unpack_fields(buf, _FIELDS_BY_LENGTH, True)
    if row is None:
        values = msgpack.unpackb(buf, raw=False)
        if type(values) is dict:
            return values
        row = dict(zip(_FIELDS_BY_LENGTH[len(values)], values))
    if len(row) == len(TASK_FIELDS):
        packed = row["options"]
        opts = _OPTIONS_BY_BYTES.get(packed)
        if opts is None:
            opts = msgpack.unpackb(packed, raw=False)
            _remember_options(opts, packed)
        row["options"] = opts
    return row


#: the table of unfinished task ids (restart reads it instead of every task row)
LIVE_TASKS_DB = b"live_tasks"
#: where object rows were kept before they moved into the data table (``Store._move_object_rows``)
_OLD_OBJECTS_DB = b"objects"
SESSION_INDEX_DB = b"session_index"


def session_tasks_key(session_id: str) -> bytes:
    """The session index's key of a session's task ids."""
    return session_id.encode()


def session_results_key(session_id: str) -> bytes:
    """The session index's key of a session's result ids: just after its task ids' (ids have no NUL)."""
    return session_id.encode() + b"\x00r"


#: the tables the session index replaces (``Store._move_session_indexes``), with the key each one's entries take
_OLD_SESSION_INDEXES = {b"session_tasks": session_tasks_key, b"session_results": session_results_key}


#: every table the broker writes, with its dupsort flag. A write-ahead log record names a table by its index here:
#: append new tables, never reorder or remove one (the records of a log written before must still replay).
TABLES = ((b"sessions", False), (b"tasks", False), (b"results", False), (b"data", False), (SESSION_INDEX_DB, True),
          (LIVE_TASKS_DB, False), (b"segment_files", False), (b"idempotency", False), (b"purging", False),
          (b"deleting", False))
_DUPSORT = dict(TABLES)

#: how commits are made durable (docs/durability.md): "wal": LMDB commits with sync=False and each commit's
#: changes are appended to a write-ahead log, flushed before anything is acknowledged (one small flush); "lmdb":
#: LMDB flushes its pages then its meta page at each commit (two flushes); "none": nothing is flushed (survives a
#: process crash, not a power loss)
DURABILITY_MODES = ("wal", "lmdb", "none")


class MapAtLimit(Exception):
    """The LMDB map is full and already at ``max_map_size``: nothing more can be written."""


class Store:
    """One LMDB environment with the broker's named databases, opened once at start.

    The map starts at ``map_size`` and grows (doubling, up to ``max_map_size``) when it fills: see
    ``grow`` and ``room_for``. Another process reading the same directory sees the new size through
    ``MapResizedError`` (``armonik-zmq inspect`` shows how to react).
    """

    def __init__(self, path: str, *, map_size: int = 64 << 30, max_map_size: int = 0, sync: bool = True,
                 durability: str = "", checkpoint_interval: float = CHECKPOINT_SECONDS,
                 chunk_size: int = DATA_CHUNK_MAX_SIZE, object_storage: Optional[ObjectStorage] = None):
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        #: one of DURABILITY_MODES (default: "lmdb", or "none" without ``sync``)
        self.durability = durability or ("lmdb" if sync else "none")
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability {self.durability!r} is not one of {', '.join(DURABILITY_MODES)}")
        wal_dir = os.path.join(path, "wal")
        data_path = os.path.join(path, "data.mdb")
        # a checkpoint's meta pages go back into data.mdb before LMDB reads them (wal.py)
        replay_after = WriteAhead.restore(wal_dir, data_path) if os.path.isdir(wal_dir) else None
        #: the map never grows beyond this (0: no more than 64 times the starting size, at least 1 TiB)
        self.max_map_size = max_map_size or max(map_size * 64, 1 << 40)
        #: largest chunk of object data kept in one LMDB value (new objects; each records its own)
        self.chunk_size = chunk_size
        #: where imported results' files are, if the broker has an object storage
        self.object_storage = object_storage
        # max_spare_txns=0: never carry reader slots across a fork (RELIABILITY.md section 2)
        lmdb_sync = self.durability == "lmdb"
        self.env = lmdb.open(path, map_size=map_size, max_dbs=16, sync=lmdb_sync, metasync=lmdb_sync,
                             max_spare_txns=0, readahead=False)
        if replay_after is not None:
            try:
                WriteAhead.check_opened(self.env, wal_dir)
            except WalError:
                self.env.close()
                raise
        #: table handles by name (``table``)
        self._tables: dict[bytes, object] = {}
        self.sessions = self.table(b"sessions")
        self.tasks = self.table(b"tasks")
        self.results = self.table(b"results")
        #: object chunks (objects.chunk_key) and, per result with data, its object row keyed by the bare result id:
        #: the row sorts just before its chunks (their keys add a NUL and an index), so storing data and its row
        #: dirties one leaf and one B-tree path; a table of their own cost two more pages in every such commit
        self.data = self.table(b"data")
        self._move_object_rows()
        #: a session's task ids (key: ``session_tasks_key``) and result ids (``session_results_key``), for cancel,
        #: purge, delete and lists: one table, its two keys side by side, so a submission that adds a task and
        #: its results writes one leaf of it, not one in each of two tables
        self.session_index = self.table(SESSION_INDEX_DB)
        self._move_session_indexes()
        #: Decoded rows of live tasks and of results without data yet, by id: the hot path reads each one
        #: several times (submit, dispatch, completion) and decoding dominated. Write-through (LMDB stays
        #: the truth); a row a failed nested transaction touched is dropped (its dict may hold undone
        #: changes), and the whole cache when a turn's transaction aborts.
        self.task_rows: dict[str, dict] = {}
        self.result_rows: dict[str, dict] = {}
        #: Decoded session rows by id, kept the same way (``Txn.get_session``): every submit reads its session's.
        self.session_rows: dict[str, dict] = {}
        with self.env.begin() as txn:
            indexed = txn.get(LIVE_TASKS_DB) is not None
        #: task id -> ``_live_value`` for every task not in a final status (maintained by ``Txn.put_task``)
        self.live_tasks = self.table(LIVE_TASKS_DB)
        if not indexed:
            self._index_live_tasks()
        #: page size, to turn page numbers into bytes
        self.page_size = self.env.stat()["psize"]
        #: bytes the turns may still write before ``needs_room`` reads the map's figures again
        self._room_unchecked = 0
        #: shared-memory segment token -> result id: the segment files some result's data is (shm.py)
        self.segment_files = self.table(b"segment_files")
        #: the broker's shm.SegmentStore once it serves a data socket (set by the broker)
        self.segments = None
        #: held by threads other than the loop's around their read transactions, and by ``grow``
        self.readers_lock = threading.Lock()
        #: data.mdb's pages mapped by reads, dropped from the resident size after commits (filepages.py)
        # the growth trigger is for the write-ahead log's fresh pages (filepages.py); other modes release once a second
        self.file_pages = FilePages(data_path, grown_bytes=GROWN_BYTES if self.durability == "wal" else 0)
        #: the write-ahead log (durability "wal"), else None
        self.wal: Optional[WriteAhead] = None
        #: table handle -> its index in TABLES (what a log record names)
        self.table_index: dict = {}
        #: the ops of the turn's write transaction (one buffer for every turn: ``_Write``)
        self.wal_ops = WalOps()
        #: when ``checkpoint_if_due`` next trims ``wal_ops``
        self._trim_at = 0.0
        if replay_after is not None or self.durability == "wal":
            self._open_log(WriteAhead(wal_dir, data_path, self.page_size, checkpoint_interval), replay_after)
        if self.wal is not None:  # a large turn's ops go to the disk as they come (wal.py)
            self.wal_ops.spill_to(self.wal.log.spill, STREAM_PIECE)

    def table(self, name: bytes):
        """The handle of the table ``name`` (opened once; a table the broker writes must be in TABLES)."""
        handle = self._tables.get(name)
        if handle is None:
            handle = self._tables[name] = self.env.open_db(name, dupsort=_DUPSORT.get(name, False))
        return handle

    def _open_log(self, wal: WriteAhead, replay_after: Optional[int]) -> None:
        """Replay the log after its checkpoint (``replay_after``; None: none), then log on ("wal") or make LMDB
        durable and drop the checkpoint (another mode: the log is not written, so it must not be replayed again)."""
        tables = [self.table(name) for name, _ in TABLES]
        self.table_index = {handle: index for index, handle in enumerate(tables)}
        if replay_after is not None:
            started = time.monotonic()
            count = wal.replay(self.env, tables, replay_after)
            log.info("write-ahead log: %d record(s) after record %d replayed in %.3fs", count, replay_after,
                     time.monotonic() - started)
        if self.durability == "wal":
            wal.open(self.env)
            self.wal = wal
            return
        self.env.sync(True)
        os.unlink(os.path.join(wal.directory, CHECKPOINT_FILE))
        sync_directory(wal.directory)

    def checkpoint_if_due(self, mono: float) -> None:
        """Between turns: finish a checkpoint whose flush is done, start one that is due (wal.py)."""
        wal = self.wal
        if wal is not None:
            wal.poll()
            if wal.due(mono):
                wal.checkpoint(self.env)
            if mono >= self._trim_at:  # a large turns' buffer kept while they go on, given back a second after
                self._trim_at = mono + 1.0
                self.wal_ops.trim()

    def _logged(self, ops: WalOps) -> None:
        """Append a committed transaction's ops to the log, flushed: the commit is durable when this returns."""
        try:
            self.wal.append(ops)
        except OSError as exc:
            # LMDB holds the commit the log could not: a checkpoint makes it durable there, or this raises
            log.error("the write-ahead log could not be written (%s): a checkpoint makes the commit durable", exc)
            self.wal.checkpoint(self.env, wait=True)

    def _move_object_rows(self) -> None:
        """Move the rows of the ``objects`` table of a directory written before into the data table (once, in one
        transaction: a crash leaves the old table whole), then drop that table."""
        with self.env.begin() as txn:
            if txn.get(_OLD_OBJECTS_DB) is None:
                return
        old = self.env.open_db(_OLD_OBJECTS_DB)
        with self.env.begin(write=True) as txn:
            with txn.cursor(db=old) as cur:
                txn.cursor(db=self.data).putmulti(cur.iternext())
            txn.drop(old, delete=True)

    def _move_session_indexes(self) -> None:
        """Move the entries of the ``session_tasks`` and ``session_results`` tables of a directory written before into
        the session index (once, in one transaction: a crash leaves the old tables whole), then drop those tables."""
        with self.env.begin() as txn:
            old = [name for name in _OLD_SESSION_INDEXES if txn.get(name) is not None]
        if not old:
            return
        with self.env.begin(write=True) as txn:
            put = txn.cursor(db=self.session_index).putmulti
            for name in old:
                db = self.env.open_db(name, txn=txn, dupsort=True)
                index_key = _OLD_SESSION_INDEXES[name]
                with txn.cursor(db=db) as cur:
                    put(((index_key(sid.decode()), id_) for sid, id_ in cur.iternext()), dupdata=True)
                txn.drop(db, delete=True)

    def _index_live_tasks(self) -> None:
        """Build the live-task table of a directory written before it existed (one full scan, once)."""
        with self.env.begin(write=True) as txn:
            with txn.cursor(db=self.tasks) as cur:
                for key, buf in cur:
                    row = decode_row(buf)
                    if row["status"] not in TASK_FINAL:
                        txn.put(key, _live_value(row), db=self.live_tasks)

    # -- map size ------------------------------------------------------------------------------------

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def used_bytes(self) -> int:
        """Return the bytes of the map in use: up to the highest page ever written (the data file's size)."""
        return (self.env.info()["last_pgno"] + 1) * self.page_size

    def needs_room(self, incoming: int) -> bool:
        """Return whether the map should grow before a turn that may write ``incoming`` bytes.

        It should when less than a quarter of it is free, or less than twice ``incoming``: a turn
        then rarely meets a full map (``MapFullError`` is still handled, by the broker's replay).

        The map's figures (``env.info()``, 4-9 us) are read again only once the turns since the last read
        may have used up the room above that quarter: each is counted as ``TURN_GROWTH_BOUND`` bytes plus
        ``TURN_GROWTH_FACTOR`` times what it received. With the default 64 GiB map that is one read in
        thousands of turns; with a small or nearly full map, every turn.
        """
        spent = TURN_GROWTH_BOUND + TURN_GROWTH_FACTOR * incoming
        if spent <= self._room_unchecked:
            self._room_unchecked -= spent
            return False
        info = self.env.info()
        free = info["map_size"] - (info["last_pgno"] + 1) * self.page_size
        needed = max(info["map_size"] // 4, 2 * incoming)
        self._room_unchecked = max(0, free - needed - spent)  # this turn's share counted too
        return free < needed

    def room_for(self, incoming: int) -> bool:
        """Grow the map if ``needs_room(incoming)``, by doublings; return whether it grew."""
        if not self.needs_room(incoming):
            return False
        info = self.env.info()
        size = info["map_size"]
        free = size - (info["last_pgno"] + 1) * self.page_size
        target = size
        while target < self.max_map_size and (target - size + free < target // 4 or target - size + free < 2 * incoming):
            target *= 2
        return self.grow(target)

    def grow(self, target: int = 0) -> bool:
        """Enlarge the map (double it by default, never beyond ``max_map_size``); return whether it grew.

        No transaction of this process may be open: LMDB invalidates them all.
        """
        size = self.map_size
        target = min(max(target, 2 * size), self.max_map_size)
        if target <= size:
            return False
        if self.wal is not None:  # the checkpoint's snapshot is closed too: a new checkpoint follows at once
            self.wal.finish()
            self.wal.unpin()
        with self.readers_lock:  # the data socket's thread (shm.py) must hold no read transaction now
            self.env.set_mapsize(target)
        self._room_unchecked = 0
        if self.wal is not None:
            self.wal.checkpoint(self.env, wait=True)
        return True

    def write(self) -> "_Write":
        """Open the turn's write transaction: commit on success, abort on any exception."""
        return _Write(self)

    @contextlib.contextmanager
    def read(self) -> Iterator["Txn"]:
        with self.env.begin(write=False) as txn:
            yield Txn(self, txn)

    def forget_rows(self) -> None:
        """Drop every decoded row: the transaction that handed them out is gone."""
        self.task_rows.clear()
        self.result_rows.clear()
        self.session_rows.clear()

    def reader_check(self) -> int:
        """Clear reader slots left by dead processes."""
        return self.env.reader_check()

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close(self.env)
        self.env.close()


class _Write:
    """The context of ``Store.write``: a plain class, as it runs once or twice per turn (a generator costs more)."""

    __slots__ = ("store", "txn", "ops")

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> "Txn":
        store = self.store
        self.txn = store.env.begin(write=True)
        if store.wal is None:
            self.ops = None
            return Txn(store, self.txn)
        self.ops = ops = store.wal_ops
        ops.clear(store.wal.log.headroom)  # room for the record's head: it is written from this buffer (wal.py)
        return Txn(store, LoggedTxn(self.txn, ops, store.table_index))

    def __exit__(self, exc_type, exc, tb) -> None:
        store = self.store
        if exc_type is None:
            try:
                self.txn.commit()
            except BaseException:
                store.forget_rows()
                if self.ops is not None:
                    store.wal.log.drop_stream()
                raise
            # after LMDB's commit: a record in the log is always a transaction that committed (a streamed one's
            # head is written now)
            if self.ops is not None:
                if self.ops.count:
                    store._logged(self.ops)
                else:
                    store.wal.log.drop_stream()
            store.file_pages.maybe_release()
        else:
            self.txn.abort()
            store.forget_rows()
            if self.ops is not None:
                store.wal.log.drop_stream()


def _live_value(row: dict) -> bytes:
    """A queued (SUBMITTED) task's [partition, priority], all a restart needs to queue it; b"" for other statuses."""
    if row["status"] == _SUBMITTED:
        opts = row["options"]
        key = (opts["partition_id"], opts["priority"])
        value = _LIVE_VALUES.get(key)
        if value is None:
            value = _LIVE_VALUES[key] = _pack(list(key))
        return value
    return b""


#: packed live-task values by (partition, priority): a few partitions x 99 priorities at most
_LIVE_VALUES: dict[tuple, bytes] = {}

#: how task and result rows are stored and cached (``_core.RowTables``, the rows of ``Txn``)
_RULES = RowRules(TASK_FIELDS, RESULT_FIELDS, _OPTIONS_AT, _packed_options, _pack, decode_row, _live_value,
                  session_tasks_key, session_results_key, _TASK_ENDED, _SUBMITTED, _RESULT_CREATED, TASK_CACHE_MAX,
                  RESULT_CACHE_MAX)
#: a task's options packed (msgpack), once per distinct options dict
packed_options = _RULES.options_packed
# rows read by RowTables are decoded in C, as decode_row decodes them (which it calls for the rest)
_RULES.use_decoding(_OPTIONS_BY_BYTES, _FIELDS_BY_LENGTH)


#: packed object rows of one-chunk data by (size, chunk size), for sizes below this (the small results of most tasks)
_ONE_CHUNK_ROWS: dict[tuple[int, int], bytes] = {}
_ONE_CHUNK_ROWS_KEPT = 1024


class Txn:
    """Typed access to the tables inside one LMDB transaction."""

    __slots__ = ("store", "txn", "touched", "puts", "rows", "get_task", "put_task", "get_result", "put_result")

    def __init__(self, store: Store, txn: lmdb.Transaction, touched: Optional[set] = None):
        self.store = store
        self.txn = txn
        #: ids of cached rows handed out or stored in this (nested) transaction: dropped from the cache if it aborts
        self.touched = touched
        #: this transaction's cursors' puts (each cursor opened at its table's first write)
        self.puts = Puts(txn, store)
        # Task and result rows (compiled: _core.RowTables). get_task(task_id) and get_result(result_id) return the
        # row (decoded, cached while unfinished) or None. put_task(row, new=False, was=None) stores a task row
        # (``was``: its status before, when known) and keeps the live-task table in step: a task leaves it when
        # it ends, and its value changes only when the task enters or leaves SUBMITTED; ``new`` adds it to the
        # session index. put_result(row, new=False) stores a result row (``new``: indexed in its session).
        self.rows = rows = RowTables(_RULES, txn, self.puts, store.tasks, store.results, store.live_tasks,
                                     store.task_rows, store.result_rows, touched, store.data, store.chunk_size)
        self.get_task = rows.get_task
        self.put_task = rows.put_task
        self.get_result = rows.get_result
        self.put_result = rows.put_result

    def nested(self) -> "_Nested":
        """Run one request in a child transaction, so its failure undoes only its own writes."""
        return _Nested(self)

    # -- rows -------------------------------------------------------------------------------

    def _get(self, db, key: str) -> Optional[dict]:
        buf = self.txn.get(key.encode(), db=db)
        return None if buf is None else decode_row(buf)

    def get_session(self, session_id: str) -> Optional[dict]:
        """The session's row, decoded once and kept (``Store.session_rows``) until a write or an abort drops it.

        Only the broker's loop reads sessions this way, in its write transactions: a row changed in place must be
        stored (``put_session``) in the same request, or the request fail (its nested transaction drops it)."""
        rows = self.store.session_rows
        row = rows.get(session_id)
        if row is None:
            row = self._get(self.store.sessions, session_id)
            if row is None:
                return None
            if len(rows) >= SESSION_CACHE_MAX:
                rows.clear()
            rows[session_id] = row
        if self.touched is not None:
            self.touched.add(session_id)
        return row

    def put_session(self, row: dict) -> None:
        sid = row["session_id"]
        self.txn.put(sid.encode(), _pack(row), db=self.store.sessions)
        self.store.session_rows[sid] = row
        if self.touched is not None:
            self.touched.add(sid)

    def delete_session(self, session_id: str) -> None:
        self.txn.delete(session_id.encode(), db=self.store.sessions)
        self.store.session_rows.pop(session_id, None)

    def result_status(self, result_id: str, session_id: str) -> Optional[int]:
        """A result's status if it is in ``session_id``, else None (a subscription's snapshot reads only this)."""
        row = self.store.result_rows.get(result_id)  # not touched: nothing is handed out to change
        if row is None:
            key = result_id.encode()
            if not 0 < len(key) <= _MAX_KEY:  # no such key can exist (LMDB refuses to look it up)
                return None
            buf = self.txn.get(key, db=self.store.results)
            if buf is None:
                return None
            row = decode_row(buf)
        return row["status"] if row["session_id"] == session_id else None

    # -- object data (see objects.py) -------------------------------------------------------------
    # An object row is {size, chunks, chunk_size} plus ``staged`` while an upload is unfinished, or
    # ``opaque_id`` for an imported object (its bytes stay in the object storage).

    def _object(self, result_id: str) -> Optional[dict]:
        return self._get(self.store.data, result_id)

    def _put_object_row(self, result_id: str, row: dict) -> None:
        self.puts.data(result_id.encode(), _pack(row))

    def _write_chunks(self, result_id: str, frames: list, first: int, chunk_size: int) -> tuple[int, int]:
        """Write frames as chunks from index ``first``; return (bytes written, index after the last chunk)."""
        written, index = 0, first
        for chunk in rechunk(frames, chunk_size):
            self.puts.data(chunk_key(result_id, index), chunk)
            written += len(chunk)
            index += 1
        return written, index

    def _seal(self, result_id: str, row: dict) -> int:
        """Store a complete object's row (an empty object gets its one empty chunk); return its size."""
        row.pop("staged", None)
        if row["chunks"] == 0:
            self.txn.put(chunk_key(result_id, 0), b"", db=self.store.data)
            row["chunks"] = 1
        self._put_object_row(result_id, row)
        return row["size"]

    def put_object(self, result_id: str, data) -> int:
        """Store a result's data (bytes, or a list of frames) as chunks, replacing any; return its size."""
        key = result_id.encode()
        if self.txn.get(key, db=self.store.data) is not None:  # most results have none yet: no row to read
            self.delete_object(result_id)
        cs = self.store.chunk_size
        frames = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        if len(frames) == 1 and (size := memoryview(frames[0]).nbytes) <= cs:
            # one frame that fits one chunk (most results): stored as it is, empty or not
            puts = self.puts
            puts.data(chunk_key(result_id, 0), frames[0])
            packed = _ONE_CHUNK_ROWS.get((size, cs))
            if packed is None:
                packed = _pack({"size": size, "chunks": 1, "chunk_size": cs})
                if size < _ONE_CHUNK_ROWS_KEPT:
                    _ONE_CHUNK_ROWS[(size, cs)] = packed
            puts.data(key, packed)
            return size
        size, count = self._write_chunks(result_id, frames, 0, cs)
        return self._seal(result_id, {"size": size, "chunks": count, "chunk_size": cs})

    def stage_object(self, result_id: str, frames: list, offset: int) -> int:
        """Add one part of a chunked upload, starting at byte ``offset`` (0 starts over); return the bytes staged.

        Staged data is invisible to every read until ``commit_object``, so an upload left unfinished
        never makes a result look complete.
        """
        row = self._object(result_id)
        if offset == 0:
            if row is not None:
                self.delete_object(result_id)
            row = {"size": 0, "chunks": 0, "chunk_size": self.store.chunk_size, "staged": True}
        else:
            have = row["size"] if row is not None and row.get("staged") else 0
            if have != offset:
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                    f"upload of result {result_id}: {have} byte(s) received so far, but this part "
                                    f"starts at byte {offset} (start again at offset 0)")
        cs = row["chunk_size"]
        first = row["chunks"]
        if first and row["size"] < first * cs:
            # The last chunk is not full: rewrite it with the new bytes appended.
            first -= 1
            frames = [self.txn.get(chunk_key(result_id, first), db=self.store.data), *frames]
        written, row["chunks"] = self._write_chunks(result_id, frames, first, cs)
        row["size"] = first * cs + written
        self._put_object_row(result_id, row)
        return row["size"]

    def commit_object(self, result_id: str) -> int:
        """Make a staged upload the result's data; return its size."""
        row = self._object(result_id)
        if row is None or not row.get("staged"):
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"result {result_id} has no upload in progress")
        return self._seal(result_id, row)

    def put_reference(self, result_id: str, opaque_id: str, size: int) -> None:
        """Make a result's data the object ``opaque_id`` of the object storage (nothing is copied)."""
        self.delete_object(result_id)
        cs = self.store.chunk_size
        self._put_object_row(result_id, {"size": size, "chunks": n_chunks(size, cs), "chunk_size": cs,
                                         "opaque_id": opaque_id})

    def put_segment(self, result_id: str, token: str, size: int, digest: str) -> int:
        """Make a result's data the spilled shared-memory segment ``token`` (shm.py); return its size."""
        self.delete_object(result_id)
        cs = self.store.chunk_size
        self._put_object_row(result_id, {"size": size, "chunks": n_chunks(size, cs), "chunk_size": cs,
                                         "segment": token, "checksum": digest})
        self.txn.put(token.encode(), result_id.encode(), db=self.store.segment_files)
        return size

    def _data_row(self, result_id: str) -> Optional[dict]:
        """Return a result's object row, or None if it has no data (or only an unfinished upload).

        For an imported object, raise if its file is gone or changed (nothing could read it).
        """
        row = self._object(result_id)
        if row is None or row.get("staged"):
            return None
        if "opaque_id" in row:
            self._storage(result_id).check(row["opaque_id"], row["size"])
        return row

    def object_size(self, result_id: str) -> Optional[int]:
        """Return the size of a result's data, or None if it has none (or only an unfinished upload); raise as
        ``_data_row``."""
        row = self._data_row(result_id)
        return None if row is None else row["size"]

    def small_object(self, result_id: str, limit: int) -> Optional[tuple[int, Optional[bytes]]]:
        """Return a result's data size and, if it is at most ``limit`` bytes, the data (else None); None if it has
        no data; raise as ``_data_row``.

        ``object_size`` then ``read_object`` in one look at the object row (DISPATCH reads every input of every
        task it carries: 3.2 -> 1.4 us per input).
        """
        row = self._data_row(result_id)
        if row is None:
            return None
        size = row["size"]
        if size > limit:
            return size, None
        if row["chunks"] == 1 and "segment" not in row and "opaque_id" not in row:  # one chunk in LMDB (most)
            return size, self.txn.get(chunk_key(result_id, 0), db=self.store.data)
        return size, self.read_object(result_id)

    def _storage(self, result_id: str) -> ObjectStorage:
        if self.store.object_storage is None:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"result {result_id} was imported from an object storage, and this broker has none")
        return self.store.object_storage

    def _read_segment(self, result_id: str, token: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(os.path.join(self.store.path, "segments", token), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"the data of result {result_id} (shared-memory "
                                f"segment {token}) cannot be read: {exc.strerror}") from None
        if len(data) != length:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"the data of result {result_id} (shared-memory "
                                f"segment {token}) is shorter than recorded")
        return data

    def object_chunks(self, result_id: str) -> int:
        """Return how many chunks a result's data has (0 if it has none)."""
        row = self._object(result_id)
        return 0 if row is None or row.get("staged") else row["chunks"]

    def iter_object_chunks(self, result_id: str, start: int = 0, count: Optional[int] = None) -> Iterator[bytes]:
        """Yield chunks ``start`` to ``start + count`` (default: to the end) of a result's data, one at a time."""
        row = self._object(result_id)
        if row is None or row.get("staged"):
            return
        stop = row["chunks"] if count is None else min(row["chunks"], start + count)
        name = row.get("opaque_id")
        if "segment" in row:  # a shared-memory segment's file: read a chunk at a time, for peers on other hosts
            cs, size = row["chunk_size"], row["size"]
            for index in range(start, stop):
                yield self._read_segment(result_id, row["segment"], index * cs, min(cs, size - index * cs))
            return
        if name is None:
            for index in range(start, stop):
                yield self.txn.get(chunk_key(result_id, index), db=self.store.data)
            return
        storage = self._storage(result_id)
        cs, size = row["chunk_size"], row["size"]
        for index in range(start, stop):
            yield storage.read(name, size, index * cs, min(cs, size - index * cs))

    def read_small(self, result_id: str, max_size: int) -> Optional[bytes]:
        """A result's data when it is stored in LMDB (not a segment file, not imported) in at most ``max_size``
        bytes; else None. What a completion's event carries to a subscription that takes small data inline."""
        row = self._object(result_id)
        if row is None or row["size"] > max_size or "staged" in row or "segment" in row or "opaque_id" in row:
            return None
        return self.read_object(result_id)

    def read_object(self, result_id: str) -> Optional[bytes]:
        """Return a result's data in one buffer (small data only), or None if it has none."""
        chunks = list(self.iter_object_chunks(result_id))
        if not chunks:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def delete_object(self, result_id: str) -> bool:
        """Delete a result's data (an imported object's file stays); return whether there was any."""
        row = self._object(result_id)
        if row is None:
            return False
        if "segment" in row:
            self.txn.delete(row["segment"].encode(), db=self.store.segment_files)
            if self.store.segments is not None:
                self.store.segments.forget(row["segment"])
        elif "opaque_id" not in row:
            for index in range(row["chunks"]):
                self.txn.delete(chunk_key(result_id, index), db=self.store.data)
        self.txn.delete(result_id.encode(), db=self.store.data)
        return True

    # -- per-session indexes ------------------------------------------------------------------

    def _ids(self, index_key: bytes) -> list[str]:
        with self.txn.cursor(db=self.store.session_index) as cur:
            if not cur.set_key(index_key):
                return []
            return [v.decode() for v in cur.iternext_dup()]

    def session_task_ids(self, session_id: str) -> list[str]:
        return self._ids(session_tasks_key(session_id))

    def session_result_ids(self, session_id: str) -> list[str]:
        return self._ids(session_results_key(session_id))

    def first_session_ids(self, index_key: bytes, n: int) -> list[str]:
        """The first ``n`` ids of a session's index (``session_tasks_key`` / ``session_results_key``), in id order."""
        with self.txn.cursor(db=self.store.session_index) as cur:
            if not cur.set_key(index_key):
                return []
            return [v.decode() for v in itertools.islice(cur.iternext_dup(), n)]

    def delete_task_row(self, task_id: str, session_id: str) -> None:
        """Remove a task's row, live-task entry and session index entry (a session being deleted)."""
        key = task_id.encode()
        self.txn.delete(key, db=self.store.tasks)
        self.txn.delete(key, db=self.store.live_tasks)
        self.txn.delete(session_tasks_key(session_id), key, db=self.store.session_index)
        self.store.task_rows.pop(task_id, None)

    def delete_result_row(self, result_id: str, session_id: str) -> None:
        """Remove a result's row, its data and its session index entry (a session being deleted)."""
        key = result_id.encode()
        self.txn.delete(key, db=self.store.results)
        self.txn.delete(session_results_key(session_id), key, db=self.store.session_index)
        self.store.result_rows.pop(result_id, None)
        self.delete_object(result_id)

    # -- scans (restart) ------------------------------------------------------------------------

    def iter_rows(self, db) -> Iterator[dict]:
        with self.txn.cursor(db=db) as cur:
            for _, buf in cur:
                yield decode_row(buf)

    def iter_tasks(self) -> Iterator[dict]:
        return self.iter_rows(self.store.tasks)

    def iter_live_tasks(self) -> Iterator[tuple[str, Optional[tuple[str, int]]]]:
        """Yield (task id, queued) for every task not in a final status, in task id order (what a restart reads).

        ``queued`` is (partition id, priority) for a SUBMITTED task, which is all it takes to queue it
        again without reading its row; None for any other status (read the row).
        """
        with self.txn.cursor(db=self.store.live_tasks) as cur:
            for key, value in cur:
                yield key.decode(), (tuple(_unpack(value)) if value else None)

    def iter_sessions(self) -> Iterator[dict]:
        return self.iter_rows(self.store.sessions)


class _Nested:
    """The context of ``Txn.nested``: a plain class, as it runs once per request (a generator costs more)."""

    __slots__ = ("parent", "child", "touched", "mark")

    def __init__(self, parent: Txn):
        self.parent = parent

    def __enter__(self) -> Txn:
        store, txn = self.parent.store, self.parent.txn
        self.touched = set()
        if type(txn) is LoggedTxn:  # its ops go into the turn's; cut off if it aborts
            self.child = store.env.begin(write=True, parent=txn.raw)
            self.mark = txn.ops.mark()
            return Txn(store, LoggedTxn(self.child, txn.ops, store.table_index), self.touched)
        self.child = store.env.begin(write=True, parent=txn)
        self.mark = None
        return Txn(store, self.child, self.touched)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.child.commit()
            if self.parent.touched is not None:
                self.parent.touched |= self.touched
        else:
            self.child.abort()
            if self.mark is not None:
                self.parent.txn.ops.cut(self.mark)
            # Rows this request handed out may carry changes LMDB just undid: read them again next time.
            store = self.parent.store
            for key in self.touched:
                store.task_rows.pop(key, None)
                store.result_rows.pop(key, None)
                store.session_rows.pop(key, None)
