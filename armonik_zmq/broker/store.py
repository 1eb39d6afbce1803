"""The broker's tables in one LMDB environment: sessions, tasks, results, object data, and indexes.

Rows are msgpack maps keyed by the id's UTF-8 bytes. Every write goes through a ``Txn`` opened by the
broker's single thread, once per loop turn (group commit); a request that fails part-way is undone
with a nested transaction, so the other requests of the turn still commit.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import lmdb
import msgpack

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(buf) -> dict:
    return msgpack.unpackb(buf, raw=False)


class Store:
    """One LMDB environment with the broker's named databases, opened once at start."""

    def __init__(self, path: str, *, map_size: int = 64 << 30, sync: bool = True):
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        # max_spare_txns=0: never carry reader slots across a fork (RELIABILITY.md section 2)
        self.env = lmdb.open(path, map_size=map_size, max_dbs=8, sync=sync, metasync=sync,
                             max_spare_txns=0, readahead=False)
        self.sessions = self.env.open_db(b"sessions")
        self.tasks = self.env.open_db(b"tasks")
        self.results = self.env.open_db(b"results")
        self.data = self.env.open_db(b"data")
        #: session id -> task ids / result ids (for cancel, purge, delete)
        self.session_tasks = self.env.open_db(b"session_tasks", dupsort=True)
        self.session_results = self.env.open_db(b"session_results", dupsort=True)
        self.meta = self.env.open_db(b"meta")

    @contextlib.contextmanager
    def write(self) -> Iterator["Txn"]:
        """Open the turn's write transaction: commit on success, abort on any exception."""
        with self.env.begin(write=True) as txn:
            yield Txn(self, txn)

    @contextlib.contextmanager
    def read(self) -> Iterator["Txn"]:
        with self.env.begin(write=False) as txn:
            yield Txn(self, txn)

    def reader_check(self) -> int:
        """Clear reader slots left by dead processes."""
        return self.env.reader_check()

    def close(self) -> None:
        self.env.close()


class Txn:
    """Typed access to the tables inside one LMDB transaction."""

    __slots__ = ("store", "txn")

    def __init__(self, store: Store, txn: lmdb.Transaction):
        self.store = store
        self.txn = txn

    @contextlib.contextmanager
    def nested(self) -> Iterator["Txn"]:
        """Run one request in a child transaction, so its failure undoes only its own writes."""
        child = self.store.env.begin(write=True, parent=self.txn)
        try:
            yield Txn(self.store, child)
        except BaseException:
            child.abort()
            raise
        else:
            child.commit()

    # -- rows -------------------------------------------------------------------------------

    def _get(self, db, key: str) -> Optional[dict]:
        buf = self.txn.get(key.encode(), db=db)
        return None if buf is None else _unpack(buf)

    def get_session(self, session_id: str) -> Optional[dict]:
        return self._get(self.store.sessions, session_id)

    def put_session(self, row: dict) -> None:
        self.txn.put(row["session_id"].encode(), _pack(row), db=self.store.sessions)

    def get_task(self, task_id: str) -> Optional[dict]:
        return self._get(self.store.tasks, task_id)

    def put_task(self, row: dict, new: bool = False) -> None:
        key = row["task_id"].encode()
        self.txn.put(key, _pack(row), db=self.store.tasks)
        if new:
            self.txn.put(row["session_id"].encode(), key, db=self.store.session_tasks)

    def get_result(self, result_id: str) -> Optional[dict]:
        return self._get(self.store.results, result_id)

    def put_result(self, row: dict, new: bool = False) -> None:
        key = row["result_id"].encode()
        self.txn.put(key, _pack(row), db=self.store.results)
        if new:
            self.txn.put(row["session_id"].encode(), key, db=self.store.session_results)

    # -- object data --------------------------------------------------------------------------

    def get_data(self, result_id: str) -> Optional[bytes]:
        return self.txn.get(result_id.encode(), db=self.store.data)

    def put_data(self, result_id: str, data) -> None:
        self.txn.put(result_id.encode(), data, db=self.store.data)

    def delete_data(self, result_id: str) -> bool:
        return self.txn.delete(result_id.encode(), db=self.store.data)

    # -- per-session indexes ------------------------------------------------------------------

    def _ids(self, db, session_id: str) -> list[str]:
        with self.txn.cursor(db=db) as cur:
            if not cur.set_key(session_id.encode()):
                return []
            return [v.decode() for v in cur.iternext_dup()]

    def session_task_ids(self, session_id: str) -> list[str]:
        return self._ids(self.store.session_tasks, session_id)

    def session_result_ids(self, session_id: str) -> list[str]:
        return self._ids(self.store.session_results, session_id)

    def delete_session_rows(self, session_id: str) -> tuple[int, int]:
        """Remove every task, result, data and index entry of a session; return (tasks, results) removed."""
        key = session_id.encode()
        task_ids = self.session_task_ids(session_id)
        result_ids = self.session_result_ids(session_id)
        for tid in task_ids:
            self.txn.delete(tid.encode(), db=self.store.tasks)
        for rid in result_ids:
            self.txn.delete(rid.encode(), db=self.store.results)
            self.txn.delete(rid.encode(), db=self.store.data)
        self.txn.delete(key, db=self.store.session_tasks)
        self.txn.delete(key, db=self.store.session_results)
        return len(task_ids), len(result_ids)

    # -- scans (restart) ------------------------------------------------------------------------

    def iter_rows(self, db) -> Iterator[dict]:
        with self.txn.cursor(db=db) as cur:
            for _, buf in cur:
                yield _unpack(buf)

    def iter_tasks(self) -> Iterator[dict]:
        return self.iter_rows(self.store.tasks)

    def iter_sessions(self) -> Iterator[dict]:
        return self.iter_rows(self.store.sessions)
