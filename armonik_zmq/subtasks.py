"""Submitting from inside a task: ``get_client()`` / ``worker_client()`` (Dask's names) in a running call.

Inside a task, ``armonik_zmq.get_client()`` returns a ``WorkerClient`` whose ``submit``/``map``
create subtasks through the worker's ``TaskHandler``. ArmoniK commits a task's subtasks only when it
ends OK, so they run after the task: their futures cannot be waited for inside it. Instead:

- pass them to further ``submit`` calls (data dependencies between subtasks), and
- return one: the subtask then takes over this task's output (ArmoniK's ownership transfer), and
  the caller's future gets the subtask's value.

Calls are gathered while the task runs and sent when it returns: one request creates the outputs,
one the payloads, one the subtasks, whatever their number. A call that raises submits nothing.
"""

from __future__ import annotations

import contextlib
import io
import weakref
from typing import Any, Callable, Iterable, Iterator, List, Optional


from . import functions
from .protocol import Op

#: the task handler of the call running in this worker process (a worker runs one at a time), and the client
#: ``get_client()`` made for it
_handler = None
_current: Optional["WorkerClient"] = None
#: the last ``Client`` opened in this process, returned by ``get_client()`` outside tasks
_default_client: "Optional[weakref.ReferenceType]" = None


class SubtaskFuture:
    """The future value of a call submitted from inside a task; it runs once the task has ended."""

    def __init__(self, client: "WorkerClient", index: int):
        self._client = client
        self._index = index
        #: the output's id once submitted; a placeholder while the task runs
        self.result_id = f"\x00subtask-{id(client):x}-{index}"
        #: the subtask's id, once submitted
        self.task_id = ""

    def result(self, timeout: Optional[float] = None) -> Any:
        raise RuntimeError("a subtask runs only after the task that submitted it ends: it cannot be waited for "
                           "inside that task. Return its future instead (the subtask then computes this task's "
                           "result), or pass it to another submit as an argument.")

    exception = result

    def done(self) -> bool:
        return False

    def __reduce__(self):
        raise TypeError("a subtask's future can be returned by its task or passed to submit(), not stored in a "
                        "returned value or pickled otherwise")

    def __repr__(self) -> str:
        return f"<armonik_zmq.SubtaskFuture #{self._index} of task {self._client.task_handler.task_id}>"


class _Call:
    __slots__ = ("future", "function_bytes", "argument_bytes", "dependencies", "options")

    def __init__(self, future, function_bytes, argument_bytes, dependencies, options):
        self.future = future
        self.function_bytes = function_bytes
        self.argument_bytes = argument_bytes
        self.dependencies = dependencies
        self.options = options


class WorkerClient:
    """Submit subtasks from the task that is running (``get_client()`` inside a task returns one)."""

    def __init__(self, task_handler):
        self.task_handler = task_handler
        self._calls: List[_Call] = []
        self._function_bytes: dict[int, tuple[Callable, bytes]] = {}

    def submit(self, fn: Callable, *args, retries: Optional[int] = None, timeout: Optional[float] = None,
               priority: Optional[int] = None, partition: Optional[str] = None, **kwargs) -> SubtaskFuture:
        """Submit ``fn(*args, **kwargs)`` as a subtask of this task; subtask futures among the arguments are dependencies."""
        from .futures import _task_options

        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if _current is not self:
            raise RuntimeError("this task has ended: its client cannot submit any more")
        cached = self._function_bytes.get(id(fn))
        if cached is None or cached[0] is not fn:
            cached = self._function_bytes[id(fn)] = (fn, functions.dump_function(fn))
        buffer = io.BytesIO()
        pickler = functions._CallPickler(buffer, SubtaskFuture)  # futures become their (placeholder) result ids
        pickler.dump((args, kwargs))  # now: later changes to the arguments do not leak into the call
        future = SubtaskFuture(self, len(self._calls))
        self._calls.append(_Call(future, cached[1], buffer.getvalue(), list(pickler.dependencies),
                                 _task_options(retries, timeout, priority, partition)))
        return future

    def map(self, fn: Callable, *iterables: Iterable, **options) -> List[SubtaskFuture]:
        """Submit ``fn`` over the zipped iterables, one subtask per call."""
        return [self.submit(fn, *args, **options) for args in zip(*iterables)]

    def gather(self, futures, *args, **kwargs):
        raise RuntimeError("subtasks run after the task that submits them: return their futures, or submit a "
                           "function over them (e.g. submit(sum, futures)), instead of gathering inside the task")

    def _finish(self, value: Any) -> bool:
        """Submit the gathered calls; return True if ``value`` is one of them (it takes over this task's output)."""
        if not self._calls:
            return False
        handler = self.task_handler
        delegated = value if isinstance(value, SubtaskFuture) and value._client is self else None
        placeholders = {c.future._index: c.future.result_id for c in self._calls}
        own = [c for c in self._calls if c.future is not delegated]
        if own:
            created = handler.create_results_metadata([f"subtask-{c.future._index}" for c in own])
            for c in own:
                c.future.result_id = created[f"subtask-{c.future._index}"].result_id
        if delegated is not None:
            delegated.result_id = handler.expected_results[0]
        # placeholder -> result id; a future kept from an earlier task already names its real result
        aliases = {placeholders[c.future._index]: c.future.result_id for c in self._calls}
        payloads = handler.create_results({
            f"payload-{c.future._index}": functions.dump_payload(c.function_bytes, c.argument_bytes,
                                                                 {d: aliases.get(d, d) for d in c.dependencies})
            for c in self._calls})
        tasks = []
        for c in self._calls:
            task = {"payload_id": payloads[f"payload-{c.future._index}"].result_id,
                    "expected_output_ids": [c.future.result_id],
                    "data_dependencies": [aliases.get(d, d) for d in c.dependencies]}
            if c.options:
                task["options"] = c.options
            tasks.append(task)
        header = handler._call(Op.W_SUBMIT_TASKS, (), tasks=tasks)
        for c, info in zip(self._calls, header["tasks"]):
            c.future.task_id = info["task_id"]
        return delegated is not None


def begin(task_handler) -> None:
    """A call starts: ``get_client()`` makes its task's client when first asked (most calls never ask; making one
    for each call cost a tiny task ~0.8 us hot)."""
    global _handler
    _handler = task_handler


def end() -> None:
    """The call ended: its client (if it made one) can submit no more."""
    global _handler, _current
    _handler = _current = None


def _task_client() -> Optional[WorkerClient]:
    """The running task's client, made at its first use; None outside tasks."""
    global _current
    if _current is None and _handler is not None:
        _current = WorkerClient(_handler)
    return _current


def get_client():
    """Inside a task: a client that submits subtasks of it. Elsewhere: the last ``Client`` opened here."""
    current = _task_client()
    if current is not None:
        return current
    client = _default_client() if _default_client is not None else None
    if client is None or client._closed:
        raise ValueError("no client: get_client() works inside a task, or after armonik_zmq.Client(...) or "
                         "LocalCluster() opened one in this process")
    return client


@contextlib.contextmanager
def worker_client() -> Iterator[WorkerClient]:
    """``with worker_client() as client:`` inside a task, like Dask's; the subtasks are sent when the task returns."""
    current = _task_client()
    if current is None:
        raise ValueError("worker_client() works only inside a task run by armonik_zmq's function processor")
    yield current


def set_default_client(client) -> None:
    global _default_client
    _default_client = weakref.ref(client)
