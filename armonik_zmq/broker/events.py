"""Event subscriptions: which client wants which of a session's events, buffered until the turn commits."""

from __future__ import annotations

from ..status import EventTypes, ResultStatus, as_ints
from .filters import Filter

_E = as_ints(EventTypes)
_COMPLETED = int(ResultStatus.COMPLETED)


def _joined(data) -> bytes:
    """One bytes object from a result's data as stored: bytes, a buffer, or a list of frames."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


class Subscription:
    __slots__ = ("rid", "peer", "session_id", "types", "task_filter", "result_filter", "inline_max", "pending")

    def __init__(self, rid: int, peer: bytes, session_id: str, types: frozenset, task_filter, result_filter,
                 inline_max: int = 0):
        self.rid = rid
        self.peer = peer
        self.session_id = session_id
        self.types = types
        self.task_filter = task_filter
        self.result_filter = result_filter
        #: a result completed with at most this many bytes has them in its RESULT_STATUS_UPDATE (0: never)
        self.inline_max = inline_max
        #: events of this turn, sent after the commit
        self.pending: list = []


class EventBus:
    """Route task and result changes to the subscriptions of their session."""

    def __init__(self) -> None:
        self.by_session: dict[str, list[Subscription]] = {}
        self.by_key: dict[tuple[bytes, int], Subscription] = {}
        #: session id -> the event types any of its subscriptions wants: an event no one wants is never built
        self.wanted: dict[str, frozenset] = {}
        self.dirty: list[Subscription] = []

    def _update_wanted(self, session_id: str) -> None:
        subs = self.by_session.get(session_id)
        if subs:
            self.wanted[session_id] = frozenset().union(*(sub.types for sub in subs))
        else:
            self.wanted.pop(session_id, None)

    def subscribe(self, peer: bytes, rid: int, session_id: str, types, task_filter, result_filter,
                  inline_max: int = 0) -> Subscription:
        task_filter = Filter(task_filter, "task_filter", "task")
        result_filter = Filter(result_filter, "result_filter", "result")
        wanted = frozenset(EventTypes(t) for t in (types or ()) if t) or frozenset(EventTypes) - {EventTypes.UNSPECIFIED}
        sub = Subscription(rid, peer, session_id, wanted, task_filter, result_filter, inline_max)
        self.unsubscribe(peer, rid)
        self.by_key[(peer, rid)] = sub
        self.by_session.setdefault(session_id, []).append(sub)
        self._update_wanted(session_id)
        return sub

    def unsubscribe(self, peer: bytes, rid: int) -> bool:
        sub = self.by_key.pop((peer, rid), None)
        if sub is None:
            return False
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
            if not (sub.task_filter if is_task else sub.result_filter)(row):
                continue
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

    def snapshot(self, sub: Subscription, row: dict, read_small=None) -> None:
        """Queue the current status of one result for a new subscription (no race with "wait").

        A COMPLETED result comes with its data when the subscription takes small data inline (``read_small``:
        the result's bytes up to a size, or None), as its completion event would have: a wait that begins
        just after the completion (the broker dispatches before its commit, so that is frequent) then needs
        no download round trip either."""
        if _E.RESULT_STATUS_UPDATE in sub.types or _E.NEW_RESULT in sub.types:
            if not sub.pending:
                self.dirty.append(sub)
            body = {"result_id": row["result_id"], "status": row["status"]}
            if sub.inline_max and read_small is not None and row["status"] == _COMPLETED:
                data = read_small(row["result_id"], sub.inline_max)
                if data is not None:
                    body["data"] = data
            sub.pending.append([int(_E.RESULT_STATUS_UPDATE), body])

    def take(self) -> list[Subscription]:
        """Return the subscriptions with events to send (the caller clears ``pending``)."""
        dirty, self.dirty = self.dirty, []
        return dirty

    def discard_pending(self) -> None:
        """Drop buffered events (the turn's transaction was aborted: they never happened)."""
        for sub in self.dirty:
            sub.pending.clear()
        self.dirty = []
