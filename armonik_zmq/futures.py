"""The Python-native API: ``Client.submit`` returns a ``concurrent.futures.Future`` of a remote call.

Functions and arguments travel with cloudpickle to the built-in function processor
(``armonik_zmq.functions``). A future passed as an argument becomes a data dependency, so DAGs
build themselves. Completion needs no polling: each client follows one event subscription of its
session and settles the futures of the results it reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import ALL_COMPLETED, InvalidStateError
from datetime import timedelta
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union


from . import functions, shm, subtasks
from .common import TaskOptions
from .errors import ArmoniKZmqError, DataCorruptError
from .errors import BrokerUnavailableError, ConnectionLostError, TaskCancelledError, TaskFailedError, TaskTimeoutError, WorkerLostError
from .protocol import Op, chunks, split_frames
from .status import EventTypes, ResultStatus, TaskStatus

if TYPE_CHECKING:
    from .client import Connection

__all__ = ["Client", "Future", "LocalCluster", "as_completed", "wait"]

log = logging.getLogger(__name__)

#: results downloaded per request when many complete at once
_DOWNLOAD_BATCH = 256
#: results up to this size (bytes) come with their completion event: no download round trip
_INLINE_MAX = 16 * 1024
#: the result events a client follows: its tasks' outputs (a payload has no owner task)
_OUTPUTS = [[["owner_task_id", "ne", ""]]]
#: seconds between attempts to subscribe again after the connection dropped
_RESUBSCRIBE_DELAY = 0.2
#: a future's states, named as the stdlib names them (its ``wait`` and ``as_completed`` read them): a future here
#: is never RUNNING, and its cancel notifies the stdlib's waiters at once (CANCELLED_AND_NOTIFIED, never CANCELLED)
_PENDING, _FINISHED, _CANCELLED_AND_NOTIFIED = "PENDING", "FINISHED", "CANCELLED_AND_NOTIFIED"
_CANCELLED = frozenset({"CANCELLED", _CANCELLED_AND_NOTIFIED})
_DONE = frozenset({_FINISHED, *_CANCELLED})
_COMPLETED = int(ResultStatus.COMPLETED)


class Future(concurrent.futures.Future):
    """The future value of one remote call: a stdlib future, also awaitable in asyncio.

    It owns its state and implements every method of ``concurrent.futures.Future`` over it, calling none of the
    base class's: ``tests/test_futures.py`` checks that no method is inherited. Three fields are the stdlib's
    protocol with any future, read by its ``wait`` and ``as_completed``: ``_condition`` (held while they look),
    ``_state`` (the stdlib's state names) and ``_waiters`` (they add theirs; a settled future tells each). They are
    kept as the stdlib's own future keeps them, and the test checks a stdlib future still has them.

    The futures of a client share one ``Condition``: the stdlib's ``__init__`` makes one per future (a lock, a
    deque and five bound methods, GC-tracked objects), which cost the futures client 5.5 µs of CPU per tiny task
    (13.5 -> 19, interleaved runs of 20,000). A notification for one future wakes the threads waiting on others,
    so ``_await`` waits in a loop.
    """

    def __init__(self, client: "Client", result_id: str):
        # Not the stdlib's __init__: the state below is this class's (see the class's doc).
        self._condition = client._condition
        self._state = _PENDING
        self._waiters: list = []
        self._value = None
        self._error: Optional[BaseException] = None
        self._callbacks: list = []
        self._client = client
        #: the id of the result that will hold the value (the data dependency when passed to another call)
        self.result_id = result_id
        #: the id of the task computing it
        self.task_id = ""

    # -- reading ---------------------------------------------------------------------------------

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        """False: the call runs on a worker, never here (a stdlib future runs in its executor's thread)."""
        return False

    def result(self, timeout: Optional[float] = None) -> Any:
        """The value (``concurrent.futures.Future.result``); while waiting, this thread reads the broker's messages
        itself when no other thread does, so the value needs no hand-off from another thread."""
        if self._state is _FINISHED:  # final: what it was set with was set before it (``_set``), no lock to read it
            if self._error is not None:
                raise self._error
            return self._value
        self._await(timeout)
        with self._condition:
            if self._state in _CANCELLED:
                raise concurrent.futures.CancelledError()
            if self._state != _FINISHED:
                raise TimeoutError()
            if self._error is not None:
                raise self._error
            return self._value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The error (``concurrent.futures.Future.exception``), waited for like ``result``."""
        self._await(timeout)
        with self._condition:
            if self._state in _CANCELLED:
                raise concurrent.futures.CancelledError()
            if self._state != _FINISHED:
                raise TimeoutError()
            return self._error

    def _await(self, timeout: Optional[float]) -> None:
        """Wait until this future is settled or ``timeout`` passed: reading the broker's messages on this thread
        when no other thread does, else on the shared condition until some future is settled, then again."""
        if self._state in _DONE:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        read_until = self._client._conn.read_until
        while True:
            read_until(self.done, deadline)
            with self._condition:
                if self._state in _DONE:
                    return
                if deadline is None:
                    self._condition.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._condition.wait(left)

    def add_done_callback(self, fn: Callable[["Future"], Any]) -> None:
        """``concurrent.futures.Future.add_done_callback``: ``fn(self)`` once settled (now, if it is)."""
        with self._condition:
            if self._state not in _DONE:
                self._callbacks.append(fn)
                return
        _call_back(fn, self)

    # -- settling --------------------------------------------------------------------------------

    def cancel(self, force: bool = False) -> bool:
        """Cancel the task on the broker and this future; return False if the future is already done.

        A running task runs to its end and its value is dropped (ArmoniK's cancel); ``force=True``
        kills its worker process instead (the agent starts a new one).
        """
        if self.done():
            return False
        return self._client.cancel([self], force=force) == 1

    def set_running_or_notify_cancel(self) -> bool:
        """For executors (``concurrent.futures.Future``): nothing runs here, so this tells whether it was cancelled
        (False; the waiters know already) or raises: a settled future cannot start."""
        if self.cancelled():
            return False
        raise RuntimeError(f"{self!r} runs on a worker, not in an executor")

    def set_result(self, result: Any) -> None:
        self._set(_FINISHED, result, None)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        self._set(_FINISHED, None, exception)

    def _cancel_here(self) -> bool:
        """Mark this future cancelled and wake the stdlib's ``wait``/``as_completed`` waiting on it."""
        try:
            self._set(_CANCELLED_AND_NOTIFIED, None, None)
        except InvalidStateError:
            return False
        self._client._conn.poke()
        return True

    def _set(self, state: str, value: Any, error: Optional[BaseException]) -> None:
        """Settle: the state, the waiters of the stdlib's ``wait``/``as_completed``, then the callbacks (outside the
        condition, as the stdlib calls them)."""
        with self._condition:
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._value, self._error, self._state = value, error, state
            for waiter in self._waiters:
                if state is _CANCELLED_AND_NOTIFIED:
                    waiter.add_cancelled(self)
                elif error is not None:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            self._condition.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call_back(fn, self)

    def _settle_unshared(self, data) -> None:
        """Settle with the value ``data`` holds a future no other thread has seen (not registered, not returned yet):
        no waiter to tell, no callback, no condition to take."""
        try:
            self._value = functions.load_result(data)
        except Exception as exc:
            self._error = exc
        self._state = _FINISHED

    def _settle(self, value: Any = None, exception: Optional[BaseException] = None, poke: bool = True) -> None:
        """Settle with a value or an error; ``poke=False``: the caller wakes the reader once for a whole batch."""
        try:
            self._set(_FINISHED, value, exception)
        except InvalidStateError:  # cancelled here while the broker finished it
            return
        if poke:
            self._client._conn.poke()  # a thread reading in result() waits for this

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "finished" if self.done() else "pending"
        return f"<armonik_zmq.Future {state} result={self.result_id}>"


def _dead_ref() -> None:
    """What a weak reference whose object is gone returns (the place of ``Client._last_function`` before any)."""
    return None


def _call_back(fn: Callable[["Future"], Any], fut: "Future") -> None:
    """Call a done callback as the stdlib does: an exception it raises is logged, not raised."""
    try:
        fn(fut)
    except Exception:
        log.exception("exception calling callback for %r", fut)


class Client:
    """Submit Python calls to a cluster; one session per client, closed with it.

    Args:
        endpoint: the broker (default: env ``ARMONIK_ZMQ_ENDPOINT``, else ``tcp://127.0.0.1:5555``).
        retries: attempts of each task (ArmoniK's max_retries).
        timeout: longest run of one task, seconds (its max_duration).
        priority: tasks' priority (1..99).
        partitions: partitions the session may use (default: the default partition).
        connect_timeout: how long a broker call may wait for its reply.
        connection: an open ``Connection`` to use instead of connecting (left open by ``close``).
        server_key, secret: CURVE keys, as ``armonik_zmq.connect`` takes them (the broker's public key,
            this client's key pair).
    """

    def __init__(self, endpoint: Optional[str] = None, *, retries: int = 2, timeout: float = 3600.0,
                 priority: int = 1, partitions: Optional[List[str]] = None, connect_timeout: float = 30.0,
                 connection: Optional["Connection"] = None, server_key=None, secret=None,
                 shared_memory: bool = True):
        from .client import ArmoniKSessions, ArmoniKTasks, connect

        self._owns_connection = connection is None
        self._conn = (connect(endpoint, timeout=connect_timeout, server_key=server_key, secret=secret)
                      if connection is None else connection)
        self._tasks = ArmoniKTasks(self._conn)
        self._sessions = ArmoniKSessions(self._conn)
        self._closed = False
        self._lock = threading.Lock()  # guards _pending
        #: the condition of all this client's futures (see ``Future``)
        self._condition = threading.Condition()
        self._pending: dict[str, Future] = {}
        #: SUBMIT_INLINE requests waiting for their reply, and the (status, inline data) of unknown results seen
        #: meanwhile
        self._inline_in_flight = 0
        self._early: dict[str, tuple] = {}
        #: each function submitted: its pickle and its task name
        self._functions: "weakref.WeakKeyDictionary[Callable, tuple[bytes, str]]" = weakref.WeakKeyDictionary()
        #: the last function submitted (a weak reference) and its entry: a lone task's loop skips the dictionary
        self._last_function: tuple = (_dead_ref, None)
        try:
            header, _ = self._conn.call(Op.GET_SERVICE_CONFIG)
            self._chunk_size = int(header["data_chunk_max_size"])
            #: the broker's data socket when it runs on this host: large results are mapped, not downloaded
            self._service = header if shared_memory else None
            self._data = shm.DataChannel.open(header) if shared_memory else None
            options = TaskOptions(max_duration=timedelta(seconds=timeout), priority=priority, max_retries=retries)
            #: the session holding this client's tasks
            self.session_id = self._sessions.create_session(options, partitions)
            self._subscription = self._subscribe()
        except BaseException:
            if self._owns_connection:
                self._conn.close()
            raise
        self._listener = threading.Thread(target=self._listen, name="armonik-zmq-futures", daemon=True)
        self._listener.start()
        subtasks.set_default_client(self)  # what get_client() returns outside tasks

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, fn: Callable, *args, retries: Optional[int] = None, timeout: Optional[float] = None,
               priority: Optional[int] = None, partition: Optional[str] = None, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; futures among the arguments are replaced by their values."""
        if self._closed:
            raise RuntimeError("this Client is closed")
        last_ref, entry = self._last_function
        if last_ref() is not fn:
            entry = self._function(fn)
        function_bytes, name = entry
        payload, deps = functions.dump_call(function_bytes, args, kwargs, Future)
        task = {"name": name, "data_dependencies": deps}
        if retries is not None or timeout is not None or priority is not None or partition is not None:
            task["options"] = _task_options(retries, timeout, priority, partition)
        if len(payload) <= self._chunk_size:
            counts, frames = [1], (payload,)
        else:
            frames = chunks(payload, self._chunk_size)
            counts = [len(frames)]
        lock = self._lock
        with lock:  # (``_inline_begin``)
            self._inline_in_flight += 1
        try:
            header, _ = self._conn.call_fields(Op.SUBMIT_INLINE, {"session_id": self.session_id, "tasks": [task],
                                                                  "frames": counts}, frames)
            return self._register_one(header["tasks"][0])
        finally:
            with lock:  # (``_inline_end``)
                self._inline_in_flight -= 1
                if not self._inline_in_flight:
                    self._early.clear()

    def map(self, fn: Callable, *iterables: Iterable, chunksize: int = 1000, retries: Optional[int] = None,
            timeout: Optional[float] = None, priority: Optional[int] = None,
            partition: Optional[str] = None) -> List[Future]:
        """Submit ``fn`` over the zipped iterables, ``chunksize`` calls per broker message; return their futures.

        The next message is pickled while the broker handles the previous one: it leaves as soon as that one's
        reply has come.
        """
        if chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        options = _task_options(retries, timeout, priority, partition)
        calls = ((args, {}) for args in zip(*iterables))
        return self._submit_calls(fn, iter(lambda: list(islice(calls, chunksize)), []), options)

    def _function(self, fn: Callable) -> tuple[bytes, str]:
        """Return ``fn`` pickled with cloudpickle and its task name, once per function object."""
        try:
            entry = self._functions.get(fn)
        except TypeError:  # not weakly referenceable (a builtin, a callable instance)
            entry = None
            cache = False
        else:
            cache = True
        if entry is None:
            if not callable(fn):
                raise TypeError(f"fn must be callable, not {type(fn).__name__}")
            entry = (functions.dump_function(fn), getattr(fn, "__name__", "call"))
            if cache:
                self._functions[fn] = entry
        if cache:
            self._last_function = (weakref.ref(fn), entry)
        return entry

    def _request(self, function_bytes: bytes, name: str, calls: Iterable[tuple],
                 options: Optional[dict]) -> tuple[dict, list]:
        """The fields and data frames of the SUBMIT_INLINE request of ``calls`` (``(args, kwargs)`` pairs)."""
        counts, frames, tasks = [], [], []
        size = self._chunk_size
        for args, kwargs in calls:
            payload, deps = functions.dump_call(function_bytes, args, kwargs, Future)
            if len(payload) <= size:
                counts.append(1)
                frames.append(payload)
            else:
                parts = chunks(payload, size)
                counts.append(len(parts))
                frames.extend(parts)
            task = {"name": name, "data_dependencies": deps}
            if options:
                task["options"] = options
            tasks.append(task)
        return {"session_id": self.session_id, "tasks": tasks, "frames": counts}, frames

    def _submit_calls(self, fn: Callable, batches: Iterable[Sequence[tuple]], options: Optional[dict]) -> List[Future]:
        """Submit one task per call, one SUBMIT_INLINE request per batch of calls (payloads, outputs and tasks
        together); return their futures, in order."""
        self._check_open()
        function_bytes, name = self._function(fn)

        def request(calls: Sequence[tuple]) -> tuple[dict, list]:
            return self._request(function_bytes, name, calls, options)

        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return []
        second = next(batches, None)
        # One request creates the payloads, the outputs and the tasks (one commit on the way to the start).
        # The output ids come with its reply, so a completion may overtake their registration: statuses
        # of unknown results are kept meanwhile (``_early``) and looked at once the futures are registered.
        self._inline_begin()
        futures: List[Future] = []
        try:
            if second is None:
                fields, frames = request(first)
                replies = [self._conn.call(Op.SUBMIT_INLINE, frames=frames, counts=fields.pop("frames"), **fields)]
            else:
                # One request in flight at a time (two would share the broker's turn and its commit, which then
                # answers neither before both are handled); the next one is pickled while the broker handles it.
                replies = self._conn.replies(Op.SUBMIT_INLINE, map(request, itertools.chain((first, second), batches)),
                                              window=1)
            for header, _ in replies:
                futures.extend(self._register(header["tasks"]))
        finally:
            self._inline_end()
        return futures

    def _inline_begin(self) -> None:
        """A SUBMIT_INLINE is in flight: completions of results not registered yet are kept (``_early``)."""
        with self._lock:
            self._inline_in_flight += 1

    def _inline_end(self) -> None:
        with self._lock:
            self._inline_in_flight -= 1
            if not self._inline_in_flight:
                self._early.clear()

    def _register_one(self, task: dict) -> Future:
        """``_register`` of a lone task, whose value came inside its submit's reply (or else by ``_register``)."""
        result_id = task["expected_output_ids"][0]
        came = None
        if self._early:  # (empty: its status comes later, which _register orders under the lock)
            with self._lock:
                came = self._early.get(result_id)
                if came is None or came[0] != _COMPLETED or came[1] is None:
                    came = None
                else:
                    del self._early[result_id]
        if came is None:
            return self._register([task])[0]
        fut = Future(self, result_id)
        fut.task_id = task["task_id"]
        fut._settle_unshared(came[1])  # never registered: no other thread has seen it
        return fut

    def _register(self, tasks: list) -> List[Future]:
        """Make and register the futures of tasks a SUBMIT_INLINE created; settle those whose status came first."""
        futures, arrived, early = [], [], []
        pending, came_early = self._pending, self._early
        with self._lock:
            for task in tasks:
                result_id = task["expected_output_ids"][0]
                fut = Future(self, result_id)
                fut.task_id = task["task_id"]
                came = came_early.pop(result_id, None) if came_early else None
                if came is None:
                    pending[result_id] = fut
                elif came[0] == _COMPLETED and came[1] is not None:
                    arrived.append((fut, came[1]))  # its value came before it: never registered, settled below
                else:
                    pending[result_id] = fut
                    early.append(came + (result_id,))
                futures.append(fut)
        if len(arrived) < len(futures):
            self._conn.expect()  # futures wait for their events: read them even if nobody calls
        for fut, data in arrived:  # (a lone task's value comes inside its submit's reply)
            fut._settle_unshared(data)
        if early:
            self._on_statuses({rid: status for status, _, rid in early},
                              {rid: data for _, data, rid in early if data is not None})
        return futures

    # -- waiting --------------------------------------------------------------------------------

    @staticmethod
    def gather(futures: Iterable[Future], timeout: Optional[float] = None) -> list:
        """Return the values of the futures, in order; raise the first error met."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    @staticmethod
    def as_completed(futures: Iterable[Future], timeout: Optional[float] = None,
                     progress: Union[bool, dict] = False) -> Iterator[Future]:
        """Yield the futures as they finish (cancelled ones included); ``TimeoutError`` after ``timeout``.

        ``progress=True`` shows a ``tqdm.auto`` bar (a widget in notebooks, a bar in terminals); a dict
        is passed to ``tqdm`` as its options (``{"desc": "tiles", "file": sys.stdout}``).
        """
        return as_completed(futures, timeout, progress)

    @staticmethod
    def wait(futures: Iterable[Future], timeout: Optional[float] = None, return_when: str = ALL_COMPLETED):
        """Wait like ``concurrent.futures.wait``; return ``(done, not_done)``."""
        return concurrent.futures.wait(futures, timeout, return_when)

    def cancel(self, futures: Iterable[Future], force: bool = False) -> int:
        """Cancel the tasks of the futures not done yet (one broker request); return how many were cancelled.

        ``force``: kill the worker processes running any of them, rather than let those runs end unused.
        """
        todo = [f for f in futures if not f.done()]
        if todo:
            self._tasks.cancel_tasks([f.task_id for f in todo], force=force)
            with self._lock:  # settled here: their ABORTED events need no lookup
                for f in todo:
                    self._pending.pop(f.result_id, None)
        return sum(f._cancel_here() for f in todo)

    def release(self, futures: Iterable[Future]) -> None:
        """Delete the data of finished futures' results, freeing their shared-memory segments (or LMDB data).

        The futures keep the values they hold (an array already mapped stays valid: the file goes when its
        last mapping does); a task not submitted yet that takes one of them as an argument would fail.
        Futures not done yet are refused (``ValueError``): cancel them instead. Failed ones have no data.
        """
        from .client import ArmoniKResults

        futures = list(futures)
        if any(not f.done() for f in futures):
            raise ValueError("release() takes finished futures only: cancel the others")
        ids = [f.result_id for f in futures if not f.cancelled() and f.exception(0) is None]
        if ids:
            ArmoniKResults(self._conn).delete_result_data(ids, self.session_id, batch_size=len(ids))

    # -- completion -------------------------------------------------------------------------------

    def _subscribe(self):
        return self._conn.subscribe(self.session_id, [int(EventTypes.RESULT_STATUS_UPDATE)], result_filter=_OUTPUTS,
                                    inline_max=_INLINE_MAX, on_events=self._settle_arrived, waiter_reads=False,
                                    with_replies=True, idle=self._expects_nothing)

    def _expects_nothing(self) -> bool:
        """No future waits for its result: an event that comes now can wait for the next call to be read."""
        return not self._pending

    def _settle_arrived(self, events: list) -> list:
        """On the thread routing the connection's messages (its I/O thread, or a user thread waiting in
        ``result()``): settle the futures whose value came with their completion event, one thread hop sooner
        than the listener would; return the other events, for the listener.

        A future with done callbacks is left to the listener: a callback may call the broker and wait for the
        reply, and must not hold up the routing of other messages meanwhile.
        """
        rest = []
        for item in events:
            body = item[1]
            data = body.get("data")
            fut = self._pending.get(body["result_id"]) if data is not None else None
            if fut is None and data is not None and self._inline_in_flight:
                with self._lock:  # its SUBMIT_INLINE's reply came just before (same commit): kept for it, no hop
                    fut = self._pending.get(body["result_id"])
                    if fut is None and self._inline_in_flight:
                        self._early[body["result_id"]] = (body["status"], data)
                        continue
            if fut is None:  # no data, or not registered yet (the listener keeps it for its SUBMIT_INLINE)
                rest.append(item)
                continue
            with fut._condition:  # add_done_callback takes it too: no callback can slip in
                if fut._callbacks:
                    rest.append(item)
                    continue
                with self._lock:
                    if self._pending.pop(body["result_id"], None) is None:
                        continue  # settled meanwhile (cancelled, closed)
                _settle_with(fut, data)
        return rest

    def _listen(self) -> None:
        """Settle futures from the session's result events, a batch of events at a time."""
        while not self._closed:
            try:
                bodies = [body for _, body in self._subscription.get_batch()]
                self._on_statuses({b["result_id"]: b["status"] for b in bodies},
                                  {b["result_id"]: b["data"] for b in bodies if "data" in b})
            except ConnectionLostError:
                self._resubscribe()
            except Exception:
                if self._closed:
                    return
                log.exception("settling futures of session %s failed", self.session_id)

    def _resubscribe(self) -> None:
        """Subscribe again after a dropped connection, then catch up with the statuses missed meanwhile."""
        while not self._closed:
            try:
                self._subscription = self._subscribe()
                with self._lock:
                    ids = list(self._pending)
                for start in range(0, len(ids), _DOWNLOAD_BATCH):
                    header, _ = self._conn.call(Op.GET_RESULTS, result_ids=ids[start:start + _DOWNLOAD_BATCH])
                    self._on_statuses({r["result_id"]: r["status"] for r in header["results"]})
                return
            except BrokerUnavailableError:  # still down: try again shortly
                time.sleep(_RESUBSCRIBE_DELAY)

    def _on_statuses(self, statuses: dict, inline: Optional[dict] = None) -> None:
        """Settle the futures of results that completed (``inline``: the data of those that came with it) or
        were aborted."""
        inline = inline or {}
        with self._lock:
            if self._inline_in_flight:
                self._early.update((rid, (s, inline.get(rid))) for rid, s in statuses.items()
                                   if rid not in self._pending)
            completed = [rid for rid, s in statuses.items() if s == ResultStatus.COMPLETED and rid in self._pending]
            aborted = [rid for rid, s in statuses.items() if s == ResultStatus.ABORTED and rid in self._pending]
            arrived = [(self._pending.pop(rid), inline[rid]) for rid in completed if rid in inline]
        for fut, data in arrived:
            _settle_with(fut, data, poke=False)
        if arrived:
            self._conn.poke()
        completed = [rid for rid in completed if rid not in inline]
        for start in range(0, len(completed), _DOWNLOAD_BATCH):
            self._download(completed[start:start + _DOWNLOAD_BATCH])
        if aborted:
            self._fail(aborted)

    def _download(self, result_ids: List[str]) -> None:
        views = None
        for attempt in range(2):  # a broken data socket (the broker restarted): once more on its new socket
            if self._data is None and self._service is not None:
                self._data = shm.DataChannel.open(self._service)
            if self._data is None:
                break
            try:
                views = self._data.get(self.session_id, result_ids)
                break
            except (OSError, shm.DataError) as exc:
                log.warning("data socket unusable (%s): %s", exc,
                            "connecting again" if not attempt else "downloading over the sockets")
                self._data.close()
                self._data = None
        if views is not None:
            try:  # one wake-up of a thread reading in result() for the batch, not one per future
                for rid, view in views.items():
                    with self._lock:
                        fut = self._pending.pop(rid, None)
                    if fut is None:
                        continue
                    if isinstance(view, shm.DataError):
                        fut._settle(exception=DataCorruptError(str(view)), poke=False)
                        continue
                    _settle_with(fut, view, poke=False)
            finally:
                self._conn.poke()
            result_ids = [rid for rid in result_ids if rid not in views]
            if not result_ids:
                return
        try:
            header, frames = self._conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=self.session_id,
                                             result_ids=result_ids)
        except ArmoniKZmqError as exc:
            if isinstance(exc, BrokerUnavailableError):
                raise  # transient: the listener subscribes again and catches up
            for rid in result_ids:  # the data cannot be read: say so rather than leave the futures waiting
                with self._lock:
                    fut = self._pending.pop(rid, None)
                if fut is not None:
                    fut._settle(exception=exc)
            return
        try:
            for rid, parts in zip(result_ids, split_frames(frames, header["frames"])):
                with self._lock:
                    fut = self._pending.pop(rid, None)
                if fut is None:
                    continue
                _settle_with(fut, parts[0] if len(parts) == 1 else b"".join(parts), poke=False)
        finally:
            self._conn.poke()

    def _fail(self, result_ids: List[str]) -> None:
        """Fail the futures of aborted results with the error of the task that owned each."""
        header, _ = self._conn.call(Op.GET_RESULTS, result_ids=result_ids)
        owners = {r["result_id"]: r["owner_task_id"] for r in header["results"]}
        header, _ = self._conn.call(Op.GET_TASKS, task_ids=list(dict.fromkeys(owners.values())))
        tasks = {t["task_id"]: t for t in header["tasks"]}
        for rid in result_ids:
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is not None:
                fut._settle(exception=_task_error(tasks.get(owners.get(rid), {}), rid))

    # -- lifetime -------------------------------------------------------------------------------

    def session(self, *, retries: int = 2, timeout: float = 3600.0, priority: int = 1,
                partitions: Optional[List[str]] = None) -> "Client":
        """Open another session on this client's connection, as a client of its own.

        Use it as a context manager: its session is closed on exit, cancelled on an exception.
        """
        self._check_open()
        return Client(retries=retries, timeout=timeout, priority=priority, partitions=partitions,
                      connection=self._conn)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Client is closed")

    def close(self, cancel: bool = False) -> None:
        """Close the session (``cancel``: cancel it, stopping its tasks), the event subscription and our connection.

        Futures still pending are cancelled here.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if cancel:
                self._sessions.cancel_session(self.session_id)
            else:
                self._sessions.close_session(self.session_id)
        finally:
            self._subscription.close()
            with self._lock:
                pending, self._pending = list(self._pending.values()), {}
            for fut in pending:
                fut._cancel_here()
            if self._owns_connection:
                self._conn.close()
            self._listener.join()
            if self._data is not None:  # values already mapped stay valid: a mapping outlives its descriptor
                self._data.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

    def __repr__(self) -> str:
        return f"<armonik_zmq.Client session={self.session_id} {'closed' if self._closed else 'open'}>"


def as_completed(futures: Iterable[concurrent.futures.Future], timeout: Optional[float] = None,
                 progress: Union[bool, dict] = False) -> Iterator[concurrent.futures.Future]:
    """``concurrent.futures.as_completed``, with an optional ``tqdm.auto`` progress bar (see ``Client.as_completed``)."""
    if not progress:
        return concurrent.futures.as_completed(futures, timeout)
    futures = list(futures)
    return _with_progress(concurrent.futures.as_completed(futures, timeout), len(set(futures)),
                          progress if isinstance(progress, dict) else {})


def _with_progress(done: Iterator, total: int, options: dict) -> Iterator:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="task", **options) as bar:  # closed on a timeout too
        for fut in done:
            bar.update(1)
            yield fut


def wait(futures: Iterable[concurrent.futures.Future], timeout: Optional[float] = None,
         return_when: str = ALL_COMPLETED):
    """``concurrent.futures.wait``: return ``(done, not_done)``."""
    return concurrent.futures.wait(futures, timeout, return_when)


def _settle_with(fut: Future, data, poke: bool = True) -> None:
    """Settle a future with the value its result's data holds (or the error of decoding it)."""
    try:
        value = functions.load_result(data)
    except Exception as exc:
        fut._settle(exception=exc, poke=poke)
        return
    fut._settle(value, poke=poke)


def _task_options(retries: Optional[int], timeout: Optional[float], priority: Optional[int],
                  partition: Optional[str]) -> Optional[dict]:
    """Return the wire options of tasks submitted with these overrides (None: the session's defaults)."""
    options = {name: value for name, value in (("max_retries", retries), ("max_duration", timeout),
                                                ("priority", priority), ("partition_id", partition))
               if value is not None}
    return options or None


def _task_error(task: dict, result_id: str) -> TaskFailedError:
    """Return the exception of a task that ended without writing its output."""
    task_id, message = task.get("task_id", ""), task.get("status_message", "") or ""
    status = task.get("status")
    text = f"task {task_id} of result {result_id} ended {TaskStatus(status).name if status else 'without a value'}"
    text += f": {message}" if message else ""
    if status in (TaskStatus.CANCELLED, TaskStatus.CANCELLING):
        return TaskCancelledError(text, task_id, message)
    if status == TaskStatus.TIMEOUT:
        return TaskTimeoutError(text, task_id, message)
    if status == TaskStatus.ERROR and "died" in message:
        return WorkerLostError(text, task_id, message)
    return TaskFailedError(text, task_id, message)


class LocalCluster:
    """A broker, an agent and ``n_workers`` worker processes for a script or a notebook.

    ``with LocalCluster(n_workers=4) as client:`` yields a connected ``Client``; leaving the block
    closes it and stops the processes. The agent and the client reach the broker through Unix-socket links
    (unixlink.py), without ZeroMQ I/O threads on the way, unless ``links`` is False or ``secure`` (CURVE).
    ``broker_args`` are extra options for ``armonik-zmq broker`` (e.g. ``("--durability", "wal")``).
    """

    def __init__(self, n_workers: int = 4, *, secure: bool = False, links: Optional[bool] = None,
                 broker_args: Sequence[str] = (), **client_options: Any):
        from .cluster import LocalProcesses

        # secure: CURVE between every process, with keys made for this cluster only
        self.processes = LocalProcesses(workers=n_workers, processor="armonik_zmq.functions:processor", secure=secure,
                                        links=links, broker_args=tuple(broker_args))
        self._client_options = {**self.processes.client_keys, **client_options}
        self.client: Optional[Client] = None

    @property
    def endpoint(self) -> str:
        return self.processes.endpoint

    def __enter__(self) -> Client:
        self.processes.start()
        try:
            self.client = Client(self.endpoint, **self._client_options)
        except BaseException:
            self.processes.cleanup()
            raise
        return self.client

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.client is not None:
                self.client.__exit__(exc_type, exc, tb)
        finally:
            self.processes.cleanup()
