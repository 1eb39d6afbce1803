"""Read a broker's LMDB directory from another process, read-only, while the broker runs.

The broker grows its map when it fills (``Store.grow``). A reader then gets ``MapResizedError`` on
its next transaction: it must pick up the new size with ``set_mapsize(0)`` and try again, which
``Inspector`` does. Each snapshot is one short read transaction, so an inspector never pins old
pages for long (a long one would keep the broker's data file growing).
"""

from __future__ import annotations

import os
from typing import Optional

import lmdb

from .broker.store import decode_row
from .status import TaskStatus

#: the broker's tables (broker/store.py), by name (``data`` holds each result's object row and its chunks)
TABLES = ("sessions", "tasks", "results", "data", "session_index", "live_tasks",
          "idempotency", "segment_files", "purging", "deleting")
#: tables a directory written by an older broker may not have yet
OPTIONAL_TABLES = ("live_tasks", "idempotency", "segment_files", "purging", "session_index", "deleting")


class Inspector:
    """A read-only view of a broker's LMDB directory, safe to use while the broker writes to it."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise ValueError(f"{path} is not a broker's data directory (no data.mdb): give the broker's --data-dir")
        self.path = path
        #: how many times the broker's map grew under this reader (each one a MapResizedError survived)
        self.resized = 0
        try:
            # readonly: this process never writes; lock=True: it takes a reader slot like any LMDB reader;
            # map_size=0: adopt the size the broker last recorded in the meta page
            self.env = lmdb.open(path, readonly=True, lock=True, max_dbs=16, max_spare_txns=0, map_size=0)
        except lmdb.Error as exc:
            raise ValueError(f"cannot open the LMDB environment in {path}: {exc}") from None
        self.dbs = {}
        for name in TABLES:
            try:
                self.dbs[name] = self._retry(lambda: self.env.open_db(name.encode(), create=False))
            except lmdb.NotFoundError:
                if name not in OPTIONAL_TABLES:
                    raise ValueError(f"{path} has no '{name}' table: is it a broker's data directory?") from None

    def _retry(self, fn):
        """Run ``fn``, picking up the broker's new map size as often as it grew meanwhile."""
        while True:
            try:
                return fn()
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # 0: adopt the size the writer set
                self.resized += 1

    def snapshot(self, tasks: int = 0, by_status: bool = False) -> dict:
        """Return table sizes, map figures and, optionally, ``tasks`` unfinished tasks and status counts."""
        return self._retry(lambda: self._snapshot(tasks, by_status))

    def _snapshot(self, n_tasks: int, by_status: bool) -> dict:
        info = self.env.info()
        psize = self.env.stat()["psize"]
        out: dict = {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * psize,
                     "readers": info["num_readers"], "resized": self.resized}
        with self.env.begin() as txn:
            out["entries"] = {name: txn.stat(db)["entries"] for name, db in self.dbs.items()}
            listed = []
            live = self.dbs.get("live_tasks")
            if n_tasks and live is not None:
                with txn.cursor(db=live) as cur:
                    for key in cur.iternext(values=False):
                        if len(listed) >= n_tasks:
                            break
                        buf = txn.get(key, db=self.dbs["tasks"])
                        if buf is not None:
                            row = decode_row(buf)
                            listed.append([row["task_id"], TaskStatus(row["status"]).name])
            out["tasks"] = listed
            if by_status:
                counts: dict[str, int] = {}
                with txn.cursor(db=self.dbs["tasks"]) as cur:
                    for _, buf in cur:
                        name = TaskStatus(decode_row(buf)["status"]).name
                        counts[name] = counts.get(name, 0) + 1
                out["by_status"] = counts
        return out

    def readers(self) -> str:
        """Return LMDB's table of reader slots (pid, thread, snapshot id), as text."""
        return self.env.readers()

    def close(self) -> None:
        self.env.close()


def format_snapshot(snap: dict, readers: Optional[str] = None) -> str:
    """Render a snapshot for a terminal."""
    mib = 1 << 20
    lines = [f"map: {snap['used_bytes'] / mib:.1f} MiB used of {snap['map_size'] / mib:.1f} MiB "
             f"({snap['readers']} reader slot(s) in use; map grew {snap['resized']} time(s) while watching)"]
    lines.append("rows: " + ", ".join(f"{name} {n}" for name, n in snap["entries"].items()))
    if "by_status" in snap:
        lines.append("tasks by status: " + (", ".join(f"{k} {v}" for k, v in sorted(snap["by_status"].items())) or "none"))
    for task_id, status in snap.get("tasks", ()):
        lines.append(f"  {task_id}  {status}")
    if readers:
        lines.append(readers.rstrip())
    return "\n".join(lines)
