"""``ArmoniKEvents``: the events service, with the official client's method names and signatures."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, List, Optional, Sequence, Union

from .. import protocol
from ..status import EventTypes, ResultStatus
from ..errors import NotFoundError
from ..errors import ConnectionLostError
from .arrived import inline_max_for
from .connection import Connection, Subscription
from .filters import to_wire_filter

__all__ = ["ArmoniKEvents"]

#: Most ids of a subscription's ``result_ids``: ``wait_for_result_availability`` buckets hold at most this.
_MAX_IDS = protocol.MAX_BATCH
_COMPLETED = int(ResultStatus.COMPLETED)
#: ids per step of ``_keys``
_KEYS_STEP = 8192
_ABORTED = int(ResultStatus.ABORTED)
_NOTFOUND = int(ResultStatus.NOTFOUND)


def _to_dnf(filter: Any, name: str, entity: str) -> Optional[list]:
    """Return ``filter`` (a ``Filter`` on ``entity``, or a list already) in the wire's disjunctive normal form."""
    return to_wire_filter(filter, entity, name) or None


def _event_type(value: Union[int, str]) -> int:
    """Return the number of an event type given as ``EventTypes``, int, or name ("new_result")."""
    return int(EventTypes.from_string(value) if isinstance(value, str) else EventTypes(value))


class ArmoniKEvents:
    """Follow the task and result events of a session."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def get_events(self, session_id: str, event_types: Iterable[Union[EventTypes, int]],
                   event_handlers: List[Callable[[str, EventTypes, Any], bool]],
                   task_filter: Optional[Any] = None, result_filter: Optional[Any] = None) -> None:
        """Call the handlers on each event of a session until one of them returns True.

        Args:
            session_id: the session.
            event_types: the event types wanted (empty: all).
            event_handlers: called in order as ``handler(session_id, event_type, event)``; the first
                that returns True ends the stream (the following handlers do not see that event).
            task_filter: a filter on tasks (``Task.status == ...``, or a list in disjunctive normal form).
            result_filter: a filter on results (``Result.name == ...``, or a list in disjunctive normal form).
        """
        with self._conn.subscribe(session_id, [_event_type(t) for t in event_types],
                                  _to_dnf(task_filter, "task_filter", "task"),
                                  _to_dnf(result_filter, "result_filter", "result")) as sub:
            for event_type, event in sub:
                if any(handler(session_id, event_type, event) for handler in event_handlers):
                    return

    def wait_for_result_availability(self, result_ids: Union[str, List[str]], session_id: str,
                                     bucket_size: int = 100, parallelism: int = 1) -> None:
        """Wait until every result is COMPLETED; raise ``RuntimeError`` as soon as one is ABORTED.

        No polling: each bucket of results is one subscription whose snapshot gives the current
        statuses, then status events arrive as they happen. A dropped connection (broker restart)
        is survived by subscribing again for the results still missing. Small results that complete
        meanwhile come with their data, which the next ``download_result_data`` of each on this
        connection takes without asking the broker (``Connection.arrived``).

        Args:
            result_ids: the result id(s).
            session_id: the session of the results.
            bucket_size: results per subscription (at most the wire's filter limit, 100,000).
            parallelism: subscriptions followed at once.
        """
        if isinstance(result_ids, str):
            result_ids = [result_ids]
        # No duplicates, order kept. A tuple of strings, and slices of it: the garbage collector stops tracking
        # them, so a long wait adds nothing to what each full collection of this process scans (at 100,000
        # results, lists and sets of ids made every full collection ~4 ms longer each, 3-5x that under load).
        ids = tuple(_keys(result_ids))
        if not ids:
            return
        size = max(1, min(bucket_size, _MAX_IDS))
        buckets = [ids[i:i + size] for i in range(0, len(ids), size)]
        if parallelism <= 1 or len(buckets) == 1:
            for bucket in buckets:
                self._wait_bucket(session_id, bucket, None)
            return
        self._wait_parallel(session_id, buckets, parallelism)

    def _wait_parallel(self, session_id: str, buckets: List[Sequence[str]], parallelism: int) -> None:
        """Wait for the buckets with ``parallelism`` threads; on the first error stop the others and raise it."""
        stop = _Stop()
        pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="armonik-zmq-wait")
        futures = []
        try:
            futures = [pool.submit(self._wait_bucket, session_id, bucket, stop) for bucket in buckets]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut in done and fut.exception() is not None:
                    raise fut.exception()
        finally:
            for fut in futures:
                fut.cancel()
            stop.set()  # wakes the threads still waiting, so the pool ends
            pool.shutdown(wait=True)

    def _wait_bucket(self, session_id: str, result_ids: Sequence[str], stop: Optional["_Stop"]) -> None:
        """Wait for one bucket of results (at most ``_MAX_IDS``) with one subscription."""
        inline_max = inline_max_for(len(result_ids))
        countdown = _Countdown(result_ids, self._conn.arrived.keeper(session_id) if inline_max else None)
        types = [int(EventTypes.NEW_RESULT), int(EventTypes.RESULT_STATUS_UPDATE)]
        while True:
            # The ids travel as one list of strings (``result_ids``), not a filter of three strings and two lists
            # per result: ~40x less to pack here, and to decode in the broker's turn.
            sub = self._conn.subscribe(session_id, types, result_ids=countdown.ids(), snapshot=True,
                                       inline_max=inline_max, on_events=countdown)
            try:
                if stop is not None and not stop.add(sub):
                    return
                for _, event in sub:  # only the events that end the wait get here (_Countdown)
                    if event.status == ResultStatus.COMPLETED:
                        return  # the last one missing
                    if event.status == ResultStatus.ABORTED:
                        raise RuntimeError(f"Result {event.result_id} has been aborted.")
                    raise NotFoundError(f"Result {event.result_id} not found in session {session_id}: "
                                        f"nothing to wait for")
                return  # closed by _Stop: another bucket failed
            except ConnectionLostError:
                continue  # the broker forgot the subscription: the new one's snapshot catches up
            finally:
                sub.close()
                if stop is not None:
                    stop.discard(sub)


def _keys(ids: Sequence[str]) -> dict:
    """``dict.fromkeys(ids)`` (no duplicates, order kept), built ``_KEYS_STEP`` ids at a time: in one call, 100,000
    ids hold this process's interpreter ~10 ms (a thread submitting meanwhile waits that long); between two
    steps another thread may take it."""
    keys: dict = {}
    for i in range(0, len(ids), _KEYS_STEP):
        keys.update(dict.fromkeys(ids[i:i + _KEYS_STEP]))
    return keys


class _Countdown:
    """The results a wait still misses, counted down on the thread that routes each push (``on_events``).

    Nothing per event is queued or kept: a push's events are dropped once counted, and only those that end
    the wait (the last completion, an abort, a result not found) reach the waiting thread. The missing ids
    are a dict of strings, which the garbage collector does not track (a set it would); a wait on 100,000
    results thus adds nothing that each full collection of this process scans (they pause all its threads).
    """

    __slots__ = ("_missing", "_lock", "_keep")

    def __init__(self, result_ids: Sequence[str], keep: Optional[Callable[[list], list]]):
        self._missing = _keys(result_ids)
        self._lock = threading.Lock()
        #: the connection's keeper of small results' data (``ArrivedData.keeper``), when events carry it
        self._keep = keep

    def ids(self) -> tuple:
        """The ids still missing (a tuple of strings: untracked by the collector once it has seen it)."""
        with self._lock:
            return tuple(self._missing)

    def __call__(self, events: list) -> list:
        if self._keep is not None:
            self._keep(events)
        ending = []
        with self._lock:  # a push of a subscription replaced after a reconnection may still be routed
            missing = self._missing
            for pair in events:
                body = pair[1]
                result_id = body.get("result_id")
                if result_id not in missing:
                    continue
                status = body.get("status")
                if status == _COMPLETED:
                    del missing[result_id]
                    if not missing:
                        ending.append(pair)
                elif status == _ABORTED or status == _NOTFOUND:
                    ending.append(pair)
        return ending


class _Stop:
    """The subscriptions of parallel waits, closed all at once when one wait fails."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: set = set()
        self._stopped = False

    def add(self, sub: Subscription) -> bool:
        """Track ``sub``; return False if the waits were already stopped."""
        with self._lock:
            if self._stopped:
                return False
            self._subs.add(sub)
            return True

    def discard(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def set(self) -> None:
        """Stop every wait: close their subscriptions, which ends their iteration."""
        with self._lock:
            self._stopped = True
            subs, self._subs = list(self._subs), set()
        for sub in subs:
            sub.close()
