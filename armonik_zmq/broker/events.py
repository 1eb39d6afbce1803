"""Event subscriptions: which client wants which of a session's events, buffered until the turn commits.

A subscription with ``snapshot`` first gets the current status of each result it names. Those statuses are
read between the broker's turns, ``EVENTS_PER_PUSH`` at a time, each slice from the last commit, and sent
at once as one push: a subscription naming 100,000 results no longer holds the broker for one long message
(other clients and agents are served between slices). A named result's events begin with its snapshot
status: until its slice, its events are not sent, as the status read later includes what they said (the
slice reads a commit that holds their changes). So each result's statuses arrive in order, none twice
for one change, and none missed: the same promise as a snapshot taken inside the subscribing turn.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from ..protocol import MAX_BATCH, ErrorCode, ProtocolError
from ..status import EventTypes, ResultStatus, as_ints
from .filters import Filter, equalities

_E = as_ints(EventTypes)
_COMPLETED = int(ResultStatus.COMPLETED)
_NOTFOUND = int(ResultStatus.NOTFOUND)
#: Most events in one EVENT push, and statuses read in one snapshot slice: the subscriber decodes a push in one
#: call (holding its GIL), and a slice of statuses costs the broker a few ms between two turns.
EVENTS_PER_PUSH = 1000


class IdFrame:
    """Result ids sent as one data frame (UTF-8, each one ended by a NUL byte), decoded a slice at a time.

    Each slice decodes its own ids: an empty id, or one that is not UTF-8 (decoded with U+FFFD in place of the
    bad bytes), names no result, and its snapshot status is NOTFOUND (checking the whole frame up front cost
    3-6 ms inside the turn on a busy machine).

    A wait on 100,000 results sends 3.6 MB of ids: as a msgpack list they took ~7 ms to decode inside the
    subscribing turn (quiet machine); here the turn copies and counts them (~1 ms).
    """

    __slots__ = ("buf", "count", "pos")

    def __init__(self, buf):
        buf = bytes(buf)
        if buf and not buf.endswith(b"\0"):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "the result ids frame must end each id with a NUL byte")
        self.buf = buf
        self.count = buf.count(b"\0")
        if self.count > MAX_BATCH:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"the result ids frame has {self.count} ids, at most {MAX_BATCH} allowed")
        #: where the next id starts
        self.pos = 0

    def __len__(self) -> int:
        return self.count

    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def take(self, n: int) -> list[str]:
        """The next ``n`` ids (fewer at the end)."""
        buf, start, end = self.buf, self.pos, self.pos
        find = buf.find
        for _ in range(n):
            at = find(b"\0", end)
            if at < 0:
                break
            end = at + 1
        self.pos = end
        return buf[start:end - 1].decode(errors="replace").split("\0") if end > start else []

    def all(self) -> list[str]:
        return self.buf[:-1].decode(errors="replace").split("\0") if self.buf else []


class IdList:
    """Result ids given as a list (a header's ``result_ids``, or a filter's ``result_id eq`` terms), read as an
    IdFrame is."""

    __slots__ = ("ids", "pos")

    def __init__(self, ids: list):
        self.ids = ids
        #: how many were taken
        self.pos = 0

    def __len__(self) -> int:
        return len(self.ids)

    def done(self) -> bool:
        return self.pos >= len(self.ids)

    def take(self, n: int) -> list[str]:
        """The next ``n`` ids (fewer at the end)."""
        ids = self.ids[self.pos:self.pos + n]
        self.pos += len(ids)
        return ids

    def all(self) -> list[str]:
        return self.ids


class Snapshot:
    """The results whose current status a new subscription still waits for, in the order it named them."""

    __slots__ = ("ids", "unread")

    def __init__(self, ids, unread: Optional[set]):
        #: an IdList or an IdFrame, read slice by slice
        self.ids = ids
        #: the named results not read yet, whose events wait for it; None when the subscription's ``result_ids``
        #: holds only the results read so far (then nothing else passes)
        self.unread = unread

    def take(self, n: int) -> list[str]:
        """The next ``n`` named results (fewer at the end)."""
        return self.ids.take(n)

    def done(self) -> bool:
        return self.ids.done()

    def holds(self, result_id: str) -> bool:
        """Tell whether ``result_id`` is named but not read yet (its events are not sent: its status, read
        later, will say what they said). Not used with ``result_ids``, which holds only the results read."""
        return self.unread is not None and result_id in self.unread


def _joined(data) -> bytes:
    """One bytes object from a result's data as stored: bytes, a buffer, or a list of frames."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


class Subscription:
    __slots__ = ("rid", "peer", "session_id", "types", "task_filter", "result_filter", "result_ids", "inline_max",
                 "pending", "snapshot", "with_replies")

    def __init__(self, rid: int, peer: bytes, session_id: str, types: frozenset, task_filter: Filter,
                 result_filter: Filter, inline_max: int = 0, with_replies: bool = False):
        self.rid = rid
        self.peer = peer
        self.session_id = session_id
        self.types = types
        self.task_filter = task_filter
        self.result_filter = result_filter
        #: the only results whose events it gets (None: any the result filter lets through); while its snapshot is
        #: in progress, those read so far
        self.result_ids: Optional[set] = None
        #: a result completed with at most this many bytes has them in its RESULT_STATUS_UPDATE (0: never)
        self.inline_max = inline_max
        #: events of this turn, sent after the commit
        self.pending: list = []
        #: the statuses still to send, while its snapshot is in progress
        self.snapshot: Optional[Snapshot] = None
        #: its events may travel inside a reply to the same client sent after the same commit (server.py _carry_events)
        self.with_replies = with_replies


class EventBus:
    """Route task and result changes to the subscriptions of their session."""

    def __init__(self) -> None:
        self.by_session: dict[str, list[Subscription]] = {}
        self.by_key: dict[tuple[bytes, int], Subscription] = {}
        #: session id -> the event types any of its subscriptions wants: an event no one wants is never built (the
        #: compiled transitions, _core.Transitions, read it too: it is changed in place, never replaced)
        self.wanted: dict[str, frozenset] = {}
        self.dirty: list[Subscription] = []
        #: subscriptions whose snapshot is in progress, oldest first (one slice of the first per gap between turns)
        self.snapshots: deque[Subscription] = deque()

    def _update_wanted(self, session_id: str) -> None:
        subs = self.by_session.get(session_id)
        if subs:
            self.wanted[session_id] = frozenset().union(*(sub.types for sub in subs))
        else:
            self.wanted.pop(session_id, None)

    def subscribe(self, peer: bytes, rid: int, session_id: str, types, task_filter, result_filter,
                  inline_max: int = 0, result_ids=None, snapshot: bool = False,
                  with_replies: bool = False) -> Subscription:
        """Register a subscription (replacing one of the same peer and rid); with ``snapshot`` its named results'
        statuses go out in slices after this turn's commit (``snapshot_slice``). ``result_ids``: an IdList or an
        IdFrame."""
        task_filter = Filter(task_filter, "task_filter", "task")
        if result_ids is None:
            # Nothing but ``result_id eq`` clauses (how a wait on many results was sent) means the same as
            # result_ids, which costs one set lookup per event and lets the snapshot begin with no set at all.
            equal = equalities(result_filter, "result_filter", "result")
            if equal is not None and equal[0] == "result_id":
                result_ids, result_filter = IdList(equal[1]), None
        result_filter = Filter(result_filter, "result_filter", "result")
        wanted = frozenset(EventTypes(t) for t in (types or ()) if t) or frozenset(EventTypes) - {EventTypes.UNSPECIFIED}
        sub = Subscription(rid, peer, session_id, wanted, task_filter, result_filter, inline_max, with_replies)
        named = (result_ids if result_ids is not None else
                 IdList([v for clause in result_filter.clauses or () for f, op, v in clause
                         if f == "result_id" and op == "eq"]))
        if snapshot and named and (_E.RESULT_STATUS_UPDATE in wanted or _E.NEW_RESULT in wanted):
            # result_ids grows slice by slice: no set of every id inside this turn
            sub.snapshot = Snapshot(named, None if result_ids is not None else set(named.all()))
            sub.result_ids = None if result_ids is None else set()
            self.snapshots.append(sub)
        elif result_ids is not None:
            sub.result_ids = set(result_ids.all())
        self.unsubscribe(peer, rid)
        self.by_key[(peer, rid)] = sub
        self.by_session.setdefault(session_id, []).append(sub)
        self._update_wanted(session_id)
        return sub

    def unsubscribe(self, peer: bytes, rid: int) -> bool:
        sub = self.by_key.pop((peer, rid), None)
        if sub is None:
            return False
        sub.snapshot = None  # a slice skips it
        subs = self.by_session.get(sub.session_id, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self.by_session.pop(sub.session_id, None)
        self._update_wanted(sub.session_id)
        return True

    def drop_peer(self, peer: bytes) -> None:
        """Forget every subscription of a client that can no longer be reached."""
        for key in [k for k in self.by_key if k[0] == peer]:
            self.unsubscribe(*key)

    def drop_session(self, session_id: str) -> None:
        for sub in list(self.by_session.get(session_id, ())):
            self.unsubscribe(sub.peer, sub.rid)

    def _emit(self, session_id: str, etype: EventTypes, body: dict, row: dict, is_task: bool, data=None) -> None:
        """Queue an event for the subscriptions that want it; ``data``: a completed result's, for those that take
        small ones inline (``inline_max``). Events leave after the turn's commit: the data is durable by then."""
        with_data = None
        for sub in self.by_session.get(session_id, ()):
            if etype not in sub.types:
                continue
            if is_task:
                if not sub.task_filter(row):
                    continue
            elif ((sub.result_ids is not None and row["result_id"] not in sub.result_ids)
                  or (sub.snapshot is not None and sub.snapshot.holds(row["result_id"]))
                  or not sub.result_filter(row)):
                continue  # not named, named but before its snapshot status, or filtered out
            item = body
            if data is not None and sub.inline_max and row["size"] <= sub.inline_max:  # 0: never, even empty
                if with_data is None:  # joined once, for every subscription that takes it
                    with_data = {**body, "data": _joined(data)}
                item = with_data
            if not sub.pending:
                self.dirty.append(sub)
            sub.pending.append([int(etype), item])

    # -- the five ArmoniK event types --------------------------------------------------------------

    def new_task(self, row: dict) -> None:
        if _E.NEW_TASK in self.wanted.get(row["session_id"], ()):
            self._emit(row["session_id"], _E.NEW_TASK, {
                "task_id": row["task_id"], "payload_id": row["payload_id"],
                "origin_task_id": row.get("created_by") or "", "status": row["status"],
                "expected_output_keys": row["expected_output_ids"], "data_dependencies": row["data_dependencies"],
                "retry_of_ids": row["retry_of_ids"], "parent_task_ids": row["parent_task_ids"],
            }, row, True)

    def task_status(self, row: dict) -> None:
        if _E.TASK_STATUS_UPDATE in self.wanted.get(row["session_id"], ()):
            self._emit(row["session_id"], _E.TASK_STATUS_UPDATE,
                       {"task_id": row["task_id"], "status": row["status"]}, row, True)

    def new_result(self, row: dict) -> None:
        if _E.NEW_RESULT in self.wanted.get(row["session_id"], ()):
            self._emit(row["session_id"], _E.NEW_RESULT, {
                "result_id": row["result_id"], "owner_id": row["owner_task_id"], "status": row["status"],
            }, row, False)

    def result_status(self, row: dict, data=None) -> None:
        """A result's new status; ``data`` (bytes or frames) is what it completed with, when stored inline."""
        if _E.RESULT_STATUS_UPDATE in self.wanted.get(row["session_id"], ()):
            self._emit(row["session_id"], _E.RESULT_STATUS_UPDATE,
                       {"result_id": row["result_id"], "status": row["status"]}, row, False, data)

    def result_owner(self, row: dict, previous: str) -> None:
        if _E.RESULT_OWNER_UPDATE in self.wanted.get(row["session_id"], ()):
            self._emit(row["session_id"], _E.RESULT_OWNER_UPDATE, {
                "result_id": row["result_id"], "previous_owner_id": previous,
                "current_owner_id": row["owner_task_id"],
            }, row, False)

    def snapshot_slice(self, txn) -> Optional[tuple[Subscription, list]]:
        """Read the next statuses of the oldest snapshot in progress (at most ``EVENTS_PER_PUSH``) from ``txn``,
        a read transaction of the last commit; return its subscription and the events to push now, or None.

        From now on, those results' events are the subscription's. A COMPLETED result comes with its data when
        the subscription takes small data inline, as its completion event would have: a wait that begins
        just after the completion (the broker dispatches before its commit, so that is frequent) then needs
        no download round trip either. A result that is not in the subscription's session is NOTFOUND."""
        while self.snapshots:
            sub = self.snapshots[0]
            snap = sub.snapshot
            if snap is None:  # unsubscribed meanwhile
                self.snapshots.popleft()
                continue
            ids = snap.take(EVENTS_PER_PUSH)
            sid, inline_max, status_of = sub.session_id, sub.inline_max, txn.result_status
            events = []
            for result_id in ids:
                status = status_of(result_id, sid)
                body = {"result_id": result_id, "status": _NOTFOUND if status is None else status}
                if inline_max and status == _COMPLETED:
                    data = txn.read_small(result_id, inline_max)
                    if data is not None:
                        body["data"] = data
                events.append([_E.RESULT_STATUS_UPDATE, body])
            if snap.unread is None:
                sub.result_ids.update(ids)
            else:
                snap.unread.difference_update(ids)
            if snap.done():
                sub.snapshot = None
                self.snapshots.popleft()
            return sub, events
        return None

    def take(self) -> list[Subscription]:
        """Return the subscriptions with events to send (the caller clears ``pending``)."""
        dirty, self.dirty = self.dirty, []
        return dirty

    def discard_pending(self) -> None:
        """Drop buffered events (the turn's transaction was aborted: they never happened)."""
        for sub in self.dirty:
            sub.pending.clear()
        self.dirty = []
