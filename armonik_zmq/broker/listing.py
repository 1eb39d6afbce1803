"""ArmoniK's list, count and look-up calls: filtered, sorted and paged, streamed from LMDB.

A list never loads its table. It streams the rows (over the session index when the filter pins the
session, else over the whole table), counts the total as it goes, and keeps only the sort keys and
ids of the ``(page + 1) * page_size`` best rows; the page's rows are read again at the end. Listed by
the table's key with no other condition than the session, a page costs only its own rows: the index
gives the total and the order.

A scan of more than ``INLINE_ROWS`` rows does not run inside the turn: it becomes a ``ScanJob``, run
between turns in slices of ``SCAN_SLICE`` seconds on its own read snapshot (taken after the commit
of the turn that received it), so that a list over a million rows never stalls agents and clients.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Optional

from .. import __version__
from ..config import PartitionConfig
from ..protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError, reply_error, reply_ok
from .filters import Filter, SortKey
from .handlers import result_view, session_view
from .store import Txn, decode_row, session_results_key, session_tasks_key

if TYPE_CHECKING:
    from .server import Broker, Request

log = logging.getLogger(__name__)

#: page_size when a request gives none (the official client's default)
DEFAULT_PAGE_SIZE = 1000
#: Rows a scan may read inside the turn; a longer one runs between turns (about 5 µs a row).
INLINE_ROWS = 10_000
#: Time given to scans between two turns (seconds): the loop serves other messages at least this often.
SCAN_SLICE = 0.02
#: Rows a scan reads between two looks at the clock.
_ROWS_PER_STEP = 1000
_TASK_ID_LISTS = ("parent_task_ids", "data_dependencies", "expected_output_ids", "retry_of_ids")

#: A scan: yields between slices of rows, returns the reply's fields.
Steps = Generator[None, None, dict]
#: the session index's key of a session's ids of one table (store.session_tasks_key or session_results_key), or
#: None for a table the index does not cover
IndexKey = Optional[Callable[[str], bytes]]


def _task_view(row: dict, detailed: bool, with_errors: bool) -> dict:
    """A task row as ListTasks sends it: TaskDetailed, or TaskSummary (counts instead of the id lists)."""
    if not with_errors and row.get("error") is not None:
        row["error"] = ""  # the task still failed (output.success is false); only the message is left out
    if not detailed:
        for name in _TASK_ID_LISTS:
            row["count_" + name] = len(row.pop(name) or ())
    return row


def _partition_row(p: PartitionConfig) -> dict:
    return {"id": p.id, "parent_partition_ids": list(p.parent_partition_ids), "pod_reserved": p.pod_reserved,
            "pod_max": p.pod_max, "pod_configuration": dict(p.pod_configuration),
            "preemption_percentage": p.preemption_percentage, "priority": p.priority}


def select(rows: Iterator[tuple[Any, dict]], flt: Filter, sort: SortKey, page: int,
           page_size: int) -> Generator[None, None, tuple[int, list]]:
    """Scan a stream of (id, row); return (total matching rows, ids of the page). Yields between slices.

    Only the sort keys of the page-deep best rows are kept (pruned to that depth as they pile up).
    Rows without a value for the sort field come last in both directions; ties are ordered by id.
    """
    depth = (page + 1) * page_size
    best = heapq.nlargest if sort.descending else heapq.nsmallest
    get, descending = sort.get, sort.descending
    keys: list[tuple] = []
    total = 0
    for n, (key, row) in enumerate(rows, 1):
        if flt(row):
            total += 1
            value = get(row)
            # (has value, value, id) / (lacks value, value, id): rows without a value never compare their None
            keys.append((value is not None, value, key) if descending else (value is None, value, key))
            if len(keys) >= 2 * depth + _ROWS_PER_STEP:
                keys = best(depth, keys)
        if n % _ROWS_PER_STEP == 0:
            yield
    return total, [key for _, _, key in best(depth, keys)[page * page_size:]]


def _finish(steps: Generator[None, None, Any]) -> Any:
    """Run a scan to its end in one go; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class ScanJob:
    """A list or count too long for one turn, waiting for (or running in) the slices between turns."""

    __slots__ = ("peer", "op", "rid", "work", "txn", "steps")

    def __init__(self, peer: bytes, op: int, rid: int, work: Callable[[Txn], Steps]):
        self.peer = peer
        self.op = op
        self.rid = rid
        self.work = work
        self.txn = None
        self.steps: Optional[Steps] = None


class Listing:
    """Mixed into ``Broker``: ``handle_list_*``, the other read-only calls of the official client, and scan jobs."""

    #: long scans, in arrival order; only the first one runs (and holds a read snapshot)
    scan_jobs: deque[ScanJob]

    # -- scans ---------------------------------------------------------------------------------------

    def _rows(self: "Broker", txn: Txn, db, index: IndexKey, flt: Filter) -> Iterator[tuple[bytes, dict]]:
        """Stream (key, row) of a table: only the pinned sessions' rows when the filter pins sessions (``index``:
        the session index's key of a session's ids of this table, None for a table without one)."""
        raw = txn.txn
        pins = flt.pinned("session_id") if index is not None else None
        if pins is None:
            with raw.cursor(db=db) as cur:
                for key, buf in cur:
                    yield key, decode_row(buf)
            return
        with raw.cursor(db=self.store.session_index) as cur:
            for sid in sorted(pins):
                if not cur.set_key(index(sid)):
                    continue
                for key in cur.iternext_dup():
                    buf = raw.get(key, db=db)
                    if buf is not None:
                        yield key, decode_row(buf)

    def _candidates(self: "Broker", txn: Txn, db, index: IndexKey, flt: Filter) -> int:
        """Count the rows a scan would read (the pinned sessions' rows, else the whole table)."""
        raw = txn.txn
        pins = flt.pinned("session_id") if index is not None else None
        if pins is None:
            return raw.stat(db)["entries"]
        with raw.cursor(db=self.store.session_index) as cur:
            return sum(cur.count() for sid in pins if cur.set_key(index(sid)))

    def _page_by_key(self: "Broker", txn: Txn, db, index: IndexKey, flt: Filter, descending: bool, start: int,
                     size: int) -> tuple[int, list[bytes]]:
        """Page through keys alone: the filter is nothing or only session pins, the sort is the table's key."""
        raw = txn.txn
        if flt.match is None:
            total = raw.stat(db)["entries"]
            with raw.cursor(db=db) as cur:
                keys = cur.iterprev(values=False) if descending else cur.iternext(values=False)
                return total, list(itertools.islice(keys, start, start + size))
        cursors = []
        try:
            total = 0
            for sid in sorted(flt.pinned("session_id") or ()):
                cur = raw.cursor(db=self.store.session_index)
                cursors.append(cur)
                if not cur.set_key(index(sid)):
                    continue
                total += cur.count()
                if descending:
                    cur.last_dup()
            # each session's ids are sorted (dupsort): merging them gives the table's order
            iters = [c.iterprev_dup() if descending else c.iternext_dup() for c in cursors if c.key()]
            return total, list(itertools.islice(heapq.merge(*iters, reverse=descending), start, start + size))
        finally:
            for cur in cursors:
                cur.close()

    def _answer(self: "Broker", req: "Request", txn: Txn, rows_to_read: int, work: Callable[[Txn], Steps]) -> None:
        """Reply now if the scan is short, else queue it as a ScanJob (whose reply comes when it ends)."""
        if rows_to_read <= INLINE_ROWS:
            req.reply(**_finish(work(txn)))
        else:
            self.scan_jobs.append(ScanJob(req.peer, req.op, req.rid, work))

    def advance_scans(self: "Broker") -> bool:
        """Run the queued scans for one slice of time and reply to those that end; return whether some remain."""
        jobs = self.scan_jobs
        deadline = time.monotonic() + SCAN_SLICE
        while jobs and time.monotonic() < deadline:
            job = jobs[0]
            out = self._run_slice(job, deadline)
            if out is None:
                break
            jobs.popleft()
            self._send_now(self.frontend, [job.peer, out])
        return bool(jobs)

    def _run_slice(self: "Broker", job: ScanJob, deadline: float) -> Optional[bytes]:
        """Advance a scan until ``deadline``; return its reply once it ended, else None."""
        try:
            if job.steps is None:
                job.txn = self.store.env.begin(write=False)
                job.steps = job.work(Txn(self.store, job.txn))
            while time.monotonic() < deadline:
                next(job.steps)
            return None
        except StopIteration as done:
            out = reply_ok(job.op, job.rid, **done.value)
        except ProtocolError as exc:
            out = reply_error(job.op, job.rid, exc.code, exc.message)
        except Exception as exc:  # a bug: answer, log loudly, keep serving
            log.exception("rid=%d scan failed inside the broker", job.rid)
            out = reply_error(job.op, job.rid, ErrorCode.INTERNAL, f"internal error while listing: {exc!r}")
        if job.txn is not None:
            job.txn.abort()
        return out

    # -- lists -----------------------------------------------------------------------------------------

    def _list(self: "Broker", req: "Request", txn: Txn, entity: str, db, index: IndexKey, key_field: str,
              default_sort: str, view: Callable[[dict], dict], name: str) -> None:
        """Answer the filter, sort and paging of a List* request with ``{total, page, page_size, <name>}``."""
        h = req.header
        flt = Filter(h.get("filter"), "filter", entity)
        if self.auth is not None:
            flt = self.auth.restrict(req, flt, entity)
        sort = SortKey(h.get("sort"), entity, default_sort)
        page, size = h.get("page", 0), h.get("page_size", DEFAULT_PAGE_SIZE)
        by_key = sort.field == key_field and (flt.match is None or (index is not None and flt.only_pins("session_id")))

        def work(txn: Txn) -> Steps:
            if by_key:
                total, keys = self._page_by_key(txn, db, index, flt, sort.descending, page * size, size)
            else:
                total, keys = yield from select(self._rows(txn, db, index, flt), flt, sort, page, size)
            raw = txn.txn
            return {"total": total, "page": page, "page_size": size,
                    name: [view(decode_row(raw.get(key, db=db))) for key in keys]}

        self._answer(req, txn, 0 if by_key else self._candidates(txn, db, index, flt), work)

    def handle_list_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        self._list(req, txn, "session", self.store.sessions, None, "session_id", "status", session_view, "sessions")

    def handle_list_tasks(self: "Broker", req: "Request", txn: Txn) -> None:
        detailed, with_errors = req.header.get("detailed", True), req.header.get("with_errors", False)
        self._list(req, txn, "task", self.store.tasks, session_tasks_key, "task_id", "task_id",
                   lambda row: _task_view(row, detailed, with_errors), "tasks")

    def handle_list_results(self: "Broker", req: "Request", txn: Txn) -> None:
        self._list(req, txn, "result", self.store.results, session_results_key, "result_id", "status",
                   result_view, "results")

    def handle_count_tasks_by_status(self: "Broker", req: "Request", txn: Txn) -> None:
        flt = Filter(req.header.get("filter"), "filter", "task")
        if self.auth is not None:
            flt = self.auth.restrict(req, flt, "task")
        db, index = self.store.tasks, session_tasks_key

        def work(txn: Txn) -> Steps:
            counts: Counter = Counter()
            for n, (_, row) in enumerate(self._rows(txn, db, index, flt), 1):
                if flt(row):
                    counts[row["status"]] += 1
                if n % _ROWS_PER_STEP == 0:
                    yield
            return {"counts": sorted(counts.items())}

        self._answer(req, txn, self._candidates(txn, db, index, flt), work)

    def handle_get_result_ids(self: "Broker", req: "Request", txn: Txn) -> None:
        req.reply(task_results=[{"task_id": tid, "result_ids": self.state.require_task(txn, tid)["expected_output_ids"]}
                                for tid in req.header["task_ids"]])

    # -- partitions and versions --------------------------------------------------------------------

    def _partitions(self: "Broker") -> dict[str, dict]:
        """The partitions this broker serves, in configuration order, with their informative fields."""
        details = {p.id: p for p in self.config.partition_details}
        return {pid: _partition_row(details.get(pid) or PartitionConfig(pid)) for pid in self.state.partitions}

    def handle_list_partitions(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        rows = self._partitions()
        flt = Filter(h.get("filter"), "filter", "partition")
        sort = SortKey(h.get("sort"), "partition", "priority")
        page, size = h.get("page", 0), h.get("page_size", DEFAULT_PAGE_SIZE)
        total, ids = _finish(select(iter(rows.items()), flt, sort, page, size))
        req.reply(total=total, page=page, page_size=size, partitions=[rows[i] for i in ids])

    def handle_get_partitions(self: "Broker", req: "Request", txn: Txn) -> None:
        rows = self._partitions()
        missing = next((p for p in req.header["partition_ids"] if p not in rows), None)
        if missing is not None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"partition {missing} not found (known: {list(rows)})")
        req.reply(partitions=[rows[p] for p in req.header["partition_ids"]])

    def handle_list_versions(self: "Broker", req: "Request", txn: Txn) -> None:
        req.reply(core=__version__, api=str(PROTOCOL_VERSION))
