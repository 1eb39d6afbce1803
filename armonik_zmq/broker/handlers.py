"""One ``handle_<op>`` per operation, and the Op -> handler table.

A handler reads the request from ``req``, checks everything first (raising ``ProtocolError``, which
becomes the error reply), then applies its changes through ``BrokerState`` inside the turn's
transaction and queues its reply with ``req.reply``. It never sends: the server sends after commit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional

from ..protocol import ErrorCode, Op, ProtocolError, split_frames
from ..status import ResultStatus, SessionStatus, TaskStatus
from . import options as task_options
from . import segments as shm_segments
from .events import IdFrame, IdList
from .state import new_id, not_found
from .store import RESULT_FIELDS, Txn

if TYPE_CHECKING:
    from .server import Broker, Request

log = logging.getLogger(__name__)

_R = ResultStatus
_S = SessionStatus
_T = TaskStatus
_SESSION_FIELDS = ("session_id", "status", "client_submission", "worker_submission", "partition_ids", "options",
                   "created_at", "cancelled_at", "closed_at", "purged_at", "deleted_at", "duration", "owner")
_RESULT_KEYS = frozenset(RESULT_FIELDS)


def result_view(row: dict) -> dict:
    """A result row as clients see it: the row itself when it has exactly the public fields (replies are packed at
    once, so it is not copied), else those fields of it."""
    return row if row.keys() == _RESULT_KEYS else {k: row[k] for k in RESULT_FIELDS}


def session_view(row: dict) -> dict:
    return {k: row.get(k) for k in _SESSION_FIELDS}


class Handlers:
    """Mixed into ``Broker``; ``self.state`` is the BrokerState, ``self.config`` the BrokerConfig."""

    # -- service -------------------------------------------------------------------------------

    def handle_get_service_config(self: "Broker", req: "Request", txn: Txn) -> None:
        from .. import __version__
        req.reply(data_chunk_max_size=self.config.data_chunk_max_size,
                  max_message_size=self.config.max_message_size, version=__version__,
                  **shm_segments.advertise(self.segments, self.config.shm_threshold))

    def handle_health(self: "Broker", req: "Request", txn: Txn) -> None:
        agents = sum(1 for a in self.agents.values() if a.peer is not None)  # not the placeholders of a restart
        extra = ({"metrics": self.metrics.snapshot(**self.gauges(), **self.auth_figures())}
                 if req.header.get("metrics") else {})
        req.reply(healthy=True, checks=[
            {"name": "lmdb", "healthy": True, "message": self.store.path if self.sees_broker_internals(req) else "open"},
            {"name": "agents", "healthy": agents > 0, "message": f"{agents} agent(s) registered"},
        ], **extra)

    # -- sessions ------------------------------------------------------------------------------

    def handle_create_session(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        partitions = list(h.get("partition_ids") or []) or [self.state.partitions[0]]
        for p in partitions:
            if p not in self.state.partition_slot:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                    f"partition '{p}' does not exist (known: {self.state.partitions})")
        defaults = h.get("default_task_options")
        if defaults is None:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "default_task_options is required")
        opts = task_options.validate(task_options.merge(defaults), partitions, "default_task_options")
        row = {
            "session_id": new_id(), "status": int(_S.RUNNING), "client_submission": True,
            "worker_submission": True, "partition_ids": partitions, "options": opts, "created_at": req.now,
            "cancelled_at": None, "closed_at": None, "purged_at": None, "deleted_at": None, "duration": None,
            "owner": req.user,
        }
        self.state.put_session(txn, row)
        req.reply(session_id=row["session_id"])

    def handle_get_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        req.reply(sessions=[session_view(self.state.require_session(txn, s)) for s in req.header["session_ids"]])

    def _session_transition(self: "Broker", req: "Request", txn: Txn, allowed: tuple, verb: str,
                            apply: Callable[[Txn, dict, float], None]) -> None:
        rows = [self.state.require_session(txn, s) for s in req.header["session_ids"]]
        for row in rows:
            if row["status"] not in allowed:
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                    f"session {row['session_id']} is {_S(row['status']).name} and cannot be {verb} "
                                    f"(allowed from: {', '.join(_S(s).name for s in allowed)})")
        for row in rows:
            apply(txn, row, req.now)
            self.state.put_session(txn, row)
        req.reply(sessions=[session_view(r) for r in rows])

    def handle_cancel_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        def cancel(txn: Txn, row: dict, now: float) -> None:
            row.update(status=int(_S.CANCELLED), cancelled_at=now, client_submission=False, worker_submission=False)
            self.state.session_status[row["session_id"]] = row["status"]
            # Running tasks are stopped on their agents (ArmoniK pings them to stop cancelled tasks).
            self.cancel_tasks(req, txn, txn.session_task_ids(row["session_id"]),
                              f"session {row['session_id']} was cancelled")
            self.state.drop_pause_gate(row["session_id"])
            for rid in txn.session_result_ids(row["session_id"]):
                rrow = txn.get_result(rid)
                if rrow["status"] == _R.CREATED:
                    for task in self.state.abort_result(txn, rrow):  # only tasks of this session can wait on it
                        self.state.end_task(txn, task, _T.CANCELLED, now, f"session {row['session_id']} was cancelled")
        self._session_transition(req, txn, (_S.RUNNING, _S.PAUSED, _S.CLOSED), "cancelled", cancel)

    def handle_close_sessions(self: "Broker", req: "Request", txn: Txn) -> None:
        def close(txn: Txn, row: dict, now: float) -> None:
            row.update(status=int(_S.CLOSED), closed_at=now, duration=now - row["created_at"],
                       client_submission=False, worker_submission=False)
        self._session_transition(req, txn, (_S.RUNNING, _S.PAUSED), "closed", close)

    # -- results -------------------------------------------------------------------------------

    def _open_session(self: "Broker", txn: Txn, session_id: str, action: str) -> dict:
        row = self.state.require_session(txn, session_id)
        if row["status"] not in (_S.RUNNING, _S.PAUSED):
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"session {session_id} is {_S(row['status']).name}: cannot {action}")
        return row

    def handle_create_results_metadata(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        sid = self._open_session(txn, h["session_id"], "create results")["session_id"]
        # the rows have the public fields only: each is its own view (result_view)
        req.reply(results=self.state.create_results(txn, sid, h["results"], req.now))

    def handle_create_results(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        if len(h["frames"]) != len(h["results"]):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"'frames' has {len(h['frames'])} counts for {len(h['results'])} results")
        groups = split_frames(req.frames, h["frames"])
        sid = self._open_session(txn, h["session_id"], "create results")["session_id"]
        rows = []
        for spec, data in zip(h["results"], groups):
            row = self.state.new_result_row(sid, spec["name"], manual_deletion=spec.get("manual_deletion", False),
                                            now=req.now)
            self.state.insert_completed_result(txn, row, data, req.now)
            rows.append(result_view(row))
        req.reply(results=rows)

    def handle_upload_result_data(self: "Broker", req: "Request", txn: Txn) -> None:
        """Store uploaded data: whole results, or one part of a chunked upload (``offset``, ``final``).

        The parts of a chunked upload are staged under the result; only the final one makes it COMPLETED.
        """
        h = req.header
        ids = h["result_ids"]
        if len(h["frames"]) != len(ids):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"'frames' has {len(h['frames'])} counts for {len(ids)} results")
        chunked = "offset" in h or "final" in h
        if chunked and len(ids) != 1:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"a chunked upload ('offset', 'final') carries one result, got {len(ids)} result ids")
        groups = split_frames(req.frames, h["frames"])
        sid = self._open_session(txn, h["session_id"], "upload data")["session_id"]
        rows = []
        for rid in ids:
            row = self.state.require_result(txn, rid, sid)
            if row["status"] != _R.CREATED:
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                    f"result {rid} is {_R(row['status']).name}: only a result without data can be uploaded")
            rows.append(row)
        if len(set(ids)) != len(rows):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "a result id appears twice in one upload")
        if not chunked:
            for row, data in zip(rows, groups):
                self.state.complete_result(txn, row, data, "", req.now)
            req.reply(results=[result_view(r) for r in rows])
            return
        row = rows[0]
        received = txn.stage_object(row["result_id"], groups[0], h.get("offset", 0))
        if h.get("final", True):
            self.state.mark_result_completed(txn, row, txn.commit_object(row["result_id"]), "", req.now)
        req.reply(results=[result_view(row)], received=received)

    def _read_chunks(self: "Broker", txn: Txn, session_id: str, result_id: str, first: int = 0,
                     limit: Optional[int] = None) -> tuple[int, int, list]:
        """Return (size, chunks in all, chunks ``first`` to ``first + limit``) of a COMPLETED result's data."""
        row = self.state.require_result(txn, result_id, session_id)
        size = txn.object_size(result_id) if row["status"] == _R.COMPLETED else None
        if size is None:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"result {result_id} is {_R(row['status']).name}: it has no data to download")
        total = txn.object_chunks(result_id)
        if first >= total and first:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE,
                                f"result {result_id} has {total} chunk(s): 'first_chunk' {first} is past the end")
        return size, total, list(txn.iter_object_chunks(result_id, first, limit))

    def _read_data(self: "Broker", txn: Txn, session_id: str, result_ids: list[str]) -> tuple[list, list, list]:
        """Return the sizes, frame counts and frames (chunks) of whole results."""
        sizes, counts, frames = [], [], []
        for rid in result_ids:
            size, _, parts = self._read_chunks(txn, session_id, rid)
            sizes.append(size)
            counts.append(len(parts))
            frames.extend(parts)
        return sizes, counts, frames

    def handle_download_result_data(self: "Broker", req: "Request", txn: Txn) -> None:
        """Send results' data; with ``first_chunk``/``max_chunks``, only that range of one result's chunks.

        Asking ranges keeps each reply to one message's worth, however large the result.
        """
        h = req.header
        self.state.require_session(txn, h["session_id"])
        ranged = "first_chunk" in h or "max_chunks" in h
        if ranged and len(h["result_ids"]) != 1:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"a ranged download ('first_chunk', 'max_chunks') "
                                                            f"names one result, got {len(h['result_ids'])} result ids")
        sizes, totals, counts, frames = [], [], [], []
        for rid in h["result_ids"]:
            size, total, parts = self._read_chunks(txn, h["session_id"], rid, h.get("first_chunk", 0),
                                                   h.get("max_chunks"))
            sizes.append(size)
            totals.append(total)
            counts.append(len(parts))
            frames.extend(parts)
        req.reply(sizes=sizes, chunks=totals, frames=counts, data=frames)

    def handle_get_results(self: "Broker", req: "Request", txn: Txn) -> None:
        rows = []
        for rid in req.header["result_ids"]:
            row = txn.get_result(rid)
            if row is None:
                raise not_found("result", rid)
            rows.append(result_view(row))
        req.reply(results=rows)

    # -- tasks ---------------------------------------------------------------------------------

    def handle_submit_tasks(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        session = self.state.require_session(txn, h["session_id"])
        self.state.check_submission(session, "client")
        infos = self.state.create_tasks(txn, session, h["tasks"], h.get("task_options"), req.now)
        req.reply(tasks=infos)

    def handle_submit_inline(self: "Broker", req: "Request", txn: Txn) -> None:
        """Create, per task, its payload result (with the data that came), its output result and the task.

        What CREATE_RESULTS, CREATE_RESULTS_METADATA and SUBMIT_TASKS do, in one request: one round trip
        and one commit instead of three on the way to a task's start (its latency). All or nothing.
        """
        h = req.header
        if len(h["frames"]) != len(h["tasks"]):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"'frames' has {len(h['frames'])} counts for {len(h['tasks'])} tasks")
        groups = split_frames(req.frames, h["frames"])
        session = self._open_session(txn, h["session_id"], "submit tasks")
        self.state.check_submission(session, "client")
        # per task: its payload (new_result_row + insert_completed_result) and its output (new_result_row +
        # announce_result: stored by create_tasks, with its owner), compiled
        creations, payloads, outputs = self.state.inline_results(txn, session["session_id"], h["tasks"], groups,
                                                                 req.now, self.state.new_payloads,
                                                                 self.config.inline_limit)
        req.reply(tasks=self.state.create_tasks(txn, session, creations, h.get("task_options"), req.now,
                                                new_outputs=outputs, new_inputs=payloads))

    def handle_get_tasks(self: "Broker", req: "Request", txn: Txn) -> None:
        req.reply(tasks=[self.state.require_task(txn, t) for t in req.header["task_ids"]])

    # -- events --------------------------------------------------------------------------------

    def handle_subscribe_events(self: "Broker", req: "Request", txn: Txn) -> None:
        h = req.header
        sid = self.state.require_session(txn, h["session_id"])["session_id"]
        events = self.state.events
        result_ids = h.get("result_ids")
        if h.get("result_ids_frame"):
            if result_ids is not None or len(req.frames) != 1:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "result_ids_frame: the ids come in one data frame, "
                                    "without result_ids in the header")
            result_ids = IdFrame(req.frames[0])
        elif req.frames:
            raise ProtocolError(ErrorCode.MALFORMED, f"{len(req.frames)} data frame(s) without result_ids_frame")
        elif result_ids is not None:
            result_ids = IdList(result_ids)
        # with "snapshot", the named results' statuses follow this turn's commit, in slices (broker/events.py)
        events.subscribe(req.peer, req.rid, sid, h.get("event_types"), h.get("task_filter"), h.get("result_filter"),
                         h.get("inline_max", 0), result_ids, bool(h.get("snapshot")), bool(h.get("with_replies")))
        # The undo names the subscription, not the request: a closure over ``req`` (which holds it) would make a
        # reference cycle, keeping the header (a wait on N results: N ids) alive until a full collection.
        peer, rid = req.peer, req.rid
        req.on_rollback(lambda: events.unsubscribe(peer, rid))
        req.reply(subscription=req.rid)

    def handle_unsubscribe_events(self: "Broker", req: "Request", txn: Txn) -> None:
        if not self.state.events.unsubscribe(req.peer, req.header["subscription"]):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no subscription {req.header['subscription']} on this connection")
        req.reply()


def handler_table(broker: "Broker") -> dict[Op, Callable]:
    """Map every served op to its bound ``handle_<op>`` method."""
    table = {}
    for op in Op:
        fn = getattr(broker, f"handle_{op.name.lower()}", None)
        if fn is not None:
            table[op] = fn
    return table
